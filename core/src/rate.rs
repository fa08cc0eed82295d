//! A token bucket: the one rate rule of the node, in bytes per second with a short
//! burst. Sans-IO: the caller passes `now` and sleeps for the wait it is given.
//!
//! Used for the share of the cluster's uplink cap a lease holder's upstream fetch
//! runs at (`swarm tracker --uplink-cap`, the share computed by
//! [`crate::tracker::uplink`]) and for the agent-wide `swarm agent --download-rate`
//! that every received byte (pieces from peers, upstream bytes) passes through.
//!
//! The bucket is debited *after* bytes arrive ([`TokenBucket::take`]): its level may
//! go negative (a debt), and the caller waits until the debt is paid before reading
//! more. So reads of any size work at any rate, and a rate change
//! ([`TokenBucket::set_rate`]) shortens or lengthens a wait already under way: the
//! caller sleeps in short steps and asks [`TokenBucket::wait`] again. The bucket
//! starts empty and never holds more than `burst` worth of bytes (at most
//! [`MAX_BURST`]), so over any interval of length `t` at most `rate × t + burst`
//! bytes pass (plus the one read that ran into the debt).

use std::time::{Duration, Instant};

/// The longest burst a bucket allows: 100 ms worth of its rate.
pub const MAX_BURST: Duration = Duration::from_millis(100);

/// A token bucket of `rate` bytes per second (or unlimited) with at most
/// [`MAX_BURST`] of burst.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// Bytes per second; `None`: unlimited.
    rate: Option<u64>,
    burst: Duration,
    /// Bytes that may pass without waiting; negative: bytes owed.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    updated: Instant,
}

impl TokenBucket {
    /// An empty bucket of `rate` bytes per second (`None`: unlimited) allowing
    /// `burst` of burst (cut to [`MAX_BURST`]).
    pub fn new(rate: Option<u64>, burst: Duration, now: Instant) -> Self {
        Self { rate: rate.map(|r| r.max(1)), burst: burst.min(MAX_BURST), tokens: 0.0, updated: now }
    }

    /// The rate in bytes per second (`None`: unlimited).
    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// Changes the rate from `now` on (a debt is then paid at the new rate; tokens
    /// beyond the new burst are dropped).
    pub fn set_rate(&mut self, rate: Option<u64>, now: Instant) {
        self.refill(now);
        self.rate = rate.map(|r| r.max(1));
        match self.rate {
            Some(_) => self.tokens = self.tokens.min(self.burst_bytes()),
            None => self.tokens = 0.0,
        }
    }

    /// Debits `n` bytes that just arrived; returns how long to wait before more may.
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        if self.rate.is_none() {
            return Duration::ZERO;
        }
        self.tokens -= n as f64;
        self.debt_wait()
    }

    /// How long from `now` until the debt is paid (zero when there is none).
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        self.debt_wait()
    }

    fn burst_bytes(&self) -> f64 {
        self.rate.map_or(0.0, |r| r as f64 * self.burst.as_secs_f64())
    }

    fn debt_wait(&self) -> Duration {
        match self.rate {
            Some(rate) if self.tokens < 0.0 => Duration::from_secs_f64(-self.tokens / rate as f64),
            _ => Duration::ZERO,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated);
        self.updated = self.updated.max(now);
        if let Some(rate) = self.rate {
            self.tokens = (self.tokens + rate as f64 * elapsed.as_secs_f64()).min(self.burst_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_debt_is_paid_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Some(1000), MAX_BURST, t0);
        // Starts empty: the first bytes already wait.
        assert_eq!(b.take(500, t0), 500 * MS);
        assert_eq!(b.wait(t0 + 200 * MS), 300 * MS);
        assert_eq!(b.wait(t0 + 500 * MS), Duration::ZERO);
        assert_eq!(b.take(0, t0 + 500 * MS), Duration::ZERO);
    }

    #[test]
    fn idle_time_buys_at_most_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Some(1000), Duration::from_secs(5), t0);
        // A burst of 5 s is cut to 100 ms: 100 bytes after a long idle.
        let t = t0 + Duration::from_secs(60);
        assert_eq!(b.take(100, t), Duration::ZERO);
        assert_eq!(b.take(1, t), MS);
    }

    #[test]
    fn a_rate_change_reprices_the_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Some(1), MAX_BURST, t0);
        assert!(b.take(64 * 1024, t0) > Duration::from_secs(3600));
        b.set_rate(Some(64 * 1024), t0 + 100 * MS);
        let w = b.wait(t0 + 100 * MS);
        assert!(w > 990 * MS && w <= Duration::from_secs(1), "{w:?}");
        b.set_rate(None, t0 + 200 * MS);
        assert_eq!(b.wait(t0 + 200 * MS), Duration::ZERO);
        assert_eq!(b.take(1 << 30, t0 + 200 * MS), Duration::ZERO);
        // Back to a rate: starts empty again.
        b.set_rate(Some(1000), t0 + 300 * MS);
        assert_eq!(b.take(10, t0 + 300 * MS), 10 * MS);
    }

    /// A reader that reads `chunk` bytes whenever its wait is over, in virtual time,
    /// with the rate changing midway: every 1 s window carries at most the rate plus
    /// the burst plus one chunk, and the long-run average is the rate.
    #[test]
    fn a_greedy_reader_stays_under_the_rate_in_every_window() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Some(5_000_000), MAX_BURST, t0);
        let chunk = 16 * 1024u64;
        let mut now = t0;
        let mut log: Vec<(Duration, u64)> = Vec::new();
        let end = Duration::from_secs(20);
        while now - t0 < end {
            if now - t0 >= Duration::from_secs(10) && b.rate() == Some(5_000_000) {
                b.set_rate(Some(2_000_000), now);
            }
            let wait = b.take(chunk, now);
            log.push((now - t0, chunk));
            // The reader sleeps at least 1 µs and then reads again.
            now += wait.max(Duration::from_micros(1));
        }
        for start_ms in (0..19_000).step_by(50) {
            let from = Duration::from_millis(start_ms);
            let to = from + Duration::from_secs(1);
            let bytes: u64 = log.iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, n)| n).sum();
            let rate = if to <= Duration::from_secs(10) { 5_000_000.0 } else { 5_000_000.0f64.max(2_000_000.0) };
            let allowed = rate * 1.1 + chunk as f64;
            assert!((bytes as f64) <= allowed, "window at {from:?}: {bytes} bytes > {allowed}");
        }
        let late: u64 = log.iter().filter(|(t, _)| *t >= Duration::from_secs(12)).map(|(_, n)| n).sum();
        let avg = late as f64 / 8.0;
        assert!((avg - 2_000_000.0).abs() < 2_000_000.0 * 0.01, "average {avg} bytes/s");
    }

    #[test]
    fn unlimited_never_waits() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(None, MAX_BURST, t0);
        assert_eq!(b.take(u64::MAX / 2, t0), Duration::ZERO);
        assert_eq!(b.rate(), None);
    }
}
