//! Differential test of the protocol: the client must see exactly what Postgres would have sent
//! it. Random sequences of frontend messages (Parse, Bind, Describe, Execute, Close, Sync, Flush,
//! simple Query and FunctionCall, named and unnamed, with statements that fail at Parse, at Bind or
//! at Execute, open and end transaction blocks, set session settings, deallocate and discard, copy
//! out and copy in) go, byte for byte, to a connection straight to the server as the restricted
//! role and to a client of pgtenant; the two reply streams must be the same message for message
//! (SQLSTATEs, command tags, rows, COPY data, function results, transaction status),
//! ParameterStatus aside (pgtenant reports only what changed for the client, see
//! docs/protocol.md). State carries over from round to round: prepared statements, settings,
//! and in transaction pooling a second client takes the backend between rounds, so every round
//! after a hand-over runs on a reset backend that must look like the client's own session.
//!
//! The statements avoid what pgtenant refuses or changes by design (the tenant settings, SQL
//! `PREPARE`, `RESET ALL`, docs/protocol.md "Remaining differences"). FunctionCalls go to
//! functions the test's proxy allows (`ALLOWED_CALLS`), with good and bad arguments, and to one it
//! refuses by design, where only that the refusal keeps the stream in step is compared
//! (`same_reply`). `COPY … FROM STDIN` writes to a table of its own (`COPY_TABLE`), with CopyData,
//! CopyDone, CopyFail, Sync and Flush during the COPY (`copy_in`).
//!
//! A seed makes a run repeatable: `PGTENANT_DIFF_SEED`, `PGTENANT_DIFF_ROUNDS` (default 400 per
//! pool mode); `PGTENANT_DIFF_HOSTILE=1` adds what is known to differ still; `PGTENANT_DIFF_MINIMIZE=1`
//! shrinks a failing run to the rounds and messages that still differ; `PGTENANT_DIFF_REPLAY=<file>`
//! replays rounds written as the minimizer prints them (one a line) and prints both reply streams.

use std::net::SocketAddr;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::adversarial::{try_start, Checks};
use crate::common::*;
use crate::wire::{self, Wire};

/// Statements for Parse and Query, with their number of parameters.
const SQL: &[(&str, usize)] = &[
    ("select 1", 0),
    ("select $1::int + 1", 1),
    ("select n from generate_series(1, 3) n", 0),
    ("selec", 0),
    ("select 1/0", 0),
    ("BEGIN", 0),
    ("COMMIT", 0),
    ("ROLLBACK", 0),
    ("SET work_mem = '8MB'", 0),
    ("SET work_mem = '16MB'", 0),
    ("RESET work_mem", 0),
    ("show work_mem", 0),
    ("DEALLOCATE s1", 0),
    ("DEALLOCATE ALL", 0),
    ("DISCARD ALL", 0),
    ("SAVEPOINT a", 0),
    ("ROLLBACK TO SAVEPOINT a", 0),
    ("", 0),
    ("COPY (select n from generate_series(1, 3) n) TO STDOUT", 0),
    ("COPY (select current_setting('work_mem')) TO STDOUT", 0),
    ("COPY (select 1/0) TO STDOUT", 0),
    // refused by the server before COPY mode: row-level security (0A000), unknown table (42P01)
    ("COPY orders FROM STDIN", 0),
    ("COPY nosuch FROM STDIN", 0),
];

/// Simple query strings of more than one statement.
const MULTI: &[&str] = &["select 1; select 2", "select 1; select 1/0; select 3", "SET work_mem = '4MB'; show work_mem"];

const STATEMENTS: &[&str] = &["", "s1", "s2", "nosuch"];
const PORTALS: &[&str] = &["", "p1", "nosuch"];

/// The table `COPY … FROM STDIN` writes to: without row-level security (the server refuses COPY
/// FROM into a table with it, 0A000), made by the superuser at the start, written to by both
/// connections alike and never read back (what one side wrote would show on the other side).
const COPY_TABLE: &str = "CREATE TABLE IF NOT EXISTS diff_copy (n int, t text); GRANT SELECT, INSERT ON diff_copy TO app_user";
/// `COPY … FROM STDIN` statements, each with CopyData payloads it reads without error (whole rows,
/// several rows, nothing).
const COPY_IN: &[(&str, &[&str])] = &[
    ("COPY diff_copy FROM STDIN", &["1\tone\n", "2\ttwo\n3\tthree\n", ""]),
    ("COPY diff_copy (n) FROM STDIN", &["1\n", "2\n3\n", ""]),
    ("COPY diff_copy FROM STDIN (FORMAT csv)", &["1,one\n", "2,two\n3,three\n", ""]),
];
/// CopyData payloads that fail in some of them: bad rows, a row split over two messages ("5\tfi" +
/// "ve\n"; either alone is a bad row), a row without its newline (good only as the last), text
/// rows for csv and the other way round.
const COPY_BAD: &[&str] = &["x\tbad\n", "5\tfi", "ve\n", "4\tfour", "6,six\n", "7\tseven\n"];

