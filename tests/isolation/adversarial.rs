//! Raw-protocol adversarial scenarios: FunctionCall, `--` comments ended by `\r`, `U&"…" UESCAPE`,
//! `COMMIT AND CHAIN`, backends poisoned by unsynced errors, clients that vanish or idle while
//! holding a backend, and the per-client session-state budget.
//!
//! After every attack: the attempt is refused (the expected SQLSTATE) or harmless, the attacker is
//! still tenant 1 and sees no foreign row, tenant 2's rows are unchanged, and the next client on
//! the same backend (`pool_size = 1`) is exactly its own tenant. Every check prints one line and
//! a scenario fails with the list of its failed checks, so the output is a to-do list.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::wire::{self, Reply, Wire};

// ---- shared plumbing (pristine.rs uses it too) -------------------------------------------------

/// Collects named checks; a scenario reports every failure, not only the first.
pub struct Checks {
    name: &'static str,
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    pub fn new(name: &'static str) -> Checks {
        Checks { name, passed: 0, failed: Vec::new() }
    }

    pub fn check(&mut self, label: &str, ok: bool, detail: impl std::fmt::Display) -> bool {
        if ok {
            self.passed += 1;
            println!("  [{}] ok   {label}", self.name);
        } else {
            println!("  [{}] FAIL {label}: {detail}", self.name);
            self.failed.push(format!("{label}: {detail}"));
        }
        ok
    }

    pub fn done(self) -> TestResult {
        println!("{}: {} checks passed, {} failed", self.name, self.passed, self.failed.len());
        if self.failed.is_empty() {
            Ok(())
        } else {
            Err(format!("{} of {} checks failed:\n    {}", self.failed.len(), self.failed.len() + self.passed, self.failed.join("\n    ")))
        }
    }
}

/// Starts a proxy like `start_proxy`, but returns an invalid configuration as an error (keys the
/// proxy does not know yet) instead of panicking. `server_extra` goes into `[server]`.
pub async fn try_start(env: &Env, backend_extra: &str, extra: &str, server_extra: &str) -> Result<pgtenant::server::Running, String> {
    let text = config_text(env, backend_extra, extra).replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:0\"\n{server_extra}"), 1);
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|e| format!("config refused: {e}"))?;
    Ok(pgtenant::server::start(cfg).await?)
}

/// Tenant 2's rows as the superuser sees them (count, sum, highest id).
pub fn victim(env: &Env) -> String {
    env.cluster
        .psql("app", "select count(*) || ':' || coalesce(sum(amount), 0) || ':' || coalesce(max(id), 0) from orders where tenant_id = 2")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("psql failed: {e}"))
}

/// The OID of a function, e.g. `set_config(text,text,boolean)`.
pub fn oid(env: &Env, signature: &str) -> Result<u32, String> {
    let out = env.cluster.psql("app", &format!("select '{signature}'::regprocedure::oid")).map_err(|e| e.to_string())?;
    out.trim().parse().map_err(|_| format!("oid of {signature}: {out:?}"))
}

/// One query showing who a session is: its context, foreign and total rows, role, backend pid.
pub fn who_sql(tenant: i64) -> String {
    format!(
        "select coalesce(current_setting('app.tenant_id', true), '<unset>'), count(*) filter (where tenant_id <> {tenant}), \
         count(*), current_user::text, pg_backend_pid() from orders"
    )
}

/// Whether a `who_sql` reply shows exactly `tenant`.
pub fn is_tenant(r: &Reply, tenant: i64) -> bool {
    r.ok() && r.get(0, 0) == tenant.to_string() && r.get(0, 1) == "0" && r.get(0, 2) != "0" && r.get(0, 3) == "app_user"
}

pub fn who_detail(r: &Reply) -> String {
    format!("context {:?}, foreign {}, rows {}, user {} ({})", r.get(0, 0), r.get(0, 1), r.get(0, 2), r.get(0, 3), r.summary())
}

/// After an attack: ends whatever transaction is open, then the client must still be tenant 1.
pub async fn still_tenant_one(w: &mut Wire, c: &mut Checks, label: &str) {
    let _ = w.simple("ROLLBACK").await;
    let r = w.simple(&who_sql(1)).await;
    c.check(&format!("{label}: attacker still tenant 1"), is_tenant(&r, 1), who_detail(&r));
}

/// The end of a scenario: the next client of tenant 2 gets exactly tenant 2 on a pristine backend,
/// tenant 2's rows are what they were (`before`, from [`victim`]), and the proxy stops.
pub async fn finish(env: &Env, p: pgtenant::server::Running, mut c: Checks, before: &str, label: &str) -> TestResult {
    next_client_is(&p, 2, &mut c, label, Duration::from_secs(5)).await;
    let after = victim(env);
    c.check("tenant 2's rows unchanged", before == after, format!("{before} -> {after}"));
    p.stop().await;
    c.done()
}

/// A new client of `tenant` must get a working session within `limit` and be exactly that tenant.
/// Returns its backend pid.
pub async fn next_client_is(p: &pgtenant::server::Running, tenant: i64, c: &mut Checks, label: &str, limit: Duration) -> Option<String> {
    let started = Instant::now();
    let attempt = async {
        let mut w = Wire::connect(p.addr, &token(tenant, "next")).await?;
        let r = w.simple(&who_sql(tenant)).await;
        w.close().await;
        Ok::<Reply, String>(r)
    };
    match tokio::time::timeout(limit, attempt).await {
        Err(_) => {
            c.check(&format!("{label}: next client (tenant {tenant}) served"), false, format!("no answer within {} s", limit.as_secs()));
            None
        }
        Ok(Err(e)) => {
            c.check(&format!("{label}: next client (tenant {tenant}) served"), false, e);
            None
        }
        Ok(Ok(r)) => {
            let ok = is_tenant(&r, tenant);
            c.check(
                &format!("{label}: next client is exactly tenant {tenant}"),
                ok,
                format!("{} after {} ms", who_detail(&r), started.elapsed().as_millis()),
            );
            ok.then(|| r.get(0, 4))
        }
    }
}

/// A reply, or a timed-out one when the wait around it ran out.
pub fn timed(r: Result<Reply, tokio::time::error::Elapsed>) -> Reply {
    r.unwrap_or_else(|_| Reply { timed_out: true, ..Default::default() })
}

async fn backend_pid(w: &mut Wire) -> String {
    w.simple("select pg_backend_pid()").await.get(0, 0)
}

fn pgtenant_error(r: &Reply, code: &str) -> bool {
    r.errors.first().is_some_and(|e| e.code == code && e.message.starts_with("pgtenant: "))
}

async fn login(p: &pgtenant::server::Running, tenant: i64, sub: &str) -> Result<Wire, String> {
    Wire::connect(p.addr, &token(tenant, sub)).await
}

// ---- 1. FunctionCall ---------------------------------------------------------------------------

