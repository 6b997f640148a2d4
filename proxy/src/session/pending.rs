//! A client's session-level `SET`s on their way to the server, kept for the client's later
//! transactions (on any backend) exactly when the server keeps them: once the transaction they ran
//! in has committed. A `ROLLBACK` undoes them, a `ROLLBACK TO SAVEPOINT` undoes those made since
//! that savepoint, and an error after them leaves none of them kept (the cautious reading: the
//! server would keep those made before a savepoint the client then rolled back to).
//!
//! What a message does is noted when it goes to the server (`note`, `tx_op`); errors and the
//! transaction status arrive with the replies (`error`, `settle`). pgtenant holds the client's
//! next batch until a batch that noted changes has been answered, so a batch's messages and its
//! replies never interleave with another's.

use crate::sql::savepoint::TxOp;
use crate::sql::set::Change;

#[derive(Debug, Default)]
pub struct PendingSets {
    changes: Vec<Change>,
    /// Savepoints defined while changes are pending, with how many changes preceded each.
    marks: Vec<(Box<str>, usize)>,
    /// An error happened in the transaction: none of its changes stay.
    failed: bool,
}

impl PendingSets {
    /// No change waits for its transaction's outcome.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn note(&mut self, changes: &[Change]) {
        if self.changes.is_empty() {
            self.failed = false; // an error before any change pending undid none of them
        }
        self.changes.extend_from_slice(changes);
    }

    /// The changes whose transaction has not ended yet.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// A message that defines, releases or rolls back to a savepoint, or rolls back, went out.
    pub fn tx_op(&mut self, op: &TxOp) {
        match op {
            TxOp::Savepoint(name) => self.marks.push((name.clone(), self.changes.len())),
            TxOp::Release(name) => match self.marks.iter().rposition(|(n, _)| n == name) {
                Some(at) => self.marks.truncate(at),
                None => self.marks.clear(),
            },
            TxOp::RollbackTo(name) => match self.marks.iter().rposition(|(n, _)| n == name) {
                Some(at) => {
                    // the savepoint stays; those defined after it are gone
                    self.changes.truncate(self.marks[at].1);
                    self.marks.truncate(at + 1);
                }
                None => self.rollback(), // defined before any change, or not known here
            },
            TxOp::Rollback => self.rollback(),
        }
    }

    fn rollback(&mut self) {
        self.changes.clear();
        self.marks.clear();
    }

    /// The server reported an error: the transaction keeps none of the changes pending. (One that
    /// arrives with none pending is about something before them: a statement of an earlier
    /// transaction, or of this one before a `ROLLBACK TO` that recovered from it.)
    pub fn error(&mut self) {
        if !self.changes.is_empty() {
            self.failed = true;
        }
    }

    /// Every reply is in and the last is a ReadyForQuery with transaction status `status`: the
    /// changes to keep, once their transaction is over. Inside a block (`T`, or `E`) they wait for
    /// its end.
    pub fn settle(&mut self, status: u8) -> Option<Vec<Change>> {
        if status != b'I' {
            return None;
        }
        let kept = !self.failed && !self.changes.is_empty();
        let changes = std::mem::take(&mut self.changes);
        self.marks.clear();
        self.failed = false;
        kept.then_some(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &str) -> Change {
        Change::Set("work_mem".into(), v.into())
    }

    fn sp(n: &str) -> TxOp {
        TxOp::Savepoint(n.into())
    }

    #[test]
    fn kept_when_the_transaction_commits() {
        let mut p = PendingSets::default();
        p.note(&[set("1MB")]);
        assert_eq!(p.settle(b'T'), None, "inside a block: wait");
        p.note(&[set("2MB")]);
        assert_eq!(p.settle(b'I'), Some(vec![set("1MB"), set("2MB")]));
        assert!(p.is_empty());
    }

    #[test]
    fn undone_by_rollback_and_errors() {
        let mut p = PendingSets::default();
        p.note(&[set("1MB")]);
        p.tx_op(&TxOp::Rollback);
        p.note(&[set("2MB")]); // after the rollback: a transaction of its own
        assert_eq!(p.settle(b'I'), Some(vec![set("2MB")]));
        p.error(); // before any change: about something else
        p.note(&[set("3MB")]);
        p.tx_op(&sp("a"));
        p.error();
        assert_eq!(p.settle(b'E'), None);
        p.tx_op(&TxOp::RollbackTo("a".into()));
        assert_eq!(p.settle(b'I'), None, "the error stays: nothing of the transaction is kept");
        p.note(&[set("4MB")]);
        assert_eq!(p.settle(b'I'), Some(vec![set("4MB")]), "the next transaction starts clean");
    }

    #[test]
    fn savepoints() {
        let mut p = PendingSets::default();
        p.note(&[set("1MB")]);
        p.tx_op(&sp("a"));
        p.note(&[set("2MB")]);
        p.tx_op(&sp("b"));
        p.note(&[set("3MB")]);
        p.tx_op(&TxOp::RollbackTo("b".into()));
        p.note(&[set("4MB")]);
        p.tx_op(&TxOp::RollbackTo("b".into())); // b stays after a rollback to it
        p.tx_op(&TxOp::Release("b".into()));
        p.tx_op(&TxOp::RollbackTo("a".into()));
        assert_eq!(p.settle(b'I'), Some(vec![set("1MB")]));
        // a savepoint defined twice: the later one counts
        p.tx_op(&sp("a"));
        p.note(&[set("1MB")]);
        p.tx_op(&sp("a"));
        p.note(&[set("2MB")]);
        p.tx_op(&TxOp::RollbackTo("a".into()));
        assert_eq!(p.settle(b'I'), Some(vec![set("1MB")]));
        // one it does not know undoes everything
        p.note(&[set("1MB")]);
        p.tx_op(&TxOp::RollbackTo("zz".into()));
        assert_eq!(p.settle(b'I'), None);
    }
}