/// Functions a FunctionCall may reach (`tenant.allowed_function_calls` of the test's proxy):
/// harmless, their result the same on any connection of the role.
const ALLOWED_CALLS: &str = "allowed_function_calls = [\"int4pl\", \"int4div\", \"pg_catalog.current_setting\"]";

/// Function OIDs for FunctionCall, resolved over the direct connection at the start.
#[derive(Clone, Copy)]
struct Oids {
    int4pl: u32,
    int4div: u32,
    /// current_setting(text)
    setting: u32,
}

/// A function OID no function has: the server answers 42883, pgtenant refuses it (42501) before
/// asking the server, by design. Only that the refusal keeps the stream in step is compared
/// (`equivalent`).
const NO_FUNCTION: u32 = 1;

fn pick<'a, T>(rng: &mut impl Rng, from: &'a [T]) -> &'a T {
    &from[rng.random_range(0..from.len())]
}

/// What the messages generated so far in a round leave behind, for the choice of the next ones.
struct Gen {
    /// No extended-protocol message since the last Sync (a simple Query is not one).
    synced: bool,
    /// The unnamed statement or portal may be a `COPY … FROM STDIN` of a COPY sequence: outside
    /// `PGTENANT_DIFF_HOSTILE` no random Bind of it or Execute of the unnamed portal follows in the
    /// round (it would start a COPY that random messages then interrupt). The round's end (a Query)
    /// drops both.
    unnamed_copy: bool,
    /// COPY statements named so far (`cs1`, `cs2` …), over the whole run.
    copies: usize,
    hostile: bool,
    /// A simple Query went in this round: no Execute or Describe of the unnamed portal follows, in
    /// any mix. A Query that fails while it runs inside a block leaves its portal behind under
    /// that name; an Execute of it crashes PostgreSQL 15 (the direct connection would take the
    /// test's server down), and pgtenant closes it by design (tests/isolation/dangling.rs).
    query_sent: bool,
}

/// The FunctionCalls of the mix, by how they read: allowed functions with good and bad arguments
/// (wrong count, unreadable text, bad binary, NULL, bad format codes, errors in the function), and
/// a function pgtenant refuses.
const CALLS: &[&str] = &[
    "int4pl('1', '2')",
    "int4pl('40', '2') binary result",
    "int4pl(7, 5) binary args",
    "int4pl('1') one argument",
    "int4pl('x', '1')",
    "int4pl(NULL, '1')",
    "int4pl overflow",
    "int4pl 3-byte binary arg",
    "int4pl 3 format codes for 2 args",
    "int4pl format code 2",
    "int4div('1', '0')",
    "current_setting('work_mem')",
    "current_setting('nosuch.setting')",
    "OID 1 (refused)",
];

/// The FunctionCall `CALLS` names `what`.
fn call_bytes(what: &str, o: &Oids) -> Option<Vec<u8>> {
    let text = |oid, args: &[Option<&str>], result: i16| {
        let a: Vec<Option<&[u8]>> = args.iter().map(|a| a.map(str::as_bytes)).collect();
        wire::function_call(oid, &a, 0, result)
    };
    Some(match CALLS.iter().position(|c| *c == what)? {
        0 => text(o.int4pl, &[Some("1"), Some("2")], 0),
        1 => text(o.int4pl, &[Some("40"), Some("2")], 1),
        2 => wire::function_call(o.int4pl, &[Some(&7i32.to_be_bytes()), Some(&5i32.to_be_bytes())], 1, 0),
        3 => text(o.int4pl, &[Some("1")], 0),
        4 => text(o.int4pl, &[Some("x"), Some("1")], 0),
        5 => text(o.int4pl, &[None, Some("1")], 0),
        6 => text(o.int4pl, &[Some("2147483647"), Some("1")], 0),
        7 => wire::function_call(o.int4pl, &[Some(&[0, 0, 1]), Some(&1i32.to_be_bytes())], 1, 0),
        8 => wire::function_call_formats(o.int4pl, &[0, 1, 0], &[Some(b"1"), Some(b"2")], 0),
        9 => wire::function_call_formats(o.int4pl, &[2], &[Some(b"1"), Some(b"2")], 0),
        10 => text(o.int4div, &[Some("1"), Some("0")], 0),
        11 => text(o.setting, &[Some("work_mem")], 0),
        12 => text(o.setting, &[Some("nosuch.setting")], 0),
        _ => text(NO_FUNCTION, &[Some("1")], 0),
    })
}

/// One random FunctionCall and how it reads.
fn function_call(rng: &mut impl Rng, o: &Oids) -> (Vec<u8>, String) {
    let what = *pick(rng, CALLS);
    (call_bytes(what, o).expect("listed"), format!("FunctionCall {what}"))
}

