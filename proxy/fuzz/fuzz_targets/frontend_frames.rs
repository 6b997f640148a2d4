//! Arbitrary bytes as the stream of frontend messages a client sends after authentication.
//!
//! Mirrors what `session::Session::on_client_frame` / `on_work` / `forward_rewritten` do with each
//! message, minus the sockets and the pool: `frame::try_split` with the server's default
//! `max_message_bytes`, the `peek` readers for Query/Parse/Bind/Execute/Describe/Close, the SQL
//! checks on query text, the client statement/portal book-keeping (`session::statements`), the
//! per-backend statement cache and the rewritten Parse/Bind/Describe/Close frames
//! (`session::prepared`), session SETs carried into the injected context statement
//! (`session::settings`, `session::inject`).
//!
//! Properties checked besides "no panic":
//! - a split frame is exactly `1 + declared length` bytes and is removed from the buffer;
//! - every frame pgtenant builds for the backend re-splits as one whole frame and its names read
//!   back as written (the client's portal, the server statement name, the original query);
//! - the injected context statement is a sequence of whole frames.

#![no_main]

use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use pgtenant::client::params::ClientParams;
use pgtenant::config::{ServerConfig, TenantConfig};
use pgtenant::guard::{Guard, Position};
use pgtenant::protocol::{frame, peek};
use pgtenant::pool::prepared::{self, BackendStatements};
use pgtenant::session::replies::{Replies, Want};
use pgtenant::session::settings::ClientSettings;
use pgtenant::session::statements::Statements;
use pgtenant::sql::{self, TxEffect};

/// Per-backend prepared statement cache size used here: small, so eviction (Close before Parse)
/// happens within one input.
const BACKEND_CACHE: usize = 4;
/// Frames pgtenant writes itself are re-split with this limit.
const REBUILT_MAX: usize = 1 << 30;

fn guard() -> &'static Guard {
    static G: OnceLock<Guard> = OnceLock::new();
    G.get_or_init(|| {
        let mut cfg = TenantConfig::default();
        cfg.settings.insert("app.tenant_id".into(), "tenant_id".into());
        cfg.settings.insert("app.user_id".into(), "sub".into());
        Guard::from_config(&cfg)
    })
}

/// Splits exactly one whole frame off `out` (a frame pgtenant built) and returns it.
fn one_frame(out: &mut BytesMut) -> frame::Frame {
    let f = frame::try_split(out, REBUILT_MAX)
        .expect("pgtenant built a frame with a bad length")
        .expect("pgtenant built an incomplete frame");
    assert!(f.bytes.len() >= 5);
    f
}

struct State {
    statements: Statements,
    backend: BackendStatements,
    settings: ClientSettings,
    in_block: bool,
    out: BytesMut,
}

impl State {
    /// Prepares a client statement on the simulated backend, checking the Close it may need first.
    fn prepare_on_backend(&mut self, key: &Bytes) -> prepared::Prepared {
        let p = self.backend.prepare(key, 0);
        assert!(p.name.starts_with("pgtenant_s"));
        for evict in &p.evict {
            prepared::target_frame(&mut self.out, b'C', evict);
            let f = one_frame(&mut self.out);
            assert_eq!(f.tag, b'C');
            assert_eq!(peek::target_msg(f.body()), Some((b'S', evict.as_bytes())));
        }
        if p.needs_parse {
            prepared::parse_frame(&mut self.out, &p.name, key);
            let f = one_frame(&mut self.out);
            assert_eq!(f.tag, b'P');
            let (name, query) = peek::parse_msg(f.body()).expect("rebuilt Parse reads back");
            assert_eq!(name, p.name.as_bytes());
            assert_eq!(&f.body()[name.len() + 1..], &key[..]);
            assert_eq!(Some(query), peek::cstr(key).map(|(q, _)| q));
        }
        assert!(self.out.is_empty());
        p
    }

    fn sql_checks(&mut self, q: &[u8], simple: bool) {
        let pos = Position { in_block: self.in_block };
        let _ = guard().check(q, pos);
        let _ = sql::pooling::check(q, if simple { self.in_block } else { true });
        if let Some(name) = sql::deallocate_name(q) {
            let _ = self.statements.get(name.as_bytes());
        }
        if simple {
            if sql::is_discard_all(q) && !self.in_block {
                self.statements.clear_statements();
                self.statements.transaction_ended();
                self.settings.apply(&[sql::set::Change::ResetAll]);
                self.backend.clear();
            }
            if sql::deallocates_all(q) {
                self.statements.clear_statements();
            }
            if sql::has_session_set(q) && !self.in_block {
                let changes = sql::set::session_changes(q);
                self.settings.apply(&changes);
            }
        }
    }

