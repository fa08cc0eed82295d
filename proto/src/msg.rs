//! Messages, one enum per direction. New variants are only ever appended, so an old
//! peer decoding a new message fails cleanly on the unknown variant tag instead of
//! misreading it. See `docs/protocol.md` for framing and the exchange rules.

use std::net::SocketAddr;

use bincode::{Decode, Encode};

use crate::{Bitfield, Digest, Layout, Metainfo, PeerId};

/// Longest zone label accepted.
pub const MAX_ZONE_LEN: usize = 64;
/// Most peers a tracker returns in one reply.
pub const MAX_PEERS_PER_REPLY: u32 = 200;

/// Peer → tracker. Each request travels on its own QUIC bidirectional stream and gets
/// exactly one [`TrackerResponse`] back.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum TrackerRequest {
    /// Publish a blob's metainfo. Idempotent; a different metainfo for a known digest
    /// is refused with [`TrackerErrorCode::Conflict`].
    Register { metainfo: Metainfo },
    /// Ask for a blob's metainfo.
    GetMetainfo { blob: Digest },
    /// "I hold or want this blob; who else does?" Sent on start, then every
    /// `interval_secs` as a keep-alive, and on completion.
    Announce(Announce),
    /// "I no longer serve or want this blob."
    Leave { peer_id: PeerId, blob: Digest },
    /// Ask to become the one node of the cluster that fetches `blob` from the upstream
    /// registry. Answered with [`TrackerResponse::Lease`].
    AcquireLease { peer_id: PeerId, blob: Digest },
    /// From the lease holder only: the blob's layout and the hashes of pieces
    /// `first..first + hashes.len()`, as the upstream bytes arrive. Also renews the
    /// lease (an empty `hashes` renews without progress). Answered with `Registered`.
    PublishHashes { peer_id: PeerId, layout: Layout, first: u32, hashes: Vec<[u8; 32]> },
    /// From the lease holder only: the upstream fetch is over. `failed` says why it
    /// failed (the partial hashes are then dropped); `None` means the whole blob
    /// matched its digest. Answered with `Left`.
    ReleaseLease { peer_id: PeerId, blob: Digest, failed: Option<String> },
    /// Ask for the layout and the hashes known so far, from piece `first` on.
    /// Answered with [`TrackerResponse::Hashes`] or `Error { UnknownBlob }`.
    GetHashes { blob: Digest, first: u32 },
    /// Read-only: the tracker's view of the cluster (`swarm status --cluster`): the
    /// nodes it tracks, which blobs each holds and the upstream leases. `blobs` empty
    /// asks for every blob, else for those only (at most [`MAX_VIEW_BLOBS`]).
    /// Answered with [`TrackerResponse::ClusterView`].
    ClusterView { blobs: Vec<Digest> },
    /// Tracker protocol version 2 and later: the first request a client sends on a new
    /// connection, with the highest tracker protocol version it speaks. Answered with
    /// [`TrackerResponse::Hello`]. A version-1 tracker cannot decode it and resets the
    /// stream: the client then speaks version 1 to it (never sends it a request newer
    /// than [`TrackerRequest::ClusterView`]).
    Hello { version: u32 },
    /// Version 2: every complete blob of the caller's store in one message (sent at
    /// start, every announce interval, and at once when a tracker's instance id is
    /// new). The tracker records the caller as a complete holder of each listed blob
    /// and registers the metainfo it is given. Answered with
    /// [`TrackerResponse::StoreAnnounced`].
    AnnounceStore(StoreAnnounce),
    /// Version 3 (`swarm stage`): add or replace the stage order of `image` (a release is
    /// an order too). An order older (`issued_ms`) than the one held for the image is
    /// ignored. Answered with [`TrackerResponse::StageOrders`].
    Stage(StageOrder),
    /// Stage, from an agent: "my copy of your orders is of `generation` `after`".
    /// Answered with [`TrackerResponse::StageOrders`] as soon as the tracker's
    /// generation differs from `after`, else after `wait_ms` (at most
    /// [`MAX_STAGE_WAIT_MS`]) with the same generation: a long poll, so an order
    /// reaches every agent at once. Also tells the tracker the agent stages.
    WaitStage { agent: StageAgent, after: u64, wait_ms: u32 },
    /// Stage, from an agent: its progress on the orders that select it (at most
    /// [`MAX_STAGE_ORDERS`] entries). Answered with `Registered`.
    StageProgress { agent: StageAgent, progress: Vec<StageProgress> },
    /// Stage, read-only: the order of `image` and every staging agent's progress on
    /// it. Answered with [`TrackerResponse::StageStatus`].
    StageStatus { image: String },
    /// From a lease holder fetching `blob` from upstream, to the cap owner (the
    /// tracker first in the rendezvous order of [`UPLINK_CAP_KEY`]): "how fast may I
    /// fetch?". Sent when the fetch starts, then every `renew_ms` of the last answer.
    /// Answered with [`TrackerResponse::UplinkShare`]. Version 3: a holder does not ask
    /// an older tracker, and fetches uncapped if no tracker speaks version 3.
    /// `fetching: false` says the fetch is over (done, failed or the lease lost): the
    /// caller's share goes back to the other holders at once.
    UplinkShare { peer_id: PeerId, blob: Digest, fetching: bool },
}

