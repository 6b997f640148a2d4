//! The transaction state machine on the reply side: which replies the backend still owes, in
//! order, and which of them belong to pgtenant's injected context statement (swallowed) rather
//! than to the client (forwarded).
//!
//! Every forwarded message pushes the reply that completes it (ParseComplete, BindComplete, ...,
//! ReadyForQuery); the injected statement pushes the same, marked `injected`. The rules mirror the
//! server: after an error in the extended protocol it skips everything up to the next Sync, so the
//! entries in between are dropped; a simple Query ends with ReadyForQuery whatever happens inside.
//! When nothing is owed, `status` is the backend's real transaction status.

use std::collections::VecDeque;

use crate::error::PgError;

/// The reply that completes a forwarded message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    ParseComplete,
    BindComplete,
    CloseComplete,
    /// Describe: RowDescription or NoData (after ParameterDescription for statements).
    Description,
    /// Execute: CommandComplete, EmptyQueryResponse or PortalSuspended.
    CommandDone,
    /// Sync, Query or FunctionCall: ReadyForQuery.
    Ready,
    /// A reply pgtenant produces itself (e.g. ParseComplete for a statement the backend already
    /// has prepared), sent to the client when its turn comes.
    Synthetic(u8),
    /// No reply: marks where the client ended a COPY (CopyDone / CopyFail).
    CopyEnd,
}

impl Want {
    /// The `Want` for a forwarded frontend message, if it gets a reply of its own.
    pub fn for_frontend(tag: u8) -> Option<Want> {
        use crate::protocol::tags::frontend as m;
        Some(match tag {
            m::PARSE => Want::ParseComplete,
            m::BIND => Want::BindComplete,
            m::CLOSE => Want::CloseComplete,
            m::DESCRIBE => Want::Description,
            m::EXECUTE => Want::CommandDone,
            m::SYNC | m::QUERY | m::FUNCTION_CALL => Want::Ready,
            _ => return None,
        })
    }

