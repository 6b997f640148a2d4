//! One authenticated client, relayed to pooled backends one transaction at a time.
//!
//! The loop reads raw frames from both sides and forwards them untouched; it decodes only what the
//! transaction state machine needs (names, query text, transaction status). A backend is leased
//! when a transaction starts and given back when the backend reports `ReadyForQuery 'I'` with
//! nothing in flight. In front of the first message of every transaction pgtenant writes its
//! context statement (see `inject`), whose replies `replies` swallows, so the client sees exactly
//! what a direct connection would show. Transaction setup (`BEGIN ISOLATION LEVEL …`, `SET
//! TRANSACTION …`, see `crate::sql::txmode`) goes ahead of the context, which then waits for the
//! first message that needs it (`ctx_pending`).
//!
//! Pipelining: when a client sends a new batch before the previous one has answered, the
//! backend's transaction status at that point is not known yet. The context is then sent
//! speculatively in front of a Parse/Bind/Execute of an ordinary statement (harmless inside a
//! transaction; in an aborted one it fails exactly as the client's own message would). Anything
//! else (a simple Query, a ROLLBACK, a Close) waits until the earlier replies are in.

mod audit;
pub mod inject;
pub mod prepared;
pub mod replies;
pub mod settings;
pub mod statements;
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
use crate::protocol::{build, peek};
use crate::sql::{self, TxEffect};
use inject::Injection;
use settings::ClientSettings;
use replies::{Action, Replies, Want};
use statements::Statements;

/// Clears the session state one client can leave on a backend for the next: held cursors,
/// listeners, session advisory locks, temporary tables, sequence state (`currval`/`lastval`).
/// Also session-level settings the client changed with `SET` (RESET ALL).
pub const RESET_QUERY: &str =
    "CLOSE ALL; UNLISTEN *; SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES; RESET ALL";

static NEXT_SESSION_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Stop reading one side while this much is waiting to be written to the other.
const HIGH_WATER: usize = 256 * 1024;
const READ_CHUNK: usize = 8192;
/// Read buffer of a client with no transaction open.
const IDLE_READ_CHUNK: usize = 1024;
/// Largest backend message relayed (the server's own limit is 1 GiB).
const MAX_BACKEND_MESSAGE: usize = 1 << 30;

/// State shared by all sessions of one proxy.
pub struct Shared {
    pub pool: Arc<Pool>,
    /// The trusted bypass pool (`[bypass]`), when enabled.
    pub bypass: Option<Arc<Pool>>,
    pub audit: Arc<crate::audit::AuditLog>,
    pub max_message_bytes: usize,
    /// `server.max_session_state_bytes`.
    pub max_state_bytes: usize,
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
}

