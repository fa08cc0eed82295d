//! Health, readiness and metrics end to end: real `swarm agent` and `swarm tracker`
//! processes on 127.0.0.1, a real `docker-registry` upstream.
//!
//! - The agent's `/healthz` answers whatever the tracker does; its `/readyz` follows
//!   the tracker (down, up, restarted with another token) within 5 s and names the
//!   reason; the start-up check logs one line; probes are not mirror requests.
//! - The tracker's `--http-listen` serves `/healthz`, `/readyz` and `/metrics` with
//!   nodes, blobs, leases and requests by kind; the agent's `/metrics` has
//!   `swarm_build_info` and the blob delivery-time histogram by registry.
//!
//! Needs: docker-registry, umoci, skopeo.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::agents::{Cluster, agent_command, metric, tracker_command, write_token};
use support::http::{RawResponse, request};
use support::process::{tcp_open, wait_until};
use support::{ChildGuard, Registry, build_image, free_port, test_dir};

/// How quickly `/readyz` must follow a change of the tracker.
const FOLLOW: Duration = Duration::from_secs(5);

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

async fn get(addr: SocketAddr, path: &str) -> RawResponse {
    request(addr, "GET", path, &[]).await.unwrap_or_else(|e| panic!("GET {path} on {addr}: {e:#}"))
}

