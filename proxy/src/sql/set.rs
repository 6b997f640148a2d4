//! Session-level `SET` / `RESET` statements, read as changes to the client's own settings, so
//! pgtenant can keep them for the client's later transactions on other backends. So is a statement
//! that is exactly `SELECT set_config('name', 'value', false)` with literals (with bind parameters,
//! see `super::set_config`: the values come with the Bind).

use super::lexer::{Kind, Token};
use super::split;
use super::set_config::{self, Arg};
use crate::sql::literal::{ident_value, string_value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Set(String, String),
    /// Back to the session default (the startup value, if any).
    Reset(String),
    ResetAll,
}

/// The session-level changes a query string makes, in order (`SET LOCAL`, `SET TRANSACTION`,
/// `SET CONSTRAINTS` and `SET ROLE`/`SESSION AUTHORIZATION` are not session settings pgtenant
/// keeps; `SET SESSION CHARACTERISTICS AS TRANSACTION …` sets the `default_transaction_*` ones).
pub fn session_changes(sql: &[u8]) -> Vec<Change> {
    changes_of(&split(sql))
}

/// [`session_changes`] of statements already split.
pub fn changes_of(statements: &[Vec<Token<'_>>]) -> Vec<Change> {
    statements
        .iter()
        .flat_map(|toks| super::txmode::characteristics_changes(toks).unwrap_or_else(|| change(toks).into_iter().collect()))
        .collect()
}

fn change(toks: &[Token<'_>]) -> Option<Change> {
    let first = toks.first()?;
    if first.is_word("select") {
        return set_config_change(toks);
    }
    let mut i = 1;
    if toks.get(1).is_some_and(|t| t.is_word("session")) && !toks.get(2).is_some_and(|t| t.is_word("authorization") || t.is_word("characteristics")) {
        i = 2;
    }
    let t = toks.get(i)?;
    if ["local", "transaction", "constraints", "role", "session"].iter().any(|w| t.is_word(w)) {
        return None;
    }
    if first.is_word("reset") {
        if t.is_word("all") {
            return Some(Change::ResetAll);
        }
        return name_at(toks, i).map(|(n, _)| n).filter(|n| !set_config::is_transaction_scoped(n)).map(Change::Reset);
    }
    if !first.is_word("set") {
        return None;
    }
    let (name, next) = if t.is_word("time") && toks.get(i + 1).is_some_and(|z| z.is_word("zone")) {
        ("timezone".to_string(), i + 2)
    } else if t.is_word("schema") {
        ("search_path".to_string(), i + 1)
    } else if t.is_word("names") {
        ("client_encoding".to_string(), i + 1)
    } else {
        let (n, j) = name_at(toks, i)?;
        let j = if toks.get(j).is_some_and(|x| x.is_word("to") || (x.kind == Kind::Op && x.text == b"=")) { j + 1 } else { return None };
        (n, j)
    };
    if set_config::is_transaction_scoped(&name) {
        return None; // lasts one transaction whatever the statement says
    }
    let rest = &toks[next..];
    if rest.len() == 1 && (rest[0].is_word("default") || rest[0].is_word("local")) {
        return Some(Change::Reset(name));
    }
    value(rest).map(|v| Change::Set(name, v))
}

/// `SELECT [pg_catalog.]set_config('name', 'value' | NULL, false)`, all literals, as the whole
/// statement (the plain spelling of the function name only, see `super::has_session_set`). A
/// setting that lasts one transaction anyway (`transaction_isolation` & co.) is no change.
fn set_config_change(toks: &[Token<'_>]) -> Option<Change> {
    let i = if toks.get(1)?.is_word("set_config") { 1 } else { 3 };
    if !toks.get(i)?.is_word("set_config") || !toks.get(i + 1).is_some_and(|t| t.kind == Kind::Op && t.text == b"(") {
        return None;
    }
    let call = set_config::read_call(toks, i);
    let is_local = match &call.is_local {
        Arg::Bool(b) => Some(*b),
        Arg::Text(s) => set_config::parse_bool(s),
        Arg::Null => Some(false),
        _ => None,
    };
    let Arg::Text(name) = call.name else { return None };
    if !call.whole || is_local != Some(false) || set_config::is_transaction_scoped(&name) {
        return None;
    }
    match call.value {
        Arg::Text(v) => Some(Change::Set(name, v)),
        Arg::Null => Some(Change::Reset(name)),
        _ => None,
    }
}

/// A (possibly dotted) setting name at `toks[i..]` and the index after it.
fn name_at(toks: &[Token<'_>], i: usize) -> Option<(String, usize)> {
    let mut name = ident_value(toks.get(i)?)?.into_owned();
    let mut j = i + 1;
    while toks.get(j).is_some_and(|t| t.kind == Kind::Op && t.text == b".") {
        name.push('.');
        name.push_str(&ident_value(toks.get(j + 1)?)?);
        j += 2;
    }
    Some((name, j))
}

/// The text form `set_config` takes: literals decoded, list items joined with ", ".
fn value(toks: &[Token<'_>]) -> Option<String> {
    if toks.is_empty() {
        return None;
    }
    let mut out = String::new();
    let mut sign = false;
    for t in toks {
        match t.kind {
            Kind::Op if t.text == b"," => out.push_str(", "),
            Kind::Op if t.text == b"-" || t.text == b"+" => {
                out.push_str(std::str::from_utf8(t.text).ok()?);
                sign = true;
                continue;
            }
            Kind::String => out.push_str(&string_value(t)?),
            Kind::Word | Kind::Number | Kind::QuotedIdent => {
                if !out.is_empty() && !out.ends_with(", ") && !sign {
                    out.push(' ');
                }
                out.push_str(std::str::from_utf8(t.text).ok()?);
            }
            _ => return None, // anything else: not a value we can carry over
        }
        sign = false;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: &str, v: &str) -> Change {
        Change::Set(n.into(), v.into())
    }

    #[test]
    fn reads_session_changes() {
        assert_eq!(session_changes(b"SET statement_timeout = 1000"), [set("statement_timeout", "1000")]);
        assert_eq!(session_changes(b"set session search_path to app, \"Other\", public"), [set("search_path", "app, \"Other\", public")]);
        assert_eq!(session_changes(b"SET TIME ZONE 'Asia/Tokyo'"), [set("timezone", "Asia/Tokyo")]);
        assert_eq!(session_changes(b"SET application_name = E'a\\'b'"), [set("application_name", "a'b")]);
        assert_eq!(session_changes(b"SET extra_float_digits = -2"), [set("extra_float_digits", "-2")]);
        assert_eq!(session_changes(b"SET work_mem TO DEFAULT; RESET lock_timeout; RESET ALL"), [Change::Reset("work_mem".into()), Change::Reset("lock_timeout".into()), Change::ResetAll]);
        assert_eq!(session_changes(b"SET LOCAL work_mem = '1MB'; SET TRANSACTION READ ONLY; SET ROLE x; select 1"), []);
    }

    #[test]
    fn reads_literal_set_config() {
        assert_eq!(session_changes(b"SELECT set_config('client_encoding', 'UTF8', false)"), [set("client_encoding", "UTF8")]);
        assert_eq!(session_changes(b"select pg_catalog.SET_CONFIG(E'app.theme', $$dark$$, 'off')"), [set("app.theme", "dark")]);
        assert_eq!(session_changes(b"select set_config('work_mem', NULL, NULL)"), [Change::Reset("work_mem".into())]);
        for sql in [
            "select set_config('work_mem', '1MB', true)",
            "select set_config('work_mem', '1MB', false), 1",
            "select set_config('work_mem', '1MB', false) from t",
            "select set_config('work_mem', $1, false)",
            "select set_config('work_mem', '1MB', $1)",
            "select set_config('transaction_isolation', 'serializable', false)",
            "SET transaction_isolation = 'serializable'",
            "RESET transaction_read_only",
            "select x.set_config('work_mem', '1MB', false)",
            "select \"set_config\"('work_mem', '1MB', false)",
        ] {
            assert_eq!(session_changes(sql.as_bytes()), [], "{sql}");
        }
    }
}
