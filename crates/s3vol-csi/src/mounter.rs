//! `s3vol mounter`: receives mounted FUSE fds from the node plugin and runs one serving
//! process per staged volume.
//!
//! It needs no privilege: no mount(2), no `/dev/fuse` open — the node plugin did both and sends
//! the open connection ([`crate::handoff`]). For each request it spawns
//!
//! ```text
//! <exe> mount --fuse-fd 3 [--credentials-fd 4] --ready-fd 5 -f \
//!       [--endpoint-url URL] [--region R] [--force-path-style] [--cache-dir DIR] \
//!       [--uid N --gid N --file-mode M --dir-mode M --metadata-ttl S --cache-size B \
//!        --memory-limit B --read-only --listing-attrs --no-xattr] -- BUCKET[/PREFIX] STAGING_PATH
//! ```
//!
//! with the FUSE fd as fd 3, a pipe holding the credentials JSON and a newline as fd 4 (keys,
//! `{"access_key_id", "secret_access_key", "session_token"?}`, or a pod's identity,
//! `{"web_identity": {…}}`; credentials never go into argv or the environment) and a pipe as
//! fd 5 on which the child writes `ready` once it serves. The child gets a session of its own
//! (`setsid`), so signals to the mounter's process group do not reach it; the mounter closes
//! its copies of the fds, so when the child exits the kernel aborts the connection (the mount
//! answers ENOTCONN, which NodeGetVolumeStats reports). A thread per child forwards its
//! stderr to the mounter's log (and keeps the last lines to explain a failed start) and reaps
//! it when it exits.
//!
//! Invariants and lifecycle:
//! - **A failed start says why.** When the ready pipe closes without `ready`, the child is given
//!   [`EXIT_WAIT`] to exit and its last stderr lines are the error; only a child that neither
//!   says `ready` nor exits in time is killed.
//! - **Every served volume is known** (by volume id) until the node plugin asks to stop it
//!   ([`Request::Stop`]): SIGTERM, then a bounded wait. A volume whose process exited cleanly
//!   after a stop has uploaded everything, so its cache directory is removed.
//!   [`Request::Prune`] removes the empty cache directories of volumes no longer staged.
//! - **SIGTERM ends the mounter gracefully** (it is PID 1 of its container): no new volume is
//!   accepted, every serving process gets SIGTERM (each uploads what it holds and exits), and
//!   the mounter waits for them up to its shutdown timeout, which the manifests keep below the
//!   pod's termination grace period. SIGTERM and SIGINT are blocked in every thread and taken
//!   with `sigwait` (the way PID 1 must take them: the kernel drops a default-action signal
//!   sent to a namespace's init); children unblock them before exec.
//! - **Credentials can be rotated** ([`Request::Credentials`]): fd 4 is one end of a unix
//!   socket pair, the mounter keeps the other and writes every update there as one more JSON
//!   line; the serving process answers each update after the first with a line (`ok`, or
//!   `error: why`) once it signs with the new credentials, so the request is `ok` only then.
//!   Writes and the wait for that answer are bounded (a child that stops reading can never
//!   stall the mounter). A mounter that was restarted no longer holds the channels of the
//!   processes it adopted: an update for such a volume fails and says so (the volume gets new
//!   credentials when it is staged again).
//! - Credentials are zeroed once written to the child's pipe, and the process is not dumpable
//!   (set by the `s3vol mounter` command before anything else).

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::pipe::PipeFlags;
use s3vol_s3::BucketName;
use zeroize::Zeroize;

use crate::handoff::{self, MountRequest, Reply, Request, StopRequest};
use crate::volume_id::short_hash;

/// How long a child whose ready pipe closed may take to exit (and say why) before it is killed.
pub const EXIT_WAIT: Duration = Duration::from_secs(10);

