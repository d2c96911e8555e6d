//! The chunk cache shared by every queue worker.
//!
//! Values are whole plaintext chunks ([`ChunkData`]) keyed by content key,
//! so deduplicated chunks are cached once. The cache is split into shards
//! by key; each shard has its own byte budget (`budget / shards`) and its
//! own lock, so 16 workers rarely meet. Small budgets get fewer shards
//! (at least 8 MiB each), so a shard always holds a few of the largest
//! (4 MiB) chunks.
//!
//! **Eviction** is CLOCK (second chance): a hit only sets the entry's
//! reference bit under the shard's *read* lock, so concurrent hits never
//! serialise. New entries start unreferenced, which makes a one-pass scan
//! (the background copier reading every chunk once) evict itself before it
//! evicts the guest's hot chunks. A value larger than a shard's budget is
//! returned but not cached.
//!
//! **Single flight.** The first thread to miss a key registers an in-flight
//! fetch and reads the chunk outside any lock; threads missing the same key
//! meanwhile wait for that fetch and share its result, so a chunk is read
//! once however many workers want it. A failed fetch is reported to every
//! waiter and is not cached: the next request tries again. If the fetching
//! closure panics, the waiters get an error instead of waiting forever.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

/// The default byte budget (`--cache-size`): 256 MiB.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

/// Most shards. A power of two.
const MAX_SHARDS: usize = 16;

/// Least budget per shard when there is more than one.
const MIN_SHARD_BYTES: u64 = 8 << 20;

/// Number of shards for `budget`: a power of two, 1..=16.
fn shard_count(budget: u64) -> usize {
    let n = (budget / MIN_SHARD_BYTES).clamp(1, MAX_SHARDS as u64) as usize;
    // Round down to a power of two.
    1 << (usize::BITS - 1 - n.leading_zeros())
}

/// A content key (the store's chunk hash).
pub type ChunkKey = [u8; 32];

/// Folds a key's four words into one (FNV-style). Keys are already
/// cryptographic hashes, so this needs no DoS-resistant hasher (SipHash was
/// a tenth of a cached read's CPU); it still mixes every byte because test
/// keys may not be hashes.
fn mix(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for word in key.chunks_exact(8) {
        let w = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
        h = (h ^ w).wrapping_mul(0x0100_0000_01b3).rotate_left(29);
    }
    h
}

/// The hasher of the cache's maps: [`mix`] of the key bytes.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 ^= mix(bytes);
    }

    // The array's length prefix carries nothing: every key is 32 bytes.
    fn write_usize(&mut self, _: usize) {}
}

type KeyMap<V> = HashMap<ChunkKey, V, BuildHasherDefault<KeyHasher>>;

/// Counters of a [`ChunkCache`], all since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups served from the cache.
    pub hits: u64,
    /// Lookups that fetched from the source.
    pub misses: u64,
    /// Lookups that waited for another thread's fetch of the same key.
    pub coalesced: u64,
    /// Entries evicted to stay within the budget.
    pub evictions: u64,
    /// Fetches that failed.
    pub errors: u64,
    /// Bytes currently cached.
    pub bytes: u64,
    /// Entries currently cached.
    pub entries: u64,
    /// The byte budget.
    pub budget: u64,
}

impl CacheStats {
    /// Fraction of lookups that did not read the source (hits and
    /// coalesced waits), or 0 before the first lookup.
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses + self.coalesced;
        if total == 0 {
            0.0
        } else {
            (self.hits + self.coalesced) as f64 / total as f64
        }
    }
}

/// A cached chunk: the buffer it was fetched into, shared. (An `Arc<[u8]>`
/// would cost a second allocation and a copy of every chunk fetched.)
pub type ChunkData = Arc<Vec<u8>>;

struct Slot {
    key: ChunkKey,
    data: ChunkData,
    referenced: AtomicBool,
}

/// The outcome of a fetch, shared with every waiter. `io::Error` is not
/// `Clone`, so errors travel as kind + message.
type Shared = Result<ChunkData, (io::ErrorKind, String)>;

struct InFlight {
    result: Mutex<Option<Shared>>,
    done: Condvar,
}

impl InFlight {
    fn wait(&self) -> io::Result<ChunkData> {
        let mut guard = self.result.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(result) = guard.as_ref() {
                return result
                    .clone()
                    .map_err(|(kind, msg)| io::Error::new(kind, msg));
            }
            guard = self.done.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn complete(&self, result: Shared) {
        let mut guard = self.result.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(result);
        }
        self.done.notify_all();
    }
}

#[derive(Default)]
struct ShardInner {
    index: KeyMap<usize>,
    slots: Vec<Slot>,
    hand: usize,
    bytes: u64,
    inflight: KeyMap<Arc<InFlight>>,
}

