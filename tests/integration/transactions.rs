//! Transactions through pgtenant behave as on a direct connection (issue 15): isolation levels and
//! the other transaction modes in every spelling and protocol, the session defaults for them,
//! a real serialization failure, two-phase commit refused without leaving anything behind, and
//! `DISCARD ALL` in the extended protocol. Each scenario runs in both pool modes where the mode
//! matters.

mod common;
#[path = "../isolation/wire.rs"]
mod wire;

use std::process::Command;

use common::*;
use tokio_postgres::SimpleQueryMessage;
use wire::Wire;

fn main() {
    run_all(tests![
        isolation_levels_simple_protocol,
        isolation_levels_extended_and_pipelined,
        isolation_with_statements_in_one_query_is_refused,
        session_defaults_for_transactions,
        serialization_failure_between_two_clients,
        snapshot_import,
        two_phase_commit_is_refused,
        discard_all_extended_protocol,
        signed_context_names_its_backend_and_follows_reload,
        connects_when_the_role_cannot_read_backend_activity,
        python_drivers,
        node_drivers,
        pgjdbc_driver,
    ]);
}

const MODES: [(&str, &str); 2] = [("transaction", ""), ("session", "[pool]\nmode = \"session\"")];

fn e(err: tokio_postgres::Error) -> String {
    format!("{err:?}")
}

/// The first row of a simple query, as text.
async fn row(c: &tokio_postgres::Client, sql: &str) -> Result<Vec<String>, String> {
    let msgs = c.simple_query(sql).await.map_err(e)?;
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((0..r.len()).map(|i| r.get(i).unwrap_or("NULL").to_string()).collect()),
            _ => None,
        })
        .ok_or_else(|| format!("no row from {sql}"))
}

const MODES_SQL: &str = "select current_setting('transaction_isolation'), current_setting('transaction_read_only'), \
     current_setting('transaction_deferrable'), current_setting('app.tenant_id')";

async fn expect_modes(c: &tokio_postgres::Client, want: [&str; 3], what: &str) -> TestResult {
    let got = row(c, MODES_SQL).await?;
    ensure(got[..3] == want && got[3] == "1", format!("{what}: got {got:?}, want {want:?} with tenant 1"))
}

async fn isolation_levels_simple_protocol(env: &Env) -> TestResult {
    for (mode, extra) in MODES {
        let p = start_proxy(env, "", extra).await;
        let c = connect(&p, &token(1, "iso")).await.map_err(e)?;
        let cases: [(&[&str], [&str; 3]); 6] = [
            (&["BEGIN ISOLATION LEVEL SERIALIZABLE"], ["serializable", "off", "off"]),
            (&["BEGIN", "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"], ["repeatable read", "off", "off"]),
            (&["BEGIN TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE"], ["serializable", "on", "on"]),
            (&["START TRANSACTION READ ONLY, DEFERRABLE"], ["read committed", "on", "on"]),
            (&["BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE READ ONLY"], ["serializable", "on", "off"]),
            (&["BEGIN", "SET transaction_isolation = 'serializable'"], ["serializable", "off", "off"]),
        ];
        for (setup, want) in cases {
            for s in setup {
                c.batch_execute(s).await.map_err(|err| format!("{mode}: {s}: {}", e(err)))?;
            }
            expect_modes(&c, want, &format!("{mode}: {setup:?}")).await?;
            c.batch_execute("COMMIT").await.map_err(e)?;
        }
        // after the transactions, autocommit statements are back to the defaults
        expect_modes(&c, ["read committed", "off", "off"], &format!("{mode}: autocommit after")).await?;
        // a failed BEGIN does not leave a statement without its context
        let err = c.batch_execute("BEGIN ISOLATION LEVEL bogus").await.err().ok_or("bogus level accepted")?;
        ensure(db_err(&err).0 == "42601", format!("bogus level: {:?}", db_err(&err)))?;
        expect_modes(&c, ["read committed", "off", "off"], &format!("{mode}: after failed BEGIN")).await?;
        // a read-only transaction refuses writes as the server does
        c.batch_execute("BEGIN READ ONLY").await.map_err(e)?;
        let err = c.batch_execute("insert into orders (tenant_id, amount) values (1, 1)").await.err().ok_or("write in read-only tx")?;
        ensure(db_err(&err).0 == "25006", format!("read-only insert: {:?}", db_err(&err)))?;
        c.batch_execute("ROLLBACK").await.map_err(e)?;
        p.stop().await;
    }
    Ok(())
}

