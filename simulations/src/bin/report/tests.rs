//! The generator on small synthetic inputs: parsing, table values, verdicts, the chart.

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::input::{EmuDoc, Loaded, SimReport, parse_emu, parse_sim};
use crate::targets::{Verdict, checks};
use crate::{chart, markdown};

fn result(system: &str, scenario: &str, t_min: f64, done: &[f64], uplink: f64, cpu: f64) -> Value {
    let mut sorted = done.to_vec();
    sorted.sort_by(f64::total_cmp);
    let last = sorted[sorted.len() - 1];
    let median = sorted[(sorted.len() - 1) / 2];
    let nodes: Vec<Value> = done
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"node": i + 1, "done_s": t, "status": "done", "killed": false, "restarted": false}))
        .collect();
    json!({
        "system": system, "scenario": scenario, "repeat": 0, "status": "ok", "reason": "",
        "t_min_s": t_min,
        "t_min": {"source_s": t_min, "download_s": t_min / 2.0, "swarm_s": t_min / 3.0, "zone_s": 0.0, "t_min_s": t_min},
        "n_downloaders": done.len(), "last_s": last, "median_s": median, "p90_s": last,
        "ratio": last / t_min, "uplink_ratio": uplink, "cpu_s_per_gb": cpu, "cpu_s_per_gb_cluster": cpu - 1.0,
        "node_rx_ratio": 1.004, "cpu_floor_s": 1.5, "nodes": nodes, "processes": []
    })
}

fn emu_doc() -> Value {
    let mut churned = result("libtorrent", "churn", 3.0, &[5.0, 5.5, 6.0], 0.0, 14.0);
    churned["churn"] = json!({"victims": [3], "kill_at_s": 1.5, "restart": true, "restart_at_s": 2.5});
    churned["restarted_last_s"] = json!(6.2);
    churned["nodes"][2]["killed"] = json!(true);
    churned["nodes"][2]["restarted"] = json!(true);
    json!({
        "schema": "swarm-emulate/1", "started_at": "2026-11-24T10:00:00Z", "duration_s": 200.0,
        "params": {"nodes": 4, "size_bytes": 67108864, "uplink_bps": 100000000, "node_rate_bps": 200000000,
                   "node_down_bps": 200000000, "scenarios": ["edge", "incluster", "churn"],
                   "systems": ["direct", "swarm", "libtorrent"], "swarm_version": "swarm 0.1.0",
                   "libtorrent_version": "2.0.8.0"},
        "host": {"kernel": "6.1", "cpus": 2, "hostname": "vm", "loadavg_at_end": [3.0, 2.5, 2.0], "note": "shared"},
        "calibration": null,
        "results": [
            result("direct", "edge", 5.0, &[10.0, 15.0, 18.0, 20.0], 4.02, 5.0),
            result("swarm", "edge", 5.0, &[5.0, 5.2, 5.4, 5.5], 1.006, 10.0),
            result("libtorrent", "edge", 5.0, &[8.0, 9.0, 9.5, 10.0], 2.1, 15.0),
            result("swarm", "incluster", 3.0, &[3.5, 3.9, 4.05], 0.0, 16.0),
            result("libtorrent", "incluster", 3.0, &[5.0, 5.5, 6.0], 0.0, 14.0),
            {"system": "swarm", "scenario": "churn", "repeat": 0, "status": "failed",
             "reason": "node 3: copy failed sha256 | tail", "t_min_s": 3.0, "nodes": []},
            churned,
        ]
    })
}

fn sim_doc() -> Value {
    let report = |scenario: &str, last: Value, over: Value, completed: usize, timed_out: bool| {
        json!({
            "scenario": scenario, "seed": 1, "nodes": 1000, "downloaders": 1000, "completed": completed,
            "incomplete": 1000 - completed, "left": 0, "joined": 0, "blob_bytes": 1073741824u64,
            "piece_length": 4194304, "pieces": 256, "upstream_bps": 1e8, "node_up_min_bps": 1e8,
            "node_up_mean_bps": 2e8, "node_up_max_bps": 3e8, "node_down_min_bps": 1e9, "zones": 1,
            "rtt_ms": 1.0, "wan_rtt_ms": 50.0,
            "t_min": {"source_s": 85.9, "download_s": 8.6, "swarm_s": 42.9, "zone_s": 0.0, "t_min_s": 85.9},
            "last_s": last, "median_s": 80.0, "p90_s": 88.0, "last_over_t_min": over,
            "median_over_t_min": 0.93, "p90_over_t_min": 1.02, "uplink_bytes": 1073741824u64,
            "uplink_over_f": 1.0, "received_bytes": 0, "received_over_nf": 1.0, "wasted_over_f": 0.01,
            "swarm_upload_utilisation": 0.5, "scheduler": {}, "events": 10, "events_by_kind": {},
            "flows": 5, "rate_changes": 7, "timed_out": timed_out, "wall_s": 12.5
        })
    };
    json!([
        report("edge", json!(90.2), json!(1.05), 1000, false),
        report("in-cluster", Value::Null, Value::Null, 998, true),
    ])
}

