//! The swarm peer agent.
//!
//! - [`scheduler`]: sans-IO piece picking and peer choosing, from `swarm-core`.
//! - [`store`]: blobs on disk, one data file plus a persisted bitfield per blob.
//! - [`node`]: the QUIC peer that drives the scheduler, serves uploads and talks to the
//!   tracker.
//! - [`rate`]: the async token-bucket limiter behind `--download-rate` and the
//!   upstream fetch's share of the cluster's uplink cap.
//! - [`upstream`]: the OCI registry client (token flow, ranges, redirects).
//! - [`mirror`]: the HTTP registry mirror containerd talks to.
//! - [`upload`]: who gets the next upload slot (least-sent piece first) and which
//!   fresh pieces a source holds back.
//! - [`disk`]: the store's byte budget, LRU eviction, pins, one copy with containerd's
//!   content store, the data directory's filesystem check.
//! - [`agent`]: the mirror's blob source backed by the swarm, with upstream leases.
//! - [`known_peers`]: the peers a node talked to, kept across restarts for when no
//!   tracker answers.
//! - [`announce`]: tells every tracker which complete blobs the store holds.
//! - [`stage`]: `swarm stage` on the node: stage orders from the trackers, images
//!   resolved, fetched and pinned ahead of a rollout, progress reported.
//! - `fuzzing` (hidden): the bodies of the fuzz targets for the mirror's and the
//!   upstream client's parsers, shared by `fuzz/` and the corpus replay test.

pub mod agent;
pub mod announce;
pub mod disk;
#[doc(hidden)]
pub mod fuzzing;
pub mod known_peers;
pub mod mirror;
pub mod node;
pub mod rate;
pub use swarm_core::scheduler;
pub mod stage;
pub mod store;
pub mod upload;
pub mod upstream;
