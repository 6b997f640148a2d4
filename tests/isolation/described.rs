//! A `Describe` of a client's named statement inside a failed transaction block, on a backend
//! that has not prepared it. The server answers it for a statement that returns no rows
//! (ParameterDescription, NoData: no catalog access needed) and refuses it for one that returns
//! rows (25P02). pgtenant prepares a client's statements on whichever backend a transaction runs
//! on, and inside a failed block its Parse fails (25P02): it must answer the first kind itself.
//! Found by the strict differential test (seeds 1, 73, 164, 214, 215).
//!
//! The server is the reference: the same messages go to a connection straight to it, and the
//! replies must be the same, byte for byte but for where in the server's source an error was
//! raised (its F, L and R fields).

use std::time::Duration;

use crate::adversarial::Checks;
use crate::common::*;
use crate::wire::{self, Wire};

/// Rowless with a parameter the server infers (int4), and one that returns rows.
const STATEMENTS: [(&str, &str); 2] = [("s_rowless", "DELETE FROM orders WHERE id = $1"), ("s_rows", "select $1::int + 1")];

/// Every message of the replies to a write that ends in `n` Syncs or Queries, as (tag, body).
async fn raw_round(w: &mut Wire, bytes: &[u8], n: usize) -> Result<Vec<(u8, Vec<u8>)>, String> {
    w.send(bytes).await?;
    let mut out = Vec::new();
    let mut readies = 0;
    while readies < n {
        match w.read_msg(Duration::from_secs(10)).await? {
            None => return Err(format!("connection closed after {out:?}")),
            Some((tag, body)) => {
                readies += usize::from(tag == b'Z');
                if tag == b'E' {
                    // where in the server's source it was raised (F, L, R) is not compared
                    let fields: Vec<&[u8]> = body.split(|&b| b == 0).filter(|f| !f.is_empty() && !b"FLR".contains(&f[0])).collect();
                    out.push((tag, fields.join(&0u8)));
                } else if tag != b'N' && tag != b'S' {
                    out.push((tag, body));
                }
            }
        }
    }
    Ok(out)
}

/// Describes of each statement in a failed block, each in its own batch: what the test compares.
fn failed_block_describes() -> Vec<u8> {
    let mut b = [wire::query("BEGIN"), wire::query("select 1/0")].concat();
    for (name, _) in STATEMENTS {
        b.extend([wire::describe(b'S', name), wire::sync()].concat());
    }
    b
}

fn show(msgs: &[(u8, Vec<u8>)]) -> String {
    msgs.iter().map(|(t, b)| format!("{}{:?}", *t as char, String::from_utf8_lossy(b))).collect::<Vec<_>>().join(" ")
}

pub async fn describe_in_a_failed_block(env: &Env) -> TestResult {
    let mut c = Checks::new("describe_in_a_failed_block");
    let parses: Vec<u8> = STATEMENTS.iter().flat_map(|(n, sql)| wire::parse(n, sql, &[])).chain(wire::sync()).collect();
    // the reference: a connection straight to the server
    let server: std::net::SocketAddr = format!("127.0.0.1:{}", env.cluster.port()).parse().map_err(|e| format!("{e}"))?;
    let mut direct = Wire::login(server, &[("user", "app_user"), ("database", "app")], "app-secret").await?;
    raw_round(&mut direct, &parses, 1).await?;
    let want = raw_round(&mut direct, &failed_block_describes(), 4).await?;
    let described = want.iter().any(|(t, _)| *t == b't') && want.iter().any(|(t, _)| *t == b'n');
    c.check("the server describes the rowless statement in a failed block", described, show(&want));
    direct.close().await;

    let p = start_proxy(env, "pool_size = 2", "").await;
    let mut a = Wire::connect(p.addr, &token(1, "alice")).await?;
    // the statements are prepared on backend X, in a transaction that shows which one it is
    let r = a.simple("BEGIN; select pg_backend_pid()").await;
    let x = r.get(0, 0);
    raw_round(&mut a, &parses, 1).await?;
    let r = a.simple("COMMIT").await;
    c.check("the statements are parsed", r.ok(), r.summary());
    // two other clients hold both backends; the one not on X lets go of it
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut h = Wire::connect(p.addr, &token(1, "holder")).await?;
        let r = h.simple("BEGIN; select pg_backend_pid()").await;
        holders.push((r.get(0, 0), h));
    }
    let on_x = holders.iter().filter(|(pid, _)| *pid == x).count();
    c.check("one holder has backend X", on_x == 1, format!("X = {x}, holders on {:?}", holders.iter().map(|(p, _)| p).collect::<Vec<_>>()));
    // first A's failed block runs on the other backend, which has not prepared the statements
    // (X is held); then with X free too, on either
    for (phase, frees_x) in [("on a backend without the statements", false), ("with backend X free too", true)] {
        for (_, h) in holders.iter_mut().filter(|(pid, _)| (*pid == x) == frees_x) {
            let r = h.simple("COMMIT").await;
            c.check(&format!("{phase}: its holder lets a backend go"), r.ok(), r.summary());
        }
        let got = raw_round(&mut a, &failed_block_describes(), 4).await?;
        c.check(&format!("{phase}: through pgtenant the replies are the server's"), got == want, format!("server: {}\npgtenant: {}", show(&want), show(&got)));
        let r = a.simple("ROLLBACK").await;
        c.check(&format!("{phase}: the session goes on"), r.ok() && r.status() == b'I', r.summary());
    }
    for (_, h) in holders {
        h.close().await;
    }
    a.close().await;
    p.stop().await;
    c.done()
}
