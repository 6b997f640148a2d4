//! The parameters as the client sees them (ParameterStatus), so that what it is told never
//! contradicts what a direct connection would show it.
//!
//! A backend's own reports reach the client, except about parameters pgtenant applies in each of
//! the client's transactions (the backend's value for them is not the client's) and parameters the
//! client is changing with `SET`/`RESET` right now. Once such a change has completed, pgtenant tells
//! the client the new values itself: a server reports a parameter only when it differs from the
//! last value *that connection* reported, which need not be what this client was told (the
//! connection may have reported to another client, and never reports the client's own values,
//! which are applied per transaction and gone at its end).

use std::collections::{HashMap, HashSet};

use crate::pool::PooledConn as Backend;
use crate::sql::set::Change;

#[derive(Debug, Default, Clone)]
pub struct ClientView {
    /// Parameters pgtenant applies in every transaction (lower case): the backend's value for them
    /// is not the client's business.
    pub applied: HashSet<String>,
    /// Last value reported to the client, by lower-case name.
    pub reported: HashMap<String, String>,
    /// Parameters the client is changing with SET right now (lower case).
    pub changing: HashSet<String>,
    /// What the client was told at login, as (name as the server spells it, value) by lower-case
    /// name: the session defaults `RESET` returns to.
    login: HashMap<String, (String, String)>,
}

impl ClientView {
    /// The view of a client that was sent `reported` at login.
    pub fn new(reported: &[(String, String)]) -> ClientView {
        let login: HashMap<_, _> = reported.iter().map(|(k, v)| (k.to_lowercase(), (k.clone(), v.clone()))).collect();
        let reported = login.iter().map(|(k, (_, v))| (k.clone(), v.clone())).collect();
        ClientView { reported, login, ..Default::default() }
    }

    /// Whether a backend ParameterStatus (its body) should reach the client (and records it if so).
    ///
    /// Nothing is allocated for a report it drops (the common one: a parameter the client's
    /// transactions set, reported by the server when its value changes inside an explicit
    /// transaction and again when it ends, e.g. `application_name`).
    pub fn admit(&mut self, body: &[u8]) -> bool {
        let mut parts = body.split(|&b| b == 0);
        let (raw_name, raw_value) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        let mut buf = [0u8; 64];
        let folded;
        let name: &str = match std::str::from_utf8(raw_name) {
            Ok(n) if n.is_ascii() && n.len() <= buf.len() => {
                buf[..n.len()].copy_from_slice(n.as_bytes());
                buf[..n.len()].make_ascii_lowercase();
                std::str::from_utf8(&buf[..n.len()]).unwrap_or_default()
            }
            _ => {
                folded = String::from_utf8_lossy(raw_name).to_lowercase();
                &folded
            }
        };
        if self.applied.contains(name)
            || self.changing.contains(name)
            || self.reported.get(name).is_some_and(|v| v.as_bytes() == raw_value)
        {
            return false;
        }
        let value = String::from_utf8_lossy(raw_value).into_owned();
        self.reported.insert(name.to_string(), value);
        true
    }

    /// The ParameterStatus messages (name, value) the client is owed once session-level `changes`
    /// have completed, recorded as reported. `backend` ran them: a `SET` parameter now has the
    /// value that connection reported last (it would have reported a different one). A `RESET`
    /// one is back to its login value; `backend` is `None` when pgtenant answered on its own
    /// (`DISCARD ALL`), which only resets.
    pub fn after_changes(&mut self, changes: &[Change], backend: Option<&Backend>) -> Vec<(String, String)> {
        // the parameters these changes touch, valued as `owed_for_changing` values pending ones
        let changing = std::mem::take(&mut self.changing);
        self.mark_changing(changes);
        let owed = self.owed_for_changing(changes, &|_| None, backend);
        self.changing = changing;
        owed
    }
}

impl ClientView {
    /// Session-level `changes` are on their way: the parameters they touch are being changed
    /// (`RESET ALL`: every reported one).
    pub fn mark_changing(&mut self, changes: &[Change]) {
        for c in changes {
            match c {
                Change::Set(n, _) | Change::Reset(n) => {
                    self.changing.insert(n.to_lowercase());
                }
                Change::ResetAll => self.changing.extend(self.login.keys().cloned()),
            }
        }
    }

    /// The ParameterStatus messages (name, value) the client is owed, at a ReadyForQuery with
    /// every reply in, for the parameters it is changing (`changing`): what a direct connection
    /// would have reported by then. Each parameter's value is that of the last of `pending` (the
    /// changes whose transaction has not ended) that touches it — a `SET` has the value `backend`
    /// reported, a `RESET` the login value — or, with none, the client's own (`kept`: its kept
    /// `SET`, else the login value): after a `ROLLBACK` or `ROLLBACK TO` that undid a change, or
    /// after the transaction committed (`pending` empty). Recorded as reported.
    pub fn owed_for_changing(&mut self, pending: &[Change], kept: &dyn Fn(&str) -> Option<String>, backend: Option<&Backend>) -> Vec<(String, String)> {
        let mut owed = Vec::new();
        for name in &self.changing {
            let Some((spelled, at_login)) = self.login.get(name) else { continue }; // not reported
            let last = pending.iter().rev().find(|c| match c {
                Change::Set(n, _) | Change::Reset(n) => n.eq_ignore_ascii_case(name),
                Change::ResetAll => true,
            });
            let value = match last {
                Some(Change::Set(..)) => match backend.and_then(|b| b.reported(name)) {
                    Some(v) => v.to_string(),
                    None => continue,
                },
                Some(_) => at_login.clone(),
                None => kept(name).unwrap_or_else(|| at_login.clone()),
            };
            if self.reported.get(name) != Some(&value) {
                self.reported.insert(name.clone(), value.clone());
                owed.push((spelled.clone(), value));
            }
        }
        owed
    }
}