pub struct Session {
    id: u64,
    /// The statement guard of the rules this client logged in with.
    guard: Arc<Guard>,
    shared: Arc<Shared>,
    who: Arc<Who>,
    /// The tenant pool, or the bypass pool for a trusted worker.
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
    /// Client messages were forwarded since the last Sync: the batch is open.
    in_batch: bool,
    /// A statement inside the open batch ended the transaction: the next one needs the context.
    reinject: bool,
    /// The open batch began outside any transaction block.
    batch_started_idle: bool,
    /// A locally refused extended-protocol message: drop client messages up to Sync.
    skip_to_sync: bool,
    /// The context went out in front of a simple Query: wait for its reply before sending more.
    hold_until_settled: bool,
    held: Option<Frame>,
    /// Refusal errors waiting for their stand-in's error from the server, in order.
    refusals: std::collections::VecDeque<PgError>,
    view: ClientView,
    settings: ClientSettings,
    draining: tokio::sync::watch::Receiver<bool>,
    /// When the current backend was attached (transaction duration metric).
    attached_at: std::time::Instant,
    /// Session-level SETs in flight, kept if their query completes cleanly.
    pending_sets: Option<Vec<sql::set::Change>>,
    pending_sets_failed: bool,
    /// The transaction the backend is in (or will be in once what was sent runs) has not had the
    /// context yet: a `COMMIT/ROLLBACK AND CHAIN` went out, or transaction setup (`BEGIN
    /// ISOLATION LEVEL …`, see `crate::sql::txmode`) went ahead of it. The next message that is
    /// not setup gets it. Only an injection clears it (a stale flag costs one redundant context).
    ctx_pending: bool,
    /// The client's `default_transaction_*` session defaults as SQL for a backend (empty: the
    /// role's own), applied before each transaction that needs them.
    tx_defaults: String,
    /// A client Execute went out in the open batch (DISCARD ALL only runs first in a batch).
    batch_executed: bool,
    /// Generation of `shared.signer` the injection was built with.
    signer_gen: u64,
    /// ParameterStatus reports owed with an extended-protocol DISCARD ALL's CommandComplete.
    discard_reports: Vec<(String, String)>,
    /// When the current transaction got its context (`pool.transaction_timeout_ms`).
    tx_since: Option<std::time::Instant>,
    /// Since when the client has sat idle inside an open transaction
    /// (`pool.idle_in_transaction_timeout_ms`).
    idle_since: Option<std::time::Instant>,
    /// The client's own Parses in flight, by server statement: a failed one is forgotten.
    client_parses: Vec<(u64, bytes::Bytes)>,
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
            _ => shared.pool.clone(),
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
            in_batch: false,
            reinject: false,
            batch_started_idle: false,
            skip_to_sync: false,
            hold_until_settled: false,
            held: None,
            refusals: Default::default(),
            view,
            settings,
            attached_at: std::time::Instant::now(),
            pending_sets: None,
            pending_sets_failed: false,
            ctx_pending: false,
            tx_defaults,
            batch_executed: false,
            signer_gen,
            discard_reports: Vec::new(),
            tx_since: None,
            idle_since: None,
            client_parses: Vec::new(),
        };
        if let Some(lease) = lease {
            // session mode: the backend leased at login (its cancel keys are registered already)
            session.adopt(lease);
        }
        session
    }

    /// Runs until the client leaves or the session fails; never leaves a dirty backend in the pool.
    pub async fn run(mut self) -> End {
        let end = match self.relay().await {
            Ok(()) => End::ClientGone,
            Err(e) => e,
        };
        match &end {
            End::Fatal(err) => {
                err.encode(&mut self.client_out);
                let _ = self.client_wr.write_all(&self.client_out).await;
            }
            End::BackendLost(why) => {
                tracing::warn!(reason = %why, "backend connection lost mid-session");
                PgError::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    "pgtenant: lost the connection to the database server; the current transaction was rolled back",
                )
                .encode(&mut self.client_out);
                let _ = self.client_wr.write_all(&self.client_out).await;
            }
            End::ClientGone => {
                let _ = self.client_wr.write_all(&self.client_out).await;
            }
        }
        let _ = self.client_wr.shutdown().await;
        self.cancel.slot.set(None).await;
        if self.lease.is_some() {
            if self.backend_clean() && !matches!(end, End::BackendLost(_)) {
                if self.shared.session_mode {
                    // a whole session ran here: reset everything before anyone else uses it
                    let b = &mut self.lease.as_mut().expect("checked").backend;
                    b.dirty = true;
                    b.full_reset = true;
                }
                self.release().await;
            } else {
                // in a transaction or mid-reply: closing makes the server roll back
                tracing::debug!("closing a backend that was not idle when its client left");
                self.lease = None;
            }
        }
        end
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
            if *self.draining.borrow() && between_transactions && !self.in_batch {
                return Err(End::Fatal(PgError::fatal(
                    sqlstate::ADMIN_SHUTDOWN,
                    "pgtenant: terminating connection because the proxy is shutting down",
                )));
            }
            match self.next_event().await {
                Event::ClientRead(Ok(0)) | Event::ClientRead(Err(_)) | Event::ClientWrote(Err(_)) => {
                    return Err(End::ClientGone)
                }
                Event::ClientRead(Ok(n)) => metrics::counter!(crate::admin::names::CLIENT_BYTES, "direction" => "in").increment(n as u64),
                Event::ClientWrote(Ok(n)) => {
                    metrics::counter!(crate::admin::names::CLIENT_BYTES, "direction" => "out").increment(n as u64);
                    self.client_out.advance(n)
                }
                Event::BackendRead(Ok(0)) => return Err(End::BackendLost("server closed the connection".into())),
                Event::BackendRead(Err(e)) | Event::BackendWrote(Err(e)) => {
                    return Err(End::BackendLost(e.to_string()))
                }
                Event::BackendRead(Ok(_)) => self.process_backend_frames()?,
                Event::BackendWrote(Ok(n)) => self.backend_out.advance(n),
                Event::Draining => {}
                Event::Timeout(err) => {
                    tracing::info!(code = err.code, message = %err.message, "ending session");
                    return Err(End::Fatal(err));
                }
            }
        }
    }

    async fn next_event(&mut self) -> Event {
        let holding = self.held.is_some() || (self.hold_until_settled && !self.copy_in_open());
        // while client input waits for the backend, keep reading (bounded) so that a client that
        // leaves is noticed at once: its backend must not stay pinned
        let read_client = if holding {
            self.client_in.len() < HIGH_WATER
        } else {
            self.backend_out.len() < HIGH_WATER && self.client_out.len() < HIGH_WATER
        };
        let timeout = self.next_timeout();
        let read_backend = self.client_out.len() < HIGH_WATER;
        // an idle client (no backend, nothing buffered) waits with a small read buffer
        self.client_in.reserve(if self.lease.is_some() || !self.client_in.is_empty() { READ_CHUNK } else { IDLE_READ_CHUNK });
        if self.lease.is_some() {
            self.backend_in.reserve(READ_CHUNK);
        }
        let (brd, bwr) = match &mut self.lease {
            Some(l) => (Some(&mut l.backend.rd), Some(&mut l.backend.wr)),
            None => (None, None),
        };
        let has_backend = brd.is_some();
        let draining = *self.draining.borrow();
        let (deadline, timeout_kind) = match timeout {
            Some((at, kind)) => (Some(at), Some(kind)),
            None => (None, None),
        };
        tokio::select! {
            biased;
            _ = self.draining.changed(), if !draining => Event::Draining,
            _ = sleep_until_opt(deadline), if deadline.is_some() => Event::Timeout(timeout_kind.expect("set with the deadline").error(&self.shared.pool_cfg)),
            r = self.client_wr.write(&self.client_out), if !self.client_out.is_empty() => Event::ClientWrote(r),
            r = write_opt(bwr, &self.backend_out), if has_backend && !self.backend_out.is_empty() => Event::BackendWrote(r),
            r = read_opt(brd, &mut self.backend_in), if has_backend && read_backend => Event::BackendRead(r),
            r = self.client_rd.read_buf(&mut self.client_in), if read_client => Event::ClientRead(r),
        }
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
        self.replies.is_settled()
            && self.replies.status == b'I'
            && !self.in_batch
            && self.backend_out.is_empty()
            && self.backend_in.is_empty()
    }

    async fn release(&mut self) {
        if let Some(mut lease) = self.lease.take() {
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
            metrics::counter!(crate::admin::names::TRANSACTIONS).increment(1);
            metrics::histogram!(crate::admin::names::TRANSACTION_SECONDS).record(self.attached_at.elapsed().as_secs_f64());
            self.cancel.slot.set(None).await;
            self.pool.release(lease);
        }
    }

    async fn attach(&mut self) -> Result<(), PgError> {
        let lease = self.pool.acquire(&self.who.tenant).await?;
        self.cancel.slot.set(Some((lease.backend.pid, lease.backend.secret_key))).await;
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
        if b.owner != self.id {
            if let Some(reset) = b.take_reset() {
                // pipelined in front of this session's first message: no extra round trip
                build::query(&mut self.backend_out, &reset);
                self.replies.expect(Want::Ready, true, true);
            }
        }
        b.owner = self.id;
        self.lease = Some(lease);
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
                            Ok(Some(f)) if matches!(f.tag, b'd' | b'c' | b'f' | b'H' | b'S') => {
                                self.on_client_frame(f).await?;
                                continue;
                            }
                            Ok(Some(f)) => self.held = Some(f), // anything else waits for the COPY to end
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
        if self.skip_to_sync {
            if f.tag == b'S' {
                self.skip_to_sync = false;
                let status = self.status_for_client();
                build::ready_for_query(&mut self.client_out, status);
            }
            return Ok(Flow::Continue);
        }
        match f.tag {
            b'X' => Ok(Flow::Terminate),
            b'S' => {
                if self.lease.is_none() {
                    // nothing in flight without a backend: answer directly
                    build::ready_for_query(&mut self.client_out, b'I');
                } else if self.replies.copy_in {
                    self.backend_out.extend_from_slice(&f.bytes); // ignored by the server in COPY
                } else {
                    self.forward(&f, false);
                    self.in_batch = false;
                    self.batch_executed = false;
                    self.reinject = false;
                    self.replies.batch_failed = false;
                    // SETs executed in this batch are kept once its ReadyForQuery shows a clean end
                    self.hold_until_settled |= self.pending_sets.is_some();
                }
                Ok(Flow::Continue)
            }
            // Flush and COPY data mean nothing without a backend (the server ignores stray copy data)
            b'H' | b'd' | b'c' | b'f' => {
                if self.lease.is_some() {
                    self.forward(&f, false);
                    if f.tag != b'd' && f.tag != b'H' {
                        self.replies.copy_ended();
                    }
                }
                Ok(Flow::Continue)
            }
            b'Q' | b'F' | b'P' | b'B' | b'D' | b'E' | b'C' => self.on_work(f).await,
            b'p' => Err(End::Fatal(PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "pgtenant: unexpected password message after authentication",
            ))),
            t => Err(End::Fatal(PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("pgtenant: invalid frontend message type {}", t as char),
            ))),
        }
    }

    /// A message that runs or prepares SQL: make sure a backend is attached and the transaction
    /// has the tenant context, then forward it (with statement names rewritten).
    async fn on_work(&mut self, f: Frame) -> Result<Flow, End> {
        let simple = matches!(f.tag, b'Q' | b'F');
        let malformed = || End::Fatal(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "pgtenant: malformed message"));
        if self.who.bypass {
            if let Err(e) = self.audit_bypass(&f) {
                return Ok(self.refuse(e, simple));
            }
        }
        // What the message would run first; None when unknown (conservative).
        let mut touches_prepared = false;
        let mut leaves_state = false;
        // the statement ends the transaction AND CHAIN
        let mut chain = false;
        // a FunctionCall of a function the operator allowed
        let mut function_call = false;
        // `DEALLOCATE name` of one of the client's statements (psycopg evicts its cache this way)
        let mut dealloc: Option<Arc<statements::StatementDef>> = None;
        // transaction setup only: the context waits for the next message (see `sql::txmode`)
        let mut setup = false;
        // setup that chooses modes, then other statements, in one query string
        let mut modes_then_work = false;
        // session-level SETs the message makes, noted once it is forwarded (not when held back:
        // an earlier reply must not settle them before they ran)
        let mut changes: Option<Vec<sql::set::Change>> = None;
        let effect: Option<TxEffect> = match f.tag {
            b'Q' => {
                let q = peek::query_msg(f.body()).ok_or_else(malformed)?;
                let s = sql::summarize(q);
                if s.ends_tx_midway {
                    if self.lease.is_some() && !self.replies.is_settled() {
                        return Ok(Flow::Hold(f));
                    }
                    return Ok(self.refuse(
                        PgError::error(
                            sqlstate::FEATURE_NOT_SUPPORTED,
                            "pgtenant: a query string cannot go on after COMMIT or ROLLBACK",
                        )
                        .with_hint("send the statements that follow the end of the transaction as a separate query"),
                        true,
                    ));
                }
                if let Err(e) = self.guard.check(q, self.position()) {
                    return Ok(self.refuse_statement(e, q, "guard", true));
                }
                if !self.shared.session_mode {
                    if let Err(e) = sql::pooling::check(q, self.position().in_block) {
                        return Ok(self.refuse_statement(e, q, "pooling", true));
                    }
                }
                if sql::is_discard_all(q) && !self.position().in_block {
                    self.discard_all(true);
                    return Ok(Flow::Continue);
                }
                dealloc = sql::deallocate_name(q).and_then(|n| self.statements.get(n.as_bytes()).cloned());
                touches_prepared = dealloc.is_none() && may_touch_prepared(q);
                if touches_prepared && sql::deallocates_all(q) {
                    self.statements.clear_statements();
                }
                leaves_state = !sql::stateless::is_stateless(q);
                chain = sql::chains(q);
                match sql::txmode::opening(q) {
                    sql::txmode::Opening::SetupOnly => setup = true,
                    sql::txmode::Opening::ModesThenWork => modes_then_work = true,
                    sql::txmode::Opening::Work => {}
                }
                if sql::has_session_set(q) && !self.position().in_block && !rolls_back(q) {
                    let sets = sql::set::session_changes(q);
                    if !sets.is_empty() {
                        if let Err(e) = self.check_settings_budget(&sets) {
                            return Ok(self.refuse(e, true));
                        }
                        changes = Some(sets);
                    }
                }
                Some(s.first)
            }
            b'P' => {
                let (name, q) = peek::parse_msg(f.body()).ok_or_else(malformed)?;
                if reserved_name(name) {
                    return Ok(self.refuse_statement(reserved_name_error(), q, "reserved_name", false));
                }
                if let Err(e) = self.guard.check(q, self.position()) {
                    return Ok(self.refuse_statement(e, q, "guard", false));
                }
                if !self.shared.session_mode {
                    if let Err(e) = sql::pooling::check(q, true) {
                        return Ok(self.refuse_statement(e, q, "pooling", false));
                    }
                }
                dealloc = sql::deallocate_name(q).and_then(|n| self.statements.get(n.as_bytes()).cloned());
                touches_prepared = dealloc.is_none() && may_touch_prepared(q);
                let key = f.bytes.slice(5 + name.len() + 1..);
                // the client's session-level SETs share the budget with its statements
                let budget = self.shared.max_state_bytes.saturating_sub(self.settings.bytes());
                match self.statements.parse(name, q, key, budget) {
                    Ok(def) => {
                        leaves_state = !def.stateless;
                        setup = def.setup;
                        Some(def.effect)
                    }
                    Err(full) => return Ok(self.refuse(self.state_limit_error(full), false)),
                }
            }
            b'B' => {
                let (portal, stmt) = peek::bind_msg(f.body()).ok_or_else(malformed)?;
                if reserved_name(portal) || reserved_name(stmt) {
                    return Ok(self.refuse(reserved_name_error(), false));
                }
                let effect = self.statements.bind(portal, stmt);
                // a statement parsed in an earlier transaction may run here on another backend
                let def = self.statements.portal(portal);
                leaves_state = def.is_none_or(|d| !d.stateless);
                setup = def.is_some_and(|d| d.setup);
                effect
            }
            b'E' => {
                let portal = peek::execute_msg(f.body()).ok_or_else(malformed)?;
                let def = self.statements.portal(portal).cloned();
                if let Some(sets) = def.as_ref().and_then(|d| d.sets.clone()) {
                    let batch_idle = if self.in_batch { self.batch_started_idle } else { !self.position().in_block };
                    if batch_idle {
                        changes = Some(sets.to_vec());
                    }
                }
                leaves_state = def.as_ref().is_none_or(|d| !d.stateless);
                chain = def.as_ref().is_some_and(|d| d.chain);
                setup = def.as_ref().is_some_and(|d| d.setup);
                if def.as_ref().is_some_and(|d| d.discard_all) && self.batch_started_idle && !self.batch_executed && self.lease.is_some() {
                    self.discard_all(false);
                    return Ok(Flow::Continue);
                }
                def.map(|d| d.effect)
            }
            b'C' | b'D' => {
                let (kind, name) = peek::target_msg(f.body()).ok_or_else(malformed)?;
                if reserved_name(name) {
                    return Ok(self.refuse(reserved_name_error(), false));
                }
                // a Close takes no snapshot, nor does a Describe of transaction setup: the
                // context can wait for the statement that needs it
                setup = f.tag == b'C' || self.statements.target(kind, name).is_some_and(|d| d.setup);
                if f.tag == b'C' {
                    self.statements.close(kind, name);
                    if kind == b'S' && !name.is_empty() {
                        // client statements live in pgtenant; the server copy stays cached
                        self.synthetic(b'3');
                        return Ok(Flow::Continue);
                    }
                }
                None // neither fails in an aborted transaction the way the context would
            }
            _ => {
                // FunctionCall: a function chosen by OID, with no SQL for the guard to read
                let oid = peek::function_call_oid(f.body()).ok_or_else(malformed)?;
                if !self.pool.allows_function_calls() {
                    return Ok(self.refuse(function_call_refused(oid), true));
                }
                if self.lease.is_none() {
                    if let Err(e) = self.attach().await {
                        return Ok(self.refuse(e, true));
                    }
                }
                if !self.lease.as_ref().is_some_and(|l| l.backend.allowed_calls.contains(&oid)) {
                    return Ok(self.refuse(function_call_refused(oid), true));
                }
                function_call = true;
                leaves_state = true;
                Some(TxEffect::None)
            }
        };

        if !self.in_batch && !simple {
            self.batch_started_idle = !self.position().in_block;
        }
        let mut injected = false;
        if (!self.in_batch || self.reinject || self.ctx_pending) && !self.replies.batch_failed {
            // a backend attached just now is idle once its reset (if any) has run
            let fresh = self.lease.is_none();
            if fresh {
                if let Err(e) = self.attach().await {
                    return Ok(self.refuse(e, simple));
                }
            }
            let known_idle = !self.in_batch && (fresh || (self.replies.is_settled() && self.replies.status == b'I'));
            let inject = if self.in_batch || known_idle {
                true // in a batch: after a COMMIT/ROLLBACK or transaction setup inside it
            } else if self.replies.is_settled() {
                self.ctx_pending && self.replies.status == b'T'
            } else if !simple
                && matches!(f.tag, b'P' | b'B' | b'E')
                && matches!(effect, Some(TxEffect::None) | Some(TxEffect::Begin))
                && self.lease.as_ref().is_some_and(|l| l.backend.tx_defaults == self.tx_defaults)
            {
                true // pipelined: speculative, see the module docs
            } else {
                return Ok(Flow::Hold(f));
            };
            if inject {
                if modes_then_work {
                    return Ok(self.refuse(modes_then_work_error(), simple));
                }
                if known_idle {
                    self.apply_tx_defaults();
                }
                if self.tx_since.is_none() || !self.position().in_block {
                    self.tx_since = Some(std::time::Instant::now());
                }
                if setup {
                    self.ctx_pending = true; // the context goes in front of the next message
                } else {
                    if let Some(signer) = self.shared.signer.changed(&mut self.signer_gen) {
                        self.settings.set_signer(signer); // reloaded: sign with the new key
                        self.injection = self.settings.injection();
                    }
                    let lease = self.lease.as_mut().expect("attached above");
                    self.injection.write(&mut self.backend_out, &mut lease.backend, &mut self.replies);
                    metrics::counter!(crate::admin::names::CONTEXT_INJECTIONS).increment(1);
                    injected = true;
                    self.ctx_pending = false;
                }
            }
            self.reinject = false;
        }
        self.idle_since = None;
        if let Some(changes) = changes {
            self.note_changes(&changes);
        }
        match dealloc {
            Some(def) => self.forward_deallocate(&f, &def, simple),
            None => self.forward_rewritten(&f, simple),
        }
        if leaves_state {
            if let Some(l) = self.lease.as_mut() {
                l.backend.dirty = true;
            }
        }
        if function_call {
            if let Some(l) = self.lease.as_mut() {
                l.backend.full_reset = true;
            }
        }
        if touches_prepared {
            if let Some(l) = self.lease.as_mut() {
                // SQL-level PREPAREs stay on the backend: deallocate before another session
                l.backend.dirty = true;
                l.backend.full_reset = true;
                // DEALLOCATE / DISCARD may drop server statements: prepare ours afresh next time
                l.backend.ctx_prepared = 0;
                l.backend.statements.clear();
            }
        }
        if chain {
            self.ctx_pending = true;
        }
        if f.tag == b'E' {
            self.batch_executed = true;
        }
        if simple {
            // A Query or FunctionCall inside an unsynced extended batch does not end it for sure:
            // if the batch failed, the server skips it and goes on skipping up to the client's own
            // Sync. The backend stays with this client until that Sync has completed. If it did
            // not fail, the Query committed the batch's transaction: what follows needs the
            // context again.
            if self.in_batch {
                self.reinject = true;
            }
            self.hold_until_settled = injected || self.pending_sets.is_some();
        } else {
            self.in_batch = true;
            if f.tag == b'E' && effect == Some(TxEffect::End) {
                self.reinject = true;
            }
        }
        Ok(Flow::Continue)
    }

    /// Forwards a message, mapping client statement names to server statements on this backend
    /// (preparing them there first when needed).
    fn forward_rewritten(&mut self, f: &Frame, simple: bool) {
        let body = f.body();
        let named = match f.tag {
            b'P' => peek::parse_msg(body).map(|(n, _)| n).filter(|n| !n.is_empty()),
            b'B' => peek::bind_msg(body).map(|(_, s)| s).filter(|s| !s.is_empty()),
            b'D' => peek::target_msg(body).filter(|(k, n)| *k == b'S' && !n.is_empty()).map(|(_, n)| n),
            _ => None,
        };
        let (Some(name), Some(lease)) = (named, self.lease.as_mut()) else {
            return self.forward(f, simple);
        };
        let Some(def) = self.statements.get(name).cloned() else {
            return self.forward(f, simple); // unknown statement: the server answers 26000
        };
        if self.replies.batch_failed {
            return; // the server skips everything up to Sync
        }
        let p = lease.backend.statements.prepare(&def.key);
        for evict in &p.evict {
            prepared::target_frame(&mut self.backend_out, b'C', evict);
            self.replies.expect(Want::CloseComplete, true, false);
        }
        let out = &mut self.backend_out;
        match f.tag {
            b'P' => {
                if p.needs_parse {
                    prepared::parse_frame(out, &p.name, &def.key);
                    self.replies.expect_parse(false, p.id);
                    self.client_parses.push((p.id, bytes::Bytes::copy_from_slice(name)));
                } else {
                    self.synthetic(b'1');
                }
                return;
            }
            _ if p.needs_parse => {
                prepared::parse_frame(out, &p.name, &def.key);
                self.replies.expect_parse(true, p.id);
            }
            _ => {}
        }
        if f.tag == b'B' {
            let (portal, stmt) = peek::bind_msg(body).expect("checked above");
            prepared::rewrite_bind(&mut self.backend_out, body, portal.len(), stmt.len(), &p.name);
            self.replies.expect(Want::BindComplete, false, false);
        } else {
            prepared::target_frame(&mut self.backend_out, b'D', &p.name);
            self.replies.expect(Want::Description, false, false);
        }
    }

    /// Sends a client's `DEALLOCATE name` as `DEALLOCATE <server statement>` (preparing it on this
    /// backend first if needed), so the client gets the server's own reply; the statement leaves the
    /// client's list and this backend's cache.
    fn forward_deallocate(&mut self, f: &Frame, def: &statements::StatementDef, simple: bool) {
        let Some(lease) = self.lease.as_mut() else { return self.forward(f, simple) };
        if self.replies.batch_failed {
            return;
        }
        if let Some(name) = sql::deallocate_name(peek_sql(f)) {
            self.statements.close(b'S', name.as_bytes());
        }
        let p = lease.backend.statements.prepare(&def.key);
        for evict in &p.evict {
            prepared::target_frame(&mut self.backend_out, b'C', evict);
            self.replies.expect(Want::CloseComplete, true, false);
        }
        if p.needs_parse {
            prepared::parse_frame(&mut self.backend_out, &p.name, &def.key);
            self.replies.expect_parse(true, p.id);
        }
        lease.backend.statements.forget(p.id);
        let sql = format!("DEALLOCATE {}", p.name);
        if simple {
            build::query(&mut self.backend_out, &sql);
        } else {
            let name = peek::parse_msg(f.body()).map(|(n, _)| String::from_utf8_lossy(n).into_owned()).unwrap_or_default();
            build::parse(&mut self.backend_out, &name, &sql, vec![]);
        }
        self.replies.expect(Want::for_frontend(f.tag).expect("Q or P"), false, simple);
    }

    /// The error for a Parse that would take the client past its statement limits.
    fn state_limit_error(&self, full: statements::Full) -> PgError {
        match full {
            statements::Full::Count => PgError::error(
                sqlstate::PROGRAM_LIMIT_EXCEEDED,
                format!("pgtenant: too many prepared statements (limit {})", statements::MAX_STATEMENTS),
            )
            .with_hint("close statements you no longer use"),
            statements::Full::Bytes => self.budget_error("prepared statements"),
        }
    }

    fn budget_error(&self, what: &str) -> PgError {
        PgError::error(
            sqlstate::PROGRAM_LIMIT_EXCEEDED,
            format!(
                "pgtenant: this session's {what} would take more than {} bytes (server.max_session_state_bytes)",
                self.shared.max_state_bytes
            ),
        )
        .with_hint("close prepared statements you no longer use, or raise server.max_session_state_bytes in the pgtenant config")
    }

    /// Session-level SETs are kept per client: they count against the same budget.
    fn check_settings_budget(&self, changes: &[sql::set::Change]) -> Result<(), PgError> {
        let adding: usize = changes
            .iter()
            .map(|c| match c {
                sql::set::Change::Set(n, v) => n.len() + v.len(),
                _ => 0,
            })
            .sum();
        if self.settings.bytes() + self.statements.bytes() + adding > self.shared.max_state_bytes {
            return Err(self.budget_error("settings and prepared statements"));
        }
        Ok(())
    }

    /// A reply pgtenant gives itself, in order with the backend's replies.
    fn synthetic(&mut self, tag: u8) {
        if self.lease.is_none() {
            debug_assert_ne!(tag, SYNTHETIC_DISCARD_ALL);
            push_empty_message(&mut self.client_out, tag); // nothing in flight: answer now
        } else if !self.replies.batch_failed {
            self.replies.expect_synthetic(tag);
            self.drain_synthetic();
        }
    }

    fn drain_synthetic(&mut self) {
        while let Some(tag) = self.replies.take_synthetic() {
            if tag == SYNTHETIC_DISCARD_ALL {
                push_discard_all(&mut self.client_out);
                for (name, value) in std::mem::take(&mut self.discard_reports) {
                    build::parameter_status(&mut self.client_out, &name, &value);
                }
            } else {
                push_empty_message(&mut self.client_out, tag);
            }
        }
    }

    fn forward(&mut self, f: &Frame, simple: bool) {
        self.backend_out.extend_from_slice(&f.bytes);
        if let Some(want) = Want::for_frontend(f.tag) {
            // while the server skips to Sync, only the Sync itself is answered
            if !self.replies.batch_failed || f.tag == b'S' {
                self.replies.expect(want, false, simple);
            }
        }
    }

    /// Answers a refused message the way the server answers a failed one. With no backend attached
    /// pgtenant answers itself; otherwise it sends a stand-in that fails on the server (so an open
    /// transaction aborts and the rest of the batch is skipped exactly as for a real error) and
    /// replaces the server's error with the refusal.
    fn refuse(&mut self, err: PgError, simple: bool) -> Flow {
        tracing::info!(code = err.code, message = %err.message, "refused client message");
        metrics::counter!(crate::admin::names::REFUSALS, "sqlstate" => err.code).increment(1);
        if self.lease.is_none() {
            err.encode(&mut self.client_out);
            if simple {
                build::ready_for_query(&mut self.client_out, b'I');
            } else {
                self.skip_to_sync = true;
            }
            return Flow::Continue;
        }
        if self.replies.batch_failed && !simple {
            return Flow::Continue; // the server skips this batch anyway
        }
        if simple {
            build::query(&mut self.backend_out, REFUSAL_STAND_IN);
            if self.in_batch {
                // like the refused Query or FunctionCall, the stand-in ends the batch's
                // transaction if the batch has not failed: what follows needs the context again
                self.reinject = true;
            }
        } else {
            build::parse(&mut self.backend_out, "pgtenant_refused", REFUSAL_STAND_IN, vec![]);
            self.in_batch = true;
        }
        self.replies.expect_refusal(simple);
        self.refusals.push_back(err);
        Flow::Continue
    }

    /// `DISCARD ALL` outside a transaction: pgtenant's pools and drivers send it to reset a
    /// session. The client becomes a fresh virtual session: its statements and settings are
    /// forgotten and any backend it left state on is reset before anyone (itself included) uses it
    /// again. The server cannot run it itself (pgtenant's context makes every transaction a
    /// pipeline), so pgtenant answers: at once for a simple Query (nothing is in flight), in order
    /// with the batch's other replies for an Execute (the first of a batch that began outside a
    /// transaction, as the server requires).
    fn discard_all(&mut self, simple: bool) {
        self.statements.clear_statements();
        self.statements.transaction_ended();
        self.settings.apply(&[sql::set::Change::ResetAll]);
        self.injection = self.settings.injection();
        self.tx_defaults = self.settings.tx_defaults();
        self.view.applied = self.settings.applied();
        let owed = self.view.after_changes(&[sql::set::Change::ResetAll], None);
        self.id = NEXT_SESSION_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(l) = self.lease.as_mut() {
            // still attached (session mode, or not yet released): reset it now, pipelined
            l.backend.dirty = true;
            l.backend.full_reset = true;
            if let Some(reset) = l.backend.take_reset() {
                build::query(&mut self.backend_out, &reset);
                self.replies.expect(Want::Ready, true, true);
            }
            l.backend.owner = self.id;
            l.backend.tx_defaults.clear();
        }
        if !simple {
            // the Query above ended the batch's transaction: what follows needs the context again
            self.reinject = true;
            self.discard_reports = owed; // sent with its CommandComplete
            self.synthetic(SYNTHETIC_DISCARD_ALL);
            return;
        }
        push_discard_all(&mut self.client_out);
        // only called outside a transaction with nothing in flight, so the answer goes out now
        for (name, value) in owed {
            build::parameter_status(&mut self.client_out, &name, &value);
        }
        build::ready_for_query(&mut self.client_out, b'I');
    }

    /// Gives the backend the client's `default_transaction_*` defaults before a transaction starts
    /// (pipelined, its own statement: a setting made inside the transaction would come too late).
    /// `backend.tx_defaults` is what pgtenant last gave the connection; a client that changes them
    /// some other way (`set_config(…, false)`, a function) changes its own backend's session state,
    /// as on a direct connection, and the reset before another client clears it.
    fn apply_tx_defaults(&mut self) {
        let Some(l) = self.lease.as_mut() else { return };
        if l.backend.tx_defaults == self.tx_defaults {
            return;
        }
        let sql = if self.tx_defaults.is_empty() { sql::txmode::RESET_DEFAULTS } else { &self.tx_defaults };
        build::query(&mut self.backend_out, sql);
        self.replies.expect(Want::Ready, true, true);
        l.backend.tx_defaults = self.tx_defaults.clone();
    }

    /// What the guard needs to know about where a statement runs.
    fn position(&self) -> Position {
        let idle = self.lease.is_none() || (self.replies.is_settled() && self.replies.status == b'I' && !self.in_batch);
        Position { in_block: !idle }
    }

    fn status_for_client(&self) -> u8 {
        if self.lease.is_some() { self.replies.status } else { b'I' }
    }

    // ---- backend → client -------------------------------------------------------------------

    fn process_backend_frames(&mut self) -> Result<(), End> {
        loop {
            let f = match try_split(&mut self.backend_in, MAX_BACKEND_MESSAGE) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => return Err(End::BackendLost(format!("bad message from server: {e}"))),
            };
            if f.tag == b'S' {
                if let Some(l) = self.lease.as_mut() {
                    l.backend.note_report(f.body());
                }
                if !self.view.admit(f.body()) {
                    continue; // a backend-side value the client does not have
                }
            }
            // where this message's output starts: reports owed for its ReadyForQuery go first
            let mark = self.client_out.len();
            match self.replies.on_reply(f.tag, f.body()) {
                Action::Forward => self.relay_to_client(&f),
                Action::Swallow => {}
                Action::ReplaceError => match self.refusals.pop_front() {
                    Some(err) => err.encode(&mut self.client_out),
                    None => self.relay_to_client(&f),
                },
                Action::ForwardThenSync => {
                    self.relay_to_client(&f);
                    build::sync(&mut self.backend_out);
                }
                Action::Desync => {
                    tracing::error!(tag = %(f.tag as char), "unexpected message from the server; closing the backend");
                    return Err(End::BackendLost(format!("unexpected '{}' message from server", f.tag as char)));
                }
            }
            self.drain_synthetic();
            if !self.replies.failed_prepares.is_empty() {
                if let Some(l) = self.lease.as_mut() {
                    for (id, by_client) in self.replies.failed_prepares.drain(..) {
                        let key = l.backend.statements.forget(id);
                        // the client's own Parse failed: like the server, keep no statement
                        let name = self.client_parses.iter().find(|(i, _)| *i == id).map(|(_, n)| n);
                        if let (true, Some(key), Some(name)) = (by_client, key, name) {
                            self.statements.parse_failed(name, &key);
                        }
                    }
                }
            }
            if self.replies.is_settled() {
                self.client_parses.clear();
            }
            if f.tag == b'E' && self.pending_sets.is_some() {
                self.pending_sets_failed = true;
            }
            if f.tag == b'Z' && self.replies.is_settled() {
                // Everything sent has been answered and the last answer is a ReadyForQuery: the
                // server is not skipping to a Sync (a Query or FunctionCall inside an unsynced
                // batch was answered, so that batch did not fail).
                self.in_batch = false;
                self.batch_executed = false;
                self.reinject = false;
                self.replies.batch_failed = false;
                self.settle_pending_sets(mark);
                if self.replies.status == b'I' {
                    self.statements.transaction_ended();
                    self.tx_since = None;
                    self.idle_since = None;
                }
            }
            // the client has its answers but the backend is not free (an open transaction, or an
            // unsynced batch): it is idle in a transaction from now on
            if self.replies.is_settled() && self.held.is_none() && self.idle_since.is_none() && self.lease.is_some() && !self.backend_clean() {
                self.idle_since = Some(std::time::Instant::now());
            }
        }
    }

    /// Records session-level SETs on their way to the server (kept if they complete cleanly).
    fn note_changes(&mut self, changes: &[sql::set::Change]) {
        if self.pending_sets.is_none() {
            self.pending_sets_failed = false;
        }
        for c in changes {
            if let sql::set::Change::Set(n, _) | sql::set::Change::Reset(n) = c {
                self.view.changing.insert(n.to_lowercase());
            }
        }
        self.pending_sets.get_or_insert_with(Vec::new).extend(changes.iter().cloned());
    }

    /// Keeps the client's session-level SETs once their query ended cleanly outside a transaction,
    /// and tells the client the parameters' new values in front of the output from `at` on (the
    /// ReadyForQuery), where the server puts its own reports.
    fn settle_pending_sets(&mut self, at: usize) {
        self.view.changing.clear();
        if let Some(changes) = self.pending_sets.take() {
            if !self.pending_sets_failed && self.replies.status == b'I' {
                let changes = view::as_reported(changes, self.lease.as_ref().map(|l| &l.backend));
                self.settings.apply(&changes);
                self.injection = self.settings.injection();
                self.tx_defaults = self.settings.tx_defaults();
                self.view.applied = self.settings.applied();
                let owed = self.view.after_changes(&changes, self.lease.as_ref().map(|l| &l.backend));
                if !owed.is_empty() {
                    let tail = self.client_out.split_off(at);
                    for (name, value) in owed {
                        build::parameter_status(&mut self.client_out, &name, &value);
                    }
                    self.client_out.extend_from_slice(&tail);
                }
            }
        }
    }

    fn relay_to_client(&mut self, f: &Frame) {
        if f.tag == b'E' && peek::error_code(f.body()) == Some(sqlstate::ACTIVE_SQL_TRANSACTION.as_bytes()) {
            if let Some(annotated) = annotate_in_transaction_error(f) {
                self.client_out.extend_from_slice(&annotated);
                return;
            }
        }
        self.client_out.extend_from_slice(&f.bytes);
    }
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

