//! The markdown document: targets and verdicts, the commands, the machine, one table
//! per emulated scenario, the chart, the simulator's table, and the definitions.
//! Every number comes from the inputs; nothing depends on the clock, so the same
//! inputs give the same bytes.

use std::fmt::Write as _;

use crate::chart;
use crate::input::{EmuDoc, EmuResult, Loaded, SimReport, TMin};
use crate::targets::{Check, thousands};

/// What the document is made of.
pub struct Doc<'a> {
    pub emu: &'a [Loaded<EmuDoc>],
    pub sim: &'a [Loaded<Vec<SimReport>>],
    pub checks: &'a [Check],
    /// The commands that produced the inputs, in order (shell syntax).
    pub commands: &'a [String],
    /// The command that produced this report.
    pub report_command: &'a str,
    /// The chart, as a link relative to the markdown file (none: no chart).
    pub chart: Option<&'a str>,
}

/// `67108864` → `64 MiB`.
pub fn size(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if bytes >= GIB && bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{bytes} B")
    }
}

/// A simulator run's node upload rates: `min–max (mean m)` when they differ.
fn node_up(r: &SimReport) -> String {
    match (r.node_up_min_bps, r.node_up_mean_bps, r.node_up_max_bps) {
        (Some(lo), Some(mean), Some(hi)) if r.heterogeneous() => {
            format!("{}–{} (mean {})", rate(lo), rate(hi), rate(mean))
        }
        (_, Some(mean), _) => rate(mean),
        _ => "–".to_string(),
    }
}

/// `2e8` (bits/s) → `200 Mbit/s`.
pub fn rate(bps: f64) -> String {
    let (v, unit) = if bps >= 1e9 {
        (bps / 1e9, "Gbit/s")
    } else if bps >= 1e6 {
        (bps / 1e6, "Mbit/s")
    } else {
        (bps / 1e3, "kbit/s")
    };
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s} {unit}")
}

fn num(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "–".to_string(),
    }
}

/// Text safe inside a table cell: one line, no `|`, at most `max` characters.
fn cell(s: &str, max: usize) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ").replace('|', "\\|");
    if one.chars().count() > max { format!("{}…", one.chars().take(max).collect::<String>()) } else { one }
}

/// A shell word: as is if plain, otherwise single-quoted.
pub fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "_./=:,@%+-".contains(c));
    if plain { arg.to_string() } else { format!("'{}'", arg.replace('\'', r"'\''")) }
}

fn t_min_terms(t: &TMin) -> String {
    let mut s = format!(
        "F/u_s {} s, F/d_min {} s, N·F/(u_s + Σu_i) {} s",
        num(t.source_s, 2),
        num(t.download_s, 2),
        num(t.swarm_s, 2)
    );
    if let Some(z) = t.zone_s.filter(|z| *z > 0.0) {
        let _ = write!(s, ", F/zone link {z:.2} s");
    }
    s
}

fn scenario_text(sc: &str, rows: &[&EmuResult]) -> String {
    let churn = || {
        let Some(c) = rows.iter().find_map(|r| r.churn.as_ref()) else {
            return "with churn".to_string();
        };
        let victims = c.victims.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
        let restart = match (c.restart, c.restart_at_s) {
            (true, Some(t)) => format!(" and restarted at {t:.2} s"),
            _ => ", not restarted".to_string(),
        };
        format!("node(s) {victims} SIGKILLed at {} s{restart}", num(c.kill_at_s, 2))
    };
    match sc {
        "edge" => "The blob is only on the upstream registry; every node downloads it (an edge upgrade).".to_string(),
        "incluster" => "The blob is complete on node 1; the other nodes download it (no uplink traffic).".to_string(),
        "churn" => format!(
            "As incluster, and {}; the figures are over the nodes that stay, the restarted ones are in the notes.",
            churn()
        ),
        "edge-churn" => format!(
            "As edge, and {}; the figures are over the nodes that stay, the restarted ones are in the notes.",
            churn()
        ),
        "edge-containerd" => "As edge, but a real containerd on every node pulls an image whose one layer holds the \
                              blob (`ctr images pull`: fetch and unpack, which T_min leaves out); F is the layer's \
                              size. libtorrent cannot serve containerd."
            .to_string(),
        _ => String::new(),
    }
}

