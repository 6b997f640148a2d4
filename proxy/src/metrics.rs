//! Metric names, the process-wide Prometheus recorder, and pre-resolved handles for the hot path.
//!
//! A leaf module: it imports nothing from the rest of pgtenant, so every module can record metrics
//! without depending on `admin` (which only renders them). The names are a stable interface,
//! documented in docs/operations.md.
//!
//! `metrics::counter!(NAME)` looks the series up in the recorder's registry at every call; the
//! per-message and per-transaction series without dynamic labels are resolved once instead and
//! kept in [`hot`]. A handle resolved before a recorder is installed records nothing, ever, so
//! [`hot`] installs the recorder (see [`recorder`]) before resolving them.
//!
//! The external crate is also called `metrics`: inside this module it is spelled `::metrics`, and
//! callers reach this module as `crate::metrics::…` (not with `use crate::metrics;`, which would
//! hide the crate's `metrics::counter!` in that file).

use std::sync::OnceLock;
use std::time::Duration;

use ::metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const CLIENTS: &str = "pgtenant_clients";
/// 1 while `/readyz` would answer 200, sampled at scrape (see `pool::health`).
pub const READY: &str = "pgtenant_ready";
// pool gauges, label `pool` (`tenant`, `bypass`), sampled at scrape
pub const POOL_SIZE: &str = "pgtenant_pool_size";
pub const POOL_BUSY: &str = "pgtenant_pool_busy";
pub const POOL_IDLE: &str = "pgtenant_pool_idle";
pub const POOL_WAITING: &str = "pgtenant_pool_waiting";
pub const LOGINS: &str = "pgtenant_logins_total";
pub const TRANSACTIONS: &str = "pgtenant_transactions_total";
pub const TRANSACTION_SECONDS: &str = "pgtenant_transaction_duration_seconds";
pub const POOL_WAIT_SECONDS: &str = "pgtenant_pool_wait_seconds";
pub const POOL_WAIT_TIMEOUTS: &str = "pgtenant_pool_wait_timeouts_total";
pub const CONFIG_RELOADS: &str = "pgtenant_config_reloads_total";
pub const JWKS_FETCHES: &str = "pgtenant_jwks_fetches_total";
pub const BACKEND_CONNECTS: &str = "pgtenant_backend_connects_total";
/// Gauge per pool and `backend.url` host: 1 for the host new connections go to (the primary).
pub const BACKEND_PRIMARY: &str = "pgtenant_backend_primary";
/// Counter per pool: times the primary changed from one host to another.
pub const BACKEND_FAILOVERS: &str = "pgtenant_backend_failovers_total";
pub const CONTEXT_INJECTIONS: &str = "pgtenant_context_injections_total";
pub const REFUSALS: &str = "pgtenant_refusals_total";
pub const CLIENT_BYTES: &str = "pgtenant_client_bytes_total";
pub const LIMIT_REFUSALS: &str = "pgtenant_limit_refusals_total";
pub const BYPASS_LOGINS: &str = "pgtenant_bypass_logins_total";
pub const BYPASS_STATEMENTS: &str = "pgtenant_bypass_statements_total";
pub const AUDIT_RECORDS: &str = "pgtenant_audit_records_total";
pub const CANCEL_REQUESTS: &str = "pgtenant_cancel_requests_total";
pub const INSTANCE_INFO: &str = "pgtenant_instance_info";
// read replicas and clusters (`routing`): labelled by cluster name and replica index (bounded)
pub const REPLICA_UP: &str = "pgtenant_replica_up";
pub const REPLICA_LAG_SECONDS: &str = "pgtenant_replica_lag_seconds";
pub const READ_ONLY_ROUTES: &str = "pgtenant_read_only_transactions_total";
pub const CLIENT_WRITE_TIMEOUTS: &str = "pgtenant_client_write_timeouts_total";
// per-tenant series, rendered at scrape time for the tenants [admin] selects (see `admin::tenants`)
pub const TENANT_ACTIVE: &str = "pgtenant_tenant_active";
pub const TENANT_WAITING: &str = "pgtenant_tenant_waiting";
pub const TENANT_TRANSACTIONS: &str = "pgtenant_tenant_transactions_total";
pub const TENANT_WAIT_SECONDS: &str = "pgtenant_tenant_wait_seconds_total";
pub const TENANT_LIMIT_REFUSALS: &str = "pgtenant_tenant_limit_refusals_total";

