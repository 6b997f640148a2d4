//! Statements that only work when a client keeps its backend connection for its whole session.
//! In transaction pooling the next transaction may run on another connection, so pgtenant refuses
//! them with a clear error (0A000) instead of letting them silently misbehave:
//! `LISTEN`, `DECLARE … WITH HOLD`, session advisory locks (`pg_advisory_lock` & co., in any
//! spelling: quoted, schema-qualified, attribute notation `(1::bigint).pg_advisory_lock`, or inside
//! a `DO` block), `CREATE TEMP TABLE` without `ON COMMIT DROP`, and a `PREPARE` that nothing in the
//! same transaction uses.

use super::lexer::{Kind, Token};
use super::split;
use crate::error::{sqlstate, PgError};
use crate::sql::literal::{ident_among, string_value};

const SESSION_LOCKS: [&str; 4] = ["pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared"];

fn refuse(what: &str) -> PgError {
    PgError::error(
        sqlstate::FEATURE_NOT_SUPPORTED,
        format!("pgtenant: {what} does not work with transaction pooling: the next transaction may run on another connection"),
    )
    .with_hint("set pool.mode = \"session\" in the pgtenant config to give each client its own connection")
}

/// Checks a query string; `in_block` when it runs inside an explicit transaction block.
pub fn check(sql: &[u8], in_block: bool) -> Result<(), PgError> {
    check_statements(&split(sql), in_block)
}

/// [`check`] of a query string already split into statements (`super::analyze`).
pub fn check_statements(statements: &[Vec<Token<'_>>], in_block: bool) -> Result<(), PgError> {
    let last = statements.len().saturating_sub(1);
    for (i, toks) in statements.iter().enumerate() {
        let word = |j: usize| toks.get(j).is_some_and(|t: &Token<'_>| t.kind == Kind::Word);
        let first = toks.first();
        if first.is_some_and(|t| t.is_word("listen")) {
            return Err(refuse("LISTEN"));
        }
        if first.is_some_and(|t| t.is_word("declare")) && toks.windows(2).any(|w| w[0].is_word("with") && w[1].is_word("hold")) {
            return Err(refuse("a WITH HOLD cursor"));
        }
        if takes_session_lock(toks, 0) {
            return Err(refuse("a session-level advisory lock (use pg_advisory_xact_lock)"));
        }
        let temp = first.is_some_and(|t| t.is_word("create"))
            && toks.iter().take(4).any(|t| t.is_word("temp") || t.is_word("temporary"))
            && toks.iter().any(|t| t.is_word("table"));
        let on_commit_drop = toks.windows(3).any(|w| w[0].is_word("on") && w[1].is_word("commit") && w[2].is_word("drop"));
        if temp && !on_commit_drop {
            return Err(refuse("a temporary table that outlives its transaction (add ON COMMIT DROP)"));
        }
        if first.is_some_and(|t| t.is_word("prepare")) && word(1) && !toks.get(1).is_some_and(|t| t.is_word("transaction")) && i == last && !in_block {
            return Err(refuse("an SQL-level PREPARE used in a later transaction (protocol-level prepared statements work)"));
        }
    }
    Ok(())
}

/// Whether a statement names a session advisory lock function. Any identifier counts, not only
/// `name(`: Postgres also calls a one-argument function in attribute notation,
/// `(1::bigint).pg_advisory_lock`. The bodies of `DO` blocks run at once, so they are searched too
/// (a nested `DO` inside a PL/pgSQL body follows `BEGIN` & co.). Strings run by `EXECUTE` are not
/// seen: `pgtenant doctor`'s `advisory_locks` privilege check covers those.
fn takes_session_lock(toks: &[Token<'_>], depth: u32) -> bool {
    if toks.iter().any(|t| ident_among(t, &SESSION_LOCKS).is_some()) {
        return true;
    }
    let runs_body = if depth == 0 { toks.first().is_some_and(|t| t.is_word("do")) } else { toks.iter().any(|t| t.is_word("do")) };
    runs_body
        && depth < 3
        && toks
            .iter()
            .filter(|t| t.kind == Kind::String)
            .filter_map(string_value)
            .any(|body| split(body.as_bytes()).iter().any(|s| takes_session_lock(s, depth + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_session_only_statements() {
        for sql in [
            "LISTEN jobs",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "select pg_advisory_lock(1)",
            "select pg_catalog.pg_try_advisory_lock(1, 2)",
            "select (42::bigint).pg_advisory_lock",
            "select \"pg_advisory_lock_shared\"(1)",
            "select U&\"pg_\\0061dvisory_lock\"(1)",
            "DO $$ BEGIN PERFORM pg_advisory_lock(1); END $$",
            "do $x$ begin perform pg_catalog.pg_try_advisory_lock(1); end $x$",
            "DO $a$ BEGIN DO $b$ BEGIN PERFORM pg_advisory_lock(1); END $b$; END $a$",
            "CREATE TEMP TABLE t (x int)",
            "create temporary table t as select 1",
            "PREPARE q AS select 1",
        ] {
            assert_eq!(check(sql.as_bytes(), false).unwrap_err().code, "0A000", "{sql}");
        }
        for sql in [
            "NOTIFY jobs",
            "DECLARE c CURSOR FOR SELECT 1",
            "select pg_advisory_xact_lock(1)",
            "select pg_advisory_unlock_all()",
            "CREATE TEMP TABLE t (x int) ON COMMIT DROP",
            "PREPARE q AS select 1; EXECUTE q",
            "PREPARE TRANSACTION 'x'",
            "select 'LISTEN x'",
            "select 'pg_advisory_lock(1)'",
            "insert into t values ('pg_advisory_lock(1)') on conflict do nothing",
            "DO $$ BEGIN PERFORM pg_advisory_xact_lock(1); END $$",
            "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'select pg_advisory_lock(1)'",
        ] {
            assert!(check(sql.as_bytes(), false).is_ok(), "{sql}");
        }
        assert!(check(b"PREPARE q AS select 1", true).is_ok());
    }
}