/// A FunctionCall of a function `tenant.allowed_function_calls` does not list.
fn function_call_refused(oid: u32) -> PgError {
    PgError::error(
        sqlstate::INSUFFICIENT_PRIVILEGE,
        format!("pgtenant: FunctionCall messages are not allowed for function OID {oid}: it is not listed in tenant.allowed_function_calls"),
    )
    .with_hint("call the function from SQL (SELECT fn(...)), or ask the operator to list it in tenant.allowed_function_calls")
}

fn frame_error(e: FrameError) -> PgError {
    match e {
        FrameError::TooLarge { .. } => PgError::fatal(sqlstate::PROGRAM_LIMIT_EXCEEDED, format!("pgtenant: {e}"))
            .with_hint("raise server.max_message_bytes if this is legitimate"),
        FrameError::BadLength(_) => PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("pgtenant: {e}")),
    }
}

/// Fails on the server with a syntax error, which pgtenant replaces with its refusal.
const REFUSAL_STAND_IN: &str = "pgtenant refused this statement";

/// The SQL text of a Query or Parse frame.
fn peek_sql(f: &Frame) -> &[u8] {
    match f.tag {
        b'Q' => peek::query_msg(f.body()).unwrap_or_default(),
        _ => peek::parse_msg(f.body()).map(|(_, q)| q).unwrap_or_default(),
    }
}

