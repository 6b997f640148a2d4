//! End-to-end tests of the core proxy against a real Postgres with the RLS fixture: tenant
//! isolation through the simple and extended protocols, pipelining, transactions and errors,
//! COPY, JWT failures, pool limits, cancel, and backend/client failures.

mod admin;
mod cleartext;
mod bounds;
mod common;
mod doctor;
mod faults;
mod health;
mod hostile;
mod jwks;
mod tenancy;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use admin::admin_speaks_http;
use cleartext::cleartext_listeners_are_warned;
use bounds::*;
use common::*;
use doctor::doctor_checks_every_server;
use faults::faults_under_load_lose_nothing;
use health::readyz_follows_the_backend;
use hostile::*;
use jwks::jwks_url_fetch_rotation_and_outage;
use tenancy::*;
use futures::future::join_all;
use serde_json::json;

fn main() {
    run_all(tests![
        two_tenants_simple_protocol,
        two_tenants_extended_protocol,
        psql_two_tenants,
        pipelined_extended_batches,
        explicit_transaction_error_and_rollback,
        insert_foreign_tenant_blocked_by_with_check,
        inserts_land_in_own_tenant,
        claim_values_round_trip_exactly,
        jwt_failures_have_reasons,
        missing_claim_rejects_login,
        wrong_database_is_3d000,
        pool_exhaustion_gives_clear_error,
        cancel_reaches_running_query,
        cancel_with_wrong_key_does_nothing,
        context_never_leaks_between_tenants_on_one_backend,
        copy_out_and_in,
        notices_and_notifications_are_relayed,
        query_continuing_after_commit_is_refused,
        vacuum_reports_transaction_block_with_hint,
        backend_killed_mid_transaction,
        client_gone_mid_transaction_rolls_back,
        reserved_statement_names_refused,
        context_statement_is_reprepared_after_deallocate,
        pgbench_all_modes,
        client_tls_and_require_tls,
        backend_tls_modes,
        guard_refuses_context_changes,
        guard_refusal_inside_transaction_aborts_it,
        guard_refuses_startup_options,
        session_state_is_reset_between_clients,
        role_claim_sets_local_role,
        doctor_reports_and_clears_findings,
        doctor_checks_every_server,
        session_settings_do_not_leak_and_discard_all,
        flush_gets_replies_without_sync,
        prepared_cache_eviction,
        startup_parameters_apply_per_transaction,
        session_set_follows_the_client,
        pooling_refusals_and_session_mode,
        deallocate_of_client_statements,
        statements_prepared_after_a_schema_change_see_it,
        demo_end_to_end,
        superuser_backend_is_refused,
        max_clients_and_auth_timeout,
        graceful_shutdown_drains,
        admin_endpoints_and_metrics,
        readyz_follows_the_backend,
        admin_speaks_http,
        cleartext_listeners_are_warned,
        deploy_manifests_are_valid,
        reload_rotates_keys_without_dropping_clients,
        jwks_url_fetch_rotation_and_outage,
        hostile_framing_gets_fatal_or_close,
        ten_thousand_pipelined_messages,
        client_that_never_reads_is_bounded,
        stuck_clients_do_not_pin_the_backend,
        session_settings_are_capped,
        named_portals_are_capped,
        bypass_execute_of_unknown_portal_is_audited_by_name,
        stuck_audit_log_stalls_nobody_else,
        wide_row_streams_through_bounded_memory,
        wide_rows_and_copy_data_arrive_intact,
        slowloris_logins_do_not_block_others,
        copy_from_stdin_opening_a_transaction,
        lexer_changing_settings_are_refused,
        faults_under_load_lose_nothing,
        fair_queuing_protects_a_quiet_tenant,
        long_transactions_do_not_crowd_out_short_ones,
        tenant_limits_wait_or_refuse,
        bypass_pool_and_audit_log,
        python_clients,
        node_clients,
        pgjdbc_client,
        backend_md5_trust_and_real_tls,
    ]);
}

async fn two_tenants_simple_protocol(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    for t in [1, 2] {
        let c = connect(&p, &token(t, "u")).await.map_err(|e| format!("{e:?}"))?;
        let (n, lo, hi) = tenant_view(&c).await?;
        ensure(n == 100 && lo == t as i32 && hi == t as i32, format!("tenant {t} saw {n} rows of tenants {lo}..{hi}"))?;
    }
    p.stop().await;
    Ok(())
}

async fn two_tenants_extended_protocol(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let a = connect(&p, &token(1, "a")).await.map_err(|e| format!("{e:?}"))?;
    let b = connect(&p, &token(2, "b")).await.map_err(|e| format!("{e:?}"))?;
    for _ in 0..20 {
        for (c, t) in [(&a, 1), (&b, 2)] {
            let rows = c
                .query("select tenant_id, current_setting('app.tenant_id') from orders where tenant_id > $1", &[&0i32])
                .await
                .map_err(|e| format!("{e:?}"))?;
            ensure(rows.len() == 100, format!("tenant {t}: {} rows", rows.len()))?;
            for r in rows {
                let tid: i32 = r.get(0);
                let setting: String = r.get(1);
                ensure(tid == t && setting == t.to_string(), format!("tenant {t} saw tenant {tid} / {setting}"))?;
            }
        }
    }
    p.stop().await;
    Ok(())
}

fn psql(port: u16, token: &str, sql: &str) -> std::process::Output {
    Command::new("psql")
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .arg(format!("host=127.0.0.1 port={port} dbname=app user=alice"))
        .env("PGPASSWORD", token)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql runs")
}

async fn psql_two_tenants(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let port = p.addr.port();
    for t in [1, 3] {
        let tok = token(t, "psql-user");
        let out = tokio::task::spawn_blocking(move || {
            psql(port, &tok, "select count(*), min(tenant_id), max(tenant_id), current_setting('app.user_id') from orders")
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure(out.status.success(), format!("psql failed: {}", String::from_utf8_lossy(&out.stderr)))?;
        ensure(stdout.trim() == format!("100|{t}|{t}|psql-user"), format!("psql tenant {t}: {stdout}"))?;
    }
    p.stop().await;
    Ok(())
}

async fn pipelined_extended_batches(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(2, "pipe")).await.map_err(|e| format!("{e:?}"))?;
    let stmt = c
        .prepare("select count(*)::int, current_setting('app.tenant_id') from orders where tenant_id = $1")
        .await
        .map_err(|e| format!("{e:?}"))?;
    // tokio-postgres pipelines concurrent queries on one connection: many Sync-delimited batches in flight.
    for round in 0..5 {
        let futs = (0..50).map(|i| {
            let c = &c;
            let stmt = &stmt;
            async move {
                let asked: i32 = if i % 2 == 0 { 2 } else { 1 };
                let row = c.query_one(stmt, &[&asked]).await.map_err(|e| format!("{e:?}"))?;
                let n: i32 = row.get(0);
                let s: String = row.get(1);
                let want = if asked == 2 { 100 } else { 0 };
                ensure(n == want && s == "2", format!("round {round} query {i}: asked {asked} got {n} setting {s}"))
            }
        });
        for r in join_all(futs).await {
            r?;
        }
    }
    // pipelined simple queries too (these wait for each other inside the proxy, but must all work)
    let futs = (0..20).map(|_| c.simple_query("select current_setting('app.tenant_id')"));
    for r in join_all(futs).await {
        let msgs = r.map_err(|e| format!("{e:?}"))?;
        let ok = msgs.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("2")));
        ensure(ok, "pipelined simple query lost the context")?;
    }
    p.stop().await;
    Ok(())
}

async fn explicit_transaction_error_and_rollback(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(1, "tx")).await.map_err(|e| format!("{e:?}"))?;
    c.batch_execute("BEGIN").await.map_err(|e| format!("{e:?}"))?;
    c.execute("insert into orders (tenant_id, amount) values (1, 4242.42)", &[]).await.map_err(|e| format!("{e:?}"))?;
    let in_tx: String = c.query_one("select current_setting('app.tenant_id')", &[]).await.map_err(|e| format!("{e:?}"))?.get(0);
    ensure(in_tx == "1", "context lost inside explicit transaction")?;
    let e = c.simple_query("select 1/0").await.err().ok_or("division by zero succeeded")?;
    ensure(db_err(&e).0 == "22012", format!("expected 22012, got {:?}", db_err(&e)))?;
    let e = c.query("select 1", &[]).await.err().ok_or("query in aborted transaction succeeded")?;
    ensure(db_err(&e).0 == "25P02", format!("expected 25P02, got {:?}", db_err(&e)))?;
    c.batch_execute("ROLLBACK").await.map_err(|e| format!("{e:?}"))?;
    let n: i64 = c.query_one("select count(*) from orders where amount = 4242.42", &[]).await.map_err(|e| format!("{e:?}"))?.get(0);
    ensure(n == 0, "rolled back insert is visible")?;
    // savepoints inside a block keep the context
    c.batch_execute("BEGIN; SAVEPOINT s; SELECT 1/0").await.err().ok_or("expected error")?;
    c.batch_execute("ROLLBACK TO SAVEPOINT s").await.map_err(|e| format!("{e:?}"))?;
    let (n, lo, hi) = tenant_view(&c).await?;
    ensure(n == 100 && lo == 1 && hi == 1, format!("after rollback to savepoint saw {n} rows {lo}..{hi}"))?;
    c.batch_execute("COMMIT").await.map_err(|e| format!("{e:?}"))?;
    p.stop().await;
    Ok(())
}

async fn insert_foreign_tenant_blocked_by_with_check(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(1, "evil")).await.map_err(|e| format!("{e:?}"))?;
    let e = c
        .execute("insert into orders (tenant_id, amount) values (2, 1)", &[])
        .await
        .err()
        .ok_or("insert into another tenant succeeded")?;
    let (code, msg) = db_err(&e);
    ensure(code == "42501" && msg.contains("row-level security"), format!("got {code} {msg}"))?;
    let n = c.execute("update orders set amount = amount where tenant_id = 2", &[]).await.map_err(|e| format!("{e:?}"))?;
    ensure(n == 0, "updated another tenant's rows")?;
    p.stop().await;
    Ok(())
}

async fn inserts_land_in_own_tenant(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(3, "inserter")).await.map_err(|e| format!("{e:?}"))?;
    let row = c
        .query_one("insert into orders (tenant_id, amount) values (3, 77.5) returning user_sub", &[])
        .await
        .map_err(|e| format!("{e:?}"))?;
    let sub: String = row.get(0);
    ensure(sub == "inserter", format!("default user_sub from app.user_id was {sub}"))?;
    let owner = env.cluster.psql("app", "select count(*) from orders where amount = 77.5 and tenant_id = 3").map_err(|e| format!("{e:?}"))?;
    ensure(owner.trim() == "1", format!("row not stored: {owner}"))?;
    env.cluster.psql("app", "delete from orders where amount = 77.5").map_err(|e| format!("{e:?}"))?;
    p.stop().await;
    Ok(())
}

