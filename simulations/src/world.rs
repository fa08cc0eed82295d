//! The simulated cluster: every node, the tracker, the flow network and the event
//! loop that ties them together.
//!
//! This module owns the event types, the main loop (earliest of the next event and
//! the next flow completion, flows first on ties), the tracker core (called in
//! process, its reply delivered one RTT later), the upstream registry (the lease
//! holder's single streamed GET, cut into pieces as they arrive) and churn (a node
//! leaves: the tracker is told, its connections close, every transfer to or from it
//! stops; a new node joins and announces). The per-node reactions live in
//! [`crate::node`].

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swarm_core::lease::{LeaseAnswer, Published};
use swarm_core::node::IDLE_TIMEOUT;
use swarm_core::scheduler::{PeerKey, SchedulerStats};
use swarm_core::swarm::Swarm;
use swarm_core::tracker::{TrackerConfig, TrackerState};
use swarm_proto::msg::{PeerInfo, TrackerRequest, TrackerResponse};
use swarm_proto::{Bitfield, Digest, Metainfo, PeerId};

use crate::model::{Clock, EventQueue, FlowNet, Nanos, NetStats, ResId, nanos};
use crate::node::{DriverConfig, FetchId, FetchState, Fetches, Link, Role, SimNode, node_addr, zone_name};

/// Something that happens at an instant.
#[derive(Debug)]
pub(crate) enum Ev {
    /// The tracker's answer reaches the node (`interval` 0: the announce failed).
    TrackerReply {
        node: u32,
        peers: Box<[PeerInfo]>,
        interval: Nanos,
    },
    /// A dial from `from` to `to` completed (or failed, if `to` is gone).
    ConnectDone {
        from: u32,
        to: u32,
    },
    /// The node's scheduler may have a deadline due.
    Timer {
        node: u32,
    },
    RequestArrive(FetchId),
    QueueTimeout(FetchId),
    /// The requester's acknowledgement of an upload's last byte reaches its sender,
    /// `node`, and frees the upload slot.
    SlotFree {
        node: u32,
    },
    Reply(FetchId),
    CancelArrive(FetchId),
    /// A `Have` from `node` reaches its peers.
    Have {
        node: u32,
        piece: u32,
    },
    /// A re-announcement of `node`'s upload ledger may be due.
    LedgerTimer {
        node: u32,
    },
    /// A source's `Have` from `from` reaches one peer, `node`, whose key for it is `key`.
    HaveTo {
        node: u32,
        key: PeerKey,
        from: u32,
        piece: u32,
    },
    Leave {
        node: u32,
    },
    Join {
        node: u32,
    },
    /// The upstream registry starts answering the lease holder's GET.
    UpstreamOpen {
        node: u32,
    },
    /// Edge start-up: look for the layout, else ask for the lease.
    Startup {
        node: u32,
    },
    /// The answer to the node's `AcquireLease`.
    LeaseReply {
        node: u32,
        answer: LeaseAnswer,
    },
    /// The layout (and `known` hashes) are known: the node's swarm starts (with
    /// `watch`, watching the holder's progress for a takeover).
    SwarmStart {
        node: u32,
        known: u32,
        watch: bool,
    },
    /// Time to look at the node's takeover watch.
    TakeoverCheck {
        node: u32,
    },
    /// A node that took the lease over starts streaming from `piece`.
    UpstreamFrom {
        node: u32,
        piece: u32,
    },
    /// Fault: the lease holder crashes.
    KillHolder,
    /// Fault: the tracker stops answering (until the window ends).
    TrackerDown,
    /// Fault: some downloading nodes crash (to come back with `Rejoin`).
    RestartCrash,
    /// A crashed node restarts.
    Rejoin {
        node: u32,
    },
    /// QUIC's idle timeout closes what is left of a crashed node's connections.
    IdleClose {
        node: u32,
    },
    /// The tracker's hashes reach the node: it now knows `known` of them (`None`:
    /// the request failed).
    HashesReply {
        node: u32,
        known: Option<u32>,
    },
    /// The tracker's answer to the holder's publish reaches it.
    PublishReply {
        node: u32,
        answer: Published,
    },
    /// The holder's publisher may have a publish (or a renewal) due.
    PublishTimer {
        node: u32,
    },
    /// Piece hashes `first..end` from `from` reach `node` (its key for `from` is `key`).
    PeerHashes {
        node: u32,
        key: PeerKey,
        from: u32,
        first: u32,
        end: u32,
    },
    /// Peers of the blob from `from` reach `node` (peer exchange).
    PexPeers {
        node: u32,
        key: PeerKey,
        from: u32,
        peers: Box<[PeerInfo]>,
    },
    /// Log a progress line (with `--progress`).
    Progress,
}

