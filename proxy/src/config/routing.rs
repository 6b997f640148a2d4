//! The routing keys: read replicas of a cluster (`backend.replicas`) and more clusters with the
//! tenants placed on them (`[[clusters]]`, `tenant.cluster_claim`). Kept apart from `[backend]`'s
//! own keys so that what routing adds is read and checked in one place (see `crate::routing`).

use serde::{Deserialize, Serialize, Serializer};

use super::{BackendConfig, Config};

/// The cluster `[backend]` describes, and the one tenants placed nowhere else use.
pub const DEFAULT_CLUSTER: &str = "default";

/// One `[[clusters]]` entry: a primary, its replicas, its pool, and the tenants placed on it.
/// Everything else about its connections (TLS, timeouts, lifetimes) is `[backend]`'s.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Its name in claims, `/pools`, `/tenants` and metric labels (letters, digits, `_`, `-`).
    pub name: String,
    /// `postgres://user:password@host:port/dbname` of the restricted role on this cluster.
    #[serde(serialize_with = "masked_url")]
    pub url: String,
    /// Streaming standbys of `url` (each used with its first host).
    #[serde(default, serialize_with = "masked_urls")]
    pub replicas: Vec<String>,
    /// Connections to the primary; `backend.pool_size` when unset.
    #[serde(default)]
    pub pool_size: Option<usize>,
    /// Connections per replica; the cluster's pool size when unset.
    #[serde(default)]
    pub replica_pool_size: Option<usize>,
    /// Tenant ids (the value of the first `tenant.settings` entry) placed on this cluster.
    #[serde(default)]
    pub tenants: Vec<String>,
}

/// What routing needs of one cluster, the default one included, resolved against `[backend]`.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub name: String,
    pub primary: BackendConfig,
    pub replicas: Vec<BackendConfig>,
    pub tenants: Vec<String>,
}

impl Config {
    /// Every cluster, "default" (`[backend]`) first, with the pool sizes and URLs filled in.
    pub fn cluster_specs(&self) -> Vec<ClusterSpec> {
        let replicas = |base: &BackendConfig, urls: &[String], size: usize| -> Vec<BackendConfig> {
            urls.iter().map(|u| BackendConfig { url: u.clone(), pool_size: size, replicas: Vec::new(), ..base.clone() }).collect()
        };
        let b = &self.backend;
        let mut specs = vec![ClusterSpec {
            name: DEFAULT_CLUSTER.into(),
            primary: BackendConfig { replicas: Vec::new(), ..b.clone() },
            replicas: replicas(b, &b.replicas, b.replica_pool_size.unwrap_or(b.pool_size)),
            tenants: Vec::new(),
        }];
        for c in &self.clusters {
            let size = c.pool_size.unwrap_or(b.pool_size);
            specs.push(ClusterSpec {
                name: c.name.clone(),
                primary: BackendConfig { url: c.url.clone(), pool_size: size, replicas: Vec::new(), ..b.clone() },
                replicas: replicas(b, &c.replicas, c.replica_pool_size.unwrap_or(size)),
                tenants: c.tenants.clone(),
            });
        }
        specs
    }
}

/// `url` with its password masked, in either form (`SHOW CONFIG` shows lists of URLs as values,
/// so they are masked when serialized).
pub fn mask_password(url: &str) -> String {
    const MASK: &str = "********";
    if let Some((scheme, rest)) = url.split_once("://") {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let masked_tail = match tail.split_once('?') {
            Some((path, query)) => format!("{path}?{}", mask_key_values(query, '&', MASK)),
            None => tail.to_string(),
        };
        return match authority.rfind('@') {
            Some(at) => match authority[..at].split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:{MASK}{}{masked_tail}", &authority[at..]),
                None => format!("{scheme}://{authority}{masked_tail}"),
            },
            None => format!("{scheme}://{authority}{masked_tail}"),
        };
    }
    mask_key_values(url, ' ', MASK)
}

