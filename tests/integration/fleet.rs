//! A fleet of pgtenant instances in front of one Postgres (issue 18): a CancelRequest that reaches
//! the wrong instance is forwarded to the one that owns the session and cancels its query
//! (`57014`), in both pool modes; forged keys cancel nothing; a forwarded request is never
//! forwarded again, even when `[peers]` points the wrong way; the instance id is exported; and
//! processes on one host share one port (`server.so_reuseport`), forwarding cancels to each
//! other's own address (`server.peer_listen`).

mod common;
#[path = "../isolation/wire.rs"]
mod wire;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wire::Wire;

fn main() {
    run_all(tests![
        a_cancel_sent_to_another_instance_cancels_the_query,
        forged_keys_cancel_nothing,
        a_forwarded_cancel_is_never_forwarded_again,
        the_instance_id_is_exported,
        instances_on_one_host_share_a_port,
    ]);
}

/// Free ports for `n` instances (bound and released: instances must know each other's addresses
/// before they start).
async fn free_ports(n: usize) -> Vec<u16> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    held.iter().map(|l| l.local_addr().expect("addr").port()).collect()
}

/// Starts instance `id` (1-based) listening on `ports[id - 1]`, with `peers` as its `[peers]` table.
async fn instance(env: &Env, id: usize, port: u16, peers: &[(usize, u16)], mode: &str) -> pgtenant::server::Running {
    let table: String = peers.iter().map(|(i, p)| format!("{i} = \"127.0.0.1:{p}\"\n")).collect();
    let text = config_text(env, "pool_size = 3", &format!("[pool]\nmode = \"{mode}\"\n[peers]\n{table}"))
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\"\npeer_id = {id}"));
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).unwrap_or_else(|e| panic!("fleet config invalid: {e}"));
    pgtenant::server::start(cfg).await.expect("instance starts")
}

/// `n` instances, each with the full `[peers]` table (its own entry included, as a shared
/// ConfigMap would have it).
async fn fleet(env: &Env, n: usize, mode: &str) -> Vec<pgtenant::server::Running> {
    let ports = free_ports(n).await;
    let table: Vec<(usize, u16)> = ports.iter().enumerate().map(|(i, p)| (i + 1, *p)).collect();
    let mut running = Vec::new();
    for (id, port) in &table {
        running.push(instance(env, *id, *port, &table, mode).await);
    }
    running
}

async fn stop(instances: Vec<pgtenant::server::Running>) {
    for i in instances {
        i.stop().await;
    }
}

/// Sends a CancelRequest to `addr` and waits until that instance closes the connection (it has
/// then handled the request, forwarding included).
async fn cancel(addr: std::net::SocketAddr, pid: i32, secret: i32) -> TestResult {
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(&wire::cancel_request(pid, secret)).await.map_err(|e| e.to_string())?;
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(6), s.read(&mut sink)).await;
    Ok(())
}

/// The instance id a cancel key names (bits 24 to 30 of the secret).
fn owner(secret: i32) -> i32 {
    (secret >> 24) & 0x7f
}

