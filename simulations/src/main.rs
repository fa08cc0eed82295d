//! `swarm-sim`: runs the swarm policy in a simulated cluster and reports how close it
//! gets to the Kumar–Ross minimum distribution time. See the library docs for what is
//! modelled.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use swarm_simulations::node::DriverConfig;
use swarm_simulations::units::{parse_rate, parse_rate_list, parse_size};
use swarm_simulations::{Params, Rates, Scenario, report, run};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    /// Edge upgrade: the blob only upstream, one lease holder streams it in.
    Edge,
    /// The blob already complete on node 0.
    InCluster,
    /// Edge upgrade with nodes leaving and joining mid-transfer.
    Churn,
    /// Every node fetches from upstream (baseline).
    Direct,
    /// Edge, in-cluster and direct.
    All,
}

/// Simulates a swarm distributing one blob with the real scheduler and tracker cores.
#[derive(Debug, Parser)]
#[command(name = "swarm-sim", version)]
struct Args {
    /// Scenario to run.
    #[arg(long, value_enum, default_value = "all", env = "SWARM_SIM_SCENARIO")]
    scenario: Which,
    /// Nodes (edge: all download; in-cluster: node 0 is the seed).
    #[arg(short = 'n', long, default_value_t = 20, env = "SWARM_SIM_NODES")]
    nodes: usize,
    /// Blob size (e.g. 1GiB, 64MiB).
    #[arg(long, default_value = "64MiB", env = "SWARM_SIM_BLOB")]
    blob: String,
    /// Piece length (default: swarm_proto::piece_length_for(blob)).
    #[arg(long, env = "SWARM_SIM_PIECE_LENGTH")]
    piece_length: Option<String>,
    /// Upstream registry egress (the cluster's uplink).
    #[arg(long, default_value = "100Mbit/s", env = "SWARM_SIM_UPSTREAM")]
    upstream: String,
    /// Mean node upload rate.
    #[arg(long, default_value = "200Mbit/s", env = "SWARM_SIM_NODE_UP")]
    node_up: String,
    /// Node upload rates are uniform in [(1-s)x, (1+s)x].
    #[arg(long, default_value_t = 0.0, env = "SWARM_SIM_NODE_UP_SPREAD")]
    node_up_spread: f64,
    /// Explicit node upload rates, comma-separated, cycled over the nodes.
    #[arg(long, env = "SWARM_SIM_NODE_UP_LIST", conflicts_with_all = ["node_up_spread"])]
    node_up_list: Option<String>,
    /// Mean node download rate.
    #[arg(long, default_value = "1Gbit/s", env = "SWARM_SIM_NODE_DOWN")]
    node_down: String,
    /// Node download rates are uniform in [(1-s)x, (1+s)x].
    #[arg(long, default_value_t = 0.0, env = "SWARM_SIM_NODE_DOWN_SPREAD")]
    node_down_spread: f64,
    /// Explicit node download rates, comma-separated, cycled over the nodes.
    #[arg(long, env = "SWARM_SIM_NODE_DOWN_LIST", conflicts_with_all = ["node_down_spread"])]
    node_down_list: Option<String>,
    /// Sites; node i is in site i mod K. With K > 1 each site has one shared link.
    #[arg(long, default_value_t = 1, env = "SWARM_SIM_ZONES")]
    zones: u32,
    /// Each site's shared link rate, each direction.
    #[arg(long, default_value = "1Gbit/s", env = "SWARM_SIM_ZONE_LINK")]
    zone_link: String,
    /// Round-trip time between nodes (and to the tracker).
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration, env = "SWARM_SIM_RTT")]
    rtt: Duration,
    /// Round-trip time to the upstream registry.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration, env = "SWARM_SIM_WAN_RTT")]
    wan_rtt: Duration,
    /// Fraction of the nodes that leave mid-transfer (churn scenario default: 0.1).
    #[arg(long, default_value_t = 0.0, env = "SWARM_SIM_CHURN_LEAVE")]
    churn_leave: f64,
    /// Nodes that join mid-transfer, as a fraction of --nodes (churn default: 0.1).
    #[arg(long, default_value_t = 0.0, env = "SWARM_SIM_CHURN_JOIN")]
    churn_join: f64,
    /// Leaves and joins happen uniformly in [0, window] (default: T_min).
    #[arg(long, value_parser = humantime::parse_duration, env = "SWARM_SIM_CHURN_WINDOW")]
    churn_window: Option<Duration>,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1, env = "SWARM_SIM_SEED")]
    seed: u64,
    /// Stop after this much simulated time (default: 20·T_min + 60 s; direct: none).
    #[arg(long, value_parser = humantime::parse_duration, env = "SWARM_SIM_MAX_TIME")]
    max_time: Option<Duration>,
    /// Peers each node dials per blob (default: the real node's NodePolicy::max_peers).
    #[arg(long, env = "SWARM_SIM_MAX_PEERS")]
    max_peers: Option<usize>,
    /// Concurrent uploads per node (default: the real node's NodePolicy::upload_slots).
    #[arg(long, env = "SWARM_SIM_UPLOAD_SLOTS")]
    upload_slots: Option<usize>,
    /// Piece buffers in flight per node, e.g. 32MiB (default: the real node's
    /// NodePolicy::receive_budget).
    #[arg(long, env = "SWARM_SIM_RECEIVE_BUDGET")]
    receive_budget: Option<String>,
    /// Scheduler: transfer time to keep queued per peer (SchedulerConfig::queue_time).
    #[arg(long, value_parser = humantime::parse_duration, env = "SWARM_SIM_QUEUE_TIME")]
    queue_time: Option<Duration>,
    /// Scheduler: most requests outstanding per peer (SchedulerConfig::max_in_flight).
    #[arg(long, env = "SWARM_SIM_MAX_IN_FLIGHT")]
    max_in_flight: Option<usize>,
    /// Scheduler: extra copies per piece in the endgame (SchedulerConfig::endgame_duplicates).
    #[arg(long, env = "SWARM_SIM_ENDGAME_DUPLICATES")]
    endgame_duplicates: Option<usize>,
    /// Log a progress line to stderr this often (simulated time), e.g. 1s.
    #[arg(long, value_parser = humantime::parse_duration, env = "SWARM_SIM_PROGRESS")]
    progress: Option<Duration>,
    /// Fault: the upstream lease holder crashes this long after the start (edge).
    #[arg(long, value_parser = humantime::parse_duration, env = "SWARM_SIM_KILL_HOLDER_AT")]
    kill_holder_at: Option<Duration>,
    /// Fault: the tracker stops answering this long after the start ...
    #[arg(long, value_parser = humantime::parse_duration, env = "SWARM_SIM_TRACKER_DOWN_AT", requires = "tracker_down_for")]
    tracker_down_at: Option<Duration>,
    /// ... for this long.
    #[arg(long, value_parser = humantime::parse_duration, env = "SWARM_SIM_TRACKER_DOWN_FOR", requires = "tracker_down_at")]
    tracker_down_for: Option<Duration>,
    /// Fault: this long after the start, `--restart-nodes` downloading nodes crash ...
    #[arg(long, value_parser = humantime::parse_duration, env = "SWARM_SIM_RESTART_AT")]
    restart_at: Option<Duration>,
    /// ... this many of them (not the lease holder) ...
    #[arg(long, default_value_t = 1, env = "SWARM_SIM_RESTART_NODES")]
    restart_nodes: u32,
    /// ... and each restarts this long later, with its verified pieces and nothing else.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s", env = "SWARM_SIM_RESTART_DOWN")]
    restart_down: Duration,
    /// Print JSON (an array with one report per scenario) instead of a table.
    #[arg(long, env = "SWARM_SIM_JSON")]
    json: bool,
}

