//! The backend side: where the database is (`target`), how pgtenant logs in to it as the
//! restricted role (`connect`: TLS, SCRAM-SHA-256, md5, cleartext, trust), and TLS settings
//! towards it (`tls`). `backend.url` may name several hosts (`crate::conninfo` parses it, and
//! `Host` and `SessionAttrs` come from there); `attrs` checks that a connection reached the kind of
//! server wanted there (the writable primary).

pub mod attrs;
pub mod connect;
pub mod query;
pub mod target;
pub mod tls;

pub use connect::{connect, connect_as, send_cancel, BackendConn, ConnectError};
pub use crate::conninfo::{Host, SessionAttrs};
pub use target::BackendTarget;
