//! `target_session_attrs`: the check that a freshly opened connection reached the kind of server
//! wanted, as libpq makes it. Which kind that is (`SessionAttrs`) is part of `backend.url`, parsed
//! in `crate::conninfo`; the check needs a connection, so it is here.
//!
//! Postgres 14 and later report `in_hot_standby` and `default_transaction_read_only` at startup,
//! so the check costs nothing there; older servers are asked (`SHOW transaction_read_only`,
//! `SELECT pg_is_in_recovery()`).

use super::connect::{BackendConn, ConnectError};
use super::query::simple_query;
use crate::conninfo::SessionAttrs;

impl SessionAttrs {
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
