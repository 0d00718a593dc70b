//! Unit tests of staging against the in-memory store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use s3vol_s3::{Fault, FaultStore, MemStore, Op, S3Error};
use std::time::Duration;

const MIB: usize = 1 << 20;

async fn ctx_over(store: Arc<FaultStore>, dir: &std::path::Path) -> Arc<StageCtx> {
    let bucket = BucketName::new("bkt").unwrap();
    store.create_bucket(&bucket).await.unwrap();
    Arc::new(StageCtx {
        stream: true,
        store,
        bucket,
        cache: Arc::new(CacheDir::open(dir).unwrap()),
        part_size: 5 << 20,
        memory: Arc::new(Memory::new(64 << 20)),
        disk: Arc::new(Disk::new(1 << 30)),
        parts: Arc::new(BufPool::new(5 << 20, 2)),
        arena: None,
        close_timeout: Duration::from_secs(60),
        min_throughput: 1 << 20,
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
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store.clone(), dir.path()).await;
    let mut st = Staged::new_empty(ctx.clone(), "f", None).unwrap();
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
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store, dir.path()).await;
    let mut st = Staged::new_empty(ctx.clone(), "f", None).unwrap();
    let content = data(6 * MIB, 2);
    st.write(0, &content, || meta("33188", "1")).await.unwrap();
    st.upload(&meta("33261", "1"), None).await.unwrap();
    let (body, stored) = object(&ctx, "f").await;
    assert!(body == content);
    assert_eq!(stored["mode"], "33261");
}

#[tokio::test]
async fn extending_or_seeking_while_streaming_keeps_every_byte_in_place() {
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store, dir.path()).await;
    let mut st = Staged::new_empty(ctx.clone(), "f", None).unwrap();
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
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let bucket = BucketName::new("bkt").unwrap();
    store.create_bucket(&bucket).await.unwrap();
    let memory = Arc::new(Memory::new(16 << 20));
    let ctx = Arc::new(StageCtx {
        stream: true,
        store,
        bucket,
        cache: Arc::new(CacheDir::open(dir.path()).unwrap()),
        part_size: 5 << 20,
        memory: memory.clone(),
        disk: Arc::new(Disk::new(1 << 30)),
        parts: Arc::new(BufPool::new(5 << 20, 2)),
        arena: None,
        close_timeout: Duration::from_secs(60),
        min_throughput: 1 << 20,
    });
    // Far more small files than 16 MiB holds parts, all kept (as parked clean copies are).
    let mut kept = Vec::new();
    for i in 0..40 {
        let mut st = Staged::new_empty(ctx.clone(), &format!("f{i}"), None).unwrap();
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

/// Staging data files in `dir` (journal records and the lock file aside).
fn files_in(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "data"))
        })
        .count()
    })
}

async fn write_all(st: &mut Staged, content: &[u8]) {
    for chunk in content.chunks(MIB) {
        let at = st.size();
        st.write(at, chunk, || meta("33188", "1")).await.unwrap();
    }
}

#[tokio::test]
async fn a_streamed_file_never_touches_the_disk_and_gives_its_memory_back() {
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store, dir.path()).await;
    for (name, len) in [("big", 12 * MIB + 5), ("small", 3000), ("empty", 0)] {
        let mut st = Staged::new_empty(ctx.clone(), name, None).unwrap();
        let content = data(len, 7);
        write_all(&mut st, &content).await;
        assert_eq!(files_in(dir.path()), 0, "{name}: nothing staged on disk");
        st.upload(&meta("33188", "1"), None).await.unwrap();
        assert!(object(&ctx, name).await.0 == content, "{name}");
        assert!(!st.has_local_bytes(), "{name}: no clean copy worth keeping");
        drop(st);
    }
    assert_eq!(ctx.memory.used(), 0);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| !n.to_string_lossy().ends_with(".lock"))
        .collect();
    assert!(
        left.is_empty(),
        "the upload's journal record went with it: {left:?}"
    );
}

#[tokio::test]
async fn an_extension_reads_and_uploads_zeros_whatever_lies_past_the_end() {
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store, dir.path()).await;
    let mut st = Staged::new_empty(ctx.clone(), "f", None).unwrap();
    st.write(10, b"abc", || meta("33188", "1")).await.unwrap();
    // What a write past the end that failed half-way leaves in the staging file.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(st.path())
        .unwrap();
    f.write_all_at(&[7u8; 307_200], 13).unwrap();
    st.truncate(400_000).await.unwrap();
    let mut expect = vec![0u8; 400_000];
    expect[10..13].copy_from_slice(b"abc");
    assert!(
        st.read(0, 400_000).await.unwrap() == expect,
        "zeros past the old end"
    );
    st.upload(&meta("33188", "1"), None).await.unwrap();
    assert!(object(&ctx, "f").await.0 == expect, "and zeros in S3");
}