fn body(r: &RawResponse) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// Polls `GET /readyz` on `addr` until `want(status, body)` holds; returns how long it
/// took, or panics after `within` with the last answer and `logs()`.
async fn wait_readyz(
    addr: SocketAddr,
    within: Duration,
    what: &str,
    want: impl Fn(u16, &str) -> bool,
    logs: impl Fn() -> String,
) -> Duration {
    let start = Instant::now();
    loop {
        let r = get(addr, "/readyz").await;
        if want(r.status, &body(&r)) {
            return start.elapsed();
        }
        if start.elapsed() > within {
            panic!("/readyz not {what} within {within:?}: last {} {:?}\n{}", r.status, body(&r), logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_readyz_follows_the_tracker_and_names_a_wrong_token() {
    let dir = test_dir("health-agent");
    let token = dir.path().join("token");
    let other_token = dir.path().join("other-token");
    write_token(&token).expect("token");
    write_token(&other_token).expect("token");
    let logs = dir.path().join("logs");
    let (tracker_addr, tracker_http, mirror, metrics) = (loopback(), loopback(), loopback(), loopback());

    // The tracker is not running yet.
    let cmd = agent_command(tracker_addr, mirror, metrics, &dir.path().join("data"), &token);
    let mut agent = ChildGuard::spawn("agent", cmd, &logs).expect("agent");
    wait_until("agent mirror", Duration::from_secs(20), &mut agent, || tcp_open(mirror) && tcp_open(metrics))
        .expect("agent up");
    let r = get(mirror, "/healthz").await;
    assert_eq!((r.status, body(&r).as_str()), (200, "ok\n"), "healthz on the mirror address");
    assert_eq!(get(metrics, "/healthz").await.status, 200, "healthz on the metrics address");
    wait_readyz(
        mirror,
        FOLLOW,
        "503 naming the unreachable tracker",
        |s, b| s == 503 && b.contains("unreachable") && b.contains(&tracker_addr.to_string()),
        || agent.logs_tail(),
    )
    .await;
    assert_eq!(get(mirror, "/healthz").await.status, 200, "liveness does not depend on the tracker");
    // The start-up check logged one clear line, and no more while nothing changed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stderr = agent.stderr_text();
    let down: Vec<&str> = stderr.lines().filter(|l| l.contains("not ready")).collect();
    assert_eq!(down.len(), 1, "one start-up line about the tracker:\n{stderr}");
    assert!(down[0].contains(&format!("tracker {tracker_addr} unreachable")), "{}", down[0]);

    // The tracker comes up: ready within 5 s, and one line says so.
    let tracker =
        ChildGuard::spawn("tracker", tracker_command(tracker_addr, tracker_http, &token), &logs).expect("tracker");
    let took = wait_readyz(mirror, FOLLOW, "200", |s, b| s == 200 && b == "ready\n", || agent.logs_tail()).await;
    eprintln!("ready {took:?} after the tracker started");
    let stderr = agent.stderr_text();
    assert_eq!(
        stderr.lines().filter(|l| l.contains("cluster token accepted: ready")).count(),
        1,
        "one line when the tracker became reachable:\n{stderr}"
    );
    assert_eq!(get(metrics, "/readyz").await.status, 200, "readyz on the metrics address too");

    // The tracker goes away: not ready within 5 s.
    drop(tracker);
    let took = wait_readyz(mirror, FOLLOW, "503", |s, _| s == 503, || agent.logs_tail()).await;
    eprintln!("not ready {took:?} after the tracker was killed");

    // A tracker with another token on the same address: not ready, and the reason
    // names the token.
    let _tracker = ChildGuard::spawn("tracker-2", tracker_command(tracker_addr, tracker_http, &other_token), &logs)
        .expect("tracker");
    let took = wait_readyz(
        mirror,
        2 * FOLLOW,
        "503 naming the token",
        |s, b| s == 503 && b.contains("cluster token"),
        || agent.logs_tail(),
    )
    .await;
    eprintln!("the reason named the token {took:?} after a tracker with another token started");
    assert!(agent.stderr_text().contains("refused this node's cluster token"), "{}", agent.logs_tail());

    // None of the probes above was a mirror request.
    for outcome in ["ok", "not_found", "rejected", "fallback", "error"] {
        let name = format!("swarm_mirror_requests_total{{outcome=\"{outcome}\"}}");
        assert_eq!(metric(metrics, &name).await.expect("metric"), 0, "{name}");
    }
    assert!(agent.exited().is_none(), "the agent kept running: {}", agent.logs_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracker_and_agent_metrics_count_nodes_blobs_leases_requests_and_delivery_time() {
    let dir = test_dir("health-metrics");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let image = build_image(&registry, "edge/app", "v1", &[256 * 1024]).expect("image");
    let host = registry.host();
    let cluster = Cluster::start(&dir.path().join("swarm"), 1, &[&host]).expect("cluster");
    let http = cluster.tracker_http;
    let tracker_logs = || cluster.tracker.logs_tail();

    let r = get(http, "/healthz").await;
    assert_eq!((r.status, body(&r).as_str()), (200, "ok\n"), "tracker healthz");
    wait_readyz(http, FOLLOW, "200", |s, _| s == 200, tracker_logs).await;
    let version = format!("swarm_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(metric(http, &version).await.expect("tracker build_info"), 1);
    assert_eq!(metric(http, "swarm_tracker_nodes").await.expect("nodes"), 0);
    assert_eq!(metric(http, "swarm_tracker_blobs").await.expect("blobs"), 0);
    assert_eq!(metric(http, "swarm_tracker_leases").await.expect("leases"), 0);

    // One blob through the agent's mirror: fetched upstream under a lease, announced.
    let agent = &cluster.agents[0];
    let blob = image.layer_digests[0];
    let target = format!("/v2/{}/blobs/{blob}?ns={host}", image.name);
    let r = request(agent.mirror, "GET", &target, &[]).await.expect("blob");
    assert_eq!(r.status, 200, "{}\n{}", body(&r), cluster.logs());
    assert!(r.complete && r.body == image.read_blob(&blob).expect("blob bytes"), "the mirror served the blob");

    assert_eq!(metric(agent.metrics, &version).await.expect("agent build_info"), 1);
    let count = format!("swarm_mirror_blob_delivery_seconds_count{{registry=\"{host}\"}}");
    assert_eq!(metric(agent.metrics, &count).await.expect("histogram"), 1, "one delivery timed");
    let inf = format!("swarm_mirror_blob_delivery_seconds_bucket{{registry=\"{host}\",le=\"+Inf\"}}");
    assert_eq!(metric(agent.metrics, &inf).await.expect("histogram"), 1);

    let deadline = Instant::now() + FOLLOW;
    loop {
        let nodes = metric(http, "swarm_tracker_nodes").await.expect("nodes");
        let blobs = metric(http, "swarm_tracker_blobs").await.expect("blobs");
        if nodes == 1 && blobs == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "nodes {nodes}, blobs {blobs}\n{}\n{}", cluster.logs(), tracker_logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kind = |k: &str| format!("swarm_tracker_requests_total{{kind=\"{k}\"}}");
    assert!(metric(http, &kind("acquire-lease")).await.expect("requests") >= 1, "the agent asked for a lease");
    assert!(metric(http, &kind("announce")).await.expect("requests") >= 1, "the agent announced");
    assert!(metric(http, &kind("get-metainfo")).await.expect("requests") >= 1, "readiness checks");
    // The fetch is over: its lease is released (no lease is live any more).
    let deadline = Instant::now() + FOLLOW;
    while metric(http, "swarm_tracker_leases").await.expect("leases") != 0 {
        assert!(Instant::now() < deadline, "a lease stayed live\n{}", tracker_logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