/// `password=…` pairs separated by `sep` with the value masked. In the key/value form (`sep` a
/// space) a value may be quoted (`password='a b\'c'`): the whole quoted value is masked.
fn mask_key_values(s: &str, sep: char, mask: &str) -> String {
    if sep == ' ' {
        return mask_conninfo(s, mask);
    }
    let parts: Vec<String> = s
        .split(sep)
        .map(|p| match p.split_once('=') {
            Some((k, _)) if k.trim().eq_ignore_ascii_case("password") => format!("{k}={mask}"),
            _ => p.to_string(),
        })
        .collect();
    parts.join(&sep.to_string())
}

/// libpq's `key = value` form with every `password` value masked, quoted or not.
fn mask_conninfo(s: &str, mask: &str) -> String {
    let b = s.as_bytes();
    let (mut out, mut i) = (String::with_capacity(s.len()), 0);
    while i < b.len() {
        // a key: up to '=' (or the end)
        let key_start = i;
        while i < b.len() && b[i] != b'=' {
            i += 1;
        }
        let key = s[key_start..i].trim();
        out.push_str(&s[key_start..i]);
        if i == b.len() {
            break;
        }
        out.push('=');
        i += 1;
        while i < b.len() && b[i] == b' ' {
            out.push(' ');
            i += 1;
        }
        // the value: quoted (backslash escapes) or up to the next space
        let value_start = i;
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
        } else {
            while i < b.len() && b[i] != b' ' {
                i += 1;
            }
        }
        let value = s.get(value_start..i).unwrap_or("");
        let shown = if key.eq_ignore_ascii_case("password") { mask } else { value };
        out.push_str(shown);
        // the separator
        while i < b.len() && b[i] == b' ' {
            out.push(' ');
            i += 1;
        }
    }
    out
}

pub fn masked_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&mask_password(url))
}

pub fn masked_urls<S: Serializer>(urls: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(urls.iter().map(|u| mask_password(u)))
}

/// The same forms as `backend.url` (URL or key/value, several hosts).
fn check_url(key: &str, url: &str) -> Result<(), String> {
    crate::conninfo::parse(url).map(|_| ()).map_err(|e| format!("{key} {e}"))
}

fn check_size(key: &str, size: Option<usize>) -> Result<(), String> {
    match size {
        Some(n) if !(1..=10_000).contains(&n) => Err(format!("{key} must be between 1 and 10000")),
        _ => Ok(()),
    }
}