    fn completed_by(self, tag: u8) -> bool {
        use crate::protocol::tags::backend as r;
        match self {
            Want::ParseComplete => tag == r::PARSE_COMPLETE,
            Want::BindComplete => tag == r::BIND_COMPLETE,
            Want::CloseComplete => tag == r::CLOSE_COMPLETE,
            Want::Description => tag == r::ROW_DESCRIPTION || tag == r::NO_DATA,
            Want::CommandDone => matches!(tag, r::COMMAND_COMPLETE | r::EMPTY_QUERY | r::PORTAL_SUSPENDED),
            Want::Ready => tag == r::READY_FOR_QUERY,
            Want::Synthetic(_) | Want::CopyEnd => false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Owed {
    want: Want,
    injected: bool,
    /// For `Ready`: the message was a simple Query / FunctionCall (not a Sync). The server skips
    /// those while it is skipping to Sync after an extended-protocol error.
    simple: bool,
    /// Server statement this reply confirms (a Parse pgtenant sent under a server-side name).
    prepares: Option<u64>,
    /// A deliberately failing message standing in for a refused one: its error is replaced by
    /// pgtenant's refusal.
    refusal: bool,
    /// Its place in the order of everything sent (`Replies::next_seq`).
    seq: u32,
}

/// What the session does with one backend message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Forward,
    Swallow,
    /// The injected context statement failed in front of a simple Query, which the server will
    /// now skip: forward the error and send a Sync so the Query gets its ReadyForQuery.
    ForwardThenSync,
    /// A reply that fits nothing we sent: the connection can no longer be trusted.
    Desync,
    /// The error of a refusal stand-in: send pgtenant's refusal instead.
    ReplaceError,
}

#[derive(Debug)]
pub struct Replies {
    owed: VecDeque<Owed>,
    /// Transaction status from the last ReadyForQuery ('I', 'T' or 'E').
    pub status: u8,
    /// The open batch (no Sync forwarded yet) already failed: the server skips the rest of it.
    pub batch_failed: bool,
    /// Server statements whose Parse failed or was skipped: not prepared after all. The flag says
    /// whether the Parse was the client's own (not one pgtenant sent to re-prepare a statement).
    pub failed_prepares: Vec<(u64, bool)>,
    /// The statement of the Parse the last error was about (the others in `failed_prepares` were
    /// skipped after it).
    pub failed_itself: Option<u64>,
    next_seq: u32,
    /// The number of the last ReadyForQuery owed (a Sync, Query or FunctionCall sent).
    last_ready: Option<u32>,
    /// The number of the last simple Query sent (the client's or pgtenant's own).
    last_query: Option<u32>,
    /// The server is in COPY FROM STDIN mode: it ignores Sync and Flush until CopyDone/CopyFail.
    pub copy_in: bool,
    /// The errors of the refusal stand-ins owed, in order. A stand-in the server skips (its batch
    /// failed before it: an earlier refusal or a real error) takes its error with it, so each
    /// refusal is told in place of its own stand-in's error or not at all.
    refusals: VecDeque<PgError>,
    /// The refusal to send in place of the error just read ([`Action::ReplaceError`]).
    replacement: Option<PgError>,
    /// A Query pgtenant sent (a reset, transaction defaults) was skipped by the server, which was
    /// skipping to the end of a failed batch: it did not run.
    pub own_query_skipped: bool,
    /// The number of the last ReadyForQuery received outside a transaction block: the server has
    /// ended every portal bound before it.
    pub last_idle_ready: Option<u32>,
}

impl Default for Replies {
    fn default() -> Self {
        Replies {
            owed: VecDeque::with_capacity(16),
            status: b'I',
            batch_failed: false,
            failed_prepares: Vec::new(),
            failed_itself: None,
            next_seq: 0,
            last_ready: None,
            last_query: None,
            copy_in: false,
            refusals: VecDeque::new(),
            replacement: None,
            own_query_skipped: false,
            last_idle_ready: None,
        }
    }
}

impl Replies {
    fn push(&mut self, mut o: Owed) {
        o.seq = self.next_seq;
        if o.want == Want::Ready {
            self.last_ready = Some(o.seq);
            if o.simple {
                self.last_query = Some(o.seq);
            }
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        self.owed.push_back(o);
    }

    /// Whether a ReadyForQuery outside a transaction block arrived after the reply numbered
    /// `seq`: the server's transaction of that message has ended, and its portals with it.
    pub fn idle_since(&self, seq: u32) -> bool {
        self.last_idle_ready.is_some_and(|r| later(r, seq))
    }

    /// Whether the reply numbered `seq` has arrived already (an entry is answered once the front
    /// of the queue has moved past it; numbers wrap, so "past" is less than half the range ahead).
    pub fn answered(&self, seq: u32) -> bool {
        let front = self.owed.front().map_or(self.next_seq, |o| o.seq);
        later(front, seq)
    }

    /// Whether a Sync, Query or FunctionCall was sent after the message whose reply is numbered
    /// `seq`: the server ends a batch at each.
    pub fn ready_sent_since(&self, seq: u32) -> bool {
        self.last_ready.is_some_and(|r| later(r, seq))
    }

    /// Whether a simple Query was sent after the message whose reply is numbered `seq`: the server
    /// drops its unnamed statement at each Query (not at a FunctionCall).
    pub fn query_sent_since(&self, seq: u32) -> bool {
        self.last_query.is_some_and(|r| later(r, seq))
    }

    /// Records a forwarded FunctionCall: a ReadyForQuery owed, as for a Query, but the server's
    /// unnamed statement stays (`query_sent_since`).
    pub fn expect_function_call(&mut self) {
        let last_query = self.last_query;
        self.expect(Want::Ready, false, true);
        self.last_query = last_query;
    }

    /// The number the next reply owed will carry: what the session notes about a message it
    /// forwards (`Session::renamed`) is found again by it when its reply is an error.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// The number of the reply owed first: the message an error from the server is about.
    pub fn front_seq(&self) -> Option<u32> {
        self.owed.front().map(|o| o.seq)
    }

    /// Records a forwarded message that owes a reply.
    pub fn expect(&mut self, want: Want, injected: bool, simple: bool) {
        self.push(Owed { want, injected, simple, prepares: None, refusal: false, seq: 0 });
    }

    /// Records a stand-in for a refused message (a simple Query or a Parse that fails on the
    /// server), so the server aborts the transaction exactly as for a real error; `err` is what
    /// the client is told in place of the stand-in's error.
    pub fn expect_refusal(&mut self, simple: bool, err: PgError) {
        let want = if simple { Want::Ready } else { Want::ParseComplete };
        self.push(Owed { want, injected: false, simple, prepares: None, refusal: true, seq: 0 });
        self.refusals.push_back(err);
    }

    /// The refusal that replaces the error just read ([`Action::ReplaceError`]).
    pub fn take_replacement(&mut self) -> Option<PgError> {
        self.replacement.take()
    }

    /// Records a Parse of server statement `id`; if it fails, `id` lands in `failed_prepares`.
    pub fn expect_parse(&mut self, injected: bool, id: u64) {
        self.push(Owed { want: Want::ParseComplete, injected, simple: false, prepares: Some(id), refusal: false, seq: 0 });
    }

    /// Records a reply pgtenant will produce itself, in order.
    pub fn expect_synthetic(&mut self, tag: u8) {
        self.push(Owed { want: Want::Synthetic(tag), injected: false, simple: false, prepares: None, refusal: false, seq: 0 });
    }

    /// The client ended a COPY: Sync and Flush count again after this point. With nothing owed no
    /// COPY can be starting either (the server ignores a CopyDone or CopyFail outside one).
    pub fn copy_ended(&mut self) {
        self.copy_in = false;
        if !self.owed.is_empty() {
            self.push(Owed { want: Want::CopyEnd, injected: false, simple: false, prepares: None, refusal: false, seq: 0 });
        }
    }

    /// Whether [`Replies::take_synthetic`] has anything to look at: a reply pgtenant produces
    /// itself or a COPY marker is next in line. Asked after every backend message, nearly always
    /// with no.
    #[inline]
    pub fn synthetic_next(&self) -> bool {
        matches!(self.owed.front(), Some(Owed { want: Want::Synthetic(_) | Want::CopyEnd, .. }))
    }

    /// Pops the reply pgtenant owes the client itself, if it is next in line (markers are skipped),
    /// with its reply number.
    pub fn take_synthetic(&mut self) -> Option<(u8, u32)> {
        loop {
            match self.owed.front() {
                Some(&Owed { want: Want::Synthetic(tag), seq, .. }) => {
                    self.owed.pop_front();
                    return Some((tag, seq));
                }
                Some(Owed { want: Want::CopyEnd, .. }) => {
                    self.owed.pop_front();
                }
                _ => return None,
            }
        }
    }

    /// CopyInResponse: Syncs the client sent before ending the COPY are ignored by the server.
    fn enter_copy_in(&mut self) {
        self.copy_in = true;
        let mut i = 1;
        while i < self.owed.len() {
            match self.owed[i] {
                Owed { want: Want::CopyEnd, .. } => {
                    self.copy_in = false; // the client already ended it
                    break;
                }
                Owed { want: Want::Ready, simple: false, .. } => {
                    self.owed.remove(i);
                }
                _ => i += 1,
            }
        }
    }

    fn drop_front(&mut self) {
        match self.owed.pop_front() {
            Some(Owed { prepares: Some(id), injected, .. }) => self.failed_prepares.push((id, !injected)),
            // a stand-in the server skipped: its refusal is never told
            Some(Owed { refusal: true, .. }) => {
                self.refusals.pop_front();
            }
            // a Query of pgtenant's own the server skipped
            Some(Owed { injected: true, want: Want::Ready, simple: true, .. }) => self.own_query_skipped = true,
            _ => {}
        }
    }

    /// A Parse of server statement `id` is not answered yet, and a Sync, Query or FunctionCall
    /// went after it: it may still fail (or be skipped), and a message of a later batch that uses
    /// the statement would then not find it.
    pub fn preparing_in_an_earlier_batch(&self, id: u64) -> bool {
        self.owed.iter().any(|o| o.prepares == Some(id) && o.want == Want::ParseComplete && self.ready_sent_since(o.seq))
    }

    /// Any Parse is unanswered in a batch before the open one (see
    /// [`Replies::preparing_in_an_earlier_batch`]): cheap, nearly always false.
    pub fn parse_in_an_earlier_batch(&self) -> bool {
        self.owed.iter().any(|o| o.want == Want::ParseComplete && self.ready_sent_since(o.seq))
    }

    /// pgtenant's Parse of server statement `id` is not answered yet: it may still fail.
    pub fn preparing(&self, id: u64) -> bool {
        self.owed.iter().any(|o| o.prepares == Some(id) && o.want == Want::ParseComplete)
    }


    /// Nothing is owed: `status` is exact.
    pub fn is_settled(&self) -> bool {
        self.owed.is_empty()
    }

    /// A message of the open batch (since the last Sync) is still unanswered: if it fails, the
    /// server skips the rest of the batch, so what a later message of the batch does is not known
    /// yet. (A Query inside the batch does not make the server skip when it fails itself.)
    pub fn batch_may_fail(&self) -> bool {
        for o in self.owed.iter().rev() {
            match o.want {
                Want::Synthetic(_) | Want::CopyEnd => {}
                Want::Ready if o.simple => {}
                Want::Ready => return false,
                _ => return true,
            }
        }
        false
    }

    /// Every reply still owed is for a message pgtenant sent itself (a hand-over reset, a
    /// context statement): none of the client's messages is unanswered.
    pub fn only_injected_owed(&self) -> bool {
        self.owed.iter().all(|o| o.injected)
    }

    pub fn reset(&mut self) {
        self.owed.clear();
        self.status = b'I';
        self.batch_failed = false;
        self.failed_prepares.clear();
        self.copy_in = false;
        self.refusals.clear();
        self.replacement = None;
        self.own_query_skipped = false;
    }

    pub fn on_reply(&mut self, tag: u8, body: &[u8]) -> Action {
        use crate::protocol::tags::backend as r;
        match tag {
            // asynchronous messages can arrive at any time
            r::NOTICE | r::PARAMETER_STATUS | r::NOTIFICATION => Action::Forward,
            r::ERROR => self.on_error(),
            r::COPY_IN | r::COPY_BOTH if self.owed.front().is_some_and(|o| !o.injected) => {
                self.enter_copy_in();
                Action::Forward
            }
            _ => {
                // a COPY marker whose COPY never began (the message before it failed) marks nothing
                while matches!(self.owed.front(), Some(Owed { want: Want::CopyEnd, .. })) {
                    self.owed.pop_front();
                }
                let Some(front) = self.owed.front().copied() else {
                    return Action::Desync;
                };
                let done = front.want.completed_by(tag);
                if done {
                    self.owed.pop_front();
                    if tag == r::READY_FOR_QUERY {
                        self.status = body.first().copied().unwrap_or(b'I');
                        if self.status == b'I' {
                            self.last_idle_ready = Some(front.seq);
                        }
                    }
                }
                match (front.injected, done) {
                    (false, _) => Action::Forward,
                    (true, true) => Action::Swallow,
                    // pgtenant's own simple query (the reset): everything up to ReadyForQuery
                    (true, false) if front.want == Want::Ready => Action::Swallow,
                    // the context statement returns one row
                    (true, false) if tag == r::DATA_ROW => Action::Swallow,
                    // pgtenant's Describe of a client's statement (`Session::learn_description`)
                    (true, false) if tag == r::PARAMETER_DESCRIPTION && front.want == Want::Description => Action::Swallow,
                    (true, false) => Action::Desync,
                }
            }
        }
    }

    fn on_error(&mut self) -> Action {
        let Some(front) = self.owed.front().copied() else {
            return Action::Forward; // e.g. FATAL on termination
        };
        self.failed_itself = front.prepares;
        if front.injected && front.want == Want::Ready {
            return Action::Desync; // pgtenant's reset failed: never reuse this connection
        }
        let forward = if front.refusal {
            // this stand-in's refusal is told now; the entry stays owed until the skip ends
            self.replacement = self.refusals.pop_front();
            if let Some(o) = self.owed.front_mut() {
                o.refusal = false;
            }
            Action::ReplaceError
        } else {
            Action::Forward
        };
        if front.want == Want::Ready {
            return forward; // a ReadyForQuery follows
        }
        // Extended protocol: the server now skips to the next Sync.
        while self.owed.front().is_some_and(|o| o.injected) {
            self.drop_front();
        }
        if front.injected && self.owed.front().is_some_and(|o| o.want == Want::Ready && o.simple) {
            return Action::ForwardThenSync;
        }
        while let Some(o) = self.owed.front() {
            if o.want == Want::Ready && !o.simple {
                break;
            }
            self.drop_front();
        }
        if self.owed.is_empty() {
            self.batch_failed = true;
        }
        forward
    }
}

/// Reply number `a` comes after `b` (numbers wrap, so "after" is less than half the range ahead).
fn later(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < 1 << 31
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inject(r: &mut Replies) {
        r.expect(Want::BindComplete, true, false);
        r.expect(Want::CommandDone, true, false);
        r.expect(Want::CloseComplete, true, false);
    }

    #[test]
    fn a_function_call_is_not_a_query_for_the_unnamed_statement() {
        let mut r = Replies::default();
        let parse = r.next_seq();
        r.expect(Want::ParseComplete, false, false);
        r.expect(Want::Ready, false, false); // Sync
        assert!(r.ready_sent_since(parse) && !r.query_sent_since(parse));
        r.expect_function_call();
        assert!(!r.query_sent_since(parse));
        r.expect(Want::Ready, false, true); // a Query
        assert!(r.query_sent_since(parse));
    }

    #[test]
    fn swallows_injected_replies_and_forwards_the_rest() {
        let mut r = Replies::default();
        inject(&mut r);
        r.expect(Want::Ready, false, true);
        let seq: Vec<Action> = [b'2', b'D', b'C', b'3', b'T', b'D', b'C', b'Z']
            .iter()
            .map(|&t| r.on_reply(t, b"I"))
            .collect();
        use Action::*;
        assert_eq!(seq, [Swallow, Swallow, Swallow, Swallow, Forward, Forward, Forward, Forward]);
        assert!(r.is_settled());
    }

    #[test]
    fn injected_failure_before_simple_query_asks_for_sync() {
        let mut r = Replies::default();
        inject(&mut r);
        r.expect(Want::Ready, false, true);
        assert_eq!(r.on_reply(b'E', b""), Action::ForwardThenSync);
        assert_eq!(r.on_reply(b'Z', b"E"), Action::Forward);
        assert!(r.is_settled());
        assert_eq!(r.status, b'E');
    }

    #[test]
    fn extended_error_skips_to_sync() {
        let mut r = Replies::default();
        inject(&mut r);
        for t in [b'P', b'B', b'E'] {
            r.expect(Want::for_frontend(t).unwrap(), false, false);
        }
        inject(&mut r); // re-injected after a COMMIT inside the batch
        r.expect(Want::Ready, false, false);
        assert_eq!(r.on_reply(b'2', b""), Action::Swallow);
        assert_eq!(r.on_reply(b'D', b""), Action::Swallow);
        assert_eq!(r.on_reply(b'C', b""), Action::Swallow);
        assert_eq!(r.on_reply(b'3', b""), Action::Swallow);
        assert_eq!(r.on_reply(b'E', b""), Action::Forward); // Parse failed
        assert!(!r.batch_failed);
        assert_eq!(r.on_reply(b'Z', b"I"), Action::Forward);
        assert!(r.is_settled());
    }

    #[test]
    fn error_in_open_batch_marks_it_failed() {
        let mut r = Replies::default();
        r.expect(Want::ParseComplete, false, false);
        assert_eq!(r.on_reply(b'E', b""), Action::Forward);
        assert!(r.batch_failed);
    }

    #[test]
    fn synthetic_replies_wait_their_turn_and_failed_parses_are_reported() {
        let mut r = Replies::default();
        r.expect(Want::BindComplete, false, false);
        r.owed.push_back(Owed { want: Want::Synthetic(b'1'), injected: false, simple: false, prepares: None, refusal: false, seq: 0 });
        r.expect_parse(true, 7);
        r.expect(Want::Ready, false, false);
        assert_eq!(r.take_synthetic(), None);
        assert_eq!(r.on_reply(b'2', b""), Action::Forward);
        assert_eq!(r.take_synthetic().map(|(tag, _)| tag), Some(b'1'));
        assert_eq!(r.on_reply(b'E', b""), Action::Forward);
        assert_eq!(r.failed_prepares, [(7, false)]);
        assert_eq!(r.on_reply(b'Z', b"I"), Action::Forward);
    }

    #[test]
    fn syncs_sent_during_copy_in_get_no_reply() {
        let mut r = Replies::default();
        r.expect(Want::BindComplete, false, false);
        r.expect(Want::CommandDone, false, false);
        r.expect(Want::Ready, false, false); // Sync sent with the Execute, before CopyDone
        assert_eq!(r.on_reply(b'2', b""), Action::Forward);
        assert_eq!(r.on_reply(b'G', b""), Action::Forward);
        assert!(r.copy_in);
        r.copy_ended();
        r.expect(Want::Ready, false, false); // Sync after CopyDone
        assert_eq!(r.on_reply(b'C', b""), Action::Forward);
        assert_eq!(r.take_synthetic(), None);
        assert_eq!(r.on_reply(b'Z', b"I"), Action::Forward);
        assert!(r.is_settled());
    }

    /// Each refusal is told in place of its own stand-in's error, or not at all when the server
    /// skipped the stand-in (a refusal or a real error came first in the batch). Before, the
    /// errors waited in a queue of their own, and a skipped stand-in's error was told in place of
    /// the next batch's refusal, and so on for the rest of the session.
    #[test]
    fn a_skipped_refusal_stand_in_takes_its_error_with_it() {
        let err = |m: &str| PgError::error("42501", m.to_string());
        let said = |r: &mut Replies| r.take_replacement().map(|e| e.message);
        let mut r = Replies::default();
        // two refusals in one batch: the server fails the first stand-in and skips the second
        r.expect_refusal(false, err("first"));
        r.expect(Want::BindComplete, false, false);
        r.expect_refusal(false, err("second"));
        r.expect(Want::Ready, false, false);
        assert_eq!(r.on_reply(b'E', b""), Action::ReplaceError);
        assert_eq!(said(&mut r).as_deref(), Some("first"));
        assert_eq!(r.on_reply(b'Z', b"I"), Action::Forward);
        // a real error, then a refusal in the same batch: the stand-in is skipped
        r.expect(Want::ParseComplete, false, false);
        r.expect_refusal(false, err("skipped"));
        r.expect(Want::Ready, false, false);
        assert_eq!(r.on_reply(b'E', b""), Action::Forward);
        assert_eq!(r.on_reply(b'Z', b"I"), Action::Forward);
        // the next refusal, simple and extended, is told as itself
        r.expect_refusal(true, err("third"));
        assert_eq!(r.on_reply(b'E', b""), Action::ReplaceError);
        assert_eq!(said(&mut r).as_deref(), Some("third"));
        assert_eq!(r.on_reply(b'Z', b"I"), Action::Forward);
        r.expect_refusal(false, err("fourth"));
        r.expect(Want::Ready, false, false);
        assert_eq!(r.on_reply(b'E', b""), Action::ReplaceError);
        assert_eq!(said(&mut r).as_deref(), Some("fourth"));
        assert_eq!(r.on_reply(b'Z', b"I"), Action::Forward);
        assert!(r.is_settled() && r.refusals.is_empty());
    }

    /// A Query of pgtenant's own (a reset) that the server skips because an earlier message of
    /// the batch failed did not run: the session is told, so the backend is not taken as reset.
    #[test]
    fn a_skipped_own_query_is_reported() {
        let mut r = Replies::default();
        r.expect(Want::ParseComplete, false, false);
        r.expect(Want::Ready, true, true); // DISCARD ALL's reset, in the middle of the batch
        r.expect(Want::Ready, false, false);
        assert_eq!(r.on_reply(b'E', b""), Action::Forward);
        assert!(r.own_query_skipped);
        assert_eq!(r.on_reply(b'Z', b"I"), Action::Forward);
        assert!(r.is_settled());
    }

    #[test]
    fn unexpected_reply_is_desync() {
        let mut r = Replies::default();
        assert_eq!(r.on_reply(b'Z', b"I"), Action::Desync);
        inject(&mut r);
        assert_eq!(r.on_reply(b'T', b""), Action::Desync);
    }

    #[test]
    fn only_the_open_batchs_unanswered_messages_may_fail_it() {
        let mut r = Replies::default();
        assert!(!r.batch_may_fail());
        r.expect(Want::ParseComplete, false, false);
        r.expect(Want::Ready, false, false); // its Sync: that batch is closed
        assert!(!r.batch_may_fail(), "an earlier batch's failure does not reach the next one");
        r.expect(Want::Ready, false, true); // a Query outside any batch
        assert!(!r.batch_may_fail());
        r.expect_synthetic(b'1');
        assert!(!r.batch_may_fail(), "pgtenant's own replies cannot fail");
        r.expect(Want::BindComplete, true, false); // the context statement can
        assert!(r.batch_may_fail());
        r.expect(Want::Ready, false, true); // a Query inside the open batch: what is before it still counts
        assert!(r.batch_may_fail());
        r.expect(Want::Ready, false, false);
        assert!(!r.batch_may_fail());
    }
}
