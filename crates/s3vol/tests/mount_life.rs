//! The edges of a mount's life: what the process keeps when it is told to go while S3 refuses
//! the data, what it unmounts, and what files unlinked while open, symlink objects of any
//! size and ioctls get. Each test runs the real `s3vol mount` binary on a real FUSE mount
//! against the test S3 server (through the recording proxy where S3 must fail).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/mount.rs"]
mod support;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxy::Proxy;
use s3vol_s3::testing;
use support::{Mounted, close, errno, is_mounted, pattern, rt, s3vol};
use tokio::runtime::Runtime;

/// stderr of a mount process, read on a thread as it comes (a full pipe would stall it).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<String>>);

impl Log {
    fn collect(child: &mut Child) -> Self {
        let log = Log::default();
        if let Some(mut err) = child.stderr.take() {
            let sink = log.0.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        log
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }
}

/// How many mounts `/proc/self/mountinfo` lists at `path`.
fn mounts_at(path: &Path) -> usize {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_string_lossy();
    info.lines()
        .filter(|l| l.split(' ').nth(4) == Some(&*p))
        .count()
}

/// Starts `s3vol mount -f` of `bucket` at `mnt` (through `endpoint`) and waits until one more
/// mount shows at `mnt` than before (mounts may be stacked). `Err` with the log if the process
/// exits first.
fn spawn_mount(
    endpoint: &str,
    bucket: &str,
    mnt: &Path,
    cache: &Path,
    extra: &[&str],
    level: &str,
) -> Result<(Child, Log), (std::process::ExitStatus, String)> {
    let before = mounts_at(mnt);
    let mut child = s3vol()
        .arg("mount")
        .arg(format!("{bucket}/"))
        .arg(mnt)
        .args(["--endpoint-url", endpoint, "--region", "us-east-1"])
        .args(["--force-path-style", "--max-attempts", "2"])
        .arg("--cache-dir")
        .arg(cache)
        .arg("-f")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("S3VOL_LOG_LEVEL", level)
        .spawn()
        .unwrap();
    let log = Log::collect(&mut child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while mounts_at(mnt) == before {
        if let Some(status) = child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(100));
            return Err((status, log.text()));
        }
        assert!(
            Instant::now() < deadline,
            "mount did not appear within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, log))
}

/// A new bucket mounted through `proxy`, with its log collected.
fn mount_via(rt: &Runtime, proxy: &Proxy, tag: &str, extra: &[&str]) -> (Mounted, Log) {
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
    let (child, log) = spawn_mount(
        &proxy.url(),
        bucket.as_str(),
        mnt.path(),
        cache.path(),
        extra,
        "warn",
    )
    .unwrap_or_else(|(status, log)| panic!("s3vol mount exited ({status}): {log}"));
    let m = Mounted {
        bucket,
        store,
        mnt,
        cache,
        child: Some(child),
        prefix: String::new(),
    };
    (m, log)
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0);
}

fn wait_for_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "mount process still running");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Staging files in `cache` whose `.key` companion names `s3://bucket/key`.
fn staged_copies(cache: &Path, bucket: &str, key: &str) -> Vec<PathBuf> {
    let want = format!("s3://{bucket}/{key}");
    fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "data"))
        .filter(|p| fs::read_to_string(p.with_extension("key")).is_ok_and(|k| k.trim() == want))
        .collect()
}

/// What the process left for `key` is every byte of `data`, the log says so, and the
/// documented recovery (copy the staging file to the object its `.key` names) restores it.
fn assert_kept_whole(rt: &Runtime, m: &Mounted, log: &str, key: &str, data: &[u8]) {
    let copies = staged_copies(m.cache.path(), m.bucket.as_str(), key);
    assert_eq!(copies.len(), 1, "one staging file for {key}; log: {log}");
    let kept = fs::read(&copies[0]).unwrap();
    assert!(
        kept.len() == data.len() && kept == data,
        "the staging file holds every byte ({} of {} bytes)",
        kept.len(),
        data.len()
    );
    let shown = copies[0].display().to_string();
    assert!(
        log.contains(&format!("is in the staging file {shown}")) && log.contains("fsynced"),
        "the log names the staging file: {log}"
    );
    assert!(
        !log.contains("lost"),
        "no log line says bytes are lost: {log}"
    );
    assert!(
        rt.block_on(m.head(key)).is_none(),
        "S3 never had the object"
    );
    // The recovery recipe of docs/SEMANTICS.md: `aws s3 cp <file> "$(cat <file>.key)"`.
    let target = fs::read_to_string(copies[0].with_extension("key")).unwrap();
    let key_in = target
        .trim()
        .strip_prefix(&format!("s3://{}/", m.bucket))
        .unwrap();
    rt.block_on(m.put(key_in, &kept, &[]));
    assert!(rt.block_on(m.get(key)) == data, "recovered from the cache");
}