async fn claim_values_round_trip_exactly(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let nasty = "it's \"q\" \\ $$ $x$ '); select 1; --\nline2 ünïcødé 🚀";
    let tok = token_with(json!({ "tenant_id": 1, "sub": nasty, "exp": now() + 600, "org": { "id": [1, 2] } }));
    let c = connect(&p, &tok).await.map_err(|e| format!("{e:?}"))?;
    for simple in [true, false] {
        let got: String = if simple {
            let msgs = c.simple_query("select current_setting('app.user_id')").await.map_err(|e| format!("{e:?}"))?;
            msgs.iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                    _ => None,
                })
                .ok_or("no row")?
        } else {
            c.query_one("select current_setting('app.user_id')", &[]).await.map_err(|e| format!("{e:?}"))?.get(0)
        };
        ensure(got == nasty, format!("claim mangled: {got:?}"))?;
    }
    let claims: String = c
        .query_one("select current_setting('request.jwt.claims')", &[])
        .await
        .map_err(|e| format!("{e:?}"))?
        .get(0);
    let v: serde_json::Value = serde_json::from_str(&claims).map_err(|e| format!("{e:?}"))?;
    ensure(v["sub"] == nasty && v["org"]["id"] == json!([1, 2]), format!("claims json wrong: {claims}"))?;
    p.stop().await;
    Ok(())
}

async fn login_error(p: &pgtenant::server::Running, tok: &str) -> (String, String) {
    match connect(p, tok).await {
        Ok(_) => ("".into(), "login succeeded".into()),
        Err(e) => db_err(&e),
    }
}

async fn jwt_failures_have_reasons(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let exp = now() + 600;
    let other = pgtenant::jwt::mint_hs(&json!({"tenant_id": 1, "sub": "x", "exp": exp}), b"another-secret", jsonwebtoken::Algorithm::HS256);
    let none_tok = {
        use base64::Engine as _;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}.", e.encode(br#"{"alg":"none","typ":"JWT"}"#), e.encode(json!({"tenant_id": 1, "exp": exp}).to_string()))
    };
    let cases = [
        (token_with(json!({"tenant_id": 1, "sub": "x", "exp": now() - 3600})), "28P01", "expired"),
        (other, "28P01", "signature"),
        ("not-a-jwt".to_string(), "28P01", "malformed"),
        (none_tok, "28P01", ""),
        (token_with(json!({"tenant_id": 1, "sub": "x", "exp": exp, "nbf": now() + 3600})), "28P01", "not yet valid"),
        (token_with(json!({"tenant_id": 1, "sub": "x"})), "28P01", "exp"),
    ];
    for (tok, code, reason) in cases {
        let (got_code, msg) = login_error(&p, &tok).await;
        ensure(got_code == code && msg.contains(reason), format!("token case {reason:?}: got {got_code} {msg}"))?;
        ensure(!msg.contains(&tok) && !tok.split('.').any(|part| part.len() > 8 && msg.contains(part)), "token echoed in error")?;
    }
    p.stop().await;
    // issuer and audience, when configured
    let text = config_text(env, "", "").replace("[jwt]\n", "[jwt]\nissuer = \"https://issuer.test\"\naudience = \"pgtenant\"\n");
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|e| format!("{e:?}"))?;
    let p = pgtenant::server::start(cfg).await?;
    let good = token_with(json!({"tenant_id": 1, "sub": "x", "exp": exp, "iss": "https://issuer.test", "aud": "pgtenant"}));
    connect(&p, &good).await.map_err(|e| format!("good iss/aud refused: {e}"))?;
    let (c, m) = login_error(&p, &token_with(json!({"tenant_id": 1, "sub": "x", "exp": exp, "iss": "https://issuer.test", "aud": "other"}))).await;
    ensure(c == "28P01" && m.contains("audience"), format!("wrong aud: {c} {m}"))?;
    let (c, m) = login_error(&p, &token_with(json!({"tenant_id": 1, "sub": "x", "exp": exp, "iss": "https://evil.test", "aud": "pgtenant"}))).await;
    ensure(c == "28P01" && m.contains("issuer"), format!("wrong iss: {c} {m}"))?;
    p.stop().await;
    Ok(())
}

async fn missing_claim_rejects_login(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let (code, msg) = login_error(&p, &token_with(json!({"sub": "x", "exp": now() + 600}))).await;
    ensure(code == "28000" && msg.contains("tenant_id"), format!("got {code} {msg}"))?;
    p.stop().await;
    Ok(())
}

async fn wrong_database_is_3d000(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1").port(p.addr.port()).user("alice").dbname("other").password(token(1, "x"));
    let e = cfg.connect(tokio_postgres::NoTls).await.err().ok_or("wrong database accepted")?;
    let (code, msg) = db_err(&e);
    ensure(code == "3D000" && msg.contains("other"), format!("got {code} {msg}"))?;
    p.stop().await;
    Ok(())
}

async fn pool_exhaustion_gives_clear_error(env: &Env) -> TestResult {
    // pool.query_wait_timeout_ms wins over the older backend.acquire_timeout_ms
    let p = start_proxy(env, "pool_size = 1\nacquire_timeout_ms = 5000", "[pool]\nquery_wait_timeout_ms = 300").await;
    let a = connect(&p, &token(1, "a")).await.map_err(|e| format!("{e:?}"))?;
    let b = connect(&p, &token(2, "b")).await.map_err(|e| format!("{e:?}"))?;
    a.batch_execute("BEGIN; SELECT 1").await.map_err(|e| format!("{e:?}"))?;
    let started = Instant::now();
    let e = b.simple_query("select 1").await.err().ok_or("second client got a backend")?;
    let (code, msg) = db_err(&e);
    ensure(code == "53300" && msg.contains("300 ms"), format!("got {code} {msg}"))?;
    ensure(started.elapsed() < Duration::from_secs(3), "acquire timeout not honoured")?;
    // extended protocol gets the same error and the session stays usable
    let e = b.query("select 1", &[]).await.err().ok_or("second client got a backend")?;
    ensure(db_err(&e).0 == "53300", format!("extended: {:?}", db_err(&e)))?;
    a.batch_execute("COMMIT").await.map_err(|e| format!("{e:?}"))?;
    let (n, lo, _) = tenant_view(&b).await?;
    ensure(n == 100 && lo == 2, "client b not served after the pool freed up")?;
    p.stop().await;
    Ok(())
}

async fn cancel_reaches_running_query(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(1, "slow")).await.map_err(|e| format!("{e:?}"))?;
    expect_cancelled(&c, "select pg_sleep(20)", Duration::from_millis(500)).await?;
    let (n, _, _) = tenant_view(&c).await?;
    ensure(n == 100, "session unusable after cancel")?;
    p.stop().await;
    Ok(())
}

async fn cancel_with_wrong_key_does_nothing(env: &Env) -> TestResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(1, "victim")).await.map_err(|e| format!("{e:?}"))?;
    let sleeper = tokio::spawn(async move { c.simple_query("select pg_sleep(1.5)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // guessed keys for every registered session: wrong secret
    let mut s = tokio::net::TcpStream::connect(p.addr).await.map_err(|e| format!("{e:?}"))?;
    let mut msg = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    msg.extend_from_slice(&1234i32.to_be_bytes());
    msg.extend_from_slice(&5678i32.to_be_bytes());
    s.write_all(&msg).await.map_err(|e| format!("{e:?}"))?;
    let mut buf = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    sleeper.await.unwrap().map_err(|e| format!("query was cancelled by a bogus cancel request: {e}"))?;
    p.stop().await;
    Ok(())
}

async fn context_never_leaks_between_tenants_on_one_backend(env: &Env) -> TestResult {
    let p = start_proxy(env, "pool_size = 1", "").await;
    let clients = [
        (connect(&p, &token(1, "one")).await.map_err(|e| format!("{e:?}"))?, 1),
        (connect(&p, &token(2, "two")).await.map_err(|e| format!("{e:?}"))?, 2),
        (connect(&p, &token(3, "three")).await.map_err(|e| format!("{e:?}"))?, 3),
    ];
    let mut pids = std::collections::HashSet::new();
    for i in 0..60 {
        let (c, t) = &clients[i % 3];
        let row = c
            .query_one("select current_setting('app.tenant_id'), current_setting('app.user_id'), pg_backend_pid(), (select count(*) from orders)", &[])
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (tid, _sub, pid, n): (String, String, i32, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
        ensure(tid == t.to_string() && n == 100, format!("tenant {t} saw context {tid} and {n} rows"))?;
        pids.insert(pid);
    }
    ensure(pids.len() == 1, format!("expected one shared backend, saw {}", pids.len()))?;
    // after the transaction the backend carries no context: a direct look at the session shows ''
    p.stop().await;
    Ok(())
}

async fn copy_out_and_in(env: &Env) -> TestResult {
    use futures::{SinkExt, StreamExt};
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(2, "copier")).await.map_err(|e| format!("{e:?}"))?;
    let stream = c.copy_out("COPY (select tenant_id from orders) TO STDOUT").await.map_err(|e| format!("{e:?}"))?;
    let chunks: Vec<_> = stream.collect().await;
    let mut text = Vec::new();
    for ch in chunks {
        text.extend_from_slice(&ch.map_err(|e| format!("{e:?}"))?);
    }
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    ensure(lines.len() == 100 && lines.iter().all(|l| *l == "2"), format!("copy out gave {} lines", lines.len()))?;
    // COPY FROM into an RLS table is refused by Postgres itself (0A000), so COPY IN goes through a
    // temp table inside an explicit transaction, then INSERT ... SELECT applies the policies.
    c.batch_execute("BEGIN; CREATE TEMP TABLE incoming (tenant_id int, amount numeric) ON COMMIT DROP")
        .await
        .map_err(|e| format!("{e:?}"))?;
    let sink = c.copy_in("COPY incoming FROM STDIN").await.map_err(|e| format!("{e:?}"))?;
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"2\t9001\n2\t9002\n")).await.map_err(|e| format!("{e:?}"))?;
    let n = sink.finish().await.map_err(|e| format!("{e:?}"))?;
    ensure(n == 2, format!("copy in reported {n}"))?;
    let moved = c.execute("insert into orders (tenant_id, amount) select tenant_id, amount from incoming", &[]).await.map_err(|e| format!("{e:?}"))?;
    ensure(moved == 2, "insert from copied rows")?;
    c.batch_execute("COMMIT").await.map_err(|e| format!("{e:?}"))?;
    let e = c.simple_query("COPY orders (tenant_id, amount) FROM STDIN").await.err().ok_or("COPY FROM on RLS table accepted")?;
    ensure(db_err(&e).0 == "0A000", format!("copy into rls table: {:?}", db_err(&e)))?;
    let owner = env.cluster.psql("app", "select count(*) from orders where amount in (9001, 9002)").map_err(|e| e.to_string())?;
    ensure(owner.trim() == "2", format!("copied rows stored: {owner}"))?;
    env.cluster.psql("app", "delete from orders where amount in (9001, 9002)").map_err(|e| e.to_string())?;
    p.stop().await;
    Ok(())
}

async fn notices_and_notifications_are_relayed(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "[pool]\nmode = \"session\"").await;
    let port = p.addr.port();
    let tok = token(1, "n");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("psql")
            .args(["-X", "-c", "COMMIT", "-c", "LISTEN chan; NOTIFY chan, 'hello-tenant'"])
            .arg(format!("host=127.0.0.1 port={port} dbname=app user=alice"))
            .env("PGPASSWORD", tok)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure(all.contains("there is no transaction in progress"), format!("notice missing: {all}"))?;
    ensure(all.contains("hello-tenant"), format!("notification missing: {all}"))?;
    p.stop().await;
    Ok(())
}

