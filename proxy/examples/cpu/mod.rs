//! CPU accounting for the benchmark examples (`signed_tps`, `replica_tps`): clock ticks read from
//! /proc, so a run can say what each process spent per transaction, and the figures read from
//! pgbench's output. Linux only; elsewhere every count is 0. Also the setup both examples share (their
//! arguments and the loaded cluster). Shared as a module (`mod cpu;`), not an example of its own.

use std::collections::HashMap;
use std::path::Path;

use pgtenant::cluster::Cluster;

/// The examples' arguments, `[seconds per run] [rounds] [clients]` (default 10, 3, 32).
pub fn run_args() -> (u64, u64, u64) {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    (args.first().copied().unwrap_or(10), args.get(1).copied().unwrap_or(3), args.get(2).copied().unwrap_or(32))
}

/// A throwaway cluster with the RLS fixture and `rows` orders spread over its three tenants,
/// analyzed.
pub fn cluster_with_orders(rows: u32) -> Result<Cluster, String> {
    let cluster = Cluster::start().map_err(|e| e.to_string())?;
    cluster.load_rls_fixture().map_err(|e| e.to_string())?;
    cluster
        .psql("app", &format!("INSERT INTO orders (tenant_id, user_sub, amount) SELECT 1 + g % 3, 'bench', g FROM generate_series(1, {rows}) g"))
        .map_err(|e| e.to_string())?;
    cluster.psql("app", "VACUUM ANALYZE orders").map_err(|e| e.to_string())?;
    Ok(cluster)
}

/// Clock ticks per second (USER_HZ on Linux).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// CPU clock ticks (user + system) of `ppid`'s children, by pid: a postmaster's backends.
pub fn children_ticks(ppid: u32) -> HashMap<u32, u64> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // after the name: state, ppid, …; utime and stime are fields 14 and 15 of the line
        if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(ppid) {
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            out.insert(pid, t(11) + t(12));
        }
    }
    out
}

/// Ticks the children in `after` spent since `before` (a child new since then counts in full).
pub fn children_delta(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> u64 {
    after.iter().map(|(pid, t)| t - before.get(pid).copied().unwrap_or(0).min(*t)).sum()
}

/// This process's CPU ticks (the proxy runs in it) and those of its finished children (pgbench).
pub fn own_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<u64> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect()).unwrap_or_default();
    let t = |i: usize| f.get(i).copied().unwrap_or(0);
    (t(11) + t(12), t(13) + t(14))
}

/// The postmaster's pid, from the first line of `postmaster.pid` in its data directory.
pub fn postmaster_pid(data_dir: &Path) -> Result<u32, String> {
    std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
        .ok_or_else(|| format!("no postmaster.pid in {}", data_dir.display()))
}

/// (TPS, transactions) of a finished pgbench run; its output in the error when it has none.
pub fn pgbench_result(out: &std::process::Output) -> Result<(f64, f64), String> {
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| text.lines().find_map(|l| l.strip_prefix(prefix).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse::<f64>().ok()));
    match (field("tps = "), field("number of transactions actually processed: ")) {
        (Some(t), Some(n)) if n > 0.0 => Ok((t, n)),
        _ => Err(format!("pgbench: {text}{}", String::from_utf8_lossy(&out.stderr))),
    }
}
