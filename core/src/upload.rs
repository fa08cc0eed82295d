//! Which upload goes next: the node's upload slots ([`UploadSlots`]) and each blob's
//! upload ledger ([`UploadLedger`]). Both are plain state: the caller passes `now`,
//! and the daemon and the simulator each keep one `UploadSlots` per node and one
//! `UploadLedger` per blob.
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
//! A request waits at most [`SLOT_WAIT`] for a slot; then it is answered `Busy` and
//! the requester asks elsewhere.
//!
//! The download side's one shared resource, the [`ReceiveBudget`] of piece buffers,
//! lives here too.

use std::collections::BTreeMap;
use std::time::Instant;

pub use crate::node::{FRESH_HOLD, SLOT_WAIT};

/// Spreads fresh pieces from a source and counts a blob's uploads per piece.
///
/// A seed or an upstream lease holder is the only node with a piece when it appears,
/// and every peer wants the rarest piece, so without care it uploads the same piece
/// to everybody and its link becomes the bottleneck. With the hold enabled, the first
/// request for a piece is served and further requests within [`FRESH_HOLD`] of that
/// first upload are refused as `Missing`: the requesters fetch the piece from its
/// first recipient (which announces it as soon as it is verified), and the source's
/// upload goes to the next fresh piece. When the hold of a refused piece ends, the
/// source re-announces the piece to the refused requester (`R` names it: a peer
/// connection in the daemon, a link in the simulator), in case the first recipient
/// never passes it on.
///
/// The hold ends for good once every piece has gone out once: from then on nothing
/// is fresh, and refusing only keeps the source's upload idle while the last pieces
/// spread (simulator, 8 nodes in-cluster: 1.064 → 1.053 × the minimum time); every
/// pending re-announcement is due at that moment.
#[derive(Debug)]
pub struct UploadLedger<R> {
    hold: bool,
    /// When each piece was first uploaded (`None`: never). Empty until the hold is on.
    first_sent: Vec<Option<Instant>>,
    /// Pieces never uploaded; at zero the hold is over.
    unsent: u32,
    /// Uploads started per piece (what a source ranks its waiting requests by).
    /// Empty on a node that is not a source: nobody reads it there.
    sends: Vec<u32>,
    pieces: u32,
    /// Requesters refused while a piece was fresh, and when to re-announce it to them.
    refused: Vec<(Instant, R, u32)>,
}

/// Whether an upload may start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead (queue for a slot).
    Send,
    /// The piece is fresh: refuse it as `Missing`; it is re-announced to the
    /// requester when the hold ends (see [`UploadLedger::poll_reannounce`]).
    Held,
}

impl<R> UploadLedger<R> {
    /// A ledger for `pieces` pieces; `hold` turns the fresh-piece hold on (a source).
    pub fn new(pieces: u32, hold: bool) -> Self {
        let mut ledger = Self {
            hold: false,
            first_sent: Vec::new(),
            unsent: pieces,
            sends: Vec::new(),
            pieces,
            refused: Vec::new(),
        };
        if hold {
            ledger.enable_hold();
        }
        ledger
    }

    /// Turns the fresh-piece hold on (the node became a source).
    pub fn enable_hold(&mut self) {
        if self.hold {
            return;
        }
        self.hold = true;
        self.first_sent = vec![None; self.pieces as usize];
        self.sends = vec![0; self.pieces as usize];
    }

    /// Whether this ledger belongs to a source (the hold is on).
    pub fn is_source(&self) -> bool {
        self.hold
    }

    /// Whether every piece has gone out once (the hold can no longer refuse).
    pub fn hold_over(&self) -> bool {
        self.unsent == 0
    }

