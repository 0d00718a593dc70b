//! Part buffers that outlive the serving process: the slots of a memory file (`memfd`) that
//! the supervisor (or the CSI mounter and node plugin) holds open, so that what a streamed
//! file holds in memory survives a `kill -9`, an OOM kill or a crash of the process that
//! serves the mount.
//!
//! A streamed file (`stage.rs`) fills its part buffer with the application's writes and hands
//! each full part to an upload; the bytes live in memory until S3 has them. Without this
//! module that memory is the process's heap, and dies with it. With it, every part buffer is a
//! slot of a memory file mapped `MAP_SHARED`: the write path copies the application's bytes
//! into the slot exactly as it would into a heap buffer (one copy, no system call), and the
//! upload sends them from there (no copy). The file's pages belong to the file, not to the
//! process: as long as someone holds a descriptor of it, they outlive the process that wrote
//! them (not the machine, and nor does the FUSE connection).
//!
//! Each slot has a header page that says whose bytes it holds: the staging entry's stem (its
//! name in the cache directory), the object key, the file offset of the slot's first byte and
//! how many bytes are valid. The header is updated with plain stores as the slot fills (a
//! store to a shared page outlives the process at once: no flush, no system call); the length
//! is stored after the bytes it covers, so a process killed in the middle leaves a length
//! that covers only bytes written. Keys are written to the one of two key areas not in use
//! and then selected, so a rename in progress at the kill leaves the old key or the new one.
//!
//! A successor, before it serves anything, turns every slot in use into what a process that
//! exits on purpose leaves (`Staged::keep_stream_bytes` in `stage.rs`): the bytes at their
//! offset in the entry's staging file and a journal record of the stream. The start-up scan
//! (`recover.rs`) then completes the multipart upload from the parts S3 already holds and those
//! bytes, or uploads a small file whole. Only then are the slots freed.
//!
//! Freed slots give their pages back to the kernel (`fallocate(PUNCH_HOLE)`), except a few
//! kept resident for the next files, as the heap pool of part buffers does.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::budget::BufPool;

/// "s3vparts", then the format version.
const MAGIC: u64 = u64::from_le_bytes(*b"s3vparts");
const VERSION: u64 = 1;
const PAGE: usize = 4096;
/// Slot headers are one page each.
const HEADER: usize = PAGE;
/// The longest S3 key.
const MAX_KEY: usize = 1024;
const MAX_STEM: usize = 64;
/// Largest mapping made: slots × slot size stays below this (the file is sparse; only pages
/// written take memory).
const MAX_MAPPING: u64 = 1 << 40;
/// Most slots an arena has; a file that finds none free is staged on disk instead.
pub const MAX_SLOTS: u64 = 4096;
/// Freed slots that keep their pages for the next file: a writer cycles through up to nine
/// (eight parts in flight and the one filling), and a slot whose pages were given back costs a
/// page fault per 4 KiB when filled again (measured: 16 % more CPU per GiB written with four).
const WARM: usize = 10;
/// How long a freed slot keeps its pages without being taken again.
const WARM_FOR: Duration = Duration::from_secs(5);

/// Header fields (byte offsets in a slot's header page).
const STATE: usize = 0;
const KEY_SEL: usize = 4;
const OFFSET: usize = 8;
const LEN: usize = 16;
const STEM_LEN: usize = 24;
const KEY_LEN: [usize; 2] = [28, 32];
const BASE_LEN: usize = 36;
const STEM: usize = 64;
const BASE: usize = 128;
const MAX_BASE: usize = 512;
const KEY: [usize; 2] = [1024, 2048];

/// A slot's state.
const FREE: u32 = 0;
/// Being filled: the file's bytes from `offset` (a stream's tail, or a whole small file).
const FILLING: u32 = 1;
/// Handed to a part upload; freed once S3 has it.
const SENDING: u32 = 2;

/// The memory file, mapped.
pub struct PartArena {
    fd: OwnedFd,
    base: NonNull<u8>,
    map_len: usize,
    slot_size: usize,
    slots: usize,
    free: Mutex<FreeSlots>,
}

#[derive(Default)]
struct FreeSlots {
    /// Freed with their pages kept (and when), most recent last.
    warm: Vec<(u32, Instant)>,
    /// Without pages.
    cold: Vec<u32>,
    /// In use by a predecessor and not yet taken over.
    held: usize,
}

