//! Bounded sessions (issue 19): a client that stops reading (or half-closes its socket and never
//! reads) must not keep a pooled backend beyond `server.client_write_timeout_ms`, and the
//! per-session collections (session settings, named portals) are capped with clear errors.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::common::*;
use crate::hostile::{query, raw_login};

/// A proxy with one backend and a 1 s client write timeout.
async fn one_backend_proxy(env: &Env) -> pgtenant::server::Running {
    let text = config_text(env, "pool_size = 1", "")
        .replace("listen = \"127.0.0.1:0\"\n", "listen = \"127.0.0.1:0\"\nclient_write_timeout_ms = 1000\n");
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).expect("test config");
    pgtenant::server::start(cfg).await.expect("proxy starts")
}

/// A second client gets the only backend (and its own tenant's rows) soon after a stuck client
/// took it: within the 1 s write timeout plus slack, well under the 5 s pool wait timeout.
async fn backend_comes_back(p: &pgtenant::server::Running, what: &str) -> TestResult {
    let started = Instant::now();
    let c = connect(p, &token(3, "next")).await.map_err(|e| format!("{what}: login: {e:?}"))?;
    let (n, lo, hi) = crate::tenant_view(&c).await.map_err(|e| format!("{what}: {e}"))?;
    ensure(n == 100 && lo == 3 && hi == 3, format!("{what}: wrong rows"))?;
    let waited = started.elapsed();
    ensure(waited < Duration::from_secs(4), format!("{what}: the next client waited {waited:?} for the backend"))
}

pub async fn stuck_clients_do_not_pin_the_backend(env: &Env) -> TestResult {
    let p = one_backend_proxy(env).await;
    let big = query("SELECT repeat('x', 1000) FROM generate_series(1, 1000000)");
    // sends a query with ~1 GB of output, half-closes its socket and never reads
    let mut half = raw_login(&p, &token(1, "half-closed")).await?;
    half.write_all(&big).await.map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    half.shutdown().await.map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    backend_comes_back(&p, "after a half-closed client").await?;
    // sends the same query and simply never reads (the socket stays open)
    let mut silent = raw_login(&p, &token(2, "silent")).await?;
    silent.write_all(&big).await.map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    backend_comes_back(&p, "after a client that stopped reading").await?;
    // the stuck sessions are gone and no backend stays leased
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.proxy.shared.pool.busy_count() > 0 {
        ensure(Instant::now() < deadline, "a backend stayed leased")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop((half, silent));
    p.stop().await;
    Ok(())
}
