//! `s3vol mounter`: receives mounted FUSE fds from the node plugin and runs one serving
//! process per staged volume — and, unless the volume opts out, a successor whenever that
//! process dies without being asked.
//!
//! It needs no privilege: no mount(2), no `/dev/fuse` open — the node plugin did both and sends
//! the open connection ([`crate::handoff`]). For each request it spawns
//!
//! ```text
//! <exe> mount --fuse-fd 3 [--credentials-fd 4] --ready-fd 5 -f \
//!       [--endpoint-url URL] [--region R] [--force-path-style] [--cache-dir DIR] \
//!       [--session-dir DIR] \
//!       [--uid N --gid N --file-mode M --dir-mode M --metadata-ttl S --cache-size B \
//!        --memory-limit B --read-only --listing-attrs --no-xattr] -- BUCKET[/PREFIX] STAGING_PATH
//! ```
//!
//! with the FUSE fd as fd 3, one end of a unix socket pair holding the credentials JSON and a
//! newline as fd 4 (keys, `{"access_key_id", "secret_access_key", "session_token"?}`, or a
//! pod's identity, `{"web_identity": {…}}`; credentials never go into argv or the environment)
//! and a pipe as fd 5 on which the child writes `ready` once it serves. The child gets a
//! session of its own (`setsid`), so signals to the mounter's process group do not reach it.
//! A thread per child forwards its stderr to the mounter's log (and keeps the last lines to
//! explain a failed start) and reaps it when it exits.
//!
//! **Failover** (the default; `failover: "false"` in the StorageClass parameters or volume
//! attributes turns it off, see `docs/csi.md`): the mounter keeps the volume's FUSE descriptor
//! for the volume's whole life, every serving process journals in the volume's session
//! directory (`--session-dir`), and when one dies without being asked — killed, out of
//! memory, crashed — a successor adopts the same connection within a second, with the same
//! configuration and the newest credentials the volume was given; the applications see a
//! stall, not an error. The rules are those of `s3vol mount --supervise` (`volume` has the
//! details, `s3vol_fs::session` the shared parts): a stop, the mounter's shutdown or an
//! unmount end a volume as before, and successors that keep dying before they serve are not
//! replaced forever. Each restart is logged (volume, why, how long the successor took) and
//! counted (`s3vol_mounter_serving_process_restarts_total`), and [`Request::Status`] reports
//! it to the node plugin for NodeGetVolumeStats. Without failover the mounter closes its copy
//! of the descriptor once the child has it, so when the child exits the kernel aborts the
//! connection (the mount answers ENOTCONN, which NodeGetVolumeStats reports).
//!
//! **Session directories** live under `--session-dir` (default `<cache-dir>/.sessions`: the
//! manifests give the mounter that hostPath directory, mode 0700, and nothing else on disk
//! that outlives a container; the journal must outlive a serving process, and the mounter's
//! container too): one private directory per connection, `<volume hash>-<n>`, removed when
//! the volume ends. A mounter numbers its own above every number it finds there.
//!
//! **The mounter's own end.** The node plugin keeps a copy of every failover volume's
//! connection too (see `node`), so when the mounter goes — killed with its container, or
//! replaced by an upgrade (SIGTERM: every serving process uploads what it holds and exits,
//! and the session directories stay) — the mounts stall instead of failing, and the node
//! plugin hands each connection to the next mounter with [`MountRequest::adopt`] naming its
//! session directory. That mounter first ends any serving process of the volume an earlier
//! mounter left running (SIGTERM, then SIGKILL after the stop timeout: two processes must
//! never serve one connection), then starts one with `--adopt`, exactly as for a successor.
//! [`Request::Volumes`] (who this mounter is, which volumes it knows and which ended) is what
//! the node plugin watches; [`Request::Reclaim`] gives a restarted node plugin its copies back.
//! [`Request::Prune`] removes the session directories of earlier mounters that no volume
//! took up.
//!
//! Invariants and lifecycle:
//! - **A failed start says why.** When the ready pipe closes without `ready`, the child is given
//!   [`EXIT_WAIT`] to exit and its last stderr lines are the error; only a child that neither
//!   says `ready` nor exits in time is killed. A first process that never served is not
//!   replaced.
//! - **Every served volume is known** (by volume id) until the node plugin asks to stop it
//!   ([`Request::Stop`]): SIGTERM, then a bounded wait. A volume whose process exited cleanly
//!   after a stop has uploaded everything, so its cache directory is removed.
//!   [`Request::Prune`] removes the empty cache directories of volumes no longer staged.
//! - **SIGTERM ends the mounter gracefully** (it is PID 1 of its container): no new volume is
//!   accepted, every serving process gets SIGTERM (each uploads what it holds and exits, and
//!   none is replaced), and the mounter waits for them up to its shutdown timeout, which the
//!   manifests keep below the pod's termination grace period. SIGTERM and SIGINT are blocked
//!   in every thread and taken with `sigwait` (`signals`); children unblock them before exec.
//! - **A shutdown lets go of no connection that only it holds.** A rollout of both DaemonSets
//!   may end the node plugin while the mounter drains. So the mounter keeps its copy of every
//!   failover connection whose process it ended ("parked") and answers volume lists as
//!   `draining`: a node plugin started meanwhile takes copies with [`Request::Reclaim`]. The
//!   mounter exits once a node plugin that is not leaving has said, after the last process
//!   ended, that it holds every parked connection ([`Request::Volumes`] `held`) — at once
//!   when the node plugin runs on, as in a rollout of the mounter alone — or at the end of
//!   the shutdown timeout, naming the volumes that then end (ENOTCONN). The node plugin has
//!   the other half of the rule: it does not exit while it holds the only copies (`node`).
//! - **Credentials can be rotated** ([`Request::Credentials`]): the mounter keeps its end of
//!   the socket pair and writes every update there as one more JSON line; the serving process
//!   answers each update after the first with a line (`ok`, or `error: why`) once it signs
//!   with the new credentials, so the request is `ok` only then, and only then are they what
//!   a successor gets. Writes and the wait for that answer are bounded (a child that stops
//!   reading can never stall the mounter). A mounter that was restarted no longer holds the
//!   channels of the processes it adopted: an update for such a volume fails and says so (the
//!   volume gets new credentials when it is staged again).
//! - Credentials are kept only in zeroing memory (with failover, for successors) and the
//!   process is not dumpable (set by the `s3vol mounter` command before anything else).

