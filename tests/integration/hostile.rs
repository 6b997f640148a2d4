//! Malformed and hostile clients over a real socket (issue 8): garbage before the startup packet,
//! impossible and huge length fields, truncated messages, 10,000 pipelined messages, a client that
//! never reads its results, and slowloris logins. Each must end with a FATAL error or a clean close
//! within seconds, memory must stay bounded, and a well-behaved client on the same proxy must be
//! served throughout.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

fn startup_packet(user: &str, db: &str) -> Vec<u8> {
    startup_packet_with(&[("user", user), ("database", db)])
}

fn startup_packet_with(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608u32.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub(crate) fn query(sql: &str) -> Vec<u8> {
    let mut b = sql.as_bytes().to_vec();
    b.push(0);
    message(b'Q', &b)
}

/// Reads one backend message (tag, body), or None on EOF/timeout.
pub(crate) async fn read_msg(s: &mut TcpStream, timeout: Duration) -> Option<(u8, Vec<u8>)> {
    tokio::time::timeout(timeout, async {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.checked_sub(4)?];
        s.read_exact(&mut body).await.ok()?;
        Some((head[0], body))
    })
    .await
    .ok()
    .flatten()
}

/// The SQLSTATE of an ErrorResponse body.
fn sqlstate(body: &[u8]) -> String {
    body.split(|b| *b == 0)
        .find(|f| f.first() == Some(&b'C'))
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
        .unwrap_or_default()
}

/// What the proxy does next: `Err(code)` for an ErrorResponse, `Ok(())` for a close. Anything
/// else, or silence for 5 s, fails the test.
async fn expect_fatal_or_close(s: &mut TcpStream, what: &str) -> Result<Option<String>, String> {
    match read_msg(s, Duration::from_secs(5)).await {
        Some((b'E', body)) => {
            let code = sqlstate(&body);
            // after a FATAL the proxy closes
            let after = read_msg(s, Duration::from_secs(5)).await;
            ensure(after.is_none(), format!("{what}: connection still open after FATAL {code}"))?;
            Ok(Some(code))
        }
        None => Ok(None),
        Some((tag, _)) => Err(format!("{what}: unexpected message {:?}", tag as char)),
    }
}

pub(crate) async fn raw_login(p: &pgtenant::server::Running, tok: &str) -> Result<TcpStream, String> {
    raw_login_at(p.addr, tok).await
}

pub(crate) async fn raw_login_at(addr: std::net::SocketAddr, tok: &str) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(&startup_packet("alice", "app")).await.map_err(|e| e.to_string())?;
    let (tag, body) = read_msg(&mut s, Duration::from_secs(5)).await.ok_or("no auth request")?;
    ensure(tag == b'R' && body[..4] == 3u32.to_be_bytes(), "expected a cleartext password request")?;
    let mut pw = tok.as_bytes().to_vec();
    pw.push(0);
    s.write_all(&message(b'p', &pw)).await.map_err(|e| e.to_string())?;
    loop {
        match read_msg(&mut s, Duration::from_secs(5)).await {
            Some((b'Z', _)) => return Ok(s),
            Some((b'E', body)) => return Err(format!("login failed: {}", sqlstate(&body))),
            Some(_) => continue,
            None => return Err("connection closed during login".into()),
        }
    }
}

/// A well-behaved client still gets its own tenant's rows.
async fn bystander_ok(p: &pgtenant::server::Running) -> TestResult {
    let c = connect(p, &token(3, "bystander")).await.map_err(|e| format!("bystander login: {e:?}"))?;
    let (n, lo, hi) = crate::tenant_view(&c).await?;
    ensure(n == 100 && lo == 3 && hi == 3, "bystander saw wrong rows")
}

