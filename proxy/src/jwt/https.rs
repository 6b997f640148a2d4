//! A deliberately small HTTPS GET for `jwt.jwks_url`: one request per connection
//! (`Connection: close`), TLS by rustls with the Mozilla roots plus `jwt.jwks_ca_file`, the whole
//! exchange under a timeout, the body capped at [`MAX_BODY`]. No redirects, no proxies, no cookies:
//! a JWKS endpoint needs none of them, and each would be a way to be pointed at the wrong keys.
//! Plain `http://` is accepted only for loopback hosts (a local auth sidecar).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest JWKS document accepted.
pub const MAX_BODY: usize = 1024 * 1024;

/// Where to fetch from, parsed once from the configured URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, as sent in the request line.
    pub path: String,
}

impl Target {
    pub fn parse(raw: &str) -> Result<Target, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
        let host = url.host_str().ok_or("the URL has no host")?.to_string();
        let tls = match url.scheme() {
            "https" => true,
            "http" => {
                let loopback = host == "localhost"
                    || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false);
                if !loopback {
                    return Err("plain http is accepted only for loopback hosts; use https".into());
                }
                false
            }
            other => return Err(format!("unsupported scheme {other:?} (use https)")),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err("credentials in the URL are not supported".into());
        }
        let port = url.port_or_known_default().ok_or("the URL has no port")?;
        let mut path = url.path().to_string();
        if let Some(q) = url.query() {
            path.push('?');
            path.push_str(q);
        }
        Ok(Target { tls, host, port, path })
    }
}

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
    let raw = if target.tls {
        let name = rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|e| format!("bad host name: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        exchange(stream, target).await?
    } else {
        exchange(tcp, target).await?
    };
    parse_response(&raw)
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, target: &Target) -> Result<Vec<u8>, String> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nUser-Agent: pgtenant/{}\r\nConnection: close\r\n\r\n",
        target.path,
        target.host,
        env!("CARGO_PKG_VERSION")
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
    stream.flush().await.map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    let limit = (MAX_BODY + 16 * 1024) as u64;
    match (&mut stream).take(limit + 1).read_to_end(&mut raw).await {
        Ok(_) => {}
        // servers that close without TLS close_notify: keep what arrived, the framing below decides
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(format!("receive: {e}")),
    }
    if raw.len() as u64 > limit {
        return Err(format!("answer larger than {} KiB", MAX_BODY / 1024));
    }
    Ok(raw)
}

/// Splits an HTTP/1.x answer into status and body (Content-Length, chunked or read-to-close).
pub fn parse_response(raw: &[u8]) -> Result<Vec<u8>, String> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("malformed HTTP answer (no header end)")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "malformed HTTP answer (header not UTF-8)")?;
    let body = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    let code = status.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with("HTTP/1.") {
        return Err("malformed HTTP answer (no status line)".into());
    }
    if code != "200" {
        let reason = status.splitn(3, ' ').nth(2).unwrap_or("");
        return Err(format!("HTTP {code} {reason}").trim_end().to_string());
    }
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| "malformed Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") && value.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        body.get(..n).ok_or("answer shorter than its Content-Length")?.to_vec()
    } else {
        body.to_vec()
    };
    if body.len() > MAX_BODY {
        return Err(format!("answer larger than {} KiB", MAX_BODY / 1024));
    }
    Ok(body)
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n").ok_or("malformed chunked body")?;
        let size_text = std::str::from_utf8(&rest[..eol]).map_err(|_| "malformed chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "malformed chunk size")?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if size > MAX_BODY || out.len() + size > MAX_BODY {
            return Err(format!("answer larger than {} KiB", MAX_BODY / 1024));
        }
        let chunk = rest.get(..size).ok_or("truncated chunked body")?;
        out.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or("truncated chunked body")?;
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

    #[test]
    fn responses() {
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}junk").unwrap(), b"{}");
        assert_eq!(parse_response(b"HTTP/1.0 200 OK\r\n\r\n{\"keys\":[]}").unwrap(), b"{\"keys\":[]}");
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"k\r\n5;x=y\r\neys\":\r\n3\r\n[]}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), b"{\"keys\":[]}");
        assert_eq!(parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n").unwrap_err(), "HTTP 404 Not Found");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").is_err());
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffff\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
    }
}
