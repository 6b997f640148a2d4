//! The pools an operator looks at, in one list: the tenant pool, the bypass pool, and every
//! cluster's primary and read replicas (`crate::routing`). `/pools` renders it as JSON and the
//! console's `SHOW POOLS` as rows, so both always show the same pools.

use super::Source;
use crate::pool::Pool;
use crate::routing::replica::Replica;

/// One pool and where it sits.
pub struct Listed<'a> {
    /// Its name in metrics and on the console: `tenant` (the default cluster's primary), `bypass`,
    /// `cluster` (another cluster's primary) or `replica`.
    pub label: &'static str,
    /// The cluster it belongs to; `None` for the bypass pool (routing never uses it), and for every
    /// pool of a proxy without routing.
    pub cluster: Option<&'a str>,
    pub pool: &'a Pool,
    /// The replica it is the pool of, for a read replica's pool.
    pub replica: Option<&'a Replica>,
}

impl Listed<'_> {
    /// `primary` (a pool to a cluster's primary, or the bypass pool) or `replica`.
    pub fn role(&self) -> &'static str {
        if self.replica.is_some() { "replica" } else { "primary" }
    }
}

/// Every pool, each once: the tenant pool, the bypass pool, then each cluster's replicas and its
/// other pools in config order ("default" first, whose primary is the tenant pool).
pub fn list(proxy: &impl Source) -> Vec<Listed<'_>> {
    let clusters = proxy.router().map(|r| r.clusters()).unwrap_or_default();
    let mut out = vec![Listed { label: "tenant", cluster: clusters.first().map(|c| c.name.as_str()), pool: proxy.pool(), replica: None }];
    out.extend(proxy.bypass_pool().map(|pool| Listed { label: "bypass", cluster: None, pool, replica: None }));
    for (i, c) in clusters.iter().enumerate() {
        let cluster = Some(c.name.as_str());
        if i > 0 {
            out.push(Listed { label: "cluster", cluster, pool: &c.primary, replica: None });
        }
        out.extend(c.replicas.iter().map(|r| Listed { label: "replica", cluster, pool: &r.pool, replica: Some(&**r) }));
    }
    out
}
