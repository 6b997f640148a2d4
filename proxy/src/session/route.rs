//! Where the session's next transaction runs, decided before its backend is leased (see
//! `crate::routing`): the tenant's cluster, and a read replica when the transaction reads only.

use std::sync::Arc;

use super::{Session, Shared, Who};
use crate::error::PgError;
use crate::pool::{Lease, Pool};
use crate::routing::intent;

/// The primary of the tenant's cluster now: where a session-mode backend comes from.
pub(super) fn home_pool(shared: &Shared, who: &Who) -> Arc<Pool> {
    match shared.router.cluster_of(&who.tenant, who.cluster.as_deref()) {
        Ok(i) => shared.router.primary(i).clone(),
        Err(_) => shared.pool.clone(), // checked at login; clusters do not change at run time
    }
}

impl Session {
    /// Leases the backend for a transaction whose first statement names access mode `access` (if
    /// any): a trusted worker and a session-mode client always use their own pool; everyone else
    /// goes where the router says.
    pub(super) async fn lease_for(&mut self, access: Option<intent::Mode>) -> Result<Lease, PgError> {
        if self.who.bypass || self.shared.session_mode {
            return self.pool.acquire(&self.who.tenant, self.settings.application_name()).await;
        }
        let router = self.shared.router.clone();
        let cluster = router.cluster_of(&self.who.tenant, self.who.cluster.as_deref())?;
        let read_only = router.has_replicas(cluster)
            && intent::wants_replica(access, self.settings.read_only_default(), self.who.prefers_standby);
        let (pool, lease) = router.lease(cluster, &self.who.tenant, read_only, self.settings.application_name()).await?;
        self.pool = pool;
        Ok(lease)
    }
}
