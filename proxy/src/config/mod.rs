//! The configuration file (`pgtenant.toml`) and its `PGTENANT_*` environment overrides.
//!
//! Key names here are a public interface: they are documented in docs/configuration.md and must stay
//! stable. Unknown keys are rejected so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub mod cleartext;
pub mod routing;
pub mod tenancy;
pub use routing::ClusterConfig;
pub use tenancy::{AuditConfig, BypassConfig, LimitsConfig, TenantLimits};

/// A configuration problem, as one line naming the key, file or variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: cannot read {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("config: {0}")]
    Parse(String),
    #[error("config: {0}")]
    Invalid(String),
}

/// Scalar keys that `PGTENANT_<SECTION>_<KEY>` overrides, with their TOML type.
pub const ENV_KEYS: &[(&str, &str, EnvType)] = &[
    ("server", "listen", EnvType::Str),
    ("server", "tls_cert", EnvType::Str),
    ("server", "tls_key", EnvType::Str),
    ("server", "require_tls", EnvType::Bool),
    ("server", "max_message_bytes", EnvType::Int),
    ("server", "auth_timeout_ms", EnvType::Int),
    ("server", "max_clients", EnvType::Int),
    ("server", "shutdown_timeout_s", EnvType::Int),
    ("server", "max_session_state_bytes", EnvType::Int),
    ("server", "peer_id", EnvType::Int),
    ("server", "client_write_timeout_ms", EnvType::Int),
    ("server", "worker_threads", EnvType::Int),
    ("server", "so_reuseport", EnvType::Bool),
    ("server", "peer_listen", EnvType::Str),
    ("backend", "url", EnvType::Str),
    ("backend", "pool_size", EnvType::Int),
    ("backend", "tls", EnvType::Str),
    ("backend", "tls_ca_file", EnvType::Str),
    ("backend", "connect_timeout_ms", EnvType::Int),
    ("backend", "acquire_timeout_ms", EnvType::Int),
    ("backend", "idle_timeout_s", EnvType::Int),
    ("backend", "max_lifetime_s", EnvType::Int),
    ("backend", "replicas", EnvType::List),
    ("backend", "replica_pool_size", EnvType::Int),
    ("backend", "max_replica_lag_ms", EnvType::Int),
    ("jwt", "secret", EnvType::Str),
    ("jwt", "public_key_file", EnvType::Str),
    ("jwt", "jwks_file", EnvType::Str),
    ("jwt", "jwks_url", EnvType::Str),
    ("jwt", "jwks_ca_file", EnvType::Str),
    ("jwt", "jwks_refresh_s", EnvType::Int),
    ("jwt", "jwks_min_refresh_s", EnvType::Int),
    ("jwt", "issuer", EnvType::Str),
    ("jwt", "audience", EnvType::Str),
    ("jwt", "leeway_secs", EnvType::Int),
    ("tenant", "settings", EnvType::JsonTable),
    ("tenant", "claims_setting", EnvType::Str),
    ("tenant", "role_claim", EnvType::Str),
    ("tenant", "allowed_roles", EnvType::List),
    ("tenant", "protected_settings", EnvType::List),
    ("tenant", "allow_do", EnvType::Bool),
    ("tenant", "allowed_function_calls", EnvType::List),
    ("tenant", "signing_key", EnvType::Str),
    ("tenant", "signing_key_file", EnvType::Str),
    ("tenant", "signing_kid", EnvType::Str),
    ("tenant", "cluster_claim", EnvType::Str),
    ("pool", "prepared_statements_cache", EnvType::Int),
    ("pool", "mode", EnvType::Str),
    ("pool", "query_wait_timeout_ms", EnvType::Int),
    ("pool", "transaction_timeout_ms", EnvType::Int),
    ("pool", "idle_in_transaction_timeout_ms", EnvType::Int),
    ("admin", "listen", EnvType::Str),
    ("admin", "metrics_tenants", EnvType::List),
    ("admin", "metrics_top_tenants", EnvType::Int),
    ("admin", "token_claim", EnvType::Str),
    ("admin", "token_value", EnvType::Str),
    ("limits", "max_active_per_tenant", EnvType::Int),
    ("limits", "max_waiting_per_tenant", EnvType::Int),
    ("bypass", "enabled", EnvType::Bool),
    ("bypass", "url", EnvType::Str),
    ("bypass", "pool_size", EnvType::Int),
    ("bypass", "claim", EnvType::Str),
    ("bypass", "value", EnvType::Str),
    ("bypass.jwt", "secret", EnvType::Str),
    ("bypass.jwt", "public_key_file", EnvType::Str),
    ("bypass.jwt", "jwks_file", EnvType::Str),
    ("bypass.jwt", "jwks_url", EnvType::Str),
    ("bypass.jwt", "jwks_ca_file", EnvType::Str),
    ("bypass.jwt", "issuer", EnvType::Str),
    ("bypass.jwt", "audience", EnvType::Str),
    ("bypass.jwt", "leeway_secs", EnvType::Int),
    ("audit", "path", EnvType::Str),
    ("audit", "fsync", EnvType::Bool),
    ("audit", "write_timeout_ms", EnvType::Int),
    ("log", "level", EnvType::Str),
    ("log", "format", EnvType::Str),
];

