//! The context statement pgtenant runs first in every transaction:
//! `SELECT WHERE (pg_catalog.set_config($1, $2, true) OPERATOR(pg_catalog.||) …) IS NULL`.
//!
//! It returns no row: `set_config` returns the value it set, and a statement returning it would
//! send every value back (the whole claims object, with `tenant.claims_setting`) in a `DataRow`
//! that pgtenant then reads only to drop it. The server evaluates the filter once (a one-time
//! filter of a `Result`), and `||` evaluates both sides before it looks at either, so every
//! `set_config` runs; none returns NULL, so no row comes back.
//!
//! Setting names and claim values travel as bind parameters, never as SQL text, so no claim can
//! inject SQL and `pg_stat_activity` never shows a claim value. The statement is prepared once per
//! backend connection under a fixed name and then costs one Bind/Execute per transaction. It is sent
//! without a Sync right in front of the client's first message, so it runs inside the client's
//! transaction at no extra round trip. The function is schema-qualified so no `search_path` can
//! substitute another `set_config`. With `tenant.signing_key` it also sets the signed copy of the
//! tenant settings the database can verify (see `crate::signing`).
//!
//! `application_name` is the one client parameter left out when the backend connection already
//! has the client's value: setting it is dear for the server (it is a reported parameter, so the
//! server looks at every setting it has for ones to report once the transaction ends, and it
//! updates the connection's entry in `pg_stat_activity` twice), about 8,700 instructions of a
//! one-query transaction's 100,000–270,000, and nearly every driver sends one. A pooled connection
//! logs in with the name of the client it was opened for (`crate::pool::Pool::acquire`), so with
//! one application behind pgtenant the statement never carries it. The value compared is the one
//! the backend last reported: its session-level value, whatever set it, since a server reports a
//! reported parameter whenever it changes (`PooledConn::application_name`).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::replies::{Replies, Want};
use crate::pool::PooledConn;
use crate::protocol::build;
use crate::signing::{BackendId, Signer, CONTEXT_SETTING, SIGNATURE_SETTING};

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
    if calls.is_empty() {
        return "SELECT WHERE false".into(); // nothing to set (no tenant settings configured)
    }
    format!("SELECT WHERE ({}) IS NULL", calls.join(" OPERATOR(pg_catalog.||) "))
}

/// Statement and portal name of the sequence reset (`DISCARD SEQUENCES`) that goes in front of the
/// context statement when the previous session on the backend may have left sequence state
/// (`crate::pool::Reset::Sequences`): prepared once per backend, then a Bind/Execute/Close in the
/// same batch as the context. As a Query of its own it was a transaction, a ReadyForQuery and a
/// flush of the server's output more per hand-over, which is every write transaction on a busy pool.
pub const RESET_STATEMENT: &str = "pgtenant_reset_seq";

/// The id under which the replies tracker reports a failed or skipped Parse of the reset statement
/// (below the context statements' ids, see [`context_parse_id`]).
pub const RESET_PARSE_ID: u64 = u64::MAX - 129;

/// Writes the sequence reset for `backend` into `out` (preparing it first when needed) and records
/// the replies it owes.
pub fn write_sequence_reset(out: &mut BytesMut, backend: &mut PooledConn, replies: &mut Replies) {
    if backend.needs_reset_parse() {
        build::close_statement(out, RESET_STATEMENT);
        replies.expect(Want::CloseComplete, true, false);
        build::parse(out, RESET_STATEMENT, crate::pool::conn::RESET_SEQUENCES, Vec::new());
        replies.expect_parse(true, RESET_PARSE_ID);
    }
    build::bind_text(out, RESET_STATEMENT, RESET_STATEMENT, &[]);
    build::execute(out, RESET_STATEMENT);
    build::close_portal(out, RESET_STATEMENT);
    replies.expect(Want::BindComplete, true, false);
    replies.expect(Want::CommandDone, true, false);
    replies.expect(Want::CloseComplete, true, false);
}

/// The id under which the replies tracker reports a failed or skipped Parse of context statement
/// `arity` (client statements count up from 0; these count down from the top).
fn context_parse_id(arity: usize) -> u64 {
    u64::MAX - arity as u64
}

