//! `swarm tracker`: run the tracker until interrupted, optionally with an HTTP address
//! for probes and Prometheus (`--http-listen`: `/healthz`, `/readyz`, `/metrics`),
//! and optionally a cluster-wide uplink cap (`--uplink-cap`, see
//! `swarm_core::tracker::uplink`).

use anyhow::{Context, Result};
use swarm_net::{Endpoint, EndpointConfig};
use swarm_tracker::Tracker;
use swarm_tracker::state::TrackerConfig;
use tokio_util::sync::CancellationToken;

use super::common::{TokenArgs, parse_duration, parse_rate, resolve, shutdown_signal};
use super::health::{self, Readiness};
use crate::STATUS;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// UDP address to listen on.
    #[arg(long, env = "SWARM_LISTEN", default_value = "0.0.0.0:7000", value_name = "ADDR:PORT")]
    listen: String,
    /// How often peers re-announce; peers silent for three intervals are forgotten.
    #[arg(long, env = "SWARM_ANNOUNCE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    announce_interval: std::time::Duration,
    /// TCP address serving /healthz, /readyz and Prometheus /metrics over HTTP (off
    /// when absent).
    #[arg(long, env = "SWARM_HTTP_LISTEN", value_name = "ADDR:PORT")]
    http_listen: Option<String>,
    /// Cap on the cluster's total upstream rate, e.g. 50Mbit/s: divided among the
    /// nodes fetching from the upstream registry. With several trackers, give every
    /// one the same cap (one of them owns it at a time). Off when absent.
    #[arg(long, env = "SWARM_UPLINK_CAP", value_name = "RATE", value_parser = parse_rate)]
    uplink_cap: Option<u64>,
    #[command(flatten)]
    token: TokenArgs,
}

pub async fn run(args: Args) -> Result<()> {
    let token = args.token.load()?;
    let addr = resolve("listen", &args.listen).await?;
    let endpoint =
        Endpoint::bind(addr, token, &EndpointConfig::default()).with_context(|| format!("cannot listen on {addr}"))?;
    let local = endpoint.local_addr()?;
    tracing::info!(target: STATUS, "tracker listening on {local} (QUIC/UDP)");
    let config = TrackerConfig {
        announce_interval: args.announce_interval,
        peer_ttl: args.announce_interval * 3,
        uplink_cap: args.uplink_cap,
        ..TrackerConfig::default()
    };
    if let Some(cap) = args.uplink_cap {
        let rate = swarm_proto::units::fmt_rate(cap as f64);
        tracing::info!(target: STATUS, "uplink cap {rate}, divided among the nodes fetching from upstream");
    }
    let tracker = Tracker::new(config);
    let cancel = CancellationToken::new();
    let http_task = match &args.http_listen {
        Some(http) => {
            let http = resolve("http-listen", http).await?;
            let listener = tokio::net::TcpListener::bind(http)
                .await
                .with_context(|| format!("cannot listen on {http} for health and metrics (TCP)"))?;
            let http = listener.local_addr()?;
            // Ready as soon as the QUIC endpoint is bound, which it is by now.
            let router = super::metrics::tracker_router(tracker.clone()).merge(health::router(Readiness::ready()));
            let cancel = cancel.clone();
            tracing::info!(target: STATUS, "tracker health and metrics on http://{http} (/healthz, /readyz, /metrics)");
            // Logged before serving: whoever sees the port open finds both lines.
            Some(tokio::spawn(async move {
                axum::serve(listener, router).with_graceful_shutdown(cancel.cancelled_owned()).await
            }))
        }
        None => None,
    };
    let server = {
        let (tracker, cancel) = (tracker.clone(), cancel.clone());
        tokio::spawn(async move { tracker.serve(endpoint, cancel).await })
    };
    shutdown_signal().await;
    tracing::info!(target: STATUS, "tracker stopping");
    cancel.cancel();
    server.await.context("tracker task")?.context("tracker")?;
    if let Some(t) = http_task {
        t.await.context("health and metrics task")?.context("health and metrics")?;
    }
    Ok(())
}