/// Top-level tables that `PGTENANT_<TABLE>` replaces whole, given as a JSON object of strings.
pub const ENV_TABLES: &[&str] = &["peers"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvType {
    Str,
    Int,
    Bool,
    /// A JSON object of strings.
    JsonTable,
    /// Comma-separated strings.
    List,
}

/// The environment variable that overrides `section.key`.
pub fn env_name(section: &str, key: &str) -> String {
    format!("PGTENANT_{}_{}", section.replace('.', "_").to_uppercase(), key.to_uppercase())
}

fn env_value(var: &str, raw: &str, ty: EnvType) -> Result<toml::Value, ConfigError> {
    let bad = |what: &str| ConfigError::Invalid(format!("{var}: expected {what}"));
    Ok(match ty {
        EnvType::Str => toml::Value::String(raw.to_string()),
        EnvType::Int => toml::Value::Integer(raw.trim().parse().map_err(|_| bad("a whole number"))?),
        EnvType::Bool => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => toml::Value::Boolean(true),
            "false" | "0" | "no" | "off" => toml::Value::Boolean(false),
            _ => return Err(bad("true or false")),
        },
        EnvType::JsonTable => {
            let map: BTreeMap<String, String> =
                serde_json::from_str(raw).map_err(|_| bad("a JSON object of strings"))?;
            toml::Value::Table(map.into_iter().map(|(k, v)| (k, toml::Value::String(v))).collect())
        }
        EnvType::List => toml::Value::Array(
            raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| toml::Value::String(s.into())).collect(),
        ),
    })
}

impl Config {
    /// Milliseconds a transaction waits for a pooled connection (`pool.query_wait_timeout_ms`, or
    /// the older `backend.acquire_timeout_ms`).
    pub fn query_wait_timeout_ms(&self) -> u64 {
        self.pool.query_wait_timeout_ms.unwrap_or(self.backend.acquire_timeout_ms)
    }

