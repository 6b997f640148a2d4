//! The statement guard: the client shares a Postgres session with pgtenant, so before a statement
//! is forwarded, pgtenant refuses anything that could change the tenant context it set.
//!
//! Every simple Query and every Parse is lexed with the real PostgreSQL token rules (see
//! `crate::sql::lexer`), statement by statement. Refused (ERROR 42501, naming what was refused):
//! - `SET [SESSION|LOCAL]` / `RESET` of a protected setting (the `[tenant]` settings, `role`,
//!   `session_authorization`, the signed context `pgtenant.context` / `pgtenant.signature`, and
//!   `tenant.protected_settings`), including `SET ROLE` and
//!   `SET SESSION AUTHORIZATION`, however the name is quoted or cased;
//! - `set_config(...)` whose name is a protected setting in any literal spelling (`E''`, `U&''`,
//!   dollar quotes), and any `set_config` whose name is not a plain string literal (an expression,
//!   a cast, named-argument notation, a bind parameter except in the forms decided at Bind (read
//!   by `crate::sql::set_config`): `select set_config($1, $2, false)` sent in a Parse);
//! - `UPDATE pg_settings`;
//! - `SET`/`RESET` clauses of protected settings in `ALTER …` and `CREATE …` (e.g. a function with
//!   `SET app.tenant_id = …`), and function bodies that would do any of the above;
//! - `DO` blocks (dynamic SQL could build any of the above), unless `tenant.allow_do = true`;
//! - `RESET ALL` when anything runs after it in the same transaction.
//!
//! Reading settings (`current_setting`, `SHOW`) stays allowed.

pub mod interference;

use std::borrow::Cow;
use std::collections::HashSet;

use crate::config::TenantConfig;
use crate::error::{sqlstate, PgError};
use crate::protocol::peek::BindParams;
use crate::sql::lexer::{Kind, Token};
use crate::sql::literal::{ident_among, ident_value, string_value};
use crate::sql::set::Change;
use crate::sql::set_config::{self, Arg, SetConfigCall};
use crate::sql::split;

pub mod lexing;

/// How deep function bodies inside statements are checked.
const MAX_DEPTH: u32 = 3;

#[derive(Debug, Clone)]
pub struct Guard {
    protected: HashSet<String>,
    allow_do: bool,
}

/// Where the statement runs, as far as the session knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Inside (or possibly inside) an explicit transaction block.
    pub in_block: bool,
}

fn refused(message: String) -> PgError {
    PgError::error(sqlstate::INSUFFICIENT_PRIVILEGE, format!("pgtenant: {message}"))
}

/// Two-phase commit: a prepared transaction belongs to the shared backend role, not to a tenant,
/// and outlives the session; pgtenant refuses it rather than let one tenant see or finish
/// another's (see docs/protocol.md).
fn two_phase_error() -> PgError {
    PgError::error(
        sqlstate::FEATURE_NOT_SUPPORTED,
        "pgtenant: two-phase commit (PREPARE TRANSACTION, COMMIT PREPARED, ROLLBACK PREPARED) is not supported",
    )
    .with_hint("prepared transactions belong to the shared database role, not to a tenant; use ordinary transactions")
}

fn protected_error(name: &str) -> PgError {
    refused(format!("changing setting \"{name}\" is not allowed: pgtenant sets it from your token"))
}

/// A setting value written as a literal, identifier or number.
fn plain_value(t: &Token<'_>) -> Option<String> {
    match t.kind {
        Kind::Number => Some(String::from_utf8_lossy(t.text).into_owned()),
        _ => string_value(t).or_else(|| ident_value(t).map(Cow::into_owned)),
    }
}

fn is_op(t: Option<&Token<'_>>, op: &[u8]) -> bool {
    t.is_some_and(|t| t.kind == Kind::Op && t.text == op)
}

impl Guard {
    pub fn from_config(cfg: &TenantConfig) -> Guard {
        let mut protected: HashSet<String> = cfg.settings.keys().map(|s| s.to_ascii_lowercase()).collect();
        if !cfg.claims_setting.is_empty() {
            protected.insert(cfg.claims_setting.to_ascii_lowercase());
        }
        protected.extend(["role".to_string(), "session_authorization".to_string()]);
        // the signed context (whether or not signing is on: a client never sets them)
        protected.extend([crate::signing::CONTEXT_SETTING.to_string(), crate::signing::SIGNATURE_SETTING.to_string()]);
        protected.extend(cfg.protected_settings.iter().map(|s| s.to_ascii_lowercase()));
        Guard { protected, allow_do: cfg.allow_do }
    }

    /// Setting names compare as the server compares them (`guc_name_compare`): with ASCII `A`–`Z`
    /// folded and nothing else, so `APP.TENANT_ID` is protected and `app.\u{212A}elvin` (a Kelvin
    /// sign) is another setting than `app.kelvin`, free for the client to use.
    fn is_protected(&self, name: &str) -> bool {
        self.protected.contains(&name.to_ascii_lowercase())
    }