/// One random frontend message and how it reads.
fn message(rng: &mut impl Rng, g: &Gen, oids: &Oids) -> (Vec<u8>, String) {
    loop {
        return match rng.random_range(0..100) {
            0..23 => {
                let name = *pick(rng, &STATEMENTS[..3]);
                let (sql, _) = *pick(rng, SQL);
                (wire::parse(name, sql, &[]), format!("Parse {name:?} {sql:?}"))
            }
            23..41 => {
                let portal = *pick(rng, &PORTALS[..2]);
                let stmt = *pick(rng, STATEMENTS);
                if g.unnamed_copy && !g.hostile && stmt.is_empty() {
                    continue; // see `Gen::unnamed_copy`
                }
                let params: &[Option<&str>] = if rng.random_bool(0.5) { &[Some("41")] } else { &[] };
                (wire::bind(portal, stmt, params), format!("Bind {portal:?} {stmt:?} {} params", params.len()))
            }
            41..58 => {
                let portal = *pick(rng, PORTALS);
                if (g.unnamed_copy && !g.hostile || g.query_sent) && portal.is_empty() {
                    continue;
                }
                let max = *pick(rng, &[0, 0, 1]);
                (wire::execute(portal, max), format!("Execute {portal:?} max {max}"))
            }
            58..64 => {
                let (kind, name) = if rng.random_bool(0.5) { (b'S', *pick(rng, STATEMENTS)) } else { (b'P', *pick(rng, PORTALS)) };
                if g.query_sent && kind == b'P' && name.is_empty() {
                    continue; // see `Gen::query_sent`
                }
                (wire::describe(kind, name), format!("Describe {} {name:?}", kind as char))
            }
            64..70 => {
                let (kind, name) = if rng.random_bool(0.5) { (b'S', *pick(rng, STATEMENTS)) } else { (b'P', *pick(rng, PORTALS)) };
                (wire::close(kind, name), format!("Close {} {name:?}", kind as char))
            }
            70..79 => (wire::sync(), "Sync".into()),
            79..90 => {
                let sql = if rng.random_bool(0.2) {
                    *pick(rng, MULTI)
                } else {
                    pick(rng, SQL).0
                };
                (wire::query(sql), format!("Query {sql:?}"))
            }
            90..95 => function_call(rng, oids),
            _ => (wire::flush(), "Flush".into()),
        };
    }
}

/// A `COPY … FROM STDIN` and what the client sends it: by simple Query or by Parse/Bind/Execute
/// (named or unnamed), then CopyData, Sync and Flush (which the server ignores in COPY mode),
/// CopyDone or CopyFail, sometimes stray CopyData/CopyDone/CopyFail after it (which the server
/// ignores outside COPY mode) and a Sync.
///
/// Outside `PGTENANT_DIFF_HOSTILE` the COPY starts for sure and ends only by the client: it comes
/// after a Sync (or none), behind a Query "ROLLBACK" (no failed block makes it fail before COPY
/// mode), its data has no bad row, it ends with CopyDone or CopyFail, and nothing but COPY
/// messages, Sync and Flush goes in between. pgtenant still differs otherwise (reliability.md): a
/// COPY that a bad row ends before the client's CopyDone (a Sync sent during it is then answered
/// by the server, which pgtenant does not expect: it ends the session), and a COPY left open (any
/// other message: the server ends the connection, pgtenant too, with another message). Fixed
/// since the first runs, and in the default mix: COPY messages when the server is not in COPY
/// mode, and an extended message after the CopyDone of an extended COPY during which a Sync went
/// (both hung).
fn copy_in(rng: &mut impl Rng, g: &mut Gen) -> Vec<(Vec<u8>, String)> {
    let mut out: Vec<(Vec<u8>, String)> = Vec::new();
    let (sql, good) = *pick(rng, COPY_IN);
    if !g.hostile {
        out.push((wire::query("ROLLBACK"), "Query \"ROLLBACK\"".into()));
        if rng.random_bool(0.3) {
            out.push((wire::query("BEGIN"), "Query \"BEGIN\"".into()));
        }
    }
    // a COPY by simple Query inside an unsynced extended batch is left out (see `hostile`)
    let extended = rng.random_bool(0.6);
    if !extended {
        out.push((wire::query(sql), format!("Query {sql:?}")));
    } else {
        let (stmt, portal) = if rng.random_bool(0.5) {
            g.unnamed_copy = true;
            (String::new(), String::new())
        } else {
            // names of their own, never used again: nothing else in the mix binds or executes them
            g.copies += 1;
            (format!("cs{}", g.copies), format!("cp{}", g.copies))
        };
        out.push((wire::parse(&stmt, sql, &[]), format!("Parse {stmt:?} {sql:?}")));
        out.push((wire::bind(&portal, &stmt, &[]), format!("Bind {portal:?} {stmt:?} 0 params")));
        if rng.random_bool(0.3) {
            out.push((wire::describe(b'P', &portal), format!("Describe P {portal:?}")));
        }
        let max = *pick(rng, &[0, 0, 1]);
        out.push((wire::execute(&portal, max), format!("Execute {portal:?} max {max}")));
    }
    for _ in 0..rng.random_range(0..=4) {
        out.push(match rng.random_range(0..10) {
            0..7 => {
                let d = if g.hostile && rng.random_bool(0.3) { *pick(rng, COPY_BAD) } else { *pick(rng, good) };
                (wire::copy_data(d.as_bytes()), format!("CopyData {d:?}"))
            }
            7 if extended || rng.random_bool(0.3) => (wire::sync(), "Sync".into()),
            _ => (wire::flush(), "Flush".into()),
        });
    }
    match rng.random_range(0..10) {
        0..6 => out.push((wire::copy_done(), "CopyDone".into())),
        6..9 => out.push((wire::copy_fail("client gave up"), "CopyFail".into())),
        // the COPY is left open, whatever comes next interrupts it
        _ if g.hostile => return out,
        _ => out.push((wire::copy_done(), "CopyDone".into())),
    }
    if rng.random_bool(0.2) {
        out.push(match rng.random_range(0..3) {
            0 => (wire::copy_data(b"8\teight\n"), "CopyData \"8\\teight\\n\" (stray)".into()),
            1 => (wire::copy_done(), "CopyDone (stray)".into()),
            _ => (wire::copy_fail("stray"), "CopyFail (stray)".into()),
        });
    }
    if extended {
        // a Sync during the COPY is followed by one at its end (see above)
        let synced_inside = out.iter().skip_while(|(_, s)| !s.starts_with("Execute")).any(|(_, s)| s == "Sync");
        // a Sync during it and none after its end, then a failed block: a Describe of the unnamed
        // COPY statement gets 25P02 (reliability.md, "Describe of a statement that returns no rows")
        g.synced = rng.random_bool(0.5) || (synced_inside && !g.hostile);
        if g.synced {
            out.push((wire::sync(), "Sync".into()));
        }
    }
    out
}

