//! `pgtenant install-sql`: the database side of the signed tenant context (see `crate::signing`).
//!
//! pgtenant signs a copy of each session's tenant settings for the backend it runs on; this module
//! writes the SQL that lets the database check that signature, so that policies can read the tenant
//! from something a client cannot forge, even one connected straight to Postgres with the restricted
//! role's password. It exists apart from `signing` because it is the other half of the contract:
//! `signing` writes the payload, the function here reads it. `doctor` also uses it to tell whether an
//! installed function is the one this pgtenant would install.
//!
//! The script is plain SQL for the database owner or a superuser, idempotent, in one transaction:
//! - the schema (`pgtenant` by default; the restricted role gets `USAGE` only);
//! - `pgcrypto` (installed where `CREATE EXTENSION` puts it if missing; an existing installation is
//!   used in whatever schema it lives, and called schema-qualified);
//! - `<schema>.keys (kid, key)`, which neither `PUBLIC` nor the restricted role may read, and an
//!   upsert of the configured key (a new kid is added next to the installed ones: rotation);
//! - `<schema>.setting(name)` and `<schema>.claims()`: `SECURITY DEFINER` (they read the keys),
//!   `SET search_path = pg_catalog, pg_temp`, `STABLE`, PL/pgSQL (its plans are cached for the
//!   session; an SQL function would be planned again in every query), executable by the
//!   restricted role and the roles of `tenant.allowed_roles` only.
//!
//! The script contains the key itself: it is meant to be piped into psql, never stored.

use crate::backend::BackendTarget;
use crate::config::Config;
use crate::signing::{CACHE_SETTING, CONTEXT_SETTING, SIGNATURE_SETTING};

/// The schema `install-sql` and `doctor` use unless told otherwise.
pub const DEFAULT_SCHEMA: &str = "pgtenant";

/// Placeholders in the function bodies.
const SCHEMA: &str = "@schema@";
const PGCRYPTO: &str = "@pgcrypto@";

/// Body of `<schema>.setting(name text)`: the fast path. A context this backend verified before is
/// remembered (see [`VERIFY_BODY`]) in `session_preload_libraries`, a setting only a superuser (or a
/// role granted `SET` on it) can change and only a superuser or `pg_read_all_settings` can read, so
/// the restricted role can neither add an entry of its own nor see the remembered ones. The record is
/// `pgtenant:<pid>:<start>`, then per remembered context, newest first, `\x02` and one entry per
/// setting, `\x01<signature><name>\x04<value>\x03`, then `\x02.`. The signature is the key: it is
/// an HMAC of the whole context, so whoever presents it presents that context, and the context
/// setting itself is not read here. One `split_part` finds `\x01<signature><name>\x04` and returns
/// what follows; the other cuts it at the entry's `\x03`. Not found is `''`, which goes to
/// `<schema>.verify` (so an empty value is never remembered: it is checked in full). No JSON is
/// parsed and nothing is hashed: each node of the expression is prepared again in every
/// transaction, so the fewer the cheaper (docs/benchmarks.md). Splicing: the separators occur in the
/// record only where the format puts them (a remembered name or value never holds `\x01` to `\x04`;
/// a signature is 64 hex digits, so it needs no separator before the name), and the search starts
/// at a `\x01` and ends at a `\x04`: a match, whatever the caller's signature and name hold, spells
/// in the caller's bytes every entry from the one it starts at to the one whose value it returns,
/// up to that entry's `\x04`, the full signature of that entry included. A caller only ever reads
/// the settings of a context whose signature it holds. The verifying call is a statement of its
/// own, not an argument of `COALESCE`, so that a hit does not even set it up (each call node costs
/// its setup and a permission check per transaction). It is `SECURITY
/// DEFINER` (to read that setting) but has no `SET search_path` clause, which costs a save and
/// restore of the settings on every call: instead every name in it is schema-qualified, operators
/// included (`NULLIF` or `CASE x WHEN` would look `=` up in the caller's `search_path`, and run a
/// caller's operator as the function's owner), so a caller's `search_path` cannot substitute an
/// operator, function or type of its own.
const SETTING_BODY: &str = r#"
DECLARE
  v pg_catalog.text := pg_catalog.split_part(pg_catalog.split_part(
      pg_catalog.current_setting('@cache@'),
      E'\x01' OPERATOR(pg_catalog.||) pg_catalog.current_setting('@signature@', true) OPERATOR(pg_catalog.||) name OPERATOR(pg_catalog.||) E'\x04', 2),
      E'\x03', 1);
