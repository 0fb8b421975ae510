//! Calling another quire server: one shared `reqwest` client and a typed call whose
//! failures are classified the way retries need them.

use std::time::Duration;

use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ErrorBody};
use crate::headers;

/// Longest one attempt of a repeatable call (a read, or a write carrying an idempotency key)
/// may take before it is abandoned and tried again elsewhere. Far above a healthy answer
/// (milliseconds), far below a request's deadline: a frozen or cut-off peer then costs one
/// attempt, not the whole deadline.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// The address this process's outgoing connections come from, when set (see
/// [`set_source`]).
static SOURCE: std::sync::OnceLock<std::net::IpAddr> = std::sync::OnceLock::new();

/// Makes every client made after this call connect from `ip`: a server given an address of
/// its own (`--source-ip`) then shows it on every connection it opens, which is what rules
/// that cut one server off from others match on.
pub fn set_source(ip: std::net::IpAddr) {
    let _ = SOURCE.set(ip);
}

/// The client every server uses for its peers: kept-alive connections, short connect timeout.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(500))
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .local_address(SOURCE.get().copied())
        .build()
        .expect("a TLS backend is compiled in")
}

/// How a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The peer answered with a documented error.
    #[error("{0}")]
    Api(ApiError),
    /// The request never reached the peer (connection refused, reset before sending):
    /// it is safe to send it elsewhere.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The request may or may not have been carried out (timeout, connection lost, garbage
    /// answer). A write in this state must be retried with the same key or reported unknown.
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

impl CallError {
    pub fn from_reqwest(e: reqwest::Error) -> Self {
        if e.is_connect() {
            CallError::Unreachable(e.to_string())
        } else {
            CallError::Unknown(e.to_string())
        }
    }
}

/// Sends `request` and decodes a 2xx JSON body as `T`, or the documented error body.
pub async fn call<T: DeserializeOwned>(request: reqwest::RequestBuilder) -> Result<T, CallError> {
    let response = request.send().await.map_err(CallError::from_reqwest)?;
    decode(response).await
}

pub async fn decode<T: DeserializeOwned>(response: reqwest::Response) -> Result<T, CallError> {
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let leader = response.headers().get(headers::LEADER).and_then(|v| v.to_str().ok()).map(String::from);
    let bytes = response.bytes().await.map_err(CallError::from_reqwest)?;
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| CallError::Unknown(format!("undecodable answer: {e}")));
    }
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(body) => Err(CallError::Api(ApiError::from_parts(status, &body, leader))),
        Err(_) => Err(CallError::Unknown(format!("peer answered {status} without an error body"))),
    }
}
