//! The live client sessions, as the operator's console lists and ends them (`SHOW CLIENTS`,
//! `SHOW SERVERS`, `KILL <tenant>`).
//!
//! A session is listed from the moment its login succeeds until it ends, however it ends (the
//! listing is a guard). What a listing shows is fixed at login, except the backend it is using
//! right now, which its cancel slot knows; ending a session goes through that slot too
//! (`CancelSlot::terminate`), so the registry holds no task handles and needs no lock on the hot
//! path: one map insert at login and one removal at the end.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;

use crate::cancel::CancelSlot;
use crate::error::{sqlstate, PgError};

/// What the console shows of one session.
pub struct Client {
    /// The tenant its transactions run for (the bypass context's tenant for a trusted worker).
    pub tenant: Arc<str>,
    pub user: String,
    pub database: String,
    pub addr: SocketAddr,
    pub tls: bool,
    pub application_name: String,
    /// "tenant" or "bypass".
    pub pool: &'static str,
    /// The process id the client was given (BackendKeyData).
    pub pid: i32,
    pub connected: SystemTime,
    /// The session's backend handle: its current backend, and the way to end it.
    pub slot: Arc<CancelSlot>,
}

/// Every live session of one proxy.
#[derive(Default)]
pub struct Sessions {
    live: DashMap<u64, Arc<Client>>,
    next: AtomicU64,
}

/// A session's place in the list; dropping it takes the session off.
pub struct Listed {
    id: u64,
    sessions: Arc<Sessions>,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.sessions.live.remove(&self.id);
    }
}

/// The error a session's client gets when the operator ends it.
pub fn killed_error() -> PgError {
    PgError::fatal(sqlstate::ADMIN_SHUTDOWN, "pgtenant: terminating connection due to administrator command (KILL)")
}

impl Sessions {
    /// Lists a session until the returned guard is dropped.
    pub fn add(self: &Arc<Self>, client: Client) -> Listed {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.live.insert(id, Arc::new(client));
        Listed { id, sessions: self.clone() }
    }

    /// The sessions live now, oldest first.
    pub fn list(&self) -> Vec<Arc<Client>> {
        let mut all: Vec<(u64, Arc<Client>)> = self.live.iter().map(|e| (*e.key(), e.value().clone())).collect();
        all.sort_by_key(|(id, _)| *id);
        all.into_iter().map(|(_, c)| c).collect()
    }

    /// Sessions live now.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Ends every session of `tenant` (each sends its client [`killed_error`]); returns how many.
    pub fn kill_tenant(&self, tenant: &str) -> usize {
        let mut n = 0;
        for e in self.live.iter().filter(|e| &*e.value().tenant == tenant) {
            e.value().slot.terminate();
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cancel::CancelRegistry;

    fn client(tenant: &str, slot: Arc<CancelSlot>) -> Client {
        Client {
            tenant: Arc::from(tenant),
            user: "u".into(),
            database: "app".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            tls: false,
            application_name: String::new(),
            pool: "tenant",
            pid: 1,
            connected: SystemTime::now(),
            slot,
        }
    }

    #[tokio::test]
    async fn kill_reaches_only_the_tenants_sessions_and_listing_ends_with_the_guard() {
        let cancels = Arc::new(CancelRegistry::default());
        let sessions = Arc::new(Sessions::default());
        let (a, b) = (cancels.register(None, None), cancels.register(None, None));
        let la = sessions.add(client("a", a.slot.clone()));
        let _lb = sessions.add(client("b", b.slot.clone()));
        assert_eq!(sessions.list().iter().map(|c| c.tenant.to_string()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(sessions.kill_tenant("a"), 1);
        let quick = std::time::Duration::from_millis(100);
        tokio::time::timeout(quick, a.slot.terminated()).await.expect("a was ended");
        assert!(tokio::time::timeout(quick, b.slot.terminated()).await.is_err(), "b must go on");
        drop(la);
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions.kill_tenant("a"), 0);
    }
}
