//! Staging: the local state of a file being written.
//!
//! A file written sequentially from empty *streams*: its bytes fill a part buffer in memory,
//! and each full part goes up as a part of a multipart upload while the application keeps
//! writing. Nothing of it touches the disk: the part buffers are counted in the memory budget
//! (and recycled, see [`BufPool`]), and a file smaller than a part is one PUT from memory at
//! close. A part whose upload fails is retried in the background with backoff, keeping its
//! bytes and their memory until it is in: at the memory limit writers wait for S3 (the same
//! backpressure as a full cache), they never fail because S3 is away.
//!
//! Anything else — a write anywhere but the end, a truncate, a read of bytes already sent —
//! *spills* the file to a staging file in the cache directory first. Without a multipart
//! upload yet, that writes the part buffer to disk; with one, the upload so far is completed
//! (the object then holds every byte written) and becomes the staging file's base, read back
//! on demand. From then on every write goes to the staging file and is uploaded at flush.
//! A streamed file has no local copy to park after close; reading it again reads S3.
//!
//! A staging file's base fills the ranges not yet present on demand, with `If-Match` so a
//! concurrent change of the object is an error and never a mix of versions. Unchanged parts of
//! a large base are copied server-side on upload (UploadPartCopy) instead of being downloaded
//! and sent back.
//!
//! The multipart upload of a stream is created with the file's attributes as they are when its
//! first part is full. At the end, the object's metadata is rewritten (a server-side copy of
//! the whole object) only when something other than the times changed meanwhile: a streamed
//! file's stored `mtime` is the time its upload began, which saves copying every large file
//! once more on close (see docs/SEMANTICS.md).
//!
//! Invariants: while streaming, the bytes `[0, sent)` are parts of the upload (done, in
//! flight, or failed and kept) and `[sent, size)` are in the part buffer. Otherwise the staging
//! file's length is the file's size; `base.size <= size`; bytes in `[base.size, size)` that
//! were never written are zeros (the file is sparse there); bytes in `[0, base.size)` are valid
//! locally where `present` says so, else they are the base's.
//!
//! Nothing here deletes data that is not durable: a failed upload keeps the bytes (in the
//! staging file, or in memory while streaming) and the error goes back to the caller (close or
//! fsync gets EIO); the next flush tries again.
//!
//! The cache directory is a journal ([`crate::cache_dir`]): a staging file's record is written
//! before the file, and kept current where a later mount needs it — when the upload starts or
//! ends, at a rename or truncate, when a clean copy becomes dirty, and (one appended line) when
//! a write first covers a range of the base not yet recorded. A stream's multipart upload is
//! recorded while it exists. Nothing is written to the journal per write on the paths that
//! matter for speed: streaming, appends, rewrites of ranges already recorded.
//!
//! A full cache filesystem is `ENOSPC` for the write that needs the room (after evicting clean
//! copies), logged once until a write of the file succeeds; nothing of a failed write is left
//! past the file's end, so an extension reads zeros. The file is never wedged: a staging file
//! whose creation failed leaves nothing behind, and the next write tries again.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use s3vol_s3::{
    BucketName, CompletedPart, CopySource, ETag, MetadataDirective, ObjectStore, PutOptions,
    S3Error, UploadId, UserMetadata,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::budget::{BufPool, Disk, Memory, MemoryPermit};
use crate::cache_dir::{BaseRecord, CacheDir, Entry, PartRecord, Record};
use crate::error::{FsError, FsResult, err};
use crate::parts::{PartArena, PartBuf};
use crate::ranges::RangeSet;

/// What staging files need from the filesystem.
#[derive(Debug)]
pub struct StageCtx {
    pub store: Arc<dyn ObjectStore>,
    pub bucket: BucketName,
    /// Where staging files and their journal records go.
    pub cache: Arc<CacheDir>,
    pub part_size: u64,
    pub memory: Arc<Memory>,
    pub disk: Arc<Disk>,
    /// New files stream from memory; else every write goes to a staging file.
    pub stream: bool,
    /// Buffers of [`StageCtx::stream_part_size`] bytes for streamed parts.
    pub parts: Arc<BufPool>,
    /// Where part buffers live when they must outlive the process (a supervised mount):
    /// slots of a memory file the supervisor holds. `None`: the heap.
    pub arena: Option<Arc<PartArena>>,
    /// How long one flush may take before it gives up (keeping the data), on top of the time
    /// its bytes take at `min_throughput`: see [`Staged::upload`].
    pub close_timeout: Duration,
    /// Bytes per second an upload is expected to reach at least.
    pub min_throughput: u64,
}

impl StageCtx {
    /// The part size of streamed uploads (S3's minimum is 5 MiB).
    pub fn stream_part_size(&self) -> u64 {
        self.part_size.max(MIN_PART_SIZE)
    }

    /// When a flush of a file of `size` bytes gives up.
    fn flush_deadline(&self, size: u64) -> Instant {
        let transfer = Duration::from_secs_f64(size as f64 / self.min_throughput.max(1) as f64);
        Instant::now() + self.close_timeout + transfer
    }
}

/// Runs one S3 call of a flush, or gives up at `deadline` (dropping the call: every caller
/// still holds the bytes it sends, so giving up loses nothing).
async fn by<T, E: Into<FsError>>(
    deadline: Instant,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> FsResult<T> {
    match tokio::time::timeout_at(deadline, call).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(flush_timed_out()),
    }
}

fn flush_timed_out() -> FsError {
    err!(
        libc::EIO,
        "S3 did not take the data within the flush's time bound (--close-timeout); it is kept \
         and sent again at the next flush"
    )
}

/// The part size of a multipart upload of a staging file of `size` bytes: the stream part
/// size, or more where 10,000 parts would not hold the file.
pub(crate) fn upload_part_size(ctx: &StageCtx, size: u64) -> u64 {
    let min = ctx.stream_part_size();
    let needed = size.div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
    min.max(needed)
}

/// S3's smallest part (but the last) of a multipart upload.
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// Largest object a single CopyObject may copy.
pub const MAX_COPY_OBJECT: u64 = 5 << 30;
const MAX_PARTS: u64 = 10_000;
/// Part uploads in flight per streamed file.
const PARTS_IN_FLIGHT: usize = 8;
/// Longest pause between two attempts of a failing part upload.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);

/// The object a staged file started from.
#[derive(Clone, Debug)]
pub struct Base {
    pub etag: ETag,
    pub size: u64,
}

/// A part's bytes, kept until the part is in the upload.
#[derive(Debug)]
struct PartData {
    number: i32,
    bytes: Bytes,
    _memory: MemoryPermit,
}

/// A part upload that failed, handed back with its bytes.
type PartFailure = (PartData, FsError);

#[derive(Debug)]
struct Stream {
    upload_id: UploadId,
    /// Metadata the upload was created with.
    metadata: UserMetadata,
    /// Bytes handed to part uploads so far.
    sent: u64,
    /// Part uploads running (retrying in the background until told to stop).
    running: Vec<JoinHandle<Result<CompletedPart, PartFailure>>>,
    done: Vec<CompletedPart>,
    /// Parts whose upload failed, to try again at the next flush.
    failed: Vec<PartData>,
    /// Set to `true` to make running part uploads stop retrying and report.
    stop_retrying: watch::Sender<bool>,
    /// A CompleteMultipartUpload that a flush stopped waiting for when its time bound ran
    /// out. S3 may still complete the upload, so whatever touches the stream next learns its
    /// outcome first. The tail it sent is still in `filling`.
    completing: Option<(JoinHandle<FsResult<ETag>>, Completion)>,
    /// A completion that answered with an error that does not prove the upload open (the
    /// answer to one that succeeded may have been lost): the next flush checks the object.
    unsure: Option<Completion>,
    /// A stream taken over from a dead predecessor ([`Staged::continued`]): some of the parts
    /// below `sent` are in S3 but not in `done`, and are listed before the upload completes.
    relist: bool,
}

/// A completion of a stream's upload: the parts it joins and the file's size then.
#[derive(Clone, Debug)]
struct Completion {
    parts: Vec<CompletedPart>,
    size: u64,
}

impl Stream {
    /// Files the outcome of a finished part upload.
    fn record(
        &mut self,
        outcome: Result<Result<CompletedPart, PartFailure>, tokio::task::JoinError>,
    ) -> FsResult<()> {
        match outcome {
            Ok(Ok(done)) => self.done.push(done),
            Ok(Err((part, e))) => {
                tracing::warn!(part = part.number, error = %e, "part upload failed; kept for the next flush");
                self.failed.push(part);
            }
            Err(e) => return Err(err!(libc::EIO, "part upload task: {e}")),
        }
        Ok(())
    }
}

/// A file being written, or read while written.
#[derive(Debug)]
pub struct Staged {
    ctx: Arc<StageCtx>,
    key: String,
    /// The staging file and its journal record (created when first needed: a streamed file
    /// never needs one, but its multipart upload is recorded).
    local: Entry,
    size: u64,
    base: Option<Base>,
    present: RangeSet,
    written: RangeSet,
    content_dirty: bool,
    /// Attributes changed since the last upload.
    pub meta_dirty: bool,
    stream: Option<Stream>,
    /// The file streams: it started empty, every write so far appended, and its bytes are in
    /// memory and in the upload, not in a staging file.
    sequential: bool,
    /// The part being filled while streaming: the bytes `[stream.sent, size)`, with the memory
    /// they take (counted as they arrive, so a small file holds only its size).
    filling: Option<(PartBuf, MemoryPermit)>,
    /// Bytes counted in the disk budget.
    reserved: u64,
    /// Bytes counted as dirty.
    dirty_counted: u64,
    /// The journal record on disk says the data file holds changes not in S3.
    recorded_dirty: bool,
    /// Ranges below the base's size that the journal record lists as valid locally.
    recorded_local: RangeSet,
    /// A multipart upload of a staging file in progress (recorded in the journal).
    uploading: Option<UploadId>,
    /// Uploads that could not be aborted (recorded in the journal for the next start).
    abandoned: Vec<UploadId>,
    /// The attributes of the last upload attempt (recorded in the journal).
    last_metadata: Option<UserMetadata>,
    /// A full cache filesystem was reported for this file (once until a write succeeds).
    enospc_logged: bool,
    /// The file was unlinked while open: its bytes serve the open handles only, and its
    /// journal record never calls them dirty, so a later start drops them instead of bringing
    /// the deleted file back.
    unlinked: bool,
}

