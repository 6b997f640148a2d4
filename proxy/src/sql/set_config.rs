//! Reading `set_config(name, value, is_local)` calls from their tokens, including calls whose
//! setting name or value is a bind parameter, decided at Bind. Part of the SQL layer (the guard and
//! `sql::set` both read calls with it), so `sql` does not depend on the guard.
//!
//! Drivers change settings with `select set_config($1, $2, false)` (psycopg's `%s` placeholders,
//! client_encoding and transaction-parameter resets). At Parse pgtenant cannot know the name, but
//! the Bind that runs the statement carries it: the guard reads the call's arguments at Parse
//! ([`read_call`]), keeps the calls that need the Bind's values ([`SetConfigCall`]), and decides
//! them at each Bind with the same rules as a literal `set_config`
//! (`crate::guard::Guard::check_bound`).
//!
//! Deliberately narrow, so that the value pgtenant reads from the Bind is the value the server
//! passes to `set_config`:
//! - only in a statement that starts with `SELECT`, sent in a Parse (in a function body, a
//!   `CREATE FUNCTION … RETURN …` or a `PREPARE`, `$1` is an argument of the function or of the SQL
//!   prepared statement, which no Bind carries; in a simple query there are no parameters at all);
//! - the argument is exactly one parameter, `$n` or `$n::varchar` (`$n::boolean` for
//!   `is_local`), and `$n` occurs nowhere else in the statement (another use could give it a type
//!   whose conversion to text changes it). Other casts are refused: `varchar` and `boolean` are
//!   keywords the server always reads as the built-in types, but `text` and `bool` are names looked
//!   up in the search path, where a client's `pg_temp` comes first (`CREATE DOMAIN pg_temp.text AS
//!   bpchar` makes `$1::text` drop trailing blanks); a `varchar(13)` cast truncates;
//! - its type declared in the Parse is unspecified, `unknown`, `text` or `varchar` (a `bpchar`
//!   parameter loses its trailing blanks on the way to `text`, a `name` is truncated).
//!
//! Anything else that is not a literal — an expression, a concatenation, a subquery, another cast,
//! named-argument notation, a function call — is refused at Parse as before.

use super::lexer::{Kind, Token};
use super::literal::{ident_value, string_value};

/// Declared parameter types (OIDs) a setting name or value may have.
const UNSPECIFIED: u32 = 0;
const UNKNOWN: u32 = 705;
const TEXT: u32 = 25;
const VARCHAR: u32 = 1043;
const BOOL: u32 = 16;

/// One argument of a `set_config` call, as far as pgtenant can read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// A string literal, decoded.
    Text(String),
    /// `$n`, with the type name of a `::` cast after it (lower case), if any.
    Param(u32, Option<String>),
    /// `NULL`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// Anything else.
    Other,
}

/// A `set_config(name, value, is_local)` call, read from its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetConfigCall {
    pub name: Arg,
    pub value: Arg,
    pub is_local: Arg,
    /// The statement is exactly `SELECT [pg_catalog.]set_config(…)`: it runs once, so a
    /// session-level call is a session setting pgtenant keeps for the client.
    pub whole: bool,
}

impl SetConfigCall {
    /// Some argument is a parameter: the call needs the Bind's values.
    pub fn has_params(&self) -> bool {
        [&self.name, &self.value, &self.is_local].iter().any(|a| matches!(a, Arg::Param(..)))
    }
}

fn is_op(t: Option<&Token<'_>>, op: &[u8]) -> bool {
    t.is_some_and(|t| t.kind == Kind::Op && t.text == op)
}

/// The number of a `$n` token (`$01` is parameter 1, as on the server); None for `$0` and numbers
/// the server would not accept.
pub fn param_number(t: &Token<'_>) -> Option<u32> {
    if t.kind != Kind::Param {
        return None;
    }
    std::str::from_utf8(&t.text[1..]).ok()?.parse::<u32>().ok().filter(|&n| (1..=65535).contains(&n))
}

