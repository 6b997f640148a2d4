//! The doctor's checks of the signed tenant context (`tenant.signing_key`, `pgtenant install-sql`).
//!
//! Signing only protects tenants if the policies read the tenant through the verifying function,
//! if the database holds the key pgtenant signs with, and if the restricted role cannot read (or
//! add) keys, nor read or set the record of verified contexts. These checks are apart from the others because they need the key and run a probe:
//! the doctor signs a context for its own backend, exactly as pgtenant does, and asks the database
//! to verify it.

use std::collections::BTreeSet;

use super::{cell, finding, lit, Finding};
use crate::backend::query::simple_query;
use crate::backend::{BackendConn, ConnectError};
use crate::config::Config;
use crate::install_sql;
use crate::signing::{BackendId, Signer, CACHE_SETTING, CONTEXT_SETTING, SIGNATURE_SETTING};

/// The name the probe's payload carries; not a tenant setting, so nothing else reads it.
const PROBE_SETTING: &str = "pgtenant.doctor_probe";

/// What the signing checks found, and the functions they vouch for (`regprocedure` text): the
/// verifying functions are `SECURITY DEFINER` by design, so the generic check skips them when they
/// are exactly what `install-sql` installs.
pub(super) struct Outcome {
    pub findings: Vec<Finding>,
    pub vouched: BTreeSet<String>,
}

/// The setting names a policy may read: `tenant.settings` and `tenant.claims_setting`.
fn tenant_names(cfg: &Config) -> Vec<String> {
    let mut names: Vec<String> = cfg.tenant.settings.keys().cloned().collect();
    if !cfg.tenant.claims_setting.is_empty() {
        names.push(cfg.tenant.claims_setting.clone());
    }
    names
}

/// Runs the checks for the restricted role `role`. Without a signing key, only the policies are
/// checked (and installed functions vouched for).
pub(super) async fn checks(conn: &mut BackendConn, cfg: &Config, role: &str, schema: &str) -> Result<Outcome, ConnectError> {
    let r = &lit(role);
    let key = cfg.tenant.signing_key_bytes().ok().flatten();
    let names = tenant_names(cfg);
    let mut out = Outcome { findings: policy_checks(conn, &names, schema, key.is_some()).await?, vouched: BTreeSet::new() };
    let s = lit(schema);
    let installer = "run `pgtenant install-sql --config <this config> | psql` as the database owner or a superuser";

    // the functions: present, what this pgtenant installs, and executable by the role
    let pgcrypto = simple_query(conn, "SELECT quote_ident(n.nspname) FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pgcrypto'")
        .await?
        .first()
        .map(|row| cell(row, 0));
    // column 3: STABLE SECURITY DEFINER; column 6: with the fixed search_path
    let functions = simple_query(conn, &format!(
        "SELECT p.proname, p.oid::regprocedure::text, p.prosrc, p.provolatile = 's' AND p.prosecdef, \
         has_function_privilege({r}, p.oid, 'EXECUTE') AND has_schema_privilege({r}, n.oid, 'USAGE'), format('%I', n.nspname), \
         coalesce(p.proconfig, '{{}}') = ARRAY['search_path=pg_catalog, pg_temp'] FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = {s} AND (((p.proname = 'setting' OR p.proname = 'verify') AND oidvectortypes(p.proargtypes) = 'text') \
         OR (p.proname = 'claims' AND p.pronargs = 0)) ORDER BY 1"
    ))
    .await?;
    let mut usable = 0;
    // (name, arguments, with `SET search_path`): setting() has none, its names are all qualified
    for (name, args, fixed_path) in [("setting", "text", false), ("verify", "text", true), ("claims", "", true)] {
        let object = format!("{schema}.{name}({args})");
        let Some(row) = functions.iter().find(|row| cell(row, 0) == name) else {
            if key.is_some() {
                out.findings.push(finding("signing_not_installed", object, format!("the verifying function is missing: {installer}")));
            }
            continue;
        };
        let expected = match name {
            "setting" => Some(install_sql::setting_body(schema)),
            "verify" => pgcrypto.as_deref().map(|c| install_sql::verify_body(schema, c)),
            _ => Some(install_sql::claims_body(schema, &cfg.tenant.claims_setting)),
        };
        let attributes = cell(row, 3) == "t" && (cell(row, 6) == "t") == fixed_path;
        if expected.as_deref() != Some(cell(row, 2).as_str()) || !attributes {
            if key.is_some() {
                out.findings.push(finding(
                    "signing_not_installed",
                    object,
                    format!("differs from the function this pgtenant installs (an older version, another tenant.claims_setting, or edited by hand): {installer}"),
                ));
            }
            continue;
        }
        out.vouched.insert(cell(row, 1));
        if cell(row, 4) != "t" {
            if key.is_some() {
                let role = super::quote_ident(role);
                out.findings.push(
                    finding("signing_not_installed", object, "the restricted role cannot run it: every policy that reads it fails")
                        .with_fix(format!("GRANT USAGE ON SCHEMA {} TO {role};\nGRANT EXECUTE ON FUNCTION {}.{name}({args}) TO {role};", cell(row, 5), cell(row, 5))),
                );
            }
        } else if name != "claims" {
            usable += 1;
        }
    }
    let setting_ok = usable == 2;
    let Some(key) = key else { return Ok(out) };

    // the keys: not readable nor writable by the role
    let keys = simple_query(conn, &format!(
        "SELECT format('%I.%I', n.nspname, c.relname), pg_has_role({r}, c.relowner, 'USAGE'), \
         (SELECT string_agg(DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(g.rolname) END, ', ') \
            FROM (SELECT (aclexplode(c.relacl)).grantee UNION SELECT (aclexplode(t.attacl)).grantee FROM pg_attribute t \
                  WHERE t.attrelid = c.oid AND t.attacl IS NOT NULL) a LEFT JOIN pg_roles g ON g.oid = a.grantee \
           WHERE a.grantee <> c.relowner AND (a.grantee = 0 OR pg_has_role({r}, a.grantee, 'USAGE'))) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = {s} AND c.relname = 'keys' AND c.relkind = 'r' \
         AND (has_table_privilege({r}, c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER') \
              OR has_any_column_privilege({r}, c.oid, 'SELECT, INSERT, UPDATE, REFERENCES'))"
    ))
    .await?;
    for row in keys {
        let detail = "the restricted role can read or change the signing keys: with them it can sign any tenant's context";
        let f = finding("signing_keys_readable", cell(&row, 0), detail);
        out.findings.push(match row.get(2).cloned().flatten() {
            Some(who) if cell(&row, 1) != "t" => f.with_fix(format!("REVOKE ALL ON TABLE {} FROM {who};", cell(&row, 0))),
            _ => f,
        });
    }

    // the record of verified contexts (`CACHE_SETTING` of each backend): it holds other sessions'
    // contexts with their signatures, so the role must neither read it nor set it
    if let Some(f) = record_check(conn, role).await? {
        out.findings.push(f);
    }

    // the key: a context signed as pgtenant signs it verifies in this database
    if setting_ok {
        if let Some(f) = probe(conn, cfg, &key, schema).await? {
            out.findings.push(f);
        }
    }
    Ok(out)
}

