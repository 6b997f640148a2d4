//! Readiness tells the truth about the backend now (issue 19): on a cluster of its own, stopped
//! and started again with no client traffic in between, `/readyz` turns 503 within a few seconds
//! of Postgres going away and 200 again once it is back.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::http_get;

/// Polls `/readyz` until it answers `code` (at most `within`); returns how long that took.
async fn readyz_turns(admin: SocketAddr, code: u16, within: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let (got, body) = http_get(admin, "/readyz").await?;
        if got == code {
            return Ok(start.elapsed());
        }
        ensure(start.elapsed() < within, format!("/readyz still {got} {} after {} s (want {code})", body.trim(), within.as_secs()))?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn readyz_follows_the_backend(_env: &Env) -> TestResult {
    let cluster = pgtenant::cluster::Cluster::start().map_err(|e| e.to_string())?;
    cluster.load_rls_fixture().map_err(|e| e.to_string())?;
    let env = Env { cluster };
    let p = start_proxy(&env, "connect_timeout_ms = 1000", "[admin]\nlisten = \"127.0.0.1:0\"").await;
    let admin = p.admin_addr.ok_or("admin endpoint not started")?;
    let mut cluster = env.cluster;
    let result = async {
        // a client is served and leaves: the pool keeps an idle connection, the last attempt succeeded
        let c = connect(&p, &token(1, "health")).await.map_err(|e| format!("{e:?}"))?;
        c.simple_query("select 1").await.map_err(|e| format!("{e:?}"))?;
        drop(c);
        readyz_turns(admin, 200, Duration::from_secs(5)).await?;

        // Postgres goes away; nobody logs in from here on
        tokio::task::block_in_place(|| cluster.stop()).map_err(|e| e.to_string())?;
        let took = readyz_turns(admin, 503, Duration::from_secs(5)).await?;
        println!("  /readyz 503 {} ms after the backend stopped", took.as_millis());
        let (_, body) = http_get(admin, "/readyz").await?;
        ensure(body.contains("not ready"), format!("503 body: {body}"))?;

        // it comes back: ready again, and clients are served
        tokio::task::block_in_place(|| cluster.restart(false)).map_err(|e| e.to_string())?;
        let took = readyz_turns(admin, 200, Duration::from_secs(5)).await?;
        println!("  /readyz 200 {} ms after the backend started", took.as_millis());
        let c = connect(&p, &token(2, "health")).await.map_err(|e| format!("after the restart: {e:?}"))?;
        c.simple_query("select 1").await.map_err(|e| format!("after the restart: {e:?}"))?;
        Ok(())
    }
    .await;
    p.stop().await;
    result
}
