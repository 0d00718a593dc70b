//! The supervisor of a mount made by hand: it holds the FUSE connection, and the process that
//! serves it can die without the mount going with it.
//!
//! A FUSE connection lives as long as some process holds its `/dev/fuse` descriptor. This
//! process mounts (as root, `kernel.rs`), keeps the descriptor, and runs the filesystem in a
//! child: the same command with `--fuse-fd` and `--session-dir`, where the child journals what a
//! successor needs (`s3vol_fs::journal`). When the child dies without being asked — killed,
//! out of memory, a crash — a successor starts at once on the same descriptor with
//! `--adopt`: no new INIT, the kernel's node IDs and open handles reloaded, and the requests
//! the dead child had read sent again by the kernel (`FUSE_NOTIFY_RESEND`).
//!
//! What ends everything as before: SIGTERM or SIGINT here (passed on to the child, which
//! uploads what is pending and exits; then the mount is taken away), and an unmount (the
//! connection ends, the child exits, and this process sees the connection gone: nothing to
//! restart). The child is started with `PR_SET_PDEATHSIG`, so killing this process kills it too
//! and nothing is left serving a mount nobody watches (the mount then fails as without a
//! supervisor).
//!
//! Credentials given with `--credentials-fd` are read once, kept here in zeroing memory only,
//! and written to each child through a fresh pipe: never argv, environment or files.
//!
//! A child that dies before it reports ready [`MAX_EARLY_DEATHS`] times in a row is not
//! restarted again (a configuration or S3 problem a restart cannot fix): the mount is taken
//! away and the last child's exit status is returned.
//!
//! The rules of restarting (when the connection has ended, the bound, how a child gets its
//! descriptors) are `s3vol_fs::session`'s, shared with the CSI mounter, which does the same
//! for every volume it serves.

use std::ffi::OsString;
use std::io::Write;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::AsyncReadExt;

use anyhow::Context;
use s3vol_fs::session::{RestartBound, connection_gone, describe, place_fds};
use zeroize::Zeroizing;

use super::kernel::{self, OwnMount};
use super::{MountArgs, detach_stdio};

#[cfg(doc)]
use s3vol_fs::session::MAX_EARLY_DEATHS;

/// Whether `s3vol mount` runs under a supervisor: by default (unless `--no-supervise`) when it
/// makes the mount itself as root. Without root the mount is made by `fusermount3`, whose
/// descriptor fuser keeps to itself, so there is nothing to hold.
pub fn wanted(args: &MountArgs) -> bool {
    !args.no_supervise && args.fuse_fd.is_none() && rustix::process::geteuid().is_root()
}

/// The arguments of the child: this command's own, without those the supervisor answers for.
fn child_args(original: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for a in original {
        if skip_value {
            skip_value = false;
            continue;
        }
        let s = a.to_string_lossy();
        match s.as_ref() {
            "--ready-fd" | "--credentials-fd" | "--parts-fd" => {
                skip_value = true;
                continue;
            }
            _ if s.starts_with("--ready-fd=")
                || s.starts_with("--credentials-fd=")
                || s.starts_with("--parts-fd=") =>
            {
                continue;
            }
            // The child serves the supervisor's descriptor; it supervises nothing.
            "--supervise" => continue,
            _ => out.push(a.clone()),
        }
    }
    out
}

