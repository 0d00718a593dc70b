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
//! staging file and its `.key` companion naming the object, or in memory while streaming) and
//! the error goes back to the caller (close or fsync gets EIO); the next flush tries again.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use s3vol_s3::{
    BucketName, CompletedPart, CopySource, ETag, MetadataDirective, ObjectStore, PutOptions,
    S3Error, UploadId, UserMetadata,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::budget::{BufPool, Disk, Memory, MemoryPermit};
use crate::error::{FsError, FsResult, err};
use crate::ranges::RangeSet;

/// What staging files need from the filesystem.
#[derive(Debug)]
pub struct StageCtx {
    pub store: Arc<dyn ObjectStore>,
    pub bucket: BucketName,
    pub dir: PathBuf,
    pub part_size: u64,
    pub memory: Arc<Memory>,
    pub disk: Arc<Disk>,
    /// Buffers of [`StageCtx::stream_part_size`] bytes for streamed parts.
    pub parts: Arc<BufPool>,
}

impl StageCtx {
    /// The part size of streamed uploads (S3's minimum is 5 MiB).
    pub fn stream_part_size(&self) -> u64 {
        self.part_size.max(MIN_PART_SIZE)
    }
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

/// The staging file, created when first needed (a streamed file never needs one).
#[derive(Debug)]
struct LocalFile {
    path: PathBuf,
    file: Option<File>,
}

impl LocalFile {
    /// The open staging file; creating it makes it `len` bytes long (sparse) and writes the
    /// `.key` companion naming `s3://bucket/key`.
    fn get(&mut self, bucket: &BucketName, key: &str, len: u64) -> FsResult<&File> {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&self.path)?;
            file.set_len(len)?;
            let mut key_file = File::create(self.path.with_extension("key"))?;
            writeln!(key_file, "s3://{bucket}/{key}")?;
            self.file = Some(file);
        }
        match &self.file {
            Some(f) => Ok(f),
            None => Err(err!(
                libc::EIO,
                "staging file {} not open",
                self.path.display()
            )),
        }
    }
}

/// A file being written, or read while written.
#[derive(Debug)]
pub struct Staged {
    ctx: Arc<StageCtx>,
    key: String,
    local: LocalFile,
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
    filling: Option<(Vec<u8>, MemoryPermit)>,
    /// Bytes counted in the disk budget.
    reserved: u64,
    /// Bytes counted as dirty.
    dirty_counted: u64,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl Staged {
    fn create(ctx: Arc<StageCtx>, key: &str, base: Option<Base>) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = ctx.dir.join(format!("{}-{n}.data", std::process::id()));
        let size = base.as_ref().map_or(0, |b| b.size);
        Self {
            sequential: base.is_none(),
            ctx,
            key: key.to_owned(),
            local: LocalFile { path, file: None },
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
        }
    }

    /// A new, empty file (create, or open with O_TRUNC): dirty from the start.
    pub fn new_empty(ctx: Arc<StageCtx>, key: &str) -> FsResult<Self> {
        let mut s = Self::create(ctx, key, None);
        s.content_dirty = true;
        Ok(s)
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
    }

    pub fn is_dirty(&self) -> bool {
        self.content_dirty || self.meta_dirty
    }

    /// Where the staging file is (or will be, once the file needs one).
    pub fn path(&self) -> &std::path::Path {
        &self.local.path
    }

