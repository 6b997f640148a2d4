//! Where the client is in the protocol's batch cycle, where the backend is for certain once what
//! was sent has run (`SinceExact`, `Block`), and whether the next message needs the tenant context
//! in front of it: the session's one source of "idle" and of the context decision, as pure
//! functions over a snapshot of its state, so every case is a unit test.

use crate::sql::TxEffect;

/// The extended-protocol batch cycle (messages up to Sync), as the session sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// No client message forwarded since the last Sync.
    Closed,
    /// Client messages were forwarded since the last Sync.
    Open {
        /// The batch began outside any transaction block; None while that is not known (replies
        /// to the client's earlier messages were outstanding when it began: `Session::on_work`
        /// learns it once they are in).
        began_idle: Option<bool>,
        /// A client Execute went out in it since its transaction began (DISCARD ALL only runs
        /// first in a batch, or after an Execute that ended the batch's transaction).
        executed: bool,
    },
    /// A message was refused before any backend was attached: client messages are dropped up to
    /// the Sync, which pgtenant answers itself.
    Skipping,
}

impl Batch {
    pub fn is_open(self) -> bool {
        matches!(self, Batch::Open { .. })
    }
}

/// What the messages sent since the transaction status was last exact (every reply in, no batch
/// open) may have done to a transaction block, at most. Only statements that end a block can take
/// a backend out of one, and only `ROLLBACK TO SAVEPOINT` (or an end) out of a failed one: an error
/// inside a block leaves it failed, not ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum BlockChange {
    #[default]
    Keeps,
    /// A `ROLLBACK TO SAVEPOINT` may have made a failed block usable again.
    MayRecover,
    /// A `COMMIT`, `ROLLBACK`, `PREPARE TRANSACTION` … may have ended it.
    MayEnd,
}

impl BlockChange {
    pub fn of(effect: TxEffect) -> BlockChange {
        match effect {
            TxEffect::End => BlockChange::MayEnd,
            TxEffect::RollbackTo => BlockChange::MayRecover,
            TxEffect::None | TxEffect::Begin => BlockChange::Keeps,
        }
    }
}

/// Where everything sent leaves the backend, as far as is certain: the last exact status and what
/// was sent since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub status: u8,
    pub since: BlockChange,
    /// Something that fails for certain went out inside the block since (a refusal's stand-in).
    pub failed: bool,
}

impl Block {
    /// Inside a transaction block (active or failed) for certain.
    pub fn surely_inside(self) -> bool {
        matches!(self.status, b'T' | b'E') && self.since < BlockChange::MayEnd
    }

    /// Inside a failed block for certain: the server runs nothing but its end (or a `ROLLBACK TO`).
    pub fn surely_failed(self) -> bool {
        (self.status == b'E' || self.failed) && self.since == BlockChange::Keeps
    }
}

/// What the client's messages sent since the transaction status was last exact (every reply in, no
/// batch open) may have done to a block: the session's one record of it, so that `Block` is a
/// certainty, never a guess.
#[derive(Debug, Clone, Copy, Default)]
pub struct SinceExact {
    change: BlockChange,
    /// A Bind of a statement that ends a block or rolls back to a savepoint went out in the current
    /// transaction: an Execute of any portal may then do the same, whatever pgtenant's portal table
    /// says (a Bind or Close the server skipped leaves the server's portal as it was). A statement
    /// pgtenant does not know is not one of these: the server's statements are named by pgtenant,
    /// and SQL `PREPARE` takes no transaction control. Portals end with their transaction.
    ending_portal: bool,
    /// A refusal's stand-in, which fails for certain, went out inside a block for certain (since
    /// then the block can only be failed, until a `ROLLBACK TO` or an end raises `change`).
    failed: bool,
}

impl SinceExact {
    /// Every reply is in and no batch is open: `status` is exact, and covers all that was sent.
    pub fn exact(&mut self, status: u8) {
        self.change = BlockChange::Keeps;
        self.ending_portal &= status != b'I';
        self.failed = false;
    }

    /// A refusal's stand-in went out (a statement that fails on the server): inside a block for
    /// certain, the block is failed now, whatever may have recovered it before.
    pub fn failing_sent(&mut self, status: u8) {
        if self.block(status).surely_inside() {
            self.change = BlockChange::Keeps;
            self.failed = true;
        }
    }

