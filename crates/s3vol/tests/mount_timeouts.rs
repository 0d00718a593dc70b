//! How long a mount waits for an S3 that stops answering, and how soon it carries on when S3
//! answers again (see the timeouts in docs/configuration.md).
//!
//! The mounts talk to the test server through the test's proxy (`support/proxy.rs`), which can
//! hang: it accepts connections and reads requests but never answers them, and the requests so
//! caught stay unanswered after it recovers, as across a network partition. The bounds asserted
//! are loose (tens of seconds): they tell a per-request timeout of seconds from the two minutes
//! one attempt used to wait, not how fast anything is.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/mount.rs"]
mod support;

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use proxy::Proxy;
use s3vol_s3::testing;
use support::{Mounted, close, pattern, rt, s3vol};
use tokio::runtime::Runtime;

/// Mounts a new bucket through `proxy` with the default attempts and timeouts.
fn mount_via(rt: &Runtime, proxy: &Proxy, tag: &str, extra: &[&str]) -> Mounted {
    let store = rt.block_on(support::store());
    let bucket = testing::unique_bucket(tag);
    rt.block_on(store.create_bucket(&bucket)).unwrap();
    let mnt = tempfile::Builder::new()
        .prefix("s3vol-mnt-")
        .tempdir()
        .unwrap();
    let cache = tempfile::Builder::new()
        .prefix("s3vol-cache-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap();
    let mut child = s3vol()
        .arg("mount")
        .arg(format!("{bucket}/"))
        .arg(mnt.path())
        .args(["--endpoint-url", &proxy.url(), "--region", "us-east-1"])
        .arg("--force-path-style")
        .arg("--cache-dir")
        .arg(cache.path())
        .arg("-f")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env("S3VOL_LOG_LEVEL", "warn")
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

/// Writes `data` to `path` and closes it on a thread; the result arrives on the channel.
fn write_in_background(path: PathBuf, data: Vec<u8>) -> mpsc::Receiver<io::Result<()>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = File::create(&path).and_then(|mut f| {
            f.write_all(&data)?;
            close(f)
        });
        let _ = tx.send(result);
    });
    rx
}

/// Hangs S3 for `hang` while a writer writes `data`, then lets S3 answer again; returns how
/// long after that the writer's close returned, having checked it succeeded and the object
/// holds `data`.
fn write_through_a_hang(m: &Mounted, proxy: &Proxy, rt: &Runtime, data: Vec<u8>) -> Duration {
    let hang = Duration::from_secs(8);
    proxy.set_hang(true);
    let done = write_in_background(m.path("f"), data.clone());
    std::thread::sleep(hang);
    assert!(proxy.hung() > 0, "nothing reached the hung server");
    proxy.set_hang(false);
    let recovered = Instant::now();
    let result = done
        .recv_timeout(Duration::from_secs(120))
        .expect("the writer was still blocked 120 s after S3 answered again");
    let after = recovered.elapsed();
    eprintln!("the writer finished {after:?} after S3 answered again");
    result.expect("close after S3 came back");
    assert!(
        rt.block_on(m.get("f")) == data,
        "the object does not hold what was written"
    );
    after
}

#[test]
fn a_small_file_closed_while_s3_hangs_is_uploaded_soon_after_s3_answers_again() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let m = mount_via(&rt, &proxy, "hang-small", &[]);
    let after = write_through_a_hang(&m, &proxy, &rt, pattern(300 << 10, 1));
    // One attempt of a small PUT waits seconds, not the 120 s it used to.
    assert!(
        after < Duration::from_secs(45),
        "close returned {after:?} after S3 answered again"
    );
}

#[test]
fn writers_blocked_on_parts_while_s3_hangs_resume_soon_after_s3_answers_again() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    // 16M of memory holds three 5M parts: the writer waits for the hung uploads.
    let m = mount_via(
        &rt,
        &proxy,
        "hang-parts",
        &["--part-size", "5M", "--memory-limit", "16M"],
    );
    let after = write_through_a_hang(&m, &proxy, &rt, pattern(23 << 20, 2));
    assert!(
        after < Duration::from_secs(60),
        "the writer finished {after:?} after S3 answered again"
    );
}

#[test]
fn a_close_against_an_s3_that_never_answers_fails_within_its_bound() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let m = mount_via(
        &rt,
        &proxy,
        "hang-forever",
        &["--max-attempts", "2", "--request-timeout", "2"],
    );
    let path = m.path("f");
    // Looked up and created while S3 answers; only the upload at close meets the hang.
    let mut f = File::create(&path).unwrap();
    f.write_all(&pattern(100 << 10, 3)).unwrap();
    proxy.set_hang(true);
    let started = Instant::now();
    let result = close(f);
    let took = started.elapsed();
    assert_eq!(
        result.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::EIO)),
        "close against a hung S3: {result:?}"
    );
    // Two attempts of 2 s (plus the size at 1 MiB/s) and a backoff, however busy the machine.
    assert!(took < Duration::from_secs(30), "close took {took:?}");
    proxy.set_hang(false);
}