/// A finding when the restricted role may read (`pg_read_all_settings`, or superuser) or set (`SET ON
/// PARAMETER`, PostgreSQL 15 and later) the setting where backends remember verified contexts.
async fn record_check(conn: &mut BackendConn, role: &str) -> Result<Option<Finding>, ConnectError> {
    let (r, c) = (lit(role), lit(CACHE_SETTING));
    let version = simple_query(conn, "SELECT current_setting('server_version_num')").await?;
    let set = if version.first().and_then(|row| cell(row, 0).parse::<i64>().ok()).unwrap_or(0) >= 150000 {
        format!("has_parameter_privilege({r}, {c}, 'SET')")
    } else {
        "false".to_string()
    };
    let rows = simple_query(conn, &format!(
        "SELECT pg_has_role({r}, 'pg_read_all_settings', 'USAGE'), {set}, \
         EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles u ON u.oid = m.member \
                 WHERE g.rolname = 'pg_read_all_settings' AND u.rolname = {r})"
    ))
    .await?;
    let Some(row) = rows.first() else { return Ok(None) };
    let (read, set, direct) = (cell(row, 0) == "t", cell(row, 1) == "t", cell(row, 2) == "t");
    if !read && !set {
        return Ok(None);
    }
    let what = match (read, set) {
        (true, true) => "read and set",
        (true, false) => "read",
        _ => "set",
    };
    let f = finding(
        "signing_record_exposed",
        CACHE_SETTING.to_string(),
        format!(
            "the restricted role may {what} {CACHE_SETTING}, where each backend remembers the contexts it verified with their \
             signatures: reading it gives a client that got past the guard the other sessions' contexts on its backend, setting it \
             lets it add contexts of its own"
        ),
    );
    let role = super::quote_ident(role);
    let mut fix = Vec::new();
    if read && direct {
        fix.push(format!("REVOKE pg_read_all_settings FROM {role};"));
    }
    if set {
        fix.push(format!("REVOKE SET ON PARAMETER {CACHE_SETTING} FROM {role};"));
    }
    Ok(Some(if fix.is_empty() || (read && !direct) { f } else { f.with_fix(fix.join("\n")) }))
}

