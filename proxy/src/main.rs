//! The `pgtenant` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgtenant::config::Config;

#[derive(Parser)]
#[command(name = "pgtenant", version, about = "Postgres proxy that scopes every transaction to the tenant in the client's JWT")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a throwaway Postgres with an example multi-tenant schema, the proxy in front of it,
    /// and print psql commands with tokens for two tenants. Ctrl-C removes everything.
    Demo {
        /// Proxy port (0 picks a free one).
        #[arg(long, default_value_t = 6432)]
        port: u16,
        /// Keep the Postgres data directory when stopping.
        #[arg(long)]
        keep: bool,
    },
    /// Print a signed JWT (HS256/384/512) for testing.
    Token {
        /// HMAC secret (or take jwt.secret from --config).
        #[arg(long, env = "PGTENANT_JWT_SECRET")]
        secret: Option<String>,
        /// Take the secret, issuer, audience and required claims from this config.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A claim as name=value; the value is parsed as JSON when it can be (numbers, booleans,
        /// objects), else taken as a string. Repeatable.
        #[arg(long = "claim", value_name = "NAME=VALUE")]
        claims: Vec<String>,
        /// The `sub` claim.
        #[arg(long)]
        sub: Option<String>,
        /// Lifetime, e.g. 3600, 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[arg(long, default_value = "HS256")]
        alg: String,
    },
    /// Validate a config and print the statement each client transaction starts with (exit 1 on error).
    Check {
        #[arg(long, short, env = "PGTENANT_CONFIG", default_value = "config/pgtenant.toml")]
        config: PathBuf,
    },
    /// Check that the database isolates tenants for the restricted role, on every server of the
    /// config: each host of backend.url, each replica, each [[clusters]] entry (exit 1 on any finding).
    Doctor {
        #[arg(long, short, env = "PGTENANT_CONFIG", default_value = "config/pgtenant.toml")]
        config: PathBuf,
        /// Connect as this (owner or superuser) URL to see every object: as given at the first host
        /// of backend.url, with its user and password at the other servers; privileges are still
        /// evaluated for the restricted role.
        #[arg(long)]
        admin_url: Option<String>,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
        /// Schema of the signed-context functions (as given to install-sql).
        #[arg(long, default_value = pgtenant::install_sql::DEFAULT_SCHEMA)]
        schema: String,
    },
    /// Print the SQL that installs the signed tenant context in the database (the key table, the
    /// configured key and the verifying functions), for the database owner or a superuser.
    /// The output CONTAINS THE SIGNING KEY: pipe it straight into psql, e.g.
    /// `pgtenant install-sql -c pgtenant.toml | psql -v ON_ERROR_STOP=1 "postgres://owner@host/app"`.
    InstallSql {
        #[arg(long, short, env = "PGTENANT_CONFIG", default_value = "config/pgtenant.toml")]
        config: PathBuf,
        /// Schema for the key table and the functions.
        #[arg(long, default_value = pgtenant::install_sql::DEFAULT_SCHEMA)]
        schema: String,
    },
    /// Run the proxy.
    Run {
        /// Path to pgtenant.toml.
        #[arg(long, short, env = "PGTENANT_CONFIG", default_value = "config/pgtenant.toml")]
        config: PathBuf,
    },
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn run(config: PathBuf) -> Result<(), String> {
    let cfg = Config::load(&config).map_err(|e| e.to_string())?;
    pgtenant::logging::init(&cfg.log.level, &cfg.log.format);
    let rt = runtime(cfg.server.worker_threads).map_err(|e| e.to_string())?;
    rt.block_on(async {
        let running = pgtenant::server::start_from(cfg, Some(config.clone())).await?;
        tracing::info!(listen = %running.addr, backend = %running.proxy.shared.pool.target().describe(), "pgtenant ready");
        let proxy = running.proxy.clone();
        let reloader = tokio::spawn(async move {
            let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
            while hup.recv().await.is_some() {
                match proxy.reload_from_file().await {
                    Ok(()) => tracing::info!("SIGHUP: config reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: new config rejected; keeping the old one"),
                }
            }
        });
        shutdown_signal().await;
        reloader.abort();
        let timeout = std::time::Duration::from_secs(running.proxy.config.server.shutdown_timeout_s);
        tracing::info!(timeout_s = timeout.as_secs(), "shutting down: draining clients");
        let left = running.shutdown(timeout).await;
        if left > 0 {
            tracing::warn!(clients = left, "shutdown timeout: closing clients still in a transaction");
        }
        Ok(())
    })
}

/// The runtime that runs the proxy (`server.worker_threads`): one thread per core by default, a
/// single-threaded one for 1.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    }
}

