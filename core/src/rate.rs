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
//!
//! A bucket paces *requests*; what crosses the link is the answers, which come late
//! and in bunches when the sender or the path stalls. [`WindowGuard`] is the second
//! rule of a limiter that asks for ranges: it counts what arrived and what is asked
//! for but not yet arrived, and holds a new request back while they would put more
//! than `rate × (1 + WINDOW_SLACK)` into any [`WINDOW`] on the link, however the
//! answers' delays vary.

use std::collections::VecDeque;
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

/// The window over which a rate is judged: 1 s, as an operator's graph of the uplink.
pub const WINDOW: Duration = Duration::from_secs(1);
/// How far over its rate a [`WindowGuard`] lets a window run: 4 %. The bucket alone
/// keeps the average at the rate; this bounds the bunching of answers, under the 5 %
/// the uplink cap allows.
pub const WINDOW_SLACK: f64 = 0.04;
/// How many recent answer delays the guard keeps for its estimate of the shortest.
const DELAYS_KEPT: usize = 16;
/// The wait the guard gives when only bytes still to arrive stand in the way.
const ARRIVAL_STEP: Duration = Duration::from_millis(5);

/// Keeps every [`WINDOW`] of bytes arriving on a link under `rate × (1 +
/// WINDOW_SLACK)` for a reader that asks for its bytes in ranges. Sans-IO.
///
/// A range of `len` bytes is admitted at `now` only if the bytes seen arriving in
/// the last `WINDOW - d` (where `d` is the shortest recent delay between a request and
/// its answer), plus the bytes asked for and not yet arrived, plus `len`, stay within
/// the limit. Every byte arriving in a window `[a, a + WINDOW]` was asked for at or
/// before the last admission `t` ≤ `a + WINDOW - d`, and was not yet seen at `t -
/// (WINDOW - d)` ≤ `a` (a byte is seen no earlier than it crossed the link): so it is
/// among what that admission counted. This holds whatever the answers' delays, as
/// long as none is shorter than `d`, and wherever on the path the window is measured.
#[derive(Clone, Debug, Default)]
pub struct WindowGuard {
    /// Bytes seen arriving in the last [`WINDOW`], oldest first, merged per millisecond.
    arrivals: VecDeque<(Instant, u64)>,
    /// Bytes admitted and not yet seen.
    outstanding: u64,
    /// The most recent answer delays.
    delays: VecDeque<Duration>,
}

impl WindowGuard {
    /// Asks to admit a range of `len` bytes at `now` under `rate` bytes per second:
    /// zero when it is admitted (and counted as outstanding), else how long to wait
    /// before asking again.
    pub fn admit(&mut self, len: u64, rate: u64, now: Instant) -> Duration {
        self.prune(now);
        let horizon = WINDOW.saturating_sub(self.shortest_delay());
        let limit = rate as f64 * WINDOW.as_secs_f64() * (1.0 + WINDOW_SLACK);
        let recent = |t: &Instant| now.saturating_duration_since(*t) < horizon;
        let seen: u64 = self.arrivals.iter().filter(|(t, _)| recent(t)).map(|(_, n)| n).sum();
        let counted = seen + self.outstanding;
        // A range larger than the limit (a tiny rate) goes alone.
        if (counted + len) as f64 <= limit || counted == 0 {
            self.outstanding += len;
            return Duration::ZERO;
        }
        // Wait until enough of what was seen leaves the horizon, if that is enough.
        let mut need = (counted + len) as f64 - limit;
        for (t, n) in self.arrivals.iter().filter(|(t, _)| recent(t)) {
            need -= *n as f64;
            if need <= 0.0 {
                let leaves = *t + horizon;
                return leaves.saturating_duration_since(now).max(Duration::from_micros(100));
            }
        }
        ARRIVAL_STEP
    }

    /// Counts `n` bytes seen arriving at `now` (from an admitted range or not).
    pub fn arrived(&mut self, n: u64, now: Instant) {
        self.outstanding = self.outstanding.saturating_sub(n);
        match self.arrivals.back_mut() {
            Some((t, bytes)) if now.saturating_duration_since(*t) < Duration::from_millis(1) => *bytes += n,
            _ => self.arrivals.push_back((now, n)),
        }
        self.prune(now);
    }

    /// Forgets `n` admitted bytes that will never arrive (a range given up).
    pub fn released(&mut self, n: u64) {
        self.outstanding = self.outstanding.saturating_sub(n);
    }

    /// Records how long a request took to be answered (its first bytes seen).
    pub fn answered(&mut self, delay: Duration) {
        if self.delays.len() == DELAYS_KEPT {
            self.delays.pop_front();
        }
        self.delays.push_back(delay);
    }

    /// Bytes admitted and not yet seen.
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// The shortest recent answer delay, at most half the window (zero before any).
    fn shortest_delay(&self) -> Duration {
        self.delays.iter().min().copied().unwrap_or_default().min(WINDOW / 2)
    }