async fn isolation_levels_extended_and_pipelined(env: &Env) -> TestResult {
    for (mode, extra) in MODES {
        let p = start_proxy(env, "", extra).await;
        // tokio-postgres: its transaction builder, then extended-protocol queries
        let mut c = connect(&p, &token(1, "iso")).await.map_err(e)?;
        {
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::Serializable)
                .read_only(true)
                .deferrable(true)
                .start()
                .await
                .map_err(e)?;
            let r = tx.query_one(MODES_SQL, &[]).await.map_err(e)?;
            let got: Vec<String> = (0..4).map(|i| r.get::<_, String>(i)).collect();
            ensure(got == ["serializable", "on", "on", "1"], format!("{mode}: builder: {got:?}"))?;
            tx.commit().await.map_err(e)?;
        }
        // BEGIN through the extended protocol
        c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ", &[]).await.map_err(e)?;
        let r = c.query_one(MODES_SQL, &[]).await.map_err(e)?;
        ensure(r.get::<_, String>(0) == "repeatable read", format!("{mode}: extended BEGIN: {:?}", r.get::<_, String>(0)))?;
        c.execute("COMMIT", &[]).await.map_err(e)?;

        // raw wire: BEGIN, SET TRANSACTION and the first query pipelined in one batch, and in
        // separate batches sent before any reply
        let mut w = Wire::connect(p.addr, &token(1, "wire")).await?;
        let batch = [
            wire::unnamed("BEGIN"),
            wire::unnamed("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, DEFERRABLE"),
            wire::unnamed(MODES_SQL),
            wire::unnamed("COMMIT"),
            wire::sync(),
        ]
        .concat();
        let r = w.round(&batch, 1).await;
        ensure(r.ok() && r.rows.len() == 1, format!("{mode}: one batch: {}", r.summary()))?;
        ensure(r.rows[0] == [Some("serializable".into()), Some("off".into()), Some("on".into()), Some("1".into())], format!("{mode}: one batch: {:?}", r.rows))?;
        ensure(r.tags == ["BEGIN", "SET", "SELECT 1", "COMMIT"], format!("{mode}: tags {:?}", r.tags))?;
        let batches = [
            wire::extended("BEGIN ISOLATION LEVEL REPEATABLE READ"),
            wire::extended(MODES_SQL),
            wire::extended("COMMIT"),
            wire::extended(MODES_SQL),
        ]
        .concat();
        let r = w.round(&batches, 4).await;
        ensure(r.ok() && r.rows.len() == 2, format!("{mode}: pipelined batches: {}", r.summary()))?;
        ensure(r.rows[0][0].as_deref() == Some("repeatable read") && r.rows[0][3].as_deref() == Some("1"), format!("{mode}: pipelined: {:?}", r.rows))?;
        ensure(r.rows[1][0].as_deref() == Some("read committed") && r.rows[1][3].as_deref() == Some("1"), format!("{mode}: after commit: {:?}", r.rows))?;
        ensure(r.readies == b"TTII", format!("{mode}: statuses {:?}", String::from_utf8_lossy(&r.readies)))?;
        // simple queries pipelined the same way
        let queries = [wire::query("BEGIN ISOLATION LEVEL SERIALIZABLE"), wire::query(MODES_SQL), wire::query("COMMIT")].concat();
        let r = w.round(&queries, 3).await;
        ensure(r.ok() && r.rows.first().and_then(|r| r[0].clone()).as_deref() == Some("serializable"), format!("{mode}: pipelined simple: {}", r.summary()))?;
        ensure(r.readies == b"TTI", format!("{mode}: statuses {:?}", String::from_utf8_lossy(&r.readies)))?;
        w.close().await;
        p.stop().await;
    }
    Ok(())
}

