//! What a client is told about its session, compared with a direct connection to the same server:
//! ParameterStatus values (startup parameters, `options`, SET/RESET, DISCARD ALL) in the server's
//! own spelling, FATAL errors for values the server refuses, and, in session mode, BackendKeyData
//! with the real backend's pid while cancel keeps working through pgtenant's secret key.

mod common;
#[path = "../isolation/wire.rs"]
mod wire;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Connection, NoTls, Socket};
use wire::Wire;

fn main() {
    run_all(tests![
        startup_parameters_are_reported_as_the_server_spells_them,
        refused_startup_values_are_fatal_as_in_postgres,
        set_and_reset_report_what_postgres_reports,
        session_mode_gives_the_backend_pid,
        session_mode_cancel_needs_pgtenants_secret,
        a_set_right_after_another_clients_reset_builds_on_the_clients_values,
        backends_take_the_name_of_the_client_they_were_opened_for,
        an_idle_connection_with_the_clients_name_is_preferred,
    ]);
}

const MODES: [&str; 2] = ["transaction", "session"];

/// Parameters Postgres 15 reports at login (as it spells them).
const REPORTED: [&str; 13] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "default_transaction_read_only",
    "in_hot_standby",
    "integer_datetimes",
    "IntervalStyle",
    "is_superuser",
    "server_encoding",
    "server_version",
    "session_authorization",
    "standard_conforming_strings",
    "TimeZone",
];

async fn proxy_in(env: &Env, mode: &str, backend: &str) -> pgtenant::server::Running {
    start_proxy(env, backend, &format!("[pool]\nmode = \"{mode}\"")).await
}

/// A tokio-postgres connection whose ParameterStatus values (and notifications) stay readable: the
/// connection is driven by a task that shares it.
struct Watched {
    client: Client,
    conn: Arc<Mutex<Connection<Socket, NoTlsStream>>>,
}

impl Watched {
    async fn connect(cfg: &tokio_postgres::Config) -> Result<Watched, tokio_postgres::Error> {
        let (client, conn) = cfg.connect(NoTls).await?;
        let conn = Arc::new(Mutex::new(conn));
        let driven = conn.clone();
        tokio::spawn(async move {
            while let Some(Ok(_)) = futures::future::poll_fn(|cx| driven.lock().unwrap().poll_message(cx)).await {}
        });
        Ok(Watched { client, conn })
    }

    fn param(&self, name: &str) -> String {
        self.conn.lock().unwrap().parameter(name).unwrap_or("<none>").to_string()
    }

    fn params(&self, names: &[&str]) -> Vec<(String, String)> {
        names.iter().map(|n| (n.to_string(), self.param(n))).collect()
    }
}

/// Connection settings for the server itself, as the proxy's backend role.
fn direct(env: &Env) -> tokio_postgres::Config {
    env.cluster.url("app_user", "app-secret", "app").parse().expect("cluster URL")
}

/// Connection settings for a proxy.
fn proxied(p: &pgtenant::server::Running, tok: &str) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1").port(p.addr.port()).user("alice").dbname("app").password(tok);
    cfg
}

fn startup<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    [("user", "alice"), ("database", "app")].iter().chain(extra).copied().collect()
}