pub async fn function_calls(env: &Env) -> TestResult {
    let mut c = Checks::new("function_call");
    let set_config = oid(env, "set_config(text,text,boolean)")?;
    let lock = oid(env, "pg_advisory_lock(bigint)")?;
    let before = victim(env);
    let p = start_proxy(env, "pool_size = 1", "").await;
    let mut a = login(&p, 1, "mallory").await?;
    let pid_a = backend_pid(&mut a).await;

    for (label, local) in [("F set_config(app.tenant_id, 2, true)", "true"), ("F set_config(app.tenant_id, 2, false)", "false")] {
        let r = a.call(set_config, &["app.tenant_id", "2", local]).await;
        c.check(&format!("{label}: refused 42501 'pgtenant: …' then ReadyForQuery I"), pgtenant_error(&r, "42501") && r.readies == b"I", r.summary());
        let r = a.simple("select 1").await;
        c.check(&format!("{label}: session still usable"), r.ok() && r.get(0, 0) == "1", r.summary());
        still_tenant_one(&mut a, &mut c, label).await;
    }
    for name in ["request.jwt.claims", "role", "app.user_id"] {
        let r = a.call(set_config, &[name, "x", "true"]).await;
        c.check(&format!("F set_config({name}): refused 42501"), pgtenant_error(&r, "42501"), r.summary());
    }

    // inside an explicit transaction: the refusal aborts it; nothing after it sees tenant 2
    let r = a.simple("BEGIN").await;
    c.check("BEGIN", r.ok() && r.status() == b'T', r.summary());
    let r = a.call(set_config, &["app.tenant_id", "2", "true"]).await;
    c.check("BEGIN; F set_config: refused 42501, transaction aborted (E)", pgtenant_error(&r, "42501") && r.status() == b'E', r.summary());
    let r = a.simple("select tenant_id from orders").await;
    let foreign = r.rows.iter().filter(|row| row[0].as_deref() != Some("1")).count();
    c.check("BEGIN; F; select: no tenant 2 row, 25P02", foreign == 0 && r.code() == Some("25P02"), format!("{foreign} foreign rows; {}", r.summary()));
    still_tenant_one(&mut a, &mut c, "BEGIN; F set_config").await;

    // the same, pipelined in one write
    let batch = [wire::query("BEGIN"), wire::call(set_config, &["app.tenant_id", "2", "true"]), wire::query("select tenant_id from orders"), wire::query("COMMIT")].concat();
    let r = a.round(&batch, 4).await;
    let foreign = r.rows.iter().filter(|row| row[0].as_deref() != Some("1")).count();
    c.check(
        "pipelined BEGIN; F; select; COMMIT: F refused, no tenant 2 row",
        foreign == 0 && r.errors.first().is_some_and(|e| e.code == "42501") && r.tags.last().map(String::as_str) == Some("ROLLBACK"),
        format!("{foreign} foreign rows; {}", r.summary()),
    );
    still_tenant_one(&mut a, &mut c, "pipelined F").await;

    // binary argument format, binary result
    let r = a.round(&wire::function_call(set_config, &[Some(b"app.tenant_id"), Some(b"2"), Some(&[1])], 1, 1), 1).await;
    c.check("F set_config, binary arguments: refused 42501", pgtenant_error(&r, "42501"), r.summary());
    still_tenant_one(&mut a, &mut c, "binary F").await;

    // FunctionCall in the middle of an extended-protocol batch (no Sync before it)
    let batch = [wire::unnamed("select 1"), wire::call(set_config, &["app.tenant_id", "2", "true"]), wire::unnamed(&who_sql(1)), wire::sync()].concat();
    let r = a.round(&batch, 2).await;
    let foreign = r.rows.iter().filter(|row| row.len() == 5 && !(row[0].as_deref() == Some("1") && row[1].as_deref() == Some("0"))).count();
    c.check(
        "extended batch with F inside: F refused, nothing after it runs as another tenant or without the context",
        foreign == 0 && r.errors.iter().any(|e| e.code == "42501"),
        format!("{foreign} bad rows {:?}; {}", r.rows, r.summary()),
    );
    still_tenant_one(&mut a, &mut c, "F inside an extended batch").await;
    // a simple Query inside an extended batch ends the batch's implicit transaction on the server
    // too: what follows it in the batch needs the context again
    let batch = [wire::unnamed("select 1"), wire::query("select 2"), wire::unnamed(&who_sql(1)), wire::sync()].concat();
    let r = a.round(&batch, 2).await;
    let last = r.rows.last().cloned().unwrap_or_default();
    c.check(
        "extended batch with a simple Query inside: the rest of the batch is tenant 1",
        r.ok() && last.len() == 5 && last[0].as_deref() == Some("1") && last[2].as_deref() != Some("0"),
        format!("last row {last:?}; {}", r.summary()),
    );
    still_tenant_one(&mut a, &mut c, "Query inside an extended batch").await;

    // unknown OID: refused by pgtenant, not by the server (42883)
    let r = a.call(0x7fff_fff0, &[]).await;
    c.check("F of an unknown OID: refused 42501", pgtenant_error(&r, "42501"), r.summary());

    // session advisory lock by FunctionCall: refused, and no lock outlives the client
    let r = a.call(lock, &["777"]).await;
    c.check("F pg_advisory_lock(777): refused 42501", pgtenant_error(&r, "42501"), r.summary());
    still_tenant_one(&mut a, &mut c, "F pg_advisory_lock").await;
    a.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let locks = env.cluster.psql("app", "select count(*) from pg_locks where locktype = 'advisory'").unwrap_or_default();
    c.check("no advisory lock held after the client left", locks.trim() == "0", format!("{} advisory locks", locks.trim()));

    if let Some(pid_b) = next_client_is(&p, 2, &mut c, "after FunctionCall attacks", Duration::from_secs(5)).await {
        println!("  [function_call] attacker backend {pid_a}, next client backend {pid_b}");
    }
    let after = victim(env);
    c.check("tenant 2's rows unchanged", before == after, format!("{before} -> {after}"));
    p.stop().await;
    c.done()
}

pub async fn function_call_allowlist(env: &Env) -> TestResult {
    let mut c = Checks::new("function_call_allowlist");
    let set_config = oid(env, "set_config(text,text,boolean)")?;
    let lo_creat = oid(env, "lo_creat(integer)")?;
    let lo_unlink = oid(env, "lo_unlink(oid)")?;
    let lock = oid(env, "pg_advisory_lock(bigint)")?;
    let before = victim(env);
    let extra = "allowed_function_calls = [\"lo_creat\", \"lo_unlink\", \"pg_catalog.pg_advisory_lock\"]";
    let p = match try_start(env, "pool_size = 1", extra, "").await {
        Ok(p) => p,
        Err(e) => {
            c.check("[tenant] allowed_function_calls accepted", false, e);
            return c.done();
        }
    };
    let mut a = login(&p, 1, "mallory").await?;
    let pid_a = backend_pid(&mut a).await;
    let r = a.call(lo_creat, &["-1"]).await;
    let lo = r.results.first().cloned().flatten().map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default();
    c.check("allowed F lo_creat(-1) works", r.ok() && lo.parse::<u32>().is_ok(), format!("result {lo:?}; {}", r.summary()));
    if !lo.is_empty() {
        let r = a.call(lo_unlink, &[&lo]).await;
        let v = r.results.first().cloned().flatten().map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default();
        c.check("allowed F lo_unlink works", r.ok() && v == "1", format!("result {v:?}; {}", r.summary()));
    }
    // an allowed call inside an extended batch ends its implicit transaction: the rest of the
    // batch needs the context again
    let r = a.round(&[wire::unnamed("select 1"), wire::call(lo_creat, &["-1"]), wire::unnamed(&who_sql(1)), wire::sync()].concat(), 2).await;
    let last = r.rows.last().cloned().unwrap_or_default();
    c.check(
        "allowed F inside an extended batch: the rest of the batch is tenant 1",
        r.ok() && last.len() == 5 && last[0].as_deref() == Some("1") && last[2].as_deref() != Some("0"),
        format!("last row {last:?}; {}", r.summary()),
    );
    if let Some(Some(v)) = r.results.first() {
        let _ = a.call(lo_unlink, &[&String::from_utf8_lossy(v)]).await;
    }
    let r = a.round(&[wire::query("BEGIN"), wire::call(lo_creat, &["-1"]), wire::query("ROLLBACK")].concat(), 3).await;
    c.check("allowed F inside BEGIN … ROLLBACK works", r.ok() && r.results.len() == 1 && r.readies == b"TTI", r.summary());
    for (label, args) in [("set_config(app.tenant_id)", ["app.tenant_id", "2", "true"]), ("set_config(search_path)", ["search_path", "x", "false"])] {
        let r = a.call(set_config, &args).await;
        c.check(&format!("F {label} still refused with lo_creat allowed"), pgtenant_error(&r, "42501"), r.summary());
        still_tenant_one(&mut a, &mut c, &format!("F {label}")).await;
    }
    // an allowed state-changing call: the backend is reset before another client gets it
    let r = a.call(lock, &["4242"]).await;
    c.check("allowed F pg_advisory_lock(4242) works", r.ok(), r.summary());
    let held = env.cluster.psql("app", "select count(*) from pg_locks where locktype = 'advisory'").unwrap_or_default();
    println!("  [function_call_allowlist] advisory locks held while tenant 1 is connected: {}", held.trim());
    // tenant 1 stays connected; tenant 2 gets the same backend (pool_size = 1)
    let mut b = login(&p, 2, "bob").await?;
    let r = b
        .simple("select pg_backend_pid(), (select count(*) from pg_locks where locktype = 'advisory'), coalesce(current_setting('app.tenant_id', true), '<unset>')")
        .await;
    c.check(
        "next client (tenant 2) on the backend holds no advisory lock",
        r.ok() && r.get(0, 1) == "0" && r.get(0, 2) == "2",
        format!("backend {} (tenant 1 was on {pid_a}), {} advisory locks, context {}; {}", r.get(0, 0), r.get(0, 1), r.get(0, 2), r.summary()),
    );
    b.close().await;
    still_tenant_one(&mut a, &mut c, "after allowed calls").await;
    a.close().await;
    let after = victim(env);
    c.check("tenant 2's rows unchanged", before == after, format!("{before} -> {after}"));
    p.stop().await;

    // listing set_config itself never lets a protected setting through
    let extra = "allowed_function_calls = [\"set_config\", \"pg_catalog.set_config\"]";
    match try_start(env, "pool_size = 1", extra, "").await {
        Err(e) => {
            c.check("allowed_function_calls = [\"set_config\"]: refused at config load (fine)", true, "");
            println!("  [function_call_allowlist] set_config in the list: {e}");
        }
        Ok(p) => {
            let mut a = login(&p, 1, "mallory").await?;
            let r = a.call(set_config, &["app.tenant_id", "2", "true"]).await;
            c.check("set_config listed: F set_config(app.tenant_id) still refused 42501", r.code() == Some("42501"), r.summary());
            still_tenant_one(&mut a, &mut c, "set_config listed").await;
            a.close().await;
            p.stop().await;
        }
    }
    c.done()
}

// ---- 2. `--` comments end at \r ------------------------------------------------------------------

