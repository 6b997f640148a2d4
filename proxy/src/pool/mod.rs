//! The pool of backend connections, all logged in as the one restricted role.
//!
//! A session leases a connection when a transaction starts and gives it back when the transaction
//! is over (`ReadyForQuery 'I'` with nothing in flight). The pool is bounded by its slots (`fair`):
//! waiting transactions queue per tenant, a freed slot goes to the waiting tenant holding the fewest
//! (within `[limits]`), and a transaction gives up after `pool.query_wait_timeout_ms` with a clear
//! error.
//! Size, wait timeout and limits can change at run time (config reload): growing adds slots at once,
//! shrinking retires free slots at once and busy ones as their leases come back.
//! Idle connections are checked before reuse (a server restart or `pg_terminate_backend` leaves a
//! closed socket behind), and retired after `idle_timeout_s` idle or `max_lifetime_s` of age.
//! A lease dropped without `release` closes its connection: a connection whose state is not known
//! to be clean never goes back to the pool.
//! With several hosts in `backend.url`, connections go to the writable primary (`primary`); after a
//! failover the connections to the old one are closed as they come back or are picked, and a
//! transaction that finds no primary waits for one within `pool.query_wait_timeout_ms`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};


pub mod conn;
pub mod fair;
pub mod health;
pub mod inspect;
pub mod pause;
pub mod prepared;
pub mod primary;
pub mod probe;

pub use conn::{Effects, PooledConn, Reset, RESET_QUERY};

pub use fair::TenantKey;
use fair::{Refusal, Slot, Slots};

use crate::backend::{self, BackendConn, BackendTarget, ConnectError, SessionAttrs};
use crate::config::Config;
use crate::error::{sqlstate, PgError};


struct Idle {
    backend: Box<PooledConn>,
    since: Instant,
    /// The `primary` epoch the connection was opened in.
    epoch: u64,
}

/// How often a transaction waiting for a primary looks for one again.
const PRIMARY_RETRY: Duration = Duration::from_millis(250);

/// At most one primary re-check per this interval, however many server errors ask for one.
const RECHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Facts about the server, learned once.
#[derive(Debug, Default)]
pub struct ServerInfo {
    /// ParameterStatus values reported at startup.
    pub params: Vec<(String, String)>,
    /// Names of all settings (`pg_settings`), lower case: which startup parameters are real.
    pub settings: std::collections::HashSet<String>,
}

pub struct Pool {
    connector: Arc<dyn Connector>,
    /// `backend.url`'s hosts and which of them is in use.
    primary: primary::Primary,
    /// When the last primary re-check started (`recheck`).
    rechecked: Mutex<Option<Instant>>,
    /// The pool's size and its slots, free, busy and owed to a shrink (one lock: see `fair`).
    slots: Arc<Slots>,
    idle: Mutex<Vec<Idle>>,
    /// Milliseconds a transaction waits for a free connection.
    wait_timeout_ms: AtomicU64,
    idle_timeout: Duration,
    max_lifetime: Duration,
    prepared_cache: usize,
    /// What the pool last saw of its backend (readiness, see `health`).
    health: health::Health,
    /// What the server told the first connection: ParameterStatus values and setting names.
    server_info: Mutex<Option<Arc<ServerInfo>>>,
    /// `tenant.allowed_function_calls`, resolved to OIDs on each new connection.
    function_calls: Vec<String>,
    /// How this server spells parameter values (see `probe`).
    pub spellings: probe::Spellings,
    /// Closed by the console's PAUSE (see `pause`).
    pause: pause::Gate,
}

/// A leased backend. Give it back with [`Pool::release`]; dropping it closes the connection.
pub struct Lease {
    pub backend: Box<PooledConn>,
    slot: Slot,
    epoch: u64,
}

/// Functions a FunctionCall may never reach, whatever `tenant.allowed_function_calls` says: they
/// change the tenant context or act on other tenants' sessions through the shared role.
const NEVER_CALLABLE: [&str; 6] =
    ["set_config", "pg_cancel_backend", "pg_terminate_backend", "pg_stat_get_activity", "pg_stat_get_backend_activity", "pg_stat_statements"];

