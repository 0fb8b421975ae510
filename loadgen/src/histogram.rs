//! A fixed log-bucket latency histogram: O(1) record without allocation, 16 buckets per power
//! of two of microseconds (at most 1/16 ≈ 6 % wide, reported at the middle: within ~3 %),
//! exact below 16 µs, from 0 to about 12 days. Small enough (4.7 KB) to keep one per second
//! in flight; the maximum is kept exactly.

/// Sub-buckets per power of two, as a power of two.
const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;
/// Values are clamped below 2^TOP_BITS µs (about 12.7 days).
const TOP_BITS: u32 = 40;
const BUCKETS: usize = ((TOP_BITS - SUB_BITS + 1) as u64 * SUB) as usize;

#[derive(Clone, Debug)]
pub(crate) struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
    max_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: Box::new([0; BUCKETS]), total: 0, max_us: 0 }
    }
}

fn index(us: u64) -> usize {
    let us = us.min((1 << TOP_BITS) - 1);
    if us < SUB {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros();
    let sub = (us >> (exp - SUB_BITS)) & (SUB - 1);
    ((exp - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

/// Middle of bucket `i` in µs.
fn middle(i: usize) -> f64 {
    let i = i as u64;
    if i < SUB {
        return i as f64;
    }
    let exp = (i / SUB) as u32 + SUB_BITS - 1;
    let width = 1u64 << (exp - SUB_BITS);
    let low = (SUB + i % SUB) << (exp - SUB_BITS);
    low as f64 + width as f64 / 2.0
}

impl Histogram {
    /// Records one latency in milliseconds (negative and NaN count as 0).
    pub fn record(&mut self, ms: f64) {
        let us = (ms * 1000.0).max(0.0) as u64;
        self.counts[index(us)] += 1;
        self.total += 1;
        self.max_us = self.max_us.max(us);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max_ms(&self) -> f64 {
        self.max_us as f64 / 1000.0
    }

    /// The `q` quantile (0..=1) in milliseconds: the smallest recorded value with at least
    /// `q` of all values at or below it, to bucket precision; 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        if rank == self.total {
            return self.max_ms();
        }
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return middle(i).min(self.max_us as f64) / 1000.0;
            }
        }
        self.max_ms()
    }

    pub fn clear(&mut self) {
        if self.total > 0 {
            self.counts.fill(0);
            self.total = 0;
            self.max_us = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_monotone() {
        let mut last = 0;
        for us in 0..100_000u64 {
            let i = index(us);
            assert!(i == last || i == last + 1, "{us}");
            last = i;
            // The bucket's middle is within its relative width of the value.
            assert!((middle(i) - us as f64).abs() <= (us as f64 / 16.0).max(0.5), "{us}");
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_within_precision() {
        let mut h = Histogram::default();
        for ms in 1..=1000 {
            h.record(ms as f64);
        }
        assert_eq!(h.count(), 1000);
        for (q, want) in [(0.5, 500.0), (0.9, 900.0), (0.99, 990.0)] {
            let got = h.quantile_ms(q);
            assert!((got - want).abs() / want < 0.04, "q{q}: {got}");
        }
        assert_eq!(h.max_ms(), 1000.0);
        assert_eq!(h.quantile_ms(1.0), 1000.0);
        h.clear();
        assert_eq!(h.quantile_ms(0.5), 0.0);
    }
}
