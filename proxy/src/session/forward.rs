//! The last step for a client message: writing it (and pgtenant's own messages around it) to the
//! backend. The context statement, client statement names mapped to server statements, refusals
//! answered the way the server answers a failed message, replies pgtenant gives itself, and the
//! session resets (`DISCARD ALL`, the client's transaction defaults).

use std::sync::Arc;

use bytes::BytesMut;

use super::classify::Refusal;
use super::context::Batch;
use super::replies::Want;
use super::statements::{self, StatementDef};
use super::{Flow, Session, UnnamedParse, NEXT_SESSION_ID};
use crate::error::{sqlstate, PgError};
use crate::pool::prepared;
use crate::protocol::frame::Frame;
use crate::protocol::tags::frontend as msg;
use crate::protocol::{build, peek};
use crate::sql;

impl Session {
    /// Writes the context statement in front of what follows (signed with the key in force).
    pub(super) fn inject(&mut self) {
        if let Some(signer) = self.shared.signer.changed(&mut self.signer_gen) {
            self.settings.set_signer(signer); // reloaded: sign with the new key
            self.injection = self.settings.injection();
        }
        let lease = self.lease.as_mut().expect("attached before the context");
        self.injection.write(&mut self.backend_out, &mut lease.backend, &mut self.replies);
        crate::metrics::hot().context_injections.increment(1);
        self.needs_context = false;
    }

    /// Forwards a message, mapping client statement names to server statements on this backend
    /// (preparing them there first when needed).
    pub(super) fn forward_rewritten(&mut self, f: &Frame, simple: bool) {
        let body = f.body();
        if matches!(f.tag, msg::BIND | msg::DESCRIBE) && !self.unnamed_here() {
            self.ensure_unnamed_here(f);
        }
        let named = match f.tag {
            msg::PARSE => peek::parse_msg(body).map(|(n, _)| n),
            msg::BIND => peek::bind_msg(body).map(|(_, s)| s),
            msg::DESCRIBE => peek::target_msg(body).filter(|(k, _)| *k == b'S').map(|(_, n)| n),
            _ => None,
        }
        // the unnamed statement goes as it is, unless it has set_config parameters (see `bind`)
        .filter(|n| !n.is_empty() || self.statements.unnamed_has_bind_checks());
        let Some(name) = named.filter(|_| self.lease.is_some()) else {
            return self.forward(f, simple);
        };
        let Some(def) = self.statements.statement(name).cloned() else {
            return self.forward(f, simple); // unknown statement: the server answers 26000
        };
        if self.replies.batch_failed {
            return; // the server skips everything up to Sync
        }
        if f.tag == msg::DESCRIBE && self.describe_locally(&def) {
            return;
        }
        let lease = self.lease.as_mut().expect("checked above");
        // the client's own Parse always reaches the server, and a statement is shared only with
        // clients that parsed before it was prepared (a schema change in between fails an older
        // one: see `pool::prepared`)
        let since = if f.tag == msg::PARSE { u64::MAX } else { def.parsed_at };
        let p = lease.backend.statements().prepare(&def.key, since);
        for evict in &p.evict {
            prepared::target_frame(&mut self.backend_out, msg::CLOSE, evict);
            self.replies.expect(Want::CloseComplete, true, false);
        }
        let out = &mut self.backend_out;
        match f.tag {
            msg::PARSE => {
                prepared::parse_frame(out, &p.name, &def.key);
                self.replies.expect_parse(false, p.id);
                self.client_parses.push((p.id, bytes::Bytes::copy_from_slice(name), self.syncs_sent));
                if !name.is_empty() {
                    self.learn_description(&p.name, &def);
                }
                return;
            }
            _ if p.needs_parse => {
                prepared::parse_frame(out, &p.name, &def.key);
                self.replies.expect_parse(true, p.id);
            }
            _ => {}
        }
        // an error about this message names the server statement: the client is told its own name
        self.note_renamed(p.id, f.bytes.slice_ref(name));
        if f.tag == msg::BIND {
            let (portal, stmt) = peek::bind_msg(body).expect("checked above");
            prepared::rewrite_bind(&mut self.backend_out, body, portal.len(), stmt.len(), &p.name);
            self.replies.expect(Want::BindComplete, false, false);
        } else {
            prepared::target_frame(&mut self.backend_out, msg::DESCRIBE, &p.name);
            self.replies.expect(Want::Description, false, false);
        }
    }

