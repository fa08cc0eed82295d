//! The driver of one simulated node: the mirror of `peer/src/node.rs` around the real
//! [`Scheduler`].
//!
//! This module owns everything a node keeps besides its scheduler — connections
//! ([`SimNode::links`]), connection attempts, the announce cycle, the receive budget,
//! upload slots and their wait queue — and the reactions to the scheduler's actions.
//! It mirrors the real driver step by step:
//!
//! | real node (`peer/src/node.rs`)                               | here                                                     |
//! |--------------------------------------------------------------|----------------------------------------------------------|
//! | `Request`: fetch task takes receive budget (KiB permits, FIFO), opens a stream, sends the request | `World::request`: same budget in KiB, FIFO; request reaches the sender after RTT/2 |
//! | sender: `Missing` if the piece is not held, or held back as fresh by a source's `UploadLedger` (re-announced to the requester after `FRESH_HOLD`, or as soon as every piece went out once, which ends the hold); else an upload slot (at once if one is free and nobody waits, else wait ≤ `SLOT_WAIT`, else `Busy`); the slot is held until the requester acknowledged the last byte; a freed slot goes, on a source, to the waiting request for the piece sent fewest times, oldest first, elsewhere to the oldest (`UploadSlots`) | `World::on_request_arrive`, `World::on_queue_timeout`, `World::release_slot`, `World::on_have_to` |
//! | sender streams the piece; receiver verifies and stores it     | a flow sender up → receiver down; the reply reaches the receiver RTT/2 after the last byte left; hashing and disk take no time |
//! | `Cancel`: abort the fetch task (budget freed at once; the sender stops when STOP_SENDING arrives) | budget freed at once; flow or queue entry dropped RTT/2 later |
//! | `Have`: sent to every connected peer that has not announced the piece | every peer connected when it arrives (RTT/2 later) and not known then to have the piece gets `peer_have` |
//! | `Complete`: whole-blob check, then announce at once            | announce at once (the check is not modelled)             |
//! | announce every 2 s while < `max_peers/2` peers and incomplete, else every tracker interval | same (`World::on_tracker_reply`) |
//! | `connect_to`: drop self, connected, connecting, failed < 5 s; `choose_peers(…, max_peers − peers − connecting)`; seeds never dial | same (`World::connect_to`); a dial takes 2 RTTs (QUIC handshake + the blob handshake) |
//! | inbound connections always accepted; duplicate connections collapse to one | same; the bitfields are exchanged when the link is up |
//! | `DropPeer`: close the connection                               | unlink both sides (never happens: no bad pieces are simulated) |
//!
//! And the edge-upgrade start-up of `peer/src/agent.rs` (`SwarmProvider::start`,
//! `lead`, `feed`) with the hash sync of `node.rs`:
//!
//! | real node                                                     | here                                                     |
//! |--------------------------------------------------------------|----------------------------------------------------------|
//! | `GetHashes(0)`; if nothing is published, `AcquireLease`; `HeldBy` → sleep 100 ms, again | `World::on_startup`, `World::on_lease_reply`: the real tracker core answers; two RTTs per round |
//! | `Granted` → open the upstream GET, publish the layout, `fetch_partial`, start the feed | after one WAN RTT the body starts streaming; the swarm starts one RTT later |
//! | feed: per piece, hash, store, `PublishHashes` (awaited, one at a time), then `upstream_piece` (`local_piece`) | the body keeps streaming; each piece is published (1 RTT, in order) and then handed to `local_piece` |
//! | others: `GetHashes(known)` while hashes are missing: the tracker holds it until the next publish (≤ `HASHES_WAIT`), the next goes at once after new hashes, 150 ms after an empty answer; `Have`s and bitfield bits of pieces without a known hash wait and are replayed when they arrive | `World::on_hash_sync`, `World::on_hashes_reply`, `World::on_published` (the 2 s wait limit is not modelled: publishes come every piece) |
//! | the holder releases the lease when complete                  | same                                                     |
//!
//! Not mirrored: lease expiry and takeover (the holder never fails or leaves), the
//! 30 s layout wait and the fall back to upstream.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use rand::rngs::StdRng;
use swarm_core::node::{self, NodePolicy};
use swarm_core::scheduler::{Action, Candidate, PeerKey, RequestFailure, Scheduler, SchedulerConfig, choose_peers};
use swarm_proto::msg::{Announce, LeaseReply, PeerInfo, TrackerRequest, TrackerResponse};
use swarm_proto::{Layout, PeerId};

use crate::model::{FlowId, Nanos, ResId};
use crate::world::{Ev, FlowTag, World};

/// First address of the simulated nodes (RFC 2544 benchmarking range).
const BASE_ADDR: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// The port every simulated node listens on.
pub const LISTEN_PORT: u16 = 7001;

/// The address of node `i`.
pub fn node_addr(i: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(BASE_ADDR + 1 + i)), LISTEN_PORT)
}

/// The node an address belongs to.
pub fn addr_node(a: &SocketAddr) -> Option<u32> {
    match a.ip() {
        IpAddr::V4(ip) => u32::from(ip).checked_sub(BASE_ADDR + 1),
        IpAddr::V6(_) => None,
    }
}

/// What a node is in the scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Downloads through the swarm.
    Leecher,
    /// Downloads from upstream (the edge lease holder) and serves the swarm.
    Holder,
    /// Starts with the whole blob (in-cluster seed).
    Seed,
}

/// One connection as seen from one side.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    /// The node at the other end.
    pub remote: u32,
    /// The key the other end uses for us.
    pub remote_key: PeerKey,
}

