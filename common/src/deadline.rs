//! Deadlines that travel with a request through every hop.
//!
//! A deadline is an absolute wall-clock instant (milliseconds since the Unix epoch), so that
//! every hop, on this machine or another with a synchronised clock, agrees on it without
//! subtracting per-hop latencies.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;

use crate::headers;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline {
    /// Milliseconds since the Unix epoch.
    at_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Deadline {
    pub fn after(budget: Duration) -> Self {
        Deadline { at_ms: now_ms() + budget.as_millis() as u64 }
    }

    /// The deadline carried by `headers`, if any and well formed.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let value = headers.get(headers::DEADLINE)?.to_str().ok()?;
        value.parse().ok().map(|at_ms| Deadline { at_ms })
    }

    /// The carried deadline, or one `budget` from now; never later than `cap` from now.
    pub fn from_headers_or(headers: &HeaderMap, budget: Duration) -> Self {
        let fallback = Self::after(budget);
        Self::from_headers(headers).map_or(fallback, |d| d.min(fallback))
    }

    /// A public request's deadline: the client's own (`x-quire-deadline`), never more than
    /// `max` away, or `budget` from now when it gave none.
    pub fn for_client(headers: &HeaderMap, budget: Duration, max: Duration) -> Self {
        let cap = Self::after(max);
        Self::from_headers(headers).map_or_else(|| Self::after(budget), |d| d.min(cap))
    }

    pub fn remaining(&self) -> Duration {
        Duration::from_millis(self.at_ms.saturating_sub(now_ms()))
    }

    pub fn expired(&self) -> bool {
        self.remaining().is_zero()
    }

    pub fn header_value(&self) -> String {
        self.at_ms.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_cap() {
        let mut headers = HeaderMap::new();
        let d = Deadline::after(Duration::from_secs(60));
        headers.insert(headers::DEADLINE, d.header_value().parse().unwrap());
        assert_eq!(Deadline::from_headers(&headers), Some(d));
        // A carried deadline later than the local budget is capped by it.
        let capped = Deadline::from_headers_or(&headers, Duration::from_secs(1));
        assert!(capped.remaining() <= Duration::from_secs(1));
        assert!(!capped.expired());
    }

    #[test]
    fn client_deadline_may_be_longer_than_the_budget_up_to_the_cap() {
        let mut headers = HeaderMap::new();
        assert!(
            Deadline::for_client(&headers, Duration::from_secs(1), Duration::from_secs(30)).remaining()
                <= Duration::from_secs(1)
        );
        headers.insert(headers::DEADLINE, Deadline::after(Duration::from_secs(5)).header_value().parse().unwrap());
        let d = Deadline::for_client(&headers, Duration::from_secs(1), Duration::from_secs(30));
        assert!(d.remaining() > Duration::from_secs(4));
        headers.insert(headers::DEADLINE, Deadline::after(Duration::from_secs(600)).header_value().parse().unwrap());
        let d = Deadline::for_client(&headers, Duration::from_secs(1), Duration::from_secs(30));
        assert!(d.remaining() <= Duration::from_secs(30));
    }

    #[test]
    fn malformed_header_is_ignored() {
        let mut headers = HeaderMap::new();
        headers.insert(headers::DEADLINE, "soon".parse().unwrap());
        assert_eq!(Deadline::from_headers(&headers), None);
    }
}