// SAFETY: the mapping lives as long as the arena; a slot's bytes and header are written only
// by the one owner of the slot (see `Slot`), and header fields read concurrently are atomics.
unsafe impl Send for PartArena {}
// SAFETY: as above.
unsafe impl Sync for PartArena {}

impl std::fmt::Debug for PartArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartArena")
            .field("fd", &self.fd.as_raw_fd())
            .field("slot_size", &self.slot_size)
            .field("slots", &self.slots)
            .finish()
    }
}

/// A slot a predecessor left in use: the bytes of `key` at `offset`, for the staging entry
/// `stem`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub index: u32,
    pub stem: String,
    pub key: String,
    /// The version of the object the file replaces (its ETag), if it replaces one.
    pub base: Option<String>,
    pub offset: u64,
    /// `true` for a stream's tail or a whole small file, `false` for a part handed to an
    /// upload that S3 may or may not have.
    pub filling: bool,
    pub len: u64,
}

/// Makes the memory file a supervisor holds for its serving processes (empty: the first
/// serving process lays it out).
pub fn create_memfd() -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"s3vol-parts".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just made and owned by nobody else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

impl PartArena {
    /// Maps the memory file `fd`. An empty one is laid out for slots of `slot_size` bytes;
    /// one a predecessor laid out keeps its layout (its slots may hold bytes to take over),
    /// and `slot_size` must not exceed its slots.
    pub fn open(fd: OwnedFd, slot_size: u64) -> io::Result<Self> {
        let len = fd_len(fd.as_raw_fd())?;
        if len == 0 {
            let slot_size = (slot_size as usize).next_multiple_of(PAGE);
            let slots = MAX_SLOTS.min(MAX_MAPPING / slot_size as u64).max(1) as usize;
            let map_len = PAGE + slots * HEADER + slots * slot_size;
            // SAFETY: ftruncate on a descriptor we own.
            if unsafe { libc::ftruncate(fd.as_raw_fd(), map_len as libc::off_t) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let arena = Self::map(fd, map_len, slot_size, slots)?;
            arena.word64(0).store(slot_size as u64, Ordering::Relaxed);
            arena.word64(8).store(slots as u64, Ordering::Relaxed);
            arena.word64(16).store(VERSION, Ordering::Relaxed);
            arena.word64(24).store(MAGIC, Ordering::Release);
            let mut free = arena.lock();
            free.cold = (0..slots as u32).rev().collect();
            drop(free);
            return Ok(arena);
        }
        let head = read_head(fd.as_raw_fd())?;
        let (stored_size, slots) = match head {
            Some((s, n)) if s > 0 && n > 0 && n <= MAX_SLOTS => (s as usize, n as usize),
            _ => {
                return Err(io::Error::other(
                    "the part buffers' memory file is not in a format this version knows",
                ));
            }
        };
        let map_len = PAGE + slots * HEADER + slots * stored_size;
        if (len as usize) < map_len {
            return Err(io::Error::other(
                "the part buffers' memory file is shorter than its layout",
            ));
        }
        if slot_size as usize > stored_size {
            return Err(io::Error::other(format!(
                "the part buffers' memory file has slots of {stored_size} bytes, smaller than \
                 this mount's part size ({slot_size})"
            )));
        }
        let arena = Self::map(fd, map_len, stored_size, slots)?;
        let mut free = FreeSlots::default();
        for i in (0..slots as u32).rev() {
            if arena.state(i).load(Ordering::Acquire) == FREE {
                free.cold.push(i);
            } else {
                free.held += 1;
            }
        }
        *arena.lock() = free;
        Ok(arena)
    }

    fn map(fd: OwnedFd, map_len: usize, slot_size: usize, slots: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of a file at least `map_len` long; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap"))?;
        Ok(Self {
            fd,
            base,
            map_len,
            slot_size,
            slots,
            free: Mutex::new(FreeSlots::default()),
        })
    }

    /// [`PartArena::open`] for a mount whose `--part-size` is `part_size` (streamed parts are
    /// at least S3's smallest part).
    pub fn for_part_size(fd: OwnedFd, part_size: u64) -> io::Result<Self> {
        Self::open(fd, part_size.max(crate::stage::MIN_PART_SIZE))
    }

    /// The size of a slot: the longest part it holds.
    pub fn slot_size(&self) -> u64 {
        self.slot_size as u64
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FreeSlots> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn word64(&self, at: usize) -> &AtomicU64 {
        debug_assert!(at.is_multiple_of(8) && at + 8 <= self.map_len);
        // SAFETY: in the mapping, aligned (the mapping is page-aligned), and only reached
        // through atomics.
        unsafe { &*self.base.as_ptr().add(at).cast::<AtomicU64>() }
    }

    fn word32(&self, at: usize) -> &AtomicU32 {
        debug_assert!(at.is_multiple_of(4) && at + 4 <= self.map_len);
        // SAFETY: as for `word64`.
        unsafe { &*self.base.as_ptr().add(at).cast::<AtomicU32>() }
    }

    fn header(&self, i: u32) -> usize {
        PAGE + i as usize * HEADER
    }

    fn state(&self, i: u32) -> &AtomicU32 {
        self.word32(self.header(i) + STATE)
    }

    fn data(&self, i: u32) -> *mut u8 {
        let at = PAGE + self.slots * HEADER + i as usize * self.slot_size;
        // SAFETY: within the mapping (`i < slots`).
        unsafe { self.base.as_ptr().add(at) }
    }

    /// Copies `bytes` into the header at `at` (at most `max`), returning how many.
    fn put_bytes(&self, at: usize, bytes: &[u8], max: usize) -> usize {
        let n = bytes.len().min(max);
        // SAFETY: `at..at + n` is inside one header page of the mapping, written only by the
        // slot's owner.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.as_ptr().add(at), n);
        }
        n
    }

    fn get_bytes(&self, at: usize, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        // SAFETY: inside the mapping; a predecessor's header, which nobody writes any more.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.as_ptr().add(at), out.as_mut_ptr(), n);
        }
        out
    }

