//! Routing across pools (issue 18), against real servers: a primary with a streaming standby
//! (`Cluster::start_standby`: `pg_basebackup -R`), and a second independent cluster.
//!
//! Read replicas: `BEGIN READ ONLY` / `START TRANSACTION READ ONLY`, a session with
//! `default_transaction_read_only = on` and a client asking for `target_session_attrs=prefer-standby`
//! run on the standby (`pg_is_in_recovery()` is true inside) with the tenant's RLS rows, prepared
//! statements and the statement guard; plain `BEGIN` and writes run on the primary; with the standby
//! stopped, read-only transactions run on the primary without an error; a standby lagging past
//! `max_replica_lag_ms` is skipped; with two standbys, transactions go to the least busy one.
//! Tenant placement: two tenants placed on two clusters each read their own cluster's rows; a token
//! claiming a cluster goes there, one claiming an unknown cluster gets FATAL 08004; a reload moves a
//! tenant's next transaction.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgtenant::cluster::Cluster;
use pgtenant::server::Running;
use serde_json::json;

fn main() {
    run_all(tests![
        read_only_transactions_run_on_the_standby_with_the_tenant_context,
        writes_and_plain_begin_run_on_the_primary,
        with_the_standby_down_reads_go_to_the_primary,
        a_lagging_standby_is_skipped_until_it_catches_up,
        read_only_transactions_go_to_the_least_busy_standby,
        tenants_placed_on_two_clusters_read_their_own_rows,
        a_claim_names_the_cluster_and_an_unknown_one_is_fatal,
        a_reload_moves_a_tenant_to_another_cluster,
    ]);
}

fn e(err: impl std::fmt::Display) -> String {
    err.to_string()
}

/// A proxy with the standby as its one replica; returns once the replica's monitor has seen it.
async fn with_replica(env: &Env, standby: &Cluster, extra: &str) -> Result<Running, String> {
    with_replica_lag(env, standby, extra, 60_000).await
}

async fn with_replica_lag(env: &Env, standby: &Cluster, extra: &str, max_lag_ms: u64) -> Result<Running, String> {
    let replica = standby.url("app_user", "app-secret", "app");
    let proxy = start_proxy(env, &format!("replicas = [\"{replica}\"]\nmax_replica_lag_ms = {max_lag_ms}"), extra).await;
    replicas_usable(&proxy).await?;
    Ok(proxy)
}

async fn connect_with(proxy: &Running, token: &str, options: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1").port(proxy.addr.port()).user("alice").dbname("app").password(token).options(options);
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// (in recovery, "tenant ids:count" of the orders visible) of one simple-protocol transaction `begin … COMMIT` (transaction
/// modes go in a query of their own: pgtenant puts the tenant context after them).
async fn where_and_rows(c: &tokio_postgres::Client, begin: &str) -> Result<(String, String), String> {
    c.batch_execute(begin).await.map_err(e)?;
    let rows = c.simple_query("SELECT pg_is_in_recovery()::text, string_agg(DISTINCT tenant_id::text, ',') || ':' || count(*) FROM orders; COMMIT").await.map_err(e)?;
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some((r.get(0).unwrap_or("").to_string(), r.get(1).unwrap_or("").to_string())),
            _ => None,
        })
        .ok_or("no row")?;
    Ok(row)
}

async fn in_recovery(c: &tokio_postgres::Client) -> Result<bool, String> {
    c.query_one("SELECT pg_is_in_recovery()", &[]).await.map(|r| r.get(0)).map_err(e)
}