    /// Checks the startup packet's `options` (`-c name=value`, `--name=value`): protected settings
    /// may not be set there either.
    pub fn check_startup_options(&self, options: &str) -> Result<(), PgError> {
        for (name, value) in crate::protocol::options::option_pairs(options) {
            self.check_startup_setting(&name, &value)?;
        }
        Ok(())
    }

    /// Checks one startup parameter or `options` pair.
    pub fn check_startup_setting(&self, name: &str, value: &str) -> Result<(), PgError> {
        self.check_setting(name, Some(value))
    }

    /// The one rule for changing a setting to a value, wherever both are known (startup packet,
    /// literal `set_config`, `set_config` decided at Bind): a protected setting is refused, and so
    /// is a value that would change how the server reads SQL (see [`lexing`]). `value` is None
    /// when it cannot be read.
    pub fn check_setting(&self, name: &str, value: Option<&str>) -> Result<(), PgError> {
        if self.is_protected(name) {
            return Err(protected_error(name));
        }
        lexing::check(name, value)
    }

    /// Checks a query string (one or more statements).
    pub fn check(&self, sql: &[u8], pos: Position) -> Result<(), PgError> {
        self.check_text(sql, pos, 0, None)
    }

    /// Checks the statement of a Parse, whose parameter types are `types`. Like [`Guard::check`],
    /// except that a `set_config` whose name or value is a bind parameter in one of the forms
    /// `set_config` reads is not refused: it is returned, to be decided at each Bind with
    /// [`Guard::check_bound`]. So are calls whose `is_local` is a parameter (pgtenant keeps
    /// session-level settings for the client).
    pub fn check_parse(&self, sql: &[u8], types: &[u32], pos: Position) -> Result<Vec<SetConfigCall>, PgError> {
        let mut deferred = Deferred { types, calls: Vec::new() };
        self.check_text(sql, pos, 0, Some(&mut deferred))?;
        Ok(deferred.calls)
    }

    /// Decides the calls [`Guard::check_parse`] deferred, with the values of a Bind: the same
    /// errors as for literals. Returns the session-level settings they make (calls that are the
    /// whole statement, with `is_local` false), for pgtenant to keep if the statement runs cleanly.
    pub fn check_bound(&self, calls: &[SetConfigCall], params: &BindParams<'_>) -> Result<Vec<Change>, PgError> {
        let mut changes = Vec::new();
        for call in calls {
            let name = match &call.name {
                Arg::Text(name) => name.clone(),
                Arg::Param(n, _) => match bound_text(params, *n)? {
                    Some(name) => name,
                    None => continue, // the server raises 22004 and changes nothing
                },
                _ => return Err(not_literal_error()), // never deferred
            };
            // NULL resets the setting to its default, like SET … TO DEFAULT
            let value = match &call.value {
                Arg::Text(v) => Some(v.clone()),
                Arg::Null => None,
                Arg::Param(n, _) => bound_text(params, *n)?,
                _ => {
                    self.check_setting(&name, None)?;
                    continue;
                }
            };
            self.check_setting(&name, Some(value.as_deref().unwrap_or("DEFAULT")))?;
            let is_local = match &call.is_local {
                Arg::Bool(b) => Some(*b),
                Arg::Text(s) => set_config::parse_bool(s),
                Arg::Null => Some(false), // set_config reads a NULL is_local as false
                Arg::Param(n, _) => bound_bool(params, *n)?,
                Arg::Other => None,
            };
            if call.whole && is_local == Some(false) && !set_config::is_transaction_scoped(&name) {
                changes.push(match value {
                    Some(v) => Change::Set(name, v),
                    None => Change::Reset(name),
                });
            }
        }
        Ok(changes)
    }

