//! Encrypted stores (`init --encrypt`): every command works the same with
//! the key, fails with one clear line without it or with a wrong one, and
//! a tampered, changed or swapped object is an authentication error naming
//! it (EIO for the guest), never wrong data.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::blkio_client::Client;
use crate::boot::BootDaemon;
use crate::corruption::random_image;
use crate::guest::{require_guest, run_to_completion, BOOT_TIMEOUT};
use crate::util::recovery_cli;

const PASS: &str = "correct horse battery staple";
const CHUNK: usize = 64 << 10;
const EIO: i32 = -libc::EIO;
/// Cheap argon2id for tests (the default is 64 MiB, 3 passes).
const KDF: [&str; 4] = ["--kdf-memory", "8M", "--kdf-iterations", "1"];

/// `recovery-cli ARGS` with the passphrase `pass` (none: no key at all).
fn cli(pass: Option<&str>, args: &[&dyn AsRef<OsStr>]) -> Output {
    let mut c: Command = recovery_cli();
    c.env_remove("RECOVERY_PASSWORD")
        .env_remove("RECOVERY_KEY_FILE")
        .env_remove("RECOVERY_NEW_PASSWORD");
    if let Some(p) = pass {
        c.env("RECOVERY_PASSWORD", p);
    }
    for a in args {
        c.arg(a);
    }
    c.output().expect("run recovery-cli")
}

fn show(args: &[&dyn AsRef<OsStr>]) -> Vec<std::ffi::OsString> {
    args.iter().map(|a| a.as_ref().to_os_string()).collect()
}

fn ok(pass: Option<&str>, args: &[&dyn AsRef<OsStr>]) -> String {
    let out = cli(pass, args);
    assert!(out.status.success(), "{:?}: {out:?}", show(args));
    String::from_utf8(out.stdout).unwrap()
}

/// Fails with exit 1 and one line on stderr containing every needle.
fn fails(pass: Option<&str>, args: &[&dyn AsRef<OsStr>], needles: &[&str]) -> String {
    let out = cli(pass, args);
    assert_eq!(out.status.code(), Some(1), "{:?}: {out:?}", show(args));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} missing in {err}");
    }
    err
}

/// An encrypted store in `dir/store` with `image` backed up as `vm`;
/// returns the store and `vm@ID`.
fn encrypted_backup(dir: &Path, image: &[u8], chunk_size: &str) -> (PathBuf, String) {
    let store = dir.join("store");
    let img = dir.join("disk.img");
    std::fs::write(&img, image).unwrap();
    let out = ok(
        Some(PASS),
        &[
            &"init",
            &store,
            &"--chunk-size",
            &chunk_size,
            &"--encrypt",
            &KDF[0],
            &KDF[1],
            &KDF[2],
            &KDF[3],
        ],
    );
    assert!(out.contains("Created encrypted store"), "{out}");
    let out = ok(
        Some(PASS),
        &[
            &"backup", &"--json", &"--name", &"vm", &"--store", &store, &img,
        ],
    );
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = stats["id"].as_str().expect("snapshot id").to_string();
    (store, format!("vm@{id}"))
}

/// An image of random chunks with zero chunks between them.
fn image_with_holes(chunks: usize, seed: u64) -> Vec<u8> {
    let mut image = random_image(chunks * CHUNK, seed);
    for c in (0..chunks).step_by(4) {
        image[c * CHUNK..(c + 1) * CHUNK].fill(0);
    }
    image
}

