//! `backend.url` as libpq reads a connection string: the URL form
//! (`postgres://user:pw@h1:5432,h2:5433/db?target_session_attrs=read-write`) and the key/value form
//! (`host=h1,h2 port=5432,5433 user=… password=… dbname=… target_session_attrs=read-write`).
//!
//! Several hosts exist for failover: pgtenant keeps one pool and sends it to whichever host is the
//! writable primary (`crate::backend::attrs` checks what a connection reached). The `url` crate
//! cannot parse a host list, so the URL is split by hand here, with libpq's rules: one port per
//! host or none (5432), a `host` query parameter naming a Unix socket directory (or a host list),
//! percent-encoded user, password and database. Error texts never contain the password.
//!
//! A leaf module (it uses nothing else of the crate), so that both sides can use it: `config`
//! checks every URL key with it, and `backend`, which depends on `config`, connects to what it
//! parses.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    /// A Unix socket directory; the socket is `<dir>/.s.PGSQL.<port>`.
    Unix(PathBuf),
}

/// `target_session_attrs`: which kind of server a backend connection must reach (the check that a
/// connection did is `SessionAttrs::mismatch`, in `crate::backend::attrs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAttrs {
    /// Whatever server answers first (the default with one host).
    Any,
    /// A server that accepts writes: not a standby, `default_transaction_read_only` off (the default
    /// with several hosts).
    ReadWrite,
    /// A server not in recovery (a primary, even one whose default is read-only).
    Primary,
}

impl SessionAttrs {
    pub fn parse(s: &str) -> Result<SessionAttrs, String> {
        match s {
            "any" => Ok(SessionAttrs::Any),
            "read-write" => Ok(SessionAttrs::ReadWrite),
            "primary" => Ok(SessionAttrs::Primary),
            other => Err(format!(
                "target_session_attrs \"{other}\" is not supported for the pool (use read-write, primary or any)"
            )),
        }
    }
}

/// A parsed connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Every host with its port, in the order given (the order hosts are tried in).
    pub hosts: Vec<(Host, u16)>,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub attrs: SessionAttrs,
}

const DEFAULT_PORT: u16 = 5432;

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// Parses either form.
pub fn parse(s: &str) -> Result<ConnInfo, String> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("postgres://").or_else(|| s.strip_prefix("postgresql://")) {
        parse_url(rest)
    } else if !s.contains("://") && s.contains('=') {
        parse_key_values(s)
    } else {
        Err("must start with postgres:// or postgresql:// (or be libpq key=value pairs)".into())
    }
}

/// The part after `postgres://`: `[user[:pw]@]hostlist[/db][?params]`.
fn parse_url(rest: &str) -> Result<ConnInfo, String> {
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
    let (userinfo, hostlist) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((n, p)) => (decode(n), Some(decode(p))),
            None => (decode(u), None),
        },
        None => (String::new(), None),
    };
    let mut pairs = Pairs::default();
    pairs.set("user", user);
    if let Some(p) = password {
        pairs.set("password", p);
    }
    pairs.set("dbname", decode(path));
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    if !hostlist.is_empty() {
        for h in hostlist.split(',') {
            let (host, port) = split_host_port(h)?;
            hosts.push(decode(host));
            ports.push(port.map(str::to_string).unwrap_or_default());
        }
    }
    pairs.set("host", hosts.join(","));
    pairs.set("port", ports.join(","));
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        // query parameters override the authority, as in libpq
        pairs.set(&k, v.into_owned());
    }
    pairs.finish()
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(h: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(rest) = h.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or_else(|| format!("unterminated IPv6 address \"{h}\""))?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((addr, Some(p))),
            None if after.is_empty() => Ok((addr, None)),
            None => Err(format!("unexpected \"{after}\" after IPv6 address")),
        };
    }
    Ok(match h.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (h, None),
    })
}

/// `key=value key='quoted \' value'`, libpq's conninfo syntax.
fn parse_key_values(s: &str) -> Result<ConnInfo, String> {
    let mut pairs = Pairs::default();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err("has a key without a value (key=value expected)".into());
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err("has an unterminated quoted value".into()),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.set(&key, value);
    }
    pairs.finish()
}

/// The keys pgtenant uses; others (sslmode, application_name, …) are accepted and ignored, as
/// before: TLS towards the backend is `backend.tls`.
#[derive(Default)]
struct Pairs {
    host: String,
    port: String,
    user: String,
    password: Option<String>,
    dbname: String,
    attrs: Option<String>,
}