    /// A free slot for the bytes of `key` from `offset` on, for the staging entry named
    /// `stem`, replacing the object version `base` (an ETag, empty for a new file); `None`
    /// when every slot is in use.
    pub fn take(
        self: &Arc<Self>,
        stem: &str,
        key: &str,
        offset: u64,
        base: &str,
    ) -> Option<SlotBuf> {
        let i = {
            let mut free = self.lock();
            free.warm
                .pop()
                .map(|(i, _)| i)
                .or_else(|| free.cold.pop())?
        };
        let h = self.header(i);
        let n = self.put_bytes(h + STEM, stem.as_bytes(), MAX_STEM);
        self.word32(h + STEM_LEN).store(n as u32, Ordering::Relaxed);
        let n = self.put_bytes(h + BASE, base.as_bytes(), MAX_BASE);
        self.word32(h + BASE_LEN).store(n as u32, Ordering::Relaxed);
        self.word64(h + OFFSET).store(offset, Ordering::Relaxed);
        self.word64(h + LEN).store(0, Ordering::Relaxed);
        let slot = Slot {
            arena: self.clone(),
            index: i,
        };
        slot.set_key(key);
        self.state(i).store(FILLING, Ordering::Release);
        Some(SlotBuf {
            slot: Arc::new(slot),
            len: 0,
        })
    }

    fn release(&self, i: u32) {
        self.state(i).store(FREE, Ordering::Release);
        let mut free = self.lock();
        if free.warm.len() < WARM {
            free.warm.push((i, Instant::now()));
            return;
        }
        drop(free);
        self.punch(i);
        self.lock().cold.push(i);
    }

