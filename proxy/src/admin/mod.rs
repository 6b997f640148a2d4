//! The admin HTTP endpoint (`[admin] listen`): `/metrics` (Prometheus text), `/healthz` (the
//! process is up), `/readyz` (backend reachable and JWT keys loaded; 503 otherwise) and `/pools`
//! (JSON, see `pools`), `/tenants` (JSON, see `tenants`), and `POST /reload` (re-read the config file, like
//! SIGHUP). HTTP/1.x is hyper's; this module only routes and renders.
//!
//! Admin only renders: the metric names and the recorder live in `crate::metrics`, and what the
//! endpoints show comes through [`Source`].

pub mod pools;
pub mod tenants;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
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
    /// The clusters and replicas transactions are routed to (`[[clusters]]`, `backend.replicas`).
    fn router(&self) -> Option<&crate::routing::Router> {
        None
    }
    /// Re-reads the config file and applies it; the error says why the new config was rejected.
    fn reload_file(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// Longest time a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest time one connection may take from accept to the end of its answer (a client that does
/// not read the answer is dropped then).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head accepted (hyper's smallest buffer); a longer one gets `431`.
const MAX_HEAD: usize = 8192;

type Reply = Response<Full<Bytes>>;

fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut reply = Response::new(Full::new(body.into()));
    *reply.status_mut() = status;
    reply.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    reply
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    response(status, "text/plain", body)
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

/// The `/pools` JSON: `pools` holds the tenant and bypass pools, `clusters` each cluster's
/// primary pool and its replicas (the default cluster's primary is the tenant pool).
pub fn pools_json(proxy: &impl Source) -> String {
    let describe = |name: &str, pool: &Pool| {
        serde_json::json!({
            "name": name,
            "backend": pool.target().describe(),
            "size": pool.size(),
            "busy": pool.busy_count(),
            "idle": pool.idle_count(),
            "waiting": pool.waiting(),
            "paused": pool.is_paused(),
            // failover: the configured hosts, the one in use (null while there is no primary)
            "hosts": pool.hosts(),
            "primary": pool.primary(),
            "failovers": pool.failover_count(),
        })
    };
    let mut pools = Vec::new();
    let mut clusters: Vec<serde_json::Value> = Vec::new();
    for p in pools::list(proxy) {
        if matches!(p.label, "tenant" | "bypass") {
            pools.push(describe(p.label, p.pool));
        }
        let Some(name) = p.cluster else { continue };
        match p.replica {
            None => clusters.push(serde_json::json!({ "cluster": name, "primary": describe("primary", p.pool), "replicas": [] })),
            Some(r) => {
                let mut v = describe(&format!("replica {}", r.index), p.pool);
                v["up"] = r.up().into();
                v["lag_ms"] = r.lag_ms().into();
                if let Some(replicas) = clusters.iter_mut().find(|c| c["cluster"] == name).and_then(|c| c["replicas"].as_array_mut()) {
                    replicas.push(v);
                }
            }
        }
    }
    serde_json::json!({
        "clients": proxy.clients(),
        "pools": pools,
        "clusters": clusters,
    })
    .to_string()
}

/// Sets the gauges that are sampled at scrape time rather than kept up to date.
async fn sample_gauges(proxy: &impl Source) {
    use crate::metrics as names;
    metrics::gauge!(names::CLIENTS).set(proxy.clients() as f64);
    metrics::gauge!(names::READY).set(if ready(proxy).await.is_ok() { 1.0 } else { 0.0 });
    let pools = std::iter::once(("tenant", proxy.pool())).chain(proxy.bypass_pool().map(|b| ("bypass", b)));
    for (name, pool) in pools {
        metrics::gauge!(names::POOL_SIZE, "pool" => name).set(pool.size() as f64);
        metrics::gauge!(names::POOL_BUSY, "pool" => name).set(pool.busy_count() as f64);
        metrics::gauge!(names::POOL_IDLE, "pool" => name).set(pool.idle_count() as f64);
        metrics::gauge!(names::POOL_WAITING, "pool" => name).set(pool.waiting() as f64);
    }
}

async fn answer<B>(proxy: &impl Source, request: Request<B>) -> Reply {
    let (method, path, query) = (request.method(), request.uri().path(), request.uri().query().unwrap_or(""));
    if method == Method::POST && path == "/reload" {
        return match proxy.reload_file().await {
            Ok(()) => text(StatusCode::OK, "reloaded\n"),
            Err(e) => text(StatusCode::BAD_REQUEST, format!("new config rejected, the old one stays: {e}\n")),
        };
    }
    if method != Method::GET {
        let mut reply = text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        reply.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
        return reply;
    }
    match path {
        "/metrics" => {
            sample_gauges(proxy).await;
            let mut text = crate::metrics::recorder().render();
            text.push_str(&tenants::metrics_text(proxy));
            response(StatusCode::OK, "text/plain; version=0.0.4", text)
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match ready(proxy).await {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
        },
        "/pools" => response(StatusCode::OK, "application/json", pools_json(proxy)),
        "/tenants" => match tenants::json(proxy, query) {
            Ok(body) => response(StatusCode::OK, "application/json", body),
            Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Serves the admin endpoints until the task is dropped: HTTP/1.x by hyper, one request per
/// connection, the request head within [`HEAD_TIMEOUT`] and [`MAX_HEAD`] bytes, the whole
/// connection within [`CONNECTION_TIMEOUT`].
pub async fn serve<S: Source>(listener: TcpListener, proxy: Arc<S>) {
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // out of file descriptors, most likely: let some close before trying again
                tracing::warn!(error = %e, "admin endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(answer(proxy.as_ref(), request).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .keep_alive(false)
                .serve_connection(TokioIo::new(sock), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
}
