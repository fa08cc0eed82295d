//! `swarm demo`: a tracker, one seed and N pullers in one process on loopback, with
//! a throwaway token. The seed shares a generated blob; every puller asks for it at
//! the same moment; the table shows who got their bytes from where and how the last
//! completion compares with the minimum distribution time (GUIDE.md section 5) for
//! the upload caps in force.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::{RngCore, SeedableRng};
use swarm_net::{ClusterToken, Endpoint, EndpointConfig};
use swarm_peer::agent::SwarmProvider;
use swarm_peer::mirror::{self, MirrorConfig, MirrorMetrics};
use swarm_peer::node::{Node, NodeConfig, NodeStats};
use swarm_peer::upstream::{UpstreamClient, UpstreamConfig};
use swarm_proto::{Digest, PeerId};
use swarm_tracker::state::TrackerConfig;
use tokio_util::sync::CancellationToken;

use super::common::{human_bytes, mib_per_s, parse_rate, parse_size, plural};
use super::demo_upstream;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Number of pulling peers (the seed comes on top).
    #[arg(long, env = "SWARM_DEMO_PEERS", default_value_t = 8)]
    peers: usize,
    /// Size of the generated blob.
    #[arg(long, env = "SWARM_DEMO_SIZE", default_value = "64MiB", value_parser = parse_size)]
    size: u64,
    /// Upload cap of the seed (the "uplink").
    #[arg(long, default_value = "100Mbit/s", value_parser = parse_rate)]
    seed_rate: u64,
    /// Upload cap of every pulling peer.
    #[arg(long, default_value = "200Mbit/s", value_parser = parse_rate)]
    peer_rate: u64,
    /// Lift the upload caps and run at loopback speed (no minimum time to compare with).
    #[arg(long)]
    unlimited: bool,
}

struct Row {
    peer_id: PeerId,
    elapsed: Duration,
    from_seed: u64,
    from_peers: u64,
    uploaded: u64,
}

pub async fn run(args: Args) -> Result<()> {
    if args.peers == 0 {
        bail!("--peers must be at least 1");
    }
    let dir = tempfile::Builder::new().prefix("swarm-demo-").tempdir().context("creating a scratch directory")?;
    let token = ClusterToken::generate();
    let loopback = "127.0.0.1:0".parse().context("loopback address")?;
    let endpoint_config = EndpointConfig::default();

    let tracker_endpoint = Endpoint::bind(loopback, token.clone(), &endpoint_config)?;
    let tracker_addr = tracker_endpoint.local_addr()?;
    let cancel = CancellationToken::new();
    let tracker =
        tokio::spawn(swarm_tracker::server::serve(tracker_endpoint, TrackerConfig::default(), cancel.clone()));

    let blob_path = dir.path().join("blob");
    generate_blob(&blob_path, args.size)?;
    let metainfo = {
        let p = blob_path.clone();
        tokio::task::spawn_blocking(move || swarm_peer::store::hash_file(&p, |_| {})).await??
    };
    let cap = |rate: u64| if args.unlimited { None } else { Some(rate) };

    let mut seed_config = NodeConfig::new(dir.path().join("seed"));
    seed_config.upload_rate = cap(args.seed_rate);
    let seed = Node::start(Endpoint::bind(loopback, token.clone(), &endpoint_config)?, tracker_addr, seed_config)?;
    seed.seed(&blob_path, metainfo.clone()).await?;

    let mut pullers = Vec::new();
    for i in 0..args.peers {
        let mut config = NodeConfig::new(dir.path().join(format!("peer-{i}")));
        config.upload_rate = cap(args.peer_rate);
        pullers.push(Node::start(Endpoint::bind(loopback, token.clone(), &endpoint_config)?, tracker_addr, config)?);
    }
    println!(
        "swarm demo: 1 seed + {} on loopback, blob {} ({}, {} pieces of {})",
        plural(args.peers as u64, "peer"),
        metainfo.digest,
        human_bytes(metainfo.length),
        metainfo.piece_count(),
        human_bytes(u64::from(metainfo.piece_length))
    );
    if args.unlimited {
        println!("upload caps: none");
    } else {
        println!("upload caps: seed {}, peers {}", rate_text(args.seed_rate), rate_text(args.peer_rate));
    }

    let started = Instant::now();
    let mut tasks = Vec::new();
    for node in &pullers {
        let node = node.clone();
        let digest = metainfo.digest;
        tasks.push(tokio::spawn(async move {
            let mut d = node.fetch(digest).await?;
            d.finished().await?;
            Ok::<_, swarm_peer::node::NodeError>(started.elapsed())
        }));
    }
    let mut elapsed = Vec::new();
    for t in tasks {
        elapsed.push(t.await.context("puller task")?.context("a puller failed")?);
    }
    let seed_id = seed.peer_id();
    let rows: Vec<Row> = pullers
        .iter()
        .zip(&elapsed)
        .map(|(n, e)| {
            let s = n.stats();
            let from_seed = s.downloaded_from.get(&seed_id).copied().unwrap_or(0);
            Row {
                peer_id: n.peer_id(),
                elapsed: *e,
                from_seed,
                from_peers: s.downloaded() - from_seed,
                uploaded: s.uploaded,
            }
        })
        .collect();
    let seed_sent = seed.stats().uploaded;

    // Every copy must be byte-identical to the original.
    for n in &pullers {
        let copy = n.store().root().join("blobs").join(metainfo.digest.hex()).join("data");
        if !same_content(&blob_path, &copy)? {
            bail!("peer {} holds a copy that differs from the original", n.peer_id().short());
        }
    }

    print_table(&rows, metainfo.length);
    let last = elapsed.iter().max().copied().unwrap_or_default();
    println!();
    println!(
        "seed sent {} = {:.2}x the blob (direct downloads would send {}x)",
        human_bytes(seed_sent),
        seed_sent as f64 / metainfo.length as f64,
        args.peers
    );
    println!("every copy is byte-identical to the original and matched {}", metainfo.digest);
    if args.unlimited {
        println!("last peer finished after {:.2} s (no caps, so no minimum time to compare with)", last.as_secs_f64());
    } else {
        let f = metainfo.length as f64;
        let n = args.peers as f64;
        let (us, ui) = (args.seed_rate as f64, args.peer_rate as f64);
        let t_min = (f / us).max(n * f / (us + n * ui));
        println!(
            "last peer finished after {:.2} s; minimum distribution time {:.2} s = max(F/u_seed, N*F/(u_seed + N*u_peer)); ratio {:.2}",
            last.as_secs_f64(),
            t_min,
            last.as_secs_f64() / t_min
        );
    }

    mirror_phase(&args, &pullers, dir.path(), &cancel).await?;

    for n in pullers.iter().chain(std::iter::once(&seed)) {
        n.shutdown().await;
    }
    cancel.cancel();
    let _ = tracker.await;
    Ok(())
}

