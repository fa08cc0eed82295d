//! Scenarios: turning parameters into a cluster, running it, and the yardsticks.
//!
//! This module owns the parameter set ([`Params`]), the per-node rate draws, the three
//! swarm scenarios and the direct baseline, churn schedules, and the Kumar–Ross
//! minimum distribution time computed from the rates actually drawn.
//!
//! - **Edge upgrade** ([`Scenario::Edge`]): `N` nodes, the blob only upstream and not
//!   registered. Every node asks the tracker for the layout, then for the upstream
//!   lease; node 0 asks first and gets it. It streams the blob in one GET (after one
//!   WAN RTT), and each piece goes to its scheduler with `local_piece` as soon as its
//!   last byte arrived and its hash is published (cut-through), so the uplink carries
//!   exactly `F`. Everyone swarms, learning hashes as they are published.
//! - **In-cluster** ([`Scenario::InCluster`]): node 0 starts with the whole blob; the
//!   other `N − 1` pull.
//! - **Churn** ([`Scenario::Churn`]): the edge upgrade while a fraction of the nodes
//!   leaves and new ones join at uniform random times in a window (default
//!   `[0, T_min]`). Churn parameters also apply to the other two scenarios.
//! - **Direct** ([`Scenario::Direct`]): every node GETs the whole blob from upstream at
//!   once; the upstream is shared max-min fairly (exact here: one shared resource).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use swarm_core::tracker::TrackerConfig;

use crate::model::{FlowNet, Nanos, nanos};
use crate::node::{DriverConfig, Role};
use crate::report::Report;
use crate::world::{Faults, NodeOutcome, NodeSpec, RunOutcome, Setup, World};

/// Which experiment to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    Edge,
    InCluster,
    Churn,
    Direct,
}

impl Scenario {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Edge => "edge",
            Scenario::InCluster => "in-cluster",
            Scenario::Churn => "churn",
            Scenario::Direct => "direct",
        }
    }
}

/// How per-node rates are drawn.
#[derive(Clone, Debug, PartialEq)]
pub enum Rates {
    /// Uniform in `[mean·(1 − spread), mean·(1 + spread)]`.
    Uniform { mean: f64, spread: f64 },
    /// Node `i` gets `list[i % len]`.
    List(Vec<f64>),
}

impl Rates {
    fn draw(&self, i: usize, rng: &mut StdRng) -> f64 {
        match self {
            Rates::Uniform { mean, spread } => {
                let s = spread.clamp(0.0, 0.999);
                if s == 0.0 { *mean } else { mean * rng.gen_range(1.0 - s..=1.0 + s) }
            }
            Rates::List(list) => list.get(i % list.len().max(1)).copied().unwrap_or(1.0),
        }
    }
}

/// Every parameter of a run.
#[derive(Clone, Debug)]
pub struct Params {
    pub scenario: Scenario,
    /// Nodes at the start (edge: all download; in-cluster: node 0 is the seed).
    pub nodes: usize,
    pub blob: u64,
    /// `None`: `swarm_proto::piece_length_for(blob)`.
    pub piece_length: Option<u32>,
    /// Upstream registry egress, bytes per second.
    pub upstream: f64,
    pub node_up: Rates,
    pub node_down: Rates,
    pub zones: u32,
    /// Each site's shared link, each way, bytes per second.
    pub zone_link: f64,
    pub rtt: Duration,
    pub wan_rtt: Duration,
    /// Fraction of the starting nodes that leave mid-transfer.
    pub churn_leave: f64,
    /// New nodes joining mid-transfer, as a fraction of the starting nodes.
    pub churn_join: f64,
    /// Leaves and joins happen uniformly in `[0, window]` (default: `T_min`).
    pub churn_window: Option<Duration>,
    pub seed: u64,
    /// Give up after this much virtual time (default: `20·T_min + 60 s`; none for the
    /// direct baseline, which always ends).
    pub max_time: Option<Duration>,
    pub driver: DriverConfig,
    pub tracker: TrackerConfig,
    /// Log a progress line this often (virtual time), at info level.
    pub progress: Option<Duration>,
    /// Faults to inject (edge upgrade).
    pub faults: Faults,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            scenario: Scenario::Edge,
            nodes: 20,
            blob: 64 << 20,
            piece_length: None,
            upstream: 100e6 / 8.0,
            node_up: Rates::Uniform { mean: 200e6 / 8.0, spread: 0.0 },
            node_down: Rates::Uniform { mean: 1e9 / 8.0, spread: 0.0 },
            zones: 1,
            zone_link: 1e9 / 8.0,
            rtt: Duration::from_millis(1),
            wan_rtt: Duration::from_millis(50),
            churn_leave: 0.0,
            churn_join: 0.0,
            churn_window: None,
            seed: 1,
            max_time: None,
            driver: DriverConfig::default(),
            tracker: TrackerConfig::default(),
            progress: None,
            faults: Faults::default(),
        }
    }
}