async fn query_continuing_after_commit_is_refused(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(1, "multi")).await.map_err(|e| format!("{e:?}"))?;
    for q in ["COMMIT; select * from orders", "begin; select 1; rollback; select count(*) from orders", "end; select 1"] {
        let e = c.simple_query(q).await.err().ok_or(format!("{q} was accepted"))?;
        ensure(db_err(&e).0 == "0A000", format!("{q}: {:?}", db_err(&e)))?;
    }
    // the whole-transaction form still works
    c.simple_query("begin; select count(*) from orders; commit").await.map_err(|e| format!("{e:?}"))?;
    // extended protocol: statements after COMMIT in the same batch get the context again
    c.batch_execute("BEGIN").await.map_err(|e| format!("{e:?}"))?;
    let commit = c.prepare("COMMIT").await.map_err(|e| format!("{e:?}"))?;
    let select = c.prepare("select current_setting('app.tenant_id', true)").await.map_err(|e| format!("{e:?}"))?;
    let (r1, r2) = futures::join!(c.execute(&commit, &[]), c.query_one(&select, &[]));
    r1.map_err(|e| format!("{e:?}"))?;
    let s: String = r2.map_err(|e| format!("{e:?}"))?.get(0);
    ensure(s == "1", format!("statement after COMMIT ran with context {s:?}"))?;
    p.stop().await;
    Ok(())
}

async fn vacuum_reports_transaction_block_with_hint(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(1, "v")).await.map_err(|e| format!("{e:?}"))?;
    let e = c.simple_query("VACUUM orders").await.err().ok_or("vacuum succeeded")?;
    let d = e.as_db_error().ok_or("not a db error")?;
    ensure(d.code().code() == "25001", format!("got {:?}", d.code()))?;
    ensure(d.hint().is_some_and(|h| h.contains("pgtenant")), "no pgtenant hint on 25001")?;
    let (n, _, _) = tenant_view(&c).await?;
    ensure(n == 100, "session broken after 25001")?;
    p.stop().await;
    Ok(())
}

async fn backend_killed_mid_transaction(env: &Env) -> TestResult {
    let p = start_proxy(env, "pool_size = 2", "").await;
    let c = connect(&p, &token(1, "victim")).await.map_err(|e| format!("{e:?}"))?;
    c.batch_execute("BEGIN").await.map_err(|e| format!("{e:?}"))?;
    let pid: i32 = c.query_one("select pg_backend_pid()", &[]).await.map_err(|e| format!("{e:?}"))?.get(0);
    env.cluster.psql("app", &format!("select pg_terminate_backend({pid})")).map_err(|e| format!("{e:?}"))?;
    let e = c.simple_query("select 1").await.err().ok_or("query on a killed backend succeeded")?;
    let _ = e; // the client sees an error (57P01 from the server, then the connection closes)
    // new clients are served by fresh connections; the pool recovered
    for t in [1, 2] {
        let c2 = connect(&p, &token(t, "next")).await.map_err(|e| format!("{e:?}"))?;
        let (n, lo, _) = tenant_view(&c2).await?;
        ensure(n == 100 && lo == t as i32, "pool did not recover")?;
    }
    // idle pooled connections killed behind our back are noticed and replaced
    env.cluster
        .psql("app", "select pg_terminate_backend(pid) from pg_stat_activity where usename = 'app_user'")
        .map_err(|e| format!("{e:?}"))?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c3 = connect(&p, &token(3, "after")).await.map_err(|e| format!("{e:?}"))?;
    let (n, lo, _) = tenant_view(&c3).await?;
    ensure(n == 100 && lo == 3, "stale idle connection reused")?;
    p.stop().await;
    Ok(())
}

async fn client_gone_mid_transaction_rolls_back(env: &Env) -> TestResult {
    let p = start_proxy(env, "pool_size = 1", "").await;
    {
        let c = connect(&p, &token(1, "leaver")).await.map_err(|e| format!("{e:?}"))?;
        c.batch_execute("BEGIN; insert into orders (tenant_id, amount) values (1, 31337)").await.map_err(|e| format!("{e:?}"))?;
        drop(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = connect(&p, &token(1, "next")).await.map_err(|e| format!("{e:?}"))?;
    let n: i64 = c.query_one("select count(*) from orders where amount = 31337", &[]).await.map_err(|e| format!("{e:?}"))?.get(0);
    ensure(n == 0, "uncommitted insert of a departed client was committed")?;
    // as the superuser: pgtenant's guard refuses pg_stat_activity to tenants (shared-role interference)
    let status = env
        .cluster
        .psql("app", "select count(*)::text from pg_stat_activity where usename = 'app_user' and state like 'idle in transaction%'")
        .map_err(|e| e.to_string())?;
    ensure(status.trim() == "0", "a backend was left idle in transaction")?;
    p.stop().await;
    Ok(())
}

/// Logs in over a raw socket and reads up to the first ReadyForQuery.
async fn raw_login(p: &pgtenant::server::Running, tok: &str) -> Result<tokio::net::TcpStream, String> {
    raw_login_with(p, tok, &[]).await.map(|(s, _)| s)
}

/// Like `raw_login`, with extra startup parameters; also returns the login's messages.
async fn raw_login_with(p: &pgtenant::server::Running, tok: &str, extra: &[&str]) -> Result<(tokio::net::TcpStream, Vec<u8>), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(p.addr).await.map_err(|e| e.to_string())?;
    let mut startup = Vec::new();
    startup.extend_from_slice(&196608i32.to_be_bytes());
    for kv in ["user", "alice", "database", "app"].iter().chain(extra) {
        startup.extend_from_slice(kv.as_bytes());
        startup.push(0);
    }
    startup.push(0);
    let mut msg = ((startup.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend_from_slice(&startup);
    s.write_all(&msg).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 9];
    s.read_exact(&mut buf).await.map_err(|e| e.to_string())?; // AuthenticationCleartextPassword
    let mut pw = vec![b'p'];
    pw.extend_from_slice(&((tok.len() + 5) as i32).to_be_bytes());
    pw.extend_from_slice(tok.as_bytes());
    pw.push(0);
    s.write_all(&pw).await.map_err(|e| e.to_string())?;
    let got = read_until(&mut s, b"Z\0\0\0\x05I", Duration::from_secs(5)).await;
    ensure(got.ends_with(b"Z\0\0\0\x05I"), "login did not finish")?;
    Ok((s, got))
}

/// Reads until the bytes end with `suffix` or `limit` passes.
async fn read_until(s: &mut tokio::net::TcpStream, suffix: &[u8], limit: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline && !got.ends_with(suffix) {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(deadline - Instant::now(), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    got
}

fn frontend(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Reads backend messages until one with tag `until` arrives (or `limit` passes).
async fn read_messages(s: &mut tokio::net::TcpStream, until: u8, limit: Duration) -> Vec<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let deadline = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut msgs = Vec::new();
    loop {
        while buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < len + 1 {
                break;
            }
            let m: Vec<u8> = buf.drain(..len + 1).collect();
            msgs.push((m[0], m[5..].to_vec()));
            if m[0] == until {
                return msgs;
            }
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return msgs,
        }
    }
}

async fn flush_gets_replies_without_sync(env: &Env) -> TestResult {
    use tokio::io::AsyncWriteExt;
    let p = start_proxy(env, "", "").await;
    let mut s = raw_login(&p, &token(2, "flusher")).await?;
    // Parse + Describe + Flush, no Sync (lib/pq and pgjdbc do this inside BEGIN)
    let mut batch = frontend(b'P', b"\0select current_setting('app.tenant_id')\0\0\0");
    batch.extend(frontend(b'D', b"S\0"));
    batch.extend(frontend(b'H', b""));
    let started = Instant::now();
    s.write_all(&batch).await.map_err(|e| e.to_string())?;
    let msgs = read_messages(&mut s, b'T', Duration::from_secs(3)).await;
    let tags: Vec<u8> = msgs.iter().map(|m| m.0).collect();
    ensure(tags == b"1tT", format!("replies to Parse/Describe/Flush: {:?}", String::from_utf8_lossy(&tags)))?;
    ensure(started.elapsed() < Duration::from_secs(1), format!("Flush replies took {:?}", started.elapsed()))?;
    // Bind/Execute/Sync complete the exchange, with the context applied
    let mut rest = frontend(b'B', b"\0\0\0\0\0\0\0\0");
    rest.extend(frontend(b'E', b"\0\0\0\0\0"));
    rest.extend(frontend(b'S', b""));
    s.write_all(&rest).await.map_err(|e| e.to_string())?;
    let msgs = read_messages(&mut s, b'Z', Duration::from_secs(3)).await;
    let tags: Vec<u8> = msgs.iter().map(|m| m.0).collect();
    ensure(tags == b"2DCZ", format!("replies to Bind/Execute/Sync: {:?}", String::from_utf8_lossy(&tags)))?;
    ensure(msgs[1].1.ends_with(b"\0\0\0\x012"), format!("DataRow {:?}", msgs[1].1))?;
    ensure(msgs[3].1 == b"I", "not idle after Sync")?;
    p.stop().await;
    Ok(())
}

async fn prepared_cache_eviction(env: &Env) -> TestResult {
    let p = start_proxy(env, "pool_size = 1", "[pool]\nprepared_statements_cache = 2").await;
    let c = connect(&p, &token(3, "evict")).await.map_err(|e| format!("{e:?}"))?;
    let mut stmts = Vec::new();
    for i in 0..5 {
        stmts.push(c.prepare(&format!("select {i}::int, count(*) from orders")).await.map_err(|e| format!("{e:?}"))?);
    }
    for round in 0..4 {
        for (i, st) in stmts.iter().enumerate() {
            let row = c.query_one(st, &[]).await.map_err(|e| format!("round {round} stmt {i}: {e:?}"))?;
            let (k, n): (i32, i64) = (row.get(0), row.get(1));
            ensure(k == i as i32 && n == 100, format!("stmt {i}: {k} {n}"))?;
        }
    }
    let server_side: i64 = c
        .query_one("select count(*) from pg_prepared_statements where name like 'pgtenant_s%'", &[])
        .await
        .map_err(|e| format!("{e:?}"))?
        .get(0);
    ensure(server_side <= 3, format!("{server_side} server statements with a cache of 2"))?;
    p.stop().await;
    Ok(())
}

async fn reserved_statement_names_refused(env: &Env) -> TestResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = start_proxy(env, "", "").await;
    // raw protocol: login, then Parse into pgtenant's statement name
    let mut s = raw_login(&p, &token(1, "raw")).await?;
    let mut parse = vec![b'P'];
    let body = b"pgtenant_ctx\0select 1\0\0\0";
    parse.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    parse.extend_from_slice(body);
    parse.extend_from_slice(b"S\0\0\0\x04");
    s.write_all(&parse).await.map_err(|e| format!("{e:?}"))?;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Ok(Err(_)) => break,
        }
        if got.ends_with(b"Z\0\0\0\x05I") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&got);
    ensure(text.contains("42501") && text.contains("reserved"), format!("reply: {text}"))?;
    ensure(got.ends_with(b"Z\0\0\0\x05I"), "no ReadyForQuery after refusal")?;
    p.stop().await;
    Ok(())
}

