//! Keys from `jwt.jwks_url`: fetched in the background, cached, refreshed every
//! `jwt.jwks_refresh_s`, and refetched early when a token names a `kid` the cache does not hold
//! (at most once per `jwt.jwks_min_refresh_s`, so a flood of made-up `kid`s cannot turn into a
//! flood of fetches). A failed fetch or an unusable document keeps the last good set: an identity
//! provider outage never locks out clients whose keys are already known. Rotation at the provider
//! (publish the new key, start signing with it, retire the old one) needs no restart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::DecodingKey;

use super::https::{self, Target};
use crate::config::{ConfigError, JwtConfig};

const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_REFRESH: u64 = 300;
const DEFAULT_MIN_REFRESH: u64 = 10;
/// Retry delay after a failed fetch, doubling up to the refresh interval (at most a minute).
const RETRY_START: Duration = Duration::from_millis(500);

pub type KeyList = Vec<(Option<String>, DecodingKey)>;

pub struct RemoteKeys {
    url: String,
    ca_file: Option<std::path::PathBuf>,
    target: Target,
    tls: Arc<rustls::ClientConfig>,
    refresh: Duration,
    min_refresh: Duration,
    keys: RwLock<Arc<KeyList>>,
    loaded: AtomicBool,
    /// When the last fetch was started (rate limit for unknown-kid refetches).
    last_attempt: Mutex<Option<Instant>>,
    /// One fetch at a time; others wait for its result.
    fetching: tokio::sync::Mutex<()>,
    started: AtomicBool,
}

impl std::fmt::Debug for RemoteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteKeys({}, {} keys)", self.url, self.snapshot().len())
    }
}

/// Turns a JWKS document into keys; a document with no usable key is an error.
pub fn parse_set(text: &[u8], what: &str) -> Result<KeyList, String> {
    let set: JwkSet = serde_json::from_slice(text).map_err(|e| format!("{what} is not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for jwk in &set.keys {
        match DecodingKey::from_jwk(jwk) {
            Ok(key) => keys.push((jwk.common.key_id.clone(), key)),
            Err(e) => skipped.push(format!("{}: {e}", jwk.common.key_id.as_deref().unwrap_or("(no kid)"))),
        }
    }
    if !skipped.is_empty() {
        tracing::warn!(source = what, skipped = %skipped.join("; "), "JWKS: unusable keys skipped");
    }
    if keys.is_empty() {
        return Err(format!("{what} holds no usable key"));
    }
    Ok(keys)
}

impl RemoteKeys {
    pub fn from_config(cfg: &JwtConfig, url: &str) -> Result<RemoteKeys, ConfigError> {
        let target = Target::parse(url).map_err(|e| ConfigError::Invalid(format!("jwt.jwks_url: {e}")))?;
        let tls = https::tls_config(cfg.jwks_ca_file.as_deref()).map_err(ConfigError::Invalid)?;
        Ok(RemoteKeys {
            url: url.to_string(),
            ca_file: cfg.jwks_ca_file.clone(),
            target,
            tls,
            refresh: Duration::from_secs(cfg.jwks_refresh_s.unwrap_or(DEFAULT_REFRESH)),
            min_refresh: Duration::from_secs(cfg.jwks_min_refresh_s.unwrap_or(DEFAULT_MIN_REFRESH)),
            keys: RwLock::new(Arc::new(Vec::new())),
            loaded: AtomicBool::new(false),
            last_attempt: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            started: AtomicBool::new(false),
        })
    }

    /// Same source and fetch settings: a reload can keep this cache instead of starting empty.
    pub fn same_source(&self, cfg: &JwtConfig, url: &str) -> bool {
        self.url == url
            && self.refresh.as_secs() == cfg.jwks_refresh_s.unwrap_or(DEFAULT_REFRESH)
            && self.min_refresh.as_secs() == cfg.jwks_min_refresh_s.unwrap_or(DEFAULT_MIN_REFRESH)
            && self.ca_file == cfg.jwks_ca_file
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The keys in force now (empty until the first successful fetch).
    pub fn snapshot(&self) -> Arc<KeyList> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// At least one fetch has succeeded.
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Fetches the document now and, if it holds usable keys, replaces the cache. On any error the
    /// last good set stays. Returns the number of keys loaded.
    pub async fn refresh(&self) -> Result<usize, String> {
        let _one = self.fetching.lock().await;
        *self.last_attempt.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let result = match https::get(&self.target, &self.tls, FETCH_TIMEOUT).await {
            Ok(body) => parse_set(&body, "the jwt.jwks_url answer"),
            Err(e) => Err(e),
        };
        let label = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!(crate::metrics::JWKS_FETCHES, "result" => label).increment(1);
        match result {
            Ok(keys) => {
                let n = keys.len();
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
                self.loaded.store(true, Ordering::Release);
                tracing::debug!(url = %self.url, keys = n, "JWKS refreshed");
                Ok(n)
            }
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, kept = self.snapshot().len(), "JWKS fetch failed; keeping the last good keys");
                Err(e)
            }
        }
    }

    /// A token named a `kid` the cache lacks: refetch, unless a fetch started less than
    /// `jwks_min_refresh_s` ago (then the answer is what the cache holds). True if keys changed
    /// hands, i.e. verifying again may help.
    pub async fn refresh_for_unknown_kid(&self) -> bool {
        let recent = self
            .last_attempt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < self.min_refresh);
        if recent {
            // a fetch may be running right now: wait for it, it may bring the key
            let _wait = self.fetching.lock().await;
            return true;
        }
        self.refresh().await.is_ok()
    }

    /// Starts the background refresher once (idempotent). It stops when the last handle to
    /// these keys is dropped (e.g. a reload switched to another URL).
    pub fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut retry = RETRY_START;
            loop {
                let Some(keys) = weak.upgrade() else { return };
                let delay = match keys.refresh().await {
                    Ok(_) => {
                        retry = RETRY_START;
                        keys.refresh
                    }
                    Err(_) => {
                        let d = retry;
                        retry = (retry * 2).min(keys.refresh.min(Duration::from_secs(60)));
                        d
                    }
                };
                drop(keys);
                tokio::time::sleep(delay).await;
            }
        });
    }
}
