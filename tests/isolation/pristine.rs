//! The hand-over invariant: a backend handed to a different client is in the pristine session
//! state.
//!
//! For every state-creating operation × every protocol path (simple, extended, pipelined, in a
//! block, FunctionCall, as a named statement executed or only parsed, followed by an error in its
//! batch, in a block rolled back) × every way of leaving, client A
//! (tenant 1) runs the operation, then leaves (or just finishes its transaction), and client B
//! (tenant 2) on the same backend (`pool_size = 1`) takes a fingerprint of the session state. It
//! must equal the fingerprint of a fresh backend. Operations pgtenant refuses are recorded as
//! refused; the fingerprint is checked all the same. New operations and paths are one line each.

use std::fmt::Write as _;
use std::time::Duration;

use crate::adversarial::{oid, try_start};
use crate::common::*;
use crate::wire::{self, Reply, Wire};

/// Objects the operations use, created by the superuser.
const SETUP: &str = "
CREATE OR REPLACE FUNCTION public.leak_setting() RETURNS text LANGUAGE sql
  AS $$ select set_config('app.custom', 'tenant-1-fn', false) $$;
CREATE OR REPLACE FUNCTION public.with_work_mem() RETURNS text LANGUAGE sql SET work_mem = '7MB'
  AS $$ select current_setting('work_mem') $$;
CREATE OR REPLACE FUNCTION public.take_lock() RETURNS void LANGUAGE sql
  AS $$ select pg_advisory_lock(4244) $$;
CREATE OR REPLACE FUNCTION public.mk_scratch() RETURNS void LANGUAGE plpgsql
  AS $$ BEGIN CREATE TEMP TABLE IF NOT EXISTS scratch AS SELECT * FROM orders; END $$;
CREATE SEQUENCE IF NOT EXISTS public.leak_seq;
GRANT USAGE, SELECT, UPDATE ON SEQUENCE public.leak_seq TO app_user;
GRANT EXECUTE ON FUNCTION public.leak_setting(), public.with_work_mem(), public.take_lock(), public.mk_scratch() TO app_user;
CREATE OR REPLACE VIEW public.leak_view AS select set_config('app.custom', 'tenant-1-view', false) as v;
CREATE OR REPLACE VIEW public.lock_view AS select pg_advisory_lock(4245)::text as v;
CREATE OR REPLACE VIEW public.seq_view AS select nextval('public.leak_seq') as v;
GRANT SELECT ON public.leak_view, public.lock_view, public.seq_view TO app_user;
CREATE OR REPLACE PROCEDURE public.leak_proc() LANGUAGE sql AS $$ select set_config('app.custom', 'tenant-1-proc', false) $$;
GRANT EXECUTE ON PROCEDURE public.leak_proc() TO app_user;
CREATE TABLE IF NOT EXISTS public.leak_notes (x int);
CREATE OR REPLACE FUNCTION public.leak_trigger() RETURNS trigger LANGUAGE plpgsql
  AS $$ BEGIN PERFORM set_config('app.custom', 'tenant-1-trigger', false); RETURN NEW; END $$;
DROP TRIGGER IF EXISTS leak_notes_trigger ON public.leak_notes;
CREATE TRIGGER leak_notes_trigger BEFORE INSERT ON public.leak_notes FOR EACH ROW EXECUTE FUNCTION public.leak_trigger();
GRANT INSERT ON public.leak_notes TO app_user;
CREATE OR REPLACE FUNCTION public.leak_op(int, int) RETURNS int LANGUAGE sql
  AS $$ select length(set_config('app.custom', 'tenant-1-operator', false)) + $1 + $2 $$;
DROP OPERATOR IF EXISTS public.#+# (int, int);
CREATE OPERATOR public.#+# (LEFTARG = int, RIGHTARG = int, FUNCTION = public.leak_op);
CREATE OR REPLACE FUNCTION public.leak_check(text) RETURNS boolean LANGUAGE sql
  AS $$ select set_config('app.custom', 'tenant-1-domain', false) is not null $$;
CREATE OR REPLACE FUNCTION public.filter() RETURNS text LANGUAGE sql
  AS $$ select set_config('app.custom', 'tenant-1-filter', false) $$;
