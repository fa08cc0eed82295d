//! `swarm stage IMAGE`: puts an image's blobs on every selected node ahead of a
//! rollout, pinned, and shows each node's progress; `swarm stage --release IMAGE`
//! unpins them.
//!
//! The command gives every tracker the order (`Stage`); agents long-poll their
//! trackers (`WaitStage`) and start within a round trip (see `swarm_peer::stage` for
//! what an agent does). The command then polls the trackers' `StageStatus` every
//! [`POLL_EVERY`], merges their views (agents by peer id, the freshest sighting and
//! the report on this very order), re-sends the order to a tracker that lost it
//! (restarted), and draws a table (redrawn in place on a terminal; `--json` prints one
//! JSON document at the end). It exits 0 when every selected agent seen in the last
//! three announce intervals holds every blob (or, for `--release`, has unpinned),
//! and fails with a reason per node when one failed or at `--timeout`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use swarm_net::{Endpoint, EndpointConfig};
use swarm_peer::stage::ImageRef;
use swarm_proto::msg::{StageAgentView, StageOrder, StageState};
use swarm_tracker::TrackerClient;

use super::common::{TokenArgs, human_bytes, parse_duration, resolve_trackers};

/// How often the trackers are asked for progress.
pub const POLL_EVERY: Duration = Duration::from_millis(500);
/// Bound on one tracker request.
const TRACKER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the command waits for a first staging agent before it gives up.
const NO_AGENT_GRACE: Duration = Duration::from_secs(15);
/// How long the command goes on while no tracker answers.
const TRACKERS_GONE: Duration = Duration::from_secs(30);
/// The default pin TTL.
pub const DEFAULT_PIN: &str = "24h";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The image, by tag or digest (REGISTRY/REPOSITORY:TAG or ...@sha256:...).
    #[arg(env = "SWARM_STAGE_IMAGE", value_name = "IMAGE")]
    image: String,
    /// The tracker(s), comma-separated (every tracker of the cluster gets the order).
    #[arg(long, env = "SWARM_TRACKER", value_name = "HOST:PORT", value_delimiter = ',', required = true)]
    tracker: Vec<String>,
    /// Stage only on the agents of this zone (repeatable; with --node: either).
    #[arg(long, env = "SWARM_STAGE_ZONE", value_name = "ZONE", value_delimiter = ',')]
    zone: Vec<String>,
    /// Stage only on this node: its host name, or its peer id (at least 8 hex digits)
    /// (repeatable).
    #[arg(long, env = "SWARM_STAGE_NODE", value_name = "NAME", value_delimiter = ',')]
    node: Vec<String>,
    /// How long the staged blobs stay pinned (never evicted), unless released first.
    #[arg(long, env = "SWARM_STAGE_PIN", default_value = DEFAULT_PIN, value_parser = parse_duration, value_name = "DURATION")]
    pin: Duration,
    /// Give up (exit non-zero) if not every node is done by then.
    #[arg(long, env = "SWARM_STAGE_TIMEOUT", default_value = "30m", value_parser = parse_duration, value_name = "DURATION")]
    timeout: Duration,
    /// Print one JSON document at the end instead of the table.
    #[arg(long, env = "SWARM_STAGE_JSON")]
    json: bool,
    /// Unpin what staging IMAGE pinned instead of staging it.
    #[arg(long, env = "SWARM_STAGE_RELEASE")]
    release: bool,
    #[command(flatten)]
    token: TokenArgs,
}

/// The `--json` document.
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    /// The image reference, normalised (`registry/repository:tag` or `...@sha256:...`).
    pub image: String,
    pub release: bool,
    /// The order's id: when it was issued, in ms since the Unix epoch.
    pub issued_ms: u64,
    /// End of the pins, seconds since the Unix epoch.
    pub pin_until_secs: u64,
    /// Whether every selected node is done (the exit status is 0).
    pub ok: bool,
    pub elapsed_secs: f64,
    pub trackers: Vec<TrackerReport>,
    /// Every selected agent seen in the last three announce intervals.
    pub nodes: Vec<NodeReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrackerReport {
    pub address: String,
    /// Why this tracker could not be asked, if so.
    pub error: Option<String>,
}

/// One node's part.
#[derive(Clone, Debug, Serialize)]
pub struct NodeReport {
    pub peer_id: String,
    pub name: String,
    pub zone: String,
    pub addr: String,
    pub last_seen_ms: u64,
    /// `waiting` (no report on this order yet), `resolving`, `fetching`, `done`,
    /// `failed` or `released`.
    pub state: String,
    /// Why the node's part failed or is not done.
    pub reason: Option<String>,
    /// The image manifest of the node's platform (`sha256:...`).
    pub manifest: Option<String>,
    pub blobs: u32,
    pub blobs_held: u32,
    pub bytes: u64,
    pub bytes_held: u64,
}

