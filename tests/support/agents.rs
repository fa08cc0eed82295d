//! A tracker and `swarm agent`s as real processes of the `swarm` binary built with
//! the tests, on 127.0.0.1.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use super::process::{ChildGuard, free_port, tcp_open, wait_until};

/// The `swarm` binary under test.
pub fn swarm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_swarm"))
}

/// Writes a new cluster token (`swarm token`) to `path`.
pub fn write_token(path: &Path) -> anyhow::Result<()> {
    let out = Command::new(swarm_bin()).arg("token").output().context("swarm token")?;
    anyhow::ensure!(out.status.success(), "swarm token failed: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(path, &out.stdout).with_context(|| format!("writing {}", path.display()))
}

/// `swarm tracker` on `addr` (QUIC) and `http` (health and metrics), logging at info.
pub fn tracker_command(addr: SocketAddr, http: SocketAddr, token_file: &Path) -> Command {
    let mut cmd = Command::new(swarm_bin());
    cmd.args(["tracker", "--listen", &addr.to_string(), "--announce-interval", "5s"])
        .args(["--http-listen", &http.to_string()])
        .arg("--token-file")
        .arg(token_file)
        .env("SWARM_LOG", "info");
    cmd
}

/// `swarm agent` of the tracker at `tracker`, its mirror on `mirror` and metrics on
/// `metrics`, a QUIC port of its own choosing.
pub fn agent_command(
    tracker: SocketAddr,
    mirror: SocketAddr,
    metrics: SocketAddr,
    data_dir: &Path,
    token_file: &Path,
) -> Command {
    agent_command_of(&tracker.to_string(), mirror, metrics, data_dir, token_file)
}

/// Like [`agent_command`], with a `--tracker` list (`a:7000,b:7000`).
pub fn agent_command_of(
    trackers: &str,
    mirror: SocketAddr,
    metrics: SocketAddr,
    data_dir: &Path,
    token_file: &Path,
) -> Command {
    let mut cmd = Command::new(swarm_bin());
    cmd.args(["agent", "--tracker", trackers, "--listen", "127.0.0.1:0"])
        .args(["--mirror", &mirror.to_string(), "--metrics", &metrics.to_string()])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--token-file")
        .arg(token_file)
        .env("SWARM_LOG", "info,swarm_peer=debug");
    cmd
}

/// One agent process.
pub struct Agent {
    pub child: ChildGuard,
    pub mirror: SocketAddr,
    pub metrics: SocketAddr,
    pub data_dir: PathBuf,
}

impl Agent {
    /// `http://127.0.0.1:PORT`, for hosts.toml.
    pub fn mirror_url(&self) -> String {
        format!("http://{}", self.mirror)
    }

    /// Whether the agent's piece store holds the whole blob `digest`, its bytes
    /// hashing to the digest.
    pub fn stores_blob(&self, digest: &swarm_proto::Digest) -> bool {
        let path = self.data_dir.join("blobs").join(digest.hex()).join("data");
        std::fs::read(path).is_ok_and(|bytes| swarm_proto::Digest::of(&bytes) == *digest)
    }

    /// One metric's value from `/metrics` (labels included in `name`, e.g.
    /// `swarm_mirror_requests_total{outcome="ok"}`).
    pub async fn metric(&self, name: &str) -> anyhow::Result<u64> {
        metric(self.metrics, name).await
    }
}

/// One metric's value from `GET /metrics` on `addr` (labels included in `name`).
pub async fn metric(addr: SocketAddr, name: &str) -> anyhow::Result<u64> {
    let r = super::http::request(addr, "GET", "/metrics", &[]).await?;
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).map(str::trim))
        .with_context(|| format!("metric {name} missing from:\n{text}"))?
        .parse()
        .context("metric value")
}

/// A tracker plus agents sharing a token.
pub struct Cluster {
    pub tracker: ChildGuard,
    pub tracker_addr: SocketAddr,
    /// The tracker's `--http-listen` address (`/healthz`, `/readyz`, `/metrics`).
    pub tracker_http: SocketAddr,
    pub token_file: PathBuf,
    pub agents: Vec<Agent>,
    /// Further trackers of the same cluster ([`Cluster::start_replicated`]); the
    /// agents are given `tracker_addr` and these, as one `--tracker` list.
    pub replicas: Vec<Replica>,
    dir: PathBuf,
}

