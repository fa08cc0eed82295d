//! `swarm stage`, end to end with real processes: a `swarm tracker`, `swarm agent`s, a
//! real `docker-registry` upstream behind a byte-counting proxy (the uplink), the
//! `swarm stage` command, and a real containerd pulling through an agent.
//!
//! - staging the 3-layer test image on 3 agents puts every blob on every agent with
//!   the upstream crossed about once (≤ 1.05 × the image), the first agent's upstream
//!   request comes within 3 s of the command, and containerd then pulls the image by
//!   digest through an agent with the uplink down;
//! - an image index of two platforms: only the nodes' platform is staged (with two
//!   trackers, both given the order);
//! - pins survive an agent restart and a full cache budget, `--release` unpins, a
//!   node that cannot fit the image fails its part with the bytes it lacks, and
//!   `--json` carries the documented fields;
//! - a tracker that restarts mid-stage (forgetting the order) is given the order again
//!   by the running command, and the stage completes.
//!
//! Needs: containerd, docker-registry, umoci, skopeo, and root (containerd).

mod support;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::agents::{Cluster, swarm_bin};
use support::process::run_unchecked;
use support::{Containerd, FlakyProxy, ImageInfo, Registry, build_image, test_dir, write_hosts_toml};
use swarm_proto::Digest;

const MIB: usize = 1024 * 1024;
/// Bound on one `swarm stage` run.
const STAGE_LIMIT: Duration = Duration::from_secs(180);

/// `swarm stage ARGS --tracker T --token-file F --json` for `cluster`.
fn stage_command(cluster: &Cluster, args: &[&str]) -> Command {
    let trackers: Vec<String> = cluster.tracker_addrs().iter().map(ToString::to_string).collect();
    let mut cmd = Command::new(swarm_bin());
    cmd.arg("stage")
        .args(args)
        .args(["--tracker", &trackers.join(","), "--json", "--timeout", "150s"])
        .arg("--token-file")
        .arg(&cluster.token_file);
    cmd
}

/// Runs `swarm stage` on a blocking thread; its output and the JSON it printed.
async fn stage(cluster: &Cluster, args: &[&str]) -> (Output, serde_json::Value) {
    let mut cmd = stage_command(cluster, args);
    let out = tokio::task::spawn_blocking(move || run_unchecked(&mut cmd, STAGE_LIMIT))
        .await
        .expect("join")
        .expect("swarm stage runs");
    json_of(out, cluster)
}

fn json_of(out: Output, cluster: &Cluster) -> (Output, serde_json::Value) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "swarm stage printed no JSON ({e}):\n{text}\n--- stderr ---\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            cluster.logs()
        )
    });
    (out, json)
}

/// The node entries of a `--json` report.
fn nodes(report: &serde_json::Value) -> &Vec<serde_json::Value> {
    report["nodes"].as_array().expect("nodes array")
}