async fn isolation_with_statements_in_one_query_is_refused(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(1, "mixed")).await.map_err(e)?;
    for sql in ["BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT 1", "BEGIN; SET TRANSACTION READ ONLY; SELECT count(*) FROM orders"] {
        let err = c.batch_execute(sql).await.err().ok_or(format!("{sql} ran"))?;
        ensure(db_err(&err).0 == "0A000", format!("{sql}: {:?}", db_err(&err)))?;
    }
    // nothing was left open: the client is idle and its next transaction works
    let mut w = Wire::connect(p.addr, &token(1, "mixed")).await?;
    let r = w.simple("BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT 1").await;
    ensure(r.code() == Some("0A000") && r.readies == b"I" && r.rows.is_empty(), format!("wire: {}", r.summary()))?;
    // inside an open transaction that has not run a query yet, the same
    let r = w.simple("BEGIN").await;
    ensure(r.ok(), r.summary())?;
    let r = w.simple("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; SELECT 1").await;
    ensure(r.code() == Some("0A000") && r.readies == b"E", format!("in block: {}", r.summary()))?;
    let r = w.simple("ROLLBACK").await;
    ensure(r.ok() && r.readies == b"I", r.summary())?;
    // plain BEGIN with statements after it is fine
    let r = w.simple("BEGIN; SELECT current_setting('app.tenant_id'); COMMIT").await;
    ensure(r.ok() && r.get(0, 0) == "1", format!("plain begin: {}", r.summary()))?;
    w.close().await;
    p.stop().await;
    Ok(())
}

