//! Log setup: `tracing` to stderr, human or JSON (`log.format`), with a filter from `log.level`
//! (or `PGTENANT_LOG`) that a config reload can change while the process runs.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;


type SetLevel = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

static SET_LEVEL: OnceLock<SetLevel> = OnceLock::new();

fn filter_for(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(level).map_err(|e| format!("log.level {level:?}: {e}"))
}

/// Installs the process-wide subscriber. `PGTENANT_LOG`, when set, wins over `log.level` (and then
/// reloads leave the level alone).
pub fn init(level: &str, format: &str) {
    let from_env = EnvFilter::try_from_env("PGTENANT_LOG").ok();
    let pinned = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| filter_for(level).unwrap_or_else(|_| EnvFilter::new("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        let b = builder.json().with_filter_reloading();
        let handle = b.reload_handle();
        let _ = b.try_init();
        if !pinned {
            let _ = SET_LEVEL.set(Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())));
        }
    } else {
        let b = builder.with_filter_reloading();
        let handle = b.reload_handle();
        let _ = b.try_init();
        if !pinned {
            let _ = SET_LEVEL.set(Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())));
        }
    }
}

/// Checks that `level` is a valid filter (so a reload with a bad one is refused as a whole).
pub fn validate_level(level: &str) -> Result<(), String> {
    filter_for(level).map(|_| ())
}

/// Applies a reloaded `log.level` (no-op when logging was not set up by [`init`]).
pub fn set_level(level: &str) -> Result<(), String> {
    match SET_LEVEL.get() {
        Some(set) => set(filter_for(level)?),
        None => Ok(()),
    }
}