/// Settings of the mounter.
#[derive(Clone, Debug)]
pub struct MounterConfig {
    pub socket: PathBuf,
    /// Parent of the per-volume cache directories; `None` leaves `s3vol mount`'s default.
    pub cache_dir: Option<PathBuf>,
    /// The `s3vol` binary to run (`mount …`): normally the running executable.
    pub exe: PathBuf,
    /// How long a child may take to say `ready`.
    pub ready_timeout: Duration,
    /// How long a stop request waits for a serving process to upload and exit.
    pub stop_timeout: Duration,
    /// How long, after SIGTERM, the mounter waits for all its serving processes.
    pub shutdown_timeout: Duration,
}

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts later, so that
/// [`run`] can take them with `sigwait`. Call it first thing, before any other thread exists.
pub fn block_shutdown_signals() -> io::Result<()> {
    let set = shutdown_set();
    // SAFETY: pthread_sigmask with a valid, initialised set and no old-set pointer.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn shutdown_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset adds valid signal numbers to it.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Waits for SIGTERM or SIGINT (blocked beforehand by [`block_shutdown_signals`]).
fn wait_for_shutdown_signal() -> i32 {
    let set = shutdown_set();
    loop {
        let mut sig = 0;
        // SAFETY: sigwait with a valid set and a valid out pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            return sig;
        }
    }
}

/// How a serving process ended.
#[derive(Clone, Debug)]
struct Exit {
    success: bool,
    status: String,
}

/// One serving process, known until the node plugin stops its volume or restages it.
#[derive(Debug)]
struct Served {
    volume: String,
    pid: u32,
    /// The last lines of its stderr.
    tail: Mutex<VecDeque<String>>,
    exit: Mutex<Option<Exit>>,
    exited: Condvar,
    /// Our end of its credentials channel, when it was given credentials.
    credentials: Mutex<Option<UnixStream>>,
}

impl Served {
    fn tail_text(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Waits up to `timeout` for the process to exit (and its stderr to end).
    fn wait_exit(&self, timeout: Duration) -> Option<Exit> {
        let deadline = Instant::now() + timeout;
        let mut exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(e) = &*exit {
                return Some(e.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            exit = self
                .exited
                .wait_timeout(exit, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn is_running(&self) -> bool {
        self.exit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    fn signal(&self, sig: rustix::process::Signal) {
        if !self.is_running() {
            return;
        }
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32)
            && let Err(e) = rustix::process::kill_process(pid, sig)
        {
            tracing::warn!(volume = %self.volume, pid = self.pid, error = %e, "signalling the serving process");
        }
    }
}

/// The mounter's state: the volumes it serves.
#[derive(Debug)]
struct Mounter {
    config: MounterConfig,
    served: Mutex<HashMap<String, Arc<Served>>>,
    shutting_down: AtomicBool,
}

/// Serves requests until SIGTERM or SIGINT, then ends every serving process (bounded by the
/// shutdown timeout) and returns. Call [`block_shutdown_signals`] first.
pub fn run(config: MounterConfig) -> io::Result<()> {
    if let Some(parent) = config.socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // Only the owner (and root, i.e. the node plugin) may hand us volumes.
    let listener = handoff::bind_socket(&config.socket, 0o600)?;
    if let Some(dir) = &config.cache_dir {
        private_dir(dir)?;
    }
    tracing::info!(socket = %config.socket.display(), exe = %config.exe.display(), "mounter serving");
    let mounter = Arc::new(Mounter {
        config,
        served: Mutex::new(HashMap::new()),
        shutting_down: AtomicBool::new(false),
    });
    {
        let mounter = mounter.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let mounter = mounter.clone();
                        std::thread::spawn(move || mounter.handle(stream));
                    }
                    Err(e) => tracing::warn!(error = %e, "accepting a connection"),
                }
            }
        });
    }
    let sig = wait_for_shutdown_signal();
    mounter.shutdown(sig);
    Ok(())
}

