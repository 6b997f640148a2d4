//! What pgtenant needs to know about client SQL before forwarding it: where statements begin and
//! end, and which of them start or end a transaction (after a transaction ends, the tenant context
//! set with `set_config(..., true)` is gone, so nothing may run after it without a new context).

pub mod analyze;
pub mod fingerprint;
pub mod lexer;
pub mod literal;
pub mod pooling;
pub mod savepoint;
pub mod set;
pub mod set_config;
pub mod stateless;
pub mod txmode;

use lexer::{Kind, Lexer, Token};

/// Splits into statements (token lists), keeping `BEGIN ATOMIC … END` bodies whole.
///
/// A `U&'…'` or `U&"…"` token followed by `UESCAPE '…'` becomes one token spanning the whole
/// clause (the server's grammar reads them together: the escape character changes what the
/// literal means), so every reader of a token list decodes it with its escape character.
pub fn split(sql: &[u8]) -> Vec<Vec<Token<'_>>> {
    let mut out = Vec::with_capacity(1);
    // room for a short statement's tokens up front: no regrowing on the hot path
    let mut cur: Vec<Token<'_>> = Vec::with_capacity((sql.len() / 3 + 2).min(64));
    let mut atomic = 0u32;
    for t in with_uescape(sql, Lexer::new(sql)) {
        if t.kind == Kind::Semicolon && atomic == 0 {
            if !cur.is_empty() {
                let next = t.text.as_ptr() as usize - sql.as_ptr() as usize + 1;
                out.push(std::mem::replace(&mut cur, Vec::with_capacity(room_for(sql, next))));
            }
            continue;
        }
        if t.is_word("atomic") && cur.last().is_some_and(|p| p.is_word("begin")) {
            atomic += 1;
        } else if t.is_word("end") && atomic > 0 {
            atomic -= 1;
        }
        cur.push(t);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Room for the tokens of a statement after the first, which starts at `from`: about one per three
/// bytes up to the next `;` byte, so its list is allocated once, not regrown token by token (a
/// query string of several statements paid a `realloc` per doubling of each).
fn room_for(sql: &[u8], from: usize) -> usize {
    let rest = sql.get(from..).unwrap_or_default();
    let len = memchr::memchr(b';', rest).unwrap_or(rest.len());
    (len / 3 + 2).min(64)
}

/// An identifier token's value (see `literal::ident_value`).
pub(crate) fn literal_ident(t: &Token<'_>) -> Option<String> {
    literal::ident_value(t).map(std::borrow::Cow::into_owned)
}

/// Merges `U&… UESCAPE '…'` into one token (see [`split`]).
fn with_uescape<'a>(sql: &'a [u8], lexer: Lexer<'a>) -> impl Iterator<Item = Token<'a>> {
    let mut lexer = lexer.peekable();
    let mut pending: std::collections::VecDeque<Token<'a>> = Default::default();
    std::iter::from_fn(move || {
        if let Some(t) = pending.pop_front() {
            return Some(t);
        }
        let t = lexer.next()?;
        if !literal::is_unicode_form(&t) || !lexer.peek().is_some_and(|n| n.is_word("uescape")) {
            return Some(t);
        }
        let kw = lexer.next().expect("peeked");
        match lexer.peek() {
            Some(lit) if lit.kind == Kind::String => {
                let lit = lexer.next().expect("peeked");
                let start = t.text.as_ptr() as usize - sql.as_ptr() as usize;
                let end = lit.text.as_ptr() as usize - sql.as_ptr() as usize + lit.text.len();
                Some(Token { kind: t.kind, text: &sql[start..end] })
            }
            _ => {
                pending.push_back(kw);
                Some(t)
            }
        }
    })
}

/// How a statement affects the transaction block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxEffect {
    None,
    /// BEGIN / START TRANSACTION.
    Begin,
    /// COMMIT, END, ROLLBACK, ABORT (not ROLLBACK TO), PREPARE TRANSACTION, COMMIT/ROLLBACK PREPARED.
    End,
    /// ROLLBACK TO SAVEPOINT: keeps the transaction, but runs even in an aborted one.
    RollbackTo,
}

