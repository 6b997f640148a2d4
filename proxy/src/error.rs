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
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    /// sqlserver_rejected_establishment_of_sqlconnection: a token names a cluster pgtenant does
    /// not have (`tenant.cluster_claim`).
    pub const REJECTED_CONNECTION: &str = "08004";
    pub const SYNTAX_ERROR: &str = "42601";
    /// A Bind of the unnamed statement by a client that has none (PostgreSQL's own code and message).
    pub const UNDEFINED_PSTATEMENT: &str = "26000";
    /// An Execute of the unnamed portal by a client that bound none (PostgreSQL's own code and
    /// message).
    pub const UNDEFINED_CURSOR: &str = "34000";
    /// A Parse of a statement name the session already has (PostgreSQL's own code and message).
    pub const DUPLICATE_PSTATEMENT: &str = "42P05";
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
    pub const CONFIG_FILE_ERROR: &str = "F0000";
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

    /// An ErrorResponse the server sent (its body), as an error of `severity` with the server's
    /// SQLSTATE, message, detail and hint.
    pub fn from_server(body: &[u8], severity: Severity) -> Self {
        let mut err = PgError { severity, code: sqlstate::INTERNAL_ERROR, message: String::new(), detail: None, hint: None };
        for field in body.split(|&b| b == 0) {
            let Some((&kind, value)) = field.split_first() else { continue };
            let value = String::from_utf8_lossy(value).into_owned();
            match kind {
                b'C' => err.code = server_code(&value),
                b'M' => err.message = value,
                b'D' => err.detail = Some(value),
                b'H' => err.hint = Some(value),
                _ => {}
            }
        }
        err
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

/// A SQLSTATE the server sent, as the `&'static str` a `PgError` carries. The server uses a few
/// hundred codes at most; each is kept once (and past a bound, or if malformed, `XX000`).
fn server_code(code: &str) -> &'static str {
    static CODES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    if code.len() != 5 || !code.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()) {
        return sqlstate::INTERNAL_ERROR;
    }
    let mut codes = CODES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = codes.iter().find(|c| **c == code) {
        return c;
    }
    if codes.len() >= 1024 {
        return sqlstate::INTERNAL_ERROR;
    }
    let c: &'static str = Box::leak(code.to_string().into_boxed_str());
    codes.push(c);
    c
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_keep_their_fields() {
        let body = b"SERROR\0VERROR\0C22023\0Minvalid value for parameter \"DateStyle\": \"x\"\0DUnrecognized key word: \"x\".\0\0";
        let e = PgError::from_server(body, Severity::Fatal);
        assert_eq!((e.severity, e.code), (Severity::Fatal, "22023"));
        assert_eq!(e.message, "invalid value for parameter \"DateStyle\": \"x\"");
        assert_eq!(e.detail.as_deref(), Some("Unrecognized key word: \"x\"."));
        assert!(std::ptr::eq(e.code, PgError::from_server(b"C22023\0\0", Severity::Error).code));
        assert_eq!(PgError::from_server(b"Cnope\0\0", Severity::Error).code, "XX000");
    }
}
