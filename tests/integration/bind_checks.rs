//! `set_config` with bind parameters (issue 15): the statement is accepted at Parse and decided at
//! each Bind with the parameter values — protected names and unsafe values are refused with the
//! errors of the literal forms, and the refusal behaves like a Bind that failed on the server;
//! a session-level call of an unprotected setting is kept for the client like `SET`.
//!
//! tokio-postgres sends ordinary extended-protocol calls (its parameters are in binary format);
//! the raw wire client of the isolation tests checks exact message sequences and text formats.

mod common;
#[path = "../isolation/wire.rs"]
mod wire;

use common::*;
use wire::{describe, execute, msg, parse, sync, Wire};

fn main() {
    run_all(tests![
        bound_session_setting_is_kept_for_later_transactions,
        protected_names_are_refused_at_bind,
        unsafe_values_are_refused_at_bind,
        refused_bind_aborts_the_transaction,
        wire_refused_bind_is_error_then_ready,
        wire_text_binary_null_and_malformed_parameters,
        stale_unnamed_statement_is_never_bound_unchecked,
    ]);
}

const SET: &str = "select set_config($1, $2, false)";

fn e2s(e: tokio_postgres::Error) -> String {
    format!("{e:?}")
}

/// The client is still tenant `t`: its context, and only its own rows.
async fn assert_tenant(c: &tokio_postgres::Client, t: i32) -> TestResult {
    let row = c
        .query_one("select current_setting('app.tenant_id'), count(*), count(*) filter (where tenant_id <> $1) from orders", &[&t])
        .await
        .map_err(e2s)?;
    let (s, n, foreign): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
    ensure(s == t.to_string() && n == 100 && foreign == 0, format!("context {s}, {n} rows, {foreign} foreign"))
}

async fn show(c: &tokio_postgres::Client, name: &str) -> Result<String, String> {
    let msgs = c.simple_query(&format!("SHOW {name}")).await.map_err(e2s)?;
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .ok_or_else(|| "SHOW returned no row".to_string())
}

async fn bound_session_setting_is_kept_for_later_transactions(env: &Env) -> TestResult {
    let p = start_proxy(env, "pool_size = 2", "").await;
    let a = connect(&p, &token(1, "a")).await.map_err(e2s)?;
    let b = connect(&p, &token(2, "b")).await.map_err(e2s)?;
    let default_name = show(&b, "application_name").await?;
    let row = a.query_one(SET, &[&"application_name", &"x"]).await.map_err(e2s)?;
    ensure(row.get::<_, String>(0) == "x", "set_config did not return the value")?;
    // kept in the client's later transactions, on either backend; never reaches the other client
    for i in 0..4 {
        let (mine, theirs) = (show(&a, "application_name").await?, show(&b, "application_name").await?);
        ensure(mine == "x" && theirs == default_name, format!("round {i}: a has {mine:?}, b has {theirs:?}"))?;
        if i == 1 {
            b.batch_execute("BEGIN").await.map_err(e2s)?; // a now runs on the other backend
        }
    }
    b.batch_execute("COMMIT").await.map_err(e2s)?;
    // is_local as a parameter: a transaction-local call is not kept
    a.query_one("select set_config($1, $2, $3)", &[&"application_name", &"local", &true]).await.map_err(e2s)?;
    ensure(show(&a, "application_name").await? == "x", "a transaction-local set_config was kept")?;
    a.query_one("select set_config($1, $2, $3)", &[&"application_name", &"y", &false]).await.map_err(e2s)?;
    ensure(show(&a, "application_name").await? == "y", "a session-level set_config with is_local bound was not kept")?;
    // a literal name with a bound value, and the literal simple-query form, are kept the same way
    a.query_one("select set_config('statement_timeout', $1, false)", &[&"4321"]).await.map_err(e2s)?;
    a.simple_query("SELECT set_config('lock_timeout', '1234', false)").await.map_err(e2s)?;
    let (t, l) = (show(&a, "statement_timeout").await?, show(&a, "lock_timeout").await?);
    ensure(t == "4321ms" && l == "1234ms", format!("statement_timeout {t}, lock_timeout {l}"))?;
    // a NULL value resets the setting, like SET … TO DEFAULT
    a.query_one(SET, &[&"statement_timeout", &None::<&str>]).await.map_err(e2s)?;
    ensure(show(&a, "statement_timeout").await? == "0", "NULL value did not reset the setting")?;
    assert_tenant(&a, 1).await?;
    p.stop().await;
    Ok(())
}