/// Value of a counter series in this process's metrics (every instance here shares the recorder).
fn counter(series: &str) -> f64 {
    let text = pgtenant::metrics::recorder().render();
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

fn cancels(result: &str) -> f64 {
    counter(&format!("pgtenant_cancel_requests_total{{result=\"{result}\"}}"))
}

async fn a_cancel_sent_to_another_instance_cancels_the_query(env: &Env) -> TestResult {
    for mode in ["transaction", "session"] {
        let fleet = fleet(env, 3, mode).await;
        let mut c = Wire::connect(fleet[0].addr, &token(1, "slow")).await?;
        ensure(owner(c.key_secret) == 1, format!("{mode}: the key names instance {}, not 1", owner(c.key_secret)))?;
        // sent to instance 2, then (a new query) to instance 3: each forwards it to instance 1
        for wrong in [1, 2] {
            c.send(&wire::query("select pg_sleep(20)")).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let started = Instant::now();
            cancel(fleet[wrong].addr, c.key_pid, c.key_secret).await?;
            let r = c.ready_n(1, Duration::from_secs(10)).await;
            ensure(
                r.code() == Some("57014") && started.elapsed() < Duration::from_secs(8),
                format!("{mode}: cancel sent to instance {}: {}", wrong + 1, r.summary()),
            )?;
            let r = c.simple("select 1").await;
            ensure(r.get(0, 0) == "1", format!("{mode}: session unusable after the cancel: {}", r.summary()))?;
        }
        c.close().await;
        stop(fleet).await;
    }
    Ok(())
}

async fn forged_keys_cancel_nothing(env: &Env) -> TestResult {
    let fleet = fleet(env, 3, "transaction").await;
    let mut c = Wire::connect(fleet[0].addr, &token(1, "victim")).await?;
    let (pid, secret) = (c.key_pid, c.key_secret);
    let other = |id: i32| (secret & !(0x7f << 24)) | (id << 24);
    let forgeries = [
        ("the right instance, a wrong random part", pid, secret ^ 0x00a5_a5a5),
        ("the right random part, naming instance 3", pid, other(3)),
        ("the right random part, naming an instance with no address", pid, other(9)),
        ("a wrong pid", pid ^ 0x10, secret),
    ];
    for (what, forged_pid, forged) in forgeries {
        c.send(&wire::query("select pg_sleep(1.5)")).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        for instance in &fleet {
            cancel(instance.addr, forged_pid, forged).await?;
        }
        let r = c.ready_n(1, Duration::from_secs(10)).await;
        ensure(r.ok() && r.status() == b'I', format!("{what}: the query was cancelled: {}", r.summary()))?;
    }
    // and the real key still works, through any instance
    c.send(&wire::query("select pg_sleep(20)")).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel(fleet[2].addr, pid, secret).await?;
    let r = c.ready_n(1, Duration::from_secs(10)).await;
    ensure(r.code() == Some("57014"), format!("the real key: {}", r.summary()))?;
    c.close().await;
    stop(fleet).await;
    Ok(())
}

async fn a_forwarded_cancel_is_never_forwarded_again(env: &Env) -> TestResult {
    // instance 1 owns the session; instances 2 and 3 are misconfigured: each believes instance 1
    // lives at the other's address, so a request forwarded blindly would bounce between them
    let ports = free_ports(3).await;
    let one = instance(env, 1, ports[0], &[], "transaction").await;
    let two = instance(env, 2, ports[1], &[(1, ports[2])], "transaction").await;
    let three = instance(env, 3, ports[2], &[(1, ports[1])], "transaction").await;
    let mut c = Wire::connect(one.addr, &token(1, "loop")).await?;
    let (forwarded, dropped) = (cancels("forwarded"), cancels("dropped"));
    c.send(&wire::query("select pg_sleep(1.5)")).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel(two.addr, c.key_pid, c.key_secret).await?;
    let r = c.ready_n(1, Duration::from_secs(10)).await;
    ensure(r.ok(), format!("the query was cancelled: {}", r.summary()))?;
    // two forwarded it once, three dropped it (it names instance 1 and was forwarded already)
    ensure(
        cancels("forwarded") - forwarded == 1.0 && cancels("dropped") - dropped == 1.0,
        format!("forwarded {} times, dropped {} times", cancels("forwarded") - forwarded, cancels("dropped") - dropped),
    )?;
    // a client sending a key with the forwarded mark set is not forwarded either
    let marked = c.key_secret | i32::MIN;
    let before = cancels("forwarded");
    c.send(&wire::query("select pg_sleep(1.5)")).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel(two.addr, c.key_pid, marked).await?;
    let r = c.ready_n(1, Duration::from_secs(10)).await;
    ensure(r.ok() && cancels("forwarded") == before, format!("a marked key was forwarded: {}", r.summary()))?;
    c.close().await;
    stop(vec![one, two, three]).await;
    Ok(())
}

async fn the_instance_id_is_exported(env: &Env) -> TestResult {
    let fleet = fleet(env, 2, "transaction").await;
    let text = pgtenant::metrics::recorder().render();
    for id in [1, 2] {
        let series = format!("pgtenant_instance_info{{peer_id=\"{id}\"");
        ensure(text.lines().any(|l| l.starts_with(&series) && l.ends_with(" 1")), format!("no {series}…}} 1 in\n{text}"))?;
    }
    stop(fleet).await;
    Ok(())
}

/// Instance `id` of a fleet on one host: it shares `shared` with the others (`so_reuseport`, unless
/// `reuse` is false) and has its own address `own`, which `[peers]` lists.
async fn sharing(env: &Env, id: usize, shared: u16, own: u16, reuse: bool, peers: &[(usize, u16)]) -> Result<pgtenant::server::Running, String> {
    let table: String = peers.iter().map(|(i, p)| format!("{i} = \"127.0.0.1:{p}\"\n")).collect();
    let text = config_text(env, "pool_size = 3", &format!("[peers]\n{table}")).replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{shared}\"\npeer_id = {id}\nso_reuseport = {reuse}\npeer_listen = \"127.0.0.1:{own}\""),
    );
    let cfg = pgtenant::config::Config::from_toml(&text, &|_| None).map_err(|e| format!("config invalid: {e}"))?;
    pgtenant::server::start(cfg).await.map_err(|e| e.to_string())
}