/// What the end of a round sends: a Sync (the server stops skipping), a Describe of each named
/// statement (which of them exist, and as what), a ROLLBACK (no transaction block is left open,
/// aborted or not), and a marker query whose row ends the reading.
fn end_of_round() -> Vec<u8> {
    [
        wire::sync(),
        wire::describe(b'S', "s1"),
        wire::sync(),
        wire::describe(b'S', "s2"),
        wire::sync(),
        wire::query("ROLLBACK"),
        wire::query("select 'end of round'"),
    ]
    .concat()
}

/// Sends `bytes` and reads every reply up to the marker's ReadyForQuery, each message as one
/// comparable line (ParameterStatus left out).
async fn exchange(w: &mut Wire, bytes: &[u8], wait: Duration) -> Vec<String> {
    let mut out = Vec::new();
    if let Err(e) = w.send(bytes).await {
        out.push(format!("<send failed: {e}>"));
        return out;
    }
    let mut marker_seen = false;
    loop {
        match w.read_msg(wait).await {
            Err(e) => {
                out.push(format!("<{e}>"));
                return out;
            }
            Ok(None) => {
                out.push("<closed>".into());
                return out;
            }
            Ok(Some((tag, body))) => {
                let line = match tag {
                    b'S' => continue,
                    b'E' | b'N' => {
                        let e = wire::parse_error(&body);
                        format!("{} {} {}", tag as char, e.code, e.message)
                    }
                    b'D' => {
                        let row = String::from_utf8_lossy(&body).into_owned();
                        marker_seen |= row.contains("end of round");
                        format!("D {row:?}")
                    }
                    b'Z' => {
                        let line = format!("Z {}", body.first().map_or('?', |&b| b as char));
                        if marker_seen {
                            out.push(line);
                            return out;
                        }
                        line
                    }
                    _ => format!("{} {:?}", tag as char, String::from_utf8_lossy(&body)),
                };
                out.push(line);
            }
        }
    }
}

/// The error pgtenant answers a FunctionCall of [`NO_FUNCTION`] with (by design: it is not in
/// `tenant.allowed_function_calls`).
fn refused_call(line: &str) -> bool {
    line.starts_with(&format!("E 42501 pgtenant: FunctionCall messages are not allowed for function OID {NO_FUNCTION}:"))
}