async fn startup_parameters_are_reported_as_the_server_spells_them(env: &Env) -> TestResult {
    let options = "-c DateStyle=iso,dmy -c TimeZone=utc -c IntervalStyle=ISO_8601 -c standard_conforming_strings=true";
    let d = Watched::connect(direct(env).options(options).application_name("café")).await.map_err(|e| format!("direct: {e:?}"))?;
    let want = d.params(&REPORTED);
    for (name, value) in [("DateStyle", "ISO, DMY"), ("TimeZone", "UTC"), ("IntervalStyle", "iso_8601"), ("application_name", "caf??")] {
        ensure(d.param(name) == value, format!("the server itself reports {name} = {:?}", d.param(name)))?;
    }
    for mode in MODES {
        let p = proxy_in(env, mode, "").await;
        // the same parameters through `options` (and application_name as a key)
        let c = Watched::connect(proxied(&p, &token(1, "opts")).options(options).application_name("café"))
            .await
            .map_err(|e| format!("{mode}: {e:?}"))?;
        ensure(c.params(&REPORTED) == want, format!("{mode}, options: reported {:?}\nserver reports {want:?}", c.params(&REPORTED)))?;
        // the same as startup packet keys, with client_encoding spelled freely too
        let packet = startup(&[
            ("client_encoding", "utf-8"),
            ("DateStyle", "iso,dmy"),
            ("TimeZone", "utc"),
            ("IntervalStyle", "ISO_8601"),
            ("standard_conforming_strings", "true"),
            ("application_name", "café"),
        ]);
        for round in 0..2 {
            // the second login's spellings may come from what pgtenant remembers
            let mut w = Wire::login(p.addr, &packet, &token(1, "keys")).await?;
            let mut got = w.params.clone();
            got.sort();
            let mut sorted = want.clone();
            sorted.sort();
            ensure(got == sorted, format!("{mode}, packet keys (login {round}): reported {got:?}\nserver reports {sorted:?}"))?;
            // and the values hold in the client's transactions
            let r = w.simple("select current_setting('DateStyle'), current_setting('TimeZone'), current_setting('IntervalStyle'), current_setting('application_name')").await;
            let row: Vec<String> = (0..4).map(|i| r.get(0, i)).collect();
            ensure(r.ok() && row == ["ISO, DMY", "UTC", "iso_8601", "caf??"], format!("{mode}: in a transaction: {}", r.summary()))?;
            ensure(r.params.is_empty(), format!("{mode}: reports after a query: {:?}", r.params))?;
            w.close().await;
        }
        // Postgres applies `options` first, then the packet's keys: those win, and a DateStyle
        // that names only the order keeps the output style set before it
        let both = startup(&[("options", "-c DateStyle=SQL -c application_name=fromopts"), ("DateStyle", "dmy"), ("application_name", "frompacket")]);
        let mut w = Wire::login(p.addr, &both, &token(1, "both")).await?;
        let told: Vec<&(String, String)> = w.params.iter().filter(|(k, _)| k == "DateStyle" || k == "application_name").collect();
        ensure(format!("{told:?}") == r#"[("application_name", "frompacket"), ("DateStyle", "SQL, DMY")]"#, format!("{mode}: options and keys: {told:?}"))?;
        let r = w.simple("select current_setting('DateStyle'), current_setting('application_name')").await;
        ensure(r.get(0, 0) == "SQL, DMY" && r.get(0, 1) == "frompacket", format!("{mode}: options and keys in a transaction: {}", r.summary()))?;
        w.close().await;
        p.stop().await;
    }
    Ok(())
}

async fn refused_startup_values_are_fatal_as_in_postgres(env: &Env) -> TestResult {
    for (name, value) in [("DateStyle", "bogus"), ("IntervalStyle", "nope"), ("TimeZone", "Mars/Olympus"), ("work_mem", "lots")] {
        let option = format!("-c {name}={value}");
        let e = Watched::connect(direct(env).options(&option)).await.err().ok_or(format!("the server accepted {option}"))?;
        let d = e.as_db_error().ok_or(format!("direct {option}: {e:?}"))?;
        ensure(d.severity() == "FATAL", format!("direct {option}: {d:?}"))?;
        let want = format!("login refused: FATAL {}: {}", d.code().code(), d.message());
        for mode in MODES {
            // one backend: a probe that kept its backend would starve the logins after it
            let p = proxy_in(env, mode, "pool_size = 1").await;
            let got = Wire::login(p.addr, &startup(&[(name, value)]), &token(1, "bad")).await.err().ok_or(format!("{mode}: {name}={value} accepted"))?;
            ensure(got == want, format!("{mode}, packet {name}={value}: {got}\nthe server says: {want}"))?;
            let e = Watched::connect(proxied(&p, &token(1, "bad")).options(&option)).await.err().ok_or(format!("{mode}: {option} accepted"))?;
            let pd = e.as_db_error().ok_or(format!("{mode} {option}: {e:?}"))?;
            ensure(
                (pd.severity(), pd.code(), pd.message(), pd.detail()) == (d.severity(), d.code(), d.message(), d.detail()),
                format!("{mode}, {option}: {pd:?}\nthe server says: {d:?}"),
            )?;
            let c = connect(&p, &token(1, "fine")).await.map_err(|e| format!("{mode}: login after refusals: {e:?}"))?;
            c.simple_query("select 1").await.map_err(|e| format!("{mode}: query after refusals: {e:?}"))?;
            drop(c);
            p.stop().await;
        }
    }
    Ok(())
}

async fn set_and_reset_report_what_postgres_reports(env: &Env) -> TestResult {
    const WATCH: [&str; 5] = ["DateStyle", "TimeZone", "application_name", "IntervalStyle", "client_encoding"];
    let steps = [
        "SET DateStyle = 'mdy'",
        "SET TimeZone = 'asia/tokyo'",
        "SET application_name = 'changed'",
        "RESET TimeZone",
        "SET IntervalStyle = 'sql_standard'",
        "RESET ALL",
        "SET DateStyle = 'SQL'; SET TIME ZONE 'utc'",
        "DISCARD ALL",
        "SET client_encoding = 'latin1'",
        "SET client_encoding = 'utf-8'",
    ];
    let options = "-c DateStyle=German -c TimeZone=Europe/Paris";
    let d = Watched::connect(direct(env).options(options).application_name("start")).await.map_err(|e| format!("direct: {e:?}"))?;
    for mode in MODES {
        let p = proxy_in(env, mode, "pool_size = 3").await;
        let c = Watched::connect(proxied(&p, &token(1, "setter")).options(options).application_name("start"))
            .await
            .map_err(|e| format!("{mode}: {e:?}"))?;
        // another client's session SETs leave other values on the backends in transaction mode
        let other = connect(&p, &token(2, "other")).await.map_err(|e| format!("{e:?}"))?;
        ensure(c.params(&WATCH) == d.params(&WATCH), format!("{mode}, login: {:?} vs {:?}", c.params(&WATCH), d.params(&WATCH)))?;
        for (i, step) in steps.iter().enumerate() {
            d.client.batch_execute(step).await.map_err(|e| format!("direct {step}: {e:?}"))?;
            c.client.batch_execute(step).await.map_err(|e| format!("{mode}, {step}: {e:?}"))?;
            ensure(c.params(&WATCH) == d.params(&WATCH), format!("{mode}, after {step}: {:?}\nthe server reports {:?}", c.params(&WATCH), d.params(&WATCH)))?;
            // and what the client was told is what its transactions run with
            let (mine, theirs) = (settings(&c.client, &WATCH).await?, settings(&d.client, &WATCH).await?);
            ensure(mine == theirs, format!("{mode}, after {step}: settings {mine:?}\non the server {theirs:?}"))?;
            let noise = ["SET TimeZone = 'America/New_York'", "SET DateStyle = 'Postgres'", "RESET ALL"][i % 3];
            other.batch_execute(noise).await.map_err(|e| format!("{noise}: {e:?}"))?;
        }
        d.client.batch_execute("RESET ALL").await.map_err(|e| format!("{e:?}"))?;
        p.stop().await;
    }
    // a client that starts with another encoding is told when SET brings it back
    for mode in MODES {
        let p = proxy_in(env, mode, "pool_size = 1").await;
        let mut w = Wire::login(p.addr, &startup(&[("client_encoding", "latin1")]), &token(1, "latin")).await?;
        let enc = w.params.iter().find(|(k, _)| k == "client_encoding").cloned();
        ensure(enc == Some(("client_encoding".into(), "LATIN1".into())), format!("{mode}: login reported {enc:?}"))?;
        let r = w.simple("SET client_encoding = 'utf-8'").await;
        ensure(r.ok() && r.params == [("client_encoding".to_string(), "UTF8".to_string())], format!("{mode}: after SET: {:?} {}", r.params, r.summary()))?;
        ensure(r.trace.ends_with("SZ"), format!("{mode}: the report must come before ReadyForQuery: {}", r.trace))?;
        let r = w.simple("select current_setting('client_encoding')").await;
        ensure(r.get(0, 0) == "UTF8" && r.params.is_empty(), format!("{mode}: then {} {:?}", r.summary(), r.params))?;
        w.close().await;
        p.stop().await;
    }
    Ok(())
}

async fn session_mode_gives_the_backend_pid(env: &Env) -> TestResult {
    let p = proxy_in(env, "session", "pool_size = 2").await;
    let mut a = Wire::connect(p.addr, &token(1, "a")).await?;
    let r = a.simple("select pg_backend_pid()").await;
    ensure(r.get(0, 0) == a.key_pid.to_string(), format!("BackendKeyData pid {} but pg_backend_pid() {}", a.key_pid, r.summary()))?;
    let r = a.simple("LISTEN jobs; NOTIFY jobs, 'from-a'").await;
    ensure(r.notifications == [(a.key_pid, "jobs".to_string(), "from-a".to_string())], format!("own notification: {:?}", r.notifications))?;
    let mut b = Wire::connect(p.addr, &token(2, "b")).await?;
    ensure(b.key_pid != a.key_pid, "two sessions, one pid")?;
    let r = b.simple("select pg_backend_pid(); NOTIFY jobs, 'from-b'").await;
    ensure(r.get(0, 0) == b.key_pid.to_string(), format!("b: BackendKeyData pid {} but {}", b.key_pid, r.summary()))?;
    // delivered while a sits idle: its backend is its own
    let r = a.drain_for(Duration::from_millis(500)).await;
    ensure(r.notifications == [(b.key_pid, "jobs".to_string(), "from-b".to_string())], format!("notification from b: {:?}", r.notifications))?;
    // the pid belongs to the session: a new client on the same backend is told that pid too
    let pids = [a.key_pid, b.key_pid];
    a.close().await;
    b.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = Wire::connect(p.addr, &token(3, "c")).await?;
    let r = c.simple("select pg_backend_pid()").await;
    ensure(r.get(0, 0) == c.key_pid.to_string(), format!("c: {} vs {}", c.key_pid, r.summary()))?;
    ensure(pids.contains(&c.key_pid), "the pool opened a third backend for a third client in turn")?;
    c.close().await;
    p.stop().await;
    // transaction mode keeps virtual pids: the backend changes from one transaction to the next
    let p = proxy_in(env, "transaction", "pool_size = 2").await;
    let mut t = Wire::connect(p.addr, &token(1, "t")).await?;
    let r = t.simple("select pg_backend_pid()").await;
    ensure(r.ok() && r.get(0, 0) != t.key_pid.to_string(), format!("transaction mode gave a backend's pid: {}", t.key_pid))?;
    t.close().await;
    p.stop().await;
    Ok(())
}

/// Sends a CancelRequest to `p` and waits until the proxy closes that connection.
async fn cancel(p: &pgtenant::server::Running, pid: i32, secret: i32) -> TestResult {
    let mut s = tokio::net::TcpStream::connect(p.addr).await.map_err(|e| e.to_string())?;
    s.write_all(&wire::cancel_request(pid, secret)).await.map_err(|e| e.to_string())?;
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read(&mut sink)).await;
    Ok(())
}

