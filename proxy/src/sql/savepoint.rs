//! What a statement does to the transaction's savepoints and to its outcome, read so that pgtenant
//! keeps a client's session-level `SET` exactly when the server does: when the transaction it ran
//! in commits, minus what a `ROLLBACK TO SAVEPOINT` undid (see `crate::session::pending`).

use super::lexer::{Kind, Token};
use super::literal::ident_value;

/// A statement's effect on the savepoints and the outcome of its transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxOp {
    /// `SAVEPOINT name` (the name as the server folds it).
    Savepoint(Box<str>),
    /// `RELEASE [SAVEPOINT] name`.
    Release(Box<str>),
    /// `ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] name`.
    RollbackTo(Box<str>),
    /// `ROLLBACK` / `ABORT` (with or without `AND CHAIN`), or a query string of several statements
    /// that may roll back: nothing done in the transaction so far stays.
    Rollback,
}

/// The [`TxOp`] of a query string (split into statements), if any. Several statements are read
/// as one rollback if any of them may roll back, and as nothing otherwise (a savepoint defined in
/// a longer string is not tracked: a later `ROLLBACK TO` it then undoes everything, the cautious
/// reading).
pub fn op_of(statements: &[Vec<Token<'_>>]) -> Option<TxOp> {
    match statements {
        [one] => op(one),
        _ => statements.iter().flatten().any(|t| t.is_word("rollback") || t.is_word("abort")).then_some(TxOp::Rollback),
    }
}

fn op(toks: &[Token<'_>]) -> Option<TxOp> {
    let first = toks.first()?;
    let name = |t: Option<&Token<'_>>| -> Option<Box<str>> {
        let t = t.filter(|t| matches!(t.kind, Kind::Word | Kind::QuotedIdent))?;
        ident_value(t).map(|n| n.into())
    };
    let at = |i: usize, kw: &str| toks.get(i).is_some_and(|t| t.is_word(kw));
    let last_at = |i: usize| toks.len() == i + 1;
    if first.is_word("savepoint") {
        return Some(name(toks.get(1)).filter(|_| last_at(1)).map_or(TxOp::Rollback, TxOp::Savepoint));
    }
    if first.is_word("release") {
        let i = if at(1, "savepoint") { 2 } else { 1 };
        return Some(name(toks.get(i)).filter(|_| last_at(i)).map_or(TxOp::Rollback, TxOp::Release));
    }
    if first.is_word("rollback") || first.is_word("abort") {
        let mut i = 1;
        if at(i, "work") || at(i, "transaction") {
            i += 1;
        }
        if first.is_word("rollback") && at(i, "to") {
            i += 1;
            if at(i, "savepoint") {
                i += 1;
            }
            return Some(name(toks.get(i)).filter(|_| last_at(i)).map_or(TxOp::Rollback, TxOp::RollbackTo));
        }
        return Some(TxOp::Rollback);
    }
    // anything else that mentions a rollback is read as one (the cautious reading)
    toks.iter().any(|t| t.is_word("rollback") || t.is_word("abort")).then_some(TxOp::Rollback)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::split;

    fn of(sql: &str) -> Option<TxOp> {
        op_of(&split(sql.as_bytes()))
    }

    #[test]
    fn savepoint_statements() {
        let sp = |n: &str| Some(TxOp::Savepoint(n.into()));
        assert_eq!(of("SAVEPOINT a"), sp("a"));
        assert_eq!(of("savepoint A"), sp("a"));
        assert_eq!(of("SAVEPOINT \"A b\""), sp("A b"));
        assert_eq!(of("RELEASE SAVEPOINT a"), Some(TxOp::Release("a".into())));
        assert_eq!(of("release a"), Some(TxOp::Release("a".into())));
        for sql in ["ROLLBACK TO a", "rollback to savepoint a", "ROLLBACK WORK TO SAVEPOINT A", "rollback transaction to a"] {
            assert_eq!(of(sql), Some(TxOp::RollbackTo("a".into())), "{sql}");
        }
        for sql in ["ROLLBACK", "abort", "ROLLBACK AND CHAIN", "rollback work", "select 1; rollback", "select 1 as rollback"] {
            assert_eq!(of(sql), Some(TxOp::Rollback), "{sql}");
        }
        for sql in ["COMMIT", "BEGIN", "select 1", "SET work_mem = '8MB'", "SAVEPOINT a; SET x = 1", ""] {
            assert_eq!(of(sql), None, "{sql}");
        }
        // what it cannot read is a rollback, never nothing
        assert_eq!(of("SAVEPOINT"), Some(TxOp::Rollback));
        assert_eq!(of("ROLLBACK TO a b"), Some(TxOp::Rollback));
    }
}
