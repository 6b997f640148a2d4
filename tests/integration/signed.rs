//! The signed tenant context (issue 16) against a real Postgres, with `pgtenant install-sql` and the
//! signed-style fixture (tests/fixtures/rls-signed.sql) loaded once for this whole binary:
//! - a client connected straight to Postgres as the restricted role, with its password, that sets
//!   whatever it likes (tenant settings, contexts copied from other backends, altered payloads,
//!   malformed signatures) reads and writes nothing, while a context signed for its own backend is
//!   accepted (so the attempts are not vacuous);
//! - tenants through a signing pgtenant see exactly their rows (simple and extended protocol, and
//!   the real-client suites, which proxy.rs runs against the plain schema);
//! - key rotation under load: no client error, no foreign row;
//! - the doctor's signing checks report and clear;
//! - on a read replica (a `pg_basebackup -R` standby, the key installed on the primary only):
//!   read-only transactions routed there see their tenant's rows, and a direct connection to the
//!   standby with no context, a forged one or one signed for another backend sees none.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pgtenant::signing::{BackendId, Signer};
use serde_json::json;
use tokio_postgres::Client;

/// The key the schema is installed with (kid k1) and the proxies sign with.
const KEY: &str = "signed-test-key-0123456789abcdef-0123456789";
/// The key rotated to (kid k2).
const KEY2: &str = "rotated-test-key-fedcba9876543210-fedcba98";

fn main() {
    run_all(tests![
        install_sql_is_idempotent_and_keeps_the_keys_hidden,
        direct_connection_reads_and_writes_nothing,
        types_and_functions_of_its_own_change_nothing,
        verified_contexts_are_remembered_per_backend,
        a_backend_remembers_the_newest_contexts,
        a_context_with_a_separator_is_checked_in_full_each_time,
        tenants_see_their_rows_through_a_signing_proxy,
        python_clients_signed,
        node_clients_signed,
        pgjdbc_client_signed,
        key_rotation_under_load,
        doctor_signing_findings_appear_and_clear,
        signed_context_on_a_read_replica,
    ]);
}

fn e(err: impl std::fmt::Debug) -> String {
    format!("{err:?}")
}

/// Config text of a proxy signing with `key` as `kid`.
fn signing_config(env: &Env, backend_extra: &str, kid: &str, key: &str) -> String {
    config_text(env, backend_extra, &format!("signing_key = \"{key}\"\nsigning_kid = \"{kid}\""))
}

/// `pgtenant install-sql` for `config_text`, run through the binary.
fn install_sql(config_text: &str) -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(e)?;
    let file = dir.path().join("pgtenant.toml");
    std::fs::write(&file, config_text).map_err(e)?;
    let out = Command::new(env!("CARGO_BIN_EXE_pgtenant")).args(["install-sql", "--config"]).arg(&file).output().map_err(e)?;
    ensure(out.status.success(), format!("install-sql: {}", String::from_utf8_lossy(&out.stderr)))?;
    String::from_utf8(out.stdout).map_err(e)
}

/// Installs the signed context with KEY as k1 and the signed policies, once per test binary.
fn signed_schema(env: &Env) -> TestResult {
    static DONE: AtomicBool = AtomicBool::new(false);
    if !DONE.load(Ordering::Acquire) {
        let sql = install_sql(&signing_config(env, "", "k1", KEY))?;
        env.cluster.load_signed_rls_fixture(&sql).map_err(|err| err.to_string())?;
        DONE.store(true, Ordering::Release);
    }
    Ok(())
}

fn superuser(env: &Env, sql: &str) -> Result<String, String> {
    env.cluster.psql("app", sql).map_err(|err| err.to_string())
}

/// A connection straight to Postgres as the restricted role, with its password.
async fn direct(env: &Env) -> Result<Client, String> {
    let (c, conn) = tokio_postgres::connect(&env.cluster.url("app_user", "app-secret", "app"), tokio_postgres::NoTls).await.map_err(e)?;
    tokio::spawn(conn);
    Ok(c)
}

/// The backend `c` runs on, as pgtenant names it in a payload.
async fn backend_of(c: &Client) -> Result<BackendId, String> {
    let row = c
        .query_one(
            "SELECT pg_backend_pid(), extract(epoch from backend_start)::text FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid())",
            &[],
        )
        .await
        .map_err(e)?;
    Ok(BackendId { pid: row.get(0), started: row.get(1) })
}

/// The settings pgtenant would sign for `tenant`.
fn tenant_settings(tenant: i64) -> Vec<(String, String)> {
    let claims = json!({ "tenant_id": tenant, "sub": "mallory", "exp": now() + 3600 }).to_string();
    vec![
        ("app.tenant_id".into(), tenant.to_string()),
        ("app.user_id".into(), "mallory".into()),
        ("request.jwt.claims".into(), claims),
    ]
}

/// (payload, signature) as pgtenant would send them for `tenant` on `backend`.
fn signed(kid: &str, key: &str, tenant: i64, backend: &BackendId) -> (String, String) {
    Signer::new(kid, key.as_bytes()).signed(&tenant_settings(tenant), now(), backend)
}

/// What one transaction of a direct connection sees and may write.
#[derive(Debug, PartialEq, Default)]
struct Seen {
    /// Rows of orders, users, tenants.
    rows: (i64, i64, i64),
    /// `pgtenant.setting('app.tenant_id')` and `pgtenant.claims() ->> 'tenant_id'`.
    verified: (Option<String>, Option<String>),
    /// Tenants it could insert an order for.
    inserted: Vec<i32>,
    /// Rows an UPDATE of every order and a DELETE of every user reached.
    changed: (u64, u64),
}

const NOTHING: Seen = Seen { rows: (0, 0, 0), verified: (None, None), inserted: Vec::new(), changed: (0, 0) };

/// Runs one transaction on `c` after `settings` (set with `set_config(name, value, local)`), and
/// rolls it back. Any error other than an RLS refusal of an insert fails the attempt: a malformed
/// context must read as unsigned, never raise an error.
async fn attempt(c: &Client, settings: &[(&str, &str)], local: bool) -> Result<Seen, String> {
    let result = async {
        if local {
            c.batch_execute("BEGIN").await.map_err(e)?;
        }
        for (name, value) in settings {
            c.query("SELECT set_config($1, $2, $3)", &[name, value, &local]).await.map_err(|err| format!("set_config {name}: {err:?}"))?;
        }
        if !local {
            c.batch_execute("BEGIN").await.map_err(e)?;
        }
        let row = c
            .query_one(
                "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM users), (SELECT count(*) FROM tenants), \
                 pgtenant.setting('app.tenant_id'), pgtenant.claims() ->> 'tenant_id'",
                &[],
            )
            .await
            .map_err(e)?;
        let mut seen = Seen { rows: (row.get(0), row.get(1), row.get(2)), verified: (row.get(3), row.get(4)), ..Seen::default() };
        for t in 1..=3i32 {
            c.batch_execute("SAVEPOINT ins").await.map_err(e)?;
            match c.execute("INSERT INTO orders (tenant_id, user_sub, amount) VALUES ($1, 'mallory', 1)", &[&t]).await {
                Ok(_) => seen.inserted.push(t),
                Err(err) if db_err(&err).0 == "42501" => {}
                Err(err) => return Err(format!("insert for tenant {t}: {err:?}")),
            }
            c.batch_execute("ROLLBACK TO SAVEPOINT ins").await.map_err(e)?;
        }
        seen.changed = (
            c.execute("UPDATE orders SET amount = amount + 1", &[]).await.map_err(e)?,
            c.execute("DELETE FROM users", &[]).await.map_err(e)?,
        );
        Ok(seen)
    }
    .await;
    c.batch_execute("ROLLBACK").await.map_err(e)?;
    if !local {
        c.batch_execute("RESET ALL").await.map_err(e)?;
    }
    result
}

