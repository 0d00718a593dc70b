//! Volume ids: what CreateVolume made, and where.
//!
//! DeleteVolume receives nothing but the volume id (and the provisioner secret), so the id must
//! say everything needed to find the volume again: whether it is a whole bucket or a prefix of a
//! bucket, and the endpoint, region and addressing style of the store. The format is textual
//! and stable:
//!
//! ```text
//! bucket:<bucket>[;e=<percent-encoded endpoint>][;r=<region>][;p]
//! prefix:<bucket>/<prefix>[;e=…][;r=…][;p]
//! ```
//!
//! The id only says where to look; what may be deleted is decided by the marker object the
//! controller wrote at creation (see `controller`), so a forged or stale id can never make
//! DeleteVolume touch data it did not create.
//!
//! Names for new buckets and prefixes are derived from the CSI volume name (Kubernetes names
//! them `pvc-<uuid>`): a name that is already valid is used as is; any other gets a hash of the
//! original appended, so two different names never map to the same bucket or prefix.

use std::fmt;

use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use s3vol_s3::BucketName;
use sha2::{Digest, Sha256};

use crate::error::CsiError;

/// How a store is reached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Location {
    /// Custom endpoint URL; `None` is AWS S3.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
}

/// What a dynamically provisioned volume is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeKind {
    /// A bucket of its own.
    Bucket(BucketName),
    /// The keys under `prefix` (which ends with `/`) of an existing bucket.
    Prefix { bucket: BucketName, prefix: String },
}

impl VolumeKind {
    pub fn bucket(&self) -> &BucketName {
        match self {
            VolumeKind::Bucket(b) | VolumeKind::Prefix { bucket: b, .. } => b,
        }
    }

    /// The key prefix of the volume's root: `""` for a bucket.
    pub fn root(&self) -> &str {
        match self {
            VolumeKind::Bucket(_) => "",
            VolumeKind::Prefix { prefix, .. } => prefix,
        }
    }

    pub fn mode(&self) -> &'static str {
        match self {
            VolumeKind::Bucket(_) => "bucket",
            VolumeKind::Prefix { .. } => "prefix",
        }
    }
}

/// The id of a volume this driver created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeId {
    pub kind: VolumeKind,
    pub location: Location,
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            VolumeKind::Bucket(b) => write!(f, "bucket:{b}")?,
            VolumeKind::Prefix { bucket, prefix } => {
                write!(f, "prefix:{bucket}/{}", prefix.trim_end_matches('/'))?
            }
        }
        if let Some(e) = &self.location.endpoint {
            write!(f, ";e={}", utf8_percent_encode(e, NON_ALPHANUMERIC))?;
        }
        if let Some(r) = &self.location.region {
            write!(f, ";r={}", utf8_percent_encode(r, NON_ALPHANUMERIC))?;
        }
        if self.location.path_style {
            f.write_str(";p")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for VolumeId {
    type Err = CsiError;

    fn from_str(s: &str) -> Result<Self, CsiError> {
        let bad =
            |why: &str| CsiError::invalid(format!("volume id {s:?} is not one of s3vol's: {why}"));
        let mut parts = s.split(';');
        let head = parts.next().unwrap_or_default();
        let kind = if let Some(b) = head.strip_prefix("bucket:") {
            VolumeKind::Bucket(BucketName::new(b).map_err(|e| bad(&e.to_string()))?)
        } else if let Some(rest) = head.strip_prefix("prefix:") {
            let (b, p) = rest.split_once('/').ok_or_else(|| bad("no prefix"))?;
            if p.is_empty() || p.contains('/') {
                return Err(bad("bad prefix"));
            }
            VolumeKind::Prefix {
                bucket: BucketName::new(b).map_err(|e| bad(&e.to_string()))?,
                prefix: format!("{p}/"),
            }
        } else {
            return Err(bad("unknown kind"));
        };
        let mut location = Location::default();
        let decode = |v: &str| {
            percent_decode_str(v)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| bad("bad encoding"))
        };
        for part in parts {
            match part.split_once('=') {
                Some(("e", v)) => location.endpoint = Some(decode(v)?),
                Some(("r", v)) => location.region = Some(decode(v)?),
                None if part == "p" => location.path_style = true,
                _ => return Err(bad("unknown field")),
            }
        }
        Ok(VolumeId { kind, location })
    }
}

/// The first 8 bytes of SHA-256, in hex.
pub(crate) fn short_hash(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes())[..8])
}

/// Lower-case hex of some bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lower-cases, turns anything but `[a-z0-9-]` into `-`, collapses dashes, trims them.
fn dns_label(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && out.ends_with('-') {
            continue;
        }
        out.push(c);
    }
    out.trim_matches('-').to_owned()
}

/// Checks a `bucketPrefix` parameter: 1–40 of `[a-z0-9-]`, starting with a letter or digit.
pub fn validate_bucket_prefix(p: &str) -> Result<(), CsiError> {
    let ok = (1..=40).contains(&p.len())
        && p.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && p.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(CsiError::invalid(format!(
            "bucketPrefix {p:?} must be 1 to 40 characters of a-z, 0-9 and '-', starting with a letter or digit"
        )))
    }
}

