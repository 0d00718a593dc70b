//! The node plugin's state directory: one record per staged volume.
//!
//! The node plugin keeps nothing else between restarts (DESIGN.md decision 7): after a restart
//! it reads these records, checks each against the mount table, and so "adopts" the volumes a
//! previous incarnation staged — their serving processes never depended on it.
//!
//! Invariants:
//! - one file per volume, `<dir>/<sha256(volume_id)>.json`, so any volume id is a safe name;
//! - written atomically (temporary file, fsync, rename, fsync of the directory), mode 0600;
//! - never a secret in a record (the credentials went to the mounter and nowhere else).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::handoff::MountOptions;
use crate::volume_id::hex;

/// What the node plugin knows about one staged volume.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StagedVolume {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub bucket: String,
    pub prefix: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub force_path_style: bool,
    #[serde(default)]
    pub options: MountOptions,
    /// The serving process, as the mounter reported it (in its pid namespace).
    #[serde(default)]
    pub pid: Option<u32>,
}

impl StagedVolume {
    /// Whether a new stage request asks for the same mount as this record.
    pub fn same_mount(&self, other: &StagedVolume) -> bool {
        self.staging_path == other.staging_path
            && self.bucket == other.bucket
            && self.prefix == other.prefix
            && self.endpoint == other.endpoint
            && self.region == other.region
            && self.force_path_style == other.force_path_style
            && self.options == other.options
    }
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating it, mode 0700) the state directory.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file_for(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!(
            "{}.json",
            hex(&Sha256::digest(volume_id.as_bytes()))
        ))
    }

    /// Writes (or replaces) the record of a volume, atomically.
    pub fn save(&self, v: &StagedVolume) -> io::Result<()> {
        let path = self.file_for(&v.volume_id);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let body = serde_json::to_vec_pretty(v).map_err(io::Error::other)?;
        {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        fs::File::open(&self.dir)?.sync_all()
    }

    pub fn load(&self, volume_id: &str) -> io::Result<Option<StagedVolume>> {
        match fs::read(self.file_for(volume_id)) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn remove(&self, volume_id: &str) -> io::Result<()> {
        match fs::remove_file(self.file_for(volume_id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => fs::File::open(&self.dir)?.sync_all(),
        }
    }

    /// Every record, by volume id. Unreadable files are reported and skipped.
    pub fn load_all(&self) -> io::Result<BTreeMap<String, StagedVolume>> {
        let mut out = BTreeMap::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<StagedVolume>(&b).map_err(|e| e.to_string()))
            {
                Ok(v) => {
                    out.insert(v.volume_id.clone(), v);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable state record")
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn record(id: &str) -> StagedVolume {
        StagedVolume {
            volume_id: id.into(),
            staging_path: "/stage".into(),
            bucket: "b".into(),
            prefix: "".into(),
            endpoint: None,
            region: Some("r".into()),
            force_path_style: true,
            options: MountOptions::default(),
            pid: Some(42),
        }
    }

    #[test]
    fn records_round_trip_privately() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("state")).unwrap();
        assert_eq!(dir.load("a/b").unwrap(), None);
        dir.save(&record("a/b")).unwrap();
        dir.save(&record("../../etc/passwd")).unwrap();
        assert_eq!(dir.load("a/b").unwrap(), Some(record("a/b")));
        let all = dir.load_all().unwrap();
        assert_eq!(all.len(), 2);
        for entry in fs::read_dir(dir.path()).unwrap() {
            let e = entry.unwrap();
            assert_eq!(e.metadata().unwrap().permissions().mode() & 0o777, 0o600);
            assert_eq!(e.file_name().len(), 64 + 5);
        }
        assert_eq!(
            fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::write(dir.path().join("junk.json"), b"{").unwrap();
        assert_eq!(dir.load_all().unwrap().len(), 2);
        dir.remove("a/b").unwrap();
        dir.remove("a/b").unwrap();
        assert_eq!(dir.load("a/b").unwrap(), None);
    }
}