    /// A client message goes out: `tag`, what its plan says it may do to a block, and for a Bind
    /// the effect of the statement it binds.
    pub fn sent(&mut self, tag: u8, change: BlockChange, bound: Option<TxEffect>) {
        use crate::protocol::tags::frontend::{BIND, EXECUTE};
        let stale = if tag == EXECUTE && self.ending_portal { BlockChange::MayEnd } else { BlockChange::Keeps };
        self.change = self.change.max(change).max(stale);
        if tag == BIND {
            self.ending_portal |= matches!(bound, Some(TxEffect::End | TxEffect::RollbackTo));
        }
    }

    /// Where everything sent leaves a backend whose last ReadyForQuery said `status`.
    pub fn block(&self, status: u8) -> Block {
        Block { status, since: self.change, failed: self.failed }
    }
}

/// What the session knows when a message that runs or prepares SQL arrives.
#[derive(Debug, Clone, Copy)]
pub struct Inputs {
    pub batch: Batch,
    /// The transaction the backend is in, or will be in once what was sent runs, has not had the
    /// context (after transaction setup, `AND CHAIN`, or a COMMIT inside the batch).
    pub needs_context: bool,
    /// The open batch already failed: the server skips the rest of it.
    pub batch_failed: bool,
    /// The backend was attached for this message (it is idle once its reset, if any, has run).
    pub fresh: bool,
    /// Every reply owed by the backend has arrived, so `status` is exact.
    pub settled: bool,
    /// The backend's last transaction status ('I', 'T' or 'E').
    pub status: u8,
    /// Where everything sent before this message leaves the backend (None: just attached).
    pub block: Option<Block>,
    /// A simple Query or FunctionCall (not part of a batch).
    pub simple: bool,
    /// The message is a Parse, Bind or Execute of an ordinary statement or BEGIN.
    pub ordinary: bool,
    /// The backend already has the client's `default_transaction_*` defaults.
    pub defaults_in_place: bool,
    /// The message is transaction setup only (see `crate::sql::txmode`).
    pub setup: bool,
}

/// What goes in front of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing: the transaction already has the context (or the batch is being skipped).
    Nothing,
    /// Wait until every earlier reply is in, then decide again.
    Hold,
    /// The context statement (after the client's `default_transaction_*` defaults when the
    /// transaction starts here).
    Inject { start: bool },
    /// Transaction setup: the context waits for the next message (defaults as for `Inject`).
    Defer { start: bool },
}

/// The decision for one message.
pub fn decide(i: Inputs) -> Decision {
    let open = i.batch.is_open();
    if (open && !i.needs_context) || i.batch_failed || i.block.is_some_and(Block::surely_failed) {
        // (a failed block runs no context either: one it still owes waits for a ROLLBACK TO)
        return Decision::Nothing;
    }
    // known to start a transaction: nothing in flight, idle backend
    let start = !open && (i.fresh || (i.settled && i.status == b'I'));
    let wanted = if open || start {
        true // in a batch: after a COMMIT/ROLLBACK or transaction setup inside it
    } else if i.settled {
        i.needs_context && i.status == b'T'
    } else if i.block.is_some_and(Block::surely_inside) && !i.needs_context {
        // the block goes on and has the context: in a failed one, sending it again would fail
        // with 25P02 in place of the server's own answer to this message
        false
    } else if !i.simple && i.ordinary && i.defaults_in_place {
        true // pipelined: speculative (harmless in a transaction, fails like the client's in an aborted one)
    } else {
        return Decision::Hold;
    };
    match (wanted, i.setup) {
        (false, _) => Decision::Nothing,
        (true, true) => Decision::Defer { start },
        (true, false) => Decision::Inject { start },
    }
}

