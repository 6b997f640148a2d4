//! The startup parameters a client asks for (`application_name`, `TimeZone`, `DateStyle`,
//! `options=-c name=value`, …). Backends are shared, so these are never set on a backend
//! connection: they are applied inside each of the client's transactions by the same
//! `set_config(name, value, true)` statement that carries the tenant context.

use std::collections::{HashMap, HashSet};

use crate::error::{sqlstate, PgError};
use crate::guard::Guard;
use crate::protocol::options::option_pairs;

/// Most distinct settings a startup packet may ask for (they ride in every transaction's context
/// statement, whose size `session::settings::MAX_CONTEXT_SETTINGS` bounds).
pub const MAX_STARTUP_SETTINGS: usize = 64;

/// Startup keys that are not settings.
const NOT_SETTINGS: [&str; 5] = ["user", "database", "options", "replication", crate::routing::intent::TARGET_SESSION_ATTRS];

#[derive(Debug, Default, Clone)]
pub struct ClientParams {
    pub names: Vec<String>,
    pub values: Vec<String>,
}

/// The parameters the client asks for, in the order Postgres applies them: the `options` switches
/// first, then the packet's own keys (which therefore win). Unknown setting names are refused as
/// Postgres refuses them at startup (FATAL 42704); protected ones by the guard (FATAL 42501).
/// Values are checked and spelled by the server afterwards (`greeting`).
pub fn from_startup(
    startup: &HashMap<String, String>,
    known: &HashSet<String>,
    guard: &Guard,
) -> Result<Vec<(String, String)>, PgError> {
    let mut keys: Vec<(String, String)> = startup
        .iter()
        .filter(|(k, _)| !NOT_SETTINGS.contains(&k.as_str()) && !k.starts_with("_pq_."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    keys.sort();
    let mut pairs = startup.get("options").map(|o| option_pairs(o)).unwrap_or_default();
    // read by pgtenant for routing (`crate::routing::intent`), not a server setting
    pairs.retain(|(k, _)| !k.eq_ignore_ascii_case(crate::routing::intent::TARGET_SESSION_ATTRS));
    pairs.extend(keys);
    // setting names compare with ASCII letters folded only, as on the server
    let distinct: HashSet<String> = pairs.iter().map(|(n, _)| n.to_ascii_lowercase()).collect();
    if distinct.len() > MAX_STARTUP_SETTINGS {
        return Err(PgError::fatal(
            sqlstate::PROGRAM_LIMIT_EXCEEDED,
            format!("pgtenant: too many startup parameters ({}; limit {MAX_STARTUP_SETTINGS})", distinct.len()),
        ));
    }
    for (name, value) in &pairs {
        let lower = name.to_ascii_lowercase();
        guard.check_startup_setting(&lower, value).map_err(|e| PgError { severity: crate::error::Severity::Fatal, ..e })?;
        if !known.contains(&lower) && !lower.contains('.') {
            return Err(PgError::fatal("42704", format!("unrecognized configuration parameter \"{name}\"")));
        }
        if value.contains('\0') {
            return Err(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "startup parameter value contains a NUL byte"));
        }
    }
    Ok(pairs)
}

impl ClientParams {
    /// The last value given for each name (any case), in order of first appearance.
    pub fn last_values(pairs: impl IntoIterator<Item = (String, String)>) -> ClientParams {
        let mut out = ClientParams::default();
        for (name, value) in pairs {
            if let Some(i) = out.names.iter().position(|n| n.eq_ignore_ascii_case(&name)) {
                out.values[i] = value;
            } else {
                out.names.push(name);
                out.values.push(value);
            }
        }
        out
    }

    /// The value for `name` (any case).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.names.iter().position(|n| n.eq_ignore_ascii_case(name)).map(|i| self.values[i].as_str())
    }

    /// Keeps only the parameters for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &str) -> bool) {
        let mut i = 0;
        while i < self.names.len() {
            if keep(&self.names[i], &self.values[i]) {
                i += 1;
            } else {
                self.names.remove(i);
                self.values.remove(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TenantConfig;

    #[test]
    fn collects_known_parameters_and_options() {
        let mut cfg = TenantConfig::default();
        cfg.settings.insert("app.tenant_id".into(), "tenant_id".into());
        let guard = Guard::from_config(&cfg);
        let known: HashSet<String> = ["application_name", "timezone", "client_encoding", "statement_timeout"].iter().map(|s| s.to_string()).collect();
        let startup: HashMap<String, String> = [
            ("user", "alice"),
            ("database", "app"),
            ("application_name", "shop"),
            ("TimeZone", "Asia/Tokyo"),
            ("client_encoding", "UTF8"),
            ("options", "-c statement_timeout=1234 --app.theme=dark -c TimeZone=UTC"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let pairs = from_startup(&startup, &known, &guard).unwrap();
        let names: Vec<&str> = pairs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["statement_timeout", "app.theme", "TimeZone", "TimeZone", "application_name", "client_encoding"]);
        // the packet's own key is applied after `options`, so it wins
        let mut p = ClientParams::last_values(pairs);
        assert_eq!(p.names, ["statement_timeout", "app.theme", "TimeZone", "application_name", "client_encoding"]);
        assert_eq!(p.get("timezone"), Some("Asia/Tokyo"));
        p.retain(|n, v| !(n == "client_encoding" && v == "UTF8"));
        assert_eq!(p.values, ["1234", "dark", "Asia/Tokyo", "shop"]);
        let bad: HashMap<String, String> = [("nonsense", "1")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(from_startup(&bad, &known, &guard).unwrap_err().code, "42704");
        let prot: HashMap<String, String> = [("app.tenant_id", "2")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(from_startup(&prot, &known, &guard).unwrap_err().code, "42501");
        // more distinct settings than the context statement has room for: FATAL 54000
        let many = |n: usize| -> HashMap<String, String> { (0..n).map(|i| (format!("my.p{i}"), "v".to_string())).collect() };
        assert!(from_startup(&many(MAX_STARTUP_SETTINGS), &known, &guard).is_ok());
        let e = from_startup(&many(MAX_STARTUP_SETTINGS + 1), &known, &guard).unwrap_err();
        assert!(e.code == "54000" && matches!(e.severity, crate::error::Severity::Fatal), "{e:?}");
    }
}