    /// Gives the pages of slot `i` back to the kernel.
    fn punch(&self, i: u32) {
        let at = PAGE + self.slots * HEADER + i as usize * self.slot_size;
        // SAFETY: fallocate on our descriptor, within the file.
        let r = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                at as libc::off_t,
                self.slot_size as libc::off_t,
            )
        };
        if r != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "cannot free a part buffer's pages");
        }
    }

    /// The slots a predecessor left in use.
    pub fn leftovers(&self) -> Vec<Leftover> {
        let mut out = Vec::new();
        for i in 0..self.slots as u32 {
            let state = self.state(i).load(Ordering::Acquire);
            if state == FREE {
                continue;
            }
            let h = self.header(i);
            let stem_len =
                (self.word32(h + STEM_LEN).load(Ordering::Relaxed) as usize).min(MAX_STEM);
            let sel = (self.word32(h + KEY_SEL).load(Ordering::Acquire) & 1) as usize;
            let key_len =
                (self.word32(h + KEY_LEN[sel]).load(Ordering::Relaxed) as usize).min(MAX_KEY);
            let base_len =
                (self.word32(h + BASE_LEN).load(Ordering::Relaxed) as usize).min(MAX_BASE);
            let base = String::from_utf8_lossy(&self.get_bytes(h + BASE, base_len)).into_owned();
            out.push(Leftover {
                index: i,
                stem: String::from_utf8_lossy(&self.get_bytes(h + STEM, stem_len)).into_owned(),
                key: String::from_utf8_lossy(&self.get_bytes(h + KEY[sel], key_len)).into_owned(),
                base: (!base.is_empty()).then_some(base),
                offset: self.word64(h + OFFSET).load(Ordering::Relaxed),
                filling: state == FILLING,
                len: self
                    .word64(h + LEN)
                    .load(Ordering::Acquire)
                    .min(self.slot_size as u64),
            });
        }
        out
    }

    /// The bytes of a leftover slot.
    pub fn leftover_bytes(&self, slot: &Leftover) -> &[u8] {
        // SAFETY: within slot `index`'s data, which nobody writes: its owner is gone.
        unsafe { std::slice::from_raw_parts(self.data(slot.index), slot.len as usize) }
    }

    /// Frees a leftover slot once what it held is elsewhere.
    pub fn release_leftover(&self, slot: &Leftover) {
        self.state(slot.index).store(FREE, Ordering::Release);
        self.punch(slot.index);
        let mut free = self.lock();
        free.held = free.held.saturating_sub(1);
        free.cold.push(slot.index);
    }

    /// Gives back the pages of slots freed more than [`WARM_FOR`] ago and not taken since.
    fn trim(&self) {
        let old: Vec<u32> = {
            let mut free = self.lock();
            let now = Instant::now();
            let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut free.warm)
                .into_iter()
                .partition(|&(_, at)| now.duration_since(at) >= WARM_FOR);
            free.warm = keep;
            old.into_iter().map(|(i, _)| i).collect()
        };
        for &i in &old {
            self.punch(i);
        }
        self.lock().cold.extend(old);
    }

    /// Trims the warm slots every 5 s (`WARM_FOR`) while the arena lives (a thread that ends with
    /// it), so that an idle mount holds no part buffer's pages.
    pub fn start_trimming(self: &Arc<Self>) {
        let arena = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("s3vol-parts".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(WARM_FOR);
                    match arena.upgrade() {
                        Some(a) => a.trim(),
                        None => return,
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the part buffers' trimming thread: freed buffers keep their pages");
        }
    }

    /// Slots in use by this process.
    pub fn in_use(&self) -> usize {
        let free = self.lock();
        self.slots - free.warm.len() - free.cold.len() - free.held
    }
}

impl Drop for PartArena {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once (nothing refers to it any more:
        // every slot holds an `Arc` of the arena).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}

fn fd_len(fd: RawFd) -> io::Result<u64> {
    // SAFETY: fstat into a zeroed struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_size as u64)
}

/// The arena's first words: `(slot size, slots)` when laid out in this format.
fn read_head(fd: RawFd) -> io::Result<Option<(u64, u64)>> {
    let mut words = [0u8; 32];
    // SAFETY: pread into a buffer of its length.
    let n = unsafe { libc::pread(fd, words.as_mut_ptr().cast(), words.len(), 0) };
    if n != words.len() as isize {
        return Ok(None);
    }
    let w = |i: usize| u64::from_ne_bytes(words[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    Ok((w(3) == MAGIC && w(2) == VERSION).then(|| (w(0), w(1))))
}

/// One slot, freed when the last reference goes (the buffer and any upload's bytes).
struct Slot {
    arena: Arc<PartArena>,
    index: u32,
}

impl Slot {
    fn set_key(&self, key: &str) {
        let a = &self.arena;
        let h = a.header(self.index);
        let sel = a.word32(h + KEY_SEL);
        let next = (sel.load(Ordering::Relaxed) & 1) ^ 1;
        let n = a.put_bytes(h + KEY[next as usize], key.as_bytes(), MAX_KEY);
        a.word32(h + KEY_LEN[next as usize])
            .store(n as u32, Ordering::Relaxed);
        sel.store(next, Ordering::Release);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.arena.release(self.index);
    }
}

/// The bytes of a slot an upload sends.
struct SlotView {
    slot: Arc<Slot>,
    len: usize,
}

impl AsRef<[u8]> for SlotView {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the slot, written before this view was made and
        // never written again while the slot is referenced (a buffer only appends).
        unsafe { std::slice::from_raw_parts(self.slot.arena.data(self.slot.index), self.len) }
    }
}

/// A part buffer in a slot.
pub struct SlotBuf {
    slot: Arc<Slot>,
    len: usize,
}

impl std::fmt::Debug for SlotBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotBuf")
            .field("slot", &self.slot.index)
            .field("len", &self.len)
            .finish()
    }
}

impl SlotBuf {
    fn header(&self) -> usize {
        self.slot.arena.header(self.slot.index)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room left.
    pub fn spare(&self) -> usize {
        self.slot.arena.slot_size - self.len
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the slot, written by this buffer.
        unsafe { std::slice::from_raw_parts(self.slot.arena.data(self.slot.index), self.len) }
    }

    /// Appends `data` (at most [`SlotBuf::spare`] bytes), then records the new length.
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        assert!(data.len() <= self.spare(), "part buffer overflow");
        // SAFETY: `len..len + data.len()` is inside the slot; bytes past `len` are seen by no
        // view (views cover `..len` of the time they were made).
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.slot.arena.data(self.slot.index).add(self.len),
                data.len(),
            );
        }
        self.len += data.len();
        self.slot
            .arena
            .word64(self.header() + LEN)
            .store(self.len as u64, Ordering::Release);
    }

    /// After a rename: the slot names the new key.
    pub fn set_key(&self, key: &str) {
        self.slot.set_key(key);
    }

    /// The bytes, shared with an upload; the buffer can still grow afterwards.
    pub fn share(&self) -> Bytes {
        Bytes::from_owner(SlotView {
            slot: self.slot.clone(),
            len: self.len,
        })
    }

    /// The bytes for a part upload: the slot is freed once they are dropped.
    pub fn into_bytes(self) -> Bytes {
        self.slot
            .arena
            .word32(self.header() + STATE)
            .store(SENDING, Ordering::Release);
        self.share()
    }
}