/// What the session state of the backend shows about leftovers of the \r attacks.
const LEFTOVERS: &str = "select (select count(*) from pg_listening_channels()), (select count(*) from pg_cursors), \
    (select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()), \
    (select count(*) from pg_class where relnamespace = pg_my_temp_schema())";

pub async fn cr_comments(env: &Env) -> TestResult {
    let mut c = Checks::new("cr_comments");
    let before = victim(env);
    let p = start_proxy(env, "pool_size = 1", "").await;
    let mut a = login(&p, 1, "mallory").await?;
    let refused = [
        "select 1; --\rselect set_config('app.tenant_id','2',true)",
        "select 1; -- a comment\rselect set_config('app.tenant_id', '2', false)",
        "--\rSET app.tenant_id = '2'",
        "-- x\r\rSET LOCAL app.tenant_id TO '2'",
        "select 1 /* a */; --\rRESET app.tenant_id",
        "--\rselect pg_catalog.set_config('app.tenant_id', '2', true)",
        "select 1; --\rselect set_config('role', 'app_owner', true)",
    ];
    for sql in refused {
        let r = a.simple(sql).await;
        c.check(&format!("simple {sql:?}: refused 42501"), r.code() == Some("42501"), r.summary());
        still_tenant_one(&mut a, &mut c, &format!("simple {sql:?}")).await;
    }
    for sql in ["--\rselect set_config('app.tenant_id','2',true)", "--\rSET app.tenant_id = '2'", "-- c\rselect set_config('app.tenant_id', '2', false)"] {
        let r = a.ext(sql).await;
        c.check(&format!("Parse {sql:?}: refused 42501"), r.code() == Some("42501"), r.summary());
        still_tenant_one(&mut a, &mut c, &format!("Parse {sql:?}")).await;
    }

    // a COMMIT hidden behind --\r: refused (0A000), or the statement after it still has the context
    let probe = "select coalesce(current_setting('app.tenant_id', true), '<unset>'), count(*) from orders";
    for sql in [
        format!("select 1; --\rCOMMIT; {probe}"),
        format!("BEGIN; select 1; --\rCOMMIT; {probe}"),
        format!("BEGIN; --\rROLLBACK; {probe}"),
        format!("BEGIN; --\rCOMMIT AND CHAIN; {probe}"),
    ] {
        let r = a.simple(&sql).await;
        let handled = r.code() == Some("0A000") || (r.ok() && r.rows.iter().all(|row| row[0].as_deref() == Some("1")) && !r.rows.is_empty());
        c.check(&format!("simple {sql:?}: refused 0A000 or runs with the context"), handled, format!("rows {:?}; {}", r.rows, r.summary()));
        still_tenant_one(&mut a, &mut c, &format!("hidden commit {sql:?}")).await;
    }
    for (label, batch) in [
        ("Parse '--\\rCOMMIT' then a query, one batch", [wire::unnamed("--\rCOMMIT"), wire::unnamed(probe), wire::sync()].concat()),
        (
            "BEGIN, Parse '--\\rCOMMIT', a query, one batch",
            [wire::unnamed("BEGIN"), wire::unnamed("--\rCOMMIT"), wire::unnamed(probe), wire::sync()].concat(),
        ),
    ] {
        let r = a.round(&batch, 1).await;
        let last = r.rows.last().and_then(|row| row[0].clone()).unwrap_or_default();
        c.check(&format!("{label}: the query after the hidden COMMIT has the context"), r.code() == Some("0A000") || (r.ok() && last == "1"), format!("context {last:?}; {}", r.summary()));
        still_tenant_one(&mut a, &mut c, label).await;
    }

    // session state hidden behind --\r (refused 0A000 in transaction pooling, or reset before reuse)
    for sql in [
        "--\rLISTEN leak_cr",
        "select 1; --\rLISTEN leak_cr2",
        "--\rDECLARE leak_cr_cur CURSOR WITH HOLD FOR select * from orders",
        "--\rselect pg_advisory_lock(99)",
        "--\rCREATE TEMP TABLE leak_cr_tmp AS select * from orders",
    ] {
        let r = a.simple(sql).await;
        println!("  [cr_comments] simple {sql:?}: {}", r.code().map_or("ran".to_string(), |c| format!("refused {c}")));
        c.check(&format!("simple {sql:?}: refused 0A000"), r.code() == Some("0A000"), r.summary());
        still_tenant_one(&mut a, &mut c, &format!("simple {sql:?}")).await;
    }
    for sql in ["--\rLISTEN leak_cr3", "--\rDECLARE leak_cr_cur2 CURSOR WITH HOLD FOR select * from orders"] {
        let r = a.ext(sql).await;
        c.check(&format!("Parse {sql:?}: refused 0A000"), r.code() == Some("0A000"), r.summary());
        still_tenant_one(&mut a, &mut c, &format!("Parse {sql:?}")).await;
    }
    // tenant 1 stays connected; tenant 2 on the same backend finds none of it
    let pid_a = backend_pid(&mut a).await;
    let mut b = login(&p, 2, "bob").await?;
    let r = b.simple(&format!("{LEFTOVERS}, pg_backend_pid()")).await;
    c.check(
        "next client (tenant 2): no listener, cursor, advisory lock or temp table left",
        r.ok() && (0..4).all(|i| r.get(0, i) == "0"),
        format!("listen {}, cursors {}, locks {}, temp {} (backend {}, tenant 1 on {pid_a}); {}", r.get(0, 0), r.get(0, 1), r.get(0, 2), r.get(0, 3), r.get(0, 4), r.summary()),
    );
    for (sql, what) in [("FETCH ALL FROM leak_cr_cur", "tenant 1's WITH HOLD cursor"), ("select tenant_id from pg_temp.leak_cr_tmp", "tenant 1's temp table")] {
        let r = b.simple(sql).await;
        c.check(&format!("tenant 2 cannot read {what}"), !r.errors.is_empty() && r.rows.is_empty(), format!("{} rows; {}", r.rows.len(), r.summary()));
    }
    b.close().await;
    a.close().await;
    finish(env, p, c, &before, "after \\r attacks").await
}

// ---- 3. U&"…" UESCAPE ----------------------------------------------------------------------------

pub async fn uescape(env: &Env) -> TestResult {
    let mut c = Checks::new("uescape");
    let before = victim(env);
    let p = start_proxy(env, "pool_size = 1", "").await;
    let mut a = login(&p, 1, "mallory").await?;
    let attacks = [
        "select U&\"set!005fconfig\" UESCAPE '!'('app.tenant_id','2',true)",
        "SET LOCAL U&\"app!002etenant_id\" UESCAPE '!' = '2'",
        "select set_config(U&'app!002etenant_id' UESCAPE '!', '2', true)",
        "select u&\"set#005Fconfig\" uescape '#'('app.tenant_id', '2', true)",
        "select U&\"set!005fconfig\" /* c */ UESCAPE /* d */ '!'('app.tenant_id','2',true)",
        "select U&\"set!005fconfig\"\n  UESCAPE\n  '!'('app.tenant_id','2',true)",
        "select U&\"set!005fconfig\" -- c\n UESCAPE '!'('app.tenant_id','2',true)",
        "select pg_catalog.U&\"set*005fconfig\" UESCAPE '*'('app.tenant_id','2',true)",
        "select U&\"!0073et_config\" UESCAPE '!'(U&'app!002etenant!005fid' UESCAPE '!', '2', true)",
        "select set_config(U&'app!+00002etenant_id' UESCAPE '!', '2', true)",
        "select set_config(U&'app=002Etenant_id' UESCAPE '=', '2', false)",
        "select set_config(U&'app;002etenant_id' UESCAPE ';', '2', true)",
        "SET U&\"app!002etenant_id\" UESCAPE '!' TO '2'",
        "SET SESSION U&\"app!002etenant_id\" UESCAPE '!' = '2'",
        "SET LOCAL app.U&\"tenant!005fid\" UESCAPE '!' = '2'",
        "SET LOCAL U&\"app\" UESCAPE '!' . U&\"tenant!005fid\" UESCAPE '!' = '2'",
        "RESET U&\"app!002etenant_id\" UESCAPE '!'",
        "SET LOCAL U&\"r!006fle\" UESCAPE '!' = 'app_owner'",
        "select set_config('app.'\n'tenant_id', '2', true)",
        "select set_config(E'app\\x2e'\n'tenant_id', '2', true)",
        "select set_config('app.'   \n  -- c\n 'tenant_id', '2', true)",
        "select set_config(U&'app!002e'\n'tenant_id' UESCAPE '!', '2', true)",
        "select set_config('app.' /* c */\n'tenant_id', '2', true)",
        "select set_config('app.'\r'tenant_id', '2', true)",
        "select set_config('app.'\r\n\t'tenant_id', '2', true)",
        // values that change how SQL is read, spelled as continued strings (last: if one goes
        // through, it changes how the server reads everything after it)
        "select set_config('standard_conforming_strings', 'of'\n'f', false)",
        "SET standard_conforming_strings = 'of'\n'f'",
        "SET client_encoding = 'SJ'\n'IS'",
    ];
    for sql in attacks {
        // impact: a statement after the attempt, in the same implicit transaction
        if sql.starts_with("select") {
            let r = a.simple(&format!("{sql}; select count(*) from orders where tenant_id <> 1")).await;
            let seen = r.rows.last().map(|row| row[0].clone().unwrap_or_default()).unwrap_or_default();
            c.check(&format!("simple {:?}: no foreign row visible", format!("{sql}; select …")), !r.ok() || seen == "0", format!("{seen} foreign rows; {}", r.summary()));
        }
        let r = a.simple(sql).await;
        c.check(&format!("simple {sql:?}: refused 42501"), r.code() == Some("42501"), r.summary());
        still_tenant_one(&mut a, &mut c, &format!("simple {sql:?}")).await;
        let r = a.ext(sql).await;
        c.check(&format!("Parse {sql:?}: refused 42501"), r.code() == Some("42501"), r.summary());
        still_tenant_one(&mut a, &mut c, &format!("Parse {sql:?}")).await;
    }
    a.close().await;
    finish(env, p, c, &before, "after UESCAPE attacks").await
}

