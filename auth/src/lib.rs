//! `vitals-auth`: what both HTTP edges (`vitals-ingest`, `vitals-api`) share: bearer-token
//! verification ([`JwtVerifier`]) and the typed error they answer with ([`ApiError`]).
//!
//! JWT bearer authentication: `sub` is the user id. RS256 with keys from a JWKS (file or URL, loaded
//! by the composition root) and HS256 with a shared secret for local development. Checks the
//! algorithm against an allow-list before anything else (so `alg: none` and algorithm confusion are
//! refused), then signature, `exp`, `nbf`, `iss` and `aud`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use base64::Engine;

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

mod error;

pub use error::ApiError;
pub use jsonwebtoken::jwk::JwkSet;

/// What the verifier trusts. Built by the composition root.
#[derive(Clone)]
pub struct AuthConfig {
    pub issuer: String,
    pub audience: String,
    /// HS256 shared secret (local development); HS256 is refused when `None`.
    pub hs256_secret: Option<Vec<u8>>,
    /// RS256 public keys; RS256 is refused when `None`.
    pub jwks: Option<JwkSet>,
    /// Clock skew tolerated on `exp`/`nbf`, seconds.
    pub leeway_secs: u64,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("hs256_secret", &self.hs256_secret.as_ref().map(|_| "[redacted]"))
            .field("jwks_keys", &self.jwks.as_ref().map(|j| j.keys.len()))
            .finish()
    }
}

/// `aud`: one audience or several (RFC 7519 §4.1.3: "an array of case-sensitive strings" or, in
/// the special case of one, a string). jsonwebtoken checks either against ours; this type only lets
/// both spellings deserialize.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl From<&str> for Audience {
    fn from(s: &str) -> Audience {
        Audience::One(s.to_owned())
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    pub aud: Audience,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

pub struct JwtVerifier {
    hs: Option<(DecodingKey, Validation)>,
    /// The JWKS's keys, replaced whole when the JWKS is fetched again ([`JwtVerifier::replace_jwks`]).
    rs: RwLock<RsKeys>,
    /// Whether RS256 is accepted at all (a JWKS was configured).
    rs_configured: bool,
    rs_validation: Validation,
    leeway_secs: u64,
    /// Set when a token names a `kid` the JWKS lacks: the identity provider may have rotated its
    /// keys, so whoever refreshes the JWKS should do it now (rate-limited by them).
    unknown_kid: AtomicBool,
}

/// What jsonwebtoken does not check of an RS256 key: an RSA modulus of at least 2048 bits and
/// an exponent (a provider glitch serving empty or truncated keys must not replace good ones).
fn usable(jwk: &jsonwebtoken::jwk::Jwk) -> Result<(), String> {
    let jsonwebtoken::jwk::AlgorithmParameters::RSA(rsa) = &jwk.algorithm else {
        return Err("not an RSA key (RS256 is the algorithm accepted)".into());
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let n = b64.decode(rsa.n.trim_end_matches('=')).map_err(|e| format!("modulus: {e}"))?;
    let e = b64.decode(rsa.e.trim_end_matches('=')).map_err(|e| format!("exponent: {e}"))?;
    let bits = n.iter().position(|b| *b != 0).map_or(0, |first| (n.len() - first) * 8);
    if bits < 2048 || e.is_empty() {
        return Err(format!("an RSA key of {bits} bits (at least 2048 are required)"));
    }
    Ok(())
}

/// kid → key; a JWKS with one key also accepts tokens without `kid`.
#[derive(Default)]
struct RsKeys {
    by_kid: HashMap<String, DecodingKey>,
    single: Option<DecodingKey>,
}

impl RsKeys {
    /// The usable keys of `set`. At start-up every key must be usable (a configuration error
    /// shows at once); on a refresh unusable ones are skipped (`strict` false) so one odd key
    /// of the provider's cannot stop rotation. No usable key at all is refused either way: an
    /// empty JWKS never replaces good keys.
    fn of(set: &JwkSet, strict: bool) -> Result<RsKeys, String> {
        let mut by_kid = HashMap::new();
        let mut all = Vec::new();
        for jwk in &set.keys {
            // Keys of other types (an EC key for ES256 beside the RSA ones) are not for RS256.
            if !matches!(jwk.algorithm, jsonwebtoken::jwk::AlgorithmParameters::RSA(_)) {
                continue;
            }
            let key = match usable(jwk).and_then(|()| DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())) {
                Ok(k) => k,
                Err(e) if strict => return Err(format!("unusable JWK: {e}")),
                Err(_) => continue,
            };
            if let Some(kid) = &jwk.common.key_id {
                by_kid.insert(kid.clone(), key.clone());
            }
            all.push(key);
        }
        if all.is_empty() && !strict {
            return Err("the JWKS holds no usable key".into());
        }
        let single = if all.len() == 1 { all.pop() } else { None };
        Ok(RsKeys { by_kid, single })
    }
}

/// A verified token: whose it is and until when it is accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub user: String,
    /// `exp`, seconds since the epoch.
    pub expires_at: u64,
    /// The last second at which this verifier still accepts the token (`exp` + leeway).
    pub accepted_until: u64,
}

