//! Query cancellation across the pool.
//!
//! Every session gets a secret key of pgtenant's own, never a backend's. Its process id depends on
//! the pool mode: in transaction mode the backend changes from one transaction to the next, so the
//! client gets a random *virtual* pid that belongs to the session; in session mode the client keeps
//! one backend, so it gets that backend's real pid (the one `pg_backend_pid()` and NOTIFY show).
//!
//! A pid alone does not identify a session: a real pid may equal a virtual one, two servers (the
//! tenant and the bypass pool) have their own pids, and a session that just ended may still be
//! registered while its backend's next client registers the same pid. So a CancelRequest is matched
//! on pid *and* secret (compared in constant time), and a session's registration is removed by
//! identity, never by pid. A matching request is forwarded to the backend that session is using at
//! that moment, and to no other. The session's slot is locked while the cancel is being delivered,
//! and a session must take the same lock to give its backend back, so a cancel can never land on a
//! backend that has meanwhile moved to another client.
//!
//! In a fleet (`server.peer_id`), the secret also names this instance, so that a request reaching
//! another instance can be forwarded here (`fleet`); the rest of it stays random.
//!
//! The slot is also the session's handle for the operator: when its backend changed last (the
//! console's `SHOW CLIENTS`), and the console's `KILL` ends the session through it
//! ([`CancelSlot::terminate`]), as `pg_terminate_backend` does where a cancel request only
//! interrupts.

use std::sync::Arc;

use dashmap::DashMap;
use rand::Rng;
use tokio::sync::Mutex;

use crate::backend::{self, BackendTarget};

/// The backend a session is using right now: (pid, secret).
pub struct CancelSlot {
    secret: i32,
    current: Mutex<Option<(i32, i32)>>,
    /// The server of the session's pool when it is not the default one (the bypass pool).
    target: Option<BackendTarget>,
    /// The pool the current backend came from, when the session runs on several (a replica, a
    /// tenant's own cluster: see `crate::routing`); changed only under `current`'s lock, but for
    /// [`CancelSlot::given_by`], which names the server `target` names already.
    pool: std::sync::Mutex<Option<Arc<crate::pool::Pool>>>,
    /// When `current` last changed (a transaction started or ended).
    changed: std::sync::Mutex<std::time::SystemTime>,
    /// Set once the operator ended the session (`KILL`).
    terminated: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
}

impl CancelSlot {
    fn new(secret: i32, backend: Option<(i32, i32)>, target: Option<BackendTarget>) -> CancelSlot {
        CancelSlot {
            secret,
            current: Mutex::new(backend),
            target,
            changed: std::sync::Mutex::new(std::time::SystemTime::now()),
            terminated: Default::default(),
            wake: Default::default(),
            pool: Default::default(),
        }
    }

    pub async fn set(&self, backend: Option<(i32, i32)>) {
        let mut current = self.current.lock().await;
        self.replace(&mut current, backend);
    }

    fn replace(&self, current: &mut Option<(i32, i32)>, backend: Option<(i32, i32)>) {
        if *current != backend {
            *self.changed.lock().unwrap_or_else(|p| p.into_inner()) = std::time::SystemTime::now();
        }
        *current = backend;
    }

    /// The pid of the backend the session is using now, and since when it has (or has had none).
    pub async fn backend(&self) -> (Option<i32>, std::time::SystemTime) {
        let (backend, since) = self.backend_in_pool().await;
        (backend.map(|(pid, _)| pid), since)
    }

