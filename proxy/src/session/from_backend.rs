//! The backend → client direction: each backend message is matched against the replies owed
//! (`replies`), swallowed when it answers pgtenant's own statements, replaced when it is a refusal's
//! stand-in, and otherwise relayed untouched. Session-level settings are settled here once their
//! batch has ended cleanly.
//!
//! A DataRow or CopyData larger than `STREAM_MIN` that has not fully arrived is streamed, as
//! PgBouncer does: its header is relayed (or dropped) at once and its body piece by piece as it
//! is read, so a session holds at most a read buffer of it, whatever the row size. Every other
//! message is held whole (they are small), read where it lies in the receive buffer and relayed as
//! one.

use bytes::{Buf, BytesMut};

use super::context::Batch;
use super::replies::Action;
use super::{forward, inject, view, End, Session, MAX_BACKEND_MESSAGE, STREAM_MIN};
use crate::error::sqlstate;
use crate::protocol::frame::{complete_len, peek_len};
use crate::protocol::tags::backend as reply;
use crate::protocol::{build, peek};
use crate::sql;

impl Session {
    pub(super) fn process_backend_frames(&mut self) -> Result<(), End> {
        loop {
            if self.stream_left > 0 && !self.stream_piece() {
                return Ok(()); // the rest of the streamed message is still to come
            }
            if self.start_stream()? {
                continue;
            }
            let total = match complete_len(&mut self.backend_in, MAX_BACKEND_MESSAGE) {
                Ok(Some(total)) => total,
                Ok(None) => return Ok(()),
                Err(e) => return Err(End::BackendLost(format!("bad message from server: {e}"))),
            };
            let tag = self.backend_in[0];
            self.confirm_seq_reset(tag);
            let handled = self.on_backend_message(total);
            self.backend_in.advance(total);
            let Some(mark) = handled? else {
                continue; // a backend-side value the client does not have
            };
            self.drain_synthetic();
            if std::mem::take(&mut self.replies.own_query_skipped) {
                // a reset (or transaction defaults) the server skipped: the backend's state is not
                // what pgtenant recorded, so it gets the full reset before anyone uses it again
                if let Some(l) = self.lease.as_mut() {
                    l.backend.reset_skipped();
                }
                self.debts.reset = true;
            }
            let mut unnamed_failures: Vec<(u32, bool)> = Vec::new();
            if !self.replies.failed_prepares.is_empty() {
                if let Some(l) = self.lease.as_mut() {
                    for (id, by_client) in self.replies.failed_prepares.drain(..) {
                        if let Some(seq) = forward::unnamed_parse_seq(id) {
                            unnamed_failures.push((seq, self.replies.failed_itself == Some(id)));
                            continue;
                        }
                        if id == inject::RESET_PARSE_ID {
                            l.backend.forget_reset_statement();
                            continue;
                        }
                        if let Some(arity) = inject::context_arity(id) {
                            // skipped in a batch that had already failed: prepare it again next time
                            l.backend.forget_context(arity);
                            continue;
                        }
                        let key = l.backend.statements().failed(id, self.replies.failed_itself == Some(id));
                        // the client's own Parse failed: like the server, keep no statement
                        let name = self.client_parses.iter().find(|(i, _, _)| *i == id).map(|(_, n, _)| n);
                        match (by_client, key, name) {
                            (true, Some(key), Some(name)) => self.statements.parse_failed(name, &key),
                            // the cache was cleared since (a DEALLOCATE or DISCARD in the same
                            // batch): the name still holds this Parse's statement (ids are not reused
                            // and a second Parse of a name records nothing)
                            (true, None, Some(name)) => self.statements.close(b'S', name),
                            _ => {}
                        }
                    }
                }
            }
            for (seq, itself) in unnamed_failures {
                self.unnamed_parse_failed(seq, itself);
            }
            if self.replies.is_settled() {
                self.client_parses.clear();
                self.renamed.clear();
                self.descriptions.settled();
            }
            if tag == reply::ERROR {
                self.pending.error();
            }
            if tag == reply::READY_FOR_QUERY && self.replies.is_settled() {
                if let Some(l) = self.lease.as_mut() {
                    l.backend.settled();
                }
                // Everything sent has been answered and the last answer is a ReadyForQuery: the
                // server is not skipping to a Sync (a Query or FunctionCall inside an unsynced
                // batch was answered, so that batch did not fail).
                self.batch = Batch::Closed;
                self.replies.batch_failed = false;
                self.settle_pending_sets(mark);
                if self.replies.status == b'I' {
                    self.portals_ended();
                    self.tx_since = None;
                    self.idle_since = None;
                }
            }
            self.start_idle_clock();
        }
    }