impl Mounter {
    fn handle(&self, stream: UnixStream) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let reply = match handoff::recv_frame(&stream) {
            Err(e) => {
                tracing::warn!(error = %e, "reading a request");
                return;
            }
            Ok((body, fd)) => match serde_json::from_slice::<Request>(&body.0) {
                Err(e) => Reply::failed(format!("malformed request: {e}")),
                Ok(Request::Ping) => Reply::ok(None),
                Ok(Request::Mount(req)) => match fd {
                    None => Reply::failed("a mount request must carry the FUSE fd"),
                    Some(_) if self.shutting_down.load(Ordering::SeqCst) => {
                        Reply::failed("the mounter is shutting down")
                    }
                    Some(fd) => {
                        let volume = req.volume_id.clone();
                        match self.serve(*req, fd) {
                            Ok(pid) => Reply::ok(Some(pid)),
                            Err(e) => {
                                tracing::warn!(%volume, error = %e, "volume failed to start");
                                Reply::failed(e)
                            }
                        }
                    }
                },
                Ok(Request::Stop(req)) => self.stop(&req),
                Ok(Request::Prune { keep }) => self.prune(&keep),
                Ok(Request::Credentials(update)) => self.update_credentials(&update),
            },
        };
        let body = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        if let Err(e) = handoff::send_frame(&stream, &body, None) {
            tracing::warn!(error = %e, "sending a reply");
        }
    }

    fn volume_cache_dir(&self, volume_id: &str) -> Option<PathBuf> {
        self.config
            .cache_dir
            .as_ref()
            .map(|d| d.join(short_hash(volume_id)))
    }

    /// SIGTERM to every serving process, then a wait for all of them, bounded.
    fn shutdown(&self, sig: i32) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let served: Vec<Arc<Served>> = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| s.is_running())
            .cloned()
            .collect();
        tracing::info!(
            signal = sig,
            volumes = served.len(),
            timeout_s = self.config.shutdown_timeout.as_secs(),
            "shutting down: asking every serving process to upload what it holds and exit"
        );
        for s in &served {
            s.signal(rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + self.config.shutdown_timeout;
        for s in &served {
            let left = deadline.saturating_duration_since(Instant::now());
            match s.wait_exit(left) {
                Some(e) if e.success => {
                    tracing::info!(volume = %s.volume, pid = s.pid, "serving process exited")
                }
                Some(e) => {
                    tracing::warn!(volume = %s.volume, pid = s.pid, status = %e.status, "serving process exited with an error; what it could not upload stays in its cache directory")
                }
                None => {
                    tracing::error!(volume = %s.volume, pid = s.pid, "serving process still running at the end of the shutdown timeout; it ends with the mounter")
                }
            }
        }
        tracing::info!("mounter stopped");
    }

    /// Ends the serving process of a volume (see [`Request::Stop`]).
    fn stop(&self, req: &StopRequest) -> Reply {
        let known = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&req.volume_id)
            .cloned();
        let Some(s) = known else {
            return self.stop_unknown(req);
        };
        s.signal(rustix::process::Signal::TERM);
        match s.wait_exit(self.config.stop_timeout) {
            None => Reply::failed(format!(
                "the serving process {} of volume {} is still running {} s after SIGTERM (still uploading?)",
                s.pid,
                req.volume_id,
                self.config.stop_timeout.as_secs()
            )),
            Some(exit) => {
                {
                    let mut map = self.served.lock().unwrap_or_else(|p| p.into_inner());
                    if map.get(&req.volume_id).is_some_and(|c| Arc::ptr_eq(c, &s)) {
                        map.remove(&req.volume_id);
                    }
                }
                if exit.success {
                    // Everything it held is in S3: its cache directory holds nothing needed.
                    if let Some(dir) = self.volume_cache_dir(&req.volume_id) {
                        match std::fs::remove_dir_all(&dir) {
                            Ok(()) => {
                                tracing::info!(volume = %req.volume_id, dir = %dir.display(), "removed the cache directory of a stopped volume")
                            }
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(e) => {
                                tracing::warn!(volume = %req.volume_id, dir = %dir.display(), error = %e, "removing the cache directory of a stopped volume")
                            }
                        }
                    }
                } else {
                    tracing::warn!(volume = %req.volume_id, pid = s.pid, status = %exit.status, "serving process ended with an error; its cache directory is kept");
                }
                let tail = s.tail_text();
                Reply {
                    ended: Some(if tail.is_empty() {
                        exit.status
                    } else {
                        format!("{}: {tail}", exit.status)
                    }),
                    ..Reply::ok(Some(s.pid))
                }
            }
        }
    }

    /// A stop for a volume this mounter did not start (it was restarted in between): signal the
    /// recorded pid only if that process is the volume's `s3vol mount --fuse-fd … STAGING`.
    fn stop_unknown(&self, req: &StopRequest) -> Reply {
        let Some(pid) = req.pid else {
            return Reply::ok(None);
        };
        if !is_serving_process(pid, &req.staging_path) {
            return Reply::ok(None);
        }
        if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + self.config.stop_timeout;
        while is_alive(pid) {
            if Instant::now() >= deadline {
                return Reply::failed(format!(
                    "the serving process {pid} of volume {} is still running {} s after SIGTERM",
                    req.volume_id,
                    self.config.stop_timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Reply::ok(Some(pid))
    }

    /// Removes the cache directories of volumes not in `keep` that no process serves and whose
    /// journal says they hold nothing S3 lacks (clean copies, finished records, dead locks).
    /// Data not in S3 is kept and reported with its keys, as is anything the journal does not
    /// explain.
    fn prune(&self, keep: &[String]) -> Reply {
        let Some(root) = &self.config.cache_dir else {
            return Reply::ok(None);
        };
        let mut wanted: Vec<String> = keep.iter().map(|v| short_hash(v)).collect();
        wanted.extend(
            self.served
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(_, s)| s.is_running())
                .map(|(v, _)| short_hash(v)),
        );
        let entries = match std::fs::read_dir(root) {
            Ok(e) => e,
            Err(e) => return Reply::failed(format!("reading {}: {e}", root.display())),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if wanted.contains(&name) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if let Some(original) = name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(".removing"))
            {
                // A prune that did not finish: complete it, or put the directory back.
                let dir = root.join(original);
                if !dir.exists() && std::fs::rename(entry.path(), &dir).is_ok() {
                    prune_dir(&dir);
                }
                continue;
            }
            if name.starts_with('.') {
                continue;
            }
            prune_dir(&entry.path());
        }
        Reply::ok(None)
    }

    /// Starts the serving process for one volume and waits until it serves; returns its pid.
    fn serve(&self, req: MountRequest, fuse: OwnedFd) -> Result<u32, String> {
        serve(self, req, fuse)
    }

    /// Writes new credentials to the pipe of a volume's serving process.
    fn update_credentials(&self, update: &handoff::CredentialsUpdate) -> Reply {
        let volume = &update.volume_id;
        let known = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            .cloned();
        let Some(s) = known.filter(|s| s.is_running()) else {
            return Reply::failed(format!(
                "no serving process of volume {volume} started by this mounter runs (was the mounter restarted since the volume was staged?); new credentials reach it when it is staged again"
            ));
        };
        let mut pipe = s.credentials.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = pipe.as_mut() else {
            return Reply::failed(format!(
                "volume {volume} was staged without credentials of its own (it uses the driver's identity); its credentials cannot be replaced"
            ));
        };
        match write_credentials(w, &update.identity).and_then(|()| read_ack(w)) {
            Ok(()) => {
                tracing::info!(%volume, pid = s.pid, "passed new credentials to the serving process");
                Reply::ok(Some(s.pid))
            }
            Err(e) => {
                tracing::warn!(%volume, pid = s.pid, error = %e, "passing new credentials to the serving process");
                Reply::failed(format!(
                    "passing new credentials to the serving process {} of volume {volume}: {e}",
                    s.pid
                ))
            }
        }
    }
}

/// Creates `dir` (and missing parents) mode 0700 whatever the umask; an existing `dir` is
/// made 0700 too (it holds other volumes' data).
fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Removes one volume's cache directory if nothing in it is needed (see [`Mounter::prune`]).
/// The directory is first renamed aside and checked again there, so a serving process that
/// opened it meanwhile keeps it (it is renamed back) and one starting later gets a new one.
fn prune_dir(dir: &Path) {
    let judge = |d: &Path| s3vol_fs::cache_dir::leftovers(d);
    match judge(dir) {
        Ok(l) if l.disposable() => {}
        Ok(l) if l.in_use => return,
        Ok(l) => {
            let bytes: u64 = l.unsaved.iter().map(|(_, b)| b).sum();
            let keys: Vec<&str> = l.unsaved.iter().map(|(k, _)| k.as_str()).take(10).collect();
            tracing::warn!(dir = %dir.display(), unsaved_files = l.unsaved.len(), unsaved_bytes = bytes, ?keys, unknown_files = l.unknown.len(), "the cache directory of a volume no longer staged holds data that may not be in S3; kept (stage the volume again to upload it, or remove the directory)");
            return;
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "reading a stale cache directory");
            return;
        }
    }
    let Some(name) = dir.file_name() else { return };
    let aside = dir.with_file_name(format!(".{}.removing", name.to_string_lossy()));
    if let Err(e) = std::fs::rename(dir, &aside) {
        tracing::warn!(dir = %dir.display(), error = %e, "moving a stale cache directory aside");
        return;
    }
    if !judge(&aside).is_ok_and(|l| l.disposable()) {
        if let Err(e) = std::fs::rename(&aside, dir) {
            tracing::error!(dir = %dir.display(), aside = %aside.display(), error = %e, "a cache directory taken into use while being pruned could not be moved back");
        }
        return;
    }
    match std::fs::remove_dir_all(&aside) {
        Ok(()) => {
            tracing::info!(dir = %dir.display(), "removed the cache directory of a volume no longer staged")
        }
        Err(e) => {
            tracing::warn!(dir = %aside.display(), error = %e, "removing a stale cache directory")
        }
    }
}

