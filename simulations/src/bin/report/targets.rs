//! The targets, checked against the figures of the inputs (never written by
//! hand):
//!
//! - edge upgrade, emulation, `swarm` (the agent behind the mirror): last node
//!   ≤ 1.15 × T_min with uplink ≤ 1.01 × F;
//! - in-cluster, emulation, `swarm`: last node ≤ 1.3 × T_min (and the same bound
//!   for every simulator in-cluster report in the inputs, as a separate row);
//! - simulator, edge, 1,000 nodes × 1 GiB, heterogeneous upload rates: last node
//!   ≤ 1.10 × T_min with uplink 1.00 × F (to two decimals, i.e. < 1.005 × F), every
//!   node finished;
//! - simulator wall time: 1,000 nodes × 1 GiB under a minute, 10,000 under ten
//!   (every simulator report of that size in the inputs, any scenario);
//! - CPU seconds per GB of `swarm` ≤ `libtorrent`'s, per emulated scenario, comparing
//!   the two runs of the same document and repeat; not in scenarios where libtorrent
//!   is not applicable (edge-containerd: containerd pulls through a registry only).
//!
//! A target met by every run that measured it is met; one run that misses it (or
//! failed) is enough for "not met". No run at all, or only runs that could not take
//! place (`unavailable`), is "not measured".

use crate::input::{EmuDoc, EmuResult, Loaded, SimReport};

/// Edge upgrade: last node / T_min.
pub const EDGE_RATIO: f64 = 1.15;
/// Edge upgrade: uplink bytes / F.
pub const EDGE_UPLINK: f64 = 1.01;
/// In-cluster: last node / T_min.
pub const INCLUSTER_RATIO: f64 = 1.3;
/// Simulator edge run the target is about: nodes.
pub const SIM_NODES: usize = 1000;
/// Simulator edge run the target is about: blob bytes (1 GiB).
pub const SIM_BLOB: u64 = 1 << 30;
/// Simulator edge: last node / T_min.
pub const SIM_RATIO: f64 = 1.10;
/// Simulator edge: uplink / F must read 1.00 to two decimals.
pub const SIM_UPLINK_BELOW: f64 = 1.005;
/// Simulator wall-time limits: (nodes, seconds), for a 1 GiB blob.
pub const SIM_WALL: [(usize, f64); 2] = [(1_000, 60.0), (10_000, 600.0)];

/// The outcome of one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Met,
    NotMet,
    NotMeasured,
}

impl Verdict {
    /// The word shown in the report.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Met => "**met**",
            Verdict::NotMet => "**not met**",
            Verdict::NotMeasured => "not measured",
        }
    }
}

/// One target and what the inputs say about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub target: String,
    pub measured: String,
    pub verdict: Verdict,
}

/// One run's contribution: `None` if it could not measure the target.
struct RunOutcome {
    met: Option<bool>,
    text: String,
}

fn fold(target: String, runs: Vec<RunOutcome>, none: &str) -> Check {
    if runs.is_empty() {
        return Check { target, measured: none.to_string(), verdict: Verdict::NotMeasured };
    }
    let measured: Vec<bool> = runs.iter().filter_map(|r| r.met).collect();
    let verdict = if measured.is_empty() {
        Verdict::NotMeasured
    } else if measured.iter().all(|&m| m) {
        Verdict::Met
    } else {
        Verdict::NotMet
    };
    let mut text = runs.iter().map(|r| r.text.as_str()).collect::<Vec<_>>().join("; ");
    if measured.len() > 1 {
        let n = measured.iter().filter(|&&m| m).count();
        text = format!("{n} of {} runs meet it: {text}", measured.len());
    }
    Check { target, measured: text, verdict }
}

/// A label for a run when there are several: its file and repeat.
fn run_label(docs: &[Loaded<EmuDoc>], doc: usize, r: &EmuResult) -> String {
    let mut parts = Vec::new();
    if docs.len() > 1 {
        let name = docs[doc].path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        parts.push(name);
    }
    let repeats = docs[doc].data.results.iter().filter(|x| x.system == r.system && x.scenario == r.scenario).count();
    if repeats > 1 {
        parts.push(format!("run {}", r.repeat + 1));
    }
    if parts.is_empty() { String::new() } else { format!("{}: ", parts.join(" ")) }
}

