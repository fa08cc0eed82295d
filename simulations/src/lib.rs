//! `swarm-sim`: a discrete-event, flow-level network simulator that runs the **real**
//! node and tracker cores (`swarm_core`: each node's swarm, scheduler, upload slots,
//! lease and connection rules, and `swarm_core::tracker::TrackerState` as the
//! tracker) through their sans-IO interfaces, with virtual time. It builds without
//! tokio, quinn or any HTTP stack.
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
//! - **The real node's cores** ([`node`]): every decision a node makes is the
//!   `swarm_core` one, with the daemon's defaults (`swarm_core::node::NodePolicy`:
//!   upload slots, peers per blob, receive budget, scheduler settings; the timing
//!   constants of `swarm_core::node`). No number of the node's policy is written in
//!   this crate: a flag such as `--max-peers` only overrides the same field of the
//!   policy the daemon uses. What the cores decide, the driver carries out: the
//!   [`swarm_core::swarm::Swarm`] of each node (peer choice, dials and back-off,
//!   bans, announce cadence, piece hashes learned from the tracker or from peers,
//!   deferred `Have`s, `Have` fan-out with the hashes riding along, peer exchange,
//!   the scheduler, the blob's end), the upload slots, fresh-piece ledger and
//!   receive budget (`swarm_core::upload`), the connection bounds
//!   (`swarm_core::conns`), and in the edge upgrade the start-up, upstream lease,
//!   the holder's hash publishing and re-assertion, and the takeover of a stalled
//!   lease (`swarm_core::lease`), against the real tracker core.
//! - **Latency**: a fixed one-way delay of RTT/2 for every message (request, reply,
//!   cancel, `Have`, hashes, peer lists), a dial costs 2 RTTs, a tracker round trip 1
//!   RTT, and the upstream GET starts one WAN RTT after the lease holder starts.
//! - **Scenarios** ([`scenario`]): edge upgrade (the lease holder streams the blob
//!   from upstream; each piece is shared as soon as it arrived, its hash travelling
//!   with its `Have`), in-cluster (a seed), churn (graceful leaves and joins at
//!   random times), and the direct baseline.
//! - **Faults** ([`Faults`]): the lease holder crashes (`--kill-holder-at`; its peers
//!   notice by their requests' timeouts until QUIC's idle timeout, and another node
//!   takes the lease over), the tracker stops answering for a while
//!   (`--tracker-down-at`/`--tracker-down-for`), and downloading nodes crash and
//!   restart with their verified pieces (`--restart-at`, `--restart-nodes`,
//!   `--restart-down`).
//!
//! # What is not modelled
//!
//! Packet-level effects (TCP/QUIC congestion control, slow start, loss, queueing
//! delay, head-of-line blocking): a flow gets its fair share instantly. CPU and disk:
//! hashing, writes and the final whole-blob check take no time (a node counts as
//! done at the scheduler's `Complete`; the real node then re-hashes the whole blob,
//! about a second or two per GiB, before containerd gets the last piece). Control traffic
//! (handshakes, bitfields, `Have`s, hashes, tracker messages) uses no bandwidth. Bad
//! pieces, stalled peers that stay connected, dial failures other than to departed
//! nodes, the holder's HTTP body pausing (it is buffered: the upstream streams at
//! full rate while pieces are hashed), upstream errors and retries, tracker replicas,
//! the mirror and containerd. Tracker requests are handled when sent; the answer
//! arrives one RTT later. Only one blob at a time.
//!
//! # Usage
//!
//! ```text
//! cargo run --profile sim -p swarm-simulations -- -n 1000 --blob 1GiB --node-up-spread 0.5
//! cargo run --profile sim -p swarm-simulations -- --scenario churn -n 200 --churn-leave 0.2 --churn-join 0.1
//! cargo run --profile sim -p swarm-simulations -- --scenario edge -n 100 --zones 4 --zone-link 500Mbit/s --json
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
