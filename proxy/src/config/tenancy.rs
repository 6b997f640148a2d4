//! The multi-tenant traffic sections of the config: `[limits]` (per-tenant quotas on the shared
//! pool), `[bypass]` (the trusted, audited path for internal workers) and `[audit]`.
//!
//! They live apart from the core keys because they are about tenants sharing one proxy, not about
//! reaching the database; docs/tenancy.md explains them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{BackendConfig, JwtConfig};

/// `[limits]`: how much of the shared pool one tenant may hold and queue for.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Transactions of one tenant holding a pooled connection at once; 0 = no limit.
    pub max_active_per_tenant: usize,
    /// Transactions of one tenant queued for a connection; 0 = no limit.
    pub max_waiting_per_tenant: usize,
    /// Overrides by tenant id (the value of the first `[tenant] settings` entry).
    pub tenants: BTreeMap<String, TenantLimits>,
}

/// `[limits.tenants."<id>"]`: one tenant's own limits; an omitted key keeps the default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    pub max_active: Option<usize>,
    pub max_waiting: Option<usize>,
}

/// `[bypass]`: a second pool, logged in as a role that bypasses row-level security, reachable only
/// with tokens signed by `[bypass.jwt]` that carry `claim = value`. Off unless `enabled = true`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BypassConfig {
    pub enabled: bool,
    /// `postgres://…` of the owner or a BYPASSRLS role.
    pub url: String,
    pub pool_size: usize,
    /// Claim path (dots for nesting) a bypass token must carry…
    pub claim: String,
    /// …with exactly this value.
    pub value: String,
    /// The key(s) bypass tokens are signed with (same keys as `[jwt]`).
    pub jwt: JwtConfig,
}

impl Default for BypassConfig {
    fn default() -> Self {
        BypassConfig {
            enabled: false,
            url: String::new(),
            pool_size: 2,
            claim: "role".into(),
            value: "service".into(),
            jwt: JwtConfig::default(),
        }
    }
}

/// `[audit]`: where the audit log (JSON lines) goes, and how durably.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// File appended to, or "-" for standard output; no audit log when unset.
    pub path: Option<PathBuf>,
    /// Flush each record to the disk (`fdatasync`) before acknowledging it.
    pub fsync: bool,
    /// Longest a session waits for its record to be written; a bypass statement or login whose
    /// record is not written by then is refused (`58030`).
    pub write_timeout_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { path: None, fsync: false, write_timeout_ms: 5_000 }
    }
}

impl BypassConfig {
    /// The bypass pool's backend: `[backend]` (TLS, timeouts, lifetimes) with `bypass.url`.
    pub fn backend(&self, base: &BackendConfig) -> BackendConfig {
        BackendConfig { url: self.url.clone(), pool_size: self.pool_size, ..base.clone() }
    }

    /// Checks the section when it is enabled; `audit` must be on then.
    pub fn validate(&self, audit: &AuditConfig) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        // the same forms as backend.url, several hosts included
        crate::conninfo::parse(&self.url).map_err(|e| format!("bypass.url {e}"))?;
        if !(1..=1_000).contains(&self.pool_size) {
            return Err("bypass.pool_size must be between 1 and 1000".into());
        }
        if self.claim.is_empty() || self.claim.split('.').any(str::is_empty) || self.value.is_empty() {
            return Err("bypass.claim and bypass.value must both be set (e.g. claim = \"role\", value = \"service\")".into());
        }
        let j = &self.jwt;
        if j.secret.is_none() && j.public_key_file.is_none() && j.jwks_file.is_none() && j.jwks_url.is_none() {
            return Err("bypass.jwt: no key configured (set bypass.jwt.secret, public_key_file, jwks_file or jwks_url)".into());
        }
        if audit.path.is_none() {
            return Err("bypass.enabled needs audit.path: every bypass login and statement is audited".into());
        }
        Ok(())
    }
}

impl LimitsConfig {
    /// (max active, max waiting) for `tenant`; `None` means no limit.
    pub fn for_tenant(&self, tenant: &str) -> (Option<usize>, Option<usize>) {
        let o = self.tenants.get(tenant);
        let pick = |own: Option<usize>, default: usize| {
            let v = own.unwrap_or(default);
            (v > 0).then_some(v)
        };
        (
            pick(o.and_then(|o| o.max_active), self.max_active_per_tenant),
            pick(o.and_then(|o| o.max_waiting), self.max_waiting_per_tenant),
        )
    }

    /// The config key that set `tenant`'s active (`waiting = false`) or waiting limit, for errors.
    pub fn key_for(&self, tenant: &str, waiting: bool) -> String {
        let o = self.tenants.get(tenant);
        let own = o.and_then(|o| if waiting { o.max_waiting } else { o.max_active });
        match (own, waiting) {
            (Some(_), true) => format!("limits.tenants.\"{tenant}\".max_waiting"),
            (Some(_), false) => format!("limits.tenants.\"{tenant}\".max_active"),
            (None, true) => "limits.max_waiting_per_tenant".into(),
            (None, false) => "limits.max_active_per_tenant".into(),
        }
    }
}