BEGIN
  IF v OPERATOR(pg_catalog.<>) '' THEN
    RETURN v;
  END IF;
  RETURN @schema@.verify(name);
END
"#;

/// Body of `<schema>.verify(name text)`: the full check, `SECURITY DEFINER` (it reads the keys).
/// Every failure is NULL, never an error: a client must not learn from an error which part of a
/// forged context was wrong. The payload is parsed as JSON only once a key's HMAC matches, i.e. only
/// when pgtenant wrote it. `setting()` also comes here for a setting it did not find remembered:
/// one pgtenant does not set (pgtenant refuses a token that lacks a configured claim, so only a
/// policy reading such a setting pays that, on every call, and matches no row anyway), or one not
/// remembered because its value is empty or a name or value holds one of the record's separators
/// (`\x01` to `\x04`; the context's other settings are remembered). Its binding to this backend
/// (pid, and start against pid reuse) is looked up once per connection and remembered with the
/// verified contexts, the newest [`REMEMBERED`].
const VERIFY_BODY: &str = r#"
DECLARE
  ctx text := current_setting('@context@', true);
  sig text := current_setting('@signature@', true);
  seen text := current_setting('@cache@');
  msg bytea;
  given bytea;
  mac bytea;
  k record;
  p jsonb;
  bind text;
  entry text;
  entries text[];
BEGIN
  -- no context, or a signature that is not 64 lowercase hex digits: unsigned
  IF ctx IS NULL OR sig IS NULL OR length(sig) <> 64 OR sig !~ '^[0-9a-f]+$' THEN
    RETURN NULL;
  END IF;
  msg := convert_to(ctx, 'UTF8');
  given := decode(sig, 'hex');
  -- every installed key is tried (more than one only during a rotation)
  FOR k IN SELECT t.kid, t.key FROM @schema@.keys t LOOP
    mac := @pgcrypto@.hmac(msg, k.key, 'sha256'::text);
    -- compare HMACs of the two MACs: how long the comparison takes tells nothing about the MAC
    IF @pgcrypto@.hmac(mac, k.key, 'sha256'::text) = @pgcrypto@.hmac(given, k.key, 'sha256'::text) THEN
      p := ctx::jsonb;
      -- signed with this kid, for this backend: its pid, and its start against pid reuse
      IF p->>'kid' IS DISTINCT FROM k.kid OR p->>'pid' IS DISTINCT FROM pg_backend_pid()::text THEN
        RETURN NULL;
      END IF;
      bind := 'pgtenant:' || (p->>'pid') || ':' || (p->>'bs');
      IF split_part(seen, E'\x02', 1) IS DISTINCT FROM bind THEN
        IF p->>'bs' IS DISTINCT FROM (SELECT extract(epoch FROM a.backend_start)::text
                                         FROM pg_stat_get_activity(pg_backend_pid()) a) THEN
          RETURN NULL;
        END IF;
        seen := bind;
      END IF;
      -- remember it (see setting()): "\x01<signature><name>\x04<value>\x03" per setting, but
      -- for an empty value or a separator in a name or value
      SELECT string_agg(E'\x01' || sig || s.key || E'\x04' || s.value || E'\x03', '')
        INTO entry FROM jsonb_each_text(p->'settings') s
        WHERE s.value <> '' AND s.key !~ E'[\x01-\x04]' AND s.value !~ E'[\x01-\x04]';
      IF entry IS NOT NULL THEN
        -- "pgtenant:<pid>:<start>", then "\x02<entries>" for each context, newest first and each
        -- once, then "\x02."; split and joined on whole contexts (string_to_array works on bytes,
        -- where left() would count characters)
        entries := array_remove(string_to_array(substr(seen, length(bind) + 2), E'\x02'), '.');
        entries := (ARRAY[entry] || array_remove(entries, entry))[1:@remembered@];
        PERFORM set_config('@cache@', bind || E'\x02' || array_to_string(entries, E'\x02') || E'\x02.', false);
      END IF;
      RETURN p->'settings'->>name;
    END IF;
  END LOOP;
  RETURN NULL;
