//! Reports: the headline ratios and counters of a run, as a table or as JSON.
//!
//! Completion times are absolute (seconds since the run started, which is when every
//! starting node announces), over the *counted* nodes that stayed: every downloader
//! (the edge lease holder included, the in-cluster seed excluded) that did not leave;
//! churn joiners are counted too. Percentiles are nearest-rank.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::model::secs;
use crate::node::Role;
use crate::scenario::{Params, TMin};
use crate::units::fmt_rate;
use crate::world::{EVENT_KINDS, RunOutcome};

/// Scheduler counters summed over every node.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct SchedulerTotals {
    pub requests: u64,
    pub cancels: u64,
    pub timeouts: u64,
    pub busy: u64,
    pub endgame_duplicates: u64,
    pub redundant: u64,
}

/// Everything a run reports. All times in seconds, sizes in bytes, rates in bits/s.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The scenario's name; with injected faults `edge-kill-holder`,
    /// `edge-tracker-down`, `edge-restarts`, `in-cluster-restarts` or `faults`.
    pub scenario: &'static str,
    pub seed: u64,
    /// Nodes at the start.
    pub nodes: usize,
    /// Counted downloaders that stayed (see the module docs).
    pub downloaders: usize,
    pub completed: usize,
    pub incomplete: usize,
    pub left: usize,
    pub joined: usize,
    pub blob_bytes: u64,
    pub piece_length: u32,
    pub pieces: u32,
    pub upstream_bps: f64,
    pub node_up_min_bps: f64,
    pub node_up_mean_bps: f64,
    pub node_up_max_bps: f64,
    pub node_down_min_bps: f64,
    pub zones: u32,
    pub rtt_ms: f64,
    pub wan_rtt_ms: f64,
    pub t_min: TMin,
    pub last_s: f64,
    pub median_s: f64,
    pub p90_s: f64,
    pub last_over_t_min: f64,
    pub median_over_t_min: f64,
    pub p90_over_t_min: f64,
    /// Upload rate of the seed (in-cluster) or lease holder (edge), bits/s.
    pub source_up_bps: Option<f64>,
    /// Bytes the seed or lease holder uploaded to peers, over `F` (1 is the ideal:
    /// every piece once; more is duplicate copies of the source's scarce upload).
    pub source_uploaded_over_f: Option<f64>,
    /// When every piece had left the seed or lease holder at least once.
    pub all_pieces_out_s: Option<f64>,
    /// When the lease holder had the last upstream byte (edge).
    pub upstream_done_s: Option<f64>,
    /// Bytes into the sites over their shared links, over `F` (with `--zones` > 1;
    /// the least possible is one `F` per site).
    pub zone_in_over_f: Option<f64>,
    /// Bytes the upstream registry sent.
    pub uplink_bytes: u64,
    pub uplink_over_f: f64,
    /// Piece bytes received and verified by all nodes (from peers and upstream).
    pub received_bytes: u64,
    /// `received_bytes / (F · counted downloaders that started)`.
    pub received_over_nf: f64,
    /// Bytes of transfers cancelled or cut off part-way, over `F`.
    pub wasted_over_f: f64,
    /// Piece bytes uploaded by nodes / (their total upload capacity × last completion).
    pub swarm_upload_utilisation: f64,
    pub scheduler: SchedulerTotals,
    /// `Have` messages delivered (each is a `peer_have` call on the receiver's
    /// scheduler), and the fraction that went to a peer already holding the piece.
    pub haves_delivered: u64,
    /// The most connections any node had at once.
    pub peak_links: usize,
    /// Upstream leases taken over from a stalled holder (faults).
    pub takeovers: u32,
    /// Nodes that gave the swarm up and fetched from the registry (faults).
    pub fallbacks: u32,
    /// Nodes crashed and restarted (faults).
    pub restarts: u32,
    /// That node's role (`seed`, `holder`, `leecher`).
    pub peak_links_role: String,
    pub events: u64,
    /// Events processed by kind (`flow_done`: flow completions).
    pub events_by_kind: BTreeMap<&'static str, u64>,
    pub flows: u64,
    pub rate_changes: u64,
    pub timed_out: bool,
    pub wall_s: f64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl Report {
    /// The report of `outcome`, a run of `p` whose minimum time is `tmin`.
    pub fn new(p: &Params, tmin: TMin, outcome: &RunOutcome, wall: Duration) -> Self {
        let f = p.blob as f64;
        let stayed: Vec<_> = outcome.nodes.iter().filter(|n| n.counted && n.left_at.is_none()).collect();
        let mut times: Vec<f64> = stayed.iter().filter_map(|n| n.completed_at).map(secs).collect();
        times.sort_by(f64::total_cmp);
        let completed = times.len();
        let last = times.last().copied().unwrap_or(f64::NAN);
        let median = percentile(&times, 0.5);
        let p90 = percentile(&times, 0.9);
        let started = outcome.nodes.iter().filter(|n| n.counted).count();
        let ups: Vec<f64> = outcome.nodes.iter().map(|n| n.up).collect();
        let up_sum: f64 = ups.iter().sum();
        let t = tmin.t_min_s;
        let pieces = p.blob.div_ceil(u64::from(p.piece_length().max(1))) as u32;
        let sched = &outcome.sched;
        let source = outcome.nodes.iter().find(|n| matches!(n.role, Role::Seed | Role::Holder));
        Self {
            // A run with injected faults gets its own name, so that nothing mistakes it
            // for the plain scenario (the report's targets select by name).
            scenario: match (p.faults.kill_holder_at.is_some(), p.faults.tracker_down.is_some(), p.faults.restart) {
                (false, false, None) => p.scenario.name(),
                (true, false, None) => "edge-kill-holder",
                (false, true, None) => "edge-tracker-down",
                (false, false, Some(_)) if p.scenario == crate::Scenario::InCluster => "in-cluster-restarts",
                (false, false, Some(_)) => "edge-restarts",
                _ => "faults",
            },
            seed: p.seed,
            nodes: p.nodes,
            downloaders: stayed.len(),
            completed,
            incomplete: stayed.len() - completed,
            left: outcome.nodes.iter().filter(|n| n.left_at.is_some()).count(),
            joined: outcome.nodes.len().saturating_sub(p.nodes),
            blob_bytes: p.blob,
            piece_length: p.piece_length(),
            pieces,
            upstream_bps: p.upstream * 8.0,
            node_up_min_bps: ups.iter().copied().fold(f64::INFINITY, f64::min) * 8.0,
            node_up_mean_bps: up_sum / ups.len().max(1) as f64 * 8.0,
            node_up_max_bps: ups.iter().copied().fold(0.0, f64::max) * 8.0,
            node_down_min_bps: outcome.nodes.iter().map(|n| n.down).fold(f64::INFINITY, f64::min) * 8.0,
            zones: p.zones,
            rtt_ms: p.rtt.as_secs_f64() * 1e3,
            wan_rtt_ms: p.wan_rtt.as_secs_f64() * 1e3,
            t_min: tmin,
            last_s: last,
            median_s: median,
            p90_s: p90,
            last_over_t_min: last / t,
            median_over_t_min: median / t,
            p90_over_t_min: p90 / t,
            source_up_bps: source.map(|n| n.up * 8.0),
            source_uploaded_over_f: source.map(|n| n.uploaded as f64 / f),
            all_pieces_out_s: outcome.all_out_at.map(secs),
            upstream_done_s: outcome.upstream_done_at.map(secs),
            zone_in_over_f: (p.zones > 1).then(|| outcome.zone_in_bytes / f),
            uplink_bytes: outcome.uplink_bytes,
            uplink_over_f: outcome.uplink_bytes as f64 / f,
            received_bytes: outcome.received_bytes,
            received_over_nf: outcome.received_bytes as f64 / (f * started.max(1) as f64),
            wasted_over_f: outcome.wasted_bytes / f,
            swarm_upload_utilisation: outcome.uploaded_bytes as f64 / (up_sum * last),
            scheduler: SchedulerTotals {
                requests: sched.requests,
                cancels: sched.cancels,
                timeouts: sched.timeouts,
                busy: sched.busy,
                endgame_duplicates: sched.endgame_duplicates,
                redundant: sched.redundant,
            },
            haves_delivered: outcome.haves_delivered,
            peak_links: outcome.peak_links.0,
            takeovers: outcome.takeovers,
            fallbacks: outcome.fallbacks,
            restarts: outcome.restarts,
            peak_links_role: outcome
                .nodes
                .get(outcome.peak_links.1 as usize)
                .map_or_else(String::new, |n| format!("{:?}", n.role).to_lowercase()),
            events: outcome.events,
            events_by_kind: EVENT_KINDS.iter().copied().zip(outcome.events_by_kind).filter(|&(_, n)| n > 0).collect(),
            flows: outcome.net.flows,
            rate_changes: outcome.net.rate_changes,
            timed_out: outcome.timed_out,
            wall_s: wall.as_secs_f64(),
        }
    }
}

