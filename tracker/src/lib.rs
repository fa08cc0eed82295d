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
/// The pure state core, which lives in `swarm-core` so the simulator drives it without
/// tokio or quinn.
pub use swarm_core::tracker as state;

pub use client::{HashesReply, TrackerClient, TrackerClientError};
pub use server::{REQUEST_KINDS, Tracker, TrackerStats, serve};
pub use state::{LeaseState, LeaseStatus, TrackerConfig, TrackerError, TrackerState};