/// The private directory where the serving processes of this mount keep their journal: under
/// `/run` (gone at reboot, as the connection is).
fn session_dir() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = PathBuf::from("/run/s3vol/sessions");
    s3vol_fs::session::private_dir(&base)
        .with_context(|| format!("creating {}", base.display()))?;
    let mut id = [0u8; 8];
    // SAFETY: the buffer is valid for its length.
    if unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) } != id.len() as isize {
        return Err(std::io::Error::last_os_error()).context("drawing a session id");
    }
    let name: String = id.iter().map(|b| format!("{b:02x}")).collect();
    sweep(&base);
    let dir = base.join(format!("{}-{name}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Removes the session directories of supervisors that are gone (killed with SIGKILL, so
/// they could not remove their own): named `<pid>-<random>`, and that pid no longer runs.
fn sweep(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

struct Child {
    child: tokio::process::Child,
    /// Reads "ready" once the child serves.
    ready: tokio::fs::File,
}

/// Starts a serving process on `fuse`. Descriptors: 3 the connection, 4 the ready pipe, 5 the
/// credentials pipe (if any), 6 the part buffers' memory file.
fn spawn(
    args: &[OsString],
    fuse: &OwnedFd,
    parts: &OwnedFd,
    session: &Path,
    restarts: u64,
    credentials: Option<&Zeroizing<Vec<u8>>>,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("finding the s3vol executable")?;
    let (ready_r, ready_w) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("pipe")?;
    let creds = match credentials {
        Some(c) => {
            let (r, w) =
                rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("pipe")?;
            Some((r, w, c))
        }
        None => None,
    };
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(args)
        .args(["--fuse-fd", "3", "--ready-fd", "4", "--parts-fd", "6"])
        .arg("--session-dir")
        .arg(session)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false);
    if restarts > 0 {
        cmd.arg("--adopt")
            .arg("--restarts")
            .arg(restarts.to_string());
    }
    if creds.is_some() {
        cmd.args(["--credentials-fd", "5"]);
    }
    let fuse_raw = fuse.as_raw_fd();
    let ready_raw = ready_w.as_raw_fd();
    let creds_raw = creds.as_ref().map(|(r, _, _)| r.as_raw_fd());
    let parts_raw = parts.as_raw_fd();
    let parent = rustix::process::getpid().as_raw_nonzero().get();
    // SAFETY: only async-signal-safe calls between fork and exec (prctl, getppid, fcntl,
    // dup2, _exit); `place_fds` runs there, where it belongs.
    unsafe {
        cmd.pre_exec(move || {
            // Die with the supervisor: nobody would restart or unmount for us.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            place_fds(&[fuse_raw, ready_raw, creds_raw.unwrap_or(-1), parts_raw])
        });
    }
    let child = cmd.spawn().context("starting the serving process")?;
    drop(ready_w);
    if let Some((r, w, c)) = creds {
        drop(r);
        let mut w = std::fs::File::from(w);
        w.write_all(c)
            .context("handing credentials to the serving process")?;
    }
    Ok(Child {
        child,
        ready: tokio::fs::File::from_std(std::fs::File::from(ready_r)),
    })
}

fn exit_code(status: &std::process::ExitStatus) -> ExitCode {
    match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(c.clamp(1, 255) as u8),
        None => ExitCode::from(1),
    }
}

/// What supervision needs before any serving process starts: the mount and its connection,
/// the session directory, the part buffers' memory file.
pub struct Prepared {
    fuse: OwnedFd,
    own: OwnMount,
    session: PathBuf,
    parts: OwnedFd,
}

impl Prepared {
    /// Undoes the preparation (a later step failed before anything was served).
    pub fn abandon(mut self) {
        let _ = self.own.unmount(true);
        let _ = std::fs::remove_dir_all(&self.session);
    }
}

/// Mounts (as root, with mount(2)), and makes the session directory and the part buffers'
/// memory file. On failure nothing is left.
pub fn prepare(args: &MountArgs) -> anyhow::Result<Prepared> {
    let source = format!(
        "s3vol:{}/{}",
        args.target.bucket,
        args.target.prefix.trim_end_matches('/')
    );
    let (fuse, mut own) =
        kernel::mount(&args.mountpoint, &source, args.read_only, args.allow_other)
            .with_context(|| format!("mounting {source} on {}", args.mountpoint.display()))?;
    let session = match session_dir() {
        Ok(s) => s,
        Err(e) => {
            let _ = own.unmount(true);
            return Err(e);
        }
    };
    // Where the serving processes keep part buffers of streamed files: held here, so a
    // serving process that dies leaves them to its successor.
    let parts = match s3vol_fs::parts::create_memfd() {
        Ok(fd) => fd,
        Err(e) => {
            let _ = own.unmount(true);
            let _ = std::fs::remove_dir_all(&session);
            return Err(e).context("making the part buffers' memory file");
        }
    };
    Ok(Prepared {
        fuse,
        own,
        session,
        parts,
    })
}

/// Serves the mount [`prepare`] made through children until it is unmounted or a signal asks
/// to stop. Returns the exit status of the last child.
pub fn run(
    args: MountArgs,
    credentials: Option<Zeroizing<Vec<u8>>>,
    prepared: Prepared,
) -> anyhow::Result<ExitCode> {
    let Prepared {
        fuse,
        mut own,
        session,
        parts,
    } = prepared;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the supervisor's runtime")?;
    let original: Vec<OsString> = std::env::args_os().skip(1).collect();
    let child_args = child_args(&original);
    let result = rt.block_on(supervise(
        &args,
        &child_args,
        &fuse,
        &parts,
        &session,
        credentials.as_ref(),
    ));
    // The mount goes with the supervisor, unless an unmount took it already.
    if !connection_gone(fuse.as_fd()) || result.is_err() {
        finish(&mut own, &args.mountpoint);
    }
    drop(fuse);
    if let Err(e) = std::fs::remove_dir_all(&session) {
        tracing::warn!(error = %e, dir = %session.display(), "cannot remove the session directory");
    }
    result
}

fn finish(own: &mut OwnMount, mountpoint: &Path) {
    match own.unmount(true) {
        Ok(kernel::Unmounted::Detached) => tracing::warn!(
            mountpoint = %mountpoint.display(),
            "the mount is busy (files open); detached it lazily, exiting"
        ),
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, mountpoint = %mountpoint.display(), "unmount failed"),
    }
}