/// Most stage orders a tracker keeps (the oldest is dropped beyond it).
pub const MAX_STAGE_ORDERS: usize = 64;
/// Longest image reference in a stage order.
pub const MAX_STAGE_IMAGE_LEN: usize = 512;
/// Most `--zone`/`--node` selectors in one stage order.
pub const MAX_STAGE_SELECTORS: usize = 256;
/// Longest node name or selector.
pub const MAX_STAGE_NAME_LEN: usize = 253;
/// Longest failure reason in a [`StageState::Failed`].
pub const MAX_STAGE_REASON_LEN: usize = 1024;
/// Longest a tracker holds a [`TrackerRequest::WaitStage`].
pub const MAX_STAGE_WAIT_MS: u32 = 30_000;

/// An order to stage an image on the agents it selects, or to release it.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct StageOrder {
    /// The image reference as given (`registry/repository:tag` or `...@sha256:...`);
    /// each agent resolves it with its own upstream settings.
    pub image: String,
    /// Zones whose agents stage it (empty with `nodes` empty: every agent).
    pub zones: Vec<String>,
    /// Agents that stage it, by node name or peer id (hex, or a prefix of at least 8
    /// digits).
    pub nodes: Vec<String>,
    /// End of the pins, in seconds since the Unix epoch.
    pub pin_until_secs: u64,
    /// A release: unpin what staging this image pinned.
    pub release: bool,
    /// When the order was issued, in milliseconds since the Unix epoch: names the
    /// order (progress reports carry it) and orders the orders of one image.
    pub issued_ms: u64,
}

impl StageOrder {
    /// Whether the agent named `name` in `zone` with peer id `peer_id` is selected.
    pub fn selects(&self, name: &str, zone: &str, peer_id: &PeerId) -> bool {
        if self.zones.is_empty() && self.nodes.is_empty() {
            return true;
        }
        let hex = peer_id.to_string();
        self.zones.iter().any(|z| z == zone)
            || self.nodes.iter().any(|n| n == name || (n.len() >= 8 && hex.starts_with(n.as_str())))
    }
}

/// Who an agent is, as stage requests tell it.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct StageAgent {
    pub peer_id: PeerId,
    /// The node's name (its host name).
    pub name: String,
    pub zone: String,
}

/// One agent's progress on one stage order.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct StageProgress {
    pub image: String,
    /// The `issued_ms` of the order this is about.
    pub issued_ms: u64,
    pub state: StageState,
    /// The image manifest (for the agent's platform) once resolved.
    pub manifest: Option<Digest>,
    /// Blobs (config and layers) of the image, and how many the agent holds.
    pub blobs: u32,
    pub blobs_held: u32,
    /// Their bytes, and how many the agent holds.
    pub bytes: u64,
    pub bytes_held: u64,
}

/// Where an agent is with a stage order.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum StageState {
    /// Resolving the reference (index, platform manifest).
    Resolving,
    /// Fetching blobs.
    Fetching,
    /// Every blob held and pinned.
    Done,
    /// The agent's part failed (at most [`MAX_STAGE_REASON_LEN`] bytes of reason).
    Failed { reason: String },
    /// A release order: the pins are gone.
    Released,
}

