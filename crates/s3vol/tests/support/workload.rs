//! What applications do on a volume whose serving process is killed again and again: a
//! metadata loop (create, write, rename, unlink, mkdir, `ls -l`, read back), a writer that
//! keeps one file open across every kill, and a reader of an existing object through a handle
//! opened before the first kill. Each records the latency of every call and every error, so a
//! test can require "no error" and report the stalls. Shared by the `mount --supervise` and
//! the CSI failover tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::pattern;

/// Latencies of application calls, and the errors they met.
#[derive(Default)]
pub struct Record {
    pub latencies: Vec<Duration>,
    pub errors: Vec<String>,
    /// The slowest call and what it was.
    pub slowest: Option<(Duration, String)>,
}

impl Record {
    /// Adds what `other` recorded.
    pub fn merge(&mut self, other: Record) {
        self.latencies.extend(other.latencies);
        self.errors.extend(other.errors);
        if let Some((d, what)) = other.slowest
            && self.slowest.as_ref().is_none_or(|(worst, _)| d > *worst)
        {
            self.slowest = Some((d, what));
        }
    }

    pub fn timed<T>(&mut self, what: &str, f: impl FnOnce() -> std::io::Result<T>) -> Option<T> {
        let started = std::time::SystemTime::now();
        let t = Instant::now();
        let r = f();
        let took = t.elapsed();
        self.latencies.push(took);
        if self.slowest.as_ref().is_none_or(|(d, _)| took > *d) {
            // When it started (Unix seconds), to find it in the logs.
            let at = started
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            self.slowest = Some((took, format!("{what}, started at {at:.3}")));
        }
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.errors.push(format!("{what}: {e}"));
                None
            }
        }
    }
}

/// create / write / rename / unlink / mkdir / ls -l, over and over, until `stop`. Returns
/// the names that must exist at the end (relative keys) and their content.
pub fn metadata_loop(
    root: PathBuf,
    stop: Arc<AtomicBool>,
    rec: Arc<Mutex<Record>>,
) -> Vec<(String, Vec<u8>)> {
    let mut expect = Vec::new();
    let mut i = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let mut r = Record::default();
        let dir = root.join(format!("d{i}"));
        let body = pattern(1000 + (i as usize % 7) * 3000, i);
        r.timed("mkdir", || fs::create_dir(&dir));
        r.timed("create+write+close", || {
            let mut f = File::create(dir.join("f"))?;
            f.write_all(&body)
        });
        r.timed("rename", || fs::rename(dir.join("f"), dir.join("g")));
        r.timed("create scratch", || {
            fs::write(root.join(format!("scratch{i}")), b"x")
        });
        r.timed("unlink", || {
            fs::remove_file(root.join(format!("scratch{i}")))
        });
        // ls -l: every entry's attributes.
        r.timed("ls -l", || {
            for e in fs::read_dir(&root)? {
                e?.metadata()?;
            }
            Ok(())
        });
        if let Some(got) = r.timed("read back", || fs::read(dir.join("g")))
            && got != body
        {
            r.errors.push(format!(
                "d{i}/g reads back {} bytes, not what was written",
                got.len()
            ));
        }
        expect.push((format!("d{i}/g"), body));
        rec.lock().unwrap().merge(r);
        i += 1;
    }
    expect
}

