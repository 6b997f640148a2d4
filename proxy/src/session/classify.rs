//! The first step for each client message that runs or prepares SQL: what it is and what it may
//! do, decided before anything is sent. `classify` reads the message once (`crate::sql::analyze`
//! for SQL text), applies the statement guard and the pooling rules, records the client's prepared
//! statements and portals, and returns a [`Step`]; the session then places the context and forwards
//! (see `super::context` and `Session::on_work`). Nothing here does I/O.

use std::sync::Arc;

use bytes::Bytes;

use super::context::{Batch, BlockChange};
use super::settings::{ClientSettings, MAX_CONTEXT_SETTINGS};
use super::replies::Replies;
use super::statements::{self, StatementDef, Statements};
use super::End;
use crate::error::{sqlstate, PgError};
use crate::guard::{Guard, Position};
use crate::pool::Effects;
use crate::protocol::frame::Frame;
use crate::protocol::peek;
use crate::protocol::tags::frontend as msg;
use crate::sql::savepoint::TxOp;
use crate::sql::analyze::analyze;
use crate::sql::set::Change;
use crate::sql::stateless::Leaves;
use crate::sql::txmode::Opening;
use crate::sql::{self, TxEffect};

/// What to do with one client message.
#[derive(Debug)]
pub enum Step {
    /// Forward it, with the context in front when the transaction needs it.
    Run(Plan),
    /// Wait until every reply owed by the backend has arrived, then classify it again.
    Hold,
    /// Answer it the way the server answers a failed message.
    Refuse(Refusal),
    /// `DISCARD ALL` outside a transaction: pgtenant runs it itself.
    DiscardAll,
    /// `Close` of one of the client's named statements: they live in pgtenant, which answers.
    ClosedLocally,
}

/// A refused message, and what the audit log records about it (`statement_refused`).
#[derive(Debug)]
pub struct Refusal {
    pub err: PgError,
    /// Which rule refused it, and the SQL text.
    pub audit: Option<(&'static str, Vec<u8>)>,
}

impl Refusal {
    fn plain(err: PgError) -> Step {
        Step::Refuse(Refusal { err, audit: None })
    }

    fn audited(err: PgError, rule: &'static str, sql: &[u8]) -> Step {
        Step::Refuse(Refusal { err, audit: Some((rule, sql.to_vec())) })
    }
}

/// What a message that goes ahead does.
#[derive(Debug, Default)]
pub struct Plan {
    /// Its effect on the transaction block; None when unknown (Describe, Close).
    pub effect: Option<TxEffect>,
    /// What it may leave on the backend connection.
    pub conn: Effects,
    /// It ends the transaction `AND CHAIN`: the chained transaction needs the context.
    pub chain: bool,
    /// Transaction setup only: the context waits for the next message (`crate::sql::txmode`).
    pub setup: bool,
    /// Setup that chooses modes, then other statements, in one query string.
    pub modes_then_work: bool,
    /// Session-level setting changes, kept for the client if the batch ends cleanly.
    pub changes: Option<Vec<Change>>,
    /// What it does to savepoints and its transaction's outcome: which session-level changes
    /// noted before it stay (`super::pending`).
    pub tx_op: Option<TxOp>,
    /// A Query `DEALLOCATE name` of one of the client's statements: sent rewritten.
    pub dealloc: Option<Arc<StatementDef>>,
    /// An Execute of `DEALLOCATE`: the client's statements it drops.
    pub deallocates: Option<statements::Deallocates>,
    /// A Parse of a name the client already has: the error it gets if its text parses, and the
    /// text (the Parse body after the name).
    pub duplicate: Option<Box<(PgError, Bytes)>>,
    /// A FunctionCall of this function OID (allowed by the pool; the backend checks the OID).
    pub function_oid: Option<u32>,
    /// The access mode its first statement opens a transaction with (`BEGIN READ ONLY`): where a
    /// transaction it starts may run (`crate::routing::intent`).
    pub access: Option<crate::routing::intent::Mode>,
    /// What it may do to a transaction block, at most: a `COMMIT`, `ROLLBACK`, `ROLLBACK TO` …
    /// anywhere in a query string, or an Execute of a portal bound to one. (An Execute may also run
    /// a portal pgtenant's table no longer matches, after messages the server skipped: the session
    /// adds those, `context::SinceExact`.) Nothing else does anything to a block.
    pub block: BlockChange,
    /// A Bind of a statement that is a `DEALLOCATE`: its portal's Execute checks that the portal
    /// is still there (`Session::dealloc_portals`).
    pub binds_deallocate: bool,
}

/// The session-state budget (`server.max_session_state_bytes`, `settings::MAX_CONTEXT_SETTINGS`).
#[derive(Debug, Clone, Copy)]
pub struct Budget<'a> {
    pub max: usize,
    /// The client's kept session settings.
    pub settings: &'a ClientSettings,
}