pub async fn hostile_framing_gets_fatal_or_close(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let rss_before = rss_kib();
    // garbage before the startup packet (an HTTP request, random bytes)
    for (what, bytes) in [
        ("HTTP request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("random bytes", (0..200u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()),
        ("negative startup length", vec![0xff, 0xff, 0xff, 0xf0, 0, 3, 0, 0]),
        ("zero startup length", vec![0, 0, 0, 0]),
        ("1 GiB startup length", vec![0x40, 0, 0, 0, 0, 3, 0, 0]),
    ] {
        let mut s = TcpStream::connect(p.addr).await.map_err(|e| e.to_string())?;
        s.write_all(&bytes).await.map_err(|e| e.to_string())?;
        expect_fatal_or_close(&mut s, what).await?;
    }
    // after login: impossible and huge lengths, unknown message types
    for (what, bytes, want) in [
        ("length below 4", vec![b'Q', 0, 0, 0, 2], "08P01"),
        ("negative length", vec![b'Q', 0x80, 0, 0, 0], "08P01"),
        ("1 GiB declared query", vec![b'Q', 0x40, 0, 0, 0, b'S', b'E', b'L'], "54000"),
        ("unknown message type", message(b'!', b"x"), "08P01"),
    ] {
        let mut s = raw_login(&p, &token(1, "hostile")).await?;
        s.write_all(&bytes).await.map_err(|e| e.to_string())?;
        let code = expect_fatal_or_close(&mut s, what).await?;
        ensure(code.as_deref() == Some(want), format!("{what}: got {code:?}, want FATAL {want}"))?;
    }
    // a truncated message followed by a close: the session ends, nothing leaks into the pool
    let mut s = raw_login(&p, &token(1, "trunc")).await?;
    s.write_all(&[b'Q', 0, 0, 0, 100, b'S', b'E']).await.map_err(|e| e.to_string())?;
    drop(s);
    let grown = rss_kib().saturating_sub(rss_before);
    ensure(grown < 64 * 1024, format!("hostile lengths grew memory by {grown} KiB"))?;
    bystander_ok(&p).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.proxy.shared.pool.busy_count() > 0 {
        ensure(Instant::now() < deadline, "a backend stayed leased after the hostile clients left")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.stop().await;
    Ok(())
}

pub async fn ten_thousand_pipelined_messages(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let mut s = raw_login(&p, &token(2, "pipeline")).await?;
    let mut batch = Vec::new();
    for i in 0..10_000 {
        batch.extend_from_slice(&query(if i % 2 == 0 { "SELECT 1" } else { "SELECT count(*) FROM orders" }));
    }
    let (mut rd, mut wr) = s.split();
    let write = async {
        wr.write_all(&batch).await.map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    };
    let read = async {
        let mut ready = 0;
        let mut counts_ok = 0;
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let deadline = Instant::now() + Duration::from_secs(60);
        while ready < 10_000 {
            ensure(Instant::now() < deadline, format!("only {ready} of 10,000 answered"))?;
            let n = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut chunk))
                .await
                .map_err(|_| format!("stalled after {ready} answers"))?
                .map_err(|e| e.to_string())?;
            ensure(n > 0, format!("closed after {ready} answers"))?;
            buf.extend_from_slice(&chunk[..n]);
            let mut at = 0;
            while buf.len() >= at + 5 {
                let len = u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
                if buf.len() < at + 1 + len {
                    break;
                }
                match buf[at] {
                    b'Z' => ready += 1,
                    b'E' => return Err(format!("error answer: {}", sqlstate(&buf[at + 5..at + 1 + len]))),
                    // DataRow of count(*): tenant 2 sees its 100 rows
                    b'D' if &buf[at + 11..at + 1 + len] == b"100" => counts_ok += 1,
                    _ => {}
                }
                at += 1 + len;
            }
            buf.drain(..at);
        }
        Ok::<u32, String>(counts_ok)
    };
    let (w, r) = tokio::join!(write, read);
    w?;
    let counts_ok = r?;
    ensure(counts_ok == 5_000, format!("{counts_ok} of 5,000 counts were tenant 2's 100 rows"))?;
    p.stop().await;
    Ok(())
}

