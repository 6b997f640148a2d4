//! Multi-tenant traffic control (issue 9) against the real cluster: fair queuing between tenants,
//! per-tenant limits and their errors, `/tenants` and the bounded tenant metrics, the trusted
//! bypass pool (both directions), and the audit log (records, fingerprints, rotation, failure).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

/// The quiet tenant's bound in the flood test. A FIFO pool would make it wait behind the whole
/// flood: 200 clients × 100 ms / 4 connections = 5 s.
const QUIET_P99_BOUND: Duration = Duration::from_millis(1000);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn admin_json(p: &pgtenant::server::Running, path: &str) -> Result<Value, String> {
    let (code, body) = crate::http_get(p.admin_addr.ok_or("no admin endpoint")?, path).await?;
    ensure(code == 200, format!("{path}: HTTP {code}: {body}"))?;
    serde_json::from_str(&body).map_err(|e| format!("{path}: {e}: {body}"))
}

/// `n` clients of `tenant`, each running `sql` in a loop until `stop`; each task returns how many
/// times it ran.
async fn loop_clients(
    p: &pgtenant::server::Running,
    tenant: i64,
    n: usize,
    sql: &'static str,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<Vec<tokio::task::JoinHandle<Result<u32, String>>>, String> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let c = connect(p, &token(tenant, &format!("loop{i}"))).await.map_err(|e| format!("tenant {tenant} login {i}: {e:?}"))?;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.simple_query(sql).await.map_err(|e| format!("tenant {tenant} {sql}: {e:?}"))?;
                done += 1;
            }
            Ok(done)
        }));
    }
    Ok(tasks)
}

fn tenant_entry<'a>(v: &'a Value, tenant: &str) -> Option<&'a Value> {
    v["tenants"].as_array()?.iter().find(|t| t["tenant"] == tenant)
}

pub async fn fair_queuing_protects_a_quiet_tenant(env: &Env) -> TestResult {
    let p = start_proxy(
        env,
        "pool_size = 4",
        "[pool]\nquery_wait_timeout_ms = 60000\n[admin]\nlisten = \"127.0.0.1:0\"\nmetrics_tenants = [\"2\"]",
    )
    .await;
    // tenant 1 floods: 200 clients of 100 ms transactions in a loop
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = loop_clients(&p, 1, 200, "select pg_sleep(0.1)", &stop).await?;
    // wait until the flood has queued up behind the pool
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = admin_json(&p, "/tenants").await?;
        let waiting = tenant_entry(&t, "1").and_then(|e| e["waiting"].as_u64()).unwrap_or(0);
        if waiting >= 150 {
            break;
        }
        ensure(Instant::now() < deadline, format!("the flood never queued up: {t}"))?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // tenant 2's one client: every query must get a connection in its turn, not after the flood
    let quiet = connect(&p, &token(2, "quiet")).await.map_err(|e| format!("{e:?}"))?;
    let mut lat = Vec::new();
    for _ in 0..40 {
        let t0 = Instant::now();
        let (n, lo, hi) = crate::tenant_view(&quiet).await?;
        lat.push(t0.elapsed());
        ensure(n == 100 && lo == 2 && hi == 2, format!("quiet tenant saw {n} rows of {lo}..{hi}"))?;
    }
    let during = admin_json(&p, "/tenants?by=waiting&top=1").await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut noisy_done = 0;
    for f in flood {
        noisy_done += f.await.map_err(|e| e.to_string())??;
    }
    lat.sort();
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    println!("    quiet tenant under a 200-client flood: p50 {p50:?}, p99 {p99:?} (bound {QUIET_P99_BOUND:?}); flood ran {noisy_done} transactions");
    ensure(p99 < QUIET_P99_BOUND, format!("quiet tenant p99 {p99:?} over {QUIET_P99_BOUND:?} (p50 {p50:?})"))?;
    ensure(noisy_done > 100, format!("the flood itself starved: {noisy_done} transactions"))?;
    // /tenants: top-1 by waiting is the flood; the quiet tenant's transactions were counted
    let top = during["tenants"].as_array().ok_or("no tenants")?;
    ensure(top.len() == 1 && top[0]["tenant"] == "1" && top[0]["waiting"].as_u64() > Some(100), format!("/tenants?by=waiting&top=1: {during}"))?;
    let after = admin_json(&p, "/tenants").await?;
    let q = tenant_entry(&after, "2").ok_or(format!("tenant 2 missing: {after}"))?;
    ensure(q["transactions"].as_u64() >= Some(40) && q["active"] == 0 && q["waiting"] == 0, format!("tenant 2: {q}"))?;
    ensure(after["pool_size"] == 4 && after["tracked"].as_u64() >= Some(2), format!("{after}"))?;
    // metrics: only the opted-in tenant has series
    let (_, metrics) = crate::http_get(p.admin_addr.unwrap(), "/metrics").await?;
    ensure(metrics.contains("pgtenant_tenant_transactions_total{tenant=\"2\"}"), "tenant 2 series missing")?;
    ensure(!metrics.contains("tenant=\"1\""), "tenant 1 has series although it was not opted in")?;
    // with metrics_top_tenants = 1 the busiest tenant appears too, and only it
    let mut cfg = pgtenant::config::Config::from_toml(&config_text(env, "pool_size = 4", "[admin]\nmetrics_top_tenants = 1"), &|_| None)
        .map_err(|e| e.to_string())?;
    cfg.admin.listen = None;
    p.proxy.reload(&cfg).await?;
    let (_, metrics) = crate::http_get(p.admin_addr.unwrap(), "/metrics").await?;
    let tenants: std::collections::BTreeSet<&str> =
        metrics.lines().filter_map(|l| l.strip_prefix("pgtenant_tenant_transactions_total{tenant=\"")).filter_map(|l| l.split('"').next()).collect();
    ensure(tenants.len() == 1 && tenants.contains("1"), format!("top-1 series: {tenants:?}"))?;
    let (code, _) = crate::http_get(p.admin_addr.unwrap(), "/tenants?by=nonsense").await?;
    ensure(code == 400, format!("bad /tenants parameter answered {code}"))?;
    p.stop().await;
    Ok(())
}

