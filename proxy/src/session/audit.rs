//! What a session writes to the audit log (`crate::audit`): statements it refuses, as fingerprints,
//! and every statement of a trusted bypass session, recorded before it runs. A bypass statement
//! whose record cannot be written (or is not acknowledged in `audit.write_timeout_ms`) does not run.

use super::*;

impl Session {
    /// Refuses a client statement and writes it to the audit log as a fingerprint (its shape
    /// without literal values).
    pub(super) async fn refuse_statement(&mut self, err: PgError, sql_text: &[u8], guard: &str, simple: bool) -> Flow {
        let fp = sql::fingerprint::fingerprint(sql_text);
        let _ = self.shared.audit.record(
            "statement_refused",
            serde_json::json!({
                "pool": if self.who.bypass { "bypass" } else { "tenant" },
                "tenant": (!self.who.bypass).then_some(&*self.who.tenant),
                "subject": self.who.subject,
                "client": self.who.client.to_string(),
                "session": self.who.login,
                "guard": guard,
                "sqlstate": err.code,
                "fingerprint": fp.hash,
                "statement": fp.text,
            }),
        ).await;
        self.refuse(err, simple)
    }

    /// A trusted worker's statement (simple Query, Execute, FunctionCall) goes to the audit log
    /// before it runs; if the log cannot be written, the statement does not run.
    pub(super) async fn audit_bypass(&mut self, f: &Frame) -> Result<(), PgError> {
        let (protocol, text): (&str, &[u8]) = match f.tag {
            b'Q' => ("simple", peek::query_msg(f.body()).unwrap_or_default()),
            b'E' => {
                let portal = peek::execute_msg(f.body()).unwrap_or_default();
                let Some(def) = self.statements.portal(portal) else {
                    // not bound through pgtenant (a SQL cursor, or a Bind the server refused):
                    // recorded by its name, never as some other (or an empty) statement
                    let name = String::from_utf8_lossy(&portal[..portal.len().min(64)]).into_owned();
                    return self.write_bypass_record("extended", None, Some(name)).await;
                };
                let end = def.key.iter().position(|&b| b == 0).unwrap_or(def.key.len());
                let fp = sql::fingerprint::fingerprint(&def.key[..end]);
                return self.write_bypass_record("extended", Some(fp), None).await;
            }
            b'F' => ("function_call", b"".as_slice()),
            _ => return Ok(()),
        };
        let fp = sql::fingerprint::fingerprint(text);
        self.write_bypass_record(protocol, Some(fp), None).await
    }

    /// `fp`: the statement's fingerprint; None with the `portal` name when pgtenant does not know
    /// the statement an Execute runs.
    async fn write_bypass_record(&self, protocol: &str, fp: Option<sql::fingerprint::Fingerprint>, portal: Option<String>) -> Result<(), PgError> {
        crate::metrics::hot().bypass_statements.increment(1);
        let mut fields = serde_json::json!({
            "pool": "bypass",
            "subject": self.who.subject,
            "client": self.who.client.to_string(),
            "session": self.who.login,
            "protocol": protocol,
            "fingerprint": fp.as_ref().map(|f| &f.hash),
            "statement": fp.as_ref().map(|f| &f.text),
        });
        if let Some(name) = portal {
            fields["portal"] = serde_json::Value::String(name);
        }
        self.shared
            .audit
            .record("bypass_statement", fields)
            .await
            .map_err(|_| {
                PgError::error(sqlstate::IO_ERROR, "pgtenant: the audit log cannot be written, so this bypass statement is refused")
                    .with_hint("check audit.path (disk full? permissions?) and the pgtenant log")
            })
    }
}
