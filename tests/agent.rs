//! `swarm agent` end to end: real agent processes, a real `docker-registry` upstream,
//! real containerd pulling through the agents' mirrors.
//!
//! Needs: containerd, docker-registry, umoci, skopeo, and root (containerd).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::agents::Cluster;
use support::throttle::throttled_proxy;
use support::{Containerd, Registry, build_image, test_dir, write_hosts_toml};

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_containerds_pull_through_three_agents_and_the_registry_serves_each_blob_once() {
    let dir = test_dir("agents-ctd");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/os", "v2", &[24 * MIB, 8 * MIB, 512 * 1024]).expect("image");
    let host = registry.host();
    let cluster = Cluster::start(&dir.path().join("swarm"), 3, &[&host]).expect("cluster");
    let mut pulls = Vec::new();
    let mut containerds = Vec::new();
    for (i, agent) in cluster.agents.iter().enumerate() {
        let containerd = Arc::new(Containerd::start(&dir.path().join(format!("ctd{i}"))).expect("containerd"));
        let hosts = dir.path().join(format!("hosts{i}"));
        write_hosts_toml(&hosts, &host, &agent.mirror_url()).expect("hosts.toml");
        containerds.push(containerd.clone());
        let reference = image.reference.clone();
        pulls.push(tokio::spawn(async move { containerd.pull(&reference, &hosts).await }));
    }
    for (i, p) in pulls.into_iter().enumerate() {
        let took = p.await.expect("join").unwrap_or_else(|e| panic!("pull {i} failed: {e:#}\n{}", cluster.logs()));
        eprintln!("containerd {i} pulled in {took:?}");
    }
    for (i, c) in containerds.iter().enumerate() {
        let check = c.image_check(&image.reference).expect("check");
        assert!(check.complete && check.unpacked, "containerd {i}: {}", check.line);
    }
    let mut served = 0;
    for a in &cluster.agents {
        served += a.metric("swarm_mirror_sent_bytes_total").await.expect("metric");
        assert_eq!(
            a.metric("swarm_mirror_requests_total{outcome=\"fallback\"}").await.expect("metric"),
            0,
            "{}",
            cluster.logs()
        );
    }
    assert_eq!(served, 3 * image.total_bytes, "every blob byte went through the agents");
    let mut upstream = 0;
    for a in &cluster.agents {
        upstream += a.metric("swarm_upstream_bytes_total").await.expect("metric");
    }
    assert_eq!(upstream, image.total_bytes, "the agents fetched the image from upstream exactly once");
    for d in image.blob_digests() {
        assert_eq!(registry.blob_get_count(&d), 1, "registry GETs of {d}\n{}", cluster.logs());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_lease_holder_dies_mid_fetch_another_agent_resumes_and_all_finish() {
    let dir = test_dir("agents-failover");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/big", "v1", &[16 * MIB]).expect("image");
    let layer = image.layer_digests[0];
    let want = image.read_blob(&layer).expect("layer bytes");
    let sent = Arc::new(AtomicU64::new(0));
    // 4 MB/s: the 16 MiB layer takes about 4 s from upstream.
    let proxy = throttled_proxy(registry.addr(), 4_000_000, sent.clone()).await;
    let ns = proxy.to_string();
    let mut cluster = Cluster::start(&dir.path().join("swarm"), 3, &[&ns]).expect("cluster");
    let target = format!("/v2/{}/blobs/{layer}?ns={ns}", image.name);
    let gets = cluster.get_everywhere(&target);
    // Find the lease holder once it has fetched about a third of the layer, and kill it.
    let started = Instant::now();
    let holder = loop {
        assert!(started.elapsed() < Duration::from_secs(30), "no agent fetched from upstream\n{}", cluster.logs());
        let mut found = None;
        for (i, a) in cluster.agents.iter().enumerate() {
            if a.metric("swarm_upstream_bytes_total").await.unwrap_or(0) >= want.len() as u64 / 3 {
                found = Some(i);
            }
        }
        if let Some(i) = found {
            break i;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cluster.agents[holder].child.kill();
    eprintln!("killed the lease holder, agent {holder}, after {:?}", started.elapsed());
    for (i, g) in gets.into_iter().enumerate() {
        let r = g.await.expect("join");
        if i == holder {
            continue;
        }
        let r = r.unwrap_or_else(|e| panic!("agent {i}: {e:#}\n{}", cluster.logs()));
        assert_eq!(r.status, 200, "agent {i}");
        assert!(r.complete, "agent {i}: truncated\n{}", cluster.logs());
        assert!(r.body == want, "agent {i} served wrong bytes");
    }
    let uplink = sent.load(Ordering::Relaxed) as f64 / want.len() as f64;
    eprintln!("the uplink carried {uplink:.2} copies of the layer; total {:?}", started.elapsed());
    assert!(uplink <= 1.05, "the uplink carried {uplink:.2} copies: the new lease holder refetched too much");
}

/// The figures for the mirror issue, measured side by side in one run: three
/// containerd pulls of a 200 MiB image through three agents versus three direct
/// pulls, both across the same 200 Mbit/s "uplink" in front of the registry; then a
/// pull served from an agent's local copy versus a direct pull from the (local,
/// unthrottled) registry. Asserts correctness; prints the timings.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn measure_three_pulls_through_agents_versus_direct_and_the_cache_overhead() {
    let dir = test_dir("agents-measure");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/os", "v3", &[120 * MIB, 60 * MIB, 20 * MIB]).expect("image");
    let sent = Arc::new(AtomicU64::new(0));
    let uplink = throttled_proxy(registry.addr(), 25_000_000, sent.clone()).await;
    let wan = uplink.to_string();
    // The same image, reached through the throttled uplink.
    let wan_ref = image.reference.replace(&registry.host(), &wan);

    let pull_all = |refs: Vec<(Arc<Containerd>, std::path::PathBuf)>, reference: String| async move {
        let started = Instant::now();
        let tasks: Vec<_> = refs
            .into_iter()
            .map(|(c, hosts)| {
                let r = reference.clone();
                tokio::spawn(async move { c.pull(&r, &hosts).await })
            })
            .collect();
        for t in tasks {
            t.await.expect("join").expect("pull");
        }
        started.elapsed()
    };

    // Three direct pulls across the uplink.
    let mut direct = Vec::new();
    for i in 0..3 {
        let c = Arc::new(Containerd::start(&dir.path().join(format!("d{i}"))).expect("containerd"));
        let hosts = dir.path().join(format!("dhosts{i}"));
        support::write_direct_hosts_toml(&hosts, &wan).expect("hosts");
        direct.push((c, hosts));
    }
    let direct_time = pull_all(direct, wan_ref.clone()).await;
    let direct_bytes = sent.swap(0, Ordering::Relaxed);

    // Three pulls through three agents across the same uplink.
    let cluster = Cluster::start(&dir.path().join("swarm"), 3, &[&wan]).expect("cluster");
    let mut via = Vec::new();
    for (i, a) in cluster.agents.iter().enumerate() {
        let c = Arc::new(Containerd::start(&dir.path().join(format!("s{i}"))).expect("containerd"));
        let hosts = dir.path().join(format!("shosts{i}"));
        write_hosts_toml(&hosts, &wan, &a.mirror_url()).expect("hosts");
        via.push((c, hosts));
    }
    let swarm_time = pull_all(via, wan_ref.clone()).await;
    let swarm_bytes = sent.swap(0, Ordering::Relaxed);
    let mut fallback = 0;
    for a in &cluster.agents {
        fallback += a.metric("swarm_mirror_requests_total{outcome=\"fallback\"}").await.expect("metric");
    }
    assert_eq!(fallback, 0, "{}", cluster.logs());

    // Cache overhead: agent 0 holds every blob now; compare with the local registry.
    let c = Containerd::start(&dir.path().join("cache")).expect("containerd");
    let hosts = dir.path().join("cachehosts");
    write_hosts_toml(&hosts, &wan, &cluster.agents[0].mirror_url()).expect("hosts");
    let cached = c.pull(&wan_ref, &hosts).await.expect("pull from the agent's copy");
    let from_cache_uplink = sent.swap(0, Ordering::Relaxed);
    let c = Containerd::start(&dir.path().join("local")).expect("containerd");
    let hosts = dir.path().join("localhosts");
    support::write_direct_hosts_toml(&hosts, &registry.host()).expect("hosts");
    let local = c.pull(&image.reference, &hosts).await.expect("direct pull from the local registry");

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "image: {:.1} MiB in {} blobs; uplink 200 Mbit/s in front of the registry",
        mib(image.total_bytes),
        image.blob_digests().len()
    );
    eprintln!(
        "3 direct pulls      : {:6.2} s, registry sent {:7.1} MiB ({:.2}x the image)",
        direct_time.as_secs_f64(),
        mib(direct_bytes),
        direct_bytes as f64 / image.total_bytes as f64
    );
    eprintln!(
        "3 pulls via agents  : {:6.2} s, registry sent {:7.1} MiB ({:.2}x the image)",
        swarm_time.as_secs_f64(),
        mib(swarm_bytes),
        swarm_bytes as f64 / image.total_bytes as f64
    );
    eprintln!("pull from agent copy: {:6.2} s (uplink bytes {from_cache_uplink})", cached.as_secs_f64());
    eprintln!("pull, local registry: {:6.2} s", local.as_secs_f64());
    // Each layer crossed the uplink once through the agents (manifests and the
    // config are small; allow 2 % for HTTP framing and the manifest fetches).
    assert!((swarm_bytes as f64) < 1.02 * image.total_bytes as f64, "uplink carried {swarm_bytes} bytes");
    assert!(direct_bytes >= 3 * image.total_bytes, "direct pulls must each cross the uplink");
    assert!(
        from_cache_uplink < (1 << 20),
        "a pull from the agent's copy crossed the uplink: {from_cache_uplink} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_tracker_down_the_mirror_sends_containerd_upstream_within_seconds() {
    let dir = test_dir("agent-no-tracker");
    let mut cluster = Cluster::start(&dir.path().join("swarm"), 1, &[]).expect("cluster");
    cluster.tracker.kill();
    let blob = format!("/v2/library/os/blobs/sha256:{}?ns=registry.invalid", "ab".repeat(32));
    let started = Instant::now();
    let r = support::http::request(cluster.agents[0].mirror, "GET", &blob, &[]).await.expect("mirror answers");
    let took = started.elapsed();
    let body = String::from_utf8_lossy(&r.body);
    assert_eq!(r.status, 503, "containerd falls back on 503; got {} {body}\n{}", r.status, cluster.logs());
    assert!(body.contains("UNAVAILABLE") && body.contains("tracker"), "the body says why: {body}");
    assert!(took < Duration::from_secs(10), "the fallback took {took:?}");
}