use s3vol_fs::session::private_dir;
use std::collections::HashMap;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use s3vol_s3::BucketName;

use crate::handoff::{self, MountRequest, Reply, Request, StopRequest};
use crate::volume_id::short_hash;

mod signals;
mod volume;

pub use signals::block_shutdown_signals;
use signals::wait_for_shutdown_signal;
pub use volume::EXIT_WAIT;
use volume::{Launch, Volume};

/// Settings of the mounter.
#[derive(Clone, Debug)]
pub struct MounterConfig {
    pub socket: PathBuf,
    /// Parent of the per-volume cache directories; `None` leaves `s3vol mount`'s default.
    pub cache_dir: Option<PathBuf>,
    /// Parent of the per-volume session directories (failover); `None`: volumes are served
    /// without failover.
    pub session_dir: Option<PathBuf>,
    /// The `s3vol` binary to run (`mount …`): normally the running executable.
    pub exe: PathBuf,
    /// How long a child may take to say `ready`.
    pub ready_timeout: Duration,
    /// How long a stop request waits for a serving process to upload and exit.
    pub stop_timeout: Duration,
    /// How long, after SIGTERM, the mounter waits for all its serving processes.
    pub shutdown_timeout: Duration,
}

/// The mounter's state: the volumes it serves.
#[derive(Debug)]
struct Mounter {
    config: MounterConfig,
    served: Mutex<HashMap<String, Arc<Volume>>>,
    shutting_down: Arc<AtomicBool>,
    /// Numbers the session directories of this mounter's connections.
    sessions: AtomicU64,
    /// The first number of this mounter's session directories: those below are earlier
    /// mounters'.
    first_session: u64,
    /// This process, distinct for every start ([`Reply::instance`]).
    instance: String,
    /// What a node plugin last said it holds ([`Request::Volumes`] with `held`).
    node_report: Mutex<Option<NodeReport>>,
    /// When a node plugin last asked for the volume list without saying what it holds (one
    /// older than this mounter, which cannot take connections from a draining mounter).
    older_node_seen: Mutex<Option<Instant>>,
}

