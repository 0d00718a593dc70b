//! Reading a BucketAccess Secret: what a workload (or `s3vol` mounting the bucket) gets.
//!
//! COSI's sidecar writes the grant into a Secret in one of two shapes:
//!
//! - v1alpha2: one key per value: `COSI_S3_BUCKET_ID`, `COSI_S3_ENDPOINT`, `COSI_S3_REGION`,
//!   `COSI_S3_ADDRESSING_STYLE` (`path` / `virtual`), `COSI_S3_ACCESS_KEY_ID`,
//!   `COSI_S3_ACCESS_SECRET_KEY`;
//! - v1alpha1: a single `BucketInfo` key holding JSON, whose `spec.bucketName` is the
//!   Kubernetes Bucket's name and `spec.secretS3` has `endpoint`, `region`, `accessKeyID`,
//!   `accessSecretKey` (no addressing style).
//!
//! [`BucketAccessSecret::parse`] accepts either and yields an [`S3Config`] that reaches the
//! bucket, which is how "claim a bucket, mount it" is one flow (docs/cosi.md). The parsing
//! itself is [`s3vol_s3::secret`]'s, the same the CSI driver uses for a volume's Secret, so
//! both drivers read a BucketAccess Secret alike; here it must also name the bucket.

use std::collections::HashMap;

use s3vol_s3::secret::{ParsedSecret, SecretShape};
use s3vol_s3::{BucketName, CredentialSource, S3Config, StaticCredentials};

use crate::error::{CosiError, CosiResult};
use crate::params::Addressing;

/// The v1alpha2 Secret keys.
pub mod keys {
    use s3vol_s3::secret::keys;

    pub const BUCKET_ID: &str = keys::COSI_BUCKET_ID;
    pub const ENDPOINT: &str = keys::COSI_ENDPOINT;
    pub const REGION: &str = keys::COSI_REGION;
    pub const ADDRESSING_STYLE: &str = keys::COSI_ADDRESSING_STYLE;
    pub const ACCESS_KEY_ID: &str = keys::COSI_ACCESS_KEY_ID;
    pub const ACCESS_SECRET_KEY: &str = keys::COSI_ACCESS_SECRET_KEY;
    /// The v1alpha1 JSON document.
    pub const BUCKET_INFO: &str = keys::COSI_BUCKET_INFO;
}

/// A bucket and the means to reach it, from a BucketAccess Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketAccessSecret {
    pub bucket: BucketName,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// `None` when the Secret does not say (v1alpha1).
    pub addressing: Option<Addressing>,
    pub credentials: StaticCredentials,
}

fn missing(what: &str) -> CosiError {
    CosiError::InvalidArgument(format!("the BucketAccess Secret has no {what}"))
}

impl BucketAccessSecret {
    /// Parses the Secret's data (decoded values), either shape.
    pub fn parse(data: &HashMap<String, String>) -> CosiResult<Self> {
        let ParsedSecret {
            shape,
            credentials,
            hints,
        } = ParsedSecret::parse(data).map_err(|e| CosiError::InvalidArgument(e.0))?;
        let bucket_key = match shape {
            SecretShape::CosiV1alpha2 => keys::BUCKET_ID,
            SecretShape::CosiV1alpha1 => "spec.bucketName",
            SecretShape::S3vol | SecretShape::None => {
                return Err(CosiError::InvalidArgument(format!(
                    "not a COSI BucketAccess Secret: neither {} nor {} is present",
                    keys::ACCESS_KEY_ID,
                    keys::BUCKET_INFO
                )));
            }
        };
        // Both COSI shapes always carry the key pair (the shared parser refuses them
        // otherwise); checked again rather than assumed.
        let credentials = credentials.ok_or_else(|| missing(keys::ACCESS_KEY_ID))?;
        let bucket = hints.bucket.ok_or_else(|| missing(bucket_key))?;
        Ok(Self {
            bucket: BucketName::new(bucket)
                .map_err(|e| CosiError::InvalidArgument(e.to_string()))?,
            endpoint: hints.endpoint,
            region: hints.region,
            addressing: hints.path_style.map(|path| {
                if path {
                    Addressing::Path
                } else {
                    Addressing::Virtual
                }
            }),
            credentials,
        })
    }

    /// A client configuration for the bucket; an unknown addressing style is `default`.
    pub fn s3_config(&self, default: s3vol_s3::Addressing) -> S3Config {
        S3Config {
            endpoint_url: self.endpoint.clone(),
            region: self.region.clone(),
            addressing: match self.addressing {
                Some(Addressing::Path) => s3vol_s3::Addressing::Path,
                Some(Addressing::Virtual) => s3vol_s3::Addressing::VirtualHosted,
                None => default,
            },
            credentials: CredentialSource::Static(self.credentials.clone()),
            ..S3Config::default()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn both_secret_shapes_parse() {
        let v2: HashMap<String, String> = [
            ("COSI_PROTOCOL", "S3"),
            (keys::BUCKET_ID, "bc-1"),
            (keys::ENDPOINT, "http://127.0.0.1:9000"),
            (keys::REGION, "us-east-1"),
            (keys::ADDRESSING_STYLE, "path"),
            (keys::ACCESS_KEY_ID, "AK"),
            (keys::ACCESS_SECRET_KEY, "SK"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let a = BucketAccessSecret::parse(&v2).unwrap();
        assert_eq!(a.bucket.as_str(), "bc-1");
        assert_eq!(a.addressing, Some(Addressing::Path));
        let v1 = HashMap::from([(
            keys::BUCKET_INFO.to_owned(),
            r#"{"metadata":{"name":"ba-1"},"spec":{"bucketName":"bc-1","authenticationType":"KEY",
               "secretS3":{"endpoint":"http://127.0.0.1:9000","region":"us-east-1",
               "accessKeyID":"AK","accessSecretKey":"SK"},"secretAzure":null,"protocols":["s3"]}}"#
                .to_owned(),
        )]);
        let b = BucketAccessSecret::parse(&v1).unwrap();
        assert_eq!(b.addressing, None);
        assert_eq!(
            BucketAccessSecret {
                addressing: a.addressing,
                ..b
            },
            a
        );
        let cfg = a.s3_config(s3vol_s3::Addressing::VirtualHosted);
        assert_eq!(cfg.addressing, s3vol_s3::Addressing::Path);
        assert!(BucketAccessSecret::parse(&HashMap::new()).is_err());
    }

    #[test]
    fn broken_secrets_are_invalid_arguments() {
        let v2 = |kv: &[(&str, &str)]| -> HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        for data in [
            // Empty key values: never the driver's own identity.
            v2(&[
                (keys::BUCKET_ID, "bc-1"),
                (keys::ACCESS_KEY_ID, ""),
                (keys::ACCESS_SECRET_KEY, ""),
            ]),
            // No bucket.
            v2(&[(keys::ACCESS_KEY_ID, "AK"), (keys::ACCESS_SECRET_KEY, "SK")]),
            // s3vol's own shape is not a BucketAccess.
            v2(&[("accessKeyID", "AK"), ("secretAccessKey", "SK")]),
            v2(&[("sessionToken", "T")]),
            v2(&[
                (keys::BUCKET_ID, "bc-1"),
                (keys::ACCESS_KEY_ID, "AK"),
                (keys::ACCESS_SECRET_KEY, "S\0K"),
            ]),
        ] {
            let e = BucketAccessSecret::parse(&data).unwrap_err();
            assert!(matches!(e, CosiError::InvalidArgument(_)), "{data:?}: {e}");
        }
    }
}
