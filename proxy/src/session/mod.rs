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
//!
//! The files, in the order a client message travels: `io` (the event loop: sockets, timers,
//! kill and drain), this file (frames split off the client's stream; `on_work` for each message
//! that runs SQL), `classify` (what the message is and whether it may run: a `Step`), `route` and
//! `lease` (which backend, leased for the transaction, and the hygiene it owes: `Debts`),
//! `context` (whether the context statement goes in front: `decide`) and `inject` (writing it),
//! `forward` (the message on its way, statement names rewritten: `statements`, `waits`,
//! `describe`), then
//! `from_backend` and `replies` (every reply either relayed or swallowed), `pending` and
//! `settings` (session SETs kept once their transaction commits), `view` and `audit`.

mod audit;
mod classify;
mod context;
mod describe;
mod forward;
mod from_backend;
mod io;
mod lease;
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

use bytes::BytesMut;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};

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
use io::{interruption, Interruption};
use lease::Debts;
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
    /// Whether the client's input waits for the backend's replies.
    pause: Pause,
    /// Descriptions of the client's statements being learnt, and those pgtenant answers itself.
    descriptions: describe::Descriptions,
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
    /// What the attached backend owes before the client's next message runs on it.
    debts: Debts,
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
    /// Portals bound to a `DEALLOCATE`, with their Bind's reply number: pgtenant's table of portals
    /// is cleared only once everything sent is answered, so an Execute of one checks here that no
    /// end of its transaction came back since (`Replies::idle_since`). Rare; cleared with the
    /// table.
    dealloc_portals: Vec<(bytes::Bytes, u32)>,
    /// What the client's messages sent since the transaction status was last exact may have done
    /// to a block (see `block`).
    since_exact: SinceExact,
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
            pause: Pause::No,
            descriptions: Default::default(),
            view,
            settings,
            attached_at: std::time::Instant::now(),
            pending: pending::PendingSets::default(),
            needs_context: false,
            debts: Debts::default(),
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
            dealloc_portals: Vec::new(),
            since_exact: SinceExact::default(),
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
        let framed = self.output_framed();
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



    // ---- client → backend -------------------------------------------------------------------

    async fn process_client_frames(&mut self) -> Result<Flow, End> {
        let mut processed = false;
        loop {
            if self.backend_out.len() >= HIGH_WATER {
                return Ok(Flow::Continue);
            }
            if self.pause.is_paused() {
                if !self.replies.is_settled() {
                    if self.copy_in_open() {
                        // a held-back query started COPY FROM STDIN: its data must flow meanwhile
                        match try_split(&mut self.client_in, self.shared.max_message_bytes) {
                            Ok(Some(f)) if is_copy_in_message(f.tag) => {
                                self.on_client_frame(f).await?;
                                continue;
                            }
                            // anything else is a protocol violation during COPY (the server
                            // answers 08P01); held, it would wait for an end the client sends
                            // after it. Not forwarded: if the COPY has just failed on the server,
                            // the server would run it unread by pgtenant.
                            Ok(Some(f)) => {
                                let framed = self.output_framed();
                                return Err(during_copy(&mut self.client_out, framed, f.tag));
                            }
                            Ok(None) => {}
                            Err(e) => return Err(End::Fatal(frame_error(e))),
                        }
                    } else if self.replies.copy_in && self.lease.is_some() {
                        if let Pause::Held(f) = &self.pause {
                            // a message held back went before the COPY's data: it came during
                            // COPY (08P01 from the server too), and the data behind it cannot
                            // pass it. Waiting would hang: the server waits for the data.
                            let (framed, tag) = (self.output_framed(), f.tag);
                            return Err(during_copy(&mut self.client_out, framed, tag));
                        }
                    }
                    return Ok(Flow::Continue);
                }
                self.pause.settled();
            }
            // (`take_held` writes the pause only when a message is held: an unconditional
            // `mem::replace` here made the compiler copy `on_client_frame`'s 680-byte future
            // for every message, +1,000 instructions per extended transaction)
            let frame = match self.pause.take_held() {
                Some(f) => f,
                None => match try_split(&mut self.client_in, self.shared.max_message_bytes) {
                    Ok(Some(f)) => f,
                    Ok(None) => {
                        if processed {
                            // (a held message the server skips owes no reply: the clock starts
                            // here; with no message processed, nothing changed since the replies)
                            self.start_idle_clock();
                        }
                        return Ok(Flow::Continue);
                    }
                    Err(e) => return Err(End::Fatal(frame_error(e))),
                },
            };
            processed = true;
            match self.on_client_frame(frame).await? {
                Flow::Continue => {}
                Flow::Hold(f) => {
                    self.pause = Pause::Held(f);
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
                    if !self.pending.is_empty() {
                        self.pause = Pause::UntilSettled;
                    }
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
        let mut plan = match step {
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
        if matches!(f.tag, msg::BIND | msg::DESCRIBE) && !skipping && (self.statement_parse_in_flight(&f) || self.describe_waits(&f)) {
            // it uses a statement of the client's whose Parse in an earlier batch is not
            // answered yet: if that Parse fails or is skipped, the client does not have it
            // (26000), or has the one before. Or it is a Describe pgtenant may have to answer
            // itself, once it knows whether the block failed (`describe_waits`). Wait for it.
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
        } else if self.debts.reset && !self.batch.is_open() && self.replies.is_settled() {
            // a reset of this backend was skipped (`Replies::own_query_skipped`) and the backend
            // stayed attached (session pooling, or more messages pipelined): send it again now
            self.debts.reset = false;
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
            (Some(def), None) => self.forward_deallocate(&f, &def),
            (None, None) => self.forward_with_deallocates(&f, &mut plan.deallocates, plan.binds_deallocate, simple, skipping),
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
            self.debts.query_portal |= f.tag == msg::QUERY;
            // after a Query that got the context, or began a block whose context waits (`BEGIN`
            // is setup), wait for its answer
            self.after_simple(injected || matches!(decision, Decision::Defer { .. }));
        } else {
            // (an Execute that ends the transaction, but for `AND CHAIN`, leaves the server a new
            // one in which nothing was executed: DISCARD ALL may run there again)
            let ends = f.tag == msg::EXECUTE && plan.effect == Some(TxEffect::End) && !plan.chain;
            let executed = !ends && (matches!(self.batch, Batch::Open { executed: true, .. }) || f.tag == msg::EXECUTE);
            self.batch = Batch::Open { began_idle, executed };
            if f.tag == msg::EXECUTE && plan.effect == Some(TxEffect::End) {
                self.needs_context = true;
            }
        }
        Ok(Flow::Continue)
    }

    /// The client has its answers but the backend is not free (an open transaction, or an
    /// unsynced batch): it is idle in a transaction from now on (`pool.idle_in_transaction_timeout_ms`).
    fn start_idle_clock(&mut self) {
        if self.idle_since.is_none() && self.lease.is_some() && self.replies.is_settled() && !self.pause.holds_frame() && !self.backend_clean() {
            self.idle_since = Some(std::time::Instant::now());
        }
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

    /// After a simple Query or FunctionCall went to the server (or was answered here, as `DISCARD
    /// ALL`): one inside an unsynced batch ends the batch's implicit transaction
    /// (`simple_inside_a_batch`). The client's next message waits for the answer where `waits`
    /// says so, inside a batch (it is a transaction of its own), or while session SETs wait for
    /// their transaction's outcome: where the backend then is is exact, not guessed (`block`),
    /// for clients that do not wait themselves, and an error in it is not taken for one in the
    /// next (`pending`).
    pub(super) fn after_simple(&mut self, waits: bool) {
        self.simple_inside_a_batch();
        if waits || self.batch.is_open() || !self.pending.is_empty() {
            self.pause = Pause::UntilSettled;
        }
    }

    /// Where everything sent leaves the attached backend, as far as is certain (`Block`): inside a
    /// block that nothing sent since the last exact status can have ended, a pipelined message
    /// needs no context (the block has it); inside a failed one, none can be sent. (Whether a
    /// session SET there is kept still waits for the earlier replies: see `pending`.)
    fn block(&self) -> Option<Block> {
        self.lease.as_ref().map(|_| self.since_exact.block(self.replies.status))
    }

    /// Whether the output to the client ends on a message boundary (no large message is being
    /// streamed through): only then can pgtenant add a message of its own.
    fn output_framed(&self) -> bool {
        !(self.stream_left > 0 && self.stream_forward)
    }

    fn status_for_client(&self) -> u8 {
        if self.lease.is_some() { self.replies.status } else { b'I' }
    }

}

/// Whether the client's input waits for the backend's replies: processing of the client's messages
/// goes on once every reply owed is in (`Replies::is_settled`).
enum Pause {
    /// Client messages are processed as they come.
    No,
    /// The context went out in front of a simple Query (or a Query began a block whose context
    /// waits, or made session SETs whose fate its answer decides): where the backend then is will
    /// be exact, not guessed. COPY data of a Query that started COPY FROM STDIN still flows.
    UntilSettled,
    /// This message was classified `Hold` (`Step::Hold`, `Decision::Hold`): it is classified again
    /// once the replies are in.
    Held(Frame),
}

impl Pause {
    fn is_paused(&self) -> bool {
        !matches!(self, Pause::No)
    }

    fn holds_frame(&self) -> bool {
        matches!(self, Pause::Held(_))
    }

    /// Every reply is in: a pause until then ends (a held message stays, for `take_held`).
    fn settled(&mut self) {
        if let Pause::UntilSettled = self {
            *self = Pause::No;
        }
    }

    /// The held message, leaving no pause.
    fn take_held(&mut self) -> Option<Frame> {
        match self {
            Pause::Held(_) => match std::mem::replace(self, Pause::No) {
                Pause::Held(f) => Some(f),
                _ => None,
            },
            _ => None,
        }
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



/// What a client may send while the server is in COPY FROM STDIN (it ignores Flush and Sync there).
fn is_copy_in_message(tag: u8) -> bool {
    matches!(tag, msg::COPY_DATA | msg::COPY_DONE | msg::COPY_FAIL | msg::FLUSH | msg::SYNC)
}

/// A client message other than COPY data, Flush or Sync while the server is in COPY FROM STDIN:
/// what the server answers there, word for word (an ERROR, then a FATAL as it closes the
/// connection). The message does not go to the server; the backend, left mid-COPY, is closed,
/// and the server rolls the COPY back.
fn during_copy(client_out: &mut BytesMut, framed: bool, tag: u8) -> End {
    if framed {
        PgError::error(sqlstate::PROTOCOL_VIOLATION, format!("unexpected message type 0x{tag:02X} during COPY from stdin")).encode(client_out);
    }
    End::Fatal(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "terminating connection because protocol synchronization was lost"))
}

fn frame_error(e: FrameError) -> PgError {
    match e {
        FrameError::TooLarge { .. } => PgError::fatal(sqlstate::PROGRAM_LIMIT_EXCEEDED, format!("pgtenant: {e}"))
            .with_hint("raise server.max_message_bytes if this is legitimate"),
        FrameError::BadLength(_) => PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("pgtenant: {e}")),
    }
}