impl NodeReport {
    fn finished(&self, release: bool) -> bool {
        if release { self.state == "released" } else { self.state == "done" }
    }
}

pub async fn run(args: Args) -> Result<()> {
    let image = normalise(&args.image)?;
    let token = args.token.load()?;
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for t in args.tracker.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        for a in resolve_trackers(t).await? {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
    }
    if addrs.is_empty() {
        bail!("no tracker: pass --tracker HOST:PORT[,HOST:PORT...] (or SWARM_TRACKER)");
    }
    let unspecified = match addrs[0].ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let endpoint = Endpoint::bind(SocketAddr::new(unspecified, 0), token, &EndpointConfig::default())
        .context("binding a UDP port to reach the trackers")?;
    let client = TrackerClient::with_trackers(endpoint.clone(), addrs.clone(), TRACKER_TIMEOUT);
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).context("the system clock")?;
    let order = StageOrder {
        image: image.clone(),
        zones: args.zone.iter().map(|z| z.trim().to_string()).filter(|z| !z.is_empty()).collect(),
        nodes: args.node.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect(),
        pin_until_secs: (now + args.pin).as_secs(),
        release: args.release,
        issued_ms: u64::try_from(now.as_millis()).unwrap_or(u64::MAX),
    };
    let result = follow(&client, &addrs, &order, &args).await;
    endpoint.close();
    result
}

/// `registry/repository:tag` or `registry/repository@sha256:...`: one key per image
/// however it was written.
fn normalise(image: &str) -> Result<String> {
    let r = ImageRef::parse(image).map_err(anyhow::Error::msg)?;
    let sep = if r.reference.starts_with("sha256:") { '@' } else { ':' };
    Ok(format!("{}/{}{sep}{}", r.registry, r.repository, r.reference))
}

