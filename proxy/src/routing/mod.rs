//! Routing across several pools: the clusters a tenant may be placed on (`[[clusters]]`, with
//! `[backend]` as "default"), and each cluster's read replicas (`replicas`).
//!
//! A session asks the router for a backend when a transaction starts, before anything is leased:
//! the tenant's cluster comes from the placement (`placement`: the token's cluster claim, the
//! clusters' `tenants` lists, else "default"); a read-only transaction (`intent`) goes to that
//! cluster's least busy usable replica (`replica`: reachable and not lagging), and to its primary
//! when there is none. Everything else goes to the primary. Each pool has its own slots, fairness
//! and `[limits]`, so one cluster's load never queues another's tenants.
//!
//! A replica runs the transaction exactly as the primary would (same role, same context statement,
//! same statement guard; prepared statements are prepared again on whichever backend needs them),
//! only read-only: a write there fails as on any hot standby (`25006`).

pub mod intent;
pub mod placement;
pub mod replica;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::backend::{BackendTarget, SessionAttrs};
use crate::config::Config;
use crate::error::{sqlstate, PgError};
use crate::pool::{Lease, Pool, TenantKey};
use placement::Placement;
use replica::Replica;

/// One cluster: its primary's pool and its replicas.
pub struct ClusterPools {
    pub name: String,
    pub primary: Arc<Pool>,
    pub replicas: Vec<Arc<Replica>>,
}

impl ClusterPools {
    /// The usable replica with the fewest transactions running and waiting.
    fn least_busy(&self, max_lag_ms: u64) -> Option<&Arc<Replica>> {
        self.replicas.iter().filter(|r| r.usable(max_lag_ms)).min_by_key(|r| r.pool.busy_count() + r.pool.waiting())
    }
}

pub struct Router {
    clusters: Vec<ClusterPools>,
    /// Cluster names in order (`clusters[i].name`), for claims and placement.
    names: Vec<String>,
    placement: RwLock<Arc<Placement>>,
    max_lag_ms: AtomicU64,
}

/// A config value routing cannot put in force: the key and why.
#[derive(Debug)]
pub struct RouteError {
    pub key: &'static str,
    pub error: String,
}

impl Router {
    /// The clusters of `config`, with `default_pool` (the proxy's tenant pool) as the default
    /// cluster's primary.
    pub fn new(config: &Config, default_pool: Arc<Pool>) -> Result<Arc<Router>, RouteError> {
        let limits = Arc::new(config.limits.clone());
        let err = |key| move |error| RouteError { key, error };
        let mut clusters = Vec::new();
        for (i, spec) in config.cluster_specs().into_iter().enumerate() {
            // a cluster's primary may name several hosts (failover, as `backend.url`)
            let primary = match i {
                0 => default_pool.clone(),
                _ => {
                    let hosts = BackendTarget::all_from_config(&spec.primary).map_err(err("clusters.url"))?;
                    Pool::for_hosts(config, "cluster", hosts, spec.primary.pool_size, limits.clone())
                }
            };
            let mut replicas = Vec::new();
            for (n, r) in spec.replicas.iter().enumerate() {
                // a replica is one server: the first host of its connection string
                let target = BackendTarget::from_config(r).map_err(err(if i == 0 { "backend.replicas" } else { "clusters.replicas" }))?;
                let pool = Pool::for_hosts(config, "replica", (vec![target], SessionAttrs::Any), r.pool_size, limits.clone());
                replicas.push(Replica::new(n, pool));
            }
            clusters.push(ClusterPools { name: spec.name, primary, replicas });
        }
        let names: Vec<String> = clusters.iter().map(|c| c.name.clone()).collect();
        let placement = Placement::new(&config.cluster_specs(), &names).map_err(|error| RouteError { key: "clusters", error })?;
        Ok(Arc::new(Router {
            clusters,
            names,
            placement: RwLock::new(Arc::new(placement)),
            max_lag_ms: AtomicU64::new(config.backend.max_replica_lag_ms),
        }))
    }

    /// Every cluster, "default" first: for `/pools`, `/tenants` and metrics (label by `name`).
    pub fn clusters(&self) -> &[ClusterPools] {
        &self.clusters
    }

