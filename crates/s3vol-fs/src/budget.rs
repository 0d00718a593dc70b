//! Budgets for memory (prefetched reads, in-flight part uploads) and for the disk space of
//! staging files.
//!
//! Memory is a semaphore counted in KiB: a prefetch or an upload takes permits before it
//! allocates and gives them back when its buffer is dropped, so the total stays under
//! `--memory-limit`; at the limit, callers wait. Disk counts the bytes of staging files; a
//! writer that would take it over `--cache-size` waits until uploads finish and staging files
//! are dropped — unless its own file is all that fills the budget, which no other writer can
//! free (then it goes on, and says so once in the log). Data a previous mount left and could
//! not upload is *pinned*: it takes budget, but nobody waits for it to go.
//!
//! Clean staging files (uploaded, no longer open) are *parked* here rather than deleted, so a
//! file opened again unchanged is read from local disk. They are evicted least recently used
//! first when a writer needs room; dirty data is never parked, so never evicted.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The memory budget.
#[derive(Debug)]
pub struct Memory {
    sem: Arc<Semaphore>,
    limit_kib: u32,
}

/// Memory held by one buffer.
#[derive(Debug)]
pub struct MemoryPermit {
    _permit: OwnedSemaphorePermit,
}

impl MemoryPermit {
    /// Takes over `other`'s share: both are given back together.
    pub fn merge(&mut self, other: MemoryPermit) {
        self._permit.merge(other._permit);
    }

    /// KiB held.
    pub fn kib(&self) -> u64 {
        self._permit.num_permits() as u64
    }
}

impl Memory {
    pub fn new(limit_bytes: u64) -> Self {
        let limit_kib = (limit_bytes / 1024).clamp(1024, u64::from(u32::MAX >> 4)) as u32;
        Self {
            sem: Arc::new(Semaphore::new(limit_kib as usize)),
            limit_kib,
        }
    }

    fn kib(&self, bytes: u64) -> u32 {
        (bytes.div_ceil(1024).max(1) as u32).min(self.limit_kib)
    }

    /// Waits until `bytes` fit in the budget.
    pub async fn acquire(&self, bytes: u64) -> MemoryPermit {
        let n = self.kib(bytes);
        match self.sem.clone().acquire_many_owned(n).await {
            Ok(permit) => MemoryPermit { _permit: permit },
            // The semaphore is never closed.
            Err(_) => unreachable!("memory semaphore closed"),
        }
    }

    /// Takes `bytes` only if they fit now.
    pub fn try_acquire(&self, bytes: u64) -> Option<MemoryPermit> {
        let n = self.kib(bytes);
        self.sem
            .clone()
            .try_acquire_many_owned(n)
            .ok()
            .map(|p| MemoryPermit { _permit: p })
    }

    /// Bytes currently taken.
    pub fn used(&self) -> u64 {
        u64::from(self.limit_kib - self.sem.available_permits() as u32) * 1024
    }
}

/// A parked clean entry: dropping it frees its disk space.
pub type Parked = Arc<dyn Any + Send + Sync>;

/// The disk budget of staging files.
pub struct Disk {
    limit: u64,
    used: AtomicU64,
    dirty: AtomicU64,
    /// Bytes of files a previous mount left that no one here can free (kept dirty data).
    pinned: AtomicU64,
    freed: Notify,
    warned: AtomicBool,
    /// Clean entries by key, least recently used first.
    clean: Mutex<VecDeque<(u64, Parked)>>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("limit", &self.limit)
            .field("used", &self.used)
            .field("dirty", &self.dirty)
            .finish_non_exhaustive()
    }
}

impl Disk {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            used: AtomicU64::new(0),
            dirty: AtomicU64::new(0),
            pinned: AtomicU64::new(0),
            freed: Notify::new(),
            warned: AtomicBool::new(false),
            clean: Mutex::new(VecDeque::new()),
        }
    }

    fn clean(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Parked)>> {
        self.clean.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps a clean entry for reuse until the space is needed.
    pub fn park(&self, key: u64, entry: Parked) {
        let mut clean = self.clean();
        clean.retain(|(k, _)| *k != key);
        clean.push_back((key, entry));
    }

    /// Takes a parked entry back.
    pub fn unpark(&self, key: u64) -> Option<Parked> {
        let mut clean = self.clean();
        let i = clean.iter().position(|(k, _)| *k == key)?;
        clean.remove(i).map(|(_, e)| e)
    }

    /// Counts `bytes` that stay in the cache directory whatever happens (data a previous mount
    /// left that could not be uploaded): they take budget, and a writer that only they stand
    /// in the way of goes on, as one alone over the budget does.
    pub fn pin(&self, bytes: u64) {
        self.pinned.fetch_add(bytes, Ordering::SeqCst);
        self.used.fetch_add(bytes, Ordering::SeqCst);
        metrics::gauge!("s3vol_cache_bytes").set(self.used() as f64);
    }

    /// Drops the least recently used clean entry; false when there is none.
    pub fn evict_one(&self) -> bool {
        let entry = self.clean().pop_front();
        match entry {
            Some(e) => {
                // Dropped outside the lock: its destructor gives the space back.
                drop(e);
                metrics::counter!("s3vol_cache_evictions_total").increment(1);
                true
            }
            None => false,
        }
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Grows a staging file's share from `own` by `more` bytes, waiting while the budget is
    /// full and someone else's data can still make room.
    pub async fn grow(&self, own: u64, more: u64) {
        loop {
            let used = self.used.load(Ordering::SeqCst);
            let pinned = self.pinned.load(Ordering::SeqCst);
            if used + more <= self.limit || used <= own + pinned {
                if used + more > self.limit && !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        limit = self.limit,
                        "one file alone exceeds --cache-size; it is staged anyway"
                    );
                }
                self.used.fetch_add(more, Ordering::SeqCst);
                metrics::gauge!("s3vol_cache_bytes").set(self.used() as f64);
                return;
            }
            if self.evict_one() {
                continue;
            }
            metrics::counter!("s3vol_cache_waits_total").increment(1);
            let notified = self.freed.notified();
            // Re-check after registering, and poll now and then in case a wake-up was missed.
            let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
        }
    }

    pub fn shrink(&self, less: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                Some(u.saturating_sub(less))
            });
        metrics::gauge!("s3vol_cache_bytes").set(self.used() as f64);
        self.freed.notify_waiters();
    }

    /// Tracks bytes not yet durable in S3, for the `s3vol_dirty_bytes` gauge.
    pub fn set_dirty_delta(&self, delta: i64) {
        if delta >= 0 {
            self.dirty.fetch_add(delta as u64, Ordering::SeqCst);
        } else {
            let _ = self
                .dirty
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| {
                    Some(d.saturating_sub(delta.unsigned_abs()))
                });
        }
        metrics::gauge!("s3vol_dirty_bytes").set(self.dirty.load(Ordering::SeqCst) as f64);
    }

    pub fn dirty(&self) -> u64 {
        self.dirty.load(Ordering::SeqCst)
    }
}

