//! Trackers that restart or die, end to end: real `swarm tracker` and `swarm agent`
//! processes, a real `docker-registry` upstream (behind a throttled, byte-counting
//! relay where the uplink matters), blobs pulled through the agents' mirrors as
//! containerd would.
//!
//! - A restarted tracker has the whole view (every complete blob of every agent, and
//!   the metainfo to answer `GetMetainfo`) within one announce interval: the agents
//!   announce their stores in one message each.
//! - One of three tracker replicas, the arbiter of the blob being pulled, killed
//!   mid-transfer: every agent completes byte-identical and the uplink carries at most
//!   1.05 times the blob.
//!
//! Needs: docker-registry, umoci, skopeo.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::agents::{Cluster, tracker_command};
use support::process::tcp_open;
use support::throttle::throttled_proxy;
use support::{ChildGuard, Registry, build_image, test_dir};
use swarm_net::{ClusterToken, Endpoint, EndpointConfig};
use swarm_proto::Digest;
use swarm_tracker::TrackerClient;
use swarm_tracker::client::rendezvous_order;

const MIB: usize = 1024 * 1024;
/// The announce interval the test trackers run with (`tracker_command`).
const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(5);

/// A client of `trackers` holding the cluster's token, as `swarm status` would be.
fn observer(token_file: &Path, trackers: Vec<SocketAddr>) -> TrackerClient {
    let text = std::fs::read_to_string(token_file).expect("token");
    let token = ClusterToken::from_text(&text).expect("token");
    let ep = Endpoint::bind(SocketAddr::from(([127, 0, 0, 1], 0)), token, &EndpointConfig::default()).expect("bind");
    TrackerClient::with_trackers(ep, trackers, Duration::from_secs(5))
}