impl Ev {
    /// Index into [`EVENT_KINDS`].
    fn kind(&self) -> usize {
        match self {
            Ev::TrackerReply { .. } => 1,
            Ev::ConnectDone { .. } => 2,
            Ev::Timer { .. } => 3,
            Ev::RequestArrive(_) => 4,
            Ev::QueueTimeout(_) | Ev::SlotFree { .. } | Ev::LedgerTimer { .. } => 5,
            Ev::Reply(_) => 6,
            Ev::CancelArrive(_) => 7,
            Ev::Have { .. } | Ev::HaveTo { .. } => 8,
            Ev::Leave { .. } | Ev::Join { .. } => 9,
            Ev::UpstreamOpen { .. }
            | Ev::Progress
            | Ev::Startup { .. }
            | Ev::LeaseReply { .. }
            | Ev::SwarmStart { .. }
            | Ev::TakeoverCheck { .. }
            | Ev::UpstreamFrom { .. }
            | Ev::KillHolder
            | Ev::TrackerDown
            | Ev::RestartCrash
            | Ev::Rejoin { .. }
            | Ev::IdleClose { .. }
            | Ev::PublishReply { .. }
            | Ev::PublishTimer { .. } => 10,
            Ev::PeerHashes { .. } | Ev::PexPeers { .. } => 8,
            Ev::HashesReply { .. } => 11,
        }
    }
}

/// Names of the event kinds counted in [`RunOutcome::events_by_kind`]; the last is
/// flow completions.
pub const EVENT_KINDS: [&str; 13] = [
    "announce",
    "tracker_reply",
    "connect",
    "timer",
    "request",
    "queue_timeout",
    "reply",
    "cancel",
    "have",
    "churn",
    "other",
    "hash_sync",
    "flow_done",
];

/// What a flow carries.
#[derive(Clone, Copy, Debug)]
pub(crate) enum FlowTag {
    /// A piece between two nodes.
    Fetch(FetchId),
    /// Piece `piece` of the upstream stream to the lease holder.
    Upstream { node: u32, piece: u32 },
    /// A node that gave the swarm up fetching the rest of the blob from the registry.
    Fallback { node: u32 },
}

/// One node of a scenario.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub role: Role,
    pub zone: u32,
    /// Upload capacity, bytes per second.
    pub up: f64,
    /// Download capacity, bytes per second.
    pub down: f64,
    /// When the node starts (`None`: at time zero).
    pub join_at: Option<Nanos>,
    /// When the node leaves (`None`: never).
    pub leave_at: Option<Nanos>,
}

/// Everything a run needs.
#[derive(Clone, Debug)]
pub struct Setup {
    pub seed: u64,
    pub blob_len: u64,
    pub piece_length: u32,
    pub nodes: Vec<NodeSpec>,
    /// The upstream registry's egress, bytes per second.
    pub upstream: f64,
    /// Sites; with more than one, each has a shared link of `zone_link` each way.
    pub zones: u32,
    pub zone_link: f64,
    pub rtt: Duration,
    pub wan_rtt: Duration,
    pub driver: DriverConfig,
    pub tracker: TrackerConfig,
    /// Give up at this virtual time.
    pub max_time: Duration,
    /// Log progress (pieces held, active flows) this often, at info level.
    pub progress: Option<Duration>,
    /// Faults to inject.
    pub faults: Faults,
    /// Edge upgrade: the blob is not registered; nodes go through the upstream lease
    /// and incremental hashes (`agent.rs`). Otherwise the seed has registered the
    /// metainfo before the run and every node knows every hash.
    pub lease: bool,
}

/// The outcome of one node.
#[derive(Clone, Debug)]
pub struct NodeOutcome {
    pub role: Role,
    pub counted: bool,
    pub up: f64,
    pub down: f64,
    pub joined_at: Nanos,
    pub left_at: Option<Nanos>,
    pub completed_at: Option<Nanos>,
    pub downloaded: u64,
    pub uploaded: u64,
}

