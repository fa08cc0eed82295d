//! `swarm status`: what a node or the whole cluster is doing.
//!
//! Two halves live here:
//!
//! - **The agent's `GET /status`** ([`router`], fed by [`StatusSource::sample`]): a JSON
//!   [`AgentStatus`] on the mirror's address, routed ahead of the mirror like
//!   `/healthz` (outside `/v2/`, never counted as a mirror request). Rates come from
//!   the agent sampling its byte counters every [`SAMPLE_EVERY`]: a rate is the
//!   change between the last two samples, so it is at most about two seconds old
//!   whenever it is asked for, and a single request gets it without waiting. The
//!   leases this node holds come from its tracker (a `ClusterView` request for the
//!   node's own blobs), since the node keeps that fact inside each blob's swarm.
//! - **The command**: `swarm status` prints the agent's JSON as a table (or as is
//!   with `--json`); `swarm status --cluster` asks one or more trackers over QUIC
//!   (authenticated with the cluster token) for their [`ClusterView`] and merges them.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use swarm_net::{Endpoint, EndpointConfig};
use swarm_peer::node::{DownloadState, Node, NodeStatus};
use swarm_proto::msg::{ClusterView, LeaseViewState};
use swarm_proto::{Digest, PeerId};
use swarm_tracker::TrackerClient;
use tokio_util::sync::CancellationToken;

use super::common::{TokenArgs, human_bytes};
use super::health::Readiness;

/// The agent's default mirror address, where `/status` is served.
pub const DEFAULT_AGENT: &str = "http://127.0.0.1:5001";
/// How often the agent samples its byte counters for rates.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Bound on fetching `/status` from the agent.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one tracker's answer to `--cluster` (connecting included).
const TRACKER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Base URL of the agent to ask (its mirror address).
    #[arg(long, env = "SWARM_AGENT", default_value = DEFAULT_AGENT, value_name = "URL")]
    agent: String,
    /// Print JSON instead of a table.
    #[arg(long, env = "SWARM_STATUS_JSON")]
    json: bool,
    /// Show the trackers' view of the whole cluster instead of one agent.
    #[arg(long, env = "SWARM_STATUS_CLUSTER", requires = "tracker")]
    cluster: bool,
    /// With --cluster: the tracker(s) to ask, comma-separated; their views are merged.
    #[arg(long, env = "SWARM_TRACKER", value_name = "HOST:PORT", value_delimiter = ',')]
    tracker: Vec<String>,
    #[command(flatten)]
    token: TokenArgs,
}

pub async fn run(args: Args) -> Result<()> {
    if args.cluster {
        let status = cluster_status(&args.tracker, &args.token).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&status)?);
        } else {
            print!("{}", cluster_table(&status));
        }
        return Ok(());
    }
    let status = fetch_agent(&args.agent).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", agent_table(&status));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The agent's endpoint.

/// `GET /status` of an agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStatus {
    /// This node's peer id (hex).
    pub peer_id: String,
    pub zone: String,
    /// The tracker the agent announces to.
    pub tracker: String,
    /// The UDP address of the agent's QUIC peer.
    pub listen: Option<String>,
    /// Whether `/readyz` answers ready.
    pub ready: bool,
    /// `ready`, or why not.
    pub readiness: String,
    /// Every blob the agent fetches or serves.
    pub blobs: Vec<BlobStatusJson>,
    pub totals: Totals,
    /// The blobs this node fetches from upstream as their lease holder, as its tracker
    /// says; `null` if the tracker could not be asked (see `leases_error`).
    pub leases: Option<Vec<LeaseJson>>,
    pub leases_error: Option<String>,
    pub cache: Cache,
    /// The span, in seconds, over which the rates were measured (`null` before the
    /// agent took two samples).
    pub rate_window_secs: Option<f64>,
}

