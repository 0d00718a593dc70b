//! The node-local attribute cache: s3fs attributes (mode, owner, times, xattrs) of objects as
//! a HEAD read them, kept on disk so that a later listing of the same directory — by this
//! mount, a later one, or another mount on the node — needs no HEAD for an unchanged object.
//!
//! A listing does not return user metadata, but it does return each object's ETag, size and
//! Last-Modified. Every entry here remembers that triple as its HEAD saw it, and is used only
//! when the listing just taken shows the same triple: any write of the object (a new upload,
//! a metadata-only CopyObject such as s3fs's `chmod`) gives it a new Last-Modified. Last-Modified
//! has one-second resolution, so an object rewritten within the second its HEAD saw would keep
//! its triple: an entry whose HEAD was made less than [`SETTLE`] after the object's
//! Last-Modified (by this node's clock) is never trusted, and the object is asked again.
//!
//! Layout: one file per (store, bucket, directory prefix), `<dir>/<hash>.attrs`, holding every
//! file of that directory a listing resolved. A file is written whole to a temporary name and
//! renamed into place, so readers (other mounts, other processes) see the old or the new one,
//! never a mix; the last writer wins. It starts with a header line (format, the store and
//! prefix it describes, the length and FNV-1a hash of the body), then the body (JSON). A file
//! that does not parse, fails its hash, is too big or describes another store or prefix (a
//! hash collision, a stranger) is ignored and replaced at the next write; nothing read here
//! is trusted before it is checked against a listing.
//!
//! The directory is private (`0700`, this user's; one that is not is refused and the cache
//! not used) and its files `0600`: an entry vouches for the mode and owner the kernel checks
//! permissions against.
//!
//! Size: files past [`MAX_FILE`] are neither written nor read; when the directory grows past
//! its budget, the files least recently read or written go first (their modification time is
//! bumped at every use). Directories (`dir/` markers) are not cached: a listing does not
//! return a marker's triple, so nothing could tell that one changed.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use s3vol_s3::{ETag, ListEntry, ObjectInfo};
use serde::{Deserialize, Serialize};

use crate::cache_dir::ensure_private_dir;
use crate::meta::{Attrs, Kind, Xattrs, format_time, parse_time};

/// The file format written by this version.
const FORMAT: u32 = 1;
/// How long after an object's Last-Modified its HEAD must have been made for the entry to be
/// trusted: one second of Last-Modified resolution, plus room for the node's clock to be a
/// little off the server's.
pub const SETTLE: Duration = Duration::from_secs(3);
/// The largest file written or read (about 40,000 entries with xattrs, 150,000 without).
pub const MAX_FILE: u64 = 32 << 20;
/// The default budget of the whole directory.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;

/// One version of an object, as a listing or a HEAD shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    /// Without quotes: some stores quote ETags in HEAD responses and not in listings.
    pub etag: String,
    pub size: u64,
    /// Whole seconds: listings may carry milliseconds that HEAD responses do not.
    pub modified: i64,
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs_f64().ceil() as i64),
    }
}

fn bare(etag: &ETag) -> String {
    etag.as_str().trim_matches('"').to_owned()
}

impl Version {
    pub fn listed(e: &ListEntry) -> Self {
        Self {
            etag: bare(&e.etag),
            size: e.size,
            modified: unix_secs(e.last_modified),
        }
    }

    pub fn headed(info: &ObjectInfo) -> Self {
        Self {
            etag: bare(&info.etag),
            size: info.size,
            modified: unix_secs(info.last_modified),
        }
    }
}

/// One cached object, as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Entry {
    /// ETag, size and Last-Modified (Unix seconds) as the HEAD saw them.
    e: String,
    s: u64,
    m: i64,
    /// When the HEAD was made (Unix seconds, this node's clock).
    h: i64,
    /// Kind: `f`, `l` (symlink) or `d` (an old-style s3fs directory object without a slash).
    k: char,
    p: u16,
    u: u32,
    g: u32,
    mt: String,
    ct: String,
    at: String,
    /// Extended attributes, values in base64.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    x: BTreeMap<String, String>,
}

