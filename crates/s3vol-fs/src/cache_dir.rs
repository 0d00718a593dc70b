//! The cache directory: where staging files live, and the journal a later mount reads to find
//! out what they hold.
//!
//! A cache directory is a journal, not a scratch space. Every staging file (`STEM.data`) has
//! two companions written *before* it: `STEM.key`, one line `s3://bucket/key` for people, and
//! `STEM.meta`, a small versioned JSON [`Record`] for the start-up scan (the object, the
//! version it started from, whether it holds data not in S3, which ranges of that version are
//! valid in the file, the multipart upload in progress). A stream that never needs a staging
//! file still gets a `.meta` while its multipart upload exists, so that a mount killed in the
//! middle leaves a record of the upload to abort.
//!
//! Names cannot collide across restarts: each [`CacheDir`] (one per mounted filesystem) draws a
//! random 128-bit instance id at start, and every stem is `<instance>-<n>`. Process ids are not
//! used: in a container they repeat after every restart. Files are created with `O_EXCL` and
//! never overwritten; a leftover is recognised by its content, not by its name.
//!
//! Liveness: an instance holds an exclusive `flock` on `<instance>.lock` for its whole life (the
//! kernel drops it when the process dies, even by SIGKILL). The start-up scan
//! (`recover.rs`) touches only entries of instances whose lock it can take, so mounts
//! sharing a directory never scan each other's live files. The lock file is created under a
//! temporary name and renamed once locked, so a scanner never sees it unlocked.
//!
//! The directory is private: created 0700, files 0600 whatever the umask, and an existing
//! directory that group or others can read or write, or that another user owns, is refused
//! (staged data is file content that the mount's permission bits may have hidden).
//!
//! The journal is written at a file's creation, when its upload starts or ends, at a rename,
//! and when a write first touches a range of the original object not yet recorded (one short
//! line appended, no fsync): nothing per write on the paths that matter for speed (new files,
//! appends, rewrites of ranges already recorded). Journal writes are not fsynced: they are
//! exact after a process crash (the page cache survives it); after a power loss staged data
//! was not durable anyway — what was acknowledged is in S3.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The subdirectory holding the node-local attribute cache by default (`attr_cache.rs`).
pub const ATTRS_SUBDIR: &str = "attrs";

/// The journal format written by this version.
pub const RECORD_VERSION: u32 = 1;

/// Why a cache directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheDirError {
    #[error("cannot create the cache directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("the cache directory {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "the cache directory {path} is owned by uid {owner}, not by this process's user (uid {ours}); \
         staged file contents would be readable by its owner. Fix: `chown {ours} {path}` or use another --cache-dir"
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        ours: u32,
    },
    #[error(
        "the cache directory {path} has mode {mode:04o}: group or others could read or change staged \
         file contents. Fix: `chmod 700 {path}`"
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error("cannot lock the cache directory {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
}

/// The object version a staged file started from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRecord {
    pub etag: String,
    pub size: u64,
}

/// A part of a multipart upload that is in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    pub number: i32,
    pub etag: String,
}

/// What `STEM.meta` says about a staging file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    pub bucket: String,
    pub key: String,
    /// The object version the local copy started from; `None`: a new file (or one emptied by
    /// `O_TRUNC`), which replaces whatever the key holds.
    pub base: Option<BaseRecord>,
    /// The file's size when the record was written (the data file's length is authoritative).
    pub size: u64,
    /// The data file holds changes not in S3.
    pub dirty: bool,
    /// Ranges of `[0, base.size)` whose bytes in the data file are valid (written through the
    /// mount or fetched from the base); everything else below `base.size` is the base's.
    /// Lines appended after the record add to it. For a stream kept with `parts`: the ranges
    /// the data file holds.
    #[serde(default)]
    pub local: Vec<(u64, u64)>,
    /// A multipart upload of this key in progress.
    #[serde(default)]
    pub upload_id: Option<String>,
    /// Multipart uploads of this key that nothing will continue, to abort.
    #[serde(default)]
    pub abandoned: Vec<String>,
    /// Parts of `upload_id` already in (with `part_size`, where each starts): a stream whose
    /// remaining bytes went to the data file can be completed from the two.
    #[serde(default)]
    pub parts: Vec<PartRecord>,
    #[serde(default)]
    pub part_size: u64,
    /// The bytes `[0, streamed)` are in `parts`; the data file holds `[streamed, size)`.
    #[serde(default)]
    pub streamed: u64,
    /// The attributes (s3fs metadata) of the last upload attempt.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