/// Every setting an attacker would set, plus the given context and signature.
fn with_context<'a>(ctx: &'a str, sig: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("app.tenant_id", "2"),
        ("app.user_id", "mallory"),
        ("request.jwt.claims", r#"{"tenant_id": 2, "sub": "mallory"}"#),
        ("pgtenant.context", ctx),
        ("pgtenant.signature", sig),
    ]
}

async fn install_sql_is_idempotent_and_keeps_the_keys_hidden(env: &Env) -> TestResult {
    signed_schema(env)?;
    let sql = install_sql(&signing_config(env, "", "k1", KEY))?;
    ensure(sql.contains(&hex::encode(KEY)) && sql.contains("CONTAINS THE SIGNING KEY"), "install-sql output lacks the key or its warning")?;
    // again, and again with the fixture on top: nothing changes, nothing fails
    env.cluster.load_signed_rls_fixture(&sql).map_err(|err| err.to_string())?;
    let keys = superuser(env, "SELECT kid || ' ' || encode(key, 'escape') FROM pgtenant.keys ORDER BY kid")?;
    ensure(keys.trim() == format!("k1 {KEY}"), format!("keys after installing twice: {keys}"))?;
    // without a key it refuses, with a pointed message
    let out = Command::new(env!("CARGO_BIN_EXE_pgtenant")).args(["install-sql", "--config", "/nonexistent.toml"]).output().map_err(e)?;
    ensure(out.status.code() == Some(2), format!("install-sql without a config: {:?}", out.status.code()))?;
    let plain = install_sql(&config_text(env, "", "")).err().unwrap_or_default();
    ensure(plain.contains("signing is off"), format!("install-sql without signing_key: {plain}"))?;

    let c = direct(env).await?;
    for sql in [
        "SELECT * FROM pgtenant.keys",
        "INSERT INTO pgtenant.keys (kid, key) VALUES ('evil', convert_to(repeat('x', 40), 'UTF8'))",
        "UPDATE pgtenant.keys SET key = key",
        "CREATE FUNCTION pgtenant.setting2(text) RETURNS text LANGUAGE sql AS 'select 1'",
    ] {
        let err = c.batch_execute(sql).await.err().ok_or(format!("the restricted role ran: {sql}"))?;
        ensure(db_err(&err).0 == "42501", format!("{sql}: {:?}", db_err(&err)))?;
    }
    Ok(())
}