/// The containerd path: an in-process upstream registry with a generated image, and
/// every peer pulling it through its own registry mirror at the same moment.
async fn mirror_phase(args: &Args, pullers: &[Node], dir: &Path, cancel: &CancellationToken) -> Result<()> {
    let half = (args.size / 2).max(1);
    let quarter = (args.size / 4).max(1);
    let image = Arc::new(demo_upstream::Image::generate("demo/os", "v1", &[half, quarter, quarter]));
    let rate = if args.unlimited { None } else { Some(args.seed_rate) };
    let upstream = demo_upstream::start(image.clone(), rate, cancel.clone()).await?;
    let ns = upstream.addr.to_string();
    let config = UpstreamConfig { plain_http: vec![ns.clone()], ..UpstreamConfig::default() };
    let mut mirrors = Vec::new();
    for (i, node) in pullers.iter().enumerate() {
        let client = UpstreamClient::new(config.clone())?;
        let provider = Arc::new(SwarmProvider::new(node.clone(), client.clone()));
        let metrics = Arc::new(MirrorMetrics::default());
        let router = mirror::router(provider, client, MirrorConfig::new(dir.join(format!("manifests-{i}"))), metrics);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        mirrors.push(listener.local_addr()?);
        tokio::spawn(mirror::serve(listener, router, cancel.clone()));
    }
    println!();
    println!(
        "containerd path: an upstream registry (capped at {}) serves image {}/{}:{} ({} in {} blobs);",
        rate.map(rate_text).unwrap_or_else(|| "no cap".into()),
        ns,
        image.name,
        image.tag,
        human_bytes(image.blob_bytes()),
        image.blobs.len()
    );
    println!("every peer pulls it through its own registry mirror at the same moment");
    let before: Vec<NodeStats> = pullers.iter().map(Node::stats).collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for addr in &mirrors {
        let (addr, image, ns) = (*addr, image.clone(), ns.clone());
        tasks.push(tokio::spawn(async move {
            pull_through_mirror(addr, &image, &ns).await?;
            Ok::<_, anyhow::Error>(started.elapsed())
        }));
    }
    let mut elapsed = Vec::new();
    for t in tasks {
        elapsed.push(t.await.context("mirror pull task")??);
    }
    println!();
    println!("{:<10} {:>9} {:>14} {:>12} {:>12}", "peer", "time (s)", "from upstream", "from peers", "uploaded");
    for ((n, b), e) in pullers.iter().zip(&before).zip(&elapsed) {
        let s = n.stats();
        println!(
            "{:<10} {:>9.2} {:>14} {:>12} {:>12}",
            n.peer_id().short(),
            e.as_secs_f64(),
            human_bytes(s.from_upstream - b.from_upstream),
            human_bytes(s.downloaded() - b.downloaded()),
            human_bytes(s.uploaded - b.uploaded)
        );
    }
    let f = image.blob_bytes() as f64;
    let sent = upstream.sent.load(std::sync::atomic::Ordering::Relaxed);
    let last = elapsed.iter().max().copied().unwrap_or_default();
    println!();
    println!(
        "the upstream registry sent {} = {:.2}x the image's blobs (direct pulls would send {}x); every blob matched its digest",
        human_bytes(sent),
        sent as f64 / f,
        pullers.len()
    );
    if let Some(us) = rate {
        let n = pullers.len() as f64;
        let t_min = (f / us as f64).max(n * f / (us as f64 + n * args.peer_rate as f64));
        println!(
            "last peer finished after {:.2} s; minimum distribution time {:.2} s; ratio {:.2}",
            last.as_secs_f64(),
            t_min,
            last.as_secs_f64() / t_min
        );
    } else {
        println!("last peer finished after {:.2} s", last.as_secs_f64());
    }
    Ok(())
}