/// Everything `classify` reads, and the statement table it records into.
pub struct Classifier<'a> {
    pub guard: &'a Guard,
    pub statements: &'a mut Statements,
    /// Where the message runs (`Session::position`).
    pub pos: Position,
    /// Transaction pooling: statements that need the whole session are refused.
    pub pooling: bool,
    pub batch: Batch,
    /// A backend is attached and replies are outstanding.
    pub unsettled: bool,
    /// Whether the client is inside a transaction block is not known yet: the batch (or, with
    /// none open, the message) follows another of the client's whose replies are outstanding
    /// (`Session::position_unknown`). `pos` then says "possibly inside".
    pub pos_unknown: bool,
    /// The batch failed: the server skips everything up to its Sync.
    pub skipping: bool,
    /// The replies owed by the attached backend (None without one): whether a message of the open
    /// batch is unanswered (`Replies::batch_may_fail`), asked only by the few messages whose
    /// effect depends on it.
    pub replies: Option<&'a Replies>,
    pub budget: Budget<'a>,
    /// The pool lets clients call functions by FunctionCall (`tenant.allowed_function_calls`).
    pub function_calls: bool,
}

impl Classifier<'_> {
    /// A message of the open batch is unanswered: whether the server runs the next one is not
    /// known yet.
    fn batch_pending(&self) -> bool {
        self.replies.is_some_and(|r| r.batch_may_fail())
    }

    /// Where everything sent is answered: the backend is in a failed transaction block, so the
    /// server refuses the next statement (25P02) and it changes nothing.
    fn block_failed(&self) -> bool {
        self.replies.is_some_and(|r| r.status == b'E')
    }

    pub fn classify(&mut self, f: &Frame) -> Result<Step, End> {
        let body = f.body();
        let malformed = || End::Fatal(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "pgtenant: malformed message"));
        if self.skipping && matches!(f.tag, msg::PARSE | msg::BIND | msg::DESCRIBE | msg::EXECUTE | msg::CLOSE) {
            // the batch failed and the server skips everything up to its Sync, this too: it
            // prepares, binds and closes nothing, so pgtenant records nothing either
            return Ok(Step::Run(Plan::default()));
        }
        match f.tag {
            msg::QUERY => Ok(self.query(peek::query_msg(body).ok_or_else(malformed)?)),
            msg::PARSE => {
                let (name, q) = peek::parse_msg(body).ok_or_else(malformed)?;
                let types = peek::param_types_after(body, name, q).unwrap_or_default();
                Ok(self.parse(name, q, &types, f.bytes.slice(5 + name.len() + 1..)))
            }
            msg::BIND => {
                let (portal, stmt) = peek::bind_msg(body).ok_or_else(malformed)?;
                Ok(self.bind(body, portal, stmt))
            }
            msg::EXECUTE => Ok(self.execute(peek::execute_msg(body).ok_or_else(malformed)?)),
            msg::CLOSE | msg::DESCRIBE => {
                let (kind, name) = peek::target_msg(body).ok_or_else(malformed)?;
                Ok(self.target(f.tag, kind, name))
            }
            _ => {
                // FunctionCall: a function chosen by OID, with no SQL for the guard to read
                let oid = peek::function_call_oid(body).ok_or_else(malformed)?;
                if !self.function_calls {
                    return Ok(Refusal::plain(function_call_refused(oid)));
                }
                let conn = Effects { leaves: Leaves::Session, function_call: true, ..Default::default() };
                Ok(Step::Run(Plan { effect: Some(TxEffect::None), conn, function_oid: Some(oid), ..Default::default() }))
            }
        }
    }

    fn query(&mut self, q: &[u8]) -> Step {
        if self.batch_pending() {
            // Inside an unsynced extended batch with messages still unanswered: if one of them
            // fails, the server skips this Query too (and keeps its unnamed statement, runs none
            // of its SETs). Wait for them (the session flushes the batch), so that it is
            // classified knowing which. No driver sends a Query there; the cost is one round trip.
            return Step::Hold;
        }
        let a = analyze(q);
        if self.skipping {
            return self.skipped_query(&a, q);
        }
        // the server drops the unnamed statement at every simple Query it runs, and puts the
        // Query's own portal in place of the unnamed portal
        self.statements.close(b'S', b"");
        self.statements.close(b'P', b"");
        // a string that may roll back keeps none of its own changes (the cautious reading)
        let sets = !a.changes.is_empty() && !matches!(a.tx_op, Some(TxOp::Rollback | TxOp::RollbackTo(_)));
        if self.pos_unknown && (sets || a.discard_all) {
            // DISCARD ALL is answered by pgtenant only outside a transaction block, and a session
            // SET's fate must not be mixed up with the earlier replies' errors: wait for them
            return Step::Hold;
        }
        if a.ends_tx_midway {
            if self.unsettled {
                return Step::Hold; // the rule depends on where the backend is: wait for it
            }
            return Refusal::plain(
                PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, "pgtenant: a query string cannot go on after COMMIT or ROLLBACK")
                    .with_hint("send the statements that follow the end of the transaction as a separate query"),
            );
        }
        if let Err(e) = self.guard.check_statements(&a.statements, self.pos) {
            return Refusal::audited(e, "guard", q);
        }
        if self.pooling {
            if let Err(e) = sql::pooling::check_statements(&a.statements, self.pos.in_block) {
                return Refusal::audited(e, "pooling", q);
            }
        }
        if a.discard_all && !self.pos.in_block {
            return Step::DiscardAll;
        }
        // Inside an unsynced batch that began outside a block, where the client executed nothing
        // yet, the server runs DISCARD ALL too (after an Execute it refuses it: 25001, a
        // pipeline). pgtenant's context statement went in front as an Execute, after which the
        // server would refuse it: it is answered here, once the batch's replies are in.
        if a.discard_all && matches!(self.batch, Batch::Open { began_idle: Some(true), executed: false }) {
            return if self.unsettled { Step::Hold } else { Step::DiscardAll };
        }
        let drops = a.deallocate.is_some() || a.deallocates_all;
        if drops && self.unsettled {
            return Step::Hold; // it drops client statements only where the server runs it
        }
        let runs = !drops || !self.block_failed();
        let dealloc = a.deallocate.as_ref().filter(|_| runs).and_then(|n| self.statements.get(n.as_bytes()).cloned());
        let touches_prepared = dealloc.is_none() && a.touches_prepared;
        if touches_prepared && a.deallocates_all && runs {
            self.statements.clear_statements();
        }
        let mut changes = None;
        if sets {
            if let Err(e) = self.check_settings_budget(&a.changes) {
                return Refusal::plain(e);
            }
            changes = Some(a.changes.clone());
        }
        Step::Run(Plan {
            effect: Some(a.first),
            block: a.statements.iter().map(|t| BlockChange::of(sql::tx_effect(t.first().copied(), t.get(1).copied()))).max().unwrap_or_default(),
            conn: Effects { leaves: a.leaves, touches_prepared, function_call: false },
            chain: a.chain,
            setup: a.opening == Opening::SetupOnly,
            modes_then_work: a.opening == Opening::ModesThenWork,
            changes,
            tx_op: a.tx_op.clone(),
            dealloc,
            deallocates: None, // a Query runs at once: `dealloc` and the clearing above
            binds_deallocate: false,
            duplicate: None,
            function_oid: None,
            access: a.statements.first().and_then(|t| crate::routing::intent::statement_mode(t)),
        })
    }

    fn parse(&mut self, name: &[u8], q: &[u8], types: &[u32], key: Bytes) -> Step {
        if reserved_name(name) {
            return Refusal::audited(reserved_name_error(), "reserved_name", q);
        }
        if name.is_empty() {
            if let Some((def, access)) = self.statements.reparse_unnamed(&key, self.pos.in_block) {
                // read before, at the same position, and let through (`Statements::remember_unnamed`)
                let conn = Effects { leaves: def.leaves, ..Default::default() };
                return Step::Run(Plan { effect: Some(def.effect), conn, setup: def.setup, access, ..Default::default() });
            }
        }
        let a = analyze(q);
        let bind_checks = match self.guard.check_parse_statements(&a.statements, types, self.pos) {
            Ok(calls) => calls,
            Err(e) => return Refusal::audited(e, "guard", q),
        };
        if self.pooling {
            if let Err(e) = sql::pooling::check_statements(&a.statements, true) {
                return Refusal::audited(e, "pooling", q);
            }
        }
        if !name.is_empty() && self.statements.get(name).is_some() {
            if self.unsettled {
                return Step::Hold; // its earlier Parse may still fail, and then the name is free
            }
            // the server parses the text before it looks at the name: a statement that does not
            // parse gets its own error, one that does gets 42P05 (see `Session::check_duplicate`)
            let err = PgError::error(
                sqlstate::DUPLICATE_PSTATEMENT,
                format!("prepared statement \"{}\" already exists", String::from_utf8_lossy(name)),
            );
            return Step::Run(Plan { effect: Some(a.first), duplicate: Some(Box::new((err, key))), ..Default::default() });
        }
        // (a `DEALLOCATE` parsed here drops nothing until its portal runs: `Session::rebind_deallocate`)
        let touches_prepared = a.touches_prepared;
        // the client's session-level settings share the budget with its statements
        let budget = self.budget.max.saturating_sub(self.budget.settings.bytes());
        match self.statements.parse_analyzed(name, &a, key, budget, bind_checks) {
            Ok(def) => {
                let access = a.statements.first().and_then(|t| crate::routing::intent::statement_mode(t));
                if name.is_empty() && !a.touches_prepared {
                    self.statements.remember_unnamed(&def, self.pos.in_block, access);
                }
                Step::Run(Plan {
                    effect: Some(def.effect),
                    conn: Effects { leaves: def.leaves, touches_prepared, function_call: false },
                    setup: def.setup,
                    access,
                    ..Default::default()
                })
            }
            Err(full) => Refusal::plain(state_limit_error(full, self.budget.max)),
        }
    }

    /// A Bind; a statement with `set_config` calls to decide at Bind (see `crate::sql::set_config`) is
    /// checked with the Bind's values first. A refused Bind leaves no portal; an accepted one carries
    /// the session-level settings it makes to the Execute.
    fn bind(&mut self, body: &[u8], portal: &[u8], stmt: &[u8]) -> Step {
        if reserved_name(portal) || reserved_name(stmt) {
            return Refusal::plain(reserved_name_error());
        }
        if stmt.is_empty() && self.statements.statement(b"").is_none() {
            // the backend may hold an unnamed statement that is not this client's (another
            // session's, or pgtenant's own): the client has none, as the server would say
            return Refusal::plain(no_unnamed_statement());
        }
        let def = self.statements.statement(stmt).cloned();
        let bound = match def.as_ref().and_then(|d| d.bind_checks.clone().map(|c| (d, c))) {
            None => self.statements.bind(portal, stmt),
            Some((def, calls)) => {
                let decided = match peek::bind_params(body) {
                    Some(params) => self.guard.check_bound(&calls, &params),
                    None => Err(crate::guard::malformed_bind()),
                };
                match decided.map(|changes| (self.check_settings_budget(&changes), changes)) {
                    Ok((Ok(()), changes)) => self.statements.bind_with(portal, stmt, changes),
                    Ok((Err(e), _)) => {
                        self.statements.close(b'P', portal);
                        return Refusal::plain(e);
                    }
                    Err(e) => {
                        self.statements.close(b'P', portal);
                        let end = def.key.iter().position(|&b| b == 0).unwrap_or(def.key.len());
                        return Refusal::audited(e, "guard", &def.key[..end]);
                    }
                }
            }
        };
        let Ok(effect) = bound else {
            return Refusal::plain(
                PgError::error(
                    sqlstate::PROGRAM_LIMIT_EXCEEDED,
                    format!("pgtenant: too many open portals in this transaction (limit {})", statements::MAX_PORTALS),
                )
                .with_hint("close portals you no longer use (Close), or use the unnamed portal"),
            );
        };
        // a statement parsed in an earlier transaction may run here on another backend
        let def = self.statements.portal(portal);
        Step::Run(Plan {
            effect,
            conn: Effects { leaves: def.map_or(Leaves::Session, |d| d.leaves), ..Default::default() },
            setup: def.is_some_and(|d| d.setup),
            binds_deallocate: def.is_some_and(|d| d.deallocates.is_some()),
            ..Default::default()
        })
    }

    fn execute(&mut self, portal: &[u8]) -> Step {
        let Some(def) = self.statements.portal(portal).cloned() else {
            if portal.is_empty() {
                // The client bound no unnamed portal: what the server holds under that name is at
                // most a simple Query's own, which no client may run. After a utility statement that
                // failed while it ran inside a transaction block, it outlives its statement, and an
                // Execute of it crashes PostgreSQL 15 (all of its connections with it; see
                // `Session::close_query_portal`). pgtenant answers as the server does for a portal
                // that is not there.
                return Refusal::plain(no_unnamed_portal());
            }
            // unknown portal: the server answers 34000 (nor can it end a block: see
            // `context::SinceExact`)
            return Step::Run(Plan { conn: Effects { leaves: Leaves::Session, ..Default::default() }, ..Default::default() });
        };
        let (began_idle, executed) = match self.batch {
            Batch::Open { began_idle, executed } => (began_idle == Some(true), executed),
            _ => (!self.pos.in_block, false),
        };
        if def.deallocates.is_some() && self.unsettled {
            // it drops client statements here: only if the server runs it (the batch so far did
            // not fail, and the portal is still there: a Sync since its Bind may have ended it)
            return Step::Hold;
        }
        if self.pos_unknown && (def.sets.is_some() || def.discard_all) {
            return Step::Hold; // see `query`
        }
        if def.discard_all && began_idle && !executed {
            if self.batch_pending() {
                // whether the server would run it depends on the batch so far (an earlier
                // message that fails makes it skip this one too, and then nothing is
                // discarded): wait for those replies
                return Step::Hold;
            }
            return Step::DiscardAll;
        }
        Step::Run(Plan {
            effect: Some(def.effect),
            block: BlockChange::of(def.effect),
            // a DEALLOCATE drops server statements when it runs, pgtenant's own among them
            conn: Effects { leaves: def.leaves, touches_prepared: def.deallocates.is_some(), ..Default::default() },
            chain: def.chain,
            setup: def.setup,
            changes: def.sets.as_ref().map(|s| s.to_vec()),
            tx_op: def.tx_op.clone(),
            // in a failed block the server refuses it (25P02): it drops nothing
            deallocates: def.deallocates.clone().filter(|_| !self.block_failed()),
            ..Default::default()
        })
    }

    fn target(&mut self, tag: u8, kind: u8, name: &[u8]) -> Step {
        if reserved_name(name) {
            return Refusal::plain(reserved_name_error());
        }
        if tag == msg::DESCRIBE && kind == b'S' && name.is_empty() && self.statements.statement(b"").is_none() {
            return Refusal::plain(no_unnamed_statement()); // as for a Bind (see `bind`)
        }
        // a Close takes no snapshot, nor does a Describe of transaction setup: the context can wait
        // for the statement that needs it
        let setup = tag == msg::CLOSE || self.statements.target(kind, name).is_some_and(|d| d.setup);
        if tag == msg::CLOSE {
            if (kind == b'S' || name.is_empty()) && self.batch_pending() {
                // the server skips it if an earlier message of the batch fails (a named statement's
                // Close pgtenant answers itself): wait for those replies before forgetting the
                // statement, or the unnamed portal, which pgtenant does not let a client run
                // unless it knows the client bound it (`execute`)
                return Step::Hold;
            }
            let named = kind == b'S' && !name.is_empty();
            let known = named && self.statements.get(name).is_some();
            self.statements.close(kind, name);
            if known || (named && self.pooling) {
                return Step::ClosedLocally; // the server copy stays cached on its backends
            }
            // In session pooling a name the client has no statement of may be one its SQL
            // `PREPARE` made on its own backend: the server closes that (as directly). In
            // transaction pooling there is none (SQL `PREPARE` is refused) and nothing to close.
        }
        // neither fails in an aborted transaction the way the context would: effect unknown
        Step::Run(Plan { setup, ..Default::default() })
    }

    /// A Query inside a batch that failed: the server skips it, as it skips everything up to the
    /// client's Sync, so it changes nothing pgtenant keeps (no session SET to keep, no statement
    /// dropped, no DISCARD ALL answered here). The guard still reads it: it goes to the server
    /// only if it could run there.
    fn skipped_query(&self, a: &sql::analyze::Analysis, q: &[u8]) -> Step {
        if let Err(e) = self.guard.check_statements(&a.statements, self.pos) {
            return Refusal::audited(e, "guard", q);
        }
        if self.pooling {
            if let Err(e) = sql::pooling::check_statements(&a.statements, self.pos.in_block) {
                return Refusal::audited(e, "pooling", q);
            }
        }
        Step::Run(Plan::default())
    }

    /// Session-level settings are kept per client: they count against the same budget as its
    /// statements.
    fn check_settings_budget(&self, changes: &[Change]) -> Result<(), PgError> {
        check_settings_budget(changes, self.budget, self.statements.bytes())
    }
}

