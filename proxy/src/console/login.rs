//! Logging in to the admin console: the password is a JWT, verified by the `[jwt]` keys like any
//! other, and it must carry the admin claim (`[admin] token_claim` equal to `token_value`, or an
//! array holding it). Any other token, however valid for a tenant, gets `FATAL 28000`. The token is
//! never logged.

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::{Console, Source};
use crate::error::{sqlstate, PgError};
use crate::net::Stream;
use crate::protocol::build;

/// Whether `claims` carry `claim` (a dotted path) equal to `value`, or an array holding it.
pub fn is_admin(claims: &serde_json::Value, claim: &str, value: &str) -> bool {
    let found = claim.split('.').try_fold(claims, |v, part| v.get(part));
    let equal = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s == value,
        serde_json::Value::Bool(b) => value.parse::<bool>().is_ok_and(|p| p == *b),
        serde_json::Value::Number(n) => value.parse::<serde_json::Number>().is_ok_and(|p| p == *n),
        _ => false,
    };
    match found {
        Some(serde_json::Value::Array(items)) => items.iter().any(equal),
        Some(v) => equal(v),
        None => false,
    }
}

/// Runs the console login; on success the client has been greeted and the console is ready.
pub async fn login(
    proxy: &impl Source,
    mut stream: Stream,
    params: &HashMap<String, String>,
    peer: SocketAddr,
) -> Result<Console, (Stream, PgError)> {
    let user = params.get("user").cloned().unwrap_or_default();
    let mut buf = BytesMut::new();
    let token = match crate::client::auth::ask_password(&mut stream, &mut buf).await {
        Ok(t) => t,
        Err(e) => return Err((stream, e)),
    };
    let config = proxy.config();
    let (Some(claim), Some(value)) = (&config.admin.token_claim, &config.admin.token_value) else {
        return Err((stream, off()));
    };
    let refused = |reason: &str| {
        tracing::info!(user = %user, %peer, result = "refused", reason, "console login");
        metrics::counter!(crate::metrics::LOGINS, "result" => "rejected", "sqlstate" => sqlstate::INVALID_AUTHORIZATION).increment(1);
    };
    let claims = match proxy.verify_token(&token).await {
        Ok(c) => serde_json::Value::Object(c),
        Err(e) => {
            refused(&e.to_string());
            return Err((stream, PgError::fatal(sqlstate::INVALID_PASSWORD, format!("pgtenant: JWT rejected: {e}"))));
        }
    };
    drop(token);
    if !is_admin(&claims, claim, value) {
        refused("not an admin token");
        return Err((
            stream,
            PgError::fatal(sqlstate::INVALID_AUTHORIZATION, "pgtenant: this token does not grant access to the admin console")
                .with_hint(format!("the console needs a token whose claim \"{claim}\" is the value of [admin] token_value")),
        ));
    }
    let subject = claims.get("sub").and_then(|s| s.as_str()).unwrap_or("").to_string();
    let mut out = BytesMut::new();
    build::auth_ok(&mut out);
    let version = proxy.pool().reported_param("server_version").unwrap_or_else(|| format!("{}/pgtenant", env!("CARGO_PKG_VERSION")));
    for (k, v) in [
        ("server_version", version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", params.get("application_name").map_or("", String::as_str)),
    ] {
        build::parameter_status(&mut out, k, v);
    }
    build::ready_for_query(&mut out, b'I');
    if let Err(e) = stream.write_all(&out).await {
        return Err((stream, PgError::fatal(sqlstate::CONNECTION_FAILURE, e.to_string())));
    }
    tracing::info!(user = %user, sub = %subject, %peer, result = "ok", "console login");
    metrics::counter!(crate::metrics::LOGINS, "result" => "ok", "sqlstate" => "00000").increment(1);
    Ok(Console { stream, buf, subject, peer })
}

/// The error for `dbname=pgtenant` while no admin claim is configured.
fn off() -> PgError {
    PgError::fatal(sqlstate::INVALID_AUTHORIZATION, "pgtenant: the admin console is off")
        .with_hint("set [admin] token_claim and token_value in the pgtenant config to turn it on")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_admin_claim_matches_a_value_or_an_array_holding_it() {
        let c = json!({ "role": "pgtenant-admin", "roles": ["x", "pgtenant-admin"], "app": { "admin": true }, "n": 7 });
        assert!(is_admin(&c, "role", "pgtenant-admin"));
        assert!(is_admin(&c, "roles", "pgtenant-admin"));
        assert!(is_admin(&c, "app.admin", "true"));
        assert!(is_admin(&c, "n", "7"));
        assert!(!is_admin(&c, "role", "admin"));
        assert!(!is_admin(&c, "roles", "y"));
        assert!(!is_admin(&c, "app", "true"));
        assert!(!is_admin(&c, "missing", "pgtenant-admin"));
    }
}
