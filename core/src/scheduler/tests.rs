//! Scheduler tests. Every scenario runs through [`Checked`], which keeps its own model
//! of what the driver has been told and asserts, after every event, that each action
//! is consistent with it (see `Checked::drain`), plus the scheduler's own
//! `check_invariants`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashSet};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swarm_proto::Bitfield;

use super::*;

const PIECE: u32 = 256 * 1024;

fn ms(x: u64) -> Duration {
    Duration::from_millis(x)
}

fn bf(n: u32, pieces: impl IntoIterator<Item = u32>) -> Bitfield {
    let mut b = Bitfield::new(n);
    for i in pieces {
        b.set(i, true);
    }
    b
}

fn k(x: u64) -> PeerKey {
    PeerKey(x)
}

/// A scheduler wrapped with an independent model of the driver's view.
struct Checked {
    s: Scheduler,
    cfg: SchedulerConfig,
    n: u32,
    /// Requests the driver was told to make and that have not ended.
    outstanding: BTreeSet<(PeerKey, u32)>,
    /// Pieces held: from the start plus every `Have`.
    have: Vec<bool>,
    /// What the scheduler was told each connected peer has.
    bits: BTreeMap<PeerKey, Vec<bool>>,
    /// Busy backoffs the scheduler was given.
    backoff: BTreeMap<PeerKey, Instant>,
    completes: usize,
    /// Every action, in order.
    log: Vec<Action>,
    /// Run the full `check_invariants` after every event.
    full_checks: bool,
    /// Run the model checks after every event.
    model_checks: bool,
}

impl Checked {
    fn new(cfg: SchedulerConfig, have: Bitfield, seed: u64) -> Self {
        let n = have.len();
        let have_vec = (0..n).map(|i| have.get(i)).collect();
        let s = Scheduler::new(cfg.clone(), PIECE, have, seed);
        let mut c = Self {
            s,
            cfg,
            n,
            outstanding: BTreeSet::new(),
            have: have_vec,
            bits: BTreeMap::new(),
            backoff: BTreeMap::new(),
            completes: 0,
            log: Vec::new(),
            full_checks: true,
            model_checks: true,
        };
        c.drain(Instant::now());
        c
    }

    fn drain(&mut self, now: Instant) -> Vec<Action> {
        let mut got = Vec::new();
        let mut requested_from = BTreeSet::new();
        while let Some(a) = self.s.poll_action() {
            if self.model_checks {
                self.check_action(&a, now);
            }
            if let Action::Request { peer, .. } = a {
                requested_from.insert(peer);
            }
            got.push(a);
        }
        if self.model_checks {
            for peer in requested_from {
                if let Some(depth) = self.s.depth(peer) {
                    assert!(
                        self.s.in_flight(peer) <= depth,
                        "{peer:?}: {} in flight, depth {depth}",
                        self.s.in_flight(peer)
                    );
                }
            }
            for &peer in self.bits.keys() {
                let model = self.outstanding.range((peer, 0)..=(peer, u32::MAX)).count();
                assert_eq!(self.s.in_flight(peer), model, "{peer:?} in-flight count");
                assert!(self.s.in_flight(peer) <= self.cfg.max_in_flight.max(1));
            }
            assert_eq!(self.s.peer_count(), self.bits.len());
            for i in 0..self.n {
                assert_eq!(self.s.have().get(i), self.have[i as usize], "have bit {i}");
            }
            assert_eq!(self.s.is_complete(), self.completes == 1);
        }
        if self.full_checks
            && let Err(e) = self.s.check_invariants()
        {
            panic!("invariant broken: {e}");
        }
        self.log.extend(got.iter().cloned());
        got
    }

    fn check_action(&mut self, a: &Action, now: Instant) {
        match *a {
            Action::Request { peer, piece } => {
                assert!(piece < self.n);
                assert!(!self.have[piece as usize], "requested held piece {piece}");
                let bits = self.bits.get(&peer).unwrap_or_else(|| panic!("request to unknown {peer:?}"));
                assert!(bits[piece as usize], "requested {piece} from {peer:?}, which does not have it");
                if let Some(&until) = self.backoff.get(&peer) {
                    assert!(until <= now, "request to {peer:?} during backoff");
                }
                assert!(self.outstanding.insert((peer, piece)), "duplicate request {piece} to {peer:?}");
                let copies = self.outstanding.iter().filter(|&&(_, p)| p == piece).count();
                assert!(copies <= 1 + self.cfg.endgame_duplicates, "{copies} copies of {piece}");
            }
            Action::Cancel { peer, piece } => {
                assert!(self.outstanding.remove(&(peer, piece)), "cancel of non-outstanding {piece} at {peer:?}");
            }
            Action::Have { piece } => {
                assert!(!self.have[piece as usize], "Have {piece} twice");
                self.have[piece as usize] = true;
                assert!(
                    !self.outstanding.iter().any(|&(_, p)| p == piece),
                    "piece {piece} held but a request is still outstanding"
                );
            }
            Action::DropPeer { peer, .. } => {
                assert!(self.bits.remove(&peer).is_some(), "drop of unknown {peer:?}");
                self.outstanding.retain(|&(p, _)| p != peer);
                self.backoff.remove(&peer);
            }
            Action::Complete => {
                self.completes += 1;
                assert_eq!(self.completes, 1, "Complete twice");
                assert!(self.have.iter().all(|&h| h), "Complete with pieces missing");
                assert!(self.outstanding.is_empty(), "Complete with requests outstanding");
            }
        }
    }

    fn add_peer(&mut self, peer: PeerKey, now: Instant) -> Vec<Action> {
        self.bits.entry(peer).or_insert_with(|| vec![false; self.n as usize]);
        self.s.add_peer(peer, now);
        self.drain(now)
    }

    fn remove_peer(&mut self, peer: PeerKey, now: Instant) -> Vec<Action> {
        self.bits.remove(&peer);
        self.outstanding.retain(|&(p, _)| p != peer);
        self.backoff.remove(&peer);
        self.s.remove_peer(peer, now);
        self.drain(now)
    }

    fn bitfield(&mut self, peer: PeerKey, bits: &Bitfield, now: Instant) -> Vec<Action> {
        let n = self.n;
        if let Some(b) = self.bits.get_mut(&peer) {
            for (i, slot) in b.iter_mut().enumerate() {
                *slot = (i as u32) < n && bits.get(i as u32);
            }
        }
        self.s.peer_bitfield(peer, bits, now);
        self.drain(now)
    }

    fn peer_have(&mut self, peer: PeerKey, piece: u32, now: Instant) -> Vec<Action> {
        if let Some(b) = self.bits.get_mut(&peer)
            && let Some(slot) = b.get_mut(piece as usize)
        {
            *slot = true;
        }
        self.s.peer_have(peer, piece, now);
        self.drain(now)
    }

    fn verified(&mut self, peer: PeerKey, piece: u32, now: Instant) -> Vec<Action> {
        self.outstanding.remove(&(peer, piece));
        if let Some(b) = self.bits.get_mut(&peer)
            && let Some(slot) = b.get_mut(piece as usize)
        {
            *slot = true;
        }
        self.s.piece_verified(peer, piece, now);
        self.drain(now)
    }

    fn failed(&mut self, peer: PeerKey, piece: u32, now: Instant) -> Vec<Action> {
        self.outstanding.remove(&(peer, piece));
        self.s.piece_failed(peer, piece, now);
        self.drain(now)
    }

    fn request_failed(&mut self, peer: PeerKey, piece: u32, why: RequestFailure, now: Instant) -> Vec<Action> {
        if self.outstanding.remove(&(peer, piece)) {
            match why {
                RequestFailure::Busy => {
                    self.backoff.insert(peer, after(now, self.cfg.busy_backoff));
                }
                RequestFailure::Missing => {
                    if let Some(b) = self.bits.get_mut(&peer) {
                        b[piece as usize] = false;
                    }
                }
                RequestFailure::Error => {}
            }
        }
        self.s.request_failed(peer, piece, why, now);
        self.drain(now)
    }

    fn local(&mut self, piece: u32, now: Instant) -> Vec<Action> {
        self.s.local_piece(piece, now);
        self.drain(now)
    }

    fn timeout(&mut self, now: Instant) -> Vec<Action> {
        self.s.handle_timeout(now);
        self.drain(now)
    }

    fn outstanding_of(&self, peer: PeerKey) -> Vec<u32> {
        self.outstanding.range((peer, 0)..=(peer, u32::MAX)).map(|&(_, p)| p).collect()
    }
}

fn requests(actions: &[Action]) -> Vec<(PeerKey, u32)> {
    actions
        .iter()
        .filter_map(|a| match *a {
            Action::Request { peer, piece } => Some((peer, piece)),
            _ => None,
        })
        .collect()
}

