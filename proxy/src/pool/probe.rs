//! pgtenant's own round trip on a leased backend, outside any client's session, made at login: how
//! the server spells the client's startup parameters (`set_config` returns exactly the value the
//! server would report), whether it accepts them at all, and, in session mode, what the client's
//! own backend shows once they apply. It all runs in one implicit transaction with
//! `set_config(…, true)`, so the backend is left as it was. `Spellings` remembers the answers per
//! server, so most logins need no round trip.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::PooledConn as Backend;
use crate::error::{PgError, Severity};
use crate::protocol::build;
use crate::protocol::frame::read_frame;

/// What the server answered.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// The value of each pair's setting once set, in order.
    pub values: Vec<String>,
    /// The value of each name asked for, with all pairs applied.
    pub shown: Vec<String>,
}

#[derive(Debug)]
pub enum ProbeError {
    /// The server refused a value (as a FATAL error for the client); the connection is fine.
    Refused(PgError),
    /// The connection failed or answered something unexpected: close it.
    Lost(String),
}

/// Largest reply message accepted (values come from a startup packet of at most 10,000 bytes).
const MAX_REPLY: usize = 1 << 20;

/// Runs `reset` (the previous session's cleanup, if due), then in one implicit transaction
/// `set_config(name, value, true)` for each pair in order and `current_setting` for each of `show`.
/// Results travel as UTF-8 bytes in binary format: a `client_encoding` among the pairs changes the
/// encoding of text results, never of these.
pub async fn ask(
    backend: &mut Backend,
    reset: Option<&str>,
    pairs: &[(String, String)],
    show: &[String],
) -> Result<Answer, ProbeError> {
    let mut out = BytesMut::new();
    let mut readies = 0;
    if let Some(sql) = reset {
        build::query(&mut out, sql);
        readies += 1;
    }
    let set_args: Vec<String> = pairs.iter().flat_map(|(n, v)| [n.clone(), v.clone()]).collect();
    for (sql, args) in [
        (select_utf8(pairs.len(), |i| format!("pg_catalog.set_config(${}, ${}, true)", 2 * i + 1, 2 * i + 2)), &set_args),
        (select_utf8(show.len(), |i| format!("pg_catalog.current_setting(${})", i + 1)), &show.to_vec()),
    ] {
        if !args.is_empty() {
            build::parse(&mut out, "", &sql, vec![25; args.len()]);
            build::bind_text_binary_results(&mut out, "", "", args);
            build::execute(&mut out, "");
        }
    }
    let statements = usize::from(!pairs.is_empty()) + usize::from(!show.is_empty());
    if statements > 0 {
        build::sync(&mut out);
        readies += 1;
    }
    backend.wr.write_all(&out).await.map_err(|e| ProbeError::Lost(e.to_string()))?;

    let mut buf = BytesMut::new();
    let mut rows = Vec::new();
    let mut error = None;
    let mut resetting = reset.is_some();
    while readies > 0 {
        let f = read_frame(&mut backend.rd, &mut buf, MAX_REPLY)
            .await
            .map_err(|e| ProbeError::Lost(e.to_string()))?
            .ok_or_else(|| ProbeError::Lost("server closed the connection".into()))?;
        match f.tag {
            b'S' => backend.note_report(f.body()),
            b'E' if resetting => {
                let e = PgError::from_server(f.body(), Severity::Error);
                return Err(ProbeError::Lost(format!("session reset failed: {}", e.message)));
            }
            b'E' => error = Some(PgError::from_server(f.body(), Severity::Fatal)),
            b'D' if !resetting => {
                let row = crate::backend::query::data_row(f.body()).ok_or_else(|| ProbeError::Lost("bad DataRow".into()))?;
                rows.push(row.into_iter().map(Option::unwrap_or_default).collect::<Vec<String>>());
            }
            b'Z' => {
                readies -= 1;
                resetting = false;
                if readies == 0 {
                    backend.settled();
                }
            }
            _ => {}
        }
    }
    if !buf.is_empty() {
        return Err(ProbeError::Lost("unexpected data after ReadyForQuery".into()));
    }
    if let Some(e) = error {
        return Err(ProbeError::Refused(e));
    }
    let mut rows = rows.into_iter();
    let mut next = |n: usize| -> Result<Vec<String>, ProbeError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        rows.next().filter(|r| r.len() == n).ok_or_else(|| ProbeError::Lost("unexpected reply to the settings probe".into()))
    };
    let values = next(pairs.len())?;
    let shown = next(show.len())?;
    Ok(Answer { values, shown })
}

/// `SELECT convert_to(…, 'UTF8'), …` with one column per call; `call(i)` writes the i-th call
/// (0-based).
fn select_utf8(n: usize, call: impl Fn(usize) -> String) -> String {
    let cols: Vec<String> = (0..n).map(|i| format!("pg_catalog.convert_to({}, 'UTF8')", call(i))).collect();
    format!("SELECT {}", cols.join(", "))
}

/// How the server spells parameter values, by (lower-case name, value as the client wrote it).
/// Bounded: the oldest answer goes first; long values are not kept.
#[derive(Default)]
pub struct Spellings(Mutex<Known>);

#[derive(Default)]
struct Known {
    map: HashMap<(String, String), String>,
    order: VecDeque<(String, String)>,
}

const MAX_SPELLINGS: usize = 1024;
const MAX_SPELLING_BYTES: usize = 256;

impl Spellings {
    pub fn get(&self, name: &str, value: &str) -> Option<String> {
        let known = self.0.lock().unwrap_or_else(|p| p.into_inner());
        known.map.get(&(name.to_lowercase(), value.to_string())).cloned()
    }

    pub fn insert(&self, name: &str, value: &str, spelled: &str) {
        if name.len() + value.len() + spelled.len() > MAX_SPELLING_BYTES {
            return;
        }
        let key = (name.to_lowercase(), value.to_string());
        let mut known = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if known.map.insert(key.clone(), spelled.to_string()).is_none() {
            known.order.push_back(key);
            if known.order.len() > MAX_SPELLINGS {
                if let Some(old) = known.order.pop_front() {
                    known.map.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_number_their_parameters() {
        assert_eq!(
            select_utf8(2, |i| format!("f(${})", i + 1)),
            "SELECT pg_catalog.convert_to(f($1), 'UTF8'), pg_catalog.convert_to(f($2), 'UTF8')"
        );
    }

    #[test]
    fn spellings_are_bounded() {
        let s = Spellings::default();
        s.insert("DateStyle", "iso,dmy", "ISO, DMY");
        assert_eq!(s.get("datestyle", "iso,dmy").as_deref(), Some("ISO, DMY"));
        assert_eq!(s.get("datestyle", "ISO,DMY"), None);
        s.insert("application_name", &"x".repeat(300), "x");
        assert_eq!(s.get("application_name", &"x".repeat(300)), None);
        for i in 0..MAX_SPELLINGS {
            s.insert("application_name", &i.to_string(), &i.to_string());
        }
        assert_eq!(s.get("DateStyle", "iso,dmy"), None);
        assert_eq!(s.get("application_name", "1").as_deref(), Some("1"));
        assert_eq!(s.0.lock().unwrap().map.len(), MAX_SPELLINGS);
    }
}
