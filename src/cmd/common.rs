//! Options and helpers shared by several subcommands: the cluster token, address
//! resolution, human-readable sizes and rates, and Ctrl-C handling.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use swarm_net::ClusterToken;

/// How a command finds the cluster token.
#[derive(clap::Args, Clone, Debug)]
pub struct TokenArgs {
    /// File holding the cluster token (make one with `swarm token > FILE`).
    /// The token itself may instead be given in SWARM_TOKEN.
    #[arg(long, env = "SWARM_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

impl TokenArgs {
    /// Loads the token from `--token-file`, else from `SWARM_TOKEN`.
    pub fn load(&self) -> Result<ClusterToken> {
        if let Some(path) = &self.token_file {
            return ClusterToken::from_file(path)
                .with_context(|| format!("loading the cluster token from {}", path.display()));
        }
        match std::env::var("SWARM_TOKEN") {
            Ok(text) if !text.trim().is_empty() => ClusterToken::from_text(&text).context("SWARM_TOKEN"),
            _ => bail!(
                "no cluster token: pass --token-file PATH or set SWARM_TOKEN.\n\
                 Every node of a cluster needs the same token; make one with\n  \
                 swarm token > /etc/swarm/token && chmod 600 /etc/swarm/token\n\
                 and copy that file to each node."
            ),
        }
    }
}

/// Resolves `HOST:PORT` (a name or an address) to one socket address.
pub async fn resolve(what: &str, hostport: &str) -> Result<SocketAddr> {
    if let Ok(addr) = hostport.parse() {
        return Ok(addr);
    }
    let mut addrs = tokio::net::lookup_host(hostport)
        .await
        .with_context(|| format!("cannot resolve the {what} address {hostport:?} (expected HOST:PORT)"))?;
    addrs.next().with_context(|| format!("the {what} address {hostport:?} resolves to nothing"))
}

/// Parses a duration such as `30s`, `5m`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 30s, 5m, 1h)"))
}

/// Parses a rate such as `100Mbit/s`, `12.5MB/s`, `1Gbit/s` into bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?}: expected a number followed by a unit, e.g. 100Mbit/s"))?;
    let unit = unit.trim().trim_end_matches("/s").trim_end_matches("ps");
    let factor = match unit {
        "bit" | "b" => 1.0 / 8.0,
        "kbit" | "Kbit" | "kb" => 1e3 / 8.0,
        "Mbit" | "mbit" | "Mb" => 1e6 / 8.0,
        "Gbit" | "gbit" | "Gb" => 1e9 / 8.0,
        "B" | "" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use bit, kbit, Mbit, Gbit, B, kB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    let v = n * factor;
    if !(v >= 1.0 && v.is_finite()) {
        return Err(format!("{s:?}: a rate must be at least 1 byte per second"));
    }
    Ok(v as u64)
}

/// Parses a size such as `64MiB`, `1GiB`, `1000000`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_rate(s)
}

/// `1.50 GiB`-style text.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.2} {}", UNITS[u]) }
}

/// Megabytes (10^6) per second.
pub fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / 1e6
}

/// Resolves when the process receives Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_sizes_parse_with_units() {
        assert_eq!(parse_rate("100Mbit/s"), Ok(12_500_000));
        assert_eq!(parse_rate("8bit/s"), Ok(1));
        assert_eq!(parse_rate("12.5MB/s"), Ok(12_500_000));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10 furlongs").is_err());
        assert!(parse_rate("0").is_err());
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(12), "12 B");
    }
}

/// Options of every command that runs a peer node.
#[derive(clap::Args, Clone, Debug)]
pub struct NodeArgs {
    /// Tracker address.
    #[arg(long, env = "SWARM_TRACKER", value_name = "HOST:PORT")]
    pub tracker: String,
    /// UDP address for this node's QUIC endpoint (port 0 picks a free one).
    #[arg(long, env = "SWARM_LISTEN", default_value = "0.0.0.0:0", value_name = "ADDR:PORT")]
    pub listen: String,
    /// Address other peers should use to reach this node, when it differs from the
    /// one the tracker sees (NAT, several interfaces).
    #[arg(long, env = "SWARM_ADVERTISE", value_name = "ADDR:PORT")]
    pub advertise: Option<SocketAddr>,
    /// Locality label (rack, site): peers in the same zone are preferred.
    #[arg(long, env = "SWARM_ZONE", default_value = "")]
    pub zone: String,
    /// Cap on this node's upload rate, e.g. 200Mbit/s (default: unlimited).
    #[arg(long, env = "SWARM_UPLOAD_RATE", value_parser = parse_rate, value_name = "RATE")]
    pub upload_rate: Option<u64>,
    #[command(flatten)]
    pub token: TokenArgs,
}

impl NodeArgs {
    /// Binds the endpoint and starts a node storing its blobs in `data_dir`.
    pub async fn start(&self, data_dir: PathBuf) -> Result<swarm_peer::node::Node> {
        let token = self.token.load()?;
        let tracker = resolve("tracker", &self.tracker).await?;
        let listen = resolve("listen", &self.listen).await?;
        let endpoint = swarm_net::Endpoint::bind(listen, token, &swarm_net::EndpointConfig::default())
            .with_context(|| format!("cannot listen on {listen}"))?;
        let mut config = swarm_peer::node::NodeConfig::new(data_dir);
        config.advertise = self.advertise;
        config.zone = self.zone.clone();
        config.upload_rate = self.upload_rate;
        swarm_peer::node::Node::start(endpoint, tracker, config).context("starting the peer")
    }
}