CREATE OR REPLACE FUNCTION public.level() RETURNS text LANGUAGE sql
  AS $$ select set_config('app.custom', 'tenant-1-level', false) $$;
DO $$ BEGIN CREATE DOMAIN public.leak_domain AS text CHECK (public.leak_check(VALUE)); EXCEPTION WHEN duplicate_object THEN NULL; END $$;
";

/// Removes what SETUP made and the rows the operations wrote, so later scenarios start clean.
const TEARDOWN: &str = "
DROP VIEW IF EXISTS public.leak_view, public.lock_view, public.seq_view;
DROP TABLE IF EXISTS public.leak_notes;
DROP OPERATOR IF EXISTS public.#+# (int, int);
DROP DOMAIN IF EXISTS public.leak_domain;
DROP PROCEDURE IF EXISTS public.leak_proc();
DROP FUNCTION IF EXISTS public.leak_setting(), public.with_work_mem(), public.take_lock(), public.mk_scratch(),
  public.leak_trigger(), public.leak_op(int, int), public.leak_check(text), public.filter(), public.level();
DROP SEQUENCE IF EXISTS public.leak_seq;
DELETE FROM orders WHERE amount = -50;
";

/// A FunctionCall form of an operation: signature (for the OID), allow-list entry, text arguments.
type Call = (&'static str, &'static str, &'static [&'static str]);

const SET_CONFIG: &str = "set_config(text,text,boolean)";

