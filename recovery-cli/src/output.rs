//! Shared output helpers: human sizes, JSON, progress bars.

use std::io::{IsTerminal, Write};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// Print `value` as pretty JSON on stdout.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let s = serde_json::to_string_pretty(value).context("Failed to encode JSON")?;
    line(&s)
}

/// Print one line on stdout.
pub fn line(s: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}").context("Failed to write to stdout")
}

/// `1.5 GiB`-style size: the daemon's formatter, so a size reads the same
/// in every command, the status and the daemon's log.
pub fn size(bytes: u64) -> String {
    control::human::format_bytes(bytes)
}

/// Throughput string, `-` when no time passed.
pub fn rate(bytes: u64, seconds: f64) -> String {
    if seconds <= 0.0 {
        return "-".into();
    }
    control::human::format_rate(bytes as f64 / seconds)
}

/// Parse a size such as `64K`, `1M`, `1.5G`, `4MiB`, `65536` (binary
/// units; a decimal number must come to a whole number of bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    const EXAMPLES: &str = "examples: 4K, 64K, 1.5G, 4MiB, 65536";
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {:?} ({EXAMPLES})",
                unit.trim()
            ))
        }
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let bad_number = || format!("invalid size {s:?}: not a number ({EXAMPLES})");
    if int.is_empty() && frac.is_empty() || frac.contains('.') || frac.len() > 18 {
        return Err(bad_number());
    }
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad_number())?
    };
    let scale = 10u128.pow(frac.len() as u32);
    let frac: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad_number())?
    };
    // Exact: (int + frac / scale) * mult.
    let total = (int * scale + frac)
        .checked_mul(mult as u128)
        .ok_or_else(|| format!("size {s:?} is too large"))?;
    if total % scale != 0 {
        return Err(format!("invalid size {s:?}: not a whole number of bytes"));
    }
    u64::try_from(total / scale).map_err(|_| format!("size {s:?} is too large"))
}

/// A byte progress bar on stderr when it is a terminal, hidden otherwise.
pub fn progress(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    pb.set_style(style);
    pb.set_message(what.to_string());
    pb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5k"), Ok(512));
        assert_eq!(parse_size(".5M"), Ok(512 << 10));
        assert_eq!(parse_size("2.0 GiB"), Ok(2 << 30));
        assert!(parse_size("x").is_err());
        assert!(parse_size(".").is_err());
        assert!(parse_size("1.2.3M").is_err());
        assert!(parse_size("0.1")
            .unwrap_err()
            .contains("whole number of bytes"));
        let e = parse_size("4Q").unwrap_err();
        assert!(e.contains("unknown unit \"Q\""), "{e}");
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1536), "1.5 KiB");
    }
}
