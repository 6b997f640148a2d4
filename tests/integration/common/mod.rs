//! Shared test plumbing: one throwaway Postgres cluster (pgtenant's own `cluster` module) with the
//! RLS fixture, proxies started in-process on random ports, token minting, and a tiny runner that
//! prints `N passed, N failed` so one cluster serves every scenario.

#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use pgtenant::cluster::Cluster;
use pgtenant::config::Config;
use pgtenant::server::Running;
use serde_json::json;

pub const SECRET: &str = "test-secret-0123456789";

pub type TestResult = Result<(), String>;
pub type TestFn = for<'a> fn(&'a Env) -> Pin<Box<dyn Future<Output = TestResult> + 'a>>;

/// `tests![a, b, …]`: a test binary's scenarios, by function name, for [`run_all`].
#[macro_export]
macro_rules! tests {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), (|env| Box::pin($name(env))) as $crate::common::TestFn)),*]
    };
}

pub struct Env {
    pub cluster: Cluster,
}

/// Config text for a proxy in front of the test cluster; `extra` is appended verbatim (use it to
/// add keys to the last section, `[tenant]`, or to add whole sections).
pub fn config_text(env: &Env, backend_extra: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[backend]
url = "{url}"
{backend_extra}
[jwt]
secret = "{SECRET}"
[tenant]
settings = {{ "app.tenant_id" = "tenant_id", "app.user_id" = "sub" }}
claims_setting = "request.jwt.claims"
{extra}
"#,
        url = env.cluster.url("app_user", "app-secret", "app"),
        backend_extra = if backend_extra.contains("pool_size") {
            backend_extra.to_string()
        } else {
            format!("pool_size = 4\n{backend_extra}")
        },
    )
}

pub async fn start_proxy(env: &Env, backend_extra: &str, extra: &str) -> Running {
    let text = config_text(env, backend_extra, extra);
    let cfg = Config::from_toml(&text, &|_| None).unwrap_or_else(|e| panic!("test config invalid: {e}"));
    pgtenant::server::start(cfg).await.expect("proxy starts")
}

/// A second, independent cluster with the RLS fixture (for `[[clusters]]` and multi-host configs).
pub fn second_cluster() -> Result<Cluster, String> {
    let other = Cluster::start().map_err(|e| e.to_string())?;
    other.load_rls_fixture().map_err(|e| e.to_string())?;
    Ok(other)
}

/// Waits until `standby` has replayed everything `primary` has written so far. The test clusters run
/// with `synchronous_commit = off`, so a commit's WAL may still be only inserted, not written, when it
/// returns: wait for the insert position (`pg_current_wal_lsn()`, the write position, can be behind
/// the last commit, and a standby that reached it may not have that commit yet).
pub fn catch_up(standby: &Cluster, primary: &Cluster) -> Result<(), String> {
    let lsn = primary.psql("postgres", "SELECT pg_current_wal_insert_lsn()").map_err(|e| e.to_string())?;
    let sql = format!("SELECT pg_is_in_recovery() AND pg_last_wal_replay_lsn() >= '{}'::pg_lsn", lsn.trim());
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while standby.psql("postgres", &sql).map_err(|e| e.to_string())?.trim() != "t" {
        if Instant::now() > deadline {
            return Err(format!("the standby did not replay up to {} within 30 s", lsn.trim()));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(())
}

/// Waits until the replica monitor of `proxy` has found every replica of its default cluster
/// usable (it uses none before its first check).
pub async fn replicas_usable(proxy: &Running) -> Result<(), String> {
    let router = proxy.proxy.shared.router.clone();
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    while !router.clusters()[0].replicas.iter().all(|r| r.usable(router.max_lag_ms())) {
        if Instant::now() > deadline {
            return Err("the replica monitor never found the standbys usable".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(())
}

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

pub fn token_with(claims: serde_json::Value) -> String {
    pgtenant::jwt::mint_hs(&claims, SECRET.as_bytes(), jsonwebtoken::Algorithm::HS256)
}

pub fn token(tenant: i64, sub: &str) -> String {
    token_with(json!({ "tenant_id": tenant, "sub": sub, "exp": now() + 3600 }))
}

pub async fn connect(proxy: &Running, token: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1").port(proxy.addr.port()).user("alice").dbname("app").password(token);
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// This process's resident memory (the proxy under test runs in it), in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

pub fn ensure(cond: bool, what: impl Into<String>) -> TestResult {
    if cond { Ok(()) } else { Err(what.into()) }
}

pub fn db_err(e: &tokio_postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(d) => (d.code().code().to_string(), d.message().to_string()),
        None => ("".into(), e.to_string()),
    }
}

/// Runs `sql` (a `pg_sleep` long enough to outlast `after`) on `client`, sends the client's cancel
/// request `after` into it, and checks the query ended in SQLSTATE 57014 well before it would have
/// finished on its own (10 s) and the cancel request itself went through.
pub async fn expect_cancelled(client: &tokio_postgres::Client, sql: &str, after: std::time::Duration) -> TestResult {
    let cancel = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(after).await;
        cancel.cancel_query(tokio_postgres::NoTls).await
    });
    let started = Instant::now();
    let ran = client.simple_query(sql).await;
    let sent = canceller.await.map_err(|e| e.to_string())?;
    sent.map_err(|e| format!("cancel request: {e:?}"))?;
    let e = ran.err().ok_or_else(|| format!("{sql}: not cancelled"))?;
    ensure(db_err(&e).0 == "57014" && started.elapsed() < std::time::Duration::from_secs(10),
           format!("{sql}: {:?} after {:?}", db_err(&e), started.elapsed()))
}

/// Runs every scenario against one cluster and prints a summary line; exits non-zero on failure.
pub fn run_all(tests: &[(&str, TestFn)]) {
    run_all_within(tests, std::time::Duration::from_secs(120))
}

/// Like [`run_all`], with a different time limit per scenario.
pub fn run_all_within(tests: &[(&str, TestFn)], limit: std::time::Duration) {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let cluster = Cluster::start().expect("start test cluster");
    cluster.load_rls_fixture().expect("load fixture");
    let env = Env { cluster };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let start = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(async {
                match tokio::time::timeout(limit, test(&env)).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("timed out after {} s", limit.as_secs())),
                }
            })
        }))
        .unwrap_or_else(|p| {
            Err(p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "panicked".into()))
        });
        match result {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({} ms)", start.elapsed().as_millis());
            }
            Err(e) => {
                failed += 1;
                println!("test {name} ... FAILED: {e}");
            }
        }
    }
    drop(rt);
    drop(env);
    println!("\n{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

/// Starts the `pgtenant` binary with `run --config <config>` (stdout discarded) and forwards its
/// standard error, line by line, to the returned channel.
pub fn spawn_binary(config: &std::path::Path) -> Result<(std::process::Child, std::sync::mpsc::Receiver<String>), String> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgtenant"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    Ok((child, rx))
}

