//! A tenant must not be able to take the shared server down. PostgreSQL 15 (15.18 here) crashes
//! when a client executes the unnamed portal that a utility statement sent as a simple Query,
//! which failed while it ran inside a transaction block, leaves behind (a `COPY … FROM STDIN` the
//! client fails, or one row-level security refuses: the portal outlives its statement's memory).
//! A backend that crashes makes the postmaster end every connection and recover: every tenant's
//! work is lost. Found by the protocol differential test (seed 83, round 5,717: the direct
//! connection took the server down).
//!
//! The invariant tested is the server's, not pgtenant's answer: after each way in, a connection
//! straight to the server opened before it all is still there, with the same backend (a crash
//! ends every backend), and a client of another tenant still works.

use std::time::Duration;

use crate::adversarial::{finish, still_tenant_one, victim, Checks};
use crate::common::*;
use crate::wire::{self, Wire};

const TABLE: &str = "CREATE TABLE IF NOT EXISTS dangling_copy (n int); GRANT INSERT ON dangling_copy TO app_user";

/// The backend of a connection straight to the server (another of its sessions), or why not.
async fn survivor_pid(w: &mut Wire) -> String {
    let r = w.simple("select pg_backend_pid()").await;
    if r.ok() { r.get(0, 0) } else { r.summary() }
}

/// `BEGIN`, then a Query that fails while it runs: the server keeps its portal. With the SQLSTATE
/// it fails with.
fn openers() -> [(Vec<u8>, &'static str); 3] {
    [
        // a COPY FROM STDIN the client fails
        ([wire::query("BEGIN"), wire::query("COPY dangling_copy FROM STDIN"), wire::copy_data(b"1\n"), wire::copy_fail("no")].concat(), "57014"),
        // a COPY the server refuses under row-level security, before any COPY mode
        ([wire::query("BEGIN"), wire::query("COPY orders FROM STDIN")].concat(), "0A000"),
        // any utility statement that fails while it runs (this one was not seen to crash it)
        ([wire::query("BEGIN"), wire::query("SET work_mem = 'bogus'")].concat(), "22023"),
    ]
}

pub async fn dangling_unnamed_portal(env: &Env) -> TestResult {
    let mut c = Checks::new("dangling_unnamed_portal");
    env.cluster.psql("app", TABLE).map_err(|e| e.to_string())?;
    let before = victim(env);
    let server: std::net::SocketAddr = format!("127.0.0.1:{}", env.cluster.port()).parse().map_err(|e| format!("{e}"))?;
    let mut survivor = Wire::login(server, &[("user", "app_user"), ("database", "app")], "app-secret").await?;
    let started = survivor_pid(&mut survivor).await;
    // each after an opener, with how many ReadyForQuery in all
    let ways: [(&str, Vec<u8>, usize); 3] = [
        // the sequence the differential test found (the Query in between reuses the memory)
        ("Execute of the unnamed portal", [wire::query("select $1::int + 1"), wire::execute("", 0), wire::sync()].concat(), 4),
        // a Bind of the unnamed portal that the server skips (the block failed): pgtenant recorded
        // it, so the Execute goes to the server
        (
            "Execute after a skipped Bind",
            [wire::query("select $1::int + 1"), wire::parse("", "select 1", &[]), wire::bind("", "", &[]), wire::sync(), wire::execute("", 0), wire::sync()].concat(),
            5,
        ),
        ("Describe and Close of it", [wire::query("select $1::int + 1"), wire::describe(b'P', ""), wire::close(b'P', ""), wire::sync()].concat(), 4),
    ];
    for session in [false, true] {
        let mode = if session { "session" } else { "transaction" };
        let p = start_proxy(env, "pool_size = 2", if session { "[pool]\nmode = \"session\"" } else { "" }).await;
        let mut other = Wire::connect(p.addr, &token(2, "bob")).await?;
        let r = other.simple("select count(*) from orders").await;
        c.check(&format!("{mode}: another tenant is connected"), r.ok(), r.summary());
        let mut a = Wire::connect(p.addr, &token(1, "alice")).await?;
        for ((opener, code), (what, rest, readies)) in openers().iter().flat_map(|o| ways.iter().map(move |w| (o, w))) {
            let what = format!("{what} after {code}");
            let r = a.round(&[opener.clone(), rest.clone()].concat(), *readies).await;
            c.check(&format!("{mode}, {what}: the Query failed in the block"), r.summary().contains(code), r.summary());
            if what.starts_with("Execute") {
                c.check(&format!("{mode}, {what}: no portal to run (34000)"), r.summary().contains("34000"), r.summary());
            }
            let r = a.simple("rollback").await;
            c.check(&format!("{mode}, {what}: the session goes on"), r.ok() && r.status() == b'I', r.summary());
            let now = survivor_pid(&mut survivor).await;
            c.check(&format!("{mode}, {what}: the server's other sessions live on"), now == started, format!("{started} -> {now}"));
            let r = other.simple("select count(*) from orders").await;
            c.check(&format!("{mode}, {what}: the other tenant's connection still works"), r.ok(), r.summary());
        }
        still_tenant_one(&mut a, &mut c, mode).await;
        let r = tokio::time::timeout(Duration::from_secs(5), other.simple("select 1")).await.map_err(|_| "timed out".to_string())?;
        c.check(&format!("{mode}: the other tenant at the end"), r.ok(), r.summary());
        a.close().await;
        other.close().await;
        if session {
            survivor.close().await;
            return finish(env, p, c, &before, "dangling_unnamed_portal").await;
        }
        p.stop().await;
    }
    c.done()
}