/// Signs a context for the doctor's own backend with the configured key and has the database
/// verify it. A finding when it does not verify.
async fn probe(conn: &mut BackendConn, cfg: &Config, key: &[u8], schema: &str) -> Result<Option<Finding>, ConnectError> {
    let kid = &cfg.tenant.signing_kid;
    let failed = |e: ConnectError| {
        Ok(Some(finding(
            "signing_probe_failed",
            format!("{schema}.setting(text)"),
            format!("verifying a probe context failed: {e} (pgtenant needs pg_stat_get_activity for its own backend to sign; see docs/doctor.md)"),
        )))
    };
    let me = match simple_query(conn, "SELECT pg_catalog.pg_backend_pid(), extract(epoch from backend_start)::text FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid())").await {
        Ok(rows) => rows,
        Err(e @ ConnectError::Server { .. }) => return failed(e),
        Err(e) => return Err(e),
    };
    let Some(row) = me.first() else { return Ok(None) };
    let backend = BackendId { pid: cell(row, 0).parse().unwrap_or_default(), started: cell(row, 1) };
    let nonce = format!("probe-{:016x}", rand::random::<u64>());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_default();
    let (payload, signature) = Signer::new(kid, key).signed(&[(PROBE_SETTING.to_string(), nonce.clone())], now, &backend);
    // one query string is one transaction: the transaction-local settings hold for the second statement
    let sql = format!(
        "SELECT pg_catalog.set_config({}, {}, true), pg_catalog.set_config({}, {}, true); SELECT {schema}.setting({})",
        lit(CONTEXT_SETTING),
        lit(&payload),
        lit(SIGNATURE_SETTING),
        lit(&signature),
        lit(PROBE_SETTING)
    );
    let rows = match simple_query(conn, &sql).await {
        Ok(rows) => rows,
        Err(e @ ConnectError::Server { .. }) => return failed(e),
        Err(e) => return Err(e),
    };
    if rows.iter().any(|row| row.first().cloned().flatten().as_deref() == Some(nonce.as_str())) {
        return Ok(None);
    }
    Ok(Some(finding(
        "signing_key_mismatch",
        format!("{schema}.keys"),
        format!(
            "the database does not verify a context signed with kid {kid:?}: that kid is not installed or holds another key \
             (run `pgtenant install-sql` with this config), or the functions' owner cannot see backend start times \
             (make it a superuser or a member of pg_read_all_stats) or may not set session_preload_libraries \
             (make it a superuser, or GRANT SET ON PARAMETER session_preload_libraries TO it)"
        ),
    )))
}

/// Policies: with signing, every policy that reads a tenant setting with `current_setting` (a
/// value the client could set itself); without, every policy that reads the verifying function
/// (it matches no row when nothing is signed).
async fn policy_checks(conn: &mut BackendConn, names: &[String], schema: &str, signing: bool) -> Result<Vec<Finding>, ConnectError> {
    let rows = simple_query(conn, "SELECT format('%I.%I', schemaname, tablename), policyname, quote_ident(policyname), qual, with_check FROM pg_policies ORDER BY 1, 2").await?;
    let mut out = Vec::new();
    let verifier = format!("{schema}.setting(");
    for row in &rows {
        let (table, policy) = (cell(row, 0), cell(row, 1));
        let object = format!("{table} policy {policy}");
        let exprs = [row.get(3).cloned().flatten(), row.get(4).cloned().flatten()];
        if !signing {
            if exprs.iter().flatten().any(|e| e.contains(&verifier)) {
                out.push(finding(
                    "policy_needs_signing",
                    object,
                    format!("reads {schema}.setting() but tenant.signing_key is not set: nothing is signed, so the policy matches no row"),
                ));
            }
            continue;
        }
        let rewritten: Vec<Option<Rewrite>> = exprs.iter().map(|e| e.as_deref().map(|e| rewrite(e, names, schema))).collect();
        let read: BTreeSet<&String> = rewritten.iter().flatten().flat_map(|r| r.replaced.iter()).collect();
        let unclear = rewritten.iter().flatten().any(|r| r.unclear);
        if read.is_empty() && !unclear {
            continue;
        }
        let what = if read.is_empty() {
            "current_setting() with a name that is not a literal".to_string()
        } else {
            format!("{} with current_setting()", read.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))
        };
        let f = finding(
            "policy_reads_unsigned_setting",
            object,
            format!("reads {what}: a client that sets it itself passes the policy; read it with {schema}.setting() so that only a signed context counts"),
        );
        out.push(if unclear {
            f
        } else {
            let mut fix = format!("ALTER POLICY {} ON {table}", cell(row, 2));
            if let Some(Some(using)) = rewritten.first() {
                fix.push_str(&format!(" USING ({})", using.text));
            }
            if let Some(Some(check)) = rewritten.get(1) {
                fix.push_str(&format!(" WITH CHECK ({})", check.text));
            }
            f.with_fix(fix + ";")
        });
    }
    Ok(out)
}