// ----- SIGTERM with a streamed file S3 refused ------------------------------------------------

/// A streamed file whose multipart upload exists but whose parts S3 refuses: close fails with
/// EIO, and SIGTERM must leave every byte (all in memory until then) in the staging file.
#[test]
fn sigterm_writes_a_refused_stream_to_the_cache_directory() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let (mut m, log) = mount_via(&rt, &proxy, "life-term", &[]);
    let data = pattern((21 << 20) + 12_345, 31);
    proxy.set_refuse_parts(true);
    let mut f = File::create(m.path("big")).unwrap();
    f.write_all(&data).unwrap();
    assert_eq!(errno(&close(f).unwrap_err()), libc::EIO);
    assert!(
        proxy
            .requests()
            .iter()
            .any(|r| r.method() == "POST" && r.has_param("uploads")),
        "the multipart upload exists"
    );

    signal(m.pid(), libc::SIGTERM);
    let status = wait_for_exit(m.child.as_mut().unwrap(), Duration::from_secs(120));
    m.child = None;
    assert!(!status.success(), "data not in S3 makes a non-zero exit");
    assert!(!is_mounted(m.mnt.path()), "SIGTERM unmounts");
    std::thread::sleep(Duration::from_millis(200));
    proxy.set_refuse_parts(false);
    assert_kept_whole(&rt, &m, &log.text(), "big", &data);
}

/// The same with the file still open: the mount is busy, the process detaches it and exits,
/// and the bytes are in the staging file before it does.
#[test]
fn sigterm_with_a_refused_stream_still_open_keeps_it_on_disk() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let (mut m, log) = mount_via(&rt, &proxy, "life-term-open", &[]);
    let data = pattern((19 << 20) + 777, 32);
    proxy.set_refuse_parts(true);
    let mut f = File::create(m.path("open")).unwrap();
    f.write_all(&data).unwrap();

    signal(m.pid(), libc::SIGTERM);
    let status = wait_for_exit(m.child.as_mut().unwrap(), Duration::from_secs(120));
    m.child = None;
    assert!(!status.success());
    drop(f);
    std::thread::sleep(Duration::from_millis(200));
    proxy.set_refuse_parts(false);
    assert_kept_whole(&rt, &m, &log.text(), "open", &data);
}

/// A serving process of a handed-over `/dev/fuse` descriptor (as the CSI node plugin runs it)
/// keeps a refused stream on disk at SIGTERM too.
#[test]
fn a_fuse_fd_serving_process_keeps_a_refused_stream_on_disk_at_sigterm() {
    let rt = rt();
    let proxy = Proxy::start(&testing::endpoint());
    let store = rt.block_on(support::store());
    let bucket = testing::unique_bucket("life-fd");
    rt.block_on(store.create_bucket(&bucket)).unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let cache = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap();

    // What the node plugin does: open /dev/fuse, mount it, hand the descriptor over.
    let fuse = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .unwrap();
    let opts = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
        fuse.as_raw_fd()
    );
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let (src, dir, fstype, data) = (
        c("s3vol:test"),
        c(mnt.path().to_str().unwrap()),
        c("fuse.s3vol"),
        c(&opts),
    );
    // SAFETY: valid C strings; mount(2) reads them only.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dir.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    assert_eq!(rc, 0, "mount: {}", io::Error::last_os_error());
    let _unmount = Unmount(mnt.path().to_owned());
    let mut fds = [0; 2];
    // Close-on-exec: children other tests start meanwhile must not hold the write end.
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe(2) just made these; each is owned once.
    let (ready_r, ready_w) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let (fuse_raw, ready_raw) = (fuse.as_raw_fd(), ready_w.as_raw_fd());
    let mut cmd = s3vol();
    cmd.args(["mount", "--fuse-fd", "3", "--ready-fd", "4", "-f"])
        .args(["--endpoint-url", &proxy.url(), "--region", "us-east-1"])
        .args(["--force-path-style", "--max-attempts", "2"])
        .arg("--cache-dir")
        .arg(cache.path())
        .arg(format!("{bucket}/"))
        .arg(mnt.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("S3VOL_LOG_LEVEL", "warn");
    // SAFETY: only dup2 between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fuse_raw, 3) < 0 || libc::dup2(ready_raw, 4) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop((fuse, ready_w));
    let log = Log::collect(&mut child);
    let mut ready = String::new();
    io::BufRead::read_line(&mut io::BufReader::new(File::from(ready_r)), &mut ready).unwrap();
    assert_eq!(ready.trim(), "ready", "log: {}", log.text());

    let data = pattern((24 << 20) + 1, 33);
    proxy.set_refuse_parts(true);
    let mut f = File::create(mnt.path().join("fd-file")).unwrap();
    f.write_all(&data).unwrap();
    assert_eq!(errno(&close(f).unwrap_err()), libc::EIO);
    signal(child.id(), libc::SIGTERM);
    let status = wait_for_exit(&mut child, Duration::from_secs(120));
    assert!(!status.success());
    std::thread::sleep(Duration::from_millis(200));
    proxy.set_refuse_parts(false);
    let m = Mounted {
        bucket,
        store,
        mnt: tempfile::tempdir().unwrap(),
        cache,
        child: None,
        prefix: String::new(),
    };
    assert_kept_whole(&rt, &m, &log.text(), "fd-file", &data);
}