END
"#;

/// How many verified contexts a backend remembers: the newest ones. `setting()` copies and searches
/// the record on every call, so this bounds its cost as much as it bounds memory (a context of three
/// tenant settings and the claims takes the signature's 64 bytes per setting plus the settings,
/// about 350: 64 of them about 22 kB).
pub const REMEMBERED: usize = 64;

/// `--schema`: a plain lowercase identifier, so that policies can name it without quotes.
pub fn check_schema(schema: &str) -> Result<(), String> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && !schema.starts_with("pg_")
        && schema.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(format!("--schema {schema:?}: use a lowercase identifier (letters, digits, '_'; not starting with pg_)"))
    }
}

fn fill(body: &str, schema: &str, pgcrypto: &str) -> String {
    body.replace("@context@", CONTEXT_SETTING)
        .replace("@signature@", SIGNATURE_SETTING)
        .replace("@cache@", CACHE_SETTING)
        .replace("@remembered@", &REMEMBERED.to_string())
        .replace(SCHEMA, schema)
        .replace(PGCRYPTO, pgcrypto)
}

/// The body of `<schema>.setting(text)` as installed.
pub fn setting_body(schema: &str) -> String {
    fill(SETTING_BODY, schema, "")
}

/// The body of `<schema>.verify(text)` as installed, with pgcrypto in schema `pgcrypto` (as
/// `quote_ident` writes it).
pub fn verify_body(schema: &str, pgcrypto: &str) -> String {
    fill(VERIFY_BODY, schema, pgcrypto)
}

/// The body of `<schema>.claims()` for `tenant.claims_setting` (`""`: no claims setting).
pub fn claims_body(schema: &str, claims_setting: &str) -> String {
    if claims_setting.is_empty() {
        "\nBEGIN\n  RETURN NULL;  -- tenant.claims_setting is \"\": pgtenant signs no claims\nEND\n".into()
    } else {
        format!("\nBEGIN\n  RETURN {schema}.setting({})::jsonb;\nEND\n", literal(claims_setting))
    }
}

