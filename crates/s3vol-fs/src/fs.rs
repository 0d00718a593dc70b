//! The filesystem proper: POSIX operations over an [`ObjectStore`], in plain async Rust.
//!
//! Nothing here knows about FUSE; the adapter in `fuse.rs` calls these methods and turns
//! their results into replies. That keeps the semantics testable against the in-memory store.
//!
//! Namespace: a directory is a `dir/` marker object, a common prefix (an *implicit*
//! directory), or an s3fs-style `dir_$folder$` object. When a file and a directory have the
//! same name, the directory wins and the file is hidden. Keys that make no file name (empty
//! path segments as in `a//b`, names over 255 bytes, `.` and `..`) are not shown.
//!
//! Consistency: close-to-open. `open` asks S3 for the object's current version; attributes,
//! negative lookups and complete directory listings (`listing.rs`) are otherwise trusted for
//! `metadata_ttl`. `close` (flush) and `fsync` upload and return only when the data is in S3,
//! or fail with the error.
//!
//! Listings: one LIST page at a time, loaded when the kernel has taken what was loaded, with
//! a HEAD per entry for its s3fs metadata (or, with `listing_attrs`, the page's own size,
//! time and ETag). Entries go to the kernel with their attributes (READDIRPLUS), each counted
//! as a lookup.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use s3vol_s3::{
    CopySource, ETag, ListPage, ListRequest, MetadataDirective, ObjectInfo, ObjectStore,
    PutOptions, S3Error,
};

use crate::attr_cache::{AttrCache, DirAttrs, Version};
use crate::budget::{BufPool, Disk, Memory};
use crate::cache_dir::CacheDir;
use crate::config::FsConfig;
use crate::error::{FsError, FsResult, err};
use crate::inode::{Inode, InodeNo, Inodes, ROOT};
use crate::listing::{Listed, Listing, Listings, MAX_ENTRIES as MAX_LISTED_ENTRIES};
use crate::meta::{Attrs, Kind};
use crate::names::{Build, DirNames, FOLDER_SUFFIX, NameIndexes, Named, valid_name};
use crate::read::{ReadCtx, Reader};
use crate::recover;
use crate::stage::{Base, MAX_COPY_OBJECT, MIN_PART_SIZE, StageCtx, Staged};

/// The longest symlink target read: `PATH_MAX` less its NUL, as Linux allows.
pub(crate) const MAX_SYMLINK_TARGET: u64 = libc::PATH_MAX as u64 - 1;
/// Idle part buffers kept for reuse by streamed uploads (memory: this many parts, at most).
const PARTS_KEPT: usize = 4;

/// An entry returned by [`S3Fs::readdir`].
#[derive(Clone, Debug)]
pub struct DirEntry<'a> {
    pub ino: InodeNo,
    /// The offset of the entry after this one.
    pub next_offset: u64,
    pub kind: Kind,
    pub name: &'a str,
    /// For READDIRPLUS: the attributes the kernel caches with the entry; `None` for a node
    /// whose attributes this process never read (see [`S3Fs::readdir`]): the entry is sent
    /// with its name and type only, and counts no lookup.
    pub attrs: Option<&'a Attrs>,
}

/// How a file was opened.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenMode {
    pub write: bool,
    pub truncate: bool,
    pub append: bool,
}

#[derive(Debug)]
struct FileHandle {
    inode: Arc<Inode>,
    mode: OpenMode,
    reader: tokio::sync::Mutex<Option<Reader>>,
}

/// One entry of an open directory stream.
#[derive(Debug)]
struct StreamEntry {
    ino: InodeNo,
    next_offset: u64,
    name: String,
    /// `None` for `.` and `..`.
    inode: Option<Arc<Inode>>,
}

#[derive(Debug)]
struct DirStream {
    ino: InodeNo,
    prefix: String,
    /// Entries loaded and not yet passed by the kernel's offset.
    entries: VecDeque<StreamEntry>,
    next_offset: u64,
    token: Option<String>,
    listed_all: bool,
    done: bool,
    seen: HashSet<String>,
    /// The directory's `listing_gen` when this listing started, and when that was.
    generation: u64,
    started: Instant,
    /// Every entry so far, kept once the listing is complete; `None` when there are too many
    /// to keep or the listing came from a kept one.
    complete: Option<Vec<Listed>>,
    /// The next page, being listed already.
    next_page: Option<PrefetchedPage>,
    /// What the attribute cache held for this directory when the listing started (loaded
    /// with the first page), and what it should hold once the listing is complete: the
    /// entries still valid and what this listing's HEADs read. `None` without a cache.
    saved: Option<Arc<DirAttrs>>,
    learned: Option<DirAttrs>,
    /// Names listed without reading their attributes (see `S3Fs::unread`), to read after
    /// the reply.
    unread: Vec<UnreadName>,
}

/// A listed name whose node the kernel holds but whose attributes this process never read:
/// listed without a HEAD, read after the reply (`S3Fs::refresh_unread`).
#[derive(Debug)]
struct UnreadName {
    parent: InodeNo,
    prefix: String,
    name: String,
    kind: Kind,
    entry: Option<s3vol_s3::ListEntry>,
}

/// What a call of [`S3Fs::readdir`] listed without reading: pass it to
/// [`S3Fs::refresh_unread`] once the kernel has its reply.
#[derive(Debug, Default)]
#[must_use]
pub struct Unread(Vec<UnreadName>);

/// A LIST request running on its own; cancelled when the stream is dropped.
#[derive(Debug)]
struct PrefetchedPage(tokio::task::JoinHandle<Result<ListPage, S3Error>>);

impl Drop for PrefetchedPage {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Future for PrefetchedPage {
    type Output = Result<Result<ListPage, S3Error>, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl DirStream {
    fn new(ino: InodeNo, prefix: String) -> Self {
        Self {
            ino,
            prefix,
            entries: VecDeque::new(),
            next_offset: 0,
            token: None,
            listed_all: false,
            done: false,
            seen: HashSet::new(),
            generation: 0,
            started: Instant::now(),
            complete: Some(Vec::new()),
            next_page: None,
            saved: None,
            learned: None,
            unread: Vec::new(),
        }
    }
}

/// What a listing found for one name: its inode (none if it went meanwhile), and the version
/// and time of the HEAD that read its attributes, if one did.
struct Resolved {
    inode: Option<Arc<Inode>>,
    headed: Option<(Version, SystemTime, Attrs)>,
    /// Listed without reading its attributes: the listing's entry, to read them later.
    unread: Option<Option<s3vol_s3::ListEntry>>,
}

impl Resolved {
    fn found(inode: Option<Arc<Inode>>) -> Self {
        Self {
            inode,
            headed: None,
            unread: None,
        }
    }
}

/// See [`S3Fs::changing`].
struct Changing<'a> {
    fs: &'a S3Fs,
    dirs: [InodeNo; 2],
    /// The one name the operation added to `dirs[0]`, once it succeeded.
    added: Option<(String, Arc<Inode>)>,
    /// The one name the operation removed from `dirs[0]`, once it succeeded.
    removed: Option<String>,
}

impl Changing<'_> {
    /// The operation succeeded by adding `name` to the first directory, and changed nothing
    /// else: its kept listing takes the name in instead of going.
    fn added(&mut self, name: &str, inode: &Arc<Inode>) {
        self.added = Some((name.to_owned(), inode.clone()));
    }