/// One reply line of the server's (`want`) and pgtenant's (`got`) are the same; pgtenant's refusal
/// of a FunctionCall it must refuse stands for the server's error about that call (42883, or 25P02
/// in a failed transaction block): both end the call, abort the block, and the stream goes on in
/// step.
///
/// Outside `PGTENANT_DIFF_HOSTILE` also a difference reliability.md lists as still open: in a failed
/// transaction block pgtenant answers 25P02 to some messages the server rejects with an error it
/// checks first ([`CHECKED_FIRST`]: 08P01 wrong number of Bind parameters, 42601 syntax error in a
/// Parse, 34000 no such portal at Execute …), because a message of its own goes in front and fails (its Parse of a
/// statement the backend must prepare again; its context statement, sent speculatively behind an
/// unanswered batch that may have ended the block). Either way the message fails and the server
/// skips to Sync. `PGTENANT_DIFF_STRICT` turns this off (and regression replays never allow it).
fn same_reply(want: &str, got: &str, hostile: bool) -> bool {
    const ABORTED: &str = "E 25P02 current transaction is aborted, commands ignored until end of transaction block";
    const NO_UNNAMED_PORTAL: &str = "E 34000 portal \"\" does not exist";
    want == got
        // by design: pgtenant closes the portal a simple Query that failed in a block leaves behind
        // (an Execute of it crashes PostgreSQL 15: tests/isolation/dangling.rs), so an Execute of
        // the unnamed portal the client did not bind is told there is none; the server, finding the
        // failed Query's portal, says 25P02. Both skip to Sync.
        || (got == NO_UNNAMED_PORTAL && want == ABORTED)
        || (refused_call(got) && (want == format!("E 42883 function with OID {NO_FUNCTION} does not exist") || want == ABORTED))
        || (!hostile && got == ABORTED && CHECKED_FIRST.iter().any(|code| want.starts_with(&format!("E {code} "))))
}

/// The errors the server reports about a message before it refuses it in a failed transaction
/// block (`same_reply`): a syntax error at Parse, a Bind's counts or missing statement, a missing
/// portal at Execute, a duplicate statement name.
const CHECKED_FIRST: &[&str] = &["42601", "08P01", "26000", "34000", "42P05", "42P01"];

fn equivalent(want: &[String], got: &[String]) -> bool {
    let strict = std::env::var_os("PGTENANT_DIFF_HOSTILE").is_some() || std::env::var_os("PGTENANT_DIFF_STRICT").is_some();
    equivalent_as(want, got, strict)
}

/// `equivalent`, strictly or not (`same_reply`): replays of tests/isolation/regressions/ compare
/// strictly.
fn equivalent_as(want: &[String], got: &[String], hostile: bool) -> bool {
    want.len() == got.len() && want.iter().zip(got).all(|(w, g)| same_reply(w, g, hostile))
}

async fn differential(env: &Env, session_mode: bool) -> TestResult {
    differential_of(env, session_mode, std::env::var("PGTENANT_DIFF_REPLAY").ok()).await
}