/// How the pool opens backend connections: over the network to `backend.url` in production; a
/// unit test plugs in a scripted server (the session's test seam).
pub trait Connector: Send + Sync {
    fn connect<'a>(
        &'a self,
        target: &'a BackendTarget,
        application_name: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<BackendConn, ConnectError>> + Send + 'a>>;
}

/// Connects to the configured server (TCP or Unix socket, TLS as configured).
pub struct Network;

impl Connector for Network {
    fn connect<'a>(
        &'a self,
        target: &'a BackendTarget,
        application_name: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<BackendConn, ConnectError>> + Send + 'a>> {
        Box::pin(backend::connect_as(target, application_name))
    }
}

/// What a client in the middle of a transaction gets when its backend connection is lost (server
/// shutdown, crash, failover, network): FATAL 08006, the SQLSTATE drivers treat as a connection
/// failure to reconnect and retry on. Its work was not committed; only a COMMIT already on its
/// way to the server when the connection died has an unknown outcome (as with any database).
pub fn connection_lost(why: &str) -> PgError {
    PgError::fatal(
        sqlstate::CONNECTION_FAILURE,
        "pgtenant: lost the connection to the database server; the transaction in progress was rolled back and its work was not committed",
    )
    .with_detail(format!("{why}. A COMMIT, or a statement outside a transaction block, already sent when the connection was lost may or may not have taken effect."))
    .with_hint("reconnect and retry the transaction; after a failover pgtenant connects to the new primary")
}

/// Turns a connection failure into the error a client sees.
pub fn connect_error(e: &ConnectError) -> PgError {
    if let ConnectError::NoPrimary { retry: true, .. } = e {
        return PgError::error(sqlstate::CANNOT_CONNECT_NOW, format!("pgtenant: cannot connect to the database: {e}"))
            .with_hint("a database failover may be in progress: retry the transaction shortly; pgtenant keeps looking for the primary among backend.url's hosts");
    }
    PgError::error(sqlstate::CONNECTION_FAILURE, format!("pgtenant: cannot connect to the database: {e}"))
        .with_hint("check backend.url in the pgtenant config and that the database server is up")
}

impl Pool {
    /// The tenant pool: `backend.pool_size` connections shared under `[limits]`.
    pub fn new(config: &Config, target: BackendTarget) -> Arc<Pool> {
        Self::sized(config, target, config.backend.pool_size, Arc::new(config.limits.clone()))
    }

    /// A pool of `size` connections to `target` (the bypass pool has its own size, no limits).
    pub fn sized(config: &Config, target: BackendTarget, size: usize, limits: Arc<crate::config::LimitsConfig>) -> Arc<Pool> {
        Self::with_connector(config, target, size, limits, Arc::new(Network))
    }

    /// [`Pool::sized`] with its connections opened by `connector`.
    pub fn with_connector(
        config: &Config,
        target: BackendTarget,
        size: usize,
        limits: Arc<crate::config::LimitsConfig>,
        connector: Arc<dyn Connector>,
    ) -> Arc<Pool> {
        let hosts = primary::Primary::new("tenant", vec![target], SessionAttrs::Any);
        Self::build(config, hosts, size, limits, connector)
    }

    /// A pool over every host of a connection string (`BackendTarget::all_from_config`), going to
    /// the one `attrs` asks for; `label` names the pool in metrics (`tenant`, `bypass`).
    pub fn for_hosts(
        config: &Config,
        label: &'static str,
        (targets, attrs): (Vec<BackendTarget>, SessionAttrs),
        size: usize,
        limits: Arc<crate::config::LimitsConfig>,
    ) -> Arc<Pool> {
        Self::build(config, primary::Primary::new(label, targets, attrs), size, limits, Arc::new(Network))
    }

