//! The write path of `s3vol mount` as S3 sees it, and what happens when S3 fails.
//!
//! These mounts talk to the test server through a small proxy in the test (see
//! `support/proxy.rs`), which records the requests (so a test can tell a single PUT from a
//! multipart upload, or a server-side part copy from a download) and can be switched off to
//! play a dead server without disturbing the server other tests share.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/mount.rs"]
mod support;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proxy::Proxy;
use s3vol_s3::testing;
use support::{Mounted, close, errno, is_mounted, pattern, rt, s3vol};
use tokio::runtime::Runtime;

/// Mounts a new bucket through `proxy` (the harness's `server_args()` would point at the server
/// directly). `--max-attempts 2` keeps failures quick.
fn mount_via(rt: &Runtime, proxy: &Proxy, tag: &str, extra: &[&str]) -> Mounted {
    mount_via_env(rt, proxy, tag, extra, &[])
}

fn mount_via_env(
    rt: &Runtime,
    proxy: &Proxy,
    tag: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Mounted {
    let store = rt.block_on(support::store());
    let bucket = testing::unique_bucket(tag);
    rt.block_on(store.create_bucket(&bucket)).unwrap();
    let mnt = tempfile::Builder::new()
        .prefix("s3vol-mnt-")
        .tempdir()
        .unwrap();
    let cache = support::private_tempdir("s3vol-cache-");
    let mut child = s3vol()
        .arg("mount")
        .arg(format!("{bucket}/"))
        .arg(mnt.path())
        .args(["--endpoint-url", &proxy.url(), "--region", "us-east-1"])
        .args(["--force-path-style", "--max-attempts", "2"])
        .arg("--cache-dir")
        .arg(cache.path())
        .arg("-f")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("S3VOL_LOG_LEVEL", "warn")
        .envs(env.iter().copied())
        .spawn()
        .unwrap();
    support::wait_until_mounted(&mut child, mnt.path());
    Mounted {
        bucket,
        store,
        mnt,
        cache,
        child: Some(child),
        prefix: String::new(),
    }
}

/// Waits until nothing has knocked at the switched-off proxy for 3 s: the mount has given up
/// on its pending retries (release after a failed close tries once more).
fn wait_until_quiet(proxy: &Proxy) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = proxy.refused();
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_secs(3) {
        assert!(
            Instant::now() < deadline,
            "the mount kept retrying for 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
        let now = proxy.refused();
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
}

/// Staging files in the cache directory whose `.key` companion names `s3://bucket/key`.
fn staged_copies(m: &Mounted, key: &str) -> Vec<PathBuf> {
    let want = format!("s3://{}/{key}", m.bucket);
    fs::read_dir(m.cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "data"))
        .filter(|p| fs::read_to_string(p.with_extension("key")).is_ok_and(|k| k.trim() == want))
        .collect()
}

fn data_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().extension().is_some_and(|x| x == "data"))
        .map(|e| (e.path(), e.metadata().unwrap().len()))
        .collect()
}

fn wait_for_exit(m: &mut Mounted, within: Duration) -> std::process::ExitStatus {
    let child = m.child.as_mut().expect("running");
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            m.child = None;
            return status;
        }
        assert!(Instant::now() < deadline, "mount process still running");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm(m: &Mounted) {
    // SAFETY: sending a signal to our own child process.
    assert_eq!(
        unsafe { libc::kill(m.pid() as libc::pid_t, libc::SIGTERM) },
        0
    );
}

/// A field of /proc/<pid>/status, in KiB.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

// ----- what S3 sees ------------------------------------------------------------------------

#[test]
fn small_file_is_uploaded_as_one_put() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let m = mount_via(&rt, &proxy, "wf-small", &[]);
    let data = pattern(100_000, 1);
    let mut f = File::create(m.path("small")).unwrap();
    f.write_all(&data).unwrap();
    proxy.reset();
    close(f).unwrap();
    let path = format!("/{}/small", m.bucket);
    let reqs: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.path() == path)
        .collect();
    let heads: Vec<&str> = reqs
        .iter()
        .map(|r| r.head.lines().next().unwrap())
        .collect();
    assert_eq!(reqs.len(), 1, "one request for a small file: {heads:?}");
    let put = &reqs[0];
    assert_eq!(put.method(), "PUT", "{heads:?}");
    assert!(
        !put.has_param("partNumber") && !put.has_param("uploadId"),
        "a plain PutObject: {heads:?}"
    );
    assert_eq!(rt.block_on(m.get("small")), data);
}

