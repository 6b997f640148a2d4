//! `PAUSE` / `RESUME` (the operator's console): stop handing out backends, e.g. before the
//! database restarts, and start again.
//!
//! A paused pool hands out no connection: a transaction that needs one waits at this gate (its
//! client sees nothing but a slow start) for at most `pool.query_wait_timeout_ms`, the same budget
//! it has for a busy pool, and then gets `ERROR 57P03`. Transactions that already hold a backend go
//! on; `PAUSE` returns once they have all ended (see [`Gate::drained`]), as PgBouncer's does. After
//! `RESUME` the waiting transactions queue for slots in the pool's fair order. The gate keeps
//! its waiters' start times so that `SHOW POOLS` counts them (`cl_waiting`, `maxwait`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::error::{sqlstate, PgError};

/// Whether the pool may hand out connections.
pub struct Gate {
    paused: watch::Sender<bool>,
    /// Transactions waiting at the closed gate: (id, since when).
    waiters: Mutex<Vec<(u64, Instant)>>,
    next: AtomicU64,
}

impl Default for Gate {
    fn default() -> Self {
        Gate { paused: watch::Sender::new(false), waiters: Mutex::default(), next: AtomicU64::new(0) }
    }
}

/// A transaction's place among the gate's waiters, given up however its wait ends.
struct Waiting<'a>(&'a Gate, u64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.lock().unwrap_or_else(|p| p.into_inner()).retain(|(id, _)| *id != self.1);
    }
}

impl Gate {
    /// Closes the gate; false when it was closed already.
    pub fn pause(&self) -> bool {
        !self.paused.send_replace(true)
    }

    /// Opens the gate, letting every waiting transaction on; false when it was open.
    pub fn resume(&self) -> bool {
        self.paused.send_replace(false)
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Transactions waiting at the gate now, and the longest wait among them.
    pub fn waiting(&self) -> (usize, Duration) {
        let waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        (waiters.len(), waiters.iter().map(|(_, since)| since.elapsed()).max().unwrap_or_default())
    }

    /// Waits (at most `limit`) until the gate is open; returns what is left of `limit`.
    pub async fn pass(&self, limit: Duration) -> Result<Duration, PgError> {
        if !self.is_paused() {
            return Ok(limit); // the hot path: one atomic read under the watch's lock
        }
        let started = Instant::now();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).push((id, started));
        let _waiting = Waiting(self, id);
        let mut rx = self.paused.subscribe();
        let opened = tokio::time::timeout(limit, rx.wait_for(|paused| !paused)).await.is_ok_and(|r| r.is_ok());
        match opened {
            true => Ok(limit.saturating_sub(started.elapsed())),
            false => Err(PgError::error(
                sqlstate::CANNOT_CONNECT_NOW,
                format!("pgtenant: the pool is paused (PAUSE on the admin console) and was not resumed within {} ms", limit.as_millis()),
            )
            .with_hint("retry once the operator has run RESUME")),
        }
    }
}

impl super::Pool {
    /// Stops handing out connections (see the module doc); false when already paused.
    pub fn pause(&self) -> bool {
        self.pause.pause()
    }

    /// Hands out connections again; false when not paused.
    pub fn resume(&self) -> bool {
        self.pause.resume()
    }

    pub fn is_paused(&self) -> bool {
        self.pause.is_paused()
    }

    /// Transactions held by the pause now, and the longest of their waits.
    pub fn held_by_pause(&self) -> (usize, Duration) {
        self.pause.waiting()
    }

    /// Waits until no transaction holds a connection of this pool (in session mode: until every
    /// client has left).
    pub async fn drained(&self) {
        while self.busy_count() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_paused_gate_holds_until_resumed_or_the_limit() {
        let gate = std::sync::Arc::new(Gate::default());
        assert_eq!(gate.pass(Duration::from_millis(50)).await.unwrap(), Duration::from_millis(50));
        assert!(gate.pause() && !gate.pause());
        let err = gate.pass(Duration::from_millis(30)).await.unwrap_err();
        assert_eq!(err.code, sqlstate::CANNOT_CONNECT_NOW);
        let g = gate.clone();
        let waiting = tokio::spawn(async move { g.pass(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiting.is_finished(), "a paused gate lets nobody through");
        let (n, longest) = gate.waiting();
        assert!(n == 1 && longest >= Duration::from_millis(30), "{n} {longest:?}");
        assert!(gate.resume() && !gate.resume());
        let left = waiting.await.unwrap().unwrap();
        assert!(left < Duration::from_secs(5) && left > Duration::from_secs(4));
        assert_eq!(gate.waiting().0, 0, "a waiter that passed is no longer counted");
    }
}
