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
    /// File holding the cluster token (make one with `swarm token --output FILE`).
    /// The token itself may instead be given in SWARM_TOKEN.
    #[arg(long, env = "SWARM_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

/// Hex digits in a token made by `swarm token` (32 random bytes).
pub const TOKEN_HEX_LEN: usize = 64;

impl TokenArgs {
    /// Loads the token from `--token-file`, else from `SWARM_TOKEN`. Only what
    /// `swarm token` makes is accepted: 64 random-looking hex digits.
    pub fn load(&self) -> Result<ClusterToken> {
        let make_one = "Make one with `swarm token --output /etc/swarm/token` and copy that file to every node \
                        and the tracker.";
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the cluster token file {}", path.display()))?;
            check_token_text(&text)
                .map_err(|why| anyhow::anyhow!("the cluster token in {} {why}.\n{make_one}", path.display()))?;
            return ClusterToken::from_text(&text)
                .with_context(|| format!("loading the cluster token from {}", path.display()));
        }
        match std::env::var("SWARM_TOKEN") {
            Ok(text) if !text.trim().is_empty() => {
                check_token_text(&text).map_err(|why| anyhow::anyhow!("SWARM_TOKEN {why}.\n{make_one}"))?;
                ClusterToken::from_text(&text).context("SWARM_TOKEN")
            }
            _ => bail!(
                "no cluster token: pass --token-file PATH or set SWARM_TOKEN.\n\
                 Every node of a cluster needs the same token; make one with\n  \
                 swarm token --output /etc/swarm/token\n\
                 and copy that file to each node."
            ),
        }
    }
}

/// Refuses token text that `swarm token` cannot have made: anything but 64 hex
/// digits, and hex that is plainly not random (few distinct digits, repeated
/// blocks), such as a placeholder or a pattern typed by hand.
pub fn check_token_text(text: &str) -> Result<(), String> {
    let t = text.trim();
    if t.len() != TOKEN_HEX_LEN || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        let shown: String = t.chars().take(24).collect();
        let ellipsis = if t.chars().count() > 24 { "..." } else { "" };
        return Err(format!(
            "is not a cluster token: expected {TOKEN_HEX_LEN} hex digits, found {} characters ({shown:?}{ellipsis})",
            t.chars().count()
        ));
    }
    let lower = t.to_ascii_lowercase();
    let distinct_digits = lower.bytes().collect::<std::collections::BTreeSet<_>>().len();
    let blocks = lower.as_bytes().chunks(4).collect::<std::collections::BTreeSet<_>>().len();
    // 64 random hex digits have about 16 distinct digits and 16 distinct 4-digit
    // blocks; these bounds fail a random token with odds far below one in a million.
    if distinct_digits < 10 || blocks < 12 {
        return Err("does not look random (too few distinct digits or repeated blocks)".into());
    }
    Ok(())
}

/// The tracker's port when `--tracker` gives none.
pub const DEFAULT_TRACKER_PORT: u16 = 7000;

/// Resolves `HOST:PORT` (a name or an address) to one socket address. `:PORT`
/// means every interface (`0.0.0.0:PORT`).
pub async fn resolve(what: &str, hostport: &str) -> Result<SocketAddr> {
    resolve_with_port(what, hostport, None).await
}

/// Like [`resolve`], but `HOST` alone (a name, an IPv4 address or a bracketed or bare
/// IPv6 address) gets `default_port`.
pub async fn resolve_with_port(what: &str, hostport: &str, default_port: Option<u16>) -> Result<SocketAddr> {
    let text = hostport.trim();
    if text.is_empty() {
        bail!("the {what} address is empty (expected HOST:PORT)");
    }
    let full = if let Some(port) = text.strip_prefix(':').filter(|p| p.parse::<u16>().is_ok()) {
        format!("0.0.0.0:{port}")
    } else if let Ok(ip) = text.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
        match default_port {
            Some(port) => SocketAddr::new(ip, port).to_string(),
            None => bail!("the {what} address {hostport:?} has no port (expected HOST:PORT, e.g. {ip}:7001)"),
        }
    } else if text.starts_with('[') || text.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        text.to_string()
    } else {
        match default_port {
            Some(port) => format!("{text}:{port}"),
            None => bail!("the {what} address {hostport:?} has no port (expected HOST:PORT, e.g. {text}:7001)"),
        }
    };
    if let Ok(addr) = full.parse() {
        return Ok(addr);
    }
    let mut addrs = tokio::net::lookup_host(full.as_str())
        .await
        .with_context(|| format!("cannot resolve the {what} address {hostport:?} (expected HOST:PORT)"))?;
    addrs.next().with_context(|| format!("the {what} address {hostport:?} resolves to nothing"))
}