fn rates(mean: &str, spread: f64, list: Option<&str>) -> anyhow::Result<Rates> {
    Ok(match list {
        Some(l) => Rates::List(parse_rate_list(l)?),
        None => Rates::Uniform { mean: parse_rate(mean)?, spread },
    })
}

fn params(a: &Args) -> anyhow::Result<Params> {
    // Every setting not given is the real node's default (`DriverConfig::default`).
    let mut driver = DriverConfig::default();
    if let Some(m) = a.max_peers {
        driver.max_peers = m;
    }
    if let Some(s) = a.upload_slots {
        driver.upload_slots = s;
    }
    if let Some(b) = &a.receive_budget {
        driver.receive_budget = usize::try_from(parse_size(b).context("--receive-budget")?)?;
    }
    if let Some(q) = a.queue_time {
        driver.scheduler.queue_time = q;
    }
    if let Some(m) = a.max_in_flight {
        driver.scheduler.max_in_flight = m;
    }
    if let Some(d) = a.endgame_duplicates {
        driver.scheduler.endgame_duplicates = d;
    }
    let piece_length = match &a.piece_length {
        Some(s) => Some(u32::try_from(parse_size(s).context("--piece-length")?)?),
        None => None,
    };
    Ok(Params {
        scenario: Scenario::Edge,
        nodes: a.nodes,
        blob: parse_size(&a.blob).context("--blob")?,
        piece_length,
        upstream: parse_rate(&a.upstream).context("--upstream")?,
        node_up: rates(&a.node_up, a.node_up_spread, a.node_up_list.as_deref()).context("--node-up")?,
        node_down: rates(&a.node_down, a.node_down_spread, a.node_down_list.as_deref()).context("--node-down")?,
        zones: a.zones,
        zone_link: parse_rate(&a.zone_link).context("--zone-link")?,
        rtt: a.rtt,
        wan_rtt: a.wan_rtt,
        churn_leave: a.churn_leave,
        churn_join: a.churn_join,
        churn_window: a.churn_window,
        seed: a.seed,
        max_time: a.max_time,
        driver,
        tracker: Default::default(),
        progress: a.progress,
        faults: swarm_simulations::Faults {
            kill_holder_at: a.kill_holder_at.map(swarm_simulations::model::nanos),
            tracker_down: a
                .tracker_down_at
                .zip(a.tracker_down_for)
                .map(|(at, len)| (swarm_simulations::model::nanos(at), swarm_simulations::model::nanos(len))),
            restart: a.restart_at.map(|at| {
                let nanos = swarm_simulations::model::nanos;
                (nanos(at), a.restart_nodes, nanos(a.restart_down))
            }),
        },
    })
}

