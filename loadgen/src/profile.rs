//! Load profiles: how many clients arrive per second over time, and the arrivals themselves.
//!
//! A profile is a sequence of phases (constant, ramp, diurnal, trace). Every phase is
//! piecewise linear in time, so the whole profile compiles to one list of linear
//! segments. That makes [`Profile::rate_at`] a binary search and lets
//! [`Profile::arrivals`] draw a non-homogeneous Poisson process by exact inversion: the
//! integral of a linear rate is a quadratic, solved once per arrival, with no rejected draws.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};

/// Hourly factors of the `diurnal` phase, midnight to 23:00, times its peak rate. The day
/// wraps: 23:00 interpolates back to midnight's factor, so consecutive days join smoothly.
const DIURNAL_FACTORS: [f64; 24] = [
    0.5, 0.3, 0.1, 0.1, 0.1, 0.2, 0.3, 0.7, 1.0, 0.8, 0.8, 0.8, 1.0, 1.1, 1.0, 0.8, 0.7, 0.8, 1.0, 1.2, 1.5, 1.4, 1.0,
    0.8,
];

/// A span of the profile over which the arrival rate changes linearly from `r0` to `r1`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Segment {
    /// Start, seconds since the profile began; `len` > 0.
    t0: f64,
    len: f64,
    /// Clients per second at the start and at the end; both ≥ 0.
    r0: f64,
    r1: f64,
}

impl Segment {
    fn end(&self) -> f64 {
        self.t0 + self.len
    }

    /// Change of rate per second.
    fn slope(&self) -> f64 {
        (self.r1 - self.r0) / self.len
    }

    fn rate_at(&self, t: f64) -> f64 {
        self.r0 + self.slope() * (t - self.t0)
    }

    /// Expected arrivals between `x` and the end (`x` relative to `t0`).
    fn mass_from(&self, x: f64) -> f64 {
        let rate = self.r0 + self.slope() * x;
        (rate + self.r1) / 2.0 * (self.len - x)
    }
}

/// A load profile: client arrival rate over time (see [`Profile::parse`] for the syntax).
#[derive(Clone, Debug)]
pub struct Profile {
    /// The text it was parsed from, as reported.
    spec: String,
    /// Contiguous, in time order, starting at 0; never empty.
    segments: Arc<[Segment]>,
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

impl Profile {
    /// SPEC: phases joined by commas, each KIND-ARGS-DURATION:
    ///
    /// ```text
    ///   c-20-30s          20 clients/s for 30 s
    ///   ramp-5-50-60s     5 to 50 clients/s over 60 s, linear
    ///   diurnal-40-120s   24 hourly factors 0.5 0.3 0.1 0.1 0.1 0.2 0.3 0.7 1.0 0.8 0.8 0.8 1.0 1.1 1.0 0.8 0.7
    ///                     0.8 1.0 1.2 1.5 1.4 1.0 0.8 times a peak of 40 clients/s, compressed into 120 s,
    ///                     linearly interpolated between hour points (the last hour back to the first)
    ///   trace-FILE.csv    rows `second,rate` (optional header), interpolated, lasting until the last second;
    ///                     before the first row the rate is the first row's
    /// ```
    ///
    /// A spike is `c-10-30s,c-80-10s,c-10-30s`. Durations accept s, m, h (e.g. 90s, 2m, 24h) and ms; rates may be
    /// fractional.
    pub fn parse(spec: &str) -> anyhow::Result<Profile> {
        let spec = spec.trim();
        if spec.is_empty() {
            bail!("empty profile: expected phases such as `c-20-30s` or `ramp-5-50-60s`, joined by commas");
        }
        let mut segments = Vec::new();
        let mut start = 0.0;
        for phase in spec.split(',') {
            let phase = phase.trim();
            let points = parse_phase(phase).with_context(|| format!("bad profile phase `{phase}`"))?;
            for pair in points.windows(2) {
                let ((x0, r0), (x1, r1)) = (pair[0], pair[1]);
                if x1 > x0 {
                    segments.push(Segment { t0: start + x0, len: x1 - x0, r0, r1 });
                }
            }
            start += points.last().map_or(0.0, |p| p.0);
        }
        Ok(Profile { spec: spec.to_string(), segments: segments.into() })
    }

    /// Length in seconds.
    pub fn duration(&self) -> f64 {
        self.segments.last().map_or(0.0, Segment::end)
    }

