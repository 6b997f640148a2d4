//! Why the proxy could not start (`StartError`) or a new config was not applied (`ReloadError`).
//! Typed so callers can tell the cases apart; the texts are the ones users see in the CLI output
//! and the log, so they stay as they were when these were plain strings.

use crate::config::ConfigError;

/// `server::start` / `start_from` / `Proxy::new` failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A config value that cannot be put in force (JWT keys, tenant mapping, bypass rules,
    /// signing key).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `backend.url` or `bypass.url` is not a usable Postgres URL.
    #[error("{key}: {error}")]
    BackendUrl { key: &'static str, error: String },
    /// `server.tls_cert` / `server.tls_key` cannot be loaded.
    #[error("{0}")]
    Tls(String),
    /// `audit.path` cannot be opened.
    #[error("{0}")]
    AuditLog(String),
    /// `server.listen` cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    /// `server.peer_listen` cannot be bound.
    #[error("cannot listen on {addr} (server.peer_listen): {source}")]
    PeerListen { addr: String, source: std::io::Error },
    /// `admin.listen` cannot be bound.
    #[error("cannot listen on {addr} (admin.listen): {source}")]
    AdminListen { addr: String, source: std::io::Error },
    /// A bound socket has no local address.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// `Proxy::reload` / `reload_from_file` rejected the new config; the old one stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// This proxy has no config file to re-read.
    #[error("this proxy was not started from a config file")]
    NoConfigFile,
    /// The file cannot be read or parsed, or a value in it cannot be put in force.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `log.level` is not a valid filter (or cannot be applied).
    #[error("{0}")]
    LogLevel(String),
    /// A change only a restart can make.
    #[error("{0} needs a restart")]
    NeedsRestart(&'static str),
    /// A new `jwks_url` did not answer, so its keys cannot replace the ones that work.
    #[error("{key} {url}: {error}")]
    KeysUnreachable { key: &'static str, url: String, error: String },
    /// `audit.path` cannot be (re)opened.
    #[error("{0}")]
    AuditLog(String),
}

/// For callers that report errors as text (the CLI, the integration tests).
impl From<StartError> for String {
    fn from(e: StartError) -> String {
        e.to_string()
    }
}

impl From<ReloadError> for String {
    fn from(e: ReloadError) -> String {
        e.to_string()
    }
}
