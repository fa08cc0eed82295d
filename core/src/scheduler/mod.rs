//! The sans-IO piece scheduler: which piece to ask of which peer, and when.
//!
//! No tokio, no sockets, no files, no clock. Every input is a method call carrying
//! `now: Instant` (real time in the peer, `base + Duration` in the simulator); every
//! decision comes out of [`Scheduler::poll_action`]; [`Scheduler::poll_timeout`] says
//! when [`Scheduler::handle_timeout`] must be called next. Randomness comes from one
//! seeded [`StdRng`], so a run is a pure function of its inputs and seed. After every
//! event the scheduler refills every peer that may now take a request, so a driver
//! just does `while let Some(a) = s.poll_action() { .. }` after each call.
//!
//! # Piece states
//!
//! Every piece is in exactly one of three states:
//!
//! | state         | meaning                                            | where it lives                            |
//! |---------------|----------------------------------------------------|-------------------------------------------|
//! | **needed**    | missing, no request outstanding                    | `needed` bitset (and maybe `orphans`)     |
//! | **in flight** | missing, `copies >= 1` requests outstanding        | `in_flight` list, each peer's `requests`  |
//! | **have**      | verified and stored                                | `have` bitfield                           |
//!
//! Transitions: needed → in flight (a request is sent); in flight → needed (its last
//! outstanding request ended without the piece: peer left, timeout, reject, error,
//! hash mismatch); needed or in flight → have (`piece_verified`, `local_piece`;
//! every other outstanding request of that piece is cancelled at that moment). Have
//! is final.
//!
//! # Invariants (checked by [`Scheduler::check_invariants`] in the tests)
//!
//! 1. The three states are disjoint and cover every piece: a piece is in exactly one
//!    `needed` iff it is needed; `copies > 0` iff it is in flight; the
//!    `have` bit iff it is held; `orphans ⊆ needed`.
//! 2. `availability[i]` = number of connected peers whose bitfield has piece `i`; the
//!    count of needed pieces and of needed pieces with availability 0 match.
//! 3. `copies[i]` = number of peers with an outstanding request for `i`; one peer
//!    never has two outstanding requests for the same piece.
//! 4. Never a request for a held piece, to a peer that does not have it (as far as
//!    we know at send time), to a peer in busy backoff, or beyond the peer's depth at
//!    send time. Depth may later shrink below the number outstanding (a timeout
//!    halves it); then no new request goes to that peer until it drains below.
//! 5. Each outstanding request has exactly one timer entry; each backoff too.
//! 6. `Complete` is emitted exactly once, when the last piece becomes held (at
//!    construction if the blob is already whole).
//!
//! # Policy
//!
//! - **Started pieces first.** A piece is one request, i.e. one QUIC stream, so a
//!   "started but unfinished" piece is exactly an in-flight piece whose request was
//!   orphaned (the peer left, the request timed out, was rejected or failed, or the
//!   bytes failed their hash). Such pieces are flagged *orphans* and are picked before
//!   any other needed piece (rarest first among orphans).
//! - **Rarest first.** Otherwise a peer gets the needed piece it has with the lowest
//!   availability; ties are broken uniformly at random from the seeded RNG.
//! - **Pipelining.** Each peer has a depth (requests outstanding at once). Before any
//!   measurement it is `initial_in_flight`. Each verified piece gives a sample of the
//!   peer's service time per piece: the time since the later of that request's send
//!   time and the peer's previous completion. An EWMA (α = 1/4) of that time `t` is
//!   the rate estimate (`rate = piece_length / t`; averaging times rather than rates
//!   is what keeps bursts of simultaneous completions on parallel streams from
//!   reading as infinite speed). Depth is `ceil(rate · queue_time / piece_length) + 1
//!   = ceil(queue_time / t) + 1`, clamped to `min_in_flight..=max_in_flight` (and
//!   never below 1).
//! - **Timeouts.** A request's deadline is `max(request_timeout, 4 · t · k)` after it
//!   was sent, where `k` is its position in the peer's queue when sent (so a slow
//!   peer with a deep queue is not timed out for being slow). When the timer fires
//!   the deadline is recomputed with the current `t` (requests sent before the first
//!   measurement only had the floor) and re-armed if it moved later. On expiry:
//!   `Cancel`, the piece goes back to needed (as an orphan) unless another copy is
//!   outstanding, the peer avoids that piece (see bad pieces), and the
//!   peer's depth and rate estimate are halved (per expired request, so a stalled
//!   pipeline drops to `min_in_flight` at once).
//! - **Busy** rejects put the peer in backoff for `busy_backoff` (no requests to it
//!   until then); **Missing** clears that bit of the peer's bitfield; **Error** just
//!   re-queues. In all three the piece goes back to needed as an orphan.
//! - **Endgame.** When no needed piece remains (every missing piece is in flight) a
//!   peer with free slots may also ask for an in-flight piece it has from another
//!   peer: fewest copies first, then the piece in flight longest; at most
//!   `1 + endgame_duplicates` outstanding copies per piece and at most
//!   `endgame_peer_duplicates` duplicates outstanding per peer (one by default: with
//!   deep pipelines "everything is in flight" comes early, and an idle peer should
//!   steal the stuck piece, not clone the whole queue). When one copy is verified
//!   every other is cancelled. With
//!   [`SchedulerConfig::endgame_ignores_unavailable`] the endgame also starts when the
//!   only needed pieces left are ones no connected peer has (see that field for why
//!   this is off by default).
//! - **Bad pieces.** A hash mismatch is a strike against the peer; the piece goes back
//!   to needed (orphan) and that peer is not asked for it again while another
//!   connected peer has it that does not avoid it too (a per-peer avoid list of at
//!   most 16 pieces, shared with timeouts; when every holder avoids a piece, all may
//!   be asked, so a piece never gets stuck). At `max_strikes` the peer gets `DropPeer` and is forgotten
//!   as if removed (its later events are ignored).
//!
//! # Cost
//!
//! Needed pieces are one bitset, and each peer's pieces a bitset of the same shape;
//! availability is a plain array. Picking for a peer ANDs the two sets 64 pieces at
//! a time and reads the availability of each piece in the result: one pass finds the
//! rarest class and its size, a second selects a random member. So a pick costs
//! `O(pieces / 64 + candidates)`, never pieces × peers, and a `Have` is one counter
//! increment (most picks in a swarm waiting for fresh pieces have no candidate and
//! end after the word pass). Timers live in a
//! `BTreeSet` (O(log n) per request), peers in a map sorted by key (deterministic order).
//! The endgame scans the in-flight list, which is small by then.
//!
//! After an event only the peers it can concern are refilled: the peer it came
//! from, peers whose requests ended or were cancelled, peers that have a piece that
//! went back to needed (a bit test per peer), peers with an avoid list when some
//! availability dropped, and every peer once when the endgame starts. A full peer
//! or one in backoff costs one comparison.
//!
//! # Events for unknown peers and bad indices
//!
//! Out-of-range pieces and unknown peers are ignored without panicking, with one
//! exception: [`Scheduler::piece_verified`] from an unknown (already removed or
//! dropped) peer still counts the piece as held, because the driver has verified and
//! stored those bytes; forgetting them would only download them again.

