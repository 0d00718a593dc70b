//! Reading clean (not locally modified) files: sequential prefetch and exact random reads.
//!
//! A handle that reads sequentially gets a window of ranged GETs in flight ahead of it; the
//! window starts at one MiB and doubles with sustained sequential reading up to a cap, and
//! every prefetched part holds its size in the memory budget until it has been read past, so
//! many readers together stay under `--memory-limit` (a part that does not fit is simply not
//! prefetched yet; the part being read waits for room). A read at any other offset drops the
//! window and fetches an aligned block around the bytes asked for (see [`RANDOM_BLOCK`]).
//!
//! A part keeps the body chunks as the HTTP client delivered them: no part-sized buffer is
//! allocated (and faulted in, and zeroed) per GET, a read that falls inside one chunk is
//! answered with a slice of it, and others are copied once into the reply.
//! [`Reader::try_read`] answers from parts already received without waiting, so the FUSE
//! adapter serves most sequential reads on the thread that received them.
//!
//! Every GET carries `If-Match` with the ETag seen at open: if the object changes while open,
//! reads fail with EIO instead of mixing two versions.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, TryStreamExt};
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
/// The smallest GET a random read makes: the aligned block around it, kept for the next
/// reads that fall in it. A small ranged GET costs about as much time as a 64 KiB one on
/// every store measured (and far more on some: a body smaller than a TCP segment or two can
/// wait for a delayed ACK), so asking for less saves nothing.
pub const RANDOM_BLOCK: u64 = 64 << 10;

/// A received range of the object, as the chunks the HTTP client delivered.
#[derive(Debug, Default)]
struct Chunks {
    /// Each chunk with its offset from the start of the range.
    chunks: Vec<(u64, Bytes)>,
}

impl Chunks {
    /// `from..to` (offsets within the range, inside it): a slice when one chunk holds it all.
    fn get(&self, from: u64, to: u64, out: &mut Option<BytesMut>, whole: u64) -> Option<Bytes> {
        let mut i = self.chunks.partition_point(|(start, _)| *start <= from) - 1;
        let (start, chunk) = &self.chunks[i];
        let end = start + chunk.len() as u64;
        if to <= end && out.is_none() {
            return Some(chunk.slice((from - start) as usize..(to - start) as usize));
        }
        let buf = out.get_or_insert_with(|| BytesMut::with_capacity(whole as usize));
        let mut pos = from;
        while pos < to {
            let (start, chunk) = &self.chunks[i];
            let end = (start + chunk.len() as u64).min(to);
            buf.extend_from_slice(&chunk[(pos - start) as usize..(end - start) as usize]);
            pos = end;
            i += 1;
        }
        None
    }
}

type Fetched = FsResult<(Chunks, MemoryPermit)>;

#[derive(Debug)]
enum PartData {
    Pending(JoinHandle<Fetched>),
    Ready(Chunks, #[allow(dead_code)] MemoryPermit),
    /// The fetch failed: every read of this part gets the error.
    Failed(FsError),
}

#[derive(Debug)]
struct Part {
    range: Range<u64>,
    data: PartData,
}

impl Part {
    /// Moves a finished fetch into `Ready`, without waiting. `Some(Err)` when it failed.
    fn poll_ready(&mut self) -> Option<FsResult<()>> {
        if let PartData::Pending(handle) = &mut self.data {
            let done = handle.now_or_never()?;
            self.settle(done);
        }
        Some(self.outcome())
    }

    async fn wait_ready(&mut self) -> FsResult<()> {
        if let PartData::Pending(handle) = &mut self.data {
            let done = handle.await;
            self.settle(done);
        }
        self.outcome()
    }

    fn settle(&mut self, done: Result<Fetched, tokio::task::JoinError>) {
        self.data = match joined(done) {
            Ok((chunks, permit)) => PartData::Ready(chunks, permit),
            Err(e) => PartData::Failed(e),
        };
    }

