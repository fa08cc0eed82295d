//! Memory at a blob's size (issue "Hardening", limits): an agent serving and pulling
//! a blob stays under 64 MiB RSS whatever the blob's size. Two real agents and a
//! tracker; a real registry holds a 1 GiB blob of random bytes. The first agent's
//! mirror is asked for it (it takes the upstream lease, feeds the swarm from the
//! registry and serves its own mirror client); then the second agent's (it gets the
//! pieces from the first over QUIC and serves its mirror client). Both processes'
//! peak resident memory (VmHWM) must stay at or below 64 MiB, and both answers must
//! hash to the blob's digest. `scripts/memory SIZE` runs the same measurement at any
//! size with the release binary.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use sha2::Digest as _;
use support::agents::Cluster;
use support::flood::MemorySampler;
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
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = body.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "curl {url} failed ({status}) after {len} bytes");
    Ok((Digest(hasher.finalize().into()), len, started.elapsed()))
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
    let (server, puller) = (&cluster.agents[0], &cluster.agents[1]);
    let samplers =
        [("serving", MemorySampler::start(server.child.pid())), ("pulling", MemorySampler::start(puller.child.pid()))];
    let url = |mirror: std::net::SocketAddr| format!("http://{mirror}/v2/{repo}/blobs/{digest}?ns={host}");

    // The first agent takes the lease and starts the upstream fetch; the second asks
    // once the first is under way, so it pulls from the first over the swarm.
    let first_url = url(server.mirror);
    let first = tokio::task::spawn_blocking(move || hashed_get(&first_url));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second_url = url(puller.mirror);
    let second = tokio::task::spawn_blocking(move || hashed_get(&second_url));
    let logs = || cluster.logs();
    let first = first.await.expect("join").unwrap_or_else(|e| panic!("serving agent's mirror: {e:#}\n{}", logs()));
    let second = second.await.expect("join").unwrap_or_else(|e| panic!("pulling agent's mirror: {e:#}\n{}", logs()));

    for (who, (got, got_len, took)) in [("serving", first), ("pulling", second)] {
        eprintln!(
            "{who} agent's mirror answered {:.0} MiB in {:.1} s ({:.0} MiB/s)",
            got_len as f64 / MIB as f64,
            took.as_secs_f64(),
            got_len as f64 / MIB as f64 / took.as_secs_f64()
        );
        assert_eq!(got_len, BLOB, "{who} agent's mirror sent {got_len} bytes of {BLOB}\n{}", logs());
        assert_eq!(got, digest, "{who} agent's mirror sent the wrong bytes\n{}", logs());
    }
    let upstream_gets = registry.blob_get_count(&digest);
    let mut over = Vec::new();
    for (who, sampler) in &samplers {
        let (rss, hwm) = sampler.peaks_mib();
        eprintln!("{who} agent: peak VmRSS sampled {rss:.1} MiB, VmHWM {hwm:.1} MiB");
        if hwm > RSS_LIMIT_MIB {
            over.push(format!("{who} agent: VmHWM {hwm:.1} MiB"));
        }
    }
    eprintln!("registry GETs of the blob: {upstream_gets}");
    assert!(over.is_empty(), "over {RSS_LIMIT_MIB} MiB with a {BLOB}-byte blob: {over:?}\n{}", logs());
    assert_eq!(upstream_gets, 1, "the pulling agent did not get the blob from the serving one\n{}", logs());
}
