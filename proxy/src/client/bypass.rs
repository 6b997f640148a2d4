//! The trusted bypass login: which tokens may use the bypass pool (`[bypass]`).
//!
//! A token reaches the bypass pool only if it verifies against `[bypass.jwt]` (a key of its own)
//! AND carries `bypass.claim = bypass.value`. A token signed by the ordinary key that carries the
//! bypass claim is refused outright: it is either a misconfigured issuer or an attempt, and either
//! way it must not quietly become an ordinary tenant session. Bypass sessions get no tenant
//! settings; `tenant.claims_setting` (when set) still carries the claims, so triggers on the
//! database side can see which worker acted.

use serde_json::{Map, Value};

use crate::config::{BypassConfig, ConfigError, TenantConfig};
use crate::jwt::JwtVerifier;
use crate::tenant::{lookup, render, split_path, TenantContext};

/// The tenant key of every bypass session (a NUL: no tenant id can collide with it).
pub const BYPASS_TENANT: &str = "\0bypass";

pub struct BypassAuth {
    pub verifier: JwtVerifier,
    claim: Vec<String>,
    value: String,
    claims_setting: Option<String>,
}

impl BypassAuth {
    /// `None` when bypass is disabled; `previous` lends its fetched JWKS cache.
    pub fn from_config(cfg: &BypassConfig, tenant: &TenantConfig, previous: Option<&BypassAuth>) -> Result<Option<BypassAuth>, ConfigError> {
        if !cfg.enabled {
            return Ok(None);
        }
        Ok(Some(BypassAuth {
            verifier: JwtVerifier::from_config_reusing(&cfg.jwt, previous.map(|p| &p.verifier))?,
            claim: split_path(&cfg.claim),
            value: cfg.value.clone(),
            claims_setting: (!tenant.claims_setting.is_empty()).then(|| tenant.claims_setting.clone()),
        }))
    }

    /// The token's claims carry the bypass claim (whoever signed them).
    pub fn claims_bypass(&self, claims: &Map<String, Value>) -> bool {
        lookup(claims, &self.claim).is_some_and(|v| render(v) == self.value)
    }

    /// Verified bypass claims, if `token` is a bypass token; anything else is `None` (and goes
    /// through the ordinary login).
    pub async fn verify(&self, token: &str) -> Option<Map<String, Value>> {
        self.verifier.verify_fresh(token).await.ok().filter(|c| self.claims_bypass(c))
    }

    /// Setting names and context of a bypass session.
    pub fn context(&self, claims: &Map<String, Value>) -> (Vec<String>, TenantContext) {
        let names: Vec<String> = self.claims_setting.iter().cloned().collect();
        let values = names.iter().map(|_| Value::Object(claims.clone()).to_string()).collect();
        let subject = claims.get("sub").map(|v| render(v).chars().take(64).collect());
        (names, TenantContext { values, tenant: BYPASS_TENANT.into(), subject, cluster: None })
    }
}