mod choose;
mod peers;
mod words;

#[cfg(test)]
mod tests;

pub use choose::{Candidate, choose_peers};

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swarm_proto::Bitfield;

use peers::PeerMap;
use words::{BitIter, Words};

/// EWMA weight of a new service-time sample.
const RATE_ALPHA: f64 = 0.25;
/// A request may take this many times its expected time before it times out.
const TIMEOUT_FACTOR: f64 = 4.0;
/// At most this many pieces are remembered per peer as "avoid asking it for this".
const MAX_AVOID_PER_PEER: usize = 16;
/// `in_flight_pos` of a piece that is not in flight.
const NOT_IN_FLIGHT: u32 = u32::MAX;

/// Identifies a connected peer; assigned by the driver, never reused while connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey(pub u64);

/// Tuning of the scheduler. The defaults suit a LAN of edge nodes with pieces of
/// a few hundred KiB to a few MiB.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Requests per peer before any rate is known.
    pub initial_in_flight: usize,
    /// Lower bound of a peer's depth.
    pub min_in_flight: usize,
    /// Upper bound of a peer's depth.
    pub max_in_flight: usize,
    /// Keep about this much transfer time queued per peer:
    /// depth = `ceil(rate · queue_time / piece_length) + 1`, clamped.
    pub queue_time: Duration,
    /// Floor of a request's timeout; it grows with the peer's measured time per piece
    /// and queue position (`max(floor, 4 · expected)`).
    pub request_timeout: Duration,
    /// After a Busy reject, do not ask that peer for this long.
    pub busy_backoff: Duration,
    /// Bad pieces before a peer is dropped.
    pub max_strikes: u32,
    /// Most extra concurrent requests for one piece in the endgame.
    pub endgame_duplicates: usize,
    /// Most endgame duplicates outstanding at one peer at once. Together with the
    /// per-piece bound this keeps the endgame from turning a peer's whole pipeline
    /// into copies of requests that are merely queued elsewhere (with pipelines of
    /// up to 32 and a few hundred pieces, "every missing piece in flight" arrives
    /// early); like libtorrent, an idle peer steals one piece at a time.
    pub endgame_peer_duplicates: usize,
    /// Also enter the endgame when the only needed pieces left are ones no connected
    /// peer has (the literal reading "no needed piece any peer could serve").
    ///
    /// Off by default: while pieces are still trickling in from upstream, every node
    /// is in that state most of the time (all it can get is already requested), and
    /// duplicating those requests would spend the swarm's upload capacity on copies
    /// that get cancelled. With it off, the endgame starts only when every missing
    /// piece is in flight.
    pub endgame_ignores_unavailable: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            initial_in_flight: 4,
            min_in_flight: 2,
            max_in_flight: 32,
            queue_time: Duration::from_millis(100),
            request_timeout: Duration::from_secs(10),
            busy_backoff: Duration::from_millis(50),
            max_strikes: 3,
            endgame_duplicates: 2,
            endgame_peer_duplicates: 1,
            endgame_ignores_unavailable: false,
        }
    }
}

/// What the driver must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Open a piece stream to `peer` asking for `piece`.
    Request { peer: PeerKey, piece: u32 },
    /// Abandon the outstanding request (endgame loser, timeout, piece obtained locally).
    Cancel { peer: PeerKey, piece: u32 },
    /// Tell every peer we now hold `piece`.
    Have { piece: u32 },
    /// Close the connection; the scheduler has already forgotten the peer.
    DropPeer { peer: PeerKey, reason: DropReason },
    /// Every piece is held. Emitted exactly once.
    Complete,
}

/// Why a peer was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// It sent `max_strikes` pieces that failed their hash.
    BadPieces,
}

/// How a request ended without a piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestFailure {
    /// The peer's upload slots are full: back off from that peer for a while.
    Busy,
    /// The peer does not hold the piece after all: clear that bit.
    Missing,
    /// Stream or connection error: just try again (elsewhere, probably).
    Error,
}

/// The state of one piece; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceState {
    /// Missing and not requested.
    Needed,
    /// Missing, with at least one request outstanding.
    InFlight,
    /// Verified and stored.
    Have,
}

/// Counters since construction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// `Request` actions emitted (including endgame duplicates).
    pub requests: u64,
    /// `Cancel` actions emitted (timeouts, endgame losers, pieces obtained locally).
    pub cancels: u64,
    /// Requests that timed out.
    pub timeouts: u64,
    /// Requests sent for a piece that already had a request outstanding.
    pub endgame_duplicates: u64,
    /// Pieces whose bytes failed the hash.
    pub failed_pieces: u64,
    /// Pieces verified from peers (newly held).
    pub verified: u64,
    /// Pieces verified that we already held (late endgame or post-cancel copies).
    pub redundant: u64,
    /// Pieces obtained through `local_piece`.
    pub local: u64,
    /// Busy rejects.
    pub busy: u64,
    /// Missing rejects.
    pub missing: u64,
    /// Request errors.
    pub errors: u64,
    /// Peers dropped for bad pieces.
    pub dropped_peers: u64,
}