    /// Reads `path`, applies `PGTENANT_*` overrides from the process environment, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| ConfigError::Read { path: path.display().to_string(), err })?;
        Self::from_toml(&text, &|k| std::env::var(k).ok())
            .map_err(|e| match e {
                ConfigError::Parse(m) => ConfigError::Parse(format!("{}: {m}", path.display())),
                other => other,
            })
    }

    /// Parses TOML text, applies overrides looked up with `env`, validates.
    pub fn from_toml(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Parse(e.message().to_string()))?;
        for (section, key, ty) in ENV_KEYS {
            let var = env_name(section, key);
            if let Some(raw) = env(&var) {
                let value = env_value(&var, &raw, *ty)?;
                // nested sections (`bypass.jwt`) are reached one table at a time
                let mut t = &mut table;
                for part in section.split('.') {
                    let sec = t.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    t = sec.as_table_mut().ok_or_else(|| ConfigError::Parse(format!("`{section}` must be a table")))?;
                }
                t.insert(key.to_string(), value);
            }
        }
        for name in ENV_TABLES {
            let var = format!("PGTENANT_{}", name.to_uppercase());
            if let Some(raw) = env(&var) {
                table.insert(name.to_string(), env_value(&var, &raw, EnvType::JsonTable)?);
            }
        }
        let cfg: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.message().to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if let Err(e) = crate::conninfo::parse(&self.backend.url) {
            return invalid(format!("backend.url {e}"));
        }
        if !(1..=10_000).contains(&self.backend.pool_size) {
            return invalid("backend.pool_size must be between 1 and 10000".into());
        }
        if self.jwt.secret.is_none()
            && self.jwt.public_key_file.is_none()
            && self.jwt.jwks_file.is_none()
            && self.jwt.jwks_url.is_none()
        {
            return invalid("jwt: no key configured (set jwt.secret, jwt.public_key_file, jwt.jwks_file or jwt.jwks_url)".into());
        }
        if let Some(url) = &self.jwt.jwks_url {
            if let Err(e) = crate::net::http_target::Target::parse(url) {
                return invalid(format!("jwt.jwks_url: {e}"));
            }
        }
        if self.jwt.jwks_refresh_s == Some(0) || self.jwt.jwks_min_refresh_s == Some(0) {
            return invalid("jwt.jwks_refresh_s and jwt.jwks_min_refresh_s must be at least 1".into());
        }
        if self.jwt.secret.as_deref() == Some("") {
            return invalid("jwt.secret is empty".into());
        }
        if self.tenant.settings.len() > MAX_TENANT_SETTINGS {
            return invalid(format!("tenant.settings: at most {MAX_TENANT_SETTINGS} settings"));
        }
        let mut seen = std::collections::BTreeSet::new();
        let claims = (!self.tenant.claims_setting.is_empty()).then_some(&self.tenant.claims_setting);
        for name in self.tenant.settings.keys().chain(claims) {
            if !valid_setting_name(name) {
                return invalid(format!(
                    "tenant.settings: invalid setting name `{name}` (custom settings need a dot, e.g. app.tenant_id)"
                ));
            }
            if !seen.insert(name) {
                return invalid(format!("tenant: setting `{name}` is configured twice"));
            }
        }
        for (name, path) in &self.tenant.settings {
            if path.is_empty() || path.split('.').any(str::is_empty) {
                return invalid(format!("tenant.settings.{name}: invalid claim path `{path}`"));
            }
        }
        self.tenant.signing_key_bytes()?;
        if self.tenant.role_claim.is_some() && self.tenant.allowed_roles.is_empty() {
            return invalid("tenant.role_claim needs tenant.allowed_roles".into());
        }
        if self.pool.prepared_statements_cache == 0 {
            return invalid("pool.prepared_statements_cache must be at least 1".into());
        }
        if let Err(e) = crate::logging::validate_level(&self.log.level) {
            return invalid(e);
        }
        if !matches!(self.log.format.as_str(), "human" | "json") {
            return invalid(format!("log.format must be \"human\" or \"json\", not \"{}\"", self.log.format));
        }
        if self.audit.write_timeout_ms == 0 {
            return invalid("audit.write_timeout_ms must be at least 1".into());
        }
        if self.server.client_write_timeout_ms == 0 {
            return invalid("server.client_write_timeout_ms must be at least 1".into());
        }
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            return invalid("server.tls_cert and server.tls_key go together".into());
        }
        if self.server.require_tls && self.server.tls_cert.is_none() {
            return invalid("server.require_tls needs server.tls_cert and server.tls_key".into());
        }
        match (&self.admin.token_claim, &self.admin.token_value) {
            (Some(c), Some(v)) if c.is_empty() || v.is_empty() || c.split('.').any(str::is_empty) => {
                return invalid("admin.token_claim and admin.token_value must not be empty".into())
            }
            (Some(_), None) | (None, Some(_)) => {
                return invalid("admin.token_claim and admin.token_value go together (both set turns the admin console on)".into())
            }
            _ => {}
        }
        self.bypass.validate(&self.audit).map_err(ConfigError::Invalid)?;
        routing::validate(self).map_err(ConfigError::Invalid)?;
        self.peer_map()?;
        if let Some(url) = self.bypass.jwt.jwks_url.as_ref().filter(|_| self.bypass.enabled) {
            if let Err(e) = crate::net::http_target::Target::parse(url) {
                return invalid(format!("bypass.jwt.jwks_url: {e}"));
            }
        }
        Ok(())
    }
}

