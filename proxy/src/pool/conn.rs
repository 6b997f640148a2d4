//! One pooled backend connection and its hygiene: what the sessions that used it may have left on
//! it, and how to clear that before the next client.
//!
//! The session tells the connection what each client message may do ([`Effects`]); the connection
//! decides what the reset before a different client must clear ([`PooledConn::reset_for`]). Its
//! prepared-statement cache (`prepared`), the context statements prepared on it, and the
//! `default_transaction_*` defaults it was given are kept here too, behind methods, so no session
//! writes them directly.

use std::task::{Context, Poll, Waker};
use std::time::Instant;

use tokio::io::{AsyncRead, ReadBuf, ReadHalf, WriteHalf};

use super::prepared::BackendStatements;
use crate::backend::BackendConn;
use crate::net::Stream;
use crate::sql::stateless::Leaves;

/// Clears the session state one client can leave on a backend for the next: held cursors,
/// listeners, session advisory locks, temporary tables, sequence state (`currval`/`lastval`).
/// Also session-level settings the client changed with `SET` (RESET ALL).
pub const RESET_QUERY: &str =
    "CLOSE ALL; UNLISTEN *; SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES; RESET ALL";

/// Clears only sequence state, after transactions that did nothing but plain writes.
pub const RESET_SEQUENCES: &str = "DISCARD SEQUENCES";

/// What must be cleared before another session uses a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reset {
    /// Only sequence state ([`RESET_SEQUENCES`]). `DISCARD SEQUENCES` runs inside a transaction,
    /// so the session can send it in the same batch as the context statement (no transaction and
    /// no ReadyForQuery of its own), or as a Query of its own.
    Sequences,
    /// Everything a session can leave: a Query of its own, which cannot run in a transaction block.
    Session(String),
}

impl Reset {
    /// The reset as one query string.
    pub fn into_sql(self) -> String {
        match self {
            Reset::Sequences => RESET_SEQUENCES.to_string(),
            Reset::Session(sql) => sql,
        }
    }
}

/// What one client message may do to the connection's session state.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Effects {
    /// What it may leave on the session (see `crate::sql::stateless`): reset that before another
    /// client.
    pub leaves: Leaves,
    /// It may create, drop or replace SQL-level prepared statements (`PREPARE`, `DEALLOCATE`,
    /// `DISCARD`): deallocate everything before another client, and prepare pgtenant's own
    /// statements afresh.
    pub touches_prepared: bool,
    /// A FunctionCall of an allowed function: anything may have happened.
    pub function_call: bool,
}

/// One backend connection, split for full-duplex relaying.
pub struct PooledConn {
    pub rd: ReadHalf<Stream>,
    pub wr: WriteHalf<Stream>,
    pub pid: i32,
    pub secret_key: i32,
    pub(super) created: Instant,
    /// Which context statements (by number of settings, bit n) are prepared on this connection.
    ctx_prepared: u128,
    /// The sequence-reset statement (`crate::session::inject::RESET_STATEMENT`) is prepared here.
    reset_prepared: bool,
    /// Client statements prepared on this connection, by content.
    statements: BackendStatements,
    /// The session that used this connection last.
    owner: u64,
    /// What the sessions since the last reset may have left behind (temp tables, held cursors,
    /// LISTEN, advisory locks, settings — or only sequence state): reset before another session
    /// uses the connection.
    dirt: Leaves,
    /// It may also have left SQL-level prepared statements: the reset deallocates everything.
    full_reset: bool,
    /// Relay buffers for this connection's traffic; a session borrows them while it holds the
    /// lease, so idle clients hold no backend-sized buffers.
    pub buf_in: bytes::BytesMut,
    pub buf_out: bytes::BytesMut,
    /// OIDs of the functions `tenant.allowed_function_calls` names, as resolved on this connection.
    pub allowed_calls: std::collections::HashSet<u32>,
    /// The `default_transaction_*` statement a session last ran here (see
    /// `crate::sql::txmode::defaults_sql`); empty while the role's own defaults hold.
    tx_defaults: String,
    /// Which server process this is, as a signed context names it (`crate::signing`).
    pub id: crate::signing::BackendId,
    /// The ParameterStatus values this connection reported last, names as the server spells them.
    /// The server reports a parameter only when its value differs from its last report, so this is
    /// also the value of any parameter it did not report after a change.
    pub reported: Vec<(String, String)>,
    /// A `RESET ALL` went out and its answer has not come back: until then the settings it resets
    /// are not what `reported` says, and `application_name` is the one the connection logged in with
    /// (a failed reset drops the connection).
    resetting_settings: bool,
    /// The `application_name` the connection logged in with, as the server reported it.
    login_name: String,
}

