//! The network-emulation benchmark's self-check, as a test: real `swarm` processes in
//! Linux network namespaces with `tbf`-shaped links (N=3, 4 MiB), next to direct pulls
//! and libtorrent. Needs root, iproute2, curl, docker-registry and python3-libtorrent
//! (`scripts/test` installs them).

mod support;

use std::process::Command;
use std::time::Duration;

use support::agents::swarm_bin;
use support::process::run_unchecked;

#[test]
fn emulated_edge_cluster_selftest() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/simulations/emulate/emulate.py");
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(script).arg("selftest").arg("--swarm-bin").arg(swarm_bin());
    let out = run_unchecked(&mut cmd, Duration::from_secs(300)).expect("running emulate.py selftest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    match out.status.code() {
        Some(0) => assert!(stdout.contains("passed, 0 failed"), "selftest printed no result line"),
        Some(77) => panic!("the emulation cannot run here (needs root, iproute2, curl, docker-registry): {stderr}"),
        other => panic!("emulation selftest failed ({other:?})"),
    }
}