impl Record {
    pub fn new(bucket: &str, key: &str) -> Self {
        Self {
            version: RECORD_VERSION,
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            base: None,
            size: 0,
            dirty: false,
            local: Vec::new(),
            upload_id: None,
            abandoned: Vec::new(),
            parts: Vec::new(),
            part_size: 0,
            streamed: 0,
            metadata: None,
        }
    }

    /// Parses a `.meta` file: the record, then appended `[start, end]` lines. A torn last line
    /// (the process died while appending) is ignored: its write had not returned.
    pub fn parse(text: &str) -> Option<Self> {
        let mut stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
        let mut record: Record = serde_json::from_value(stream.next()?.ok()?).ok()?;
        if record.version != RECORD_VERSION {
            return None;
        }
        for line in stream {
            match line
                .ok()
                .and_then(|v| serde_json::from_value::<(u64, u64)>(v).ok())
            {
                Some(r) => record.local.push(r),
                None => break,
            }
        }
        Some(record)
    }
}

/// One mounted filesystem's share of a cache directory.
#[derive(Debug)]
pub struct CacheDir {
    dir: PathBuf,
    instance: String,
    /// Holds the instance's `flock` until the process ends.
    _lock: File,
    next: AtomicU64,
    free: FreeSpace,
}

/// Allocation granularity of the free-space estimate: readings younger than this are reused
/// while far more is free than asked for.
const FREE_SPACE_TTL: Duration = Duration::from_secs(1);
/// Below this much free space, every request reads the filesystem's free space again.
const FREE_SPACE_SLACK: u64 = 256 << 20;

#[derive(Debug)]
struct FreeSpace {
    dir: File,
    /// When the free space was read, and what is left of it after the bytes granted since.
    estimate: Mutex<Option<(Instant, u64)>>,
}

impl FreeSpace {
    fn read(&self) -> io::Result<u64> {
        // SAFETY: `statvfs` is plain data; fstatvfs fills it and reads only the open fd.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid open descriptor and a valid pointer to a statvfs struct.
        if unsafe { libc::fstatvfs(self.dir.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }

    /// Whether `n` more bytes fit on the filesystem; `Err(free)` when they do not.
    fn take(&self, n: u64) -> Result<(), u64> {
        let mut est = self.estimate.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, left)) = est.as_mut()
            && at.elapsed() < FREE_SPACE_TTL
            && *left >= n.saturating_add(FREE_SPACE_SLACK)
        {
            *left -= n;
            return Ok(());
        }
        let free = match self.read() {
            Ok(f) => f,
            // Cannot tell: let the write itself find out.
            Err(_) => return Ok(()),
        };
        if free < n {
            *est = None;
            return Err(free);
        }
        *est = Some((Instant::now(), free - n));
        Ok(())
    }
}

/// Random bytes from the kernel.
fn random_id() -> io::Result<String> {
    let mut buf = [0u8; 16];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most `buf.len() - filled` bytes into `buf` from `filled` on.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// What a cache directory holds once no mount uses it (see [`leftovers`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// A live mount still holds an instance lock here.
    pub in_use: bool,
    /// Entries whose data or multipart upload is not (all) in S3: `s3://bucket/key` and the
    /// bytes of the data file.
    pub unsaved: Vec<(String, u64)>,
    /// Files that belong to no journal entry this version can read: kept, as they may be data.
    pub unknown: Vec<PathBuf>,
}

impl Leftovers {
    /// Nothing here is needed: the directory may be removed.
    pub fn disposable(&self) -> bool {
        !self.in_use && self.unsaved.is_empty() && self.unknown.is_empty()
    }
}

