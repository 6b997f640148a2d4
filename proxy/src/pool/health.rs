//! Whether the pool has a usable primary *now*, for `/readyz` and the `pgtenant_ready` gauge.
//!
//! The pool notes what its own traffic proves: a transaction that ended cleanly (its connection
//! came back to the pool) or a connection it opened shows the server answering; a failed connect
//! shows it is not. When nothing has said anything for [`FRESH`] (no client traffic: the idle
//! connections may point at a server that stopped a minute ago), [`Pool::usable_primary`] probes:
//! it opens one connection the way the pool does (TCP or Unix socket, TLS, login as the restricted
//! role), and closes it at once. One probe at a time, at most one per [`FRESH`]; callers in
//! between share its answer.
//!
//! The question is asked through the pool's [`super::Connector`], so whatever decides where the
//! pool connects (one `backend.url` today, the primary among several hosts with failover) decides
//! readiness too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use super::Pool;
use crate::error::sqlstate;

/// How long what the pool saw stays the answer; also the least time between two probes.
pub const FRESH: Duration = Duration::from_secs(1);

/// What the pool last saw of its backend.
pub(super) struct Health {
    /// When `ok` and `failed` were last zero (timestamps below are nanoseconds after it).
    base: Instant,
    /// Last time the backend answered (nanoseconds after `base`, 0 = never): one atomic store on
    /// the release path.
    ok: AtomicU64,
    /// Last failure: when (nanoseconds after `base`) and why.
    failed: Mutex<Option<(u64, String)>>,
    /// One probe at a time.
    probing: tokio::sync::Mutex<()>,
}

impl Health {
    pub(super) fn new() -> Health {
        Health { base: Instant::now(), ok: AtomicU64::new(0), failed: Mutex::new(None), probing: tokio::sync::Mutex::new(()) }
    }

    fn now(&self) -> u64 {
        self.at(Instant::now())
    }

    fn at(&self, t: Instant) -> u64 {
        // never 0, which means "never"
        (t.saturating_duration_since(self.base).as_nanos() as u64).max(1)
    }

    /// The backend answered (a connection opened, or a transaction ended cleanly).
    pub(super) fn answered(&self) {
        self.answered_at(Instant::now());
    }

    /// [`Health::answered`] at `now`, read by the caller (a release reads the clock once).
    pub(super) fn answered_at(&self, now: Instant) {
        self.ok.store(self.at(now), Ordering::Relaxed);
    }

    /// Connecting to the backend failed.
    pub(super) fn failed(&self, why: String) {
        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some((self.now(), why));
    }

    /// The latest news, whatever its age: `Ok` if the backend answered after the last failure.
    pub(super) fn latest(&self) -> Result<(), String> {
        self.latest_within(u64::MAX).unwrap_or(Ok(()))
    }

    /// The latest news if it is younger than `max_age_ns`.
    fn latest_within(&self, max_age_ns: u64) -> Option<Result<(), String>> {
        let now = self.now();
        let ok = self.ok.load(Ordering::Relaxed);
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (at, result) = match failed {
            Some((at, why)) if at > ok => (at, Err(why)),
            _ if ok > 0 => (ok, Ok(())),
            _ => return None,
        };
        (now.saturating_sub(at) < max_age_ns).then_some(result)
    }

    fn fresh(&self) -> Option<Result<(), String>> {
        self.latest_within(FRESH.as_nanos() as u64)
    }
}

