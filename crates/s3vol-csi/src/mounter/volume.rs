//! One volume the mounter serves: its serving process of the moment and, with failover, the
//! volume's FUSE connection, held here for the volume's whole life.
//!
//! Without failover (the `failover: "false"` volume parameter, or a mounter without a session
//! directory) this is the mounter as it always was: the serving process alone holds the
//! connection, and when it dies the kernel aborts it (the mount answers ENOTCONN).
//!
//! With failover the connection outlives its serving processes, exactly as under
//! `s3vol mount --supervise` and by the same rules (`s3vol_fs::session`): every serving
//! process journals to the volume's session directory (`--session-dir`), and when one exits
//! without being asked, a successor starts at once on the same descriptor with `--adopt`
//! (no new INIT; node IDs and open handles reloaded from the journal; the requests its
//! predecessor had read sent again by the kernel) and with the newest credentials the volume
//! was given. "Asked" means: a stop (NodeUnstageVolume), the mounter's shutdown, or the
//! connection having ended (an unmount) — those end the volume as before. A successor that
//! dies before it serves [`MAX_EARLY_DEATHS`] times in a row is not replaced again, and why is
//! logged and reported ([`Volume::status`]). Once a volume ends, the mounter's copy of the
//! connection is closed at once, so the mount answers ENOTCONN instead of hanging.
//!
//! Locks, always taken in this order: `life` → `held` → `credentials`. The end of a process is
//! handled under `life`, and a successor is started under it, so a stop or a shutdown (which
//! set `stopping` under `life` and signal the process of the moment) can never miss a
//! successor started at the same time.
//!
//! Credentials (one JSON line, as the serving process reads them) are kept in zeroing memory
//! only, for successors: those the volume was staged with, replaced by each update the serving
//! process confirmed. They reach a process through a socket pair whose other end the mounter
//! keeps for updates; never argv, environment or files.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rustix::event::{PollFd, PollFlags};
use rustix::pipe::PipeFlags;
#[cfg(doc)]
use s3vol_fs::session::MAX_EARLY_DEATHS;
use s3vol_fs::session::{RestartBound, connection_gone, describe, place_fds};
use zeroize::Zeroizing;

use super::signals::shutdown_set;
use crate::handoff::{MountRequest, RestartInfo, VolumeStatus};

/// How long a child whose ready pipe closed may take to exit (and say why) before it is killed.
pub const EXIT_WAIT: Duration = Duration::from_secs(10);

/// How long writing an update to a serving process's credentials channel may block.
const CREDENTIALS_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a serving process may take to confirm an update.
const CREDENTIALS_ACK_TIMEOUT: Duration = Duration::from_secs(15);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a serving process ended.
#[derive(Clone, Debug)]
pub(super) struct Exit {
    pub success: bool,
    pub status: String,
}

/// How to start a volume's serving processes.
#[derive(Debug)]
pub(super) struct Launch {
    pub exe: PathBuf,
    /// The argv after the program name, the same for every process of the volume (with
    /// failover it holds `--session-dir`).
    pub args: Vec<String>,
    pub ready_timeout: Duration,
    /// With failover: the volume's session directory, removed when the volume ends.
    pub session: Option<PathBuf>,
}

/// The life of the volume, across its serving processes.
#[derive(Debug)]
struct Life {
    /// The serving process of the moment.
    pid: u32,
    /// Whether it said `ready`.
    ready: bool,
    /// When it was started.
    started: Instant,
    /// A stop or the mounter's shutdown asked the process of the moment to end: its end is
    /// the volume's.
    stopping: bool,
    /// Set once no process serves the volume and none will be started.
    ended: Option<Exit>,
    /// Why the volume ended though nobody asked (failover off, a start that failed, the
    /// restart bound).
    end_reason: Option<String>,
    restarts: u64,
    last_restart: Option<RestartInfo>,
    bound: RestartBound,
    /// The connection was served by an earlier mounter: its first process here is a successor.
    adopted: bool,
}