    fn build(
        config: &Config,
        primary: primary::Primary,
        size: usize,
        limits: Arc<crate::config::LimitsConfig>,
        connector: Arc<dyn Connector>,
    ) -> Arc<Pool> {
        let cfg = &config.backend;
        Arc::new(Pool {
            connector,
            primary,
            rechecked: Mutex::new(None),
            slots: Slots::new(size, limits),
            idle: Mutex::new(Vec::new()),
            wait_timeout_ms: AtomicU64::new(config.query_wait_timeout_ms()),
            idle_timeout: Duration::from_secs(cfg.idle_timeout_s),
            max_lifetime: Duration::from_secs(cfg.max_lifetime_s),
            prepared_cache: config.pool.prepared_statements_cache,
            health: health::Health::new(),
            server_info: Mutex::new(None),
            function_calls: config.tenant.allowed_function_calls.clone(),
            spellings: Default::default(),
            pause: Default::default(),
        })
    }

    /// Whether `tenant.allowed_function_calls` names any function (else every FunctionCall is
    /// refused without looking at a backend).
    pub fn allows_function_calls(&self) -> bool {
        !self.function_calls.is_empty()
    }

    /// The host in use (the primary), else the first host of `backend.url`.
    pub fn target(&self) -> &BackendTarget {
        self.primary.target()
    }

    /// `host:port` of the host new connections go to; `None` while no host is the primary (after
    /// a failure, until one is found). For `/pools` and `/readyz`.
    pub fn primary(&self) -> Option<String> {
        self.primary.current()
    }

    /// Every host of `backend.url`, in order (`host:port`).
    pub fn hosts(&self) -> Vec<String> {
        self.primary.hosts()
    }

    /// Times the primary changed from one host to another since start.
    pub fn failover_count(&self) -> u64 {
        self.primary.failovers()
    }

    pub fn size(&self) -> usize {
        self.slots.size()
    }

    /// Applies a reloaded pool size and wait timeout. Growing takes effect at once; shrinking
    /// retires free slots now and busy ones as their transactions end (connected clients are never
    /// cut off).
    pub fn resize(&self, size: usize, wait_timeout_ms: u64) {
        self.wait_timeout_ms.store(wait_timeout_ms, Ordering::Relaxed);
        self.slots.resize(size);
        if let Ok(mut idle) = self.idle.lock() {
            while idle.len() > size {
                idle.remove(0);
            }
        }
    }

    /// New per-tenant limits (config reload).
    pub fn set_limits(&self, limits: Arc<crate::config::LimitsConfig>) {
        self.slots.set_limits(limits);
    }

    /// Per-tenant figures for `/tenants` and the tenant metrics.
    pub fn tenant_stats(&self) -> Vec<fair::TenantStats> {
        self.slots.stats()
    }

    /// Connections idle in the pool right now.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// Leases currently handed out.
    pub fn busy_count(&self) -> usize {
        self.slots.counts().1
    }

    /// The latest news of the backend (however old) was good; `usable_primary` asks for now.
    pub fn backend_healthy(&self) -> bool {
        self.health.latest().is_ok()
    }

    /// Transactions waiting for a free connection right now.
    pub fn waiting(&self) -> usize {
        self.slots.counts().2
    }

    /// Waits (bounded, in `tenant`'s turn) for a free slot, then reuses a healthy idle connection
    /// or opens a new one, logged in with `application_name` (the client's, so that its
    /// transactions there need not set it, nor those of every client with the same name: see
    /// `crate::session::inject`).
    pub async fn acquire(&self, tenant: &TenantKey, application_name: &str) -> Result<Lease, PgError> {
        let started = Instant::now();
        let wait_ms = self.wait_timeout_ms.load(Ordering::Relaxed);
        let left = self.pause.pass(Duration::from_millis(wait_ms)).await?;
        let waited = self.slots.acquire(tenant, left).await;
        // one clock read for the wait and the idle connections' ages (a transaction's hot path)
        let now = Instant::now();
        crate::metrics::hot().pool_wait_seconds.record(now.saturating_duration_since(started).as_secs_f64());
        let permit = waited.map_err(|r| self.refusal_error(tenant, r, wait_ms))?;
        while let Some(mut idle) = self.pop_idle(application_name) {
            if now.saturating_duration_since(idle.since) >= self.idle_timeout
                || now.saturating_duration_since(idle.backend.created) >= self.max_lifetime
                || idle.epoch != self.primary.epoch()
                || idle.backend.looks_closed()
            {
                tracing::debug!(pid = idle.backend.pid, "dropping stale backend connection");
                continue;
            }
            return Ok(Lease { backend: idle.backend, slot: permit, epoch: idle.epoch });
        }
        // boxed: opening a connection (TLS, authentication, the setup queries) is the largest
        // stage by far, and inline it would size every acquire's future, which the session
        // allocates (boxed) for each transaction: a large allocation costs several small ones
        Box::pin(self.open(started + Duration::from_millis(wait_ms), permit, application_name)).await
    }