/// The context statement a failed Parse id stands for, if it is one.
pub fn context_arity(id: u64) -> Option<usize> {
    let arity = u64::MAX - id;
    (arity <= 128).then_some(arity as usize)
}

/// Pre-encoded injection bytes for one client session.
#[derive(Debug, Clone)]
pub struct Injection {
    /// Number of settings without `application_name`: the backend knows whether it has this one
    /// prepared (and the one with a setting more).
    arity: usize,
    /// The `application_name` the client's transactions run with.
    app: String,
    /// Close + Parse of the context statement (sent when the backend does not have it prepared),
    /// without and with `application_name`.
    prepare: [Bytes; 2],
    /// Bind + Execute + Close(portal) with this session's values (without signing), without and
    /// with `application_name`.
    run: [Bytes; 2],
    /// With `tenant.signing_key`: the signed context, per backend.
    signed: Option<Signed>,
}

/// The parts of a signed context statement; the signature names the backend, so the bytes are
/// made once per backend the session uses and cached.
#[derive(Debug, Clone)]
struct Signed {
    signer: Arc<Signer>,
    /// Setting names and values, interleaved, in statement order (without the signed pair).
    params: Vec<String>,
    /// The tenant settings the payload carries.
    settings: Vec<(String, String)>,
    iat: i64,
    /// Per backend, and whether the statement sets `application_name`.
    cache: Vec<(BackendId, bool, Bytes)>,
}

/// Signed statements kept per session (a session in transaction pooling meets many backends).
const MAX_SIGNED: usize = 64;

/// How a session signs: the signer, the tenant settings, and when the session began.
pub type Signing = (Arc<Signer>, Vec<(String, String)>, i64);

impl Injection {
    /// `names`/`values` are the settings in the order they are applied (without
    /// `application_name`), `app` the `application_name` the client's transactions run with; with
    /// `signing`, the statement also sets `pgtenant.context` and `pgtenant.signature`.
    pub fn new(names: &[String], values: &[String], app: String, signing: Option<Signing>) -> Injection {
        let arity = names.len() + if signing.is_some() { 2 } else { 0 };
        let params: Vec<String> =
            names.iter().zip(values).flat_map(|(n, v)| [n.clone(), v.clone()]).collect();
        let named = with_name(&params, &app);
        let prepare = [arity, arity + 1].map(|n| {
            let stmt = statement_name(n);
            let mut prepare = BytesMut::new();
            build::close_statement(&mut prepare, &stmt);
            build::parse(&mut prepare, &stmt, &context_sql(n), vec![25; n * 2]);
            prepare.freeze()
        });
        let run = [run_bytes(&statement_name(arity), &params), run_bytes(&statement_name(arity + 1), &named)];
        let signed = signing.map(|(signer, settings, iat)| Signed { signer, params, settings, iat, cache: Vec::new() });
        Injection { arity, app, prepare, run, signed }
    }

    /// The id under which the replies tracker knows the Parse of the context statement this
    /// injection would use on `backend` (see [`context_arity`]).
    pub fn parse_id(&self, backend: &PooledConn) -> u64 {
        context_parse_id(self.arity + usize::from(backend.application_name() != self.app))
    }

    /// Writes the injection for `backend` into `out` and records the replies it owes.
    pub fn write(&mut self, out: &mut BytesMut, backend: &mut PooledConn, replies: &mut Replies) {
        let named = backend.application_name() != self.app;
        let parse = backend.needs_context_parse(self.arity + usize::from(named));
        self.write_for(out, parse, named, &backend.id, replies);
    }

    /// [`Injection::write`] for the connection `id`, preparing the statement first when `parse`;
    /// `named`: the statement sets `application_name` too.
    pub fn write_for(&mut self, out: &mut BytesMut, parse: bool, named: bool, id: &BackendId, replies: &mut Replies) {
        let arity = self.arity + usize::from(named);
        if parse {
            out.extend_from_slice(&self.prepare[usize::from(named)]);
            replies.expect(Want::CloseComplete, true, false);
            // if the server skips it (the batch had failed already), the backend must not count it
            replies.expect_parse(true, context_parse_id(arity));
        }
        match &mut self.signed {
            None => out.extend_from_slice(&self.run[usize::from(named)]),
            Some(s) => out.extend_from_slice(s.run_for(id, named.then_some(self.app.as_str()), arity)),
        }
        replies.expect(Want::BindComplete, true, false);
        replies.expect(Want::CommandDone, true, false);
        replies.expect(Want::CloseComplete, true, false);
    }
}