    /// Decides whether `requester` may get `piece` now, recording a first upload.
    pub fn admit(&mut self, piece: u32, requester: R, now: Instant) -> Admit {
        if !self.hold || self.hold_over() {
            return Admit::Send;
        }
        let Some(first) = self.first_sent.get_mut(piece as usize) else { return Admit::Send };
        match *first {
            None => {
                *first = Some(now);
                self.unsent -= 1;
                if self.unsent == 0 {
                    // Every piece went out once: the refused hear of their pieces now.
                    for r in &mut self.refused {
                        r.0 = r.0.min(now);
                    }
                }
                Admit::Send
            }
            Some(t) if now.saturating_duration_since(t) < FRESH_HOLD => {
                self.refused.push((t + FRESH_HOLD, requester, piece));
                Admit::Held
            }
            Some(_) => Admit::Send,
        }
    }

    /// How a waiting request for `piece` ranks (smaller goes first): its uploads so
    /// far on a source, 0 (arrival order alone) elsewhere.
    pub fn rank(&self, piece: u32) -> u32 {
        self.sends.get(piece as usize).copied().unwrap_or(0)
    }

    /// An upload of `piece` starts (it got a slot).
    pub fn count_send(&mut self, piece: u32) {
        if let Some(c) = self.sends.get_mut(piece as usize) {
            *c += 1;
        }
    }

    /// When the next re-announcement is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.refused.iter().map(|r| r.0).min()
    }

    /// A re-announcement due at `now`: tell `R` that this node has `piece`.
    pub fn poll_reannounce(&mut self, now: Instant) -> Option<(R, u32)> {
        let i = self.refused.iter().position(|r| r.0 <= now)?;
        let (_, requester, piece) = self.refused.swap_remove(i);
        Some((requester, piece))
    }

    /// Forgets pending re-announcements to requesters `gone` says are gone.
    pub fn forget(&mut self, mut gone: impl FnMut(&R) -> bool) {
        self.refused.retain(|r| !gone(&r.1));
    }
}

/// The node's upload slots, handed to waiting requests best rank first (see the
/// module docs). `W` names a waiting request.
#[derive(Debug)]
pub struct UploadSlots<W> {
    free: usize,
    next_seq: u64,
    /// Requests waiting for a slot, by arrival: (deadline, request).
    waiters: BTreeMap<u64, (Instant, W)>,
}

/// What becomes of a request for a slot.
#[derive(Debug, PartialEq, Eq)]
pub enum SlotRequest {
    /// A slot is taken: start the upload (and count it in the blob's ledger).
    Granted,
    /// Waiting (ticket `seq`); answer `Busy` if no slot came by `deadline`.
    Queued { seq: u64, deadline: Instant },
}

impl<W> UploadSlots<W> {
    /// `slots` concurrent uploads (at least one).
    pub fn new(slots: usize) -> Self {
        Self { free: slots.max(1), next_seq: 0, waiters: BTreeMap::new() }
    }

    /// Asks for a slot for `request`: granted at once if one is free and nobody
    /// waits, else queued for at most [`SLOT_WAIT`].
    pub fn request(&mut self, request: W, now: Instant) -> SlotRequest {
        if self.free > 0 && self.waiters.is_empty() {
            self.free -= 1;
            return SlotRequest::Granted;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let deadline = now + SLOT_WAIT;
        self.waiters.insert(seq, (deadline, request));
        SlotRequest::Queued { seq, deadline }
    }

    /// A slot came free: the waiting request with the smallest `rank` (oldest among
    /// equals) gets it and is returned; with nobody waiting the slot stays free.
    pub fn release(&mut self, rank: impl Fn(&W) -> u32) -> Option<W> {
        let best = self.waiters.iter().min_by_key(|&(&seq, (_, w))| (rank(w), seq)).map(|(&seq, _)| seq);
        match best.and_then(|seq| self.waiters.remove(&seq)) {
            Some((_, w)) => Some(w),
            None => {
                self.free += 1;
                None
            }
        }
    }

    /// Withdraws waiting request `seq` (its requester gave up or went away).
    pub fn withdraw(&mut self, seq: u64) -> Option<W> {
        self.waiters.remove(&seq).map(|(_, w)| w)
    }

    /// The earliest deadline of a waiting request.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.waiters.values().map(|(d, _)| *d).min()
    }

