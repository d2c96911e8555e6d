//! Human-readable units for progress lines and summaries.
//!
//! Sizes use binary (IEC) units, as `qemu-img` and `lsblk` do; durations
//! read like `1h 02m 05s`. Shared by the daemon's progress log and the
//! CLI so both print the same numbers the same way.

/// `1536` → `"1.5 KiB"`, `0` → `"0 B"`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    // 1023.96 KiB would print as "1024.0 KiB"; step up instead.
    if value >= 1023.95 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A rate in bytes per second: `"80.0 MiB/s"`. Negative or non-finite
/// rates (never expected) print as `"0 B/s"`.
pub fn format_rate(bytes_per_second: f64) -> String {
    if !bytes_per_second.is_finite() || bytes_per_second <= 0.0 {
        return "0 B/s".to_string();
    }
    format!("{}/s", format_bytes(bytes_per_second.round() as u64))
}

/// Seconds as `"45s"`, `"3m 07s"`, `"1h 02m 05s"` or `"2d 03h 04m"`.
/// Negative or non-finite values print as `"-"`.
pub fn format_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".to_string();
    }
    let total = seconds.round() as u64;
    let (days, rem) = (total / 86_400, total % 86_400);
    let (hours, rem) = (rem / 3600, rem % 3600);
    let (minutes, secs) = (rem / 60, rem % 60);
    if days > 0 {
        format!("{days}d {hours:02}h {minutes:02}m")
    } else if hours > 0 {
        format!("{hours}h {minutes:02}m {secs:02}s")
    } else if minutes > 0 {
        format!("{minutes}m {secs:02}s")
    } else {
        format!("{secs}s")
    }
}

/// A latency in microseconds as `"125 µs"`; `None` (no requests yet)
/// prints as `"-"`.
pub fn format_micros(us: Option<f64>) -> String {
    us.filter(|v| v.is_finite())
        .map_or("-".to_string(), |v| format!("{v:.0} µs"))
}

/// `bytes_migrated / bytes_total` as a percentage in `0.0..=100.0`; an
/// empty image counts as fully migrated.
pub fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        return 100.0;
    }
    (done.min(total) as f64 / total as f64) * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_use_binary_units() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1.0 KiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(2 << 30), "2.0 GiB");
        assert_eq!(format_bytes(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn rates_and_durations() {
        assert_eq!(format_rate(80.0 * 1024.0 * 1024.0), "80.0 MiB/s");
        assert_eq!(format_rate(0.0), "0 B/s");
        assert_eq!(format_rate(f64::NAN), "0 B/s");
        assert_eq!(format_duration(0.0), "0s");
        assert_eq!(format_duration(44.6), "45s");
        assert_eq!(format_duration(187.0), "3m 07s");
        assert_eq!(format_duration(3725.0), "1h 02m 05s");
        assert_eq!(
            format_duration(2.0 * 86_400.0 + 3.0 * 3600.0 + 4.0 * 60.0),
            "2d 03h 04m"
        );
        assert_eq!(format_duration(-1.0), "-");
        assert_eq!(format_duration(f64::INFINITY), "-");
        assert_eq!(format_micros(Some(124.6)), "125 µs");
        assert_eq!(format_micros(None), "-");
    }

    #[test]
    fn percent_is_clamped_and_total_zero_is_done() {
        assert_eq!(percent(0, 0), 100.0);
        assert_eq!(percent(50, 200), 25.0);
        assert_eq!(percent(300, 200), 100.0);
    }
}
