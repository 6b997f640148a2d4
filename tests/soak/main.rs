//! Soak: steady mixed load against one proxy for a fixed time, sampling memory (RSS), open file
//! descriptors and errors every second. After a warm-up quarter, memory and descriptors must stay
//! flat, unexpected errors must stay at zero, and no client may ever see another tenant's row.
//!
//! CI runs 30 s. The long run (issue 8: 30 minutes):
//!   PGTENANT_SOAK_SECS=1800 cargo test --release -p pgtenant --test soak
//!
//! The proxy runs in this process, so the figures include the load clients; they are constant in
//! number, so growth is still growth.

#[path = "../integration/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

const CLIENTS: u64 = 32;
const TENANTS: i64 = 3;

#[derive(Default)]
struct Totals {
    txns: AtomicU64,
    logins: AtomicU64,
    refused: AtomicU64,
    foreign: AtomicU64,
    unexpected: AtomicU64,
}

fn soak_secs() -> u64 {
    std::env::var("PGTENANT_SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(30)
}

fn main() {
    let limit = Duration::from_secs(soak_secs() + 120);
    run_all_within(&[("soak_memory_fds_errors_flat", |env| Box::pin(soak(env)))], limit);
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

async fn soak(env: &Env) -> TestResult {
    let secs = soak_secs();
    // the per-tenant limits and the audit log are on: they must stay flat too
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let audit = dir.path().join("audit.jsonl");
    let extra = format!("[limits]\nmax_active_per_tenant = 3\n[audit]\npath = \"{}\"", audit.display());
    let p = Arc::new(start_proxy(env, "pool_size = 6", &extra).await);
    let stop = Arc::new(AtomicBool::new(false));
    let t = Arc::new(Totals::default());
    let workers: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client(p.clone(), 1 + (i as i64) % TENANTS, i, stop.clone(), t.clone())))
        .collect();
    let started = Instant::now();
    let mut samples: Vec<(u64, u64, usize, u64, u64)> = Vec::new();
    println!("    {:>6} {:>10} {:>8} {:>6} {:>10} {:>8}", "t (s)", "RSS KiB", "fds", "pool", "txns", "unexp.");
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = (started.elapsed().as_secs(), rss_kib(), open_fds(), t.txns.load(Relaxed), t.unexpected.load(Relaxed));
        if s.0 % (secs / 10).max(1) == 0 {
            println!("    {:>6} {:>10} {:>8} {:>6} {:>10} {:>8}", s.0, s.1, s.2, p.proxy.shared.pool.busy_count(), s.3, s.4);
        }
        samples.push(s);
    }
    stop.store(true, Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let warm = samples.len() / 4;
    let after_warmup = &samples[warm..];
    let (rss0, fds0) = (after_warmup[0].1, after_warmup[0].2);
    let rss_max = after_warmup.iter().map(|s| s.1).max().unwrap_or(0);
    let fds_max = after_warmup.iter().map(|s| s.2).max().unwrap_or(0);
    let txns = t.txns.load(Relaxed);
    println!(
        "    {txns} transactions ({:.0}/s), {} logins, {} refused as expected; RSS {rss0} -> max {rss_max} KiB; fds {fds0} -> max {fds_max}",
        txns as f64 / secs as f64,
        t.logins.load(Relaxed),
        t.refused.load(Relaxed)
    );
    ensure(t.foreign.load(Relaxed) == 0, format!("{} foreign-tenant rows", t.foreign.load(Relaxed)))?;
    ensure(t.unexpected.load(Relaxed) == 0, format!("{} unexpected errors", t.unexpected.load(Relaxed)))?;
    ensure(txns > 100 * secs, format!("only {txns} transactions in {secs} s"))?;
    // flat: after warm-up, RSS may grow by at most 1 MiB + 2 %, descriptors by at most 8 (an
    // unscraped metrics histogram once grew ~100 KiB/s here)
    ensure(rss_max <= rss0 + 1024 + rss0 / 50, format!("RSS grew from {rss0} to {rss_max} KiB after warm-up"))?;
    ensure(fds_max <= fds0 + 8, format!("file descriptors grew from {fds0} to {fds_max}"))?;
    // every login and every refusal went to the audit log
    let records = std::fs::read_to_string(&audit).map_err(|e| e.to_string())?;
    let logins = records.lines().filter(|l| l.contains("\"event\":\"login\"")).count() as u64;
    let refusals = records.lines().filter(|l| l.contains("\"event\":\"statement_refused\"")).count() as u64;
    ensure(
        logins == t.logins.load(Relaxed) && refusals >= t.refused.load(Relaxed),
        format!("audit log: {logins} logins, {refusals} refusals; clients saw {} and {}", t.logins.load(Relaxed), t.refused.load(Relaxed)),
    )?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.proxy.shared.pool.busy_count() > 0 {
        ensure(Instant::now() < deadline, "backends still leased after the soak")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One client: a random mix of simple and extended reads, transactions that write and roll back,
/// guard refusals, COPY out and reconnects (new logins).
async fn client(p: Arc<pgtenant::server::Running>, tenant: i64, seed: u64, stop: Arc<AtomicBool>, t: Arc<Totals>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let fail = |t: &Totals, what: String| {
        if t.unexpected.fetch_add(1, Relaxed) < 5 {
            eprintln!("    unexpected: {what}");
        }
    };
    while !stop.load(Relaxed) {
        let c = match connect(&p, &token(tenant, "soak")).await {
            Ok(c) => c,
            Err(e) => {
                fail(&t, format!("login: {e:?}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        t.logins.fetch_add(1, Relaxed);
        let stmt = c.prepare("SELECT tenant_id FROM orders WHERE amount::float8 < $1").await;
        let Ok(stmt) = stmt else {
            fail(&t, "prepare".into());
            continue;
        };
        // a few hundred transactions per connection, then reconnect
        for _ in 0..rng.random_range(50..400) {
            if stop.load(Relaxed) {
                break;
            }
            let tenants: Result<Vec<i32>, String> = match rng.random_range(0..10) {
                0..=3 => c
                    .query(&stmt, &[&(rng.random_range(1..300) as f64)])
                    .await
                    .map(|rows| rows.iter().map(|r| r.get::<_, i32>(0)).collect())
                    .map_err(|e| format!("{e:?}")),
                4..=5 => c.simple_query("SELECT tenant_id FROM orders LIMIT 5").await.map_err(|e| format!("{e:?}")).map(|msgs| {
                    msgs.iter()
                        .filter_map(|m| match m {
                            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
                            _ => None,
                        })
                        .collect()
                }),
                6 => c
                    .batch_execute(&format!(
                        "BEGIN; INSERT INTO orders (tenant_id, amount) VALUES ({tenant}, 1); UPDATE orders SET amount = amount WHERE id < 10; ROLLBACK"
                    ))
                    .await
                    .map(|_| Vec::new())
                    .map_err(|e| format!("{e:?}")),
                7 => match c.simple_query("SET app.tenant_id = '2'").await {
                    Err(e) if e.code().map(|c| c.code()) == Some("42501") => {
                        t.refused.fetch_add(1, Relaxed);
                        Ok(Vec::new())
                    }
                    other => Err(format!("guard did not refuse: {other:?}")),
                },
                8 => {
                    use futures::StreamExt;
                    match c.copy_out("COPY (SELECT tenant_id FROM orders) TO STDOUT").await {
                        Ok(stream) => {
                            let chunks: Vec<_> = stream.collect().await;
                            let mut ids = Vec::new();
                            for ch in chunks {
                                match ch {
                                    Ok(b) => ids.extend(String::from_utf8_lossy(&b).lines().filter_map(|l| l.parse::<i32>().ok())),
                                    Err(e) => return fail(&t, format!("copy: {e:?}")),
                                }
                            }
                            Ok(ids)
                        }
                        Err(e) => Err(format!("{e:?}")),
                    }
                }
                _ => {
                    let tx = c.query("SELECT tenant_id FROM orders ORDER BY random() LIMIT 3", &[]).await;
                    tx.map(|rows| rows.iter().map(|r| r.get::<_, i32>(0)).collect()).map_err(|e| format!("{e:?}"))
                }
            };
            match tenants {
                Ok(ids) => {
                    if ids.iter().any(|id| *id as i64 != tenant) {
                        t.foreign.fetch_add(1, Relaxed);
                    }
                    t.txns.fetch_add(1, Relaxed);
                }
                Err(e) => fail(&t, e),
            }
        }
    }
}