/// The server's answer to an Execute of the unnamed portal when there is none.
fn no_unnamed_portal() -> PgError {
    PgError::error(sqlstate::UNDEFINED_CURSOR, "portal \"\" does not exist")
}

/// The server's answer to a Bind or Describe of the unnamed statement when there is none.
fn no_unnamed_statement() -> PgError {
    PgError::error(sqlstate::UNDEFINED_PSTATEMENT, "unnamed prepared statement does not exist")
}

/// Whether `changes` fit the session-state budget beside `statement_bytes` of statements, and the
/// context statement's number of settings.
pub fn check_settings_budget(changes: &[Change], budget: Budget<'_>, statement_bytes: usize) -> Result<(), PgError> {
    let count = budget.settings.count_after(changes);
    if count > MAX_CONTEXT_SETTINGS && count > budget.settings.count_after(&[]) {
        return Err(PgError::error(
            sqlstate::PROGRAM_LIMIT_EXCEEDED,
            format!("pgtenant: this session would carry more than {MAX_CONTEXT_SETTINGS} settings (tenant settings, startup parameters and SETs together)"),
        )
        .with_hint("RESET session settings you no longer need, or set them with SET LOCAL inside the transaction"));
    }
    let adding: usize = changes
        .iter()
        .map(|c| match c {
            Change::Set(n, v) => n.len() + v.len(),
            _ => 0,
        })
        .sum();
    if budget.settings.bytes() + statement_bytes + adding > budget.max {
        return Err(budget_error("settings and prepared statements", budget.max));
    }
    Ok(())
}

