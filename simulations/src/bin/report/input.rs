//! The report's two inputs, read with serde: the document `emulate.py run --json`
//! writes (schema `swarm-emulate/1`, see `simulations/emulate/README.md`) and the array
//! `swarm-sim --json` prints (one `swarm_simulations::Report` per scenario).
//!
//! Only the fields the report shows are declared; unknown fields are ignored, so both
//! producers can grow. serde_json writes a non-finite float (a run where no node
//! finished has `last_s = NaN`) as `null`, so every figure is an `Option`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// The schema tag of an emulation document.
pub const EMULATE_SCHEMA: &str = "swarm-emulate/1";

/// `T_min` and its terms, as both producers write it (swarm-sim's `TMin`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct TMin {
    /// `F / u_s`.
    #[serde(default)]
    pub source_s: Option<f64>,
    /// `F / d_min`.
    #[serde(default)]
    pub download_s: Option<f64>,
    /// `N·F / (u_s + Σ u_i)`.
    #[serde(default)]
    pub swarm_s: Option<f64>,
    /// `F / zone link` (simulator with several sites; 0 otherwise).
    #[serde(default)]
    pub zone_s: Option<f64>,
    /// The maximum of the terms.
    pub t_min_s: Option<f64>,
}

/// One `emulate.py run --json` document.
#[derive(Clone, Debug, Deserialize)]
pub struct EmuDoc {
    pub schema: String,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub duration_s: Option<f64>,
    pub params: EmuParams,
    #[serde(default)]
    pub host: Option<Host>,
    #[serde(default)]
    pub calibration: Option<Calibration>,
    pub results: Vec<EmuResult>,
}

/// The topology and rates of an emulation run (rates in bits/s).
#[derive(Clone, Debug, Deserialize)]
pub struct EmuParams {
    pub nodes: u32,
    pub size_bytes: u64,
    pub uplink_bps: f64,
    pub node_rate_bps: f64,
    /// 0 or absent: unshaped.
    #[serde(default)]
    pub node_down_bps: Option<f64>,
    #[serde(default)]
    pub swarm_version: Option<String>,
    #[serde(default)]
    pub libtorrent_version: Option<String>,
}

/// The machine an emulation ran on.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Host {
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub cpus: Option<u32>,
    #[serde(default)]
    pub loadavg_at_end: Vec<f64>,
    #[serde(default)]
    pub note: Option<String>,
}

/// iperf3's measurement of the emulated fabric (`--calibrate`).
#[derive(Clone, Debug, Deserialize)]
pub struct Calibration {
    pub status: String,
    #[serde(default)]
    pub ring_min_fraction: Option<f64>,
    #[serde(default)]
    pub uplink_fraction: Option<f64>,
}

/// One system in one scenario (one repeat) of an emulation.
#[derive(Clone, Debug, Deserialize)]
pub struct EmuResult {
    pub system: String,
    pub scenario: String,
    #[serde(default)]
    pub repeat: u32,
    /// `ok`, `failed` or `unavailable`.
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub t_min_s: Option<f64>,
    #[serde(default)]
    pub t_min: Option<TMin>,
    #[serde(default)]
    pub n_downloaders: Option<u32>,
    #[serde(default)]
    pub last_s: Option<f64>,
    #[serde(default)]
    pub median_s: Option<f64>,
    #[serde(default)]
    pub p90_s: Option<f64>,
    /// `last_s / t_min_s`.
    #[serde(default)]
    pub ratio: Option<f64>,
    /// Upstream frame bytes / F.
    #[serde(default)]
    pub uplink_ratio: Option<f64>,
    #[serde(default)]
    pub cpu_s_per_gb: Option<f64>,
    #[serde(default)]
    pub cpu_s_per_gb_cluster: Option<f64>,
    #[serde(default)]
    pub node_rx_ratio: Option<f64>,
    #[serde(default)]
    pub cpu_floor_s: Option<f64>,
    /// Churn: the last of the killed-and-restarted nodes.
    #[serde(default)]
    pub restarted_last_s: Option<f64>,
    /// Churn: who was killed and when.
    #[serde(default)]
    pub churn: Option<Churn>,
    #[serde(default)]
    pub nodes: Vec<EmuNode>,
}

/// The churn of one result: nodes SIGKILLed at `kill_at_s`, restarted at `restart_at_s`.
#[derive(Clone, Debug, Deserialize)]
pub struct Churn {
    #[serde(default)]
    pub victims: Vec<u32>,
    #[serde(default)]
    pub kill_at_s: Option<f64>,
    #[serde(default)]
    pub restart: bool,
    #[serde(default)]
    pub restart_at_s: Option<f64>,
}

