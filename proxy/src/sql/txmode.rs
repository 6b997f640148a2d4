//! Statements that choose a transaction's characteristics (isolation level, read-only,
//! deferrable, an imported snapshot), read so the context statement never gets in their way.
//!
//! The server accepts `SET TRANSACTION ISOLATION LEVEL …` (and the same modes on `BEGIN`) only
//! before the transaction's first snapshot, and pgtenant's context statement is a `SELECT`, which
//! takes one. So the context is placed after these statements: a message made only of them
//! (`BEGIN ISOLATION LEVEL SERIALIZABLE`, `SET TRANSACTION READ ONLY`, `SET transaction_isolation`,
//! …) goes to the server without the context, which then goes in front of the client's next message.
//! None of them takes a snapshot or runs user code (the server's own list: transaction control and
//! `SET` need no snapshot), so nothing reads or writes data without the tenant context.
//!
//! The session-level defaults (`default_transaction_isolation` & co., and `SET SESSION
//! CHARACTERISTICS AS TRANSACTION …`) are different: the server applies them when a transaction
//! starts, so pgtenant sets them on the backend before the transaction (see `TxDefaults`).

use super::lexer::{Kind, Token};
use super::set::Change;
use super::split;

/// How a query string opens, as far as transaction characteristics go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// Only transaction-setup statements (`BEGIN`/`START TRANSACTION` with or without modes,
    /// `SET TRANSACTION …`, `SET [LOCAL] transaction_isolation …`, `SET SESSION CHARACTERISTICS`):
    /// the context can wait for the next message.
    SetupOnly,
    /// Setup statements that choose modes come before other statements in the same string: the
    /// context can go neither in front (it would take the snapshot first) nor after.
    ModesThenWork,
    /// Anything else: the context goes in front as usual.
    Work,
}

/// Reads the leading statements of a query string.
pub fn opening(sql: &[u8]) -> Opening {
    // most messages are plain statements: one token decides
    let first = super::lexer::Lexer::new(sql).find(|t| t.kind != Kind::Semicolon);
    if !first.is_some_and(|t| t.is_word("begin") || t.is_word("start") || t.is_word("set") || t.is_word("reset")) {
        return Opening::Work;
    }
    opening_of(&split(sql))
}