// ---- 4. COMMIT AND CHAIN -------------------------------------------------------------------------

pub async fn commit_and_chain(env: &Env) -> TestResult {
    let mut c = Checks::new("commit_and_chain");
    let before = victim(env);
    let p = start_proxy(env, "pool_size = 1", "").await;
    let mut a = login(&p, 1, "alice").await?;
    let who = who_sql(1);
    let insert = "insert into orders (tenant_id, amount) values (1, -31)";
    for ender in ["COMMIT AND CHAIN", "ROLLBACK AND CHAIN", "END AND CHAIN", "ABORT AND CHAIN", "commit /* x */ and\n chain", "COMMIT WORK AND CHAIN"] {
        // simple protocol, one statement per Query
        let _ = a.simple("BEGIN").await;
        let r = a.simple(ender).await;
        c.check(&format!("simple {ender:?}: chained transaction open (T)"), r.ok() && r.status() == b'T', r.summary());
        let r = a.simple(&who).await;
        c.check(&format!("simple {ender:?}: chained transaction is tenant 1"), is_tenant(&r, 1) && r.status() == b'T', who_detail(&r));
        let r = a.simple(insert).await;
        c.check(&format!("simple {ender:?}: own insert passes WITH CHECK in the chain"), r.ok(), r.summary());
        let _ = a.simple("ROLLBACK").await;

        // extended protocol, one batch per statement
        let _ = a.ext("BEGIN").await;
        let r = a.ext(ender).await;
        c.check(&format!("extended {ender:?}: chained transaction open (T)"), r.ok() && r.status() == b'T', r.summary());
        let r = a.ext(&who).await;
        c.check(&format!("extended {ender:?}: chained transaction is tenant 1"), is_tenant(&r, 1), who_detail(&r));
        let _ = a.simple("ROLLBACK").await;

        // one extended batch: BEGIN, the chain, a query
        let r = a.round(&[wire::unnamed("BEGIN"), wire::unnamed(ender), wire::unnamed(&who), wire::sync()].concat(), 1).await;
        c.check(&format!("one batch BEGIN; {ender:?}; query: query is tenant 1"), is_tenant(&r, 1), who_detail(&r));
        let _ = a.simple("ROLLBACK").await;

        // pipelined simple queries, one write
        let r = a.round(&[wire::query("BEGIN"), wire::query(ender), wire::query(&who), wire::query("ROLLBACK")].concat(), 4).await;
        c.check(&format!("pipelined BEGIN; {ender:?}; query: query is tenant 1"), is_tenant(&r, 1), who_detail(&r));
        let _ = a.simple("ROLLBACK").await;

        // statements after the chain in the same query string
        for sql in [format!("BEGIN; {ender}; {who}"), format!("BEGIN; select 1; {ender}; {insert}")] {
            let r = a.simple(&sql).await;
            c.check(&format!("simple {sql:?}: refused 0A000"), r.code() == Some("0A000") && r.rows.is_empty(), r.summary());
            let _ = a.simple("ROLLBACK").await;
        }
        let _ = a.simple("BEGIN").await;
        let r = a.simple(&format!("{ender}; {who}")).await;
        c.check(&format!("in a block, simple \"{ender}; query\": refused 0A000"), r.code() == Some("0A000") && r.rows.is_empty(), r.summary());
        still_tenant_one(&mut a, &mut c, ender).await;
    }
    let leftovers = env.cluster.psql("app", "select count(*) from orders where amount = -31").unwrap_or_default();
    c.check("every test insert was rolled back", leftovers.trim() == "0", format!("{} rows", leftovers.trim()));
    a.close().await;
    finish(env, p, c, &before, "after AND CHAIN").await
}

// ---- 5. Poisoned backends, vanished and idle clients ---------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Leave {
    /// Terminate, then close.
    Terminate,
    /// Close the socket without Terminate.
    Drop,
    /// Stay connected and idle.
    Idle,
}

fn poison_sequences() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("Parse bad SQL, no Sync, then Query", [wire::parse("", "selec oops", &[]), wire::query("select 1")].concat()),
        ("Bind to a missing statement, no Sync, then Query", [wire::bind("", "no_such_statement", &[]), wire::query("select 1")].concat()),
        ("Execute without Sync, then Query", [wire::parse("", "select 1", &[]), wire::bind("", "", &[]), wire::execute("", 0), wire::query("select 2")].concat()),
        ("Execute of a missing portal, no Sync, then Query", [wire::execute("no_such_portal", 0), wire::query("select 1")].concat()),
        ("Describe a missing statement, no Sync, then Query", [wire::describe(b'S', "no_such_statement"), wire::query("select 1")].concat()),
        ("Parse bad SQL, Flush, then Query", [wire::parse("", "selec oops", &[]), wire::flush(), wire::query("select 1")].concat()),
        ("Parse bad SQL, Flush, no Sync ever", [wire::parse("", "selec oops", &[]), wire::flush()].concat()),
        ("pg_sleep(30) in flight", wire::query("select pg_sleep(30)")),
        ("extended pg_sleep(30), Flush, no Sync", [wire::unnamed("select pg_sleep(30)"), wire::flush()].concat()),
        ("BEGIN then nothing", wire::query("BEGIN")),
    ]
}

async fn poisoned(env: &Env, leaves: &[Leave], name: &'static str) -> TestResult {
    let mut c = Checks::new(name);
    let before = victim(env);
    for (label, seq) in poison_sequences() {
        for &leave in leaves {
            // an idle client that legitimately holds a backend (in a transaction, or mid-batch
            // with no Sync) is the timeout test's business, not this one's
            if matches!(leave, Leave::Idle) && (label.contains("no Sync ever") || label.contains("30") || label.contains("BEGIN")) {
                continue;
            }
            // A poisoning client that stays connected holds its backend exactly as it would hold
            // a direct connection (the server skips to its Sync); the proxy-side idle timeout is
            // what frees the slot for others.
            let extra = if matches!(leave, Leave::Idle) { "[pool]\nidle_in_transaction_timeout_ms = 1000" } else { "" };
            let p = start_proxy(env, "pool_size = 1", extra).await;
            let mut a = login(&p, 1, "mallory").await?;
            a.send(&seq).await?;
            let seen = a.drain_for(Duration::from_millis(800)).await;
            println!("  [{name}] {label} / {leave:?}: the client got {}", seen.summary());
            let fatal = seen.errors.iter().find(|e| e.severity == "FATAL" || e.code == "08006");
            c.check(&format!("{label} / {leave:?}: no FATAL for the poisoning client"), fatal.is_none() || label.contains("no Sync ever"), seen.summary());
            let held_a = match leave {
                Leave::Terminate => {
                    a.close().await;
                    None
                }
                Leave::Drop => {
                    drop(a);
                    None
                }
                Leave::Idle => Some(a),
            };
            next_client_is(&p, 2, &mut c, &format!("{label} / {leave:?}"), Duration::from_secs(5)).await;
            if let Some(mut a) = held_a {
                // the idle client itself is still a working tenant-1 session
                // informational: after an error with no Sync, Postgres itself ignores a Query until
                // Sync, so a client waiting here would hang on a direct connection too
                let r = timed(tokio::time::timeout(Duration::from_secs(3), a.simple(&who_sql(1))).await);
                println!("  [{name}] {label} / Idle: the poisoning client's next Query: {}", who_detail(&r));
                a.close().await;
            }
            p.stop().await;
        }
    }
    let after = victim(env);
    c.check("tenant 2's rows unchanged", before == after, format!("{before} -> {after}"));
    c.done()
}

pub async fn poisoned_and_gone(env: &Env) -> TestResult {
    poisoned(env, &[Leave::Terminate, Leave::Drop], "poisoned_then_gone").await
}

pub async fn poisoned_and_idle(env: &Env) -> TestResult {
    poisoned(env, &[Leave::Idle], "poisoned_then_idle").await
}

