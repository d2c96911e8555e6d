//! A full disk under the overlay (state dir) or the target: guest writes
//! that need space fail with an I/O error, reads keep working, the daemon
//! stays up, and everything recovers once space is freed.
//!
//! The full file systems are small tmpfs mounts (the tests need root and
//! skip loudly without it).

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::blkio_client::Client;
use crate::boot::{materialize, store_with_backup};
use crate::corruption::{num, random_image, LoggedDaemon};
use crate::skip;

const MIB: usize = 1 << 20;
const CHUNK: usize = 64 << 10;

/// A tmpfs of a given size, unmounted (lazily) on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(path: PathBuf, size: &str) -> Result<SmallFs, String> {
        std::fs::create_dir_all(&path).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(SmallFs(path))
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot resize the tmpfs");
    }

    /// Fills the file system with `filler`; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0xffu8; 4096];
        loop {
            match f.write_all(&block) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A write the device refused for lack of space: EIO (virtio-blk has no
/// ENOSPC status) or ENOSPC.
fn assert_no_space(result: Result<(), i32>, what: &str) {
    assert!(
        matches!(result, Err(e) if e == -libc::EIO || e == -libc::ENOSPC),
        "{what}: expected EIO/ENOSPC, got {result:?}"
    );
}

fn backup(dir: &Path, image: &[u8]) -> (PathBuf, String) {
    let path = dir.join("disk.img");
    std::fs::write(&path, image).unwrap();
    let (store, id) = store_with_backup(dir, "vm", &path);
    (store, format!("vm@{id}"))
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: differs at byte {i}");
    }
}

fn read_all(client: &mut Client, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for offset in (0..len).step_by(CHUNK) {
        out.extend(client.read(offset as u64, CHUNK).unwrap());
    }
    out
}

#[test]
fn a_full_overlay_fails_writes_keeps_reads_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let image = random_image(4 * MIB, 21);
    let (store, snap) = backup(dir.path(), &image);
    let fs = match SmallFs::mount(dir.path().join("small"), "1m") {
        Ok(fs) => fs,
        Err(why) => skip!("cannot mount a tmpfs for the state dir: {why}"),
    };
    let state = fs.0.join("state");
    let mut daemon = LoggedDaemon::start(&store, &snap, dir.path(), &state, &[]);
    let mut client = Client::connect(&daemon.socket, CHUNK);
    let mut model = image.clone();

    let early = vec![0x11u8; CHUNK];
    client.write(0, &early).unwrap();
    model[..CHUNK].copy_from_slice(&early);
    client.flush().unwrap();

    let filler = fs.fill();
    // New blocks need space: refused.
    let late = vec![0x22u8; CHUNK];
    let at = 2 * MIB;
    assert_no_space(client.write(at as u64, &late), "write to a full overlay");
    // Reads keep working: the overlay's blocks and the snapshot's.
    assert_eq!(client.read(0, CHUNK).unwrap(), early);
    let other = 3 * MIB;
    assert_eq!(
        client.read(other as u64, CHUNK).unwrap(),
        &image[other..other + CHUNK]
    );
    // Acknowledged writes are still made durable.
    client.flush().unwrap();
    assert!(daemon.alive(), "the daemon died: {}", daemon.log());
    let s = daemon.status();
    assert!(num(&s, "guest_io_errors") >= 1, "{s}");

    // Space comes back: the same write succeeds.
    std::fs::remove_file(filler).unwrap();
    client.write(at as u64, &late).unwrap();
    model[at..at + CHUNK].copy_from_slice(&late);
    client.flush().unwrap();
    assert_same(&read_all(&mut client, model.len()), &model, "device");
    drop(client);
    let log = daemon.stop();
    assert!(!log.contains("panicked"), "{log}");

    let merged = dir.path().join("merged.img");
    materialize(&store, &snap, &state, &merged);
    assert_same(
        &std::fs::read(&merged).unwrap(),
        &model,
        "overlay after restart",
    );
}

#[test]
fn a_full_target_fails_writes_keeps_reads_and_the_migration_completes_after_a_resize() {
    let dir = tempfile::tempdir().unwrap();
    // Chunks 0-3 are zero: migrated without taking space on the target.
    let mut image = random_image(4 * MIB, 22);
    image[..4 * CHUNK].fill(0);
    let (store, snap) = backup(dir.path(), &image);
    let fs = match SmallFs::mount(dir.path().join("small"), "2m") {
        Ok(fs) => fs,
        Err(why) => skip!("cannot mount a tmpfs for the target: {why}"),
    };
    let target = fs.0.join("target.raw");
    let state = dir.path().join("state");
    let mut daemon = LoggedDaemon::start(
        &store,
        &snap,
        dir.path(),
        &state,
        &[
            OsStr::new("--copy-rate"),
            OsStr::new("16M"),
            OsStr::new("--target"),
            target.as_os_str(),
        ],
    );
    // 2 MiB of target for 3.75 MiB of data: the copier runs out of space.
    let s = daemon.wait_for(Duration::from_secs(60), "a target write error", |s| {
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("Target write failed"))
    });
    assert_eq!(s["state"], "migrating", "{s}");
    assert!(num(&s, "chunks_migrated") >= 4, "{s}");
    let mut client = Client::connect(&daemon.socket, CHUNK);
    let mut model = image.clone();
    // A write to migrated chunk 0 needs target space: refused.
    let block = vec![0x33u8; 4096];
    assert_no_space(client.write(0, &block), "write to a full target");
    // A write to the last chunk (not migrated) goes to the overlay.
    let last = model.len() - CHUNK;
    client.write(last as u64, &block).unwrap();
    model[last..last + 4096].copy_from_slice(&block);
    client.flush().unwrap();
    // Everything reads: migrated chunks from the target, the rest from
    // the store and overlay.
    assert_same(
        &read_all(&mut client, model.len()),
        &model,
        "device while full",
    );
    assert!(daemon.alive(), "the daemon died: {}", daemon.log());
    assert_ne!(daemon.status()["state"], "complete");

    fs.resize("16m");
    let s = daemon.wait_for(Duration::from_secs(60), "completion", |s| {
        s["state"] == "complete"
    });
    assert!(s["error"].is_null(), "{s}");
    client.write(0, &block).unwrap();
    model[..4096].copy_from_slice(&block);
    client.flush().unwrap();
    drop(client);
    let log = daemon.stop();
    assert!(log.contains("target write failed"), "{log}");
    let mut on_target = std::fs::read(&target).unwrap();
    on_target.truncate(model.len());
    assert_same(&on_target, &model, "target");
}