/// A tenant with long transactions must not collect every connection while another tenant's short
/// transactions wait: each freed connection goes to the waiting tenant holding the fewest. With
/// turns alone, tenant 1 would end up holding all 4 connections and tenant 2 would get one only on
/// every other release of a 300 ms transaction (hundreds of ms per query).
pub async fn long_transactions_do_not_crowd_out_short_ones(env: &Env) -> TestResult {
    let p = start_proxy(env, "pool_size = 4", "[pool]\nquery_wait_timeout_ms = 60000").await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let long = loop_clients(&p, 1, 8, "select pg_sleep(0.3)", &stop).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut short = Vec::new();
    for i in 0..4 {
        let c = connect(&p, &token(2, &format!("short{i}"))).await.map_err(|e| format!("{e:?}"))?;
        short.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for q in 0..30 {
                let t0 = Instant::now();
                c.simple_query("select count(*) from orders").await.map_err(|e| format!("short: {e:?}"))?;
                if q > 0 {
                    lat.push(t0.elapsed()); // the first one waits for a long transaction to end
                }
            }
            Ok::<Vec<Duration>, String>(lat)
        }));
    }
    let mut lat = Vec::new();
    for s in short {
        lat.extend(s.await.map_err(|e| e.to_string())??);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in long {
        l.await.map_err(|e| e.to_string())??;
    }
    lat.sort();
    let (p50, p90) = (percentile(&lat, 0.5), percentile(&lat, 0.9));
    println!("    short transactions beside 8 clients of 300 ms ones on a pool of 4: p50 {p50:?}, p90 {p90:?}");
    ensure(p90 < Duration::from_millis(150), format!("short transactions crowded out: p50 {p50:?}, p90 {p90:?}"))?;
    p.stop().await;
    Ok(())
}