fn cancels(actions: &[Action]) -> Vec<(PeerKey, u32)> {
    actions
        .iter()
        .filter_map(|a| match *a {
            Action::Cancel { peer, piece } => Some((peer, piece)),
            _ => None,
        })
        .collect()
}

fn depth1() -> SchedulerConfig {
    SchedulerConfig { initial_in_flight: 1, min_in_flight: 1, max_in_flight: 1, ..SchedulerConfig::default() }
}

// ---------------------------------------------------------------- rarest first

/// Pieces 0..10 are held by one peer, 10..20 by three: peer A (depth 1) is asked for
/// all ten rare pieces before any common one, and each pick is the rarest it could
/// have taken at that moment.
#[test]
fn rarest_first_asks_single_holder_pieces_first() {
    let n = 20;
    let now = Instant::now();
    let mut c = Checked::new(depth1(), Bitfield::new(n), 1);
    for p in 1..=3 {
        c.add_peer(k(p), now);
    }
    // B and C hold only the common pieces; each takes one of them.
    c.bitfield(k(2), &bf(n, 10..20), now);
    c.bitfield(k(3), &bf(n, 10..20), now);
    let mut order = Vec::new();
    let mut acts = c.bitfield(k(1), &Bitfield::full(n), now);
    let mut t = now;
    loop {
        let reqs: Vec<u32> = requests(&acts).into_iter().filter(|&(p, _)| p == k(1)).map(|(_, i)| i).collect();
        if reqs.is_empty() {
            break;
        }
        assert_eq!(reqs.len(), 1);
        let piece = reqs[0];
        order.push(piece);
        t += ms(10);
        acts = c.verified(k(1), piece, t);
        // Each later pick is rarest among the needed pieces A has.
        for (_, i) in requests(&acts).into_iter().filter(|&(p, _)| p == k(1)) {
            let min = (0..n)
                .filter(|&j| c.s.piece_state(j) == Some(PieceState::Needed) || j == i)
                .map(|j| c.s.availability(j))
                .min();
            assert_eq!(Some(c.s.availability(i)), min, "piece {i} is not the rarest");
        }
    }
    assert!(order.len() >= 10);
    assert!(order[..10].iter().all(|&i| i < 10), "rare pieces first: {order:?}");
    assert!(order[10..].iter().all(|&i| i >= 10));
}

/// Ties are broken at random, deterministically for a seed.
#[test]
fn rarest_ties_random_but_deterministic() {
    let n = 64;
    let run = |seed: u64| -> Vec<u32> {
        let now = Instant::now();
        let mut c = Checked::new(depth1(), Bitfield::new(n), seed);
        c.add_peer(k(1), now);
        let mut acts = c.bitfield(k(1), &Bitfield::full(n), now);
        let mut order = Vec::new();
        while let Some(&(_, i)) = requests(&acts).first() {
            order.push(i);
            acts = c.verified(k(1), i, now);
        }
        assert_eq!(order.len(), n as usize);
        order
    };
    let a = run(7);
    assert_eq!(a, run(7), "same seed, same order");
    let distinct: HashSet<Vec<u32>> = (0..5).map(run).collect();
    assert!(distinct.len() >= 4, "different seeds give different orders");
    assert_ne!(a, (0..n).collect::<Vec<_>>(), "not simply ascending");
}

/// Two peers holding disjoint halves: each only ever gets pieces it has, and a
/// single-holder piece never waits behind a piece with two holders.
#[test]
fn availability_levels_follow_haves_and_removals() {
    let n = 8;
    let now = Instant::now();
    let mut c = Checked::new(depth1(), Bitfield::new(n), 3);
    c.add_peer(k(1), now);
    c.add_peer(k(2), now);
    c.bitfield(k(1), &bf(n, [0, 1]), now);
    c.bitfield(k(2), &bf(n, [1, 2, 3]), now);
    assert_eq!(c.s.availability(1), 2);
    assert_eq!(c.s.availability(3), 1);
    c.peer_have(k(1), 3, now);
    assert_eq!(c.s.availability(3), 2);
    c.peer_have(k(1), 3, now); // repeated: no change
    assert_eq!(c.s.availability(3), 2);
    c.remove_peer(k(2), now);
    assert_eq!((c.s.availability(1), c.s.availability(2), c.s.availability(3)), (1, 0, 1));
    // Replacing a bitfield withdraws the old bits.
    c.bitfield(k(1), &bf(n, [5]), now);
    assert_eq!((c.s.availability(0), c.s.availability(5)), (0, 1));
}

// ---------------------------------------------------------------- pipelining

#[test]
fn depth_starts_at_initial_and_adapts_to_rate() {
    let n = 400;
    let t0 = Instant::now();
    let mut c = Checked::new(SchedulerConfig::default(), Bitfield::new(n), 5);
    c.add_peer(k(1), t0);
    c.add_peer(k(2), t0);
    let acts = c.bitfield(k(1), &Bitfield::full(n), t0);
    assert_eq!(requests(&acts).len(), 4, "initial_in_flight before any measurement");
    c.bitfield(k(2), &Bitfield::full(n), t0);
    assert_eq!(c.s.depth(k(1)), Some(4));
    // Fast peer: one piece per millisecond -> depth ceil(300/1)+1, clamped to 32.
    // Slow peer: one piece per second -> depth ceil(0.3)+1 = 2.
    let mut fast_t = t0;
    let mut slow_t = t0;
    for step in 0..200 {
        fast_t += ms(1);
        if let Some(&p) = c.outstanding_of(k(1)).first() {
            c.verified(k(1), p, fast_t);
        }
        if step % 20 == 0 {
            slow_t = slow_t.max(fast_t) + ms(1000);
            if let Some(&p) = c.outstanding_of(k(2)).first() {
                c.verified(k(2), p, slow_t);
            }
        }
    }
    assert_eq!(c.s.depth(k(1)), Some(32));
    assert_eq!(c.s.in_flight(k(1)), 32, "the fast peer's pipeline is full");
    assert_eq!(c.s.depth(k(2)), Some(2));
    assert!(c.s.in_flight(k(2)) <= 4);
    let rate = c.s.rate(k(1)).expect("measured");
    let want = f64::from(PIECE) / 0.001;
    assert!((rate - want).abs() / want < 0.05, "rate {rate} vs {want}");
    let slow_rate = c.s.rate(k(2)).expect("measured");
    assert!(slow_rate < f64::from(PIECE) * 1.5, "slow rate {slow_rate}");
}

/// Simultaneous completions on parallel streams average out instead of reading as
/// infinite speed.
#[test]
fn bursts_of_completions_measure_the_true_rate() {
    let n = 200;
    let t0 = Instant::now();
    let cfg = SchedulerConfig { initial_in_flight: 8, queue_time: ms(300), ..SchedulerConfig::default() };
    let mut c = Checked::new(cfg, Bitfield::new(n), 5);
    c.add_peer(k(1), t0);
    c.bitfield(k(1), &Bitfield::full(n), t0);
    let mut t = t0;
    for _ in 0..30 {
        // Everything outstanding arrives together, 10 ms per piece worth of time later.
        let batch = c.outstanding_of(k(1));
        t += ms(10) * batch.len() as u32;
        for p in batch {
            c.verified(k(1), p, t);
        }
    }
    let rate = c.s.rate(k(1)).expect("measured");
    let want = f64::from(PIECE) / 0.010;
    assert!(rate < want * 3.0 && rate > want / 3.0, "rate {rate} vs {want}");
}

// ---------------------------------------------------------------- timeouts

#[test]
fn timeouts_cancel_requeue_and_halve_depth() {
    let n = 50;
    let t0 = Instant::now();
    let cfg = SchedulerConfig { initial_in_flight: 8, ..SchedulerConfig::default() };
    let mut c = Checked::new(cfg.clone(), Bitfield::new(n), 9);
    c.add_peer(k(1), t0);
    c.bitfield(k(1), &Bitfield::full(n), t0);
    let first = c.outstanding_of(k(1));
    assert_eq!(first.len(), 8);
    assert_eq!(c.s.poll_timeout(), Some(t0 + cfg.request_timeout));
    assert!(c.timeout(t0 + cfg.request_timeout - ms(1)).is_empty(), "nothing due yet");
    let acts = c.timeout(t0 + cfg.request_timeout);
    let mut cancelled: Vec<u32> = cancels(&acts).into_iter().map(|(_, p)| p).collect();
    cancelled.sort();
    assert_eq!(cancelled, first, "every overdue request is cancelled");
    assert_eq!(c.s.stats().timeouts, 8);
    // Halved per expired request: a stalled pipeline drops to min_in_flight at once.
    assert_eq!(c.s.depth(k(1)), Some(2));
    // The re-sent requests are the orphaned pieces (started pieces first).
    let again = requests(&acts);
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|(_, p)| first.contains(p)), "{again:?} not from {first:?}");
    // One timeout halves once.
    let t1 = t0 + cfg.request_timeout;
    let mut c2 = Checked::new(cfg.clone(), Bitfield::new(n), 9);
    c2.add_peer(k(1), t0);
    c2.bitfield(k(1), &Bitfield::full(n), t0);
    for (i, p) in c2.outstanding_of(k(1)).into_iter().enumerate().skip(1) {
        c2.verified(k(1), p, t0 + ms(1 + i as u64)); // fast: depth grows to 32
    }
    assert_eq!(c2.s.depth(k(1)), Some(32));
    let acts = c2.timeout(t1);
    assert_eq!(cancels(&acts).len(), 1);
    assert_eq!(c2.s.depth(k(1)), Some(16));
}

