//! The driver of one simulated node: it carries out the actions of the real node's
//! cores over modelled links, as `peer/src/node.rs` carries them out over QUIC.
//!
//! Every decision is the core's (`swarm_core`): the [`Swarm`] of each node (peer
//! set, dials and back-off, announce cadence, piece-hash knowledge and deferred
//! `Have`s, `Have` fan-out, the scheduler, the blob's end) and its [`UploadSlots`]
//! and [`UploadLedger`] (who is served next, fresh-piece hold and re-announce). This
//! module only moves messages and bytes: a request or reply travels RTT/2, a dial
//! takes 2 RTTs (QUIC handshake + the blob handshake), a tracker request is answered
//! by the real tracker core one RTT later, a piece is a flow sender up → receiver
//! down, and the upload slot is held until the requester's acknowledgement arrives
//! (one RTT after the last byte left). The receive budget is the core's
//! `ReceiveBudget` here as in the daemon.
//!
//! The edge upgrade's start-up, the holder's publishing and the takeover of a stalled
//! lease follow `swarm_core::lease` ([`Startup`], [`Publisher`], [`TakeoverWatch`]),
//! as `peer/src/agent.rs` does.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use swarm_core::conns::Connections;
use swarm_core::lease::{
    LayoutReply, LeaseAnswer, PublishStep, Published, Publisher, StartStep, Startup, TAKEOVER_AFTER, TakeoverWatch,
};
use swarm_core::node::NodePolicy;
use swarm_core::scheduler::{PeerKey, RequestFailure};
use swarm_core::swarm::{AnnounceReply, HashesReply, PeerConn, PeerHashes, PieceOutcome, Swarm, SwarmAction};
use swarm_core::upload::{Admit, BudgetRequest, ReceiveBudget, SlotRequest, UploadLedger, UploadSlots};
use swarm_proto::msg::{Announce, LeaseReply, PeerInfo, TrackerRequest, TrackerResponse};
use swarm_proto::{Layout, PROTOCOL_VERSION, PeerId};

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

/// A simulated node: its swarm and upload cores plus the I/O state around them.
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
    /// The blob's swarm core.
    pub swarm: Swarm,
    /// Open connections by the swarm's key.
    pub links: BTreeMap<PeerKey, Link>,
    /// The node's connection bounds (the core's `Connections`, as in the daemon).
    pub conns: Connections,
    /// The earliest core wake-up already in the event queue.
    pub timer_at: Option<Nanos>,
    /// Our fetches by (peer, piece).
    pub outstanding: BTreeMap<(PeerKey, u32), FetchId>,
    /// The receive budget (the core's `ReceiveBudget`); a waiting download is its fetch.
    pub budget: ReceiveBudget<FetchId>,
    /// The node's upload slots (the core's `UploadSlots`); a waiting request is its fetch.
    pub slots: UploadSlots<FetchId>,
    /// Whether the swarm runs: from the start in-cluster; in the edge upgrade once the
    /// layout is known (`fetch_partial` in `agent.rs`).
    pub swarming: bool,
    /// When a `PublishTimer` is queued for the holder's publisher.
    pub publish_timer: Option<Nanos>,
    /// The blob's upload ledger (the core's `UploadLedger`): the fresh-piece hold of a
    /// source and its per-piece upload counts; a refused requester is named by its
    /// node and its key for this node.
    pub ledger: UploadLedger<(u32, PeerKey)>,
    /// The blob's start-up (edge upgrade), from the first `Startup` event.
    pub startup: Option<Startup>,
    /// While swarming on a blob another node streams in: the watch for a stalled holder.
    pub takeover: Option<TakeoverWatch>,
    /// As the lease holder: the piece-hash publisher.
    pub publisher: Option<Publisher>,
    /// The upstream flow of the holder's feed.
    pub upstream_flow: Option<FlowId>,
    /// The node gave the swarm up; its containerd fetches the rest from the registry.
    pub fallback: bool,
    /// Piece bytes verified from peers or upstream.
    pub downloaded: u64,
    /// Piece bytes fully sent to peers.
    pub uploaded: u64,
}

