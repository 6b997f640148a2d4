//! Benchmark (issue 18): a read-heavy mix through pgtenant without a read replica and with one, on
//! one throwaway cluster and a streaming standby of it (`Cluster::start_standby`). Nine read-only
//! transactions (`BEGIN READ ONLY; SELECT …; COMMIT`, routed to `backend.replicas`) for every
//! write transaction (on the primary); the two proxies run in this process with the same
//! `pool_size` (and `replica_pool_size` the same again), and their runs interleave. Prints TPS of
//! each, the ratio, the share of read-only transactions that ran on the standby (from
//! `pgtenant_read_only_transactions_total`, cross-checked by the standby's own commit count) and
//! CPU per transaction. docs/benchmarks.md ("Read replicas") records a run.
//!
//!     cargo run --release -p pgtenant --example replica_tps [-- SECONDS ROUNDS CLIENTS]

mod cpu;

use std::process::Command;
use std::time::{Duration, Instant};

use pgtenant::cluster::Cluster;
use pgtenant::config::Config;
use pgtenant::server::Running;

const ROWS: u32 = 200_000;
const POOL: u32 = 8;
const READ: &str = "\\set id random(1, 200000)\nBEGIN READ ONLY;\nSELECT id, tenant_id, amount FROM orders WHERE id = :id;\nCOMMIT;\n";
const WRITE: &str = "\\set id random(1, 200000)\nBEGIN;\nUPDATE orders SET amount = amount + 1 WHERE id = :id;\nCOMMIT;\n";
const SECRET: &str = "replica-tps-benchmark-jwt-secret-0123456789";

/// `pgtenant_read_only_transactions_total` of this process, summed over clusters: (on the primary,
/// on a replica). Both proxies record into the one process-wide recorder, so callers take deltas.
fn read_only_routes() -> (f64, f64) {
    let text = pgtenant::metrics::recorder().render();
    let (mut primary, mut replica) = (0.0, 0.0);
    for line in text.lines().filter(|l| l.starts_with(pgtenant::metrics::READ_ONLY_ROUTES)) {
        let value = line.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()).unwrap_or(0.0);
        if line.contains("target=\"replica\"") {
            replica += value;
        } else if line.contains("target=\"primary\"") {
            primary += value;
        }
    }
    (primary, replica)
}

/// Transactions committed in database `app` on `server`, as its own statistics count them.
fn commits(server: &Cluster) -> Result<f64, String> {
    let out = server.psql("app", "SELECT xact_commit FROM pg_stat_database WHERE datname = 'app'").map_err(|e| e.to_string())?;
    out.trim().parse().map_err(|_| format!("xact_commit: {out:?}"))
}

/// One proxy in front of `cluster`, with `replicas` (TOML array items) as `backend.replicas`.
async fn proxy(cluster: &Cluster, replicas: &str) -> Result<Running, String> {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[backend]\nurl = \"{}\"\npool_size = {POOL}\nreplicas = [{replicas}]\n\
         [jwt]\nsecret = \"{SECRET}\"\n[tenant]\nsettings = {{ \"app.tenant_id\" = \"tenant_id\", \"app.user_id\" = \"sub\" }}\n\
         [log]\nlevel = \"warn\"\n",
        cluster.url("app_user", "app-secret", "app")
    );
    let cfg = Config::from_toml(&text, &|_| None).map_err(|e| e.to_string())?;
    pgtenant::server::start(cfg).await.map_err(|e| e.to_string())
}

/// What one pgbench run measured.
struct Run {
    tps: f64,
    /// CPU µs per transaction: primary's Postgres, standby's Postgres, pgtenant, pgbench.
    cpu: [f64; 4],
    /// Read-only transactions routed (primary, replica) during the run.
    routes: (f64, f64),
}