/// One outstanding request.
#[derive(Clone, Copy, Debug)]
struct Outstanding {
    piece: u32,
    sent: Instant,
    deadline: Instant,
    /// 1-based position in the peer's queue when sent.
    position: u32,
    /// Sent while another request for the piece was outstanding (endgame).
    duplicate: bool,
}

/// A scheduled wake-up. Ordered so `(deadline, Timer)` is unique.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Request { peer: PeerKey, piece: u32 },
    Backoff { peer: PeerKey },
}

/// What we know of one connected peer.
#[derive(Debug)]
struct PeerState {
    /// Pieces it has (bitfield plus haves).
    bits: Words,
    /// Outstanding requests, oldest first (at most a few dozen).
    requests: Vec<Outstanding>,
    /// Current depth: requests allowed outstanding at once.
    depth: usize,
    /// EWMA of seconds per piece while busy; `None` before the first measurement.
    interval: Option<f64>,
    /// When the previous piece from this peer was verified.
    last_done: Option<Instant>,
    /// No requests before this instant (Busy reject).
    backoff_until: Option<Instant>,
    strikes: u32,
    timeouts: u32,
    /// Pieces it sent bad bytes for or timed out on: not asked of it again while
    /// another connected peer has them.
    avoid: Vec<u32>,
    /// Outstanding requests that were endgame duplicates.
    duplicates: usize,
}

impl PeerState {
    fn new(n: u32, depth: usize) -> Self {
        Self {
            bits: Words::new(n),
            requests: Vec::new(),
            depth,
            interval: None,
            last_done: None,
            backoff_until: None,
            strikes: 0,
            timeouts: 0,
            avoid: Vec::new(),
            duplicates: 0,
        }
    }

    fn requested(&self, piece: u32) -> bool {
        self.requests.iter().any(|r| r.piece == piece)
    }

    fn in_backoff(&self, now: Instant) -> bool {
        self.backoff_until.is_some_and(|t| t > now)
    }
}

#[derive(Clone, Copy, Debug)]
struct PieceInfo {
    /// Outstanding requests for the piece.
    copies: u32,
    /// Index in `PieceTable::in_flight`, or `NOT_IN_FLIGHT`.
    in_flight_pos: u32,
    /// When the piece last went from needed to in flight.
    since: Option<Instant>,
    /// Connected peers with the piece on their avoid list.
    avoiders: u32,
}

/// The piece-state bookkeeping (see the module docs for its invariants).
#[derive(Debug)]
struct PieceTable {
    n: u32,
    have: Bitfield,
    have_count: u32,
    info: Vec<PieceInfo>,
    /// Connected peers that have each piece (apart from `info`: a pick scans it).
    avail: Vec<u32>,
    /// The needed pieces.
    needed: Words,
    /// Number of needed pieces.
    needed_count: u32,
    /// Needed pieces no connected peer has.
    unavailable: u32,
    /// Needed pieces whose request was orphaned: picked before any other.
    orphans: Words,
    orphan_count: u32,
    /// Pieces in flight, in no particular order.
    in_flight: Vec<u32>,
}

impl PieceTable {
    fn new(have: Bitfield) -> Self {
        let n = have.len();
        let mut needed = Words::new(n);
        for i in have.zeros() {
            needed.insert(i);
        }
        let needed_count = needed.count();
        let have_count = have.count();
        Self {
            n,
            have,
            have_count,
            info: vec![PieceInfo { copies: 0, in_flight_pos: NOT_IN_FLIGHT, since: None, avoiders: 0 }; n as usize],
            avail: vec![0; n as usize],
            needed,
            needed_count,
            unavailable: needed_count,
            orphans: Words::new(n),
            orphan_count: 0,
            in_flight: Vec::new(),
        }
    }

    fn is_complete(&self) -> bool {
        self.have_count == self.n
    }

    fn info(&self, i: u32) -> PieceInfo {
        self.info[i as usize]
    }

    /// Membership of `needed` is what "needed" means (between a request ending and
    /// the piece being re-queued or held, a piece is briefly in no state at all).
    fn is_needed(&self, i: u32) -> bool {
        self.needed.get(i)
    }

    fn avail(&self, i: u32) -> u32 {
        self.avail[i as usize]
    }

    fn state(&self, i: u32) -> PieceState {
        if self.have.get(i) {
            PieceState::Have
        } else if self.info[i as usize].copies > 0 {
            PieceState::InFlight
        } else {
            PieceState::Needed
        }
    }

    fn inc_avail(&mut self, i: u32) {
        let a = self.avail[i as usize];
        if a == 0 && self.is_needed(i) {
            self.unavailable -= 1;
        }
        self.avail[i as usize] = a + 1;
    }

    fn dec_avail(&mut self, i: u32) {
        let a = self.avail[i as usize];
        if a == 0 {
            return;
        }
        if a == 1 && self.is_needed(i) {
            self.unavailable += 1;
        }
        self.avail[i as usize] = a - 1;
    }

    /// A missing piece whose last request just ended goes back to needed.
    fn make_needed(&mut self, i: u32, orphan: bool) {
        if self.needed.insert(i) {
            self.needed_count += 1;
            if self.avail[i as usize] == 0 {
                self.unavailable += 1;
            }
        }
        if orphan && self.orphans.insert(i) {
            self.orphan_count += 1;
        }
    }

    /// A needed piece leaves the needed set (requested or obtained).
    fn take_needed(&mut self, i: u32) {
        if self.needed.remove(i) {
            self.needed_count -= 1;
            if self.avail[i as usize] == 0 {
                self.unavailable -= 1;
            }
        }
        if self.orphans.remove(i) {
            self.orphan_count -= 1;
        }
    }

    /// One more request for `i` is outstanding; returns whether it is a duplicate.
    fn add_copy(&mut self, i: u32, now: Instant) -> bool {
        let copies = self.info[i as usize].copies;
        if copies == 0 {
            self.take_needed(i);
            self.info[i as usize].in_flight_pos = self.in_flight.len() as u32;
            self.info[i as usize].since = Some(now);
            self.in_flight.push(i);
        }
        self.info[i as usize].copies = copies + 1;
        copies > 0
    }