impl Entry {
    fn trusted(&self) -> bool {
        self.h >= self.m.saturating_add(SETTLE.as_secs() as i64)
    }

    fn attrs(&self) -> Option<Attrs> {
        let kind = match self.k {
            'f' => Kind::File,
            'l' => Kind::Symlink,
            'd' => Kind::Dir,
            _ => return None,
        };
        let mut xattrs = Xattrs::new();
        for (k, v) in &self.x {
            xattrs.insert(k.clone(), B64.decode(v).ok()?);
        }
        Some(Attrs {
            kind,
            perm: self.p & 0o7777,
            uid: self.u,
            gid: self.g,
            size: if kind == Kind::Dir { 0 } else { self.s },
            mtime: parse_time(&self.mt)?,
            ctime: parse_time(&self.ct)?,
            atime: parse_time(&self.at)?,
            xattrs,
        })
    }
}

/// The cached attributes of one directory's files, by name.
#[derive(Clone, Debug, Default)]
pub struct DirAttrs {
    entries: HashMap<String, Entry>,
}

impl DirAttrs {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The attributes of `name` if the entry describes the version a listing shows now and
    /// can be trusted (see [`SETTLE`]).
    pub fn get(&self, name: &str, listed: &Version) -> Option<Attrs> {
        let e = self.entries.get(name)?;
        if e.e != listed.etag || e.s != listed.size || e.m != listed.modified || !e.trusted() {
            return None;
        }
        e.attrs()
    }

    /// Records what a HEAD made at `headed` said of `name`. Entries that could not be
    /// trusted later are not kept (they would only cost room).
    pub fn put(&mut self, name: &str, version: &Version, headed: SystemTime, attrs: &Attrs) {
        let k = match attrs.kind {
            Kind::File => 'f',
            Kind::Symlink => 'l',
            Kind::Dir => 'd',
        };
        let entry = Entry {
            e: version.etag.clone(),
            s: version.size,
            m: version.modified,
            h: unix_secs(headed),
            k,
            p: attrs.perm,
            u: attrs.uid,
            g: attrs.gid,
            mt: format_time(attrs.mtime),
            ct: format_time(attrs.ctime),
            at: format_time(attrs.atime),
            x: attrs
                .xattrs
                .iter()
                .map(|(k, v)| (k.clone(), B64.encode(v)))
                .collect(),
        };
        if entry.trusted() {
            self.entries.insert(name.to_owned(), entry);
        } else {
            self.entries.remove(name);
        }
    }

    /// Copies the entry of `name` from `other` if it is valid for `listed` there.
    pub fn carry(&mut self, other: &DirAttrs, name: &str, listed: &Version) {
        if other.get(name, listed).is_some()
            && let Some(e) = other.entries.get(name)
        {
            self.entries.insert(name.to_owned(), e.clone());
        }
    }

    /// Whether both hold the same entries (nothing to write).
    pub fn same_as(&self, other: &DirAttrs) -> bool {
        self.entries == other.entries
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: u32,
    scope: String,
    prefix: String,
    len: u64,
    hash: String,
}

/// FNV-1a, 64 bits: names files and checks bodies (not a defence against a writer that
/// means harm — the directory is private — but against torn and foreign files).
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The node-local attribute cache of one mount (see the module docs).
#[derive(Debug)]
pub struct AttrCache {
    dir: PathBuf,
    /// The store and bucket: `endpoint|region|bucket`.
    scope: String,
    max_bytes: u64,
    /// Bytes in the directory as last counted plus what this process wrote since; `None`
    /// until first counted.
    used: Mutex<Option<u64>>,
    seq: AtomicU64,
}

impl AttrCache {
    /// Opens the cache directory. One that exists must be private (this user's, `0700`):
    /// entries vouch for modes and owners the kernel checks permissions against, so nobody
    /// else may write them. One that does not is created (`0700`) at the first write.
    pub fn open(dir: &Path, scope: String, max_bytes: u64) -> io::Result<Self> {
        if dir.exists() {
            ensure_private_dir(dir).map_err(io::Error::other)?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            scope,
            max_bytes,
            used: Mutex::new(None),
            seq: AtomicU64::new(0),
        })
    }

