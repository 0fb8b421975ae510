//! Axum pieces every server shares: a JSON extractor whose rejections are documented
//! errors, JSON fallbacks for unknown routes and wrong methods, and the cluster-token guard.

use axum::extract::{FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::api::MAX_BODY_BYTES;
use crate::error::ApiError;
use crate::headers;

/// `axum::Json` with rejections turned into `invalid_body` / `payload_too_large` /
/// `unsupported_media_type` errors.
pub struct Json<T>(pub T);

#[axum::async_trait]
impl<S, T> FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(json_rejection(rejection.status(), rejection.body_text())),
        }
    }
}

fn json_rejection(status: StatusCode, detail: String) -> ApiError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(status, "payload_too_large", format!("request body is larger than {MAX_BODY_BYTES} bytes"))
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            status,
            "unsupported_media_type",
            "request body must be JSON (Content-Type: application/json)",
        ),
        _ => ApiError::bad_request("invalid_body", detail),
    }
}

/// Wraps a router with the behaviour every quire server shares: body limit, a JSON 404 for
/// unknown routes, JSON errors for wrong methods and any other bodiless error.
pub fn finish(router: Router) -> Router {
    router
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(serve))
}

/// What every request passes through: timed as `serve METHOD route` (see
/// [`crate::timings`]), and its error answered in JSON ([`json_errors`]). One middleware,
/// not two: each costs every request a clone of the route's boxed service.
async fn serve(request: Request, next: Next) -> Response {
    let _watch = crate::timings::Stopwatch::on(serve_counter(&request));
    json_errors(next.run(request).await)
}

/// The timings' counter of `serve METHOD route`, found once per method and route and kept
/// (a cached lookup should pay neither for formatting the name nor for the timings' lock).
/// Methods outside the standard ones share the name `OTHER`, so clients cannot grow the
/// table: it holds at most the routes times eight methods.
fn serve_counter(request: &Request) -> &'static crate::timings::Counter {
    use axum::http::Method;
    use std::collections::HashMap;
    use std::sync::{PoisonError, RwLock};
    /// By route, then by method (`None`: any method outside the standard ones).
    type Counters = HashMap<Box<str>, Vec<(Option<Method>, &'static crate::timings::Counter)>>;
    static COUNTERS: RwLock<Option<Counters>> = RwLock::new(None);
    const STANDARD: [Method; 7] =
        [Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::DELETE, Method::PATCH, Method::OPTIONS];
    let route = request.extensions().get::<axum::extract::MatchedPath>().map_or("(no route)", |p| p.as_str());
    let method = Some(request.method()).filter(|m| STANDARD.contains(m));
    let find = |counters: &Option<Counters>| {
        let by_method = counters.as_ref()?.get(route)?;
        by_method.iter().find(|(m, _)| m.as_ref() == method).map(|(_, counter)| *counter)
    };
    if let Some(counter) = find(&COUNTERS.read().unwrap_or_else(PoisonError::into_inner)) {
        return counter;
    }
    let mut counters = COUNTERS.write().unwrap_or_else(PoisonError::into_inner);
    if let Some(counter) = find(&counters) {
        return counter;
    }
    let counter = crate::timings::counter(&format!("serve {} {route}", method.map_or("OTHER", Method::as_str)));
    counters.get_or_insert_with(HashMap::new).entry(route.into()).or_default().push((method.cloned(), counter));
    counter
}

/// Turns axum's plain-text rejections (405, 413, 415, 400 on bad paths) into the documented
/// JSON body. Responses that are already JSON pass through untouched.
fn json_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "this route does not take that method"),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "request body is too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", "request body must be JSON"),
        StatusCode::NOT_FOUND => ("not_found", "no such route"),
        s if s.is_client_error() => ("bad_request", "the request is malformed"),
        _ => ("internal", "the server failed to answer"),
    };
    let mut error = ApiError::new(status, code, message).into_response();
    if let Some(allow) = response.headers().get(header::ALLOW) {
        error.headers_mut().insert(header::ALLOW, allow.clone());
    }
    error
}