/// The answer to [`TrackerRequest::StageStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct StageStatus {
    /// The order held for the image, if any.
    pub order: Option<StageOrder>,
    /// The tracker's announce interval: an agent not seen for three of them no longer
    /// counts.
    pub interval_secs: u32,
    /// Every agent that stages (long-polls or reports), with its progress on the
    /// image if it reported any.
    pub agents: Vec<StageAgentView>,
}

/// One staging agent as a tracker sees it.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct StageAgentView {
    pub agent: StageAgent,
    /// The address its requests come from.
    pub addr: SocketAddr,
    /// Milliseconds since its last stage request.
    pub last_seen_ms: u64,
    pub progress: Option<StageProgress>,
}

/// The fixed key whose rendezvous order over the trackers names the owner of the
/// cluster's uplink cap ([`TrackerRequest::UplinkShare`] goes there, and to the next
/// tracker while the owner does not answer). Not a blob's digest.
pub const UPLINK_CAP_KEY: Digest = Digest(*b"swarm uplink cap owner key......");

/// The tracker protocol version this code speaks (see `docs/protocol.md`, "Versions").
/// Version 1: every tracker message up to `ClusterView`; version 2 adds `Hello` and
/// `AnnounceStore`; version 3 the stage requests (`Stage`, `WaitStage`, `StageProgress`,
/// `StageStatus`) and `UplinkShare`. Independent of the peer handshake's
/// [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
pub const TRACKER_VERSION: u32 = 3;

/// Most digests in one [`StoreAnnounce`]; a larger store is announced in several.
pub const MAX_STORE_BLOBS: usize = 16_384;
/// Most piece hashes (over all its metainfo) one [`StoreAnnounce`] carries: 8 MiB of
/// hashes. A sender splits a store whose metainfo would exceed it.
pub const MAX_STORE_HASHES: usize = 1 << 18;

/// The body of [`TrackerRequest::AnnounceStore`].
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct StoreAnnounce {
    pub peer_id: PeerId,
    /// As in [`Announce`].
    pub listen_port: u16,
    pub advertise: Option<SocketAddr>,
    pub zone: String,
    /// Complete blobs held (at most [`MAX_STORE_BLOBS`]).
    pub blobs: Vec<Digest>,
    /// The metainfo of listed blobs the tracker may lack (all of them the first time
    /// a sender talks to a tracker instance; later only those it reported `missing`).
    /// At most [`MAX_STORE_HASHES`] piece hashes in all.
    pub metainfo: Vec<Metainfo>,
}

/// The body of [`TrackerRequest::Announce`].
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Announce {
    pub peer_id: PeerId,
    pub blob: Digest,
    /// UDP port the peer's QUIC endpoint listens on; combined with the source address
    /// the tracker sees unless `advertise` is given.
    pub listen_port: u16,
    /// Address to hand out instead of the observed one (NAT, multi-homed hosts).
    pub advertise: Option<SocketAddr>,
    /// Free-form locality label (rack, site); peers in the same zone are preferred.
    pub zone: String,
    /// Pieces held.
    pub have: u32,
    /// Whether every piece is held (a seed).
    pub complete: bool,
    /// How many peers the caller would like at most.
    pub num_want: u32,
}

/// Tracker → peer.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum TrackerResponse {
    Registered,
    Metainfo(Metainfo),
    Peers {
        peers: Vec<PeerInfo>,
        interval_secs: u32,
    },
    Left,
    Error {
        code: TrackerErrorCode,
        message: String,
    },
    Lease(LeaseReply),
    /// Hashes of pieces `first..first + hashes.len()`; `complete` once every piece's
    /// hash is known (the full metainfo is registered).
    Hashes {
        layout: Layout,
        first: u32,
        hashes: Vec<[u8; 32]>,
        complete: bool,
    },
    /// The answer to [`TrackerRequest::ClusterView`].
    ClusterView(ClusterView),
    /// The answer to [`TrackerRequest::Hello`]: the version both sides speak (the
    /// lower of the two) and the tracker's instance id, drawn at random when the
    /// tracker process starts. A new id means a tracker that lost its state.
    Hello {
        version: u32,
        instance: u64,
    },
    /// The answer to [`TrackerRequest::AnnounceStore`]: when to announce again, and
    /// the listed blobs whose metainfo the tracker still lacks (send them next time).
    StoreAnnounced {
        interval_secs: u32,
        missing: Vec<Digest>,
    },
    /// The answer to [`TrackerRequest::Stage`] and [`TrackerRequest::WaitStage`]:
    /// the tracker's stage orders and their generation (changed by every new order;
    /// a restarted tracker starts from a random one).
    StageOrders {
        generation: u64,
        orders: Vec<StageOrder>,
    },
    /// The answer to [`TrackerRequest::StageStatus`].
    StageStatus(StageStatus),
    /// The answer to [`TrackerRequest::UplinkShare`]: the caller's share of the
    /// cluster's uplink cap in bytes per second (`0`: no cap, fetch at full speed), and
    /// when to ask again, in milliseconds. The caller keeps this share until a tracker
    /// answers again, however long that takes.
    UplinkShare {
        bytes_per_sec: u64,
        renew_ms: u32,
    },
}