/// `[pool] idle_in_transaction_timeout_ms` and `transaction_timeout_ms`: the client gets a FATAL
/// (25P03 when idle in a transaction) and its slot goes to the next client.
pub async fn pool_timeouts(env: &Env) -> TestResult {
    let mut c = Checks::new("pool_timeouts");
    let idle_cases: Vec<(&str, Vec<u8>, usize)> = vec![
        ("BEGIN; select 1; then idle", [wire::query("BEGIN"), wire::query("select 1")].concat(), 2),
        ("extended BEGIN, then idle", wire::extended("BEGIN"), 1),
        ("Parse bad SQL, Flush, then idle (no Sync)", [wire::parse("", "selec oops", &[]), wire::flush()].concat(), 0),
        ("extended select, no Sync, then idle", [wire::unnamed("select 1"), wire::flush()].concat(), 0),
    ];
    for (label, seq, readies) in idle_cases {
        let p = match try_start(env, "pool_size = 1", "[pool]\nidle_in_transaction_timeout_ms = 500", "").await {
            Ok(p) => p,
            Err(e) => {
                c.check("[pool] idle_in_transaction_timeout_ms accepted", false, e);
                break;
            }
        };
        let mut a = login(&p, 1, "idler").await?;
        a.send(&seq).await?;
        let r = a.ready_n(readies, Duration::from_secs(2)).await;
        c.check(&format!("{label}: the statements ran"), !r.timed_out && !r.closed, r.summary());
        let started = Instant::now();
        next_client_is(&p, 2, &mut c, &format!("idle timeout, {label}"), Duration::from_secs(4)).await;
        let waited = started.elapsed();
        let r = a.drain_for(Duration::from_secs(2)).await;
        let fatal = r.errors.iter().find(|e| e.severity == "FATAL");
        let want_25p03 = !label.contains("no Sync");
        c.check(
            &format!("{label}: idle client gets FATAL{} and is disconnected", if want_25p03 { " 25P03" } else { "" }),
            fatal.is_some_and(|e| !want_25p03 || e.code == "25P03") && r.closed,
            format!("{} (next client waited {} ms)", r.summary(), waited.as_millis()),
        );
        p.stop().await;
    }
    // a transaction that keeps working but runs longer than transaction_timeout_ms
    let busy_cases: Vec<(&str, bool)> = vec![("BEGIN then short queries for 3 s", true), ("one pg_sleep(10)", false)];
    for (label, chatty) in busy_cases {
        let p = match try_start(env, "pool_size = 1", "[pool]\ntransaction_timeout_ms = 1000", "").await {
            Ok(p) => p,
            Err(e) => {
                c.check("[pool] transaction_timeout_ms accepted", false, e);
                break;
            }
        };
        let mut a = login(&p, 1, "slow").await?;
        let next = {
            let addr = p.addr;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let started = Instant::now();
                let r = tokio::time::timeout(Duration::from_secs(6), async {
                    let mut w = Wire::connect(addr, &token(2, "next")).await?;
                    Ok::<Reply, String>(w.simple(&who_sql(2)).await)
                })
                .await;
                (started.elapsed(), r)
            })
        };
        let mut ended: Option<Reply> = None;
        let started = Instant::now();
        if chatty {
            let _ = a.simple("BEGIN").await;
            while started.elapsed() < Duration::from_secs(3) {
                let r = a.simple("select pg_sleep(0.1)").await;
                if !r.ok() {
                    ended = Some(r);
                    break;
                }
            }
        } else {
            let r = timed(tokio::time::timeout(Duration::from_secs(12), a.simple("select pg_sleep(10)")).await);
            if !r.ok() {
                ended = Some(r);
            }
        }
        let elapsed = started.elapsed();
        let detail = ended.as_ref().map_or("never interrupted".to_string(), |r| r.summary());
        println!("  [pool_timeouts] {label}: after {} ms: {detail}", elapsed.as_millis());
        c.check(&format!("{label}: ended by transaction_timeout_ms (~1 s)"), ended.is_some() && elapsed < Duration::from_secs(3), format!("after {} ms: {detail}", elapsed.as_millis()));
        let (waited, r) = next.await.map_err(|e| e.to_string())?;
        let ok = matches!(&r, Ok(Ok(r)) if is_tenant(r, 2));
        c.check(&format!("{label}: next client served"), ok && waited < Duration::from_secs(3), format!("after {} ms: {r:?}", waited.as_millis()));
        p.stop().await;
    }
    c.done()
}

// ---- 6. Session-state memory budget ---------------------------------------------------------------

pub async fn session_state_memory(env: &Env) -> TestResult {
    let mut c = Checks::new("session_state_memory");
    const BIG: usize = 4 << 20;
    // a 4 MiB message takes seconds through an unoptimised (debug) proxy
    const SLOW: Duration = Duration::from_secs(30);
    let started = Instant::now();
    let p = start_proxy(env, "pool_size = 2", "").await;
    // warm up: one ordinary client
    let mut w = login(&p, 1, "warm").await?;
    let _ = w.simple("select 1").await;
    w.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = rss_kib();
    let mut a = login(&p, 1, "hog").await?;
    let filler = "x".repeat(BIG);
    async fn big(a: &mut Wire, parts: &[Vec<u8>]) -> Reply {
        if let Err(e) = a.send(&parts.concat()).await {
            return Reply { closed: true, trace: e, ..Default::default() };
        }
        a.ready_n(1, SLOW).await
    }

    // statements whose Parse fails are not kept: 5 x 4 MiB of bad SQL (more than the 16 MiB
    // budget) must leave the whole budget free
    let mut bad_errors = Vec::new();
    for i in 0..5 {
        let r = big(&mut a, &[wire::parse(&format!("bad{i}"), &format!("selec '{filler}' as v{i}"), &[]), wire::sync()]).await;
        bad_errors.push(r.code().unwrap_or(if r.timed_out { "timeout" } else { "none" }).to_string());
    }
    c.check("5 failing 4 MiB Parses: each fails 42601", bad_errors.iter().all(|e| e == "42601"), format!("{bad_errors:?}"));
    let r = a.simple("select 1").await;
    c.check("session usable after the failing Parses", r.ok() && r.get(0, 0) == "1", r.summary());

    // up to 20 valid 4 MiB statements, each run once: some are kept, then 54000 over 16 MiB
    let (mut kept, mut first_refusal, mut other) = (0usize, None, Vec::new());
    for i in 0..20 {
        let sql = format!("select length('{filler}') + {i}");
        let name = format!("big{i}");
        let t0 = Instant::now();
        let r = big(&mut a, &[wire::parse(&name, &sql, &[]), wire::bind("", &name, &[]), wire::execute("", 0), wire::sync()]).await;
        println!("  [session_state_memory] statement {i}: {} ms, {}", t0.elapsed().as_millis(), r.summary());
        match r.code() {
            None if r.ok() => kept += 1,
            Some("54000") => {
                first_refusal.get_or_insert(i);
            }
            _ => other.push(format!("#{i}: {}", r.summary())),
        }
        // two refusals in a row show the budget holds; stop there (and before the time limit)
        if first_refusal.is_some_and(|f| i > f) || started.elapsed() > Duration::from_secs(70) {
            break;
        }
    }
    let peak = rss_kib();
    c.check(
        "4 MiB statements: the first are kept, then 54000",
        (2..=4).contains(&kept) && first_refusal == Some(kept) && other.is_empty(),
        format!("{kept} kept, first 54000 at {first_refusal:?}, other outcomes {other:?}"),
    );
    let r = a.simple("select 1").await;
    c.check("session usable after 54000", r.ok() && r.get(0, 0) == "1", r.summary());
    let r = a.round(&[wire::bind("", "big0", &[]), wire::execute("", 0), wire::sync()].concat(), 1).await;
    c.check("a kept statement still runs", r.ok() && r.get(0, 0) == BIG.to_string(), r.summary());
    // closing kept statements gives the budget back
    let closes: Vec<Vec<u8>> = (0..20).map(|i| wire::close(b'S', &format!("big{i}"))).collect();
    let r = a.round(&[closes.concat(), wire::sync()].concat(), 1).await;
    c.check("Close of every statement", r.ok(), r.summary());
    let r = big(&mut a, &[wire::parse("again", &format!("select length('{filler}') - 1"), &[]), wire::sync()]).await;
    c.check("after Close, a new 4 MiB statement fits again", r.ok(), r.summary());
    a.close().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = rss_kib();
    println!("  [session_state_memory] RSS: baseline {} MiB, peak {} MiB, after leaving {} MiB", baseline / 1024, peak / 1024, after / 1024);
    // what the allocator keeps after a free depends on what else ran in this process (20 to 44 MiB
    // above the baseline seen here): a loose bound, then the real question, whether a second hog
    // adds to it (memory that stayed held would)
    c.check(
        "RSS back near its baseline after the client left (< 64 MiB above)",
        after < baseline + 64 * 1024,
        format!("baseline {} MiB, peak {} MiB, after {} MiB", baseline / 1024, peak / 1024, after / 1024),
    );
    let mut b = login(&p, 1, "hog2").await?;
    for i in 0..3 {
        let name = format!("again{i}");
        let r = big(&mut b, &[wire::parse(&name, &format!("select length('{filler}') + {i}"), &[]), wire::bind("", &name, &[]), wire::execute("", 0), wire::sync()]).await;
        c.check(&format!("a second hog: 4 MiB statement {i}"), r.ok(), r.summary());
    }
    b.close().await;
    drop(filler);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = rss_kib();
    println!("  [session_state_memory] RSS after a second hog left: {} MiB", again / 1024);
    c.check(
        "a second hog leaves no more behind than the first (< 16 MiB more)",
        again < after + 16 * 1024,
        format!("after the first {} MiB, after the second {} MiB", after / 1024, again / 1024),
    );
    next_client_is(&p, 2, &mut c, "after the memory hog", Duration::from_secs(5)).await;
    p.stop().await;
    c.done()
}

