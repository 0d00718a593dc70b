//! Names the driver derives: S3 bucket names from COSI bucket names, IAM user names and account
//! ids from COSI account names.
//!
//! Every derivation is a pure function of its input, so a retried call (the COSI sidecar retries
//! and re-sends) finds what the first call made. COSI names carry the Kubernetes object's UID, so
//! derived names are unique as long as the derivation is injective in practice: when a name has
//! to be shortened or rewritten, a hash of the whole original is appended.
//!
//! A bucket name is used unchanged when `prefix + name` already is a valid S3 bucket name, since
//! the v1alpha1 sidecar tells workloads the Kubernetes `Bucket`'s name, not the bucket id.

use s3vol_s3::BucketName;
use sha2::{Digest, Sha256};

use crate::error::{CosiError, CosiResult};

/// Every IAM user this driver makes is named with this prefix (and nothing else is ever
/// deleted by it).
pub const IAM_USER_PREFIX: &str = "s3vol-";
/// The IAM path of the users this driver makes, so administrators can find and scope them.
pub const IAM_USER_PATH: &str = "/s3vol-cosi/";
/// Account ids of `static` grants start with this; they name no backend principal.
pub const STATIC_ACCOUNT_PREFIX: &str = "static.";

const MAX_BUCKET: usize = 63;
const MAX_IAM_USER: usize = 64;
const MAX_PREFIX: usize = 40;