fn system_text(system: &str) -> &'static str {
    match system {
        "direct" => {
            "every node pulls the blob itself with curl (from the upstream registry, or an in-cluster one); \
             edge-containerd: each node's containerd pulls from the upstream registry"
        }
        "swarm" => {
            "the product: edge = `swarm agent` on every node and curl through its registry mirror \
             (edge-containerd: containerd through it); in-cluster = `swarm seed` on node 1 and `swarm pull` \
             on the others"
        }
        "swarm-seed" => {
            "`swarm seed` + `swarm pull` everywhere (edge: the seed on the upstream host, like libtorrent's)"
        }
        "libtorrent" => "Debian's python3-libtorrent (TCP, every peer introduced to every other)",
        _ => "",
    }
}

fn nodes_done(r: &EmuResult) -> String {
    if r.nodes.is_empty() {
        return "–".to_string();
    }
    let stay: Vec<_> = r.nodes.iter().filter(|n| !n.killed).collect();
    let done = stay.iter().filter(|n| n.status == "done").count();
    format!("{done}/{}", stay.len())
}

fn notes(r: &EmuResult) -> String {
    let mut v = Vec::new();
    if let Some(t) = r.restarted_last_s {
        let n = r.nodes.iter().filter(|n| n.restarted).count();
        v.push(format!("{n} restarted nodes: last {t:.2} s"));
    }
    if let Some(c) = r.cpu_s_per_gb_cluster {
        v.push(format!("cluster CPU {c:.1} s/GB"));
    }
    match (r.cpu_floor_s, r.last_s) {
        (Some(f), Some(last)) if last > 0.0 => {
            v.push(format!("CPU floor {f:.2} s = {:.0} % of last", 100.0 * f / last))
        }
        (Some(f), _) => v.push(format!("CPU floor {f:.2} s")),
        _ => {}
    }
    if let Some(x) = r.node_rx_ratio {
        v.push(format!("rx {x:.3} × F per node"));
    }
    v.join("; ")
}

fn file_name(path: &std::path::Path) -> String {
    path.display().to_string()
}

fn write_targets(s: &mut String, d: &Doc<'_>) {
    let _ = writeln!(s, "## Targets\n");
    let _ =
        writeln!(s, "Checked by `swarm-report` against the figures below; nothing in this table is typed by hand.\n");
    let _ = writeln!(s, "| target | this run | verdict |\n| --- | --- | --- |");
    for c in d.checks {
        let _ = writeln!(s, "| {} | {} | {} |", cell(&c.target, 200), cell(&c.measured, 400), c.verdict.label());
    }
    let _ = writeln!(s);
}

fn write_commands(s: &mut String, d: &Doc<'_>) {
    let _ = writeln!(s, "## How these figures were produced\n");
    let _ = writeln!(s, "From the repository root (the emulation needs root):\n");
    let _ = writeln!(s, "```sh");
    for c in d.commands {
        let _ = writeln!(s, "{c}");
    }
    let _ = writeln!(s, "{}", d.report_command);
    let _ = writeln!(s, "```\n");
    let _ = writeln!(s, "`simulations/report.sh` runs all of it in one go. Inputs:\n");
    for e in d.emu {
        let p = &e.data.params;
        let _ = writeln!(
            s,
            "- `{}`: emulation started {}, {} s; swarm `{}`, libtorrent {}",
            file_name(&e.path),
            e.data.started_at.as_deref().unwrap_or("?"),
            num(e.data.duration_s, 0),
            p.swarm_version.as_deref().unwrap_or("?"),
            p.libtorrent_version.as_deref().unwrap_or("?"),
        );
    }
    for l in d.sim {
        let scen: Vec<_> =
            l.data.iter().map(|r| format!("{} ({} nodes)", r.scenario, thousands(r.nodes as u64))).collect();
        let _ = writeln!(s, "- `{}`: swarm-sim, {}", file_name(&l.path), scen.join(", "));
    }
    let _ = writeln!(s);
}

fn write_machine(s: &mut String, d: &Doc<'_>) {
    let _ = writeln!(s, "## Machine\n");
    for e in d.emu {
        let host = e.data.host.clone().unwrap_or_default();
        let cpus = host.cpus.map_or_else(|| "?".to_string(), |c| c.to_string());
        let load = host.loadavg_at_end.iter().map(|l| format!("{l:.1}")).collect::<Vec<_>>().join(", ");
        let _ = writeln!(
            s,
            "- `{}`: {cpus} cores; the emulated nodes share them, so timings and CPU figures vary from run \
             to run; Linux {}; load average at the end of the run {}.{}",
            file_name(&e.path),
            host.kernel.as_deref().unwrap_or("?"),
            if load.is_empty() { "?".to_string() } else { load },
            host.note.as_deref().map(|n| format!(" The run's own note: \"{n}\".")).unwrap_or_default(),
        );
        if let Some(c) = e.data.calibration.as_ref().filter(|c| c.status == "ok") {
            let _ = writeln!(
                s,
                "  Fabric check (iperf3 TCP): every node sending at once reached ≥ {}% of the node rate, the uplink {}%.",
                num(c.ring_min_fraction.map(|f| f * 100.0), 0),
                num(c.uplink_fraction.map(|f| f * 100.0), 0),
            );
        }
    }
    let _ = writeln!(
        s,
        "\nThe simulator is deterministic (virtual time): its figures do not depend on the machine, only its wall time does.\n"
    );
}