/// The synthetic reply that stands for `CommandComplete "DISCARD ALL"` (see `discard_all`).
const SYNTHETIC_DISCARD_ALL: u8 = b'C';

fn push_discard_all(out: &mut BytesMut) {
    let _ = pgwire::messages::Message::encode(
        &pgwire::messages::response::CommandComplete::new("DISCARD ALL".to_string()),
        out,
    );
}

/// BEGIN / SET TRANSACTION choosing modes, followed by other statements in one query string.
fn modes_then_work_error() -> PgError {
    PgError::error(
        sqlstate::FEATURE_NOT_SUPPORTED,
        "pgtenant: a transaction's isolation level, read-only or deferrable mode must be set in a query of its own, not followed by other statements in the same query string",
    )
    .with_hint("send BEGIN ISOLATION LEVEL … (or SET TRANSACTION …) as one query and the rest of the transaction after it: pgtenant puts the tenant context between them")
}

/// A message with an empty body (ParseComplete, CloseComplete, ...).
fn push_empty_message(out: &mut BytesMut, tag: u8) {
    out.extend_from_slice(&[tag, 0, 0, 0, 4]);
}

/// Statement and portal names starting with `pgtenant` belong to pgtenant.
fn reserved_name(name: &[u8]) -> bool {
    name.len() >= 8 && name[..8].eq_ignore_ascii_case(b"pgtenant")
}

