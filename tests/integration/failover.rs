//! Failover against real replication (issue 18): a primary with a synchronous streaming standby
//! built by the harness (`pg_basebackup -R`), pgtenant started with both in `backend.url`, the
//! primary stopped (`pg_ctl stop -m fast` or `-m immediate`) and the standby promoted
//! (`pg_ctl promote`). Nothing is simulated.
//!
//! The standby is synchronous (`synchronous_standby_names = '*'`, `synchronous_commit = on`): a
//! commit is acknowledged only once the standby has flushed its WAL, and promotion replays all of
//! it, so every write acknowledged to a client must be on the new primary. With an asynchronous
//! standby the last acknowledged commits may be lost in a failover (by design of Postgres, not of
//! pgtenant), so the check would be meaningless.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use pgtenant::cluster::Cluster;
use pgtenant::config::Config;
use pgtenant::server::Running;

fn main() {
    run_all(tests![
        standby_listed_first_still_picks_the_primary,
        failover_keeps_idle_clients_and_fails_open_transactions_with_08006,
        acknowledged_writes_survive_an_immediate_failover,
        read_only_primary_is_left_for_the_new_one,
    ]);
}

fn e(x: impl std::fmt::Debug) -> String {
    format!("{x:?}")
}

/// A primary with the RLS fixture and a synchronous streaming standby.
fn primary_and_sync_standby() -> Result<(Cluster, Cluster), String> {
    let mut primary = Cluster::start().map_err(e)?;
    primary.load_rls_fixture().map_err(e)?;
    let standby = primary.start_standby().map_err(e)?;
    primary.add_conf("synchronous_standby_names = '*'\nsynchronous_commit = on").map_err(e)?;
    Ok((primary, standby))
}

/// pgtenant in front of `url` (any connection string for app_user).
async fn proxy_on(url: &str, backend_extra: &str, extra: &str) -> Result<Running, String> {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[backend]\nurl = \"{url}\"\n{backend_extra}\n[jwt]\nsecret = \"{SECRET}\"\n\
         [tenant]\nsettings = {{ \"app.tenant_id\" = \"tenant_id\", \"app.user_id\" = \"sub\" }}\n{extra}\n"
    );
    let cfg = Config::from_toml(&text, &|_| None).map_err(e)?;
    pgtenant::server::start(cfg).await.map_err(e)
}

fn url(hosts: &[&Cluster]) -> String {
    let list: Vec<String> = hosts.iter().map(|c| format!("127.0.0.1:{}", c.port())).collect();
    format!("postgres://app_user:app-secret@{}/app", list.join(","))
}

/// A client and what its connection ended with (an error the server — here pgtenant — sent while
/// no query was waiting for one surfaces there).
async fn connect_watched(p: &Running, tenant: i64) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>), String> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1").port(p.addr.port()).user("alice").dbname("app").password(token(tenant, "failover"));
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.map_err(e)?;
    Ok((client, tokio::spawn(conn)))
}

/// (in recovery, server port) of the backend serving `c`'s transaction.
async fn served_by(c: &tokio_postgres::Client) -> Result<(bool, i32), tokio_postgres::Error> {
    let row = c.query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[]).await?;
    Ok((row.get(0), row.get(1)))
}

fn check_lost(err: &tokio_postgres::Error, what: &str) -> TestResult {
    let d = err.as_db_error().ok_or_else(|| format!("{what}: not a server error: {err}"))?;
    ensure(
        d.code().code() == "08006" && d.severity() == "FATAL" && d.message().contains("not committed"),
        format!("{what}: {} {} {}", d.severity(), d.code().code(), d.message()),
    )
}

async fn standby_listed_first_still_picks_the_primary(env: &Env) -> TestResult {
    let standby = env.cluster.start_standby().map_err(e)?;
    ensure(standby.in_recovery().map_err(e)?, "the standby is not in recovery")?;
    let key_values = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=app_user password=app-secret dbname=app",
        standby.port(),
        env.cluster.port()
    );
    for conninfo in [url(&[&standby, &env.cluster]), key_values] {
        let p = proxy_on(&conninfo, "pool_size = 2", "").await?;
        let c = connect(&p, &token(1, "first")).await.map_err(e)?;
        let served = served_by(&c).await.map_err(e)?;
        ensure(served == (false, env.cluster.port() as i32), format!("{conninfo}: served by {served:?}"))?;
        c.execute("INSERT INTO orders (tenant_id, amount) VALUES (1, 0.01)", &[]).await.map_err(e)?;
        c.execute("DELETE FROM orders WHERE amount = 0.01", &[]).await.map_err(e)?;
        let pool = &p.proxy.shared.pool;
        ensure(pool.primary() == Some(format!("127.0.0.1:{}", env.cluster.port())), format!("primary() = {:?}", pool.primary()))?;
        ensure(pool.failover_count() == 0 && pool.hosts().len() == 2, "a standby listed first counted as a failover")?;
        p.stop().await;
    }
    Ok(())
}