/// One blob of an agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlobStatusJson {
    /// `sha256:<hex>`.
    pub digest: String,
    /// `running`, `complete` or `failed`.
    pub state: String,
    /// Why it failed, for `failed`.
    pub error: Option<String>,
    pub pieces: u32,
    pub piece_count: u32,
    /// Verified bytes held.
    pub bytes: u64,
    /// The blob's length.
    pub total: u64,
    /// Peers connected for this blob.
    pub peers: usize,
    /// Verified bytes per second gained lately (from peers or upstream).
    pub download_rate: Option<f64>,
}

/// Node-wide byte counters and rates.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Totals {
    /// Piece bytes received from peers and verified.
    pub downloaded: u64,
    /// Piece bytes sent to peers.
    pub uploaded: u64,
    /// Blob bytes fetched from upstream registries (as lease holder).
    pub from_upstream: u64,
    /// Pieces that failed verification.
    pub bad_pieces: u64,
    /// Bytes per second received (peers and upstream).
    pub download_rate: Option<f64>,
    /// Bytes per second sent to peers.
    pub upload_rate: Option<f64>,
    /// The agent's upload cap, bytes per second (`null`: none).
    pub upload_cap: Option<u64>,
}

/// An upstream lease this node holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseJson {
    pub digest: String,
    /// `live`, `expired` or `stalled`.
    pub state: String,
    /// Seconds since the tracker granted it to this node (`null`: not noted).
    pub held_secs: Option<f64>,
}

/// The piece store's disk use.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cache {
    /// The store directory.
    pub dir: String,
    /// Bytes on disk under `dir` (allocated blocks; `null` if unreadable).
    pub used: Option<u64>,
    /// The store's byte budget (`--cache-size` or its default share of the filesystem).
    pub budget: Option<u64>,
}

/// One sample of the counters, for rates.
#[derive(Clone)]
struct Sample {
    at: Instant,
    blobs: HashMap<Digest, u64>,
    received: u64,
    uploaded: u64,
}

impl Sample {
    fn of(status: &NodeStatus) -> Self {
        Self {
            at: Instant::now(),
            blobs: status.blobs.iter().map(|b| (b.digest, b.progress.bytes)).collect(),
            received: status.stats.downloaded() + status.stats.from_upstream,
            uploaded: status.stats.uploaded,
        }
    }
}

/// What `/status` reads: the node, the agent's readiness, a tracker client for the
/// leases and the last two samples. Cheap to clone.
#[derive(Clone)]
pub struct StatusSource {
    node: Node,
    readiness: Readiness,
    tracker: TrackerClient,
    samples: Arc<Mutex<(Option<Sample>, Option<Sample>)>>,
    budget: Option<u64>,
}

impl StatusSource {
    /// `tracker` should be a client with a short timeout: `/status` waits for it.
    pub fn new(node: Node, readiness: Readiness, tracker: TrackerClient) -> Self {
        Self { node, readiness, tracker, samples: Arc::new(Mutex::new((None, None))), budget: None }
    }