/// A simulated node: the scheduler plus the driver state of `peer/src/node.rs`.
pub struct SimNode {
    pub peer_id: PeerId,
    pub zone: u32,
    pub role: Role,
    pub up: ResId,
    pub down: ResId,
    pub alive: bool,
    /// Whether the run waits for this node to complete.
    pub counted: bool,
    pub joined_at: Nanos,
    pub left_at: Option<Nanos>,
    pub completed_at: Option<Nanos>,
    pub sched: Scheduler,
    /// Randomness of peer choice (the real node uses the thread RNG).
    pub rng: StdRng,
    pub links: BTreeMap<PeerKey, Link>,
    pub by_node: BTreeMap<u32, PeerKey>,
    pub next_key: u64,
    pub connecting: BTreeSet<u32>,
    /// Nodes whose dial failed, and when.
    pub failed: BTreeMap<u32, Nanos>,
    pub announcing: bool,
    pub next_announce: Nanos,
    /// The earliest scheduler wake-up already in the event queue.
    pub timer_at: Option<Nanos>,
    /// Our fetches by (peer, piece).
    pub outstanding: BTreeMap<(PeerKey, u32), FetchId>,
    /// Free receive budget in KiB, and fetches waiting for it (FIFO by sequence).
    pub budget_free: u32,
    pub budget_queue: BTreeMap<u64, FetchId>,
    /// Free upload slots, and requests waiting for one (by arrival sequence).
    pub slots_free: u32,
    pub upload_queue: BTreeMap<u64, FetchId>,
    /// Whether the swarm (scheduler, announces) runs: from the start in-cluster; in
    /// the edge upgrade once the layout is known (`fetch_partial` in `agent.rs`).
    pub swarming: bool,
    /// Piece hashes known; `Have`s and bitfield bits at or past it are deferred.
    pub known: u32,
    /// `(peer, piece)` announcements waiting for the piece's hash.
    pub deferred: Vec<(PeerKey, u32)>,
    /// A `GetHashes` is under way.
    pub syncing: bool,
    /// When the next `GetHashes` may go out.
    pub next_sync: Nanos,
    /// This node holds the upstream lease.
    pub lease_holder: bool,
    /// The holder's publishes are sequential: when the current one is answered.
    pub publish_free_at: Nanos,
    /// The upload ledger of a source (`UploadLedger` in `peer/src/upload.rs`): when each
    /// piece was first uploaded (`None`: never). Empty when the ledger is off (not a
    /// seed or lease holder).
    pub first_sent: Vec<Option<Nanos>>,
    /// Pieces of `first_sent` never uploaded; at zero the hold is over.
    pub unsent: u32,
    /// Requests refused while fresh, re-announced as soon as the hold ends early
    /// (requester, its key for this node, piece).
    pub refused: Vec<(u32, PeerKey, u32)>,
    /// A source's uploads started per piece: its free slot goes to the queued
    /// request for the piece sent the fewest times. Empty elsewhere (arrival order).
    pub sends: Vec<u32>,
    /// Piece bytes verified from peers or upstream.
    pub downloaded: u64,
    /// Piece bytes fully sent to peers.
    pub uploaded: u64,
}

impl SimNode {
    /// A node that holds `sched`'s pieces.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        peer_id: PeerId,
        zone: u32,
        role: Role,
        up: ResId,
        down: ResId,
        sched: Scheduler,
        rng: StdRng,
        budget_kib: u32,
        slots: u32,
    ) -> Self {
        Self {
            peer_id,
            zone,
            role,
            up,
            down,
            alive: false,
            counted: false,
            joined_at: 0,
            left_at: None,
            completed_at: None,
            sched,
            rng,
            links: BTreeMap::new(),
            by_node: BTreeMap::new(),
            next_key: 0,
            connecting: BTreeSet::new(),
            failed: BTreeMap::new(),
            announcing: false,
            next_announce: 0,
            timer_at: None,
            outstanding: BTreeMap::new(),
            budget_free: budget_kib,
            budget_queue: BTreeMap::new(),
            slots_free: slots,
            upload_queue: BTreeMap::new(),
            swarming: false,
            known: 0,
            deferred: Vec::new(),
            syncing: false,
            next_sync: 0,
            lease_holder: false,
            publish_free_at: 0,
            first_sent: Vec::new(),
            unsent: 0,
            refused: Vec::new(),
            sends: Vec::new(),
            downloaded: 0,
            uploaded: 0,
        }
    }
}

/// The real node's settings and constants that shape its behaviour in the swarm.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Peers to keep connected (`NodeConfig::max_peers`).
    pub max_peers: usize,
    /// Concurrent uploads (`NodeConfig::upload_slots`).
    pub upload_slots: usize,
    /// Bytes of piece buffers in flight (`NodeConfig::receive_budget`).
    pub receive_budget: usize,
    /// How long a request waits for an upload slot before `Busy` (`serve_one`).
    pub slot_wait: Duration,
    /// Re-announce period while short of peers (`EAGER_ANNOUNCE`).
    pub eager_announce: Duration,
    /// No re-dial of a failed address for this long (`CONNECT_BACKOFF`).
    pub connect_backoff: Duration,
    /// Pause between `HashSync` requests for new piece hashes (`HASH_SYNC`).
    pub hash_sync: Duration,
    /// Pause before asking again for a layout nobody published yet (`agent.rs`).
    pub layout_retry: Duration,
    /// How long a source refuses a piece it has just uploaded to one peer (`FRESH_HOLD`).
    pub fresh_hold: Duration,
    /// The piece-picking policy.
    pub scheduler: SchedulerConfig,
}