async fn session_mode_cancel_needs_pgtenants_secret(env: &Env) -> TestResult {
    let p = proxy_in(env, "session", "pool_size = 2").await;
    // a driver's own cancel (tokio-postgres keeps the keys from BackendKeyData)
    let c = connect(&p, &token(1, "slow")).await.map_err(|e| format!("{e:?}"))?;
    expect_cancelled(&c, "select pg_sleep(20)", Duration::from_millis(400)).await?;
    c.simple_query("select 1").await.map_err(|e| format!("session unusable after cancel: {e:?}"))?;
    // the real pid with a wrong secret cancels nothing; with pgtenant's secret it does
    let mut a = Wire::connect(p.addr, &token(1, "victim")).await?;
    let backend_pid = a.simple("select pg_backend_pid()").await.get(0, 0);
    ensure(backend_pid == a.key_pid.to_string(), "session mode pid is not the backend's")?;
    a.send(&wire::query("select pg_sleep(1.5)")).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel(&p, a.key_pid, a.key_secret ^ 0x5a5a).await?;
    let r = a.ready_n(1, Duration::from_secs(5)).await;
    ensure(r.ok(), format!("a wrong secret cancelled the query: {}", r.summary()))?;
    a.send(&wire::query("select pg_sleep(20)")).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel(&p, a.key_pid, a.key_secret).await?;
    let r = a.ready_n(1, Duration::from_secs(10)).await;
    ensure(r.code() == Some("57014"), format!("cancel with pgtenant's secret: {}", r.summary()))?;
    a.close().await;
    p.stop().await;
    Ok(())
}

