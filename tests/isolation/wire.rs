//! A small raw Postgres wire-protocol client for adversarial tests: it sends whatever frontend
//! messages a test builds (in any order, pipelined, without Sync, FunctionCall …) and reads the
//! backend messages back with a timeout, so a hang is reported instead of blocking the run.
//!
//! pgtenant asks for a cleartext password at login; the password is the JWT.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a read waits for the next message by default.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// An ErrorResponse (or NoticeResponse), by its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgErr {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for PgErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}

/// What the backend sent in answer to one or more batches.
#[derive(Debug, Default, Clone)]
pub struct Reply {
    /// Every DataRow, as text (NULL is None).
    pub rows: Vec<Vec<Option<String>>>,
    pub errors: Vec<PgErr>,
    /// CommandComplete tags.
    pub tags: Vec<String>,
    /// FunctionCallResponse values.
    pub results: Vec<Option<Vec<u8>>>,
    /// The status of every ReadyForQuery, in order.
    pub readies: Vec<u8>,
    /// Every message tag received, in order (for messages in failure reports).
    pub trace: String,
    /// ParameterStatus messages, in order.
    pub params: Vec<(String, String)>,
    /// NotificationResponses: (process id, channel, payload).
    pub notifications: Vec<(i32, String, String)>,
    /// The connection was closed by the other side.
    pub closed: bool,
    /// The wait ended before the expected ReadyForQuery messages arrived.
    pub timed_out: bool,
}

impl Reply {
    /// SQLSTATE of the first error.
    pub fn code(&self) -> Option<&str> {
        self.errors.first().map(|e| e.code.as_str())
    }
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && !self.closed && !self.timed_out
    }
    /// Status of the last ReadyForQuery (0 when none arrived).
    pub fn status(&self) -> u8 {
        self.readies.last().copied().unwrap_or(0)
    }
    /// Column `col` of row `row`, "NULL" for NULL and "" when absent.
    pub fn get(&self, row: usize, col: usize) -> String {
        match self.rows.get(row).and_then(|r| r.get(col)) {
            Some(Some(v)) => v.clone(),
            Some(None) => "NULL".into(),
            None => String::new(),
        }
    }
    /// One line for logs: errors, tags, statuses, and how it ended.
    pub fn summary(&self) -> String {
        let errs: Vec<String> = self.errors.iter().map(|e| e.to_string()).collect();
        format!(
            "errors [{}], tags {:?}, rows {}, ready {:?}{}{} (trace {})",
            errs.join("; "),
            self.tags,
            self.rows.len(),
            String::from_utf8_lossy(&self.readies),
            if self.closed { ", CLOSED" } else { "" },
            if self.timed_out { ", TIMED OUT" } else { "" },
            self.trace
        )
    }
}

// ---- frontend messages ---------------------------------------------------------------------

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// A frontend message: tag, length, body.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    msg(b'Q', &b)
}

pub fn parse(name: &str, sql: &str, param_types: &[u32]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&(param_types.len() as i16).to_be_bytes());
    for t in param_types {
        b.extend_from_slice(&t.to_be_bytes());
    }
    msg(b'P', &b)
}

/// Bind with text-format parameters and text results.
pub fn bind(portal: &str, statement: &str, params: &[Option<&str>]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, statement);
    b.extend_from_slice(&0i16.to_be_bytes()); // all parameters in text
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        match p {
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v.as_bytes());
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    b.extend_from_slice(&0i16.to_be_bytes()); // all results in text
    msg(b'B', &b)
}

/// Describe a statement (`b'S'`) or a portal (`b'P'`).
pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    cstr(&mut b, name);
    msg(b'D', &b)
}

pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    b.extend_from_slice(&max_rows.to_be_bytes());
    msg(b'E', &b)
}

/// Close a statement (`b'S'`) or a portal (`b'P'`).
pub fn close(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    cstr(&mut b, name);
    msg(b'C', &b)
}

pub fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

pub fn flush() -> Vec<u8> {
    msg(b'H', &[])
}

pub fn terminate() -> Vec<u8> {
    msg(b'X', &[])
}

/// FunctionCall: function `oid`, every argument in `arg_format` (0 text, 1 binary), the result in
/// `result_format`.
pub fn function_call(oid: u32, args: &[Option<&[u8]>], arg_format: i16, result_format: i16) -> Vec<u8> {
    function_call_formats(oid, &[arg_format], args, result_format)
}

/// FunctionCall with the argument format codes given as they are (none: all text; one: for every
/// argument; else one per argument, or a wrong number of them).
pub fn function_call_formats(oid: u32, formats: &[i16], args: &[Option<&[u8]>], result_format: i16) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&oid.to_be_bytes());
    b.extend_from_slice(&(formats.len() as i16).to_be_bytes());
    for f in formats {
        b.extend_from_slice(&f.to_be_bytes());
    }
    b.extend_from_slice(&(args.len() as i16).to_be_bytes());
    for a in args {
        match a {
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v);
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    b.extend_from_slice(&result_format.to_be_bytes());
    msg(b'F', &b)
}

