//! Staging files: the local copy of a file being written.
//!
//! Every write goes to a sparse file in the cache directory; reads of a staged file are served
//! from it. The object the file started from (its *base*) fills the ranges not yet present on
//! demand, with `If-Match` so a concurrent change of the object is an error and never a mix of
//! versions. Unchanged parts of a large base are copied server-side on upload
//! (UploadPartCopy) instead of being downloaded and sent back.
//!
//! A file written sequentially from empty streams: besides going to the staging file, its
//! writes fill a part buffer in memory, and each full part is uploaded as a part of a
//! multipart upload while the application keeps writing, with the part buffers counted in
//! the memory budget (and recycled, see [`BufPool`]). A write anywhere else stops the
//! streaming; the upload then happens at flush, as for any other staged file.
//!
//! The multipart upload is created with the file's attributes as they are when its first part
//! is full. At the end, the object's metadata is rewritten (a server-side copy of the whole
//! object) only when something other than the times changed meanwhile: a streamed file's
//! stored `mtime` is the time its upload began, which saves copying every large file once
//! more on close (see docs/SEMANTICS.md).
//!
//! Invariants: the file's length is the file's size; `base.size <= size`; bytes in
//! `[base.size, size)` that were never written are zeros (the file is sparse there); bytes in
//! `[0, base.size)` are valid locally where `present` says so, else they are the base's.
//!
//! Nothing here deletes data that is not durable: a failed upload leaves the staging file and
//! its `.key` companion (naming the object) in the cache directory, and the error goes back to
//! the caller (close or fsync gets EIO).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use s3vol_s3::{
    BucketName, CompletedPart, CopySource, ETag, MetadataDirective, ObjectStore, PutOptions,
    UploadId, UserMetadata,
};
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

/// The object a staged file started from.
#[derive(Clone, Debug)]
pub struct Base {
    pub etag: ETag,
    pub size: u64,
}

#[derive(Debug)]
struct Stream {
    upload_id: UploadId,
    /// Metadata the upload was created with.
    metadata: UserMetadata,
    /// Bytes handed to part uploads so far.
    sent: u64,
    parts: Vec<JoinHandle<FsResult<CompletedPart>>>,
}