#[test]
fn timeout_grows_with_a_slow_peers_queue() {
    let n = 50;
    let t0 = Instant::now();
    let cfg = SchedulerConfig::default();
    let mut c = Checked::new(cfg.clone(), Bitfield::new(n), 9);
    c.add_peer(k(1), t0);
    c.bitfield(k(1), &Bitfield::full(n), t0);
    // Five seconds per piece.
    let mut t = t0;
    for _ in 0..6 {
        t += ms(5000);
        let p = c.outstanding_of(k(1))[0];
        c.timeout(t);
        c.verified(k(1), p, t);
    }
    assert_eq!(c.s.stats().timeouts, 0, "a steady slow peer is not timed out");
    let deadline = c.s.poll_timeout().expect("requests outstanding");
    assert!(deadline > t + cfg.request_timeout, "timeout scaled with the measured time per piece");
}

#[test]
fn late_piece_after_timeout_is_accepted_and_cancels_the_retry() {
    let n = 1;
    let t0 = Instant::now();
    let cfg = SchedulerConfig { endgame_duplicates: 0, ..SchedulerConfig::default() };
    let mut c = Checked::new(cfg.clone(), Bitfield::new(n), 1);
    c.add_peer(k(1), t0);
    c.add_peer(k(2), t0);
    c.bitfield(k(1), &Bitfield::full(n), t0);
    c.bitfield(k(2), &Bitfield::full(n), t0);
    let holder = c.outstanding_of(k(1)).first().map(|_| k(1)).unwrap_or(k(2));
    let acts = c.timeout(t0 + cfg.request_timeout);
    assert_eq!(cancels(&acts), vec![(holder, 0)]);
    let retry = requests(&acts);
    assert_eq!(retry.len(), 1);
    // The cancelled stream's bytes still made it: piece held, the retry cancelled.
    let acts = c.verified(holder, 0, t0 + cfg.request_timeout + ms(1));
    assert_eq!(cancels(&acts), retry);
    assert!(acts.contains(&Action::Have { piece: 0 }) && acts.contains(&Action::Complete));
}

// ---------------------------------------------------------------- removal

#[test]
fn removed_peers_pieces_are_requeued_first() {
    let n = 100;
    let t0 = Instant::now();
    let mut c = Checked::new(SchedulerConfig::default(), Bitfield::new(n), 11);
    c.add_peer(k(1), t0);
    c.add_peer(k(2), t0);
    c.bitfield(k(1), &Bitfield::full(n), t0);
    c.bitfield(k(2), &Bitfield::full(n), t0);
    let orphaned = c.outstanding_of(k(1));
    assert_eq!(orphaned.len(), 4);
    let acts = c.remove_peer(k(1), t0);
    assert!(acts.is_empty(), "B is full, and no Cancel goes to a removed peer: {acts:?}");
    assert_eq!(c.s.in_flight(k(1)), 0);
    let mut next = Vec::new();
    for step in 0..4 {
        let p = c.outstanding_of(k(2))[0];
        let acts = c.verified(k(2), p, t0 + ms(step + 1));
        next.extend(requests(&acts).into_iter().map(|(_, p)| p));
    }
    // (B's depth grows as it measures, so more follow; the orphans come first.)
    let mut first = next[..4].to_vec();
    first.sort();
    assert_eq!(first, orphaned, "the removed peer's pieces come before any other: {next:?}");
    // Events for the removed peer are ignored.
    assert!(c.verified(k(1), 99, t0).iter().all(|a| matches!(a, Action::Have { .. } | Action::Cancel { .. })));
    assert!(c.peer_have(k(1), 3, t0).is_empty());
    assert!(c.request_failed(k(1), 3, RequestFailure::Busy, t0).is_empty());
}

// ---------------------------------------------------------------- rejects

#[test]
fn busy_backs_off_until_the_backoff_ends() {
    let n = 50;
    let t0 = Instant::now();
    let cfg = SchedulerConfig { busy_backoff: ms(250), queue_time: ms(300), ..SchedulerConfig::default() };
    let mut c = Checked::new(cfg.clone(), Bitfield::new(n), 2);
    c.add_peer(k(1), t0);
    c.bitfield(k(1), &Bitfield::full(n), t0);
    let p = c.outstanding_of(k(1))[0];
    let acts = c.request_failed(k(1), p, RequestFailure::Busy, t0);
    assert!(requests(&acts).is_empty(), "no request during backoff");
    assert_eq!(c.s.in_flight(k(1)), 3);
    assert_eq!(c.s.poll_timeout(), Some(t0 + cfg.busy_backoff));
    // Other events during the backoff do not send to it either.
    let q = c.outstanding_of(k(1))[0];
    assert!(requests(&c.verified(k(1), q, t0 + ms(100))).is_empty());
    assert!(c.timeout(t0 + cfg.busy_backoff - ms(1)).is_empty());
    let acts = c.timeout(t0 + cfg.busy_backoff);
    let reqs = requests(&acts);
    assert_eq!(reqs.len(), 2, "refilled to depth when the backoff ends");
    assert!(reqs.contains(&(k(1), p)), "the rejected piece first");
    assert_eq!(c.s.stats().busy, 1);
}

#[test]
fn missing_clears_the_bit_and_error_requeues() {
    let n = 1;
    let t0 = Instant::now();
    let cfg = SchedulerConfig { endgame_duplicates: 0, ..SchedulerConfig::default() };
    let mut c = Checked::new(cfg, Bitfield::new(n), 4);
    c.add_peer(k(1), t0);
    c.add_peer(k(2), t0);
    assert_eq!(requests(&c.bitfield(k(1), &Bitfield::full(n), t0)), vec![(k(1), 0)]);
    assert!(c.bitfield(k(2), &Bitfield::full(n), t0).is_empty(), "no duplicates with endgame_duplicates = 0");
    assert_eq!(c.s.availability(0), 2);
    let acts = c.request_failed(k(1), 0, RequestFailure::Missing, t0);
    assert_eq!(requests(&acts), vec![(k(2), 0)]);
    assert_eq!(c.s.availability(0), 1);
    // Stale reject (no such request outstanding): ignored.
    assert!(c.request_failed(k(1), 0, RequestFailure::Missing, t0).is_empty());
    let acts = c.request_failed(k(2), 0, RequestFailure::Error, t0);
    assert_eq!(requests(&acts), vec![(k(2), 0)], "error re-queues; peer 1 no longer has it");
    assert_eq!(c.s.stats().missing, 1);
    assert_eq!(c.s.stats().errors, 1);
}

// ---------------------------------------------------------------- endgame

#[test]
fn endgame_duplicates_are_bounded_and_losers_cancelled() {
    let n = 4;
    let t0 = Instant::now();
    // 2 duplicates per piece; lift the per-peer bound to see the per-piece one.
    let cfg = SchedulerConfig { endgame_peer_duplicates: 4, ..SchedulerConfig::default() };
    let mut c = Checked::new(cfg, Bitfield::new(n), 6);
    for p in 1..=6 {
        c.add_peer(k(p), t0);
    }
    let acts = c.bitfield(k(1), &Bitfield::full(n), t0);
    assert_eq!(requests(&acts).len(), 4);
    assert!(c.s.in_endgame(), "every missing piece is in flight");
    for p in 2..=6 {
        c.bitfield(k(p), &Bitfield::full(n), t0);
    }
    for piece in 0..n {
        let holders = c.outstanding.iter().filter(|&&(_, p)| p == piece).count();
        assert_eq!(holders, 3, "piece {piece}: one request plus two duplicates");
    }
    assert_eq!(c.s.stats().endgame_duplicates, 8);
    let losers: Vec<PeerKey> = c.outstanding.iter().filter(|&&(_, p)| p == 0).map(|&(q, _)| q).collect();
    let winner = losers[1];
    let acts = c.verified(winner, 0, t0 + ms(5));
    let mut cancelled = cancels(&acts);
    cancelled.sort();
    let want: Vec<(PeerKey, u32)> = losers.iter().filter(|&&q| q != winner).map(|&q| (q, 0)).collect();
    assert_eq!(cancelled, want, "every other copy is cancelled");
    assert!(!c.outstanding.iter().any(|&(_, p)| p == 0));
    // Finish: everything completes, nothing is left outstanding.
    let mut t = t0 + ms(5);
    while !c.s.is_complete() {
        t += ms(1);
        let &(peer, piece) = c.outstanding.iter().next().expect("something in flight");
        c.verified(peer, piece, t);
    }
    assert!(c.outstanding.is_empty());
    assert_eq!(c.log.iter().filter(|a| **a == Action::Complete).count(), 1);
}