    /// One client message; false when the session would end (Terminate, malformed or unknown).
    fn on_frame(&mut self, f: &frame::Frame) -> bool {
        let body = f.body();
        // backend-side reader, cheap to run on any body
        let _ = peek::error_code(body);
        let _ = Want::for_frontend(f.tag);
        match f.tag {
            b'X' => return false,
            b'S' | b'H' | b'd' | b'c' | b'f' | b'F' => {}
            b'Q' => {
                let Some(q) = peek::query_msg(body) else { return false };
                let s = sql::summarize(q);
                if !s.ends_tx_midway {
                    self.sql_checks(q, true);
                }
                match s.first {
                    TxEffect::Begin => self.in_block = true,
                    TxEffect::End => self.in_block = false,
                    _ => {}
                }
            }
            b'P' => {
                let Some((name, q)) = peek::parse_msg(body) else { return false };
                self.sql_checks(q, false);
                // as in Session::on_work: the statement's key is the Parse body after the name
                let key = f.bytes.slice(5 + name.len() + 1..);
                assert_eq!(peek::cstr(&key).map(|(k, _)| k), Some(q));
                let Ok(def) = self.statements.parse(name, q, key, 16 << 20) else { return true };
                if !name.is_empty() {
                    let def2 = self.statements.get(name).expect("a parsed statement is found by name").clone();
                    assert_eq!(def2.key, def.key);
                    self.prepare_on_backend(&def.key);
                }
            }
            b'B' => {
                let Some((portal, stmt)) = peek::bind_msg(body) else { return false };
                let _ = self.statements.bind(portal, stmt);
                if !stmt.is_empty() {
                    if let Some(def) = self.statements.get(stmt).cloned() {
                        let p = self.prepare_on_backend(&def.key);
                        prepared::rewrite_bind(&mut self.out, body, portal.len(), stmt.len(), &p.name);
                        let g = one_frame(&mut self.out);
                        assert_eq!(g.tag, b'B');
                        assert_eq!(peek::bind_msg(g.body()), Some((portal, p.name.as_bytes())));
                        let rest = &body[portal.len() + 1 + stmt.len() + 1..];
                        assert!(g.body().ends_with(rest));
                        assert_eq!(g.body().len(), portal.len() + 1 + p.name.len() + 1 + rest.len());
                        assert!(self.out.is_empty());
                    }
                }
            }
            b'E' => {
                let Some(portal) = peek::execute_msg(body) else { return false };
                if let Some(def) = self.statements.portal(portal).cloned() {
                    if let Some(sets) = &def.sets {
                        if !self.in_block {
                            self.settings.apply(sets);
                        }
                    }
                    match def.effect {
                        TxEffect::Begin => self.in_block = true,
                        TxEffect::End => {
                            self.in_block = false;
                            self.statements.transaction_ended();
                        }
                        _ => {}
                    }
                }
            }
            b'C' | b'D' => {
                let Some((kind, name)) = peek::target_msg(body) else { return false };
                if f.tag == b'C' {
                    self.statements.close(kind, name);
                } else if kind == b'S' && !name.is_empty() {
                    if let Some(def) = self.statements.get(name).cloned() {
                        let p = self.prepare_on_backend(&def.key);
                        prepared::target_frame(&mut self.out, b'D', &p.name);
                        let g = one_frame(&mut self.out);
                        assert_eq!(g.tag, b'D');
                        assert_eq!(peek::target_msg(g.body()), Some((b'S', p.name.as_bytes())));
                        assert!(self.out.is_empty());
                    }
                }
            }
            // 'p' after authentication and unknown tags: FATAL protocol violation
            _ => return false,
        }
        true
    }
}

fuzz_target!(|data: &[u8]| {
    let max = ServerConfig::default().max_message_bytes;
    let mut buf = BytesMut::from(data);
    let mut st = State {
        statements: Statements::default(),
        backend: BackendStatements::new(BACKEND_CACHE),
        settings: ClientSettings::new(
            vec!["app.tenant_id".into(), "app.user_id".into()],
            vec!["42".into(), "user-1".into()],
            ClientParams::default(),
        ),
        in_block: false,
        out: BytesMut::new(),
    };
    loop {
        let before = buf.len();
        let declared = frame::peek_len(&buf, max);
        match frame::try_split(&mut buf, max) {
            Ok(Some(f)) => {
                assert_eq!(declared, Ok(Some(f.bytes.len())));
                assert_eq!(f.tag, f.bytes[0]);
                assert_eq!(buf.len() + f.bytes.len(), before);
                if !st.on_frame(&f) {
                    break;
                }
            }
            Ok(None) => {
                assert_eq!(buf.len(), before);
                if let Ok(Some(total)) = declared {
                    assert!(total > before);
                }
                break;
            }
            Err(e) => {
                assert_eq!(declared, Err(e.clone()));
                let _ = e.to_string();
                break;
            }
        }
    }
    // the context statement with whatever session SETs the input made
    let mut injection = st.settings.injection();
    let mut out = BytesMut::new();
    let mut replies = Replies::default();
    let backend = pgtenant::signing::BackendId { pid: 1, started: "0".into() };
    // with `application_name` (a backend named after another client) or without: the same frames
    injection.write_for(&mut out, true, data.first().is_some_and(|b| b & 1 == 1), &backend, &mut replies);
    let mut tags = Vec::new();
    while !out.is_empty() {
        tags.push(one_frame(&mut out).tag);
    }
    assert_eq!(tags, b"CPBEC");
    assert!(!replies.is_settled());
});
