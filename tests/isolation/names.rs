//! The hand-over invariant for `application_name`, which is the one session setting a pooled
//! connection does not start pristine with: each logs in with the name of the client it was opened
//! for, and a transaction sets the client's name only where the connection's differs
//! (docs/protocol.md, "Client parameters").
//!
//! One backend (`pool_size = 1`) is opened by a client named `opener`. Then, for every attack by a
//! tenant-1 client A on the name (session and local SETs, RESET, a bound `set_config` in a named
//! and in the unnamed statement, FunctionCall, an error mid-batch) × every name A has (none, the
//! backend's, another) × every name the next client B has × every shape of B's first batch right
//! after the hand-over (simple, extended, an error first in the same write, FunctionCall), B's
//! first batch must see:
//! - its own name (`pgtenant` when it has none), in `current_setting` and in `pg_settings`;
//! - exactly its own tenant, and the same session-level settings as on an untouched backend;
//! - no ParameterStatus: the client changed nothing.
//!
//! Then A, taking its turn again on the same backend, must see the name it chose (what the
//! server would show it), and, in transaction pooling, the opener its own once more.

use std::time::Duration;

use crate::adversarial::{oid, try_start, Checks};
use crate::common::*;
use crate::wire::{self, Reply, Wire};

/// What a probe reads (pgtenant refuses `pg_stat_activity`): the name twice, the tenant, foreign and own rows, session-level settings
/// other than the name.
const PROBE: &str = "select current_setting('application_name'), \
    (select setting from pg_settings where name = 'application_name'), \
    coalesce(current_setting('app.tenant_id', true), '<unset>'), \
    (select count(*) from orders where tenant_id <> 2)::text, \
    (select count(*) from orders)::text, \
    (select coalesce(string_agg(name || '=' || setting, ', ' order by name), '') from pg_settings \
       where source = 'session' and name <> 'application_name')";

/// The name a client without one runs with through pgtenant.
const NAMELESS: &str = "pgtenant";

/// An attack by A on the name, before it hands the backend over.
#[derive(Clone, Copy)]
enum Attack {
    /// A plain query.
    Nothing,
    /// One simple Query; Some(name): A's session name afterwards.
    Simple(&'static str, Option<&'static str>),
    /// Parse/Bind/Execute/Sync of `set_config($1, 'evil', $2)`, named or unnamed statement.
    Bound { named: bool, local: bool },
    /// FunctionCall of set_config('application_name', 'evil', false).
    Call,
    /// An extended `select 1/0`, Sync, then a simple SET, in one write.
    ErrorThenSet,
    /// BEGIN; SET application_name; an error; ROLLBACK.
    SetThenRollback,
}

const ATTACKS: &[(&str, Attack)] = &[
    ("nothing", Attack::Nothing),
    ("set", Attack::Simple("SET application_name = 'evil'", Some("evil"))),
    ("set_session_quoted", Attack::Simple("SET SESSION \"application_name\" TO 'evil'", Some("evil"))),
    ("set_local_in_block", Attack::Simple("BEGIN; SET LOCAL application_name = 'evil'; COMMIT", None)),
    ("reset", Attack::Simple("RESET application_name", Some(""))),
    ("set_default", Attack::Simple("SET application_name TO DEFAULT", Some(""))),
    ("reset_all", Attack::Simple("RESET ALL", Some(""))),
    ("set_then_reset", Attack::Simple("SET application_name = 'evil'; RESET application_name", Some(""))),
    ("bound_named", Attack::Bound { named: true, local: false }),
    ("bound_unnamed", Attack::Bound { named: false, local: false }),
    ("bound_local", Attack::Bound { named: true, local: true }),
    ("function_call", Attack::Call),
    ("error_then_set", Attack::ErrorThenSet),
    ("set_then_rollback", Attack::SetThenRollback),
];

/// The shape of B's first batch after the hand-over.
#[derive(Clone, Copy, Debug, PartialEq)]
enum First {
    Simple,
    Extended,
    /// An extended `select 1/0` and Sync, then the probe, in one write.
    AfterError,
    /// FunctionCall of current_setting('application_name'), then the probe.
    Call,
}

const FIRSTS: &[First] = &[First::Simple, First::Extended, First::AfterError, First::Call];

/// The names A and B log in with (None: no `application_name` in the startup packet).
const NAMES: &[Option<&str>] = &[None, Some("opener"), Some("alpha")];
const B_NAMES: &[Option<&str>] = &[None, Some("opener"), Some("beta")];

