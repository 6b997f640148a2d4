//! The admin console (issue 19): `dbname=pgtenant` with an admin token answers PgBouncer's SHOW
//! commands with PgBouncer's column names, RELOAD re-reads the config file, PAUSE holds new
//! transactions until RESUME (and waits for the ones in flight), KILL ends one tenant's sessions
//! and no other's, an ordinary token is refused with 28000, SHOW CONFIG shows no secret, and an
//! unknown command is an error that leaves the console usable. Real Postgres, real psql.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio_postgres::SimpleQueryMessage;

fn main() {
    run_all(tests![
        ordinary_tokens_are_refused_with_28000,
        psql_reads_show_pools_with_pgbouncer_columns,
        show_pools_lists_every_cluster_and_replica,
        show_servers_and_stats_cover_every_cluster_and_replica,
        show_clients_and_servers_list_the_tenants_session_and_its_backend,
        session_mode_lists_the_backend_given_at_login_and_cancels_reach_it,
        show_tenants_and_stats_count_transactions,
        show_config_shows_no_secret,
        show_version_and_unknown_commands,
        pause_holds_new_transactions_until_resume,
        a_paused_pool_refuses_after_the_wait_timeout,
        kill_ends_the_tenants_sessions_and_no_other,
        reload_rereads_the_config_file,
    ]);
}

const SIGNING_KEY: &str = "c2lnbmluZy1rZXktZm9yLWNvbnNvbGUtdGVzdHMtMDEyMzQ1Njc4OQ==";

fn admin_section() -> &'static str {
    "[admin]\ntoken_claim = \"pgtenant.role\"\ntoken_value = \"admin\"\n"
}

fn admin_token() -> String {
    token_with(json!({ "sub": "ops", "pgtenant": { "role": "admin" }, "exp": now() + 3600 }))
}

async fn proxy(env: &Env, backend_extra: &str, extra: &str) -> pgtenant::server::Running {
    start_proxy(env, backend_extra, &format!("{extra}\n{}", admin_section())).await
}

async fn console_as(proxy: &pgtenant::server::Running, token: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1").port(proxy.addr.port()).user("admin").dbname("pgtenant").password(token);
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

async fn console(proxy: &pgtenant::server::Running) -> Result<tokio_postgres::Client, String> {
    console_as(proxy, &admin_token()).await.map_err(|e| format!("console login: {e}"))
}

/// A result as (column names, rows of values).
type Rows = (Vec<String>, Vec<Vec<Option<String>>>);

async fn show(console: &tokio_postgres::Client, command: &str) -> Result<Rows, String> {
    let messages = console.simple_query(command).await.map_err(|e| format!("{command}: {e:?}"))?;
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for m in messages {
        match m {
            SimpleQueryMessage::RowDescription(cols) => columns = cols.iter().map(|c| c.name().to_string()).collect(),
            SimpleQueryMessage::Row(r) => rows.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect()),
            _ => {}
        }
    }
    Ok((columns, rows))
}

/// The value of `column` in each row.
fn column(rows: &Rows, name: &str) -> Result<Vec<Option<String>>, String> {
    let i = rows.0.iter().position(|c| c == name).ok_or_else(|| format!("no column {name} in {:?}", rows.0))?;
    Ok(rows.1.iter().map(|r| r[i].clone()).collect())
}

/// The values of the columns `names`, row by row.
fn columns(rows: &Rows, names: &[&str]) -> Result<Vec<Vec<Option<String>>>, String> {
    let each = names.iter().map(|n| column(rows, n)).collect::<Result<Vec<_>, _>>()?;
    Ok((0..rows.1.len()).map(|i| each.iter().map(|c| c[i].clone()).collect()).collect())
}