impl PooledConn {

    /// Records what a client message may have done here.
    pub fn note(&mut self, e: Effects) {
        self.dirt = self.dirt.max(e.leaves);
        if e.function_call {
            self.dirt = Leaves::Session;
            self.full_reset = true;
        }
        if e.touches_prepared {
            self.dirt = Leaves::Session;
            self.full_reset = true;
            // DEALLOCATE / DISCARD may have dropped server statements
            self.forget_own_statements();
            self.statements.clear();
        }
    }

    /// Hands the connection to session `owner`: the reset to send in front of its first message
    /// when a different session may have left state here.
    pub fn reset_for(&mut self, owner: u64) -> Option<Reset> {
        let reset = if self.owner != owner { self.take_reset() } else { None };
        self.owner = owner;
        reset
    }

    /// Everything must go before the next use, even by `owner` (a whole session ran here, or the
    /// client sent DISCARD ALL): the full reset, now.
    pub fn reset_all_for(&mut self, owner: u64) -> Option<String> {
        self.dirt = Leaves::Session;
        self.full_reset = true;
        self.owner = owner;
        self.take_reset().map(Reset::into_sql)
    }

    /// A sequence reset sent to this connection may not have run (it failed, or the session ended
    /// before its answer): the next session gets one again, even if it is the session the reset
    /// was for (it is the one the reset protects from the sessions before it).
    pub fn reset_unconfirmed(&mut self) {
        self.dirt = self.dirt.max(Leaves::Sequences);
        self.owner = 0;
    }

    /// A reset (or other statement of pgtenant's own) sent to this connection was skipped by the
    /// server, which was skipping to the end of a failed batch: what it was to clear is still
    /// there, and what pgtenant recorded as cleared is not. The full reset goes before the next
    /// use, whoever's, the same session's included.
    pub fn reset_skipped(&mut self) {
        self.dirt = Leaves::Session;
        self.full_reset = true;
        self.owner = 0;
        self.resetting_settings = false;
    }

    /// The session that ran here ended after a whole session (session pooling): the next owner gets
    /// the full reset.
    pub fn end_session(&mut self) {
        self.dirt = Leaves::Session;
        self.full_reset = true;
    }

    /// Whether context statement `arity` must be prepared here first (and it is taken as prepared).
    pub fn needs_context_parse(&mut self, arity: usize) -> bool {
        let bit = 1u128.checked_shl(arity as u32).unwrap_or(0);
        let needed = self.ctx_prepared & bit == 0;
        self.ctx_prepared |= bit;
        needed
    }

    /// Context statement `arity` did not get prepared after all (its Parse was skipped).
    pub fn forget_context(&mut self, arity: usize) {
        self.ctx_prepared &= !1u128.checked_shl(arity as u32).unwrap_or(0);
    }

    /// Whether the sequence-reset statement must be prepared here first (and it is taken as
    /// prepared).
    pub fn needs_reset_parse(&mut self) -> bool {
        !std::mem::replace(&mut self.reset_prepared, true)
    }

    /// The sequence-reset statement did not get prepared after all (its Parse failed or was skipped).
    pub fn forget_reset_statement(&mut self) {
        self.reset_prepared = false;
    }

    /// None of pgtenant's own statements (context, reset) is prepared here any more.
    fn forget_own_statements(&mut self) {
        self.ctx_prepared = 0;
        self.reset_prepared = false;
    }

