//! The hub's one retry policy: exponential delays with jitter, capped, for every loop that
//! waits out a database or agent outage (backon's builder; nothing hand-rolled).

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};

/// Delays from `first`, doubling, never above `cap`, for as long as it takes.
pub fn delays(first: Duration, cap: Duration) -> ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(first)
        .with_max_delay(cap)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// What a migration's driver waits between attempts while the database is away.
pub fn driver_delays() -> ExponentialBackoff {
    delays(Duration::from_millis(250), Duration::from_secs(10))
}

/// The next delay of an endless policy.
pub fn next(delays: &mut ExponentialBackoff, cap: Duration) -> Duration {
    delays.next().unwrap_or(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_their_cap_and_never_end() {
        let cap = Duration::from_secs(10);
        let mut d = driver_delays();
        let first: Vec<Duration> = (0..40).map(|_| next(&mut d, cap)).collect();
        // Jitter adds up to one delay: the first is between 250 and 500 ms.
        assert!(first[0] >= Duration::from_millis(250) && first[0] <= Duration::from_millis(500));
        assert!(first.iter().all(|d| *d <= cap * 2), "{first:?}");
        assert!(first[39] >= cap, "capped, not stopped: {first:?}");
    }
}