async fn direct_connection_reads_and_writes_nothing(env: &Env) -> TestResult {
    signed_schema(env)?;
    let attacker = direct(env).await?;
    let victim = direct(env).await?;
    let (a, b) = (backend_of(&attacker).await?, backend_of(&victim).await?);
    ensure(a.pid != b.pid, "two connections on one backend")?;

    // positive controls: a context signed for the backend it is used on is accepted
    let own = Seen { rows: (100, 1, 1), verified: (Some("2".into()), Some("2".into())), inserted: vec![2], changed: (100, 1) };
    let (vp, vs) = signed("k1", KEY, 2, &b);
    ensure(attempt(&victim, &with_context(&vp, &vs), true).await? == own, "the victim's own signed context is refused")?;
    let (ap, asig) = signed("k1", KEY, 2, &a);
    let seen = attempt(&attacker, &with_context(&ap, &asig), true).await?;
    ensure(seen == own, format!("a context signed for this backend is refused: {seen:?}"))?;
    let seen = attempt(&attacker, &with_context(&ap, &asig), false).await?;
    ensure(seen == own, format!("a signed context set at session level is refused: {seen:?}"))?;

    // what an attacker holding the role's password can set: each must see and write nothing
    let payload_t1 = Signer::new("k1", KEY.as_bytes()).payload(&tenant_settings(1), now(), &a);
    let parsed: serde_json::Value = serde_json::from_str(&ap).map_err(e)?;
    let reordered = format!(
        r#"{{"settings":{},"pid":{},"kid":"k1","iat":{},"bs":{}}}"#,
        parsed["settings"], parsed["pid"], parsed["iat"], parsed["bs"]
    );
    let duplicated = format!(r#"{},"settings":{{"app.tenant_id":"1"}}}}"#, &ap[..ap.len() - 1]);
    let (pid_reused, pid_reused_sig) = signed("k1", KEY, 2, &BackendId { pid: a.pid, started: b.started.clone() });
    let (other_pid, other_pid_sig) = signed("k1", KEY, 2, &BackendId { pid: b.pid, started: a.started.clone() });
    let (unknown_kid, unknown_kid_sig) = signed("k9", KEY, 2, &a);
    let (other_key, other_key_sig) = signed("k9", "another-key-0123456789abcdef-0123456789", 2, &a);
    let (wrong_key, wrong_key_sig) = signed("k1", "wrong-key-0123456789abcdef-0123456789abc", 2, &a);
    let pair = |ctx: &str, sig: &str| Some((ctx.to_string(), sig.to_string()));
    let attempts: Vec<(&str, Option<(String, String)>)> = vec![
        ("only the tenant settings", None),
        ("the context and signature of another backend (copied from its session)", pair(&vp, &vs)),
        ("this backend's pid with another backend's start (pid reuse), signed with the real key", pair(&pid_reused, &pid_reused_sig)),
        ("this backend's start with another pid, signed with the real key", pair(&other_pid, &other_pid_sig)),
        ("a payload with another tenant and an old signature", pair(&payload_t1, &asig)),
        ("the payload with extra whitespace", pair(&ap.replace(':', ": ").replace(',', ", "), &asig)),
        ("the payload pretty-printed", pair(&serde_json::to_string_pretty(&parsed).map_err(e)?, &asig)),
        ("the payload's keys in another order", pair(&reordered, &asig)),
        ("the payload with a duplicate settings key naming tenant 1", pair(&duplicated, &asig)),
        ("the payload with a trailing newline", pair(&format!("{ap}\n"), &asig)),
        ("the payload truncated", pair(&ap[..ap.len() - 1], &asig)),
        ("an unknown kid, signed with the real key", pair(&unknown_kid, &unknown_kid_sig)),
        ("an unknown kid and key", pair(&other_key, &other_key_sig)),
        ("kid k1 signed with another key", pair(&wrong_key, &wrong_key_sig)),
        ("the signature in uppercase hex", pair(&ap, &asig.to_uppercase())),
        ("the signature truncated", pair(&ap, &asig[..63])),
        ("the signature with two more digits", pair(&ap, &format!("{asig}00"))),
        ("the signature as a bytea literal", pair(&ap, &format!("\\x{}", &asig[..62]))),
        ("a signature that is not hex", pair(&ap, &"zz".repeat(32))),
        ("an empty signature", pair(&ap, "")),
        ("a context that is not JSON", pair("{\"bs\": oops", &"00".repeat(32))),
        ("an empty context", pair("", &asig)),
    ];
    for local in [true, false] {
        for (what, context) in &attempts {
            let settings = match context {
                Some((ctx, sig)) => with_context(ctx, sig),
                None => with_context("", "")[..3].to_vec(),
            };
            let seen = attempt(&attacker, &settings, local).await.map_err(|err| format!("{what}: {err}"))?;
            ensure(seen == NOTHING, format!("{what} (local: {local}): {seen:?}"))?;
        }
    }

    // its own key table in pg_temp and a search_path that prefers it: the functions do not look
    attacker
        .batch_execute(
            "CREATE TEMP TABLE keys (kid text, key bytea, added_at timestamptz); \
             INSERT INTO pg_temp.keys VALUES ('k1', convert_to('attacker-key-0123456789abcdef-0123456789', 'UTF8'), now())",
        )
        .await
        .map_err(e)?;
    let (fp, fs) = signed("k1", "attacker-key-0123456789abcdef-0123456789", 2, &a);
    let mut settings = with_context(&fp, &fs);
    settings.push(("search_path", "pg_temp, pgtenant, public"));
    let seen = attempt(&attacker, &settings, true).await?;
    ensure(seen == NOTHING, format!("a key of its own in pg_temp: {seen:?}"))?;
    // and the real context still works on this connection afterwards
    ensure(attempt(&attacker, &with_context(&ap, &asig), true).await? == own, "signed context refused after the attempts")?;
    Ok(())
}

/// `pgtenant.setting()` has no `SET search_path` (it would cost as much as its body): a caller that
/// puts types, domains, functions and operators of its own first in its `search_path`, under the
/// names the body uses, must still get nothing from a forged context, the real one must still work,
/// and none of its own runs as the function's owner.
async fn types_and_functions_of_its_own_change_nothing(env: &Env) -> TestResult {
    signed_schema(env)?;
    let attacker = direct(env).await?;
    let a = backend_of(&attacker).await?;
    let (ap, asig) = signed("k1", KEY, 2, &a);
    let own = attempt(&attacker, &with_context(&ap, &asig), true).await?;
    ensure(own.verified.0.as_deref() == Some("2"), format!("the real context is refused: {own:?}"))?;
    // pg_temp is the one schema the restricted role may create in; types there are found first
    attacker
        .batch_execute(
            "CREATE DOMAIN pg_temp.text AS pg_catalog.text; CREATE DOMAIN pg_temp.json AS pg_catalog.text; \
             CREATE DOMAIN pg_temp.jsonb AS pg_catalog.text; CREATE DOMAIN pg_temp.bytea AS pg_catalog.bytea; \
             CREATE FUNCTION pg_temp.strpos(text, text) RETURNS int LANGUAGE sql AS 'SELECT 0'; \
             CREATE FUNCTION pg_temp.split_part(text, text, int) RETURNS text LANGUAGE sql AS 'SELECT ''x'''; \
             CREATE FUNCTION pg_temp.octet_length(text) RETURNS int LANGUAGE sql AS 'SELECT 64'; \
             CREATE FUNCTION pg_temp.verify(text) RETURNS text LANGUAGE sql AS 'SELECT ''1'''; \
             CREATE FUNCTION pg_temp.json_extract_path_text(text, VARIADIC text[]) RETURNS text LANGUAGE sql AS 'SELECT ''1'''",
        )
        .await
        .map_err(e)?;
    let (forged, forged_sig) = signed("k1", "attacker-key-0123456789abcdef-0123456789", 1, &a);
    for path in ["pg_temp, pgtenant, pg_catalog, public", "pgtenant, pg_temp, public"] {
        forged_and_real_under(&attacker, path, (&forged, &forged_sig), (&ap, &asig), &own).await?;
    }
    // A schema of its own (what a database that still lets PUBLIC create in `public` gives every
    // role): operators there are found before pg_catalog's when the search_path lists it first, and
    // one that setting() ran would run as setting()'s owner (their types are spelled in full: the
    // pg_temp.text above would be found first otherwise). The traps raise when they run as
    // anyone but the session's user; a SECURITY DEFINER probe with an unqualified NULLIF (which
    // looks `=` up) shows they spring.
    superuser(
        env,
        "DROP SCHEMA IF EXISTS tenant_own CASCADE; CREATE SCHEMA tenant_own AUTHORIZATION app_user; \
         CREATE OR REPLACE FUNCTION public.trap_probe(v text) RETURNS text LANGUAGE plpgsql STABLE SECURITY DEFINER \
           AS $$BEGIN RETURN NULLIF(v, ''); END$$",
    )?;
    let mut traps = String::new();
    for (op, name, result, body) in [("=", "eq", "boolean", "a OPERATOR(pg_catalog.=) b"), ("<>", "ne", "boolean", "a OPERATOR(pg_catalog.<>) b"), ("||", "cat", "pg_catalog.text", "a OPERATOR(pg_catalog.||) b")] {
        traps.push_str(&format!(
            "CREATE FUNCTION tenant_own.{name}(a pg_catalog.text, b pg_catalog.text) RETURNS {result} LANGUAGE plpgsql AS $$BEGIN \
               IF current_user OPERATOR(pg_catalog.<>) session_user THEN RAISE EXCEPTION 'a caller''s operator ran as %', current_user; END IF; \
               RETURN {body}; END$$; \
             CREATE OPERATOR tenant_own.{op} (LEFTARG = pg_catalog.text, RIGHTARG = pg_catalog.text, FUNCTION = tenant_own.{name});"
        ));
    }
    attacker.batch_execute(&traps).await.map_err(e)?;
    let path = "tenant_own, pg_catalog, pgtenant, public";
    let result = async {
        attacker.batch_execute(&format!("SET search_path = {path}")).await.map_err(e)?;
        let probe = attacker.query_one("SELECT public.trap_probe('x')", &[]).await;
        ensure(probe.as_ref().is_err_and(|er| db_err(er).1.contains("a caller's operator ran as")), format!("the trap did not spring: {probe:?}"))?;
        forged_and_real_under(&attacker, path, (&forged, &forged_sig), (&ap, &asig), &own).await.map_err(|m| format!("operators of its own: {m}"))
    }
    .await;
    superuser(env, "DROP SCHEMA tenant_own CASCADE; DROP FUNCTION public.trap_probe(text)")?;
    result
}

/// With `path` as its `search_path`, a forged context (payload, signature) sees nothing and the real
/// one sees what it saw before (`own`).
async fn forged_and_real_under(c: &Client, path: &str, forged: (&str, &str), real: (&str, &str), own: &Seen) -> TestResult {
    for ((ctx, sig), want, which) in [(forged, &NOTHING, "a forged context"), (real, own, "the real context")] {
        let mut settings = with_context(ctx, sig);
        settings.push(("search_path", path));
        let seen = attempt(c, &settings, true).await?;
        ensure(seen == *want, format!("search_path {path}, {which}: {seen:?}"))?;
    }
    Ok(())
}

/// One transaction on `c` with `ctx` and `sig` as its context: what `pgtenant.setting('app.tenant_id')` says.
async fn read_setting(c: &Client, ctx: &str, sig: &str) -> Result<Option<String>, String> {
    read_named(c, ctx, sig, "app.tenant_id").await
}

/// `pgtenant.setting(name)` in a transaction carrying context `ctx` and signature `sig`.
async fn read_named(c: &Client, ctx: &str, sig: &str, name: &str) -> Result<Option<String>, String> {
    c.batch_execute("BEGIN").await.map_err(e)?;
    c.query("SELECT set_config('pgtenant.context', $1, true), set_config('pgtenant.signature', $2, true)", &[&ctx, &sig])
        .await
        .map_err(e)?;
    let v: Option<String> = c.query_one("SELECT pgtenant.setting($1)", &[&name]).await.map_err(e)?.get(0);
    c.batch_execute("COMMIT").await.map_err(e)?;
    Ok(v)
}

/// Runs `body` (which opens its own connections) with `track_functions` on for the restricted role,
/// then checks the calls of `pgtenant.setting` and `pgtenant.verify` it made: `expected` is
/// "setting=N verify=M", `why` says where the numbers come from.
async fn with_counted_calls<F: std::future::Future<Output = TestResult>>(env: &Env, expected: &str, why: &str, body: F) -> TestResult {
    superuser(env, "ALTER ROLE app_user SET track_functions = 'pl'")?;
    let result = async {
        superuser(
            env,
            "SELECT pg_stat_reset_single_function_counters('pgtenant.verify(text)'::regprocedure), \
             pg_stat_reset_single_function_counters('pgtenant.setting(text)'::regprocedure)",
        )?;
        body.await
    }
    .await;
    // a backend reports its function counts when idle for a second, or when it exits
    let mut counts = String::new();
    if result.is_ok() {
        for _ in 0..50 {
            counts = superuser(
                env,
                "SELECT string_agg(funcname || '=' || calls, ' ' ORDER BY funcname) FROM pg_stat_user_functions \
                 WHERE schemaname = 'pgtenant' AND funcname IN ('setting', 'verify')",
            )?;
            if counts.trim() == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    superuser(env, "ALTER ROLE app_user RESET track_functions")?;
    result?;
    ensure(counts.trim() == expected, format!("expected {expected} ({why}), got {counts:?}"))
}

/// The database remembers a context it verified on a backend (`session_preload_libraries`), so the
/// full check runs once per (context, backend): counted with `track_functions`. The role can neither
/// read nor write that memory, and a remembered context is found by its signature, so that a caller
/// reads only the settings of a context whose whole signature it presents: a payload alone, part of
/// a signature, or a splice across two remembered entries that does not end in a whole signature
/// reads nothing.
async fn verified_contexts_are_remembered_per_backend(env: &Env) -> TestResult {
    signed_schema(env)?;
    let why = "tenant 2 once, tenant 3 once, then each malformed or unknown signature";
    with_counted_calls(env, "setting=15 verify=7", why, async {
        let c = direct(env).await?;
        let b = backend_of(&c).await?;
        for sql in [
            "SHOW session_preload_libraries",
            "SET session_preload_libraries = 'pgtenant:1:2|00000000000000000000000000000000'",
            "SELECT set_config('session_preload_libraries', 'x', false)",
            "ALTER ROLE app_user SET session_preload_libraries = 'x'",
        ] {
            let err = c.batch_execute(sql).await.err().ok_or(format!("the restricted role ran: {sql}"))?;
            ensure(db_err(&err).0 == "42501", format!("{sql}: {:?}", db_err(&err)))?;
        }
        let (p, sig) = signed("k1", KEY, 2, &b);
        let (other, other_sig) = signed("k1", KEY, 3, &b);
        for _ in 0..5 {
            ensure(read_setting(&c, &p, &sig).await? == Some("2".into()), "tenant 2's context")?;
        }
        // tenant 3's context: checked in full once, then remembered too
        ensure(read_setting(&c, &other, &other_sig).await? == Some("3".into()), "tenant 3's context")?;
        ensure(read_setting(&c, &other, &other_sig).await? == Some("3".into()), "tenant 3's context again")?;
        // the signature names the context: tenant 3's reads tenant 3's settings whatever the payload
        // says, and tenant 2's payload with a signature this backend never verified reads nothing
        ensure(read_setting(&c, &p, &other_sig).await? == Some("3".into()), "tenant 2's payload with tenant 3's signature")?;
        let mut tampered = sig.clone().into_bytes();
        tampered[63] = if tampered[63] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(tampered).map_err(e)?;
        ensure(read_setting(&c, &p, &tampered).await?.is_none(), "tenant 2's payload with one digit of its signature changed")?;
        ensure(read_setting(&c, &p, &sig).await? == Some("2".into()), "tenant 2's context after the others")?;
        // The record holds, newest first, per context "\x02" and "\x01<signature><name>\x04<value>\x03"
        // per setting (in jsonb's key order: shorter names first): tenant 3's entries, then tenant
        // 2's. A signature that spans tenant 3's last entry and ends in tenant 2's whole signature
        // reads tenant 2's settings (it took knowing both); ending in part of it reads nothing.
        let value = |ctx: &str, name: &str| -> Result<String, String> {
            let v: serde_json::Value = serde_json::from_str(ctx).map_err(e)?;
            Ok(v["settings"][name].as_str().ok_or(format!("no {name} in {ctx}"))?.to_string())
        };
        let last3 = format!("{other_sig}request.jwt.claims\u{4}{}\u{3}\u{2}", value(&other, "request.jwt.claims")?);
        let first2 = format!("\u{1}{sig}app.user_id\u{4}{}\u{3}", value(&p, "app.user_id")?);
        let whole = format!("{last3}{first2}\u{1}{sig}");
        ensure(read_setting(&c, &other, &whole).await? == Some("2".into()), "a splice ending in tenant 2's whole signature")?;
        let part = format!("{last3}{first2}\u{1}{}", &sig[..63]);
        ensure(read_setting(&c, &other, &part).await?.is_none(), "a splice ending in part of tenant 2's signature")?;
        // the formats before this one ("\x01<context>\x02<signature>\x01", then
        // "\x01<signature>\x03" and "\x03<name>\x04<value>" per setting) find nothing either
        let old_format = format!("{other_sig}\u{1}{p}\u{2}{sig}");
        ensure(read_setting(&c, &other, &old_format).await?.is_none(), "a signature spliced the first way")?;
        let second_format = format!("{other_sig}\u{3}\u{3}app.user_id\u{4}{}\u{3}\u{1}{sig}\u{3}", value(&other, "app.user_id")?);
        ensure(read_setting(&c, &other, &second_format).await?.is_none(), "a signature spliced the second way")?;
        ensure(read_setting(&c, &p, &sig[..63]).await?.is_none(), "part of a remembered signature")?;
        Ok(())
    })
    .await
}

/// A setting whose value holds one of the record's separators (`\x01` to `\x04`) is never
/// remembered, so it cannot be read as a splice of the record, and neither is an empty one (the fast
/// path reads "not found" as empty): each read of it checks in full, and still reads it. The
/// context's other settings are remembered as usual.
async fn a_context_with_a_separator_is_checked_in_full_each_time(env: &Env) -> TestResult {
    signed_schema(env)?;
    let why = "per context: three reads of the odd setting, each checked in full (the first remembers the \
               others), then three reads of the tenant from memory";
    with_counted_calls(env, "setting=18 verify=9", why, async {
        let c = direct(env).await?;
        let b = backend_of(&c).await?;
        for odd in ["mal\u{3}lory", "mal\u{2}lory", ""] {
            let mut settings = tenant_settings(2);
            settings[1].1 = odd.into();
            let (ctx, sig) = Signer::new("k1", KEY.as_bytes()).signed(&settings, now(), &b);
            for round in 0..3 {
                let got = read_named(&c, &ctx, &sig, "app.user_id").await?;
                ensure(got.as_deref() == Some(odd), format!("{odd:?} read back as {got:?}, #{round}"))?;
            }
            for round in 0..3 {
                ensure(read_setting(&c, &ctx, &sig).await? == Some("2".into()), format!("the tenant beside {odd:?}, #{round}"))?;
            }
        }
        Ok(())
    })
    .await
}

/// A backend remembers the newest `install_sql::REMEMBERED` contexts, each once: one more pushes the
/// oldest out, which is then checked in full again, while the rest still read from memory.
async fn a_backend_remembers_the_newest_contexts(env: &Env) -> TestResult {
    signed_schema(env)?;
    let n = pgtenant::install_sql::REMEMBERED;
    let expected = format!("setting={} verify={}", (n + 1) + 1 + n, (n + 1) + 1);
    let why = "each context once, the oldest again after it was pushed out, the newest from memory";
    with_counted_calls(env, &expected, why, async {
        let c = direct(env).await?;
        let b = backend_of(&c).await?;
        // n + 1 contexts that differ in when they were issued, for tenants 1, 2, 3 in turn
        let contexts: Vec<(i64, (String, String))> = (0..=n as i64)
            .map(|i| (1 + i % 3, Signer::new("k1", KEY.as_bytes()).signed(&tenant_settings(1 + i % 3), 1_700_000_000 + i, &b)))
            .collect();
        for (tenant, (ctx, sig)) in &contexts {
            ensure(read_setting(&c, ctx, sig).await? == Some(tenant.to_string()), format!("tenant {tenant}'s context"))?;
        }
        // the oldest was pushed out: checked in full, and remembered again (pushing out the second)
        let (tenant, (ctx, sig)) = &contexts[0];
        ensure(read_setting(&c, ctx, sig).await? == Some(tenant.to_string()), "the oldest context again")?;
        // the n newest are all remembered
        for (tenant, (ctx, sig)) in contexts.iter().skip(2).chain(std::iter::once(&contexts[0])) {
            ensure(read_setting(&c, ctx, sig).await? == Some(tenant.to_string()), format!("tenant {tenant}'s context again"))?;
        }
        Ok(())
    })
    .await
}

async fn tenants_see_their_rows_through_a_signing_proxy(env: &Env) -> TestResult {
    signed_schema(env)?;
    let cfg = |text: String| pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|err| err.to_string());
    let p = pgtenant::server::start(cfg(signing_config(env, "", "k1", KEY))?).await?;
    for t in [1i32, 2, 3] {
        let c = connect(&p, &token(t as i64, "signed")).await.map_err(e)?;
        let (n, lo, hi) = tenant_view(&c).await?;
        ensure(n == 100 && lo == t && hi == t, format!("simple protocol: tenant {t} saw {n} rows of tenants {lo}..{hi}"))?;
        for _ in 0..5 {
            let rows = c
                .query("select tenant_id, pgtenant.setting('app.tenant_id'), pgtenant.claims() ->> 'sub' from orders where tenant_id > $1", &[&0i32])
                .await
                .map_err(e)?;
            ensure(rows.len() == 100, format!("extended protocol: tenant {t} saw {} rows", rows.len()))?;
            for r in &rows {
                let (tid, setting, sub): (i32, String, String) = (r.get(0), r.get(1), r.get(2));
                ensure(tid == t && setting == t.to_string() && sub == "signed", format!("tenant {t} got ({tid}, {setting}, {sub})"))?;
            }
        }
        let sub: String = c
            .query_one("insert into orders (tenant_id, amount) values ($1, 1) returning user_sub", &[&t])
            .await
            .map_err(e)?
            .get(0);
        ensure(sub == "signed", format!("user_sub default from the signed app.user_id: {sub}"))?;
        c.execute("delete from orders where user_sub = 'signed'", &[]).await.map_err(e)?;
        let foreign = c.execute("insert into orders (tenant_id, amount) values ($1, 1)", &[&(t % 3 + 1)]).await;
        ensure(foreign.as_ref().err().map(|err| db_err(err).0).as_deref() == Some("42501"), format!("tenant {t} inserted into another tenant: {foreign:?}"))?;
    }
    p.stop().await;

    // a pgtenant that does not sign, or signs with a kid the database does not know, reads nothing
    for (what, text) in [("no signing key", config_text(env, "", "")), ("kid k7, not installed", signing_config(env, "", "k7", KEY))] {
        let p = pgtenant::server::start(cfg(text)?).await?;
        let c = connect(&p, &token(1, "x")).await.map_err(e)?;
        let seen = tenant_view(&c).await?;
        p.stop().await;
        ensure(seen == (0, 0, 0), format!("{what}: saw {seen:?}"))?;
    }
    Ok(())
}

// ---- the real-client suites, against the signed schema and a signing proxy --------------------


/// As proxy.rs's `client_suite`, with a proxy that signs.
async fn client_suite(env: &Env, what: &str, mut cmd: Command) -> TestResult {
    signed_schema(env)?;
    let cfg = pgtenant::config::Config::from_toml(&signing_config(env, "pool_size = 4", "k1", KEY), &|_| None).map_err(e)?;
    let p = pgtenant::server::start(cfg).await?;
    cmd.args([p.addr.port().to_string(), token(1, what), token(2, what)]);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.map_err(e)?.map_err(e)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        println!("    {line}");
    }
    p.stop().await;
    ensure(out.status.success(), format!("{what} failed:\n{stdout}{}", String::from_utf8_lossy(&out.stderr)))
}

async fn python_clients_signed(env: &Env) -> TestResult {
    let cmd = python_client("python_clients.py")?;
    client_suite(env, "python clients", cmd).await
}

async fn node_clients_signed(env: &Env) -> TestResult {
    let cmd = node_client("node_clients.mjs")?;
    client_suite(env, "node clients", cmd).await
}

async fn pgjdbc_client_signed(env: &Env) -> TestResult {
    let cmd = java_client("PgjdbcClient.java")?;
    client_suite(env, "pgjdbc", cmd).await
}

// ---- rotation ----------------------------------------------------------------------------------

/// Clients of three tenants query without pause (long-lived sessions, and new sessions) while the
/// database gets kid k2, pgtenant reloads to sign with it, and k1 is deleted.
async fn key_rotation_under_load(env: &Env) -> TestResult {
    signed_schema(env)?;
    let result = rotate(env).await;
    // put k1 back for the tests after this one, whatever happened
    let sql = install_sql(&signing_config(env, "", "k1", KEY))?;
    env.cluster.psql_stdin("app", &sql).map_err(|err| err.to_string())?;
    superuser(env, "DELETE FROM pgtenant.keys WHERE kid <> 'k1'")?;
    result
}

async fn rotate(env: &Env) -> TestResult {
    let dir = tempfile::tempdir().map_err(e)?;
    let file = dir.path().join("pgtenant.toml");
    let (k1_text, k2_text) = (signing_config(env, "pool_size = 4", "k1", KEY), signing_config(env, "pool_size = 4", "k2", KEY2));
    std::fs::write(&file, &k1_text).map_err(e)?;
    let cfg = pgtenant::config::Config::load(&file).map_err(e)?;
    let p = Arc::new(pgtenant::server::start_from(cfg, Some(file.clone())).await?);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for i in 0..8i64 {
        let t = 1 + i % 3;
        // six long-lived sessions (logged in before the reload), two that log in for every query
        let fresh = i >= 6;
        let (stop, done, p) = (stop.clone(), done.clone(), p.clone());
        let mut c = Some(connect(&p, &token(t, "rot")).await.map_err(e)?);
        load.push(tokio::spawn(async move {
            let mut queries = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if fresh {
                    c = Some(connect(&p, &token(t, "rot")).await.map_err(|err| format!("tenant {t}: login: {err:?}"))?);
                }
                let client = c.as_ref().ok_or("no client")?;
                let (n, lo, hi) = tenant_view(client).await.map_err(|err| format!("tenant {t}: {err}"))?;
                if (n, lo as i64, hi as i64) != (100, t, t) {
                    return Err(format!("tenant {t} (fresh sessions: {fresh}) saw {n} rows of tenants {lo}..{hi} after {queries} queries"));
                }
                queries += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<u64, String>(queries)
        }));
    }
    let progress = |what: &'static str| {
        let done = done.clone();
        async move {
            let before = done.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(400)).await;
            let after = done.load(Ordering::Relaxed);
            if after > before { Ok(()) } else { Err(format!("no query completed {what}")) }
        }
    };
    let steps = async {
        progress("before the rotation").await?;
        let sql = install_sql(&k2_text)?;
        env.cluster.psql_stdin("app", &sql).map_err(|err| err.to_string())?;
        progress("after installing k2").await?;
        std::fs::write(&file, &k2_text).map_err(e)?;
        p.proxy.reload_from_file().await?;
        progress("after the reload").await?;
        superuser(env, "DELETE FROM pgtenant.keys WHERE kid = 'k1'")?;
        progress("after deleting k1").await?;
        progress("after deleting k1 (later)").await
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for task in load {
        match task.await.map_err(e)? {
            Ok(0) => errors.push("a client made no progress".to_string()),
            Ok(_) => {}
            Err(err) => errors.push(err),
        }
    }
    if let Ok(p) = Arc::try_unwrap(p) {
        p.stop().await;
    }
    if let Err(err) = steps {
        errors.insert(0, err);
    }
    ensure(errors.is_empty(), errors.join("; "))?;
    let keys = superuser(env, "SELECT string_agg(kid, ',' ORDER BY kid) FROM pgtenant.keys")?;
    ensure(keys.trim() == "k2", format!("keys after the rotation: {keys}"))
}