#[tokio::test]
async fn a_part_that_fails_for_a_while_is_retried_in_the_background() {
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store.clone(), dir.path()).await;
    store.add(Fault::FailOp {
        op: Op::UploadPart,
        error: S3Error::Transient("injected".into()),
        times: Some(3),
    });
    let mut st = Staged::new_empty(ctx.clone(), "f", None).unwrap();
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
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store.clone(), dir.path()).await;
    let mut st = Staged::new_empty(ctx.clone(), "f", None).unwrap();
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
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store, dir.path()).await;
    let mut st = Staged::new_empty(ctx.clone(), "f", None).unwrap();
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
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store.clone(), dir.path()).await;
    let mut st = Staged::new_empty(ctx.clone(), "f", None).unwrap();
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
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store.clone(), dir.path()).await;
    let mut st = Staged::new_empty(ctx.clone(), "f", None).unwrap();
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
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store.clone(), dir.path()).await;
    let mut st = Staged::new_empty(ctx.clone(), "f", None).unwrap();
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

#[tokio::test]
async fn an_unlinked_files_journal_never_calls_its_bytes_dirty() {
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store, dir.path()).await;
    let mut st = Staged::new_empty(ctx.clone(), "gone", None).unwrap();
    write_all(&mut st, &data(MIB, 3)).await;
    // Unlink while open: the bytes go local for the handles, then stop being the object's.
    st.make_local().await.unwrap();
    let record = |st: &Staged| {
        let text = std::fs::read_to_string(st.local.with_ext("meta")).unwrap();
        crate::cache_dir::Record::parse(&text).unwrap()
    };
    assert!(
        record(&st).dirty,
        "before the unlink the bytes are the file's, not in S3"
    );
    st.discard().await;
    assert!(
        !record(&st).dirty,
        "after the unlink a crash must not bring the file back"
    );
    // Writes through a handle still open do not make it dirty again.
    st.write(MIB as u64, &data(4096, 4), || meta("33188", "1"))
        .await
        .unwrap();
    assert!(!record(&st).dirty);
    let back = st.read(MIB as u64, 4096).await.unwrap();
    assert!(
        back[..] == data(4096, 4)[..],
        "the handle reads what it wrote"
    );
}

#[tokio::test]
async fn a_failed_metadata_rewrite_after_a_completed_stream_keeps_the_object_whole() {
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store.clone(), dir.path()).await;
    let mut st = Staged::new_empty(ctx.clone(), "f", None).unwrap();
    let content = data(12 * MIB, 5);
    for chunk in content.chunks(MIB) {
        let at = st.size();
        st.write(at, chunk, || meta("33188", "1")).await.unwrap();
    }
    store.add(Fault::FailOp {
        op: Op::Copy,
        error: S3Error::Transient("injected".into()),
        times: Some(1),
    });
    // The mode changed: the upload completes, then the metadata copy fails.
    let err = st.upload(&meta("33261", "1"), None).await.unwrap_err();
    assert_eq!(err.errno, libc::EIO);
    assert!(
        object(&ctx, "f").await.0 == content,
        "completed before the copy"
    );
    assert!(
        st.is_dirty() && !st.content_dirty(),
        "only the attributes are left"
    );
    let before = store.calls();
    st.upload(&meta("33261", "1"), None).await.unwrap();
    assert_eq!(store.calls() - before, 1, "one copy, nothing else");
    let (body, stored) = object(&ctx, "f").await;
    assert!(
        body == content,
        "the retry did not send the content again from nothing"
    );
    assert_eq!(stored["mode"], "33261");
}

#[tokio::test(start_paused = true)]
async fn a_flush_gives_up_at_its_time_bound_and_keeps_every_byte() {
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store.clone(), dir.path()).await;
    let mut st = Staged::new_empty(ctx.clone(), "f", None).unwrap();
    let content = data(12 * MIB, 6);
    st.write(0, &content[..6 * MIB], || meta("33188", "1"))
        .await
        .unwrap();
    // From here every request takes 100 s: past the bound of 60 s + 12 MiB at 1 MiB/s.
    store.add(Fault::Latency {
        op: None,
        delay: Duration::from_secs(100),
    });
    st.write(6 * MIB as u64, &content[6 * MIB..], || meta("33188", "1"))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let err = st.upload(&meta("33188", "1"), None).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.errno, libc::EIO);
    assert!(
        took <= Duration::from_secs(60 + 12 + 1),
        "gave up after {took:?}"
    );
    // The part still in flight goes on; the next flush waits for it.
    store.clear();
    st.upload(&meta("33188", "1"), None).await.unwrap();
    assert!(
        object(&ctx, "f").await.0 == content,
        "nothing was lost by giving up"
    );
}