async fn context_statement_is_reprepared_after_deallocate(env: &Env) -> TestResult {
    let p = start_proxy(env, "pool_size = 1", "").await;
    let c = connect(&p, &token(2, "d")).await.map_err(|e| format!("{e:?}"))?;
    c.prepare("select 1").await.map_err(|e| format!("{e:?}"))?;
    let st = c.prepare("select 7").await.map_err(|e| format!("{e:?}"))?;
    c.simple_query("DEALLOCATE ALL").await.map_err(|e| format!("{e:?}"))?;
    let e = c.query(&st, &[]).await.err().ok_or("statement survived DEALLOCATE ALL")?;
    ensure(db_err(&e).0 == "26000", format!("after DEALLOCATE ALL: {:?}", db_err(&e)))?;
    for q in ["DEALLOCATE ALL", "DEALLOCATE ALL; select 1", "DISCARD PLANS"] {
        c.simple_query(q).await.map_err(|e| format!("{q}: {e:?}"))?;
        let (n, lo, _) = tenant_view(&c).await?;
        ensure(n == 100 && lo == 2, format!("after {q}: {n} rows"))?;
        let s: String = c.query_one("select current_setting('app.tenant_id')", &[]).await.map_err(|e| format!("{e:?}"))?.get(0);
        ensure(s == "2", format!("after {q} context {s}"))?;
    }
    p.stop().await;
    Ok(())
}

async fn pgbench_all_modes(env: &Env) -> TestResult {
    let p = start_proxy(env, "pool_size = 4", "").await;
    let dir = tempfile::tempdir().map_err(|e| format!("{e:?}"))?;
    let script = dir.path().join("rls.sql");
    // a foreign row would make the CASE divide by zero and fail the transaction
    std::fs::write(
        &script,
        "\\set id random(1, 300)\n\
         SELECT 1 / (CASE WHEN tenant_id = current_setting('app.tenant_id')::int THEN 1 ELSE 0 END) FROM orders WHERE id = :id;\n\
         SELECT 1 / (CASE WHEN count(*) = 0 THEN 1 ELSE 0 END) FROM orders WHERE tenant_id <> current_setting('app.tenant_id')::int;\n",
    )
    .map_err(|e| format!("{e:?}"))?;
    let port = p.addr.port();
    // 32 clients on a pool of 4, every protocol mode (issue 4: PgCat #611 broke -M prepared)
    for mode in ["simple", "extended", "prepared"] {
        let tok = token(2, "bench");
        let script = script.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("pgbench")
                .args(["-n", "-c", "32", "-j", "2", "-t", "50", "-M", mode, "-f"])
                .arg(&script)
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "alice", "app"])
                .env("PGPASSWORD", tok)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure(
            out.status.success() && stdout.contains("number of transactions actually processed: 1600/1600"),
            format!("pgbench -M {mode}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)),
        )?;
        ensure(!stdout.contains("number of failed transactions: ") || stdout.contains("number of failed transactions: 0 "), format!("failures: {stdout}"))?;
    }
    p.stop().await;
    Ok(())
}

async fn client_tls_and_require_tls(env: &Env) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .map_err(|e| e.to_string())?;
    ensure(ok.status.success(), format!("openssl: {}", String::from_utf8_lossy(&ok.stderr)))?;
    let server = format!("tls_cert = \"{}\"\ntls_key = \"{}\"\nrequire_tls = true\n", cert.display(), key.display());
    let text = config_text(env, "", "").replace("listen = \"127.0.0.1:0\"\n", &format!("listen = \"127.0.0.1:0\"\n{server}"));
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|e| e.to_string())?;
    let p = pgtenant::server::start(cfg).await?;
    let port = p.addr.port();
    let tok = token(2, "tls");
    let out = tokio::task::spawn_blocking(move || {
        let run = |mode: &str| {
            Command::new("psql")
                .args(["-X", "-At", "-c", "\\conninfo", "-c", "select count(*), min(tenant_id) from orders"])
                .arg(format!("host=127.0.0.1 port={port} dbname=app user=alice sslmode={mode}"))
                .env("PGPASSWORD", &tok)
                .output()
                .unwrap()
        };
        (run("require"), run("disable"))
    })
    .await
    .unwrap();
    let (tls, plain) = out;
    let text = String::from_utf8_lossy(&tls.stdout);
    ensure(tls.status.success() && text.contains("SSL connection") && text.contains("100|2"), format!("psql over TLS: {text} {}", String::from_utf8_lossy(&tls.stderr)))?;
    let err = String::from_utf8_lossy(&plain.stderr);
    ensure(!plain.status.success() && err.contains("requires TLS"), format!("plaintext with require_tls: {err}"))?;
    p.stop().await;
    Ok(())
}

async fn backend_tls_modes(env: &Env) -> TestResult {
    // the test cluster has ssl = off: "prefer" falls back to plaintext, "require" refuses clearly
    let p = start_proxy(env, "tls = \"prefer\"", "").await;
    let c = connect(&p, &token(1, "prefer")).await.map_err(|e| format!("{e:?}"))?;
    let (n, _, _) = tenant_view(&c).await?;
    ensure(n == 100, "prefer did not fall back to plaintext")?;
    p.stop().await;
    let p = start_proxy(env, "tls = \"require\"", "").await;
    let (code, msg) = login_error(&p, &token(1, "require")).await;
    ensure(code == "08006" && msg.contains("TLS"), format!("require against a non-TLS server: {code} {msg}"))?;
    p.stop().await;
    Ok(())
}

/// Rows visible to the client's context, plus the context itself.
async fn assert_still_tenant(c: &tokio_postgres::Client, t: i32) -> TestResult {
    let row = c
        .query_one("select current_setting('app.tenant_id'), count(*), count(*) filter (where tenant_id <> $1) from orders", &[&t])
        .await
        .map_err(|e| format!("{e:?}"))?;
    let (s, n, foreign): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
    ensure(s == t.to_string() && n == 100 && foreign == 0, format!("context {s}, {n} rows, {foreign} foreign"))
}

async fn guard_refuses_context_changes(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(1, "attacker")).await.map_err(|e| format!("{e:?}"))?;
    let attempts = [
        "SET app.tenant_id = '2'; select count(*) from orders",
        "select set_config('app.tenant_id', '2', true), count(*) from orders",
        "select set_config(E'app\\x2etenant_id', '2', false)",
        "select \"set_config\"(U&'app\\002etenant_id', '2', true)",
        "SET ROLE app_owner",
        "RESET app.tenant_id",
        "UPDATE pg_settings SET setting = '2' WHERE name = 'app.tenant_id'",
        "DO $$ BEGIN PERFORM set_config('app.tenant_id', '2', true); END $$",
        "RESET ALL; select count(*) from orders",
    ];
    for sql in attempts {
        let e = c.simple_query(sql).await.err().ok_or(format!("accepted: {sql}"))?;
        let (code, msg) = db_err(&e);
        ensure(code == "42501" && msg.starts_with("pgtenant:"), format!("{sql}: {code} {msg}"))?;
        assert_still_tenant(&c, 1).await?;
    }
    // extended protocol: the Parse is refused; a protected name as a bind parameter is refused at Bind
    for (sql, params) in [("select set_config('app.tenant_id', $1, true)", &["2"][..]), ("select set_config($1, $2, true)", &["app.tenant_id", "2"])] {
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        let e = c.query(sql, &params).await.err().ok_or(format!("accepted: {sql}"))?;
        ensure(db_err(&e).0 == "42501", format!("{sql}: {:?}", db_err(&e)))?;
        assert_still_tenant(&c, 1).await?;
    }
    // a pipelined refusal between two good queries: both good ones keep the right context
    let (a, b, d) = futures::join!(
        c.query_one("select current_setting('app.tenant_id')", &[]),
        c.query("select set_config('app.tenant_id', '3', true)", &[]),
        c.query_one("select current_setting('app.tenant_id')", &[]),
    );
    ensure(b.is_err(), "pipelined set_config accepted")?;
    let (a, d): (String, String) = (a.map_err(|e| format!("{e:?}"))?.get(0), d.map_err(|e| format!("{e:?}"))?.get(0));
    ensure(a == "1" && d == "1", format!("pipelined contexts {a} {d}"))?;
    // reading settings stays allowed, and unprotected settings can be changed
    c.simple_query("select current_setting('app.tenant_id'); SET application_name = 'x'").await.map_err(|e| format!("{e:?}"))?;
    p.stop().await;
    Ok(())
}

async fn guard_refusal_inside_transaction_aborts_it(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(1, "tx-attacker")).await.map_err(|e| format!("{e:?}"))?;
    c.batch_execute("BEGIN; insert into orders (tenant_id, amount) values (1, 5151)").await.map_err(|e| format!("{e:?}"))?;
    let e = c.simple_query("SET LOCAL app.tenant_id = '2'").await.err().ok_or("accepted")?;
    ensure(db_err(&e).0 == "42501", format!("{:?}", db_err(&e)))?;
    // like any error inside a transaction block: aborted until ROLLBACK
    let e = c.simple_query("select 1").await.err().ok_or("transaction not aborted")?;
    ensure(db_err(&e).0 == "25P02", format!("after refusal: {:?}", db_err(&e)))?;
    c.batch_execute("ROLLBACK").await.map_err(|e| format!("{e:?}"))?;
    let n: i64 = c.query_one("select count(*) from orders where amount = 5151", &[]).await.map_err(|e| format!("{e:?}"))?.get(0);
    ensure(n == 0, "insert before the refusal was committed")?;
    assert_still_tenant(&c, 1).await?;
    p.stop().await;
    Ok(())
}

async fn guard_refuses_startup_options(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    for opt in ["-c app.tenant_id=2", "-c role=app_owner"] {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1").port(p.addr.port()).user("alice").dbname("app").password(token(1, "x")).options(opt);
        let e = cfg.connect(tokio_postgres::NoTls).await.err().ok_or(format!("options {opt} accepted"))?;
        ensure(db_err(&e).0 == "42501", format!("{opt}: {:?}", db_err(&e)))?;
    }
    p.stop().await;
    Ok(())
}

