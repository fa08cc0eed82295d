//! `swarm agent`: the per-node daemon. One process holds the QUIC peer, the piece
//! store and the HTTP registry mirror containerd talks to, plus an optional
//! Prometheus endpoint. The mirror's address also answers `/healthz` and `/readyz`
//! (ready: the tracker answers and accepted the token; see [`super::health`]), as does
//! the metrics address, and `/status` (JSON for `swarm status`; see [`super::status`]).
//! Settings come from flags, `SWARM_*` variables and an optional TOML file
//! (`--config`); a flag wins over the file. Registry credentials and TLS settings may
//! also come from k3s's `registries.yaml` (`--k3s-registries`), under the file's
//! `[upstream.registries]`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use swarm_net::{Endpoint, EndpointConfig};
use swarm_peer::agent::SwarmProvider;
use swarm_peer::disk::{self, Disk};
use swarm_peer::mirror::{self, MirrorConfig, MirrorMetrics};
use swarm_peer::node::{Node, NodeConfig};
use swarm_peer::rate::Limiter;
use swarm_peer::upstream::{UpstreamClient, UpstreamConfig, k3s};
use swarm_tracker::TrackerClient;
use tokio_util::sync::CancellationToken;

use super::common::{
    TokenArgs, follow_trackers, human_bytes, parse_rate, parse_size, resolve, resolve_trackers, shutdown_signal,
};
use super::health::{self, CHECK_TIMEOUT, Readiness};
use crate::STATUS;

const DEFAULT_LISTEN: &str = "0.0.0.0:7001";
const DEFAULT_MIRROR: &str = "127.0.0.1:5001";
const DEFAULT_DATA_DIR: &str = "/var/lib/swarm";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// TOML file with any of the settings below, plus per-registry credentials and
    /// endpoints under [upstream].
    #[arg(long, env = "SWARM_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Tracker address, or several comma-separated (the same list on every node); a
    /// name resolving to several addresses stands for all of them (HOST alone means
    /// port 7000).
    #[arg(long, env = "SWARM_TRACKER", value_name = "HOST[:PORT]")]
    tracker: Option<String>,
    /// UDP address of the QUIC peer; `:PORT` is every interface [default: 0.0.0.0:7001].
    #[arg(long, env = "SWARM_LISTEN", value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// HTTP address of the registry mirror; keep it on loopback, only the local
    /// containerd should reach it [default: 127.0.0.1:5001].
    #[arg(long, env = "SWARM_MIRROR", value_name = "ADDR:PORT")]
    mirror: Option<String>,
    /// Piece store directory [default: /var/lib/swarm].
    #[arg(long, env = "SWARM_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Locality label (rack, site): peers in the same zone are preferred.
    #[arg(long, env = "SWARM_ZONE")]
    zone: Option<String>,
    /// A registry reached over plain HTTP (repeatable), as containerd's --plain-http.
    #[arg(long = "plain-http", env = "SWARM_PLAIN_HTTP", value_name = "REGISTRY", value_delimiter = ',')]
    plain_http: Vec<String>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics.
    #[arg(long, env = "SWARM_METRICS", value_name = "ADDR:PORT")]
    metrics: Option<String>,
    /// Address other peers should use to reach this node (a host name is resolved
    /// once at start).
    #[arg(long, env = "SWARM_ADVERTISE", value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// k3s's registries.yaml to read registry credentials and TLS settings from
    /// (configs.<registry>.auth and .tls), e.g. /etc/rancher/k3s/registries.yaml.
    #[arg(long, env = "SWARM_K3S_REGISTRIES", value_name = "PATH")]
    k3s_registries: Option<PathBuf>,
    /// Cap on this node's upload rate to peers, e.g. 200Mbit/s.
    #[arg(long, env = "SWARM_UPLOAD_RATE", value_name = "RATE")]
    upload_rate: Option<String>,
    /// Cap on everything this node receives (pieces from peers and upstream bytes),
    /// e.g. 20Mbit/s.
    #[arg(long, env = "SWARM_DOWNLOAD_RATE", value_name = "RATE")]
    download_rate: Option<String>,
    /// Byte budget of the piece store, e.g. 20GiB, 500MiB or plain bytes; least
    /// recently used blobs are evicted beyond it [default: 25% of the size of the data
    /// directory's filesystem].
    #[arg(long, env = "SWARM_CACHE_SIZE", value_name = "SIZE")]
    cache_size: Option<String>,
    /// containerd's root directory (holding io.containerd.content.v1.content): a blob
    /// containerd holds is served from its file instead of a second copy; `none`: off
    /// [default: /var/lib/rancher/k3s/agent/containerd if it exists, else
    /// /var/lib/containerd if it exists, else off].
    #[arg(long, env = "SWARM_CONTAINERD_ROOT", value_name = "DIR")]
    containerd_root: Option<PathBuf>,
    #[command(flatten)]
    token: TokenArgs,
}