    /// One request for `i` ended; returns whether none is left. Does not re-queue.
    fn remove_copy(&mut self, i: u32) -> bool {
        let info = &mut self.info[i as usize];
        info.copies = info.copies.saturating_sub(1);
        if info.copies > 0 {
            return false;
        }
        let pos = info.in_flight_pos;
        info.in_flight_pos = NOT_IN_FLIGHT;
        if (pos as usize) < self.in_flight.len() {
            self.in_flight.swap_remove(pos as usize);
            if let Some(&moved) = self.in_flight.get(pos as usize) {
                self.info[moved as usize].in_flight_pos = pos;
            }
        }
        true
    }

    /// Marks a missing piece with no outstanding request as held. The piece is either
    /// needed or just lost its last request (which was not re-queued).
    fn set_have(&mut self, i: u32) {
        if self.is_needed(i) {
            self.take_needed(i);
        }
        self.have.set(i, true);
        self.have_count += 1;
    }

    /// Puts `piece` on `peer`'s avoid list (bounded; the oldest entry falls off).
    fn avoid(&mut self, peer: &mut PeerState, piece: u32) {
        if peer.avoid.contains(&piece) {
            return;
        }
        if peer.avoid.len() >= MAX_AVOID_PER_PEER {
            let old = peer.avoid.remove(0);
            self.info[old as usize].avoiders -= 1;
        }
        peer.avoid.push(piece);
        self.info[piece as usize].avoiders += 1;
    }

    /// Pieces on `peer`'s avoid list that some other connected peer can serve without
    /// avoiding them: more holders than avoiders. (When every holder avoids a piece,
    /// nobody is excluded, so the piece cannot get stuck. Counting avoiders that
    /// lost the bit only ever lifts an exclusion early.)
    fn excluded(&self, peer: &PeerState) -> Vec<u32> {
        peer.avoid.iter().copied().filter(|&i| self.avail[i as usize] > self.info[i as usize].avoiders).collect()
    }

    /// The needed piece to ask of `peer`: an orphan if it has one (rarest orphan,
    /// random among ties), else a uniformly random one of the rarest class it has.
    fn pick_needed<R: Rng>(&self, peer: &PeerState, rng: &mut R) -> Option<u32> {
        if self.needed_count == 0 {
            return None;
        }
        let excl = self.excluded(peer);
        let mask = |w: usize| -> u64 {
            excl.iter().filter(|&&i| i as usize / 64 == w).fold(0u64, |m, &i| m | (1u64 << (i % 64)))
        };
        let peer_words = peer.bits.words();
        if self.orphan_count > 0 {
            let mut best: Option<(u32, u32)> = None; // (availability, piece)
            let mut ties = 0u32;
            for (w, (&o, &p)) in self.orphans.words().iter().zip(peer_words).enumerate() {
                let mut m = o & p;
                if m == 0 {
                    continue;
                }
                if !excl.is_empty() {
                    m &= !mask(w);
                }
                for b in BitIter(m) {
                    let i = (w * 64) as u32 + b;
                    let a = self.avail[i as usize];
                    match best {
                        Some((ba, _)) if a > ba => {}
                        Some((ba, _)) if a == ba => {
                            ties += 1;
                            if rng.gen_range(0..ties) == 0 {
                                best = Some((a, i));
                            }
                        }
                        _ => {
                            best = Some((a, i));
                            ties = 1;
                        }
                    }
                }
            }
            if let Some((_, i)) = best {
                return Some(i);
            }
        }
        // The rarest availability among the needed pieces the peer has, and how many
        // share it; then the r-th of those in piece order, r uniform.
        let needed = self.needed.words();
        let n_words = needed.len().min(peer_words.len());
        let word = |w: usize| -> u64 {
            let m = needed[w] & peer_words[w];
            if m == 0 || excl.is_empty() { m } else { m & !mask(w) }
        };
        let (mut rarest, mut ties) = (u32::MAX, 0u32);
        for w in 0..n_words {
            for b in BitIter(word(w)) {
                let a = self.avail[w * 64 + b as usize];
                if a < rarest {
                    (rarest, ties) = (a, 1);
                } else if a == rarest {
                    ties += 1;
                }
            }
        }
        if ties == 0 {
            return None;
        }
        let mut r = rng.gen_range(0..ties);
        for w in 0..n_words {
            for b in BitIter(word(w)) {
                let i = (w * 64) as u32 + b;
                if self.avail[i as usize] == rarest {
                    if r == 0 {
                        return Some(i);
                    }
                    r -= 1;
                }
            }
        }
        None
    }

    /// An in-flight piece `peer` has and was not asked for, with fewer than
    /// `max_copies` requests outstanding: fewest copies first, then the one in flight
    /// longest (the likeliest to be stuck), random among exact ties.
    fn pick_duplicate<R: Rng>(&self, peer: &PeerState, max_copies: u32, rng: &mut R) -> Option<u32> {
        let mut best: Option<((u32, Option<Instant>), u32)> = None; // ((copies, since), piece)
        let mut ties = 0u32;
        for &i in &self.in_flight {
            let info = self.info[i as usize];
            if info.copies >= max_copies || !peer.bits.get(i) || peer.requested(i) || peer.avoid.contains(&i) {
                continue;
            }
            let key = (info.copies, info.since);
            match best {
                Some((bk, _)) if key > bk => {}
                Some((bk, _)) if key == bk => {
                    ties += 1;
                    if rng.gen_range(0..ties) == 0 {
                        best = Some((key, i));
                    }
                }
                _ => {
                    best = Some((key, i));
                    ties = 1;
                }
            }
        }
        best.map(|(_, i)| i)
    }
}

/// Everything but the peer map, so a `&mut PeerState` can be held alongside it.
#[derive(Debug)]
struct Core {
    config: SchedulerConfig,
    pieces: PieceTable,
    timers: BTreeSet<(Instant, Timer)>,
    actions: VecDeque<Action>,
    rng: StdRng,
    stats: SchedulerStats,
    /// Peers to refill at the end of the current event.
    dirty: Vec<PeerKey>,
    /// Pieces re-queued (or, in the endgame, left with fewer copies) during the
    /// current event: every peer that has one of them gets a refill.
    requeued: Vec<u32>,
    /// Availability dropped during the current event, which may lift an avoid-list
    /// exclusion: peers with an avoid list get a refill.
    avail_dropped: bool,
}

