//! Bounded sessions (issue 19): a client that stops reading (or half-closes its socket and never
//! reads) must not keep a pooled backend beyond `server.client_write_timeout_ms`, and the
//! per-session collections (session settings, named portals) are capped with clear errors.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::common::*;
use crate::hostile::{query, raw_login, raw_login_at, read_msg};
use crate::tenancy::{audit_lines, bypass_token, BYPASS_SECRET};

#[path = "../isolation/wire.rs"]
mod wire;
use wire::Wire;

/// A proxy with one backend and a 1 s client write timeout.
async fn one_backend_proxy(env: &Env) -> pgtenant::server::Running {
    let text = config_text(env, "pool_size = 1", "")
        .replace("listen = \"127.0.0.1:0\"\n", "listen = \"127.0.0.1:0\"\nclient_write_timeout_ms = 1000\n");
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).expect("test config");
    pgtenant::server::start(cfg).await.expect("proxy starts")
}

/// A second client gets the only backend (and its own tenant's rows) soon after a stuck client
/// took it: within the 1 s write timeout plus slack, well under the 5 s pool wait timeout.
async fn backend_comes_back(p: &pgtenant::server::Running, what: &str) -> TestResult {
    let started = Instant::now();
    let c = connect(p, &token(3, "next")).await.map_err(|e| format!("{what}: login: {e:?}"))?;
    let (n, lo, hi) = crate::tenant_view(&c).await.map_err(|e| format!("{what}: {e}"))?;
    ensure(n == 100 && lo == 3 && hi == 3, format!("{what}: wrong rows"))?;
    let waited = started.elapsed();
    ensure(waited < Duration::from_secs(4), format!("{what}: the next client waited {waited:?} for the backend"))
}

pub async fn stuck_clients_do_not_pin_the_backend(env: &Env) -> TestResult {
    let p = one_backend_proxy(env).await;
    let big = query("SELECT repeat('x', 1000) FROM generate_series(1, 1000000)");
    // sends a query with ~1 GB of output, half-closes its socket and never reads
    let mut half = raw_login(&p, &token(1, "half-closed")).await?;
    half.write_all(&big).await.map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    half.shutdown().await.map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    backend_comes_back(&p, "after a half-closed client").await?;
    // sends the same query and simply never reads (the socket stays open)
    let mut silent = raw_login(&p, &token(2, "silent")).await?;
    silent.write_all(&big).await.map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    backend_comes_back(&p, "after a client that stopped reading").await?;
    // the stuck sessions are gone (their sockets are still open) and no backend stays leased
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.proxy.shared.pool.busy_count() > 0 || p.proxy.clients.load(std::sync::atomic::Ordering::Acquire) > 0 {
        ensure(Instant::now() < deadline, "a stuck session or its backend stayed")?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop((half, silent));
    p.stop().await;
    Ok(())
}

/// Session-level SETs stop at `MAX_CONTEXT_SETTINGS` settings in the context (54000, the session
/// goes on, and transactions keep their context); an existing name can still change, and RESET
/// makes room.
pub async fn session_settings_are_capped(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(1, "setter")).await.map_err(|e| format!("{e:?}"))?;
    let mut accepted = 0;
    let mut refusal = None;
    for i in 0..200 {
        match c.simple_query(&format!("SET my.s{i} = 'v{i}'")).await {
            Ok(_) => accepted += 1,
            Err(e) => {
                refusal = Some(db_err(&e));
                break;
            }
        }
    }
    let (code, msg) = refusal.ok_or(format!("all {accepted} session settings were accepted"))?;
    ensure(code == "54000" && msg.contains("more than 126 settings"), format!("after {accepted}: {code} {msg}"))?;
    ensure((100..126).contains(&accepted), format!("{accepted} settings accepted before the limit"))?;
    // the session goes on: its settings and tenant context hold in the next transactions
    let (n, lo, hi) = crate::tenant_view(&c).await?;
    ensure(n == 100 && lo == 1 && hi == 1, "wrong rows after the refusal")?;
    let last = format!("my.s{}", accepted - 1);
    let v = c.query_one(&format!("select current_setting('{last}')"), &[]).await.map_err(|e| format!("{e:?}"))?;
    ensure(v.get::<_, String>(0) == format!("v{}", accepted - 1), "a kept setting was lost")?;
    c.simple_query("SET my.s0 = 'changed'").await.map_err(|e| format!("changing a kept setting: {e:?}"))?;
    c.simple_query("RESET my.s1").await.map_err(|e| format!("{e:?}"))?;
    c.simple_query("SET my.new = 'fits'").await.map_err(|e| format!("after RESET: {e:?}"))?;
    let v = c.query_one("select current_setting('my.s0'), current_setting('my.new')", &[]).await.map_err(|e| format!("{e:?}"))?;
    ensure((v.get::<_, String>(0), v.get::<_, String>(1)) == ("changed".into(), "fits".into()), "settings after RESET")?;
    p.stop().await;
    Ok(())
}

