//! `SHOW CONFIG`: the config in force, one row per key (`section.key`, as docs/configuration.md
//! names it), with every secret masked.
//!
//! Masked: any key named `secret`, `signing_key` or containing `password`, and the password part of
//! any URL (`backend.url`, `bypass.url`, a `jwks_url` with credentials). A secret read from a file
//! shows only its path. Tables that are values rather than sections (`tenant.settings`,
//! `limits.tenants`) are shown as JSON; `[peers]` one row per peer.

use serde_json::Value;

use super::show::Table;
use crate::config::Config;

const MASK: &str = "********";

/// The rows of `SHOW CONFIG` for `config`.
pub fn config(config: &Config) -> Table {
    let mut rows = Vec::new();
    if let Ok(Value::Object(sections)) = serde_json::to_value(config) {
        for (section, value) in sections {
            flatten(&section, value, &mut rows);
        }
    }
    rows.sort();
    Table {
        columns: vec![("key", 25), ("value", 25)],
        rows: rows.into_iter().map(|(k, v)| vec![Some(k), v]).collect(),
    }
}

/// A section's keys go in as `path.key`; a sub-table is a section when the environment overrides
/// name it as one (`bypass.jwt`), else it is a value.
fn flatten(path: &str, value: Value, rows: &mut Vec<(String, Option<String>)>) {
    match value {
        Value::Object(keys) if !path.contains('.') || is_section(path) => {
            for (key, v) in keys {
                flatten(&format!("{path}.{key}"), v, rows);
            }
        }
        v => {
            let key = path.rsplit('.').next().unwrap_or(path);
            rows.push((path.to_string(), shown(key, v)));
        }
    }
}

fn is_section(path: &str) -> bool {
    crate::config::ENV_KEYS.iter().any(|(section, _, _)| *section == path)
}

fn shown(key: &str, value: Value) -> Option<String> {
    match value {
        Value::Null => None,
        _ if key == "secret" || key == "signing_key" || key.contains("password") => Some(MASK.into()),
        Value::String(s) => Some(without_password(&s)),
        other => Some(other.to_string()),
    }
}

/// `s` with the password of a connection string masked, in every form `backend.url` takes
/// (URL, several hosts, `key=value`; anything else unchanged).
fn without_password(s: &str) -> String {
    crate::config::routing::mask_password(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_and_keys_flattened() {
        let text = r#"
[backend]
url = "postgres://app_user:pw-do-not-show@db:5432/app"
[jwt]
secret = "jwt-secret-do-not-show"
[tenant]
settings = { "app.tenant_id" = "tenant_id" }
signing_key = "c2lnbmluZy1rZXktZG8tbm90LXNob3ctMDEyMzQ1Njc="
[bypass]
enabled = true
url = "postgres://worker:bypass-pw-do-not-show@db/app"
[bypass.jwt]
secret = "bypass-secret-do-not-show"
[audit]
path = "/tmp/audit.log"
"#;
        let cfg = Config::from_toml(text, &|_| None).unwrap();
        let table = config(&cfg);
        let all: String = table.rows.iter().flatten().flatten().cloned().collect::<Vec<_>>().join("\n");
        assert!(!all.contains("do-not-show") && !all.contains("c2lnbmluZy1rZXkt"), "{all}");
        let value = |k: &str| table.rows.iter().find(|r| r[0].as_deref() == Some(k)).map(|r| r[1].clone());
        assert_eq!(value("backend.url"), Some(Some("postgres://app_user:********@db:5432/app".into())));
        assert_eq!(value("jwt.secret"), Some(Some(MASK.into())));
        assert_eq!(value("bypass.jwt.secret"), Some(Some(MASK.into())));
        assert_eq!(value("backend.pool_size"), Some(Some("20".into())));
        assert_eq!(value("tenant.settings"), Some(Some(r#"{"app.tenant_id":"tenant_id"}"#.into())));
        assert_eq!(value("jwt.public_key_file"), Some(None));
        // the other forms of backend.url
        for url in ["postgres://app_user:pw-do-not-show@h1:5432,h2:5433/app", "host=h1,h2 user=app_user password='pw do-not-show' dbname=app"] {
            let cfg = Config::from_toml(&text.replace("postgres://app_user:pw-do-not-show@db:5432/app", url), &|_| None).unwrap();
            let all: String = config(&cfg).rows.iter().flatten().flatten().cloned().collect::<Vec<_>>().join("\n");
            assert!(!all.contains("do-not-show"), "{all}");
        }
    }
}
