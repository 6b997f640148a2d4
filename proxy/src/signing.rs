//! The signed tenant context: a copy of the session's tenant settings that the database can verify,
//! so a statement the guard failed to recognise — or a client connected straight to Postgres with
//! the restricted role's password — can set `app.tenant_id` to anything and still read nothing.
//!
//! pgtenant sets two more transaction-local settings in its context statement:
//! - `pgtenant.context`: a compact JSON payload, keys in sorted order:
//!   `{"bs":…,"iat":…,"kid":…,"pid":…,"settings":{name: value, …}}` — the backend connection it is
//!   valid on (`pid` = `pg_backend_pid()`, `bs` = that backend's start as
//!   `extract(epoch from backend_start)::text`), when it was issued (unix seconds), the key id, and
//!   every tenant setting of the session;
//! - `pgtenant.signature`: lowercase hex HMAC-SHA256 of the payload's bytes under the key `kid`.
//!
//! The database side (`pgtenant install-sql`) keeps the keys in a table the restricted role cannot
//! read and exposes `pgtenant.setting(name)`, which returns the payload's value only when the
//! signature checks out and the payload names the backend it runs on. Binding the payload to the
//! backend makes a copied context worthless on any other connection: a client that reads its own
//! context through pgtenant cannot replay it on a direct connection.
//!
//! Signing is per (session, backend): the session caches the signed bytes of each backend it uses.
//! Verifying is per (backend, context): the database remembers what it verified on a connection
//! ([`CACHE_SETTING`]), so the full check runs the first time a session's context reaches a backend.

use std::collections::BTreeMap;

use aws_lc_rs::hmac;

/// The setting that carries the payload.
pub const CONTEXT_SETTING: &str = "pgtenant.context";
/// The setting that carries the payload's signature.
pub const SIGNATURE_SETTING: &str = "pgtenant.signature";

/// Where the database remembers the contexts it verified on a backend connection (each payload with
/// its signature, and the backend they are bound to; `install_sql` has the format), so that a
/// transaction whose context was verified before costs a string search instead of a key lookup,
/// three HMACs and a look at `pg_stat_activity`. It has to be a setting the restricted role can
/// neither change nor read, and PostgreSQL has no such custom setting without a compiled extension:
/// `session_preload_libraries` is superuser-only and is read only when a connection starts, so
/// changing it later in a session has no other effect. `RESET ALL` (and `DISCARD ALL`) clear it:
/// the next context is verified in full.
pub const CACHE_SETTING: &str = "session_preload_libraries";

/// How pgtenant learns a backend's start, once per connection: the verifying function computes
/// the same text on its side.
pub const BACKEND_START_SQL: &str =
    "SELECT extract(epoch from backend_start)::text FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid())";

/// The signer in force: replaced on reload (a new key and kid), read by sessions at the start of
/// each transaction so every session moves to the new key together.
#[derive(Debug, Default)]
pub struct SignerSlot {
    generation: std::sync::atomic::AtomicU64,
    current: std::sync::RwLock<Option<std::sync::Arc<Signer>>>,
}

impl SignerSlot {
    pub fn new(signer: Option<Signer>) -> SignerSlot {
        SignerSlot { generation: 1.into(), current: std::sync::RwLock::new(signer.map(std::sync::Arc::new)) }
    }

    pub fn set(&self, signer: Option<Signer>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = signer.map(std::sync::Arc::new);
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    pub fn get(&self) -> Option<std::sync::Arc<Signer>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The signer, if it changed since generation `seen` (which is updated).
    pub fn changed(&self, seen: &mut u64) -> Option<Option<std::sync::Arc<Signer>>> {
        let now = self.generation.load(std::sync::atomic::Ordering::Acquire);
        if now == *seen {
            return None;
        }
        *seen = now;
        Some(self.get())
    }
}

/// Signs payloads with the configured key (`tenant.signing_key`, `tenant.signing_kid`).
pub struct Signer {
    kid: String,
    key: hmac::Key,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("kid", &self.kid).finish_non_exhaustive() // never the key
    }
}

/// Which backend connection a payload is valid on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendId {
    pub pid: i32,
    /// `extract(epoch from backend_start)::text` of that backend.
    pub started: String,
}

impl Signer {
    /// The signer `[tenant]` configures, if any.
    pub fn from_config(cfg: &crate::config::TenantConfig) -> Result<Option<Signer>, crate::config::ConfigError> {
        Ok(cfg.signing_key_bytes()?.map(|key| Signer::new(&cfg.signing_kid, &key)))
    }

    pub fn new(kid: &str, key: &[u8]) -> Signer {
        Signer { kid: kid.to_string(), key: hmac::Key::new(hmac::HMAC_SHA256, key) }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The payload for `settings` (name, value) on `backend`, issued at `iat` (unix seconds).
    pub fn payload(&self, settings: &[(String, String)], iat: i64, backend: &BackendId) -> String {
        let settings: BTreeMap<&str, &str> = settings.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        // serde_json's map keeps keys sorted: the same input gives the same bytes
        serde_json::json!({
            "bs": backend.started,
            "iat": iat,
            "kid": self.kid,
            "pid": backend.pid,
            "settings": settings,
        })
        .to_string()
    }

    /// Lowercase hex HMAC-SHA256 of `payload`.
    pub fn sign(&self, payload: &str) -> String {
        hex::encode(hmac::sign(&self.key, payload.as_bytes()).as_ref())
    }

    /// (payload, signature) for `settings` on `backend`.
    pub fn signed(&self, settings: &[(String, String)], iat: i64, backend: &BackendId) -> (String, String) {
        let payload = self.payload(settings, iat, backend);
        let signature = self.sign(&payload);
        (payload, signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_canonical_and_signed() {
        let s = Signer::new("k1", b"0123456789abcdef0123456789abcdef");
        let b = BackendId { pid: 42, started: "1764611588.123456".into() };
        let settings = vec![("app.user_id".to_string(), "alice\"x".to_string()), ("app.tenant_id".to_string(), "7".to_string())];
        let (p, sig) = s.signed(&settings, 1700000000, &b);
        assert_eq!(
            p,
            r#"{"bs":"1764611588.123456","iat":1700000000,"kid":"k1","pid":42,"settings":{"app.tenant_id":"7","app.user_id":"alice\"x"}}"#
        );
        assert_eq!(sig.len(), 64);
        // RFC 4231-style check of the primitive: HMAC-SHA256("key", "The quick brown fox…")
        let k = Signer::new("t", b"key");
        assert_eq!(k.sign("The quick brown fox jumps over the lazy dog"), "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8");
        assert!(!format!("{s:?}").contains("0123"));
    }
}
