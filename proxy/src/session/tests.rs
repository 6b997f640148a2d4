//! The session over in-memory pipes: a client that sends raw frames, and a scripted backend that
//! answers like a (very small) Postgres and logs every message pgtenant sent it. These run in
//! milliseconds beside the real-Postgres suites (tests/), and pin down the message-level rules:
//! where the context goes, pipelining, refusals, errors inside a batch, DISCARD ALL, COPY.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::backend::{BackendConn, BackendTarget, ConnectError};
use crate::cancel::CancelRegistry;
use crate::client::params::ClientParams;
use crate::config::Config;
use crate::pool::Connector;

const CONFIG: &str = r#"
[backend]
url = "postgres://app_user:pw@127.0.0.1:5432/app"
pool_size = 2
[jwt]
secret = "0123456789abcdef0123456789abcdef"
[tenant]
settings = { "app.tenant_id" = "tenant_id" }
claims_setting = ""
"#;

type Log = Arc<Mutex<Vec<String>>>;

thread_local! {
    /// How many of the next `DISCARD SEQUENCES` the scripted server fails (as a cancel would). The
    /// server runs on the test's own single-threaded runtime, so each test has its own.
    static FAIL_DISCARDS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Opens connections to the scripted server.
struct Scripted {
    log: Log,
}

impl Connector for Scripted {
    fn connect<'a>(
        &'a self,
        _: &'a BackendTarget,
        _: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<BackendConn, ConnectError>> + Send + 'a>> {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        tokio::spawn(serve(theirs, self.log.clone()));
        Box::pin(async move {
            Ok(BackendConn {
                stream: Stream::Pipe(ours),
                params: vec![("client_encoding".into(), "UTF8".into())],
                pid: 4242,
                secret_key: 7,
                created: Instant::now(),
            })
        })
    }
}

// ---- the scripted server --------------------------------------------------------------------

#[derive(Default)]
struct Server {
    /// Inside an explicit transaction block.
    block: bool,
    /// That block failed.
    aborted: bool,
    /// Skipping to Sync after an error in the extended protocol.
    skipping: bool,
    statements: std::collections::HashMap<String, String>,
    portals: std::collections::HashMap<String, String>,
    copy_in: bool,
    out: BytesMut,
}

fn put(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(body);
}

fn cstr(b: &[u8]) -> (String, &[u8]) {
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    (String::from_utf8_lossy(&b[..n]).into_owned(), &b[(n + 1).min(b.len())..])
}

impl Server {
    fn error(&mut self, code: &str, msg: &str) {
        let body = format!("SERROR\0C{code}\0M{msg}\0\0");
        put(&mut self.out, b'E', body.as_bytes());
        self.aborted = self.block;
    }

    fn status(&self) -> u8 {
        match (self.block, self.aborted) {
            (false, _) => b'I',
            (true, false) => b'T',
            (true, true) => b'E',
        }
    }

    /// Runs one statement; false when it failed.
    fn run(&mut self, sql: &str) -> bool {
        let l = sql.trim().to_lowercase();
        if self.aborted && !(l.starts_with("rollback") || l.starts_with("commit")) {
            self.error("25P02", "current transaction is aborted");
            return false;
        }
        if l.starts_with("begin") || l.starts_with("start") {
            self.block = true;
            put(&mut self.out, b'C', b"BEGIN\0");
        } else if l.starts_with("commit") || l.starts_with("end") {
            let tag: &[u8] = if self.aborted { b"ROLLBACK\0" } else { b"COMMIT\0" };
            (self.block, self.aborted) = (false, false);
            put(&mut self.out, b'C', tag);
        } else if l.starts_with("rollback") {
            (self.block, self.aborted) = (false, false);
            put(&mut self.out, b'C', b"ROLLBACK\0");
        } else if l.starts_with("discard sequences") && FAIL_DISCARDS.with(|n| n.replace(n.get().saturating_sub(1)) > 0) {
            self.error("57014", "canceling statement due to user request");
            return false;
        } else if l.contains("fail") || l.starts_with("pgtenant refused") {
            self.error(if l.starts_with("pgtenant refused") { "42601" } else { "XX000" }, "boom");
            return false;
        } else if l.starts_with("copy") {
            self.copy_in = true;
            put(&mut self.out, b'G', &[0, 0, 0]);
        } else if l.starts_with("select") || l.starts_with("show") {
            put(&mut self.out, b'D', &[0, 1, 0, 0, 0, 1, b'1']);
            put(&mut self.out, b'C', b"SELECT 1\0");
        } else {
            let word = l.split_whitespace().next().unwrap_or("").to_uppercase();
            put(&mut self.out, b'C', format!("{word}\0").as_bytes());
        }
        true
    }

