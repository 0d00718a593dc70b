//! The bounds of the FUSE requests a serving process has read and not answered, kept where a
//! successor finds them after a `kill -9`: `<session dir>/inflight`.
//!
//! Why: on kernels without `FUSE_NOTIFY_RESEND` (before Linux 6.9) a successor cannot have the
//! kernel send those requests again; it answers them with `EIO` instead, by unique ID, before
//! it reads any request (the FUSE adapter, `fuse.rs`, explains why that answers exactly them).
//! It needs their IDs: the oldest that may be unanswered and the newest read, which the
//! FUSE library reports after every request read and every reply.
//!
//! How: the file is a few words mapped `MAP_SHARED`, so a store is a store to a page of the
//! page cache: it costs no system call on the request path, and it outlives the process that
//! made it (not the machine, and nor does the connection). Words, native-endian: a magic
//! number naming the format, the newest ID, the oldest. `newest` is stored before `oldest`
//! and neither ever decreases, so a process killed between the two stores leaves bounds that
//! are too wide, never too narrow.
//!
//! [`Sweep`] turns the bounds into the IDs to answer: a margin past `newest` covers a
//! request a reader thread had read and not yet reported, and the count is bounded.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// The file's name in the session directory.
const FILE: &str = "inflight";
/// "s3vinfl1": this format.
const MAGIC: u64 = u64::from_le_bytes(*b"s3vinfl1");
const WORDS: usize = 3;
const LEN: usize = WORDS * size_of::<u64>();

/// `<session dir>/inflight`, mapped.
pub(crate) struct InflightFile {
    words: NonNull<AtomicU64>,
}

// SAFETY: the mapping is only reached through atomics, and lives until drop.
unsafe impl Send for InflightFile {}
// SAFETY: as above.
unsafe impl Sync for InflightFile {}

impl std::fmt::Debug for InflightFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightFile")
            .field("bounds", &self.bounds())
            .finish()
    }
}

impl InflightFile {
    /// A new, empty file (the first server of a connection).
    pub(crate) fn create(dir: &Path) -> io::Result<Self> {
        let file = Self::map(dir, true)?;
        file.word(0).store(MAGIC, Ordering::Release);
        Ok(file)
    }

    /// The file a predecessor left, with the bounds it holds (`None` if there is none, or
    /// in another format: a predecessor of an older version). Made anew if missing.
    pub(crate) fn open(dir: &Path) -> io::Result<(Self, Option<(u64, u64)>)> {
        if !dir.join(FILE).exists() {
            return Ok((Self::create(dir)?, None));
        }
        let file = Self::map(dir, false)?;
        let bounds = file.bounds();
        if bounds.is_none() {
            file.record(0, 0);
            file.word(0).store(MAGIC, Ordering::Release);
        }
        Ok((file, bounds))
    }

    fn map(dir: &Path, truncate: bool) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(truncate)
            .mode(0o600)
            .open(dir.join(FILE))?;
        file.set_len(LEN as u64)?;
        // SAFETY: a fresh shared mapping of `LEN` bytes of a file at least that long; the
        // kernel picks the address. The descriptor may close afterwards: the mapping stays.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let words = NonNull::new(p.cast::<AtomicU64>()).ok_or_else(|| io::Error::other("mmap"))?;
        Ok(Self { words })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < WORDS);
        // SAFETY: `i` is within the mapping, which is page-aligned (so each word is aligned)
        // and lives as long as `self`; other processes touch it only through atomics too.
        unsafe { self.words.add(i).as_ref() }
    }

    /// `(oldest, newest)`, if this format's.
    pub(crate) fn bounds(&self) -> Option<(u64, u64)> {
        if self.word(0).load(Ordering::Acquire) != MAGIC {
            return None;
        }
        let newest = self.word(1).load(Ordering::Acquire);
        let oldest = self.word(2).load(Ordering::Acquire);
        Some((oldest, newest))
    }

    /// Keeps new bounds (see the module docs for the order).
    pub(crate) fn record(&self, oldest: u64, newest: u64) {
        self.word(1).store(newest, Ordering::Release);
        self.word(2).store(oldest, Ordering::Release);
    }
}

impl Drop for InflightFile {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, no longer referred to.
        unsafe { libc::munmap(self.words.as_ptr().cast(), LEN) };
    }
}