    /// After a rename: uploads go to `key`, and the `.key` companion names it for recovery.
    pub fn set_key(&mut self, key: &str) {
        self.key = key.to_owned();
        if self.local.file.is_none() {
            return;
        }
        let companion = self.local.path.with_extension("key");
        if let Err(e) = std::fs::write(&companion, format!("s3://{}/{key}\n", self.ctx.bucket)) {
            tracing::warn!(file = %companion.display(), error = %e, "cannot update the staging key file");
        }
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

    /// The staging file (created at the file's size when first needed).
    fn file(&mut self) -> FsResult<&File> {
        self.local.get(&self.ctx.bucket, &self.key, self.size)
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
            let file = self.local.get(&self.ctx.bucket, &self.key, self.size)?;
            let mut pos = gap.start;
            let mut body = got.body;
            while let Some(chunk) = body.try_next().await? {
                // Written ranges are newer than the base: never overwrite them.
                let chunk_range = pos..pos + chunk.len() as u64;
                for hole in self.written.missing(chunk_range.clone()) {
                    let from = (hole.start - pos) as usize;
                    let to = (hole.end - pos) as usize;
                    file.write_all_at(&chunk[from..to], hole.start)?;
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
                return Ok(Bytes::copy_from_slice(&buf[from..to]));
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
        self.file()?.write_all_at(data, offset)?;
        self.size = self.size.max(end);
        self.written.insert(offset..end);
        self.present.insert(offset..end);
        self.mark_content_dirty();
        Ok(())
    }

    pub async fn truncate(&mut self, len: u64) -> FsResult<()> {
        if len == self.size {
            return Ok(());
        }
        if len == 0 {
            // Nothing of the old content remains: streaming starts over.
            self.abandon_stream().await;
            if let Some(file) = &self.local.file {
                file.set_len(0)?;
            }
            self.base = None;
            self.present.clear();
            self.written.clear();
            self.size = 0;
            self.sequential = true;
            self.mark_content_dirty();
            self.ctx.disk.shrink(self.reserved);
            self.reserved = 0;
            return Ok(());
        }
        // Streaming continues only from empty: the part being filled holds the bytes written
        // since the last part, not the zeros of an extension.
        self.spill("truncate").await?;
        if len > self.size {
            self.reserve_to(len).await;
        }
        self.file()?.set_len(len)?;
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
        Ok(())
    }

    fn part_size_for(&self, size: u64) -> u64 {
        let min = self.ctx.stream_part_size();
        let needed = size.div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
        min.max(needed)
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
                    None => self.filling = Some((self.ctx.parts.take(), more)),
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
            });
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
            bytes: Bytes::from(buf),
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
            self.ctx.parts.give(buf);
        }
    }

