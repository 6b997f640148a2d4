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
pub mod inject;
pub mod replies;
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
use crate::pool::{prepared, Lease, Pool};
use crate::protocol::frame::{try_split, Frame, FrameError};
use crate::protocol::tags::{self, frontend as msg};
use crate::protocol::{build, peek};
use crate::sql::{self, TxEffect};
use classify::{Budget, Classifier, Refusal, Step};
use context::{Batch, Decision};
use inject::Injection;
use settings::ClientSettings;
use replies::{Action, Replies, Want};
use statements::Statements;

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
    /// Where the client is in the batch cycle (see `context`).
    batch: Batch,
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
    /// context yet: a `COMMIT`/`ROLLBACK` inside the batch or `… AND CHAIN` went out, or
    /// transaction setup (`BEGIN ISOLATION LEVEL …`, see `crate::sql::txmode`) went ahead of it.
    /// The next message that is not setup gets it. Only an injection clears it (a stale flag costs
    /// one redundant context).
    needs_context: bool,
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
            batch: Batch::Closed,
            hold_until_settled: false,
            held: None,
            refusals: Default::default(),
            view,
            settings,
            attached_at: std::time::Instant::now(),
            pending_sets: None,
            pending_sets_failed: false,
            needs_context: false,
            tx_defaults,
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
                    self.lease.as_mut().expect("checked").backend.end_session();
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
        self.backend_idle() && self.backend_out.is_empty() && self.backend_in.is_empty()
    }

    /// Between transactions on the backend: every reply in, status idle, no batch open. The one
    /// definition of "idle" (the guard's position and the pool hand-back both use it).
    fn backend_idle(&self) -> bool {
        self.replies.is_settled() && self.replies.status == b'I' && !self.batch.is_open()
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
        if let Some(reset) = b.reset_for(self.id) {
            // pipelined in front of this session's first message: no extra round trip
            build::query(&mut self.backend_out, &reset);
            self.replies.expect(Want::Ready, true, true);
        }
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
        if self.batch == Batch::Skipping {
            if f.tag == msg::SYNC {
                self.batch = Batch::Closed;
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
                    self.batch = Batch::Closed;
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

    /// A message that runs or prepares SQL: classify it (`classify`), make sure a backend is
    /// attached and the transaction has the tenant context (`context`), then forward it (with
    /// statement names rewritten) and note what it may leave on the connection.
    async fn on_work(&mut self, f: Frame) -> Result<Flow, End> {
        let simple = matches!(f.tag, msg::QUERY | msg::FUNCTION_CALL);
        if self.who.bypass {
            if let Err(e) = self.audit_bypass(&f) {
                return Ok(self.refuse(e, simple));
            }
        }
        let pos = self.position();
        let step = Classifier {
            guard: &self.guard,
            statements: &mut self.statements,
            pos,
            pooling: !self.shared.session_mode,
            batch: self.batch,
            unsettled: self.lease.is_some() && !self.replies.is_settled(),
            budget: Budget { max: self.shared.max_state_bytes, settings: self.settings.bytes() },
            function_calls: self.pool.allows_function_calls(),
        }
        .classify(&f)?;
        let plan = match step {
            Step::Run(plan) => plan,
            Step::Hold => return Ok(Flow::Hold(f)),
            Step::Refuse(r) => return Ok(self.refuse_with(r, simple)),
            Step::DiscardAll => {
                self.discard_all(simple);
                return Ok(Flow::Continue);
            }
            Step::ClosedLocally => {
                self.synthetic(tags::backend::CLOSE_COMPLETE);
                return Ok(Flow::Continue);
            }
        };
        let fresh = self.lease.is_none();
        if fresh {
            if let Err(e) = self.attach().await {
                return Ok(self.refuse(e, simple));
            }
        }
        if let Some(oid) = plan.function_oid {
            // only functions the operator allowed, as resolved on this backend's database
            if !self.lease.as_ref().is_some_and(|l| l.backend.allowed_calls.contains(&oid)) {
                return Ok(self.refuse(classify::function_call_refused(oid), true));
            }
        }
        let began_idle = match self.batch {
            Batch::Open { began_idle, .. } => began_idle,
            _ => !self.position().in_block,
        };
        let decision = context::decide(context::Inputs {
            batch: self.batch,
            needs_context: self.needs_context,
            batch_failed: self.replies.batch_failed,
            fresh,
            settled: self.replies.is_settled(),
            status: self.replies.status,
            simple,
            ordinary: context::ordinary(f.tag, plan.effect),
            defaults_in_place: self.lease.as_ref().is_some_and(|l| l.backend.has_tx_defaults(&self.tx_defaults)),
            setup: plan.setup,
        });
        let mut injected = false;
        match decision {
            Decision::Nothing => {}
            Decision::Hold => return Ok(Flow::Hold(f)),
            Decision::Inject { start } | Decision::Defer { start } => {
                if plan.modes_then_work {
                    return Ok(self.refuse(modes_then_work_error(), simple));
                }
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
        if let Some(changes) = plan.changes {
            self.note_changes(&changes);
        }
        match plan.dealloc {
            Some(def) => self.forward_deallocate(&f, &def, simple),
            None => self.forward_rewritten(&f, simple),
        }
        if let Some(l) = self.lease.as_mut() {
            l.backend.note(plan.conn);
        }
        if plan.chain {
            self.needs_context = true;
        }
        if simple {
            // A Query or FunctionCall inside an unsynced extended batch does not end it for sure:
            // if the batch failed, the server skips it and goes on skipping up to the client's own
            // Sync. The backend stays with this client until that Sync has completed. If it did
            // not fail, the Query committed the batch's transaction: what follows needs the
            // context again.
            if self.batch.is_open() {
                self.needs_context = true;
            }
            self.hold_until_settled = injected || self.pending_sets.is_some();
        } else {
            let executed = matches!(self.batch, Batch::Open { executed: true, .. }) || f.tag == msg::EXECUTE;
            self.batch = Batch::Open { began_idle, executed };
            if f.tag == msg::EXECUTE && plan.effect == Some(TxEffect::End) {
                self.needs_context = true;
            }
        }
        Ok(Flow::Continue)
    }

    /// Writes the context statement in front of what follows (signed with the key in force).
    fn inject(&mut self) {
        if let Some(signer) = self.shared.signer.changed(&mut self.signer_gen) {
            self.settings.set_signer(signer); // reloaded: sign with the new key
            self.injection = self.settings.injection();
        }
        let lease = self.lease.as_mut().expect("attached before the context");
        self.injection.write(&mut self.backend_out, &mut lease.backend, &mut self.replies);
        metrics::counter!(crate::admin::names::CONTEXT_INJECTIONS).increment(1);
        self.needs_context = false;
    }

    /// Forwards a message, mapping client statement names to server statements on this backend
    /// (preparing them there first when needed).
    fn forward_rewritten(&mut self, f: &Frame, simple: bool) {
        let body = f.body();
        let named = match f.tag {
            b'P' => peek::parse_msg(body).map(|(n, _)| n),
            b'B' => peek::bind_msg(body).map(|(_, s)| s),
            b'D' => peek::target_msg(body).filter(|(k, _)| *k == b'S').map(|(_, n)| n),
            _ => None,
        }
        // the unnamed statement goes as it is, unless it has set_config parameters (see `bind`)
        .filter(|n| !n.is_empty() || self.statements.unnamed_has_bind_checks());
        let (Some(name), Some(lease)) = (named, self.lease.as_mut()) else {
            return self.forward(f, simple);
        };
        let Some(def) = self.statements.statement(name).cloned() else {
            return self.forward(f, simple); // unknown statement: the server answers 26000
        };
        if self.replies.batch_failed {
            return; // the server skips everything up to Sync
        }
        let p = lease.backend.statements().prepare(&def.key);
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
        let p = lease.backend.statements().prepare(&def.key);
        for evict in &p.evict {
            prepared::target_frame(&mut self.backend_out, b'C', evict);
            self.replies.expect(Want::CloseComplete, true, false);
        }
        if p.needs_parse {
            prepared::parse_frame(&mut self.backend_out, &p.name, &def.key);
            self.replies.expect_parse(true, p.id);
        }
        lease.backend.statements().forget(p.id);
        let sql = format!("DEALLOCATE {}", p.name);
        if simple {
            build::query(&mut self.backend_out, &sql);
        } else {
            let name = peek::parse_msg(f.body()).map(|(n, _)| String::from_utf8_lossy(n).into_owned()).unwrap_or_default();
            build::parse(&mut self.backend_out, &name, &sql, vec![]);
        }
        self.replies.expect(Want::for_frontend(f.tag).expect("Q or P"), false, simple);
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

    /// A refusal `classify` decided, recorded in the audit log when it names a rule.
    fn refuse_with(&mut self, r: Refusal, simple: bool) -> Flow {
        match r.audit {
            Some((rule, sql)) => self.refuse_statement(r.err, &sql, rule, simple),
            None => self.refuse(r.err, simple),
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
                self.batch = Batch::Skipping;
            }
            return Flow::Continue;
        }
        if self.replies.batch_failed && !simple {
            return Flow::Continue; // the server skips this batch anyway
        }
        if simple {
            build::query(&mut self.backend_out, REFUSAL_STAND_IN);
            if self.batch.is_open() {
                // like the refused Query or FunctionCall, the stand-in ends the batch's
                // transaction if the batch has not failed: what follows needs the context again
                self.needs_context = true;
            }
        } else {
            build::parse(&mut self.backend_out, "pgtenant_refused", REFUSAL_STAND_IN, vec![]);
            if !self.batch.is_open() {
                self.batch = Batch::Open { began_idle: !self.position().in_block, executed: false };
            }
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
            if let Some(reset) = l.backend.reset_all_for(self.id) {
                build::query(&mut self.backend_out, &reset);
                self.replies.expect(Want::Ready, true, true);
            }
        }
        if !simple {
            // the Query above ended the batch's transaction: what follows needs the context again
            self.needs_context = true;
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
        if l.backend.has_tx_defaults(&self.tx_defaults) {
            return;
        }
        let sql = if self.tx_defaults.is_empty() { sql::txmode::RESET_DEFAULTS } else { &self.tx_defaults };
        build::query(&mut self.backend_out, sql);
        self.replies.expect(Want::Ready, true, true);
        l.backend.set_tx_defaults(&self.tx_defaults);
    }

    /// What the guard needs to know about where a statement runs.
    fn position(&self) -> Position {
        Position { in_block: self.lease.is_some() && !self.backend_idle() }
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
                        if let Some(arity) = inject::context_arity(id) {
                            // skipped in a batch that had already failed: prepare it again next time
                            l.backend.forget_context(arity);
                            continue;
                        }
                        let key = l.backend.statements().forget(id);
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
                self.batch = Batch::Closed;
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