/// A table of reports: one headline row each, then the details.
pub fn table(reports: &[Report]) -> String {
    let mut s = String::new();
    if let Some(r) = reports.first() {
        let _ = writeln!(
            s,
            "{} nodes, blob {:.1} MiB in {} pieces of {} KiB, upstream {}, node up {}..{} (mean {}), node down ≥ {}, {} zone(s), RTT {} ms, WAN RTT {} ms, seed {}",
            r.nodes,
            r.blob_bytes as f64 / 1048576.0,
            r.pieces,
            r.piece_length / 1024,
            fmt_rate(r.upstream_bps / 8.0),
            fmt_rate(r.node_up_min_bps / 8.0),
            fmt_rate(r.node_up_max_bps / 8.0),
            fmt_rate(r.node_up_mean_bps / 8.0),
            fmt_rate(r.node_down_min_bps / 8.0),
            r.zones,
            r.rtt_ms,
            r.wan_rtt_ms,
            r.seed,
        );
    }
    let _ = writeln!(
        s,
        "{:<11} {:>11} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>7} {:>12} {:>8}",
        "scenario",
        "done",
        "last s",
        "median s",
        "p90 s",
        "T_min s",
        "last/T",
        "p90/T",
        "uplink/F",
        "util",
        "events",
        "wall s"
    );
    for r in reports {
        let _ = writeln!(
            s,
            "{:<11} {:>11} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8.3} {:>8.3} {:>9.3} {:>7.3} {:>12} {:>8.2}",
            r.scenario,
            format!("{}/{}", r.completed, r.downloaders),
            r.last_s,
            r.median_s,
            r.p90_s,
            r.t_min.t_min_s,
            r.last_over_t_min,
            r.p90_over_t_min,
            r.uplink_over_f,
            r.swarm_upload_utilisation,
            r.events,
            r.wall_s,
        );
    }
    for r in reports {
        let t = &r.t_min;
        let c = &r.scheduler;
        let _ = writeln!(
            s,
            "{}: T_min terms F/u_s {:.2} s, F/d_min {:.2} s, nF/(u_s+Σu) {:.2} s{}; {}received {:.4}·N·F, wasted {:.3}·F; \
             requests {}, busy {}, timeouts {}, cancels {}, endgame dups {}; flows {}, rate changes {}{}{}",
            r.scenario,
            t.source_s,
            t.download_s,
            t.swarm_s,
            if t.zone_s > 0.0 { format!(", F/zone {:.2} s", t.zone_s) } else { String::new() },
            source_line(r),
            r.received_over_nf,
            r.wasted_over_f,
            c.requests,
            c.busy,
            c.timeouts,
            c.cancels,
            c.endgame_duplicates,
            r.flows,
            r.rate_changes,
            if r.left + r.joined > 0 { format!("; {} left, {} joined", r.left, r.joined) } else { String::new() },
            if r.timed_out { "; TIMED OUT" } else { "" },
        );
    }
    s
}

/// "source up …, uploaded …·F, all pieces out at … s, upstream done at … s; " when known.
fn source_line(r: &Report) -> String {
    let mut s = String::new();
    if let (Some(up), Some(sent)) = (r.source_up_bps, r.source_uploaded_over_f) {
        let _ = write!(s, "source up {}, uploaded {sent:.2}·F", fmt_rate(up / 8.0));
    }
    if let Some(t) = r.all_pieces_out_s {
        let _ = write!(s, ", all pieces out at {t:.2} s");
    }
    if let Some(t) = r.upstream_done_s {
        let _ = write!(s, ", upstream done at {t:.2} s");
    }
    if let Some(z) = r.zone_in_over_f {
        let _ = write!(s, "{}into sites {z:.1}·F", if s.is_empty() { "" } else { ", " });
    }
    if !s.is_empty() {
        s.push_str("; ");
    }
    s
}