/// CopyData (frontend, during COPY FROM STDIN).
pub fn copy_data(data: &[u8]) -> Vec<u8> {
    msg(b'd', data)
}

/// CopyDone.
pub fn copy_done() -> Vec<u8> {
    msg(b'c', &[])
}

/// CopyFail with `reason`.
pub fn copy_fail(reason: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, reason);
    msg(b'f', &b)
}

/// FunctionCall with text arguments and a text result.
pub fn call(oid: u32, args: &[&str]) -> Vec<u8> {
    let args: Vec<Option<&[u8]>> = args.iter().map(|a| Some(a.as_bytes())).collect();
    function_call(oid, &args, 0, 0)
}

/// A CancelRequest (sent on a connection of its own, instead of a startup packet).
pub fn cancel_request(pid: i32, secret: i32) -> Vec<u8> {
    [&16i32.to_be_bytes()[..], &80877102i32.to_be_bytes(), &pid.to_be_bytes(), &secret.to_be_bytes()].concat()
}

/// One unnamed Parse/Bind/Describe/Execute of `sql`, without Sync.
pub fn unnamed(sql: &str) -> Vec<u8> {
    [parse("", sql, &[]), bind("", "", &[]), describe(b'P', ""), execute("", 0)].concat()
}

/// One extended-protocol batch: Parse/Bind/Describe/Execute of `sql`, then Sync.
pub fn extended(sql: &str) -> Vec<u8> {
    [unnamed(sql), sync()].concat()
}

// ---- the connection ------------------------------------------------------------------------

pub struct Wire {
    s: TcpStream,
    buf: Vec<u8>,
    /// The process id pgtenant announced in BackendKeyData (a virtual one in transaction mode,
    /// the backend's in session mode).
    pub key_pid: i32,
    /// The secret key announced in BackendKeyData (pgtenant's own).
    pub key_secret: i32,
    /// The ParameterStatus messages of the login, in order.
    pub params: Vec<(String, String)>,
}

impl Wire {
    /// Logs in as `alice` on database `app` with `token` as the password.
    pub async fn connect(addr: SocketAddr, token: &str) -> Result<Wire, String> {
        Self::login(addr, &[("user", "alice"), ("database", "app")], token).await
    }

