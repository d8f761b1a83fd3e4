//! Who may do what: HTTP basic authentication (`Authorization: Basic`, as Confluent's registry
//! offers it) with two credentials — an admin that may read and write, and a read-only one the
//! pipeline's roles use — and, if configured, anonymous reads.
//!
//! Reads are `GET`/`HEAD`, plus the two `POST`s that change nothing: the lookup of a schema by
//! content (`POST /subjects/{subject}`) and compatibility checks (`POST /compatibility/...`).
//! Everything else (`POST .../versions`, `PUT`, `DELETE`) is a write. Unauthenticated or wrongly
//! authenticated requests get 401 with a `WWW-Authenticate: Basic` challenge; the read-only
//! credential on a write gets 403; both as Confluent error bodies (error_code 40101 / 40301).
//! `GET /healthz` is the one route without authentication (probes).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::error::ApiError;

/// A user name and password.
#[derive(Clone)]
pub struct Credential {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential {{ user: {:?}, password: \"[redacted]\" }}", self.user)
    }
}

impl Credential {
    /// `None` when `user` is empty (that credential is not configured).
    pub fn new(user: &str, password: &str) -> Option<Credential> {
        (!user.is_empty()).then(|| Credential { user: user.to_owned(), password: password.to_owned() })
    }

    /// Compares in time independent of where the strings differ (digests of both, every byte).
    fn matches(&self, user: &str, password: &str) -> bool {
        let same = |a: &str, b: &str| {
            let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
            a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
        };
        let user_ok = same(&self.user, user);
        let password_ok = same(&self.password, password);
        user_ok & password_ok
    }
}

/// The registry's access rules.
#[derive(Clone, Debug)]
pub struct Access {
    /// May read and write.
    pub admin: Option<Credential>,
    /// May only read.
    pub reader: Option<Credential>,
    /// Reads without any `Authorization` header are allowed (writes never are).
    pub anonymous_reads: bool,
}

#[derive(Debug, PartialEq)]
enum Principal {
    Admin,
    Reader(String),
    Anonymous,
}

/// Whether the request changes nothing.
fn is_read(method: &Method, path: &str) -> bool {
    if method == Method::GET || method == Method::HEAD {
        return true;
    }
    if method != Method::POST {
        return false;
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    matches!(segments.as_slice(), ["subjects", subject] if !subject.is_empty()) || segments.first() == Some(&"compatibility")
}

/// The principal an `Authorization` header proves, `Anonymous` without one; `Err` with why not.
fn authenticate(access: &Access, header: Option<&axum::http::HeaderValue>) -> Result<Principal, &'static str> {
    let Some(header) = header else { return Ok(Principal::Anonymous) };
    let value = header.to_str().map_err(|_| "the Authorization header is not ASCII")?;
    let (scheme, encoded) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err("only HTTP basic authentication is accepted");
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or("malformed basic credentials")?;
    let (user, password) = decoded.split_once(':').ok_or("malformed basic credentials")?;
    if access.admin.as_ref().is_some_and(|c| c.matches(user, password)) {
        return Ok(Principal::Admin);
    }
    if access.reader.as_ref().is_some_and(|c| c.matches(user, password)) {
        return Ok(Principal::Reader(user.to_owned()));
    }
    Err("unknown user or wrong password")
}

/// The middleware in front of every route.
pub async fn check(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    if method == Method::GET && path == "/healthz" {
        return next.run(request).await;
    }
    let read = is_read(&method, &path);
    let refused = match authenticate(&access, request.headers().get(AUTHORIZATION)) {
        Ok(Principal::Admin) => None,
        Ok(Principal::Reader(_)) if read => None,
        Ok(Principal::Reader(user)) => {
            Some(ApiError::Forbidden(format!("User '{user}' is denied operation Write: the read-only credential cannot {method} {path}")))
        }
        Ok(Principal::Anonymous) if read && access.anonymous_reads => None,
        Ok(Principal::Anonymous) => Some(ApiError::Unauthorized("Unauthorized: credentials are required".to_owned())),
        Err(why) => Some(ApiError::Unauthorized(format!("Unauthorized: {why}"))),
    };
    match refused {
        None => next.run(request).await,
        Some(error) => {
            tracing::warn!(%method, %path, reason = %error, "registry request refused");
            error.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_gets_lookups_and_compatibility_checks() {
        assert!(is_read(&Method::GET, "/subjects/x/versions"));
        assert!(is_read(&Method::POST, "/subjects/x"));
        assert!(is_read(&Method::POST, "/subjects/a%2Fb"));
        assert!(is_read(&Method::POST, "/compatibility/subjects/x/versions/latest"));
        assert!(!is_read(&Method::POST, "/subjects/x/versions"));
        assert!(!is_read(&Method::POST, "/subjects/"));
        assert!(!is_read(&Method::POST, "/subjects/x/"));
        assert!(!is_read(&Method::PUT, "/config/x"));
        assert!(!is_read(&Method::DELETE, "/subjects/x"));
        assert!(!is_read(&Method::PATCH, "/subjects"));
    }

    #[test]
    fn credentials_must_match_exactly() {
        let access = Access { admin: Credential::new("a", "p:q"), reader: Credential::new("r", "s"), anonymous_reads: false };
        let header = |user: &str, password: &str| {
            let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            axum::http::HeaderValue::from_str(&format!("Basic {encoded}")).unwrap()
        };
        assert_eq!(authenticate(&access, Some(&header("a", "p:q"))), Ok(Principal::Admin));
        assert_eq!(authenticate(&access, Some(&header("r", "s"))), Ok(Principal::Reader("r".into())));
        assert!(authenticate(&access, Some(&header("a", "p"))).is_err());
        assert!(authenticate(&access, Some(&header("r", "s "))).is_err());
        assert!(authenticate(&access, Some(&header("", ""))).is_err());
        assert_eq!(authenticate(&access, None), Ok(Principal::Anonymous));
        let none = Access { admin: None, reader: None, anonymous_reads: false };
        assert!(authenticate(&none, Some(&header("", ""))).is_err());
    }
}
