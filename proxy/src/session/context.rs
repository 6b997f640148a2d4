//! Where the client is in the protocol's batch cycle, and whether the next message needs the tenant
//! context in front of it: the session's one source of "idle" and of the context decision, as pure
//! functions over a snapshot of its state, so every case is a unit test.

use crate::sql::TxEffect;

/// The extended-protocol batch cycle (messages up to Sync), as the session sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// No client message forwarded since the last Sync.
    Closed,
    /// Client messages were forwarded since the last Sync.
    Open {
        /// The batch began outside any transaction block.
        began_idle: bool,
        /// A client Execute went out in it (DISCARD ALL only runs first in a batch).
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
    if (open && !i.needs_context) || i.batch_failed {
        return Decision::Nothing;
    }
    // known to start a transaction: nothing in flight, idle backend
    let start = !open && (i.fresh || (i.settled && i.status == b'I'));
    let wanted = if open || start {
        true // in a batch: after a COMMIT/ROLLBACK or transaction setup inside it
    } else if i.settled {
        i.needs_context && i.status == b'T'
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
        let open = Batch::Open { began_idle: true, executed: false };
        assert_eq!(decide(Inputs { batch: open, settled: false, ..base() }), Decision::Nothing);
    }

    #[test]
    fn deferred_context_goes_in_front_of_the_first_statement_that_needs_it() {
        let after_begin = Inputs { status: b'T', needs_context: true, ..base() };
        assert_eq!(decide(after_begin), Decision::Inject { start: false });
        assert_eq!(decide(Inputs { setup: true, ..after_begin }), Decision::Defer { start: false });
        let in_batch = Inputs { batch: Batch::Open { began_idle: true, executed: true }, needs_context: true, settled: false, ..base() };
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
    fn speculative_tags() {
        assert!(ordinary(b'P', Some(TxEffect::None)));
        assert!(ordinary(b'E', Some(TxEffect::Begin)));
        assert!(!ordinary(b'E', Some(TxEffect::End)));
        assert!(!ordinary(b'Q', Some(TxEffect::None)));
        assert!(!ordinary(b'D', None));
    }
}
