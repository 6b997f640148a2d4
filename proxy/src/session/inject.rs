//! The context statement pgtenant runs first in every transaction:
//! `SELECT pg_catalog.set_config($1, $2, true), pg_catalog.set_config($3, $4, true), …`.
//!
//! Setting names and claim values travel as bind parameters, never as SQL text, so no claim can
//! inject SQL and `pg_stat_activity` never shows a claim value. The statement is prepared once per
//! backend connection under a fixed name and then costs one Bind/Execute per transaction. It is sent
//! without a Sync right in front of the client's first message, so it runs inside the client's
//! transaction at no extra round trip. The function is schema-qualified so no `search_path` can
//! substitute another `set_config`.

use bytes::{Bytes, BytesMut};

use super::replies::{Replies, Want};
use crate::protocol::build;

/// Name of the prepared context statement and of the portal it runs in.
pub const CONTEXT_NAME: &str = "pgtenant_ctx";

/// The context statement's SQL for `n` settings.
pub fn context_sql(n: usize) -> String {
    let calls: Vec<String> =
        (0..n).map(|i| format!("pg_catalog.set_config(${}, ${}, true)", 2 * i + 1, 2 * i + 2)).collect();
    format!("SELECT {}", calls.join(", "))
}

/// Pre-encoded injection bytes for one client session.
#[derive(Debug, Clone)]
pub struct Injection {
    /// Close + Parse of the context statement (sent when the backend does not have it prepared).
    prepare: Bytes,
    /// Bind + Execute + Close(portal) with this session's values.
    run: Bytes,
}

impl Injection {
    /// `settings` are (name, value) pairs in the order they are applied.
    pub fn new(names: &[String], values: &[String]) -> Injection {
        let mut prepare = BytesMut::new();
        build::close_statement(&mut prepare, CONTEXT_NAME);
        build::parse(&mut prepare, CONTEXT_NAME, &context_sql(names.len()), vec![25; names.len() * 2]);
        let params: Vec<String> =
            names.iter().zip(values).flat_map(|(n, v)| [n.clone(), v.clone()]).collect();
        let mut run = BytesMut::new();
        build::bind_text(&mut run, CONTEXT_NAME, CONTEXT_NAME, &params);
        build::execute(&mut run, CONTEXT_NAME);
        build::close_portal(&mut run, CONTEXT_NAME);
        Injection { prepare: prepare.freeze(), run: run.freeze() }
    }

    /// Writes the injection into `out` and records the replies it owes.
    pub fn write(&self, out: &mut BytesMut, prepared: bool, replies: &mut Replies) {
        if !prepared {
            out.extend_from_slice(&self.prepare);
            replies.expect(Want::CloseComplete, true, false);
            replies.expect(Want::ParseComplete, true, false);
        }
        out.extend_from_slice(&self.run);
        replies.expect(Want::BindComplete, true, false);
        replies.expect(Want::CommandDone, true, false);
        replies.expect(Want::CloseComplete, true, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_shape() {
        assert_eq!(
            context_sql(2),
            "SELECT pg_catalog.set_config($1, $2, true), pg_catalog.set_config($3, $4, true)"
        );
    }
}
