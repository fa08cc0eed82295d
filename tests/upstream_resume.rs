//! An unreliable uplink end to end: a real `docker-registry` behind a [`FlakyProxy`]
//! (the uplink), a tracker and three `swarm agent` processes pulling one 64 MiB blob
//! through their mirrors while the uplink resets the lease holder's connection twice
//! and then goes down for [`OUTAGE`]. The holder resumes with HTTP ranges instead of
//! giving the lease up: every agent serves the whole blob and the uplink carries it
//! about once.
//!
//! Needs: docker-registry, umoci, skopeo (`apt-get install docker-registry umoci
//! skopeo`).

mod support;

use std::time::{Duration, Instant};

use support::agents::Cluster;
use support::http::request_within;
use support::{FlakyProxy, Registry, build_image, test_dir};

const MIB: usize = 1024 * 1024;
/// The uplink's rate: the blob takes about 4 s when nothing goes wrong.
const UPLINK_RATE: u64 = 16_000_000;
/// How long the uplink is down: the 60 s. The holder rides it out (its
/// upstream client gives up only after 100 s without a byte, `RESUME_GIVE_UP`) and
/// keeps its lease (the tracker withdraws a lease only after 110 s without a new
/// piece hash, `STALL_TIMEOUT`).
const OUTAGE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_resets_and_an_outage_mid_blob_every_agent_completes_and_the_uplink_carries_it_once() {
    support::init_tracing();
    let dir = test_dir("uplink");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/flaky", "v1", &[64 * MIB]).expect("image");
    let layer = image.layer_digests[0];
    let want = image.read_blob(&layer).expect("layer bytes");
    let size = want.len() as u64;
    let proxy = FlakyProxy::start(registry.addr(), UPLINK_RATE).await.expect("proxy");
    let ns = proxy.addr().to_string();
    let cluster = Cluster::start(&dir.path().join("swarm"), 3, &[&ns]).expect("cluster");

    let started = Instant::now();
    let target = format!("/v2/{}/blobs/{layer}?ns={ns}", image.name);
    let mut gets = Vec::new();
    for a in &cluster.agents {
        let (addr, target) = (a.mirror, target.clone());
        gets.push(tokio::spawn(
            async move { request_within(addr, "GET", &target, &[], Duration::from_secs(180)).await },
        ));
    }
    let limit = Duration::from_secs(60);
    let at = |fraction: f64| (size as f64 * fraction) as u64;
    proxy.wait_for_bytes(at(0.25), limit).await.unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
    proxy.reset_all();
    eprintln!("reset 1 at {} bytes, {:?}", proxy.upstream_bytes(), started.elapsed());
    proxy.wait_for_bytes(at(0.45), limit).await.unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
    proxy.reset_all();
    eprintln!("reset 2 at {} bytes, {:?}", proxy.upstream_bytes(), started.elapsed());
    proxy.wait_for_bytes(at(0.60), limit).await.unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.logs()));
    proxy.set_down(true);
    // A chunk already being relayed when the link went down may still land.
    let settle = Duration::from_millis(200);
    tokio::time::sleep(settle).await;
    let down_at = proxy.upstream_bytes();
    eprintln!("uplink down at {down_at} bytes, {:?}", started.elapsed());
    tokio::time::sleep(OUTAGE - settle).await;
    assert_eq!(proxy.upstream_bytes(), down_at, "bytes crossed the uplink while it was down");
    proxy.set_down(false);
    eprintln!("uplink back, {:?}", started.elapsed());

    for (i, g) in gets.into_iter().enumerate() {
        let r = g.await.expect("join").unwrap_or_else(|e| panic!("agent {i}: {e:#}\n{}", cluster.logs()));
        assert_eq!(r.status, 200, "agent {i}: {}\n{}", String::from_utf8_lossy(&r.body), cluster.logs());
        assert!(r.complete, "agent {i}: truncated after {} bytes\n{}", r.body.len(), cluster.logs());
        assert!(r.body == want, "agent {i} served wrong bytes");
        assert!(cluster.agents[i].stores_blob(&layer), "agent {i} does not hold the verified blob");
    }
    let took = started.elapsed();
    let uplink = proxy.upstream_bytes();
    let ratio = uplink as f64 / size as f64;
    let log = registry.access_log();
    let blob_gets = |status: u16| {
        log.iter().filter(|l| l.method == "GET" && l.target.contains(&layer.to_string()) && l.status == status).count()
    };
    let (full, ranged) = (blob_gets(200), blob_gets(206));
    let mut fallbacks = 0;
    for a in &cluster.agents {
        fallbacks += a.metric("swarm_mirror_requests_total{outcome=\"fallback\"}").await.expect("metric");
    }
    eprintln!(
        "blob {size} bytes; uplink carried {uplink} bytes = {ratio:.4} x the blob; registry blob GETs: {full} \
         whole, {ranged} ranged; fallbacks {fallbacks}; all three agents done in {took:?} (outage {OUTAGE:?})"
    );
    assert_eq!(fallbacks, 0, "an agent sent containerd upstream\n{}", cluster.logs());
    assert_eq!(full, 1, "the blob was fetched whole more than once: {log:?}\n{}", cluster.logs());
    assert!(ranged >= 3, "expected a ranged resumption after each reset and the outage: {log:?}");
    assert!(ratio <= 1.05, "the uplink carried {ratio:.4} x the blob (at most 1.05 allowed)\n{}", cluster.logs());
}
