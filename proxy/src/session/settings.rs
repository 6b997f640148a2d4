//! The client's own settings, virtualised across backends: the tenant context, its startup
//! parameters, and the session-level `SET`s it ran. All of them go into the context statement, so
//! they hold in each of the client's transactions on whatever backend runs it, and never anywhere
//! else.

use std::collections::HashSet;

use super::inject::Injection;
use crate::client::params::ClientParams;
use crate::sql::set::Change;

/// Most settings one session's context statement carries: tenant settings, startup parameters and
/// session-level SETs together. The statement is prepared per arity on each backend and the replies
/// tracker recognizes arities up to 128 (`inject::context_arity`), two of which the signed context
/// takes; so a SET that would take the session past this is refused (`54000`).
pub const MAX_CONTEXT_SETTINGS: usize = 126;

#[derive(Debug)]
pub struct ClientSettings {
    /// Tenant settings (names and values from the token): fixed for the session.
    base_names: Vec<String>,
    base_values: Vec<String>,
    /// Startup parameters: the session defaults `RESET` returns to.
    startup: Vec<(String, String)>,
    /// Session-level SETs since, by name.
    overrides: Vec<(String, String)>,
    /// The signer in force (`tenant.signing_key`), and when the session began (unix seconds).
    signer: Option<std::sync::Arc<crate::signing::Signer>>,
    began: i64,
}

impl ClientSettings {
    pub fn new(base_names: Vec<String>, base_values: Vec<String>, startup: ClientParams) -> Self {
        let startup = startup.names.into_iter().zip(startup.values).collect();
        let began = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        ClientSettings { base_names, base_values, startup, overrides: Vec::new(), signer: None, began }
    }

    /// Client parameters in effect: startup values overlaid with session SETs.
    fn effective(&self) -> Vec<(String, String)> {
        let mut eff = self.startup.clone();
        for (n, v) in &self.overrides {
            match eff.iter_mut().find(|(k, _)| k.eq_ignore_ascii_case(n)) {
                Some(e) => e.1 = v.clone(),
                None => eff.push((n.clone(), v.clone())),
            }
        }
        eff
    }

    /// Lower-case names of the client parameters pgtenant applies per transaction; always
    /// `application_name`, which is set wherever the backend's differs from the client's.
    pub fn applied(&self) -> HashSet<String> {
        let mut applied: HashSet<String> = self.effective().into_iter().map(|(n, _)| n.to_lowercase()).collect();
        applied.insert(crate::protocol::APPLICATION_NAME.to_string());
        applied
    }

    /// The `application_name` the client's transactions run with: its own (from startup or a
    /// session-level SET), or pgtenant's when it has none (as on a backend of pgtenant's own).
    pub fn application_name(&self) -> &str {
        let set = self.overrides.iter().rev().chain(self.startup.iter().rev()).find(|(n, _)| n.eq_ignore_ascii_case(crate::protocol::APPLICATION_NAME));
        set.map_or(crate::backend::connect::OWN_APPLICATION_NAME, |(_, v)| v.as_str())
    }

    pub fn injection(&self) -> Injection {
        let mut eff = self.effective();
        eff.retain(|(n, _)| !n.eq_ignore_ascii_case(crate::protocol::APPLICATION_NAME));
        let names: Vec<String> = self.base_names.iter().cloned().chain(eff.iter().map(|(n, _)| n.clone())).collect();
        let values: Vec<String> = self.base_values.iter().cloned().chain(eff.into_iter().map(|(_, v)| v)).collect();
        let signing = self.signer.as_ref().map(|s| {
            let settings = self.base_names.iter().cloned().zip(self.base_values.iter().cloned()).filter(|(n, _)| n != "role").collect();
            (s.clone(), settings, self.began)
        });
        Injection::new(&names, &values, self.application_name().to_string(), signing)
    }

    /// Signs the context with `signer` from now on (None: stop signing).
    pub fn set_signer(&mut self, signer: Option<std::sync::Arc<crate::signing::Signer>>) {
        self.signer = signer;
    }

    /// The client's `default_transaction_*` defaults as SQL for a backend (see
    /// `crate::sql::txmode::defaults_sql`).
    pub fn tx_defaults(&self) -> String {
        crate::sql::txmode::defaults_sql(&self.effective())
    }

