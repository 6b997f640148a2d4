//! The escape attempts of the adversarial scenario (`ATTACKS`) against a signed schema (issue 16,
//! tests/fixtures/rls-signed.sql): the signed context exists so that a statement the guard fails to
//! recognise reads and writes nothing of another tenant.
//!
//! Through a signing pgtenant the guard refuses the attempts; to see what a miss would do, each one
//! is also replayed as if the guard had let it through: on a connection straight to Postgres as the
//! restricted role, inside a transaction that carries tenant 1's context signed for that backend,
//! exactly as pgtenant would set it. With the plain `current_setting` policies the replay must leak
//! (the control: the replay is able to fail); with the signed policies no attempt may show a
//! foreign row or change tenant 2's rows.

use pgtenant::signing::{BackendId, Signer};

use crate::adversarial::{victim, Checks};
use crate::common::*;
use crate::ATTACKS;

const KEY: &str = "isolation-signing-key-0123456789abcdef-01234";

/// Policies and the column default as tests/fixtures/rls.sql has them (rls-signed.sql changes both).
const PLAIN: &str = "\
    ALTER POLICY tenant_isolation ON tenants USING (id = NULLIF(current_setting('app.tenant_id', true), '')::integer); \
    ALTER POLICY tenant_isolation ON users USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::integer) \
      WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::integer); \
    ALTER POLICY tenant_isolation ON orders USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::integer) \
      WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::integer); \
    ALTER TABLE orders ALTER COLUMN user_sub SET DEFAULT current_setting('app.user_id', true)";

fn e(err: impl std::fmt::Debug) -> String {
    format!("{err:?}")
}

pub async fn guard_misses_against_signed_policies(env: &Env) -> TestResult {
    let text = config_text(env, "pool_size = 2", &format!("signing_key = \"{KEY}\""));
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(e)?;
    let install = pgtenant::install_sql::script(&cfg, "pgtenant")?;
    let mut checks = Checks::new("signed_guard_misses");

    // the control: with the plain policies a missed statement does leak
    let leaks = replay(env).await?;
    let label = format!("plain policies: {} of {} missed statements leak (so the replay can fail)", leaks.len(), ATTACKS.len());
    checks.check(&label, !leaks.is_empty(), "none leaked");

    env.cluster.load_signed_rls_fixture(&install).map_err(e)?;
    let result = async {
        let leaks = replay(env).await?;
        checks.check("signed policies: no missed statement shows or changes another tenant's row", leaks.is_empty(), leaks.join("; "));
        // through the signing proxy: refused or harmless, and tenant 1 still reads its own rows
        let p = pgtenant::server::start(cfg).await?;
        let c = connect(&p, &token(1, "mallory")).await.map_err(e)?;
        let before = victim(env);
        for sql in ATTACKS {
            let _ = c.simple_query(sql).await;
            let _ = c.simple_query("ROLLBACK").await;
            let (foreign, own) = seen(&c).await?;
            checks.check(&format!("through pgtenant: {sql:?}"), foreign == 0 && own > 0, format!("{foreign} foreign rows, {own} own"));
        }
        checks.check("through pgtenant: tenant 2's rows unchanged", victim(env) == before, victim(env));
        p.stop().await;
        Ok::<_, String>(())
    }
    .await;
    env.cluster.psql("app", PLAIN).map_err(e)?;
    result?;
    checks.done()
}

/// (rows of other tenants, rows of tenant 1) that `c` sees.
async fn seen(c: &tokio_postgres::Client) -> Result<(i64, i64), String> {
    let row = c
        .query_one("select count(*) filter (where tenant_id <> 1), count(*) filter (where tenant_id = 1) from orders", &[])
        .await
        .map_err(e)?;
    Ok((row.get(0), row.get(1)))
}

/// Replays every attempt as a guard miss; returns the ones that showed a foreign row, and a change
/// of tenant 2's rows over the whole replay.
async fn replay(env: &Env) -> Result<Vec<String>, String> {
    let signer = Signer::new("k1", KEY.as_bytes());
    let mut leaks = Vec::new();
    let before = victim(env);
    for sql in ATTACKS {
        let (c, conn) = tokio_postgres::connect(&env.cluster.url("app_user", "app-secret", "app"), tokio_postgres::NoTls).await.map_err(e)?;
        tokio::spawn(conn);
        let row = c
            .query_one("SELECT pg_backend_pid(), extract(epoch from backend_start)::text FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid())", &[])
            .await
            .map_err(e)?;
        let backend = BackendId { pid: row.get(0), started: row.get(1) };
        let settings = vec![("app.tenant_id".to_string(), "1".to_string()), ("app.user_id".to_string(), "mallory".to_string())];
        let (ctx, sig) = signer.signed(&settings, now(), &backend);
        // pgtenant's context statement, then the statement the guard missed, in one transaction
        c.batch_execute("BEGIN").await.map_err(e)?;
        c.query(
            "SELECT set_config('app.tenant_id', '1', true), set_config('app.user_id', 'mallory', true), \
             set_config('pgtenant.context', $1, true), set_config('pgtenant.signature', $2, true)",
            &[&ctx, &sig],
        )
        .await
        .map_err(e)?;
        let _ = c.simple_query(sql).await;
        // what it sees now, in the same transaction if the attempt left it open
        let foreign = match seen(&c).await {
            Ok((foreign, _)) => foreign,
            Err(_) => 0, // the transaction failed: it sees nothing until it ends
        };
        let _ = c.simple_query("ROLLBACK").await;
        if foreign > 0 {
            leaks.push(format!("{sql:?}: {foreign} foreign rows"));
        }
    }
    let after = victim(env);
    if after != before {
        leaks.push(format!("tenant 2's rows changed: {before} -> {after}"));
    }
    Ok(leaks)
}