    fn path(&self, prefix: &str) -> PathBuf {
        let h = fnv(&[self.scope.as_bytes(), prefix.as_bytes()]);
        self.dir.join(format!("{h:016x}.attrs"))
    }

    /// What is cached for the directory `prefix`: empty when nothing is, or when the file is
    /// unreadable, corrupt or someone else's.
    pub fn load(&self, prefix: &str) -> DirAttrs {
        let path = self.path(prefix);
        match self.read(&path, prefix) {
            Ok(Some(d)) => {
                // Used: the last to be evicted.
                if let Ok(f) = std::fs::File::options().write(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                d
            }
            Ok(None) => DirAttrs::default(),
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::debug!(file = %path.display(), error = %e, "attribute cache file ignored");
                }
                DirAttrs::default()
            }
        }
    }

    fn read(&self, path: &Path, prefix: &str) -> io::Result<Option<DirAttrs>> {
        let file = std::fs::File::open(path)?;
        if file.metadata()?.len() > MAX_FILE {
            return Ok(None);
        }
        let mut buf = Vec::new();
        file.take(MAX_FILE).read_to_end(&mut buf)?;
        let Some(nl) = buf.iter().position(|b| *b == b'\n') else {
            return Ok(None);
        };
        let (head, body) = (&buf[..nl], &buf[nl + 1..]);
        let Ok(header) = serde_json::from_slice::<Header>(head) else {
            return Ok(None);
        };
        if header.format != FORMAT
            || header.scope != self.scope
            || header.prefix != prefix
            || header.len != body.len() as u64
            || header.hash != format!("{:016x}", fnv(&[body]))
        {
            return Ok(None);
        }
        let Ok(entries) = serde_json::from_slice::<HashMap<String, Entry>>(body) else {
            return Ok(None);
        };
        Ok(Some(DirAttrs { entries }))
    }

    /// Replaces what is cached for `prefix` (an empty set removes the file). Errors are
    /// logged, never returned: the cache only saves requests.
    pub fn store(&self, prefix: &str, attrs: &DirAttrs) {
        let path = self.path(prefix);
        if attrs.is_empty() {
            let _ = std::fs::remove_file(&path);
            return;
        }
        if let Err(e) = self.write(&path, prefix, attrs) {
            tracing::debug!(file = %path.display(), error = %e, "attribute cache file not written");
        }
    }

    fn write(&self, path: &Path, prefix: &str, attrs: &DirAttrs) -> io::Result<()> {
        let body = serde_json::to_vec(&attrs.entries).map_err(io::Error::other)?;
        let header = Header {
            format: FORMAT,
            scope: self.scope.clone(),
            prefix: prefix.to_owned(),
            len: body.len() as u64,
            hash: format!("{:016x}", fnv(&[&body])),
        };
        let mut head = serde_json::to_vec(&header).map_err(io::Error::other)?;
        head.push(b'\n');
        let size = (head.len() + body.len()) as u64;
        if size > MAX_FILE {
            let _ = std::fs::remove_file(path);
            return Ok(());
        }
        if !self.dir.exists() {
            ensure_private_dir(&self.dir).map_err(io::Error::other)?;
        }
        let tmp = self.dir.join(format!(
            ".{}.{}-{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("x"),
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut f = std::fs::File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&head)?;
            f.write_all(&body)?;
            let old = std::fs::metadata(path).map_or(0, |m| m.len());
            std::fs::rename(&tmp, path)?;
            Ok::<_, io::Error>(old)
        })();
        let old = match result {
            Ok(old) => old,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        self.account(size, old);
        Ok(())
    }

    /// Counts a file written in place of one of `old` bytes, and trims the directory to its
    /// budget when it is over.
    fn account(&self, new: u64, old: u64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let now = match *used {
            Some(u) => (u + new).saturating_sub(old),
            None => self.trim(u64::MAX),
        };
        *used = Some(if now > self.max_bytes {
            self.trim(self.max_bytes / 4 * 3)
        } else {
            now
        });
    }

    /// Removes the least recently used files until the directory holds at most `to` bytes;
    /// returns what it holds then.
    fn trim(&self, to: u64) -> u64 {
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut files: Vec<(SystemTime, u64, PathBuf)> = read
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                m.is_file()
                    .then(|| (m.modified().unwrap_or(UNIX_EPOCH), m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= to {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
        total
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::FsConfig;
    use s3vol_s3::BucketName;

    fn attrs(perm: u16) -> Attrs {
        let config = FsConfig::new(
            BucketName::new("bkt").unwrap(),
            String::new(),
            "/tmp".into(),
        );
        let mut a = Attrs::defaults(
            Kind::File,
            &config,
            5,
            UNIX_EPOCH + Duration::new(1_700_000_000, 250_000_000),
        );
        a.perm = perm;
        a.uid = 7;
        a.xattrs.insert("user.k".into(), b"v\0x".to_vec());
        a
    }

    fn version(etag: &str, modified: i64) -> Version {
        Version {
            etag: etag.into(),
            size: 5,
            modified,
        }
    }

    fn at(secs: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    }

    #[test]
    fn an_entry_answers_only_for_the_version_it_was_read_from() {
        let mut d = DirAttrs::default();
        let v = version("abc", 1_000);
        d.put("f", &v, at(2_000), &attrs(0o600));
        assert_eq!(d.get("f", &v), Some(attrs(0o600)));
        assert_eq!(d.get("g", &v), None, "another name");
        assert_eq!(d.get("f", &version("abd", 1_000)), None, "another ETag");
        assert_eq!(d.get("f", &version("abc", 1_001)), None, "rewritten later");
        let bigger = Version { size: 6, ..v };
        assert_eq!(d.get("f", &bigger), None, "another size");
    }

    #[test]
    fn a_head_made_within_seconds_of_the_last_write_is_not_trusted() {
        let mut d = DirAttrs::default();
        let v = version("abc", 1_000);
        // The same second, and the next two: a metadata-only copy in that second would keep
        // ETag, size and Last-Modified, so the entry could hide it.
        for headed in [1_000, 1_001, 1_002] {
            d.put("f", &v, at(headed), &attrs(0o600));
            assert_eq!(d.get("f", &v), None, "headed at {headed}");
            assert!(d.is_empty(), "not even kept");
        }
        d.put("f", &v, at(1_003), &attrs(0o600));
        assert!(d.get("f", &v).is_some());
        // A later HEAD too soon after a write replaces (drops) an older trusted entry.
        d.put("f", &version("new", 5_000), at(5_000), &attrs(0o644));
        assert!(d.is_empty());
    }

    #[test]
    fn files_round_trip_and_corrupt_or_foreign_ones_are_ignored_then_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("attrs");
        let cache = AttrCache::open(&dir, "ep|r|bkt".into(), DEFAULT_MAX_BYTES).unwrap();
        let v = version("abc", 1_000);
        let mut d = DirAttrs::default();
        d.put("f", &v, at(2_000), &attrs(0o600));
        d.put("sub ünï", &v, at(2_000), &attrs(0o640));
        cache.store("a/b/", &d);
        let back = cache.load("a/b/");
        assert!(back.same_as(&d));
        assert_eq!(back.get("sub ünï", &v), Some(attrs(0o640)));
        assert!(cache.load("a/").is_empty(), "another prefix");
        // Another store or bucket sharing the directory sees nothing of it.
        let other = AttrCache::open(&dir, "ep|r|other".into(), DEFAULT_MAX_BYTES).unwrap();
        assert!(other.load("a/b/").is_empty());
        // A file written for another prefix under this name (a collision): ignored.
        let path = cache.path("a/b/");
        std::fs::copy(cache.path("a/b/"), cache.path("x/")).unwrap();
        assert!(cache.load("x/").is_empty());
        // Truncated, one byte changed, garbage, empty, a huge file: ignored, no panic.
        let good = std::fs::read(&path).unwrap();
        let mut flipped = good.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 1;
        let huge = vec![b'{'; MAX_FILE as usize + 1];
        for bad in [
            &good[..good.len() / 2],
            &flipped[..],
            b"\x00\xffnot json\n{}",
            b"",
            &huge[..],
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(cache.load("a/b/").is_empty());
        }
        // A body whose hash matches but whose entries are not ours: ignored too.
        let body = br#"{"f":{"e":1}}"#;
        let header = format!(
            "{{\"format\":1,\"scope\":\"ep|r|bkt\",\"prefix\":\"a/b/\",\"len\":{},\"hash\":\"{:016x}\"}}\n",
            body.len(),
            fnv(&[body])
        );
        std::fs::write(&path, [header.as_bytes(), body].concat()).unwrap();
        assert!(cache.load("a/b/").is_empty());
        // The next write replaces whatever was there.
        cache.store("a/b/", &d);
        assert!(cache.load("a/b/").same_as(&d));
        // An entry with a kind this version does not know answers nothing.
        let mut odd = d.clone();
        odd.entries.get_mut("f").unwrap().k = '?';
        assert_eq!(odd.get("f", &v), None);
        // An empty set removes the file.
        cache.store("a/b/", &DirAttrs::default());
        assert!(!path.exists());
    }

    #[test]
    fn a_directory_others_can_write_is_not_used_and_one_missing_is_made_private_when_needed() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(AttrCache::open(&shared, "s".into(), DEFAULT_MAX_BYTES).is_err());
        let dir = tmp.path().join("a/attrs");
        let cache = AttrCache::open(&dir, "s".into(), DEFAULT_MAX_BYTES).unwrap();
        assert!(!dir.exists(), "nothing made before it is needed");
        assert!(cache.load("p/").is_empty());
        let mut d = DirAttrs::default();
        d.put("f", &version("abc", 1_000), at(2_000), &attrs(0o600));
        cache.store("p/", &d);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&cache.path("p/")), 0o600);
    }

    #[test]
    fn the_directory_stays_within_its_budget_least_recently_used_first() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("attrs");
        let v = version("abc", 1_000);
        let mut d = DirAttrs::default();
        for i in 0..20 {
            d.put(&format!("file-{i:04}"), &v, at(2_000), &attrs(0o600));
        }
        let probe = AttrCache::open(&dir, "s".into(), u64::MAX).unwrap();
        probe.store("probe/", &d);
        let one = std::fs::metadata(probe.path("probe/")).unwrap().len();
        probe.store("probe/", &DirAttrs::default());
        // Room for about five files.
        let cache = AttrCache::open(&dir, "s".into(), one * 5 + one / 2).unwrap();
        let old = UNIX_EPOCH + Duration::from_secs(1_000_000);
        for i in 0..5 {
            cache.store(&format!("d{i}/"), &d);
            let f = std::fs::File::options()
                .write(true)
                .open(cache.path(&format!("d{i}/")))
                .unwrap();
            f.set_modified(old + Duration::from_secs(i)).unwrap();
        }
        // d0 is read (used): d1 is now the least recently used.
        assert!(!cache.load("d0/").is_empty());
        for i in 5..8 {
            cache.store(&format!("d{i}/"), &d);
        }
        let total: u64 = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= one * 5 + one / 2, "{total} bytes");
        assert!(!cache.load("d0/").is_empty(), "used lately: kept");
        assert!(cache.load("d1/").is_empty(), "least recently used: gone");
        assert!(!cache.load("d7/").is_empty(), "the newest is kept");
    }
}
