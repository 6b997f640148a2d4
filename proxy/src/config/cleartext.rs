//! Tokens are bearer credentials: whoever reads one on the wire can log in as its tenant until it
//! expires. A listener that accepts clients beyond loopback without requiring TLS lets them cross
//! the network in cleartext, so pgtenant says so at start-up and in `pgtenant check` (it does not
//! refuse: a private network or a mesh that encrypts for it may be a deliberate choice).

use std::net::{SocketAddr, ToSocketAddrs};

use super::ServerConfig;

/// The warning for `server` listening on `addrs`, if any of them is beyond loopback and TLS is not
/// required.
pub fn warning(server: &ServerConfig, addrs: &[SocketAddr]) -> Option<String> {
    if server.require_tls {
        return None;
    }
    let exposed = addrs.iter().find(|a| !a.ip().is_loopback())?;
    let tls = if server.tls_cert.is_some() {
        "TLS is offered but not required (server.require_tls = false), so a client may still send its token in cleartext"
    } else {
        "TLS is off (no server.tls_cert / server.tls_key), so every client sends its token in cleartext"
    };
    Some(format!(
        "server.listen = \"{}\" accepts clients beyond loopback ({exposed}) and {tls}: tokens are bearer credentials, \
         readable by anyone on the network path; set server.tls_cert, server.tls_key and server.require_tls = true \
         (PGTENANT_SERVER_REQUIRE_TLS=true), see docs/deployment.md",
        server.listen
    ))
}

/// The addresses `server.listen` names (resolving a host name), for a warning before binding.
pub fn listen_addrs(server: &ServerConfig) -> Vec<SocketAddr> {
    server.listen.to_socket_addrs().map(Iterator::collect).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(listen: &str, cert: bool, require: bool) -> ServerConfig {
        ServerConfig {
            listen: listen.into(),
            tls_cert: cert.then(|| "c.pem".into()),
            tls_key: cert.then(|| "k.pem".into()),
            require_tls: require,
            ..ServerConfig::default()
        }
    }

    fn warns(listen: &str, cert: bool, require: bool) -> Option<String> {
        let s = server(listen, cert, require);
        warning(&s, &listen_addrs(&s))
    }

    #[test]
    fn beyond_loopback_without_required_tls_is_warned() {
        for quiet in ["127.0.0.1:6432", "127.0.0.2:6432", "[::1]:6432", "localhost:6432"] {
            assert_eq!(warns(quiet, false, false), None, "{quiet}");
        }
        let w = warns("0.0.0.0:6432", false, false).unwrap();
        assert!(w.contains("0.0.0.0:6432") && w.contains("TLS is off") && w.contains("require_tls"), "{w}");
        let w = warns("[::]:6432", true, false).unwrap();
        assert!(w.contains("offered but not required"), "{w}");
        assert!(warns("10.1.2.3:6432", false, false).is_some());
        assert_eq!(warns("0.0.0.0:6432", true, true), None);
        // what was bound decides at start-up, whatever the name
        let s = server("localhost:6432", false, false);
        assert!(warning(&s, &["192.0.2.1:6432".parse().unwrap()]).is_some());
    }
}