/// `now + d`, saturating instead of panicking on overflow.
fn after(now: Instant, mut d: Duration) -> Instant {
    loop {
        if let Some(t) = now.checked_add(d) {
            return t;
        }
        d /= 2;
    }
}

impl Core {
    fn mark_dirty(&mut self, key: PeerKey) {
        if !self.dirty.contains(&key) {
            self.dirty.push(key);
        }
    }

    fn max_copies(&self) -> u32 {
        u32::try_from(self.config.endgame_duplicates).unwrap_or(u32::MAX).saturating_add(1)
    }

    fn in_endgame(&self) -> bool {
        let p = &self.pieces;
        if p.in_flight.is_empty() {
            return false;
        }
        p.needed_count == 0 || (self.config.endgame_ignores_unavailable && p.needed_count == p.unavailable)
    }

    fn depth_for(&self, interval: f64) -> usize {
        let c = &self.config;
        let q = c.queue_time.as_secs_f64();
        let d = if interval > 0.0 { (q / interval).ceil() + 1.0 } else { f64::INFINITY };
        let d = if d < c.max_in_flight as f64 { d as usize } else { c.max_in_flight };
        d.max(c.min_in_flight).min(c.max_in_flight).max(1)
    }

    fn initial_depth(&self) -> usize {
        let c = &self.config;
        c.initial_in_flight.max(c.min_in_flight).min(c.max_in_flight).max(1)
    }

    /// Sends requests to `peer` until its depth is reached or nothing fits.
    fn refill(&mut self, key: PeerKey, peer: &mut PeerState, now: Instant) {
        if peer.in_backoff(now) || self.pieces.is_complete() {
            return;
        }
        while peer.requests.len() < peer.depth {
            let piece = match self.pieces.pick_needed(peer, &mut self.rng) {
                Some(i) => i,
                None if peer.duplicates < self.config.endgame_peer_duplicates && self.in_endgame() => {
                    match self.pieces.pick_duplicate(peer, self.max_copies(), &mut self.rng) {
                        Some(i) => i,
                        None => return,
                    }
                }
                None => return,
            };
            self.send(key, peer, piece, now);
        }
    }

    /// The deadline of a request sent at `sent` in queue `position`, given the peer's
    /// current time per piece.
    fn deadline(&self, peer: &PeerState, sent: Instant, position: u32) -> Instant {
        let expected = peer.interval.map_or(0.0, |t| t * f64::from(position)) * TIMEOUT_FACTOR;
        let timeout = Duration::try_from_secs_f64(expected).unwrap_or(Duration::MAX).max(self.config.request_timeout);
        after(sent, timeout)
    }

    fn send(&mut self, key: PeerKey, peer: &mut PeerState, piece: u32, now: Instant) {
        let position = u32::try_from(peer.requests.len() + 1).unwrap_or(u32::MAX);
        let deadline = self.deadline(peer, now, position);
        let duplicate = self.pieces.add_copy(piece, now);
        if duplicate {
            self.stats.endgame_duplicates += 1;
            peer.duplicates += 1;
        }
        peer.requests.push(Outstanding { piece, sent: now, deadline, position, duplicate });
        self.timers.insert((deadline, Timer::Request { peer: key, piece }));
        self.stats.requests += 1;
        self.actions.push_back(Action::Request { peer: key, piece });
    }

    /// Ends `peer`'s outstanding request for `piece`, if any. With `requeue`, a piece
    /// left with no request goes back to needed as an orphan.
    fn end_request(&mut self, key: PeerKey, peer: &mut PeerState, piece: u32, requeue: bool) -> Option<Outstanding> {
        let pos = peer.requests.iter().position(|r| r.piece == piece)?;
        let req = peer.requests.remove(pos);
        self.timers.remove(&(req.deadline, Timer::Request { peer: key, piece }));
        if req.duplicate {
            peer.duplicates -= 1;
        }
        let endgame = self.in_endgame();
        let none_left = self.pieces.remove_copy(piece);
        if requeue && !self.pieces.have.get(piece) {
            if none_left {
                self.pieces.make_needed(piece, true);
                self.requeued.push(piece);
            } else if endgame {
                // Another peer may now add a copy.
                self.requeued.push(piece);
            }
        }
        self.mark_dirty(key);
        Some(req)
    }

    /// Halves a peer's depth and rate estimate after a timeout.
    fn penalize(&self, peer: &mut PeerState) {
        peer.timeouts += 1;
        peer.interval = peer.interval.map(|t| t * 2.0);
        let c = &self.config;
        peer.depth = (peer.depth / 2).max(c.min_in_flight).min(c.max_in_flight).max(1);
    }

    /// Records a service-time sample for a verified request and adapts the depth.
    fn measure(&self, peer: &mut PeerState, req: &Outstanding, now: Instant) {
        let start = peer.last_done.map_or(req.sent, |d| d.max(req.sent));
        let sample = now.saturating_duration_since(start).as_secs_f64();
        let t = match peer.interval {
            Some(t) => t + RATE_ALPHA * (sample - t),
            None => sample,
        };
        peer.interval = Some(t);
        peer.last_done = Some(now);
        peer.depth = self.depth_for(t);
    }
}

/// The piece scheduler of one blob. See the module docs.
#[derive(Debug)]
pub struct Scheduler {
    core: Core,
    peers: PeerMap<PeerState>,
    piece_length: u32,
    /// Whether the endgame was on at the end of the previous event.
    endgame_seen: bool,
    complete_emitted: bool,
}

impl Scheduler {
    /// A scheduler for a blob of `have.len()` pieces of `piece_length` bytes (the last
    /// may be shorter), of which `have` are already held (resume). `seed` fixes every
    /// random choice.
    pub fn new(config: SchedulerConfig, piece_length: u32, have: Bitfield, seed: u64) -> Self {
        let mut s = Self {
            core: Core {
                config,
                pieces: PieceTable::new(have),
                timers: BTreeSet::new(),
                actions: VecDeque::new(),
                rng: StdRng::seed_from_u64(seed),
                stats: SchedulerStats::default(),
                dirty: Vec::new(),
                requeued: Vec::new(),
                avail_dropped: false,
            },
            peers: PeerMap::default(),
            piece_length,
            endgame_seen: false,
            complete_emitted: false,
        };
        s.check_complete();
        s
    }

