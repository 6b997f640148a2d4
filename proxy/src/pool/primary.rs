//! Which of `backend.url`'s hosts the pool connects to: the first, in the order given, that is the
//! kind of server `target_session_attrs` asks for (with several hosts: the writable primary).
//!
//! New connections go to the host found last. When that fails (unreachable, shutting down, now a
//! standby or read-only) every host is tried again in order, one search at a time. A change of
//! host is a failover: the epoch moves on, and the pool closes every connection opened under an
//! older epoch instead of reusing it (a connection to a demoted or fenced server must never serve
//! another transaction). The host in use and the failovers are exported as metrics
//! (`pgtenant_backend_primary`, `pgtenant_backend_failovers_total`) and readable for `/pools`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::Connector;
use crate::backend::{BackendConn, BackendTarget, ConnectError, SessionAttrs};

/// `current` when no host is known to be the one wanted.
const NONE: usize = usize::MAX;

pub struct Primary {
    /// Which pool this is, for metric labels (`tenant`, `bypass`).
    label: &'static str,
    targets: Vec<BackendTarget>,
    attrs: SessionAttrs,
    /// The host new connections go to, or `NONE`.
    current: AtomicUsize,
    /// The host used last (kept while `current` is `NONE`), to tell a failover from a reconnect.
    last: AtomicUsize,
    /// Moves on when the host in use changes.
    epoch: AtomicU64,
    failovers: AtomicU64,
    /// Searches run one at a time; `found` counts the successful ones, so that a search that
    /// waited behind another first tries what that one found.
    searching: tokio::sync::Mutex<()>,
    found: AtomicU64,
}

impl Primary {
    pub fn new(label: &'static str, targets: Vec<BackendTarget>, attrs: SessionAttrs) -> Primary {
        debug_assert!(!targets.is_empty(), "a connection string names at least one host");
        let single_any = targets.len() == 1 && attrs == SessionAttrs::Any;
        let p = Primary {
            label,
            targets,
            attrs,
            // one host that may be any kind of server: it is the one, reachable or not
            current: AtomicUsize::new(if single_any { 0 } else { NONE }),
            last: AtomicUsize::new(NONE),
            epoch: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
            searching: tokio::sync::Mutex::new(()),
            found: AtomicU64::new(0),
        };
        p.publish(p.index());
        p
    }

    /// Whether there is anything to choose between (several hosts, or a kind of server to check):
    /// only then does a transaction wait for a primary to appear, and a server error trigger a
    /// re-check.
    pub fn chooses(&self) -> bool {
        self.targets.len() > 1 || self.attrs != SessionAttrs::Any
    }

    fn index(&self) -> Option<usize> {
        Some(self.current.load(Ordering::Acquire)).filter(|&i| i != NONE)
    }

    /// The host in use, else the first one (for cancel requests and descriptions).
    pub fn target(&self) -> &BackendTarget {
        &self.targets[self.index().unwrap_or(0)]
    }

    /// `host:port` of the host in use, if one is known.
    pub fn current(&self) -> Option<String> {
        self.index().map(|i| self.targets[i].address())
    }

    /// Every host, in order.
    pub fn hosts(&self) -> Vec<String> {
        self.targets.iter().map(BackendTarget::address).collect()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Times the host in use changed from one server to another.
    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Relaxed)
    }

    /// Opens a connection to the host in use, searching for it when needed, logged in with
    /// `application_name`. Returns the epoch the connection belongs to.
    pub async fn connect(&self, connector: &dyn Connector, application_name: &str) -> Result<(BackendConn, u64), ConnectError> {
        let epoch = self.epoch();
        let found = self.found.load(Ordering::Acquire);
        let Some(i) = self.index() else { return self.search(connector, found, application_name).await };
        match self.try_host(connector, i, application_name).await {
            Ok(conn) => Ok((conn, epoch)),
            Err(e) if !self.chooses() => Err(e),
            Err(e) => {
                tracing::warn!(pool = self.label, host = %self.targets[i].address(), error = %e, "backend host no longer usable; looking for the primary");
                if self.current.compare_exchange(i, NONE, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    self.publish(None);
                }
                self.search(connector, found, application_name).await
            }
        }
    }

    /// Tries every host in order; the first of the wanted kind becomes the host in use.
    async fn search(&self, connector: &dyn Connector, found_before: u64, application_name: &str) -> Result<(BackendConn, u64), ConnectError> {
        let _one = self.searching.lock().await;
        if self.found.load(Ordering::Acquire) != found_before {
            // a search finished while this one waited: use what it found
            if let Some(i) = self.index() {
                let epoch = self.epoch();
                if let Ok(conn) = self.try_host(connector, i, application_name).await {
                    return Ok((conn, epoch));
                }
            }
        }
        let mut failures = Vec::with_capacity(self.targets.len());
        for i in 0..self.targets.len() {
            match self.try_host(connector, i, application_name).await {
                Ok(conn) => {
                    let epoch = self.adopt(i);
                    self.found.fetch_add(1, Ordering::AcqRel);
                    return Ok((conn, epoch));
                }
                Err(e) => failures.push((i, e)),
            }
        }
        self.current.store(NONE, Ordering::Release);
        self.publish(None);
        if failures.len() == 1 && !self.chooses() {
            return Err(failures.remove(0).1);
        }
        let retry = failures.iter().all(|(_, e)| e.is_unavailable());
        let what: Vec<String> = failures.iter().map(|(i, e)| format!("{}: {e}", self.targets[*i].address())).collect();
        Err(ConnectError::NoPrimary { tried: what.join("; "), retry })
    }

    /// A connection to host `i`, if it is the kind of server wanted.
    async fn try_host(&self, connector: &dyn Connector, i: usize, application_name: &str) -> Result<BackendConn, ConnectError> {
        let mut conn = connector.connect(&self.targets[i], application_name).await?;
        match self.attrs.mismatch(&mut conn).await? {
            None => Ok(conn),
            Some(reason) => Err(ConnectError::WrongKind(reason)),
        }
    }

    /// Host `i` is the one now; returns the epoch of connections to it.
    fn adopt(&self, i: usize) -> u64 {
        let before = self.last.swap(i, Ordering::AcqRel);
        self.current.store(i, Ordering::Release);
        let epoch = if before == i {
            self.epoch()
        } else {
            if before != NONE {
                self.failovers.fetch_add(1, Ordering::Relaxed);
                ::metrics::counter!(crate::metrics::BACKEND_FAILOVERS, "pool" => self.label).increment(1);
                tracing::warn!(pool = self.label, from = %self.targets[before].address(), to = %self.targets[i].address(), "backend primary changed: connections to the old one are closed");
            } else {
                tracing::info!(pool = self.label, host = %self.targets[i].address(), "backend primary found");
            }
            self.epoch.fetch_add(1, Ordering::AcqRel) + 1
        };
        self.publish(Some(i));
        epoch
    }

    /// `pgtenant_backend_primary{pool, host}`: 1 for the host in use, 0 for the others.
    fn publish(&self, current: Option<usize>) {
        crate::metrics::recorder();
        for (i, t) in self.targets.iter().enumerate() {
            let v = if Some(i) == current { 1.0 } else { 0.0 };
            ::metrics::gauge!(crate::metrics::BACKEND_PRIMARY, "pool" => self.label, "host" => t.address()).set(v);
        }
    }
}
