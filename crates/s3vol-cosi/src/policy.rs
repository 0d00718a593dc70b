//! Access modes and the IAM policy documents that grant exactly them.
//!
//! A grant's policy names each granted bucket by ARN, twice: the bucket itself for bucket-level
//! actions (listing, location, multipart listing) and `bucket/*` for object-level ones. Nothing
//! else is allowed, so a minted key can touch no other bucket and no bucket configuration
//! (policy, ACL, versioning, lifecycle), whatever the mode.
//!
//! | mode | bucket | objects |
//! | --- | --- | --- |
//! | read-write | ListBucket, GetBucketLocation, ListBucketMultipartUploads | GetObject, PutObject, DeleteObject, AbortMultipartUpload, ListMultipartUploadParts |
//! | read-only | ListBucket, GetBucketLocation | GetObject |
//! | write-only | GetBucketLocation, ListBucketMultipartUploads | PutObject, AbortMultipartUpload, ListMultipartUploadParts |
//!
//! Write-only cannot delete or overwrite-by-listing: it is meant for drop boxes. Mounting a
//! bucket with `s3vol` needs read-write (renames are copy + delete).

use s3vol_s3::BucketName;
use serde_json::{Value, json};

use crate::error::{CosiError, CosiResult};

/// How a grant may use its buckets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AccessMode {
    #[default]
    ReadWrite,
    ReadOnly,
    WriteOnly,
}

impl AccessMode {
    /// Parses `ReadWrite` / `ReadOnly` / `WriteOnly`, in any case, with or without `-` or `_`.
    pub fn parse(s: &str) -> CosiResult<Self> {
        let norm: String = s
            .chars()
            .filter(|c| !matches!(c, '-' | '_'))
            .collect::<String>()
            .to_ascii_lowercase();
        match norm.as_str() {
            "readwrite" | "rw" => Ok(AccessMode::ReadWrite),
            "readonly" | "ro" => Ok(AccessMode::ReadOnly),
            "writeonly" | "wo" => Ok(AccessMode::WriteOnly),
            _ => Err(CosiError::InvalidArgument(format!(
                "accessMode {s:?} is not one of ReadWrite, ReadOnly, WriteOnly"
            ))),
        }
    }

    fn bucket_actions(self) -> &'static [&'static str] {
        match self {
            AccessMode::ReadWrite => &[
                "s3:ListBucket",
                "s3:GetBucketLocation",
                "s3:ListBucketMultipartUploads",
            ],
            AccessMode::ReadOnly => &["s3:ListBucket", "s3:GetBucketLocation"],
            AccessMode::WriteOnly => &["s3:GetBucketLocation", "s3:ListBucketMultipartUploads"],
        }
    }

    fn object_actions(self) -> &'static [&'static str] {
        match self {
            AccessMode::ReadWrite => &[
                "s3:GetObject",
                "s3:PutObject",
                "s3:DeleteObject",
                "s3:AbortMultipartUpload",
                "s3:ListMultipartUploadParts",
            ],
            AccessMode::ReadOnly => &["s3:GetObject"],
            AccessMode::WriteOnly => &[
                "s3:PutObject",
                "s3:AbortMultipartUpload",
                "s3:ListMultipartUploadParts",
            ],
        }
    }
}

/// The policy granting `mode` on each bucket and nothing else. Buckets are sorted so the same
/// grant always yields the same document, whatever order the request listed them in.
pub fn document(grants: &[(BucketName, AccessMode)]) -> Value {
    let mut grants: Vec<&(BucketName, AccessMode)> = grants.iter().collect();
    grants.sort_by(|a, b| a.0.cmp(&b.0));
    let mut statements = Vec::new();
    for (i, (bucket, mode)) in grants.iter().enumerate() {
        statements.push(json!({
            "Sid": format!("Bucket{i}"),
            "Effect": "Allow",
            "Action": mode.bucket_actions(),
            "Resource": [format!("arn:aws:s3:::{bucket}")],
        }));
        statements.push(json!({
            "Sid": format!("Objects{i}"),
            "Effect": "Allow",
            "Action": mode.object_actions(),
            "Resource": [format!("arn:aws:s3:::{bucket}/*")],
        }));
    }
    json!({ "Version": "2012-10-17", "Statement": statements })
}

/// Parses a policy document as IAM returns it: AWS URL-encodes it, other implementations may
/// not.
pub fn parse_returned(doc: &str) -> Option<Value> {
    serde_json::from_str(doc).ok().or_else(|| {
        let decoded = percent_encoding::percent_decode_str(doc)
            .decode_utf8()
            .ok()?;
        serde_json::from_str(&decoded).ok()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn b(s: &str) -> BucketName {
        BucketName::new(s).unwrap()
    }

    #[test]
    fn read_only_policy_is_exactly_scoped() {
        let doc = document(&[(b("photos"), AccessMode::ReadOnly)]);
        assert_eq!(
            doc,
            json!({
                "Version": "2012-10-17",
                "Statement": [
                    {"Sid": "Bucket0", "Effect": "Allow",
                     "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
                     "Resource": ["arn:aws:s3:::photos"]},
                    {"Sid": "Objects0", "Effect": "Allow",
                     "Action": ["s3:GetObject"],
                     "Resource": ["arn:aws:s3:::photos/*"]},
                ]
            })
        );
    }

    #[test]
    fn no_mode_grants_deletes_or_bucket_configuration_except_read_write_delete() {
        for mode in [
            AccessMode::ReadWrite,
            AccessMode::ReadOnly,
            AccessMode::WriteOnly,
        ] {
            let text = document(&[(b("xx1"), mode)]).to_string();
            assert!(!text.contains("s3:*"), "{text}");
            assert!(!text.contains("Policy"), "{text}");
            assert!(!text.contains("DeleteBucket"), "{text}");
            assert_eq!(
                text.contains("s3:DeleteObject"),
                mode == AccessMode::ReadWrite
            );
            assert_eq!(text.contains("s3:GetObject"), mode != AccessMode::WriteOnly);
            assert_eq!(text.contains("s3:PutObject"), mode != AccessMode::ReadOnly);
        }
    }

    #[test]
    fn documents_do_not_depend_on_request_order() {
        let a = document(&[
            (b("bb2"), AccessMode::ReadOnly),
            (b("bb1"), AccessMode::ReadWrite),
        ]);
        let c = document(&[
            (b("bb1"), AccessMode::ReadWrite),
            (b("bb2"), AccessMode::ReadOnly),
        ]);
        assert_eq!(a, c);
    }

    #[test]
    fn returned_documents_parse_encoded_or_not() {
        let doc = document(&[(b("bb1"), AccessMode::ReadOnly)]);
        let text = doc.to_string();
        assert_eq!(parse_returned(&text).unwrap(), doc);
        let encoded =
            percent_encoding::utf8_percent_encode(&text, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        assert_eq!(parse_returned(&encoded).unwrap(), doc);
        assert!(parse_returned("not json").is_none());
    }

    #[test]
    fn access_modes_parse_leniently() {
        for (s, m) in [
            ("ReadWrite", AccessMode::ReadWrite),
            ("read-only", AccessMode::ReadOnly),
            ("WRITE_ONLY", AccessMode::WriteOnly),
        ] {
            assert_eq!(AccessMode::parse(s).unwrap(), m);
        }
        assert!(AccessMode::parse("admin").is_err());
    }
}