    /// [`Guard::check`] of a query string already split into statements (`crate::sql::analyze`).
    pub fn check_statements(&self, statements: &[Vec<Token<'_>>], pos: Position) -> Result<(), PgError> {
        self.check_split(statements, pos, 0, None)
    }

    /// [`Guard::check_parse`] of a statement already split (`crate::sql::analyze`).
    pub fn check_parse_statements(&self, statements: &[Vec<Token<'_>>], types: &[u32], pos: Position) -> Result<Vec<SetConfigCall>, PgError> {
        let mut deferred = Deferred { types, calls: Vec::new() };
        self.check_split(statements, pos, 0, Some(&mut deferred))?;
        Ok(deferred.calls)
    }

    fn check_text(&self, sql: &[u8], pos: Position, depth: u32, deferred: Option<&mut Deferred<'_>>) -> Result<(), PgError> {
        self.check_split(&split(sql), pos, depth, deferred)
    }

    fn check_split(&self, statements: &[Vec<Token<'_>>], pos: Position, depth: u32, mut deferred: Option<&mut Deferred<'_>>) -> Result<(), PgError> {
        let last = statements.len().saturating_sub(1);
        for (i, toks) in statements.iter().enumerate() {
            if toks.iter().any(|t| t.kind == Kind::Unterminated) {
                continue; // the server rejects it with a syntax error; nothing runs
            }
            self.check_statement(toks, depth, deferred.as_deref_mut())?;
            let is_reset_all = toks.first().is_some_and(|t| t.is_word("reset")) && toks.get(1).is_some_and(|t| t.is_word("all"));
            if is_reset_all && (i != last || pos.in_block) {
                return Err(refused(
                    "RESET ALL would clear the tenant context for the statements that follow it".into(),
                ))
                .map_err(|e| e.with_hint("run RESET ALL on its own, outside an explicit transaction"));
            }
        }
        Ok(())
    }

    fn check_statement(&self, toks: &[Token<'_>], depth: u32, deferred: Option<&mut Deferred<'_>>) -> Result<(), PgError> {
        if toks.is_empty() {
            return Ok(());
        }
        let word = |i: usize| toks.get(i).and_then(crate::sql::literal::keyword);
        let first = word(0);
        let first = first.as_deref();
        match first {
            Some("set") | Some("reset") => {
                let mut i = 1;
                if matches!(word(1).as_deref(), Some("session") | Some("local"))
                    && word(2).as_deref() != Some("authorization")
                    && word(2).as_deref() != Some("characteristics")
                {
                    i = 2;
                }
                self.check_assignment(toks, i, first == Some("set"))?;
            }
            Some("prepare") if word(1).as_deref() == Some("transaction") => return Err(two_phase_error()),
            Some("commit") | Some("rollback") if word(1).as_deref() == Some("prepared") => return Err(two_phase_error()),
            Some("prepare") | Some("execute") | Some("deallocate") => {
                let i = if word(1).as_deref() == Some("prepare") { 2 } else { 1 };
                if toks.get(i).and_then(ident_value).is_some_and(|n| n.starts_with("pgtenant")) {
                    return Err(refused("prepared statement names starting with \"pgtenant\" are reserved".into()));
                }
            }
            Some("do") if !self.allow_do => {
                return Err(refused("DO blocks are not allowed: they could change the tenant context".into())
                    .with_hint("set tenant.allow_do = true in the pgtenant config if you really need them"));
            }
            Some("update") if toks.iter().any(|t| ident_among(t, &["pg_settings"]).is_some()) => {
                return Err(refused("UPDATE pg_settings is not allowed".into()));
            }
            Some("alter")
                if matches!(word(1).as_deref(), Some("role") | Some("user") | Some("group"))
                    && toks.iter().any(|t| t.is_word("set") || t.is_word("reset")) =>
            {
                return Err(refused("changing a role's settings is not allowed: they would apply to every tenant's connections".into())
                    .with_hint("change role settings directly against the database as an administrator"));
            }
            Some("alter") | Some("create") => {
                self.check_set_clauses(toks)?;
                if first == Some("create") {
                    check_routine_language(toks)?;
                }
            }
            _ => {}
        }
        // bind parameters of a Parse: only in a SELECT of its own (see `sql::set_config`)
        let deferred = deferred.filter(|_| depth == 0 && first == Some("select"));
        self.check_set_config(toks, deferred)?;
        interference::check(toks)?;
        // bodies of functions, procedures and (allowed) DO blocks are SQL or PL/pgSQL: check them too
        if depth < MAX_DEPTH && matches!(first, Some("create") | Some("do")) {
            let routine = first == Some("do") || is_routine(toks);
            for t in toks.iter().filter(|t| t.kind == Kind::String) {
                if let Some(body) = string_value(t) {
                    self.check_body(body.as_bytes(), depth + 1, routine)?;
                }
            }
        }
        Ok(())
    }

    /// PL/pgSQL bodies: every statement inside is checked like client SQL.
    fn check_body(&self, body: &[u8], depth: u32, routine: bool) -> Result<(), PgError> {
        for toks in split(body) {
            // PL/pgSQL wraps statements in BEGIN ... END, so SET may stand anywhere
            self.check_set_clauses(&toks)?;
            // Transaction control in a procedure (or DO block) ends the transaction that carries
            // the context, and the rest of the body would run without it; RESET ALL clears it.
            let ends = toks.iter().any(|t| t.is_word("commit") || t.is_word("rollback"));
            let reset_all = toks.windows(2).any(|w| w[0].is_word("reset") && w[1].is_word("all"));
            if routine && (ends || reset_all) {
                return Err(refused(format!(
                    "{} inside a function, procedure or DO body is not allowed: what follows would run without the tenant context",
                    if ends { "COMMIT or ROLLBACK" } else { "RESET ALL" }
                ))
                .with_hint("end transactions from the client instead"));
            }
            self.check_statement(&toks, depth, None)?;
        }
        Ok(())
    }

    /// `SET`/`RESET` of a protected setting anywhere in the statement (ALTER … SET, CREATE FUNCTION
    /// … SET, SET inside PL/pgSQL bodies).
    fn check_set_clauses(&self, toks: &[Token<'_>]) -> Result<(), PgError> {
        for (i, t) in toks.iter().enumerate() {
            if t.is_word("set") || t.is_word("reset") {
                let session_auth = toks.get(i + 2).is_some_and(|n| n.is_word("authorization"));
                let skip = toks.get(i + 1).is_some_and(|n| n.is_word("local") || (n.is_word("session") && !session_auth));
                let start = if skip { i + 2 } else { i + 1 };
                self.check_assignment(toks, start, t.is_word("set"))?;
            }
        }
        Ok(())
    }

    /// `SET name …` / `RESET name` at `toks[i..]`: a protected setting is refused, and so is a
    /// value that would change how the server reads SQL (see [`lexing`]).
    fn check_assignment(&self, toks: &[Token<'_>], i: usize, is_set: bool) -> Result<(), PgError> {
        let Some((name, end)) = self.setting_name(toks, i) else { return Ok(()) };
        if self.is_protected(&name) {
            return Err(protected_error(&name));
        }
        if is_set && lexing::is_lexer_setting(&name) {
            let mut j = end;
            if toks.get(j).is_some_and(|t| t.is_word("to")) || is_op(toks.get(j), b"=") {
                j += 1;
            }
            lexing::check(&name, toks.get(j).and_then(plain_value).as_deref())?;
        }
        Ok(())
    }

    /// The setting named at `toks[i..]`: `role`, `session authorization`, or a dotted identifier;
    /// with the index of the token after the name.
    fn setting_name(&self, toks: &[Token<'_>], i: usize) -> Option<(String, usize)> {
        let t = toks.get(i)?;
        if t.is_word("session") && toks.get(i + 1).is_some_and(|n| n.is_word("authorization")) {
            return Some(("session_authorization".into(), i + 2));
        }
        if t.is_word("time") && toks.get(i + 1).is_some_and(|n| n.is_word("zone")) {
            return Some(("timezone".into(), i + 2));
        }
        let mut name = ident_value(t)?.into_owned();
        let mut j = i + 1;
        while is_op(toks.get(j), b".") {
            name.push('.');
            name.push_str(&ident_value(toks.get(j + 1)?)?);
            j += 2;
        }
        Some((name, j))
    }

    fn check_set_config(&self, toks: &[Token<'_>], mut deferred: Option<&mut Deferred<'_>>) -> Result<(), PgError> {
        for (i, t) in toks.iter().enumerate() {
            if ident_among(t, &["set_config"]).is_none() {
                continue;
            }
            if !is_op(toks.get(i + 1), b"(") {
                // e.g. CREATE AGGREGATE … (SFUNC = set_config, INITCOND = 'app.tenant_id'): a call
                // the guard would never see
                return Err(refused("a reference to set_config other than a direct call is not allowed".into())
                    .with_hint("call set_config('name', value, is_local) directly with the name as a literal"));
            }
            let mut call = set_config::read_call(toks, i);
            match deferred.as_deref() {
                Some(d) => set_config::settle_params(&mut call, toks, d.types),
                None => set_config::no_params(&mut call),
            }
            match (&call.name, &call.value) {
                (Arg::Text(name), _) if self.is_protected(name) => return Err(protected_error(name)),
                (Arg::Text(_), Arg::Param(..)) | (Arg::Param(..), _) => {} // decided at Bind
                (Arg::Text(name), Arg::Text(value)) => self.check_setting(name, Some(value))?,
                // NULL resets the setting to its default, like SET … TO DEFAULT
                (Arg::Text(name), Arg::Null) => self.check_setting(name, Some("DEFAULT"))?,
                (Arg::Text(name), _) => self.check_setting(name, None)?,
                _ => return Err(not_literal_error()),
            }
            if call.has_params() {
                if let Some(d) = deferred.as_deref_mut() {
                    d.calls.push(call);
                }
            }
        }
        Ok(())
    }
}

/// The calls of a Parse left for Bind, and the parameter types it declared.
struct Deferred<'a> {
    types: &'a [u32],
    calls: Vec<SetConfigCall>,
}

fn not_literal_error() -> PgError {
    refused("set_config with a setting name that is not a string literal is not allowed".into())
        .with_hint("write the setting name as a literal, e.g. set_config('app.theme', $1, true), or pass it as a bind parameter: set_config($1, $2, false)")
}

/// A Bind whose parameters cannot be read (the server would reject it too).
pub fn malformed_bind() -> PgError {
    PgError::error(sqlstate::PROTOCOL_VIOLATION, "pgtenant: malformed Bind message: the set_config parameters cannot be read")
}

/// A text parameter as the server reads it: the bytes as sent, in text format and in binary
/// (`text` and `varchar` travel as their bytes either way), up to a NUL (which the server rejects
/// anyway). None for NULL.
fn bound_text(params: &BindParams<'_>, n: u32) -> Result<Option<String>, PgError> {
    match params.get(n as usize) {
        Some((0 | 1, None)) => Ok(None),
        Some((0 | 1, Some(bytes))) => {
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            Ok(Some(String::from_utf8_lossy(&bytes[..end]).into_owned()))
        }
        _ => Err(malformed_bind()),
    }
}

/// A boolean parameter: text (`boolin`) or binary (one byte, nonzero is true); NULL is false for
/// set_config; None when it cannot be read (the server then rejects the Bind).
fn bound_bool(params: &BindParams<'_>, n: u32) -> Result<Option<bool>, PgError> {
    match params.get(n as usize) {
        Some((_, None)) => Ok(Some(false)),
        Some((0, Some(bytes))) => Ok(std::str::from_utf8(bytes).ok().and_then(set_config::parse_bool)),
        Some((1, Some([b]))) => Ok(Some(*b != 0)),
        Some(_) => Ok(None),
        None => Err(malformed_bind()),
    }
}

/// `CREATE [OR REPLACE] FUNCTION|PROCEDURE`: only languages whose bodies the guard can read fully.
/// SQL bodies are static; PL/pgSQL is too, except for `EXECUTE` (dynamic SQL, which could build
/// any statement the guard refuses). Every other language (trusted PL/Perl, PL/Tcl, PL/v8…) can
/// run SQL built at run time.
/// `CREATE [OR REPLACE] FUNCTION|PROCEDURE …`.
fn is_routine(toks: &[Token<'_>]) -> bool {
    toks.iter().take(4).any(|t| t.is_word("function") || t.is_word("procedure"))
}

fn check_routine_language(toks: &[Token<'_>]) -> Result<(), PgError> {
    if !is_routine(toks) {
        return Ok(());
    }
    let language = toks
        .windows(2)
        .find(|w| w[0].is_word("language"))
        .and_then(|w| ident_value(&w[1]).map(Cow::into_owned).or_else(|| string_value(&w[1])))
        .map(|l| l.to_lowercase());
    match language.as_deref() {
        None | Some("sql") => Ok(()),
        Some("plpgsql") => {
            let dynamic = toks
                .iter()
                .filter(|t| t.kind == Kind::String)
                .filter_map(string_value)
                .any(|body| crate::sql::lexer::Lexer::new(body.as_bytes()).any(|t| t.is_word("execute")));
            if dynamic {
                return Err(refused("PL/pgSQL functions with EXECUTE (dynamic SQL) are not allowed: the statement guard cannot check SQL built at run time".into())
                    .with_hint("create such functions as the table owner, directly against the database"));
            }
            Ok(())
        }
        Some(other) => Err(refused(format!("functions in language {other} are not allowed: their bodies can run SQL the statement guard cannot check"))
            .with_hint("create such functions as the table owner, directly against the database")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        let mut cfg = TenantConfig::default();
        cfg.settings.insert("app.tenant_id".into(), "tenant_id".into());
        cfg.settings.insert("app.user_id".into(), "sub".into());
        cfg.protected_settings = vec!["app.extra".into()];
        Guard::from_config(&cfg)
    }

    const IDLE: Position = Position { in_block: false };

    #[test]
    fn refuses_every_spelling() {
        let g = guard();
        for sql in [
            "SET app.tenant_id = 2",
            "set local app.tenant_id to '2'",
            "SET SESSION \"app\".\"tenant_id\" = 2",
            "SET APP.TENANT_ID = 2",
            "select 1; set app.tenant_id = 2",
            "/* x */ SET /* y */ app . tenant_id = 2",
            "RESET app.tenant_id",
            "reset role",
            "SET ROLE postgres",
            "SET SESSION AUTHORIZATION postgres",
            "RESET SESSION AUTHORIZATION",
            "SET request.jwt.claims = '{}'",
            "SET app.extra = 1",
            "select set_config('app.tenant_id', '2', true)",
            "select pg_catalog.set_config('app.tenant_id', '2', false)",
            "select SET_CONFIG(E'app\\x2etenant_id', '2', true)",
            "select \"set_config\"(U&'app\\002etenant_id', '2', true)",
            "select U&\"\\0073et_config\"($$app.tenant_id$$, '2', true)",
            "select set_config($1, $2, true)",
            "select set_config('client_encoding', $1, false)",
            "select set_config('app.' || 'tenant_id', '2', true)",
            "select set_config('app.tenant_id'::text, '2', true)",
            "select set_config(setting_name => 'app.tenant_id', new_value => '2', is_local => true)",
            "select * from (select set_config(x, '2', true) from t) s",
            "select set_config('ROLE', 'postgres', true)",
            "select set_config('pgtenant.context', '{}', true)",
            "SET LOCAL \"PGTENANT\".signature = 'x'",
            "UPDATE pg_settings SET setting = '2' WHERE name = 'app.tenant_id'",
            "update pg_catalog.pg_settings set setting = 'x'",
            "UPDATE PG_SETTINGS SET setting = 'x'",
            "UPDATE \"pg_settings\" SET setting = 'x'",
            "UPDATE U&\"pg\\005fsettings\" SET setting = 'x'",
            "DO $$ BEGIN PERFORM 1; END $$",
            "ALTER ROLE app_user SET app.tenant_id = '2'",
            "ALTER DATABASE app SET app.tenant_id = '2'",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET app.tenant_id = '2' AS 'select 1'",
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $f$ BEGIN PERFORM set_config('app.tenant_id', '2', true); END $f$",
            "CREATE PROCEDURE p() LANGUAGE plpgsql AS $p$ BEGIN SET LOCAL app.tenant_id = '2'; END $p$",
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $f$ BEGIN SET SESSION AUTHORIZATION postgres; END $f$",
            "RESET ALL; select * from orders",
            "prepare x as select set_config('app.tenant_id', '2', true)",
            "DEALLOCATE pgtenant_ctx",
            "deallocate prepare PGTENANT_S1",
            "PREPARE pgtenant_ctx (text) AS select 1",
            "EXECUTE pgtenant_s0",
            "select U&\"set!005fconfig\" UESCAPE '!'('app.tenant_id', '2', true)",
            "SET LOCAL U&\"app!002etenant_id\" UESCAPE '!' = '2'",
            "select set_config(U&'app!002etenant_id' UESCAPE '!', '2', true)",
            "select set_config(U&'app!002etenant_id' /* x */ uescape /* y */ '!', '2', true)",
            "select set_config(U&'app\\zzzz', '2', true)",
            "CREATE AGGREGATE pg_temp.a(text, bool) (SFUNC = set_config, STYPE = text, INITCOND = 'app.tenant_id')",
            "CREATE AGGREGATE pg_temp.a(text, bool) (SFUNC = pg_catalog.\"set_config\", STYPE = text)",
            "CREATE FUNCTION pg_temp.f() RETURNS void LANGUAGE plpgsql AS $f$ BEGIN EXECUTE 'select set_con' || 'fig(''app.tenant_id'', ''2'', true)'; END $f$",
            "CREATE OR REPLACE PROCEDURE pg_temp.p() LANGUAGE 'plpgsql' AS $p$ BEGIN execute format('SET app.tenant_id = %s', 2); END $p$",
            "CREATE FUNCTION pg_temp.f() RETURNS void LANGUAGE plperl AS $f$ spi_exec_query('select 1'); $f$",
            "ALTER ROLE CURRENT_USER SET search_path = evil",
            "alter user app_user reset all",
            "CREATE PROCEDURE pg_temp.p() LANGUAGE plpgsql AS $p$ BEGIN COMMIT; PERFORM count(*) FROM orders; END $p$",
            "CREATE PROCEDURE pg_temp.p() LANGUAGE plpgsql AS $p$ BEGIN ROLLBACK; END $p$",
            "CREATE FUNCTION pg_temp.f() RETURNS void LANGUAGE plpgsql AS $f$ BEGIN RESET ALL; END $f$",
        ] {
            let r = g.check(sql.as_bytes(), IDLE);
            assert!(r.is_err(), "not refused: {sql}");
            assert_eq!(r.unwrap_err().code, "42501");
        }
        assert!(g.check(b"RESET ALL", Position { in_block: true }).is_err());
    }

    #[test]
    fn refuses_two_phase_commit() {
        for sql in ["PREPARE TRANSACTION 'x'", "commit prepared 'x'", "begin; select 1; ROLLBACK PREPARED 'x'"] {
            assert_eq!(guard().check(sql.as_bytes(), IDLE).unwrap_err().code, "0A000", "{sql}");
        }
        for sql in ["PREPARE q AS select 1", "commit", "rollback to savepoint prepared"] {
            assert!(guard().check(sql.as_bytes(), IDLE).is_ok(), "{sql}");
        }
    }

    /// The server folds ASCII letters only in setting names: `app.\u{212A}elvin` (a Kelvin sign)
    /// is another setting than `app.kelvin`, free to use; ASCII capitals are the same setting.
    #[test]
    fn setting_names_fold_ascii_letters_only() {
        let mut cfg = TenantConfig::default();
        cfg.settings.insert("app.kelvin".into(), "tenant_id".into());
        let g = Guard::from_config(&cfg);
        for sql in ["SET APP.KELVIN = 2", "SET \"App.Kelvin\" = 2", "select set_config('APP.KELVIN', '2', true)"] {
            assert_eq!(g.check(sql.as_bytes(), IDLE).unwrap_err().code, "42501", "{sql}");
        }
        assert!(g.check_startup_setting("APP.KELVIN", "2").is_err());
        for sql in ["SET app.\u{212A}elvin = 2", "SET \"APP.\u{212A}ELVIN\" = 2", "select set_config('app.\u{212A}elvin', '2', true)"] {
            assert!(g.check(sql.as_bytes(), IDLE).is_ok(), "{sql}");
        }
        assert!(g.check_startup_setting("app.\u{212A}elvin", "2").is_ok());
    }

    #[test]
    fn allows_ordinary_sql() {
        let g = guard();
        for sql in [
            "select current_setting('app.tenant_id')",
            "show app.tenant_id",
            "SET statement_timeout = 1000",
            "SET TIME ZONE 'UTC'",
            "SET app.theme = 'dark'",
            "select set_config('app.theme', 'dark', true)",
            "select set_config('app.theme', $1, true)",
            "select 'set_config(''app.tenant_id'', ''2'', true)'",
            "-- SET app.tenant_id = 2\nselect 1",
            "/* SET app.tenant_id = 2 */ select 1",
            "select $$ SET app.tenant_id = 2 $$",
            "UPDATE users SET role = 'admin' WHERE id = 1",
            "UPDATE users SET name = 'pg_settings'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "RESET ALL",
            "select 1; RESET ALL",
            "CREATE TEMP TABLE t (x int)",
            "PREPARE mine AS select 1",
            "DEALLOCATE ALL",
            "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE plpgsql AS $f$ BEGIN RETURN 1; END $f$",
            "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql RETURN 1",
            "select U&'a!0062' UESCAPE '!'",
            "CREATE TEMP VIEW v AS SELECT 'commit' AS word, 'reset all' AS other",
        ] {
            assert!(g.check(sql.as_bytes(), IDLE).is_ok(), "refused: {sql}");
        }
    }

    fn parse(sql: &str, types: &[u32]) -> Result<Vec<SetConfigCall>, PgError> {
        guard().check_parse(sql.as_bytes(), types, IDLE)
    }

    #[test]
    fn bind_parameters_of_a_parse_wait_for_bind() {
        for sql in [
            "select set_config($1, $2, false)",
            "SELECT pg_catalog.set_config($1::varchar, $2::VARCHAR, $3::boolean)",
            "select set_config($2, $1, true)",
            "select set_config('client_encoding', $1, false)",
            "select set_config('application_name', $1, false)",
            "select set_config('work_mem', '1MB', $1)",
            "select set_config($1, lower('X'), false)",
            "select set_config($1, $2, false) from orders",
            "select 1, set_config($1, 'v', true)",
        ] {
            let calls = parse(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
            assert_eq!(calls.len(), 1, "{sql}");
        }
        assert_eq!(parse("select set_config($1, $2, $3)", &[25, 1043, 16]).unwrap().len(), 1);
        assert_eq!(parse("select set_config('app.theme', 'dark', false)", &[]).unwrap(), []);
        // the simple protocol has no parameters: refused as before
        assert!(guard().check(b"select set_config($1, $2, false)", IDLE).is_err());
        for (sql, types) in [
            ("select set_config($1 || '', '2', true)", &[][..]),
            ("select set_config(lower($1), '2', true)", &[]),
            ("select set_config(($1), '2', true)", &[]),
            ("select set_config((select $1), '2', true)", &[]),
            ("select set_config($1::name, '2', true)", &[]),
            ("select set_config($1::text, '2', true)", &[]),
            ("select set_config('client_encoding', $1::text, true)", &[]),
            ("select set_config($1::varchar(13), '2', true)", &[]),
            ("select set_config(CAST($1 AS text), '2', true)", &[]),
            ("select set_config(setting_name => $1, new_value => '2', is_local => true)", &[]),
            ("select set_config($1, $2, false)", &[1042]),
            ("select set_config($1, $2, false)", &[19]),
            ("select $1::bpchar, set_config($1, '2', false)", &[]),
            ("select set_config($1, $1, false)", &[]),
            ("select set_config('app.tenant_id', $1, false)", &[]),
            ("select set_config('client_encoding', $1, false)", &[17]),
            ("select set_config('client_encoding', $1 || '', false)", &[]),
            ("explain select set_config($1, '2', true)", &[]),
            ("with x as (select 1) select set_config($1, '2', true)", &[]),
            ("PREPARE p(text) AS select set_config($1, '2', false)", &[]),
            ("CREATE FUNCTION pg_temp.f(text) RETURNS text LANGUAGE sql RETURN set_config($1, '2', false)", &[]),
            ("CREATE FUNCTION pg_temp.f(text) RETURNS text LANGUAGE sql BEGIN ATOMIC select set_config($1, '2', false); END", &[]),
            ("CREATE FUNCTION pg_temp.f(text) RETURNS void LANGUAGE plpgsql AS $f$ BEGIN PERFORM set_config($1, '2', false); END $f$", &[]),
            ("CREATE FUNCTION pg_temp.f(text) RETURNS text LANGUAGE sql AS 'select set_config($1, ''2'', false)'", &[]),
        ] {
            let r = parse(sql, types);
            assert!(r.is_err(), "not refused at Parse: {sql} {types:?}");
            assert_eq!(r.unwrap_err().code, "42501");
        }
    }

    /// A Bind message body (portal "", statement "") with these format codes and values.
    fn bind_body(formats: &[i16], values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = vec![0, 0];
        b.extend_from_slice(&(formats.len() as i16).to_be_bytes());
        for f in formats {
            b.extend_from_slice(&f.to_be_bytes());
        }
        b.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        b
    }

    fn bound(sql: &str, formats: &[i16], values: &[Option<&[u8]>]) -> Result<Vec<Change>, PgError> {
        let calls = parse(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        let body = bind_body(formats, values);
        let params = crate::protocol::peek::bind_params(&body).expect("well-formed");
        guard().check_bound(&calls, &params)
    }

    #[test]
    fn bind_values_follow_the_literal_rules() {
        let set = |n: &str, v: &str| Change::Set(n.into(), v.into());
        let sc = "select set_config($1, $2, false)";
        assert_eq!(bound(sc, &[], &[Some(b"application_name"), Some(b"x")]).unwrap(), [set("application_name", "x")]);
        assert_eq!(bound(sc, &[1], &[Some(b"application_name"), Some(b"bin")]).unwrap(), [set("application_name", "bin")]);
        assert_eq!(bound(sc, &[0, 1], &[Some(b"client_encoding"), Some(b"UTF8")]).unwrap(), [set("client_encoding", "UTF8")]);
        assert_eq!(bound(sc, &[], &[Some(b"work_mem"), None]).unwrap(), [Change::Reset("work_mem".into())]);
        assert_eq!(bound(sc, &[], &[Some(b"standard_conforming_strings"), None]).unwrap(), [Change::Reset("standard_conforming_strings".into())]);
        // NULL name: the server raises 22004 and sets nothing
        assert_eq!(bound(sc, &[], &[None, Some(b"2")]).unwrap(), []);
        for (name, value) in [
            (&b"app.tenant_id"[..], &b"2"[..]),
            (b"APP.Tenant_Id", b"2"),
            (b"request.jwt.claims", b"{}"),
            (b"role", b"postgres"),
            (b"app.tenant_id\0junk", b"2"),
            (b"standard_conforming_strings", b"off"),
            (b"client_encoding", b"SJIS"),
            (b"Client_Encoding", b"shift-jis"),
        ] {
            for formats in [&[][..], &[1], &[1, 0]] {
                let e = bound(sc, formats, &[Some(name), Some(value)]).unwrap_err();
                assert_eq!(e.code, "42501", "{name:?} {value:?}");
            }
        }
        let e = bound(sc, &[], &[Some(b"APP.TENANT_ID"), Some(b"2")]).unwrap_err();
        assert!(e.message.contains("changing setting \"APP.TENANT_ID\" is not allowed"), "{}", e.message);
        let e = bound(sc, &[], &[Some(b"standard_conforming_strings"), Some(b"off")]).unwrap_err();
        assert!(e.message.starts_with("pgtenant: setting standard_conforming_strings to 'off' is not allowed"), "{}", e.message);
        // a literal name with a bound value; a value that is not a parameter for a bound name
        assert!(bound("select set_config('client_encoding', $1, false)", &[], &[Some(b"BIG5")]).is_err());
        assert!(bound("select set_config($1, lower('OFF'), false)", &[], &[Some(b"standard_conforming_strings")]).is_err());
        assert_eq!(bound("select set_config($1, lower('x'), false)", &[], &[Some(b"application_name")]).unwrap(), []);
        // is_local as a parameter, text or binary; only session-level calls are kept
        let sl = "select set_config($1, $2, $3)";
        assert_eq!(bound(sl, &[], &[Some(b"work_mem"), Some(b"1MB"), Some(b"off")]).unwrap(), [set("work_mem", "1MB")]);
        assert_eq!(bound(sl, &[], &[Some(b"work_mem"), Some(b"1MB"), Some(b" t")]).unwrap(), []);
        assert_eq!(bound(sl, &[0, 0, 1], &[Some(b"work_mem"), Some(b"1MB"), Some(&[0])]).unwrap(), [set("work_mem", "1MB")]);
        assert_eq!(bound(sl, &[0, 0, 1], &[Some(b"work_mem"), Some(b"1MB"), Some(&[1])]).unwrap(), []);
        assert_eq!(bound(sl, &[], &[Some(b"work_mem"), Some(b"1MB"), None]).unwrap(), [set("work_mem", "1MB")]);
        assert_eq!(bound(sl, &[], &[Some(b"work_mem"), Some(b"1MB"), Some(b"maybe")]).unwrap(), []);
        // not the whole statement, or a setting that lasts one transaction anyway: not kept
        assert_eq!(bound("select set_config($1, $2, false) from orders", &[], &[Some(b"work_mem"), Some(b"1MB")]).unwrap(), []);
        assert_eq!(bound(sc, &[], &[Some(b"transaction_isolation"), Some(b"serializable")]).unwrap(), []);
        // parameters missing, format codes that do not fit or are unknown: refused
        for (formats, values) in [(&[][..], &[Some(&b"work_mem"[..])][..]), (&[0, 0, 0], &[Some(b"a"), Some(b"b")]), (&[2], &[Some(b"a"), Some(b"b")])] {
            assert_eq!(bound(sc, formats, values).unwrap_err().code, "08P01");
        }
    }

    #[test]
    fn startup_options() {
        let g = guard();
        assert!(g.check_startup_options("-c app.tenant_id=2").is_err());
        assert!(g.check_startup_options("-capp.tenant_id=2").is_err());
        assert!(g.check_startup_options("--role=postgres").is_err());
        assert!(g.check_startup_options("-c search_path=app -c role=x").is_err());
        assert!(g.check_startup_options("-c search_path=app").is_ok());
    }

    #[test]
    fn do_can_be_allowed_but_bodies_are_still_checked() {
        let mut cfg = TenantConfig::default();
        cfg.settings.insert("app.tenant_id".into(), "tenant_id".into());
        cfg.allow_do = true;
        let g = Guard::from_config(&cfg);
        assert!(g.check(b"DO $$ BEGIN RAISE NOTICE 'hi'; END $$", IDLE).is_ok());
        assert!(g.check(b"DO $$ BEGIN PERFORM set_config('app.tenant_id', '9', true); END $$", IDLE).is_err());
        assert!(g.check(b"DO $$ BEGIN SET LOCAL app.tenant_id = 9; END $$", IDLE).is_err());
    }
}
