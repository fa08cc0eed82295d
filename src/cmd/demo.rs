//! `swarm demo`: a tracker, one seed and N pullers in one process on loopback, with
//! a throwaway token. The seed shares a generated blob; every puller asks for it at
//! the same moment; the table shows who got their bytes from where and how the last
//! completion compares with the minimum distribution time (GUIDE.md section 5) for
//! the upload caps in force.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::{RngCore, SeedableRng};
use swarm_net::{ClusterToken, Endpoint, EndpointConfig};
use swarm_peer::node::{Node, NodeConfig};
use swarm_proto::PeerId;
use swarm_tracker::state::TrackerConfig;
use tokio_util::sync::CancellationToken;

use super::common::{human_bytes, mb_per_s, parse_rate, parse_size};

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
        "swarm demo: 1 seed + {} peers on loopback, blob {} ({}, {} pieces of {})",
        args.peers,
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

    for n in pullers.iter().chain(std::iter::once(&seed)) {
        n.shutdown().await;
    }
    cancel.cancel();
    let _ = tracker.await;
    Ok(())
}

fn rate_text(bytes_per_sec: u64) -> String {
    format!("{:.0} Mbit/s", bytes_per_sec as f64 * 8.0 / 1e6)
}

fn print_table(rows: &[Row], length: u64) {
    println!();
    println!(
        "{:<10} {:>9} {:>10} {:>12} {:>12} {:>12}",
        "peer", "time (s)", "MB/s", "from seed", "from peers", "uploaded"
    );
    for r in rows {
        println!(
            "{:<10} {:>9.2} {:>10.1} {:>12} {:>12} {:>12}",
            r.peer_id.short(),
            r.elapsed.as_secs_f64(),
            mb_per_s(length, r.elapsed),
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
