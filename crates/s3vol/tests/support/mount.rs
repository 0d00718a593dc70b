//! Test harness: a bucket on the test S3 server mounted with the real `s3vol` binary.
//!
//! Each [`Mounted`] has its own bucket, mount point and cache directory, so tests run in
//! parallel. Dropping it unmounts (lazily, so a hung mount cannot hang the test) and kills the
//! process, even when the test failed.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use s3vol_s3::{AwsStore, BucketName, ObjectInfo, ObjectStore, PutOptions, UserMetadata, testing};
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_s3vol");

/// A runtime for a test's own S3 calls and servers, beside the mount it drives.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The arguments that point `s3vol` at the test server.
pub fn server_args() -> Vec<String> {
    vec![
        "--endpoint-url".into(),
        testing::endpoint(),
        "--region".into(),
        "us-east-1".into(),
        "--force-path-style".into(),
        "--max-attempts".into(),
        "2".into(),
    ]
}

/// A command for the binary with the test server's credentials in its environment.
pub fn s3vol() -> Command {
    s3vol_env(Command::new(BIN))
}

/// `cmd` (`s3vol`, or a program that runs it) with the test server's keys in its environment.
pub fn s3vol_env(mut cmd: Command) -> Command {
    let keys = testing::credentials();
    cmd.env("AWS_ACCESS_KEY_ID", keys.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", keys.secret_access_key)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL");
    cmd
}

pub async fn store() -> Arc<dyn ObjectStore> {
    Arc::new(AwsStore::new(&testing::config()).await)
}

pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let p = path.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

