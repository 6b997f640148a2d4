//! Shared-role interference (docs/security.md, "Shared-role interference"): every pooled backend is
//! logged in as the same role, so whatever Postgres lets a session do to another session of its
//! own role, one tenant could do to another.
//!
//! Tenant 1 (the attacker) against tenant 2 (the victim), through the proxy and — standing for
//! any spelling the statement guard cannot see (dynamic SQL, existing functions) — directly as the
//! restricted role:
//! 1. each attack works today, or pgtenant's guard refuses it;
//! 2. `pgtenant doctor` reports the database privileges that allow it, each with its fix;
//! 3. the fix SQL exactly as the doctor printed it is applied as the superuser;
//! 4. the attacks fail, and the doctor reports none of these findings.
//!
//! The items that stay inherent (NOTIFY payloads in session mode, planner statistics, LOCK at the
//! database level) are shown as documented. The cluster is shared by the binary's scenarios: the
//! privileges are restored (the exact inverse of each fix) when the scenario ends, even on failure.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use pgtenant::doctor::Finding;
use tokio::task::JoinHandle;

use crate::common::*;

/// The doctor checks this scenario covers.
const CHECKS: [&str; 4] = ["signal_functions", "query_text_visible", "advisory_locks", "table_truncate"];

/// The findings the fixture database has (plus `table_truncate`, granted below for the test).
const EXPECTED: [&str; 7] = [
    "advisory_locks:advisory lock functions",
    "query_text_visible:pg_catalog.pg_stat_activity",
    "query_text_visible:pg_catalog.pg_stat_get_activity(integer)",
    "query_text_visible:pg_catalog.pg_stat_get_backend_activity(integer)",
    "signal_functions:pg_catalog.pg_cancel_backend(integer)",
    "signal_functions:pg_catalog.pg_terminate_backend(integer, bigint)",
    "table_truncate:public.orders",
];

const SECRET: &str = "secret-of-tenant-2";
/// Matches the victim's query text but not the attacker's own query.
const SECRET_PATTERN: &str = "'%secret-of-' || 'tenant-2%'";

/// Superuser SQL run when the scenario ends, last first: restores what the scenario changed.
struct Undo<'a> {
    env: &'a Env,
    sql: Vec<String>,
}

impl Undo<'_> {
    fn run(&mut self) -> Result<(), String> {
        let mut errors = Vec::new();
        while let Some(sql) = self.sql.pop() {
            if let Err(e) = self.env.cluster.psql("app", &sql) {
                errors.push(format!("{sql}: {e}"));
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(format!("restoring privileges failed: {}", errors.join("; "))) }
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.run() {
            eprintln!("interference: {e}");
        }
    }
}

/// The inverse of one fix statement: `REVOKE p ON o FROM g;` → `GRANT p ON o TO g;`.
fn inverse(stmt: &str) -> Result<String, String> {
    let rest = stmt.strip_prefix("REVOKE ").ok_or(format!("fix is not a REVOKE: {stmt}"))?;
    let (what, from) = rest.rsplit_once(" FROM ").ok_or(format!("fix without FROM: {stmt}"))?;
    Ok(format!("GRANT {what} TO {from}"))
}

/// Records every check; the scenario fails with the list of failed ones.
struct Checks(Vec<String>, usize);

impl Checks {
    fn check(&mut self, label: &str, ok: bool, detail: impl std::fmt::Display) {
        println!("  [interference] {} {label}", if ok { "ok  " } else { "FAIL" });
        if ok {
            self.1 += 1;
        } else {
            self.0.push(format!("{label}: {detail}"));
        }
    }

    fn done(self) -> TestResult {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} of {} checks failed:\n    {}", self.0.len(), self.0.len() + self.1, self.0.join("\n    ")))
        }
    }
}

/// Who runs the attack: a tenant-1 client of the proxy, or the restricted role directly.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Proxy,
    Direct,
}