    /// Whether the client's transactions default to read-only (`default_transaction_read_only`,
    /// from its startup parameters or a session SET): they may run on a read replica.
    pub fn read_only_default(&self) -> bool {
        let name = crate::sql::txmode::READ_ONLY;
        let set = self.overrides.iter().rev().chain(self.startup.iter().rev()).find(|(n, _)| n.eq_ignore_ascii_case(name));
        set.is_some_and(|(_, v)| crate::routing::intent::is_on(v))
    }

    /// How many settings the context would carry once `changes` are applied (a name counts once,
    /// whatever its case).
    pub fn count_after(&self, changes: &[Change]) -> usize {
        let mut overrides: Vec<&str> = self.overrides.iter().map(|(n, _)| n.as_str()).collect();
        for c in changes {
            match c {
                Change::Set(n, _) if !overrides.iter().any(|k| k.eq_ignore_ascii_case(n)) => overrides.push(n),
                Change::Set(..) => {}
                Change::Reset(n) => overrides.retain(|k| !k.eq_ignore_ascii_case(n)),
                Change::ResetAll => overrides.clear(),
            }
        }
        let new = overrides.iter().filter(|n| !self.startup.iter().any(|(k, _)| k.eq_ignore_ascii_case(n))).count();
        self.base_names.len() + self.startup.len() + new
    }

    /// Bytes the client's session-level SETs take.
    pub fn bytes(&self) -> usize {
        self.overrides.iter().map(|(n, v)| n.len() + v.len()).sum()
    }

    /// The client's kept session-level value of parameter `name` (any case), if it set one.
    pub fn kept(&self, name: &str) -> Option<&str> {
        self.overrides.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn apply(&mut self, changes: &[Change]) {
        for c in changes {
            match c {
                Change::Set(n, v) => match self.overrides.iter_mut().find(|(k, _)| k.eq_ignore_ascii_case(n)) {
                    Some(e) => e.1 = v.clone(),
                    None => self.overrides.push((n.clone(), v.clone())),
                },
                Change::Reset(n) => self.overrides.retain(|(k, _)| !k.eq_ignore_ascii_case(n)),
                Change::ResetAll => self.overrides.clear(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_overlay_startup_and_reset_returns_to_it() {
        let startup = ClientParams { names: vec!["TimeZone".into()], values: vec!["Asia/Tokyo".into()] };
        let mut s = ClientSettings::new(vec!["app.tenant_id".into()], vec!["1".into()], startup);
        s.apply(&[Change::Set("timezone".into(), "UTC".into()), Change::Set("work_mem".into(), "8MB".into())]);
        assert_eq!(s.effective(), [("TimeZone".to_string(), "UTC".to_string()), ("work_mem".into(), "8MB".into())]);
        s.apply(&[Change::Reset("TIMEZONE".into())]);
        assert_eq!(s.effective()[0].1, "Asia/Tokyo");
        s.apply(&[Change::ResetAll]);
        assert_eq!(s.effective().len(), 1);
        assert!(s.applied().contains("timezone"));
        assert!(!s.read_only_default());
        s.apply(&[Change::Set("DEFAULT_TRANSACTION_READ_ONLY".into(), "on".into())]);
        assert!(s.read_only_default());
        s.apply(&[Change::Reset("default_transaction_read_only".into())]);
        assert!(!s.read_only_default());
    }

    #[test]
    fn count_after_counts_each_name_once() {
        let startup = ClientParams { names: vec!["TimeZone".into()], values: vec!["UTC".into()] };
        let mut s = ClientSettings::new(vec!["app.tenant_id".into()], vec!["1".into()], startup);
        assert_eq!(s.count_after(&[]), 2);
        let set = |n: &str| Change::Set(n.into(), "x".into());
        assert_eq!(s.count_after(&[set("timezone"), set("a.b"), set("A.B")]), 3);
        s.apply(&[set("a.b"), set("a.c")]);
        assert_eq!(s.count_after(&[]), 4);
        assert_eq!(s.count_after(&[Change::Reset("a.B".into()), set("a.d")]), 4);
        assert_eq!(s.count_after(&[Change::ResetAll, set("a.e")]), 3);
    }
}