async fn session_state_is_reset_between_clients(env: &Env) -> TestResult {
    // session pooling: client a keeps its backend, leaves state behind, and disconnects
    let p = start_proxy(env, "pool_size = 1", "[pool]\nmode = \"session\"").await;
    let pid_a: i32 = {
        let a = connect(&p, &token(1, "a")).await.map_err(|e| format!("{e:?}"))?;
        for sql in [
            "CREATE TEMP TABLE leak AS SELECT * FROM orders",
            "BEGIN; DECLARE held CURSOR WITH HOLD FOR SELECT id, tenant_id FROM orders; COMMIT",
            "SELECT pg_advisory_lock(4242); LISTEN tenant_one; INSERT INTO orders (tenant_id, amount) VALUES (1, 6161)",
            "PREPARE secret_stmt AS SELECT 'tenant one secret'",
        ] {
            a.batch_execute(sql).await.map_err(|e| format!("{sql}: {e:?}"))?;
        }
        // the state is there for a itself across its transactions
        let n: i64 = a.query_one("select count(*) from pg_temp.leak", &[]).await.map_err(|e| format!("{e:?}"))?.get(0);
        ensure(n == 100, "session mode lost the client's temp table")?;
        a.query_one("select pg_backend_pid()", &[]).await.map_err(|e| format!("{e:?}"))?.get(0)
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = connect(&p, &token(2, "b")).await.map_err(|e| format!("{e:?}"))?;
    let pid_b: i32 = b.query_one("select pg_backend_pid()", &[]).await.map_err(|e| format!("{e:?}"))?.get(0);
    ensure(pid_a == pid_b, "expected the same backend")?;
    for (sql, code) in [
        ("select count(*) from pg_temp.leak", "42P01"),
        ("FETCH ALL FROM held", "34000"),
        ("select currval('orders_id_seq')", "55000"),
        ("EXECUTE secret_stmt", "26000"),
    ] {
        let e = b.simple_query(sql).await.err().ok_or(format!("{sql}: tenant 2 saw tenant 1's session state"))?;
        ensure(db_err(&e).0 == code, format!("{sql}: {:?}", db_err(&e)))?;
    }
    let got: bool = b.query_one("select pg_try_advisory_lock(4242)", &[]).await.map_err(|e| format!("{e:?}"))?.get(0);
    ensure(got, "advisory lock of tenant 1 still held")?;
    let listening: i64 = b.query_one("select count(*) from pg_listening_channels()", &[]).await.map_err(|e| format!("{e:?}"))?.get(0);
    ensure(listening == 0, "LISTEN of tenant 1 still active")?;
    env.cluster.psql("app", "delete from orders where amount = 6161").map_err(|e| e.to_string())?;
    p.stop().await;
    Ok(())
}

async fn role_claim_sets_local_role(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "role_claim = \"role\"\nallowed_roles = [\"tenant_reader\"]").await;
    let exp = now() + 600;
    let c = connect(&p, &token_with(json!({"tenant_id": 2, "sub": "r", "exp": exp, "role": "tenant_reader"})))
        .await
        .map_err(|e| format!("{e:?}"))?;
    let row = c.query_one("select current_user::text, count(*) from orders", &[]).await.map_err(|e| format!("{e:?}"))?;
    let (user, n): (String, i64) = (row.get(0), row.get(1));
    ensure(user == "tenant_reader" && n == 100, format!("ran as {user} and saw {n} rows"))?;
    let e = c.execute("insert into orders (tenant_id, amount) values (2, 1)", &[]).await.err().ok_or("read-only role inserted")?;
    ensure(db_err(&e).0 == "42501", format!("{:?}", db_err(&e)))?;
    for (claims, what) in [
        (json!({"tenant_id": 2, "sub": "r", "exp": exp, "role": "app_owner"}), "app_owner"),
        (json!({"tenant_id": 2, "sub": "r", "exp": exp}), "<missing>"),
    ] {
        let (code, msg) = login_error(&p, &token_with(claims)).await;
        ensure(code == "28000" && msg.contains(what), format!("role {what}: {code} {msg}"))?;
    }
    p.stop().await;
    Ok(())
}

fn checks(findings: &[pgtenant::doctor::Finding]) -> std::collections::BTreeSet<String> {
    findings.iter().map(|f| format!("{}:{}", f.check, f.object)).collect()
}

async fn doctor_reports_and_clears_findings(env: &Env) -> TestResult {
    let cfg = |text: &str| pgtenant::config::Config::from_toml(text, &|_| None).map_err(|e| e.to_string());
    let base = config_text(env, "", "");
    let fixture_findings = pgtenant::doctor::run(&cfg(&base)?, None).await?;
    let found = checks(&fixture_findings);
    let expected = [
        "advisory_locks:advisory lock functions",
        "database_temp:current database",
        "query_text_visible:pg_catalog.pg_stat_activity",
        "query_text_visible:pg_catalog.pg_stat_get_activity(integer)",
        "query_text_visible:pg_catalog.pg_stat_get_backend_activity(integer)",
        "setting_unused:app.user_id",
        "signal_functions:pg_catalog.pg_cancel_backend(integer)",
        "signal_functions:pg_catalog.pg_terminate_backend(integer, bigint)",
    ];
    for e in expected {
        ensure(found.contains(e), format!("missing finding {e}: {found:?}"))?;
    }
    ensure(found.len() == expected.len(), format!("unexpected findings on the fixture: {found:?}"))?;

    // the owner role is flagged, and so is a readable table without RLS and a SECURITY DEFINER function
    let owner = base.replace(&env.cluster.url("app_user", "app-secret", "app"), &env.cluster.url("app_owner", "owner-secret", "app"));
    let found = checks(&pgtenant::doctor::run(&cfg(&owner)?, None).await?);
    ensure(found.contains("role_owns_table:public.orders"), format!("owner not flagged: {found:?}"))?;
    env.cluster
        .psql("app", "SET ROLE app_owner; CREATE TABLE notes (x int); GRANT SELECT ON notes TO app_user; \
              CREATE FUNCTION peek() RETURNS bigint LANGUAGE sql SECURITY DEFINER AS 'select count(*) from orders'; \
              CREATE POLICY open_all ON users USING (true)")
        .map_err(|e| e.to_string())?;
    let found = checks(&pgtenant::doctor::run(&cfg(&base)?, Some(&env.cluster.superuser_url("app"))).await?);
    env.cluster.psql("app", "DROP TABLE notes; DROP FUNCTION peek(); DROP POLICY open_all ON users").map_err(|e| e.to_string())?;
    for e in ["table_without_rls:public.notes", "security_definer_function:peek()", "policy_without_tenant_setting:public.users policy open_all"] {
        ensure(found.contains(e), format!("missing finding {e}: {found:?}"))?;
    }

    // fixed database + config: no findings, exit 0; the binary exits 1 while findings remain
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let file = dir.path().join("pgtenant.toml");
    std::fs::write(&file, &base).map_err(|e| e.to_string())?;
    let bin = env!("CARGO_BIN_EXE_pgtenant");
    let out = Command::new(bin).args(["doctor", "--json", "--config"]).arg(&file).output().map_err(|e| e.to_string())?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("doctor --json: {e}"))?;
    ensure(
        out.status.code() == Some(1) && json.as_array().is_some_and(|a| a.len() == expected.len()),
        format!("doctor exit {:?}: {json}", out.status.code()),
    )?;
    // apply exactly the fixes the doctor printed (as a superuser), then undo them afterwards
    let fixes: Vec<String> = fixture_findings.iter().filter_map(|f| f.fix.clone()).flat_map(|f| f.lines().map(str::to_string).collect::<Vec<_>>()).collect();
    ensure(fixes.len() >= 6, format!("doctor printed too few fixes: {fixes:?}"))?;
    env.cluster.psql("app", &fixes.join("\n")).map_err(|e| e.to_string())?;
    std::fs::write(&file, base.replace(", \"app.user_id\" = \"sub\"", "")).map_err(|e| e.to_string())?;
    let out = Command::new(bin).args(["doctor", "--config"]).arg(&file).output().map_err(|e| e.to_string())?;
    let undo: Vec<String> = fixes
        .iter()
        .filter_map(|f| f.trim().strip_prefix("REVOKE ").map(|r| format!("GRANT {};", r.trim_end_matches(';').replacen(" FROM ", " TO ", 1))))
        .collect();
    env.cluster.psql("app", &undo.join("\n")).map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure(out.status.success() && stdout.contains("no findings"), format!("after fixes: {:?} {stdout}", out.status.code()))?;
    Ok(())
}