/// 100 MiB written sequentially with `--memory-limit 64M` (the 1 GiB variant is
/// `bench/soak-write.sh`). The limit budgets part and prefetch buffers; the test bounds the
/// mount's peak RSS (VmHWM) above the RSS of the same mount idle, which holds the runtime's
/// fixed cost (threads, HTTP client, code). ALLOWANCE covers what the budget does not count
/// and an idle mount has not touched yet: the receive buffer of each of the 4 FUSE threads
/// (touched up to max_write = 1 MiB by the first big write each one serves) and the copy of
/// the write payload in flight (1 MiB). Measured on a loaded 2-core machine: 64 + 4–5 MiB.
///
/// `s3vol` fixes glibc's mmap threshold at 1 MiB at start, so a freed part buffer goes back to
/// the system. With glibc's default (a threshold that rises to the size of the first big
/// buffer freed), 8 MiB buffers come from per-thread heaps that keep what is freed, and the
/// same write grew the mount by up to 97 MiB. Buffering the file, or parts not waiting for
/// the budget, would exceed 100 MiB either way.
#[test]
fn sequential_write_streams_parts_with_bounded_memory() {
    const LIMIT: u64 = 64 << 20;
    const ALLOWANCE: u64 = 16 << 20;
    const SIZE: usize = 100 << 20;
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let m = mount_via_env(&rt, &proxy, "wf-stream", &["--memory-limit", "64M"], &[]);
    let pid = m.serving_pid();
    // Warm up the paths a write takes (HTTP client, signing, staging) on a small file, then
    // take the idle mount's resident size as the baseline: the runtime's fixed cost, which
    // the memory limit does not cover.
    fs::write(m.path("warmup"), pattern(1 << 20, 2)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let baseline = proc_status_kib(pid, "VmRSS") << 10;

    let chunk = |i: usize| pattern(1 << 20, 1000 + i as u64);
    let mut f = File::create(m.path("big")).unwrap();
    let key_path = format!("/{}/big", m.bucket);
    let part_uploads = |p: &Proxy| {
        p.requests()
            .iter()
            .filter(|r| r.path() == key_path && r.is_part_upload())
            .count()
    };
    for i in 0..SIZE >> 20 {
        f.write_all(&chunk(i)).unwrap();
        if i == 40 {
            // Parts go up while the file is still being written.
            let deadline = Instant::now() + Duration::from_secs(60);
            while part_uploads(&proxy) == 0 {
                assert!(
                    Instant::now() < deadline,
                    "no part uploaded after 40 MiB written"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            // The stream is in memory and in the upload, not in the cache directory.
            let staged: u64 = data_files(m.cache.path()).iter().map(|(_, n)| n).sum();
            assert_eq!(staged, 0, "a streamed file is not staged on disk");
        }
    }
    close(f).unwrap();
    let peak = proc_status_kib(pid, "VmHWM") << 10;

    let whole_put = proxy.requests().iter().any(|r| {
        r.method() == "PUT"
            && r.path() == key_path
            && !r.has_param("partNumber")
            && r.header("x-amz-copy-source").is_none()
    });
    let lines = || {
        proxy
            .requests()
            .iter()
            .map(|r| r.head.lines().next().unwrap_or("").to_owned())
            .collect::<Vec<_>>()
    };
    assert!(
        !whole_put,
        "a big sequential file is not sent in one PUT: {:#?}",
        lines()
    );
    let parts = part_uploads(&proxy);
    assert!(
        parts >= SIZE / (8 << 20),
        "uploaded in 8 MiB parts, but {parts} part uploads seen: {:#?}",
        lines()
    );
    let got = rt.block_on(m.get("big"));
    assert_eq!(got.len(), SIZE);
    for (i, c) in got.chunks(1 << 20).enumerate() {
        assert!(c == chunk(i).as_slice(), "MiB {i} of the object differs");
    }
    assert_eq!(
        rt.block_on(m.head("big")).unwrap().metadata["mode"],
        (libc::S_IFREG | 0o644).to_string()
    );
    eprintln!(
        "baseline RSS {} MiB, peak RSS {} MiB, limit {} MiB",
        baseline >> 20,
        peak >> 20,
        LIMIT >> 20
    );
    assert!(
        peak.saturating_sub(baseline) < LIMIT + ALLOWANCE,
        "peak RSS {peak} - idle RSS {baseline} exceeds --memory-limit {LIMIT} + {ALLOWANCE}"
    );
}

/// Shells and dd open the output, dup the descriptor and close the first one (a flush of
/// the empty file) before writing: the file still streams.
#[test]
fn a_file_flushed_empty_before_its_first_write_still_streams() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let m = mount_via(&rt, &proxy, "wf-dup", &["--part-size", "5M"]);
    let first = File::create(m.path("out")).unwrap();
    let mut f = first.try_clone().unwrap();
    close(first).unwrap();
    assert_eq!(
        rt.block_on(m.get("out")),
        b"",
        "the flush made the empty file"
    );
    let data = pattern(16 << 20, 12);
    for c in data.chunks(1 << 20) {
        f.write_all(c).unwrap();
    }
    let key_path = format!("/{}/out", m.bucket);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !proxy
        .requests()
        .iter()
        .any(|r| r.path() == key_path && r.is_part_upload())
    {
        assert!(Instant::now() < deadline, "no part went up while writing");
        std::thread::sleep(Duration::from_millis(50));
    }
    let staged: u64 = data_files(m.cache.path()).iter().map(|(_, n)| n).sum();
    assert_eq!(staged, 0, "nothing staged on disk");
    close(f).unwrap();
    assert!(rt.block_on(m.get("out")) == data);
}

/// Files created one after another in a directory made through the mount cost one PUT each:
/// the kernel's lookup of each new name is answered from the directory's kept listing.
#[test]
fn files_created_in_a_new_directory_cost_one_put_each() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let m = mount_via(&rt, &proxy, "wf-newdir", &[]);
    fs::create_dir(m.path("d")).unwrap();
    proxy.reset();
    for i in 0..20 {
        fs::write(m.path(&format!("d/f{i}")), format!("file {i}")).unwrap();
    }
    let lines: Vec<String> = proxy
        .requests()
        .iter()
        .map(|r| r.head.lines().next().unwrap_or("").to_owned())
        .collect();
    assert_eq!(lines.len(), 20, "one request per file: {lines:#?}");
    assert!(lines.iter().all(|l| l.starts_with("PUT ")), "{lines:#?}");
    for i in 0..20 {
        assert_eq!(
            rt.block_on(m.get(&format!("d/f{i}"))),
            format!("file {i}").as_bytes()
        );
    }
    // The kept listing neither invents nor loses names.
    assert!(!m.path("d/missing").exists());
    assert_eq!(fs::read_dir(m.path("d")).unwrap().count(), 20);
}

#[test]
fn patching_a_big_object_copies_unchanged_parts_server_side() {
    const SIZE: usize = 20 << 20;
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let m = mount_via(&rt, &proxy, "wf-patch", &[]);
    let mut model = pattern(SIZE, 3);
    rt.block_on(m.put("obj", &model, &[("mode", "33188")]));
    proxy.reset();
    let f = OpenOptions::new().write(true).open(m.path("obj")).unwrap();
    f.write_at(b"patched", 100).unwrap();
    close(f).unwrap();
    model[100..107].copy_from_slice(b"patched");

    let copies = proxy
        .requests()
        .iter()
        .filter(|r| r.method() == "PUT" && r.header("x-amz-copy-source").is_some())
        .count();
    assert!(
        copies >= 2,
        "unchanged parts are copied server-side ({copies} copies)"
    );
    let down = proxy.bytes_to_client();
    assert!(
        down < (SIZE as u64) / 2,
        "{down} bytes downloaded to patch 7 bytes of a {SIZE}-byte object"
    );
    assert!(rt.block_on(m.get("obj")) == model);
    assert_eq!(
        rt.block_on(m.head("obj")).unwrap().metadata["mode"],
        "33188"
    );
}

// ----- failures -----------------------------------------------------------------------------

#[test]
fn close_fails_with_eio_when_s3_is_down_and_unmount_uploads_the_kept_data() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let mut m = mount_via(&rt, &proxy, "wf-close-eio", &[]);
    fs::write(m.path("before"), b"acknowledged").unwrap();
    let data = pattern(3 << 20, 4);
    let mut f = File::create(m.path("doomed")).unwrap();
    f.write_all(&data).unwrap();

    proxy.set_down(true);
    let err = close(f).unwrap_err();
    assert_eq!(
        errno(&err),
        libc::EIO,
        "close reports the failed upload: {err}"
    );
    wait_until_quiet(&proxy);
    let copies = staged_copies(&m, "doomed");
    assert_eq!(copies.len(), 1, "one staging copy of the unsaved file");
    assert!(
        fs::read(&copies[0]).unwrap() == data,
        "the bytes are in the cache directory"
    );
    assert!(rt.block_on(m.head("doomed")).is_none());
    // The mount still has the file.
    assert_eq!(
        fs::metadata(m.path("doomed")).unwrap().len(),
        data.len() as u64
    );

    proxy.set_down(false);
    let (status, stderr) = m.stop();
    assert!(
        status.success(),
        "unmount flushed everything: {status}\n{stderr}"
    );
    assert!(
        stderr.contains(&*copies[0].to_string_lossy()),
        "the failure was logged with the staging file: {stderr}"
    );
    assert!(rt.block_on(m.get("doomed")) == data, "uploaded at unmount");
    assert_eq!(rt.block_on(m.get("before")), b"acknowledged");
}

