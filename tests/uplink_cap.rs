//! The cluster-wide uplink cap (`swarm tracker --uplink-cap`) and the per-agent
//! download rate (`swarm agent --download-rate`), end to end: a real
//! `docker-registry` behind a 100 Mbit/s throttled uplink that logs when each chunk
//! crosses it, a tracker and `swarm agent` processes pulling through their mirrors.
//! Rates are measured over sliding 1 s windows (from every logged chunk), stricter
//! than fixed windows.
//!
//! Needs: docker-registry, umoci, skopeo (`apt-get install docker-registry umoci
//! skopeo`).

mod support;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use support::agents::Cluster;
use support::http::request_within;
use support::throttle::{ByteLog, max_sampled_rate, throttled_proxy_logged};
use support::{Registry, build_image, test_dir};

const MIB: usize = 1024 * 1024;
/// The uplink's own rate: 100 Mbit/s.
const UPLINK: u64 = 12_500_000;
/// The cap: 40 Mbit/s.
const CAP: &str = "40Mbit/s";
const CAP_BYTES: f64 = 5_000_000.0;
const WINDOW: Duration = Duration::from_secs(1);

/// Agents `getters[i].0` GET layer `getters[i].1` at once through their mirrors,
/// with the cap on the tracker; returns the uplink's log once all are served
/// (checked byte for byte), how long that took from the first byte on the uplink,
/// and the layer bytes fetched.
async fn capped_pull(
    name: &str,
    layers: &[usize],
    agents: usize,
    getters: &[(usize, usize)],
) -> (ByteLog, Duration, u64) {
    support::init_tracing();
    let dir = test_dir(name);
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, &format!("edge/{name}"), "v1", layers).expect("image");
    let log = ByteLog::default();
    let proxy = throttled_proxy_logged(registry.addr(), UPLINK, Arc::new(AtomicU64::new(0)), log.clone()).await;
    let ns = proxy.to_string();
    let cluster =
        Cluster::start_with_tracker_args(&dir.path().join("swarm"), &["--uplink-cap", CAP], agents, &[&ns], |_, _| {
            Vec::new()
        })
        .expect("cluster");

    let started = Instant::now();
    let mut gets = Vec::new();
    for &(agent, layer) in getters {
        let target = format!("/v2/{}/blobs/{}?ns={ns}", image.name, image.layer_digests[layer]);
        let addr = cluster.agents[agent].mirror;
        gets.push(tokio::spawn(
            async move { request_within(addr, "GET", &target, &[], Duration::from_secs(120)).await },
        ));
    }
    for (g, &(agent, layer)) in gets.into_iter().zip(getters) {
        let r = g.await.expect("join").unwrap_or_else(|e| panic!("agent {agent}: {e:#}\n{}", cluster.logs()));
        assert_eq!(r.status, 200, "agent {agent}: {}\n{}", String::from_utf8_lossy(&r.body), cluster.logs());
        assert!(r.complete, "agent {agent}: truncated\n{}", cluster.logs());
        let want = image.read_blob(&image.layer_digests[layer]).expect("layer bytes");
        assert!(r.body == want, "agent {agent} served wrong bytes for layer {layer}");
    }
    // From the first byte on the uplink (the tracker's lease grace, 6 s after its
    // start, comes before it) to the last agent served.
    let first_byte = log.entries().first().map_or(started, |e| e.0);
    let took = first_byte.elapsed();
    let mut fallbacks = 0;
    for a in &cluster.agents {
        fallbacks += a.metric("swarm_mirror_requests_total{outcome=\"fallback\"}").await.expect("metric");
    }
    assert_eq!(fallbacks, 0, "an agent sent its client upstream\n{}", cluster.logs());
    let distinct: std::collections::BTreeSet<usize> = getters.iter().map(|&(_, l)| l).collect();
    let bytes: u64 = distinct.iter().map(|&l| image.layer_sizes[l]).sum();
    (log, took, bytes)
}

