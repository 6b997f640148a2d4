//! JWT verification: the client's password is a signed token, and this module decides whether to
//! believe it.
//!
//! The accepted algorithms follow from the configured *key*, never from the token: an HMAC secret
//! accepts only HS256/384/512, an RSA key only RS*/PS*, an EC key ES256/ES384, an Ed25519 key EdDSA.
//! That refuses `alg: none` and algorithm confusion (an HS256 token "signed" with an RSA public key).
//! `exp` is required; `nbf`, `iss` and `aud` are checked as configured, with leeway. Error texts are
//! short reasons for the client and the log, and never contain the token.

pub mod https;
pub mod jwks;

use std::sync::Arc;

use jsonwebtoken::{decode, decode_header, errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::config::{ConfigError, JwtConfig};
use jwks::{KeyList, RemoteKeys};

/// Longest token accepted.
const MAX_TOKEN_LEN: usize = 16 * 1024;
const DEFAULT_LEEWAY: u64 = 30;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token")]
    Malformed,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("bad signature")]
    BadSignature,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("wrong audience")]
    WrongAudience,
    #[error("algorithm {0} not allowed")]
    AlgorithmNotAllowed(String),
    #[error("unknown key id")]
    UnknownKeyId,
    #[error("token has no exp claim")]
    MissingExp,
    #[error("token claims are not a JSON object")]
    NotAnObject,
    #[error("signing keys not loaded yet (jwt.jwks_url has not answered)")]
    KeysNotLoaded,
}

/// The claim rules every key is checked with.
#[derive(Debug, Clone)]
struct Rules {
    leeway: u64,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Rules {
    fn validation(&self, key: &DecodingKey) -> Validation {
        let mut v = Validation::new_for_family(key.family());
        v.leeway = self.leeway;
        v.validate_exp = true;
        v.validate_nbf = true;
        let mut required = vec!["exp"];
        required.extend(self.audience.as_ref().map(|_| "aud"));
        required.extend(self.issuer.as_ref().map(|_| "iss"));
        v.set_required_spec_claims(&required);
        match &self.audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
        }
        v
    }
}

pub struct JwtVerifier {
    rules: Rules,
    /// Keys from the config (secret, PEM file, JWKS file), fixed until a reload.
    keys: KeyList,
    /// Keys from `jwt.jwks_url`, refreshed in the background.
    remote: Option<Arc<RemoteKeys>>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtVerifier({} keys, {:?})", self.keys.len(), self.remote)
    }
}

fn invalid(m: String) -> ConfigError {
    ConfigError::Invalid(m)
}

impl JwtVerifier {
    pub fn from_config(cfg: &JwtConfig) -> Result<JwtVerifier, ConfigError> {
        JwtVerifier::from_config_reusing(cfg, None)
    }

    /// Like [`from_config`](Self::from_config), but keeps `previous`'s fetched JWKS cache when the
    /// URL and fetch settings are unchanged (a reload then does not start with no remote keys).
    pub fn from_config_reusing(cfg: &JwtConfig, previous: Option<&JwtVerifier>) -> Result<JwtVerifier, ConfigError> {
        let mut keys: KeyList = Vec::new();
        if let Some(secret) = &cfg.secret {
            keys.push((None, DecodingKey::from_secret(secret.as_bytes())));
        }
        if let Some(path) = &cfg.public_key_file {
            let pem = std::fs::read(path)
                .map_err(|e| invalid(format!("jwt.public_key_file: cannot read {}: {e}", path.display())))?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .or_else(|_| DecodingKey::from_ec_pem(&pem))
                .or_else(|_| DecodingKey::from_ed_pem(&pem))
                .map_err(|_| {
                    invalid(format!("jwt.public_key_file: {} is not an RSA, EC or Ed25519 public key in PEM", path.display()))
                })?;
            keys.push((None, key));
        }
        if let Some(path) = &cfg.jwks_file {
            let text = std::fs::read(path)
                .map_err(|e| invalid(format!("jwt.jwks_file: cannot read {}: {e}", path.display())))?;
            keys.extend(jwks::parse_set(&text, &format!("jwt.jwks_file {}", path.display())).map_err(invalid)?);
        }
        let remote = match &cfg.jwks_url {
            None => None,
            Some(url) => match previous.and_then(|p| p.remote.as_ref()).filter(|r| r.same_source(cfg, url)) {
                Some(r) => Some(r.clone()),
                None => Some(Arc::new(RemoteKeys::from_config(cfg, url)?)),
            },
        };
        if keys.is_empty() && remote.is_none() {
            return Err(invalid("jwt: no key configured (set jwt.secret, jwt.public_key_file, jwt.jwks_file or jwt.jwks_url)".into()));
        }
        let rules = Rules {
            leeway: cfg.leeway_secs.unwrap_or(DEFAULT_LEEWAY),
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
        };
        Ok(JwtVerifier { rules, keys, remote })
    }

