//! The cache directory and ownership rules of new files, through a real mount.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mount.rs"]
mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use support::{Mounted, pattern};

/// Tests here run one at a time: spawning a process (a mount, `unshare`, the aws CLI) makes
/// the kernel flush every file the test process has open on a FUSE mount when the child's
/// copies of the descriptors close at exec, which would upload files another test keeps
/// open on purpose to see what a killed mount leaves.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

fn staged_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "data"))
        .map(|e| e.metadata().unwrap().blocks() * 512)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn clean_copies_stay_within_the_cache_size_and_go_least_recently_used_first() {
    let _serial = serial().await;
    let m = Mounted::new("lru", "", &["--cache-size", "8M"]).await;
    // Files edited in place (random writes) are staged; once uploaded and closed they stay as
    // clean copies, until room is needed.
    for i in 0..5u64 {
        m.put(&format!("f{i}"), &pattern(3 << 20, i), &[]).await;
    }
    for i in 0..5u64 {
        let path = m.path(&format!("f{i}"));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"edited", 1000).unwrap();
        drop(f);
        assert!(
            staged_bytes(m.cache.path()) <= 9 << 20,
            "the cache directory holds {} bytes after {} files (limit 8 MiB)",
            staged_bytes(m.cache.path()),
            i + 1
        );
    }
    assert!(
        staged_bytes(m.cache.path()) >= 3 << 20,
        "the most recent clean copy is kept for reuse"
    );
    for i in 0..5u64 {
        let mut expected = pattern(3 << 20, i);
        expected[1000..1006].copy_from_slice(b"edited");
        assert!(m.get(&format!("f{i}")).await == expected, "f{i} in S3");
        assert!(
            std::fs::read(m.path(&format!("f{i}"))).unwrap() == expected,
            "f{i} through the mount"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn new_files_take_the_group_of_a_set_group_id_directory() {
    let _serial = serial().await;
    let m = Mounted::new("setgid", "", &[]).await;
    let dir = m.path("shared");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, None, Some(3000)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2775)).unwrap();
    std::fs::write(dir.join("file"), b"x").unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    let file = std::fs::metadata(dir.join("file")).unwrap();
    assert_eq!(file.gid(), 3000, "the file joins the directory's group");
    let sub = std::fs::metadata(dir.join("sub")).unwrap();
    assert_eq!(sub.gid(), 3000);
    assert_ne!(
        sub.mode() & libc::S_ISGID,
        0,
        "subdirectories keep the set-group-ID bit"
    );
    assert_eq!(m.head("shared/file").await.unwrap().metadata["gid"], "3000");
    // Without the bit, the creator's group.
    std::fs::create_dir(m.path("plain")).unwrap();
    std::fs::write(m.path("plain/file"), b"y").unwrap();
    assert_eq!(std::fs::metadata(m.path("plain/file")).unwrap().gid(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn attribute_changes_right_after_close_are_in_s3_when_they_return() {
    // close() returns before the kernel's asynchronous release; a chmod that arrives in
    // between, while the clean local copy is still attached, must still reach S3 at once.
    let _serial = serial().await;
    let m = Mounted::new("attrclose", "", &[]).await;
    for i in 0..20 {
        let p = m.path(&format!("f{i}"));
        std::fs::write(&p, b"data").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mode = m.head(&format!("f{i}")).await.unwrap().metadata["mode"].clone();
        assert_eq!(mode, (libc::S_IFREG | 0o600).to_string(), "f{i}");
    }
}

// ----- the cache directory as a journal: restarts, PID reuse, permissions, a full disk -------

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use s3vol_s3::testing;
use support::{BIN, errno, is_mounted, s3vol, server_args, unmount};

/// Every `.data` file in `dir` with the object its `.key` companion names.
fn leftovers(dir: &Path) -> Vec<(PathBuf, String)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "data"))
        .map(|p| {
            let key = std::fs::read_to_string(p.with_extension("key")).unwrap_or_default();
            (p, key.trim().to_owned())
        })
        .collect()
}

