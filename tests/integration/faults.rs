//! Faults under concurrent load (issue 8), on a cluster of its own so it can be restarted:
//! backends killed with `pg_terminate_backend`, a fast and an immediate (crash) Postgres restart,
//! a lock that stalls every backend past the pool wait timeout, and clients that vanish
//! mid-transaction and mid-COPY. Every row every client reads is checked for its tenant; every
//! statement's transaction id is recorded (per server lifetime: a crash may hand out unflushed ids
//! again), so a backend handed on inside an open transaction would
//! show up as one id seen by two clients; leftover temporary tables are looked for on each query.
//! Afterwards: every client is served again, no backend stays leased, nothing the vanished clients
//! wrote was committed.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::common::*;

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    errors: AtomicU64,
    foreign: AtomicU64,
    leftover_temp: AtomicU64,
    txids: Mutex<HashSet<String>>,
    reused_txid: AtomicU64,
}

async fn login(p: &pgtenant::server::Running, tenant: i64) -> Option<tokio_postgres::Client> {
    connect(p, &token(tenant, "fault-load")).await.ok()
}

/// One client: autocommit reads in a loop, reconnecting when its connection is gone.
async fn load(p: Arc<pgtenant::server::Running>, tenant: i64, stop: Arc<AtomicBool>, t: Arc<Tally>) {
    let sql = "SELECT pg_postmaster_start_time()::text || '/' || txid_current(), count(*), coalesce(min(tenant_id), 0), coalesce(max(tenant_id), 0), \
               (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()) FROM orders";
    let mut client = None;
    while !stop.load(Ordering::Relaxed) {
        if client.as_ref().is_none_or(|c: &tokio_postgres::Client| c.is_closed()) {
            client = login(&p, tenant).await;
            if client.is_none() {
                t.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let c = client.as_ref().expect("set above");
        match c.query_one(sql, &[]).await {
            Ok(row) => {
                let (txid, n, lo, hi, temp): (String, i64, i32, i32, i64) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
                if n != 100 || lo != tenant as i32 || hi != tenant as i32 {
                    t.foreign.fetch_add(1, Ordering::Relaxed);
                }
                if temp != 0 {
                    t.leftover_temp.fetch_add(1, Ordering::Relaxed);
                }
                if !t.txids.lock().unwrap().insert(txid) {
                    t.reused_txid.fetch_add(1, Ordering::Relaxed);
                }
                t.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                t.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Waits until the load has made `n` more successful queries (the proxy serves again).
async fn recovers(t: &Tally, n: u64, what: &str) -> TestResult {
    let start = t.ok.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while t.ok.load(Ordering::Relaxed) < start + n {
        ensure(Instant::now() < deadline, format!("load did not recover within 30 s after {what}"))?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn superuser(cluster: &pgtenant::cluster::Cluster, sql: &str) -> TestResult {
    cluster.psql("app", sql).map(|_| ()).map_err(|e| format!("psql {sql}: {e}"))
}

pub async fn faults_under_load_lose_nothing(_env: &Env) -> TestResult {
    let cluster = pgtenant::cluster::Cluster::start().map_err(|e| e.to_string())?;
    cluster.load_rls_fixture().map_err(|e| e.to_string())?;
    let env = Env { cluster };
    let p = Arc::new(start_proxy(&env, "pool_size = 4\nconnect_timeout_ms = 2000", "[pool]\nquery_wait_timeout_ms = 1000").await);
    let mut cluster = env.cluster;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let workers: Vec<_> = (0..12).map(|i| tokio::spawn(load(p.clone(), 1 + i % 3, stop.clone(), tally.clone()))).collect();
    let result = async {
        recovers(&tally, 200, "start").await?;

        // backends killed under the proxy
        superuser(&cluster, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app_user'")?;
        recovers(&tally, 200, "pg_terminate_backend").await?;

        // fast restart, then a crash (immediate stop)
        for immediate in [false, true] {
            let c = &mut cluster;
            tokio::task::block_in_place(|| c.restart(immediate)).map_err(|e| e.to_string())?;
            recovers(&tally, 200, if immediate { "immediate restart" } else { "fast restart" }).await?;
        }

        // every backend stalls behind a lock for longer than the pool wait timeout
        let locker = tokio::task::spawn_blocking({
            let url = cluster.superuser_url("app");
            move || {
                std::process::Command::new("psql")
                    .arg(url)
                    .args(["-X", "-q", "-c", "BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(2.5); COMMIT"])
                    .output()
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let errors_before = tally.errors.load(Ordering::Relaxed);
        let _ = locker.await;
        ensure(tally.errors.load(Ordering::Relaxed) > errors_before, "stalled backends produced no wait timeouts")?;
        recovers(&tally, 200, "the stall").await?;

        // clients that vanish mid-transaction and mid-COPY
        let c = login(&p, 1).await.ok_or("login")?;
        c.batch_execute("BEGIN; INSERT INTO orders (tenant_id, amount) VALUES (1, 4242.42)").await.map_err(|e| format!("{e:?}"))?;
        drop(c);
        // a client cut off in the middle of a CopyData message (COPY FROM into an RLS table is
        // refused by Postgres, so clients COPY into a temp table)
        let mut raw = crate::hostile::raw_login(&p, &token(3, "copy-cut")).await?;
        let copy = "BEGIN; CREATE TEMP TABLE incoming (tenant_id int, amount numeric) ON COMMIT DROP; COPY incoming FROM STDIN";
        raw.write_all(&crate::hostile::query(copy)).await.map_err(|e| e.to_string())?;
        loop {
            let (tag, _) = crate::hostile::read_msg(&mut raw, Duration::from_secs(5)).await.ok_or("no CopyInResponse")?;
            ensure(tag != b'E' && tag != b'Z', format!("COPY refused: {:?}", tag as char))?;
            if tag == b'G' {
                break;
            }
        }
        raw.write_all(b"d\0\0\0\x643\t4242.42\n").await.map_err(|e| e.to_string())?;
        drop(raw);
        recovers(&tally, 200, "vanished clients").await?;
        Ok::<(), String>(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    result?;

    let deadline = Instant::now() + Duration::from_secs(10);
    while p.proxy.shared.pool.busy_count() > 0 {
        ensure(
            Instant::now() < deadline,
            format!(
                "{} backends still leased after the load stopped ({} clients connected)",
                p.proxy.shared.pool.busy_count(),
                p.proxy.clients.load(Ordering::Relaxed)
            ),
        )?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let committed = cluster.psql("app", "SELECT count(*) FROM orders WHERE amount = 4242.42").map_err(|e| e.to_string())?;
    ensure(committed.trim() == "0", format!("rows of vanished clients were committed: {committed}"))?;
    let t = &tally;
    let (ok, errors) = (t.ok.load(Ordering::Relaxed), t.errors.load(Ordering::Relaxed));
    eprintln!("    faults: {ok} queries ok, {errors} errors during faults");
    ensure(t.foreign.load(Ordering::Relaxed) == 0, "a client saw another tenant's rows")?;
    ensure(t.reused_txid.load(Ordering::Relaxed) == 0, "a backend was handed on inside an open transaction")?;
    ensure(t.leftover_temp.load(Ordering::Relaxed) == 0, "a client saw another session's temporary tables")?;
    match Arc::try_unwrap(p) {
        Ok(p) => p.stop().await,
        Err(_) => return Err("proxy still referenced".into()),
    }
    drop(cluster);
    Ok(())
}
