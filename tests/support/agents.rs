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
        let r = super::http::request(self.metrics, "GET", "/metrics", &[]).await?;
        let text = String::from_utf8_lossy(&r.body).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).map(str::trim))
            .with_context(|| format!("metric {name} missing from:\n{text}"))?
            .parse()
            .context("metric value")
    }
}

/// A tracker plus agents sharing a token.
pub struct Cluster {
    pub tracker: ChildGuard,
    pub tracker_addr: SocketAddr,
    pub token_file: PathBuf,
    pub agents: Vec<Agent>,
    dir: PathBuf,
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
        mut extra: impl FnMut(usize, SocketAddr) -> Vec<std::ffi::OsString>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let token_file = dir.join("token");
        let out = Command::new(swarm_bin()).arg("token").output().context("swarm token")?;
        std::fs::write(&token_file, &out.stdout)?;
        let tracker_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let mut cmd = Command::new(swarm_bin());
        cmd.args(["tracker", "--listen", &tracker_addr.to_string(), "--announce-interval", "5s"])
            .arg("--token-file")
            .arg(&token_file)
            .env("SWARM_LOG", "info");
        let tracker = ChildGuard::spawn("tracker", cmd, &dir.join("logs"))?;
        let mut cluster = Self { tracker, tracker_addr, token_file, agents: Vec::new(), dir: dir.to_path_buf() };
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
        let mut cmd = Command::new(swarm_bin());
        cmd.args(["agent", "--tracker", &self.tracker_addr.to_string(), "--listen", "127.0.0.1:0"])
            .args(["--mirror", &mirror.to_string(), "--metrics", &metrics.to_string()])
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--token-file")
            .arg(&self.token_file)
            .env("SWARM_LOG", "info,swarm_peer=debug");
        for r in plain_http {
            cmd.args(["--plain-http", r]);
        }
        cmd.args(extra);
        let mut child = ChildGuard::spawn(&format!("agent-{i}"), cmd, &self.dir.join("logs"))?;
        wait_until(&format!("agent {i} mirror on {mirror}"), Duration::from_secs(20), &mut child, || tcp_open(mirror))?;
        self.agents.push(Agent { child, mirror, metrics, data_dir });
        Ok(())
    }

    /// Every agent's log tail, for assertion messages.
    pub fn logs(&self) -> String {
        self.agents.iter().enumerate().map(|(i, a)| format!("--- agent {i}\n{}\n", a.child.logs_tail())).collect()
    }
}