/// `changes` with each SET value replaced by what `backend` (which ran them) last reported for
/// that parameter, when it reports it: the value the SET actually produced, spelled as the server
/// does. pgtenant applies it again in the client's later transactions, where the raw text could
/// mean something else (`SET DateStyle = 'dmy'` keeps the output style in force at the time).
pub fn as_reported(changes: Vec<Change>, backend: Option<&Backend>) -> Vec<Change> {
    changes
        .into_iter()
        .map(|c| match (c, backend) {
            (Change::Set(n, v), Some(b)) => {
                let v = b.reported(&n).map(str::to_string).unwrap_or(v);
                Change::Set(n, v)
            }
            (c, _) => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, value: &str) -> Vec<u8> {
        [name.as_bytes(), b"\0", value.as_bytes(), b"\0"].concat()
    }

    #[test]
    fn reset_returns_to_the_login_value_and_resets_report_only_changes() {
        let login = [("TimeZone".to_string(), "Europe/Paris".to_string()), ("DateStyle".into(), "ISO, MDY".into())];
        let mut v = ClientView::new(&login);
        v.applied.insert("timezone".into());
        // the backend's own value for an applied parameter, or one already reported: dropped
        assert!(!v.admit(&status("TimeZone", "UTC")));
        assert!(!v.admit(&status("DateStyle", "ISO, MDY")));
        v.changing.insert("datestyle".into());
        assert!(!v.admit(&status("DateStyle", "German, DMY")), "settled after the change, not before");
        v.changing.clear();
        assert!(v.admit(&status("DateStyle", "German, DMY")));
        // names fold to lower case whatever their length or alphabet
        let long = format!("x.{}", "Long".repeat(20));
        for name in [long.as_str(), "app.Ünïcode"] {
            assert!(v.admit(&status(name, "1")), "{name}");
            assert!(!v.admit(&status(&name.to_uppercase(), "1")), "{name}: reported already");
            assert!(v.admit(&status(&name.to_uppercase(), "2")), "{name}: a new value");
            assert_eq!(v.reported.get(&name.to_lowercase()).map(String::as_str), Some("2"), "{name}");
        }
        // RESET: the login value, not whatever the backend has
        let owed = v.after_changes(&[Change::Reset("timezone".into())], None);
        assert!(owed.is_empty(), "the client was never told another time zone: {owed:?}");
        let owed = v.after_changes(&[Change::ResetAll], None);
        assert_eq!(owed, [("DateStyle".to_string(), "ISO, MDY".to_string())]);
        assert!(v.after_changes(&[Change::ResetAll], None).is_empty());
        // unreported parameters are nobody's business
        assert!(v.after_changes(&[Change::Reset("statement_timeout".into())], None).is_empty());
    }

    #[test]
    fn changes_in_a_block_are_reported_as_they_stand_and_undone_on_rollback() {
        let login = [("DateStyle".to_string(), "ISO, MDY".to_string()), ("IntervalStyle".into(), "postgres".into())];
        let mut v = ClientView::new(&login);
        let none = |_: &str| None;
        v.changing.insert("datestyle".into());
        v.changing.insert("intervalstyle".into());
        // inside the block: a RESET is the login value (already told), a SET the backend's (not
        // known without a backend: nothing said)
        let pending = [Change::Reset("DateStyle".into()), Change::Set("IntervalStyle".into(), "iso_8601".into())];
        assert!(v.owed_for_changing(&pending, &none, None).is_empty());
        v.reported.insert("datestyle".into(), "German, DMY".into()); // as if the backend had said so
        assert_eq!(v.owed_for_changing(&pending, &none, None), [("DateStyle".to_string(), "ISO, MDY".to_string())]);
        // rolled back: the client's own values, its kept SET or else the login value
        v.reported.insert("intervalstyle".into(), "iso_8601".into());
        let kept = |n: &str| (n == "datestyle").then(|| "SQL, DMY".to_string());
        let mut owed = v.owed_for_changing(&[], &kept, None);
        owed.sort();
        assert_eq!(owed, [("DateStyle".to_string(), "SQL, DMY".to_string()), ("IntervalStyle".into(), "postgres".into())]);
        assert!(v.owed_for_changing(&[], &kept, None).is_empty(), "told once");
        // a parameter the server does not report is never told
        v.changing.insert("work_mem".into());
        let owed = v.owed_for_changing(&[Change::Reset("work_mem".into())], &none, None);
        assert!(owed.iter().all(|(n, _)| n != "work_mem"), "{owed:?}");
    }
}
