//! `jwt.jwks_url` against a real HTTPS server in the test (its own CA, rustls on both sides):
//! first fetch and readiness, a key published at the provider works at once (unknown-`kid`
//! refetch), a flood of unknown `kid`s is rate-limited, provider errors keep the last good keys,
//! an unreachable URL leaves the proxy not ready with a clear login error, and a reload to a
//! URL that does not answer is refused.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;
use crate::{http_get, login_error};

/// A JWKS provider: serves `doc` at any path over TLS, or HTTP 500 while `failing`.
struct Provider {
    doc: Mutex<String>,
    failing: AtomicBool,
    requests: AtomicUsize,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl").current_dir(dir).args(args).output().map_err(|e| e.to_string())?;
    ensure(out.status.success(), format!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// A CA and a server certificate for 127.0.0.1 signed by it; returns (ca.crt, server.crt, server.key).
fn certificates(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf), String> {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    openssl(dir, &[&["req", "-x509"][..], &ec, &["-days", "1", "-subj", "/CN=pgtenant test CA", "-keyout", "ca.key", "-out", "ca.crt"]].concat())?;
    openssl(dir, &[&["req"][..], &ec, &["-subj", "/CN=127.0.0.1", "-keyout", "srv.key", "-out", "srv.csr"]].concat())?;
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
        .map_err(|e| e.to_string())?;
    openssl(dir, &["x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1", "-out", "srv.crt", "-extfile", "ext.cnf"])?;
    Ok((dir.join("ca.crt"), dir.join("srv.crt"), dir.join("srv.key")))
}

async fn serve(provider: Arc<Provider>, cert: &Path, key: &Path) -> Result<u16, String> {
    let acceptor = pgtenant::client::tls::load_acceptor(cert, key)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, provider) = (acceptor.clone(), provider.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                provider.requests.fetch_add(1, Ordering::SeqCst);
                let answer = if provider.failing.load(Ordering::SeqCst) {
                    "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
                } else {
                    // chunked, as many real providers answer
                    let doc = provider.doc.lock().unwrap().clone();
                    let (a, b) = doc.split_at(doc.len() / 2);
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                        a.len(),
                        b.len()
                    )
                };
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    Ok(port)
}

fn jwks(kids: &[&str]) -> String {
    use base64::Engine as _;
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let keys: Vec<_> = kids.iter().map(|k| json!({"kty": "oct", "kid": k, "alg": "HS256", "k": e.encode(secret_of(k))})).collect();
    json!({ "keys": keys }).to_string()
}

fn secret_of(kid: &str) -> String {
    format!("provider-secret-for-{kid}-0123456789")
}

fn kid_token(kid: &str, tenant: i64) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some(kid.into());
    let claims = json!({"tenant_id": tenant, "sub": format!("via-{kid}"), "exp": now() + 600});
    jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_secret(secret_of(kid).as_bytes())).unwrap()
}

fn jwks_config(env: &Env, url: &str, ca: &Path, extra: &str) -> String {
    let jwt = format!("[jwt]\njwks_url = \"{url}\"\njwks_ca_file = \"{}\"\njwks_min_refresh_s = 1\n{extra}\n", ca.display());
    config_text(env, "", "[admin]\nlisten = \"127.0.0.1:0\"").replace(&format!("[jwt]\nsecret = \"{SECRET}\"\n"), &jwt)
}