/// A node plugin's word on the connections it holds copies of.
#[derive(Debug)]
struct NodeReport {
    at: Instant,
    held: std::collections::HashSet<String>,
    /// It is about to exit: its copies go with it.
    leaving: bool,
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
    match &config.session_dir {
        Some(dir) => {
            private_dir(dir)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        }
        None => tracing::warn!(
            "no session directory (--session-dir or --cache-dir): volumes are served without failover, a serving process that dies takes its volume with it"
        ),
    }
    tracing::info!(socket = %config.socket.display(), exe = %config.exe.display(), session_dir = ?config.session_dir, "mounter serving");
    if config.session_dir.is_some() {
        s3vol_fs::session::log_kernel_failover();
    }
    let first_session = config.session_dir.as_deref().map_or(0, next_session_number);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mounter = Arc::new(Mounter {
        config,
        served: Mutex::new(HashMap::new()),
        shutting_down: Arc::new(AtomicBool::new(false)),
        sessions: AtomicU64::new(first_session),
        first_session,
        instance: format!("{}-{}", std::process::id(), started.as_nanos()),
        node_report: Mutex::new(None),
        older_node_seen: Mutex::new(None),
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
            Ok((body, fds)) => match serde_json::from_slice::<Request>(&body.0) {
                Err(e) => Reply::failed(format!("malformed request: {e}")),
                Ok(Request::Ping) => Reply {
                    instance: Some(self.instance.clone()),
                    ..Reply::ok(None)
                },
                Ok(Request::Mount(req)) => match handoff::Connection::from_fds(fds) {
                    None => Reply::failed("a mount request must carry the FUSE fd"),
                    Some(_) if self.shutting_down.load(Ordering::SeqCst) => {
                        Reply::failed("the mounter is shutting down")
                    }
                    Some(fd) => {
                        let volume = req.volume_id.clone();
                        let adopting = req.adopt.is_some();
                        match self.serve(*req, fd) {
                            Ok((pid, session_dir)) => Reply {
                                session_dir,
                                ..Reply::ok(Some(pid))
                            },
                            Err(e) if adopting => {
                                tracing::warn!(%volume, error = %e, "cannot take up the connection an earlier mounter served");
                                Reply::failed(e)
                            }
                            Err(e) => {
                                tracing::warn!(%volume, error = %e, "volume failed to start");
                                Reply::failed(e)
                            }
                        }
                    }
                },
                Ok(Request::Volumes { held, leaving }) => {
                    let answered = held.is_some();
                    match held {
                        Some(held) => {
                            *self.node_report.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(NodeReport {
                                    at: Instant::now(),
                                    held: held.into_iter().collect(),
                                    leaving,
                                })
                        }
                        None => {
                            *self
                                .older_node_seen
                                .lock()
                                .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now())
                        }
                    }
                    self.volumes(answered)
                }
                Ok(Request::Reclaim(req)) => {
                    let (reply, fd) = self.reclaim(&req.volume_id);
                    let body =
                        serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
                    let body = handoff::Frame(body);
                    let fds = fd
                        .as_ref()
                        .map(handoff::Connection::fds)
                        .unwrap_or_default();
                    if let Err(e) = handoff::send_frame(&stream, &body.0, &fds) {
                        tracing::warn!(error = %e, "sending a reply");
                    }
                    return;
                }
                Ok(Request::Stop(req)) => self.stop(&req),
                Ok(Request::Prune { keep }) => self.prune(&keep),
                Ok(Request::Credentials(update)) => self.update_credentials(&update),
                Ok(Request::Status(req)) => self.status(&req.volume_id),
            },
        };
        let body = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        if let Err(e) = handoff::send_frame(&stream, &body, &[]) {
            tracing::warn!(error = %e, "sending a reply");
        }
    }

    fn volume_cache_dir(&self, volume_id: &str) -> Option<PathBuf> {
        self.config
            .cache_dir
            .as_ref()
            .map(|d| d.join(short_hash(volume_id)))
    }

    fn known(&self, volume_id: &str) -> Option<Arc<Volume>> {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume_id)
            .cloned()
    }

    /// SIGTERM to every serving process (none is replaced), then a wait for all of them,
    /// bounded.
    fn shutdown(&self, sig: i32) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let served: Vec<Arc<Volume>> = self
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
            s.ask_to_stop();
        }
        let deadline = Instant::now() + self.config.shutdown_timeout;
        for s in &served {
            let left = deadline.saturating_duration_since(Instant::now());
            match s.wait_end(left) {
                Some(e) if e.success => {
                    tracing::info!(volume = %s.volume, pid = s.pid(), "serving process exited")
                }
                Some(e) => {
                    tracing::warn!(volume = %s.volume, pid = s.pid(), status = %e.status, "serving process exited with an error; what it could not upload stays in its cache directory")
                }
                None => {
                    tracing::error!(volume = %s.volume, pid = s.pid(), "serving process still running at the end of the shutdown timeout; it ends with the mounter")
                }
            }
        }
        self.await_node_copies(deadline);
        tracing::info!("mounter stopped");
    }

    /// Keeps the parked connections (see the module docs) until a node plugin that is not
    /// leaving says, after they were parked, that it holds them all; at most until `deadline`.
    fn await_node_copies(&self, deadline: Instant) {
        let parked: Vec<String> = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, v)| v.parked())
            .map(|(id, _)| id.clone())
            .collect();
        if parked.is_empty() {
            return;
        }
        let since = Instant::now();
        let older = *self
            .older_node_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let reported = self
            .node_report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if !reported && older.is_some_and(|t| t.elapsed() < Duration::from_secs(5)) {
            tracing::warn!(
                volumes = parked.len(),
                "the node plugin is of an older version that keeps its copies without saying so; letting go of this mounter's copies as that version expects (upgrade the node plugins first)"
            );
            return;
        }
        tracing::info!(
            volumes = parked.len(),
            "keeping this mounter's copies of the connections until the node plugin holds them (a node plugin restarting now takes them from here)"
        );
        loop {
            let missing: Vec<&String> = {
                let report = self.node_report.lock().unwrap_or_else(|p| p.into_inner());
                match &*report {
                    Some(r) if r.at >= since && !r.leaving => {
                        parked.iter().filter(|id| !r.held.contains(*id)).collect()
                    }
                    _ => parked.iter().collect(),
                }
            };
            if missing.is_empty() {
                tracing::info!(
                    volumes = parked.len(),
                    waited_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "the node plugin holds every connection; they wait for the next mounter"
                );
                return;
            }
            if Instant::now() >= deadline {
                tracing::error!(
                    volumes = ?missing,
                    "no node plugin took these connections before the end of the shutdown timeout: they end with this mounter, and their mounts answer ENOTCONN until staged again"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ends the serving process of a volume (see [`Request::Stop`]); no successor follows.
    fn stop(&self, req: &StopRequest) -> Reply {
        let Some(s) = self.known(&req.volume_id) else {
            return self.stop_unknown(req);
        };
        s.ask_to_stop();
        match s.wait_end(self.config.stop_timeout) {
            None => Reply::failed(format!(
                "the serving process {} of volume {} is still running {} s after SIGTERM (still uploading?)",
                s.pid(),
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
                    tracing::warn!(volume = %req.volume_id, pid = s.pid(), status = %exit.status, "serving process ended with an error; its cache directory is kept");
                }
                let tail = s.tail_text();
                Reply {
                    ended: Some(if tail.is_empty() {
                        exit.status
                    } else {
                        format!("{}: {tail}", exit.status)
                    }),
                    ..Reply::ok(Some(s.pid()))
                }
            }
        }
    }

    /// How a volume's serving process fares (see [`Request::Status`]).
    fn status(&self, volume_id: &str) -> Reply {
        match self.known(volume_id) {
            Some(s) => Reply {
                status: Some(s.status()),
                ..Reply::ok(Some(s.pid()))
            },
            None => Reply::failed(format!(
                "this mounter does not serve volume {volume_id} (was it restarted since the volume was staged?)"
            )),
        }
    }

    /// A stop for a volume this mounter did not start (it was restarted in between): signal the
    /// recorded pid if that process is the volume's `s3vol mount --fuse-fd … STAGING`, else the
    /// process that is (the recorded one may have been replaced by a successor since).
    fn stop_unknown(&self, req: &StopRequest) -> Reply {
        let recorded = req
            .pid
            .filter(|&pid| is_serving_process(pid, &req.staging_path));
        let Some(pid) = recorded.or_else(|| find_serving_process(&req.staging_path)) else {
            return Reply::ok(None);
        };
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
        if self.shutting_down.load(Ordering::SeqCst) {
            // Its parked connections' session directories are the next mounter's to take up.
            return Reply {
                draining: true,
                ..Reply::failed(
                    "the mounter is shutting down; the next mounter prunes what nobody took up",
                )
            };
        }
        let mut wanted: Vec<String> = keep.iter().map(|v| short_hash(v)).collect();
        self.prune_sessions(&wanted);
        let Some(root) = &self.config.cache_dir else {
            return Reply::ok(None);
        };
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

    /// Starts the serving process for one volume and waits until it serves; returns its pid
    /// and, with failover, its session directory.
    fn serve(
        &self,
        req: MountRequest,
        conn: handoff::Connection,
    ) -> Result<(u32, Option<PathBuf>), String> {
        serve(self, req, conn)
    }

    /// Every volume this mounter knows, and whether it ended. Refused while shutting down:
    /// the volumes that end then wait for the next mounter, and must not be reported as
    /// ended for good.
    /// The answer to [`Request::Volumes`]; `draining` for a node plugin that understands it
    /// (`answered`, it said what it holds) once the mounter shuts down, listing the
    /// connections it still holds.
    fn volumes(&self, answered: bool) -> Reply {
        let draining = self.shutting_down.load(Ordering::SeqCst);
        if draining && !answered {
            return Reply::failed("the mounter is shutting down");
        }
        let volumes = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, v)| !draining || v.holds_connection())
            .map(|(id, v)| handoff::KnownVolume {
                volume_id: id.clone(),
                ended: !draining && !v.is_running(),
            })
            .collect();
        Reply {
            instance: Some(self.instance.clone()),
            volumes: Some(volumes),
            draining,
            ..Reply::ok(None)
        }
    }

    /// A copy of a volume's connection, its configuration and newest credentials, for a node
    /// plugin that was restarted (see [`Request::Reclaim`]).
    fn reclaim(&self, volume_id: &str) -> (Reply, Option<handoff::Connection>) {
        let draining = self.shutting_down.load(Ordering::SeqCst);
        let held = self
            .known(volume_id)
            .filter(|v| draining || v.is_running())
            .and_then(|v| v.reclaim());
        match held {
            Some((fd, request, session_dir)) => (
                Reply {
                    request: Some(Box::new(request)),
                    session_dir: Some(session_dir),
                    ..Reply::ok(None)
                },
                Some(fd),
            ),
            None => (
                Reply::failed(format!(
                    "this mounter holds no connection of volume {volume_id}"
                )),
                None,
            ),
        }
    }

    /// Writes new credentials to the channel of a volume's serving process.
    fn update_credentials(&self, update: &handoff::CredentialsUpdate) -> Reply {
        let volume = &update.volume_id;
        let Some(s) = self.known(volume).filter(|s| s.is_running()) else {
            return Reply::failed(format!(
                "no serving process of volume {volume} started by this mounter runs (was the mounter restarted since the volume was staged?); new credentials reach it when it is staged again"
            ));
        };
        match s.update_credentials(&update.identity) {
            Ok(pid) => Reply::ok(Some(pid)),
            Err(e) => Reply::failed(e),
        }
    }
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

/// The volume hash and number of a session directory's name (`<volume hash>-<n>`), if it is one.
fn session_name(name: &std::ffi::OsStr) -> Option<(&str, u64)> {
    let (h, n) = name.to_str()?.split_once('-')?;
    let ok = h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then_some(())?;
    Some((h, n.parse().ok()?))
}

/// One above the highest number of the session directories in `root` (0 when none).
fn next_session_number(root: &Path) -> u64 {
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| session_name(&e.file_name()).map(|(_, n)| n + 1))
        .max()
        .unwrap_or(0)
}

impl Mounter {
    /// Removes the session directories earlier mounters left that no volume of this one took
    /// up (nothing else there is touched): their connections are gone, or were handed to this
    /// mounter under their directory's name and are in use.
    ///
    /// `staged`: the [`short_hash`]es of the volumes still staged on the node. Such a volume
    /// may not have been handed to this mounter yet (its node plugin asks for a prune when it
    /// starts, and again until a mounter that is not shutting down answers): its journal
    /// stays for the hand-over.
    fn prune_sessions(&self, staged: &[String]) {
        let Some(root) = &self.config.session_dir else {
            return;
        };
        let in_use: Vec<PathBuf> = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|v| v.is_running())
            .filter_map(|v| v.session().map(Path::to_owned))
            .collect();
        for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some((hash, n)) = session_name(&name) else {
                continue;
            };
            let earlier = n < self.first_session;
            if !earlier || in_use.contains(&entry.path()) || staged.iter().any(|h| h == hash) {
                continue;
            }
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::info!(dir = %entry.path().display(), "removed a session directory no volume took up")
                }
                Err(e) => {
                    tracing::warn!(dir = %entry.path().display(), error = %e, "removing an earlier mounter's session directory")
                }
            }
        }
    }
}