/// SQL string literal.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// SQL identifier, always quoted.
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The whole install script for `cfg`'s key, kid and roles. Fails when signing is not configured.
pub fn script(cfg: &Config, schema: &str) -> Result<String, String> {
    check_schema(schema)?;
    let key = cfg
        .tenant
        .signing_key_bytes()
        .map_err(|e| e.to_string())?
        .ok_or("signing is off: set tenant.signing_key or tenant.signing_key_file (e.g. `openssl rand -hex 32`) first")?;
    let kid = &cfg.tenant.signing_kid;
    let role = BackendTarget::from_config(&cfg.backend).map_err(|e| format!("backend.url: {e}"))?.user;
    let mut grantees = vec![ident(&role)];
    grantees.extend(cfg.tenant.allowed_roles.iter().map(|r| ident(r)));
    let grantees = grantees.join(", ");
    let role_lit = literal(&role);
    let setting = setting_body(schema);
    let verify = verify_body(schema, PGCRYPTO);
    let claims = claims_body(schema, &cfg.tenant.claims_setting);
    let key_hex = hex::encode(&key);
    Ok(format!(
        r#"-- pgtenant install-sql: the signed tenant context (docs/security.md, "Signed context").
-- Schema {schema}, key id {kid_lit}, restricted role {role_ident}.
-- THIS SCRIPT CONTAINS THE SIGNING KEY: pipe it into psql, do not save it or paste it into a log:
--   pgtenant install-sql --config pgtenant.toml | psql -v ON_ERROR_STOP=1 "postgres://OWNER@HOST/DB"
-- Run it as a superuser, or as the database owner if it is a member of pg_read_all_stats and
-- pg_read_all_settings and (from PostgreSQL 15) was granted SET ON PARAMETER {cache}. It is
-- idempotent and runs in one transaction; a new kid is added next to the installed ones.

BEGIN;

-- The functions below run as the role running this script, and must see the start time of the
-- restricted role's backends (pg_stat_get_activity) to check a context's binding to its backend.
DO $check$
BEGIN
  IF current_user = {role_lit} THEN
    RAISE EXCEPTION 'pgtenant install-sql: run this as the database owner or a superuser, not as the restricted role %', current_user;
  END IF;
  IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)
     AND NOT pg_catalog.pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')
     AND NOT pg_catalog.pg_has_role(current_user, {role_lit}, 'USAGE') THEN
    RAISE EXCEPTION 'pgtenant install-sql: % cannot see the backend start of % sessions', current_user, {role_lit}
      USING HINT = format('run it as a superuser, or first: GRANT pg_read_all_stats TO %I;', current_user);
  END IF;
  -- verify() remembers verified contexts in {cache}, which only a superuser, or (PostgreSQL 15
  -- and later) a role granted SET on it, may change: that is what makes the memory trustworthy
  IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
    IF NOT pg_catalog.pg_has_role(current_user, 'pg_read_all_settings', 'USAGE') THEN
      RAISE EXCEPTION 'pgtenant install-sql: % cannot read {cache}', current_user
        USING HINT = format('run it as a superuser, or first: GRANT pg_read_all_settings TO %I;', current_user);
    END IF;
    IF pg_catalog.current_setting('server_version_num')::int < 150000 THEN
      RAISE EXCEPTION 'pgtenant install-sql: run this as a superuser (before PostgreSQL 15 only a superuser may set {cache})';
    ELSIF NOT pg_catalog.has_parameter_privilege(current_user, '{cache}', 'SET') THEN
      RAISE EXCEPTION 'pgtenant install-sql: % may not set {cache}', current_user
        USING HINT = format('run it as a superuser, or first, as a superuser: GRANT SET ON PARAMETER {cache} TO %I;', current_user);
    END IF;
  END IF;
  IF NOT pg_catalog.has_function_privilege(current_user, 'pg_catalog.pg_stat_get_activity(integer)', 'EXECUTE') THEN
    RAISE EXCEPTION 'pgtenant install-sql: % may not execute pg_catalog.pg_stat_get_activity(integer)', current_user
      USING HINT = format('run it as a superuser, or first: GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_get_activity(integer) TO %I;', current_user);
  END IF;
END
$check$;

CREATE SCHEMA IF NOT EXISTS {schema};
REVOKE ALL ON SCHEMA {schema} FROM PUBLIC;
GRANT USAGE ON SCHEMA {schema} TO {grantees};

CREATE EXTENSION IF NOT EXISTS pgcrypto;

-- The keys: readable by their owner only (and so by the SECURITY DEFINER functions below).
CREATE TABLE IF NOT EXISTS {schema}.keys (
  kid      text PRIMARY KEY CHECK (kid ~ '^[A-Za-z0-9_.-]{{1,63}}$'),
  key      bytea NOT NULL CHECK (length(key) >= 32),
  added_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON TABLE {schema}.keys FROM PUBLIC, {grantees};
INSERT INTO {schema}.keys (kid, key) VALUES ({kid_lit}, decode('{key_hex}', 'hex'))
  ON CONFLICT (kid) DO UPDATE SET key = EXCLUDED.key, added_at = now()
  WHERE keys.key IS DISTINCT FROM EXCLUDED.key;

-- {schema}.verify(name): the value of a tenant setting when the transaction's context carries a
-- valid signature by an installed key and names this backend; NULL otherwise (a policy comparing
-- with it then matches no row). It remembers what it verified in {cache}, a setting the restricted
-- role cannot change. Created through EXECUTE to call pgcrypto in whatever schema it is.
DO $install$
DECLARE
  pgcrypto text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                      JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pgcrypto');
BEGIN
  EXECUTE pg_catalog.replace($fn$
CREATE OR REPLACE FUNCTION {schema}.verify(name text) RETURNS text
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
  AS $body${verify}$body$
$fn$, '{PGCRYPTO}', pgcrypto);
END
$install$;

-- {schema}.setting(name): what policies call. A context this backend verified before is found in
-- {cache} by a string search; anything else goes to {schema}.verify. No SET clause (it would cost
-- as much as the body): every name in the body is schema-qualified instead.
CREATE OR REPLACE FUNCTION {schema}.setting(name pg_catalog.text) RETURNS pg_catalog.text
  LANGUAGE plpgsql STABLE SECURITY DEFINER
  AS $body${setting}$body$;

-- {schema}.claims(): the verified claims as jsonb; NULL when not verified.
CREATE OR REPLACE FUNCTION {schema}.claims() RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
  AS $body${claims}$body$;

REVOKE ALL ON FUNCTION {schema}.setting(text), {schema}.verify(text), {schema}.claims() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {schema}.setting(text), {schema}.verify(text), {schema}.claims() TO {grantees};

COMMIT;

-- Installed keys:  SELECT kid, added_at FROM {schema}.keys;
-- Rotation: set a new tenant.signing_kid and signing_key, run install-sql again (the old kid stays
-- valid), reload every pgtenant, then remove the kids it no longer signs with, e.g. once {kid_lit}
-- is the new one:
--   DELETE FROM {schema}.keys WHERE kid <> {kid_lit};
-- (Installing another key under an installed kid replaces that key at once.)
"#,
        kid_lit = literal(kid),
        role_ident = ident(&role),
        cache = CACHE_SETTING,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        let text = format!(
            "[backend]\nurl = \"postgres://app_user:pw@127.0.0.1/app\"\n[jwt]\nsecret = \"s\"\n[tenant]\n\
             settings = {{ \"app.tenant_id\" = \"tenant_id\" }}\n{extra}\n"
        );
        Config::from_toml(&text, &|_| None).unwrap()
    }

    #[test]
    fn script_carries_key_kid_roles_and_functions() {
        let key = "0123456789abcdef0123456789abcdef";
        let c = cfg(&format!("signing_key = \"{key}\"\nsigning_kid = \"k2\"\nrole_claim = \"role\"\nallowed_roles = [\"reader\"]"));
        let sql = script(&c, "pgtenant").unwrap();
        assert!(sql.contains(&format!("decode('{}', 'hex')", hex::encode(key))), "{sql}");
        assert!(sql.contains("VALUES ('k2', "));
        assert!(sql.contains("GRANT EXECUTE ON FUNCTION pgtenant.setting(text), pgtenant.verify(text), pgtenant.claims() TO \"app_user\", \"reader\";"));
        assert!(sql.contains("REVOKE ALL ON TABLE pgtenant.keys FROM PUBLIC, \"app_user\", \"reader\";"));
        assert!(sql.contains("RETURN pgtenant.setting('request.jwt.claims')::jsonb;"));
        assert!(sql.contains("FROM pgtenant.keys t") && sql.contains("@pgcrypto@.hmac(msg"));
        assert!(sql.contains("GRANT SET ON PARAMETER session_preload_libraries"));
        assert_eq!(sql.matches("BEGIN;").count(), 1);
        // the bodies the doctor compares with are the ones installed
        assert!(verify_body("s", "public").contains("public.hmac(mac, k.key") && verify_body("s", "public").contains("FROM s.keys t"));
        assert!(setting_body("s").contains("RETURN s.verify(name);"));
        // the fast path hashes nothing, parses no JSON, does not count characters (strpos), and
        // finds the entry by the signature alone
        let fast = setting_body("s");
        for slow in ["sha256", "json", "strpos", CONTEXT_SETTING] {
            assert!(!fast.contains(slow), "{slow} in {fast}");
        }
        assert!(fast.contains(&format!("pg_catalog.current_setting('{CACHE_SETTING}')")));
        assert!(fast.contains(&format!("current_setting('{SIGNATURE_SETTING}', true)")));
        assert!(verify_body("s", "public").contains(&format!("))[1:{REMEMBERED}];")));
        assert!(!setting_body("s").contains('@') && !verify_body("s", "public").contains('@'));
    }

    #[test]
    fn refuses_without_key_or_with_odd_schema() {
        assert!(script(&cfg(""), "pgtenant").unwrap_err().contains("signing is off"));
        let c = cfg("signing_key = \"0123456789abcdef0123456789abcdef\"");
        for bad in ["", "Pgtenant", "pg_x", "a-b", "1a", "a\"b"] {
            assert!(script(&c, bad).is_err(), "{bad}");
        }
        assert!(script(&c, "tenant_ctx").is_ok());
        assert!(claims_body("pgtenant", "").contains("RETURN NULL"));
    }
}