    fn on(&mut self, tag: u8, body: &[u8], log: &Log) -> bool {
        let skipping = self.skipping && !matches!(tag, b'S' | b'X');
        let note = |s: String| log.lock().unwrap().push(if skipping { format!("(skipped) {s}") } else { s });
        match tag {
            b'Q' => {
                let (sql, _) = cstr(body);
                note(format!("Q {sql}"));
                if !skipping {
                    for stmt in sql.split(';').filter(|s| !s.trim().is_empty()) {
                        if !self.run(stmt) || self.copy_in {
                            break;
                        }
                    }
                    if !self.copy_in {
                        let z = [self.status()];
                        put(&mut self.out, b'Z', &z);
                    }
                }
            }
            b'P' => {
                let (name, rest) = cstr(body);
                let (sql, _) = cstr(rest);
                note(format!("P {name}: {sql}"));
                if !skipping {
                    if sql.starts_with("pgtenant refused") {
                        self.error("42601", "syntax error");
                        self.skipping = true;
                    } else {
                        self.statements.insert(name, sql);
                        put(&mut self.out, b'1', b"");
                    }
                }
            }
            b'B' => {
                let (portal, rest) = cstr(body);
                let (stmt, _) = cstr(rest);
                note(format!("B {portal} {stmt}"));
                if !skipping {
                    match self.statements.get(&stmt).cloned() {
                        Some(sql) => {
                            self.portals.insert(portal, sql);
                            put(&mut self.out, b'2', b"");
                        }
                        None => {
                            self.error("26000", "no such statement");
                            self.skipping = true;
                        }
                    }
                }
            }
            b'D' => {
                let (name, _) = cstr(&body[1..]);
                note(format!("D {} {name}", body[0] as char));
                if !skipping {
                    if body[0] == b'S' {
                        put(&mut self.out, b't', &[0, 0]); // no parameters
                    }
                    put(&mut self.out, b'n', b"");
                }
            }
            b'E' => {
                let (portal, _) = cstr(body);
                let sql = self.portals.get(&portal).cloned().unwrap_or_default();
                let ctx = sql.contains("set_config");
                note(if ctx { "E <context>".into() } else { format!("E {sql}") });
                if !skipping && !self.run(&sql) {
                    self.skipping = true;
                }
            }
            b'C' => {
                let (name, _) = cstr(&body[1..]);
                note(format!("C {} {name}", body[0] as char));
                if !skipping {
                    put(&mut self.out, b'3', b"");
                }
            }
            b'S' => {
                note("S".into());
                self.skipping = false;
                self.portals.clear();
                let z = [self.status()];
                        put(&mut self.out, b'Z', &z);
            }
            b'd' => note(format!("d {}", String::from_utf8_lossy(body))),
            b'c' => {
                note("c".into());
                self.copy_in = false;
                put(&mut self.out, b'C', b"COPY 1\0");
                let z = [self.status()];
                        put(&mut self.out, b'Z', &z);
            }
            b'X' => return false,
            other => note(format!("{}", other as char)),
        }
        true
    }
}