/// The first 8 hex digits of the SHA-256 of `parts` joined by NUL.
fn short_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update([0u8]);
        }
        h.update(p.as_bytes());
    }
    h.finalize()
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Lower-cases and replaces everything but `[a-z0-9-]` (and `.` when `keep_dots`) with `-`,
/// collapsing runs of `-` and trimming them from both ends.
fn sanitize(s: &str, keep_dots: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() || (keep_dots && c == '.') {
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

/// `base` cut to leave room for `-` and an 8-digit hash within `max`, then the hash.
fn with_hash(base: &str, max: usize, hash: &str) -> String {
    let cut: String = base.chars().take(max - hash.len() - 1).collect();
    let cut = cut.trim_end_matches(['-', '.']);
    if cut.is_empty() {
        format!("b-{hash}")
    } else {
        format!("{cut}-{hash}")
    }
}

/// Names AWS reserves (and rejects at CreateBucket).
fn reserved(name: &str) -> bool {
    ["xn--", "sthree-", "amzn-s3-demo-"]
        .iter()
        .any(|p| name.starts_with(p))
        || ["-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"]
            .iter()
            .any(|s| name.ends_with(s))
}

fn usable(name: &str) -> Option<BucketName> {
    BucketName::new(name)
        .ok()
        .filter(|b| b.is_dns_compliant() && !reserved(name))
}

/// Checks a `bucketNamePrefix` class parameter.
pub fn check_prefix(prefix: &str) -> CosiResult<()> {
    let ok = prefix.len() <= MAX_PREFIX
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && prefix
            .bytes()
            .next()
            .is_none_or(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(CosiError::InvalidArgument(format!(
            "bucketNamePrefix {prefix:?} must be at most {MAX_PREFIX} characters of a-z, 0-9, \
             '-' and '.', starting with a letter or digit"
        )))
    }
}

/// The S3 bucket for the COSI bucket `name`, with the class's `prefix`.
pub fn bucket_name(name: &str, prefix: &str) -> CosiResult<BucketName> {
    if name.is_empty() {
        return Err(CosiError::InvalidArgument("bucket name is required".into()));
    }
    check_prefix(prefix)?;
    let plain = format!("{prefix}{name}");
    if let Some(b) = usable(&plain) {
        return Ok(b);
    }
    // Rewritten names always carry a hash of the original: two names that sanitize alike
    // ("a_b", "a-b") must not share a bucket.
    let hash = short_hash(&[prefix, name]);
    let mut base = format!("{prefix}{}", sanitize(name, false));
    if reserved(&base) {
        base = format!("b-{base}");
    }
    let candidate = with_hash(&base, MAX_BUCKET, &hash);
    usable(&candidate).ok_or_else(|| {
        CosiError::InvalidArgument(format!(
            "cannot derive a valid S3 bucket name from {name:?} with prefix {prefix:?}"
        ))
    })
}

/// The IAM user for the COSI account `account_name` (also the account id returned to COSI).
pub fn iam_user_name(account_name: &str) -> CosiResult<String> {
    if account_name.is_empty() {
        return Err(CosiError::InvalidArgument(
            "account name is required".into(),
        ));
    }
    let base = format!("{IAM_USER_PREFIX}{}", sanitize(account_name, true));
    let plain = base.len() <= MAX_IAM_USER && base.len() > IAM_USER_PREFIX.len();
    if plain && sanitize(account_name, true) == account_name {
        Ok(base)
    } else {
        Ok(with_hash(
            &base,
            MAX_IAM_USER,
            &short_hash(&["iam", account_name]),
        ))
    }
}

/// The account id of a `static` grant for `account_name`.
pub fn static_account_id(account_name: &str) -> CosiResult<String> {
    if account_name.is_empty() {
        return Err(CosiError::InvalidArgument(
            "account name is required".into(),
        ));
    }
    let s = sanitize(account_name, true);
    Ok(if s == account_name && s.len() <= 200 {
        format!("{STATIC_ACCOUNT_PREFIX}{s}")
    } else {
        with_hash(
            &format!("{STATIC_ACCOUNT_PREFIX}{s}"),
            220,
            &short_hash(&["static", account_name]),
        )
    })
}

/// What an account id returned by this driver refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountId {
    /// An IAM user this driver made.
    IamUser(String),
    /// A `static` grant: no backend principal exists.
    Static,
}

impl AccountId {
    pub fn parse(id: &str) -> CosiResult<Self> {
        if id.starts_with(STATIC_ACCOUNT_PREFIX) {
            Ok(AccountId::Static)
        } else if id.starts_with(IAM_USER_PREFIX)
            && id.len() <= MAX_IAM_USER
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            Ok(AccountId::IamUser(id.to_owned()))
        } else {
            Err(CosiError::InvalidArgument(format!(
                "account id {id:?} was not issued by this driver (expected {IAM_USER_PREFIX}… \
                 or {STATIC_ACCOUNT_PREFIX}…)"
            )))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn valid_names_are_kept_so_v1alpha1_workloads_see_their_bucket() {
        let n = "bucketclass-6f1c7a2e-5b1d-4a7e-9d9a-0c2b8f6a1e3d";
        assert_eq!(bucket_name(n, "").unwrap().as_str(), n);
        assert_eq!(
            bucket_name("bc-1234", "team-a-").unwrap().as_str(),
            "team-a-bc-1234"
        );
    }

    #[test]
    fn derived_names_are_valid_unique_and_stable() {
        let long = format!("bc-{}", "x".repeat(250));
        let cases = [
            long.as_str(),
            "Upper_Case.Name",
            "a",
            "a_b",
            "a-b_",
            "xn--punycode",
            "bucket-s3alias",
            "192.168.1.1",
            "-weird-",
        ];
        let mut seen = std::collections::HashSet::new();
        for name in cases {
            let b = bucket_name(name, "").unwrap();
            assert!(b.is_dns_compliant(), "{name} -> {b}");
            assert!(!reserved(b.as_str()), "{name} -> {b}");
            assert_eq!(bucket_name(name, "").unwrap(), b, "stable");
            assert!(seen.insert(b.clone()), "{name} -> {b} collides");
        }
        // Names that sanitize alike still get different buckets.
        assert_ne!(
            bucket_name("a_b-c", "").unwrap(),
            bucket_name("a-b_c", "").unwrap()
        );
        // Long names with a common prefix differ by their hash.
        let a = bucket_name(&format!("{}a", "p".repeat(100)), "pre-").unwrap();
        let b = bucket_name(&format!("{}b", "p".repeat(100)), "pre-").unwrap();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("pre-ppp"));
        assert_eq!(a.as_str().len(), 63);
    }

    #[test]
    fn bad_prefixes_and_empty_names_are_refused() {
        assert!(bucket_name("", "").is_err());
        for p in ["-x", "UP", "a_b", &"p".repeat(41)] {
            assert!(bucket_name("n", p).is_err(), "{p}");
        }
    }

    #[test]
    fn iam_user_names_fit_iam_and_cosi_account_id_rules() {
        let uid = "ba-6f1c7a2e-5b1d-4a7e-9d9a-0c2b8f6a1e3d";
        assert_eq!(iam_user_name(uid).unwrap(), format!("s3vol-{uid}"));
        let long = iam_user_name(&"a".repeat(253)).unwrap();
        assert_eq!(long.len(), 64);
        assert_ne!(long, iam_user_name(&"a".repeat(252)).unwrap());
        for id in [iam_user_name(uid).unwrap(), long.clone()] {
            assert_eq!(
                AccountId::parse(&id).unwrap(),
                AccountId::IamUser(id.clone())
            );
        }
        assert!(iam_user_name("").is_err());
        let s = static_account_id(uid).unwrap();
        assert_eq!(AccountId::parse(&s).unwrap(), AccountId::Static);
        assert!(AccountId::parse("someone-else").is_err());
        assert!(AccountId::parse("s3vol-a/b").is_err());
    }
}
