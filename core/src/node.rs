//! A node's settings and the timing rules of its swarms: every number that shapes
//! how a node behaves towards its peers and the tracker, in one place, so the daemon
//! and the simulator cannot disagree about any of them.

use std::time::Duration;

use crate::scheduler::SchedulerConfig;

/// Re-announce this often while a swarm has fewer than half its wanted peers.
pub const EAGER_ANNOUNCE: Duration = Duration::from_secs(2);
/// Pause before asking the tracker for piece hashes again after an answer without
/// new ones (the tracker holds a `GetHashes` until the next publish, so after new
/// hashes the next ask goes at once).
pub const HASH_SYNC: Duration = Duration::from_millis(150);
/// Do not dial a peer address again for this long after a dial to it failed.
pub const CONNECT_BACKOFF: Duration = Duration::from_secs(5);
/// Pause before asking the tracker again for a blob whose upstream lease another
/// node holds but whose layout it has not published yet.
pub const LAYOUT_RETRY: Duration = Duration::from_millis(100);
/// How long a source (a seed or the upstream lease holder) keeps a piece it has just
/// uploaded to one peer from going to others, so that they fetch it from that peer.
pub const FRESH_HOLD: Duration = Duration::from_millis(400);
/// How long a piece request waits for an upload slot before it is answered `Busy`.
pub const SLOT_WAIT: Duration = Duration::from_millis(500);
/// A connection whose peer sent nothing for this long is closed (QUIC's idle
/// timeout; keep-alives flow every few seconds while the peer lives). Until then a
/// crashed peer's requests only end by their own timeouts.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a node does in its swarms: the settings both drivers take their defaults from.
#[derive(Clone, Debug)]
pub struct NodePolicy {
    /// Concurrent piece uploads across all blobs.
    pub upload_slots: usize,
    /// Peers to dial per blob (peers that dial us are accepted beyond it).
    pub max_peers: usize,
    /// Bytes of piece buffers that may be in flight across all downloads.
    pub receive_budget: usize,
    /// Piece-picking policy.
    pub scheduler: SchedulerConfig,
}

impl Default for NodePolicy {
    fn default() -> Self {
        Self {
            // Slots are held until the requester acknowledges the last byte; with 4,
            // that acknowledgement's trip left a source's link idle between pieces
            // (emulated in-cluster run: 1.32-1.41 x T_min against 1.29-1.33 with 8).
            upload_slots: 8,
            // 16 rather than 32: in the simulator (1,000 nodes x 1 GiB) it finished as
            // fast or faster in the edge, in-cluster and churn runs, with half the
            // `Have` traffic (see docs/benchmarks.md).
            max_peers: 16,
            receive_budget: 16 << 20,
            scheduler: SchedulerConfig::default(),
        }
    }
}

impl NodePolicy {
    /// The receive budget in KiB permits (at least one).
    pub fn receive_budget_kib(&self) -> u32 {
        u32::try_from(self.receive_budget / 1024).unwrap_or(u32::MAX).max(1)
    }

    /// When the next announce is due after a tracker reply with `interval`: soon
    /// while the swarm is short of peers and the blob incomplete, else at the
    /// tracker's interval. `None` for a failed announce (retry after
    /// [`EAGER_ANNOUNCE`]).
    pub fn next_announce(&self, interval: Option<Duration>, peers: usize, complete: bool) -> Duration {
        match interval {
            None => EAGER_ANNOUNCE,
            Some(i) if peers < self.max_peers / 2 && !complete => EAGER_ANNOUNCE.min(i),
            Some(i) => i,
        }
    }
}

/// Where the bytes of a blob a node serves are read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyKind {
    /// The node's own copy in its data directory.
    Own,
    /// Another program's copy of the complete blob (containerd's content store).
    External,
    /// A file the user asked the node to seed, served where it lies.
    Seeded,
}

/// What a node does once a piece it read to serve (to a peer or to the local
/// mirror) failed its sha256. In every case that request is refused (a peer gets
/// `Missing` and asks another holder; the mirror's response is cut short, so
/// containerd retries or goes to the registry), the piece is no longer counted as
/// held, and a warning is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadRead {
    /// Fetch the piece again: the blob's swarm restarts from the store, whose
    /// bitfield no longer has the piece, so the node downloads just that piece from
    /// its peers and re-checks the whole digest (its peers see it reconnect with the
    /// smaller bitfield).
    Refetch,
    /// Forget the whole blob: the other program's copy cannot be repaired by this
    /// node (the disk manager drops it and tells the tracker).
    Forget,
    /// Keep serving the other pieces and withhold this one: the node never writes
    /// into a file it was asked to seed.
    Withhold,
}

/// The decision after a piece read from `copy` failed its hash (see [`BadRead`]).
pub fn after_bad_read(copy: CopyKind) -> BadRead {
    match copy {
        CopyKind::Own => BadRead::Refetch,
        CopyKind::External => BadRead::Forget,
        CopyKind::Seeded => BadRead::Withhold,
    }
}
