//! The tracker's pure core: which peers hold or want which blob, the registered
//! metainfo, and the choice of peers handed out per announce. No I/O, no clock, no
//! tokio: callers pass `now` and the address they observed, and the shuffling RNG is
//! seeded, so the server and the simulator get the same behaviour and tests are
//! deterministic.
//!
//! Data layout per blob: the peers live in a `Vec` (O(1) random access for sampling,
//! O(1) removal by swap), with a map from peer id to position and a map from zone
//! label to the positions of that zone's peers. Every removal fixes up both maps.
//!
//! Choosing peers for an announce costs O(k log k) with k about four times the
//! reply size, whatever the swarm's size: small swarms are ranked whole; large ones
//! contribute a random sample of the caller's zone plus a random sample of everyone.
//! The candidates are shuffled, then ordered by bucket: same zone before other
//! zones, and within that seeds, then partial holders, then peers with nothing. So
//! the reply is random but biased towards close peers that can upload.
//!
//! Upstream leases and the piece hashes published while a blob streams in from the
//! upstream registry live in the [`lease`] submodule (its docs state the rules);
//! [`TrackerState::handle`] routes their requests there. The division of the
//! cluster's uplink cap among the lease holders lives in [`uplink`].
//!
//! **Replicas and restarts.** Several trackers may serve one cluster with no shared
//! state: clients pick each blob's arbiter by rendezvous hashing over the trackers
//! that answer. Each tracker has a random **instance id** ([`TrackerState::instance`],
//! sent in the `Hello` reply): a client that sees a new id knows the tracker lost its
//! state and re-announces its store (`AnnounceStore`, [`TrackerState::announce_store`])
//! and its leases. So that a lease holder can re-assert its lease before anyone else
//! is granted one, a tracker grants **no new lease** (it answers `HeldBy` with
//! [`NO_HOLDER`], which every version of the agent takes as "wait and ask again")
//! during its first [`TrackerConfig::lease_grace`] as a blob's arbiter:
//!
//! - from its start ([`TrackerState::begin_grace`], which the server calls; the
//!   simulator does not, so simulated cold starts are not delayed), and
//! - for a blob this tracker knows no lease and no hashes of, during `lease_grace`
//!   from the first sign that another tracker arbitrated it (a node announcing some
//!   but not all of its pieces, or asking for hashes past piece 0): that tracker went
//!   away, and the holder is about to re-assert. Meanwhile such a `GetHashes` is
//!   answered "ask again" ([`TrackerError::Settling`]) rather than "unknown blob",
//!   which would make the asking node abandon its download.
//!
//! A holder re-asserts by publishing: a `PublishHashes` from a node when no lease is
//! recorded at all and no failure is remembered makes it the holder again (the
//! hashes must start at piece 0 or continue the known ones; a holder refused by a
//! tracker that has not seen them publishes the whole prefix: `crate::lease::Publisher`).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use swarm_proto::msg::{
    Announce, BlobView, ClusterView, HolderView, LeaseView, LeaseViewState, MAX_PEERS_PER_REPLY, MAX_STORE_BLOBS,
    MAX_VIEW_BLOBS, MAX_VIEW_HOLDINGS, MAX_VIEW_NODES, MAX_ZONE_LEN, NodeView, PeerInfo, StoreAnnounce,
    TRACKER_VERSION, TrackerErrorCode, TrackerRequest, TrackerResponse,
};
use swarm_proto::{Digest, Metainfo, PeerId, ProtoError};

use self::lease::Upstream;
pub use self::lease::{LeaseState, LeaseStatus, MAX_FAILURE_REASON_LEN, MAX_HASHES_PER_REPLY};

pub mod lease;
pub mod stage;
pub mod uplink;

/// Tracker tuning.
#[derive(Clone, Debug)]
pub struct TrackerConfig {
    /// How often peers are told to re-announce.
    pub announce_interval: Duration,
    /// A peer not heard from for this long is forgotten.
    pub peer_ttl: Duration,
    /// Most peers in one reply (also capped by [`MAX_PEERS_PER_REPLY`]).
    pub max_peers_per_reply: usize,
    /// An upstream lease not renewed (by `AcquireLease` or `PublishHashes`) for this
    /// long is free for the next node that asks. Sent to the holder in whole seconds
    /// (rounded down, at least 1), who renews every third of it.
    pub lease_ttl: Duration,
    /// A lease whose holder publishes no new piece hash for this long is stalled:
    /// renewing does not keep it, and the next node that asks takes over.
    pub stall_timeout: Duration,
    /// After a holder reports a failed upstream fetch, lease requests are answered
    /// `Failed` for this long (the nodes fall back to the upstream themselves).
    pub failure_memory: Duration,
    /// No new lease is granted during a tracker's first `lease_grace` as a blob's
    /// arbiter (see the module docs), so that holders can re-assert theirs.
    pub lease_grace: Duration,
    /// The cluster's uplink cap in bytes per second, divided among the nodes fetching
    /// from upstream when this tracker owns the cap ([`uplink`]); `None`: no cap.
    pub uplink_cap: Option<u64>,
}

