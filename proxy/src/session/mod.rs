//! One authenticated client, relayed to pooled backends one transaction at a time.
//!
//! The loop reads raw frames from both sides and forwards them untouched; it decodes only what the
//! transaction state machine needs (names, query text, transaction status). A backend is leased
//! when a transaction starts and given back when the backend reports `ReadyForQuery 'I'` with
//! nothing in flight. In front of the first message of every transaction pgtenant writes its
//! context statement (see `inject`), whose replies `replies` swallows, so the client sees exactly
//! what a direct connection would show. Transaction setup (`BEGIN ISOLATION LEVEL …`, `SET
//! TRANSACTION …`, see `crate::sql::txmode`) goes ahead of the context, which then waits for the
//! first message that needs it (`needs_context`).
//!
//! Pipelining: when a client sends a new batch before the previous one has answered, the
//! backend's transaction status at that point is not known yet. The context is then sent
//! speculatively in front of a Parse/Bind/Execute of an ordinary statement (harmless inside a
//! transaction; in an aborted one it fails exactly as the client's own message would). Anything
//! else (a simple Query, a ROLLBACK, a Close) waits until the earlier replies are in.

mod audit;
mod classify;
mod context;
mod forward;
mod from_backend;
mod waits;
pub mod pending;
pub mod inject;
pub mod replies;
mod route;
pub mod settings;
pub mod statements;
#[cfg(test)]
mod tests;
mod view;

pub use view::ClientView;

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::cancel::Registration;
use crate::error::{sqlstate, PgError};
use crate::guard::{Guard, Position};
use crate::net::Stream;
use crate::pool::{Lease, Pool};
use crate::protocol::frame::{try_split, Frame, FrameError};
use crate::protocol::tags::{self, frontend as msg};
use crate::protocol::{build, peek};
use crate::sql::{self, TxEffect};
use classify::{Budget, Classifier, Step};
use context::{Batch, Block, Decision, SinceExact};
use inject::Injection;
use settings::ClientSettings;
use replies::{Replies, Want};
use statements::Statements;

static NEXT_SESSION_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Stop reading one side while this much is waiting to be written to the other.
const HIGH_WATER: usize = 256 * 1024;
const READ_CHUNK: usize = 8192;
/// Read buffer of a client with no transaction open.
const IDLE_READ_CHUNK: usize = 1024;
/// Largest backend message relayed (the server's own limit is 1 GiB).
const MAX_BACKEND_MESSAGE: usize = 1 << 30;
/// A backend DataRow or CopyData larger than this is not held whole: it is relayed piece by piece
/// as it arrives (see `from_backend`), so a session's memory stays bounded whatever the row size.
/// Smaller messages (nearly all) take the whole-message path.
const STREAM_MIN: usize = 64 * 1024;

/// State shared by all sessions of one proxy.
pub struct Shared {
    pub pool: Arc<Pool>,
    /// The clusters and read replicas a transaction may run on (`pool` is the default primary).
    pub router: Arc<crate::routing::Router>,
    /// The trusted bypass pool (`[bypass]`), when enabled.
    pub bypass: Option<Arc<Pool>>,
    pub audit: Arc<crate::audit::AuditLog>,
    pub max_message_bytes: usize,
    /// `server.max_session_state_bytes`.
    pub max_state_bytes: usize,
    /// `server.client_write_timeout_ms`: longest the client may leave its output unread.
    pub client_write_timeout: std::time::Duration,
    /// `[pool]` timeouts (fixed at start).
    pub pool_cfg: crate::config::PoolConfig,
    /// `pool.mode = "session"`: a client keeps its backend until it disconnects.
    pub session_mode: bool,
    /// `tenant.signing_key`: the signer of the context the database can verify (reloadable).
    pub signer: crate::signing::SignerSlot,
    /// Becomes true when the proxy shuts down: sessions end once they are between transactions.
    pub draining: tokio::sync::watch::Receiver<bool>,
}

/// Who a session runs for: the tenant key its transactions queue under, and what the audit log
/// records about it.
#[derive(Debug)]
pub struct Who {
    pub tenant: crate::pool::TenantKey,
    pub subject: Option<String>,
    pub client: std::net::SocketAddr,
    /// A trusted worker on the bypass pool: every statement is audited.
    pub bypass: bool,
    /// The process id the client was given (BackendKeyData), as the audit log's session id.
    pub login: i32,
    /// The cluster the token names (`tenant.cluster_claim`), checked at login.
    pub cluster: Option<String>,
    /// The client asked for a standby (`target_session_attrs`): its transactions go to a replica.
    pub prefers_standby: bool,
}

/// Why a session ended.
#[derive(Debug)]
pub enum End {
    /// Terminate, or the client closed the socket.
    ClientGone,
    /// The session must end with this error sent to the client.
    Fatal(PgError),
    /// The backend connection failed or misbehaved.
    BackendLost(String),
}

enum Flow {
    Continue,
    /// Process this frame again once every reply owed by the backend has arrived.
    Hold(Frame),
    Terminate,
}

enum Event {
    Timeout(PgError),
    ClientRead(std::io::Result<usize>),
    BackendRead(std::io::Result<usize>),
    ClientWrote(std::io::Result<usize>),
    BackendWrote(std::io::Result<usize>),
    Draining,
    /// The client took none of its pending output for `server.client_write_timeout_ms`.
    ClientStalled,
}

