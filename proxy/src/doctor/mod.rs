//! `pgtenant doctor`: checks that the database really isolates tenants for the role pgtenant logs in
//! as. pgtenant only sets the context; RLS policies, ownership and privileges decide what a client can
//! read. Every finding is a way one tenant could see or change another tenant's data, or fail open.
//!
//! The checks run on every server pgtenant may send a tenant's transaction to (`endpoints`), and
//! each finding names the server (`host`) and cluster it is about. Every check only reads (the
//! signing probe's settings are transaction-local, its transaction is not committed), so a hot
//! standby gets every check too; the report says which servers were standbys.

use std::collections::BTreeSet;

use serde::Serialize;

mod endpoints;
mod signing;

use crate::backend::query::{simple_query, Row};
use crate::backend::{connect, BackendConn, ConnectError};
use crate::config::Config;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    /// Stable identifier of the check (documented in docs/doctor.md).
    pub check: &'static str,
    /// The object concerned (table, function, schema, setting...).
    pub object: String,
    pub detail: String,
    /// SQL that fixes the finding, to run as a superuser (or the object's owner), when there is
    /// one exact fix: one statement per line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// The server the finding is about (`host:port`, or the socket path).
    pub host: String,
    /// The cluster of that server (`default` is `[backend]`, else a `[[clusters]]` name).
    pub cluster: String,
}

fn finding(check: &'static str, object: impl Into<String>, detail: impl Into<String>) -> Finding {
    Finding { check, object: object.into(), detail: detail.into(), fix: None, host: String::new(), cluster: String::new() }
}

/// One server the doctor checked.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Checked {
    pub cluster: String,
    /// `primary` (a host of the cluster's URL) or `replica` (a read replica).
    pub kind: &'static str,
    pub host: String,
    /// The server was in recovery (a hot standby) when checked.
    pub standby: bool,
}

/// What a run found, and where it looked.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub checked: Vec<Checked>,
}

impl Finding {
    fn with_fix(mut self, fix: impl Into<String>) -> Finding {
        self.fix = Some(fix.into());
        self
    }
}

/// SQL expression: the grantees (`PUBLIC` and/or quoted role names) through which `role` holds
/// `privilege` in the ACL `acl` (an `aclitem[]` column, NULL meaning the default for object kind
/// `kind` owned by `owner`), comma-separated, for a `REVOKE … FROM` that really takes it away.
fn grantees(acl: &str, kind: char, owner: &str, privilege: &str, role: &str) -> String {
    format!(
        "coalesce((SELECT string_agg(DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(g.rolname) END, ', ') \
         FROM aclexplode(coalesce({acl}, acldefault('{kind}', {owner}))) a LEFT JOIN pg_roles g ON g.oid = a.grantee \
         WHERE a.privilege_type = '{privilege}' AND (a.grantee = 0 OR pg_has_role({role}, a.grantee, 'USAGE'))), 'PUBLIC')"
    )
}

/// SQL expression: `schema.name(argtypes)` of the function `p` (joined with its namespace `n`),
/// as `REVOKE … ON FUNCTION` accepts it.
const FUNCTION_NAME: &str = "format('%I.%I(%s)', n.nspname, p.proname, pg_catalog.oidvectortypes(p.proargtypes))";

/// `(object, grantees)` of the functions selected by `filter` (over `pg_proc p` joined with
/// `pg_namespace n`) that the role may execute.
async fn executable_functions(conn: &mut BackendConn, role: &str, filter: &str) -> Result<Vec<(String, String)>, ConnectError> {
    let rows = simple_query(conn, &format!(
        "SELECT {FUNCTION_NAME}, {} FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE ({filter}) AND has_function_privilege({role}, p.oid, 'EXECUTE') ORDER BY 1",
        grantees("p.proacl", 'f', "p.proowner", "EXECUTE", role)
    ))
    .await?;
    Ok(rows.iter().map(|row| (cell(row, 0), cell(row, 1))).collect())
}