    /// Sends a client's `DEALLOCATE name` Query as `DEALLOCATE` of what the name stands for on this
    /// backend (`deallocate_target`), so the client gets the server's own reply; the statement
    /// leaves the client's list and this backend's cache. (A `DEALLOCATE` parsed by the extended
    /// protocol is resolved when its portal runs: `rebind_deallocate`.)
    pub(super) fn forward_deallocate(&mut self, f: &Frame, def: &statements::StatementDef) {
        let Some(lease) = self.lease.as_mut() else { return self.forward(f, true) };
        if self.replies.batch_failed {
            return;
        }
        if let Some(name) = sql::deallocate_name(peek_sql(f)) {
            self.statements.close(b'S', name.as_bytes());
        }
        let server = Self::deallocate_target(lease, &mut self.backend_out, &mut self.replies, def);
        build::query(&mut self.backend_out, &format!("DEALLOCATE {server}"));
        self.replies.expect(Want::Ready, false, true);
    }

    /// Forwards a message (`forward_rewritten`) with what a portal bound to a `DEALLOCATE` needs
    /// (`Plan::deallocates`, `Plan::binds_deallocate`): at its Execute, whether the portal is still
    /// there (else it drops nothing: the server answers 34000) and the rebinding to what the name
    /// stands for now; at its Bind, the note that lets that Execute tell (`dealloc_portals`).
    pub(super) fn forward_with_deallocates(
        &mut self,
        f: &Frame,
        deallocates: &mut Option<statements::Deallocates>,
        binds_deallocate: bool,
        simple: bool,
        skipping: bool,
    ) {
        if deallocates.is_some() && self.dealloc_portal_ended(f) {
            *deallocates = None;
        }
        if let Some(statements::Deallocates::One(name)) = deallocates {
            if let (Some(def), Some(portal)) = (self.statements.get(name.as_bytes()).cloned(), peek::execute_msg(f.body())) {
                self.rebind_deallocate(portal, &def);
            }
        }
        self.forward_rewritten(f, simple);
        if binds_deallocate && !skipping {
            if let Some((portal, _)) = peek::bind_msg(f.body()) {
                if self.dealloc_portals.len() >= 64 {
                    self.dealloc_portals.remove(0); // bounded: a client binding this many is its own problem
                }
                self.dealloc_portals.push((bytes::Bytes::copy_from_slice(portal), self.replies.next_seq().wrapping_sub(1)));
            }
        }
    }

    /// Portals do not outlive their transaction: pgtenant's table of them, and the list of those
    /// bound to a `DEALLOCATE`.
    pub(super) fn portals_ended(&mut self) {
        self.statements.transaction_ended();
        self.dealloc_portals.clear();
    }

    /// An Execute of a portal bound to `DEALLOCATE name`, where `name` is the client's statement
    /// `def`: the portal was bound to the statement as the client wrote it (which names no server
    /// statement), so it is bound again, to `DEALLOCATE <server statement>`, right before the
    /// Execute, all replies but the Execute's swallowed. The server then drops the statement the
    /// name stands for at the moment it runs, as it would directly; had the client no such
    /// statement, the Execute goes as it is and the server says so (26000, in the client's words).
    /// Sent only once everything sent before it is answered (`Classifier::execute` holds it), and
    /// only for a portal no `Sync` has ended since its Bind (`dealloc_portal_ended`), in a batch
    /// and a block that have not failed: so the portal exists.
    pub(super) fn rebind_deallocate(&mut self, portal: &[u8], def: &statements::StatementDef) {
        let Some(lease) = self.lease.as_mut() else { return };
        if self.replies.batch_failed {
            return;
        }
        let server = Self::deallocate_target(lease, &mut self.backend_out, &mut self.replies, def);
        let out = &mut self.backend_out;
        close_portal_raw(out, portal);
        self.replies.expect(Want::CloseComplete, true, false);
        prepared::target_frame(out, msg::CLOSE, DEALLOCATE_REBIND); // none left by a failed batch
        self.replies.expect(Want::CloseComplete, true, false);
        build::parse(out, DEALLOCATE_REBIND, &format!("DEALLOCATE {server}"), vec![]);
        self.replies.expect(Want::ParseComplete, true, false);
        bind_raw(out, portal, DEALLOCATE_REBIND.as_bytes());
        self.replies.expect(Want::BindComplete, true, false);
        prepared::target_frame(out, msg::CLOSE, DEALLOCATE_REBIND);
        self.replies.expect(Want::CloseComplete, true, false);
    }