/// Bytes the directory's files take on disk.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.metadata().unwrap().blocks() * 512)
        .sum()
}

fn kill9(pid: u32) {
    // SAFETY: sending a signal to a process this test started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
}

/// Kills the mount process with SIGKILL, waits for it, and detaches its dead mount.
fn kill_mount(m: &mut Mounted) {
    let mut child = m.child.take().expect("mounted");
    kill9(child.id());
    child.wait().unwrap();
    unmount(m.mnt.path());
}

fn wait_mounted(child: &mut Child, mnt: &Path, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !is_mounted(mnt) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "s3vol mount exited ({status}) before mounting: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "mount did not appear within 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `s3vol mount -f` of `bucket` on `mnt` with `cache`, logging at info level to `log`.
fn mount_cmd(bucket: &str, mnt: &Path, cache: &Path, extra: &[&str], log: &Path) -> Command {
    let mut cmd = s3vol();
    cmd.arg("mount")
        .arg(format!("{bucket}/"))
        .arg(mnt)
        .args(server_args())
        .arg("--cache-dir")
        .arg(cache)
        .arg("-f")
        // One process: the mount shows only once the start-up scan is done (a supervised
        // `-f` mount shows at once and serves after its scan; see SEMANTICS.md).
        .arg("--no-supervise")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::options().create(true).append(true).open(log).unwrap())
        .env("S3VOL_LOG_LEVEL", "info");
    cmd
}

/// Starts `m` again on its mount point and cache directory, logging at info level to `log`.
fn restart_logged(m: &mut Mounted, extra: &[&str], log: &Path) {
    let mut child = mount_cmd(m.bucket.as_str(), m.mnt.path(), m.cache.path(), extra, log)
        .spawn()
        .unwrap();
    wait_mounted(&mut child, m.mnt.path(), log);
    m.child = Some(child);
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_uploads_what_a_killed_mount_left_keeps_what_changed_and_drops_clean_copies() {
    let _serial = serial().await;
    let mut m = Mounted::new("recover", "", &[]).await;
    let original = pattern(300_000, 1);
    m.put("edited", &original, &[]).await;
    m.put("raced", &original, &[]).await;
    m.put("clean", &pattern(200_000, 2), &[]).await;
    // A clean copy: edited in place, closed (uploaded), kept for reuse.
    open_rw(&m.path("clean")).write_all_at(b"x", 10).unwrap();
    // Files with data not in S3 when the process dies: an edited object (two ranges written,
    // the rest only in S3), a new file written out of order, and an object another client
    // replaces before the restart.
    let edited = open_rw(&m.path("edited"));
    edited.write_all_at(b"patched", 100_000).unwrap();
    edited.write_all_at(b"tail", 299_000).unwrap();
    let raced = open_rw(&m.path("raced"));
    raced.write_all_at(b"mine", 5).unwrap();
    let new = File::create(m.path("new")).unwrap();
    new.write_all_at(b" world", 5).unwrap();
    new.write_all_at(b"hello", 0).unwrap();
    kill_mount(&mut m);
    assert_eq!(leftovers(m.cache.path()).len(), 4);
    m.put("raced", b"theirs", &[]).await;

    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("mount.log");
    restart_logged(&mut m, &[], &log);
    let mut expected = original.clone();
    expected[100_000..100_007].copy_from_slice(b"patched");
    expected[299_000..299_004].copy_from_slice(b"tail");
    assert!(
        m.get("edited").await == expected,
        "the edit reached S3, the rest kept"
    );
    assert_eq!(m.get("new").await, b"hello world");
    assert_eq!(
        m.get("raced").await,
        b"theirs",
        "a newer object is never overwritten"
    );
    assert!(std::fs::read(m.path("edited")).unwrap() == expected);
    let left = leftovers(m.cache.path());
    assert_eq!(
        left.len(),
        1,
        "only the file that could not be uploaded stays: {left:?}"
    );
    assert_eq!(left[0].1, format!("s3://{}/raced", m.bucket));
    assert_eq!(&std::fs::read(&left[0].0).unwrap()[5..9], b"mine");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(
            "1 clean copies dropped, 2 files with data not in S3 uploaded, 1 kept in the cache directory"
        ),
        "one start-up line says what the scan found: {text}"
    );
    let kept_line = text
        .lines()
        .find(|l| l.contains("kept in the cache directory, not uploaded"))
        .unwrap_or_else(|| panic!("no line about the kept file: {text}"));
    assert!(
        kept_line.contains("raced")
            && kept_line.contains(&*left[0].0.to_string_lossy())
            && kept_line.contains("changed in S3"),
        "the kept file's line says which key, where and why: {kept_line}"
    );
    drop((edited, raced, new));
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_never_grow_the_cache_directory_past_its_budget() {
    let _serial = serial().await;
    let mut m = Mounted::new("cycles", "", &["--cache-size", "8M"]).await;
    for i in 0..3u64 {
        m.put(&format!("f{i}"), &pattern(3 << 20, i), &[]).await;
    }
    for cycle in 0..3 {
        for i in 0..3u64 {
            open_rw(&m.path(&format!("f{i}")))
                .write_all_at(format!("cycle {cycle}").as_bytes(), 1000)
                .unwrap();
        }
        let (status, stderr) = m.stop();
        assert!(status.success(), "{stderr}");
        let used = dir_bytes(m.cache.path());
        assert!(
            used <= 8 << 20,
            "cycle {cycle}: {used} bytes left with an 8 MiB budget"
        );
        m.start(&["--cache-size", "8M"]);
        assert!(
            leftovers(m.cache.path()).is_empty(),
            "cycle {cycle}: clean copies are dropped at start"
        );
        let locks = std::fs::read_dir(m.cache.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "lock")
            })
            .count();
        assert_eq!(locks, 1, "only the running mount's lock file");
    }
    for i in 0..3u64 {
        let mut expected = pattern(3 << 20, i);
        expected[1000..1007].copy_from_slice(b"cycle 2");
        assert!(m.get(&format!("f{i}")).await == expected);
    }
}

