//! Helpers shared by the integration tests.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The `recovery-cli` binary of this workspace, built once per test process
/// (`cargo build -p recovery-cli` in the same target dir and profile as this
/// test binary, a no-op when it is up to date).
pub fn recovery_cli_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let exe = std::env::current_exe().expect("current test executable");
        // target/<profile>/deps/integration-<hash>
        let profile_dir = exe
            .parent()
            .and_then(|d| d.parent())
            .expect("test binary lives in target/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let bin = profile_dir.join("recovery-cli");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "recovery-cli",
            "--bin",
            "recovery-cli",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status();
        match status {
            Ok(s) if s.success() => {}
            other if bin.exists() => {
                eprintln!(
                    "warning: building recovery-cli failed ({other:?}); using existing {}",
                    bin.display()
                );
            }
            other => panic!("cannot build recovery-cli: {other:?}"),
        }
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
    .clone()
}

/// A `Command` running the workspace's `recovery-cli` with logging quiet.
pub fn recovery_cli() -> Command {
    let mut c = Command::new(recovery_cli_path());
    c.env_remove("RECOVERY_STORE").env("RUST_LOG", "warn");
    c
}

/// What the last checkpoint of the persisted bitmap at `path` holds (the
/// format is `block::bitmap`'s: a 4 KiB header, then little-endian words):
/// its set bits and the image bytes they cover. A missing file holds none.
pub fn persisted_bitmap(path: &std::path::Path) -> (u64, u64) {
    let file = std::fs::read(path).unwrap_or_default();
    let Some((header, words)) = file.split_at_checked(block::bitmap::HEADER_SIZE) else {
        return (0, 0);
    };
    let granule = u64::from(u32::from_le_bytes(header[20..24].try_into().unwrap()));
    let image_size = u64::from_le_bytes(header[24..32].try_into().unwrap());
    let (mut bits, mut covered) = (0, 0);
    for (i, byte) in words.iter().enumerate() {
        for b in (0..8).filter(|b| byte & (1 << b) != 0) {
            let start = (i as u64 * 8 + b) * granule;
            bits += 1;
            covered += granule.min(image_size.saturating_sub(start));
        }
    }
    (bits, covered)
}

/// Whether this process runs as root (`/proc/self` belongs to the
/// effective user).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The variable that turns every skip into a failure. `scripts/test.sh`
/// (and so CI, which runs as root with every package installed) sets it.
pub const REQUIRE_ENV: &str = "RECOVERY_REQUIRE_GUEST";

/// Whether a test that lacks its environment (root, a guest, a tool) must
/// fail instead of skipping: [`REQUIRE_ENV`] is set to anything but `0`.
pub fn skips_are_failures() -> bool {
    std::env::var_os(REQUIRE_ENV).is_some_and(|v| v != "0")
}

/// Return from the test with a loud skip message, or panic with the same
/// message when [`skips_are_failures`], so CI can never pass a test that
/// did not run.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {{
        let why = format!($($arg)*);
        if $crate::util::skips_are_failures() {
            panic!(
                "cannot run this test and {} is set: {why}",
                $crate::util::REQUIRE_ENV
            );
        }
        eprintln!();
        eprintln!("!!! SKIPPED: {why}");
        eprintln!("!!! (set {}=1 to make this a failure)", $crate::util::REQUIRE_ENV);
        eprintln!();
        return;
    }};
}