/// IDs past the newest recorded that a sweep answers too. A reader thread may have read a
/// request and not yet reported it (one per thread), and forgets take IDs as they are read;
/// 512 IDs cover that with room to spare. Each ID that was not read costs one refused write
/// (about a microsecond).
pub(crate) const PAST_NEWEST: u64 = 1024;
/// The most IDs a sweep answers (~0.3 s of writes). The bounds are far narrower in practice
/// (about the requests in flight); wider ones mean a reader thread stalled for long, and
/// the newest are the likeliest to be waiting.
pub(crate) const MAX_SWEEP: u64 = 1 << 18;

/// The request IDs a successor answers with `EIO`: every even ID in `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sweep {
    pub(crate) first: u64,
    pub(crate) last: u64,
    /// IDs in the bounds left out by [`MAX_SWEEP`] (the oldest).
    pub(crate) skipped: u64,
}

impl Sweep {
    /// From a predecessor's recorded bounds.
    pub(crate) fn new(oldest: u64, newest: u64) -> Self {
        // Request IDs are even (odd ones are interrupts), from 2 up.
        let first = (oldest.max(2) + 1) & !1;
        let last = newest.saturating_add(PAST_NEWEST) & !1;
        let mut sweep = Self {
            first,
            last,
            skipped: 0,
        };
        let count = sweep.len();
        if count > MAX_SWEEP {
            sweep.first = last - 2 * (MAX_SWEEP - 1);
            sweep.skipped = count - MAX_SWEEP;
        }
        sweep
    }

    pub(crate) fn len(&self) -> u64 {
        if self.first > self.last {
            0
        } else {
            (self.last - self.first) / 2 + 1
        }
    }

    pub(crate) fn ids(&self) -> impl Iterator<Item = u64> + use<> {
        (self.first..=self.last).step_by(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_ranges() {
        // (oldest, newest) -> (first, last, len, skipped)
        let cases = [
            // Two requests in flight, 10 and 14.
            ((10, 14), (10, 14 + PAST_NEWEST, 3 + PAST_NEWEST / 2, 0)),
            // Nothing in flight: only the margin past the newest.
            ((16, 14), (16, 14 + PAST_NEWEST, PAST_NEWEST / 2, 0)),
            // Nothing recorded yet (a predecessor that died before its first request).
            ((0, 0), (2, PAST_NEWEST, PAST_NEWEST / 2, 0)),
            // An odd bound (never written so, but harmless) rounds to the even IDs inside.
            ((9, 13), (10, 12 + PAST_NEWEST, 2 + PAST_NEWEST / 2, 0)),
        ];
        for ((oldest, newest), (first, last, len, skipped)) in cases {
            let s = Sweep::new(oldest, newest);
            assert_eq!(
                (s.first, s.last, s.len(), s.skipped),
                (first, last, len, skipped),
                "{oldest}..{newest}"
            );
            assert_eq!(s.ids().count() as u64, s.len());
            assert!(s.ids().all(|id| id % 2 == 0));
        }
    }

    #[test]
    fn a_wide_sweep_keeps_the_newest_ids() {
        let newest = 10 * MAX_SWEEP;
        let s = Sweep::new(2, newest);
        assert_eq!(s.len(), MAX_SWEEP);
        assert_eq!(s.last, newest + PAST_NEWEST);
        assert_eq!(s.skipped, (newest + PAST_NEWEST) / 2 - MAX_SWEEP);
        assert_eq!(s.ids().next(), Some(s.first));
        assert_eq!(s.ids().last(), Some(s.last));
    }

    #[test]
    fn bounds_outlive_the_mapping_and_a_new_connection_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let f = InflightFile::create(dir.path()).unwrap();
        assert_eq!(f.bounds(), Some((0, 0)));
        f.record(6, 10);
        drop(f);
        let (f, bounds) = InflightFile::open(dir.path()).unwrap();
        assert_eq!(bounds, Some((6, 10)));
        assert_eq!(f.bounds(), Some((6, 10)));
        let f = InflightFile::create(dir.path()).unwrap();
        assert_eq!(f.bounds(), Some((0, 0)));
    }

    #[test]
    fn a_missing_or_foreign_file_has_no_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let (_, bounds) = InflightFile::open(dir.path()).unwrap();
        assert_eq!(bounds, None);
        std::fs::write(dir.path().join(FILE), b"something else, of another format").unwrap();
        let (_, bounds) = InflightFile::open(dir.path()).unwrap();
        assert_eq!(bounds, None);
    }

    #[test]
    fn the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let _f = InflightFile::create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
