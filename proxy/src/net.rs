//! One stream type for every socket pgtenant speaks Postgres over: client or backend side, TCP,
//! Unix socket, or TLS on top of TCP. The session code is written once against this type.
//!
//! Also the one place that picks the TLS crypto provider ([`tls_provider`]): every rustls config
//! in pgtenant (towards clients, the backend, and a `jwt.jwks_url`) is built with it.

pub mod http_target;
mod listen;

pub use listen::listen;

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// rustls with aws-lc-rs (the same library `jsonwebtoken` verifies signatures with), built once
/// and shared by every TLS config. Configs name it explicitly instead of relying on a
/// process-wide default, so a program embedding pgtenant keeps its own default.
pub fn tls_provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider())).clone()
}

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// TLS we terminate (client side of the proxy).
    TlsServer(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// TLS we originate (towards the backend).
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// An in-memory pipe: the session's unit tests run a client and a scripted backend over these.
    Pipe(tokio::io::DuplexStream),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::TlsServer(_) | Stream::TlsClient(_))
    }
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => $e,
            Stream::Unix($s) => $e,
            Stream::TlsServer($s) => $e,
            Stream::TlsClient($s) => $e,
            Stream::Pipe($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        dispatch!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        dispatch!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        dispatch!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        dispatch!(self, s => Pin::new(s).poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        dispatch!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::TlsServer(s) => s.is_write_vectored(),
            Stream::TlsClient(s) => s.is_write_vectored(),
            Stream::Pipe(s) => s.is_write_vectored(),
        }
    }
}