/// The default [`TrackerConfig::lease_grace`]: a lease holder publishes at least every
/// 2 s and fails over to the next tracker within about 4 s.
pub const LEASE_GRACE: Duration = Duration::from_secs(6);

/// The default [`TrackerConfig::stall_timeout`]: longer than a holder's own bound on
/// an upstream outage (100 s without a byte, `swarm_peer::upstream::RESUME_GIVE_UP`),
/// so the lease does not move to a node behind the same dead uplink while the holder
/// still waits for it to come back.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(110);

/// The `holder` of a `HeldBy` answered during a lease grace period: nobody known yet.
pub const NO_HOLDER: PeerId = PeerId([0; 16]);

impl Default for TrackerConfig {
    /// Re-announce every 30 s, forget after three missed announces, 50 peers a reply;
    /// leases of 10 s, lost after 110 s without progress; failures remembered 10 s;
    /// a lease grace of [`LEASE_GRACE`]; no uplink cap.
    fn default() -> Self {
        Self {
            announce_interval: Duration::from_secs(30),
            peer_ttl: Duration::from_secs(90),
            max_peers_per_reply: 50,
            lease_ttl: Duration::from_secs(10),
            stall_timeout: STALL_TIMEOUT,
            failure_memory: Duration::from_secs(10),
            lease_grace: LEASE_GRACE,
            uplink_cap: None,
        }
    }
}

/// Candidates considered per announce, as a multiple of the reply size.
const CANDIDATE_FACTOR: usize = 4;
/// Fewest candidates considered per announce (small replies still get a choice).
const MIN_CANDIDATES: usize = 64;

/// One tracked peer of one blob.
#[derive(Debug)]
struct PeerEntry {
    info: PeerInfo,
    last_seen: Instant,
    /// Position of this entry's index in its zone's list.
    zone_pos: usize,
}

/// The peers of one blob. Invariants: `index[entries[i].info.peer_id] == i`, and
/// `zones[z][entries[i].zone_pos] == i` where `z == entries[i].info.zone`; no zone
/// list is empty.
#[derive(Debug, Default)]
struct PeerSet {
    entries: Vec<PeerEntry>,
    index: HashMap<PeerId, usize>,
    zones: HashMap<String, Vec<usize>>,
}

impl PeerSet {
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Adds or refreshes a peer; returns whether it is new.
    fn upsert(&mut self, info: PeerInfo, now: Instant) -> bool {
        match self.index.get(&info.peer_id).copied() {
            Some(i) => {
                if self.entries[i].info.zone != info.zone {
                    self.zone_unlink(i);
                    self.entries[i].info.zone = info.zone.clone();
                    self.zone_link(i);
                }
                let entry = &mut self.entries[i];
                entry.info = info;
                entry.last_seen = now;
                false
            }
            None => {
                let i = self.entries.len();
                self.index.insert(info.peer_id, i);
                self.entries.push(PeerEntry { info, last_seen: now, zone_pos: 0 });
                self.zone_link(i);
                true
            }
        }
    }

    fn remove(&mut self, peer_id: &PeerId) -> bool {
        match self.index.get(peer_id).copied() {
            Some(i) => {
                self.remove_at(i);
                true
            }
            None => false,
        }
    }

    fn remove_at(&mut self, i: usize) {
        self.zone_unlink(i);
        let removed = self.entries.swap_remove(i);
        self.index.remove(&removed.info.peer_id);
        if let Some(moved) = self.entries.get(i) {
            // The former last entry now lives at `i`: repoint both maps.
            self.index.insert(moved.info.peer_id, i);
            if let Some(slot) = self.zones.get_mut(&moved.info.zone).and_then(|list| list.get_mut(moved.zone_pos)) {
                *slot = i;
            }
        }
    }

    fn zone_link(&mut self, i: usize) {
        let list = self.zones.entry(self.entries[i].info.zone.clone()).or_default();
        self.entries[i].zone_pos = list.len();
        list.push(i);
    }