// ---- doctor ------------------------------------------------------------------------------------

fn checks(findings: &[pgtenant::doctor::Finding]) -> std::collections::BTreeSet<String> {
    findings.iter().map(|f| format!("{}:{}", f.check, f.object)).collect()
}

/// The fixture's findings that have nothing to do with signing (as in proxy.rs).
const FIXTURE_FINDINGS: [&str; 8] = [
    "advisory_locks:advisory lock functions",
    "database_temp:current database",
    "query_text_visible:pg_catalog.pg_stat_activity",
    "query_text_visible:pg_catalog.pg_stat_get_activity(integer)",
    "query_text_visible:pg_catalog.pg_stat_get_backend_activity(integer)",
    "setting_unused:app.user_id",
    "signal_functions:pg_catalog.pg_cancel_backend(integer)",
    "signal_functions:pg_catalog.pg_terminate_backend(integer, bigint)",
];

async fn doctor_signing_findings_appear_and_clear(env: &Env) -> TestResult {
    signed_schema(env)?;
    let result = doctor_steps(env).await;
    let _ = superuser(
        env,
        "DROP POLICY IF EXISTS legacy ON users; REVOKE ALL ON pgtenant.keys FROM PUBLIC, app_user; DELETE FROM pgtenant.keys WHERE kid <> 'k1'; \
         REVOKE pg_read_all_settings FROM app_user; REVOKE SET ON PARAMETER session_preload_libraries FROM app_user",
    );
    let sql = install_sql(&signing_config(env, "", "k1", KEY))?;
    env.cluster.load_signed_rls_fixture(&sql).map_err(|err| err.to_string())?;
    result
}

