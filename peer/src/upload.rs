//! Which upload goes next: the node's upload slots and each blob's upload ledger.
//!
//! A node serves at most `upload_slots` pieces at once across all its blobs, and an
//! upload keeps its slot until the requester has acknowledged the last byte. When a
//! slot frees up and requests are waiting, a **source** (a seed or the upstream
//! lease holder) gives it to the request for the piece it has uploaded the **fewest
//! times** (oldest request among equals): a fresh piece, which nobody else can serve
//! yet, goes out before one more copy of a piece the swarm already spreads. In the
//! simulator this took the last of 1,000 nodes from 1.11 to 1.05 × the minimum
//! distribution time in the edge upgrade and from 1.30 to 1.19 × in-cluster.
//!
//! Every other node serves requests in arrival order. Ranking by copies there
//! starved a node that had fallen behind: the pieces it still needs are the common
//! ones, which every uploader ranked last, so it fell further behind (in the
//! emulated in-cluster run it finished up to 0.4 s after the others).
//!
//! A request waits at most a bounded time for a slot; then the caller answers `Busy`
//! and the requester asks elsewhere.
//!
//! The ledger ([`UploadLedger`]) also holds back, on a source, a piece it has just
//! uploaded to one peer for [`FRESH_HOLD`], so the others fetch it from that peer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

pub use swarm_core::node::{FRESH_HOLD, SLOT_WAIT};

/// Spreads fresh pieces from a source and counts every blob's uploads per piece.
///
/// A seed or an upstream lease holder is the only node with a piece when it appears,
/// and every peer wants the rarest piece, so without care it uploads the same piece
/// to everybody and its link becomes the bottleneck. With the hold enabled, the first
/// request for a piece is served and further requests within [`FRESH_HOLD`] are
/// refused as `Missing`: the requesters fetch the piece from its first recipient
/// (which announces it as soon as it is verified), and the source's upload goes to
/// the next fresh piece. After the hold the source serves the piece to anyone, and
/// re-announces it to the peers it refused.
///
/// The hold ends for good once every piece has gone out once: from then on nothing
/// is fresh, and refusing only keeps the source's upload idle while the last pieces
/// spread (simulator, 8 nodes in-cluster: 1.064 → 1.053 × the minimum time).
pub(crate) struct UploadLedger {
    hold: AtomicBool,
    epoch: Instant,
    /// Milliseconds after `epoch` (plus one) of each piece's first upload; 0 = never.
    first_sent: Vec<AtomicU64>,
    /// Pieces never uploaded; at zero the hold is over.
    unsent: AtomicU32,
    /// Woken when `unsent` reaches zero (refused requesters are re-announced to then).
    all_sent: tokio::sync::Notify,
    /// Uploads started per piece (what [`UploadSlots`] ranks a source's waiting
    /// requests by).
    sends: Vec<AtomicU32>,
}

impl UploadLedger {
    /// A ledger for `pieces` pieces; `hold` turns the fresh-piece hold on (a source).
    pub(crate) fn new(pieces: u32, hold: bool) -> Self {
        Self {
            hold: hold.into(),
            epoch: Instant::now(),
            first_sent: (0..pieces).map(|_| AtomicU64::new(0)).collect(),
            unsent: AtomicU32::new(pieces),
            all_sent: tokio::sync::Notify::new(),
            sends: (0..pieces).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Turns the fresh-piece hold on (the node became a source).
    pub(crate) fn enable_hold(&self) {
        self.hold.store(true, Ordering::Relaxed);
    }

    /// Whether an upload of `piece` may start now (false: it is held back as fresh).
    pub(crate) fn may_send(&self, piece: u32) -> bool {
        if !self.hold.load(Ordering::Relaxed) || self.hold_over() {
            return true;
        }
        let Some(slot) = self.first_sent.get(piece as usize) else { return true };
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        match slot.compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                if self.unsent.fetch_sub(1, Ordering::AcqRel) == 1 {
                    self.all_sent.notify_waiters();
                }
                true
            }
            Err(first) => now.saturating_sub(first) >= FRESH_HOLD.as_millis() as u64,
        }
    }

    /// Whether every piece has gone out once (the hold can no longer refuse).
    fn hold_over(&self) -> bool {
        self.unsent.load(Ordering::Acquire) == 0
    }

