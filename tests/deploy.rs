//! The deployment files: every Kubernetes manifest (and every kustomization's output)
//! validated offline against the Kubernetes schemas and the vendored ServiceMonitor
//! CRD schema (`tests/deploy/validate_manifests.py`), the systemd units checked with
//! `systemd-analyze verify`, and the facts the Kairos setup depends on.
//!
//! Needs: python3 with kubernetes-validate (pip; `scripts/test` installs it), kubectl
//! (for `kubectl kustomize`), systemd-analyze (Debian package systemd).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::agents::swarm_bin;
use support::process::{require_tool, run_unchecked};
use support::test_dir;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

#[test]
fn every_kubernetes_manifest_validates_offline_and_the_image_is_named_once() {
    let python = require_tool("python3", "python3");
    require_tool("kubectl", "kubectl");
    let mut cmd = Command::new(python);
    cmd.arg(repo().join("tests/deploy/validate_manifests.py")).arg(repo());
    let out = run_unchecked(&mut cmd, Duration::from_secs(300)).expect("validator");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "manifest validation failed:\n{stdout}\n{stderr}");
    // The validator refuses broken manifests (its self-check) and checked the real ones.
    assert!(stdout.contains("0 problems"), "{stdout}\n{stderr}");
    let checked: usize = stdout.split_whitespace().next().and_then(|n| n.parse().ok()).expect("count");
    assert!(checked >= 10, "only {checked} manifests checked:\n{stdout}");
}

/// Copies of the units with `ExecStart` pointing at the binary under test (verify
/// insists that the executable exists).
fn units_under_test(dir: &Path) -> Vec<PathBuf> {
    ["swarm-agent.service", "swarm-tracker.service"]
        .iter()
        .map(|name| {
            let text = read(&format!("deploy/systemd/{name}"))
                .replace("/usr/local/bin/swarm", swarm_bin().to_str().expect("utf-8 path"));
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write unit");
            path
        })
        .collect()
}

fn verify(units: &[PathBuf]) -> std::process::Output {
    let tool = require_tool("systemd-analyze", "systemd");
    let mut cmd = Command::new(tool);
    cmd.arg("verify").args(units);
    run_unchecked(&mut cmd, Duration::from_secs(60)).expect("systemd-analyze")
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let dir = test_dir("units");
    let units = units_under_test(dir.path());
    let out = verify(&units);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {}\n{stderr}", out.status);

    // And it does catch a broken unit.
    let broken = dir.path().join("broken.service");
    std::fs::write(&broken, "[Service]\nExecStart=/nonexistent/swarm agent\n").expect("write");
    let out = verify(&[broken]);
    assert!(!out.status.success(), "verify accepted a unit whose binary does not exist");
}

/// The directives of a unit's `[Service]` section, continuation lines joined.
fn service_directives(unit: &str) -> Vec<(String, String)> {
    let joined = unit.replace("\\\n", " ");
    let mut in_service = false;
    let mut out = Vec::new();
    for line in joined.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service
            && !line.starts_with('#')
            && let Some((k, v)) = line.split_once('=')
        {
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

#[test]
fn the_agent_unit_runs_as_root_with_its_state_directory_and_takes_settings_from_the_file() {
    let unit = read("deploy/systemd/swarm-agent.service");
    let d = service_directives(&unit);
    let get = |k: &str| d.iter().filter(|(key, _)| key == k).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
    // DynamicUser= with StateDirectory= fails (238/STATE_DIRECTORY) when /var/lib/swarm
    // is a bind mount, as on Kairos; and a dynamic user could not read containerd's store.
    assert!(get("DynamicUser").is_empty() && get("User").is_empty(), "the agent runs as root: {d:?}");
    assert_eq!(get("StateDirectory"), ["swarm"]);
    assert_eq!(get("CapabilityBoundingSet"), [""], "root without capabilities");
    assert_eq!(get("ProtectSystem"), ["strict"]);
    let exec = get("ExecStart").join(" ");
    assert!(exec.contains("--config") && !exec.contains("--data-dir"), "data_dir comes from agent.toml: {exec}");

    // The Kairos cloud-config bind-mounts the directory the unit uses.
    for file in ["deploy/kairos/master.yaml", "deploy/kairos/worker.yaml"] {
        let text = read(file);
        assert!(text.contains("- /var/lib/swarm"), "{file} bind-mounts /var/lib/swarm");
    }
    let example = read("deploy/systemd/agent.toml");
    assert!(example.contains("data_dir = \"/var/lib/swarm\""), "the example keeps the state directory");
}

#[test]
fn docker_build_context_leaves_out_target() {
    let ignore = read(".dockerignore");
    for entry in ["target/", ".git/"] {
        assert!(ignore.lines().any(|l| l.trim() == entry), ".dockerignore lacks {entry}");
    }
    assert!(read("deploy/container/Dockerfile").contains("--platform linux/arm64"), "arm64 build documented");
}