/// The bucket for a new volume named `name`: `[<bucket_prefix>-]<name>`, made DNS-compliant,
/// with `-<hash of name>` appended whenever the name had to be changed or shortened.
pub fn derive_bucket_name(bucket_prefix: Option<&str>, name: &str) -> Result<BucketName, CsiError> {
    let wanted = match bucket_prefix {
        Some(p) => format!("{p}-{name}"),
        None => name.to_owned(),
    };
    let label = dns_label(&wanted);
    let needs_hash = label != wanted
        || label.len() < 3
        || label.len() > 63
        || label.ends_with("-s3alias")
        || label.starts_with("sthree-")
        || label.starts_with("xn-");
    let candidate = if needs_hash {
        let hash = short_hash(name);
        let mut base: String = label.chars().take(63 - 1 - hash.len()).collect();
        base = base.trim_end_matches('-').to_owned();
        if base.is_empty() || base.starts_with("xn-") || base.starts_with("sthree-") {
            base = format!("vol{}", if base.is_empty() { "" } else { "-" }) + &base;
            base = base.chars().take(63 - 1 - hash.len()).collect();
            base = base.trim_end_matches('-').to_owned();
        }
        format!("{base}-{hash}")
    } else {
        label
    };
    let bucket = BucketName::new(candidate)
        .map_err(|e| CsiError::Internal(format!("derived bucket name: {e}")))?;
    if !bucket.is_dns_compliant() {
        return Err(CsiError::Internal(format!(
            "derived bucket name {bucket} is not DNS-compliant"
        )));
    }
    Ok(bucket)
}

/// The key prefix (ending with `/`) of a new volume named `name`: the name itself when it is
/// made of `[A-Za-z0-9._-]` (not `.` or `..`) and at most 200 bytes, else a cleaned, shortened
/// name with `-<hash of name>` appended.
pub fn derive_prefix(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let ok =
        clean == name && !clean.is_empty() && clean.len() <= 200 && clean != "." && clean != "..";
    if ok {
        format!("{clean}/")
    } else {
        let base: String = clean.trim_matches('.').chars().take(180).collect();
        format!("{base}-{}/", short_hash(name))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_round_trip() {
        let ids = [
            VolumeId {
                kind: VolumeKind::Bucket(BucketName::new("pvc-1").unwrap()),
                location: Location::default(),
            },
            VolumeId {
                kind: VolumeKind::Prefix {
                    bucket: BucketName::new("team").unwrap(),
                    prefix: "pvc-2/".into(),
                },
                location: Location {
                    endpoint: Some("http://127.0.0.1:9000/x;y".into()),
                    region: Some("eu-west-1".into()),
                    path_style: true,
                },
            },
        ];
        for id in ids {
            let s = id.to_string();
            assert_eq!(s.parse::<VolumeId>().unwrap(), id, "{s}");
        }
        assert_eq!(
            VolumeId {
                kind: VolumeKind::Prefix {
                    bucket: BucketName::new("team").unwrap(),
                    prefix: "v/".into()
                },
                location: Location {
                    endpoint: Some("http://h:1".into()),
                    region: None,
                    path_style: true
                },
            }
            .to_string(),
            "prefix:team/v;e=http%3A%2F%2Fh%3A1;p"
        );
    }

    #[test]
    fn foreign_ids_are_rejected() {
        for bad in [
            "",
            "datasets",
            "bucket:",
            "bucket:a b",
            "prefix:team",
            "prefix:team/",
            "prefix:team/a/b",
            "bucket:abc;x=1",
        ] {
            assert!(bad.parse::<VolumeId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bucket_names_from_volume_names() {
        let b = |p: Option<&str>, n: &str| derive_bucket_name(p, n).unwrap().to_string();
        let uuid = "pvc-0b6ef0a4-6f4e-4c5e-9d59-6a8f0cba1d2e";
        assert_eq!(b(None, uuid), uuid);
        assert_eq!(b(Some("s3vol"), uuid), format!("s3vol-{uuid}"));
        // Changed names carry a hash of the original, so they cannot collide.
        let upper = b(None, "PVC_A");
        assert!(upper.starts_with("pvc-a-"), "{upper}");
        assert_ne!(b(None, "PVC_A"), b(None, "pvc_a"));
        assert_ne!(b(None, "pvc_a"), b(None, "pvc-a"));
        let long = b(Some("a-very-long-prefix-for-buckets"), uuid);
        assert!(long.len() <= 63, "{long}");
        assert!(
            long.starts_with("a-very-long-prefix-for-buckets-pvc-"),
            "{long}"
        );
        for weird in [
            "",
            "x",
            "..",
            "ünïcode",
            "xn--abc",
            "a.b.c",
            "sthree-x",
            "x-s3alias",
            "1.2.3.4",
        ] {
            let name = derive_bucket_name(None, weird).unwrap();
            assert!(name.is_dns_compliant(), "{weird} -> {name}");
        }
    }

    #[test]
    fn prefixes_from_volume_names() {
        assert_eq!(derive_prefix("pvc-1"), "pvc-1/");
        let p = derive_prefix("a/b");
        assert!(p.starts_with("a-b-") && p.ends_with('/'), "{p}");
        assert_ne!(derive_prefix(".."), "../");
        assert!(derive_prefix(&"x".repeat(300)).len() < 220);
    }

    #[test]
    fn bucket_prefix_validation() {
        assert!(validate_bucket_prefix("s3vol").is_ok());
        for bad in ["", "-x", "UP", "a_b", &"a".repeat(41)] {
            assert!(validate_bucket_prefix(bad).is_err(), "{bad}");
        }
    }
}
