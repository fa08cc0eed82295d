//! One blob's swarm on one node: everything the node decides about that blob besides
//! its uploads (see [`crate::upload`]). It owns the piece [`Scheduler`] and, around
//! it, the peer set (keys, one connection per peer, dial choice and back-off, bans),
//! the announce cadence, the piece-hash knowledge of a blob still streaming in from
//! upstream (the hash sync and the `Have`s deferred until a hash is known), who gets
//! a `Have`, the lease holder's flag and the blob's end (whole-blob check, lease
//! release, the announce as a seed).
//!
//! Sans-IO like the scheduler: the driver reports what happened (`connected`,
//! `bitfield`, `have`, `piece_*`, `announced`, `hashes`, `blob_checked`, ...) with
//! `now`, then takes [`SwarmAction`]s from [`Swarm::poll_action`] and carries them
//! out, and calls [`Swarm::handle_timeout`] at [`Swarm::poll_timeout`]. The daemon
//! (`swarm_peer::node`) drives it with QUIC streams and the tracker client; the
//! simulator drives it over modelled links.
//!
//! # Rules
//!
//! - **Dialling.** After each tracker reply the node dials up to `max_peers −
//!   connected − dialling` of the offered peers, chosen by [`choose_peers`] (same
//!   zone, seeds and fuller peers preferred), skipping itself, peers already
//!   connected, addresses being dialled, addresses whose dial failed less than
//!   [`CONNECT_BACKOFF`] ago, and banned peers. A complete blob (a seed) never dials:
//!   it only answers. Inbound connections are always accepted (bounds on them are the
//!   hardening issue's).
//! - **One connection per peer.** When two nodes dial each other at once, both keep
//!   the connection opened by the smaller peer id and close the other.
//! - **Bans.** A peer the scheduler drops for bad pieces is banned for this blob:
//!   never dialled or accepted again.
//! - **Announces.** At start, then after each reply: every [`EAGER_ANNOUNCE`](crate::node::EAGER_ANNOUNCE) while
//!   the swarm has fewer than `max_peers / 2` peers and the blob is incomplete, else
//!   at the tracker's interval; after a failure every [`EAGER_ANNOUNCE`](crate::node::EAGER_ANNOUNCE); at once when
//!   the blob became whole and checked (so the tracker lists a new seed).
//! - **Hashes.** A blob streaming in from upstream has piece hashes only up to what
//!   the lease holder published. A `Have` (or bitfield bit) of a piece whose hash is
//!   not known yet is deferred and replayed once it is; deferred entries form a set
//!   (a repeated `Have` adds nothing), so they are at most peers × pieces. A node that
//!   is not the holder asks the tracker for new hashes whenever it lacks some: at once
//!   after an answer that brought new ones (the tracker holds a request until the
//!   next publish), after [`HASH_SYNC`] otherwise. An answer saying the tracker
//!   forgot the blob means the upstream fetch failed: the download is abandoned.
//! - **`Have`s** go to every connected peer that has not itself announced the piece.
//! - **Hashes travel peer to peer** (protocol version 2). Before its bitfield and
//!   before each `Have`, a node sends a version-2 peer the piece hashes it learned
//!   since it last sent that peer any ([`Swarm::hashes_for`], [`HaveTo`]), so whoever
//!   learns of a piece can verify it, and the hashes the lease holder publishes reach
//!   every node through the swarm, tracker or not. A node whose peers all speak
//!   version 2 stops asking the tracker for hashes (the tracker keeps a copy for late
//!   joiners and version-1 peers). A hash that conflicts with one already known
//!   closes and bans the peer that sent it. A blob that fails its whole-blob check is
//!   abandoned: its pieces and the hashes learned with them are dropped, and the next
//!   request fetches it afresh.
//! - **Peer exchange** (version 2). When a version-2 peer connects, it is sent up to
//!   `max_peers` (at most [`MAX_PEX_PEERS`]) of the swarm's other peers; peers offered this way are dialled
//!   by the same rule as the tracker's, so a swarm keeps growing without a tracker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use swarm_proto::msg::{MAX_PEX_PEERS, PeerInfo};
use swarm_proto::{Bitfield, PeerId};

use crate::node::{CONNECT_BACKOFF, HASH_SYNC, NodePolicy};
use crate::scheduler::{Action, Candidate, DropReason, PeerKey, RequestFailure, Scheduler, choose_peers};

/// What the driver must do for a swarm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwarmAction {
    /// Ask `peer` for `piece` (a piece stream).
    Request { peer: PeerKey, piece: u32 },
    /// Abandon the outstanding request of `piece` to `peer`.
    Cancel { peer: PeerKey, piece: u32 },
    /// `piece` is now held: send a `Have` to each of [`Swarm::have_recipients`]
    /// (with the hashes it names first).
    Have { piece: u32 },
    /// Send `peer` the piece hashes `range` (then, for a new connection, the bitfield).
    SendHashes { peer: PeerKey, range: HashRange },
    /// Send `peer` these peers of the blob (peer exchange).
    SendPeers { peer: PeerKey, peers: Vec<PeerInfo> },
    /// Dial `addr` for this blob.
    Dial { addr: SocketAddr },
    /// Close the connection of `peer`; the swarm has already forgotten it.
    Close { peer: PeerKey, reason: CloseReason },
    /// Announce to the tracker (see [`Swarm::announce_state`]); report the answer
    /// with [`Swarm::announced`].
    Announce,
    /// Ask the tracker for the piece hashes from `first` on; report the answer with
    /// [`Swarm::hashes`].
    GetHashes { first: u32 },
    /// Every piece is in: check the whole blob against its digest and report with
    /// [`Swarm::blob_checked`]. Emitted once.
    CheckBlob,
    /// Give the upstream lease back (the blob is whole, or `failed` says why not).
    ReleaseLease { failed: Option<String> },
    /// Give up this download: the upstream fetch it waited on failed.
    Abandon { reason: String },
}

