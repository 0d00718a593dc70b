//! The on-bucket attribute format, compatible with s3fs (and ossfs, cosfs, rclone).
//!
//! - `x-amz-meta-mode`: decimal `st_mode` including the file-type bits;
//! - `x-amz-meta-uid`, `x-amz-meta-gid`: decimal ids;
//! - `x-amz-meta-mtime`, `-ctime`, `-atime`: Unix seconds; a time with sub-second precision
//!   gets a fraction of exactly nine digits (`1321009871.250000000`), as s3fs writes it: s3fs
//!   reads the digits after the dot as a count of nanoseconds, so a shorter fraction would
//!   come back to it a million times too small. On read, any fraction is a decimal fraction
//!   (which agrees with s3fs for nine digits and reads rclone's shorter ones right);
//! - `x-amz-meta-xattr`: URL-encoded JSON object of attribute name → base64 value;
//! - directories are `dir/` objects with `Content-Type: application/x-directory`;
//! - symlinks are objects whose body is the target and whose mode has `S_IFLNK`.
//!
//! Objects without these headers get the mount's defaults; a malformed header is ignored
//! (logged once per object) rather than making the object unreadable.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use s3vol_s3::UserMetadata;

use crate::config::FsConfig;

pub(crate) const DIR_CONTENT_TYPE: &str = "application/x-directory";

/// What kind of node an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

impl Kind {
    pub(crate) fn type_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
        }
    }
}

/// Extended attributes: name → raw value.
pub type Xattrs = BTreeMap<String, Vec<u8>>;

/// The POSIX attributes of one node, as stored on the bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct Attrs {
    pub kind: Kind,
    /// Permission bits (and setuid/setgid/sticky), without the type bits.
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub atime: SystemTime,
    pub xattrs: Xattrs,
}

impl Attrs {
    /// Attributes of a node that has no metadata of its own.
    pub fn defaults(kind: Kind, config: &FsConfig, size: u64, time: SystemTime) -> Self {
        Attrs {
            kind,
            perm: match kind {
                Kind::File => config.file_mode,
                Kind::Dir => config.dir_mode,
                Kind::Symlink => 0o777,
            },
            uid: config.uid,
            gid: config.gid,
            size,
            mtime: time,
            ctime: time,
            atime: time,
            xattrs: Xattrs::new(),
        }
    }

    /// Decodes the attributes of an object from its user metadata. `kind` is what the key's
    /// shape says (a `dir/` key is a directory); a mode with other type bits wins for files
    /// (that is how symlinks are marked).
    pub fn decode(
        kind: Kind,
        metadata: &UserMetadata,
        config: &FsConfig,
        size: u64,
        last_modified: SystemTime,
    ) -> Self {
        let mut attrs = Attrs::defaults(kind, config, size, last_modified);
        if let Some(mode) = metadata
            .get("mode")
            .and_then(|m| m.trim().parse::<u32>().ok())
        {
            attrs.perm = (mode & 0o7777) as u16;
            let typ = mode & libc::S_IFMT;
            if kind == Kind::File {
                if typ == libc::S_IFLNK {
                    attrs.kind = Kind::Symlink;
                } else if typ == libc::S_IFDIR {
                    // Old s3fs wrote directories as `dir` objects with a directory mode.
                    attrs.kind = Kind::Dir;
                }
            }
        }
        if let Some(uid) = metadata.get("uid").and_then(|v| v.trim().parse().ok()) {
            attrs.uid = uid;
        }
        if let Some(gid) = metadata.get("gid").and_then(|v| v.trim().parse().ok()) {
            attrs.gid = gid;
        }
        if let Some(t) = metadata.get("mtime").and_then(|v| parse_time(v)) {
            attrs.mtime = t;
        }
        attrs.ctime = metadata
            .get("ctime")
            .and_then(|v| parse_time(v))
            .unwrap_or(attrs.mtime);
        attrs.atime = metadata
            .get("atime")
            .and_then(|v| parse_time(v))
            .unwrap_or(attrs.mtime);
        if let Some(x) = metadata.get("xattr") {
            attrs.xattrs = decode_xattrs(x).unwrap_or_default();
        }
        attrs
    }

