//! One read replica: its pool, and whether it may take transactions now. A monitor task checks it
//! once a second over its own connection (off the hot path): a replica that does not answer, or
//! whose replay is more than `max_replica_lag_ms` behind, is skipped until a check finds it well
//! again. A transaction that cannot connect to it marks it down at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::backend::{self, BackendConn};
use crate::pool::Pool;

/// How often each replica is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Replay lag in milliseconds: 0 when everything received is replayed (an idle primary sends
/// nothing, so the last replay's age says nothing then), else the age of the last replayed
/// transaction (with none replayed yet: very far behind). A replica that was promoted (not in
/// recovery) is not behind anything.
const LAG_SQL: &str = "SELECT CASE WHEN NOT pg_catalog.pg_is_in_recovery() \
     OR pg_catalog.pg_last_wal_receive_lsn() = pg_catalog.pg_last_wal_replay_lsn() THEN 0 \
     ELSE COALESCE((EXTRACT(EPOCH FROM now() - pg_catalog.pg_last_xact_replay_timestamp()) * 1000)::bigint, 2147483647) END";

/// Lag value meaning "not measured" (never checked, or the last check failed).
const UNKNOWN: u64 = u64::MAX;

pub struct Replica {
    /// Its position in its cluster's `replicas` list: the metric label (bounded, no host names).
    pub index: usize,
    pub pool: Arc<Pool>,
    /// The last check succeeded and no transaction failed to connect since.
    up: AtomicBool,
    lag_ms: AtomicU64,
}

impl Replica {
    pub fn new(index: usize, pool: Arc<Pool>) -> Arc<Replica> {
        // not used before its first check has measured it
        Arc::new(Replica { index, pool, up: AtomicBool::new(false), lag_ms: AtomicU64::new(UNKNOWN) })
    }

    /// Whether it may take a transaction now.
    pub fn usable(&self, max_lag_ms: u64) -> bool {
        self.up.load(Ordering::Relaxed) && self.lag_ms.load(Ordering::Relaxed) <= max_lag_ms
    }

    /// Its replay lag at the last check, when that check succeeded.
    pub fn lag_ms(&self) -> Option<u64> {
        Some(self.lag_ms.load(Ordering::Relaxed)).filter(|l| *l != UNKNOWN)
    }

    /// Whether the last check (or lease) reached it.
    pub fn up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// A transaction could not connect: skip it until the next good check.
    pub fn mark_down(&self) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(replica = %self.pool.target().describe(), "read replica unreachable: read-only transactions go elsewhere");
        }
    }

    fn record(&self, lag: Option<u64>) {
        let was_up = self.up.load(Ordering::Relaxed);
        self.lag_ms.store(lag.unwrap_or(UNKNOWN), Ordering::Relaxed);
        self.up.store(lag.is_some(), Ordering::Relaxed);
        if was_up != lag.is_some() {
            tracing::info!(replica = %self.pool.target().describe(), up = lag.is_some(), "read replica check");
        }
    }

    /// Checks the replica every [`CHECK_INTERVAL`] until it is dropped; labels its gauges with
    /// `cluster` and its index.
    pub fn spawn_monitor(self: &Arc<Self>, cluster: &str) {
        let weak: Weak<Replica> = Arc::downgrade(self);
        let (cluster, index) = (cluster.to_string(), self.index.to_string());
        tokio::spawn(async move {
            let mut conn: Option<BackendConn> = None;
            let mut tick = tokio::time::interval(CHECK_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(replica) = weak.upgrade() else { return };
                let lag = check(&replica, &mut conn).await;
                replica.record(lag);
                let labels = [("cluster", cluster.clone()), ("replica", index.clone())];
                ::metrics::gauge!(crate::metrics::REPLICA_UP, &labels).set(if lag.is_some() { 1.0 } else { 0.0 });
                if let Some(l) = lag {
                    ::metrics::gauge!(crate::metrics::REPLICA_LAG_SECONDS, &labels).set(l as f64 / 1000.0);
                }
            }
        });
    }
}

/// One check over the monitor's connection (opened again when it was lost); None when the replica
/// cannot be reached or answers with an error.
async fn check(replica: &Replica, conn: &mut Option<BackendConn>) -> Option<u64> {
    if conn.is_none() {
        match backend::connect(replica.pool.target()).await {
            Ok(c) => *conn = Some(c),
            Err(e) => {
                tracing::debug!(replica = %replica.pool.target().describe(), error = %e, "replica check: cannot connect");
                return None;
            }
        }
    }
    let c = conn.as_mut()?;
    let timeout = replica.pool.target().connect_timeout;
    match tokio::time::timeout(timeout, backend::query::simple_query(c, LAG_SQL)).await {
        Ok(Ok(rows)) => rows.into_iter().next().and_then(|r| r.into_iter().next().flatten()).and_then(|v| v.parse::<i64>().ok()).map(|v| v.max(0) as u64),
        Ok(Err(e)) => {
            tracing::debug!(replica = %replica.pool.target().describe(), error = %e, "replica check failed");
            *conn = None;
            None
        }
        Err(_) => {
            *conn = None;
            None
        }
    }
}