/// Why the swarm closes a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer sent too many pieces that failed their hash; it is banned.
    BadPieces,
    /// A second connection to the same peer won (see the module docs).
    Duplicate,
    /// The peer sent a piece hash that conflicts with a known one; it is banned.
    BadHashes,
}

/// Piece hashes to send: pieces `first..first + count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashRange {
    pub first: u32,
    pub count: u32,
}

/// One recipient of a `Have`: send it `hashes` first, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HaveTo {
    pub peer: PeerKey,
    pub hashes: Option<HashRange>,
}

/// A connection whose handshake succeeded, as the driver reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerConn {
    pub peer_id: PeerId,
    /// The peer's address: the one dialled, or where an inbound connection came from.
    pub addr: SocketAddr,
    /// Whether this node dialled it.
    pub outbound: bool,
    /// The protocol version the connection settled on.
    pub version: u32,
}

/// What became of piece hashes a peer sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerHashes {
    /// Stored: the node now knows the hashes of pieces `0..known`. (The sender is not
    /// marked as knowing them: at worst this node sends it some again, 32 bytes each,
    /// which costs less than the bookkeeping on every `Have`.)
    Stored { known: u32 },
    /// One conflicts with a hash already known (or leaves a gap, or names another
    /// layout).
    Conflict,
}

/// Why a new connection is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The connection leads back to this node.
    ToSelf,
    /// The peer is banned for bad pieces.
    Banned,
    /// The existing connection to that peer wins.
    Duplicate,
}

/// How a piece request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PieceOutcome {
    /// The bytes matched the piece's hash and are stored.
    Verified,
    /// The bytes did not match the piece's hash.
    BadPiece,
    /// The peer refused it (busy, or it does not have it).
    Rejected(RequestFailure),
    /// The stream or the connection failed.
    Failed,
}

/// What the tracker said to an announce.
#[derive(Clone, Debug)]
pub enum AnnounceReply<'a> {
    /// Peers of the blob, and when to announce next.
    Peers { peers: &'a [PeerInfo], interval: Duration },
    /// The announce failed.
    Failed,
}

/// What a request for piece hashes brought.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashesReply {
    /// The node now knows the hashes of pieces `0..known`.
    Known(u32),
    /// The tracker knows nothing of the blob: its upstream fetch failed.
    Forgotten,
    /// The request failed.
    Failed,
}

/// What an announce says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnnounceState {
    /// Pieces held.
    pub have: u32,
    /// The blob is whole and checked.
    pub complete: bool,
    /// Peers wanted in the reply.
    pub num_want: u32,
}

#[derive(Clone, Copy, Debug)]
struct Peer {
    peer_id: PeerId,
    outbound: bool,
    addr: SocketAddr,
    /// Speaks version 2: piece hashes and peer exchange.
    exchange: bool,
    /// The peer knows (or was sent) the hashes of pieces `0..hashes_sent`.
    hashes_sent: u32,
}

/// One blob's swarm on one node. See the module docs.
pub struct Swarm {
    me: PeerId,
    zone: String,
    policy: NodePolicy,
    scheduler: Scheduler,
    rng: StdRng,
    pieces: u32,
    started: bool,
    peers: BTreeMap<PeerKey, Peer>,
    by_id: HashMap<PeerId, PeerKey>,
    next_key: u64,
    dialling: BTreeSet<SocketAddr>,
    /// Addresses whose dial failed, and when (forgotten after [`CONNECT_BACKOFF`]).
    failed: BTreeMap<SocketAddr, Instant>,
    banned: BTreeSet<PeerId>,
    /// Connected peers that speak only version 1 (no hashes from them).
    v1_peers: usize,
    next_announce: Instant,
    announcing: bool,
    /// Piece hashes known: pieces `0..known`.
    known: u32,
    deferred: BTreeSet<(PeerKey, u32)>,
    syncing: bool,
    next_sync: Instant,
    lease_holder: bool,
    checking: bool,
    checked: bool,
    actions: std::collections::VecDeque<SwarmAction>,
}