fn cell(row: &Row, i: usize) -> String {
    row.get(i).cloned().flatten().unwrap_or_default()
}

fn revoke_execute(function: &str, grantees: &str) -> String {
    format!("REVOKE EXECUTE ON FUNCTION {function} FROM {grantees};")
}

/// SQL literal for a name we put into catalog queries.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";

/// Runs every check on every server (see `endpoints`). Connects as `admin_url` when given (to see
/// every object), else as each cluster's restricted role itself; privileges are always evaluated
/// for the restricted role.
pub async fn run(cfg: &Config, admin_url: Option<&str>) -> Result<Vec<Finding>, String> {
    run_in(cfg, admin_url, crate::install_sql::DEFAULT_SCHEMA).await
}

/// [`run`], with the signed-context functions in `schema` (`pgtenant install-sql --schema`).
pub async fn run_in(cfg: &Config, admin_url: Option<&str>, schema: &str) -> Result<Vec<Finding>, String> {
    Ok(report(cfg, admin_url, schema).await?.findings)
}

/// [`run_in`], with the servers checked. A server that cannot be checked (unreachable, the role
/// missing) fails the run, after every other server has been tried, naming each that failed.
pub async fn report(cfg: &Config, admin_url: Option<&str>, schema: &str) -> Result<Report, String> {
    let mut out = Report::default();
    let mut failed = Vec::new();
    for (i, e) in endpoints::endpoints(cfg)?.iter().enumerate() {
        let target = match admin_url {
            Some(url) => endpoints::as_admin(i, &e.target, url, &cfg.backend)?,
            None => e.target.clone(),
        };
        let checked = async {
            let mut conn = connect(&target).await.map_err(|err| format!("cannot connect as {}: {err}", target.describe()))?;
            let standby = simple_query(&mut conn, "SELECT pg_catalog.pg_is_in_recovery()").await.map_err(|err| err.to_string())?;
            let findings = check(&mut conn, cfg, &e.target.user, schema).await?;
            Ok::<_, String>((standby.first().is_some_and(|row| cell(row, 0) == "t"), findings))
        };
        match checked.await {
            Ok((standby, findings)) => {
                let host = e.target.address();
                out.findings.extend(findings.into_iter().map(|f| Finding { host: host.clone(), cluster: e.cluster.clone(), ..f }));
                out.checked.push(Checked { cluster: e.cluster.clone(), kind: e.kind, host, standby });
            }
            Err(err) => failed.push(format!("{}: {err}", e.label())),
        }
    }
    if failed.is_empty() { Ok(out) } else { Err(failed.join("\n")) }
}

