//! `swarm seed FILE`: hash a file, register it with the tracker and serve it until
//! interrupted.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::common::{NodeArgs, explain_node_error, human_bytes, shutdown_signal};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The file to share. It is served where it lies, not copied.
    file: PathBuf,
    /// Directory for the node's piece store (blobs this node downloads later).
    #[arg(long, env = "SWARM_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    node: NodeArgs,
}

pub async fn run(args: Args) -> Result<()> {
    // Check the token and addresses before spending time hashing.
    args.node.token.load()?;
    let len = std::fs::metadata(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?.len();
    let bar = ProgressBar::new(len).with_style(
        ProgressStyle::with_template("hashing {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let done = Arc::new(AtomicU64::new(0));
    let path = args.file.clone();
    let counter = done.clone();
    let hashing = tokio::task::spawn_blocking(move || {
        swarm_peer::store::hash_file(&path, |n| counter.store(n, Ordering::Relaxed))
    });
    tokio::pin!(hashing);
    let metainfo = loop {
        tokio::select! {
            r = &mut hashing => break r.context("hashing task")??,
            _ = tokio::time::sleep(Duration::from_millis(100)) => bar.set_position(done.load(Ordering::Relaxed)),
        }
    };
    bar.finish_and_clear();
    // Without --data-dir the store is a scratch directory removed on exit.
    let scratch;
    let data_dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            scratch =
                tempfile::Builder::new().prefix("swarm-seed-").tempdir().context("creating a scratch directory")?;
            scratch.path().to_path_buf()
        }
    };
    let node = args.node.start(data_dir).await?;
    if let Err(e) = node.seed(&args.file, metainfo.clone()).await {
        node.shutdown().await;
        return Err(explain_node_error(e).context("registering the file with the tracker"));
    }
    println!("{}", metainfo.digest);
    eprintln!(
        "seeding {} ({}, {} pieces of {}) from {} on {}; Ctrl-C to stop",
        metainfo.digest,
        human_bytes(metainfo.length),
        metainfo.piece_count(),
        human_bytes(u64::from(metainfo.piece_length)),
        args.file.display(),
        node.local_addr()?,
    );
    shutdown_signal().await;
    let stats = node.stats();
    eprintln!(
        "stopping; uploaded {} ({:.2} copies)",
        human_bytes(stats.uploaded),
        stats.uploaded as f64 / metainfo.length as f64
    );
    node.shutdown().await;
    Ok(())
}