    /// The store's byte budget, reported as the cache's `budget`.
    pub fn with_budget(mut self, budget: u64) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Samples the counters every [`SAMPLE_EVERY`] until `cancel` fires.
    pub async fn sample(self, cancel: CancellationToken) {
        let mut ticks = tokio::time::interval(SAMPLE_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                _ = ticks.tick() => {
                    let sample = Sample::of(&self.node.status());
                    let mut s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
                    s.0 = s.1.take();
                    s.1 = Some(sample);
                }
            }
        }
    }

    async fn snapshot(&self) -> AgentStatus {
        let status = self.node.status();
        let (prev, last) = self.samples.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let window = match (&prev, &last) {
            (Some(p), Some(l)) => Some((p, l, l.at.saturating_duration_since(p.at).as_secs_f64().max(1e-3))),
            _ => None,
        };
        let rate = |f: &dyn Fn(&Sample) -> Option<u64>| {
            window.and_then(|(p, l, secs)| Some(f(l)?.saturating_sub(f(p)?) as f64 / secs))
        };
        let blobs = status
            .blobs
            .iter()
            .map(|b| {
                let p = &b.progress;
                let (state, error) = match &p.state {
                    DownloadState::Running => ("running", None),
                    DownloadState::Complete => ("complete", None),
                    DownloadState::Failed(why) => ("failed", Some(why.clone())),
                };
                BlobStatusJson {
                    digest: b.digest.to_string(),
                    state: state.into(),
                    error,
                    pieces: p.pieces,
                    piece_count: p.piece_count,
                    bytes: p.bytes,
                    total: p.total,
                    peers: p.peers,
                    download_rate: rate(&|s: &Sample| s.blobs.get(&b.digest).copied()),
                }
            })
            .collect();
        let totals = Totals {
            downloaded: status.stats.downloaded(),
            uploaded: status.stats.uploaded,
            from_upstream: status.stats.from_upstream,
            bad_pieces: status.stats.bad_pieces,
            download_rate: rate(&|s: &Sample| Some(s.received)),
            upload_rate: rate(&|s: &Sample| Some(s.uploaded)),
            upload_cap: status.upload_rate,
        };
        let (leases, leases_error) = match self.leases(&status).await {
            Ok(l) => (Some(l), None),
            Err(e) => (None, Some(e)),
        };
        let dir = status.data_dir.clone();
        let used = tokio::task::spawn_blocking(move || disk_use(&dir)).await.ok().flatten();
        let readiness = self.readiness.get();
        AgentStatus {
            peer_id: status.peer_id.to_string(),
            zone: status.zone.clone(),
            tracker: status.tracker.to_string(),
            listen: status.listen.map(|a| a.to_string()),
            ready: readiness.is_ok(),
            readiness: readiness.err().unwrap_or_else(|| "ready".into()),
            blobs,
            totals,
            leases,
            leases_error,
            cache: Cache { dir: status.data_dir.display().to_string(), used, budget: self.budget },
            rate_window_secs: window.map(|(_, _, secs)| secs),
        }
    }

    /// The upstream leases of this node's blobs that the tracker says it holds.
    async fn leases(&self, status: &NodeStatus) -> Result<Vec<LeaseJson>, String> {
        if status.blobs.is_empty() {
            return Ok(Vec::new());
        }
        let digests = status.blobs.iter().map(|b| b.digest).collect();
        let view = self.tracker.cluster_view(digests).await.map_err(|e| e.to_string())?;
        Ok(view
            .blobs
            .iter()
            .filter_map(|b| {
                let lease = b.lease.as_ref().filter(|l| l.holder == status.peer_id)?;
                Some(LeaseJson {
                    digest: b.digest.to_string(),
                    state: lease_state(lease.state).into(),
                    held_secs: lease.held_ms.map(|ms| ms as f64 / 1000.0),
                })
            })
            .collect())
    }
}

/// `GET /status` over `source`.
pub fn router(source: StatusSource) -> axum::Router {
    axum::Router::new().route(
        "/status",
        get(move || {
            let source = source.clone();
            async move {
                let status = source.snapshot().await;
                match serde_json::to_string_pretty(&status) {
                    Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body + "\n").into_response(),
                    Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                }
            }
        }),
    )
}

/// Bytes allocated on disk under `dir` (files not followed through symlinks); `None`
/// if `dir` cannot be read.
fn disk_use(dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    let mut first = true;
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(_) if !first => continue,
            Err(_) => return None,
        };
        first = false;
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total += meta.blocks() * 512;
            }
        }
    }
    Some(total)
}

fn lease_state(s: LeaseViewState) -> &'static str {
    match s {
        LeaseViewState::Live => "live",
        LeaseViewState::Expired => "expired",
        LeaseViewState::Stalled => "stalled",
    }
}

// ---------------------------------------------------------------------------------
// The command: one agent.