    /// Handles the whole message at the front of `backend_in` (`total` bytes) where it lies, with
    /// no `Frame` split off (every transaction relays several): what a server error or report
    /// says, then the message is relayed, swallowed or replaced as `replies` decides. Returns where
    /// its output to the client starts (reports owed for a ReadyForQuery go there), or `None` for a
    /// report the client must not see. The caller drops it from the buffer.
    fn on_backend_message(&mut self, total: usize) -> Result<Option<usize>, End> {
        self.note_description(self.backend_in[0], total);
        let msg = &self.backend_in[..total];
        let (tag, body) = (msg[0], &msg[5..]);
        if tag == reply::ERROR {
            // a server going away (shutdown, failover) ends the session with pgtenant's error
            if let Some(why) = self.pool.observe_error(body) {
                return Err(End::BackendLost(why));
            }
        }
        if tag == reply::PARAMETER_STATUS {
            if let Some(l) = self.lease.as_mut() {
                l.backend.note_report(body);
            }
            if !self.view.admit(body) {
                return Ok(None);
            }
        }
        let mark = self.client_out.len();
        let renamed = match tag {
            reply::ERROR if !self.renamed.is_empty() => {
                let seq = self.replies.front_seq();
                self.renamed.iter().find(|r| Some(r.0) == seq).map(|(_, id, client)| (crate::pool::prepared::server_name(*id), client.clone()))
            }
            _ => None,
        };
        match self.replies.on_reply(tag, body) {
            Action::Forward => match renamed.and_then(|(server, client)| with_client_name(msg, &server, &client)) {
                Some(out) => self.client_out.extend_from_slice(&out),
                None => relay(&mut self.client_out, msg),
            },
            Action::Swallow => {}
            Action::ReplaceError => match self.replies.take_replacement() {
                Some(err) => err.encode(&mut self.client_out),
                None => relay(&mut self.client_out, msg),
            },
            Action::ForwardThenSync => {
                relay(&mut self.client_out, msg);
                build::sync(&mut self.backend_out);
            }
            Action::Desync => {
                tracing::error!(tag = %(tag as char), "unexpected message from the server; closing the backend");
                return Err(End::BackendLost(format!("unexpected '{}' message from server", tag as char)));
            }
        }
        Ok(Some(mark))
    }

    /// Starts streaming the message at the front of `backend_in` if it is a DataRow or CopyData
    /// larger than `STREAM_MIN` that has not fully arrived: its header goes to the client now (or
    /// is dropped, for pgtenant's own statement), its body follows in `stream_piece`. Neither
    /// message completes a reply nor changes the transaction state, so nothing else is owed.
    fn start_stream(&mut self) -> Result<bool, End> {
        let b = &self.backend_in;
        if b.len() < 5 || !matches!(b[0], reply::DATA_ROW | reply::COPY_DATA) {
            return Ok(false);
        }
        let total = match peek_len(b, MAX_BACKEND_MESSAGE) {
            Ok(Some(total)) if total > STREAM_MIN && b.len() < total => total,
            Ok(_) => return Ok(false),
            Err(e) => return Err(End::BackendLost(format!("bad message from server: {e}"))),
        };
        let tag = b[0];
        self.stream_forward = match self.replies.on_reply(tag, &[]) {
            Action::Forward => true,
            Action::Swallow => false,
            _ => {
                tracing::error!(tag = %(tag as char), "unexpected message from the server; closing the backend");
                return Err(End::BackendLost(format!("unexpected '{}' message from server", tag as char)));
            }
        };
        if self.stream_forward {
            self.client_out.extend_from_slice(&self.backend_in[..5]);
        }
        self.backend_in.advance(5);
        self.stream_left = total - 5;
        Ok(true)
    }

