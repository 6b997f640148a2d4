//! Protocol-level prepared statements across pooled backends.
//!
//! A client's `Parse("s1")` may be followed by `Bind("s1")` in a later transaction that runs on a
//! different backend. pgtenant therefore never sends client statement names to the server: each
//! client statement is remembered by name (see `statements`), and each backend keeps its own cache
//! of statements it has prepared, keyed by the full statement content (query text and parameter
//! types — never a short hash), under server-side names `pgtenant_s<n>` unique on that connection.
//! A statement is prepared lazily on the backend that needs it, and the least recently used ones are
//! closed when the cache is full — by count (`pool.prepared_statements_cache`) or by bytes
//! ([`MAX_CACHE_BYTES`]: the cache holds statement texts after their client has left, so a few
//! huge statements must not stay pinned in the pool).
//!
//! A server statement is shared only with client statements parsed **before** it: a schema change
//! (`ALTER TABLE … ADD COLUMN` under `SELECT *`) fails every statement the server prepared before
//! it with `0A000` ("cached plan must not change result type"), and a client that parses its text
//! after the change must get a working statement, as it would directly, not the stale one another
//! client (or the client itself, under another name) left on the backend. So every server
//! statement and every client Parse takes a number from one process-wide sequence ([`tick`]), and
//! a server statement older than the client's Parse is closed and prepared again. The client's own
//! Parse therefore always reaches the server, as it would directly; what the cache saves is
//! preparing a client's statements again on every backend its later transactions run on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{BufMut, Bytes, BytesMut};

/// Most bytes of statement text one backend connection keeps cached.
pub const MAX_CACHE_BYTES: usize = 4 * 1024 * 1024;

/// Statements one backend connection has prepared.
#[derive(Debug)]
pub struct BackendStatements {
    by_key: HashMap<Bytes, Entry>,
    next_id: u64,
    clock: u64,
    capacity: usize,
    bytes: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    id: u64,
    last_used: u64,
    /// When pgtenant sent its Parse ([`tick`]).
    parsed_at: u64,
    /// The older statement of the same text this one replaces (id, `parsed_at`), closed just ahead
    /// of its Parse: if that Parse is skipped, so was the Close, and the older one is still there.
    replaces: Option<(u64, u64)>,
}

static PARSES: AtomicU64 = AtomicU64::new(1);

/// The next number of the process-wide Parse sequence: taken when a client's Parse is read and
/// when pgtenant prepares a server statement, so that "this server statement was prepared after
/// that client Parse arrived" is `entry > client`.
pub fn tick() -> u64 {
    PARSES.fetch_add(1, Ordering::SeqCst)
}

/// What the session must do to use a statement on this backend.
#[derive(Debug, PartialEq, Eq)]
pub struct Prepared {
    pub id: u64,
    /// The server-side name.
    pub name: String,
    /// The statement is new on this backend: send a Parse for it first.
    pub needs_parse: bool,
    /// Close these server statements first to make room.
    pub evict: Vec<String>,
}

pub fn server_name(id: u64) -> String {
    format!("pgtenant_s{id}")
}

