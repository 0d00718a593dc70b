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
//! bucket, which is how "claim a bucket, mount it" is one flow (docs/cosi.md).

use std::collections::HashMap;

use s3vol_s3::{BucketName, CredentialSource, S3Config, StaticCredentials};
use serde_json::Value;

use crate::error::{CosiError, CosiResult};
use crate::params::Addressing;

/// The v1alpha2 Secret keys.
pub mod keys {
    pub const BUCKET_ID: &str = "COSI_S3_BUCKET_ID";
    pub const ENDPOINT: &str = "COSI_S3_ENDPOINT";
    pub const REGION: &str = "COSI_S3_REGION";
    pub const ADDRESSING_STYLE: &str = "COSI_S3_ADDRESSING_STYLE";
    pub const ACCESS_KEY_ID: &str = "COSI_S3_ACCESS_KEY_ID";
    pub const ACCESS_SECRET_KEY: &str = "COSI_S3_ACCESS_SECRET_KEY";
    /// The v1alpha1 JSON document.
    pub const BUCKET_INFO: &str = "BucketInfo";
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

fn non_empty(s: Option<&str>) -> Option<String> {
    s.map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

impl BucketAccessSecret {
    /// Parses the Secret's data (decoded values), either shape.
    pub fn parse(data: &HashMap<String, String>) -> CosiResult<Self> {
        if data.contains_key(keys::ACCESS_KEY_ID) || data.contains_key(keys::BUCKET_ID) {
            return Self::parse_v1alpha2(data);
        }
        match data.get(keys::BUCKET_INFO) {
            Some(json) => Self::parse_v1alpha1(json),
            None => Err(CosiError::InvalidArgument(format!(
                "not a COSI BucketAccess Secret: neither {} nor {} is present",
                keys::ACCESS_KEY_ID,
                keys::BUCKET_INFO
            ))),
        }
    }

    fn parse_v1alpha2(data: &HashMap<String, String>) -> CosiResult<Self> {
        let get = |k: &str| non_empty(data.get(k).map(String::as_str));
        let bucket = get(keys::BUCKET_ID).ok_or_else(|| missing(keys::BUCKET_ID))?;
        let addressing = match get(keys::ADDRESSING_STYLE).as_deref() {
            Some("path") => Some(Addressing::Path),
            Some("virtual") => Some(Addressing::Virtual),
            _ => None,
        };
        Ok(Self {
            bucket: BucketName::new(bucket)
                .map_err(|e| CosiError::InvalidArgument(e.to_string()))?,
            endpoint: get(keys::ENDPOINT),
            region: get(keys::REGION),
            addressing,
            credentials: StaticCredentials {
                access_key_id: get(keys::ACCESS_KEY_ID)
                    .ok_or_else(|| missing(keys::ACCESS_KEY_ID))?,
                secret_access_key: get(keys::ACCESS_SECRET_KEY)
                    .ok_or_else(|| missing(keys::ACCESS_SECRET_KEY))?,
                session_token: None,
            },
        })
    }

    fn parse_v1alpha1(json: &str) -> CosiResult<Self> {
        let doc: Value = serde_json::from_str(json)
            .map_err(|e| CosiError::InvalidArgument(format!("BucketInfo is not JSON: {e}")))?;
        let spec = &doc["spec"];
        let s3 = &spec["secretS3"];
        let field = |v: &Value| non_empty(v.as_str());
        let bucket = field(&spec["bucketName"]).ok_or_else(|| missing("spec.bucketName"))?;
        Ok(Self {
            bucket: BucketName::new(bucket)
                .map_err(|e| CosiError::InvalidArgument(e.to_string()))?,
            endpoint: field(&s3["endpoint"]),
            region: field(&s3["region"]),
            addressing: None,
            credentials: StaticCredentials {
                access_key_id: field(&s3["accessKeyID"])
                    .ok_or_else(|| missing("spec.secretS3.accessKeyID"))?,
                secret_access_key: field(&s3["accessSecretKey"])
                    .ok_or_else(|| missing("spec.secretS3.accessSecretKey"))?,
                session_token: None,
            },
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
}
