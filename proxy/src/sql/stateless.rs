//! Which statements provably leave no session state on a backend.
//!
//! The invariant pgtenant keeps in transaction pooling is: **a backend handed to a different client
//! is in the pristine session state** (no session-level settings, temp objects, cursors, SQL-level
//! prepared statements, listeners, advisory locks or sequence state of the previous client). A full
//! reset costs several statements on the server, so it runs only when the previous owner did
//! something that *may* have left state. Guessing what leaves state (looking for `temp`, `listen`…)
//! can never be complete: any function call may run `set_config(…, false)`, `LISTEN`, a temp table.
//! So this module answers the opposite question, conservatively: a statement counts as stateless
//! only when it is a plain read or transaction-control statement whose every function call is a
//! known-pure built-in. Everything else — DML (triggers, sequence defaults), DDL, utility
//! statements, calls to any other function — marks the backend for a reset.
//!
//! Trusted code the database runs implicitly for a plain SELECT (views, RLS policy expressions,
//! operators, casts) is assumed not to leave session state; docs/security.md says so.

use super::lexer::{Kind, Token};
use super::split;
use crate::sql::literal::ident_value;

/// First words of statements that can be stateless (if their function calls are pure).
const STATEMENTS: &[&str] = &[
    "select", "values", "table", "show", "begin", "start", "commit", "end", "rollback", "abort", "savepoint", "release",
];

/// Words that put a statement outside the class even inside a SELECT: `SELECT … INTO` creates a
/// table; data-modifying CTEs run DML.
const STATEFUL_WORDS: &[&str] = &["into", "insert", "update", "delete", "merge", "copy", "prepare", "listen", "declare", "set"];

/// Keywords that may stand right before `(` and can never name a function (PostgreSQL's reserved
/// and "column name" keywords): syntax such as `IN (…)`, `EXISTS (…)`, `CAST (…)`, `numeric(12,2)`.
const NEVER_FUNCTIONS: &[&str] = &[
    "all", "and", "any", "array", "as", "case", "cast", "check", "distinct", "else", "end", "except", "exists", "extract",
    "fetch", "for", "from", "group", "having", "in", "intersect", "lateral", "limit", "not", "offset", "on", "only", "or",
    "order", "returning", "select", "some", "table", "then", "union", "using", "when", "where", "window", "with",
    "between", "row", "values", "coalesce", "nullif", "greatest", "least", "position", "substring", "trim", "overlay",
    "treat", "normalize", "numeric", "decimal", "dec", "varchar", "char", "character", "nchar", "national", "bit",
    "timestamp", "time", "interval", "float", "int", "integer", "smallint", "bigint", "real", "boolean", "precision",
];