/// The cluster token, shared by every server of one store.
#[derive(Clone)]
pub struct Token(pub std::sync::Arc<str>);

/// The shortest cluster token a server accepts: a short one is guessable, and an empty one
/// would match a request that carries none.
pub const MIN_TOKEN_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
#[error("the cluster token must be at least {MIN_TOKEN_BYTES} bytes (it is {0}); `quire up` makes one of 32")]
pub struct ShortToken(usize);

impl Token {
    pub fn new(token: &str) -> Result<Self, ShortToken> {
        if token.len() < MIN_TOKEN_BYTES {
            return Err(ShortToken(token.len()));
        }
        Ok(Token(token.into()))
    }
}

/// Middleware: the request must carry the cluster token (constant-time comparison).
pub async fn require_token(State(token): State<Token>, request: Request, next: Next) -> Response {
    let given = request.headers().get(headers::TOKEN).map(|v| v.as_bytes()).unwrap_or_default();
    if constant_time_eq(given, token.0.as_bytes()) {
        next.run(request).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Guards every route of `router` with the cluster token.
pub fn guarded(router: Router, token: Token) -> Router {
    router.layer(axum::middleware::from_fn_with_state(token, require_token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::post;
    use tower::ServiceExt;

    #[derive(serde::Deserialize)]
    struct Thing {
        #[allow(dead_code)]
        n: u32,
    }

    fn app() -> Router {
        finish(Router::new().route("/thing", post(|Json(_t): Json<Thing>| async { "ok" })))
    }

    async fn call(req: Request) -> (StatusCode, serde_json::Value) {
        let response = app().oneshot(req).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    fn post_json(body: &str) -> Request {
        Request::post("/thing").header("content-type", "application/json").body(Body::from(body.to_string())).unwrap()
    }

    #[tokio::test]
    async fn rejections_are_documented_json() {
        let (s, b) = call(post_json("{nope")).await;
        assert_eq!((s, b["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_body")));
        let (s, b) = call(post_json(&"x".repeat(MAX_BODY_BYTES + 10))).await;
        assert_eq!((s, b["error"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large")));
        let (s, b) = call(Request::get("/thing").body(Body::empty()).unwrap()).await;
        assert_eq!((s, b["error"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")));
        let (s, b) = call(Request::get("/nowhere").body(Body::empty()).unwrap()).await;
        assert_eq!((s, b["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
        let (s, b) = call(Request::post("/thing").body(Body::from("{\"n\":1}")).unwrap()).await;
        assert_eq!((s, b["error"].as_str()), (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("unsupported_media_type")));
    }

    #[tokio::test]
    async fn every_request_is_timed_by_method_and_route() {
        // A route of its own: the other tests run at the same time in this process.
        let app = finish(Router::new().route("/timed/:id", post(|| async { "ok" })));
        let send = |method: &[u8], uri: &str| {
            let method = axum::http::Method::from_bytes(method).unwrap();
            app.clone().oneshot(Request::builder().method(method).uri(uri).body(Body::empty()).unwrap())
        };
        for id in 1..=3 {
            assert_eq!(send(b"POST", &format!("/timed/{id}")).await.unwrap().status(), StatusCode::OK);
        }
        // A method of the client's own making is counted, under a name clients cannot vary.
        send(b"FROB", "/timed/1").await.unwrap();
        let totals = crate::timings::totals();
        assert_eq!(totals["serve POST /timed/:id"].count, 3);
        assert_eq!(totals["serve OTHER /timed/:id"].count, 1);
        assert!(!totals.keys().any(|k| k.contains("FROB")), "{totals:?}");
    }

    #[tokio::test]
    async fn token_guard() {
        assert!(Token::new("").is_err() && Token::new("fifteen-bytes..").is_err());
        let token = "sixteen-bytes..!";
        let app = guarded(Router::new().route("/admin", post(|| async { "ok" })), Token::new(token).unwrap());
        let denied = app.clone().oneshot(Request::post("/admin").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
        let allowed = app
            .oneshot(Request::post("/admin").header(headers::TOKEN, token).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(allowed.status(), StatusCode::OK);
    }
}
