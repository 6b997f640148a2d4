//! Opening one backend connection: TCP or Unix socket, optional TLS (SSLRequest first), the
//! StartupMessage, authentication as the restricted role, then the server's ParameterStatus and
//! BackendKeyData up to the first ReadyForQuery. Also sends CancelRequests to the backend.

use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::{Password, SASLInitialResponse, SASLResponse, SecretKey, Startup};
use pgwire::messages::Message;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::target::BackendTarget;
use crate::config::BackendTls;
use crate::conninfo::Host;
use crate::error::sqlstate;
use crate::net::Stream;
use crate::protocol::frame::read_frame;
use crate::protocol::peek;

/// Largest message accepted from the server during startup.
const MAX_STARTUP_MESSAGE: usize = 1 << 20;

pub struct BackendConn {
    pub stream: Stream,
    /// ParameterStatus values reported at startup, in arrival order.
    pub params: Vec<(String, String)>,
    pub pid: i32,
    pub secret_key: i32,
    pub created: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach the database server at {0}: {1}")]
    Io(String, std::io::Error),
    #[error("timed out connecting to the database server after {0} ms")]
    Timeout(u128),
    #[error("TLS to the database server failed: {0}")]
    Tls(String),
    #[error("the database server does not support TLS, but backend.tls requires it")]
    TlsRequired,
    #[error("{0}")]
    Auth(String),
    #[error("{message}")]
    Server { code: String, message: String },
    #[error("protocol error from the database server: {0}")]
    Protocol(String),
    #[error("unsupported authentication method requested by the database server: {0}")]
    UnsupportedAuth(String),
    /// Reached, but not the kind of server `target_session_attrs` asks for.
    #[error("the server {0}")]
    WrongKind(&'static str),
    /// No host of `backend.url` is the kind of server wanted; `retry` when every host failed in a
    /// way a failover explains (unreachable, shutting down, standby), not a configuration error.
    #[error("no host is a writable primary ({tried})")]
    NoPrimary { tried: String, retry: bool },
}

impl ConnectError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ConnectError::Auth(_) => sqlstate::INVALID_PASSWORD,
            ConnectError::Server { code, .. } => match code.as_str() {
                "3D000" => sqlstate::INVALID_CATALOG_NAME,
                "53300" => sqlstate::TOO_MANY_CONNECTIONS,
                "57P03" => sqlstate::CANNOT_CONNECT_NOW,
                "28000" => sqlstate::INVALID_AUTHORIZATION,
                _ => sqlstate::CONNECTION_FAILURE,
            },
            ConnectError::NoPrimary { .. } | ConnectError::WrongKind(_) => sqlstate::CANNOT_CONNECT_NOW,
            _ => sqlstate::CONNECTION_FAILURE,
        }
    }

    /// A failure a failover explains (the host is down, shutting down, starting, full, or not the
    /// primary): worth trying other hosts and waiting for. Authentication, TLS and protocol
    /// failures are configuration errors.
    pub fn is_unavailable(&self) -> bool {
        match self {
            ConnectError::Io(..) | ConnectError::Timeout(_) | ConnectError::WrongKind(_) => true,
            ConnectError::Server { code, .. } => matches!(code.as_str(), "57P01" | "57P02" | "57P03" | "53300"),
            ConnectError::NoPrimary { retry, .. } => *retry,
            _ => false,
        }
    }
}

fn encode<M: Message>(m: &M) -> BytesMut {
    let mut b = BytesMut::new();
    // only small, bounded messages are encoded here
    let _ = m.encode(&mut b);
    b
}

/// The `application_name` pgtenant's own connections log in with (a pooled connection opened for a
/// client's transaction takes that client's instead: see `crate::pool::Pool::acquire`).
pub const OWN_APPLICATION_NAME: &str = "pgtenant";