impl Default for DriverConfig {
    /// The values of `NodeConfig::new` and the constants of `peer/src/node.rs`.
    fn default() -> Self {
        // Taken from the real node's defaults, so the two cannot drift apart.
        let node = NodePolicy::default();
        Self {
            max_peers: node.max_peers,
            upload_slots: node.upload_slots,
            receive_budget: node.receive_budget,
            slot_wait: node::SLOT_WAIT,
            eager_announce: node::EAGER_ANNOUNCE,
            connect_backoff: node::CONNECT_BACKOFF,
            hash_sync: node::HASH_SYNC,
            layout_retry: node::LAYOUT_RETRY,
            fresh_hold: node::FRESH_HOLD,
            scheduler: node.scheduler,
        }
    }
}

/// A fetch: one piece request from `receiver` to `sender`, from the `Request` action
/// to its reply (or abort).
#[derive(Clone, Copy, Debug)]
pub struct Fetch {
    pub receiver: u32,
    pub sender: u32,
    /// The receiver's key for the sender.
    pub key: PeerKey,
    pub piece: u32,
    pub len: u32,
    pub state: FetchState,
    /// The receiver aborted it; a `CancelArrive` event is on its way to the sender.
    pub cancelled: bool,
    /// KiB of receive budget held.
    pub budget: u32,
}

/// Where a fetch stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchState {
    /// Waiting for receive budget (sequence in the receiver's queue).
    WaitBudget(u64),
    /// The request is on its way to the sender.
    ToSender,
    /// Waiting for an upload slot (sequence in the sender's queue).
    Queued(u64),
    /// Bytes flowing.
    Flowing(FlowId),
    /// The reply is on its way back.
    ToReceiver(Reply),
}

/// How the sender answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    Piece,
    Busy,
    Missing,
}

/// A fetch handle: slot index plus generation, so stale events are recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FetchId {
    idx: u32,
    generation: u32,
}

/// Storage of live fetches with O(1) insert, lookup and removal.
#[derive(Default)]
pub struct Fetches {
    slots: Vec<(u32, Option<Fetch>)>,
    free: Vec<u32>,
    live: usize,
}

impl Fetches {
    pub fn insert(&mut self, f: Fetch) -> FetchId {
        self.live += 1;
        match self.free.pop() {
            Some(idx) => {
                let slot = &mut self.slots[idx as usize];
                slot.0 = slot.0.wrapping_add(1);
                slot.1 = Some(f);
                FetchId { idx, generation: slot.0 }
            }
            None => {
                self.slots.push((0, Some(f)));
                FetchId { idx: (self.slots.len() - 1) as u32, generation: 0 }
            }
        }
    }

    pub fn get(&self, id: FetchId) -> Option<&Fetch> {
        match self.slots.get(id.idx as usize) {
            Some((g, Some(f))) if *g == id.generation => Some(f),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, id: FetchId) -> Option<&mut Fetch> {
        match self.slots.get_mut(id.idx as usize) {
            Some((g, Some(f))) if *g == id.generation => Some(f),
            _ => None,
        }
    }

    pub fn remove(&mut self, id: FetchId) -> Option<Fetch> {
        let slot = self.slots.get_mut(id.idx as usize)?;
        if slot.0 != id.generation {
            return None;
        }
        let f = slot.1.take()?;
        self.free.push(id.idx);
        self.live -= 1;
        Some(f)
    }

    /// Fetches alive.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether no fetch is alive.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }
}

impl World {
    /// Executes every pending action of node `n`'s scheduler, then re-arms its timer.
    pub(crate) fn drain(&mut self, n: u32) {
        self.drain_actions(n);
        self.arm_timer(n);
    }

    /// Executes every pending action of node `n`'s scheduler; returns how many.
    fn drain_actions(&mut self, n: u32) -> usize {
        let mut count = 0;
        while let Some(action) = self.nodes[n as usize].sched.poll_action() {
            count += 1;
            match action {
                Action::Request { peer, piece } => self.request(n, peer, piece),
                Action::Cancel { peer, piece } => self.cancel(n, peer, piece),
                Action::Have { piece } => {
                    self.events.push_after(self.now, self.half_rtt, Ev::Have { node: n, piece });
                }
                Action::DropPeer { peer, .. } => self.unlink(n, peer, false),
                Action::Complete => self.on_complete(n),
            }
        }
        count
    }

    /// Makes sure a `Timer` event is queued no later than the scheduler's deadline.
    pub(crate) fn arm_timer(&mut self, n: u32) {
        let node = &mut self.nodes[n as usize];
        let Some(deadline) = node.sched.poll_timeout() else { return };
        let t = self.clock.nanos(deadline).max(self.now);
        if node.timer_at.is_none_or(|a| t < a) {
            node.timer_at = Some(t);
            self.events.push(t, Ev::Timer { node: n });
        }
    }

    pub(crate) fn on_timer(&mut self, n: u32) {
        let now = self.now;
        let at = self.clock.at(now);
        let node = &mut self.nodes[n as usize];
        if !node.alive {
            return;
        }
        if node.timer_at == Some(now) {
            node.timer_at = None;
        }
        if node.sched.poll_timeout().is_some_and(|d| d <= at) {
            node.sched.handle_timeout(at);
            self.drain(n);
        } else {
            self.arm_timer(n);
        }
    }

    fn on_complete(&mut self, n: u32) {
        let now = self.now;
        let node = &mut self.nodes[n as usize];
        if node.completed_at.is_some() {
            return;
        }
        node.completed_at = Some(now);
        if node.counted && node.alive {
            self.pending_nodes -= 1;
        }
        if node.lease_holder {
            // `Finished` on the lease holder gives the lease back.
            node.lease_holder = false;
            let release = TrackerRequest::ReleaseLease { peer_id: node.peer_id, blob: self.digest, failed: None };
            let _ = self.tracker.handle(release, node_addr(n), self.clock.at(now));
        }
        let node = &mut self.nodes[n as usize];
        // `Finished` sets the next announce to now: tell the tracker we are a seed.
        if node.alive {
            node.next_announce = now;
            if !node.announcing {
                self.events.push(now, Ev::Announce { node: n });
            }
        }
    }

