//! What a process that keeps a FUSE connection across the deaths of its serving processes
//! needs, shared by the two that do: `s3vol mount --supervise` (one mount made by hand) and
//! `s3vol mounter` (every volume of the CSI driver).
//!
//! Both hold the connection's `/dev/fuse` descriptor for the mount's whole life and run the
//! filesystem in a child that journals, in a private session directory, what a successor must
//! know (`journal.rs`). When the child dies without being asked, a successor starts on
//! the same descriptor with `--adopt`. The rules they share live here, so the two cannot drift:
//!
//! - [`connection_gone`]: an unmount (or an abort through `/sys/fs/fuse`) ends the connection,
//!   and with it any reason to restart;
//! - [`RestartBound`]: a child that dies before it reports ready [`MAX_EARLY_DEATHS`] times in
//!   a row has a problem a restart cannot fix (configuration, credentials, S3 unreachable);
//! - [`place_fds`]: how a child gets its descriptors at fixed numbers between fork and exec;
//! - [`private_dir`]: a session directory is the owner's alone (0700), since the journal names
//!   every file an application holds open.
//! - [`log_kernel_failover`]: what a call in flight at a death gets on this kernel, said once
//!   at start (resent and served on Linux 6.9 and later, failed with `EIO` before).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

/// Children that die before reporting ready, in a row, before nobody restarts them again.
pub const MAX_EARLY_DEATHS: u32 = 3;

/// Counts the children that died before they served, in a row.
#[derive(Debug, Default, Clone, Copy)]
pub struct RestartBound {
    early_deaths: u32,
}

impl RestartBound {
    /// A child reported ready: the count starts again.
    pub fn ready(&mut self) {
        self.early_deaths = 0;
    }

    /// A child died before it reported ready; `true` once that happened
    /// [`MAX_EARLY_DEATHS`] times in a row (do not restart it again).
    pub fn died_before_ready(&mut self) -> bool {
        self.early_deaths += 1;
        self.early_deaths >= MAX_EARLY_DEATHS
    }

    /// How many children in a row died before they served.
    pub fn early_deaths(&self) -> u32 {
        self.early_deaths
    }
}

/// Whether the FUSE connection behind `fd` has ended (unmounted or aborted): the kernel then
/// reports `POLLERR` on the descriptor.
pub fn connection_gone(fd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    match unsafe { libc::poll(&mut p, 1, 0) } {
        n if n < 0 => true,
        _ => p.revents & (libc::POLLERR | libc::POLLHUP) != 0,
    }
}

/// How a child ended, in words for logs and volume conditions.
pub fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (_, Some(sig)) => format!("killed by signal {sig} ({})", signal_name(sig)),
        (Some(code), _) => format!("exited with status {code}"),
        _ => status.to_string(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

/// Makes `sources[i]` descriptor `3 + i` of the calling process, without close-on-exec; a
/// negative source leaves its number alone. The sources are first copied out of the way
/// (close-on-exec copies at 10 and up), so that `dup2` onto 3, 4, 5 … clobbers none of them.
///
/// # Safety
///
/// Only between `fork` and `exec` (a `pre_exec` closure): it overwrites descriptors 3 and up,
/// which in any other place belong to someone else. It makes only async-signal-safe calls.
pub unsafe fn place_fds(sources: &[RawFd]) -> io::Result<()> {
    const MAX: usize = 8;
    if sources.len() > MAX {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut high = [-1; MAX];
    for (i, &fd) in sources.iter().enumerate() {
        if fd >= 0 {
            // SAFETY: fcntl on a descriptor number; failure is reported.
            high[i] = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
            if high[i] < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    for (i, &h) in high.iter().take(sources.len()).enumerate() {
        // SAFETY: dup2 between descriptor numbers; the caller owns every number here.
        if h >= 0 && unsafe { libc::dup2(h, 3 + i as i32) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Creates `dir` (and missing parents) mode 0700 whatever the umask, makes an existing one
/// 0700, and refuses a `dir` that exists but is not a directory of this user (someone
/// prepared it to read what it will hold: a session journal names every file open, a cache
/// directory holds volumes' data). For session and cache directories alike.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a directory of uid {me} (owner {})",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if meta.permissions().mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Whether this kernel can send again the FUSE requests a dead serving process had read
/// (`FUSE_NOTIFY_RESEND`, Linux 6.9), judged by its release; `None` if that is unreadable.
/// A kernel with the notification backported says no here and is found out by the successor,
/// which tries it first.
pub fn kernel_resends() -> Option<bool> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    release_resends(&release)
}

fn release_resends(release: &str) -> Option<bool> {
    let mut parts = release.trim().split(['.', '-', '+']);
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    Some((major, minor) >= (6, 9))
}

/// Logs once, at the start of a process that keeps FUSE connections across deaths, what a
/// call in flight when a serving process dies gets on this kernel.
pub fn log_kernel_failover() {
    match kernel_resends() {
        Some(true) => tracing::info!(
            "this kernel resends FUSE requests (Linux 6.9 or later): a call in flight when a serving process dies is served by its successor"
        ),
        Some(false) => tracing::warn!(
            "this kernel cannot resend FUSE requests (FUSE_NOTIFY_RESEND needs Linux 6.9 or later): a call in flight when a serving process dies fails with EIO; the calls after it are served by the successor"
        ),
        None => tracing::warn!(
            "cannot read the kernel's release: a call in flight when a serving process dies is served by its successor on Linux 6.9 and later, and fails with EIO before"
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn three_early_deaths_in_a_row_end_the_restarts_and_a_ready_child_resets_the_count() {
        let mut b = RestartBound::default();
        assert!(!b.died_before_ready());
        assert!(!b.died_before_ready());
        b.ready();
        assert_eq!(b.early_deaths(), 0);
        assert!(!b.died_before_ready());
        assert!(!b.died_before_ready());
        assert!(b.died_before_ready(), "the third in a row gives up");
    }

    #[test]
    fn statuses_in_words() {
        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(describe(&killed), "killed by signal 9 (SIGKILL)");
        let exited = ExitStatus::from_raw(3 << 8);
        assert_eq!(describe(&exited), "exited with status 3");
    }

    #[test]
    fn kernel_releases_that_resend() {
        for (release, resends) in [
            ("6.18.0-1-amd64", Some(true)),
            ("6.9.0", Some(true)),
            ("6.8.12-arch1", Some(false)),
            ("5.15.0-126-generic", Some(false)),
            ("7.0", Some(true)),
            ("4.18.0-553.el8_10.x86_64", Some(false)),
            ("6.10+deb13", Some(true)),
            ("garbage", None),
            ("6", None),
        ] {
            assert_eq!(release_resends(release), resends, "{release}");
        }
    }

    #[test]
    fn a_session_directory_is_private_even_under_a_wide_umask() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let file = root.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(
            private_dir(&file).is_err(),
            "a file is no session directory"
        );
    }

    #[test]
    fn an_unmounted_connection_looks_gone_and_a_live_descriptor_does_not() {
        // A pipe's read end with its writer closed reports POLLHUP, as an ended connection
        // reports POLLERR; with the writer open it reports nothing.
        let mut fds = [0; 2];
        // SAFETY: pipe with a valid array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just made and are owned here.
        let (r, w) = unsafe {
            use std::os::fd::{FromRawFd, OwnedFd};
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        use std::os::fd::AsFd;
        assert!(!connection_gone(r.as_fd()));
        drop(w);
        assert!(connection_gone(r.as_fd()));
    }
}