pub async fn tenant_limits_wait_or_refuse(env: &Env) -> TestResult {
    let p = start_proxy(
        env,
        "pool_size = 6",
        "[pool]\nquery_wait_timeout_ms = 1500\n[limits]\nmax_active_per_tenant = 2\nmax_waiting_per_tenant = 3\n[limits.tenants.\"2\"]\nmax_active = 1",
    )
    .await;
    let proxy = &p;
    let c1 = |i: usize| async move { connect(proxy, &token(1, &format!("u{i}"))).await };
    let holders = [c1(0).await.map_err(|e| format!("{e:?}"))?, c1(1).await.map_err(|e| format!("{e:?}"))?];
    for h in &holders {
        h.batch_execute("BEGIN; SELECT 1").await.map_err(|e| format!("{e:?}"))?;
    }
    // tenant 1 is at its limit: a third transaction waits although 4 connections are free, then
    // gets 53300 naming the limit
    let third = c1(2).await.map_err(|e| format!("{e:?}"))?;
    let t0 = Instant::now();
    let e = third.simple_query("select 1").await.err().ok_or("a third transaction of tenant 1 ran")?;
    let (code, msg) = db_err(&e);
    ensure(code == "53300" && msg.contains("limits.max_active_per_tenant = 2") && msg.contains("tenant \"1\""), format!("{code} {msg}"))?;
    ensure(t0.elapsed() >= Duration::from_millis(1400), format!("gave up after {:?}, not the wait timeout", t0.elapsed()))?;
    // other tenants are not held back meanwhile
    let other = connect(&p, &token(3, "o")).await.map_err(|e| format!("{e:?}"))?;
    let t0 = Instant::now();
    crate::tenant_view(&other).await?;
    ensure(t0.elapsed() < Duration::from_millis(1000), format!("tenant 3 waited {:?}", t0.elapsed()))?;
    // three may queue; the fourth is refused at once
    let mut queued = Vec::new();
    for i in 0..3 {
        let c = c1(10 + i).await.map_err(|e| format!("{e:?}"))?;
        queued.push(tokio::spawn(async move { c.simple_query("select 1").await.map(|_| ()).map_err(|e| db_err(&e)) }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let e = third.simple_query("select 1").await.err().ok_or("a fourth waiting transaction was queued")?;
    let (code, msg) = db_err(&e);
    ensure(
        code == "53300" && msg.contains("already has 3 transactions waiting") && msg.contains("limits.max_waiting_per_tenant = 3"),
        format!("{code} {msg}"),
    )?;
    ensure(t0.elapsed() < Duration::from_millis(500), format!("max_waiting refusal took {:?}", t0.elapsed()))?;
    // ending one holder's transaction lets the queued ones in, one at a time within the limit
    holders[0].batch_execute("COMMIT").await.map_err(|e| format!("{e:?}"))?;
    for q in queued {
        q.await.map_err(|e| e.to_string())?.map_err(|e| format!("queued transaction failed: {e:?}"))?;
    }
    // the override: tenant 2 may run one at a time
    let a = connect(&p, &token(2, "a")).await.map_err(|e| format!("{e:?}"))?;
    let b = connect(&p, &token(2, "b")).await.map_err(|e| format!("{e:?}"))?;
    a.batch_execute("BEGIN; SELECT 1").await.map_err(|e| format!("{e:?}"))?;
    let e = b.simple_query("select 1").await.err().ok_or("tenant 2 ran two at once")?;
    let (code, msg) = db_err(&e);
    ensure(code == "53300" && msg.contains("limits.tenants.\"2\".max_active = 1"), format!("{code} {msg}"))?;
    // a reload raising the limit lets tenant 2's next transaction in while `a` still holds one
    let text = config_text(env, "pool_size = 6", "[pool]\nquery_wait_timeout_ms = 1500\n[limits]\nmax_active_per_tenant = 2");
    p.proxy.reload(&pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|e| e.to_string())?).await?;
    crate::tenant_view(&b).await?;
    a.batch_execute("COMMIT").await.map_err(|e| format!("{e:?}"))?;
    // the refused sessions are still usable
    let (n, lo, _) = crate::tenant_view(&third).await?;
    ensure(n == 100 && lo == 1, "refused session not usable afterwards")?;
    holders[1].batch_execute("COMMIT").await.map_err(|e| format!("{e:?}"))?;
    p.stop().await;
    Ok(())
}

pub(crate) const BYPASS_SECRET: &str = "bypass-secret-9876543210";

pub(crate) fn bypass_token(claims: Value) -> String {
    pgtenant::jwt::mint_hs(&claims, BYPASS_SECRET.as_bytes(), jsonwebtoken::Algorithm::HS256)
}

pub(crate) fn audit_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}")))
        .collect()
}