async fn doctor_steps(env: &Env) -> TestResult {
    let base = signing_config(env, "", "k1", KEY);
    let doctor = |text: String| async move {
        let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|err| err.to_string())?;
        pgtenant::doctor::run(&cfg, None).await
    };
    let fixture: std::collections::BTreeSet<String> = FIXTURE_FINDINGS.iter().map(|s| s.to_string()).collect();
    // the signed schema as installed: only the fixture's other findings (the verifying functions
    // are SECURITY DEFINER by design and vouched for)
    let found = checks(&doctor(base.clone()).await?);
    ensure(found == fixture, format!("signed fixture: {:?}", found.symmetric_difference(&fixture).collect::<Vec<_>>()))?;
    // without a signing key, the same schema: every signed policy matches no row through pgtenant
    let found = checks(&doctor(config_text(env, "", "")).await?);
    for t in ["tenants", "users", "orders"] {
        let f = format!("policy_needs_signing:public.{t} policy tenant_isolation");
        ensure(found.contains(&f), format!("missing {f}: {found:?}"))?;
    }
    ensure(found.len() == fixture.len() + 3, format!("without signing: {found:?}"))?;

    // (a) a policy reading the tenant with current_setting: a direct connection passes it
    superuser(env, "CREATE POLICY legacy ON users USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::integer)")?;
    let attacker = direct(env).await?;
    let leak = attempt(&attacker, &with_context("", "")[..3], true).await?;
    ensure(leak.rows.1 == 1, format!("the current_setting policy should let a direct connection read: {leak:?}"))?;
    let findings = doctor(base.clone()).await?;
    let f = findings
        .iter()
        .find(|f| f.check == "policy_reads_unsigned_setting" && f.object == "public.users policy legacy")
        .ok_or(format!("no policy_reads_unsigned_setting: {:?}", checks(&findings)))?;
    ensure(findings.iter().filter(|f| f.check == "policy_reads_unsigned_setting").count() == 1, format!("{:?}", checks(&findings)))?;
    let fix = f.fix.clone().ok_or("no fix for the current_setting policy")?;
    superuser(env, &fix)?;
    let found = checks(&doctor(base.clone()).await?);
    ensure(!found.iter().any(|f| f.starts_with("policy_reads_unsigned_setting")), format!("after the fix {fix}: {found:?}"))?;
    ensure(attempt(&attacker, &with_context("", "")[..3], true).await? == NOTHING, format!("the fixed policy still leaks: {fix}"))?;
    superuser(env, "DROP POLICY legacy ON users")?;

    // (b) the database does not hold the configured key
    let wrong_key = signing_config(env, "", "k1", "a-different-key-0123456789abcdef-012345");
    let unknown_kid = signing_config(env, "", "k7", KEY2);
    for text in [&wrong_key, &unknown_kid] {
        let found = checks(&doctor(text.clone()).await?);
        ensure(found.contains("signing_key_mismatch:pgtenant.keys") && found.len() == fixture.len() + 1, format!("key mismatch: {found:?}"))?;
    }
    env.cluster.psql_stdin("app", &install_sql(&unknown_kid)?).map_err(|err| err.to_string())?;
    let found = checks(&doctor(unknown_kid.clone()).await?);
    ensure(found == fixture, format!("after installing k7: {found:?}"))?;
    superuser(env, "DELETE FROM pgtenant.keys WHERE kid = 'k7'")?;

    // (c) the restricted role can read the keys (table-wide through PUBLIC, or one column), or
    // (c2) read the record of verified contexts (other sessions' contexts with their signatures),
    // or set it
    for (check, grant) in [
        ("signing_keys_readable", "GRANT SELECT ON pgtenant.keys TO PUBLIC"),
        ("signing_keys_readable", "GRANT SELECT (key) ON pgtenant.keys TO app_user"),
        ("signing_keys_readable", "GRANT INSERT ON pgtenant.keys TO app_user"),
        ("signing_record_exposed", "GRANT pg_read_all_settings TO app_user"),
        ("signing_record_exposed", "GRANT SET ON PARAMETER session_preload_libraries TO app_user"),
    ] {
        superuser(env, grant)?;
        let findings = doctor(base.clone()).await?;
        let f = findings.iter().find(|f| f.check == check).ok_or(format!("{grant}: no finding: {:?}", checks(&findings)))?;
        superuser(env, f.fix.as_deref().ok_or(format!("{grant}: no fix"))?)?;
        let found = checks(&doctor(base.clone()).await?);
        ensure(found == fixture, format!("{grant}, after {:?}: {found:?}", f.fix))?;
    }

    // (d) the functions: missing, not what install-sql writes, not executable by the role
    superuser(env, "DROP FUNCTION pgtenant.claims()")?;
    let found = checks(&doctor(base.clone()).await?);
    ensure(found.contains("signing_not_installed:pgtenant.claims()"), format!("claims() dropped: {found:?}"))?;
    superuser(
        env,
        "CREATE OR REPLACE FUNCTION pgtenant.setting(name text) RETURNS text LANGUAGE sql STABLE SECURITY DEFINER \
         SET search_path = pg_catalog, pg_temp AS $$ SELECT current_setting(name, true) $$",
    )?;
    let found = checks(&doctor(base.clone()).await?);
    for f in ["signing_not_installed:pgtenant.setting(text)", "security_definer_function:pgtenant.setting(text)"] {
        ensure(found.contains(f), format!("weakened setting(): missing {f}: {found:?}"))?;
    }
    env.cluster.psql_stdin("app", &install_sql(&base)?).map_err(|err| err.to_string())?;
    // (app_user is a member of tenant_reader, which the fixture lets run it too)
    superuser(env, "REVOKE EXECUTE ON FUNCTION pgtenant.setting(text) FROM app_user, tenant_reader")?;
    let findings = doctor(base.clone()).await?;
    let f = findings
        .iter()
        .find(|f| f.check == "signing_not_installed" && f.object == "pgtenant.setting(text)")
        .ok_or(format!("EXECUTE revoked: {:?}", checks(&findings)))?;
    superuser(env, f.fix.as_deref().ok_or("no fix for EXECUTE")?)?;
    let found = checks(&doctor(base.clone()).await?);
    ensure(found == fixture, format!("after re-installing and granting: {found:?}"))?;

    // the binary: --schema names where the functions are
    let dir = tempfile::tempdir().map_err(e)?;
    let file = dir.path().join("pgtenant.toml");
    std::fs::write(&file, &base).map_err(e)?;
    let out = Command::new(env!("CARGO_BIN_EXE_pgtenant"))
        .args(["doctor", "--json", "--schema", "elsewhere", "--config"])
        .arg(&file)
        .output()
        .map_err(e)?;
    let json = String::from_utf8_lossy(&out.stdout);
    ensure(out.status.code() == Some(1) && json.contains("elsewhere.setting(text)"), format!("doctor --schema elsewhere: {json}"))
}