async fn fetch_agent(agent: &str) -> Result<AgentStatus> {
    let base = agent.trim_end_matches('/');
    if !base.starts_with("http://") && !base.starts_with("https://") {
        bail!("--agent {agent:?}: expected a URL such as {DEFAULT_AGENT}");
    }
    let url = format!("{base}/status");
    let client = reqwest::Client::builder().timeout(AGENT_TIMEOUT).build().context("HTTP client")?;
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("no agent answers at {base}: is `swarm agent` running? ({e})"))?;
    let code = resp.status();
    let body = resp.bytes().await.with_context(|| format!("reading {url}"))?;
    if !code.is_success() {
        bail!("{url} answered {code}: is this a `swarm agent` of this version (its mirror address)?");
    }
    serde_json::from_slice(&body).with_context(|| format!("{url} did not answer an agent status"))
}

fn agent_table(s: &AgentStatus) -> String {
    let mut out = String::new();
    let zone = if s.zone.is_empty() { "-" } else { &s.zone };
    out += &format!(
        "node {}  zone {}  peer {}  tracker {}  {}\n\n",
        short_peer(&s.peer_id),
        zone,
        s.listen.as_deref().unwrap_or("-"),
        s.tracker,
        if s.ready { "ready".to_string() } else { format!("NOT READY: {}", s.readiness) }
    );
    let mut rows = vec![vec![
        "BLOB".to_string(),
        "STATE".into(),
        "PIECES".into(),
        "BYTES".into(),
        "DONE".into(),
        "PEERS".into(),
        "DOWN".into(),
    ]];
    for b in &s.blobs {
        let pct = if b.total == 0 { 100.0 } else { b.bytes as f64 * 100.0 / b.total as f64 };
        let state = match &b.error {
            Some(why) => format!("{} ({why})", b.state),
            None => b.state.clone(),
        };
        rows.push(vec![
            short_digest(&b.digest),
            state,
            format!("{}/{}", b.pieces, b.piece_count),
            format!("{} / {}", human_bytes(b.bytes), human_bytes(b.total)),
            format!("{pct:.0}%"),
            b.peers.to_string(),
            human_rate(b.download_rate),
        ]);
    }
    if s.blobs.is_empty() {
        out += "no blobs\n";
    } else {
        out += &table(&rows);
    }
    let t = &s.totals;
    out += &format!(
        "\ntotals: downloaded {} from peers, {} from upstream, uploaded {}; now {} down, {} up{}\n",
        human_bytes(t.downloaded),
        human_bytes(t.from_upstream),
        human_bytes(t.uploaded),
        human_rate(t.download_rate),
        human_rate(t.upload_rate),
        match t.upload_cap {
            Some(cap) => format!(" (upload cap {})", human_rate(Some(cap as f64))),
            None => String::new(),
        }
    );
    out += &match (&s.leases, &s.leases_error) {
        (Some(l), _) if l.is_empty() => "leases held: none\n".to_string(),
        (Some(l), _) => {
            let list: Vec<String> =
                l.iter().map(|l| format!("{} ({}{})", short_digest(&l.digest), l.state, held(l.held_secs))).collect();
            format!("leases held: {}\n", list.join(", "))
        }
        (None, e) => format!("leases held: unknown ({})\n", e.as_deref().unwrap_or("tracker not asked")),
    };
    let used = s.cache.used.map_or_else(|| "unknown".to_string(), human_bytes);
    let budget = match s.cache.budget {
        Some(b) => format!("of a budget of {}", human_bytes(b)),
        None => "no budget set".into(),
    };
    out += &format!("cache: {used} used in {}, {budget}\n", s.cache.dir);
    out
}

// ---------------------------------------------------------------------------------
// The command: the cluster.