    /// An Execute of a portal bound to a `DEALLOCATE`, sent once everything before it is answered:
    /// whether the server ended that portal since its Bind (its transaction ended at a `Sync`
    /// while later messages were in flight, so pgtenant's table of portals still has it).
    pub(super) fn dealloc_portal_ended(&self, f: &Frame) -> bool {
        let Some(portal) = peek::execute_msg(f.body()) else { return false };
        match self.dealloc_portals.iter().rev().find(|(p, _)| p.as_ref() == portal) {
            Some((_, seq)) => self.replies.idle_since(*seq),
            None => false,
        }
    }

    /// What a `DEALLOCATE` of the client's statement `def` names on this backend: the server
    /// statement that holds it there (which this backend's cache then forgets), or, where it is not
    /// prepared, a stand-in of pgtenant's own prepared for it, so that the server's `DEALLOCATE`
    /// succeeds as it would directly (without preparing the client's text again, which could fail
    /// now where the client's statement exists).
    fn deallocate_target(
        lease: &mut crate::pool::Lease,
        out: &mut BytesMut,
        replies: &mut super::replies::Replies,
        def: &statements::StatementDef,
    ) -> String {
        let cache = lease.backend.statements();
        if let Some(id) = cache.fresh(&def.key, 0) {
            cache.forget(id);
            return prepared::server_name(id);
        }
        prepared::target_frame(out, msg::CLOSE, DEALLOCATE_STAND_IN); // none left by a failed batch
        replies.expect(Want::CloseComplete, true, false);
        build::parse(out, DEALLOCATE_STAND_IN, "SELECT", vec![]);
        replies.expect(Want::ParseComplete, true, false);
        DEALLOCATE_STAND_IN.to_string()
    }

    /// A Parse of a statement name the client already has. The server parses the text before it
    /// looks at the name, so the text goes to the server under a name of pgtenant's own (closed
    /// again at once, both replies swallowed): if it does not parse, the client gets the server's
    /// error and the batch is skipped as usual; if it does, a refusal stand-in follows and the
    /// client gets `err` (42P05) in its place.
    pub(super) fn check_duplicate(&mut self, key: &[u8], err: PgError) {
        if self.lease.is_none() || self.replies.batch_failed {
            return; // the server skips it
        }
        prepared::parse_frame(&mut self.backend_out, DUPLICATE_CHECK, key);
        self.replies.expect(Want::ParseComplete, true, false);
        prepared::target_frame(&mut self.backend_out, msg::CLOSE, DUPLICATE_CHECK);
        self.replies.expect(Want::CloseComplete, true, false);
        self.refuse(err, false);
    }

    /// Remembers that the message about to be forwarded names server statement `id` for the
    /// client's statement `name` (see `Session::renamed`). Entries whose replies have all arrived
    /// are dropped first, so a client that pipelines without pause does not grow the list.
    fn note_renamed(&mut self, id: u64, name: bytes::Bytes) {
        while self.renamed.front().is_some_and(|r| self.replies.answered(r.0)) {
            self.renamed.pop_front();
        }
        self.renamed.push_back((self.replies.next_seq(), id, name));
    }

    /// Remembers which unnamed statement the client's unnamed Parse `seq` recorded (`set`) and
    /// which it replaced (`before`), until its answer: if the server skips it, `before` is the
    /// client's again (`unnamed_parse_failed`).
    fn note_unnamed_parse(&mut self, seq: u32, set: Option<Arc<StatementDef>>, before: Option<Arc<StatementDef>>) {
        while self.unnamed_parses.front().is_some_and(|r| self.replies.answered(r.seq)) {
            self.unnamed_parses.pop_front();
        }
        self.unnamed_parses.push_back(UnnamedParse { seq, set, before });
    }

