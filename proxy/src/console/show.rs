//! The console's `SHOW` answers, as tables. Columns are named after PgBouncer's where the concept is
//! the same (so scripts that read `cl_waiting` or `sv_active` keep working), and pgtenant's own
//! (`tenant`, `pool`, `paused`, …) where it has no counterpart; docs/operations.md lists them all.
//! Everything comes from what the proxy keeps anyway: the pools and their slots, the live sessions
//! (`crate::sessions`), the config in force.

use std::time::{Duration, SystemTime};

use super::command::Show;
use super::Source;

const TEXT: u32 = 25;
const INT8: u32 = 20;
const BOOL: u32 = 16;
const FLOAT8: u32 = 701;

/// A result set: columns `(name, type oid)` and rows of text values (`None` is NULL).
pub struct Table {
    pub columns: Vec<(&'static str, u32)>,
    pub rows: Vec<Vec<Option<String>>>,
}

fn text(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

fn boolean(b: bool) -> Option<String> {
    Some(if b { "t" } else { "f" }.into())
}

fn time(t: SystemTime) -> Option<String> {
    Some(crate::audit::timestamp(t))
}

fn micros(d: Duration) -> u128 {
    d.as_micros()
}

/// The columns that place a pool of `admin::pools`, last in `SHOW POOLS`, `SERVERS` and `STATS`.
const PLACEMENT: [(&str, u32); 3] = [("cluster", TEXT), ("role", TEXT), ("host", TEXT)];

/// A pool's values for [`PLACEMENT`].
fn placement(p: &crate::admin::pools::Listed<'_>) -> [Option<String>; 3] {
    [p.cluster.and_then(text), text(p.role()), text(p.pool.target().address())]
}

/// The answer to `SHOW what`.
pub async fn show(proxy: &impl Source, what: Show) -> Table {
    match what {
        Show::Pools => pools(proxy),
        Show::Clients => clients(proxy).await,
        Show::Servers => servers(proxy).await,
        Show::Tenants => tenants(proxy),
        Show::Stats => stats(proxy),
        Show::Config => super::settings::config(&proxy.config()),
        Show::Version => Table {
            columns: vec![("version", TEXT)],
            rows: vec![vec![text(format!("pgtenant {}", env!("CARGO_PKG_VERSION")))]],
        },
    }
}

/// One row per pool of `admin::pools` (the list `/pools` shows), PgBouncer's columns first.
fn pools(proxy: &impl Source) -> Table {
    let clients = proxy.sessions().list();
    let mode = if proxy.session_mode() { "session" } else { "transaction" };
    let rows = crate::admin::pools::list(proxy)
        .into_iter()
        .map(|p| {
            let pool = p.pool;
            let (_, queued_for) = pool.totals();
            let (held, held_for) = pool.held_by_pause();
            let waiting = pool.waiting() + held;
            let maxwait = queued_for.max(held_for);
            // a session belongs to the tenant or bypass pool; its transactions may run on any
            // cluster or replica, so there a client counts while a transaction of its runs
            let active = match p.label {
                "tenant" | "bypass" => clients.iter().filter(|c| c.pool == p.label).count().saturating_sub(waiting),
                _ => pool.busy_count(),
            };
            vec![
                text(&pool.target().database),
                text(&pool.target().user),
                text(active),
                text(waiting),
                text(pool.busy_count()),
                text(pool.idle_count()),
                text(maxwait.as_secs()),
                text(maxwait.subsec_micros()),
                text(mode),
                text(p.label),
                text(pool.size()),
                boolean(pool.is_paused()),
            ]
            .into_iter()
            .chain(placement(&p))
            .collect()
        })
        .collect();
    Table {
        columns: vec![
            ("database", TEXT),
            ("user", TEXT),
            ("cl_active", INT8),
            ("cl_waiting", INT8),
            ("sv_active", INT8),
            ("sv_idle", INT8),
            ("maxwait", INT8),
            ("maxwait_us", INT8),
            ("pool_mode", TEXT),
            ("pool", TEXT),
            ("pool_size", INT8),
            ("paused", BOOL),
        ]
        .into_iter()
        .chain(PLACEMENT)
        .collect(),
        rows,
    }
}

async fn clients(proxy: &impl Source) -> Table {
    let mut rows = Vec::new();
    for c in proxy.sessions().list() {
        let (server, since) = c.slot.backend().await;
        rows.push(vec![
            text("C"),
            text(&c.user),
            text(&c.database),
            text(if server.is_some() { "active" } else { "idle" }),
            text(c.addr.ip()),
            text(c.addr.port()),
            time(c.connected),
            time(since),
            boolean(c.tls),
            text(&c.application_name),
            text(&*c.tenant),
            text(c.pool),
            text(c.pid),
            server.and_then(text),
        ]);
    }
    Table {
        columns: vec![
            ("type", TEXT),
            ("user", TEXT),
            ("database", TEXT),
            ("state", TEXT),
            ("addr", TEXT),
            ("port", INT8),
            ("connect_time", TEXT),
            ("request_time", TEXT),
            ("tls", BOOL),
            ("application_name", TEXT),
            ("tenant", TEXT),
            ("pool", TEXT),
            ("pid", INT8),
            ("server_pid", INT8),
        ],
        rows,
    }
}

/// One row per backend connection of every pool of `admin::pools`: the ones a session's
/// transaction holds, under the pool it came from (a replica, another cluster), then the idle ones.
async fn servers(proxy: &impl Source) -> Table {
    let mut held = Vec::new();
    for c in proxy.sessions().list() {
        if let (Some((pid, from)), since) = c.slot.backend_in_pool().await {
            held.push((c, pid, from, since));
        }
    }
    let mut rows = Vec::new();
    for p in crate::admin::pools::list(proxy) {
        let pool = p.pool;
        let row = |state: &str, pid: i32, connected: Option<SystemTime>, since: SystemTime, client: Option<(&str, i32)>| {
            vec![
                text("S"),
                text(&pool.target().user),
                text(&pool.target().database),
                text(state),
                text(pool.target().describe()),
                connected.and_then(time),
                time(since),
                text(pid),
                text(p.label),
                client.and_then(|(t, _)| text(t)),
                client.and_then(|(_, p)| text(p)),
            ]
            .into_iter()
            .chain(placement(&p))
            .collect()
        };
        for (c, pid, from, since) in &held {
            // a backend given at login and not yet recorded is the session's own pool's
            let here = match from {
                Some(from) => std::ptr::eq(&**from, pool),
                None => c.pool == p.label,
            };
            if here {
                rows.push(row("active", *pid, None, *since, Some((&c.tenant, c.pid))));
            }
        }
        for s in pool.idle_servers() {
            rows.push(row("idle", s.pid, Some(s.connected), s.idle_since, None));
        }
    }
    Table {
        columns: vec![
            ("type", TEXT),
            ("user", TEXT),
            ("database", TEXT),
            ("state", TEXT),
            ("backend", TEXT),
            ("connect_time", TEXT),
            ("request_time", TEXT),
            ("remote_pid", INT8),
            ("pool", TEXT),
            ("tenant", TEXT),
            ("client_pid", INT8),
        ]
        .into_iter()
        .chain(PLACEMENT)
        .collect(),
        rows,
    }
}

fn tenants(proxy: &impl Source) -> Table {
    let clients = proxy.sessions().list();
    let mut stats = proxy.pool().tenant_stats();
    stats.sort_by(|a, b| a.tenant.cmp(&b.tenant));
    let rows = stats
        .into_iter()
        .map(|t| {
            let connected = clients.iter().filter(|c| c.pool == "tenant" && *c.tenant == *t.tenant).count();
            vec![
                text(&t.tenant),
                text(connected),
                text(t.active),
                text(t.waiting),
                text(t.transactions),
                text(t.wait_seconds_total),
                text(t.limit_refusals),
                t.max_active.and_then(text),
                t.max_waiting.and_then(text),
            ]
        })
        .collect();
    Table {
        columns: vec![
            ("tenant", TEXT),
            ("clients", INT8),
            ("active", INT8),
            ("waiting", INT8),
            ("transactions", INT8),
            ("wait_seconds_total", FLOAT8),
            ("limit_refusals", INT8),
            ("max_active", INT8),
            ("max_waiting", INT8),
        ],
        rows,
    }
}

/// One row per pool of `admin::pools`: its totals since start.
fn stats(proxy: &impl Source) -> Table {
    let rows = crate::admin::pools::list(proxy)
        .into_iter()
        .map(|p| {
            let pool = p.pool;
            let (totals, _) = pool.totals();
            let avg = if totals.transactions == 0 { 0.0 } else { micros(totals.wait) as f64 / totals.transactions as f64 };
            vec![
                text(&pool.target().database),
                text(p.label),
                text(totals.transactions),
                text(micros(totals.wait)),
                text(avg.round() as u64),
            ]
            .into_iter()
            .chain(placement(&p))
            .collect()
        })
        .collect();
    Table {
        columns: vec![
            ("database", TEXT),
            ("pool", TEXT),
            ("total_xact_count", INT8),
            ("total_wait_time", INT8),
            ("avg_wait_time", INT8),
        ]
        .into_iter()
        .chain(PLACEMENT)
        .collect(),
        rows,
    }
}
