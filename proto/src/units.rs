//! Human units, shared by the CLI and the simulator: rates (`200Mbit/s`,
//! `12.5MiB/s`) and sizes (`1GiB`), converted to bytes per second and bytes. The one
//! parser of the workspace: `swarm tracker --uplink-cap`, `swarm agent
//! --download-rate`/`--upload-rate`/`--cache-size` and every `swarm-sim` flag use it.

/// A quantity that could not be parsed; the message names the input and what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?}: {reason}")]
pub struct UnitError {
    pub input: String,
    pub reason: &'static str,
}

fn error(input: &str, reason: &'static str) -> UnitError {
    UnitError { input: input.to_string(), reason }
}

/// Splits `"12.5MiB"` into `(12.5, "MiB")`.
fn split_number(s: &str) -> Result<(f64, &str), UnitError> {
    let t = s.trim();
    let end = t.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_')).unwrap_or(t.len());
    let (num, unit) = t.split_at(end);
    let num: f64 = num.replace('_', "").parse().map_err(|_| error(s, "expected a number and a unit"))?;
    if !num.is_finite() || num < 0.0 {
        return Err(error(s, "not a usable quantity"));
    }
    Ok((num, unit.trim()))
}

/// Parses a rate into bytes per second. Bit units: `bit/s`, `kbit/s`, `Mbit/s`,
/// `Gbit/s` (also `bps`, `Kbps`, `Mbps`, `Gbps`); byte units: `B/s`, `KB/s`, `MB/s`,
/// `GB/s` (powers of 1000) and `KiB/s`, `MiB/s`, `GiB/s` (powers of 1024). Units are
/// case-insensitive, a bare number is bytes per second, and the rate must be positive.
pub fn parse_rate(s: &str) -> Result<f64, UnitError> {
    let (num, unit) = split_number(s)?;
    let unit = unit.strip_suffix("/s").unwrap_or(unit);
    let bytes_per_unit = match unit.to_ascii_lowercase().as_str() {
        "bit" | "bps" => 1.0 / 8.0,
        "kbit" | "kbps" => 1e3 / 8.0,
        "mbit" | "mbps" => 1e6 / 8.0,
        "gbit" | "gbps" => 1e9 / 8.0,
        "b" | "" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(error(s, "unknown rate unit (try 200Mbit/s, 1Gbit/s, 25MB/s, 12MiB/s)")),
    };
    let rate = num * bytes_per_unit;
    if rate <= 0.0 {
        return Err(error(s, "a rate must be positive"));
    }
    Ok(rate)
}

/// Parses a rate into whole bytes per second (at least 1).
pub fn parse_rate_bytes(s: &str) -> Result<u64, UnitError> {
    let rate = parse_rate(s)?;
    if rate < 1.0 {
        return Err(error(s, "a rate must be at least 1 byte per second (8bit/s)"));
    }
    if rate >= u64::MAX as f64 {
        return Err(error(s, "rate out of range"));
    }
    Ok(rate as u64)
}

/// Parses a comma-separated list of rates.
pub fn parse_rate_list(s: &str) -> Result<Vec<f64>, UnitError> {
    let rates = s.split(',').filter(|p| !p.trim().is_empty()).map(parse_rate).collect::<Result<Vec<_>, _>>()?;
    if rates.is_empty() {
        return Err(error(s, "empty list of rates"));
    }
    Ok(rates)
}

/// Parses a size into bytes: `B`, `KB`/`MB`/`GB` (powers of 1000, also `k`/`m`/`g`),
/// `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024); a bare number is bytes.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let (num, unit) = split_number(s)?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(error(s, "unknown size unit (try 64MiB, 1GiB, 500MB)")),
    };
    let bytes = (num * mult).round();
    if bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(error(s, "size out of range"));
    }
    Ok(bytes as u64)
}

/// A rate in bytes per second as `123.4 Mbit/s` (or `1.25 Gbit/s`).
pub fn fmt_rate(bytes_per_sec: f64) -> String {
    let bits = bytes_per_sec * 8.0;
    if bits >= 1e9 { format!("{:.2} Gbit/s", bits / 1e9) } else { format!("{:.1} Mbit/s", bits / 1e6) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_sizes() {
        assert_eq!(parse_rate("200Mbit/s").ok(), Some(25e6));
        assert_eq!(parse_rate("1Gbit/s").ok(), Some(125e6));
        assert_eq!(parse_rate("100 Mbps").ok(), Some(12.5e6));
        assert_eq!(parse_rate("2MiB/s").ok(), Some(2.0 * 1024.0 * 1024.0));
        assert_eq!(parse_rate("25MB/s").ok(), Some(25e6));
        assert_eq!(parse_rate("50kbit/s").ok(), Some(6250.0));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10 furlongs").is_err());
        assert!(parse_rate("0Mbit/s").is_err());
        assert_eq!(parse_rate_bytes("40Mbit/s"), Ok(5_000_000));
        assert_eq!(parse_rate_bytes("8bit/s"), Ok(1));
        assert!(parse_rate_bytes("4bit/s").is_err());
        assert_eq!(parse_size("1GiB").ok(), Some(1 << 30));
        assert_eq!(parse_size("64MiB").ok(), Some(64 << 20));
        assert_eq!(parse_size("1.5GB").ok(), Some(1_500_000_000));
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert!(parse_size("0").is_err());
        assert_eq!(parse_rate_list("100Mbit/s, 1Gbit/s").ok(), Some(vec![12.5e6, 125e6]));
        assert_eq!(fmt_rate(5e6), "40.0 Mbit/s");
    }

    #[test]
    fn errors_name_the_input() {
        let e = parse_rate("7 parsecs").expect_err("unknown unit");
        assert!(e.to_string().starts_with("\"7 parsecs\": unknown rate unit"), "{e}");
    }
}