impl Pairs {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "host" => self.host = value,
            "port" => self.port = value,
            "user" => self.user = value,
            "password" => self.password = Some(value),
            "dbname" => self.dbname = value,
            "target_session_attrs" => self.attrs = Some(value),
            _ => {}
        }
    }

    fn finish(self) -> Result<ConnInfo, String> {
        if self.user.is_empty() {
            return Err("has no user name (postgres://user:password@host/db)".into());
        }
        if self.dbname.is_empty() {
            return Err("has no database name (postgres://user:password@host/db)".into());
        }
        let names: Vec<&str> = if self.host.is_empty() { vec![""] } else { self.host.split(',').collect() };
        let ports: Vec<&str> = if self.port.is_empty() { vec![""] } else { self.port.split(',').collect() };
        if ports.len() != 1 && ports.len() != names.len() {
            return Err(format!("names {} hosts but {} ports (give one port for all, or one per host)", names.len(), ports.len()));
        }
        let mut hosts = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let port = ports[if ports.len() == 1 { 0 } else { i }].trim();
            let port = if port.is_empty() {
                DEFAULT_PORT
            } else {
                port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("has an invalid port \"{port}\""))?
            };
            let name = name.trim();
            let host = if name.starts_with('/') {
                Host::Unix(PathBuf::from(name))
            } else if name.is_empty() {
                Host::Tcp("localhost".into())
            } else {
                Host::Tcp(name.to_string())
            };
            hosts.push((host, port));
        }
        let attrs = match self.attrs.as_deref() {
            Some(a) => SessionAttrs::parse(a)?,
            // several hosts are there to fail over between: the pool wants the writable one
            None if hosts.len() > 1 => SessionAttrs::ReadWrite,
            None => SessionAttrs::Any,
        };
        Ok(ConnInfo { hosts, user: self.user, password: self.password, database: self.dbname, attrs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(h: &str, p: u16) -> (Host, u16) {
        (Host::Tcp(h.into()), p)
    }

    #[test]
    fn session_attrs_parses_what_libpq_names() {
        assert_eq!(SessionAttrs::parse("read-write"), Ok(SessionAttrs::ReadWrite));
        assert_eq!(SessionAttrs::parse("primary"), Ok(SessionAttrs::Primary));
        assert_eq!(SessionAttrs::parse("any"), Ok(SessionAttrs::Any));
        assert!(SessionAttrs::parse("prefer-standby").unwrap_err().contains("not supported"));
    }

    #[test]
    fn url_with_one_host_as_before() {
        let c = parse("postgres://app%40x:p%40ss%3Aw@db.example:6543/app").unwrap();
        assert_eq!(c.hosts, vec![tcp("db.example", 6543)]);
        assert_eq!((c.user.as_str(), c.password.as_deref(), c.database.as_str()), ("app@x", Some("p@ss:w"), "app"));
        assert_eq!(c.attrs, SessionAttrs::Any);
        let c = parse("postgresql://u@localhost/app?host=/run/pg&sslmode=disable").unwrap();
        assert_eq!(c.hosts, vec![(Host::Unix("/run/pg".into()), 5432)]);
        let c = parse("postgres://u@[::1]:7/app").unwrap();
        assert_eq!(c.hosts, vec![tcp("::1", 7)]);
        assert_eq!(parse("postgres://u@/app").unwrap().hosts, vec![tcp("localhost", 5432)]);
    }

    #[test]
    fn url_with_several_hosts_wants_the_primary() {
        let c = parse("postgres://app_user:pw@h1:5432,h2:5433,h3/app").unwrap();
        assert_eq!(c.hosts, vec![tcp("h1", 5432), tcp("h2", 5433), tcp("h3", 5432)]);
        assert_eq!(c.attrs, SessionAttrs::ReadWrite);
        let c = parse("postgres://u:p@h1,h2/app?port=6000&target_session_attrs=any").unwrap();
        assert_eq!(c.hosts, vec![tcp("h1", 6000), tcp("h2", 6000)]);
        assert_eq!(c.attrs, SessionAttrs::Any);
        let c = parse("postgres://u@x/app?host=a,b&port=1,2&target_session_attrs=primary").unwrap();
        assert_eq!((c.hosts, c.attrs), (vec![tcp("a", 1), tcp("b", 2)], SessionAttrs::Primary));
    }

    #[test]
    fn key_value_form() {
        let c = parse("host=h1,h2 port=5432,5433 user=app_user password='a \\'b' dbname = app").unwrap();
        assert_eq!(c.hosts, vec![tcp("h1", 5432), tcp("h2", 5433)]);
        assert_eq!((c.password.as_deref(), c.database.as_str(), c.attrs), (Some("a 'b"), "app", SessionAttrs::ReadWrite));
        let c = parse("host=h1,h2 port=6432 user=u dbname=d target_session_attrs=read-write").unwrap();
        assert_eq!(c.hosts, vec![tcp("h1", 6432), tcp("h2", 6432)]);
    }

    #[test]
    fn errors_name_the_problem_never_the_password() {
        for (s, want) in [
            ("mysql://u@h/db", "postgres://"),
            ("postgres://u:secret@h/", "database"),
            ("postgres://:secret@h/db", "user"),
            ("postgres://u:secret@h:99999/db", "port"),
            ("postgres://u:secret@h/db?port=1,2,3&host=a,b", "2 hosts but 3 ports"),
            ("host=a user=u password=secret dbname=d target_session_attrs=standby", "target_session_attrs"),
            ("host=a user=u password='secret dbname=d", "unterminated"),
            ("host=a user=u password=sec ret dbname=d", "without a value"),
        ] {
            let e = parse(s).unwrap_err();
            assert!(e.contains(want) && !e.contains("secret"), "{s}: {e}");
        }
    }
}
