//! Arbitrary bytes (UTF-8 or not: every API here takes bytes) as client SQL, through everything
//! pgtenant reads out of query text: the lexer, `sql::split` / `summarize` / `tx_effect`, the
//! DEALLOCATE / DISCARD / session-SET detectors, `sql::set::session_changes`, the transaction
//! pooling refusals (`sql::pooling::check`) and the statement guard (`guard::Guard::check`) with the
//! usual tenant settings, with and without `tenant.allow_do`, inside and outside a transaction block.
//!
//! Properties checked besides "no panic":
//! - audit fingerprints (`sql::fingerprint`) are bounded and keep no quote of a string literal;
//! - lexer: tokens are in order, non-overlapping, inside the input, non-empty (an unterminated
//!   comment at the very end may be empty), and only the last token can be `Unterminated`;
//! - `summarize` agrees with `split` (statement count, first statement's effect, "a
//!   transaction-ending statement is followed by another", unterminated text): the session decides
//!   transaction boundaries with the one and the guard checks statements with the other;
//! - `session_changes` finds nothing unless `has_session_set` is true (the session only asks for
//!   the changes when it is);
//! - guard errors are 42501 and encode as one whole ErrorResponse;
//! - the guard never accepts the input followed by a statement that changes a protected setting
//!   (a `set_config` spelling, or a SET/RESET when the input cannot open a `BEGIN ATOMIC` body),
//!   provided the input itself has no unterminated literal or comment (which swallows what follows).

#![no_main]

use std::sync::OnceLock;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgtenant::config::TenantConfig;
use pgtenant::error::PgError;
use pgtenant::guard::{Guard, Position};
use pgtenant::protocol::{frame, peek};
use pgtenant::sql::lexer::{Kind, Lexer};
use pgtenant::sql::{self, TxEffect};

fn guards() -> &'static (Guard, Guard) {
    static G: OnceLock<(Guard, Guard)> = OnceLock::new();
    G.get_or_init(|| {
        let mut cfg = TenantConfig::default();
        cfg.settings.insert("app.tenant_id".into(), "tenant_id".into());
        cfg.settings.insert("app.user_id".into(), "sub".into());
        cfg.protected_settings = vec!["app.extra".into()];
        let strict = Guard::from_config(&cfg);
        cfg.allow_do = true;
        (strict, Guard::from_config(&cfg))
    })
}

/// Statements that must always be refused (each is a complete statement with no unterminated
/// token). `set_config` spellings: refused wherever they stand.
const SET_CONFIG: &[&str] = &[
    "select set_config('app.tenant_id', '1', true)",
    "SELECT pg_catalog.set_config('app.tenant_id', '1', false)",
    "select SET_CONFIG(E'app\\x2etenant_id', '1', true)",
    "select e'x', set_config(e'app\\056tenant_id', '1', true)",
    "select \"set_config\"(U&'app\\002etenant_id', '1', true)",
    "select U&\"\\0073et_config\"($$app.tenant_id$$, '1', true)",
    "select set_config($t$APP.Tenant_Id$t$, '1', true)",
    "select set_config(N'app.user_id', '1', true)",
    "select set_config($1, '1', true)",
    "select set_config('app.' || 'tenant_id', '1', true)",
    "select set_config(('app.tenant_id'), '1', true)",
    "select set_config('app.tenant_id'::text, '1', true)",
    "select set_config(setting_name => 'app.tenant_id', new_value => '1', is_local => true)",
    "select set_config('request.jwt.claims', '{}', true)",
    "select set_config('ROLE', 'postgres', true)",
    "select set_config('app.extra', 'x', true)",
    "select /* c */ set_config /* c */ ( /* c */ 'app.tenant_id' , '1', true)",
];

/// SET/RESET spellings: refused as statements of their own (not inside another statement).
const SET_STMT: &[&str] = &[
    "SET app.tenant_id = 1",
    "set local \"app\".\"tenant_id\" to '1'",
    "SET SESSION APP.TENANT_ID = 1",
    "/* c */ SET /* c */ app . tenant_id = 1",
    "RESET app.tenant_id",
    "reset role",
    "SET ROLE postgres",
    "SET SESSION AUTHORIZATION postgres",
    "set request.jwt.claims = '{}'",
    "set app.user_id to default",
    "update pg_settings set setting = '1' where name = 'app.tenant_id'",
    "DO $$ BEGIN PERFORM 1; END $$",
    "ALTER ROLE app_user SET app.tenant_id = '1'",
];

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