/// A streamed file whose attributes changed while it was written is completed, then its
/// metadata rewritten by a server-side copy. When only that copy fails, the bytes are already
/// in S3 (and no longer in memory): close reports the failure, and the next flush rewrites the
/// attributes of that object. It never sends the content again from nothing.
#[test]
fn a_failed_attribute_rewrite_after_a_streamed_upload_keeps_the_content() {
    use std::os::unix::fs::PermissionsExt;
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let mut m = mount_via(&rt, &proxy, "wf-meta-copy", &["--part-size", "5M"]);
    let data = pattern(12 << 20, 12);
    let mut f = File::create(m.path("big")).unwrap();
    f.write_all(&data).unwrap();
    // A mode change after the upload began: the object's metadata must be rewritten at close.
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .unwrap();
    proxy.set_refuse_copies(true);
    let err = close(f).unwrap_err();
    assert_eq!(
        errno(&err),
        libc::EIO,
        "close reports the failed rewrite: {err}"
    );
    wait_until_quiet(&proxy);
    assert!(
        rt.block_on(m.get("big")) == data,
        "the content is in S3 although its attributes are not"
    );
    proxy.set_refuse_copies(false);
    // The next flush (here: the unmount) finishes the job with a copy.
    let (status, stderr) = m.stop();
    assert!(
        status.success(),
        "unmount flushed everything: {status}\n{stderr}"
    );
    assert!(
        rt.block_on(m.get("big")) == data,
        "the content survived the retry"
    );
    let mode: u32 = rt.block_on(m.head("big")).unwrap().metadata["mode"]
        .parse()
        .unwrap();
    assert_eq!(mode & 0o7777, 0o600, "the new mode was written");
}

