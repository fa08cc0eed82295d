//! The agent's Prometheus endpoint: `GET /metrics` in the text exposition format.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use swarm_peer::mirror::MirrorMetrics;
use swarm_peer::node::Node;

/// Routes `/metrics` to a rendering of the node's and the mirror's counters.
pub fn router(node: Node, mirror: Arc<MirrorMetrics>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        get(move || {
            let body = render(&node, &mirror);
            async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response() }
        }),
    )
}

/// The metrics as Prometheus text.
pub fn render(node: &Node, mirror: &MirrorMetrics) -> String {
    let n = node.stats();
    let m = mirror.snapshot();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    metric(
        "swarm_upstream_bytes_total",
        "counter",
        "Blob bytes fetched from upstream registries.",
        &[("", n.from_upstream)],
    );
    metric("swarm_peer_sent_bytes_total", "counter", "Piece bytes sent to peers.", &[("", n.uploaded)]);
    metric(
        "swarm_peer_received_bytes_total",
        "counter",
        "Verified piece bytes received from peers.",
        &[("", n.downloaded())],
    );
    metric("swarm_pieces_failed_total", "counter", "Pieces that failed sha256 verification.", &[("", n.bad_pieces)]);
    metric(
        "swarm_active_downloads",
        "gauge",
        "Blobs being fetched right now.",
        &[("", node.active_downloads() as u64)],
    );
    metric(
        "swarm_mirror_requests_total",
        "counter",
        "Registry mirror requests by outcome.",
        &[
            ("{outcome=\"ok\"}", m.requests_ok),
            ("{outcome=\"not_found\"}", m.requests_not_found),
            ("{outcome=\"rejected\"}", m.requests_rejected),
            ("{outcome=\"fallback\"}", m.requests_fallback),
            ("{outcome=\"error\"}", m.requests_error),
        ],
    );
    metric("swarm_mirror_sent_bytes_total", "counter", "Blob bytes served to containerd.", &[("", m.bytes_served)]);
    metric("swarm_mirror_aborted_streams_total", "counter", "Blob responses cut short.", &[("", m.streams_aborted)]);
    out
}