/// The error for a Parse that would take the client past its statement limits.
fn state_limit_error(full: statements::Full, max: usize) -> PgError {
    match full {
        statements::Full::Count => PgError::error(
            sqlstate::PROGRAM_LIMIT_EXCEEDED,
            format!("pgtenant: too many prepared statements (limit {})", statements::MAX_STATEMENTS),
        )
        .with_hint("close statements you no longer use"),
        statements::Full::Bytes => budget_error("prepared statements", max),
    }
}

fn budget_error(what: &str, max: usize) -> PgError {
    PgError::error(
        sqlstate::PROGRAM_LIMIT_EXCEEDED,
        format!("pgtenant: this session's {what} would take more than {max} bytes (server.max_session_state_bytes)"),
    )
    .with_hint("close prepared statements you no longer use, or raise server.max_session_state_bytes in the pgtenant config")
}

/// A FunctionCall of a function `tenant.allowed_function_calls` does not list.
pub fn function_call_refused(oid: u32) -> PgError {
    PgError::error(
        sqlstate::INSUFFICIENT_PRIVILEGE,
        format!("pgtenant: FunctionCall messages are not allowed for function OID {oid}: it is not listed in tenant.allowed_function_calls"),
    )
    .with_hint("call the function from SQL (SELECT fn(...)), or ask the operator to list it in tenant.allowed_function_calls")
}