/// One more tracker process of a [`Cluster`].
pub struct Replica {
    pub child: ChildGuard,
    pub addr: SocketAddr,
    pub http: SocketAddr,
}

impl Cluster {
    /// Starts a tracker and `n` agents that reach the registries in `plain_http` over
    /// plain HTTP.
    pub fn start(dir: &Path, n: usize, plain_http: &[&str]) -> anyhow::Result<Self> {
        Self::start_with(dir, n, plain_http, |_, _| Vec::new())
    }

    /// Like [`Cluster::start`], with more arguments for agent `i` whose mirror will
    /// listen on the given address (`extra(i, mirror)`).
    pub fn start_with(
        dir: &Path,
        n: usize,
        plain_http: &[&str],
        extra: impl FnMut(usize, SocketAddr) -> Vec<std::ffi::OsString>,
    ) -> anyhow::Result<Self> {
        Self::start_full(dir, 1, &[], n, plain_http, extra)
    }

    /// Like [`Cluster::start_with`], the tracker started with `tracker_args` too
    /// (`--uplink-cap 40Mbit/s`, say).
    pub fn start_with_tracker_args(
        dir: &Path,
        tracker_args: &[&str],
        n: usize,
        plain_http: &[&str],
        extra: impl FnMut(usize, SocketAddr) -> Vec<std::ffi::OsString>,
    ) -> anyhow::Result<Self> {
        Self::start_full(dir, 1, tracker_args, n, plain_http, extra)
    }

    /// Like [`Cluster::start`] with `trackers` tracker processes (replicas sharing
    /// nothing); every agent gets all of them as its `--tracker` list.
    pub fn start_replicated(dir: &Path, trackers: usize, n: usize, plain_http: &[&str]) -> anyhow::Result<Self> {
        Self::start_full(dir, trackers, &[], n, plain_http, |_, _| Vec::new())
    }

    /// Every tracker's QUIC address, the first tracker's first.
    pub fn tracker_addrs(&self) -> Vec<SocketAddr> {
        std::iter::once(self.tracker_addr).chain(self.replicas.iter().map(|r| r.addr)).collect()
    }

    fn start_full(
        dir: &Path,
        trackers: usize,
        tracker_args: &[&str],
        n: usize,
        plain_http: &[&str],
        mut extra: impl FnMut(usize, SocketAddr) -> Vec<std::ffi::OsString>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let token_file = dir.join("token");
        write_token(&token_file)?;
        let tracker_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let tracker_http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let mut cmd = tracker_command(tracker_addr, tracker_http, &token_file);
        cmd.args(tracker_args);
        let tracker = ChildGuard::spawn("tracker", cmd, &dir.join("logs"))?;
        let mut replicas = Vec::new();
        for i in 1..trackers.max(1) {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
            let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
            let mut cmd = tracker_command(addr, http, &token_file);
            cmd.args(tracker_args);
            let child = ChildGuard::spawn(&format!("tracker-{i}"), cmd, &dir.join("logs"))?;
            replicas.push(Replica { child, addr, http });
        }
        let mut cluster = Self {
            tracker,
            tracker_addr,
            tracker_http,
            token_file,
            agents: Vec::new(),
            replicas,
            dir: dir.to_path_buf(),
        };
        for i in 0..n {
            let mirror: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
            let args = extra(i, mirror);
            cluster.add_agent(i, mirror, plain_http, &args)?;
        }
        Ok(cluster)
    }