/// The credentials channel of the serving process of the moment, and what a successor gets.
#[derive(Default)]
struct Credentials {
    /// Our end of the channel, when the volume has credentials of its own.
    channel: Option<UnixStream>,
    /// The newest credentials the volume was given and its serving process took (one JSON
    /// line), for the next successor.
    newest: Option<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("channel", &self.channel.is_some())
            .field("newest", &self.newest.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// One volume, known until the node plugin stops it or restages it.
#[derive(Debug)]
pub(super) struct Volume {
    pub volume: String,
    launch: Launch,
    /// The volume's configuration, without credentials (those are in `credentials`): what a
    /// node plugin that reclaims the connection gets back.
    request: MountRequest,
    /// With failover, the volume's connection until the volume ends.
    held: Mutex<Option<OwnedFd>>,
    /// With failover, the memory file of its part buffers (made by the node plugin, which
    /// holds it too), handed to every serving process: kept for the volume's life.
    parts: Option<OwnedFd>,
    /// The mounter is shutting down: no successor is started.
    shutting_down: Arc<AtomicBool>,
    life: Mutex<Life>,
    changed: Condvar,
    /// The last lines of its serving processes' stderr.
    tail: Mutex<VecDeque<String>>,
    credentials: Mutex<Credentials>,
}

/// A serving process just started: its pid and the pipe on which it says `ready`.
struct Started {
    pid: u32,
    ready: OwnedFd,
}

impl Volume {
    /// Starts the first serving process of a volume on `fuse`. With failover
    /// (`launch.session`) the connection is kept here; without, the serving process alone
    /// holds it once this returns. Then wait for it with [`Volume::await_first`].
    pub(super) fn start(
        request: MountRequest,
        launch: Launch,
        conn: crate::handoff::Connection,
        identity: Option<Zeroizing<Vec<u8>>>,
        shutting_down: Arc<AtomicBool>,
    ) -> Result<(Arc<Self>, OwnedFd), String> {
        let failover = launch.session.is_some();
        // Without failover nothing outlives the serving process: it streams from its heap.
        let crate::handoff::Connection { fuse, parts } = conn;
        let parts = parts.filter(|_| failover);
        let adopted = request.adopt.is_some() && failover;
        let v = Arc::new(Volume {
            volume: request.volume_id.clone(),
            request,
            launch,
            held: Mutex::new(None),
            parts,
            shutting_down,
            life: Mutex::new(Life {
                pid: 0,
                ready: false,
                started: Instant::now(),
                stopping: false,
                ended: None,
                end_reason: None,
                restarts: 0,
                last_restart: None,
                bound: RestartBound::default(),
                adopted,
            }),
            changed: Condvar::new(),
            tail: Mutex::new(VecDeque::new()),
            credentials: Mutex::new(Credentials::default()),
        });
        let mut life = lock(&v.life);
        let started = if failover {
            let mut held = lock(&v.held);
            let fd = held.insert(fuse);
            let started = v.spawn(
                fd.as_fd(),
                adopted,
                0,
                identity.as_deref().map(Vec::as_slice),
            );
            if started.is_err() {
                drop(held.take());
            }
            started
        } else {
            let started = v.spawn(
                fuse.as_fd(),
                false,
                0,
                identity.as_deref().map(Vec::as_slice),
            );
            // Ours goes now: the serving process alone holds the connection (see above).
            drop(fuse);
            started
        };
        let started = match started {
            Ok(s) => s,
            Err(e) => {
                drop(life);
                if !adopted {
                    v.remove_session();
                }
                return Err(e);
            }
        };
        life.pid = started.pid;
        life.started = Instant::now();
        if failover {
            lock(&v.credentials).newest = identity;
        }
        drop(life);
        tracing::info!(volume = %v.volume, pid = started.pid, failover, adopted, "started serving process");
        Ok((v.clone(), started.ready))
    }

    /// Waits until the first serving process serves and returns its pid; or, if it does not,
    /// gives it [`EXIT_WAIT`] to exit (killing it after that) and returns why, in its own words.
    pub(super) fn await_first(self: &Arc<Self>, ready: OwnedFd) -> Result<u32, String> {
        if lock(&self.life).adopted {
            // A successor: if it does not serve, the restart rules decide what follows.
            let pid = self.pid();
            return self.clone().await_successor(pid, ready).map(|()| pid);
        }
        let why = match wait_ready(&ready, self.launch.ready_timeout) {
            Ok(()) => {
                let mut life = lock(&self.life);
                life.ready = true;
                life.bound.ready();
                return Ok(life.pid);
            }
            Err(why) => why,
        };
        let exit = match self.wait_end(EXIT_WAIT) {
            Some(e) => e,
            None => {
                self.signal(rustix::process::Signal::KILL);
                self.wait_end(EXIT_WAIT).unwrap_or(Exit {
                    success: false,
                    status: "killed, still not reaped".into(),
                })
            }
        };
        let tail = self.tail_text();
        Err(if tail.is_empty() {
            format!("s3vol mount {why} ({})", exit.status)
        } else {
            format!("s3vol mount {why} ({}): {tail}", exit.status)
        })
    }

    /// Starts a serving process on `fuse` — the `restarts`-th successor when above 0, which
    /// adopts the connection — with `identity` on a fresh credentials channel. A thread
    /// forwards its stderr and hands its end to [`Volume::process_ended`]. Called with `life`
    /// locked, so that end is handled only once the caller has recorded the pid.
    fn spawn(
        self: &Arc<Self>,
        fuse: BorrowedFd<'_>,
        adopt: bool,
        restarts: u64,
        identity: Option<&[u8]>,
    ) -> Result<Started, String> {
        let pipe = || rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(|e| format!("pipe: {e}"));
        let (creds, creds_w) = match identity {
            Some(line) => {
                // Both ends close on exec; the child's copy is made by `place_fds`.
                let (r, mut w) =
                    UnixStream::pair().map_err(|e| format!("credentials channel: {e}"))?;
                w.set_write_timeout(Some(CREDENTIALS_WRITE_TIMEOUT))
                    .and_then(|()| w.set_read_timeout(Some(CREDENTIALS_ACK_TIMEOUT)))
                    .and_then(|()| write_credentials(&mut w, line))
                    .map_err(|e| format!("writing the credentials channel: {e}"))?;
                (Some(OwnedFd::from(r)), Some(w))
            }
            None => (None, None),
        };
        let (ready_r, ready_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let mut args = self.launch.args.clone();
        if adopt {
            // Flags go anywhere between `mount` and the `--` that ends them.
            args.splice(
                1..1,
                [
                    "--adopt".to_owned(),
                    "--restarts".to_owned(),
                    restarts.to_string(),
                ],
            );
        }
        if self.parts.is_some() {
            let end = args.iter().position(|a| a == "--").unwrap_or(args.len());
            args.splice(end..end, ["--parts-fd".to_owned(), "6".to_owned()]);
        }
        let sources = [
            fuse.as_raw_fd(),
            creds.as_ref().map_or(-1, |f| f.as_raw_fd()),
            ready_w.as_raw_fd(),
            self.parts.as_ref().map_or(-1, |f| f.as_raw_fd()),
        ];
        let mut cmd = Command::new(&self.launch.exe);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err_w));
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
        // (setsid, sigprocmask, fcntl, dup2) on fds that stay open in the parent until `spawn`
        // returns; `shutdown_set` only fills a sigset_t on the stack; `place_fds` is meant for
        // exactly this place.
        unsafe {
            cmd.pre_exec(move || {
                // A session of its own: signals to the mounter's process group miss it.
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                // The mounter blocks SIGTERM and SIGINT (it takes them with sigwait); a blocked
                // mask survives exec, and the serving process must see its signals.
                let set = shutdown_set();
                if libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) != 0 {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                place_fds(&sources)
            });
        }
        let spawned = cmd.spawn();
        // The child has its copies.
        drop(cmd);
        drop(creds);
        drop(ready_w);
        let child = spawned.map_err(|e| format!("starting {}: {e}", self.launch.exe.display()))?;
        let pid = child.id();
        lock(&self.credentials).channel = creds_w;
        let me = self.clone();
        std::thread::spawn(move || me.watch(child, err_r));
        Ok(Started {
            pid,
            ready: ready_r,
        })
    }

    /// Forwards a serving process's stderr line by line (keeping the last lines to explain a
    /// failure), then reaps it.
    fn watch(self: Arc<Self>, mut child: std::process::Child, err: OwnedFd) {
        let pid = child.id();
        for line in BufReader::new(std::fs::File::from(err)).lines() {
            let Ok(line) = line else { break };
            tracing::info!(volume = %self.volume, pid, "mount: {line}");
            let mut t = lock(&self.tail);
            t.push_back(line);
            if t.len() > 20 {
                t.pop_front();
            }
        }
        let exit = match child.wait() {
            Ok(status) => Exit {
                success: status.success(),
                status: describe(&status),
            },
            Err(e) => Exit {
                success: false,
                status: format!("cannot be waited for: {e}"),
            },
        };
        self.process_ended(pid, exit);
    }

    /// A serving process ended: the volume ends with it, or a successor starts (see the
    /// module docs for which).
    fn process_ended(self: &Arc<Self>, pid: u32, exit: Exit) {
        let mut life = lock(&self.life);
        if life.pid != pid || life.ended.is_some() {
            return;
        }
        let asked = life.stopping || self.shutting_down.load(Ordering::SeqCst);
        let held = lock(&self.held);
        let decision: Result<BorrowedFd<'_>, Option<String>> = match held.as_ref() {
            _ if asked => Err(None),
            None => Err(Some("failover is off for this volume".into())),
            Some(fd) if connection_gone(fd.as_fd()) => Err(None),
            Some(_) if !life.ready && life.restarts == 0 && !life.adopted => Err(Some(
                "the first serving process never served; nothing to take over".into(),
            )),
            Some(_) if !life.ready && life.bound.died_before_ready() => Err(Some(format!(
                "{} serving processes in a row died before they served (a problem a restart \
                 cannot fix: see their last lines in the log), so no other is started",
                life.bound.early_deaths()
            ))),
            Some(fd) => Ok(fd.as_fd()),
        };
        let fd = match decision {
            Ok(fd) => fd,
            Err(reason) => {
                drop(held);
                self.end(&mut life, pid, exit, reason);
                return;
            }
        };
        let restarts = life.restarts + 1;
        let at_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        metrics::counter!("s3vol_mounter_serving_process_restarts_total").increment(1);
        tracing::warn!(
            volume = %self.volume,
            pid,
            why = %exit.status,
            restarts,
            at_unix,
            "the serving process died without being asked; starting a successor on the same connection"
        );
        let identity = lock(&self.credentials).newest.clone();
        match self.spawn(fd, true, restarts, identity.as_deref().map(Vec::as_slice)) {
            Ok(started) => {
                drop(held);
                life.pid = started.pid;
                life.ready = false;
                life.started = Instant::now();
                life.restarts = restarts;
                life.last_restart = Some(RestartInfo {
                    at_unix,
                    why: exit.status,
                    ready_ms: None,
                });
                let me = self.clone();
                let new = started.pid;
                std::thread::spawn(move || me.await_successor(new, started.ready));
            }
            Err(e) => {
                drop(held);
                let reason = format!("cannot start a successor: {e}");
                self.end(&mut life, pid, exit, Some(reason));
            }
        }
    }

