//! Plain data types crossing the [`ObjectStore`](crate::ObjectStore) boundary.
//!
//! Keys are plain `String`s on purpose: S3 keys are arbitrary UTF-8 (`dir/`, `a//b`, `/x`), and
//! the filesystem decides which of them it can show; this layer must be able to address all.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::time::SystemTime;

/// A bucket name, checked on construction.
///
/// Accepts what existing buckets may be called (AWS's legacy us-east-1 rules allowed upper case
/// and underscores), so mounting any existing bucket works; [`BucketName::is_dns_compliant`]
/// tells whether a name also follows the modern rules required for creating buckets.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketName(String);

/// Why a bucket name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid bucket name {name:?}: {reason}")]
pub struct InvalidBucketName {
    pub name: String,
    pub reason: &'static str,
}

impl BucketName {
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidBucketName> {
        let name = name.into();
        let bad = |reason| {
            Err(InvalidBucketName {
                name: name.clone(),
                reason,
            })
        };
        if name.len() < 3 || name.len() > 255 {
            return bad("must be 3 to 255 characters long");
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return bad("may contain only letters, digits, '.', '-' and '_'");
        }
        Ok(Self(name))
    }

    /// Whether the name follows the current S3 naming rules (3–63 characters of lower-case
    /// letters, digits, `.` and `-`, starting and ending with a letter or digit, no `..`, not an
    /// IPv4 address). Buckets this project creates always satisfy them.
    pub fn is_dns_compliant(&self) -> bool {
        let s = self.0.as_str();
        let b = s.as_bytes();
        (3..=63).contains(&s.len())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-'))
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && !s.contains("..")
            && s.parse::<std::net::Ipv4Addr>().is_err()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BucketName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for BucketName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::str::FromStr for BucketName {
    type Err = InvalidBucketName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Why a key prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid prefix {prefix:?}: {reason}")]
pub struct InvalidPrefix {
    pub prefix: String,
    pub reason: &'static str,
}

/// The key prefix a volume or mount of `prefix` covers: a leading `/` dropped, a trailing `/`
/// added (the empty prefix stays empty, the whole bucket). `.` and `..` segments are refused:
/// a filesystem path would resolve them, S3 takes them as literal key segments, so
/// `bucket/../x` would name keys outside anything a user meant. One rule for `s3vol mount`
/// and the CSI driver.
pub fn normalize_prefix(prefix: &str) -> Result<String, InvalidPrefix> {
    let p = prefix.trim_start_matches('/');
    if p.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(InvalidPrefix {
            prefix: prefix.to_owned(),
            reason: "must not contain . or .. segments",
        });
    }
    Ok(if p.is_empty() || p.ends_with('/') {
        p.to_owned()
    } else {
        format!("{p}/")
    })
}

/// Parses a byte size as users write it: `1048576`, `512K`, `64M`, `10G`, `1GiB`, `1T`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size such as 512M or 10G"))
}

/// An entity tag as the server sent it (quotes included), compared byte for byte.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct ETag(pub String);

impl ETag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ETag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// User metadata (`x-amz-meta-*`), keys lower-cased and without the prefix.
pub type UserMetadata = BTreeMap<String, String>;

/// What HEAD (or a GET) says about an object.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub etag: ETag,
    pub last_modified: SystemTime,
    pub content_type: Option<String>,
    pub metadata: UserMetadata,
}

/// One object in a listing. Listings carry no user metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct ListEntry {
    pub key: String,
    pub size: u64,
    pub etag: ETag,
    pub last_modified: SystemTime,
}

/// A ListObjectsV2 request.
#[derive(Clone, Debug, Default)]
pub struct ListRequest {
    pub prefix: String,
    pub delimiter: Option<String>,
    pub start_after: Option<String>,
    pub continuation_token: Option<String>,
    /// At most this many keys and common prefixes together (S3 caps it at 1000).
    pub max_keys: Option<u32>,
}

/// One page of a listing, in UTF-8 binary key order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListPage {
    pub objects: Vec<ListEntry>,
    pub common_prefixes: Vec<String>,
    /// Set when more results follow; pass it back as `continuation_token`.
    pub next_continuation_token: Option<String>,
}

/// Options of a PUT or of a multipart upload's creation.
#[derive(Clone, Debug, Default)]
pub struct PutOptions {
    pub metadata: UserMetadata,
    pub content_type: Option<String>,
    /// `If-None-Match: *`: fail with [`S3Error::PreconditionFailed`](crate::S3Error) when the
    /// key exists.
    pub if_none_match_any: bool,
}

/// The result of a write that made a new object version.
#[derive(Clone, Debug, PartialEq)]
pub struct PutResult {
    pub etag: ETag,
}

/// The source of a server-side copy.
#[derive(Clone, Debug)]
pub struct CopySource {
    pub bucket: BucketName,
    pub key: String,
    /// Only for UploadPartCopy: the byte range of the source to copy.
    pub range: Option<Range<u64>>,
    /// Copy only if the source still has this ETag.
    pub if_match: Option<ETag>,
}

/// What a copy does with the source's metadata.
#[derive(Clone, Debug)]
pub enum MetadataDirective {
    Copy,
    Replace {
        metadata: UserMetadata,
        content_type: Option<String>,
    },
}

/// The id of a multipart upload.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UploadId(pub String);

/// A part an unfinished multipart upload holds (ListParts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadedPart {
    pub part_number: i32,
    pub etag: ETag,
    pub size: u64,
}

/// A part of a multipart upload, to hand to complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompletedPart {
    pub part_number: i32,
    pub etag: ETag,
}

impl CompletedPart {
    /// The ETag S3 gives the object that completing an upload of `parts` (in this order)
    /// makes: the MD5 of the parts' MD5s, `-`, and how many parts there are; without quotes.
    /// `None` when a part's ETag is not an MD5 (under SSE-KMS, say), so the object's ETag
    /// cannot be known in advance.
    pub fn multipart_etag(parts: &[CompletedPart]) -> Option<String> {
        use md5::{Digest, Md5};
        let mut digests = Vec::with_capacity(parts.len() * 16);
        for p in parts {
            let hex = p.etag.as_str().trim_matches('"');
            if hex.len() != 32 {
                return None;
            }
            for i in (0..32).step_by(2) {
                digests.push(u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()?);
            }
        }
        Some(format!("{:x}-{}", Md5::digest(&digests), parts.len()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_normalized_and_dot_segments_refused() {
        assert_eq!(normalize_prefix("").unwrap(), "");
        assert_eq!(normalize_prefix("/a/b").unwrap(), "a/b/");
        assert_eq!(normalize_prefix("a//b/").unwrap(), "a//b/");
        assert_eq!(normalize_prefix("a/.hidden").unwrap(), "a/.hidden/");
        assert!(normalize_prefix("../x").is_err());
        assert!(normalize_prefix("a/./b").is_err());
        assert!(normalize_prefix("a/..").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn bucket_names() {
        for ok in ["abc", "my-bucket.v2", "Legacy_Bucket"] {
            assert!(BucketName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "ab", "a/b", "a b", "ü-bucket"] {
            assert!(BucketName::new(bad).is_err(), "{bad}");
        }
        let dns = |s: &str| {
            BucketName::new(s)
                .map(|b| b.is_dns_compliant())
                .unwrap_or(false)
        };
        assert!(dns("my-bucket.v2"));
        assert!(!dns("Legacy_Bucket"));
        assert!(!dns("-lead"));
        assert!(!dns("trail-"));
        assert!(!dns("a..b"));
        assert!(!dns("192.168.1.1"));
        assert!(!dns(&"a".repeat(64)));
    }
}