/// The rows whose `key` column is `value`, as name → value maps.
fn rows_where(rows: &Rows, key: &str, value: &str) -> Vec<std::collections::HashMap<String, Option<String>>> {
    let Some(i) = rows.0.iter().position(|c| c == key) else { return vec![] };
    rows.1
        .iter()
        .filter(|r| r[i].as_deref() == Some(value))
        .map(|r| rows.0.iter().cloned().zip(r.iter().cloned()).collect())
        .collect()
}

fn has_columns(rows: &Rows, wanted: &[&str]) -> TestResult {
    let missing: Vec<&&str> = wanted.iter().filter(|w| !rows.0.iter().any(|c| c == **w)).collect();
    ensure(missing.is_empty(), format!("missing columns {missing:?} in {:?}", rows.0))
}

async fn ordinary_tokens_are_refused_with_28000(env: &Env) -> TestResult {
    let p = proxy(env, "", "").await;
    let e = console_as(&p, &token(1, "alice")).await.err().ok_or("a tenant token got into the console")?;
    ensure(db_err(&e).0 == "28000", format!("tenant token: {:?}", db_err(&e)))?;
    let forged = pgtenant::jwt::mint_hs(&json!({ "pgtenant": { "role": "admin" }, "exp": now() + 60 }), b"another-secret-0123456789", jsonwebtoken::Algorithm::HS256);
    let e = console_as(&p, &forged).await.err().ok_or("a token signed by another key got into the console")?;
    ensure(db_err(&e).0 == "28P01", format!("forged admin token: {:?}", db_err(&e)))?;
    // the admin token works on the console, and the console works
    let c = console(&p).await?;
    show(&c, "SHOW VERSION").await?;
    // an admin token is no tenant token: on the application database it is an ordinary login,
    // refused for lack of the tenant claims
    let e = connect(&p, &admin_token()).await.err().ok_or("an admin token logged in as a tenant")?;
    ensure(db_err(&e).0 == "28000", format!("admin token on dbname=app: {:?}", db_err(&e)))?;
    p.stop().await;
    Ok(())
}