/// Detaches a mount when dropped (even when the test failed).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        support::unmount(&self.0);
    }
}

// ----- unmounting only what this process mounted ----------------------------------------------

fn umount_once(path: &Path) -> io::Result<()> {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// s3vol mounted over a tmpfs: one `umount` takes s3vol away and leaves the tmpfs (and its
/// file) in place; a clean unmount logs no failed unmount.
#[test]
fn unmounting_s3vol_over_a_tmpfs_leaves_the_tmpfs() {
    let rt = rt();
    let store = rt.block_on(support::store());
    let bucket = testing::unique_bucket("life-tmpfs");
    rt.block_on(store.create_bucket(&bucket)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap();
    let c = |s: &str| std::ffi::CString::new(s).unwrap();
    let (src, target, fstype) = (c("tmpfs"), c(dir.path().to_str().unwrap()), c("tmpfs"));
    // SAFETY: valid C strings.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            c("size=1m").as_ptr().cast(),
        )
    };
    assert_eq!(rc, 0, "mount tmpfs: {}", io::Error::last_os_error());
    let _tmpfs = Unmount(dir.path().to_owned());
    fs::write(dir.path().join("on-tmpfs"), b"below").unwrap();

    let (mut child, log) = spawn_mount(
        &testing::endpoint(),
        bucket.as_str(),
        dir.path(),
        cache.path(),
        &[],
        "info",
    )
    .unwrap_or_else(|(s, log)| panic!("mount failed ({s}): {log}"));
    let _s3vol = Unmount(dir.path().to_owned());
    fs::write(dir.path().join("on-s3vol"), b"above").unwrap();
    assert!(
        !dir.path().join("on-tmpfs").exists(),
        "s3vol hides the tmpfs"
    );
    assert_eq!(mounts_at(dir.path()), 2);

    umount_once(dir.path()).unwrap();
    let status = wait_for_exit(&mut child, Duration::from_secs(60));
    assert!(status.success(), "{status}: {}", log.text());
    assert_eq!(mounts_at(dir.path()), 1, "the tmpfs is still mounted");
    assert_eq!(fs::read(dir.path().join("on-tmpfs")).unwrap(), b"below");
    let log = log.text();
    assert!(
        !log.contains("Failed to umount") && !log.contains("Unmount failed"),
        "{log}"
    );
    std::mem::forget(_s3vol);
    assert!(rt.block_on(async { store.head_object(&bucket, "on-s3vol").await.is_ok() }));
}