/// A streamed file's part buffer: on the heap, or in a slot that outlives the process.
#[derive(Debug)]
pub enum PartBuf {
    Heap(Vec<u8>),
    Slot(SlotBuf),
}

impl PartBuf {
    pub fn len(&self) -> usize {
        match self {
            PartBuf::Heap(v) => v.len(),
            PartBuf::Slot(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            PartBuf::Heap(v) => v,
            PartBuf::Slot(s) => s.as_slice(),
        }
    }

    /// Appends `data`; the caller keeps the buffer within a part.
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        match self {
            PartBuf::Heap(v) => v.extend_from_slice(data),
            PartBuf::Slot(s) => s.extend_from_slice(data),
        }
    }

    /// The bytes for a part upload (no copy).
    pub fn into_bytes(self) -> Bytes {
        match self {
            PartBuf::Heap(v) => Bytes::from(v),
            PartBuf::Slot(s) => s.into_bytes(),
        }
    }

    /// The bytes for an upload that may fail, after which the buffer goes on: the bytes, and
    /// what [`Lent::restore`] turns back into the buffer (no copy either way once the upload
    /// dropped its bytes).
    pub fn lend(self) -> (Bytes, Lent) {
        match self {
            PartBuf::Heap(v) => {
                let b = Bytes::from(v);
                (b.clone(), Lent::Heap(b))
            }
            PartBuf::Slot(s) => (s.share(), Lent::Slot(s)),
        }
    }

    /// After a rename: a slot names the new key.
    pub fn set_key(&self, key: &str) {
        if let PartBuf::Slot(s) = self {
            s.set_key(key);
        }
    }

    /// Done with: a heap buffer goes back to `pool`, a slot is freed.
    pub fn recycle(self, pool: &BufPool) {
        if let PartBuf::Heap(v) = self {
            pool.give(v);
        }
    }
}

/// A part buffer lent to an upload (see [`PartBuf::lend`]).
#[derive(Debug)]
pub enum Lent {
    Heap(Bytes),
    Slot(SlotBuf),
}

impl Lent {
    pub fn restore(self) -> PartBuf {
        match self {
            Lent::Heap(b) => PartBuf::Heap(Vec::from(b)),
            Lent::Slot(s) => PartBuf::Slot(s),
        }
    }