pub async fn bypass_pool_and_audit_log(env: &Env) -> TestResult {
    // a least-privilege role that bypasses RLS, for the workers
    let _ = env.cluster.psql("app", "CREATE ROLE worker LOGIN PASSWORD 'worker-secret' BYPASSRLS");
    env.cluster
        .psql("app", "GRANT USAGE ON SCHEMA public TO worker; GRANT SELECT, UPDATE ON orders TO worker")
        .map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let audit = dir.path().join("audit.jsonl");
    let sections = |audit_path: &str| {
        format!(
            "[bypass]\nenabled = true\nurl = \"{}\"\n[bypass.jwt]\nsecret = \"{BYPASS_SECRET}\"\n[audit]\npath = \"{audit_path}\"",
            env.cluster.url("worker", "worker-secret", "app")
        )
    };
    let text = config_text(env, "", &sections(&audit.display().to_string()));
    let p = start_proxy(env, "", &format!("{}\n[admin]\nlisten = \"127.0.0.1:0\"", sections(&audit.display().to_string()))).await;

    // a worker's token: signed by the bypass key with role = service; it sees every tenant
    let worker = connect(&p, &bypass_token(json!({ "role": "service", "sub": "worker-1", "exp": now() + 600 })))
        .await
        .map_err(|e| format!("worker login: {e:?}"))?;
    let rows = worker
        .simple_query("select count(distinct tenant_id) from orders where user_sub <> 'literal-never-logged'")
        .await
        .map_err(|e| format!("{e:?}"))?;
    let distinct = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    ensure(distinct.as_deref().and_then(|d| d.parse::<i64>().ok()) >= Some(2), format!("worker saw tenants: {distinct:?}"))?;
    let n: i64 = worker.query_one("select count(*) from orders where tenant_id = $1", &[&2i32]).await.map_err(|e| format!("{e:?}"))?.get(0);
    ensure(n == 100, format!("worker saw {n} rows of tenant 2 over the extended protocol"))?;

    // cancel reaches the worker's backend on the bypass server
    expect_cancelled(&worker, "select pg_sleep(20)", Duration::from_millis(300)).await?;

    // the admin endpoint shows the bypass pool apart from the tenants
    let t = admin_json(&p, "/tenants").await?;
    ensure(t["bypass"]["transactions"].as_u64() >= Some(2) && t["tenants"].as_array().is_some_and(|a| a.is_empty()), format!("/tenants: {t}"))?;
    let pools = admin_json(&p, "/pools").await?;
    ensure(pools["pools"][1]["name"] == "bypass" && pools["pools"][1]["backend"].as_str().is_some_and(|b| b.contains("worker")), format!("/pools: {pools}"))?;

    // ordinary tokens never reach it: the bypass claim signed by the tenant key is refused…
    let forged = token_with(json!({ "tenant_id": 1, "sub": "mallory", "role": "service", "exp": now() + 600 }));
    let e = connect(&p, &forged).await.err().ok_or("a tenant-key token with the bypass claim got in")?;
    let (code, msg) = db_err(&e);
    ensure(code == "28000" && msg.contains("not signed by the bypass key"), format!("{code} {msg}"))?;
    // …the bypass key without the claim is not a tenant key…
    let e = connect(&p, &bypass_token(json!({ "tenant_id": 1, "sub": "x", "role": "admin", "exp": now() + 600 })))
        .await
        .err()
        .ok_or("a bypass-key token without the claim got in")?;
    ensure(db_err(&e).0 == "28P01", format!("{:?}", db_err(&e)))?;
    // …and an ordinary tenant token stays inside its tenant
    let tenant = connect(&p, &token(1, "alice")).await.map_err(|e| format!("{e:?}"))?;
    let (n, lo, hi) = crate::tenant_view(&tenant).await?;
    ensure(n == 100 && lo == 1 && hi == 1, format!("tenant 1 saw {n} rows of {lo}..{hi}"))?;
    // a refused statement is audited as a fingerprint
    let e = tenant.simple_query("select set_config('app.tenant_id', '2', false)").await.err().ok_or("guard let set_config through")?;
    ensure(db_err(&e).0 == "42501", format!("{:?}", db_err(&e)))?;

    let lines = audit_lines(&audit);
    let find = |pred: &dyn Fn(&Value) -> bool| lines.iter().find(|l| pred(l)).cloned();
    let login = find(&|l| l["event"] == "login" && l["pool"] == "bypass").ok_or(format!("no bypass login in {lines:?}"))?;
    ensure(login["subject"] == "worker-1" && login["result"] == "ok" && login["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.1:")), format!("{login}"))?;
    let simple = find(&|l| l["event"] == "bypass_statement" && l["protocol"] == "simple").ok_or("no simple bypass statement")?;
    ensure(
        simple["statement"] == "select count(distinct tenant_id) from orders where user_sub <> ?" && simple["fingerprint"].as_str().map(str::len) == Some(16),
        format!("{simple}"),
    )?;
    let ext = find(&|l| l["event"] == "bypass_statement" && l["protocol"] == "extended").ok_or("no extended bypass statement")?;
    ensure(ext["statement"] == "select count(*) from orders where tenant_id = $1", format!("{ext}"))?;
    find(&|l| l["event"] == "login" && l["result"] == "refused" && l["sqlstate"] == "28000").ok_or("forged login not audited")?;
    let tenant_login = find(&|l| l["event"] == "login" && l["pool"] == "tenant").ok_or("tenant login not audited")?;
    ensure(tenant_login["tenant"] == "1" && tenant_login["subject"] == "alice", format!("{tenant_login}"))?;
    let refused = find(&|l| l["event"] == "statement_refused").ok_or("refused statement not audited")?;
    ensure(
        refused["statement"] == "select set_config(?, ?, false)" && refused["guard"] == "guard" && refused["tenant"] == "1",
        format!("{refused}"),
    )?;
    let raw = std::fs::read_to_string(&audit).map_err(|e| e.to_string())?;
    for secret in ["literal-never-logged", "app.tenant_id", &forged, BYPASS_SECRET, "eyJ"] {
        ensure(!raw.contains(secret), format!("audit log contains {secret:.20}…"))?;
    }
    ensure(lines.iter().all(|l| l["ts"].as_str().is_some_and(|t| t.len() == 24 && t.ends_with('Z'))), "bad timestamps")?;

    // rotation: move the file, reload, and the next record lands in a new file
    std::fs::rename(&audit, dir.path().join("audit.jsonl.1")).map_err(|e| e.to_string())?;
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|e| e.to_string())?;
    p.proxy.reload(&cfg).await?;
    worker.simple_query("select 1").await.map_err(|e| format!("{e:?}"))?;
    let fresh = audit_lines(&audit);
    ensure(fresh.len() == 1 && fresh[0]["event"] == "bypass_statement", format!("after rotation: {fresh:?}"))?;

    // an audit log that cannot be written stops bypass statements and logins, not tenants
    let full = pgtenant::config::Config::from_toml(&config_text(env, "", &sections("/dev/full")), &|_| None).map_err(|e| e.to_string())?;
    p.proxy.reload(&full).await?;
    let e = worker.simple_query("select 1").await.err().ok_or("bypass statement ran without an audit record")?;
    let (code, msg) = db_err(&e);
    ensure(code == "58030" && msg.contains("audit log cannot be written"), format!("{code} {msg}"))?;
    crate::tenant_view(&tenant).await?;
    let e = connect(&p, &bypass_token(json!({ "role": "service", "sub": "worker-2", "exp": now() + 600 }))).await.err().ok_or("bypass login without audit")?;
    ensure(db_err(&e).0 == "58030", format!("{:?}", db_err(&e)))?;
    p.proxy.reload(&cfg).await?;
    worker.simple_query("select 1").await.map_err(|e| format!("worker after the log came back: {e:?}"))?;

    // turning bypass off on reload stops new bypass logins at once; open sessions go on
    let off_text = config_text(env, "", &format!("[audit]\npath = \"{}\"", audit.display()));
    let off = pgtenant::config::Config::from_toml(&off_text, &|_| None).map_err(|e| e.to_string())?;
    p.proxy.reload(&off).await?;
    let worker_token = bypass_token(json!({ "role": "service", "sub": "worker-3", "exp": now() + 600 }));
    let e = connect(&p, &worker_token).await.err().ok_or("bypass login after bypass was turned off")?;
    ensure(db_err(&e).0 == "28P01", format!("{:?}", db_err(&e)))?;
    worker.simple_query("select 1").await.map_err(|e| format!("open worker session after turning off: {e:?}"))?;
    p.proxy.reload(&cfg).await?;
    connect(&p, &worker_token).await.map_err(|e| format!("bypass back on: {e:?}"))?;
    // a proxy started without it cannot turn it on by reload (it has no bypass pool)
    let plain = start_proxy(env, "", "").await;
    let refused = plain.proxy.reload(&cfg).await.err().ok_or("reload turned bypass on")?.to_string();
    ensure(refused.contains("needs a restart"), refused)?;
    plain.stop().await;

    // pgtenant check warns about the bypass pool
    let file = dir.path().join("pgtenant.toml");
    std::fs::write(&file, &text).map_err(|e| e.to_string())?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgtenant")).args(["check", "--config"]).arg(&file).output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure(out.status.success() && stdout.contains("warning: [bypass] is enabled") && stdout.contains("WITHOUT row-level security"), format!("check: {stdout}"))?;
    p.stop().await;
    Ok(())
}