async fn session_defaults_for_transactions(env: &Env) -> TestResult {
    for (mode, extra) in MODES {
        // pool of one: every client shares the backend, so a leak would show
        let p = start_proxy(env, "pool_size = 1", extra).await;
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1").port(p.addr.port()).user("alice").dbname("app").password(token(1, "opt"));
        cfg.options("-c default_transaction_isolation=serializable");
        let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.map_err(e)?;
        tokio::spawn(conn);
        expect_modes(&c, ["serializable", "off", "off"], &format!("{mode}: options, autocommit")).await?;
        c.batch_execute("BEGIN").await.map_err(e)?;
        expect_modes(&c, ["serializable", "off", "off"], &format!("{mode}: options, BEGIN")).await?;
        c.batch_execute("COMMIT; BEGIN ISOLATION LEVEL READ COMMITTED").await.err().ok_or("commit; begin in one query")?;
        c.batch_execute("ROLLBACK").await.map_err(e)?;
        c.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED").await.map_err(e)?;
        expect_modes(&c, ["read committed", "off", "off"], &format!("{mode}: explicit level over default")).await?;
        c.batch_execute("COMMIT").await.map_err(e)?;
        // extended protocol sees it too
        let r = c.query_one("select current_setting('transaction_isolation')", &[]).await.map_err(e)?;
        ensure(r.get::<_, String>(0) == "serializable", format!("{mode}: extended: {}", r.get::<_, String>(0)))?;

        // another client on the same backend keeps the role's defaults
        if mode == "transaction" {
            let other = connect(&p, &token(1, "other")).await.map_err(e)?;
            expect_modes(&other, ["read committed", "off", "off"], "another client on the backend").await?;
        }

        // SET and SET SESSION CHARACTERISTICS change them for later transactions
        if mode == "session" {
            drop(c); // session mode: the backend is c's until it leaves
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let c2 = connect(&p, &token(1, "set")).await.map_err(e)?;
        c2.batch_execute("SET default_transaction_isolation = 'repeatable read'").await.map_err(e)?;
        expect_modes(&c2, ["repeatable read", "off", "off"], &format!("{mode}: SET default")).await?;
        c2.batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY").await.map_err(e)?;
        expect_modes(&c2, ["serializable", "on", "off"], &format!("{mode}: SESSION CHARACTERISTICS")).await?;
        let err = c2.batch_execute("insert into orders (tenant_id, amount) values (1, 1)").await.err().ok_or("insert in read-only default")?;
        ensure(db_err(&err).0 == "25006", format!("{mode}: read-only default insert: {:?}", db_err(&err)))?;
        c2.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", &[]).await.map_err(e)?;
        expect_modes(&c2, ["serializable", "off", "off"], &format!("{mode}: extended SESSION CHARACTERISTICS")).await?;
        c2.batch_execute("RESET ALL").await.map_err(e)?;
        expect_modes(&c2, ["read committed", "off", "off"], &format!("{mode}: RESET ALL")).await?;
        c2.batch_execute("SET default_transaction_deferrable = on; SET default_transaction_isolation = serializable; SET default_transaction_read_only = on").await.map_err(e)?;
        expect_modes(&c2, ["serializable", "on", "on"], &format!("{mode}: all three")).await?;
        c2.batch_execute("RESET default_transaction_read_only; RESET default_transaction_deferrable; RESET default_transaction_isolation").await.map_err(e)?;
        expect_modes(&c2, ["read committed", "off", "off"], &format!("{mode}: RESET each")).await?;
        drop(c2);
        if mode == "transaction" {
            let other = connect(&p, &token(1, "after")).await.map_err(e)?;
            expect_modes(&other, ["read committed", "off", "off"], "a later client").await?;
        }
        p.stop().await;
    }
    Ok(())
}

/// Write skew under SERIALIZABLE, two clients through pgtenant: one of them gets 40001.
async fn serialization_failure_between_two_clients(env: &Env) -> TestResult {
    for (mode, extra) in MODES {
        let p = start_proxy(env, "", extra).await;
        let a = connect(&p, &token(1, "a")).await.map_err(e)?;
        let b = connect(&p, &token(1, "b")).await.map_err(e)?;
        let mut failures = Vec::new();
        for (c, amount) in [(&a, 90001), (&b, 90002)] {
            c.batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE").await.map_err(e)?;
            let n = row(c, "select count(*) from orders where amount > 90000").await?;
            ensure(n[0] == "0", format!("{mode}: leftover rows {n:?}"))?;
            let _ = amount;
        }
        for (c, amount) in [(&a, 90001), (&b, 90002)] {
            if let Err(err) = c.batch_execute(&format!("insert into orders (tenant_id, amount) values (1, {amount})")).await {
                failures.push(db_err(&err).0);
                c.batch_execute("ROLLBACK").await.map_err(e)?;
                continue;
            }
            if let Err(err) = c.batch_execute("COMMIT").await {
                failures.push(db_err(&err).0);
            }
        }
        ensure(failures == ["40001"], format!("{mode}: expected one serialization failure, got {failures:?}"))?;
        a.batch_execute("delete from orders where amount > 90000").await.map_err(e)?;
        p.stop().await;
    }
    Ok(())
}

/// `SET TRANSACTION SNAPSHOT` of a snapshot exported by another client.
async fn snapshot_import(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let a = connect(&p, &token(1, "a")).await.map_err(e)?;
    let b = connect(&p, &token(1, "b")).await.map_err(e)?;
    a.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await.map_err(e)?;
    let snap = row(&a, "select pg_export_snapshot()").await?.remove(0);
    let before = row(&a, "select count(*) from orders").await?.remove(0);
    // a row committed after the export is invisible in the imported snapshot
    let c = connect(&p, &token(1, "c")).await.map_err(e)?;
    c.batch_execute("insert into orders (tenant_id, amount) values (1, 77777)").await.map_err(e)?;
    b.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await.map_err(e)?;
    b.batch_execute(&format!("SET TRANSACTION SNAPSHOT '{snap}'")).await.map_err(e)?;
    let seen = row(&b, "select count(*), current_setting('app.tenant_id') from orders").await?;
    ensure(seen == [before.clone(), "1".to_string()], format!("imported snapshot saw {seen:?}, exporter {before}"))?;
    b.batch_execute("COMMIT").await.map_err(e)?;
    a.batch_execute("COMMIT").await.map_err(e)?;
    c.batch_execute("delete from orders where amount = 77777").await.map_err(e)?;
    p.stop().await;
    Ok(())
}

async fn two_phase_commit_is_refused(env: &Env) -> TestResult {
    let prepared = |env: &Env| env.cluster.psql("app", "select count(*) from pg_prepared_xacts").map(|s| s.trim().to_string()).map_err(|err| err.to_string());
    for (mode, extra) in MODES {
        let p = start_proxy(env, "", extra).await;
        let c = connect(&p, &token(1, "2pc")).await.map_err(e)?;
        c.batch_execute("BEGIN").await.map_err(e)?;
        c.batch_execute("insert into orders (tenant_id, amount) values (1, 31337)").await.map_err(e)?;
        let err = c.batch_execute("PREPARE TRANSACTION 'pgtenant-test'").await.err().ok_or("PREPARE TRANSACTION ran")?;
        ensure(db_err(&err).0 == "0A000", format!("{mode}: prepare: {:?}", db_err(&err)))?;
        // the transaction is aborted like after a server error, and nothing is left prepared
        let err = c.batch_execute("select 1").await.err().ok_or("aborted transaction ran a query")?;
        ensure(db_err(&err).0 == "25P02", format!("{mode}: after refusal: {:?}", db_err(&err)))?;
        c.batch_execute("ROLLBACK").await.map_err(e)?;
        ensure(prepared(env)? == "0", format!("{mode}: a prepared transaction was left behind"))?;
        let n = row(&c, "select count(*) from orders where amount = 31337").await?;
        ensure(n[0] == "0", format!("{mode}: the refused transaction's insert is visible"))?;
        // extended protocol too
        let err = c.execute("PREPARE TRANSACTION 'x'", &[]).await.err().ok_or("extended PREPARE TRANSACTION ran")?;
        ensure(db_err(&err).0 == "0A000", format!("{mode}: extended prepare: {:?}", db_err(&err)))?;
        p.stop().await;
    }
    // a transaction prepared directly by the shared role cannot be finished through pgtenant
    env.cluster
        .psql("app", "set role app_user; begin; select 1; prepare transaction 'direct-2pc'")
        .map_err(|err| format!("direct prepare: {err}"))?;
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(1, "2pc")).await.map_err(e)?;
    for sql in ["COMMIT PREPARED 'direct-2pc'", "ROLLBACK PREPARED 'direct-2pc'"] {
        let err = c.batch_execute(sql).await.err().ok_or(format!("{sql} ran"))?;
        ensure(db_err(&err).0 == "0A000", format!("{sql}: {:?}", db_err(&err)))?;
    }
    let left = prepared(env)?;
    env.cluster.psql("app", "rollback prepared 'direct-2pc'").map_err(|err| err.to_string())?;
    ensure(left == "1", format!("the directly prepared transaction is gone: {left}"))?;
    p.stop().await;
    Ok(())
}

