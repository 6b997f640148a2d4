//! Per-client bookkeeping of prepared statements and portals, by the client's names.
//!
//! Each named statement keeps its content (the Parse body after the name: query text and parameter
//! types), so it can be prepared again on whichever backend runs the client's next transaction (see
//! `prepared`), and its transaction effect (see `crate::sql`), so the session knows when an Execute
//! ends the transaction and whether a pipelined batch may go out before the previous one answered.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::sql::set_config::SetConfigCall;
use crate::sql::set::Change;
use crate::sql::analyze::Analysis;
use crate::sql::stateless::Leaves;
use crate::sql::{self, TxEffect};

/// Most named statements one client may hold at once.
pub const MAX_STATEMENTS: usize = 10_000;
/// Most named portals one client may hold at once (they live until their transaction ends).
pub const MAX_PORTALS: usize = 10_000;

/// How many readings of unnamed statements a session keeps for reuse, and the longest content
/// kept. Most clients that use the unnamed statement send the same few texts over and over
/// (node-postgres, psycopg, pgjdbc before its prepare threshold, `pgbench -M extended`), and what
/// `Classifier::parse` decides about one is a function of its content and of whether it runs inside
/// a transaction block alone: the guard and the pooling rules are the session's own and do not
/// change. Eight, so that a client repeating transactions of up to eight statements (`BEGIN`, the
/// work, `COMMIT`) reads each statement once. At most 8 KiB per session.
const RECENT_UNNAMED: usize = 8;
const RECENT_MAX_KEY: usize = 1024;

/// An unnamed statement read before (see [`RECENT_UNNAMED`]).
#[derive(Debug)]
struct Recent {
    in_block: bool,
    def: Arc<StatementDef>,
    access: Option<crate::routing::intent::Mode>,
}

/// A Bind of a new named portal while the client holds `MAX_PORTALS` already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyPortals;

/// Why a Parse could not be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `MAX_STATEMENTS` named statements already.
    Count,
    /// The statements would take more than the session's byte budget.
    Bytes,
}

#[derive(Debug, Clone)]
pub struct StatementDef {
    /// The Parse body after the name.
    pub key: Bytes,
    pub effect: TxEffect,
    /// What the statement may leave on the session (see `crate::sql::stateless`).
    pub leaves: Leaves,
    /// It ends the transaction `AND CHAIN`: the chained transaction needs the context again.
    pub chain: bool,
    /// Session-level SETs the statement makes (kept for the client when it ran cleanly). For a
    /// portal, with the session-level `set_config` calls its Bind decided.
    pub sets: Option<Arc<Vec<Change>>>,
    /// Transaction setup only (`BEGIN ISOLATION LEVEL …`, `SET TRANSACTION …`): the context waits
    /// for the next statement (see `crate::sql::txmode`).
    pub setup: bool,
    /// Exactly `DISCARD ALL`: pgtenant runs it itself (see `Session::discard_all`).
    pub discard_all: bool,
    /// `set_config` calls the guard decides at each Bind (see `crate::sql::set_config`).
    pub bind_checks: Option<Arc<[SetConfigCall]>>,
    /// `DEALLOCATE`: which of the client's statements it drops when it is executed.
    pub deallocates: Option<Deallocates>,
    /// What it does to savepoints and its transaction's outcome (see `super::pending`).
    pub tx_op: Option<crate::sql::savepoint::TxOp>,
    /// How many parameters the server gives the statement: the types the Parse declares, or more
    /// if the text refers to a higher `$n` (a Parse the server accepts has a type for each).
    /// Counted for statements the server analyzes with their parameters only (`params_of`).
    pub params: Option<usize>,
    /// When the client's Parse arrived (`pool::prepared::tick`): only a server statement prepared
    /// after that may serve it (a schema change in between would fail an older one). 0 for an
    /// unnamed statement that goes to the server as it is, which no server statement serves.
    pub parsed_at: u64,
    /// What the server answers a `Describe` of this named statement with, once pgtenant has seen
    /// it (`Session::learn_description`): inside a failed block pgtenant cannot prepare the
    /// statement on another backend (its Parse fails with 25P02), where the server still
    /// describes a statement that returns no rows (`Session::describe_locally`).
    pub described: std::sync::OnceLock<Described>,
}