pub struct Session {
    id: u64,
    /// The statement guard of the rules this client logged in with.
    guard: Arc<Guard>,
    shared: Arc<Shared>,
    who: Arc<Who>,
    /// The pool the backend comes from: the bypass pool for a trusted worker, else the one the
    /// router chose for the current transaction (see `route`).
    pool: Arc<Pool>,
    client_rd: ReadHalf<Stream>,
    client_wr: WriteHalf<Stream>,
    client_in: BytesMut,
    client_out: BytesMut,
    lease: Option<Lease>,
    backend_in: BytesMut,
    backend_out: BytesMut,
    replies: Replies,
    statements: Statements,
    injection: Injection,
    cancel: Registration,
    /// Where the client is in the batch cycle (see `context`).
    batch: Batch,
    /// The context went out in front of a simple Query (or a Query began a block whose context
    /// waits, or made session SETs): wait for its reply before sending more.
    hold_until_settled: bool,
    held: Option<Frame>,
    view: ClientView,
    settings: ClientSettings,
    draining: tokio::sync::watch::Receiver<bool>,
    /// Wakes the session when it is killed or the proxy starts draining. Polled until the first
    /// event, which puts the session's waker on both wait lists; after that (`interrupt_armed`) it
    /// is left alone (each poll of a registered waiter takes its wait list's lock, and a future
    /// made anew per turn would join and leave the list). The event loop reads the two flags on
    /// every turn (`interrupted`): the future only wakes the session, and completes only on a kill.
    interrupt: Interruption,
    interrupt_armed: bool,
    /// The session has seen that the proxy is draining (it ends once between transactions).
    drain_seen: bool,
    /// When the current backend was attached (transaction duration metric).
    attached_at: std::time::Instant,
    /// Session-level SETs waiting for their transaction to commit (see `pending`).
    pending: pending::PendingSets,
    /// The transaction the backend is in (or will be in once what was sent runs) has not had the
    /// context yet: a `COMMIT`/`ROLLBACK` inside the batch or `… AND CHAIN` went out, or
    /// transaction setup (`BEGIN ISOLATION LEVEL …`, see `crate::sql::txmode`) went ahead of it.
    /// The next message that is not setup gets it. Only an injection clears it (a stale flag costs
    /// one redundant context).
    needs_context: bool,
    /// The sequence reset the backend owes before this session's first statement on it.
    seq_reset: SeqReset,
    /// The server skipped a reset of the attached backend: it goes again before the next batch.
    reset_skipped: bool,
    /// The client's `default_transaction_*` session defaults as SQL for a backend (empty: the
    /// role's own), applied before each transaction that needs them.
    tx_defaults: String,
    /// Generation of `shared.signer` the injection was built with.
    signer_gen: u64,
    /// ParameterStatus reports owed with an extended-protocol DISCARD ALL's CommandComplete.
    discard_reports: Vec<(String, String)>,
    /// When the current transaction got its context (`pool.transaction_timeout_ms`).
    tx_since: Option<std::time::Instant>,
    /// Since when the client has sat idle inside an open transaction
    /// (`pool.idle_in_transaction_timeout_ms`).
    idle_since: Option<std::time::Instant>,
    /// The client's own Parses of named statements in flight: (server statement, name, the batch
    /// it went in, counted by `syncs_sent`). A failed one is forgotten.
    client_parses: Vec<(u64, bytes::Bytes, u32)>,
    /// Client Syncs forwarded so far: which batch a message belongs to.
    syncs_sent: u32,
    /// Client messages sent with a server statement's name in place of the client's: (reply
    /// number, server statement id, client name), so that an error about one names the client's statement
    /// as the server would (`from_backend`). Kept until everything sent is answered.
    renamed: std::collections::VecDeque<(u32, u64, bytes::Bytes)>,
    /// The reply number of the last Parse that made the server's unnamed statement the client's
    /// on this backend (`forward`, `ensure_unnamed_here`): it stays the client's until the next
    /// simple Query, or until that Parse fails (`unnamed_here`).
    unnamed_parsed: Option<u32>,
    /// The reply number of the client's last Parse of its unnamed statement (see
    /// `forward::unnamed_parse_id`).
    last_unnamed_parse: Option<u32>,
    /// The client's unnamed Parses not answered yet, each with the statement it recorded and the one
    /// it replaced.
    unnamed_parses: std::collections::VecDeque<UnnamedParse>,
    /// What the client's messages sent since the transaction status was last exact may have done
    /// to a block (see `block`).
    since_exact: SinceExact,
    /// A simple Query went out since the server's unnamed portal was last known to be gone: the
    /// portal the server may keep from it is closed in front of the client's next message (see
    /// `close_query_portal`).
    query_portal: bool,
    /// Since when output has waited for the client with no write progress
    /// (`server.client_write_timeout_ms`).
    write_waiting_since: Option<std::time::Instant>,
    /// Bytes still to come of a large backend message being streamed (see `STREAM_MIN`), and
    /// whether they go to the client (or are pgtenant's own, dropped).
    stream_left: usize,
    stream_forward: bool,
    /// Room the last client read had, and whether that read filled it: only a client that sends
    /// more than a small buffer holds gets `READ_CHUNK` reads (see `next_io`).
    client_room: usize,
    client_read_full: bool,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shared: Arc<Shared>,
        client: Stream,
        client_in: BytesMut,
        mut settings: ClientSettings,
        cancel: Registration,
        mut view: ClientView,
        guard: Arc<Guard>,
        who: Arc<Who>,
        lease: Option<Lease>,
    ) -> Session {
        let pool = match (&shared.bypass, who.bypass) {
            (Some(b), true) => b.clone(),
            _ => route::home_pool(&shared, &who),
        };
        view.applied = settings.applied();
        let mut signer_gen = 0;
        if let Some(signer) = shared.signer.changed(&mut signer_gen) {
            settings.set_signer(signer);
        }
        let injection = settings.injection();
        let tx_defaults = settings.tx_defaults();
        let (client_rd, client_wr) = tokio::io::split(client);
        let mut session = Session {
            id: NEXT_SESSION_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            guard,
            who,
            pool,
            draining: shared.draining.clone(),
            interrupt: interruption(cancel.slot.clone(), shared.draining.clone()),
            interrupt_armed: false,
            drain_seen: false,
            shared,
            client_rd,
            client_wr,
            client_in,
            client_out: BytesMut::new(),
            lease: None,
            backend_in: BytesMut::new(),
            backend_out: BytesMut::new(),
            replies: Replies::default(),
            statements: Statements::default(),
            injection,
            cancel,
            batch: Batch::Closed,
            hold_until_settled: false,
            held: None,
            view,
            settings,
            attached_at: std::time::Instant::now(),
            pending: pending::PendingSets::default(),
            needs_context: false,
            seq_reset: SeqReset::None,
            reset_skipped: false,
            tx_defaults,
            signer_gen,
            discard_reports: Vec::new(),
            tx_since: None,
            idle_since: None,
            client_parses: Vec::new(),
            syncs_sent: 0,
            renamed: std::collections::VecDeque::new(),
            unnamed_parsed: None,
            last_unnamed_parse: None,
            unnamed_parses: std::collections::VecDeque::new(),
            since_exact: SinceExact::default(),
            query_portal: false,
            write_waiting_since: None,
            stream_left: 0,
            stream_forward: false,
            client_room: 0,
            client_read_full: false,
        };
        if let Some(lease) = lease {
            // session mode: the backend leased at login (its cancel keys are registered already)
            session.cancel.slot.given_by(session.pool.clone());
            session.adopt(lease);
            session.send_seq_reset(false); // what the client sends first is not known yet
        }
        session
    }

    /// Runs until the client leaves or the session fails; never leaves a dirty backend in the pool.
    /// The backend is given back (or closed) before the last words to the client, and those are
    /// bounded by `server.client_write_timeout_ms`: a client that does not read never holds one.
    pub async fn run(mut self) -> End {
        let end = match self.relay().await {
            Ok(()) => End::ClientGone,
            Err(e) => e,
        };
        self.let_backend_go(&end).await;
        // a message after part of a streamed one would reach the client misframed: just close
        let framed = !(self.stream_left > 0 && self.stream_forward);
        match &end {
            _ if !framed => {}
            End::Fatal(err) => err.encode(&mut self.client_out),
            End::BackendLost(why) => {
                tracing::warn!(reason = %why, "backend connection lost mid-session");
                crate::pool::connection_lost(why).encode(&mut self.client_out);
            }
            End::ClientGone => {}
        }
        let flush = async {
            self.client_wr.write_all(&self.client_out).await?;
            self.client_wr.shutdown().await
        };
        if tokio::time::timeout(self.shared.client_write_timeout, flush).await.is_err() {
            tracing::info!("client did not read its last messages in time; closing the connection");
        }
        end
    }

    /// At the session's end: a clean backend goes back to the pool (reset first in session mode);
    /// one in a transaction or mid-reply is closed, which makes the server roll back.
    async fn let_backend_go(&mut self, end: &End) {
        self.cancel.slot.set(None).await;
        if self.lease.is_none() {
            return;
        }
        if self.backend_clean() && !matches!(end, End::BackendLost(_)) {
            if self.shared.session_mode {
                // a whole session ran here: reset everything before anyone else uses it
                if let Some(l) = self.lease.as_mut() {
                    l.backend.end_session();
                }
            }
            self.release().await;
        } else {
            tracing::debug!("closing a backend that was not idle when its client left");
            self.lease = None;
        }
    }

    async fn relay(&mut self) -> Result<(), End> {
        loop {
            if let Flow::Terminate = self.process_client_frames().await? {
                return Ok(());
            }
            if self.lease.is_some() && self.backend_clean() && self.held.is_none() && !self.shared.session_mode {
                self.release().await;
            }
            let between_transactions = self.lease.is_none() || (self.backend_clean() && self.held.is_none());
            if *self.draining.borrow() && between_transactions && !self.batch.is_open() {
                return Err(End::Fatal(PgError::fatal(
                    sqlstate::ADMIN_SHUTDOWN,
                    "pgtenant: terminating connection because the proxy is shutting down",
                )));
            }
            match self.next_event().await {
                Event::ClientRead(Ok(0)) | Event::ClientRead(Err(_)) | Event::ClientWrote(Err(_)) => {
                    return Err(End::ClientGone)
                }
                Event::ClientRead(Ok(n)) => {
                    crate::metrics::hot().client_bytes_in.increment(n as u64);
                    self.client_read_full = n >= self.client_room;
                }
                Event::ClientWrote(Ok(n)) => {
                    crate::metrics::hot().client_bytes_out.increment(n as u64);
                    self.client_out.advance(n);
                    self.write_waiting_since = None; // progress: the clock starts again
                }
                Event::BackendRead(Ok(0)) => return Err(End::BackendLost("server closed the connection".into())),
                Event::BackendRead(Err(e)) | Event::BackendWrote(Err(e)) => {
                    return Err(End::BackendLost(e.to_string()))
                }
                Event::BackendRead(Ok(_)) => self.process_backend_frames()?,
                Event::BackendWrote(Ok(n)) => self.backend_out.advance(n),
                Event::Draining => self.drain_seen = *self.draining.borrow(),
                Event::ClientStalled => {
                    tracing::info!(
                        timeout_ms = self.shared.client_write_timeout.as_millis() as u64,
                        pending = self.client_out.len(),
                        "ending session: the client stopped reading its results (server.client_write_timeout_ms)"
                    );
                    ::metrics::counter!(crate::metrics::CLIENT_WRITE_TIMEOUTS).increment(1);
                    self.client_out.clear(); // it will not read it: no second wait on the way out
                    return Err(End::ClientGone);
                }
                Event::Timeout(err) => {
                    tracing::info!(code = err.code, message = %err.message, "ending session");
                    return Err(End::Fatal(err));
                }
            }
        }
    }

    async fn next_event(&mut self) -> Event {
        let event = self.next_io().await;
        self.interrupt_armed = true;
        if self.cancel.slot.is_terminated() {
            return Event::Timeout(crate::sessions::killed_error());
        }
        event
    }

    async fn next_io(&mut self) -> Event {
        let holding = self.held.is_some() || (self.hold_until_settled && !self.copy_in_open());
        // while client input waits for the backend, keep reading (bounded) so that a client that
        // leaves is noticed at once: its backend must not stay pinned
        let read_client = if holding {
            self.client_in.len() < HIGH_WATER
        } else {
            self.backend_out.len() < HIGH_WATER && self.client_out.len() < HIGH_WATER
        };
        let timeout = self.next_timeout();
        let stall_deadline = self.write_deadline();
        let read_backend = self.client_out.len() < HIGH_WATER;
        // An idle client (no backend, nothing buffered) waits with a small read buffer, and so
        // does one in a transaction until a read fills it: most transactions' messages fit, and
        // growing the buffer for each transaction (then dropping it again at the release, to keep
        // idle clients small) cost an allocation and a copy per transaction.
        let big = !self.client_in.is_empty() || (self.lease.is_some() && self.client_read_full);
        self.client_in.reserve(if big { READ_CHUNK } else { IDLE_READ_CHUNK });
        self.client_room = self.client_in.capacity() - self.client_in.len();
        if self.lease.is_some() {
            self.backend_in.reserve(READ_CHUNK);
        }
        let (brd, bwr) = match &mut self.lease {
            Some(l) => (Some(&mut l.backend.rd), Some(&mut l.backend.wr)),
            None => (None, None),
        };
        let has_backend = brd.is_some();
        let armed = self.interrupt_armed;
        let (deadline, timeout_kind) = match timeout {
            Some((at, kind)) => (Some(at), Some(kind)),
            None => (None, None),
        };
        tokio::select! {
            biased;
            // first, so that it is polled (and its waits registered) before any event arms it
            _ = &mut self.interrupt, if !armed => Event::Draining, // a kill: sorted out in next_event
            // every turn: a drain does not complete the future above, it only wakes the session
            _ = std::future::poll_fn(|_| interrupted(&self.cancel.slot, &self.draining, self.drain_seen)) => Event::Draining,
            _ = sleep_until_opt(deadline), if deadline.is_some() => Event::Timeout(timeout_kind.expect("set with the deadline").error(&self.shared.pool_cfg)),
            r = self.client_wr.write(&self.client_out), if !self.client_out.is_empty() => Event::ClientWrote(r),
            r = write_opt(bwr, &self.backend_out), if has_backend && !self.backend_out.is_empty() => Event::BackendWrote(r),
            r = read_opt(brd, &mut self.backend_in), if has_backend && read_backend => Event::BackendRead(r),
            r = self.client_rd.read_buf(&mut self.client_in), if read_client => Event::ClientRead(r),
            // last: the timer is only armed when no I/O is ready, so the hot path never sets one
            _ = sleep_until_opt(stall_deadline), if stall_deadline.is_some() => Event::ClientStalled,
        }
    }

    /// When pending output to the client must have made progress (`server.client_write_timeout_ms`).
    fn write_deadline(&mut self) -> Option<tokio::time::Instant> {
        if self.client_out.is_empty() {
            self.write_waiting_since = None;
            return None;
        }
        let since = *self.write_waiting_since.get_or_insert_with(std::time::Instant::now);
        Some(tokio::time::Instant::from_std(since + self.shared.client_write_timeout))
    }

    /// The nearest proxy-side timeout of the transaction on this session's backend, if any. Runs on
    /// every turn of the event loop: the error is only built when the timeout fires.
    fn next_timeout(&self) -> Option<(tokio::time::Instant, Timeout)> {
        self.lease.as_ref()?;
        let pool = &self.shared.pool_cfg;
        [
            (self.tx_since, pool.transaction_timeout_ms, Timeout::Transaction),
            (self.idle_since, pool.idle_in_transaction_timeout_ms, Timeout::IdleInTransaction),
        ]
        .into_iter()
        .filter_map(|(since, ms, kind)| Some((since? + std::time::Duration::from_millis(ms), kind)).filter(|_| ms > 0))
        .min_by_key(|(at, _)| *at)
        .map(|(at, kind)| (tokio::time::Instant::from_std(at), kind))
    }

    /// The server is in COPY FROM STDIN and waits for the client's data (nothing held back).
    fn copy_in_open(&self) -> bool {
        self.replies.copy_in && self.held.is_none() && self.lease.is_some()
    }

    /// The backend can go back to the pool: idle, nothing in flight, nothing half-read.
    fn backend_clean(&self) -> bool {
        self.backend_idle() && self.backend_out.is_empty() && self.backend_in.is_empty() && self.stream_left == 0
    }

    /// Between transactions on the backend: every reply in, status idle, no batch open. The one
    /// definition of "idle" (the guard's position and the pool hand-back both use it).
    fn backend_idle(&self) -> bool {
        self.replies.is_settled() && self.replies.status == b'I' && !self.batch.is_open()
    }

    async fn release(&mut self) {
        if let Some(mut lease) = self.lease.take() {
            if std::mem::replace(&mut self.seq_reset, SeqReset::None) != SeqReset::None {
                lease.backend.reset_unconfirmed(); // owed or unanswered: the next session gets it
            }
            self.reset_skipped = false; // the backend owes it to whoever attaches it next
            self.query_portal = false; // (released idle: the server dropped its portals)
            // the relay buffers go back with the connection (both are empty: backend_clean)
            std::mem::swap(&mut self.backend_in, &mut lease.backend.buf_in);
            std::mem::swap(&mut self.backend_out, &mut lease.backend.buf_out);
            // an idle client keeps no large buffers: 10,000 idle clients must stay small
            if self.client_out.is_empty() && self.client_out.capacity() > IDLE_READ_CHUNK {
                self.client_out = BytesMut::new();
            }
            if self.client_in.is_empty() && self.client_in.capacity() > IDLE_READ_CHUNK {
                self.client_in = BytesMut::new();
            }
            let hot = crate::metrics::hot();
            hot.transactions.increment(1);
            hot.transaction_seconds.record(self.attached_at.elapsed().as_secs_f64());
            self.cancel.slot.set(None).await;
            self.pool.release(lease);
        }
    }

    /// Leases a backend for the transaction a message starts; `access` is the mode its first
    /// statement opens the transaction with, if it names one.
    async fn attach(&mut self, access: Option<crate::routing::intent::Mode>) -> Result<(), PgError> {
        // boxed: leasing (queueing, connecting, logging in to the server) is the session's largest
        // stage, and inline it would size every idle session's task
        let lease = Box::pin(self.lease_for(access)).await?;
        self.cancel.slot.set_on(Some((lease.backend.pid, lease.backend.secret_key)), self.pool.clone()).await;
        self.adopt(lease);
        Ok(())
    }

    /// Makes `lease` this session's backend.
    fn adopt(&mut self, mut lease: Lease) {
        self.attached_at = std::time::Instant::now();
        self.replies.reset();
        let b = &mut lease.backend;
        // borrow the connection's relay buffers (ours are empty whenever no lease is held)
        debug_assert!(self.backend_in.is_empty() && self.backend_out.is_empty());
        std::mem::swap(&mut self.backend_in, &mut b.buf_in);
        std::mem::swap(&mut self.backend_out, &mut b.buf_out);
        self.lease = Some(lease);
        self.unnamed_parsed = None;
        self.unnamed_parses.clear();
        self.send_reset();
    }

    /// Sends the reset the attached backend owes this session, if any, in front of the message
    /// about to go (at a batch's start: nothing before it can make the server skip it).
    fn send_reset(&mut self) {
        let Some(l) = self.lease.as_mut() else { return };
        match l.backend.reset_for(self.id) {
            None => {}
            // sent with the first message (`send_seq_reset`): in the same batch as the context
            // when one goes in front of it
            Some(crate::pool::Reset::Sequences) => self.seq_reset = SeqReset::Owed,
            Some(reset) => {
                // pipelined in front of this session's first message: no extra round trip
                build::query(&mut self.backend_out, &reset.into_sql());
                self.replies.expect(Want::Ready, true, true);
            }
        }
    }

    /// Sends the sequence reset the backend owes, if any: in the batch of the context statement
    /// that follows (`in_batch`), else as a Query of its own. Either way it goes ahead of every
    /// client message, and the backend counts as reset once the server confirms it ran.
    fn send_seq_reset(&mut self, in_batch: bool) {
        if self.seq_reset != SeqReset::Owed {
            return;
        }
        let Some(l) = self.lease.as_mut() else { return };
        if in_batch {
            inject::write_sequence_reset(&mut self.backend_out, &mut l.backend, &mut self.replies);
        } else {
            build::query(&mut self.backend_out, crate::pool::conn::RESET_SEQUENCES);
            self.replies.expect(Want::Ready, true, true);
        }
        self.seq_reset = SeqReset::Sent;
    }

    /// The first CommandComplete or ErrorResponse after a sequence reset went out is the reset's:
    /// an error means it did not run (a cancel can land on it), and it is owed again, by this
    /// session's next transaction as much as by anyone's (it protects this session from the one
    /// before it): sent with the next message here, or on the next hand-over of the backend.
    fn confirm_seq_reset(&mut self, tag: u8) {
        if self.seq_reset == SeqReset::Sent && (tag == tags::backend::COMMAND_COMPLETE || tag == tags::backend::ERROR) {
            self.seq_reset = if tag == tags::backend::ERROR { SeqReset::Owed } else { SeqReset::None };
        }
    }

    // ---- client → backend -------------------------------------------------------------------

    async fn process_client_frames(&mut self) -> Result<Flow, End> {
        loop {
            if self.backend_out.len() >= HIGH_WATER {
                return Ok(Flow::Continue);
            }
            if self.hold_until_settled || self.held.is_some() {
                if !self.replies.is_settled() {
                    if self.copy_in_open() {
                        // a held-back query started COPY FROM STDIN: its data must flow meanwhile
                        match try_split(&mut self.client_in, self.shared.max_message_bytes) {
                            Ok(Some(f)) if matches!(f.tag, msg::COPY_DATA | msg::COPY_DONE | msg::COPY_FAIL | msg::FLUSH | msg::SYNC) => {
                                self.on_client_frame(f).await?;
                                continue;
                            }
                            // anything else is a protocol violation during COPY (the server
                            // answers 08P01); held, it would wait for an end the client sends
                            // after it. Not forwarded: if the COPY has just failed on the server,
                            // the server would run it unread by pgtenant.
                            Ok(Some(f)) => {
                                return Err(End::Fatal(PgError::fatal(
                                    sqlstate::PROTOCOL_VIOLATION,
                                    format!("pgtenant: unexpected message type 0x{:02X} during COPY from stdin", f.tag),
                                )));
                            }
                            Ok(None) => {}
                            Err(e) => return Err(End::Fatal(frame_error(e))),
                        }
                    }
                    return Ok(Flow::Continue);
                }
                self.hold_until_settled = false;
            }
            let frame = match self.held.take() {
                Some(f) => f,
                None => match try_split(&mut self.client_in, self.shared.max_message_bytes) {
                    Ok(Some(f)) => f,
                    Ok(None) => return Ok(Flow::Continue),
                    Err(e) => return Err(End::Fatal(frame_error(e))),
                },
            };
            match self.on_client_frame(frame).await? {
                Flow::Continue => {}
                Flow::Hold(f) => {
                    self.held = Some(f);
                    return Ok(Flow::Continue);
                }
                Flow::Terminate => return Ok(Flow::Terminate),
            }
        }
    }

    async fn on_client_frame(&mut self, f: Frame) -> Result<Flow, End> {
        self.idle_since = None;
        if self.batch == Batch::Skipping {
            if f.tag == msg::SYNC {
                self.batch = Batch::Closed;
                let status = self.status_for_client();
                build::ready_for_query(&mut self.client_out, status);
            }
            return Ok(Flow::Continue);
        }
        match f.tag {
            msg::TERMINATE => Ok(Flow::Terminate),
            msg::SYNC => {
                if self.lease.is_none() {
                    // nothing in flight without a backend: answer directly
                    build::ready_for_query(&mut self.client_out, b'I');
                } else if self.replies.copy_in {
                    self.backend_out.extend_from_slice(&f.bytes); // ignored by the server in COPY
                } else {
                    self.forward(&f, false);
                    self.syncs_sent = self.syncs_sent.wrapping_add(1);
                    self.batch = Batch::Closed;
                    self.replies.batch_failed = false;
                    // SETs executed in this batch are kept once its ReadyForQuery shows a clean end
                    self.hold_until_settled |= !self.pending.is_empty();
                }
                Ok(Flow::Continue)
            }
            // Flush and COPY data mean nothing without a backend (the server ignores stray copy data)
            msg::FLUSH | msg::COPY_DATA | msg::COPY_DONE | msg::COPY_FAIL => {
                if self.lease.is_some() {
                    self.forward(&f, false);
                    if matches!(f.tag, msg::COPY_DONE | msg::COPY_FAIL) {
                        self.replies.copy_ended();
                    }
                }
                Ok(Flow::Continue)
            }
            msg::QUERY | msg::FUNCTION_CALL | msg::PARSE | msg::BIND | msg::DESCRIBE | msg::EXECUTE | msg::CLOSE => self.on_work(f).await,
            msg::PASSWORD => Err(End::Fatal(PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "pgtenant: unexpected password message after authentication",
            ))),
            t => Err(End::Fatal(PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("pgtenant: invalid frontend message type {}", t as char),
            ))),
        }
    }

    /// A message that runs or prepares SQL: classify it (`classify`), make sure a backend is
    /// attached and the transaction has the tenant context (`context`), then forward it (with
    /// statement names rewritten) and note what it may leave on the connection.
    async fn on_work(&mut self, f: Frame) -> Result<Flow, End> {
        let simple = matches!(f.tag, msg::QUERY | msg::FUNCTION_CALL);
        if self.who.bypass {
            if let Err(e) = Box::pin(self.audit_bypass(&f)).await {
                return Ok(self.refuse(e, simple));
            }
        }
        if !self.batch.is_open() && self.replies.is_settled() {
            self.since_exact.exact(self.replies.status);
        }
        if let Batch::Open { began_idle: began_idle @ None, .. } = &mut self.batch {
            if self.replies.is_settled() {
                // everything sent is answered: the last ReadyForQuery is the one before this batch
                *began_idle = Some(self.replies.status == b'I');
            }
        }
        let pos = self.position();
        let pos_unknown = self.position_unknown();
        let skipping = self.replies.batch_failed;
        let step = Classifier {
            guard: &self.guard,
            statements: &mut self.statements,
            pos,
            pooling: !self.shared.session_mode,
            batch: self.batch,
            unsettled: self.lease.is_some() && !self.replies.is_settled(),
            pos_unknown,
            skipping,
            replies: self.lease.is_some().then_some(&self.replies),
            budget: Budget { max: self.shared.max_state_bytes, settings: &self.settings },
            function_calls: self.pool.allows_function_calls(),
        }
        .classify(&f)?;
        let block = self.block(); // where the earlier messages leave the backend
        let plan = match step {
            Step::Run(plan) => plan,
            Step::Hold => {
                self.flush_for_hold();
                return Ok(Flow::Hold(f));
            }
            Step::Refuse(r) => return Ok(Box::pin(self.refuse_with(r, simple)).await),
            Step::DiscardAll => {
                self.discard_all(simple);
                return Ok(Flow::Continue);
            }
            Step::ClosedLocally => {
                self.synthetic(tags::backend::CLOSE_COMPLETE);
                return Ok(Flow::Continue);
            }
        };
        if matches!(f.tag, msg::BIND | msg::DESCRIBE) && !skipping && self.statement_parse_in_flight(&f) {
            // it uses a statement of the client's whose Parse in an earlier batch is not
            // answered yet: if that Parse fails or is skipped, the client does not have it
            // (26000), or has the one before. Wait for it.
            self.flush_for_hold();
            return Ok(Flow::Hold(f));
        }
        if f.tag == msg::BIND && !skipping {
            if let Some(err) = self.bind_counts_wrong(&f) {
                return Ok(self.refuse(err, false));
            }
        }
        self.since_exact.sent(f.tag, plan.block, plan.effect);
        let fresh = self.lease.is_none();
        if fresh {
            if let Err(e) = self.attach(plan.access).await {
                return Ok(self.refuse(e, simple));
            }
        } else if self.reset_skipped && !self.batch.is_open() && self.replies.is_settled() {
            // a reset of this backend was skipped (`Replies::own_query_skipped`) and the backend
            // stayed attached (session pooling, or more messages pipelined): send it again now
            self.reset_skipped = false;
            self.send_reset();
        }
        self.close_query_portal();
        if let Some(oid) = plan.function_oid {
            // only functions the operator allowed, as resolved on this backend's database
            if !self.lease.as_ref().is_some_and(|l| l.backend.allowed_calls.contains(&oid)) {
                return Ok(self.refuse(classify::function_call_refused(oid), true));
            }
        }
        let began_idle = match self.batch {
            Batch::Open { began_idle, .. } => began_idle,
            _ => (!self.position_unknown()).then(|| !self.position().in_block),
        };
        let decision = context::decide(context::Inputs {
            batch: self.batch,
            needs_context: self.needs_context,
            batch_failed: self.replies.batch_failed,
            fresh,
            settled: self.replies.is_settled(),
            status: self.replies.status,
            block: block.filter(|_| !fresh),
            simple,
            ordinary: context::ordinary(f.tag, plan.effect),
            defaults_in_place: self.lease.as_ref().is_some_and(|l| l.backend.has_tx_defaults(&self.tx_defaults)),
            setup: plan.setup,
        });
        let mut injected = false;
        let decision = match decision {
            // the context statement's Parse went in an earlier batch that may still fail (and be
            // skipped): wait for it, or its Bind here would find no statement
            Decision::Inject { .. } if self.context_parse_in_flight() => Decision::Hold,
            d => d,
        };
        match decision {
            Decision::Nothing => self.send_seq_reset(false),
            Decision::Hold => {
                self.flush_for_hold();
                if f.tag == msg::PARSE && plan.duplicate.is_none() {
                    // it is classified again once the replies are in: undo what this pass
                    // recorded, or its own statement would make it a duplicate
                    if let Some((name, _)) = crate::protocol::peek::parse_msg(f.body()) {
                        self.statements.close(b'S', name);
                    }
                }
                return Ok(Flow::Hold(f));
            }
            Decision::Inject { start } | Decision::Defer { start } => {
                if plan.modes_then_work {
                    return Ok(self.refuse(forward::modes_then_work_error(), simple));
                }
                // in the context's batch only if the context goes first and nothing else does
                // (transaction defaults are a Query; setup must start its transaction itself)
                let in_batch = matches!(decision, Decision::Inject { .. })
                    && !(start && self.lease.as_ref().is_some_and(|l| !l.backend.has_tx_defaults(&self.tx_defaults)));
                self.send_seq_reset(in_batch);
                if start {
                    self.apply_tx_defaults();
                }
                if self.tx_since.is_none() || !self.position().in_block {
                    self.tx_since = Some(std::time::Instant::now());
                }
                if matches!(decision, Decision::Defer { .. }) {
                    self.needs_context = true; // it goes in front of the next message
                } else {
                    self.inject();
                    injected = true;
                }
            }
        }
        self.idle_since = None;
        if let Some(op) = &plan.tx_op {
            self.pending.tx_op(op);
        }
        if let Some(changes) = plan.changes {
            self.note_changes(&changes);
        }
        match (plan.dealloc, plan.duplicate) {
            (_, Some(dup)) => {
                let (err, key) = *dup;
                self.check_duplicate(&key, err)
            }
            (Some(def), None) => self.forward_deallocate(&f, &def, simple),
            (None, None) => self.forward_rewritten(&f, simple),
        }
        if let Some(d) = plan.deallocates {
            self.statements.deallocated(&d);
        }
        if let Some(l) = self.lease.as_mut() {
            l.backend.note(plan.conn);
        }
        if plan.chain {
            self.needs_context = true;
        }
        if simple {
            self.query_portal |= f.tag == msg::QUERY;
            self.simple_inside_a_batch();
            // after a Query that got the context, or began a block whose context waits (`BEGIN`
            // is setup), wait for its answer: where the backend then is is exact, not guessed
            // (`block`), for clients that do not wait themselves
            let began = matches!(decision, Decision::Defer { .. });
            self.hold_until_settled = injected || began || !self.pending.is_empty();
        } else {
            let executed = matches!(self.batch, Batch::Open { executed: true, .. }) || f.tag == msg::EXECUTE;
            self.batch = Batch::Open { began_idle, executed };
            if f.tag == msg::EXECUTE && plan.effect == Some(TxEffect::End) {
                self.needs_context = true;
            }
        }
        Ok(Flow::Continue)
    }

    /// What the guard needs to know about where a statement runs: the client is in a transaction
    /// block unless its backend is idle — or will be once what pgtenant itself sent ahead is
    /// answered (a hand-over reset in front of the client's first message leaves the client
    /// outside any block).
    fn position(&self) -> Position {
        let idle_for_client = self.replies.only_injected_owed() && self.replies.status == b'I' && !self.batch.is_open();
        Position { in_block: self.lease.is_some() && !idle_for_client }
    }

    /// Whether the client is in a transaction block is not known yet (see
    /// `Classifier::pos_unknown`): its batch began, or with none open its next message comes,
    /// while replies to its earlier messages were outstanding.
    fn position_unknown(&self) -> bool {
        self.lease.is_some()
            && match self.batch {
                Batch::Open { began_idle, .. } => began_idle.is_none(),
                _ => !self.replies.only_injected_owed(),
            }
    }

    /// A Query or FunctionCall went out: inside an unsynced extended batch it does not end the batch
    /// for sure (if the batch failed, the server skips it and goes on skipping up to the client's
    /// own Sync; the backend stays with this client until that Sync has completed). If the batch
    /// did not fail, it committed the batch's implicit transaction, and what follows needs the
    /// context again — unless the backend is inside a block for certain, which it does not end.
    fn simple_inside_a_batch(&mut self) {
        if self.batch.is_open() && !self.block().is_some_and(Block::surely_inside) {
            self.needs_context = true;
        }
    }

    /// Where everything sent leaves the attached backend, as far as is certain (`Block`): inside a
    /// block that nothing sent since the last exact status can have ended, a pipelined message
    /// needs no context (the block has it); inside a failed one, none can be sent. (Whether a
    /// session SET there is kept still waits for the earlier replies: see `pending`.)
    fn block(&self) -> Option<Block> {
        self.lease.as_ref().map(|_| self.since_exact.block(self.replies.status))
    }

    fn status_for_client(&self) -> u8 {
        if self.lease.is_some() { self.replies.status } else { b'I' }
    }

}

