//! Reading clean (not locally modified) files: sequential prefetch and exact random reads.
//!
//! A handle that reads sequentially gets a window of ranged GETs in flight ahead of it; the
//! window starts at one MiB and doubles with sustained sequential reading up to a cap, and
//! every prefetched part holds its size in the memory budget until it has been read past, so
//! many readers together stay under `--memory-limit` (a part that does not fit is simply not
//! prefetched yet; the part being read waits for room). A read at any other offset drops the
//! window and fetches just the bytes asked for.
//!
//! Every GET carries `If-Match` with the ETag seen at open: if the object changes while open,
//! reads fail with EIO instead of mixing two versions.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;
use s3vol_s3::{BucketName, ETag, ObjectStore};
use tokio::task::JoinHandle;

use crate::budget::{Memory, MemoryPermit};
use crate::error::{FsError, FsResult, err};

/// What readers share.
#[derive(Debug)]
pub struct ReadCtx {
    pub store: Arc<dyn ObjectStore>,
    pub bucket: BucketName,
    pub memory: Arc<Memory>,
    pub part_size: u64,
    pub max_window: u64,
}

const MIN_WINDOW: u64 = 1 << 20;
/// How far from the expected offset a read may land and still count as sequential.
const SEQ_SLACK: u64 = 4 << 20;

#[derive(Debug)]
enum PartData {
    Pending(JoinHandle<FsResult<(Bytes, MemoryPermit)>>),
    Ready(Bytes, #[allow(dead_code)] MemoryPermit),
}

#[derive(Debug)]
struct Part {
    range: Range<u64>,
    data: PartData,
}

/// The read state of one open file handle.
#[derive(Debug)]
pub struct Reader {
    ctx: Arc<ReadCtx>,
    key: String,
    etag: ETag,
    size: u64,
    next_seq: u64,
    streak: u64,
    parts: VecDeque<Part>,
}

async fn fetch(ctx: &ReadCtx, key: &str, etag: &ETag, range: Range<u64>) -> FsResult<Bytes> {
    let len = (range.end - range.start) as usize;
    let got = ctx
        .store
        .get_object(&ctx.bucket, key, Some(range.clone()), Some(etag))
        .await
        .map_err(|e| {
            let fs: FsError = e.into();
            err!(
                fs.errno,
                "read s3://{}/{key} {range:?}: {}",
                ctx.bucket,
                fs.message
            )
        })?;
    let mut buf = BytesMut::with_capacity(len);
    let mut body = got.body;
    while let Some(chunk) = body.try_next().await? {
        buf.extend_from_slice(&chunk);
    }
    if buf.len() != len {
        return Err(err!(
            libc::EIO,
            "read s3://{}/{key} {range:?}: got {} bytes; the object changed?",
            ctx.bucket,
            buf.len()
        ));
    }
    Ok(buf.freeze())
}

impl Reader {
    pub fn new(ctx: Arc<ReadCtx>, key: String, etag: ETag, size: u64) -> Self {
        Self {
            ctx,
            key,
            etag,
            size,
            next_seq: 0,
            streak: 0,
            parts: VecDeque::new(),
        }
    }

    fn spawn_part(&self, range: Range<u64>, permit: MemoryPermit) -> Part {
        let ctx = self.ctx.clone();
        let key = self.key.clone();
        let etag = self.etag.clone();
        let r = range.clone();
        let handle = tokio::spawn(async move {
            let data = fetch(&ctx, &key, &etag, r).await?;
            Ok((data, permit))
        });
        Part {
            range,
            data: PartData::Pending(handle),
        }
    }

    /// Keeps the window of parts ahead of `offset` filled. The part covering `offset`, when
    /// missing, waits for memory (the reader holds no other part then, so waiting cannot
    /// deadlock); parts further ahead start only if memory is free now.
    async fn fill_window(&mut self, offset: u64) {
        let window =
            (self.streak.saturating_mul(2)).clamp(MIN_WINDOW, self.ctx.max_window.max(MIN_WINDOW));
        let target = offset.saturating_add(window).min(self.size);
        let part_len = (window / 4).clamp(256 << 10, self.ctx.part_size);
        loop {
            let start = self.parts.back().map_or(offset, |p| p.range.end);
            if start >= target {
                break;
            }
            let end = (start + part_len).min(self.size);
            let permit = if start <= offset {
                self.ctx.memory.acquire(end - start).await
            } else {
                match self.ctx.memory.try_acquire(end - start) {
                    Some(p) => p,
                    None => break,
                }
            };
            let part = self.spawn_part(start..end, permit);
            self.parts.push_back(part);
        }
    }

    pub async fn read(&mut self, offset: u64, len: u64) -> FsResult<Bytes> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        // The kernel issues read-ahead requests concurrently, so a sequential reader's
        // requests arrive slightly out of order: anything near the expected offset, or inside
        // the window already fetched, counts as sequential.
        let in_window = self.parts.front().is_some_and(|p| p.range.start <= offset)
            && self.parts.back().is_some_and(|p| offset < p.range.end);
        let near = offset.abs_diff(self.next_seq) <= SEQ_SLACK;
        if !(in_window || near || offset == 0) {
            self.streak = 0;
            self.drop_parts();
            self.next_seq = end;
            metrics::counter!("s3vol_fs_random_reads_total").increment(1);
            return fetch(&self.ctx, &self.key, &self.etag, offset..end).await;
        }
        if end > self.next_seq {
            self.streak += end - self.next_seq.max(offset);
            self.next_seq = end;
        }
        if self.parts.front().is_some_and(|p| p.range.start > offset) {
            // Behind the window (a late out-of-order request): fetch it alone.
            return fetch(&self.ctx, &self.key, &self.etag, offset..end).await;
        }
        while self.parts.front().is_some_and(|p| p.range.end <= offset) {
            self.parts.pop_front();
        }
        self.fill_window(offset).await;
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        let mut pos = offset;
        let mut i = self
            .parts
            .iter()
            .position(|p| p.range.end > pos)
            .unwrap_or(self.parts.len());
        while pos < end {
            if i >= self.parts.len() {
                self.fill_window(pos).await;
            }
            let Some(part) = self.parts.get_mut(i) else {
                return Err(err!(libc::EIO, "prefetch window empty at {pos}"));
            };
            if let PartData::Pending(handle) = &mut part.data {
                let (data, permit) = match handle.await {
                    Ok(r) => r?,
                    Err(e) => return Err(err!(libc::EIO, "prefetch task: {e}")),
                };
                part.data = PartData::Ready(data, permit);
            }
            let PartData::Ready(data, _) = &part.data else {
                continue;
            };
            let from = (pos - part.range.start) as usize;
            let to = (end.min(part.range.end) - part.range.start) as usize;
            out.extend_from_slice(&data[from..to]);
            pos = part.range.start + to as u64;
            i += 1;
        }
        Ok(out.freeze())
    }

    fn drop_parts(&mut self) {
        for p in self.parts.drain(..) {
            if let PartData::Pending(h) = p.data {
                h.abort();
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.drop_parts();
    }
}