/// name, SQL (one statement), FunctionCall form, extra `[tenant]` keys.
const OPS: &[(&str, &str, Option<Call>, &str)] = &[
    ("set_search_path", "SET search_path = tenant1_schema, public", None, ""),
    ("set_schema", "SET SCHEMA 'tenant1_schema'", None, ""),
    ("set_config_search_path", "select set_config('search_path', 'tenant1_schema', false)", Some((SET_CONFIG, "set_config", &["search_path", "tenant1_schema", "false"])), ""),
    ("set_config_custom", "select set_config('app.custom', 'tenant-1-data', false)", Some((SET_CONFIG, "set_config", &["app.custom", "tenant-1-data", "false"])), ""),
    ("set_config_read_only", "select set_config('default_transaction_read_only', 'on', false)", Some((SET_CONFIG, "set_config", &["default_transaction_read_only", "on", "false"])), ""),
    ("set_statement_timeout", "SET statement_timeout = 12345", None, ""),
    ("set_session_characteristics", "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", None, ""),
    ("set_time_zone", "SET TIME ZONE 'Asia/Tokyo'", None, ""),
    ("fn_calls_set_config", "select public.leak_setting()", Some(("public.leak_setting()", "public.leak_setting", &[])), ""),
    ("fn_with_set_clause", "select public.with_work_mem()", Some(("public.with_work_mem()", "public.with_work_mem", &[])), ""),
    ("fn_takes_lock", "select public.take_lock()", Some(("public.take_lock()", "public.take_lock", &[])), ""),
    ("fn_creates_temp", "select public.mk_scratch()", Some(("public.mk_scratch()", "public.mk_scratch", &[])), ""),
    ("temp_table_on_commit_drop", "CREATE TEMP TABLE leak_tmp_d ON COMMIT DROP AS select * from orders", None, ""),
    ("temp_table", "CREATE TEMP TABLE leak_tmp AS select * from orders", None, ""),
    ("temp_view", "CREATE TEMP VIEW leak_view AS select 1 as x", None, ""),
    ("select_into_temp", "SELECT * INTO TEMP leak_into FROM orders", None, ""),
    ("declare_with_hold", "DECLARE leak_cur CURSOR WITH HOLD FOR select * from orders", None, ""),
    ("prepare", "PREPARE leak_stmt AS select * from orders", None, ""),
    ("listen", "LISTEN leak_channel", None, ""),
    ("advisory_lock", "select pg_advisory_lock(4242)", Some(("pg_advisory_lock(bigint)", "pg_advisory_lock", &["4242"])), ""),
    ("advisory_lock_shared", "select pg_try_advisory_lock_shared(1, 2)", Some(("pg_try_advisory_lock_shared(integer,integer)", "pg_try_advisory_lock_shared", &["1", "2"])), ""),
    ("nextval", "select nextval('public.leak_seq')", Some(("nextval(regclass)", "nextval", &["public.leak_seq"])), ""),
    ("setval", "select setval('public.leak_seq', 77)", Some(("setval(regclass,bigint)", "setval", &["public.leak_seq", "77"])), ""),
    ("view_calls_set_config", "select * from public.leak_view", None, ""),
    ("view_takes_lock", "select * from public.lock_view", None, ""),
    ("view_nextval", "select * from public.seq_view", None, ""),
    ("procedure_sets_config", "CALL public.leak_proc()", None, ""),
    ("trigger_sets_config", "insert into public.leak_notes values (1)", None, ""),
    ("insert_serial_default", "insert into orders (tenant_id, amount) values (1, -50)", None, ""),
    ("explain_analyze_set_config", "EXPLAIN ANALYZE select set_config('search_path', 'tenant1_schema', false)", None, ""),
    ("cte_set_config", "WITH s AS (select set_config('app.custom', 'tenant-1-cte', false)) select * from s", None, ""),
    ("create_table_pg_temp", "CREATE TABLE pg_temp.leak_pgt AS select * from orders", None, ""),
    ("table_command_view", "TABLE public.leak_view", None, ""),
    ("function_in_from", "select * from public.leak_setting()", None, ""),
    ("operator_calls_set_config", "select 1 #+# 2", None, ""),
    ("domain_check_calls_set_config", "select 'x'::public.leak_domain", None, ""),
    ("keyword_named_function", "select public.filter()", Some(("public.filter()", "public.filter", &[])), ""),
    ("keyword_named_function_unqualified", "select level()", None, ""),
    ("do_set_config", "DO $$ BEGIN PERFORM set_config('app.custom', 'tenant-1-do', false); END $$", None, "allow_do = true"),
    ("do_dynamic_temp", "DO $$ BEGIN EXECUTE 'create te' || 'mp table leak_do as select * from orders'; END $$", None, "allow_do = true"),
    ("do_dynamic_lock", "DO $$ BEGIN EXECUTE 'select pg_advisory_l' || 'ock(4243)'; END $$", None, "allow_do = true"),
    ("do_dynamic_set", "DO $$ BEGIN EXECUTE 'se' || 't search_path = tenant1_schema'; END $$", None, "allow_do = true"),
    // leaves nothing on the server by itself; on the named path it drops the client's `leak_s1`
    // (a pgtenant before 2026-12-03 left the DEALLOCATE statement on the backend under the
    // client's own name)
    ("deallocate_named", "DEALLOCATE leak_s1", None, ""),
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    /// One simple Query.
    Simple,
    /// Parse/Bind/Describe/Execute/Sync.
    Extended,
    /// An extended batch before and a simple Query after, all in one write.
    Pipelined,
    /// BEGIN; the operation; COMMIT (simple queries).
    InBlock,
    /// FunctionCall, with the function in `allowed_function_calls`.
    FunctionCall,
    /// Named statements: `leak_s1` (`select 1`) and the operation under a name of its own, bound
    /// and executed, then Sync.
    Named,
    /// The same two Parses and a Sync, nothing executed: a statement only parsed leaves nothing.
    NamedParsed,
    /// Parse/Bind/Execute of the operation, then an error in the same batch (a syntax error), then
    /// Sync: the batch's implicit transaction rolls back, and what is not transactional stays.
    ThenError,
    /// BEGIN; the operation; ROLLBACK (simple queries): the same, in a block.
    InBlockRolledBack,
}

const PATHS: &[Path] = &[Path::Simple, Path::Extended, Path::Pipelined, Path::InBlock, Path::FunctionCall, Path::Named, Path::NamedParsed, Path::ThenError, Path::InBlockRolledBack];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Leave {
    /// Terminate and close.
    Disconnect,
    /// Close the socket without Terminate.
    Drop,
    /// Stay connected, idle (transaction pooling only: in session pooling B would wait for A).
    StayConnected,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Transaction,
    Session,
}