impl BackendStatements {
    pub fn new(capacity: usize) -> Self {
        BackendStatements { by_key: HashMap::new(), next_id: 0, clock: 0, capacity: capacity.max(1), bytes: 0 }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Looks up (or allocates) the server statement for `key`, for a client statement whose Parse
    /// arrived at `since` ([`tick`]): one prepared before that is closed and prepared again (see
    /// the module doc).
    pub fn prepare(&mut self, key: &Bytes, since: u64) -> Prepared {
        self.clock += 1;
        let mut evict = Vec::new();
        let mut replaces = None;
        if let Some(e) = self.by_key.get_mut(key) {
            if e.parsed_at > since {
                e.last_used = self.clock;
                return Prepared { id: e.id, name: server_name(e.id), needs_parse: false, evict };
            }
            evict.push(server_name(e.id));
            replaces = Some((e.id, e.parsed_at));
            self.by_key.remove(key);
            self.bytes -= key.len();
        }
        while !self.by_key.is_empty() && (self.by_key.len() >= self.capacity || self.bytes + key.len() > MAX_CACHE_BYTES) {
            let Some((k, e)) = self.by_key.iter().min_by_key(|(_, e)| e.last_used).map(|(k, e)| (k.clone(), *e)) else { break };
            self.by_key.remove(&k);
            self.bytes -= k.len();
            evict.push(server_name(e.id));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.bytes += key.len();
        self.by_key.insert(key.clone(), Entry { id, last_used: self.clock, parsed_at: tick(), replaces });
        Prepared { id, name: server_name(id), needs_parse: true, evict }
    }

    /// The server statement [`BackendStatements::prepare`] would use for `key` and `since` without
    /// preparing it again, if any.
    pub fn fresh(&self, key: &[u8], since: u64) -> Option<u64> {
        self.by_key.get(key).filter(|e| e.parsed_at > since).map(|e| e.id)
    }

    /// A statement's Parse failed (`itself`), or was skipped after an error: it is forgotten, and
    /// when skipped, the older statement of the same text it replaced is there still (its Close
    /// was skipped too) and is the backend's again. Returns the statement's content.
    pub fn failed(&mut self, id: u64, itself: bool) -> Option<Bytes> {
        let (key, e) = self.remove_entry(id)?;
        if let Some((old, parsed_at)) = e.replaces.filter(|_| !itself) {
            self.bytes += key.len();
            self.by_key.insert(key.clone(), Entry { id: old, parsed_at, replaces: None, ..e });
        }
        Some(key)
    }

    /// Forgets a statement (deallocated). Returns the statement's content.
    pub fn forget(&mut self, id: u64) -> Option<Bytes> {
        self.remove_entry(id).map(|(key, _)| key)
    }

    /// Removes the statement `id`: its content and entry.
    fn remove_entry(&mut self, id: u64) -> Option<(Bytes, Entry)> {
        let key = self.by_key.iter().find(|(_, e)| e.id == id).map(|(k, _)| k.clone())?;
        let e = self.by_key.remove(&key)?;
        self.bytes -= key.len();
        Some((key, e))
    }

    /// Forgets everything (the client may have run DEALLOCATE / DISCARD). Names are never reused,
    /// so a statement that survived cannot collide with a new one.
    pub fn clear(&mut self) {
        self.by_key.clear();
        self.bytes = 0;
    }
}

/// `Parse` under `name` for a statement whose body after the name is `key`.
pub fn parse_frame(out: &mut BytesMut, name: &str, key: &[u8]) {
    out.put_u8(b'P');
    out.put_i32((4 + name.len() + 1 + key.len()) as i32);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
    out.put_slice(key);
}

/// Rewrites a Bind (`portal\0stmt\0rest`) to use the server statement name.
pub fn rewrite_bind(out: &mut BytesMut, body: &[u8], portal_len: usize, stmt_len: usize, name: &str) {
    let rest = &body[portal_len + 1 + stmt_len + 1..];
    out.put_u8(b'B');
    out.put_i32((4 + portal_len + 1 + name.len() + 1 + rest.len()) as i32);
    out.put_slice(&body[..=portal_len]);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
    out.put_slice(rest);
}

/// Describe('S', name) or Close('S', name) for a server statement.
pub fn target_frame(out: &mut BytesMut, tag: u8, name: &str) {
    out.put_u8(tag);
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(b'S');
    out.put_slice(name.as_bytes());
    out.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{frame::try_split, peek};

    #[test]
    fn caches_by_content_and_evicts_lru() {
        let mut b = BackendStatements::new(2);
        let (k1, k2, k3) = (Bytes::from_static(b"select 1\0\0\0"), Bytes::from_static(b"select 2\0\0\0"), Bytes::from_static(b"select 3\0\0\0"));
        let p1 = b.prepare(&k1, 0);
        assert!(p1.needs_parse);
        assert_eq!(b.prepare(&k1, 0), Prepared { id: p1.id, name: p1.name.clone(), needs_parse: false, evict: vec![] });
        b.prepare(&k2, 0);
        b.prepare(&k1, 0); // k2 is now least recently used
        let p3 = b.prepare(&k3, 0);
        assert_eq!(p3.evict, ["pgtenant_s1"]);
        assert_eq!(b.len(), 2);
        b.clear();
        assert_ne!(b.prepare(&k1, 0).name, p1.name, "names are never reused");
    }

    #[test]
    fn a_statement_prepared_before_the_clients_parse_is_prepared_again() {
        let mut b = BackendStatements::new(4);
        let k = Bytes::from_static(b"select * from t\0\0\0");
        let client_a = tick();
        let first = b.prepare(&k, client_a);
        assert!(first.needs_parse);
        // client A's statements, parsed before the server statement, share it
        assert!(!b.prepare(&k, client_a).needs_parse);
        // client B parsed after it: a schema change may lie between, so it gets its own
        let client_b = tick();
        let again = b.prepare(&k, client_b);
        assert!(again.needs_parse && again.name != first.name);
        assert_eq!(again.evict, std::slice::from_ref(&first.name), "the old one is closed");
        assert_eq!(b.len(), 1);
        // and A, parsed earlier still, shares B's
        assert_eq!(b.prepare(&k, client_a).id, again.id);
        assert!(b.forget(first.id).is_none(), "the old id is gone");
        // prepared again, and that Parse skipped behind an error (its Close too): the older one
        // is the backend's again; one that failed itself had closed it
        let third = b.prepare(&k, tick());
        assert_eq!(third.evict, std::slice::from_ref(&again.name));
        assert!(b.failed(third.id, false).is_some());
        assert_eq!(b.fresh(&k, client_a), Some(again.id));
        let fourth = b.prepare(&k, tick());
        assert!(b.failed(fourth.id, true).is_some());
        assert_eq!(b.fresh(&k, 0), None);
        assert!(b.is_empty());
    }

    #[test]
    fn large_statements_are_evicted_by_bytes() {
        let mut b = BackendStatements::new(100);
        let big = |c: u8, n: usize| Bytes::from(vec![c; n]);
        b.prepare(&big(1, MAX_CACHE_BYTES / 3), 0);
        b.prepare(&big(2, MAX_CACHE_BYTES / 3), 0);
        let p = b.prepare(&big(3, MAX_CACHE_BYTES - 10), 0);
        assert_eq!(p.evict.len(), 2);
        assert_eq!(b.len(), 1);
        assert_eq!(b.forget(p.id).map(|k| k.len()), Some(MAX_CACHE_BYTES - 10));
        assert!(b.is_empty());
        b.prepare(&big(4, MAX_CACHE_BYTES / 2), 0);
        assert_eq!(b.prepare(&Bytes::from_static(b"x"), 0).evict.len(), 0);
    }

    #[test]
    fn rewritten_messages_are_well_formed() {
        let mut out = BytesMut::new();
        parse_frame(&mut out, "pgtenant_s0", b"select $1\0\0\x01\0\0\0\x19");
        rewrite_bind(&mut out, b"p\0client_stmt\0\0\0\0\0\0\0", 1, 11, "pgtenant_s0");
        target_frame(&mut out, b'D', "pgtenant_s0");
        let f = try_split(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!(peek::parse_msg(f.body()), Some((&b"pgtenant_s0"[..], &b"select $1"[..])));
        let f = try_split(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!(peek::bind_msg(f.body()), Some((&b"p"[..], &b"pgtenant_s0"[..])));
        assert_eq!(f.body().len(), 2 + 12 + 6);
        let f = try_split(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!(peek::target_msg(f.body()), Some((b'S', &b"pgtenant_s0"[..])));
        assert!(out.is_empty());
    }
}
