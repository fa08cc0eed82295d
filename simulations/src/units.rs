//! Human units on the command line: rates (`200Mbit/s`, `12.5MiB/s`), sizes (`1GiB`)
//! and lists of rates. Everything is converted to bytes and bytes per second.

use anyhow::{Context, bail};

/// Splits `"12.5MiB"` into `(12.5, "MiB")`.
fn split_number(s: &str) -> anyhow::Result<(f64, &str)> {
    let s = s.trim();
    let end = s.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_')).unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let num: f64 = num.replace('_', "").parse().with_context(|| format!("{s:?}: expected a number and a unit"))?;
    if !num.is_finite() || num < 0.0 {
        bail!("{s:?}: not a usable quantity");
    }
    Ok((num, unit.trim()))
}

/// Parses a rate into bytes per second. Bit units: `bit/s`, `kbit/s`, `Mbit/s`,
/// `Gbit/s` (also `bps`, `Kbps`, `Mbps`, `Gbps`); byte units: `B/s`, `KB/s`, `MB/s`,
/// `GB/s` (powers of 1000) and `KiB/s`, `MiB/s`, `GiB/s` (powers of 1024).
pub fn parse_rate(s: &str) -> anyhow::Result<f64> {
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
        _ => bail!("{s:?}: unknown rate unit (try 200Mbit/s, 1Gbit/s, 25MB/s, 12MiB/s)"),
    };
    let rate = num * bytes_per_unit;
    if rate <= 0.0 {
        bail!("{s:?}: a rate must be positive");
    }
    Ok(rate)
}

/// Parses a comma-separated list of rates.
pub fn parse_rate_list(s: &str) -> anyhow::Result<Vec<f64>> {
    let rates = s.split(',').filter(|p| !p.trim().is_empty()).map(parse_rate).collect::<anyhow::Result<Vec<_>>>()?;
    if rates.is_empty() {
        bail!("{s:?}: empty list of rates");
    }
    Ok(rates)
}

/// Parses a size into bytes: `B`, `KB`/`MB`/`GB` (powers of 1000), `KiB`/`MiB`/`GiB`
/// (powers of 1024); a bare number is bytes.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
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
        _ => bail!("{s:?}: unknown size unit (try 64MiB, 1GiB, 500MB)"),
    };
    let bytes = (num * mult).round();
    if bytes < 1.0 || bytes > u64::MAX as f64 {
        bail!("{s:?}: size out of range");
    }
    Ok(bytes as u64)
}

/// A rate in bytes per second as `123.4 Mbit/s`.
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
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0Mbit/s").is_err());
        assert_eq!(parse_size("1GiB").ok(), Some(1 << 30));
        assert_eq!(parse_size("64MiB").ok(), Some(64 << 20));
        assert_eq!(parse_size("1.5GB").ok(), Some(1_500_000_000));
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert_eq!(parse_rate_list("100Mbit/s, 1Gbit/s").ok(), Some(vec![12.5e6, 125e6]));
    }
}