async fn login(addr: std::net::SocketAddr, name: Option<&str>, tenant: i64, sub: &str) -> Result<Wire, String> {
    let mut params = vec![("user", "alice"), ("database", "app")];
    if let Some(n) = name {
        params.push(("application_name", n));
    }
    Wire::login(addr, &params, &token(tenant, sub)).await
}

/// Runs the attack; the name A should see afterwards, if the attack ran (None: refused).
async fn attack(a: &mut Wire, what: Attack, set_config: u32) -> (Reply, Option<Option<&'static str>>) {
    let ran = |r: Reply, name: Option<&'static str>| {
        let ok = r.errors.is_empty();
        (r, ok.then_some(name))
    };
    match what {
        Attack::Nothing => ran(a.simple("select 1").await, None),
        Attack::Simple(sql, name) => ran(a.simple(sql).await, name),
        Attack::Bound { named, local } => {
            let stmt = if named { "s_evil" } else { "" };
            let batch = [
                wire::parse(stmt, "select set_config($1, 'evil', $2::boolean)", &[]),
                wire::bind("", stmt, &[Some("application_name"), Some(if local { "true" } else { "false" })]),
                wire::execute("", 0),
                wire::sync(),
            ]
            .concat();
            ran(a.round(&batch, 1).await, if local { None } else { Some("evil") })
        }
        Attack::Call => ran(a.call(set_config, &["application_name", "evil", "false"]).await, Some("evil")),
        Attack::ErrorThenSet => {
            let batch = [wire::unnamed("select 1/0"), wire::sync(), wire::query("SET application_name = 'evil'")].concat();
            let r = a.round(&batch, 2).await;
            // the division fails, the SET after the Sync runs
            let ok = r.errors.len() == 1 && r.errors[0].code == "22012" && r.readies.len() == 2;
            (r, ok.then_some(Some("evil")))
        }
        Attack::SetThenRollback => {
            let r = a.simple("BEGIN; SET application_name = 'evil'; select 1/0").await;
            let r2 = a.simple("ROLLBACK").await;
            let ok = r.code() == Some("22012") && r2.ok();
            (r, ok.then_some(None))
        }
    }
}

/// B's first batch right after the hand-over; the probe's reply, and what else B was sent.
async fn first_batch(b: &mut Wire, first: First, current_setting: u32) -> Result<Reply, String> {
    let (r, extra) = match first {
        First::Simple => (b.simple(PROBE).await, None),
        First::Extended => (b.ext(PROBE).await, None),
        First::AfterError => {
            let r = b.round(&[wire::unnamed("select 1/0"), wire::sync(), wire::extended(PROBE)].concat(), 2).await;
            let failed = r.errors.len() == 1 && r.errors[0].code == "22012";
            (r, Some(if failed { String::new() } else { "the error before the probe did not come first".into() }))
        }
        First::Call => {
            let c = b.call(current_setting, &["application_name"]).await;
            let name = c.results.first().cloned().flatten().map(|v| String::from_utf8_lossy(&v).into_owned());
            let mut r = b.simple(PROBE).await;
            r.params.splice(0..0, c.params.clone());
            let mine = r.get(0, 0);
            (r, Some(if c.ok() && name.as_deref() == Some(mine.as_str()) { String::new() } else { format!("FunctionCall saw {name:?} ({})", c.summary()) }))
        }
    };
    match extra {
        Some(problem) if !problem.is_empty() => Err(problem),
        _ => Ok(r),
    }
}

/// A probe row as one comparable line.
fn row(r: &Reply) -> Vec<String> {
    (0..6).map(|i| r.get(r.rows.len().saturating_sub(1), i)).collect()
}

/// What is wrong with B's probe, if anything.
fn judge(r: &Reply, want_name: &str, pristine_settings: &str) -> Vec<String> {
    let mut wrong = Vec::new();
    if r.rows.is_empty() || r.readies.is_empty() {
        return vec![format!("no probe row: {}", r.summary())];
    }
    let v = row(r);
    if v[0] != want_name || v[1] != want_name {
        wrong.push(format!("runs as {:?} / pg_settings {:?}, want {want_name:?}", v[0], v[1]));
    }
    if v[2] != "2" || v[3] != "0" || v[4] == "0" {
        wrong.push(format!("context {:?}, foreign rows {}, rows {}", v[2], v[3], v[4]));
    }
    if v[5] != pristine_settings {
        wrong.push(format!("session settings {:?} (untouched backend {pristine_settings:?})", v[5]));
    }
    if !r.params.is_empty() {
        wrong.push(format!("ParameterStatus sent: {:?}", r.params));
    }
    wrong
}

