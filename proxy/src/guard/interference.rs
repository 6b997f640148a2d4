//! Statements by which one tenant would disturb other tenants' sessions.
//!
//! Every pooled backend is logged in as the same role, so what Postgres allows "a session of the
//! same role" to do to another session, one tenant may do to every other tenant. Refused here
//! (ERROR 42501), whatever the quoting, case or schema qualification:
//! - `pg_cancel_backend` / `pg_terminate_backend`: cancel or end another tenant's query;
//! - `pg_stat_get_activity`, `pg_stat_get_backend_activity`, `pg_stat_activity`,
//!   `pg_stat_statements`: read other tenants' query text;
//! - `LOCK [TABLE]`: a table lock blocks every tenant's queries on that table;
//! - `TRUNCATE`: ignores row-level security and empties the table for every tenant.
//!
//! The names are refused wherever they appear as an identifier, not only as `name(`: Postgres
//! also calls a one-argument function in attribute notation, `(pid).pg_cancel_backend`.
//! This is the second line of defence; the first is the database itself (`pgtenant doctor`'s
//! `signal_functions` and `query_text_visible` checks print the REVOKE statements), which also
//! covers calls the guard cannot see (dynamic SQL, existing functions). See docs/security.md,
//! "Shared-role interference", for what is refused, what is left to privileges and what is inherent.

use crate::error::{sqlstate, PgError};
use crate::sql::literal::ident_among;
use crate::sql::lexer::{Kind, Token};

/// Functions that signal another backend.
const SIGNAL: [&str; 2] = ["pg_cancel_backend", "pg_terminate_backend"];

/// Functions and views that show other sessions' query text.
const ACTIVITY: [&str; 4] = ["pg_stat_get_activity", "pg_stat_get_backend_activity", "pg_stat_activity", "pg_stat_statements"];

/// Words after which a PL/pgSQL statement begins inside a statement the splitter produced
/// (`BEGIN LOCK t`, `IF x THEN LOCK t`, `ELSE …`, `LOOP …`).
const BLOCK_WORDS: [&str; 4] = ["begin", "then", "else", "loop"];

/// Keywords that may follow a column or variable named `lock` / `truncate` after `THEN`/`ELSE`
/// (`CASE WHEN a THEN lock END`): not a table name.
const NOT_A_TABLE: [&str; 12] = ["end", "else", "elsif", "when", "then", "and", "or", "is", "not", "as", "from", "loop"];

fn refused(message: String, hint: &str) -> PgError {
    PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, format!("pgtenant: {message}")).with_hint(hint)
}