    /// A new connection. Its pieces come with [`Scheduler::peer_bitfield`]. Adding a
    /// key that is already connected is ignored.
    pub fn add_peer(&mut self, peer: PeerKey, now: Instant) {
        if !self.peers.contains_key(&peer) {
            let depth = self.core.initial_depth();
            self.peers.insert(peer, PeerState::new(self.core.pieces.n, depth));
        }
        self.flush(now);
    }

    /// The connection is gone: its availability is withdrawn and its in-flight
    /// pieces go back to needed, ahead of every other needed piece. No `Cancel` is
    /// emitted (there is no connection left to cancel on).
    pub fn remove_peer(&mut self, peer: PeerKey, now: Instant) {
        self.forget_peer(peer);
        self.flush(now);
    }

    /// Replaces what we know of `peer`'s pieces. Bits past our piece count are ignored.
    pub fn peer_bitfield(&mut self, peer: PeerKey, bits: &Bitfield, now: Instant) {
        let Self { core, peers, .. } = self;
        let Some(p) = peers.get_mut(&peer) else { return };
        let n = core.pieces.n;
        let mut new = Words::new(n);
        for i in bits.ones().take_while(|&i| i < n) {
            new.insert(i);
        }
        for (w, (&old_w, &new_w)) in p.bits.words().iter().zip(new.words()).enumerate() {
            for b in BitIter(new_w & !old_w) {
                core.pieces.inc_avail((w * 64) as u32 + b);
            }
            for b in BitIter(old_w & !new_w) {
                core.pieces.dec_avail((w * 64) as u32 + b);
                core.avail_dropped = true;
            }
        }
        p.bits = new;
        core.mark_dirty(peer);
        self.flush(now);
    }

    /// `peer` announced a newly verified piece.
    pub fn peer_have(&mut self, peer: PeerKey, piece: u32, now: Instant) {
        let Self { core, peers, .. } = self;
        let Some(p) = peers.get_mut(&peer) else { return };
        if piece >= core.pieces.n || !p.bits.insert(piece) {
            return;
        }
        core.pieces.inc_avail(piece);
        if !core.pieces.have.get(piece) {
            // What `mark_dirty` + `flush` would do first, without a second lookup.
            core.refill(peer, p, now);
        }
        self.flush(now);
    }

    /// Bytes of `piece` arrived from `peer`, matched the hash and are stored. Every
    /// other outstanding request for the piece is cancelled. From an unknown peer the
    /// piece still counts as held (see the module docs).
    pub fn piece_verified(&mut self, peer: PeerKey, piece: u32, now: Instant) {
        let Self { core, peers, .. } = self;
        if piece >= core.pieces.n {
            return;
        }
        if let Some(p) = peers.get_mut(&peer) {
            // It sent the piece, so it has it.
            if p.bits.insert(piece) {
                core.pieces.inc_avail(piece);
            }
            if let Some(req) = core.end_request(peer, p, piece, false) {
                core.measure(p, &req, now);
            }
        }
        if core.pieces.have.get(piece) {
            core.stats.redundant += 1;
        } else {
            core.stats.verified += 1;
            self.obtain(piece);
        }
        self.flush(now);
    }

    /// The bytes of `piece` from `peer` failed their hash: a strike against the peer,
    /// the piece goes back to needed (preferring another peer), and at `max_strikes`
    /// the peer is dropped.
    pub fn piece_failed(&mut self, peer: PeerKey, piece: u32, now: Instant) {
        let Self { core, peers, .. } = self;
        if piece >= core.pieces.n {
            return;
        }
        let Some(p) = peers.get_mut(&peer) else { return };
        core.stats.failed_pieces += 1;
        core.end_request(peer, p, piece, true);
        p.strikes += 1;
        if !core.pieces.have.get(piece) {
            core.pieces.avoid(p, piece);
        }
        if p.strikes >= core.config.max_strikes {
            core.stats.dropped_peers += 1;
            core.actions.push_back(Action::DropPeer { peer, reason: DropReason::BadPieces });
            self.forget_peer(peer);
        }
        self.flush(now);
    }

    /// A request ended without the piece. Ignored unless that request is outstanding.
    pub fn request_failed(&mut self, peer: PeerKey, piece: u32, why: RequestFailure, now: Instant) {
        let Self { core, peers, .. } = self;
        let Some(p) = peers.get_mut(&peer) else { return };
        if core.end_request(peer, p, piece, true).is_none() {
            return;
        }
        match why {
            RequestFailure::Busy => {
                core.stats.busy += 1;
                if let Some(old) = p.backoff_until.take() {
                    core.timers.remove(&(old, Timer::Backoff { peer }));
                }
                let until = after(now, core.config.busy_backoff);
                p.backoff_until = Some(until);
                core.timers.insert((until, Timer::Backoff { peer }));
            }
            RequestFailure::Missing => {
                core.stats.missing += 1;
                if p.bits.remove(piece) {
                    core.pieces.dec_avail(piece);
                    core.avail_dropped = true;
                }
            }
            RequestFailure::Error => core.stats.errors += 1,
        }
        self.flush(now);
    }

    /// `piece` was obtained outside the swarm (e.g. from the upstream registry) and
    /// is stored: it is held, `Have` is emitted and any request for it cancelled.
    pub fn local_piece(&mut self, piece: u32, now: Instant) {
        if piece >= self.core.pieces.n || self.core.pieces.have.get(piece) {
            return;
        }
        self.core.stats.local += 1;
        self.obtain(piece);
        self.flush(now);
    }