/// One row of `current_setting` values.
async fn settings(c: &Client, names: &[&str]) -> Result<Vec<String>, String> {
    let cols: Vec<String> = names.iter().map(|n| format!("current_setting('{n}')")).collect();
    let row = c.query_one(&format!("select {}", cols.join(", ")), &[]).await.map_err(|e| format!("{e:?}"))?;
    Ok((0..names.len()).map(|i| row.get(i)).collect())
}

async fn a_set_right_after_another_clients_reset_builds_on_the_clients_values(env: &Env) -> TestResult {
    // one backend: the other client's RESET ALL makes pgtenant reset it before this client's SET,
    // which waits for that reset; the SET must still run with the client's own DateStyle in force
    let p = proxy_in(env, "transaction", "pool_size = 1").await;
    let c = Watched::connect(proxied(&p, &token(1, "setter")).options("-c DateStyle=German")).await.map_err(|e| format!("{e:?}"))?;
    let other = connect(&p, &token(2, "other")).await.map_err(|e| format!("{e:?}"))?;
    for step in ["SET DateStyle = 'SQL'", "SET DateStyle = 'SQL'; select 1"] {
        other.batch_execute("RESET ALL").await.map_err(|e| format!("{e:?}"))?;
        c.client.batch_execute(step).await.map_err(|e| format!("{step}: {e:?}"))?;
        let now = settings(&c.client, &["DateStyle"]).await?;
        ensure(now == ["SQL, DMY"] && c.param("DateStyle") == "SQL, DMY", format!("{step}: {now:?}, reported {}", c.param("DateStyle")))?;
        c.client.batch_execute("RESET ALL").await.map_err(|e| format!("{e:?}"))?;
        ensure(c.param("DateStyle") == "German, DMY", format!("after RESET ALL: {}", c.param("DateStyle")))?;
    }
    p.stop().await;
    Ok(())
}