/// The image's reference as seen through `proxy` (the uplink).
fn through(proxy: &FlakyProxy, image: &ImageInfo) -> String {
    format!("{}/{}:{}", proxy.addr(), image.name, image.tag)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_crosses_the_uplink_once_and_containerd_then_pulls_by_digest_with_the_uplink_down() {
    support::init_tracing();
    let dir = test_dir("stage-once");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/os", "v1", &[6 * MIB, 3 * MIB, MIB]).expect("image");
    let uplink = FlakyProxy::start(registry.addr(), 0).await.expect("proxy");
    let host = uplink.addr().to_string();
    let containerd = Containerd::start(&dir.path().join("ctd")).expect("containerd");
    let cluster = Cluster::start_with(&dir.path().join("swarm"), 3, &[&host], |_, _| {
        ["--containerd-root", "none"].map(Into::into).to_vec()
    })
    .expect("cluster");
    // The agents long-poll their tracker once they run; give them a moment to connect.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let reference = through(&uplink, &image);
    let mut cmd = stage_command(&cluster, &[&reference]);
    let started = Instant::now();
    let run = tokio::task::spawn_blocking(move || run_unchecked(&mut cmd, STAGE_LIMIT));
    // Propagation: the order reaches the agents by their open long poll, so the first
    // upstream request follows within a round trip. 3 s, not 1 s, leaves room for
    // starting the `swarm stage` process and its QUIC handshake on a loaded CI machine.
    uplink.wait_for_bytes(1, Duration::from_secs(3)).await.unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let first_upstream = started.elapsed();
    let (out, report) = json_of(run.await.expect("join").expect("swarm stage runs"), &cluster);
    let took = started.elapsed();
    assert!(out.status.success(), "swarm stage failed: {report:#}\n{}", String::from_utf8_lossy(&out.stderr));
    println!("first upstream byte {first_upstream:?} after the command; staged on 3 agents in {took:?}");

    // The JSON fields.
    assert_eq!(report["ok"], true);
    assert_eq!(report["release"], false);
    assert_eq!(report["image"], reference.as_str());
    assert!(report["issued_ms"].as_u64().is_some() && report["pin_until_secs"].as_u64().is_some(), "{report:#}");
    let pin_until = report["pin_until_secs"].as_u64().expect("pin_until_secs");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    assert!((now + 23 * 3600..now + 25 * 3600).contains(&pin_until), "default pin of 24h: {pin_until} vs now {now}");
    assert_eq!(nodes(&report).len(), 3, "{report:#}");
    for n in nodes(&report) {
        assert_eq!(n["state"], "done", "{n:#}");
        assert_eq!(n["manifest"], image.manifest_digest.to_string().as_str());
        assert_eq!(n["blobs"], 4);
        assert_eq!(n["blobs_held"], 4);
        assert_eq!(n["bytes"].as_u64(), Some(image.total_bytes));
        assert_eq!(n["bytes_held"].as_u64(), Some(image.total_bytes));
        for field in ["peer_id", "name", "zone", "addr", "last_seen_ms", "reason"] {
            assert!(n.get(field).is_some(), "{field} missing from {n:#}");
        }
    }
    for (i, a) in cluster.agents.iter().enumerate() {
        for d in image.blob_digests() {
            assert!(a.stores_blob(&d), "agent {i} lacks {d}\n{}", cluster.logs());
            assert!(a.data_dir.join("pins").join(d.hex()).is_file(), "agent {i}: {d} not pinned");
        }
    }
    let upstream = uplink.upstream_bytes();
    let ratio = upstream as f64 / image.total_bytes as f64;
    println!("uplink: {upstream} B for an image of {} B: {ratio:.3} x", image.total_bytes);
    assert!(ratio <= 1.05, "the uplink carried {ratio:.3} x the image\n{}", cluster.logs());
    for d in image.blob_digests() {
        assert_eq!(registry.blob_get_count(&d), 1, "{d} fetched from upstream more than once\n{}", cluster.logs());
    }

    // The uplink goes down; containerd pulls by digest through agent 1, from the
    // staged manifests and blobs only.
    uplink.set_down(true);
    let before = uplink.upstream_bytes();
    let hosts = dir.path().join("hosts");
    write_hosts_toml(&hosts, &host, &cluster.agents[1].mirror_url()).expect("hosts.toml");
    let by_digest = format!("{host}/{}@{}", image.name, image.manifest_digest);
    let pulled = containerd.pull(&by_digest, &hosts).await.unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
    println!("containerd pulled the staged image by digest in {pulled:?} with the uplink down");
    assert_eq!(uplink.upstream_bytes(), before, "the pull went upstream");
    let check = containerd.image_check(&by_digest).expect("ctr image check");
    assert!(check.complete, "{}", check.line);
}

/// Pushes an OCI index of `amd`'s and `other`'s manifests to `registry` as
/// `NAME:TAG`, `amd` under this machine's platform and `other` under another one.
async fn push_index(registry: &Registry, name: &str, tag: &str, ours: &ImageInfo, other: &ImageInfo) -> Digest {
    let here = swarm_peer::stage::Platform::current();
    let elsewhere = if here.architecture == "arm64" { "amd64" } else { "arm64" };
    let entry = |i: &ImageInfo, arch: &str| {
        let size = i.read_blob(&i.manifest_digest).expect("manifest bytes").len();
        serde_json::json!({
            "mediaType": i.manifest_media_type,
            "digest": i.manifest_digest.to_string(),
            "size": size,
            "platform": {"os": "linux", "architecture": arch},
        })
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry(other, elsewhere), entry(ours, &here.architecture)],
    });
    let body = serde_json::to_vec(&index).expect("index json");
    let digest = Digest::of(&body);
    let url = format!("http://{}/v2/{name}/manifests/{tag}", registry.host());
    let resp = reqwest::Client::new()
        .put(&url)
        .header("Content-Type", "application/vnd.oci.image.index.v1+json")
        .body(body)
        .send()
        .await
        .expect("PUT index");
    assert!(resp.status().is_success(), "PUT {url}: {}", resp.status());
    digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_of_two_platforms_stages_only_the_nodes_platform() {
    support::init_tracing();
    let dir = test_dir("stage-index");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let ours = build_image(&registry, "edge/multi", "ours", &[2 * MIB, MIB]).expect("image");
    let other = build_image(&registry, "edge/multi", "other", &[3 * MIB, MIB]).expect("image");
    let index = push_index(&registry, "edge/multi", "v1", &ours, &other).await;
    let host = registry.host();
    // Two trackers: the command gives both the order, the agents long-poll both.
    let cluster = Cluster::start_replicated(&dir.path().join("swarm"), 2, 2, &[&host]).expect("cluster");
    let (out, report) = stage(&cluster, &[&format!("{host}/edge/multi:v1")]).await;
    let trackers = report["trackers"].as_array().expect("trackers");
    assert_eq!(trackers.len(), 2, "{report:#}");
    assert!(trackers.iter().all(|t| t["error"].is_null()), "{report:#}");
    assert!(out.status.success(), "swarm stage failed: {report:#}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(nodes(&report).len(), 2);
    for n in nodes(&report) {
        assert_eq!(n["manifest"], ours.manifest_digest.to_string().as_str(), "{n:#}");
        assert_eq!(n["bytes"].as_u64(), Some(ours.total_bytes));
    }
    for (i, a) in cluster.agents.iter().enumerate() {
        for d in ours.blob_digests() {
            assert!(a.stores_blob(&d), "agent {i} lacks {d} of its platform\n{}", cluster.logs());
        }
        for d in other.blob_digests() {
            assert!(!a.data_dir.join("blobs").join(d.hex()).exists(), "agent {i} staged {d} of another platform");
        }
        // Both manifests on the way are kept for containerd.
        for m in [index, ours.manifest_digest] {
            assert!(a.data_dir.join("manifests").join(m.hex()).is_file(), "agent {i}: manifest {m} not kept");
        }
    }
    for d in other.blob_digests() {
        assert_eq!(registry.blob_get_count(&d), 0, "{d} of the other platform was fetched");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_outlive_a_restart_and_the_budget_until_released_and_a_node_that_cannot_fit_fails() {
    support::init_tracing();
    let dir = test_dir("stage-pins");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/os", "v2", &[3 * MIB, 2 * MIB, MIB]).expect("image");
    let filler = build_image(&registry, "edge/filler", "v1", &[3 * MIB, 3 * MIB]).expect("filler");
    let host = registry.host();
    // Agent 0 fits the image (about 6 MiB) beside one 3 MiB filler blob; agent 1 fits
    // nothing of that size.
    let budgets = ["10MiB", "4MiB"];
    let cluster_args = |i: usize| -> Vec<std::ffi::OsString> {
        ["--cache-size", budgets[i], "--containerd-root", "none"].map(Into::into).to_vec()
    };
    let mut cluster =
        Cluster::start_with(&dir.path().join("swarm"), 2, &[&host], |i, _| cluster_args(i)).expect("cluster");
    let reference = format!("{host}/edge/os:v2");
    let (out, report) = stage(&cluster, &[&reference, "--pin", "2h"]).await;
    assert!(!out.status.success(), "a node that cannot fit must fail the stage: {report:#}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(report["ok"], false);
    let by_state = |state: &str| nodes(&report).iter().filter(|n| n["state"] == state).count();
    assert_eq!((by_state("done"), by_state("failed")), (1, 1), "{report:#}");
    let failed = nodes(&report).iter().find(|n| n["state"] == "failed").expect("failed node");
    let reason = failed["reason"].as_str().expect("reason");
    assert!(reason.contains("bytes lacking"), "{reason}");
    let budget = 4 * MIB as u64;
    let lacking = image.total_bytes - budget;
    assert!(reason.contains(&format!("{lacking} bytes lacking")), "lacks {lacking}: {reason}");
    assert!(stderr.contains("bytes lacking"), "the error names the bytes lacking:\n{stderr}");
    // The failed node fetched and pinned nothing.
    for d in image.blob_digests() {
        assert!(!cluster.agents[1].data_dir.join("pins").join(d.hex()).exists(), "{d} pinned on the failed node");
    }
    let pinned = |cluster: &Cluster| {
        image.blob_digests().iter().all(|d| {
            cluster.agents[0].stores_blob(d) && cluster.agents[0].data_dir.join("pins").join(d.hex()).is_file()
        })
    };
    assert!(pinned(&cluster), "agent 0 holds and pins the image\n{}", cluster.logs());

    // A restart keeps the pins; then the budget fills up with other blobs: the least
    // recently used unpinned one goes, the pinned ones stay.
    cluster.restart_agent_with(0, &[&host], &cluster_args(0)).expect("restart");
    for d in filler.layer_digests.iter() {
        let target = format!("/v2/{}/blobs/{d}?ns={host}", filler.name);
        let r = support::http::request(cluster.agents[0].mirror, "GET", &target, &[]).await.expect("GET");
        assert_eq!(r.status, 200, "{d}\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(pinned(&cluster), "a pinned blob was evicted\n{}", cluster.logs());
    assert!(
        !cluster.agents[0].stores_blob(&filler.layer_digests[0]),
        "the budget was not enforced on unpinned blobs\n{}",
        cluster.logs()
    );

    // Release: every node reports it, and the pins are gone.
    let (out, report) = stage(&cluster, &["--release", &reference]).await;
    assert!(out.status.success(), "release failed: {report:#}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(report["release"], true);
    assert!(nodes(&report).iter().all(|n| n["state"] == "released"), "{report:#}");
    for d in image.blob_digests() {
        assert!(!cluster.agents[0].data_dir.join("pins").join(d.hex()).exists(), "{d} still pinned");
    }
    assert!(!cluster.agents[0].data_dir.join("staged").read_dir().is_ok_and(|mut d| d.next().is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracker_that_restarts_mid_stage_is_given_the_order_again() {
    support::init_tracing();
    let dir = test_dir("stage-restart");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/os", "v3", &[8 * MIB, 2 * MIB, MIB]).expect("image");
    // A slow uplink (4 MB/s) keeps the stage running while the tracker restarts.
    let uplink = FlakyProxy::start(registry.addr(), 4_000_000).await.expect("proxy");
    let host = uplink.addr().to_string();
    let mut cluster = Cluster::start(&dir.path().join("swarm"), 2, &[&host]).expect("cluster");
    let mut cmd = stage_command(&cluster, &[&through(&uplink, &image)]);
    let run = tokio::task::spawn_blocking(move || run_unchecked(&mut cmd, STAGE_LIMIT));
    uplink
        .wait_for_bytes(2 * MIB as u64, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));

    // The tracker dies and a new one starts on the same address, knowing no order.
    cluster.tracker.kill();
    let restart = support::agents::tracker_command(cluster.tracker_addr, cluster.tracker_http, &cluster.token_file);
    cluster.tracker =
        support::ChildGuard::spawn("tracker-restarted", restart, &dir.path().join("swarm/logs")).expect("tracker");

    let (out, report) = json_of(run.await.expect("join").expect("swarm stage runs"), &cluster);
    assert!(
        out.status.success(),
        "swarm stage failed across a tracker restart: {report:#}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    assert_eq!(nodes(&report).len(), 2, "{report:#}");
    assert!(nodes(&report).iter().all(|n| n["state"] == "done"), "{report:#}");
    for (i, a) in cluster.agents.iter().enumerate() {
        for d in image.blob_digests() {
            assert!(a.stores_blob(&d), "agent {i} lacks {d}\n{}", cluster.logs());
        }
    }
    let log = cluster.tracker.stderr_text();
    assert!(log.contains("stage order"), "the restarted tracker never got the order again:\n{log}");
    println!(
        "uplink: {:.3} x the image across a tracker restart",
        uplink.upstream_bytes() as f64 / image.total_bytes as f64
    );
}