/// By default an idle peer holds one duplicate at a time, and it steals the piece
/// that has been in flight longest.
#[test]
fn endgame_steals_one_piece_at_a_time_oldest_first() {
    let n = 8;
    let t0 = Instant::now();
    let mut c = Checked::new(SchedulerConfig::default(), Bitfield::new(n), 6);
    for p in 1..=4 {
        c.add_peer(k(p), t0);
    }
    c.bitfield(k(1), &Bitfield::full(n), t0); // 4 requests at t0
    let first = c.outstanding_of(k(1));
    c.bitfield(k(2), &Bitfield::full(n), t0 + ms(10)); // the other 4 at t0 + 10 ms
    assert!(c.s.in_endgame());
    let acts = c.bitfield(k(3), &Bitfield::full(n), t0 + ms(20));
    let reqs = requests(&acts);
    assert_eq!(reqs.len(), 1, "one duplicate per peer: {reqs:?}");
    assert!(first.contains(&reqs[0].1), "the oldest in-flight pieces first");
    let acts = c.bitfield(k(4), &Bitfield::full(n), t0 + ms(20));
    let reqs4 = requests(&acts);
    assert_eq!(reqs4.len(), 1);
    assert_ne!(reqs4[0].1, reqs[0].1, "fewest copies first");
    assert_eq!(c.s.stats().endgame_duplicates, 2);
    // When its duplicate wins, the peer may steal the next one.
    let acts = c.verified(k(3), reqs[0].1, t0 + ms(30));
    assert_eq!(cancels(&acts), vec![(k(1), reqs[0].1)]);
    assert_eq!(requests(&acts).iter().filter(|(p, _)| *p == k(3)).count(), 1);
}

#[test]
fn no_endgame_while_a_piece_is_still_needed() {
    let n = 3;
    let t0 = Instant::now();
    let mut c = Checked::new(SchedulerConfig::default(), Bitfield::new(n), 6);
    c.add_peer(k(1), t0);
    c.add_peer(k(2), t0);
    c.bitfield(k(1), &bf(n, [0, 1]), t0);
    // Piece 2 is held by nobody: not endgame, so peer 2 does not duplicate.
    assert!(!c.s.in_endgame());
    assert!(c.bitfield(k(2), &bf(n, [0, 1]), t0).is_empty());
    // With the literal reading the idle peer duplicates.
    let cfg = SchedulerConfig { endgame_ignores_unavailable: true, ..SchedulerConfig::default() };
    let mut c = Checked::new(cfg, Bitfield::new(n), 6);
    c.add_peer(k(1), t0);
    c.add_peer(k(2), t0);
    c.bitfield(k(1), &bf(n, [0, 1]), t0);
    assert!(c.s.in_endgame());
    assert_eq!(requests(&c.bitfield(k(2), &bf(n, [0, 1]), t0)).len(), 1, "one duplicate per peer");
}

// ---------------------------------------------------------------- bad pieces

#[test]
fn bad_pieces_go_elsewhere_and_drop_the_peer_at_max_strikes() {
    let n = 12;
    let t0 = Instant::now();
    let cfg = SchedulerConfig { endgame_duplicates: 0, ..SchedulerConfig::default() };
    let mut c = Checked::new(cfg.clone(), Bitfield::new(n), 8);
    let (bad, good) = (k(1), k(2));
    c.add_peer(bad, t0);
    c.add_peer(good, t0);
    c.bitfield(bad, &Bitfield::full(n), t0);
    c.bitfield(good, &Bitfield::full(n), t0);
    let mut failed = Vec::new();
    let mut t = t0;
    let mut dropped = false;
    while !c.s.is_complete() {
        t += ms(1);
        if let Some(&p) = c.outstanding_of(bad).first() {
            failed.push(p);
            let acts = c.failed(bad, p, t);
            // The failed piece is never asked of the bad peer again while the good one has it.
            assert!(!requests(&acts).contains(&(bad, p)));
            if acts
                .iter()
                .any(|a| matches!(a, Action::DropPeer { peer, reason: DropReason::BadPieces } if *peer == bad))
            {
                dropped = true;
                assert_eq!(failed.len() as u32, cfg.max_strikes);
                assert_eq!(c.s.peer_count(), 1);
                assert!(!cancels(&acts).iter().any(|&(q, _)| q == bad), "no Cancel to a dropped peer");
            }
        } else if let Some(&p) = c.outstanding_of(good).first() {
            c.verified(good, p, t);
        }
    }
    assert!(dropped);
    assert_eq!(c.s.stats().failed_pieces, 3);
    assert_eq!(c.s.stats().dropped_peers, 1);
    for p in &failed {
        let asked: Vec<PeerKey> = c
            .log
            .iter()
            .filter(|a| matches!(a, Action::Request { piece, .. } if piece == p))
            .filter_map(|a| match a {
                Action::Request { peer, .. } => Some(*peer),
                _ => None,
            })
            .collect();
        assert_eq!(asked.last(), Some(&good), "piece {p} finally fetched from the good peer");
    }
    // The dropped peer's late events are ignored.
    assert!(c.failed(bad, 0, t).is_empty());
}

/// The exclusion lasts only while someone else can serve the piece: when the other
/// holder stops claiming it, the bad peer is asked again at once; and when every
/// holder has failed it, both are asked rather than neither.
#[test]
fn avoid_lists_never_strand_a_piece() {
    let n = 2;
    let t0 = Instant::now();
    let cfg = SchedulerConfig { endgame_duplicates: 0, ..depth1() };
    let mut c = Checked::new(cfg.clone(), Bitfield::new(n), 8);
    c.add_peer(k(1), t0);
    c.add_peer(k(2), t0);
    c.bitfield(k(1), &Bitfield::full(n), t0);
    c.bitfield(k(2), &Bitfield::full(n), t0);
    let x = c.outstanding_of(k(1))[0];
    let acts = c.failed(k(1), x, t0);
    assert!(requests(&acts).is_empty(), "peer 1 avoids {x}, peer 2 is busy: {acts:?}");
    // Peer 2 no longer claims anything (its request stays outstanding).
    let acts = c.bitfield(k(2), &Bitfield::new(n), t0);
    assert_eq!(requests(&acts), vec![(k(1), x)], "exclusion lifted");

    // Both holders time out on the same piece: it is still asked of one of them.
    let cfg = SchedulerConfig { endgame_duplicates: 0, ..SchedulerConfig::default() };
    let mut c = Checked::new(cfg.clone(), Bitfield::new(1), 8);
    c.add_peer(k(1), t0);
    c.add_peer(k(2), t0);
    c.bitfield(k(1), &Bitfield::full(1), t0);
    c.bitfield(k(2), &Bitfield::full(1), t0);
    let acts = c.timeout(t0 + cfg.request_timeout);
    assert_eq!(requests(&acts).len(), 1, "retried at the other peer");
    let t1 = t0 + cfg.request_timeout * 3;
    let acts = c.timeout(t1);
    assert_eq!(requests(&acts).len(), 1, "both avoid it: asked anyway: {acts:?}");
}

#[test]
fn a_bad_peer_that_alone_has_a_piece_is_still_asked() {
    let n = 1;
    let t0 = Instant::now();
    let mut c = Checked::new(SchedulerConfig::default(), Bitfield::new(n), 8);
    c.add_peer(k(1), t0);
    c.bitfield(k(1), &Bitfield::full(n), t0);
    let acts = c.failed(k(1), 0, t0);
    assert_eq!(requests(&acts), vec![(k(1), 0)], "nobody else has it");
}

// ---------------------------------------------------------------- resume, local, complete