/// The checks on one server, for the restricted role `role`.
async fn check(conn: &mut BackendConn, cfg: &Config, role: &str, schema: &str) -> Result<Vec<Finding>, String> {
    let r = lit(role);
    let mut out = Vec::new();
    let text = cell;
    let err = |e: ConnectError| e.to_string();

    let rows = simple_query(conn, &format!("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = {r}")).await.map_err(err)?;
    let Some(row) = rows.first() else {
        return Err(format!("role {role} does not exist"));
    };
    let role_ident = quote_ident(role);
    if text(row, 0) == "t" {
        out.push(
            finding("role_superuser", role, "the role is a superuser: RLS does not apply to it")
                .with_fix(format!("ALTER ROLE {role_ident} NOSUPERUSER;")),
        );
    }
    if text(row, 1) == "t" {
        out.push(
            finding("role_bypassrls", role, "the role has BYPASSRLS: RLS does not apply to it")
                .with_fix(format!("ALTER ROLE {role_ident} NOBYPASSRLS;")),
        );
    }
    for row in simple_query(conn, &format!(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relowner = (SELECT oid FROM pg_roles WHERE rolname = {r}) AND c.relkind IN ('r','p','v','m') AND {USER_SCHEMAS} ORDER BY 1"
    ))
    .await
    .map_err(err)?
    {
        out.push(finding("role_owns_table", text(&row, 0), "owned by the restricted role: it can disable or drop the policies"));
    }
    for row in simple_query(conn, &format!(
        "SELECT format('%I.%I', n.nspname, c.relname), c.relrowsecurity, c.relforcerowsecurity FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r','p') AND {USER_SCHEMAS} \
         AND has_table_privilege({r}, c.oid, 'SELECT') AND NOT (c.relrowsecurity AND c.relforcerowsecurity) ORDER BY 1"
    ))
    .await
    .map_err(err)?
    {
        let detail = if text(&row, 1) != "t" { "readable without row-level security enabled" } else { "row-level security is not FORCEd" };
        let t = text(&row, 0);
        let fix = format!("ALTER TABLE {t} ENABLE ROW LEVEL SECURITY;\nALTER TABLE {t} FORCE ROW LEVEL SECURITY;");
        out.push(finding("table_without_rls", t, detail).with_fix(fix));
    }
    for row in simple_query(conn, &format!(
        "SELECT format('%I.%I', n.nspname, c.relname), c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('v','m') AND {USER_SCHEMAS} AND has_table_privilege({r}, c.oid, 'SELECT') \
         AND (c.relkind = 'm' OR NOT coalesce((SELECT option_value::bool FROM pg_options_to_table(c.reloptions) WHERE option_name = 'security_invoker'), false)) ORDER BY 1"
    ))
    .await
    .map_err(err)?
    {
        let detail = if text(&row, 1) == "m" {
            "materialized view readable by the role: row-level security does not apply to it"
        } else {
            "view without security_invoker: it reads tables with its owner's rights, bypassing the role's policies"
        };
        out.push(finding("view_bypasses_rls", text(&row, 0), detail));
    }
    let settings: Vec<String> = cfg.tenant.settings.keys().cloned().collect();
    let mut all_names = settings.clone();
    if !cfg.tenant.claims_setting.is_empty() {
        all_names.push(cfg.tenant.claims_setting.clone());
    }
    let signed = signing::checks(conn, cfg, role, schema).await.map_err(err)?;
    let policies = simple_query(conn, "SELECT format('%I.%I', schemaname, tablename), policyname, coalesce(qual, '') || ' ' || coalesce(with_check, '') FROM pg_policies ORDER BY 1, 2")
        .await
        .map_err(err)?;
    let mut used = BTreeSet::new();
    for row in &policies {
        let expr = text(row, 2);
        let mentioned: Vec<&String> = all_names.iter().filter(|s| expr.contains(s.as_str())).collect();
        used.extend(mentioned.iter().map(|s| s.to_string()));
        let object = format!("{} policy {}", text(row, 0), text(row, 1));
        if mentioned.is_empty() {
            out.push(finding("policy_without_tenant_setting", object, "the policy does not read any setting pgtenant sets"));
        } else if expr.contains("current_setting") && !expr.to_lowercase().contains("nullif") {
            out.push(finding(
                "policy_accepts_empty_setting",
                object,
                "reads a setting without NULLIF(…, ''): an unset or reset setting ('') may match rows",
            ));
        }
    }
    for s in &settings {
        if !used.contains(s) {
            out.push(finding("setting_unused", s, "configured in [tenant] but no policy reads it"));
        }
    }
    for row in simple_query(conn, &format!(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE p.prosecdef AND {USER_SCHEMAS} AND has_function_privilege({r}, p.oid, 'EXECUTE') ORDER BY 1"
    ))
    .await
    .map_err(err)?
    {
        if !signed.vouched.contains(&text(&row, 0)) {
            out.push(finding("security_definer_function", text(&row, 0), "SECURITY DEFINER function the role can run: it runs with its owner's rights"));
        }
    }
    out.extend(signed.findings);
    for row in simple_query(conn, &format!(
        "SELECT n.nspname, format('%I', n.nspname), {} FROM pg_namespace n WHERE {USER_SCHEMAS} AND has_schema_privilege({r}, n.oid, 'CREATE') ORDER BY 1",
        grantees("n.nspacl", 'n', "n.nspowner", "CREATE", &r)
    ))
    .await
    .map_err(err)?
    {
        out.push(
            finding("schema_create", text(&row, 0), "the role may create objects here (functions, views) that could bypass policies")
                .with_fix(format!("REVOKE CREATE ON SCHEMA {} FROM {};", text(&row, 1), text(&row, 2))),
        );
    }
    let temp = simple_query(conn, &format!(
        "SELECT has_database_privilege({r}, d.oid, 'TEMP'), format('%I', d.datname), {} FROM pg_database d WHERE d.datname = current_database()",
        grantees("d.datacl", 'd', "d.datdba", "TEMPORARY", &r)
    ))
    .await
    .map_err(err)?;
    if let Some(row) = temp.first().filter(|row| text(row, 0) == "t") {
        out.push(
            finding("database_temp", "current database", "the role may create temporary tables and functions")
                .with_fix(format!("REVOKE TEMP ON DATABASE {} FROM {};", text(row, 1), text(row, 2))),
        );
    }
    out.extend(interference_checks(conn, &r).await.map_err(err)?);
    Ok(out)
}