async fn protected_names_are_refused_at_bind(env: &Env) -> TestResult {
    let p = start_proxy(env, "pool_size = 2", "").await;
    let c = connect(&p, &token(1, "mallory")).await.map_err(e2s)?;
    let attempts: [(&str, &[&str]); 7] = [
        (SET, &["app.tenant_id", "2"]),
        (SET, &["APP.TENANT_ID", "2"]),
        (SET, &["App.Tenant_Id", "2"]),
        ("select set_config($1, $2, true)", &["app.tenant_id", "2"]),
        ("select set_config($2, $1, true), count(*) from orders", &["2", "app.tenant_id"]),
        (SET, &["request.jwt.claims", "{\"tenant_id\": 2}"]),
        (SET, &["role", "app_owner"]),
    ];
    for (sql, values) in attempts {
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values.iter().map(|v| v as _).collect();
        let e = c.query(sql, &params).await.err().ok_or(format!("accepted: {sql} {values:?}"))?;
        let (code, message) = db_err(&e);
        ensure(code == "42501" && message.contains("pgtenant sets it from your token"), format!("{sql} {values:?}: {code} {message}"))?;
        assert_tenant(&c, 1).await?;
    }
    // a cast the server resolves in the search path is refused at Parse: pg_temp comes first, and a
    // domain over bpchar named `text` would drop the trailing blanks of "app.tenant_id  "
    c.batch_execute("BEGIN; CREATE DOMAIN pg_temp.text AS bpchar").await.map_err(e2s)?;
    let e = c.query("select set_config($1::text, '2', true)", &[&"app.tenant_id  "]).await.err().ok_or("$1::text accepted")?;
    let (code, message) = db_err(&e);
    ensure(code == "42501" && message.contains("not a string literal"), format!("$1::text: {code} {message}"))?;
    c.batch_execute("ROLLBACK").await.map_err(e2s)?;
    assert_tenant(&c, 1).await?;
    // the same prepared statement with unprotected values works
    let stmt = c.prepare(SET).await.map_err(e2s)?;
    let e = c.query(&stmt, &[&"app.tenant_id", &"3"]).await.err().ok_or("accepted with a prepared statement")?;
    ensure(db_err(&e).0 == "42501", format!("{:?}", db_err(&e)))?;
    c.query(&stmt, &[&"app.theme", &"dark"]).await.map_err(e2s)?;
    ensure(show(&c, "app.theme").await? == "dark", "app.theme not kept")?;
    assert_tenant(&c, 1).await?;
    // nothing was written as tenant 2
    let n = env.cluster.psql("app", "select count(*) from orders where tenant_id = 2").map_err(|e| e.to_string())?;
    ensure(n.trim() == "100", format!("tenant 2 has {n} orders"))?;
    p.stop().await;
    Ok(())
}

async fn unsafe_values_are_refused_at_bind(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(1, "lexer")).await.map_err(e2s)?;
    for (name, value) in [("standard_conforming_strings", "off"), ("Standard_Conforming_Strings", "0"), ("client_encoding", "SJIS"), ("client_encoding", "big5")] {
        let e = c.query(SET, &[&name, &value]).await.err().ok_or(format!("accepted: {name} = {value}"))?;
        let (code, message) = db_err(&e);
        ensure(code == "42501" && message.contains("it would change how SQL is read"), format!("{name} = {value}: {code} {message}"))?;
    }
    let e = c.query("select set_config('client_encoding', $1, false)", &[&"GBK"]).await.err().ok_or("literal name, bound GBK accepted")?;
    ensure(db_err(&e).0 == "42501", format!("{:?}", db_err(&e)))?;
    ensure(show(&c, "standard_conforming_strings").await? == "on", "standard_conforming_strings changed")?;
    // safe values pass (and the server's own answer comes back)
    c.query(SET, &[&"client_encoding", &"UTF8"]).await.map_err(e2s)?;
    c.query(SET, &[&"standard_conforming_strings", &"on"]).await.map_err(e2s)?;
    let e = c.query(SET, &[&"client_encoding", &"no_such_encoding"]).await.err().ok_or("bad encoding accepted")?;
    ensure(db_err(&e).0 == "22023", format!("server error expected: {:?}", db_err(&e)))?;
    assert_tenant(&c, 1).await?;
    p.stop().await;
    Ok(())
}