    fn add_agent(
        &mut self,
        i: usize,
        mirror: SocketAddr,
        plain_http: &[&str],
        extra: &[std::ffi::OsString],
    ) -> anyhow::Result<()> {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let data_dir = self.dir.join(format!("agent-{i}"));
        let trackers: Vec<String> = self.tracker_addrs().iter().map(ToString::to_string).collect();
        let mut cmd = agent_command_of(&trackers.join(","), mirror, metrics, &data_dir, &self.token_file);
        for r in plain_http {
            cmd.args(["--plain-http", r]);
        }
        cmd.args(extra);
        let mut child = ChildGuard::spawn(&format!("agent-{i}"), cmd, &self.dir.join("logs"))?;
        wait_until(&format!("agent {i} mirror on {mirror}"), Duration::from_secs(20), &mut child, || tcp_open(mirror))?;
        self.agents.push(Agent { child, mirror, metrics, data_dir });
        Ok(())
    }

    /// Stops agent `i` (killed, as by a crash or a reboot) and starts it again on the
    /// same data directory and mirror address.
    pub fn restart_agent(&mut self, i: usize, plain_http: &[&str]) -> anyhow::Result<()> {
        self.restart_agent_with(i, plain_http, &[])
    }

    /// Like [`Cluster::restart_agent`], with more arguments for the new process.
    pub fn restart_agent_with(
        &mut self,
        i: usize,
        plain_http: &[&str],
        extra: &[std::ffi::OsString],
    ) -> anyhow::Result<()> {
        let old = self.agents.remove(i);
        let (mirror, data_dir) = (old.mirror, old.data_dir.clone());
        drop(old);
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let trackers: Vec<String> = self.tracker_addrs().iter().map(ToString::to_string).collect();
        let mut cmd = agent_command_of(&trackers.join(","), mirror, metrics, &data_dir, &self.token_file);
        for r in plain_http {
            cmd.args(["--plain-http", r]);
        }
        cmd.args(extra);
        let mut child = ChildGuard::spawn(&format!("agent-{i}-restarted"), cmd, &self.dir.join("logs"))?;
        wait_until(&format!("agent {i} mirror on {mirror}"), Duration::from_secs(20), &mut child, || tcp_open(mirror))?;
        self.agents.insert(i, Agent { child, mirror, metrics, data_dir });
        Ok(())
    }

    /// A `GET target` sent to every agent's mirror at once; the answers in agent order.
    pub fn get_everywhere(
        &self,
        target: &str,
    ) -> Vec<tokio::task::JoinHandle<anyhow::Result<super::http::RawResponse>>> {
        (self.agents.iter())
            .map(|a| {
                let (addr, target) = (a.mirror, target.to_string());
                tokio::spawn(async move { super::http::request(addr, "GET", &target, &[]).await })
            })
            .collect()
    }

    /// Every agent's and tracker's log tail, for assertion messages.
    pub fn logs(&self) -> String {
        let agents: String =
            self.agents.iter().enumerate().map(|(i, a)| format!("--- agent {i}\n{}\n", a.child.logs_tail())).collect();
        let replicas: String =
            self.replicas.iter().map(|r| format!("--- tracker {}\n{}\n", r.addr, r.child.logs_tail())).collect();
        agents + &replicas
    }
}

/// `swarm status ARGS --json` (which must succeed), parsed.
pub fn status_json(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut cmd = Command::new(swarm_bin());
    cmd.arg("status").args(args).arg("--json");
    let out = super::process::run(cmd, Duration::from_secs(20))?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).with_context(|| format!("swarm status {args:?} printed no JSON:\n{text}"))
}

/// The digests the tracker lists for the node `peer_id` in `swarm status --cluster`.
pub fn tracker_blobs_of(cluster: &Cluster, peer_id: &str) -> anyhow::Result<Vec<String>> {
    let token = cluster.token_file.to_str().context("utf8 token path")?;
    let view = status_json(&["--cluster", "--tracker", &cluster.tracker_addr.to_string(), "--token-file", token])?;
    let nodes = view["nodes"].as_array().context("nodes in the cluster view")?;
    Ok(nodes
        .iter()
        .find(|n| n["peer_id"] == peer_id)
        .and_then(|n| n["blobs"].as_array())
        .map(|b| b.iter().filter_map(|d| d.as_str().map(str::to_owned)).collect())
        .unwrap_or_default())
}

/// Allocated bytes of every file under `dir` (as `du`).
pub fn du(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}
