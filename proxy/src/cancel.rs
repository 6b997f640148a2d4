//! Query cancellation across the pool.
//!
//! Clients get pgtenant's own cancel keys (a random pid and secret), never a backend's. A
//! CancelRequest is matched to the client session in constant time and forwarded to the backend
//! that session is using at that moment, and to no other. The session's slot is locked while the
//! cancel is being delivered, and a session must take the same lock to give its backend back, so a
//! cancel can never land on a backend that has meanwhile moved to another client.

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
}

impl CancelSlot {
    pub async fn set(&self, backend: Option<(i32, i32)>) {
        *self.current.lock().await = backend;
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    sessions: DashMap<i32, Arc<CancelSlot>>,
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
        self.registry.sessions.remove(&self.pid);
    }
}

impl CancelRegistry {
    /// Issues fresh, unique cancel keys for a new session; `target` is the server its backends are
    /// on when that is not the default one.
    pub fn register(self: &Arc<Self>, target: Option<BackendTarget>) -> Registration {
        let mut rng = rand::rng();
        loop {
            let pid = rng.random_range(1..i32::MAX);
            let secret = rng.random::<i32>();
            let slot = Arc::new(CancelSlot { secret, current: Mutex::new(None), target: target.clone() });
            if let dashmap::Entry::Vacant(v) = self.sessions.entry(pid) {
                v.insert(slot.clone());
                return Registration { pid, secret, slot, registry: self.clone() };
            }
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Handles a CancelRequest (to the session's own server, else `target`). Returns whether a
    /// cancel was forwarded to a backend.
    pub async fn cancel(&self, target: &BackendTarget, pid: i32, secret: i32) -> bool {
        let Some(slot) = self.sessions.get(&pid).map(|s| s.clone()) else {
            tracing::info!("cancel request for an unknown session ignored");
            return false;
        };
        if !constant_time_eq(slot.secret, secret) {
            tracing::warn!("cancel request with a wrong secret key ignored");
            return false;
        }
        let current = slot.current.lock().await;
        match *current {
            Some((bpid, bsecret)) => match backend::send_cancel(slot.target.as_ref().unwrap_or(target), bpid, bsecret).await {
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
