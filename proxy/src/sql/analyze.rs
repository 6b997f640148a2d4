//! One pass over a query string for everything the session decides about it.
//!
//! The text is lexed once (`super::split`); every question the session asks — how the statements
//! affect the transaction, whether they set up its modes, leave session state, touch prepared
//! statements, change session settings — is answered from those tokens. The statement guard and the
//! pooling check read the same token lists. Answers come from tokens, never substrings: a column
//! named `prepared_at` or `template_id` is a word of its own.

use super::lexer::{Kind, Token};
use super::set::Change;
use super::stateless::Leaves;
use super::txmode::{self, Opening};
use super::{split, tx_effect, TxEffect};

/// What a query string (or a Parse's statement) does, as far as the session is concerned.
#[derive(Debug)]
pub struct Analysis<'a> {
    /// Non-empty statements, as tokens.
    pub statements: Vec<Vec<Token<'a>>>,
    /// The first statement's effect on the transaction block.
    pub first: TxEffect,
    /// A transaction-ending statement is followed by another statement.
    pub ends_tx_midway: bool,
    /// How the string opens with respect to transaction modes.
    pub opening: Opening,
    /// Exactly `DISCARD ALL`.
    pub discard_all: bool,
    /// Exactly `DEALLOCATE [PREPARE] name`: the name.
    pub deallocate: Option<String>,
    /// Some statement is `DEALLOCATE [PREPARE] ALL`.
    pub deallocates_all: bool,
    /// Some statement could drop or replace SQL-level prepared statements (`PREPARE`,
    /// `DEALLOCATE`, `DISCARD`, as words).
    pub touches_prepared: bool,
    /// What the statements may leave on the session, at most (see `super::stateless`).
    pub leaves: Leaves,
    /// The last statement ends the transaction `AND CHAIN`.
    pub chain: bool,
    /// What it does to savepoints and to its transaction's outcome (`ROLLBACK`, `ROLLBACK TO`,
    /// `SAVEPOINT`, `RELEASE`): which session SETs noted before it the server keeps.
    pub tx_op: Option<super::savepoint::TxOp>,
    /// Session-level setting changes, in order (`SET`, `RESET`, `SET SESSION CHARACTERISTICS`,
    /// a whole-statement `set_config(…, false)`).
    pub changes: Vec<Change>,
}

pub fn analyze(sql: &[u8]) -> Analysis<'_> {
    let statements = split(sql);
    let effect = |t: &Vec<Token<'_>>| tx_effect(t.first().copied(), t.get(1).copied());
    let n = statements.len();
    let only = |f: &dyn Fn(&[Token<'_>]) -> bool| n == 1 && f(&statements[0]);
    let words = |w: &[&str]| statements.iter().flatten().any(|t| t.kind == Kind::Word && w.iter().any(|x| t.is_word(x)));
    let deallocate = if n == 1 { deallocate_target(&statements[0]) } else { None };
    Analysis {
        first: statements.first().map_or(TxEffect::None, effect),
        ends_tx_midway: statements.iter().take(n.saturating_sub(1)).any(|t| effect(t) == TxEffect::End),
        opening: txmode::opening_of(&statements),
        discard_all: only(&|t| t.len() == 2 && t[0].is_word("discard") && t[1].is_word("all")),
        deallocates_all: statements.iter().any(|t| is_deallocate_all(t)),
        touches_prepared: words(&["prepare", "deallocate", "discard"]),
        leaves: statements.iter().map(|t| super::stateless::statement_leaves(t)).max().unwrap_or_default(),
        chain: statements.last().is_some_and(|t| ends_and_chain(t)),
        tx_op: super::savepoint::op_of(&statements),
        changes: super::set::changes_of(&statements),
        deallocate,
        statements,
    }
}

/// `DEALLOCATE [PREPARE] name` (not ALL): the name.
fn deallocate_target(t: &[Token<'_>]) -> Option<String> {
    let name = match t {
        [d, n] if d.is_word("deallocate") => n,
        [d, p, n] if d.is_word("deallocate") && p.is_word("prepare") => n,
        _ => return None,
    };
    if name.is_word("all") {
        return None;
    }
    super::literal_ident(name)
}

fn is_deallocate_all(t: &[Token<'_>]) -> bool {
    t.first().is_some_and(|d| d.is_word("deallocate"))
        && (t.get(1).is_some_and(|a| a.is_word("all"))
            || (t.get(1).is_some_and(|p| p.is_word("prepare")) && t.get(2).is_some_and(|a| a.is_word("all"))))
}

fn ends_and_chain(t: &[Token<'_>]) -> bool {
    let n = t.len();
    tx_effect(t.first().copied(), t.get(1).copied()) == TxEffect::End && n >= 3 && t[n - 1].is_word("chain") && t[n - 2].is_word("and")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The single pass agrees with the separate readers it replaces.
    #[test]
    fn agrees_with_the_separate_readers() {
        let samples = [
            "select 1",
            "BEGIN; select 1; COMMIT",
            "commit; select * from orders",
            "COMMIT AND CHAIN",
            "DISCARD ALL",
            " discard all ; ",
            "DISCARD ALL; select 1",
            "DEALLOCATE _pg3_0",
            "deallocate prepare \"S_1\"",
            "DEALLOCATE ALL",
            "select 1; DEALLOCATE PREPARE ALL",
            "select prepared_at, template_id from t",
            "PREPARE q AS select 1",
            "SET search_path = x",
            "select 1; reset statement_timeout",
            "SET LOCAL statement_timeout = 1",
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SELECT set_config('client_encoding', 'UTF8', false)",
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT 1",
            "rollback to savepoint a; select 1",
            "create function f() returns int begin atomic select 1; end; select 2",
            "insert into orders values (1) returning id",
            "select 'commit; select 1'",
            "",
        ];
        for sql in samples {
            let a = analyze(sql.as_bytes());
            let s = super::super::summarize(sql.as_bytes());
            assert_eq!((a.first, a.ends_tx_midway), (s.first, s.ends_tx_midway), "{sql}");
            assert_eq!(a.discard_all, super::super::is_discard_all(sql.as_bytes()), "{sql}");
            assert_eq!(a.deallocate, super::super::deallocate_name(sql.as_bytes()), "{sql}");
            assert_eq!(a.deallocates_all, super::super::deallocates_all(sql.as_bytes()), "{sql}");
            assert_eq!(a.chain, super::super::chains(sql.as_bytes()), "{sql}");
            assert_eq!(a.leaves == Leaves::Nothing, super::super::stateless::is_stateless(sql.as_bytes()), "{sql}");
            assert_eq!(a.opening, txmode::opening(sql.as_bytes()), "{sql}");
            assert_eq!(a.changes, super::super::set::session_changes(sql.as_bytes()), "{sql}");
        }
        assert!(!analyze(b"select prepared_at, template_id from t").touches_prepared);
        assert!(analyze(b"PREPARE q AS select 1").touches_prepared);
        assert!(analyze(b"select 1; discard plans").touches_prepared);
    }
}