    /// The client's unnamed Parse `seq` failed (`itself`: the server then has no unnamed statement)
    /// or was skipped (the server keeps the one it had). What it recorded is undone only where
    /// nothing replaced it since: a later unnamed Parse (raw, on the list, or with `set_config`
    /// parameters, sent under a server name) replaced what is the client's now.
    pub(super) fn unnamed_parse_failed(&mut self, seq: u32, itself: bool) {
        if self.unnamed_parsed == Some(seq) {
            self.unnamed_parsed = None; // the server's unnamed statement is not (or no longer) the client's
        }
        let Some(at) = self.unnamed_parses.iter().position(|r| r.seq == seq) else {
            if self.last_unnamed_parse == Some(seq) {
                self.statements.close(b'S', b"");
            }
            return;
        };
        let Some(p) = self.unnamed_parses.remove(at) else { return };
        let before = if itself { None } else { p.before };
        let same = |a: &Option<Arc<StatementDef>>, b: &Option<Arc<StatementDef>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        // a later unnamed Parse that replaced this one's statement replaced what this one did
        if let Some(next) = self.unnamed_parses.iter_mut().skip(at).find(|r| same(&r.before, &p.set)) {
            next.before = before;
        } else if same(&self.statements.statement(b"").cloned(), &p.set) {
            self.statements.restore_unnamed(before);
        }
    }

    /// A reply pgtenant gives itself, in order with the backend's replies.
    pub(super) fn synthetic(&mut self, tag: u8) {
        if self.lease.is_none() {
            debug_assert_ne!(tag, SYNTHETIC_DISCARD_ALL);
            push_empty_message(&mut self.client_out, tag); // nothing in flight: answer now
        } else if !self.replies.batch_failed {
            self.replies.expect_synthetic(tag);
            self.drain_synthetic();
        }
    }

    /// Sends the replies pgtenant gives itself that are next in line (after every backend
    /// message: inlined, as there is nearly never one).
    #[inline]
    pub(super) fn drain_synthetic(&mut self) {
        if self.replies.synthetic_next() {
            self.drain_synthetic_owed();
        }
    }

    fn drain_synthetic_owed(&mut self) {
        while let Some((tag, seq)) = self.replies.take_synthetic() {
            if tag == super::describe::SYNTHETIC_DESCRIPTION {
                self.push_description(seq);
            } else if tag == SYNTHETIC_DISCARD_ALL {
                push_discard_all(&mut self.client_out);
                for (name, value) in std::mem::take(&mut self.discard_reports) {
                    build::parameter_status(&mut self.client_out, &name, &value);
                }
            } else {
                push_empty_message(&mut self.client_out, tag);
            }
        }
    }

    /// A Bind or Describe of the client's unnamed statement (one without `set_config` parameters,
    /// which goes to the server as it is) in a batch that has not parsed it: the server's unnamed
    /// statement may not be the client's (another backend since, or a simple Query — the
    /// server drops its unnamed statement at each, pgtenant's own among them), so the client's is
    /// parsed again first, its ParseComplete swallowed.
    fn ensure_unnamed_here(&mut self, f: &Frame) {
        let unnamed = match f.tag {
            msg::BIND => peek::bind_msg(f.body()).is_some_and(|(_, s)| s.is_empty()),
            _ => peek::target_msg(f.body()).is_some_and(|(k, n)| k == b'S' && n.is_empty()),
        };
        if !unnamed || self.lease.is_none() || self.replies.batch_failed || self.statements.unnamed_has_bind_checks() {
            return;
        }
        let Some(def) = self.statements.statement(b"") else { return };
        prepared::parse_frame(&mut self.backend_out, "", &def.key);
        let seq = self.replies.next_seq();
        self.unnamed_parsed = Some(seq);
        self.replies.expect_parse(true, unnamed_parse_id(seq)); // a failure is seen (`unnamed_parse_failed`)
    }