    fn zone_unlink(&mut self, i: usize) {
        let pos = self.entries[i].zone_pos;
        let Some(list) = self.zones.get_mut(&self.entries[i].info.zone) else { return };
        list.swap_remove(pos);
        let moved = list.get(pos).copied();
        let now_empty = list.is_empty();
        if let Some(moved) = moved {
            self.entries[moved].zone_pos = pos;
        }
        if now_empty {
            self.zones.remove(&self.entries[i].info.zone);
        }
    }

    /// Panics unless the invariants stated on the type hold.
    #[cfg(test)]
    fn check(&self) {
        assert_eq!(self.index.len(), self.entries.len());
        let mut zoned = 0;
        for (zone, list) in &self.zones {
            assert!(!list.is_empty(), "empty zone list {zone:?}");
            zoned += list.len();
        }
        assert_eq!(zoned, self.entries.len());
        for (i, e) in self.entries.iter().enumerate() {
            assert_eq!(self.index.get(&e.info.peer_id), Some(&i));
            assert_eq!(self.zones.get(&e.info.zone).and_then(|l| l.get(e.zone_pos)), Some(&i));
        }
    }

    /// Drops every peer last seen `ttl` or more before `now`; returns how many.
    fn expire(&mut self, now: Instant, ttl: Duration) -> usize {
        let mut dropped = 0;
        let mut i = 0;
        while i < self.entries.len() {
            if now.saturating_duration_since(self.entries[i].last_seen) >= ttl {
                self.remove_at(i); // the last entry moves into `i`: look at it next
                dropped += 1;
            } else {
                i += 1;
            }
        }
        dropped
    }

    /// Up to `want` peers other than `caller`, chosen as described in the module docs.
    fn choose(
        &self,
        caller: &PeerId,
        zone: &str,
        want: usize,
        now: Instant,
        ttl: Duration,
        rng: &mut StdRng,
    ) -> Vec<PeerInfo> {
        if want == 0 || self.entries.is_empty() {
            return Vec::new();
        }
        let pool = want.saturating_mul(CANDIDATE_FACTOR).max(MIN_CANDIDATES);
        let mut candidates: Vec<usize> = if self.entries.len() <= pool {
            (0..self.entries.len()).collect()
        } else {
            let mut picked = Vec::with_capacity(2 * pool);
            if !zone.is_empty()
                && let Some(local) = self.zones.get(zone)
            {
                sample_into(&mut picked, local.len(), pool, rng, |k| local[k]);
            }
            sample_into(&mut picked, self.entries.len(), pool, rng, |k| k);
            picked.sort_unstable();
            picked.dedup();
            picked
        };
        candidates.retain(|&i| {
            let e = &self.entries[i];
            e.info.peer_id != *caller && now.saturating_duration_since(e.last_seen) < ttl
        });
        candidates.shuffle(rng);
        // Stable: the shuffle decides the order within a bucket.
        candidates.sort_by_key(|&i| bucket(&self.entries[i].info, zone));
        candidates.truncate(want);
        candidates.into_iter().map(|i| self.entries[i].info.clone()).collect()
    }
}

/// Pushes `map(k)` for about `amount` random `k` in `0..len` (all of them if
/// `len <= amount`). Draws with replacement, so the cost is O(amount) however large
/// `len` is; the caller removes the rare duplicates.
fn sample_into(out: &mut Vec<usize>, len: usize, amount: usize, rng: &mut StdRng, map: impl Fn(usize) -> usize) {
    if len <= amount {
        out.extend((0..len).map(map));
    } else {
        out.extend((0..amount).map(|_| map(rng.gen_range(0..len))));
    }
}

/// Preference bucket, lower first: same zone (0) before other zones (1), then seeds
/// (0) before partial holders (1) before peers with nothing (2). An empty zone label
/// means "no zone" and matches nobody.
fn bucket(peer: &PeerInfo, zone: &str) -> u8 {
    let far = u8::from(zone.is_empty() || peer.zone != zone);
    let have = if peer.complete {
        0
    } else if peer.have > 0 {
        1
    } else {
        2
    };
    far * 3 + have
}

/// What the tracker knows about one blob.
#[derive(Debug, Default)]
struct BlobEntry {
    metainfo: Option<Metainfo>,
    peers: PeerSet,
    upstream: Upstream,
    /// When this tracker first saw signs of an upstream fetch it knows nothing of
    /// (an announce of some but not all pieces, or a `GetHashes` past piece 0, while
    /// it has neither hashes nor a lease): the blob's arbiter went away.
    orphan_since: Option<Instant>,
}