/// Checks one statement's tokens (a client statement, or a statement of a function body).
pub fn check(toks: &[Token<'_>]) -> Result<(), PgError> {
    for (i, t) in toks.iter().enumerate() {
        if let Some(name) = ident_among(t, &SIGNAL) {
            return Err(refused(
                format!("{name} is not allowed: every client shares one database role, so it could cancel or end other tenants' queries"),
                "to cancel your own query, use your client's cancel (Ctrl-C in psql): pgtenant forwards it to your query only",
            ));
        }
        if let Some(name) = ident_among(t, &ACTIVITY) {
            return Err(refused(
                format!("{name} is not allowed: every client shares one database role, so it would show other tenants' queries"),
                "pg_backend_pid() and current_query() describe your own session",
            ));
        }
        if t.kind == Kind::Word && starts_statement(toks, i) && names_table(toks, i + 1) {
            if t.is_word("lock") {
                return Err(refused(
                    "LOCK TABLE is not allowed: a table lock would block every tenant's queries on the table, not only yours".into(),
                    "lock your own rows instead with SELECT … FOR UPDATE: row-level security limits it to your tenant's rows",
                ));
            }
            if t.is_word("truncate") {
                return Err(refused(
                    "TRUNCATE is not allowed: it ignores row-level security and would empty the table for every tenant".into(),
                    "use DELETE, which row-level security limits to your tenant's rows",
                ));
            }
        }
    }
    Ok(())
}

/// Whether `toks[i]` stands where a statement starts: first in the statement, or after a
/// PL/pgSQL block word in a function body.
fn starts_statement(toks: &[Token<'_>], i: usize) -> bool {
    i == 0 || BLOCK_WORDS.iter().any(|w| toks[i - 1].is_word(w))
}

/// Whether `toks[j..]` continues a `LOCK` / `TRUNCATE` command: `TABLE`, `ONLY` or a table name
/// (not an assignment to a variable of that name, nor a keyword after a column of that name).
fn names_table(toks: &[Token<'_>], j: usize) -> bool {
    match toks.get(j) {
        Some(t) if t.kind == Kind::QuotedIdent => true,
        Some(t) if t.kind == Kind::Word => !NOT_A_TABLE.iter().any(|w| t.is_word(w)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::split;

    fn run(sql: &str) -> Result<(), PgError> {
        split(sql.as_bytes()).iter().try_for_each(|toks| check(toks))
    }

    #[test]
    fn refuses_interference() {
        for sql in [
            "select pg_cancel_backend(12345)",
            "SELECT PG_CANCEL_BACKEND(pid) FROM generate_series(1, 99999) pid",
            "select pg_catalog.pg_terminate_backend(1, 0)",
            "select \"pg_terminate_backend\"(1)",
            "select U&\"pg_\\0063ancel_backend\"(1)",
            "select pg_catalog . /* x */ pg_cancel_backend (1)",
            "select (12345).pg_cancel_backend",
            "select x.pg_terminate_backend from (select 1) x",
            "select * from pg_cancel_backend(1)",
            "select query from pg_stat_get_activity(NULL)",
            "select pg_catalog.pg_stat_get_backend_activity(b) from pg_stat_get_backend_idset() b",
            "select query from pg_stat_activity",
            "select * from pg_catalog.\"pg_stat_activity\"",
            "select query from public.pg_stat_statements",
            "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE",
            "lock orders",
            "LOCK \"orders\" IN SHARE MODE NOWAIT",
            "lock only orders",
            "begin; lock table orders in exclusive mode; commit",
            "TRUNCATE orders",
            "truncate table only orders, users cascade",
        ] {
            let e = run(sql).expect_err(sql);
            assert_eq!(e.code, "42501", "{sql}");
            assert!(e.message.starts_with("pgtenant: ") && e.hint.is_some(), "{sql}: {e}");
        }
    }

    #[test]
    fn refuses_inside_function_bodies() {
        // the guard checks each statement of a body; PL/pgSQL statements follow BEGIN/THEN/ELSE/LOOP
        for body in [
            "BEGIN LOCK TABLE orders IN ACCESS EXCLUSIVE MODE; PERFORM pg_sleep(60); END",
            "BEGIN IF true THEN lock orders; END IF; END",
            "BEGIN IF false THEN NULL; ELSE truncate orders; END IF; END",
            "BEGIN LOOP lock orders; EXIT; END LOOP; END",
            "BEGIN PERFORM pg_terminate_backend(pid) FROM pg_stat_get_activity(NULL); END",
            "select pg_cancel_backend(1)",
        ] {
            assert!(run(body).is_err(), "{body}");
        }
    }

    #[test]
    fn allows_ordinary_sql() {
        for sql in [
            "select pg_backend_pid(), current_query()",
            "select 'pg_cancel_backend(1)', $$LOCK TABLE orders$$",
            "-- select pg_cancel_backend(1)\nselect 1",
            "select lock, truncate from t",
            "select t.lock from t where lock = 1",
            "update t set lock = true",
            "select case when a then lock else 0 end from t",
            "select * from orders for update",
            "select * from orders for share nowait",
            "select pg_advisory_xact_lock(1)",
            "select pg_stat_get_backend_pid(1)",
            "select * from pg_stat_user_tables",
            "delete from orders",
            "select truncate(1.5)",
            "select trunc(2.5)",
        ] {
            assert!(run(sql).is_ok(), "refused: {sql}");
        }
        // PL/pgSQL variables named lock
        for body in ["BEGIN lock := 1; END", "BEGIN IF x THEN lock := lock + 1; END IF; END", "BEGIN x := CASE WHEN a THEN lock END; END"] {
            assert!(run(body).is_ok(), "refused: {body}");
        }
    }
}