/// Waits until `child` (an `s3vol mount`) has mounted `mnt`; panics with its stderr (when
/// piped) if it exits first, or after 30 s.
pub fn wait_until_mounted(child: &mut Child, mnt: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(mnt) {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("s3vol mount exited ({status}) before mounting: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "mount did not appear within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `ls -ln` of `dir`: name → "mode uid gid size mtime" as ls prints them, sorted by name.
#[allow(dead_code)]
pub fn ls_ln(dir: &Path) -> Vec<(String, String)> {
    let out = std::process::Command::new("ls")
        .args(["-ln", "--time-style=+%s"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ls -ln {} failed: {out:?}",
        dir.display()
    );
    let mut rows: Vec<(String, String)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // mode links uid gid size mtime name
            let what = format!("{} {} {} {} {}", f[0], f[2], f[3], f[4], f[5]);
            (f[6].to_owned(), what)
        })
        .collect();
    rows.sort();
    rows
}

/// close(2) with its result: where s3vol reports a failed upload.
pub fn close(f: std::fs::File) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    let fd = f.into_raw_fd();
    // SAFETY: `fd` was just released by the File and is closed exactly once.
    if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn unmount(path: &Path) {
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: a valid C string; umount2 has no other preconditions.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

pub struct Mounted {
    pub bucket: BucketName,
    pub store: Arc<dyn ObjectStore>,
    pub mnt: TempDir,
    pub cache: TempDir,
    pub child: Option<Child>,
    pub prefix: String,
}

impl Mounted {
    /// Creates a bucket and mounts it (or `prefix` of it) with `extra` arguments.
    pub async fn new(tag: &str, prefix: &str, extra: &[&str]) -> Self {
        let store = store().await;
        let bucket = testing::unique_bucket(tag);
        store.create_bucket(&bucket).await.expect("create bucket");
        Self::on(store, bucket, prefix, extra)
    }

    /// Creates a bucket and the mount's directories, without mounting yet ([`Mounted::start`]
    /// or [`Mounted::start_supervised`] do).
    pub async fn new_unmounted(tag: &str) -> Self {
        let store = store().await;
        let bucket = testing::unique_bucket(tag);
        store.create_bucket(&bucket).await.expect("create bucket");
        Self {
            bucket,
            store,
            mnt: tempfile::Builder::new()
                .prefix("s3vol-mnt-")
                .tempdir()
                .unwrap(),
            cache: private_tempdir("s3vol-cache-"),
            child: None,
            prefix: String::new(),
        }
    }

    /// Mounts an existing bucket.
    pub fn on(
        store: Arc<dyn ObjectStore>,
        bucket: BucketName,
        prefix: &str,
        extra: &[&str],
    ) -> Self {
        let mut m = Self {
            bucket,
            store,
            mnt: tempfile::Builder::new()
                .prefix("s3vol-mnt-")
                .tempdir()
                .unwrap(),
            cache: private_tempdir("s3vol-cache-"),
            child: None,
            prefix: prefix.to_owned(),
        };
        m.start(extra);
        m
    }

    /// Mounts with the default options: supervised (as root), so the child is the supervisor
    /// and the serving process its child.
    pub fn start(&mut self, extra: &[&str]) {
        self.start_raw(extra);
    }

    /// Mounts with `--supervise`: the child is the supervisor, which holds the connection and
    /// runs the serving process as its own child.
    pub fn start_supervised(&mut self, extra: &[&str]) {
        let mut args = vec!["--supervise"];
        args.extend_from_slice(extra);
        self.start_raw(&args);
    }

    /// Mounts with `--supervise` through `endpoint` (a proxy in front of the test server),
    /// with `env` added to the environment of the supervisor and its serving processes.
    pub fn start_supervised_via(&mut self, endpoint: &str, extra: &[&str], env: &[(&str, &str)]) {
        let mut args = vec!["--supervise"];
        args.extend_from_slice(extra);
        self.start_with(Some(endpoint), &args, env);
    }

    fn start_raw(&mut self, extra: &[&str]) {
        self.start_with(None, extra, &[]);
    }

    fn start_with(&mut self, endpoint: Option<&str>, extra: &[&str], env: &[(&str, &str)]) {
        let target = format!("{}/{}", self.bucket, self.prefix);
        let mut server = server_args();
        if let Some(endpoint) = endpoint {
            server[1] = endpoint.to_owned();
        }
        let mut cmd = s3vol();
        cmd.arg("mount")
            .arg(&target)
            .arg(self.mnt.path())
            .args(server)
            .arg("--cache-dir")
            .arg(self.cache.path())
            .arg("-f")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("S3VOL_LOG_LEVEL", "warn")
            .envs(env.iter().copied());
        let mut child = cmd.spawn().expect("spawn s3vol mount");
        wait_until_mounted(&mut child, self.mnt.path());
        // A supervisor mounts before its serving process starts (and scans the cache
        // directory): the first call waits until the mount is served.
        let _ = std::fs::metadata(self.mnt.path());
        self.child = Some(child);
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.path().join(rel)
    }

    pub fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    /// Unmounts and waits for the process; returns its exit status and stderr.
    pub fn stop(&mut self) -> (std::process::ExitStatus, String) {
        unmount(self.mnt.path());
        let mut child = self.child.take().expect("mounted");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return (status, err);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process that serves the mount: the supervisor's child when supervised (the
    /// default as root), else the mount process itself.
    #[allow(dead_code)]
    pub fn serving_pid(&self) -> u32 {
        // Served, so a supervisor has started its serving process.
        let _ = std::fs::metadata(self.mnt.path());
        let pid = self.pid();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return pid;
        };
        tasks
            .flatten()
            .find_map(|t| {
                let children = std::fs::read_to_string(t.path().join("children")).ok()?;
                children.split_whitespace().next()?.parse().ok()
            })
            .unwrap_or(pid)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("mounted").id()
    }

    pub async fn put(&self, rel: &str, body: &[u8], metadata: &[(&str, &str)]) {
        let options = PutOptions {
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<UserMetadata>(),
            ..PutOptions::default()
        };
        self.store
            .put_object(
                &self.bucket,
                &self.key(rel),
                Bytes::copy_from_slice(body),
                &options,
            )
            .await
            .unwrap_or_else(|e| panic!("put {rel}: {e}"));
    }

    pub async fn get(&self, rel: &str) -> Vec<u8> {
        let got = self
            .store
            .get_object(&self.bucket, &self.key(rel), None, None)
            .await
            .unwrap_or_else(|e| panic!("get {rel}: {e}"));
        let chunks: Vec<Bytes> = got.body.try_collect().await.unwrap();
        chunks.concat()
    }

    /// The object's bytes, `None` when there is no such object.
    pub async fn get_opt(&self, rel: &str) -> Option<Vec<u8>> {
        self.head(rel).await?;
        Some(self.get(rel).await)
    }

    pub async fn head(&self, rel: &str) -> Option<ObjectInfo> {
        self.store
            .head_object(&self.bucket, &self.key(rel))
            .await
            .ok()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        unmount(self.mnt.path());
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A temporary directory only its owner can enter, as `s3vol mount` requires of a cache
/// directory.
pub fn private_tempdir(prefix: &str) -> TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// errno of the last failed std::io call.
pub fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// A port on 127.0.0.1 nothing listens on now (for a mount's `--metrics-addr`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The value of the metric `name` (with its labels, if any) on the metrics endpoint at
/// `port`, if it is served.
pub fn gauge(port: u16, name: &str) -> Option<f64> {
    use std::io::Write;
    use std::net::TcpStream;
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits (bounded) until the metric satisfies `ok`; returns its last value.
pub fn wait_gauge(port: u16, name: &str, ok: impl Fn(f64) -> bool) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = gauge(port, name);
        if v.is_some_and(&ok) || Instant::now() >= deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
