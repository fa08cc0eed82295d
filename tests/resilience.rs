//! The swarm outliving its tracker, end to end: real agent and tracker processes, a
//! real `docker-registry` upstream behind a rate-capped relay (a slow uplink), blobs
//! pulled through the agents' mirrors.
//!
//! Needs: docker-registry, umoci, skopeo.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::agents::{Cluster, tracker_command};
use support::process::tcp_open;
use support::throttle::throttled_proxy;
use support::{ChildGuard, Registry, build_image, test_dir};

const MIB: usize = 1024 * 1024;

/// The tracker dies 1 s into a cold pull of one layer by three agents and never
/// comes back: the lease holder's feed goes on, the piece hashes reach the other two
/// through the swarm, and all three serve the right bytes with the uplink crossed
/// about once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tracker_killed_one_second_into_a_cold_pull_stops_nothing() {
    let dir = test_dir("tracker-killed");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/os", "v1", &[16 * MIB]).expect("image");
    let layer = image.layer_digests[0];
    let want = image.read_blob(&layer).expect("layer bytes");
    let sent = Arc::new(AtomicU64::new(0));
    // 4 MB/s: the layer takes about 4 s to cross the uplink.
    let proxy = throttled_proxy(registry.addr(), 4_000_000, sent.clone()).await;
    let ns = proxy.to_string();
    let mut cluster = Cluster::start(&dir.path().join("swarm"), 3, &[&ns]).expect("cluster");
    // A running cluster: past the tracker's first seconds, when it grants no lease.
    tokio::time::sleep(swarm_tracker::state::LEASE_GRACE).await;
    let target = format!("/v2/{}/blobs/{layer}?ns={ns}", image.name);
    let started = Instant::now();
    let gets = cluster.get_everywhere(&target);
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.tracker.kill();
    eprintln!("killed the tracker after {:?}", started.elapsed());
    for (i, g) in gets.into_iter().enumerate() {
        let r = g.await.expect("join").unwrap_or_else(|e| panic!("agent {i}: {e:#}\n{}", cluster.logs()));
        assert_eq!(r.status, 200, "agent {i}: {}\n{}", String::from_utf8_lossy(&r.body), cluster.logs());
        assert!(r.complete, "agent {i}: truncated\n{}", cluster.logs());
        assert!(r.body == want, "agent {i} served wrong bytes");
    }
    let uplink = sent.load(Ordering::Relaxed) as f64 / want.len() as f64;
    eprintln!("all three complete after {:?}; the uplink carried {uplink:.3} x the layer", started.elapsed());
    assert!(uplink <= 1.05, "the uplink carried {uplink:.3} copies\n{}", cluster.logs());
    assert_eq!(registry.blob_get_count(&layer), 1, "one upstream fetch\n{}", cluster.logs());
}

/// An agent that swarmed with another before is restarted after the tracker died;
/// asked for a blob only that other agent holds, it gets it from there (it kept the
/// peers it knew in its data directory), not from the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_started_after_the_tracker_died_gets_a_blob_from_a_peer_it_knew() {
    let dir = test_dir("known-peers");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/os", "v1", &[4 * MIB, 3 * MIB]).expect("image");
    let (first, second) = (image.layer_digests[0], image.layer_digests[1]);
    let host = registry.host();
    let mut cluster = Cluster::start(&dir.path().join("swarm"), 2, &[&host]).expect("cluster");
    let get = |agent: usize, layer: swarm_proto::Digest, cluster: &Cluster| {
        let addr = cluster.agents[agent].mirror;
        let target = format!("/v2/{}/blobs/{layer}?ns={host}", image.name);
        async move { support::http::request(addr, "GET", &target, &[]).await }
    };
    // Agent 0 holds both layers; agent 1 swarms with it for the first.
    for layer in [first, second] {
        let r = get(0, layer, &cluster).await.expect("agent 0");
        assert_eq!(r.status, 200, "{}", cluster.logs());
    }
    let r = get(1, first, &cluster).await.expect("agent 1");
    assert_eq!(r.status, 200, "{}", cluster.logs());
    assert_eq!(registry.blob_get_count(&first), 1, "agent 1 got the first layer from agent 0\n{}", cluster.logs());
    // No tracker from now on; agent 1 starts again (a reboot) knowing agent 0.
    cluster.tracker.kill();
    cluster.restart_agent(1, &[&host]).expect("restart agent 1");
    let started = Instant::now();
    let r = get(1, second, &cluster).await.expect("agent 1 after its restart");
    assert_eq!(r.status, 200, "{}\n{}", String::from_utf8_lossy(&r.body), cluster.logs());
    assert!(r.complete && r.body == image.read_blob(&second).expect("bytes"), "agent 1 served wrong bytes");
    eprintln!("served from the known peer in {:?}", started.elapsed());
    assert_eq!(registry.blob_get_count(&second), 1, "the registry served the second layer once\n{}", cluster.logs());
}

