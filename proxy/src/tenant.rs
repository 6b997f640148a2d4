//! From verified claims to the tenant context: the list of setting values pgtenant applies at the
//! start of every transaction of the client's session.
//!
//! `TenantMapping` is compiled once from `[tenant]`; `context()` runs once per login. Values are
//! passed through byte for byte (they travel as bind parameters, never as SQL text).

use serde_json::{Map, Value};

use crate::config::{ConfigError, TenantConfig};

#[derive(Debug, Clone)]
pub struct TenantMapping {
    names: Vec<String>,
    /// Claim path per entry of `settings` (split on dots).
    paths: Vec<Vec<String>>,
    claims_setting: bool,
    role_claim: Option<Vec<String>>,
    allowed_roles: Vec<String>,
    /// `tenant.cluster_claim`, split on dots.
    cluster_claim: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct TenantContext {
    /// One value per `TenantMapping::setting_names()` entry.
    pub values: Vec<String>,
    /// Short label for logs: the value of the first configured setting.
    pub tenant: String,
    /// The `sub` claim, for logs.
    pub subject: Option<String>,
    /// The cluster the token names (`tenant.cluster_claim`), if it names one.
    pub cluster: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("token has no claim `{0}`")]
    MissingClaim(String),
    #[error("role `{0}` is not in tenant.allowed_roles")]
    RoleNotAllowed(String),
    #[error("claim `{0}` contains a NUL character")]
    InvalidValue(String),
}

pub(crate) fn split_path(p: &str) -> Vec<String> {
    p.split('.').map(str::to_string).collect()
}

pub(crate) fn lookup<'a>(claims: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut v = claims.get(first)?;
    for seg in rest {
        v = v.as_object()?.get(seg)?;
    }
    Some(v)
}

/// Renders a claim as setting text: strings as they are, everything else as compact JSON.
pub(crate) fn render(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

impl TenantMapping {
    pub fn from_config(cfg: &TenantConfig) -> Result<TenantMapping, ConfigError> {
        let mut names = Vec::new();
        let mut paths = Vec::new();
        for (name, path) in &cfg.settings {
            names.push(name.clone());
            paths.push(split_path(path));
        }
        let claims_setting = !cfg.claims_setting.is_empty();
        if claims_setting {
            names.push(cfg.claims_setting.clone());
        }
        let role_claim = cfg.role_claim.as_deref().map(split_path);
        if role_claim.is_some() {
            if cfg.allowed_roles.is_empty() {
                return Err(ConfigError::Invalid("tenant.role_claim needs tenant.allowed_roles".into()));
            }
            names.push("role".into());
        }
        let cluster_claim = cfg.cluster_claim.as_deref().map(split_path);
        Ok(TenantMapping { names, paths, claims_setting, role_claim, allowed_roles: cfg.allowed_roles.clone(), cluster_claim })
    }

    /// Setting names in the order their values appear in `TenantContext::values`: the `settings`
    /// map (sorted by name), then `claims_setting`, then `role`.
    pub fn setting_names(&self) -> &[String] {
        &self.names
    }

    pub fn context(&self, claims: &Map<String, Value>) -> Result<TenantContext, ContextError> {
        let mut values = Vec::with_capacity(self.names.len());
        for path in &self.paths {
            let v = lookup(claims, path).filter(|v| !v.is_null()).ok_or_else(|| ContextError::MissingClaim(path.join(".")))?;
            let text = render(v);
            if text.contains('\0') {
                return Err(ContextError::InvalidValue(path.join(".")));
            }
            values.push(text);
        }
        if self.claims_setting {
            // JSON escapes NUL as \u0000, so the document itself never holds one
            values.push(Value::Object(claims.clone()).to_string());
        }
        if let Some(path) = &self.role_claim {
            let role = lookup(claims, path).and_then(Value::as_str).unwrap_or("<missing>");
            if !self.allowed_roles.iter().any(|r| r == role) {
                return Err(ContextError::RoleNotAllowed(truncate(role, 64)));
            }
            values.push(role.to_string());
        }
        Ok(TenantContext {
            tenant: values.first().map(|v| truncate(v, 64)).unwrap_or_default(),
            subject: claims.get("sub").map(|v| truncate(&render(v), 64)),
            cluster: self.cluster_claim.as_ref().and_then(|p| lookup(claims, p)).filter(|v| !v.is_null()).map(render),
            values,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mapping(settings: &[(&str, &str)], role: Option<&str>, allowed: &[&str]) -> TenantMapping {
        let cfg = TenantConfig {
            settings: settings.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            claims_setting: "request.jwt.claims".into(),
            role_claim: role.map(str::to_string),
            allowed_roles: allowed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        TenantMapping::from_config(&cfg).unwrap()
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn renders_every_json_type_and_nesting() {
        let m = mapping(&[("app.a", "n"), ("app.b", "s"), ("app.c", "b"), ("app.d", "o.id"), ("app.e", "arr")], None, &[]);
        let claims = obj(json!({"n": 42, "s": "x'\"\\$$\nü", "b": true, "o": {"id": {"k": [1]}}, "arr": [1, "a"]}));
        let c = m.context(&claims).unwrap();
        assert_eq!(m.setting_names()[..5], ["app.a", "app.b", "app.c", "app.d", "app.e"]);
        assert_eq!(c.values[..5], ["42", "x'\"\\$$\nü", "true", r#"{"k":[1]}"#, r#"[1,"a"]"#]);
        assert_eq!(serde_json::from_str::<Value>(&c.values[5]).unwrap(), Value::Object(claims));
        assert_eq!(c.tenant, "42");
    }

    #[test]
    fn missing_null_and_nul_claims_refused() {
        let m = mapping(&[("app.t", "org.id")], None, &[]);
        assert_eq!(m.context(&obj(json!({"org": {}}))).unwrap_err(), ContextError::MissingClaim("org.id".into()));
        assert_eq!(m.context(&obj(json!({"org": {"id": null}}))).unwrap_err(), ContextError::MissingClaim("org.id".into()));
        assert_eq!(m.context(&obj(json!({"org": "x"}))).unwrap_err(), ContextError::MissingClaim("org.id".into()));
        assert_eq!(m.context(&obj(json!({"org": {"id": "a\u{0}b"}}))).unwrap_err(), ContextError::InvalidValue("org.id".into()));
    }

    #[test]
    fn role_claim_only_for_allowed_roles() {
        let m = mapping(&[("app.t", "t")], Some("role"), &["authenticated"]);
        let c = m.context(&obj(json!({"t": 1, "role": "authenticated"}))).unwrap();
        assert_eq!(m.setting_names().last().unwrap(), "role");
        assert_eq!(c.values.last().unwrap(), "authenticated");
        assert_eq!(m.context(&obj(json!({"t": 1, "role": "postgres"}))).unwrap_err(), ContextError::RoleNotAllowed("postgres".into()));
        assert!(m.context(&obj(json!({"t": 1}))).is_err());
    }
}
