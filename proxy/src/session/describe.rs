//! A `Describe` of a client's named statement where pgtenant cannot prepare it.
//!
//! pgtenant prepares a client's named statements on whichever backend its transaction runs on
//! (`forward_rewritten`). Inside a failed transaction block the server refuses every Parse
//! (25P02), yet it still answers a `Describe` of a statement that returns no rows —
//! ParameterDescription, then NoData: that needs no catalog access. A client that describes such a
//! statement there, on a backend that has not prepared it, would get pgtenant's Parse's error
//! instead. So pgtenant learns each named statement's answer once, from a `Describe` it sends behind
//! the client's own `Parse` (its replies swallowed), and answers such a `Describe` itself, in its
//! turn among the replies. A statement that returns rows is not described there by the server
//! either (25P02), which is what pgtenant's Parse answers.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use super::context::Block;
use super::replies::Want;
use super::statements::{Described, StatementDef};
use super::Session;
use crate::pool::prepared;
use crate::protocol::frame::Frame;
use crate::protocol::peek;
use crate::protocol::tags::{backend as reply, frontend as msg};

/// The largest ParameterDescription kept (62 parameters): a statement's description is not counted
/// in the session's byte budget (`server.max_session_state_bytes`), and `$65535` alone would make
/// it 256 KiB. A larger one is not kept: such a `Describe` goes as before (a Parse first).
const MAX_KEPT: usize = 256;

/// The synthetic reply that stands for a description pgtenant gives itself (`describe_locally`).
pub(super) const SYNTHETIC_DESCRIPTION: u8 = reply::PARAMETER_DESCRIPTION;

/// Descriptions being learnt, and those owed to the client.
#[derive(Debug, Default)]
pub(super) struct Descriptions {
    /// pgtenant's Describes not answered yet: (reply number, the client's statement).
    learning: VecDeque<(u32, Arc<StatementDef>)>,
    /// The ParameterDescription of the first of them, until its NoData or RowDescription.
    params: Option<Bytes>,
    /// Descriptions pgtenant answers itself, by reply number (`Want::Synthetic`).
    answers: VecDeque<(u32, Bytes)>,
}

impl Descriptions {
    /// Everything sent is answered: a Describe still listed was skipped, an answer dropped.
    pub(super) fn settled(&mut self) {
        if !self.learning.is_empty() || !self.answers.is_empty() {
            *self = Descriptions::default();
        }
    }
}

impl Session {
    /// Sends a Describe of server statement `name`, just parsed for the client's statement `def`,
    /// unless its answer is known already.
    pub(super) fn learn_description(&mut self, name: &str, def: &Arc<StatementDef>) {
        if def.described.get().is_some() {
            return;
        }
        prepared::target_frame(&mut self.backend_out, msg::DESCRIBE, name);
        self.descriptions.learning.push_back((self.replies.next_seq(), def.clone()));
        self.replies.expect(Want::Description, true, false);
    }

    /// Sees each backend message (`total` bytes at the front of `backend_in`) before it is relayed
    /// or swallowed: the answer to one of pgtenant's Describes is kept on its statement.
    #[inline]
    pub(super) fn note_description(&mut self, tag: u8, total: usize) {
        if !self.descriptions.learning.is_empty() {
            self.note_description_reply(tag, total);
        }
    }

    fn note_description_reply(&mut self, tag: u8, total: usize) {
        let Some(front) = self.replies.front_seq() else { return };
        let d = &mut self.descriptions;
        // a Describe whose turn has passed was skipped (its Parse failed)
        while d.learning.front().is_some_and(|(seq, _)| *seq != front && self.replies.answered(*seq)) {
            d.learning.pop_front();
            d.params = None;
        }
        if d.learning.front().is_none_or(|(seq, _)| *seq != front) {
            return;
        }
        let learnt = match tag {
            reply::PARAMETER_DESCRIPTION => {
                d.params = (total <= MAX_KEPT).then(|| Bytes::copy_from_slice(&self.backend_in[..total]));
                return;
            }
            reply::NO_DATA => d.params.take().map_or(Described::Forwarded, Described::Rowless),
            reply::ROW_DESCRIPTION | reply::ERROR => Described::Forwarded,
            _ => return,
        };
        let (_, def) = d.learning.pop_front().expect("checked above");
        d.params = None;
        let _ = def.described.set(learnt);
    }

    /// A client's Describe of its statement `def`, which this backend has not prepared: inside a
    /// failed block, where preparing it fails, pgtenant answers as the server would for a statement
    /// that returns no rows. False where it forwards the Describe as usual.
    pub(super) fn describe_locally(&mut self, def: &StatementDef) -> bool {
        let Some(params) = self.rowless_unprepared(def) else { return false };
        if !self.block().is_some_and(Block::surely_failed) {
            return false;
        }
        self.descriptions.answers.push_back((self.replies.next_seq(), params.clone()));
        self.replies.expect_synthetic(SYNTHETIC_DESCRIPTION);
        self.drain_synthetic();
        true
    }

    /// A Describe that `describe_locally` may have to answer, sent while replies are outstanding:
    /// whether the block has failed is not known yet (a message pipelined behind a batch that may
    /// fail it). Its statement's kept description is rowless and this backend has not prepared it,
    /// so it waits for those replies rather than send a Parse that may fail (25P02) where the
    /// server describes the statement. Drivers describe a statement in the batch that parses it,
    /// where it is prepared: this wait is for rare clients.
    pub(super) fn describe_waits(&self, f: &Frame) -> bool {
        if f.tag != msg::DESCRIBE || f.body().first() != Some(&b'S') || self.replies.is_settled() {
            return false;
        }
        let Some((b'S', name)) = peek::target_msg(f.body()) else { return false };
        let Some(def) = self.statements.statement(name).filter(|_| !name.is_empty()) else { return false };
        self.rowless_unprepared(def).is_some()
    }

    /// The kept description of `def` when it returns no rows and the attached backend has not
    /// prepared it: a Describe of it is one pgtenant may have to answer itself.
    fn rowless_unprepared<'a>(&self, def: &'a StatementDef) -> Option<&'a Bytes> {
        let Some(Described::Rowless(params)) = def.described.get() else { return None };
        let here = self.lease.as_ref()?.backend.statements_ref().fresh(&def.key, def.parsed_at);
        here.is_none().then_some(params)
    }

    /// Writes the description owed as synthetic reply `seq` (`describe_locally`).
    pub(super) fn push_description(&mut self, seq: u32) {
        let answers = &mut self.descriptions.answers;
        // answers whose turn has passed were dropped with a failed batch's replies
        while answers.front().is_some_and(|(s, _)| *s != seq) {
            answers.pop_front();
        }
        if let Some((_, params)) = answers.pop_front() {
            self.client_out.extend_from_slice(&params);
            self.client_out.extend_from_slice(&[reply::NO_DATA, 0, 0, 0, 4]);
        }
    }
}