async fn run(env: &Env, session: bool) -> TestResult {
    let mode = if session { "session" } else { "transaction" };
    let set_config = oid(env, "set_config(text,text,boolean)")?;
    let current_setting = oid(env, "current_setting(text)")?;
    let extra = format!(
        "allowed_function_calls = [\"set_config\", \"current_setting\"]\n{}",
        if session { "[pool]\nmode = \"session\"" } else { "" }
    );
    let p = try_start(env, "pool_size = 1", &extra, "").await?;
    let mut c = Checks::new(if session { "names/session" } else { "names/transaction" });
    let result = async {
        // the backend, opened for `opener`; and what an untouched backend shows a tenant-2 client
        let mut opener = login(p.addr, Some("opener"), 3, "opener").await?;
        let r = opener.simple("select pg_backend_pid()").await;
        let pid = r.get(0, 0);
        let mut opener = if session {
            opener.close().await;
            None
        } else {
            Some(opener)
        };
        let mut b = login(p.addr, Some("opener"), 2, "reference").await?;
        let reference = b.simple(PROBE).await;
        b.close().await;
        let want = judge(&reference, "opener", &row(&reference)[5]);
        c.check(&format!("{mode}: reference probe on the opener's backend"), want.is_empty(), want.join("; "));
        let pristine_settings = row(&reference)[5].clone();
        println!("  [names/{mode}] untouched backend, session-level settings of a tenant-2 transaction: {pristine_settings:?}");

        for (label, what) in ATTACKS {
            for a_name in NAMES {
                for b_name in B_NAMES {
                    for &first in FIRSTS {
                        let case = format!("{mode} / A {a_name:?} {label} / B {b_name:?} {first:?}");
                        let mut a = login(p.addr, *a_name, 1, "attacker").await?;
                        let (r, after) = attack(&mut a, *what, set_config).await;
                        // what A should see from now on: its login name, or what it set
                        let a_default = a_name.unwrap_or(NAMELESS);
                        let a_want = match after {
                            Some(Some("")) => a_default.to_string(),
                            Some(Some(n)) => n.to_string(),
                            _ => a_default.to_string(),
                        };
                        let mut a = if session {
                            // session pooling: B gets the backend when A leaves
                            let mine = a.simple("select current_setting('application_name')").await;
                            c.check(&format!("{case}: A sees its own name"), mine.get(0, 0) == a_want, format!("{} (attack: {})", mine.summary(), r.summary()));
                            a.close().await;
                            None
                        } else {
                            Some(a)
                        };
                        let mut b = login(p.addr, *b_name, 2, "next").await?;
                        let got = tokio::time::timeout(Duration::from_secs(10), first_batch(&mut b, first, current_setting))
                            .await
                            .map_err(|_| "no answer within 10 s".to_string())
                            .and_then(|r| r);
                        let b_want = b_name.unwrap_or(NAMELESS);
                        let wrong = match &got {
                            Ok(r) => judge(r, b_want, &pristine_settings),
                            Err(e) => vec![e.clone()],
                        };
                        let ran = if after.is_some() { "ran" } else { "refused" };
                        c.check(&format!("{case}: B's first batch ({ran})"), wrong.is_empty(), wrong.join("; "));
                        b.close().await;
                        if let Some(mut a) = a.take() {
                            // A's turn again on the same backend: the name it chose, and no report of
                            // pgtenant's own changes
                            let mine = a.simple("select current_setting('application_name'), pg_backend_pid()").await;
                            let ok = mine.get(0, 0) == a_want && mine.get(0, 1) == pid && mine.params.is_empty();
                            c.check(&format!("{case}: A's next turn"), ok, format!("want {a_want:?}: {} {:?} (attack: {})", mine.summary(), mine.params, r.summary()));
                            a.close().await;
                        }
                    }
                }
            }
        }
        if let Some(mut opener) = opener.take() {
            let r = opener.simple("select current_setting('application_name'), pg_backend_pid()").await;
            c.check("the opener sees its own name on its backend", r.get(0, 0) == "opener" && r.get(0, 1) == pid && r.params.is_empty(), r.summary());
            opener.close().await;
        }
        Ok::<_, String>(())
    }
    .await;
    p.stop().await;
    result?;
    c.done()
}

pub async fn transaction_mode(env: &Env) -> TestResult {
    run(env, false).await
}

pub async fn session_mode(env: &Env) -> TestResult {
    run(env, true).await
}
