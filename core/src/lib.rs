//! swarm's sans-IO cores: every decision of a node and of the tracker, with no
//! sockets, no file system, no async runtime and no clock. Callers pass `now` (an
//! [`std::time::Instant`]) into every call and pull the resulting actions out, in the
//! way quinn-proto holds all of QUIC's state while `quinn` only moves bytes.
//!
//! Two drivers run these cores: the daemon (`swarm-peer` and `swarm-tracker`, with
//! QUIC, the piece store and the upstream HTTP client) and the network simulator
//! (`swarm-simulations`, with virtual time and modelled links). A rule written here is
//! therefore the same rule in the real program and in every simulated figure; neither
//! driver re-implements one.
//!
//! - [`node`]: a node's settings and timing rules (peers, slots, budgets, announce
//!   and hash-sync cadence, back-off).
//! - [`swarm`]: one blob's swarm on a node around its scheduler: peers, dials,
//!   bans, announces, piece-hash knowledge, `Have` fan-out, the blob's end.
//! - [`conns`]: the node's connections across its swarms, bounded per remote address
//!   and in total.
//! - [`upload`]: the node's upload slots and each blob's upload ledger (who is served
//!   next, which fresh pieces a source holds back).
//! - [`scheduler`]: one blob's piece picking and peer choosing (rarest first,
//!   endgame, timeouts, bad-piece accounting).
//! - [`rate`]: the token bucket behind the uplink cap's shares and the download rate.
//! - [`tracker`]: the tracker's state: who holds or wants which blob, the metainfo,
//!   upstream leases and the piece hashes published while a blob streams in.

pub mod conns;
pub mod lease;
pub mod node;
pub mod rate;
pub mod scheduler;
pub mod swarm;
pub mod tracker;
pub mod upload;