    /// Client arrivals per second at `t` seconds from the start (0 outside the profile).
    pub fn rate_at(&self, t: f64) -> f64 {
        if !(0.0..self.duration()).contains(&t) {
            return 0.0;
        }
        // The first segment ending after t holds it.
        let i = self.segments.partition_point(|s| s.end() <= t);
        self.segments.get(i).map_or(0.0, |s| s.rate_at(t))
    }

    /// Highest rate anywhere in the profile (a linear segment peaks at an end).
    pub fn peak(&self) -> f64 {
        self.segments.iter().map(|s| s.r0.max(s.r1)).fold(0.0, f64::max)
    }

    /// Expected number of arrivals over the whole profile: the integral of the rate.
    pub fn expected_arrivals(&self) -> f64 {
        self.segments.iter().map(|s| s.mass_from(0.0)).sum()
    }

    /// Poisson (open-loop) client arrival times in seconds, increasing, for the whole profile:
    /// a non-homogeneous Poisson process with intensity `rate_at(t)`, drawn by inversion (one
    /// exponential draw and one square root per arrival).
    pub fn arrivals<R: rand::Rng>(&self, rng: R) -> impl Iterator<Item = f64> {
        Arrivals { segments: Arc::clone(&self.segments), rng, index: 0, offset: 0.0 }
    }
}

/// The iterator behind [`Profile::arrivals`].
struct Arrivals<R> {
    segments: Arc<[Segment]>,
    rng: R,
    /// The segment the last arrival fell in, and its offset into it.
    index: usize,
    offset: f64,
}

impl<R: rand::Rng> Iterator for Arrivals<R> {
    type Item = f64;

    fn next(&mut self) -> Option<f64> {
        // The gaps between arrivals, measured in expected arrivals, are exponential(1).
        let u: f64 = self.rng.gen();
        let mut need = -(1.0 - u).ln();
        loop {
            let seg = self.segments.get(self.index)?;
            let mass = seg.mass_from(self.offset);
            if mass < need {
                need -= mass;
                self.index += 1;
                self.offset = 0.0;
                continue;
            }
            // Solve rate·d + slope·d²/2 = need for d ≥ 0, in the form that is stable for any
            // slope sign and for rate = 0.
            let rate = seg.r0 + seg.slope() * self.offset;
            let root = (rate * rate + 2.0 * seg.slope() * need).max(0.0).sqrt();
            let d = if need > 0.0 { 2.0 * need / (rate + root) } else { 0.0 };
            self.offset = (self.offset + d).min(seg.len);
            return Some(seg.t0 + self.offset);
        }
    }
}

/// Parses one phase into rate points `(seconds from the phase's start, rate)`, starting at 0.
fn parse_phase(phase: &str) -> anyhow::Result<Vec<(f64, f64)>> {
    let (kind, args) = phase.split_once('-').ok_or_else(|| anyhow!("expected KIND-ARGS-DURATION, e.g. c-20-30s"))?;
    if kind == "trace" {
        return read_trace(Path::new(args));
    }
    let args: Vec<&str> = args.split('-').collect();
    if args.iter().any(|a| a.is_empty()) {
        bail!("empty field (rates and durations must be non-negative, written without a sign)");
    }
    match (kind, args.as_slice()) {
        ("c", [rate, dur]) => {
            let (rate, dur) = (parse_rate(rate)?, parse_duration(dur)?);
            Ok(vec![(0.0, rate), (dur, rate)])
        }
        ("ramp", [from, to, dur]) => {
            let (from, to, dur) = (parse_rate(from)?, parse_rate(to)?, parse_duration(dur)?);
            Ok(vec![(0.0, from), (dur, to)])
        }
        ("diurnal", [peak, dur]) => {
            let (peak, dur) = (parse_rate(peak)?, parse_duration(dur)?);
            let hour = dur / 24.0;
            let mut points: Vec<_> =
                DIURNAL_FACTORS.iter().enumerate().map(|(h, f)| (h as f64 * hour, f * peak)).collect();
            points.push((dur, DIURNAL_FACTORS[0] * peak));
            Ok(points)
        }
        ("c", _) => bail!("`c` takes RATE-DURATION, e.g. c-20-30s"),
        ("ramp", _) => bail!("`ramp` takes FROM-TO-DURATION, e.g. ramp-5-50-60s"),
        ("diurnal", _) => bail!("`diurnal` takes PEAK-DURATION, e.g. diurnal-40-120s"),
        _ => bail!("unknown kind `{kind}`: expected c, ramp, diurnal or trace"),
    }
}

/// A rate in clients per second: a finite, non-negative number.
fn parse_rate(text: &str) -> anyhow::Result<f64> {
    let rate: f64 = text.parse().map_err(|_| anyhow!("rate `{text}` is not a number"))?;
    if !rate.is_finite() || rate < 0.0 {
        bail!("rate `{text}` must be a finite non-negative number");
    }
    Ok(rate)
}

/// A positive duration with a unit: `500ms`, `90s`, `2m`, `24h`; returned in seconds.
fn parse_duration(text: &str) -> anyhow::Result<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "" => bail!("duration `{text}` needs a unit: ms, s, m or h"),
        _ => bail!("duration `{text}` has an unknown unit `{unit}`: expected ms, s, m or h"),
    };
    let value: f64 = number.parse().map_err(|_| anyhow!("duration `{text}` is not a number with a unit"))?;
    if !value.is_finite() || value <= 0.0 {
        bail!("duration `{text}` must be positive");
    }
    Ok(value * scale)
}

