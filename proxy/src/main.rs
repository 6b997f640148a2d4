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
    /// Check that the database isolates tenants for the restricted role (exit 1 on any finding).
    Doctor {
        #[arg(long, short, env = "PGTENANT_CONFIG", default_value = "config/pgtenant.toml")]
        config: PathBuf,
        /// Connect as this (owner or superuser) URL to see every object; privileges are still
        /// evaluated for the restricted role.
        #[arg(long)]
        admin_url: Option<String>,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the proxy.
    Run {
        /// Path to pgtenant.toml.
        #[arg(long, short, env = "PGTENANT_CONFIG", default_value = "config/pgtenant.toml")]
        config: PathBuf,
    },
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGTENANT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
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
    init_logging(&cfg);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let running = pgtenant::server::start(cfg).await?;
        tracing::info!(listen = %running.addr, backend = %running.proxy.shared.pool.target().describe(), "pgtenant ready");
        shutdown_signal().await;
        tracing::info!("shutting down");
        running.stop().await;
        Ok(())
    })
}

fn doctor(config: PathBuf, admin_url: Option<String>, json: bool) -> Result<ExitCode, String> {
    let cfg = Config::load(&config).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let findings = rt.block_on(pgtenant::doctor::run(&cfg, admin_url.as_deref()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&findings).map_err(|e| e.to_string())?);
    } else {
        print!("{}", pgtenant::doctor::render(&findings));
    }
    Ok(if findings.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(config).map(|()| ExitCode::SUCCESS),
        Command::Doctor { config, admin_url, json } => doctor(config, admin_url, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgtenant: {e}");
            ExitCode::from(2)
        }
    }
}