/// The answer to [`TrackerRequest::AcquireLease`].
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum LeaseReply {
    /// You hold the lease: fetch from upstream starting at piece `resume_from` (the
    /// pieces before it are already hashed and in the swarm), publish hashes at least
    /// every `ttl_secs / 3` seconds, release when done.
    Granted { ttl_secs: u32, resume_from: u32 },
    /// Another node is fetching it: swarm on the pieces it publishes.
    HeldBy { holder: PeerId },
    /// The whole blob is already known to the swarm: just swarm.
    NotNeeded,
    /// The last upstream fetch failed recently (the reason is the holder's words):
    /// fall back to the upstream rather than retry at once.
    Failed { reason: String },
}

/// One entry of a peer list.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct PeerInfo {
    pub peer_id: PeerId,
    pub addr: SocketAddr,
    pub zone: String,
    pub have: u32,
    pub complete: bool,
}

/// Why the tracker refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum TrackerErrorCode {
    /// No metainfo is registered for that digest.
    UnknownBlob,
    /// A different metainfo is already registered for that digest.
    Conflict,
    /// The request broke a rule (bad metainfo, oversized zone label, ...).
    Invalid,
}

/// Peer ↔ peer. Both directions of the control stream and of every piece stream
/// carry these; see `docs/protocol.md` for which may appear where.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum PeerMessage {
    /// First message each way on the control stream: who I am and which blob this
    /// connection is about.
    Handshake { version: u32, peer_id: PeerId, blob: Digest },
    /// The sender's pieces; second message each way on the control stream.
    Bitfield(Bitfield),
    /// The sender has verified one more piece.
    Have { piece: u32 },
    /// Opens a piece stream: "send me this piece".
    Request { piece: u32 },
    /// Answers a request: exactly `length` raw piece bytes follow on the stream.
    Piece { piece: u32, length: u32 },
    /// Answers a request the sender will not serve.
    Reject { piece: u32, reason: RejectReason },
    /// Version 2, control stream only. The blob's layout and the hashes of pieces
    /// `first..first + hashes.len()` (at most [`MAX_HASHES_PER_MESSAGE`]): piece hashes
    /// travel peer to peer, so a blob still streaming in from upstream needs no
    /// tracker to be verified. Sent before the `Have`s they cover.
    Hashes { layout: Layout, first: u32, hashes: Vec<[u8; 32]> },
    /// Version 2, control stream only. Peers of this blob the sender knows (peer
    /// exchange), at most [`MAX_PEX_PEERS`].
    Peers { peers: Vec<PeerInfo> },
}

/// Most piece hashes in one [`PeerMessage::Hashes`]: 128 KiB, half a peer frame.
pub const MAX_HASHES_PER_MESSAGE: usize = 4096;
/// Most peers in one [`PeerMessage::Peers`].
pub const MAX_PEX_PEERS: usize = 50;

/// Why a piece request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum RejectReason {
    /// All upload slots are taken; try again later or elsewhere.
    Busy,
    /// The sender does not hold that piece.
    Missing,
    /// The connection's handshake named a blob the sender does not serve.
    UnknownBlob,
}