    /// Opens a new connection for a transaction holding `permit`; a failover is waited out until
    /// `deadline`.
    async fn open(&self, deadline: Instant, permit: Slot, application_name: &str) -> Result<Lease, PgError> {
        let (mut conn, epoch) = loop {
            match self.connect(application_name).await {
                Ok(c) => break c,
                // no primary right now (a failover): look again until the transaction's wait is up
                Err(e) if self.primary.chooses() && e.is_unavailable() && Instant::now() + PRIMARY_RETRY < deadline => {
                    tokio::time::sleep(PRIMARY_RETRY).await;
                }
                Err(e) => return Err(connect_error(&e)),
            }
        };
        let calls = self.resolve_function_calls(&mut conn).await.map_err(|e| connect_error(&e))?;
        // the backend's start, which a signed context names; a role that may not read it (the
        // doctor's `query_text_visible` fix revokes pg_stat_get_activity) still connects: its
        // signed contexts then verify nowhere (no rows), which is what signing needs
        let started = match backend::query::simple_query(&mut conn, crate::signing::BACKEND_START_SQL).await {
            Ok(rows) => rows.into_iter().next().and_then(|r| r.into_iter().next().flatten()).unwrap_or_default(),
            Err(e @ ConnectError::Server { .. }) => {
                tracing::warn!(error = %e, "cannot read the backend's start time; signed contexts will not verify on this connection");
                String::new()
            }
            Err(e) => return Err(connect_error(&e)),
        };
        Ok(Lease { backend: Box::new(PooledConn::from_conn(conn, self.prepared_cache, calls, started)), slot: permit, epoch })
    }

    /// The error a transaction gets when it found no slot, naming the limit that held it back.
    fn refusal_error(&self, tenant: &TenantKey, r: Refusal, wait_ms: u64) -> PgError {
        let (limit, message, hint) = match r {
            Refusal::Waiting { limit, key } => (
                "max_waiting",
                format!("pgtenant: tenant \"{tenant}\" already has {limit} transactions waiting for a connection ({key} = {limit})"),
                "retry later, or raise the limit in the pgtenant config [limits]",
            ),
            Refusal::Timeout { at_limit: Some((limit, key)) } => (
                "max_active",
                format!(
                    "pgtenant: no database connection became free within {wait_ms} ms: tenant \"{tenant}\" is at its limit of {limit} concurrent transactions ({key} = {limit})"
                ),
                "shorten this tenant's transactions, or raise the limit in the pgtenant config [limits]",
            ),
            Refusal::Timeout { at_limit: None } => {
                ::metrics::counter!(crate::metrics::POOL_WAIT_TIMEOUTS).increment(1);
                return PgError::error(
                    sqlstate::TOO_MANY_CONNECTIONS,
                    format!(
                        "pgtenant: no database connection became free within {} ms (all {} pooled connections are busy)",
                        wait_ms,
                        self.size()
                    ),
                )
                .with_hint("raise backend.pool_size or pool.query_wait_timeout_ms, or shorten long transactions");
            }
        };
        ::metrics::counter!(crate::metrics::LIMIT_REFUSALS, "limit" => limit).increment(1);
        PgError::error(sqlstate::TOO_MANY_CONNECTIONS, message).with_hint(hint)
    }