    // ------------------------------------------------------------------ downloads

    fn request(&mut self, n: u32, key: PeerKey, piece: u32) {
        let node = &self.nodes[n as usize];
        let Some(link) = node.links.get(&key).copied() else { return };
        let len = self.piece_len(piece);
        let need = len.div_ceil(1024).max(1).min(self.budget_kib);
        let fetch = Fetch {
            receiver: n,
            sender: link.remote,
            key,
            piece,
            len,
            state: FetchState::ToSender,
            cancelled: false,
            budget: 0,
        };
        let id = self.fetches.insert(fetch);
        if let Some(old) = self.nodes[n as usize].outstanding.insert((key, piece), id) {
            self.abort(old);
        }
        let node = &mut self.nodes[n as usize];
        if node.budget_queue.is_empty() && node.budget_free >= need {
            node.budget_free -= need;
            self.send_request(id, need);
        } else {
            self.seq += 1;
            node.budget_queue.insert(self.seq, id);
            if let Some(f) = self.fetches.get_mut(id) {
                f.state = FetchState::WaitBudget(self.seq);
            }
        }
    }

    fn send_request(&mut self, id: FetchId, budget: u32) {
        if let Some(f) = self.fetches.get_mut(id) {
            f.budget = budget;
            f.state = FetchState::ToSender;
            self.events.push_after(self.now, self.half_rtt, Ev::RequestArrive(id));
        }
    }

    /// Returns budget to node `n` and starts the fetches at the head of its queue.
    fn release_budget(&mut self, n: u32, kib: u32) {
        let node = &mut self.nodes[n as usize];
        node.budget_free += kib;
        if !node.alive {
            return;
        }
        loop {
            let node = &mut self.nodes[n as usize];
            let Some((&seq, &id)) = node.budget_queue.first_key_value() else { break };
            let Some(f) = self.fetches.get(id) else {
                node.budget_queue.remove(&seq);
                continue;
            };
            let need = f.len.div_ceil(1024).max(1).min(self.budget_kib);
            if node.budget_free < need {
                break;
            }
            node.budget_free -= need;
            node.budget_queue.remove(&seq);
            self.send_request(id, need);
        }
    }

    /// `Cancel`: the fetch task is aborted. Its budget is free at once; the sender
    /// hears of it RTT/2 later.
    fn cancel(&mut self, n: u32, key: PeerKey, piece: u32) {
        let Some(id) = self.nodes[n as usize].outstanding.remove(&(key, piece)) else { return };
        self.abort(id);
    }

    /// Aborts a fetch from the receiver's side (cancel, or a replaced request).
    fn abort(&mut self, id: FetchId) {
        let Some(f) = self.fetches.get_mut(id) else { return };
        let (receiver, budget, state) = (f.receiver, f.budget, f.state);
        if let FetchState::WaitBudget(seq) = state {
            self.nodes[receiver as usize].budget_queue.remove(&seq);
            self.fetches.remove(id);
            return;
        }
        f.cancelled = true;
        f.budget = 0;
        self.events.push_after(self.now, self.half_rtt, Ev::CancelArrive(id));
        if budget > 0 {
            self.release_budget(receiver, budget);
        }
    }

    /// The sender learns that a fetch was cancelled: drop its queue entry or flow.
    pub(crate) fn on_cancel_arrive(&mut self, id: FetchId) {
        let Some(f) = self.fetches.remove(id) else { return };
        self.stop_at_sender(&f);
    }

    /// Removes a fetch from the sender's queue or stops its flow.
    fn stop_at_sender(&mut self, f: &Fetch) {
        match f.state {
            FetchState::Queued(seq) => {
                self.nodes[f.sender as usize].upload_queue.remove(&seq);
            }
            FetchState::Flowing(flow) => {
                if let Some((_, _, moved)) = self.net.end(flow, self.now) {
                    self.wasted_bytes += moved;
                }
                self.release_slot(f.sender);
            }
            _ => {}
        }
    }

    /// Aborts every fetch of node `n` whose peer is `key` (the connection is gone):
    /// no scheduler call, the caller removes the peer from the scheduler.
    fn abort_all_with(&mut self, n: u32, key: PeerKey) {
        let ids: Vec<FetchId> =
            self.nodes[n as usize].outstanding.range((key, 0)..=(key, u32::MAX)).map(|(_, &id)| id).collect();
        for id in ids {
            let Some(f) = self.fetches.get(id).copied() else { continue };
            self.nodes[n as usize].outstanding.remove(&(key, f.piece));
            if let FetchState::WaitBudget(seq) = f.state {
                self.nodes[n as usize].budget_queue.remove(&seq);
            }
            self.fetches.remove(id);
            if f.budget > 0 {
                self.release_budget(n, f.budget);
            }
            if self.nodes[f.sender as usize].alive {
                self.stop_at_sender(&f);
            } else if let FetchState::Flowing(flow) = f.state
                && let Some((_, _, moved)) = self.net.end(flow, self.now)
            {
                self.wasted_bytes += moved;
            }
        }
    }

    // -------------------------------------------------------------------- uploads

