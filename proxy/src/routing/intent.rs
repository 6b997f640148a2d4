//! Whether a transaction that is about to start may run on a read replica, decided from what is
//! known before its backend is leased: the first message's SQL (`BEGIN READ ONLY`, `START
//! TRANSACTION READ ONLY`), the session's `default_transaction_read_only`, and the client's
//! `target_session_attrs` startup parameter. Pure functions, so every case is a unit test.

use crate::error::{sqlstate, PgError};
use crate::sql::lexer::{Kind, Token};

/// The startup parameter a client names its preference with (libpq's connection option, which
/// libpq itself does not send: give it as a startup parameter or `options=-c target_session_attrs=…`).
pub const TARGET_SESSION_ATTRS: &str = "target_session_attrs";

/// The access mode a transaction's first statement asks for, if it names one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    ReadOnly,
    ReadWrite,
}

/// `BEGIN … READ ONLY` / `START TRANSACTION … READ WRITE` as the first statement of `sql`; None for
/// anything else (a plain `BEGIN`, `SET TRANSACTION READ ONLY`, an ordinary statement).
#[cfg(test)]
fn opening_mode(sql: &[u8]) -> Option<Mode> {
    statement_mode(crate::sql::split(sql).first()?)
}

/// [`opening_mode`] of a query string's first statement, as tokens (`crate::sql::analyze` has
/// split the text already: the session reads it from there, for every Query and Parse).
#[inline]
pub fn statement_mode(toks: &[Token<'_>]) -> Option<Mode> {
    let first = toks.first()?;
    if first.kind != Kind::Word || !(first.is_word("begin") || first.is_word("start")) {
        return None; // the common case
    }
    let is = |i: usize, kw: &str| toks.get(i).is_some_and(|t| t.is_word(kw));
    let modes = if is(0, "begin") {
        if is(1, "work") || is(1, "transaction") { 2 } else { 1 }
    } else if is(0, "start") && is(1, "transaction") {
        2
    } else {
        return None;
    };
    let rest = &toks[modes.min(toks.len())..];
    let mut mode = None;
    for pair in rest.windows(2) {
        if pair[0].is_word("read") && pair[1].is_word("only") {
            mode = Some(Mode::ReadOnly);
        } else if pair[0].is_word("read") && pair[1].is_word("write") {
            mode = Some(Mode::ReadWrite);
        }
    }
    mode // the last one named wins, as in the server
}

/// Whether a `default_transaction_read_only` value turns read-only on (the server's boolean
/// spellings).
pub fn is_on(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "on" | "true" | "yes" | "1" | "t" | "y")
}

/// Reads `target_session_attrs`: true when the client prefers a standby (`read-only`, `standby`,
/// `prefer-standby`), false for `any`, `read-write` and `primary`. Any other value is refused as
/// libpq refuses it.
pub fn prefers_standby(value: &str) -> Result<bool, PgError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "read-only" | "standby" | "prefer-standby" => Ok(true),
        "any" | "read-write" | "primary" => Ok(false),
        _ => Err(PgError::fatal(
            sqlstate::INVALID_PARAMETER_VALUE,
            format!("invalid value for parameter \"{TARGET_SESSION_ATTRS}\": \"{}\"", value.chars().take(64).collect::<String>()),
        )
        .with_hint("valid values: any, read-write, primary, read-only, standby, prefer-standby")),
    }
}

/// The client's `target_session_attrs` (startup packet key, else `options=-c
/// target_session_attrs=…`), read as [`prefers_standby`]; false when not given.
pub fn startup_prefers_standby(params: &std::collections::HashMap<String, String>) -> Result<bool, PgError> {
    let from_options = params
        .get("options")
        .map(|o| crate::protocol::options::option_pairs(o))
        .unwrap_or_default()
        .into_iter()
        .rev()
        .find(|(k, _)| k.eq_ignore_ascii_case(TARGET_SESSION_ATTRS))
        .map(|(_, v)| v);
    match params.get(TARGET_SESSION_ATTRS).cloned().or(from_options) {
        Some(v) => prefers_standby(&v),
        None => Ok(false),
    }
}

/// The routing decision for a transaction: a replica when its first statement says `READ ONLY`,
/// or when it names no mode and the session reads only (`default_transaction_read_only`) or
/// prefers a standby (`target_session_attrs`).
pub fn wants_replica(opening: Option<Mode>, default_read_only: bool, prefers_standby: bool) -> bool {
    match opening {
        Some(Mode::ReadOnly) => true,
        Some(Mode::ReadWrite) => false,
        None => default_read_only || prefers_standby,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_opening_mode() {
        assert_eq!(opening_mode(b"BEGIN READ ONLY"), Some(Mode::ReadOnly));
        assert_eq!(opening_mode(b"begin transaction isolation level repeatable read, read only; select 1"), Some(Mode::ReadOnly));
        assert_eq!(opening_mode(b"START TRANSACTION READ ONLY"), Some(Mode::ReadOnly));
        assert_eq!(opening_mode(b"BEGIN READ WRITE"), Some(Mode::ReadWrite));
        assert_eq!(opening_mode(b"BEGIN READ ONLY, READ WRITE"), Some(Mode::ReadWrite));
        assert_eq!(opening_mode(b"BEGIN"), None);
        assert_eq!(opening_mode(b"SET TRANSACTION READ ONLY"), None);
        assert_eq!(opening_mode(b"SELECT 'begin read only'"), None);
        assert_eq!(opening_mode(b"/* c */ ; begin work read only"), Some(Mode::ReadOnly));
        assert_eq!(opening_mode(b"BEGIN; SET TRANSACTION READ ONLY"), None);
    }

    #[test]
    fn decides_replica_or_primary() {
        assert!(wants_replica(Some(Mode::ReadOnly), false, false));
        assert!(!wants_replica(Some(Mode::ReadWrite), true, true));
        assert!(!wants_replica(None, false, false)); // a plain BEGIN or statement: the primary
        assert!(wants_replica(None, true, false));
        assert!(wants_replica(None, false, true));
        assert!(is_on(" On") && is_on("1") && !is_on("off") && !is_on(""));
        assert!(prefers_standby("prefer-standby").unwrap() && !prefers_standby("any").unwrap());
        assert_eq!(prefers_standby("bogus").unwrap_err().code, sqlstate::INVALID_PARAMETER_VALUE);
        let params = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(startup_prefers_standby(&params(&[("options", "-c target_session_attrs=read-only")])).unwrap());
        assert!(startup_prefers_standby(&params(&[("options", "--target-session-attrs=standby")])).unwrap());
        assert!(!startup_prefers_standby(&params(&[("options", "-c x.y=1"), ("target_session_attrs", "any")])).unwrap());
        assert!(!startup_prefers_standby(&params(&[])).unwrap());
    }
}