/// How an attempt ended (the messages show in failure reports).
#[derive(Debug)]
#[allow(dead_code)]
enum Outcome {
    /// The statement ran.
    Ran(Vec<tokio_postgres::SimpleQueryMessage>),
    /// pgtenant's guard refused it (42501, "pgtenant: …", with a hint).
    Guard(String),
    /// The database refused it for lack of privilege (42501).
    Denied(String),
    Other(String),
}

async fn attempt(c: &tokio_postgres::Client, sql: &str) -> Outcome {
    match c.simple_query(sql).await {
        Ok(rows) => Outcome::Ran(rows),
        Err(e) => match e.as_db_error() {
            Some(d) if d.code().code() == "42501" && d.message().starts_with("pgtenant: ") && d.hint().is_some() => {
                Outcome::Guard(d.message().to_string())
            }
            Some(d) if d.code().code() == "42501" => Outcome::Denied(d.message().to_string()),
            _ => Outcome::Other(format!("{e:?}")),
        },
    }
}

fn rows(o: &Outcome) -> Vec<Vec<Option<String>>> {
    let Outcome::Ran(msgs) = o else { return Vec::new() };
    msgs.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect()),
            _ => None,
        })
        .collect()
}

async fn direct(env: &Env) -> Result<tokio_postgres::Client, String> {
    let (c, conn) = tokio_postgres::connect(&env.cluster.url("app_user", "app-secret", "app"), tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("direct connection as app_user: {e:?}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

/// Tenant 2 runs a 1.5 s query inside a transaction through the proxy; returns its backend pid and
/// the task that finishes the transaction, yielding the query's SQLSTATE ("" if it succeeded).
async fn victim_running(p: &pgtenant::server::Running) -> Result<(i32, JoinHandle<String>), String> {
    let v = connect(p, &token(2, "victim")).await.map_err(|e| format!("victim connects: {e:?}"))?;
    v.batch_execute("BEGIN").await.map_err(|e| format!("{e:?}"))?;
    let pid: i32 = v.query_one("select pg_backend_pid()", &[]).await.map_err(|e| format!("{e:?}"))?.get(0);
    let task = tokio::spawn(async move {
        let r = v.simple_query(&format!("select pg_sleep(1.5), '{SECRET}'")).await;
        let _ = v.simple_query("ROLLBACK").await;
        match r {
            Ok(_) => String::new(),
            Err(e) => e.as_db_error().map(|d| d.code().code().to_string()).unwrap_or_else(|| format!("{e:?}")),
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    Ok((pid, task))
}

async fn doctor(env: &Env, admin: bool) -> Result<Vec<Finding>, String> {
    let cfg = pgtenant::config::Config::from_toml(&config_text(env, "", ""), &|_| None).map_err(|e| e.to_string())?;
    let url = env.cluster.superuser_url("app");
    let all = pgtenant::doctor::run(&cfg, admin.then_some(url.as_str())).await?;
    Ok(all.into_iter().filter(|f| CHECKS.contains(&f.check)).collect())
}

fn names(findings: &[Finding]) -> BTreeSet<String> {
    findings.iter().map(|f| format!("{}:{}", f.check, f.object)).collect()
}

pub async fn shared_role_interference(env: &Env) -> TestResult {
    let mut undo = Undo { env, sql: Vec::new() };
    let result = scenario(env, &mut undo).await;
    let restored = undo.run();
    result?;
    restored?;
    // the cluster is as before for the other scenarios
    let again = names(&doctor(env, true).await?);
    let before: BTreeSet<String> = EXPECTED.iter().filter(|e| !e.starts_with("table_truncate")).map(|s| s.to_string()).collect();
    ensure(again == before, format!("privileges not restored: {again:?}"))
}

async fn scenario(env: &Env, undo: &mut Undo<'_>) -> TestResult {
    let mut c = Checks(Vec::new(), 0);
    env.cluster.psql("app", "ANALYZE orders; GRANT TRUNCATE ON orders TO app_user").map_err(|e| e.to_string())?;
    undo.sql.push("REVOKE TRUNCATE ON orders FROM app_user".into());
    let p = start_proxy(env, "pool_size = 6", "").await;
    let attacker = connect(&p, &token(1, "mallory")).await.map_err(|e| format!("{e:?}"))?;
    let raw = direct(env).await?;
    // Whether this build's guard refuses the interference statements: then every one of them must
    // be refused through the proxy; otherwise every one of them must work (no partial guard).
    let guarded = matches!(attempt(&attacker, "select pg_catalog.pg_cancel_backend(0)").await, Outcome::Guard(_));
    println!("  [interference] statement guard refuses interference: {guarded}");

    // ---- 1. the attacks, before the fix ----------------------------------------------------------
    attacks(env, &p, &attacker, &raw, guarded, false, &mut c).await?;
    inherent(env, &attacker, &mut c).await?;

    // ---- 2. the doctor reports them, with the fix SQL ----------------------------------------------
    let findings = doctor(env, true).await?;
    let found = names(&findings);
    let expected: BTreeSet<String> = EXPECTED.iter().map(|s| s.to_string()).collect();
    c.check("doctor (admin URL) reports every interference privilege", found == expected, format!("{found:?}"));
    let as_role = names(&doctor(env, false).await?);
    c.check("doctor as the restricted role reports the same", as_role == found, format!("{as_role:?}"));
    c.check("every finding carries fix SQL", findings.iter().all(|f| f.fix.is_some()), format!("{findings:?}"));
    let printed = pgtenant::doctor::render(&findings);
    c.check(
        "the report prints each fix",
        findings.iter().flat_map(|f| f.fix.iter().flat_map(|x| x.lines())).all(|l| printed.contains(&format!("fix: {l}"))),
        &printed,
    );
    let json = serde_json::to_value(&findings).map_err(|e| e.to_string())?;
    c.check("--json carries the fix", json[0]["fix"].is_string(), &json);
    println!("{printed}");

    // ---- 3. apply exactly what the doctor printed --------------------------------------------------
    for f in &findings {
        let fix = f.fix.as_deref().unwrap_or_default();
        for stmt in fix.lines() {
            undo.sql.push(inverse(stmt)?);
        }
        env.cluster.psql("app", fix).map_err(|e| format!("applying the fix of {}:{}: {e}", f.check, f.object))?;
    }

    // ---- 4. the attacks fail; no finding is left ---------------------------------------------------
    let left = names(&doctor(env, true).await?);
    c.check("doctor reports none of these findings after the fix", left.is_empty(), format!("{left:?}"));
    attacks(env, &p, &attacker, &raw, guarded, true, &mut c).await?;
    p.stop().await;
    c.done()
}

/// The attacks that privileges (and the guard) can stop; `fixed`: after the doctor's fix.
async fn attacks(
    env: &Env,
    p: &pgtenant::server::Running,
    attacker: &tokio_postgres::Client,
    raw: &tokio_postgres::Client,
    guarded: bool,
    fixed: bool,
    c: &mut Checks,
) -> TestResult {
    let when = if fixed { "after fix" } else { "before fix" };
    let paths = [(Path::Proxy, attacker), (Path::Direct, raw)];
    // what an attempt must do on this path: work, be refused by the guard, or by the database
    let expect = |path: Path, guardable: bool, o: &Outcome| -> bool {
        let refused_by_guard = path == Path::Proxy && guarded && guardable;
        match o {
            Outcome::Guard(_) => refused_by_guard,
            Outcome::Denied(_) => fixed && !refused_by_guard,
            Outcome::Ran(_) => !fixed && !refused_by_guard,
            Outcome::Other(_) => false,
        }
    };

    // other sessions' query text
    for (path, client) in paths {
        for (what, sql) in [
            ("pg_stat_get_activity", format!("select pid, query from pg_stat_get_activity(NULL) where query like {SECRET_PATTERN}")),
            (
                "pg_stat_get_backend_activity",
                format!("select pg_stat_get_backend_activity(b) from pg_stat_get_backend_idset() b where pg_stat_get_backend_activity(b) like {SECRET_PATTERN}"),
            ),
            ("pg_stat_activity", format!("select query from pg_stat_activity where query like {SECRET_PATTERN}")),
        ] {
            let (_, victim) = victim_running(p).await?;
            let o = attempt(client, &sql).await;
            let leaked = rows(&o).iter().flatten().flatten().any(|v| v.contains(SECRET));
            let ok = expect(path, true, &o) && leaked == matches!(o, Outcome::Ran(_));
            c.check(&format!("{when}: {path:?} reads tenant 2's query text with {what}"), ok, format!("{o:?}"));
            let _ = victim.await;
        }
    }

    // cancel / terminate tenant 2's running query (pid known: looked up before the fix, or by
    // trying every pid — pids are no secret)
    for (path, client) in paths {
        for (what, expected_code) in [("pg_cancel_backend", "57014"), ("pg_terminate_backend", "")] {
            let (pid, victim) = victim_running(p).await?;
            let o = attempt(client, &format!("select {what}({pid})")).await;
            let code = victim.await.map_err(|e| e.to_string())?;
            let hit = matches!(o, Outcome::Ran(_));
            // a terminated backend: the victim gets an error of some kind (the connection is gone)
            let victim_ok = if hit { !code.is_empty() && (expected_code.is_empty() || code == expected_code) } else { code.is_empty() };
            c.check(
                &format!("{when}: {path:?} {what} of tenant 2's query"),
                expect(path, true, &o) && victim_ok,
                format!("{o:?}, victim ended with {code:?}"),
            );
        }
    }

    // advisory locks: one key space for every tenant
    // (whether the key is free is asked as the superuser: after the fix tenant 2 cannot ask)
    let holder = connect(p, &token(1, "holder")).await.map_err(|e| format!("{e:?}"))?;
    let victim = connect(p, &token(2, "victim")).await.map_err(|e| format!("{e:?}"))?;
    for (path, client) in [(Path::Proxy, &holder), (Path::Direct, raw)] {
        let take = if path == Path::Proxy { "BEGIN; select pg_advisory_xact_lock(424242)" } else { "select pg_advisory_lock(424242)" };
        let o = attempt(client, take).await;
        let free = env.cluster.psql("app", "select pg_try_advisory_xact_lock(424242)").map_err(|e| e.to_string())?;
        let blocked = free.trim() != "t";
        c.check(
            &format!("{when}: {path:?} holds an advisory lock key other tenants need"),
            expect(path, false, &o) && blocked == matches!(o, Outcome::Ran(_)),
            format!("{o:?}, tenant 2 blocked: {blocked}"),
        );
        let _ = client.simple_query(if path == Path::Proxy { "ROLLBACK" } else { "select pg_advisory_unlock_all()" }).await;
    }

    // TRUNCATE ignores RLS (rolled back: the table is shared by every scenario)
    for (path, client) in paths {
        if path == Path::Proxy && !guarded {
            continue; // works like the direct path; not worth risking the shared table
        }
        let before = env.cluster.psql("app", "select count(*) from orders").map_err(|e| e.to_string())?;
        let o = attempt(client, "BEGIN; TRUNCATE orders").await;
        let _ = client.simple_query("ROLLBACK").await;
        let after = env.cluster.psql("app", "select count(*) from orders").map_err(|e| e.to_string())?;
        c.check(&format!("{when}: {path:?} TRUNCATE orders"), expect(path, true, &o) && before == after, format!("{o:?}"));
    }

    // LOCK TABLE: a privilege cannot stop it (UPDATE or DELETE allows every lock mode), the guard does
    for (path, client) in paths {
        let o = attempt(client, "BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE").await;
        let blocked = victim.simple_query("BEGIN; SET LOCAL lock_timeout = '300ms'; select count(*) from orders; COMMIT").await;
        let _ = victim.simple_query("ROLLBACK").await;
        let _ = client.simple_query("ROLLBACK").await;
        let code = blocked.err().and_then(|e| e.as_db_error().map(|d| d.code().code().to_string())).unwrap_or_default();
        let ran = matches!(o, Outcome::Ran(_));
        let ok = match (path, &o) {
            (Path::Proxy, Outcome::Guard(_)) => guarded,
            (Path::Proxy, Outcome::Ran(_)) => !guarded,
            (Path::Direct, Outcome::Ran(_)) => true, // inherent at the database level, fixed or not
            _ => false,
        };
        c.check(
            &format!("{when}: {path:?} LOCK TABLE blocks tenant 2"),
            ok && (code == "55P03") == ran,
            format!("{o:?}, tenant 2 got {code:?}"),
        );
    }
    Ok(())
}

/// What stays possible by design (documented): NOTIFY payloads reach every listener of the
/// channel (session pooling; transaction pooling refuses LISTEN), and table-level statistics.
async fn inherent(env: &Env, attacker: &tokio_postgres::Client, c: &mut Checks) -> TestResult {
    // NOTIFY: tenant 1 listens in session mode and receives tenant 2's payload
    let p = start_proxy(env, "pool_size = 3", "[pool]\nmode = \"session\"").await;
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1").port(p.addr.port()).user("alice").dbname("app").password(token(1, "listener"));
    let (listener, mut conn) = cfg.connect(tokio_postgres::NoTls).await.map_err(|e| format!("{e:?}"))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    let listen = attempt(&listener, "LISTEN orders_changed").await;
    let notifier = connect(&p, &token(2, "notifier")).await.map_err(|e| format!("{e:?}"))?;
    notifier.batch_execute("NOTIFY orders_changed, 'tenant-2-payload'").await.map_err(|e| format!("{e:?}"))?;
    let _ = listener.simple_query("select 1").await;
    let got = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await.ok().flatten();
    c.check(
        "inherent: in session mode tenant 1 receives tenant 2's NOTIFY payload",
        matches!(listen, Outcome::Ran(_)) && got.as_deref() == Some("tenant-2-payload"),
        format!("LISTEN {listen:?}, received {got:?}"),
    );
    drop(listener);
    drop(notifier);
    p.stop().await;

    // planner statistics: PG 15 hides pg_stats rows of RLS tables, but not pg_class.reltuples nor
    // the estimates EXPLAIN prints for another tenant's rows
    let stats = rows(&attempt(attacker, "select count(*) from pg_stats where tablename = 'orders'").await);
    c.check("PG 15 hides pg_stats of a table with RLS", stats == vec![vec![Some("0".to_string())]], format!("{stats:?}"));
    let reltuples = rows(&attempt(attacker, "select reltuples::bigint from pg_class where relname = 'orders'").await);
    let n: i64 = reltuples.first().and_then(|r| r[0].as_deref()).and_then(|v| v.parse().ok()).unwrap_or(0);
    c.check("inherent: pg_class.reltuples shows the size of the whole table", n > 100, format!("{reltuples:?}"));
    let plan = rows(&attempt(attacker, "explain select * from orders where tenant_id = 2").await);
    let estimate: i64 = plan
        .iter()
        .flatten()
        .flatten()
        .find_map(|l| l.split("rows=").nth(1).and_then(|r| r.split(' ').next()).and_then(|v| v.parse().ok()))
        .unwrap_or(0);
    let seen = rows(&attempt(attacker, "select count(*) from orders where tenant_id = 2").await);
    c.check(
        "inherent: EXPLAIN estimates tenant 2's row count although tenant 1 sees none of its rows",
        estimate > 1 && seen == vec![vec![Some("0".to_string())]],
        format!("estimate {estimate}, seen {seen:?}"),
    );
    Ok(())
}