    /// The operation succeeded by removing `name` from the first directory, and changed
    /// nothing else: a name index of it marks the name instead of going.
    fn removed(&mut self, name: &str) {
        self.removed = Some(name.to_owned());
    }
}

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        if let Some((name, inode)) = self.added.take()
            && let Some(dir) = self.fs.inodes.get(self.dirs[0])
        {
            self.fs.listings.add(&dir, &name, inode);
            self.fs.names.name_changed(self.dirs[0], &name);
        } else if let Some(name) = self.removed.take()
            && let Some(dir) = self.fs.inodes.get(self.dirs[0])
        {
            self.fs.listings.invalidate(&dir);
            self.fs.names.name_changed(self.dirs[0], &name);
        } else {
            self.fs.dir_changed(self.dirs[0]);
        }
        if self.dirs[1] != self.dirs[0] {
            self.fs.dir_changed(self.dirs[1]);
        }
    }
}

#[derive(Debug)]
enum Handle {
    File(Arc<FileHandle>),
    Dir(Arc<tokio::sync::Mutex<DirStream>>),
}

/// A bucket (or prefix) as a filesystem.
#[derive(Debug)]
pub struct S3Fs {
    config: FsConfig,
    store: Arc<dyn ObjectStore>,
    inodes: Inodes,
    /// Complete listings of directories, reused within `metadata_ttl`.
    listings: Listings,
    negative: Mutex<HashMap<(InodeNo, String), Instant>>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    stage: Arc<StageCtx>,
    read: Arc<ReadCtx>,
    mount_time: SystemTime,
    /// The node-local attribute cache (`attr_cache.rs`), unless turned off.
    attr_cache: Option<Arc<AttrCache>>,
    /// Directories listed after a burst of lookups (`names.rs`).
    names: Arc<NameIndexes>,
    /// What the start-up scan kept in the cache directory (stem, key): a successor's file
    /// open for writing across the event goes on from it (`adopt.rs`).
    kept_at_start: Mutex<Vec<(std::path::PathBuf, String)>>,
    /// What a dead predecessor left of files still open for writing (see `recover::scan`):
    /// entries of this instance, stem and key, for the adopted handles to go on from.
    deferred_at_start: Mutex<Vec<(std::path::PathBuf, String)>>,
    /// A successor's session journal as read at start, until `adopt` takes it.
    predecessor: Mutex<Option<crate::journal::Snapshot>>,
    /// Tree walks, and the directories listed ahead of them (`walk.rs`).
    walks: walk::Walks,
    walk_permits: tokio::sync::Semaphore,
}

fn name_ok(name: &str) -> FsResult<()> {
    if name.len() > 255 {
        return Err(err!(libc::ENAMETOOLONG, "name too long"));
    }
    if !valid_name(name) {
        return Err(err!(libc::EINVAL, "invalid name {name:?}"));
    }
    Ok(())
}

/// Whether two ETags name the same version. Some stores quote them in HEAD responses and not
/// in listings (or the other way round).
fn same_etag(a: &ETag, b: &ETag) -> bool {
    a.as_str().trim_matches('"') == b.as_str().trim_matches('"')
}

fn not_found(e: &S3Error) -> bool {
    matches!(e, S3Error::NotFound(_))
}

