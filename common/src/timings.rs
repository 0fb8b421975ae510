//! Where a request's time goes: every span of this process, timed from creation to close
//! and summed by name, served in `/metrics` as `quire_span_seconds_{sum,count}`.
//!
//! A span is one hop or one step: `serve` (a request this server answered, by route),
//! `forward` (a balancer passing a request on), `raft.write` (a proposal until applied),
//! `raft.entry` (one log entry, carrying one write or a batch, until applied),
//! `raft.append` (the log's append and fsync), `raft.apply`, `raft.send` (one Raft RPC),
//! `hold` (the catalog leader holding a book at every leased frontend), and so on. A span
//! may carry a field `hop` (a route, a tier): it is added to the name. Times are wall
//! times, waits included, so nested spans overlap: `bench/spans.sh` reads the sums before
//! and after a benchmark run and prints what each span costs a request on average.
//!
//! The totals are kept per process: one [`Counter`] of atomics per name, found by name in a
//! small map behind a mutex. A span costs a few microseconds (every logging layer formats
//! its fields), so the hops every request takes are timed by a [`Stopwatch`] instead, under
//! the same names; one started on a [`Counter`] kept by its caller takes no lock at all.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Count and summed duration of one span name.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Total {
    pub count: u64,
    pub time: Duration,
}

/// The running totals of one name, updated without a lock. Made once per name by
/// [`counter`] and never freed (names are few: spans, hops and routes).
#[derive(Debug, Default)]
pub struct Counter {
    count: AtomicU64,
    nanos: AtomicU64,
}

impl Counter {
    fn add(&self, took: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.nanos.fetch_add(took.as_nanos().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    fn total(&self) -> Total {
        let (count, nanos) = (self.count.load(Ordering::Relaxed), self.nanos.load(Ordering::Relaxed));
        Total { count, time: Duration::from_nanos(nanos) }
    }
}

static COUNTERS: Mutex<BTreeMap<String, &'static Counter>> = Mutex::new(BTreeMap::new());

/// The counter of `key`, made on first use.
pub fn counter(key: &str) -> &'static Counter {
    let mut counters = COUNTERS.lock().unwrap_or_else(PoisonError::into_inner);
    match counters.get(key) {
        Some(counter) => counter,
        None => counters.entry(key.to_string()).or_insert_with(|| Box::leak(Box::default())),
    }
}

/// The layer that times spans; installed by [`crate::telemetry::init`].
pub struct Timings;

/// What a span carries from creation to close.
struct Started {
    at: Instant,
    key: String,
}

/// Picks the `hop` field out of a span's fields.
struct HopField(Option<String>);

impl Visit for HopField {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "hop" {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "hop" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<S> Layer<S> for Timings
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut hop = HopField(None);
        attrs.record(&mut hop);
        let name = attrs.metadata().name();
        let key = match hop.0 {
            Some(hop) => format!("{name} {hop}"),
            None => name.to_string(),
        };
        span.extensions_mut().insert(Started { at: Instant::now(), key });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(started) = span.extensions_mut().remove::<Started>() else { return };
        record(&started.key, started.at.elapsed());
    }
}

fn record(key: &str, took: Duration) {
    counter(key).add(took);
}

/// Times from its start until it is dropped and adds the time to `key`, as a span of that
/// name would: for the hops every request takes (a server's `serve`, a balancer's `forward`
/// and `queue`), where a tracing span, formatted by every logging layer, would cost a
/// cached lookup more than the lookup itself.
pub struct Stopwatch {
    counter: &'static Counter,
    started: Instant,
}

impl Stopwatch {
    pub fn start(key: impl Into<Cow<'static, str>>) -> Self {
        Stopwatch::on(counter(&key.into()))
    }

    /// Times into `counter`, found by the caller once (no lock here or when it stops).
    pub fn on(counter: &'static Counter) -> Self {
        Stopwatch { counter, started: Instant::now() }
    }
}

impl Drop for Stopwatch {
    fn drop(&mut self) {
        self.counter.add(self.started.elapsed());
    }
}

/// Every span name timed so far in this process, with its totals.
pub fn totals() -> BTreeMap<String, Total> {
    let counters = COUNTERS.lock().unwrap_or_else(PoisonError::into_inner);
    counters.iter().map(|(key, counter)| (key.clone(), counter.total())).collect()
}

/// The totals in Prometheus' text format, each series labelled with `labels` (for example
/// `server="catalog-1"`) and the span's name.
pub fn prometheus(labels: &str) -> String {
    let totals = totals();
    let mut text = String::from(
        "# HELP quire_span_seconds Time spent in each named span (a hop or a step), summed since start.\n\
         # TYPE quire_span_seconds summary\n",
    );
    for (span, total) in &totals {
        let span = span.replace('\\', "\\\\").replace('"', "\\\"");
        let sep = if labels.is_empty() { "" } else { "," };
        let _ = writeln!(text, "quire_span_seconds_sum{{{labels}{sep}span=\"{span}\"}} {}", total.time.as_secs_f64());
        let _ = writeln!(text, "quire_span_seconds_count{{{labels}{sep}span=\"{span}\"}} {}", total.count);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn spans_are_summed_by_name_and_hop() {
        let subscriber = tracing_subscriber::registry().with(Timings);
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..3 {
                let _span = tracing::info_span!("test.step", hop = "GET /x").entered();
                std::thread::sleep(Duration::from_millis(2));
            }
            drop(tracing::info_span!("test.other").entered());
        });
        let totals = totals();
        let step = totals["test.step GET /x"];
        assert_eq!(step.count, 3);
        assert!(step.time >= Duration::from_millis(6), "{step:?}");
        assert_eq!(totals["test.other"].count, 1);
        drop(Stopwatch::start("test.watch"));
        drop(Stopwatch::start(format!("test.watch {}", "GET /y")));
        let totals = super::totals();
        assert_eq!((totals["test.watch"].count, totals["test.watch GET /y"].count), (1, 1));
        let text = prometheus("server=\"s\"");
        assert!(text.contains("quire_span_seconds_count{server=\"s\",span=\"test.step GET /x\"} 3"), "{text}");
    }
}