impl BlobEntry {
    fn is_empty(&self) -> bool {
        self.metainfo.is_none() && self.peers.len() == 0 && self.upstream.is_empty() && self.orphan_since.is_none()
    }
}

/// The whole tracker state. Lives only in memory: after a restart it is rebuilt as
/// peers re-announce (every `announce_interval`) and seeders re-register, which the
/// peer agent does by itself.
pub struct TrackerState {
    config: TrackerConfig,
    rng: StdRng,
    blobs: BTreeMap<Digest, BlobEntry>,
    /// Random id of this tracker's life, sent in `Hello` replies.
    instance: u64,
    /// No lease is granted before this instant (set by [`TrackerState::begin_grace`]).
    grace_until: Option<Instant>,
    /// Stage orders and the staging agents ([`stage`]).
    stage: stage::StageBook,
    /// The uplink cap's holders and their shares.
    uplink: uplink::UplinkShares,
}

impl std::fmt::Debug for TrackerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackerState").field("config", &self.config).field("blobs", &self.blobs.len()).finish()
    }
}

impl TrackerState {
    /// An empty tracker whose peer shuffling is driven by `seed`.
    pub fn new(config: TrackerConfig, seed: u64) -> Self {
        // The instance id is derived from the seed without drawing from the shuffling
        // RNG, so seeded runs shuffle as they always did.
        let instance = splitmix64(seed ^ 0x5741_524d_5f49_4e53).max(1);
        let stage = stage::StageBook::new(splitmix64(instance));
        let uplink = uplink::UplinkShares::new(config.uplink_cap);
        Self {
            config,
            rng: StdRng::seed_from_u64(seed),
            blobs: BTreeMap::new(),
            instance,
            grace_until: None,
            stage,
            uplink,
        }
    }

    /// This tracker's instance id (never 0).
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// Starts the grace period of a tracker that just started: no lease is granted
    /// before `now + lease_grace`.
    pub fn begin_grace(&mut self, now: Instant) {
        self.grace_until = Some(now + self.config.lease_grace);
    }

    /// The tracker's configuration.
    pub fn config(&self) -> &TrackerConfig {
        &self.config
    }

    /// Answers one request: the single entry point of the server and the simulator.
    pub fn handle(&mut self, req: TrackerRequest, observed: SocketAddr, now: Instant) -> TrackerResponse {
        let result = match req {
            TrackerRequest::Register { metainfo } => self.register(metainfo).map(|()| TrackerResponse::Registered),
            TrackerRequest::GetMetainfo { blob } => match self.metainfo(&blob) {
                Some(m) => Ok(TrackerResponse::Metainfo(m.clone())),
                None => Err(TrackerError::UnknownBlob { blob }),
            },
            TrackerRequest::Announce(ann) => self.announce(&ann, observed, now).map(|(peers, interval)| {
                let interval_secs = u32::try_from(interval.as_secs()).unwrap_or(u32::MAX).max(1);
                TrackerResponse::Peers { peers, interval_secs }
            }),
            TrackerRequest::Leave { peer_id, blob } => {
                self.leave(&peer_id, &blob);
                Ok(TrackerResponse::Left)
            }
            TrackerRequest::AcquireLease { peer_id, blob } => {
                Ok(TrackerResponse::Lease(self.acquire_lease(peer_id, blob, now)))
            }
            TrackerRequest::PublishHashes { peer_id, layout, first, hashes } => {
                self.publish_hashes(peer_id, layout, first, &hashes, now).map(|()| TrackerResponse::Registered)
            }
            TrackerRequest::ReleaseLease { peer_id, blob, failed } => {
                self.release_lease(peer_id, blob, failed, now).map(|()| TrackerResponse::Left)
            }
            TrackerRequest::GetHashes { blob, first } => self.get_hashes(blob, first, now),
            TrackerRequest::ClusterView { blobs } => Ok(TrackerResponse::ClusterView(self.cluster_view(&blobs, now))),
            TrackerRequest::Hello { version } => {
                Ok(TrackerResponse::Hello { version: version.min(TRACKER_VERSION), instance: self.instance })
            }
            TrackerRequest::AnnounceStore(ann) => self.announce_store(&ann, observed, now).map(|missing| {
                let interval_secs = u32::try_from(self.config.announce_interval.as_secs()).unwrap_or(u32::MAX).max(1);
                TrackerResponse::StoreAnnounced { interval_secs, missing }
            }),
            TrackerRequest::Stage(order) => self.stage.order(order).map(|()| self.stage_orders()).map_err(Into::into),
            TrackerRequest::WaitStage { agent, .. } => {
                self.stage.seen(&agent, observed, now).map(|()| self.stage_orders()).map_err(Into::into)
            }
            TrackerRequest::StageProgress { agent, progress } => self
                .stage
                .progress(&agent, observed, progress, now)
                .map(|()| TrackerResponse::Registered)
                .map_err(Into::into),
            TrackerRequest::StageStatus { image } => {
                Ok(TrackerResponse::StageStatus(self.stage.status(&image, self.config.announce_interval, now)))
            }
            TrackerRequest::UplinkShare { peer_id, blob, fetching } => {
                let share = self.uplink.report(peer_id, blob, fetching, now);
                Ok(TrackerResponse::UplinkShare {
                    bytes_per_sec: share.bytes_per_sec.unwrap_or(0),
                    renew_ms: u32::try_from(share.renew.as_millis()).unwrap_or(u32::MAX),
                })
            }
        };
        result.unwrap_or_else(|e| TrackerResponse::Error { code: e.code(), message: e.to_string() })
    }