#[test]
fn resume_never_requests_held_pieces() {
    let n = 100;
    let t0 = Instant::now();
    let held = bf(n, (0..n).filter(|i| i % 3 != 0));
    let mut c = Checked::new(SchedulerConfig::default(), held.clone(), 12);
    c.add_peer(k(1), t0);
    c.bitfield(k(1), &Bitfield::full(n), t0);
    let mut t = t0;
    while !c.s.is_complete() {
        t += ms(1);
        let p = c.outstanding_of(k(1))[0];
        c.verified(k(1), p, t);
    }
    let asked: HashSet<u32> = requests(&c.log).into_iter().map(|(_, p)| p).collect();
    assert!(asked.iter().all(|&p| !held.get(p)));
    assert_eq!(asked.len() as u32, n - held.count());
    let haves = c.log.iter().filter(|a| matches!(a, Action::Have { .. })).count() as u32;
    assert_eq!(haves, n - held.count(), "Have only for new pieces");
}

#[test]
fn already_complete_emits_complete_once_and_never_requests() {
    let n = 10;
    let t0 = Instant::now();
    let mut s = Scheduler::new(SchedulerConfig::default(), PIECE, Bitfield::full(n), 0);
    assert_eq!(s.poll_action(), Some(Action::Complete));
    s.add_peer(k(1), t0);
    s.peer_bitfield(k(1), &Bitfield::full(n), t0);
    s.piece_verified(k(1), 3, t0);
    s.local_piece(2, t0);
    s.handle_timeout(t0 + ms(100_000));
    assert_eq!(s.poll_action(), None);
    assert_eq!(s.poll_timeout(), None);
    // An empty blob is complete at once too.
    let mut e = Scheduler::new(SchedulerConfig::default(), PIECE, Bitfield::new(0), 0);
    assert_eq!(e.poll_action(), Some(Action::Complete));
    e.add_peer(k(1), t0);
    e.peer_bitfield(k(1), &Bitfield::new(0), t0);
    assert_eq!(e.poll_action(), None);
}

#[test]
fn local_piece_cancels_requests_and_announces() {
    let n = 5;
    let t0 = Instant::now();
    let cfg = SchedulerConfig { endgame_duplicates: 0, ..SchedulerConfig::default() };
    let mut c = Checked::new(cfg, Bitfield::new(n), 13);
    c.add_peer(k(1), t0);
    c.bitfield(k(1), &Bitfield::full(n), t0);
    let p = c.outstanding_of(k(1))[0];
    let acts = c.local(p, t0);
    assert_eq!(cancels(&acts), vec![(k(1), p)]);
    assert!(acts.contains(&Action::Have { piece: p }));
    assert_eq!(requests(&acts).len(), 1, "the freed slot is refilled with the last piece");
    assert!(c.local(p, t0).is_empty(), "already held");
    assert!(c.local(n, t0).is_empty(), "out of range");
    // Pieces nobody has requested.
    for i in 0..n {
        c.local(i, t0);
    }
    assert!(c.s.is_complete() && c.completes == 1 && c.outstanding.is_empty());
    assert_eq!(c.s.stats().local, n as u64);
}

#[test]
fn garbage_is_ignored() {
    let n = 10;
    let t0 = Instant::now();
    let mut c = Checked::new(SchedulerConfig::default(), Bitfield::new(n), 14);
    // Unknown peer.
    assert!(c.bitfield(k(9), &Bitfield::full(n), t0).is_empty());
    assert!(c.peer_have(k(9), 1, t0).is_empty());
    assert!(c.failed(k(9), 1, t0).is_empty());
    assert!(c.request_failed(k(9), 1, RequestFailure::Error, t0).is_empty());
    assert!(c.remove_peer(k(9), t0).is_empty());
    c.add_peer(k(1), t0);
    // Out-of-range indices, wrong bitfield lengths.
    assert!(c.peer_have(k(1), n, t0).is_empty());
    assert!(c.peer_have(k(1), u32::MAX, t0).is_empty());
    assert!(c.verified(k(1), u32::MAX, t0).is_empty());
    assert!(c.failed(k(1), n + 5, t0).is_empty());
    assert!(c.request_failed(k(1), u32::MAX, RequestFailure::Missing, t0).is_empty());
    assert_eq!(requests(&c.bitfield(k(1), &bf(1000, [999, 3]), t0)), vec![(k(1), 3)]);
    c.bitfield(k(1), &bf(2, [1]), t0);
    assert_eq!(c.s.availability(3), 0);
    // Adding a connected peer again keeps its state.
    c.add_peer(k(1), t0);
    assert_eq!(c.s.availability(1), 1);
    assert_eq!(c.s.in_flight(k(1)), 2);
    // Huge durations saturate instead of panicking.
    let cfg = SchedulerConfig {
        request_timeout: Duration::MAX,
        busy_backoff: Duration::MAX,
        queue_time: Duration::MAX,
        ..SchedulerConfig::default()
    };
    let mut c = Checked::new(cfg, Bitfield::new(n), 1);
    c.add_peer(k(1), t0);
    c.bitfield(k(1), &Bitfield::full(n), t0);
    c.request_failed(k(1), c.outstanding_of(k(1))[0], RequestFailure::Busy, t0);
    c.timeout(t0 + ms(1));
}