/// A Bind of one named portal more than `MAX_PORTALS` is refused with 54000 (it used to be run by
/// the server but not recorded, so an Execute of it was classified and audited as nothing).
pub async fn named_portals_are_capped(env: &Env) -> TestResult {
    let p = start_proxy(env, "", "").await;

    let mut w = Wire::connect(p.addr, &token(1, "portals")).await?;
    let r = w.simple("BEGIN").await;
    ensure(r.ok(), format!("BEGIN: {}", r.summary()))?;
    let mut batch = vec![wire::parse("", "SELECT 1", &[])];
    for i in 0..=10_000 {
        batch.push(wire::bind(&format!("p{i}"), "", &[]));
    }
    batch.push(wire::sync());
    let r = w.round(&batch.concat(), 1).await;
    let codes: Vec<&str> = r.errors.iter().map(|e| e.code.as_str()).collect();
    ensure(codes == ["54000"] && r.errors[0].message.contains("too many open portals"), format!("10,001 portals: {}", r.summary()))?;
    ensure(r.status() == b'E', format!("the refused Bind did not fail the transaction: {}", r.summary()))?;
    let r = w.simple("ROLLBACK").await;
    ensure(r.ok() && r.status() == b'I', format!("ROLLBACK: {}", r.summary()))?;
    // the portals died with the transaction: the next one may bind again
    let r = w.round(&[wire::query("BEGIN"), wire::parse("", "SELECT 1", &[]), wire::bind("again", "", &[]), wire::execute("again", 0), wire::sync(), wire::query("COMMIT")].concat(), 3).await;
    ensure(r.ok() && r.rows.len() == 1, format!("after the limit: {}", r.summary()))?;
    w.close().await;
    p.stop().await;
    Ok(())
}

/// A bypass Execute of a portal pgtenant did not bind (a SQL cursor) is audited by the portal's
/// name, never as an empty statement.
pub async fn bypass_execute_of_unknown_portal_is_audited_by_name(env: &Env) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let audit = dir.path().join("audit.jsonl");
    let p = start_proxy(env, "", &bypass_sections(env, &audit)?).await;

    let worker = bypass_token(serde_json::json!({ "role": "service", "sub": "worker-portals", "exp": now() + 600 }));
    let mut w = Wire::connect(p.addr, &worker).await?;
    let r = w.simple("BEGIN; DECLARE pgt_cursor CURSOR FOR SELECT tenant_id FROM orders ORDER BY 1 LIMIT 2").await;
    ensure(r.ok(), format!("DECLARE: {}", r.summary()))?;
    let r = w.round(&[wire::execute("pgt_cursor", 0), wire::sync()].concat(), 1).await;
    ensure(r.ok() && r.rows.len() == 2, format!("Execute of the cursor: {}", r.summary()))?;
    let r = w.simple("COMMIT").await;
    ensure(r.ok(), format!("COMMIT: {}", r.summary()))?;
    w.close().await;
    let lines = audit_lines(&audit);
    let ext: Vec<_> = lines.iter().filter(|l| l["event"] == "bypass_statement" && l["protocol"] == "extended").collect();
    ensure(
        ext.len() == 1 && ext[0]["portal"] == "pgt_cursor" && ext[0]["statement"].is_null() && ext[0]["fingerprint"].is_null(),
        format!("extended bypass records: {ext:?}"),
    )?;
    p.stop().await;
    Ok(())
}

/// Config sections for a bypass pool (role `worker`, created if needed) audited to `audit`.
fn bypass_sections(env: &Env, audit: &std::path::Path) -> Result<String, String> {
    let _ = env.cluster.psql("app", "CREATE ROLE worker LOGIN PASSWORD 'worker-secret' BYPASSRLS");
    env.cluster
        .psql("app", "GRANT USAGE ON SCHEMA public TO worker; GRANT SELECT, UPDATE ON orders TO worker")
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "[bypass]\nenabled = true\nurl = \"{}\"\n[bypass.jwt]\nsecret = \"{BYPASS_SECRET}\"\n[audit]\npath = \"{}\"",
        env.cluster.url("worker", "worker-secret", "app"),
        audit.display()
    ))
}