/// The differential run, or (`replaying` a file of rounds as the minimizer prints them) a replay.
async fn differential_of(env: &Env, session_mode: bool, replaying: Option<String>) -> TestResult {
    let label = if session_mode { "differential/session" } else { "differential/transaction" };
    let mut c = Checks::new(label);
    let seed: u64 = std::env::var("PGTENANT_DIFF_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(20261203);
    let rounds: usize = std::env::var("PGTENANT_DIFF_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(400);
    // Left out unless PGTENANT_DIFF_HOSTILE is set, because pgtenant still differs there
    // (docs/protocol.md, "Remaining differences"; docs/reliability.md): the COPY cases `copy_in`
    // lists (a COPY's own Query inside an unsynced batch among them). Also only without it, 25P02 from pgtenant in a failed
    // block counts as the server's other error there (`same_reply`).
    let hostile = std::env::var_os("PGTENANT_DIFF_HOSTILE").is_some();
    let (pool, extra) = if session_mode { ("pool_size = 2", "[pool]\nmode = \"session\"") } else { ("pool_size = 1", "") };
    env.cluster.psql("app", COPY_TABLE).map_err(|e| format!("creating the COPY table: {e}"))?;
    let config = (pool, format!("{ALLOWED_CALLS}\n{extra}"));
    let p = try_start(env, config.0, &config.1, "").await?;
    let server: SocketAddr = format!("127.0.0.1:{}", env.cluster.port()).parse().map_err(|e| format!("{e}"))?;
    let mut direct = Wire::login(server, &[("user", "app_user"), ("database", "app")], "app-secret").await?;
    let r = direct
        .simple(
            "select 'pg_catalog.int4pl(int4,int4)'::regprocedure::oid, 'pg_catalog.int4div(int4,int4)'::regprocedure::oid, \
             'pg_catalog.current_setting(text)'::regprocedure::oid",
        )
        .await;
    let oid = |col| r.get(0, col).parse::<u32>().map_err(|_| format!("function OIDs: {}", r.summary()));
    let oids = Oids { int4pl: oid(0)?, int4div: oid(1)?, setting: oid(2)? };
    if let Some(file) = replaying {
        direct.close().await;
        p.stop().await;
        replay(env, &config, session_mode, &file, &oids, &mut c).await?;
        return c.done();
    }
    let mut proxied = Wire::connect(p.addr, &token(1, "alice")).await?;
    // in transaction pooling a second client takes the one backend between rounds
    let mut other = if session_mode { None } else { Some(Wire::connect(p.addr, &token(2, "bob")).await?) };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ session_mode as u64);
    let mut history: Vec<String> = Vec::new();
    let mut rounds_sent: Vec<Round> = Vec::new();
    let mut same = 0;
    let mut copies = 0;
    for round in 0..rounds {
        let n = rng.random_range(1..=8);
        let mut msgs: Round = Vec::new();
        let mut g = Gen { synced: true, unnamed_copy: false, copies, hostile, query_sent: false };
        let mut items = 0;
        while items < n {
            if rng.random_range(0..100) < 6 && (g.synced || hostile) {
                // a COPY FROM STDIN and its data, as one item (see `copy_in`)
                let copy = copy_in(&mut rng, &mut g);
                g.query_sent |= copy.iter().any(|(_, s)| s.starts_with("Query"));
                msgs.extend(copy);
                items += 1;
                continue;
            }
            let (b, s) = message(&mut rng, &g, &oids);
            g.query_sent |= s.starts_with("Query");
            g.synced = s == "Sync" || (g.synced && (s.starts_with("Query") || s.starts_with("FunctionCall")));
            msgs.push((b, s));
            items += 1;
        }
        copies = g.copies;
        let said = describe(&msgs);
        let want = exchange(&mut direct, &round_bytes(&msgs), Duration::from_secs(5)).await;
        let got = exchange(&mut proxied, &round_bytes(&msgs), Duration::from_secs(5)).await;
        history.push(format!("round {round}: {said}"));
        rounds_sent.push(msgs);
        if !equivalent(&want, &got) {
            if std::env::var_os("PGTENANT_DIFF_MINIMIZE").is_some() {
                let least = minimize(env, &config, session_mode, rounds_sent.clone()).await;
                println!("  [{label}] the least rounds that still differ:");
                for r in &least {
                    println!("    {}", describe(r));
                }
            }
            let first = want.iter().zip(&got).position(|(a, b)| !same_reply(a, b, hostile)).unwrap_or(want.len().min(got.len()));
            c.check(
                &format!("round {round} (seed {seed}): pgtenant's replies are the server's"),
                false,
                format!(
                    "\n    sent: {}\n    first difference at reply {first}\n    server:   {want:?}\n    pgtenant: {got:?}\n    the rounds before:\n      {}",
                    said,
                    history.iter().rev().skip(1).take(6).cloned().collect::<Vec<_>>().join("\n      ")
                ),
            );
            break; // what follows differs because of it
        }
        same += 1;
        if let Some(o) = other.as_mut() {
            let r = o.simple("select current_setting('work_mem'), current_setting('app.tenant_id')").await;
            if !(r.ok() && r.get(0, 1) == "2" && r.get(0, 0) == "4MB") {
                c.check(&format!("round {round}: the other client finds a pristine backend"), false, r.summary());
                break;
            }
        }
    }
    let sent = |kind: &str| rounds_sent.iter().flatten().filter(|(_, s)| s.starts_with(kind)).count();
    println!(
        "  [{label}] sent {} messages: {} FunctionCall, {} COPY … FROM STDIN, {} CopyData, {} CopyDone, {} CopyFail",
        rounds_sent.iter().map(Vec::len).sum::<usize>(),
        sent("FunctionCall"),
        rounds_sent.iter().flatten().filter(|(_, s)| s.contains("diff_copy") && (s.starts_with("Query") || s.starts_with("Parse"))).count(),
        sent("CopyData"),
        sent("CopyDone"),
        sent("CopyFail"),
    );
    c.check(&format!("{same} of {rounds} rounds the same, messages in the server's order"), same == rounds, String::new());
    close_all(direct, proxied, other, p).await;
    c.done()
}

pub async fn transaction_mode(env: &Env) -> TestResult {
    differential(env, false).await
}

pub async fn session_mode(env: &Env) -> TestResult {
    differential(env, true).await
}

/// What the random runs found once, replayed in both pool modes: each file in
/// tests/isolation/regressions/ holds the rounds of one finding, as the minimizer printed them
/// (each hung or desynchronized the session before its fix).
pub async fn regressions(env: &Env) -> TestResult {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/isolation/regressions");
    let mut files: Vec<_> = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    let mut failed = Vec::new();
    for file in &files {
        for session_mode in [false, true] {
            let path = file.to_string_lossy().into_owned();
            if let Err(e) = differential_of(env, session_mode, Some(path)).await {
                failed.push(format!("{} (session mode {session_mode}): {e}", file.display()));
            }
        }
    }
    if files.is_empty() {
        return Err("no regression files".into());
    }
    if failed.is_empty() { Ok(()) } else { Err(failed.join("\n")) }
}


/// Ends a run's connections and its proxy.
async fn close_all(direct: Wire, proxied: Wire, other: Option<Wire>, p: pgtenant::server::Running) {
    direct.close().await;
    proxied.close().await;
    if let Some(o) = other {
        o.close().await;
    }
    p.stop().await;
}

/// One round's messages, each with how it reads.
type Round = Vec<(Vec<u8>, String)>;

fn describe(round: &Round) -> String {
    if round.is_empty() {
        return "(no message: only the end of the round)".into();
    }
    round.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>().join(", ")
}

/// What a round sends: its messages, then `end_of_round`.
fn round_bytes(round: &Round) -> Vec<u8> {
    let mut bytes: Vec<u8> = round.iter().flat_map(|(b, _)| b.iter().copied()).collect();
    bytes.extend_from_slice(&end_of_round());
    bytes
}

/// Replays `rounds` on fresh connections; true when the replies differ somewhere.
async fn differs(env: &Env, config: &(&str, String), session_mode: bool, rounds: &[Round]) -> bool {
    let server: SocketAddr = format!("127.0.0.1:{}", env.cluster.port()).parse().unwrap();
    // a proxy of its own: a replay that hung must not hold the backend of the next one
    let Ok(p) = try_start(env, config.0, &config.1, "").await else {
        return false;
    };
    let (Ok(mut direct), Ok(mut proxied)) = (
        Wire::login(server, &[("user", "app_user"), ("database", "app")], "app-secret").await,
        Wire::connect(p.addr, &token(1, "alice")).await,
    ) else {
        return false;
    };
    let mut other = if session_mode { None } else { Wire::connect(p.addr, &token(2, "bob")).await.ok() };
    let mut found = false;
    // a hang is a difference too: the replay waits less for it than the run
    let wait = Duration::from_secs(1);
    for round in rounds {
        let bytes = round_bytes(round);
        let (want, got) = (exchange(&mut direct, &bytes, wait).await, exchange(&mut proxied, &bytes, wait).await);
        if !equivalent(&want, &got) {
            if std::env::var_os("PGTENANT_DIFF_VERBOSE").is_some() {
                println!("    replay of {} rounds differs at {}:\n      server:   {want:?}\n      pgtenant: {got:?}", rounds.len(), describe(round));
            }
            found = true;
            break;
        }
        if let Some(o) = other.as_mut() {
            o.simple("select 1").await;
        }
    }
    close_all(direct, proxied, other, p).await;
    found
}

/// Drops every round it can while the replay still differs (for `PGTENANT_DIFF_MINIMIZE`), then
/// every message of the rounds left.
async fn minimize(env: &Env, p: &(&str, String), session_mode: bool, mut rounds: Vec<Round>) -> Vec<Round> {
    // chunks first (halving), then single rounds
    let mut chunk = rounds.len().div_ceil(2).max(1);
    loop {
        let mut i = 0;
        while i < rounds.len() {
            let mut fewer = rounds.clone();
            fewer.drain(i..(i + chunk).min(rounds.len()));
            if differs(env, p, session_mode, &fewer).await {
                rounds = fewer;
            } else {
                i += chunk;
            }
        }
        if chunk == 1 {
            break;
        }
        chunk = chunk.div_ceil(2);
    }
    // then single messages, from the last round back
    for r in (0..rounds.len()).rev() {
        let mut i = 0;
        while i < rounds[r].len() {
            let mut fewer = rounds.clone();
            fewer[r].remove(i);
            if differs(env, p, session_mode, &fewer).await {
                rounds = fewer;
            } else {
                i += 1;
            }
        }
    }
    // rounds left empty still end (and hand the backend over): drop those that do not matter
    let mut i = 0;
    while i < rounds.len() {
        let mut fewer = rounds.clone();
        fewer.remove(i);
        if rounds[i].is_empty() && differs(env, p, session_mode, &fewer).await {
            rounds = fewer;
        } else {
            i += 1;
        }
    }
    rounds
}

// ---- replaying rounds as the minimizer prints them (`PGTENANT_DIFF_REPLAY`) ----------------------

/// Reads a string as `{:?}` writes it, at the start of `s`; returns it and the rest of `s`.
fn unquote(s: &str) -> Option<(String, &str)> {
    let mut chars = s.strip_prefix('"')?.char_indices();
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 2..])),
            '\\' => out.push(match chars.next()?.1 {
                'n' => '\n',
                't' => '\t',
                'r' => '\r',
                '0' => '\0',
                'u' => {
                    let rest: String = chars.by_ref().map(|(_, c)| c).take_while(|&c| c != '}').collect();
                    char::from_u32(u32::from_str_radix(rest.trim_start_matches('{'), 16).ok()?)?
                }
                c => c,
            }),
            c => out.push(c),
        }
    }
    None
}