/// Keywords that can also name a function: not a call only where the grammar makes them syntax.
fn keyword_not_call(t: &Token<'_>, prev: Option<&Token<'_>>) -> bool {
    let prev_is = |f: &dyn Fn(&Token<'_>) -> bool| prev.is_some_and(f);
    let after_operand = prev_is(&|p| {
        (p.kind == Kind::Word && !is_word_in(p, NEVER_FUNCTIONS))
            || matches!(p.kind, Kind::QuotedIdent | Kind::String | Kind::Number | Kind::Param)
            || p.text == b")"
            || p.text == b"]"
    });
    if is_word_in(t, &["filter", "over", "within"]) {
        prev_is(&|p| p.text == b")") // count(*) FILTER (…), rank() OVER (…)
    } else if is_word_in(t, &["like", "ilike", "similar", "join", "overlaps"]) {
        after_operand // x LIKE (…), a JOIN (b …)
    } else if t.is_word("varying") {
        prev_is(&|p| p.is_word("character"))
    } else if t.is_word("by") {
        prev_is(&|p| p.is_word("group") || p.is_word("order") || p.is_word("partition"))
    } else {
        false
    }
}

/// Built-in functions with no side effect on the session.
const PURE_FUNCTIONS: &[&str] = &[
    "count", "sum", "avg", "min", "max", "bool_and", "bool_or", "every", "coalesce", "nullif", "greatest", "least", "now",
    "current_setting", "current_timestamp", "current_date", "statement_timestamp", "transaction_timestamp", "clock_timestamp",
    "lower", "upper", "length", "char_length", "octet_length", "abs", "round", "floor", "ceil", "ceiling", "trunc", "mod",
    "power", "sqrt", "date_trunc", "date_part", "extract", "to_char", "to_date", "to_timestamp", "to_number", "age",
    "make_date", "make_interval", "json_build_object", "jsonb_build_object", "json_build_array", "jsonb_build_array",
    "json_agg", "jsonb_agg", "json_object_agg", "jsonb_object_agg", "to_json", "to_jsonb", "row_to_json",
    "jsonb_set", "jsonb_array_length", "json_array_length", "jsonb_typeof", "jsonb_extract_path_text", "array_agg",
    "string_agg", "array_length", "array_position", "cardinality", "unnest", "row_number", "rank", "dense_rank", "lag",
    "lead", "first_value", "last_value", "ntile", "percent_rank", "cume_dist", "substring", "substr", "trim", "btrim",
    "ltrim", "rtrim", "replace", "concat", "concat_ws", "position", "strpos", "left", "right", "split_part", "format",
    "md5", "encode", "decode", "cast", "generate_series", "pg_backend_pid", "current_user", "session_user", "version",
    "gen_random_uuid", "num_nonnulls", "num_nulls",
];

fn is_word_in(t: &Token<'_>, list: &[&str]) -> bool {
    t.kind == Kind::Word && list.iter().any(|w| t.is_word(w))
}

/// Whether every statement of `sql` provably leaves no session state behind (see the module docs).
pub fn is_stateless(sql: &[u8]) -> bool {
    split(sql).iter().all(|toks| statement_is_stateless(toks))
}

pub(crate) fn statement_is_stateless(toks: &[Token<'_>]) -> bool {
    statement_leaves(toks) == Leaves::Nothing
}

/// What a statement may leave on the session, at most (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Leaves {
    /// Provably nothing.
    #[default]
    Nothing,
    /// Only sequence state (`currval`/`lastval`): a plain write (`INSERT`/`UPDATE`/`DELETE`/`MERGE`,
    /// possibly in a CTE) or a read calling sequence functions, whose every explicit function call is
    /// a known-pure built-in or a sequence function. Triggers and column defaults are the table
    /// owner's code and trusted like views (a `nextval` default is the sequence state meant here).
    Sequences,
    /// Anything: reset everything before another client.
    Session,
}

/// First words of the statements in the `Sequences` class besides the stateless ones.
const WRITES: &[&str] = &["insert", "update", "delete", "merge", "with"];

/// Built-in functions that only change sequence state.
const SEQUENCE_FUNCTIONS: &[&str] = &["nextval", "currval", "setval", "lastval"];

/// The class of one statement.
pub fn statement_leaves(toks: &[Token<'_>]) -> Leaves {
    let Some(first) = toks.first() else { return Leaves::Nothing };
    let reads = is_word_in(first, STATEMENTS);
    if !reads && !is_word_in(first, WRITES) {
        return Leaves::Session;
    }
    let mut leaves = Leaves::Nothing;
    let mut seen_update = false;
    for (i, t) in toks.iter().enumerate() {
        let prev = if i > 0 { toks.get(i - 1) } else { None };
        match t.kind {
            Kind::Unterminated => return Leaves::Session,
            Kind::Word if is_word_in(t, &["insert", "update", "delete", "merge"]) => {
                seen_update |= t.is_word("update");
                leaves = leaves.max(Leaves::Sequences); // a write (at the top or in a CTE)
            }
            // INSERT INTO / MERGE INTO are writes; SELECT … INTO creates a table
            Kind::Word if t.is_word("into") && prev.is_some_and(|p| p.is_word("insert") || p.is_word("merge")) => {}
            // UPDATE … SET, ON CONFLICT DO UPDATE SET, WHEN MATCHED THEN UPDATE SET
            Kind::Word if t.is_word("set") && seen_update => {}
            Kind::Word if is_word_in(t, STATEFUL_WORDS) => return Leaves::Session,
            Kind::Word | Kind::QuotedIdent => {
                let call = toks.get(i + 1).is_some_and(|n| n.kind == Kind::Op && n.text == b"(");
                if !call {
                    continue;
                }
                // a schema-qualified name is always a function, and only pure in pg_catalog
                let qualified = i >= 2 && toks[i - 1].kind == Kind::Op && toks[i - 1].text == b".";
                // except the table of INSERT INTO t (columns), and ON CONFLICT (columns)
                let table_at = if qualified { i.checked_sub(3) } else { i.checked_sub(1) };
                if table_at.and_then(|j| toks.get(j)).is_some_and(|p| p.is_word("into")) || (!qualified && t.is_word("conflict")) {
                    continue;
                }
                if qualified && ident_value(&toks[i - 2]).as_deref() != Some("pg_catalog") {
                    return Leaves::Session;
                }
                if !qualified && t.kind == Kind::Word && (is_word_in(t, NEVER_FUNCTIONS) || keyword_not_call(t, prev)) {
                    continue;
                }
                if t.kind == Kind::QuotedIdent {
                    return Leaves::Session;
                }
                if is_word_in(t, SEQUENCE_FUNCTIONS) {
                    leaves = leaves.max(Leaves::Sequences);
                } else if !PURE_FUNCTIONS.iter().any(|f| t.is_word(f)) {
                    return Leaves::Session;
                }
            }
            _ => {}
        }
    }
    if !reads && leaves == Leaves::Nothing {
        return Leaves::Session; // WITH … that writes nothing we recognise: be conservative
    }
    leaves
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_reads_and_transaction_control_are_stateless() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "select tenant_id from orders where amount > $1::float8::numeric(12,2) limit 20",
            "select count(*) filter (where tenant_id <> 1), coalesce(sum(amount), 0) from orders",
            "select current_setting('app.tenant_id'), pg_catalog.now()",
            "BEGIN; select 1; COMMIT",
            "begin isolation level serializable",
            "select * from orders where id in (select id from orders) and exists (select 1)",
            "SAVEPOINT a; ROLLBACK TO SAVEPOINT a; RELEASE a",
            "show search_path",
            "select x from t where name like ('a%') and x::character varying(10) = 'b'",
            "select rank() over (partition by a order by (b)) from t group by (a)",
            "select * from a join (b join c on true) on true",
            "",
        ] {
            assert!(is_stateless(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn plain_writes_leave_only_sequence_state() {
        for sql in [
            "select nextval('s')",
            "with x as (insert into t values (1) returning *) select * from x",
            "insert into orders (amount) values (1) returning id, tenant_id",
            "INSERT INTO t (a) VALUES ($1) ON CONFLICT (a) DO UPDATE SET b = excluded.b",
            "update orders set amount = amount + 1 where id = $1 returning amount",
            "delete from orders where id = $1",
            "merge into t using s on t.id = s.id when matched then update set x = s.x",
            "insert into t select * from u where pg_catalog.now() > $1",
            "insert into public.\"Orders\" (a, b) values ($1, $2) on conflict (a) do nothing",
        ] {
            assert_eq!(split(sql.as_bytes()).iter().map(|t| statement_leaves(t)).max(), Some(Leaves::Sequences), "{sql}");
        }
        for sql in [
            "insert into t values (my_function())",
            "update t set x = 1 where f(x)",
            "select * into t2 from t",
            "insert into t values (1); listen x",
            "with x as (select 1) select * into t from x",
            "with x as (select my_fn()) insert into t select * from x",
            "with recursive x as (select 1) select * from x where 1 = 1 and set_config('a', 'b', false) is null",
        ] {
            assert_eq!(split(sql.as_bytes()).iter().map(|t| statement_leaves(t)).max(), Some(Leaves::Session), "{sql}");
        }
    }

    #[test]
    fn anything_else_may_leave_state() {
        for sql in [
            "select set_config('search_path', 'x', false)",
            "select my_function()",
            "select public.count(*) from t",
            "select \"count\"(*) from t",
            "select pg_advisory_lock(1)",
            "select * into temp t from orders",
            "SET search_path = x",
            "SET LOCAL work_mem = '1MB'",
            "CREATE TEMP TABLE t (x int)",
            "DECLARE c CURSOR WITH HOLD FOR select 1",
            "LISTEN x",
            "PREPARE p AS select 1",
            "EXECUTE p",
            "CALL p()",
            "DO $$ BEGIN END $$",
            "select 1; select f()",
            "select public.filter()",
            "select level()",
            "select filter()",
            "select like('a')",
            "select x from t where a = 1 and by(2)",
            "select 'abc",
            "copy orders to stdout",
            "explain analyze select 1",
        ] {
            assert!(!is_stateless(sql.as_bytes()), "{sql}");
        }
    }
}