async fn discard_all_extended_protocol(env: &Env) -> TestResult {
    for (mode, extra) in MODES {
        let p = start_proxy(env, "", extra).await;
        let c = connect(&p, &token(1, "discard")).await.map_err(e)?;
        c.batch_execute("SET application_name = 'before'; SET statement_timeout = '7s'").await.map_err(e)?;
        if mode == "session" {
            c.batch_execute("PREPARE q AS select 1").await.map_err(e)?; // refused when pooling transactions
        }
        let n = c.execute("DISCARD ALL", &[]).await.map_err(|err| format!("{mode}: {}", e(err)))?;
        ensure(n == 0, format!("{mode}: DISCARD ALL returned {n} rows"))?;
        let got = row(&c, "select current_setting('statement_timeout'), current_setting('app.tenant_id')").await?;
        ensure(got == ["0", "1"], format!("{mode}: after DISCARD ALL: {got:?}"))?;
        if mode == "session" {
            let err = c.batch_execute("EXECUTE q").await.err().ok_or("prepared statement survived DISCARD ALL")?;
            ensure(db_err(&err).0 == "26000", format!("{mode}: EXECUTE q: {:?}", db_err(&err)))?;
        }

        // raw: the exact replies, and statements after it in the same batch keep the context
        let mut w = Wire::connect(p.addr, &token(1, "discard-wire")).await?;
        let r = w.round(&[wire::parse("s1", "select 1", &[]), wire::sync()].concat(), 1).await;
        ensure(r.ok(), r.summary())?;
        let batch = [wire::unnamed("DISCARD ALL"), wire::unnamed("select current_setting('app.tenant_id')"), wire::sync()].concat();
        let r = w.round(&batch, 1).await;
        ensure(r.ok() && r.tags == ["DISCARD ALL", "SELECT 1"] && r.get(0, 0) == "1", format!("{mode}: raw: {}", r.summary()))?;
        ensure(r.trace.replace('S', "") == "12nC12TDCZ", format!("{mode}: replies {}", r.trace))?;
        // s1 is gone, like on the server
        let r = w.round(&[wire::bind("", "s1", &[]), wire::execute("", 0), wire::sync()].concat(), 1).await;
        ensure(r.code() == Some("26000"), format!("{mode}: s1 after discard: {}", r.summary()))?;
        // not first in its batch: the server's own error, as on a direct connection
        let batch = [wire::unnamed("select 1"), wire::unnamed("DISCARD ALL"), wire::sync()].concat();
        let r = w.round(&batch, 1).await;
        ensure(r.code() == Some("25001") && r.readies == b"I", format!("{mode}: discard after a statement: {}", r.summary()))?;
        // inside a transaction block: the server's error
        let r = w.simple("BEGIN").await;
        ensure(r.ok(), r.summary())?;
        let r = w.ext("DISCARD ALL").await;
        ensure(r.code() == Some("25001") && r.readies == b"E", format!("{mode}: discard in block: {}", r.summary()))?;
        let r = w.simple("ROLLBACK").await;
        ensure(r.ok(), r.summary())?;
        w.close().await;
        p.stop().await;
    }
    Ok(())
}