/// The message a description of the mix (`Parse "s1" "select 1"`, `FunctionCall int4pl('1', '2')`
/// …) stands for.
fn message_from(said: &str, oids: &Oids) -> Result<Vec<u8>, String> {
    let bad = || format!("cannot read message {said:?}");
    let (word, rest) = said.split_once(' ').unwrap_or((said, ""));
    let kind = |rest: &str| match rest.as_bytes().first() {
        Some(b'S') => Ok(b'S'),
        Some(b'P') => Ok(b'P'),
        _ => Err(bad()),
    };
    Ok(match word {
        "Sync" => wire::sync(),
        "Flush" => wire::flush(),
        "CopyDone" => wire::copy_done(),
        "CopyFail" => wire::copy_fail(if rest.contains("stray") { "stray" } else { "client gave up" }),
        "CopyData" => wire::copy_data(unquote(rest).ok_or_else(bad)?.0.as_bytes()),
        "Query" => wire::query(&unquote(rest).ok_or_else(bad)?.0),
        "Parse" => {
            let (name, rest) = unquote(rest).ok_or_else(bad)?;
            wire::parse(&name, &unquote(rest.trim_start()).ok_or_else(bad)?.0, &[])
        }
        "Bind" => {
            let (portal, rest) = unquote(rest).ok_or_else(bad)?;
            let (stmt, rest) = unquote(rest.trim_start()).ok_or_else(bad)?;
            let params: &[Option<&str>] = if rest.trim_start().starts_with('1') { &[Some("41")] } else { &[] };
            wire::bind(&portal, &stmt, params)
        }
        "Execute" => {
            let (portal, rest) = unquote(rest).ok_or_else(bad)?;
            let max = rest.trim().strip_prefix("max ").and_then(|m| m.parse().ok()).ok_or_else(bad)?;
            wire::execute(&portal, max)
        }
        "Describe" => wire::describe(kind(rest)?, &unquote(rest.get(2..).unwrap_or("")).ok_or_else(bad)?.0),
        "Close" => wire::close(kind(rest)?, &unquote(rest.get(2..).unwrap_or("")).ok_or_else(bad)?.0),
        "FunctionCall" => call_bytes(rest, oids).ok_or_else(bad)?,
        _ => return Err(bad()),
    })
}