/// A session reuses its reading of an unnamed statement when the same content comes again at the
/// same position (`Statements::reparse_unnamed`); no decision may change through it. Each statement
/// goes several times, alternately outside and inside a transaction block, so every reading after
/// the first two is a reused one: `RESET ALL` (refused inside a block only), a bound `set_config`
/// of the tenant (refused at every Bind, however the Parse was read) and a harmless one. Each
/// refusal must be the statement's own: this test found that a second refusal in a batch the
/// server was already skipping left its error queued, to be told in place of the next refusal.
pub async fn reused_readings(env: &Env) -> TestResult {
    let mut c = Checks::new("reused_readings");
    let before = victim(env);
    let p = start_proxy(env, "pool_size = 1", "").await;
    let mut a = login(&p, 1, "alice").await?;
    let bound = |value: &str, name: &str| {
        [
            wire::parse("", "select set_config($1, $2, false)", &[]),
            wire::bind("", "", &[Some(name), Some(value)]),
            wire::execute("", 0),
            wire::sync(),
        ]
        .concat()
    };
    let cases: [(&str, Vec<u8>, bool); 3] = [
        ("RESET ALL", [wire::unnamed("RESET ALL"), wire::sync()].concat(), true),
        ("bound set_config of app.tenant_id", bound("2", "app.tenant_id"), false),
        ("bound set_config of work_mem", bound("8MB", "work_mem"), true),
    ];
    for round in 0..3 {
        for in_block in [false, true] {
            for (label, batch, runs_outside) in &cases {
                if in_block {
                    let _ = a.simple("BEGIN").await;
                }
                let r = a.round(batch, 1).await;
                let runs = *runs_outside && !(in_block && *label == "RESET ALL");
                let want = if runs { "runs" } else { "refused 42501" };
                // the refusal is this statement's own (the word it names), and the only error
                let own = |m: &str| if *label == "RESET ALL" { m.contains("RESET ALL") } else { m.contains("app.tenant_id") };
                let ok = if runs { r.ok() } else { r.errors.len() == 1 && r.code() == Some("42501") && own(&r.errors[0].message) };
                c.check(&format!("round {round}, {}: {label} {want}", if in_block { "in a block" } else { "outside" }), ok, r.summary());
                if in_block {
                    let _ = a.simple("ROLLBACK").await;
                }
                still_tenant_one(&mut a, &mut c, &format!("round {round}, {label}")).await;
            }
        }
    }
    a.close().await;
    finish(env, p, c, &before, "reused readings").await
}

/// `DISCARD ALL` by Execute is answered by pgtenant, which resets the backend with a Query of its
/// own in the same batch. When a message before it in the batch failed, the server skips that
/// Query like everything else up to Sync: the backend must then still count as unreset, whoever
/// uses it next. The first client leaves session state (settings), then sends a
/// failing Parse and `DISCARD ALL` in one batch; the next client, of another tenant, on the same
/// backend must find none of it. (Before the fix it found the setting: the backend counted as
/// reset.)
pub async fn discard_all_after_a_failure(env: &Env) -> TestResult {
    let mut c = Checks::new("discard_all_after_a_failure");
    let before = victim(env);
    let state = "select coalesce(current_setting('app.custom', true), ''), \
        current_setting('search_path'), pg_backend_pid()::text";
    for (leave, how) in [("select set_config('app.custom', 'tenant-1', false)", "a custom setting"), ("select set_config('search_path', 'pg_catalog', false)", "a search_path")] {
        for stays in [false, true] {
            let p = start_proxy(env, "pool_size = 1", "").await;
            let mut a = login(&p, 1, "alice").await?;
            let r = a.simple(leave).await;
            c.check(&format!("{how}: the first client leaves it"), r.ok(), r.summary());
            let r = a.round(&[wire::parse("s1", "select 1", &[]), wire::sync()].concat(), 1).await;
            c.check(&format!("{how}: and prepares a statement"), r.ok(), r.summary());
            let batch = [
                wire::parse("bad", "selec", &[]),
                wire::parse("", "DISCARD ALL", &[]),
                wire::bind("", "", &[]),
                wire::execute("", 0),
                wire::sync(),
            ]
            .concat();
            let r = a.round(&batch, 1).await;
            c.check(&format!("{how}: the batch fails at its first message"), r.code() == Some("42601") && r.errors.len() == 1, r.summary());
            let pid_a = a.simple("select pg_backend_pid()::text").await.get(0, 0);
            // the server skipped the DISCARD ALL: the client's statement is still there
            let r = a.round(&[wire::bind("", "s1", &[]), wire::execute("", 0), wire::sync()].concat(), 1).await;
            c.check(&format!("{how}: the first client's statement survives the skipped DISCARD ALL"), r.ok() && r.get(0, 0) == "1", r.summary());
            let a = if stays {
                Some(a)
            } else {
                a.close().await;
                None
            };
            let mut b = login(&p, 2, "bob").await?;
            let r = b.simple(state).await;
            let clean = r.ok() && r.get(0, 0).is_empty() && r.get(0, 1) == "\"$user\", public";
            let same = if r.get(0, 2) == pid_a { "same backend" } else { "another backend" };
            c.check(&format!("{how}, first client {}: the next client ({same}) finds none of it", if stays { "stays" } else { "left" }), clean, r.summary());
            b.close().await;
            if let Some(a) = a {
                a.close().await;
            }
            p.stop().await;
        }
    }
    // session pooling: the client keeps its backend, and its session is what it would be on a
    // direct connection, where the server skipped the DISCARD ALL with the rest of the batch: its
    // named statement and its setting are still there (PostgreSQL answers a second Parse of the
    // name with 42P05). A DISCARD ALL in a clean batch then does discard them.
    let p = start_proxy(env, "pool_size = 1", "[pool]\nmode = \"session\"").await;
    let mut a = login(&p, 1, "alice").await?;
    let r = a.round(&[wire::parse("s1", "select 1", &[]), wire::sync()].concat(), 1).await;
    c.check("session mode: a named statement", r.ok(), r.summary());
    let r = a.simple("select set_config('app.custom', 'tenant-1', false)").await;
    c.check("session mode: a custom setting", r.ok(), r.summary());
    let batch = [wire::parse("bad", "selec", &[]), wire::parse("", "DISCARD ALL", &[]), wire::bind("", "", &[]), wire::execute("", 0), wire::sync()].concat();
    let r = a.round(&batch, 1).await;
    c.check("session mode: the batch fails at its first message", r.code() == Some("42601") && r.errors.len() == 1, r.summary());
    let r = a.round(&[wire::parse("s1", "select 2", &[]), wire::sync()].concat(), 1).await;
    c.check("session mode: the statement is still there (42P05 for a second Parse, as PostgreSQL answers)", r.code() == Some("42P05"), r.summary());
    let r = a.round(&[wire::bind("", "s1", &[]), wire::execute("", 0), wire::sync()].concat(), 1).await;
    c.check("session mode: the statement still runs", r.ok() && r.get(0, 0) == "1", r.summary());
    let r = a.simple(state).await;
    c.check("session mode: the setting is still there", r.ok() && r.get(0, 0) == "tenant-1", r.summary());
    let r = a.round(&[wire::parse("", "DISCARD ALL", &[]), wire::bind("", "", &[]), wire::execute("", 0), wire::sync()].concat(), 1).await;
    c.check("session mode: DISCARD ALL in a clean batch", r.ok() && r.tags == ["DISCARD ALL"], r.summary());
    let r = a.round(&[wire::bind("", "s1", &[]), wire::execute("", 0), wire::sync()].concat(), 1).await;
    c.check("session mode: then the statement is gone (26000)", r.code() == Some("26000"), r.summary());
    let r = a.simple(state).await;
    c.check("session mode: and the setting", r.ok() && r.get(0, 0).is_empty(), r.summary());
    a.close().await;
    p.stop().await;
    let after = victim(env);
    c.check("tenant 2's rows unchanged", before == after, format!("{before} -> {after}"));
    c.done()
}

