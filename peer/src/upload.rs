//! The daemon's driver of the policy of `swarm_core::upload`: the node's upload slots
//! and each blob's upload ledger, shared by the tasks that serve piece requests, and
//! the receive budget shared by the tasks that fetch pieces. The decisions (who gets a freed slot, how long a request may wait,
//! which fresh piece a source holds back and when it is re-announced) are the core's;
//! this module only makes tasks wait for them and wakes them.
//!
//! Lock order: the slots' mutex before a ledger's mutex (ranking waiters reads their
//! ledgers); neither is held across an `.await`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use swarm_core::upload::{
    Admit, BudgetRequest, ReceiveBudget as BudgetCore, SlotRequest, UploadLedger as LedgerCore,
    UploadSlots as SlotsCore,
};
pub use swarm_core::upload::{FRESH_HOLD, SLOT_WAIT};
use swarm_proto::msg::PeerMessage;
use tokio::sync::oneshot;

use crate::node::ControlTx;

/// One blob's upload ledger (see `swarm_core::upload::UploadLedger`); a refused
/// requester is named by its connection's control queue.
pub(crate) struct UploadLedger {
    core: Mutex<LedgerCore<ControlTx>>,
}

impl UploadLedger {
    /// A ledger for `pieces` pieces; `hold` turns the fresh-piece hold on (a source).
    pub(crate) fn new(pieces: u32, hold: bool) -> Self {
        Self { core: Mutex::new(LedgerCore::new(pieces, hold)) }
    }

    fn lock(&self) -> MutexGuard<'_, LedgerCore<ControlTx>> {
        // Every update is complete before the guard drops: a poisoned lock is consistent.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns the fresh-piece hold on (the node became a source).
    pub(crate) fn enable_hold(&self) {
        self.lock().enable_hold();
    }

    /// Whether an upload of `piece` to the peer behind `requester` may start now
    /// (false: it is held back as fresh, and re-announced to the requester when the
    /// hold ends). Re-announcements that fell due are sent on the way.
    pub(crate) fn may_send(self: &Arc<Self>, piece: u32, requester: &ControlTx) -> bool {
        let now = Instant::now();
        let admit = self.lock().admit(piece, requester.clone(), now);
        self.reannounce(now);
        if admit == Admit::Held {
            let ledger = self.clone();
            let due = self.lock().poll_timeout();
            if let Some(due) = due {
                tokio::spawn(async move {
                    tokio::time::sleep_until(due.into()).await;
                    ledger.reannounce(Instant::now());
                });
            }
        }
        admit == Admit::Send
    }

    /// Sends every re-announcement due at `now`.
    fn reannounce(&self, now: Instant) {
        loop {
            let due = self.lock().poll_reannounce(now);
            let Some((control, piece)) = due else { return };
            control.send(PeerMessage::Have { piece });
        }
    }

    #[cfg(test)]
    fn sends(&self, piece: u32) -> u32 {
        self.lock().rank(piece)
    }

    #[cfg(test)]
    fn count_send(&self, piece: u32) {
        self.lock().count_send(piece)
    }
}

/// The node's upload slots (see `swarm_core::upload::UploadSlots`).
pub(crate) struct UploadSlots {
    core: Mutex<SlotsCore<Waiter>>,
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

/// Withdraws a waiter that gave up (timed out or was dropped); if its slot was
/// granted meanwhile and never taken, passes the slot on.
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
        let granted = self.slots.lock().withdraw(self.seq).is_none();
        if granted {
            self.slots.release();
        }
    }
}

impl UploadSlots {
    /// `slots` concurrent uploads (at least one).
    pub(crate) fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self { core: Mutex::new(SlotsCore::new(slots)) })
    }

    fn lock(&self) -> MutexGuard<'_, SlotsCore<Waiter>> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for uploading `piece` of `ledger`'s blob, after waiting as long as the
    /// core allows behind better-ranked requests; `None` when none came in time.
    pub(crate) async fn acquire(self: &Arc<Self>, ledger: &Arc<UploadLedger>, piece: u32) -> Option<UploadPermit> {
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter { ledger: ledger.clone(), piece, grant: tx };
        let request = self.lock().request(waiter, Instant::now());
        let (seq, deadline) = match request {
            SlotRequest::Granted => {
                ledger.lock().count_send(piece);
                return Some(UploadPermit { slots: self.clone() });
            }
            SlotRequest::Queued { seq, deadline } => (seq, deadline),
        };
        let mut guard = WaitGuard { slots: self, seq, taken: false };
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(())) => {
                guard.taken = true;
                Some(UploadPermit { slots: self.clone() })
            }
            // Timed out: the guard withdraws the request, or passes on a slot granted
            // in the meantime (the requester has been told Busy by then).
            _ => None,
        }
    }

    /// A slot came free: the core picks the waiter; one whose task is gone passes it on.
    fn release(&self) {
        let mut s = self.lock();
        loop {
            let Some(waiter) = s.release(|w| w.ledger.lock().rank(w.piece)) else { return };
            waiter.ledger.lock().count_send(waiter.piece);
            if waiter.grant.send(()).is_ok() {
                return;
            }
            // Its task is gone (connection dropped): the slot goes to the next one.
        }
    }

    /// Slots free now.
    #[cfg(test)]
    pub(crate) fn free(&self) -> usize {
        self.lock().free()
    }
}

/// The node's receive budget of piece buffers (see
/// `swarm_core::upload::ReceiveBudget`): a download waits for its piece's buffer,
/// first come, first served.
pub(crate) struct ReceiveBudget {
    core: Mutex<BudgetCore<oneshot::Sender<u32>>>,
}