/// Checks the figures of a capped pull of `bytes` distinct layer bytes and prints them.
fn check_capped(what: &str, log: &ByteLog, took: Duration, bytes: u64) {
    let (carried, span) = log.total();
    let peak = log.max_rate(WINDOW);
    let minimum = bytes as f64 / CAP_BYTES;
    eprintln!(
        "{what}: {bytes} layer bytes; uplink carried {carried} bytes = {:.3} x in {span:?} (first to last byte); \
         peak over 1 s windows {:.2} Mbit/s = {:.3} x the cap; all agents served {took:?} after the first uplink byte = {:.3} x F/cap ({:.2} s)",
        carried as f64 / bytes as f64,
        peak * 8.0 / 1e6,
        peak / CAP_BYTES,
        took.as_secs_f64() / minimum,
        minimum,
    );
    assert!(carried as f64 <= bytes as f64 * 1.02, "the uplink carried {carried} bytes for {bytes} layer bytes");
    assert!(peak <= CAP_BYTES * 1.05, "the uplink ran at {:.3} x the cap over a 1 s window", peak / CAP_BYTES);
    // 1.1 x F/cap plus 0.25 s: at these sizes (F/cap about 5 s) a second holder's
    // start waits for the first's renewal (up to 0.5 s at a reduced total while the
    // shares change hands), a fixed cost the 64 MiB emulation target (1.09 x,
    // docs/benchmarks.md) spreads over 13 s; CI measured up to 1.108 x here.
    assert!(
        span.as_secs_f64() <= minimum * 1.1 + 0.25,
        "the capped transfer over the uplink took {span:?}, more than 1.1 x F/cap + 0.25 s = {:.2} s",
        minimum * 1.1 + 0.25
    );
    // The swarm's tail (the last pieces reaching every agent) comes on top.
    assert!(
        took.as_secs_f64() <= minimum * 1.25,
        "serving every agent took {took:?}, more than 1.25 x F/cap = {:.2} s",
        minimum * 1.25
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_agents_fetching_one_blob_stay_under_the_uplink_cap() {
    let getters: Vec<(usize, usize)> = (0..4).map(|a| (a, 0)).collect();
    let (log, took, bytes) = capped_pull("cap1", &[24 * MIB], 4, &getters).await;
    check_capped("one blob, four agents", &log, took, bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_blobs_fetched_by_two_holders_share_the_uplink_cap() {
    // Agents 0 and 1 want layer 0, agents 2 and 3 layer 1: two leases, two holders.
    let getters = [(0, 0), (1, 0), (2, 1), (3, 1)];
    let (log, took, bytes) = capped_pull("cap2", &[12 * MIB, 12 * MIB], 4, &getters).await;
    check_capped("two blobs, two holders", &log, took, bytes);
}

/// `--download-rate 20Mbit/s`: an agent pulling a blob that another agent holds
/// receives it at no more than its rate over any 1 s window (its
/// `swarm_received_bytes_total`, counted as bytes arrive, sampled every 50 ms), and
/// not much below it on average. The sender's counter of acknowledged pieces is
/// printed beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_receives_at_most_its_download_rate() {
    support::init_tracing();
    let dir = test_dir("dlrate");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/dlrate", "v1", &[16 * MIB]).expect("image");
    let layer = image.layer_digests[0];
    let want = image.read_blob(&layer).expect("layer bytes");
    let ns = registry.host();
    const RATE: &str = "20Mbit/s";
    const RATE_BYTES: f64 = 2_500_000.0;
    let cluster = Cluster::start_with(&dir.path().join("swarm"), 2, &[&ns], |i, _| match i {
        1 => vec!["--download-rate".into(), RATE.into()],
        _ => Vec::new(),
    })
    .expect("cluster");
    let target = format!("/v2/{}/blobs/{layer}?ns={ns}", image.name);
    // Agent 0 fetches it from the registry (no cap there) and holds it.
    let r = request_within(cluster.agents[0].mirror, "GET", &target, &[], Duration::from_secs(60)).await.expect("get");
    assert!(r.status == 200 && r.body == want, "agent 0: {}\n{}", r.status, cluster.logs());

    // Agent 1 pulls it through the swarm while both counters are sampled.
    let (receiver, sender) = (cluster.agents[1].metrics, cluster.agents[0].metrics);
    let get = {
        let (addr, target) = (cluster.agents[1].mirror, target.clone());
        tokio::spawn(async move { request_within(addr, "GET", &target, &[], Duration::from_secs(60)).await })
    };
    let (mut received, mut sent) = (Vec::new(), Vec::new());
    let started = Instant::now();
    while !get.is_finished() {
        // Each counter is stamped with the time just after it was read.
        let r = support::agents::metric(receiver, "swarm_received_bytes_total").await.expect("metric");
        received.push((Instant::now(), r));
        let s = support::agents::metric(sender, "swarm_peer_sent_bytes_total").await.expect("metric");
        sent.push((Instant::now(), s));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    let r = get.await.expect("join").expect("get");
    assert!(r.status == 200 && r.body == want, "agent 1: {}\n{}", r.status, cluster.logs());
    let r = support::agents::metric(receiver, "swarm_received_bytes_total").await.expect("metric");
    let upstream = support::agents::metric(receiver, "swarm_upstream_bytes_total").await.expect("metric");
    assert_eq!(upstream, 0, "agent 1 went upstream");
    assert!(r >= want.len() as u64, "agent 1 counted {r} bytes received for a {}-byte blob", want.len());
    let peak = max_sampled_rate(&received, WINDOW);
    let peak_sent = max_sampled_rate(&sent, WINDOW);
    let average = want.len() as f64 / took.as_secs_f64();
    eprintln!(
        "download rate {RATE}: {} bytes in {took:?}; average {:.2} Mbit/s = {:.3} x; peak over 1 s windows received \
         {:.2} Mbit/s = {:.3} x, sent by the peer {:.2} Mbit/s = {:.3} x",
        want.len(),
        average * 8.0 / 1e6,
        average / RATE_BYTES,
        peak * 8.0 / 1e6,
        peak / RATE_BYTES,
        peak_sent * 8.0 / 1e6,
        peak_sent / RATE_BYTES,
    );
    assert!(peak <= RATE_BYTES * 1.05, "agent 1 received {:.3} x its rate over a 1 s window", peak / RATE_BYTES);
    assert!(average >= RATE_BYTES * 0.85, "agent 1 received at only {:.3} x its rate on average", average / RATE_BYTES);
}
