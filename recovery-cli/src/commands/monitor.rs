//! `recovery-cli status|pause|resume|set-rate|metrics`: talk to a running
//! `instant-boot` daemon over its control socket.
//!
//! Every command names the socket with `--control PATH` (or the daemon's
//! `--state DIR`, whose socket is `DIR/control.sock`). `status` prints a
//! human summary, `--json` the daemon's [`Status`] unchanged, and
//! `--watch` follows the migration until it completes (exit 0) or fails
//! (exit 1): an indicatif bar on a terminal, one plain line per interval
//! otherwise (or one JSON object per line with `--json`). A daemon that
//! restarts mid-watch (crash and resume) is waited for, up to
//! [`RECONNECT_GRACE`].
//!
//! A service daemon (`instant-boot --plan`) reports its totals and one
//! report per disk (`Status::disks`): the summary ends with a line per
//! disk, the watch shows the total bar and a bar per disk below it (or
//! the total line and a line per disk).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use control::{human, progress, Request};
use control::{State, Status};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

use crate::output;

/// The socket's name inside a state dir (`daemon::state_dir`).
const CONTROL_SOCKET: &str = "control.sock";

/// How long `status --watch` waits for an unreachable daemon to return.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(30);

/// Where the daemon's control socket is: `--control PATH` or `--state DIR`.
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct SocketArg {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", env = "RECOVERY_CONTROL")]
    pub control: Option<PathBuf>,
    /// The daemon's state directory; its control socket is inside.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
}

impl SocketArg {
    /// The socket path named by whichever option was given.
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        match (&self.control, &self.state) {
            (Some(path), _) => Ok(path.clone()),
            (None, Some(dir)) => Ok(dir.join(CONTROL_SOCKET)),
            (None, None) => bail!("Name the daemon with --control PATH or --state DIR"),
        }
    }
}

/// Arguments of `status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    /// Follow the migration until it completes (exit 0) or fails (exit 1).
    #[arg(long)]
    pub watch: bool,
    /// Print the status as JSON (one object per line with --watch).
    #[arg(long)]
    pub json: bool,
    /// How often --watch refreshes, e.g. 500ms, 1s, 2m.
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
}

/// Validated `status` configuration.
#[derive(Debug)]
pub struct StatusConfig {
    pub control: PathBuf,
    pub watch: bool,
    pub json: bool,
    pub interval: Duration,
}

impl TryFrom<StatusArgs> for StatusConfig {
    type Error = anyhow::Error;

    fn try_from(a: StatusArgs) -> anyhow::Result<StatusConfig> {
        Ok(StatusConfig {
            control: a.socket.path()?,
            watch: a.watch,
            json: a.json,
            interval: a.interval,
        })
    }
}

/// Arguments of `pause`, `resume` and `metrics`.
#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    #[command(flatten)]
    pub socket: SocketArg,
}

/// Validated configuration of `pause`, `resume` and `metrics`.
#[derive(Debug)]
pub struct ControlConfig {
    pub control: PathBuf,
}

impl TryFrom<ControlArgs> for ControlConfig {
    type Error = anyhow::Error;

    fn try_from(a: ControlArgs) -> anyhow::Result<ControlConfig> {
        Ok(ControlConfig {
            control: a.socket.path()?,
        })
    }
}

/// Arguments of `metrics`: a daemon, or `--store` for its drill records.
#[derive(Debug, clap::Args)]
pub struct MetricsArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    /// Print the drill metrics of this store (from its drill records)
    /// instead of a daemon's metrics.
    #[arg(long, value_name = "STORE", group = "SocketArg")]
    pub store: Option<PathBuf>,
}

/// Validated configuration of `metrics`.
#[derive(Debug)]
pub enum MetricsConfig {
    Daemon(ControlConfig),
    Store(PathBuf),
}

impl TryFrom<MetricsArgs> for MetricsConfig {
    type Error = anyhow::Error;

    fn try_from(a: MetricsArgs) -> anyhow::Result<MetricsConfig> {
        Ok(match a.store {
            Some(store) => MetricsConfig::Store(store),
            None => MetricsConfig::Daemon(ControlArgs { socket: a.socket }.try_into()?),
        })
    }
}

/// Arguments of `set-rate`.
#[derive(Debug, clap::Args)]
pub struct SetRateArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    /// Bytes per second, e.g. 50M, 1GiB, 0 or unlimited.
    #[arg(value_name = "RATE", value_parser = parse_rate)]
    pub rate: u64,
}

/// Validated `set-rate` configuration.
#[derive(Debug)]
pub struct SetRateConfig {
    pub control: PathBuf,
    /// Bytes per second; 0 means unlimited.
    pub rate: u64,
}

impl TryFrom<SetRateArgs> for SetRateConfig {
    type Error = anyhow::Error;

    fn try_from(a: SetRateArgs) -> anyhow::Result<SetRateConfig> {
        Ok(SetRateConfig {
            control: a.socket.path()?,
            rate: a.rate,
        })
    }
}

