//! `s3vol mount`, read side: namespace, attributes and reads through a real FUSE mount on the
//! test S3 server. Objects are put through the S3 API and inspected with real syscalls.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mount.rs"]
mod support;

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, PermissionsExt};
use std::process::Stdio;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use s3vol_s3::{PutOptions, testing};
use support::{Mounted, errno, pattern, s3vol, server_args};

#[tokio::test(flavor = "multi_thread")]
async fn objects_show_their_type_size_mode_owner_and_time() {
    let m = Mounted::new(
        "attrs",
        "",
        &[
            "--uid",
            "4242",
            "--gid",
            "4343",
            "--file-mode",
            "0640",
            "--dir-mode",
            "0750",
        ],
    )
    .await;
    m.put("plain.txt", b"no metadata", &[]).await;
    m.put(
        "meta.txt",
        b"with metadata",
        &[
            ("mode", "33261"),
            ("uid", "1000"),
            ("gid", "1001"),
            ("mtime", "1700000000.5"),
        ],
    )
    .await;
    m.put(
        "link",
        b"plain.txt",
        &[("mode", &(libc::S_IFLNK | 0o777).to_string())],
    )
    .await;
    m.put(
        "marker/",
        b"",
        &[("mode", "16832"), ("uid", "7"), ("gid", "8")],
    )
    .await;
    m.put("implicit/child", b"x", &[]).await;
    m.put("legacy_$folder$", b"", &[]).await;

    let plain = std::fs::symlink_metadata(m.path("plain.txt")).unwrap();
    assert!(plain.is_file());
    assert_eq!(
        (plain.len(), plain.mode() & 0o7777, plain.uid(), plain.gid()),
        (11, 0o640, 4242, 4343)
    );
    let age = std::time::SystemTime::now()
        .duration_since(plain.modified().unwrap())
        .unwrap_or_default();
    assert!(
        age < Duration::from_secs(600),
        "mtime of an object without metadata is its Last-Modified"
    );

    let meta = std::fs::symlink_metadata(m.path("meta.txt")).unwrap();
    assert_eq!(
        (meta.len(), meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (13, 0o755, 1000, 1001)
    );
    assert_eq!(
        meta.modified().unwrap(),
        UNIX_EPOCH + Duration::from_millis(1_700_000_000_500)
    );

    let link = std::fs::symlink_metadata(m.path("link")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!(
        std::fs::read_link(m.path("link")).unwrap().to_str(),
        Some("plain.txt")
    );
    assert_eq!(
        std::fs::read(m.path("link")).unwrap(),
        b"no metadata",
        "the symlink resolves"
    );

    let marker = std::fs::metadata(m.path("marker")).unwrap();
    assert!(marker.is_dir());
    assert_eq!(
        (marker.mode() & 0o7777, marker.uid(), marker.gid()),
        (0o700, 7, 8)
    );
    let implicit = std::fs::metadata(m.path("implicit")).unwrap();
    assert!(implicit.is_dir());
    assert_eq!((implicit.mode() & 0o7777, implicit.uid()), (0o750, 4242));
    assert!(
        std::fs::metadata(m.path("legacy")).unwrap().is_dir(),
        "dir_$folder$ is a directory"
    );
    assert_eq!(std::fs::read(m.path("implicit/child")).unwrap(), b"x");

    let names: BTreeSet<String> = std::fs::read_dir(m.mnt.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let expected: BTreeSet<String> = [
        "plain.txt",
        "meta.txt",
        "link",
        "marker",
        "implicit",
        "legacy",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(names, expected);
    // The marker object itself is not an entry of its own directory.
    assert_eq!(std::fs::read_dir(m.path("marker")).unwrap().count(), 0);
    let err = std::fs::metadata(m.path("missing")).unwrap_err();
    assert_eq!(errno(&err), libc::ENOENT);
}

#[tokio::test(flavor = "multi_thread")]
async fn awkward_keys_are_handled_predictably() {
    let m = Mounted::new("awkward", "", &[]).await;
    let long = "n".repeat(300);
    m.put("a//b", b"double slash", &[]).await;
    m.put(&long, b"long name", &[]).await;
    m.put("same", b"file", &[]).await;
    m.put("same/inner", b"dir child", &[]).await;
    m.put("ok", b"fine", &[]).await;
    let names: BTreeSet<String> = std::fs::read_dir(m.mnt.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    // `a//b` lives under an empty name and a 300-byte name cannot be a file name: both hidden.
    assert_eq!(
        names,
        ["a", "ok", "same"].iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(
        std::fs::read_dir(m.path("a")).unwrap().count(),
        0,
        "the empty segment is not listed"
    );
    // A file and a directory with the same name: the directory wins.
    assert!(std::fs::metadata(m.path("same")).unwrap().is_dir());
    assert_eq!(std::fs::read(m.path("same/inner")).unwrap(), b"dir child");
    let err = std::fs::metadata(m.path(&long)).unwrap_err();
    assert_eq!(errno(&err), libc::ENAMETOOLONG);
    assert_eq!(std::fs::read(m.path("ok")).unwrap(), b"fine");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prefix_mount_sees_only_its_prefix() {
    let store = support::store().await;
    let bucket = testing::unique_bucket("prefix");
    store.create_bucket(&bucket).await.unwrap();
    for (k, v) in [
        ("team-a/data.csv", "a"),
        ("team-a/sub/x", "x"),
        ("team-b/secret", "b"),
        ("top", "t"),
    ] {
        store
            .put_object(&bucket, k, Bytes::from(v), &PutOptions::default())
            .await
            .unwrap();
    }
    let m = Mounted::on(store, bucket, "team-a/", &[]);
    let names: BTreeSet<String> = std::fs::read_dir(m.mnt.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        ["data.csv", "sub"].iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(std::fs::read(m.path("data.csv")).unwrap(), b"a");
    assert_eq!(
        errno(&std::fs::metadata(m.path("secret")).unwrap_err()),
        libc::ENOENT
    );
    assert_eq!(
        errno(&std::fs::metadata(m.path("../team-b/secret")).unwrap_err()),
        libc::ENOENT
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_directory_lists_completely() {
    const N: usize = 10_000;
    let m = Mounted::new("bigdir", "", &[]).await;
    let store = m.store.clone();
    let bucket = m.bucket.clone();
    futures::stream::iter(0..N)
        .map(|i| {
            let store = store.clone();
            let bucket = bucket.clone();
            async move {
                let meta = if i % 2 == 0 {
                    vec![("mode".to_string(), "33188".to_string())]
                } else {
                    vec![]
                };
                let options = PutOptions {
                    metadata: meta.into_iter().collect(),
                    ..PutOptions::default()
                };
                store
                    .put_object(
                        &bucket,
                        &format!("d/f{i:05}"),
                        Bytes::from(vec![b'x'; i % 7]),
                        &options,
                    )
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let dir = m.path("d");
    let listed = tokio::task::spawn_blocking(move || {
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(listed.len(), N, "every entry is listed once");
    let names: BTreeSet<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), N, "no duplicates");
    for (name, len) in &listed {
        let i: usize = name[1..].parse().unwrap();
        assert_eq!(*len, (i % 7) as u64, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_big_object_reads_back_identical_sequentially_and_at_random_offsets() {
    // CI keeps objects at most 100 MiB (the test server copies whole objects for ranged GETs);
    // bench/ reads 1 GiB against Garage.
    const SIZE: usize = 64 << 20;
    let m = Mounted::new("bigread", "", &["--memory-limit", "128M"]).await;
    let data = pattern(SIZE, 42);
    let id = m
        .store
        .create_multipart_upload(&m.bucket, "big.bin", &PutOptions::default())
        .await
        .unwrap();
    let mut parts = Vec::new();
    for (i, chunk) in data.chunks(16 << 20).enumerate() {
        parts.push(
            m.store
                .upload_part(
                    &m.bucket,
                    "big.bin",
                    &id,
                    i as i32 + 1,
                    Bytes::copy_from_slice(chunk),
                )
                .await
                .unwrap(),
        );
    }
    m.store
        .complete_multipart_upload(&m.bucket, "big.bin", &id, &parts)
        .await
        .unwrap();

    let path = m.path("big.bin");
    let expected = data.clone();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path).unwrap();
        let mut got = Vec::with_capacity(SIZE);
        f.read_to_end(&mut got).unwrap();
        assert!(got == expected, "sequential read differs");
        // Random offsets, including the very end and reads crossing part boundaries.
        let mut x = 7u64;
        for _ in 0..40 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 11) as usize % SIZE;
            let len = ((x >> 40) as usize % (300 << 10)).min(SIZE - off);
            let mut buf = vec![0; len];
            f.read_exact_at(&mut buf, off as u64).unwrap();
            assert!(buf == expected[off..off + len], "pread at {off}+{len}");
        }
        f.seek(SeekFrom::Start(SIZE as u64 - 10)).unwrap();
        let mut tail = Vec::new();
        f.read_to_end(&mut tail).unwrap();
        assert_eq!(tail, &expected[SIZE - 10..]);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_object_fails_reads_instead_of_mixing_versions() {
    let m = Mounted::new("version", "", &[]).await;
    let v1 = pattern(3 << 20, 1);
    m.put("f", &v1, &[]).await;
    let path = m.path("f");
    let f = std::fs::File::open(&path).unwrap();
    let mut head = vec![0; 4096];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, v1[..4096]);
    m.put("f", &pattern(3 << 20, 2), &[]).await;
    // Far from what was prefetched, so the read must go to S3, where the version changed.
    let mut buf = vec![0; 4096];
    let err = f.read_exact_at(&mut buf, (3 << 20) - 4096).unwrap_err();
    assert_eq!(errno(&err), libc::EIO);
    drop(f);
    // A new open sees the new version (close-to-open).
    assert_eq!(std::fs::read(&path).unwrap(), pattern(3 << 20, 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_names_are_cached_for_the_ttl() {
    let m = Mounted::new("negative", "", &["--metadata-ttl", "2"]).await;
    assert_eq!(
        errno(&std::fs::metadata(m.path("later")).unwrap_err()),
        libc::ENOENT
    );
    m.put("later", b"now here", &[]).await;
    assert_eq!(
        errno(&std::fs::metadata(m.path("later")).unwrap_err()),
        libc::ENOENT,
        "still cached as missing"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        std::fs::read(m.path("later")).unwrap(),
        b"now here",
        "found once the TTL passed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_mounts_refuse_every_change() {
    let m = Mounted::new("readonly", "", &["--read-only"]).await;
    m.put("f", b"data", &[]).await;
    m.put("d/x", b"x", &[]).await;
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(errno(&e), libc::EROFS, "{what}: {e}");
    };
    erofs(std::fs::write(m.path("new"), b"x"), "create");
    erofs(
        std::fs::OpenOptions::new()
            .write(true)
            .open(m.path("f"))
            .map(drop),
        "open for write",
    );
    erofs(std::fs::create_dir(m.path("nd")), "mkdir");
    erofs(std::fs::remove_file(m.path("f")), "unlink");
    erofs(std::fs::remove_dir(m.path("d")), "rmdir");
    erofs(std::fs::rename(m.path("f"), m.path("g")), "rename");
    erofs(
        std::fs::set_permissions(m.path("f"), std::fs::Permissions::from_mode(0o600)),
        "chmod",
    );
    erofs(std::os::unix::fs::symlink("f", m.path("l")), "symlink");
    assert_eq!(
        std::fs::read(m.path("f")).unwrap(),
        b"data",
        "reads still work"
    );
    assert_eq!(m.get("f").await, b"data", "nothing changed in S3");
    assert!(m.head("new").await.is_none());
}

/// Runs `s3vol mount` in the background mode a user types, expecting failure.
fn mount_fails(args: &[&str]) -> (i32, String) {
    let mnt = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = s3vol()
        .arg("mount")
        .args(args)
        .arg(mnt.path())
        .arg("--cache-dir")
        .arg(cache.path().join("cache"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !support::is_mounted(mnt.path()),
        "nothing may be left mounted"
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_mounts_fail_with_a_clear_message_and_exit_code() {
    let store = support::store().await;
    let bucket = testing::unique_bucket("badmount");
    store.create_bucket(&bucket).await.unwrap();
    let b = bucket.to_string();
    let server = server_args();
    let server: Vec<&str> = server.iter().map(String::as_str).collect();

    let (code, err) = mount_fails(&[&[b.as_str(), "-o", "frobnicate"][..], &server].concat());
    assert_ne!(code, 0);
    assert!(err.contains("unknown mount option"), "{err}");

    let (code, err) = mount_fails(&[&[b.as_str(), "--file-mode", "rwx"][..], &server].concat());
    assert_eq!(code, 2, "usage errors exit 2: {err}");

    let (code, err) = mount_fails(&[
        b.as_str(),
        "--endpoint-url",
        "http://127.0.0.1:1",
        "--force-path-style",
        "--region",
        "us-east-1",
        "--max-attempts",
        "1",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot reach"), "{err}");

    let (code, err) = mount_fails(&[&["s3vol-no-such-bucket-here"][..], &server].concat());
    assert_ne!(code, 0);
    assert!(
        err.contains("no such bucket") || err.contains("not found"),
        "{err}"
    );

    let out = s3vol()
        .env("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        .arg("mount")
        .arg(&b)
        .arg(tempfile::tempdir().unwrap().path())
        .args(&server)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("denied") || err.contains("credentials"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_background_mount_returns_when_ready_and_sigterm_unmounts() {
    let store = support::store().await;
    let bucket = testing::unique_bucket("daemon");
    store.create_bucket(&bucket).await.unwrap();
    store
        .put_object(
            &bucket,
            "f",
            Bytes::from_static(b"hello"),
            &PutOptions::default(),
        )
        .await
        .unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let status = s3vol()
        .arg("mount")
        .arg(format!("s3://{bucket}"))
        .arg(mnt.path())
        .args(server_args())
        .arg("--cache-dir")
        .arg(cache.path().join("cache"))
        .stdin(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let guard = scopeguard(mnt.path().to_owned());
    assert!(
        support::is_mounted(mnt.path()),
        "mounted when the command returns"
    );
    assert_eq!(std::fs::read(mnt.path().join("f")).unwrap(), b"hello");
    // Find the serving process and stop it the way an init system would.
    let pid = find_mount_pid(mnt.path()).expect("serving process");
    // SAFETY: sending a signal to a process we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while support::is_mounted(mnt.path()) {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGTERM did not unmount"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(guard);
}

struct Unmount(std::path::PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        support::unmount(&self.0);
    }
}
fn scopeguard(p: std::path::PathBuf) -> Unmount {
    Unmount(p)
}

fn find_mount_pid(mnt: &std::path::Path) -> Option<i32> {
    let needle = mnt.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").ok()? {
        let entry = entry.ok()?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "--daemon-child") && args.contains(&needle) {
            return Some(pid);
        }
    }
    None
}

fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"))
}

#[tokio::test(flavor = "multi_thread")]
async fn many_concurrent_readers_stay_within_the_memory_limit() {
    const LIMIT_MIB: u64 = 32;
    const READERS: usize = 8;
    const SIZE: usize = 40 << 20;
    let m = Mounted::new("memlimit", "", &["--memory-limit", "32M"]).await;
    for i in 0..READERS {
        m.put(&format!("f{i}"), &pattern(SIZE, i as u64 + 100), &[])
            .await;
    }
    // The baseline: an idle mount that has listed the directory.
    let _ = std::fs::read_dir(m.mnt.path()).unwrap().count();
    let pid = m.serving_pid();
    let baseline = vm_kib(pid, "VmRSS:");
    let paths: Vec<_> = (0..READERS)
        .map(|i| (i, m.path(&format!("f{i}"))))
        .collect();
    let readers: Vec<_> = paths
        .into_iter()
        .map(|(i, p)| {
            std::thread::spawn(move || {
                let got = std::fs::read(p).unwrap();
                assert!(
                    got == pattern(SIZE, i as u64 + 100),
                    "reader {i} got different bytes"
                );
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    let peak = vm_kib(pid, "VmHWM:");
    let grown_mib = peak.saturating_sub(baseline) / 1024;
    eprintln!("grown {grown_mib} MiB");
    // Read buffers are bounded by the limit; allow 16 MiB for what is in transit outside it
    // (HTTP client buffers, replies being copied to the kernel, allocator slack).
    assert!(
        grown_mib <= LIMIT_MIB + 16,
        "{READERS} readers of {} MiB grew the mount by {grown_mib} MiB (limit {LIMIT_MIB} MiB)",
        SIZE >> 20
    );
}

/// Drops the kernel's dentry and inode caches, so it FORGETs what it looked up.
fn drop_kernel_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "2").expect("drop_caches (needs root)");
}

#[tokio::test(flavor = "multi_thread")]
async fn listed_entries_stat_and_read_correctly_even_after_the_kernel_forgets_them() {
    const N: usize = 120;
    let m = Mounted::new("rdplus", "", &["--metadata-ttl", "30"]).await;
    futures::stream::iter(0..N)
        .map(|i| {
            let m = &m;
            async move {
                let body = format!("body of {i}");
                m.put(&format!("d/f{i:03}"), body.as_bytes(), &[("mode", "33200")])
                    .await
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let dir = m.path("d");
    let check = |round: &str| {
        // READDIRPLUS: names, numbers and attributes in one go.
        let mut listed: Vec<(String, u64)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let md = e.metadata().unwrap();
                assert!(md.is_file());
                assert_eq!(md.mode() & 0o7777, 0o660, "{round}: mode from the HEAD");
                (e.file_name().into_string().unwrap(), e.ino())
            })
            .collect();
        listed.sort();
        assert_eq!(listed.len(), N, "{round}");
        for (i, (name, ino)) in listed.iter().enumerate() {
            assert_eq!(name, &format!("f{i:03}"));
            let path = dir.join(name);
            let md = std::fs::metadata(&path).unwrap();
            assert_eq!(md.ino(), *ino, "{round}: stat and readdir agree on {name}");
            let body = format!("body of {i}");
            assert_eq!(md.len(), body.len() as u64);
            assert_eq!(std::fs::read(&path).unwrap(), body.as_bytes(), "{round}");
        }
        listed
    };
    let names = |listed: Vec<(String, u64)>| listed.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    let first = check("cold");
    let numbers: std::collections::HashMap<String, u64> = first.iter().cloned().collect();
    let first = names(first);
    drop_kernel_caches();
    // Stat and read by name before anything lists the directory again.
    for (i, name) in first.iter().enumerate().step_by(7) {
        let path = dir.join(name);
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o660);
        assert_eq!(
            md.ino(),
            numbers[name],
            "{name} keeps its number once forgotten"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            format!("body of {i}").as_bytes()
        );
    }
    // Listed again from the kept listing, then again after the kernel forgot everything:
    // readdir and stat still agree on every number.
    assert_eq!(names(check("re-listed")), first);
    drop_kernel_caches();
    assert_eq!(names(check("after drop_caches")), first);

    // Many listers and statters at once while the kernel's caches are dropped again and
    // again: every observation of a name shows the one number it had from the start.
    let seen = std::sync::Mutex::new(std::collections::HashMap::<String, BTreeSet<u64>>::new());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..40 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                drop_kernel_caches();
                std::thread::sleep(Duration::from_millis(25));
            }
        });
        let workers: Vec<_> = (0..8)
            .map(|w| {
                let (dir, seen, first) = (&dir, &seen, &first);
                s.spawn(move || {
                    for round in 0..5 {
                        let mut got = Vec::new();
                        if w % 2 == 0 {
                            for e in std::fs::read_dir(dir).unwrap() {
                                let e = e.unwrap();
                                got.push((e.file_name().into_string().unwrap(), e.ino()));
                            }
                        } else {
                            for name in first.iter().skip((w + round) % 3).step_by(3) {
                                let md = std::fs::metadata(dir.join(name)).unwrap();
                                got.push((name.clone(), md.ino()));
                            }
                        }
                        let mut seen = seen.lock().unwrap();
                        for (name, ino) in got {
                            seen.entry(name).or_default().insert(ino);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), N);
    for (name, inos) in &seen {
        assert_eq!(
            inos.iter().copied().collect::<Vec<_>>(),
            vec![numbers[name]],
            "{name}: one number for the mount's life"
        );
    }
    // New names show at once.
    std::fs::write(dir.join("new"), b"n").unwrap();
    let names: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.contains("new") && names.len() == N + 1);
    std::fs::remove_file(dir.join("f000")).unwrap();
    let names: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!names.contains("f000") && names.len() == N);
}

#[tokio::test(flavor = "multi_thread")]
async fn listing_attrs_show_sizes_from_the_listing_and_the_default_mode_and_owner() {
    let m = Mounted::new(
        "lsattrs",
        "",
        &[
            "--listing-attrs",
            "--metadata-ttl",
            "1",
            "--uid",
            "4242",
            "--gid",
            "4343",
            "--file-mode",
            "0640",
            "--dir-mode",
            "0750",
        ],
    )
    .await;
    let s3fs = [
        ("mode", "33261"),
        ("uid", "1000"),
        ("gid", "1001"),
        ("mtime", "1700000000"),
    ];
    m.put("d/meta.txt", b"with metadata", &s3fs).await;
    m.put("d/plain.txt", b"plain", &[]).await;
    m.put("d/sub/child", b"x", &[]).await;
    let dir = m.path("d");
    let listed: BTreeSet<(String, u64, u32, u32, bool)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            (
                e.file_name().into_string().unwrap(),
                if md.is_dir() { 0 } else { md.len() },
                md.mode() & 0o7777,
                md.uid(),
                md.is_dir(),
            )
        })
        .collect();
    let expected: BTreeSet<(String, u64, u32, u32, bool)> = [
        ("meta.txt", 13, 0o640, 4242, false),
        ("plain.txt", 5, 0o640, 4242, false),
        ("sub", 0, 0o750, 4242, true),
    ]
    .into_iter()
    .map(|(n, l, mode, uid, d)| (n.to_owned(), l, mode, uid, d))
    .collect();
    assert_eq!(
        listed, expected,
        "sizes from LIST, mode and owner the defaults"
    );
    let meta = std::fs::metadata(dir.join("meta.txt")).unwrap();
    assert_eq!(
        meta.mode() & 0o7777,
        0o640,
        "within the TTL, stat shows what the listing showed"
    );
    let age = std::time::SystemTime::now()
        .duration_since(meta.modified().unwrap())
        .unwrap_or_default();
    assert!(age < Duration::from_secs(600), "mtime is the Last-Modified");
    assert_eq!(
        std::fs::read(dir.join("meta.txt")).unwrap(),
        b"with metadata"
    );
    // Once the TTL has passed, a lookup by name reads the object's own metadata.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let meta = std::fs::metadata(dir.join("meta.txt")).unwrap();
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o755, 1000, 1001)
    );
    assert_eq!(
        meta.modified().unwrap(),
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    );
    // Later listings keep it while the object is unchanged.
    let md = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.file_name() == "meta.txt")
        .unwrap()
        .metadata()
        .unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid()), (0o755, 1000));
    // What is written here still carries s3fs metadata.
    std::fs::write(dir.join("new.txt"), b"new").unwrap();
    std::fs::set_permissions(dir.join("new.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let head = m.head("d/new.txt").await.unwrap();
    assert_eq!(head.metadata["mode"], (libc::S_IFREG | 0o600).to_string());
    let md = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.file_name() == "new.txt")
        .unwrap()
        .metadata()
        .unwrap();
    assert_eq!(
        md.mode() & 0o7777,
        0o600,
        "a chmod made here stays in listings"
    );
}

/// A tree walk (`find`, then `rm -r`) over directories listed ahead of it: every name with
/// its own type, size and mode, and every change made during the walk in the bucket.
#[tokio::test(flavor = "multi_thread")]
async fn a_tree_walk_sees_every_entry_as_it_is_and_removes_the_tree() {
    let port = support::free_port();
    let addr = format!("127.0.0.1:{port}");
    let m = Mounted::new("walk", "", &["--metrics-addr", &addr]).await;
    let mut expected = Vec::new();
    for d in 0..10 {
        for f in 0..3 {
            let key = format!("w/d{d}/f{f}");
            let body = vec![b'x'; d * 10 + f];
            m.put(
                &key,
                &body,
                &[("mode", &(libc::S_IFREG | 0o600).to_string())],
            )
            .await;
            expected.push(format!("f {} 600 {key}", body.len()));
        }
    }
    m.put(
        "w/d5/link",
        b"f0",
        &[("mode", &(libc::S_IFLNK | 0o777).to_string())],
    )
    .await;
    expected.push("l 2 777 w/d5/link".to_owned());
    m.put("w/d7/sub/deep", b"deep", &[]).await;
    expected.push("f 4 644 w/d7/sub/deep".to_owned());
    expected.sort();
    let root = m.mnt.path().to_owned();
    let walk = |args: &[&str]| {
        let out = std::process::Command::new("find")
            .arg(root.join("w"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let prefix = format!("{}/", root.display());
        let mut lines: Vec<String> = text.lines().map(|l| l.replace(&prefix, "")).collect();
        lines.sort();
        lines
    };
    let found = walk(&["-not", "-type", "d", "-printf", "%y %s %m %p\n"]);
    assert_eq!(found, expected);
    let dirs = walk(&["-type", "d"]);
    assert_eq!(dirs.len(), 1 + 10 + 1, "{dirs:?}");
    // The walk went through w/d0, w/d1, …: the directories after them were listed ahead.
    let ahead = support::wait_gauge(port, "s3vol_directories_listed_ahead_total", |v| v >= 4.0);
    assert!(ahead.is_some_and(|v| v >= 4.0), "listed ahead: {ahead:?}");
    // Files made here while a walk lists ahead show in the next walk, as do removals.
    for d in [2, 6] {
        std::fs::write(m.path(&format!("w/d{d}/new")), b"new").unwrap();
    }
    std::fs::remove_file(m.path("w/d8/f1")).unwrap();
    let found = walk(&["-type", "f"]);
    assert_eq!(found.len(), 30 + 1 + 2 - 1, "{found:?}");
    assert!(found.contains(&"w/d6/new".to_owned()) && !found.contains(&"w/d8/f1".to_owned()));
    let status = std::process::Command::new("rm")
        .arg("-r")
        .arg(m.path("w"))
        .status()
        .unwrap();
    assert!(status.success());
    let left = m
        .store
        .list_objects(
            &m.bucket,
            &s3vol_s3::ListRequest {
                prefix: "w/".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(left.objects.is_empty(), "{:?}", left.objects);
}