// ---- a read replica ----------------------------------------------------------------------------

/// The key installed on the primary once the standby runs (kid k3): the standby has it, and the
/// functions, by replication only.
const KEY3: &str = "replica-test-key-00112233445566778899aabbccdd";

/// One read-only transaction of a direct connection after `settings` (transaction-local), rolled
/// back: (orders visible, `pgtenant.setting('app.tenant_id')`).
async fn read_view(c: &Client, settings: &[(String, String)]) -> Result<(i64, Option<String>), String> {
    c.batch_execute("BEGIN READ ONLY").await.map_err(e)?;
    let result = async {
        for (name, value) in settings {
            c.query("SELECT set_config($1, $2, true)", &[name, value]).await.map_err(|err| format!("set_config {name}: {err:?}"))?;
        }
        let row = c.query_one("SELECT count(*), pgtenant.setting('app.tenant_id') FROM orders", &[]).await.map_err(e)?;
        Ok::<_, String>((row.get(0), row.get(1)))
    }
    .await;
    c.batch_execute("ROLLBACK").await.map_err(e)?;
    result
}

/// One transaction of a client of the proxy, opened with `begin` (simple protocol): (on a standby,
/// `pgtenant.setting('app.tenant_id')`, orders, orders of other tenants than `tenant`).
async fn routed_view(c: &Client, begin: &str, tenant: i64) -> Result<(bool, Option<String>, i64, i64), String> {
    c.batch_execute(begin).await.map_err(e)?;
    let sql = format!(
        "SELECT pg_is_in_recovery()::text, pgtenant.setting('app.tenant_id'), count(*), count(*) FILTER (WHERE tenant_id <> {tenant}) FROM orders; COMMIT"
    );
    let msgs = c.simple_query(&sql).await.map_err(e)?;
    let row = first_row(&msgs)?;
    let num = |i: usize| row.get(i).and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1);
    Ok((row.get(0) == Some("true"), row.get(1).map(str::to_string), num(2), num(3)))
}