/// The `--config` file. Every key is optional; docs/configuration.md lists them all
/// (a test in `common.rs` keeps the two in step).
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub tracker: Option<String>,
    pub listen: Option<String>,
    pub mirror: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub zone: Option<String>,
    pub metrics: Option<String>,
    pub advertise: Option<String>,
    pub upload_rate: Option<String>,
    pub download_rate: Option<String>,
    pub k3s_registries: Option<PathBuf>,
    pub cache_size: Option<String>,
    pub containerd_root: Option<PathBuf>,
    #[serde(default)]
    pub upstream: UpstreamConfig,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid agent configuration {}", path.display()))
    }
}

/// Flags merged over the file, defaults filled in, values checked.
struct Settings {
    tracker: String,
    listen: String,
    mirror: String,
    data_dir: PathBuf,
    token: TokenArgs,
    zone: String,
    metrics: Option<String>,
    advertise: Option<String>,
    upload_rate: Option<u64>,
    download_rate: Option<u64>,
    k3s_registries: Option<PathBuf>,
    /// None: the default share of the data directory's filesystem.
    cache_size: Option<u64>,
    containerd_root: Option<PathBuf>,
    upstream: UpstreamConfig,
}

fn settings(args: Args) -> Result<Settings> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let Some(tracker) = args.tracker.or(file.tracker) else {
        bail!("no tracker: pass --tracker HOST:PORT, set SWARM_TRACKER, or put `tracker = \"HOST:PORT\"` in --config");
    };
    let mut upstream = file.upstream;
    upstream.plain_http.extend(args.plain_http);
    let upload_rate = match args.upload_rate.or(file.upload_rate) {
        Some(r) => Some(parse_rate(&r).map_err(anyhow::Error::msg).context("upload_rate")?),
        None => None,
    };
    let download_rate = match args.download_rate.or(file.download_rate) {
        Some(r) => Some(parse_rate(&r).map_err(anyhow::Error::msg).context("download_rate")?),
        None => None,
    };
    let cache_size = match args.cache_size.or(file.cache_size) {
        Some(s) => Some(parse_size(&s).map_err(anyhow::Error::msg).context("cache_size")?),
        None => None,
    };
    Ok(Settings {
        cache_size,
        containerd_root: args.containerd_root.or(file.containerd_root),
        tracker,
        listen: args.listen.or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.into()),
        mirror: args.mirror.or(file.mirror).unwrap_or_else(|| DEFAULT_MIRROR.into()),
        data_dir: args.data_dir.or(file.data_dir).unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
        token: TokenArgs { token_file: args.token.token_file.or(file.token_file) },
        zone: args.zone.or(file.zone).unwrap_or_default(),
        metrics: args.metrics.or(file.metrics),
        advertise: args.advertise.or(file.advertise),
        upload_rate,
        download_rate,
        k3s_registries: args.k3s_registries.or(file.k3s_registries),
        upstream,
    })
}