/// The server's answer to a `Describe` of a statement (see [`StatementDef::described`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Described {
    /// It returns no rows: this ParameterDescription message, then NoData.
    Rowless(Bytes),
    /// A Describe goes to the server (after a Parse where needed): the statement returns rows (a
    /// RowDescription, which the server does not send inside a failed block either: 25P02, as
    /// pgtenant's Parse there), or its description is larger than kept, or the Describe failed.
    Forwarded,
}

/// [`StatementDef::params`] of a Parse: `key` is its body after the name. The server counts the
/// declared types, and more if the text refers to a higher `$n` in a statement it analyzes with
/// its parameters when it parses it; one it does not (a utility statement such as `COPY (…)` or
/// `PREPARE … AS`) keeps its `$n` for later. None where that is not known: a `$n` in a statement
/// not known to be analyzed.
fn params_of(a: &Analysis<'_>, key: &[u8]) -> Option<usize> {
    const ANALYZED: &[&str] = &["select", "insert", "update", "delete", "with", "values", "table", "merge", "explain", "call", "declare"];
    let declared = key.iter().position(|&b| b == 0).and_then(|end| key.get(end + 1..end + 3)).map_or(0, |n| usize::from(u16::from_be_bytes([n[0], n[1]])));
    let first = match a.statements.as_slice() {
        [] => return Some(declared), // the empty query
        [first] => first,
        _ => return None, // the server refuses it
    };
    let highest = first.iter().filter(|t| t.kind == crate::sql::lexer::Kind::Param);
    let Some(highest) = highest.filter_map(|t| std::str::from_utf8(&t.text[1..]).ok()?.parse::<usize>().ok()).max() else {
        return Some(declared); // no `$n`: analyzed or not, the declared types
    };
    let head = first.first()?;
    (head.text == b"(" || ANALYZED.iter().any(|w| head.is_word(w))).then_some(declared.max(highest))
}

/// The client's statements a `DEALLOCATE` drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deallocates {
    One(Arc<str>),
    All,
}

#[derive(Debug, Default)]
pub struct Statements {
    unnamed_stmt: Option<Arc<StatementDef>>,
    /// The unnamed statement the last unnamed Parse replaced (`take_unnamed_before`).
    unnamed_before: Option<Arc<StatementDef>>,
    named_stmts: HashMap<Bytes, Arc<StatementDef>>,
    unnamed_portal: Option<Arc<StatementDef>>,
    named_portals: HashMap<Bytes, Arc<StatementDef>>,
    /// Bytes held by named statements (names and contents).
    bytes: usize,
    /// Unnamed statements read lately, oldest replaced first.
    recent: Vec<Recent>,
    recent_next: usize,
}

impl Statements {
    /// Records a Parse, unless the client already holds `MAX_STATEMENTS` other statements or the
    /// statements would exceed `budget` bytes (`server.max_session_state_bytes`).
    pub fn parse(&mut self, name: &[u8], query: &[u8], key: Bytes, budget: usize) -> Result<Arc<StatementDef>, Full> {
        self.parse_analyzed(name, &sql::analyze::analyze(query), key, budget, Vec::new())
    }

