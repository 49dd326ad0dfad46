//! Token buckets: a client's message budget (`--client-rate`, PROTOCOL.md
//! §8, 4029), its subscribes (`--subscribe-rate`), and the backend API's
//! requests per key (`--api-rate`, 429).

use tokio::time::Instant;

/// A token bucket: `rate` per second, holding up to twice that.
#[derive(Debug)]
pub(crate) struct RateLimit {
    tokens: f32,
    rate: f32,
    last: Instant,
}

impl RateLimit {
    pub(crate) fn new(rate: u32, now: Instant) -> Self {
        Self {
            tokens: 2.0 * rate as f32,
            rate: rate as f32,
            last: now,
        }
    }

    /// The rate, per second.
    pub(crate) fn rate(&self) -> u32 {
        self.rate as u32
    }

    /// Takes one token; `Err(ms)` with the wait until the next one.
    pub(crate) fn take(&mut self, now: Instant) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f32();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(2.0 * self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - self.tokens) / self.rate * 1000.0).ceil() as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_limit_allows_bursts_of_twice_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, t0);
        for _ in 0..20 {
            assert!(r.take(t0).is_ok());
        }
        let wait = r.take(t0).expect_err("bucket empty");
        assert_eq!(wait, 100);
        assert!(r.take(t0 + Duration::from_millis(100)).is_ok());
    }
}