    /// The upload is done with the bytes: a heap buffer goes back to `pool`, a slot is freed.
    pub fn recycle(self, pool: &BufPool) {
        if let Lent::Heap(b) = self {
            pool.give_bytes(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen(a: &PartArena) -> OwnedFd {
        a.fd().try_clone_to_owned().unwrap()
    }

    #[test]
    fn slots_outlive_the_arena_that_filled_them() {
        let arena = Arc::new(PartArena::open(create_memfd().unwrap(), 5 << 20).unwrap());
        let mut a = arena.take("stem-1", "dir/a", 0, "").unwrap();
        a.extend_from_slice(b"hello ");
        a.extend_from_slice(b"world");
        a.set_key("dir/renamed");
        let mut b = arena
            .take("stem-2", "dir/b", 5 << 20, "\"etag-b\"")
            .unwrap();
        b.extend_from_slice(&[7u8; 1000]);
        let sent = b.into_bytes();
        let c = arena.take("stem-3", "dir/c", 0, "").unwrap();
        drop(c);
        let fd = reopen(&arena);
        // The process "dies": nothing is released.
        std::mem::forget(a);
        std::mem::forget(sent);
        std::mem::forget(arena);

        let successor = Arc::new(PartArena::open(fd, 5 << 20).unwrap());
        let mut left = successor.leftovers();
        left.sort_by_key(|l| l.stem.clone());
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(left[0].stem, "stem-1");
        assert_eq!(left[0].key, "dir/renamed");
        assert_eq!(left[0].base, None);
        assert_eq!(left[1].base.as_deref(), Some("\"etag-b\""));
        assert!(left[0].filling);
        assert_eq!(successor.leftover_bytes(&left[0]), b"hello world");
        assert_eq!(left[1].key, "dir/b");
        assert_eq!(left[1].offset, 5 << 20);
        assert!(!left[1].filling);
        assert_eq!(successor.leftover_bytes(&left[1]), &[7u8; 1000][..]);
        // Held slots are not handed out until taken over.
        assert_eq!(successor.in_use(), 0);
        let slots = successor.slots;
        let mut taken = Vec::new();
        while let Some(s) = successor.take("x", "y", 0, "") {
            taken.push(s);
        }
        assert_eq!(taken.len(), slots - 2);
        for l in &left {
            successor.release_leftover(l);
        }
        assert_eq!(successor.in_use(), slots - 2);
        assert!(successor.take("x", "y", 0, "").is_some());
    }

    #[test]
    fn a_freed_slot_is_not_a_leftover_and_views_keep_it() {
        let arena = Arc::new(PartArena::open(create_memfd().unwrap(), 5 << 20).unwrap());
        let mut a = arena.take("s", "k", 0, "").unwrap();
        a.extend_from_slice(b"abc");
        let view = a.share();
        drop(a);
        assert_eq!(arena.leftovers().len(), 1, "a view keeps the slot");
        assert_eq!(&view[..], b"abc");
        drop(view);
        assert!(arena.leftovers().is_empty());
        assert_eq!(arena.in_use(), 0);
    }

    /// Resident pages of the memory file, in bytes (`SEEK_DATA` would count holes too).
    fn resident(a: &PartArena) -> u64 {
        // SAFETY: an all-zero `stat` is a valid value of the struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat into a struct of the right type.
        assert_eq!(unsafe { libc::fstat(a.fd().as_raw_fd(), &mut st) }, 0);
        st.st_blocks as u64 * 512
    }

    #[test]
    fn freed_slots_keep_their_pages_for_a_while_then_give_them_back() {
        let arena = Arc::new(PartArena::open(create_memfd().unwrap(), 5 << 20).unwrap());
        let mut bufs = Vec::new();
        for i in 0..(WARM + 2) {
            let mut b = arena.take("s", "k", 0, "").unwrap();
            b.extend_from_slice(&vec![i as u8; 1 << 20]);
            bufs.push(b);
        }
        let headers = resident(&arena) - ((WARM + 2) << 20) as u64;
        drop(bufs);
        // Beyond WARM, freed slots give their pages back at once.
        assert_eq!(resident(&arena) - headers, (WARM << 20) as u64);
        // A warm slot is taken again first, with its pages.
        let again = arena.take("s", "k", 0, "").unwrap();
        drop(again);
        arena.trim();
        assert_eq!(
            resident(&arena) - headers,
            (WARM << 20) as u64,
            "not yet old"
        );
        {
            let mut free = arena.lock();
            for w in &mut free.warm {
                w.1 -= WARM_FOR;
            }
        }
        arena.trim();
        assert_eq!(
            resident(&arena),
            headers,
            "every freed slot gave its pages back"
        );
        assert_eq!(arena.in_use(), 0);
    }

    #[test]
    fn a_bigger_part_size_than_the_slots_is_refused() {
        let arena = PartArena::open(create_memfd().unwrap(), 5 << 20).unwrap();
        let fd = reopen(&arena);
        let e = PartArena::open(fd, 8 << 20).unwrap_err();
        assert!(e.to_string().contains("smaller than"), "{e}");
    }
}