fn main() -> Result<(), String> {
    let (secs, rounds, clients) = cpu::run_args();
    let cluster = cpu::cluster_with_orders(ROWS)?;
    // copied after the load, so the standby starts with the data instead of replaying it
    let standby = cluster.start_standby().map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| e.to_string())?;
    let alone = rt.block_on(proxy(&cluster, ""))?;
    let replica_url = standby.url("app_user", "app-secret", "app");
    let with = rt.block_on(proxy(&cluster, &format!("\"{replica_url}\"")))?;
    // the replica is used only once its monitor has checked it
    let router = with.proxy.shared.router.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !router.clusters()[0].replicas[0].usable(router.max_lag_ms()) {
        if Instant::now() > deadline {
            return Err("the replica monitor never found the standby usable".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let token = pgtenant::jwt::mint_hs(
        &serde_json::json!({"tenant_id": 1, "sub": "bench", "exp": 4_000_000_000u64}),
        SECRET.as_bytes(),
        jsonwebtoken::Algorithm::HS256,
    );
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (read, write) = (dir.path().join("read.sql"), dir.path().join("write.sql"));
    std::fs::write(&read, READ).map_err(|e| e.to_string())?;
    std::fs::write(&write, WRITE).map_err(|e| e.to_string())?;
    let pgbench = Cluster::find_bindir().map_err(|e| e.to_string())?.join("pgbench");
    let (primary_pm, standby_pm) = (cpu::postmaster_pid(&cluster.data_dir())?, cpu::postmaster_pid(&standby.data_dir())?);
    let run = |target: &Running, mode: &str| -> Result<Run, String> {
        let (p0, s0, me0, r0) = (cpu::children_ticks(primary_pm), cpu::children_ticks(standby_pm), cpu::own_ticks(), read_only_routes());
        let out = Command::new(&pgbench)
            .args(["-n", "-c", &clients.to_string(), "-j", "2", "-T", &secs.to_string(), "-M", mode])
            .arg("-f")
            .arg(format!("{}@9", read.display()))
            .arg("-f")
            .arg(format!("{}@1", write.display()))
            .args(["-h", "127.0.0.1", "-p", &target.addr.port().to_string(), "-U", "bench", "app"])
            .env("PGPASSWORD", &token)
            .output()
            .map_err(|e| e.to_string())?;
        let (p1, s1, me1, r1) = (cpu::children_ticks(primary_pm), cpu::children_ticks(standby_pm), cpu::own_ticks(), read_only_routes());
        let (tps, n) = cpu::pgbench_result(&out)?;
        let us = |ticks: u64| ticks as f64 * 1e6 / cpu::TICKS_PER_SECOND / n;
        Ok(Run {
            tps,
            cpu: [us(cpu::children_delta(&p0, &p1)), us(cpu::children_delta(&s0, &s1)), us(me1.0 - me0.0), us(me1.1 - me0.1)],
            routes: (r1.0 - r0.0, r1.1 - r0.1),
        })
    };
    println!(
        "{secs} s runs, {rounds} interleaved rounds, {clients} clients, pool_size {POOL} (with the replica: replica_pool_size {POOL} more), \
         9 BEGIN READ ONLY primary-key reads of orders : 1 UPDATE transaction"
    );
    println!(
        "| mode | TPS without replica (median) | TPS with replica (median) | with / without | read-only tx on the standby | \
         CPU µs/tx without: primary + standby + pgtenant + pgbench | with |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    let standby_commits0 = commits(&standby)?;
    let mut routed_to_standby = 0.0;
    for mode in ["simple", "extended"] {
        let (mut without, mut with_replica) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            std::thread::sleep(Duration::from_millis(200));
            without.push(run(&alone, mode)?);
            std::thread::sleep(Duration::from_millis(200));
            with_replica.push(run(&with, mode)?);
        }
        let share = |runs: &[Run]| {
            let (p, r) = runs.iter().fold((0.0, 0.0), |(p, r), x| (p + x.routes.0, r + x.routes.1));
            (r, if p + r > 0.0 { format!("{:.1}%", 100.0 * r / (p + r)) } else { "?".into() })
        };
        let (on_standby, with_share) = share(&with_replica);
        routed_to_standby += on_standby;
        // the median run by TPS; its CPU split as that run split it
        let median = |v: &mut Vec<Run>| {
            v.sort_by(|a, b| a.tps.total_cmp(&b.tps));
            v.swap_remove(v.len() / 2)
        };
        let (a, b) = (median(&mut without), median(&mut with_replica));
        let show = |c: [f64; 4]| format!("{:.0} = {:.0} + {:.0} + {:.0} + {:.0}", c.iter().sum::<f64>(), c[0], c[1], c[2], c[3]);
        println!("| {mode} | {:.0} | {:.0} | {:.2} | {with_share} | {} | {} |", a.tps, b.tps, b.tps / a.tps, show(a.cpu), show(b.cpu));
    }
    // backends report their counts when idle for a second
    std::thread::sleep(Duration::from_millis(1500));
    println!(
        "\nthe standby's own count: {:.0} transactions committed in `app` (pg_stat_database; includes the replica \
         monitor's once-a-second check); pgtenant routed {routed_to_standby:.0} read-only transactions there",
        commits(&standby)? - standby_commits0
    );
    rt.block_on(with.stop());
    rt.block_on(alone.stop());
    Ok(())
}