/// Most blobs in one [`ClusterView`] (and in a `ClusterView` request's filter).
pub const MAX_VIEW_BLOBS: usize = 1024;
/// Most nodes in one [`ClusterView`].
pub const MAX_VIEW_NODES: usize = 4096;
/// Most (blob, holder) pairs in one [`ClusterView`]: at about 25 bytes each, the
/// reply stays far below the frame limit (about 25 MiB at worst).
pub const MAX_VIEW_HOLDINGS: usize = 1 << 20;

/// A tracker's view of its cluster, as of when it answered. Times are ages in
/// milliseconds (the tracker's clock is not the reader's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct ClusterView {
    /// Every node tracked for at least one blob, by peer id.
    pub nodes: Vec<NodeView>,
    /// Every blob with holders, metainfo or a lease, by digest.
    pub blobs: Vec<BlobView>,
    /// Whether the caps ([`MAX_VIEW_NODES`], [`MAX_VIEW_BLOBS`],
    /// [`MAX_VIEW_HOLDINGS`]) left something out.
    pub truncated: bool,
}

/// One node as the tracker last saw it (its most recent announce of any blob).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct NodeView {
    pub peer_id: PeerId,
    /// The address handed to other peers.
    pub addr: SocketAddr,
    pub zone: String,
    /// Milliseconds since its last announce.
    pub last_seen_ms: u64,
}

/// One blob: its size if known, who holds it and its upstream lease.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct BlobView {
    pub digest: Digest,
    /// The layout, once registered or published by a lease holder.
    pub layout: Option<Layout>,
    /// Piece hashes the tracker knows (all of them once the metainfo is registered).
    pub known_hashes: u32,
    pub holders: Vec<HolderView>,
    pub lease: Option<LeaseView>,
}

/// A node tracked for a blob, with what it announced.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct HolderView {
    pub peer_id: PeerId,
    /// Pieces held.
    pub have: u32,
    pub complete: bool,
}

/// Who holds (or last held) a blob's upstream lease.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct LeaseView {
    pub holder: PeerId,
    pub state: LeaseViewState,
    /// Milliseconds since the holder was granted the lease, when the tracker noted it.
    pub held_ms: Option<u64>,
}

/// Whether a lease still counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum LeaseViewState {
    /// Renewed in time and making progress.
    Live,
    /// Not renewed in time: the holder went silent.
    Expired,
    /// Renewed, but without new pieces for too long.
    Stalled,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{MAX_FRAME_LEN, decode_frame, encode_frame};

    #[test]
    fn cluster_view_messages_round_trip() {
        let peer_id = PeerId([7; 16]);
        let digest = Digest([3; 32]);
        let req = TrackerRequest::ClusterView { blobs: vec![digest] };
        let f = encode_frame(&req).expect("encode");
        assert_eq!(decode_frame::<TrackerRequest>(&f, MAX_FRAME_LEN).expect("decode"), req);
        let view = ClusterView {
            nodes: vec![NodeView {
                peer_id,
                addr: "127.0.0.1:7001".parse().expect("addr"),
                zone: "rack-1".into(),
                last_seen_ms: 1500,
            }],
            blobs: vec![BlobView {
                digest,
                layout: Some(Layout { digest, length: 1 << 20, piece_length: 1 << 18 }),
                known_hashes: 4,
                holders: vec![HolderView { peer_id, have: 2, complete: false }],
                lease: Some(LeaseView { holder: peer_id, state: LeaseViewState::Stalled, held_ms: Some(10) }),
            }],
            truncated: false,
        };
        let resp = TrackerResponse::ClusterView(view);
        let f = encode_frame(&resp).expect("encode");
        assert_eq!(decode_frame::<TrackerResponse>(&f, MAX_FRAME_LEN).expect("decode"), resp);
    }

    #[test]
    fn the_largest_cluster_view_fits_a_frame() {
        // Worst case per holding: a 16-byte peer id and two varints.
        let holding = 16 + 5 + 1;
        let node = 16 + 19 + 1 + MAX_ZONE_LEN + 9;
        let blob = 32 + 1 + 32 + 9 + 5 + 5 + 1 + 16 + 1 + 1 + 9 + 5;
        assert!(MAX_VIEW_HOLDINGS * holding + MAX_VIEW_NODES * node + MAX_VIEW_BLOBS * blob < MAX_FRAME_LEN);
    }
}
