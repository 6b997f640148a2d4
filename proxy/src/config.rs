//! The configuration file (`pgtenant.toml`) and its `PGTENANT_*` environment overrides.
//!
//! Key names here are a public interface: they are documented in docs/configuration.md and must stay
//! stable. Unknown keys are rejected so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub backend: BackendConfig,
    #[serde(default)]
    pub jwt: JwtConfig,
    #[serde(default)]
    pub tenant: TenantConfig,
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the proxy listens on.
    pub listen: String,
    /// PEM certificate chain; when set (with `tls_key`), SSLRequest is accepted.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Refuse plaintext clients (FATAL 28000).
    pub require_tls: bool,
    /// Largest client message accepted (bytes); larger ones get FATAL 54000.
    pub max_message_bytes: usize,
    /// Time a client has from connect to finishing authentication.
    pub auth_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:6432".into(),
            tls_cert: None,
            tls_key: None,
            require_tls: false,
            max_message_bytes: 64 * 1024 * 1024,
            auth_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BackendTls {
    #[default]
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `postgres://user:password@host:port/dbname` of the restricted role.
    /// A Unix socket directory may be given as `?host=/path/to/dir`.
    pub url: String,
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    #[serde(default)]
    pub tls: BackendTls,
    /// Extra CA bundle (PEM) for `tls = "verify-full"`; the Mozilla roots are used otherwise.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_acquire_timeout_ms")]
    pub acquire_timeout_ms: u64,
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
    #[serde(default = "default_max_lifetime_s")]
    pub max_lifetime_s: u64,
}

fn default_pool_size() -> usize {
    20
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_acquire_timeout_ms() -> u64 {
    5_000
}
fn default_idle_timeout_s() -> u64 {
    300
}
fn default_max_lifetime_s() -> u64 {
    3600
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// HMAC secret (HS256/384/512).
    pub secret: Option<String>,
    /// PEM public key (RS*/PS*/ES*/EdDSA).
    pub public_key_file: Option<PathBuf>,
    /// JWKS document on disk; keys selected by `kid`.
    pub jwks_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantConfig {
    /// Setting name -> claim path (dots for nesting).
    pub settings: BTreeMap<String, String>,
    /// Setting that receives the whole claims object as JSON; "" disables.
    pub claims_setting: String,
    /// Claim whose value becomes `SET LOCAL ROLE` (only for roles in `allowed_roles`).
    pub role_claim: Option<String>,
    pub allowed_roles: Vec<String>,
}

impl Default for TenantConfig {
    fn default() -> Self {
        TenantConfig {
            settings: BTreeMap::new(),
            claims_setting: "request.jwt.claims".into(),
            role_claim: None,
            allowed_roles: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// tracing filter, e.g. "info" or "pgtenant=debug".
    pub level: String,
    /// "human" or "json".
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: "human".into() }
    }
}