impl SimNode {
    /// A node running `swarm`.
    pub fn new(
        peer_id: PeerId,
        zone: u32,
        role: Role,
        (up, down): (ResId, ResId),
        swarm: Swarm,
        policy: &NodePolicy,
    ) -> Self {
        let pieces = swarm.scheduler().piece_count();
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
            swarm,
            links: BTreeMap::new(),
            conns: Connections::default(),
            timer_at: None,
            outstanding: BTreeMap::new(),
            budget: ReceiveBudget::new(policy.receive_budget_kib()),
            slots: UploadSlots::new(policy.upload_slots),
            swarming: false,
            publish_timer: None,
            ledger: UploadLedger::new(pieces, role == Role::Seed),
            startup: None,
            takeover: None,
            publisher: None,
            upstream_flow: None,
            fallback: false,
            downloaded: 0,
            uploaded: 0,
        }
    }
}

/// The simulated nodes run the real node's policy: every setting not given on the
/// command line is the daemon's default, and there is nothing else to set.
pub type DriverConfig = NodePolicy;

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

    /// Every live fetch.
    pub fn ids(&self) -> impl Iterator<Item = FetchId> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, (_, f))| f.is_some())
            .map(|(i, (g, _))| FetchId { idx: i as u32, generation: *g })
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
    /// Carries out every pending action of node `n`'s swarm, then re-arms its timer.
    pub(crate) fn drain(&mut self, n: u32) {
        self.drain_actions(n);
        self.arm_timer(n);
    }

    /// Carries out every pending action of node `n`'s swarm; returns how many.
    fn drain_actions(&mut self, n: u32) -> usize {
        let mut count = 0;
        if self.nodes[n as usize].fallback || !self.nodes[n as usize].alive {
            return 0;
        }
        while let Some(action) = self.nodes[n as usize].swarm.poll_action() {
            count += 1;
            match action {
                SwarmAction::Request { peer, piece } => self.request(n, peer, piece),
                SwarmAction::Cancel { peer, piece } => self.cancel(n, peer, piece),
                SwarmAction::Have { piece } => {
                    self.events.push_after(self.now, self.half_rtt, Ev::Have { node: n, piece });
                }
                SwarmAction::SendHashes { peer, range } => {
                    if let Some(l) = self.nodes[n as usize].links.get(&peer).copied() {
                        let end = range.first + range.count;
                        let ev = Ev::PeerHashes { node: l.remote, key: l.remote_key, from: n, first: range.first, end };
                        self.events.push_after(self.now, self.half_rtt, ev);
                    }
                }
                SwarmAction::SendPeers { peer, peers } => {
                    if let Some(l) = self.nodes[n as usize].links.get(&peer).copied() {
                        let ev = Ev::PexPeers { node: l.remote, key: l.remote_key, from: n, peers: peers.into() };
                        self.events.push_after(self.now, self.half_rtt, ev);
                    }
                }
                SwarmAction::Dial { addr } => match addr_node(&addr) {
                    Some(to) => self.events.push(self.now + 4 * self.half_rtt, Ev::ConnectDone { from: n, to }),
                    None => tracing::warn!(node = n, %addr, "dial to an address outside the simulation"),
                },
                SwarmAction::Close { peer, .. } => self.unlink(n, peer, false),
                SwarmAction::Announce => self.announce(n),
                SwarmAction::GetHashes { first } => self.hash_sync(n, first),
                SwarmAction::CheckBlob => self.on_complete(n),
                SwarmAction::ReleaseLease { .. } if !self.tracker_up() => {}
                SwarmAction::ReleaseLease { failed } => {
                    let release = TrackerRequest::ReleaseLease {
                        peer_id: self.nodes[n as usize].peer_id,
                        blob: self.digest,
                        failed,
                    };
                    let _ = self.tracker.handle(release, node_addr(n), self.clock.at(self.now));
                }
                SwarmAction::Abandon { reason } => tracing::warn!(node = n, %reason, "download abandoned"),
            }
        }
        count
    }

    /// Makes sure a `Timer` event is queued no later than the swarm's deadline.
    pub(crate) fn arm_timer(&mut self, n: u32) {
        let node = &mut self.nodes[n as usize];
        let Some(deadline) = node.swarm.poll_timeout() else { return };
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
        if !node.alive || node.fallback {
            return;
        }
        if node.timer_at == Some(now) {
            node.timer_at = None;
        }
        if node.swarm.poll_timeout().is_some_and(|d| d <= at) {
            node.swarm.handle_timeout(at);
            self.drain(n);
        } else {
            self.arm_timer(n);
        }
    }

    /// Every piece is in (`CheckBlob`): the whole-blob check is not modelled, it
    /// passes at once.
    fn on_complete(&mut self, n: u32) {
        let now = self.now;
        let node = &mut self.nodes[n as usize];
        if node.completed_at.is_none() {
            node.completed_at = Some(now);
            if node.counted && node.alive {
                self.pending_nodes -= 1;
            }
        }
        let at = self.clock.at(now);
        node.swarm.blob_checked(Ok(()), at);
    }

    // ------------------------------------------------------------------ downloads

    fn request(&mut self, n: u32, key: PeerKey, piece: u32) {
        let node = &self.nodes[n as usize];
        let Some(link) = node.links.get(&key).copied() else { return };
        let len = self.piece_len(piece);
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
        match self.nodes[n as usize].budget.request(id, len) {
            BudgetRequest::Granted(kib) => self.send_request(id, kib),
            BudgetRequest::Queued { seq } => {
                if let Some(f) = self.fetches.get_mut(id) {
                    f.state = FetchState::WaitBudget(seq);
                }
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
        node.budget.release(kib);
        if !node.alive {
            return;
        }
        while let Some((id, kib)) = self.nodes[n as usize].budget.poll_granted() {
            if self.fetches.get(id).is_some() {
                self.send_request(id, kib);
            } else {
                // A fetch aborted while waiting: its grant goes back.
                self.nodes[n as usize].budget.release(kib);
            }
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
            self.nodes[receiver as usize].budget.withdraw(seq);
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
                self.nodes[f.sender as usize].slots.withdraw(seq);
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
    pub(crate) fn abort_all_with(&mut self, n: u32, key: PeerKey) {
        let ids: Vec<FetchId> =
            self.nodes[n as usize].outstanding.range((key, 0)..=(key, u32::MAX)).map(|(_, &id)| id).collect();
        for id in ids {
            let Some(f) = self.fetches.get(id).copied() else { continue };
            self.nodes[n as usize].outstanding.remove(&(key, f.piece));
            if let FetchState::WaitBudget(seq) = f.state {
                self.nodes[n as usize].budget.withdraw(seq);
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
        if !sender.swarm.scheduler().have().get(f.piece) {
            self.reply(id, Reply::Missing);
            return;
        }
        let at = self.clock.at(self.now);
        let admit = sender.ledger.admit(f.piece, (f.receiver, f.key), at);
        self.reannounce(f.sender);
        if admit == Admit::Held {
            // Fresh: fetch it from its first recipient; the ledger re-announces it
            // to the requester when the hold ends.
            self.reply(id, Reply::Missing);
            if let Some(due) = self.nodes[f.sender as usize].ledger.poll_timeout() {
                let t = self.clock.nanos(due).max(self.now);
                self.events.push(t, Ev::LedgerTimer { node: f.sender });
            }
            return;
        }
        match self.nodes[f.sender as usize].slots.request(id, at) {
            SlotRequest::Granted => self.start_upload(id),
            SlotRequest::Queued { seq, deadline } => {
                if let Some(f) = self.fetches.get_mut(id) {
                    f.state = FetchState::Queued(seq);
                }
                // Always `SLOT_WAIT` ahead: a lane, not the heap.
                let wait = self.clock.nanos(deadline).saturating_sub(self.now);
                self.events.push_after(self.now, wait, Ev::QueueTimeout(id));
            }
        }
    }

    /// Sends the re-announcements of `s`'s upload ledger that are due: each reaches
    /// its requester RTT/2 later.
    pub(crate) fn reannounce(&mut self, s: u32) {
        let at = self.clock.at(self.now);
        while let Some(((node, key), piece)) = self.nodes[s as usize].ledger.poll_reannounce(at) {
            self.events.push_after(self.now, self.half_rtt, Ev::HaveTo { node, key, from: s, piece });
        }
    }

    /// A queued request waited too long for an upload slot: `Busy`.
    pub(crate) fn on_queue_timeout(&mut self, id: FetchId) {
        let Some(f) = self.fetches.get(id).copied() else { return };
        if let FetchState::Queued(seq) = f.state
            && self.nodes[f.sender as usize].slots.withdraw(seq).is_some()
        {
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
        self.nodes[f.sender as usize].ledger.count_send(f.piece);
        let flow = self.net.start(self.now, u64::from(f.len), &path[..hops], FlowTag::Fetch(id));
        if let Some(f) = self.fetches.get_mut(id) {
            f.state = FetchState::Flowing(flow);
        }
    }

    /// Frees an upload slot of `s`; the core picks the queued request that gets it.
    pub(crate) fn release_slot(&mut self, s: u32) {
        if !self.nodes[s as usize].alive {
            return;
        }
        loop {
            let node = &mut self.nodes[s as usize];
            let (slots, ledger, fetches) = (&mut node.slots, &node.ledger, &self.fetches);
            let Some(id) = slots.release(|id| fetches.get(*id).map_or(0, |f| ledger.rank(f.piece))) else { break };
            if self.fetches.get(id).is_some() {
                self.start_upload(id);
                break;
            }
            // A stale entry: the slot goes to the next request.
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
        if !self.nodes[f.receiver as usize].alive {
            // A crashed receiver takes nothing in.
            return;
        }
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
        let outcome = match reply {
            Reply::Piece => {
                node.downloaded += u64::from(f.len);
                self.received_bytes += u64::from(f.len);
                PieceOutcome::Verified
            }
            Reply::Busy => PieceOutcome::Rejected(RequestFailure::Busy),
            Reply::Missing => PieceOutcome::Rejected(RequestFailure::Missing),
        };
        node.swarm.piece_done(f.key, f.piece, outcome, at);
        // The watch looks at known hashes: they move with `Have`s (looked at here, as
        // the daemon looks when its progress moves), peers' hashes and the tracker's.
        if node.takeover.is_some() {
            self.watch_progress(n);
        }
        if reply == Reply::Piece {
            self.note_copy(f.piece);
        }
        self.drain(n);
    }

    /// A `Have` reaches the peers `n`'s swarm names now.
    pub(crate) fn on_have(&mut self, n: u32, piece: u32) {
        let mut keys = std::mem::take(&mut self.scratch_keys);
        let mut peers = std::mem::take(&mut self.scratch_links);
        peers.clear();
        {
            let sender = &mut self.nodes[n as usize];
            sender.swarm.have_recipients(piece, &mut keys);
            // Both in key order: one merged pass instead of a lookup per recipient.
            let mut links = sender.links.iter().peekable();
            for to in &keys {
                while links.next_if(|(lk, _)| **lk < to.peer).is_some() {}
                if let Some((lk, l)) = links.peek()
                    && **lk == to.peer
                {
                    peers.push((**l, to.hashes.map(|r| (r.first, r.first + r.count))));
                }
            }
        }
        let at = self.clock.at(self.now);
        // First read what every recipient's update will read, in one pass of
        // independent loads whose cache misses overlap (see `Swarm::warm_have`).
        let warm = peers.iter().fold(0u64, |acc, (l, _)| {
            let node = &self.nodes[l.remote as usize];
            let own = u64::from(node.takeover.is_some()) ^ node.timer_at.unwrap_or(0);
            acc ^ own ^ node.swarm.warm_have(l.remote_key, piece)
        });
        std::hint::black_box(warm);
        // Then all the `have`s, then all the drains: the same result as one after
        // the other (a drain touches no other node's swarm — except for a `Close`
        // after bad pieces, never simulated).
        for (l, hashes) in &peers {
            self.haves_delivered += 1;
            let swarm = &mut self.nodes[l.remote as usize].swarm;
            // The piece's hash rides with its `Have` (the driver sends it first).
            if let Some((first, end)) = *hashes {
                swarm.peer_hashes(l.remote_key, stored_hashes(swarm.known_hashes(), first, end), at);
            }
            swarm.have(l.remote_key, piece, at);
        }
        for (l, hashes) in &peers {
            // New hashes are the holder's progress: the takeover watch looks (as the
            // daemon's does when its progress moves).
            if hashes.is_some() && self.nodes[l.remote as usize].takeover.is_some() {
                self.watch_progress(l.remote);
            }
            // A `have` adds a deadline only with a `Request`: a node that emitted
            // nothing needs no timer check (`poll_timeout` is a cache miss per node,
            // a few percent of a large run).
            if self.drain_actions(l.remote) > 0 {
                self.arm_timer(l.remote);
            }
        }
        self.scratch_links = peers;
        self.scratch_keys = keys;
    }

    /// Piece hashes from `from` reach `n` (its key for `from` is `key`).
    pub(crate) fn on_peer_hashes(&mut self, n: u32, key: PeerKey, from: u32, first: u32, end: u32) {
        let at = self.clock.at(self.now);
        let node = &mut self.nodes[n as usize];
        if !node.alive || node.links.get(&key).is_none_or(|l| l.remote != from) {
            return;
        }
        let stored = stored_hashes(node.swarm.known_hashes(), first, end);
        node.swarm.peer_hashes(key, stored, at);
        if node.takeover.is_some() {
            self.watch_progress(n);
        }
        self.drain(n);
    }

    /// Peers of the blob from `from` (peer exchange) reach `n`.
    pub(crate) fn on_pex_peers(&mut self, n: u32, key: PeerKey, from: u32, peers: &[PeerInfo]) {
        let at = self.clock.at(self.now);
        let node = &mut self.nodes[n as usize];
        if !node.alive || node.links.get(&key).is_none_or(|l| l.remote != from) {
            return;
        }
        node.swarm.peers_offered(peers, at);
        self.drain(n);
    }

    /// A source's re-announcement of a piece it refused while fresh reaches one peer.
    pub(crate) fn on_have_to(&mut self, n: u32, key: PeerKey, from: u32, piece: u32) {
        let at = self.clock.at(self.now);
        let node = &mut self.nodes[n as usize];
        if !node.alive || node.links.get(&key).is_none_or(|l| l.remote != from) {
            return;
        }
        self.haves_delivered += 1;
        node.swarm.have(key, piece, at);
        if self.drain_actions(n) > 0 {
            self.arm_timer(n);
        }
    }

    // ---------------------------------------------------------------- connections

    /// `Announce`: the real tracker core answers; the reply arrives one RTT later.
    fn announce(&mut self, n: u32) {
        let now = self.now;
        if !self.tracker_up() {
            let failed = Ev::TrackerReply { node: n, peers: Box::new([]), interval: 0 };
            self.events.push(now + 2 * self.half_rtt, failed);
            return;
        }
        let node = &self.nodes[n as usize];
        let state = node.swarm.announce_state();
        let ann = Announce {
            peer_id: node.peer_id,
            blob: self.digest,
            listen_port: LISTEN_PORT,
            advertise: None,
            zone: zone_name(node.zone),
            have: state.have,
            complete: state.complete,
            num_want: state.num_want,
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

    /// The tracker's reply reaches the node (`interval` 0: the announce failed).
    pub(crate) fn on_tracker_reply(&mut self, n: u32, peers: &[PeerInfo], interval: Nanos) {
        let at = self.clock.at(self.now);
        let node = &mut self.nodes[n as usize];
        if !node.alive {
            return;
        }
        let reply = if interval == 0 {
            AnnounceReply::Failed
        } else {
            AnnounceReply::Peers { peers, interval: std::time::Duration::from_nanos(interval) }
        };
        node.swarm.announced(reply, at);
        self.drain(n);
    }

    /// A dial finished: link the two nodes unless the target is gone.
    pub(crate) fn on_connect_done(&mut self, from: u32, to: u32) {
        let at = self.clock.at(self.now);
        if !self.nodes[from as usize].alive {
            return;
        }
        if !self.nodes[to as usize].alive {
            self.nodes[from as usize].swarm.dial_failed(node_addr(to), at);
            self.drain(from);
            return;
        }
        self.link(from, to);
    }

    /// Connects `a` (the dialler) and `b`, if both swarms accept the connection.
    fn link(&mut self, a: u32, b: u32) {
        let at = self.clock.at(self.now);
        let (id_a, id_b) = (self.nodes[a as usize].peer_id, self.nodes[b as usize].peer_id);
        let conn = |peer_id, addr, outbound| PeerConn { peer_id, addr, outbound, version: PROTOCOL_VERSION };
        // The connection bounds first: the dialler does not dial past its own, the
        // other side refuses the attempt past its own; either way a failed dial.
        if self.nodes[a as usize].conns.open(node_addr(b)).is_err() {
            self.nodes[a as usize].swarm.dial_failed(node_addr(b), at);
            self.drain(a);
            return;
        }
        if self.nodes[b as usize].conns.open(node_addr(a)).is_err() {
            self.nodes[a as usize].conns.closed(node_addr(b));
            self.nodes[a as usize].swarm.dial_failed(node_addr(b), at);
            self.drain(a);
            return;
        }
        let release = |nodes: &mut [SimNode]| {
            nodes[a as usize].conns.closed(node_addr(b));
            nodes[b as usize].conns.closed(node_addr(a));
        };
        let Ok(ka) = self.nodes[a as usize].swarm.connected(conn(id_b, node_addr(b), true), at) else {
            release(&mut self.nodes);
            self.drain(a);
            return;
        };
        let Ok(kb) = self.nodes[b as usize].swarm.connected(conn(id_a, node_addr(a), false), at) else {
            release(&mut self.nodes);
            self.nodes[a as usize].swarm.closed(ka, at);
            self.drain(a);
            self.drain(b);
            return;
        };
        self.nodes[a as usize].links.insert(ka, Link { remote: b, remote_key: kb });
        self.nodes[b as usize].links.insert(kb, Link { remote: a, remote_key: ka });
        for n in [a, b] {
            let links = self.nodes[n as usize].links.len();
            if links > self.peak_links.0 {
                self.peak_links = (links, n);
            }
        }
        let bits_a = self.nodes[a as usize].swarm.scheduler().have().clone();
        let bits_b = self.nodes[b as usize].swarm.scheduler().have().clone();
        self.nodes[a as usize].swarm.bitfield(ka, bits_b, at);
        self.nodes[b as usize].swarm.bitfield(kb, bits_a, at);
        self.drain(a);
        self.drain(b);
    }

    /// Closes the connection `n` knows as `key`, on both sides. With `remove_here`,
    /// `n`'s swarm is told too (after a `Close` action it already forgot the peer).
    pub(crate) fn unlink(&mut self, n: u32, key: PeerKey, remove_here: bool) {
        let Some(link) = self.nodes[n as usize].links.remove(&key) else { return };
        let r = link.remote;
        self.nodes[r as usize].links.remove(&link.remote_key);
        self.nodes[n as usize].conns.closed(node_addr(r));
        self.nodes[r as usize].conns.closed(node_addr(n));
        self.abort_all_with(n, key);
        self.abort_all_with(r, link.remote_key);
        let at = self.clock.at(self.now);
        if remove_here {
            self.nodes[n as usize].swarm.closed(key, at);
        }
        self.nodes[r as usize].swarm.closed(link.remote_key, at);
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
        let at = self.clock.at(now);
        let node = &mut self.nodes[n as usize];
        if !node.alive || node.swarming || node.fallback {
            return;
        }
        let startup = *node.startup.get_or_insert_with(|| Startup::new(at));
        if !self.tracker_up() {
            // `ask_tracker` fails: the mirror answers 503 and containerd goes upstream.
            self.fall_back(n, "the tracker does not answer");
            return;
        }
        let get = TrackerRequest::GetHashes { blob: self.digest, first: 0 };
        if let TrackerResponse::Hashes { first, hashes, complete, .. } = self.tracker.handle(get, node_addr(n), at) {
            let known = first.saturating_add(hashes.len() as u32);
            let StartStep::Swarm { watch } = startup.layout(LayoutReply::Published { complete }) else { return };
            self.events.push(now + 2 * self.half_rtt, Ev::SwarmStart { node: n, known, watch });
            return;
        }
        let acquire = TrackerRequest::AcquireLease { peer_id: self.nodes[n as usize].peer_id, blob: self.digest };
        let answer = match self.tracker.handle(acquire, node_addr(n), at) {
            TrackerResponse::Lease(reply) => LeaseAnswer::from(&reply),
            other => LeaseAnswer::Failed { reason: format!("lease request refused: {other:?}") },
        };
        // Two round trips: GetHashes, then AcquireLease.
        self.events.push(now + 4 * self.half_rtt, Ev::LeaseReply { node: n, answer });
    }

    pub(crate) fn on_lease_reply(&mut self, n: u32, answer: LeaseAnswer) {
        let now = self.now;
        let at = self.clock.at(now);
        let node = &mut self.nodes[n as usize];
        if !node.alive {
            return;
        }
        let Some(startup) = node.startup else { return };
        match startup.lease(answer, at) {
            StartStep::Lead { resume_from } => {
                if node.role != Role::Holder {
                    tracing::debug!(node = n, "the upstream lease went to a node not planned as the holder");
                    node.role = Role::Holder;
                }
                node.swarm.hold_lease();
                node.ledger.enable_hold();
                node.publisher = Some(Publisher::new(resume_from, at));
                // `lead`: open the upstream blob (one WAN round trip), publish the layout.
                self.events.push(now + self.wan_rtt, Ev::UpstreamOpen { node: n });
            }
            StartStep::Retry { after } => {
                self.events.push(now + crate::model::nanos(after), Ev::Startup { node: n });
            }
            StartStep::Unavailable { reason } => self.fall_back(n, &reason),
            StartStep::Swarm { .. } | StartStep::AcquireLease => {}
        }
    }

    /// A waiting node's takeover watch looks at its progress (`agent.rs`'s
    /// `watch_for_takeover`): after a quiet spell it asks for the lease, and when
    /// granted resumes the upstream fetch at its first missing piece.
    pub(crate) fn watch_progress(&mut self, n: u32) {
        let at = self.clock.at(self.now);
        let node = &mut self.nodes[n as usize];
        let Some(watch) = node.takeover.as_mut() else { return };
        if !node.alive || node.swarm.is_complete() {
            node.takeover = None;
            return;
        }
        if !watch.observe(node.swarm.known_hashes(), self.pieces, at) {
            return;
        }
        let peer_id = node.peer_id;
        if !self.tracker_up() {
            return;
        }
        let acquire = TrackerRequest::AcquireLease { peer_id, blob: self.digest };
        let reply = self.tracker.handle(acquire, node_addr(n), at);
        let TrackerResponse::Lease(LeaseReply::Granted { resume_from, .. }) = reply else { return };
        let node = &mut self.nodes[n as usize];
        let first_missing = node.swarm.scheduler().have().zeros().next();
        let from = TakeoverWatch::resume_from(first_missing, resume_from);
        tracing::info!(node = n, from, t = crate::model::secs(self.now), "taking the upstream lease over");
        node.takeover = None;
        node.role = Role::Holder;
        node.swarm.hold_lease();
        node.ledger.enable_hold();
        node.publisher = Some(Publisher::new(from, at));
        self.takeovers += 1;
        // The lease reply comes back one RTT later; the ranged GET takes a WAN RTT.
        let t = self.now + 2 * self.half_rtt + self.wan_rtt;
        self.events.push(t, Ev::UpstreamFrom { node: n, piece: from });
    }

    /// A `TakeoverCheck` event: look at the watch, and come back when it is due again.
    pub(crate) fn on_takeover_check(&mut self, n: u32) {
        self.watch_progress(n);
        if let Some(w) = &self.nodes[n as usize].takeover {
            let t = self.clock.nanos(w.poll_timeout()).max(self.now + 1);
            self.events.push(t, Ev::TakeoverCheck { node: n });
        }
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
        self.events.push(now + 2 * self.half_rtt, Ev::SwarmStart { node: n, known: 0, watch: false });
        self.start_upstream_piece(n, 0);
    }

    /// The swarm of node `n` starts (`fetch_partial`), knowing `known` piece hashes;
    /// with `watch`, it watches the lease holder's progress.
    pub(crate) fn on_swarm_start(&mut self, n: u32, known: u32, watch: bool) {
        let at = self.clock.at(self.now);
        let node = &mut self.nodes[n as usize];
        if !node.alive || node.swarming {
            return;
        }
        node.swarming = true;
        node.swarm.hashes_known(known, at);
        node.swarm.start(at);
        if watch {
            node.takeover = Some(TakeoverWatch::new(node.swarm.known_hashes(), at));
            self.events.push(self.now + crate::model::nanos(TAKEOVER_AFTER), Ev::TakeoverCheck { node: n });
        }
        self.drain(n);
    }

    /// `GetHashes`: the tracker core holds the request until the next publish when it
    /// has nothing new, else the answer arrives one RTT later.
    fn hash_sync(&mut self, n: u32, first: u32) {
        if !self.tracker_up() {
            self.events.push_after(self.now, 2 * self.half_rtt, Ev::HashesReply { node: n, known: None });
            return;
        }
        let get = TrackerRequest::GetHashes { blob: self.digest, first };
        let (known, complete) = match self.tracker.handle(get, node_addr(n), self.clock.at(self.now)) {
            TrackerResponse::Hashes { first, hashes, complete, .. } => {
                (first.saturating_add(hashes.len() as u32), complete)
            }
            other => {
                tracing::warn!(node = n, ?other, "hash request refused");
                (first, true)
            }
        };
        if known == first && !complete {
            self.hash_waiters.push(n);
            return;
        }
        self.events.push_after(self.now, 2 * self.half_rtt, Ev::HashesReply { node: n, known: Some(known) });
    }

    /// The tracker's hashes reach the node.
    pub(crate) fn on_hashes_reply(&mut self, n: u32, known: Option<u32>) {
        let at = self.clock.at(self.now);
        let node = &mut self.nodes[n as usize];
        if !node.alive || node.fallback {
            return;
        }
        node.swarm.hashes(known.map_or(HashesReply::Failed, HashesReply::Known), at);
        if node.takeover.is_some() {
            self.watch_progress(n);
        }
        self.drain(n);
    }

    /// The holder stored a piece from upstream: its swarm announces it (the hash
    /// rides with the `Have`s) and the publisher hears of the new hash; the feed
    /// never waits for the tracker.
    pub(crate) fn on_upstream_piece(&mut self, n: u32, piece: u32) {
        let at = self.clock.at(self.now);
        let node = &mut self.nodes[n as usize];
        node.swarm.upstream_piece(piece, at);
        if let Some(p) = node.publisher.as_mut() {
            p.known(node.swarm.known_hashes());
        }
        self.drain(n);
        self.publish(n);
    }

    /// Sends the publish the holder's publisher has due, if any (the real tracker core
    /// answers it; the answer arrives one RTT later, as does a failure while the
    /// tracker is down), else queues a `PublishTimer` for when one is due.
    pub(crate) fn publish(&mut self, n: u32) {
        let now = self.now;
        let at = self.clock.at(now);
        let node = &mut self.nodes[n as usize];
        if !node.alive || node.fallback || node.swarm.is_complete() {
            node.publisher = None;
            return;
        }
        let Some(publisher) = node.publisher.as_mut() else { return };
        if publisher.confirmed() >= self.pieces {
            node.publisher = None;
            return;
        }
        let Some(p) = publisher.poll(at) else {
            if let Some(t) = publisher.poll_timeout().map(|t| self.clock.nanos(t).max(now + 1))
                && node.publish_timer.is_none_or(|q| t < q)
            {
                node.publish_timer = Some(t);
                self.events.push(t, Ev::PublishTimer { node: n });
            }
            return;
        };
        let peer_id = node.peer_id;
        let answer = if self.tracker_up() {
            let publish = TrackerRequest::PublishHashes {
                peer_id,
                layout: self.layout(),
                first: p.first,
                hashes: (p.first..p.first + p.count).map(|i| self.piece_hash(i)).collect(),
            };
            let reply = self.tracker.handle(publish, node_addr(n), at);
            // The held `GetHashes` are answered: one way back to each waiting node.
            let known = self.tracker.hashes(&self.digest).map_or(0, |(_, h, _)| h.len() as u32);
            for w in std::mem::take(&mut self.hash_waiters) {
                self.events.push_after(now, self.half_rtt, Ev::HashesReply { node: w, known: Some(known) });
            }
            match reply {
                TrackerResponse::Registered => Published::Ok,
                other => {
                    tracing::debug!(node = n, ?other, "hash publish refused");
                    Published::Refused
                }
            }
        } else {
            Published::Unreachable
        };
        self.events.push(now + 2 * self.half_rtt, Ev::PublishReply { node: n, answer });
    }

    /// The tracker's answer to the holder's publish arrives.
    pub(crate) fn on_publish_reply(&mut self, n: u32, answer: Published) {
        let at = self.clock.at(self.now);
        let node = &mut self.nodes[n as usize];
        let Some(publisher) = node.publisher.as_mut() else { return };
        if !node.alive {
            return;
        }
        if publisher.published(answer, at) == PublishStep::Lost {
            node.publisher = None;
            self.fall_back(n, "another node holds the upstream lease now");
            return;
        }
        self.publish(n);
    }

    /// A `PublishTimer` is due.
    pub(crate) fn on_publish_timer(&mut self, n: u32) {
        let node = &mut self.nodes[n as usize];
        if node.publish_timer == Some(self.now) {
            node.publish_timer = None;
        }
        self.publish(n);
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

    pub(crate) fn piece_len(&self, piece: u32) -> u32 {
        let start = u64::from(piece) * u64::from(self.piece_length);
        (self.blob_len.saturating_sub(start)).min(u64::from(self.piece_length)) as u32
    }
}

/// The zone label node `z` announces.
pub fn zone_name(z: u32) -> String {
    format!("site-{z}")
}

/// What a node knowing the hashes of pieces `0..known` makes of hashes `first..end`
/// from a peer (the daemon checks and stores them; here every hash is right).
fn stored_hashes(known: u32, first: u32, end: u32) -> PeerHashes {
    let known = if first <= known { known.max(end) } else { known };
    PeerHashes::Stored { known }
}