/// A file being written, or read while written.
#[derive(Debug)]
pub struct Staged {
    ctx: Arc<StageCtx>,
    key: String,
    path: PathBuf,
    file: File,
    size: u64,
    base: Option<Base>,
    present: RangeSet,
    written: RangeSet,
    content_dirty: bool,
    /// Attributes changed since the last upload.
    pub meta_dirty: bool,
    stream: Option<Stream>,
    /// Streaming is possible while every write so far appended at the end of a file that
    /// started empty.
    sequential: bool,
    /// The part being filled by a sequential writer: the bytes `[stream.sent, size)`, with
    /// the memory they take (counted as they arrive, so a small file holds only its size).
    filling: Option<(Vec<u8>, MemoryPermit)>,
    /// Bytes counted in the disk budget.
    reserved: u64,
    /// Bytes counted as dirty.
    dirty_counted: u64,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl Staged {
    fn create(ctx: Arc<StageCtx>, key: &str, base: Option<Base>) -> FsResult<Self> {
        std::fs::create_dir_all(&ctx.dir)?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = ctx.dir.join(format!("{}-{n}.data", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let size = base.as_ref().map_or(0, |b| b.size);
        file.set_len(size)?;
        let mut key_file = File::create(path.with_extension("key"))?;
        writeln!(key_file, "s3://{}/{key}", ctx.bucket)?;
        Ok(Self {
            sequential: base.is_none(),
            ctx,
            key: key.to_owned(),
            path,
            file,
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
        })
    }

    /// A new, empty file (create, or open with O_TRUNC): dirty from the start.
    pub fn new_empty(ctx: Arc<StageCtx>, key: &str) -> FsResult<Self> {
        let mut s = Self::create(ctx, key, None)?;
        s.content_dirty = true;
        Ok(s)
    }

    /// The existing object `key`, fetched lazily.
    pub fn from_object(ctx: Arc<StageCtx>, key: &str, base: Base) -> FsResult<Self> {
        Self::create(ctx, key, Some(base))
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

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// After a rename: uploads go to `key`, and the `.key` companion names it for recovery.
    pub fn set_key(&mut self, key: &str) {
        self.key = key.to_owned();
        let companion = self.path.with_extension("key");
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
            let mut pos = gap.start;
            let mut body = got.body;
            while let Some(chunk) = body.try_next().await? {
                // Written ranges are newer than the base: never overwrite them.
                let chunk_range = pos..pos + chunk.len() as u64;
                for hole in self.written.missing(chunk_range.clone()) {
                    let from = (hole.start - pos) as usize;
                    let to = (hole.end - pos) as usize;
                    self.file.write_all_at(&chunk[from..to], hole.start)?;
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
        self.fill(offset, end).await?;
        let mut buf = vec![0u8; (end - offset) as usize];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    }

    /// Writes `data` at `offset`. `metadata` gives the file's attributes as they are now; it is
    /// called only when a streamed upload starts.
    pub async fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        metadata: impl FnOnce() -> UserMetadata + Send,
    ) -> FsResult<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        if offset != self.size {
            self.break_stream().await;
        }
        self.reserve_to(end.max(self.size)).await;
        self.file.write_all_at(data, offset)?;
        self.size = self.size.max(end);
        self.written.insert(offset..end);
        self.present.insert(offset..end);
        self.mark_content_dirty();
        if self.sequential
            && let Err(e) = self.stream_bytes(data, metadata).await
        {
            // The bytes are in the staging file: they go up whole at flush, where a failure is
            // reported. A write never fails because S3 is away.
            tracing::warn!(key = %self.key, error = %e, "streaming upload failed; the file will be uploaded at flush");
            self.break_stream().await;
        }
        Ok(())
    }

    pub async fn truncate(&mut self, len: u64) -> FsResult<()> {
        if len == self.size {
            return Ok(());
        }
        // Streaming continues only from empty: the part being filled holds the bytes written
        // since the last part, not the zeros of an extension.
        self.break_stream().await;
        if len < self.size {
            if len == 0 {
                // Nothing of the old content remains: streaming works again.
                self.base = None;
                self.sequential = true;
            }
        } else {
            self.reserve_to(len).await;
        }
        self.file.set_len(len)?;
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

    /// Adds the bytes just appended to the part being filled, and starts the upload of each
    /// part that is full.
    async fn stream_bytes(
        &mut self,
        mut data: &[u8],
        metadata: impl FnOnce() -> UserMetadata + Send,
    ) -> FsResult<()> {
        let part = self.ctx.stream_part_size();
        let mut metadata = Some(metadata);
        while !data.is_empty() {
            let sent = self.stream.as_ref().map_or(0, |s| s.sent);
            if sent / part >= MAX_PARTS - 1 {
                // The last part is sent from the staging file at flush, however long.
                self.recycle_filling();
                return Ok(());
            }
            let held = self.filling.as_ref().map_or(0, |(b, _)| b.len());
            let n = (part as usize - held).min(data.len());
            // Memory for the bytes about to be added, in whole KiB beyond what is held.
            let needed_kib = (held + n).div_ceil(1024) as u64;
            let held_kib = self.filling.as_ref().map_or(0, |(_, p)| p.kib());
            let more = if needed_kib > held_kib {
                Some(
                    self.ctx
                        .memory
                        .acquire((needed_kib - held_kib) * 1024)
                        .await,
                )
            } else {
                None
            };
            if let Some(more) = more {
                match &mut self.filling {
                    Some((_, permit)) => permit.merge(more),
                    None => self.filling = Some((self.ctx.parts.take(), more)),
                }
            }
            let Some((buf, _)) = &mut self.filling else {
                // Not reached: the first byte of a part takes memory, which makes the buffer.
                return Ok(());
            };
            buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if buf.len() as u64 == part {
                self.send_filled(&mut metadata).await?;
            }
        }
        Ok(())
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
                parts: Vec::new(),
            });
        }
        let (Some(stream), Some((buf, permit))) = (self.stream.as_mut(), self.filling.take())
        else {
            return Ok(());
        };
        let number = (stream.sent / self.ctx.stream_part_size()) as i32 + 1;
        stream.sent += buf.len() as u64;
        let ctx = self.ctx.clone();
        let key = self.key.clone();
        let id = stream.upload_id.clone();
        stream.parts.push(tokio::spawn(async move {
            let body = Bytes::from(buf);
            let r = ctx
                .store
                .upload_part(&ctx.bucket, &key, &id, number, body.clone())
                .await;
            ctx.parts.give_bytes(body);
            drop(permit);
            Ok(r?)
        }));
        Ok(())
    }

    fn recycle_filling(&mut self) {
        if let Some((buf, _permit)) = self.filling.take() {
            self.ctx.parts.give(buf);
        }
    }

    /// Stops streaming: the parts sent so far are thrown away and the file is uploaded whole at
    /// flush.
    async fn break_stream(&mut self) {
        self.sequential = false;
        self.recycle_filling();
        if let Some(stream) = self.stream.take() {
            for p in stream.parts {
                let _ = p.await;
            }
            let _ = self
                .ctx
                .store
                .abort_multipart_upload(&self.ctx.bucket, &self.key, &stream.upload_id)
                .await;
        }
    }

    /// Makes the file durable in S3 as `key` with `metadata`, and returns the new ETag. On
    /// failure the local data is untouched and the next call tries again.
    pub async fn upload(
        &mut self,
        metadata: &UserMetadata,
        content_type: Option<String>,
    ) -> FsResult<ETag> {
        let streamed = match self.stream.take() {
            Some(stream) => Some(
                self.finish_stream(stream, metadata, content_type.clone())
                    .await,
            ),
            None => None,
        };
        let result = match streamed {
            Some(Ok(etag)) => Ok(etag),
            Some(Err(e)) => {
                // A part failed earlier, or completing did: the staging file holds the whole
                // file (a stream starts only from empty), so send it again now.
                tracing::warn!(key = %self.key, error = %e, "streamed upload failed; uploading the file whole");
                self.put_all(metadata, content_type.clone()).await
            }
            None => {
                // Never a full part: the staging file has it all.
                self.recycle_filling();
                self.put_all(metadata, content_type.clone()).await
            }
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
                self.sequential = false;
                self.ctx.disk.set_dirty_delta(-(self.dirty_counted as i64));
                self.dirty_counted = 0;
                Ok(etag)
            }
            Err(e) => {
                self.sequential = false;
                metrics::counter!("s3vol_upload_failures_total").increment(1);
                tracing::error!(
                    key = %self.key,
                    staging_file = %self.path.display(),
                    error = %e,
                    "upload failed; the data stays in the staging file and is retried on the next flush"
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

    async fn finish_stream(
        &mut self,
        mut stream: Stream,
        metadata: &UserMetadata,
        content_type: Option<String>,
    ) -> FsResult<ETag> {
        let part = self.ctx.stream_part_size();
        let mut parts = Vec::new();
        let mut first_err = None;
        for p in stream.parts.drain(..) {
            match p.await {
                Ok(Ok(cp)) => parts.push(cp),
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(e) => first_err = first_err.or(Some(err!(libc::EIO, "part upload task: {e}"))),
            }
        }
        let abort = |e: FsError| async {
            let _ = self
                .ctx
                .store
                .abort_multipart_upload(&self.ctx.bucket, &self.key, &stream.upload_id)
                .await;
            Err::<ETag, _>(e)
        };
        if let Some(e) = first_err {
            return abort(e).await;
        }
        if self.size > stream.sent {
            let len = self.size - stream.sent;
            let (buf, _permit) = match self.filling.take() {
                Some((buf, permit)) if buf.len() as u64 == len => (buf, permit),
                other => {
                    drop(other);
                    let permit = self.ctx.memory.acquire(len).await;
                    let mut buf = vec![0u8; len as usize];
                    if let Err(e) = self.file.read_exact_at(&mut buf, stream.sent) {
                        return abort(e.into()).await;
                    }
                    (buf, permit)
                }
            };
            let number = (stream.sent / part) as i32 + 1;
            match self
                .ctx
                .store
                .upload_part(
                    &self.ctx.bucket,
                    &self.key,
                    &stream.upload_id,
                    number,
                    Bytes::from(buf),
                )
                .await
            {
                Ok(cp) => parts.push(cp),
                Err(e) => return abort(e.into()).await,
            }
        }
        let etag = match self
            .ctx
            .store
            .complete_multipart_upload(&self.ctx.bucket, &self.key, &stream.upload_id, &parts)
            .await
        {
            Ok(r) => r.etag,
            Err(e) => return abort(e.into()).await,
        };
        if !same_but_times(&stream.metadata, metadata) || content_type.is_some() {
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
        self.file.read_exact_at(&mut buf, 0)?;
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
        let file = &self.file;
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
        self.break_stream().await;
        self.content_dirty = false;
        self.meta_dirty = false;
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
            tracing::error!(
                key = %self.key,
                staging_file = %self.path.display(),
                "dropping a file with data not in S3; the staging file is kept for recovery"
            );
            return;
        }
        self.ctx.disk.set_dirty_delta(-(self.dirty_counted as i64));
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(self.path.with_extension("key"));
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
}