/// Most `tenant.settings` entries: with the claims setting, the role and the client's startup
/// parameters they must leave room in the context statement (`session::settings::MAX_CONTEXT_SETTINGS`).
pub const MAX_TENANT_SETTINGS: usize = 32;

/// Custom setting names: `prefix.name`, letters, digits and underscores.
fn valid_setting_name(name: &str) -> bool {
    let ok_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
    let parts_ok = name.split('.').all(|p| !p.is_empty() && !p.as_bytes()[0].is_ascii_digit());
    ok_chars && name.contains('.') && parts_ok
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
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
    pub pool: PoolConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub bypass: BypassConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    /// The other pgtenant instances of a fleet: instance id (`server.peer_id`) → `host:port` of
    /// its client listener, where cancel requests for its sessions are forwarded.
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
    /// More Postgres clusters, each serving the tenants placed on it (`[[clusters]]`, see
    /// `routing`); `[backend]` is the cluster named "default".
    #[serde(default)]
    pub clusters: Vec<ClusterConfig>,
}

impl Config {
    /// `[peers]` by instance id, checked (ids in range, `host:port` addresses, `server.peer_id`
    /// set when there are peers); this instance's own entry is left out.
    pub fn peer_map(&self) -> Result<BTreeMap<u8, String>, ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let range = crate::fleet::PEER_IDS;
        let me = match self.server.peer_id {
            Some(id) if !range.contains(&id) => {
                return invalid(format!("server.peer_id must be between {} and {}", range.start(), range.end()))
            }
            Some(id) => Some(id as u8),
            None if !self.peers.is_empty() => return invalid("[peers] needs server.peer_id (this instance's id)".into()),
            None => None,
        };
        let mut peers = BTreeMap::new();
        for (id, addr) in &self.peers {
            let Some(n) = id.parse::<u32>().ok().filter(|n| range.contains(n)) else {
                return invalid(format!("peers: `{id}` is not an instance id ({} to {})", range.start(), range.end()));
            };
            let valid_addr = addr.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
            if !valid_addr {
                return invalid(format!("peers.{id}: `{addr}` is not host:port"));
            }
            if Some(n as u8) != me {
                peers.insert(n as u8, addr.clone());
            }
        }
        Ok(peers)
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin HTTP endpoint (/metrics, /healthz, /readyz, /pools); off when unset.
    pub listen: Option<String>,
    /// Tenant ids that get per-tenant Prometheus series (opt-in, so labels stay bounded).
    pub metrics_tenants: Vec<String>,
    /// Also export series for the N busiest tenants (0 = none).
    pub metrics_top_tenants: usize,
    /// The admin console (`dbname=pgtenant`): a token verified by the `[jwt]` keys whose claim
    /// `token_claim` (a dotted path) equals `token_value` (or is an array holding it) logs in to
    /// it. Both set, or the console is off.
    pub token_claim: Option<String>,
    pub token_value: Option<String>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Client statements kept prepared per backend connection (least recently used closed first).
    pub prepared_statements_cache: usize,
    /// "transaction" (default): a backend per transaction. "session": a backend per client session.
    pub mode: PoolMode,
    /// How long a transaction waits for a free backend connection before `ERROR 53300`; when
    /// unset, `backend.acquire_timeout_ms` (the older name) applies.
    pub query_wait_timeout_ms: Option<u64>,
    /// Longest a client may hold a backend for one transaction (0 = no limit); past it the client
    /// gets `FATAL 25P04` and the backend is closed (the server rolls the transaction back).
    pub transaction_timeout_ms: u64,
    /// Longest a client may sit idle inside an open transaction (0 = no limit); past it the client
    /// gets `FATAL 25P03` and the backend is closed.
    pub idle_in_transaction_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    #[default]
    Transaction,
    Session,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            prepared_statements_cache: 500,
            mode: PoolMode::Transaction,
            query_wait_timeout_ms: None,
            transaction_timeout_ms: 0,
            idle_in_transaction_timeout_ms: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
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
    /// Most client connections at once (logged in or logging in); more get FATAL 53300.
    pub max_clients: usize,
    /// On SIGTERM/SIGINT: how long transactions in flight may take to finish.
    pub shutdown_timeout_s: u64,
    /// Most bytes of prepared statements and session settings pgtenant keeps for one client;
    /// a Parse or SET past it gets `ERROR 54000`.
    pub max_session_state_bytes: usize,
    /// This instance's id in a fleet (1 to 127, unique per instance): carried in the cancel keys
    /// it issues, so any instance can forward a cancel request to this one (see `[peers]`).
    pub peer_id: Option<u32>,
    /// Longest a client may leave pgtenant's output to it unread (no write progress at all);
    /// past it the session ends and its backend is closed or released.
    pub client_write_timeout_ms: u64,
    /// Threads that run client sessions: 0 = one per CPU core (a work-stealing runtime); 1 = a
    /// single-threaded runtime, the cheapest per transaction when the proxy shares a few cores
    /// with the database or the application (no cross-thread wake-ups).
    pub worker_threads: usize,
    /// Bind `listen` with `SO_REUSEPORT`, so several pgtenant processes on one host share the
    /// port and the kernel spreads new connections over them (like PgBouncer's `so_reuseport`).
    pub so_reuseport: bool,
    /// A second client listener that only this instance binds: its address in `[peers]` when
    /// the instances share `listen` (`so_reuseport`), so a forwarded cancel reaches it.
    pub peer_listen: Option<String>,
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
            max_clients: 10_000,
            shutdown_timeout_s: 30,
            max_session_state_bytes: 16 * 1024 * 1024,
            peer_id: None,
            client_write_timeout_ms: 30_000,
            worker_threads: 0,
            so_reuseport: false,
            peer_listen: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BackendTls {
    #[default]
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
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
    /// Streaming standbys of `url`: read-only transactions run there (see `crate::routing`).
    #[serde(default, serialize_with = "routing::masked_urls")]
    pub replicas: Vec<String>,
    /// Connections per replica; `pool_size` when unset.
    #[serde(default)]
    pub replica_pool_size: Option<usize>,
    /// A replica further behind its primary than this (milliseconds of replay) gets no transactions.
    #[serde(default = "default_max_replica_lag_ms")]
    pub max_replica_lag_ms: u64,
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
fn default_max_replica_lag_ms() -> u64 {
    5_000
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// HMAC secret (HS256/384/512).
    pub secret: Option<String>,
    /// PEM public key (RS*/PS*/ES*/EdDSA).
    pub public_key_file: Option<PathBuf>,
    /// JWKS document on disk; keys selected by `kid`.
    pub jwks_file: Option<PathBuf>,
    /// JWKS document fetched over HTTPS (plain HTTP only from loopback), refreshed periodically.
    pub jwks_url: Option<String>,
    /// Extra CA certificates (PEM) trusted for `jwks_url`, besides the Mozilla roots.
    pub jwks_ca_file: Option<PathBuf>,
    /// Seconds between scheduled refreshes of `jwks_url` (default 300).
    pub jwks_refresh_s: Option<u64>,
    /// Least seconds between two fetches triggered by tokens with an unknown `kid` (default 10).
    pub jwks_min_refresh_s: Option<u64>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantConfig {
    /// Setting name -> claim path (dots for nesting).
    pub settings: BTreeMap<String, String>,
    /// Setting that receives the whole claims object as JSON; "" disables.
    pub claims_setting: String,
    /// Claim whose value becomes `SET LOCAL ROLE` (only for roles in `allowed_roles`).
    pub role_claim: Option<String>,
    pub allowed_roles: Vec<String>,
    /// More settings clients may not change (the `settings` names, `claims_setting`, `role` and
    /// `session_authorization` are always protected).
    pub protected_settings: Vec<String>,
    /// Allow `DO` blocks (their bodies are still checked). Off by default: dynamic SQL inside
    /// them could change the tenant context.
    pub allow_do: bool,
    /// Functions clients may call with the protocol's FunctionCall message (e.g. the large-object
    /// functions pgjdbc uses): names in `pg_catalog` or `schema.name`. Every other FunctionCall is
    /// refused (42501); `set_config` never resolves. Takes effect on restart.
    pub allowed_function_calls: Vec<String>,
    /// Key that signs the tenant context for the database to verify (see `crate::signing`): at
    /// least 32 bytes. Off when neither this nor `signing_key_file` is set.
    pub signing_key: Option<String>,
    /// File holding the signing key (its content, trailing newline removed).
    pub signing_key_file: Option<PathBuf>,
    /// Name of the signing key, as installed in the database (`pgtenant install-sql`).
    pub signing_kid: String,
    /// Claim naming the cluster (`[[clusters]]` name, or "default") a token's sessions run on;
    /// it takes precedence over the clusters' `tenants` lists.
    pub cluster_claim: Option<String>,
}

impl TenantConfig {
    /// The signing key's bytes, when signing is configured.
    pub fn signing_key_bytes(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let key = match (&self.signing_key, &self.signing_key_file) {
            (Some(_), Some(_)) => return Err(ConfigError::Invalid("tenant.signing_key and tenant.signing_key_file are exclusive".into())),
            (Some(k), None) => k.as_bytes().to_vec(),
            (None, Some(f)) => {
                let mut k = std::fs::read(f)
                    .map_err(|e| ConfigError::Invalid(format!("tenant.signing_key_file {}: {e}", f.display())))?;
                while k.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    k.pop();
                }
                k
            }
            (None, None) => return Ok(None),
        };
        if key.len() < 32 {
            return Err(ConfigError::Invalid(format!(
                "tenant.signing_key must be at least 32 bytes (got {}); generate one with `openssl rand -hex 32`",
                key.len()
            )));
        }
        let kid_ok = !self.signing_kid.is_empty()
            && self.signing_kid.len() <= 63
            && self.signing_kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
        if !kid_ok {
            return Err(ConfigError::Invalid("tenant.signing_kid: 1-63 letters, digits, '_', '-' or '.'".into()));
        }
        Ok(Some(key))
    }
}

impl Default for TenantConfig {
    fn default() -> Self {
        TenantConfig {
            settings: BTreeMap::new(),
            claims_setting: "request.jwt.claims".into(),
            role_claim: None,
            allowed_roles: Vec::new(),
            protected_settings: Vec::new(),
            allow_do: false,
            allowed_function_calls: Vec::new(),
            signing_key: None,
            signing_key_file: None,
            signing_kid: "k1".into(),
            cluster_claim: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[backend]\nurl = \"postgres://u:p@h/db\"\n[jwt]\nsecret = \"s\"\n";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn minimal_config_has_defaults() {
        let c = Config::from_toml(MIN, &no_env).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:6432");
        assert_eq!(c.backend.pool_size, 20);
        assert_eq!(c.tenant.claims_setting, "request.jwt.claims");
    }

    #[test]
    fn peers_are_checked_and_read_from_the_environment() {
        let fleet = format!("{MIN}[server]\npeer_id = 2\n[peers]\n1 = \"pgtenant-0.pgtenant:6432\"\n2 = \"me:6432\"\n");
        let c = Config::from_toml(&fleet, &no_env).unwrap();
        // its own entry is left out, so every instance can share one [peers] table
        assert_eq!(c.peer_map().unwrap(), BTreeMap::from([(1, "pgtenant-0.pgtenant:6432".to_string())]));
        let env = |k: &str| match k {
            "PGTENANT_SERVER_PEER_ID" => Some("3".to_string()),
            "PGTENANT_PEERS" => Some(r#"{"1": "a:1", "2": "b:2"}"#.to_string()),
            _ => None,
        };
        let c = Config::from_toml(MIN, &env).unwrap();
        assert_eq!((c.server.peer_id, c.peer_map().unwrap().len()), (Some(3), 2));
        for (bad, named) in [
            ("[peers]\n1 = \"a:1\"\n", "needs server.peer_id"),
            ("[server]\npeer_id = 128\n", "server.peer_id"),
            ("[server]\npeer_id = 1\n[peers]\n0 = \"a:1\"\n", "`0` is not an instance id"),
            ("[server]\npeer_id = 1\n[peers]\n2 = \"nohost\"\n", "peers.2"),
        ] {
            let e = Config::from_toml(&format!("{MIN}{bad}"), &no_env).unwrap_err();
            assert!(e.to_string().contains(named), "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::from_toml(&format!("{MIN}[server]\nlisen = \"x\"\n"), &no_env).unwrap_err();
        assert!(e.to_string().contains("lisen"), "{e}");
    }

    #[test]
    fn env_overrides_file() {
        let env = |k: &str| match k {
            "PGTENANT_BACKEND_URL" => Some("postgres://a:b@c:5433/other".to_string()),
            "PGTENANT_BACKEND_POOL_SIZE" => Some("7".to_string()),
            "PGTENANT_SERVER_REQUIRE_TLS" => Some("false".to_string()),
            "PGTENANT_TENANT_SETTINGS" => Some(r#"{"app.t": "tid"}"#.to_string()),
            "PGTENANT_TENANT_ALLOWED_ROLES" => Some("a, b".to_string()),
            _ => None,
        };
        let c = Config::from_toml("[jwt]\nsecret = \"s\"\n", &env).unwrap();
        assert_eq!(c.backend.url, "postgres://a:b@c:5433/other");
        assert_eq!(c.backend.pool_size, 7);
        assert_eq!(c.tenant.settings["app.t"], "tid");
        assert_eq!(c.tenant.allowed_roles, ["a", "b"]);
        let bad = |k: &str| (k == "PGTENANT_BACKEND_POOL_SIZE").then(|| "lots".to_string());
        assert!(Config::from_toml(MIN, &bad).unwrap_err().to_string().contains("PGTENANT_BACKEND_POOL_SIZE"));
    }

    #[test]
    fn validation_messages() {
        let cases = [
            ("[backend]\nurl = \"mysql://u@h/db\"\n[jwt]\nsecret = \"s\"", "postgres://"),
            ("[backend]\nurl = \"postgres://u@h/\"\n[jwt]\nsecret = \"s\"", "database"),
            ("[backend]\nurl = \"postgres://u@h/db\"", "no key"),
            (&format!("{MIN}[tenant]\nsettings = {{ tenant_id = \"t\" }}"), "need a dot"),
            (&format!("{MIN}[tenant]\nsettings = {{ \"app.t\" = \"a..b\" }}"), "claim path"),
            (&format!("{MIN}[tenant]\nrole_claim = \"role\""), "allowed_roles"),
            (&format!("{MIN}[log]\nformat = \"xml\""), "log.format"),
            (&format!("{MIN}[server]\nclient_write_timeout_ms = 0"), "client_write_timeout_ms"),
            (&format!("{MIN}[tenant]\nsettings = {{ {} }}", (0..33).map(|i| format!("\"app.s{i}\" = \"c{i}\"")).collect::<Vec<_>>().join(", ")), "at most 32"),
            (&format!("{MIN}[server]\nrequire_tls = true"), "require_tls"),
        ];
        for (text, needle) in cases {
            let e = Config::from_toml(text, &no_env).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn tenancy_sections() {
        let env = |k: &str| match k {
            "PGTENANT_BYPASS_JWT_SECRET" => Some("bypass-secret".to_string()),
            "PGTENANT_LIMITS_MAX_ACTIVE_PER_TENANT" => Some("3".to_string()),
            _ => None,
        };
        let text = format!(
            "{MIN}[limits.tenants.\"7\"]\nmax_active = 1\n[bypass]\nenabled = true\nurl = \"postgres://o:p@h/db\"\n[audit]\npath = \"-\"\n"
        );
        let c = Config::from_toml(&text, &env).unwrap();
        assert_eq!(c.bypass.jwt.secret.as_deref(), Some("bypass-secret"));
        assert_eq!(c.limits.for_tenant("7"), (Some(1), None));
        assert_eq!(c.limits.for_tenant("8"), (Some(3), None));
        assert_eq!(c.limits.key_for("7", false), "limits.tenants.\"7\".max_active");
        assert_eq!(c.limits.key_for("8", false), "limits.max_active_per_tenant");
        // bypass without audit, or without its own key, is refused
        let no_audit = text.replace("[audit]\npath = \"-\"\n", "");
        assert!(Config::from_toml(&no_audit, &env).unwrap_err().to_string().contains("audit.path"));
        assert!(Config::from_toml(&text, &no_env).unwrap_err().to_string().contains("bypass.jwt"));
        // disabled by default: the section alone changes nothing
        assert!(!Config::from_toml(MIN, &no_env).unwrap().bypass.enabled);
    }

    #[test]
    fn shipped_example_is_valid() {
        let text = include_str!("../../../config/pgtenant.toml");
        Config::from_toml(text, &no_env).unwrap();
    }
}