impl EmuResult {
    /// `last_s / T_min`, from the document or computed from its two figures.
    pub fn over_t_min(&self) -> Option<f64> {
        self.ratio.or_else(|| Some(self.last_s? / self.t_min_s?))
    }

    /// Whether every copy was verified (the emulator's `status: ok`).
    pub fn ok(&self) -> bool {
        self.status == "ok"
    }

    /// Whether the system cannot take part in the scenario at all (libtorrent behind
    /// containerd), as opposed to being unavailable on the machine.
    pub fn not_applicable(&self) -> bool {
        self.status == "unavailable" && self.reason.starts_with("not applicable")
    }
}

/// One node of an emulation result.
#[derive(Clone, Debug, Deserialize)]
pub struct EmuNode {
    /// Seconds since the common start when its copy was complete.
    #[serde(default)]
    pub done_s: Option<f64>,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub killed: bool,
    #[serde(default)]
    pub restarted: bool,
}

/// One `swarm-sim --json` report (field names as `swarm_simulations::Report`).
#[derive(Clone, Debug, Deserialize)]
pub struct SimReport {
    pub scenario: String,
    #[serde(default)]
    pub seed: Option<u64>,
    pub nodes: usize,
    #[serde(default)]
    pub downloaders: Option<usize>,
    #[serde(default)]
    pub completed: Option<usize>,
    pub blob_bytes: u64,
    #[serde(default)]
    pub piece_length: Option<u32>,
    #[serde(default)]
    pub upstream_bps: Option<f64>,
    #[serde(default)]
    pub node_up_min_bps: Option<f64>,
    #[serde(default)]
    pub node_up_mean_bps: Option<f64>,
    #[serde(default)]
    pub node_up_max_bps: Option<f64>,
    #[serde(default)]
    pub node_down_min_bps: Option<f64>,
    pub t_min: TMin,
    #[serde(default)]
    pub last_s: Option<f64>,
    #[serde(default)]
    pub median_s: Option<f64>,
    #[serde(default)]
    pub p90_s: Option<f64>,
    #[serde(default)]
    pub last_over_t_min: Option<f64>,
    #[serde(default)]
    pub uplink_over_f: Option<f64>,
    #[serde(default)]
    pub received_over_nf: Option<f64>,
    #[serde(default)]
    pub timed_out: bool,
    #[serde(default)]
    pub wall_s: Option<f64>,
}

impl SimReport {
    /// Whether the nodes' upload rates differ (`--node-up-spread` or a list).
    pub fn heterogeneous(&self) -> bool {
        matches!((self.node_up_min_bps, self.node_up_max_bps), (Some(lo), Some(hi)) if lo < hi)
    }

    /// Whether every counted node that stayed finished before the time limit.
    pub fn all_done(&self) -> bool {
        !self.timed_out && self.completed.is_some() && self.completed == self.downloaders
    }

    /// `last_s / T_min`, from the report or computed.
    pub fn over_t_min(&self) -> Option<f64> {
        self.last_over_t_min.filter(|r| r.is_finite()).or_else(|| Some(self.last_s? / self.t_min.t_min_s?))
    }
}

/// An input and the file it came from.
#[derive(Clone, Debug)]
pub struct Loaded<T> {
    pub path: PathBuf,
    pub data: T,
}

/// Parses an emulation document, checking its schema tag.
pub fn parse_emu(text: &str) -> anyhow::Result<EmuDoc> {
    let doc: EmuDoc = serde_json::from_str(text)?;
    if doc.schema != EMULATE_SCHEMA {
        bail!("schema {:?}, expected {EMULATE_SCHEMA:?}", doc.schema);
    }
    Ok(doc)
}

/// Parses `swarm-sim --json` output: an array of reports (a single object is accepted too).
pub fn parse_sim(text: &str) -> anyhow::Result<Vec<SimReport>> {
    let v: serde_json::Value = serde_json::from_str(text)?;
    Ok(match v {
        serde_json::Value::Array(_) => serde_json::from_value(v)?,
        other => vec![serde_json::from_value(other)?],
    })
}

/// Reads and parses an emulation document.
pub fn load_emu(path: &Path) -> anyhow::Result<Loaded<EmuDoc>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let data = parse_emu(&text).with_context(|| format!("{}: not an emulate.py --json document", path.display()))?;
    Ok(Loaded { path: path.to_path_buf(), data })
}

/// Reads and parses a simulator report file.
pub fn load_sim(path: &Path) -> anyhow::Result<Loaded<Vec<SimReport>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let data = parse_sim(&text).with_context(|| format!("{}: not swarm-sim --json output", path.display()))?;
    Ok(Loaded { path: path.to_path_buf(), data })
}