    /// A request reaches its sender.
    pub(crate) fn on_request_arrive(&mut self, id: FetchId) {
        let Some(f) = self.fetches.get(id).copied() else { return };
        if !self.nodes[f.receiver as usize].alive {
            self.fetches.remove(id);
            return;
        }
        let sender = &mut self.nodes[f.sender as usize];
        if !sender.alive {
            return;
        }
        if !sender.sched.have().get(f.piece) {
            self.reply(id, Reply::Missing);
            return;
        }
        if sender.unsent > 0
            && let Some(first) = sender.first_sent.get_mut(f.piece as usize)
        {
            match *first {
                None => {
                    *first = Some(self.now);
                    sender.unsent -= 1;
                    if sender.unsent == 0 {
                        // Every piece went out once: the hold is over, the refused
                        // requesters hear of their pieces now.
                        for (node, key, piece) in std::mem::take(&mut sender.refused) {
                            self.events.push_after(
                                self.now,
                                self.half_rtt,
                                Ev::HaveTo { node, key, from: f.sender, piece },
                            );
                        }
                    }
                }
                Some(t) if self.now - t < self.fresh_hold => {
                    // Fresh: fetch it from its first recipient. Re-announced to the
                    // requester once the hold is over.
                    sender.refused.push((f.receiver, f.key, f.piece));
                    self.reply(id, Reply::Missing);
                    let at = t + self.fresh_hold + self.half_rtt;
                    self.events.push(at, Ev::HaveTo { node: f.receiver, key: f.key, from: f.sender, piece: f.piece });
                    return;
                }
                Some(_) => {}
            }
        }
        if sender.slots_free > 0 && sender.upload_queue.is_empty() {
            self.start_upload(id);
        } else {
            self.seq += 1;
            sender.upload_queue.insert(self.seq, id);
            if let Some(f) = self.fetches.get_mut(id) {
                f.state = FetchState::Queued(self.seq);
            }
            self.events.push_after(self.now, self.slot_wait, Ev::QueueTimeout(id));
        }
    }

    /// A queued request waited too long for an upload slot: `Busy`.
    pub(crate) fn on_queue_timeout(&mut self, id: FetchId) {
        let Some(f) = self.fetches.get(id).copied() else { return };
        if let FetchState::Queued(seq) = f.state {
            self.nodes[f.sender as usize].upload_queue.remove(&seq);
            self.reply(id, Reply::Busy);
        }
    }

    fn start_upload(&mut self, id: FetchId) {
        let Some(f) = self.fetches.get(id).copied() else { return };
        let (s, r) = (&self.nodes[f.sender as usize], &self.nodes[f.receiver as usize]);
        let mut path = [s.up; 4];
        let mut hops = 1;
        if s.zone != r.zone
            && let (Some(&(out, _)), Some(&(_, inn))) =
                (self.zone_links.get(s.zone as usize), self.zone_links.get(r.zone as usize))
        {
            path[1] = out;
            path[2] = inn;
            hops = 3;
        }
        path[hops] = r.down;
        hops += 1;
        let sender = &mut self.nodes[f.sender as usize];
        sender.slots_free -= 1;
        if !sender.first_sent.is_empty() {
            if sender.sends.is_empty() {
                sender.sends = vec![0; self.pieces as usize];
            }
            sender.sends[f.piece as usize] += 1;
        }
        let flow = self.net.start(self.now, u64::from(f.len), &path[..hops], FlowTag::Fetch(id));
        if let Some(f) = self.fetches.get_mut(id) {
            f.state = FetchState::Flowing(flow);
        }
    }

    /// Frees an upload slot of `s` and starts the next queued request.
    pub(crate) fn release_slot(&mut self, s: u32) {
        let node = &mut self.nodes[s as usize];
        node.slots_free += 1;
        if !node.alive {
            return;
        }
        while self.nodes[s as usize].slots_free > 0 {
            let node = &self.nodes[s as usize];
            // `UploadSlots::release`: on a source the least-sent piece first, the oldest
            // among equals; elsewhere (`sends` empty) the oldest.
            let sent = |id: &FetchId| self.fetches.get(*id).and_then(|f| node.sends.get(f.piece as usize).copied());
            let next = node.upload_queue.iter().min_by_key(|&(&seq, id)| (sent(id).unwrap_or(0), seq)).map(|(&s, _)| s);
            let Some(id) = next.and_then(|seq| self.nodes[s as usize].upload_queue.remove(&seq)) else { break };
            if self.fetches.get(id).is_some() {
                self.start_upload(id);
            }
        }
    }

    /// The last byte of a piece left its sender.
    pub(crate) fn on_upload_done(&mut self, id: FetchId) {
        let Some(f) = self.fetches.get(id).copied() else { return };
        self.nodes[f.sender as usize].uploaded += u64::from(f.len);
        self.uploaded_bytes += u64::from(f.len);
        self.reply(id, Reply::Piece);
        // `serve_one` keeps the slot until the requester acknowledged the last byte:
        // one round trip from now.
        self.events.push_after(self.now, 2 * self.half_rtt, Ev::SlotFree { node: f.sender });
    }

    fn reply(&mut self, id: FetchId, r: Reply) {
        if let Some(f) = self.fetches.get_mut(id) {
            f.state = FetchState::ToReceiver(r);
            self.events.push_after(self.now, self.half_rtt, Ev::Reply(id));
        }
    }

    /// A reply reaches the receiver: the fetch task ends and tells the scheduler.
    pub(crate) fn on_reply(&mut self, id: FetchId) {
        let Some(f) = self.fetches.get(id).copied() else { return };
        if f.cancelled {
            // The task was aborted: nobody listens. The CancelArrive event frees it.
            return;
        }
        let FetchState::ToReceiver(reply) = f.state else { return };
        self.fetches.remove(id);
        let n = f.receiver;
        let node = &mut self.nodes[n as usize];
        if node.outstanding.get(&(f.key, f.piece)) == Some(&id) {
            node.outstanding.remove(&(f.key, f.piece));
        }
        if f.budget > 0 {
            self.release_budget(n, f.budget);
        }
        let at = self.clock.at(self.now);
        let node = &mut self.nodes[n as usize];
        match reply {
            Reply::Piece => {
                node.downloaded += u64::from(f.len);
                self.received_bytes += u64::from(f.len);
                node.sched.piece_verified(f.key, f.piece, at);
                self.note_copy(f.piece);
            }
            Reply::Busy => node.sched.request_failed(f.key, f.piece, RequestFailure::Busy, at),
            Reply::Missing => node.sched.request_failed(f.key, f.piece, RequestFailure::Missing, at),
        }
        self.drain(n);
    }

