//! The admin console over the Postgres protocol, as PgBouncer users expect it:
//! `psql "host=… port=6432 dbname=pgtenant user=admin"` with an admin token as the password (see
//! `login`). It answers the simple query protocol only — `SHOW POOLS | CLIENTS | SERVERS | TENANTS
//! | STATS | CONFIG | VERSION`, `RELOAD`, `PAUSE`, `RESUME`, `KILL <tenant>` (see `command`) — with
//! RowDescription / DataRow / CommandComplete like any server, so psql and scripts read it as they
//! read PgBouncer's. An unknown command is an ERROR and the console stays usable.
//!
//! The console never touches a backend: it reads the pools and the live sessions
//! (`crate::sessions`), and its commands act on them. docs/operations.md#console documents every
//! command and column. What it reads of the proxy comes through [`Source`], so the console does not
//! depend on the server module that hands it its clients.

mod command;
pub mod login;
mod settings;
mod show;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;

use bytes::BytesMut;
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::config::Config;
use crate::error::{sqlstate, PgError};
use crate::jwt::JwtError;
use crate::net::Stream;
use crate::protocol::frame::try_split;
use crate::protocol::{build, peek};
use crate::sessions::Sessions;
use command::Command;

/// The database name that reaches the console.
pub const DATABASE: &str = "pgtenant";

/// Largest console message accepted (commands are short).
const MAX_MESSAGE: usize = 64 * 1024;

/// Whether a login is for the console: `dbname=pgtenant` while `[admin] token_claim` is set (with
/// the console off, the name is an ordinary database name).
pub fn addressed(params: &HashMap<String, String>, config: &Config) -> bool {
    config.admin.token_claim.is_some() && params.get("database").is_some_and(|d| d == DATABASE)
}

/// What the console reads and acts on besides what the admin endpoint shows (`admin::Source`: the
/// pools, the config in force, re-reading the config file). `server::Proxy` implements both.
pub trait Source: crate::admin::Source {
    /// The live client sessions (`SHOW CLIENTS`, `SHOW SERVERS`, `KILL`).
    fn sessions(&self) -> &Sessions;
    /// Whether `pool.mode` is `session`.
    fn session_mode(&self) -> bool;
    /// Turns true when the proxy starts shutting down.
    fn draining(&self) -> watch::Receiver<bool>;
    /// Verifies a login token with the `[jwt]` keys in force, as a tenant's is verified.
    fn verify_token(&self, token: &str) -> impl Future<Output = Result<Map<String, Value>, JwtError>> + Send;
}

/// A logged-in console client.
pub struct Console {
    stream: Stream,
    /// Bytes received and not yet handled.
    buf: BytesMut,
    /// The admin token's `sub`, for the log.
    subject: String,
    peer: SocketAddr,
}

impl Console {
    /// Answers commands until the client leaves (or the proxy shuts down).
    pub async fn serve(mut self, proxy: &impl Source) {
        let mut draining = proxy.draining();
        // after an extended-protocol message: skip to the Sync (it was answered with an error)
        let mut skipping = false;
        loop {
            loop {
                let frame = match try_split(&mut self.buf, MAX_MESSAGE) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return self.close(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("pgtenant: {e}"))).await,
                };
                let mut out = BytesMut::new();
                match frame.tag {
                    b'X' => return,
                    b'Q' => {
                        let text = peek::cstr(frame.body()).map(|(q, _)| String::from_utf8_lossy(q).into_owned()).unwrap_or_default();
                        self.query(proxy, &text, &mut out).await;
                        build::ready_for_query(&mut out, b'I');
                    }
                    b'S' => {
                        skipping = false;
                        build::ready_for_query(&mut out, b'I');
                    }
                    _ if skipping => {}
                    _ => {
                        skipping = true;
                        PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, "pgtenant: the admin console answers simple queries only")
                            .with_hint("use psql, or your driver's simple query mode")
                            .encode(&mut out);
                    }
                }
                if self.stream.write_all(&out).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                read = self.stream.read_buf(&mut self.buf) => {
                    if !matches!(read, Ok(n) if n > 0) {
                        return;
                    }
                }
                _ = async { drop(draining.wait_for(|d| *d).await) } => {
                    let e = PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "pgtenant: terminating connection because the proxy is shutting down");
                    return self.close(e).await;
                }
            }
        }
    }

    async fn close(mut self, err: PgError) {
        let mut out = BytesMut::new();
        err.encode(&mut out);
        let _ = self.stream.write_all(&out).await;
        let _ = self.stream.shutdown().await;
    }

    /// Runs the commands of one simple Query; the first error ends it, as in Postgres.
    async fn query(&self, proxy: &impl Source, text: &str, out: &mut BytesMut) {
        let commands = match command::parse(text) {
            Ok(c) if c.is_empty() => return build::empty_query(out),
            Ok(c) => c,
            Err(e) => return e.encode(out),
        };
        for c in commands {
            match self.run(proxy, c).await {
                Ok(Reply::Rows(table)) => {
                    build::row_description(out, &table.columns);
                    for row in &table.rows {
                        build::data_row(out, row);
                    }
                    build::command_complete(out, "SHOW");
                }
                Ok(Reply::Done(tag)) => build::command_complete(out, &tag),
                Err(e) => return e.encode(out),
            }
        }
    }

    async fn run(&self, proxy: &impl Source, c: Command) -> Result<Reply, PgError> {
        let state = |m: &str| PgError::error(sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE, format!("pgtenant: {m}"));
        // the tenant pool and every cluster and replica pool (`routing`), and the bypass pool: the
        // pools `SHOW POOLS` lists
        let pools = || crate::admin::pools::list(proxy).into_iter().map(|listed| listed.pool);
        if !matches!(c, Command::Show(_)) {
            tracing::warn!(sub = %self.subject, peer = %self.peer, command = ?c, "console command");
        }
        match c {
            Command::Show(what) => Ok(Reply::Rows(show::show(proxy, what).await)),
            Command::Reload => match proxy.reload_file().await {
                Ok(()) => Ok(Reply::Done("RELOAD".into())),
                Err(e) => Err(PgError::error(sqlstate::CONFIG_FILE_ERROR, format!("pgtenant: new config rejected, the old one stays: {e}"))),
            },
            Command::Pause => {
                // every pool, even when one is paused already
                let paused: Vec<bool> = pools().map(|p| p.pause()).collect();
                if !paused.contains(&true) {
                    return Err(state("already paused"));
                }
                for p in pools() {
                    p.drained().await;
                }
                Ok(Reply::Done("PAUSE".into()))
            }
            Command::Resume => {
                let resumed: Vec<bool> = pools().map(|p| p.resume()).collect();
                match resumed.contains(&true) {
                    true => Ok(Reply::Done("RESUME".into())),
                    false => Err(state("not paused")),
                }
            }
            Command::Kill(tenant) => Ok(Reply::Done(format!("KILL {}", proxy.sessions().kill_tenant(&tenant)))),
        }
    }
}

/// What a command answers.
enum Reply {
    Rows(show::Table),
    /// CommandComplete with this tag.
    Done(String),
}