/// Whether a message may get the context speculatively while earlier replies are outstanding.
pub fn ordinary(tag: u8, effect: Option<TxEffect>) -> bool {
    use crate::protocol::tags::frontend::{BIND, EXECUTE, PARSE};
    matches!(tag, PARSE | BIND | EXECUTE) && matches!(effect, Some(TxEffect::None) | Some(TxEffect::Begin))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Inputs {
        Inputs {
            batch: Batch::Closed,
            needs_context: false,
            batch_failed: false,
            fresh: false,
            settled: true,
            status: b'I',
            block: None,
            simple: true,
            ordinary: false,
            defaults_in_place: true,
            setup: false,
        }
    }

    #[test]
    fn idle_backend_gets_the_context_and_the_defaults() {
        assert_eq!(decide(base()), Decision::Inject { start: true });
        assert_eq!(decide(Inputs { fresh: true, settled: false, ..base() }), Decision::Inject { start: true });
        assert_eq!(decide(Inputs { setup: true, ..base() }), Decision::Defer { start: true });
    }

    #[test]
    fn open_transaction_with_context_needs_nothing() {
        assert_eq!(decide(Inputs { status: b'T', ..base() }), Decision::Nothing);
        assert_eq!(decide(Inputs { status: b'E', ..base() }), Decision::Nothing);
        let open = Batch::Open { began_idle: Some(true), executed: false };
        assert_eq!(decide(Inputs { batch: open, settled: false, ..base() }), Decision::Nothing);
    }

    #[test]
    fn deferred_context_goes_in_front_of_the_first_statement_that_needs_it() {
        let after_begin = Inputs { status: b'T', needs_context: true, ..base() };
        assert_eq!(decide(after_begin), Decision::Inject { start: false });
        assert_eq!(decide(Inputs { setup: true, ..after_begin }), Decision::Defer { start: false });
        let in_batch = Inputs { batch: Batch::Open { began_idle: Some(true), executed: true }, needs_context: true, settled: false, ..base() };
        assert_eq!(decide(in_batch), Decision::Inject { start: false });
        assert_eq!(decide(Inputs { batch_failed: true, ..in_batch }), Decision::Nothing);
    }

    #[test]
    fn pipelined_messages_are_speculative_or_held() {
        let unsettled = Inputs { settled: false, status: b'T', ..base() };
        assert_eq!(decide(unsettled), Decision::Hold); // a simple Query waits
        let ordinary = Inputs { simple: false, ordinary: true, ..unsettled };
        assert_eq!(decide(ordinary), Decision::Inject { start: false });
        // a backend without the client's defaults must be set up between transactions: wait
        assert_eq!(decide(Inputs { defaults_in_place: false, ..ordinary }), Decision::Hold);
        assert_eq!(decide(Inputs { ordinary: false, simple: false, ..unsettled }), Decision::Hold);
    }

    #[test]
    fn pipelined_inside_a_block_that_goes_on_needs_nothing() {
        // active or failed, the block still has its context: no speculation, no hold
        for (status, since) in [(b'T', BlockChange::Keeps), (b'E', BlockChange::MayRecover), (b'T', BlockChange::MayRecover)] {
            let inside = Inputs { settled: false, status, block: Some(Block { status, since, failed: false }), ..base() };
            assert_eq!(decide(inside), Decision::Nothing); // a simple Query
            assert_eq!(decide(Inputs { simple: false, ordinary: true, ..inside }), Decision::Nothing);
            assert_eq!(decide(Inputs { simple: false, ..inside }), Decision::Nothing); // Describe, COMMIT
            // a block that has not had the context yet (setup went first) still gets it
            let owed = Inputs { simple: false, ordinary: true, needs_context: true, ..inside };
            assert_eq!(decide(owed), Decision::Inject { start: false });
        }
        // after a possible end, as before: speculative for the extended protocol, held otherwise
        let ended = Inputs { settled: false, status: b'T', block: Some(Block { status: b'T', since: BlockChange::MayEnd, failed: false }), ..base() };
        assert_eq!(decide(ended), Decision::Hold);
        assert_eq!(decide(Inputs { simple: false, ordinary: true, ..ended }), Decision::Inject { start: false });
    }

    #[test]
    fn a_failed_block_gets_no_context() {
        // BEGIN (setup: the context waits), then an error: the context would fail with 25P02 in
        // place of the server's answer. It stays owed until a ROLLBACK TO may have recovered.
        let failed = Block { status: b'E', since: BlockChange::Keeps, failed: false };
        let open = Batch::Open { began_idle: Some(false), executed: false };
        for (batch, settled) in [(Batch::Closed, true), (Batch::Closed, false), (open, false)] {
            let i = Inputs { batch, settled, status: b'E', needs_context: true, simple: false, ordinary: true, block: Some(failed), ..base() };
            assert_eq!(decide(i), Decision::Nothing);
            if !settled {
                // (where everything is answered, what was sent is in the exact status)
                let recovering = Inputs { block: Some(Block { since: BlockChange::MayRecover, ..failed }), ..i };
                assert_ne!(decide(recovering), Decision::Nothing);
            }
        }
    }

    #[test]
    fn what_was_sent_since_the_exact_status() {
        use crate::protocol::tags::frontend::{BIND, EXECUTE, QUERY};
        let mut s = SinceExact::default();
        assert!(s.block(b'T').surely_inside());
        s.sent(EXECUTE, BlockChange::Keeps, None); // a SELECT
        assert!(s.block(b'E').surely_failed());
        // a portal of COMMIT bound in this transaction: any Execute may be it (the server may have
        // skipped the Bind or Close that pgtenant's table reflects)
        s.sent(BIND, BlockChange::Keeps, Some(TxEffect::End));
        assert!(s.block(b'T').surely_inside());
        s.exact(b'T');
        s.sent(EXECUTE, BlockChange::Keeps, None);
        assert!(!s.block(b'T').surely_inside());
        // it lasts until the transaction is over
        s.exact(b'E');
        s.sent(EXECUTE, BlockChange::Keeps, None);
        assert!(!s.block(b'E').surely_inside());
        s.exact(b'I');
        s.sent(EXECUTE, BlockChange::Keeps, None);
        assert_eq!(s.block(b'T').since, BlockChange::Keeps);
        // ROLLBACK TO in a query string: still inside, no longer surely failed
        s.sent(QUERY, BlockChange::MayRecover, None);
        assert!(s.block(b'E').surely_inside() && !s.block(b'E').surely_failed());
        s.sent(QUERY, BlockChange::Keeps, None);
        assert_eq!(s.block(b'E').since, BlockChange::MayRecover); // only the exact status lowers it
        // a refusal's stand-in inside the block fails it for certain, even after a ROLLBACK TO;
        // outside one for certain it says nothing
        s.failing_sent(b'E');
        assert!(s.block(b'T').surely_failed());
        s.sent(QUERY, BlockChange::MayRecover, None);
        assert!(!s.block(b'T').surely_failed());
        s.exact(b'T');
        s.sent(QUERY, BlockChange::MayEnd, None);
        s.failing_sent(b'T');
        assert!(!s.block(b'T').surely_failed() && !s.block(b'T').surely_inside());
        // a Bind of a statement pgtenant does not know binds no transaction control
        s.exact(b'T');
        s.sent(BIND, BlockChange::Keeps, None);
        s.sent(EXECUTE, BlockChange::Keeps, None);
        assert!(s.block(b'T').surely_inside());
    }

    #[test]
    fn block_certainty() {
        let b = |status, since| Block { status, since, failed: false };
        assert!(b(b'T', BlockChange::MayRecover).surely_inside());
        assert!(!b(b'T', BlockChange::MayEnd).surely_inside());
        assert!(!b(b'I', BlockChange::Keeps).surely_inside());
        assert!(b(b'E', BlockChange::Keeps).surely_failed());
        assert!(!b(b'E', BlockChange::MayRecover).surely_failed());
        assert!(!b(b'T', BlockChange::Keeps).surely_failed());
        assert_eq!(BlockChange::of(TxEffect::RollbackTo), BlockChange::MayRecover);
        assert_eq!(BlockChange::of(TxEffect::Begin), BlockChange::Keeps);
    }

    #[test]
    fn speculative_tags() {
        assert!(ordinary(b'P', Some(TxEffect::None)));
        assert!(ordinary(b'E', Some(TxEffect::Begin)));
        assert!(!ordinary(b'E', Some(TxEffect::End)));
        assert!(!ordinary(b'Q', Some(TxEffect::None)));
        assert!(!ordinary(b'D', None));
    }
}