/// A message pgtenant must hold until the replies before it are in, sent inside an unsynced batch:
/// the server keeps a batch's replies until a Sync or a Flush, so pgtenant asks for them with a
/// Flush of its own rather than wait for a Sync the client will not send before its answer.
pub async fn held_inside_a_batch(env: &Env) -> TestResult {
    let mut c = Checks::new("held_inside_a_batch");
    let before = victim(env);
    let p = start_proxy(env, "pool_size = 1", "").await;
    let mut a = login(&p, 1, "alice").await?;
    // a query string going on after COMMIT is refused, once pgtenant knows where the backend is
    let pending = [wire::parse("", "select 1", &[]), wire::bind("", "", &[]), wire::execute("", 0)].concat();
    let r = a.round(&[pending.clone(), wire::query("commit; select 2")].concat(), 1).await;
    c.check(
        "a query string after COMMIT, behind an unsynced Execute: the Execute's row, then the refusal",
        r.get(0, 0) == "1" && r.rows.len() == 1 && r.code() == Some("0A000") && r.readies.len() == 1,
        r.summary(),
    );
    let r = a.round(&wire::sync(), 1).await;
    c.check("the client's Sync is answered", r.ok() && r.readies == [b'I'], r.summary());
    // DISCARD ALL by Execute behind messages whose outcome is not known yet
    let r = a.round(&[wire::parse("s1", "select 3", &[]), wire::sync()].concat(), 1).await;
    c.check("a named statement", r.ok(), r.summary());
    let batch = [wire::parse("", "DISCARD ALL", &[]), wire::bind("", "", &[]), wire::execute("", 0), wire::sync()].concat();
    let r = a.round(&batch, 1).await;
    c.check("DISCARD ALL by Execute, behind its own Parse and Bind", r.ok() && r.tags == ["DISCARD ALL"], r.summary());
    let r = a.round(&[wire::bind("", "s1", &[]), wire::execute("", 0), wire::sync()].concat(), 1).await;
    c.check("it discarded the named statement (26000)", r.code() == Some("26000"), r.summary());
    // behind a batch whose Sync is not answered yet, whether the next one begins inside a
    // transaction block is not known: a session SET in it (kept only outside one) and DISCARD ALL
    // (answered by pgtenant only outside one) wait for that answer
    let first = [wire::parse("", "select 1", &[]), wire::bind("", "", &[]), wire::execute("", 0), wire::sync()].concat();
    let set = [wire::parse("", "SET work_mem = '8MB'", &[]), wire::bind("", "", &[]), wire::execute("", 0), wire::sync()].concat();
    let r = a.round(&[first.clone(), set].concat(), 2).await;
    c.check("a session SET by Execute in a batch pipelined behind another", r.ok() && r.tags == ["SELECT 1", "SET"], r.summary());
    let r = a.round(&[first.clone(), wire::query("SET statement_timeout = '7s'")].concat(), 2).await;
    c.check("a session SET by Query pipelined behind a batch", r.ok() && r.tags == ["SELECT 1", "SET"], r.summary());
    // another client takes the backend (and resets it) in between
    let mut b = login(&p, 2, "bob").await?;
    let r = b.simple("show work_mem").await;
    c.check("the next client does not have them", r.ok() && r.get(0, 0) != "8MB", r.summary());
    b.close().await;
    let r = a.simple("select current_setting('work_mem'), current_setting('statement_timeout')").await;
    c.check("both are kept for the client's later transactions", r.ok() && r.get(0, 0) == "8MB" && r.get(0, 1) == "7s", r.summary());
    let r = a.round(&[wire::parse("s2", "select 4", &[]), wire::sync()].concat(), 1).await;
    c.check("another named statement", r.ok(), r.summary());
    let discard = [wire::parse("", "DISCARD ALL", &[]), wire::bind("", "", &[]), wire::execute("", 0), wire::sync()].concat();
    let r = a.round(&[first, discard].concat(), 2).await;
    c.check("DISCARD ALL by Execute pipelined behind a batch", r.ok() && r.tags == ["SELECT 1", "DISCARD ALL"], r.summary());
    let r = a.round(&[wire::bind("", "s2", &[]), wire::execute("", 0), wire::sync()].concat(), 1).await;
    c.check("it discarded the named statement (26000)", r.code() == Some("26000"), r.summary());
    let r = a.simple("show work_mem").await;
    c.check("and the setting", r.ok() && r.get(0, 0) != "8MB", r.summary());
    still_tenant_one(&mut a, &mut c, "after the held messages").await;
    a.close().await;
    // A simple Query inside an unsynced batch waits for the batch's answers (whether the server
    // skips it depends on them). If the batch starts a COPY FROM STDIN instead, the Query came
    // during the COPY, and the data behind it cannot pass it: the session ends with 08P01 (as on
    // the server), at once, and frees its backend; it must not hang.
    env.cluster
        .psql("app", "CREATE TABLE IF NOT EXISTS held_copy (n int); GRANT INSERT ON held_copy TO app_user;")
        .map_err(|e| format!("creating held_copy: {e}"))?;
    let mut d = login(&p, 1, "dave").await?;
    let copy = [wire::parse("", "COPY held_copy (n) FROM STDIN", &[]), wire::bind("", "", &[]), wire::execute("", 0)].concat();
    d.send(&[copy, wire::query("select 1"), wire::copy_data(b"1\n"), wire::copy_done(), wire::sync()].concat()).await?;
    let started = std::time::Instant::now();
    let r = d.drain_for(Duration::from_secs(5)).await;
    c.check(
        "a Query held inside a batch that starts COPY FROM STDIN: 08P01 and the session ends, at once",
        r.code() == Some("08P01") && r.closed && started.elapsed() < Duration::from_secs(4),
        format!("{} after {:?}", r.summary(), started.elapsed()),
    );
    next_client_is(&p, 2, &mut c, "after the COPY that met a held Query", Duration::from_secs(5)).await;
    let copied = env.cluster.psql("app", "select count(*) from held_copy").unwrap_or_default();
    c.check("nothing was copied", copied.trim() == "0", copied);
    finish(env, p, c, &before, "held_inside_a_batch").await
}

/// The server keeps one unnamed statement per connection, and pgtenant forwards the client's as it
/// is: a Bind of the unnamed statement must run the client's own, never what another session (or
/// pgtenant) left on the backend it now has, and a client with none gets 26000 as from the server.
pub async fn unnamed_statement_is_the_clients(env: &Env) -> TestResult {
    let mut c = Checks::new("unnamed_statement_is_the_clients");
    let before = victim(env);
    let run = || [wire::bind("", "", &[]), wire::execute("", 0), wire::sync()].concat();
    for session in [false, true] {
        let mode = if session { "session" } else { "transaction" };
        let p = start_proxy(env, if session { "pool_size = 2" } else { "pool_size = 1" }, if session { "[pool]\nmode = \"session\"" } else { "" }).await;
        let mut a = login(&p, 1, "alice").await?;
        let r = a.round(&[wire::parse("", "select 'mine'", &[]), wire::sync()].concat(), 1).await;
        c.check(&format!("{mode}: A parses its unnamed statement"), r.ok(), r.summary());
        let mut b = login(&p, 2, "bob").await?;
        let r = b.round(&run(), 1).await;
        c.check(&format!("{mode}: B, which parsed none, gets 26000"), r.code() == Some("26000") && r.rows.is_empty(), r.summary());
        let r = b.round(&[wire::parse("", "select 'theirs'", &[]), wire::bind("", "", &[]), wire::execute("", 0), wire::sync()].concat(), 1).await;
        c.check(&format!("{mode}: B runs its own"), r.ok() && r.get(0, 0) == "theirs", r.summary());
        let r = a.round(&run(), 1).await;
        c.check(&format!("{mode}: A's Bind runs A's statement, wherever it runs"), r.ok() && r.get(0, 0) == "mine", r.summary());
        // a simple Query drops the unnamed statement, on the server and here
        let r = a.simple("select 1").await;
        c.check(&format!("{mode}: a simple query"), r.ok(), r.summary());
        let r = a.round(&run(), 1).await;
        c.check(&format!("{mode}: after it, A has no unnamed statement (26000)"), r.code() == Some("26000"), r.summary());
        a.close().await;
        b.close().await;
        p.stop().await;
    }
    let after = victim(env);
    c.check("tenant 2's rows unchanged", before == after, format!("{before} -> {after}"));
    c.done()
}

