//! The database servers the doctor checks: every server pgtenant may run a tenant's transaction
//! on. That is each host of `backend.url` (a multi-host URL lists a primary and the standbys that
//! may replace it), each read replica (`backend.replicas`), and the same for every `[[clusters]]`
//! entry. A logical replica or another cluster has its own catalog (policies, grants, the signed
//! context), so a finding on one server says nothing about the others. The bypass pool's role is
//! meant to bypass row-level security and is not checked.

use crate::backend::BackendTarget;
use crate::config::{BackendConfig, Config};

/// One server to check, as the restricted role of its cluster.
pub struct Endpoint {
    /// The cluster it belongs to (`default` is `[backend]`).
    pub cluster: String,
    /// `primary` for a host of the cluster's URL (the primary or a standby that may be promoted),
    /// `replica` for a read replica.
    pub kind: &'static str,
    pub target: BackendTarget,
}

impl Endpoint {
    /// `cluster kind host:port`, for reports and errors (never the password).
    pub fn label(&self) -> String {
        format!("{} {} {}", self.cluster, self.kind, self.target.address())
    }
}

/// Every server of `cfg`, each once (a server named twice, with the same database and role, is
/// checked once): the clusters in config order, "default" first, each with its URL's hosts and
/// then its replicas (the first host of each replica's URL, the one pgtenant uses).
pub fn endpoints(cfg: &Config) -> Result<Vec<Endpoint>, String> {
    let mut out: Vec<Endpoint> = Vec::new();
    for (i, spec) in cfg.cluster_specs().into_iter().enumerate() {
        let (url_key, replicas_key) = if i == 0 { ("backend.url", "backend.replicas") } else { ("clusters.url", "clusters.replicas") };
        let (hosts, _) = BackendTarget::all_from_config(&spec.primary).map_err(|e| format!("{url_key} ({}): {e}", spec.name))?;
        let mut found: Vec<(&'static str, BackendTarget)> = hosts.into_iter().map(|t| ("primary", t)).collect();
        for r in &spec.replicas {
            found.push(("replica", BackendTarget::from_config(r).map_err(|e| format!("{replicas_key} ({}): {e}", spec.name))?));
        }
        for (kind, target) in found {
            let same = |e: &Endpoint| e.target.address() == target.address() && e.target.database == target.database && e.target.user == target.user;
            if !out.iter().any(same) {
                out.push(Endpoint { cluster: spec.name.clone(), kind, target });
            }
        }
    }
    Ok(out)
}

/// The login for `endpoint` with `--admin-url`: the first endpoint (the first host of
/// `backend.url`) uses the admin URL as given, as the doctor always has (a Unix socket with peer
/// authentication, say); every other endpoint its own server and database with the admin URL's user
/// and password, so one owner or superuser login checks them all.
pub fn as_admin(endpoint: usize, target: &BackendTarget, admin_url: &str, backend: &BackendConfig) -> Result<BackendTarget, String> {
    let admin = BackendTarget::from_config(&BackendConfig { url: admin_url.to_string(), ..backend.clone() }).map_err(|e| format!("--admin-url: {e}"))?;
    Ok(match endpoint {
        0 => admin,
        _ => BackendTarget { user: admin.user, password: admin.password, ..target.clone() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_host_replica_and_cluster_once() {
        let cfg: Config = toml::from_str(
            "[backend]\nurl = \"postgres://app:pw@h1:5432,h2:5433/app\"\nreplicas = [\"postgres://app:pw@r1:5434,r9:1/app\", \"postgres://app:pw@h2:5433/app\"]\n\
             [[clusters]]\nname = \"eu\"\nurl = \"postgres://eu_app:pw@e1:5432/eu\"\nreplicas = [\"postgres://eu_app:pw@e2:5432/eu\"]\n",
        )
        .unwrap();
        let all = endpoints(&cfg).unwrap();
        let labels: Vec<String> = all.iter().map(|e| format!("{} {}", e.label(), e.target.user)).collect();
        assert_eq!(
            labels,
            ["default primary h1:5432 app", "default primary h2:5433 app", "default replica r1:5434 app", "eu primary e1:5432 eu_app", "eu replica e2:5432 eu_app"]
        );
        let url = "postgres://owner:secret@elsewhere:1/other";
        let admin = as_admin(3, &all[3].target, url, &cfg.backend).unwrap();
        assert_eq!((admin.user.as_str(), admin.password.as_deref(), admin.address(), admin.database.as_str()), ("owner", Some("secret"), "e1:5432".into(), "eu"));
        let first = as_admin(0, &all[0].target, url, &cfg.backend).unwrap();
        assert_eq!((first.user.as_str(), first.address(), first.database.as_str()), ("owner", "elsewhere:1".into(), "other"));
    }
}
