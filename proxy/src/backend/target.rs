//! The backend address and credentials, parsed once from `backend.url` (`crate::conninfo`): one
//! `BackendTarget` per host.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{BackendConfig, BackendTls};
use crate::conninfo::{Host, SessionAttrs};

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

impl BackendTarget {
    /// The first host of `backend.url` (one server: install-sql, a read replica, `--admin-url`).
    /// Error texts never contain the password.
    pub fn from_config(cfg: &BackendConfig) -> Result<BackendTarget, String> {
        let (mut all, _) = Self::all_from_config(cfg)?;
        Ok(all.swap_remove(0))
    }

    /// Every host of `backend.url`, in order, and the kind of server the pool must reach there.
    pub fn all_from_config(cfg: &BackendConfig) -> Result<(Vec<BackendTarget>, SessionAttrs), String> {
        let info = crate::conninfo::parse(&cfg.url)?;
        let tls_config = match cfg.tls {
            BackendTls::Disable => None,
            mode => Some(super::tls::client_config(mode, cfg.tls_ca_file.as_deref())?),
        };
        let targets = info
            .hosts
            .into_iter()
            .map(|(host, port)| BackendTarget {
                host,
                port,
                user: info.user.clone(),
                password: info.password.clone(),
                database: info.database.clone(),
                tls: cfg.tls,
                connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
                tls_config: tls_config.clone(),
            })
            .collect();
        Ok((targets, info.attrs))
    }

    /// `host:port` (or the socket path), for metrics and `/pools`.
    pub fn address(&self) -> String {
        match &self.host {
            Host::Tcp(h) if h.contains(':') => format!("[{h}]:{}", self.port),
            Host::Tcp(h) => format!("{h}:{}", self.port),
            Host::Unix(d) => format!("{}/.s.PGSQL.{}", d.display(), self.port),
        }
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
        let (all, attrs) = BackendTarget::all_from_config(&cfg("postgres://u:pw@h1:5432,[::1]:5433/app")).unwrap();
        assert_eq!(all.iter().map(|t| t.address()).collect::<Vec<_>>(), ["h1:5432", "[::1]:5433"]);
        assert_eq!((attrs, all[1].password.as_deref(), all[1].database.as_str()), (SessionAttrs::ReadWrite, Some("pw"), "app"));
    }
}
