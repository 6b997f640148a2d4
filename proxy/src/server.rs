//! The listener: accepts clients, runs the startup and login phase under `server.auth_timeout_ms`,
//! answers cancel requests, and hands each logged-in client to its `Session`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::backend::BackendTarget;
use crate::cancel::CancelRegistry;
use crate::client::rules::{Auth, AuthSlot};
use crate::client::{auth, startup, tls};
use crate::config::Config;
use crate::error::PgError;
use crate::fleet::Fleet;
use crate::pool::Pool;
use crate::session::settings::ClientSettings;
use crate::session::{ClientView, End, Session, Shared};

mod errors;
pub use errors::{ReloadError, StartError};

/// Everything a connection needs, built once from the config.
pub struct Proxy {
    /// The config the proxy started with (what needs a restart comes from here).
    pub config: Config,
    /// The config in force now (replaced by each successful reload).
    live: std::sync::RwLock<Arc<Config>>,
    /// Where the config came from (for reload), if from a file.
    pub config_path: Option<std::path::PathBuf>,
    auth: AuthSlot,
    /// Client connections open right now (bounded by `server.max_clients`).
    pub clients: std::sync::atomic::AtomicUsize,
    pub shared: Arc<Shared>,
    pub cancels: Arc<CancelRegistry>,
    /// The live client sessions (the admin console lists and ends them).
    pub sessions: Arc<crate::sessions::Sessions>,
    /// This instance's id and its peers, where cancel requests for other instances go.
    pub fleet: Fleet,
    pub tls: Option<TlsAcceptor>,
    drain: watch::Sender<bool>,
}

impl Proxy {
    pub fn new(config: Config) -> Result<Arc<Proxy>, StartError> {
        let hosts = BackendTarget::all_from_config(&config.backend)
            .map_err(|error| StartError::BackendUrl { key: "backend.url", error })?;
        let auth = Auth::from_config(&config, None)?;
        let tls = match (&config.server.tls_cert, &config.server.tls_key) {
            (Some(cert), Some(key)) => Some(tls::load_acceptor(cert, key).map_err(StartError::Tls)?),
            _ => None,
        };
        let peers = config.peer_map()?;
        let peer_id = config.server.peer_id.map(|id| id as u8);
        let pool = Pool::for_hosts(&config, "tenant", hosts, config.backend.pool_size, Arc::new(config.limits.clone()));
        let router = crate::routing::Router::new(&config, pool.clone())
            .map_err(|e| StartError::BackendUrl { key: e.key, error: e.error })?;
        let bypass = if config.bypass.enabled {
            let hosts = BackendTarget::all_from_config(&config.bypass.backend(&config.backend))
                .map_err(|error| StartError::BackendUrl { key: "bypass.url", error })?;
            Some(Pool::for_hosts(&config, "bypass", hosts, config.bypass.pool_size, Arc::new(Default::default())))
        } else {
            None
        };
        let audit = Arc::new(crate::audit::AuditLog::open(&config.audit).map_err(StartError::AuditLog)?);
        let (drain, draining) = watch::channel(false);
        let shared = Arc::new(Shared {
            pool,
            router,
            bypass,
            audit,
            max_message_bytes: config.server.max_message_bytes,
            max_state_bytes: config.server.max_session_state_bytes,
            client_write_timeout: Duration::from_millis(config.server.client_write_timeout_ms),
            pool_cfg: config.pool.clone(),
            session_mode: config.pool.mode == crate::config::PoolMode::Session,
            signer: crate::signing::SignerSlot::new(crate::signing::Signer::from_config(&config.tenant)?),
            draining,
        });
        Ok(Arc::new(Proxy {
            drain,
            clients: Default::default(),
            shared,
            cancels: Arc::new(CancelRegistry::for_instance(peer_id)),
            sessions: Default::default(),
            fleet: Fleet::new(peer_id, peers),
            auth: AuthSlot::new(auth),
            live: std::sync::RwLock::new(Arc::new(config.clone())),
            config_path: None,
            tls,
            config,
        }))
    }

    /// The config in force now.
    pub fn live_config(&self) -> Arc<Config> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The login rules in force now.
    pub fn auth(&self) -> Arc<Auth> {
        self.auth.get()
    }

    /// Applies a new config: JWT keys, tenant mapping and guard for new logins (connected clients
    /// keep what they logged in with), pool size, wait timeout and `[limits]`, log level, the
    /// tenant metrics selection, and the audit log (reopened, so logrotate works). An invalid
    /// config changes nothing. Settings that need a restart (`[server]`, backend URL, pool mode,
    /// bypass URL, size and on/off) are reported if they differ.
    pub async fn reload(&self, new: &Config) -> Result<(), ReloadError> {
        let result = self.apply(new).await;
        match result {
            Ok(()) => metrics::counter!(crate::metrics::CONFIG_RELOADS, "result" => "ok").increment(1),
            Err(_) => self.reload_rejected(),
        }
        result
    }

