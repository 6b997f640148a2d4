//! TLS towards clients: the certificate pgtenant presents when a client sends SSLRequest.

use std::path::Path;
use std::sync::Arc;

/// Loads a PEM certificate chain and private key (PKCS#8, PKCS#1 or SEC1) into a TLS acceptor.
pub fn load_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("server TLS: cannot read {}: {e}", p.display()));
    let cert_pem = read(cert)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("server TLS: {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("server TLS: {} holds no PEM certificate", cert.display()));
    }
    let key_pem = read(key)?;
    let private = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| format!("server TLS: {}: {e}", key.display()))?
        .ok_or_else(|| format!("server TLS: {} holds no PEM private key", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(crate::net::tls_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| format!("server TLS: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