    /// A `Have` reaches every peer `n` is connected to now.
    pub(crate) fn on_have(&mut self, n: u32, piece: u32) {
        let mut peers = std::mem::take(&mut self.scratch_links);
        peers.clear();
        // As the real node: no `Have` to a peer that announced the piece to us.
        // Both maps are ordered by key: one merged pass instead of a lookup per link.
        {
            let sender = &self.nodes[n as usize];
            let mut holding = sender.sched.peers_holding(piece).peekable();
            for (&k, l) in &sender.links {
                while holding.next_if(|&h| h < k).is_some() {}
                if holding.peek() != Some(&k) {
                    peers.push(*l);
                }
            }
        }
        let at = self.clock.at(self.now);
        // All the `peer_have`s first, then all the drains: the same result as one
        // after the other (a drain touches no other node's scheduler — except for
        // `DropPeer`, which needs bad pieces, never simulated), and the independent
        // scheduler updates back to back let the CPU overlap their cache misses.
        for l in &peers {
            let r = &mut self.nodes[l.remote as usize];
            self.haves_delivered += 1;
            if piece >= r.known {
                r.deferred.push((l.remote_key, piece));
            } else {
                r.sched.peer_have(l.remote_key, piece, at);
            }
        }
        for l in &peers {
            // `peer_have` adds a scheduler deadline only with a `Request`: a peer that
            // emitted nothing needs no timer check (`poll_timeout` is a cache miss per
            // node, a few percent of a large run).
            if self.drain_actions(l.remote) > 0 {
                self.arm_timer(l.remote);
            }
        }
        self.scratch_links = peers;
    }

    /// A source's re-announcement of a piece it refused while fresh reaches one peer.
    pub(crate) fn on_have_to(&mut self, n: u32, key: PeerKey, from: u32, piece: u32) {
        let at = self.clock.at(self.now);
        let node = &mut self.nodes[n as usize];
        if !node.alive || node.links.get(&key).is_none_or(|l| l.remote != from) {
            return;
        }
        self.haves_delivered += 1;
        if piece >= node.known {
            node.deferred.push((key, piece));
        } else {
            node.sched.peer_have(key, piece, at);
        }
        if self.drain_actions(n) > 0 {
            self.arm_timer(n);
        }
    }

    // ---------------------------------------------------------------- connections

    /// Announces to the tracker; the reply comes back one RTT later.
    pub(crate) fn on_announce(&mut self, n: u32) {
        let now = self.now;
        let node = &mut self.nodes[n as usize];
        if !node.alive || node.announcing || node.next_announce != now {
            return;
        }
        node.announcing = true;
        let ann = Announce {
            peer_id: node.peer_id,
            blob: self.digest,
            listen_port: LISTEN_PORT,
            advertise: None,
            zone: zone_name(node.zone),
            have: node.sched.have().count(),
            complete: node.completed_at.is_some(),
            num_want: self.driver.max_peers as u32,
        };
        let response = self.tracker.handle(TrackerRequest::Announce(ann), node_addr(n), self.clock.at(now));
        let ev = match response {
            TrackerResponse::Peers { peers, interval_secs } => Ev::TrackerReply {
                node: n,
                peers: peers.into_boxed_slice(),
                interval: u64::from(interval_secs.max(1)) * 1_000_000_000,
            },
            other => {
                tracing::warn!(node = n, ?other, "announce refused");
                Ev::TrackerReply { node: n, peers: Box::new([]), interval: 0 }
            }
        };
        self.events.push(now + 2 * self.half_rtt, ev);
    }

    /// The tracker's reply: schedule the next announce and dial some of the peers.
    pub(crate) fn on_tracker_reply(&mut self, n: u32, peers: &[PeerInfo], interval: Nanos) {
        let now = self.now;
        let eager_after = crate::model::nanos(self.driver.eager_announce);
        let node = &mut self.nodes[n as usize];
        if !node.alive {
            return;
        }
        node.announcing = false;
        let next = if interval == 0 {
            // Failed: retry after the eager period.
            eager_after
        } else if node.links.len() < self.driver.max_peers / 2 && !node.sched.is_complete() {
            eager_after.min(interval)
        } else {
            interval
        };
        node.next_announce = now + next;
        self.events.push(now + next, Ev::Announce { node: n });
        self.connect_to(n, peers);
    }

    /// Dials up to `max_peers − peers − connecting` of the offered peers.
    fn connect_to(&mut self, n: u32, peers: &[PeerInfo]) {
        let now = self.now;
        let backoff = crate::model::nanos(self.driver.connect_backoff);
        let max_peers = self.driver.max_peers;
        let node = &mut self.nodes[n as usize];
        node.failed.retain(|_, t| now.saturating_sub(*t) < backoff);
        let my_zone = zone_name(node.zone);
        let fresh: Vec<(u32, Candidate)> = peers
            .iter()
            .filter_map(|p| {
                let i = addr_node(&p.addr)?;
                let ok = i != n
                    && p.peer_id != node.peer_id
                    && !node.by_node.contains_key(&i)
                    && !node.connecting.contains(&i)
                    && !node.failed.contains_key(&i);
                ok.then(|| (i, Candidate { same_zone: p.zone == my_zone, have: p.have, complete: p.complete }))
            })
            .collect();
        let wanted = max_peers.saturating_sub(node.links.len() + node.connecting.len());
        if fresh.is_empty() || wanted == 0 || node.sched.is_complete() {
            return;
        }
        let candidates: Vec<Candidate> = fresh.iter().map(|&(_, c)| c).collect();
        let chosen = choose_peers(&candidates, wanted, &mut node.rng);
        let t = now + 4 * self.half_rtt;
        for i in chosen {
            let Some(&(to, _)) = fresh.get(i) else { continue };
            self.nodes[n as usize].connecting.insert(to);
            self.events.push(t, Ev::ConnectDone { from: n, to });
        }
    }

