//! `target_session_attrs`: which kind of server a backend connection must reach, and the check
//! that a freshly opened connection did reach one, as libpq makes it.
//!
//! Postgres 14 and later report `in_hot_standby` and `default_transaction_read_only` at startup,
//! so the check costs nothing there; older servers are asked (`SHOW transaction_read_only`,
//! `SELECT pg_is_in_recovery()`).

use super::connect::{BackendConn, ConnectError};
use super::query::simple_query;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAttrs {
    /// Whatever server answers first (the default with one host).
    Any,
    /// A server that accepts writes: not a standby, `default_transaction_read_only` off (the default
    /// with several hosts).
    ReadWrite,
    /// A server not in recovery (a primary, even one whose default is read-only).
    Primary,
}

impl SessionAttrs {
    pub fn parse(s: &str) -> Result<SessionAttrs, String> {
        match s {
            "any" => Ok(SessionAttrs::Any),
            "read-write" => Ok(SessionAttrs::ReadWrite),
            "primary" => Ok(SessionAttrs::Primary),
            other => Err(format!(
                "target_session_attrs \"{other}\" is not supported for the pool (use read-write, primary or any)"
            )),
        }
    }

    /// Whether `conn` is on a server of this kind; `Err` when asking failed (the connection is then
    /// unusable). `Ok(Some(reason))` says why it is not.
    pub async fn mismatch(self, conn: &mut BackendConn) -> Result<Option<&'static str>, ConnectError> {
        if self == SessionAttrs::Any {
            return Ok(None);
        }
        let reported = |conn: &BackendConn, name: &str| conn.params.iter().find(|(k, _)| k == name).map(|(_, v)| v == "on");
        let standby = match reported(conn, "in_hot_standby") {
            Some(s) => s,
            None => ask_on(conn, "SELECT pg_catalog.pg_is_in_recovery()", "t").await?,
        };
        if standby {
            return Ok(Some("is a standby (in recovery)"));
        }
        if self == SessionAttrs::ReadWrite {
            let read_only = match reported(conn, "default_transaction_read_only") {
                Some(r) => r,
                None => ask_on(conn, "SHOW transaction_read_only", "on").await?,
            };
            if read_only {
                return Ok(Some("accepts no writes (default_transaction_read_only is on)"));
            }
        }
        Ok(None)
    }
}

async fn ask_on(conn: &mut BackendConn, sql: &str, yes: &str) -> Result<bool, ConnectError> {
    let rows = simple_query(conn, sql).await?;
    Ok(rows.first().and_then(|r| r.first()).and_then(|v| v.as_deref()) == Some(yes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_libpq_names() {
        assert_eq!(SessionAttrs::parse("read-write"), Ok(SessionAttrs::ReadWrite));
        assert_eq!(SessionAttrs::parse("primary"), Ok(SessionAttrs::Primary));
        assert_eq!(SessionAttrs::parse("any"), Ok(SessionAttrs::Any));
        assert!(SessionAttrs::parse("prefer-standby").unwrap_err().contains("not supported"));
    }
}
