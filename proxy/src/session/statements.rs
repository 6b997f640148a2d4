//! Per-client bookkeeping of prepared statements and portals, by name, with the transaction effect
//! of the SQL behind each (see `crate::sql`). The session uses it to know when an Execute ends the
//! transaction (the next statement in the batch needs the context again) and whether a pipelined
//! batch may be sent before the previous one has answered.

use std::collections::HashMap;

use crate::sql::{self, TxEffect};

/// Cap on remembered names; beyond it we forget, and unknown names are treated conservatively.
const MAX_NAMES: usize = 10_000;

#[derive(Debug, Default)]
pub struct Statements {
    unnamed_stmt: Option<TxEffect>,
    named_stmts: HashMap<Vec<u8>, TxEffect>,
    unnamed_portal: Option<TxEffect>,
    named_portals: HashMap<Vec<u8>, TxEffect>,
}

fn remember(map: &mut HashMap<Vec<u8>, TxEffect>, name: &[u8], e: TxEffect) {
    if map.len() >= MAX_NAMES && !map.contains_key(name) {
        map.clear();
    }
    map.insert(name.to_vec(), e);
}

impl Statements {
    pub fn parse(&mut self, name: &[u8], query: &[u8]) -> TxEffect {
        let e = sql::summarize(query).first;
        if name.is_empty() {
            self.unnamed_stmt = Some(e);
        } else {
            remember(&mut self.named_stmts, name, e);
        }
        e
    }

    pub fn statement(&self, name: &[u8]) -> Option<TxEffect> {
        if name.is_empty() {
            self.unnamed_stmt
        } else {
            self.named_stmts.get(name).copied()
        }
    }

    pub fn bind(&mut self, portal: &[u8], stmt: &[u8]) -> Option<TxEffect> {
        let e = self.statement(stmt);
        if portal.is_empty() {
            self.unnamed_portal = e;
        } else if let Some(e) = e {
            remember(&mut self.named_portals, portal, e);
        }
        e
    }

    pub fn portal(&self, name: &[u8]) -> Option<TxEffect> {
        if name.is_empty() {
            self.unnamed_portal
        } else {
            self.named_portals.get(name).copied()
        }
    }

    pub fn close(&mut self, kind: u8, name: &[u8]) {
        match (kind, name.is_empty()) {
            (b'S', true) => self.unnamed_stmt = None,
            (b'S', false) => {
                self.named_stmts.remove(name);
            }
            (_, true) => self.unnamed_portal = None,
            (_, false) => {
                self.named_portals.remove(name);
            }
        }
    }

    /// Portals do not outlive their transaction.
    pub fn transaction_ended(&mut self) {
        self.unnamed_portal = None;
        self.named_portals.clear();
    }
}