#[tokio::test]
async fn a_server_that_ignores_ranges_fails_the_fill_instead_of_misplacing_bytes() {
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store.clone(), dir.path()).await;
    let content = data(3 * MIB, 7);
    let put = ctx
        .store
        .put_object(
            &ctx.bucket,
            "f",
            Bytes::from(content.clone()),
            &PutOptions::default(),
        )
        .await
        .unwrap();
    let base = Base {
        etag: put.etag,
        size: content.len() as u64,
    };
    let mut st = Staged::from_object(ctx.clone(), "f", base).unwrap();
    st.write(MIB as u64, b"patch", || meta("33188", "1"))
        .await
        .unwrap();
    store.add(Fault::IgnoreRange);
    let err = st.read(2 * MIB as u64, 4096).await.unwrap_err();
    assert_eq!(err.errno, libc::EIO);
    store.clear();
    let mut expect = content.clone();
    expect[MIB..MIB + 5].copy_from_slice(b"patch");
    let local = st.read(0, expect.len() as u64).await.unwrap();
    assert!(local == expect, "the staging file holds no misplaced bytes");
}

#[tokio::test]
async fn a_completion_whose_answer_was_lost_is_known_by_the_objects_etag() {
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store.clone(), dir.path()).await;
    let mut st = Staged::new_empty(ctx.clone(), "f", None).unwrap();
    let content = data(13 * MIB, 21);
    write_all(&mut st, &content).await;
    // S3 completes the upload, the answer is lost: the object is there with the ETag its
    // parts make, so the flush succeeds.
    store.add(Fault::LoseAnswer {
        op: Op::CompleteMultipart,
        error: S3Error::Transient("connection reset".into()),
        times: Some(1),
    });
    st.upload(&meta("33188", "1"), None).await.unwrap();
    assert!(!st.content_dirty());
    assert!(object(&ctx, "f").await.0 == content);

    // The same, and the check fails too: the flush fails, and the next one finds the upload
    // gone (completed) and the object made of its parts, instead of failing for ever.
    let mut st = Staged::new_empty(ctx.clone(), "g", None).unwrap();
    let content = data(13 * MIB, 22);
    write_all(&mut st, &content).await;
    store.add(Fault::LoseAnswer {
        op: Op::CompleteMultipart,
        error: S3Error::Transient("connection reset".into()),
        times: Some(1),
    });
    store.add(Fault::FailOp {
        op: Op::Head,
        error: S3Error::Transient("down".into()),
        times: Some(1),
    });
    assert!(st.upload(&meta("33188", "1"), None).await.is_err());
    assert!(st.content_dirty(), "not known to be in S3 yet");
    st.upload(&meta("33188", "1"), None).await.unwrap();
    assert!(!st.content_dirty());
    assert!(object(&ctx, "g").await.0 == content);

    // The application writes on after that failed flush (more than a part): the object holds
    // the first bytes, memory the rest, and the next flush joins them.
    let mut st = Staged::new_empty(ctx.clone(), "h", None).unwrap();
    let content = data(22 * MIB, 26);
    write_all(&mut st, &content[..13 * MIB]).await;
    store.add(Fault::LoseAnswer {
        op: Op::CompleteMultipart,
        error: S3Error::Transient("connection reset".into()),
        times: Some(1),
    });
    store.add(Fault::FailOp {
        op: Op::Head,
        error: S3Error::Transient("down".into()),
        times: Some(1),
    });
    assert!(st.upload(&meta("33188", "1"), None).await.is_err());
    write_all(&mut st, &content[13 * MIB..]).await;
    st.upload(&meta("33188", "1"), None).await.unwrap();
    assert!(!st.content_dirty());
    assert!(object(&ctx, "h").await.0 == content, "every byte, in order");
}

