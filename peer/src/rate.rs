//! [`Limiter`]: a shared, async handle on a [`TokenBucket`] (`swarm_core::rate`).
//!
//! Two kinds are used: the agent-wide download limiter (`swarm agent
//! --download-rate`), which every byte received passes through (piece bytes read
//! from peers in `node`, upstream blob bytes in `upstream`), and the limiter of one
//! upstream fetch, whose rate is the fetch's share of the cluster's uplink cap
//! (`agent`, set from the tracker's answers). Bytes are counted as they arrive; the
//! reader then waits until the bucket's debt is paid, in steps of at most
//! [`WAIT_STEP`] so that a new rate takes effect at once.
//!
//! A reader that asks for its bytes in ranges ([`Limiter::request`]) is also held to
//! the limiter's [`WindowGuard`]: the range is admitted only when what arrived
//! recently plus what is still to arrive leaves room for it in every 1 s window
//! ([`RangeTicket`] counts its bytes as they arrive and gives back the rest if the
//! range is dropped).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use swarm_core::rate::{MAX_BURST, TokenBucket, WindowGuard};

/// The burst a limiter allows after an idle spell: a quarter of the most a bucket
/// may allow ([`MAX_BURST`]), so that a 1 s window after idling carries at most
/// 2.5 % more than the rate.
pub const BURST: Duration = Duration::from_millis(25);
const _: () = assert!(BURST.as_millis() <= MAX_BURST.as_millis());

/// The longest single sleep of a waiting reader before it looks at the rate again.
pub const WAIT_STEP: Duration = Duration::from_millis(50);

/// A token bucket and its window guard, shared by every reader they limit. Cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct Limiter {
    state: Arc<Mutex<State>>,
    /// Bytes that passed through, ever.
    passed: Arc<AtomicU64>,
}

#[derive(Debug)]
struct State {
    bucket: TokenBucket,
    guard: WindowGuard,
}

/// The bytes of one range admitted by [`Limiter::request`]: counted as they arrive
/// ([`RangeTicket::arrived`]); those that never do are given back when it is dropped.
#[derive(Debug)]
pub struct RangeTicket {
    limiter: Limiter,
    remaining: u64,
}

impl RangeTicket {
    /// Counts `n` bytes of the range that just arrived.
    pub fn arrived(&mut self, n: u64) {
        self.remaining = self.remaining.saturating_sub(n);
        let mut state = self.limiter.locked();
        if state.bucket.rate().is_some() {
            state.guard.arrived(n, Instant::now());
        }
    }

    /// Records how long the range's request took to be answered.
    pub fn answered(&self, delay: Duration) {
        self.limiter.locked().guard.answered(delay);
    }
}

impl Drop for RangeTicket {
    fn drop(&mut self) {
        if self.remaining > 0 {
            self.limiter.locked().guard.released(self.remaining);
        }
    }
}

impl Limiter {
    /// A limiter of `rate` bytes per second (`None`: unlimited) with [`BURST`] of
    /// burst, starting empty.
    pub fn new(rate: Option<u64>) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                bucket: TokenBucket::new(rate, BURST, Instant::now()),
                guard: WindowGuard::default(),
            })),
            passed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Bytes counted so far, as they arrived (the agent's `swarm_received_bytes_total`).
    pub fn bytes(&self) -> u64 {
        self.passed.load(Ordering::Relaxed)
    }

    /// The rate in bytes per second (`None`: unlimited).
    pub fn rate(&self) -> Option<u64> {
        self.locked().bucket.rate()
    }

    /// Changes the rate from now on; readers waiting see it within [`WAIT_STEP`].
    pub fn set_rate(&self, rate: Option<u64>) {
        self.locked().bucket.set_rate(rate, Instant::now());
    }

    /// Counts `n` bytes that just arrived and waits until the limiter lets more in.
    pub async fn consume(&self, n: usize) {
        let now = Instant::now();
        let wait = {
            let mut state = self.locked();
            if state.bucket.rate().is_some() {
                state.guard.arrived(n as u64, now);
            }
            state.bucket.take(n as u64, now)
        };
        self.passed.fetch_add(n as u64, Ordering::Relaxed);
        self.pay_debt(wait).await;
    }

    /// Pays for a range of `len` bytes before it is asked for: counts the bytes, waits
    /// until the bucket's debt is paid, then until the window guard admits the range.
    /// The ticket must see the range's bytes arrive.
    pub async fn request(&self, len: u64) -> RangeTicket {
        self.passed.fetch_add(len, Ordering::Relaxed);
        let wait = self.locked().bucket.take(len, Instant::now());
        self.pay_debt(wait).await;
        loop {
            let wait = {
                let mut state = self.locked();
                match state.bucket.rate() {
                    Some(rate) => state.guard.admit(len, rate, Instant::now()),
                    None => Duration::ZERO,
                }
            };
            if wait.is_zero() {
                break;
            }
            tokio::time::sleep(wait.min(WAIT_STEP)).await;
        }
        RangeTicket { limiter: self.clone(), remaining: len }
    }

    async fn pay_debt(&self, mut wait: Duration) {
        while !wait.is_zero() {
            tokio::time::sleep(wait.min(WAIT_STEP)).await;
            wait = self.locked().bucket.wait(Instant::now());
        }
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn consume_paces_and_a_new_rate_applies_to_a_waiting_reader() {
        let limiter = Limiter::new(Some(100_000));
        let started = tokio::time::Instant::now();
        for _ in 0..10 {
            limiter.consume(10_000).await;
        }
        assert_eq!(limiter.bytes(), 100_000);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(950) && took < Duration::from_millis(1300), "{took:?}");
        // A reader stuck behind a tiny rate is released when the rate goes up.
        limiter.set_rate(Some(1));
        let waiting = {
            let l = limiter.clone();
            tokio::spawn(async move { l.consume(1_000_000).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        limiter.set_rate(None);
        tokio::time::timeout(Duration::from_millis(500), waiting).await.expect("released").expect("join");
    }
}