/// Classifies a statement by its first two tokens.
pub fn tx_effect(first: Option<Token<'_>>, second: Option<Token<'_>>) -> TxEffect {
    let Some(first) = first else { return TxEffect::None };
    let second_is = |kw: &str| second.is_some_and(|t| t.is_word(kw));
    if first.is_word("begin") || (first.is_word("start") && second_is("transaction")) {
        TxEffect::Begin
    } else if first.is_word("rollback") && second_is("to") {
        TxEffect::RollbackTo
    } else if first.is_word("commit")
        || first.is_word("end")
        || first.is_word("abort")
        || first.is_word("rollback")
        || (first.is_word("prepare") && second_is("transaction"))
    {
        TxEffect::End
    } else {
        TxEffect::None
    }
}

/// The last statement ends the transaction `AND CHAIN`: the server starts a new transaction at
/// once, which has none of the previous one's transaction-local settings (the tenant context).
pub fn chains(sql: &[u8]) -> bool {
    if !sql.windows(5).any(|w| w.eq_ignore_ascii_case(b"chain")) {
        return false;
    }
    split(sql).last().is_some_and(|toks| {
        let n = toks.len();
        tx_effect(toks.first().copied(), toks.get(1).copied()) == TxEffect::End
            && n >= 3
            && toks[n - 1].is_word("chain")
            && toks[n - 2].is_word("and")
    })
}

/// The statement name of a query string that is exactly `DEALLOCATE [PREPARE] name`.
pub fn deallocate_name(sql: &[u8]) -> Option<String> {
    let toks: Vec<_> = Lexer::new(sql).filter(|t| t.kind != Kind::Semicolon).take(4).collect();
    let name = match toks.as_slice() {
        [d, n] if d.is_word("deallocate") => n,
        [d, p, n] if d.is_word("deallocate") && p.is_word("prepare") => n,
        _ => return None,
    };
    if name.is_word("all") {
        return None;
    }
    literal::ident_value(name).map(std::borrow::Cow::into_owned)
}

/// Some statement of the query string is `DEALLOCATE [PREPARE] ALL`.
pub fn deallocates_all(sql: &[u8]) -> bool {
    split(sql).iter().any(|t| {
        t.first().is_some_and(|d| d.is_word("deallocate"))
            && (t.get(1).is_some_and(|a| a.is_word("all"))
                || (t.get(1).is_some_and(|p| p.is_word("prepare")) && t.get(2).is_some_and(|a| a.is_word("all"))))
    })
}

/// The query string is exactly `DISCARD ALL` (one statement).
pub fn is_discard_all(sql: &[u8]) -> bool {
    let toks: Vec<_> = Lexer::new(sql).filter(|t| t.kind != Kind::Semicolon).take(3).collect();
    toks.len() == 2 && toks[0].is_word("discard") && toks[1].is_word("all")
}

/// Some statement is a session-level `SET` or `RESET` (not `SET LOCAL`), which would outlive the
/// transaction on a pooled backend, or the text calls `set_config` (by its plain name, the one
/// spelling `set::session_changes` keeps).
pub fn has_session_set(sql: &[u8]) -> bool {
    let mut at_start = true;
    let mut lexer = Lexer::new(sql).peekable();
    while let Some(t) = lexer.next() {
        if t.is_word("set_config") {
            return true;
        }
        if t.kind == Kind::Semicolon {
            at_start = true;
            continue;
        }
        if at_start && (t.is_word("set") || t.is_word("reset")) {
            let local = lexer.peek().is_some_and(|n| n.is_word("local") || n.is_word("transaction") || n.is_word("constraints"));
            if !local {
                return true;
            }
        }
        at_start = false;
    }
    false
}

/// What a query string does to transactions, from one pass of the lexer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Non-empty statements.
    pub statements: u32,
    /// The first statement's effect.
    pub first: TxEffect,
    /// A transaction-ending statement is followed by another statement.
    pub ends_tx_midway: bool,
    /// The text has an unterminated literal or comment (the server will reject it).
    pub unterminated: bool,
}