async fn supervise(
    args: &MountArgs,
    child_args: &[OsString],
    fuse: &OwnedFd,
    parts: &OwnedFd,
    session: &Path,
    credentials: Option<&Zeroizing<Vec<u8>>>,
) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let ready_fd = args
        .ready_fd
        .map(|fd| super::owned_fd(fd, "--ready-fd"))
        .transpose()?;
    let mut ready_out = ready_fd.map(std::fs::File::from);
    let mut restarts: u64 = 0;
    let mut bound = RestartBound::default();
    loop {
        let adopt = restarts > 0;
        let started = Instant::now();
        let mut child = spawn(child_args, fuse, parts, session, restarts, credentials)?;
        let pid = child.child.id().unwrap_or(0);
        let mut ready_buf = Vec::new();
        let mut ready_seen = false;
        let mut ready_closed = false;
        let mut stopping = false;
        let status = loop {
            tokio::select! {
                status = child.child.wait() => break status.context("waiting for the serving process")?,
                n = child.ready.read_buf(&mut ready_buf), if !ready_seen && !ready_closed => {
                    if matches!(n, Ok(0) | Err(_)) {
                        // The pipe closed: the child is going away; wait for its status.
                        ready_closed = true;
                        continue;
                    }
                    if ready_buf.starts_with(b"ready") {
                        ready_seen = true;
                        bound.ready();
                        if adopt {
                            tracing::info!(pid, restarts, stall_ms = started.elapsed().as_millis() as u64, "the new serving process took over the mount");
                        } else {
                            // Said once the mount serves (a mount that fails says only why).
                            s3vol_fs::session::log_kernel_failover();
                        }
                        if !adopt && let Some(mut out) = ready_out.take() {
                            let _ = out.write_all(b"ready\n");
                            if args.daemon_child {
                                detach_stdio(args.log_file.as_deref())?;
                            }
                        }
                    }
                }
                _ = term.recv(), if !stopping => {
                    stopping = true;
                    signal_child(pid, rustix::process::Signal::TERM);
                }
                _ = int.recv(), if !stopping => {
                    stopping = true;
                    signal_child(pid, rustix::process::Signal::TERM);
                }
            }
        };
        if stopping {
            return Ok(exit_code(&status));
        }
        if connection_gone(fuse.as_fd()) {
            // Unmounted (or aborted through /sys/fs/fuse): the child's end is the mount's.
            return Ok(exit_code(&status));
        }
        if !ready_seen {
            if restarts == 0 {
                // The first serving process could not start: it said why on stderr.
                return Ok(exit_code(&status));
            }
            if bound.died_before_ready() {
                tracing::error!(
                    why = describe(&status),
                    early_deaths = bound.early_deaths(),
                    "the serving process keeps dying before it is ready; not restarting it again, the mount is taken away"
                );
                return Ok(ExitCode::from(1));
            }
        }
        restarts += 1;
        tracing::warn!(
            pid,
            why = describe(&status),
            restarts,
            at_unix = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs(),
            "the serving process died without being asked; starting a successor on the same connection"
        );
    }
}

fn signal_child(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_child_gets_the_command_without_what_the_supervisor_answers_for() {
        let args: Vec<OsString> = [
            "mount",
            "b",
            "/m",
            "--daemon-child",
            "--supervise",
            "--ready-fd",
            "3",
            "--credentials-fd=7",
            "--log-file",
            "/l",
            "-f",
            "--credentials-fd",
            "9",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let got: Vec<String> = child_args(&args)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            got,
            [
                "mount",
                "b",
                "/m",
                "--daemon-child",
                "--log-file",
                "/l",
                "-f"
            ]
        );
    }
}