pub async fn run(args: Args) -> Result<()> {
    let s = settings(args)?;
    let token = s.token.load()?;
    let trackers = resolve_trackers(&s.tracker).await?;
    let tracker = trackers[0];
    let listen = resolve("listen", &s.listen).await?;
    let mirror_addr = resolve("mirror", &s.mirror).await?;
    let mut upstream = s.upstream;
    if let Some(path) = &s.k3s_registries {
        // registries.yaml first; [upstream.registries] in --config wins per registry.
        let mut registries = k3s::load(path, mirror_addr).context("--k3s-registries")?;
        registries.append(&mut upstream.registries);
        upstream.registries = registries;
    }
    let upstream = UpstreamClient::new(upstream).context("upstream registry settings")?;
    // One limiter (and counter) for every byte the node receives: upstream blob bytes
    // and pieces. Unlimited without --download-rate.
    let download_limit = Limiter::new(s.download_rate);
    upstream.limit_downloads(download_limit.clone());
    let advertise = match &s.advertise {
        Some(a) => Some(resolve("advertise", a).await?),
        None => None,
    };
    let endpoint = Endpoint::bind(listen, token, &EndpointConfig::default())
        .with_context(|| format!("cannot listen on {listen} (UDP)"))?;
    // Its own client (own cached connection, short timeout) so that checks never
    // hold up the node's requests.
    let tracker_check = TrackerClient::with_trackers(endpoint.clone(), trackers.clone(), CHECK_TIMEOUT);
    let mut config = NodeConfig::new(s.data_dir.clone());
    config.zone = s.zone;
    config.advertise = advertise;
    config.upload_rate = s.upload_rate;
    config.download_limit = Some(download_limit.clone());
    let node = Node::start(endpoint, tracker, config).context("starting the peer")?;
    node.tracker().set_trackers(trackers.clone());

    let cancel = CancellationToken::new();
    // Every tracker learns the store's complete blobs, now and whenever it restarts.
    let announcer = tokio::spawn(swarm_peer::announce::run(node.clone(), cancel.clone()));
    let follower = tokio::spawn(follow_trackers(
        s.tracker.clone(),
        vec![node.tracker().clone(), tracker_check.clone()],
        cancel.clone(),
    ));
    let metrics = Arc::new(MirrorMetrics::default());
    let budget = match s.cache_size {
        Some(b) => b,
        None => {
            let fs = disk::filesystem_size(&s.data_dir)
                .with_context(|| format!("cannot size the filesystem of {}", s.data_dir.display()))?;
            fs / 100 * disk::DEFAULT_SHARE_PERCENT
        }
    };
    let containerd_root = disk::containerd_root(s.containerd_root.as_deref());
    let disk = Disk::new(node.clone(), budget, containerd_root.as_deref());
    let disk_task = tokio::spawn(disk.clone().run());
    let provider = Arc::new(SwarmProvider::new(node.clone(), upstream.clone()).with_disk(disk.clone()));
    // `swarm stage` orders: followed from every tracker, carried out through the provider.
    let stager = swarm_peer::stage::Stager::new(
        node.clone(),
        provider.clone(),
        upstream.clone(),
        Some(disk.clone()),
        mirror::ManifestCache::new(s.data_dir.join("manifests")),
        swarm_peer::stage::host_name(),
    );
    let stage_task = tokio::spawn(stager.run(cancel.clone()));
    let readiness = Readiness::new(format!("tracker {tracker} not checked yet"));
    if let Some(warning) = disk::filesystem_warning(&s.data_dir) {
        tracing::warn!(target: STATUS, "{warning}");
        readiness.warn(warning);
    }
    tracing::info!(
        target: STATUS,
        "cache budget {}{}; containerd's content store: {}",
        human_bytes(budget),
        if s.cache_size.is_none() { format!(" ({}% of the data directory's filesystem)", disk::DEFAULT_SHARE_PERCENT) } else { String::new() },
        containerd_root.as_ref().map_or_else(|| "not used".to_string(), |r| r.display().to_string())
    );
    let status =
        super::status::StatusSource::new(node.clone(), readiness.clone(), tracker_check.clone()).with_budget(budget);
    let sampler = tokio::spawn(status.clone().sample(cancel.clone()));
    // Probes and /status are routed ahead of the mirror's fallback: they never count
    // as mirror requests.
    let router = health::router(readiness.clone()).merge(super::status::router(status)).merge(mirror::router(
        provider,
        upstream,
        MirrorConfig::new(s.data_dir.join("manifests")),
        metrics.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(mirror_addr)
        .await
        .with_context(|| format!("cannot listen on {mirror_addr} for the mirror (TCP)"))?;
    let mirror_addr = listener.local_addr().context("the mirror's address")?;
    let mirror_task = tokio::spawn(mirror::serve(listener, router, cancel.clone()));
    let metrics_task = match &s.metrics {
        Some(addr) => {
            let addr = resolve("metrics", addr).await?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for metrics"))?;
            let router = super::metrics::agent_router(node.clone(), metrics.clone(), download_limit.clone())
                .merge(health::router(readiness.clone()));
            let cancel = cancel.clone();
            Some(tokio::spawn(async move {
                axum::serve(listener, router).with_graceful_shutdown(cancel.cancelled_owned()).await
            }))
        }
        None => None,
    };
    tracing::info!(
        target: STATUS,
        "swarm agent: peer {} on {} (QUIC), mirror on http://{}, tracker {}, data in {}",
        node.peer_id().short(),
        node.local_addr()?,
        mirror_addr,
        trackers.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        s.data_dir.display()
    );
    let watch_task = tokio::spawn(health::watch_tracker(tracker_check, readiness, cancel.clone()));
    shutdown_signal().await;
    tracing::info!(target: STATUS, "swarm agent stopping");
    cancel.cancel();
    watch_task.await.context("tracker check task")?;
    announcer.await.context("store announcer task")?;
    stage_task.await.context("stage task")?;
    follower.await.context("tracker list task")?;
    sampler.await.context("status sampler task")?;
    node.shutdown().await;
    disk_task.await.context("disk task")?;
    mirror_task.await.context("mirror task")?.context("mirror")?;
    if let Some(t) = metrics_task {
        t.await.context("metrics task")?.context("metrics")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_file_is_strict_and_flags_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            r#"
tracker = "master:7000"
zone = "rack-1"
upload_rate = "200Mbit/s"
download_rate = "20Mbit/s"
[upstream]
plain_http = ["registry.local:5000"]
[upstream.registries."docker.io"]
username = "u"
password = "p"
"#,
        )
        .expect("write");
        let args = |extra: &[&str]| {
            use clap::Parser;
            #[derive(clap::Parser)]
            struct W {
                #[command(flatten)]
                a: Args,
            }
            let mut v = vec!["agent", "--config", path.to_str().expect("utf8")];
            v.extend_from_slice(extra);
            W::parse_from(v).a
        };
        let s = settings(args(&["--zone", "rack-2", "--plain-http", "127.0.0.1:5000"])).expect("settings");
        assert_eq!(s.tracker, "master:7000");
        assert_eq!(s.zone, "rack-2");
        assert_eq!(s.mirror, DEFAULT_MIRROR);
        assert_eq!(s.upload_rate, Some(25_000_000));
        assert_eq!(s.download_rate, Some(2_500_000));
        assert_eq!(s.upstream.plain_http, vec!["registry.local:5000".to_string(), "127.0.0.1:5000".to_string()]);
        assert!(s.upstream.registries.contains_key("docker.io"));

        std::fs::write(&path, "tracker = \"m:1\"\nbogus = 1\n").expect("write");
        let err = settings(args(&[])).err().expect("unknown keys are refused");
        assert!(format!("{err:#}").contains("bogus"), "{err:#}");
    }
}