    /// The user metadata that stores these attributes.
    pub fn encode(&self) -> UserMetadata {
        let mut m = UserMetadata::new();
        m.insert(
            "mode".into(),
            (self.kind.type_bits() | u32::from(self.perm)).to_string(),
        );
        m.insert("uid".into(), self.uid.to_string());
        m.insert("gid".into(), self.gid.to_string());
        m.insert("mtime".into(), format_time(self.mtime));
        m.insert("ctime".into(), format_time(self.ctime));
        m.insert("atime".into(), format_time(self.atime));
        if !self.xattrs.is_empty() {
            m.insert("xattr".into(), encode_xattrs(&self.xattrs));
        }
        m
    }

    /// The content type to store with the object.
    pub fn content_type(&self) -> Option<String> {
        match self.kind {
            Kind::Dir => Some(DIR_CONTENT_TYPE.to_owned()),
            Kind::File | Kind::Symlink => Some("application/octet-stream".to_owned()),
        }
    }
}

/// Parses Unix seconds with an optional fractional part (`1700000000`, `1700000000.25`).
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let nanos = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        if !digits.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        format!("{digits:0<9}").parse::<u32>().ok()?
    };
    if secs >= 0 {
        Some(UNIX_EPOCH + Duration::new(secs as u64, nanos))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    }
}

/// Formats Unix seconds as s3fs does: whole seconds as an integer, otherwise with the
/// nanoseconds as nine digits (s3fs parses the digits after the dot as nanoseconds).
pub fn format_time(t: SystemTime) -> String {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d.subsec_nanos() == 0 => d.as_secs().to_string(),
        Ok(d) => format!("{}.{:09}", d.as_secs(), d.subsec_nanos()),
        Err(e) => format!("-{}", e.duration().as_secs()),
    }
}

/// What s3fs escapes in the xattr header: everything but unreserved characters.
const XATTR_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn encode_xattrs(x: &Xattrs) -> String {
    let map: BTreeMap<&str, String> = x.iter().map(|(k, v)| (k.as_str(), B64.encode(v))).collect();
    let json = serde_json::to_string(&map).unwrap_or_else(|_| "{}".to_owned());
    utf8_percent_encode(&json, XATTR_ESCAPE).to_string()
}

/// The longest `x-amz-meta-xattr` header decoded. S3 keeps 2 KiB of user metadata per object;
/// other stores allow more, but nothing legitimate comes near this.
const MAX_XATTR_HEADER: usize = 64 << 10;