async fn read_only_transactions_run_on_the_standby_with_the_tenant_context(env: &Env) -> TestResult {
    let standby = env.cluster.start_standby().map_err(e)?;
    let proxy = with_replica(env, &standby, "").await?;
    // /pools shows the default cluster and its replica, up
    let pools: serde_json::Value = serde_json::from_str(&pgtenant::admin::pools_json(&*proxy.proxy)).map_err(e)?;
    let cluster = &pools["clusters"][0];
    ensure(
        cluster["cluster"] == "default" && cluster["replicas"][0]["name"] == "replica 0" && cluster["replicas"][0]["up"] == true,
        format!("/pools: {pools}"),
    )?;
    let c = connect(&proxy, &token(1, "u1")).await.map_err(e)?;
    let primary = where_and_rows(&c, "BEGIN").await?;
    ensure(primary.0 == "false" && primary.1.starts_with("1:"), format!("plain BEGIN: {primary:?}"))?;
    // simple protocol, both spellings: on the standby, with tenant 1's rows (not 0, not everyone's)
    for begin in ["BEGIN READ ONLY", "START TRANSACTION READ ONLY", "begin isolation level repeatable read, read only"] {
        let got = where_and_rows(&c, begin).await?;
        ensure(got == ("true".into(), primary.1.clone()), format!("{begin}: {got:?}, primary saw {primary:?}"))?;
    }
    let other = connect(&proxy, &token(2, "u2")).await.map_err(e)?;
    let two = where_and_rows(&other, "BEGIN READ ONLY").await?;
    ensure(two.0 == "true" && two.1.starts_with("2:") && two.1 == where_and_rows(&other, "BEGIN").await?.1, format!("tenant 2 on the standby: {two:?}"))?;
    // extended protocol: tokio-postgres's read-only transaction, and a prepared statement on it
    let mut c = c;
    let stmt = c.prepare("SELECT pg_is_in_recovery(), current_setting('app.tenant_id')").await.map_err(e)?;
    let tx = c.build_transaction().read_only(true).start().await.map_err(e)?;
    let row = tx.query_one(&stmt, &[]).await.map_err(e)?;
    ensure(row.get::<_, bool>(0) && row.get::<_, String>(1) == "1", "prepared statement in a read-only transaction")?;
    // the statement guard works the same there
    let refused = tx.batch_execute("SELECT set_config('app.tenant_id', '2', false)").await;
    ensure(refused.as_ref().is_err_and(|er| db_err(er).0 == "42501"), format!("guard on the standby: {refused:?}"))?;
    drop(tx);
    // a session that reads only, by SET or by asking for a standby
    c.batch_execute("SET default_transaction_read_only = on").await.map_err(e)?;
    ensure(in_recovery(&c).await?, "SET default_transaction_read_only = on: not on the standby")?;
    c.batch_execute("RESET default_transaction_read_only").await.map_err(e)?;
    ensure(!in_recovery(&c).await?, "after RESET: still on the standby")?;
    let s = connect_with(&proxy, &token(1, "u1"), "-c default_transaction_read_only=on").await.map_err(e)?;
    ensure(in_recovery(&s).await?, "startup default_transaction_read_only=on: not on the standby")?;
    let p = connect_with(&proxy, &token(1, "u1"), "-c target_session_attrs=prefer-standby").await.map_err(e)?;
    ensure(in_recovery(&p).await?, "target_session_attrs=prefer-standby: not on the standby")?;
    // a cancel reaches the query on the standby (the server the backend is on, not the primary)
    expect_cancelled(&p, "SELECT pg_sleep(20)", Duration::from_millis(500)).await.map_err(|m| format!("cancel on the standby: {m}"))?;
    ensure(in_recovery(&p).await?, "session unusable after the cancel")?;
    let bad = connect_with(&proxy, &token(1, "u1"), "-c target_session_attrs=sideways").await;
    ensure(bad.as_ref().is_err_and(|er| db_err(er).0 == "22023"), format!("bad target_session_attrs: {:?}", bad.err()))?;
    proxy.stop().await;
    Ok(())
}

