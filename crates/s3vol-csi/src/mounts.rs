//! The system calls of the node plugin: opening `/dev/fuse`, mounting it, bind mounts,
//! unmounting, and reading the mount table.
//!
//! The mount table (`/proc/self/mountinfo`) is the source of truth for "is this path mounted,
//! and with what": a `stat` of a mount whose FUSE server died fails with `ENOTCONN` (or hangs,
//! for a server that is alive but stuck), so nothing here that decides whether to mount or
//! unmount ever touches the mounted path itself. Only [`probe`] does, on a helper thread and
//! with a time limit.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, UnmountFlags};

/// The filesystem type of every s3vol FUSE mount (`fuse.<subtype>` in the mount table).
pub const FSTYPE: &str = "fuse.s3vol";

/// The mount source s3vol uses for a bucket and prefix: `s3vol:<bucket>/<prefix>`.
pub fn mount_source(bucket: &str, prefix: &str) -> String {
    format!("s3vol:{bucket}/{prefix}")
}

/// Opens `/dev/fuse` for a new mount.
pub fn open_fuse() -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        "/dev/fuse",
        OFlags::RDWR | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Mounts the FUSE connection `fd` at `path`: `allow_other` and `default_permissions` (the kernel
/// checks mode bits, so pods of any uid can use the volume and s3vol need not re-implement
/// permission checks), always `nosuid,nodev`, read-only when asked.
pub fn mount_fuse(fd: &OwnedFd, path: &Path, source: &str, read_only: bool) -> io::Result<()> {
    let mut flags = MountFlags::NOSUID | MountFlags::NODEV;
    if read_only {
        flags |= MountFlags::RDONLY;
    }
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
        fd.as_raw_fd()
    );
    let data = std::ffi::CString::new(data).map_err(|_| io::ErrorKind::InvalidInput)?;
    rustix::mount::mount(source, path, FSTYPE, flags, data.as_c_str())?;
    Ok(())
}

/// Bind-mounts `source` at `target`, then remounts the bind with `nosuid,nodev` and, when asked,
/// read-only, so the kernel enforces it for everything reaching the volume through `target`.
pub fn bind_mount(source: &Path, target: &Path, read_only: bool) -> io::Result<()> {
    rustix::mount::mount_bind(source, target)?;
    let mut flags = MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV;
    if read_only {
        flags |= MountFlags::RDONLY;
    }
    if let Err(e) = rustix::mount::mount_remount(target, flags, "") {
        let _ = unmount(target, true);
        return Err(e.into());
    }
    Ok(())
}

/// Unmounts `path`; `detach` makes it lazy (`MNT_DETACH`), which always succeeds on a mount
/// point even while files are open or the FUSE server is gone.
pub fn unmount(path: &Path, detach: bool) -> io::Result<()> {
    let flags = if detach {
        UnmountFlags::DETACH | UnmountFlags::NOFOLLOW
    } else {
        UnmountFlags::NOFOLLOW
    };
    Ok(rustix::mount::unmount(path, flags)?)
}

/// Why [`unmount_s3vol`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum UnmountError {
    /// The top mount at the path is not s3vol's: not ours to unmount.
    #[error("a {fstype} mount ({what}) that is not s3vol's")]
    Foreign { fstype: String, what: String },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Unmounts every s3vol mount stacked at `path`, top first, and stops at the first mount that