async fn serve(mut s: DuplexStream, log: Log) {
    let mut srv = Server::default();
    let mut buf = BytesMut::new();
    loop {
        while buf.len() >= 5 {
            let len = i32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
            if buf.len() < 1 + len {
                break;
            }
            let frame = buf.split_to(1 + len);
            if !srv.on(frame[0], &frame[5..], &log) {
                return;
            }
        }
        if !srv.out.is_empty() {
            let out = srv.out.split();
            if s.write_all(&out).await.is_err() {
                return;
            }
        }
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

// ---- the client side ------------------------------------------------------------------------

struct Client {
    s: DuplexStream,
    buf: BytesMut,
    log: Log,
    /// The session's kill switch (console `KILL`, `/sessions` DELETE).
    slot: Arc<crate::cancel::CancelSlot>,
    /// The proxy's drain signal.
    drain: tokio::sync::watch::Sender<bool>,
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut b = vec![tag];
    b.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    b.extend_from_slice(body);
    b
}

fn q(sql: &str) -> Vec<u8> {
    frame(b'Q', format!("{sql}\0").as_bytes())
}

/// Parse/Bind/Execute of an unnamed statement, without Sync.
fn ext(sql: &str) -> Vec<u8> {
    [frame(b'P', format!("\0{sql}\0\0\0").as_bytes()), frame(b'B', b"\0\0\0\0\0\0\0\0"), frame(b'E', b"\0\0\0\0\0")].concat()
}

fn sync() -> Vec<u8> {
    frame(b'S', b"")
}

impl Client {
    async fn start(session_mode: bool) -> Client {
        Client::open(session_mode, &[], false).await
    }

    /// A session whose client sent `pipelined` along with its login (the session finds it
    /// buffered before its first read), started while the proxy is draining or not.
    async fn open(session_mode: bool, pipelined: &[u8], draining: bool) -> Client {
        let text = if session_mode { format!("{CONFIG}\n[pool]\nmode = \"session\"") } else { CONFIG.to_string() };
        let config = Config::from_toml(&text, &|_| None).unwrap();
        let log: Log = Default::default();
        let target = BackendTarget::from_config(&config.backend).unwrap();
        let pool = crate::pool::Pool::with_connector(&config, target, 2, Arc::new(config.limits.clone()), Arc::new(Scripted { log: log.clone() }));
        let (drain, draining) = tokio::sync::watch::channel(draining);
        let router = crate::routing::Router::new(&config, pool.clone()).unwrap();
        let shared = Arc::new(Shared {
            pool,
            router,
            bypass: None,
            audit: Arc::new(crate::audit::AuditLog::open(&Default::default()).unwrap()),
            max_message_bytes: 1 << 20,
            max_state_bytes: 1 << 20,
            client_write_timeout: std::time::Duration::from_secs(30),
            pool_cfg: config.pool.clone(),
            session_mode,
            signer: crate::signing::SignerSlot::new(None),
            draining,
        });
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let settings = ClientSettings::new(vec!["app.tenant_id".into()], vec!["1".into()], ClientParams::default());
        let cancel = Arc::new(CancelRegistry::default()).register(None, None);
        let slot = cancel.slot.clone();
        let guard = Arc::new(Guard::from_config(&config.tenant));
        let who = Arc::new(Who { tenant: "1".into(), subject: None, client: "127.0.0.1:1".parse().unwrap(), bypass: false, login: 1, cluster: None, prefers_standby: false });
        let session = Session::new(shared, Stream::Pipe(theirs), BytesMut::from(pipelined), settings, cancel, ClientView::default(), guard, who, None);
        tokio::spawn(session.run());
        Client { s: ours, buf: BytesMut::new(), log, slot, drain }
    }

    /// Sends `bytes` and reads until `n` ReadyForQuery messages arrived; returns the message tags
    /// (and SQLSTATEs of errors, as `E<code>`), e.g. `12nC Z`.
    async fn round(&mut self, bytes: &[u8], n: usize) -> String {
        self.s.write_all(bytes).await.unwrap();
        self.read_until(n).await
    }

    async fn read_until(&mut self, mut n: usize) -> String {
        let mut trace = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while n > 0 {
            while self.buf.len() >= 5 {
                let len = i32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() < 1 + len {
                    break;
                }
                let f = self.buf.split_to(1 + len);
                match f[0] {
                    b'E' => {
                        let code = f[5..].split(|&b| b == 0).find(|x| x.first() == Some(&b'C')).map(|c| String::from_utf8_lossy(&c[1..]).into_owned());
                        trace.push_str(&format!("E{} ", code.unwrap_or_default()));
                    }
                    b'Z' => {
                        trace.push_str(&format!(" Z{} ", f[5] as char));
                        n -= 1;
                    }
                    b'S' => {} // parameter reports are not what these tests are about
                    t => trace.push(t as char),
                }
                if n == 0 {
                    break;
                }
            }
            if n == 0 {
                break;
            }
            match tokio::time::timeout_at(deadline, self.s.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    trace.push_str("<closed>");
                    break;
                }
                Ok(Ok(_)) => {}
                Err(_) => {
                    trace.push_str("<timeout>");
                    break;
                }
            }
        }
        trace.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// What the backend received since the last call (the pool's own setup query left out).
    fn sent(&self) -> Vec<String> {
        let mut log = self.log.lock().unwrap();
        let out = log.drain(..).filter(|l| !l.contains("backend_start") && !l.contains("pg_settings")).collect();
        out
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// When the proxy starts draining, relative to a session idle in a transaction.
#[derive(Debug, Clone, Copy)]
enum DrainAt {
    Never,
    /// After the session's first events (its interrupt wait is armed).
    InTransaction,
    /// Already under way when the session first waits (its client pipelined `BEGIN` with its
    /// login, so the session is in a transaction when it first looks at the drain).
    BeforeFirstWait,
}

/// A kill ends a session idle in a transaction whenever the proxy began draining: the drain keeps
/// the session (its transaction may finish) but must not end its wait for a kill. Before the fix,
/// a drain under way when the session first waited completed that wait, and the kill went
/// unnoticed (`<timeout>`).
#[test]
fn a_kill_ends_an_idle_session_after_a_drain() {
    rt().block_on(async {
        for at in [DrainAt::Never, DrainAt::InTransaction, DrainAt::BeforeFirstWait] {
            let mut c = match at {
                DrainAt::BeforeFirstWait => {
                    let mut c = Client::open(false, &q("BEGIN"), true).await;
                    assert_eq!(c.read_until(1).await, "C ZT", "{at:?}");
                    c
                }
                _ => {
                    let mut c = Client::start(false).await;
                    assert_eq!(c.round(&q("BEGIN"), 1).await, "C ZT", "{at:?}");
                    c
                }
            };
            if let DrainAt::InTransaction = at {
                c.drain.send(true).unwrap();
            }
            // in a transaction: the drain lets it go on
            assert_eq!(c.round(&q("select 1"), 1).await, "DC ZT", "{at:?}: served in its transaction");
            tokio::time::sleep(Duration::from_millis(20)).await; // idle in the transaction
            c.slot.terminate();
            assert_eq!(c.read_until(1).await, "E57P01 <closed>", "{at:?}: killed while idle in a transaction");
        }
    });
}

/// A drain ends a session promptly once it is between transactions, however the drain and the
/// session's first wait are ordered: an idle session whose first event is the drain, and a session
/// that first waits in a transaction while the drain is already under way (then commits).
#[test]
fn a_drain_ends_a_session_between_transactions() {
    rt().block_on(async {
        let mut c = Client::start(false).await;
        tokio::time::sleep(Duration::from_millis(20)).await; // waiting, nothing happened yet
        c.drain.send(true).unwrap();
        assert_eq!(c.read_until(1).await, "E57P01 <closed>", "idle session kept while draining");

        let mut c = Client::open(false, &q("BEGIN"), true).await;
        assert_eq!(c.read_until(1).await, "C ZT");
        assert_eq!(c.round(&q("COMMIT"), 1).await, "C ZI", "the transaction finishes");
        assert_eq!(c.read_until(1).await, "E57P01 <closed>", "session kept after its transaction while draining");
    });
}

#[test]
fn context_goes_in_front_of_the_first_message_of_each_transaction() {
    rt().block_on(async {
        let mut c = Client::start(false).await;
        assert_eq!(c.round(&q("select 1"), 1).await, "DC ZI", "simple query");
        let sent = c.sent();
        assert_eq!(sent.iter().filter(|l| *l == "E <context>").count(), 1, "{sent:?}");
        assert!(sent.last().is_some_and(|l| l == "Q select 1"), "{sent:?}");
        // an extended batch: context, then the client's messages
        assert_eq!(c.round(&[ext("select 2"), sync()].concat(), 1).await, "12DC ZI");
        let sent = c.sent();
        let ctx = sent.iter().position(|l| l == "E <context>").expect("context");
        let client = sent.iter().position(|l| l == "P : select 2").expect("client parse");
        assert!(ctx < client, "{sent:?}");
    });
}

#[test]
fn transaction_setup_goes_ahead_of_the_context() {
    rt().block_on(async {
        let mut c = Client::start(false).await;
        assert_eq!(c.round(&q("BEGIN ISOLATION LEVEL SERIALIZABLE"), 1).await, "C ZT");
        assert_eq!(c.sent(), ["Q BEGIN ISOLATION LEVEL SERIALIZABLE"], "setup went alone");
        assert_eq!(c.round(&q("select 1"), 1).await, "DC ZT");
        let sent = c.sent();
        let ctx = sent.iter().position(|l| l == "E <context>").expect("context");
        assert!(ctx < sent.iter().position(|l| l == "Q select 1").unwrap(), "{sent:?}");
        assert_eq!(c.round(&q("COMMIT"), 1).await, "C ZI");
        // in one extended batch: BEGIN, then the context, then the query
        let batch = [ext("BEGIN READ ONLY"), ext("select 3"), ext("COMMIT"), sync()].concat();
        assert_eq!(c.round(&batch, 1).await, "12C12DC12C ZI");
        let sent: Vec<String> = c.sent().into_iter().filter(|l| l.starts_with('E')).collect();
        assert_eq!(sent, ["E BEGIN READ ONLY", "E <context>", "E select 3", "E COMMIT"]);
    });
}

#[test]
fn refused_statement_aborts_like_a_server_error_and_keeps_the_batch_rules() {
    rt().block_on(async {
        let mut c = Client::start(false).await;
        // with no backend attached, pgtenant answers itself
        assert_eq!(c.round(&q("select set_config('app.tenant_id', '2', true)"), 1).await, "E42501 ZI");
        assert!(c.sent().is_empty(), "nothing reached the backend");
        // inside a transaction: the stand-in fails on the server and the block is aborted
        assert_eq!(c.round(&q("BEGIN"), 1).await, "C ZT");
        assert_eq!(c.round(&q("select set_config('app.tenant_id', '2', true)"), 1).await, "E42501 ZE");
        assert_eq!(c.round(&q("select 1"), 1).await, "E25P02 ZE");
        assert_eq!(c.round(&q("ROLLBACK"), 1).await, "C ZI");
        // extended: the refused Parse fails, the rest of the batch is skipped up to Sync
        let batch = [ext("select set_config('app.tenant_id', '2', true)"), ext("select 4"), sync()].concat();
        assert_eq!(c.round(&batch, 1).await, "E42501 ZI");
        assert!(!c.sent().iter().any(|l| l.contains("select 4")), "answered without a backend");
        // the same inside a block: a stand-in Parse fails on the server, which skips to Sync
        assert_eq!(c.round(&q("BEGIN"), 1).await, "C ZT");
        assert_eq!(c.round(&batch, 1).await, "E42501 ZE");
        let sent = c.sent();
        assert!(sent.iter().any(|l| l == "P pgtenant_refused: pgtenant refused this statement"), "{sent:?}");
        assert!(sent.iter().any(|l| l == "(skipped) P : select 4"), "{sent:?}");
        assert_eq!(c.round(&q("ROLLBACK"), 1).await, "C ZI");
        let r = c.round(&[ext("select 5"), sync()].concat(), 1).await;
        assert_eq!(r, "12DC ZI", "the next batch works: {:?}", c.sent());
    });
}

#[test]
fn error_inside_a_batch_skips_to_sync_and_pipelined_batches_each_get_the_context() {
    rt().block_on(async {
        let mut c = Client::start(false).await;
        let batches = [ext("select fail"), ext("select 6"), sync(), ext("select 7"), sync()].concat();
        assert_eq!(c.round(&batches, 2).await, "12EXX000 ZI 12DC ZI");
        let sent = c.sent();
        let contexts = sent.iter().filter(|l| *l == "E <context>").count();
        assert_eq!(contexts, 2, "each batch starts a transaction: {sent:?}");
        assert!(sent.iter().any(|l| l == "(skipped) P : select 6"), "{sent:?}");
    });
}

#[test]
fn discard_all_is_answered_by_pgtenant_in_both_protocols() {
    rt().block_on(async {
        let mut c = Client::start(false).await;
        assert_eq!(c.round(&q("SET work_mem = '8MB'"), 1).await, "C ZI");
        c.sent();
        assert_eq!(c.round(&q("DISCARD ALL"), 1).await, "C ZI");
        assert!(c.sent().iter().all(|l| !l.contains("DISCARD ALL")), "not sent to the server as is");
        let batch = [ext("DISCARD ALL"), ext("select 8"), sync()].concat();
        assert_eq!(c.round(&batch, 1).await, "12C12DC ZI");
        let sent = c.sent();
        let reset = sent.iter().position(|l| l.starts_with("Q CLOSE ALL")).expect("the reset ran");
        let ctx = sent.iter().rposition(|l| l == "E <context>").expect("context again");
        assert!(reset < ctx && ctx < sent.iter().position(|l| l == "E select 8").unwrap(), "{sent:?}");
    });
}

/// After plain writes (sequence state only) a backend's next session gets `DISCARD SEQUENCES` in the
/// batch of its context statement (prepared once, then Bind/Execute/Close), not as a Query and a
/// transaction of its own; in front of transaction setup, which must start its own transaction, it
/// is a Query of its own. Either way the client sees none of it. (`DISCARD ALL` makes the client a
/// new session, so the same backend owes it the reset.)
#[test]
fn sequence_reset_rides_in_the_context_batch() {
    rt().block_on(async {
        let mut c = Client::start(false).await;
        for round in 0..2 {
            assert_eq!(c.round(&q("insert into t values (1)"), 1).await, "C ZI");
            assert_eq!(c.round(&q("DISCARD ALL"), 1).await, "C ZI");
            c.sent();
            assert_eq!(c.round(&q("select 1"), 1).await, "DC ZI", "round {round}: the client sees only its own replies");
            let sent = c.sent();
            let mut want = vec!["B pgtenant_reset_seq pgtenant_reset_seq", "E DISCARD SEQUENCES", "C P pgtenant_reset_seq"];
            if round == 0 {
                want.splice(0..0, ["C S pgtenant_reset_seq", "P pgtenant_reset_seq: DISCARD SEQUENCES"]);
            }
            assert_eq!(sent[..want.len()], want[..], "round {round}: {sent:?}");
            assert!(sent.iter().all(|l| !l.starts_with("Q DISCARD")), "{sent:?}");
            let ctx = sent.iter().position(|l| l == "E <context>").expect("context");
            assert!(ctx > sent.iter().position(|l| l == "E DISCARD SEQUENCES").unwrap() && sent.last().is_some_and(|l| l == "Q select 1"), "{sent:?}");
        }
        // in front of transaction setup: a Query of its own, first
        assert_eq!(c.round(&q("insert into t values (1)"), 1).await, "C ZI");
        assert_eq!(c.round(&q("DISCARD ALL"), 1).await, "C ZI");
        c.sent();
        assert_eq!(c.round(&q("BEGIN ISOLATION LEVEL SERIALIZABLE"), 1).await, "C ZT");
        assert_eq!(c.sent(), ["Q DISCARD SEQUENCES", "Q BEGIN ISOLATION LEVEL SERIALIZABLE"]);
        assert_eq!(c.round(&q("COMMIT"), 1).await, "C ZI");
    });
}

/// A sequence reset that fails (a cancel, say) did not run: the client's first message, which rode
/// behind it, did not run either and the client gets the error instead of hanging, and the backend
/// still owes the reset, so the next transaction sends it again. In both protocols.
#[test]
fn a_failed_sequence_reset_is_owed_again() {
    rt().block_on(async {
        let mut c = Client::start(false).await;
        for (label, first, want) in [("simple", q("select 1"), "E57014 ZI"), ("extended", [ext("select 1"), sync()].concat(), "E57014 ZI")] {
            assert_eq!(c.round(&q("insert into t values (1)"), 1).await, "C ZI");
            assert_eq!(c.round(&q("DISCARD ALL"), 1).await, "C ZI");
            c.sent();
            FAIL_DISCARDS.with(|n| n.set(1));
            assert_eq!(c.round(&first, 1).await, want, "{label}: the reset's error, in place of the first message's replies");
            let sent = c.sent();
            assert!(sent.iter().any(|l| l == "E DISCARD SEQUENCES"), "{label}: {sent:?}");
            assert!(sent.iter().all(|l| !(l.starts_with("E select") || l.starts_with("Q select")) || l.starts_with("(skipped)")), "{label}: the first message ran: {sent:?}");
            // the next transaction: the reset again, then the context and the client's query
            assert_eq!(c.round(&q("select 2"), 1).await, "DC ZI", "{label}");
            let sent = c.sent();
            let reset = sent.iter().position(|l| l == "E DISCARD SEQUENCES").unwrap_or_else(|| panic!("{label}: the reset is owed again: {sent:?}"));
            let ctx = sent.iter().position(|l| l == "E <context>").expect("context");
            assert!(reset < ctx && sent.last().is_some_and(|l| l == "Q select 2"), "{label}: {sent:?}");
            // and once it ran, it is not sent again
            assert_eq!(c.round(&q("select 3"), 1).await, "DC ZI", "{label}");
            assert!(c.sent().iter().all(|l| !l.contains("DISCARD")), "{label}: reset twice");
        }
    });
}

#[test]
fn copy_data_flows_while_a_pipelined_query_waits() {
    rt().block_on(async {
        let mut c = Client::start(false).await;
        let bytes = [q("copy t from stdin"), frame(b'd', b"1\n"), frame(b'c', b""), q("select 9")].concat();
        assert_eq!(c.round(&bytes, 2).await, "GC ZI DC ZI");
        let sent = c.sent();
        let done = sent.iter().position(|l| l == "c").expect("CopyDone");
        let next = sent.iter().position(|l| l == "Q select 9").expect("query");
        assert!(sent.iter().any(|l| l == "d 1\n"), "{sent:?}");
        assert!(done < next, "{sent:?}");
    });
}

#[test]
fn session_mode_keeps_the_backend_and_named_statements_live_in_pgtenant() {
    rt().block_on(async {
        let mut c = Client::start(true).await;
        let parse = [frame(b'P', b"s1\0select 10\0\0\0"), sync()].concat();
        assert_eq!(c.round(&parse, 1).await, "1 ZI");
        let run = [frame(b'B', b"\0s1\0\0\0\0\0\0\0"), frame(b'E', b"\0\0\0\0\0"), sync()].concat();
        assert_eq!(c.round(&run, 1).await, "2DC ZI");
        // Close of a client statement is answered by pgtenant; the server copy stays cached
        assert_eq!(c.round(&[frame(b'C', b"Ss1\0"), sync()].concat(), 1).await, "3 ZI");
        let sent = c.sent();
        assert!(sent.iter().any(|l| l.starts_with("P pgtenant_s")), "server-side name: {sent:?}");
        assert!(!sent.iter().any(|l| l == "C S s1" || l == "C S pgtenant_s0"), "the Close did not reach the server: {sent:?}");
    });
}

/// What a message in a failed batch would have done, it does not do: the server skips it, so
/// pgtenant neither forgets (DISCARD ALL, Close, DEALLOCATE) nor records (Parse) a statement for
/// it. Where that is not known yet when the message arrives, pgtenant asks for the batch's
/// replies so far (Flush) and decides once they are in. A second Parse of a name gets 42P05, as
/// from the server.
#[test]
fn a_failed_batch_changes_none_of_the_clients_statements() {
    let named = |name: &str, sql: &str| frame(b'P', format!("{name}\0{sql}\0\0\0").as_bytes());
    let run = |name: &str| [frame(b'B', format!("\0{name}\0\0\0\0\0\0\0").as_bytes()), frame(b'E', b"\0\0\0\0\0"), sync()].concat();
    let close = |name: &str| frame(b'C', format!("S{name}\0").as_bytes());
    let fails = || frame(b'B', b"\0nosuch\0\0\0\0\0\0\0"); // the server answers 26000
    rt().block_on(async {
        for session_mode in [false, true] {
            let mut c = Client::start(session_mode).await;
            assert_eq!(c.round(&[named("s1", "select 1"), sync()].concat(), 1).await, "1 ZI");
            for (what, msgs) in [
                ("DISCARD ALL", ext("DISCARD ALL")),
                ("Close", close("s1")),
                ("DEALLOCATE", ext("DEALLOCATE s1")),
                ("DEALLOCATE ALL by Query", q("DEALLOCATE ALL")),
                ("Parse", named("s2", "select 2")),
            ] {
                let batch = [fails(), msgs.clone(), sync()].concat();
                let got = c.round(&batch, 1).await;
                assert_eq!(got, "E26000 ZI", "{what}, session mode {session_mode}");
                assert_eq!(c.round(&run("s1"), 1).await, "2DC ZI", "{what}: s1 is still there");
                assert_eq!(c.round(&run("s2"), 1).await, "E26000 ZI", "{what}: s2 was not prepared");
                // the same without the failure ahead of it: the batch's replies are asked for
                // with a Flush where pgtenant has to wait for them
                c.sent();
                if what == "Parse" {
                    assert_eq!(c.round(&[named("s2", "select 2"), msgs, sync()].concat(), 1).await, "1E42P05 ZI", "a second Parse of s2");
                    assert!(c.sent().iter().any(|l| l == "H"), "flushed");
                    assert_eq!(c.round(&run("s2"), 1).await, "2DC ZI", "the first s2 stands");
                    assert_eq!(c.round(&[named("s1", "select 3"), sync()].concat(), 1).await, "E42P05 ZI");
                    continue;
                }
                let readies = if msgs[0] == b'Q' { 2 } else { 1 };
                let ok = c.round(&[frame(b'P', b"\0select 5\0\0\0"), msgs.clone(), sync()].concat(), readies).await;
                assert!(!ok.contains('E'), "{what}: {ok}");
                assert!(c.sent().iter().any(|l| l == "H"), "{what}: flushed");
                assert_eq!(c.round(&run("s1"), 1).await, "E26000 ZI", "{what}: s1 is gone");
                assert_eq!(c.round(&[named("s1", "select 1"), sync()].concat(), 1).await, "1 ZI", "{what}: s1 again");
            }
        }
    });
}

/// The server skips an unnamed Parse behind an error and keeps the unnamed statement it had; so
/// does pgtenant, and a Bind of the unnamed statement in a later batch runs that one, parsed again
/// on the backend (the server's unnamed statement may not be the client's by then).
#[test]
fn a_skipped_unnamed_parse_leaves_the_one_before() {
    let unnamed = |sql: &str| frame(b'P', format!("\0{sql}\0\0\0").as_bytes());
    let run = || [frame(b'B', b"\0\0\0\0\0\0\0\0"), frame(b'E', b"\0\0\0\0\0"), sync()].concat();
    rt().block_on(async {
        for session_mode in [false, true] {
            let mut c = Client::start(session_mode).await;
            assert_eq!(c.round(&[unnamed("select 'a'"), sync()].concat(), 1).await, "1 ZI");
            let fails = frame(b'B', b"\0nosuch\0\0\0\0\0\0\0"); // the server answers 26000
            assert_eq!(c.round(&[fails, unnamed("select 'b'"), sync()].concat(), 1).await, "E26000 ZI");
            c.sent();
            assert_eq!(c.round(&run(), 1).await, "2DC ZI");
            let sent = c.sent();
            assert!(sent.iter().any(|l| l == "P : select 'a'") && !sent.iter().any(|l| l.contains("'b'")), "the one before, parsed again: {sent:?}");
            // in the same batch as its Parse, nothing is parsed again
            assert_eq!(c.round(&[unnamed("select 'c'"), run()].concat(), 1).await, "12DC ZI");
            assert_eq!(c.sent().iter().filter(|l| l.starts_with("P : ")).count(), 1);
        }
    });
}

/// An unnamed Parse skipped behind an error restores the statement it replaced only if nothing
/// replaced it since: here an unnamed statement with `set_config` parameters, parsed in the next,
/// pipelined batch (it goes to the server under a name of pgtenant's, not as the unnamed one), is
/// the client's statement after the first batch fails, as on the server.
#[test]
fn a_skipped_unnamed_parse_restores_nothing_a_later_parse_replaced() {
    let unnamed = |sql: &str| frame(b'P', format!("\0{sql}\0\0\0").as_bytes());
    let mut bind = b"\0\0\0\0\0\x02".to_vec();
    for v in [&b"work_mem"[..], b"1MB"] {
        bind.extend_from_slice(&(v.len() as i32).to_be_bytes());
        bind.extend_from_slice(v);
    }
    bind.extend_from_slice(b"\0\0");
    let run = [frame(b'B', &bind), frame(b'E', b"\0\0\0\0\0"), sync()].concat();
    rt().block_on(async {
        for session_mode in [false, true] {
            let mut c = Client::start(session_mode).await;
            assert_eq!(c.round(&[unnamed("select 'a'"), sync()].concat(), 1).await, "1 ZI");
            let fails = frame(b'B', b"\0nosuch\0\0\0\0\0\0\0"); // the server answers 26000
            let batches = [fails, unnamed("select 'b'"), sync(), unnamed("select set_config($1, $2, false)"), sync()].concat();
            assert_eq!(c.round(&batches, 2).await, "E26000 ZI 1 ZI");
            c.sent();
            assert_eq!(c.round(&run, 1).await, "2DC ZI", "session mode {session_mode}");
            let sent = c.sent();
            assert!(sent.iter().any(|l| l.starts_with("B  pgtenant_s")), "the set_config statement ran: {sent:?}");
            assert!(!sent.iter().any(|l| l.contains("'a'")), "not the one before the skipped Parse: {sent:?}");
        }
    });
}

/// A simple Query that fails inside a transaction block may leave its portal behind on the server
/// under the unnamed portal's name (an Execute of it crashes PostgreSQL 15): pgtenant closes that
/// portal in front of the client's next message then, and only then; an Execute of an unnamed
/// portal the client did not bind is answered `34000` without reaching the server.
#[test]
fn a_failed_query_in_a_block_has_its_portal_closed_and_nothing_else_does() {
    rt().block_on(async {
        let mut c = Client::start(false).await;
        let closes = |sent: &[String]| sent.iter().filter(|l| *l == "C P ").count();
        assert_eq!(c.round(&q("BEGIN"), 1).await, "C ZT");
        assert_eq!(c.round(&q("select 1"), 1).await, "DC ZT");
        assert_eq!(c.round(&q("select 2"), 1).await, "DC ZT");
        assert_eq!(closes(&c.sent()), 0, "nothing after Queries that ended well");
        assert_eq!(c.round(&q("select fail"), 1).await, "EXX000 ZE");
        assert_eq!(c.sent(), ["Q select fail"]);
        assert_eq!(c.round(&[frame(b'D', b"P\0"), sync()].concat(), 1).await, "n ZE");
        let sent = c.sent();
        assert_eq!(sent, ["C P ", "D P ", "S"], "the portal is closed first, once");
        let execute = [frame(b'E', b"\0\0\0\0\0"), sync()].concat();
        assert_eq!(c.round(&execute, 1).await, "E34000 ZE");
        assert!(!c.sent().iter().any(|l| l.starts_with("E ")), "the Execute did not reach the server");
        assert_eq!(c.round(&q("ROLLBACK"), 1).await, "C ZI");
        assert_eq!(c.round(&[ext("select 3"), sync()].concat(), 1).await, "12DC ZI");
        assert_eq!(closes(&c.sent()), 0, "nothing after a Query outside a failed block");
        // a portal the client bound is its own: its Execute goes to the server
        assert_eq!(c.round(&[ext("select 4"), frame(b'E', b"\0\0\0\0\0"), sync()].concat(), 1).await, "12DCDC ZI");
    });
}

/// pgtenant learns what a Describe of a client's named statement answers from a Describe of its own
/// behind the client's Parse, whose replies the client never sees; the client's own Describe is
/// answered by the server as usual, and a second Parse of the statement learns nothing again.
#[test]
fn a_named_parse_is_described_once_unseen() {
    rt().block_on(async {
        let mut c = Client::start(false).await;
        let parse = |name: &str, sql: &str| frame(b'P', format!("{name}\0{sql}\0\0\0").as_bytes());
        let describe = |name: &str| frame(b'D', format!("S{name}\0").as_bytes());
        assert_eq!(c.round(&[parse("s1", "RESET work_mem"), sync()].concat(), 1).await, "1 ZI");
        let sent = c.sent();
        let described: Vec<_> = sent.iter().filter(|l| l.starts_with("D S pgtenant_s")).collect();
        assert_eq!(described.len(), 1, "one Describe of pgtenant's, of the statement just parsed: {sent:?}");
        assert_eq!(c.round(&[describe("s1"), sync()].concat(), 1).await, "tn ZI", "the client's own");
        let closes = [frame(b'C', b"Ss1\0"), sync()].concat();
        assert_eq!(c.round(&closes, 1).await, "3 ZI");
        c.sent();
        // a new statement of the name is a new statement: learnt once more
        assert_eq!(c.round(&[parse("s1", "select 1"), describe("s1"), sync()].concat(), 1).await, "1tn ZI");
        let sent = c.sent();
        assert_eq!(sent.iter().filter(|l| l.starts_with("D S pgtenant_s")).count(), 2, "pgtenant's and the client's: {sent:?}");
    });
}