/// Connects and logs in as [`OWN_APPLICATION_NAME`]; bounded by the target's connect timeout.
pub async fn connect(target: &BackendTarget) -> Result<BackendConn, ConnectError> {
    connect_as(target, OWN_APPLICATION_NAME).await
}

/// Connects and logs in with `application_name` (the server cleans it and cuts it to 63 bytes, as
/// for any client); bounded by the target's connect timeout.
pub async fn connect_as(target: &BackendTarget, application_name: &str) -> Result<BackendConn, ConnectError> {
    match tokio::time::timeout(target.connect_timeout, connect_inner(target, application_name)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout(target.connect_timeout.as_millis())),
    }
}

async fn open_socket(target: &BackendTarget) -> Result<Stream, ConnectError> {
    let io = |e| ConnectError::Io(target.describe(), e);
    match &target.host {
        Host::Tcp(h) => {
            let tcp = TcpStream::connect((h.as_str(), target.port)).await.map_err(io)?;
            let _ = tcp.set_nodelay(true);
            Ok(Stream::Tcp(tcp))
        }
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{}", target.port));
            Ok(Stream::Unix(UnixStream::connect(path).await.map_err(io)?))
        }
    }
}

/// Sends SSLRequest and upgrades when the server agrees (TCP only).
async fn negotiate_tls(target: &BackendTarget, stream: Stream) -> Result<Stream, ConnectError> {
    let (Stream::Tcp(mut tcp), Some(config)) = (stream, target.tls_config.clone()) else {
        unreachable!("called only for TCP with a TLS config")
    };
    let io = |e| ConnectError::Io(target.describe(), e);
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await.map_err(io)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(io)?;
    match answer[0] {
        b'S' => {
            let Host::Tcp(host) = &target.host else { unreachable!() };
            let name = ServerName::try_from(host.clone()).map_err(|e| ConnectError::Tls(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| ConnectError::Tls(e.to_string()))?;
            Ok(Stream::TlsClient(Box::new(tls)))
        }
        b'N' if target.tls == BackendTls::Prefer => Ok(Stream::Tcp(tcp)),
        b'N' => Err(ConnectError::TlsRequired),
        other => Err(ConnectError::Protocol(format!("unexpected answer {other:#x} to SSLRequest"))),
    }
}

async fn connect_inner(target: &BackendTarget, application_name: &str) -> Result<BackendConn, ConnectError> {
    let mut stream = open_socket(target).await?;
    if target.tls != BackendTls::Disable && matches!(target.host, Host::Tcp(_)) {
        stream = negotiate_tls(target, stream).await?;
    }
    let io = |e| ConnectError::Io(target.describe(), e);
    let mut startup = Startup::new();
    for (k, v) in [
        ("user", target.user.as_str()),
        ("database", target.database.as_str()),
        (crate::protocol::APPLICATION_NAME, application_name),
        ("client_encoding", "UTF8"),
    ] {
        startup.parameters.insert(k.into(), v.into());
    }
    stream.write_all(&encode(&startup)).await.map_err(io)?;

    let mut buf = BytesMut::new();
    let mut scram: Option<ScramSha256> = None;
    let mut params = Vec::new();
    let mut key = (0, 0);
    loop {
        let f = read_frame(&mut stream, &mut buf, MAX_STARTUP_MESSAGE)
            .await
            .map_err(io)?
            .ok_or_else(|| ConnectError::Protocol("server closed the connection during startup".into()))?;
        let mut body = Bytes::copy_from_slice(f.body());
        match f.tag {
            b'R' => {
                if body.remaining() < 4 {
                    return Err(ConnectError::Protocol("short authentication message".into()));
                }
                let reply = authenticate(target, body.get_i32(), body, &mut scram)?;
                if let Some(reply) = reply {
                    stream.write_all(&reply).await.map_err(io)?;
                }
            }
            b'S' => {
                let mut parts = f.body().split(|&b| b == 0);
                let k = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                let v = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                params.push((k, v));
            }
            b'K' if body.remaining() >= 8 => key = (body.get_i32(), body.get_i32()),
            b'Z' => {
                return Ok(BackendConn { stream, params, pid: key.0, secret_key: key.1, created: Instant::now() })
            }
            b'E' => return Err(server_error(f.body())),
            b'N' | b'v' => {}
            t => return Err(ConnectError::Protocol(format!("unexpected message '{}' during startup", t as char))),
        }
    }
}

/// One authentication step: the reply to send, if any.
fn authenticate(
    target: &BackendTarget,
    code: i32,
    body: Bytes,
    scram: &mut Option<ScramSha256>,
) -> Result<Option<BytesMut>, ConnectError> {
    let password = || {
        target.password.clone().ok_or_else(|| {
            ConnectError::Auth(format!("the database server asks for a password for \"{}\", but backend.url has none", target.user))
        })
    };
    let protocol = |e: std::io::Error| ConnectError::Protocol(format!("SCRAM: {e}"));
    Ok(match code {
        0 => None,
        3 => Some(encode(&Password::new(password()?))),
        5 => {
            let salt: [u8; 4] = body.get(..4).and_then(|s| s.try_into().ok()).ok_or_else(|| ConnectError::Protocol("short md5 salt".into()))?;
            Some(encode(&Password::new(md5_hash(target.user.as_bytes(), password()?.as_bytes(), salt))))
        }
        10 => {
            let offers_scram = body.split(|&b| b == 0).any(|m| m == b"SCRAM-SHA-256");
            if !offers_scram {
                return Err(ConnectError::UnsupportedAuth(String::from_utf8_lossy(&body).replace('\0', " ").trim().to_string()));
            }
            let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
            let msg = encode(&SASLInitialResponse::new("SCRAM-SHA-256".into(), Some(Bytes::copy_from_slice(s.message()))));
            *scram = Some(s);
            Some(msg)
        }
        11 => {
            let s = scram.as_mut().ok_or_else(|| ConnectError::Protocol("SASL continue without SASL start".into()))?;
            s.update(&body).map_err(protocol)?;
            Some(encode(&SASLResponse::new(Bytes::copy_from_slice(s.message()))))
        }
        12 => {
            let s = scram.as_mut().ok_or_else(|| ConnectError::Protocol("SASL final without SASL start".into()))?;
            s.finish(&body).map_err(protocol)?;
            None
        }
        other => return Err(ConnectError::UnsupportedAuth(format!("authentication request {other}"))),
    })
}

fn server_error(body: &[u8]) -> ConnectError {
    let code = peek::error_code(body).map(|c| String::from_utf8_lossy(c).into_owned()).unwrap_or_default();
    let mut message = String::new();
    let mut rest = body;
    while let Some((&field, r)) = rest.split_first() {
        let Some((val, r)) = peek::cstr(r) else { break };
        if field == b'M' {
            message = String::from_utf8_lossy(val).into_owned();
        }
        rest = r;
    }
    if code == "28P01" || code == "28000" {
        ConnectError::Auth(message)
    } else {
        ConnectError::Server { code, message }
    }
}

/// Sends a CancelRequest for (pid, secret) on a new connection, as libpq does.
pub async fn send_cancel(target: &BackendTarget, pid: i32, secret_key: i32) -> std::io::Result<()> {
    let work = async {
        let mut stream = open_socket(target).await.map_err(|e| std::io::Error::other(e.to_string()))?;
        if target.tls != BackendTls::Disable && matches!(target.host, Host::Tcp(_)) {
            stream = negotiate_tls(target, stream).await.map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        stream.write_all(&encode(&CancelRequest::new(pid, SecretKey::I32(secret_key)))).await?;
        // the server closes the connection once it has the request
        let mut sink = [0u8; 16];
        let _ = stream.read(&mut sink).await;
        Ok(())
    };
    tokio::time::timeout(target.connect_timeout, work)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "cancel request timed out")))
}
