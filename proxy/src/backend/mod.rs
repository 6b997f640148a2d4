//! The backend side: where the database is (`target`), how pgtenant logs in to it as the
//! restricted role (`connect`: TLS, SCRAM-SHA-256, md5, cleartext, trust), and TLS settings
//! towards it (`tls`).

pub mod connect;
pub mod query;
pub mod target;
pub mod tls;

pub use connect::{connect, send_cancel, BackendConn, ConnectError};
pub use target::{BackendTarget, Host};
