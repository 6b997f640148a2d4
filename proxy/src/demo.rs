//! `pgtenant demo`: from a fresh clone to "two tenants, same query, different rows" in one command.
//! Starts a throwaway Postgres (the same `cluster` code the tests use), loads the example RLS
//! schema in its signed-context style (`pgtenant install-sql` with a generated signing key, then
//! tests/fixtures/rls-signed.sql), starts the proxy in front of it with a generated JWT secret and
//! that key, and prints ready-to-paste psql commands with tokens for two tenants, plus a direct
//! connection as the restricted role that sees nothing. Ctrl-C / SIGTERM removes everything.

use serde_json::json;

use crate::cluster::{Cluster, ClusterOptions};
use crate::config::Config;

/// println! that never panics (stdout may be a closed pipe by the time the demo stops).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

pub struct DemoOptions {
    /// Proxy port (0 picks a free one).
    pub port: u16,
    /// Keep the cluster's data directory after stopping (its path is printed).
    pub keep: bool,
}

fn token(secret: &str, tenant: i64, sub: &str) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) + 24 * 3600;
    crate::jwt::mint_hs(&json!({ "tenant_id": tenant, "sub": sub, "exp": exp }), secret.as_bytes(), jsonwebtoken::Algorithm::HS256)
}

/// Runs until `stop` resolves; prints everything a newcomer needs.
pub async fn run(opts: DemoOptions, stop: impl std::future::Future<Output = ()>) -> Result<(), String> {
    let cluster = tokio::task::spawn_blocking(|| -> Result<Cluster, String> {
        let c = Cluster::start_with(ClusterOptions::default()).map_err(|e| e.to_string())?;
        c.load_rls_fixture().map_err(|e| e.to_string())?;
        Ok(c)
    })
    .await
    .map_err(|e| e.to_string())??;
    let random = |n: usize| -> String {
        use rand::Rng;
        rand::rng().sample_iter(rand::distr::Alphanumeric).take(n).map(char::from).collect()
    };
    let (secret, signing_key) = (random(40), random(48));
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{}\"\n[backend]\nurl = \"{}\"\npool_size = 10\n[jwt]\nsecret = \"{secret}\"\n\
         [tenant]\nsettings = {{ \"app.tenant_id\" = \"tenant_id\", \"app.user_id\" = \"sub\" }}\nsigning_key = \"{signing_key}\"\n",
        opts.port,
        cluster.url("app_user", "app-secret", "app"),
    );
    let cfg = Config::from_toml(&text, &|_| None).map_err(|e| e.to_string())?;
    // the database verifies what pgtenant signs: the policies read pgtenant.setting()
    let install = crate::install_sql::script(&cfg, crate::install_sql::DEFAULT_SCHEMA)?;
    let cluster = tokio::task::spawn_blocking(move || cluster.load_signed_rls_fixture(&install).map(|()| cluster))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let running = crate::server::start(cfg).await?;
    let port = running.addr.port();
    let conn = format!("host=127.0.0.1 port={port} dbname=app user=alice");
    let query = "select pgtenant.setting('app.tenant_id') as tenant, count(*) as orders, sum(amount) as total from orders";
    say!("pgtenant demo is running");
    say!("  proxy     127.0.0.1:{port}  (restricted role app_user, RLS on tenants/users/orders, signed context)");
    say!("  postgres  127.0.0.1:{}  data in {}", cluster.port(), cluster.data_dir().display());
    say!();
    for (tenant, name) in [(1, "Acme"), (2, "Globex")] {
        let tok = token(&secret, tenant, &format!("demo-user-{tenant}"));
        say!("tenant {tenant} ({name}): connect with");
        say!("  PGPASSWORD={tok} psql \"{conn}\"");
        say!("tenant {tenant} one-liner:");
        say!("  PGPASSWORD={tok} psql \"{conn}\" -c \"{query}\"");
        say!();
    }
    say!("app_user's password alone is worth nothing: straight to Postgres, setting the tenant itself, it sees 0 rows:");
    say!(
        "  psql \"host=127.0.0.1 port={} dbname=app user=app_user password=app-secret\" -c \"set app.tenant_id = '1'; select count(*) from orders\"",
        cluster.port()
    );
    say!();
    say!("Same query, different rows: each token sees only its tenant. Press Ctrl-C to stop (everything is removed).");
    let _ = std::io::Write::flush(&mut std::io::stdout());
    stop.await;
    running.stop().await;
    let data = cluster.data_dir();
    if opts.keep {
        let kept = cluster.keep();
        say!("kept the Postgres data directory: {}", kept.display());
    } else {
        tokio::task::spawn_blocking(move || drop(cluster)).await.map_err(|e| e.to_string())?;
        say!("stopped; removed {}", data.display());
    }
    Ok(())
}
