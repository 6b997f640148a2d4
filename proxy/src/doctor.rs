//! `pgtenant doctor`: checks that the database really isolates tenants for the role pgtenant logs in
//! as. pgtenant only sets the context; RLS policies, ownership and privileges decide what a client can
//! read. Every finding is a way one tenant could see or change another tenant's data, or fail open.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::backend::query::{simple_query, Row};
use crate::backend::{connect, BackendTarget, ConnectError};
use crate::config::{BackendConfig, Config};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    /// Stable identifier of the check (documented in docs/doctor.md).
    pub check: &'static str,
    /// The object concerned (table, function, schema, setting...).
    pub object: String,
    pub detail: String,
}

fn finding(check: &'static str, object: impl Into<String>, detail: impl Into<String>) -> Finding {
    Finding { check, object: object.into(), detail: detail.into() }
}

/// SQL literal for a name we put into catalog queries.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";

/// Runs every check. Connects as `admin_url` when given (to see every object), else as the
/// restricted role itself; privileges are always evaluated for the restricted role.
pub async fn run(cfg: &Config, admin_url: Option<&str>) -> Result<Vec<Finding>, String> {
    let role_target = BackendTarget::from_config(&cfg.backend).map_err(|e| format!("backend.url: {e}"))?;
    let role = role_target.user.clone();
    let target = match admin_url {
        Some(url) => BackendTarget::from_config(&BackendConfig { url: url.to_string(), ..cfg.backend.clone() })
            .map_err(|e| format!("--admin-url: {e}"))?,
        None => role_target,
    };
    let mut conn = connect(&target).await.map_err(|e| format!("cannot connect as {}: {e}", target.describe()))?;
    let r = lit(&role);
    let mut out = Vec::new();
    let text = |row: &Row, i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let err = |e: ConnectError| e.to_string();

    let rows = simple_query(&mut conn, &format!("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = {r}")).await.map_err(err)?;
    let Some(row) = rows.first() else {
        return Err(format!("role {role} does not exist"));
    };
    if text(row, 0) == "t" {
        out.push(finding("role_superuser", &role, "the role is a superuser: RLS does not apply to it"));
    }
    if text(row, 1) == "t" {
        out.push(finding("role_bypassrls", &role, "the role has BYPASSRLS: RLS does not apply to it"));
    }
    for row in simple_query(&mut conn, &format!(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relowner = (SELECT oid FROM pg_roles WHERE rolname = {r}) AND c.relkind IN ('r','p','v','m') AND {USER_SCHEMAS} ORDER BY 1"
    ))
    .await
    .map_err(err)?
    {
        out.push(finding("role_owns_table", text(&row, 0), "owned by the restricted role: it can disable or drop the policies"));
    }
    for row in simple_query(&mut conn, &format!(
        "SELECT format('%I.%I', n.nspname, c.relname), c.relrowsecurity, c.relforcerowsecurity FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r','p') AND {USER_SCHEMAS} \
         AND has_table_privilege({r}, c.oid, 'SELECT') AND NOT (c.relrowsecurity AND c.relforcerowsecurity) ORDER BY 1"
    ))
    .await
    .map_err(err)?
    {
        let detail = if text(&row, 1) != "t" { "readable without row-level security enabled" } else { "row-level security is not FORCEd" };
        out.push(finding("table_without_rls", text(&row, 0), detail));
    }
    for row in simple_query(&mut conn, &format!(
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
    let policies = simple_query(&mut conn, "SELECT format('%I.%I', schemaname, tablename), policyname, coalesce(qual, '') || ' ' || coalesce(with_check, '') FROM pg_policies ORDER BY 1, 2")
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
    for row in simple_query(&mut conn, &format!(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE p.prosecdef AND {USER_SCHEMAS} AND has_function_privilege({r}, p.oid, 'EXECUTE') ORDER BY 1"
    ))
    .await
    .map_err(err)?
    {
        out.push(finding("security_definer_function", text(&row, 0), "SECURITY DEFINER function the role can run: it runs with its owner's rights"));
    }
    for row in simple_query(&mut conn, &format!(
        "SELECT n.nspname FROM pg_namespace n WHERE {USER_SCHEMAS} AND has_schema_privilege({r}, n.oid, 'CREATE') ORDER BY 1"
    ))
    .await
    .map_err(err)?
    {
        out.push(finding("schema_create", text(&row, 0), "the role may create objects here (functions, views) that could bypass policies"));
    }
    let temp = simple_query(&mut conn, &format!("SELECT has_database_privilege({r}, current_database(), 'TEMP')")).await.map_err(err)?;
    if temp.first().map(|row| text(row, 0)) == Some("t".into()) {
        out.push(finding("database_temp", "current database", "the role may create temporary tables and functions"));
    }
    for row in simple_query(&mut conn, &format!(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relname IN ('pg_stat_activity', 'pg_stat_statements') AND has_table_privilege({r}, c.oid, 'SELECT') ORDER BY 1"
    ))
    .await
    .map_err(err)?
    {
        out.push(finding(
            "query_text_visible",
            text(&row, 0),
            "every client shares the role, so one tenant can read other tenants' query text here",
        ));
    }
    Ok(out)
}

/// Human-readable report.
pub fn render(findings: &[Finding]) -> String {
    if findings.is_empty() {
        return "pgtenant doctor: no findings\n".into();
    }
    let w1 = findings.iter().map(|f| f.check.len()).max().unwrap_or(5).max(5);
    let w2 = findings.iter().map(|f| f.object.len()).max().unwrap_or(6).max(6);
    let mut s = format!("{:w1$}  {:w2$}  {}\n", "CHECK", "OBJECT", "DETAIL");
    for f in findings {
        s.push_str(&format!("{:w1$}  {:w2$}  {}\n", f.check, f.object, f.detail));
    }
    s.push_str(&format!("\n{} finding(s); see docs/doctor.md for how to fix each\n", findings.len()));
    s
}