    /// The stage orders and their generation, as a response.
    fn stage_orders(&self) -> TrackerResponse {
        TrackerResponse::StageOrders { generation: self.stage.generation(), orders: self.stage.orders() }
    }

    /// Drops the stage orders whose pins ended before `now_unix_secs` (the wall clock,
    /// which this core does not read itself).
    pub fn expire_stage_orders(&mut self, now_unix_secs: u64) {
        self.stage.expire_orders(now_unix_secs);
    }

    /// Publishes a blob's metainfo. Idempotent; a different metainfo for a digest
    /// that already has one is a [`TrackerError::Conflict`], and one contradicting
    /// the piece hashes published so far by an upstream lease holder is a
    /// [`TrackerError::LayoutConflict`] or [`TrackerError::HashConflict`].
    /// Registering also vouches for a metainfo completed from published hashes: a
    /// failed upstream release no longer withdraws it.
    pub fn register(&mut self, metainfo: Metainfo) -> Result<(), TrackerError> {
        let blob = metainfo.digest;
        metainfo.validate().map_err(|source| TrackerError::InvalidMetainfo { blob, source })?;
        let entry = self.blobs.entry(blob).or_default();
        match &entry.metainfo {
            Some(known) if *known == metainfo => {
                entry.upstream.registered();
                Ok(())
            }
            Some(_) => Err(TrackerError::Conflict { blob }),
            None => {
                entry.upstream.check_register(&metainfo)?;
                entry.metainfo = Some(metainfo);
                entry.upstream.registered();
                Ok(())
            }
        }
    }

    /// The registered metainfo of `blob`.
    pub fn metainfo(&self, blob: &Digest) -> Option<&Metainfo> {
        self.blobs.get(blob).and_then(|e| e.metainfo.as_ref())
    }

    /// Records that a peer holds or wants a blob (whether or not its metainfo is
    /// registered yet) and returns peers for it plus the re-announce interval.
    ///
    /// The address handed to others is `ann.advertise` if given, else the observed
    /// source IP with `ann.listen_port`.
    pub fn announce(
        &mut self,
        ann: &Announce,
        observed: SocketAddr,
        now: Instant,
    ) -> Result<(Vec<PeerInfo>, Duration), TrackerError> {
        if ann.zone.len() > MAX_ZONE_LEN {
            return Err(TrackerError::ZoneTooLong { len: ann.zone.len(), max: MAX_ZONE_LEN });
        }
        let addr = ann.advertise.unwrap_or_else(|| SocketAddr::new(canonical_ip(observed.ip()), ann.listen_port));
        if addr.port() == 0 || addr.ip().is_unspecified() {
            return Err(TrackerError::Unreachable { peer_id: ann.peer_id, addr });
        }
        let info =
            PeerInfo { peer_id: ann.peer_id, addr, zone: ann.zone.clone(), have: ann.have, complete: ann.complete };
        let entry = self.blobs.entry(ann.blob).or_default();
        if ann.have > 0 && !ann.complete && entry.metainfo.is_none() && entry.upstream.is_empty() {
            entry.orphan_since.get_or_insert(now);
        }
        entry.peers.upsert(info, now);
        let want = (ann.num_want as usize).min(self.config.max_peers_per_reply).min(MAX_PEERS_PER_REPLY as usize);
        let peers = entry.peers.choose(&ann.peer_id, &ann.zone, want, now, self.config.peer_ttl, &mut self.rng);
        Ok((peers, self.config.announce_interval))
    }