/// The pid of the process `unshare --fork` started (its only child).
fn child_of(pid: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(c) = children.split_whitespace().next() {
            return c.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "unshare started nothing");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The process's pid inside its own PID namespace.
fn pid_in_namespace(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    line.split_whitespace().last().unwrap().parse().unwrap()
}

/// Runs `s3vol mount` as PID 1 of a new PID namespace, as in a container; returns the
/// `unshare` process and the mount process's pid.
fn mount_in_pid_namespace(bucket: &str, mnt: &Path, cache: &Path, log: &Path) -> (Child, u32) {
    let inner = mount_cmd(bucket, mnt, cache, &[], log);
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child"]).arg(BIN);
    cmd.args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::options().append(true).open(log).unwrap());
    let mut child = cmd.spawn().unwrap();
    wait_mounted(&mut child, mnt, log);
    let pid = child_of(child.id());
    (child, pid)
}

#[tokio::test(flavor = "multi_thread")]
async fn staging_files_never_collide_when_a_restarted_mount_gets_the_same_pid() {
    let _serial = serial().await;
    let store = support::store().await;
    let bucket = testing::unique_bucket("pidns");
    store.create_bucket(&bucket).await.unwrap();
    let m = Mounted {
        bucket: bucket.clone(),
        store: store.clone(),
        mnt: tempfile::Builder::new()
            .prefix("s3vol-mnt-")
            .tempdir()
            .unwrap(),
        cache: support::private_tempdir("s3vol-cache-"),
        child: None,
        prefix: String::new(),
    };
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("mount.log");
    let first_a = pattern(100_000, 3);
    m.put("a", &first_a, &[]).await;
    m.put("c", &first_a, &[]).await;

    let (mut first, pid) =
        mount_in_pid_namespace(bucket.as_str(), m.mnt.path(), m.cache.path(), &log);
    assert_eq!(pid_in_namespace(pid), 1);
    let a = open_rw(&m.path("a"));
    a.write_all_at(b"first mount", 10).unwrap();
    let b = File::create(m.path("b")).unwrap();
    b.write_all_at(b"b", 1).unwrap();
    b.write_all_at(b"b", 0).unwrap();
    kill9(pid);
    first.wait().unwrap();
    unmount(m.mnt.path());
    drop((a, b));
    // Another client replaces "a": its leftover must stay as it is.
    m.put("a", b"other client", &[]).await;

    let (mut second, pid) =
        mount_in_pid_namespace(bucket.as_str(), m.mnt.path(), m.cache.path(), &log);
    assert_eq!(pid_in_namespace(pid), 1, "the same pid as the first mount");
    // The same pid stages new files: the first mount's names are not reused.
    let c = open_rw(&m.path("c"));
    c.write_all_at(b"second mount", 10).unwrap();
    let d = File::create(m.path("d")).unwrap();
    d.write_all_at(b"d", 1).unwrap();
    d.write_all_at(b"d", 0).unwrap();
    drop((c, d));
    let mut expected_c = first_a.clone();
    expected_c[10..22].copy_from_slice(b"second mount");
    assert!(m.get("c").await == expected_c);
    assert_eq!(m.get("d").await, b"dd");
    assert_eq!(
        m.get("b").await,
        b"bb",
        "the first mount's new file was uploaded at start"
    );
    assert_eq!(m.get("a").await, b"other client");
    let left = leftovers(m.cache.path());
    let of = |key: &str| {
        let want = format!("s3://{bucket}/{key}");
        left.iter()
            .filter(|(_, k)| *k == want)
            .map(|(p, _)| p.clone())
            .collect::<Vec<_>>()
    };
    assert!(of("b").is_empty(), "uploaded, so dropped: {left:?}");
    let a = of("a");
    assert_eq!(a.len(), 1, "{left:?}");
    assert_eq!(
        &std::fs::read(&a[0]).unwrap()[10..21],
        b"first mount",
        "the leftover was never overwritten"
    );
    kill9(pid);
    second.wait().unwrap();
    unmount(m.mnt.path());
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_is_private_whatever_the_umask_and_a_shared_one_is_refused() {
    let _serial = serial().await;
    let store = support::store().await;
    let bucket = testing::unique_bucket("private");
    store.create_bucket(&bucket).await.unwrap();
    let top = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let log = top.path().join("mount.log");
    let cache = top.path().join("made/by/mount");
    let mut cmd = mount_cmd(bucket.as_str(), mnt.path(), &cache, &[], &log);
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    wait_mounted(&mut child, mnt.path(), &log);
    let f = File::create(mnt.path().join("secret")).unwrap();
    f.write_all_at(b"x", 100).unwrap();
    f.write_all_at(b"y", 0).unwrap();
    assert_eq!(mode_of(&cache), 0o700, "the cache directory");
    let staged: Vec<PathBuf> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        staged
            .iter()
            .any(|p| p.extension().is_some_and(|x| x == "data"))
    );
    for p in &staged {
        assert_eq!(mode_of(p), 0o600, "{}", p.display());
    }
    drop(f);
    unmount(mnt.path());
    child.wait().unwrap();

    for bad in [0o755, 0o770, 0o703] {
        let shared = top.path().join(format!("shared-{bad:o}"));
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(bad)).unwrap();
        let out = mount_cmd(bucket.as_str(), mnt.path(), &shared, &[], &log)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "mounted with a {bad:o} cache directory"
        );
        assert!(
            err.contains(&*shared.to_string_lossy()) && err.contains("chmod 700"),
            "the error names the directory and the fix: {err}"
        );
        assert!(!is_mounted(mnt.path()));
        assert_eq!(
            std::fs::read_dir(&shared).unwrap().count(),
            0,
            "nothing made in it"
        );
        assert_eq!(mode_of(&shared), bad, "and nothing changed");
    }
}