impl Staged {
    fn create(ctx: Arc<StageCtx>, key: &str, base: Option<Base>) -> Self {
        let local = Entry::new(ctx.cache.new_stem());
        let size = base.as_ref().map_or(0, |b| b.size);
        Self {
            // From empty: a new file, or one that replaces every byte of its object.
            sequential: base.as_ref().is_none_or(|b| b.size == 0) && ctx.stream,
            ctx,
            key: key.to_owned(),
            local,
            size,
            base,
            present: RangeSet::new(),
            written: RangeSet::new(),
            content_dirty: false,
            meta_dirty: false,
            stream: None,
            filling: None,
            reserved: 0,
            dirty_counted: 0,
            recorded_dirty: false,
            recorded_local: RangeSet::new(),
            uploading: None,
            abandoned: Vec::new(),
            unlinked: false,
            last_metadata: None,
            enospc_logged: false,
        }
    }

    /// A new, empty file (create, or open with O_TRUNC): dirty from the start. `replacing`
    /// is the version of the object it replaces, if there is one.
    pub fn new_empty(ctx: Arc<StageCtx>, key: &str, replacing: Option<ETag>) -> FsResult<Self> {
        let base = replacing.map(|etag| Base { etag, size: 0 });
        let mut s = Self::create(ctx, key, base);
        s.content_dirty = true;
        Ok(s)
    }

    /// A staging file a previous mount left with data not in S3 (see [`crate::recover`]):
    /// `record` says which object version it started from and which of its ranges are valid;
    /// the data file's length `len` is the file's size.
    pub fn recovered(ctx: Arc<StageCtx>, local: Entry, record: &Record, len: u64) -> Self {
        let base = record.base.as_ref().map(|b| Base {
            etag: ETag(b.etag.clone()),
            size: b.size.min(len),
        });
        let mut s = Self::create(ctx, &record.key, base.clone());
        s.local = local;
        s.size = len;
        s.sequential = false;
        let base_size = base.map_or(0, |b| b.size);
        for &(a, b) in &record.local {
            s.present.insert(a.min(base_size)..b.min(base_size));
        }
        s.present.insert(base_size..len);
        s.written = s.present.clone();
        s.last_metadata = record
            .metadata
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        // Uploads still to abort stay recorded until a later start can.
        s.abandoned = record.abandoned.iter().cloned().map(UploadId).collect();
        s.note_recorded(record);
        s.mark_content_dirty();
        s
    }

    /// A streamed file a dead predecessor was writing and the application still has open
    /// (docs/SEMANTICS.md, "When the serving process dies"): its stream goes on where the
    /// predecessor left it, in the same multipart upload, so that no other client sees any of
    /// it before the application's flush, as without the event.
    ///
    /// `local` is the entry [`crate::recover::take_over_parts`] made of the predecessor's part
    /// buffers, with its record: the bytes `[0, streamed)` are parts of the upload, in S3 or
    /// (those that were on their way) in the data file, and `[streamed, size)` the part being
    /// filled, in the data file. The parts in the data file are sent again and the tail fills
    /// the part being filled, each from a part buffer of the arena, so a further death finds
    /// them there; only then does the record become a live stream's and the data file go. The
    /// parts S3 already holds are listed when the upload completes. A stream whose end the
    /// record cannot tell (no part was being filled) lists its parts now.
    ///
    /// `None` when the stream cannot go on here (not a stream's record, no part buffer free, S3
    /// not answering where a listing is needed): the caller recovers the entry as the start-up
    /// scan does. The entry is unchanged then (parts sent again meanwhile hold the bytes they
    /// held before).
    pub async fn continued(ctx: Arc<StageCtx>, local: Entry, record: &Record) -> Option<Self> {
        let part = ctx.stream_part_size();
        if !ctx.stream || ctx.arena.is_none() || record.part_size != part || !record.dirty {
            return None;
        }
        let key = record.key.as_str();
        let upload_id = record.upload_id.clone().map(UploadId);
        let mut kept = RangeSet::new();
        for &(a, b) in &record.local {
            kept.insert(a..b);
        }
        let len = local
            .file()
            .map_or(Ok(0), |f| f.metadata().map(|m| m.len()));
        let len = len.ok()?;
        let mut streamed = record.streamed;
        let mut size = record.size.min(len).max(streamed);
        if size == streamed {
            // No part was being filled: the file ends where the upload's parts do, which only
            // S3 can tell (a later part may be in while an earlier one was on its way).
            if let Some(id) = &upload_id {
                let listed = ctx.store.list_parts(&ctx.bucket, key, id).await.ok()?;
                let end = listed
                    .iter()
                    .map(|p| (p.part_number.max(1) as u64 - 1) * part + p.size)
                    .max()
                    .unwrap_or(0);
                streamed = streamed.max(end);
                size = streamed;
            }
        }
        if !streamed.is_multiple_of(part) || (upload_id.is_none() && streamed > 0) {
            return None;
        }
        let read = |range: std::ops::Range<u64>| -> Option<Vec<u8>> {
            let mut buf = vec![0; (range.end - range.start) as usize];
            local.file()?.read_exact_at(&mut buf, range.start).ok()?;
            Some(buf)
        };
        let base = record.base.as_ref().map(|b| Base {
            etag: ETag(b.etag.clone()),
            size: 0,
        });
        let mut s = Self::create(ctx.clone(), key, base);
        s.sequential = true;
        s.last_metadata = record
            .metadata
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        // Every byte goes into a part buffer before the data file is deleted: the tail first,
        // then each part that was on its way, sent again as soon as it is in its buffer (the
        // memory of one comes back once it is in S3, for the next).
        if size > streamed {
            let bytes = read(streamed..size)?;
            let memory = ctx.memory.acquire(bytes.len() as u64).await;
            let mut buf = s.part_buf_of(local.name(), streamed)?;
            buf.extend_from_slice(&bytes);
            s.filling = Some((buf, memory));
        }
        if let Some(upload_id) = upload_id {
            let stop_retrying = watch::Sender::new(false);
            let mut running = Vec::new();
            let mut relist = false;
            for i in 0..streamed / part {
                let range = i * part..(i + 1) * part;
                if !kept.missing(range.clone()).is_empty() {
                    relist = true;
                    continue;
                }
                let bytes = read(range.clone())?;
                let memory = ctx.memory.acquire(part).await;
                let mut buf = s.part_buf_of(local.name(), range.start)?;
                buf.extend_from_slice(&bytes);
                let data = PartData {
                    number: i as i32 + 1,
                    bytes: buf.into_bytes(),
                    _memory: memory,
                };
                running.push(tokio::spawn(upload_part(
                    ctx.clone(),
                    s.key.clone(),
                    upload_id.clone(),
                    data,
                    stop_retrying.subscribe(),
                )));
            }
            s.stream = Some(Stream {
                upload_id,
                metadata: s.last_metadata.clone().unwrap_or_default(),
                sent: streamed,
                running,
                done: Vec::new(),
                failed: Vec::new(),
                stop_retrying,
                completing: None,
                unsure: None,
                relist,
            });
        }
        s.local = local;
        s.size = size;
        s.mark_content_dirty();
        // The record of a live stream (or none, for a file that never filled a part), then
        // no data file: its bytes are in the arena.
        s.journal_or_forget();
        s.local.remove_data();
        if s.stream.is_none() {
            s.local.remove_journal();
        }
        Some(s)
    }

    /// The attributes recorded with the last upload attempt.
    pub fn recorded_metadata(&self) -> Option<&UserMetadata> {
        self.last_metadata.as_ref()
    }