    /// A dial finished: link the two nodes unless one is gone or they already are.
    pub(crate) fn on_connect_done(&mut self, from: u32, to: u32) {
        let now = self.now;
        let a = &mut self.nodes[from as usize];
        a.connecting.remove(&to);
        if !a.alive || a.by_node.contains_key(&to) {
            return;
        }
        if !self.nodes[to as usize].alive {
            self.nodes[from as usize].failed.insert(to, now);
            return;
        }
        self.link(from, to);
    }

    fn link(&mut self, a: u32, b: u32) {
        let at = self.clock.at(self.now);
        let ka = PeerKey(self.nodes[a as usize].next_key);
        let kb = PeerKey(self.nodes[b as usize].next_key);
        self.nodes[a as usize].next_key += 1;
        self.nodes[b as usize].next_key += 1;
        self.nodes[a as usize].links.insert(ka, Link { remote: b, remote_key: kb });
        self.nodes[a as usize].by_node.insert(b, ka);
        self.nodes[b as usize].links.insert(kb, Link { remote: a, remote_key: ka });
        self.nodes[b as usize].by_node.insert(a, kb);
        for n in [a, b] {
            let links = self.nodes[n as usize].links.len();
            if links > self.peak_links.0 {
                self.peak_links = (links, n);
            }
        }
        let bits_a = self.nodes[a as usize].sched.have().clone();
        let bits_b = self.nodes[b as usize].sched.have().clone();
        for (n, key, mut bits) in [(a, ka, bits_b), (b, kb, bits_a)] {
            let node = &mut self.nodes[n as usize];
            // Bits of pieces whose hash is not known yet wait (`control` in node.rs).
            let unknown: Vec<u32> = bits.ones().filter(|&p| p >= node.known).collect();
            for p in unknown {
                bits.set(p, false);
                node.deferred.push((key, p));
            }
            node.sched.add_peer(key, at);
            node.sched.peer_bitfield(key, &bits, at);
        }
        self.drain(a);
        self.drain(b);
    }

    /// Closes the connection `n` knows as `key`, on both sides. With `remove_here`,
    /// `n`'s scheduler is told too (it already forgot the peer after `DropPeer`).
    pub(crate) fn unlink(&mut self, n: u32, key: PeerKey, remove_here: bool) {
        let Some(link) = self.nodes[n as usize].links.remove(&key) else { return };
        self.nodes[n as usize].by_node.remove(&link.remote);
        let r = link.remote;
        self.nodes[r as usize].links.remove(&link.remote_key);
        self.nodes[r as usize].by_node.remove(&n);
        self.abort_all_with(n, key);
        self.abort_all_with(r, link.remote_key);
        let at = self.clock.at(self.now);
        if remove_here {
            self.nodes[n as usize].sched.remove_peer(key, at);
        }
        self.nodes[r as usize].sched.remove_peer(link.remote_key, at);
        self.drain(r);
        if remove_here {
            self.drain(n);
        }
    }

    // ------------------------------------------------- upstream lease and hashes

    /// Edge upgrade start-up (`SwarmProvider::start` in `agent.rs`): ask the tracker
    /// for the layout and hashes; if nobody published any, ask for the upstream lease;
    /// if someone else holds it, ask again after a pause.
    pub(crate) fn on_startup(&mut self, n: u32) {
        let now = self.now;
        let node = &self.nodes[n as usize];
        if !node.alive || node.swarming {
            return;
        }
        let at = self.clock.at(now);
        let get = TrackerRequest::GetHashes { blob: self.digest, first: 0 };
        if let TrackerResponse::Hashes { first, hashes, .. } = self.tracker.handle(get, node_addr(n), at) {
            let known = first.saturating_add(hashes.len() as u32);
            self.events.push(now + 2 * self.half_rtt, Ev::SwarmStart { node: n, known });
            return;
        }
        let acquire = TrackerRequest::AcquireLease { peer_id: node.peer_id, blob: self.digest };
        let granted = match self.tracker.handle(acquire, node_addr(n), at) {
            TrackerResponse::Lease(LeaseReply::Granted { .. }) => true,
            TrackerResponse::Lease(LeaseReply::HeldBy { .. } | LeaseReply::NotNeeded) => false,
            other => {
                tracing::warn!(node = n, ?other, "lease request refused");
                false
            }
        };
        // Two round trips: GetHashes, then AcquireLease.
        self.events.push(now + 4 * self.half_rtt, Ev::LeaseReply { node: n, granted });
    }

    pub(crate) fn on_lease_reply(&mut self, n: u32, granted: bool) {
        let now = self.now;
        if !granted {
            let retry = crate::model::nanos(self.driver.layout_retry);
            self.events.push(now + retry, Ev::Startup { node: n });
            return;
        }
        let node = &mut self.nodes[n as usize];
        if node.role != Role::Holder {
            tracing::warn!(node = n, "the upstream lease went to a node not planned as the holder");
            node.role = Role::Holder;
        }
        node.lease_holder = true;
        node.first_sent = vec![None; self.pieces as usize];
        node.unsent = self.pieces;
        // `lead`: open the upstream blob (one WAN round trip), publish the layout.
        self.events.push(now + self.wan_rtt, Ev::UpstreamOpen { node: n });
    }