async fn instances_on_one_host_share_a_port(env: &Env) -> TestResult {
    let ports = free_ports(4).await;
    let (shared, own) = (ports[0], &ports[1..]);
    let table = [(1, own[0]), (2, own[1])];
    let one = sharing(env, 1, shared, own[0], true, &table).await?;
    let two = sharing(env, 2, shared, own[1], true, &table).await?;
    // without the option the port is taken: it is what lets processes share it
    match sharing(env, 3, shared, own[2], false, &table).await {
        Err(e) => ensure(e.contains("cannot listen on") && e.contains(&shared.to_string()), format!("third instance: {e}"))?,
        Ok(three) => {
            three.stop().await;
            return Err("a third instance bound the shared port without so_reuseport".into());
        }
    }
    // the kernel spreads connections over both (by a hash of each connection's ports): 24 clients
    // all on one instance would happen once in 2^23 runs
    let addr: std::net::SocketAddr = format!("127.0.0.1:{shared}").parse().map_err(|e| format!("{e}"))?;
    let mut clients = Vec::new();
    for i in 0..24 {
        clients.push(Wire::connect(addr, &token(1 + i % 3, "shared")).await?);
    }
    let on = |id: i32| clients.iter().filter(|c| owner(c.key_secret) == id).count();
    ensure(on(1) > 0 && on(2) > 0 && on(1) + on(2) == 24, format!("instance 1 has {} clients, instance 2 {}", on(1), on(2)))?;
    // a cancel sent to the shared port reaches either instance; one sent to the wrong instance's
    // own address is forwarded to the owner's: both cancel the query
    for id in [1, 2] {
        let i = clients.iter().position(|c| owner(c.key_secret) == id).ok_or("no client")?;
        let other = own[2 - id as usize];
        for (how, to) in [("the shared port", shared), ("the other instance's own address", other)] {
            let c = &mut clients[i];
            c.send(&wire::query("select pg_sleep(20)")).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let target: std::net::SocketAddr = format!("127.0.0.1:{to}").parse().map_err(|e| format!("{e}"))?;
            cancel(target, c.key_pid, c.key_secret).await?;
            let r = c.ready_n(1, Duration::from_secs(10)).await;
            ensure(r.code() == Some("57014"), format!("instance {id}, cancel sent to {how}: {}", r.summary()))?;
        }
    }
    for c in clients {
        c.close().await;
    }
    stop(vec![one, two]).await;
    Ok(())
}
