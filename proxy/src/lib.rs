//! pgtenant: a Postgres wire-protocol proxy that verifies a JWT passed as the password and runs every
//! client transaction on a pooled, restricted-role backend connection with the tenant's settings
//! applied by `set_config(name, value, true)`.
//!
//! The module tree follows the data path:
//! client side (`client`: TLS, startup, auth) → `jwt` → `tenant` context (`signing`: the copy the
//! database can verify, with `install_sql`, the SQL that verifies it) → `session` (transaction state
//! machine, injection) → `pool` / `backend`.

pub mod admin;
pub mod audit;
pub mod backend;
pub mod cancel;
pub mod client;
pub mod cluster;
pub mod config;
pub mod console;
pub mod conninfo;
pub mod demo;
pub mod doctor;
pub mod error;
pub mod fleet;
pub mod guard;
pub mod install_sql;
pub mod jwt;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod pool;
pub mod protocol;
pub mod routing;
pub mod server;
pub mod session;
pub mod sessions;
pub mod signing;
pub mod sql;
pub mod tenant;