/// An audit log whose writes block (a pipe nobody reads) must not stall the proxy: audit records
/// are written off the runtime's threads, bypass statements whose record is not acknowledged in
/// `audit.write_timeout_ms` are refused with 58030, and tenant sessions go on. Clients run on a
/// runtime of their own, so a stalled proxy runtime shows as a timeout instead of a hung test.
pub async fn stuck_audit_log_stalls_nobody_else(env: &Env) -> TestResult {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let fifo = dir.path().join("audit.fifo");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated path
    ensure(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } == 0, "mkfifo failed")?;
    // a reader that does not read: once the pipe's buffer is full, every write blocks
    let mut reader = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).map_err(|e| e.to_string())?;
    let extra = format!("{}\nwrite_timeout_ms = 1000", bypass_sections(env, &fifo)?);
    let p = start_proxy(env, "", &extra).await;
    let addr = p.addr;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("client runtime");
        let result = rt.block_on(async move {
            let login = |tok: String| async move {
                let mut cfg = tokio_postgres::Config::new();
                cfg.host("127.0.0.1").port(addr.port()).user("alice").dbname("app").password(tok);
                let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.map_err(|e| format!("login: {e:?}"))?;
                tokio::spawn(conn);
                Ok::<_, String>(c)
            };
            let tenant = login(token(1, "bystander")).await?;
            let worker = |n: u32| bypass_token(serde_json::json!({ "role": "service", "sub": format!("w{n}"), "exp": now() + 600 }));
            // statements whose records are ~1 KB each (the fingerprint keeps the column names)
            let sql: String = format!("select {}", (0..150).map(|i| format!("{i} as column_number_{i}")).collect::<Vec<_>>().join(", "));
            let mut loops = Vec::new();
            for n in 0..2 {
                let w = login(worker(n)).await?;
                let sql = sql.clone();
                loops.push(tokio::spawn(async move {
                    for _ in 0..500 {
                        match tokio::time::timeout(Duration::from_secs(10), w.simple_query(&sql)).await {
                            Err(_) => return Err("a bypass statement hung (no answer in 10 s)".to_string()),
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => return Ok(db_err(&e)),
                        }
                    }
                    Err("500 bypass statements ran while the audit log could not take them".to_string())
                }));
            }
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let started = Instant::now();
            let view = tokio::time::timeout(Duration::from_secs(3), crate::tenant_view(&tenant)).await;
            let waited = started.elapsed();
            match view {
                Ok(Ok((100, 1, 1))) => {}
                Ok(other) => return Err(format!("tenant query: {other:?}")),
                Err(_) => return Err(format!("a tenant query stalled ({waited:?}) while the audit log was stuck")),
            }
            for l in loops {
                let (code, msg) = l.await.map_err(|e| e.to_string())??;
                if code != "58030" || !msg.contains("audit log cannot be written") {
                    return Err(format!("bypass statement: {code} {msg}"));
                }
            }
            Ok(())
        });
        let _ = tx.send(result);
    });
    // blocking waits here are fine: this future runs on the test's own thread, not a worker
    let result = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| Err("the clients never finished".into()));
    // unstick the writer (and, before the fix, the runtime) so the proxy can stop
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let draining = stop.clone();
    let drainer = std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = vec![0u8; 1 << 16];
        while !draining.load(std::sync::atomic::Ordering::Relaxed) {
            if !matches!(reader.read(&mut buf), Ok(n) if n > 0) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    p.stop().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = drainer.join();
    result
}

/// A KiB figure from /proc/<pid>/status (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// Reads a simple query's answer up to ReadyForQuery without holding large messages: each
/// message as (tag, body length, last body byte).
async fn read_answer_streaming(s: &mut tokio::net::TcpStream) -> Result<Vec<(u8, usize, u8)>, String> {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut head = Vec::with_capacity(5);
    let (mut left, mut len, mut last) = (0usize, 0usize, 0u8);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .map_err(|_| format!("stalled after {seen:?}"))?
            .map_err(|e| e.to_string())?;
        ensure(n > 0, format!("closed after {seen:?}"))?;
        let mut at = 0;
        while at < n {
            if left == 0 && head.len() < 5 {
                head.push(buf[at]);
                at += 1;
                if head.len() == 5 {
                    len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
                    left = len;
                }
            } else {
                let take = left.min(n - at);
                at += take;
                left -= take;
                last = buf[at - 1];
            }
            if head.len() == 5 && left == 0 {
                seen.push((head[0], len, if len > 0 { last } else { 0 }));
                if head[0] == b'Z' {
                    return Ok(seen);
                }
                head.clear();
            }
        }
    }
}