fn load(emu: Value, sim: Value) -> (Vec<Loaded<EmuDoc>>, Vec<Loaded<Vec<SimReport>>>) {
    let e = parse_emu(&emu.to_string()).expect("emulation document parses");
    let s = parse_sim(&sim.to_string()).expect("simulator output parses");
    (
        vec![Loaded { path: PathBuf::from("results/emulate.json"), data: e }],
        vec![Loaded { path: PathBuf::from("results/sim.json"), data: s }],
    )
}

fn verdicts(emu: Value, sim: Value) -> Vec<(String, Verdict, String)> {
    let (e, s) = load(emu, sim);
    checks(&e, &s).into_iter().map(|c| (c.target, c.verdict, c.measured)).collect()
}

#[test]
fn verdicts_follow_the_figures() {
    let v = verdicts(emu_doc(), sim_doc());
    let got: Vec<_> = v.iter().map(|(t, v, _)| (t.split(':').next().unwrap_or("").to_string(), *v)).collect();
    assert_eq!(
        got,
        vec![
            ("Edge upgrade (emulation, swarm agent)".to_string(), Verdict::Met),
            ("In-cluster (emulation, swarm)".to_string(), Verdict::NotMet),
            ("In-cluster (simulator)".to_string(), Verdict::NotMet),
            ("Simulator, edge, 1,000 nodes × 1 GiB, heterogeneous uploads".to_string(), Verdict::Met),
            ("Simulator wall time, 1,000 nodes × 1 GiB".to_string(), Verdict::Met),
            ("Simulator wall time, 10,000 nodes × 1 GiB".to_string(), Verdict::NotMeasured),
            ("CPU per GB ≤ libtorrent's (emulation, edge)".to_string(), Verdict::Met),
            ("CPU per GB ≤ libtorrent's (emulation, incluster)".to_string(), Verdict::NotMet),
            ("CPU per GB ≤ libtorrent's (emulation, churn)".to_string(), Verdict::NotMet),
        ]
    );
    assert_eq!(v[0].2, "1.100 × T_min, uplink 1.006 × F");
    assert_eq!(v[1].2, "1.350 × T_min");
    assert_eq!(v[2].2, "1,000 nodes × 1 GiB: – × T_min, not every node finished");
    assert_eq!(v[3].2, "seed 1: 1.050 × T_min, uplink 1.000 × F, 1,000/1,000 finished");
    assert_eq!(v[4].2, "2 of 2 runs meet it: edge: 12.5 s; in-cluster: 12.5 s");
    assert_eq!(v[6].2, "swarm 10.0 vs libtorrent 15.0 CPU s/GB");
    assert!(v[8].2.starts_with("failed: node 3"), "{}", v[8].2);
}

#[test]
fn uplink_over_target_misses_and_missing_runs_are_not_measured() {
    let mut e = emu_doc();
    e["results"][1]["uplink_ratio"] = json!(1.02);
    let v = verdicts(e, sim_doc());
    assert_eq!(v[0].1, Verdict::NotMet);

    let mut e = emu_doc();
    e["results"][1] = json!({"system": "swarm", "scenario": "edge", "status": "unavailable",
                             "reason": "not available: swarm agent missing", "t_min_s": 5.0});
    let mut sim = sim_doc();
    sim[0]["nodes"] = json!(20);
    let v = verdicts(e, sim);
    assert_eq!(v[0].1, Verdict::NotMeasured);
    assert_eq!(v[0].2, "unavailable: not available: swarm agent missing");
    assert_eq!(v[3].1, Verdict::NotMeasured);
    assert_eq!(v[6].1, Verdict::NotMeasured, "CPU cannot be compared without a swarm figure");
}

#[test]
fn simulator_in_cluster_meets_the_in_cluster_bound_when_every_node_finished() {
    let mut sim = sim_doc();
    sim[1]["last_s"] = json!(100.0);
    sim[1]["last_over_t_min"] = json!(1.25);
    sim[1]["completed"] = json!(1000);
    sim[1]["timed_out"] = json!(false);
    let v = verdicts(emu_doc(), sim);
    assert_eq!(v[2].1, Verdict::Met);
    assert_eq!(v[2].2, "1,000 nodes × 1 GiB: 1.250 × T_min");
    let mut sim = sim_doc();
    sim.as_array_mut().expect("array").truncate(1);
    assert!(verdicts(emu_doc(), sim).iter().all(|(t, _, _)| !t.starts_with("In-cluster (simulator)")));
}