    /// A waiting request whose deadline passed: answer it `Busy`.
    pub fn poll_expired(&mut self, now: Instant) -> Option<W> {
        let seq = self.waiters.iter().find(|(_, (d, _))| *d <= now).map(|(&s, _)| s)?;
        self.waiters.remove(&seq).map(|(_, w)| w)
    }

    /// Slots free now.
    pub fn free(&self) -> usize {
        self.free
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }
}

/// The node's receive budget: KiB of piece buffers that downloads may hold at once,
/// granted strictly first come, first served (a large piece is not overtaken by
/// small ones). A piece needs its length in KiB, at most the whole budget (so a
/// budget smaller than a piece slows downloads to one at a time instead of
/// blocking them). `W` names a waiting download.
#[derive(Debug)]
pub struct ReceiveBudget<W> {
    total: u32,
    free: u32,
    next_seq: u64,
    queue: BTreeMap<u64, (u32, W)>,
}

/// What becomes of a request for receive budget.
#[derive(Debug, PartialEq, Eq)]
pub enum BudgetRequest {
    /// Granted at once: this many KiB, to [`ReceiveBudget::release`] when done.
    Granted(u32),
    /// Waiting (ticket `seq`) until [`ReceiveBudget::poll_granted`] hands it out.
    Queued { seq: u64 },
}

impl<W> ReceiveBudget<W> {
    /// A budget of `total_kib` KiB (at least one).
    pub fn new(total_kib: u32) -> Self {
        let total = total_kib.max(1);
        Self { total, free: total, next_seq: 0, queue: BTreeMap::new() }
    }

    /// KiB a piece of `piece_len` bytes needs.
    pub fn need(&self, piece_len: u32) -> u32 {
        piece_len.div_ceil(1024).clamp(1, self.total)
    }

    /// Asks for the buffer of a piece of `piece_len` bytes.
    pub fn request(&mut self, waiter: W, piece_len: u32) -> BudgetRequest {
        let need = self.need(piece_len);
        if self.queue.is_empty() && self.free >= need {
            self.free -= need;
            return BudgetRequest::Granted(need);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.insert(seq, (need, waiter));
        BudgetRequest::Queued { seq }
    }

    /// `kib` come back (a download ended or was cancelled).
    pub fn release(&mut self, kib: u32) {
        self.free = (self.free + kib).min(self.total);
    }

    /// The oldest waiting download, if its buffer fits now: it holds the returned KiB.
    pub fn poll_granted(&mut self) -> Option<(W, u32)> {
        let (&seq, &(need, _)) = self.queue.first_key_value()?;
        if self.free < need {
            return None;
        }
        self.free -= need;
        self.queue.remove(&seq).map(|(need, w)| (w, need))
    }

    /// Withdraws waiting download `seq` (cancelled before it got its buffer).
    pub fn withdraw(&mut self, seq: u64) -> Option<W> {
        self.queue.remove(&seq).map(|(_, w)| w)
    }

    /// KiB free now.
    pub fn free(&self) -> u32 {
        self.free
    }

    /// Downloads waiting now.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_source_serves_the_least_sent_piece_first_and_others_in_arrival_order() {
        let now = Instant::now();
        let mut source: UploadLedger<()> = UploadLedger::new(4, true);
        source.count_send(0);
        source.count_send(0);
        source.count_send(1);
        let mut slots = UploadSlots::new(1);
        assert_eq!(slots.request(9, now), SlotRequest::Granted);
        for piece in [0u32, 1, 2] {
            assert!(matches!(slots.request(piece, now), SlotRequest::Queued { .. }));
        }
        assert_eq!(slots.release(|&p| source.rank(p)), Some(2));
        assert_eq!(slots.release(|&p| source.rank(p)), Some(1));
        let plain: UploadLedger<()> = UploadLedger::new(4, false);
        assert!(matches!(slots.request(3, now), SlotRequest::Queued { .. }));
        assert_eq!(slots.release(|&p| plain.rank(p)), Some(0), "arrival order off a source");
        assert_eq!(slots.release(|&p| plain.rank(p)), Some(3));
        assert_eq!(slots.release(|&p| plain.rank(p)), None);
        assert_eq!(slots.free(), 1);
    }

