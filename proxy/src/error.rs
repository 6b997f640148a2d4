//! Errors as the client sees them: a Postgres `ErrorResponse` with a SQLSTATE.
//!
//! Everything pgtenant refuses reaches the client as a real Postgres error, so psql, drivers and ORMs
//! show it the way they show any server error. Messages never contain tokens or secrets.

use bytes::BytesMut;
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::Message;

/// SQLSTATE codes pgtenant emits. They are part of the public interface (docs/errors.md).
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const ACTIVE_SQL_TRANSACTION: &str = "25001";
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const IO_ERROR: &str = "58030";
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    pub const TRANSACTION_TIMEOUT: &str = "25P04";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An error destined for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        PgError { severity: Severity::Error, code, message: message.into(), detail: None, hint: None }
    }

    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        PgError { severity: Severity::Fatal, code, message: message.into(), detail: None, hint: None }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Appends the wire form (`E` message) to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        let sev = self.severity.as_str().to_string();
        let mut fields = vec![
            (b'S', sev.clone()),
            (b'V', sev),
            (b'C', self.code.to_string()),
            (b'M', self.message.clone()),
        ];
        if let Some(d) = &self.detail {
            fields.push((b'D', d.clone()));
        }
        if let Some(h) = &self.hint {
            fields.push((b'H', h.clone()));
        }
        // Encoding an ErrorResponse into a BytesMut cannot fail except for oversize messages,
        // which our own short messages never are.
        let _ = ErrorResponse::new(fields).encode(buf);
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity.as_str(), self.code, self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for PgError {}