#[test]
fn every_repeat_must_meet_a_target() {
    let mut e = emu_doc();
    let mut second = e["results"][1].clone();
    second["repeat"] = json!(1);
    second["ratio"] = json!(1.2);
    e["results"].as_array_mut().expect("results array").push(second);
    let v = verdicts(e, sim_doc());
    assert_eq!(v[0].1, Verdict::NotMet);
    assert_eq!(
        v[0].2,
        "1 of 2 runs meet it: run 1: 1.100 × T_min, uplink 1.006 × F; run 2: 1.200 × T_min, uplink 1.006 × F"
    );
}

#[test]
fn simulator_uplink_must_read_one_and_every_node_finish() {
    let mut sim = sim_doc();
    sim[0]["uplink_over_f"] = json!(1.006);
    assert_eq!(verdicts(emu_doc(), sim)[3].1, Verdict::NotMet);
    let mut sim = sim_doc();
    sim[0]["completed"] = json!(999);
    assert_eq!(verdicts(emu_doc(), sim)[3].1, Verdict::NotMet);
    let mut sim = sim_doc();
    sim[0]["last_over_t_min"] = json!(1.11);
    assert_eq!(verdicts(emu_doc(), sim)[3].1, Verdict::NotMet);
}

#[test]
fn the_simulator_target_needs_differing_upload_rates_and_wall_limits_hold() {
    let mut sim = sim_doc();
    sim[0]["node_up_min_bps"] = json!(2e8);
    sim[0]["node_up_max_bps"] = json!(2e8);
    let v = verdicts(emu_doc(), sim);
    assert_eq!(v[3].1, Verdict::NotMeasured, "equal upload rates do not count: {}", v[3].2);

    let mut sim = sim_doc();
    sim[1]["wall_s"] = json!(61.0);
    sim[0]["nodes"] = json!(10000);
    let v = verdicts(emu_doc(), sim);
    assert_eq!((v[4].1, v[4].2.as_str()), (Verdict::NotMet, "in-cluster: 61.0 s"));
    assert_eq!((v[5].1, v[5].2.as_str()), (Verdict::Met, "edge: 12.5 s"));
}

#[test]
fn markdown_tables_carry_the_figures() {
    let (e, s) = load(emu_doc(), sim_doc());
    let c = checks(&e, &s);
    let commands = vec!["cargo build --release".to_string()];
    let md = markdown::render(&markdown::Doc {
        emu: &e,
        sim: &s,
        checks: &c,
        commands: &commands,
        report_command: "swarm-report --emu results/emulate.json",
        chart: Some("benchmarks-completion.svg"),
    });
    let has = |needle: &str| assert!(md.contains(needle), "missing {needle:?} in\n{md}");
    has(
        "| Edge upgrade (emulation, swarm agent): last node ≤ 1.15 × T_min with uplink ≤ 1.01 × F | 1.100 × T_min, uplink 1.006 × F | **met** |",
    );
    has("| In-cluster (emulation, swarm): last node ≤ 1.3 × T_min | 1.350 × T_min | **not met** |");
    has(
        "| swarm | ok | 4/4 | 5.50 | 5.20 | 5.50 | 5.00 | 1.10 | 1.006 | 10.0 | cluster CPU 9.0 s/GB; CPU floor 1.50 s = 27 % of last; rx 1.004 × F per node |",
    );
    has("| direct | ok | 4/4 | 20.00 | 15.00 | 20.00 | 5.00 | 4.00 | 4.020 | 5.0 |");
    has("| swarm | failed: node 3: copy failed sha256 \\| tail | – | – | – | – | 3.00 | – | – | – |");
    has("### edge: T_min = 5.00 s (F/u_s 5.00 s, F/d_min 2.50 s, N·F/(u_s + Σu_i) 1.67 s)");
    has("## Emulation: 4 nodes, 64 MiB blob, uplink 100 Mbit/s, nodes 200 Mbit/s up / 200 Mbit/s down");
    has(
        "| edge | 1,000 | 1 GiB | 256 × 4 MiB | 100 Mbit/s | 100 Mbit/s–300 Mbit/s (mean 200 Mbit/s) | 1 Gbit/s | 1,000/1,000 | 90.20 | 80.00 | 88.00 | 85.90 | 1.050 | 1.000 | 1.000 | 12.5 |",
    );
    has(
        "| in-cluster | 1,000 | 1 GiB | 256 × 4 MiB | 100 Mbit/s | 100 Mbit/s–300 Mbit/s (mean 200 Mbit/s) | 1 Gbit/s | 998/1,000 (timed out) | – | 80.00 |",
    );
    has("```sh\ncargo build --release\nswarm-report --emu results/emulate.json\n```");
    has("2 cores; the emulated nodes share them");
    has("As incluster, and node(s) 3 SIGKILLed at 1.50 s and restarted at 2.50 s;");
    has("| libtorrent | ok | 2/2 | 6.00 | 5.50 | 6.00 | 3.00 | 2.00 | 0.000 | 14.0 | 1 restarted nodes: last 6.20 s;");
    has("![nodes finished over time, per scenario and system](benchmarks-completion.svg)");
    has("grey = direct, blue = swarm, orange = libtorrent");
}