    /// Ends streaming without keeping anything: stops the part uploads and aborts the upload.
    async fn abandon_stream(&mut self) {
        self.sequential = false;
        self.recycle_filling();
        if let Some(stream) = self.stream.take() {
            stream.stop_retrying.send_replace(true);
            for p in stream.running {
                let _ = p.await;
            }
            let _ = self
                .ctx
                .store
                .abort_multipart_upload(&self.ctx.bucket, &self.key, &stream.upload_id)
                .await;
        }
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
            let etag = self.finish_stream(&metadata, None).await?;
            self.base = Some(Base {
                etag,
                size: self.size,
            });
            self.present.clear();
            self.written.clear();
            // From here the file is a staging file over that object, whatever happens next.
            self.sequential = false;
            let size = self.size;
            self.file()?.set_len(size)?;
        } else {
            self.reserve_to(self.size).await;
            let size = self.size;
            let file = self.local.get(&self.ctx.bucket, &self.key, size)?;
            if let Some((buf, _)) = &self.filling {
                file.write_all_at(buf, 0)?;
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
    pub async fn upload(
        &mut self,
        metadata: &UserMetadata,
        content_type: Option<String>,
    ) -> FsResult<ETag> {
        let result = if !self.sequential {
            self.put_all(metadata, content_type).await
        } else if self.stream.is_some() {
            self.finish_stream(metadata, content_type).await
        } else {
            self.put_filling(metadata, content_type).await
        };
        match result {
            Ok(etag) => {
                self.base = Some(Base {
                    etag: etag.clone(),
                    size: self.size,
                });
                // `present` stays as it is: parts copied server-side were never downloaded,
                // and the new object holds the same bytes there to fetch when read.
                self.written.clear();
                self.content_dirty = false;
                self.meta_dirty = false;
                // An empty file may stream again: many programs open a file, dup the
                // descriptor and close the first one (a flush) before writing.
                self.sequential = self.size == 0;
                self.ctx.disk.set_dirty_delta(-(self.dirty_counted as i64));
                self.dirty_counted = 0;
                Ok(etag)
            }
            Err(e) => {
                metrics::counter!("s3vol_upload_failures_total").increment(1);
                let kept = match &self.stream {
                    Some(s) => format!("in memory and in multipart upload {}", s.upload_id.0),
                    None => format!("in the staging file {}", self.local.path.display()),
                };
                tracing::error!(
                    key = %self.key,
                    kept = %kept,
                    staging_file = %self.local.path.display(),
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

    /// Uploads a file that never filled a part from its buffer. On failure the bytes go to the
    /// staging file, where the next flush finds them.
    async fn put_filling(
        &mut self,
        metadata: &UserMetadata,
        content_type: Option<String>,
    ) -> FsResult<ETag> {
        let (bytes, permit) = match self.filling.take() {
            Some((buf, permit)) => (Bytes::from(buf), Some(permit)),
            None => (Bytes::new(), None),
        };
        let options = PutOptions {
            metadata: metadata.clone(),
            content_type,
            if_none_match_any: false,
        };
        let put = self
            .ctx
            .store
            .put_object(&self.ctx.bucket, &self.key, bytes.clone(), &options)
            .await;
        match put {
            Ok(r) => {
                self.ctx.parts.give_bytes(bytes);
                Ok(r.etag)
            }
            Err(e) => {
                if let Some(permit) = permit {
                    self.filling = Some((Vec::from(bytes), permit));
                }
                if let Err(local) = self.spill("upload failed").await {
                    tracing::error!(key = %self.key, error = %local, "cannot write the staging file; the data stays in memory");
                }
                Err(e.into())
            }
        }
    }

    async fn put_all(
        &mut self,
        metadata: &UserMetadata,
        content_type: Option<String>,
    ) -> FsResult<ETag> {
        if self.size <= self.ctx.stream_part_size() {
            self.put_whole(metadata, content_type).await
        } else {
            self.put_multipart(metadata, content_type).await
        }
    }

    /// Completes the stream's upload with the part being filled as its last part. On failure
    /// the stream stays as it is (failed parts keep their bytes) for the next try.
    async fn finish_stream(
        &mut self,
        metadata: &UserMetadata,
        content_type: Option<String>,
    ) -> FsResult<ETag> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(err!(libc::EIO, "no upload to finish"));
        };
        // Running uploads report now instead of retrying further; failed ones get one more try.
        stream.stop_retrying.send_replace(true);
        let mut first_err = None;
        for p in std::mem::take(&mut stream.running) {
            if let Err(e) = stream.record(p.await) {
                first_err = first_err.or(Some(e));
            }
        }
        stream.stop_retrying.send_replace(false);
        let mut still_failed = Vec::new();
        for part in std::mem::take(&mut stream.failed) {
            match self
                .ctx
                .store
                .upload_part(
                    &self.ctx.bucket,
                    &self.key,
                    &stream.upload_id,
                    part.number,
                    part.bytes.clone(),
                )
                .await
            {
                Ok(done) => stream.done.push(done),
                Err(e) => {
                    first_err = first_err.or(Some(e.into()));
                    still_failed.push(part);
                }
            }
        }
        stream.failed = still_failed;
        if let Some(e) = first_err {
            return Err(e);
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
            let bytes = Bytes::from(buf);
            let sent = self
                .ctx
                .store
                .upload_part(
                    &self.ctx.bucket,
                    &self.key,
                    &stream.upload_id,
                    number,
                    bytes.clone(),
                )
                .await;
            match sent {
                Ok(done) => {
                    parts.push(done);
                    tail = Some((bytes, permit));
                }
                Err(e) => {
                    self.filling = Some((Vec::from(bytes), permit));
                    return Err(e.into());
                }
            }
        }
        parts.sort_by_key(|p| p.part_number);
        let completed = self
            .ctx
            .store
            .complete_multipart_upload(&self.ctx.bucket, &self.key, &stream.upload_id, &parts)
            .await;
        let etag = match completed {
            Ok(r) => {
                if let Some((bytes, _permit)) = tail {
                    self.ctx.parts.give_bytes(bytes);
                }
                r.etag
            }
            Err(e) => {
                if let Some((bytes, permit)) = tail {
                    self.filling = Some((Vec::from(bytes), permit));
                }
                return Err(e.into());
            }
        };
        let created_with = stream.metadata.clone();
        self.stream = None;
        if !same_but_times(&created_with, metadata) || content_type.is_some() {
            // The upload was created before the final attributes were known. The copy makes a
            // new version; on AWS it has a new ETag, which is the one to remember.
            if let Some(copied) = self.replace_metadata(metadata, content_type).await? {
                return Ok(copied);
            }
        }
        Ok(etag)
    }

    async fn replace_metadata(
        &self,
        metadata: &UserMetadata,
        content_type: Option<String>,
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
        let copied = self
            .ctx
            .store
            .copy_object(
                &self.ctx.bucket,
                &self.key,
                &source,
                &MetadataDirective::Replace {
                    metadata: metadata.clone(),
                    content_type,
                },
            )
            .await?;
        Ok(Some(copied.etag))
    }

    async fn put_whole(
        &mut self,
        metadata: &UserMetadata,
        content_type: Option<String>,
    ) -> FsResult<ETag> {
        self.fill(0, self.size).await?;
        let _permit = self.ctx.memory.acquire(self.size).await;
        let mut buf = vec![0u8; self.size as usize];
        self.file()?.read_exact_at(&mut buf, 0)?;
        let options = PutOptions {
            metadata: metadata.clone(),
            content_type,
            if_none_match_any: false,
        };
        Ok(self
            .ctx
            .store
            .put_object(&self.ctx.bucket, &self.key, Bytes::from(buf), &options)
            .await?
            .etag)
    }

    async fn put_multipart(
        &mut self,
        metadata: &UserMetadata,
        content_type: Option<String>,
    ) -> FsResult<ETag> {
        let part = self.part_size_for(self.size);
        let options = PutOptions {
            metadata: metadata.clone(),
            content_type,
            if_none_match_any: false,
        };
        let id = self
            .ctx
            .store
            .create_multipart_upload(&self.ctx.bucket, &self.key, &options)
            .await?;
        let result = self.send_parts(&id, part).await;
        let result = match result {
            Ok(parts) => self
                .ctx
                .store
                .complete_multipart_upload(&self.ctx.bucket, &self.key, &id, &parts)
                .await
                .map(|r| r.etag)
                .map_err(FsError::from),
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = self
                .ctx
                .store
                .abort_multipart_upload(&self.ctx.bucket, &self.key, &id)
                .await;
        }
        result
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

    /// Throws the local data away (the file was unlinked). Waits for stream parts and aborts
    /// the upload so nothing appears in the bucket.
    pub async fn discard(&mut self) {
        self.abandon_stream().await;
        self.content_dirty = false;
        self.meta_dirty = false;
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
    /// staging file, which is then fsynced with its `.key` companion. Returns where the bytes
    /// are, for the log.
    pub async fn keep_for_exit(&mut self) -> FsResult<String> {
        if !self.content_dirty {
            return Ok("only attribute changes were not uploaded; the content is in S3".into());
        }
        let target = format!("s3://{}/{}", self.ctx.bucket, self.key);
        let mut in_upload = None;
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
        let path = self.local.path.clone();
        match &self.local.file {
            Some(f) => f.sync_all()?,
            None => {
                return Err(err!(libc::EIO, "{target}: no staging file holds its data"));
            }
        }
        File::open(path.with_extension("key"))?.sync_all()?;
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
            "{target} ({} bytes) is in the staging file {} (fsynced, with {}): {whole}",
            self.size,
            path.display(),
            path.with_extension("key").display(),
        ))
    }

    /// Writes what a stream still holds in memory (the part being filled, failed parts) to the
    /// staging file, for recovery by hand when the process is going away.
    fn keep_stream_bytes(&mut self) -> FsResult<()> {
        let part = self.ctx.stream_part_size();
        let size = self.size;
        let sent = self.stream.as_ref().map_or(0, |s| s.sent);
        let file = self.local.get(&self.ctx.bucket, &self.key, size)?;
        if let Some((buf, _)) = &self.filling {
            file.write_all_at(buf, sent)?;
        }
        if let Some(stream) = &self.stream {
            for p in &stream.failed {
                file.write_all_at(&p.bytes, (p.number as u64 - 1) * part)?;
            }
        }
        Ok(())
    }
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
            let mut kept = String::from("the staging file is kept for recovery");
            if self.sequential {
                if let Some(stream) = &self.stream {
                    kept = format!(
                        "what was still in memory is in the staging file; the rest is in the unfinished multipart upload {}",
                        stream.upload_id.0
                    );
                }
                if let Err(e) = self.keep_stream_bytes() {
                    kept = format!("the bytes still in memory are lost: {e}");
                }
            }
            tracing::error!(
                key = %self.key,
                staging_file = %self.local.path.display(),
                "dropping a file with data not in S3; {kept}"
            );
            return;
        }
        self.ctx.disk.set_dirty_delta(-(self.dirty_counted as i64));
        if self.local.file.is_some() {
            let _ = std::fs::remove_file(&self.local.path);
            let _ = std::fs::remove_file(self.local.path.with_extension("key"));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use s3vol_s3::{Fault, FaultStore, MemStore, Op, S3Error};
    use std::time::Duration;

    const MIB: usize = 1 << 20;

    async fn ctx_over(store: Arc<FaultStore>, dir: &std::path::Path) -> Arc<StageCtx> {
        let bucket = BucketName::new("bkt").unwrap();
        store.create_bucket(&bucket).await.unwrap();
        Arc::new(StageCtx {
            store,
            bucket,
            dir: dir.to_owned(),
            part_size: 5 << 20,
            memory: Arc::new(Memory::new(64 << 20)),
            disk: Arc::new(Disk::new(1 << 30)),
            parts: Arc::new(BufPool::new(5 << 20, 2)),
        })
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i / 1000) as u8 ^ seed).collect()
    }

    async fn object(ctx: &StageCtx, key: &str) -> (Vec<u8>, UserMetadata) {
        let got = ctx
            .store
            .get_object(&ctx.bucket, key, None, None)
            .await
            .unwrap();
        let body: Vec<Bytes> = got.body.try_collect().await.unwrap();
        let info = ctx.store.head_object(&ctx.bucket, key).await.unwrap();
        (body.concat(), info.metadata)
    }

    fn meta(mode: &str, mtime: &str) -> UserMetadata {
        UserMetadata::from([
            ("mode".to_owned(), mode.to_owned()),
            ("mtime".to_owned(), mtime.to_owned()),
        ])
    }

    #[tokio::test]
    async fn a_streamed_file_arrives_whole_without_a_metadata_copy_when_only_times_changed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
        let ctx = ctx_over(store.clone(), dir.path()).await;
        let mut st = Staged::new_empty(ctx.clone(), "f").unwrap();
        let content = data(12 * MIB + 777, 1);
        for chunk in content.chunks(MIB) {
            let at = st.size();
            st.write(at, chunk, || meta("33188", "1")).await.unwrap();
        }
        assert!(st.stream.is_some(), "parts went up while writing");
        // A copy would fail: the upload must not need one.
        store.add(Fault::FailOp {
            op: Op::Copy,
            error: S3Error::Transient("injected".into()),
            times: None,
        });
        st.upload(&meta("33188", "2"), None).await.unwrap();
        let (body, stored) = object(&ctx, "f").await;
        assert!(body == content, "the object holds what was written");
        assert_eq!(stored["mode"], "33188");
        assert_eq!(stored["mtime"], "1", "the time the upload began");
    }

    #[tokio::test]
    async fn a_streamed_file_whose_mode_changed_gets_its_metadata_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
        let ctx = ctx_over(store, dir.path()).await;
        let mut st = Staged::new_empty(ctx.clone(), "f").unwrap();
        let content = data(6 * MIB, 2);
        st.write(0, &content, || meta("33188", "1")).await.unwrap();
        st.upload(&meta("33261", "1"), None).await.unwrap();
        let (body, stored) = object(&ctx, "f").await;
        assert!(body == content);
        assert_eq!(stored["mode"], "33261");
    }