/// The real-client suite's folder (scripts, `.venv`, `node_modules`).
pub fn clients_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/clients")
}

/// `script` of the client suite under the Python drivers scripts/test.sh installs into
/// tests/clients/.venv (or `PGTENANT_CLIENTS_PYTHON`).
pub fn python_client(script: &str) -> Result<std::process::Command, String> {
    let python = std::env::var("PGTENANT_CLIENTS_PYTHON").map(std::path::PathBuf::from).unwrap_or(clients_dir().join(".venv/bin/python"));
    ensure(python.exists(), format!("{} missing: run ./scripts/test.sh, which installs the client suite", python.display()))?;
    let mut cmd = std::process::Command::new(python);
    cmd.arg(clients_dir().join(script));
    Ok(cmd)
}

/// `script` of the client suite under node, with the drivers scripts/test.sh installs into
/// tests/clients/node_modules.
pub fn node_client(script: &str) -> Result<std::process::Command, String> {
    ensure(clients_dir().join("node_modules/pg").exists(), "tests/clients/node_modules missing: run ./scripts/test.sh, which installs the client suite")?;
    let mut cmd = std::process::Command::new("node");
    cmd.current_dir(clients_dir()).arg(script);
    Ok(cmd)
}

/// `source` (a single-file Java program) of the client suite with Debian's pgjdbc, which
/// scripts/test.sh installs (libpostgresql-jdbc-java).
pub fn java_client(source: &str) -> Result<std::process::Command, String> {
    let jar = "/usr/share/java/postgresql.jar";
    ensure(std::path::Path::new(jar).exists(), "pgjdbc missing: run ./scripts/test.sh, which installs libpostgresql-jdbc-java")?;
    let mut cmd = std::process::Command::new("java");
    cmd.current_dir(clients_dir()).args(["-cp", jar, source]);
    Ok(cmd)
}

/// The first row of a simple-protocol reply.
pub fn first_row(msgs: &[tokio_postgres::SimpleQueryMessage]) -> Result<&tokio_postgres::SimpleQueryRow, String> {
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .ok_or_else(|| "no row".to_string())
}

/// Rows of orders, and the lowest and highest tenant among them, through the simple protocol.
pub async fn tenant_view(c: &tokio_postgres::Client) -> Result<(i64, i32, i32), String> {
    let rows = c
        .simple_query("select count(*), coalesce(min(tenant_id),0), coalesce(max(tenant_id),0) from orders")
        .await
        .map_err(|e| format!("{e:?}"))?;
    let row = first_row(&rows)?;
    let get = |i: usize| row.get(i).unwrap_or("0").parse::<i64>().unwrap_or(-1);
    Ok((get(0), get(1) as i32, get(2) as i32))
}