async fn writes_and_plain_begin_run_on_the_primary(env: &Env) -> TestResult {
    let standby = env.cluster.start_standby().map_err(e)?;
    let proxy = with_replica(env, &standby, "").await?;
    let c = connect(&proxy, &token(3, "u3")).await.map_err(e)?;
    let rows = c
        .simple_query("BEGIN; INSERT INTO orders (tenant_id, amount) VALUES (3, 1.00); SELECT pg_is_in_recovery()::text; ROLLBACK")
        .await
        .map_err(e)?;
    let rec = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    ensure(rec.as_deref() == Some("false"), format!("write transaction ran where pg_is_in_recovery() = {rec:?}"))?;
    ensure(!in_recovery(&c).await?, "an implicit transaction ran on the standby")?;
    // a write inside a read-only transaction fails as on any standby, and the session goes on
    c.batch_execute("BEGIN READ ONLY").await.map_err(e)?;
    let w = c.simple_query("INSERT INTO orders (tenant_id, amount) VALUES (3, 1.00)").await;
    ensure(w.as_ref().is_err_and(|er| db_err(er).0 == "25006"), format!("write in a read-only transaction: {w:?}"))?;
    c.batch_execute("ROLLBACK").await.map_err(e)?;
    ensure(!in_recovery(&c).await?, "after the failed read-only transaction")?;
    proxy.stop().await;
    Ok(())
}