fn validation(alg: Algorithm, cfg: &AuthConfig) -> Validation {
    let mut v = Validation::new(alg);
    v.set_issuer(&[&cfg.issuer]);
    v.set_audience(&[&cfg.audience]);
    v.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
    v.validate_exp = true;
    v.validate_nbf = true;
    v.leeway = cfg.leeway_secs;
    v
}

impl JwtVerifier {
    pub fn new(cfg: &AuthConfig) -> Result<JwtVerifier, String> {
        let hs = cfg.hs256_secret.as_ref().map(|s| (DecodingKey::from_secret(s), validation(Algorithm::HS256, cfg)));
        let rs = match &cfg.jwks {
            Some(set) => RsKeys::of(set, true)?,
            None => RsKeys::default(),
        };
        Ok(JwtVerifier {
            hs,
            rs: RwLock::new(rs),
            rs_configured: cfg.jwks.is_some(),
            rs_validation: validation(Algorithm::RS256, cfg),
            leeway_secs: cfg.leeway_secs,
            unknown_kid: AtomicBool::new(false),
        })
    }

    /// Replaces the RS256 keys with the usable ones of a JWKS fetched again (key rotation); a
    /// JWKS with no usable key leaves the keys as they were. Returns how many keys it holds now.
    pub fn replace_jwks(&self, set: &JwkSet) -> Result<usize, String> {
        let keys = RsKeys::of(set, false)?;
        let usable = keys.by_kid.len().max(usize::from(keys.single.is_some()));
        *self.rs.write().unwrap_or_else(|p| p.into_inner()) = keys;
        self.unknown_kid.store(false, Ordering::Relaxed);
        Ok(usable)
    }

    /// Whether a token named a `kid` the JWKS lacks since the last [`JwtVerifier::replace_jwks`].
    pub fn saw_unknown_kid(&self) -> bool {
        self.unknown_kid.load(Ordering::Relaxed)
    }