    /// The upstream answered the holder's GET: publish the layout, start the swarm;
    /// the body streams in from now on.
    pub(crate) fn on_upstream_open(&mut self, n: u32) {
        let now = self.now;
        let publish = TrackerRequest::PublishHashes {
            peer_id: self.nodes[n as usize].peer_id,
            layout: self.layout(),
            first: 0,
            hashes: Vec::new(),
        };
        let reply = self.tracker.handle(publish, node_addr(n), self.clock.at(now));
        if !matches!(reply, TrackerResponse::Registered) {
            tracing::warn!(node = n, ?reply, "layout publish refused");
        }
        self.nodes[n as usize].publish_free_at = now + 2 * self.half_rtt;
        self.events.push(now + 2 * self.half_rtt, Ev::SwarmStart { node: n, known: 0 });
        self.start_upstream(n);
    }

    /// The swarm of node `n` starts (`fetch_partial`): announce, sync hashes.
    pub(crate) fn on_swarm_start(&mut self, n: u32, known: u32) {
        let now = self.now;
        let node = &mut self.nodes[n as usize];
        if !node.alive || node.swarming {
            return;
        }
        node.swarming = true;
        node.known = node.known.max(known);
        node.next_announce = now;
        node.next_sync = now;
        self.events.push(now, Ev::Announce { node: n });
        self.schedule_sync(n);
        self.drain(n);
    }

    fn needs_hashes(&self, n: u32) -> bool {
        let node = &self.nodes[n as usize];
        node.alive && node.swarming && !node.syncing && !node.lease_holder && node.known < self.pieces
    }

    fn schedule_sync(&mut self, n: u32) {
        if self.needs_hashes(n) {
            let at = self.nodes[n as usize].next_sync.max(self.now);
            self.events.push(at, Ev::HashSync { node: n });
        }
    }

    /// Asks the tracker for the hashes published since the last ask.
    pub(crate) fn on_hash_sync(&mut self, n: u32) {
        if !self.needs_hashes(n) || self.nodes[n as usize].next_sync > self.now {
            return;
        }
        let node = &mut self.nodes[n as usize];
        node.syncing = true;
        let get = TrackerRequest::GetHashes { blob: self.digest, first: node.known };
        let (known, complete) = match self.tracker.handle(get, node_addr(n), self.clock.at(self.now)) {
            TrackerResponse::Hashes { first, hashes, complete, .. } => {
                (first.saturating_add(hashes.len() as u32), complete)
            }
            _ => (node.known, true),
        };
        if known == node.known && !complete {
            // The tracker holds the request until the next publish.
            self.hash_waiters.push(n);
            return;
        }
        self.events.push_after(self.now, 2 * self.half_rtt, Ev::HashesReply { node: n, known });
    }

    /// New hashes arrived: replay the announcements that waited for them.
    pub(crate) fn on_hashes_reply(&mut self, n: u32, known: u32) {
        let now = self.now;
        let at = self.clock.at(now);
        let sync = crate::model::nanos(self.driver.hash_sync);
        let node = &mut self.nodes[n as usize];
        if !node.alive {
            return;
        }
        node.syncing = false;
        // New hashes: ask again at once (the tracker holds the ask until the next publish).
        node.next_sync = if known > node.known { now } else { now + sync };
        if known > node.known {
            node.known = known;
            let (ready, wait): (Vec<_>, Vec<_>) = node.deferred.drain(..).partition(|&(_, p)| p < known);
            node.deferred = wait;
            for (key, piece) in ready {
                node.sched.peer_have(key, piece, at);
            }
            self.drain(n);
        }
        self.schedule_sync(n);
    }

    /// The holder stored a piece from upstream: publish its hash (a tracker round trip,
    /// one publish at a time), then announce it.
    pub(crate) fn on_upstream_piece(&mut self, n: u32, piece: u32) {
        let node = &mut self.nodes[n as usize];
        node.known = node.known.max(piece + 1);
        let done = node.publish_free_at.max(self.now) + 2 * self.half_rtt;
        node.publish_free_at = done;
        self.events.push(done, Ev::Published { node: n, piece });
    }

    pub(crate) fn on_published(&mut self, n: u32, piece: u32) {
        let publish = TrackerRequest::PublishHashes {
            peer_id: self.nodes[n as usize].peer_id,
            layout: self.layout(),
            first: piece,
            hashes: vec![self.piece_hash(piece)],
        };
        let reply = self.tracker.handle(publish, node_addr(n), self.clock.at(self.now));
        if !matches!(reply, TrackerResponse::Registered) {
            tracing::warn!(node = n, piece, ?reply, "hash publish refused");
        }
        // The held `GetHashes` are answered: one way back to each waiting node.
        let known = self.tracker.hashes(&self.digest).map_or(0, |(_, h, _)| h.len() as u32);
        for w in std::mem::take(&mut self.hash_waiters) {
            self.events.push_after(self.now, self.half_rtt, Ev::HashesReply { node: w, known });
        }
        let at = self.clock.at(self.now);
        self.nodes[n as usize].sched.local_piece(piece, at);
        self.drain(n);
    }

    /// The blob's layout as the lease holder publishes it.
    fn layout(&self) -> Layout {
        Layout { digest: self.digest, length: self.blob_len, piece_length: self.piece_length }
    }

    /// A stand-in for piece `piece`'s sha256 (nothing is verified in the simulator).
    pub(crate) fn piece_hash(&self, piece: u32) -> [u8; 32] {
        let mut h = self.digest.0;
        for (b, p) in h.iter_mut().zip(piece.to_le_bytes()) {
            *b ^= p;
        }
        h
    }

    fn piece_len(&self, piece: u32) -> u32 {
        let start = u64::from(piece) * u64::from(self.piece_length);
        (self.blob_len.saturating_sub(start)).min(u64::from(self.piece_length)) as u32
    }
}

/// The zone label node `z` announces.
pub fn zone_name(z: u32) -> String {
    format!("site-{z}")
}