    /// Records `ann.peer_id` as a complete holder of every listed blob (as an
    /// `Announce` with `complete` would, with `have` the piece count when the metainfo
    /// is known) and registers the metainfo given. Returns the listed blobs whose
    /// metainfo is still unknown. A metainfo that cannot be registered (invalid, or
    /// conflicting with the one known) is skipped and its blob reported missing; the
    /// holder is recorded all the same.
    pub fn announce_store(
        &mut self,
        ann: &StoreAnnounce,
        observed: SocketAddr,
        now: Instant,
    ) -> Result<Vec<Digest>, TrackerError> {
        if ann.zone.len() > MAX_ZONE_LEN {
            return Err(TrackerError::ZoneTooLong { len: ann.zone.len(), max: MAX_ZONE_LEN });
        }
        if ann.blobs.len() > MAX_STORE_BLOBS {
            return Err(TrackerError::StoreTooLarge { blobs: ann.blobs.len(), max: MAX_STORE_BLOBS });
        }
        let addr = ann.advertise.unwrap_or_else(|| SocketAddr::new(canonical_ip(observed.ip()), ann.listen_port));
        if addr.port() == 0 || addr.ip().is_unspecified() {
            return Err(TrackerError::Unreachable { peer_id: ann.peer_id, addr });
        }
        for m in &ann.metainfo {
            if ann.blobs.contains(&m.digest) {
                // A refusal leaves the blob without metainfo: it is reported missing.
                let _ = self.register(m.clone());
            }
        }
        let mut missing = Vec::new();
        for blob in &ann.blobs {
            let entry = self.blobs.entry(*blob).or_default();
            let have = entry.metainfo.as_ref().map_or(0, Metainfo::piece_count);
            if entry.metainfo.is_none() {
                missing.push(*blob);
            }
            let info = PeerInfo { peer_id: ann.peer_id, addr, zone: ann.zone.clone(), have, complete: true };
            entry.peers.upsert(info, now);
        }
        Ok(missing)
    }

    /// Whether no new lease may be granted for `blob` now (see the module docs).
    fn in_grace(&self, blob: &Digest, now: Instant) -> bool {
        if self.grace_until.is_some_and(|until| now < until) {
            return true;
        }
        let Some(entry) = self.blobs.get(blob) else { return false };
        let recent = entry.orphan_since.is_some_and(|t| now.saturating_duration_since(t) < self.config.lease_grace);
        recent && entry.metainfo.is_none() && entry.upstream.is_empty()
    }

    /// Answers `GetHashes`. A node asking past piece 0 for a blob this tracker has no
    /// hashes of was following another arbiter (or this one before a restart): while
    /// the holder may still re-assert, it is told to ask again (`Settling`) rather
    /// than that the blob is unknown, which would make it abandon its download.
    fn get_hashes(&mut self, blob: Digest, first: u32, now: Instant) -> Result<TrackerResponse, TrackerError> {
        if let Some((layout, known, complete)) = self.hashes(&blob) {
            let start = (first as usize).min(known.len());
            let end = known.len().min(start + MAX_HASHES_PER_REPLY as usize);
            return Ok(TrackerResponse::Hashes { layout, first, hashes: known[start..end].to_vec(), complete });
        }
        if first > 0 && first != u32::MAX {
            let entry = self.blobs.entry(blob).or_default();
            if entry.upstream.is_empty() {
                entry.orphan_since.get_or_insert(now);
            }
            if self.in_grace(&blob, now) {
                return Err(TrackerError::Settling { blob });
            }
        }
        Err(TrackerError::NoHashes { blob })
    }

    /// Forgets that `peer_id` holds or wants `blob`. Unknown peers are ignored.
    pub fn leave(&mut self, peer_id: &PeerId, blob: &Digest) {
        if let Some(entry) = self.blobs.get_mut(blob) {
            entry.peers.remove(peer_id);
            if entry.is_empty() {
                self.blobs.remove(blob);
            }
        }
    }

