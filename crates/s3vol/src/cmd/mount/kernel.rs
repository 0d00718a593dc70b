//! The kernel side of a mount that `s3vol mount` makes itself: as root, `mount(2)` of a
//! `/dev/fuse` descriptor this process opened, then served like a handed-over descriptor.
//!
//! Why not let `fuser` mount: its unmount at the end of a session checks whether the mount
//! still exists by polling `/dev/fuse`, which reports an error both while mounted and once
//! unmounted, so it unmounts the path a second time after every `umount` — which fails with
//! `EINVAL` on a plain directory and, when s3vol was mounted over another mount (a tmpfs,
//! another s3vol), takes that mount away. Here the mount is known by its mount ID: it is
//! unmounted only while it is still the mount the path shows, and at most once. Without root,
//! mounting goes through `fusermount3` (fuser's path); see docs/SEMANTICS.md.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, UnmountFlags};

/// A FUSE mount this process made with `mount(2)`.
#[derive(Debug)]
pub struct OwnMount {
    path: PathBuf,
    /// The mount ID (`/proc/self/mountinfo`, first field) of the mount made.
    id: u64,
    unmounted: bool,
}

/// What [`OwnMount::unmount`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Unmounted {
    /// Unmounted now.
    Done,
    /// Busy (files open): detached lazily; it goes once the last file is closed.
    Detached,
    /// Not the mount the path shows any more (unmounted by someone else, or something was
    /// mounted over it): nothing touched.
    NotOurs,
}

/// Opens `/dev/fuse` and mounts it at `path` with the mount options of an s3vol mount.
pub fn mount(
    path: &Path,
    source: &str,
    read_only: bool,
    allow_other: bool,
) -> io::Result<(OwnedFd, OwnMount)> {
    let fd = rustix::fs::open("/dev/fuse", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
    let mut flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOATIME;
    if read_only {
        flags |= MountFlags::RDONLY;
    }
    let mut data = format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions",
        fd.as_raw_fd(),
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    );
    if allow_other {
        data.push_str(",allow_other");
    }
    let data = std::ffi::CString::new(data).map_err(|_| io::ErrorKind::InvalidInput)?;
    let path = s3vol_csi::mounts::normalize(path);
    rustix::mount::mount(
        source,
        &path,
        s3vol_csi::mounts::FSTYPE,
        flags,
        data.as_c_str(),
    )?;
    let Some(id) = top_mount_id(&path)? else {
        return Err(io::Error::other(format!(
            "{} does not show in the mount table after mounting it",
            path.display()
        )));
    };
    Ok((
        fd,
        OwnMount {
            path,
            id,
            unmounted: false,
        },
    ))
}

impl OwnMount {
    /// Unmounts the mount made, if it is still what the path shows; a busy one is detached
    /// lazily when `detach_if_busy`. Never touches any other mount, and acts at most once.
    pub fn unmount(&mut self, detach_if_busy: bool) -> io::Result<Unmounted> {
        if self.unmounted || top_mount_id(&self.path)? != Some(self.id) {
            return Ok(Unmounted::NotOurs);
        }
        let result = match rustix::mount::unmount(&self.path, UnmountFlags::NOFOLLOW) {
            Ok(()) => Ok(Unmounted::Done),
            Err(rustix::io::Errno::BUSY) if detach_if_busy => {
                rustix::mount::unmount(&self.path, UnmountFlags::NOFOLLOW | UnmountFlags::DETACH)
                    .map(|()| Unmounted::Detached)
                    .map_err(io::Error::from)
            }
            Err(e) => Err(e.into()),
        };
        if result.is_ok() {
            self.unmounted = true;
        }
        result
    }
}

/// The ID of the mount `path` shows (the last one listed there), if any.
fn top_mount_id(path: &Path) -> io::Result<Option<u64>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mount_ids_at(&text, path).pop())
}

/// The IDs of the mounts at `path` in a mount table's text, bottom first.
fn mount_ids_at(text: &str, path: &Path) -> Vec<u64> {
    let want = path.as_os_str().as_encoded_bytes();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let id = fields.next()?.parse().ok()?;
            let point = fields.nth(3)?;
            (unescape(point) == want).then_some(id)
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space) of the mount table.
fn unescape(s: &str) -> Vec<u8> {
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
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_top_mount_is_the_last_listed_at_the_path() {
        let text = "\
36 35 98:0 / /mnt/x rw,noatime - tmpfs tmpfs rw
40 36 0:55 / /mnt/x rw,nosuid,nodev - fuse.s3vol s3vol:b/p rw,user_id=0
41 36 0:56 / /mnt/x\\040y rw - fuse.s3vol s3vol:b/q rw,user_id=0
garbage
";
        assert_eq!(mount_ids_at(text, Path::new("/mnt/x")), vec![36, 40]);
        assert_eq!(mount_ids_at(text, Path::new("/mnt/x y")), vec![41]);
        assert!(mount_ids_at(text, Path::new("/mnt")).is_empty());
    }
}