impl ShardInner {
    /// The entry for `key`, marked referenced.
    fn slot(&self, key: &ChunkKey) -> Option<&Slot> {
        let slot = &self.slots[*self.index.get(key)?];
        slot.referenced.store(true, Ordering::Relaxed);
        Some(slot)
    }

    fn lookup(&self, key: &ChunkKey) -> Option<ChunkData> {
        self.slot(key).map(|slot| slot.data.clone())
    }

    /// Evicts until `incoming` more bytes fit in `budget`; returns the
    /// number of entries evicted.
    fn make_room(&mut self, incoming: u64, budget: u64) -> u64 {
        let mut evicted = 0;
        while self.bytes + incoming > budget && !self.slots.is_empty() {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let slot = &self.slots[self.hand];
            if slot.referenced.swap(false, Ordering::Relaxed) {
                self.hand += 1;
                continue;
            }
            let victim = self.slots.swap_remove(self.hand);
            self.index.remove(&victim.key);
            self.bytes -= victim.data.len() as u64;
            if let Some(moved) = self.slots.get(self.hand) {
                self.index.insert(moved.key, self.hand);
            }
            evicted += 1;
        }
        evicted
    }

    fn insert(&mut self, key: ChunkKey, data: ChunkData) {
        if self.index.contains_key(&key) {
            return;
        }
        self.bytes += data.len() as u64;
        self.index.insert(key, self.slots.len());
        self.slots.push(Slot {
            key,
            data,
            referenced: AtomicBool::new(false),
        });
    }
}

#[derive(Default)]
struct Shard {
    inner: RwLock<ShardInner>,
}

/// Completes an in-flight fetch with an error if the fetcher unwinds.
struct FetchGuard<'a> {
    cache: &'a ChunkCache,
    shard: &'a Shard,
    key: ChunkKey,
    flight: Arc<InFlight>,
    armed: bool,
}

impl Drop for FetchGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.cache
                .finish(self.shard, self.key, &self.flight, None, false);
        }
    }
}

/// A sharded, single-flight, CLOCK-evicted cache of chunks. See the module doc.
pub struct ChunkCache {
    shards: Box<[Shard]>,
    shard_mask: usize,
    shard_budget: u64,
    budget: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    evictions: AtomicU64,
    errors: AtomicU64,
}

impl Default for ChunkCache {
    fn default() -> Self {
        ChunkCache::new(DEFAULT_CACHE_BYTES)
    }
}

impl ChunkCache {
    /// A cache holding at most `budget` bytes of chunk data. A budget of 0
    /// caches nothing but still coalesces concurrent fetches.
    pub fn new(budget: u64) -> ChunkCache {
        let n = shard_count(budget);
        ChunkCache {
            shards: (0..n).map(|_| Shard::default()).collect(),
            shard_mask: n - 1,
            shard_budget: budget / n as u64,
            budget,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &ChunkKey) -> &Shard {
        &self.shards[(mix(key) >> 32) as usize & self.shard_mask]
    }

    /// Whether `key` is cached (counts as nothing, touches no entry).
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.shard(key)
            .inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .index
            .contains_key(key)
    }

    /// The cached chunk for `key`, if any (counts as a hit).
    pub fn get(&self, key: &ChunkKey) -> Option<ChunkData> {
        let shard = self.shard(key);
        let found = shard
            .inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .lookup(key);
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Runs `f` on the cached chunk for `key`, if any (counts as a hit),
    /// under the shard's read lock and without taking a reference to the
    /// chunk: on a warm 4 KiB read, the `Arc` clone's atomic increment on
    /// the chunk's (cold) header cost more than the lookup itself. `f`
    /// should be short (a copy out): inserts into the shard wait for it.
    pub fn with_cached<R>(&self, key: &ChunkKey, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let inner = self
            .shard(key)
            .inner
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let result = f(&inner.slot(key)?.data);
        drop(inner);
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(result)
    }

    /// The chunk for `key`: from the cache, or from another thread's fetch
    /// in flight, or else read with `fetch` (outside any lock) and cached.
    pub fn get_or_fetch<F>(&self, key: &ChunkKey, fetch: F) -> io::Result<ChunkData>
    where
        F: FnOnce() -> io::Result<Vec<u8>>,
    {
        self.lookup_or_fetch(key, fetch, true)
    }

    /// Like [`ChunkCache::get_or_fetch`], but a chunk this call fetches is
    /// not inserted: for one-pass readers such as the background copier,
    /// which should not push the guest's working set out.
    pub fn get_or_fetch_transient<F>(&self, key: &ChunkKey, fetch: F) -> io::Result<ChunkData>
    where
        F: FnOnce() -> io::Result<Vec<u8>>,
    {
        self.lookup_or_fetch(key, fetch, false)
    }

    fn lookup_or_fetch<F>(&self, key: &ChunkKey, fetch: F, insert: bool) -> io::Result<ChunkData>
    where
        F: FnOnce() -> io::Result<Vec<u8>>,
    {
        if let Some(data) = self.get(key) {
            return Ok(data);
        }
        let shard = self.shard(key);
        let flight = {
            let mut inner = shard.inner.write().unwrap_or_else(|e| e.into_inner());
            if let Some(data) = inner.lookup(key) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(data);
            }
            if let Some(flight) = inner.inflight.get(key) {
                let flight = flight.clone();
                drop(inner);
                self.coalesced.fetch_add(1, Ordering::Relaxed);
                return flight.wait();
            }
            let flight = Arc::new(InFlight {
                result: Mutex::new(None),
                done: Condvar::new(),
            });
            inner.inflight.insert(*key, flight.clone());
            flight
        };
        self.misses.fetch_add(1, Ordering::Relaxed);
        let mut guard = FetchGuard {
            cache: self,
            shard,
            key: *key,
            flight,
            armed: true,
        };
        let result = fetch();
        guard.armed = false;
        match result {
            Ok(data) => {
                // The fetched buffer itself: no second allocation and copy.
                let data: ChunkData = Arc::new(data);
                self.finish(shard, *key, &guard.flight, Some(Ok(data.clone())), insert);
                Ok(data)
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                let shared = (e.kind(), e.to_string());
                self.finish(shard, *key, &guard.flight, Some(Err(shared)), false);
                Err(e)
            }
        }
    }