    /// Verifies an `Authorization` header value and returns the user id (`sub`).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<String, ApiError> {
        self.verify(authorization).map(|v| v.user)
    }

    /// [`JwtVerifier::authenticate`], also saying until when the token is good (long-lived
    /// connections close then).
    pub fn verify(&self, authorization: Option<&str>) -> Result<Verified, ApiError> {
        let Some(value) = authorization else {
            return Err(ApiError::unauthorized("missing_token", "an `Authorization: Bearer <jwt>` header is required"));
        };
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| ApiError::unauthorized("missing_token", "the Authorization scheme must be Bearer"))?
            .trim();
        let (alg, kid) = peek_header(token)?;
        let (key, validation) = match alg.as_str() {
            "HS256" => match &self.hs {
                Some((k, v)) => (k, v),
                None => return Err(alg_refused(&alg)),
            },
            "RS256" if self.rs_configured => {
                let keys = self.rs.read().unwrap_or_else(|p| p.into_inner());
                let key = match kid.as_deref() {
                    Some(kid) => keys.by_kid.get(kid),
                    None => keys.single.as_ref(),
                };
                match key {
                    // The read lock is shared; only a JWKS refresh waits for it.
                    Some(k) => return self.decode(token, k, &self.rs_validation),
                    None => {
                        if kid.is_some() {
                            self.unknown_kid.store(true, Ordering::Relaxed);
                        }
                        return Err(ApiError::unauthorized("unknown_key", "the token's `kid` is not in the JWKS"));
                    }
                }
            }
            _ => return Err(alg_refused(&alg)),
        };
        self.decode(token, key, validation)
    }

    fn decode(&self, token: &str, key: &DecodingKey, validation: &Validation) -> Result<Verified, ApiError> {
        let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => ApiError::unauthorized("token_expired", "the token has expired"),
            ErrorKind::ImmatureSignature => ApiError::unauthorized("token_not_yet_valid", "the token is not valid yet (nbf)"),
            ErrorKind::InvalidSignature => ApiError::unauthorized("invalid_signature", "the token's signature does not verify"),
            ErrorKind::InvalidIssuer => ApiError::unauthorized("invalid_issuer", "the token's issuer is not trusted"),
            ErrorKind::InvalidAudience => ApiError::unauthorized("invalid_audience", "the token is not meant for this audience"),
            ErrorKind::MissingRequiredClaim(c) => ApiError::unauthorized("missing_claim", format!("the token lacks the `{c}` claim")),
            _ => ApiError::unauthorized("invalid_token", "the token is malformed"),
        })?;
        if data.claims.sub.is_empty() || data.claims.sub.len() > 128 {
            return Err(ApiError::unauthorized("invalid_token", "the token's `sub` must be a user id of 1..=128 bytes"));
        }
        // Control characters never reach the pipeline: state keys, output keys and progress
        // markers (`\0progress|<user>`) are built from the user id and rely on it.
        if data.claims.sub.chars().any(char::is_control) {
            return Err(ApiError::unauthorized("invalid_token", "the token's `sub` must not contain control characters"));
        }
        let exp = data.claims.exp;
        Ok(Verified { user: data.claims.sub, expires_at: exp, accepted_until: exp.saturating_add(self.leeway_secs) })
    }
}

fn alg_refused(alg: &str) -> ApiError {
    ApiError::unauthorized("algorithm_not_allowed", format!("tokens signed with `{alg}` are not accepted"))
}

/// Reads `alg` and `kid` from the token's header without trusting anything else in it.
fn peek_header(token: &str) -> Result<(String, Option<String>), ApiError> {
    let malformed = || ApiError::unauthorized("invalid_token", "the token is not a JWT");
    let header_b64 = token.split('.').next().ok_or_else(malformed)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header_b64.trim_end_matches('=')).map_err(|_| malformed())?;
    #[derive(Deserialize)]
    struct H {
        alg: String,
        kid: Option<String>,
    }
    let h: H = serde_json::from_slice(&raw).map_err(|_| malformed())?;
    if token.split('.').count() != 3 {
        return Err(malformed());
    }
    Ok((h.alg, h.kid))
}