/// The shared role lets one tenant disturb or watch the others' sessions (docs/security.md,
/// "Shared-role interference"): query text of other sessions, signals to other backends, advisory
/// locks (one key space for all tenants), and TRUNCATE (ignores RLS, locks out every tenant).
async fn interference_checks(conn: &mut BackendConn, r: &str) -> Result<Vec<Finding>, ConnectError> {
    let mut out = Vec::new();
    let text_detail = "every client shares the role, so one tenant can read other tenants' query text here";
    for row in simple_query(conn, &format!(
        "SELECT format('%I.%I', n.nspname, c.relname), {} FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relname IN ('pg_stat_activity', 'pg_stat_statements') AND has_table_privilege({r}, c.oid, 'SELECT') ORDER BY 1",
        grantees("c.relacl", 'r', "c.relowner", "SELECT", r)
    ))
    .await?
    {
        let fix = format!("REVOKE SELECT ON {} FROM {};", cell(&row, 0), cell(&row, 1));
        out.push(finding("query_text_visible", cell(&row, 0), text_detail).with_fix(fix));
    }
    // pg_stat_activity is a view over pg_stat_get_activity(): revoking the view alone leaves the
    // function (and pg_stat_get_backend_activity) readable
    let filter = "(n.nspname = 'pg_catalog' AND p.proname IN ('pg_stat_get_activity', 'pg_stat_get_backend_activity')) OR p.proname = 'pg_stat_statements'";
    for (function, who) in executable_functions(conn, r, filter).await? {
        out.push(finding("query_text_visible", &function, text_detail).with_fix(revoke_execute(&function, &who)));
    }
    let filter = "n.nspname = 'pg_catalog' AND p.proname IN ('pg_cancel_backend', 'pg_terminate_backend')";
    for (function, who) in executable_functions(conn, r, filter).await? {
        out.push(
            finding("signal_functions", &function, "every client shares the role, so one tenant can cancel or terminate other tenants' queries")
                .with_fix(revoke_execute(&function, &who)),
        );
    }
    let filter = "n.nspname = 'pg_catalog' AND p.proname ~ '^pg_(try_)?advisory_(xact_)?lock(_shared)?$'";
    let locks = executable_functions(conn, r, filter).await?;
    if !locks.is_empty() {
        let names: BTreeSet<&str> = locks.iter().filter_map(|(f, _)| f.strip_prefix("pg_catalog.")?.split('(').next()).collect();
        let fix: Vec<String> = locks.iter().map(|(f, who)| revoke_execute(f, who)).collect();
        out.push(
            finding(
                "advisory_locks",
                "advisory lock functions",
                format!(
                    "the role can take advisory locks ({}): their keys are shared by every tenant, so one tenant can hold a key another tenant waits for",
                    names.into_iter().collect::<Vec<_>>().join(", ")
                ),
            )
            .with_fix(fix.join("\n")),
        );
    }
    for row in simple_query(conn, &format!(
        "SELECT format('%I.%I', n.nspname, c.relname), {} FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r','p') AND {USER_SCHEMAS} AND has_table_privilege({r}, c.oid, 'TRUNCATE') ORDER BY 1",
        grantees("c.relacl", 'r', "c.relowner", "TRUNCATE", r)
    ))
    .await?
    {
        out.push(
            finding(
                "table_truncate",
                cell(&row, 0),
                "the role may TRUNCATE: row-level security does not apply to it, so one tenant can empty the table for all (and lock them out meanwhile)",
            )
            .with_fix(format!("REVOKE TRUNCATE ON {} FROM {};", cell(&row, 0), cell(&row, 1))),
        );
    }
    Ok(out)
}