    /// Startup with `params`, answers the cleartext password request, waits for ReadyForQuery.
    pub async fn login(addr: SocketAddr, params: &[(&str, &str)], password: &str) -> Result<Wire, String> {
        let s = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        let mut w = Wire { s, buf: Vec::new(), key_pid: 0, key_secret: 0, params: Vec::new() };
        let mut body = 196608i32.to_be_bytes().to_vec();
        for (k, v) in params {
            cstr(&mut body, k);
            cstr(&mut body, v);
        }
        body.push(0);
        let mut startup = (body.len() as i32 + 4).to_be_bytes().to_vec();
        startup.extend_from_slice(&body);
        w.send(&startup).await?;
        let mut scram: Option<postgres_protocol::authentication::sasl::ScramSha256> = None;
        loop {
            let (tag, body) = w.read_msg(TIMEOUT).await?.ok_or("closed during login")?;
            match tag {
                b'R' => match i32::from_be_bytes(body[..4].try_into().unwrap()) {
                    0 => {}
                    3 => {
                        let mut p = Vec::new();
                        cstr(&mut p, password);
                        w.send(&msg(b'p', &p)).await?;
                    }
                    // SCRAM-SHA-256, for a connection straight to the server (the differential tests)
                    10 => {
                        let s = postgres_protocol::authentication::sasl::ScramSha256::new(
                            password.as_bytes(),
                            postgres_protocol::authentication::sasl::ChannelBinding::unsupported(),
                        );
                        let mut p = Vec::new();
                        cstr(&mut p, "SCRAM-SHA-256");
                        p.extend_from_slice(&(s.message().len() as i32).to_be_bytes());
                        p.extend_from_slice(s.message());
                        w.send(&msg(b'p', &p)).await?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().ok_or("SASLContinue without SASL")?;
                        s.update(&body[4..]).map_err(|e| format!("SCRAM: {e}"))?;
                        w.send(&msg(b'p', s.message())).await?;
                    }
                    12 => {
                        let mut s = scram.take().ok_or("SASLFinal without SASL")?;
                        s.finish(&body[4..]).map_err(|e| format!("SCRAM: {e}"))?;
                    }
                    n => return Err(format!("unsupported authentication request {n}")),
                },
                b'K' => {
                    w.key_pid = i32::from_be_bytes(body[..4].try_into().unwrap());
                    w.key_secret = i32::from_be_bytes(body[4..8].try_into().unwrap());
                }
                b'S' => w.params.push(parameter_status(&body)),
                b'E' => return Err(format!("login refused: {}", parse_error(&body))),
                b'Z' => return Ok(w),
                _ => {}
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.s.write_all(bytes).await.map_err(|e| format!("send: {e}"))
    }

    /// Several messages in one write (a pipeline).
    pub async fn send_all(&mut self, parts: &[Vec<u8>]) -> Result<(), String> {
        self.send(&parts.concat()).await
    }

    /// The next backend message; None when the connection closed; Err on timeout.
    pub async fn read_msg(&mut self, timeout: Duration) -> Result<Option<(u8, Vec<u8>)>, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() > len {
                    let tag = self.buf[0];
                    let body = self.buf[5..1 + len].to_vec();
                    self.buf.drain(..1 + len);
                    return Ok(Some((tag, body)));
                }
            }
            let mut chunk = [0u8; 65536];
            match tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await {
                Err(_) => return Err("timed out".into()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until `n` ReadyForQuery messages arrived, the connection closed, or `timeout` passed
    /// without the next message.
    pub async fn ready_n(&mut self, n: usize, timeout: Duration) -> Reply {
        let mut r = Reply::default();
        while r.readies.len() < n {
            match self.read_msg(timeout).await {
                Err(_) => {
                    r.timed_out = true;
                    break;
                }
                Ok(None) => {
                    r.closed = true;
                    break;
                }
                Ok(Some((tag, body))) => record(&mut r, tag, &body),
            }
        }
        r
    }

    /// Reads everything that arrives within `wait` (for messages sent with no Sync behind them).
    pub async fn drain_for(&mut self, wait: Duration) -> Reply {
        let mut r = Reply::default();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_msg(left).await {
                Err(_) => break,
                Ok(None) => {
                    r.closed = true;
                    break;
                }
                Ok(Some((tag, body))) => record(&mut r, tag, &body),
            }
        }
        r
    }

    /// Sends `bytes` (ending in `n` Sync/Query/FunctionCall) and reads the `n` replies.
    pub async fn round(&mut self, bytes: &[u8], n: usize) -> Reply {
        if let Err(e) = self.send(bytes).await {
            return Reply { closed: true, trace: e, ..Default::default() };
        }
        self.ready_n(n, TIMEOUT).await
    }

    /// A simple Query.
    pub async fn simple(&mut self, sql: &str) -> Reply {
        self.round(&query(sql), 1).await
    }

    /// One extended-protocol batch of `sql`.
    pub async fn ext(&mut self, sql: &str) -> Reply {
        self.round(&extended(sql), 1).await
    }

    /// A FunctionCall with text arguments.
    pub async fn call(&mut self, oid: u32, args: &[&str]) -> Reply {
        self.round(&call(oid, args), 1).await
    }

    /// Terminate, then close the socket.
    pub async fn close(mut self) {
        let _ = self.s.write_all(&terminate()).await;
        let _ = self.s.shutdown().await;
    }
}

fn record(r: &mut Reply, tag: u8, body: &[u8]) {
    r.trace.push(tag as char);
    match tag {
        b'E' => r.errors.push(parse_error(body)),
        b'C' => r.tags.push(String::from_utf8_lossy(body.split(|&b| b == 0).next().unwrap_or_default()).into_owned()),
        b'D' => r.rows.push(parse_row(body)),
        b'Z' => r.readies.push(body.first().copied().unwrap_or(0)),
        b'S' => r.params.push(parameter_status(body)),
        b'A' => {
            let mut parts = body[4..].split(|&b| b == 0).map(|p| String::from_utf8_lossy(p).into_owned());
            let pid = i32::from_be_bytes(body[..4].try_into().unwrap());
            r.notifications.push((pid, parts.next().unwrap_or_default(), parts.next().unwrap_or_default()));
        }
        b'V' => {
            let len = i32::from_be_bytes(body[..4].try_into().unwrap());
            r.results.push((len >= 0).then(|| body[4..4 + len as usize].to_vec()));
        }
        _ => {}
    }
}

/// A ParameterStatus body: (name, value).
pub fn parameter_status(body: &[u8]) -> (String, String) {
    let mut parts = body.split(|&b| b == 0).map(|p| String::from_utf8_lossy(p).into_owned());
    (parts.next().unwrap_or_default(), parts.next().unwrap_or_default())
}

pub fn parse_error(body: &[u8]) -> PgErr {
    let mut e = PgErr { severity: String::new(), code: String::new(), message: String::new() };
    for field in body.split(|&b| b == 0) {
        let Some((&k, v)) = field.split_first() else { continue };
        let v = String::from_utf8_lossy(v).into_owned();
        match k {
            b'S' => e.severity = v,
            b'C' => e.code = v,
            b'M' => e.message = v,
            _ => {}
        }
    }
    e
}

fn parse_row(body: &[u8]) -> Vec<Option<String>> {
    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let mut row = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
        at += 4;
        if len < 0 {
            row.push(None);
        } else {
            row.push(Some(String::from_utf8_lossy(&body[at..at + len as usize]).into_owned()));
            at += len as usize;
        }
    }
    row
}