impl Mode {
    fn config(self) -> &'static str {
        match self {
            Mode::Transaction => "",
            Mode::Session => "[pool]\nmode = \"session\"",
        }
    }
    fn leaves(self) -> &'static [Leave] {
        match self {
            Mode::Transaction => &[Leave::Disconnect, Leave::Drop, Leave::StayConnected],
            Mode::Session => &[Leave::Disconnect, Leave::Drop],
        }
    }
}

/// The session state, one query (and two statements that must fail), labelled.
const FINGERPRINT: &str = "select current_user::text, session_user::text, pg_backend_pid()::text, \
    (select coalesce(string_agg(name || '=' || setting, ', ' order by name), '') from pg_settings where source = 'session'), \
    (select count(*) from pg_class where relnamespace = pg_my_temp_schema())::text, \
    (select coalesce(string_agg(name, ', ' order by name), '') from pg_cursors), \
    (select coalesce(string_agg(name, ', ' order by name), '') from pg_prepared_statements where name not like 'pgtenant%'), \
    (select coalesce(string_agg(c, ', ' order by c), '') from pg_listening_channels() c), \
    (select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid())::text, \
    coalesce(current_setting('app.custom', true), '')";
const LABELS: &[&str] = &["current_user", "session_user", "backend pid", "session settings", "temp objects", "cursors", "prepared statements", "listening", "advisory locks", "app.custom"];
const PID: usize = 2;

#[derive(Debug, Clone, PartialEq)]
struct Fingerprint(Vec<(String, String)>);

impl Fingerprint {
    fn pid(&self) -> &str {
        &self.0[PID].1
    }
    /// Where `self` differs from `other`, ignoring the backend pid.
    fn diff(&self, other: &Fingerprint) -> Vec<String> {
        self.0
            .iter()
            .zip(&other.0)
            .enumerate()
            .filter(|(i, (a, b))| *i != PID && a.1 != b.1)
            .map(|(_, (a, b))| format!("{}: {:?} (pristine {:?})", a.0, a.1, b.1))
            .collect()
    }
}

async fn fingerprint(w: &mut Wire, full: bool) -> Result<Fingerprint, String> {
    let r = w.simple(FINGERPRINT).await;
    if !r.ok() || r.rows.len() != 1 {
        return Err(format!("fingerprint query: {}", r.summary()));
    }
    let mut f: Vec<(String, String)> = LABELS.iter().enumerate().map(|(i, l)| (l.to_string(), r.get(0, i))).collect();
    if full {
        // sequence state: both must fail with 55000 on a backend that never ran nextval
        for (label, sql) in [("lastval()", "select lastval()"), ("currval(leak_seq)", "select currval('public.leak_seq')")] {
            let r = w.simple(sql).await;
            let v = match r.code() {
                Some(code) => format!("error {code}"),
                None if r.ok() => format!("value {}", r.get(0, 0)),
                None => r.summary(),
            };
            f.push((label.to_string(), v));
        }
    }
    Ok(Fingerprint(f))
}

fn b_token() -> String {
    token(2, "bob-pristine")
}

async fn pristine(env: &Env, mode: Mode, b_token: &str) -> Result<Fingerprint, String> {
    let p = try_start(env, "pool_size = 1", mode.config(), "").await?;
    let mut b = Wire::connect(p.addr, b_token).await?;
    let f = fingerprint(&mut b, true).await;
    b.close().await;
    p.stop().await;
    f
}

