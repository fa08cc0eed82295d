//! The network-emulation benchmark's self-check, as a test: real `swarm` processes in
//! Linux network namespaces with `tbf`-shaped links (N=3, 4 MiB), next to direct pulls
//! and libtorrent; then the simulator on the same configuration, compared loosely
//! with the emulated swarm so the simulator cannot drift from the real program
//! unnoticed. Needs root, iproute2, curl, docker-registry and python3-libtorrent
//! (`scripts/test` installs them).

mod support;

use std::process::Command;
use std::time::Duration;

use support::agents::swarm_bin;
use support::process::run_unchecked;

#[test]
fn emulated_edge_cluster_selftest() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/simulations/emulate/emulate.py");
    let dir = support::test_dir("emulation");
    let json = dir.path().join("selftest.json");
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(script).arg("selftest").arg("--swarm-bin").arg(swarm_bin()).arg("--json").arg(&json);
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
    let emulated = swarm["last_s"].as_f64().expect("last_s");
    let t_min = swarm["t_min_s"].as_f64().expect("t_min_s");
    let rate = 200e6 / 8.0;
    let params = swarm_simulations::Params {
        scenario: swarm_simulations::Scenario::InCluster,
        nodes: 3,
        blob: 4 << 20,
        node_up: swarm_simulations::Rates::Uniform { mean: rate, spread: 0.0 },
        node_down: swarm_simulations::Rates::Uniform { mean: rate, spread: 0.0 },
        ..swarm_simulations::Params::default()
    };
    let report = swarm_simulations::run(&params).expect("simulator run");
    let simulated = report.last_s;
    eprintln!("in-cluster, 3 nodes, 4 MiB: emulated {emulated:.3} s, simulated {simulated:.3} s, T_min {t_min:.3} s");
    assert!(simulated >= t_min * 0.99, "the simulator beat the theoretical minimum: {simulated} < {t_min}");
    let ratio = emulated / simulated;
    assert!(
        (0.5..=2.0).contains(&ratio),
        "simulator and emulation disagree: emulated {emulated:.3} s vs simulated {simulated:.3} s (ratio {ratio:.2})"
    );
}