/// Statement and portal names starting with `pgtenant` belong to pgtenant.
pub fn reserved_name(name: &[u8]) -> bool {
    name.len() >= 8 && name[..8].eq_ignore_ascii_case(b"pgtenant")
}

fn reserved_name_error() -> PgError {
    PgError::error(
        sqlstate::INSUFFICIENT_PRIVILEGE,
        "pgtenant: prepared statement and portal names starting with \"pgtenant\" are reserved",
    )
}

/// The server's error for a Bind of statement `name` (with `params` parameters) whose counts do
/// not fit, in the order it checks them (`params` unknown: the format count only). pgtenant
/// answers it itself: anything it sends in front of the Bind (the context, a Parse to prepare the
/// statement on this backend) would fail first in an aborted transaction, with 25P02.
pub(super) fn bind_count_error(body: &[u8], name: &[u8], params: Option<usize>) -> Option<PgError> {
    let (formats, values) = peek::bind_counts(body)?;
    let message = if formats > 1 && formats != values {
        format!("bind message has {formats} parameter formats but {values} parameters")
    } else if let Some(params) = params.filter(|&p| p != usize::from(values)) {
        format!("bind message supplies {values} parameters, but prepared statement \"{}\" requires {params}", String::from_utf8_lossy(name))
    } else {
        return None;
    };
    Some(PgError::error(sqlstate::PROTOCOL_VIOLATION, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TenantConfig;

    fn guard() -> Guard {
        let mut cfg = TenantConfig::default();
        cfg.settings.insert("app.tenant_id".into(), "tenant_id".into());
        Guard::from_config(&cfg)
    }

    fn frame(tag: u8, body: &[u8]) -> Frame {
        let mut b = vec![tag];
        b.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        b.extend_from_slice(body);
        Frame { tag, bytes: Bytes::from(b) }
    }

    fn run(c: &mut Classifier<'_>, tag: u8, body: &[u8]) -> Step {
        c.classify(&frame(tag, body)).unwrap_or_else(|_| panic!("malformed"))
    }

    fn classifier<'a>(g: &'a Guard, s: &'a mut Statements, in_block: bool) -> Classifier<'a> {
        Classifier {
            guard: g,
            statements: s,
            pos: Position { in_block },
            pooling: true,
            batch: Batch::Closed,
            unsettled: false,
            pos_unknown: false,
            skipping: false,
            replies: None,
            budget: Budget { max: 1 << 20, settings: Box::leak(Box::new(ClientSettings::new(Vec::new(), Vec::new(), Default::default()))) },
            function_calls: false,
        }
    }

    #[test]
    fn queries() {
        let g = guard();
        let mut s = Statements::default();
        let mut c = classifier(&g, &mut s, false);
        let Step::Run(p) = run(&mut c, b'Q', b"select * from orders\0") else { panic!() };
        assert_eq!((p.effect, p.conn.leaves, p.setup), (Some(TxEffect::None), Leaves::Nothing, false));
        let Step::Run(p) = run(&mut c, b'Q', b"insert into t values (1)\0") else { panic!() };
        assert!(p.conn.leaves == Leaves::Sequences && !p.conn.touches_prepared);
        let Step::Run(p) = run(&mut c, b'Q', b"select prepared_at from t\0") else { panic!() };
        assert!(!p.conn.touches_prepared, "a column name is not PREPARE");
        let Step::Run(p) = run(&mut c, b'Q', b"BEGIN ISOLATION LEVEL SERIALIZABLE\0") else { panic!() };
        assert!(p.setup && p.effect == Some(TxEffect::Begin));
        let Step::Run(p) = run(&mut c, b'Q', b"SET work_mem = '8MB'\0") else { panic!() };
        assert_eq!(p.changes, Some(vec![Change::Set("work_mem".into(), "8MB".into())]));
        let Step::Run(p) = run(&mut c, b'Q', b"COMMIT AND CHAIN\0") else { panic!() };
        assert!(p.chain);
        assert!(matches!(run(&mut c, b'Q', b"DISCARD ALL\0"), Step::DiscardAll));
        assert!(matches!(run(&mut c, b'Q', b"select set_config('app.tenant_id', '2', true)\0"), Step::Refuse(Refusal { audit: Some(("guard", _)), .. })));
        assert!(matches!(run(&mut c, b'Q', b"LISTEN x\0"), Step::Refuse(Refusal { audit: Some(("pooling", _)), .. })));
        assert!(matches!(run(&mut c, b'Q', b"commit; select 1\0"), Step::Refuse(_)));
        c.unsettled = true;
        assert!(matches!(run(&mut c, b'Q', b"commit; select 1\0"), Step::Hold));
    }

    #[test]
    fn a_query_inside_a_batch_waits_for_its_answers_then_changes_nothing_if_it_failed() {
        let g = guard();
        let mut s = Statements::default();
        s.parse(b"", b"select 1", Bytes::from_static(b"select 1\0\0\0"), 1 << 20).expect("room");
        let mut replies = Replies::default();
        replies.expect(super::super::replies::Want::ParseComplete, false, false); // an unsynced Parse, unanswered
        let mut c = classifier(&g, &mut s, false);
        c.replies = Some(&replies);
        assert!(matches!(run(&mut c, b'Q', b"SET work_mem = '8MB'\0"), Step::Hold), "the batch may still fail");
        // answered with an error: the server skips the Query, as everything up to the Sync
        c.replies = None;
        c.skipping = true;
        let Step::Run(p) = run(&mut c, b'Q', b"SET work_mem = '8MB'\0") else { panic!() };
        assert_eq!(p.changes, None, "a skipped SET is not kept");
        assert!(matches!(run(&mut c, b'Q', b"DISCARD ALL\0"), Step::Run(_)), "the server skips it: not answered here");
        assert!(matches!(run(&mut c, b'Q', b"select set_config('app.tenant_id', '2', true)\0"), Step::Refuse(_)), "still read by the guard");
        assert!(s.statement(b"").is_some(), "the server keeps its unnamed statement");
    }

    #[test]
    fn discard_all_inside_a_batch_is_answered_here_only_where_the_server_runs_it() {
        let g = guard();
        let mut s = Statements::default();
        let mut c = classifier(&g, &mut s, true); // a batch is open: "inside" for the guard
        c.batch = Batch::Open { began_idle: Some(true), executed: false };
        assert!(matches!(run(&mut c, b'Q', b"DISCARD ALL\0"), Step::DiscardAll), "no Execute in the batch: the server runs it");
        c.unsettled = true;
        assert!(matches!(run(&mut c, b'Q', b"DISCARD ALL\0"), Step::Hold), "its replies first");
        c.unsettled = false;
        c.batch = Batch::Open { began_idle: Some(true), executed: true };
        assert!(matches!(run(&mut c, b'Q', b"DISCARD ALL\0"), Step::Run(_)), "after an Execute: the server refuses it (a pipeline)");
        c.batch = Batch::Open { began_idle: Some(false), executed: false };
        assert!(matches!(run(&mut c, b'Q', b"DISCARD ALL\0"), Step::Run(_)), "in a block: the server refuses it");
    }

    #[test]
    fn deallocate_drops_client_statements_only_where_the_server_runs_it() {
        let g = guard();
        let mut s = Statements::default();
        let mut c = classifier(&g, &mut s, false);
        run(&mut c, b'P', b"s1\0select 1\0\0\0");
        let Step::Run(p) = run(&mut c, b'P', b"d1\0DEALLOCATE s1\0\0\0") else { panic!() };
        assert!(p.dealloc.is_none() && p.deallocates.is_none(), "parsed, it drops nothing");
        let Step::Run(p) = run(&mut c, b'B', b"p1\0d1\0\0\0\0\0\0\0") else { panic!() };
        assert!(p.binds_deallocate);
        c.unsettled = true;
        assert!(matches!(run(&mut c, b'E', b"p1\0\0\0\0\0"), Step::Hold), "its portal and its batch first");
        assert!(matches!(run(&mut c, b'Q', b"DEALLOCATE s1\0"), Step::Hold), "the same as a Query");
        c.unsettled = false;
        let mut failed = Replies::default();
        failed.status = b'E';
        c.replies = Some(&failed);
        let Step::Run(p) = run(&mut c, b'E', b"p1\0\0\0\0\0") else { panic!() };
        assert!(p.deallocates.is_none(), "in a failed block the server refuses it");
        let Step::Run(p) = run(&mut c, b'Q', b"DEALLOCATE s1\0") else { panic!() };
        assert!(p.dealloc.is_none());
        let Step::Run(_) = run(&mut c, b'Q', b"DEALLOCATE ALL\0") else { panic!() };
        assert!(c.statements.get(b"s1").is_some(), "nothing dropped in a failed block");
        c.replies = None;
        let Step::Run(p) = run(&mut c, b'E', b"p1\0\0\0\0\0") else { panic!() };
        assert!(matches!(p.deallocates, Some(statements::Deallocates::One(ref n)) if n.as_ref() == "s1"));
        let Step::Run(p) = run(&mut c, b'Q', b"DEALLOCATE s1\0") else { panic!() };
        assert!(p.dealloc.is_some(), "sent rewritten");
    }

    #[test]
    fn statements_and_portals() {
        let g = guard();
        let mut s = Statements::default();
        let mut c = classifier(&g, &mut s, false);
        let Step::Run(p) = run(&mut c, b'P', b"s1\0BEGIN READ ONLY\0\0\0") else { panic!() };
        assert!(p.setup);
        let Step::Run(p) = run(&mut c, b'B', b"\0s1\0\0\0\0\0\0\0") else { panic!() };
        assert!(p.setup && p.effect == Some(TxEffect::Begin));
        let Step::Run(p) = run(&mut c, b'D', b"P\0") else { panic!() };
        assert!(p.setup, "Describe of a setup portal");
        let Step::Run(p) = run(&mut c, b'E', b"\0\0\0\0\0") else { panic!() };
        assert!(p.setup);
        assert!(matches!(run(&mut c, b'C', b"Ss1\0"), Step::ClosedLocally));
        assert!(matches!(run(&mut c, b'P', b"pgtenant_x\0select 1\0\0\0"), Step::Refuse(_)));
        // DISCARD ALL by Execute: only first in a batch that began outside a block
        run(&mut c, b'P', b"\0DISCARD ALL\0\0\0");
        run(&mut c, b'B', b"\0\0\0\0\0\0\0\0");
        assert!(matches!(run(&mut c, b'E', b"\0\0\0\0\0"), Step::DiscardAll));
        c.batch = Batch::Open { began_idle: Some(true), executed: true };
        assert!(matches!(run(&mut c, b'E', b"\0\0\0\0\0"), Step::Run(_)));
        // FunctionCall only when the pool allows some
        assert!(matches!(run(&mut c, b'F', &[0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), Step::Refuse(_)));
    }

    /// An unnamed Parse's body: `sql`, then `types`.
    fn unnamed_parse(sql: &str, types: &[u32]) -> Vec<u8> {
        let mut b = vec![0];
        b.extend_from_slice(sql.as_bytes());
        b.push(0);
        b.extend_from_slice(&(types.len() as i16).to_be_bytes());
        for t in types {
            b.extend_from_slice(&t.to_be_bytes());
        }
        b
    }

    /// Reusing the reading of an unnamed statement (`Statements::reparse_unnamed`) never changes a
    /// decision: a random sequence of unnamed Parses, at random positions, gets exactly the step
    /// (and records exactly the statement) that a session reading each of them afresh gets.
    /// Statements refused at one position and not at the other, refused everywhere, deciding
    /// `set_config` at Bind, touching prepared statements, and setup are all in the mix.
    #[test]
    fn reused_readings_decide_like_fresh_ones() {
        const TEXTS: &[&str] = &[
            "select * from orders where id = $1",
            "RESET ALL",
            "select set_config($1, $2, false)",
            "select set_config('app.tenant_id', '2', true)",
            "SET work_mem = '8MB'",
            "BEGIN READ ONLY",
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
            "COMMIT AND CHAIN",
            "insert into t values (1)",
            "DEALLOCATE s1",
            "DISCARD ALL",
            "PREPARE p AS select 1",
            "LISTEN x",
            "select 1; RESET ALL",
            "",
            "select $1::text",
        ];
        const TYPES: &[&[u32]] = &[&[], &[25], &[25, 25], &[23]];
        let g = guard();
        let mut memo = Statements::default();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let (mut reused, mut last) = (0, (TEXTS[0], TYPES[0], false));
        for _ in 0..5_000 {
            // half the time the same statement again, as clients send it
            if next(2) == 0 {
                last = (TEXTS[next(TEXTS.len())], TYPES[next(TYPES.len())], next(2) == 1);
            }
            let (sql, types, in_block) = last;
            let body = unnamed_parse(sql, types);
            let hit = memo.remembers(&body[1..], in_block);
            reused += usize::from(hit);
            let got = format!("{:?}", run(&mut classifier(&g, &mut memo, in_block), b'P', &body));
            let mut fresh = Statements::default();
            let want = format!("{:?}", run(&mut classifier(&g, &mut fresh, in_block), b'P', &body));
            assert_eq!(got, want, "{sql:?} {types:?} in_block={in_block} (reused: {hit})");
            let recorded = |s: &Statements| format!("{:?}", s.statement(b"").map(|d| (&d.key, d.effect, d.leaves, d.chain, &d.sets, d.setup, d.discard_all, &d.bind_checks)));
            if matches!(run(&mut classifier(&g, &mut Statements::default(), in_block), b'P', &body), Step::Run(_)) {
                assert_eq!(recorded(&memo), recorded(&fresh), "{sql:?} {types:?} in_block={in_block}");
            }
        }
        assert!(reused > 1_000, "the sequence reused readings {reused} times");
    }
}