    /// Waits for a successor to serve; logs how long the volume went without a server.
    fn await_successor(self: Arc<Self>, pid: u32, ready: OwnedFd) -> Result<(), String> {
        let outcome = wait_ready(&ready, self.launch.ready_timeout);
        let mut life = lock(&self.life);
        if life.pid != pid || life.ended.is_some() {
            return Err(format!("the serving process {pid} ended before it served"));
        }
        match outcome {
            Ok(()) => {
                life.ready = true;
                life.bound.ready();
                let took = life.started.elapsed();
                let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
                if let Some(last) = &mut life.last_restart {
                    last.ready_ms = Some(ms);
                }
                tracing::info!(
                    volume = %self.volume,
                    pid,
                    restarts = life.restarts,
                    adopted = life.adopted,
                    ready_ms = ms,
                    "the successor took over the volume's connection"
                );
                Ok(())
            }
            // Its end (and the restart bound) is `process_ended`'s.
            Err(why) => {
                tracing::warn!(volume = %self.volume, pid, "the successor {why}");
                if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
                Err(format!("the successor {why}"))
            }
        }
    }

    /// The volume ends: no process serves it and none will be started. Our copy of the
    /// connection goes at once (the kernel aborts it once no process holds it, so the mount
    /// answers ENOTCONN rather than hanging), and so does the session directory — except at
    /// the mounter's shutdown, where both stay for the next mounter: the copy until a node
    /// plugin holds one too ([`Volume::parked`]), the journal for the successor.
    fn end(&self, life: &mut Life, pid: u32, exit: Exit, reason: Option<String>) {
        let mut held = lock(&self.held);
        let gone = held.as_ref().is_none_or(|fd| connection_gone(fd.as_fd()));
        if self.shutting_down.load(Ordering::SeqCst) && !gone {
            // The next mounter's successor needs the journal (it prunes it if nobody does).
            tracing::info!(volume = %self.volume, "the session directory and the connection stay for the next mounter");
        } else {
            held.take();
            self.remove_session();
        }
        drop(held);
        match (&reason, exit.success) {
            (None, true) => {
                tracing::info!(volume = %self.volume, pid, "serving process exited")
            }
            (None, false) => {
                tracing::warn!(volume = %self.volume, pid, status = %exit.status, "serving process exited with an error")
            }
            (Some(why), _) => {
                tracing::error!(volume = %self.volume, pid, status = %exit.status, restarts = life.restarts, "serving process ended and is not replaced: {why}; the volume answers ENOTCONN until it is staged again")
            }
        }
        life.ended = Some(exit);
        life.end_reason = reason;
        self.changed.notify_all();
    }