/// The `s3vol mount --fuse-fd` process serving `staging`, if one runs (looked for in `/proc`).
fn find_serving_process(staging: &Path) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| pid != std::process::id() && is_serving_process(pid, staging) && is_alive(pid))
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
fn child_args(
    config: &MounterConfig,
    req: &MountRequest,
    with_credentials: bool,
    session: Option<&Path>,
) -> Vec<String> {
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
    if let Some(dir) = session {
        a.extend(["--session-dir".into(), dir.display().to_string()]);
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

/// Starts the serving process for one volume and waits until it serves; returns its pid and,
/// with failover, its session directory.
fn serve(
    mounter: &Mounter,
    mut req: MountRequest,
    conn: handoff::Connection,
) -> Result<(u32, Option<PathBuf>), String> {
    let config = &mounter.config;
    validate(&req)?;
    let volume = req.volume_id.clone();
    if let Some(d) = mounter.volume_cache_dir(&volume) {
        private_dir(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    if let Some(dir) = req.adopt.clone() {
        if let Some(v) = mounter.known(&volume).filter(|v| v.is_running()) {
            // Handed in twice: this mounter serves it already (the fd handed in goes).
            return Ok((v.pid(), v.session().map(Path::to_owned)));
        }
        check_adoptable(config, &volume, &dir)?;
        // Two processes must never serve one connection.
        end_earlier_serving_process(&req.staging_path, config.stop_timeout)?;
        tracing::info!(%volume, session = %dir.display(), "taking up a connection an earlier mounter served");
    }
    let session = match (&config.session_dir, req.failover) {
        _ if req.adopt.is_some() => req.adopt.clone(),
        (Some(root), true) => {
            let n = mounter.sessions.fetch_add(1, Ordering::SeqCst);
            let dir = root.join(format!("{}-{n}", short_hash(&volume)));
            private_dir(&dir).map_err(|e| {
                format!(
                    "creating the session directory {} (set the volume parameter failover: \"false\" to serve it without one): {e}",
                    dir.display()
                )
            })?;
            Some(dir)
        }
        (None, true) => {
            tracing::warn!(%volume, "the mounter has no session directory: serving the volume without failover");
            None
        }
        (_, false) => None,
    };
    let identity = match req.take_identity() {
        Some(mut doc) => {
            let line = volume::identity_line(&doc);
            doc.wipe();
            Some(line.map_err(|e| format!("encoding the credentials: {e}"))?)
        }
        None => None,
    };
    let args = child_args(config, &req, identity.is_some(), session.as_deref());
    let launch = Launch {
        exe: config.exe.clone(),
        args,
        ready_timeout: config.ready_timeout,
        session: session.clone(),
    };
    let (served, ready) =
        Volume::start(req, launch, conn, identity, mounter.shutting_down.clone())?;
    if let Some(old) = mounter
        .served
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(volume.clone(), served.clone())
        && old.is_running()
    {
        tracing::warn!(%volume, pid = old.pid(), "an earlier serving process of this volume still runs");
    }
    served.await_first(ready).map(|pid| (pid, session))
}

/// Whether `dir` can hold the journal of a connection of `volume` an earlier mounter served:
/// a session directory of this mounter's root, named for the volume, still there.
fn check_adoptable(config: &MounterConfig, volume: &str, dir: &Path) -> Result<(), String> {
    let Some(root) = &config.session_dir else {
        return Err(
            "this mounter has no session directory (--session-dir or --cache-dir), so it cannot take up a connection".into(),
        );
    };
    let named = dir.parent() == Some(root.as_path())
        && dir
            .file_name()
            .and_then(session_name)
            .is_some_and(|(h, _)| h == short_hash(volume));
    if !named {
        return Err(format!(
            "{} is not a session directory of volume {volume} under {}",
            dir.display(),
            root.display()
        ));
    }
    if !dir.is_dir() {
        return Err(format!(
            "the session directory {} is gone, and with it what a successor must know of the connection",
            dir.display()
        ));
    }
    Ok(())
}

/// Ends the serving process an earlier mounter left on a connection this one takes up (only
/// that mounter died): SIGTERM — it uploads what it holds and exits, leaving its journal —
/// then SIGKILL once `wait` has passed.
fn end_earlier_serving_process(staging: &Path, wait: Duration) -> Result<(), String> {
    let Some(pid) = find_serving_process(staging) else {
        return Ok(());
    };
    tracing::warn!(pid, staging = %staging.display(), "an earlier mounter's serving process still runs on this connection; ending it before a successor takes over");
    let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
        return Ok(());
    };
    let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
    let deadline = Instant::now() + wait;
    while is_alive(pid) {
        if Instant::now() >= deadline {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            let killed = Instant::now() + Duration::from_secs(5);
            while is_alive(pid) {
                if Instant::now() >= killed {
                    return Err(format!(
                        "the earlier serving process {pid} of {} does not end",
                        staging.display()
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Whether `path` is a socket a mounter answers on.
pub fn is_serving(path: &Path) -> bool {
    handoff::call(path, &Request::Ping, &[], Duration::from_secs(2)).is_ok_and(|r| r.ok)
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
                session_dir: None,
                exe: "/nonexistent/s3vol".into(),
                ready_timeout: Duration::from_secs(1),
                stop_timeout: Duration::from_secs(1),
                shutdown_timeout: Duration::from_secs(1),
            },
            served: Mutex::new(HashMap::new()),
            shutting_down: Arc::new(AtomicBool::new(false)),
            sessions: AtomicU64::new(0),
            first_session: 0,
            node_report: Mutex::new(None),
            older_node_seen: Mutex::new(None),
            instance: "test".into(),
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
            failover: true,
            adopt: None,
        }
    }

    #[test]
    fn argv() {
        let config = MounterConfig {
            socket: "/s".into(),
            cache_dir: Some("/cache".into()),
            session_dir: Some("/sessions".into()),
            exe: "/bin/s3vol".into(),
            ready_timeout: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(1),
        };
        let a = child_args(&config, &req(), true, Some(Path::new("/sessions/x-0")));
        let expected = format!(
            "mount --fuse-fd 3 --credentials-fd 4 --ready-fd 5 -f --endpoint-url http://127.0.0.1:9 \
             --region us-east-1 --force-path-style --cache-dir /cache/{} \
             --session-dir /sessions/x-0 --gid 5 -- bkt/a/b /stage",
            short_hash("v")
        );
        assert_eq!(a.join(" "), expected);
        let mut r = req();
        r.prefix = String::new();
        let a = child_args(&config, &r, false, None);
        assert!(!a.contains(&"--session-dir".to_string()));
        assert!(!a.contains(&"--credentials-fd".to_string()));
        assert_eq!(a[a.len() - 2], "bkt");
    }

    fn config(root: &Path) -> MounterConfig {
        MounterConfig {
            socket: root.join("mounter.sock"),
            cache_dir: Some(root.to_owned()),
            session_dir: Some(root.join(".sessions")),
            exe: "/nonexistent/s3vol".into(),
            ready_timeout: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_mounter_numbers_its_sessions_above_earlier_ones_and_prunes_those_nobody_took_up() {
        let root = tempfile::tempdir().unwrap();
        let config = config(root.path());
        let sessions = config.session_dir.clone().unwrap();
        private_dir(&sessions).unwrap();
        assert_eq!(next_session_number(&sessions), 0);
        let h = short_hash("v");
        for name in [
            format!("{h}-3"),
            format!("{h}-10"),
            "notes".into(),
            "x-99".into(),
        ] {
            std::fs::create_dir(sessions.join(name)).unwrap();
        }
        let first = next_session_number(&sessions);
        assert_eq!(
            first, 11,
            "above the highest earlier number, whatever else is there"
        );
        let mounter = Mounter {
            config,
            served: Mutex::new(HashMap::new()),
            shutting_down: Arc::new(AtomicBool::new(false)),
            sessions: AtomicU64::new(first),
            first_session: first,
            instance: "test".into(),
            node_report: Mutex::new(None),
            older_node_seen: Mutex::new(None),
        };
        // One of this mounter's own, made after it started, is not an earlier one.
        std::fs::create_dir(sessions.join(format!("{h}-11"))).unwrap();
        // An earlier one of a volume the node plugin still has staged waits for its hand-over.
        let staged = short_hash("staged");
        std::fs::create_dir(sessions.join(format!("{staged}-4"))).unwrap();
        let left = || {
            let mut left: Vec<String> = std::fs::read_dir(&sessions)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            left.sort();
            left
        };
        mounter.prune_sessions(std::slice::from_ref(&staged));
        let mut want = vec![
            format!("{h}-11"),
            format!("{staged}-4"),
            "notes".into(),
            "x-99".into(),
        ];
        want.sort();
        assert_eq!(left(), want);
        // Once it is unstaged, its journal goes.
        mounter.prune_sessions(&[]);
        want.retain(|n| n != &format!("{staged}-4"));
        assert_eq!(left(), want);
    }

    #[test]
    fn only_a_session_directory_of_the_volume_can_be_taken_up() {
        let root = tempfile::tempdir().unwrap();
        let config = config(root.path());
        let sessions = config.session_dir.clone().unwrap();
        let good = sessions.join(format!("{}-4", short_hash("v")));
        private_dir(&good).unwrap();
        assert!(check_adoptable(&config, "v", &good).is_ok());
        let other = sessions.join(format!("{}-4", short_hash("w")));
        private_dir(&other).unwrap();
        let outside = root.path().join(format!("{}-5", short_hash("v")));
        private_dir(&outside).unwrap();
        let gone = sessions.join(format!("{}-6", short_hash("v")));
        for (dir, why) in [
            (&other, "not a session directory of volume v"),
            (&outside, "not a session directory of volume v"),
            (&gone, "is gone"),
        ] {
            let e = check_adoptable(&config, "v", dir).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let mut none = config.clone();
        none.session_dir = None;
        assert!(
            check_adoptable(&none, "v", &good)
                .unwrap_err()
                .contains("no session directory")
        );
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