/// is not s3vol's (`fuse.s3vol` in the mount table), which is left alone. A path with nothing
/// mounted is fine. The mounted path itself is never touched, so a dead mount (ENOTCONN) or a
/// hung one unmounts like any other; a busy mount is detached (the CO has stopped using it).
pub fn unmount_s3vol(path: &Path) -> Result<(), UnmountError> {
    for _ in 0..16 {
        let Some(top) = top_mount_at(path)? else {
            return Ok(());
        };
        if top.fstype != FSTYPE {
            return Err(UnmountError::Foreign {
                fstype: top.fstype,
                what: top.source,
            });
        }
        match unmount(path, false) {
            Ok(()) => {}
            // Listed but not a mount point we can see (another namespace's view): give up below.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(_) => unmount(path, true)?,
        }
    }
    match top_mount_at(path)? {
        None => Ok(()),
        Some(m) if m.fstype != FSTYPE => Err(UnmountError::Foreign {
            fstype: m.fstype,
            what: m.source,
        }),
        Some(_) => Err(io::Error::other(format!(
            "{} is still mounted after unmounting it 16 times",
            path.display()
        ))
        .into()),
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nosuid,nodev,relatime`).
    pub mount_options: String,
    pub fstype: String,
    pub source: String,
    /// The path inside the filesystem that is mounted (`/` unless a bind of a subdirectory).
    pub root: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.mount_options.split(',').any(|o| o == "ro")
    }
}

/// Undoes the octal escapes (`\040` for a space) of the mount table.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of `/proc/self/mountinfo`.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 2 {
                return None;
            }
            Some(MountEntry {
                root: unescape(l[3]),
                mount_point: PathBuf::from(unescape(l[4])),
                mount_options: l[5].to_owned(),
                fstype: r[0].to_owned(),
                source: unescape(r[1]),
            })
        })
        .collect()
}

/// `path` made absolute and free of `.`, `..`, doubled slashes and (in its parent) symlinks,
/// without touching `path` itself, which may be a dead mount.
pub fn normalize(path: &Path) -> PathBuf {
    let lexical: PathBuf = {
        let mut out = PathBuf::new();
        for c in path.components() {
            match c {
                Component::ParentDir => {
                    out.pop();
                }
                Component::CurDir => {}
                other => out.push(other.as_os_str()),
            }
        }
        out
    };
    match (lexical.parent(), lexical.file_name()) {
        (Some(parent), Some(name)) => match parent.canonicalize() {
            Ok(p) => p.join(name),
            Err(_) => lexical,
        },
        _ => lexical,
    }
}

/// Every mount at `path`, bottom first (the last one is what the path shows).
pub fn mounts_at(path: &Path) -> io::Result<Vec<MountEntry>> {
    let want = normalize(path);
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.mount_point == want)
        .collect())
}

/// The mount `path` shows, if any.
pub fn top_mount_at(path: &Path) -> io::Result<Option<MountEntry>> {
    Ok(mounts_at(path)?.pop())
}

/// What a mounted volume answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// It answered `statfs`: bytes (total, free) and inodes (total, free).
    Ok {
        bytes_total: u64,
        bytes_free: u64,
        inodes_total: u64,
        inodes_free: u64,
    },
    /// It answered with an error; `ENOTCONN` means its FUSE server is gone.
    Error(io::ErrorKind, String),
    /// It did not answer in time.
    NoAnswer,
}

impl Health {
    /// Whether the answer says the mount's FUSE server is gone: `ENOTCONN`, or
    /// `ECONNABORTED` for a request that was in flight when the connection was aborted.
    pub fn is_dead(&self) -> bool {
        matches!(
            self,
            Health::Error(
                io::ErrorKind::NotConnected | io::ErrorKind::ConnectionAborted,
                _
            )
        )
    }
}

/// Asks the filesystem at `path` for `statfs`, on a helper thread, waiting at most `timeout`.
pub async fn probe(path: &Path, timeout: Duration) -> Health {
    let path = path.to_owned();
    let task = tokio::task::spawn_blocking(move || rustix::fs::statvfs(&path));
    match tokio::time::timeout(timeout, task).await {
        Err(_) => Health::NoAnswer,
        Ok(Err(join)) => Health::Error(io::ErrorKind::Other, join.to_string()),
        Ok(Ok(Err(errno))) => {
            let e = io::Error::from(errno);
            Health::Error(e.kind(), e.to_string())
        }
        Ok(Ok(Ok(s))) => Health::Ok {
            bytes_total: s.f_blocks.saturating_mul(s.f_frsize),
            bytes_free: s.f_bavail.saturating_mul(s.f_frsize),
            inodes_total: s.f_files,
            inodes_free: s.f_ffree,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "\
36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
100 36 0:55 / /var/lib/k\\040x/stage rw,nosuid,nodev,relatime shared:9 - fuse.s3vol s3vol:b/p/ rw,user_id=0,group_id=0,default_permissions,allow_other
101 36 0:55 / /pods/t ro,nosuid,nodev,relatime - fuse.s3vol s3vol:b/p/ rw,user_id=0
garbage
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].root, "/mnt1");
        assert_eq!(m[1].mount_point, PathBuf::from("/var/lib/k x/stage"));
        assert_eq!(m[1].fstype, FSTYPE);
        assert_eq!(m[1].source, "s3vol:b/p/");
        assert!(!m[1].read_only());
        assert!(m[2].read_only());
    }

    #[test]
    fn normalizing_paths() {
        let tmp = std::env::temp_dir().canonicalize().unwrap();
        let p = tmp.join("a/../b//c/.");
        assert_eq!(normalize(&p), tmp.join("b/c"));
        assert_eq!(normalize(Path::new("/x/y/")), PathBuf::from("/x/y"));
    }
}