impl Params {
    /// The piece length in use.
    pub fn piece_length(&self) -> u32 {
        self.piece_length.unwrap_or_else(|| swarm_proto::piece_length_for(self.blob))
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.nodes >= 1, "need at least one node");
        anyhow::ensure!(
            self.scenario != Scenario::InCluster || self.nodes >= 2,
            "in-cluster needs a seed and a puller"
        );
        anyhow::ensure!(self.blob > 0, "the blob is empty");
        anyhow::ensure!(self.piece_length() > 0, "piece length is zero");
        let rate_ok = |r: f64| r.is_finite() && r > 0.0;
        anyhow::ensure!(rate_ok(self.upstream) && rate_ok(self.zone_link), "rates must be positive");
        for rates in [&self.node_up, &self.node_down] {
            match rates {
                Rates::Uniform { mean, spread } => {
                    anyhow::ensure!(rate_ok(*mean), "rates must be positive");
                    anyhow::ensure!((0.0..1.0).contains(spread), "a spread must be in [0, 1)");
                }
                Rates::List(l) => anyhow::ensure!(!l.is_empty() && l.iter().all(|&r| rate_ok(r)), "bad rate list"),
            }
        }
        anyhow::ensure!(self.zones >= 1, "need at least one zone");
        anyhow::ensure!((0.0..=1.0).contains(&self.churn_leave), "--churn-leave is a fraction in [0, 1]");
        anyhow::ensure!(self.churn_join >= 0.0, "--churn-join must not be negative");
        Ok(())
    }
}

/// The Kumar–Ross minimum distribution time and its terms, in seconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct TMin {
    /// `F / u_s`: the source must send every byte once.
    pub source_s: f64,
    /// `F / d_min`: the slowest downloader must receive every byte.
    pub download_s: f64,
    /// `n·F / (u_s + Σ u_i)`: all `n·F` bytes through all upload capacity.
    pub swarm_s: f64,
    /// With several sites: `F / zone_link` (a site without the blob must pull it in).
    pub zone_s: f64,
    /// The maximum of the terms.
    pub t_min_s: f64,
}

/// `T_min` for `F` bytes from a source of rate `u_s` to nodes with `(up, down)` rates.
pub fn t_min(f: f64, u_s: f64, nodes: &[(f64, f64)], zone_s: f64) -> TMin {
    let n = nodes.len() as f64;
    let d_min = nodes.iter().map(|&(_, d)| d).fold(f64::INFINITY, f64::min);
    let sum_up: f64 = nodes.iter().map(|&(u, _)| u).sum();
    let source_s = f / u_s;
    let download_s = if nodes.is_empty() { 0.0 } else { f / d_min };
    let swarm_s = n * f / (u_s + sum_up);
    TMin { source_s, download_s, swarm_s, zone_s, t_min_s: source_s.max(download_s).max(swarm_s).max(zone_s) }
}

/// The node set of a scenario (before churn) and its `T_min`.
fn base_nodes(p: &Params, rng: &mut StdRng) -> (Vec<NodeSpec>, TMin) {
    let f = p.blob as f64;
    let mut specs: Vec<NodeSpec> = (0..p.nodes)
        .map(|i| NodeSpec {
            role: Role::Leecher,
            zone: (i as u32) % p.zones,
            up: p.node_up.draw(i, rng),
            down: p.node_down.draw(i, rng),
            join_at: None,
            leave_at: None,
        })
        .collect();
    let rates = |s: &[NodeSpec]| s.iter().map(|n| (n.up, n.down)).collect::<Vec<_>>();
    let zone_s = if p.zones > 1 { f / p.zone_link } else { 0.0 };
    let tmin = match p.scenario {
        Scenario::InCluster => {
            specs[0].role = Role::Seed;
            let seed_up = specs[0].up;
            // Sites without the seed must pull the blob over their link.
            let zone_s = if p.zones > 1 && p.nodes > 1 { zone_s } else { 0.0 };
            t_min(f, seed_up, &rates(&specs[1..]), zone_s)
        }
        Scenario::Edge | Scenario::Churn => {
            specs[0].role = Role::Holder;
            t_min(f, p.upstream, &rates(&specs), zone_s)
        }
        Scenario::Direct => t_min(f, p.upstream, &rates(&specs), zone_s),
    };
    (specs, tmin)
}

