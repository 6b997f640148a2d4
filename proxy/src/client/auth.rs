//! Login: the client's password is a JWT. pgtenant asks for it in cleartext (protect the socket
//! with TLS), verifies it, maps its claims to the tenant context, and greets the client the way
//! Postgres does (AuthenticationOk, ParameterStatus as `greeting` works them out, BackendKeyData
//! with pgtenant's own secret key, ReadyForQuery). Neither the token nor any part of it is ever
//! logged or echoed.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::audit::AuditLog;
use crate::cancel::{CancelRegistry, Registration};
use crate::error::{sqlstate, PgError};
use crate::jwt::JwtError;
use crate::net::Stream;
use crate::pool::Pool;
use crate::protocol::frame::read_frame;
use crate::protocol::{build, peek};
use crate::tenant::{ContextError, TenantContext};

use super::params::ClientParams;
use super::rules::{Auth, AuthSlot};
use super::{greeting, params};

/// What a login needs from the proxy, and nothing more.
pub struct LoginInputs<'a> {
    /// The login rules in force; read at each step that needs them, so a reload reaches logins
    /// still waiting for their password.
    pub rules: &'a AuthSlot,
    /// The tenant pool (its backend database is the one clients must name).
    pub pool: &'a Pool,
    /// The clusters tenants are placed on (`pool` is the default one's primary).
    pub router: &'a crate::routing::Router,
    /// The bypass pool, when `[bypass]` runs one.
    pub bypass: Option<&'a Pool>,
    /// `pool.mode = "session"`: the login leases the backend the client keeps.
    pub session_mode: bool,
    pub cancels: &'a Arc<CancelRegistry>,
    pub audit: &'a AuditLog,
}

/// A logged-in client, ready for its session (the server builds the session's own types from it).
pub struct LoggedIn {
    pub stream: Stream,
    /// Bytes the client sent after its password (pipelined first queries).
    pub leftover: BytesMut,
    pub context: TenantContext,
    /// The names of the settings the context sets (`context.values` are their values).
    pub setting_names: Vec<String>,
    /// The client's startup parameters, to apply in each of its transactions.
    pub params: ClientParams,
    /// The ParameterStatus values the client was told (what it believes its settings are).
    pub reported: Vec<(String, String)>,
    pub cancel: Registration,
    pub user: String,
    pub guard: Arc<crate::guard::Guard>,
    /// A trusted worker for the bypass pool.
    pub bypass: bool,
    /// The client asked for a standby (`target_session_attrs`, see `crate::routing::intent`).
    pub prefers_standby: bool,
    /// Session mode: the backend the client keeps (its pid is the one in BackendKeyData).
    pub lease: Option<crate::pool::Lease>,
}

/// Largest password message accepted (a JWT is well below this).
const MAX_PASSWORD_MESSAGE: usize = 32 * 1024;