/// With `tenant.signing_key`, every transaction carries `pgtenant.context` (naming the backend it
/// runs on) and its HMAC; a reload moves running sessions to the new key; clients cannot set them.
async fn signed_context_names_its_backend_and_follows_reload(env: &Env) -> TestResult {
    use pgtenant::signing::{BackendId, Signer};
    let k1 = "k1-secret-0123456789abcdef0123456789";
    let k2 = "k2-secret-abcdef0123456789abcdef0123";
    let text = |kid: &str, key: &str| config_text(env, "pool_size = 3", &format!("signing_key = \"{key}\"\nsigning_kid = \"{kid}\""));
    let cfg = pgtenant::config::Config::from_toml(&text("k1", k1), &|_| None).map_err(|e| e.to_string())?;
    let p = pgtenant::server::start(cfg).await?;
    let c = connect(&p, &token(1, "signed")).await.map_err(e)?;
    let sql = "select current_setting('pgtenant.context'), current_setting('pgtenant.signature'), pg_backend_pid()::text";
    // the backend's start, as the database's verifying function reads it (pgtenant's guard keeps
    // pg_stat_get_activity from tenants, so ask as the superuser)
    let with_start = |mut r: Vec<String>| -> Result<Vec<String>, String> {
        let started = env
            .cluster
            .psql("app", &format!("select extract(epoch from backend_start)::text from pg_stat_get_activity({})", r[2]))
            .map_err(|err| err.to_string())?;
        r.push(started.trim().to_string());
        Ok(r)
    };
    let check = |row: Vec<String>, kid: &str, key: &str| -> TestResult {
        let payload: serde_json::Value = serde_json::from_str(&row[0]).map_err(|err| format!("payload {}: {err}", row[0]))?;
        ensure(payload["pid"].as_i64().map(|p| p.to_string()).as_deref() == Some(row[2].as_str()) && payload["bs"] == row[3].as_str(), format!("payload names another backend: {payload} vs pid {} start {}", row[2], row[3]))?;
        ensure(payload["kid"] == kid && payload["settings"]["app.tenant_id"] == "1" && payload["settings"]["app.user_id"] == "signed", format!("payload {payload}"))?;
        ensure(payload["settings"]["request.jwt.claims"].as_str().is_some_and(|c| c.contains("\"tenant_id\":1")), format!("claims in {payload}"))?;
        let backend = BackendId { pid: row[2].parse().map_err(|_| "pid")?, started: row[3].clone() };
        let settings: Vec<(String, String)> = payload["settings"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
        let expect = Signer::new(kid, key.as_bytes()).signed(&settings, payload["iat"].as_i64().unwrap_or(0), &backend);
        ensure(expect == (row[0].clone(), row[1].clone()), format!("signature does not verify with {kid}: {row:?}"))
    };
    let first = with_start(row(&c, sql).await?)?;
    check(first.clone(), "k1", k1)?;
    check(with_start(row(&c, sql).await?)?, "k1", k1)?;
    // that backend goes away: the next transaction runs on another one, signed for it
    env.cluster.psql("app", &format!("select pg_terminate_backend({})", first[2])).map_err(|err| err.to_string())?;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let second = with_start(row(&c, sql).await?)?;
    ensure(second[2] != first[2], "still on the terminated backend")?;
    check(second, "k1", k1)?;
    // reload with k2: the same session signs with it from its next transaction
    p.proxy.reload(&pgtenant::config::Config::from_toml(&text("k2", k2), &|_| None).map_err(|e| e.to_string())?).await?;
    check(with_start(row(&c, sql).await?)?, "k2", k2)?;
    // the client may not set them
    for bad in ["select set_config('pgtenant.context', '{}', true)", "SET pgtenant.signature = 'x'"] {
        let err = c.batch_execute(bad).await.err().ok_or(format!("{bad} ran"))?;
        ensure(db_err(&err).0 == "42501", format!("{bad}: {:?}", db_err(&err)))?;
    }
    p.stop().await;
    Ok(())
}

/// The doctor's `query_text_visible` fix revokes pg_stat_get_activity from PUBLIC: pgtenant, which
/// reads its backends' start time with it (for signed contexts), must still serve clients.
async fn connects_when_the_role_cannot_read_backend_activity(env: &Env) -> TestResult {
    env.cluster
        .psql("app", "REVOKE EXECUTE ON FUNCTION pg_catalog.pg_stat_get_activity(integer) FROM PUBLIC")
        .map_err(|err| err.to_string())?;
    let p = start_proxy(env, "", "").await;
    let result = async {
        let c = connect(&p, &token(1, "revoked")).await.map_err(e)?;
        let got = row(&c, "select current_setting('app.tenant_id'), count(*) from orders").await?;
        ensure(got[0] == "1", format!("after the revoke: {got:?}"))
    }
    .await;
    p.stop().await;
    env.cluster
        .psql("app", "GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_get_activity(integer) TO PUBLIC")
        .map_err(|err| err.to_string())?;
    result
}

// ---- real clients (installed by scripts/test.sh) ---------------------------------------------


/// Runs a client script with PORT TOKEN_1 TOKEN_2 SESSION_MODE_PORT (a transaction-mode proxy and a
/// session-mode proxy) and fails with its output if it fails.
async fn client_script(env: &Env, what: &str, mut cmd: Command) -> TestResult {
    let p = start_proxy(env, "pool_size = 4", "").await;
    let s = start_proxy(env, "pool_size = 4", "[pool]\nmode = \"session\"").await;
    cmd.args([p.addr.port().to_string(), token(1, what), token(2, what), s.addr.port().to_string()]);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        println!("    {line}");
    }
    ensure(out.status.success(), format!("{what} failed:\n{stdout}{}", String::from_utf8_lossy(&out.stderr)))?;
    p.stop().await;
    s.stop().await;
    Ok(())
}

async fn python_drivers(env: &Env) -> TestResult {
    let cmd = python_client("python_transactions.py")?;
    client_script(env, "python transactions", cmd).await
}

async fn node_drivers(env: &Env) -> TestResult {
    let cmd = node_client("node_transactions.mjs")?;
    client_script(env, "node transactions", cmd).await
}

async fn pgjdbc_driver(env: &Env) -> TestResult {
    let cmd = java_client("PgjdbcTransactions.java")?;
    client_script(env, "pgjdbc transactions", cmd).await
}