/// Runs one scenario and reports on it.
pub fn run(p: &Params) -> anyhow::Result<Report> {
    p.validate()?;
    let wall = std::time::Instant::now();
    let mut rng = StdRng::seed_from_u64(p.seed ^ 0x5157_4152_4d53_494d);
    let (mut specs, tmin) = base_nodes(p, &mut rng);
    if p.scenario == Scenario::Direct {
        // Always finishes (every flow has a positive rate): no default time limit.
        let outcome = run_direct(p, &specs, p.max_time.unwrap_or(Duration::MAX));
        return Ok(Report::new(p, tmin, &outcome, wall.elapsed()));
    }
    let (leave, join) = match p.scenario {
        Scenario::Churn if p.churn_leave == 0.0 && p.churn_join == 0.0 => (0.1, 0.1),
        _ => (p.churn_leave, p.churn_join),
    };
    let max_time = p.max_time.unwrap_or_else(|| Duration::from_secs_f64(tmin.t_min_s * 20.0 + 60.0));
    let window = nanos(p.churn_window.unwrap_or_else(|| Duration::from_secs_f64(tmin.t_min_s)));
    add_churn(&mut specs, p, leave, join, window, &mut rng);
    let setup = Setup {
        seed: rng.r#gen(),
        blob_len: p.blob,
        piece_length: p.piece_length(),
        nodes: specs,
        upstream: p.upstream,
        zones: p.zones,
        zone_link: p.zone_link,
        rtt: p.rtt,
        wan_rtt: p.wan_rtt,
        driver: p.driver.clone(),
        tracker: p.tracker.clone(),
        max_time,
        progress: p.progress,
        faults: p.faults.clone(),
        lease: matches!(p.scenario, Scenario::Edge | Scenario::Churn),
    };
    let outcome = World::new(setup)?.run();
    Ok(Report::new(p, tmin, &outcome, wall.elapsed()))
}

/// Marks `leave·N` random non-source nodes to leave and appends `join·N` joiners, at
/// uniform random times in `[0, window]`.
fn add_churn(specs: &mut Vec<NodeSpec>, p: &Params, leave: f64, join: f64, window: Nanos, rng: &mut StdRng) {
    let n = specs.len();
    let mut leavers: Vec<usize> = (0..n).filter(|&i| specs[i].role == Role::Leecher).collect();
    leavers.shuffle(rng);
    leavers.truncate((leave * n as f64).round() as usize);
    leavers.sort_unstable();
    for i in leavers {
        specs[i].leave_at = Some(rng.gen_range(0..=window));
    }
    let joiners = (join * n as f64).round() as usize;
    for k in 0..joiners {
        let i = n + k;
        specs.push(NodeSpec {
            role: Role::Leecher,
            zone: (i as u32) % p.zones,
            up: p.node_up.draw(i, rng),
            down: p.node_down.draw(i, rng),
            join_at: Some(rng.gen_range(0..=window)),
            leave_at: None,
        });
    }
}

/// The direct baseline: every node GETs the blob from upstream at once (after one WAN
/// RTT), sharing the upstream (and site links) max-min fairly.
fn run_direct(p: &Params, specs: &[NodeSpec], max_time: Duration) -> RunOutcome {
    let mut net: FlowNet<u32> = FlowNet::default();
    let upstream = net.add_resource(p.upstream);
    let zone_in: Vec<_> =
        if p.zones > 1 { (0..p.zones).map(|_| net.add_resource(p.zone_link)).collect() } else { vec![] };
    let downs: Vec<_> = specs.iter().map(|s| net.add_resource(s.down)).collect();
    let start = nanos(p.wan_rtt);
    net.begin_batch();
    for (i, s) in specs.iter().enumerate() {
        let mut path = vec![upstream];
        if let Some(&z) = zone_in.get(s.zone as usize) {
            path.push(z);
        }
        path.push(downs[i]);
        net.start(start, p.blob, &path, i as u32);
    }
    net.end_batch(start);
    let mut done: Vec<Option<Nanos>> = vec![None; specs.len()];
    let (mut events, mut now, mut uplink) = (0u64, start, 0u64);
    let limit = nanos(max_time);
    while let Some((t, _)) = net.next_finish() {
        if t > limit {
            break;
        }
        now = t;
        // Flows ending at the same instant: one refill for all of them.
        net.begin_batch();
        while let Some((t2, id)) = net.next_finish() {
            if t2 != t {
                break;
            }
            if let Some((i, bytes, _)) = net.end(id, t) {
                done[i as usize] = Some(t);
                uplink += bytes;
                events += 1;
            }
        }
        net.end_batch(t);
    }
    let timed_out = done.iter().any(Option::is_none);
    RunOutcome {
        nodes: specs
            .iter()
            .zip(&done)
            .map(|(s, &c)| NodeOutcome {
                role: Role::Leecher,
                counted: true,
                up: s.up,
                down: s.down,
                joined_at: 0,
                left_at: None,
                completed_at: c,
                downloaded: if c.is_some() { p.blob } else { 0 },
                uploaded: 0,
            })
            .collect(),
        end: now,
        timed_out,
        all_out_at: None,
        upstream_done_at: None,
        zone_in_bytes: 0.0,
        haves_delivered: 0,
        peak_links: (0, 0),
        takeovers: 0,
        fallbacks: 0,
        restarts: 0,
        events,
        events_by_kind: {
            let mut k = [0; crate::world::EVENT_KINDS.len()];
            k[crate::world::EVENT_KINDS.len() - 1] = events;
            k
        },
        uplink_bytes: uplink,
        received_bytes: uplink,
        uploaded_bytes: 0,
        wasted_bytes: 0.0,
        net: net.stats(),
        sched: Default::default(),
    }
}