/// The raw outcome of a run.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    pub nodes: Vec<NodeOutcome>,
    /// Virtual time when the run ended.
    pub end: Nanos,
    /// Whether it ended because `max_time` passed.
    pub timed_out: bool,
    /// When every piece had reached some node through the swarm at least once (left
    /// the seed or lease holder).
    pub all_out_at: Option<Nanos>,
    /// When the lease holder had the last upstream byte.
    pub upstream_done_at: Option<Nanos>,
    /// Bytes that crossed the sites' inbound links (with `--zones` > 1).
    pub zone_in_bytes: f64,
    /// `Have`s delivered (one per connected peer not known to hold the piece).
    pub haves_delivered: u64,
    /// The most connections any node had at once, and that node.
    pub peak_links: (usize, u32),
    /// Upstream leases taken over from a stalled holder, and nodes that fell back to
    /// the registry.
    pub takeovers: u32,
    pub fallbacks: u32,
    pub restarts: u32,
    pub events: u64,
    /// Events by kind, in the order of [`EVENT_KINDS`].
    pub events_by_kind: [u64; EVENT_KINDS.len()],
    pub uplink_bytes: u64,
    pub received_bytes: u64,
    pub uploaded_bytes: u64,
    pub wasted_bytes: f64,
    pub net: NetStats,
    pub sched: SchedulerStats,
}

/// The simulated cluster. See the module docs.
pub struct World {
    pub(crate) clock: Clock,
    pub(crate) now: Nanos,
    pub(crate) events: EventQueue<Ev>,
    pub(crate) net: FlowNet<FlowTag>,
    pub(crate) nodes: Vec<SimNode>,
    pub(crate) fetches: Fetches,
    pub(crate) tracker: TrackerState,
    pub(crate) digest: Digest,
    pub(crate) blob_len: u64,
    pub(crate) piece_length: u32,
    pub(crate) pieces: u32,
    pub(crate) half_rtt: Nanos,
    /// Nodes whose `GetHashes` the tracker holds until the next publish.
    pub(crate) hash_waiters: Vec<u32>,
    /// Per site: (outbound, inbound) link; empty with one site.
    pub(crate) zone_links: Vec<(ResId, ResId)>,
    upstream: ResId,
    pub(crate) wan_rtt: Nanos,
    max_time: Nanos,
    specs: Vec<NodeSpec>,
    progress: Option<Nanos>,
    lease: bool,
    /// Sequence numbers for FIFO queues.
    /// Counted nodes alive and not complete.
    pub(crate) pending_nodes: usize,
    /// Joins and leaves still to happen.
    pending_churn: usize,
    pub(crate) received_bytes: u64,
    pub(crate) uploaded_bytes: u64,
    pub(crate) wasted_bytes: f64,
    uplink_bytes: u64,
    /// Per piece: copies verified from peers so far.
    copies: Vec<u32>,
    pieces_out: u32,
    all_out_at: Option<Nanos>,
    upstream_done_at: Option<Nanos>,
    pub(crate) scratch_links: Vec<(Link, Option<(u32, u32)>)>,
    pub(crate) scratch_keys: Vec<swarm_core::swarm::HaveTo>,
    /// `Have`s delivered to a peer.
    pub(crate) haves_delivered: u64,
    pub(crate) peak_links: (usize, u32),
    pub(crate) faults: Faults,
    /// The node killed as lease holder.
    pub(crate) killed: Option<u32>,
    /// Lease takeovers, fallbacks to the registry and restarted nodes.
    pub(crate) takeovers: u32,
    pub(crate) fallbacks: u32,
    pub(crate) restarts: u32,
    /// The nodes' policy (a restarted node gets new cores).
    pub(crate) policy: DriverConfig,
}

/// Faults injected into a run (virtual times from the start).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// The upstream lease holder crashes at this time.
    pub kill_holder_at: Option<Nanos>,
    /// The tracker answers nothing from `.0` for `.1`.
    pub tracker_down: Option<(Nanos, Nanos)>,
    /// At `.0`, `.1` downloading nodes (not the lease holder) crash; each comes back
    /// `.2` later with its verified pieces, a new peer id and nothing else.
    pub restart: Option<(Nanos, u32, Nanos)>,
}