fn write_emulation(s: &mut String, d: &Doc<'_>) {
    for (i, e) in d.emu.iter().enumerate() {
        let p = &e.data.params;
        let down = p.node_down_bps.filter(|b| *b > 0.0).map_or_else(|| "unshaped".to_string(), rate);
        let _ = writeln!(
            s,
            "## Emulation{}: {} nodes, {} blob, uplink {}, nodes {} up / {} down\n",
            if d.emu.len() > 1 { format!(" [{}]", i + 1) } else { String::new() },
            p.nodes,
            size(p.size_bytes),
            rate(p.uplink_bps),
            rate(p.node_rate_bps),
            down,
        );
        let _ = writeln!(
            s,
            "Real processes in Linux network namespaces on one machine, every link shaped with `tbf` \
             (`simulations/emulate/`). Systems:\n"
        );
        let mut systems: Vec<&str> = Vec::new();
        let mut scenarios: Vec<&str> = Vec::new();
        for r in &e.data.results {
            if !systems.contains(&r.system.as_str()) {
                systems.push(&r.system);
            }
            if !scenarios.contains(&r.scenario.as_str()) {
                scenarios.push(&r.scenario);
            }
        }
        for sys in &systems {
            let _ = writeln!(s, "- **{sys}**: {}", system_text(sys));
        }
        let _ = writeln!(s);
        for sc in scenarios {
            let rows: Vec<&EmuResult> = e.data.results.iter().filter(|r| r.scenario == sc).collect();
            let tmin = rows.iter().find_map(|r| r.t_min.clone());
            let t = rows.iter().find_map(|r| r.t_min_s);
            let _ = writeln!(
                s,
                "### {sc}: T_min = {} s{}\n",
                num(t, 2),
                tmin.map(|t| format!(" ({})", t_min_terms(&t))).unwrap_or_default()
            );
            let _ = writeln!(s, "{}\n", scenario_text(sc, &rows));
            let _ = writeln!(
                s,
                "| system | status | nodes done | last s | median s | p90 s | T_min s | last ÷ T_min | uplink ÷ F | CPU s/GB | notes |"
            );
            let _ = writeln!(s, "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
            let repeats = rows.iter().any(|r| r.repeat > 0);
            for r in rows {
                let name = if repeats { format!("{} (run {})", r.system, r.repeat + 1) } else { r.system.clone() };
                let status = if r.ok() { "ok".to_string() } else { format!("{}: {}", r.status, cell(&r.reason, 160)) };
                let _ = writeln!(
                    s,
                    "| {name} | {status} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    nodes_done(r),
                    num(r.last_s, 2),
                    num(r.median_s, 2),
                    num(r.p90_s, 2),
                    num(r.t_min_s, 2),
                    num(r.over_t_min(), 2),
                    num(r.uplink_ratio, 3),
                    num(r.cpu_s_per_gb, 1),
                    notes(r),
                );
            }
            let _ = writeln!(s);
        }
    }
    if let Some(link) = d.chart {
        let mut systems: Vec<&str> = Vec::new();
        for e in d.emu {
            for r in &e.data.results {
                if !systems.contains(&r.system.as_str()) {
                    systems.push(&r.system);
                }
            }
        }
        let legend: Vec<_> = systems.iter().map(|sys| format!("{} = {sys}", chart::colour_name(sys))).collect();
        let _ = writeln!(s, "### Completion of every node\n");
        let _ = writeln!(s, "![nodes finished over time, per scenario and system]({link})\n");
        let _ = writeln!(
            s,
            "x: seconds since the common start; y: nodes whose copy was complete (a step per node). Colours: {}; \
             dashed: T_min. Churn panels include the restarted nodes.\n",
            legend.join(", ")
        );
    }
}

fn write_simulator(s: &mut String, d: &Doc<'_>) {
    let reports: Vec<&SimReport> = d.sim.iter().flat_map(|l| l.data.iter()).collect();
    if reports.is_empty() {
        return;
    }
    let mut counts: Vec<usize> = reports.iter().map(|r| r.nodes).collect();
    counts.sort_unstable();
    counts.dedup();
    let counts: Vec<_> = counts.iter().map(|&n| thousands(n as u64)).collect();
    let _ = writeln!(s, "## Simulator: {} nodes\n", counts.join(" and "));
    let _ = writeln!(
        s,
        "`swarm-sim`: a flow-level discrete-event simulation that runs the real scheduler and tracker cores in \
         virtual time (what it models and what it leaves out: `simulations/src/lib.rs`). Uplink ÷ F counts piece \
         bytes here, frame bytes in the emulation.\n"
    );
    let _ = writeln!(
        s,
        "| scenario | nodes | blob | pieces | upstream | node up | node down (min) | finished | last s | median s | p90 s | T_min s | last ÷ T_min | uplink ÷ F | received ÷ N·F | wall s |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut sorted = reports.clone();
    sorted.sort_by_key(|r| r.nodes);
    for r in sorted {
        let finished = match (r.completed, r.downloaders) {
            (Some(c), Some(n)) => format!(
                "{}/{}{}",
                thousands(c as u64),
                thousands(n as u64),
                if r.timed_out { " (timed out)" } else { "" }
            ),
            _ => "–".to_string(),
        };
        let pieces = r.piece_length.map_or_else(
            || "–".to_string(),
            |p| format!("{} × {}", thousands(r.blob_bytes.div_ceil(u64::from(p.max(1)))), size(u64::from(p))),
        );
        let _ = writeln!(
            s,
            "| {} | {} | {} | {pieces} | {} | {} | {} | {finished} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            thousands(r.nodes as u64),
            size(r.blob_bytes),
            r.upstream_bps.map_or_else(|| "–".to_string(), rate),
            node_up(r),
            r.node_down_min_bps.map_or_else(|| "–".to_string(), rate),
            num(r.last_s, 2),
            num(r.median_s, 2),
            num(r.p90_s, 2),
            num(r.t_min.t_min_s, 2),
            num(r.over_t_min(), 3),
            num(r.uplink_over_f, 3),
            num(r.received_over_nf, 3),
            num(r.wall_s, 1),
        );
    }
    let _ = writeln!(s);
    for r in &reports {
        let _ = writeln!(
            s,
            "- {} / {} nodes: T_min = {} s ({})",
            r.scenario,
            thousands(r.nodes as u64),
            num(r.t_min.t_min_s, 2),
            t_min_terms(&r.t_min)
        );
    }
    let _ = writeln!(s);
}

const DEFINITIONS: &str = "## Definitions\n\n\
- **T_min** = max(F/u_s, F/d_min, N·F/(u_s + Σu_i)) (Kumar & Ross 2006) for F blob bytes, N downloaders, source \
  upload u_s (the uplink on edge, node 1's upload in-cluster), node uploads u_i and the slowest download d_min, \
  from the shaped (emulation) or modelled (simulator) rates.\n\
- **last / median / p90**: completion times of the downloaders that stayed, in seconds since the common start; \
  percentiles are nearest-rank (the median of an even count is the lower middle value).\n\
- **uplink ÷ F**: bytes the upstream sent over the run / blob size. Emulation: the upstream namespace's `eth0` \
  `tx_bytes`, frames with Ethernet/IP/TCP-or-UDP headers; simulator: piece bytes.\n\
- **CPU s/GB**: user + system CPU of every process of the system (the upstream registry or seed included) from \
  the common start, per 10^9 bytes of verified copies; `cluster` leaves out the upstream side. **CPU floor** = \
  all of that CPU / cores: close to the last node's time means the run was CPU-bound on this machine.\n\
- **status ok**: every copy's sha256 was checked after the run.\n";

/// The whole markdown document.
pub fn render(d: &Doc<'_>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "<!-- Generated by swarm-report (simulations/src/bin/report) from the JSON inputs listed below. \
         Do not edit by hand: rerun simulations/report.sh. -->\n"
    );
    let _ = writeln!(
        s,
        "How close swarm gets to the minimum distribution time T_min, and how many copies cross the uplink, \
         next to every node pulling directly and next to libtorrent; then the simulator at a scale the machine \
         cannot emulate.\n"
    );
    write_targets(&mut s, d);
    write_emulation(&mut s, d);
    write_simulator(&mut s, d);
    write_commands(&mut s, d);
    write_machine(&mut s, d);
    s.push_str(DEFINITIONS);
    s
}