pub async fn login(
    inputs: &LoginInputs<'_>,
    mut stream: Stream,
    params: &HashMap<String, String>,
    peer: std::net::SocketAddr,
) -> Result<LoggedIn, (Stream, PgError)> {
    let user = match params.get("user").filter(|u| !u.is_empty()) {
        Some(u) => u.clone(),
        None => {
            return Err((
                stream,
                PgError::fatal(
                    sqlstate::INVALID_AUTHORIZATION,
                    "no PostgreSQL user name specified in startup packet",
                ),
            ))
        }
    };
    if let Some(options) = params.get("options") {
        if let Err(e) = inputs.rules.get().guard.check_startup_options(options) {
            tracing::info!(user = %user, result = "refused", reason = %e.message, "login");
            return Err((stream, PgError { severity: crate::error::Severity::Fatal, ..e }));
        }
    }
    let prefers_standby = match crate::routing::intent::startup_prefers_standby(params) {
        Ok(p) => p,
        Err(e) => return Err((stream, e)),
    };
    let database = params.get("database").filter(|d| !d.is_empty()).unwrap_or(&user);
    let served = &inputs.pool.target().database;
    if database != served {
        return Err((
            stream,
            PgError::fatal(sqlstate::INVALID_CATALOG_NAME, format!("database \"{database}\" does not exist"))
                .with_hint(format!("pgtenant serves database \"{served}\"; connect with dbname={served}")),
        ));
    }

    let mut buf = BytesMut::new();
    let token = match ask_password(&mut stream, &mut buf).await {
        Ok(t) => t,
        Err(e) => return Err((stream, e)),
    };

    let auth = inputs.rules.get();
    let (names, context, bypass) = match identify(&auth, &token).await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(user = %user, result = "rejected", reason = %e.message, "login");
            metrics::counter!(crate::metrics::LOGINS, "result" => "rejected", "sqlstate" => e.code).increment(1);
            return Err((stream, e));
        }
    };
    drop(token);
    let pool = match (inputs.bypass, bypass) {
        (Some(b), true) => b,
        (None, true) => {
            return Err((stream, PgError::fatal(sqlstate::CANNOT_CONNECT_NOW, "pgtenant: the bypass pool is not running")))
        }
        (_, false) => match inputs.router.cluster_of(&context.tenant, context.cluster.as_deref()) {
            // the tenant's cluster: its server facts, and its backend in session mode
            Ok(i) => inputs.router.primary(i).as_ref(),
            Err(e) => {
                tracing::info!(user = %user, result = "refused", reason = %e.message, "login");
                return Err((stream, e));
            }
        },
    };

    // the first login connects, with its client's name (see `Pool::acquire`)
    let name = params.get(crate::protocol::APPLICATION_NAME).map_or(crate::backend::connect::OWN_APPLICATION_NAME, String::as_str);
    let info = match pool.server_info(name).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(user = %user, result = "backend unavailable", "login");
            return Err((stream, PgError { severity: crate::error::Severity::Fatal, ..e }));
        }
    };
    if info.params.iter().any(|(k, v)| k == "is_superuser" && v == "on") {
        tracing::error!(backend = %pool.target().describe(), "backend role is a superuser: refusing clients");
        return Err((
            stream,
            PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                "pgtenant: the backend role is a superuser, so row-level security would not isolate tenants",
            )
            .with_hint("set backend.url to a restricted role (no superuser, no BYPASSRLS); pgtenant doctor explains"),
        ));
    }
    let pairs = match params::from_startup(params, &info.settings, &auth.guard) {
        Ok(p) => p,
        Err(e) => return Err((stream, e)),
    };
    let tenant: crate::pool::TenantKey = Arc::from(context.tenant.as_str());
    let greeting = match greeting::greet(pool, &info, pairs, inputs.session_mode, &tenant).await {
        Ok(g) => g,
        Err(e) => return Err((stream, e)),
    };
    let backend = greeting.lease.as_ref().map(|l| (l.backend.pid, l.backend.secret_key));
    // a backend not on the default server (bypass, another cluster) is cancelled on its own server
    let cancel = inputs.cancels.register((!std::ptr::eq(pool, inputs.pool)).then(|| pool.target().clone()), backend);
    // a trusted worker's login is on record before it gets in, or it does not get in
    let recorded = inputs.audit.record(
        "login",
        serde_json::json!({
            "result": "ok",
            "pool": if bypass { "bypass" } else { "tenant" },
            "tenant": (!bypass).then_some(&context.tenant),
            "subject": context.subject,
            "user": user,
            "client": peer.to_string(),
            "session": cancel.pid,
        }),
    ).await;
    if bypass && recorded.is_err() {
        if let Some(lease) = greeting.lease {
            pool.release(lease); // idle and clean: the probe ended with ReadyForQuery
        }
        return Err((
            stream,
            PgError::fatal(sqlstate::IO_ERROR, "pgtenant: the audit log cannot be written, so bypass logins are refused")
                .with_hint("check audit.path (disk full? permissions?) and the pgtenant log"),
        ));
    }
    if bypass {
        metrics::counter!(crate::metrics::BYPASS_LOGINS).increment(1);
        tracing::warn!(user = %user, sub = context.subject.as_deref().unwrap_or(""), %peer, "bypass login (row-level security not applied)");
    }
    let mut out = BytesMut::new();
    build::auth_ok(&mut out);
    for (k, v) in &greeting.reported {
        build::parameter_status(&mut out, k, v);
    }
    build::backend_key_data(&mut out, cancel.pid, cancel.secret);
    build::ready_for_query(&mut out, b'I');
    if let Err(e) = stream.write_all(&out).await {
        return Err((stream, PgError::fatal(sqlstate::CONNECTION_FAILURE, e.to_string())));
    }
    tracing::info!(user = %user, tenant = %context.tenant.replace('\0', ""), sub = context.subject.as_deref().unwrap_or(""), result = "ok", "login");
    metrics::counter!(crate::metrics::LOGINS, "result" => "ok", "sqlstate" => "00000").increment(1);
    Ok(LoggedIn {
        stream,
        leftover: buf,
        context,
        setting_names: names,
        params: greeting.params,
        reported: greeting.reported,
        cancel,
        user,
        guard: auth.guard.clone(),
        bypass,
        prefers_standby,
        lease: greeting.lease,
    })
}

