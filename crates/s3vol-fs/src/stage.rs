//! Staging files: the local copy of a file being written.
//!
//! Every write goes to a sparse file in the cache directory; reads of a staged file are served
//! from it. The object the file started from (its *base*) fills the ranges not yet present on
//! demand, with `If-Match` so a concurrent change of the object is an error and never a mix of
//! versions. Unchanged parts of a large base are copied server-side on upload
//! (UploadPartCopy) instead of being downloaded and sent back.
//!
//! A file written sequentially from empty streams: each time a full part has been written, it
//! is read back (from the page cache) and uploaded as a part of a multipart upload while the
//! application keeps writing, with the part buffers counted in the memory budget. A write
//! anywhere else stops the streaming; the upload then happens at flush, as for any other
//! staged file.
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

use crate::budget::{Disk, Memory};
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
}

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

    pub async fn write(&mut self, offset: u64, data: &[u8]) -> FsResult<()> {
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
            && let Err(e) = self.stream_parts().await
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
        if len < self.size {
            self.break_stream().await;
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
        let min = self.ctx.part_size.max(5 << 20);
        let needed = size.div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
        min.max(needed)
    }

    /// Starts uploads of the full parts written so far.
    async fn stream_parts(&mut self) -> FsResult<()> {
        let part = self.ctx.part_size.max(5 << 20);
        loop {
            let sent = self.stream.as_ref().map_or(0, |s| s.sent);
            if self.size < sent + part || sent / part >= MAX_PARTS - 1 {
                return Ok(());
            }
            if self.stream.is_none() {
                let upload_id = self
                    .ctx
                    .store
                    .create_multipart_upload(&self.ctx.bucket, &self.key, &PutOptions::default())
                    .await?;
                self.stream = Some(Stream {
                    upload_id,
                    metadata: UserMetadata::new(),
                    sent: 0,
                    parts: Vec::new(),
                });
            }
            let Some(stream) = self.stream.as_mut() else {
                return Ok(());
            };
            let permit = self.ctx.memory.acquire(part).await;
            let mut buf = vec![0u8; part as usize];
            self.file.read_exact_at(&mut buf, stream.sent)?;
            let number = (stream.sent / part) as i32 + 1;
            stream.sent += part;
            let ctx = self.ctx.clone();
            let key = self.key.clone();
            let id = stream.upload_id.clone();
            stream.parts.push(tokio::spawn(async move {
                let r = ctx
                    .store
                    .upload_part(&ctx.bucket, &key, &id, number, Bytes::from(buf))
                    .await;
                drop(permit);
                Ok(r?)
            }));
        }
    }

    /// Stops streaming: the parts sent so far are thrown away and the file is uploaded whole at
    /// flush.
    async fn break_stream(&mut self) {
        self.sequential = false;
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
            None => self.put_all(metadata, content_type.clone()).await,
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
        if self.size <= self.ctx.part_size.max(5 << 20) {
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
        let part = self.ctx.part_size.max(5 << 20);
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
            let _permit = self.ctx.memory.acquire(len).await;
            let mut buf = vec![0u8; len as usize];
            if let Err(e) = self.file.read_exact_at(&mut buf, stream.sent) {
                return abort(e.into()).await;
            }
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
        if stream.metadata != *metadata || content_type.is_some() {
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
