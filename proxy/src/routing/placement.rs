//! Which cluster a tenant's transactions run on: the `tenants` lists of `[[clusters]]`, or the
//! cluster its token names (`tenant.cluster_claim`), else "default". Rebuilt on every reload; the
//! clusters themselves (names, URLs, pools) are fixed at start.

use std::collections::HashMap;

use crate::config::routing::ClusterSpec;
use crate::error::{sqlstate, PgError};

#[derive(Debug, Default)]
pub struct Placement {
    /// Tenant id → index of its cluster (tenants not listed are on cluster 0, "default").
    by_tenant: HashMap<String, usize>,
}

impl Placement {
    /// From the clusters' `tenants` lists; `names` are the running clusters, in order. A list on a
    /// cluster that is not running is an error (adding clusters needs a restart).
    pub fn new(specs: &[ClusterSpec], names: &[String]) -> Result<Placement, String> {
        let mut by_tenant = HashMap::new();
        for spec in specs {
            let Some(index) = names.iter().position(|n| *n == spec.name) else {
                return Err(spec.name.clone());
            };
            for t in &spec.tenants {
                by_tenant.insert(t.clone(), index);
            }
        }
        Ok(Placement { by_tenant })
    }

    /// The cluster for `tenant`: the one its token names (`claimed`), else its listed one, else 0.
    pub fn cluster(&self, tenant: &str, claimed: Option<&str>, names: &[String]) -> Result<usize, PgError> {
        match claimed {
            Some(name) => names.iter().position(|n| n == name).ok_or_else(|| unknown_cluster(name, names)),
            None => Ok(self.by_tenant.get(tenant).copied().unwrap_or(0)),
        }
    }
}

/// FATAL for a token naming a cluster pgtenant does not have.
pub fn unknown_cluster(name: &str, names: &[String]) -> PgError {
    PgError::fatal(
        sqlstate::REJECTED_CONNECTION,
        format!("pgtenant: the token names cluster \"{}\", which this proxy does not have", name.chars().take(64).collect::<String>()),
    )
    .with_hint(format!("tenant.cluster_claim must name one of: {}", names.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_win_then_lists_then_default() {
        let cfg = crate::config::Config::from_toml(
            "[backend]\nurl = \"postgres://u@a/app\"\n[jwt]\nsecret = \"0123456789abcdef0123\"\n\
             [[clusters]]\nname = \"eu\"\nurl = \"postgres://u@b/app\"\ntenants = [\"42\"]\n",
            &|_| None,
        )
        .unwrap();
        let names = vec!["default".to_string(), "eu".to_string()];
        let p = Placement::new(&cfg.cluster_specs(), &names).unwrap();
        assert_eq!(p.cluster("42", None, &names).unwrap(), 1);
        assert_eq!(p.cluster("7", None, &names).unwrap(), 0);
        assert_eq!(p.cluster("42", Some("default"), &names).unwrap(), 0);
        assert_eq!(p.cluster("7", Some("eu"), &names).unwrap(), 1);
        let e = p.cluster("7", Some("us"), &names).unwrap_err();
        assert_eq!((e.code, e.severity), (sqlstate::REJECTED_CONNECTION, crate::error::Severity::Fatal));
        assert!(Placement::new(&cfg.cluster_specs(), &names[..1]).is_err());
    }
}
