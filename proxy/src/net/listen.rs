//! Binding a client listener: `server.listen`, optionally shared with other pgtenant processes on
//! the same host (`server.so_reuseport`), and `server.peer_listen`, this instance's own address.
//!
//! `SO_REUSEPORT` lets several processes bind one port; the kernel then spreads new connections
//! over them (by a hash of the connection's addresses), as PgBouncer's `so_reuseport` does. Every
//! process sharing the port must set it, and Linux accepts only processes of the same user.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Connections waiting to be accepted, as Postgres's default (`listen(2)` backlog).
const BACKLOG: u32 = 1024;

/// Binds `addr` (`host:port`; every address it resolves to is tried in turn, the first that binds
/// wins), with `SO_REUSEADDR` as usual for a server and `SO_REUSEPORT` when `shared`.
pub async fn listen(addr: &str, shared: bool) -> io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        match bind(a, shared) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the address resolves to nothing")))
}

fn bind(addr: SocketAddr, shared: bool) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    if shared {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}
