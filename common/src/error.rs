//! The one error type every quire server answers with.
//!
//! The body is always `{"error": "<snake_case_code>", "message": "<one human sentence>"}`.
//! Internal details are logged where the error is made, never sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::headers;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds after which a retry may succeed (sent as `Retry-After`).
    pub retry_after: Option<u32>,
    /// Base URL of the Raft leader, for `not_leader` answers.
    pub leader: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), retry_after: None, leader: None }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn out_of_stock(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "out_of_stock", message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError { retry_after: Some(1), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message) }
    }
    pub fn dropped(message: impl Into<String>) -> Self {
        ApiError { retry_after: Some(1), ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "dropped", message) }
    }
    pub fn deadline_exceeded(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded", message)
    }
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "this route needs the cluster token")
    }
    pub fn not_leader(leader: Option<String>) -> Self {
        ApiError {
            retry_after: Some(1),
            leader,
            ..Self::new(StatusCode::MISDIRECTED_REQUEST, "not_leader", "this replica is not the leader")
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// Rebuilds an error from a peer's response (status + documented body).
    pub fn from_parts(status: StatusCode, body: &ErrorBody, leader: Option<String>) -> Self {
        let code = known_code(&body.error);
        ApiError { status, code, message: body.message.clone(), retry_after: None, leader }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody { error: self.code.to_string(), message: self.message.clone() }
    }
}

/// Maps a code received from a peer back onto the static set this crate knows.
fn known_code(code: &str) -> &'static str {
    const CODES: &[&str] = &[
        "bad_request",
        "invalid_id",
        "invalid_quantity",
        "invalid_body",
        "invalid_topic",
        "invalid_query",
        "invalid_key",
        "not_found",
        "out_of_stock",
        "unavailable",
        "dropped",
        "deadline_exceeded",
        "unauthorized",
        "not_leader",
        "method_not_allowed",
        "payload_too_large",
        "unsupported_media_type",
        "internal",
    ];
    CODES.iter().find(|c| **c == code).copied().unwrap_or("internal")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        let h = response.headers_mut();
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(leader) = self.leader.as_deref().and_then(|l| HeaderValue::from_str(l).ok()) {
            h.insert(headers::LEADER, leader);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn body_is_documented_shape() {
        let response = ApiError::out_of_stock("item 3 has 0 left").into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        let bytes = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body, serde_json::json!({"error": "out_of_stock", "message": "item 3 has 0 left"}));
    }

    #[test]
    fn unknown_peer_code_becomes_internal() {
        let body = ErrorBody { error: "weird".into(), message: "x".into() };
        assert_eq!(ApiError::from_parts(StatusCode::IM_A_TEAPOT, &body, None).code, "internal");
    }
}