pub fn summarize(sql: &[u8]) -> Summary {
    let mut s = Summary { statements: 0, first: TxEffect::None, ends_tx_midway: false, unterminated: false };
    let mut lexer = Lexer::new(sql);
    let mut pending_end = false;
    loop {
        // first two tokens of the next statement, skipping empty statements
        let mut first = None;
        for t in lexer.by_ref() {
            if t.kind != Kind::Semicolon {
                first = Some(t);
                break;
            }
        }
        let Some(first) = first else { break };
        let mut second = None;
        let mut ended_by_semicolon = false;
        if first.kind == Kind::Unterminated {
            s.unterminated = true;
        }
        let mut atomic_depth = 0u32;
        let mut prev_begin = first.is_word("begin");
        for t in lexer.by_ref() {
            if second.is_none() {
                second = Some(t);
            }
            match t.kind {
                Kind::Unterminated => s.unterminated = true,
                // SQL-standard function bodies: BEGIN ATOMIC ... END; hold their semicolons.
                Kind::Word if prev_begin && t.is_word("atomic") => atomic_depth += 1,
                Kind::Word if atomic_depth > 0 && t.is_word("end") => atomic_depth -= 1,
                Kind::Semicolon if atomic_depth == 0 => {
                    ended_by_semicolon = true;
                    break;
                }
                _ => {}
            }
            prev_begin = t.is_word("begin");
        }
        let effect = tx_effect(Some(first), second.filter(|t| t.kind != Kind::Semicolon));
        if pending_end {
            s.ends_tx_midway = true;
        }
        if s.statements == 0 {
            s.first = effect;
        }
        s.statements += 1;
        pending_end = effect == TxEffect::End;
        if !ended_by_semicolon {
            break;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deallocate_names() {
        assert_eq!(deallocate_name(b"DEALLOCATE _pg3_0").as_deref(), Some("_pg3_0"));
        assert_eq!(deallocate_name(b"deallocate prepare \"S_1\"").as_deref(), Some("S_1"));
        assert_eq!(deallocate_name(b"DEALLOCATE ALL"), None);
        assert_eq!(deallocate_name(b"DEALLOCATE a; select 1"), None);
        assert!(deallocates_all(b"select 1; DEALLOCATE PREPARE ALL"));
        assert!(!deallocates_all(b"DEALLOCATE x"));
    }

    #[test]
    fn discard_all_and_session_set() {
        assert!(is_discard_all(b"DISCARD ALL"));
        assert!(is_discard_all(b" discard all ; "));
        assert!(!is_discard_all(b"DISCARD ALL; select 1"));
        assert!(!is_discard_all(b"DISCARD PLANS"));
        assert!(has_session_set(b"SET search_path = x"));
        assert!(has_session_set(b"select 1; reset statement_timeout"));
        assert!(!has_session_set(b"SET LOCAL statement_timeout = 1"));
        assert!(!has_session_set(b"SET TRANSACTION READ ONLY"));
        assert!(!has_session_set(b"select 'set x = 1' offset 3"));
        assert!(has_session_set(b"select set_config('work_mem', '1MB', false)"));
    }

    #[test]
    fn finds_transaction_boundaries() {
        let s = summarize(b"BEGIN; select 1; COMMIT");
        assert_eq!((s.statements, s.first, s.ends_tx_midway), (3, TxEffect::Begin, false));
        assert!(summarize(b"commit; select * from orders").ends_tx_midway);
        assert!(summarize(b"ROLLBACK ; ; select 1").ends_tx_midway);
        assert!(!summarize(b"rollback to savepoint a; select 1").ends_tx_midway);
        assert!(!summarize(b"select 'commit; select 1'").ends_tx_midway);
        assert!(!summarize(b"COMMIT; -- done\n ;").ends_tx_midway);
        assert_eq!(summarize(b"end").first, TxEffect::End);
        assert_eq!(summarize(b"  ").statements, 0);
        assert!(summarize(b"prepare transaction 'x'; select 1").ends_tx_midway);
        assert!(!summarize(b"create function f() returns int begin atomic select 1; end; select 2").ends_tx_midway);
        assert!(summarize(b"commit and chain; select 1").ends_tx_midway);
    }

    #[test]
    fn chained_ends() {
        for sql in ["COMMIT AND CHAIN", "commit work and chain", "ROLLBACK AND CHAIN;", "end transaction and chain", "abort and chain", "select 1; commit and chain", "COMMIT /* x */ AND --\n CHAIN"] {
            assert!(chains(sql.as_bytes()), "{sql}");
        }
        for sql in ["COMMIT", "COMMIT AND NO CHAIN", "select 'and chain'", "commit and chain; select 1 as chain", "select chain"] {
            assert!(!chains(sql.as_bytes()), "{sql}");
        }
    }
}