/// A flush is bounded by --close-timeout (plus the time its bytes take at --min-throughput),
/// however many requests and retries it would need: against a server that never answers,
/// close fails with EIO in about that time, and the data is kept for the next flush.
#[test]
fn close_against_a_hung_server_gives_up_at_the_close_timeout_and_keeps_the_data() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    // Without the bound: 2 attempts of 5 s each per request, for the part in flight, then
    // the failed part again, then the tail: over 30 s. Errors only in the log: the harness
    // reads the mount's stderr at the end, and the warnings of every retry would fill the
    // pipe (and block the mount) before that.
    let mut m = mount_via_env(
        &rt,
        &proxy,
        "wf-close-bound",
        &[
            "--part-size",
            "5M",
            "--close-timeout",
            "2",
            "--min-throughput",
            "16M",
        ],
        &[("S3VOL_LOG_LEVEL", "error")],
    );
    let data = pattern(12 << 20, 13);
    let mut f = File::create(m.path("big")).unwrap();
    f.write_all(&data[..6 << 20]).unwrap();
    proxy.set_hang(true);
    f.write_all(&data[6 << 20..]).unwrap();
    let started = Instant::now();
    let err = close(f).unwrap_err();
    let took = started.elapsed();
    assert_eq!(errno(&err), libc::EIO, "close reports the failure: {err}");
    // The bound is 2 s + 12 MiB at 16 MiB/s, under 3 s; the margin is for a busy machine.
    // Without the bound the retries take over 20 s here.
    assert!(
        took < Duration::from_secs(12),
        "close took {took:?} against a hung server with --close-timeout 2"
    );
    proxy.set_hang(false);
    // The next flush sends what the bounded one kept. A part still in flight when it gave up
    // finishes its hung attempt first (5 s), and on a busy test server a racing part is now
    // and then answered with a 500: flushes are tried again, as an application retrying
    // fsync would (bounded: 20 tries, a second apart).
    let mut flushed = Err(io::Error::other("no flush tried"));
    for _ in 0..20 {
        flushed = OpenOptions::new()
            .write(true)
            .open(m.path("big"))
            .and_then(|f| f.sync_all());
        if flushed.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    if let Err(e) = flushed {
        let (_, stderr) = m.stop();
        panic!("no flush succeeded once the server answered again: {e}\n{stderr}");
    }
    let (status, stderr) = m.stop();
    assert!(
        status.success(),
        "unmount flushed everything: {status}\n{stderr}"
    );
    assert!(
        rt.block_on(m.get("big")) == data,
        "every byte reached S3 at the end"
    );
}

