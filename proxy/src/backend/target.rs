//! The backend address and credentials, parsed once from `backend.url`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{BackendConfig, BackendTls};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    /// A Unix socket directory; the socket is `<dir>/.s.PGSQL.<port>`.
    Unix(PathBuf),
}

#[derive(Clone)]
pub struct BackendTarget {
    pub host: Host,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub tls: BackendTls,
    pub connect_timeout: Duration,
    /// Built once when `tls` is not `disable`.
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for BackendTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackendTarget({}, tls={:?})", self.describe(), self.tls)
    }
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

impl BackendTarget {
    /// Parses `backend.url`. Error texts never contain the password.
    pub fn from_config(cfg: &BackendConfig) -> Result<BackendTarget, String> {
        let url = url::Url::parse(&cfg.url).map_err(|e| format!("not a valid URL ({e})"))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err("must start with postgres:// or postgresql://".into());
        }
        let user = decode(url.username());
        if user.is_empty() {
            return Err("no user name".into());
        }
        let database = decode(url.path().trim_start_matches('/'));
        if database.is_empty() {
            return Err("no database name".into());
        }
        let port = url.port().unwrap_or(5432);
        let socket_dir = url.query_pairs().find(|(k, _)| k == "host").map(|(_, v)| v.into_owned());
        let host = match socket_dir {
            Some(dir) if dir.starts_with('/') => Host::Unix(PathBuf::from(dir)),
            Some(h) => Host::Tcp(h),
            None => Host::Tcp(
                url.host_str()
                    .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "localhost".into()),
            ),
        };
        let tls_config = match cfg.tls {
            BackendTls::Disable => None,
            mode => Some(super::tls::client_config(mode, cfg.tls_ca_file.as_deref())?),
        };
        Ok(BackendTarget {
            host,
            port,
            user,
            password: url.password().map(decode),
            database,
            tls: cfg.tls,
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            tls_config,
        })
    }

    /// `user@host:port/db`, for logs (never the password).
    pub fn describe(&self) -> String {
        match &self.host {
            Host::Tcp(h) => format!("{}@{}:{}/{}", self.user, h, self.port, self.database),
            Host::Unix(d) => format!("{}@{}/.s.PGSQL.{}/{}", self.user, d.display(), self.port, self.database),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> BackendConfig {
        toml::from_str::<crate::config::Config>(&format!("[backend]\nurl = \"{url}\"\n")).unwrap().backend
    }

    #[test]
    fn parses_urls() {
        let t = BackendTarget::from_config(&cfg("postgres://app%40x:p%40ss%3Aw@db.example:6543/app")).unwrap();
        assert_eq!((t.user.as_str(), t.password.as_deref(), t.port), ("app@x", Some("p@ss:w"), 6543));
        assert_eq!(t.host, Host::Tcp("db.example".into()));
        assert!(!format!("{t:?}").contains("p@ss") && !t.describe().contains("p@ss"));
        let t = BackendTarget::from_config(&cfg("postgresql://u@localhost/app?host=/run/pg")).unwrap();
        assert_eq!((t.host.clone(), t.port), (Host::Unix("/run/pg".into()), 5432));
        assert!(t.password.is_none());
    }
}