    /// Waits until a request refused now as fresh may be served: [`FRESH_HOLD`], or
    /// less if every piece goes out once before that.
    pub(crate) async fn hold_ended(&self) {
        let all_sent = self.all_sent.notified();
        tokio::pin!(all_sent);
        // Registered before the check: a `notify_waiters` in between is not missed.
        all_sent.as_mut().enable();
        if self.hold_over() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(FRESH_HOLD) => {}
            _ = all_sent => {}
        }
    }

    /// How a waiting request for `piece` ranks: its uploads so far on a source, 0
    /// (arrival order alone) elsewhere.
    fn rank(&self, piece: u32) -> u32 {
        if !self.hold.load(Ordering::Relaxed) {
            return 0;
        }
        self.sends(piece)
    }

    fn sends(&self, piece: u32) -> u32 {
        self.sends.get(piece as usize).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn count_send(&self, piece: u32) {
        if let Some(c) = self.sends.get(piece as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The node's upload slots, handed to waiting requests least-sent piece first.
pub(crate) struct UploadSlots {
    state: Mutex<SlotState>,
}

struct SlotState {
    free: usize,
    next_seq: u64,
    /// Requests waiting for a slot, by arrival.
    waiters: BTreeMap<u64, Waiter>,
}

struct Waiter {
    ledger: Arc<UploadLedger>,
    piece: u32,
    grant: oneshot::Sender<()>,
}

/// One upload slot; dropping it hands the slot to the best waiting request.
pub(crate) struct UploadPermit {
    slots: Arc<UploadSlots>,
}

impl Drop for UploadPermit {
    fn drop(&mut self) {
        self.slots.release();
    }
}

/// Removes a waiter that gave up (timed out or was dropped); if its slot was granted
/// meanwhile and never taken, passes the slot on.
struct WaitGuard<'a> {
    slots: &'a Arc<UploadSlots>,
    seq: u64,
    taken: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        let granted = self.slots.lock().waiters.remove(&self.seq).is_none();
        if granted {
            self.slots.release();
        }
    }
}

impl UploadSlots {
    /// `slots` concurrent uploads (at least one).
    pub(crate) fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self { state: Mutex::new(SlotState { free: slots.max(1), next_seq: 0, waiters: BTreeMap::new() }) })
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // Every update is complete before the guard drops: a poisoned lock is consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for uploading `piece` of `ledger`'s blob, waiting at most `wait` behind
    /// requests for less-sent pieces; `None` when none came in time.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        ledger: &Arc<UploadLedger>,
        piece: u32,
        wait: Duration,
    ) -> Option<UploadPermit> {
        let (seq, granted) = {
            let mut s = self.lock();
            if s.free > 0 && s.waiters.is_empty() {
                s.free -= 1;
                ledger.count_send(piece);
                return Some(UploadPermit { slots: self.clone() });
            }
            let (tx, rx) = oneshot::channel();
            let seq = s.next_seq;
            s.next_seq += 1;
            s.waiters.insert(seq, Waiter { ledger: ledger.clone(), piece, grant: tx });
            (seq, rx)
        };
        let mut guard = WaitGuard { slots: self, seq, taken: false };
        match tokio::time::timeout(wait, granted).await {
            Ok(Ok(())) => {
                guard.taken = true;
                Some(UploadPermit { slots: self.clone() })
            }
            // Timed out: the guard withdraws the request, or passes on a slot granted
            // in the meantime (the requester has been told Busy by then).
            _ => None,
        }
    }

    /// A slot came free: grant it to the waiter whose piece was sent least, else keep it.
    fn release(&self) {
        let mut s = self.lock();
        loop {
            let best = s.waiters.iter().min_by_key(|&(&seq, w)| (w.ledger.rank(w.piece), seq)).map(|(&seq, _)| seq);
            let Some(waiter) = best.and_then(|seq| s.waiters.remove(&seq)) else {
                s.free += 1;
                return;
            };
            waiter.ledger.count_send(waiter.piece);
            if waiter.grant.send(()).is_ok() {
                return;
            }
            // Its task is gone (connection dropped); the count stays: it is a bound.
        }
    }

    /// Slots not in use (for tests).
    #[cfg(test)]
    fn free(&self) -> usize {
        self.lock().free
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn free_slots_are_granted_at_once_and_come_back() {
        let slots = UploadSlots::new(2);
        let ledger = Arc::new(UploadLedger::new(4, false));
        let a = slots.acquire(&ledger, 0, WAIT).await.expect("first");
        let b = slots.acquire(&ledger, 0, WAIT).await.expect("second");
        assert_eq!(slots.free(), 0);
        assert_eq!(ledger.sends(0), 2);
        drop(a);
        drop(b);
        assert_eq!(slots.free(), 2);
    }

    /// Queues requests for pieces 1 (sent twice), 2 and 3 (never) behind a held
    /// slot, in that order, frees the slot and returns the order they were served.
    async fn serve_order(source: bool) -> Vec<u32> {
        let slots = UploadSlots::new(1);
        let ledger = Arc::new(UploadLedger::new(4, source));
        let held = slots.acquire(&ledger, 1, WAIT).await.expect("slot");
        ledger.count_send(1);
        // Waiting, in arrival order: piece 1 (sent twice), piece 2 (never), piece 3 (never).
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for piece in [1, 2, 3] {
            let (pool, ledger, order) = (slots.clone(), ledger.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let permit = pool.acquire(&ledger, piece, WAIT).await.expect("granted");
                order.lock().expect("order").push(piece);
                tokio::task::yield_now().await;
                drop(permit);
            }));
            // Let it queue before the next arrives.
            while slots.lock().waiters.len() < tasks.len() {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(slots.free(), 1);
        let served = order.lock().expect("order").clone();
        served
    }

    #[tokio::test]
    async fn a_source_frees_its_slot_to_the_least_sent_piece_then_the_oldest_request() {
        assert_eq!(serve_order(true).await, vec![2, 3, 1]);
    }

    #[tokio::test]
    async fn other_nodes_serve_in_arrival_order() {
        assert_eq!(serve_order(false).await, vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn a_request_that_waits_too_long_gets_nothing_and_leaves_no_trace() {
        let slots = UploadSlots::new(1);
        let ledger = Arc::new(UploadLedger::new(4, false));
        let held = slots.acquire(&ledger, 0, WAIT).await.expect("slot");
        assert!(slots.acquire(&ledger, 1, Duration::from_millis(20)).await.is_none());
        assert!(slots.lock().waiters.is_empty());
        drop(held);
        assert_eq!(slots.free(), 1);
    }

    #[tokio::test]
    async fn a_waiter_dropped_after_its_grant_passes_the_slot_on() {
        let slots = UploadSlots::new(1);
        let ledger = Arc::new(UploadLedger::new(4, false));
        let held = slots.acquire(&ledger, 0, WAIT).await.expect("slot");
        let waiting = {
            let (pool, ledger) = (slots.clone(), ledger.clone());
            tokio::spawn(async move { pool.acquire(&ledger, 1, WAIT).await.map(|_| ()) })
        };
        while slots.lock().waiters.is_empty() {
            tokio::task::yield_now().await;
        }
        // The slot is granted to the waiter, whose task is aborted before it runs.
        waiting.abort();
        drop(held);
        let _ = waiting.await;
        assert_eq!(slots.free(), 1, "the slot leaked");
        assert!(slots.lock().waiters.is_empty());
    }

    #[test]
    fn the_hold_refuses_a_fresh_piece_only_when_enabled() {
        let ledger = UploadLedger::new(2, false);
        assert!(ledger.may_send(0) && ledger.may_send(0));
        ledger.enable_hold();
        assert!(ledger.may_send(1), "the first upload of a piece goes out");
        assert!(!ledger.may_send(1), "a second one within the hold does not");
        assert!(ledger.may_send(7), "an out-of-range piece is not held");
    }

    #[tokio::test]
    async fn the_hold_ends_once_every_piece_went_out_once() {
        let ledger = Arc::new(UploadLedger::new(3, true));
        assert!(ledger.may_send(0) && !ledger.may_send(0), "piece 0 is fresh");
        assert!(ledger.may_send(1) && !ledger.may_send(1), "piece 1 is fresh");
        // A requester refused piece 1 waits for the hold's end; the last piece's
        // first upload, 50 ms later, ends it long before FRESH_HOLD.
        let waiting = {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                ledger.hold_ended().await;
                t.elapsed()
            })
        };
        let pause = Duration::from_millis(50);
        tokio::time::sleep(pause).await;
        assert!(ledger.may_send(2), "the last piece's first upload");
        let waited = tokio::time::timeout(FRESH_HOLD * 10, waiting).await.expect("woken").expect("task");
        assert!(waited >= pause / 2, "it waited while a piece was unsent: {waited:?}");
        assert!(waited < FRESH_HOLD, "woken when the last piece went out, not after the hold: {waited:?}");
        assert!(ledger.may_send(2) && ledger.may_send(0), "nothing is held any more");
        // A refusal racing with the end does not wait at all.
        let t = Instant::now();
        ledger.hold_ended().await;
        assert!(t.elapsed() < FRESH_HOLD);
    }
}