/// `swarm status --cluster`: the trackers' views, merged.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Each tracker asked, and whether it answered.
    pub trackers: Vec<TrackerJson>,
    /// Every node any tracker tracks, by peer id.
    pub nodes: Vec<NodeJson>,
    /// Every blob any tracker knows, by digest.
    pub blobs: Vec<ClusterBlobJson>,
    /// Whether a tracker left something out (its reply caps).
    pub truncated: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrackerJson {
    pub address: String,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeJson {
    pub peer_id: String,
    /// The address other peers dial.
    pub address: String,
    pub zone: String,
    /// Seconds since its last announce (the most recent over all trackers).
    pub last_seen_secs: f64,
    /// The digests of the blobs it holds or fetches.
    pub blobs: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterBlobJson {
    pub digest: String,
    /// Length in bytes, once known.
    pub size: Option<u64>,
    pub piece_count: Option<u32>,
    /// Piece hashes the tracker knows (all once the blob is registered).
    pub known_hashes: u32,
    pub holders: Vec<HolderJson>,
    /// Holders with every piece.
    pub complete: usize,
    pub lease: Option<ClusterLeaseJson>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HolderJson {
    pub peer_id: String,
    /// Pieces it announced holding.
    pub have: u32,
    pub complete: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterLeaseJson {
    pub holder: String,
    /// `live`, `expired` or `stalled`.
    pub state: String,
    /// Seconds since the holder was granted it (`null`: the tracker did not note it).
    pub held_secs: Option<f64>,
}

async fn cluster_status(trackers: &[String], token: &TokenArgs) -> Result<ClusterStatus> {
    let trackers: Vec<&str> = trackers.iter().map(|t| t.trim()).filter(|t| !t.is_empty()).collect();
    if trackers.is_empty() {
        bail!("--cluster needs --tracker HOST:PORT[,HOST:PORT...] (or SWARM_TRACKER)");
    }
    let token = token.load()?;
    let mut asks = Vec::new();
    let mut addrs = Vec::new();
    for t in &trackers {
        for addr in super::common::resolve_trackers(t).await? {
            if !addrs.iter().any(|(_, a)| *a == addr) {
                addrs.push((addr.to_string(), addr));
            }
        }
    }
    let trackers: Vec<String> = addrs.iter().map(|(name, _)| name.clone()).collect();
    for (_, addr) in addrs {
        let unspecified = match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let endpoint = Endpoint::bind(SocketAddr::new(unspecified, 0), token.clone(), &EndpointConfig::default())
            .context("binding a UDP port to reach the tracker")?;
        let client = TrackerClient::with_timeout(endpoint.clone(), addr, TRACKER_TIMEOUT);
        asks.push(async move {
            let r = client.cluster_view(Vec::new()).await;
            endpoint.close();
            r
        });
    }
    let answers = futures_util::future::join_all(asks).await;
    let mut views = Vec::new();
    let mut report = Vec::new();
    for (t, answer) in trackers.iter().zip(answers) {
        match answer {
            Ok(view) => {
                views.push(view);
                report.push(TrackerJson { address: t.to_string(), error: None });
            }
            Err(e) => report.push(TrackerJson { address: t.to_string(), error: Some(e.to_string()) }),
        }
    }
    if views.is_empty() {
        let why: Vec<String> = report.iter().filter_map(|t| t.error.clone()).collect();
        bail!("no tracker answered: {}", why.join("; "));
    }
    let mut status = merge(views);
    status.trackers = report;
    Ok(status)
}

/// Merges tracker views ([`swarm_tracker::client::merge_views`]: nodes by peer id,
/// the latest sighting winning; blobs by digest) and lists each node's blobs.
fn merge(views: Vec<ClusterView>) -> ClusterStatus {
    let merged = swarm_tracker::client::merge_views(views);
    let truncated = merged.truncated;
    let mut nodes: BTreeMap<PeerId, (swarm_proto::msg::NodeView, Vec<String>)> =
        merged.nodes.into_iter().map(|n| (n.peer_id, (n, Vec::new()))).collect();
    let mut blobs: BTreeMap<Digest, swarm_proto::msg::BlobView> =
        merged.blobs.into_iter().map(|b| (b.digest, b)).collect();
    for b in blobs.values_mut() {
        b.holders.sort_by_key(|h| h.peer_id);
        for h in &b.holders {
            if let Some((_, held)) = nodes.get_mut(&h.peer_id) {
                held.push(b.digest.to_string());
            }
        }
    }
    ClusterStatus {
        trackers: Vec::new(),
        nodes: nodes
            .into_values()
            .map(|(n, blobs)| NodeJson {
                peer_id: n.peer_id.to_string(),
                address: n.addr.to_string(),
                zone: n.zone,
                last_seen_secs: n.last_seen_ms as f64 / 1000.0,
                blobs,
            })
            .collect(),
        blobs: blobs
            .into_values()
            .map(|b| ClusterBlobJson {
                digest: b.digest.to_string(),
                size: b.layout.map(|l| l.length),
                piece_count: b.layout.map(|l| l.piece_count()),
                known_hashes: b.known_hashes,
                complete: b.holders.iter().filter(|h| h.complete).count(),
                holders: b
                    .holders
                    .iter()
                    .map(|h| HolderJson { peer_id: h.peer_id.to_string(), have: h.have, complete: h.complete })
                    .collect(),
                lease: b.lease.map(|l| ClusterLeaseJson {
                    holder: l.holder.to_string(),
                    state: lease_state(l.state).into(),
                    held_secs: l.held_ms.map(|ms| ms as f64 / 1000.0),
                }),
            })
            .collect(),
        truncated,
    }
}

fn cluster_table(s: &ClusterStatus) -> String {
    let mut out = String::new();
    for t in &s.trackers {
        match &t.error {
            None => out += &format!("tracker {}: answered\n", t.address),
            Some(e) => out += &format!("tracker {}: NO ANSWER ({e})\n", t.address),
        }
    }
    out += &format!("\nNODES ({})\n", s.nodes.len());
    let mut rows = vec![vec!["PEER".to_string(), "ADDRESS".into(), "ZONE".into(), "LAST SEEN".into(), "BLOBS".into()]];
    for n in &s.nodes {
        rows.push(vec![
            short_peer(&n.peer_id),
            n.address.clone(),
            if n.zone.is_empty() { "-".into() } else { n.zone.clone() },
            format!("{:.0}s ago", n.last_seen_secs),
            n.blobs.iter().map(|d| short_digest(d)).collect::<Vec<_>>().join(" "),
        ]);
    }
    out += &table(&rows);
    out += &format!("\nBLOBS ({})\n", s.blobs.len());
    let mut rows = vec![vec![
        "BLOB".to_string(),
        "SIZE".into(),
        "PIECES".into(),
        "HOLDERS".into(),
        "COMPLETE".into(),
        "LEASE".into(),
    ]];
    for b in &s.blobs {
        let lease = match &b.lease {
            Some(l) => format!("{} ({}{})", short_peer(&l.holder), l.state, held(l.held_secs)),
            None => "-".into(),
        };
        rows.push(vec![
            short_digest(&b.digest),
            b.size.map_or_else(|| "?".into(), human_bytes),
            b.piece_count.map_or_else(|| "?".into(), |n| n.to_string()),
            b.holders
                .iter()
                .map(|h| {
                    let what = if h.complete { "all".to_string() } else { h.have.to_string() };
                    format!("{}:{what}", short_peer(&h.peer_id))
                })
                .collect::<Vec<_>>()
                .join(" "),
            format!("{}/{}", b.complete, b.holders.len()),
            lease,
        ]);
    }
    out += &table(&rows);
    if s.truncated {
        out += "\n(a tracker's reply was capped: some nodes or blobs are left out; use --json for what was sent)\n";
    }
    out
}

// ---------------------------------------------------------------------------------
// Formatting.

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(c, cell)| format!("{cell:<w$}", w = widths[c])).collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out
}

/// Bytes per second in decimal units (`12.3 MB/s`), `-` when unknown.
fn human_rate(bytes_per_sec: Option<f64>) -> String {
    let Some(v) = bytes_per_sec else { return "-".into() };
    const UNITS: [&str; 4] = ["B/s", "kB/s", "MB/s", "GB/s"];
    let mut v = v.max(0.0);
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 { format!("{v:.0} {}", UNITS[0]) } else { format!("{v:.1} {}", UNITS[u]) }
}

fn held(secs: Option<f64>) -> String {
    secs.map_or_else(String::new, |s| format!(", held {s:.0}s"))
}

/// `sha256:` and the first 12 hex digits.
fn short_digest(d: &str) -> String {
    let hex = d.strip_prefix("sha256:").unwrap_or(d);
    format!("sha256:{}", hex.chars().take(12).collect::<String>())
}

/// The first 8 hex digits of a peer id (as in the logs).
fn short_peer(p: &str) -> String {
    p.chars().take(8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarm_proto::Layout;
    use swarm_proto::msg::{BlobView, HolderView, LeaseView, NodeView};

    #[test]
    fn rates_use_decimal_units() {
        assert_eq!(human_rate(None), "-");
        assert_eq!(human_rate(Some(999.0)), "999 B/s");
        assert_eq!(human_rate(Some(12_345_678.0)), "12.3 MB/s");
        assert_eq!(human_rate(Some(2.5e9)), "2.5 GB/s");
    }

    #[test]
    fn columns_line_up() {
        let t = table(&[vec!["A".into(), "BB".into()], vec!["ccc".into(), "d".into()]]);
        assert_eq!(t, "A    BB\nccc  d\n");
    }

    #[test]
    fn views_merge_by_peer_and_digest() {
        let (a, b) = (PeerId([1; 16]), PeerId([2; 16]));
        let d = Digest([9; 32]);
        let node = |peer_id, zone: &str, last_seen_ms| NodeView {
            peer_id,
            addr: "127.0.0.1:7001".parse().expect("addr"),
            zone: zone.into(),
            last_seen_ms,
        };
        let blob = |holders, lease| BlobView {
            digest: d,
            layout: Some(Layout { digest: d, length: 1 << 20, piece_length: 1 << 18 }),
            known_hashes: 4,
            holders,
            lease,
        };
        let one = ClusterView {
            nodes: vec![node(a, "old", 9000), node(b, "z", 100)],
            blobs: vec![blob(
                vec![HolderView { peer_id: a, have: 1, complete: false }],
                Some(LeaseView { holder: a, state: LeaseViewState::Expired, held_ms: None }),
            )],
            truncated: false,
        };
        let two = ClusterView {
            nodes: vec![node(a, "new", 10)],
            blobs: vec![blob(
                vec![
                    HolderView { peer_id: a, have: 3, complete: false },
                    HolderView { peer_id: b, have: 4, complete: true },
                ],
                Some(LeaseView { holder: b, state: LeaseViewState::Live, held_ms: Some(2000) }),
            )],
            truncated: false,
        };
        let s = merge(vec![one, two]);
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.nodes[0].zone, "new", "the latest sighting wins");
        assert_eq!(s.nodes[0].blobs, vec![d.to_string()]);
        assert_eq!(s.blobs.len(), 1);
        let holders: Vec<(u32, bool)> = s.blobs[0].holders.iter().map(|h| (h.have, h.complete)).collect();
        assert_eq!(holders, vec![(3, false), (4, true)]);
        assert_eq!(s.blobs[0].complete, 1);
        let lease = s.blobs[0].lease.as_ref().expect("lease");
        assert_eq!((lease.holder.as_str(), lease.state.as_str()), (b.to_string().as_str(), "live"));
        assert!(cluster_table(&s).contains("1/2"));
    }
}