/// Whether `pid` exists and has not exited (a zombie has: it waits only to be reaped).
fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold anything.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X" | "x") | None)
}

/// Whether `pid` is an `s3vol mount --fuse-fd` process serving `staging` (its argv says so).
fn is_serving_process(pid: u32, staging: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let staging = staging.as_os_str().as_encoded_bytes();
    args.contains(&&b"mount"[..]) && args.contains(&&b"--fuse-fd"[..]) && args.contains(&staging)
}

/// Checks the fields that end up in argv, so none can be taken for a flag.
fn validate(req: &MountRequest) -> Result<(), String> {
    BucketName::new(req.bucket.clone()).map_err(|e| e.to_string())?;
    if req.bucket.starts_with('-') {
        return Err(format!("bad bucket {:?}", req.bucket));
    }
    if req.prefix.starts_with('/') || req.prefix.split('/').any(|s| s == "..") {
        return Err(format!("bad prefix {:?}", req.prefix));
    }
    if !req.staging_path.is_absolute() {
        return Err("the staging path must be absolute".into());
    }
    if let Some(e) = &req.endpoint
        && !(e.starts_with("http://") || e.starts_with("https://"))
    {
        return Err(format!("bad endpoint {e:?}"));
    }
    if let Some(r) = &req.region
        && (r.is_empty()
            || !r
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        return Err(format!("bad region {r:?}"));
    }
    Ok(())
}