/// The server checks a Bind's parameter counts before it refuses anything in an aborted
/// transaction, so a wrong count gets 08P01 there, not 25P02. pgtenant may have to send something
/// in front of that Bind (a Parse of the statement on a backend that lacks it, or the context
/// speculatively behind an unanswered batch) that would fail with 25P02 first: it answers the
/// counts itself, with the server's message.
pub async fn bind_counts_before_an_aborted_transaction(env: &Env) -> TestResult {
    let mut c = Checks::new("bind_counts_before_an_aborted_transaction");
    let before = victim(env);
    let p = start_proxy(env, "pool_size = 1", "[pool]\nprepared_statements_cache = 1").await;
    let mut a = login(&p, 1, "alice").await?;
    let r = a.round(&[wire::parse("s1", "select $1::int + 1", &[]), wire::sync()].concat(), 1).await;
    c.check("a statement with one parameter", r.ok(), r.summary());
    // another client's statement takes its place in the backend's cache (of one): s1 must be
    // prepared again where A runs next
    let mut b = login(&p, 2, "bob").await?;
    let r = b.round(&[wire::parse("b1", "select 2", &[]), wire::sync()].concat(), 1).await;
    c.check("another client's statement in between", r.ok(), r.summary());
    b.close().await;
    let r = a.simple("begin; select 1/0").await;
    c.check("a transaction block that failed", r.code() == Some("22012") && r.status() == b'E', r.summary());
    for (what, params) in [("no parameter", &[][..]), ("two parameters", &[Some("1"), Some("2")][..])] {
        let r = a.round(&[wire::bind("", "s1", params), wire::execute("", 0), wire::sync()].concat(), 1).await;
        let want = format!("bind message supplies {} parameters, but prepared statement \"s1\" requires 1", params.len());
        c.check(&format!("{what}: 08P01, as from the server"), r.code() == Some("08P01") && r.summary().contains(&want), r.summary());
    }
    let r = a.round(&[wire::bind("", "s1", &[Some("1")]), wire::execute("", 0), wire::sync()].concat(), 1).await;
    c.check("the right count: 25P02, as from the server", r.code() == Some("25P02"), r.summary());
    let r = a.simple("rollback").await;
    c.check("rolled back", r.ok() && r.status() == b'I', r.summary());
    let r = a.round(&[wire::bind("", "s1", &[Some("41")]), wire::execute("", 0), wire::sync()].concat(), 1).await;
    c.check("then the statement runs", r.ok() && r.get(0, 0) == "42", r.summary());
    still_tenant_one(&mut a, &mut c, "after the refusals").await;
    a.close().await;
    finish(env, p, c, &before, "bind_counts_before_an_aborted_transaction").await
}

/// A session-level SET is the client's for its later transactions only when the server would have
/// kept it: its transaction committed. Each case runs on a fresh client; another client then takes
/// the one backend (which resets it), so what the first finds afterwards is what pgtenant kept for
/// it. (A transaction with an error keeps none of its SETs in pgtenant, even those before a
/// savepoint the client rolled back to, which the server keeps: left out, see docs/protocol.md.)
pub async fn session_sets_as_the_server_keeps_them(env: &Env) -> TestResult {
    let mut c = Checks::new("session_sets_as_the_server_keeps_them");
    let before = victim(env);
    let p = start_proxy(env, "pool_size = 1", "").await;
    let ext = |sql: &str| [wire::parse("", sql, &[]), wire::bind("", "", &[]), wire::execute("", 0)].concat();
    let set = "SET work_mem = '8MB'";
    let cases: Vec<(&str, Vec<u8>, usize, bool)> = vec![
        ("one batch: SET", [ext(set), wire::sync()].concat(), 1, true),
        ("one batch: BEGIN, SET, COMMIT", [ext("BEGIN"), ext(set), ext("COMMIT"), wire::sync()].concat(), 1, true),
        ("one batch: BEGIN, SET, ROLLBACK", [ext("BEGIN"), ext(set), ext("ROLLBACK"), wire::sync()].concat(), 1, false),
        ("one batch: SET, then a failure", [ext(set), ext("select 1/0"), wire::sync()].concat(), 1, false),
        ("batches: BEGIN | SET | ROLLBACK", [ext("BEGIN"), wire::sync(), ext(set), wire::sync(), ext("ROLLBACK"), wire::sync()].concat(), 3, false),
        ("query: BEGIN; SET; ROLLBACK", wire::query(&format!("BEGIN; {set}; ROLLBACK")), 1, false),
        ("query: BEGIN; SET; COMMIT", wire::query(&format!("BEGIN; {set}; COMMIT")), 1, true),
        ("query: SAVEPOINT, SET, ROLLBACK TO", wire::query(&format!("BEGIN; SAVEPOINT a; {set}; ROLLBACK TO a; COMMIT")), 1, false),
        ("batches: BEGIN | SET | COMMIT", [ext("BEGIN"), wire::sync(), ext(set), wire::sync(), ext("COMMIT"), wire::sync()].concat(), 3, true),
        ("a Query inside an unsynced batch", [ext("select 1"), wire::query(set), wire::sync()].concat(), 2, true),
        // psycopg's default (not autocommit): every statement inside a block it opens
        ("queries: BEGIN | SET | COMMIT", [wire::query("BEGIN"), wire::query(set), wire::query("COMMIT")].concat(), 3, true),
        ("queries: BEGIN | SET | ROLLBACK", [wire::query("BEGIN"), wire::query(set), wire::query("ROLLBACK")].concat(), 3, false),
        ("queries: BEGIN | SET | error | ROLLBACK", [wire::query("BEGIN"), wire::query(set), wire::query("select 1/0"), wire::query("ROLLBACK")].concat(), 4, false),
        ("queries: BEGIN | SET | error | COMMIT", [wire::query("BEGIN"), wire::query(set), wire::query("select 1/0"), wire::query("COMMIT")].concat(), 4, false),
        ("queries: BEGIN | SAVEPOINT a | SET | ROLLBACK TO a | COMMIT", [wire::query("BEGIN"), wire::query("SAVEPOINT a"), wire::query(set), wire::query("ROLLBACK TO SAVEPOINT a"), wire::query("COMMIT")].concat(), 5, false),
        ("queries: BEGIN | SAVEPOINT a | SET | RELEASE a | COMMIT", [wire::query("BEGIN"), wire::query("SAVEPOINT a"), wire::query(set), wire::query("RELEASE a"), wire::query("COMMIT")].concat(), 5, true),
        ("queries: BEGIN | SET | SAVEPOINT a | ROLLBACK TO a | COMMIT", [wire::query("BEGIN"), wire::query(set), wire::query("SAVEPOINT a"), wire::query("ROLLBACK TO a"), wire::query("COMMIT")].concat(), 5, true),
        ("one batch: SAVEPOINT a, SET, ROLLBACK TO a in a block", [ext("BEGIN"), ext("SAVEPOINT a"), ext(set), ext("ROLLBACK TO a"), ext("COMMIT"), wire::sync()].concat(), 1, false),
    ];
    for (what, bytes, readies, kept) in cases {
        let mut a = login(&p, 1, "alice").await?;
        let r = a.round(&bytes, readies).await;
        c.check(&format!("{what}: ran"), r.readies.len() == readies && r.status() == b'I', r.summary());
        let mut b = login(&p, 2, "bob").await?;
        let r = b.simple("show work_mem").await;
        c.check(&format!("{what}: the next client has the default"), r.ok() && r.get(0, 0) != "8MB", r.summary());
        b.close().await;
        let r = a.simple("show work_mem").await;
        let want = if kept { "kept, as the server keeps it" } else { "not kept, as the server drops it" };
        c.check(&format!("{what}: {want}"), r.ok() && (r.get(0, 0) == "8MB") == kept, r.summary());
        a.close().await;
    }
    finish(env, p, c, &before, "session_sets_as_the_server_keeps_them").await
}

/// In session pooling SQL `PREPARE` works as directly, and on the server its names and the
/// protocol's are one namespace: a protocol `Close` of a statement only SQL `PREPARE` made closes
/// it, as directly (pgtenant answered every named `Close` itself, leaving it defined). A `Close`
/// of a name the client has nothing under is harmless in both pool modes.
pub async fn close_of_an_sql_prepared_statement(env: &Env) -> TestResult {
    let mut c = Checks::new("close_of_an_sql_prepared_statement");
    let p = start_proxy(env, "pool_size = 2", "[pool]\nmode = \"session\"").await;
    let mut a = login(&p, 1, "alice").await?;
    let r = a.simple("PREPARE sq AS select 41 + 1").await;
    c.check("session: SQL PREPARE", r.ok(), r.summary());
    // (into a named portal: docs/protocol.md, "Remaining differences", for the unnamed one)
    let r = a.round(&[wire::bind("p", "sq", &[]), wire::execute("p", 0), wire::sync()].concat(), 1).await;
    c.check("session: the protocol binds it", r.ok() && r.get(0, 0) == "42", r.summary());
    let r = a.round(&[wire::close(b'S', "sq"), wire::sync()].concat(), 1).await;
    c.check("session: a protocol Close of it", r.ok(), r.summary());
    let r = a.simple("EXECUTE sq").await;
    c.check("session: it is gone, as directly (26000)", r.code() == Some("26000"), r.summary());
    let r = a.round(&[wire::parse("s1", "select 1", &[]), wire::close(b'S', "s1"), wire::close(b'S', "nosuch"), wire::sync()].concat(), 1).await;
    c.check("session: Close of its own statement and of nothing", r.ok(), r.summary());
    a.close().await;
    p.stop().await;
    let p = start_proxy(env, "pool_size = 1", "").await;
    let mut a = login(&p, 1, "alice").await?;
    let r = a.round(&[wire::close(b'S', "nosuch"), wire::sync()].concat(), 1).await;
    c.check("transaction: Close of nothing is answered (CloseComplete)", r.ok() && r.trace.contains('3'), r.summary());
    a.close().await;
    p.stop().await;
    c.done()
}
