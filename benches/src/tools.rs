//! Running and timing external tools, and facts about the machine.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Serialize;

/// A finished command.
#[derive(Debug)]
pub struct Run {
    /// Wall time from spawn to exit.
    pub secs: f64,
    /// CPU time (user + system) of the command and every descendant it
    /// waited for; NaN if unknown. Unlike wall time, it barely changes
    /// when other processes compete for the cores.
    pub cpu_secs: f64,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion, timing it; fails with its stderr if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<Run> {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let cpu_before = children_cpu();
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("spawn {what}"))?;
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = children_cpu() - cpu_before;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            tail(&stdout, 20),
            tail(&stderr, 20)
        );
    }
    Ok(Run {
        secs,
        cpu_secs,
        stdout,
        stderr,
    })
}

/// Runs `cmd` and then `sync` of the filesystem holding `path`, timing both
/// together: the time until the output is durable, the same for every tool.
pub fn run_and_sync(cmd: &mut Command, path: &Path) -> anyhow::Result<Run> {
    let start = Instant::now();
    let mut r = run(cmd)?;
    let sync = run(Command::new("sync").arg("-f").arg(path))?;
    r.secs = start.elapsed().as_secs_f64();
    r.cpu_secs += sync.cpu_secs;
    Ok(r)
}

/// The lines a child writes on `out` (a guest's serial console), each
/// with the time it arrived, from a thread of their own; the channel
/// closes when the child closes its end.
pub fn console_lines(
    out: std::process::ChildStdout,
) -> std::sync::mpsc::Receiver<(String, Instant)> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((line, Instant::now())).is_err() {
                break;
            }
        }
    });
    rx
}

/// User + system CPU seconds of this process's waited-for children
/// (`cutime` + `cstime` in /proc/self/stat); NaN if unreadable.
pub fn children_cpu() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let ticks = *TICKS.get_or_init(|| version("getconf", &["CLK_TCK"]).parse().unwrap_or(100.0));
    let Ok(stat) = fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name start at field 3.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    match (field(16), field(17)) {
        (Some(u), Some(s)) => (u + s) / ticks,
        _ => f64::NAN,
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Whether this process may drop the page cache.
pub fn can_drop_caches() -> bool {
    fs::OpenOptions::new()
        .write(true)
        .open("/proc/sys/vm/drop_caches")
        .is_ok()
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`; returns whether it worked.
pub fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    fs::write("/proc/sys/vm/drop_caches", b"3\n").is_ok()
}

/// Sum of the apparent sizes of the regular files under `dir`.
pub fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += dir_bytes(&entry.path())?;
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

/// Reads every file under `path` (or `path` itself) once, discarding the
/// data: puts it in the page cache.
pub fn read_tree(path: &Path) -> anyhow::Result<()> {
    let meta = fs::metadata(path)?;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            read_tree(&entry?.path())?;
        }
    } else if meta.is_file() {
        let mut f = fs::File::open(path)?;
        std::io::copy(&mut f, &mut std::io::sink())?;
    }
    Ok(())
}

/// Bytes allocated on disk for `path` (a file).
pub fn allocated_bytes(path: &Path) -> anyhow::Result<u64> {
    Ok(fs::metadata(path)?.blocks() * 512)
}

/// The 1-minute load average.
pub fn load_avg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// First line of `prog args...`, or "not installed".
pub fn version(prog: &str, args: &[&str]) -> String {
    match Command::new(prog).args(args).stdin(Stdio::null()).output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            text.lines().next().unwrap_or("").trim().to_string()
        }
        Err(_) => "not installed".to_string(),
    }
}

/// Fails with an install hint if `prog` is not on `PATH`.
pub fn require(prog: &str) -> anyhow::Result<()> {
    match Command::new(prog)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(_) => bail!("{prog} is not installed: run scripts/install-deps.sh"),
    }
}

/// The machine a report was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub date: String,
    pub cpu: String,
    pub cores: usize,
    pub mem_gib: u64,
    pub kernel: String,
    pub build: &'static str,
    pub cache_mode: String,
    pub load_start: f64,
    pub load_end: Option<f64>,
    pub versions: BTreeMap<String, String>,
}

impl Machine {
    /// Probes the machine now.
    pub fn probe(cache_mode: &str) -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown CPU")
            .trim()
            .to_string();
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: u64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut versions = BTreeMap::new();
        versions.insert("restic".into(), version("restic", &["version"]));
        versions.insert("borg".into(), version("borg", &["--version"]));
        versions.insert("qemu-img".into(), version("qemu-img", &["--version"]));
        Machine {
            date: version("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            mem_gib: (mem_kib + (1 << 19)) >> 20,
            kernel: version("uname", &["-r"]),
            build: if cfg!(debug_assertions) {
                "DEBUG (numbers meaningless)"
            } else {
                "release"
            },
            cache_mode: cache_mode.to_string(),
            load_start: load_avg(),
            load_end: None,
            versions,
        }
    }

    /// Records the end-of-run load.
    pub fn finish(&mut self) {
        self.load_end = Some(load_avg());
    }
}

/// CPU time (user + system, all threads) of process `pid` so far, in
/// seconds, from `/proc/PID/stat`; NaN if it cannot be read.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces) start at ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at 3.
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        // /proc reports clock ticks of USER_HZ, which Linux fixes at 100.
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_reports_failures_with_output() {
        let ok = run(Command::new("sh").args(["-c", "echo hi"])).unwrap();
        assert_eq!(ok.stdout, "hi\n");
        let err = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        assert!(err.to_string().contains("oops"), "{err}");
    }

    #[test]
    fn cpu_time_of_children_is_counted() {
        let r =
            run(Command::new("sh")
                .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"]))
            .unwrap();
        assert!(r.cpu_secs > 0.0 && r.cpu_secs <= r.secs + 0.05, "{r:?}");
    }

    #[test]
    fn dir_bytes_sums_files_recursively() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), [0u8; 100]).unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("d/b"), [0u8; 28]).unwrap();
        assert_eq!(dir_bytes(dir.path()).unwrap(), 128);
    }
}
