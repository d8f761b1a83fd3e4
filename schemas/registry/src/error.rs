//! Errors of the registry API, rendered as Confluent does: `{"error_code": n, "message": "..."}`
//! with the HTTP status the code belongs to (401 for 40101, 403 for 40301, 404 for 404xx, 409,
//! 422 for 422xx, 500 for 500xx).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::compat::InvalidLevel;
use super::http::sr_json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Subject '{0}' not found.")]
    SubjectNotFound(String),
    #[error("Version {0} not found.")]
    VersionNotFound(String),
    #[error("Schema {0} not found")]
    SchemaNotFound(String),
    #[error("Schema not found")]
    SchemaNotInSubject,
    #[error("Subject '{0}' was soft deleted. Set permanent=true to delete permanently")]
    SubjectSoftDeleted(String),
    #[error("Subject '{0}' was not deleted first before being permanently deleted")]
    SubjectNotSoftDeleted(String),
    #[error("Subject '{0}' Version {1} was soft deleted. Set permanent=true to delete permanently")]
    VersionSoftDeleted(String, i32),
    #[error("Subject '{0}' Version {1} was not deleted first before being permanently deleted")]
    VersionNotSoftDeleted(String, i32),
    #[error("Subject '{0}' does not have subject-level compatibility configured")]
    SubjectConfigNotFound(String),
    #[error("{0}")]
    Incompatible(String),
    #[error("{0}")]
    InvalidSchema(String),
    #[error(
        "The specified version '{0}' is not a valid version id. Allowed values are between \
         [1, 2^31-1] and the string \"latest\""
    )]
    InvalidVersion(String),
    #[error(transparent)]
    InvalidCompatibility(#[from] InvalidLevel),
    #[error("{0}")]
    ReferenceExists(String),
    #[error("The specified subject '{0}' is not valid.")]
    InvalidSubject(String),
    /// Unparseable JSON, JSON of the wrong shape or an undecodable path (Confluent's
    /// rest-utils answers 400 with error_code 400).
    #[error("{0}")]
    BadRequest(String),
    /// A request that needs a body came without one.
    #[error("{0}")]
    Unprocessable(String),
    #[error("HTTP 415 Unsupported Media Type")]
    UnsupportedMediaType,
    #[error("HTTP 404 Not Found")]
    RouteNotFound,
    #[error("HTTP 405 Method Not Allowed")]
    MethodNotAllowed,
    /// No credentials, or wrong ones (answered with a `WWW-Authenticate: Basic` challenge).
    #[error("{0}")]
    Unauthorized(String),
    /// Valid credentials that may not do this (the read-only one on a write).
    #[error("{0}")]
    Forbidden(String),
    /// The cause is logged, never sent: it may quote SQL.
    #[error("Error in the backend data store")]
    Store(#[from] sqlx::Error),
    /// Stored data that no longer makes sense (e.g. a stored schema that does not parse).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The Confluent `error_code`; its first three digits are the HTTP status.
    pub fn error_code(&self) -> u32 {
        match self {
            ApiError::SubjectNotFound(_) => 40401,
            ApiError::VersionNotFound(_) => 40402,
            ApiError::SchemaNotFound(_) | ApiError::SchemaNotInSubject => 40403,
            ApiError::SubjectSoftDeleted(_) => 40404,
            ApiError::SubjectNotSoftDeleted(_) => 40405,
            ApiError::VersionSoftDeleted(..) => 40406,
            ApiError::VersionNotSoftDeleted(..) => 40407,
            ApiError::SubjectConfigNotFound(_) => 40408,
            ApiError::Incompatible(_) => 409,
            ApiError::InvalidSchema(_) => 42201,
            ApiError::InvalidVersion(_) => 42202,
            ApiError::InvalidCompatibility(_) => 42203,
            ApiError::ReferenceExists(_) => 42206,
            ApiError::InvalidSubject(_) => 42208,
            ApiError::Unauthorized(_) => 40101,
            ApiError::Forbidden(_) => 40301,
            ApiError::BadRequest(_) => 400,
            ApiError::Unprocessable(_) => 422,
            ApiError::UnsupportedMediaType => 415,
            ApiError::RouteNotFound => 404,
            ApiError::MethodNotAllowed => 405,
            ApiError::Store(_) => 50001,
            ApiError::Internal(_) => 500,
        }
    }

    pub fn status(&self) -> StatusCode {
        let code = self.error_code();
        let http = if code >= 1000 { code / 100 } else { code };
        u16::try_from(http).ok().and_then(|c| StatusCode::from_u16(c).ok()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Store(cause) => tracing::error!(error = %cause, "registry store error"),
            ApiError::Internal(message) => tracing::error!(%message, "registry internal error"),
            _ => {}
        }
        let mut response = sr_json(self.status(), &json!({ "error_code": self.error_code(), "message": self.to_string() }));
        if matches!(self, ApiError::Unauthorized(_)) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static(r#"Basic realm="vitals-schema-registry""#),
            );
        }
        response
    }
}