impl Pool {
    /// `Ok` if the pool can reach a usable primary now; else why not. Answers from the pool's own
    /// traffic when it is recent, and probes (rate-limited, one at a time) when it is not.
    pub async fn usable_primary(&self) -> Result<(), String> {
        if let Some(answer) = self.health.fresh() {
            return answer;
        }
        let _one = self.health.probing.lock().await;
        // another caller may have probed while this one waited
        if let Some(answer) = self.health.fresh() {
            return answer;
        }
        // through the primary search: with several hosts, readiness means a writable primary
        let before = self.primary.epoch();
        let result = self.primary.connect(self.connector.as_ref(), crate::backend::connect::OWN_APPLICATION_NAME).await;
        if self.primary.epoch() != before {
            self.reap();
        }
        match result {
            Ok((mut conn, _)) => {
                self.health.answered();
                // Terminate, so the server logs a clean disconnect; it is closing either way
                let _ = conn.stream.write_all(&[crate::protocol::tags::frontend::TERMINATE, 0, 0, 0, 4]).await;
                Ok(())
            }
            // the server is up and answering; only its connection slots are taken (by this pool,
            // perhaps): the pool's own connections still work
            Err(crate::backend::ConnectError::Server { code, .. }) if code == sqlstate::TOO_MANY_CONNECTIONS => {
                self.health.answered();
                Ok(())
            }
            Err(e) => {
                tracing::debug!(backend = %self.target().describe(), error = %e, "readiness probe failed");
                self.health.failed(e.to_string());
                Err(e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_latest_news_wins_and_ages() {
        let h = Health::new();
        assert_eq!(h.fresh(), None);
        assert_eq!(h.latest(), Ok(()));
        h.failed("down".into());
        assert_eq!(h.fresh(), Some(Err("down".into())));
        h.answered();
        assert_eq!(h.fresh(), Some(Ok(())));
        h.failed("down again".into());
        assert_eq!(h.latest(), Err("down again".into()));
        assert_eq!(h.latest_within(0), None);
    }

    /// Answers each connect with the next scripted error (the pool's test seam), counting calls.
    struct Scripted(Mutex<Vec<crate::backend::ConnectError>>, std::sync::atomic::AtomicUsize);

    impl super::super::Connector for Scripted {
        fn connect<'a>(
            &'a self,
            _: &'a crate::backend::BackendTarget,
            _: &'a str,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<crate::backend::BackendConn, crate::backend::ConnectError>> + Send + 'a>>
        {
            self.1.fetch_add(1, Ordering::SeqCst);
            let next = self.0.lock().unwrap().remove(0);
            Box::pin(async move { Err(next) })
        }
    }

    #[tokio::test]
    async fn probes_are_rate_limited_and_a_full_server_is_up() {
        use crate::backend::ConnectError;
        let text = "[backend]\nurl = \"postgres://u:p@127.0.0.1:1/db\"\n[jwt]\nsecret = \"0123456789abcdef0123456789\"\n[tenant]\nsettings = { \"app.tenant_id\" = \"tenant_id\" }\n";
        let config = crate::config::Config::from_toml(text, &|_| None).unwrap();
        let script = vec![
            ConnectError::Timeout(10),
            ConnectError::Server { code: sqlstate::TOO_MANY_CONNECTIONS.into(), message: "too many clients already".into() },
            ConnectError::Server { code: sqlstate::CANNOT_CONNECT_NOW.into(), message: "the database system is shutting down".into() },
        ];
        let connector = Arc::new(Scripted(Mutex::new(script), Default::default()));
        let target = crate::backend::BackendTarget::from_config(&config.backend).unwrap();
        let pool = Pool::with_connector(&config, target, 2, Arc::new(config.limits.clone()), connector.clone());
        let calls = || connector.1.load(Ordering::SeqCst);
        // down: one probe, and asking again within FRESH does not probe again
        assert!(pool.usable_primary().await.unwrap_err().contains("timed out"));
        assert!(pool.usable_primary().await.is_err());
        assert_eq!(calls(), 1);
        // a server refusing for lack of connection slots is up
        tokio::time::sleep(FRESH).await;
        assert_eq!(pool.usable_primary().await, Ok(()));
        assert_eq!(calls(), 2);
        // one shutting down is not
        tokio::time::sleep(FRESH).await;
        assert!(pool.usable_primary().await.unwrap_err().contains("shutting down"));
        // a transaction that ended cleanly is news enough: no probe
        tokio::time::sleep(FRESH).await;
        pool.health.answered();
        assert_eq!(pool.usable_primary().await, Ok(()));
        assert_eq!(calls(), 3);
    }
}