#[test]
fn kept_data_of_a_renamed_file_names_its_new_key() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let mut m = mount_via(&rt, &proxy, "wf-rename-kept", &[]);
    fs::create_dir(m.path("d")).unwrap();
    let mut f = File::create(m.path("d/old")).unwrap();
    f.write_all(b"one, ").unwrap();
    fs::rename(m.path("d/old"), m.path("d/new")).unwrap();
    fs::rename(m.path("d"), m.path("e")).unwrap();
    f.write_all(b"two").unwrap();
    proxy.set_down(true);
    assert_eq!(errno(&close(f).unwrap_err()), libc::EIO);
    wait_until_quiet(&proxy);
    let copies = staged_copies(&m, "e/new");
    assert_eq!(copies.len(), 1, "the .key file names the current key");
    // Renaming the directory uploaded the first five bytes; what is not in S3 is kept.
    let kept = fs::read(&copies[0]).unwrap();
    assert_eq!(&kept[5..], b"two");

    proxy.set_down(false);
    let (status, stderr) = m.stop();
    assert!(status.success(), "{stderr}");
    assert_eq!(rt.block_on(m.get("e/new")), b"one, two");
    assert!(rt.block_on(m.head("d/old")).is_none());
    assert!(rt.block_on(m.head("d/new")).is_none());
}

/// An outage in the middle of a streamed write is not the application's problem: its writes
/// are held in memory (failed parts keep their bytes and are retried), and close succeeds once
/// S3 is back.
#[test]
fn an_outage_while_streaming_fails_neither_writes_nor_a_later_close() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let m = mount_via(&rt, &proxy, "wf-stream-outage", &["--part-size", "5M"]);
    let data = pattern(20 << 20, 10);
    let mut f = File::create(m.path("big")).unwrap();
    let mut chunks = data.chunks(1 << 20);
    for c in chunks.by_ref().take(4) {
        f.write_all(c).unwrap();
    }
    // The upload starts (or its parts go up) while S3 is away.
    proxy.set_down(true);
    for (i, c) in chunks.by_ref().take(8).enumerate() {
        f.write_all(c)
            .unwrap_or_else(|e| panic!("write of MiB {} during the outage: {e}", i + 4));
    }
    wait_until_quiet(&proxy);
    proxy.set_down(false);
    for c in chunks {
        f.write_all(c).unwrap();
    }
    close(f).unwrap();
    assert!(rt.block_on(m.get("big")) == data);
}