/// The child's argv (after the program name).
fn child_args(config: &MounterConfig, req: &MountRequest, with_credentials: bool) -> Vec<String> {
    let mut a: Vec<String> = vec!["mount".into(), "--fuse-fd".into(), "3".into()];
    if with_credentials {
        a.extend(["--credentials-fd".into(), "4".into()]);
    }
    a.extend(["--ready-fd".into(), "5".into(), "-f".into()]);
    if let Some(e) = &req.endpoint {
        a.extend(["--endpoint-url".into(), e.clone()]);
    }
    if let Some(r) = &req.region {
        a.extend(["--region".into(), r.clone()]);
    }
    if req.force_path_style {
        a.push("--force-path-style".into());
    }
    if let Some(dir) = &config.cache_dir {
        a.extend([
            "--cache-dir".into(),
            dir.join(short_hash(&req.volume_id)).display().to_string(),
        ]);
    }
    a.extend(req.options.to_args());
    a.push("--".into());
    a.push(
        format!("{}/{}", req.bucket, req.prefix)
            .trim_end_matches('/')
            .to_owned(),
    );
    a.push(req.staging_path.display().to_string());
    a
}

/// Starts the serving process for one volume and waits until it serves; returns its pid.
fn serve(mounter: &Mounter, mut req: MountRequest, fuse: OwnedFd) -> Result<u32, String> {
    let config = &mounter.config;
    validate(&req)?;
    let volume = req.volume_id.clone();
    if let Some(d) = mounter.volume_cache_dir(&volume) {
        private_dir(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let pipe = || rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(|e| format!("pipe: {e}"));
    let (creds, creds_w) = match req.take_identity() {
        Some(mut c) => {
            // Both ends close on exec; the child's copy is made by dup2 below.
            let (r, mut w) = UnixStream::pair().map_err(|e| format!("credentials channel: {e}"))?;
            let bounded = w
                .set_write_timeout(Some(CREDENTIALS_WRITE_TIMEOUT))
                .and_then(|()| w.set_read_timeout(Some(CREDENTIALS_ACK_TIMEOUT)));
            let written = bounded.and_then(|()| write_credentials(&mut w, &c));
            c.wipe();
            written.map_err(|e| format!("writing the credentials channel: {e}"))?;
            // Kept open for rotations; the child reads one JSON line per update.
            (Some(OwnedFd::from(r)), Some(w))
        }
        None => (None, None),
    };
    let (ready_r, ready_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let args = child_args(config, &req, creds.is_some());
    drop(req);

    let sources = [
        fuse.as_raw_fd(),
        creds.as_ref().map_or(-1, |f| f.as_raw_fd()),
        ready_w.as_raw_fd(),
    ];
    let mut cmd = Command::new(&config.exe);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(err_w));
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (setsid, sigprocmask, fcntl, dup2) on fds that stay open in the parent until `spawn`
    // returns; `shutdown_set` only fills a sigset_t on the stack.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // The mounter blocks SIGTERM and SIGINT (it takes them with sigwait); a blocked
            // mask survives exec, and the serving process must see its signals.
            let set = shutdown_set();
            if libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::other("unblocking signals"));
            }
            // Move the sources out of the way first (close-on-exec copies at 10+), so that
            // dup2 onto 3, 4, 5 cannot clobber a source that happens to live there.
            let mut high = [-1; 3];
            for (i, &fd) in sources.iter().enumerate() {
                if fd >= 0 {
                    let h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                    if h < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    high[i] = h;
                }
            }
            for (i, &h) in high.iter().enumerate() {
                if h >= 0 && libc::dup2(h, 3 + i as i32) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    // The child has its copies; ours go now (the fuse fd above all: see the module docs).
    drop(cmd);
    drop(fuse);
    drop(creds);
    drop(ready_w);
    let mut child = spawned.map_err(|e| format!("starting {}: {e}", config.exe.display()))?;
    let pid = child.id();
    tracing::info!(%volume, pid, "started serving process");
    let served = Arc::new(Served {
        volume: volume.clone(),
        pid,
        tail: Mutex::new(VecDeque::new()),
        exit: Mutex::new(None),
        exited: Condvar::new(),
        credentials: Mutex::new(creds_w),
    });
    if let Some(old) = mounter
        .served
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(volume.clone(), served.clone())
        && old.is_running()
    {
        tracing::warn!(%volume, pid = old.pid, "an earlier serving process of this volume still runs");
    }

    // stderr: forwarded line by line, the last lines kept to explain a failure; then the
    // child is reaped and its exit recorded.
    {
        let served = served.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(std::fs::File::from(err_r)).lines() {
                let Ok(line) = line else { break };
                tracing::info!(volume = %served.volume, pid, "mount: {line}");
                let mut t = served.tail.lock().unwrap_or_else(|p| p.into_inner());
                t.push_back(line);
                if t.len() > 20 {
                    t.pop_front();
                }
            }
            let exit = match child.wait() {
                Ok(status) => Exit {
                    success: status.success(),
                    status: status.to_string(),
                },
                Err(e) => Exit {
                    success: false,
                    status: format!("cannot be waited for: {e}"),
                },
            };
            if exit.success {
                tracing::info!(volume = %served.volume, pid, "serving process exited");
            } else {
                tracing::warn!(volume = %served.volume, pid, status = %exit.status, "serving process exited; the volume answers ENOTCONN until it is staged again");
            }
            *served.exit.lock().unwrap_or_else(|p| p.into_inner()) = Some(exit);
            served.exited.notify_all();
        });
    }

    let why = match wait_ready(&ready_r, config.ready_timeout) {
        Ok(()) => return Ok(pid),
        Err(why) => why,
    };
    // Give a child that gave up the time to exit and say why; kill one that hangs.
    let exit = match served.wait_exit(EXIT_WAIT) {
        Some(e) => e,
        None => {
            served.signal(rustix::process::Signal::KILL);
            served.wait_exit(EXIT_WAIT).unwrap_or(Exit {
                success: false,
                status: "killed, still not reaped".into(),
            })
        }
    };
    let tail = served.tail_text();
    Err(if tail.is_empty() {
        format!("s3vol mount {why} ({})", exit.status)
    } else {
        format!("s3vol mount {why} ({}): {tail}", exit.status)
    })
}