    /// Drops peers not seen for `peer_ttl`; failures older than `failure_memory`;
    /// leases no longer live whose blob has metainfo or no peers left to take them
    /// over; partial hashes with neither a lease nor peers; then blobs with nothing
    /// left. Returns the number of peers dropped.
    pub fn expire(&mut self, now: Instant) -> usize {
        let ttl = self.config.peer_ttl;
        let mut dropped = 0;
        let grace = self.config.lease_grace;
        for e in self.blobs.values_mut() {
            if e.orphan_since.is_some_and(|t| now.saturating_duration_since(t) >= grace) {
                e.orphan_since = None;
            }
            dropped += e.peers.expire(now, ttl);
            e.upstream.expire(now, &self.config, e.peers.len() > 0, e.metainfo.is_some());
        }
        self.blobs.retain(|_, e| !e.is_empty());
        self.stage.expire_agents(now, ttl);
        self.uplink.expire(now);
        dropped
    }

    /// The uplink cap's state: the cap, the holders counted and their grants.
    pub fn uplink(&self) -> &uplink::UplinkShares {
        &self.uplink
    }

    /// Peers tracked for `blob`.
    pub fn peer_count(&self, blob: &Digest) -> usize {
        self.blobs.get(blob).map_or(0, |e| e.peers.len())
    }

    /// Whether `peer_id` is tracked for `blob` (the server logs first announces).
    pub fn has_peer(&self, blob: &Digest, peer_id: &PeerId) -> bool {
        self.blobs.get(blob).is_some_and(|e| e.peers.index.contains_key(peer_id))
    }

    /// Blobs with peers, metainfo or upstream state (hashes, a lease, a failure).
    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }

    /// The read-only view of the cluster `swarm status --cluster` shows: every node
    /// tracked for some blob (address and zone of its most recent announce) and, for
    /// `filter`'s blobs (every blob if empty), the layout, holders and lease, within
    /// the caps of [`ClusterView`]. Lease ages are not known here (`held_ms: None`).
    pub fn cluster_view(&self, filter: &[Digest], now: Instant) -> ClusterView {
        let mut view = ClusterView::default();
        let mut nodes: HashMap<PeerId, NodeView> = HashMap::new();
        let mut holdings = 0usize;
        let chosen: Box<dyn Iterator<Item = (&Digest, &BlobEntry)>> = if filter.is_empty() {
            Box::new(self.blobs.iter())
        } else {
            Box::new(filter.iter().take(MAX_VIEW_BLOBS).filter_map(|d| self.blobs.get_key_value(d)))
        };
        for (digest, entry) in chosen {
            if view.blobs.len() >= MAX_VIEW_BLOBS {
                view.truncated = true;
                break;
            }
            let mut holders = Vec::with_capacity(entry.peers.len());
            for e in &entry.peers.entries {
                let age = u64::try_from(now.saturating_duration_since(e.last_seen).as_millis()).unwrap_or(u64::MAX);
                let known = nodes.contains_key(&e.info.peer_id);
                if holdings >= MAX_VIEW_HOLDINGS || (!known && nodes.len() >= MAX_VIEW_NODES) {
                    view.truncated = true;
                    continue;
                }
                holdings += 1;
                holders.push(HolderView { peer_id: e.info.peer_id, have: e.info.have, complete: e.info.complete });
                let node = NodeView {
                    peer_id: e.info.peer_id,
                    addr: e.info.addr,
                    zone: e.info.zone.clone(),
                    last_seen_ms: age,
                };
                match nodes.get_mut(&e.info.peer_id) {
                    Some(n) if n.last_seen_ms <= age => {}
                    Some(n) => *n = node,
                    None => {
                        nodes.insert(e.info.peer_id, node);
                    }
                }
            }
            holders.sort_by_key(|h| h.peer_id);
            let (layout, known_hashes) = match self.hashes(digest) {
                Some((layout, known, _)) => (Some(layout), u32::try_from(known.len()).unwrap_or(u32::MAX)),
                None => (None, 0),
            };
            let lease = self.lease_status(digest, now).map(|l| LeaseView {
                holder: l.holder,
                state: match l.state {
                    LeaseState::Live => LeaseViewState::Live,
                    LeaseState::Expired => LeaseViewState::Expired,
                    LeaseState::Stalled => LeaseViewState::Stalled,
                },
                held_ms: None,
            });
            view.blobs.push(BlobView { digest: *digest, layout, known_hashes, holders, lease });
        }
        view.nodes = nodes.into_values().collect();
        view.nodes.sort_by_key(|n| n.peer_id);
        view
    }

    #[cfg(test)]
    fn check(&self) {
        for entry in self.blobs.values() {
            entry.peers.check();
        }
    }
}