/// `status`: one-shot summary, JSON, or a watch until the end.
pub fn status(c: StatusConfig) -> anyhow::Result<()> {
    if c.watch {
        let mut view = if c.json {
            View::Json(std::io::stdout())
        } else if std::io::stdout().is_terminal() {
            // A service gets a bar per disk below its total.
            let disks: Vec<String> = control::fetch_status(&c.control)?
                .disks
                .into_iter()
                .map(|d| d.disk)
                .collect();
            View::Bar(progress_bars(ProgressDrawTarget::stdout(), &disks))
        } else {
            View::Lines(std::io::stdout())
        };
        return watch(&c.control, c.interval, RECONNECT_GRACE, &mut view);
    }
    let status = control::fetch_status(&c.control)?;
    if c.json {
        return output::json(&status);
    }
    let mut out = std::io::stdout().lock();
    out.write_all(summary(&status).as_bytes())
        .context("Failed to write to stdout")
}

/// `pause`: stop the copier after its in-flight chunks.
pub fn pause(c: ControlConfig) -> anyhow::Result<()> {
    control::send_command(&c.control, &Request::Pause)?;
    output::line("Migration paused")
}

/// `resume`: restart a paused copier.
pub fn resume(c: ControlConfig) -> anyhow::Result<()> {
    control::send_command(&c.control, &Request::Resume)?;
    output::line("Migration resumed")
}

/// `set-rate`: change the copy rate limit.
pub fn set_rate(c: SetRateConfig) -> anyhow::Result<()> {
    control::send_command(
        &c.control,
        &Request::SetRate {
            bytes_per_second: c.rate,
        },
    )?;
    output::line(&rate_message(c.rate))
}