/// A round as `describe` writes it: messages separated by ", " outside quotes and parentheses.
fn round_from(line: &str, oids: &Oids) -> Result<Round, String> {
    let mut round = Round::new();
    if line.starts_with("(no message") {
        return Ok(round);
    }
    let (mut start, mut depth, mut quoted, mut escaped) = (0, 0i32, false, false);
    let bytes = line.as_bytes();
    for i in 0..=bytes.len() {
        let c = bytes.get(i).copied();
        if quoted {
            match c {
                _ if escaped => escaped = false,
                Some(b'\\') => escaped = true,
                Some(b'"') => quoted = false,
                _ => {}
            }
            continue;
        }
        match c {
            Some(b'"') => quoted = true,
            Some(b'(') => depth += 1,
            Some(b')') => depth -= 1,
            None => round.push((message_from(line[start..].trim(), oids)?, line[start..].trim().to_string())),
            Some(b',') if depth == 0 && bytes.get(i + 1) == Some(&b' ') => {
                let said = line[start..i].trim();
                round.push((message_from(said, oids)?, said.to_string()));
                start = i + 1;
            }
            _ => {}
        }
    }
    Ok(round)
}

/// Replays the rounds in the file `PGTENANT_DIFF_REPLAY` names (one a line, as the minimizer
/// prints them; `#` comments) on fresh connections, printing each round's replies from both.
async fn replay(env: &Env, config: &(&str, String), session_mode: bool, file: &str, oids: &Oids, c: &mut Checks) -> Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    let rounds: Vec<Round> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(|l| round_from(l, oids)).collect::<Result<_, _>>()?;
    let server: SocketAddr = format!("127.0.0.1:{}", env.cluster.port()).parse().map_err(|e| format!("{e}"))?;
    let p = try_start(env, config.0, &config.1, "").await?;
    let mut direct = Wire::login(server, &[("user", "app_user"), ("database", "app")], "app-secret").await?;
    let mut proxied = Wire::connect(p.addr, &token(1, "alice")).await?;
    let mut other = if session_mode { None } else { Some(Wire::connect(p.addr, &token(2, "bob")).await?) };
    for (i, round) in rounds.iter().enumerate() {
        let bytes = round_bytes(round);
        let (want, got) = (exchange(&mut direct, &bytes, Duration::from_secs(2)).await, exchange(&mut proxied, &bytes, Duration::from_secs(2)).await);
        let same = equivalent_as(&want, &got, true);
        println!("  replay round {i}: {}\n    server:   {want:?}\n    pgtenant: {got:?}", describe(round));
        c.check(&format!("replayed round {i}: pgtenant's replies are the server's"), same, String::new());
        if let Some(o) = other.as_mut() {
            o.simple("select 1").await;
        }
    }
    close_all(direct, proxied, other, p).await;
    Ok(())
}