async fn refused_bind_aborts_the_transaction(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(1, "tx")).await.map_err(e2s)?;
    c.batch_execute("BEGIN; insert into orders (tenant_id, amount) values (1, 6161)").await.map_err(e2s)?;
    let e = c.query(SET, &[&"app.tenant_id", &"2"]).await.err().ok_or("accepted")?;
    ensure(db_err(&e).0 == "42501", format!("{:?}", db_err(&e)))?;
    // like any error inside a transaction block: aborted until ROLLBACK
    let e = c.query("select 1", &[]).await.err().ok_or("transaction not aborted")?;
    ensure(db_err(&e).0 == "25P02", format!("after the refusal: {:?}", db_err(&e)))?;
    c.batch_execute("ROLLBACK").await.map_err(e2s)?;
    let n: i64 = c.query_one("select count(*) from orders where amount = 6161", &[]).await.map_err(e2s)?.get(0);
    ensure(n == 0, "the insert before the refusal was committed")?;
    assert_tenant(&c, 1).await?;
    p.stop().await;
    Ok(())
}

/// Bind with these parameter format codes and values (results in text).
fn bind_fmt(portal: &str, stmt: &str, formats: &[i16], values: &[Option<&[u8]>]) -> Vec<u8> {
    let mut b = Vec::new();
    for name in [portal, stmt] {
        b.extend_from_slice(name.as_bytes());
        b.push(0);
    }
    b.extend_from_slice(&(formats.len() as i16).to_be_bytes());
    for f in formats {
        b.extend_from_slice(&f.to_be_bytes());
    }
    b.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for v in values {
        match v {
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v);
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    msg(b'B', &b)
}

/// Parse/Bind/Describe/Execute/Sync of `sql` (unnamed) with text parameters.
fn batch(sql: &str, values: &[Option<&str>]) -> Vec<u8> {
    [parse("", sql, &[]), wire::bind("", "", values), describe(b'P', ""), execute("", 0), sync()].concat()
}

async fn wire_refused_bind_is_error_then_ready(env: &Env) -> TestResult {
    let p = start_proxy(env, "pool_size = 2", "").await;
    let mut w = Wire::connect(p.addr, &token(1, "wire")).await?;
    let context = "select current_setting('app.tenant_id'), count(*) from orders";
    // Parse, then the refused Bind: ParseComplete, the refusal, and after the Sync ReadyForQuery;
    // the Describe and Execute behind the Bind are skipped like after a server error
    let r = w.round(&batch(SET, &[Some("app.tenant_id"), Some("2")]), 1).await;
    ensure(r.trace == "1EZ" && r.code() == Some("42501") && r.status() == b'I', format!("refused batch: {}", r.summary()))?;
    let r = w.ext(context).await;
    ensure(r.ok() && r.get(0, 0) == "1" && r.get(0, 1) == "100", format!("next batch: {}", r.summary()))?;
    // a statement prepared in an earlier batch: the Bind comes first, no backend is needed to refuse it
    let r = w.round(&[parse("s1", SET, &[]), sync()].concat(), 1).await;
    ensure(r.trace == "1Z", format!("Parse: {}", r.summary()))?;
    let bound = |v: &[Option<&str>]| [wire::bind("", "s1", v), describe(b'P', ""), execute("", 0), sync()].concat();
    let r = w.round(&bound(&[Some("APP.TENANT_ID"), Some("2")]), 1).await;
    ensure(r.trace == "EZ" && r.code() == Some("42501") && r.status() == b'I', format!("refused Bind of s1: {}", r.summary()))?;
    // pipelined: the refused batch and a good one in one write; the good one keeps the context
    let r = w.round(&[bound(&[Some("app.tenant_id"), Some("3")]), wire::extended(context)].concat(), 2).await;
    ensure(
        r.trace == "EZ12TDCZ" && r.errors.len() == 1 && r.get(0, 0) == "1" && r.readies == b"II",
        format!("pipelined: {}", r.summary()),
    )?;
    // the refused Bind leaves no portal: an Execute of it in the next batch finds none
    let r = w.round(&[bound(&[Some("app.tenant_id"), Some("2")]), execute("", 0), sync()].concat(), 2).await;
    ensure(r.trace == "EZEZ" && r.errors.get(1).is_some_and(|e| e.code == "34000"), format!("portal after refusal: {}", r.summary()))?;
    // inside an explicit transaction: the refusal aborts it
    let r = w.simple("BEGIN").await;
    ensure(r.ok() && r.status() == b'T', format!("BEGIN: {}", r.summary()))?;
    let r = w.round(&bound(&[Some("app.tenant_id"), Some("2")]), 1).await;
    ensure(r.trace == "EZ" && r.code() == Some("42501") && r.status() == b'E', format!("in a transaction: {}", r.summary()))?;
    let r = w.simple("select 1").await;
    ensure(r.code() == Some("25P02") && r.status() == b'E', format!("after the refusal: {}", r.summary()))?;
    let r = w.simple("ROLLBACK").await;
    ensure(r.ok() && r.status() == b'I', format!("ROLLBACK: {}", r.summary()))?;
    // the same statement with an unprotected name runs
    let r = w.round(&bound(&[Some("application_name"), Some("wire")]), 1).await;
    ensure(r.ok() && r.get(0, 0) == "wire", format!("accepted Bind: {}", r.summary()))?;
    let r = w.ext(context).await;
    ensure(r.ok() && r.get(0, 0) == "1" && r.get(0, 1) == "100", format!("context at the end: {}", r.summary()))?;
    w.close().await;
    p.stop().await;
    Ok(())
}

async fn wire_text_binary_null_and_malformed_parameters(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let mut w = Wire::connect(p.addr, &token(1, "formats")).await?;
    let run = |formats: &[i16], values: &[Option<&[u8]>]| {
        [parse("", SET, &[]), bind_fmt("", "", formats, values), describe(b'P', ""), execute("", 0), sync()].concat()
    };
    let protected: &[Option<&[u8]>] = &[Some(b"app.tenant_id"), Some(b"2")];
    // one format code for all, one per parameter, text and binary: all refused
    for formats in [&[][..], &[0], &[1], &[1, 0], &[0, 1]] {
        let r = w.round(&run(formats, protected), 1).await;
        ensure(r.trace == "1EZ" && r.code() == Some("42501"), format!("formats {formats:?}: {}", r.summary()))?;
    }
    // a NUL in the name (the server would reject it) is refused too
    let r = w.round(&run(&[1], &[Some(b"app.tenant_id\0x"), Some(b"2")]), 1).await;
    ensure(r.code() == Some("42501"), format!("NUL in the name: {}", r.summary()))?;
    // binary text parameters are the bytes themselves
    let r = w.round(&run(&[1], &[Some(b"application_name"), Some(b"bin")]), 1).await;
    ensure(r.ok() && r.get(0, 0) == "bin", format!("binary: {}", r.summary()))?;
    // a NULL name goes to the server, which refuses it
    let r = w.round(&run(&[], &[None, Some(b"2")]), 1).await;
    ensure(r.code() == Some("22004"), format!("NULL name: {}", r.summary()))?;
    // format codes that do not fit the parameters, a format code the protocol does not have, a
    // missing parameter: refused as malformed, and the session goes on
    for (formats, values) in [(&[0, 0, 0][..], protected), (&[2], protected), (&[], &protected[..1])] {
        let r = w.round(&run(formats, values), 1).await;
        ensure(r.trace == "1EZ" && r.code() == Some("08P01"), format!("malformed {formats:?}: {}", r.summary()))?;
    }
    // declared parameter types: text is read from the Bind, bpchar (which loses trailing blanks on
    // its way to text) is refused at Parse
    let r = w.round(&[parse("", SET, &[25, 25]), bind_fmt("", "", &[], protected), execute("", 0), sync()].concat(), 1).await;
    ensure(r.trace == "1EZ" && r.code() == Some("42501"), format!("declared text: {}", r.summary()))?;
    let r = w.round(&[parse("", SET, &[1042, 25]), bind_fmt("", "", &[], &[Some(b"app.tenant_id  "), Some(b"2")]), execute("", 0), sync()].concat(), 1).await;
    ensure(r.trace == "EZ" && r.code() == Some("42501"), format!("declared bpchar: {}", r.summary()))?;
    // a setting whose batch fails later on is not kept (the server rolls it back too)
    let failing = [
        parse("", SET, &[]),
        bind_fmt("", "", &[], &[Some(b"application_name"), Some(b"failed")]),
        execute("", 0),
        parse("", "select 1/0", &[]),
        bind_fmt("", "", &[], &[]),
        execute("", 0),
        sync(),
    ];
    let r = w.round(&failing.concat(), 1).await;
    ensure(r.code() == Some("22012"), format!("failing batch: {}", r.summary()))?;
    let r = w.ext("select current_setting('app.tenant_id'), current_setting('application_name')").await;
    ensure(r.ok() && r.get(0, 0) == "1" && r.get(0, 1) == "bin", format!("at the end: {} {:?}", r.summary(), r.rows))?;
    w.close().await;
    p.stop().await;
    Ok(())
}

/// The server keeps its unnamed statement until the next unnamed Parse *on that backend* that it
/// runs, while pgtenant's record of the client's unnamed statement changes with every unnamed Parse
/// it forwards — even one the server then skips (after an error earlier in the batch) — and follows
/// the client to other backends. A Bind of the unnamed statement must never reach a
/// `set_config($1, $2, false)` statement through the record of another one, without its checks.
async fn stale_unnamed_statement_is_never_bound_unchecked(env: &Env) -> TestResult {
    let p = start_proxy(env, "pool_size = 2", "").await;
    let check = "select current_setting('app.tenant_id'), count(*) filter (where tenant_id <> 1) from orders";
    let harmless = "select $1::text, $2::text";
    let attack = [wire::bind("", "", &[Some("app.tenant_id"), Some("2")]), execute("", 0), wire::unnamed(check), sync()].concat();
    let not_switched = |r: &wire::Reply, what: &str| {
        ensure(!r.errors.is_empty() && !r.rows.iter().any(|row| row.first() == Some(&Some("2".into()))), format!("{what}: {} {:?}", r.summary(), r.rows))
    };

    // 1. within one pipeline: the unnamed Parse of the harmless statement is skipped by the server
    let mut a = Wire::connect(p.addr, &token(1, "pipeline")).await?;
    // (not application_name: pgtenant gives a client the idle connection carrying its name first,
    // and this scenario places the statements on connections by their order of use)
    let first = [parse("", SET, &[]), wire::bind("", "", &[Some("work_mem"), Some("8MB")]), execute("", 0), sync()].concat();
    let skipped = [parse("bad", "selec", &[]), parse("", harmless, &[]), sync()].concat();
    let r = a.round(&[first, skipped, attack.clone()].concat(), 3).await;
    ensure(r.errors.first().is_some_and(|e| e.code == "42601"), format!("pipeline: {}", r.summary()))?;
    not_switched(&r, "pipeline")?;
    let r = a.ext(check).await;
    ensure(r.ok() && r.get(0, 0) == "1" && r.get(0, 1) == "0", format!("after the pipeline: {}", r.summary()))?;

    // 2. across backends: the unnamed statement parsed on backend 2, the harmless one on backend
    // 1, then back to backend 2 (`other` holds backend 1 in between)
    let mut other = Wire::connect(p.addr, &token(1, "holder")).await?;
    ensure(other.simple("BEGIN").await.ok(), "BEGIN")?;
    let r = a.round(&[parse("", SET, &[]), sync()].concat(), 1).await;
    ensure(r.trace == "1Z", format!("Parse: {}", r.summary()))?;
    ensure(other.simple("COMMIT").await.ok(), "COMMIT")?;
    let r = a.round(&[parse("", harmless, &[]), sync()].concat(), 1).await;
    ensure(r.trace == "1Z", format!("second Parse: {}", r.summary()))?;
    ensure(other.simple("BEGIN").await.ok(), "BEGIN again")?;
    let r = a.round(&attack, 1).await;
    // the Bind runs the client's own unnamed statement, the harmless one, whichever backend it is
    // on now (pgtenant parses it there again): its parameters come back as text, and the context
    // is untouched
    ensure(
        r.ok() && r.rows.first() == Some(&vec![Some("app.tenant_id".into()), Some("2".into())]) && r.get(1, 0) == "1" && r.get(1, 1) == "0",
        format!("across backends: {} {:?}", r.summary(), r.rows),
    )?;
    let r = a.ext(check).await;
    ensure(r.ok() && r.get(0, 0) == "1" && r.get(0, 1) == "0", format!("after coming back: {}", r.summary()))?;
    ensure(other.simple("COMMIT").await.ok(), "COMMIT again")?;
    a.close().await;
    other.close().await;
    p.stop().await;
    Ok(())
}
