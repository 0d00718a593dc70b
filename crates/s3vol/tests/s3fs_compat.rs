//! What s3vol writes, s3fs reads the same, and the other way round: a real s3fs mount of the
//! same bucket on the test server.
//!
//! Needs the `s3fs` program (Debian package `s3fs`). When it is missing and this runs as root,
//! the test installs it with apt-get; it skips, saying so, only if it cannot be installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mount.rs"]
mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use s3vol_s3::testing;
use support::{Mounted, is_mounted};

/// Whether `s3fs` can be run, installing it with apt-get when missing (as root).
fn have_s3fs() -> bool {
    let found = || {
        Command::new("s3fs")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if found() {
        return true;
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", "s3fs"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    found()
}

/// s3fs serving `bucket` at `mnt` in the foreground; unmounted and stopped when dropped.
struct S3fs {
    child: Child,
    mnt: tempfile::TempDir,
    _passwd: tempfile::NamedTempFile,
}

impl S3fs {
    fn mount(bucket: &str) -> Self {
        let keys = testing::credentials();
        let passwd = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            passwd.path(),
            format!("{}:{}\n", keys.access_key_id, keys.secret_access_key),
        )
        .unwrap();
        std::fs::set_permissions(passwd.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        let mnt = tempfile::tempdir().unwrap();
        let child = Command::new("s3fs")
            .arg(bucket)
            .arg(mnt.path())
            .arg("-f")
            .arg("-o")
            .arg(format!(
                "passwd_file={},url={},use_path_request_style,endpoint=us-east-1,stat_cache_expire=1",
                passwd.path().display(),
                testing::endpoint()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3fs");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(mnt.path()) {
            assert!(Instant::now() < deadline, "s3fs did not mount within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            mnt,
            _passwd: passwd,
        }
    }

    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.mnt.path().join(rel)
    }
}

impl Drop for S3fs {
    fn drop(&mut self) {
        support::unmount(self.mnt.path());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_mtime(p: &Path, secs: i64, nanos: i64) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let times = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nanos,
        },
    ];
    // SAFETY: a valid C string and two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(rc, 0, "utimensat: {}", std::io::Error::last_os_error());
}

/// Sub-second times survive a round trip through s3fs, both ways: s3vol writes the fraction
/// as s3fs does (nine digits, which s3fs reads as nanoseconds) and reads s3fs's.
#[tokio::test(flavor = "multi_thread")]
async fn sub_second_times_survive_s3fs_both_ways() {
    if !have_s3fs() {
        eprintln!("SKIPPED: s3fs is not installed and cannot be (apt-get install s3fs)");
        return;
    }
    let m = Mounted::new("s3fs-times", "", &["--metadata-ttl", "0"]).await;
    let bucket = m.bucket.to_string();

    // s3vol → s3fs.
    std::fs::write(m.path("from-s3vol"), b"v").unwrap();
    // A quarter second: written as `.25`, s3fs would read 25 ns.
    set_mtime(&m.path("from-s3vol"), 1_600_000_000, 250_000_000);
    let md = m.head("from-s3vol").await.unwrap().metadata;
    assert_eq!(md["mtime"], "1600000000.250000000");
    let s3fs = tokio::task::spawn_blocking(move || S3fs::mount(&bucket))
        .await
        .unwrap();
    let st = std::fs::metadata(s3fs.path("from-s3vol")).unwrap();
    assert_eq!(
        (st.mtime(), st.mtime_nsec()),
        (1_600_000_000, 250_000_000),
        "s3fs reads what s3vol wrote"
    );

    // s3fs → s3vol.
    std::fs::write(s3fs.path("from-s3fs"), b"f").unwrap();
    set_mtime(&s3fs.path("from-s3fs"), 1_500_000_000, 123_456_789);
    let deadline = Instant::now() + Duration::from_secs(30);
    let stored = loop {
        let md = m.head("from-s3fs").await.map(|i| i.metadata);
        if let Some(t) = md.as_ref().and_then(|md| md.get("mtime"))
            && t.starts_with("1500000000")
        {
            break t.clone();
        }
        assert!(
            Instant::now() < deadline,
            "s3fs did not store the time: {md:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let st = std::fs::metadata(m.path("from-s3fs")).unwrap();
    let expected_nanos = if stored.contains('.') { 123_456_789 } else { 0 };
    assert_eq!(
        (st.mtime(), st.mtime_nsec()),
        (1_500_000_000, expected_nanos),
        "s3vol reads what s3fs wrote ({stored})"
    );
    // And s3fs reads it back as it wrote it, through s3vol's rewrite of the metadata.
    std::fs::set_permissions(m.path("from-s3fs"), std::fs::Permissions::from_mode(0o600)).unwrap();
    drop(s3fs);
    let bucket = m.bucket.to_string();
    let s3fs = tokio::task::spawn_blocking(move || S3fs::mount(&bucket))
        .await
        .unwrap();
    let st = std::fs::metadata(s3fs.path("from-s3fs")).unwrap();
    assert_eq!(
        (st.mtime(), st.mtime_nsec()),
        (1_500_000_000, expected_nanos)
    );
    assert_eq!(st.mode() & 0o7777, 0o600);
}