/// Appends to one file kept open across every kill, reading back through a second handle
/// what it wrote. Returns the whole content written.
pub fn open_writer(path: PathBuf, stop: Arc<AtomicBool>, rec: Arc<Mutex<Record>>) -> Vec<u8> {
    let mut written = Vec::new();
    let mut r = Record::default();
    let Some(mut f) = r.timed("open writer", || File::create(&path)) else {
        rec.lock().unwrap().errors.extend(r.errors);
        return written;
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let chunk = pattern(16 * 1024 + (n as usize % 5) * 1000, 1_000_000 + n);
        if r.timed("write (open across kills)", || f.write_all(&chunk))
            .is_some()
        {
            written.extend_from_slice(&chunk);
        }
        if n % 8 == 7 {
            // Readers in the same mount see every byte written so far.
            let at = written.len().saturating_sub(chunk.len());
            let got = r.timed("pread of what was written", || {
                let g = File::open(&path)?;
                let mut buf = vec![0; chunk.len()];
                g.read_exact_at(&mut buf, at as u64)?;
                Ok(buf)
            });
            if got.as_deref().is_some_and(|g| g != chunk) {
                r.errors
                    .push(format!("bytes at {at} differ from what was written"));
            }
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    r.timed("close of the file open across kills", || {
        f.flush()?;
        f.sync_all()
    });
    drop(f);
    rec.lock().unwrap().merge(r);
    written
}

/// Reads one object at scattered offsets through a handle opened before the first kill.
pub fn open_reader(path: PathBuf, want: Vec<u8>, stop: Arc<AtomicBool>, rec: Arc<Mutex<Record>>) {
    let mut r = Record::default();
    let Some(mut f) = r.timed("open reader", || File::open(&path)) else {
        rec.lock().unwrap().errors.extend(r.errors);
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let at = (n * 7919 * 13) % (want.len() - 4096);
        let got = r.timed("read (open across kills)", || {
            f.seek(SeekFrom::Start(at as u64))?;
            let mut buf = vec![0; 4096];
            f.read_exact(&mut buf)?;
            Ok(buf)
        });
        if got.as_deref().is_some_and(|g| g != &want[at..at + 4096]) {
            r.errors.push(format!("read at {at} returned other bytes"));
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(3));
    }
    rec.lock().unwrap().merge(r);
}

/// The `p`-th quantile (0..=1) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Every key in `bucket`, all pages.
pub async fn all_keys(
    store: &dyn s3vol_s3::ObjectStore,
    bucket: &s3vol_s3::BucketName,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut token = None;
    loop {
        let page = store
            .list_objects(
                bucket,
                &s3vol_s3::ListRequest {
                    continuation_token: token.clone(),
                    ..s3vol_s3::ListRequest::default()
                },
            )
            .await
            .unwrap();
        out.extend(page.objects.into_iter().map(|o| o.key));
        match page.next_continuation_token {
            Some(t) => token = Some(t),
            None => return out,
        }
    }
}

/// The keys the metadata loop leaves (each `dN/g` and its directory `dN/`), plus `also`.
pub fn expected_keys(expect: &[(String, Vec<u8>)], also: &[&str]) -> BTreeSet<String> {
    expect
        .iter()
        .flat_map(|(k, _)| {
            let dir = k.trim_end_matches("/g").to_owned();
            [k.clone(), format!("{dir}/")]
        })
        .chain(also.iter().map(|s| s.to_string()))
        .collect()
}

/// An object's bytes.
pub async fn get(
    store: &dyn s3vol_s3::ObjectStore,
    bucket: &s3vol_s3::BucketName,
    key: &str,
) -> Vec<u8> {
    use futures::TryStreamExt;
    let got = store
        .get_object(bucket, key, None, None)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"));
    let chunks: Vec<bytes::Bytes> = got.body.try_collect().await.unwrap();
    chunks.concat()
}

/// Waits (bounded, 30 s) until `log()` holds `line` at least `n` times: the line each
/// successor logs as it takes a connection over. A failover test kills only a process that
/// serves: one killed before it is ready counts as a start that failed, and after three in a
/// row its supervisor rightly stops replacing it (a loaded machine can take longer than the
/// pause between kills to start a debug build).
pub fn wait_for_takeovers(log: impl Fn() -> String, line: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = log();
        if text.matches(line).count() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "successor {n} did not take over within 30 s; log:\n{}",
            text.get(text.len().saturating_sub(20_000)..)
                .unwrap_or(&text)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The fio jobs of [`fio_loop`]: a sequential and a random writer, each writing its file
/// (`seq`, `rand`) with a checksum in every block, closing it with fsync, then
/// reading it back and checking every block (`--do_verify`). `extra` adds options to all.
fn fio(dir: &std::path::Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new("fio");
    cmd.arg(format!("--directory={}", dir.display()))
        .args([
            "--ioengine=psync",
            "--verify=crc32c",
            "--do_verify=1",
            "--fsync_on_close=1",
            // No verify-state files left in the working directory.
            "--verify_state_save=0",
            "--group_reporting",
            "--filename_format=$jobname",
            "--name=seq",
            "--rw=write",
            "--bs=128k",
            "--size=4m",
            "--name=rand",
            "--rw=randwrite",
            "--bs=4k",
            "--size=1m",
        ])
        .args(extra)
        .stdin(std::process::Stdio::null());
    cmd
}

/// The files [`fio_loop`] leaves, relative to its directory.
pub const FIO_FILES: [&str; 2] = ["seq", "rand"];

/// Runs the [`fio`] jobs in `dir` again and again until `stop` (so files are open, being
/// written or being verified, across every event). A run that fails — an error from any
/// call, or a block that reads back other than written — is an error in `rec` with fio's
/// words. Returns the number of runs.
pub fn fio_loop(dir: PathBuf, stop: Arc<AtomicBool>, rec: Arc<Mutex<Record>>) -> usize {
    fs::create_dir_all(&dir).unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut runs = 0;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let out = fio(&dir, &[])
            .output()
            .expect("fio runs (scripts/test.sh installs it)");
        if !out.status.success() {
            rec.lock().unwrap().errors.push(format!(
                "fio run {runs}: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        runs += 1;
    }
    runs
}

/// Checks the files of [`fio_loop`] in `dir` (a copy of what the bucket holds) block by block
/// with fio's own checksums; panics with fio's words when one differs.
pub fn fio_verify(dir: &std::path::Path) {
    let out = fio(dir, &["--verify_only"]).output().unwrap();
    assert!(
        out.status.success(),
        "the fio files in the bucket do not verify: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How many times a failover test repeats its events: `S3VOL_FAILOVER_ROUNDS` (the long runs
/// of bench/soak-csi-failover.sh), else `default`.
pub fn rounds(default: usize) -> usize {
    std::env::var("S3VOL_FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}