/// Reads a `second,rate` CSV (an optional header row is skipped) into rate points shifted so
/// that the phase starts at 0, holding the first rate until the first row's second.
fn read_trace(path: &Path) -> anyhow::Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read trace file {}", path.display()))?;
    let mut points: Vec<(f64, f64)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let row = line.split_once(',').and_then(|(s, r)| Some((s.trim().parse::<f64>().ok()?, r.trim())));
        let Some((second, rate)) = row else {
            if n == 0 {
                continue; // the header
            }
            bail!("{}:{}: expected `second,rate`, got `{line}`", path.display(), n + 1);
        };
        let rate = parse_rate(rate).with_context(|| format!("{}:{}", path.display(), n + 1))?;
        if !second.is_finite() || second < 0.0 || points.last().is_some_and(|p| second <= p.0) {
            bail!("{}:{}: seconds must be non-negative and increasing", path.display(), n + 1);
        }
        points.push((second, rate));
    }
    let Some(&(first, rate)) = points.first() else { bail!("trace file {} has no rows", path.display()) };
    if first > 0.0 {
        points.insert(0, (0.0, rate));
    }
    if points.len() < 2 {
        bail!("trace file {} must last more than 0 s (give at least two seconds)", path.display());
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn constant_ramp_and_spike() {
        let p = Profile::parse("c-20-30s").unwrap();
        assert_eq!(p.duration(), 30.0);
        assert_eq!(p.rate_at(0.0), 20.0);
        assert_eq!(p.rate_at(29.9), 20.0);
        assert_eq!(p.rate_at(30.0), 0.0);
        assert_eq!(p.rate_at(-1.0), 0.0);
        assert_eq!(p.peak(), 20.0);

        let p = Profile::parse("ramp-5-50-60s").unwrap();
        assert!(close(p.rate_at(30.0), 27.5));
        assert!(close(p.rate_at(0.0), 5.0));
        assert!(close(p.expected_arrivals(), 27.5 * 60.0));

        let p = Profile::parse("c-10-30s, c-80-10s,c-10-30s").unwrap();
        assert_eq!(p.duration(), 70.0);
        assert_eq!(p.rate_at(29.99), 10.0);
        assert_eq!(p.rate_at(30.0), 80.0);
        assert_eq!(p.rate_at(40.0), 10.0);
        assert_eq!(p.peak(), 80.0);
        assert_eq!(p.to_string(), "c-10-30s, c-80-10s,c-10-30s");
    }

    #[test]
    fn durations_and_fractional_rates() {
        assert_eq!(Profile::parse("c-1-500ms").unwrap().duration(), 0.5);
        assert_eq!(Profile::parse("c-1-90s").unwrap().duration(), 90.0);
        assert_eq!(Profile::parse("c-1-2m").unwrap().duration(), 120.0);
        assert_eq!(Profile::parse("c-0.25-24h").unwrap().duration(), 86_400.0);
        assert_eq!(Profile::parse("c-0.25-1.5s").unwrap().rate_at(1.0), 0.25);
    }

    #[test]
    fn diurnal_hits_hour_points_and_interpolates() {
        let p = Profile::parse("diurnal-40-120s").unwrap();
        assert_eq!(p.duration(), 120.0);
        let hour = 5.0;
        for (h, f) in DIURNAL_FACTORS.iter().enumerate() {
            assert!(close(p.rate_at(h as f64 * hour), f * 40.0), "hour {h}");
        }
        // Midway between 19:00 (1.2) and 20:00 (1.5), and between 23:00 (0.8) and midnight (0.5).
        assert!(close(p.rate_at(19.5 * hour), 1.35 * 40.0));
        assert!(close(p.rate_at(23.5 * hour), 0.65 * 40.0));
        assert!(close(p.peak(), 60.0));
    }

    #[test]
    fn trace_with_header_interpolates() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "second,rate\n5,10\n15,30\n20,0").unwrap();
        let spec = format!("c-1-10s,trace-{}", f.path().display());
        let p = Profile::parse(&spec).unwrap();
        assert_eq!(p.duration(), 30.0);
        assert_eq!(p.rate_at(12.0), 10.0); // held before the first row
        assert!(close(p.rate_at(20.0), 20.0));
        assert!(close(p.rate_at(27.5), 15.0));

        let mut bare = tempfile::NamedTempFile::new().unwrap();
        writeln!(bare, "0,1\n10,2").unwrap();
        let p = Profile::parse(&format!("trace-{}", bare.path().display())).unwrap();
        assert!(close(p.rate_at(5.0), 1.5));
    }

    #[test]
    fn errors_name_the_bad_phase() {
        let cases = [
            ("c-20", "c-20"),
            ("x-1-2s", "unknown kind"),
            ("c--5-30s", "non-negative"),
            ("c-5--30s", "non-negative"),
            ("c-5-30", "needs a unit"),
            ("c-5-30x", "unknown unit"),
            ("c-5-0s", "positive"),
            ("c-five-3s", "not a number"),
            ("ramp-1-2s", "FROM-TO-DURATION"),
            ("c-1-1s,,c-1-1s", "bad profile phase ``"),
            ("trace-/no/such/file.csv", "cannot read trace file"),
        ];
        for (spec, want) in cases {
            let err = format!("{:#}", Profile::parse(spec).unwrap_err());
            assert!(err.contains(want), "{spec}: {err}");
        }
        assert!(format!("{:#}", Profile::parse("  ").unwrap_err()).contains("empty profile"));
        let err = format!("{:#}", Profile::parse("c-1-1s,c-20").unwrap_err());
        assert!(err.contains("`c-20`"), "{err}");

        let mut bad = tempfile::NamedTempFile::new().unwrap();
        writeln!(bad, "second,rate\n1,2\n0,3").unwrap();
        let err = format!("{:#}", Profile::parse(&format!("trace-{}", bad.path().display())).unwrap_err());
        assert!(err.contains("increasing"), "{err}");
    }

    #[test]
    fn arrivals_follow_the_rate_and_the_seed() {
        let p = Profile::parse("ramp-0-100-60s,c-30-40s,diurnal-50-100s").unwrap();
        let times: Vec<f64> = p.arrivals(StdRng::seed_from_u64(7)).collect();
        let expected = p.expected_arrivals();
        let n = times.len() as f64;
        assert!((n - expected).abs() < 4.0 * expected.sqrt(), "{n} arrivals, expected {expected}");
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        assert!(times.iter().all(|&t| (0.0..=p.duration()).contains(&t)));
        // The ramp's first half carries a quarter of its arrivals.
        let early = times.iter().filter(|&&t| t < 30.0).count() as f64;
        assert!((early - 750.0).abs() < 4.0 * 750f64.sqrt(), "{early}");

        let again: Vec<f64> = p.arrivals(StdRng::seed_from_u64(7)).collect();
        assert_eq!(times, again);
        let other: Vec<f64> = p.arrivals(StdRng::seed_from_u64(8)).collect();
        assert_ne!(times, other);
    }

    #[test]
    fn zero_rate_phases_have_no_arrivals() {
        let p = Profile::parse("c-0-10s,c-10-10s,ramp-0-0-5s").unwrap();
        let times: Vec<f64> = p.arrivals(StdRng::seed_from_u64(1)).collect();
        assert!(times.iter().all(|&t| (10.0..=20.0).contains(&t)));
        assert!(!times.is_empty());
    }
}
