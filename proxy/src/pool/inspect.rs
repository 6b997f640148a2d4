//! What the operator's console reads of a pool (`SHOW POOLS`, `SHOW SERVERS`, `SHOW STATS`): read
//! only, without connecting and without waiting for anything but the pool's own short locks.

use std::time::{Duration, Instant, SystemTime};

use super::fair::Totals;

/// An idle pooled connection, as `SHOW SERVERS` lists it.
pub struct IdleServer {
    pub pid: i32,
    /// When it was opened.
    pub connected: SystemTime,
    /// When it was last given back.
    pub idle_since: SystemTime,
}

/// `Instant` in the past as wall-clock time.
fn wall(at: Instant) -> SystemTime {
    SystemTime::now() - at.elapsed()
}

impl super::Pool {
    /// The connections idle in the pool now.
    pub fn idle_servers(&self) -> Vec<IdleServer> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.iter()
            .map(|i| IdleServer { pid: i.backend.pid, connected: wall(i.backend.created), idle_since: wall(i.since) })
            .collect()
    }

    /// A parameter the server reported at startup, if a connection was ever made.
    pub fn reported_param(&self, name: &str) -> Option<String> {
        let info = self.server_info.lock().unwrap_or_else(|p| p.into_inner());
        info.as_ref()?.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    /// Totals since start, and the longest wait of a transaction queued now.
    pub fn totals(&self) -> (Totals, Duration) {
        self.slots.totals()
    }
}