    /// Like [`backend`](Self::backend), with the pool that backend came from (the console's `SHOW
    /// SERVERS` lists it under that pool). `None` for the pool while a backend given at login is
    /// not yet recorded as its session's (see [`given_by`](Self::given_by)).
    pub async fn backend_in_pool(&self) -> (Option<(i32, Option<Arc<crate::pool::Pool>>)>, std::time::SystemTime) {
        let current = self.current.lock().await;
        let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (current.map(|(pid, _)| (pid, pool)), *self.changed.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Records the pool of the backend registered with the session (session mode: leased at login
    /// from the session's home pool). That pool's server is the one `target` names already, so a
    /// cancel goes where it went before; only the operator's view gains the pool.
    pub fn given_by(&self, pool: Arc<crate::pool::Pool>) {
        *self.pool.lock().unwrap_or_else(|p| p.into_inner()) = Some(pool);
    }

    /// Asks the session to end at once (it sends its client a FATAL and closes).
    pub fn terminate(&self) {
        self.terminated.store(true, std::sync::atomic::Ordering::Release);
        self.wake.notify_waiters();
    }

    /// Whether [`terminate`](Self::terminate) was called.
    pub fn is_terminated(&self) -> bool {
        self.terminated.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Completes once [`terminate`](Self::terminate) was called (at once if it already was).
    pub async fn terminated(&self) {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.terminated.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            woken.await;
        }
    }

    /// Like [`CancelSlot::set`], for a backend of `pool`: a cancel goes to that pool's server.
    pub async fn set_on(&self, backend: Option<(i32, i32)>, pool: Arc<crate::pool::Pool>) {
        let mut current = self.current.lock().await;
        *self.pool.lock().unwrap_or_else(|p| p.into_inner()) = Some(pool);
        self.replace(&mut current, backend);
    }
}

/// Sessions by the pid they were given; usually one per pid, more after a collision.
#[derive(Default)]
pub struct CancelRegistry {
    sessions: DashMap<i32, Vec<Arc<CancelSlot>>>,
    /// This instance's id in a fleet, carried in every secret it issues.
    peer_id: Option<u8>,
}

/// Removes the session from the registry when the session ends.
pub struct Registration {
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<CancelSlot>,
    registry: Arc<CancelRegistry>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.sessions.remove_if_mut(&self.pid, |_, slots| {
            slots.retain(|s| !Arc::ptr_eq(s, &self.slot));
            slots.is_empty()
        });
    }
}

impl CancelRegistry {
    /// The registry of the instance `peer_id` of a fleet (`None`: a lone instance).
    pub fn for_instance(peer_id: Option<u8>) -> CancelRegistry {
        CancelRegistry { sessions: DashMap::new(), peer_id }
    }

    /// Issues cancel keys for a new session; `target` is the server its backends are on when that
    /// is not the default one. With `backend` (session mode: the session keeps this backend's
    /// (pid, secret)), the client is given the backend's real pid; without it, a random virtual pid
    /// that no registered session uses.
    pub fn register(self: &Arc<Self>, target: Option<BackendTarget>, backend: Option<(i32, i32)>) -> Registration {
        let mut rng = rand::rng();
        loop {
            let secret = crate::fleet::secret_for(self.peer_id, rng.random());
            let slot = Arc::new(CancelSlot::new(secret, backend, target.clone()));
            let pid = match backend {
                Some((pid, _)) => pid,
                None => rng.random_range(1..i32::MAX),
            };
            match self.sessions.entry(pid) {
                dashmap::Entry::Vacant(v) => {
                    v.insert(vec![slot.clone()]);
                }
                // a real pid shares its entry; the secret must still tell the sessions apart
                dashmap::Entry::Occupied(mut o) if backend.is_some() && o.get().iter().all(|s| s.secret != secret) => {
                    o.get_mut().push(slot.clone());
                }
                dashmap::Entry::Occupied(_) => continue,
            }
            return Registration { pid, secret, slot, registry: self.clone() };
        }
    }

    /// Sessions registered.
    pub fn len(&self) -> usize {
        self.sessions.iter().map(|e| e.value().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The session with these keys, if any. Every session under `pid` is compared, in constant
    /// time, so the answer takes as long whichever of them matches.
    fn find(&self, pid: i32, secret: i32) -> Option<Arc<CancelSlot>> {
        let slots = self.sessions.get(&pid)?.clone();
        let mut found = None;
        for s in slots {
            if constant_time_eq(s.secret, secret) {
                found = Some(s);
            }
        }
        found
    }

    /// Handles a CancelRequest meant for this instance (to the session's own server, else
    /// `target`). Returns whether a cancel was forwarded to a backend.
    pub async fn cancel(&self, target: &BackendTarget, pid: i32, secret: i32) -> bool {
        let Some(slot) = self.find(pid, secret) else {
            tracing::info!("cancel request matching no session ignored");
            return false;
        };
        let current = slot.current.lock().await;
        let pool = slot.pool.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let server = pool.as_ref().map(|p| p.target()).or(slot.target.as_ref()).unwrap_or(target);
        match *current {
            Some((bpid, bsecret)) => match backend::send_cancel(server, bpid, bsecret).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "forwarding cancel request failed");
                    false
                }
            },
            None => false,
        }
    }
}

fn constant_time_eq(a: i32, b: i32) -> bool {
    let x = (a ^ b) as u32;
    // fold to avoid an early-exit comparison
    std::hint::black_box(x) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_shared_pid_routes_by_secret_and_unregisters_by_identity() {
        let reg = Arc::new(CancelRegistry::default());
        let virtual_session = reg.register(None, None);
        let pid = virtual_session.pid;
        // a real backend pid equal to the virtual one, and the next session on that backend
        let real = reg.register(None, Some((pid, 77)));
        let next = reg.register(None, Some((pid, 78)));
        assert_eq!((real.pid, next.pid), (pid, pid));
        assert_eq!(reg.len(), 3);
        for r in [&virtual_session, &real, &next] {
            assert!(Arc::ptr_eq(&reg.find(pid, r.secret).unwrap(), &r.slot));
        }
        let wrong = (0..).map(|i| virtual_session.secret.wrapping_add(i)).find(|s| ![virtual_session.secret, real.secret, next.secret].contains(s)).unwrap();
        assert!(reg.find(pid, wrong).is_none());
        assert_eq!(*real.slot.current.lock().await, Some((pid, 77)));
        assert_eq!(*virtual_session.slot.current.lock().await, None);
        let real_secret = real.secret;
        drop(real);
        assert!(reg.find(pid, real_secret).is_none());
        assert!(reg.find(pid, next.secret).is_some() && reg.find(pid, virtual_session.secret).is_some());
        drop(next);
        drop(virtual_session);
        assert!(reg.is_empty());
    }

    #[tokio::test]
    async fn terminate_wakes_a_waiting_session_and_a_late_one() {
        let reg = Arc::new(CancelRegistry::default());
        let r = reg.register(None, None);
        let slot = r.slot.clone();
        let waiting = tokio::spawn(async move { slot.terminated().await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        r.slot.terminate();
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting).await.expect("woken").unwrap();
        // asking after the fact completes at once
        tokio::time::timeout(std::time::Duration::from_millis(100), r.slot.terminated()).await.expect("already terminated");
    }
}
