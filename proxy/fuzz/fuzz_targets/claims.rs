//! Arbitrary bytes as JWT material and claims.
//!
//! - As a claims object (`serde_json::from_slice`, skipped unless it is a JSON object): through
//!   `tenant::TenantMapping::context` for a mapping with plain and nested claim paths
//!   (`app.tenant_id -> tenant_id`, `app.user_id -> sub`, `app.org_id -> org.id`) and the whole-claims
//!   setting, and for a mapping with a `role_claim` (`app_metadata.role`) and `allowed_roles`.
//! - As a token string: `jwt::JwtVerifier::verify` with an HS256 secret (and with issuer/audience
//!   rules).
//! - As the payload of a correctly HS256-signed token (and, when the input holds a NUL byte, as
//!   `header NUL payload`), so `verify` gets past the signature into header and claims validation.
//! - As a JWKS document: `jwt::jwks::parse_set`.
//!
//! Properties checked besides "no panic":
//! - a context has one value per setting name, no value contains NUL, the whole-claims value is
//!   the claims object as JSON (floats up to a few ULPs), a string claim is passed through byte for byte, the log label is
//!   at most 64 characters, and the role is one of `allowed_roles`;
//! - a token `verify` accepts has an `exp` claim, and for a token signed here `verify` returns
//!   exactly the signed payload object.

#![no_main]

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use pgtenant::config::{JwtConfig, TenantConfig};
use pgtenant::jwt::{jwks, JwtVerifier};
use pgtenant::tenant::TenantMapping;
use serde_json::{Map, Value};

const SECRET: &str = "fuzz-secret-0123456789";

struct Env {
    plain: TenantMapping,
    roles: TenantMapping,
    verifier: JwtVerifier,
    strict: JwtVerifier,
    key: EncodingKey,
}

fn env() -> &'static Env {
    static E: OnceLock<Env> = OnceLock::new();
    E.get_or_init(|| {
        let mut cfg = TenantConfig::default();
        cfg.settings.insert("app.tenant_id".into(), "tenant_id".into());
        cfg.settings.insert("app.user_id".into(), "sub".into());
        cfg.settings.insert("app.org_id".into(), "org.id".into());
        cfg.claims_setting = "request.jwt.claims".into();
        let plain = TenantMapping::from_config(&cfg).expect("mapping");
        let mut cfg = TenantConfig::default();
        cfg.settings.insert("app.tenant_id".into(), "tenant_id".into());
        cfg.claims_setting = String::new();
        cfg.role_claim = Some("app_metadata.role".into());
        cfg.allowed_roles = vec!["authenticated".into(), "anon".into()];
        let roles = TenantMapping::from_config(&cfg).expect("mapping");
        let verifier = JwtVerifier::from_config(&JwtConfig { secret: Some(SECRET.into()), ..Default::default() }).expect("verifier");
        let strict = JwtVerifier::from_config(&JwtConfig {
            secret: Some(SECRET.into()),
            issuer: Some("https://issuer.example".into()),
            audience: Some("pgtenant".into()),
            leeway_secs: Some(0),
            ..Default::default()
        })
        .expect("verifier");
        Env { plain, roles, verifier, strict, key: EncodingKey::from_secret(SECRET.as_bytes()) }
    })
}

fn check_mapping(e: &Env, claims: &Map<String, Value>) {
    if let Ok(c) = e.plain.context(claims) {
        let names = e.plain.setting_names();
        assert_eq!(c.values.len(), names.len());
        assert!(c.values.iter().all(|v| !v.contains('\0')));
        assert!(c.tenant.chars().count() <= 64);
        if let Some(Value::String(t)) = claims.get("tenant_id") {
            let i = names.iter().position(|n| n == "app.tenant_id").expect("name");
            assert_eq!(&c.values[i], t);
        }
        let whole = c.values.last().expect("claims setting");
        let back: Value = serde_json::from_str(whole).expect("claims setting is JSON");
        assert!(same_json(&back, &Value::Object(claims.clone())), "claims setting differs from the claims:\n{back:?}\n{claims:?}");
    }
    if let Ok(c) = e.roles.context(claims) {
        assert_eq!(c.values.len(), e.roles.setting_names().len());
        let role = c.values.last().expect("role");
        assert!(role == "authenticated" || role == "anon", "role {role:?} accepted");
        assert_eq!(e.roles.setting_names().last().map(String::as_str), Some("role"));
    }
}

/// JSON equality, except that floats may differ in the last bits: serde_json's default float
/// parser (no `float_roundtrip` feature) is not always correctly rounded, so printing a parsed float
/// and parsing it again can move it by an ULP (found by this target: regressions/claims/).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x.is_f64() || y.is_f64() {
                let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
                x == y || (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs())
            } else {
                x == y
            }
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// `header.payload.signature` signed with the verifier's secret.
fn signed(e: &Env, header: &[u8], payload: &[u8]) -> String {
    let msg = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &e.key, Algorithm::HS256).expect("HMAC signing");
    format!("{msg}.{sig}")
}

fn check_token(e: &Env, token: &str, payload: Option<&[u8]>) {
    for v in [&e.verifier, &e.strict] {
        if let Ok(claims) = v.verify(token) {
            if let Some(payload) = payload {
                let want: Value = serde_json::from_slice(payload).expect("accepted payload is JSON");
                assert_eq!(Value::Object(claims.clone()), want);
            }
            assert!(claims.contains_key("exp"));
            check_mapping(e, &claims);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let e = env();
    if let Ok(Value::Object(claims)) = serde_json::from_slice::<Value>(data) {
        check_mapping(e, &claims);
    }
    // the input as a token string
    check_token(e, &String::from_utf8_lossy(data), None);
    // the input as a signed payload, or as header NUL payload
    match data.iter().position(|&b| b == 0) {
        None => check_token(e, &signed(e, br#"{"alg":"HS256","typ":"JWT"}"#, data), Some(data)),
        Some(i) => check_token(e, &signed(e, &data[..i], &data[i + 1..]), Some(&data[i + 1..])),
    }
    // the input as a JWKS document
    let _ = jwks::parse_set(data, "fuzz");
});