/// A piece's buffer; dropping it returns the KiB and wakes the next waiters.
pub(crate) struct BudgetPermit {
    budget: Arc<ReceiveBudget>,
    kib: u32,
}

impl Drop for BudgetPermit {
    fn drop(&mut self) {
        self.budget.release(self.kib);
    }
}

/// Withdraws a download that stopped waiting; returns a grant it never took.
struct BudgetWait<'a> {
    budget: &'a Arc<ReceiveBudget>,
    seq: u64,
    grant: Option<oneshot::Receiver<u32>>,
}

impl Drop for BudgetWait<'_> {
    fn drop(&mut self) {
        let Some(mut grant) = self.grant.take() else { return };
        let withdrawn = self.budget.lock().withdraw(self.seq).is_some();
        if !withdrawn && let Ok(kib) = grant.try_recv() {
            self.budget.release(kib);
        }
    }
}

impl ReceiveBudget {
    /// A budget of `kib` KiB.
    pub(crate) fn new(kib: u32) -> Arc<Self> {
        Arc::new(Self { core: Mutex::new(BudgetCore::new(kib)) })
    }

    fn lock(&self) -> MutexGuard<'_, BudgetCore<oneshot::Sender<u32>>> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The buffer for a piece of `piece_len` bytes, once the core grants it.
    pub(crate) async fn acquire(self: &Arc<Self>, piece_len: u32) -> BudgetPermit {
        let (tx, rx) = oneshot::channel();
        let request = self.lock().request(tx, piece_len);
        let seq = match request {
            BudgetRequest::Granted(kib) => return BudgetPermit { budget: self.clone(), kib },
            BudgetRequest::Queued { seq } => seq,
        };
        let mut wait = BudgetWait { budget: self, seq, grant: Some(rx) };
        let granted = match wait.grant.as_mut() {
            Some(rx) => rx.await,
            None => return BudgetPermit { budget: self.clone(), kib: 0 },
        };
        wait.grant = None;
        // The sender lives in the core's queue until granted, so an error cannot
        // happen; a zero grant releases nothing.
        BudgetPermit { budget: self.clone(), kib: granted.unwrap_or(0) }
    }

    /// `kib` come back: grant the waiters at the head of the queue that now fit.
    fn release(&self, kib: u32) {
        let mut core = self.lock();
        core.release(kib);
        while let Some((waiter, granted)) = core.poll_granted() {
            if let Err(granted) = waiter.send(granted) {
                // Its task is gone: the grant goes back.
                core.release(granted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn the_receive_budget_wakes_waiters_in_order_and_forgets_dropped_ones() {
        let budget = ReceiveBudget::new(2);
        let a = budget.acquire(2048).await;
        let waiting = {
            let b = budget.clone();
            tokio::spawn(async move { b.acquire(1024).await.kib })
        };
        let dropped = {
            let b = budget.clone();
            tokio::spawn(async move { b.acquire(1024).await.kib })
        };
        while budget.lock().waiting() < 2 {
            tokio::task::yield_now().await;
        }
        dropped.abort();
        let _ = dropped.await;
        drop(a);
        assert_eq!(waiting.await.expect("task"), 1);
        assert_eq!(budget.lock().free(), 2, "every KiB came back");
        assert_eq!(budget.lock().waiting(), 0);
    }

    #[tokio::test]
    async fn free_slots_are_granted_at_once_and_come_back() {
        let slots = UploadSlots::new(2);
        let ledger = Arc::new(UploadLedger::new(4, true));
        let a = slots.acquire(&ledger, 0).await.expect("first");
        let b = slots.acquire(&ledger, 0).await.expect("second");
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
        let held = slots.acquire(&ledger, 1).await.expect("slot");
        ledger.count_send(1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for piece in [1, 2, 3] {
            let (pool, ledger, order) = (slots.clone(), ledger.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let permit = pool.acquire(&ledger, piece).await.expect("granted");
                order.lock().expect("order").push(piece);
                tokio::task::yield_now().await;
                drop(permit);
            }));
            // Let it queue before the next arrives.
            while slots.lock().waiting() < tasks.len() {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(slots.free(), 1);
        order.lock().expect("order").clone()
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
        let held = slots.acquire(&ledger, 0).await.expect("slot");
        let t = std::time::Instant::now();
        assert!(slots.acquire(&ledger, 1).await.is_none());
        assert!(t.elapsed() >= SLOT_WAIT - Duration::from_millis(5), "gave up after {:?}", t.elapsed());
        assert_eq!(slots.lock().waiting(), 0);
        drop(held);
        assert_eq!(slots.free(), 1);
    }

    #[tokio::test]
    async fn a_waiter_dropped_after_its_grant_passes_the_slot_on() {
        let slots = UploadSlots::new(1);
        let ledger = Arc::new(UploadLedger::new(4, false));
        let held = slots.acquire(&ledger, 0).await.expect("slot");
        let waiting = {
            let (pool, ledger) = (slots.clone(), ledger.clone());
            tokio::spawn(async move { pool.acquire(&ledger, 1).await.map(|_| ()) })
        };
        while slots.lock().waiting() == 0 {
            tokio::task::yield_now().await;
        }
        // The slot is granted to the waiter, whose task is aborted before it runs.
        waiting.abort();
        drop(held);
        let _ = waiting.await;
        assert_eq!(slots.free(), 1, "the slot leaked");
        assert_eq!(slots.lock().waiting(), 0);
    }
}