fn restore_bytes(store: &Path, snap: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("restored.img");
    let _ = std::fs::remove_file(&out);
    ok(Some(PASS), &[&"restore", &"--store", &store, &snap, &out]);
    std::fs::read(&out).unwrap()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn encrypted_store_backs_up_restores_verifies_and_collects_with_the_key_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut image = image_with_holes(24, 1);
    // Text a store must not show in the clear.
    image[CHUNK + 100..CHUNK + 116].copy_from_slice(b"PLAINTEXT-MARKER");
    // 4 KiB chunks: 384 of them, so a backup changing 2 is a delta.
    let (store, first) = encrypted_backup(dir.path(), &image, "4K");
    assert!(restore_bytes(&store, &first, dir.path()) == image);

    // Nothing in the store shows the plaintext, nor its plain blake3 id.
    let plain_id = store::ChunkId::of(&image[CHUNK..2 * CHUNK]);
    let mut files = Vec::new();
    files_under(&store, &mut files);
    for f in &files {
        let b = std::fs::read(f).unwrap();
        assert!(!b.windows(16).any(|w| w == b"PLAINTEXT-MARKER"), "{f:?}");
        assert!(!b.windows(32).any(|w| w == plain_id.0), "{f:?}");
    }
    let config = std::fs::read_to_string(store.join("config.json")).unwrap();
    assert!(config.contains("xchacha20poly1305"), "{config}");

    // No key, a wrong passphrase, a wrong key file: one clear line each.
    let s = store.display().to_string();
    fails(
        None,
        &[&"snapshots", &"--store", &store],
        &["is encrypted", &s, "RECOVERY_PASSWORD"],
    );
    let wrong = "Wrong passphrase or key file for store";
    fails(
        Some("nope"),
        &[&"snapshots", &"--store", &store],
        &[wrong, &s],
    );
    let kf = dir.path().join("other.key");
    std::fs::write(&kf, [7u8; 32]).unwrap();
    fails(
        None,
        &[&"--key-file", &kf, &"verify", &"--store", &store],
        &[wrong],
    );

    // A second backup with changes (a delta manifest), forget, gc, verify.
    let mut changed = image.clone();
    changed[3 * CHUNK + 5] ^= 0xff;
    changed[8 * CHUNK..8 * CHUNK + 4096].fill(0x33);
    std::fs::write(dir.path().join("disk.img"), &changed).unwrap();
    let out = ok(
        Some(PASS),
        &[
            &"backup",
            &"--json",
            &"--name",
            &"vm",
            &"--store",
            &store,
            &dir.path().join("disk.img"),
        ],
    );
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    let second = format!("vm@{}", stats["id"].as_str().unwrap());
    let list = ok(Some(PASS), &[&"snapshots", &"--store", &store]);
    assert!(list.contains("delta"), "{list}");
    assert!(restore_bytes(&store, &second, dir.path()) == changed);
    ok(Some(PASS), &[&"verify", &"--store", &store]);
    ok(Some(PASS), &[&"forget", &"--store", &store, &first]);
    ok(Some(PASS), &[&"gc", &"--store", &store]);
    assert!(restore_bytes(&store, &second, dir.path()) == changed);
    ok(Some(PASS), &[&"verify", &"--store", &store]);

    // Keys: add a key file and a passphrase, remove, never the last one.
    let key_file = dir.path().join("store.key");
    std::fs::write(&key_file, random_image(32, 9)).unwrap();
    let added = |out: Output| -> String {
        assert!(out.status.success(), "{out:?}");
        let line = String::from_utf8(out.stdout).unwrap();
        line.trim()
            .strip_prefix("Added key ")
            .expect("Added key ID")
            .to_string()
    };
    let file_slot = added(
        recovery_cli()
            .env("RECOVERY_PASSWORD", PASS)
            .args(["key", "add", "--store"])
            .arg(&store)
            .arg("--new-key-file")
            .arg(&key_file)
            .args(KDF)
            .output()
            .unwrap(),
    );
    let second_slot = added(
        recovery_cli()
            .env("RECOVERY_PASSWORD", PASS)
            .env("RECOVERY_NEW_PASSWORD", "second passphrase")
            .args(["key", "add", "--store"])
            .arg(&store)
            .args(KDF)
            .output()
            .unwrap(),
    );
    let slots: serde_json::Value = serde_json::from_str(&ok(
        None,
        &[
            &"--key-file",
            &key_file,
            &"key",
            &"list",
            &"--store",
            &store,
            &"--json",
        ],
    ))
    .unwrap();
    let ids: Vec<String> = slots
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3, "{slots}");
    let kinds = slots
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "key-file")
        .count();
    assert_eq!(kinds, 1, "{slots}");
    let first_slot = ids
        .iter()
        .find(|i| ![&file_slot, &second_slot].contains(i))
        .unwrap();
    ok(
        Some("second passphrase"),
        &[&"snapshots", &"--store", &store],
    );
    // The original passphrase removed: it no longer opens the store.
    ok(
        Some(PASS),
        &[&"key", &"remove", &"--store", &store, first_slot],
    );
    fails(Some(PASS), &[&"snapshots", &"--store", &store], &[wrong]);
    let keep = "second passphrase";
    ok(
        Some(keep),
        &[&"key", &"remove", &"--store", &store, &file_slot],
    );
    fails(
        None,
        &[&"--key-file", &key_file, &"snapshots", &"--store", &store],
        &[wrong],
    );
    fails(
        Some(keep),
        &[&"key", &"remove", &"--store", &store, &second_slot],
        &["last key"],
    );
    assert!(restore_bytes_with(&store, &second, dir.path(), keep) == changed);

    // An unencrypted store has no keys.
    let plain = dir.path().join("plain");
    ok(None, &[&"init", &plain]);
    fails(
        None,
        &[&"key", &"list", &"--store", &plain],
        &["not encrypted"],
    );
}