/// The context statements prepared on the session's backend, in name order.
async fn context_statements(w: &mut Wire) -> Result<Vec<String>, String> {
    let r = w.simple("select name from pg_prepared_statements where name like 'pgtenant_ctx%' order by name").await;
    ensure(r.ok(), format!("pg_prepared_statements: {}", r.summary()))?;
    Ok((0..r.rows.len()).map(|i| r.get(i, 0)).collect())
}

/// A pooled connection logs in with the `application_name` of the client it was opened for, so
/// that client's transactions (and any client's of the same name) need not set it; every other
/// client's transactions do. Each client sees its own name all the same, and is told nothing of
/// the backend's.
async fn backends_take_the_name_of_the_client_they_were_opened_for(env: &Env) -> TestResult {
    let p = proxy_in(env, "transaction", "pool_size = 1").await;
    let name_of_backend = || {
        env.cluster
            .psql("app", "select application_name from pg_stat_activity where usename = 'app_user'")
            .map(|s| s.trim().to_string())
            .map_err(|e| e.to_string())
    };
    let mut a = Wire::login(p.addr, &startup(&[("application_name", "alpha")]), &token(1, "alpha")).await?;
    let r = a.simple("select current_setting('application_name')").await;
    ensure(r.ok() && r.get(0, 0) == "alpha", format!("alpha: {}", r.summary()))?;
    let first = context_statements(&mut a).await?;
    ensure(first.len() == 1, format!("one context statement so far: {first:?}"))?;
    let name = name_of_backend()?;
    ensure(name == "alpha", format!("the backend logged in as {name:?}"))?;

    // another name: set in each of its transactions, the statement with one setting more
    let mut b = Wire::login(p.addr, &startup(&[("application_name", "beta")]), &token(2, "beta")).await?;
    for sql in ["BEGIN", "select current_setting('application_name')", "COMMIT", "select current_setting('application_name')"] {
        let r = b.simple(sql).await;
        ensure(r.ok() && r.params.is_empty(), format!("beta, {sql}: {} {:?}", r.summary(), r.params))?;
        if sql.starts_with("select") {
            ensure(r.get(0, 0) == "beta", format!("beta sees {:?}", r.get(0, 0)))?;
        }
    }
    let both = context_statements(&mut b).await?;
    let arity = |s: &str| s.rsplit('_').next().and_then(|n| n.parse::<usize>().ok());
    ensure(
        both.len() == 2 && both.contains(&first[0]) && both.iter().filter_map(|s| arity(s)).max() == arity(&first[0]).map(|n| n + 1),
        format!("beta's statement sets one more setting: {first:?} then {both:?}"),
    )?;
    // a client with no name runs with pgtenant's, as on a backend of pgtenant's own
    let c = connect(&p, &token(3, "nameless")).await.map_err(|e| format!("{e:?}"))?;
    let row = c.query_one("select current_setting('application_name')", &[]).await.map_err(|e| format!("{e:?}"))?;
    ensure(row.get::<_, String>(0) == "pgtenant", format!("nameless: {:?}", row.get::<_, String>(0)))?;
    let name = name_of_backend()?;
    ensure(name == "alpha", format!("then the backend is {name:?}"))?;

    // a session-level SET moves the backend's own value; a client named like the backend still
    // gets its name whether or not the backend was reset in between
    let r = a.simple("SET application_name = 'gamma'").await;
    ensure(r.ok(), format!("SET: {}", r.summary()))?;
    let mut d = Wire::login(p.addr, &startup(&[("application_name", "alpha")]), &token(4, "alpha2")).await?;
    for (w, want) in [(&mut a, "gamma"), (&mut d, "alpha"), (&mut b, "beta")] {
        let r = w.simple("select current_setting('application_name')").await;
        ensure(r.ok() && r.get(0, 0) == want, format!("want {want}: {}", r.summary()))?;
    }
    for w in [a, b, d] {
        w.close().await;
    }

    // set_config(…, false) of the name, bound (run by the server as it is), by clients that take
    // turns on the backend: each is reset (RESET ALL) in front of the next one's transaction, and
    // what the backend reported before that reset says nothing of the value after it. In one batch
    // with a named and with the unnamed statement, as psycopg sends it (prepare_threshold=0).
    for (k, stmt) in ["_pg3_0", "_pg3_0", "_pg3_0", ""].into_iter().enumerate() {
        let mut w = Wire::connect(p.addr, &token(5 + k as i64, "turns")).await?;
        let batch = [
            wire::parse(stmt, "select set_config($1, $2, false)", &[]),
            wire::bind("", stmt, &[Some("application_name"), Some("same")]),
            wire::describe(b'P', ""),
            wire::execute("", 0),
            wire::sync(),
        ]
        .concat();
        let r = w.round(&batch, 1).await;
        ensure(r.ok(), format!("set_config ({stmt:?}): {}", r.summary()))?;
        let r = w.simple("show application_name").await;
        ensure(r.ok() && r.get(0, 0) == "same", format!("after set_config ({stmt:?}): {:?} {}", r.get(0, 0), r.summary()))?;
        w.close().await;
    }
    p.stop().await;
    Ok(())
}