/// Backend authentication by md5 and trust, and a real TLS handshake to the backend. Runs last: it
/// switches the cluster to ssl = on and back.
async fn backend_md5_trust_and_real_tls(env: &Env) -> TestResult {
    let data = env.cluster.data_dir();
    let hba = data.join("pg_hba.conf");
    let original = std::fs::read_to_string(&hba).map_err(|e| e.to_string())?;
    std::fs::write(&hba, format!("host app md5_user 127.0.0.1/32 md5\nhost app trust_user 127.0.0.1/32 trust\n{original}")).map_err(|e| e.to_string())?;
    let (cert, key) = (data.join("server.crt"), data.join("server.key"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .map_err(|e| e.to_string())?;
    ensure(out.status.success(), "openssl failed")?;
    // the server runs as the postgres user and insists on a private key file
    let _ = Command::new("chown").arg("postgres").arg(&cert).arg(&key).status();
    let _ = Command::new("chmod").arg("600").arg(&key).status();
    env.cluster
        .psql(
            "app",
            "SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN PASSWORD 'md5-pass'; CREATE ROLE trust_user LOGIN; \
             GRANT USAGE ON SCHEMA public TO md5_user, trust_user; GRANT SELECT ON orders TO md5_user, trust_user",
        )
        .map_err(|e| e.to_string())?;
    env.cluster.psql("app", "ALTER SYSTEM SET ssl = on").map_err(|e| e.to_string())?;
    env.cluster.psql("app", "SELECT pg_reload_conf()").map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let result = async {
        let app_url = env.cluster.url("app_user", "app-secret", "app");
        for (url, tls, label) in [
            (env.cluster.url("md5_user", "md5-pass", "app"), "disable", "md5"),
            (format!("postgres://trust_user@127.0.0.1:{}/app", env.cluster.port()), "disable", "trust"),
            (app_url.clone(), "require", "scram over TLS"),
            (app_url, "prefer", "scram, TLS preferred"),
        ] {
            let text = config_text(env, &format!("tls = \"{tls}\""), "").replace(&env.cluster.url("app_user", "app-secret", "app"), &url);
            let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|e| e.to_string())?;
            let p = pgtenant::server::start(cfg).await?;
            let c = connect(&p, &token(3, label)).await.map_err(|e| format!("{label}: {e:?}"))?;
            let row = c
                .query_one("select coalesce((select ssl from pg_stat_ssl where pid = pg_backend_pid()), false), count(*), min(tenant_id) from orders", &[])
                .await
                .map_err(|e| format!("{label}: {e:?}"))?;
            let (ssl, n, t): (bool, i64, i32) = (row.get(0), row.get(1), row.get(2));
            ensure(n == 100 && t == 3, format!("{label}: {n} rows of tenant {t}"))?;
            ensure(ssl == (tls != "disable"), format!("{label}: backend ssl = {ssl}"))?;
            p.stop().await;
        }
        Ok::<(), String>(())
    }
    .await;
    std::fs::write(&hba, original).map_err(|e| e.to_string())?;
    env.cluster.psql("app", "ALTER SYSTEM RESET ssl").map_err(|e| e.to_string())?;
    env.cluster.psql("app", "SELECT pg_reload_conf()").map_err(|e| e.to_string())?;
    result
}

async fn session_settings_do_not_leak_and_discard_all(env: &Env) -> TestResult {
    let p = start_proxy(env, "pool_size = 1", "").await;
    let a = connect(&p, &token(1, "a")).await.map_err(|e| format!("{e:?}"))?;
    let b = connect(&p, &token(2, "b")).await.map_err(|e| format!("{e:?}"))?;
    a.batch_execute("SET statement_timeout = 1234; SET search_path = pg_catalog").await.map_err(|e| format!("{e:?}"))?;
    let row = b.query_one("select current_setting('statement_timeout'), current_setting('search_path')", &[]).await.map_err(|e| format!("{e:?}"))?;
    let (timeout, path): (String, String) = (row.get(0), row.get(1));
    ensure(timeout == "0" && path.contains("public"), format!("client a's SET reached client b: {timeout} / {path}"))?;
    // DISCARD ALL works through the proxy (it cannot run inside the injected transaction on the server)
    let stmt = a.prepare("select 1").await.map_err(|e| format!("{e:?}"))?;
    a.batch_execute("DISCARD ALL").await.map_err(|e| format!("DISCARD ALL: {e:?}"))?;
    let e = a.query(&stmt, &[]).await.err().ok_or("statement survived DISCARD ALL")?;
    ensure(db_err(&e).0 == "26000", format!("after DISCARD ALL: {:?}", db_err(&e)))?;
    let (n, lo, _) = tenant_view(&a).await?;
    ensure(n == 100 && lo == 1, "context lost after DISCARD ALL")?;
    p.stop().await;
    Ok(())
}

async fn startup_parameters_apply_per_transaction(env: &Env) -> TestResult {
    use tokio::io::AsyncWriteExt;
    let p = start_proxy(env, "pool_size = 1", "").await;
    let port = p.addr.port();
    let (tok, tok2) = (token(1, "tz"), token(2, "plain"));
    let (with, without, bad) = tokio::task::spawn_blocking(move || {
        let run = |tok: &str, envs: &[(&str, &str)]| {
            let mut c = Command::new("psql");
            c.args(["-X", "-At", "-c", "select current_setting('TimeZone'), current_setting('application_name'), current_setting('statement_timeout')",
                    "-c", "begin", "-c", "select current_setting('TimeZone')", "-c", "commit"])
                .arg(format!("host=127.0.0.1 port={port} dbname=app user=alice"))
                .env("PGPASSWORD", tok);
            for (k, v) in envs {
                c.env(k, v);
            }
            c.output().unwrap()
        };
        (
            run(&tok, &[("PGTZ", "Asia/Tokyo"), ("PGAPPNAME", "shop"), ("PGOPTIONS", "-c statement_timeout=1234")]),
            run(&tok2, &[]),
            run(&tok2, &[("PGOPTIONS", "-c nonsense_setting=1")]),
        )
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&with.stdout);
    ensure(with.status.success() && out.contains("Asia/Tokyo|shop|1234ms") && out.lines().filter(|l| *l == "Asia/Tokyo").count() == 1,
        format!("client parameters not applied: {out} {}", String::from_utf8_lossy(&with.stderr)))?;
    let out2 = String::from_utf8_lossy(&without.stdout);
    ensure(without.status.success() && !out2.contains("Asia/Tokyo") && !out2.contains("1234ms") && !out2.contains("shop"),
        format!("one client's parameters reached another: {out2}"))?;
    let err = String::from_utf8_lossy(&bad.stderr);
    ensure(!bad.status.success() && err.contains("nonsense_setting"), format!("unknown parameter: {err}"))?;
    // ParameterStatus never contradicts the client's own TimeZone, even across BEGIN ... COMMIT
    let (mut s, login) = raw_login_with(&p, &token(1, "raw"), &["TimeZone", "Asia/Tokyo"]).await?;
    ensure(String::from_utf8_lossy(&login).contains("TimeZone\0Asia/Tokyo"), "login did not report the client's TimeZone")?;
    for q in ["BEGIN", "select now()", "COMMIT", "select 1"] {
        let mut body = q.as_bytes().to_vec();
        body.push(0);
        s.write_all(&frontend(b'Q', &body)).await.map_err(|e| e.to_string())?;
        for (tag, body) in read_messages(&mut s, b'Z', Duration::from_secs(3)).await {
            if tag == b'S' && body.starts_with(b"TimeZone\0") {
                ensure(body.starts_with(b"TimeZone\0Asia/Tokyo"), format!("after {q}: ParameterStatus {:?}", String::from_utf8_lossy(&body)))?;
            }
        }
    }
    p.stop().await;
    Ok(())
}

async fn session_set_follows_the_client(env: &Env) -> TestResult {
    let p = start_proxy(env, "pool_size = 2", "").await;
    let a = connect(&p, &token(1, "a")).await.map_err(|e| format!("{e:?}"))?;
    let b = connect(&p, &token(2, "b")).await.map_err(|e| format!("{e:?}"))?;
    async fn settings(c: &tokio_postgres::Client) -> Result<(String, String, i64), String> {
        let row = c
            .query_one("select current_setting('statement_timeout'), current_setting('TimeZone'), count(*) from orders", &[])
            .await
            .map_err(|e| format!("{e:?}"))?;
        Ok((row.get(0), row.get(1), row.get(2)))
    }
    let (_, default_tz, _) = settings(&b).await?;
    a.batch_execute("SET statement_timeout = 4321").await.map_err(|e| format!("{e:?}"))?;
    a.batch_execute("SET TIME ZONE 'Asia/Tokyo'").await.map_err(|e| format!("{e:?}"))?;
    // hold one backend in a transaction so the clients alternate over backends
    for i in 0..6 {
        let (t, tz, n) = settings(&a).await?;
        ensure(t == "4321ms" && tz == "Asia/Tokyo" && n == 100, format!("round {i}: client a has {t} {tz} {n}"))?;
        let (t, tz, n) = settings(&b).await?;
        ensure(t == "0" && tz == default_tz && n == 100, format!("round {i}: client b has {t} {tz} {n}"))?;
        if i == 2 {
            b.batch_execute("BEGIN").await.map_err(|e| format!("{e:?}"))?;
        }
    }
    b.batch_execute("COMMIT").await.map_err(|e| format!("{e:?}"))?;
    // a failed SET and a rolled back SET are not kept
    let e = a.batch_execute("SET statement_timeout = 'soon'").await.err().ok_or("bad value accepted")?;
    ensure(db_err(&e).0 == "22023", format!("{:?}", db_err(&e)))?;
    a.batch_execute("BEGIN; SET statement_timeout = 99; ROLLBACK").await.map_err(|e| format!("{e:?}"))?;
    let (t, _, _) = settings(&a).await?;
    ensure(t == "4321ms", format!("after failed and rolled back SETs: {t}"))?;
    a.batch_execute("RESET statement_timeout").await.map_err(|e| format!("{e:?}"))?;
    let (t, tz, _) = settings(&a).await?;
    ensure(t == "0" && tz == "Asia/Tokyo", format!("after RESET: {t} {tz}"))?;
    a.batch_execute("RESET ALL").await.map_err(|e| format!("{e:?}"))?;
    let (_, tz, _) = settings(&a).await?;
    ensure(tz == default_tz, format!("after RESET ALL: {tz}"))?;
    // SET through the extended protocol (pgjdbc sends everything that way) is kept as well
    a.execute("SET statement_timeout = 2222", &[]).await.map_err(|e| format!("{e:?}"))?;
    b.batch_execute("BEGIN").await.map_err(|e| format!("{e:?}"))?;
    for i in 0..4 {
        let (t, _, _) = settings(&a).await?;
        ensure(t == "2222ms", format!("extended SET, round {i}: {t}"))?;
    }
    let (t, _, _) = settings(&b).await?;
    ensure(t == "0", format!("client b got client a's extended SET: {t}"))?;
    b.batch_execute("COMMIT").await.map_err(|e| format!("{e:?}"))?;
    p.stop().await;
    Ok(())
}

/// Runs one program of the real-client suite against a fresh proxy with tokens for tenants 1 and 2
/// (appended as `PORT TOKEN_1 TOKEN_2`), prints its per-client lines, and fails if it failed.
async fn client_suite(env: &Env, what: &str, mut cmd: Command) -> TestResult {
    let p = start_proxy(env, "pool_size = 4", "").await;
    cmd.args([p.addr.port().to_string(), token(1, what), token(2, what)]);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        println!("    {line}");
    }
    ensure(out.status.success(), format!("{what} failed:\n{stdout}{}", String::from_utf8_lossy(&out.stderr)))?;
    p.stop().await;
    Ok(())
}


/// Python drivers (installed into tests/clients/.venv by scripts/test.sh): psycopg 3,
/// psycopg_pool, asyncpg, SQLAlchemy 2.
async fn python_clients(env: &Env) -> TestResult {
    let cmd = python_client("python_clients.py")?;
    client_suite(env, "python clients", cmd).await
}

/// Node drivers (installed into tests/clients/node_modules by scripts/test.sh): node-postgres and
/// postgres.js.
async fn node_clients(env: &Env) -> TestResult {
    let cmd = node_client("node_clients.mjs")?;
    client_suite(env, "node clients", cmd).await
}

/// pgjdbc from Debian's libpostgresql-jdbc-java (installed by scripts/test.sh), prepareThreshold=1.
async fn pgjdbc_client(env: &Env) -> TestResult {
    let cmd = java_client("PgjdbcClient.java")?;
    client_suite(env, "pgjdbc", cmd).await
}

async fn pooling_refusals_and_session_mode(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(1, "tx")).await.map_err(|e| format!("{e:?}"))?;
    for sql in ["LISTEN jobs", "DECLARE c CURSOR WITH HOLD FOR SELECT 1", "select pg_advisory_lock(7)", "CREATE TEMP TABLE t (x int)", "PREPARE q AS select 1"] {
        let e = c.simple_query(sql).await.err().ok_or(format!("accepted in transaction pooling: {sql}"))?;
        let d = e.as_db_error().ok_or("not a db error")?;
        ensure(d.code().code() == "0A000" && d.hint().is_some_and(|h| h.contains("pool.mode")), format!("{sql}: {d:?}"))?;
    }
    c.batch_execute("BEGIN; CREATE TEMP TABLE ok (x int) ON COMMIT DROP; select pg_advisory_xact_lock(7); PREPARE q2 AS select 1; EXECUTE q2; COMMIT")
        .await
        .map_err(|e| format!("transaction-scoped forms refused: {e:?}"))?;
    p.stop().await;
    // session pooling: LISTEN works across transactions; tenant settings stay per transaction
    use tokio::io::AsyncWriteExt;
    let p = start_proxy(env, "pool_size = 2", "[pool]\nmode = \"session\"").await;
    let mut a = raw_login(&p, &token(1, "listener")).await?;
    a.write_all(&frontend(b'Q', b"LISTEN jobs\0")).await.map_err(|e| e.to_string())?;
    read_messages(&mut a, b'Z', Duration::from_secs(3)).await;
    let b = connect(&p, &token(2, "notifier")).await.map_err(|e| format!("{e:?}"))?;
    b.batch_execute("NOTIFY jobs, 'job-42'").await.map_err(|e| format!("{e:?}"))?;
    a.write_all(&frontend(b'Q', b"select current_setting('app.tenant_id')\0")).await.map_err(|e| e.to_string())?;
    let msgs = read_messages(&mut a, b'Z', Duration::from_secs(3)).await;
    ensure(msgs.iter().any(|(t, body)| *t == b'A' && body.windows(6).any(|w| w == b"job-42")), "notification not delivered in session mode")?;
    ensure(msgs.iter().any(|(t, body)| *t == b'D' && body.ends_with(b"\x011")), "tenant context missing in session mode")?;
    p.stop().await;
    Ok(())
}