/// A tmpfs of `size` bytes mounted for the test, unmounted when dropped.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn new(size: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs for the cache");
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        unmount(self.dir.path());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_cache_filesystem_fails_writes_with_enospc_until_space_returns() {
    let _serial = serial().await;
    let small = SmallFs::new(4 << 20);
    let cache = small.path().join("cache");
    let store = support::store().await;
    let bucket = testing::unique_bucket("enospc");
    store.create_bucket(&bucket).await.unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("mount.log");
    let mut child = mount_cmd(bucket.as_str(), mnt.path(), &cache, &[], &log)
        .spawn()
        .unwrap();
    wait_mounted(&mut child, mnt.path(), &log);
    let m = Mounted {
        bucket,
        store,
        mnt,
        cache: tempfile::tempdir().unwrap(),
        child: Some(child),
        prefix: String::new(),
    };
    // Leave about 1 MiB free on the cache filesystem.
    let filler_path = small.path().join("filler");
    let mut filler = File::create(&filler_path).unwrap();
    filler.write_all(&vec![1u8; 3 << 20]).unwrap();
    drop(filler);

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("f"))
        .unwrap();
    // Written out of order, so staged on the cache filesystem: 2 MiB do not fit.
    let data = pattern(2 << 20, 9);
    let mut failures = 0;
    for _ in 0..20 {
        let e = f.write_all_at(&data, 1 << 20).unwrap_err();
        assert_eq!(
            errno(&e),
            libc::ENOSPC,
            "consistently ENOSPC, never another error: {e}"
        );
        failures += 1;
    }
    // A failed write past the end leaves no trace: extending the file shows zeros.
    f.set_len(3 << 20).unwrap();
    let mut back = vec![1u8; 3 << 20];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 0), "an extension reads as zeros");

    std::fs::remove_file(&filler_path).unwrap();
    // Space is back: the same file takes writes again.
    f.write_all_at(&data[..1 << 20], 1 << 20).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    drop(f);
    let mut expected = vec![0u8; 3 << 20];
    expected[..4].copy_from_slice(b"head");
    expected[1 << 20..2 << 20].copy_from_slice(&data[..1 << 20]);
    assert!(
        m.get("f").await == expected,
        "zeros where the failed writes were"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let reported = text.matches("the cache filesystem is full").count();
    assert!(
        (1..=2).contains(&reported),
        "{failures} failures logged {reported} times with their cause: {text}"
    );
    assert!(text.contains("free on the cache filesystem"), "{text}");
}