impl World {
    /// Builds the cluster of `setup`; nothing runs until [`World::run`].
    pub fn new(setup: Setup) -> anyhow::Result<Self> {
        let Setup {
            seed,
            blob_len,
            piece_length,
            nodes: specs,
            upstream,
            zones,
            zone_link,
            rtt,
            wan_rtt,
            driver,
            tracker,
            max_time,
            progress,
            faults,
            lease,
        } = setup;
        anyhow::ensure!(blob_len > 0 && piece_length > 0, "empty blob");
        anyhow::ensure!(specs.len() < 100_000, "at most 99,999 nodes (one 198.18.0.0/15 address each)");
        let pieces = u32::try_from(blob_len.div_ceil(u64::from(piece_length)))?;
        let mut rng = StdRng::seed_from_u64(seed);
        let digest = Digest(rng.r#gen());
        let metainfo =
            Metainfo { digest, length: blob_len, piece_length, piece_hashes: vec![[0u8; 32]; pieces as usize] };
        let clock = Clock::new(std::time::Instant::now());
        let mut tracker = TrackerState::new(tracker, rng.r#gen());
        if !lease {
            match tracker.handle(TrackerRequest::Register { metainfo }, node_addr(0), clock.at(0)) {
                TrackerResponse::Registered => {}
                other => anyhow::bail!("the tracker refused the blob: {other:?}"),
            }
        }
        let mut net = FlowNet::default();
        let upstream = net.add_resource(upstream);
        let zone_links = if zones > 1 {
            (0..zones).map(|_| (net.add_resource(zone_link), net.add_resource(zone_link))).collect()
        } else {
            Vec::new()
        };
        let mut nodes = Vec::with_capacity(specs.len());
        for spec in &specs {
            let up = net.add_resource(spec.up);
            let down = net.add_resource(spec.down);
            let have = if spec.role == Role::Seed { Bitfield::full(pieces) } else { Bitfield::new(pieces) };
            let peer_id = PeerId(rng.r#gen());
            let known = if lease { 0 } else { pieces };
            let (zone, seed) = (zone_name(spec.zone), rng.r#gen());
            let swarm = Swarm::new(peer_id, zone, &driver, piece_length, have, known, seed, clock.at(0));
            let node = SimNode::new(peer_id, spec.zone, spec.role, (up, down), swarm, &driver);
            nodes.push(node);
        }
        Ok(Self {
            clock,
            now: 0,
            events: EventQueue::default(),
            net,
            nodes,
            fetches: Fetches::default(),
            tracker,
            digest,
            blob_len,
            piece_length,
            pieces,
            half_rtt: nanos(rtt) / 2,
            hash_waiters: Vec::new(),
            zone_links,
            upstream,
            wan_rtt: nanos(wan_rtt),
            max_time: nanos(max_time),
            specs,
            progress: progress.map(nanos).filter(|&p| p > 0),
            lease,
            pending_nodes: 0,
            pending_churn: 0,
            received_bytes: 0,
            uploaded_bytes: 0,
            wasted_bytes: 0.0,
            uplink_bytes: 0,
            copies: vec![0; pieces as usize],
            pieces_out: 0,
            all_out_at: None,
            upstream_done_at: None,
            scratch_links: Vec::new(),
            scratch_keys: Vec::new(),
            haves_delivered: 0,
            peak_links: (0, 0),
            faults,
            killed: None,
            takeovers: 0,
            fallbacks: 0,
            restarts: 0,
            policy: driver.clone(),
        })
    }

    /// Runs until every counted node that stays has the blob (or `max_time`).
    pub fn run(mut self) -> RunOutcome {
        if let Some(t) = self.faults.kill_holder_at {
            self.events.push(t, Ev::KillHolder);
        }
        if let Some((t, _)) = self.faults.tracker_down {
            self.events.push(t, Ev::TrackerDown);
        }
        if let Some((t, _, _)) = self.faults.restart {
            self.pending_churn += 1;
            self.events.push(t, Ev::RestartCrash);
        }
        for i in 0..self.nodes.len() as u32 {
            let spec = &self.specs[i as usize];
            let (join, leave) = (spec.join_at, spec.leave_at);
            match join {
                None => self.start_node(i),
                Some(t) => {
                    self.pending_churn += 1;
                    self.events.push(t, Ev::Join { node: i });
                }
            }
            if let Some(t) = leave {
                self.pending_churn += 1;
                self.events.push(t, Ev::Leave { node: i });
            }
        }
        if self.progress.is_some() {
            self.events.push(0, Ev::Progress);
        }
        let mut processed = 0u64;
        let mut by_kind = [0u64; EVENT_KINDS.len()];
        let mut timed_out = false;
        loop {
            if self.pending_nodes == 0 && self.pending_churn == 0 {
                break;
            }
            let next_flow = self.net.next_finish();
            let next_event = self.events.peek_time();
            let flow_first = match (next_flow, next_event) {
                (Some((tf, _)), Some(te)) => tf <= te,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let t =
                if flow_first { next_flow.map_or(Nanos::MAX, |(t, _)| t) } else { next_event.unwrap_or(Nanos::MAX) };
            if t > self.max_time {
                timed_out = true;
                break;
            }
            self.now = t;
            processed += 1;
            if flow_first {
                by_kind[EVENT_KINDS.len() - 1] += 1;
                if let Some((_, id)) = next_flow
                    && let Some((tag, bytes, _)) = self.net.end(id, t)
                {
                    self.on_flow_done(tag, bytes);
                }
            } else if let Some((_, ev)) = self.events.pop() {
                by_kind[ev.kind()] += 1;
                self.dispatch(ev);
            }
        }
        let mut sched = SchedulerStats::default();
        for n in &self.nodes {
            add_stats(&mut sched, &n.swarm.scheduler().stats());
        }
        RunOutcome {
            nodes: self
                .nodes
                .iter()
                .zip(&self.specs)
                .map(|(n, s)| NodeOutcome {
                    role: n.role,
                    counted: n.counted,
                    up: s.up,
                    down: s.down,
                    joined_at: n.joined_at,
                    left_at: n.left_at,
                    completed_at: n.completed_at,
                    downloaded: n.downloaded,
                    uploaded: n.uploaded,
                })
                .collect(),
            end: self.now,
            timed_out,
            haves_delivered: self.haves_delivered,
            peak_links: self.peak_links,
            takeovers: self.takeovers,
            fallbacks: self.fallbacks,
            restarts: self.restarts,
            zone_in_bytes: self.zone_links.iter().map(|&(_, inbound)| self.net.carried(inbound)).sum(),
            all_out_at: self.all_out_at,
            upstream_done_at: self.upstream_done_at,
            events: processed,
            events_by_kind: by_kind,
            uplink_bytes: self.uplink_bytes,
            received_bytes: self.received_bytes,
            uploaded_bytes: self.uploaded_bytes,
            wasted_bytes: self.wasted_bytes,
            net: self.net.stats(),
            sched,
        }
    }

    fn start_node(&mut self, i: u32) {
        let now = self.now;
        let node = &mut self.nodes[i as usize];
        node.alive = true;
        node.joined_at = now;
        node.counted = node.role != Role::Seed;
        if node.counted && !node.swarm.scheduler().is_complete() {
            self.pending_nodes += 1;
        }
        if self.lease {
            self.events.push(now, Ev::Startup { node: i });
        } else {
            node.swarming = true;
            node.swarm.start(self.clock.at(now));
            self.drain(i);
        }
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::TrackerReply { node, peers, interval } => self.on_tracker_reply(node, &peers, interval),
            Ev::ConnectDone { from, to } => self.on_connect_done(from, to),
            Ev::Timer { node } => self.on_timer(node),
            Ev::RequestArrive(id) => self.on_request_arrive(id),
            Ev::QueueTimeout(id) => self.on_queue_timeout(id),
            Ev::SlotFree { node } => self.release_slot(node),
            Ev::Reply(id) => self.on_reply(id),
            Ev::CancelArrive(id) => self.on_cancel_arrive(id),
            Ev::Have { node, piece } => self.on_have(node, piece),
            Ev::HaveTo { node, key, from, piece } => self.on_have_to(node, key, from, piece),
            Ev::LedgerTimer { node } => self.reannounce(node),
            Ev::Leave { node } => {
                self.pending_churn -= 1;
                self.leave(node);
            }
            Ev::Join { node } => {
                self.pending_churn -= 1;
                self.start_node(node);
            }
            Ev::UpstreamOpen { node } => self.on_upstream_open(node),
            Ev::Startup { node } => self.on_startup(node),
            Ev::LeaseReply { node, answer } => self.on_lease_reply(node, answer),
            Ev::TakeoverCheck { node } => self.on_takeover_check(node),
            Ev::UpstreamFrom { node, piece } => {
                self.publish(node);
                self.start_upstream_piece(node, piece);
            }
            Ev::KillHolder => self.kill_holder(),
            Ev::TrackerDown => self.tracker_down(),
            Ev::RestartCrash => {
                self.pending_churn -= 1;
                self.restart_crash();
            }
            Ev::Rejoin { node } => {
                self.pending_churn -= 1;
                self.rejoin(node);
            }
            Ev::IdleClose { node } => {
                if !self.nodes[node as usize].alive {
                    self.disconnect(node);
                }
            }
            Ev::SwarmStart { node, known, watch } => self.on_swarm_start(node, known, watch),
            Ev::HashesReply { node, known } => self.on_hashes_reply(node, known),
            Ev::PublishReply { node, answer } => self.on_publish_reply(node, answer),
            Ev::PublishTimer { node } => self.on_publish_timer(node),
            Ev::PeerHashes { node, key, from, first, end } => self.on_peer_hashes(node, key, from, first, end),
            Ev::PexPeers { node, key, from, peers } => self.on_pex_peers(node, key, from, &peers),
            Ev::Progress => self.log_progress(),
        }
    }

    fn on_flow_done(&mut self, tag: FlowTag, bytes: u64) {
        match tag {
            FlowTag::Fetch(id) => self.on_upload_done(id),
            FlowTag::Fallback { node } => {
                self.uplink_bytes += bytes;
                self.received_bytes += bytes;
                let n = &mut self.nodes[node as usize];
                n.downloaded += bytes;
                if n.completed_at.is_none() {
                    n.completed_at = Some(self.now);
                    if n.counted && n.alive {
                        self.pending_nodes -= 1;
                    }
                }
            }
            FlowTag::Upstream { node, piece } => {
                self.uplink_bytes += bytes;
                self.nodes[node as usize].upstream_flow = None;
                if !self.nodes[node as usize].alive || self.nodes[node as usize].fallback {
                    return;
                }
                self.received_bytes += bytes;
                self.nodes[node as usize].downloaded += bytes;
                self.on_upstream_piece(node, piece);
                // The GET streams on: the next piece's bytes follow at once.
                if piece + 1 < self.pieces {
                    self.start_upstream_piece(node, piece + 1);
                } else {
                    self.upstream_done_at = Some(self.now);
                }
            }
        }
    }

    /// Counts a copy of `piece` verified from a peer.
    pub(crate) fn note_copy(&mut self, piece: u32) {
        if let Some(c) = self.copies.get_mut(piece as usize) {
            if *c == 0 {
                self.pieces_out += 1;
                if self.pieces_out == self.pieces {
                    self.all_out_at = Some(self.now);
                }
            }
            *c += 1;
        }
    }

    /// Streams piece `piece` from the upstream registry to `node`.
    pub(crate) fn start_upstream_piece(&mut self, node: u32, piece: u32) {
        let n = &self.nodes[node as usize];
        if !n.alive {
            return;
        }
        let mut path = vec![self.upstream];
        if let Some(&(_, inbound)) = self.zone_links.get(n.zone as usize) {
            path.push(inbound);
        }
        path.push(n.down);
        let start = u64::from(piece) * u64::from(self.piece_length);
        let len = self.blob_len.saturating_sub(start).min(u64::from(self.piece_length));
        let flow = self.net.start(self.now, len, &path, FlowTag::Upstream { node, piece });
        self.nodes[node as usize].upstream_flow = Some(flow);
    }

    fn log_progress(&mut self) {
        let alive: Vec<&SimNode> = self.nodes.iter().filter(|n| n.alive && n.counted).collect();
        let haves: Vec<u32> = alive.iter().map(|n| n.swarm.scheduler().have().count()).collect();
        let min = haves.iter().copied().min().unwrap_or(0);
        let max = haves.iter().copied().max().unwrap_or(0);
        let mean = haves.iter().map(|&h| f64::from(h)).sum::<f64>() / haves.len().max(1) as f64;
        let links = alive.iter().map(|n| n.links.len()).sum::<usize>() as f64 / alive.len().max(1) as f64;
        let in_flight: usize = alive.iter().map(|n| n.outstanding.len()).sum();
        let queued: usize = self.nodes.iter().map(|n| n.slots.waiting()).sum();
        let budget_wait: usize = self.nodes.iter().map(|n| n.budget.waiting()).sum();
        let busy_up = self.nodes.iter().filter(|n| n.alive && self.net.load(n.up) > 0).count();
        let up_used: f64 = self.nodes.iter().filter(|n| n.alive).map(|n| self.net.used(n.up)).sum();
        let up_cap: f64 = self.nodes.iter().filter(|n| n.alive).map(|n| self.net.capacity(n.up)).sum();
        tracing::info!(
            t = format!("{:.2}", crate::model::secs(self.now)),
            pieces_min = min,
            pieces_mean = format!("{mean:.1}"),
            pieces_max = max,
            pending = self.pending_nodes,
            links = format!("{links:.1}"),
            flows = self.net.active(),
            fetches = in_flight,
            upload_queued = queued,
            budget_wait,
            uploading = busy_up,
            up_util = format!("{:.3}", up_used / up_cap.max(1.0)),
            "progress"
        );
        if let Some(p) = self.progress {
            self.events.push(self.now + p, Ev::Progress);
        }
    }

    /// Node `n` shuts down: tells the tracker, closes every connection.
    /// Whether the tracker answers now (see [`Faults::tracker_down`]).
    pub(crate) fn tracker_up(&self) -> bool {
        self.faults.tracker_down.is_none_or(|(from, len)| self.now < from || self.now >= from + len)
    }

    /// The tracker goes away: the `GetHashes` it was holding fail.
    fn tracker_down(&mut self) {
        for w in std::mem::take(&mut self.hash_waiters) {
            self.events.push_after(self.now, self.half_rtt, Ev::HashesReply { node: w, known: None });
        }
    }

    /// Crashes the node holding the upstream lease (no `Leave`, no release).
    fn kill_holder(&mut self) {
        let holder = self.nodes.iter().position(|n| n.alive && !n.fallback && n.swarm.is_lease_holder());
        let Some(n) = holder.and_then(|n| u32::try_from(n).ok()) else {
            tracing::warn!("no lease holder to kill");
            return;
        };
        tracing::info!(node = n, t = crate::model::secs(self.now), "killing the lease holder");
        self.killed = Some(n);
        self.crash(n);
    }

    /// Crashes the last downloading nodes (never the lease holder) and schedules their
    /// restart.
    fn restart_crash(&mut self) {
        let Some((_, count, down)) = self.faults.restart else { return };
        let victims: Vec<u32> = (0..self.nodes.len() as u32)
            .rev()
            .filter(|&i| {
                let n = &self.nodes[i as usize];
                n.alive && n.counted && !n.fallback && n.completed_at.is_none() && !n.swarm.is_lease_holder()
            })
            .take(count as usize)
            .collect();
        tracing::info!(?victims, t = crate::model::secs(self.now), "crashing nodes to restart them");
        for &n in &victims {
            self.crash(n);
            self.restarts += 1;
            self.pending_churn += 1;
            self.events.push(self.now + down, Ev::Rejoin { node: n });
        }
    }

    /// A crashed node comes back: the pieces it verified are on its disk; its peers,
    /// requests, hashes and peer id are new.
    fn rejoin(&mut self, n: u32) {
        // The new process answers the old connections with a stateless reset.
        self.disconnect(n);
        let now = self.now;
        let at = self.clock.at(now);
        let old = &self.nodes[n as usize];
        let have = old.swarm.scheduler().have().clone();
        let mut id = old.peer_id;
        id.0[0] ^= 0x80;
        let known = if self.lease { 0 } else { self.pieces };
        let seed = u64::from_le_bytes([id.0[0], id.0[1], id.0[2], id.0[3], id.0[4], id.0[5], id.0[6], id.0[7]]);
        let swarm = Swarm::new(id, zone_name(old.zone), &self.policy, self.piece_length, have, known, seed, at);
        let mut fresh = SimNode::new(id, old.zone, Role::Leecher, (old.up, old.down), swarm, &self.policy);
        (fresh.downloaded, fresh.uploaded) = (old.downloaded, old.uploaded);
        self.nodes[n as usize] = fresh;
        self.start_node(n);
        self.nodes[n as usize].joined_at = self.specs[n as usize].join_at.unwrap_or(0);
    }

    /// Node `n` stops at once: its upstream stream and its uploads end, nothing it
    /// was sent is answered, the tracker is not told. Its peers only notice through
    /// their requests' timeouts, until QUIC's idle timeout closes the connections
    /// ([`Ev::IdleClose`]), as with a real crashed process.
    fn crash(&mut self, n: u32) {
        let now = self.now;
        if !self.mark_gone(n) {
            return;
        }
        if let Some(flow) = self.nodes[n as usize].upstream_flow.take() {
            self.net.end(flow, now);
        }
        // Its downloads die with it (their senders' slots come free) ...
        let keys: Vec<PeerKey> = self.nodes[n as usize].links.keys().copied().collect();
        for key in keys {
            self.abort_all_with(n, key);
        }
        // ... and its uploads stop; the requesters wait for their timeouts.
        let ids: Vec<FetchId> =
            self.fetches.ids().filter(|&id| self.fetches.get(id).is_some_and(|f| f.sender == n)).collect();
        for id in ids {
            if let Some(FetchState::Flowing(flow)) = self.fetches.get(id).map(|f| f.state)
                && let Some((_, _, moved)) = self.net.end(flow, now)
            {
                self.wasted_bytes += moved;
                if let Some(f) = self.fetches.get_mut(id) {
                    f.state = FetchState::ToSender;
                }
            }
        }
        self.events.push(now + nanos(IDLE_TIMEOUT), Ev::IdleClose { node: n });
    }

    /// Ends node `n`'s upstream stream and closes all its connections.
    fn disconnect(&mut self, n: u32) {
        if let Some(flow) = self.nodes[n as usize].upstream_flow.take() {
            self.net.end(flow, self.now);
        }
        let keys: Vec<_> = self.nodes[n as usize].links.keys().copied().collect();
        for key in keys {
            self.unlink(n, key, false);
        }
    }

    /// Node `n` gives the swarm up (the mirror answered 503 or cut the response):
    /// its containerd fetches what it lacks from the registry itself.
    pub(crate) fn fall_back(&mut self, n: u32, reason: &str) {
        let now = self.now;
        tracing::info!(node = n, t = crate::model::secs(now), reason, "falling back to the registry");
        let node = &mut self.nodes[n as usize];
        if node.fallback || node.completed_at.is_some() {
            return;
        }
        node.fallback = true;
        node.swarming = false;
        node.takeover = None;
        let (zone, down) = (node.zone, node.down);
        let node = &self.nodes[n as usize];
        let held: u64 = node.swarm.scheduler().have().ones().map(|p| u64::from(self.piece_len(p))).sum();
        self.fallbacks += 1;
        self.disconnect(n);
        let mut path = vec![self.upstream];
        if let Some(&(_, inbound)) = self.zone_links.get(zone as usize) {
            path.push(inbound);
        }
        path.push(down);
        let rest = self.blob_len.saturating_sub(held).max(1);
        self.net.start(now, rest, &path, FlowTag::Fallback { node: n });
    }

    /// Node `n` is gone from now on (false: it was already).
    fn mark_gone(&mut self, n: u32) -> bool {
        let now = self.now;
        let node = &mut self.nodes[n as usize];
        if !node.alive {
            return false;
        }
        node.alive = false;
        node.left_at = Some(now);
        if node.counted && node.completed_at.is_none() {
            self.pending_nodes -= 1;
        }
        true
    }

    fn leave(&mut self, n: u32) {
        let now = self.now;
        if !self.mark_gone(n) {
            return;
        }
        let node = &self.nodes[n as usize];
        let leave = TrackerRequest::Leave { peer_id: node.peer_id, blob: self.digest };
        let _ = self.tracker.handle(leave, node_addr(n), self.clock.at(now));
        let keys: Vec<_> = node.links.keys().copied().collect();
        for key in keys {
            self.unlink(n, key, false);
        }
    }
}

fn add_stats(sum: &mut SchedulerStats, s: &SchedulerStats) {
    sum.requests += s.requests;
    sum.cancels += s.cancels;
    sum.timeouts += s.timeouts;
    sum.endgame_duplicates += s.endgame_duplicates;
    sum.failed_pieces += s.failed_pieces;
    sum.verified += s.verified;
    sum.redundant += s.redundant;
    sum.local += s.local;
    sum.busy += s.busy;
    sum.missing += s.missing;
    sum.errors += s.errors;
    sum.dropped_peers += s.dropped_peers;
}