fn check_refusal(e: &PgError) {
    assert_eq!(e.code, "42501", "guard error with another SQLSTATE: {e}");
    let mut out = BytesMut::new();
    e.encode(&mut out);
    let f = frame::try_split(&mut out, usize::MAX).expect("error frame length").expect("whole error frame");
    assert_eq!(f.tag, b'E');
    assert!(out.is_empty());
    assert_eq!(peek::error_code(f.body()), Some(e.code.as_bytes()));
}

fuzz_target!(|data: &[u8]| {
    // lexer invariants
    let base = data.as_ptr() as usize;
    let mut end = 0usize;
    let mut unterminated = false;
    let mut atomic_word = false;
    for t in Lexer::new(data) {
        assert!(!unterminated, "a token after an Unterminated one");
        let start = t.text.as_ptr() as usize - base;
        assert!(start >= end && start + t.text.len() <= data.len(), "token outside the input or overlapping");
        assert!(!t.text.is_empty() || (t.kind == Kind::Unterminated && start == data.len()), "empty token");
        end = start + t.text.len();
        unterminated |= t.kind == Kind::Unterminated;
        atomic_word |= t.text.eq_ignore_ascii_case(b"atomic");
    }

    // audit fingerprints are bounded and keep no string literal: a quote can only come from a
    // quoted identifier
    let fp = sql::fingerprint::fingerprint(data);
    assert!(fp.text.chars().count() <= 1001 && fp.hash.len() == 16, "fingerprint bounds");
    let ident_quotes: usize =
        Lexer::new(data).filter(|t| t.kind == Kind::QuotedIdent).map(|t| t.text.iter().filter(|&&b| b == b'\'').count()).sum();
    assert!(fp.text.matches('\'').count() <= ident_quotes, "a literal survived in a fingerprint: {}", fp.text);

    // summarize (one pass, used for transaction boundaries) agrees with split (used by the guard)
    let statements = sql::split(data);
    let s = sql::summarize(data);
    assert_eq!(s.statements as usize, statements.len(), "statement count");
    let effect = |toks: &[sql::lexer::Token<'_>]| sql::tx_effect(toks.first().copied(), toks.get(1).copied());
    assert_eq!(s.first, statements.first().map_or(TxEffect::None, |t| effect(t)), "first statement's effect");
    let midway = statements.len() > 1 && statements[..statements.len() - 1].iter().any(|t| effect(t) == TxEffect::End);
    assert_eq!(s.ends_tx_midway, midway, "ends_tx_midway");
    assert_eq!(s.unterminated, unterminated, "unterminated");

    let _ = sql::deallocate_name(data);
    let _ = sql::deallocates_all(data);
    let _ = sql::is_discard_all(data);
    let changes = sql::set::session_changes(data);
    if !changes.is_empty() {
        assert!(sql::has_session_set(data), "session_changes without has_session_set: {changes:?}");
    }
    for in_block in [false, true] {
        let _ = sql::pooling::check(data, in_block);
    }

    let (strict, allow_do) = guards();
    for g in [strict, allow_do] {
        for in_block in [false, true] {
            if let Err(e) = g.check(data, Position { in_block }) {
                check_refusal(&e);
            }
        }
    }

    // the input followed by a statement that must be refused
    if !unterminated {
        let h = fnv(data) as usize;
        let n = if atomic_word { SET_CONFIG.len() } else { SET_CONFIG.len() + SET_STMT.len() };
        let i = h % n;
        let tail = if i < SET_CONFIG.len() { SET_CONFIG[i] } else { SET_STMT[i - SET_CONFIG.len()] };
        let mut sql = data.to_vec();
        sql.extend_from_slice(b"\n;\n");
        sql.extend_from_slice(tail.as_bytes());
        let pos = Position { in_block: h & 0x100 != 0 };
        match strict.check(&sql, pos) {
            Ok(()) => panic!("guard accepted {:?} after the input", tail),
            Err(e) => check_refusal(&e),
        }
        if i < SET_CONFIG.len() || !tail.starts_with("DO") {
            assert!(allow_do.check(&sql, pos).is_err(), "guard (allow_do) accepted {tail:?} after the input");
        }
    }
});