    /// The existing object `key`, fetched lazily.
    pub fn from_object(ctx: Arc<StageCtx>, key: &str, base: Base) -> FsResult<Self> {
        Ok(Self::create(ctx, key, Some(base)))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The object version the local copy matches, when it is clean.
    pub fn clean_etag(&self) -> Option<&ETag> {
        if self.is_dirty() {
            return None;
        }
        self.base.as_ref().map(|b| &b.etag)
    }

    /// Whether the content has changes not yet in S3.
    pub fn content_dirty(&self) -> bool {
        self.content_dirty
    }

    /// Whether any of the file's bytes are on local disk (worth keeping as a clean copy).
    pub fn has_local_bytes(&self) -> bool {
        self.present.intersects(&(0..self.size))
    }

    /// The object was rewritten server-side with the same content (new attributes): later
    /// fills read the new version.
    pub fn rebase(&mut self, etag: ETag) {
        if let Some(b) = &mut self.base {
            b.etag = etag;
        }
        self.meta_dirty = false;
        if self.local.on_disk() {
            // A later start compares the object with the version recorded here.
            self.journal();
        }
    }

    pub fn is_dirty(&self) -> bool {
        self.content_dirty || self.meta_dirty
    }

    /// Where the staging file is (or will be, once the file needs one).
    pub fn path(&self) -> std::path::PathBuf {
        self.local.data_path()
    }

    /// After a rename: uploads go to `key`, and the journal names it for recovery.
    pub fn set_key(&mut self, key: &str) {
        self.key = key.to_owned();
        if let Some((buf, _)) = &self.filling {
            buf.set_key(key);
        }
        self.journal();
    }

    fn mark_content_dirty(&mut self) {
        self.content_dirty = true;
        let now = self.size;
        let delta = now as i64 - self.dirty_counted as i64;
        self.ctx.disk.set_dirty_delta(delta);
        self.dirty_counted = now;
    }

    async fn reserve_to(&mut self, len: u64) {
        if len > self.reserved {
            self.ctx.disk.grow(self.reserved, len - self.reserved).await;
            self.reserved = len;
        }
    }

    /// Checks that `n` bytes about to be written to the staging file fit on the cache's
    /// filesystem, evicting clean copies to make room. A full filesystem is `ENOSPC`, logged
    /// once until a write of this file succeeds again.
    fn need_disk(&mut self, n: u64) -> FsResult<()> {
        loop {
            match self.ctx.cache.take_free_space(n) {
                Ok(()) => return Ok(()),
                Err(free) => {
                    if self.ctx.disk.evict_one() {
                        continue;
                    }
                    return Err(self.disk_full(format!(
                        "{n} bytes needed, {free} free on the cache filesystem"
                    )));
                }
            }
        }
    }

    /// The error for a full cache filesystem, logged once per episode with where the data is.
    fn disk_full(&mut self, cause: String) -> FsError {
        metrics::counter!("s3vol_cache_enospc_total").increment(1);
        if !self.enospc_logged {
            self.enospc_logged = true;
            tracing::warn!(
                key = %self.key,
                cache_dir = %self.ctx.cache.path().display(),
                staging_file = %self.local.data_path().display(),
                cause = %cause,
                "the cache filesystem is full: writes to this file fail with ENOSPC until space \
                 returns; what was written before is in the staging file (or in memory and S3 \
                 while streaming)"
            );
        }
        err!(libc::ENOSPC, "cache filesystem full: {cause}")
    }

    /// Turns an I/O error on the staging file into the error for the caller (logging a full
    /// filesystem once).
    fn io_error(&mut self, e: std::io::Error) -> FsError {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => self.disk_full(e.to_string()),
            _ => e.into(),
        }
    }

    /// The journal record of the file as it is now.
    fn record(&self) -> Record {
        let mut r = Record::new(self.ctx.bucket.as_str(), &self.key);
        r.size = self.size;
        r.dirty = self.content_dirty && !self.unlinked;
        if let Some(b) = &self.base {
            r.base = Some(BaseRecord {
                etag: b.etag.as_str().to_owned(),
                size: b.size,
            });
            r.local = self
                .present
                .iter()
                .filter(|x| x.start < b.size)
                .map(|x| (x.start, x.end.min(b.size)))
                .collect();
        }
        r.upload_id = match &self.stream {
            Some(s) => {
                if self.ctx.arena.is_some() {
                    // The parts' size: a stream whose part buffers outlive the process, and
                    // held nothing when it died, goes on from the parts S3 lists (see
                    // `continued`).
                    r.part_size = self.ctx.stream_part_size();
                }
                Some(s.upload_id.0.clone())
            }
            None => self.uploading.as_ref().map(|u| u.0.clone()),
        };
        r.abandoned = self.abandoned.iter().map(|u| u.0.clone()).collect();
        r.metadata = self
            .last_metadata
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        r
    }

    fn note_recorded(&mut self, r: &Record) {
        self.recorded_dirty = r.dirty;
        self.recorded_local.clear();
        for &(a, b) in &r.local {
            self.recorded_local.insert(a..b);
        }
    }

    /// Rewrites the journal record, if the file has anything on disk or an upload to record.
    /// A failure is logged: the data itself is unaffected, only a later recovery is.
    fn journal(&mut self) {
        let needed = self.local.on_disk()
            || self.stream.is_some()
            || self.uploading.is_some()
            || !self.abandoned.is_empty();
        if !needed {
            return;
        }
        let r = self.record();
        match self.local.write_record(&r) {
            Ok(()) => self.note_recorded(&r),
            Err(e) => tracing::warn!(
                key = %self.key,
                journal = %self.local.with_ext("meta").display(),
                error = %e,
                "cannot update the cache journal; a later mount may not recover this file"
            ),
        }
    }

    /// After a write to the staging file: the journal learns that the file is dirty (one
    /// rewrite per clean-to-dirty change) and which ranges of the base were overwritten (one
    /// appended line per range not already recorded).
    fn journal_write(&mut self, range: std::ops::Range<u64>) {
        if !self.local.has_data() || self.unlinked {
            return;
        }
        if !self.recorded_dirty {
            self.journal();
            return;
        }
        let Some(base_size) = self.base.as_ref().map(|b| b.size) else {
            return;
        };
        let clipped = range.start..range.end.min(base_size);
        if clipped.is_empty() || self.recorded_local.missing(clipped.clone()).is_empty() {
            return;
        }
        match self.local.record_local((clipped.start, clipped.end)) {
            Ok(()) => self.recorded_local.insert(clipped),
            Err(e) => {
                tracing::warn!(key = %self.key, error = %e, "cannot append to the cache journal");
                self.journal();
            }
        }
    }

    /// The staging file (created at the file's size when first needed, after its journal).
    fn file(&mut self) -> FsResult<&File> {
        if !self.local.has_data() {
            let r = self.record();
            let size = self.size;
            if let Err(e) = self.local.create(size, &r) {
                return Err(self.io_error(e));
            }
            self.note_recorded(&r);
        }
        match self.local.file() {
            Some(f) => Ok(f),
            None => Err(err!(libc::EIO, "staging file not open")),
        }
    }

    /// Makes `range` (clipped to the base) present locally.
    async fn fill(&mut self, start: u64, end: u64) -> FsResult<()> {
        let Some(base) = self.base.clone() else {
            return Ok(());
        };
        let end = end.min(base.size);
        if start >= end {
            return Ok(());
        }
        for gap in self.present.missing(start..end) {
            self.reserve_to(self.size).await;
            self.need_disk(gap.end - gap.start)?;
            let got = self
                .ctx
                .store
                .get_object(
                    &self.ctx.bucket,
                    &self.key,
                    Some(gap.clone()),
                    Some(&base.etag),
                )
                .await?;
            self.file()?;
            let mut pos = gap.start;
            let mut body = got.body;
            while let Some(chunk) = body.try_next().await? {
                // Written ranges are newer than the base: never overwrite them.
                let chunk_range = pos..pos + chunk.len() as u64;
                if chunk_range.end > gap.end {
                    // A server that ignores the range sends the whole object: its bytes would
                    // land at the wrong offsets (and past what the disk budget allowed).
                    return Err(err!(
                        libc::EIO,
                        "read s3://{}/{} {gap:?}: the server sent more than the range",
                        self.ctx.bucket,
                        self.key
                    ));
                }
                let Some(file) = self.local.file() else {
                    return Err(err!(libc::EIO, "staging file not open"));
                };
                let mut failed = None;
                for hole in self.written.missing(chunk_range.clone()) {
                    let from = (hole.start - pos) as usize;
                    let to = (hole.end - pos) as usize;
                    if let Err(e) = file.write_all_at(&chunk[from..to], hole.start) {
                        failed = Some(e);
                        break;
                    }
                }
                if let Some(e) = failed {
                    // Not marked present: the range is fetched again next time.
                    return Err(self.io_error(e));
                }
                pos = chunk_range.end;
            }
            if pos != gap.end {
                return Err(err!(
                    libc::EIO,
                    "short read of s3://{}/{}: {:?} gave {} bytes",
                    self.ctx.bucket,
                    self.key,
                    gap,
                    pos - gap.start
                ));
            }
            self.present.insert(gap);
        }
        Ok(())
    }

