//! The network-emulation benchmark's self-check, as a test: real `swarm` processes in
//! Linux network namespaces with `tbf`-shaped links (N=3, 4 MiB), next to direct pulls
//! and libtorrent; then the simulator on the same configuration, compared loosely
//! with the emulated swarm so the simulator cannot drift from the real program
//! unnoticed; the same for the edge upgrade (agents, blob only upstream). And the
//! edge upgrade through a real containerd on every node (`edge-containerd`). Needs root, iproute2, curl, docker-registry, containerd and
//! python3-libtorrent (`scripts/test` installs them).

mod support;

use std::fs::File;
use std::process::Command;
use std::time::Duration;

use support::agents::swarm_bin;
use support::process::run_unchecked;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/simulations/emulate/emulate.py");

/// The emulations time real transfers on a small machine, so they run one at a time,
/// across test processes too (nextest runs every test in its own): held until dropped.
fn one_emulation_at_a_time() -> File {
    let lock = File::create(std::env::temp_dir().join("swarm-emulation-tests.lock")).expect("creating the lock file");
    lock.lock().expect("locking the emulation lock file");
    lock
}

#[test]
fn emulated_edge_cluster_selftest() {
    let _lock = one_emulation_at_a_time();
    let dir = support::test_dir("emulation");
    let json = dir.path().join("selftest.json");
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(SCRIPT).arg("selftest").arg("--swarm-bin").arg(swarm_bin()).arg("--json").arg(&json);
    let out = run_unchecked(&mut cmd, Duration::from_secs(300)).expect("running emulate.py selftest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    match out.status.code() {
        Some(0) => {
            assert!(stdout.contains("passed, 0 failed"), "selftest printed no result line");
            compare_with_simulator(&json);
        }
        Some(77) => panic!("the emulation cannot run here (needs root, iproute2, curl, docker-registry): {stderr}"),
        other => panic!("emulation selftest failed ({other:?})"),
    }
}

/// `edge-containerd` at N=3, 4 MiB: every node's containerd pulls the image, straight
/// from the registry (direct) or through its swarm agent; every node must end with the
/// image complete, unpacked and hashing right, and swarm's uplink must carry about one
/// copy of the layer.
#[test]
fn emulated_edge_upgrade_through_containerd() {
    let doc = emulate_run("edge-containerd", "direct,swarm", 240);
    let results = doc["results"].as_array().expect("results");
    for system in ["direct", "swarm"] {
        let r = results.iter().find(|r| r["system"] == system).unwrap_or_else(|| panic!("no {system} result"));
        assert_eq!(r["status"], "ok", "{system}: {}", r["reason"]);
        let nodes = r["nodes"].as_array().expect("nodes");
        assert_eq!(nodes.len(), 3, "{system}: {nodes:?}");
        for n in nodes {
            assert!(n["status"] == "done" && n["sha256_ok"] == true, "{system}: node not verified: {n}");
        }
    }
    let swarm = results.iter().find(|r| r["system"] == "swarm").expect("swarm result");
    let uplink = swarm["uplink_ratio"].as_f64().expect("uplink_ratio");
    assert!(uplink <= 1.1, "swarm moved {uplink:.3}x the layer over the uplink (at most 1.1x expected)");
}

/// The edge upgrade (the blob only upstream, an agent on each node, curl through its
/// mirror) at N=3, 4 MiB, held against the simulator's edge scenario on the same
/// configuration, like the in-cluster selftest above.
#[test]
fn emulated_edge_upgrade_agrees_with_the_simulator() {
    let doc = emulate_run("edge", "swarm", 120);
    let swarm = doc["results"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["system"] == "swarm"))
        .expect("a swarm result in the edge JSON");
    assert_eq!(swarm["status"], "ok", "{}", swarm["reason"]);
    let uplink = swarm["uplink_ratio"].as_f64().expect("uplink_ratio");
    assert!(uplink < 1.1, "the uplink carried {uplink:.3} copies of the blob");
    agree_with_simulator(swarm, swarm_simulations::Scenario::Edge, "edge");
}

/// `emulate.py run` of `scenario` with `systems` at N=3, 4 MiB (one emulation at a
/// time), its output shown, its success required; the JSON it wrote.
fn emulate_run(scenario: &str, systems: &str, max_runtime_s: u64) -> serde_json::Value {
    emulate_run_with(scenario, systems, &["--nodes", "3", "--size", "4MiB"], max_runtime_s)
}