/// With connections of several names idle, a transaction takes one with its client's name (and so
/// need not set it), not merely the most recently used one.
async fn an_idle_connection_with_the_clients_name_is_preferred(env: &Env) -> TestResult {
    let p = proxy_in(env, "transaction", "pool_size = 2").await;
    let login_name = |pid: &str| {
        env.cluster
            .psql("app", &format!("select application_name from pg_stat_activity where pid = {pid}"))
            .map(|s| s.trim().to_string())
            .map_err(|e| e.to_string())
    };
    let mut a = Wire::login(p.addr, &startup(&[("application_name", "alpha")]), &token(1, "alpha")).await?;
    let mut b = Wire::login(p.addr, &startup(&[("application_name", "beta")]), &token(2, "beta")).await?;
    // both in a transaction at once: two connections, one opened for each
    for w in [&mut a, &mut b] {
        let r = w.simple("BEGIN").await;
        ensure(r.ok(), format!("BEGIN: {}", r.summary()))?;
    }
    // alpha's goes back first: beta's is on top of the idle stack
    for w in [&mut a, &mut b] {
        let r = w.simple("COMMIT").await;
        ensure(r.ok(), format!("COMMIT: {}", r.summary()))?;
    }
    for round in 0..3 {
        for (w, name) in [(&mut a, "alpha"), (&mut b, "beta")] {
            let r = w.simple("select pg_backend_pid(), current_setting('application_name')").await;
            ensure(r.ok() && r.get(0, 1) == name, format!("{name}: {}", r.summary()))?;
            let on = login_name(&r.get(0, 0))?;
            ensure(on == name, format!("round {round}: {name}'s transaction ran on the connection opened for {on:?}"))?;
        }
    }
    a.close().await;
    b.close().await;
    p.stop().await;
    Ok(())
}