/// How long writing an update to a serving process's credentials channel may block.
const CREDENTIALS_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a serving process may take to confirm an update.
const CREDENTIALS_ACK_TIMEOUT: Duration = Duration::from_secs(15);

/// Writes credentials as one JSON line; the encoded bytes are zeroed after. An answer left over
/// from an earlier update that timed out is dropped first, so it cannot pass for this one's.
fn write_credentials(w: &mut UnixStream, c: &s3vol_s3::IdentityDocument) -> io::Result<()> {
    let mut stale = [0u8; 512];
    while matches!(
        rustix::net::recv(&*w, &mut stale, rustix::net::RecvFlags::DONTWAIT),
        Ok((n, _)) if n > 0
    ) {}
    let mut body = serde_json::to_vec(c).map_err(io::Error::other)?;
    body.push(b'\n');
    let written = w.write_all(&body);
    body.zeroize();
    written
}

/// Reads the serving process's answer to an update: `ok`, or `error: why`.
fn read_ack(r: &mut UnixStream) -> io::Result<()> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 1024 {
        match io::Read::read(r, &mut byte) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the serving process closed its credentials channel",
                ));
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the serving process did not confirm the update within {} s",
                        CREDENTIALS_ACK_TIMEOUT.as_secs()
                    ),
                ));
            }
            Err(e) => return Err(e),
        }
    }
    let line = String::from_utf8_lossy(&line);
    match line.trim() {
        "ok" => Ok(()),
        other => Err(io::Error::other(format!(
            "the serving process refused the update: {}",
            other.strip_prefix("error: ").unwrap_or(other)
        ))),
    }
}

