//! The admin HTTP endpoint (`[admin] listen`): `/metrics` (Prometheus text), `/healthz` (the
//! process is up), `/readyz` (backend reachable and JWT keys loaded; 503 otherwise) and `/pools`
//! (JSON), `/tenants` (JSON, see `tenants`), and `POST /reload` (re-read the config file, like
//! SIGHUP). A deliberately tiny HTTP/1.1 responder, one request per connection.
//!
//! Admin only renders: the metric names and the recorder live in `crate::metrics`, and what the
//! endpoints show comes through [`Source`].

pub mod tenants;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::pool::Pool;

/// What the endpoints read, and what `POST /reload` asks for. `server::Proxy` implements it, so
/// admin renders the proxy without depending on the server module that starts it.
pub trait Source: Send + Sync + 'static {
    /// Client connections open now.
    fn clients(&self) -> usize;
    /// The tenant pool.
    fn pool(&self) -> &Pool;
    /// The bypass pool, when `[bypass]` runs one.
    fn bypass_pool(&self) -> Option<&Pool>;
    /// The JWT keys are loaded (a `jwt.jwks_url` has answered at least once).
    fn keys_loaded(&self) -> bool;
    /// The config in force now (`[admin]` tenant selection follows reloads).
    fn config(&self) -> Arc<Config>;
    /// Re-reads the config file and applies it; the error says why the new config was rejected.
    fn reload_file(&self) -> impl Future<Output = Result<(), String>> + Send;
}

fn response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn ready(proxy: &impl Source) -> Result<(), String> {
    if !proxy.keys_loaded() {
        return Err("JWT keys not loaded (jwt.jwks_url has not answered yet)".into());
    }
    match tokio::time::timeout(Duration::from_secs(3), proxy.pool().usable_primary()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("backend: {e}")),
        Err(_) => Err("backend check timed out".into()),
    }
}

fn pools_json(proxy: &impl Source) -> String {
    let describe = |name: &str, pool: &Pool| {
        serde_json::json!({
            "name": name,
            "backend": pool.target().describe(),
            "size": pool.size(),
            "busy": pool.busy_count(),
            "idle": pool.idle_count(),
            "waiting": pool.waiting(),
        })
    };
    let mut pools = vec![describe("tenant", proxy.pool())];
    pools.extend(proxy.bypass_pool().map(|b| describe("bypass", b)));
    serde_json::json!({
        "clients": proxy.clients(),
        "pools": pools,
    })
    .to_string()
}

async fn answer(proxy: &impl Source, request_line: &str) -> String {
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if request_line.starts_with("POST ") && path == "/reload" {
        return match proxy.reload_file().await {
            Ok(()) => response("200 OK", "text/plain", "reloaded\n"),
            Err(e) => response("400 Bad Request", "text/plain", &format!("new config rejected, the old one stays: {e}\n")),
        };
    }
    if !request_line.starts_with("GET ") {
        return response("405 Method Not Allowed", "text/plain", "GET only\n");
    }
    match path {
        "/metrics" => {
            metrics::gauge!(crate::metrics::CLIENTS).set(proxy.clients() as f64);
            let mut text = crate::metrics::recorder().render();
            text.push_str(&tenants::metrics_text(proxy));
            response("200 OK", "text/plain; version=0.0.4", &text)
        }
        "/healthz" => response("200 OK", "text/plain", "ok\n"),
        "/readyz" => match ready(proxy).await {
            Ok(()) => response("200 OK", "text/plain", "ready\n"),
            Err(e) => response("503 Service Unavailable", "text/plain", &format!("not ready: {e}\n")),
        },
        "/pools" => response("200 OK", "application/json", &pools_json(proxy)),
        "/tenants" => match tenants::json(proxy, query) {
            Ok(body) => response("200 OK", "application/json", &body),
            Err(e) => response("400 Bad Request", "text/plain", &format!("{e}\n")),
        },
        _ => response("404 Not Found", "text/plain", "not found\n"),
    }
}

/// Serves the admin endpoints until the task is dropped.
pub async fn serve<S: Source>(listener: TcpListener, proxy: Arc<S>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // read the request head (bounded), with a timeout against slow clients
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let reply = answer(proxy.as_ref(), head.lines().next().unwrap_or("")).await;
            let _ = sock.write_all(reply.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