#[test]
fn identical_inputs_give_identical_actions() {
    let run = |seed| {
        let mut drive = Drive::new(DriveParams { pieces: 256, peers: 12, seed, ..DriveParams::default() });
        drive.run();
        drive.c.log.clone()
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
}

// ---------------------------------------------------------------- property test

#[derive(Clone, Debug)]
enum Op {
    Add(u64),
    Remove(u64),
    Bitfield(u64, Vec<bool>),
    Have(u64, u32),
    /// Verify the `usize`-th outstanding request (mod count), or any piece from `u64`.
    VerifyOutstanding(usize),
    VerifyAny(u64, u32),
    FailOutstanding(usize),
    RejectOutstanding(usize, u8),
    RejectAny(u64, u32, u8),
    Local(u32),
    Advance(u64),
}

fn op_strategy(n: u32) -> impl Strategy<Value = Op> {
    let peer = 0u64..6;
    let piece = 0..n + 2; // includes out-of-range
    prop_oneof![
        2 => peer.clone().prop_map(Op::Add),
        1 => peer.clone().prop_map(Op::Remove),
        2 => (peer.clone(), proptest::collection::vec(any::<bool>(), (n as usize).saturating_sub(1)..=n as usize + 1))
            .prop_map(|(p, b)| Op::Bitfield(p, b)),
        3 => (peer.clone(), piece.clone()).prop_map(|(p, i)| Op::Have(p, i)),
        6 => any::<usize>().prop_map(Op::VerifyOutstanding),
        1 => (peer.clone(), piece.clone()).prop_map(|(p, i)| Op::VerifyAny(p, i)),
        1 => any::<usize>().prop_map(Op::FailOutstanding),
        2 => (any::<usize>(), 0u8..3).prop_map(|(x, w)| Op::RejectOutstanding(x, w)),
        1 => (peer.clone(), piece.clone(), 0u8..3).prop_map(|(p, i, w)| Op::RejectAny(p, i, w)),
        1 => piece.prop_map(Op::Local),
        2 => (0u64..15_000).prop_map(Op::Advance),
    ]
}

fn why(w: u8) -> RequestFailure {
    match w {
        0 => RequestFailure::Busy,
        1 => RequestFailure::Missing,
        _ => RequestFailure::Error,
    }
}

fn cfg_strategy() -> impl Strategy<Value = SchedulerConfig> {
    (1usize..6, 1usize..4, 1usize..8, 0usize..3, 1u32..4, any::<bool>()).prop_map(
        |(init, min, max, dups, strikes, loose)| SchedulerConfig {
            initial_in_flight: init,
            min_in_flight: min,
            max_in_flight: max,
            queue_time: ms(50),
            request_timeout: ms(2_000),
            busy_backoff: ms(300),
            max_strikes: strikes,
            endgame_duplicates: dups,
            endgame_peer_duplicates: init % 3,
            endgame_ignores_unavailable: loose,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_event_sequences_keep_every_invariant(
        n in 0u32..24,
        held in proptest::collection::vec(any::<bool>(), 24),
        cfg in cfg_strategy(),
        seed in any::<u64>(),
        ops in proptest::collection::vec(op_strategy(24), 1..120),
    ) {
        let have = bf(n, (0..n).filter(|&i| held[i as usize] && i % 2 == 0));
        let mut c = Checked::new(cfg, have, seed);
        let mut now = Instant::now();
        for op in ops {
            let pick = |c: &Checked, x: usize| c.outstanding.iter().nth(x % c.outstanding.len().max(1)).copied();
            match op {
                Op::Add(p) => { c.add_peer(k(p), now); }
                Op::Remove(p) => { c.remove_peer(k(p), now); }
                Op::Bitfield(p, bits) => {
                    let len = bits.len() as u32;
                    let b = bf(len, (0..len).filter(|&i| bits[i as usize]));
                    c.bitfield(k(p), &b, now);
                }
                Op::Have(p, i) => { c.peer_have(k(p), i, now); }
                Op::VerifyOutstanding(x) => if let Some((p, i)) = pick(&c, x) { c.verified(p, i, now); },
                Op::VerifyAny(p, i) => { c.verified(k(p), i, now); }
                Op::FailOutstanding(x) => if let Some((p, i)) = pick(&c, x) { c.failed(p, i, now); },
                Op::RejectOutstanding(x, w) => if let Some((p, i)) = pick(&c, x) { c.request_failed(p, i, why(w), now); },
                Op::RejectAny(p, i, w) => { c.request_failed(k(p), i, why(w), now); }
                Op::Local(i) => { c.local(i, now); }
                Op::Advance(d) => { now += ms(d); c.timeout(now); }
            }
            // Liveness: an idle peer with free slots and a needed piece it has gets asked,
            // unless it is in backoff or the piece is excluded for it.
            for (&peer, bits) in &c.bits {
                let free = c.s.in_flight(peer) < c.s.depth(peer).unwrap_or(0);
                let backoff = c.backoff.get(&peer).is_some_and(|&t| t > now);
                let avoid = c.s.peers.get(&peer).map(|p| p.avoid.clone()).unwrap_or_default();
                let allowed = |i: u32| {
                    let pieces = &c.s.core.pieces;
                    !avoid.contains(&i) || pieces.avail(i) <= pieces.info(i).avoiders
                };
                let work = (0..c.n).find(|&i| bits[i as usize] && c.s.piece_state(i) == Some(PieceState::Needed) && allowed(i));
                prop_assert!(!free || backoff || work.is_none(), "{peer:?} idle with piece {work:?} available");
            }
        }
        // Drain: answer every request until nothing is outstanding.
        let mut guard = 0;
        while let Some(&(p, i)) = c.outstanding.iter().next() {
            c.verified(p, i, now);
            guard += 1;
            prop_assert!(guard < 10_000);
        }
        prop_assert!(c.completes <= 1);
    }
}

// ---------------------------------------------------------------- virtual-time drive

/// Parameters of a single-downloader drive against modelled remote peers.
#[derive(Clone, Debug)]
struct DriveParams {
    pieces: u32,
    peers: u64,
    seed: u64,
    /// Share of remote peers that are complete seeds (at least one always is).
    seeds: u64,
    /// Remote peers that send bad bytes half the time.
    bad: u64,
    /// Remote peers that never answer (their requests time out).
    stalling: u64,
    /// Probability that a request gets a Busy / Error reject.
    p_busy: f64,
    p_error: f64,
    /// Probability that a partial peer claims a piece it does not have (Missing).
    p_lie: f64,
    /// Remove and re-add a random peer this often (0 = never).
    churn_every: u64,
    full_check_every: u64,
    model_checks: bool,
}

impl Default for DriveParams {
    fn default() -> Self {
        Self {
            pieces: 512,
            peers: 20,
            seed: 1,
            seeds: 2,
            bad: 1,
            stalling: 1,
            p_busy: 0.02,
            p_error: 0.01,
            p_lie: 0.01,
            churn_every: 200,
            full_check_every: 1,
            model_checks: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Done { peer: u64, piece: u32, generation: u64 },
    Gain { peer: u64, piece: u32 },
    Rejoin { peer: u64 },
}

struct Remote {
    has: Vec<bool>,
    claims: Vec<bool>,
    per_piece: Duration,
    free_at: Instant,
    bad: bool,
    stalling: bool,
    key: PeerKey,
    connected: bool,
}

struct Drive {
    p: DriveParams,
    c: Checked,
    rng: StdRng,
    remotes: Vec<Remote>,
    events: BinaryHeap<Reverse<(Instant, u64, Ev)>>,
    seq: u64,
    now: Instant,
    next_key: u64,
    /// Live request generation per (key, piece); a cancelled request's Done is ignored.
    live: BTreeMap<(PeerKey, u32), u64>,
    steps: u64,
    start: Instant,
}

impl Drive {
    fn new(p: DriveParams) -> Self {
        let mut rng = StdRng::seed_from_u64(p.seed ^ 0x5eed);
        let n = p.pieces;
        let now = Instant::now();
        let cfg = SchedulerConfig { request_timeout: ms(100), ..SchedulerConfig::default() };
        let mut c = Checked::new(cfg, Bitfield::new(n), p.seed);
        c.full_checks = false;
        c.model_checks = p.model_checks;
        let mut remotes = Vec::new();
        for r in 0..p.peers {
            let seed = r < p.seeds.max(1);
            let density = rng.gen_range(0.05..0.6);
            let has: Vec<bool> = (0..n).map(|_| seed || rng.gen_bool(density)).collect();
            let claims = has.iter().map(|&h| h || (!seed && rng.gen_bool(p.p_lie))).collect();
            remotes.push(Remote {
                has,
                claims,
                per_piece: Duration::from_micros(rng.gen_range(500..20_000)),
                free_at: now,
                bad: r >= p.seeds.max(1) && r < p.seeds.max(1) + p.bad,
                stalling: r >= p.seeds.max(1) + p.bad && r < p.seeds.max(1) + p.bad + p.stalling,
                key: k(r),
                connected: true,
            });
        }
        let mut d = Self {
            p,
            c,
            rng,
            remotes,
            events: BinaryHeap::new(),
            seq: 0,
            now,
            next_key: 0,
            live: BTreeMap::new(),
            steps: 0,
            start: now,
        };
        d.next_key = d.p.peers;
        for r in 0..d.remotes.len() {
            d.connect(r as u64);
        }
        d
    }

    fn push(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, ev)));
    }

    fn connect(&mut self, r: u64) {
        let n = self.p.pieces;
        let key = self.remotes[r as usize].key;
        let claims = bf(n, (0..n).filter(|&i| self.remotes[r as usize].claims[i as usize]));
        let now = self.now;
        let mut acts = self.c.add_peer(key, now);
        acts.extend(self.c.bitfield(key, &claims, now));
        self.apply(acts);
        // Partial peers keep gaining pieces.
        if !self.remotes[r as usize].has.iter().all(|&h| h) {
            for _ in 0..4 {
                let piece = self.rng.gen_range(0..n);
                let at = now + Duration::from_millis(self.rng.gen_range(1..2_000));
                self.push(at, Ev::Gain { peer: r, piece });
            }
        }
    }

    fn remote_of(&self, key: PeerKey) -> Option<usize> {
        self.remotes.iter().position(|r| r.key == key && r.connected)
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Request { peer, piece } => {
                    let Some(r) = self.remote_of(peer) else { panic!("request to disconnected {peer:?}") };
                    self.seq += 1;
                    let generation = self.seq;
                    self.live.insert((peer, piece), generation);
                    let roll: f64 = self.rng.gen_range(0.0..1.0);
                    let now = self.now;
                    let remote = &mut self.remotes[r];
                    if remote.stalling {
                        continue;
                    }
                    let (at, ev) =
                        if roll < self.p.p_busy || roll < self.p.p_busy + self.p.p_error || !remote.has[piece as usize]
                        {
                            (now + ms(1), Ev::Done { peer: r as u64, piece, generation })
                        } else {
                            remote.free_at = remote.free_at.max(now) + remote.per_piece;
                            (remote.free_at, Ev::Done { peer: r as u64, piece, generation })
                        };
                    self.push(at, ev);
                }
                Action::Cancel { peer, piece } => {
                    assert!(self.live.remove(&(peer, piece)).is_some());
                }
                Action::DropPeer { peer, .. } => {
                    self.live.retain(|&(p, _), _| p != peer);
                    if let Some(r) = self.remote_of(peer) {
                        self.remotes[r].connected = false;
                    }
                }
                Action::Have { .. } | Action::Complete => {}
            }
        }
    }

    fn step(&mut self) -> bool {
        let ev_at = self.events.peek().map(|Reverse((t, _, _))| *t);
        let timer = self.c.s.poll_timeout();
        let acts = match (ev_at, timer) {
            (None, None) => return false,
            (e, Some(t)) if e.is_none_or(|e| t <= e) => {
                self.now = self.now.max(t);
                self.c.timeout(self.now)
            }
            _ => {
                let Some(Reverse((t, _, ev))) = self.events.pop() else { return false };
                self.now = self.now.max(t);
                self.event(ev)
            }
        };
        self.apply(acts);
        self.steps += 1;
        if self.p.churn_every > 0 && self.steps.is_multiple_of(self.p.churn_every) {
            self.churn();
        }
        if self.p.full_check_every > 0
            && self.steps.is_multiple_of(self.p.full_check_every)
            && let Err(e) = self.c.s.check_invariants()
        {
            panic!("step {}: {e}", self.steps);
        }
        true
    }

    fn event(&mut self, ev: Ev) -> Vec<Action> {
        let now = self.now;
        match ev {
            Ev::Done { peer, piece, generation } => {
                let r = peer as usize;
                let key = self.remotes[r].key;
                if !self.remotes[r].connected || self.live.get(&(key, piece)) != Some(&generation) {
                    return Vec::new(); // cancelled or disconnected
                }
                self.live.remove(&(key, piece));
                let roll: f64 = self.rng.gen_range(0.0..1.0);
                let remote = &self.remotes[r];
                if !remote.has[piece as usize] {
                    self.c.request_failed(key, piece, RequestFailure::Missing, now)
                } else if roll < self.p.p_busy {
                    self.c.request_failed(key, piece, RequestFailure::Busy, now)
                } else if roll < self.p.p_busy + self.p.p_error {
                    self.c.request_failed(key, piece, RequestFailure::Error, now)
                } else if remote.bad && self.rng.gen_bool(0.5) {
                    self.c.failed(key, piece, now)
                } else {
                    self.c.verified(key, piece, now)
                }
            }
            Ev::Gain { peer, piece } => {
                let r = peer as usize;
                self.remotes[r].has[piece as usize] = true;
                self.remotes[r].claims[piece as usize] = true;
                if self.remotes[r].connected { self.c.peer_have(self.remotes[r].key, piece, now) } else { Vec::new() }
            }
            Ev::Rejoin { peer } => {
                let r = peer as usize;
                if self.remotes[r].connected || self.remotes[r].bad {
                    return Vec::new();
                }
                self.next_key += 1;
                self.remotes[r].key = k(self.next_key);
                self.remotes[r].connected = true;
                self.remotes[r].free_at = now;
                self.connect(peer);
                Vec::new()
            }
        }
    }

    fn churn(&mut self) {
        // Never the first seed, so the drive can always finish.
        let r = self.rng.gen_range(1..self.remotes.len().max(2)) as u64;
        let Some(remote) = self.remotes.get(r as usize) else { return };
        if !remote.connected {
            return;
        }
        let key = remote.key;
        self.remotes[r as usize].connected = false;
        self.live.retain(|&(p, _), _| p != key);
        let acts = self.c.remove_peer(key, self.now);
        self.apply(acts);
        let at = self.now + ms(self.rng.gen_range(1..500));
        self.push(at, Ev::Rejoin { peer: r });
    }

    fn run(&mut self) {
        while !self.c.s.is_complete() {
            assert!(self.step(), "stuck: nothing scheduled and not complete");
            assert!(self.steps < 50_000_000, "runaway");
        }
    }
}

