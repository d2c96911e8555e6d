//! Deduplicating, compressed, content-addressed chunk store for VM disk
//! images.
//!
//! # Model
//! A store is a directory. An image (`web01`) is cut into fixed-size chunks
//! aligned to the disk (a power of two from 4 KiB to 4 MiB, fixed per store,
//! default 64 KiB), because VM images change in place at block granularity.
//! A chunk's id ([`ChunkId`]) is the blake3 hash of its plaintext (keyed
//! blake3 in an encrypted store). Chunks are
//! lz4-compressed (kept raw when that does not save space) and appended to
//! pack files; all-zero chunks are never stored. Each backup publishes an
//! immutable snapshot manifest that lists, for every chunk index, a chunk id
//! or "zero".
//!
//! # Layout
//! ```text
//! STORE/
//!   config.json                   {"format":"instant-recovery-store","version":1,"chunk_size":N}
//!                                 (version 4 once a patch record is written, see Patches)
//!   lock                          writer lock (flock), holds the writer's PID
//!   packs/<2 hex>/<pack>.pack     immutable chunk records          (pack.rs)
//!   index/<pack>.idx              per-pack sorted index            (index/idx.rs)
//!   index/merged-<gen>.midx       merged sorted index with fanout  (index/midx.rs)
//!   snapshots/<name>/<id>.snap    manifests: full (v1) or delta (v2) (snapshot/manifest.rs, delta.rs)
//!   snapshots/<name>/<id>.snap.forgotten   forgotten, awaiting gc
//!   holds/<name>/<id>/<holder>.json        a hold on a snapshot   (hold.rs)
//!   keys/<16 hex>                 encrypted store only: key slots  (crypto/keyslot.rs)
//!   tmp/                          temp files, swept by the next writer
//! ```
//! An encrypted store (`init --encrypt`, config version 2 with an
//! `encryption` section) seals every chunk record (AES-256-GCM with a key per
//! record; XChaCha20-Poly1305 in stores made before), index and manifest
//! (XChaCha20-Poly1305) under a master key wrapped by argon2id in `keys/`;
//! config, key slots, holds and drill records stay plaintext metadata. See
//! [`crypto`] (formats, key wrapping, threat model).
//!
//! Magic numbers, versions and header layouts live in [`format`](mod@format) (do not
//! modify). All I/O on packs, indexes and manifests goes through the
//! [`backend::Backend`] trait: objects are published whole and atomically and
//! never rewritten in place, so an object-store backend can follow.
//!
//! # Index
//! Opening a store never loads the whole index. Per-pack `.idx` files (about
//! a thousand entries each) are loaded only while unmerged; once more than
//! [`index::MERGE_THRESHOLD`] exist, the writer merges them into a new
//! `merged-<gen>.midx`: a header, the pack table, a 65536-bucket fanout and
//! 48-byte sorted entries. Open reads ~0.5 MiB (fanout) + 16 B per pack; a
//! lookup is a handful of `pread`s inside one fanout bucket.
//!
//! # Durability
//! Every object is published as: write to `tmp/`, fsync, rename into place,
//! fsync the directory. Order within a backup: pack → its `.idx` → (more
//! packs) → manifest. So an index never names a pack that is not durable and
//! a manifest never names a chunk that is not durable and indexed. A crash or
//! `ENOSPC` at any point leaves: temp files (deleted by the next writer),
//! and possibly packs no manifest references (a failed backup deletes its own
//! packs; a killed one leaves them for dedup by the next backup or for gc).
//! No partial snapshot is ever visible. Every read re-hashes the chunk and
//! compares it with its id: corruption is an error naming the chunk, pack and
//! offset, never wrong data.
//!
//! # Points: delta manifests
//! A protection point (or any backup with a parent) whose manifest differs
//! from its parent's *base* full manifest in at most `chunk_count / 64`
//! entries is published as a version 2 *delta manifest*: the same header,
//! metadata naming the `base`, and the sorted `(chunk index, chunk id)`
//! entries that differ from the base, merged since it (see
//! [`snapshot::delta`]). Otherwise the snapshot is a full manifest, which
//! becomes the base of the next points (compaction). So:
//! - store growth per point is O(changes since the base), bounded by
//!   1/64 of a full manifest (64 GiB image: ≤ 640 KiB instead of 32 MiB);
//! - a read at any depth is one binary search in the (in-memory) delta, else
//!   one `pread` of the base: O(log n) per chunk, never a walk of a chain;
//! - nothing depends on a delta, so `forget` of any point keeps every other
//!   point readable; a forgotten base that a live delta (or a reader of one)
//!   names stays alive for gc, manifest and chunks, until no delta names it;
//! - `verify` checks each delta's trailer and its base; a missing or
//!   unreadable base is "Broken chain: snapshot A is a delta on base
//!   snapshot B, which is missing".
//!
//! Crash guarantees are those of any manifest: the delta is published last
//! (temp file, fsync, rename, directory fsync) after every pack it names, so
//! a kill -9 while a point is written leaves no point or a whole one, and
//! the next point (diffed against the newest complete one) is complete.
//!
//! Points are ordinary snapshots: [`Store::resolve_at`] picks the newest
//! at or before a time ([`point`]), and `forget --keep-*` applies restic's
//! retention ([`retention`]) to backups and points alike.
//!
//! # Patches: sub-chunk deltas
//! A live incremental knows which 4 KiB grains of a chunk changed. A chunk
//! changed in part is stored as a *patch record* ([`patch`]): the base
//! chunk's id and only the changed grains, in a pack record flagged
//! [`format::RECORD_FLAG_PATCH`] whose id is a domain-separated hash of the
//! payload ([`chunk::Codec::patch_id`]). Index entries carry a patch bit.
//! - Chains: a patch's base is chunk data or another patch. A new patch
//!   over a parent patch holds only the new grains, over that patch; a
//!   chain is at most [`format::MAX_PATCH_CHAIN`] patches deep (at that
//!   depth the new grains merge into the top patch, over its base), and
//!   once it would replace more than half the chunk, the chunk is
//!   materialized (stored whole). A read is at most that many record reads
//!   plus one. Writers learn a parent patch's depth from the store's hints
//!   of the patches written lately ([`patch::ChainHints`]), or read its
//!   chain.
//! - Every chunk read ([`Store::read_chunk`], the pack-span path of
//!   restore and copy, verify) resolves a patch as base + grains, down the
//!   chain; a missing or damaged base or patch is an error, never data.
//! - gc marks the base of every live patch, down each chain; copy sends
//!   bases along (same ids) or materializes (translated ids).
//! - `config.json` version 4 marks a store that may hold patch chains
//!   (version 3, written by earlier programs: patches of depth one, read
//!   the same way); it is upgraded before the first patch is written, so
//!   older programs refuse it at open. See `docs/ARCHITECTURE.md` (Patch
//!   records).
//!
//! # Concurrency
//! | operation          | lock                                   | runs concurrently with |
//! |--------------------|----------------------------------------|------------------------|
//! | backup             | writer lock (exclusive, non-blocking)  | readers, forget        |
//! | gc                 | writer lock                            | readers, forget        |
//! | index merge        | writer lock (inside backup or gc)      | readers                |
//! | forget             | none (one atomic rename; refuses a held snapshot unless forced) | everything |
//! | unforget           | writer lock (so never during gc)       | readers, forget        |
//! | add/remove hold    | none (one atomic publish / delete)     | everything             |
//! | restore, verify, `SnapshotReader` (instant boot) | shared flock on each manifest they use | everything |
//! | snapshots, resolve | none                                   | everything             |
//!
//! A second writer fails at once with "Store … is locked by PID n".
//!
//! # Holds
//! Something outside the store that depends on a snapshot (an instant-boot
//! state dir, whose overlay is only meaningful on top of it) records a hold:
//! `holds/<name>/<id>/<holder>.json`, a small JSON object
//! `{"snapshot","holder","description","host","pid","created"}` published
//! atomically. The holder picks a stable `holder` id (e.g. a UUID kept in its
//! state dir), so [`Store::add_hold`] is idempotent across restarts;
//! [`Store::remove_hold`] releases it. `forget` refuses a held snapshot,
//! naming the holders, unless forced; a forgotten snapshot that is still held
//! is live for gc (its manifest and chunks stay), so it can always be brought
//! back with [`Store::unforget`] (`recovery-cli unforget NAME@ID`), and is
//! reclaimed by the first gc after its last hold is removed. See [`hold`].
//!
//! # Forget and garbage collection
//! `forget` renames the manifest to `.snap.forgotten`; until gc deletes it,
//! `unforget` renames it back. gc, under the writer
//! lock, deletes a forgotten manifest only if it can take an exclusive flock
//! on it; a manifest still held by a reader (a booted VM, a restore) or by a
//! hold record counts as live. It marks the chunks of all live manifests in a
//! Bloom filter (false positives only keep garbage), drops packs with no live
//! chunk, repacks packs
//! with enough dead bytes (live chunks verified and copied to new packs,
//! published with their indexes), publishes a new merged index without the
//! old packs, and only then deletes old packs and forgotten manifests. A
//! forgotten full manifest that a live delta names as its base is live.
//! Readers whose index view names a deleted pack reload the index and retry
//! once. A backup cannot run during gc, so a chunk a backup is about to
//! reference (dedup) is never deleted under it. See [`gc`] for details.
#![forbid(unsafe_code)]

pub mod backend;
pub mod backup;
pub mod chunk;
pub mod config;
pub mod copy;
pub mod crypto;
pub mod drill;
pub mod error;
pub mod format;
pub mod gc;
pub mod group;
pub mod hold;
pub mod id;
pub mod index;
pub mod location;
pub mod lock;
pub mod pack;
pub mod patch;
pub mod point;
mod repo;
pub mod restore;
pub mod retention;
pub mod snapshot;
pub mod verify;

pub use backup::{BackupOptions, BackupStats, Progress};
pub use copy::CopyStats;
pub use drill::DrillRecord;
pub use error::{Error, ErrorKind, Result};
pub use gc::{GcOptions, GcStats};
pub use hold::{Hold, HoldInfo};
pub use id::{ChunkId, PackId};
pub use location::{Location, OpenOptions};
pub use repo::Store;
pub use restore::{RestoreOptions, RestoreStats};
pub use retention::{Decision, KeepPolicy};
pub use snapshot::reader::SnapshotReader;
pub use snapshot::SnapshotInfo;
pub use verify::{Problem, ProblemKind, Usage, VerifyOptions, VerifyReport};