/// Resolves a `--tracker` value: `HOST:PORT`, or `HOST` for port 7000.
pub async fn resolve_tracker(hostport: &str) -> Result<SocketAddr> {
    resolve_with_port("tracker", hostport, Some(DEFAULT_TRACKER_PORT)).await
}

/// How often a `--tracker` list naming hosts is resolved again, so that a headless
/// Service's trackers coming and going are followed.
pub const TRACKER_RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// Resolves a `--tracker` list: comma-separated `HOST[:PORT]` entries (port 7000 by
/// default), each name standing for every address it resolves to (a headless
/// Service's name gives one address per tracker). Duplicates are dropped; the order
/// is the list's, then the resolver's.
pub async fn resolve_trackers(list: &str) -> Result<Vec<SocketAddr>> {
    let mut out: Vec<SocketAddr> = Vec::new();
    let entries: Vec<&str> = list.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
    if entries.is_empty() {
        bail!("the tracker list {list:?} is empty (expected HOST[:PORT][,HOST[:PORT]...])");
    }
    for entry in entries {
        let first = resolve_tracker(entry).await?;
        let mut addrs = vec![first];
        // A name may stand for several trackers: take every address it resolves to.
        if entry.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_err()
            && entry.parse::<SocketAddr>().is_err()
            && let Ok(all) = tokio::net::lookup_host((host_of(entry), first.port())).await
        {
            addrs.extend(all);
        }
        for a in addrs {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    Ok(out)
}

/// The host part of `HOST[:PORT]`.
fn host_of(entry: &str) -> &str {
    match entry.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() && !host.is_empty() => host,
        _ => entry,
    }
}

/// Resolves `list` again every [`TRACKER_RESOLVE_EVERY`] and hands the addresses to
/// every client, until `cancel` fires. A failed lookup keeps the current list.
pub async fn follow_trackers(
    list: String,
    clients: Vec<swarm_tracker::TrackerClient>,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(TRACKER_RESOLVE_EVERY) => {}
        }
        match resolve_trackers(&list).await {
            Ok(addrs) => {
                for c in &clients {
                    if c.trackers() != addrs {
                        tracing::info!(trackers = ?addrs, "tracker list changed");
                    }
                    c.set_trackers(addrs.clone());
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot resolve the tracker list again; keeping the current one"),
        }
    }
}

/// Turns a node error into a message that says what to check: an unreachable
/// tracker names the address and UDP port instead of the handshake's internals.
pub fn explain_node_error(err: swarm_peer::node::NodeError) -> anyhow::Error {
    use swarm_net::NetError;
    use swarm_peer::node::NodeError;
    use swarm_tracker::client::TrackerClientError;
    match err {
        NodeError::Tracker(TrackerClientError::Net { tracker, source: NetError::HandshakeTimeout { after, .. } }) => {
            anyhow::anyhow!(
                "cannot reach the tracker at {tracker}: no answer within {}.\n\
             Check that `swarm tracker` is running there, that --tracker names the right host and port \
             (default port {DEFAULT_TRACKER_PORT}), and that UDP port {} is open between this machine and it.",
                humantime::format_duration(Duration::from_secs(after.as_secs().max(1))),
                tracker.port()
            )
        }
        NodeError::Tracker(TrackerClientError::Net {
            tracker,
            source: source @ (NetError::Handshake { .. } | NetError::Connect { .. }),
        }) => anyhow::anyhow!(
            "cannot reach the tracker at {tracker} ({source}).\n\
             Check that `swarm tracker` is running there and that UDP port {} is open.",
            tracker.port()
        ),
        other => anyhow::Error::new(other),
    }
}
/// Parses a duration such as `30s`, `5m`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 30s, 5m, 1h)"))
}

/// Parses a rate such as `100Mbit/s`, `12.5MB/s`, `1Gbit/s` into whole bytes per
/// second (the workspace's one parser, [`swarm_proto::units`]).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    swarm_proto::units::parse_rate_bytes(s).map_err(|e| e.to_string())
}

