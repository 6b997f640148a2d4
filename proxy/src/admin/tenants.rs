//! Per-tenant visibility without label explosion.
//!
//! `/tenants` lists the busiest tenants (JSON) from the pool's own counters. Prometheus gets
//! per-tenant series only for the tenants `[admin] metrics_tenants` names and the current top
//! `metrics_top_tenants`; they are computed at scrape time, so a tenant that leaves the top leaves
//! no stale series behind and the number of label values stays bounded by the config.

use std::fmt::Write;

use crate::metrics as names;
use crate::pool::fair::TenantStats;

use super::Source;

/// Orders tenants for "top" lists.
#[derive(Clone, Copy)]
enum By {
    /// active + waiting, then transactions
    Load,
    Active,
    Waiting,
    Transactions,
    Wait,
}

/// Tenants (with their cluster), busiest first by `by`, then by name.
fn sort(stats: &mut [(String, TenantStats)], by: By) {
    let key = |t: &TenantStats| -> (f64, f64) {
        match by {
            By::Load => ((t.active + t.waiting) as f64, t.transactions as f64),
            By::Active => (t.active as f64, t.transactions as f64),
            By::Waiting => (t.waiting as f64, t.wait_seconds_total),
            By::Transactions => (t.transactions as f64, 0.0),
            By::Wait => (t.wait_seconds_total, 0.0),
        }
    };
    stats.sort_by(|(_, a), (_, b)| key(b).partial_cmp(&key(a)).unwrap_or(std::cmp::Ordering::Equal).then_with(|| a.tenant.cmp(&b.tenant)));
}

/// A per-tenant metric: name, type, help text, and its value for one tenant.
type Series = (&'static str, &'static str, &'static str, fn(&TenantStats) -> f64);

/// `GET /tenants?top=N&by=load|active|waiting|transactions|wait`.
pub fn json(proxy: &impl Source, query: &str) -> Result<String, String> {
    let (mut top, mut by) = (20usize, By::Load);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("top", n) => top = n.parse().map_err(|_| format!("top must be a number, not \"{n}\""))?,
            ("by", "load") => by = By::Load,
            ("by", "active") => by = By::Active,
            ("by", "waiting") => by = By::Waiting,
            ("by", "transactions") => by = By::Transactions,
            ("by", "wait") => by = By::Wait,
            ("by", other) => return Err(format!("by must be load, active, waiting, transactions or wait, not \"{other}\"")),
            (other, _) => return Err(format!("unknown parameter \"{other}\" (top, by)")),
        }
    }
    let pool = proxy.pool();
    let mut stats = gather(proxy);
    let tracked = stats.len();
    sort(&mut stats, by);
    stats.truncate(top);
    let stats: Vec<serde_json::Value> = stats
        .into_iter()
        .map(|(cluster, t)| {
            let mut v = serde_json::to_value(t).unwrap_or_default();
            v["cluster"] = cluster.into();
            v
        })
        .collect();
    let bypass = proxy.bypass_pool().map(|b| {
        let s = b.tenant_stats();
        serde_json::json!({
            "pool_size": b.size(),
            "active": s.iter().map(|t| t.active).sum::<usize>(),
            "waiting": s.iter().map(|t| t.waiting).sum::<usize>(),
            "transactions": s.iter().map(|t| t.transactions).sum::<u64>(),
        })
    });
    Ok(serde_json::json!({
        "pool_size": pool.size(),
        "tracked": tracked,
        "tenants": stats,
        "bypass": bypass,
    })
    .to_string())
}

/// Prometheus text for the tenants the config selects (appended to `/metrics`).
pub fn metrics_text(proxy: &impl Source) -> String {
    let cfg = proxy.config();
    let (named, top) = (&cfg.admin.metrics_tenants, cfg.admin.metrics_top_tenants);
    if named.is_empty() && top == 0 {
        return String::new();
    }
    let mut stats = gather(proxy);
    sort(&mut stats, By::Load);
    // with [[clusters]], every series names its cluster (a bounded label: the configured names)
    let by_cluster = proxy.router().is_some_and(|r| r.clusters().len() > 1);
    let chosen: Vec<&(String, TenantStats)> = stats
        .iter()
        .enumerate()
        .filter(|(i, (_, t))| *i < top || named.contains(&t.tenant))
        .map(|(_, t)| t)
        .collect();
    let mut out = String::new();
    let series: [Series; 5] = [
        (names::TENANT_ACTIVE, "gauge", "transactions of the tenant holding a pooled connection", |t| t.active as f64),
        (names::TENANT_WAITING, "gauge", "transactions of the tenant waiting for a pooled connection", |t| t.waiting as f64),
        (names::TENANT_TRANSACTIONS, "counter", "transactions of the tenant that got a pooled connection", |t| t.transactions as f64),
        (names::TENANT_WAIT_SECONDS, "counter", "seconds the tenant's transactions waited for a connection", |t| t.wait_seconds_total),
        (names::TENANT_LIMIT_REFUSALS, "counter", "transactions of the tenant refused by a limit or the wait timeout", |t| t.limit_refusals as f64),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (cluster, t) in &chosen {
            if by_cluster {
                let _ = writeln!(out, "{name}{{tenant=\"{}\",cluster=\"{}\"}} {}", escape(&t.tenant), escape(cluster), value(t));
            } else {
                let _ = writeln!(out, "{name}{{tenant=\"{}\"}} {}", escape(&t.tenant), value(t));
            }
        }
    }
    out
}

/// Every tenant's counters with the name of the cluster it runs on: each cluster's primary pool
/// and its replicas' pools added up (`[backend]` alone: the one pool, cluster `default`).
fn gather(proxy: &impl Source) -> Vec<(String, TenantStats)> {
    let clusters = proxy.router().map(|r| r.clusters()).unwrap_or_default();
    if clusters.is_empty() {
        return proxy.pool().tenant_stats().into_iter().map(|t| ("default".to_string(), t)).collect();
    }
    let mut out = Vec::new();
    for c in clusters {
        let mut merged: Vec<TenantStats> = c.primary.tenant_stats();
        for r in &c.replicas {
            for t in r.pool.tenant_stats() {
                match merged.iter_mut().find(|m| m.tenant == t.tenant) {
                    Some(m) => {
                        m.active += t.active;
                        m.waiting += t.waiting;
                        m.transactions += t.transactions;
                        m.wait_seconds_total += t.wait_seconds_total;
                        m.limit_refusals += t.limit_refusals;
                    }
                    None => merged.push(t),
                }
            }
        }
        out.extend(merged.into_iter().map(|t| (c.name.clone(), t)));
    }
    out
}

/// Escapes a label value (backslash, quote, newline) as the exposition format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
