//! The agent's disk, end to end with real processes: a `swarm tracker`, `swarm agent`s,
//! a real `docker-registry` upstream and, where containerd is involved, a real
//! containerd pulling through the agent.
//!
//! - one copy with containerd: after a pull, (containerd's content store + the agent's
//!   data dir) / the image's blob bytes stays at most 1.1 (printed as `disk ratio:`),
//!   another node still gets the image from this one through the swarm, and a blob
//!   containerd deletes is forgotten (the tracker is told);
//! - a small `--cache-size`: the least recently used blob is evicted (and the tracker
//!   stops listing this node for it), a pinned one never is, and a blob larger than the
//!   budget gets a 503 before any upstream GET;
//! - a data directory on tmpfs: `/readyz` says so.
//!
//! Needs: containerd, docker-registry, umoci, skopeo, and root (containerd, mount).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::agents::{Cluster, du, status_json, tracker_blobs_of};
use support::process::run;
use support::{Containerd, Registry, build_image, test_dir, write_hosts_toml};
use swarm_proto::Digest;

const MIB: usize = 1024 * 1024;

/// Polls `check` every 200 ms for up to `limit`; panics with `what` and `context()`.
async fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool, context: impl Fn() -> String) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}\n{}", context());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The agent's peer id, from `swarm status --agent`.
fn peer_id(cluster: &Cluster, i: usize) -> String {
    let s = status_json(&["--agent", &cluster.agents[i].mirror_url()]).expect("swarm status --agent");
    s["peer_id"].as_str().expect("peer_id").to_string()
}

