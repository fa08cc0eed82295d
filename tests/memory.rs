//! Memory at a blob's size (issue "Hardening", limits): an agent serving and pulling
//! a blob stays under 64 MiB RSS whatever the blob's size. Two real agents and a
//! tracker; a real registry holds a 1 GiB blob of random bytes. Both agents' mirrors
//! are asked for it, the second a second after the first: one agent takes the
//! upstream lease, feeds the swarm from the registry and serves its own mirror
//! client; the other gets the pieces from it over QUIC and serves its mirror client.
//! Both processes' peak resident memory (VmHWM) must stay at or below 64 MiB, and
//! both answers must hash to the blob's digest. `scripts/memory SIZE` runs the same measurement at any
//! size with the release binary.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use support::agents::Cluster;
use support::flood::MemorySampler;
use support::registry::copy_hashed;
use support::{Registry, require_tool, test_dir};
use swarm_proto::Digest;

const MIB: u64 = 1 << 20;
/// The bound on an agent's resident memory, whatever the blob's size.
const RSS_LIMIT_MIB: f64 = 64.0;
/// The blob's size: the largest that keeps the test near 90 s on a 2-core machine
/// (1 MiB pieces; 4 MiB pieces start above 2 GiB: `scripts/memory 4GiB`).
const BLOB: u64 = 1024 * MIB;

/// `len` pseudo-random bytes from a seed, generated as they are read.
struct RandomBytes {
    rng: rand::rngs::StdRng,
    left: u64,
}

impl Read for RandomBytes {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        self.rng.fill_bytes(&mut buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

/// A `GET url` by curl (a process of its own), its body hashed as it streams, never
/// held whole: the body's digest, its length and how long the answer took.
fn hashed_get(url: &str) -> anyhow::Result<(Digest, u64, Duration)> {
    let curl = require_tool("curl", "curl");
    let started = Instant::now();
    let mut child = Command::new(curl).args(["-sS", "--fail", url]).stdout(Stdio::piped()).spawn()?;
    let mut body = child.stdout.take().ok_or_else(|| anyhow::anyhow!("curl's stdout"))?;
    let (digest, len) = copy_hashed(&mut body, &mut std::io::sink())?;
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "curl {url} failed ({status}) after {len} bytes");
    Ok((digest, len, started.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_serving_and_one_pulling_a_1_gib_blob_stay_under_64_mib() {
    let dir = test_dir("memory");
    let registry = Registry::start(&dir.path().join("registry")).expect("registry");
    let repo = "edge/big";
    let random = RandomBytes { rng: rand::rngs::StdRng::seed_from_u64(12), left: BLOB };
    let (digest, len) = registry.push_blob(repo, random).expect("pushing the blob");
    assert_eq!(len, BLOB);
    let host = registry.host();
    let cluster = Cluster::start(&dir.path().join("swarm"), 2, &[&host]).expect("cluster");
    let samplers: Vec<_> = cluster.agents.iter().map(|a| MemorySampler::start(a.child.pid())).collect();
    let url = |mirror: std::net::SocketAddr| format!("http://{mirror}/v2/{repo}/blobs/{digest}?ns={host}");

    // Whichever agent asks the tracker first takes the lease (not always the first
    // asked: its start-up can take longer); the other swarms on it.
    let mut gets = Vec::new();
    for agent in &cluster.agents {
        let target = url(agent.mirror);
        gets.push(tokio::task::spawn_blocking(move || hashed_get(&target)));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let logs = || cluster.logs();
    let mut answers = Vec::new();
    for (i, get) in gets.into_iter().enumerate() {
        answers.push(get.await.expect("join").unwrap_or_else(|e| panic!("agent {i}'s mirror: {e:#}\n{}", logs())));
    }
    let role = |i: usize| {
        let holder = cluster.agents[i].child.stderr_text().contains("as the lease holder");
        format!(
            "agent {i} ({})",
            if holder { "upstream lease holder, serving the other" } else { "pulling from the other" }
        )
    };
    for (i, (got, got_len, took)) in answers.into_iter().enumerate() {
        let who = role(i);
        eprintln!(
            "{who}: its mirror answered {:.0} MiB in {:.1} s ({:.0} MiB/s)",
            got_len as f64 / MIB as f64,
            took.as_secs_f64(),
            got_len as f64 / MIB as f64 / took.as_secs_f64()
        );
        assert_eq!(got_len, BLOB, "{who}: its mirror sent {got_len} bytes of {BLOB}\n{}", logs());
        assert_eq!(got, digest, "{who}: its mirror sent the wrong bytes\n{}", logs());
    }
    let upstream_gets = registry.blob_get_count(&digest);
    let mut over = Vec::new();
    for (i, sampler) in samplers.iter().enumerate() {
        let (rss, hwm) = sampler.peaks_mib();
        eprintln!("{}: peak VmRSS sampled {rss:.1} MiB, VmHWM {hwm:.1} MiB", role(i));
        if hwm > RSS_LIMIT_MIB {
            over.push(format!("{}: VmHWM {hwm:.1} MiB", role(i)));
        }
    }
    eprintln!("registry GETs of the blob: {upstream_gets}");
    assert!(over.is_empty(), "over {RSS_LIMIT_MIB} MiB with a {BLOB}-byte blob: {over:?}\n{}", logs());
    assert_eq!(upstream_gets, 1, "one agent did not get the blob from the other\n{}", logs());
}