/// Runs one operation on one path; None when the path does not apply to the operation.
async fn run_op(a: &mut Wire, sql: &str, call: Option<(u32, &[&str])>, path: Path) -> Option<Reply> {
    Some(match path {
        Path::Simple => a.simple(sql).await,
        Path::Extended => a.ext(sql).await,
        Path::Pipelined => a.round(&[wire::extended("select 1"), wire::extended(sql), wire::query("select 2")].concat(), 3).await,
        Path::ThenError => a.round(&[wire::unnamed(sql), wire::parse("", "selec", &[]), wire::sync()].concat(), 1).await,
        Path::InBlock | Path::InBlockRolledBack => {
            let end = if path == Path::InBlock { "COMMIT" } else { "ROLLBACK" };
            let mut r = a.simple("BEGIN").await;
            for part in [a.simple(sql).await, a.simple(end).await] {
                r.errors.extend(part.errors);
                r.tags.extend(part.tags);
                r.readies.extend(part.readies);
                r.trace.push_str(&part.trace);
                r.closed |= part.closed;
                r.timed_out |= part.timed_out;
            }
            r
        }
        Path::FunctionCall => {
            let (oid, args) = call?;
            a.call(oid, args).await
        }
        Path::Named | Path::NamedParsed => {
            let mut batch = vec![wire::parse("leak_s1", "select 1", &[]), wire::parse("leak_named", sql, &[])];
            if path == Path::Named {
                batch.extend([wire::bind("", "leak_named", &[]), wire::execute("", 0)]);
            }
            batch.push(wire::sync());
            a.round(&batch.concat(), 1).await
        }
    })
}

struct Outcome {
    line: String,
    failure: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn scenario(
    env: &Env,
    mode: Mode,
    op: &(&str, &str, Option<Call>, &str),
    path: Path,
    leave: Leave,
    reference: &Fingerprint,
    oids: &std::collections::HashMap<&'static str, u32>,
    b_token: &str,
) -> Option<Outcome> {
    let (name, sql, call, extra) = *op;
    if path == Path::FunctionCall && call.is_none() {
        return None;
    }
    if mode == Mode::Transaction && TRUSTED_IMPLICIT.contains(&name) {
        // documented assumption (docs/security.md): database code that a plain SELECT or write runs
        // implicitly is trusted not to leave session state; session pooling still covers it
        return None;
    }
    let label = format!("{mode:?} / {name} / {path:?} / {leave:?}");
    let fail = |why: String| Some(Outcome { line: format!("{label}: FAIL {why}"), failure: Some(format!("{label}: {why}")) });
    let mut config = format!("{extra}\n");
    let mut note = String::new();
    if let (Path::FunctionCall, Some((_, allow, _))) = (path, call) {
        writeln!(config, "allowed_function_calls = [\"{allow}\"]").unwrap();
    }
    config.push_str(mode.config());
    let p = match try_start(env, "pool_size = 1", &config, "").await {
        Ok(p) => p,
        Err(e) if e.contains("allowed_function_calls") => {
            note = " (allowed_function_calls not supported: default config)".into();
            match try_start(env, "pool_size = 1", &format!("{extra}\n{}", mode.config()), "").await {
                Ok(p) => p,
                Err(e) => return fail(e),
            }
        }
        Err(e) => return fail(e),
    };
    let result = async {
        let mut a = Wire::connect(p.addr, &token(1, "alice-pristine")).await?;
        let pid_a = a.simple("select pg_backend_pid()").await.get(0, 0);
        let call = call.map(|(sig, _, args)| (oids[sig], args));
        let r = run_op(&mut a, sql, call, path).await.expect("path applies");
        let outcome = match (r.code(), r.timed_out, r.closed) {
            (_, true, _) => "TIMED OUT".to_string(),
            (_, _, true) => "connection CLOSED".to_string(),
            (Some(code), _, _) => format!("refused {code}"),
            (None, _, _) => "ran".to_string(),
        };
        // A sends nothing after the operation: any query of its own (the fingerprint's contains
        // `advisory`, `temp`, `listen`, `prepare`) could make pgtenant reset the backend and hide
        // a leak
        let held = match leave {
            Leave::Disconnect => {
                a.close().await;
                None
            }
            Leave::Drop => {
                drop(a);
                None
            }
            Leave::StayConnected => Some(a),
        };
        let b = async {
            let mut b = Wire::connect(p.addr, b_token).await?;
            let f = fingerprint(&mut b, true).await;
            b.close().await;
            f
        };
        let f = tokio::time::timeout(Duration::from_secs(12), b).await.map_err(|_| format!("A {outcome}; B got no answer within 12 s"))??;
        if let Some(a) = held {
            a.close().await;
        }
        Ok::<_, String>((outcome, pid_a, f))
    }
    .await;
    p.stop().await;
    let (outcome, pid_a, f) = match result {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    let backend = if f.pid() == pid_a { "same backend" } else { "NEW backend" };
    let diff = f.diff(reference);
    if diff.is_empty() {
        Some(Outcome { line: format!("{label}: A {outcome}; B on {backend}: pristine{note}"), failure: None })
    } else {
        let why = format!("A {outcome}; B on {backend} finds {}{note}", diff.join("; "));
        Some(Outcome { line: format!("{label}: FAIL {why}"), failure: Some(format!("{label}: {why}")) })
    }
}

async fn matrix(env: &Env, mode: Mode) -> TestResult {
    env.cluster.psql("app", SETUP).map_err(|e| format!("setup: {e}"))?;
    let mut oids = std::collections::HashMap::new();
    for (_, _, call, _) in OPS {
        if let Some((sig, _, _)) = call {
            oids.insert(*sig, oid(env, sig)?);
        }
    }
    let b_token = b_token();
    let reference = pristine(env, mode, &b_token).await?;
    println!("pristine [{mode:?}]: {:?}", reference.0);
    ensure(reference.0[0].1 == "app_user" && reference.0[1].1 == "app_user", "the pristine backend is not app_user")?;
    if mode == Mode::Session {
        detector_self_test(env, &reference).await?;
    }
    let (mut runs, mut failures) = (0, Vec::new());
    for op in OPS {
        for &path in PATHS {
            for &leave in mode.leaves() {
                let Some(o) = scenario(env, mode, op, path, leave, &reference, &oids, &b_token).await else { continue };
                runs += 1;
                println!("  pristine {}", o.line);
                failures.extend(o.failure);
            }
        }
    }
    println!("pristine [{mode:?}]: {runs} scenarios, {} hand over a backend that is not pristine", failures.len());
    env.cluster.psql("app", TEARDOWN).map_err(|e| format!("teardown: {e}"))?;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} of {runs} scenarios:\n    {}", failures.len(), failures.join("\n    ")))
    }
}