/// A role name as SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Human-readable report.
pub fn render(findings: &[Finding]) -> String {
    if findings.is_empty() {
        return "pgtenant doctor: no findings\n".into();
    }
    let w1 = findings.iter().map(|f| f.check.len()).max().unwrap_or(5).max(5);
    let w2 = findings.iter().map(|f| f.object.len()).max().unwrap_or(6).max(6);
    let mut s = format!("{:w1$}  {:w2$}  {}\n", "CHECK", "OBJECT", "DETAIL");
    let mut server = None;
    for f in findings {
        // the findings of each server under its name
        if !f.host.is_empty() && server != Some((&f.cluster, &f.host)) {
            server = Some((&f.cluster, &f.host));
            s.push_str(&format!("-- cluster {}, host {}\n", f.cluster, f.host));
        }
        s.push_str(&format!("{:w1$}  {:w2$}  {}\n", f.check, f.object, f.detail));
        for line in f.fix.iter().flat_map(|fix| fix.lines()) {
            s.push_str(&format!("{:w1$}  fix: {line}\n", ""));
        }
    }
    s.push_str(&format!("\n{} finding(s); run each fix as a superuser, and see docs/doctor.md for the others\n", findings.len()));
    s
}

/// The servers checked, one line each, for the text report (and standard error with `--json`).
pub fn render_checked(checked: &[Checked]) -> String {
    let mut s = String::new();
    for c in checked {
        let standby = if c.standby { " (standby: in recovery)" } else { "" };
        s.push_str(&format!("checked cluster {}, {} host {}{standby}\n", c.cluster, c.kind, c.host));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_are_grouped_by_server() {
        let on = |host: &str, cluster: &str| Finding { host: host.into(), cluster: cluster.into(), ..finding("database_temp", "current database", "d") };
        let text = render(&[on("h1:5432", "default"), on("h1:5432", "default"), on("e1:5432", "eu")]);
        assert_eq!(text.matches("-- cluster default, host h1:5432\n").count(), 1, "{text}");
        assert!(text.contains("-- cluster eu, host e1:5432\n"), "{text}");
        let json = serde_json::to_value(on("e1:5432", "eu")).unwrap();
        assert_eq!((json["host"].as_str(), json["cluster"].as_str(), json["check"].as_str()), (Some("e1:5432"), Some("eu"), Some("database_temp")));
    }

    #[test]
    fn fixes_are_printed_and_serialized_only_when_present() {
        let with = finding("signal_functions", "pg_catalog.pg_cancel_backend(integer)", "d")
            .with_fix("REVOKE EXECUTE ON FUNCTION pg_catalog.pg_cancel_backend(integer) FROM PUBLIC;\nSELECT 1;");
        let without = finding("setting_unused", "app.user_id", "d");
        let text = render(&[with.clone(), without.clone()]);
        assert!(text.contains("  fix: REVOKE EXECUTE ON FUNCTION pg_catalog.pg_cancel_backend(integer) FROM PUBLIC;\n"), "{text}");
        assert!(text.contains("  fix: SELECT 1;\n"), "{text}");
        assert_eq!(text.matches("fix:").count(), 2);
        let json = serde_json::to_value([with, without]).unwrap();
        assert!(json[0]["fix"].is_string());
        assert!(json[1].get("fix").is_none());
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