/// SplitMix64's finaliser: a well-mixed 64-bit value from any input.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An IPv4 peer seen through a dual-stack socket shows up as `::ffff:a.b.c.d`; hand
/// it out as plain IPv4 so IPv4-only peers can dial it.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

impl TrackerError {
    /// The wire code this error is reported with.
    pub fn code(&self) -> TrackerErrorCode {
        match self {
            TrackerError::UnknownBlob { .. } => TrackerErrorCode::UnknownBlob,
            TrackerError::Conflict { .. } => TrackerErrorCode::Conflict,
            TrackerError::NoHashes { .. } => TrackerErrorCode::UnknownBlob,
            TrackerError::LayoutConflict { .. } | TrackerError::HashConflict { .. } | TrackerError::HashGap { .. } => {
                TrackerErrorCode::Conflict
            }
            TrackerError::InvalidMetainfo { .. }
            | TrackerError::InvalidLayout { .. }
            | TrackerError::HashesPastEnd { .. }
            | TrackerError::NotLeaseHolder { .. }
            | TrackerError::ZoneTooLong { .. }
            | TrackerError::StoreTooLarge { .. }
            | TrackerError::Settling { .. }
            | TrackerError::Unreachable { .. }
            | TrackerError::Stage(_) => TrackerErrorCode::Invalid,
        }
    }
}

#[cfg(test)]
mod tests;

/// Errors of the tracker state. Request errors are sent back to the peer
/// as a [`TrackerResponse::Error`](swarm_proto::msg::TrackerResponse::Error) with
/// [`TrackerError::code`].
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// The metainfo breaks the protocol's rules.
    #[error("invalid metainfo for {blob}: {source}")]
    InvalidMetainfo {
        blob: Digest,
        #[source]
        source: ProtoError,
    },
    /// A different metainfo is already registered for this digest.
    #[error("a different metainfo is already registered for {blob}")]
    Conflict { blob: Digest },
    /// Nothing is registered for this digest.
    #[error("no metainfo is registered for {blob}")]
    UnknownBlob { blob: Digest },
    /// A published layout breaks the protocol's rules.
    #[error("invalid layout for {blob}: {source}")]
    InvalidLayout {
        blob: Digest,
        #[source]
        source: ProtoError,
    },
    /// Published hashes come under another layout than the one recorded.
    #[error(
        "{blob} is recorded as {known_length} bytes in pieces of {known_piece_length}, \
         not {length} bytes in pieces of {piece_length}"
    )]
    LayoutConflict { blob: Digest, known_length: u64, known_piece_length: u32, length: u64, piece_length: u32 },
    /// A published or registered hash differs from the one already recorded.
    #[error("piece {piece} of {blob} already has a different hash")]
    HashConflict { blob: Digest, piece: u32 },
    /// Published hashes start past the known prefix.
    #[error("hashes from piece {first} of {blob} would leave a gap: only {known} are known")]
    HashGap { blob: Digest, first: u32, known: u32 },
    /// Published hashes reach past the blob's last piece.
    #[error("{count} hashes from piece {first} reach past the {pieces} pieces of {blob}")]
    HashesPastEnd { blob: Digest, first: u32, count: usize, pieces: u32 },
    /// Only the holder of a blob's upstream lease may publish hashes or release it.
    #[error("peer {peer_id} is not the lease holder of {blob}")]
    NotLeaseHolder { peer_id: PeerId, blob: Digest },
    /// No piece hashes (metainfo or partial) are known for this digest.
    #[error("no piece hashes are known for {blob}")]
    NoHashes { blob: Digest },
    /// The announce's zone label is too long.
    #[error("zone label of {len} bytes exceeds the limit of {max}")]
    ZoneTooLong { len: usize, max: usize },
    /// No hashes known here yet, but the blob's lease holder is expected to re-assert
    /// its lease (see the module docs): ask again shortly.
    #[error("no piece hashes of {blob} are known here yet: waiting for its lease holder to re-assert; ask again")]
    Settling { blob: Digest },
    /// A store announce lists more blobs than one message may.
    #[error("a store announce of {blobs} blobs exceeds the limit of {max} (split it)")]
    StoreTooLarge { blobs: usize, max: usize },
    /// A stage request broke a rule.
    #[error(transparent)]
    Stage(#[from] stage::StageError),
    /// The announce gives no address other peers could dial.
    #[error("peer {peer_id} announced the unreachable address {addr} (set a listen port or an advertise address)")]
    Unreachable { peer_id: PeerId, addr: SocketAddr },
}
