//! The admin endpoint speaks HTTP/1.x properly (issue 19: hyper instead of a hand-written
//! parser): malformed requests get 400, oversized heads 431, absolute-form targets are routed by
//! their path, other methods get 405 with `Allow`, a silent client is dropped, and answers carry
//! their framing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// Sends `request` as is and reads the whole answer (the endpoint closes after one).
async fn raw(admin: SocketAddr, request: &[u8]) -> Result<String, String> {
    let mut s = tokio::net::TcpStream::connect(admin).await.map_err(|e| e.to_string())?;
    s.write_all(request).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| "admin endpoint did not answer and close within 10 s")?
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn status(answer: &str) -> u16 {
    answer.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

pub async fn admin_speaks_http(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "[admin]\nlisten = \"127.0.0.1:0\"").await;
    let admin = p.admin_addr.ok_or("admin endpoint not started")?;
    let result = async {
        let a = raw(admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        ensure(status(&a) == 200 && a.to_ascii_lowercase().contains("content-length: 3\r\n") && a.ends_with("\r\n\r\nok\n"), format!("GET /healthz: {a:?}"))?;
        // HTTP/1.0, and an absolute-form target (as a forward proxy would send it)
        let a = raw(admin, b"GET /healthz HTTP/1.0\r\n\r\n").await?;
        ensure(status(&a) == 200, format!("HTTP/1.0: {a:?}"))?;
        let a = raw(admin, format!("GET http://{admin}/healthz HTTP/1.1\r\nHost: {admin}\r\n\r\n").as_bytes()).await?;
        ensure(status(&a) == 200, format!("absolute-form target: {a:?}"))?;
        // not HTTP at all
        let a = raw(admin, b"HELLO THERE\r\n\r\n").await?;
        ensure(status(&a) == 400, format!("malformed request: {a:?}"))?;
        // a head larger than the endpoint reads
        let long = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n", "a".repeat(16 * 1024));
        let a = raw(admin, long.as_bytes()).await?;
        ensure(status(&a) == 431, format!("oversized head: {:?}", a.lines().next()))?;
        // other methods
        let a = raw(admin, b"DELETE /pools HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        ensure(status(&a) == 405 && a.to_ascii_lowercase().contains("allow: get"), format!("DELETE: {a:?}"))?;
        // a POST with a body is read whole and answered
        let a = raw(admin, b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello").await?;
        ensure(status(&a) == 405, format!("POST with a body: {a:?}"))?;
        // a client that sends half a head and then nothing is dropped, and others are still served
        let started = Instant::now();
        let a = raw(admin, b"GET /healthz HTTP/1.1\r\nHo").await?;
        ensure(!a.contains(" 200 ") && started.elapsed() < Duration::from_secs(9), format!("half a head: {a:?} after {:?}", started.elapsed()))?;
        let a = raw(admin, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        ensure(status(&a) == 200, format!("GET /readyz: {a:?}"))?;
        Ok(())
    }
    .await;
    p.stop().await;
    result
}