/// Asks for the password in cleartext and reads it (the token); whatever the client sent after it
/// stays in `buf`. Also the admin console's login (`crate::console`).
pub async fn ask_password(stream: &mut Stream, buf: &mut BytesMut) -> Result<String, PgError> {
    let mut out = BytesMut::new();
    build::auth_cleartext(&mut out);
    if let Err(e) = stream.write_all(&out).await {
        return Err(PgError::fatal(sqlstate::CONNECTION_FAILURE, e.to_string()));
    }
    match read_frame(stream, buf, MAX_PASSWORD_MESSAGE).await {
        Ok(Some(f)) if f.tag == b'p' => match peek::cstr(f.body()) {
            Some((pw, _)) => Ok(String::from_utf8_lossy(pw).into_owned()),
            None => Err(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "malformed password message")),
        },
        Ok(Some(_)) => Err(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "expected a password message")),
        Ok(None) => Err(PgError::fatal(sqlstate::CONNECTION_FAILURE, "client closed the connection during authentication")),
        Err(e) => Err(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, format!("pgtenant: {e}"))),
    }
}

/// Who the token speaks for: the setting names and context of the session, and whether it is a
/// trusted worker for the bypass pool (see `bypass`).
async fn identify(auth: &Auth, token: &str) -> Result<(Vec<String>, TenantContext, bool), PgError> {
    if token.is_empty() {
        return Err(PgError::fatal(sqlstate::INVALID_PASSWORD, "pgtenant: no token given as the password")
            .with_hint("pass a JWT as the password, e.g. PGPASSWORD=<jwt>"));
    }
    if let Some(bp) = &auth.bypass {
        if let Some(claims) = bp.verify(token).await {
            let (names, context) = bp.context(&claims);
            return Ok((names, context, true));
        }
    }
    let context = verify(auth, token).await?;
    Ok((auth.mapping.setting_names().to_vec(), context, false))
}

async fn verify(auth: &Auth, token: &str) -> Result<TenantContext, PgError> {
    let claims = auth.verifier.verify_fresh(token).await.map_err(|e| {
        let err = PgError::fatal(sqlstate::INVALID_PASSWORD, format!("pgtenant: JWT rejected: {e}"));
        match e {
            JwtError::KeysNotLoaded => PgError::fatal(sqlstate::CANNOT_CONNECT_NOW, format!("pgtenant: {e}"))
                .with_hint("pgtenant could not fetch jwt.jwks_url yet; try again shortly (see /readyz)"),
            JwtError::Malformed => err.with_hint("the password must be a signed JWT (header.payload.signature)"),
            JwtError::Expired => err.with_hint("get a fresh token"),
            JwtError::WrongAudience | JwtError::WrongIssuer => {
                err.with_hint("check jwt.audience / jwt.issuer in the pgtenant config against the token")
            }
            _ => err,
        }
    })?;
    if auth.bypass.as_ref().is_some_and(|bp| bp.claims_bypass(&claims)) {
        return Err(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "pgtenant: this token claims the bypass role but is not signed by the bypass key",
        )
        .with_hint("bypass tokens must be signed with the [bypass.jwt] key; tenant tokens must not carry the bypass claim"));
    }
    auth.mapping.context(&claims).map_err(|e| {
        let err = PgError::fatal(sqlstate::INVALID_AUTHORIZATION, format!("pgtenant: {e}"));
        match e {
            ContextError::MissingClaim(_) => err.with_hint("the token must carry every claim named in tenant.settings"),
            _ => err,
        }
    })
}