/// What containerd does, reduced: resolve the tag, fetch the manifest, fetch every
/// blob it names, and check each against its digest.
async fn pull_through_mirror(mirror: SocketAddr, image: &demo_upstream::Image, ns: &str) -> Result<()> {
    let client = reqwest::Client::new();
    let base = format!("http://{mirror}/v2/{}", image.name);
    let manifest = client
        .get(format!("{base}/manifests/{}?ns={ns}", image.tag))
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).context("manifest JSON")?;
    let mut digests = vec![manifest["config"]["digest"].as_str().unwrap_or_default().to_string()];
    if let Some(layers) = manifest["layers"].as_array() {
        digests.extend(layers.iter().map(|l| l["digest"].as_str().unwrap_or_default().to_string()));
    }
    let fetches = digests.into_iter().map(|d| {
        let (client, url) = (client.clone(), format!("{base}/blobs/{d}?ns={ns}"));
        async move {
            let expected: Digest = d.parse().context("digest in the manifest")?;
            let body = client.get(url).send().await?.error_for_status()?.bytes().await?;
            anyhow::ensure!(Digest::of(&body) == expected, "blob {expected} came back with other content");
            Ok(())
        }
    });
    for r in futures_util::future::join_all(fetches).await {
        r?;
    }
    Ok(())
}

fn rate_text(bytes_per_sec: u64) -> String {
    format!("{:.0} Mbit/s", bytes_per_sec as f64 * 8.0 / 1e6)
}

fn print_table(rows: &[Row], length: u64) {
    println!();
    println!(
        "{:<10} {:>9} {:>10} {:>12} {:>12} {:>12}",
        "peer", "time (s)", "MiB/s", "from seed", "from peers", "uploaded"
    );
    for r in rows {
        println!(
            "{:<10} {:>9.2} {:>10.1} {:>12} {:>12} {:>12}",
            r.peer_id.short(),
            r.elapsed.as_secs_f64(),
            mib_per_s(length, r.elapsed),
            human_bytes(r.from_seed),
            human_bytes(r.from_peers),
            human_bytes(r.uploaded)
        );
    }
}

fn generate_blob(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

fn same_content(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let mut fa = std::fs::File::open(a)?;
    let mut fb = std::fs::File::open(b).with_context(|| format!("opening {}", b.display()))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = fa.read(&mut ba)?;
        let mut nb = 0;
        while nb < na {
            let k = fb.read(&mut bb[nb..na])?;
            if k == 0 {
                return Ok(false);
            }
            nb += k;
        }
        if ba[..na] != bb[..na] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(fb.read(&mut bb)? == 0);
        }
    }
}