    /// Relays (or drops) what has arrived of the message being streamed; true once all of it has.
    fn stream_piece(&mut self) -> bool {
        let n = self.stream_left.min(self.backend_in.len());
        if self.stream_forward {
            self.client_out.extend_from_slice(&self.backend_in[..n]);
        }
        self.backend_in.advance(n);
        self.stream_left -= n;
        self.stream_left == 0
    }

    /// Records session-level SETs on their way to the server (kept if they complete cleanly).
    pub(super) fn note_changes(&mut self, changes: &[sql::set::Change]) {
        self.view.mark_changing(changes);
        self.pending.note(changes);
    }

    /// Keeps the client's session-level SETs once their transaction has committed (see
    /// `pending`), and tells the client the parameters' new values in front of the output from `at`
    /// on (the ReadyForQuery), where the server puts its own reports.
    pub(super) fn settle_pending_sets(&mut self, at: usize) {
        let status = self.replies.status;
        let kept = self.pending.settle(status);
        if self.view.changing.is_empty() {
            return; // no SET since the transaction began: nothing kept, nothing to report
        }
        let backend = self.lease.as_ref().map(|l| &*l.backend);
        if let Some(changes) = kept {
            let changes = view::as_reported(changes, backend);
            self.settings.apply(&changes);
            self.injection = self.settings.injection();
            self.tx_defaults = self.settings.tx_defaults();
            self.view.applied = self.settings.applied();
        }
        let settings = &self.settings;
        let owed = self.view.owed_for_changing(self.pending.changes(), &|n| settings.kept(n).map(str::to_string), backend);
        if status == b'I' {
            self.view.changing.clear(); // inside a block they are still being changed
        }
        if !owed.is_empty() {
            let tail = self.client_out.split_off(at);
            for (name, value) in owed {
                build::parameter_status(&mut self.client_out, &name, &value);
            }
            self.client_out.extend_from_slice(&tail);
        }
    }

}

/// Appends a whole backend message to the client's output, with pgtenant's hint added to a
/// "cannot run inside a transaction block" error.
fn relay(out: &mut BytesMut, msg: &[u8]) {
    if msg[0] == reply::ERROR && peek::error_code(&msg[5..]) == Some(sqlstate::ACTIVE_SQL_TRANSACTION.as_bytes()) {
        if let Some(annotated) = annotate_in_transaction_error(msg) {
            out.extend_from_slice(&annotated);
            return;
        }
    }
    out.extend_from_slice(msg);
}

/// An error about a client's statement, sent under the server statement's name `server`: the
/// same error naming the client's statement (`"pgtenant_s3"` → `"s1"`), as the server would have
/// named it. None when the error does not name it.
fn with_client_name(msg: &[u8], server: &str, client: &[u8]) -> Option<BytesMut> {
    use pgwire::messages::response::ErrorResponse;
    use pgwire::messages::{DecodeContext, Message};
    let quoted = format!("\"{server}\"");
    if !msg.windows(quoted.len()).any(|w| w == quoted.as_bytes()) {
        return None;
    }
    let mut raw = BytesMut::from(msg);
    let mut err = ErrorResponse::decode(&mut raw, &DecodeContext::default()).ok()??;
    let theirs = format!("\"{}\"", String::from_utf8_lossy(client));
    for (k, v) in err.fields.iter_mut() {
        if matches!(*k, b'M' | b'D') {
            *v = v.replace(&quoted, &theirs);
        }
    }
    let mut out = BytesMut::new();
    err.encode(&mut out).ok()?;
    Some(out)
}

/// Adds a hint to "cannot run inside a transaction block" errors: pgtenant runs every statement
/// inside a transaction so that it carries the tenant context.
fn annotate_in_transaction_error(msg: &[u8]) -> Option<BytesMut> {
    use pgwire::messages::response::ErrorResponse;
    use pgwire::messages::{DecodeContext, Message};
    let mut raw = BytesMut::from(msg);
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