    /// Every pool the router leases from: each cluster's primary ("default"'s is the proxy's
    /// tenant pool), then its replicas (console PAUSE/RESUME must reach them all).
    pub fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.clusters.iter().flat_map(|c| std::iter::once(&c.primary).chain(c.replicas.iter().map(|r| &r.pool)))
    }

    /// `backend.max_replica_lag_ms` in force.
    pub fn max_lag_ms(&self) -> u64 {
        self.max_lag_ms.load(Ordering::Relaxed)
    }

    /// The cluster a tenant's next transaction runs on (index into [`Router::clusters`]); an
    /// unknown cluster in the token's claim is a FATAL error.
    pub fn cluster_of(&self, tenant: &str, claimed: Option<&str>) -> Result<usize, PgError> {
        // one cluster and no claim to check: nothing to look up
        if claimed.is_none() && self.clusters.len() == 1 {
            return Ok(0);
        }
        self.placement.read().unwrap_or_else(|p| p.into_inner()).cluster(tenant, claimed, &self.names)
    }

    /// The primary pool of cluster `index` (a login's server facts, a session-mode backend).
    pub fn primary(&self, index: usize) -> &Arc<Pool> {
        &self.clusters[index.min(self.clusters.len() - 1)].primary
    }

    /// Whether cluster `index` has read replicas: only then does a transaction's read-only intent
    /// matter (see [`Router::lease`]).
    pub fn has_replicas(&self, index: usize) -> bool {
        !self.clusters[index.min(self.clusters.len() - 1)].replicas.is_empty()
    }

    /// Leases a backend for a transaction of `tenant` on cluster `index`: on a usable replica when
    /// `read_only`, else (or when no replica is usable or reachable) on the primary. Returns the
    /// pool the lease must go back to. A new connection logs in with `application_name`.
    pub async fn lease(&self, index: usize, tenant: &TenantKey, read_only: bool, application_name: &str) -> Result<(Arc<Pool>, Lease), PgError> {
        let cluster = &self.clusters[index.min(self.clusters.len() - 1)];
        if read_only && !cluster.replicas.is_empty() {
            while let Some(r) = cluster.least_busy(self.max_lag_ms()) {
                match r.pool.acquire(tenant, application_name).await {
                    Ok(lease) => {
                        count(&cluster.name, "replica");
                        return Ok((r.pool.clone(), lease));
                    }
                    Err(e) if e.code == sqlstate::CONNECTION_FAILURE => r.mark_down(),
                    Err(e) => return Err(e),
                }
            }
            count(&cluster.name, "primary");
        }
        let lease = cluster.primary.acquire(tenant, application_name).await?;
        Ok((cluster.primary.clone(), lease))
    }

    /// Applies a reloaded config: placement (for new transactions), pool sizes, limits and the lag
    /// bound. Adding, removing or re-pointing clusters and replicas needs a restart.
    pub fn apply(&self, config: &Config) -> Result<(), &'static str> {
        let specs = config.cluster_specs();
        let same_shape = specs.len() == self.clusters.len()
            && specs.iter().zip(&self.clusters).all(|(s, c)| s.name == c.name && s.replicas.len() == c.replicas.len());
        if !same_shape {
            return Err("adding, removing or renaming [[clusters]] or replicas");
        }
        let placement = Placement::new(&specs, &self.names).map_err(|_| "adding [[clusters]]")?;
        let limits = Arc::new(config.limits.clone());
        let wait = config.query_wait_timeout_ms();
        for (spec, c) in specs.iter().zip(&self.clusters).skip(1) {
            c.primary.resize(spec.primary.pool_size, wait);
            c.primary.set_limits(limits.clone());
        }
        for (spec, c) in specs.iter().zip(&self.clusters) {
            for (r, replica) in spec.replicas.iter().zip(&c.replicas) {
                replica.pool.resize(r.pool_size, wait);
                replica.pool.set_limits(limits.clone());
            }
        }
        self.max_lag_ms.store(config.backend.max_replica_lag_ms, Ordering::Relaxed);
        *self.placement.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(placement);
        Ok(())
    }

    /// Starts the replica monitors and the reapers of the pools the router created (the default
    /// pool's reaper is the server's).
    pub fn spawn_background(&self) {
        for (i, c) in self.clusters.iter().enumerate() {
            if i > 0 {
                c.primary.spawn_reaper();
            }
            for r in &c.replicas {
                r.pool.spawn_reaper();
                r.spawn_monitor(&c.name);
            }
        }
    }
}

/// Counts a read-only transaction by where it went (`replica`, or `primary` for want of one).
fn count(cluster: &str, target: &'static str) {
    ::metrics::counter!(crate::metrics::READ_ONLY_ROUTES, "cluster" => cluster.to_string(), "target" => target).increment(1);
}