impl Signed {
    /// The statement for `backend`, setting `application_name` to `app` when given.
    fn run_for(&mut self, backend: &BackendId, app: Option<&str>, arity: usize) -> &Bytes {
        let named = app.is_some();
        let i = match self.cache.iter().position(|(id, n, _)| id == backend && *n == named) {
            Some(i) => i,
            None => {
                let (payload, signature) = self.signer.signed(&self.settings, self.iat, backend);
                let mut params = match app {
                    Some(app) => with_name(&self.params, app),
                    None => self.params.clone(),
                };
                params.extend([CONTEXT_SETTING.to_string(), payload, SIGNATURE_SETTING.to_string(), signature]);
                if self.cache.len() >= MAX_SIGNED {
                    self.cache.remove(0);
                }
                self.cache.push((backend.clone(), named, run_bytes(&statement_name(arity), &params)));
                self.cache.len() - 1
            }
        };
        &self.cache[i].2
    }
}

/// `params` (names and values, interleaved) and then `application_name` = `app`.
fn with_name(params: &[String], app: &str) -> Vec<String> {
    let mut named = params.to_vec();
    named.extend([crate::protocol::APPLICATION_NAME.to_string(), app.to_string()]);
    named
}

/// Bind + Execute + Close(portal) of the context statement with `params`.
fn run_bytes(stmt: &str, params: &[String]) -> Bytes {
    let mut run = BytesMut::new();
    build::bind_text(&mut run, CONTEXT_NAME, stmt, params);
    build::execute(&mut run, CONTEXT_NAME);
    build::close_portal(&mut run, CONTEXT_NAME);
    run.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_shape() {
        assert_eq!(
            context_sql(2),
            "SELECT WHERE (pg_catalog.set_config($1, $2, true) OPERATOR(pg_catalog.||) pg_catalog.set_config($3, $4, true)) IS NULL"
        );
        assert_eq!(context_sql(1), "SELECT WHERE (pg_catalog.set_config($1, $2, true)) IS NULL");
        assert_eq!(context_sql(0), "SELECT WHERE false");
    }

    fn has(haystack: &[u8], needle: &str) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    #[test]
    fn application_name_only_in_the_statement_with_one_setting_more() {
        let names = ["app.tenant_id".to_string(), "TimeZone".to_string()];
        let values = ["7".to_string(), "UTC".to_string()];
        let mut inj = Injection::new(&names, &values, "shop".into(), None);
        let id = BackendId { pid: 1, started: "1".into() };
        let mut replies = Replies::default();
        for (named, stmt) in [(false, "pgtenant_ctx_2\0"), (true, "pgtenant_ctx_3\0")] {
            let mut out = BytesMut::new();
            inj.write_for(&mut out, true, named, &id, &mut replies);
            assert!(has(&out, stmt) && has(&out, "TimeZone") && has(&out, "app.tenant_id"), "{out:?}");
            assert_eq!(has(&out, "application_name") && has(&out, "shop"), named, "{out:?}");
        }
        // signed: the name goes before the signed pair, in the statement of one setting more
        let signer = Arc::new(Signer::new("k1", b"0123456789abcdef0123456789abcdef"));
        let settings = vec![("app.tenant_id".to_string(), "7".to_string())];
        let mut inj = Injection::new(&names, &values, "shop".into(), Some((signer, settings, 0)));
        for (named, stmt) in [(true, "pgtenant_ctx_5\0"), (false, "pgtenant_ctx_4\0"), (true, "pgtenant_ctx_5\0")] {
            let mut out = BytesMut::new();
            inj.write_for(&mut out, false, named, &id, &mut replies);
            assert!(has(&out, stmt), "{out:?}");
            let (app, ctx) = (out.windows(16).position(|w| w == b"application_name"), out.windows(16).position(|w| w == b"pgtenant.context"));
            assert_eq!(app.is_some(), named);
            assert!(ctx.is_some() && app.is_none_or(|a| a < ctx.unwrap()), "{out:?}");
        }
    }
}