/// Waits for the line `ready` on the child's ready pipe.
fn wait_ready(pipe: &OwnedFd, timeout: Duration) -> Result<(), &'static str> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("did not become ready in time");
        }
        let mut fds = [PollFd::new(pipe, PollFlags::IN)];
        let ts = rustix::event::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return Err("could not be watched"),
        }
        let mut buf = [0u8; 64];
        match rustix::io::read(pipe, &mut buf) {
            Ok(0) => return Err("exited before it was ready"),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(5).any(|w| w == b"ready") {
                    return Ok(());
                }
                if got.len() > 4096 {
                    return Err("wrote something else than ready");
                }
            }
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
            Err(_) => return Err("could not be read"),
        }
    }
}

/// Whether `path` is a socket a mounter answers on.
pub fn is_serving(path: &Path) -> bool {
    handoff::call(path, &Request::Ping, None, Duration::from_secs(2)).is_ok_and(|r| r.ok)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::handoff::MountOptions;

    /// A volume's cache directory as a mount that died would leave it: one clean copy, and
    /// optionally one file with data not in S3.
    fn leave_cache_dir(dir: &Path, dirty: bool) {
        use s3vol_fs::cache_dir::{CacheDir, Entry, Record};
        private_dir(dir).unwrap();
        let cache = CacheDir::open(dir).unwrap();
        Entry::new(cache.new_stem())
            .create(4, &Record::new("bkt", "clean"))
            .unwrap();
        if dirty {
            let mut r = Record::new("bkt", "unsaved");
            r.dirty = true;
            Entry::new(cache.new_stem()).create(9, &r).unwrap();
        }
        // Dropping `cache` releases its lock, as the death of its process would.
    }

    #[test]
    fn pruning_removes_what_s3_has_and_keeps_what_it_lacks() {
        let root = tempfile::tempdir().unwrap();
        let clean = root.path().join("aaaa");
        let dirty = root.path().join("bbbb");
        let unfinished = root.path().join("cccc");
        leave_cache_dir(&clean, false);
        leave_cache_dir(&dirty, true);
        leave_cache_dir(&unfinished, false);
        // A prune that stopped after moving the directory aside.
        let aside = root.path().join(".cccc.removing");
        std::fs::rename(&unfinished, &aside).unwrap();
        let mounter = Mounter {
            config: MounterConfig {
                socket: root.path().join("mounter.sock"),
                cache_dir: Some(root.path().to_owned()),
                exe: "/nonexistent/s3vol".into(),
                ready_timeout: Duration::from_secs(1),
                stop_timeout: Duration::from_secs(1),
                shutdown_timeout: Duration::from_secs(1),
            },
            served: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
        };
        assert!(mounter.prune(&[]).ok);
        assert!(!clean.exists(), "clean copies are not worth a directory");
        assert!(
            !aside.exists() && !unfinished.exists(),
            "the unfinished prune completed"
        );
        assert!(dirty.exists(), "data not in S3 is kept");
        let left: Vec<_> = std::fs::read_dir(&dirty).unwrap().collect();
        assert!(!left.is_empty());
    }

    #[test]
    fn pruning_leaves_a_directory_in_use() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("dddd");
        private_dir(&dir).unwrap();
        let _live = s3vol_fs::cache_dir::CacheDir::open(&dir).unwrap();
        prune_dir(&dir);
        assert!(dir.exists(), "a live mount keeps its directory");
    }

    fn req() -> MountRequest {
        MountRequest {
            volume_id: "v".into(),
            bucket: "bkt".into(),
            prefix: "a/b/".into(),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            force_path_style: true,
            options: MountOptions {
                gid: Some(5),
                ..MountOptions::default()
            },
            staging_path: "/stage".into(),
            credentials: None,
            web_identity: None,
        }
    }

    #[test]
    fn argv() {
        let config = MounterConfig {
            socket: "/s".into(),
            cache_dir: Some("/cache".into()),
            exe: "/bin/s3vol".into(),
            ready_timeout: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(1),
        };
        let a = child_args(&config, &req(), true);
        let expected = format!(
            "mount --fuse-fd 3 --credentials-fd 4 --ready-fd 5 -f --endpoint-url http://127.0.0.1:9 \
             --region us-east-1 --force-path-style --cache-dir /cache/{} --gid 5 -- bkt/a/b /stage",
            short_hash("v")
        );
        assert_eq!(a.join(" "), expected);
        let mut r = req();
        r.prefix = String::new();
        let a = child_args(&config, &r, false);
        assert!(!a.contains(&"--credentials-fd".to_string()));
        assert_eq!(a[a.len() - 2], "bkt");
    }

    #[test]
    fn argv_fields_are_checked() {
        assert!(validate(&req()).is_ok());
        let bad: [fn(&mut MountRequest); 6] = [
            |r| r.bucket = "--uid".into(),
            |r| r.prefix = "/x".into(),
            |r| r.prefix = "../x".into(),
            |r| r.region = Some("--x y".into()),
            |r| r.endpoint = Some("-f".into()),
            |r| r.staging_path = "rel".into(),
        ];
        for change in bad {
            let mut r = req();
            change(&mut r);
            assert!(validate(&r).is_err(), "{r:?}");
        }
    }
}