    fn outcome(&self) -> FsResult<()> {
        match &self.data {
            PartData::Failed(e) => Err(e.clone()),
            _ => Ok(()),
        }
    }
}

fn joined(r: Result<Fetched, tokio::task::JoinError>) -> Fetched {
    r.map_err(|e| err!(libc::EIO, "prefetch task: {e}"))?
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
    /// The last block fetched for a random read (its memory counted in the budget).
    block: Option<(Range<u64>, Chunks, MemoryPermit)>,
}

async fn fetch(ctx: &ReadCtx, key: &str, etag: &ETag, range: Range<u64>) -> FsResult<Chunks> {
    let len = range.end - range.start;
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
    let mut out = Chunks::default();
    let mut got_len = 0u64;
    let mut body = got.body;
    while let Some(chunk) = body.try_next().await? {
        if chunk.is_empty() {
            continue;
        }
        let n = chunk.len() as u64;
        // A server that ignores the range would send the whole object: never hold more than
        // was asked for (and counted in the memory budget).
        if got_len + n > len {
            return Err(err!(
                libc::EIO,
                "read s3://{}/{key} {range:?}: the server sent more than the range",
                ctx.bucket,
            ));
        }
        out.chunks.push((got_len, chunk));
        got_len += n;
    }
    if got_len != len {
        return Err(err!(
            libc::EIO,
            "read s3://{}/{key} {range:?}: got {got_len} bytes; the object changed?",
            ctx.bucket,
        ));
    }
    Ok(out)
}

/// Copies or slices `offset..end` out of `parts` (which must cover it, all ready).
fn assemble(parts: &VecDeque<Part>, offset: u64, end: u64) -> Bytes {
    let mut out = None;
    let mut pos = offset;
    let first = parts.partition_point(|p| p.range.end <= offset);
    for part in parts.range(first..) {
        if pos >= end {
            break;
        }
        let PartData::Ready(chunks, _) = &part.data else {
            unreachable!("assemble over a part not received");
        };
        let to = end.min(part.range.end);
        let r = part.range.start;
        if let Some(slice) = chunks.get(pos - r, to - r, &mut out, end - offset) {
            if to == end {
                return slice;
            }
            out.get_or_insert_with(|| BytesMut::with_capacity((end - offset) as usize))
                .extend_from_slice(&slice);
        }
        pos = to;
    }
    out.map(BytesMut::freeze).unwrap_or_default()
}

impl Reader {
    /// The size of the version read.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The version read.
    pub fn etag(&self) -> &ETag {
        &self.etag
    }

    pub fn new(ctx: Arc<ReadCtx>, key: String, etag: ETag, size: u64) -> Self {
        Self {
            ctx,
            key,
            etag,
            size,
            next_seq: 0,
            streak: 0,
            parts: VecDeque::new(),
            block: None,
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

    fn window(&self) -> (u64, u64) {
        let window =
            (self.streak.saturating_mul(2)).clamp(MIN_WINDOW, self.ctx.max_window.max(MIN_WINDOW));
        let part_len = (window / 4).clamp(256 << 10, self.ctx.part_size);
        (window, part_len)
    }

    /// Starts the parts of the window ahead of `offset` for which memory is free now. Returns
    /// false when the part covering `offset` itself is missing and had no room.
    fn top_up(&mut self, offset: u64) -> bool {
        let (window, part_len) = self.window();
        let target = offset.saturating_add(window).min(self.size);
        loop {
            let start = self.parts.back().map_or(offset, |p| p.range.end);
            if start >= target {
                return true;
            }
            let end = (start + part_len).min(self.size);
            let Some(permit) = self.ctx.memory.try_acquire(end - start) else {
                return start > offset;
            };
            let part = self.spawn_part(start..end, permit);
            self.parts.push_back(part);
        }
    }

    /// Keeps the window of parts ahead of `offset` filled. The part covering `offset`, when
    /// missing, waits for memory (the reader holds no other part then, so waiting cannot
    /// deadlock); parts further ahead start only if memory is free now.
    async fn fill_window(&mut self, offset: u64) {
        if self.top_up(offset) {
            return;
        }
        let (_, part_len) = self.window();
        let start = self.parts.back().map_or(offset, |p| p.range.end);
        let end = (start + part_len).min(self.size);
        let permit = self.ctx.memory.acquire(end - start).await;
        let part = self.spawn_part(start..end, permit);
        self.parts.push_back(part);
        self.top_up(offset);
    }

    /// Counts a read of `offset..end` inside or near the window as sequential.
    fn advance(&mut self, offset: u64, end: u64) {
        if end > self.next_seq {
            self.streak += end - self.next_seq.max(offset);
            self.next_seq = end;
        }
        while self.parts.front().is_some_and(|p| p.range.end <= offset) {
            self.parts.pop_front();
        }
    }

    /// Answers a read from parts already received, without waiting for S3; `None` when it
    /// would have to wait (then call [`Reader::read`]).
    pub fn try_read(&mut self, offset: u64, len: u64) -> Option<FsResult<Bytes>> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Some(Ok(Bytes::new()));
        }
        if let Some((range, chunks, _)) = &self.block
            && range.start <= offset
            && end <= range.end
        {
            let r = range.start;
            self.next_seq = self.next_seq.max(end);
            let mut out = None;
            let got = chunks.get(offset - r, end - r, &mut out, end - offset);
            return Some(Ok(got.unwrap_or_else(|| out.unwrap_or_default().freeze())));
        }
        let first = self.parts.partition_point(|p| p.range.end <= offset);
        if self.parts.get(first)?.range.start > offset {
            return None;
        }
        let mut covered = offset;
        for part in self.parts.range_mut(first..) {
            if covered >= end {
                break;
            }
            if let Err(e) = part.poll_ready()? {
                return Some(Err(e));
            }
            covered = part.range.end;
        }
        if covered < end {
            return None;
        }
        self.advance(offset, end);
        self.top_up(offset);
        Some(Ok(assemble(&self.parts, offset, end)))
    }

