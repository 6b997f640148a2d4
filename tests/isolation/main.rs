//! Randomized concurrent isolation run: many clients across many tenants on a small pool, mixing
//! simple and extended queries, explicit transactions, errors, rollbacks and foreign-tenant writes.
//! Every returned row is checked to belong to the client's tenant; any mismatch fails the run.
//!
//! CI runs a reduced size. The full size (issue 3: >= 200 clients, >= 50 tenants, pool <= 10,
//! >= 100,000 transactions):
//!   PGTENANT_ISOLATION_TXNS=100000 cargo test --release -p pgtenant --test isolation

#[path = "../integration/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use common::*;
use rand::{Rng, SeedableRng};

const CLIENTS: usize = 200;
const TENANTS: i32 = 50;
const POOL: usize = 10;

#[derive(Default)]
struct Totals {
    txns: AtomicU64,
    rows: AtomicU64,
    foreign_rows: AtomicU64,
    expected_errors: AtomicU64,
    unexpected: AtomicU64,
}

fn main() {
    run_all(&[("randomized_concurrent_isolation", |env| Box::pin(randomized(env)))]);
}

async fn randomized(env: &Env) -> TestResult {
    let total: u64 = std::env::var("PGTENANT_ISOLATION_TXNS").ok().and_then(|v| v.parse().ok()).unwrap_or(6_000);
    env.cluster
        .psql(
            "app",
            &format!(
                "INSERT INTO tenants SELECT g, 'tenant ' || g FROM generate_series(4, {TENANTS}) g;
                 INSERT INTO orders (tenant_id, user_sub, amount) SELECT 1 + (g % {TENANTS}), 'seed', g FROM generate_series(1, 5000) g;"
            ),
        )
        .map_err(|e| e.to_string())?;
    let p = start_proxy(env, &format!("pool_size = {POOL}\nacquire_timeout_ms = 60000"), "").await;
    let totals = Arc::new(Totals::default());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let tenant = 1 + (i as i32 % TENANTS);
        let client = connect(&p, &token(tenant as i64, &format!("user{i}"))).await.map_err(|e| format!("connect: {e:?}"))?;
        let totals = totals.clone();
        let per_client = total / CLIENTS as u64 + u64::from((i as u64) < total % CLIENTS as u64);
        tasks.push(tokio::spawn(async move { client_loop(client, tenant, per_client, i as u64, totals).await }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let t = &totals;
    println!(
        "isolation: {} transactions by {CLIENTS} clients of {TENANTS} tenants on a pool of {POOL} in {:.1} s; \
         {} rows checked, {} foreign rows, {} expected errors, {} unexpected errors",
        t.txns.load(Relaxed),
        started.elapsed().as_secs_f64(),
        t.rows.load(Relaxed),
        t.foreign_rows.load(Relaxed),
        t.expected_errors.load(Relaxed),
        t.unexpected.load(Relaxed)
    );
    ensure(t.txns.load(Relaxed) >= total, "not every transaction ran")?;
    ensure(t.foreign_rows.load(Relaxed) == 0, "a client saw another tenant's rows")?;
    ensure(t.unexpected.load(Relaxed) == 0, "unexpected errors")?;
    let leftovers = env.cluster.psql("app", "select count(*) from orders where amount < 0").map_err(|e| e.to_string())?;
    ensure(leftovers.trim() != "", "cluster reachable")?;
    p.stop().await;
    Ok(())
}

async fn client_loop(c: tokio_postgres::Client, tenant: i32, n: u64, seed: u64, t: Arc<Totals>) -> TestResult {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let check = |tids: Vec<i32>| {
        t.rows.fetch_add(tids.len() as u64, Relaxed);
        let foreign = tids.iter().filter(|&&x| x != tenant).count() as u64;
        t.foreign_rows.fetch_add(foreign, Relaxed);
    };
    let other = 1 + (tenant % TENANTS);
    for _ in 0..n {
        let pick = rng.random_range(0..100);
        let lo: f64 = rng.random_range(0.0..5000.0);
        let result: Result<(), tokio_postgres::Error> = async {
            match pick {
                // simple protocol read
                0..=24 => {
                    let msgs = c.simple_query(&format!("select tenant_id from orders where amount > {lo:.0} limit 20")).await?;
                    check(msgs.iter().filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
                        _ => None,
                    }).collect());
                }
                // extended protocol read (prepared statement reused across backends)
                25..=54 => {
                    let rows = c.query("select tenant_id from orders where amount > $1::float8::numeric limit 20", &[&lo]).await?;
                    check(rows.iter().map(|r| r.get(0)).collect());
                }
                // explicit transaction with a write, committed or rolled back
                55..=74 => {
                    c.batch_execute("BEGIN").await?;
                    c.execute("insert into orders (tenant_id, amount) values ($1, -1)", &[&tenant]).await?;
                    let rows = c.query("select tenant_id from orders where amount = -1", &[]).await?;
                    check(rows.iter().map(|r| r.get(0)).collect());
                    c.batch_execute(if rng.random_bool(0.5) { "COMMIT" } else { "ROLLBACK" }).await?;
                }
                // error inside a transaction, then rollback
                75..=84 => {
                    c.batch_execute("BEGIN").await?;
                    let e = c.simple_query("select 1/0").await.expect_err("division by zero");
                    assert_eq!(e.code().map(|c| c.code()), Some("22012"));
                    t.expected_errors.fetch_add(1, Relaxed);
                    c.batch_execute("ROLLBACK").await?;
                }
                // a write into another tenant must fail
                85..=92 => {
                    let e = c.execute("insert into orders (tenant_id, amount) values ($1, -2)", &[&other]).await.expect_err("foreign insert");
                    assert_eq!(e.code().map(|c| c.code()), Some("42501"));
                    t.expected_errors.fetch_add(1, Relaxed);
                }
                // the context itself
                _ => {
                    let s: String = c.query_one("select current_setting('app.tenant_id')", &[]).await?.get(0);
                    check(vec![s.parse().unwrap_or(-1)]);
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            t.unexpected.fetch_add(1, Relaxed);
            eprintln!("tenant {tenant}: unexpected error: {e:?}");
        }
        t.txns.fetch_add(1, Relaxed);
    }
    Ok(())
}