impl S3Fs {
    /// Checks that the bucket is reachable, then builds the filesystem.
    pub async fn new(config: FsConfig, store: Arc<dyn ObjectStore>) -> FsResult<Self> {
        match store.head_bucket(&config.bucket).await {
            Ok(()) => {}
            Err(e) if config.successor && !matches!(e, S3Error::NoSuchBucket(_)) => {
                tracing::warn!(error = %e, "S3 does not answer as this successor starts; serving the mount all the same (calls that need S3 fail or wait as during any outage)");
            }
            Err(e) => {
                let fs: FsError = e.clone().into();
                return Err(err!(fs.errno, "{e}"));
            }
        }
        let memory = Arc::new(Memory::new(config.memory_limit));
        let disk = Arc::new(Disk::new(config.cache_size));
        let cache = CacheDir::open(&config.cache_dir).map_err(|e| err!(libc::EACCES, "{e}"))?;
        let stage = Arc::new(StageCtx {
            stream: config.stream_writes || config.parts_arena.is_some(),
            store: store.clone(),
            bucket: config.bucket.clone(),
            cache: Arc::new(cache),
            part_size: config.part_size,
            memory: memory.clone(),
            disk,
            parts: Arc::new(BufPool::new(
                config.part_size.max(MIN_PART_SIZE) as usize,
                PARTS_KEPT,
            )),
            arena: config.parts_arena.clone(),
            close_timeout: config.close_timeout,
            min_throughput: config.min_throughput,
        });
        let mut kept_at_start = Vec::new();
        let mut deferred_at_start = Vec::new();
        // A successor's journal, read once: for the scan here and for `adopt`.
        let predecessor = match (&config.session_dir, config.successor) {
            (Some(dir), true) => crate::journal::Journal::read(dir).ok(),
            _ => None,
        };
        if !config.read_only {
            // What earlier mounts left, before anything is served (see `recover`): first what
            // a dead predecessor held in part buffers, which then is a staging file too.
            if let Some(arena) = &stage.arena {
                recover::take_over_parts(&stage, arena);
            }
            // A successor leaves what its handles still write to them.
            let writing = predecessor
                .as_ref()
                .map(|snap| snap.keys_open_for_writing(&config.prefix))
                .unwrap_or_default();
            let report = recover::scan(&stage, &writing).await;
            kept_at_start = report.kept_files;
            deferred_at_start = report.deferred;
        }
        let read = Arc::new(ReadCtx {
            store: store.clone(),
            bucket: config.bucket.clone(),
            memory: memory.clone(),
            part_size: config.part_size,
            max_window: (16 * config.part_size).min(config.memory_limit / 4),
        });
        let now = SystemTime::now();
        let root_attrs = Attrs::defaults(Kind::Dir, &config, 0, now);
        let attr_cache = config.attr_cache_dir.as_ref().and_then(|dir| {
            match AttrCache::open(dir, config.store_scope.clone(), config.attr_cache_size) {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "the attribute cache cannot be used: every listing HEADs its files");
                    None
                }
            }
        });
        Ok(Self {
            attr_cache,
            names: Arc::new(NameIndexes::default()),
            kept_at_start: Mutex::new(kept_at_start),
            deferred_at_start: Mutex::new(deferred_at_start),
            predecessor: Mutex::new(predecessor),
            walks: walk::Walks::default(),
            walk_permits: tokio::sync::Semaphore::new(walk::AT_ONCE),
            inodes: Inodes::new(config.prefix.clone(), root_attrs),
            config,
            store,
            listings: Listings::new(MAX_LISTED_ENTRIES),
            negative: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            stage,
            read,
            mount_time: now,
        })
    }

    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    fn ro(&self) -> FsResult<()> {
        if self.config.read_only {
            return Err(err!(libc::EROFS, "read-only mount"));
        }
        Ok(())
    }

    fn inode(&self, ino: InodeNo) -> FsResult<Arc<Inode>> {
        self.inodes
            .get(ino)
            .ok_or_else(|| err!(libc::ESTALE, "unknown inode {ino}"))
    }

    fn dir_key(&self, ino: InodeNo) -> FsResult<(Arc<Inode>, String)> {
        let inode = self.inode(ino)?;
        if inode.kind != Kind::Dir {
            return Err(err!(libc::ENOTDIR, "inode {ino} is not a directory"));
        }
        let key = inode.key();
        Ok((inode, key))
    }

    fn fresh(&self, validated: Option<Instant>) -> bool {
        validated.is_some_and(|t| t.elapsed() < self.config.metadata_ttl)
    }

    /// The group of a new node: the parent's when the parent has the set-group-ID bit (as on
    /// any POSIX filesystem; it is how fsGroup volumes keep new files in the pod's group),
    /// else the creator's.
    fn new_gid(parent: &Inode, gid: u32) -> (u32, bool) {
        let p = parent.state();
        if u32::from(p.attrs.perm) & libc::S_ISGID != 0 {
            (p.attrs.gid, true)
        } else {
            (gid, false)
        }
    }

    fn negative_hit(&self, parent: InodeNo, name: &str) -> bool {
        let mut neg = self.negative.lock().unwrap_or_else(|e| e.into_inner());
        match neg.get(&(parent, name.to_owned())) {
            Some(t) if t.elapsed() < self.config.metadata_ttl => true,
            Some(_) => {
                neg.remove(&(parent, name.to_owned()));
                false
            }
            None => false,
        }
    }

    /// Whether `parent` has a kept listing (complete, younger than the TTL, with this mount's
    /// own changes) without `name`: a miss answered with no request, as the negative cache
    /// would (what shells, `PATH` searches and module loaders ask all the time).
    fn listed_without(&self, parent: InodeNo, name: &str) -> bool {
        self.listings
            .get(parent, self.config.metadata_ttl)
            .is_some_and(|l| !l.has(name))
    }

    fn set_negative(&self, parent: InodeNo, name: &str, missing: bool) {
        let mut neg = self.negative.lock().unwrap_or_else(|e| e.into_inner());
        if missing {
            if neg.len() > 100_000 {
                let ttl = self.config.metadata_ttl;
                neg.retain(|_, t| t.elapsed() < ttl);
            }
            neg.insert((parent, name.to_owned()), Instant::now());
        } else {
            neg.remove(&(parent, name.to_owned()));
        }
    }

    /// The attributes the kernel should see (local size wins while a file is staged).
    pub fn attrs_of(&self, inode: &Inode) -> Attrs {
        inode.state().attrs.clone()
    }

    // ----- lookup and attributes ------------------------------------------------------

    /// What S3 says is at `key` (a file key, without trailing slash): a directory, a file,
    /// or nothing.
    async fn probe(&self, key: &str) -> FsResult<Option<(Attrs, Option<ETag>, bool)>> {
        // Two requests at once: HEAD of the file and a one-key listing under `key/`, whose
        // first key is the `key/` marker when there is one (it sorts before its children).
        // Only a marker (for its attributes) or a miss (for an s3fs `key_$folder$` object)
        // costs a third request.
        let dir_key = format!("{key}/");
        let listing = ListRequest {
            prefix: dir_key.clone(),
            max_keys: Some(1),
            ..ListRequest::default()
        };
        let b = &self.config.bucket;
        let (file, list) = tokio::join!(
            self.store.head_object(b, key),
            self.store.list_objects(b, &listing),
        );
        let list = list?;
        if list.objects.first().is_some_and(|o| o.key == dir_key) {
            match self.store.head_object(b, &dir_key).await {
                Ok(info) => {
                    let attrs = self.dir_attrs(&info);
                    return Ok(Some((attrs, None, true)));
                }
                Err(e) if !not_found(&e) => return Err(e.into()),
                // Deleted since the listing: the children (if any) still make a directory.
                Err(_) => {}
            }
        }
        if !list.objects.is_empty() || !list.common_prefixes.is_empty() {
            let attrs = Attrs::defaults(Kind::Dir, &self.config, 0, self.mount_time);
            return Ok(Some((attrs, None, false)));
        }
        match file {
            Ok(info) => return Ok(Some(self.file_attrs(&info))),
            Err(e) if !not_found(&e) => return Err(e.into()),
            Err(_) => {}
        }
        match self
            .store
            .head_object(b, &format!("{key}{FOLDER_SUFFIX}"))
            .await
        {
            Ok(info) => {
                let attrs = self.dir_attrs(&info);
                Ok(Some((attrs, None, false)))
            }
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A directory's attributes from its marker object (`dir/` or `dir_$folder$`).
    fn dir_attrs(&self, info: &ObjectInfo) -> Attrs {
        Attrs::decode(
            Kind::Dir,
            &info.metadata,
            &self.config,
            0,
            info.last_modified,
        )
    }

    fn file_attrs(&self, info: &ObjectInfo) -> (Attrs, Option<ETag>, bool) {
        let attrs = Attrs::decode(
            Kind::File,
            &info.metadata,
            &self.config,
            info.size,
            info.last_modified,
        );
        (attrs, Some(info.etag.clone()), false)
    }

    pub async fn lookup(&self, parent: InodeNo, name: &str) -> FsResult<(Arc<Inode>, Attrs)> {
        if name.len() > 255 {
            return Err(err!(libc::ENAMETOOLONG, "name too long"));
        }
        let (_, parent_key) = self.dir_key(parent)?;
        if let Some(child) = self.inodes.child(parent, name) {
            let s = child.state();
            if s.local_only || s.staged.is_some() || self.fresh(s.validated) {
                let attrs = s.attrs.clone();
                drop(s);
                self.inodes.add_lookup(&child);
                return Ok((child, attrs));
            }
        }
        if !valid_name(name) || self.negative_hit(parent, name) || self.listed_without(parent, name)
        {
            return Err(err!(libc::ENOENT, "{name}: not found"));
        }
        let ttl = self.config.metadata_ttl;
        if let Some((until, mut done)) = self.names.building(parent) {
            // The directory is being listed: asking S3 for this name alongside would slow
            // the listing down, which will answer it (briefly, see `WAIT_FOR_BUILD`).
            let _ = tokio::time::timeout_at(until.into(), done.changed()).await;
        }
        if let Some(index) = self.names.ready(parent, ttl) {
            // A name the listing does not show is asked as usual: another client may have
            // made it since, and an `open` must see it (close-to-open). So is one changed
            // through this mount since.
            if let Some((at, named)) = index.get(name) {
                let named = named.clone();
                return self
                    .lookup_indexed(parent, &parent_key, name, &index, at, named)
                    .await;
            }
        } else if let Some(build) = self.names.missed(parent, ttl) {
            self.start_index(build, parent_key.clone());
        }
        let key = format!("{parent_key}{name}");
        match self.probe(&key).await? {
            None => {
                self.set_negative(parent, name, true);
                Err(err!(libc::ENOENT, "{key}: not found"))
            }
            Some((attrs, etag, marker)) => {
                let key = if attrs.kind == Kind::Dir {
                    format!("{key}/")
                } else {
                    key
                };
                let attrs_out = attrs.clone();
                let inode = self
                    .inodes
                    .upsert(parent, name, key, attrs, etag, marker, false, true);
                let attrs = if inode.kind == attrs_out.kind {
                    self.attrs_of(&inode)
                } else {
                    attrs_out
                };
                Ok((inode, attrs))
            }
        }
    }

    pub fn forget(&self, ino: InodeNo, n: u64) {
        self.inodes.forget(ino, n);
    }

    pub async fn getattr(&self, ino: InodeNo) -> FsResult<Attrs> {
        let inode = self.inode(ino)?;
        if inode.kind == Kind::Dir && ino != ROOT && inode.state().validated.is_none() {
            // Adopted from a predecessor (`adopt.rs`): its attributes were never read here.
            return self.refresh_adopted_dir(&inode).await;
        }
        {
            let s = inode.state();
            if inode.kind == Kind::Dir
                || s.local_only
                || s.staged.is_some()
                || s.unlinked
                || self.fresh(s.validated)
            {
                return Ok(s.attrs.clone());
            }
        }
        let key = inode.key();
        match self.store.head_object(&self.config.bucket, &key).await {
            Ok(info) => {
                let (attrs, etag, _) = self.file_attrs(&info);
                let mut s = inode.state();
                if s.staged.is_none() {
                    s.attrs = attrs;
                    s.etag = etag;
                    s.validated = Some(Instant::now());
                }
                Ok(s.attrs.clone())
            }
            Err(e) if not_found(&e) => Err(err!(libc::ENOENT, "{key}: gone")),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes an inode's attributes to S3 now, or marks them for the next upload when the file
    /// is staged.
    async fn persist_attrs(&self, inode: &Arc<Inode>) -> FsResult<()> {
        let (key, attrs, staged, has_marker, local_only) = {
            let s = inode.state();
            (
                s.key.clone(),
                s.attrs.clone(),
                s.staged.clone(),
                s.has_marker,
                s.local_only,
            )
        };
        if let Some(staged) = &staged {
            let mut st = staged.lock().await;
            if st.content_dirty() || local_only {
                // The attributes go up with the content, at the next flush (now, if nothing
                // has the file open).
                st.meta_dirty = true;
                drop(st);
                if inode.state().open_handles == 0 {
                    return self.upload_staged(inode).await;
                }
                return Ok(());
            }
            // A clean local copy: rewrite the attributes in S3 now, below, so the call is
            // durable when it returns.
        }
        if local_only {
            return Ok(());
        }
        let b = &self.config.bucket;
        match inode.kind {
            Kind::Dir => {
                if key == self.config.prefix && key.is_empty() {
                    return Err(err!(
                        libc::EPERM,
                        "the bucket root has no attributes of its own"
                    ));
                }
                let options = PutOptions {
                    metadata: attrs.encode(),
                    content_type: attrs.content_type(),
                    if_none_match_any: false,
                };
                let _ = has_marker;
                self.store
                    .put_object(b, &key, Bytes::new(), &options)
                    .await?;
                inode.state().has_marker = true;
            }
            Kind::File | Kind::Symlink => {
                if attrs.size > MAX_COPY_OBJECT {
                    self.copy_large(&key, &key, Some(&attrs)).await?;
                } else {
                    let source = CopySource {
                        bucket: b.clone(),
                        key: key.clone(),
                        range: None,
                        if_match: None,
                    };
                    let directive = MetadataDirective::Replace {
                        metadata: attrs.encode(),
                        content_type: attrs.content_type(),
                    };
                    let r = self.store.copy_object(b, &key, &source, &directive).await?;
                    if let Some(staged) = &staged {
                        // The copy is a new version (a new ETag on AWS) of the same bytes.
                        staged.lock().await.rebase(r.etag.clone());
                    }
                    inode.state().etag = Some(r.etag);
                }
            }
        }
        inode.state().validated = Some(Instant::now());
        Ok(())
    }

    /// Copies an object of any size server-side (CopyObject up to 5 GiB, multipart copy
    /// beyond), with its metadata copied or replaced.
    async fn copy_any(
        &self,
        from: &str,
        to: &str,
        size: u64,
        replace: Option<&Attrs>,
    ) -> FsResult<ETag> {
        if size > MAX_COPY_OBJECT {
            return self.copy_large(from, to, replace).await;
        }
        let source = CopySource {
            bucket: self.config.bucket.clone(),
            key: from.to_owned(),
            range: None,
            if_match: None,
        };
        let directive = match replace {
            Some(a) => MetadataDirective::Replace {
                metadata: a.encode(),
                content_type: a.content_type(),
            },
            None => MetadataDirective::Copy,
        };
        Ok(self
            .store
            .copy_object(&self.config.bucket, to, &source, &directive)
            .await?
            .etag)
    }

    async fn copy_large(&self, from: &str, to: &str, replace: Option<&Attrs>) -> FsResult<ETag> {
        let b = &self.config.bucket;
        let info = self.store.head_object(b, from).await?;
        let options = match replace {
            Some(a) => PutOptions {
                metadata: a.encode(),
                content_type: a.content_type(),
                if_none_match_any: false,
            },
            None => PutOptions {
                metadata: info.metadata.clone(),
                content_type: info.content_type.clone(),
                if_none_match_any: false,
            },
        };
        let part = (512u64 << 20).max(info.size.div_ceil(10_000));
        let id = self.store.create_multipart_upload(b, to, &options).await?;
        let ranges: Vec<_> = (0..info.size.div_ceil(part))
            .map(|i| (i as i32 + 1, i * part..((i + 1) * part).min(info.size)))
            .collect();
        let result: Result<Vec<_>, S3Error> = futures::stream::iter(ranges)
            .map(|(n, r)| {
                let source = CopySource {
                    bucket: b.clone(),
                    key: from.to_owned(),
                    range: Some(r),
                    if_match: Some(info.etag.clone()),
                };
                let id = &id;
                async move { self.store.upload_part_copy(b, to, id, n, &source).await }
            })
            .buffered(8)
            .try_collect()
            .await;
        match result {
            Ok(parts) => match self
                .store
                .complete_multipart_upload(b, to, &id, &parts)
                .await
            {
                Ok(r) => Ok(r.etag),
                Err(e) => {
                    let _ = self.store.abort_multipart_upload(b, to, &id).await;
                    Err(e.into())
                }
            },
            Err(e) => {
                let _ = self.store.abort_multipart_upload(b, to, &id).await;
                Err(e.into())
            }
        }
    }

    /// The bucket root has no object to hold attributes: a change is refused before it is
    /// made in memory, so a refused change never shows.
    fn attrs_storable(&self, inode: &Inode) -> FsResult<()> {
        if inode.ino == ROOT && self.config.prefix.is_empty() {
            return Err(err!(
                libc::EPERM,
                "the bucket root has no attributes of its own"
            ));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn setattr(
        &self,
        ino: InodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> FsResult<Attrs> {
        self.ro()?;
        let inode = self.inode(ino)?;
        if let Some(size) = size {
            if inode.kind != Kind::File {
                return Err(err!(libc::EISDIR, "truncate of a non-file"));
            }
            let staged = self.staged_for_write(&inode, size == 0).await?;
            staged.lock().await.truncate(size).await?;
            let mut s = inode.state();
            s.attrs.size = size;
            s.attrs.mtime = SystemTime::now();
            s.attrs.ctime = s.attrs.mtime;
        }
        let now = SystemTime::now();
        let meta_changed =
            mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some();
        let before = self.attrs_of(&inode);
        if meta_changed {
            self.attrs_storable(&inode)?;
            let mut s = inode.state();
            if let Some(m) = mode {
                s.attrs.perm = (m & 0o7777) as u16;
            }
            if let Some(u) = uid {
                s.attrs.uid = u;
            }
            if let Some(g) = gid {
                s.attrs.gid = g;
            }
            if let Some(t) = atime {
                s.attrs.atime = t;
            }
            if let Some(t) = mtime {
                s.attrs.mtime = t;
            }
            s.attrs.ctime = now;
        }
        if meta_changed || size.is_some() {
            let open = inode.state().open_handles > 0;
            if size.is_some() && !open {
                self.upload_staged(&inode).await?;
                self.drop_clean_stage(&inode);
            } else if meta_changed {
                self.persist_or_restore(&inode, before).await?;
            }
        }
        Ok(self.attrs_of(&inode))
    }

    // ----- directories -----------------------------------------------------------------

    pub fn opendir(&self, ino: InodeNo) -> FsResult<u64> {
        let (_, prefix) = self.dir_key(ino)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let stream = DirStream::new(ino, prefix);
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Handle::Dir(Arc::new(tokio::sync::Mutex::new(stream))));
        if let Some(j) = self.inodes.journal() {
            j.opened(fh, &crate::journal::HandleRec::Dir { ino });
        }
        Ok(fh)
    }

    fn dir_handle(&self, fh: u64) -> FsResult<Arc<tokio::sync::Mutex<DirStream>>> {
        match self
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh)
        {
            Some(Handle::Dir(d)) => Ok(d.clone()),
            _ => Err(err!(libc::EBADF, "bad directory handle {fh}")),
        }
    }

    /// Hands `add` the entries from `offset` on, one at a time, until `add` returns true (the
    /// reply is full and did not take that entry) or the loaded entries run out; when none
    /// are loaded, the next page is loaded first. So a call costs what the kernel takes, not
    /// what is loaded.
    ///
    /// With `plus` (READDIRPLUS) every entry carries its attributes, and every entry taken
    /// except `.` and `..` counts as a lookup of its inode, as the kernel counts it.
    pub async fn readdir(
        &self,
        fh: u64,
        offset: u64,
        plus: bool,
        mut add: impl FnMut(&DirEntry<'_>) -> bool,
    ) -> FsResult<Unread> {
        let handle = self.dir_handle(fh)?;
        let mut d = handle.lock().await;
        if offset == 0 && d.next_offset > 0 {
            // rewinddir: list again (from the kept listing while it is fresh).
            *d = DirStream::new(d.ino, d.prefix.clone());
        }
        if d.next_offset == 0 {
            self.wait_listed_ahead(d.ino).await;
            self.start_listing(&mut d)?;
        }
        while d.entries.front().is_some_and(|e| e.next_offset <= offset) {
            d.entries.pop_front();
        }
        // Load when nothing is loaded, or only `.` and `..` (a first reply with nothing else
        // would cost the kernel one more call).
        while !d.done && d.entries.back().is_none_or(|e| e.inode.is_none()) {
            self.load_page(&mut d).await?;
            while d.entries.front().is_some_and(|e| e.next_offset <= offset) {
                d.entries.pop_front();
            }
        }
        let dir_attrs = if plus {
            Some(self.attrs_of(&*self.inode(d.ino)?))
        } else {
            None
        };
        for e in &d.entries {
            let Some(listed) = &e.inode else {
                // `.` and `..`: the kernel does not count them as lookups.
                let entry = DirEntry {
                    ino: e.ino,
                    next_offset: e.next_offset,
                    kind: Kind::Dir,
                    name: &e.name,
                    attrs: dir_attrs.as_ref(),
                };
                if add(&entry) {
                    break;
                }
                continue;
            };
            let current = self.inodes.listed(d.ino, &e.name, listed, false);
            // A node the kernel already holds, whose attributes this process never read:
            // the kernel keeps what it was told (for its TTL) rather than wait for a HEAD.
            let link = plus && !self.unread(&current);
            let inode = if link {
                self.inodes.listed(d.ino, &e.name, listed, true)
            } else {
                current
            };
            let attrs = link.then(|| self.attrs_of(&inode));
            let entry = DirEntry {
                ino: inode.ino,
                next_offset: e.next_offset,
                kind: inode.kind,
                name: &e.name,
                attrs: attrs.as_ref(),
            };
            if add(&entry) {
                if link {
                    // Not sent: the kernel will not count it.
                    self.inodes.forget(inode.ino, 1);
                }
                break;
            }
        }
        Ok(Unread(std::mem::take(&mut d.unread)))
    }

    /// Reads the attributes of what a listing showed without them (see `S3Fs::unread`),
    /// many at once, as the listing would have: so they are current here before the
    /// kernel's own copies, given by a predecessor at about the same time, grow old
    /// together and send a lookup each.
    pub async fn refresh_unread(&self, unread: Unread) {
        futures::stream::iter(unread.0)
            .for_each_concurrent(self.config.list_concurrency.max(1), |u| async move {
                let still = self
                    .inodes
                    .child(u.parent, &u.name)
                    .is_some_and(|c| self.unread(&c));
                if !still {
                    return;
                }
                let r = self
                    .resolve_listed(u.parent, &u.prefix, u.name, u.kind, u.entry, None, false)
                    .await;
                if let Err(e) = r {
                    tracing::debug!(prefix = u.prefix, error = %e, "reading a listed name");
                }
            })
            .await;
    }

    /// The start of a listing: `.`, `..`, and the whole kept listing when it is fresh.
    fn start_listing(&self, d: &mut DirStream) -> FsResult<()> {
        let dir = self.inode(d.ino)?;
        let (parent, generation) = {
            let s = dir.state();
            (s.parent, s.listing_gen)
        };
        d.generation = generation;
        d.started = Instant::now();
        for (ino, name) in [(d.ino, "."), (parent, "..")] {
            d.next_offset += 1;
            let next_offset = d.next_offset;
            d.entries.push_back(StreamEntry {
                ino,
                next_offset,
                name: name.into(),
                inode: None,
            });
        }
        if let Some(listing) = self.listings.get(d.ino, self.config.metadata_ttl) {
            for l in &listing.entries {
                d.next_offset += 1;
                let next_offset = d.next_offset;
                d.entries.push_back(StreamEntry {
                    ino: l.inode.ino,
                    next_offset,
                    name: l.name.clone(),
                    inode: Some(l.inode.clone()),
                });
            }
            d.complete = None;
            d.done = true;
        }
        Ok(())
    }

    /// Appends a listed name to the stream (once per name) and to the listing to keep.
    fn push_listed(&self, d: &mut DirStream, name: String, inode: Arc<Inode>) {
        if !d.seen.insert(name.clone()) {
            return;
        }
        d.next_offset += 1;
        let next_offset = d.next_offset;
        if let Some(complete) = &mut d.complete {
            if self.listings.fits(complete.len() + 1) {
                complete.push(Listed {
                    name: name.clone(),
                    inode: inode.clone(),
                });
            } else {
                d.complete = None;
            }
        }
        d.entries.push_back(StreamEntry {
            ino: inode.ino,
            next_offset,
            name,
            inode: Some(inode),
        });
    }

    async fn load_page(&self, d: &mut DirStream) -> FsResult<()> {
        if d.listed_all {
            // Files created here and not uploaded yet.
            for child in self.inodes.local_children(d.ino) {
                let name = child.state().name.clone();
                self.push_listed(d, name, child);
            }
            d.done = true;
            if let Some(entries) = d.complete.take() {
                let dir = self.inode(d.ino)?;
                let listing = Listing::new(d.started, entries);
                self.listings.insert(&dir, d.generation, listing);
            }
            if let (Some(learned), Some(cache)) = (d.learned.take(), &self.attr_cache) {
                let saved = d.saved.take().unwrap_or_default();
                if learned.same_as(&saved) {
                    return Ok(());
                }
                let (cache, prefix) = (cache.clone(), d.prefix.clone());
                tokio::task::spawn_blocking(move || cache.store(&prefix, &learned));
            }
            return Ok(());
        }
        let page = match d.next_page.take() {
            Some(prefetched) => prefetched
                .await
                .map_err(|e| err!(libc::EIO, "listing {}: {e}", d.prefix))??,
            None => {
                let request = self.list_request(&d.prefix, d.token.take());
                self.store
                    .list_objects(&self.config.bucket, &request)
                    .await?
            }
        };
        d.token = page.next_continuation_token.clone();
        d.listed_all = d.token.is_none();
        // Pages can only be listed one after the other: ask for the next one now, while this
        // one is resolved and read, not when the kernel asks for more.
        if let Some(token) = d.token.take() {
            let store = self.store.clone();
            let bucket = self.config.bucket.clone();
            let request = self.list_request(&d.prefix, Some(token));
            d.next_page = Some(PrefetchedPage(tokio::spawn(async move {
                store.list_objects(&bucket, &request).await
            })));
        }
        // Directories first, so that a file with a directory's name is hidden.
        let mut candidates: Vec<(String, Kind, Option<s3vol_s3::ListEntry>)> = Vec::new();
        let mut dirs_here = HashSet::new();
        for cp in &page.common_prefixes {
            let name = &cp[d.prefix.len()..cp.len().saturating_sub(1).max(d.prefix.len())];
            if valid_name(name) {
                dirs_here.insert(name.to_owned());
                candidates.push((name.to_owned(), Kind::Dir, None));
            }
        }
        for o in page.objects {
            if o.key == d.prefix {
                continue;
            }
            let rest = &o.key[d.prefix.len()..];
            if let Some(dir) = rest.strip_suffix(FOLDER_SUFFIX) {
                if valid_name(dir) && dirs_here.insert(dir.to_owned()) {
                    candidates.push((dir.to_owned(), Kind::Dir, None));
                }
                continue;
            }
            if valid_name(rest) && !dirs_here.contains(rest) {
                let name = rest.to_owned();
                candidates.push((name, Kind::File, Some(o)));
            }
        }
        candidates.retain(|(name, _, _)| !d.seen.contains(name));
        if d.saved.is_none()
            && !self.config.listing_attrs
            && let Some(cache) = &self.attr_cache
        {
            // The first page of a listing from S3: what the node's attribute cache holds.
            let (cache, prefix) = (cache.clone(), d.prefix.clone());
            let saved = tokio::task::spawn_blocking(move || cache.load(&prefix))
                .await
                .unwrap_or_default();
            d.saved = Some(Arc::new(saved));
            d.learned = Some(DirAttrs::default());
        }
        // Attributes: from memory when fresh, else from the attribute cache when it holds the
        // version listed, else HEAD, many at once (or, with `listing_attrs`, from the page
        // itself).
        let parent = d.ino;
        let prefix = d.prefix.clone();
        let saved = d.saved.clone();
        let resolved: Vec<(Option<Version>, String, Kind, FsResult<Resolved>)> =
            futures::stream::iter(candidates)
                .map(|(name, kind, entry)| {
                    let prefix = prefix.clone();
                    let saved = saved.as_deref();
                    async move {
                        let listed = entry.as_ref().map(Version::listed);
                        let r = self
                            .resolve_listed(parent, &prefix, name.clone(), kind, entry, saved, true)
                            .await;
                        (listed, name, kind, r)
                    }
                })
                .buffered(self.config.list_concurrency.max(1))
                .collect()
                .await;
        for (listed, name, kind, r) in resolved {
            let mut r = r?;
            if let Some(entry) = r.unread.take() {
                d.unread.push(UnreadName {
                    parent,
                    prefix: prefix.clone(),
                    name: name.clone(),
                    kind,
                    entry,
                });
            }
            if let Some(learned) = &mut d.learned {
                match (r.headed, &listed, &d.saved) {
                    (Some((version, at, attrs)), _, _) => learned.put(&name, &version, at, &attrs),
                    (None, Some(listed), Some(saved)) => learned.carry(saved, &name, listed),
                    _ => {}
                }
            }
            let Some(inode) = r.inode else { continue };
            let name = inode.state().name.clone();
            self.push_listed(d, name, inode);
        }
        Ok(())
    }

    fn list_request(&self, prefix: &str, token: Option<String>) -> ListRequest {
        ListRequest {
            prefix: prefix.to_owned(),
            delimiter: Some("/".into()),
            continuation_token: token,
            max_keys: Some(1000),
            ..ListRequest::default()
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn resolve_listed(
        &self,
        parent: InodeNo,
        prefix: &str,
        name: String,
        kind: Kind,
        entry: Option<s3vol_s3::ListEntry>,
        saved: Option<&DirAttrs>,
        defer_unread: bool,
    ) -> FsResult<Resolved> {
        let known = self.inodes.child(parent, &name);
        if let Some(child) = &known {
            let s = child.state();
            // A symlink is listed as a file: its inode can answer for it too.
            let same_kind = (child.kind == Kind::Dir) == (kind == Kind::Dir);
            // Cached attributes of another version than the one listed are out of date,
            // however fresh.
            let same_version = entry
                .as_ref()
                .is_none_or(|e| s.etag.as_ref().is_some_and(|t| same_etag(t, &e.etag)));
            if same_kind
                && (s.local_only || s.staged.is_some() || same_version && self.fresh(s.validated))
            {
                drop(s);
                return Ok(Resolved::found(known));
            }
        }
        if self.config.listing_attrs {
            return Ok(Resolved::found(Some(
                self.listed_as_is(parent, prefix, &name, entry, known),
            )));
        }
        if defer_unread
            && let Some(child) = &known
            && (child.kind == Kind::Dir) == (kind == Kind::Dir)
            && self.unread(child)
            && saved
                .zip(entry.as_ref())
                .is_none_or(|(saved, e)| saved.get(&name, &Version::listed(e)).is_none())
        {
            // Adopted from a dead predecessor (or moved by a resent rename): the kernel holds
            // attributes the predecessor gave it, current for their TTL. Listed without a
            // HEAD, shown to READDIRPLUS by name and type only; a lookup or getattr the
            // kernel sends once its copy is old reads the object's own metadata. This keeps
            // a successor's first listing of a large directory at LIST speed; the attributes
            // are read right after the reply (`refresh_unread`).
            return Ok(Resolved {
                unread: Some(entry),
                ..Resolved::found(known)
            });
        }
        if let (Some(saved), Some(entry)) = (saved, &entry)
            && let Some(mut attrs) = saved.get(&name, &Version::listed(entry))
        {
            // The version listed is the one the cache read: no HEAD.
            attrs.size = entry.size;
            let inode = if attrs.kind == Kind::Dir {
                let key = format!("{prefix}{name}/");
                self.inodes
                    .upsert(parent, &name, key, attrs, None, false, false, false)
            } else {
                let key = format!("{prefix}{name}");
                let etag = Some(entry.etag.clone());
                self.inodes
                    .upsert(parent, &name, key, attrs, etag, false, false, false)
            };
            return Ok(Resolved::found(Some(inode)));
        }
        let b = &self.config.bucket;
        match kind {
            Kind::Dir => {
                let key = format!("{prefix}{name}/");
                let (attrs, marker) = match self.store.head_object(b, &key).await {
                    Ok(info) => (self.dir_attrs(&info), true),
                    Err(e) if not_found(&e) => (
                        Attrs::defaults(Kind::Dir, &self.config, 0, self.mount_time),
                        false,
                    ),
                    Err(e) => return Err(e.into()),
                };
                Ok(Resolved::found(Some(self.inodes.upsert(
                    parent, &name, key, attrs, None, marker, false, false,
                ))))
            }
            Kind::File | Kind::Symlink => {
                let key = format!("{prefix}{name}");
                let at = SystemTime::now();
                let info = match self.store.head_object(b, &key).await {
                    Ok(info) => info,
                    // Deleted between the listing and now.
                    Err(e) if not_found(&e) => return Ok(Resolved::found(None)),
                    Err(e) => return Err(e.into()),
                };
                let (attrs, etag, _) = self.file_attrs(&info);
                let headed = Some((Version::headed(&info), at, attrs.clone()));
                let inode = if attrs.kind == Kind::Dir {
                    let key = format!("{key}/");
                    self.inodes
                        .upsert(parent, &name, key, attrs, None, false, false, false)
                } else {
                    self.inodes
                        .upsert(parent, &name, key, attrs, etag, false, false, false)
                };
                Ok(Resolved {
                    inode: Some(inode),
                    headed,
                    unread: None,
                })
            }
        }
    }

    /// Whether `inode` is one the kernel holds but whose attributes this process never read:
    /// adopted from a predecessor (`adopt.rs`) or moved by a resent rename. Not so with
    /// `listing_attrs`, whose listed nodes are unvalidated by design and shown as listed.
    fn unread(&self, inode: &Inode) -> bool {
        if self.config.listing_attrs || inode.ino == ROOT {
            return false;
        }
        let s = inode.state();
        s.validated.is_none() && !s.local_only && s.staged.is_none() && !s.unlinked
    }

    /// `listing_attrs`: a listed name with what the LIST page says (size, Last-Modified,
    /// ETag) and the mount's defaults for the rest, without a HEAD. What this mount already
    /// knows of the same object version (its real metadata, a chmod made here) is kept. The
    /// inode is left unvalidated, so a lookup or getattr that reaches us reads the object's
    /// own metadata.
    fn listed_as_is(
        &self,
        parent: InodeNo,
        prefix: &str,
        name: &str,
        entry: Option<s3vol_s3::ListEntry>,
        known: Option<Arc<Inode>>,
    ) -> Arc<Inode> {
        let (key, attrs, etag) = match entry {
            None => {
                if let Some(dir) = known.filter(|c| c.kind == Kind::Dir) {
                    return dir;
                }
                let attrs = Attrs::defaults(Kind::Dir, &self.config, 0, self.mount_time);
                (format!("{prefix}{name}/"), attrs, None)
            }
            Some(entry) => {
                if let Some(file) = known.filter(|c| {
                    c.kind != Kind::Dir
                        && c.state()
                            .etag
                            .as_ref()
                            .is_some_and(|t| same_etag(t, &entry.etag))
                }) {
                    return file;
                }
                let attrs =
                    Attrs::defaults(Kind::File, &self.config, entry.size, entry.last_modified);
                (format!("{prefix}{name}"), attrs, Some(entry.etag))
            }
        };
        let inode = self
            .inodes
            .upsert(parent, name, key, attrs, etag, false, false, false);
        let mut s = inode.state();
        if s.staged.is_none() && !s.local_only {
            s.validated = None;
        }
        drop(s);
        inode
    }

    /// A name was added to or removed from `dir` through this mount: a kept listing of it is
    /// out of date.
    fn dir_changed(&self, dir: InodeNo) {
        self.names.drop_dir(dir);
        if let Some(inode) = self.inodes.get(dir) {
            self.listings.invalidate(&inode);
        }
    }

    /// Held by an operation that may add or remove names in `a` and `b`: their kept listings
    /// are dropped when it ends, however it ends (a failure half-way may have changed S3).
    fn changing(&self, a: InodeNo, b: InodeNo) -> Changing<'_> {
        Changing {
            fs: self,
            dirs: [a, b],
            added: None,
            removed: None,
        }
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh);
        if let Some(j) = self.inodes.journal() {
            j.closed(fh);
        }
    }

    pub async fn mkdir(
        &self,
        parent: InodeNo,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<(Arc<Inode>, Attrs)> {
        self.ro()?;
        name_ok(name)?;
        let mut changing = self.changing(parent, parent);
        let (parent_inode, parent_key) = self.dir_key(parent)?;
        let (gid, setgid) = Self::new_gid(&parent_inode, gid);
        if self
            .inodes
            .child(parent, name)
            .is_some_and(|c| !c.state().unlinked)
        {
            return Err(err!(libc::EEXIST, "{name} exists"));
        }
        let key = format!("{parent_key}{name}/");
        let mut attrs = Attrs::defaults(Kind::Dir, &self.config, 0, SystemTime::now());
        attrs.perm = (mode & 0o7777) as u16 | if setgid { libc::S_ISGID as u16 } else { 0 };
        attrs.uid = uid;
        attrs.gid = gid;
        let options = PutOptions {
            metadata: attrs.encode(),
            content_type: attrs.content_type(),
            if_none_match_any: false,
        };
        self.store
            .put_object(&self.config.bucket, &key, Bytes::new(), &options)
            .await?;
        self.set_negative(parent, name, false);
        let inode = self
            .inodes
            .upsert(parent, name, key, attrs.clone(), None, true, false, true);
        changing.added(name, &inode);
        // A directory made here starts empty: names looked up in it before anything is
        // listed there are answered without a request (other clients' additions show after
        // the TTL, as for any kept listing).
        let generation = inode.state().listing_gen;
        self.listings
            .insert(&inode, generation, Listing::new(Instant::now(), Vec::new()));
        Ok((inode, attrs))
    }

    /// Whether a directory has any child, in S3 or only here.
    async fn dir_has_children(&self, ino: InodeNo, key: &str) -> FsResult<bool> {
        if !self.inodes.local_children(ino).is_empty() {
            return Ok(true);
        }
        let page = self
            .store
            .list_objects(
                &self.config.bucket,
                &ListRequest {
                    prefix: key.to_owned(),
                    max_keys: Some(2),
                    ..ListRequest::default()
                },
            )
            .await?;
        Ok(page.objects.iter().any(|o| o.key != key) || !page.common_prefixes.is_empty())
    }

    pub async fn rmdir(&self, parent: InodeNo, name: &str) -> FsResult<()> {
        self.ro()?;
        let (child, _) = self.lookup(parent, name).await?;
        self.inodes.forget(child.ino, 1);
        let mut changing = self.changing(parent, child.ino);
        if child.kind != Kind::Dir {
            return Err(err!(libc::ENOTDIR, "{name} is not a directory"));
        }
        let key = child.key();
        if self.dir_has_children(child.ino, &key).await? {
            return Err(err!(libc::ENOTEMPTY, "{key} is not empty"));
        }
        let b = &self.config.bucket;
        self.store.delete_object(b, &key).await?;
        let folder = format!("{}{FOLDER_SUFFIX}", key.trim_end_matches('/'));
        self.store.delete_object(b, &folder).await?;
        self.inodes.detach(parent, name);
        self.set_negative(parent, name, true);
        changing.removed(name);
        Ok(())
    }

    // ----- files: see files.rs -----------------------------------------------------------

    // ----- rename: see rename.rs ----------------------------------------------------------

    // ----- extended attributes ------------------------------------------------------------

    pub fn getxattr(&self, ino: InodeNo, name: &str) -> FsResult<Vec<u8>> {
        xattr_namespace_supported(name)?;
        let inode = self.inode(ino)?;
        let s = inode.state();
        s.attrs
            .xattrs
            .get(name)
            .cloned()
            .ok_or_else(|| err!(libc::ENODATA, "no attribute {name}"))
    }

    pub fn listxattr(&self, ino: InodeNo) -> FsResult<Vec<u8>> {
        let inode = self.inode(ino)?;
        let s = inode.state();
        let mut out = Vec::new();
        for name in s.attrs.xattrs.keys() {
            if xattr_namespace_supported(name).is_err() {
                continue;
            }
            out.extend_from_slice(name.as_bytes());
            out.push(0);
        }
        Ok(out)
    }

    pub async fn setxattr(
        &self,
        ino: InodeNo,
        name: &str,
        value: &[u8],
        create: bool,
        replace: bool,
    ) -> FsResult<()> {
        xattr_namespace_supported(name)?;
        self.ro()?;
        let inode = self.inode(ino)?;
        let before = self.attrs_of(&inode);
        self.attrs_storable(&inode)?;
        {
            let mut s = inode.state();
            let exists = s.attrs.xattrs.contains_key(name);
            if create && exists {
                return Err(err!(libc::EEXIST, "{name} exists"));
            }
            if replace && !exists {
                return Err(err!(libc::ENODATA, "no attribute {name}"));
            }
            let mut attrs = s.attrs.clone();
            attrs.xattrs.insert(name.to_owned(), value.to_vec());
            // S3 keeps at most 2 KiB of user metadata per object.
            let total: usize = attrs.encode().iter().map(|(k, v)| k.len() + v.len()).sum();
            if total > 2048 - 64 {
                return Err(err!(
                    libc::ENOSPC,
                    "extended attributes exceed the 2 KiB S3 metadata limit"
                ));
            }
            s.attrs = attrs;
            s.attrs.ctime = SystemTime::now();
        }
        self.persist_or_restore(&inode, before).await
    }

    pub async fn removexattr(&self, ino: InodeNo, name: &str) -> FsResult<()> {
        xattr_namespace_supported(name)?;
        self.ro()?;
        let inode = self.inode(ino)?;
        self.attrs_storable(&inode)?;
        let before = self.attrs_of(&inode);
        if inode.state().attrs.xattrs.remove(name).is_none() {
            return Err(err!(libc::ENODATA, "no attribute {name}"));
        }
        inode.state().attrs.ctime = SystemTime::now();
        self.persist_or_restore(&inode, before).await
    }

    /// Persists changed attributes; when that fails, the change is undone here too, so a
    /// refused call leaves nothing behind.
    async fn persist_or_restore(&self, inode: &Arc<Inode>, before: Attrs) -> FsResult<()> {
        let result = self.persist_attrs(inode).await;
        if result.is_err() {
            let mut s = inode.state();
            let size = s.attrs.size;
            s.attrs = before;
            s.attrs.size = size;
        }
        result
    }

    /// Bytes not yet durable in S3.
    pub fn dirty_bytes(&self) -> u64 {
        self.stage.disk.dirty()
    }

    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    pub fn root() -> InodeNo {
        ROOT
    }
}

/// Extended attributes of the `user.` and `trusted.` namespaces are stored; `system.` (POSIX
/// ACLs, which the kernel would not enforce on this mount) and `security.` (LSM labels and file
/// capabilities: from a bucket, whoever can write an object's headers could grant an executable
/// capabilities) are refused with `EOPNOTSUPP`, as by a filesystem without them. Such
/// attributes another client stored stay in the object's headers, unseen, when s3vol rewrites
/// them. The refusal is also what lets `ls -l` stop asking: it asks every entry for
/// `security.selinux` and `system.posix_acl_access` until the device answers "not supported"
/// once, two FUSE round trips per entry otherwise.
fn xattr_namespace_supported(name: &str) -> FsResult<()> {
    if name.starts_with("system.") || name.starts_with("security.") {
        return Err(err!(
            libc::EOPNOTSUPP,
            "{name}: attributes of the system and security namespaces are not supported"
        ));
    }
    Ok(())
}

mod adopt;
mod files;
mod indexed;
mod rename;
mod walk;

#[cfg(test)]
mod listing_tests;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use s3vol_s3::{BucketName, Fault, FaultStore, MemStore, Op};

    async fn fs_over(store: Arc<FaultStore>, cache: &std::path::Path) -> S3Fs {
        let bucket = BucketName::new("bkt").unwrap();
        store.create_bucket(&bucket).await.unwrap();
        let config = FsConfig::new(bucket, String::new(), cache.join("cache"));
        S3Fs::new(config, store).await.unwrap()
    }

    #[tokio::test]
    async fn a_refused_attribute_change_leaves_nothing_behind() {
        let cache = tempfile::tempdir().unwrap();
        let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
        let fs = fs_over(store.clone(), cache.path()).await;
        let bucket = BucketName::new("bkt").unwrap();
        store
            .put_object(
                &bucket,
                "f",
                Bytes::from_static(b"x"),
                &PutOptions::default(),
            )
            .await
            .unwrap();
        let (inode, attrs) = fs.lookup(ROOT, "f").await.unwrap();
        assert_eq!(attrs.perm, 0o644);
        store.add(Fault::FailOp {
            op: Op::Copy,
            error: S3Error::Transient("injected".into()),
            times: None,
        });
        let err = fs
            .setattr(inode.ino, Some(0o600), None, None, None, None, None)
            .await
            .unwrap_err();
        assert_eq!(err.errno, libc::EIO);
        assert_eq!(fs.attrs_of(&inode).perm, 0o644, "the mode is unchanged");
        let err = fs
            .setxattr(inode.ino, "user.k", b"v", false, false)
            .await
            .unwrap_err();
        assert_eq!(err.errno, libc::EIO);
        assert_eq!(
            fs.getxattr(inode.ino, "user.k").unwrap_err().errno,
            libc::ENODATA
        );
        store.clear();
        fs.setattr(inode.ino, Some(0o600), None, None, None, None, None)
            .await
            .unwrap();
        let info = store.head_object(&bucket, "f").await.unwrap();
        assert_eq!(info.metadata["mode"], (libc::S_IFREG | 0o600).to_string());
    }

    #[tokio::test]
    async fn lookups_cost_two_requests_for_a_file() {
        let cache = tempfile::tempdir().unwrap();
        let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
        let fs = fs_over(store.clone(), cache.path()).await;
        let bucket = BucketName::new("bkt").unwrap();
        store
            .put_object(
                &bucket,
                "f",
                Bytes::from_static(b"x"),
                &PutOptions::default(),
            )
            .await
            .unwrap();
        let before = store.calls();
        fs.lookup(ROOT, "f").await.unwrap();
        assert_eq!(store.calls() - before, 2, "HEAD and a one-key LIST");
        let before = store.calls();
        fs.lookup(ROOT, "f").await.unwrap();
        assert_eq!(store.calls(), before, "cached for the TTL");
    }
}