/// GETs `blob` of `name` through every agent's mirror at once; returns each body.
async fn pull_everywhere(cluster: &Cluster, name: &str, blob: Digest, ns: &str) -> Vec<Vec<u8>> {
    let target = format!("/v2/{name}/blobs/{blob}?ns={ns}");
    let gets = cluster.get_everywhere(&target);
    let mut bodies = Vec::new();
    for (i, g) in gets.into_iter().enumerate() {
        let r = g.await.expect("join").unwrap_or_else(|e| panic!("agent {i}: {e:#}\n{}", cluster.logs()));
        assert_eq!(r.status, 200, "agent {i}\n{}", cluster.logs());
        assert!(r.complete, "agent {i}: truncated body\n{}", cluster.logs());
        bodies.push(r.body);
    }
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_tracker_has_the_whole_view_within_one_announce_interval() {
    let dir = test_dir("trackers-restart");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/cache", "v1", &[3 * MIB, 2 * MIB, MIB]).expect("image");
    let host = registry.host();
    let mut cluster = Cluster::start(&dir.path().join("swarm"), 3, &[&host]).expect("cluster");
    // Every agent pulls the first two layers; the third only through agent 0.
    let layers = image.layer_digests.clone();
    for blob in &layers[..2] {
        let want = image.read_blob(blob).expect("blob");
        for body in pull_everywhere(&cluster, &image.name, *blob, &host).await {
            assert!(body == want, "wrong bytes for {blob}");
        }
    }
    let target = format!("/v2/{}/blobs/{}?ns={host}", image.name, layers[2]);
    let r = support::http::request(cluster.agents[0].mirror, "GET", &target, &[]).await.expect("get");
    assert_eq!(r.status, 200);
    let expected: Vec<(Digest, usize)> = vec![(layers[0], 3), (layers[1], 3), (layers[2], 1)];
    // The stores hold them whole (an agent serving the blob completes it in its store).
    let deadline = Instant::now() + Duration::from_secs(10);
    for (blob, holders) in &expected {
        while cluster.agents.iter().filter(|a| a.stores_blob(blob)).count() < *holders {
            assert!(Instant::now() < deadline, "agents never completed {blob} in their stores\n{}", cluster.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The tracker dies and a new one starts on the same address, knowing nothing.
    cluster.tracker.kill();
    let cmd = tracker_command(cluster.tracker_addr, cluster.tracker_http, &cluster.token_file);
    cluster.tracker = ChildGuard::spawn("tracker-restarted", cmd, &dir.path().join("swarm/logs")).expect("tracker");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tcp_open(cluster.tracker_http) {
        assert!(Instant::now() < deadline, "the restarted tracker never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restarted = Instant::now();
    let client = observer(&cluster.token_file, vec![cluster.tracker_addr]);
    let whole = loop {
        let view = client.cluster_view(Vec::new()).await.expect("cluster view");
        let holders = |d: &Digest| {
            view.blobs.iter().find(|b| b.digest == *d).map_or(0, |b| b.holders.iter().filter(|h| h.complete).count())
        };
        if expected.iter().all(|(d, n)| holders(d) == *n) && view.nodes.len() == 3 {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < ANNOUNCE_INTERVAL * 3,
            "after {:?} the restarted tracker still lacks holders: {view:?}\n{}",
            restarted.elapsed(),
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("the restarted tracker had the whole view after {whole:?}");
    assert!(
        whole <= ANNOUNCE_INTERVAL + Duration::from_millis(1500),
        "took {whole:?}: more than one announce interval"
    );
    for (blob, _) in &expected {
        let m = client.get_metainfo(*blob).await.expect("get-metainfo");
        assert!(m.is_some_and(|m| m.digest == *blob), "no metainfo for {blob}");
    }
    // And a fourth pull of a cached blob never goes upstream.
    let before = registry.blob_get_count(&layers[2]);
    let r = support::http::request(cluster.agents[1].mirror, "GET", &target, &[]).await.expect("get");
    assert_eq!(r.status, 200);
    assert!(r.body == image.read_blob(&layers[2]).expect("blob"));
    assert_eq!(registry.blob_get_count(&layers[2]), before, "served from the swarm, not the registry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_of_three_trackers_killed_mid_transfer_loses_nothing() {
    let dir = test_dir("trackers-kill");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/big", "v1", &[16 * MIB]).expect("image");
    let layer = image.layer_digests[0];
    let want = image.read_blob(&layer).expect("layer bytes");
    let sent = Arc::new(AtomicU64::new(0));
    // 4 MB/s: the 16 MiB layer takes about 4 s to come in from upstream.
    let proxy = throttled_proxy(registry.addr(), 4_000_000, sent.clone()).await;
    let ns = proxy.to_string();
    let mut cluster = Cluster::start_replicated(&dir.path().join("swarm"), 3, 3, &[&ns]).expect("cluster");
    let trackers = cluster.tracker_addrs();
    let arbiter = rendezvous_order(&trackers, &layer)[0];

    let target = format!("/v2/{}/blobs/{layer}?ns={ns}", image.name);
    let gets = cluster.get_everywhere(&target);
    // Once about a third of the layer came in, kill the layer's arbiter.
    let started = Instant::now();
    while sent.load(Ordering::Relaxed) < want.len() as u64 / 3 {
        assert!(started.elapsed() < Duration::from_secs(40), "nothing came from upstream\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if arbiter == cluster.tracker_addr {
        cluster.tracker.kill();
    } else {
        let replica = cluster.replicas.iter_mut().find(|r| r.addr == arbiter).expect("the arbiter is a replica");
        replica.child.kill();
    }
    eprintln!("killed the arbiter {arbiter} after {:?}", started.elapsed());

    for (i, g) in gets.into_iter().enumerate() {
        let r = g.await.expect("join").unwrap_or_else(|e| panic!("agent {i}: {e:#}\n{}", cluster.logs()));
        assert_eq!(r.status, 200, "agent {i}\n{}", cluster.logs());
        assert!(r.complete, "agent {i}: truncated\n{}", cluster.logs());
        assert!(r.body == want, "agent {i} served wrong bytes\n{}", cluster.logs());
    }
    for (i, a) in cluster.agents.iter().enumerate() {
        assert_eq!(
            a.metric("swarm_mirror_requests_total{outcome=\"fallback\"}").await.expect("metric"),
            0,
            "agent {i} sent its client upstream\n{}",
            cluster.logs()
        );
    }
    let uplink = sent.load(Ordering::Relaxed) as f64 / want.len() as f64;
    eprintln!("the uplink carried {uplink:.3} copies of the layer; all done after {:?}", started.elapsed());
    assert!(uplink <= 1.05, "the uplink carried {uplink:.3} copies of the layer\n{}", cluster.logs());
}
