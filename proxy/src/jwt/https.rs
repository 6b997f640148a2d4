//! The HTTPS GET for `jwt.jwks_url`: one request per connection (`Connection: close`), HTTP/1.1 by
//! hyper, TLS by rustls (the binary's one provider, `crate::net::tls_provider`) with the Mozilla
//! roots plus `jwt.jwks_ca_file`, the whole exchange under a timeout, the body capped at
//! [`MAX_BODY`] and the answer's head at [`MAX_HEAD`]. No redirects, no proxies, no cookies:
//! a JWKS endpoint needs none of them, and each would be a way to be pointed at the wrong keys.
//! Plain `http://` is accepted only for loopback hosts (a local auth sidecar).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::{header, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Largest JWKS document accepted.
pub const MAX_BODY: usize = 1024 * 1024;
/// Largest answer head (status line and headers) accepted.
pub const MAX_HEAD: usize = 64 * 1024;

pub use crate::net::http_target::Target;

/// The TLS client settings for JWKS fetches: Mozilla roots plus the PEM certificates in `ca_file`.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("jwt.jwks_ca_file {}: {e}", path.display()))?;
        let mut n = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("jwt.jwks_ca_file {}: {e}", path.display()))?;
            roots.add(cert).map_err(|e| format!("jwt.jwks_ca_file {}: {e}", path.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!("jwt.jwks_ca_file {}: no PEM certificate found", path.display()));
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(crate::net::tls_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Fetches `target` and returns the body of a `200` answer.
pub async fn get(target: &Target, tls: &Arc<rustls::ClientConfig>, timeout: Duration) -> Result<Vec<u8>, String> {
    tokio::time::timeout(timeout, fetch(target, tls))
        .await
        .map_err(|_| format!("no answer within {} s", timeout.as_secs()))?
}

async fn fetch(target: &Target, tls: &Arc<rustls::ClientConfig>) -> Result<Vec<u8>, String> {
    let host = target.host.trim_matches(['[', ']']);
    let tcp = TcpStream::connect((host, target.port)).await.map_err(|e| format!("cannot connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if target.tls {
        let name = rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|e| format!("bad host name: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        exchange(stream, target).await
    } else {
        exchange(tcp, target).await
    }
}

/// The `Host` header: the port only when it is not the scheme's default.
fn host_header(target: &Target) -> String {
    match (target.tls, target.port) {
        (true, 443) | (false, 80) => target.host.clone(),
        (_, port) => format!("{}:{port}", target.host),
    }
}

/// One GET over `stream` (HTTP/1.1 by hyper), the connection driven alongside the request.
async fn exchange<S>(stream: S, target: &Target) -> Result<Vec<u8>, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let request = Request::get(target.path.as_str())
        .header(header::HOST, host_header(target))
        .header(header::ACCEPT, "application/json")
        .header(header::USER_AGENT, concat!("pgtenant/", env!("CARGO_PKG_VERSION")))
        .header(header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| format!("bad request: {e}"))?;
    let work = async move {
        let response = sender.send_request(request).await.map_err(|e| format!("receive: {e}"))?;
        let status = response.status();
        if status != StatusCode::OK {
            // redirects included: a JWKS URL that moved is a configuration change, not a hop to take
            return Err(format!("HTTP {} {}", status.as_u16(), status.canonical_reason().unwrap_or("")).trim_end().to_string());
        }
        let too_large = || format!("answer larger than {} KiB", MAX_BODY / 1024);
        if response.body().size_hint().lower() > MAX_BODY as u64 {
            return Err(too_large());
        }
        let body = Limited::new(response.into_body(), MAX_BODY).collect().await.map_err(|e| {
            if e.is::<LengthLimitError>() {
                too_large()
            } else {
                format!("receive: {e}")
            }
        })?;
        Ok(body.to_bytes().to_vec())
    };
    let mut work = std::pin::pin!(work);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = &mut work => result,
        closed = &mut connection => {
            closed.map_err(|e| format!("receive: {e}"))?;
            work.await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("https://auth.example.com/.well-known/jwks.json?v=1").unwrap();
        assert_eq!((t.tls, t.host.as_str(), t.port, t.path.as_str()), (true, "auth.example.com", 443, "/.well-known/jwks.json?v=1"));
        assert_eq!(Target::parse("http://127.0.0.1:8080/k").unwrap().port, 8080);
        assert!(Target::parse("http://localhost/k").is_ok());
        assert!(Target::parse("http://auth.example.com/k").unwrap_err().contains("loopback"));
        assert!(Target::parse("ftp://x/k").is_err());
        assert!(Target::parse("https://u:p@x/k").is_err());
        assert!(Target::parse("not a url").is_err());
    }

    /// A loopback HTTP server answering one request with `answer`; it keeps the connection open
    /// for `hold` afterwards (a server that ignores `Connection: close`). Returns the URL and the
    /// request heads it read.
    async fn server(answer: Vec<u8>, hold: Duration) -> (Target, tokio::task::JoinHandle<Vec<String>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://127.0.0.1:{}/jwks.json", listener.local_addr().unwrap().port());
        let task = tokio::spawn(async move {
            let mut heads = Vec::new();
            // a second request would show that a redirect was followed: accept for a while
            while let Ok(Ok((mut sock, _))) = tokio::time::timeout(Duration::from_millis(500), listener.accept()).await {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                heads.push(String::from_utf8_lossy(&head).into_owned());
                let _ = sock.write_all(&answer).await;
                tokio::time::sleep(hold).await;
            }
            heads
        });
        (Target::parse(&url).unwrap(), task)
    }

    async fn fetch_answer(answer: &[u8], hold: Duration) -> (Result<Vec<u8>, String>, Vec<String>) {
        let (target, task) = server(answer.to_vec(), hold).await;
        let result = get(&target, &tls_config(None).unwrap(), Duration::from_secs(2)).await;
        (result, task.await.unwrap())
    }

    const HOLD: Duration = Duration::from_secs(3);

    #[tokio::test]
    async fn framed_answers_are_read_without_waiting_for_close() {
        // Content-Length, from a server that keeps the connection open: done when the body is in
        let (body, heads) = fetch_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"keys\":[]}", HOLD).await;
        assert_eq!(body.unwrap(), b"{\"keys\":[]}");
        let head = heads[0].to_ascii_lowercase();
        assert!(head.starts_with("get /jwks.json http/1.1\r\n") && head.contains("connection: close"), "{head}");
        assert!(head.contains("host: 127.0.0.1:"), "{head}");
        // chunked with extensions and a trailer, same server behaviour
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"k\r\n5;x=y\r\neys\":\r\n3\r\n[]}\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(fetch_answer(chunked, HOLD).await.0.unwrap(), b"{\"keys\":[]}");
        // read-to-close (HTTP/1.0 style)
        assert_eq!(fetch_answer(b"HTTP/1.0 200 OK\r\n\r\n{}", Duration::ZERO).await.0.unwrap(), b"{}");
    }

    #[tokio::test]
    async fn errors_redirects_and_limits() {
        let (e, heads) = fetch_answer(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/evil\r\nContent-Length: 0\r\n\r\n", Duration::ZERO).await;
        assert_eq!((e.unwrap_err().as_str(), heads.len()), ("HTTP 302 Found", 1));
        assert_eq!(fetch_answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", Duration::ZERO).await.0.unwrap_err(), "HTTP 404 Not Found");
        // over the cap: declared, chunked, or read-to-close
        let big = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert!(fetch_answer(big.as_bytes(), Duration::ZERO).await.0.unwrap_err().contains("larger than"));
        let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..=MAX_BODY / 65536 {
            chunked.extend_from_slice(b"10000\r\n");
            chunked.extend(std::iter::repeat_n(b' ', 65536));
            chunked.extend_from_slice(b"\r\n");
        }
        assert!(fetch_answer(&chunked, Duration::ZERO).await.0.unwrap_err().contains("larger than"));
        let mut unframed = b"HTTP/1.0 200 OK\r\n\r\n".to_vec();
        unframed.extend(std::iter::repeat_n(b' ', MAX_BODY + 1));
        assert!(fetch_answer(&unframed, Duration::ZERO).await.0.unwrap_err().contains("larger than"));
        // malformed, truncated, and no answer at all
        assert!(fetch_answer(b"garbage\r\n\r\n", Duration::ZERO).await.0.is_err());
        assert!(fetch_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}", Duration::ZERO).await.0.is_err());
        assert!(fetch_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", Duration::ZERO).await.0.is_err());
        assert!(fetch_answer(b"", HOLD).await.0.unwrap_err().contains("no answer within 2 s"));
    }
}