/// Recycled buffers of one capacity (part buffers, write copies), so that the data path does
/// not map, fault in and zero fresh pages for every request. Keeps at most `keep` idle
/// buffers; the memory of buffers in use is counted by their owners ([`Memory`]), idle ones
/// are bounded by `keep × capacity`.
#[derive(Debug)]
pub struct BufPool {
    idle: Mutex<Vec<Vec<u8>>>,
    capacity: usize,
    keep: usize,
}

impl BufPool {
    pub fn new(capacity: usize, keep: usize) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            capacity,
            keep,
        }
    }

    /// An empty buffer that can hold `capacity` bytes without growing.
    pub fn take(&self) -> Vec<u8> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        idle.unwrap_or_else(|| Vec::with_capacity(self.capacity))
    }

    /// Gives a buffer back for reuse (dropped if the pool is full or it is another size).
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() != self.capacity {
            return;
        }
        buf.clear();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.keep {
            idle.push(buf);
        }
    }

    /// Reclaims the buffer behind `bytes` when nothing else refers to it any more.
    pub fn give_bytes(&self, bytes: bytes::Bytes) {
        if let Ok(buf) = bytes.try_into_mut() {
            self.give(Vec::from(buf));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_waits_at_the_limit() {
        let m = Arc::new(Memory::new(4 << 20));
        let a = m.acquire(3 << 20).await;
        assert!(m.try_acquire(2 << 20).is_none());
        let m2 = m.clone();
        let waiter = tokio::spawn(async move { m2.acquire(2 << 20).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        let _b = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.used(), 2 << 20);
    }

    struct Entry(Arc<Disk>, u64);
    impl Drop for Entry {
        fn drop(&mut self) {
            self.0.shrink(self.1);
        }
    }

    #[tokio::test]
    async fn clean_entries_are_evicted_least_recently_used_first() {
        let d = Arc::new(Disk::new(100));
        for key in 1..=3 {
            d.grow(0, 30).await;
            d.park(key, Arc::new(Entry(d.clone(), 30)));
        }
        // Entry 1 is used again: now 2 is the least recently used.
        let one = d.unpark(1).unwrap();
        d.park(1, one);
        d.grow(0, 30).await;
        assert_eq!(d.used(), 90, "one entry was evicted to make room");
        assert!(d.unpark(2).is_none(), "the least recently used went first");
        assert!(d.unpark(3).is_some() && d.unpark(1).is_some());
    }

    #[tokio::test]
    async fn disk_waits_for_others_but_not_for_itself() {
        let d = Arc::new(Disk::new(100));
        d.grow(0, 80).await;
        // This writer owns 80 of the 80 used: nobody else can free space, so it goes on.
        d.grow(80, 50).await;
        assert_eq!(d.used(), 130);
        // Another writer with nothing of its own waits until space is freed.
        let d2 = d.clone();
        let waiter = tokio::spawn(async move { d2.grow(0, 10).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        d.shrink(130);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.used(), 10);
    }

    #[tokio::test]
    async fn pinned_leftovers_take_budget_but_never_make_a_writer_wait_forever() {
        let d = Arc::new(Disk::new(100));
        d.pin(90);
        // Nobody can free what an earlier mount left: the writer goes on.
        tokio::time::timeout(Duration::from_secs(5), d.grow(0, 50))
            .await
            .unwrap();
        assert_eq!(d.used(), 140);
        // Another writer's data is in the way: that is worth waiting for.
        let d2 = d.clone();
        let waiter = tokio::spawn(async move { d2.grow(0, 10).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        d.shrink(50);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.used(), 100);
    }

    #[test]
    fn part_buffers_are_reused() {
        let pool = BufPool::new(1024, 1);
        let mut a = pool.take();
        a.extend_from_slice(&[1; 1000]);
        let ptr = a.as_ptr();
        pool.give_bytes(bytes::Bytes::from(a));
        let b = pool.take();
        assert_eq!(b.as_ptr(), ptr, "the same allocation");
        assert!(b.is_empty());
        // A buffer still shared is not taken back; one of another size is dropped.
        let shared = bytes::Bytes::from(b);
        let _other = shared.clone();
        pool.give_bytes(shared);
        pool.give(Vec::with_capacity(10));
        let fresh = pool.take();
        assert_ne!(fresh.as_ptr(), ptr);
    }
}
