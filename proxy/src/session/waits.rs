//! What a client message waits for before it goes to the backend. The server answers a batch's
//! messages in order and skips the rest of a batch after an error, so a message whose outcome
//! depends on an earlier one's (a statement prepared in an earlier, unanswered batch; the context
//! statement prepared there; the counts of a Bind whose statement may be gone) is held until that
//! answer is in, and pgtenant asks the server for it with a Flush.

use super::{classify, forward, msg, Session};
use crate::error::PgError;
use crate::protocol::build;
use crate::protocol::frame::Frame;

impl Session {
    /// A message waits for the replies to what went before it: ask the server for them (Flush).
    /// It keeps a batch's replies until a Sync or a Flush, and the batch may be open even where
    /// pgtenant counted it closed: a Sync the client sent during a COPY the server had started
    /// was ignored by the server (`Replies::enter_copy_in`). A Flush with nothing to flush costs
    /// the server nothing.
    pub(super) fn flush_for_hold(&mut self) {
        if !self.replies.is_settled() {
            build::flush(&mut self.backend_out);
        }
    }

    /// The server's error for a Bind whose parameter counts do not fit its statement
    /// (`classify::bind_count_error`), with the portal `classify` recorded for it closed again.
    /// Asked once the statement's Parse is answered (`statement_parse_in_flight`): if that was
    /// skipped, the server answers 26000 instead.
    pub(super) fn bind_counts_wrong(&mut self, f: &Frame) -> Option<PgError> {
        let (portal, stmt) = crate::protocol::peek::bind_msg(f.body())?;
        let def = self.statements.statement(stmt)?;
        let err = classify::bind_count_error(f.body(), stmt, def.params)?;
        self.statements.close(b'P', portal);
        Some(err)
    }

    /// A Bind or Describe of a statement whose Parse by the client went in an earlier batch and
    /// is not answered yet.
    pub(super) fn statement_parse_in_flight(&self, f: &Frame) -> bool {
        let name = match f.tag {
            msg::BIND => crate::protocol::peek::bind_msg(f.body()).map(|(_, s)| s),
            _ => crate::protocol::peek::target_msg(f.body()).filter(|(k, _)| *k == b'S').map(|(_, n)| n),
        };
        match name {
            None => false,
            Some([]) if !self.statements.unnamed_has_bind_checks() => {
                !self.unnamed_here()
                    && self.last_unnamed_parse.is_some_and(|seq| self.replies.preparing(forward::unnamed_parse_id(seq)))
            }
            Some(name) => {
                self.client_parses.iter().any(|(id, n, batch)| *batch != self.syncs_sent && n.as_ref() == name && self.replies.preparing(*id))
                    || self.server_statement_in_flight(name)
            }
        }
    }

    /// The context statement this session would use on its backend is being prepared in an earlier
    /// batch, not answered yet.
    pub(super) fn context_parse_in_flight(&self) -> bool {
        self.replies.parse_in_an_earlier_batch()
            && self.lease.as_ref().is_some_and(|l| self.replies.preparing_in_an_earlier_batch(self.injection.parse_id(&l.backend)))
    }

    /// The server statement a Bind or Describe of the client's statement `name` would use on this
    /// backend is being prepared in an earlier batch (by a Parse of the same text under another
    /// name, the client's or pgtenant's): if that Parse is skipped, the statement is not there.
    pub(super) fn server_statement_in_flight(&self, name: &[u8]) -> bool {
        if !self.replies.parse_in_an_earlier_batch() {
            return false;
        }
        let (Some(l), Some(def)) = (self.lease.as_ref(), self.statements.statement(name)) else { return false };
        l.backend.statements_ref().fresh(&def.key, def.parsed_at).is_some_and(|id| self.replies.preparing_in_an_earlier_batch(id))
    }
}