/// `metrics`: the Prometheus text exposition (the daemon's, or the
/// store's drill metrics).
pub fn metrics(c: MetricsConfig) -> anyhow::Result<()> {
    let text = match c {
        MetricsConfig::Daemon(c) => control::fetch_metrics(&c.control)?,
        MetricsConfig::Store(store) => super::drill::metrics_text(&store)?,
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("Failed to write to stdout")
}

fn rate_message(rate: u64) -> String {
    if rate == 0 {
        "Copy rate limit removed (unlimited)".to_string()
    } else {
        format!("Copy rate limit set to {}", human::format_rate(rate as f64))
    }
}

/// Where `status --watch` shows progress.
enum View<W: Write> {
    /// A live bar (a terminal).
    Bar(Bar),
    /// One plain line per refresh (a pipe or a file).
    Lines(W),
    /// One compact JSON status per refresh.
    Json(W),
}

impl<W: Write> View<W> {
    fn update(&mut self, status: &Status) -> anyhow::Result<()> {
        match self {
            View::Bar(bar) => {
                bar.show(status);
                Ok(())
            }
            View::Lines(out) => {
                write_line(out, &progress_line(status))?;
                for d in &status.disks {
                    write_line(out, &disk_line(&d.disk, &d.status))?;
                }
                Ok(())
            }
            View::Json(out) => {
                let json = serde_json::to_string(status).context("Failed to encode JSON")?;
                write_line(out, &json)
            }
        }
    }

    /// Says the daemon is unreachable and that we keep trying.
    fn unreachable(&mut self, error: &control::Error) -> anyhow::Result<()> {
        match self {
            View::Bar(bar) => {
                bar.say("unreachable", "waiting for the daemon");
                Ok(())
            }
            // JSON lines stay parseable: the note goes to stderr.
            View::Json(_) => {
                tracing::warn!("daemon unreachable, retrying: {error}");
                Ok(())
            }
            View::Lines(out) => write_line(out, &format!("unreachable: {error}; retrying")),
        }
    }

    /// Ends the display on a final status. The bar gives way to a plain
    /// line, so the last word stays readable on any terminal.
    fn finish(&mut self, status: &Status) -> anyhow::Result<()> {
        if let View::Bar(bar) = self {
            bar.bar.finish_and_clear();
            for (_, d) in &bar.disks {
                d.bar.finish_and_clear();
            }
            output::line(&progress_line(status))?;
            for d in &status.disks {
                output::line(&disk_line(&d.disk, &d.status))?;
            }
        }
        Ok(())
    }
}

fn write_line(out: &mut impl Write, line: &str) -> anyhow::Result<()> {
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("Failed to write to stdout")
}

/// The texts around the bar: the state, and bytes skipped, rate and ETA.
#[derive(Debug, Default)]
struct BarText {
    state: String,
    detail: String,
}

/// The `status --watch` bar. Its texts are template keys that read a
/// shared cell, so one refresh (texts, length and position) is one draw:
/// nothing is drawn before the first status, and no frame shows half an
/// update (`set_message` and friends each draw).
struct Bar {
    bar: ProgressBar,
    text: Arc<Mutex<BarText>>,
    /// A service's disks: their name and bar, below this one (the total).
    disks: Vec<(String, Bar)>,
    /// What draws them all, for a service.
    _multi: Option<MultiProgress>,
}

impl Bar {
    /// Shows `status` (and each disk's report on its bar).
    fn show(&self, status: &Status) {
        self.show_one(status, status.state.name());
        for (name, bar) in &self.disks {
            if let Some(d) = status.disks.iter().find(|d| &d.disk == name) {
                bar.show_one(&d.status, &format!("{name} {}", d.status.state));
            }
        }
    }

    /// Shows one report with `state` before the bar, in one draw.
    fn show_one(&self, status: &Status, state: &str) {
        let (done, total) = bar_amounts(status);
        let skipped = match status.bytes_skipped {
            0 => String::new(),
            n => format!("copied, {} of zeroes skipped, ", human::format_bytes(n)),
        };
        self.set_text(state, format!("{skipped}{}", rate_and_eta(status)));
        self.bar.update(|s| {
            s.set_len(total);
            s.set_pos(done.min(total));
        });
    }

    /// Shows a note in place of the state and details, in one draw.
    fn say(&self, state: &str, detail: &str) {
        self.set_text(state, detail.to_string());
        self.bar.tick();
    }

    fn set_text(&self, state: &str, detail: String) {
        let mut text = self.text.lock().unwrap_or_else(|e| e.into_inner());
        text.state = state.to_string();
        text.detail = detail;
    }
}

/// What the bar counts: bytes copied of bytes to copy, or (a daemon that
/// does not report them, or an image of zeroes) bytes migrated of the
/// image; all of it once complete.
fn bar_amounts(status: &Status) -> (u64, u64) {
    let (done, total) = if status.bytes_to_copy > 0 {
        (status.bytes_copied, status.bytes_to_copy)
    } else {
        (status.bytes_migrated, status.bytes_total)
    };
    if status.state == State::Complete {
        (total, total)
    } else {
        (done, total)
    }
}

fn progress_bar(target: ProgressDrawTarget) -> Bar {
    let text = Arc::new(Mutex::new(BarText::default()));
    let key = |pick: fn(&BarText) -> &str| {
        let text = text.clone();
        move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
            let text = text.lock().unwrap_or_else(|e| e.into_inner());
            let _ = w.write_str(pick(&text));
        }
    };
    let style = ProgressStyle::with_template(
        "{state:>9} [{wide_bar}] {percent:>3}% {bytes}/{total_bytes} {detail}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .with_key("state", key(|t| &t.state))
    .with_key("detail", key(|t| &t.detail))
    .progress_chars("=> ");
    let bar = ProgressBar::with_draw_target(Some(0), target);
    bar.set_style(style);
    Bar {
        bar,
        text,
        disks: Vec::new(),
        _multi: None,
    }
}

/// The bar of a service's total with a bar per disk below it; a plain
/// [`progress_bar`] without disks.
fn progress_bars(target: ProgressDrawTarget, disks: &[String]) -> Bar {
    if disks.is_empty() {
        return progress_bar(target);
    }
    let multi = MultiProgress::with_draw_target(target);
    let add = || {
        let mut bar = progress_bar(ProgressDrawTarget::hidden());
        bar.bar = multi.add(bar.bar);
        bar
    };
    let mut total = add();
    total.disks = disks.iter().map(|d| (d.clone(), add())).collect();
    total._multi = Some(multi);
    total
}

/// `"  db-disk0: migrating 25.0% ... -> /dev/vg/db"`: a disk of a service.
fn disk_line(name: &str, status: &Status) -> String {
    let target = status
        .target
        .as_deref()
        .map(|t| format!(" -> {t}"))
        .unwrap_or_default();
    format!("  {name}: {}{target}", progress_line(status))
}

/// Follows the daemon until the migration ends. The first status must
/// come through; later, an unreachable daemon is retried for `grace`.
fn watch<W: Write>(
    path: &Path,
    interval: Duration,
    grace: Duration,
    view: &mut View<W>,
) -> anyhow::Result<()> {
    let mut status = control::fetch_status(path)?;
    loop {
        view.update(&status)?;
        match status.state {
            State::Migrating | State::Paused => {}
            State::Complete => {
                view.finish(&status)?;
                if let View::Bar(_) = view {
                    output::line(&completion_line(&status))?;
                }
                return Ok(());
            }
            State::Failed => {
                view.finish(&status)?;
                bail!(
                    "Migration failed: {}",
                    status.error.as_deref().unwrap_or("no reason given")
                );
            }
            State::Serving => {
                view.finish(&status)?;
                bail!(
                    "Nothing to watch: the daemon has no migration target (start it with --target)"
                );
            }
        }
        std::thread::sleep(interval);
        let mut unreachable_since: Option<Instant> = None;
        status = loop {
            match control::fetch_status(path) {
                Ok(status) => break status,
                Err(e) => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= grace {
                        view.finish(&status)?;
                        return Err(e).context(format!(
                            "Lost contact with the daemon for {}",
                            human::format_duration(grace.as_secs_f64())
                        ));
                    }
                    view.unreachable(&e)?;
                    std::thread::sleep(interval);
                }
            }
        };
    }
}

fn eta(status: &Status) -> String {
    match (status.state, status.eta_seconds) {
        (State::Complete, _) => "done".to_string(),
        (State::Paused, _) => "paused".to_string(),
        (State::Serving | State::Failed, _) => "-".to_string(),
        (_, Some(eta)) => human::format_duration(eta),
        (_, None) => "unknown".to_string(),
    }
}