impl Swarm {
    /// A swarm for a blob of `have.len()` pieces of `piece_length` bytes, of which
    /// `have` are held and the hashes of `0..known` are known. `seed` seeds its
    /// random choices. Nothing happens until [`Swarm::start`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: PeerId,
        zone: String,
        policy: &NodePolicy,
        piece_length: u32,
        have: Bitfield,
        known: u32,
        seed: u64,
        now: Instant,
    ) -> Self {
        let pieces = have.len();
        let mut rng = StdRng::seed_from_u64(seed);
        let scheduler = Scheduler::new(policy.scheduler.clone(), piece_length, have, rand::Rng::r#gen(&mut rng));
        Self {
            me,
            zone,
            policy: policy.clone(),
            scheduler,
            rng,
            pieces,
            started: false,
            peers: BTreeMap::new(),
            by_id: HashMap::new(),
            next_key: 0,
            dialling: BTreeSet::new(),
            failed: BTreeMap::new(),
            banned: BTreeSet::new(),
            v1_peers: 0,
            next_announce: now,
            announcing: false,
            known: known.min(pieces),
            deferred: BTreeSet::new(),
            syncing: false,
            next_sync: now,
            lease_holder: false,
            checking: false,
            checked: false,
            actions: std::collections::VecDeque::new(),
        }
    }

    /// The swarm starts: it announces at once, asks for missing hashes, and checks a
    /// blob that is already whole.
    pub fn start(&mut self, now: Instant) {
        if self.started {
            return;
        }
        self.started = true;
        self.next_announce = now;
        self.next_sync = now;
        self.drain_scheduler();
        if self.scheduler.is_complete() {
            self.begin_check();
        }
        self.handle_timeout(now);
    }

    /// This node holds the blob's upstream lease: it publishes hashes rather than
    /// asking for them, and gives the lease back when the blob is whole.
    pub fn hold_lease(&mut self) {
        self.lease_holder = true;
    }

    /// Whether this node holds the blob's upstream lease.
    pub fn is_lease_holder(&self) -> bool {
        self.lease_holder
    }

    // ----------------------------------------------------------------- peers

    /// A connection is up. Returns the key the swarm knows the peer by, or why it is
    /// refused (then close it). A duplicate it replaces is closed through
    /// [`SwarmAction::Close`]. A version-2 peer is sent the hashes this node knows
    /// and the other peers of the swarm; the driver sends the bitfield after them.
    pub fn connected(&mut self, conn: PeerConn, now: Instant) -> Result<PeerKey, Refused> {
        let PeerConn { peer_id, addr, outbound, version } = conn;
        if outbound {
            self.dialling.remove(&addr);
        }
        if peer_id == self.me {
            return Err(Refused::ToSelf);
        }
        if self.banned.contains(&peer_id) {
            return Err(Refused::Banned);
        }
        if let Some(&existing) = self.by_id.get(&peer_id) {
            // Simultaneous connections: keep the one opened by the smaller peer id.
            let opener = |outbound: bool| if outbound { self.me } else { peer_id };
            let existing_opener = self.peers.get(&existing).map_or(peer_id, |p| opener(p.outbound));
            if opener(outbound) >= existing_opener {
                return Err(Refused::Duplicate);
            }
            self.forget_peer(existing, now);
            self.actions.push_back(SwarmAction::Close { peer: existing, reason: CloseReason::Duplicate });
        }
        let key = PeerKey(self.next_key);
        self.next_key += 1;
        let exchange = version >= 2;
        if exchange {
            let others: Vec<PeerInfo> = self
                .peers
                .values()
                .take(self.policy.max_peers.min(MAX_PEX_PEERS))
                .map(|p| PeerInfo { peer_id: p.peer_id, addr: p.addr, zone: String::new(), have: 0, complete: false })
                .collect();
            if !others.is_empty() {
                self.actions.push_back(SwarmAction::SendPeers { peer: key, peers: others });
            }
        } else {
            self.v1_peers += 1;
        }
        self.peers.insert(key, Peer { peer_id, outbound, addr, exchange, hashes_sent: 0 });
        self.by_id.insert(peer_id, key);
        if let Some(range) = self.hashes_for(key) {
            self.actions.push_back(SwarmAction::SendHashes { peer: key, range });
        }
        self.scheduler.add_peer(key, now);
        self.drain_scheduler();
        Ok(key)
    }

    /// The hashes to send `peer` before a bitfield or a `Have`: those it has not
    /// been sent (version-2 peers only). Counts them as sent.
    pub fn hashes_for(&mut self, peer: PeerKey) -> Option<HashRange> {
        let known = self.known;
        let p = self.peers.get_mut(&peer)?;
        Self::take_hashes(p, known)
    }

    fn take_hashes(p: &mut Peer, known: u32) -> Option<HashRange> {
        if !p.exchange || p.hashes_sent >= known {
            return None;
        }
        let range = HashRange { first: p.hashes_sent, count: known - p.hashes_sent };
        p.hashes_sent = known;
        Some(range)
    }

    /// `peer` sent piece hashes; the driver checked them against what it knows.
    pub fn peer_hashes(&mut self, peer: PeerKey, outcome: PeerHashes, now: Instant) {
        match outcome {
            PeerHashes::Stored { known } => self.hashes_known(known, now),
            PeerHashes::Conflict => {
                if let Some(p) = self.peers.get(&peer) {
                    self.banned.insert(p.peer_id);
                }
                self.forget_peer(peer, now);
                self.actions.push_back(SwarmAction::Close { peer, reason: CloseReason::BadHashes });
                self.drain_scheduler();
            }
        }
    }

    /// A peer told this node about other peers of the blob (peer exchange): they
    /// are dialled like the tracker's offers.
    pub fn peers_offered(&mut self, peers: &[PeerInfo], now: Instant) {
        if self.started {
            self.dial(peers, now);
        }
    }

    /// A dial of `addr` failed: not again for [`CONNECT_BACKOFF`].
    pub fn dial_failed(&mut self, addr: SocketAddr, now: Instant) {
        self.dialling.remove(&addr);
        self.failed.insert(addr, now);
    }

    /// The connection of `peer` closed.
    pub fn closed(&mut self, peer: PeerKey, now: Instant) {
        self.forget_peer(peer, now);
        self.drain_scheduler();
    }

    fn forget_peer(&mut self, peer: PeerKey, now: Instant) {
        let Some(p) = self.peers.remove(&peer) else { return };
        if !p.exchange {
            self.v1_peers -= 1;
        }
        if self.by_id.get(&p.peer_id) == Some(&peer) {
            self.by_id.remove(&p.peer_id);
        }
        self.deferred.retain(|&(k, _)| k != peer);
        self.scheduler.remove_peer(peer, now);
    }

    /// The peer's bitfield arrived. Bits of pieces without a known hash wait.
    pub fn bitfield(&mut self, peer: PeerKey, mut bits: Bitfield, now: Instant) {
        if !self.peers.contains_key(&peer) {
            return;
        }
        let unknown: Vec<u32> = bits.ones().filter(|&p| p >= self.known).collect();
        for piece in unknown {
            bits.set(piece, false);
            self.deferred.insert((peer, piece));
        }
        self.scheduler.peer_bitfield(peer, &bits, now);
        self.drain_scheduler();
    }

    /// The peer announced `piece`. Returns whether the swarm acted on it at once (it
    /// waits while the piece's hash is unknown).
    pub fn have(&mut self, peer: PeerKey, piece: u32, now: Instant) -> bool {
        if piece >= self.pieces {
            return false;
        }
        if piece >= self.known {
            if self.peers.contains_key(&peer) {
                self.deferred.insert((peer, piece));
            }
            return false;
        }
        // The scheduler ignores a peer it does not know (one already closed).
        self.scheduler.peer_have(peer, piece, now);
        self.drain_scheduler();
        true
    }

    /// Reads what [`Swarm::have`] of `piece` from `peer` reads first and returns a
    /// value made of it; changes nothing. A driver that hands one `Have` to many nodes'
    /// swarms at once calls this for all of them before the `have`s: the reads of
    /// different nodes are independent, so the CPU overlaps their cache misses instead
    /// of waiting for each in turn (the simulator at 10,000 nodes, whose swarms do not
    /// fit in any cache). Pass the result to `std::hint::black_box`.
    pub fn warm_have(&self, peer: PeerKey, piece: u32) -> u64 {
        u64::from(self.known) ^ self.scheduler.warm_have(peer, piece)
    }

    /// The peers to tell that this node holds `piece`, in key order: every connected
    /// peer that has not announced it itself, each with the hashes to send it first
    /// (counted as sent).
    pub fn have_recipients(&mut self, piece: u32, out: &mut Vec<HaveTo>) {
        out.clear();
        let known = self.known;
        let mut holding = self.scheduler.peers_holding(piece).peekable();
        for (&k, p) in self.peers.iter_mut() {
            while holding.next_if(|&h| h < k).is_some() {}
            if holding.peek() != Some(&k) {
                out.push(HaveTo { peer: k, hashes: Self::take_hashes(p, known) });
            }
        }
    }

    /// The peer id behind `peer`.
    pub fn peer_id(&self, peer: PeerKey) -> Option<PeerId> {
        self.peers.get(&peer).map(|p| p.peer_id)
    }

    /// Connected peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Connected peers, in key order.
    pub fn peer_keys(&self) -> impl Iterator<Item = PeerKey> + '_ {
        self.peers.keys().copied()
    }

    // ---------------------------------------------------------------- pieces

    /// A piece request to `peer` ended.
    pub fn piece_done(&mut self, peer: PeerKey, piece: u32, outcome: PieceOutcome, now: Instant) {
        match outcome {
            PieceOutcome::Verified => self.scheduler.piece_verified(peer, piece, now),
            PieceOutcome::BadPiece => self.scheduler.piece_failed(peer, piece, now),
            PieceOutcome::Rejected(why) => self.scheduler.request_failed(peer, piece, why, now),
            PieceOutcome::Failed => self.scheduler.request_failed(peer, piece, RequestFailure::Error, now),
        }
        self.drain_scheduler();
    }

    /// This node stored `piece` from outside the swarm (the upstream registry, as the
    /// lease holder) and its hash is published.
    pub fn upstream_piece(&mut self, piece: u32, now: Instant) {
        self.known = self.known.max(piece.saturating_add(1)).min(self.pieces);
        self.scheduler.local_piece(piece, now);
        self.drain_scheduler();
    }

    /// The whole-blob check ended (`Err`: why the blob is bad).
    pub fn blob_checked(&mut self, result: Result<(), String>, now: Instant) {
        self.checking = false;
        if self.lease_holder {
            self.lease_holder = false;
            self.actions.push_back(SwarmAction::ReleaseLease { failed: result.as_ref().err().cloned() });
        }
        match result {
            Ok(()) => {
                self.checked = true;
                // Tell the tracker at once that this node is now a seed.
                self.next_announce = now;
                self.handle_timeout(now);
            }
            // Some piece or hash was wrong (hashes may have come from peers): drop
            // everything learned and let the next request start afresh.
            Err(reason) => self.actions.push_back(SwarmAction::Abandon { reason }),
        }
    }

    /// Whether the blob is whole and checked.
    pub fn is_complete(&self) -> bool {
        self.checked
    }

    /// The scheduler (read-only: statistics, held pieces).
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    // --------------------------------------------------------------- tracker

    /// What to announce now.
    pub fn announce_state(&self) -> AnnounceState {
        AnnounceState {
            have: self.scheduler.have().count(),
            complete: self.checked,
            num_want: u32::try_from(self.policy.max_peers).unwrap_or(u32::MAX),
        }
    }

    /// The tracker answered an announce: schedule the next one and dial.
    pub fn announced(&mut self, reply: AnnounceReply<'_>, now: Instant) {
        self.announcing = false;
        let complete = self.scheduler.is_complete();
        let after = |interval| self.policy.next_announce(interval, self.peers.len(), complete);
        match reply {
            AnnounceReply::Peers { peers, interval } => {
                self.next_announce = now + after(Some(interval));
                self.dial(peers, now);
            }
            AnnounceReply::Failed => self.next_announce = now + after(None),
        }
    }

    fn dial(&mut self, offered: &[PeerInfo], now: Instant) {
        self.failed.retain(|_, t| now.saturating_duration_since(*t) < CONNECT_BACKOFF);
        // A seed has nothing to fetch; it only answers.
        if self.scheduler.is_complete() {
            return;
        }
        let wanted = self.policy.max_peers.saturating_sub(self.peers.len() + self.dialling.len());
        if wanted == 0 {
            return;
        }
        let fresh: Vec<&PeerInfo> = offered
            .iter()
            .filter(|p| {
                p.peer_id != self.me
                    && !self.banned.contains(&p.peer_id)
                    && !self.by_id.contains_key(&p.peer_id)
                    && !self.dialling.contains(&p.addr)
                    && !self.failed.contains_key(&p.addr)
            })
            .collect();
        if fresh.is_empty() {
            return;
        }
        let candidates: Vec<Candidate> = fresh
            .iter()
            .map(|p| Candidate { same_zone: p.zone == self.zone, have: p.have, complete: p.complete })
            .collect();
        for i in choose_peers(&candidates, wanted, &mut self.rng) {
            let Some(p) = fresh.get(i) else { continue };
            self.dialling.insert(p.addr);
            self.actions.push_back(SwarmAction::Dial { addr: p.addr });
        }
    }

    fn needs_hashes(&self) -> bool {
        self.started && !self.syncing && !self.lease_holder && self.known < self.pieces && !self.hashes_from_peers()
    }

    /// Whether every connected peer passes hashes on (and there is one): then the
    /// tracker is not asked for them.
    fn hashes_from_peers(&self) -> bool {
        !self.peers.is_empty() && self.v1_peers == 0
    }

    /// Hashes the node knows: pieces `0..known`.
    pub fn known_hashes(&self) -> u32 {
        self.known
    }

    /// A request for piece hashes ended.
    pub fn hashes(&mut self, reply: HashesReply, now: Instant) {
        self.syncing = false;
        match reply {
            HashesReply::Known(known) => {
                let fresh = known > self.known;
                self.next_sync = if fresh { now } else { now + HASH_SYNC };
                if fresh {
                    self.known = known.min(self.pieces);
                    self.replay_deferred(now);
                }
            }
            HashesReply::Forgotten if !self.lease_holder => {
                self.actions.push_back(SwarmAction::Abandon {
                    reason: "the upstream fetch of this blob failed (the tracker dropped it)".into(),
                });
            }
            HashesReply::Forgotten => {}
            HashesReply::Failed => self.next_sync = now + HASH_SYNC,
        }
        self.handle_timeout(now);
    }

    /// Hashes became known some other way (the driver stored them): replay what waited.
    pub fn hashes_known(&mut self, known: u32, now: Instant) {
        if known > self.known {
            self.known = known.min(self.pieces);
            self.replay_deferred(now);
        }
    }

    fn replay_deferred(&mut self, now: Instant) {
        let known = self.known;
        let ready: Vec<(PeerKey, u32)> = self.deferred.iter().copied().filter(|&(_, p)| p < known).collect();
        for entry in &ready {
            self.deferred.remove(entry);
        }
        for (peer, piece) in ready {
            self.scheduler.peer_have(peer, piece, now);
        }
        self.drain_scheduler();
    }

    // ----------------------------------------------------------------- timers

    /// When [`Swarm::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.scheduler.poll_timeout();
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if self.started && !self.announcing {
            consider(self.next_announce);
        }
        if self.needs_hashes() {
            consider(self.next_sync);
        }
        next
    }

    /// Runs what is due at `now`: request timeouts, the announce, the hash sync.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.scheduler.poll_timeout().is_some_and(|t| t <= now) {
            self.scheduler.handle_timeout(now);
            self.drain_scheduler();
        }
        if self.started && !self.announcing && self.next_announce <= now {
            self.announcing = true;
            self.actions.push_back(SwarmAction::Announce);
        }
        if self.needs_hashes() && self.next_sync <= now {
            self.syncing = true;
            self.actions.push_back(SwarmAction::GetHashes { first: self.known });
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<SwarmAction> {
        self.actions.pop_front()
    }

    fn begin_check(&mut self) {
        if self.checking || self.checked {
            return;
        }
        self.checking = true;
        self.actions.push_back(SwarmAction::CheckBlob);
    }

    /// Moves the scheduler's actions to the swarm's queue, acting on those that
    /// concern the swarm itself.
    fn drain_scheduler(&mut self) {
        while let Some(action) = self.scheduler.poll_action() {
            match action {
                Action::Request { peer, piece } => self.actions.push_back(SwarmAction::Request { peer, piece }),
                Action::Cancel { peer, piece } => self.actions.push_back(SwarmAction::Cancel { peer, piece }),
                Action::Have { piece } => self.actions.push_back(SwarmAction::Have { piece }),
                Action::DropPeer { peer, reason: DropReason::BadPieces } => {
                    if let Some(p) = self.peers.remove(&peer) {
                        self.banned.insert(p.peer_id);
                        if !p.exchange {
                            self.v1_peers -= 1;
                        }
                        if self.by_id.get(&p.peer_id) == Some(&peer) {
                            self.by_id.remove(&p.peer_id);
                        }
                    }
                    self.deferred.retain(|&(k, _)| k != peer);
                    self.actions.push_back(SwarmAction::Close { peer, reason: CloseReason::BadPieces });
                }
                Action::Complete => self.begin_check(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::node::EAGER_ANNOUNCE;

    const PIECES: u32 = 8;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, i)), 7001)
    }

    fn info(i: u8) -> PeerInfo {
        PeerInfo { peer_id: PeerId([i; 16]), addr: addr(i), zone: String::new(), have: 0, complete: false }
    }

    /// A connection to node `i` speaking version 1 (no hashes, no peer exchange).
    fn v1(i: u8, outbound: bool) -> PeerConn {
        PeerConn { peer_id: PeerId([i; 16]), addr: addr(i), outbound, version: 1 }
    }

    fn v2(i: u8, outbound: bool) -> PeerConn {
        PeerConn { version: 2, ..v1(i, outbound) }
    }

    fn swarm(me: u8, have: Bitfield, known: u32, now: Instant) -> Swarm {
        let policy = NodePolicy { max_peers: 4, ..NodePolicy::default() };
        let mut s = Swarm::new(PeerId([me; 16]), String::new(), &policy, 1 << 18, have, known, 7, now);
        s.start(now);
        s
    }

    fn actions(s: &mut Swarm) -> Vec<SwarmAction> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    #[test]
    fn dials_at_most_the_wanted_peers_skipping_itself_and_failed_addresses() {
        let t = Instant::now();
        let mut s = swarm(1, Bitfield::new(PIECES), PIECES, t);
        assert_eq!(actions(&mut s), vec![SwarmAction::Announce]);
        s.dial_failed(addr(3), t);
        let offered: Vec<PeerInfo> = (1..=9).map(info).collect();
        s.announced(AnnounceReply::Peers { peers: &offered, interval: Duration::from_secs(30) }, t);
        let dials: Vec<SwarmAction> = actions(&mut s);
        assert_eq!(dials.len(), 4, "max_peers is 4: {dials:?}");
        for a in &dials {
            let SwarmAction::Dial { addr: to } = a else { panic!("not a dial: {a:?}") };
            assert!(*to != addr(1) && *to != addr(3), "dialled itself or a failed address: {to}");
        }
        // Short of peers: the next announce is eager.
        assert_eq!(s.poll_timeout(), Some(t + EAGER_ANNOUNCE));
        // After the back-off the failed address may be dialled again.
        let later = t + CONNECT_BACKOFF;
        s.announced(AnnounceReply::Peers { peers: &[info(3)], interval: Duration::from_secs(30) }, later);
        assert!(actions(&mut s).is_empty(), "every wanted peer is being dialled already");
    }

    #[test]
    fn a_seed_never_dials_and_announces_at_the_trackers_interval_once_checked() {
        let t = Instant::now();
        let mut s = swarm(1, Bitfield::full(PIECES), PIECES, t);
        assert_eq!(actions(&mut s), vec![SwarmAction::CheckBlob, SwarmAction::Announce]);
        s.blob_checked(Ok(()), t);
        assert!(s.is_complete());
        let offered: Vec<PeerInfo> = (2..=5).map(info).collect();
        s.announced(AnnounceReply::Peers { peers: &offered, interval: Duration::from_secs(30) }, t);
        assert!(actions(&mut s).is_empty());
        assert_eq!(s.poll_timeout(), Some(t + Duration::from_secs(30)));
        assert!(s.announce_state().complete);
    }

    #[test]
    fn a_failed_announce_is_retried_eagerly_and_a_checked_blob_announces_at_once() {
        let t = Instant::now();
        let mut s = swarm(1, Bitfield::new(PIECES), PIECES, t);
        actions(&mut s);
        s.announced(AnnounceReply::Failed, t);
        assert_eq!(s.poll_timeout(), Some(t + EAGER_ANNOUNCE));
        s.handle_timeout(t + EAGER_ANNOUNCE);
        assert_eq!(actions(&mut s), vec![SwarmAction::Announce]);
        assert_eq!(s.poll_timeout(), None, "one announce at a time");
    }

    #[test]
    fn of_two_connections_between_two_nodes_both_keep_the_one_the_smaller_id_opened() {
        let t = Instant::now();
        let (mut a, mut b) = (swarm(1, Bitfield::new(PIECES), PIECES, t), swarm(2, Bitfield::new(PIECES), PIECES, t));
        actions(&mut a);
        actions(&mut b);
        // Connection X: opened by b (the larger id); connection Y: opened by a.
        let xa = a.connected(v1(2, false), t).expect("a takes x");
        let _xb = b.connected(v1(1, true), t).expect("b takes x");
        let ya = a.connected(v1(2, true), t).expect("a prefers y");
        assert_ne!(xa, ya);
        assert_eq!(actions(&mut a), vec![SwarmAction::Close { peer: xa, reason: CloseReason::Duplicate }]);
        let yb = b.connected(v1(1, false), t);
        assert!(yb.is_ok(), "b prefers y too");
        assert_eq!(actions(&mut b).len(), 1, "b closes x");
        // A third connection opened by b loses on both sides.
        assert_eq!(a.connected(v1(2, false), t), Err(Refused::Duplicate));
        assert_eq!(a.connected(v1(1, false), t), Err(Refused::ToSelf));
        assert_eq!(a.peer_count(), 1);
    }

    #[test]
    fn haves_of_pieces_without_a_known_hash_wait_and_repeats_add_nothing() {
        let t = Instant::now();
        let mut s = swarm(1, Bitfield::new(PIECES), 2, t);
        assert_eq!(actions(&mut s), vec![SwarmAction::Announce, SwarmAction::GetHashes { first: 2 }]);
        let p = s.connected(v1(2, false), t).expect("peer");
        for _ in 0..1000 {
            assert!(!s.have(p, 5, t), "piece 5 has no known hash yet");
        }
        assert_eq!(s.deferred.len(), 1, "a repeated Have is one entry");
        assert!(s.have(p, 1, t));
        assert_eq!(actions(&mut s), vec![SwarmAction::Request { peer: p, piece: 1 }]);
        // New hashes: the deferred Have is replayed and the next ask goes at once.
        s.hashes(HashesReply::Known(6), t);
        let next = actions(&mut s);
        assert!(next.contains(&SwarmAction::Request { peer: p, piece: 5 }), "{next:?}");
        assert!(next.contains(&SwarmAction::GetHashes { first: 6 }), "{next:?}");
        // Nothing new: wait HASH_SYNC.
        s.hashes(HashesReply::Known(6), t);
        assert!(!actions(&mut s).iter().any(|a| matches!(a, SwarmAction::GetHashes { .. })));
        s.handle_timeout(t + HASH_SYNC);
        assert!(actions(&mut s).contains(&SwarmAction::GetHashes { first: 6 }));
        // The tracker forgot the blob: its upstream fetch failed.
        s.hashes(HashesReply::Forgotten, t + HASH_SYNC);
        assert!(matches!(actions(&mut s).first(), Some(SwarmAction::Abandon { .. })));
    }

    #[test]
    fn the_lease_holder_asks_for_no_hashes_and_releases_the_lease_when_whole() {
        let t = Instant::now();
        let mut s = swarm(1, Bitfield::new(2), 0, t);
        s.hold_lease();
        actions(&mut s);
        s.upstream_piece(0, t);
        s.upstream_piece(1, t);
        let acts = actions(&mut s);
        assert!(!acts.iter().any(|a| matches!(a, SwarmAction::GetHashes { .. })), "{acts:?}");
        assert!(acts.contains(&SwarmAction::CheckBlob), "{acts:?}");
        s.blob_checked(Ok(()), t);
        assert_eq!(actions(&mut s), vec![SwarmAction::ReleaseLease { failed: None }]);
    }

    #[test]
    fn a_have_goes_to_every_peer_that_did_not_announce_the_piece() {
        let t = Instant::now();
        let mut s = swarm(1, Bitfield::new(PIECES), PIECES, t);
        let keys: Vec<PeerKey> = (2..=4).map(|i| s.connected(v1(i, false), t).expect("peer")).collect();
        s.have(keys[1], 3, t);
        let mut out = Vec::new();
        s.have_recipients(3, &mut out);
        let to = |peer| HaveTo { peer, hashes: None };
        assert_eq!(out, vec![to(keys[0]), to(keys[2])]);
        s.closed(keys[0], t);
        s.have_recipients(3, &mut out);
        assert_eq!(out, vec![to(keys[2])]);
    }

    #[test]
    fn hashes_go_to_version_2_peers_once_before_the_haves_that_need_them() {
        let t = Instant::now();
        // The lease holder, with the hashes of pieces 0..2 known.
        let mut s = swarm(1, Bitfield::new(PIECES), 2, t);
        s.hold_lease();
        actions(&mut s);
        let old = s.connected(v1(2, false), t).expect("v1 peer");
        let new = s.connected(v2(3, false), t).expect("v2 peer");
        let acts = actions(&mut s);
        let range = |first, count| HashRange { first, count };
        assert!(acts.contains(&SwarmAction::SendHashes { peer: new, range: range(0, 2) }), "{acts:?}");
        assert!(!acts.iter().any(|a| matches!(a, SwarmAction::SendHashes { peer, .. } if *peer == old)), "{acts:?}");
        // A new piece from upstream: its hash rides with its Have, to the v2 peer only.
        s.upstream_piece(2, t);
        assert!(actions(&mut s).contains(&SwarmAction::Have { piece: 2 }));
        let mut out = Vec::new();
        s.have_recipients(2, &mut out);
        assert_eq!(out, vec![HaveTo { peer: old, hashes: None }, HaveTo { peer: new, hashes: Some(range(2, 1)) }]);
        // Sent once: the next Have of an older piece carries nothing.
        s.have_recipients(1, &mut out);
        assert!(out.iter().all(|h| h.hashes.is_none()), "{out:?}");
        // Hashes from a peer make them known here, to send on to the others.
        s.peer_hashes(new, PeerHashes::Stored { known: 4 }, t);
        assert_eq!(s.hashes_for(new), Some(range(3, 1)));
        assert_eq!(s.hashes_for(old), None, "version 1: no hashes");
    }

    #[test]
    fn with_only_version_2_peers_hashes_come_from_them_not_the_tracker() {
        let t = Instant::now();
        let mut s = swarm(1, Bitfield::new(PIECES), 2, t);
        assert!(actions(&mut s).contains(&SwarmAction::GetHashes { first: 2 }));
        s.hashes(HashesReply::Known(2), t);
        let p = s.connected(v2(2, false), t).expect("peer");
        actions(&mut s);
        s.handle_timeout(t + HASH_SYNC);
        assert!(!actions(&mut s).iter().any(|a| matches!(a, SwarmAction::GetHashes { .. })));
        // The peer's hashes make its deferred Have usable.
        assert!(!s.have(p, 4, t));
        s.peer_hashes(p, PeerHashes::Stored { known: 5 }, t);
        assert!(actions(&mut s).contains(&SwarmAction::Request { peer: p, piece: 4 }));
        // A version-1 peer joins: its Haves carry no hashes, so the tracker is asked again.
        s.connected(v1(3, false), t).expect("v1 peer");
        s.handle_timeout(t + HASH_SYNC);
        assert!(actions(&mut s).contains(&SwarmAction::GetHashes { first: 5 }));
    }

    #[test]
    fn a_conflicting_hash_bans_the_peer_and_a_failed_check_abandons_the_blob() {
        let t = Instant::now();
        let mut s = swarm(1, Bitfield::new(PIECES), 2, t);
        let p = s.connected(v2(2, false), t).expect("peer");
        actions(&mut s);
        s.peer_hashes(p, PeerHashes::Conflict, t);
        assert!(actions(&mut s).contains(&SwarmAction::Close { peer: p, reason: CloseReason::BadHashes }));
        assert_eq!(s.peer_count(), 0);
        assert_eq!(s.connected(v2(2, false), t), Err(Refused::Banned));
        s.blob_checked(Err("digest mismatch".into()), t);
        assert_eq!(actions(&mut s), vec![SwarmAction::Abandon { reason: "digest mismatch".into() }]);
    }

    #[test]
    fn a_version_2_peer_learns_the_other_peers_and_offered_peers_are_dialled() {
        let t = Instant::now();
        let mut s = swarm(1, Bitfield::new(PIECES), PIECES, t);
        actions(&mut s);
        s.connected(v1(2, true), t).expect("peer");
        let q = s.connected(v2(3, false), t).expect("peer");
        let acts = actions(&mut s);
        let sent = acts.iter().find_map(|a| match a {
            SwarmAction::SendPeers { peer, peers } if *peer == q => Some(peers.clone()),
            _ => None,
        });
        let sent = sent.expect("peers sent to the v2 peer");
        assert_eq!(sent.iter().map(|p| p.addr).collect::<Vec<_>>(), vec![addr(2)]);
        s.peers_offered(&[info(4), info(2), info(1)], t);
        assert_eq!(actions(&mut s), vec![SwarmAction::Dial { addr: addr(4) }], "not itself, not a connected peer");
    }

    #[test]
    fn a_peer_flooding_haves_and_hashes_stays_within_the_bounds() {
        let t = Instant::now();
        let pieces = 64;
        let policy = NodePolicy::default();
        let mut s = Swarm::new(PeerId([1; 16]), String::new(), &policy, 1 << 18, Bitfield::new(pieces), 4, 7, t);
        s.start(t);
        actions(&mut s);
        let p = s.connected(v2(2, false), t).expect("peer");
        let q = s.connected(v1(3, false), t).expect("peer");
        let mut requests = 0;
        for i in 0..1_000_000u32 {
            // Every piece, over and over, and far out of range.
            let piece = if i % 7 == 0 { u32::MAX - i } else { i % (pieces + 8) };
            s.have(p, piece, t);
            s.have(q, piece, t);
            if i % 1000 == 0 {
                s.peer_hashes(p, PeerHashes::Stored { known: 4 }, t);
            }
            for a in actions(&mut s) {
                if matches!(a, SwarmAction::Request { .. }) {
                    requests += 1;
                }
            }
            assert!(s.deferred.len() <= 2 * pieces as usize, "deferred: {}", s.deferred.len());
        }
        // Only the four pieces with a known hash could be asked for, each once per peer at most.
        assert!(requests <= 2 * 4, "{requests} requests");
        assert_eq!(s.deferred.len(), 2 * (pieces as usize - 4), "one entry per (peer, piece) awaiting its hash");
    }
}