    fn remove_session(&self) {
        if let Some(dir) = &self.launch.session {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(volume = %self.volume, dir = %dir.display(), error = %e, "removing the session directory")
                }
            }
        }
    }

    pub(super) fn pid(&self) -> u32 {
        lock(&self.life).pid
    }

    /// The volume's session directory (with failover).
    pub(super) fn session(&self) -> Option<&std::path::Path> {
        self.launch.session.as_deref()
    }

    /// A copy of the connection, the configuration and the newest credentials, for a node
    /// plugin that was restarted; `None` without failover or once the volume ended.
    pub(super) fn reclaim(&self) -> Option<(crate::handoff::Connection, MountRequest, PathBuf)> {
        let session = self.launch.session.clone()?;
        let fd = crate::handoff::Connection {
            fuse: lock(&self.held).as_ref()?.try_clone().ok()?,
            parts: self.parts.as_ref().and_then(|p| p.try_clone().ok()),
        };
        let mut request = self.request.clone();
        request.adopt = None;
        if let Some(line) = &lock(&self.credentials).newest {
            match serde_json::from_slice::<s3vol_s3::IdentityDocument>(line) {
                Ok(s3vol_s3::IdentityDocument::Keys(k)) => request.credentials = Some(k),
                Ok(s3vol_s3::IdentityDocument::WebIdentity { web_identity }) => {
                    request.web_identity = Some(web_identity)
                }
                Err(e) => {
                    tracing::warn!(volume = %self.volume, error = %e, "reading the credentials kept for successors");
                    return None;
                }
            }
        }
        Some((fd, request, session))
    }

    pub(super) fn tail_text(&self) -> String {
        let t = lock(&self.tail);
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Waits up to `timeout` for the volume to end (its last serving process exited and none
    /// will be started).
    pub(super) fn wait_end(&self, timeout: Duration) -> Option<Exit> {
        let deadline = Instant::now() + timeout;
        let mut life = lock(&self.life);
        loop {
            if let Some(e) = &life.ended {
                return Some(e.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            life = self
                .changed
                .wait_timeout(life, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub(super) fn is_running(&self) -> bool {
        lock(&self.life).ended.is_none()
    }

    /// Whether the volume's process ended at the mounter's shutdown and its connection is
    /// kept here for the next mounter (until a node plugin holds a copy, or the mounter exits).
    pub(super) fn parked(&self) -> bool {
        let life = lock(&self.life);
        life.ended.is_some() && lock(&self.held).is_some()
    }

    /// Whether the mounter holds the volume's connection: served with failover, or parked.
    pub(super) fn holds_connection(&self) -> bool {
        let _life = lock(&self.life);
        lock(&self.held).is_some()
    }

    /// Signals the serving process of the moment.
    pub(super) fn signal(&self, sig: rustix::process::Signal) {
        let life = lock(&self.life);
        self.signal_locked(&life, sig);
    }

    fn signal_locked(&self, life: &Life, sig: rustix::process::Signal) {
        if life.ended.is_some() {
            return;
        }
        if let Some(pid) = rustix::process::Pid::from_raw(life.pid as i32)
            && let Err(e) = rustix::process::kill_process(pid, sig)
        {
            tracing::warn!(volume = %self.volume, pid = life.pid, error = %e, "signalling the serving process");
        }
    }

    /// SIGTERM to the serving process of the moment, whose end is then the volume's: it
    /// uploads what it holds and exits, and no successor follows.
    pub(super) fn ask_to_stop(&self) {
        let mut life = lock(&self.life);
        life.stopping = true;
        self.signal_locked(&life, rustix::process::Signal::TERM);
    }

    /// What a status request answers.
    pub(super) fn status(&self) -> VolumeStatus {
        let life = lock(&self.life);
        VolumeStatus {
            pid: life.pid,
            failover: self.launch.session.is_some(),
            restarts: life.restarts,
            last_restart: life.last_restart.clone(),
            ended: life.ended.as_ref().map(|e| match &life.end_reason {
                Some(why) => format!("{}; {why}", e.status),
                None => e.status.clone(),
            }),
        }
    }

    /// Hands new credentials to the serving process of the moment and waits for it to confirm
    /// them; they are then also what a successor gets. Returns the pid.
    pub(super) fn update_credentials(
        &self,
        identity: &s3vol_s3::IdentityDocument,
    ) -> Result<u32, String> {
        let volume = &self.volume;
        let mut creds = lock(&self.credentials);
        let Some(w) = creds.channel.as_mut() else {
            return Err(format!(
                "volume {volume} was staged without credentials of its own (it uses the driver's identity); its credentials cannot be replaced"
            ));
        };
        let pid = self.pid();
        let line = identity_line(identity)
            .map_err(|e| format!("encoding the credentials of volume {volume}: {e}"))?;
        match write_credentials(w, &line).and_then(|()| read_ack(w)) {
            Ok(()) => {
                if self.launch.session.is_some() {
                    creds.newest = Some(line);
                }
                tracing::info!(%volume, pid, "passed new credentials to the serving process");
                Ok(pid)
            }
            Err(e) => {
                tracing::warn!(%volume, pid, error = %e, "passing new credentials to the serving process");
                Err(format!(
                    "passing new credentials to the serving process {pid} of volume {volume}: {e}"
                ))
            }
        }
    }
}

/// Credentials as the serving process reads them: one JSON line, in zeroing memory. The
/// buffer is sized up front so that encoding does not reallocate (leaving copies behind).
pub(super) fn identity_line(c: &s3vol_s3::IdentityDocument) -> io::Result<Zeroizing<Vec<u8>>> {
    let mut body = Zeroizing::new(Vec::with_capacity(16 * 1024));
    serde_json::to_writer(&mut *body, c).map_err(io::Error::other)?;
    body.push(b'\n');
    Ok(body)
}

/// Writes one credentials line. An answer left over from an earlier update that timed out is
/// dropped first, so it cannot pass for this one's.
fn write_credentials(w: &mut UnixStream, line: &[u8]) -> io::Result<()> {
    let mut stale = [0u8; 512];
    while matches!(
        rustix::net::recv(&*w, &mut stale, rustix::net::RecvFlags::DONTWAIT),
        Ok((n, _)) if n > 0
    ) {}
    w.write_all(line)
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
