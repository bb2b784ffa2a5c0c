//! The hub's one clock: the wall time every row is stamped with and every timeout, lease and
//! hold-down is measured against. In production it is the system clock; tests pause it and move
//! it forward, so an hour's hold-down or a phase timeout is tested in virtual time.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};

/// A cloneable handle on the hub's time; clones share one clock.
#[derive(Clone, Default)]
pub struct Clock {
    /// `None`: the system clock, untouched.
    adjusted: Option<Arc<Mutex<Adjusted>>>,
}

#[derive(Debug)]
struct Adjusted {
    /// Where time stands while paused.
    paused_at: Option<DateTime<Utc>>,
    /// How far ahead of the system clock time runs while not paused.
    ahead: Duration,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.adjusted {
            None => f.write_str("Clock(system)"),
            Some(a) => write!(f, "Clock({:?})", lock(a)),
        }
    }
}

fn lock(a: &Mutex<Adjusted>) -> std::sync::MutexGuard<'_, Adjusted> {
    a.lock().unwrap_or_else(|e| e.into_inner())
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that runs with the system clock until a test pauses or advances it.
    pub fn adjustable() -> Self {
        Self {
            adjusted: Some(Arc::new(Mutex::new(Adjusted {
                paused_at: None,
                ahead: Duration::zero(),
            }))),
        }
    }

    /// The time now.
    pub fn now(&self) -> DateTime<Utc> {
        match &self.adjusted {
            None => Utc::now(),
            Some(a) => {
                let a = lock(a);
                a.paused_at.unwrap_or_else(|| Utc::now() + a.ahead)
            }
        }
    }

    /// Stops time where it is (an adjustable clock; the system clock ignores it).
    pub fn pause(&self) {
        if let Some(a) = &self.adjusted {
            let mut a = lock(a);
            if a.paused_at.is_none() {
                a.paused_at = Some(Utc::now() + a.ahead);
            }
        }
    }

    /// Lets time run again from where it stands.
    pub fn resume(&self) {
        if let Some(a) = &self.adjusted {
            let mut a = lock(a);
            if let Some(at) = a.paused_at.take() {
                a.ahead = at - Utc::now();
            }
        }
    }

    /// Moves time forward by `by` (paused or not).
    ///
    /// # Panics
    /// On the system clock: a test that means to move time must build an adjustable one.
    pub fn advance(&self, by: std::time::Duration) {
        let a = self
            .adjusted
            .as_ref()
            .expect("the system clock cannot be advanced; use Clock::adjustable()");
        let by = Duration::from_std(by).expect("an advance of under 292 years");
        let mut a = lock(a);
        match &mut a.paused_at {
            Some(at) => *at += by,
            None => a.ahead += by,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paused_clock_stands_still_and_moves_only_when_advanced() {
        let clock = Clock::adjustable();
        clock.pause();
        let t0 = clock.now();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(clock.now(), t0);
        clock.advance(std::time::Duration::from_secs(3600));
        assert_eq!(clock.now(), t0 + Duration::hours(1));
        clock.resume();
        let later = clock.now();
        assert!(
            later >= t0 + Duration::hours(1)
                && later < t0 + Duration::hours(1) + Duration::seconds(5)
        );
    }

    #[test]
    fn clones_share_one_clock() {
        let clock = Clock::adjustable();
        let other = clock.clone();
        clock.advance(std::time::Duration::from_secs(600));
        assert!(other.now() >= Utc::now() + Duration::seconds(599));
        assert!(Clock::system().now() <= Utc::now());
    }
}