async fn wait_loaded(p: &pgtenant::server::Running) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.proxy.auth().verifier.keys_loaded() {
        ensure(Instant::now() < deadline, "JWKS not loaded within 10 s")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub async fn jwks_url_fetch_rotation_and_outage(env: &Env) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (ca, cert, key) = certificates(dir.path())?;
    let provider = Arc::new(Provider { doc: Mutex::new(jwks(&["k1"])), failing: AtomicBool::new(false), requests: AtomicUsize::new(0) });
    let port = serve(provider.clone(), &cert, &key).await?;
    let url = format!("https://127.0.0.1:{port}/.well-known/jwks.json");
    let text = jwks_config(env, &url, &ca, "jwks_refresh_s = 3600");
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|e| e.to_string())?;
    let file = dir.path().join("pgtenant.toml");
    std::fs::write(&file, &text).map_err(|e| e.to_string())?;
    let p = pgtenant::server::start_from(cfg, Some(file.clone())).await?;
    wait_loaded(&p).await?;
    let admin = p.admin_addr.ok_or("no admin")?;
    ensure(http_get(admin, "/readyz").await?.0 == 200, "not ready after the JWKS loaded")?;
    let c1 = connect(&p, &kid_token("k1", 1)).await.map_err(|e| format!("k1 refused: {e:?}"))?;

    // the provider publishes k2: a token signed with it works at once (once jwks_min_refresh_s
    // has passed since the last fetch)
    *provider.doc.lock().unwrap() = jwks(&["k1", "k2"]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = provider.requests.load(Ordering::SeqCst);
    connect(&p, &kid_token("k2", 2)).await.map_err(|e| format!("freshly published k2 refused: {e:?}"))?;
    ensure(provider.requests.load(Ordering::SeqCst) == before + 1, "unknown kid did not trigger exactly one fetch")?;

    // a flood of made-up kids costs at most one fetch per jwks_min_refresh_s
    let before = provider.requests.load(Ordering::SeqCst);
    for i in 0..20 {
        let (code, msg) = login_error(&p, &kid_token(&format!("bogus{i}"), 1)).await;
        ensure(code == "28P01" && msg.contains("unknown key id"), format!("made-up kid: {code} {msg}"))?;
    }
    let fetched = provider.requests.load(Ordering::SeqCst) - before;
    ensure(fetched <= 2, format!("20 unknown kids caused {fetched} fetches"))?;

    // provider outage: refetches fail, the last good keys keep working
    provider.failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (code, _) = login_error(&p, &kid_token("k3", 1)).await;
    ensure(code == "28P01", format!("unknown kid during an outage: {code}"))?;
    connect(&p, &kid_token("k1", 1)).await.map_err(|e| format!("known key lost during an outage: {e:?}"))?;
    // rotation completes at the provider: k1 retired, k3 added
    provider.failing.store(false, Ordering::SeqCst);
    *provider.doc.lock().unwrap() = jwks(&["k2", "k3"]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    connect(&p, &kid_token("k3", 3)).await.map_err(|e| format!("k3 refused after recovery: {e:?}"))?;
    let (code, msg) = login_error(&p, &kid_token("k1", 1)).await;
    ensure(code == "28P01" && msg.contains("unknown key id"), format!("retired k1: {code} {msg}"))?;
    // a client that logged in with k1 keeps its session
    let (n, lo, _) = crate::tenant_view(&c1).await?;
    ensure(n == 100 && lo == 1, "k1 session disturbed by the rotation")?;

    // a reload that points at a URL that does not answer is refused; the old keys stay
    let dead = jwks_config(env, "https://127.0.0.1:1/jwks.json", &ca, "");
    std::fs::write(&file, &dead).map_err(|e| e.to_string())?;
    ensure(p.proxy.reload_from_file().await.is_err(), "reload to an unreachable jwks_url accepted")?;
    connect(&p, &kid_token("k2", 2)).await.map_err(|e| format!("failed reload broke logins: {e:?}"))?;
    let (_, metrics) = http_get(admin, "/metrics").await?;
    ensure(
        metrics.contains("pgtenant_jwks_fetches_total{result=\"ok\"}") && metrics.contains("pgtenant_jwks_fetches_total{result=\"error\"}"),
        "JWKS fetch metrics missing",
    )?;
    p.stop().await;

    // a proxy whose provider is down from the start: not ready, logins told why
    let text = jwks_config(env, "https://127.0.0.1:1/jwks.json", &ca, "");
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|e| e.to_string())?;
    let p = pgtenant::server::start(cfg).await?;
    let (code, body) = http_get(p.admin_addr.ok_or("no admin")?, "/readyz").await?;
    ensure(code == 503 && body.contains("JWT keys"), format!("/readyz with no keys: {code} {body}"))?;
    let (code, msg) = login_error(&p, &kid_token("k1", 1)).await;
    ensure(code == "57P03" && msg.contains("jwks_url"), format!("login with no keys: {code} {msg}"))?;
    p.stop().await;

    // a provider certificate from an unknown CA is not trusted
    let other = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (other_ca, _, _) = certificates(other.path())?;
    let text = jwks_config(env, &url, &other_ca, "");
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|e| e.to_string())?;
    let p = pgtenant::server::start(cfg).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure(!p.proxy.auth().verifier.keys_loaded(), "keys loaded from a server with an untrusted certificate")?;
    p.stop().await;
    Ok(())
}