/// Parses a size such as `64MiB`, `1GiB`, `1000000` ([`swarm_proto::units::parse_size`]).
pub fn parse_size(s: &str) -> Result<u64, String> {
    swarm_proto::units::parse_size(s).map_err(|e| e.to_string())
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

/// `n` followed by `word`, with an `s` unless `n` is 1: `1 peer`, `3 peers`.
pub fn plural(n: u64, word: &str) -> String {
    if n == 1 { format!("1 {word}") } else { format!("{n} {word}s") }
}

/// Mebibytes (2^20) per second, to go with [`human_bytes`] in the same line.
pub fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / (1024.0 * 1024.0)
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
        assert_eq!(plural(1, "peer"), "1 peer");
        assert_eq!(plural(0, "peer"), "0 peers");
    }

    #[test]
    fn only_random_looking_64_hex_digit_tokens_pass() {
        for _ in 0..1000 {
            let t = ClusterToken::generate().to_text();
            assert_eq!(check_token_text(&format!("{t}\n")), Ok(()), "{t}");
        }
        for bad in [
            "YOUR_SWARM_TOKEN_HERE",
            "",
            &"ab".repeat(16),
            &"0".repeat(64),
            &"0123456789abcdef".repeat(4),
            &"deadbeef".repeat(8),
        ] {
            assert!(check_token_text(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn addresses_take_a_default_port_and_a_bare_port() {
        let r =
            |s: &'static str, p: Option<u16>| async move { resolve_with_port("x", s, p).await.map(|a| a.to_string()) };
        assert_eq!(r(":7001", None).await.ok().as_deref(), Some("0.0.0.0:7001"));
        assert_eq!(r("127.0.0.1", Some(7000)).await.ok().as_deref(), Some("127.0.0.1:7000"));
        assert_eq!(r("::1", Some(7000)).await.ok().as_deref(), Some("[::1]:7000"));
        assert_eq!(r("[::1]:9", None).await.ok().as_deref(), Some("[::1]:9"));
        assert_eq!(r("localhost", Some(7000)).await.ok().map(|a| a.ends_with(":7000")), Some(true));
        assert_eq!(r("localhost:7001", None).await.ok().map(|a| a.ends_with(":7001")), Some(true));
        let err = r("127.0.0.1", None).await.expect_err("no port").to_string();
        assert!(err.contains("has no port"), "{err}");
    }
}

/// Options of every command that runs a peer node.
#[derive(clap::Args, Clone, Debug)]
pub struct NodeArgs {
    /// Tracker address, or several comma-separated (the same list on every node); a
    /// name resolving to several addresses stands for all of them (HOST alone means
    /// port 7000).
    #[arg(long, env = "SWARM_TRACKER", value_name = "HOST[:PORT]")]
    pub tracker: String,
    /// UDP address for this node's QUIC endpoint (port 0 picks a free one; `:PORT`
    /// is every interface).
    #[arg(long, env = "SWARM_LISTEN", default_value = "0.0.0.0:0", value_name = "ADDR:PORT")]
    pub listen: String,
    /// Address other peers should use to reach this node, when it differs from the
    /// one the tracker sees (NAT, several interfaces). A host name is resolved once
    /// at start.
    #[arg(long, env = "SWARM_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,
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
        self.start_with(swarm_peer::node::NodeConfig::new(data_dir)).await
    }

    /// Like [`NodeArgs::start`], from a config the caller adjusted (the flags set
    /// its advertise address, zone and upload rate).
    pub async fn start_with(&self, mut config: swarm_peer::node::NodeConfig) -> Result<swarm_peer::node::Node> {
        let token = self.token.load()?;
        let trackers = resolve_trackers(&self.tracker).await?;
        let tracker = trackers[0];
        let listen = resolve("listen", &self.listen).await?;
        let endpoint = swarm_net::Endpoint::bind(listen, token, &swarm_net::EndpointConfig::default())
            .with_context(|| format!("cannot listen on {listen}"))?;
        config.advertise = match &self.advertise {
            Some(a) => Some(resolve("advertise", a).await?),
            None => None,
        };
        config.zone = self.zone.clone();
        config.upload_rate = self.upload_rate;
        let node = swarm_peer::node::Node::start(endpoint, tracker, config).context("starting the peer")?;
        node.tracker().set_trackers(trackers);
        Ok(node)
    }
}

/// docs/configuration.md against the code: every flag (with its environment variable)
/// and every config key has a row, and every row names something that exists.
#[cfg(test)]
mod docs_tests {
    use std::collections::BTreeSet;

    use clap::CommandFactory;
    use serde_json::Value;

    const DOC: &str = include_str!("../../docs/configuration.md");

    /// The `## heading` section's text, up to the next `## `.
    fn section(heading: &str) -> &'static str {
        let start = DOC
            .find(&format!("\n## {heading}\n"))
            .unwrap_or_else(|| panic!("docs/configuration.md has no section `## {heading}`"));
        let body = &DOC[start + heading.len() + 5..];
        &body[..body.find("\n## ").unwrap_or(body.len())]
    }

    /// The first cells (without backticks) of a section's table rows, and the rows.
    fn rows(text: &str) -> Vec<(String, &str)> {
        text.lines()
            .filter_map(|l| {
                let cell = l.strip_prefix("| `")?;
                Some((cell[..cell.find('`')?].to_string(), l))
            })
            .collect()
    }

    /// Dotted paths of the leaves of a serialized config (empty objects are leaves).
    fn keys(prefix: &str, v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    keys(&path, v, out);
                }
            }
            _ => {
                out.insert(prefix.to_string());
            }
        }
    }

    fn table_keys(heading: &str) -> BTreeSet<String> {
        rows(section(heading)).into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn docs_configuration_md_matches_the_code() {
        // Agent config file.
        let mut file = super::super::agent::FileConfig::default();
        file.upstream.registries.insert("<registry>".into(), Default::default());
        let mut want = BTreeSet::new();
        keys("", &serde_json::to_value(&file).expect("serialize"), &mut want);
        assert_eq!(table_keys("Agent config file (`--config`)"), want, "config file keys");

        // k3s registries.yaml.
        use swarm_peer::upstream::k3s;
        let mut yaml = k3s::RegistriesYaml::default();
        yaml.mirrors.insert("<registry>".into(), k3s::Mirror::default());
        let config = k3s::Config { auth: Some(Default::default()), tls: Some(Default::default()) };
        yaml.configs.insert("<host>".into(), config);
        let mut want = BTreeSet::new();
        keys("", &serde_json::to_value(&yaml).expect("serialize"), &mut want);
        assert_eq!(table_keys("k3s registries.yaml (`--k3s-registries`)"), want, "registries.yaml keys");

        // Flags, per command.
        let mut cli = crate::Cli::command();
        cli.build();
        let global: Vec<_> = cli.get_arguments().filter(|a| a.is_global_set()).filter_map(|a| a.get_long()).collect();
        let headings = [
            ("agent", "`swarm agent`"),
            ("tracker", "`swarm tracker`"),
            ("seed", "`swarm seed FILE`"),
            ("pull", "`swarm pull DIGEST`"),
            ("token", "`swarm token`"),
            ("containerd-config", "`swarm containerd-config`"),
            ("demo", "`swarm demo`"),
            ("status", "`swarm status`"),
            ("stage", "`swarm stage`"),
        ];
        let names: BTreeSet<_> =
            cli.get_subcommands().map(|c| c.get_name().to_string()).filter(|n| n != "help").collect();
        let documented: BTreeSet<_> = headings.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(names, documented, "every command has a section");
        for (name, heading) in headings {
            let cmd = cli.find_subcommand(name).expect("subcommand");
            let doc_rows = rows(section(heading));
            let mut flags = BTreeSet::new();
            for arg in cmd.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if long == "help" || long == "version" || global.contains(&long) {
                    continue;
                }
                let flag = format!("--{long}");
                let (_, row) = doc_rows
                    .iter()
                    .find(|(k, _)| *k == flag)
                    .unwrap_or_else(|| panic!("swarm {name} {flag} is not in docs/configuration.md"));
                if let Some(env) = arg.get_env() {
                    let env = env.to_string_lossy();
                    assert!(row.contains(&format!("`{env}`")), "swarm {name} {flag}: the row lacks `{env}`");
                }
                flags.insert(flag);
            }
            let listed: BTreeSet<_> = doc_rows.into_iter().map(|(k, _)| k).collect();
            assert_eq!(listed, flags, "swarm {name}: documented flags");
        }
        for long in global {
            assert!(section("Every command").contains(&format!("`--{long}`")), "global --{long} undocumented");
        }
    }
}