    #[test]
    fn a_waiting_request_expires_after_the_slot_wait() {
        let now = Instant::now();
        let mut slots = UploadSlots::new(1);
        assert_eq!(slots.request('a', now), SlotRequest::Granted);
        let SlotRequest::Queued { deadline, .. } = slots.request('b', now) else { panic!("expected a queue") };
        assert_eq!(deadline, now + SLOT_WAIT);
        assert_eq!(slots.poll_expired(now + SLOT_WAIT - Duration::from_millis(1)), None);
        assert_eq!(slots.poll_expired(deadline), Some('b'));
        assert_eq!(slots.waiting(), 0);
    }

    #[test]
    fn a_fresh_piece_is_held_and_re_announced_when_its_hold_ends() {
        let t0 = Instant::now();
        let mut ledger = UploadLedger::new(2, true);
        assert_eq!(ledger.admit(0, "a", t0), Admit::Send);
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(ledger.admit(0, "b", t1), Admit::Held);
        assert_eq!(ledger.poll_timeout(), Some(t0 + FRESH_HOLD));
        assert_eq!(ledger.poll_reannounce(t1), None);
        assert_eq!(ledger.poll_reannounce(t0 + FRESH_HOLD), Some(("b", 0)));
        assert_eq!(ledger.admit(0, "c", t0 + FRESH_HOLD), Admit::Send);
    }

    #[test]
    fn the_hold_ends_early_once_every_piece_went_out() {
        let t0 = Instant::now();
        let mut ledger = UploadLedger::new(2, true);
        assert_eq!(ledger.admit(0, "a", t0), Admit::Send);
        assert_eq!(ledger.admit(0, "b", t0), Admit::Held);
        let t1 = t0 + Duration::from_millis(10);
        assert_eq!(ledger.admit(1, "a", t1), Admit::Send);
        assert!(ledger.hold_over());
        assert_eq!(ledger.poll_timeout(), Some(t1), "the refused requester is due at once");
        assert_eq!(ledger.poll_reannounce(t1), Some(("b", 0)));
        assert_eq!(ledger.admit(1, "c", t1), Admit::Send);
    }

    #[test]
    fn the_receive_budget_is_first_come_first_served_and_caps_a_piece_at_the_whole() {
        let mut b = ReceiveBudget::new(1024);
        assert_eq!(b.request('a', 600 * 1024), BudgetRequest::Granted(600));
        assert_eq!(b.request('b', 600 * 1024), BudgetRequest::Queued { seq: 0 });
        // A small piece does not overtake the waiting large one.
        assert_eq!(b.request('c', 1024), BudgetRequest::Queued { seq: 1 });
        assert_eq!(b.poll_granted(), None);
        b.release(600);
        assert_eq!(b.poll_granted(), Some(('b', 600)));
        assert_eq!(b.poll_granted(), Some(('c', 1)));
        assert_eq!(b.free(), 1024 - 601);
        // A piece larger than the whole budget takes the whole budget, not forever.
        b.release(601);
        assert_eq!(b.request('d', 4 << 20), BudgetRequest::Granted(1024));
        assert_eq!(b.request('e', 1), BudgetRequest::Queued { seq: 2 });
        assert_eq!(b.withdraw(2), Some('e'));
        assert_eq!(b.waiting(), 0);
    }

    #[test]
    fn without_the_hold_nothing_is_refused_or_ranked() {
        let now = Instant::now();
        let mut ledger = UploadLedger::new(2, false);
        assert_eq!(ledger.admit(0, 1, now), Admit::Send);
        assert_eq!(ledger.admit(0, 2, now), Admit::Send);
        ledger.count_send(0);
        assert_eq!(ledger.rank(0), 0);
        assert!(!ledger.is_source());
    }
}