/// Checks the routing keys: URLs, sizes, unique cluster names, each tenant placed once.
pub fn validate(cfg: &Config) -> Result<(), String> {
    for (i, r) in cfg.backend.replicas.iter().enumerate() {
        check_url(&format!("backend.replicas[{i}]"), r)?;
    }
    check_size("backend.replica_pool_size", cfg.backend.replica_pool_size)?;
    if cfg.tenant.cluster_claim.as_deref() == Some("") {
        return Err("tenant.cluster_claim is empty".into());
    }
    let mut names = std::collections::BTreeSet::from([DEFAULT_CLUSTER]);
    let mut placed = std::collections::BTreeMap::new();
    for c in &cfg.clusters {
        let valid = !c.name.is_empty() && c.name.len() <= 63 && c.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(format!("clusters: invalid name `{}` (1-63 letters, digits, '_' or '-')", c.name));
        }
        if !names.insert(&c.name) {
            return Err(format!("clusters: the name `{}` is used twice (\"default\" is [backend])", c.name));
        }
        check_url(&format!("clusters.{}.url", c.name), &c.url)?;
        for (i, r) in c.replicas.iter().enumerate() {
            check_url(&format!("clusters.{}.replicas[{i}]", c.name), r)?;
        }
        check_size(&format!("clusters.{}.pool_size", c.name), c.pool_size)?;
        check_size(&format!("clusters.{}.replica_pool_size", c.name), c.replica_pool_size)?;
        for t in &c.tenants {
            if let Some(other) = placed.insert(t.as_str(), c.name.as_str()) {
                return Err(format!("clusters: tenant `{t}` is placed on both `{other}` and `{}`", c.name));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<Config, crate::config::ConfigError> {
        let text = format!(
            "[backend]\nurl = \"postgres://u:p@db/app\"\npool_size = 7\nreplicas = [\"postgres://u:p@r1:5433,r2/app\"]\n\
             [jwt]\nsecret = \"0123456789abcdef0123\"\n[tenant]\nsettings = {{ \"app.tenant_id\" = \"tenant_id\" }}\n{extra}"
        );
        Config::from_toml(&text, &|_| None)
    }

    #[test]
    fn specs_fill_in_sizes_and_replicas_use_their_first_host() {
        let cfg = config("[[clusters]]\nname = \"eu\"\nurl = \"postgres://u:p@eu/app\"\nreplica_pool_size = 2\nreplicas = [\"postgres://u:p@eu-r/app\"]\ntenants = [\"42\"]\n").unwrap();
        let specs = cfg.cluster_specs();
        assert_eq!(specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["default", "eu"]);
        // a replica is one server: the first host of its connection string
        let replica = crate::backend::BackendTarget::from_config(&specs[0].replicas[0]).unwrap();
        assert_eq!(replica.address(), "r1:5433");
        assert_eq!((specs[0].replicas[0].pool_size, specs[1].primary.pool_size, specs[1].replicas[0].pool_size), (7, 7, 2));
        assert_eq!(specs[1].tenants, ["42"]);
    }

    #[test]
    fn urls_are_serialized_without_passwords() {
        assert_eq!(mask_password("postgres://u:s3cret@h1:5432,h2/app?password=x&sslmode=require"), "postgres://u:********@h1:5432,h2/app?password=********&sslmode=require");
        assert_eq!(mask_password("postgres://u@h/app"), "postgres://u@h/app");
        assert_eq!(mask_password("host=a,b user=u password=s3cret dbname=app"), "host=a,b user=u password=******** dbname=app");
        assert_eq!(
            mask_password(r"host=a password = 'two words \' s3cret' dbname=app"),
            "host=a password = ******** dbname=app"
        );
        assert_eq!(mask_password("password=s3cret"), "password=********");
        let cfg = config("[[clusters]]\nname = \"eu\"\nurl = \"postgres://u:s3cret@eu/app\"\nreplicas = [\"postgres://u:s3cret@eu-r/app\"]\n").unwrap();
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(!json.contains("s3cret") && !json.contains("u:p@r1"), "{json}");
    }

    #[test]
    fn rejects_bad_routing_keys() {
        let bad = |extra: &str| config(extra).unwrap_err().to_string();
        assert!(bad("[[clusters]]\nname = \"default\"\nurl = \"postgres://u@x/app\"\n").contains("used twice"));
        assert!(bad("[[clusters]]\nname = \"a b\"\nurl = \"postgres://u@x/app\"\n").contains("invalid name"));
        assert!(bad("[[clusters]]\nname = \"a\"\nurl = \"mysql://u@x/app\"\n").contains("clusters.a.url"));
        let twice = "[[clusters]]\nname = \"a\"\nurl = \"postgres://u@x/app\"\ntenants = [\"1\"]\n[[clusters]]\nname = \"b\"\nurl = \"postgres://u@y/app\"\ntenants = [\"1\"]\n";
        assert!(bad(twice).contains("placed on both"));
        let env = |k: &str| (k == "PGTENANT_BACKEND_MAX_REPLICA_LAG_MS").then(|| "250".to_string());
        let text = "[backend]\nurl = \"postgres://u:p@db/app\"\n[jwt]\nsecret = \"0123456789abcdef0123\"\n";
        assert_eq!(Config::from_toml(text, &env).unwrap().backend.max_replica_lag_ms, 250);
        let env = |k: &str| (k == "PGTENANT_BACKEND_REPLICAS").then(|| "postgres://u@r1/app, nonsense".to_string());
        assert!(Config::from_toml(text, &env).unwrap_err().to_string().contains("backend.replicas[1]"));
    }
}