/// Reads the journal of a cache directory without changing anything: whether a mount uses it,
/// and what it holds that is not in S3. Clean copies, records of finished uploads and the
/// locks of dead instances are not worth keeping; everything else is reported.
pub fn leftovers(dir: &Path) -> io::Result<Leftovers> {
    let mut found = Leftovers::default();
    let mut names = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            if entry.file_name() == ATTRS_SUBDIR {
                // The attribute cache (`attr_cache.rs`): copies of what is in S3.
                continue;
            }
            // s3vol makes no other subdirectories: one that holds files is someone else's.
            if holds_files(&entry.path())? {
                found.unknown.push(entry.path());
            }
            continue;
        }
        if !kind.is_file() {
            found.unknown.push(entry.path());
            continue;
        }
        names.insert(entry.file_name().to_string_lossy().into_owned());
    }
    for name in &names {
        let path = dir.join(name);
        if name.ends_with(".lock") || name.ends_with(".lock.tmp") {
            // Taking the lock would steal nothing: a live instance refuses it.
            if !try_lock(&File::open(&path)?) {
                found.in_use = true;
            }
        } else if name.ends_with(".meta.tmp") || name.ends_with(".key.tmp") {
            // An unfinished rewrite of a record: the record it was to replace still counts.
        } else if let Some(stem) = name.strip_suffix(".meta") {
            let data = dir.join(format!("{stem}.data"));
            match Record::parse(&std::fs::read_to_string(&path)?) {
                Some(r) if r.dirty || r.upload_id.is_some() || !r.abandoned.is_empty() => {
                    let bytes = std::fs::metadata(&data).map_or(0, |m| m.len());
                    found
                        .unsaved
                        .push((format!("s3://{}/{}", r.bucket, r.key), bytes));
                }
                Some(_) => {}
                None => found.unknown.push(path),
            }
        } else if let Some(stem) = name
            .strip_suffix(".data")
            .or_else(|| name.strip_suffix(".key"))
        {
            // Written after their record: without one they are not ours to judge.
            if !names.contains(&format!("{stem}.meta")) {
                found.unknown.push(path);
            }
        } else {
            found.unknown.push(path);
        }
    }
    Ok(found)
}