    #[tokio::test]
    async fn extending_or_seeking_while_streaming_keeps_every_byte_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
        let ctx = ctx_over(store, dir.path()).await;
        let mut st = Staged::new_empty(ctx.clone(), "f").unwrap();
        let mut expect = data(7 * MIB, 3);
        st.write(0, &expect, || meta("33188", "1")).await.unwrap();
        // ftruncate up: zeros, then appending after them.
        st.truncate(8 * MIB as u64).await.unwrap();
        expect.resize(8 * MIB, 0);
        let tail = data(3 * MIB, 4);
        st.write(8 * MIB as u64, &tail, || meta("33188", "1"))
            .await
            .unwrap();
        expect.extend_from_slice(&tail);
        // And a rewrite near the start.
        st.write(10, b"header", || meta("33188", "1"))
            .await
            .unwrap();
        expect[10..16].copy_from_slice(b"header");
        st.upload(&meta("33188", "1"), None).await.unwrap();
        assert!(object(&ctx, "f").await.0 == expect);
        // The local copy reads the same.
        let local = st.read(0, expect.len() as u64).await.unwrap();
        assert!(local == expect);
    }

    #[tokio::test]
    async fn small_files_hold_memory_for_their_size_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
        let bucket = BucketName::new("bkt").unwrap();
        store.create_bucket(&bucket).await.unwrap();
        let memory = Arc::new(Memory::new(16 << 20));
        let ctx = Arc::new(StageCtx {
            store,
            bucket,
            dir: dir.path().to_owned(),
            part_size: 5 << 20,
            memory: memory.clone(),
            disk: Arc::new(Disk::new(1 << 30)),
            parts: Arc::new(BufPool::new(5 << 20, 2)),
        });
        // Far more small files than 16 MiB holds parts, all kept (as parked clean copies are).
        let mut kept = Vec::new();
        for i in 0..40 {
            let mut st = Staged::new_empty(ctx.clone(), &format!("f{i}")).unwrap();
            let body = data(4096, i as u8);
            let written = tokio::time::timeout(Duration::from_secs(10), async {
                st.write(0, &body, || meta("33188", "1")).await.unwrap();
                st.upload(&meta("33188", "1"), None).await.unwrap();
            })
            .await;
            assert!(written.is_ok(), "file {i} waited for memory no file holds");
            assert!(object(&ctx, &format!("f{i}")).await.0 == body);
            kept.push(st);
        }
        assert_eq!(memory.used(), 0, "uploaded files hold no memory");
    }

    fn files_in(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |d| d.count())
    }

    async fn write_all(st: &mut Staged, content: &[u8]) {
        for chunk in content.chunks(MIB) {
            let at = st.size();
            st.write(at, chunk, || meta("33188", "1")).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_streamed_file_never_touches_the_disk_and_gives_its_memory_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
        let ctx = ctx_over(store, dir.path()).await;
        for (name, len) in [("big", 12 * MIB + 5), ("small", 3000), ("empty", 0)] {
            let mut st = Staged::new_empty(ctx.clone(), name).unwrap();
            let content = data(len, 7);
            write_all(&mut st, &content).await;
            assert_eq!(files_in(dir.path()), 0, "{name}: nothing staged on disk");
            st.upload(&meta("33188", "1"), None).await.unwrap();
            assert!(object(&ctx, name).await.0 == content, "{name}");
            assert!(!st.has_local_bytes(), "{name}: no clean copy worth keeping");
            drop(st);
        }
        assert_eq!(ctx.memory.used(), 0);
        assert_eq!(files_in(dir.path()), 0);
    }

    #[tokio::test]
    async fn a_part_that_fails_for_a_while_is_retried_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
        let ctx = ctx_over(store.clone(), dir.path()).await;
        store.add(Fault::FailOp {
            op: Op::UploadPart,
            error: S3Error::Transient("injected".into()),
            times: Some(3),
        });
        let mut st = Staged::new_empty(ctx.clone(), "f").unwrap();
        let content = data(11 * MIB, 8);
        write_all(&mut st, &content).await;
        // Give the background retries (0.5 s, 1 s, ...) time to get the parts in.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while st
            .stream
            .as_ref()
            .is_some_and(|s| s.running.iter().any(|p| !p.is_finished()))
        {
            assert!(std::time::Instant::now() < deadline, "parts never went in");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        st.upload(&meta("33188", "1"), None).await.unwrap();
        assert!(object(&ctx, "f").await.0 == content);
        assert_eq!(files_in(dir.path()), 0, "no fallback to a staging file");
    }

    #[tokio::test]
    async fn a_failed_stream_keeps_every_byte_until_a_later_flush_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
        let ctx = ctx_over(store.clone(), dir.path()).await;
        let mut st = Staged::new_empty(ctx.clone(), "f").unwrap();
        let content = data(13 * MIB, 9);
        write_all(&mut st, &content[..6 * MIB]).await;
        store.add(Fault::FailOp {
            op: Op::UploadPart,
            error: S3Error::Transient("down".into()),
            times: None,
        });
        write_all(&mut st, &content[6 * MIB..]).await;
        let e = st.upload(&meta("33188", "1"), None).await.unwrap_err();
        assert_eq!(e.errno, libc::EIO, "{e:?}");
        assert!(st.content_dirty());
        assert!(
            ctx.store.head_object(&ctx.bucket, "f").await.is_err(),
            "nothing half-written in the bucket"
        );
        // Still failing: the second flush fails the same way and loses nothing.
        assert!(st.upload(&meta("33188", "1"), None).await.is_err());
        store.clear();
        st.upload(&meta("33188", "1"), None).await.unwrap();
        assert!(object(&ctx, "f").await.0 == content);
        drop(st);
        assert_eq!(ctx.memory.used(), 0, "failed parts gave their memory back");
    }

    #[tokio::test]
    async fn reading_back_streamed_bytes_completes_the_upload_so_far_and_goes_on_locally() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
        let ctx = ctx_over(store, dir.path()).await;
        let mut st = Staged::new_empty(ctx.clone(), "f").unwrap();
        let mut expect = data(7 * MIB, 10);
        write_all(&mut st, &expect).await;
        // Bytes of the part being filled come from memory, the stream goes on.
        let tail = st.read(6 * MIB as u64, 100).await.unwrap();
        assert!(tail[..] == expect[6 * MIB..6 * MIB + 100]);
        assert!(st.sequential);
        // Bytes already sent: the upload so far becomes an object to read them from.
        let head = st.read(100, 1000).await.unwrap();
        assert!(head[..] == expect[100..1100]);
        assert!(!st.sequential && st.stream.is_none());
        assert!(object(&ctx, "f").await.0 == expect, "the object so far");
        let more = data(2 * MIB, 11);
        write_all(&mut st, &more).await;
        expect.extend_from_slice(&more);
        st.upload(&meta("33188", "2"), None).await.unwrap();
        assert!(object(&ctx, "f").await.0 == expect);
    }

    #[tokio::test]
    async fn a_small_file_whose_upload_fails_is_kept_in_its_staging_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
        let ctx = ctx_over(store.clone(), dir.path()).await;
        let mut st = Staged::new_empty(ctx.clone(), "f").unwrap();
        let content = data(300_000, 12);
        write_all(&mut st, &content).await;
        store.add(Fault::FailOp {
            op: Op::Put,
            error: S3Error::Transient("down".into()),
            times: Some(1),
        });
        assert!(st.upload(&meta("33188", "1"), None).await.is_err());
        assert!(std::fs::read(st.path()).unwrap() == content);
        st.upload(&meta("33188", "1"), None).await.unwrap();
        assert!(object(&ctx, "f").await.0 == content);
    }

    #[tokio::test]
    async fn dropping_an_unfinished_stream_writes_what_memory_held_to_the_staging_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
        let ctx = ctx_over(store.clone(), dir.path()).await;
        let mut st = Staged::new_empty(ctx.clone(), "f").unwrap();
        let content = data(12 * MIB, 13);
        store.add(Fault::FailOp {
            op: Op::UploadPart,
            error: S3Error::Transient("down".into()),
            times: None,
        });
        write_all(&mut st, &content).await;
        assert!(st.upload(&meta("33188", "1"), None).await.is_err());
        let path = st.path().to_owned();
        drop(st);
        let kept = std::fs::read(&path).unwrap();
        assert_eq!(kept.len(), content.len());
        assert!(
            kept == content,
            "failed parts and the last part are on disk"
        );
        let key = std::fs::read_to_string(path.with_extension("key")).unwrap();
        assert_eq!(key.trim(), "s3://bkt/f");
    }

    #[tokio::test]
    async fn a_stream_whose_completion_failed_can_grow_and_complete_later() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
        let ctx = ctx_over(store.clone(), dir.path()).await;
        let mut st = Staged::new_empty(ctx.clone(), "f").unwrap();
        let content = data(13 * MIB, 14);
        write_all(&mut st, &content[..7 * MIB]).await;
        store.add(Fault::FailOp {
            op: Op::CompleteMultipart,
            error: S3Error::Transient("down".into()),
            times: Some(1),
        });
        assert!(st.upload(&meta("33188", "1"), None).await.is_err());
        // fsync failed; the application writes on, then closes.
        write_all(&mut st, &content[7 * MIB..]).await;
        assert!(st.sequential, "still streaming");
        st.upload(&meta("33188", "1"), None).await.unwrap();
        assert!(object(&ctx, "f").await.0 == content);
    }
}