async fn failover_keeps_idle_clients_and_fails_open_transactions_with_08006(_env: &Env) -> TestResult {
    let (mut primary, mut standby) = tokio::task::block_in_place(primary_and_sync_standby)?;
    let p = proxy_on(&url(&[&primary, &standby]), "pool_size = 4", "[pool]\nquery_wait_timeout_ms = 3000").await?;
    let (idle, _) = connect_watched(&p, 1).await?;
    ensure(served_by(&idle).await.map_err(e)? == (false, primary.port() as i32), "not served by the primary")?;
    // a transaction open between statements, and one with a statement running
    let (open, open_conn) = connect_watched(&p, 2).await?;
    open.batch_execute("BEGIN; INSERT INTO orders (tenant_id, amount) VALUES (2, 424242)").await.map_err(e)?;
    let (busy, _) = connect_watched(&p, 3).await?;
    busy.batch_execute("BEGIN; INSERT INTO orders (tenant_id, amount) VALUES (3, 434343)").await.map_err(e)?;
    let running = tokio::spawn(async move {
        let r = busy.simple_query("SELECT pg_sleep(30)").await;
        (busy, r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    tokio::task::block_in_place(|| primary.stop_with(false)).map_err(e)?;

    ensure(p.proxy.shared.pool.verify_primary().await.is_none(), "verify_primary() names a primary while there is none")?;
    let (_busy, r) = running.await.map_err(e)?;
    check_lost(&r.err().ok_or("a statement running at the shutdown succeeded")?, "running statement")?;
    let ended = tokio::time::timeout(Duration::from_secs(5), open_conn).await.map_err(e)?.map_err(e)?;
    check_lost(&ended.err().ok_or("the open transaction's connection ended without an error")?, "open transaction")?;
    ensure(open.is_closed(), "the client whose transaction was lost still has its connection")?;

    // no primary now: the idle client's next transaction waits, then gets 57P03 with a hint
    let started = Instant::now();
    let err = served_by(&idle).await.err().ok_or("a transaction ran with no primary")?;
    let waited = started.elapsed();
    let d = err.as_db_error().ok_or_else(|| format!("not a server error: {err}"))?;
    ensure(
        d.code().code() == "57P03" && d.hint().is_some_and(|h| h.contains("failover")),
        format!("no primary: {} {} / {:?}", d.code().code(), d.message(), d.hint()),
    )?;
    ensure(waited >= Duration::from_millis(2500), format!("gave up after {waited:?}, before pool.query_wait_timeout_ms"))?;
    ensure(!idle.is_closed(), "the idle client lost its connection")?;
    ensure(p.proxy.shared.pool.primary().is_none(), "a primary is reported while there is none")?;

    // a transaction that starts before the promotion runs once the new primary is found
    let waiting = tokio::spawn(async move {
        let r = served_by(&idle).await;
        (idle, r)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::task::block_in_place(|| standby.promote()).map_err(e)?;
    let (idle, r) = waiting.await.map_err(e)?;
    ensure(r.map_err(e)? == (false, standby.port() as i32), "the waiting transaction did not run on the new primary")?;
    idle.execute("INSERT INTO orders (tenant_id, amount) VALUES (1, 454545)", &[]).await.map_err(e)?;

    // nothing of the lost transactions was committed; the idle client's write is there
    let rows = standby.psql("app", "SELECT amount::int FROM orders WHERE amount IN (424242, 434343, 454545)").map_err(e)?;
    ensure(rows.trim() == "454545", format!("rows on the new primary: {rows:?}"))?;
    let pool = &p.proxy.shared.pool;
    let new = format!("127.0.0.1:{}", standby.port());
    ensure(pool.verify_primary().await.as_deref() == Some(new.as_str()), "verify_primary() does not name the new primary")?;
    ensure(pool.primary().as_deref() == Some(new.as_str()) && pool.failover_count() == 1, format!("primary {:?}, {} failovers", pool.primary(), pool.failover_count()))?;
    let metrics = pgtenant::metrics::recorder().render();
    let gauge = format!("pgtenant_backend_primary{{pool=\"tenant\",host=\"{new}\"}} 1");
    ensure(metrics.contains(&gauge) && metrics.contains("pgtenant_backend_failovers_total{pool=\"tenant\"}"), format!("metrics lack {gauge}"))?;
    p.stop().await;
    Ok(())
}

#[derive(Default)]
struct Ledger {
    /// Rows whose INSERT (autocommit) or COMMIT returned success: id → (tenant, amount).
    acknowledged: Mutex<HashMap<i64, (i32, i64)>>,
    /// Errors by SQLSTATE ("" for a connection that was already closed).
    errors: Mutex<HashMap<String, u64>>,
    /// When the first write after `promoted_at` was acknowledged.
    first_after: Mutex<Option<Instant>>,
}

/// One client: writes in autocommit and in two-statement transactions until `stop`, reconnecting
/// when its connection is gone.
async fn writer(p: Arc<Running>, tenant: i32, n: i64, stop: Arc<AtomicBool>, ledger: Arc<Ledger>, promoted: Arc<Mutex<Option<Instant>>>) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut seq = 0i64;
    while !stop.load(Ordering::Relaxed) {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = connect(&p, &token(tenant as i64, "writer")).await.ok();
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let c = client.as_ref().expect("set above");
        seq += 1;
        let amount = n * 1_000_000 + seq;
        let insert = "INSERT INTO orders (tenant_id, amount) VALUES ($1, $2::bigint) RETURNING id";
        let result: Result<Vec<i64>, tokio_postgres::Error> = if seq % 2 == 0 {
            c.query_one(insert, &[&tenant, &amount]).await.map(|r| vec![r.get(0)])
        } else {
            async {
                c.batch_execute("BEGIN").await?;
                let a: i64 = c.query_one(insert, &[&tenant, &amount]).await?.get(0);
                let b: i64 = c.query_one(insert, &[&tenant, &-amount]).await?.get(0);
                c.batch_execute("COMMIT").await?;
                Ok(vec![a, b])
            }
            .await
        };
        match result {
            Ok(ids) => {
                let mut ack = ledger.acknowledged.lock().unwrap();
                for (k, id) in ids.iter().enumerate() {
                    ack.insert(*id, (tenant, if k == 0 { amount } else { -amount }));
                }
                if promoted.lock().unwrap().is_some() {
                    ledger.first_after.lock().unwrap().get_or_insert_with(Instant::now);
                }
            }
            Err(err) => {
                let code = err.as_db_error().map(|d| d.code().code().to_string()).unwrap_or_default();
                *ledger.errors.lock().unwrap().entry(code).or_default() += 1;
                // a failed transaction leaves the connection unusable or closed: start over
                client = None;
            }
        }
    }
}

async fn acknowledged_writes_survive_an_immediate_failover(_env: &Env) -> TestResult {
    let (mut primary, mut standby) = tokio::task::block_in_place(primary_and_sync_standby)?;
    let p = Arc::new(proxy_on(&url(&[&primary, &standby]), "pool_size = 6", "[pool]\nquery_wait_timeout_ms = 15000").await?);
    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Ledger::default());
    let promoted = Arc::new(Mutex::new(None));
    let writers: Vec<_> = (0..6)
        .map(|n| tokio::spawn(writer(p.clone(), (n % 3 + 1) as i32, n + 1, stop.clone(), ledger.clone(), promoted.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = ledger.acknowledged.lock().unwrap().len();
    ensure(before > 20, format!("only {before} writes before the failover"))?;

    let stopped_at = Instant::now();
    tokio::task::block_in_place(|| primary.stop_with(true)).map_err(e)?;
    tokio::task::block_in_place(|| standby.promote()).map_err(e)?;
    let promoted_at = Instant::now();
    *promoted.lock().unwrap() = Some(promoted_at);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.map_err(e)?;
    }

    let acknowledged = ledger.acknowledged.lock().unwrap().clone();
    let after = acknowledged.len() - before;
    let first = ledger.first_after.lock().unwrap().map(|t| t.duration_since(promoted_at));
    let errors = ledger.errors.lock().unwrap().clone();
    println!(
        "  {} writes acknowledged ({before} before the failover); stop + promotion took {:?}, first write acknowledged {first:?} after it; errors by SQLSTATE {errors:?}",
        acknowledged.len(),
        promoted_at - stopped_at
    );
    ensure(after > 0 && first.is_some(), "no write acknowledged after the promotion")?;
    // every error a client saw is one of the documented failover errors
    ensure(errors.keys().all(|c| ["08006", "57P03", ""].contains(&c.as_str())), format!("unexpected errors {errors:?}"))?;

    // every acknowledged write is on the new primary, in its tenant, with its amount
    let rows = standby.psql("app", "SELECT id, tenant_id, amount::bigint FROM orders WHERE abs(amount) >= 1000000").map_err(e)?;
    let on_disk: HashMap<i64, (i32, i64)> = rows
        .lines()
        .filter_map(|l| {
            let mut f = l.split('|');
            Some((f.next()?.parse().ok()?, (f.next()?.parse().ok()?, f.next()?.parse().ok()?)))
        })
        .collect();
    let missing: Vec<_> = acknowledged.iter().filter(|(id, row)| on_disk.get(id) != Some(row)).take(5).collect();
    ensure(missing.is_empty(), format!("acknowledged writes missing or changed on the new primary: {missing:?}"))?;
    let sum = |m: &HashMap<i64, (i32, i64)>, ids: &mut dyn Iterator<Item = &i64>| ids.map(|id| m[id].1).sum::<i64>();
    ensure(
        sum(&acknowledged, &mut acknowledged.keys()) == sum(&on_disk, &mut acknowledged.keys()),
        "sum of acknowledged amounts differs on the new primary",
    )?;
    // a transaction's two rows are both there or both absent (none half-committed)
    let mut by_amount: HashMap<i64, u32> = HashMap::new();
    for (_, a) in on_disk.values() {
        *by_amount.entry(a.abs()).or_default() += 1;
    }
    let odd_seq = |a: i64| (a % 1_000_000) % 2 == 1;
    ensure(by_amount.iter().all(|(a, n)| !odd_seq(*a) || *n == 2), "a two-row transaction is half there")?;
    ensure(p.proxy.shared.pool.failover_count() == 1, format!("{} failovers counted", p.proxy.shared.pool.failover_count()))?;
    match Arc::try_unwrap(p) {
        Ok(p) => p.stop().await,
        Err(_) => return Err("proxy still shared".into()),
    }
    Ok(())
}

/// A primary fenced by making it read-only (as a switchover tool would) while the standby is
/// promoted: a write on a pooled connection to the old one gets 25006, pgtenant checks which host
/// is the primary now, closes every connection to the old one, and the next transaction writes on
/// the new one.
async fn read_only_primary_is_left_for_the_new_one(_env: &Env) -> TestResult {
    let (primary, mut standby) = tokio::task::block_in_place(|| -> Result<_, String> {
        let primary = Cluster::start().map_err(e)?;
        primary.load_rls_fixture().map_err(e)?;
        let standby = primary.start_standby().map_err(e)?;
        Ok((primary, standby))
    })?;
    let p = proxy_on(&url(&[&primary, &standby]), "pool_size = 2", "").await?;
    let c = connect(&p, &token(1, "fenced")).await.map_err(e)?;
    let write = "INSERT INTO orders (tenant_id, amount) VALUES (1, 565656) RETURNING inet_server_port()";
    let port: i32 = c.query_one(write, &[]).await.map_err(e)?.get(0);
    ensure(port == primary.port() as i32, "first write not on the primary")?;

    tokio::task::block_in_place(|| standby.promote()).map_err(e)?;
    primary.psql("postgres", "ALTER SYSTEM SET default_transaction_read_only = on").map_err(e)?;
    primary.psql("postgres", "SELECT pg_reload_conf()").map_err(e)?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let err = c.query_one(write, &[]).await.err().ok_or("a write on the read-only old primary succeeded")?;
    ensure(err.as_db_error().is_some_and(|d| d.code().code() == "25006"), format!("write on the fenced primary: {err}"))?;
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if p.proxy.shared.pool.failover_count() == 1 || started.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    ensure(p.proxy.shared.pool.failover_count() == 1, "no failover after 25006 from the primary")?;
    for _ in 0..3 {
        let port: i32 = c.query_one(write, &[]).await.map_err(e)?.get(0);
        ensure(port == standby.port() as i32, format!("write served on port {port}, not by the new primary"))?;
    }
    p.stop().await;
    Ok(())
}