/// A part that failed in the background does not make close fail once S3 works again: the
/// part keeps its bytes until it is in.
#[test]
fn a_failed_part_upload_does_not_fail_close_once_s3_is_back() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let m = mount_via(&rt, &proxy, "wf-part-fail", &["--part-size", "5M"]);
    let data = pattern(12 << 20, 11);
    proxy.set_refuse_parts(true);
    let mut f = File::create(m.path("big")).unwrap();
    for c in data.chunks(1 << 20) {
        f.write_all(c).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.refused() == 0 {
        assert!(Instant::now() < deadline, "no part upload was attempted");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_until_quiet(&proxy);
    proxy.set_refuse_parts(false);
    close(f).unwrap();
    assert!(rt.block_on(m.get("big")) == data);
}

/// Part uploads the server answers with `500 InternalError` are sent again (by the S3 client's
/// retries and the part's own): the application sees neither an error nor a changed byte.
#[test]
fn parts_answered_with_http_500_are_sent_again_and_nothing_is_lost() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let m = mount_via(&rt, &proxy, "wf-500", &["--part-size", "5M"]);
    let data = pattern(23 << 20, 21);
    proxy.fail_next_parts(6);
    let mut f = File::create(m.path("big")).unwrap();
    for c in data.chunks(1 << 20) {
        f.write_all(c).unwrap();
    }
    close(f).unwrap();
    assert_eq!(proxy.failed_with_500(), 6, "every injected failure was hit");
    assert!(rt.block_on(m.get("big")) == data);
}

#[test]
fn unmount_reports_what_it_could_not_upload_and_keeps_it() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let mut m = mount_via(&rt, &proxy, "wf-unmount-fail", &[]);
    let data = pattern(200_000, 5);
    let mut f = File::create(m.path("lost")).unwrap();
    f.write_all(&data).unwrap();
    proxy.set_down(true);
    assert_eq!(errno(&close(f).unwrap_err()), libc::EIO);

    let (status, stderr) = m.stop();
    assert!(!status.success(), "exit status says data was not flushed");
    assert!(
        stderr.contains("could not be uploaded") && stderr.contains("lost"),
        "stderr names what was not flushed: {stderr}"
    );
    let copies = staged_copies(&m, "lost");
    assert_eq!(copies.len(), 1, "the data stays in the cache directory");
    assert!(fs::read(&copies[0]).unwrap() == data);
    assert!(rt.block_on(m.head("lost")).is_none());
}

#[test]
fn fsync_fails_with_eio_while_s3_is_down_and_succeeds_once_it_is_back() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let m = mount_via(&rt, &proxy, "wf-fsync-eio", &[]);
    let mut f = File::create(m.path("journal")).unwrap();
    f.write_all(b"first").unwrap();
    proxy.set_down(true);
    assert_eq!(errno(&f.sync_all().unwrap_err()), libc::EIO);
    // Writing goes on locally while S3 is away.
    f.write_all(b" second").unwrap();
    proxy.set_down(false);
    f.sync_all().unwrap();
    assert_eq!(rt.block_on(m.get("journal")), b"first second");
    close(f).unwrap();
    assert_eq!(rt.block_on(m.get("journal")), b"first second");
}

#[test]
fn sigterm_uploads_what_close_could_not_then_exits() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let mut m = mount_via(&rt, &proxy, "wf-sigterm", &[]);
    let data = pattern(1 << 20, 6);
    let mut f = File::create(m.path("pending")).unwrap();
    f.write_all(&data).unwrap();
    proxy.set_down(true);
    assert_eq!(errno(&close(f).unwrap_err()), libc::EIO);
    wait_until_quiet(&proxy);
    assert!(rt.block_on(m.head("pending")).is_none());

    proxy.set_down(false);
    sigterm(&m);
    let status = wait_for_exit(&mut m, Duration::from_secs(60));
    assert!(status.success(), "{status}");
    assert!(!is_mounted(m.mnt.path()), "SIGTERM unmounts");
    assert!(rt.block_on(m.get("pending")) == data);
}

