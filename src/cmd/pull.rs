//! `swarm pull sha256:DIGEST -o FILE`: download a blob through the swarm, serving
//! pieces to others meanwhile, and write it to FILE once its digest is verified.
//!
//! Without `--data-dir`, pieces collect in `FILE.swarm/` next to the output; running
//! the same command again after an interruption resumes from the verified pieces
//! there. On success the blob is moved to FILE and the directory removed; on a failure
//! before any piece was verified it is removed too, since there is nothing to resume.
//!
//! `--timeout` bounds the whole pull, including the wait for the tracker to learn the
//! blob (someone must be seeding it).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use swarm_proto::Digest;

use super::common::{
    NodeArgs, explain_node_error, human_bytes, mb_per_s, mib_per_s, parse_duration, plural, shutdown_signal,
};
use swarm_peer::node::{NodeConfig, NodeError};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The blob to fetch, as `sha256:<64 hex digits>` (what `swarm seed` printed).
    digest: String,
    /// Where to write the blob.
    #[arg(short, long, env = "SWARM_OUTPUT", value_name = "FILE")]
    output: PathBuf,
    /// Piece store directory (default: FILE.swarm next to the output, removed on success).
    #[arg(long, env = "SWARM_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Keep serving the blob to other peers this long after it is complete.
    #[arg(long, env = "SWARM_LINGER", value_parser = parse_duration, value_name = "DURATION")]
    linger: Option<Duration>,
    /// Give up if the blob is not complete after this long.
    #[arg(long, env = "SWARM_TIMEOUT", value_parser = parse_duration, default_value = "1h", value_name = "DURATION")]
    timeout: Duration,
    /// Print the summary as one JSON object instead of a sentence.
    #[arg(long, env = "SWARM_JSON")]
    json: bool,
    #[command(flatten)]
    node: NodeArgs,
}

