//! `swarm`: share container-image blobs and files across a cluster, fetching each
//! from upstream once. `main` parses the command line, sets up logging and hands
//! over to one module per subcommand under `cmd/`.

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "swarm", version, about = "Peer-to-peer distribution of blobs inside a cluster")]
struct Cli {
    /// Log filter (tracing's env-filter syntax), e.g. `info`, `swarm_peer=debug`.
    #[arg(long, env = "SWARM_LOG", default_value = "warn", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the per-node agent: peer, piece store and containerd registry mirror.
    Agent(cmd::agent::Args),
    /// Run the tracker (on the master node).
    Tracker(cmd::tracker::Args),
    /// Share a file with the swarm until interrupted.
    Seed(cmd::seed::Args),
    /// Download a blob through the swarm.
    Pull(cmd::pull::Args),
    /// Run a tracker and several peers on loopback and show how a blob spreads.
    Demo(cmd::demo::Args),
    /// Print a new random cluster token.
    Token(cmd::token::Args),
    /// Write containerd hosts.toml files (or print k3s registries.yaml) that pull through the agent.
    ContainerdConfig(cmd::containerd_config::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Agent(a) => cmd::agent::run(a).await,
            Command::Tracker(a) => cmd::tracker::run(a).await,
            Command::Seed(a) => cmd::seed::run(a).await,
            Command::Pull(a) => cmd::pull::run(a).await,
            Command::Demo(a) => cmd::demo::run(a).await,
            Command::Token(a) => cmd::token::run(a),
            Command::ContainerdConfig(a) => cmd::containerd_config::run(a),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Library errors often repeat their source in their own message: print
            // each cause only when it adds something.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let text = cause.to_string();
                if !msg.contains(&text) {
                    msg.push_str(": ");
                    msg.push_str(&text);
                }
            }
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