#[test]
fn drive_small_swarm_with_faults_checking_everything() {
    let mut timeouts = 0;
    for seed in 0..4 {
        let mut d = Drive::new(DriveParams { pieces: 300, peers: 12, seed, ..DriveParams::default() });
        d.run();
        assert_eq!(d.c.completes, 1);
        assert!(d.c.outstanding.is_empty());
        let st = d.c.s.stats();
        assert_eq!(st.verified, 300);
        let stalled = requests(&d.c.log).iter().filter(|(p, _)| *p == k(3)).count();
        println!("seed {seed}: {:?} virtual, {stalled} requests to the staller, {st:?}", d.now - d.start);
        timeouts += st.timeouts;
    }
    assert!(timeouts > 0, "the stalling peer's requests time out");
}

/// The sized test: 4,096 pieces from 50 peers (seeds, partial peers that keep gaining
/// pieces, a bad peer, a stalling peer, busy/error/missing rejects, churn), with the
/// model checks after every event and the full invariant check every 16 events.
#[test]
fn drive_4096_pieces_from_50_peers() {
    let mut d = Drive::new(DriveParams {
        pieces: 4096,
        peers: 50,
        seed: 42,
        seeds: 3,
        full_check_every: 16,
        churn_every: 500,
        ..DriveParams::default()
    });
    d.run();
    assert_eq!(d.c.completes, 1);
    let st = d.c.s.stats();
    assert_eq!(st.verified, 4096);
    assert!(st.requests >= 4096);
    if let Err(e) = d.c.s.check_invariants() {
        panic!("{e}");
    }
    println!("4096x50 drive: {} steps, {st:?}", d.steps);
}

/// Measures a clean 1,024-piece, 30-peer drive (run with `--release -- --nocapture`).
#[test]
fn drive_1024_pieces_from_30_peers_timing() {
    let params = DriveParams {
        pieces: 1024,
        peers: 30,
        seed: 7,
        seeds: 2,
        bad: 0,
        stalling: 0,
        p_busy: 0.0,
        p_error: 0.0,
        p_lie: 0.0,
        churn_every: 0,
        full_check_every: 0,
        model_checks: false,
    };
    let runs = 20;
    let start = std::time::Instant::now();
    let mut steps = 0;
    for seed in 0..runs {
        let mut d = Drive::new(DriveParams { seed, ..params.clone() });
        d.run();
        assert_eq!(d.c.s.stats().verified, 1024);
        steps += d.steps;
    }
    let per = start.elapsed() / runs as u32;
    println!("1024x30 drive (scheduler + test driver): {per:?} per run, {} events per run", steps / runs);
}

// ---------------------------------------------------------------- simulated swarm

const SWARM_LATENCY: Duration = Duration::from_millis(1);
const SWARM_PIECE_TIME: Duration = Duration::from_millis(10);

/// A message in flight in the simulated swarm, delivered at its time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Msg {
    /// `to` receives a request from `from`.
    Request {
        from: usize,
        to: usize,
        piece: u32,
    },
    /// `to` receives a reject from `from`.
    Reject {
        from: usize,
        to: usize,
        piece: u32,
        busy: bool,
    },
    /// `from` finished uploading its current piece.
    UploadDone {
        from: usize,
    },
    /// `to` has received all bytes of `piece` from `from`.
    Piece {
        from: usize,
        to: usize,
        piece: u32,
    },
    Cancel {
        from: usize,
        to: usize,
        piece: u32,
    },
    Have {
        from: usize,
        to: usize,
        piece: u32,
    },
    Timer {
        node: usize,
    },
    /// Node 0 has fetched `piece` from the upstream registry.
    Upstream {
        piece: u32,
    },
}

struct SwarmNode {
    c: Checked,
    /// Upload queue: (requester, piece), served one at a time.
    queue: std::collections::VecDeque<(usize, u32)>,
    uploading: Option<(usize, u32)>,
    /// The current upload was cancelled: its bytes are dropped when done.
    upload_cancelled: bool,
    uploaded: u64,
    done_at: Option<Duration>,
    armed: Option<Instant>,
}

/// A tiny network of nodes, each with its own scheduler (node index = peer key).
struct Swarm {
    nodes: Vec<SwarmNode>,
    q: BinaryHeap<Reverse<(Instant, u64, Msg)>>,
    seq: u64,
    now: Instant,
    start: Instant,
    /// Requests an uploader queues before answering `Busy`.
    max_queue: usize,
}

impl Swarm {
    /// Node 0 starts with every piece, or, with `upstream`, fetches one piece per
    /// `upstream` period from outside the swarm (`local_piece`), in a random order.
    fn new(
        n: u32,
        size: usize,
        cfg: &SchedulerConfig,
        max_queue: usize,
        seed: u64,
        upstream: Option<Duration>,
    ) -> Self {
        let start = Instant::now();
        let nodes = (0..size)
            .map(|i| {
                let have = if i == 0 && upstream.is_none() { Bitfield::full(n) } else { Bitfield::new(n) };
                SwarmNode {
                    c: Checked::new(cfg.clone(), have, seed * 100 + i as u64),
                    queue: Default::default(),
                    uploading: None,
                    upload_cancelled: false,
                    uploaded: 0,
                    done_at: None,
                    armed: None,
                }
            })
            .collect();
        let mut s = Self { nodes, q: BinaryHeap::new(), seq: 0, now: start, start, max_queue };
        if let Some(period) = upstream {
            let mut order: Vec<u32> = (0..n).collect();
            rand::seq::SliceRandom::shuffle(&mut order[..], &mut StdRng::seed_from_u64(seed));
            for (j, piece) in order.into_iter().enumerate() {
                s.push(start + period * (j as u32 + 1), Msg::Upstream { piece });
            }
        }
        // Everyone connects to everyone and sends its bitfield.
        for i in 0..size {
            for j in (0..size).filter(|&j| j != i) {
                s.nodes[i].c.add_peer(k(j as u64), start);
            }
        }
        for i in 0..size {
            for j in (0..size).filter(|&j| j != i) {
                let bits = s.nodes[j].c.s.have().clone();
                let acts = s.nodes[i].c.bitfield(k(j as u64), &bits, start);
                s.send(i, acts);
            }
        }
        s
    }