    pub async fn read(&mut self, offset: u64, len: u64) -> FsResult<Bytes> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        if self.sequential {
            let sent = self.stream.as_ref().map_or(0, |s| s.sent);
            if offset >= sent
                && let Some((buf, _)) = &self.filling
            {
                let (from, to) = ((offset - sent) as usize, (end - sent) as usize);
                return Ok(Bytes::copy_from_slice(&buf.as_slice()[from..to]));
            }
            // Bytes already sent can be read back only from a completed object.
            self.spill("read of bytes already sent").await?;
        }
        self.fill(offset, end).await?;
        let mut buf = vec![0u8; (end - offset) as usize];
        self.file()?.read_exact_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    }

    /// Writes `data` at `offset`. `metadata` gives the file's attributes as they are now; it is
    /// called only when a streamed upload starts.
    pub async fn write(
        &mut self,
        mut offset: u64,
        mut data: &[u8],
        metadata: impl FnOnce() -> UserMetadata + Send,
    ) -> FsResult<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.completion_pending() {
            // The upload may be an object already: the stream cannot take more bytes.
            self.spill("a write after an unanswered completion").await?;
        }
        if self.sequential
            && offset < self.size
            && let Some((buf, _)) = &self.filling
        {
            // Bytes the part being filled holds already, the same, at the same place: a write
            // the kernel sent again after its serving process died having taken it (see
            // docs/SEMANTICS.md). Taking them again changes nothing, and spilling would.
            let sent = self.stream.as_ref().map_or(0, |s| s.sent);
            if let Some(held) = offset
                .checked_sub(sent)
                .and_then(|at| buf.as_slice().get(at as usize..))
            {
                let same = held.iter().zip(data).take_while(|(a, b)| a == b).count();
                if same == held.len().min(data.len()) {
                    offset += same as u64;
                    data = &data[same..];
                    if data.is_empty() {
                        return Ok(());
                    }
                }
            }
        }
        if self.sequential && offset == self.size {
            let taken = self.stream_bytes(data, metadata).await;
            self.mark_content_dirty();
            if taken == data.len() {
                return Ok(());
            }
            // The rest goes to the staging file.
            data = &data[taken..];
            offset = self.size;
        }
        if self.sequential {
            self.spill("write not at the end").await?;
        }
        let end = offset + data.len() as u64;
        self.reserve_to(end.max(self.size)).await;
        self.need_disk(data.len() as u64)?;
        let (landed, result) = write_at(self.file()?, data, offset);
        if let Err(e) = result {
            // What landed inside the file's size is content now (as after a short write);
            // nothing stays past the end, where a later extension must read zeros.
            let kept = offset..(offset + landed as u64).min(self.size);
            if !kept.is_empty() {
                self.written.insert(kept.clone());
                self.present.insert(kept.clone());
                self.mark_content_dirty();
                self.journal_write(kept);
            }
            if end > self.size
                && let Some(f) = self.local.file()
                && let Err(cut) = f.set_len(self.size)
            {
                tracing::error!(key = %self.key, error = %cut, "cannot cut a failed write off the staging file");
            }
            return Err(self.io_error(e));
        }
        self.enospc_logged = false;
        self.size = self.size.max(end);
        self.written.insert(offset..end);
        self.present.insert(offset..end);
        self.mark_content_dirty();
        self.journal_write(offset..end);
        Ok(())
    }

    pub async fn truncate(&mut self, len: u64) -> FsResult<()> {
        if len == self.size {
            return Ok(());
        }
        if len == 0 {
            // Nothing of the old content remains: streaming starts over. (An object that an
            // unanswered completion made is replaced by the next upload.)
            self.abandon_stream().await;
            if let Some(file) = self.local.file()
                && let Err(e) = file.set_len(0)
            {
                return Err(self.io_error(e));
            }
            // The object it replaces stays named (with none of its bytes in use): a later start
            // that finds the object still that version knows the staged bytes are the newer.
            self.base = self.base.take().map(|b| Base {
                etag: b.etag,
                size: 0,
            });
            self.present.clear();
            self.written.clear();
            self.size = 0;
            self.sequential = self.ctx.stream;
            self.mark_content_dirty();
            self.ctx.disk.shrink(self.reserved);
            self.reserved = 0;
            self.journal_or_forget();
            return Ok(());
        }
        // Streaming continues only from empty: the part being filled holds the bytes written
        // since the last part, not the zeros of an extension.
        self.spill("truncate").await?;
        if len > self.size {
            self.reserve_to(len).await;
        }
        // Cutting to the size first makes sure an extension reads zeros, whatever a failed
        // write may have left past the end.
        let size = self.size;
        let file = self.file()?;
        let cut = if len > size {
            file.set_len(size).and_then(|()| file.set_len(len))
        } else {
            file.set_len(len)
        };
        if let Err(e) = cut {
            return Err(self.io_error(e));
        }
        if let Some(b) = &mut self.base {
            b.size = b.size.min(len);
        }
        self.present.truncate(len);
        self.written.truncate(len);
        if len > self.size {
            // The new bytes are zeros, not the base's.
            self.written.insert(self.size..len);
            self.present.insert(self.size..len);
        }
        self.size = len;
        self.mark_content_dirty();
        if self.size < self.reserved {
            self.ctx.disk.shrink(self.reserved - self.size);
            self.reserved = self.size;
        }
        // The base may have shrunk: the record must say so before anything else is written.
        self.journal();
        Ok(())
    }

    /// Rewrites the journal record, or deletes it once there is nothing left to record.
    fn journal_or_forget(&mut self) {
        if self.local.has_data()
            || self.stream.is_some()
            || self.uploading.is_some()
            || !self.abandoned.is_empty()
        {
            self.journal();
        } else {
            self.local.remove_journal();
        }
    }

    fn part_size_for(&self, size: u64) -> u64 {
        upload_part_size(&self.ctx, size)
    }

    /// Appends `data` to the stream: to the part being filled, starting the upload of each
    /// part that is full. Returns how many bytes it took; fewer than all when the stream cannot
    /// go on (the multipart upload cannot be created, or the upload is at its last part), and
    /// the rest must go to a staging file.
    async fn stream_bytes(
        &mut self,
        mut data: &[u8],
        metadata: impl FnOnce() -> UserMetadata + Send,
    ) -> usize {
        let part = self.ctx.stream_part_size();
        let mut metadata = Some(metadata);
        let mut taken = 0;
        while !data.is_empty() {
            let sent = self.stream.as_ref().map_or(0, |s| s.sent);
            let held = self.filling.as_ref().map_or(0, |(b, _)| b.len());
            if held as u64 == part {
                // Full, and its upload could not start before: try again now.
                if let Err(e) = self.send_filled(&mut metadata).await {
                    tracing::warn!(key = %self.key, error = %e, "cannot start a multipart upload; staging the file locally");
                    return taken;
                }
                continue;
            }
            if sent / part >= MAX_PARTS - 1 {
                // The last part may be longer than a part: it is sent from a staging file.
                return taken;
            }
            let n = (part as usize - held).min(data.len());
            // Memory for the bytes about to be added, in whole KiB beyond what is held.
            let needed_kib = (held + n).div_ceil(1024) as u64;
            let held_kib = self.filling.as_ref().map_or(0, |(_, p)| p.kib());
            if needed_kib > held_kib {
                let more = self
                    .ctx
                    .memory
                    .acquire((needed_kib - held_kib) * 1024)
                    .await;
                match &mut self.filling {
                    Some((_, permit)) => permit.merge(more),
                    None => match self.new_part_buf(sent) {
                        Some(buf) => self.filling = Some((buf, more)),
                        // The rest goes to a staging file.
                        None => return taken,
                    },
                }
            }
            let Some((buf, _)) = &mut self.filling else {
                // Not reached: the first byte of a part takes memory, which makes the buffer.
                return taken;
            };
            buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            taken += n;
            self.size += n as u64;
        }
        taken
    }

    /// Starts the upload of the full part being filled (creating the multipart upload first).
    async fn send_filled(
        &mut self,
        metadata: &mut Option<impl FnOnce() -> UserMetadata + Send>,
    ) -> FsResult<()> {
        if self.stream.is_none() {
            let meta = metadata.take().map(|f| f()).unwrap_or_default();
            let options = PutOptions {
                metadata: meta.clone(),
                ..PutOptions::default()
            };
            let upload_id = self
                .ctx
                .store
                .create_multipart_upload(&self.ctx.bucket, &self.key, &options)
                .await?;
            self.stream = Some(Stream {
                upload_id,
                metadata: meta,
                sent: 0,
                running: Vec::new(),
                done: Vec::new(),
                failed: Vec::new(),
                stop_retrying: watch::Sender::new(false),
                completing: None,
                unsure: None,
                relist: false,
            });
            // A mount that dies from here on leaves a record of the upload to abort.
            self.last_metadata = self.stream.as_ref().map(|s| s.metadata.clone());
            self.journal();
        }
        if let Some(stream) = self.stream.as_mut() {
            // A window of parts in flight per file: more would only queue at the server, and
            // each holds a part of memory. The writer waits for the oldest when it is full.
            let (finished, running): (Vec<_>, Vec<_>) = std::mem::take(&mut stream.running)
                .into_iter()
                .partition(|p| p.is_finished());
            stream.running = running;
            for p in finished {
                stream.record(p.await)?;
            }
            while stream.running.len() >= PARTS_IN_FLIGHT {
                let oldest = stream.running.remove(0);
                stream.record(oldest.await)?;
            }
        }
        let (Some(stream), Some((buf, permit))) = (self.stream.as_mut(), self.filling.take())
        else {
            return Ok(());
        };
        let number = (stream.sent / self.ctx.stream_part_size()) as i32 + 1;
        stream.sent += buf.len() as u64;
        let part = PartData {
            number,
            bytes: buf.into_bytes(),
            _memory: permit,
        };
        let stop = stream.stop_retrying.subscribe();
        stream.running.push(tokio::spawn(upload_part(
            self.ctx.clone(),
            self.key.clone(),
            stream.upload_id.clone(),
            part,
            stop,
        )));
        Ok(())
    }

    /// Gives the part buffer back to the pool, with its memory.
    fn recycle_filling(&mut self) {
        if let Some((buf, _permit)) = self.filling.take() {
            buf.recycle(&self.ctx.parts);
        }
    }

    /// A part buffer for the stream's bytes from `offset` on: in a slot of the arena when
    /// there is one (`None` if every slot is taken: the file is staged on disk instead),
    /// else on the heap.
    fn new_part_buf(&self, offset: u64) -> Option<PartBuf> {
        self.part_buf_of(self.local.name(), offset)
    }

    /// The same, for the staging entry named `stem` (which a slot's header names: a
    /// successor moves the slot's bytes there). [`Staged::continued`] fills buffers for an
    /// entry that becomes the file's only once they all are.
    fn part_buf_of(&self, stem: &str, offset: u64) -> Option<PartBuf> {
        let Some(arena) = &self.ctx.arena else {
            return Some(PartBuf::Heap(self.ctx.parts.take()));
        };
        let base = self.base.as_ref().map_or("", |b| b.etag.as_str());
        let slot = arena.take(stem, &self.key, offset, base);
        if slot.is_none() {
            tracing::debug!(key = %self.key, "every part buffer slot is in use; the file is staged on disk");
        }
        slot.map(PartBuf::Slot)
    }

    /// Whether a completion of the stream's upload went unanswered and is still to be learnt.
    fn completion_pending(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.completing.is_some())
    }

    /// Ends streaming without keeping anything: stops the part uploads and aborts the upload.
    /// Returns whether an unanswered completion did make the object after all (the caller
    /// decides whether it must go).
    async fn abandon_stream(&mut self) -> bool {
        self.sequential = false;
        self.recycle_filling();
        let mut landed = false;
        if let Some(stream) = self.stream.take() {
            stream.stop_retrying.send_replace(true);
            for p in stream.running {
                let _ = p.await;
            }
            if let Some((pending, _)) = stream.completing {
                landed = matches!(pending.await, Ok(Ok(_)));
            }
            if !landed {
                self.abort_upload(stream.upload_id).await;
            }
            self.journal_or_forget();
        }
        landed
    }

    /// Moves a streaming file to a staging file. Without a multipart upload, the part buffer
    /// is written to disk; with one, the upload so far is completed and becomes the base (this
    /// needs S3: on failure nothing changes and the error is returned).
    async fn spill(&mut self, why: &str) -> FsResult<()> {
        if !self.sequential {
            return Ok(());
        }
        tracing::debug!(key = %self.key, size = self.size, why, "spilling a streamed file to a staging file");
        if let Some(stream) = &self.stream {
            let metadata = stream.metadata.clone();
            let deadline = self.ctx.flush_deadline(self.size);
            let etag = self.finish_stream(&metadata, None, deadline).await?;
            self.base = Some(Base {
                etag,
                size: self.size,
            });
            self.present.clear();
            self.written.clear();
            // From here the file is a staging file over that object, whatever happens next.
            self.sequential = false;
            self.journal_or_forget();
            self.file()?;
        } else {
            self.reserve_to(self.size).await;
            let size = self.size;
            self.need_disk(size)?;
            self.file()?;
            if let (Some(file), Some((buf, _))) = (self.local.file(), &self.filling)
                && let Err(e) = file.write_all_at(buf.as_slice(), 0)
            {
                // The bytes stay in memory; the next attempt writes them again.
                return Err(self.io_error(e));
            }
            self.written.insert(0..size);
            self.present.insert(0..size);
            self.recycle_filling();
        }
        self.sequential = false;
        Ok(())
    }

    /// Makes the file durable in S3 as `key` with `metadata`, and returns the new ETag. On
    /// failure the data is kept (locally, or in memory and the unfinished upload) and the next
    /// call tries again.
    ///
    /// A flush is bounded: it gives up (`EIO`, data kept) once [`StageCtx::close_timeout`]
    /// plus the time the file's size takes at [`StageCtx::min_throughput`] have passed, so an
    /// unresponsive server cannot hold `close` for the sum of every request's retries.
    pub async fn upload(
        &mut self,
        metadata: &UserMetadata,
        content_type: Option<String>,
    ) -> FsResult<ETag> {
        let deadline = self.ctx.flush_deadline(self.size);
        let result = if !self.content_dirty
            && let Some(base) = &self.base
            && self.size <= MAX_COPY_OBJECT
        {
            // Only the attributes changed: S3 already holds these bytes, unless another
            // client deleted the object meanwhile (then a local copy, if whole, is sent).
            let etag = base.etag.clone();
            match self
                .replace_metadata(metadata, content_type.clone(), deadline)
                .await
            {
                Err(e)
                    if e.errno == libc::ENOENT && self.present.missing(0..self.size).is_empty() =>
                {
                    self.put_all(metadata, content_type, deadline).await
                }
                copied => copied.map(|c| c.unwrap_or(etag)),
            }
        } else if !self.sequential {
            self.put_all(metadata, content_type, deadline).await
        } else if self.stream.is_some() {
            self.finish_stream(metadata, content_type, deadline).await
        } else {
            self.put_filling(metadata, content_type, deadline).await
        };
        match result {
            Ok(etag) => {
                self.content_landed(etag.clone());
                self.meta_dirty = false;
                if self.local.on_disk() {
                    self.last_metadata = Some(metadata.clone());
                    self.journal_or_forget();
                }
                Ok(etag)
            }
            Err(e) => {
                metrics::counter!("s3vol_upload_failures_total").increment(1);
                self.last_metadata = Some(metadata.clone());
                self.journal_or_forget();
                let kept = match (&self.stream, self.sequential) {
                    _ if !self.content_dirty => {
                        "in S3 already: only the attributes are not yet written".to_owned()
                    }
                    (Some(s), _) => format!(
                        "in memory and in the unfinished multipart upload {} (recorded in {})",
                        s.upload_id.0,
                        self.local.with_ext("meta").display()
                    ),
                    (None, true) => {
                        "in memory only: the staging file could not be written".to_owned()
                    }
                    (None, false) => {
                        format!("in the staging file {}", self.local.data_path().display())
                    }
                };
                tracing::error!(
                    key = %self.key,
                    kept = %kept,
                    staging_file = %self.local.data_path().display(),
                    error = %e,
                    "upload failed; the data is kept and retried on the next flush"
                );
                Err(err!(
                    e.errno_or_eio(),
                    "upload of s3://{}/{}: {}",
                    self.ctx.bucket,
                    self.key,
                    e.message
                ))
            }
        }
    }

    /// The file's bytes are the object `etag` in S3: nothing of its content is dirty.
    fn content_landed(&mut self, etag: ETag) {
        self.base = Some(Base {
            etag,
            size: self.size,
        });
        // `present` stays as it is: parts copied server-side were never downloaded, and the
        // new object holds the same bytes there to fetch when read.
        self.written.clear();
        self.content_dirty = false;
        // An empty file may stream again: many programs open a file, dup the descriptor and
        // close the first one (a flush) before writing.
        self.sequential = self.size == 0 && self.ctx.stream;
        self.ctx.disk.set_dirty_delta(-(self.dirty_counted as i64));
        self.dirty_counted = 0;
    }

    /// Uploads a file that never filled a part from its buffer. On failure the bytes go to the
    /// staging file, where the next flush finds them.
    async fn put_filling(
        &mut self,
        metadata: &UserMetadata,
        content_type: Option<String>,
        deadline: Instant,
    ) -> FsResult<ETag> {
        let (bytes, lent) = match self.filling.take() {
            Some((buf, permit)) => {
                let (bytes, lent) = buf.lend();
                (bytes, Some((lent, permit)))
            }
            None => (Bytes::new(), None),
        };
        let options = PutOptions {
            metadata: metadata.clone(),
            content_type,
            if_none_match_any: false,
        };
        let put = by(
            deadline,
            self.ctx
                .store
                .put_object(&self.ctx.bucket, &self.key, bytes, &options),
        )
        .await;
        match put {
            Ok(r) => {
                if let Some((lent, _permit)) = lent {
                    lent.recycle(&self.ctx.parts);
                }
                Ok(r.etag)
            }
            Err(e) => {
                if let Some((lent, permit)) = lent {
                    self.filling = Some((lent.restore(), permit));
                }
                if let Err(local) = self.spill("upload failed").await {
                    tracing::error!(key = %self.key, error = %local, "cannot write the staging file; the data stays in memory");
                }
                Err(e)
            }
        }
    }

    async fn put_all(
        &mut self,
        metadata: &UserMetadata,
        content_type: Option<String>,
        deadline: Instant,
    ) -> FsResult<ETag> {
        if self.size <= self.ctx.stream_part_size() {
            self.put_whole(metadata, content_type, deadline).await
        } else {
            self.put_multipart(metadata, content_type, deadline).await
        }
    }

    /// Completes the stream's upload with the part being filled as its last part. On failure
    /// the stream stays as it is (failed parts keep their bytes) for the next try.
    async fn finish_stream(
        &mut self,
        metadata: &UserMetadata,
        content_type: Option<String>,
        deadline: Instant,
    ) -> FsResult<ETag> {
        // A completion an earlier flush stopped waiting for decides first.
        if let Some((mut pending, tried)) = self.stream.as_mut().and_then(|s| s.completing.take()) {
            match tokio::time::timeout_at(deadline, &mut pending).await {
                Err(_) => {
                    if let Some(s) = self.stream.as_mut() {
                        s.completing = Some((pending, tried));
                    }
                    return Err(flush_timed_out());
                }
                Ok(Ok(Ok(etag))) => {
                    return self
                        .landed(etag, tried, metadata, content_type, deadline)
                        .await;
                }
                Ok(Ok(Err(e))) => {
                    tracing::warn!(key = %self.key, error = %e, "an earlier completion of the upload failed");
                    if let Some(s) = self.stream.as_mut() {
                        s.unsure = Some(tried);
                    }
                }
                Ok(Err(e)) => return Err(err!(libc::EIO, "upload completion task: {e}")),
            }
        }
        // One that failed may have completed the upload all the same (its answer lost): then
        // the upload is gone, and the object has the ETag its parts make.
        if let Some(tried) = self.stream.as_mut().and_then(|s| s.unsure.take()) {
            let head = by(
                deadline,
                self.ctx.store.head_object(&self.ctx.bucket, &self.key),
            )
            .await;
            match head {
                Ok(info) if made_by(&info.etag, &tried.parts) => {
                    tracing::info!(key = %self.key, "an upload whose completion failed was completed all the same");
                    return self
                        .landed(info.etag, tried, metadata, content_type, deadline)
                        .await;
                }
                Err(e) if e.errno != libc::ENOENT => {
                    if let Some(s) = self.stream.as_mut() {
                        s.unsure = Some(tried);
                    }
                    return Err(e);
                }
                _ => {}
            }
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err(err!(libc::EIO, "no upload to finish"));
        };
        // Running uploads report now instead of retrying further; failed ones get one more try.
        stream.stop_retrying.send_replace(true);
        let mut first_err = None;
        let mut still_running = Vec::new();
        for mut p in std::mem::take(&mut stream.running) {
            match tokio::time::timeout_at(deadline, &mut p).await {
                Ok(outcome) => {
                    if let Err(e) = stream.record(outcome) {
                        first_err = first_err.or(Some(e));
                    }
                }
                // Still sending: it keeps its bytes, and the next flush waits for it again.
                Err(_) => {
                    first_err = first_err.or(Some(flush_timed_out()));
                    still_running.push(p);
                }
            }
        }
        stream.running = still_running;
        stream.stop_retrying.send_replace(false);
        // Failed parts go again, a few at a time; each keeps its bytes until it is in.
        let (ctx, key, id) = (&self.ctx, &self.key, &stream.upload_id);
        let retried: Vec<(PartData, FsResult<CompletedPart>)> =
            futures::stream::iter(std::mem::take(&mut stream.failed))
                .map(|part| async move {
                    let sent = by(
                        deadline,
                        ctx.store.upload_part(
                            &ctx.bucket,
                            key,
                            id,
                            part.number,
                            part.bytes.clone(),
                        ),
                    )
                    .await;
                    (part, sent)
                })
                .buffer_unordered(PARTS_IN_FLIGHT)
                .collect()
                .await;
        for (part, sent) in retried {
            match sent {
                Ok(done) => stream.done.push(done),
                Err(e) => {
                    first_err = first_err.or(Some(e));
                    stream.failed.push(part);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let part = self.ctx.stream_part_size();
        if stream.relist {
            // Parts a dead predecessor put in S3 (see `continued`): full parts below `sent`
            // that this process did not send. (A shorter one is a tail that a flush sent and
            // the stream has grown past: it is sent again, full, under its number.)
            let listed = by(
                deadline,
                self.ctx
                    .store
                    .list_parts(&self.ctx.bucket, &self.key, &stream.upload_id),
            )
            .await;
            match listed {
                Ok(listed) => {
                    let known: std::collections::HashSet<i32> =
                        stream.done.iter().map(|p| p.part_number).collect();
                    for p in listed {
                        if p.size == part
                            && (p.part_number as u64) <= stream.sent / part
                            && !known.contains(&p.part_number)
                        {
                            stream.done.push(CompletedPart {
                                part_number: p.part_number,
                                etag: p.etag,
                            });
                        }
                    }
                    stream.relist = false;
                }
                Err(e) if e.errno == libc::ENOENT => {
                    return self
                        .completed_before(metadata, content_type, deadline)
                        .await;
                }
                Err(e) => return Err(e),
            }
        }
        // Every byte below `sent` is in a part: a gap would complete a shorter object.
        let have: std::collections::HashSet<i32> =
            stream.done.iter().map(|p| p.part_number).collect();
        if let Some(gap) = (1..=(stream.sent / part) as i32).find(|n| !have.contains(n)) {
            return Err(err!(
                libc::EIO,
                "part {gap} of the multipart upload {} is neither in S3 nor in memory",
                stream.upload_id.0
            ));
        }
        // The tail goes up as the last part, but its bytes stay until the upload is complete:
        // if completing fails, the file may grow further, and the tail is then a part like
        // the others (sent again under the same number, which replaces it).
        let mut parts = stream.done.clone();
        let mut tail = None;
        if self.size > stream.sent {
            let number = (stream.sent / self.ctx.stream_part_size()) as i32 + 1;
            let Some((buf, permit)) = self.filling.take() else {
                return Err(err!(libc::EIO, "the last part of the upload is missing"));
            };
            let (bytes, lent) = buf.lend();
            let sent = by(
                deadline,
                self.ctx.store.upload_part(
                    &self.ctx.bucket,
                    &self.key,
                    &stream.upload_id,
                    number,
                    bytes,
                ),
            )
            .await;
            match sent {
                Ok(done) => {
                    parts.push(done);
                    tail = Some((lent, permit));
                }
                Err(e) => {
                    self.filling = Some((lent.restore(), permit));
                    return Err(e);
                }
            }
        }
        parts.sort_by_key(|p| p.part_number);
        let tried = Completion {
            parts: parts.clone(),
            size: self.size,
        };
        // A task, not a call dropped at the deadline: S3 may complete the upload after the
        // flush gave up, and the file must then learn that it is an object.
        let mut completing = tokio::spawn(complete_upload(
            self.ctx.clone(),
            self.key.clone(),
            stream.upload_id.clone(),
            parts,
        ));
        let outcome = match tokio::time::timeout_at(deadline, &mut completing).await {
            Ok(Ok(outcome)) => {
                if outcome.is_err() {
                    stream.unsure = Some(tried);
                }
                outcome
            }
            Ok(Err(e)) => Err(err!(libc::EIO, "upload completion task: {e}")),
            Err(_) => {
                stream.completing = Some((completing, tried));
                Err(flush_timed_out())
            }
        };
        match outcome {
            Ok(etag) => {
                if let Some((lent, _permit)) = tail {
                    lent.recycle(&self.ctx.parts);
                }
                self.completed(etag, metadata, content_type, deadline).await
            }
            Err(e) => {
                if let Some((lent, permit)) = tail {
                    self.filling = Some((lent.restore(), permit));
                }
                Err(e)
            }
        }
    }

    /// The upload of a stream taken over from a dead predecessor is gone when it comes to be
    /// completed: the predecessor completed it in a flush it did not live to answer (the
    /// kernel sent that flush again). The object then has the file's size and as many parts as
    /// the file makes; anything else means another client ended the upload, and the bytes it
    /// held are lost to this file: `EIO`, with what is left kept as it is.
    async fn completed_before(
        &mut self,
        metadata: &UserMetadata,
        content_type: Option<String>,
        deadline: Instant,
    ) -> FsResult<ETag> {
        let part = self.ctx.stream_part_size();
        let head = by(
            deadline,
            self.ctx.store.head_object(&self.ctx.bucket, &self.key),
        )
        .await;
        let id = self
            .stream
            .as_ref()
            .map(|s| s.upload_id.0.clone())
            .unwrap_or_default();
        let parts = self.size.div_ceil(part);
        match head {
            Ok(info)
                if info.size == self.size
                    && info
                        .etag
                        .as_str()
                        .trim_matches('"')
                        .ends_with(&format!("-{parts}")) =>
            {
                tracing::info!(key = %self.key, upload_id = id, "a multipart upload taken over from a dead serving process was completed by it");
                self.recycle_filling();
                self.completed(info.etag, metadata, content_type, deadline)
                    .await
            }
            Err(e) if e.errno != libc::ENOENT => Err(e),
            Ok(_) | Err(_) => Err(err!(
                libc::EIO,
                "the multipart upload {id} of this file is gone, and the object is not what it \
                 would have made: another client ended it"
            )),
        }
    }

    /// A completion that was not waited for made the object `etag` of the upload as it was
    /// then. The file may have grown since (after a failed flush, the application wrote on):
    /// the object then holds the first bytes, and the rest, all in memory, goes to the
    /// staging file over it.
    async fn landed(
        &mut self,
        etag: ETag,
        tried: Completion,
        metadata: &UserMetadata,
        content_type: Option<String>,
        deadline: Instant,
    ) -> FsResult<ETag> {
        if tried.size == self.size {
            // The tail it sent is in the object.
            self.recycle_filling();
            return self.completed(etag, metadata, content_type, deadline).await;
        }
        if let Err(e) = self.unstream_over(etag.clone(), tried.size).await {
            if let Some(s) = self.stream.as_mut() {
                s.unsure = Some(tried);
            }
            return Err(e);
        }
        self.put_all(metadata, content_type, deadline).await
    }

    /// Ends a stream whose upload became the object `etag` with the file's first `prefix`
    /// bytes: every later byte (in the part being filled and in parts not in that upload,
    /// all in memory) goes to the staging file, over that object as the base.
    async fn unstream_over(&mut self, etag: ETag, prefix: u64) -> FsResult<()> {
        let part = self.ctx.stream_part_size();
        let Some(stream) = self.stream.as_mut() else {
            return Err(err!(libc::EIO, "no stream to end"));
        };
        stream.stop_retrying.send_replace(true);
        for p in std::mem::take(&mut stream.running) {
            stream.record(p.await)?;
        }
        let mut pieces: Vec<(u64, Bytes)> = Vec::new();
        if let Some((buf, _)) = &self.filling {
            pieces.push((stream.sent, Bytes::copy_from_slice(buf.as_slice())));
        }
        for p in &stream.failed {
            pieces.push(((p.number as u64 - 1) * part, p.bytes.clone()));
        }
        let mut held = RangeSet::new();
        held.insert(0..prefix);
        for (at, bytes) in &pieces {
            held.insert(*at..at + bytes.len() as u64);
        }
        if !held.missing(0..self.size).is_empty() {
            // Parts that went into no completed upload and are no longer in memory.
            return Err(err!(
                libc::EIO,
                "s3://{}/{}: the upload was completed with the first {prefix} bytes, and bytes \
                 written after that are neither in it nor in memory",
                self.ctx.bucket,
                self.key
            ));
        }
        self.reserve_to(self.size).await;
        self.need_disk(self.size - prefix)?;
        self.file()?;
        for (at, bytes) in &pieces {
            let Some(file) = self.local.file() else {
                return Err(err!(libc::EIO, "staging file not open"));
            };
            if let Err(e) = file.write_all_at(bytes, *at) {
                return Err(self.io_error(e));
            }
        }
        for (at, bytes) in pieces {
            let range = at..at + bytes.len() as u64;
            self.written.insert(range.clone());
            self.present.insert(range);
        }
        self.base = Some(Base { etag, size: prefix });
        self.stream = None;
        self.recycle_filling();
        self.sequential = false;
        self.journal();
        Ok(())
    }

    /// The stream's upload is complete as the object `etag`: the stream ends, and the object's
    /// attributes are rewritten if they are not `metadata` (the upload was created before the
    /// final attributes were known).
    async fn completed(
        &mut self,
        etag: ETag,
        metadata: &UserMetadata,
        content_type: Option<String>,
        deadline: Instant,
    ) -> FsResult<ETag> {
        let Some(stream) = self.stream.take() else {
            return Ok(etag);
        };
        let created_with = stream.metadata;
        if !same_but_times(&created_with, metadata) || content_type.is_some() {
            // The upload was created before the final attributes were known. The copy makes a
            // new version; on AWS it has a new ETag, which is the one to remember.
            match self
                .replace_metadata(metadata, content_type, deadline)
                .await
            {
                Ok(Some(copied)) => return Ok(copied),
                Ok(None) => {}
                Err(e) => {
                    // The bytes are in S3 now and no longer in memory: from here on the file
                    // is that object, and the next flush only rewrites its attributes.
                    self.content_landed(etag);
                    self.meta_dirty = true;
                    return Err(e);
                }
            }
        }
        Ok(etag)
    }

    async fn replace_metadata(
        &self,
        metadata: &UserMetadata,
        content_type: Option<String>,
        deadline: Instant,
    ) -> FsResult<Option<ETag>> {
        if self.size > MAX_COPY_OBJECT {
            tracing::warn!(key = %self.key, "object over 5 GiB: attributes not rewritten");
            return Ok(None);
        }
        let source = CopySource {
            bucket: self.ctx.bucket.clone(),
            key: self.key.clone(),
            range: None,
            if_match: None,
        };
        let directive = MetadataDirective::Replace {
            metadata: metadata.clone(),
            content_type,
        };
        let copied = by(
            deadline,
            self.ctx
                .store
                .copy_object(&self.ctx.bucket, &self.key, &source, &directive),
        )
        .await?;
        Ok(Some(copied.etag))
    }

    async fn put_whole(
        &mut self,
        metadata: &UserMetadata,
        content_type: Option<String>,
        deadline: Instant,
    ) -> FsResult<ETag> {
        self.fill(0, self.size).await?;
        // The record learns the ranges just fetched: a successor that finds this file after a
        // death during the PUT then has every byte here and needs no version of the object,
        // which the PUT may have replaced as the process died.
        let base_size = self.base.as_ref().map_or(0, |b| b.size.min(self.size));
        if self.local.on_disk() && !self.recorded_local.missing(0..base_size).is_empty() {
            self.journal();
        }
        let _permit = self.ctx.memory.acquire(self.size).await;
        let mut buf = vec![0u8; self.size as usize];
        self.file()?.read_exact_at(&mut buf, 0)?;
        let options = PutOptions {
            metadata: metadata.clone(),
            content_type,
            if_none_match_any: false,
        };
        let put =
            self.ctx
                .store
                .put_object(&self.ctx.bucket, &self.key, Bytes::from(buf), &options);
        Ok(by(deadline, put).await?.etag)
    }

    async fn put_multipart(
        &mut self,
        metadata: &UserMetadata,
        content_type: Option<String>,
        deadline: Instant,
    ) -> FsResult<ETag> {
        let part = self.part_size_for(self.size);
        let options = PutOptions {
            metadata: metadata.clone(),
            content_type,
            if_none_match_any: false,
        };
        let id = by(
            deadline,
            self.ctx
                .store
                .create_multipart_upload(&self.ctx.bucket, &self.key, &options),
        )
        .await?;
        // Recorded, so that a mount killed in the middle leaves the upload for the next one
        // to abort.
        self.uploading = Some(id.clone());
        self.journal();
        // The staging file holds every byte, so giving up in the middle loses nothing.
        let result = match by(deadline, self.send_parts(&id, part)).await {
            Ok(parts) => by(
                deadline,
                self.ctx
                    .store
                    .complete_multipart_upload(&self.ctx.bucket, &self.key, &id, &parts),
            )
            .await
            .map(|r| r.etag),
            Err(e) => Err(e),
        };
        self.uploading = None;
        if result.is_err() {
            self.abort_upload(id).await;
        }
        result
    }

    /// Aborts a multipart upload this file no longer needs; one that cannot be aborted now is
    /// recorded for the next start-up scan.
    async fn abort_upload(&mut self, id: UploadId) {
        let aborted = self
            .ctx
            .store
            .abort_multipart_upload(&self.ctx.bucket, &self.key, &id)
            .await;
        if let Err(e) = aborted
            && !matches!(e, S3Error::NotFound(_))
        {
            tracing::warn!(key = %self.key, upload_id = %id.0, error = %e, "cannot abort an unfinished multipart upload; recorded for the next start");
            self.abandoned.push(id);
        }
    }

    async fn send_parts(&mut self, id: &UploadId, part: u64) -> FsResult<Vec<CompletedPart>> {
        let count = self.size.div_ceil(part);
        // Unchanged parts of the base are copied server-side; the rest is made present locally
        // first (sequentially, it writes the staging file), then sent concurrently.
        let mut jobs = Vec::new();
        for i in 0..count {
            let start = i * part;
            let end = (start + part).min(self.size);
            let unchanged = self
                .base
                .as_ref()
                .is_some_and(|b| end <= b.size && !self.written.intersects(&(start..end)));
            if !unchanged {
                self.fill(start, end).await?;
            }
            jobs.push((i as i32 + 1, start..end, unchanged));
        }
        let ctx = self.ctx.clone();
        let key = self.key.clone();
        let base_etag = self.base.as_ref().map(|b| b.etag.clone());
        let file = self.file()?;
        futures::stream::iter(jobs)
            .map(|(number, range, unchanged)| {
                let ctx = ctx.clone();
                let key = key.clone();
                let base_etag = base_etag.clone();
                async move {
                    if unchanged {
                        let source = CopySource {
                            bucket: ctx.bucket.clone(),
                            key: key.clone(),
                            range: Some(range),
                            if_match: base_etag,
                        };
                        return Ok(ctx
                            .store
                            .upload_part_copy(&ctx.bucket, &key, id, number, &source)
                            .await?);
                    }
                    let len = range.end - range.start;
                    let _permit = ctx.memory.acquire(len).await;
                    let mut buf = vec![0u8; len as usize];
                    file.read_exact_at(&mut buf, range.start)?;
                    Ok::<_, FsError>(
                        ctx.store
                            .upload_part(&ctx.bucket, &key, id, number, Bytes::from(buf))
                            .await?,
                    )
                }
            })
            .buffered(4)
            .try_collect()
            .await
    }

    /// Learns the outcome of a completion of the stream's upload that went unanswered, waiting
    /// as long as S3 takes to answer: before the file's key is deleted or given to another
    /// file, so that the upload cannot make an object there afterwards.
    pub async fn settle(&mut self) {
        let Some((pending, tried)) = self.stream.as_mut().and_then(|s| s.completing.take()) else {
            return;
        };
        match pending.await {
            Ok(Ok(etag)) if tried.size == self.size => {
                // The tail it sent is in the object; the attributes are those the upload was
                // created with, rewritten at the next flush.
                self.stream = None;
                self.recycle_filling();
                self.sequential = false;
                self.content_landed(etag);
                self.meta_dirty = true;
                self.journal_or_forget();
            }
            Ok(Ok(etag)) => {
                if let Err(e) = self.unstream_over(etag, tried.size).await {
                    tracing::error!(key = %self.key, error = %e, "an upload completed late; the bytes written since are kept in memory");
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(key = %self.key, error = %e, "completing the upload failed; the next flush checks whether it is open");
                if let Some(s) = self.stream.as_mut() {
                    s.unsure = Some(tried);
                }
            }
            Err(e) => tracing::warn!(key = %self.key, error = %e, "upload completion task failed"),
        }
    }

    /// Throws the local data away (the file was unlinked). Waits for stream parts and aborts
    /// the upload so nothing appears in the bucket.
    pub async fn discard(&mut self) {
        if self.abandon_stream().await {
            // The object came from a completion that went unanswered before the unlink.
            if let Err(e) = self
                .ctx
                .store
                .delete_object(&self.ctx.bucket, &self.key)
                .await
            {
                tracing::error!(key = %self.key, error = %e, "an unlinked file's upload completed late and its object cannot be deleted");
            }
        }
        self.content_dirty = false;
        self.meta_dirty = false;
        self.unlinked = true;
        self.journal_or_forget();
    }

    /// The file's object is about to be deleted while handles still read it (unlink of an
    /// open file): every byte goes to the staging file (a stream is spilled, which completes
    /// its upload so far; ranges of the base not yet here are fetched), and the base is
    /// forgotten, so nothing is read from S3 any more. On failure nothing changes.
    pub async fn make_local(&mut self) -> FsResult<()> {
        self.spill("the file is unlinked while open").await?;
        let size = self.size;
        self.fill(0, size).await?;
        self.base = None;
        Ok(())
    }

    /// The process is about to exit with this file not in S3: what only memory holds (the
    /// part being filled, parts whose upload failed or is still being tried) goes to the
    /// staging file, which is then fsynced with its `.key` and `.meta` companions. Returns where the bytes
    /// are, for the log.
    pub async fn keep_for_exit(&mut self) -> FsResult<String> {
        if !self.content_dirty {
            return Ok("only attribute changes were not uploaded; the content is in S3".into());
        }
        let target = format!("s3://{}/{}", self.ctx.bucket, self.key);
        let mut in_upload = None;
        self.settle().await;
        if !self.content_dirty {
            return Ok(format!(
                "{target}: its upload was completed; only attribute changes were not written"
            ));
        }
        if self.sequential {
            if let Some(stream) = &mut self.stream {
                // Running part uploads hand their bytes back instead of retrying further.
                stream.stop_retrying.send_replace(true);
                for p in std::mem::take(&mut stream.running) {
                    stream.record(p.await)?;
                }
                if !stream.done.is_empty() {
                    let mut numbers: Vec<i32> = stream.done.iter().map(|p| p.part_number).collect();
                    numbers.sort_unstable();
                    in_upload = Some(format!(
                        "; parts {numbers:?} ({} bytes each) are only in the unfinished multipart upload {} and are zeros in the staging file",
                        self.ctx.stream_part_size(),
                        stream.upload_id.0
                    ));
                }
            }
            self.keep_stream_bytes()?;
        }
        let path = self.local.data_path();
        match self.local.file() {
            Some(f) => f.sync_all()?,
            None => {
                return Err(err!(libc::EIO, "{target}: no staging file holds its data"));
            }
        }
        for companion in ["key", "meta"] {
            let p = self.local.with_ext(companion);
            if p.exists() {
                File::open(p)?.sync_all()?;
            }
        }
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        let whole = match (&in_upload, &self.base) {
            (Some(parts), _) => format!("the bytes that were in memory are in it{parts}"),
            (None, Some(b)) if !self.present.missing(0..b.size.min(self.size)).is_empty() => {
                "only the ranges written or read are in it (elsewhere, take the bytes of the object in S3)".to_owned()
            }
            (None, _) => "all of its bytes are in it".to_owned(),
        };
        Ok(format!(
            "{target} ({} bytes) is in the staging file {} (fsynced, with {} and {}): {whole}",
            self.size,
            path.display(),
            self.local.with_ext("key").display(),
            self.local.with_ext("meta").display(),
        ))
    }

    /// Writes what a stream still holds in memory (the part being filled, failed parts) to the
    /// staging file, synced, with a journal record of the upload and its parts that are in, so
    /// that the next start can complete the upload from the two (or a person can, by hand).
    /// For a process going away with a file that is still streaming.
    pub fn keep_stream_bytes(&mut self) -> FsResult<()> {
        let part = self.ctx.stream_part_size();
        if let Some(stream) = self.stream.as_mut() {
            // Part uploads that have finished report now (without waiting for the others).
            let (finished, running): (Vec<_>, Vec<_>) = std::mem::take(&mut stream.running)
                .into_iter()
                .partition(|p| p.is_finished());
            stream.running = running;
            for p in finished {
                if let Some(outcome) = futures::FutureExt::now_or_never(p) {
                    let _ = stream.record(outcome);
                }
            }
        }
        let sent = self.stream.as_ref().map_or(0, |s| s.sent);
        let mut on_disk = RangeSet::new();
        let mut pieces: Vec<(u64, Bytes)> = Vec::new();
        if let Some((buf, _)) = &self.filling {
            pieces.push((sent, Bytes::copy_from_slice(buf.as_slice())));
        }
        if let Some(stream) = &self.stream {
            for p in &stream.failed {
                pieces.push(((p.number as u64 - 1) * part, p.bytes.clone()));
            }
        }
        self.file()?;
        for (at, bytes) in pieces {
            let Some(file) = self.local.file() else {
                return Err(err!(libc::EIO, "staging file not open"));
            };
            if let Err(e) = file.write_all_at(&bytes, at) {
                return Err(self.io_error(e));
            }
            on_disk.insert(at..at + bytes.len() as u64);
        }
        if let Some(file) = self.local.file()
            && let Err(e) = file.sync_data()
        {
            return Err(self.io_error(e));
        }
        let mut r = self.record();
        r.local = on_disk.iter().map(|x| (x.start, x.end)).collect();
        if let Some(stream) = &self.stream {
            r.parts = stream
                .done
                .iter()
                .map(|p| PartRecord {
                    number: p.part_number,
                    etag: p.etag.as_str().to_owned(),
                })
                .collect();
            r.part_size = part;
            r.streamed = sent;
        }
        self.local.write_record(&r)?;
        self.note_recorded(&r);
        Ok(())
    }
}

/// `pwrite`s all of `data` at `offset`; returns how many bytes landed, and the error that
/// stopped it.
fn write_at(file: &File, mut data: &[u8], mut offset: u64) -> (usize, std::io::Result<()>) {
    let mut landed = 0;
    while !data.is_empty() {
        match file.write_at(data, offset) {
            Ok(0) => {
                return (
                    landed,
                    Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
                );
            }
            Ok(n) => {
                landed += n;
                offset += n as u64;
                data = &data[n..];
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (landed, Err(e)),
        }
    }
    (landed, Ok(()))
}

/// Whether an object with `etag` is what completing a multipart upload of `parts` made (S3
/// and compatible stores give it the MD5 of the parts' MD5s and `-N`).
fn made_by(etag: &ETag, parts: &[CompletedPart]) -> bool {
    CompletedPart::multipart_etag(parts).is_some_and(|e| etag.as_str().trim_matches('"') == e)
}

/// Completes a multipart upload of `parts`. When S3 answers with an error, the upload may
/// still have been completed by an earlier attempt whose answer was lost (a retried
/// CompleteMultipartUpload then finds no upload): the object is the upload's when its ETag is
/// the one those parts make.
async fn complete_upload(
    ctx: Arc<StageCtx>,
    key: String,
    upload_id: UploadId,
    parts: Vec<CompletedPart>,
) -> FsResult<ETag> {
    let e = match ctx
        .store
        .complete_multipart_upload(&ctx.bucket, &key, &upload_id, &parts)
        .await
    {
        Ok(done) => return Ok(done.etag),
        Err(e) => e,
    };
    if let Ok(info) = ctx.store.head_object(&ctx.bucket, &key).await
        && made_by(&info.etag, &parts)
    {
        tracing::info!(%key, upload_id = %upload_id.0, error = %e, "the upload was completed although S3's answer said otherwise: the object has its parts' ETag");
        return Ok(info.etag);
    }
    Err(e.into())
}

/// Uploads one streamed part, retrying with backoff while the error may pass, until the part
/// is in or `stop` turns `true`; a failure hands the bytes back.
async fn upload_part(
    ctx: Arc<StageCtx>,
    key: String,
    upload_id: UploadId,
    part: PartData,
    mut stop: watch::Receiver<bool>,
) -> Result<CompletedPart, PartFailure> {
    let mut delay = Duration::from_millis(500);
    loop {
        let attempt = ctx
            .store
            .upload_part(
                &ctx.bucket,
                &key,
                &upload_id,
                part.number,
                part.bytes.clone(),
            )
            .await;
        let e = match attempt {
            Ok(done) => {
                ctx.parts.give_bytes(part.bytes);
                return Ok(done);
            }
            Err(e) => e,
        };
        let hopeless = matches!(e, S3Error::NotFound(_) | S3Error::NoSuchBucket(_));
        if hopeless || *stop.borrow() {
            return Err((part, e.into()));
        }
        tracing::warn!(%key, part = part.number, error = %e, retry_in = ?delay, "part upload failed; retrying");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|stop| *stop) => return Err((part, e.into())),
        }
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// Whether two s3fs metadata maps differ at most in their times.
fn same_but_times(a: &UserMetadata, b: &UserMetadata) -> bool {
    let untimed = |m: &UserMetadata| {
        m.iter()
            .filter(|(k, _)| !matches!(k.as_str(), "mtime" | "ctime" | "atime"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<Vec<_>>()
    };
    untimed(a) == untimed(b)
}

impl FsError {
    fn errno_or_eio(&self) -> i32 {
        match self.errno {
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG | libc::EACCES => self.errno,
            _ => libc::EIO,
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        self.ctx.disk.shrink(self.reserved);
        if self.content_dirty {
            let kept = if self.sequential {
                match (self.keep_stream_bytes(), &self.stream) {
                    (Ok(()), Some(stream)) => format!(
                        "what was still in memory is in the staging file; the rest is in the \
                         unfinished multipart upload {} (both recorded in {})",
                        stream.upload_id.0,
                        self.local.with_ext("meta").display()
                    ),
                    (Ok(()), None) => "the staging file holds the whole file".to_owned(),
                    (Err(e), _) => format!("the bytes still in memory are lost: {e}"),
                }
            } else {
                self.journal();
                "the staging file is kept for recovery at the next start".to_owned()
            };
            tracing::error!(
                key = %self.key,
                staging_file = %self.local.data_path().display(),
                "dropping a file with data not in S3; {kept}"
            );
            return;
        }
        self.ctx.disk.set_dirty_delta(-(self.dirty_counted as i64));
        if self.abandoned.is_empty() {
            self.local.remove();
        } else {
            // Only the record of the uploads to abort stays.
            self.local.remove_data();
            self.journal();
        }
    }
}

#[cfg(test)]
mod tests;