async fn signed_context_on_a_read_replica(env: &Env) -> TestResult {
    signed_schema(env)?;
    let standby = env.cluster.start_standby().map_err(|err| err.to_string())?;
    let replica = standby.url("app_user", "app-secret", "app");
    let text = config_text(
        env,
        &format!("replicas = [\"{replica}\"]\nmax_replica_lag_ms = 60000"),
        &format!("signing_key = \"{KEY3}\"\nsigning_kid = \"k3\""),
    );
    env.cluster.psql_stdin("app", &install_sql(&text)?).map_err(|err| err.to_string())?;
    let result = replica_steps(env, &standby, &text).await;
    superuser(env, "DELETE FROM pgtenant.keys WHERE kid = 'k3'")?;
    result
}

async fn replica_steps(env: &Env, standby: &pgtenant::cluster::Cluster, text: &str) -> TestResult {
    // the key, by replication
    catch_up(standby, &env.cluster)?;
    let keys = standby.psql("app", "SELECT count(*) FROM pgtenant.keys WHERE kid = 'k3'").map_err(|err| err.to_string())?;
    ensure(keys.trim() == "1", format!("the standby has {} keys k3 after catching up with the primary", keys.trim()))?;
    let cfg = pgtenant::config::Config::from_toml(text, &|_| None).map_err(|err| err.to_string())?;
    let p = pgtenant::server::start(cfg).await?;
    replicas_usable(&p).await?;
    let outcome = async {
        for t in 1..=3i64 {
            let mut c = connect(&p, &token(t, "replica")).await.map_err(e)?;
            let primary = routed_view(&c, "BEGIN", t).await?;
            ensure(primary == (false, Some(t.to_string()), 100, 0), format!("tenant {t} on the primary: {primary:?}"))?;
            // the first transaction verifies the context in full on the standby backend, the next
            // ones find it remembered there
            for round in 0..3 {
                for begin in ["BEGIN READ ONLY", "START TRANSACTION READ ONLY"] {
                    let got = routed_view(&c, begin, t).await?;
                    ensure(got == (true, Some(t.to_string()), 100, 0), format!("tenant {t}, {begin} #{round}: {got:?} (on a standby, setting, rows, foreign rows)"))?;
                }
            }
            // extended protocol, tokio-postgres's read-only transaction
            let tx = c.build_transaction().read_only(true).start().await.map_err(e)?;
            let row = tx
                .query_one("SELECT pg_is_in_recovery(), pgtenant.setting('app.tenant_id'), count(*) FROM orders WHERE tenant_id > $1", &[&0i32])
                .await
                .map_err(e)?;
            let got: (bool, Option<String>, i64) = (row.get(0), row.get(1), row.get(2));
            ensure(got == (true, Some(t.to_string()), 100), format!("tenant {t}, extended read-only transaction: {got:?}"))?;
            tx.commit().await.map_err(e)?;
        }
        Ok::<_, String>(())
    }
    .await;
    p.stop().await;
    outcome?;

    // straight to the standby as the restricted role: nothing without a context signed for it
    let (d, conn) = tokio_postgres::connect(&standby.url("app_user", "app-secret", "app"), tokio_postgres::NoTls).await.map_err(e)?;
    tokio::spawn(conn);
    let here = backend_of(&d).await?;
    let on_primary = backend_of(&direct(env).await?).await?;
    let (own_ctx, own_sig) = signed("k3", KEY3, 1, &here);
    let (primary_ctx, primary_sig) = signed("k3", KEY3, 1, &on_primary);
    let (stale_ctx, stale_sig) = signed("k3", KEY3, 1, &BackendId { pid: here.pid, started: "0".into() });
    let (other_key_ctx, other_key_sig) = signed("k3", KEY, 1, &here);
    let flipped = format!("{}{}", &own_sig[..63], if own_sig.ends_with('0') { '1' } else { '0' });
    let plain: Vec<(String, String)> = [("app.tenant_id", "1"), ("app.user_id", "mallory"), ("request.jwt.claims", r#"{"tenant_id": 1}"#)]
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .to_vec();
    let with = |ctx: &str, sig: &str| [plain.clone(), vec![("pgtenant.context".into(), ctx.into()), ("pgtenant.signature".into(), sig.into())]].concat();
    let forged = [
        ("no context at all", vec![]),
        ("the tenant settings, unsigned", plain.clone()),
        ("a context signed for a backend of the primary", with(&primary_ctx, &primary_sig)),
        ("a context signed for this pid with another start", with(&stale_ctx, &stale_sig)),
        ("a context signed with a key the database does not hold", with(&other_key_ctx, &other_key_sig)),
        ("this backend's context with its signature altered", with(&own_ctx, &flipped)),
    ];
    for (what, settings) in &forged {
        let seen = read_view(&d, settings).await?;
        ensure(seen == (0, None), format!("direct to the standby, {what}: {seen:?}"))?;
    }
    // the control: a context signed for this standby backend is accepted, in full and remembered
    for round in 0..2 {
        let seen = read_view(&d, &with(&own_ctx, &own_sig)).await?;
        ensure(seen == (100, Some("1".into())), format!("direct to the standby, its own signed context #{round}: {seen:?}"))?;
    }
    Ok(())
}