async fn with_the_standby_down_reads_go_to_the_primary(env: &Env) -> TestResult {
    let mut standby = env.cluster.start_standby().map_err(e)?;
    let proxy = with_replica(env, &standby, "").await?;
    let c = connect(&proxy, &token(1, "u1")).await.map_err(e)?;
    ensure(where_and_rows(&c, "BEGIN READ ONLY").await?.0 == "true", "standby not used while up")?;
    standby.stop().map_err(e)?;
    // at once (before the monitor notices): the lease fails over to the primary, no error
    let got = where_and_rows(&c, "BEGIN READ ONLY").await?;
    ensure(got.0 == "false" && got.1.starts_with("1:"), format!("standby down: {got:?}"))?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = where_and_rows(&c, "START TRANSACTION READ ONLY").await?;
    ensure(got.0 == "false", format!("standby down, after a check: {got:?}"))?;
    // back up: the monitor finds it and reads go there again
    standby.restart(false).map_err(e)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while where_and_rows(&c, "BEGIN READ ONLY").await?.0 != "true" {
        if Instant::now() > deadline {
            return Err("the standby was not used again after it came back".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    proxy.stop().await;
    Ok(())
}

async fn a_lagging_standby_is_skipped_until_it_catches_up(env: &Env) -> TestResult {
    let standby = env.cluster.start_standby().map_err(e)?;
    // something replayed, so the standby has a last replay time; then replay stops
    env.cluster.psql("app", "CREATE TABLE IF NOT EXISTS lag_probe (x int); INSERT INTO lag_probe VALUES (1)").map_err(e)?;
    catch_up(&standby, &env.cluster)?;
    let proxy = with_replica_lag(env, &standby, "", 500).await?;
    let c = connect(&proxy, &token(1, "u1")).await.map_err(e)?;
    ensure(where_and_rows(&c, "BEGIN READ ONLY").await?.0 == "true", "standby not used while caught up")?;
    standby.psql("postgres", "SELECT pg_wal_replay_pause()").map_err(e)?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    env.cluster.psql("app", "INSERT INTO lag_probe VALUES (2)").map_err(e)?;
    // within a check or two the standby is over the bound: reads go to the primary
    let deadline = Instant::now() + Duration::from_secs(10);
    while where_and_rows(&c, "BEGIN READ ONLY").await?.0 != "false" {
        if Instant::now() > deadline {
            return Err("a standby lagging past max_replica_lag_ms still got read-only transactions".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lag = proxy.proxy.shared.router.clusters()[0].replicas[0].lag_ms();
    ensure(lag.is_some_and(|l| l > 500), format!("measured lag {lag:?}"))?;
    standby.psql("postgres", "SELECT pg_wal_replay_resume()").map_err(e)?;
    catch_up(&standby, &env.cluster)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while where_and_rows(&c, "BEGIN READ ONLY").await?.0 != "true" {
        if Instant::now() > deadline {
            return Err("the standby was not used again after catching up".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.stop().await;
    Ok(())
}

async fn read_only_transactions_go_to_the_least_busy_standby(env: &Env) -> TestResult {
    let (a, b) = (env.cluster.start_standby().map_err(e)?, env.cluster.start_standby().map_err(e)?);
    let urls = [&a, &b].map(|s| format!("\"{}\"", s.url("app_user", "app-secret", "app")));
    let proxy = start_proxy(env, &format!("replicas = [{}]", urls.join(", ")), "").await;
    replicas_usable(&proxy).await?;
    // four transactions held open at once: two on each standby
    let mut ports = Vec::new();
    let mut held = Vec::new();
    for i in 0..4 {
        let c = connect(&proxy, &token(1 + i % 2, "u")).await.map_err(e)?;
        c.batch_execute("BEGIN READ ONLY").await.map_err(e)?;
        let row = c.query_one("SELECT current_setting('port'), pg_is_in_recovery()", &[]).await.map_err(e)?;
        ensure(row.get::<_, bool>(1), "a read-only transaction not on a standby")?;
        ports.push(row.get::<_, String>(0).parse::<u16>().map_err(e)?);
        held.push(c);
    }
    ports.sort();
    let mut want = vec![a.port(), a.port(), b.port(), b.port()];
    want.sort();
    ensure(ports == want, format!("ports {ports:?}, standbys on {} and {}", a.port(), b.port()))?;
    drop(held);
    proxy.stop().await;
    Ok(())
}

/// A second, independent cluster with the RLS fixture, where the tenants' names differ.
fn eu_cluster() -> Result<pgtenant::cluster::Cluster, String> {
    let eu = second_cluster()?;
    eu.psql("app", "UPDATE tenants SET name = name || ' (eu)'").map_err(e)?;
    Ok(eu)
}

async fn tenant_name(c: &tokio_postgres::Client) -> Result<String, String> {
    c.query_one("SELECT string_agg(name, ',') FROM tenants", &[]).await.map(|r| r.get::<_, Option<String>>(0).unwrap_or_default()).map_err(e)
}

fn clusters_table(eu: &pgtenant::cluster::Cluster, tenants: &str) -> String {
    format!("[[clusters]]\nname = \"eu\"\nurl = \"{}\"\npool_size = 2\ntenants = [{tenants}]\n", eu.url("app_user", "app-secret", "app"))
}

async fn tenants_placed_on_two_clusters_read_their_own_rows(env: &Env) -> TestResult {
    let eu = eu_cluster()?;
    let proxy = start_proxy(env, "", &clusters_table(&eu, "\"2\"")).await;
    let one = connect(&proxy, &token(1, "u1")).await.map_err(e)?;
    let two = connect(&proxy, &token(2, "u2")).await.map_err(e)?;
    for _ in 0..3 {
        let (n1, n2) = (tenant_name(&one).await?, tenant_name(&two).await?);
        ensure(n1 == "Acme" && n2 == "Globex (eu)", format!("tenant 1 saw {n1:?}, tenant 2 saw {n2:?}"))?;
    }
    // writes land on the tenant's own cluster
    two.batch_execute("INSERT INTO users (tenant_id, name) VALUES (2, 'placed')").await.map_err(e)?;
    let on_eu = eu.psql("app", "SELECT count(*) FROM users WHERE name = 'placed'").map_err(e)?;
    let on_default = env.cluster.psql("app", "SELECT count(*) FROM users WHERE name = 'placed'").map_err(e)?;
    ensure((on_eu.trim(), on_default.trim()) == ("1", "0"), format!("insert landed: eu {on_eu}, default {on_default}"))?;
    let names: Vec<&str> = proxy.proxy.shared.router.clusters().iter().map(|c| c.name.as_str()).collect();
    ensure(names == ["default", "eu"], format!("clusters: {names:?}"))?;
    // /tenants and the per-tenant metrics name each tenant's cluster
    let tenants: serde_json::Value = serde_json::from_str(&pgtenant::admin::tenants::json(&*proxy.proxy, "")?).map_err(e)?;
    let cluster_of = |t: &str| tenants["tenants"].as_array().and_then(|a| a.iter().find(|x| x["tenant"] == t)).map(|x| x["cluster"].clone());
    ensure(
        cluster_of("1") == Some(json!("default")) && cluster_of("2") == Some(json!("eu")),
        format!("/tenants: {tenants}"),
    )?;
    proxy.stop().await;
    let top = start_proxy(env, "", &format!("{}\n[admin]\nmetrics_top_tenants = 5", clusters_table(&eu, "\"2\""))).await;
    let two = connect(&top, &token(2, "u2")).await.map_err(e)?;
    tenant_name(&two).await?;
    let metrics = pgtenant::admin::tenants::metrics_text(&*top.proxy);
    ensure(
        metrics.contains("pgtenant_tenant_transactions_total{tenant=\"2\",cluster=\"eu\"}"),
        format!("per-tenant metrics: {metrics}"),
    )?;
    top.stop().await;
    // session pooling: the backend leased at login is on the tenant's cluster too
    let session = start_proxy(env, "", &format!("[pool]\nmode = \"session\"\n{}", clusters_table(&eu, "\"2\""))).await;
    let (one, two) = (connect(&session, &token(1, "u1")).await.map_err(e)?, connect(&session, &token(2, "u2")).await.map_err(e)?);
    let (n1, n2) = (tenant_name(&one).await?, tenant_name(&two).await?);
    ensure(n1 == "Acme" && n2 == "Globex (eu)", format!("session mode: tenant 1 saw {n1:?}, tenant 2 saw {n2:?}"))?;
    session.stop().await;
    Ok(())
}

async fn a_claim_names_the_cluster_and_an_unknown_one_is_fatal(env: &Env) -> TestResult {
    let eu = eu_cluster()?;
    let extra = format!("cluster_claim = \"cluster\"\n{}", clusters_table(&eu, ""));
    let proxy = start_proxy(env, "", &extra).await;
    let claimed = |tenant: i64, cluster: &str| token_with(json!({ "tenant_id": tenant, "sub": "u", "cluster": cluster, "exp": now() + 3600 }));
    let c = connect(&proxy, &claimed(1, "eu")).await.map_err(e)?;
    ensure(tenant_name(&c).await? == "Acme (eu)", "claim eu: not on eu")?;
    let d = connect(&proxy, &claimed(1, "default")).await.map_err(e)?;
    ensure(tenant_name(&d).await? == "Acme", "claim default: not on default")?;
    let none = connect(&proxy, &token(1, "u")).await.map_err(e)?;
    ensure(tenant_name(&none).await? == "Acme", "no claim: not on default")?;
    let bad = connect(&proxy, &claimed(1, "mars")).await;
    let err = bad.as_ref().err().map(db_err);
    ensure(
        err.as_ref().is_some_and(|(code, msg)| code == "08004" && msg.contains("\"mars\"")),
        format!("unknown cluster: {err:?}"),
    )?;
    proxy.stop().await;
    Ok(())
}

async fn a_reload_moves_a_tenant_to_another_cluster(env: &Env) -> TestResult {
    let eu = eu_cluster()?;
    let proxy = start_proxy(env, "", &clusters_table(&eu, "")).await;
    let c = connect(&proxy, &token(2, "u2")).await.map_err(e)?;
    ensure(tenant_name(&c).await? == "Globex", "before the reload: not on default")?;
    let text = config_text(env, "", &clusters_table(&eu, "\"2\""));
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(e)?;
    proxy.proxy.reload(&cfg).await.map_err(e)?;
    ensure(tenant_name(&c).await? == "Globex (eu)", "after the reload: the open session's next transaction is not on eu")?;
    // a new cluster needs a restart: the reload is refused and nothing changes
    let more = format!("{}[[clusters]]\nname = \"us\"\nurl = \"{}\"\n", clusters_table(&eu, ""), eu.url("app_user", "app-secret", "app"));
    let cfg = pgtenant::config::Config::from_toml(&config_text(env, "", &more), &|_| None).map_err(e)?;
    let refused = proxy.proxy.reload(&cfg).await;
    ensure(refused.as_ref().is_err_and(|er| er.to_string().contains("restart")), format!("adding a cluster on reload: {refused:?}"))?;
    ensure(tenant_name(&c).await? == "Globex (eu)", "a refused reload changed the placement")?;
    proxy.stop().await;
    Ok(())
}