/// A flush that gives up while CompleteMultipartUpload is unanswered leaves it running: it
/// may still make the object, and whatever comes next learns its outcome first.
#[tokio::test(start_paused = true)]
async fn a_completion_left_running_at_the_time_bound_decides_what_comes_next() {
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store.clone(), dir.path()).await;
    let slow_completion = || Fault::Latency {
        op: Some(Op::CompleteMultipart),
        delay: Duration::from_secs(100),
    };

    // The next flush waits for it, and the object it made is the file.
    let mut st = Staged::new_empty(ctx.clone(), "f", None).unwrap();
    let content = data(12 * MIB, 23);
    write_all(&mut st, &content).await;
    store.add(slow_completion());
    assert_eq!(
        st.upload(&meta("33188", "1"), None)
            .await
            .unwrap_err()
            .errno,
        libc::EIO
    );
    assert!(st.completion_pending());
    store.clear();
    st.upload(&meta("33188", "1"), None).await.unwrap();
    assert!(object(&ctx, "f").await.0 == content);

    // The application writes on after the failed flush: the write waits for the outcome,
    // and every byte, before and after, ends in S3.
    let mut st = Staged::new_empty(ctx.clone(), "g", None).unwrap();
    let content = data(14 * MIB, 24);
    write_all(&mut st, &content[..12 * MIB]).await;
    store.add(slow_completion());
    assert!(st.upload(&meta("33188", "1"), None).await.is_err());
    store.clear();
    write_all(&mut st, &content[12 * MIB..]).await;
    assert!(!st.completion_pending());
    st.upload(&meta("33188", "1"), None).await.unwrap();
    assert!(object(&ctx, "g").await.0 == content);

    // Unlinked meanwhile: the object the late completion makes is deleted.
    let mut st = Staged::new_empty(ctx.clone(), "h", None).unwrap();
    write_all(&mut st, &data(12 * MIB, 25)).await;
    store.add(slow_completion());
    assert!(st.upload(&meta("33188", "1"), None).await.is_err());
    store.clear();
    st.discard().await;
    assert!(
        ctx.store.head_object(&ctx.bucket, "h").await.is_err(),
        "nothing of the unlinked file stays in the bucket"
    );
}

/// A write of bytes the part being filled already holds, at their place (what the kernel
/// sends again when a serving process died after taking a write and before answering it),
/// changes nothing: the file goes on streaming, with no staging file. Other bytes there, or
/// bytes of a part already sent, are a write like any other (the file spills).
#[tokio::test]
async fn the_same_bytes_written_again_into_the_part_being_filled_keep_the_stream() {
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store, dir.path()).await;
    let mut st = Staged::new_empty(ctx.clone(), "f", None).unwrap();
    let mut expect = data(6 * MIB + 1000, 5);
    let m = || meta("33188", "1");
    st.write(0, &expect, m).await.unwrap();
    // Again, from inside the part being filled to past its end: only the new bytes count.
    let at = 5 * MIB + 10;
    let more = data(3000, 6);
    let mut again = expect[at..].to_vec();
    again.extend_from_slice(&more);
    st.write(at as u64, &again, m).await.unwrap();
    expect.extend_from_slice(&more);
    assert_eq!(st.size(), expect.len() as u64);
    assert!(!st.path().exists(), "still streaming: no staging file");
    // Other bytes at the same place are a rewrite.
    st.write(at as u64, b"other", m).await.unwrap();
    expect[at..at + 5].copy_from_slice(b"other");
    assert!(st.path().exists(), "a rewrite spills the file");
    st.upload(&meta("33188", "1"), None).await.unwrap();
    assert!(object(&ctx, "f").await.0 == expect);
}

/// A patched small object is PUT whole, its untouched ranges fetched from the version it
/// started from first. Its record names those ranges before the PUT starts, so a process that
/// dies during the PUT leaves a staging file a successor can upload without that version,
/// which the PUT may have replaced meanwhile.
#[tokio::test]
async fn a_patched_small_file_records_the_ranges_it_fetched_before_its_put() {
    let dir = crate::cache_dir::private_tempdir();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let ctx = ctx_over(store.clone(), dir.path()).await;
    let old = data(300_000, 7);
    let put = ctx
        .store
        .put_object(
            &ctx.bucket,
            "small",
            Bytes::from(old.clone()),
            &PutOptions::default(),
        )
        .await
        .unwrap();
    let base = Base {
        etag: put.etag,
        size: old.len() as u64,
    };
    let mut st = Staged::from_object(ctx.clone(), "small", base).unwrap();
    st.write(1000, b"patched", || meta("33188", "1"))
        .await
        .unwrap();
    // The PUT hangs, and the process dies in it (the upload is dropped unfinished).
    store.add(Fault::Latency {
        op: Some(Op::Put),
        delay: Duration::from_secs(30),
    });
    let died = tokio::time::timeout(
        Duration::from_millis(500),
        st.upload(&meta("33188", "1"), None),
    )
    .await;
    assert!(died.is_err(), "the PUT was to hang");
    let text = std::fs::read_to_string(st.local.with_ext("meta")).unwrap();
    let record = crate::cache_dir::Record::parse(&text).unwrap();
    assert_eq!(
        record.local,
        vec![(0, old.len() as u64)],
        "every byte of the file is in the staging file, and the record says so"
    );
    std::mem::forget(st);
}