/// Multipart uploads in progress in `bucket`, as the server lists them.
fn multipart_uploads(bucket: &str) -> Vec<String> {
    let keys = testing::credentials();
    let out = Command::new("aws")
        .args([
            "--endpoint-url",
            &testing::endpoint(),
            "--region",
            "us-east-1",
        ])
        .args([
            "s3api",
            "list-multipart-uploads",
            "--output",
            "json",
            "--bucket",
            bucket,
        ])
        .env("AWS_ACCESS_KEY_ID", keys.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", keys.secret_access_key)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("the aws CLI");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["Uploads"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|u| u["UploadId"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_multipart_upload_a_killed_mount_left_is_aborted_at_the_next_start() {
    let _serial = serial().await;
    let mut m = Mounted::new("orphan", "", &["--part-size", "5M"]).await;
    let mut f = File::create(m.path("big")).unwrap();
    for c in pattern(24 << 20, 4).chunks(1 << 20) {
        f.write_all(c).unwrap();
    }
    let journal = std::fs::read_dir(m.cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "meta"))
        .expect("the stream's upload is recorded in the cache journal");
    let record: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&journal)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let upload_id = record["upload_id"].as_str().unwrap().to_owned();
    // Killed with the file open (no process may be started before: see `serial`).
    kill_mount(&mut m);
    drop(f);
    assert_eq!(
        multipart_uploads(m.bucket.as_str()),
        vec![upload_id],
        "left behind"
    );

    m.start(&[]);
    assert!(
        multipart_uploads(m.bucket.as_str()).is_empty(),
        "the next start aborted it"
    );
    assert!(!journal.exists(), "and dropped its record");
    assert!(
        m.head("big").await.is_none(),
        "a stream never closed is not in S3"
    );
}
