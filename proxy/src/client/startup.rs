//! The startup phase: SSLRequest (answered 'S' with rustls when a certificate is configured, else
//! 'N'), GSSENCRequest (always 'N'), CancelRequest, and the protocol 3.0 StartupMessage.
//! A client asking for a newer minor version or `_pq_` protocol options gets a
//! NegotiateProtocolVersion, as from a Postgres 15 server.

use std::collections::HashMap;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::error::{sqlstate, PgError};
use crate::net::Stream;
use crate::protocol::build;
use crate::protocol::frame::read_startup_packet;

const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;
const PROTOCOL_3_0: i32 = 196608;

/// What the client asked for.
pub enum Hello {
    /// A login, with its startup parameters (user, database, options, ...).
    Login { stream: Stream, params: HashMap<String, String> },
    /// A cancel request for (pid, secret key); the connection carries nothing else.
    Cancel { pid: i32, secret: i32 },
    /// The client went away during the startup phase.
    Gone,
}

/// A startup failure, with the stream to report it on when we still have one.
pub struct StartupError {
    pub stream: Option<Stream>,
    pub error: PgError,
}

fn protocol_error(msg: impl Into<String>) -> PgError {
    PgError::fatal(sqlstate::PROTOCOL_VIOLATION, msg)
}

pub async fn negotiate(tcp: TcpStream, tls: Option<&TlsAcceptor>, require_tls: bool) -> Result<Hello, StartupError> {
    let _ = tcp.set_nodelay(true);
    let mut stream = Stream::Tcp(tcp);
    let mut tried_ssl = false;
    let mut tried_gss = false;
    loop {
        let packet = match read_startup_packet(&mut stream).await {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(Hello::Gone),
            Err(e) => {
                return Err(StartupError { stream: Some(stream), error: protocol_error(format!("pgtenant: {e}")) })
            }
        };
        let mut body = packet.clone();
        let code = body.get_i32();
        match code {
            SSL_REQUEST if !tried_ssl && !stream.is_tls() => {
                tried_ssl = true;
                let Some(acceptor) = tls else {
                    if stream.write_all(b"N").await.is_err() {
                        return Ok(Hello::Gone);
                    }
                    continue;
                };
                if stream.write_all(b"S").await.is_err() {
                    return Ok(Hello::Gone);
                }
                let Stream::Tcp(tcp) = stream else { unreachable!("TLS is negotiated once") };
                match acceptor.accept(tcp).await {
                    Ok(tls) => stream = Stream::TlsServer(Box::new(tls)),
                    Err(e) => {
                        tracing::info!(error = %e, "client TLS handshake failed");
                        return Ok(Hello::Gone);
                    }
                }
            }
            GSSENC_REQUEST if !tried_gss && !stream.is_tls() => {
                tried_gss = true;
                if stream.write_all(b"N").await.is_err() {
                    return Ok(Hello::Gone);
                }
            }
            CANCEL_REQUEST if body.remaining() >= 8 => {
                let pid = body.get_i32();
                let secret = body.get_i32();
                return Ok(Hello::Cancel { pid, secret });
            }
            c if c >> 16 == 3 => {
                if require_tls && !stream.is_tls() {
                    return Err(StartupError {
                        stream: Some(stream),
                        error: PgError::fatal(
                            sqlstate::INVALID_AUTHORIZATION,
                            "pgtenant: this server requires TLS (connect with sslmode=require)",
                        ),
                    });
                }
                let params = match parse_params(body) {
                    Some(p) => p,
                    None => {
                        return Err(StartupError {
                            stream: Some(stream),
                            error: protocol_error("pgtenant: malformed startup packet"),
                        })
                    }
                };
                if c != PROTOCOL_3_0 || params.keys().any(|k| k.starts_with("_pq_.")) {
                    let unsupported: Vec<String> =
                        params.keys().filter(|k| k.starts_with("_pq_.")).cloned().collect();
                    let mut out = BytesMut::new();
                    build::negotiate_protocol_version(&mut out, &unsupported);
                    if stream.write_all(&out).await.is_err() {
                        return Ok(Hello::Gone);
                    }
                }
                let params = params.into_iter().filter(|(k, _)| !k.starts_with("_pq_.")).collect();
                return Ok(Hello::Login { stream, params });
            }
            c => {
                let major = c >> 16;
                let minor = c & 0xffff;
                return Err(StartupError {
                    stream: Some(stream),
                    error: PgError::fatal(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        format!("pgtenant: unsupported frontend protocol {major}.{minor}: server supports 3.0"),
                    ),
                });
            }
        }
    }
}

/// Parses `name\0value\0...\0`.
fn parse_params(body: Bytes) -> Option<HashMap<String, String>> {
    let mut params = HashMap::new();
    let mut parts = body.split(|&b| b == 0);
    loop {
        let key = parts.next()?;
        if key.is_empty() {
            return Some(params);
        }
        let value = parts.next()?;
        params.insert(String::from_utf8_lossy(key).into_owned(), String::from_utf8_lossy(value).into_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_startup_params() {
        let p = parse_params(Bytes::from_static(b"user\0alice\0database\0app\0\0")).unwrap();
        assert_eq!(p["user"], "alice");
        assert_eq!(p["database"], "app");
        assert!(parse_params(Bytes::from_static(b"user\0alice")).is_none());
    }
}