    /// [`Statements::parse`] of a statement already analyzed, with the `set_config` calls to decide
    /// at each Bind.
    pub fn parse_analyzed(
        &mut self,
        name: &[u8],
        a: &Analysis<'_>,
        key: Bytes,
        budget: usize,
        bind_checks: Vec<SetConfigCall>,
    ) -> Result<Arc<StatementDef>, Full> {
        let replaced = if name.is_empty() { 0 } else { self.named_stmts.get(name).map_or(0, |d| name.len() + d.key.len()) };
        if !name.is_empty() {
            if replaced == 0 && self.named_stmts.len() >= MAX_STATEMENTS {
                return Err(Full::Count);
            }
            if self.bytes - replaced + name.len() + key.len() > budget {
                return Err(Full::Bytes);
            }
        }
        let sets = (!a.changes.is_empty()).then(|| Arc::new(a.changes.clone()));
        // a named statement outlives the read buffer it arrived in: copy it, so it does not pin a
        // whole buffer chunk for the life of the session
        let key = if name.is_empty() { key } else { Bytes::copy_from_slice(&key) };
        let params = params_of(a, &key);
        // only a statement sent under a server name is shared (`BackendStatements::prepare`): the
        // unnamed one goes as it is, unless it has set_config parameters
        let shared = !name.is_empty() || !bind_checks.is_empty();
        let def = Arc::new(StatementDef {
            effect: a.first,
            leaves: a.leaves,
            chain: a.chain,
            setup: a.opening == sql::txmode::Opening::SetupOnly,
            discard_all: a.discard_all,
            key,
            sets,
            bind_checks: (!bind_checks.is_empty()).then(|| bind_checks.into()),
            deallocates: if a.deallocates_all {
                Some(Deallocates::All)
            } else {
                a.deallocate.as_deref().map(|n| Deallocates::One(n.into()))
            },
            tx_op: a.tx_op.clone(),
            params,
            parsed_at: if shared { crate::pool::prepared::tick() } else { 0 },
            described: Default::default(),
        });
        if name.is_empty() {
            self.unnamed_before = self.unnamed_stmt.replace(def.clone());
        } else {
            self.bytes = self.bytes - replaced + name.len() + def.key.len();
            self.named_stmts.insert(Bytes::copy_from_slice(name), def.clone());
        }
        Ok(def)
    }

    /// A Parse of the unnamed statement with content `key`, read before at the same position
    /// (`in_block`) and let through: recorded again from that reading, which it returns with the
    /// access mode its first statement asks for. None when it has to be read.
    pub fn reparse_unnamed(&mut self, key: &[u8], in_block: bool) -> Option<(Arc<StatementDef>, Option<crate::routing::intent::Mode>)> {
        let r = self.recent(key, in_block)?;
        let def = if r.def.bind_checks.is_some() {
            // sent under a server name (`unnamed_has_bind_checks`): a Parse of this time
            Arc::new(StatementDef { parsed_at: crate::pool::prepared::tick(), ..(*r.def).clone() })
        } else {
            r.def.clone() // sent as it is: the server parses it
        };
        let hit = (def, r.access);
        self.unnamed_before = self.unnamed_stmt.replace(hit.0.clone());
        Some(hit)
    }

    /// Keeps the reading of unnamed statement `def` for [`Statements::reparse_unnamed`]; the
    /// caller keeps only readings that depend on nothing but the content and the position (no
    /// `DEALLOCATE`, `DISCARD` or `PREPARE`, whose outcome depends on the client's statements). The
    /// content is copied: the original points into the client's read buffer.
    pub fn remember_unnamed(&mut self, def: &StatementDef, in_block: bool, access: Option<crate::routing::intent::Mode>) {
        if def.key.len() > RECENT_MAX_KEY {
            return;
        }
        let def = Arc::new(StatementDef { key: Bytes::copy_from_slice(&def.key), ..def.clone() });
        let r = Recent { in_block, def, access };
        if self.recent.len() < RECENT_UNNAMED {
            self.recent.push(r);
        } else {
            self.recent[self.recent_next] = r;
            self.recent_next = (self.recent_next + 1) % RECENT_UNNAMED;
        }
    }

    /// The kept reading of `key` at `in_block`, if any.
    fn recent(&self, key: &[u8], in_block: bool) -> Option<&Recent> {
        self.recent.iter().find(|r| r.in_block == in_block && r.def.key[..] == *key)
    }

    /// Whether a reading of `key` at `in_block` is kept.
    #[cfg(test)]
    pub fn remembers(&self, key: &[u8], in_block: bool) -> bool {
        self.recent(key, in_block).is_some()
    }

    /// Bytes the client's named statements hold.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The server rejected (or skipped) the client's Parse of statement `name` with content `key`:
    /// like the server, forget the statement (unless a later Parse replaced it already).
    pub fn parse_failed(&mut self, name: &[u8], key: &[u8]) {
        if name.is_empty() {
            if self.unnamed_stmt.as_ref().is_some_and(|d| d.key == key) {
                self.unnamed_stmt = None;
            }
        } else if self.named_stmts.get(name).is_some_and(|d| d.key == key) {
            self.close(b'S', name);
        }
    }