    /// The `jwt.jwks_url` cache, if one is configured.
    pub fn remote(&self) -> Option<&Arc<RemoteKeys>> {
        self.remote.as_ref()
    }

    /// Starts refreshing `jwt.jwks_url` in the background (needs a Tokio runtime; idempotent).
    pub fn start_background(&self) {
        if let Some(r) = &self.remote {
            r.start();
        }
    }

    /// Every configured key source has keys (a `jwks_url` has answered at least once).
    pub fn keys_loaded(&self) -> bool {
        self.remote.as_ref().is_none_or(|r| r.loaded())
    }

    /// Verifies `token`; a `kid` missing from the `jwks_url` cache triggers a (rate-limited)
    /// refetch and one more try, so keys the provider just published work at once.
    pub async fn verify_fresh(&self, token: &str) -> Result<Map<String, Value>, JwtError> {
        match self.verify(token) {
            Err(JwtError::UnknownKeyId | JwtError::KeysNotLoaded) => match &self.remote {
                Some(remote) if remote.refresh_for_unknown_kid().await => self.verify(token),
                _ => self.verify(token),
            },
            other => other,
        }
    }

    /// Verifies `token` against the keys held now and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Map<String, Value>, JwtError> {
        if token.len() > MAX_TOKEN_LEN || token.split('.').count() != 3 {
            return Err(JwtError::Malformed);
        }
        let header = decode_header(token).map_err(|_| JwtError::Malformed)?;
        let alg = header.alg;
        let remote = self.remote.as_ref().map(|r| r.snapshot());
        let all = self.keys.iter().chain(remote.iter().flat_map(|r| r.iter()));
        let family = |k: &DecodingKey| Validation::new_for_family(k.family()).algorithms.contains(&alg);
        let candidates: Vec<&(Option<String>, DecodingKey)> = all
            .clone()
            .filter(|(_, k)| family(k))
            .filter(|(kid, _)| match (&header.kid, kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .collect();
        if candidates.is_empty() {
            if self.remote.as_ref().is_some_and(|r| !r.loaded()) {
                return Err(JwtError::KeysNotLoaded);
            }
            let family_known = all.clone().any(|(_, k)| family(k));
            return Err(if (family_known || self.remote.is_some()) && header.kid.is_some() {
                JwtError::UnknownKeyId
            } else {
                JwtError::AlgorithmNotAllowed(format!("{alg:?}"))
            });
        }
        let mut last = JwtError::BadSignature;
        for (_, key) in candidates {
            match decode::<Value>(token, key, &self.rules.validation(key)) {
                Ok(data) => {
                    return match data.claims {
                        Value::Object(m) => Ok(m),
                        _ => Err(JwtError::NotAnObject),
                    }
                }
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::InvalidSignature => JwtError::BadSignature,
                        ErrorKind::ExpiredSignature => JwtError::Expired,
                        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
                        ErrorKind::InvalidIssuer => JwtError::WrongIssuer,
                        ErrorKind::InvalidAudience => JwtError::WrongAudience,
                        ErrorKind::MissingRequiredClaim(c) if c == "exp" => JwtError::MissingExp,
                        ErrorKind::MissingRequiredClaim(c) if c == "aud" => JwtError::WrongAudience,
                        ErrorKind::MissingRequiredClaim(c) if c == "iss" => JwtError::WrongIssuer,
                        ErrorKind::InvalidAlgorithm => JwtError::AlgorithmNotAllowed(format!("{alg:?}")),
                        _ => JwtError::Malformed,
                    };
                    // only a bad signature means another key of the same family might fit
                    if last != JwtError::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

/// Signs claims with an HMAC secret (HS256/384/512); used by tests and `pgtenant token`.
pub fn mint_hs(claims: &Value, secret: &[u8], alg: Algorithm) -> String {
    let header = jsonwebtoken::Header::new(alg);
    jsonwebtoken::encode(&header, claims, &jsonwebtoken::EncodingKey::from_secret(secret))
        .expect("HMAC signing cannot fail")
}

/// Signs claims with a PEM private key (RSA, EC or Ed25519).
pub fn mint_pem(claims: &Value, private_pem: &[u8], alg: Algorithm, kid: Option<&str>) -> Result<String, String> {
    use jsonwebtoken::EncodingKey;
    let key = EncodingKey::from_rsa_pem(private_pem)
        .or_else(|_| EncodingKey::from_ec_pem(private_pem))
        .or_else(|_| EncodingKey::from_ed_pem(private_pem))
        .map_err(|e| format!("not a usable private key: {e}"))?;
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &key).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::process::Command;

    fn now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn hs_verifier(iss: Option<&str>, aud: Option<&str>) -> JwtVerifier {
        JwtVerifier::from_config(&JwtConfig {
            secret: Some("s3cret".into()),
            issuer: iss.map(Into::into),
            audience: aud.map(Into::into),
            ..Default::default()
        })
        .unwrap()
    }

    fn hs(claims: Value) -> String {
        mint_hs(&claims, b"s3cret", Algorithm::HS256)
    }

    fn check(v: &JwtVerifier, tok: &str, want: Result<(), JwtError>) {
        let got = v.verify(tok).map(|_| ());
        assert_eq!(got, want);
        if let Err(e) = got {
            assert!(!e.to_string().contains(tok));
        }
    }

    #[test]
    fn hmac_rules() {
        let v = hs_verifier(None, None);
        check(&v, &hs(json!({"exp": now() + 60, "aud": "whatever"})), Ok(()));
        check(&v, &hs(json!({"exp": now() - 10})), Ok(())); // within 30 s leeway
        check(&v, &hs(json!({"exp": now() - 120})), Err(JwtError::Expired));
        check(&v, &hs(json!({"exp": now() + 60, "nbf": now() + 600})), Err(JwtError::NotYetValid));
        check(&v, &hs(json!({"sub": "x"})), Err(JwtError::MissingExp));
        check(&v, &mint_hs(&json!({"exp": now() + 60}), b"other", Algorithm::HS256), Err(JwtError::BadSignature));
        check(&v, &mint_hs(&json!({"exp": now() + 60}), b"s3cret", Algorithm::HS512), Ok(()));
        check(&v, "a.b", Err(JwtError::Malformed));
        check(&v, "not a token at all", Err(JwtError::Malformed));
    }

    #[test]
    fn issuer_and_audience() {
        let v = hs_verifier(Some("iss-a"), Some("aud-a"));
        check(&v, &hs(json!({"exp": now() + 60, "iss": "iss-a", "aud": "aud-a"})), Ok(()));
        check(&v, &hs(json!({"exp": now() + 60, "iss": "iss-b", "aud": "aud-a"})), Err(JwtError::WrongIssuer));
        check(&v, &hs(json!({"exp": now() + 60, "iss": "iss-a", "aud": "aud-b"})), Err(JwtError::WrongAudience));
        check(&v, &hs(json!({"exp": now() + 60, "iss": "iss-a"})), Err(JwtError::WrongAudience));
    }

    #[test]
    fn alg_none_refused() {
        use base64::Engine as _;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let tok = format!("{}.{}.", e.encode(br#"{"alg":"none"}"#), e.encode(json!({"exp": now() + 60}).to_string()));
        assert!(hs_verifier(None, None).verify(&tok).is_err());
    }

    fn openssl(args: &[&str]) -> bool {
        Command::new("openssl").args(args).output().map(|o| o.status.success()).unwrap_or(false)
    }

    #[test]
    fn asymmetric_keys_and_algorithm_confusion() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        if !openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", &p("rsa.key")]) {
            eprintln!("openssl not available; skipping");
            return;
        }
        assert!(openssl(&["pkey", "-in", &p("rsa.key"), "-pubout", "-out", &p("rsa.pub")]));
        assert!(openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &p("ec.key")]));
        assert!(openssl(&["pkey", "-in", &p("ec.key"), "-pubout", "-out", &p("ec.pub")]));
        let claims = json!({"exp": now() + 60, "tenant_id": 1});
        for (key, pubkey, alg) in [("rsa.key", "rsa.pub", Algorithm::RS256), ("rsa.key", "rsa.pub", Algorithm::PS256), ("ec.key", "ec.pub", Algorithm::ES256)] {
            let v = JwtVerifier::from_config(&JwtConfig { public_key_file: Some(p(pubkey).into()), ..Default::default() }).unwrap();
            let tok = mint_pem(&claims, &std::fs::read(p(key)).unwrap(), alg, None).unwrap();
            assert_eq!(v.verify(&tok).unwrap()["tenant_id"], 1);
            // the public key used as an HMAC secret must not verify
            let forged = mint_hs(&claims, &std::fs::read(p(pubkey)).unwrap(), Algorithm::HS256);
            assert_eq!(v.verify(&forged), Err(JwtError::AlgorithmNotAllowed("HS256".into())));
        }
    }

    #[test]
    fn jwks_selects_by_kid() {
        let jwks = json!({"keys": [
            {"kty": "oct", "kid": "k1", "k": "c2VjcmV0LW9uZQ", "alg": "HS256"},
            {"kty": "oct", "kid": "k2", "k": "c2VjcmV0LXR3bw", "alg": "HS256"}
        ]});
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, jwks.to_string()).unwrap();
        let v = JwtVerifier::from_config(&JwtConfig { jwks_file: Some(path), ..Default::default() }).unwrap();
        let mint = |secret: &[u8], kid: &str| {
            let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
            h.kid = Some(kid.into());
            jsonwebtoken::encode(&h, &json!({"exp": now() + 60}), &jsonwebtoken::EncodingKey::from_secret(secret)).unwrap()
        };
        assert!(v.verify(&mint(b"secret-two", "k2")).is_ok());
        assert_eq!(v.verify(&mint(b"secret-two", "k1")), Err(JwtError::BadSignature));
        assert_eq!(v.verify(&mint(b"secret-two", "k9")), Err(JwtError::UnknownKeyId));
    }
}
