//! The daemons' Prometheus endpoints, `GET /metrics` in the text exposition format:
//! the agent's node and mirror counters with the blob delivery-time histogram
//! ([`agent_router`]), and the tracker's nodes, blobs, leases and requests by kind
//! ([`tracker_router`]). Both carry `swarm_build_info`.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use swarm_peer::mirror::{DELIVERY_BUCKETS, MirrorMetrics};
use swarm_peer::node::Node;
use swarm_peer::rate::Limiter;
use swarm_tracker::Tracker;

const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Routes `/metrics` to a rendering of `render`.
fn router(render: impl Fn() -> String + Clone + Send + Sync + 'static) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        get(move || {
            let body = render();
            async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response() }
        }),
    )
}

/// Routes `/metrics` to a rendering of the node's and the mirror's counters.
pub fn agent_router(node: Node, mirror: Arc<MirrorMetrics>, received: Limiter) -> axum::Router {
    router(move || render_agent(&node, &mirror, &received))
}

/// Routes `/metrics` to a rendering of the tracker's statistics.
pub fn tracker_router(tracker: Tracker) -> axum::Router {
    router(move || render_tracker(&tracker))
}

/// Prometheus text, one metric family at a time.
#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.out, "{name}{labels} {value}");
    }

    /// A family with one sample per `(labels, value)`.
    fn metric(&mut self, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
        self.family(name, kind, help);
        for (labels, value) in samples {
            self.sample(name, labels, value);
        }
    }

    /// `swarm_build_info{version="..."} 1`.
    fn build_info(&mut self) {
        self.family("swarm_build_info", "gauge", "The running swarm version (always 1).");
        self.sample("swarm_build_info", &format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")), 1);
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The agent's metrics as Prometheus text.
/// `received` is the agent's download limiter (`--download-rate`, unlimited without
/// it), which counts every byte received as it arrives.
pub fn render_agent(node: &Node, mirror: &MirrorMetrics, received: &Limiter) -> String {
    let n = node.stats();
    let m = mirror.snapshot();
    let mut e = Exposition::default();
    e.build_info();
    e.metric(
        "swarm_upstream_bytes_total",
        "counter",
        "Blob bytes fetched from upstream registries.",
        &[("", n.from_upstream)],
    );
    e.metric("swarm_peer_sent_bytes_total", "counter", "Piece bytes sent to peers.", &[("", n.uploaded)]);
    e.metric(
        "swarm_peer_received_bytes_total",
        "counter",
        "Verified piece bytes received from peers.",
        &[("", n.downloaded())],
    );
    e.metric(
        "swarm_received_bytes_total",
        "counter",
        "Bytes received as they arrive: piece bytes from peers and upstream blob bytes (what --download-rate limits).",
        &[("", received.bytes())],
    );
    e.metric("swarm_pieces_failed_total", "counter", "Pieces that failed sha256 verification.", &[("", n.bad_pieces)]);
    e.metric(
        "swarm_active_downloads",
        "gauge",
        "Blobs being fetched right now.",
        &[("", node.active_downloads() as u64)],
    );
    e.metric(
        "swarm_mirror_requests_total",
        "counter",
        "Registry mirror requests by outcome (health probes are not counted).",
        &[
            ("{outcome=\"ok\"}", m.requests_ok),
            ("{outcome=\"not_found\"}", m.requests_not_found),
            ("{outcome=\"rejected\"}", m.requests_rejected),
            ("{outcome=\"fallback\"}", m.requests_fallback),
            ("{outcome=\"error\"}", m.requests_error),
        ],
    );
    e.metric("swarm_mirror_sent_bytes_total", "counter", "Blob bytes served to containerd.", &[("", m.bytes_served)]);
    e.metric("swarm_mirror_aborted_streams_total", "counter", "Blob responses cut short.", &[("", m.streams_aborted)]);
    let name = "swarm_mirror_blob_delivery_seconds";
    e.family(
        name,
        "histogram",
        "Time from a blob request to its last byte sent, for responses delivered in full, by registry.",
    );
    for (registry, h) in mirror.delivery_times() {
        let registry = label(&registry);
        for (bound, count) in DELIVERY_BUCKETS.iter().zip(h.buckets) {
            e.sample(&format!("{name}_bucket"), &format!("{{registry=\"{registry}\",le=\"{bound}\"}}"), count);
        }
        e.sample(&format!("{name}_bucket"), &format!("{{registry=\"{registry}\",le=\"+Inf\"}}"), h.count);
        e.sample(&format!("{name}_sum"), &format!("{{registry=\"{registry}\"}}"), h.sum);
        e.sample(&format!("{name}_count"), &format!("{{registry=\"{registry}\"}}"), h.count);
    }
    e.out
}

/// The tracker's metrics as Prometheus text.
pub fn render_tracker(tracker: &Tracker) -> String {
    let s = tracker.stats();
    let mut e = Exposition::default();
    e.build_info();
    e.metric(
        "swarm_tracker_nodes",
        "gauge",
        "Nodes (peer ids) that announced within the peer TTL.",
        &[("", s.nodes as u64)],
    );
    e.metric(
        "swarm_tracker_blobs",
        "gauge",
        "Blobs tracked (with peers, metainfo or upstream state).",
        &[("", s.blobs as u64)],
    );
    e.metric("swarm_tracker_leases", "gauge", "Upstream leases live right now.", &[("", s.leases as u64)]);
    let name = "swarm_tracker_requests_total";
    e.family(name, "counter", "Tracker requests received, by kind.");
    for (kind, n) in &s.requests {
        e.sample(name, &format!("{{kind=\"{kind}\"}}"), n);
    }
    e.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn a_fresh_tracker_renders_every_family_with_zeros() {
        let text = render_tracker(&Tracker::new(swarm_tracker::TrackerConfig::default()));
        assert!(text.contains(&format!("swarm_build_info{{version=\"{}\"}} 1\n", env!("CARGO_PKG_VERSION"))), "{text}");
        for line in ["swarm_tracker_nodes 0", "swarm_tracker_blobs 0", "swarm_tracker_leases 0"] {
            assert!(text.contains(&format!("{line}\n")), "{line} missing from {text}");
        }
        for kind in swarm_tracker::REQUEST_KINDS {
            assert!(text.contains(&format!("swarm_tracker_requests_total{{kind=\"{kind}\"}} 0\n")), "{text}");
        }
    }
}