/// Whether anything but (empty) directories is under `dir`.
fn holds_files(dir: &Path) -> io::Result<bool> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() || holds_files(&entry.path())? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Tries to take an exclusive `flock` without waiting.
pub fn try_lock(file: &File) -> bool {
    // SAFETY: flock on an open descriptor has no memory-safety preconditions.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Makes a default cache directory that an earlier s3vol created `0755` private (`0700`), if
/// this user owns it and nobody else could write to it: nothing but s3vol's own staging files
/// can be in it, and refusing it would stop every mount after an upgrade. Returns whether it
/// changed anything. A directory named by the user is never changed: [`ensure_private_dir`]
/// refuses it with the fix to apply.
pub fn tighten_legacy_default(dir: &Path) -> io::Result<bool> {
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    // SAFETY: geteuid cannot fail.
    let ours = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() || meta.uid() != ours || mode & 0o022 != 0 || mode & 0o044 == 0 {
        return Ok(false);
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(true)
}

/// Creates `dir` 0700 (its missing parents as usual), or checks that an existing one is
/// private to this user.
pub fn ensure_private_dir(dir: &Path) -> Result<(), CacheDirError> {
    let create = |source| CacheDirError::Create {
        path: dir.to_owned(),
        source,
    };
    if !dir.exists() {
        if let Some(parent) = dir.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(create)?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {
                // The umask may have taken the owner's bits too: set them exactly.
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(create)?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(create(e)),
        }
    }
    let meta = std::fs::metadata(dir).map_err(create)?;
    if !meta.is_dir() {
        return Err(CacheDirError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    // SAFETY: geteuid cannot fail.
    let ours = unsafe { libc::geteuid() };
    if meta.uid() != ours {
        return Err(CacheDirError::Owner {
            path: dir.to_owned(),
            owner: meta.uid(),
            ours,
        });
    }
    if meta.mode() & 0o066 != 0 {
        return Err(CacheDirError::Mode {
            path: dir.to_owned(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

impl CacheDir {
    /// Opens `dir` for a new instance: makes sure it is private, and locks a new instance id.
    pub fn open(dir: &Path) -> Result<Self, CacheDirError> {
        ensure_private_dir(dir)?;
        let lock_err = |source| CacheDirError::Lock {
            path: dir.to_owned(),
            source,
        };
        let instance = random_id().map_err(lock_err)?;
        let tmp = dir.join(format!(".{instance}.lock.tmp"));
        let lock = private_file(&tmp).map_err(lock_err)?;
        if !try_lock(&lock) {
            let _ = std::fs::remove_file(&tmp);
            return Err(lock_err(io::Error::other("flock refused on a new file")));
        }
        std::fs::rename(&tmp, dir.join(format!("{instance}.lock"))).map_err(lock_err)?;
        let free = FreeSpace {
            dir: File::open(dir).map_err(lock_err)?,
            estimate: Mutex::new(None),
        };
        Ok(Self {
            dir: dir.to_owned(),
            instance,
            _lock: lock,
            next: AtomicU64::new(0),
            free,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// This instance's id (the prefix of its file names).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// A stem no other file of this or any other instance has.
    pub fn new_stem(&self) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{}-{n}", self.instance))
    }

    /// Lets go of the instance's lock as if the process had died (for tests of the scan).
    #[cfg(test)]
    pub fn unlock_as_if_dead(&self) {
        // SAFETY: flock on an open descriptor has no memory-safety preconditions.
        unsafe { libc::flock(self._lock.as_raw_fd(), libc::LOCK_UN) };
    }

    /// Checks that `n` more bytes fit on the cache's filesystem; `Err(free bytes)` if not.
    pub fn take_free_space(&self, n: u64) -> Result<(), u64> {
        if n == 0 {
            return Ok(());
        }
        self.free.take(n)
    }
}

/// Creates a new file 0600 (exactly, whatever the umask), failing if it exists.
pub fn private_file(path: &Path) -> io::Result<File> {
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// `STEM.ext`: one of the files of the staging entry `stem`.
pub fn stem_with_ext(stem: &Path, ext: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// The files of one staging entry: `STEM.data`, `STEM.key`, `STEM.meta`.
#[derive(Debug)]
pub struct Entry {
    stem: PathBuf,
    data: Option<File>,
    /// `STEM.key` and `STEM.meta` exist.
    journaled: bool,
    /// Open for appending recorded ranges to `STEM.meta`.
    meta: Option<File>,
    /// What `STEM.key` holds, when this process wrote it.
    key_line: Option<String>,
}

impl Entry {
    pub fn new(stem: PathBuf) -> Self {
        Self {
            stem,
            data: None,
            journaled: false,
            meta: None,
            key_line: None,
        }
    }

    pub fn with_ext(&self, ext: &str) -> PathBuf {
        stem_with_ext(&self.stem, ext)
    }

    /// The stem's name in the cache directory (`<instance>-<n>`).
    pub fn name(&self) -> &str {
        self.stem.file_name().and_then(|n| n.to_str()).unwrap_or("")
    }

    pub fn data_path(&self) -> PathBuf {
        self.with_ext("data")
    }

    pub fn file(&self) -> Option<&File> {
        self.data.as_ref()
    }

    pub fn has_data(&self) -> bool {
        self.data.is_some()
    }

    /// Whether anything of this entry is on disk.
    pub fn on_disk(&self) -> bool {
        self.journaled || self.data.is_some()
    }

    /// An entry found on disk whose data file stays closed (for recovery): its record is
    /// replaced atomically, as a journaled entry's.
    pub fn found(stem: PathBuf) -> Self {
        Self {
            stem,
            data: None,
            journaled: true,
            meta: None,
            key_line: None,
        }
    }

    /// Takes over the files of an entry found on disk (for recovery).
    pub fn adopt(stem: PathBuf, data: File) -> Self {
        Self {
            stem,
            data: Some(data),
            journaled: true,
            meta: None,
            key_line: None,
        }
    }

    /// Writes the record and the `.key` companion.
    ///
    /// The entry's first record is written in place: there is no earlier one to protect, and
    /// a crash while writing it leaves a torn record and no data file (that is made only
    /// after its record), which the start-up scan removes as worthless. A later record
    /// replaces the previous one atomically (a temporary file renamed over it), and the
    /// `.key` companion is rewritten only when the key changed (a rename). Each file created
    /// and deleted here is an inode the cache's filesystem allocates and frees, which costs
    /// more than the writes themselves when small files come and go by the thousand.
    pub fn write_record(&mut self, record: &Record) -> io::Result<()> {
        let mut body = serde_json::to_vec(record).map_err(io::Error::other)?;
        body.push(b'\n');
        let key_line = format!("s3://{}/{}\n", record.bucket, record.key);
        let meta_path = self.with_ext("meta");
        let key_path = self.with_ext("key");
        if !self.journaled {
            let mut made = Vec::new();
            let written = (|| {
                let mut f = private_file(&meta_path)?;
                made.push(meta_path.clone());
                f.write_all(&body)?;
                let mut k = private_file(&key_path)?;
                made.push(key_path.clone());
                k.write_all(key_line.as_bytes())?;
                Ok::<File, io::Error>(f)
            })();
            return match written {
                Ok(f) => {
                    self.journaled = true;
                    self.key_line = Some(key_line);
                    self.meta = Some(f);
                    Ok(())
                }
                Err(e) => {
                    // Only what this call made: a file in the way is someone else's.
                    for p in made {
                        let _ = std::fs::remove_file(p);
                    }
                    Err(e)
                }
            };
        }
        let stem = self.stem.clone();
        let replace = |path: &Path, ext: &str, bytes: &[u8]| -> io::Result<File> {
            let tmp = stem_with_ext(&stem, ext);
            let _ = std::fs::remove_file(&tmp);
            let written = private_file(&tmp).and_then(|mut f| {
                f.write_all(bytes)?;
                std::fs::rename(&tmp, path)?;
                Ok(f)
            });
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written
        };
        if self.key_line.as_deref() != Some(key_line.as_str()) {
            replace(&key_path, "key.tmp", key_line.as_bytes())?;
            self.key_line = Some(key_line);
        }
        self.meta = Some(replace(&meta_path, "meta.tmp", &body)?);
        Ok(())
    }

    /// Adds `range` to the record's valid local ranges (one appended line).
    pub fn record_local(&mut self, range: (u64, u64)) -> io::Result<()> {
        let Some(f) = self.meta.as_mut() else {
            return Err(io::Error::other("no journal record to append to"));
        };
        let line = format!("[{},{}]\n", range.0, range.1);
        f.write_all(line.as_bytes())
    }

    /// Creates the data file, `len` bytes long (sparse), after writing `record`. On failure
    /// nothing this call made is left, so the next attempt starts afresh.
    pub fn create(&mut self, len: u64, record: &Record) -> io::Result<&File> {
        if self.data.is_none() {
            let had_journal = self.journaled;
            self.write_record(record)?;
            let path = self.data_path();
            let made = private_file(&path).and_then(|file| match file.set_len(len) {
                Ok(()) => Ok(file),
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    Err(e)
                }
            });
            match made {
                Ok(file) => self.data = Some(file),
                Err(e) => {
                    if !had_journal {
                        for ext in ["meta", "key"] {
                            let _ = std::fs::remove_file(self.with_ext(ext));
                        }
                        self.journaled = false;
                        self.meta = None;
                        self.key_line = None;
                    }
                    return Err(e);
                }
            }
        }
        match &self.data {
            Some(f) => Ok(f),
            None => Err(io::Error::other("staging file not open")),
        }
    }

    /// Deletes the entry's files, if it made any (no system call otherwise: most streamed
    /// files never touch the cache directory).
    pub fn remove(&mut self) {
        if !self.on_disk() {
            return;
        }
        for ext in ["data", "meta", "key"] {
            let _ = std::fs::remove_file(self.with_ext(ext));
        }
        self.data = None;
        self.meta = None;
        self.journaled = false;
        self.key_line = None;
    }

    /// Deletes every file a process may have left under this stem (for the start-up scan).
    pub fn remove_leftovers(&mut self) {
        for ext in ["data", "meta", "key", "meta.tmp", "key.tmp"] {
            let _ = std::fs::remove_file(self.with_ext(ext));
        }
        self.data = None;
        self.meta = None;
        self.journaled = false;
        self.key_line = None;
    }

    /// Deletes the data file only.
    pub fn remove_data(&mut self) {
        if self.data.take().is_some() {
            let _ = std::fs::remove_file(self.data_path());
        }
    }

    /// Deletes the journal of an entry that has no data file (a stream's upload record).
    pub fn remove_journal(&mut self) {
        if self.data.is_none() {
            self.remove();
        }
    }
}

/// A temporary directory private to this user, as a cache directory must be.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub fn private_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn umask(mask: libc::mode_t) -> libc::mode_t {
        // SAFETY: umask only swaps the process's file mode creation mask.
        unsafe { libc::umask(mask) }
    }

    #[test]
    fn instances_never_share_names_and_lock_their_id() {
        let dir = private_tempdir();
        let a = CacheDir::open(dir.path()).unwrap();
        let b = CacheDir::open(dir.path()).unwrap();
        assert_ne!(a.instance(), b.instance());
        assert_ne!(a.new_stem(), b.new_stem());
        assert_ne!(a.new_stem(), a.new_stem());
        let lock = File::open(dir.path().join(format!("{}.lock", a.instance()))).unwrap();
        assert!(!try_lock(&lock), "a live instance holds its lock");
        drop(a);
        assert!(try_lock(&lock), "the lock goes with the instance");
    }

    #[test]
    fn directories_and_files_are_private_whatever_the_umask() {
        let top = tempfile::tempdir().unwrap();
        let old = umask(0);
        let dir = top.path().join("a/b/cache");
        let opened = CacheDir::open(&dir);
        let mut e = Entry::new(opened.as_ref().unwrap().new_stem());
        let created = e.create(10, &Record::new("b", "k")).map(|_| ());
        umask(old);
        created.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        for ext in ["data", "key", "meta"] {
            assert_eq!(mode(&e.with_ext(ext)), 0o600, "{ext}");
        }
    }

    #[test]
    fn a_directory_others_can_read_or_write_is_refused_and_left_alone() {
        let top = tempfile::tempdir().unwrap();
        for bad in [0o755, 0o720, 0o702, 0o740] {
            let dir = top.path().join(format!("c{bad:o}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(bad)).unwrap();
            let e = CacheDir::open(&dir).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(&dir.display().to_string()) && msg.contains("chmod 700"),
                "{msg}"
            );
            assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing made");
            assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, bad);
        }
        let ok = top.path().join("ok");
        std::fs::create_dir(&ok).unwrap();
        std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o711)).unwrap();
        CacheDir::open(&ok).unwrap();
    }

    #[test]
    fn records_cost_few_files_and_a_file_in_the_way_is_left_alone() {
        let dir = private_tempdir();
        let cache = CacheDir::open(dir.path()).unwrap();
        let names = || {
            let mut n: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".lock"))
                .collect();
            n.sort();
            n
        };
        let ino = |p: PathBuf| std::fs::metadata(p).unwrap().ino();

        // Someone else's record where this entry's goes: refused, and not removed.
        let mut e = Entry::new(cache.new_stem());
        std::fs::write(e.with_ext("meta"), b"not ours").unwrap();
        assert!(e.write_record(&Record::new("b", "k")).is_err());
        assert_eq!(std::fs::read(e.with_ext("meta")).unwrap(), b"not ours");
        assert!(!e.with_ext("key").exists() && !e.on_disk());
        std::fs::remove_file(e.with_ext("meta")).unwrap();

        // The first record is written in place: no temporary file is left.
        let mut r = Record::new("b", "k");
        e.create(3, &r).unwrap();
        let stem = e.with_ext("");
        let stem = stem.file_name().unwrap().to_string_lossy();
        assert_eq!(
            names(),
            ["data", "key", "meta"].map(|x| format!("{stem}{x}")),
            "three files per entry"
        );
        // A rewrite replaces the record whole and leaves `.key` alone while the key is the
        // same; a rename rewrites it.
        let key_ino = ino(e.with_ext("key"));
        r.dirty = true;
        e.write_record(&r).unwrap();
        assert!(
            Record::parse(&std::fs::read_to_string(e.with_ext("meta")).unwrap())
                .unwrap()
                .dirty
        );
        assert_eq!(ino(e.with_ext("key")), key_ino);
        e.record_local((0, 1)).unwrap();
        r.key = "renamed".into();
        e.write_record(&r).unwrap();
        assert_eq!(
            std::fs::read_to_string(e.with_ext("key")).unwrap(),
            "s3://b/renamed\n"
        );
        let back = Record::parse(&std::fs::read_to_string(e.with_ext("meta")).unwrap()).unwrap();
        assert_eq!((back.key.as_str(), back.local.len()), ("renamed", 0));
        assert_eq!(names().len(), 3, "{:?}", names());
        e.remove();
        assert!(names().is_empty(), "{:?}", names());
    }

    #[test]
    fn a_failed_creation_leaves_nothing_behind_and_can_be_tried_again() {
        let dir = private_tempdir();
        let cache = CacheDir::open(dir.path()).unwrap();
        let mut e = Entry::new(cache.new_stem());
        // A data file in the way: creation fails, and the journal it wrote is taken back.
        std::fs::write(e.data_path(), b"someone else's").unwrap();
        assert!(e.create(5, &Record::new("b", "k")).is_err());
        assert!(!e.with_ext("meta").exists() && !e.with_ext("key").exists());
        std::fs::remove_file(e.data_path()).unwrap();
        e.create(5, &Record::new("b", "k")).unwrap();
        assert_eq!(std::fs::metadata(e.data_path()).unwrap().len(), 5);
    }

    #[test]
    fn records_read_back_with_appended_ranges_and_a_torn_tail() {
        let dir = private_tempdir();
        let cache = CacheDir::open(dir.path()).unwrap();
        let mut e = Entry::new(cache.new_stem());
        let mut r = Record::new("bkt", "dir/a\nb");
        r.base = Some(BaseRecord {
            etag: "\"e1\"".into(),
            size: 100,
        });
        r.local = vec![(0, 10)];
        r.dirty = true;
        e.create(100, &r).unwrap();
        e.record_local((50, 60)).unwrap();
        let mut text = std::fs::read_to_string(e.with_ext("meta")).unwrap();
        text.push_str("[70,"); // died while appending
        let back = Record::parse(&text).unwrap();
        assert_eq!(back.local, vec![(0, 10), (50, 60)]);
        assert_eq!(back.key, "dir/a\nb");
        assert_eq!(
            std::fs::read_to_string(e.with_ext("key")).unwrap(),
            "s3://bkt/dir/a\nb\n"
        );
        assert!(Record::parse("{\"version\": 99}").is_none());
        assert!(Record::parse("garbage").is_none());
    }

    #[test]
    fn a_default_directory_left_0755_by_an_earlier_version_is_made_private() {
        let top = tempfile::tempdir().unwrap();
        let old = top.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(CacheDir::open(&old).is_err(), "refused as it is");
        assert!(tighten_legacy_default(&old).unwrap());
        assert_eq!(std::fs::metadata(&old).unwrap().mode() & 0o7777, 0o700);
        CacheDir::open(&old).unwrap();
        // One others may write to is not ours to trust: left for the refusal to explain.
        let open = top.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(!tighten_legacy_default(&open).unwrap());
        assert_eq!(std::fs::metadata(&open).unwrap().mode() & 0o7777, 0o777);
        assert!(!tighten_legacy_default(&top.path().join("missing")).unwrap());
    }

    #[test]
    fn leftovers_tell_data_not_in_s3_from_what_may_go() {
        let dir = private_tempdir();
        {
            let cache = CacheDir::open(dir.path()).unwrap();
            // A live instance: nothing may be judged disposable.
            assert!(leftovers(dir.path()).unwrap().in_use);
            let mut clean = Entry::new(cache.new_stem());
            clean.create(3, &Record::new("b", "clean")).unwrap();
            std::fs::write(clean.with_ext("meta.tmp"), b"{").unwrap();
            cache.unlock_as_if_dead();
            let found = leftovers(dir.path()).unwrap();
            assert_eq!(
                found,
                Leftovers::default(),
                "clean copies and dead locks may go"
            );
            assert!(found.disposable());
            // The attribute cache holds copies of what is in S3.
            std::fs::create_dir(dir.path().join("attrs")).unwrap();
            std::fs::write(dir.path().join("attrs/0123456789abcdef.attrs"), b"{}").unwrap();
            assert!(leftovers(dir.path()).unwrap().disposable());

            let mut dirty = Entry::new(cache.new_stem());
            let mut r = Record::new("b", "dirty");
            r.dirty = true;
            dirty.create(7, &r).unwrap();
            let mut uploading = Entry::new(cache.new_stem());
            let mut r = Record::new("b", "streamed");
            r.upload_id = Some("u1".into());
            uploading.write_record(&r).unwrap();
            let found = leftovers(dir.path()).unwrap();
            assert!(!found.disposable());
            assert_eq!(
                found.unsaved,
                vec![
                    ("s3://b/dirty".to_owned(), 7),
                    ("s3://b/streamed".to_owned(), 0)
                ]
            );
        }
        // A data file without its record, or a file of another program: kept, reported.
        let other = private_tempdir();
        std::fs::write(other.path().join("0123-4.data"), b"?").unwrap();
        std::fs::write(other.path().join("notes.txt"), b"?").unwrap();
        std::fs::create_dir_all(other.path().join("sub/deeper")).unwrap();
        std::fs::write(other.path().join("sub/deeper/x"), b"?").unwrap();
        let found = leftovers(other.path()).unwrap();
        assert_eq!(found.unknown.len(), 3);
        assert!(!found.disposable());
        // Empty directories hold nothing.
        let empty = private_tempdir();
        std::fs::create_dir_all(empty.path().join("sub/deeper")).unwrap();
        assert!(leftovers(empty.path()).unwrap().disposable());
    }
}