/// [`emulate_run`] with other settings (`--nodes`, `--size`, `--churn-at`, ...).
fn emulate_run_with(scenario: &str, systems: &str, settings: &[&str], max_runtime_s: u64) -> serde_json::Value {
    let _lock = one_emulation_at_a_time();
    let dir = support::test_dir(&format!("emulation-{scenario}"));
    let json = dir.path().join(format!("{scenario}.json"));
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(SCRIPT)
        .args(["run", "--scenario", scenario, "--systems", systems])
        .args(settings)
        .arg("--max-runtime")
        .arg(max_runtime_s.to_string())
        .arg("--swarm-bin")
        .arg(swarm_bin())
        .arg("--json")
        .arg(&json);
    let out = run_unchecked(&mut cmd, Duration::from_secs(max_runtime_s + 60)).expect("running emulate.py run");
    eprintln!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "emulate.py run --scenario {scenario} failed ({:?}), see its output above",
        out.status
    );
    serde_json::from_slice(&std::fs::read(&json).unwrap_or_else(|e| panic!("{scenario} JSON: {e}")))
        .unwrap_or_else(|e| panic!("{scenario} JSON parses: {e}"))
}

/// The simulator, fed the selftest's configuration (3 nodes, one of them the seed, a
/// 4 MiB blob, 200 Mbit/s links each way), must land near what the real processes
/// did: same order of magnitude, and never below the theoretical minimum.
fn compare_with_simulator(json: &std::path::Path) {
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(json).expect("selftest JSON")).expect("selftest JSON parses");
    let swarm = doc["results"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["system"] == "swarm"))
        .expect("a swarm result in the selftest JSON");
    agree_with_simulator(swarm, swarm_simulations::Scenario::InCluster, "in-cluster");
}

/// The emulated swarm's last node against the simulator's, N=3, 4 MiB, 100 Mbit/s
/// upstream, 200 Mbit/s nodes: within a factor of two either way, and the simulator
/// never below the theoretical minimum.
fn agree_with_simulator(swarm: &serde_json::Value, scenario: swarm_simulations::Scenario, name: &str) {
    let emulated = swarm["last_s"].as_f64().expect("last_s");
    let t_min = swarm["t_min_s"].as_f64().expect("t_min_s");
    let rate = 200e6 / 8.0;
    let params = swarm_simulations::Params {
        scenario,
        nodes: 3,
        blob: 4 << 20,
        node_up: swarm_simulations::Rates::Uniform { mean: rate, spread: 0.0 },
        node_down: swarm_simulations::Rates::Uniform { mean: rate, spread: 0.0 },
        // The namespaces add no latency (no netem here).
        wan_rtt: Duration::from_millis(1),
        ..swarm_simulations::Params::default()
    };
    let report = swarm_simulations::run(&params).expect("simulator run");
    let simulated = report.last_s;
    eprintln!("{name}, 3 nodes, 4 MiB: emulated {emulated:.3} s, simulated {simulated:.3} s, T_min {t_min:.3} s");
    assert!(simulated >= t_min * 0.99, "the simulator beat the theoretical minimum: {simulated} < {t_min}");
    let ratio = emulated / simulated;
    assert!(
        (0.5..=2.0).contains(&ratio),
        "{name}: simulator and emulation disagree: emulated {emulated:.3} s vs simulated {simulated:.3} s (ratio {ratio:.2})"
    );
}

/// The resilience issue's first target, small: the tracker killed (for good) in the
/// middle of a cold edge pull of 16 MiB by 3 agents over a 100 Mbit/s uplink. Every
/// node completes with the right bytes and the uplink carries the blob about once.
#[test]
fn emulated_tracker_killed_mid_pull_stops_nothing() {
    let doc =
        emulate_run_with("edge-trackerkill", "swarm", &["--nodes", "3", "--size", "16MiB", "--churn-at", "0.6"], 240);
    let r = &doc["results"].as_array().expect("results")[0];
    assert_eq!(r["status"], "ok", "{}", r["reason"]);
    assert!(r["tracker_killed_at_s"].as_f64().is_some(), "the tracker was not killed: {r}");
    let nodes = r["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        assert_eq!(n["status"], "done", "node {}: {n}", n["node"]);
        assert_eq!(n["sha256_ok"], true, "node {}: wrong bytes", n["node"]);
    }
    let uplink = r["uplink_over_f"].as_f64().expect("uplink_over_f");
    let last = r["last_over_t_min"].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "tracker killed at {} s; last node at {last:.2} x T_min; uplink {uplink:.3} x F",
        r["tracker_killed_at_s"]
    );
    assert!(uplink <= 1.05, "the uplink carried {uplink:.3} x F");
}