fn restore_bytes_with(store: &Path, snap: &str, dir: &Path, pass: &str) -> Vec<u8> {
    let out = dir.join("restored.img");
    let _ = std::fs::remove_file(&out);
    ok(Some(pass), &[&"restore", &"--store", &store, &snap, &out]);
    std::fs::read(&out).unwrap()
}

/// Where chunk `index` of `snap` is stored: (pack path, record offset,
/// stored length).
fn record_of(store: &Path, snap: &str, index: u64) -> (PathBuf, u64, u32, String) {
    let secret = store::crypto::Secret::passphrase(PASS).unwrap();
    let s = store::Store::open_keyed(store, Some(&secret)).unwrap();
    let reader = s.open_snapshot(snap).unwrap();
    let id = reader.chunk_id(index).unwrap().expect("a stored chunk");
    let loc = s.index().lookup(&id).unwrap().expect("an indexed chunk");
    (
        store.join(loc.pack.pack_key()),
        loc.offset,
        loc.stored_len,
        id.to_string(),
    )
}

fn flip(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn tampered_changed_or_swapped_objects_fail_authentication_never_wrong_data() {
    let dir = tempfile::tempdir().unwrap();
    // Random chunks: stored uncompressed, so all records have one length.
    let image = random_image(16 * CHUNK, 5);
    let (store, snap) = encrypted_backup(dir.path(), &image, "64K");
    let header = store::format::RECORD_HEADER_LEN as u64;

    // 1. A changed ciphertext byte in chunk 3.
    let (pack, off, len, id3) = record_of(&store, &snap, 3);
    flip(&pack, off + header + 24 + u64::from(len) / 2);
    // 2. Chunks 6 and 7 swapped: their sealed bodies trade places (the
    //    headers stay, so the index still finds each "record").
    let (p6, o6, l6, id6) = record_of(&store, &snap, 6);
    let (p7, o7, l7, id7) = record_of(&store, &snap, 7);
    assert_eq!((&p6, l6), (&p7, l7));
    let f = OpenOptions::new().read(true).write(true).open(&p6).unwrap();
    let mut b6 = vec![0u8; l6 as usize];
    let mut b7 = vec![0u8; l7 as usize];
    f.read_exact_at(&mut b6, o6 + header).unwrap();
    f.read_exact_at(&mut b7, o7 + header).unwrap();
    f.write_all_at(&b7, o6 + header).unwrap();
    f.write_all_at(&b6, o7 + header).unwrap();
    f.sync_all().unwrap();
    // 3. A tampered record header byte (the stored plaintext length) of chunk 10.
    let (p10, o10, _, id10) = record_of(&store, &snap, 10);
    flip(&p10, o10 + 33);

    // restore refuses, naming a chunk; never writes wrong data silently.
    let out = cli(
        Some(PASS),
        &[
            &"restore",
            &"--store",
            &store,
            &snap,
            &dir.path().join("r.img"),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        [&id3, &id6, &id7, &id10]
            .iter()
            .any(|id| err.contains(id.as_str())),
        "{err}"
    );
    // verify names every damaged chunk.
    let out = cli(Some(PASS), &[&"verify", &"--store", &store]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report = String::from_utf8_lossy(&out.stdout);
    for id in [&id3, &id6, &id7, &id10] {
        assert!(report.contains(id.as_str()), "{id} missing: {report}");
    }

    // instant-boot: EIO for the guest on those chunks, data elsewhere.
    let log = dir.path().join("daemon.log");
    let daemon = BootDaemon::start_logged(
        &store,
        &snap,
        dir.path(),
        &[],
        None,
        &log,
        &[("RECOVERY_PASSWORD", PASS)],
    );
    let mut client = Client::connect(&daemon.socket, CHUNK * 2);
    let cs = CHUNK as u64;
    for c in 0..16u64 {
        let got = client.read(c * cs, CHUNK);
        if [3, 6, 7, 10].contains(&c) {
            assert_eq!(got, Err(EIO), "chunk {c}");
        } else {
            assert!(
                got.unwrap() == image[c as usize * CHUNK..(c as usize + 1) * CHUNK],
                "chunk {c}"
            );
        }
    }
    drop(client);
    daemon.stop();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains(id3.as_str()), "{log}");

    // 4. A tampered manifest byte: an authentication error naming it.
    let id = snap.split('@').nth(1).unwrap();
    let manifest = store.join(format!("snapshots/vm/{id}.snap"));
    flip(&manifest, 100);
    let err = fails(
        Some(PASS),
        &[
            &"restore",
            &"--store",
            &store,
            &snap,
            &dir.path().join("r2.img"),
        ],
        &["Authentication failed", &format!("snapshots/vm/{id}.snap")],
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn guest_boots_from_an_encrypted_store_and_files_are_browsable() {
    let guest = require_guest!();
    let dir = tempfile::tempdir().unwrap();
    let image = guest.copy_root(dir.path());
    let store = dir.path().join("store");
    ok(
        Some(PASS),
        &[
            &"init",
            &store,
            &"--encrypt",
            &KDF[0],
            &KDF[1],
            &KDF[2],
            &KDF[3],
        ],
    );
    ok(
        Some(PASS),
        &[&"backup", &"--name", &"guest", &"--store", &store, &image],
    );
    std::fs::remove_file(&image).unwrap();

    // File-level: ls through the encrypted store.
    let ls = ok(Some(PASS), &[&"ls", &"--store", &store, &"guest", &"/"]);
    assert!(!ls.trim().is_empty(), "{ls}");

    let log = dir.path().join("daemon.log");
    let daemon = BootDaemon::start_logged(
        &store,
        "guest",
        dir.path(),
        &["--queues", "1"],
        None,
        &log,
        &[("RECOVERY_PASSWORD", PASS)],
    );
    let run = run_to_completion(guest.qemu_vhost_user_cmd(&daemon.socket, &[]), BOOT_TIMEOUT);
    run.assert_clean_boot();
    assert_eq!(run.wrote_boot(), Some("boot-1.txt"), "{run}");
    daemon.stop();
    ok(Some(PASS), &[&"verify", &"--store", &store]);
}

#[test]
fn encrypted_store_on_s3_seals_everything_the_server_holds() {
    use crate::s3::server::Moto;
    use store::crypto::{KdfParams, Secret};
    use store::ErrorKind;
    let moto = crate::require_moto!();
    let bucket = moto.bucket("encrypted");
    let dir = tempfile::tempdir().unwrap();
    let loc = format!("s3://{bucket}/enc");
    let opts = Moto::options(&moto.endpoint(), &dir.path().join("cache"));
    let o = store::location::s3_options(&bucket, "enc", &opts).unwrap();
    let raw = std::sync::Arc::new(store::backend::S3Backend::new(&o).unwrap());
    let secret = Secret::passphrase(PASS).unwrap();
    let kdf = KdfParams {
        m_cost_kib: 8 << 10,
        t_cost: 1,
        p_cost: 1,
    };
    let s = store::Store::init_encrypted_in(o.cache_dir.clone(), raw.clone(), 65536, &secret, &kdf)
        .unwrap();
    let img = dir.path().join("disk.img");
    let mut data = random_image(24 * CHUNK, 3);
    data[CHUNK..CHUNK + 16].copy_from_slice(b"PLAINTEXT-MARKER");
    data[5 * CHUNK..6 * CHUNK].fill(0);
    std::fs::write(&img, &data).unwrap();
    let st = s
        .backup("vm", &img, &store::BackupOptions::default())
        .unwrap();
    let snap = format!("vm@{}", st.snapshot);

    // Every object on the server: no plaintext, no plaintext id.
    use store::backend::Backend;
    let plain_id = store::ChunkId::of(&data[CHUNK..2 * CHUNK]);
    let mut keys = Vec::new();
    let mut dirs = vec![String::new()];
    while let Some(d) = dirs.pop() {
        for n in raw.list(&d).unwrap() {
            let k = if d.is_empty() { n } else { format!("{d}/{n}") };
            match raw.read(&k) {
                Ok(b) => keys.push((k, b)),
                Err(_) => dirs.push(k),
            }
        }
    }
    assert!(keys.iter().any(|(k, _)| k.starts_with("keys/")), "{keys:?}");
    assert!(keys.iter().any(|(k, _)| k.starts_with("snapshots/")));
    for (k, b) in &keys {
        assert!(!b.windows(16).any(|w| w == b"PLAINTEXT-MARKER"), "{k}");
        assert!(!b.windows(32).any(|w| w == plain_id.0), "{k}");
    }

    // A fresh open through the location: needs the key, then reads back.
    let fresh = Moto::options(&moto.endpoint(), &dir.path().join("cache2"));
    let e = store::Store::open_location(&loc, &fresh).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::KeyRequired, "{e}");
    store::crypto::set_secret_provider(std::sync::Arc::new(|_: &str| Secret::passphrase(PASS)));
    let again = store::Store::open_location(&loc, &fresh).unwrap();
    assert!(again.is_encrypted());
    let out = dir.path().join("out.img");
    again
        .restore(&snap, &out, &store::RestoreOptions::default())
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == data);

    // A changed ciphertext byte in an uploaded pack: refused, never data.
    let r = again.open_snapshot(&snap).unwrap();
    let id = r.chunk_id(2).unwrap().expect("stored");
    let loc2 = again.index().lookup(&id).unwrap().expect("indexed");
    let key = loc2.pack.pack_key();
    let mut pack = raw.read(&key).unwrap();
    let at = loc2.offset as usize + store::format::RECORD_HEADER_LEN + 30;
    pack[at] ^= 1;
    raw.put(&key, &pack).unwrap();
    drop(r);
    let s3 = store::Store::open_location(
        &loc,
        &Moto::options(&moto.endpoint(), &dir.path().join("cache3")),
    )
    .unwrap();
    let mut buf = Vec::new();
    let e = s3.read_chunk(&id, &mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:?}");
    assert!(format!("{e:?}").contains("Authentication failed"), "{e:?}");
    let report = s3.verify(None, &store::VerifyOptions::default()).unwrap();
    assert!(!report.problems.is_empty());
}

#[test]
fn cli_init_encrypt_on_s3_then_backup_and_restore_with_the_key() {
    use crate::s3::server::Moto;
    let moto = crate::require_moto!();
    let bucket = moto.bucket("encrypted-cli");
    let dir = tempfile::tempdir().unwrap();
    let loc = format!("s3://{bucket}/enc");
    let run = |pass: Option<&str>, args: &[&dyn AsRef<OsStr>]| -> Output {
        let mut c = recovery_cli();
        c.env_remove("RECOVERY_PASSWORD")
            .env_remove("RECOVERY_KEY_FILE");
        Moto::env(&mut c, &moto.endpoint(), &dir.path().join("cache"));
        if let Some(p) = pass {
            c.env("RECOVERY_PASSWORD", p);
        }
        for a in args {
            c.arg(a);
        }
        c.output().unwrap()
    };
    let out = run(
        Some(PASS),
        &[
            &"init",
            &loc,
            &"--encrypt",
            &KDF[0],
            &KDF[1],
            &KDF[2],
            &KDF[3],
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Created encrypted store s3://"),
        "{out:?}"
    );
    assert!(!Path::new("s3:").exists(), "init made a local directory");
    let img = dir.path().join("disk.img");
    let data = image_with_holes(8, 4);
    std::fs::write(&img, &data).unwrap();
    let out = run(
        Some(PASS),
        &[&"backup", &"--name", &"vm", &"--store", &loc, &img],
    );
    assert!(out.status.success(), "{out:?}");
    let out = run(None, &[&"snapshots", &"--store", &loc]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is encrypted"),
        "{out:?}"
    );
    let restored = dir.path().join("r.img");
    let out = run(
        Some(PASS),
        &[&"restore", &"--store", &loc, &"vm", &restored],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read(&restored).unwrap() == data);
    let out = run(
        Some(PASS),
        &[
            &"init",
            &loc,
            &"--encrypt",
            &KDF[0],
            &KDF[1],
            &KDF[2],
            &KDF[3],
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}
