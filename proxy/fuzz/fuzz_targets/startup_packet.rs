//! Arbitrary bytes as everything a client sends before authentication.
//!
//! The startup parameter parser (`client::startup::parse_params`) is private, so the input goes
//! through the real public entry point, `client::startup::negotiate`, over a loopback TCP
//! connection (it takes a `TcpStream`): length checks in `protocol::frame::read_startup_packet`,
//! SSLRequest / GSSENCRequest answers (no TLS configured: 'N'), CancelRequest, protocol version
//! checks, the parameter parser and the NegotiateProtocolVersion reply. A login's parameters then
//! go through `client::params::from_startup` and the guard's startup `options` check, as in
//! `server.rs`.
//!
//! The client half sends the input, half-closes, and is closed with an RST (SO_LINGER 0) so no
//! connection is left in TIME_WAIT: millions of runs do not exhaust local ports.
//!
//! Properties checked besides "no panic" and "no hang": a login never keeps a `_pq_.` parameter;
//! `from_startup` never returns a protected setting.

#![no_main]

use std::collections::HashSet;
use std::sync::OnceLock;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgtenant::client::params;
use pgtenant::client::startup::{negotiate, Hello};
use pgtenant::config::TenantConfig;
use pgtenant::guard::Guard;
use pgtenant::error::PgError;
use pgtenant::protocol::frame::{self, MAX_STARTUP_PACKET};
use pgtenant::protocol::peek;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

struct Env {
    rt: Runtime,
    listener: TcpListener,
    addr: std::net::SocketAddr,
    guard: Guard,
    known: HashSet<String>,
}

fn env() -> &'static Env {
    static E: OnceLock<Env> = OnceLock::new();
    E.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().expect("runtime");
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let mut cfg = TenantConfig::default();
        cfg.settings.insert("app.tenant_id".into(), "tenant_id".into());
        cfg.settings.insert("app.user_id".into(), "sub".into());
        let known = ["application_name", "client_encoding", "datestyle", "timezone", "search_path", "statement_timeout", "extra_float_digits", "intervalstyle"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        Env { rt, listener, addr, guard: Guard::from_config(&cfg), known }
    })
}

/// The FATAL sent to the client is one whole ErrorResponse carrying its SQLSTATE.
fn check_error_frame(err: &PgError) {
    let mut out = BytesMut::new();
    err.encode(&mut out);
    let f = frame::try_split(&mut out, usize::MAX).expect("error frame length").expect("whole error frame");
    assert_eq!(f.tag, b'E');
    assert!(out.is_empty());
    assert_eq!(peek::error_code(f.body()), Some(err.code.as_bytes()));
}

fuzz_target!(|data: &[u8]| {
    // a few packets' worth; more is never read (the first packet decides)
    let data = &data[..data.len().min(4 * MAX_STARTUP_PACKET)];
    let e = env();
    e.rt.block_on(async {
        let mut client = TcpStream::connect(e.addr).await.expect("connect loopback");
        let (server, _) = e.listener.accept().await.expect("accept");
        // fits the loopback socket buffers: nothing blocks before negotiate() reads
        client.write_all(data).await.expect("write");
        client.shutdown().await.expect("half-close");
        let hello = negotiate(server, None, false).await;
        let _ = client.set_zero_linger();
        drop(client);
        match hello {
            Ok(Hello::Login { params: p, .. }) => {
                assert!(p.keys().all(|k| !k.starts_with("_pq_.")));
                if let Some(options) = p.get("options") {
                    let _ = pgtenant::protocol::options::option_pairs(options);
                    let _ = e.guard.check_startup_options(options);
                }
                match params::from_startup(&p, &e.known, &e.guard) {
                    Ok(cp) => {
                        for (n, _) in &cp {
                            let lower = n.to_lowercase();
                            assert!(
                                !["app.tenant_id", "app.user_id", "request.jwt.claims", "role", "session_authorization"].contains(&lower.as_str()),
                                "protected setting {n} accepted at startup"
                            );
                        }
                    }
                    Err(err) => check_error_frame(&err),
                }
            }
            Ok(Hello::Cancel { .. }) | Ok(Hello::Gone) => {}
            Err(err) => check_error_frame(&err.error),
        }
    });
});