    /// A `DEALLOCATE` ran: the client's statements it names are gone.
    pub fn deallocated(&mut self, d: &Deallocates) {
        match d {
            Deallocates::One(name) => self.close(b'S', name.as_bytes()),
            Deallocates::All => self.clear_statements(),
        }
    }

    /// The unnamed statement the last unnamed Parse replaced: the client's again if the server
    /// skips that Parse (`restore_unnamed`).
    pub fn take_unnamed_before(&mut self) -> Option<Arc<StatementDef>> {
        self.unnamed_before.take()
    }

    /// The server skipped an unnamed Parse: the statement it replaced is the client's again.
    pub fn restore_unnamed(&mut self, before: Option<Arc<StatementDef>>) {
        self.unnamed_stmt = before;
    }

    pub fn get(&self, name: &[u8]) -> Option<&Arc<StatementDef>> {
        self.named_stmts.get(name)
    }

    /// The statement (`kind` b'S') or portal a Describe or Close names.
    pub fn target(&self, kind: u8, name: &[u8]) -> Option<&Arc<StatementDef>> {
        if kind == b'S' { self.statement(name) } else { self.portal(name) }
    }

    /// The unnamed statement has `set_config` calls decided at Bind. It then goes to the server
    /// under a server-side name, like a named statement, and never as the server's unnamed
    /// statement: that one stays on its backend until the next unnamed Parse there, which the
    /// server may skip (after an error earlier in the batch) or run on another backend, so a later
    /// Bind of the unnamed statement could reach it through pgtenant's record of another statement,
    /// one without the checks. Every statement the server holds as unnamed is one whose parameters
    /// need no check.
    pub fn unnamed_has_bind_checks(&self) -> bool {
        self.unnamed_stmt.as_ref().is_some_and(|d| d.bind_checks.is_some())
    }

    /// A statement by name (the unnamed one for an empty name).
    pub fn statement(&self, name: &[u8]) -> Option<&Arc<StatementDef>> {
        if name.is_empty() {
            self.unnamed_stmt.as_ref()
        } else {
            self.named_stmts.get(name)
        }
    }

    /// Records a Bind of `stmt` into `portal`, unless that would be one named portal more than
    /// `MAX_PORTALS` (every portal the server holds must be known here, or an Execute could not
    /// be classified nor audited by its statement).
    pub fn bind(&mut self, portal: &[u8], stmt: &[u8]) -> Result<Option<TxEffect>, TooManyPortals> {
        let def = self.statement(stmt).cloned();
        let e = def.as_ref().map(|d| d.effect);
        if portal.is_empty() {
            self.unnamed_portal = def;
        } else if self.named_portals.len() >= MAX_PORTALS && !self.named_portals.contains_key(portal) {
            return Err(TooManyPortals);
        } else if let Some(def) = def {
            self.named_portals.insert(Bytes::copy_from_slice(portal), def);
        }
        Ok(e)
    }

    /// [`Statements::bind`], with session-level changes the Bind decided (see
    /// `crate::sql::set_config`): the portal carries them with the statement's own.
    pub fn bind_with(&mut self, portal: &[u8], stmt: &[u8], changes: Vec<Change>) -> Result<Option<TxEffect>, TooManyPortals> {
        let effect = self.bind(portal, stmt)?;
        if changes.is_empty() {
            return Ok(effect);
        }
        let slot = if portal.is_empty() { self.unnamed_portal.as_mut() } else { self.named_portals.get_mut(portal) };
        if let Some(def) = slot {
            let sets: Vec<Change> = def.sets.iter().flat_map(|s| s.iter().cloned()).chain(changes).collect();
            *def = Arc::new(StatementDef { sets: Some(Arc::new(sets)), ..(**def).clone() });
        }
        Ok(effect)
    }

    /// The statement behind a portal.
    pub fn portal(&self, name: &[u8]) -> Option<&Arc<StatementDef>> {
        if name.is_empty() {
            self.unnamed_portal.as_ref()
        } else {
            self.named_portals.get(name)
        }
    }

    pub fn close(&mut self, kind: u8, name: &[u8]) {
        match (kind, name.is_empty()) {
            (b'S', true) => self.unnamed_stmt = None,
            (b'S', false) => {
                if let Some(d) = self.named_stmts.remove(name) {
                    self.bytes -= name.len() + d.key.len();
                }
            }
            (_, true) => self.unnamed_portal = None,
            (_, false) => {
                self.named_portals.remove(name);
            }
        }
    }