/// The Kairos upgrade, master first (GUIDE.md section 7): the master pulls the image,
/// then reboots (its tracker and agent down) while node 1 pulls: nobody can serve
/// node 1, whose containerd falls back to the registry. The master comes back with
/// the same data directory and a tracker that knows nothing; its agent announces its
/// store, so nodes 2 and 3 swarm from it. The uplink carries the image twice (node
/// 1's fallback is the floor without staging), not three times.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_master_first_upgrade_crosses_the_uplink_at_most_twice() {
    let dir = test_dir("master-first");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "kairos/os", "v2", &[8 * MIB]).expect("image");
    let layer = image.layer_digests[0];
    let want = image.read_blob(&layer).expect("layer bytes");
    let sent = Arc::new(AtomicU64::new(0));
    let proxy = throttled_proxy(registry.addr(), 50_000_000, sent.clone()).await;
    let ns = proxy.to_string();
    let mut cluster = Cluster::start(&dir.path().join("swarm"), 4, &[&ns]).expect("cluster");
    tokio::time::sleep(swarm_tracker::state::LEASE_GRACE).await;
    let target = format!("/v2/{}/blobs/{layer}?ns={ns}", image.name);
    let get = |agent: usize, cluster: &Cluster| {
        let (addr, target) = (cluster.agents[agent].mirror, target.clone());
        async move { support::http::request(addr, "GET", &target, &[]).await.expect("mirror answers") }
    };
    // The master upgrades first.
    let r = get(0, &cluster).await;
    assert!(r.status == 200 && r.body == want, "master: {}\n{}", r.status, cluster.logs());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cluster.agents[0].stores_blob(&layer) {
        assert!(Instant::now() < deadline, "the master never completed the blob\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It reboots: tracker and agent down. Node 1 pulls meanwhile and falls back.
    cluster.tracker.kill();
    cluster.agents[0].child.kill();
    let r = get(1, &cluster).await;
    assert_eq!(r.status, 503, "node 1 has nobody to ask: {}", String::from_utf8_lossy(&r.body));
    let direct = support::http::request(proxy, "GET", &format!("/v2/{}/blobs/{layer}", image.name), &[])
        .await
        .expect("containerd's fallback to the registry");
    assert!(direct.status == 200 && direct.body == want, "fallback: {}", direct.status);
    // The master is back: same data directory, a new tracker that knows nothing.
    let cmd = tracker_command(cluster.tracker_addr, cluster.tracker_http, &cluster.token_file);
    cluster.tracker = ChildGuard::spawn("tracker-rebooted", cmd, &dir.path().join("swarm/logs")).expect("tracker");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tcp_open(cluster.tracker_http) {
        assert!(Instant::now() < deadline, "the restarted tracker never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.restart_agent(0, &[&ns]).expect("master agent back");
    // Nodes 2 and 3 upgrade next.
    let (r2, r3) = tokio::join!(get(2, &cluster), get(3, &cluster));
    for (i, r) in [(2, r2), (3, r3)] {
        assert!(r.status == 200 && r.complete && r.body == want, "node {i}: {}\n{}", r.status, cluster.logs());
    }
    let uplink = sent.load(Ordering::Relaxed) as f64 / want.len() as f64;
    eprintln!("master-first upgrade of 4 nodes: the uplink carried {uplink:.3} x the image");
    assert!(uplink <= 2.05, "the uplink carried {uplink:.3} x the image\n{}", cluster.logs());
}