/// A second s3vol mount on a path that shows one already is refused (nothing changes), unless
/// `--allow-stacked`; then unmounting (or SIGTERM to) the top one leaves the one below serving.
#[test]
fn a_stacked_s3vol_mount_is_refused_unless_asked_and_unmounts_alone() {
    let rt = rt();
    let store = rt.block_on(support::store());
    let (below, above) = (
        testing::unique_bucket("life-below"),
        testing::unique_bucket("life-above"),
    );
    for b in [&below, &above] {
        rt.block_on(store.create_bucket(b)).unwrap();
    }
    rt.block_on(store.put_object(
        &below,
        "from-below",
        bytes::Bytes::from_static(b"below"),
        &Default::default(),
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap();
    let ep = testing::endpoint();
    let (mut first, _log) = spawn_mount(&ep, below.as_str(), dir.path(), cache.path(), &[], "warn")
        .unwrap_or_else(|(s, log)| panic!("mount failed ({s}): {log}"));
    let _first = Unmount(dir.path().to_owned());

    let refused = spawn_mount(&ep, above.as_str(), dir.path(), cache.path(), &[], "warn");
    let Err((status, msg)) = refused else {
        panic!("a second s3vol mount over the first was accepted");
    };
    assert!(!status.success());
    assert!(
        msg.contains("already an s3vol mount") && msg.contains("--allow-stacked"),
        "{msg}"
    );
    assert_eq!(mounts_at(dir.path()), 1);
    assert_eq!(fs::read(dir.path().join("from-below")).unwrap(), b"below");

    for how in ["umount", "SIGTERM"] {
        let (mut second, log) = spawn_mount(
            &ep,
            above.as_str(),
            dir.path(),
            cache.path(),
            &["--allow-stacked"],
            "info",
        )
        .unwrap_or_else(|(s, log)| panic!("mount failed ({s}): {log}"));
        let _second = Unmount(dir.path().to_owned());
        assert_eq!(mounts_at(dir.path()), 2, "{how}");
        assert!(!dir.path().join("from-below").exists(), "the top one shows");
        if how == "umount" {
            umount_once(dir.path()).unwrap();
        } else {
            signal(second.id(), libc::SIGTERM);
        }
        let status = wait_for_exit(&mut second, Duration::from_secs(60));
        assert!(status.success(), "{how}: {status}: {}", log.text());
        std::mem::forget(_second);
        assert_eq!(mounts_at(dir.path()), 1, "{how}: the first mount stays");
        assert_eq!(
            fs::read(dir.path().join("from-below")).unwrap(),
            b"below",
            "{how}: and still serves"
        );
        assert!(!log.text().contains("Failed to umount"), "{}", log.text());
    }
    umount_once(dir.path()).unwrap();
    assert!(wait_for_exit(&mut first, Duration::from_secs(60)).success());
    std::mem::forget(_first);
}

// ----- files unlinked while open ---------------------------------------------------------------

/// Drops the page cache of `f` (and, as root, every clean cache), so reads reach the mount.
fn drop_page_cache(f: &File) {
    // SAFETY: fadvise on an open descriptor.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

fn read_all_at(f: &File, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 0).unwrap();
    buf
}

#[test]
fn a_file_unlinked_while_open_keeps_its_content_for_its_handles() {
    let rt = rt();
    let m = rt.block_on(Mounted::new("life-unlink", "", &[]));
    // Written here and not uploaded: a small file (in memory), a file past a part (a
    // multipart upload under way), and one written out of order (a staging file).
    let cases: [(&str, Vec<u8>); 3] = [
        ("small", pattern(300_001, 41)),
        ("streamed", pattern((17 << 20) + 3, 42)),
        ("staged", pattern(200_000, 43)),
    ];
    for (name, data) in &cases {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(m.path(name))
            .unwrap();
        if *name == "staged" {
            f.write_all_at(&data[1000..], 1000).unwrap();
            f.write_all_at(&data[..1000], 0).unwrap();
        } else {
            (&f).write_all(data).unwrap();
        }
        fs::remove_file(m.path(name)).unwrap();
        assert!(!m.path(name).exists());
        drop_page_cache(&f);
        assert!(
            read_all_at(&f, data.len()) == *data,
            "{name}: read after unlink"
        );
        assert_eq!(f.metadata().unwrap().nlink(), 0, "{name}: no link left");
        assert_eq!(f.metadata().unwrap().len(), data.len() as u64);
        // It keeps working for writes too, locally.
        f.write_all_at(b"tail", data.len() as u64).unwrap();
        drop_page_cache(&f);
        let mut more = data.clone();
        more.extend_from_slice(b"tail");
        assert!(
            read_all_at(&f, more.len()) == more,
            "{name}: written after unlink"
        );
        close(f).unwrap();
        assert!(
            rt.block_on(m.head(name)).is_none(),
            "{name}: never uploaded"
        );
    }

    // An object already in S3, open for reading when it is unlinked.
    let old = pattern(3 << 20, 44);
    rt.block_on(m.put("old", &old, &[]));
    let f = File::open(m.path("old")).unwrap();
    let mut head = [0u8; 10];
    f.read_exact_at(&mut head, 0).unwrap();
    fs::remove_file(m.path("old")).unwrap();
    assert!(
        rt.block_on(m.head("old")).is_none(),
        "deleted in S3 at once"
    );
    drop_page_cache(&f);
    assert!(read_all_at(&f, old.len()) == old, "read after unlink");
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    drop(f);
    // Nothing is left behind in the cache once the handles are closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    // (The running mount's own `<instance>.lock` stays: it is no file's data.)
    let leftovers = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_none_or(|x| x != "lock"))
            .collect()
    };
    while !leftovers(m.cache.path()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the cache keeps files of unlinked files: {:?}",
            fs::read_dir(m.cache.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ----- symlink objects of any size --------------------------------------------------------------

fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A 256 MiB object marked as a symlink: readlink answers EIO without downloading it, the
/// process stays up and small, and normal symlinks keep working.
#[test]
fn a_huge_object_marked_as_a_symlink_answers_eio_and_costs_no_memory() {
    let rt = rt();
    let m = rt.block_on(Mounted::new("life-link", "", &["--memory-limit", "16M"]));
    let link_mode = (libc::S_IFLNK | 0o777).to_string();
    rt.block_on(m.put("ok", b"target", &[("mode", &link_mode)]));
    let huge = vec![b'a'; 256 << 20];
    rt.block_on(m.put("huge", &huge, &[("mode", &link_mode)]));
    drop(huge);
    // Exactly PATH_MAX - 1 bytes is the longest target Linux has; one more is too long.
    let longest = "d/".repeat(2047) + "x";
    rt.block_on(m.put("longest", longest.as_bytes(), &[("mode", &link_mode)]));
    rt.block_on(m.put(
        "too-long",
        (longest.clone() + "y").as_bytes(),
        &[("mode", &link_mode)],
    ));

    assert_eq!(fs::read_link(m.path("ok")).unwrap(), Path::new("target"));
    let e = fs::read_link(m.path("huge")).unwrap_err();
    assert_eq!(errno(&e), libc::EIO);
    assert_eq!(
        errno(&fs::read_link(m.path("too-long")).unwrap_err()),
        libc::EIO
    );
    assert_eq!(
        fs::read_link(m.path("longest")).unwrap(),
        Path::new(&longest)
    );
    // Still alive, still answering, and it never held the object.
    assert!(m.child.as_ref().map(|c| c.id()).is_some());
    assert_eq!(fs::read_link(m.path("ok")).unwrap(), Path::new("target"));
    let hwm_mib = vm_kib(m.serving_pid(), "VmHWM") >> 10;
    assert!(
        hwm_mib < 200,
        "the mount's peak resident size was {hwm_mib} MiB"
    );
}

// ----- ioctl --------------------------------------------------------------------------------------

/// ioctls get ENOTTY, as from a filesystem without any, and the log says so once.
#[test]
fn ioctl_answers_enotty_and_is_logged_once() {
    let rt = rt();
    let store = rt.block_on(support::store());
    let bucket = testing::unique_bucket("life-ioctl");
    rt.block_on(store.create_bucket(&bucket)).unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let cache = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .unwrap();
    let (mut child, log) = spawn_mount(
        &testing::endpoint(),
        bucket.as_str(),
        mnt.path(),
        cache.path(),
        &[],
        "info",
    )
    .unwrap_or_else(|(s, log)| panic!("mount failed ({s}): {log}"));
    let _unmount = Unmount(mnt.path().to_owned());
    for i in 0..3 {
        let p = mnt.path().join(format!("f{i}"));
        fs::write(&p, b"x").unwrap();
        let f = File::open(&p).unwrap();
        // What Python's open() asks of every file: is it a terminal?
        // SAFETY: TCGETS writes a termios into the buffer given.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TCGETS, &mut termios) };
        assert_eq!(rc, -1);
        assert_eq!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOTTY)
        );
    }
    umount_once(mnt.path()).unwrap();
    assert!(wait_for_exit(&mut child, Duration::from_secs(60)).success());
    std::mem::forget(_unmount);
    let log = log.text();
    assert_eq!(log.matches("ioctl is not supported").count(), 1, "{log}");
}