async fn deallocate_of_client_statements(env: &Env) -> TestResult {
    use tokio::io::AsyncWriteExt;
    let p = start_proxy(env, "pool_size = 2", "").await;
    let mut s = raw_login(&p, &token(1, "dealloc")).await?;
    let run = |name: &str| {
        let mut m = frontend(b'B', format!("\0{name}\0\0\0\0\0\0\0").as_bytes());
        m.extend(frontend(b'E', b"\0\0\0\0\0"));
        m.extend(frontend(b'S', b""));
        m
    };
    // named statements, as psycopg prepares them; used, then DEALLOCATEd by name (simple, extended)
    let mut m = frontend(b'P', b"_pg3_0\0select 41 + 1\0\0\0");
    m.extend(frontend(b'P', b"_pg3_1\0select 2\0\0\0"));
    m.extend(frontend(b'S', b""));
    s.write_all(&m).await.map_err(|e| e.to_string())?;
    let tags: Vec<u8> = read_messages(&mut s, b'Z', Duration::from_secs(3)).await.iter().map(|m| m.0).collect();
    ensure(tags == b"11Z", format!("prepare: {:?}", String::from_utf8_lossy(&tags)))?;
    // (one batch at a time: read_messages does not keep bytes past the ReadyForQuery it waits for)
    s.write_all(&run("_pg3_0")).await.map_err(|e| e.to_string())?;
    let msgs = read_messages(&mut s, b'Z', Duration::from_secs(3)).await;
    ensure(msgs.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"42")), format!("statement did not run: {msgs:?}"))?;
    s.write_all(&frontend(b'Q', b"DEALLOCATE _pg3_0\0")).await.map_err(|e| e.to_string())?;
    let msgs = read_messages(&mut s, b'Z', Duration::from_secs(3)).await;
    ensure(msgs.iter().any(|(t, b)| *t == b'C' && b.starts_with(b"DEALLOCATE")), format!("simple DEALLOCATE: {msgs:?}"))?;
    let mut m = frontend(b'P', b"\0DEALLOCATE PREPARE _pg3_1\0\0\0");
    m.extend(run(""));
    s.write_all(&m).await.map_err(|e| e.to_string())?;
    let msgs = read_messages(&mut s, b'Z', Duration::from_secs(3)).await;
    ensure(msgs.iter().any(|(t, b)| *t == b'C' && b.starts_with(b"DEALLOCATE")), format!("extended DEALLOCATE: {msgs:?}"))?;
    for name in ["_pg3_0", "_pg3_1"] {
        s.write_all(&run(name)).await.map_err(|e| e.to_string())?;
        let msgs = read_messages(&mut s, b'Z', Duration::from_secs(3)).await;
        ensure(msgs.iter().any(|(t, b)| *t == b'E' && b.windows(5).any(|w| w == b"26000")), format!("{name} usable after DEALLOCATE: {msgs:?}"))?;
    }
    s.write_all(&frontend(b'Q', b"select current_setting('app.tenant_id')\0")).await.map_err(|e| e.to_string())?;
    let msgs = read_messages(&mut s, b'Z', Duration::from_secs(3)).await;
    ensure(msgs.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"\x011")), "context lost")?;
    p.stop().await;
    Ok(())
}

/// `pgtenant demo` as a user runs it: both printed tenants see only their rows; SIGINT removes the
/// cluster and its processes.
async fn demo_end_to_end(_env: &Env) -> TestResult {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgtenant"))
        .args(["demo", "--port", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (lines, data_dir) = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        let mut data = String::new();
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(i) = line.find("data in ") {
                data = line[i + 8..].trim().to_string();
            }
            let done = line.starts_with("Same query");
            lines.push(line);
            if done {
                break;
            }
        }
        (lines, data)
    })
    .await
    .map_err(|e| e.to_string())?;
    let result = async {
        let commands: Vec<&String> = lines.iter().filter(|l| l.trim_start().starts_with("PGPASSWORD=") && l.contains(" -c ")).collect();
        ensure(commands.len() == 2 && !data_dir.is_empty(), format!("demo output: {lines:?}"))?;
        for (i, cmd) in commands.iter().enumerate() {
            let tenant = i as i32 + 1;
            let tok = cmd.trim_start().trim_start_matches("PGPASSWORD=").split_whitespace().next().unwrap_or_default().to_string();
            let port: u16 = cmd.split("port=").nth(1).and_then(|s| s.split_whitespace().next()).and_then(|p| p.parse().ok()).ok_or("no port")?;
            let mut cfg = tokio_postgres::Config::new();
            cfg.host("127.0.0.1").port(port).user("alice").dbname("app").password(tok);
            let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.map_err(|e| format!("tenant {tenant}: {e:?}"))?;
            tokio::spawn(conn);
            let row = c.query_one("select count(*), min(tenant_id), max(tenant_id) from orders", &[]).await.map_err(|e| format!("{e:?}"))?;
            let (n, lo, hi): (i64, i32, i32) = (row.get(0), row.get(1), row.get(2));
            ensure(n == 100 && lo == tenant && hi == tenant, format!("demo tenant {tenant}: {n} rows of {lo}..{hi}"))?;
        }
        Ok::<(), String>(())
    }
    .await;
    // SAFETY: sending SIGINT to our own child process
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = tokio::task::spawn_blocking(move || child.wait()).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    result?;
    ensure(status.success(), format!("demo exited with {status}"))?;
    let root = std::path::Path::new(&data_dir).parent().ok_or("no data dir parent")?.to_path_buf();
    ensure(!root.exists(), format!("demo left {} behind", root.display()))?;
    let ps = Command::new("pgrep").arg("-f").arg(root.to_string_lossy().as_ref()).output().map_err(|e| e.to_string())?;
    ensure(ps.stdout.is_empty(), "demo left a postgres process behind")?;
    Ok(())
}

async fn superuser_backend_is_refused(env: &Env) -> TestResult {
    let text = config_text(env, "", "").replace(&env.cluster.url("app_user", "app-secret", "app"), &env.cluster.superuser_url("app"));
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|e| e.to_string())?;
    let p = pgtenant::server::start(cfg).await?;
    let (code, msg) = login_error(&p, &token(1, "x")).await;
    ensure(code == "28000" && msg.contains("superuser"), format!("superuser backend: {code} {msg}"))?;
    p.stop().await;
    Ok(())
}

async fn max_clients_and_auth_timeout(env: &Env) -> TestResult {
    let text = config_text(env, "", "").replace("listen = \"127.0.0.1:0\"\n", "listen = \"127.0.0.1:0\"\nmax_clients = 2\nauth_timeout_ms = 500\n");
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|e| e.to_string())?;
    let p = pgtenant::server::start(cfg).await?;
    let a = connect(&p, &token(1, "a")).await.map_err(|e| format!("{e:?}"))?;
    let b = connect(&p, &token(2, "b")).await.map_err(|e| format!("{e:?}"))?;
    let (code, msg) = login_error(&p, &token(3, "c")).await;
    ensure(code == "53300" && msg.contains("max_clients"), format!("third client: {code} {msg}"))?;
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = connect(&p, &token(3, "c")).await.map_err(|e| format!("slot not freed: {e:?}"))?;
    let (n, lo, _) = tenant_view(&c).await?;
    ensure(n == 100 && lo == 3, "third client after a slot freed")?;
    drop((a, c));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // a silent client is dropped after auth_timeout_ms and frees its slot
    let silent = tokio::net::TcpStream::connect(p.addr).await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut s = silent;
    let got = read_until(&mut s, b"never", Duration::from_secs(3)).await;
    ensure(got.is_empty() && started.elapsed() < Duration::from_secs(2), format!("silent client kept {:?}", started.elapsed()))?;
    p.stop().await;
    Ok(())
}

async fn graceful_shutdown_drains(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let addr = p.addr;
    let idle = connect(&p, &token(1, "idle")).await.map_err(|e| format!("{e:?}"))?;
    let busy = connect(&p, &token(2, "busy")).await.map_err(|e| format!("{e:?}"))?;
    busy.batch_execute("BEGIN; insert into orders (tenant_id, amount) values (2, 7272)").await.map_err(|e| format!("{e:?}"))?;
    let shutdown = tokio::spawn(p.shutdown(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // new connections are refused, the idle client was told and closed
    ensure(tokio::net::TcpStream::connect(addr).await.is_err(), "still accepting after shutdown began")?;
    ensure(idle.simple_query("select 1").await.is_err(), "idle client still served while draining")?;
    // the transaction in flight may finish and commit
    busy.batch_execute("insert into orders (tenant_id, amount) values (2, 7273); COMMIT").await.map_err(|e| format!("in-flight transaction cut: {e:?}"))?;
    let left = tokio::time::timeout(Duration::from_secs(5), shutdown).await.map_err(|_| "shutdown did not finish")?.map_err(|e| e.to_string())?;
    ensure(left == 0, format!("{left} clients left after draining"))?;
    ensure(busy.simple_query("select 1").await.is_err(), "client still served after its transaction while draining")?;
    let n = env.cluster.psql("app", "select count(*) from orders where amount in (7272, 7273)").map_err(|e| e.to_string())?;
    ensure(n.trim() == "2", format!("drained transaction not committed: {n}"))?;
    env.cluster.psql("app", "delete from orders where amount in (7272, 7273)").map_err(|e| e.to_string())?;
    Ok(())
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.map_err(|e| e.to_string())?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await.map_err(|_| "admin timed out")?.map_err(|e| e.to_string())?;
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((code, body))
}

async fn admin_endpoints_and_metrics(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "[admin]\nlisten = \"127.0.0.1:0\"").await;
    let admin = p.admin_addr.ok_or("admin endpoint not started")?;
    let c = connect(&p, &token(1, "m")).await.map_err(|e| format!("{e:?}"))?;
    for _ in 0..3 {
        tenant_view(&c).await?;
    }
    let _ = c.simple_query("SET app.tenant_id = '2'").await;
    let _ = login_error(&p, &token_with(json!({"tenant_id": 1, "sub": "x", "exp": now() - 3600}))).await;
    let (code, body) = http_get(admin, "/metrics").await?;
    ensure(code == 200, format!("/metrics {code}"))?;
    for name in [
        "pgtenant_clients", "pgtenant_logins_total", "pgtenant_transactions_total", "pgtenant_transaction_duration_seconds",
        "pgtenant_pool_wait_seconds", "pgtenant_backend_connects_total", "pgtenant_context_injections_total",
        "pgtenant_refusals_total", "pgtenant_client_bytes_total", "pgtenant_ready 1", "pgtenant_pool_size{pool=\"tenant\"} 4",
        "pgtenant_pool_busy{pool=\"tenant\"}", "pgtenant_pool_idle{pool=\"tenant\"}", "pgtenant_pool_waiting{pool=\"tenant\"}",
    ] {
        ensure(body.contains(name), format!("/metrics lacks {name}"))?;
    }
    ensure(body.contains("result=\"rejected\"") && body.contains("sqlstate=\"42501\""), "login/refusal labels missing")?;
    // every metric the proxy exports is documented
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md")).map_err(|e| e.to_string())?;
    for line in body.lines().filter(|l| l.starts_with("pgtenant_")) {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        let base = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
        ensure(doc.contains(base), format!("metric {base} is not documented in docs/operations.md"))?;
    }
    let (code, body) = http_get(admin, "/healthz").await?;
    ensure(code == 200 && body.trim() == "ok", "/healthz")?;
    let (code, _) = http_get(admin, "/readyz").await?;
    ensure(code == 200, format!("/readyz {code}"))?;
    let (code, body) = http_get(admin, "/pools").await?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("/pools: {e}: {body}"))?;
    ensure(code == 200 && v["pools"][0]["size"] == 4 && v["clients"].as_u64() >= Some(1), format!("/pools: {v}"))?;
    ensure(http_get(admin, "/nope").await?.0 == 404, "unknown path")?;
    p.stop().await;
    // a backend that cannot be reached is not ready
    let text = config_text(env, "connect_timeout_ms = 500", "[admin]\nlisten = \"127.0.0.1:0\"")
        .replace(&format!(":{}/app", env.cluster.port()), ":1/app");
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|e| e.to_string())?;
    let dead = pgtenant::server::start(cfg).await?;
    let (code, body) = http_get(dead.admin_addr.ok_or("no admin")?, "/readyz").await?;
    ensure(code == 503 && body.contains("not ready"), format!("/readyz with the backend down: {code} {body}"))?;
    dead.stop().await;
    Ok(())
}