pub async fn run(args: Args) -> Result<()> {
    let digest: Digest = args.digest.parse().context("the blob to pull")?;
    let (data_dir, scratch) = match &args.data_dir {
        Some(d) => (d.clone(), false),
        None => (partial_dir(&args.output), true),
    };
    let scratch_existed = data_dir.exists();
    let mut config = NodeConfig::new(data_dir.clone());
    // The wait for the tracker to learn the blob counts against --timeout.
    config.metainfo_wait = args.timeout;
    let started = Instant::now();
    let node = match args.node.start_with(config).await {
        Ok(node) => node,
        Err(e) => {
            if scratch && !scratch_existed {
                let _ = std::fs::remove_dir_all(&data_dir);
            }
            return Err(e);
        }
    };
    let verified = AtomicU32::new(0);
    let outcome = tokio::select! {
        r = pull(&node, digest, &args, started, &verified) => r,
        _ = shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    let summary = match outcome {
        Ok(s) => s,
        Err(e) => {
            node.shutdown().await;
            let kept = verified.load(Ordering::Relaxed);
            if kept == 0 {
                if scratch {
                    let _ = std::fs::remove_dir_all(&data_dir);
                }
                return Err(e);
            }
            bail!(
                "{e:#}; {} verified and kept in {}: run the same command again to resume",
                plural(u64::from(kept), "piece"),
                data_dir.display()
            );
        }
    };
    let stored = node.store().root().join("blobs").join(digest.hex()).join("data");
    if scratch {
        // The output lives next to the scratch directory: a rename, no copy. The open
        // file keeps serving while lingering.
        std::fs::rename(&stored, &args.output)
            .with_context(|| format!("moving the blob to {}", args.output.display()))?;
    } else {
        place_copy(&stored, &args.output)?;
    }
    print_summary(&summary, &args)?;
    if let Some(linger) = args.linger {
        eprintln!("serving {digest} to other peers for {}", humantime::format_duration(linger));
        tokio::select! {
            _ = tokio::time::sleep(linger) => {}
            _ = shutdown_signal() => {}
        }
    }
    node.shutdown().await;
    if scratch {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    Ok(())
}

fn partial_dir(output: &Path) -> PathBuf {
    let mut name = output.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".swarm");
    output.with_file_name(name)
}

/// Puts a finished blob from the store at `output`: a hard link when possible,
/// else a copy, written under a temporary name and renamed into place.
fn place_copy(stored: &Path, output: &Path) -> Result<()> {
    let tmp = output.with_extension("swarm-tmp");
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(stored, &tmp).is_err() {
        std::fs::copy(stored, &tmp).with_context(|| format!("copying the blob to {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, output).with_context(|| format!("moving the blob to {}", output.display()))
}

struct Summary {
    digest: Digest,
    length: u64,
    elapsed: Duration,
    resumed: u64,
    downloaded: u64,
    uploaded: u64,
    peers_used: usize,
}

async fn pull(
    node: &swarm_peer::node::Node,
    digest: Digest,
    args: &Args,
    started: Instant,
    verified: &AtomicU32,
) -> Result<Summary> {
    let mut download = node.fetch(digest).await.map_err(|e| match e {
        NodeError::UnknownBlob { digest, waited } => anyhow::anyhow!(
            "the tracker does not know {digest} after {}: is a `swarm seed` for it running?",
            humantime::format_duration(Duration::from_secs(waited.as_secs_f64().round() as u64))
        ),
        other => explain_node_error(other),
    })?;
    let length = download.layout().length;
    let mut progress = download.progress();
    let first = progress.borrow().clone();
    verified.store(first.pieces, Ordering::Relaxed);
    let resumed = first.bytes;
    let bar = if args.json { ProgressBar::hidden() } else { ProgressBar::new(first.total) };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(first.bytes);
    let deadline = tokio::time::sleep_until((started + args.timeout).into());
    tokio::pin!(deadline);
    let finished = download.finished();
    tokio::pin!(finished);
    loop {
        tokio::select! {
            r = &mut finished => {
                bar.finish_and_clear();
                r?;
                break;
            }
            _ = progress.changed() => {
                let p = progress.borrow_and_update().clone();
                verified.store(p.pieces, Ordering::Relaxed);
                bar.set_position(p.bytes);
                bar.set_message(plural(p.peers as u64, "peer"));
            }
            _ = &mut deadline => {
                bar.abandon();
                let p = progress.borrow().clone();
                verified.store(p.pieces, Ordering::Relaxed);
                bail!(
                    "timed out after {} with {} of {} pieces ({} connected)",
                    humantime::format_duration(args.timeout), p.pieces, p.piece_count, plural(p.peers as u64, "peer")
                );
            }
        }
    }
    let stats = node.stats();
    Ok(Summary {
        digest,
        length,
        elapsed: started.elapsed(),
        resumed,
        downloaded: stats.downloaded(),
        uploaded: stats.uploaded,
        peers_used: stats.downloaded_from.values().filter(|b| **b > 0).count(),
    })
}

fn print_summary(s: &Summary, args: &Args) -> Result<()> {
    if args.json {
        let v = serde_json::json!({
            "digest": s.digest.to_string(),
            "bytes": s.length,
            "seconds": s.elapsed.as_secs_f64(),
            "mb_per_s": mb_per_s(s.length - s.resumed, s.elapsed),
            "resumed_bytes": s.resumed,
            "downloaded_bytes": s.downloaded,
            "uploaded_bytes": s.uploaded,
            "peers_used": s.peers_used,
            "output": args.output.display().to_string(),
        });
        println!("{v}");
    } else {
        let resumed = if s.resumed > 0 {
            format!(", {} already verified from an earlier run", human_bytes(s.resumed))
        } else {
            String::new()
        };
        println!(
            "pulled {} ({}) in {:.2} s at {:.1} MiB/s from {}{}; uploaded {} meanwhile; wrote {}",
            s.digest,
            human_bytes(s.length),
            s.elapsed.as_secs_f64(),
            mib_per_s(s.length - s.resumed, s.elapsed),
            plural(s.peers_used as u64, "peer"),
            resumed,
            human_bytes(s.uploaded),
            args.output.display()
        );
    }
    Ok(())
}