/// Histogram buckets (seconds) for the transaction and pool-wait histograms.
const BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The process-wide Prometheus recorder, installed on the first call (once, even with several
/// proxies in a process); its handle renders `/metrics`.
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().set_buckets(&BUCKETS).expect("static buckets").build_recorder();
        let handle = recorder.handle();
        // histograms buffer raw samples until rendered: drain them periodically, or a proxy that
        // nobody scrapes grows by every transaction it times
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new().name("pgtenant-metrics-upkeep".into()).spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            upkeep.run_upkeep();
        });
        // another recorder may already be installed (e.g. by an embedding program): then ours only
        // renders zeros, and the handles below record into theirs
        let _ = ::metrics::set_global_recorder(recorder);
        handle
    })
}

/// Sets `pgtenant_instance_info{peer_id, version} 1`: which instance of a fleet this is
/// (`server.peer_id`, "none" outside a fleet), so dashboards can tell instances apart.
pub fn instance_info(peer_id: Option<u8>) {
    recorder();
    let id = peer_id.map_or_else(|| "none".to_string(), |id| id.to_string());
    ::metrics::gauge!(INSTANCE_INFO, "peer_id" => id, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Handles for the series recorded per message or per transaction (no dynamic labels).
pub struct Hot {
    /// `pgtenant_client_bytes_total{direction="in"}`: bytes read from clients.
    pub client_bytes_in: Counter,
    /// `pgtenant_client_bytes_total{direction="out"}`: bytes written to clients.
    pub client_bytes_out: Counter,
    pub transactions: Counter,
    pub transaction_seconds: Histogram,
    pub context_injections: Counter,
    pub pool_wait_seconds: Histogram,
    pub bypass_statements: Counter,
}

/// The hot-path handles, resolved on first use, after the recorder is installed.
pub fn hot() -> &'static Hot {
    static HOT: OnceLock<Hot> = OnceLock::new();
    HOT.get_or_init(|| {
        recorder();
        Hot {
            client_bytes_in: ::metrics::counter!(CLIENT_BYTES, "direction" => "in"),
            client_bytes_out: ::metrics::counter!(CLIENT_BYTES, "direction" => "out"),
            transactions: ::metrics::counter!(TRANSACTIONS),
            transaction_seconds: ::metrics::histogram!(TRANSACTION_SECONDS),
            context_injections: ::metrics::counter!(CONTEXT_INJECTIONS),
            pool_wait_seconds: ::metrics::histogram!(POOL_WAIT_SECONDS),
            bypass_statements: ::metrics::counter!(BYPASS_STATEMENTS),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    #[test]
    fn hot_handles_record_into_the_installed_recorder() {
        let before = sample(&recorder().render(), "pgtenant_client_bytes_total{direction=\"in\"}");
        hot().client_bytes_in.increment(7);
        hot().transactions.increment(1);
        hot().transaction_seconds.record(0.002);
        let text = recorder().render();
        // (other tests may count client bytes at the same time: hence at least)
        assert!(sample(&text, "pgtenant_client_bytes_total{direction=\"in\"}") >= before + 7.0, "{text}");
        assert!(sample(&text, "pgtenant_transactions_total") >= 1.0, "{text}");
        assert!(text.contains("pgtenant_transaction_duration_seconds_bucket"), "{text}");
        // the macros and the handles name the same series
        ::metrics::counter!(CLIENT_BYTES, "direction" => "in").increment(1);
        assert!(sample(&recorder().render(), "pgtenant_client_bytes_total{direction=\"in\"}") >= before + 8.0);
    }
}