/// The glibc tunable that backs malloc's heap with transparent huge pages.
const HUGE_PAGES_TUNABLE: &str = "glibc.malloc.hugetlb=1";

/// A large run touches hundreds of MB of per-node state in no useful order, so with
/// 4 KiB pages much of its time goes to TLB misses (1,000 nodes x 1 GiB, run side by
/// side: 17 % less CPU with huge pages). glibc reads `GLIBC_TUNABLES` only at start-up,
/// so the simulator runs itself again once with the tunable added, unless it is set
/// already or `SWARM_SIM_HUGE_PAGES=0`. Where this fails (another libc, no `exec`) the
/// run goes on with normal pages and says so.
#[cfg(target_os = "linux")]
fn rerun_with_huge_pages() {
    use std::os::unix::process::CommandExt;
    let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if current.contains("glibc.malloc.hugetlb") || std::env::var_os("SWARM_SIM_HUGE_PAGES").is_some_and(|v| v == "0") {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let tunables =
        if current.is_empty() { HUGE_PAGES_TUNABLE.to_owned() } else { format!("{current}:{HUGE_PAGES_TUNABLE}") };
    let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).env("GLIBC_TUNABLES", tunables).exec();
    eprintln!("swarm-sim: running with normal pages: could not run again with huge pages: {err}");
}

fn main() -> anyhow::Result<()> {
    #[cfg(target_os = "linux")]
    rerun_with_huge_pages();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| if args.progress.is_some() { "info" } else { "warn" }.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let base = params(&args)?;
    let scenarios = match args.scenario {
        Which::Edge => vec![Scenario::Edge],
        Which::InCluster => vec![Scenario::InCluster],
        Which::Churn => vec![Scenario::Churn],
        Which::Direct => vec![Scenario::Direct],
        Which::All => vec![Scenario::Edge, Scenario::InCluster, Scenario::Direct],
    };
    let mut reports = Vec::new();
    for scenario in scenarios {
        let p = Params { scenario, ..base.clone() };
        let r = run(&p).with_context(|| format!("scenario {}", scenario.name()))?;
        if !args.json {
            eprintln!("{} done in {:.2} s wall", scenario.name(), r.wall_s);
        }
        reports.push(r);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", report::table(&reports));
    }
    Ok(())
}
