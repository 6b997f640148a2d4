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

/// Name of the portal the context statement runs in; statements are `pgtenant_ctx_<n>` for n
/// settings (sessions differ in how many client parameters they carry).
pub const CONTEXT_NAME: &str = "pgtenant_ctx";

fn statement_name(n: usize) -> String {
    format!("{CONTEXT_NAME}_{n}")
}

/// The context statement's SQL for `n` settings.
pub fn context_sql(n: usize) -> String {
    let calls: Vec<String> =
        (0..n).map(|i| format!("pg_catalog.set_config(${}, ${}, true)", 2 * i + 1, 2 * i + 2)).collect();
    format!("SELECT {}", calls.join(", "))
}

/// Pre-encoded injection bytes for one client session.
#[derive(Debug, Clone)]
pub struct Injection {
    /// Number of settings: bit `arity` of a backend's `ctx_prepared` says it has the statement.
    arity: usize,
    /// Close + Parse of the context statement (sent when the backend does not have it prepared).
    prepare: Bytes,
    /// Bind + Execute + Close(portal) with this session's values.
    run: Bytes,
}

impl Injection {
    /// `settings` are (name, value) pairs in the order they are applied.
    pub fn new(names: &[String], values: &[String]) -> Injection {
        let stmt = statement_name(names.len());
        let mut prepare = BytesMut::new();
        build::close_statement(&mut prepare, &stmt);
        build::parse(&mut prepare, &stmt, &context_sql(names.len()), vec![25; names.len() * 2]);
        let params: Vec<String> =
            names.iter().zip(values).flat_map(|(n, v)| [n.clone(), v.clone()]).collect();
        let mut run = BytesMut::new();
        build::bind_text(&mut run, CONTEXT_NAME, &stmt, &params);
        build::execute(&mut run, CONTEXT_NAME);
        build::close_portal(&mut run, CONTEXT_NAME);
        Injection { arity: names.len(), prepare: prepare.freeze(), run: run.freeze() }
    }

    /// Writes the injection into `out` and records the replies it owes; `prepared` is the backend's
    /// bitmask of prepared context statements, updated here.
    pub fn write(&self, out: &mut BytesMut, prepared: &mut u128, replies: &mut Replies) {
        let bit = 1u128.checked_shl(self.arity as u32).unwrap_or(0);
        if *prepared & bit == 0 {
            *prepared |= bit;
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
