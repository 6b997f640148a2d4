//! Bind of a statement with `set_config` calls whose name or value is a bind parameter: the guard
//! decides them with the Bind's values (see `crate::guard::bind`) before the Bind goes out.

use crate::protocol::peek;
use crate::sql::TxEffect;

use super::{Flow, Session};

impl Session {
    /// Records the portal a Bind creates. A statement with `set_config` calls to decide at Bind is
    /// checked first: a refused Bind is answered like a Bind that failed on the server (the
    /// transaction aborts, the batch is skipped to Sync) and leaves no portal; an accepted one
    /// carries the session-level settings it makes to the Execute (see `note_changes`).
    pub(super) fn bind_portal(&mut self, body: &[u8], portal: &[u8], stmt: &[u8]) -> Result<Option<TxEffect>, Flow> {
        let Some(def) = self.statements.statement(stmt).cloned() else { return Ok(self.statements.bind(portal, stmt)) };
        let Some(calls) = def.bind_checks.clone() else { return Ok(self.statements.bind(portal, stmt)) };
        let decided = match peek::bind_params(body) {
            Some(params) => self.guard.check_bound(&calls, &params),
            None => Err(crate::guard::malformed_bind()),
        };
        let refused = match decided {
            Ok(changes) => match self.check_settings_budget(&changes) {
                Ok(()) => return Ok(self.statements.bind_with(portal, stmt, changes)),
                Err(e) => {
                    self.statements.close(b'P', portal);
                    return Err(self.refuse(e, false));
                }
            },
            Err(e) => e,
        };
        self.statements.close(b'P', portal);
        let end = def.key.iter().position(|&b| b == 0).unwrap_or(def.key.len());
        Err(self.refuse_statement(refused, &def.key[..end], "guard", false))
    }
}