/// Copy rate and ETA, and with protection the RPO next to them.
fn rate_and_eta(status: &Status) -> String {
    let rpo = match &status.protection {
        Some(p) => format!(
            ", RPO {} ({})",
            p.rpo_seconds
                .map_or("-".to_string(), human::format_duration),
            p.state
        ),
        None => String::new(),
    };
    format!(
        "{}, ETA {}{rpo}",
        human::format_rate(status.copy_rate),
        eta(status)
    )
}

/// `"migrating 25.0% 1.0 GiB of 4.0 GiB copied, 8.0 GiB of zeroes
/// skipped, 80.0 MiB/s, ETA 38s"`.
pub fn progress_line(status: &Status) -> String {
    format!(
        "{} {:.1}% {}, {}",
        status.state.name(),
        status.progress() * 100.0,
        progress::amounts(status),
        rate_and_eta(status)
    )
}

fn completion_line(status: &Status) -> String {
    match &status.target {
        Some(target) => format!(
            "Migration complete: {} on {target}",
            human::format_bytes(status.bytes_total)
        ),
        None => "Migration complete".to_string(),
    }
}

/// The one-shot human summary of `status`, one `Label: value` per line.
pub fn summary(s: &Status) -> String {
    let mut rows: Vec<(&str, String)> = vec![("State", s.state.name().to_string())];
    if let Some(error) = &s.error {
        rows.push(("Error", error.clone()));
    }
    if let Some(service) = &s.service {
        rows.push(("Service", format!("{service} ({} disks)", s.disks.len())));
    }
    rows.push(("Snapshot", s.snapshot.clone()));
    let target = match (&s.target, s.disks.is_empty()) {
        (Some(target), _) => Some(target.clone()),
        (None, false) => Some("each disk its own (below)".to_string()),
        (None, true) => None,
    };
    match target {
        Some(target) => {
            rows.push(("Target", target));
            rows.push((
                "Progress",
                format!("{:.1}%  {}", s.progress() * 100.0, progress::amounts(s)),
            ));
            rows.push((
                "Migrated",
                format!(
                    "{} of {}  ({} of {} chunks)",
                    human::format_bytes(s.bytes_migrated),
                    human::format_bytes(s.bytes_total),
                    s.chunks_migrated,
                    s.chunks_total
                ),
            ));
            let limit = match s.rate_limit {
                0 => "unlimited".to_string(),
                n => format!("limit {}", human::format_rate(n as f64)),
            };
            rows.push((
                "Copy rate",
                format!("{} ({limit})", human::format_rate(s.copy_rate)),
            ));
            rows.push(("ETA", eta(s)));
            rows.push((
                "Copied on read",
                human::format_bytes(s.bytes_copied_on_read),
            ));
            rows.push(("Failed chunks", s.chunks_failed.to_string()));
        }
        None => {
            rows.push(("Target", "none (serving from the store)".to_string()));
            rows.push(("Image size", human::format_bytes(s.bytes_total)));
        }
    }
    rows.push((
        "Guest reads",
        format!(
            "{} ops, {}",
            s.guest_read_ops,
            human::format_bytes(s.guest_read_bytes)
        ),
    ));
    rows.push((
        "Guest writes",
        format!(
            "{} ops, {}",
            s.guest_write_ops,
            human::format_bytes(s.guest_write_bytes)
        ),
    ));
    rows.push((
        "  to the overlay",
        human::format_bytes(s.overlay_write_bytes),
    ));
    rows.push(("Guest flushes", s.guest_flush_ops.to_string()));
    if let Some(line) = s.guest_latency.as_ref().and_then(latency_line) {
        rows.push(("Guest latency", line));
    }
    rows.push(("Guest I/O errors", s.guest_io_errors.to_string()));
    rows.push(("Overlay", human::format_bytes(s.overlay_bytes)));
    rows.push((
        "Live journal",
        match (s.journal_active, &s.journal_inactive_reason) {
            (true, _) => "active".to_string(),
            (false, Some(reason)) => format!("inactive: {reason}"),
            (false, None) => "inactive".to_string(),
        },
    ));
    rows.push((
        "Cache hit rate",
        format!("{:.1}%", s.cache_hit_rate * 100.0),
    ));
    if let Some(line) = progress::protection_line(s) {
        rows.push(("Protection", line));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    if let Some(line) = progress::remote_store_line(s, now) {
        rows.push(("Remote store", line));
    }
    rows.push(("Uptime", human::format_duration(s.uptime_seconds)));

    let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0) + 1;
    let mut text: String = rows
        .iter()
        .map(|(label, value)| format!("{:<width$} {value}\n", format!("{label}:")))
        .collect();
    if !s.disks.is_empty() {
        text.push_str("Disks:\n");
        for d in &s.disks {
            text.push_str(&disk_line(&d.disk, &d.status));
            text.push('\n');
        }
    }
    text
}