#[test]
fn sigterm_uploads_files_still_open() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let m = mount_via(&rt, &proxy, "wf-sigterm-open", &[]);
    let data = pattern(300_000, 7);
    let mut f = File::create(m.path("open")).unwrap();
    f.write_all(&data).unwrap();
    sigterm(&m);
    let deadline = Instant::now() + Duration::from_secs(30);
    while rt.block_on(m.head("open")).is_none() {
        assert!(
            Instant::now() < deadline,
            "SIGTERM did not upload the open file"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(rt.block_on(m.get("open")) == data);
    // The open file keeps the mount busy: the process detaches it and exits anyway.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut m = m;
    let child = m.child.as_mut().expect("mounted");
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the mount process did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!support::is_mounted(m.mnt.path()), "the mount is gone");
    drop(f);
}

/// SIGKILL gives the process no chance to upload: what was written and not yet uploaded is
/// in the cache directory (the written ranges of an edited object, a new staged file whole),
/// named by its `.key` companion, and S3 still has the old versions (docs/SEMANTICS.md,
/// "After a crash").
#[test]
fn after_sigkill_the_bytes_not_uploaded_are_in_the_cache_directory() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let mut m = mount_via(&rt, &proxy, "wf-sigkill", &[]);
    let original = pattern(300_000, 20);
    rt.block_on(m.put("edited", &original, &[]));
    let edited = OpenOptions::new()
        .write(true)
        .open(m.path("edited"))
        .unwrap();
    edited.write_all_at(b"patched", 100_000).unwrap();
    // Written out of order, so staged on disk rather than streamed.
    let new = File::create(m.path("new")).unwrap();
    new.write_all_at(b" world", 5).unwrap();
    new.write_all_at(b"hello", 0).unwrap();

    // SAFETY: sending a signal to our own child process.
    assert_eq!(
        unsafe { libc::kill(m.pid() as libc::pid_t, libc::SIGKILL) },
        0
    );
    wait_for_exit(&mut m, Duration::from_secs(30));

    let copies = staged_copies(&m, "edited");
    assert_eq!(copies.len(), 1, "the edited object's staging file");
    let kept = fs::read(&copies[0]).unwrap();
    assert_eq!(
        kept.len(),
        original.len(),
        "the staging file has the file's size"
    );
    assert_eq!(&kept[100_000..100_007], b"patched");
    let copies = staged_copies(&m, "new");
    assert_eq!(copies.len(), 1, "the new file's staging file");
    assert_eq!(fs::read(&copies[0]).unwrap(), b"hello world");

    assert!(
        rt.block_on(m.get("edited")) == original,
        "S3 keeps the old version"
    );
    assert!(rt.block_on(m.head("new")).is_none());
    drop((edited, new));
}

// ----- the cache budget ------------------------------------------------------------------------

#[test]
fn writers_wait_when_dirty_data_fills_the_cache_budget() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let m = mount_via(&rt, &proxy, "wf-budget", &["--cache-size", "8M"]);
    // Written out of order, so staged on disk (sequential writers stream from memory).
    let a_data = pattern(6 << 20, 8);
    let a = File::create(m.path("a")).unwrap();
    a.write_all_at(&a_data[1 << 20..], 1 << 20).unwrap();
    a.write_all_at(&a_data[..1 << 20], 0).unwrap();

    // B needs 4 MiB more while A holds 6 of the 8 MiB: B must wait for A.
    let written = Arc::new(AtomicU64::new(0));
    let (path_b, w) = (m.path("b"), written.clone());
    let b = std::thread::spawn(move || {
        let b = File::create(path_b).unwrap();
        for i in [1, 2, 3, 0] {
            b.write_all_at(&pattern(1 << 20, 100 + i), i << 20).unwrap();
            w.fetch_add(1 << 20, Ordering::SeqCst);
        }
        close(b)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !b.is_finished(),
        "B went over the budget instead of waiting"
    );
    let staged: u64 = data_files(m.cache.path()).iter().map(|(_, n)| n).sum();
    assert!(
        staged <= 8 << 20,
        "{staged} bytes staged with an 8 MiB budget"
    );
    assert!(written.load(Ordering::SeqCst) < 4 << 20);

    close(a).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !b.is_finished() {
        assert!(
            Instant::now() < deadline,
            "B still waiting after A was uploaded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    b.join().unwrap().unwrap();
    assert!(rt.block_on(m.get("a")) == a_data);
    let b_data: Vec<u8> = (0..4).flat_map(|i| pattern(1 << 20, 100 + i)).collect();
    assert!(rt.block_on(m.get("b")) == b_data);
}