fn reserved_name_error() -> PgError {
    PgError::error(
        sqlstate::INSUFFICIENT_PRIVILEGE,
        "pgtenant: prepared statement and portal names starting with \"pgtenant\" are reserved",
    )
}

/// SQL that could drop or replace prepared statements (DEALLOCATE, DISCARD, PREPARE): pgtenant then
/// prepares its context statement afresh before using it again.
fn may_touch_prepared(q: &[u8]) -> bool {
    const WORDS: [&[u8]; 3] = [b"deallocate", b"discard", b"prepare"];
    q.windows(7).any(|w| {
        WORDS.iter().any(|word| w.eq_ignore_ascii_case(&word[..7]))
    })
}

/// The text has a ROLLBACK / ABORT: session SETs in it may be undone.
fn rolls_back(q: &[u8]) -> bool {
    [&b"rollback"[..], b"abort"].iter().any(|w| q.windows(w.len()).any(|x| x.eq_ignore_ascii_case(w)))
}

/// Adds a hint to "cannot run inside a transaction block" errors: pgtenant runs every statement
/// inside a transaction so that it carries the tenant context.
fn annotate_in_transaction_error(f: &Frame) -> Option<BytesMut> {
    use pgwire::messages::response::ErrorResponse;
    use pgwire::messages::{DecodeContext, Message};
    let mut raw = BytesMut::from(&f.bytes[..]);
    let mut err = ErrorResponse::decode(&mut raw, &DecodeContext::default()).ok()??;
    if err.fields.iter().any(|(k, _)| *k == b'H') {
        return None;
    }
    err.fields.push((
        b'H',
        "pgtenant runs every statement inside a transaction that carries the tenant context; \
         run this statement directly against the database as its owner"
            .to_string(),
    ));
    let mut out = BytesMut::new();
    err.encode(&mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_names_and_prepare_words() {
        assert!(reserved_name(b"pgtenant_ctx"));
        assert!(reserved_name(b"PGTENANTx"));
        assert!(!reserved_name(b"s1"));
        assert!(may_touch_prepared(b"DEALLOCATE ALL"));
        assert!(may_touch_prepared(b"discard all"));
        assert!(may_touch_prepared(b"PREPARE x AS select 1"));
        assert!(!may_touch_prepared(b"select 1"));
    }
}
