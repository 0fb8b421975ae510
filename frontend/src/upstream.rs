//! Calls from a frontend to the catalog and order tiers through their balancers, with the
//! request's deadline, retried until it runs out whenever retrying is safe.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;

use quire_common::client::{call, CallError, ATTEMPT_TIMEOUT};
use quire_common::{headers, ApiError, Deadline};

/// The balancers of one tier. Every frontend sends to the same one, the first of the list
/// that answers, and moves to the next when it fails: the tier's central queue then really is
/// one queue (two balancers sharing the load would each dispatch to the same worker slots),
/// and the other balancers stand by.
#[derive(Clone)]
pub struct Tier {
    balancers: Arc<Vec<String>>,
    /// The balancer in use, as an index into `balancers` (modulo its length).
    current: Arc<AtomicUsize>,
    client: reqwest::Client,
    token: Arc<str>,
}

/// Codes after which the same request may succeed if sent again. Not `dropped`: a tier
/// that cannot finish the request before its deadline will not on a second try either.
fn transient(code: &str) -> bool {
    matches!(code, "unavailable" | "not_leader" | "deadline_exceeded")
}

impl Tier {
    pub fn new(balancers: Vec<String>, client: reqwest::Client, token: Arc<str>) -> Self {
        Tier { balancers: Arc::new(balancers), current: Arc::new(AtomicUsize::new(0)), client, token }
    }

    fn pick(&self) -> (usize, &str) {
        let n = self.current.load(Ordering::Relaxed);
        (n, &self.balancers[n % self.balancers.len()])
    }

    /// The balancer picked as `n` failed: move on, unless another request already did.
    fn fail_over(&self, n: usize) {
        let _ = self.current.compare_exchange(n, n.wrapping_add(1), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// GETs `path` (reads are idempotent: retried on any transient failure).
    pub async fn get<T: DeserializeOwned>(&self, path: &str, deadline: Deadline) -> Result<T, ApiError> {
        self.send(deadline, |client, base| client.get(format!("{base}{path}"))).await.map_err(|(e, _)| e)
    }

    /// POSTs `body` to `path` carrying `key`: the target applies a key at most once, so
    /// the request is retried until the deadline whenever its outcome is unknown. If it
    /// may have been delivered and no attempt got an answer, the error is
    /// `deadline_exceeded` (outcome unknown), never a failure.
    pub async fn post_keyed<T: DeserializeOwned, B: serde::Serialize>(
        &self,
        path: &str,
        key: &str,
        body: &B,
        deadline: Deadline,
    ) -> Result<T, ApiError> {
        let sent = self
            .send(deadline, |client, base| {
                client.post(format!("{base}{path}")).header(headers::IDEMPOTENCY_KEY, key).json(body)
            })
            .await;
        sent.map_err(|(e, maybe_delivered)| {
            // A refusal now does not undo an earlier attempt that may have been carried out.
            if maybe_delivered && (transient(e.code) || e.code == "dropped") {
                ApiError::deadline_exceeded("the request was not confirmed in time; its outcome is unknown")
            } else {
                e
            }
        })
    }

    /// Tries until an answer or the deadline. The error comes with whether any attempt may
    /// have reached a server (anything but a refused connection).
    async fn send<T: DeserializeOwned>(
        &self,
        deadline: Deadline,
        build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<T, (ApiError, bool)> {
        let mut last: Option<CallError> = None;
        let mut maybe_delivered = false;
        loop {
            let remaining = deadline.remaining();
            if remaining.is_zero() {
                tracing::debug!(error = ?last, "upstream gave up at the deadline");
                let error = match last {
                    Some(CallError::Api(e)) if e.code != "deadline_exceeded" => e,
                    _ => ApiError::deadline_exceeded("the store could not answer in time"),
                };
                return Err((error, maybe_delivered));
            }
            let (picked, balancer) = self.pick();
            let request = build(&self.client, balancer)
                .header(headers::TOKEN, &*self.token)
                .header(headers::DEADLINE, deadline.header_value())
                .timeout(remaining.min(ATTEMPT_TIMEOUT));
            match call::<T>(request).await {
                Ok(value) => return Ok(value),
                Err(CallError::Api(e)) if !transient(e.code) => return Err((e, maybe_delivered)),
                Err(e) => {
                    maybe_delivered |= !matches!(e, CallError::Unreachable(_));
                    // The balancer itself failed (not a backend behind it): use the next one.
                    if !matches!(e, CallError::Api(_)) {
                        self.fail_over(picked);
                    }
                    tracing::debug!(error = %e, "upstream attempt failed; retrying");
                    last = Some(e);
                }
            }
            tokio::time::sleep(Duration::from_millis(25).min(deadline.remaining())).await;
        }
    }
}