async fn psql_reads_show_pools_with_pgbouncer_columns(env: &Env) -> TestResult {
    let p = proxy(env, "pool_size = 3", "").await;
    let tenant = connect(&p, &token(1, "alice")).await.map_err(|e| e.to_string())?;
    tenant.simple_query("SELECT 1").await.map_err(|e| e.to_string())?;
    let out = tokio::task::spawn_blocking({
        let port = p.addr.port();
        move || {
            std::process::Command::new("psql")
                .args(["-X", "-A", "-F", ",", "-v", "ON_ERROR_STOP=1", "-c", "SHOW POOLS"])
                .arg(format!("host=127.0.0.1 port={port} dbname=pgtenant user=admin"))
                .env("PGPASSWORD", admin_token())
                .output()
        }
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("psql: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure(out.status.success(), format!("psql failed: {}{stdout}", String::from_utf8_lossy(&out.stderr)))?;
    let mut lines = stdout.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let row: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    for c in ["database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "maxwait", "maxwait_us", "pool_mode"] {
        ensure(header.contains(&c), format!("psql SHOW POOLS header lacks {c}: {header:?}"))?;
    }
    let get = |name: &str| header.iter().position(|h| *h == name).and_then(|i| row.get(i).copied()).unwrap_or("");
    ensure(get("database") == "app" && get("user") == "app_user", format!("pool row: {row:?}"))?;
    ensure(get("cl_active") == "1" && get("sv_idle") == "1" && get("sv_active") == "0", format!("one idle client, one idle server: {header:?} {row:?}"))?;
    ensure(get("pool_size") == "3" && get("pool_mode") == "transaction" && get("paused") == "f", format!("{header:?} {row:?}"))?;
    p.stop().await;
    Ok(())
}

/// A proxy routing to a read replica (a streaming standby of the test cluster, usable once this
/// returns) and to a second cluster `eu` that tenant 2 lives on; the clusters live as long as it.
struct Routed {
    standby: pgtenant::cluster::Cluster,
    eu: pgtenant::cluster::Cluster,
    proxy: pgtenant::server::Running,
}

async fn routed(env: &Env) -> Result<Routed, String> {
    let standby = env.cluster.start_standby().map_err(|e| e.to_string())?;
    let eu = second_cluster()?;
    let replica = standby.url("app_user", "app-secret", "app");
    let clusters = format!("[[clusters]]\nname = \"eu\"\nurl = \"{}\"\npool_size = 2\ntenants = [\"2\"]\n", eu.url("app_user", "app-secret", "app"));
    let proxy = proxy(env, &format!("replicas = [\"{replica}\"]"), &clusters).await;
    replicas_usable(&proxy).await?;
    Ok(Routed { standby, eu, proxy })
}

/// `host:port` of a test cluster, as the `host` column shows it.
fn at(cluster: &pgtenant::cluster::Cluster) -> String {
    format!("127.0.0.1:{}", cluster.port())
}

/// The `pool`, `cluster`, `role` and `host` of every pool of [`routed`]'s proxy, in order.
fn every_pool(env: &Env, standby: &pgtenant::cluster::Cluster, eu: &pgtenant::cluster::Cluster) -> Vec<Vec<Option<String>>> {
    let s = |v: &str| Some(v.to_string());
    vec![
        vec![s("tenant"), s("default"), s("primary"), Some(at(&env.cluster))],
        vec![s("replica"), s("default"), s("replica"), Some(at(standby))],
        vec![s("cluster"), s("eu"), s("primary"), Some(at(eu))],
    ]
}

/// With a read replica (a streaming standby) and a second cluster, `SHOW POOLS` has a row for each
/// of their pools, saying which cluster, role and host it is, after PgBouncer's columns (which
/// keep their order); it lists exactly the pools `/pools` lists, with their own figures.
async fn show_pools_lists_every_cluster_and_replica(env: &Env) -> TestResult {
    let Routed { standby, eu, proxy: p } = routed(env).await?;
    // tenant 2 runs one transaction on eu: its pool keeps that backend, idle
    let two = connect(&p, &token(2, "u2")).await.map_err(|e| e.to_string())?;
    two.simple_query("SELECT 1").await.map_err(|e| e.to_string())?;
    let c = console(&p).await?;
    let pools = show(&c, "SHOW POOLS").await?;
    let pgbouncer = ["database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "maxwait", "maxwait_us", "pool_mode", "pool", "pool_size", "paused"];
    ensure(pools.0[..pgbouncer.len()] == pgbouncer && pools.0[pgbouncer.len()..] == ["cluster", "role", "host"], format!("columns: {:?}", pools.0))?;
    let rows = columns(&pools, &["pool", "cluster", "role", "host"])?;
    ensure(rows == every_pool(env, &standby, &eu), format!("SHOW POOLS rows: {rows:?}"))?;
    let eu_row = &rows_where(&pools, "cluster", "eu")[0];
    ensure(eu_row["sv_idle"].as_deref() == Some("1") && eu_row["pool_size"].as_deref() == Some("2"), format!("eu's pool: {eu_row:?}"))?;
    // the same pools as /pools
    let json: serde_json::Value = serde_json::from_str(&pgtenant::admin::pools_json(&*p.proxy)).map_err(|e| e.to_string())?;
    let mut listed = Vec::new();
    for cl in json["clusters"].as_array().into_iter().flatten() {
        listed.push(cl["primary"]["backend"].clone());
        listed.extend(cl["replicas"].as_array().into_iter().flatten().map(|r| r["backend"].clone()));
    }
    let hosts: Vec<String> = listed.iter().filter_map(|b| b.as_str()).filter_map(|b| b.split('@').nth(1)?.split('/').next().map(str::to_string)).collect();
    ensure(hosts == [at(&env.cluster), at(&standby), at(&eu)], format!("/pools lists {hosts:?}"))?;
    p.stop().await;
    Ok(())
}

/// `SHOW SERVERS` lists the backends of every pool `SHOW POOLS` lists: a read-only transaction's
/// backend on the replica, tenant 2's on cluster `eu`, active under their own pool (with its
/// cluster, role and host) while the transaction runs and idle there after it; `SHOW STATS` has
/// a row per pool, counting those transactions where they ran. PgBouncer's columns come first.
async fn show_servers_and_stats_cover_every_cluster_and_replica(env: &Env) -> TestResult {
    let Routed { standby, eu, proxy: p } = routed(env).await?;
    let c = console(&p).await?;
    let one = connect(&p, &token(1, "u1")).await.map_err(|e| e.to_string())?;
    let two = connect(&p, &token(2, "u2")).await.map_err(|e| e.to_string())?;
    let mut held = Vec::new();
    for client in [&one, &two] {
        client.batch_execute("BEGIN READ ONLY").await.map_err(|e| e.to_string())?;
        let row = client.query_one("SELECT pg_backend_pid(), pg_is_in_recovery()", &[]).await.map_err(|e| e.to_string())?;
        held.push((row.get::<_, i32>(0), row.get::<_, bool>(1)));
    }
    ensure(held[0].1 && !held[1].1, format!("tenant 1 reads on the standby, tenant 2 on eu's primary: {held:?}"))?;
    let s = |v: &str| Some(v.to_string());
    // (backend pid, tenant, pool, cluster, role, host) of each transaction
    let expected = [
        (held[0].0, "1", s("replica"), s("default"), s("replica"), Some(at(&standby))),
        (held[1].0, "2", s("cluster"), s("eu"), s("primary"), Some(at(&eu))),
    ];
    let servers = show(&c, "SHOW SERVERS").await?;
    let pgbouncer = ["type", "user", "database", "state", "backend", "connect_time", "request_time", "remote_pid", "pool", "tenant", "client_pid"];
    ensure(servers.0[..pgbouncer.len()] == pgbouncer && servers.0[pgbouncer.len()..] == ["cluster", "role", "host"], format!("columns: {:?}", servers.0))?;
    for state in ["active", "idle"] {
        if state == "idle" {
            for client in [&one, &two] {
                client.batch_execute("COMMIT").await.map_err(|e| e.to_string())?;
            }
        }
        let servers = show(&c, "SHOW SERVERS").await?;
        for (pid, tenant, pool, cluster, role, host) in &expected {
            let on = |r: &std::collections::HashMap<String, Option<String>>| r["host"] == *host;
            let rows: Vec<_> = rows_where(&servers, "remote_pid", &pid.to_string()).into_iter().filter(on).collect();
            let tenant = (state == "active").then(|| tenant.to_string());
            ensure(
                rows.len() == 1
                    && rows[0]["state"].as_deref() == Some(state)
                    && (rows[0]["pool"].clone(), rows[0]["cluster"].clone(), rows[0]["role"].clone(), rows[0]["tenant"].clone()) == (pool.clone(), cluster.clone(), role.clone(), tenant),
                format!("{state} backend {pid} on {host:?} of {pool:?}: {servers:?}"),
            )?;
        }
    }
    let stats = show(&c, "SHOW STATS").await?;
    ensure(stats.0 == ["database", "pool", "total_xact_count", "total_wait_time", "avg_wait_time", "cluster", "role", "host"], format!("columns: {:?}", stats.0))?;
    let pools = columns(&stats, &["pool", "cluster", "role", "host"])?;
    ensure(pools == every_pool(env, &standby, &eu), format!("SHOW STATS rows: {stats:?}"))?;
    // the replica and eu each ran a transaction (a login may lease from its cluster's primary too)
    let rows = column(&stats, "total_xact_count")?;
    let counted = |i: usize| rows[i].as_deref().and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n >= 1);
    ensure(counted(1) && counted(2), format!("transactions on the replica and on eu: {stats:?}"))?;
    p.stop().await;
    Ok(())
}

async fn show_clients_and_servers_list_the_tenants_session_and_its_backend(env: &Env) -> TestResult {
    let p = proxy(env, "", "").await;
    let c = console(&p).await?;
    let alice = connect(&p, &token(7, "alice")).await.map_err(|e| e.to_string())?;
    let clients = show(&c, "SHOW CLIENTS").await?;
    has_columns(&clients, &["type", "user", "database", "state", "addr", "port", "connect_time", "request_time", "tenant", "pool", "pid"])?;
    let mine = rows_where(&clients, "tenant", "7");
    ensure(mine.len() == 1, format!("tenant 7 listed once: {clients:?}"))?;
    ensure(mine[0]["state"].as_deref() == Some("idle") && mine[0]["user"].as_deref() == Some("alice"), format!("{mine:?}"))?;
    ensure(mine[0]["addr"].as_deref() == Some("127.0.0.1") && mine[0]["server_pid"].is_none(), format!("{mine:?}"))?;
    // inside a transaction the client is linked to a backend: the one pg_backend_pid() names
    alice.batch_execute("BEGIN").await.map_err(|e| e.to_string())?;
    let row = alice.query_one("SELECT pg_backend_pid()", &[]).await.map_err(|e| e.to_string())?;
    let backend: i32 = row.get(0);
    let clients = show(&c, "SHOW CLIENTS").await?;
    let mine = rows_where(&clients, "tenant", "7");
    ensure(mine.len() == 1 && mine[0]["state"].as_deref() == Some("active"), format!("active in a transaction: {clients:?}"))?;
    ensure(mine[0]["server_pid"].as_deref() == Some(backend.to_string().as_str()), format!("linked to {backend}: {mine:?}"))?;
    let servers = show(&c, "SHOW SERVERS").await?;
    has_columns(&servers, &["type", "user", "database", "state", "connect_time", "request_time", "remote_pid"])?;
    let busy = rows_where(&servers, "remote_pid", &backend.to_string());
    ensure(busy.len() == 1 && busy[0]["state"].as_deref() == Some("active") && busy[0]["tenant"].as_deref() == Some("7"), format!("{servers:?}"))?;
    alice.batch_execute("COMMIT").await.map_err(|e| e.to_string())?;
    let servers = show(&c, "SHOW SERVERS").await?;
    let idle = rows_where(&servers, "remote_pid", &backend.to_string());
    ensure(idle.len() == 1 && idle[0]["state"].as_deref() == Some("idle") && idle[0]["connect_time"].is_some(), format!("back in the pool: {servers:?}"))?;
    drop(alice);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !rows_where(&show(&c, "SHOW CLIENTS").await?, "tenant", "7").is_empty() {
        ensure(Instant::now() < deadline, "a closed session is still listed")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.stop().await;
    Ok(())
}

/// Session pooling: the backend a session is given at login is listed as that session's, under
/// its pool, with no transaction open; a cancel request reaches a query running on it, and the
/// session keeps its backend.
async fn session_mode_lists_the_backend_given_at_login_and_cancels_reach_it(env: &Env) -> TestResult {
    let p = proxy(env, "", "[pool]\nmode = \"session\"").await;
    let c = console(&p).await?;
    let bob = connect(&p, &token(8, "bob")).await.map_err(|e| e.to_string())?;
    let backend: i32 = bob.query_one("SELECT pg_backend_pid()", &[]).await.map_err(|e| e.to_string())?.get(0);
    let servers = show(&c, "SHOW SERVERS").await?;
    let mine = rows_where(&servers, "remote_pid", &backend.to_string());
    ensure(
        mine.len() == 1 && mine[0]["state"].as_deref() == Some("active") && mine[0]["tenant"].as_deref() == Some("8") && mine[0]["pool"].is_some(),
        format!("session mode, between transactions: backend {backend} listed as the session's: {servers:?}"),
    )?;
    let clients = show(&c, "SHOW CLIENTS").await?;
    let row = rows_where(&clients, "tenant", "8");
    ensure(row.len() == 1 && row[0]["server_pid"].as_deref() == Some(backend.to_string().as_str()), format!("{clients:?}"))?;
    expect_cancelled(&bob, "select pg_sleep(20)", Duration::from_millis(500)).await?;
    let again: i32 = bob.query_one("SELECT pg_backend_pid()", &[]).await.map_err(|e| e.to_string())?.get(0);
    ensure(again == backend, "session mode keeps its backend after a cancel")?;
    p.stop().await;
    Ok(())
}

async fn show_tenants_and_stats_count_transactions(env: &Env) -> TestResult {
    let p = proxy(env, "", "").await;
    let c = console(&p).await?;
    let bob = connect(&p, &token(8, "bob")).await.map_err(|e| e.to_string())?;
    for _ in 0..5 {
        bob.simple_query("SELECT count(*) FROM orders").await.map_err(|e| e.to_string())?;
    }
    let tenants = show(&c, "SHOW TENANTS").await?;
    has_columns(&tenants, &["tenant", "clients", "active", "waiting", "transactions", "wait_seconds_total", "limit_refusals"])?;
    let t = rows_where(&tenants, "tenant", "8");
    ensure(t.len() == 1, format!("{tenants:?}"))?;
    let n: u64 = t[0]["transactions"].as_deref().unwrap_or("").parse().map_err(|_| format!("{t:?}"))?;
    ensure(n >= 5 && t[0]["clients"].as_deref() == Some("1"), format!("5 transactions, 1 client: {t:?}"))?;
    let stats = show(&c, "SHOW STATS").await?;
    has_columns(&stats, &["database", "total_xact_count", "total_wait_time", "avg_wait_time"])?;
    let total: u64 = column(&stats, "total_xact_count")?[0].as_deref().unwrap_or("").parse().map_err(|_| format!("{stats:?}"))?;
    ensure(total >= 5, format!("{stats:?}"))?;
    p.stop().await;
    Ok(())
}

async fn show_config_shows_no_secret(env: &Env) -> TestResult {
    let p = proxy(env, "", &format!("signing_key = \"{SIGNING_KEY}\"")).await;
    let c = console(&p).await?;
    let config = show(&c, "SHOW CONFIG").await?;
    has_columns(&config, &["key", "value"])?;
    let text = format!("{config:?}");
    for secret in [SECRET, "app-secret", "app%2Dsecret", SIGNING_KEY] {
        ensure(!text.contains(secret), format!("SHOW CONFIG shows a secret: {text}"))?;
    }
    let url = rows_where(&config, "key", "backend.url");
    ensure(url.len() == 1 && url[0]["value"].as_deref().is_some_and(|u| u.contains(":********@127.0.0.1")), format!("{url:?}"))?;
    let size = rows_where(&config, "key", "backend.pool_size");
    ensure(size.len() == 1 && size[0]["value"].as_deref() == Some("4"), format!("{size:?}"))?;
    p.stop().await;
    Ok(())
}

async fn show_version_and_unknown_commands(env: &Env) -> TestResult {
    let p = proxy(env, "", "").await;
    let c = console(&p).await?;
    for bad in ["SELECT 1", "SHOW LISTS", "PAUSE app"] {
        let e = c.simple_query(bad).await.err().ok_or(format!("{bad} answered"))?;
        ensure(db_err(&e).0 == "42601", format!("{bad}: {:?}", db_err(&e)))?;
    }
    // the extended protocol is refused, and the console goes on
    let e = c.query("SHOW VERSION", &[]).await.err().ok_or("extended protocol answered")?;
    ensure(db_err(&e).0 == "0A000", format!("extended: {:?}", db_err(&e)))?;
    let version = show(&c, "show version").await?;
    ensure(version.0 == ["version"] && version.1[0][0].as_deref().is_some_and(|v| v.starts_with("pgtenant ")), format!("{version:?}"))?;
    p.stop().await;
    Ok(())
}

async fn pause_holds_new_transactions_until_resume(env: &Env) -> TestResult {
    let p = proxy(env, "", "[pool]\nquery_wait_timeout_ms = 10000").await;
    let c = console(&p).await?;
    let a = connect(&p, &token(1, "alice")).await.map_err(|e| e.to_string())?;
    let b = connect(&p, &token(2, "bob")).await.map_err(|e| e.to_string())?;
    a.batch_execute("BEGIN; SELECT 1").await.map_err(|e| e.to_string())?;
    // PAUSE waits for the transaction in flight
    let pausing = {
        let c2 = console(&p).await?;
        tokio::spawn(async move { c2.simple_query("PAUSE").await.map(|_| ()).map_err(|e| e.to_string()) })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure(!pausing.is_finished(), "PAUSE returned while a transaction was in flight")?;
    let pools = show(&c, "SHOW POOLS").await?;
    ensure(column(&pools, "paused")?[0].as_deref() == Some("t"), format!("{pools:?}"))?;
    // a new transaction waits
    let started = Instant::now();
    let waiting = tokio::spawn(async move { b.query_one("SELECT count(*) FROM orders", &[]).await.map(|r| r.get::<_, i64>(0)).map_err(|e| e.to_string()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure(!waiting.is_finished(), "a transaction got a backend while paused")?;
    let pools = show(&c, "SHOW POOLS").await?;
    ensure(column(&pools, "cl_waiting")?[0].as_deref() == Some("1"), format!("the held transaction is waiting: {pools:?}"))?;
    let waited_us: u64 = column(&pools, "maxwait_us")?[0].as_deref().unwrap_or("").parse().map_err(|_| format!("{pools:?}"))?;
    ensure(waited_us >= 200_000 || column(&pools, "maxwait")?[0].as_deref() != Some("0"), format!("maxwait: {pools:?}"))?;
    // the transaction in flight goes on and ends; then PAUSE returns
    a.batch_execute("SELECT 2; COMMIT").await.map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(5), pausing).await.map_err(|_| "PAUSE did not return after the transaction ended")?.map_err(|e| e.to_string())??;
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure(!waiting.is_finished(), "a transaction got a backend while paused")?;
    let e = c.simple_query("PAUSE").await.err().ok_or("PAUSE twice answered")?;
    ensure(db_err(&e).0 == "55000", format!("{:?}", db_err(&e)))?;
    c.simple_query("RESUME").await.map_err(|e| e.to_string())?;
    let n = tokio::time::timeout(Duration::from_secs(5), waiting).await.map_err(|_| "RESUME did not let the transaction go on")?.map_err(|e| e.to_string())??;
    ensure(n >= 0 && started.elapsed() >= Duration::from_millis(500), "the waiting transaction finished only after RESUME")?;
    let e = c.simple_query("RESUME").await.err().ok_or("RESUME twice answered")?;
    ensure(db_err(&e).0 == "55000", format!("{:?}", db_err(&e)))?;
    p.stop().await;
    Ok(())
}

async fn a_paused_pool_refuses_after_the_wait_timeout(env: &Env) -> TestResult {
    let p = proxy(env, "", "[pool]\nquery_wait_timeout_ms = 300").await;
    let c = console(&p).await?;
    let a = connect(&p, &token(1, "alice")).await.map_err(|e| e.to_string())?;
    c.simple_query("PAUSE").await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    let e = a.simple_query("SELECT 1").await.err().ok_or("a transaction ran while paused")?;
    ensure(db_err(&e).0 == "57P03" && started.elapsed() >= Duration::from_millis(250), format!("{:?} after {:?}", db_err(&e), started.elapsed()))?;
    c.simple_query("RESUME").await.map_err(|e| e.to_string())?;
    a.simple_query("SELECT 1").await.map_err(|e| format!("after RESUME: {e}"))?;
    p.stop().await;
    Ok(())
}

async fn kill_ends_the_tenants_sessions_and_no_other(env: &Env) -> TestResult {
    let p = proxy(env, "", "").await;
    let c = console(&p).await?;
    let busy = connect(&p, &token(11, "alice")).await.map_err(|e| e.to_string())?;
    let idle = connect(&p, &token(11, "alice")).await.map_err(|e| e.to_string())?;
    let other = connect(&p, &token(12, "bob")).await.map_err(|e| e.to_string())?;
    idle.simple_query("SELECT 1").await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    let sleeping = tokio::spawn(async move { busy.simple_query("SELECT pg_sleep(20)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply = c.simple_query("KILL 11").await.map_err(|e| e.to_string())?;
    let tag = reply.iter().find_map(|m| match m {
        SimpleQueryMessage::CommandComplete(n) => Some(*n),
        _ => None,
    });
    let e = tokio::time::timeout(Duration::from_secs(5), sleeping)
        .await
        .map_err(|_| "KILL did not end the session in a query")?
        .map_err(|e| e.to_string())?
        .err()
        .ok_or("the killed query succeeded")?;
    ensure(db_err(&e).0 == "57P01" && started.elapsed() < Duration::from_secs(10), format!("in a query: {:?}", db_err(&e)))?;
    ensure(idle.simple_query("SELECT 1").await.is_err(), "the tenant's idle session survived KILL")?;
    other.simple_query("SELECT 1").await.map_err(|e| format!("another tenant's session was hit: {e}"))?;
    let clients = show(&c, "SHOW CLIENTS").await?;
    ensure(rows_where(&clients, "tenant", "11").is_empty() && rows_where(&clients, "tenant", "12").len() == 1, format!("{clients:?}"))?;
    // the killed query's backend is gone or idle, and the pool serves the tenant again
    let again = connect(&p, &token(11, "alice")).await.map_err(|e| e.to_string())?;
    again.simple_query("SELECT 1").await.map_err(|e| e.to_string())?;
    ensure(tag == Some(2), format!("KILL 11 reports the two sessions it ended: {tag:?}"))?;
    p.stop().await;
    Ok(())
}

async fn reload_rereads_the_config_file(env: &Env) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("pgtenant.toml");
    let text = config_text(env, "pool_size = 4", admin_section());
    std::fs::write(&path, &text).map_err(|e| e.to_string())?;
    let cfg = pgtenant::config::Config::load(&path).map_err(|e| e.to_string())?;
    let p = pgtenant::server::start_from(cfg, Some(path.clone())).await.map_err(|e| e.to_string())?;
    let c = console(&p).await?;
    std::fs::write(&path, text.replace("pool_size = 4", "pool_size = 6")).map_err(|e| e.to_string())?;
    c.simple_query("RELOAD").await.map_err(|e| e.to_string())?;
    let size = column(&show(&c, "SHOW POOLS").await?, "pool_size")?;
    ensure(size[0].as_deref() == Some("6"), format!("pool_size after RELOAD: {size:?}"))?;
    // a broken file is refused, the old config stays, the console goes on
    std::fs::write(&path, "[backend]\nurl = 1\n").map_err(|e| e.to_string())?;
    let e = c.simple_query("RELOAD").await.err().ok_or("a broken config was accepted")?;
    ensure(db_err(&e).0 == "F0000", format!("{:?}", db_err(&e)))?;
    let size = column(&show(&c, "SHOW POOLS").await?, "pool_size")?;
    ensure(size[0].as_deref() == Some("6"), format!("{size:?}"))?;
    p.stop().await;
    Ok(())
}