    /// Removes the in-flight entry, caches a success and wakes the waiters.
    /// `result` is `None` when the fetcher panicked.
    fn finish(
        &self,
        shard: &Shard,
        key: ChunkKey,
        flight: &Arc<InFlight>,
        result: Option<Shared>,
        insert: bool,
    ) {
        {
            let mut inner = shard.inner.write().unwrap_or_else(|e| e.into_inner());
            inner.inflight.remove(&key);
            if let (Some(Ok(data)), true) = (&result, insert) {
                let len = data.len() as u64;
                if len <= self.shard_budget {
                    let evicted = inner.make_room(len, self.shard_budget);
                    self.evictions.fetch_add(evicted, Ordering::Relaxed);
                    inner.insert(key, data.clone());
                }
            }
        }
        flight
            .complete(result.unwrap_or_else(|| {
                Err((io::ErrorKind::Other, "chunk fetch panicked".to_string()))
            }));
    }

    /// Drops every cached chunk (fetches in flight are unaffected).
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let mut inner = shard.inner.write().unwrap_or_else(|e| e.into_inner());
            inner.index.clear();
            inner.slots.clear();
            inner.hand = 0;
            inner.bytes = 0;
        }
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        let (mut bytes, mut entries) = (0, 0);
        for shard in self.shards.iter() {
            let inner = shard.inner.read().unwrap_or_else(|e| e.into_inner());
            bytes += inner.bytes;
            entries += inner.slots.len() as u64;
        }
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            coalesced: self.coalesced.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            bytes,
            entries,
            budget: self.budget,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Barrier;
    use std::time::Duration;

    fn key(n: u64) -> ChunkKey {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&n.to_le_bytes());
        k
    }

    #[test]
    fn concurrent_misses_fetch_once() {
        let cache = ChunkCache::new(1 << 20);
        let fetches = AtomicUsize::new(0);
        let barrier = Barrier::new(16);
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    barrier.wait();
                    let data = cache
                        .get_or_fetch(&key(1), || {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(100));
                            Ok(vec![42u8; 4096])
                        })
                        .unwrap();
                    assert_eq!(&data[..], &[42u8; 4096][..]);
                });
            }
        });
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        let stats = cache.stats();
        assert_eq!(stats.misses, 1);
        assert_eq!(stats.hits + stats.coalesced, 15);
        assert_eq!(stats.entries, 1);
    }

    #[test]
    fn errors_reach_every_waiter_and_are_not_cached() {
        let cache = ChunkCache::new(1 << 20);
        let fetches = AtomicUsize::new(0);
        let barrier = Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    barrier.wait();
                    let err = cache
                        .get_or_fetch(&key(3), || {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(100));
                            Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "chunk 3 is corrupt",
                            ))
                        })
                        .unwrap_err();
                    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
                    assert!(err.to_string().contains("corrupt"));
                });
            }
        });
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert_eq!(cache.stats().entries, 0);
        // The next request fetches again and can succeed.
        let data = cache.get_or_fetch(&key(3), || Ok(vec![1; 10])).unwrap();
        assert_eq!(&data[..], &[1; 10]);
        assert_eq!(cache.stats().misses, 2);
    }

    #[test]
    fn a_panicking_fetch_fails_waiters_instead_of_hanging() {
        let cache = ChunkCache::new(1 << 20);
        let barrier = Barrier::new(2);
        std::thread::scope(|s| {
            let fetcher = s.spawn(|| {
                let _ = cache.get_or_fetch(&key(9), || {
                    barrier.wait();
                    std::thread::sleep(Duration::from_millis(100));
                    panic!("fetch blew up");
                });
            });
            barrier.wait();
            let err = cache.get_or_fetch(&key(9), || Ok(vec![0; 1])).map(|_| ());
            // Either we joined the doomed flight (error) or arrived after it (fetched).
            if let Err(e) = err {
                assert!(e.to_string().contains("panicked"));
            }
            assert!(fetcher.join().is_err());
        });
        assert_eq!(
            &cache.get_or_fetch(&key(9), || Ok(vec![5])).unwrap()[..],
            &[5]
        );
    }

    #[test]
    fn shard_counts_follow_the_budget() {
        assert_eq!(shard_count(0), 1);
        assert_eq!(shard_count(15 << 20), 1);
        assert_eq!(shard_count(16 << 20), 2);
        assert_eq!(shard_count(40 << 20), 4);
        assert_eq!(shard_count(256 << 20), 16);
        assert_eq!(shard_count(u64::MAX), 16);
        // Whatever the budget, the largest chunk fits in a shard.
        let cache = ChunkCache::new(24 << 20);
        cache
            .get_or_fetch(&key(1), || Ok(vec![0; 4 << 20]))
            .unwrap();
        assert!(cache.get(&key(1)).is_some());
    }

    #[test]
    fn budget_is_respected_and_hot_entries_survive_a_scan() {
        let budget = 32 << 20; // 4 shards of 8 MiB: 128 chunks of 64 KiB each.
        let cache = ChunkCache::new(budget);
        for round in 0..3 {
            for i in 0..2000u64 {
                let data = cache
                    .get_or_fetch(&key(i), || Ok(vec![i as u8; 64 << 10]))
                    .unwrap();
                assert_eq!(data[0], i as u8);
                // Key 0..4 are hot: touched after every insert.
                let _ = cache.get(&key(i % 4));
                assert!(cache.stats().bytes <= budget, "round {round}: over budget");
            }
        }
        let stats = cache.stats();
        assert!(stats.evictions > 0);
        for hot in 0..4 {
            assert!(
                cache.get(&key(hot)).is_some(),
                "hot key {hot} was evicted by a scan"
            );
        }
    }

    #[test]
    fn with_cached_serves_hits_only_and_keeps_them_hot() {
        let cache = ChunkCache::new(32 << 20);
        assert_eq!(cache.with_cached(&key(0), |_| panic!("not cached")), None);
        cache
            .get_or_fetch(&key(0), || Ok(vec![7; 64 << 10]))
            .unwrap();
        let hits = cache.stats().hits;
        assert_eq!(
            cache.with_cached(&key(0), |d| (d.len(), d[5])),
            Some((64 << 10, 7))
        );
        assert_eq!(cache.stats().hits, hits + 1);
        // Touched only through with_cached, key 0 survives a scan.
        for i in 1..2000u64 {
            cache
                .get_or_fetch(&key(i), || Ok(vec![0; 64 << 10]))
                .unwrap();
            assert!(
                cache.with_cached(&key(0), |_| ()).is_some(),
                "evicted at {i}"
            );
        }
        assert!(cache.stats().evictions > 0);
    }

    #[test]
    fn transient_fetches_are_not_cached_and_oversized_values_are_skipped() {
        let cache = ChunkCache::new(16 * 4096);
        cache
            .get_or_fetch_transient(&key(1), || Ok(vec![1; 100]))
            .unwrap();
        assert!(cache.get(&key(1)).is_none());
        cache
            .get_or_fetch(&key(2), || Ok(vec![1; 17 * 4096]))
            .unwrap();
        assert!(cache.get(&key(2)).is_none());
        cache.get_or_fetch(&key(3), || Ok(vec![1; 4096])).unwrap();
        assert!(cache.get(&key(3)).is_some());
        // A transient lookup still hits a cached entry.
        cache
            .get_or_fetch_transient(&key(3), || panic!("must hit"))
            .unwrap();
        cache.clear();
        assert_eq!(cache.stats().bytes, 0);
        assert!(cache.get(&key(3)).is_none());
    }

    #[test]
    fn zero_budget_caches_nothing() {
        let cache = ChunkCache::new(0);
        cache.get_or_fetch(&key(1), || Ok(vec![1; 1])).unwrap();
        assert_eq!(cache.stats().entries, 0);
        assert_eq!(cache.stats().hit_rate(), 0.0);
    }
}