/// A client's unnamed Parse awaiting its answer (`Session::unnamed_parse_failed`).
#[derive(Debug)]
struct UnnamedParse {
    /// Its reply number.
    seq: u32,
    /// The unnamed statement it recorded for the client.
    set: Option<Arc<statements::StatementDef>>,
    /// The one it replaced.
    before: Option<Arc<statements::StatementDef>>,
}

/// A sequence reset a newly attached backend owes this session (see `inject::RESET_STATEMENT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeqReset {
    None,
    /// Not sent yet: it goes out with the session's first message.
    Owed,
    /// Sent; its CommandComplete (or error) has not arrived yet.
    Sent,
}

/// The proxy-side limits on how long a client may hold a backend (`[pool]`).
#[derive(Debug, Clone, Copy)]
enum Timeout {
    Transaction,
    IdleInTransaction,
}

impl Timeout {
    fn error(self, pool: &crate::config::PoolConfig) -> PgError {
        match self {
            Timeout::Transaction => PgError::fatal(
                sqlstate::TRANSACTION_TIMEOUT,
                format!("pgtenant: terminating connection due to transaction timeout ({} ms)", pool.transaction_timeout_ms),
            )
            .with_hint("the transaction was rolled back; raise pool.transaction_timeout_ms in the pgtenant config if it must run longer"),
            Timeout::IdleInTransaction => PgError::fatal(
                sqlstate::IDLE_IN_TRANSACTION_TIMEOUT,
                format!("pgtenant: terminating connection due to idle-in-transaction timeout ({} ms)", pool.idle_in_transaction_timeout_ms),
            )
            .with_hint("the transaction was rolled back; end transactions promptly, or raise pool.idle_in_transaction_timeout_ms"),
        }
    }
}