    /// A utility statement sent as a simple Query that fails while it runs inside a transaction
    /// block (a COPY refused by row-level security, a failed COPY FROM STDIN, a SET of a bad value)
    /// leaves its portal behind under the unnamed portal's name, past the statement it points into,
    /// until the block ends; an Execute of it can crash PostgreSQL 15, and with it every connection
    /// of every tenant (docs/security.md, "Crashing the shared server"). `classify` refuses an
    /// Execute of an unnamed portal the client did not bind; this closes what such a Query left
    /// before the client's next message goes (covering a Bind of the unnamed portal that the server
    /// then skips in the failed block). No client portal is lost:
    /// each Query replaces the client's unnamed portal. Only where that is possible: the Query's
    /// answer is not in yet, or the block is failed; after a Query that ended well, or outside a
    /// block, nothing is sent.
    pub(super) fn close_query_portal(&mut self) {
        if !self.debts.query_portal || self.replies.copy_in || self.replies.batch_failed {
            return; // (in COPY or a failed batch the server would not read it: next time)
        }
        self.debts.query_portal = false;
        let failed_or_unknown = !self.replies.is_settled() || self.replies.status == b'E';
        if self.lease.is_some() && failed_or_unknown {
            build::close_portal(&mut self.backend_out, "");
            self.replies.expect(Want::CloseComplete, true, false);
        }
    }

    /// The server's unnamed statement is the client's: parsed on this backend (`unnamed_parsed`),
    /// in this batch (if that Parse fails, the server skips what uses it in the batch too), or in
    /// an earlier one that answered it (a failure, or a skip, forgets it: `unnamed_parse_failed`),
    /// with no simple Query since (a FunctionCall leaves it alone). Inside a failed block, parsing it again would fail
    /// (25P02) where the server's answer to a `Describe` is the statement's description.
    pub(super) fn unnamed_here(&self) -> bool {
        self.unnamed_parsed.is_some_and(|seq| {
            !self.replies.ready_sent_since(seq) || (self.replies.answered(seq) && !self.replies.query_sent_since(seq))
        })
    }

    pub(super) fn forward(&mut self, f: &Frame, simple: bool) {
        self.backend_out.extend_from_slice(&f.bytes);
        if let Some(want) = Want::for_frontend(f.tag) {
            // while the server skips to Sync, only the Sync itself is answered
            if !self.replies.batch_failed || f.tag == msg::SYNC {
                if f.tag == msg::PARSE && f.body().first() == Some(&0) {
                    // the client's unnamed statement: if this Parse fails, the client has none;
                    // if it is skipped, the one it had (`unnamed_parse_failed`)
                    let seq = self.replies.next_seq();
                    self.replies.expect_parse(false, unnamed_parse_id(seq));
                    self.last_unnamed_parse = Some(seq);
                    self.unnamed_parsed = Some(seq);
                    let before = self.statements.take_unnamed_before();
                    let set = self.statements.statement(b"").cloned();
                    self.note_unnamed_parse(seq, set, before);
                } else if f.tag == msg::FUNCTION_CALL {
                    self.replies.expect_function_call();
                } else {
                    self.replies.expect(want, false, simple);
                }
            }
        }
    }

    /// A refusal `classify` decided, recorded in the audit log when it names a rule.
    pub(super) async fn refuse_with(&mut self, r: Refusal, simple: bool) -> Flow {
        match r.audit {
            Some((rule, sql)) => self.refuse_statement(r.err, &sql, rule, simple).await,
            None => self.refuse(r.err, simple),
        }
    }

    /// Answers a refused message the way the server answers a failed one. With no backend attached
    /// pgtenant answers itself; otherwise it sends a stand-in that fails on the server (so an open
    /// transaction aborts and the rest of the batch is skipped exactly as for a real error) and
    /// replaces the server's error with the refusal.
    pub(super) fn refuse(&mut self, err: PgError, simple: bool) -> Flow {
        tracing::info!(code = err.code, message = %err.message, "refused client message");
        ::metrics::counter!(crate::metrics::REFUSALS, "sqlstate" => err.code).increment(1);
        if self.lease.is_none() {
            err.encode(&mut self.client_out);
            if simple {
                build::ready_for_query(&mut self.client_out, b'I');
            } else {
                self.batch = Batch::Skipping;
            }
            return Flow::Continue;
        }
        if self.replies.batch_failed {
            // the server skips the rest of this batch, a Query or FunctionCall too: no reply
            return Flow::Continue;
        }
        self.since_exact.failing_sent(self.replies.status);
        if simple {
            build::query(&mut self.backend_out, REFUSAL_STAND_IN);
            self.simple_inside_a_batch(); // as the refused Query or FunctionCall would
        } else {
            build::parse(&mut self.backend_out, "pgtenant_refused", REFUSAL_STAND_IN, vec![]);
            if !self.batch.is_open() {
                self.batch = Batch::Open { began_idle: Some(!self.position().in_block), executed: false };
            }
        }
        self.replies.expect_refusal(simple, err);
        if !simple {
            // the stand-in fails for certain: the server skips the rest of the batch, and what
            // follows in it is classified as skipped (it records nothing) from here on
            self.replies.batch_failed = true;
        }
        Flow::Continue
    }