    /// A rejected config must not stop logrotate from working: the current audit log is reopened.
    fn reload_rejected(&self) {
        metrics::counter!(crate::metrics::CONFIG_RELOADS, "result" => "rejected").increment(1);
        if let Err(e) = self.shared.audit.reopen(&self.live_config().audit) {
            tracing::error!(error = %e, "cannot reopen the audit log");
        }
    }

    async fn apply(&self, new: &Config) -> Result<(), ReloadError> {
        let auth = Auth::from_config(new, Some(&self.auth()))?;
        let peers = new.peer_map()?;
        let signer = crate::signing::Signer::from_config(&new.tenant)?;
        crate::logging::validate_level(&new.log.level).map_err(ReloadError::LogLevel)?;
        if new.bypass.enabled && self.shared.bypass.is_none() {
            // turning it off is a reload (new bypass logins stop at once); on needs its pool
            return Err(ReloadError::NeedsRestart("turning bypass.enabled on"));
        }
        let unreachable = |key, url: &str, error| ReloadError::KeysUnreachable { key, url: url.to_string(), error };
        if let Some(remote) = auth.verifier.remote().filter(|r| !r.loaded()) {
            // a new key URL must answer before it replaces keys that work
            remote.refresh().await.map_err(|e| unreachable("jwt.jwks_url", remote.url(), e))?;
        }
        if let Some(remote) = auth.bypass.as_ref().and_then(|b| b.verifier.remote()).filter(|r| !r.loaded()) {
            remote.refresh().await.map_err(|e| unreachable("bypass.jwt.jwks_url", remote.url(), e))?;
        }
        self.shared.audit.reopen(&new.audit).map_err(ReloadError::AuditLog)?;
        // placement, cluster and replica pool sizes (the clusters themselves need a restart)
        self.shared.router.apply(new).map_err(ReloadError::NeedsRestart)?;
        auth.verifier.start_background();
        if let Some(b) = &auth.bypass {
            b.verifier.start_background();
        }
        self.auth.set(auth);
        // every session signs its next transaction with the new key (the database accepts each
        // installed kid, so rotation is: install the new kid, reload, remove the old one)
        self.shared.signer.set(signer);
        self.shared.pool.resize(new.backend.pool_size, new.query_wait_timeout_ms());
        self.shared.pool.set_limits(Arc::new(new.limits.clone()));
        self.fleet.set_peers(peers);
        crate::logging::set_level(&new.log.level).map_err(ReloadError::LogLevel)?;
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new.clone());
        let old = &self.config;
        if old.server != new.server || old.backend.url != new.backend.url || old.pool.mode != new.pool.mode {
            tracing::warn!("reload: [server], backend.url and pool.mode take effect on restart");
        }
        if old.bypass.url != new.bypass.url || old.bypass.pool_size != new.bypass.pool_size {
            tracing::warn!("reload: bypass.url and bypass.pool_size take effect on restart");
        }
        tracing::info!(
            pool_size = new.backend.pool_size,
            log_level = %new.log.level,
            "reload: JWT keys, tenant mapping, statement guard, context signing key, pool sizes, limits, tenant placement, replica lag bound, [peers], audit log and log level applied"
        );
        Ok(())
    }

    /// Re-reads the config file this proxy was started from and reloads it.
    pub async fn reload_from_file(&self) -> Result<(), ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoConfigFile)?;
        match Config::load(path) {
            Ok(cfg) => self.reload(&cfg).await,
            Err(e) => {
                self.reload_rejected();
                Err(e.into())
            }
        }
    }

    /// What a login needs from this proxy.
    fn login_inputs(&self) -> auth::LoginInputs<'_> {
        auth::LoginInputs {
            rules: &self.auth,
            pool: &self.shared.pool,
            router: &self.shared.router,
            bypass: self.shared.bypass.as_deref(),
            session_mode: self.shared.session_mode,
            cancels: &self.cancels,
            audit: &self.shared.audit,
        }
    }

    /// Accepts connections on every listener until `shutdown` flips to true.
    pub async fn serve(self: Arc<Self>, listeners: Vec<TcpListener>, shutdown: watch::Receiver<bool>) {
        self.shared.pool.spawn_reaper();
        self.shared.router.spawn_background();
        if let Some(b) = &self.shared.bypass {
            b.spawn_reaper();
        }
        let accepting: Vec<_> =
            listeners.into_iter().map(|l| tokio::spawn(self.clone().accept(l, shutdown.clone()))).collect();
        for task in accepting {
            let _ = task.await;
        }
    }

    async fn accept(self: Arc<Self>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let proxy = self.clone();
                        tokio::spawn(async move { proxy.handle(tcp, peer).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn handle(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        use std::sync::atomic::Ordering;
        let _slot = ClientSlot(&self.clients);
        if self.clients.fetch_add(1, Ordering::AcqRel) >= self.config.server.max_clients {
            tracing::warn!(%peer, max = self.config.server.max_clients, "client refused: too many clients");
            let err = PgError::fatal(
                crate::error::sqlstate::TOO_MANY_CONNECTIONS,
                format!("pgtenant: sorry, too many clients already (server.max_clients = {})", self.config.server.max_clients),
            );
            send_fatal(crate::net::Stream::Tcp(tcp), &err).await;
            return;
        }
        let timeout = Duration::from_millis(self.config.server.auth_timeout_ms);
        // boxed, like the other one-off stages below: a task's future is as large as its largest
        // stage, and it stays that large while the session sits idle (10,000 idle clients)
        let logged_in = tokio::time::timeout(timeout, Box::pin(async {
            let hello = startup::negotiate(tcp, self.tls.as_ref(), self.config.server.require_tls).await;
            match hello {
                Ok(startup::Hello::Login { stream, params }) if crate::console::addressed(&params, &self.live_config()) => {
                    match crate::console::login::login(&*self, stream, &params, peer).await {
                        Ok(console) => Some(Admitted::Console(console)),
                        Err((stream, err)) => {
                            send_fatal(stream, &err).await;
                            None
                        }
                    }
                }
                Ok(startup::Hello::Login { stream, params }) => match auth::login(&self.login_inputs(), stream, &params, peer).await {
                    Ok(l) => Some(Admitted::Client(l)),
                    Err((stream, err)) => {
                        let _ = self.shared.audit.record(
                            "login",
                            serde_json::json!({
                                "result": "refused",
                                "sqlstate": err.code,
                                "reason": err.message.trim_start_matches("pgtenant: "),
                                "user": params.get("user"),
                                "client": peer.to_string(),
                            }),
                        ).await;
                        send_fatal(stream, &err).await;
                        None
                    }
                },
                Ok(startup::Hello::Cancel { pid, secret }) => {
                    let target = self.shared.pool.target();
                    self.fleet.cancel(pid, secret, |secret| self.cancels.cancel(target, pid, secret)).await;
                    None
                }
                Ok(startup::Hello::Gone) => None,
                Err(startup::StartupError { stream, error }) => {
                    tracing::info!(%peer, error = %error, "startup refused");
                    if let Some(s) = stream {
                        send_fatal(s, &error).await;
                    }
                    None
                }
            }
        }))
        .await;
        let l = match logged_in {
            Ok(Some(Admitted::Client(l))) => l,
            Ok(Some(Admitted::Console(console))) => return Box::pin(console.serve(&*self)).await,
            Ok(None) => return,
            Err(_) => return tracing::info!(%peer, "client did not finish authentication in time"),
        };
        let who = Arc::new(crate::session::Who {
            tenant: Arc::from(l.context.tenant.as_str()),
            subject: l.context.subject.clone(),
            client: peer,
            bypass: l.bypass,
            login: l.cancel.pid,
            cluster: l.context.cluster.clone(),
            prefers_standby: l.prefers_standby,
        });
        let _listed = self.sessions.add(crate::sessions::Client {
            tenant: who.tenant.clone(),
            user: l.user.clone(),
            database: self.shared.pool.target().database.clone(),
            addr: peer,
            tls: l.stream.is_tls(),
            application_name: l.reported.iter().find(|(k, _)| k == crate::protocol::APPLICATION_NAME).map(|(_, v)| v.clone()).unwrap_or_default(),
            pool: if l.bypass { "bypass" } else { "tenant" },
            pid: l.cancel.pid,
            connected: std::time::SystemTime::now(),
            slot: l.cancel.slot.clone(),
        });
        let view = ClientView::new(&l.reported);
        let settings = ClientSettings::new(l.setting_names, l.context.values.clone(), l.params);
        let session = Session::new(self.shared.clone(), l.stream, l.leftover, settings, l.cancel, view, l.guard, who, l.lease);
        match session.run().await {
            End::ClientGone => tracing::debug!(user = %l.user, tenant = %l.context.tenant.replace('\0', ""), "client disconnected"),
            End::Fatal(e) => tracing::info!(user = %l.user, error = %e, "session ended"),
            End::BackendLost(why) => tracing::warn!(user = %l.user, reason = %why, "session ended: backend lost"),
        }
    }
}

/// What the admin endpoint shows of this proxy (admin renders; it does not know the server).
impl crate::admin::Source for Proxy {
    fn clients(&self) -> usize {
        self.clients.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn pool(&self) -> &Pool {
        &self.shared.pool
    }
    fn bypass_pool(&self) -> Option<&Pool> {
        self.shared.bypass.as_deref()
    }
    fn router(&self) -> Option<&crate::routing::Router> {
        Some(&self.shared.router)
    }
    fn keys_loaded(&self) -> bool {
        self.auth().verifier.keys_loaded()
    }
    fn config(&self) -> Arc<Config> {
        self.live_config()
    }
    async fn reload_file(&self) -> Result<(), String> {
        self.reload_from_file().await.map_err(String::from)
    }
}

/// What the admin console reads of this proxy besides the above (the console does not know the
/// server either).
impl crate::console::Source for Proxy {
    fn sessions(&self) -> &crate::sessions::Sessions {
        &self.sessions
    }
    fn session_mode(&self) -> bool {
        self.shared.session_mode
    }
    fn draining(&self) -> watch::Receiver<bool> {
        self.shared.draining.clone()
    }
    async fn verify_token(&self, token: &str) -> Result<serde_json::Map<String, serde_json::Value>, crate::jwt::JwtError> {
        self.auth().verifier.verify_fresh(token).await
    }
}

/// A client past the login phase: a tenant's (or trusted worker's) session, or the admin console.
#[allow(clippy::large_enum_variant)] // lives only between login and the session's start
enum Admitted {
    Client(auth::LoggedIn),
    Console(crate::console::Console),
}

/// Gives a client slot back when the connection ends, however it ends.
struct ClientSlot<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

async fn send_fatal(mut stream: crate::net::Stream, err: &PgError) {
    let mut out = BytesMut::new();
    err.encode(&mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}

/// A proxy running in the background (used by `pgtenant run`, tests and the demo).
pub struct Running {
    pub addr: SocketAddr,
    /// The admin endpoint's address, when `[admin] listen` is set.
    pub admin_addr: Option<SocketAddr>,
    admin_task: Option<tokio::task::JoinHandle<()>>,
    pub proxy: Arc<Proxy>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting connections (sessions already running go on).
    pub async fn stop(mut self) {
        if let Some(t) = self.admin_task.take() {
            t.abort();
        }
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Graceful shutdown: stop accepting; clients between transactions get FATAL 57P01 and are
    /// closed; transactions in flight may finish within `timeout`. Returns the clients still
    /// connected when the time ran out (their connections close when the process exits).
    pub async fn shutdown(mut self, timeout: std::time::Duration) -> usize {
        if let Some(t) = self.admin_task.take() {
            t.abort();
        }
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let _ = self.proxy.drain.send(true);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = self.proxy.clients.load(std::sync::atomic::Ordering::Acquire);
            if left == 0 || tokio::time::Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// Builds the proxy from `config`, binds `server.listen`, and serves in the background.
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_from(config, None).await
}

/// Like `start`, remembering the config file for reloads.
pub async fn start_from(config: Config, path: Option<std::path::PathBuf>) -> Result<Running, StartError> {
    let listen = config.server.listen.clone();
    let mut proxy = Proxy::new(config)?;
    if let Some(proxy) = Arc::get_mut(&mut proxy) {
        proxy.config_path = path;
    }
    let listener = crate::net::listen(&listen, proxy.config.server.so_reuseport)
        .await
        .map_err(|source| StartError::Listen { addr: listen.clone(), source })?;
    let addr = listener.local_addr()?;
    let mut listeners = vec![listener];
    if let Some(own) = &proxy.config.server.peer_listen {
        let l = crate::net::listen(own, false).await.map_err(|source| StartError::PeerListen { addr: own.clone(), source })?;
        listeners.push(l);
    }
    if let Some(warning) = crate::config::cleartext::warning(&proxy.config.server, &[addr]) {
        tracing::warn!("{warning}");
    }
    // the recorder and the hot-path handles, before the first session records anything
    crate::metrics::hot();
    crate::metrics::instance_info(proxy.fleet.peer_id());
    // jwt.jwks_url: fetched in the background; /readyz reports 503 until the first answer
    let auth = proxy.auth();
    auth.verifier.start_background();
    if let Some(b) = &auth.bypass {
        b.verifier.start_background();
    }
    let admin = match &proxy.config.admin.listen {
        Some(a) => {
            let l = TcpListener::bind(a).await.map_err(|source| StartError::AdminListen { addr: a.clone(), source })?;
            let local = l.local_addr()?;
            Some((local, tokio::spawn(crate::admin::serve(l, proxy.clone()))))
        }
        None => None,
    };
    let (admin_addr, admin_task) = admin.map_or((None, None), |(a, t)| (Some(a), Some(t)));
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(proxy.clone().serve(listeners, rx));
    Ok(Running { addr, admin_addr, admin_task, proxy, stop, task })
}
