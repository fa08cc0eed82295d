//! Human units on the command line: rates (`200Mbit/s`, `12.5MiB/s`), sizes (`1GiB`)
//! and lists of rates, parsed by the workspace's one parser ([`swarm_proto::units`]),
//! with `anyhow` errors for the simulator's flags.

pub use swarm_proto::units::fmt_rate;

/// Parses a rate into bytes per second ([`swarm_proto::units::parse_rate`]).
pub fn parse_rate(s: &str) -> anyhow::Result<f64> {
    Ok(swarm_proto::units::parse_rate(s)?)
}

/// Parses a comma-separated list of rates.
pub fn parse_rate_list(s: &str) -> anyhow::Result<Vec<f64>> {
    Ok(swarm_proto::units::parse_rate_list(s)?)
}

/// Parses a size into bytes ([`swarm_proto::units::parse_size`]).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    Ok(swarm_proto::units::parse_size(s)?)
}
