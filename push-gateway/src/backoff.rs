//! When to try a failed send again: jittered exponential backoff that never
//! comes earlier than the provider's `Retry-After`.

use std::time::Duration;

use rand::Rng;

/// The backoff before attempt `failures + 1`, after `failures` (≥ 1) failed
/// attempts: `base · 2^(failures-1)` capped at `max`, with "equal jitter"
/// (a uniformly random point in the upper half), so retries of many jobs
/// that failed together spread out instead of coming back as one burst.
pub fn backoff(failures: u32, base: Duration, max: Duration, rng: &mut impl Rng) -> Duration {
    let exp = failures.saturating_sub(1).min(32);
    let full = base.saturating_mul(1u32 << exp.min(31)).min(max);
    let half = full / 2;
    let jitter_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(rng.random_range(0..=jitter_nanos))
}

/// The delay before the next attempt, given what the provider said
/// (`after`, see [`crate::Outcome::Retry`]) and the number of failures so far.
pub fn retry_delay(
    after: Option<Duration>,
    failures: u32,
    base: Duration,
    max: Duration,
    rng: &mut impl Rng,
) -> Duration {
    match after {
        Some(d) if d.is_zero() => Duration::ZERO,
        Some(d) => d.max(backoff(failures, base, max, rng)),
        None => backoff(failures, base, max, rng),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const BASE: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(300);

    #[test]
    fn grows_exponentially_within_jitter_bounds_and_caps() {
        let mut rng = StdRng::seed_from_u64(7);
        for failures in 1..=20u32 {
            let full = BASE.saturating_mul(1 << (failures - 1).min(31)).min(MAX);
            for _ in 0..200 {
                let d = backoff(failures, BASE, MAX, &mut rng);
                assert!(d >= full / 2 && d <= full, "{failures}: {d:?} vs {full:?}");
            }
        }
        assert!(backoff(u32::MAX, BASE, MAX, &mut rng) <= MAX);
    }

    #[test]
    fn jitter_spreads_retries() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut seen: Vec<Duration> = (0..50).map(|_| backoff(4, BASE, MAX, &mut rng)).collect();
        seen.sort();
        seen.dedup();
        assert!(seen.len() > 40);
    }

    #[test]
    fn never_earlier_than_retry_after() {
        let mut rng = StdRng::seed_from_u64(3);
        for failures in 1..10 {
            let d = retry_delay(Some(Duration::from_secs(30)), failures, BASE, MAX, &mut rng);
            assert!(d >= Duration::from_secs(30));
        }
        let late = retry_delay(Some(Duration::from_secs(1)), 9, BASE, MAX, &mut rng);
        assert!(
            late >= Duration::from_secs(128),
            "backoff still applies: {late:?}"
        );
        assert_eq!(
            retry_delay(Some(Duration::ZERO), 5, BASE, MAX, &mut rng),
            Duration::ZERO
        );
    }
}
