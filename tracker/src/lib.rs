//! The swarm tracker: who holds or wants which blob, and each blob's metainfo.
//!
//! Three modules:
//!
//! - [`state`]: the pure core. [`TrackerState::handle`] turns one
//!   [`TrackerRequest`](swarm_proto::msg::TrackerRequest) plus the observed source
//!   address and `now` into one response. No I/O, no tokio, a seeded RNG: the server
//!   and the network simulator drive the very same code. Besides peers and metainfo
//!   it grants the **upstream lease** of a blob (the one node that fetches it from
//!   the remote registry) and collects the piece hashes the holder publishes as the
//!   bytes arrive, so the other nodes swarm on a blob still being downloaded.
//! - [`server`]: [`serve`], a thin QUIC accept loop around the state. Every connection
//!   is authenticated with the cluster token in its own task; every bidirectional
//!   stream carries one request and one response; the state sits behind a
//!   `std::sync::Mutex` that is never held across an `.await`; a periodic task
//!   expires silent peers.
//! - [`client`]: [`TrackerClient`], what peers use: one cached connection, one stream
//!   per request, a bounded time per request, one reconnect when the tracker went
//!   away.
//!
//! **Restarts.** The tracker keeps nothing on disk. After a restart it knows nothing,
//! and it does not need to: peers re-announce every `announce_interval` (30 s by
//! default) and seeders re-register their metainfo, so the state rebuilds itself
//! within one interval. Clients notice the restart on their next request (a
//! gracefully stopped tracker closes its connections; a crashed one restarted on the
//! same port answers stale connections with a QUIC stateless reset, see
//! `swarm_net`), reconnect and retry once.

pub mod client;
pub mod server;
pub mod state;

pub use client::{HashesReply, TrackerClient, TrackerClientError};
pub use server::{REQUEST_KINDS, Tracker, TrackerStats, serve};
pub use state::{LeaseState, LeaseStatus, TrackerConfig, TrackerState};

use std::net::SocketAddr;

use swarm_proto::{Digest, PeerId, ProtoError};

/// Errors of the tracker state and server. Request errors are sent back to the peer
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
    /// The announce gives no address other peers could dial.
    #[error("peer {peer_id} announced the unreachable address {addr} (set a listen port or an advertise address)")]
    Unreachable { peer_id: PeerId, addr: SocketAddr },
    /// The server's endpoint failed.
    #[error(transparent)]
    Net(#[from] swarm_net::NetError),
}