/// deploy/ cannot be run here (no container engine): tests/deploy/validate.py checks the manifests
/// against the documented interface and runs `pgtenant check` on every embedded config.
async fn deploy_manifests_are_valid(_env: &Env) -> TestResult {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join("tests/clients/.venv/bin/python");
    ensure(python.exists(), "tests/clients/.venv missing: run ./scripts/test.sh")?;
    let out = Command::new(python)
        .arg(root.join("tests/deploy/validate.py"))
        .arg(&root)
        .arg(env!("CARGO_BIN_EXE_pgtenant"))
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure(out.status.success(), format!("deploy/ invalid:\n{stdout}{}", String::from_utf8_lossy(&out.stderr)))
}

async fn reload_rotates_keys_without_dropping_clients(env: &Env) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let file = dir.path().join("pgtenant.toml");
    let old_text = config_text(env, "", "[admin]\nlisten = \"127.0.0.1:0\"");
    let new_secret = "rotated-secret-9876543210";
    let new_text = old_text.replace(SECRET, new_secret);
    let new_token = |t: i64| pgtenant::jwt::mint_hs(&json!({"tenant_id": t, "sub": "r", "exp": now() + 600}), new_secret.as_bytes(), jsonwebtoken::Algorithm::HS256);
    std::fs::write(&file, &old_text).map_err(|e| e.to_string())?;
    let cfg = pgtenant::config::Config::load(&file).map_err(|e| e.to_string())?;
    let p = pgtenant::server::start_from(cfg, Some(file.clone())).await?;
    let connected = connect(&p, &token(1, "before")).await.map_err(|e| format!("{e:?}"))?;
    // load: clients of several tenants query in a loop across the reloads below
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..6 {
        let t = 1 + i % 3;
        let c = connect(&p, &token(t, "load")).await.map_err(|e| format!("{e:?}"))?;
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut done = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (n, lo, hi) = tenant_view(&c).await?;
                if n != 100 || lo != t as i32 || hi != t as i32 {
                    return Err(format!("tenant {t} saw {n} rows of tenants {lo}..{hi} during a reload"));
                }
                done += 1;
            }
            Ok::<u32, String>(done)
        }));
    }
    // rotate through POST /reload
    std::fs::write(&file, &new_text).map_err(|e| e.to_string())?;
    let admin = p.admin_addr.ok_or("no admin")?;
    let reply = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(admin).await.map_err(|e| e.to_string())?;
        s.write_all(b"POST /reload HTTP/1.1\r\nHost: x\r\n\r\n").await.map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.map_err(|e| e.to_string())?;
        out
    };
    ensure(reply.starts_with("HTTP/1.1 200"), format!("POST /reload: {reply}"))?;
    let (code, msg) = login_error(&p, &token(1, "old")).await;
    ensure(code == "28P01" && msg.contains("signature"), format!("old key after rotation: {code} {msg}"))?;
    connect(&p, &new_token(2)).await.map_err(|e| format!("new key refused: {e:?}"))?;
    let (n, lo, _) = tenant_view(&connected).await?;
    ensure(n == 100 && lo == 1, "client connected before the reload was disturbed")?;
    // an invalid config is rejected and the running one stays
    std::fs::write(&file, new_text.replace("[jwt]", "[jwt]\nbogus = 1")).map_err(|e| e.to_string())?;
    ensure(p.proxy.reload_from_file().await.is_err(), "invalid config accepted")?;
    connect(&p, &new_token(2)).await.map_err(|e| format!("reload failure broke the running config: {e:?}"))?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        let done = task.await.map_err(|e| e.to_string())??;
        ensure(done > 0, "a loaded client made no progress")?;
    }
    // pool size and wait timeout follow a reload: shrink to one connection while it is in use
    let pool_text = new_text.replace("pool_size = 4", "pool_size = 1").replace("[admin]", "[pool]\nquery_wait_timeout_ms = 200\n[admin]");
    std::fs::write(&file, &pool_text).map_err(|e| e.to_string())?;
    connected.batch_execute("BEGIN; SELECT 1").await.map_err(|e| format!("{e:?}"))?;
    p.proxy.reload_from_file().await?;
    ensure(p.proxy.shared.pool.size() == 1, format!("pool size after reload: {}", p.proxy.shared.pool.size()))?;
    let other = connect(&p, &new_token(2)).await.map_err(|e| format!("{e:?}"))?;
    let e = other.simple_query("select 1").await.err().ok_or("pool did not shrink to one connection")?;
    let (code, msg) = db_err(&e);
    ensure(code == "53300" && msg.contains("200 ms"), format!("after shrinking: {code} {msg}"))?;
    connected.batch_execute("COMMIT").await.map_err(|e| format!("{e:?}"))?;
    let (n, lo, _) = tenant_view(&other).await?;
    ensure(n == 100 && lo == 2, "client not served once the single connection was free")?;
    p.stop().await;

    // SIGHUP to the real binary; it also hands the audit log over to logrotate. It runs on the
    // single-threaded runtime (server.worker_threads = 1; the other binary tests use the default)
    let audit = file.with_file_name("audit.jsonl");
    let with_audit = |t: &str| {
        format!("{}\n[audit]\npath = \"{}\"\n", t.replacen("[server]\n", "[server]\nworker_threads = 1\n", 1), audit.display())
    };
    let (old_text, new_text) = (with_audit(&old_text), with_audit(&new_text));
    std::fs::write(&file, &old_text).map_err(|e| e.to_string())?;
    let (mut child, rx) = spawn_binary(&file)?;
    let port = loop {
        let line = rx.recv_timeout(Duration::from_secs(10)).map_err(|_| "binary did not start")?;
        if let Some(i) = line.find("listen=127.0.0.1:") {
            break line[i + 17..].split_whitespace().next().unwrap_or("").parse::<u16>().map_err(|e| e.to_string())?;
        }
    };
    let login = |tok: String| async move {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1").port(port).user("alice").dbname("app").password(tok);
        cfg.connect(tokio_postgres::NoTls).await.map(|_| ())
    };
    let result = async {
        login(token(1, "x")).await.map_err(|e| format!("binary, old key: {e:?}"))?;
        std::fs::rename(&audit, audit.with_extension("jsonl.1")).map_err(|e| format!("audit log not written: {e}"))?;
        std::fs::write(&file, &new_text).map_err(|e| e.to_string())?;
        // SAFETY: signalling our own child
        unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while login(token(1, "x")).await.is_ok() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure(login(token(1, "x")).await.is_err(), "old key still accepted after SIGHUP")?;
        login(new_token(3)).await.map_err(|e| format!("new key refused after SIGHUP: {e:?}"))?;
        // the rotated file kept the first login; the reopened one has what came after the signal
        let rotated = std::fs::read_to_string(audit.with_extension("jsonl.1")).map_err(|e| e.to_string())?;
        let fresh = std::fs::read_to_string(&audit).map_err(|e| format!("audit log not reopened after SIGHUP: {e}"))?;
        ensure(rotated.lines().count() >= 1 && rotated.lines().all(|l| l.contains("\"result\":\"ok\"")), format!("rotated: {rotated}"))?;
        ensure(fresh.contains("\"tenant\":\"3\"") && fresh.contains("\"result\":\"refused\""), format!("after SIGHUP: {fresh}"))
    }
    .await;
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    result
}

/// A schema change that alters a statement's result (`ALTER TABLE … ADD COLUMN` under `SELECT *`)
/// fails the statements prepared before it with `0A000` ("cached plan must not change result
/// type"), as on the server; but a `Parse` the client sends after the change must prepare afresh, as
/// it would directly, even where the backend holds the same text from before (another client's, or
/// the client's own under another name: pgjdbc prepares again under a new name after this error).
async fn statements_prepared_after_a_schema_change_see_it(env: &Env) -> TestResult {
    let sql = |q: &str| env.cluster.psql("app", q).map_err(|e| format!("{q}: {e}"));
    sql("drop table if exists plan_change; create table plan_change(a int); insert into plan_change values (1); grant select on plan_change to app_user")?;
    let p = start_proxy(env, "pool_size = 1", "").await;
    let a = connect(&p, &token(1, "a")).await.map_err(|e| format!("{e:?}"))?;
    let text = "select * from plan_change";
    let before = a.prepare(text).await.map_err(|e| format!("{e:?}"))?;
    let n = a.query_one(&before, &[]).await.map_err(|e| format!("{e:?}"))?.len();
    ensure(n == 1, format!("{n} columns before the change"))?;
    sql("alter table plan_change add column b int default 2")?;
    // the statement prepared before the change fails, as it does on the server
    let e = a.query_one(&before, &[]).await.err().ok_or("the statement prepared before the change ran")?;
    ensure(db_err(&e).0 == "0A000", format!("stale statement: {:?}", db_err(&e)))?;
    // prepared again after the change, by the same client (pgjdbc's recovery) and by another one
    let b = connect(&p, &token(2, "b")).await.map_err(|e| format!("{e:?}"))?;
    for (who, c) in [("the same client", &a), ("another client", &b), ("the same client again", &a)] {
        for round in 0..2 {
            let st = c.prepare(text).await.map_err(|e| format!("{who}: prepare: {e:?}"))?;
            let row = c.query_one(&st, &[]).await.map_err(|e| format!("{who}, round {round}: {e:?}"))?;
            ensure(row.len() == 2, format!("{who}: {} columns after the change", row.len()))?;
        }
    }
    // and an unnamed statement (tokio-postgres sends the text unprepared with `query_typed`)
    let rows = a.query_typed(text, &[]).await.map_err(|e| format!("unnamed: {e:?}"))?;
    ensure(rows.first().map(|r| r.len()) == Some(2), "unnamed statement after the change")?;
    p.stop().await;
    sql("drop table plan_change")?;
    Ok(())
}