fn f3(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:.3}"))
}

fn emu_runs<'a>(
    docs: &'a [Loaded<EmuDoc>],
    system: &'a str,
    scenario: &'a str,
) -> impl Iterator<Item = (usize, &'a EmuResult)> + 'a {
    docs.iter()
        .enumerate()
        .flat_map(|(i, d)| d.data.results.iter().map(move |r| (i, r)))
        .filter(move |(_, r)| r.system == system && r.scenario == scenario)
}

/// A run that did not produce figures: failed (counts as a miss) or unavailable.
fn not_ok(label: String, r: &EmuResult) -> RunOutcome {
    let met = if r.status == "unavailable" { None } else { Some(false) };
    RunOutcome { met, text: format!("{label}{}: {}", r.status, r.reason.lines().next().unwrap_or("")) }
}

fn edge(docs: &[Loaded<EmuDoc>]) -> Check {
    let runs = emu_runs(docs, "swarm", "edge")
        .map(|(i, r)| {
            let label = run_label(docs, i, r);
            if !r.ok() {
                return not_ok(label, r);
            }
            let ratio = r.over_t_min();
            let up = r.uplink_ratio;
            let met = matches!((ratio, up), (Some(t), Some(u)) if t <= EDGE_RATIO && u <= EDGE_UPLINK);
            RunOutcome { met: Some(met), text: format!("{label}{} × T_min, uplink {} × F", f3(ratio), f3(up)) }
        })
        .collect();
    fold(
        format!(
            "Edge upgrade (emulation, swarm agent): last node ≤ {EDGE_RATIO} × T_min with uplink ≤ {EDGE_UPLINK} × F"
        ),
        runs,
        "no swarm / edge run in the inputs",
    )
}

fn incluster(docs: &[Loaded<EmuDoc>]) -> Check {
    let runs = emu_runs(docs, "swarm", "incluster")
        .map(|(i, r)| {
            let label = run_label(docs, i, r);
            if !r.ok() {
                return not_ok(label, r);
            }
            let ratio = r.over_t_min();
            let met = matches!(ratio, Some(t) if t <= INCLUSTER_RATIO);
            RunOutcome { met: Some(met), text: format!("{label}{} × T_min", f3(ratio)) }
        })
        .collect();
    fold(
        format!("In-cluster (emulation, swarm): last node ≤ {INCLUSTER_RATIO} × T_min"),
        runs,
        "no swarm / incluster run in the inputs",
    )
}

fn sim_incluster(sims: &[Loaded<Vec<SimReport>>]) -> Option<Check> {
    let runs: Vec<RunOutcome> = sims
        .iter()
        .flat_map(|l| l.data.iter())
        .filter(|r| r.scenario == "in-cluster")
        .map(|r| {
            let ratio = r.over_t_min();
            let met = r.all_done() && matches!(ratio, Some(t) if t <= INCLUSTER_RATIO);
            let incomplete = if r.all_done() { "" } else { ", not every node finished" };
            RunOutcome {
                met: Some(met),
                text: format!(
                    "{} nodes × {}: {} × T_min{incomplete}",
                    thousands(r.nodes as u64),
                    crate::markdown::size(r.blob_bytes),
                    f3(ratio)
                ),
            }
        })
        .collect();
    (!runs.is_empty()).then(|| fold(format!("In-cluster (simulator): last node ≤ {INCLUSTER_RATIO} × T_min"), runs, ""))
}

fn simulator(sims: &[Loaded<Vec<SimReport>>]) -> Check {
    let runs = sims
        .iter()
        .flat_map(|l| l.data.iter())
        .filter(|r| r.scenario == "edge" && r.nodes == SIM_NODES && r.blob_bytes == SIM_BLOB && r.heterogeneous())
        .map(|r| {
            let ratio = r.over_t_min();
            let up = r.uplink_over_f;
            let done = r.all_done();
            let met = done && matches!((ratio, up), (Some(t), Some(u)) if t <= SIM_RATIO && u < SIM_UPLINK_BELOW);
            let finished = match (r.completed, r.downloaders) {
                (Some(c), Some(d)) => format!(", {}/{} finished", thousands(c as u64), thousands(d as u64)),
                _ => String::new(),
            };
            let timed_out = if r.timed_out { ", timed out" } else { "" };
            let seed = r.seed.map(|s| format!("seed {s}: ")).unwrap_or_default();
            RunOutcome {
                met: Some(met),
                text: format!("{seed}{} × T_min, uplink {} × F{finished}{timed_out}", f3(ratio), f3(up)),
            }
        })
        .collect();
    fold(
        format!(
            "Simulator, edge, {} nodes × 1 GiB, heterogeneous uploads: last node ≤ {SIM_RATIO:.2} × T_min with uplink 1.00 × F",
            thousands(SIM_NODES as u64)
        ),
        runs,
        "no simulator edge run with 1,000 nodes, a 1 GiB blob and differing upload rates in the inputs",
    )
}

fn sim_wall(sims: &[Loaded<Vec<SimReport>>]) -> Vec<Check> {
    SIM_WALL
        .iter()
        .map(|&(nodes, limit)| {
            let runs = sims
                .iter()
                .flat_map(|l| l.data.iter())
                .filter(|r| r.nodes == nodes && r.blob_bytes == SIM_BLOB)
                .map(|r| RunOutcome {
                    met: r.wall_s.map(|w| w < limit),
                    text: format!(
                        "{}: {} s",
                        r.scenario,
                        r.wall_s.map_or_else(|| "–".to_string(), |w| format!("{w:.1}"))
                    ),
                })
                .collect();
            fold(
                format!("Simulator wall time, {} nodes × 1 GiB: under {limit:.0} s", thousands(nodes as u64)),
                runs,
                "no simulator run of that size in the inputs",
            )
        })
        .collect()
}

fn cpu(docs: &[Loaded<EmuDoc>]) -> Vec<Check> {
    let mut scenarios: Vec<&str> = Vec::new();
    for d in docs {
        for r in &d.data.results {
            if !scenarios.contains(&r.scenario.as_str()) {
                scenarios.push(&r.scenario);
            }
        }
    }
    let mut out = Vec::new();
    for sc in scenarios {
        let swarm: Vec<_> = emu_runs(docs, "swarm", sc).collect();
        let lt: Vec<_> = emu_runs(docs, "libtorrent", sc).collect();
        if (swarm.is_empty() && lt.is_empty()) || lt.iter().any(|(_, l)| l.not_applicable()) {
            continue;
        }
        let runs = swarm
            .iter()
            .map(|&(i, s)| {
                let label = run_label(docs, i, s);
                let Some(&(_, l)) = lt.iter().find(|&&(j, l)| j == i && l.repeat == s.repeat) else {
                    return RunOutcome { met: None, text: format!("{label}no libtorrent run to compare with") };
                };
                if !s.ok() {
                    return not_ok(label, s);
                }
                if !l.ok() {
                    return RunOutcome { met: None, text: format!("{label}libtorrent {}: {}", l.status, l.reason) };
                }
                let met = matches!((s.cpu_s_per_gb, l.cpu_s_per_gb), (Some(a), Some(b)) if a <= b);
                RunOutcome {
                    met: Some(met),
                    text: format!("{label}swarm {} vs libtorrent {} CPU s/GB", f1(s.cpu_s_per_gb), f1(l.cpu_s_per_gb)),
                }
            })
            .collect();
        out.push(fold(format!("CPU per GB ≤ libtorrent's (emulation, {sc})"), runs, "no swarm run in this scenario"));
    }
    out
}

fn f1(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:.1}"))
}

/// `1000` → `1,000`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Every target, in the order.
pub fn checks(emu: &[Loaded<EmuDoc>], sim: &[Loaded<Vec<SimReport>>]) -> Vec<Check> {
    let mut v = vec![edge(emu), incluster(emu)];
    v.extend(sim_incluster(sim));
    v.push(simulator(sim));
    v.extend(sim_wall(sim));
    v.extend(cpu(emu));
    v
}