/// Mints an HS256 token, for local development, the simulator and tests.
pub fn mint_hs256(secret: &[u8], issuer: &str, audience: &str, sub: &str, ttl_secs: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let claims = Claims {
        sub: sub.to_owned(),
        iss: issuer.to_owned(),
        aud: Audience::One(audience.to_owned()),
        exp: now + ttl_secs,
        nbf: None,
        iat: Some(now),
    };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
        .expect("HS256 encoding with a byte secret cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AuthConfig {
        AuthConfig {
            issuer: "vitals-dev".into(),
            audience: "vitals".into(),
            hs256_secret: Some(b"dev-secret-with-enough-bytes-0123456789".to_vec()),
            jwks: None,
            leeway_secs: 0,
        }
    }

    #[test]
    fn accepts_a_valid_token_and_returns_sub() {
        let c = cfg();
        let v = JwtVerifier::new(&c).unwrap();
        let t = mint_hs256(c.hs256_secret.as_ref().unwrap(), "vitals-dev", "vitals", "user-1", 60);
        assert_eq!(v.authenticate(Some(&format!("Bearer {t}"))).unwrap(), "user-1");
    }

    #[test]
    fn refuses_bad_tokens_with_their_codes() {
        let c = cfg();
        let v = JwtVerifier::new(&c).unwrap();
        let code = |h: Option<&str>| v.authenticate(h).unwrap_err().code;
        assert_eq!(code(None), "missing_token");
        let forged = mint_hs256(b"another-secret-another-secret-1234", "vitals-dev", "vitals", "u", 60);
        assert_eq!(code(Some(&format!("Bearer {forged}"))), "invalid_signature");
        let wrong_aud = mint_hs256(c.hs256_secret.as_ref().unwrap(), "vitals-dev", "other", "u", 60);
        assert_eq!(code(Some(&format!("Bearer {wrong_aud}"))), "invalid_audience");
        let aud_list = |aud: serde_json::Value| {
            let claims = serde_json::json!({"sub": "u-list", "iss": "vitals-dev", "aud": aud, "exp": 9_999_999_999u64});
            let t =
                jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(c.hs256_secret.as_ref().unwrap()))
                    .unwrap();
            v.authenticate(Some(&format!("Bearer {t}")))
        };
        assert_eq!(aud_list(serde_json::json!(["other", "vitals"])).unwrap(), "u-list", "an `aud` array holding ours (RFC 7519)");
        assert_eq!(aud_list(serde_json::json!(["other"])).unwrap_err().code, "invalid_audience");
        for sub in ["\u{0}progress|u", "a\u{1e}b", "line\nbreak"] {
            let t = mint_hs256(c.hs256_secret.as_ref().unwrap(), "vitals-dev", "vitals", sub, 60);
            assert_eq!(code(Some(&format!("Bearer {t}"))), "invalid_token", "sub {sub:?}");
        }
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(r#"{"sub":"u","iss":"vitals-dev","aud":"vitals","exp":9999999999}"#)
        );
        assert_eq!(code(Some(&format!("Bearer {none}"))), "algorithm_not_allowed");
        let rs = format!("{}.{}.sig", b64(r#"{"alg":"RS256"}"#), b64("{}"));
        assert_eq!(code(Some(&format!("Bearer {rs}"))), "algorithm_not_allowed");
        assert_eq!(code(Some("Bearer not-a-jwt")), "invalid_token");
    }

    fn rs_cfg() -> AuthConfig {
        AuthConfig { hs256_secret: None, jwks: Some(serde_json::from_str(include_str!("../testdata/jwks.json")).unwrap()), ..cfg() }
    }

    fn rs_token(kid: Option<&str>, sub: &str) -> String {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = kid.map(str::to_owned);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let claims =
            Claims { sub: sub.into(), iss: "vitals-dev".into(), aud: "vitals".into(), exp: now + 60, nbf: Some(now - 1), iat: None };
        let key = EncodingKey::from_rsa_pem(include_bytes!("../testdata/rs256-test-key.pem")).unwrap();
        jsonwebtoken::encode(&h, &claims, &key).unwrap()
    }

    #[test]
    fn rs256_via_jwks_and_no_algorithm_confusion() {
        let v = JwtVerifier::new(&rs_cfg()).unwrap();
        assert_eq!(v.authenticate(Some(&format!("Bearer {}", rs_token(Some("test-key-1"), "u-rs")))).unwrap(), "u-rs");
        // A single-key JWKS also verifies tokens without `kid`.
        assert_eq!(v.authenticate(Some(&format!("Bearer {}", rs_token(None, "u-rs")))).unwrap(), "u-rs");
        assert_eq!(v.authenticate(Some(&format!("Bearer {}", rs_token(Some("other"), "u")))).unwrap_err().code, "unknown_key");
        // HS256 signed with the public key as secret (the classic confusion attack) is refused.
        let pubkey = include_bytes!("../testdata/rs256-test-pub.pem");
        let confused = mint_hs256(pubkey, "vitals-dev", "vitals", "attacker", 60);
        assert_eq!(v.authenticate(Some(&format!("Bearer {confused}"))).unwrap_err().code, "algorithm_not_allowed");
        // And an HS256-only verifier refuses RS256 tokens.
        let hs = JwtVerifier::new(&cfg()).unwrap();
        assert_eq!(
            hs.authenticate(Some(&format!("Bearer {}", rs_token(Some("test-key-1"), "u")))).unwrap_err().code,
            "algorithm_not_allowed"
        );
    }
}
