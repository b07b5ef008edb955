//! Bandwidth limits for background work (re-replication copies, scrubbing): callers take bytes
//! from a shared budget and wait until it allows them. No credit builds up while idle, so the
//! rate holds from the first byte of a burst on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub struct Pace {
    /// Bytes per second; 0 means unlimited.
    rate: AtomicU64,
    /// When the budget allows the next bytes.
    next: Mutex<Instant>,
}

impl Pace {
    pub fn new(rate: u64) -> Pace {
        Pace { rate: AtomicU64::new(rate), next: Mutex::new(Instant::now()) }
    }

    /// Changes the rate from now on (0: unlimited).
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// The instant at which `bytes` more fit in the budget, reserving them.
    fn reserve(&self, bytes: u64, now: Instant) -> Instant {
        let rate = self.rate();
        if rate == 0 {
            return now;
        }
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let start = (*next).max(now);
        *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        start
    }

    /// Waits until the budget allows `bytes` more.
    pub async fn take(&self, bytes: u64) {
        let at = self.reserve(bytes, Instant::now());
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spaces_reservations_by_the_rate_and_follows_changes() {
        let p = Pace::new(100);
        let t0 = Instant::now();
        assert_eq!(p.reserve(50, t0), t0, "the first bytes go at once");
        assert_eq!(p.reserve(100, t0), t0 + Duration::from_millis(500));
        assert_eq!(p.reserve(1, t0), t0 + Duration::from_millis(1500));
        p.set_rate(0);
        assert_eq!(p.reserve(1 << 30, t0), t0, "0 is unlimited");
        // Idle time builds no credit: after a pause the budget starts from now.
        p.set_rate(1000);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(p.reserve(1000, later), later);
        assert_eq!(p.reserve(1, later), later + Duration::from_secs(1));
    }
}