    fn push(&mut self, at: Instant, m: Msg) {
        self.seq += 1;
        self.q.push(Reverse((at, self.seq, m)));
    }

    fn send(&mut self, node: usize, acts: Vec<Action>) {
        let at = self.now + SWARM_LATENCY;
        for a in acts {
            match a {
                Action::Request { peer, piece } => {
                    self.push(at, Msg::Request { from: node, to: peer.0 as usize, piece })
                }
                Action::Cancel { peer, piece } => self.push(at, Msg::Cancel { from: node, to: peer.0 as usize, piece }),
                Action::Have { piece } => {
                    for to in (0..self.nodes.len()).filter(|&to| to != node) {
                        self.push(at, Msg::Have { from: node, to, piece });
                    }
                }
                Action::DropPeer { .. } => panic!("nobody sends bad pieces here"),
                Action::Complete => {
                    let done = self.now - self.start;
                    self.nodes[node].done_at.get_or_insert(done);
                }
            }
        }
        self.arm(node);
    }

    /// Keeps one timer message per node at its scheduler's poll_timeout.
    fn arm(&mut self, node: usize) {
        let want = self.nodes[node].c.s.poll_timeout();
        if want != self.nodes[node].armed {
            self.nodes[node].armed = want;
            if let Some(t) = want {
                self.push(t, Msg::Timer { node });
            }
        }
    }

    fn start_upload(&mut self, node: usize) {
        let up = &mut self.nodes[node];
        if up.uploading.is_none()
            && let Some(job) = up.queue.pop_front()
        {
            up.uploading = Some(job);
            up.upload_cancelled = false;
            let at = self.now + SWARM_PIECE_TIME;
            self.push(at, Msg::UploadDone { from: node });
        }
    }

    fn step(&mut self) -> bool {
        let Some(Reverse((t, _, msg))) = self.q.pop() else { return false };
        self.now = self.now.max(t);
        let now = self.now;
        match msg {
            Msg::Request { from, to, piece } => {
                let up = &mut self.nodes[to];
                if !up.c.s.have().get(piece) || up.queue.len() >= self.max_queue {
                    let busy = up.c.s.have().get(piece);
                    self.push(now + SWARM_LATENCY, Msg::Reject { from: to, to: from, piece, busy });
                } else {
                    up.queue.push_back((from, piece));
                    self.start_upload(to);
                }
            }
            Msg::Cancel { from, to, piece } => {
                let up = &mut self.nodes[to];
                let before = up.queue.len();
                up.queue.retain(|&(f, p)| (f, p) != (from, piece));
                if up.queue.len() == before && up.uploading == Some((from, piece)) {
                    up.upload_cancelled = true;
                }
            }
            Msg::UploadDone { from } => {
                let up = &mut self.nodes[from];
                if let Some((to, piece)) = up.uploading.take() {
                    up.uploaded += 1;
                    if !up.upload_cancelled {
                        self.push(now + SWARM_LATENCY, Msg::Piece { from, to, piece });
                    }
                }
                self.start_upload(from);
            }
            Msg::Piece { from, to, piece } => {
                let acts = self.nodes[to].c.verified(k(from as u64), piece, now);
                self.send(to, acts);
            }
            Msg::Reject { from, to, piece, busy } => {
                let why = if busy { RequestFailure::Busy } else { RequestFailure::Missing };
                let acts = self.nodes[to].c.request_failed(k(from as u64), piece, why, now);
                self.send(to, acts);
            }
            Msg::Have { from, to, piece } => {
                let acts = self.nodes[to].c.peer_have(k(from as u64), piece, now);
                self.send(to, acts);
            }
            Msg::Upstream { piece } => {
                let acts = self.nodes[0].c.local(piece, now);
                self.send(0, acts);
            }
            Msg::Timer { node } => {
                if self.nodes[node].armed == Some(t) {
                    self.nodes[node].armed = None;
                    let acts = self.nodes[node].c.timeout(now);
                    self.send(node, acts);
                }
            }
        }
        true
    }
}

struct SwarmResult {
    /// Last leecher's completion over T_min.
    ratio: f64,
    uploads: u64,
    seed_uploads: u64,
}

fn run_swarm(
    n: u32,
    size: usize,
    cfg: &SchedulerConfig,
    max_queue: usize,
    seed: u64,
    upstream: Option<Duration>,
) -> SwarmResult {
    let mut swarm = Swarm::new(n, size, cfg, max_queue, seed, upstream);
    let mut events = 0u64;
    while !swarm.nodes.iter().all(|nd| nd.c.s.is_complete()) {
        assert!(swarm.step(), "swarm stuck");
        events += 1;
        assert!(events < 2_000_000);
    }
    for nd in &swarm.nodes {
        assert_eq!(nd.c.completes, 1);
        assert!(nd.c.outstanding.is_empty());
        if let Err(e) = nd.c.s.check_invariants() {
            panic!("{e}");
        }
    }
    let t_min = upstream.unwrap_or(Duration::ZERO).max(SWARM_PIECE_TIME) * n;
    let last = swarm.nodes.iter().filter_map(|nd| nd.done_at).max().expect("leechers finished");
    let r = SwarmResult {
        ratio: last.as_secs_f64() / t_min.as_secs_f64(),
        uploads: swarm.nodes.iter().map(|nd| nd.uploaded).sum(),
        seed_uploads: swarm.nodes[0].uploaded,
    };
    println!(
        "swarm of {size}, queue {max_queue}, busy backoff {:?}, upstream {upstream:?}, seed {seed}: last done at {:.2} x T_min, {} uploads for {} pieces needed, seed uploaded {}",
        cfg.busy_backoff,
        r.ratio,
        r.uploads,
        (size as u64 - 1) * u64::from(n),
        r.seed_uploads
    );
    r
}

/// 1 seed + 8 leechers, each with its own Scheduler, in a tiny virtual-time network:
/// every node uploads one piece at a time (FIFO queue, `Busy` beyond 16 queued),
/// every message takes 1 ms. All nodes complete, close to the Kumar–Ross bound
/// (here `pieces × piece time`, the seed's upload), with little wasted transfer, and
/// the leechers do most of the uploading.
#[test]
fn simulated_swarm_of_nine_completes() {
    let n: u32 = 128;
    let wanted = 8 * u64::from(n);
    for seed in 0..3 {
        let r = run_swarm(n, 9, &SchedulerConfig::default(), 16, seed, None);
        // The seed's upload is the bottleneck; what is lost is the seed sending a
        // piece twice when two leechers pick the same seed-only piece while their
        // requests wait in its queue. A scheduler that did not trade (8 x T_min) or
        // picked in the same order everywhere (the seed sends each piece several
        // times) fails these.
        assert!(r.ratio < 1.6, "{} x T_min", r.ratio);
        assert!(r.seed_uploads < u64::from(n) * 8 / 5, "seed uploaded {}", r.seed_uploads);
        assert!(r.uploads <= wanted + wanted / 20, "little waste: {} uploads for {wanted}", r.uploads);
    }
}

/// The same swarm with short upload queues and a short busy backoff: requests wait
/// less at the seed, so fewer leechers collide on the same seed-only piece.
#[test]
fn simulated_swarm_with_short_queues_nears_the_bound() {
    let n: u32 = 128;
    let cfg = SchedulerConfig { busy_backoff: ms(50), queue_time: ms(300), ..SchedulerConfig::default() };
    for seed in 0..3 {
        let r = run_swarm(n, 9, &cfg, 4, seed, None);
        assert!(r.ratio < 1.3, "{} x T_min", r.ratio);
    }
}

/// Cut-through: node 0 fetches the blob from upstream at half its upload rate and
/// the pieces flow on while the rest is still arriving.
#[test]
fn simulated_swarm_from_upstream_cuts_through() {
    let n: u32 = 128;
    let upstream = Some(SWARM_PIECE_TIME * 2);
    for (cfg, queue) in
        [(SchedulerConfig::default(), 16), (SchedulerConfig { busy_backoff: ms(50), ..SchedulerConfig::default() }, 4)]
    {
        for seed in 0..3 {
            let r = run_swarm(n, 9, &cfg, queue, seed, upstream);
            assert!(r.ratio < 1.2, "{} x T_min", r.ratio);
        }
    }
}