    /// `DISCARD ALL` outside a transaction: pgtenant's pools and drivers send it to reset a
    /// session. The client becomes a fresh virtual session: its statements and settings are
    /// forgotten and any backend it left state on is reset before anyone (itself included) uses it
    /// again. The server cannot run it itself (pgtenant's context makes every transaction a
    /// pipeline), so pgtenant answers: at once for a simple Query (nothing is in flight), in order
    /// with the batch's other replies for an Execute (the first of a batch that began outside a
    /// transaction, as the server requires).
    pub(super) fn discard_all(&mut self, simple: bool) {
        self.statements.clear_statements();
        self.portals_ended();
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
        if self.batch.is_open() {
            // a Query inside an unsynced batch, as any other there (the next message waits for
            // the reset's answer, which closes the batch: `from_backend`)
            self.after_simple(false);
        }
        push_discard_all(&mut self.client_out);
        // only called with nothing in flight (outside a transaction, or inside a batch whose
        // replies are all in), so the answer goes out now
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
    pub(super) fn apply_tx_defaults(&mut self) {
        let Some(l) = self.lease.as_mut() else { return };
        if l.backend.has_tx_defaults(&self.tx_defaults) {
            return;
        }
        let sql = if self.tx_defaults.is_empty() { sql::txmode::RESET_DEFAULTS } else { &self.tx_defaults };
        build::query(&mut self.backend_out, sql);
        self.replies.expect(Want::Ready, true, true);
        l.backend.set_tx_defaults(&self.tx_defaults);
    }
}

/// The id under which `Replies` reports a failed client Parse of its unnamed statement: the
/// reply's number (`Replies::next_seq`) in a range of its own (server statements count up from 0;
/// pgtenant's own statements sit at the top of the range, see `inject`).
pub(super) fn unnamed_parse_id(seq: u32) -> u64 {
    UNNAMED_PARSES | u64::from(seq)
}

/// The reply number in an id from [`unnamed_parse_id`], if it is one.
pub(super) fn unnamed_parse_seq(id: u64) -> Option<u32> {
    (id >> 32 == UNNAMED_PARSES >> 32).then_some(id as u32)
}

const UNNAMED_PARSES: u64 = 0x100 << 32;

/// Fails on the server with a syntax error, which pgtenant replaces with its refusal.
const REFUSAL_STAND_IN: &str = "pgtenant refused this statement";

/// The server statement a duplicate Parse's text is checked under (`check_duplicate`).
const DUPLICATE_CHECK: &str = "pgtenant_duplicate_check";
/// The statement an Execute of `DEALLOCATE name` is bound to again (`Session::rebind_deallocate`).
const DEALLOCATE_REBIND: &str = "pgtenant_deallocate";
/// What a `DEALLOCATE` drops where the client's statement is not prepared on the backend
/// (`Session::deallocate_target`).
const DEALLOCATE_STAND_IN: &str = "pgtenant_deallocated";

/// `Close` of the client's portal `name` (any bytes).
fn close_portal_raw(out: &mut BytesMut, name: &[u8]) {
    use bytes::BufMut;
    out.put_u8(msg::CLOSE);
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(b'P');
    out.put_slice(name);
    out.put_u8(0);
}

/// `Bind` of portal `portal` to `statement`, without parameters, results in text.
fn bind_raw(out: &mut BytesMut, portal: &[u8], statement: &[u8]) {
    use bytes::BufMut;
    out.put_u8(msg::BIND);
    out.put_i32((4 + portal.len() + 1 + statement.len() + 1 + 6) as i32);
    out.put_slice(portal);
    out.put_u8(0);
    out.put_slice(statement);
    out.put_u8(0);
    out.put_slice(&[0; 6]); // no parameter formats, no parameters, no result formats
}

/// The SQL text of a Query or Parse frame.
fn peek_sql(f: &Frame) -> &[u8] {
    match f.tag {
        msg::QUERY => peek::query_msg(f.body()).unwrap_or_default(),
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
pub(super) fn modes_then_work_error() -> PgError {
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