/// Database code a plain `SELECT` or a plain write runs implicitly (views, operators, domain
/// checks, triggers) that leaves session state: transaction pooling trusts the schema owner's code
/// not to (docs/security.md, "Tenant-safe reuse of backend connections"), so these run in session
/// mode only. Sequence state left by a write (`insert_serial_default`) is still reset.
const TRUSTED_IMPLICIT: &[&str] = &[
    "view_calls_set_config",
    "view_takes_lock",
    "view_nextval",
    "table_command_view",
    "operator_calls_set_config",
    "domain_check_calls_set_config",
    "trigger_sets_config",
];

/// Operations that leave no session state behind on their own.
const STATELESS_OPS: &[&str] = &["fn_with_set_clause", "temp_table_on_commit_drop", "deallocate_named"];

/// The fingerprint has teeth: in session pooling (where the client keeps its backend), the client's
/// own fingerprint right after each operation differs from the pristine one.
async fn detector_self_test(env: &Env, reference: &Fingerprint) -> TestResult {
    let mut blind = Vec::new();
    for (name, sql, _, extra) in OPS {
        let p = try_start(env, "pool_size = 1", &format!("{extra}\n{}", Mode::Session.config()), "").await?;
        let mut a = Wire::connect(p.addr, &token(1, "alice-pristine")).await?;
        let r = a.simple(sql).await;
        let f = fingerprint(&mut a, true).await?;
        a.close().await;
        p.stop().await;
        let seen: Vec<String> = f.diff(reference).iter().map(|d| d.split(':').next().unwrap_or_default().to_string()).collect();
        println!("  detector: {name}: {} -> {}", r.code().map_or("ran".into(), |c| format!("refused {c}")), if seen.is_empty() { "no visible state".into() } else { seen.join(", ") });
        if seen.is_empty() != STATELESS_OPS.contains(name) {
            blind.push(format!("{name} ({})", r.summary()));
        }
    }
    ensure(blind.is_empty(), format!("the fingerprint does not see the state of: {}", blind.join("; ")))
}

pub async fn transaction_mode(env: &Env) -> TestResult {
    matrix(env, Mode::Transaction).await
}

pub async fn session_mode(env: &Env) -> TestResult {
    matrix(env, Mode::Session).await
}