/// `GET` of a blob through agent `i`'s mirror: the status and body.
async fn get_blob(cluster: &Cluster, i: usize, name: &str, ns: &str, digest: &Digest) -> (u16, Vec<u8>) {
    let target = format!("/v2/{name}/blobs/{digest}?ns={ns}");
    let r = support::http::request(cluster.agents[i].mirror, "GET", &target, &[]).await.expect("mirror GET");
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pull_through_the_agent_keeps_one_copy_and_the_swarm_still_serves_it() {
    support::init_tracing();
    let dir = test_dir("disk-ctd");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/os", "v1", &[8 * MIB, 3 * MIB, MIB]).expect("image");
    let host = registry.host();
    let containerd = Containerd::start(&dir.path().join("ctd")).expect("containerd");
    let ctd_root = containerd.dir().join("root");
    let root_arg = ctd_root.clone().into_os_string();
    let cluster = Cluster::start_with(&dir.path().join("swarm"), 2, &[&host], |i, _| {
        let root = if i == 0 { root_arg.clone() } else { "none".into() };
        vec!["--containerd-root".into(), root]
    })
    .expect("cluster");
    let hosts = dir.path().join("hosts");
    write_hosts_toml(&hosts, &host, &cluster.agents[0].mirror_url()).expect("hosts.toml");
    containerd.pull(&image.reference, &hosts).await.expect("pull through the agent");
    for d in image.blob_digests() {
        assert_eq!(registry.blob_get_count(&d), 1, "{d} came from upstream once\n{}", cluster.logs());
    }

    // Measured 2 s after the pull.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let manifest_len = image.read_blob(&image.manifest_digest).expect("manifest").len() as u64;
    let blob_bytes = image.total_bytes + manifest_len;
    let content = du(&ctd_root.join("io.containerd.content.v1.content"));
    let agent = du(&cluster.agents[0].data_dir);
    let ratio = (content + agent) as f64 / blob_bytes as f64;
    println!(
        "disk ratio: {ratio:.3} (containerd content store {content} B + agent data dir {agent} B) / image blobs \
         {blob_bytes} B"
    );
    assert!(ratio <= 1.1, "disk ratio {ratio:.3} > 1.1\n{}", cluster.logs());
    for d in image.blob_digests() {
        assert!(!cluster.agents[0].stores_blob(&d), "{d}: the agent kept its own copy");
    }

    // Another node gets every blob from this one through the swarm (containerd's file).
    for d in image.blob_digests() {
        let (status, body) = get_blob(&cluster, 1, &image.name, &host, &d).await;
        assert_eq!(status, 200, "{d} through agent 1\n{}", cluster.logs());
        assert_eq!(Digest::of(&body), d, "{d}: wrong bytes through agent 1");
        assert_eq!(registry.blob_get_count(&d), 1, "{d}: agent 1 went upstream\n{}", cluster.logs());
    }

    // containerd deletes a layer: the agent forgets it and tells the tracker.
    let layer = image.layer_digests[0];
    let me = peer_id(&cluster, 0);
    assert!(tracker_blobs_of(&cluster, &me).expect("cluster view").contains(&layer.to_string()));
    containerd.ctr(&["image", "rm", &image.reference], Duration::from_secs(20)).expect("ctr image rm");
    containerd.ctr(&["content", "rm", &layer.to_string()], Duration::from_secs(20)).expect("ctr content rm");
    let blob_dir = cluster.agents[0].data_dir.join("blobs").join(layer.hex());
    eventually("the agent forgets the deleted blob", Duration::from_secs(10), || !blob_dir.exists(), || cluster.logs())
        .await;
    eventually(
        "the tracker stops listing the agent for the deleted blob",
        Duration::from_secs(10),
        || !tracker_blobs_of(&cluster, &me).expect("cluster view").contains(&layer.to_string()),
        || cluster.logs(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_cache_evicts_the_least_recently_used_and_refuses_a_blob_that_cannot_fit() {
    support::init_tracing();
    let dir = test_dir("disk-lru");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image =
        build_image(&registry, "edge/app", "v1", &[3 * MIB, 3 * MIB, 4 * MIB, 3 * MIB, 9 * MIB]).expect("image");
    let host = registry.host();
    let cluster = Cluster::start_with(&dir.path().join("swarm"), 1, &[&host], |_, _| {
        ["--cache-size", "8MiB", "--containerd-root", "none"].map(Into::into).to_vec()
    })
    .expect("cluster");
    let [a, b, c, d, big] = [0, 1, 2, 3, 4].map(|i| image.layer_digests[i]);
    let me = peer_id(&cluster, 0);
    for d in [a, b] {
        let (status, body) = get_blob(&cluster, 0, &image.name, &host, &d).await;
        assert_eq!((status, Digest::of(&body)), (200, d), "{d}\n{}", cluster.logs());
        // Distinct last-use times (file modification times).
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    eventually(
        "the tracker lists the agent for the first blob",
        Duration::from_secs(10),
        || tracker_blobs_of(&cluster, &me).expect("cluster view").contains(&a.to_string()),
        || cluster.logs(),
    )
    .await;

    // 3 + 3 + 4 MiB > 8 MiB: the least recently used (a) goes to make room for c.
    let (status, body) = get_blob(&cluster, 0, &image.name, &host, &c).await;
    assert_eq!((status, Digest::of(&body)), (200, c), "{}", cluster.logs());
    let blobs = cluster.agents[0].data_dir.join("blobs");
    assert!(!blobs.join(a.hex()).exists(), "the least recently used blob is evicted\n{}", cluster.logs());
    assert!(cluster.agents[0].stores_blob(&b) && cluster.agents[0].stores_blob(&c));
    eventually(
        "the tracker stops listing the agent for the evicted blob",
        Duration::from_secs(10),
        || !tracker_blobs_of(&cluster, &me).expect("cluster view").contains(&a.to_string()),
        || cluster.logs(),
    )
    .await;

    // b pinned (as staging does): d makes room by evicting c, the only unpinned one.
    let pins = cluster.agents[0].data_dir.join("pins");
    std::fs::create_dir_all(&pins).expect("pins dir");
    std::fs::write(pins.join(b.hex()), "99999999999").expect("pin b");
    let (status, body) = get_blob(&cluster, 0, &image.name, &host, &d).await;
    assert_eq!((status, Digest::of(&body)), (200, d), "{}", cluster.logs());
    assert!(cluster.agents[0].stores_blob(&b), "a pinned blob is never evicted\n{}", cluster.logs());
    assert!(!blobs.join(c.hex()).exists(), "the unpinned blob made room\n{}", cluster.logs());

    let status = status_json(&["--agent", &cluster.agents[0].mirror_url()]).expect("status");
    assert_eq!(status["cache"]["budget"].as_u64(), Some(8 << 20), "{status:#}");

    // 9 MiB can never fit 8 MiB: 503 before anything is fetched.
    let (code, body) = get_blob(&cluster, 0, &image.name, &host, &big).await;
    assert_eq!(code, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("cache budget"), "{}", String::from_utf8_lossy(&body));
    assert_eq!(registry.blob_get_count(&big), 0, "nothing fetched from upstream for a blob that cannot fit");
    assert!(!blobs.join(big.hex()).exists());
}

/// Unmounts a tmpfs when dropped.
struct Tmpfs<'a>(&'a Path);

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_on_tmpfs_is_reported_by_readyz() {
    support::init_tracing();
    let dir = test_dir("disk-tmpfs");
    let swarm = dir.path().join("swarm");
    let data = swarm.join("agent-0");
    std::fs::create_dir_all(&data).expect("mkdir");
    let mut mount = Command::new("mount");
    mount.args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"]).arg(&data);
    run(mount, Duration::from_secs(10)).expect("mount a tmpfs (the test must run as root)");
    let _unmount = Tmpfs(&data);
    let cluster = Cluster::start(&swarm, 1, &[]).expect("cluster");
    // The warning is there from the start; readiness itself follows the tracker.
    let started = Instant::now();
    let body = loop {
        let r = support::http::request(cluster.agents[0].mirror, "GET", "/readyz", &[]).await.expect("/readyz");
        let body = String::from_utf8_lossy(&r.body).into_owned();
        if r.status == 200 || started.elapsed() > Duration::from_secs(10) {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(body.contains("warning: data directory") && body.contains("tmpfs"), "{body}\n{}", cluster.logs());
    let log = cluster.agents[0].child.stderr_text();
    assert!(log.contains("is on tmpfs"), "the agent warns at start:\n{log}");
    assert!(body.starts_with("ready"), "a warning does not fail readiness: {body}");
    drop(cluster);
}