fn doctor(config: PathBuf, admin_url: Option<String>, json: bool, schema: String) -> Result<ExitCode, String> {
    let cfg = Config::load(&config).map_err(|e| e.to_string())?;
    pgtenant::install_sql::check_schema(&schema)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let report = rt.block_on(pgtenant::doctor::report(&cfg, admin_url.as_deref(), &schema))?;
    let (findings, checked) = (&report.findings, pgtenant::doctor::render_checked(&report.checked));
    if json {
        eprint!("{checked}");
        println!("{}", serde_json::to_string_pretty(findings).map_err(|e| e.to_string())?);
    } else {
        print!("{checked}{}", pgtenant::doctor::render(findings));
    }
    Ok(if findings.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn install_sql(config: PathBuf, schema: String) -> Result<ExitCode, String> {
    let cfg = Config::load(&config).map_err(|e| e.to_string())?;
    let sql = pgtenant::install_sql::script(&cfg, &schema)?;
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        eprintln!("pgtenant: the SQL below contains the signing key; pipe it into psql instead of printing it");
    }
    print!("{sql}");
    Ok(ExitCode::SUCCESS)
}

fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("--ttl {s}: expected e.g. 3600, 90s, 30m, 1h or 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("--ttl {s}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    Ok(n * mult)
}

fn token(secret: Option<String>, config: Option<PathBuf>, claims: Vec<String>, sub: Option<String>, ttl: String, alg: String) -> Result<ExitCode, String> {
    let cfg = config.map(|p| Config::load(&p).map_err(|e| e.to_string())).transpose()?;
    let secret = secret
        .or_else(|| cfg.as_ref().and_then(|c| c.jwt.secret.clone()))
        .ok_or("no secret: pass --secret, set PGTENANT_JWT_SECRET, or --config with jwt.secret")?;
    let alg = match alg.to_ascii_uppercase().as_str() {
        "HS256" => jsonwebtoken::Algorithm::HS256,
        "HS384" => jsonwebtoken::Algorithm::HS384,
        "HS512" => jsonwebtoken::Algorithm::HS512,
        other => return Err(format!("--alg {other}: only HS256, HS384 and HS512 can be signed with a secret")),
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs();
    let mut map = serde_json::Map::new();
    for c in claims {
        let (k, v) = c.split_once('=').ok_or_else(|| format!("--claim {c}: expected NAME=VALUE"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
        map.insert(k.to_string(), value);
    }
    if let Some(sub) = sub {
        map.insert("sub".into(), sub.into());
    }
    map.insert("iat".into(), now.into());
    map.insert("exp".into(), (now + parse_ttl(&ttl)?).into());
    if let Some(cfg) = &cfg {
        if let Some(iss) = &cfg.jwt.issuer {
            map.entry("iss").or_insert(iss.clone().into());
        }
        if let Some(aud) = &cfg.jwt.audience {
            map.entry("aud").or_insert(aud.clone().into());
        }
        let mapping = pgtenant::tenant::TenantMapping::from_config(&cfg.tenant).map_err(|e| e.to_string())?;
        mapping.context(&map).map_err(|e| format!("{e} (required by [tenant] in the config; add --claim)"))?;
    }
    println!("{}", pgtenant::jwt::mint_hs(&serde_json::Value::Object(map), secret.as_bytes(), alg));
    Ok(ExitCode::SUCCESS)
}

/// What `check` says about `[bypass]`: it is a hole in tenant isolation by design, so say so.
fn bypass_warnings(cfg: &Config) -> Vec<String> {
    let b = &cfg.bypass;
    if !b.enabled {
        return Vec::new();
    }
    let mut w = vec![format!(
        "[bypass] is enabled: tokens signed by the bypass.jwt key with {} = \"{}\" run WITHOUT row-level security on {} \
         (every such login and statement goes to the audit log {})",
        b.claim,
        b.value,
        pgtenant::backend::BackendTarget::from_config(&b.backend(&cfg.backend))
            .map(|t| t.describe())
            .unwrap_or_else(|_| "the bypass database".into()),
        cfg.audit.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
    )];
    let same = |a: &Option<String>, b: &Option<String>| a.is_some() && a == b;
    let (j, bj) = (&cfg.jwt, &b.jwt);
    if same(&j.secret, &bj.secret)
        || (j.public_key_file.is_some() && j.public_key_file == bj.public_key_file)
        || (j.jwks_file.is_some() && j.jwks_file == bj.jwks_file)
        || same(&j.jwks_url, &bj.jwks_url)
    {
        w.push("bypass.jwt uses the same key as [jwt]: whoever issues tenant tokens can issue bypass tokens; give bypass its own key".into());
    }
    if bj.secret.is_some() {
        w.push("bypass.jwt.secret is a shared secret: every holder can mint bypass tokens; prefer public_key_file (only the issuer holds the private key)".into());
    }
    w
}

fn check(config: PathBuf) -> Result<ExitCode, String> {
    let cfg = Config::load(&config).map_err(|e| e.to_string())?;
    let proxy = pgtenant::server::Proxy::new(cfg.clone())?;
    let auth = proxy.auth();
    let names = auth.mapping.setting_names();
    println!("{}: ok", config.display());
    println!("listen {} -> backend {} (pool of {}, {} pooling)", cfg.server.listen, proxy.shared.pool.target().describe(), cfg.backend.pool_size,
        if proxy.shared.session_mode { "session" } else { "transaction" });
    let signing = cfg.tenant.signing_key_bytes().map_err(|e| e.to_string())?.is_some();
    let arity = names.len() + if signing { 2 } else { 0 };
    println!("\nEvery client transaction starts with:\n  {}", pgtenant::session::inject::context_sql(arity));
    println!("with parameters:");
    let claim = |name: &str| -> String {
        if let Some(path) = cfg.tenant.settings.get(name) {
            format!("claim `{path}`")
        } else if name == "role" {
            format!("claim `{}` (one of {:?})", cfg.tenant.role_claim.as_deref().unwrap_or(""), cfg.tenant.allowed_roles)
        } else {
            "the whole claims object as JSON".into()
        }
    };
    for (i, name) in names.iter().enumerate() {
        println!("  ${} = '{name}', ${} = {}", 2 * i + 1, 2 * i + 2, claim(name));
    }
    if signing {
        let n = 2 * names.len();
        println!(
            "  ${} = '{}', ${} = a JSON copy of these settings (without role) naming the backend it runs on",
            n + 1,
            pgtenant::signing::CONTEXT_SETTING,
            n + 2
        );
        println!("  ${} = '{}', ${} = its HMAC-SHA256 under key id {:?}", n + 3, pgtenant::signing::SIGNATURE_SETTING, n + 4, cfg.tenant.signing_kid);
        println!("(plus the client's own startup parameters and session SETs, if any, before the signed pair)");
        println!(
            "\nsigned context: on, kid {:?}; policies read {}.setting(name), which only trusts a signed context \
             (install it with `pgtenant install-sql`)",
            cfg.tenant.signing_kid,
            pgtenant::install_sql::DEFAULT_SCHEMA
        );
    } else {
        println!("(plus the client's own startup parameters and session SETs, if any)");
        println!("\nsigned context: off (set tenant.signing_key to sign it; see docs/security.md, \"Signed context\")");
    }
    let l = &cfg.limits;
    if l.max_active_per_tenant > 0 || l.max_waiting_per_tenant > 0 || !l.tenants.is_empty() {
        let show = |v: usize| if v == 0 { "no limit".to_string() } else { v.to_string() };
        println!(
            "\nper-tenant limits: {} active, {} waiting ({} tenant overrides)",
            show(l.max_active_per_tenant),
            show(l.max_waiting_per_tenant),
            l.tenants.len()
        );
    }
    let cleartext = pgtenant::config::cleartext::warning(&cfg.server, &pgtenant::config::cleartext::listen_addrs(&cfg.server));
    for warning in cleartext.into_iter().chain(bypass_warnings(&cfg)) {
        println!("\nwarning: {warning}");
    }
    let remotes = [("jwt.jwks_url", auth.verifier.remote()), ("bypass.jwt.jwks_url", auth.bypass.as_ref().and_then(|b| b.verifier.remote()))];
    for (key, remote) in remotes.into_iter().filter_map(|(k, r)| Some((k, r?))) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        match rt.block_on(remote.refresh()) {
            Ok(n) => println!("\n{key} {}: {n} usable keys", remote.url()),
            Err(e) => println!(
                "\nwarning: {key} {} cannot be fetched from here: {e}\n(the proxy starts anyway and retries until it loads keys)",
                remote.url()
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn demo(port: u16, keep: bool) -> Result<ExitCode, String> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(pgtenant::demo::run(pgtenant::demo::DemoOptions { port, keep }, shutdown_signal()))?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { port, keep } => demo(port, keep),
        Command::Token { secret, config, claims, sub, ttl, alg } => token(secret, config, claims, sub, ttl, alg),
        // check's contract: exit 1 with a pointed message on any error
        Command::Check { config } => check(config).or_else(|e| {
            eprintln!("pgtenant: {e}");
            Ok(ExitCode::from(1))
        }),
        Command::Run { config } => run(config).map(|()| ExitCode::SUCCESS),
        Command::Doctor { config, admin_url, json, schema } => doctor(config, admin_url, json, schema),
        Command::InstallSql { config, schema } => install_sql(config, schema),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgtenant: {e}");
            ExitCode::from(2)
        }
    }
}