    /// The client statements prepared on this connection.
    pub fn statements(&mut self) -> &mut BackendStatements {
        &mut self.statements
    }

    /// The server statements this connection has prepared, to look at.
    pub fn statements_ref(&self) -> &BackendStatements {
        &self.statements
    }

    /// Whether the connection has exactly these `default_transaction_*` defaults
    /// (`crate::sql::txmode::defaults_sql`).
    pub fn has_tx_defaults(&self, sql: &str) -> bool {
        self.tx_defaults == sql
    }

    pub fn set_tx_defaults(&mut self, sql: &str) {
        self.tx_defaults = sql.to_string();
    }

    pub(super) fn from_conn(c: BackendConn, prepared_cache: usize, allowed_calls: std::collections::HashSet<u32>, started: String) -> PooledConn {
        let id = crate::signing::BackendId { pid: c.pid, started };
        let (rd, wr) = tokio::io::split(c.stream);
        let mut conn = PooledConn {
            rd,
            wr,
            pid: c.pid,
            secret_key: c.secret_key,
            created: c.created,
            ctx_prepared: 0,
            reset_prepared: false,
            tx_defaults: String::new(),
            id,
            statements: BackendStatements::new(prepared_cache),
            owner: 0,
            dirt: Leaves::Nothing,
            full_reset: false,
            buf_in: bytes::BytesMut::new(),
            buf_out: bytes::BytesMut::new(),
            allowed_calls,
            reported: c.params,
            login_name: String::new(),
            resetting_settings: false,
        };
        conn.login_name = conn.reported(crate::protocol::APPLICATION_NAME).unwrap_or_default().to_string();
        conn
    }

    /// The connection's session-level `application_name` as the next transaction will find it: the
    /// one it last reported (at login, and whenever it changed since), or, while a `RESET ALL` sent
    /// to it is unanswered, the one it logged in with (what `RESET ALL` returns to).
    pub fn application_name(&self) -> &str {
        if self.resetting_settings {
            return &self.login_name;
        }
        self.reported(crate::protocol::APPLICATION_NAME).unwrap_or_default()
    }

    /// Everything sent to the connection has been answered (a reset included, or its error).
    pub fn settled(&mut self) {
        self.resetting_settings = false;
    }

    /// Records a ParameterStatus message (its body) this connection sent.
    pub fn note_report(&mut self, body: &[u8]) {
        let mut parts = body.split(|&b| b == 0);
        let (name, raw) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        let value = || String::from_utf8_lossy(raw).into_owned();
        match self.reported.iter_mut().find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(name)) {
            Some(e) if e.1.as_bytes() == raw => {} // unchanged: nothing to allocate
            Some(e) => e.1 = value(),
            None => self.reported.push((String::from_utf8_lossy(name).into_owned(), value())),
        }
    }

    /// What this connection last reported for `name` (any case).
    pub fn reported(&self, name: &str) -> Option<&str> {
        self.reported.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The statement that clears what the previous session left on this connection, if it may have
    /// left anything; the caller sends it before anything else. What it clears is forgotten here.
    pub fn take_reset(&mut self) -> Option<Reset> {
        match std::mem::take(&mut self.dirt) {
            Leaves::Nothing => return None,
            // plain writes: only currval/lastval can tell the next client anything
            Leaves::Sequences => return Some(Reset::Sequences),
            Leaves::Session => {}
        }
        self.tx_defaults.clear(); // RESET ALL
        self.resetting_settings = true;
        if self.full_reset {
            self.full_reset = false;
            self.statements.clear();
            self.forget_own_statements();
            Some(Reset::Session(format!("{}; DEALLOCATE ALL", RESET_QUERY)))
        } else {
            Some(Reset::Session(RESET_QUERY.to_string()))
        }
    }

    /// An idle backend sends nothing; readable data or EOF means the server closed it.
    pub(super) fn looks_closed(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 64];
        let mut buf = ReadBuf::new(&mut byte);
        !matches!(std::pin::Pin::new(&mut self.rd).poll_read(&mut cx, &mut buf), Poll::Pending)
    }
}

