//! `swarm-sim`: a discrete-event, flow-level network simulator that runs the **real**
//! swarm policy — `swarm_core::scheduler::Scheduler` on every node,
//! `swarm_core::scheduler::choose_peers` for connection choice and
//! `swarm_core::tracker::TrackerState` as the tracker — through their sans-IO
//! interfaces, with virtual time.
//!
//! # What is modelled
//!
//! - **Bandwidth, at flow level** ([`model`]): each node has an upload and a download
//!   capacity; the upstream registry has an egress rate `u_s`; with `--zones K` each
//!   site has one shared link (each direction) that inter-site and upstream traffic
//!   crosses. A piece transfer is a flow over sender-up → (site links) →
//!   receiver-down; rates are an incremental max-min fair allocation that never
//!   exceeds any capacity (see [`model`] for the exact rule and its error).
//! - **Latency**: a fixed one-way delay of RTT/2 for every message (request, reply,
//!   cancel, `Have`), a dial costs 2 RTTs, a tracker round trip 1 RTT, and the upstream
//!   GET starts one WAN RTT after the lease holder starts.
//! - **The real node's driver** ([`node`]), with the real node's defaults: receive
//!   budget (16 MiB, FIFO), 4 upload slots with a 500 ms wait and `Busy`, a freed
//!   slot going to the least-sent piece, the sources' fresh-piece hold (400 ms) and
//!   re-announce, `Missing` rejects, cancels, `Have` to every connected peer that has
//!   not announced the piece, `max_peers` = 32 with `choose_peers` over the
//!   tracker's list, inbound connections always accepted, announces every 2 s while
//!   short of peers and every tracker interval otherwise, re-announce on completion;
//!   in the edge upgrade also the upstream lease (`AcquireLease` to the real tracker
//!   core), the holder's per-piece `PublishHashes` before announcing, and the other
//!   nodes' hash sync (a `GetHashes` the tracker holds until the next publish) with
//!   `Have`s deferred until the piece's hash is known.
//! - **Scenarios** ([`scenario`]): edge upgrade (the lease holder streams the blob
//!   from upstream; each piece is shared as soon as it arrived and its hash is
//!   published), in-cluster (a seed), churn (graceful leaves and joins at random
//!   times), and the direct baseline.
//!
//! # What is not modelled
//!
//! Packet-level effects (TCP/QUIC congestion control, slow start, loss, queueing
//! delay, head-of-line blocking): a flow gets its fair share instantly. CPU and disk:
//! hashing, writes and the final whole-blob check take no time (a node counts as
//! done at the scheduler's `Complete`; the real node then re-hashes the whole blob,
//! about a second or two per GiB, before containerd gets the last piece). Control traffic
//! (handshakes, bitfields, `Have`s, tracker messages) uses no bandwidth. Bad pieces,
//! stalled peers, dial failures other than to departed nodes, tracker restarts and
//! crashes (every leave is graceful), the lease holder failing or leaving (so no
//! lease takeover), the holder's HTTP body pausing (it is buffered: the upstream
//! streams at full rate while pieces are hashed and published), the mirror and
//! containerd. Tracker requests are handled when sent; the answer arrives one RTT
//! later. Only one blob at a time.
//!
//! # Usage
//!
//! ```text
//! cargo run --release -p swarm-simulations -- -n 1000 --blob 1GiB --node-up-spread 0.5
//! cargo run --release -p swarm-simulations -- --scenario churn -n 200 --churn-leave 0.2 --churn-join 0.1
//! cargo run --release -p swarm-simulations -- --scenario edge -n 100 --zones 4 --zone-link 500Mbit/s --json
//! ```
//!
//! `--scenario all` (the default) runs edge, in-cluster and direct. Each report gives
//! the last node's completion time, median and p90, `T_min` (Kumar–Ross, from the
//! rates actually drawn) and the ratios, the uplink bytes over `F`, events processed
//! and the wall time; `--progress 10s` logs the swarm's state every 10 simulated
//! seconds. Every flag can also be set through a `SWARM_SIM_*` environment variable.
//!
//! # Determinism
//!
//! A run is a pure function of its parameters and `--seed`: integer virtual time,
//! FIFO among simultaneous events, every map ordered (`BTreeMap`), every random draw
//! from seeded generators. Only the reported wall time differs between runs.

pub mod model;
pub mod node;
pub mod report;
pub mod scenario;
pub mod units;
pub mod world;

pub use report::Report;
pub use scenario::{Params, Rates, Scenario, run};
pub use world::Faults;