    /// DISCARD ALL / DEALLOCATE ALL: the client's named statements are gone. The unnamed one
    /// stays, as on the server (which deallocates only named statements; a simple Query that runs
    /// either drops the unnamed statement anyway, as every Query does).
    pub fn clear_statements(&mut self) {
        self.named_stmts.clear();
        self.named_stmts.shrink_to_fit();
        self.bytes = 0;
    }

    /// Portals do not outlive their transaction.
    pub fn transaction_ended(&mut self) {
        self.unnamed_portal = None;
        self.named_portals.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::set_config::{Arg, SetConfigCall};

    fn call() -> SetConfigCall {
        SetConfigCall { name: Arg::Param(1, None), value: Arg::Param(2, None), is_local: Arg::Bool(false), whole: true }
    }

    #[test]
    fn bound_changes_ride_on_the_portal() {
        let mut s = Statements::default();
        let q = b"select set_config($1, $2, false)";
        s.parse_analyzed(b"", &sql::analyze::analyze(q), Bytes::from_static(b"k1"), 1 << 20, vec![call()]).unwrap();
        assert!(s.unnamed_has_bind_checks());
        let set = Change::Set("work_mem".into(), "1MB".into());
        s.bind_with(b"p", b"", vec![set.clone()]).unwrap();
        assert_eq!(s.portal(b"p").and_then(|d| d.sets.clone()).as_deref(), Some(&vec![set]));
        // the statement itself keeps no changes; a Bind without changes leaves the portal plain
        assert!(s.statement(b"").unwrap().sets.is_none());
        s.bind_with(b"", b"", Vec::new()).unwrap();
        assert!(s.portal(b"").unwrap().sets.is_none());
        // an unnamed statement without checks replaces it
        s.parse(b"", b"select $1", Bytes::from_static(b"k2"), 1 << 20).unwrap();
        assert!(!s.unnamed_has_bind_checks());
    }

    #[test]
    fn parameters_are_counted_as_the_server_counts_them() {
        let key = |sql: &str, types: u16| {
            let mut k = sql.as_bytes().to_vec();
            k.push(0);
            k.extend_from_slice(&types.to_be_bytes());
            k.extend(std::iter::repeat_n(0u8, 4 * usize::from(types)));
            k
        };
        for (sql, types, want) in [
            ("select $1::int + $3::int", 0, Some(3)),
            ("select 1", 2, Some(2)),
            ("SELECT $2::int", 3, Some(3)),
            ("select '$5', $1::int -- $9\n /* $8 */", 0, Some(1)),
            ("select $$ $7 $$, $1::int", 0, Some(1)),
            ("(select $1::int)", 0, Some(1)),
            ("insert into t values ($2, $1)", 0, Some(2)),
            ("select 1", 0, Some(0)),
            ("copy (select $1::int) to stdout", 0, None),
            ("prepare p as select $1::int", 0, None),
            ("SET work_mem = '8MB'", 0, Some(0)),
            ("prepare p as select 1", 1, Some(1)),
            ("", 0, Some(0)),
            (" -- nothing", 1, Some(1)),
            ("select 1; select $1", 0, None),
        ] {
            let k = key(sql, types);
            assert_eq!(params_of(&sql::analyze::analyze(sql.as_bytes()), &k), want, "{sql}");
        }
    }

    #[test]
    fn named_portals_are_capped() {
        let mut s = Statements::default();
        s.parse(b"", b"select 1", Bytes::from_static(b"k"), 1 << 20).unwrap();
        for i in 0..MAX_PORTALS {
            s.bind(format!("p{i}").as_bytes(), b"").unwrap();
        }
        assert_eq!(s.bind(b"one-more", b""), Err(TooManyPortals));
        assert!(s.portal(b"one-more").is_none());
        // binding an existing name again, and the unnamed portal, still work
        assert!(s.bind(b"p7", b"").is_ok() && s.bind(b"", b"").is_ok());
        s.transaction_ended();
        assert!(s.bind(b"one-more", b"").is_ok());
    }
}
