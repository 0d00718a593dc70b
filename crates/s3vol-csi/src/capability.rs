//! Which volume capabilities s3vol serves.
//!
//! Filesystem access only (an object store is no block device), in every access mode: S3 has no
//! notion of attachment, so a volume can be mounted read-write on many nodes at once. What
//! concurrent writers see is s3vol's consistency model (close-to-open; of two writers of the same
//! file the last `close` wins), documented in `docs/csi.md`.

use crate::proto::VolumeCapability;
use crate::proto::volume_capability::AccessType;
use crate::proto::volume_capability::access_mode::Mode;

/// Why a capability is not supported, or `Ok` with whether it only allows reading.
pub fn check(cap: &VolumeCapability) -> Result<bool, String> {
    match &cap.access_type {
        Some(AccessType::Mount(m)) => {
            if !m.fs_type.is_empty() && m.fs_type != "s3vol" && m.fs_type != "fuse.s3vol" {
                return Err(format!(
                    "fs_type {:?} is not supported: s3vol volumes are fuse.s3vol filesystems",
                    m.fs_type
                ));
            }
        }
        Some(AccessType::Block(_)) => {
            return Err("block access is not supported: s3vol volumes are filesystems".into());
        }
        None => return Err("volume_capability.access_type (mount or block) is required".into()),
    }
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly => Ok(true),
        Mode::SingleNodeWriter
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter
        | Mode::MultiNodeSingleWriter
        | Mode::MultiNodeMultiWriter => Ok(false),
        Mode::Unknown => Err("volume_capability.access_mode is required".into()),
    }
}

/// The mount flags and fsGroup of a (mount) capability.
pub fn mount_flags(cap: &VolumeCapability) -> (&[String], &str) {
    match &cap.access_type {
        Some(AccessType::Mount(m)) => (&m.mount_flags, &m.volume_mount_group),
        _ => (&[], ""),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::proto::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(access: Option<AccessType>, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_type: access,
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn capabilities() {
        let mount = || Some(AccessType::Mount(MountVolume::default()));
        assert_eq!(check(&cap(mount(), Mode::MultiNodeMultiWriter)), Ok(false));
        assert_eq!(check(&cap(mount(), Mode::MultiNodeReaderOnly)), Ok(true));
        assert_eq!(check(&cap(mount(), Mode::SingleNodeReaderOnly)), Ok(true));
        assert!(check(&cap(mount(), Mode::Unknown)).is_err());
        assert!(
            check(&cap(
                Some(AccessType::Block(BlockVolume {})),
                Mode::SingleNodeWriter
            ))
            .is_err()
        );
        assert!(check(&cap(None, Mode::SingleNodeWriter)).is_err());
        let ext4 = Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..MountVolume::default()
        }));
        assert!(check(&cap(ext4, Mode::SingleNodeWriter)).is_err());
    }
}