    /// The idle connection to use next: the most recently used one whose `application_name` is
    /// `application_name` (so a transaction need not set it, see `crate::session::inject`), else the
    /// most recently used one. With one application behind pgtenant that is the top of the stack.
    fn pop_idle(&self, application_name: &str) -> Option<Idle> {
        let mut idle = self.idle.lock().ok()?;
        let named = idle.iter().rposition(|i| i.backend.application_name() == application_name);
        let i = named.or(idle.len().checked_sub(1))?;
        Some(idle.remove(i)) // the top of the stack when it is the one: nothing moves
    }

    /// Opens a connection to the primary; returns it with its epoch.
    async fn connect(&self, application_name: &str) -> Result<(BackendConn, u64), ConnectError> {
        let result = self.primary.connect(self.connector.as_ref(), application_name).await;
        let ok = result.is_ok();
        match &result {
            Ok(_) => self.health.answered(),
            Err(e) => self.health.failed(e.to_string()),
        }
        ::metrics::counter!(crate::metrics::BACKEND_CONNECTS, "result" => if ok { "ok" } else { "error" }).increment(1);
        let (mut conn, epoch) = result.inspect_err(|e| {
            tracing::warn!(backend = %self.target().describe(), error = %e, "backend connect failed");
        })?;
        tracing::debug!(pid = conn.pid, "backend connected");
        if self.server_info.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
            let rows = backend::query::simple_query(&mut conn, "SELECT lower(name) FROM pg_catalog.pg_settings").await?;
            let settings = rows.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect();
            let info = Arc::new(ServerInfo { params: conn.params.clone(), settings });
            *self.server_info.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
        }
        Ok((conn, epoch))
    }

    /// Looks at an error a pooled connection's server sent (an ErrorResponse body). Returns why
    /// the connection is over when the server is closing it (57P01, 57P02, 57P03: shutdown,
    /// crash, termination). A server that is shutting down or went read-only (25006) may no longer
    /// be the primary, so which host is gets checked (in the background, at most once per second;
    /// with one host and no `target_session_attrs` there is nothing to check).
    pub fn observe_error(self: &Arc<Self>, body: &[u8]) -> Option<String> {
        let code = crate::protocol::peek::error_code(body)?;
        let going_away = matches!(code, b"57P01" | b"57P02" | b"57P03");
        let why = going_away.then(|| {
            let e = PgError::from_server(body, crate::error::Severity::Fatal);
            format!("the server closed the connection: {} ({})", e.message, e.code)
        });
        if going_away || code == b"25006" {
            self.recheck();
        }
        why
    }

    /// Checks which host is the primary now, in the background, at most once per second.
    fn recheck(self: &Arc<Self>) {
        if !self.primary.chooses() {
            return;
        }
        {
            let mut last = self.rechecked.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < RECHECK_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let pool = self.clone();
        tokio::spawn(async move { pool.verify_primary().await });
    }

    /// Checks now which host is the primary and returns it (`None`: none is): a connection to the
    /// host in use proves it still is the one, else every host is tried. For `/readyz`, which
    /// should answer 503 while there is no primary; with one host and no
    /// `target_session_attrs` it only reports that host.
    pub async fn verify_primary(&self) -> Option<String> {
        if self.primary.chooses() {
            let before = self.primary.epoch();
            match self.primary.connect(self.connector.as_ref(), crate::backend::connect::OWN_APPLICATION_NAME).await {
                Ok(_) => self.health.answered(),
                Err(e) => self.health.failed(e.to_string()),
            }
            if self.primary.epoch() != before {
                self.reap();
            }
        }
        self.primary()
    }

    /// The OIDs, on this connection's database, of the functions clients may call with FunctionCall
    /// (`tenant.allowed_function_calls`); `set_config` is never among them.
    async fn resolve_function_calls(&self, conn: &mut BackendConn) -> Result<std::collections::HashSet<u32>, ConnectError> {
        if self.function_calls.is_empty() {
            return Ok(Default::default());
        }
        let names: Vec<String> = self.function_calls.iter().map(|n| format!("'{}'", n.replace('\'', "''"))).collect();
        let sql = format!(
            "SELECT p.oid FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
             WHERE p.proname NOT IN ({NEVER_CALLABLE}) AND ((n.nspname = 'pg_catalog' AND p.proname = ANY(ARRAY[{list}]::text[])) \
             OR n.nspname || '.' || p.proname = ANY(ARRAY[{list}]::text[]))",
            list = names.join(","),
            NEVER_CALLABLE = NEVER_CALLABLE.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(",")
        );
        let rows = backend::query::simple_query(conn, &sql).await?;
        Ok(rows.into_iter().filter_map(|r| r.into_iter().next().flatten()?.parse().ok()).collect())
    }

    /// Returns a clean connection (transaction status idle, nothing in flight) to the pool.
    pub fn release(&self, lease: Lease) {
        let Lease { backend, slot, epoch } = lease;
        let now = Instant::now();
        self.health.answered_at(now);
        // a connection to a former primary never goes back
        let keep = now.saturating_duration_since(backend.created) < self.max_lifetime && epoch == self.primary.epoch();
        if keep {
            if let Ok(mut idle) = self.idle.lock() {
                idle.push(Idle { backend, since: now, epoch });
            }
        }
        // the slot goes back after the connection is in the idle list, where its next holder
        // looks; when a shrink takes the slot instead, one idle connection goes with it
        if slot.give_back() && keep {
            if let Ok(mut idle) = self.idle.lock() {
                idle.pop();
            }
        }
    }

    /// What the server reports (ParameterStatus, setting names); connects once if no connection was
    /// made yet (as `application_name`, the logging-in client's), which also tells a logging-in
    /// client early that the backend is unreachable.
    pub async fn server_info(&self, application_name: &str) -> Result<Arc<ServerInfo>, PgError> {
        if let Some(p) = self.server_info.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(p);
        }
        let lease = self.acquire(&internal_key(), application_name).await?;
        self.release(lease);
        self.server_info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| PgError::error(sqlstate::CONNECTION_FAILURE, "pgtenant: no backend parameters"))
    }

    /// Closes idle connections past their idle timeout or lifetime; run periodically.
    pub fn reap(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            let epoch = self.primary.epoch();
            idle.retain(|i| i.since.elapsed() < self.idle_timeout && i.backend.created.elapsed() < self.max_lifetime && i.epoch == epoch);
        }
    }

    pub fn spawn_reaper(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(pool) => pool.reap(),
                    None => return,
                }
            }
        });
    }
}