    pub async fn read(&mut self, offset: u64, len: u64) -> FsResult<Bytes> {
        if let Some(done) = self.try_read(offset, len) {
            return done;
        }
        let end = offset.saturating_add(len).min(self.size);
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
            return self.read_block(offset, end).await;
        }
        if self.parts.front().is_some_and(|p| p.range.start > offset) {
            // Behind the window (a late out-of-order request): fetch it alone.
            return self.read_block(offset, end).await;
        }
        self.advance(offset, end);
        self.fill_window(offset).await;
        let mut pos = offset;
        while pos < end {
            let i = self.parts.partition_point(|p| p.range.end <= pos);
            if i >= self.parts.len() {
                self.fill_window(pos).await;
                continue;
            }
            let part = &mut self.parts[i];
            part.wait_ready().await?;
            pos = part.range.end;
        }
        Ok(assemble(&self.parts, offset, end))
    }

    /// A read outside the window: GETs the aligned [`RANDOM_BLOCK`]s around it and keeps
    /// them for the next reads that land there.
    async fn read_block(&mut self, offset: u64, end: u64) -> FsResult<Bytes> {
        let start = offset - offset % RANDOM_BLOCK;
        let stop = end.next_multiple_of(RANDOM_BLOCK).min(self.size);
        self.block = None;
        let permit = self.ctx.memory.acquire(stop - start).await;
        let chunks = fetch(&self.ctx, &self.key, &self.etag, start..stop).await?;
        let mut out = None;
        let got = chunks.get(offset - start, end - start, &mut out, end - offset);
        let data = got.unwrap_or_else(|| out.unwrap_or_default().freeze());
        self.block = Some((start..stop, chunks, permit));
        Ok(data)
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use s3vol_s3::{Fault, FaultStore, MemStore, Op, PutOptions, S3Error};

    async fn reader_over(len: usize) -> (Arc<FaultStore>, Reader, Vec<u8>) {
        let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
        let bucket = BucketName::new("bkt").unwrap();
        store.create_bucket(&bucket).await.unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let put = store
            .put_object(
                &bucket,
                "k",
                Bytes::from(data.clone()),
                &PutOptions::default(),
            )
            .await
            .unwrap();
        let ctx = Arc::new(ReadCtx {
            store: store.clone(),
            bucket,
            memory: Arc::new(Memory::new(64 << 20)),
            part_size: 1 << 20,
            max_window: 8 << 20,
        });
        let reader = Reader::new(ctx, "k".into(), put.etag, len as u64);
        (store, reader, data)
    }

    #[tokio::test]
    async fn sequential_reads_come_back_identical_across_parts_and_chunks() {
        let (_, mut r, data) = reader_over((5 << 20) + 123).await;
        let mut pos = 0;
        // Odd sizes, so that reads straddle parts.
        while pos < data.len() {
            let got = r.read(pos as u64, 100_000).await.unwrap();
            let end = (pos + 100_000).min(data.len());
            assert_eq!(&got[..], &data[pos..end], "at {pos}");
            pos = end;
        }
        assert!(r.read(data.len() as u64, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_random_read_fetches_one_aligned_block_and_serves_its_neighbours_from_it() {
        let (store, mut r, data) = reader_over(12 << 20).await;
        let before = store.calls();
        // Beyond the distance a sequential reader's requests may jump.
        let at = (9 << 20) + 5000;
        assert_eq!(
            r.read(at, 4096).await.unwrap(),
            &data[at as usize..][..4096]
        );
        assert_eq!(store.calls() - before, 1, "one GET");
        // Elsewhere in the same 64 KiB block: no request.
        let near = (9 << 20) + 40_000;
        assert_eq!(
            r.read(near, 4096).await.unwrap(),
            &data[near as usize..][..4096]
        );
        assert_eq!(store.calls() - before, 1, "served from the block");
    }

    #[tokio::test]
    async fn a_failed_prefetch_fails_every_read_of_it_and_never_panics() {
        let (store, mut r, _) = reader_over(2 << 20).await;
        store.add(Fault::FailOp {
            op: Op::Get,
            error: S3Error::PreconditionFailed("k".into()),
            times: None,
        });
        for _ in 0..3 {
            let e = r.read(0, 4096).await.unwrap_err();
            assert_eq!(e.errno, libc::EIO, "{e:?}");
            // The fast path sees the same failure.
            if let Some(got) = r.try_read(0, 4096) {
                assert!(got.is_err());
            }
        }
    }
}