/// [`opening`] of statements already split.
pub fn opening_of(statements: &[Vec<Token<'_>>]) -> Opening {
    let mut modes = false;
    let mut any = false;
    for toks in statements {
        match setup(toks) {
            Some(m) => {
                modes |= m;
                any = true;
            }
            None if modes => return Opening::ModesThenWork,
            None => return Opening::Work,
        }
    }
    if any { Opening::SetupOnly } else { Opening::Work }
}

/// `Some(chooses_modes)` when the statement is transaction setup; `None` otherwise.
fn setup(toks: &[Token<'_>]) -> Option<bool> {
    let w = |i: usize| toks.get(i).filter(|t| t.kind == Kind::Word);
    let is = |i: usize, kw: &str| w(i).is_some_and(|t| t.is_word(kw));
    if is(0, "begin") {
        let mut i = 1;
        if is(1, "work") || is(1, "transaction") {
            i = 2;
        }
        return modes_at(toks, i);
    }
    if is(0, "start") && is(1, "transaction") {
        return modes_at(toks, 2);
    }
    if !is(0, "set") && !is(0, "reset") {
        return None;
    }
    if is(0, "set") && is(1, "transaction") {
        return Some(true); // modes or SNAPSHOT 'id'
    }
    if is(1, "session") && is(2, "characteristics") {
        return Some(false); // session defaults: not this transaction's
    }
    // the transaction_* settings themselves; not other SETs: some build on the session's current
    // value (`SET DateStyle = 'SQL'` keeps the client's day order), so they need the client's
    // settings, which the context statement applies, in front of them
    let i = if is(1, "local") || is(1, "session") { 2 } else { 1 };
    let name = toks.get(i).and_then(crate::sql::literal::ident_value)?;
    let dotted = toks.get(i + 1).is_some_and(|t| t.kind == Kind::Op && t.text == b".");
    (!dotted && matches!(&*name, "transaction_isolation" | "transaction_read_only" | "transaction_deferrable")).then_some(true)
}

/// Transaction modes from `toks[i..]` to the end: `Some(any)` when they all are modes.
fn modes_at(toks: &[Token<'_>], i: usize) -> Option<bool> {
    let rest = toks.get(i..)?;
    let ok = rest.iter().all(|t| {
        (t.kind == Kind::Op && t.text == b",")
            || (t.kind == Kind::Word
                && ["isolation", "level", "serializable", "repeatable", "read", "committed", "uncommitted", "only", "write", "not", "deferrable"]
                    .iter()
                    .any(|kw| t.is_word(kw)))
    });
    ok.then_some(!rest.is_empty())
}

/// `SET SESSION CHARACTERISTICS AS TRANSACTION <modes>` as changes of the three session defaults.
pub fn characteristics_changes(toks: &[Token<'_>]) -> Option<Vec<Change>> {
    let is = |i: usize, kw: &str| toks.get(i).is_some_and(|t| t.is_word(kw));
    if !(is(0, "set") && is(1, "session") && is(2, "characteristics") && is(3, "as") && is(4, "transaction")) {
        return None;
    }
    let words: Vec<String> = toks[5..]
        .iter()
        .filter(|t| !(t.kind == Kind::Op && t.text == b","))
        .map(|t| (t.kind == Kind::Word).then(|| String::from_utf8_lossy(t.text).to_lowercase()))
        .collect::<Option<_>>()?;
    let mut out = Vec::new();
    let mut i = 0;
    let at = |i: usize| words.get(i).map(String::as_str);
    while i < words.len() {
        match (at(i), at(i + 1), at(i + 2), at(i + 3)) {
            (Some("isolation"), Some("level"), Some("read"), Some(l @ ("committed" | "uncommitted"))) => {
                out.push(Change::Set(ISOLATION.into(), format!("read {l}")));
                i += 4;
            }
            (Some("isolation"), Some("level"), Some("repeatable"), Some("read")) => {
                out.push(Change::Set(ISOLATION.into(), "repeatable read".into()));
                i += 4;
            }
            (Some("isolation"), Some("level"), Some("serializable"), _) => {
                out.push(Change::Set(ISOLATION.into(), "serializable".into()));
                i += 3;
            }
            (Some("read"), Some(m @ ("only" | "write")), _, _) => {
                out.push(Change::Set(READ_ONLY.into(), if m == "only" { "on" } else { "off" }.into()));
                i += 2;
            }
            (Some("deferrable"), _, _, _) => {
                out.push(Change::Set(DEFERRABLE.into(), "on".into()));
                i += 1;
            }
            (Some("not"), Some("deferrable"), _, _) => {
                out.push(Change::Set(DEFERRABLE.into(), "off".into()));
                i += 2;
            }
            _ => return None, // the server rejects it
        }
    }
    (!out.is_empty()).then_some(out)
}

pub const ISOLATION: &str = "default_transaction_isolation";
pub const READ_ONLY: &str = "default_transaction_read_only";
pub const DEFERRABLE: &str = "default_transaction_deferrable";

/// The client's session defaults for new transactions, as the SQL that gives a backend exactly
/// those (run as its own statement before the transaction starts: a session-level setting applied
/// inside the transaction would come too late). Empty when the client keeps the role's defaults.
pub fn defaults_sql(effective: &[(String, String)]) -> String {
    let mut parts = Vec::new();
    let mut any = false;
    for name in [ISOLATION, READ_ONLY, DEFERRABLE] {
        match effective.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            // an invalid value is left to the context statement's set_config, which reports it
            // as the server would
            Some((_, v)) if valid_default(name, v) => {
                any = true;
                parts.push(format!("SET {name} TO {}", quote_literal(v)));
            }
            _ => parts.push(format!("RESET {name}")),
        }
    }
    if any { parts.join("; ") } else { String::new() }
}

/// Gives a backend its role's defaults back (after `defaults_sql` changed them).
pub const RESET_DEFAULTS: &str =
    "RESET default_transaction_isolation; RESET default_transaction_read_only; RESET default_transaction_deferrable";

/// Values the server accepts for the three defaults (so the statement cannot fail).
fn valid_default(name: &str, v: &str) -> bool {
    let v = v.trim().to_lowercase();
    if name == ISOLATION {
        return ["serializable", "repeatable read", "read committed", "read uncommitted", "default"].contains(&v.as_str());
    }
    ["on", "off", "true", "false", "yes", "no", "1", "0", "t", "f", "y", "n"].contains(&v.as_str())
}

/// An `E'…'` literal: reads the same whatever `standard_conforming_strings` says.
pub fn quote_literal(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 3);
    out.push_str("E'");
    for c in v.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openings() {
        for sql in [
            "BEGIN",
            "begin isolation level serializable",
            "BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY, DEFERRABLE",
            "START TRANSACTION READ WRITE",
            "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET TRANSACTION SNAPSHOT '00000003-0000001B-1'",
            "set local transaction_isolation = 'serializable'",
            "SET transaction_read_only TO on",
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "begin work;",
            "reset transaction_isolation",
        ] {
            assert_eq!(opening(sql.as_bytes()), Opening::SetupOnly, "{sql}");
        }
        for sql in [
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT 1",
            "begin; set transaction read only; select * from orders",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; INSERT INTO t VALUES (1)",
            "reset transaction_isolation; select 1",
        ] {
            assert_eq!(opening(sql.as_bytes()), Opening::ModesThenWork, "{sql}");
        }
        for sql in [
            "BEGIN; SELECT 1",
            "SELECT 1; BEGIN ISOLATION LEVEL SERIALIZABLE",
            "select 1",
            "",
            "begin isolation level serializable read only select",
            "SET statement_timeout = 5",
            "SET DateStyle = 'SQL'",
            "BEGIN; SET LOCAL statement_timeout = 5; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET app.transaction_isolation = 'x'",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY; SELECT 1",
        ] {
            assert_eq!(opening(sql.as_bytes()), Opening::Work, "{sql}");
        }
    }

    #[test]
    fn session_characteristics() {
        let toks = &split(b"SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY NOT DEFERRABLE")[0];
        assert_eq!(
            characteristics_changes(toks).unwrap(),
            [
                Change::Set(ISOLATION.into(), "repeatable read".into()),
                Change::Set(READ_ONLY.into(), "on".into()),
                Change::Set(DEFERRABLE.into(), "off".into()),
            ]
        );
        assert!(characteristics_changes(&split(b"SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL bogus")[0]).is_none());
    }

    #[test]
    fn defaults_statement() {
        let eff = vec![("Default_Transaction_Isolation".to_string(), "serializable".to_string()), ("timezone".into(), "UTC".into())];
        assert_eq!(
            defaults_sql(&eff),
            "SET default_transaction_isolation TO E'serializable'; RESET default_transaction_read_only; RESET default_transaction_deferrable"
        );
        assert_eq!(defaults_sql(&[("default_transaction_read_only".into(), "on'; drop".into())]), "");
        assert_eq!(defaults_sql(&[]), "");
        assert_eq!(quote_literal("a'b\\c"), "E'a''b\\\\c'");
    }
}
