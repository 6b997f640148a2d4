//! What a login is checked against (`Auth`: JWT keys, tenant mapping, statement guard, bypass
//! rules) and the slot holding the rules in force. Built from the config by the server, replaced
//! as a whole on reload, while sessions keep the rules they logged in with. Lives on the client
//! side so that `auth::login` needs nothing from the server module.

use std::sync::{Arc, RwLock};

use crate::config::{Config, ConfigError};
use crate::guard::Guard;
use crate::jwt::JwtVerifier;
use crate::tenant::TenantMapping;

use super::bypass::BypassAuth;

/// The login rules, as one value.
pub struct Auth {
    pub verifier: JwtVerifier,
    pub mapping: TenantMapping,
    pub guard: Arc<Guard>,
    /// `[bypass]`, when enabled: which tokens may use the bypass pool.
    pub bypass: Option<BypassAuth>,
}

impl Auth {
    /// Builds the login rules; `previous` lends its fetched JWKS cache when the URL is unchanged.
    pub fn from_config(config: &Config, previous: Option<&Auth>) -> Result<Auth, ConfigError> {
        Ok(Auth {
            verifier: JwtVerifier::from_config_reusing(&config.jwt, previous.map(|a| &a.verifier))?,
            mapping: TenantMapping::from_config(&config.tenant)?,
            guard: Arc::new(Guard::from_config(&config.tenant)),
            bypass: BypassAuth::from_config(&config.bypass, &config.tenant, previous.and_then(|a| a.bypass.as_ref()))?,
        })
    }
}

/// The rules in force now; a reload swaps them as a whole.
pub struct AuthSlot(RwLock<Arc<Auth>>);

impl AuthSlot {
    pub fn new(auth: Auth) -> AuthSlot {
        AuthSlot(RwLock::new(Arc::new(auth)))
    }

    pub fn get(&self) -> Arc<Auth> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, auth: Auth) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(auth);
    }
}
