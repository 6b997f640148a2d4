//! An http(s) URL pgtenant fetches from (the JWKS endpoint), checked once: https, or plain http to
//! a loopback host only; no credentials in the URL. Here rather than in `jwt` so the config can
//! check the URL without depending on the JWT module.

/// Where to fetch from, parsed once from the configured URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, as sent in the request line.
    pub path: String,
}

impl Target {
    pub fn parse(raw: &str) -> Result<Target, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
        let host = url.host_str().ok_or("the URL has no host")?.to_string();
        let tls = match url.scheme() {
            "https" => true,
            "http" => {
                let loopback = host == "localhost"
                    || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false);
                if !loopback {
                    return Err("plain http is accepted only for loopback hosts; use https".into());
                }
                false
            }
            other => return Err(format!("unsupported scheme {other:?} (use https)")),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err("credentials in the URL are not supported".into());
        }
        let port = url.port_or_known_default().ok_or("the URL has no port")?;
        let mut path = url.path().to_string();
        if let Some(q) = url.query() {
            path.push('?');
            path.push_str(q);
        }
        Ok(Target { tls, host, port, path })
    }
}