/// A policy expression with `current_setting('<tenant setting>'…)` replaced by the verifying
/// function.
#[derive(Debug, PartialEq)]
struct Rewrite {
    text: String,
    /// The tenant settings it read with `current_setting`.
    replaced: Vec<String>,
    /// A `current_setting` call whose name is not a literal: it may read a tenant setting.
    unclear: bool,
}

/// Rewrites `expr` as `pg_get_expr` prints it: `current_setting('app.tenant_id'::text, true)`
/// (optionally `pg_catalog.`-qualified) becomes `(SELECT <schema>.setting('app.tenant_id'::text))`.
fn rewrite(expr: &str, names: &[String], schema: &str) -> Rewrite {
    const CALL: &str = "current_setting(";
    let mut out = Rewrite { text: String::with_capacity(expr.len()), replaced: Vec::new(), unclear: false };
    let mut rest = expr;
    while let Some(i) = rest.find(CALL) {
        let before = &rest[..i];
        let (keep, qualified) = match before.strip_suffix("pg_catalog.") {
            Some(k) => (k, true),
            None => (before, false),
        };
        let standalone = qualified || !keep.ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == '.' || c == '"');
        let args = &rest[i + CALL.len()..];
        // 'name'::text, then `)` or `, true)` / `, false)`
        let name = args.strip_prefix('\'').and_then(|a| a.find('\'').map(|end| &a[..end]));
        let ours = name.is_some_and(|name| names.iter().any(|n| n == name));
        let left = name.and_then(|name| {
            let after = &args[name.len() + 2..];
            let tail = after.strip_prefix("::text").unwrap_or(after);
            let close = [")", ", true)", ", false)"].into_iter().find(|c| tail.starts_with(c))?;
            Some(tail.len() - close.len())
        });
        match (name, left) {
            (Some(name), Some(left)) if standalone && ours => {
                out.text.push_str(keep);
                out.text.push_str(&format!("(SELECT {schema}.setting({}::text))", lit(name)));
                if !out.replaced.iter().any(|n| n == name) {
                    out.replaced.push(name.to_string());
                }
                rest = &args[args.len() - left..];
                continue;
            }
            // a name that is not a plain literal, or ours inside a longer expression
            (None, _) | (Some(_), None) if standalone && (name.is_none() || ours) => out.unclear = true,
            _ => {}
        }
        out.text.push_str(&rest[..i + CALL.len()]);
        rest = args;
    }
    out.text.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_current_setting_of_tenant_settings_only() {
        let names = vec!["app.tenant_id".to_string(), "request.jwt.claims".to_string()];
        let r = rewrite("(tenant_id = (NULLIF(current_setting('app.tenant_id'::text, true), ''::text))::integer)", &names, "pgtenant");
        assert_eq!(r.text, "(tenant_id = (NULLIF((SELECT pgtenant.setting('app.tenant_id'::text)), ''::text))::integer)");
        assert_eq!(r.replaced, ["app.tenant_id"]);
        assert!(!r.unclear);
        let r = rewrite(
            "((owner = ((pg_catalog.current_setting('request.jwt.claims'::text))::jsonb ->> 'sub'::text)) AND (x = current_setting('other.thing'::text, true)))",
            &names,
            "s",
        );
        assert_eq!(r.text, "((owner = (((SELECT s.setting('request.jwt.claims'::text)))::jsonb ->> 'sub'::text)) AND (x = current_setting('other.thing'::text, true)))");
        assert_eq!(r.replaced, ["request.jwt.claims"]);
        // not ours: another function with the same suffix; a computed name is unclear
        let r = rewrite("(a = my_current_setting('app.tenant_id'::text))", &names, "s");
        assert!(r.replaced.is_empty() && !r.unclear);
        let r = rewrite("(a = current_setting(('app.'::text || 'tenant_id'::text), true))", &names, "s");
        assert!(r.replaced.is_empty() && r.unclear);
        let r = rewrite("(a = (SELECT s.setting('app.tenant_id'::text)))", &names, "s");
        assert!(r.replaced.is_empty() && !r.unclear);
        let r = rewrite("(a = current_setting('it''s'::text))", &names, "s");
        assert!(r.replaced.is_empty() && !r.unclear);
        let r = rewrite("(a = current_setting(('app.tenant_id'::text || ''::text)))", &names, "s");
        assert!(r.replaced.is_empty() && r.unclear, "{r:?}");
        let r = rewrite("(a = current_setting('app.tenant_id'::text || ''::text))", &names, "s");
        assert!(r.replaced.is_empty() && r.unclear);
    }
}