/// Parses a copy rate: a size per second (`50M`, `1GiB`, `50M/s`), or
/// `0`, `unlimited`, `none` or `off` for no limit.
/// `write p50 31 µs, p99 125 µs; read ...`: the request types the guest
/// used, with their median and p99 through the daemon's layers; `None`
/// before the first request.
fn latency_line(l: &control::latency::GuestLatency) -> Option<String> {
    let us = human::format_micros;
    let parts: Vec<String> = l
        .by_op()
        .iter()
        .filter(|(_, h)| h.count > 0)
        .map(|(op, h)| format!("{op} p50 {}, p99 {}", us(h.p50_us), us(h.p99_us)))
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    if matches!(lower.as_str(), "unlimited" | "none" | "off") {
        return Ok(0);
    }
    let t = lower.strip_suffix("/s").unwrap_or(&lower);
    output::parse_size(t).map_err(|_| {
        format!("invalid rate {s:?} (bytes per second, e.g. 50M, 1GiB, 0 or unlimited)")
    })
}

/// Parses an interval: `500ms`, `1s`, `1.5s`, `2m`, or plain seconds.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let invalid = || format!("invalid interval {s:?} (e.g. 500ms, 1s, 2m)");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| invalid())?;
    let seconds = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        _ => return Err(invalid()),
    };
    let interval = Duration::try_from_secs_f64(seconds).map_err(|_| invalid())?;
    if interval < Duration::from_millis(10) {
        return Err(format!("interval {s:?} is too short (at least 10ms)"));
    }
    if interval > Duration::from_secs(3600) {
        return Err(format!("interval {s:?} is too long (at most 1h)"));
    }
    Ok(interval)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use clap::Parser;
    use control::Control;
    use daemon::control_server::ControlServer;

    use super::*;

    fn migrating() -> Status {
        Status {
            state: State::Migrating,
            snapshot: "web01/2024-05-01T10:00:00Z".into(),
            target: Some("/dev/vg0/web01".into()),
            bytes_total: 4 << 30,
            bytes_migrated: 1 << 30,
            bytes_copied_on_read: 64 << 20,
            bytes_to_copy: 2 << 30,
            bytes_copied: 512 << 20,
            bytes_skipped: 512 << 20,
            chunks_total: 1024,
            chunks_migrated: 256,
            copy_rate: 80.0 * 1024.0 * 1024.0,
            rate_limit: 100 << 20,
            eta_seconds: Some(38.4),
            guest_read_ops: 1200,
            guest_read_bytes: 48 << 20,
            guest_write_ops: 30,
            guest_write_bytes: 120 << 10,
            guest_flush_ops: 7,
            guest_latency: Some(control::latency::GuestLatency {
                read: control::latency::Latency::new(1, vec![[10_000, 100]]),
                write: control::latency::Latency::new(1, vec![[28_000, 90], [125_000, 10]]),
                ..Default::default()
            }),
            overlay_write_bytes: 80 << 10,
            overlay_bytes: 120 << 10,
            cache_hit_rate: 0.875,
            uptime_seconds: 3725.0,
            journal_active: true,
            ..Status::default()
        }
    }

    #[test]
    fn summary_of_a_migration() {
        assert_eq!(
            summary(&migrating()),
            "\
State:            migrating
Snapshot:         web01/2024-05-01T10:00:00Z
Target:           /dev/vg0/web01
Progress:         25.0%  512.0 MiB of 2.0 GiB copied, 512.0 MiB of zeroes skipped
Migrated:         1.0 GiB of 4.0 GiB  (256 of 1024 chunks)
Copy rate:        80.0 MiB/s (limit 100.0 MiB/s)
ETA:              38s
Copied on read:   64.0 MiB
Failed chunks:    0
Guest reads:      1200 ops, 48.0 MiB
Guest writes:     30 ops, 120.0 KiB
  to the overlay: 80.0 KiB
Guest flushes:    7
Guest latency:    read p50 10 µs, p99 10 µs; write p50 28 µs, p99 125 µs
Guest I/O errors: 0
Overlay:          120.0 KiB
Live journal:     active
Cache hit rate:   87.5%
Uptime:           1h 02m 05s
"
        );
    }

    #[test]
    fn summary_of_failed_and_serving_daemons() {
        let failed = Status {
            state: State::Failed,
            error: Some("Failed to write chunk 17 to the target: EIO".into()),
            chunks_failed: 2,
            rate_limit: 0,
            ..migrating()
        };
        let text = summary(&failed);
        assert!(text
            .starts_with("State:            failed\nError:            Failed to write chunk 17"));
        assert!(text.contains("Copy rate:        80.0 MiB/s (unlimited)\n"));
        assert!(text.contains("ETA:              -\n"));
        assert!(text.contains("Failed chunks:    2\n"));

        let serving = Status {
            state: State::Serving,
            target: None,
            journal_active: false,
            journal_inactive_reason: Some("overlay bitmap: cannot read the boot id".into()),
            ..migrating()
        };
        let text = summary(&serving);
        assert!(
            text.contains("Live journal:     inactive: overlay bitmap: cannot read the boot id\n")
        );
        assert!(text.contains("Target:           none (serving from the store)\n"));
        assert!(text.contains("Image size:       4.0 GiB\n"));
        assert!(!text.contains("Migrated"));
        assert!(!text.contains("ETA"));
    }

    #[test]
    fn progress_lines() {
        assert_eq!(
            progress_line(&migrating()),
            "migrating 25.0% 512.0 MiB of 2.0 GiB copied, 512.0 MiB of zeroes skipped, 80.0 MiB/s, ETA 38s"
        );
        let paused = Status {
            state: State::Paused,
            copy_rate: 0.0,
            ..migrating()
        };
        assert_eq!(
            progress_line(&paused),
            "paused 25.0% 512.0 MiB of 2.0 GiB copied, 512.0 MiB of zeroes skipped, 0 B/s, ETA paused"
        );
        let unknown = Status {
            eta_seconds: None,
            ..migrating()
        };
        assert!(progress_line(&unknown).ends_with("ETA unknown"));
        assert_eq!(rate_message(0), "Copy rate limit removed (unlimited)");
        assert_eq!(rate_message(50 << 20), "Copy rate limit set to 50.0 MiB/s");
    }

    #[test]
    fn rates_parse_like_sizes_per_second() {
        assert_eq!(parse_rate("50M"), Ok(50 << 20));
        assert_eq!(parse_rate("1GiB"), Ok(1 << 30));
        assert_eq!(parse_rate("50M/s"), Ok(50 << 20));
        assert_eq!(parse_rate(" 4096 "), Ok(4096));
        assert_eq!(parse_rate("0"), Ok(0));
        assert_eq!(parse_rate("unlimited"), Ok(0));
        assert_eq!(parse_rate("Unlimited"), Ok(0));
        assert_eq!(parse_rate("off"), Ok(0));
        for bad in ["", "fast", "-1", "50X", "M", "1.5.G"] {
            let err = parse_rate(bad).unwrap_err();
            assert!(err.starts_with("invalid rate"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn intervals_parse() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_interval("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_interval("3"), Ok(Duration::from_secs(3)));
        for bad in ["", "s", "1h", "abc", "-1s", "1..2s"] {
            assert!(parse_interval(bad).is_err(), "{bad:?}");
        }
        assert!(parse_interval("0").unwrap_err().contains("too short"));
        assert!(parse_interval("2h").is_err());
        assert!(parse_interval("61m").unwrap_err().contains("too long"));
    }

    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(subcommand)]
        command: TestCommand,
    }

    #[derive(Debug, clap::Subcommand)]
    enum TestCommand {
        Status(StatusArgs),
        Pause(ControlArgs),
        SetRate(SetRateArgs),
    }

    #[test]
    fn command_lines() {
        use clap::CommandFactory;
        TestCli::command().debug_assert();

        let cli = TestCli::try_parse_from(["x", "status", "--control", "/run/c.sock", "--watch"])
            .unwrap();
        let TestCommand::Status(args) = cli.command else {
            panic!("not status")
        };
        let config = StatusConfig::try_from(args).unwrap();
        assert_eq!(config.control, Path::new("/run/c.sock"));
        assert!(config.watch && !config.json);
        assert_eq!(config.interval, Duration::from_secs(1));

        let cli = TestCli::try_parse_from(["x", "pause", "--state", "/var/lib/ir/vm1"]).unwrap();
        let TestCommand::Pause(args) = cli.command else {
            panic!("not pause")
        };
        let config = ControlConfig::try_from(args).unwrap();
        assert_eq!(config.control, Path::new("/var/lib/ir/vm1/control.sock"));

        let cli = TestCli::try_parse_from(["x", "set-rate", "--control", "c", "50M"]).unwrap();
        let TestCommand::SetRate(args) = cli.command else {
            panic!("not set-rate")
        };
        assert_eq!(SetRateConfig::try_from(args).unwrap().rate, 50 << 20);

        // Usage errors: both or neither socket option, a bad rate.
        let both = ["x", "pause", "--control", "c", "--state", "d"];
        assert!(TestCli::try_parse_from(both).is_err());
        if std::env::var_os("RECOVERY_CONTROL").is_none() {
            assert!(TestCli::try_parse_from(["x", "pause"]).is_err());
        }
        let err = TestCli::try_parse_from(["x", "set-rate", "--control", "c", "fast"]).unwrap_err();
        assert!(err.to_string().contains("invalid rate"), "{err}");
    }

    /// A daemon whose migration advances one step per status request and
    /// then ends in `end`.
    struct Scripted {
        calls: AtomicU64,
        steps: u64,
        end: State,
    }

    impl Scripted {
        fn new(steps: u64, end: State) -> Arc<Scripted> {
            Arc::new(Scripted {
                calls: AtomicU64::new(0),
                steps,
                end,
            })
        }
    }

    impl Control for Scripted {
        fn status(&self) -> Status {
            let n = self.calls.fetch_add(1, Ordering::SeqCst).min(self.steps);
            let total = 4u64 << 30;
            let migrated = total / self.steps * n;
            let state = if n < self.steps {
                State::Migrating
            } else {
                self.end
            };
            let migrated = if state == State::Complete {
                total
            } else {
                migrated
            };
            Status {
                state,
                error: (state == State::Failed).then(|| "Target disk vanished".to_string()),
                bytes_migrated: migrated,
                bytes_total: total,
                bytes_to_copy: total,
                bytes_copied: migrated,
                bytes_skipped: 0,
                ..migrating()
            }
        }
        fn pause(&self) -> Result<(), String> {
            Ok(())
        }
        fn resume(&self) -> Result<(), String> {
            Ok(())
        }
        fn set_rate(&self, _: u64) -> Result<(), String> {
            Ok(())
        }
    }

    /// A private directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::SeqCst);
            let dir = std::env::temp_dir().join(format!("monitor-{}-{n}", std::process::id()));
            std::fs::create_dir(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn serve(daemon: Arc<Scripted>) -> (TempDir, PathBuf, ControlServer) {
        let dir = TempDir::new();
        let path = dir.0.join("control.sock");
        let server = ControlServer::start(&path, daemon).unwrap();
        (dir, path, server)
    }

    const FAST: Duration = Duration::from_millis(10);

    #[test]
    fn watch_prints_plain_lines_until_complete() {
        let (_dir, path, _server) = serve(Scripted::new(4, State::Complete));
        let mut view = View::Lines(Vec::new());
        watch(&path, FAST, RECONNECT_GRACE, &mut view).unwrap();
        let View::Lines(out) = view else {
            unreachable!()
        };
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert!(
            lines[0].starts_with("migrating 0.0% 0 B of 4.0 GiB copied"),
            "{out}"
        );
        assert!(
            lines[2].starts_with("migrating 50.0% 2.0 GiB of 4.0 GiB copied"),
            "{out}"
        );
        assert_eq!(
            lines[4],
            "complete 100.0% 4.0 GiB of 4.0 GiB copied, 80.0 MiB/s, ETA done"
        );
    }

    #[test]
    fn watch_json_lines_move_monotonically() {
        let (_dir, path, _server) = serve(Scripted::new(8, State::Complete));
        let mut view = View::Json(Vec::new());
        watch(&path, FAST, RECONNECT_GRACE, &mut view).unwrap();
        let View::Json(out) = view else {
            unreachable!()
        };
        let statuses: Vec<Status> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(statuses.len(), 9);
        assert!(statuses
            .windows(2)
            .all(|w| w[0].bytes_migrated <= w[1].bytes_migrated));
        assert_eq!(statuses.last().unwrap().state, State::Complete);
    }

    /// A terminal that records every line drawn on it.
    #[derive(Debug, Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl indicatif::TermLike for Recorder {
        fn width(&self) -> u16 {
            120
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(s)
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            if !s.trim().is_empty() {
                self.0.lock().unwrap().push(s.to_string());
            }
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn watch_bar_reaches_the_end() {
        let (_dir, path, _server) = serve(Scripted::new(3, State::Complete));
        let bar = progress_bar(ProgressDrawTarget::hidden());
        let inner = bar.bar.clone();
        let text = bar.text.clone();
        let mut view: View<Vec<u8>> = View::Bar(bar);
        watch(&path, FAST, RECONNECT_GRACE, &mut view).unwrap();
        assert!(inner.is_finished());
        assert_eq!(inner.length(), Some(4 << 30));
        assert_eq!(inner.position(), 4 << 30);
        let text = text.lock().unwrap();
        assert_eq!(text.state, "complete");
        assert_eq!(text.detail, "80.0 MiB/s, ETA done");
    }

    #[test]
    fn watch_bar_draws_each_status_once_and_never_an_empty_frame() {
        let daemon = Scripted::new(6, State::Complete);
        let (_dir, path, _server) = serve(daemon.clone());
        let term = Recorder::default();
        // A refresh rate far above the polls, so no frame is dropped.
        let target = ProgressDrawTarget::term_like_with_hz(Box::new(term.clone()), 250);
        let mut view: View<Vec<u8>> = View::Bar(progress_bar(target));
        watch(&path, Duration::from_millis(20), RECONNECT_GRACE, &mut view).unwrap();
        let frames = term.0.lock().unwrap().clone();
        let polls = daemon.calls.load(Ordering::SeqCst) as usize;
        assert!(!frames.is_empty());
        // One draw per status at most (each set_* call used to draw).
        assert!(
            frames.len() <= polls,
            "{} frames for {polls} statuses: {frames:#?}",
            frames.len()
        );
        // The first frame already shows the image, not "100% 0 B/0 B".
        assert!(
            frames[0].contains("migrating") && frames[0].contains("  0% 0 B/4.00 GiB"),
            "{frames:#?}"
        );
        assert!(frames.iter().all(|f| !f.contains("0 B/0 B")), "{frames:#?}");
    }

    #[test]
    fn watch_fails_with_the_daemons_reason() {
        let (_dir, path, _server) = serve(Scripted::new(2, State::Failed));
        let mut view = View::Lines(Vec::new());
        let err = watch(&path, FAST, RECONNECT_GRACE, &mut view).unwrap_err();
        assert_eq!(err.to_string(), "Migration failed: Target disk vanished");
        let View::Lines(out) = view else {
            unreachable!()
        };
        assert!(String::from_utf8(out).unwrap().ends_with("ETA -\n"));
    }

    #[test]
    fn watch_refuses_a_daemon_without_target_and_a_missing_one() {
        let (_dir, path, _server) = serve(Scripted::new(1, State::Serving));
        let mut view = View::Lines(Vec::new());
        let err = watch(&path, FAST, RECONNECT_GRACE, &mut view).unwrap_err();
        assert!(err.to_string().starts_with("Nothing to watch"), "{err}");

        let missing = path.with_file_name("absent.sock");
        let err = watch(&missing, FAST, RECONNECT_GRACE, &mut view).unwrap_err();
        assert!(err.to_string().contains("is the daemon running?"), "{err}");
    }

    /// An output another thread can read while `watch` writes to it.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn watch_survives_a_daemon_restart_but_not_a_long_absence() {
        // The daemon restarts mid-migration: the watch waits and finishes.
        // The restart waits until the watcher has said the daemon is
        // unreachable (an event, not a gap it hopes to poll in).
        let daemon = Scripted::new(1000, State::Complete);
        let (_dir, path, server) = serve(daemon.clone());
        let out = Shared::default();
        let restarter = {
            let path = path.clone();
            let daemon = daemon.clone();
            let out = out.clone();
            std::thread::spawn(move || {
                while daemon.calls.load(Ordering::SeqCst) < 3 {
                    std::thread::sleep(FAST);
                }
                server.shutdown();
                while !out.text().contains("unreachable") {
                    std::thread::sleep(FAST);
                }
                daemon.calls.store(999, Ordering::SeqCst);
                ControlServer::start(&path, daemon).unwrap()
            })
        };
        let mut view = View::Lines(out.clone());
        watch(&path, FAST, Duration::from_secs(20), &mut view).unwrap();
        let server = restarter.join().unwrap();
        let out = out.text();
        assert!(out.contains("unreachable: Cannot connect"), "{out}");
        assert!(out.ends_with("ETA done\n"), "{out}");

        // Gone for longer than the grace period: an error, not a hang.
        let daemon = Scripted::new(1000, State::Complete);
        let path2 = path.with_file_name("other.sock");
        let server2 = ControlServer::start(&path2, daemon.clone()).unwrap();
        let stopper = std::thread::spawn(move || {
            while daemon.calls.load(Ordering::SeqCst) < 2 {
                std::thread::sleep(FAST);
            }
            server2.shutdown();
        });
        let started = Instant::now();
        let mut view = View::Lines(Vec::new());
        let err = watch(&path2, FAST, Duration::from_millis(200), &mut view).unwrap_err();
        stopper.join().unwrap();
        assert!(
            err.to_string().starts_with("Lost contact with the daemon"),
            "{err:#}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(server);
    }

    fn service() -> Status {
        let disk = |name: &str, state, copied: u64| control::DiskStatus {
            disk: name.to_string(),
            status: Status {
                state,
                target: Some(format!("/dev/vg/{name}")),
                bytes_total: 64 << 20,
                bytes_to_copy: 8 << 20,
                bytes_copied: copied,
                ..Status::default()
            },
        };
        Status {
            state: State::Migrating,
            snapshot: "portal@20261206T120000.000000Z".into(),
            bytes_total: 128 << 20,
            bytes_to_copy: 16 << 20,
            bytes_copied: 12 << 20,
            eta_seconds: Some(4.0),
            service: Some("portal".into()),
            disks: vec![
                disk("db-disk0", State::Complete, 8 << 20),
                disk("app-disk0", State::Migrating, 4 << 20),
            ],
            ..Status::default()
        }
    }

    #[test]
    fn a_service_shows_its_total_and_a_line_and_a_bar_per_disk() {
        let s = service();
        let text = summary(&s);
        assert!(
            text.contains("Service:") && text.contains("portal (2 disks)"),
            "{text}"
        );
        assert!(
            text.contains("Progress:") && text.contains("75.0%"),
            "{text}"
        );
        assert!(
            text.contains("\nDisks:\n  db-disk0: complete 100.0%")
                && text.contains("  app-disk0: migrating 50.0%")
                && text.contains("-> /dev/vg/app-disk0"),
            "{text}"
        );

        let mut view = View::Lines(Vec::new());
        view.update(&s).unwrap();
        let View::Lines(out) = view else {
            unreachable!()
        };
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].starts_with("migrating 75.0%"), "{out}");
        assert!(
            lines[2].starts_with("  app-disk0: migrating 50.0%"),
            "{out}"
        );

        let names = ["db-disk0".to_string(), "app-disk0".to_string()];
        let bar = progress_bars(ProgressDrawTarget::hidden(), &names);
        bar.show(&s);
        let at = |b: &Bar| (b.bar.position(), b.bar.length());
        assert_eq!(at(&bar), (12 << 20, Some(16 << 20)));
        assert_eq!(at(&bar.disks[0].1), (8 << 20, Some(8 << 20)));
        assert_eq!(at(&bar.disks[1].1), (4 << 20, Some(8 << 20)));
        assert_eq!(
            bar.disks[1].1.text.lock().unwrap().state,
            "app-disk0 migrating"
        );
    }
}