/// A 200 MB row through the pgtenant binary: the proxy streams it (header, then the body as it
/// arrives) instead of holding it whole, so its peak resident memory grows by less than 32 MiB.
pub async fn wide_row_streams_through_bounded_memory(env: &Env) -> TestResult {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let file = dir.path().join("pgtenant.toml");
    std::fs::write(&file, config_text(env, "", "")).map_err(|e| e.to_string())?;
    let (mut child, rx) = spawn_binary(&file)?;
    let pid = child.id();
    let result = async {
        let port = loop {
            let line = rx.recv_timeout(Duration::from_secs(10)).map_err(|_| "binary did not start")?;
            if let Some(i) = line.find("listen=127.0.0.1:") {
                break line[i + 17..].split_whitespace().next().unwrap_or("").parse::<u16>().map_err(|e| e.to_string())?;
            }
        };
        let mut s = raw_login_at(([127, 0, 0, 1], port).into(), &token(1, "wide")).await?;
        // warm up: an ordinary result, so the relay buffers exist before the measurement
        s.write_all(&query("SELECT repeat('y', 100000) FROM generate_series(1, 20)")).await.map_err(|e| e.to_string())?;
        while read_msg(&mut s, Duration::from_secs(10)).await.ok_or("warm-up answer lost")?.0 != b'Z' {}
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5"); // restart the peak (VmHWM)
        let before = status_kib(pid, "VmRSS");
        s.write_all(&query("SELECT repeat('x', 200000000)")).await.map_err(|e| e.to_string())?;
        let seen = read_answer_streaming(&mut s).await?;
        let peak = status_kib(pid, "VmHWM");
        let tags: String = seen.iter().map(|(t, _, _)| *t as char).collect();
        ensure(tags == "TDCZ", format!("answer: {seen:?}"))?;
        // DataRow body: column count (2), value length (4), the value; it ends in 'x'
        ensure(seen[1].1 == 200_000_000 + 6 && seen[1].2 == b'x', format!("row: {:?}", seen[1]))?;
        let grown = peak.saturating_sub(before);
        println!("    a 200 MB row: proxy VmRSS before {before} KiB, VmHWM after {peak} KiB (+{grown} KiB)");
        ensure(before > 0 && grown < 32 * 1024, format!("proxy peak memory grew by {grown} KiB (from {before} KiB) for a 200 MB row"))?;
        // the session goes on normally afterwards
        s.write_all(&query("SELECT count(*) FROM orders")).await.map_err(|e| e.to_string())?;
        let seen = read_answer_streaming(&mut s).await?;
        ensure(seen.iter().map(|(t, _, _)| *t as char).collect::<String>() == "TDCZ", format!("after: {seen:?}"))
    }
    .await;
    // SAFETY: signalling our own child
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    result
}

/// Rows and COPY data larger than the streaming threshold arrive intact, through both protocols,
/// in a transaction with the context in front, and the session goes on in step afterwards.
pub async fn wide_rows_and_copy_data_arrive_intact(env: &Env) -> TestResult {
    use futures::StreamExt;
    let p = start_proxy(env, "", "").await;
    let c = connect(&p, &token(2, "wide")).await.map_err(|e| format!("{e:?}"))?;
    for _ in 0..3 {
        let rows = c
            .query("select repeat(i::text, 300000 + i), current_setting('app.tenant_id') from generate_series(1, 5) i", &[])
            .await
            .map_err(|e| format!("{e:?}"))?;
        ensure(rows.len() == 5, format!("{} rows", rows.len()))?;
        for (i, r) in rows.iter().enumerate() {
            let (v, t): (String, String) = (r.get(0), r.get(1));
            let d = (i + 1).to_string();
            ensure(v.len() == 300_000 + i + 1 && v.chars().all(|ch| ch.to_string() == d) && t == "2", format!("row {i} damaged"))?;
        }
        let msgs = c.simple_query("select repeat('s', 2000000)").await.map_err(|e| format!("{e:?}"))?;
        let big = msgs.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::len),
            _ => None,
        });
        ensure(big == Some(2_000_000), format!("simple wide row: {big:?}"))?;
        let copy = c
            .copy_out("COPY (select repeat('z', 400000) from generate_series(1, 4)) TO STDOUT")
            .await
            .map_err(|e| format!("{e:?}"))?;
        let chunks: Vec<_> = copy.collect().await;
        let bytes: usize = chunks.into_iter().map(|b| b.map(|b| b.len())).sum::<Result<usize, _>>().map_err(|e| format!("{e:?}"))?;
        ensure(bytes == 4 * 400_001, format!("COPY OUT: {bytes} bytes"))?;
        let (n, lo, hi) = crate::tenant_view(&c).await?;
        ensure(n == 100 && lo == 2 && hi == 2, "wrong rows after wide results")?;
    }
    p.stop().await;
    Ok(())
}
