//! The admin HTTP endpoint (`[admin] listen`): `/metrics` (Prometheus text), `/healthz` (the
//! process is up), `/readyz` (backend reachable and JWT keys loaded; 503 otherwise) and `/pools`
//! (JSON), `/tenants` (JSON, see `tenants`), and `POST /reload` (re-read the config file, like
//! SIGHUP). A deliberately tiny HTTP/1.1 responder, one request per connection.

pub mod tenants;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::server::Proxy;

/// Metric names (a stable interface, documented in docs/operations.md).
pub mod names {
    pub const CLIENTS: &str = "pgtenant_clients";
    pub const LOGINS: &str = "pgtenant_logins_total";
    pub const TRANSACTIONS: &str = "pgtenant_transactions_total";
    pub const TRANSACTION_SECONDS: &str = "pgtenant_transaction_duration_seconds";
    pub const POOL_WAIT_SECONDS: &str = "pgtenant_pool_wait_seconds";
    pub const POOL_WAIT_TIMEOUTS: &str = "pgtenant_pool_wait_timeouts_total";
    pub const CONFIG_RELOADS: &str = "pgtenant_config_reloads_total";
    pub const JWKS_FETCHES: &str = "pgtenant_jwks_fetches_total";
    pub const BACKEND_CONNECTS: &str = "pgtenant_backend_connects_total";
    pub const CONTEXT_INJECTIONS: &str = "pgtenant_context_injections_total";
    pub const REFUSALS: &str = "pgtenant_refusals_total";
    pub const CLIENT_BYTES: &str = "pgtenant_client_bytes_total";
    pub const LIMIT_REFUSALS: &str = "pgtenant_limit_refusals_total";
    pub const BYPASS_LOGINS: &str = "pgtenant_bypass_logins_total";
    pub const BYPASS_STATEMENTS: &str = "pgtenant_bypass_statements_total";
    pub const AUDIT_RECORDS: &str = "pgtenant_audit_records_total";
    // per-tenant series, rendered at scrape time for the tenants [admin] selects (see `tenants`)
    pub const TENANT_ACTIVE: &str = "pgtenant_tenant_active";
    pub const TENANT_WAITING: &str = "pgtenant_tenant_waiting";
    pub const TENANT_TRANSACTIONS: &str = "pgtenant_tenant_transactions_total";
    pub const TENANT_WAIT_SECONDS: &str = "pgtenant_tenant_wait_seconds_total";
    pub const TENANT_LIMIT_REFUSALS: &str = "pgtenant_tenant_limit_refusals_total";
}

/// The process-wide Prometheus recorder (installed once, even with several proxies in a process).
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            .expect("static buckets")
            .build_recorder();
        let handle = recorder.handle();
        // histograms buffer raw samples until rendered: drain them periodically, or a proxy that
        // nobody scrapes grows by every transaction it times
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new().name("pgtenant-metrics-upkeep".into()).spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            upkeep.run_upkeep();
        });
        // another recorder may already be installed (e.g. by an embedding program): then ours only renders zeros
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

fn response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn ready(proxy: &Proxy) -> Result<(), String> {
    if !proxy.auth().verifier.keys_loaded() {
        return Err("JWT keys not loaded (jwt.jwks_url has not answered yet)".into());
    }
    match tokio::time::timeout(Duration::from_secs(3), proxy.shared.pool.server_info()).await {
        Ok(Ok(_)) if proxy.shared.pool.backend_healthy() => Ok(()),
        Ok(Ok(_)) => Err("the last backend connection attempt failed".into()),
        Ok(Err(e)) => Err(e.message),
        Err(_) => Err("backend check timed out".into()),
    }
}

fn pools_json(proxy: &Proxy) -> String {
    let describe = |name: &str, pool: &crate::pool::Pool| {
        serde_json::json!({
            "name": name,
            "backend": pool.target().describe(),
            "size": pool.size(),
            "busy": pool.busy_count(),
            "idle": pool.idle_count(),
            "waiting": pool.waiting(),
        })
    };
    let mut pools = vec![describe("tenant", &proxy.shared.pool)];
    pools.extend(proxy.shared.bypass.as_deref().map(|b| describe("bypass", b)));
    serde_json::json!({
        "clients": proxy.clients.load(std::sync::atomic::Ordering::Relaxed),
        "pools": pools,
    })
    .to_string()
}

async fn answer(proxy: &Proxy, request_line: &str) -> String {
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if request_line.starts_with("POST ") && path == "/reload" {
        return match proxy.reload_from_file().await {
            Ok(()) => response("200 OK", "text/plain", "reloaded\n"),
            Err(e) => response("400 Bad Request", "text/plain", &format!("new config rejected, the old one stays: {e}\n")),
        };
    }
    if !request_line.starts_with("GET ") {
        return response("405 Method Not Allowed", "text/plain", "GET only\n");
    }
    match path {
        "/metrics" => {
            metrics::gauge!(names::CLIENTS).set(proxy.clients.load(std::sync::atomic::Ordering::Relaxed) as f64);
            let mut text = metrics_handle().render();
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
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
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
            let reply = answer(&proxy, head.lines().next().unwrap_or("")).await;
            let _ = sock.write_all(reply.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