/// The key pgtenant's own use of the pool queues under (a NUL: no claim can produce it).
const INTERNAL_KEY: &str = "\0pgtenant";

fn internal_key() -> TenantKey {
    Arc::from(INTERNAL_KEY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(size: usize) -> Arc<Pool> {
        let text = format!(
            "[backend]\nurl = \"postgres://u:p@127.0.0.1:1/db\"\npool_size = {size}\n[jwt]\nsecret = \"0123456789abcdef0123\"\n[tenant]\nsettings = {{ \"app.tenant_id\" = \"tenant_id\" }}\n"
        );
        let config = Config::from_toml(&text, &|_| None).unwrap();
        Pool::new(&config, BackendTarget::from_config(&config.backend).unwrap())
    }

    #[tokio::test]
    async fn shrink_retires_busy_slots_later_and_grow_cancels_what_is_owed() {
        let p = pool(4);
        let t: TenantKey = Arc::from("t");
        let mut busy = Vec::new();
        for _ in 0..3 {
            busy.push(p.slots.acquire(&t, Duration::from_millis(10)).await.unwrap());
        }
        p.resize(1, 100);
        // the one free slot is gone now, two busy ones are owed
        assert_eq!((p.slots.counts().0, p.slots.owed(), p.busy_count(), p.size()), (0, 2, 3, 1));
        // growing back cancels the debt instead of adding slots that a shrink would then eat
        p.resize(4, 100);
        assert_eq!((p.slots.counts().0, p.slots.owed(), p.busy_count(), p.size()), (1, 0, 3, 4));
        drop(busy);
        assert_eq!((p.slots.counts().0, p.busy_count()), (4, 0));
        // shrinking while idle takes effect at once
        p.resize(2, 100);
        assert_eq!((p.slots.counts().0, p.slots.owed(), p.size()), (2, 0, 2));
    }
}