fn decode_xattrs(s: &str) -> Option<Xattrs> {
    if s.len() > MAX_XATTR_HEADER {
        tracing::warn!(len = s.len(), "x-amz-meta-xattr header too long: ignored");
        return None;
    }
    let json = percent_decode_str(s).decode_utf8().ok()?;
    let map: BTreeMap<String, String> = serde_json::from_str(&json).ok()?;
    map.into_iter()
        .map(|(k, v)| B64.decode(v.as_bytes()).ok().map(|v| (k, v)))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use s3vol_s3::BucketName;

    fn config() -> FsConfig {
        let mut c = FsConfig::new(
            BucketName::new("bkt").unwrap(),
            String::new(),
            "/tmp".into(),
        );
        c.uid = 1000;
        c.gid = 1001;
        c
    }

    fn md(pairs: &[(&str, &str)]) -> UserMetadata {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn objects_without_metadata_get_the_defaults() {
        let t = UNIX_EPOCH + Duration::from_secs(1_600_000_000);
        let a = Attrs::decode(Kind::File, &UserMetadata::new(), &config(), 42, t);
        assert_eq!(
            (a.kind, a.perm, a.uid, a.gid, a.size, a.mtime),
            (Kind::File, 0o644, 1000, 1001, 42, t)
        );
        let d = Attrs::decode(Kind::Dir, &UserMetadata::new(), &config(), 0, t);
        assert_eq!(d.perm, 0o755);
    }

    #[test]
    fn s3fs_metadata_is_read() {
        let t = UNIX_EPOCH;
        let a = Attrs::decode(
            Kind::File,
            &md(&[
                ("mode", "33261"),
                ("uid", "7"),
                ("gid", "8"),
                ("mtime", "1700000000.25"),
            ]),
            &config(),
            3,
            t,
        );
        assert_eq!((a.kind, a.perm, a.uid, a.gid), (Kind::File, 0o755, 7, 8));
        assert_eq!(
            a.mtime,
            UNIX_EPOCH + Duration::new(1_700_000_000, 250_000_000)
        );
        assert_eq!(a.ctime, a.mtime, "ctime defaults to mtime");
        let l = Attrs::decode(
            Kind::File,
            &md(&[("mode", &(libc::S_IFLNK | 0o777).to_string())]),
            &config(),
            3,
            t,
        );
        assert_eq!(l.kind, Kind::Symlink);
        let d = Attrs::decode(Kind::File, &md(&[("mode", "16877")]), &config(), 0, t);
        assert_eq!((d.kind, d.perm), (Kind::Dir, 0o755));
    }

    #[test]
    fn malformed_metadata_falls_back_to_defaults() {
        let a = Attrs::decode(
            Kind::File,
            &md(&[
                ("mode", "rwx"),
                ("uid", "-1"),
                ("mtime", "yesterday"),
                ("xattr", "%%%"),
            ]),
            &config(),
            0,
            UNIX_EPOCH,
        );
        assert_eq!((a.perm, a.uid, a.mtime), (0o644, 1000, UNIX_EPOCH));
        assert!(a.xattrs.is_empty());
    }

    #[test]
    fn encode_decode_roundtrip() {
        let mut a = Attrs::defaults(
            Kind::File,
            &config(),
            5,
            UNIX_EPOCH + Duration::new(1_700_000_000, 500_000_000),
        );
        a.perm = 0o4711;
        a.xattrs
            .insert("user.comment".into(), b"hello \x00 world".to_vec());
        a.xattrs.insert("user.empty".into(), Vec::new());
        let m = a.encode();
        assert_eq!(m["mode"], (libc::S_IFREG | 0o4711).to_string());
        assert_eq!(m["mtime"], "1700000000.500000000");
        let b = Attrs::decode(Kind::File, &m, &config(), 5, UNIX_EPOCH);
        assert_eq!(a, b);
    }

    #[test]
    fn xattr_header_is_s3fs_format() {
        let mut x = Xattrs::new();
        x.insert("user.a".into(), b"bar".to_vec());
        let enc = encode_xattrs(&x);
        assert_eq!(enc, "%7B%22user.a%22%3A%22YmFy%22%7D");
        assert_eq!(decode_xattrs(&enc).unwrap(), x);
    }

    #[test]
    fn times() {
        assert_eq!(
            parse_time("1700000000"),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(
            parse_time("1.5"),
            Some(UNIX_EPOCH + Duration::from_millis(1500))
        );
        assert_eq!(
            parse_time("1.123456789123"),
            Some(UNIX_EPOCH + Duration::new(1, 123_456_789))
        );
        assert_eq!(parse_time("x"), None);
        assert_eq!(format_time(UNIX_EPOCH + Duration::from_secs(7)), "7");
        // Nine digits, as s3fs writes them and reads them (as nanoseconds).
        assert_eq!(
            format_time(UNIX_EPOCH + Duration::from_millis(7250)),
            "7.250000000"
        );
        assert_eq!(
            format_time(UNIX_EPOCH + Duration::new(1_321_009_871, 25)),
            "1321009871.000000025"
        );
        // Both forms read back: s3fs's nine digits and a shorter decimal fraction.
        for t in [
            UNIX_EPOCH + Duration::new(1_321_009_871, 25),
            UNIX_EPOCH + Duration::new(1_321_009_871, 250_000_000),
        ] {
            assert_eq!(parse_time(&format_time(t)), Some(t));
        }
        assert_eq!(
            parse_time("1321009871.25"),
            Some(UNIX_EPOCH + Duration::new(1_321_009_871, 250_000_000))
        );
    }
}
