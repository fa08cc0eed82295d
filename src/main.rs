//! `swarm`: share container-image blobs and files across a cluster, fetching each
//! from upstream once. `main` parses the command line, sets up logging and hands
//! over to one module per subcommand under `cmd/`.

mod cmd;
mod malloc;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "swarm", version, about = "Peer-to-peer distribution of blobs inside a cluster")]
struct Cli {
    /// Log filter (tracing's env-filter syntax), e.g. `info`, `swarm_peer=debug`.
    #[arg(long, env = "SWARM_LOG", default_value = "warn", global = true)]
    log: String,
    /// Log line format: `text` (colours only when stderr is a terminal) or `json`
    /// (one object per line, for log collectors).
    #[arg(long, env = "SWARM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
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
    /// Put an image's blobs on every node ahead of a rollout, pinned (or --release them).
    Stage(cmd::stage::Args),
    /// Show what the local agent (or, with --cluster, the whole cluster) is doing.
    Status(cmd::status::Args),
    /// Print a new random cluster token.
    Token(cmd::token::Args),
    /// Write containerd hosts.toml files (or print k3s registries.yaml) that pull through the agent.
    ContainerdConfig(cmd::containerd_config::Args),
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines; ANSI colours only when stderr is a terminal.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`, `spans`).
    Json,
}

/// The target of the daemons' status lines (listening, tracker reachable, stopping):
/// shown at `info` whatever `--log` says, unless `--log` names this target itself.
pub const STATUS: &str = "swarm::status";

/// Installs the global tracing subscriber: `filter` in env-filter syntax, lines on
/// stderr. Colours are used only when stderr is a terminal, so journald and log
/// collectors get plain text.
fn init_logging(filter: &str, format: LogFormat) -> Result<(), String> {
    let mut directives = filter.to_string();
    if !filter.contains(STATUS) {
        directives = format!("{filter},{STATUS}=info");
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .map_err(|e| format!("invalid --log (SWARM_LOG) filter {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(true).init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    // Before anything allocates or starts a thread: may re-execute this binary.
    malloc::fix_mmap_threshold();
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli.log, cli.log_format) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let json = cli.log_format == LogFormat::Json;
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(target: STATUS, "cannot start the async runtime: {e}");
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
            Command::Status(a) => cmd::status::run(a).await,
            Command::Stage(a) => cmd::stage::run(a).await,
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
            if json {
                tracing::error!(target: STATUS, "{msg}");
            } else {
                eprintln!("error: {msg}");
            }
            ExitCode::FAILURE
        }
    }
}
