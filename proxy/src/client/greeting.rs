//! What a client is told at login: the ParameterStatus values a direct connection would report.
//!
//! Postgres reports the parameters a client sets at startup in its own spelling (`utf-8` → `UTF8`,
//! `iso,dmy` → `ISO, DMY`, `utc` → `UTC`) and refuses a value it does not accept with a FATAL
//! error, so pgtenant asks the server (`pool::probe`). In transaction mode any pooled backend
//! answers, and the answers are remembered per server, so common values cost no round trip. In
//! session mode the client's own backend answers: it is leased here, before BackendKeyData, so
//! the client can be given that backend's pid, and everything the backend reports with the
//! client's parameters applied.

use crate::error::{sqlstate, PgError, Severity};
use crate::pool::probe::{self, ProbeError};
use crate::pool::{Lease, Pool, ServerInfo, TenantKey};

use super::params::ClientParams;

pub struct Greeting {
    /// The client's parameters to apply in each of its transactions (the reported ones spelled as
    /// the server spells them); values the server uses anyway are left out.
    pub params: ClientParams,
    /// The ParameterStatus messages to send, names as the server spells them, in its order.
    pub reported: Vec<(String, String)>,
    /// Session mode: the backend the client keeps for its whole session.
    pub lease: Option<Lease>,
}

/// Checks and spells the client's startup `pairs` (in the order Postgres applies them) on `pool`'s
/// server; `session` leases the client's backend first.
pub async fn greet(
    pool: &Pool,
    info: &ServerInfo,
    pairs: Vec<(String, String)>,
    session: bool,
    tenant: &TenantKey,
) -> Result<Greeting, PgError> {
    // a connection opened for this client logs in with its name (see `Pool::acquire`)
    let name = pairs.iter().rev().find(|(n, _)| n.eq_ignore_ascii_case(crate::protocol::APPLICATION_NAME)).map(|(_, v)| v.clone());
    let name = name.as_deref().unwrap_or(crate::backend::connect::OWN_APPLICATION_NAME);
    let (spelled, reported, lease) = if session {
        let lease = pool.acquire(tenant, name).await.map_err(fatal)?;
        let show: Vec<String> = lease.backend.reported.iter().map(|(k, _)| k.clone()).collect();
        let (answer, lease) = ask(pool, lease, &pairs, &show).await?;
        (answer.values, show.into_iter().zip(answer.shown).collect(), Some(lease))
    } else {
        (spell(pool, &pairs, tenant, name).await?, info.params.clone(), None)
    };
    // A reported parameter is kept as the server spells it: that is what the client was told, and
    // it means the same in every transaction (`DateStyle=dmy` alone builds on the style in force).
    // Others keep the client's text (a real number may print rounded).
    let reports = |n: &str| info.params.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    let mut params = ClientParams::last_values(
        pairs.into_iter().zip(spelled).map(|((n, raw), s)| if reports(&n) { (n, s) } else { (n, raw) }),
    );
    let reported = reported
        .into_iter()
        .map(|(k, v)| {
            let v = match (params.get(&k), k.as_str()) {
                (Some(c), _) => c.to_string(),
                // a direct connection has none unless the client sets one (the backend's is pgtenant's)
                (None, "application_name") => String::new(),
                (None, _) => v,
            };
            (k, v)
        })
        .collect();
    // `application_name` differs from one backend connection to the next (each logs in with the
    // name of the client it was opened for): whether to set it is decided per transaction
    params.retain(|n, v| {
        n.eq_ignore_ascii_case(crate::protocol::APPLICATION_NAME) || !info.params.iter().any(|(k, sv)| k.eq_ignore_ascii_case(n) && sv == v)
    });
    Ok(Greeting { params, reported, lease })
}

/// The server's spelling of each pair's value, from what the server said before where possible.
async fn spell(pool: &Pool, pairs: &[(String, String)], tenant: &TenantKey, name: &str) -> Result<Vec<String>, PgError> {
    // A later value for the same name may build on the earlier one (`DateStyle`): ask in full.
    let distinct = pairs.iter().enumerate().all(|(i, (n, _))| !pairs[..i].iter().any(|(m, _)| m.eq_ignore_ascii_case(n)));
    let mut spelled: Vec<Option<String>> =
        pairs.iter().map(|(n, v)| if distinct { pool.spellings.get(n, v) } else { None }).collect();
    let missing: Vec<(String, String)> =
        pairs.iter().zip(&spelled).filter(|(_, s)| s.is_none()).map(|(p, _)| p.clone()).collect();
    if missing.is_empty() {
        return Ok(spelled.into_iter().flatten().collect());
    }
    let lease = pool.acquire(tenant, name).await.map_err(fatal)?;
    let (answer, lease) = ask(pool, lease, &missing, &[]).await?;
    pool.release(lease);
    let mut answers = missing.iter().zip(answer.values);
    for s in spelled.iter_mut().filter(|s| s.is_none()) {
        let ((name, value), canonical) = answers.next().expect("one answer per missing value");
        if distinct {
            pool.spellings.insert(name, value, &canonical);
        }
        *s = Some(canonical);
    }
    Ok(spelled.into_iter().flatten().collect())
}

/// One probe on a leased backend, after clearing what a previous session left there. A refused
/// value gives the lease back to the pool; a failed connection is dropped (which closes it).
async fn ask(
    pool: &Pool,
    mut lease: Lease,
    pairs: &[(String, String)],
    show: &[String],
) -> Result<(probe::Answer, Lease), PgError> {
    let reset = lease.backend.take_reset().map(crate::pool::Reset::into_sql);
    match probe::ask(&mut lease.backend, reset.as_deref(), pairs, show).await {
        Ok(a) => Ok((a, lease)),
        Err(ProbeError::Refused(e)) => {
            pool.release(lease);
            Err(e)
        }
        Err(ProbeError::Lost(why)) => {
            tracing::warn!(backend = %pool.target().describe(), reason = %why, "backend failed while checking startup parameters");
            Err(PgError::fatal(sqlstate::CONNECTION_FAILURE, format!("pgtenant: lost the connection to the database server: {why}")))
        }
    }
}

fn fatal(e: PgError) -> PgError {
    PgError { severity: Severity::Fatal, ..e }
}