/// Sends the order, then polls until done, failed or timed out.
async fn follow(client: &TrackerClient, addrs: &[SocketAddr], order: &StageOrder, args: &Args) -> Result<()> {
    let started = Instant::now();
    let sends = futures_util::future::join_all(addrs.iter().map(|t| client.stage(*t, order))).await;
    let mut trackers: Vec<TrackerReport> = Vec::new();
    for (t, r) in addrs.iter().zip(&sends) {
        trackers.push(TrackerReport { address: t.to_string(), error: r.as_ref().err().map(ToString::to_string) });
    }
    if sends.iter().all(Result::is_err) {
        let why: Vec<String> = trackers.iter().map(|t| t.error.clone().unwrap_or_default()).collect();
        bail!("no tracker took the stage order: {}", why.join("; "));
    }
    let verb = if order.release { "releasing" } else { "staging" };
    if !args.json {
        eprintln!("{verb} {} on {}", order.image, selection(order));
    }
    let live = !args.json && std::io::stdout().is_terminal();
    let mut drawn_lines = 0usize;
    let mut last_text = String::new();
    let mut answered = Instant::now();
    loop {
        let (report, any) = poll(client, addrs, order, started, &mut trackers).await;
        if any {
            answered = Instant::now();
        }
        let all_seen = answered.elapsed() < TRACKERS_GONE;
        let text = table(&report);
        if live {
            // Move up over the previous table and draw the new one.
            if drawn_lines > 0 {
                print!("\x1b[{drawn_lines}A\x1b[J");
            }
            print!("{text}");
            drawn_lines = text.lines().count();
        } else if !args.json && text != last_text {
            print!("{text}");
        }
        last_text = text;
        let timed_out = started.elapsed() >= args.timeout;
        let nodes = &report.nodes;
        let all_final = !nodes.is_empty() && nodes.iter().all(|n| n.finished(order.release) || n.state == "failed");
        let nobody = nodes.is_empty() && started.elapsed() >= NO_AGENT_GRACE;
        if report.ok || all_final || timed_out || nobody || !all_seen {
            let mut report = report;
            if !report.ok && timed_out {
                for n in report.nodes.iter_mut().filter(|n| !n.finished(order.release)) {
                    n.reason.get_or_insert_with(|| {
                        format!("not done within --timeout {}", humantime::format_duration(args.timeout))
                    });
                }
            }
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if !live {
                // The final state, once (a non-terminal got every change already).
                if table(&report) != last_text {
                    print!("{}", table(&report));
                }
            }
            return finish(&report, order, nobody, all_seen, args.timeout);
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// The exit status and its message.
fn finish(report: &StageReport, order: &StageOrder, nobody: bool, all_seen: bool, timeout: Duration) -> Result<()> {
    let verb = if order.release { "released" } else { "staged" };
    if !all_seen {
        let why: Vec<String> =
            report.trackers.iter().filter_map(|t| t.error.as_ref().map(|e| format!("{}: {e}", t.address))).collect();
        bail!("no tracker answered for {}: {}", humantime::format_duration(TRACKERS_GONE), why.join("; "));
    }
    if nobody {
        bail!(
            "no staging agent is selected by {} among those the trackers saw in the last three announce \
             intervals (are the agents running this swarm version, connected to these trackers?)",
            selection(order)
        );
    }
    if report.ok {
        if !order.release {
            eprintln!("{} {verb} on {} node(s) in {:.1}s", report.image, report.nodes.len(), report.elapsed_secs);
        }
        return Ok(());
    }
    let failed: Vec<String> = report
        .nodes
        .iter()
        .filter(|n| !n.finished(order.release))
        .map(|n| format!("{} ({}): {}", display_name(n), &n.peer_id[..8], n.reason.as_deref().unwrap_or(&n.state)))
        .collect();
    let when = if report.elapsed_secs >= timeout.as_secs_f64() { " (timed out)" } else { "" };
    bail!(
        "{} not {verb} on {} of {} node(s){when}:\n  {}",
        report.image,
        failed.len(),
        report.nodes.len(),
        failed.join("\n  ")
    )
}

/// What the order selects, in words.
fn selection(order: &StageOrder) -> String {
    if order.zones.is_empty() && order.nodes.is_empty() {
        return "every node".into();
    }
    let mut parts = Vec::new();
    if !order.zones.is_empty() {
        parts.push(format!("zone {}", order.zones.join(", ")));
    }
    if !order.nodes.is_empty() {
        parts.push(format!("node {}", order.nodes.join(", ")));
    }
    parts.join(" or ")
}

/// One round: every tracker's status, merged; re-sends the order to a tracker that
/// lacks it. Returns the report and whether any tracker answered.
async fn poll(
    client: &TrackerClient,
    addrs: &[SocketAddr],
    order: &StageOrder,
    started: Instant,
    trackers: &mut [TrackerReport],
) -> (StageReport, bool) {
    let answers = futures_util::future::join_all(addrs.iter().map(|t| client.stage_status(*t, &order.image))).await;
    let mut agents: BTreeMap<swarm_proto::PeerId, StageAgentView> = BTreeMap::new();
    let mut ttl_ms = u64::MAX;
    let mut any = false;
    for ((addr, answer), report) in addrs.iter().zip(answers).zip(trackers.iter_mut()) {
        let status = match answer {
            Ok(s) => s,
            Err(e) => {
                report.error = Some(e.to_string());
                continue;
            }
        };
        any = true;
        report.error = None;
        if status.order.as_ref().is_none_or(|o| o.issued_ms < order.issued_ms) {
            // A tracker that restarted lost the order: give it again.
            if let Err(e) = client.stage(*addr, order).await {
                report.error = Some(e.to_string());
            }
        }
        ttl_ms = ttl_ms.min(u64::from(status.interval_secs) * 3000);
        for a in status.agents {
            let ours = |v: &StageAgentView| v.progress.as_ref().is_some_and(|p| p.issued_ms == order.issued_ms);
            match agents.get_mut(&a.agent.peer_id) {
                Some(held) => {
                    let seen = held.last_seen_ms.min(a.last_seen_ms);
                    if ours(&a) && !ours(held) || a.last_seen_ms < held.last_seen_ms && ours(&a) == ours(held) {
                        *held = a;
                    }
                    held.last_seen_ms = seen;
                }
                None => {
                    agents.insert(a.agent.peer_id, a);
                }
            }
        }
    }
    let nodes: Vec<NodeReport> = agents
        .into_values()
        .filter(|a| a.last_seen_ms <= ttl_ms)
        .filter(|a| order.selects(&a.agent.name, &a.agent.zone, &a.agent.peer_id))
        .map(|a| node_report(a, order))
        .collect();
    let ok = !nodes.is_empty() && nodes.iter().all(|n| n.finished(order.release));
    let report = StageReport {
        image: order.image.clone(),
        release: order.release,
        issued_ms: order.issued_ms,
        pin_until_secs: order.pin_until_secs,
        ok,
        elapsed_secs: started.elapsed().as_secs_f64(),
        trackers: trackers.to_vec(),
        nodes,
    };
    (report, any)
}

fn node_report(a: StageAgentView, order: &StageOrder) -> NodeReport {
    let progress = a.progress.filter(|p| p.issued_ms == order.issued_ms);
    let (state, reason) = match progress.as_ref().map(|p| &p.state) {
        None => ("waiting", Some("no report on this order yet".to_string())),
        Some(StageState::Resolving) => ("resolving", None),
        Some(StageState::Fetching) => ("fetching", None),
        Some(StageState::Done) => ("done", None),
        Some(StageState::Failed { reason }) => ("failed", Some(reason.clone())),
        Some(StageState::Released) => ("released", None),
    };
    let p = progress.as_ref();
    NodeReport {
        peer_id: a.agent.peer_id.to_string(),
        name: a.agent.name,
        zone: a.agent.zone,
        addr: a.addr.to_string(),
        last_seen_ms: a.last_seen_ms,
        state: state.to_string(),
        reason,
        manifest: p.and_then(|p| p.manifest).map(|m| m.to_string()),
        blobs: p.map_or(0, |p| p.blobs),
        blobs_held: p.map_or(0, |p| p.blobs_held),
        bytes: p.map_or(0, |p| p.bytes),
        bytes_held: p.map_or(0, |p| p.bytes_held),
    }
}

fn display_name(n: &NodeReport) -> &str {
    if n.name.is_empty() { "-" } else { &n.name }
}

/// The live table.
fn table(report: &StageReport) -> String {
    let mut rows = vec![[
        "NODE".to_string(),
        "PEER".into(),
        "ZONE".into(),
        "STATE".into(),
        "BLOBS".into(),
        "BYTES".into(),
        "DETAIL".into(),
    ]];
    for n in &report.nodes {
        let detail = match (&n.reason, &n.manifest) {
            (Some(r), _) => r.clone(),
            (None, Some(m)) => m.clone(),
            _ => String::new(),
        };
        rows.push([
            display_name(n).to_string(),
            n.peer_id.chars().take(8).collect(),
            if n.zone.is_empty() { "-".into() } else { n.zone.clone() },
            n.state.clone(),
            format!("{}/{}", n.blobs_held, n.blobs),
            format!("{}/{}", human_bytes(n.bytes_held), human_bytes(n.bytes)),
            detail,
        ]);
    }
    let mut widths = [0usize; 7];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(widths).enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if report.nodes.is_empty() {
        out.push_str("(no staging agent seen yet)\n");
    }
    let failed = report.trackers.iter().filter(|t| t.error.is_some());
    for t in failed {
        out.push_str(&format!("tracker {}: {}\n", t.address, t.error.as_deref().unwrap_or_default()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_one_line_per_node_with_the_reason_of_a_failure() {
        let node = |name: &str, state: &str, held: u64, reason: Option<&str>| NodeReport {
            peer_id: "3f2a91c0".repeat(4),
            name: name.into(),
            zone: "rack-a".into(),
            addr: "192.0.2.1:7001".into(),
            last_seen_ms: 10,
            state: state.into(),
            reason: reason.map(Into::into),
            manifest: Some("sha256:9b1c".into()),
            blobs: 5,
            blobs_held: if held > 0 { 5 } else { 0 },
            bytes: 2 << 30,
            bytes_held: held,
        };
        let report = StageReport {
            image: "quay.io/kairos/core:v3".into(),
            release: false,
            issued_ms: 1,
            pin_until_secs: 2,
            ok: false,
            elapsed_secs: 1.0,
            trackers: vec![TrackerReport { address: "192.0.2.10:7000".into(), error: Some("down".into()) }],
            nodes: vec![node("master", "done", 2 << 30, None), node("worker2", "failed", 0, Some("cannot fit"))],
        };
        let text = table(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NODE     PEER      ZONE    STATE   BLOBS  BYTES              DETAIL");
        assert_eq!(lines[1], "master   3f2a91c0  rack-a  done    5/5    2.00 GiB/2.00 GiB  sha256:9b1c");
        assert_eq!(lines[2], "worker2  3f2a91c0  rack-a  failed  0/5    0 B/2.00 GiB       cannot fit");
        assert_eq!(lines[3], "tracker 192.0.2.10:7000: down");
    }

    #[test]
    fn one_key_per_image_however_it_is_written() {
        assert_eq!(normalise("ubuntu").expect("ubuntu"), "docker.io/library/ubuntu:latest");
        assert_eq!(normalise("docker.io/library/ubuntu:latest").expect("full"), "docker.io/library/ubuntu:latest");
        let d = format!("sha256:{}", "b".repeat(64));
        assert_eq!(normalise(&format!("10.0.0.5:5000/os:v1@{d}")).expect("digest"), format!("10.0.0.5:5000/os@{d}"));
        assert!(normalise("UPPER").is_err());
    }
}