pub async fn client_that_never_reads_is_bounded(env: &Env) -> TestResult {
    let p = start_proxy(env, "pool_size = 2", "").await;
    let rss_before = rss_kib();
    let mut s = raw_login(&p, &token(1, "sink")).await?;
    // ~1 GB of result rows that the client never reads
    s.write_all(&query("SELECT repeat('x', 1000) FROM generate_series(1, 1000000)")).await.map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = rss_kib().saturating_sub(rss_before);
    ensure(grown < 64 * 1024, format!("proxy buffered {grown} KiB for a client that does not read"))?;
    // the other pooled connection keeps serving
    bystander_ok(&p).await?;
    // the stuck client leaves: its backend (mid-result) is closed, never reused
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.proxy.shared.pool.busy_count() > 0 {
        ensure(Instant::now() < deadline, "the stuck client's backend was not released")?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..3 {
        bystander_ok(&p).await?;
    }
    p.stop().await;
    Ok(())
}

pub async fn slowloris_logins_do_not_block_others(env: &Env) -> TestResult {
    let text = config_text(env, "", "").replace("listen = \"127.0.0.1:0\"\n", "listen = \"127.0.0.1:0\"\nauth_timeout_ms = 1000\n");
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|e| e.to_string())?;
    let p = pgtenant::server::start(cfg).await?;
    let addr = p.addr;
    let packet = startup_packet("alice", "app");
    // 100 clients dribbling their startup packet one byte every 200 ms
    let slow: Vec<_> = (0..100)
        .map(|_| {
            let packet = packet.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let Ok(mut s) = TcpStream::connect(addr).await else { return None };
                for b in packet {
                    if s.write_all(&[b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if started.elapsed() > Duration::from_secs(10) {
                        return None;
                    }
                }
                // dropped by the proxy: reads see EOF (or an error message, then EOF)
                let mut buf = [0u8; 256];
                loop {
                    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                        Ok(Ok(_)) => continue,
                        Err(_) => return None,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    bystander_ok(&p).await?;
    ensure(started.elapsed() < Duration::from_secs(1), format!("login took {:?} under slowloris", started.elapsed()))?;
    for t in slow {
        let closed = t.await.map_err(|e| e.to_string())?.ok_or("a slowloris client was never dropped")?;
        ensure(closed < Duration::from_secs(4), format!("slowloris client dropped only after {closed:?}"))?;
    }
    p.stop().await;
    Ok(())
}

/// COPY FROM STDIN in the query that opens a transaction (the proxy holds the client's next
/// messages until that first query settles, except the COPY data it needs), then a client that
/// pipelines a query right behind CopyDone.
pub async fn copy_from_stdin_opening_a_transaction(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let mut s = raw_login(&p, &token(1, "copy")).await?;
    s.write_all(&query("BEGIN; CREATE TEMP TABLE t (a int) ON COMMIT DROP; COPY t FROM STDIN")).await.map_err(|e| e.to_string())?;
    loop {
        let (tag, body) = read_msg(&mut s, Duration::from_secs(5)).await.ok_or("no CopyInResponse (COPY data stuck?)")?;
        ensure(tag != b'E', format!("error: {}", sqlstate(&body)))?;
        if tag == b'G' {
            break;
        }
    }
    let mut data = message(b'd', b"1\n2\n");
    data.extend(message(b'd', b"3\n"));
    data.extend(message(b'c', b""));
    data.extend(query("SELECT count(*) FROM t; COMMIT"));
    s.write_all(&data).await.map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    let mut ready = 0;
    while ready < 2 {
        let (tag, body) = read_msg(&mut s, Duration::from_secs(5)).await.ok_or(format!("stalled after {seen:?}"))?;
        match tag {
            b'E' => return Err(format!("error: {}", sqlstate(&body))),
            b'C' => seen.push(String::from_utf8_lossy(&body[..body.len() - 1]).into_owned()),
            b'D' => seen.push(format!("row {}", String::from_utf8_lossy(&body[6..]))),
            b'Z' => {
                ready += 1;
                seen.push(format!("ready {}", body[0] as char));
            }
            _ => {}
        }
    }
    let want = ["COPY 3", "ready T", "row 3", "SELECT 1", "COMMIT", "ready I"];
    ensure(seen == want, format!("got {seen:?}"))?;
    p.stop().await;
    Ok(())
}

/// Settings that would make the server read SQL differently from the guard's lexer are refused:
/// `standard_conforming_strings = off` (then `'a\' '` hides a statement inside what looks like a
/// literal) and client encodings whose characters may contain a backslash byte (SJIS and friends).
pub async fn lexer_changing_settings_are_refused(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(1, "lexer")).await.map_err(|e| format!("{e:?}"))?;
    for sql in [
        "BEGIN; SET LOCAL standard_conforming_strings = off",
        "SET standard_conforming_strings TO off",
        "select set_config('standard_conforming_strings', 'off', false)",
        "SET NAMES 'SJIS'",
        "SET client_encoding TO 'GBK'",
    ] {
        let e = c.simple_query(sql).await.err().ok_or(format!("accepted: {sql}"))?;
        let (code, msg) = db_err(&e);
        ensure(code == "42501" && msg.contains("how SQL is read"), format!("{sql}: {code} {msg}"))?;
        let _ = c.simple_query("ROLLBACK").await;
    }
    // the follow-up of the exploit, on its own, is only a string literal plus a refused set_config
    let e = c.simple_query("select 'a\\' ' ; select set_config('app.tenant_id','2',true); -- '").await.err();
    ensure(e.is_some(), "the literal trick ran")?;
    let (n, lo, hi) = crate::tenant_view(&c).await?;
    ensure(n == 100 && lo == 1 && hi == 1, "tenant 1 client saw other rows")?;
    // harmless values still work
    c.simple_query("SET standard_conforming_strings = on").await.map_err(|e| format!("{e:?}"))?;
    c.simple_query("SET client_encoding = 'UTF8'").await.map_err(|e| format!("{e:?}"))?;
    // a startup packet asking for SJIS is refused at login
    let mut s = TcpStream::connect(p.addr).await.map_err(|e| e.to_string())?;
    let packet = startup_packet_with(&[("user", "alice"), ("database", "app"), ("client_encoding", "SJIS")]);
    s.write_all(&packet).await.map_err(|e| e.to_string())?;
    let (tag, _) = read_msg(&mut s, Duration::from_secs(5)).await.ok_or("no auth request")?;
    ensure(tag == b'R', "expected an auth request")?;
    let mut pw = token(1, "sjis").into_bytes();
    pw.push(0);
    s.write_all(&message(b'p', &pw)).await.map_err(|e| e.to_string())?;
    let code = expect_fatal_or_close(&mut s, "SJIS startup").await?;
    ensure(code.as_deref() == Some("42501"), format!("SJIS startup: {code:?}"))?;
    p.stop().await;
    Ok(())
}