/// Reads the call whose `set_config` token is `toks[i]` (followed by `(`). Arguments are split at
/// top-level commas; a call without its closing parenthesis reads as all `Other`.
pub fn read_call(toks: &[Token<'_>], i: usize) -> SetConfigCall {
    let mut args: Vec<&[Token<'_>]> = Vec::new();
    let mut depth = 0u32;
    let mut start = i + 2;
    let mut close = None;
    for (j, t) in toks.iter().enumerate().skip(i + 2) {
        if t.kind != Kind::Op {
            continue;
        }
        match t.text {
            b"(" | b"[" => depth += 1,
            b")" | b"]" if depth > 0 => depth -= 1,
            b")" => {
                args.push(&toks[start..j]);
                close = Some(j);
                break;
            }
            b"," if depth == 0 => {
                args.push(&toks[start..j]);
                start = j + 1;
            }
            _ => {}
        }
    }
    let Some(close) = close else {
        return SetConfigCall { name: Arg::Other, value: Arg::Other, is_local: Arg::Other, whole: false };
    };
    let arg = |k: usize| args.get(k).map_or(Arg::Other, |a| read_arg(a));
    let qualified = i == 3 && toks.get(1).and_then(ident_value).as_deref() == Some("pg_catalog") && is_op(toks.get(2), b".");
    let whole = toks.first().is_some_and(|t| t.is_word("select")) && (i == 1 || qualified) && close + 1 == toks.len() && args.len() == 3;
    SetConfigCall { name: arg(0), value: arg(1), is_local: arg(2), whole }
}

fn read_arg(a: &[Token<'_>]) -> Arg {
    match a {
        [t] if t.kind == Kind::String => string_value(t).map_or(Arg::Other, Arg::Text),
        [t] if t.is_word("null") => Arg::Null,
        [t] if t.is_word("true") || t.is_word("false") => Arg::Bool(t.is_word("true")),
        [p] => param_number(p).map_or(Arg::Other, |n| Arg::Param(n, None)),
        [p, c, ty] if is_op(Some(c), b"::") && ty.kind == Kind::Word => {
            param_number(p).map_or(Arg::Other, |n| Arg::Param(n, Some(String::from_utf8_lossy(ty.text).to_lowercase())))
        }
        _ => Arg::Other,
    }
}

/// Keeps the parameters pgtenant can read exactly from a Bind, and turns every other parameter
/// argument into `Other` (see the module docs). `types` are the types declared in the Parse.
pub fn settle_params(call: &mut SetConfigCall, toks: &[Token<'_>], types: &[u32]) {
    let uses = |n: u32| toks.iter().filter(|t| param_number(t) == Some(n)).count();
    let declared = |n: u32| types.get(n as usize - 1).copied().unwrap_or(UNSPECIFIED);
    let exact = |arg: &Arg, oids: &[u32], casts: &[&str]| match arg {
        Arg::Param(n, cast) => uses(*n) == 1 && oids.contains(&declared(*n)) && cast.as_deref().is_none_or(|c| casts.contains(&c)),
        _ => true,
    };
    let text = [UNSPECIFIED, UNKNOWN, TEXT, VARCHAR];
    if !exact(&call.name, &text, &["varchar"]) {
        call.name = Arg::Other;
    }
    if !exact(&call.value, &text, &["varchar"]) {
        call.value = Arg::Other;
    }
    if !exact(&call.is_local, &[UNSPECIFIED, UNKNOWN, BOOL], &["boolean"]) {
        call.is_local = Arg::Other;
    }
}

/// Turns every parameter argument into `Other`: where no Bind will carry them.
pub fn no_params(call: &mut SetConfigCall) {
    for arg in [&mut call.name, &mut call.value, &mut call.is_local] {
        if matches!(arg, Arg::Param(..)) {
            *arg = Arg::Other;
        }
    }
}

/// A boolean in the server's text form (`boolin`): `true`/`false`, `yes`/`no`, `on`/`off` and
/// their unique prefixes, `1`/`0`, any case, surrounding white space ignored.
pub fn parse_bool(s: &str) -> Option<bool> {
    let v = s.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\x0b').to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| v.len() >= min && word.starts_with(v.as_str());
    match v.as_bytes().first()? {
        b't' if prefix_of("true", 1) => Some(true),
        b'y' if prefix_of("yes", 1) => Some(true),
        b'f' if prefix_of("false", 1) => Some(false),
        b'n' if prefix_of("no", 1) => Some(false),
        b'o' if prefix_of("on", 2) => Some(true),
        b'o' if prefix_of("off", 2) => Some(false),
        b'1' if v == "1" => Some(true),
        b'0' if v == "0" => Some(false),
        _ => None,
    }
}

/// Settings that last one transaction whatever `is_local` says: never kept for the client.
pub fn is_transaction_scoped(name: &str) -> bool {
    matches!(name.to_ascii_lowercase().as_str(), "transaction_isolation" | "transaction_read_only" | "transaction_deferrable")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::split;

    fn call(sql: &str) -> SetConfigCall {
        let toks = &split(sql.as_bytes())[0];
        let i = toks.iter().position(|t| ident_value(t).as_deref() == Some("set_config")).unwrap();
        read_call(toks, i)
    }

    fn p(n: u32) -> Arg {
        Arg::Param(n, None)
    }

    #[test]
    fn reads_arguments() {
        let c = call("select set_config($1, $2, false)");
        assert_eq!((c.name, c.value, c.is_local, c.whole), (p(1), p(2), Arg::Bool(false), true));
        let c = call("SELECT pg_catalog.set_config($01::text, $2::VARCHAR, $3::boolean)");
        assert_eq!(c.name, Arg::Param(1, Some("text".into())));
        assert_eq!(c.value, Arg::Param(2, Some("varchar".into())));
        assert_eq!(c.is_local, Arg::Param(3, Some("boolean".into())));
        assert!(c.whole);
        let c = call("select set_config('a.b', NULL, 'off')");
        assert_eq!((c.name, c.value, c.is_local), (Arg::Text("a.b".into()), Arg::Null, Arg::Text("off".into())));
        for (sql, whole) in [
            ("select set_config($1, $2, false), 1", false),
            ("select set_config($1, $2, false) from t", false),
            ("select x.set_config($1, $2, false)", false),
            ("select 1, set_config($1, $2, false)", false),
            ("select set_config($1, $2)", false),
        ] {
            assert_eq!(call(sql).whole, whole, "{sql}");
        }
        for sql in [
            "select set_config($1 || '', 'v', true)",
            "select set_config(($1), 'v', true)",
            "select set_config($1::varchar(13), 'v', true)",
            "select set_config($1::pg_catalog.text, 'v', true)",
            "select set_config(lower($1), 'v', true)",
            "select set_config(setting_name => $1, new_value => 'v', is_local => true)",
            "select set_config((select $1), 'v', true)",
            "select set_config($0, 'v', true)",
            "select set_config($1[1], 'v', true)",
            "select set_config($1",
        ] {
            assert_eq!(call(sql).name, Arg::Other, "{sql}");
        }
        // nested parentheses and brackets stay inside their argument
        let c = call("select set_config($1, coalesce($2, 'x'), (array[true, false])[1])");
        assert_eq!((c.name, c.value, c.is_local), (p(1), Arg::Other, Arg::Other));
    }

    #[test]
    fn params_must_be_read_exactly() {
        let settle = |sql: &str, types: &[u32]| {
            let toks = &split(sql.as_bytes())[0];
            let i = toks.iter().position(|t| ident_value(t).as_deref() == Some("set_config")).unwrap();
            let mut c = read_call(toks, i);
            settle_params(&mut c, toks, types);
            c
        };
        assert_eq!(settle("select set_config($1, $2, $3)", &[]).name, p(1));
        assert_eq!(settle("select set_config($1, $2, $3)", &[25, 1043, 16]).is_local, p(3));
        assert_eq!(settle("select set_config($1, $2, $3)", &[705, 0]).value, p(2));
        // bpchar loses trailing blanks, name is truncated: not read from the Bind
        assert_eq!(settle("select set_config($1, $2, false)", &[1042]).name, Arg::Other);
        assert_eq!(settle("select set_config($1, $2, false)", &[19]).name, Arg::Other);
        assert_eq!(settle("select set_config($1, $2, false)", &[25, 17]).value, Arg::Other);
        assert_eq!(settle("select set_config($1, $2, $3)", &[25, 25, 23]).is_local, Arg::Other);
        // used twice: another use could give it another type
        assert_eq!(settle("select $1::bpchar, set_config($1, 'v', false)", &[]).name, Arg::Other);
        assert_eq!(settle("select set_config($1, $1, false)", &[]).name, Arg::Other);
        assert_eq!(settle("select set_config($01, 'v', false), $1", &[]).name, Arg::Other);
        assert_eq!(settle("select set_config($2, $1, false)", &[]).name, p(2));
        // casts: only to the keyword types varchar (name, value) and boolean (is_local); `text` and
        // `bool` are looked up in the search path, where pg_temp comes first
        assert_eq!(settle("select set_config($1::VARCHAR, 'v', false)", &[25]).name, Arg::Param(1, Some("varchar".into())));
        assert_eq!(settle("select set_config('a.b', 'v', $1::boolean)", &[]).is_local, Arg::Param(1, Some("boolean".into())));
        for sql in ["select set_config($1::text, 'v', false)", "select set_config($1::name, 'v', false)", "select set_config($1::bpchar, 'v', false)"] {
            assert_eq!(settle(sql, &[]).name, Arg::Other, "{sql}");
        }
        assert_eq!(settle("select set_config('a.b', $1::text, false)", &[]).value, Arg::Other);
        assert_eq!(settle("select set_config('a.b', $1::boolean, false)", &[]).value, Arg::Other);
        assert_eq!(settle("select set_config('a.b', 'v', $1::bool)", &[]).is_local, Arg::Other);
    }

    #[test]
    fn booleans_like_the_server() {
        for t in ["true", "T", "tr", "yes", "Y", "on", "ON", "1", " true\n"] {
            assert_eq!(parse_bool(t), Some(true), "{t}");
        }
        for f in ["false", "f", "FA", "no", "n", "off", "of", "0", "\tfalse "] {
            assert_eq!(parse_bool(f), Some(false), "{f}");
        }
        for x in ["", "o", "2", "truee", "yess", "offf", "nope", "10"] {
            assert_eq!(parse_bool(x), None, "{x}");
        }
    }
}