/// Ready once the session was killed, or the proxy started draining and the session has not
/// seen it yet: the flags that `Session::interrupt` wakes the session for.
fn interrupted(slot: &crate::cancel::CancelSlot, draining: &tokio::sync::watch::Receiver<bool>, drain_seen: bool) -> std::task::Poll<()> {
    if slot.is_terminated() || (!drain_seen && *draining.borrow()) {
        std::task::Poll::Ready(())
    } else {
        std::task::Poll::Pending
    }
}

type Interruption = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>;

/// Wakes the session when it is killed (console `KILL`, `/sessions` DELETE) or the proxy starts
/// draining; what happened is read from the flags (see `Session::interrupt`). It completes only on
/// a kill: were a drain to complete it (a drain under way when the session first polls it, or one
/// that comes before the session's first event), the wait for a kill would end with it, and a
/// session then kept open by its transaction could no longer be killed.
fn interruption(slot: Arc<crate::cancel::CancelSlot>, mut draining: tokio::sync::watch::Receiver<bool>) -> Interruption {
    Box::pin(async move {
        let drained = async move {
            let _ = draining.wait_for(|d| *d).await; // wakes the session once; `interrupted` sees why
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = slot.terminated() => {}
            _ = drained => {}
        }
    })
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn read_opt<R: AsyncRead + Unpin>(r: Option<&mut R>, buf: &mut BytesMut) -> std::io::Result<usize> {
    match r {
        Some(r) => r.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

async fn write_opt<W: AsyncWrite + Unpin>(w: Option<&mut W>, buf: &[u8]) -> std::io::Result<usize> {
    match w {
        Some(w) => w.write(buf).await,
        None => std::future::pending().await,
    }
}

fn frame_error(e: FrameError) -> PgError {
    match e {
        FrameError::TooLarge { .. } => PgError::fatal(sqlstate::PROGRAM_LIMIT_EXCEEDED, format!("pgtenant: {e}"))
            .with_hint("raise server.max_message_bytes if this is legitimate"),
        FrameError::BadLength(_) => PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("pgtenant: {e}")),
    }
}

