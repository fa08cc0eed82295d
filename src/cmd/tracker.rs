//! `swarm tracker`: run the tracker until interrupted.

use anyhow::{Context, Result};
use swarm_net::{Endpoint, EndpointConfig};
use swarm_tracker::state::TrackerConfig;
use tokio_util::sync::CancellationToken;

use super::common::{TokenArgs, parse_duration, resolve, shutdown_signal};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// UDP address to listen on.
    #[arg(long, env = "SWARM_LISTEN", default_value = "0.0.0.0:7000", value_name = "ADDR:PORT")]
    listen: String,
    /// How often peers re-announce; peers silent for three intervals are forgotten.
    #[arg(long, env = "SWARM_ANNOUNCE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    announce_interval: std::time::Duration,
    #[command(flatten)]
    token: TokenArgs,
}

pub async fn run(args: Args) -> Result<()> {
    let token = args.token.load()?;
    let addr = resolve("listen", &args.listen).await?;
    let endpoint =
        Endpoint::bind(addr, token, &EndpointConfig::default()).with_context(|| format!("cannot listen on {addr}"))?;
    let local = endpoint.local_addr()?;
    eprintln!("tracker listening on {local} (QUIC/UDP)");
    let config = TrackerConfig {
        announce_interval: args.announce_interval,
        peer_ttl: args.announce_interval * 3,
        ..TrackerConfig::default()
    };
    let cancel = CancellationToken::new();
    let server = tokio::spawn(swarm_tracker::server::serve(endpoint, config, cancel.clone()));
    shutdown_signal().await;
    eprintln!("tracker stopping");
    cancel.cancel();
    server.await.context("tracker task")?.context("tracker")?;
    Ok(())
}