    fn prune(&mut self, now: Instant) {
        while self.arrivals.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) >= WINDOW) {
            self.arrivals.pop_front();
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

    /// Ranges of 25 ms asked for by a bucket at 5 MB/s, four in flight, through a path
    /// whose delay swings between 10 and 160 ms (stalls, then everything at once) in
    /// virtual time: with the guard no 1 s window of arrivals passes 1.04 x the rate,
    /// where the bucket alone lets one pass 1.1 x; and on a steady path the guard
    /// costs nothing (the average stays at the rate).
    #[test]
    fn the_guard_keeps_bunched_answers_under_the_rate_in_every_window() {
        fn run(guarded: bool, swing: bool) -> (f64, f64) {
            let rate = 5_000_000u64;
            let len = 125_000u64;
            let t0 = Instant::now();
            let mut bucket = TokenBucket::new(Some(rate), Duration::from_millis(25), t0);
            let mut guard = WindowGuard::default();
            // (arrival time, bytes) of the ranges in flight; the arrivals log.
            let mut in_flight: VecDeque<(Instant, u64)> = VecDeque::new();
            let mut log: Vec<(Duration, u64)> = Vec::new();
            let mut now = t0;
            let mut next_request = t0 + bucket.take(len, t0);
            let step = Duration::from_millis(1);
            let end = t0 + Duration::from_secs(20);
            let mut k = 0u32;
            while now < end {
                while in_flight.front().is_some_and(|(t, _)| *t <= now) {
                    let (_, n) = in_flight.pop_front().expect("front");
                    guard.arrived(n, now);
                    log.push((now - t0, n));
                }
                if now >= next_request && in_flight.len() < 4 {
                    let admitted = !guarded || guard.admit(len, rate, now).is_zero();
                    if admitted {
                        // Every 100th range waits 150 ms more: a stall; the ones after it
                        // answer at the usual 10 ms and arrive in a bunch behind it.
                        let delay = if swing && k % 100 == 50 { 160 } else { 10 };
                        let at = (now + Duration::from_millis(delay)).max(in_flight.back().map_or(now, |(t, _)| *t));
                        guard.answered(Duration::from_millis(10));
                        in_flight.push_back((at, len));
                        k += 1;
                        next_request = now + bucket.take(len, now);
                    }
                }
                now += step;
            }
            let mut peak = 0u64;
            for start_ms in 0..19_000u64 {
                let from = Duration::from_millis(start_ms);
                let to = from + WINDOW;
                let bytes: u64 = log.iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, n)| n).sum();
                peak = peak.max(bytes);
            }
            let total: u64 = log.iter().filter(|(t, _)| *t >= Duration::from_secs(2)).map(|(_, n)| n).sum();
            let last = log.last().map_or(1.0, |(t, _)| t.as_secs_f64());
            (peak as f64 / rate as f64, total as f64 / (last - 2.0) / rate as f64)
        }
        let (bare_peak, bare_avg) = run(false, true);
        let (guarded_peak, guarded_avg) = run(true, true);
        let (steady_peak, steady_avg) = run(true, false);
        eprintln!(
            "peak / average over the rate: bucket alone {bare_peak:.3} / {bare_avg:.3}, guarded {guarded_peak:.3} / \
             {guarded_avg:.3}, guarded on a steady path {steady_peak:.3} / {steady_avg:.3}"
        );
        assert!(bare_peak > 1.06, "the bucket alone: {bare_peak:.3} x (the case should bunch)");
        assert!(guarded_peak <= 1.0 + WINDOW_SLACK + 1e-9, "guarded: {guarded_peak:.3} x");
        assert!(guarded_avg > 0.95, "guarded average {guarded_avg:.3} x");
        assert!(steady_peak <= 1.0 + WINDOW_SLACK + 1e-9 && steady_avg > 0.99, "{steady_peak:.3} {steady_avg:.3}");
    }

    #[test]
    fn the_guard_forgets_what_will_not_arrive_and_lets_a_large_range_go_alone() {
        let t0 = Instant::now();
        let mut g = WindowGuard::default();
        assert_eq!(g.admit(1_000, 1_000, t0), Duration::ZERO);
        // 1,040 bytes allowed per window: a second range waits for the first's bytes.
        assert_eq!(g.admit(1_000, 1_000, t0), ARRIVAL_STEP);
        g.released(1_000);
        assert_eq!(g.outstanding(), 0);
        assert_eq!(g.admit(5_000, 1_000, t0), Duration::ZERO, "alone, larger than the limit");
        g.arrived(5_000, t0);
        // Seen at t0: the next waits until those bytes leave the window.
        assert_eq!(g.admit(100, 1_000, t0 + Duration::from_millis(300)), Duration::from_millis(700));
        assert_eq!(g.admit(100, 1_000, t0 + WINDOW), Duration::ZERO);
    }

    #[test]
    fn unlimited_never_waits() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(None, MAX_BURST, t0);
        assert_eq!(b.take(u64::MAX / 2, t0), Duration::ZERO);
        assert_eq!(b.rate(), None);
    }
}