#[test]
fn edge_containerd_gets_a_table_and_a_panel_but_no_target() {
    let without = verdicts(emu_doc(), sim_doc());
    let mut e = emu_doc();
    let results = e["results"].as_array_mut().expect("results array");
    results.push(result("direct", "edge-containerd", 5.0, &[30.0, 40.0, 44.0, 45.0], 8.02, 25.0));
    results.push(result("swarm", "edge-containerd", 5.0, &[7.0, 7.2, 7.5, 7.7], 1.001, 26.0));
    results.push(json!({"system": "libtorrent", "scenario": "edge-containerd", "repeat": 0, "status": "unavailable",
                        "reason": "not applicable: libtorrent is no registry", "t_min_s": 5.0}));
    assert_eq!(verdicts(e.clone(), sim_doc()), without, "edge-containerd adds no target and changes none");
    let (e, s) = load(e, sim_doc());
    let c = checks(&e, &s);
    let commands = vec![];
    let md = markdown::render(&markdown::Doc {
        emu: &e,
        sim: &s,
        checks: &c,
        commands: &commands,
        report_command: "swarm-report",
        chart: None,
    });
    let has = |needle: &str| assert!(md.contains(needle), "missing {needle:?} in\n{md}");
    has("### edge-containerd: T_min = 5.00 s");
    has("As edge, but a real containerd on every node pulls an image whose one layer holds the blob");
    has("| swarm | ok | 4/4 | 7.70 | 7.20 | 7.70 | 5.00 | 1.54 | 1.001 | 26.0 |");
    has("| libtorrent | unavailable: not applicable: libtorrent is no registry | – |");
    let panels = chart::panels(&e);
    assert_eq!(panels.len(), 4);
    assert_eq!(panels[3].title, "edge-containerd: 4 nodes, 64 MiB");
    assert_eq!(panels[3].lines.len(), 2, "no line for the system that does not apply");
    chart::render(&panels).expect("chart renders");
}

#[test]
fn chart_has_a_panel_per_scenario_and_readable_labels() {
    let (e, _) = load(emu_doc(), sim_doc());
    let panels = chart::panels(&e);
    assert_eq!(panels.len(), 3);
    assert_eq!(panels[0].title, "edge: 4 nodes, 64 MiB");
    assert_eq!(panels[0].lines.len(), 3);
    assert_eq!(panels[0].lines[1].times, vec![5.0, 5.2, 5.4, 5.5]);
    assert_eq!(panels[2].lines.len(), 1, "a failed run without completions draws no line");
    let svg = chart::render(&panels).expect("chart renders");
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    for label in [
        "seconds since start",
        "nodes finished",
        "edge: 4 nodes, 64 MiB",
        "\nswarm\n",
        "\nlibtorrent\n",
        "T_min 5.00 s",
    ] {
        assert!(svg.contains(label), "no {label:?} in the SVG");
    }
    assert!(svg.contains("<text"), "text must be SVG text elements");
}

#[test]
fn steps_rise_by_one_at_each_completion() {
    assert_eq!(chart::steps(&[1.0, 2.5]), vec![(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (2.5, 1.0), (2.5, 2.0)]);
}

#[test]
fn formatting_helpers() {
    assert_eq!(markdown::size(67108864), "64 MiB");
    assert_eq!(markdown::size(1 << 30), "1 GiB");
    assert_eq!(markdown::rate(1e8), "100 Mbit/s");
    assert_eq!(markdown::rate(2.5e9), "2.5 Gbit/s");
    assert_eq!(markdown::shell_quote("--scenario"), "--scenario");
    assert_eq!(markdown::shell_quote("it's"), r"'it'\''s'");
    assert_eq!(crate::targets::thousands(10000), "10,000");
    assert_eq!(crate::link_from("docs/benchmarks.md".as_ref(), "docs/x.svg".as_ref()), "x.svg");
    assert_eq!(crate::link_from("benchmarks.md".as_ref(), "x.svg".as_ref()), "x.svg");
}

#[test]
fn a_foreign_document_is_refused() {
    assert!(parse_emu(r#"{"schema": "other/1", "params": {}, "results": []}"#).is_err());
    let one = parse_sim(&sim_doc()[0].to_string()).expect("a single report parses");
    assert_eq!(one.len(), 1);
}