    /// Expires overdue requests (`Cancel`, re-queue, halve that peer's depth) and
    /// ended backoffs, then refills.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Self { core, peers, .. } = self;
        while let Some(&(t, timer)) = core.timers.first() {
            if t > now {
                break;
            }
            core.timers.pop_first();
            match timer {
                Timer::Request { peer, piece } => {
                    let Some(p) = peers.get_mut(&peer) else { continue };
                    let Some(idx) = p.requests.iter().position(|r| r.piece == piece) else { continue };
                    // The deadline was set with the rate known at send time; a slow peer
                    // measured since then gets the time its queue position warrants.
                    let req = p.requests[idx];
                    let due = core.deadline(p, req.sent, req.position);
                    if due > now {
                        p.requests[idx].deadline = due;
                        core.timers.insert((due, Timer::Request { peer, piece }));
                        continue;
                    }
                    core.end_request(peer, p, piece, true);
                    core.stats.timeouts += 1;
                    core.stats.cancels += 1;
                    core.actions.push_back(Action::Cancel { peer, piece });
                    core.penalize(p);
                    if !core.pieces.have.get(piece) {
                        core.pieces.avoid(p, piece);
                    }
                }
                Timer::Backoff { peer } => {
                    if let Some(p) = peers.get_mut(&peer) {
                        if p.backoff_until == Some(t) {
                            p.backoff_until = None;
                        }
                        core.mark_dirty(peer);
                    }
                }
            }
        }
        self.flush(now);
    }

    /// The next action for the driver, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.core.actions.pop_front()
    }

    /// When [`Scheduler::handle_timeout`] must be called next (earliest request
    /// deadline or backoff end).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.core.timers.first().map(|&(t, _)| t)
    }

    /// Pieces held.
    pub fn have(&self) -> &Bitfield {
        &self.core.pieces.have
    }

    /// Whether every piece is held.
    pub fn is_complete(&self) -> bool {
        self.core.pieces.is_complete()
    }

    /// Whether `peer` told us it has `piece` (a `Have` to it would be wasted).
    pub fn peer_has(&self, peer: PeerKey, piece: u32) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.bits.get(piece))
    }

    /// Reads what [`Scheduler::peer_have`] of `piece` from `peer` reads first (the
    /// peer's entry, its bit and the piece's availability) and returns a value made of
    /// them; changes nothing. See [`crate::swarm::Swarm::warm_have`].
    pub fn warm_have(&self, peer: PeerKey, piece: u32) -> u64 {
        let avail = self.core.pieces.avail.get(piece as usize).copied().unwrap_or(0);
        let held = u64::from(self.core.pieces.have.get(piece));
        let peer = self.peers.get(&peer).map_or(0, |p| u64::from(p.bits.get(piece)) ^ p.requests.len() as u64);
        u64::from(avail) ^ held ^ peer
    }

    /// The peers that told us they have `piece`, in key order.
    pub fn peers_holding(&self, piece: u32) -> impl Iterator<Item = PeerKey> + '_ {
        self.peers.iter().filter(move |(_, p)| p.bits.get(piece)).map(|(&k, _)| k)
    }

    /// Requests outstanding at `peer` (0 for an unknown peer).
    pub fn in_flight(&self, peer: PeerKey) -> usize {
        self.peers.get(&peer).map_or(0, |p| p.requests.len())
    }

    /// Connected peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Counters since construction.
    pub fn stats(&self) -> SchedulerStats {
        self.core.stats
    }

    /// Number of pieces of the blob.
    pub fn piece_count(&self) -> u32 {
        self.core.pieces.n
    }

    /// The current depth of `peer` (requests it may have outstanding).
    pub fn depth(&self, peer: PeerKey) -> Option<usize> {
        self.peers.get(&peer).map(|p| p.depth)
    }

    /// The measured download rate from `peer` in bytes per second, once known.
    pub fn rate(&self, peer: PeerKey) -> Option<f64> {
        let t = self.peers.get(&peer)?.interval?;
        (t > 0.0).then(|| f64::from(self.piece_length) / t)
    }

    /// Pieces requested from `peer` and not yet answered, oldest first.
    pub fn requests(&self, peer: PeerKey) -> Vec<u32> {
        self.peers.get(&peer).map(|p| p.requests.iter().map(|r| r.piece).collect()).unwrap_or_default()
    }

    /// The state of `piece` (`None` when out of range).
    pub fn piece_state(&self, piece: u32) -> Option<PieceState> {
        (piece < self.core.pieces.n).then(|| self.core.pieces.state(piece))
    }

    /// Connected peers that have `piece`.
    pub fn availability(&self, piece: u32) -> u32 {
        if piece < self.core.pieces.n { self.core.pieces.avail(piece) } else { 0 }
    }

    /// Whether duplicate (endgame) requests are currently allowed.
    pub fn in_endgame(&self) -> bool {
        self.core.in_endgame()
    }

    /// Marks `piece` held: cancels every outstanding request for it, emits `Have`.
    fn obtain(&mut self, piece: u32) {
        let Self { core, peers, .. } = self;
        if core.pieces.info(piece).copies > 0 {
            for (&key, p) in peers.iter_mut() {
                if core.end_request(key, p, piece, false).is_some() {
                    core.stats.cancels += 1;
                    core.actions.push_back(Action::Cancel { peer: key, piece });
                }
            }
        }
        core.pieces.set_have(piece);
        core.actions.push_back(Action::Have { piece });
    }

    /// Removes a peer's state: availability withdrawn, its requests re-queued.
    fn forget_peer(&mut self, peer: PeerKey) {
        let Self { core, peers, .. } = self;
        let Some(mut p) = peers.remove(&peer) else { return };
        for i in p.bits.ones() {
            core.pieces.dec_avail(i);
        }
        core.avail_dropped = true;
        for &i in &p.avoid {
            core.pieces.info[i as usize].avoiders -= 1;
        }
        while let Some(r) = p.requests.first().map(|r| r.piece) {
            core.end_request(peer, &mut p, r, true);
        }
        if let Some(t) = p.backoff_until {
            core.timers.remove(&(t, Timer::Backoff { peer }));
        }
        core.dirty.retain(|&k| k != peer);
    }

    /// Refills the peers that may take requests now, then emits `Complete` if due.
    fn flush(&mut self, now: Instant) {
        let Self { core, peers, .. } = self;
        if !core.pieces.is_complete() {
            if !core.requeued.is_empty() {
                // Only peers that have a re-queued piece can take it: O(peers × re-queued)
                // bit tests instead of a pick for every peer.
                let requeued = std::mem::take(&mut core.requeued);
                for (&key, p) in peers.iter_mut() {
                    if p.requests.len() < p.depth && requeued.iter().any(|&i| p.bits.get(i)) {
                        core.refill(key, p, now);
                    }
                }
                core.requeued = requeued;
            }
            if core.avail_dropped {
                for (&key, p) in peers.iter_mut() {
                    if !p.avoid.is_empty() {
                        core.refill(key, p, now);
                    }
                }
            }
            let dirty = std::mem::take(&mut core.dirty);
            for &key in &dirty {
                if let Some(p) = peers.get_mut(&key) {
                    core.refill(key, p, now);
                }
            }
            core.dirty = dirty;
            // Entering the endgame opens duplicates to every peer with free slots.
            if core.in_endgame() && !self.endgame_seen {
                for (&key, p) in peers.iter_mut() {
                    core.refill(key, p, now);
                }
            }
        }
        core.dirty.clear();
        core.requeued.clear();
        core.avail_dropped = false;
        self.endgame_seen = core.in_endgame();
        self.check_complete();
    }

    fn check_complete(&mut self) {
        if self.core.pieces.is_complete() && !self.complete_emitted {
            self.complete_emitted = true;
            self.core.actions.push_back(Action::Complete);
        }
    }

    /// Checks every invariant of the module docs. Costs O(pieces × peers);
    /// meant for tests and simulator debugging.
    pub fn check_invariants(&self) -> Result<(), String> {
        let p = &self.core.pieces;
        let n = p.n;
        let mut avail = vec![0u32; n as usize];
        let mut avoiders = vec![0u32; n as usize];
        let mut copies = vec![0u32; n as usize];
        let mut timers = 0usize;
        for (key, peer) in self.peers.iter() {
            if peer.duplicates != peer.requests.iter().filter(|r| r.duplicate).count() {
                return Err(format!("{key:?} duplicate counter wrong"));
            }
            for &i in &peer.avoid {
                match avoiders.get_mut(i as usize) {
                    Some(a) => *a += 1,
                    None => return Err(format!("{key:?} avoids out-of-range piece {i}")),
                }
            }
            for i in peer.bits.ones() {
                if i >= n {
                    return Err(format!("{key:?} has out-of-range piece {i}"));
                }
                avail[i as usize] += 1;
            }
            for (k, r) in peer.requests.iter().enumerate() {
                if peer.requests[..k].iter().any(|o| o.piece == r.piece) {
                    return Err(format!("{key:?} has two requests for piece {}", r.piece));
                }
                if r.piece >= n {
                    return Err(format!("{key:?} has a request for out-of-range piece {}", r.piece));
                }
                copies[r.piece as usize] += 1;
                if !self.core.timers.contains(&(r.deadline, Timer::Request { peer: *key, piece: r.piece })) {
                    return Err(format!("{key:?} request for {} has no timer", r.piece));
                }
                timers += 1;
            }
            if peer.requests.len() > self.core.config.max_in_flight.max(1) {
                return Err(format!("{key:?} has {} requests, above max_in_flight", peer.requests.len()));
            }
            let (lo, hi) = (self.core.config.min_in_flight, self.core.config.max_in_flight);
            if peer.depth == 0 || peer.depth > hi.max(1) || (peer.depth < lo && lo <= hi) {
                return Err(format!("{key:?} depth {} outside {lo}..={hi}", peer.depth));
            }
            if let Some(t) = peer.backoff_until {
                if !self.core.timers.contains(&(t, Timer::Backoff { peer: *key })) {
                    return Err(format!("{key:?} backoff has no timer"));
                }
                timers += 1;
            }
        }
        if timers != self.core.timers.len() {
            return Err(format!("{} timers for {timers} requests and backoffs", self.core.timers.len()));
        }
        let (mut needed, mut unavailable) = (0, 0);
        for i in 0..n {
            let info = p.info(i);
            if p.avail(i) != avail[i as usize] {
                return Err(format!("piece {i}: availability {} but {} peers have it", p.avail(i), avail[i as usize]));
            }
            if info.avoiders != avoiders[i as usize] {
                return Err(format!("piece {i}: {} avoiders counted, {} lists", info.avoiders, avoiders[i as usize]));
            }
            if info.copies != copies[i as usize] {
                return Err(format!("piece {i}: {} copies but {} requests", info.copies, copies[i as usize]));
            }
            let listed =
                (info.in_flight_pos as usize) < p.in_flight.len() && p.in_flight[info.in_flight_pos as usize] == i;
            let states = [p.have.get(i), info.copies > 0, p.is_needed(i)];
            if states.iter().filter(|&&s| s).count() != 1 {
                return Err(format!("piece {i}: have/in-flight/needed = {states:?}, want exactly one"));
            }
            if p.is_needed(i) {
                needed += 1;
                if p.avail(i) == 0 {
                    unavailable += 1;
                }
            }
            if listed != (info.copies > 0) || (info.copies == 0 && info.in_flight_pos != NOT_IN_FLIGHT) {
                return Err(format!("piece {i}: in-flight list position wrong"));
            }
            if p.orphans.get(i) && !p.is_needed(i) {
                return Err(format!("piece {i}: orphan but not needed"));
            }
        }
        if needed != p.needed_count {
            return Err(format!("{} needed pieces, counter says {}", needed, p.needed_count));
        }
        if unavailable != p.unavailable {
            return Err(format!("{unavailable} needed pieces nobody has, counter says {}", p.unavailable));
        }
        if p.in_flight.len() != copies.iter().filter(|&&c| c > 0).count() {
            return Err("in-flight list length wrong".into());
        }
        if p.orphan_count != p.orphans.count() {
            return Err("orphan count wrong".into());
        }
        if p.have_count != p.have.count() {
            return Err("have count wrong".into());
        }
        if self.complete_emitted != p.is_complete() {
            return Err("Complete emitted out of step with the have bitfield".into());
        }
        Ok(())
    }
}
