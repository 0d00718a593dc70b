//! What a credentials Secret says: the keys for a store and, when it is a Secret COSI wrote for
//! a BucketAccess, where the bucket is. Shared by the CSI driver (the `csi.storage.k8s.io/*`
//! Secrets of a volume) and the COSI driver (reading a BucketAccess Secret back), so both read
//! the three shapes with one parser and refuse the same broken Secrets with the same words.
//!
//! Three shapes are accepted, told apart by their keys:
//!
//! - **s3vol's own**: `accessKeyID`, `secretAccessKey` and optionally `sessionToken`;
//! - **COSI v1alpha2** BucketAccess Secret: `COSI_S3_ACCESS_KEY_ID`,
//!   `COSI_S3_ACCESS_SECRET_KEY`, and `COSI_S3_BUCKET_ID`, `COSI_S3_ENDPOINT`, `COSI_S3_REGION`,
//!   `COSI_S3_ADDRESSING_STYLE` (`path` / `virtual`);
//! - **COSI v1alpha1** BucketAccess Secret: one key `BucketInfo` holding JSON, whose
//!   `spec.bucketName` names the bucket and `spec.secretS3` holds `endpoint`, `region`,
//!   `accessKeyID` and `accessSecretKey` (no addressing style).
//!
//! So a static PersistentVolume can name a BucketAccess Secret as its node-stage Secret and
//! mount the claimed bucket with no copying of keys. An empty map means no Secret: the driver's
//! own credential chain. A map with keys of more than one shape is refused rather than guessed
//! at; keys of no shape are ignored, except that any `COSI_` key makes it a v1alpha2 Secret (so
//! a COSI Secret for another protocol fails loudly instead of falling back to the driver's
//! credentials). Likewise a Secret of s3vol's shape whose keys are present but empty, or that
//! holds only a `sessionToken`, is `InvalidArgument`: the driver's own identity is used only
//! when no Secret is given at all, never because a Secret turned out empty. A NUL byte in any
//! key or value is `InvalidArgument`.
//!
//! The location a COSI Secret carries is a set of defaults ([`SecretHints`]): a volume
//! attribute or StorageClass parameter that says otherwise wins, and the Secret in turn wins
//! over the driver's `--s3-endpoint` / `--s3-region` (see the CSI driver's `params`). Errors name keys, never
//! values.
//!
//! Errors ([`SecretError`]) are what both drivers answer as `INVALID_ARGUMENT`. The shapes are
//! fixed by COSI's sidecars, not by s3vol; the tests build the Secrets as the sidecars write
//! them.

use std::collections::HashMap;

use serde_json::Value;

use crate::StaticCredentials;
use crate::input::{has_nul, quoted};

/// Why a Secret cannot be used; both drivers answer it as `INVALID_ARGUMENT`. The message
/// names keys, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SecretError(pub String);

fn invalid(msg: impl Into<String>) -> SecretError {
    SecretError(msg.into())
}

/// The keys of the three shapes.
pub mod keys {
    pub const ACCESS_KEY_ID: &str = "accessKeyID";
    pub const SECRET_ACCESS_KEY: &str = "secretAccessKey";
    pub const SESSION_TOKEN: &str = "sessionToken";

    /// The prefix of every v1alpha2 key.
    pub const COSI_PREFIX: &str = "COSI_";
    pub const COSI_PROTOCOL: &str = "COSI_PROTOCOL";
    pub const COSI_BUCKET_ID: &str = "COSI_S3_BUCKET_ID";
    pub const COSI_ENDPOINT: &str = "COSI_S3_ENDPOINT";
    pub const COSI_REGION: &str = "COSI_S3_REGION";
    pub const COSI_ADDRESSING_STYLE: &str = "COSI_S3_ADDRESSING_STYLE";
    pub const COSI_ACCESS_KEY_ID: &str = "COSI_S3_ACCESS_KEY_ID";
    pub const COSI_ACCESS_SECRET_KEY: &str = "COSI_S3_ACCESS_SECRET_KEY";

    /// The v1alpha1 JSON document.
    pub const COSI_BUCKET_INFO: &str = "BucketInfo";
}

/// Which shape a Secret had.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SecretShape {
    /// No Secret, or none of the known keys.
    #[default]
    None,
    /// `accessKeyID` / `secretAccessKey`.
    S3vol,
    /// A COSI v1alpha2 BucketAccess Secret.
    CosiV1alpha2,
    /// A COSI v1alpha1 BucketAccess Secret (`BucketInfo`).
    CosiV1alpha1,
}

/// Where the bucket is, as far as the Secret says. Each field is a default for the volume
/// attribute (or StorageClass parameter) of the same meaning.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretHints {
    /// A bucket name, not yet validated (the volume attribute may override it).
    pub bucket: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// `Some(true)`: path-style addressing; `Some(false)`: virtual-hosted.
    pub path_style: Option<bool>,
}

/// A parsed secrets map. Its `Debug` redacts the secret key (see [`StaticCredentials`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedSecret {
    pub shape: SecretShape,
    /// `None`: the driver's own credential chain.
    pub credentials: Option<StaticCredentials>,
    pub hints: SecretHints,
}

fn trimmed(map: &HashMap<String, String>, key: &str) -> Option<String> {
    map.get(key)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// A secret value as given (a key may legitimately end in whitespace), unless empty.
fn exact(map: &HashMap<String, String>, key: &str) -> Option<String> {
    map.get(key).filter(|v| !v.is_empty()).cloned()
}

/// The Secret's keys for an error message: sorted, escaped, at most ten (never values).
fn key_list(map: &HashMap<String, String>) -> String {
    let mut k: Vec<_> = map.keys().map(String::as_str).collect();
    k.sort_unstable();
    let mut list: Vec<String> = k
        .iter()
        .take(10)
        .map(|k| {
            // Plain keys as they are, anything odd escaped and shortened.
            if k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && k.len() <= 64
            {
                (*k).to_owned()
            } else {
                quoted(k)
            }
        })
        .collect();
    if k.len() > 10 {
        list.push(format!("and {} more", k.len() - 10));
    }
    list.join(", ")
}

fn needs_both(map: &HashMap<String, String>, id: &str, secret: &str) -> SecretError {
    invalid(format!(
        "the secret must hold non-empty values for both {id} and {secret} (keys present: {})",
        key_list(map)
    ))
}

impl ParsedSecret {
    /// Parses a CSI secrets map of any of the three shapes.
    pub fn parse(secrets: &HashMap<String, String>) -> Result<Self, SecretError> {
        if let Some(k) = secrets
            .iter()
            .find(|(k, v)| has_nul(k) || has_nul(v))
            .map(|e| e.0)
        {
            return Err(invalid(format!(
                "the secret's entry {} holds a NUL byte",
                quoted(k)
            )));
        }
        let s3vol = [
            keys::ACCESS_KEY_ID,
            keys::SECRET_ACCESS_KEY,
            keys::SESSION_TOKEN,
        ]
        .iter()
        .any(|k| secrets.contains_key(*k));
        let v2 = secrets.keys().any(|k| k.starts_with(keys::COSI_PREFIX));
        let v1 = secrets.contains_key(keys::COSI_BUCKET_INFO);
        match (s3vol, v2, v1) {
            (false, false, false) => Ok(Self::default()),
            (true, false, false) => Self::parse_s3vol(secrets),
            (false, true, false) => Self::parse_cosi_v1alpha2(secrets),
            (false, false, true) => Self::parse_cosi_v1alpha1(secrets),
            _ => Err(invalid(format!(
                "the secret mixes the keys of s3vol ({}, {}), of a COSI v1alpha2 BucketAccess \
                 ({}…) and of a COSI v1alpha1 BucketAccess ({}); use one (keys present: {})",
                keys::ACCESS_KEY_ID,
                keys::SECRET_ACCESS_KEY,
                keys::COSI_PREFIX,
                keys::COSI_BUCKET_INFO,
                key_list(secrets)
            ))),
        }
    }

    fn parse_s3vol(secrets: &HashMap<String, String>) -> Result<Self, SecretError> {
        let id = trimmed(secrets, keys::ACCESS_KEY_ID);
        let secret = exact(secrets, keys::SECRET_ACCESS_KEY);
        // Some key of this shape is present (that is how we got here): both halves of the pair
        // must hold a value. Empty values or a lone session token are a broken Secret, not a
        // request for the driver's own identity.
        let (Some(access_key_id), Some(secret_access_key)) = (id, secret) else {
            return Err(needs_both(
                secrets,
                keys::ACCESS_KEY_ID,
                keys::SECRET_ACCESS_KEY,
            ));
        };
        Ok(Self {
            shape: SecretShape::S3vol,
            credentials: Some(StaticCredentials {
                access_key_id,
                secret_access_key,
                session_token: exact(secrets, keys::SESSION_TOKEN),
            }),
            hints: SecretHints::default(),
        })
    }

    fn parse_cosi_v1alpha2(secrets: &HashMap<String, String>) -> Result<Self, SecretError> {
        if let Some(p) = trimmed(secrets, keys::COSI_PROTOCOL)
            && !p.eq_ignore_ascii_case("s3")
        {
            return Err(invalid(format!(
                "the secret is a COSI BucketAccess Secret for protocol {p:?}; s3vol mounts S3 \
                 buckets only"
            )));
        }
        let (Some(access_key_id), Some(secret_access_key)) = (
            trimmed(secrets, keys::COSI_ACCESS_KEY_ID),
            exact(secrets, keys::COSI_ACCESS_SECRET_KEY),
        ) else {
            return Err(needs_both(
                secrets,
                keys::COSI_ACCESS_KEY_ID,
                keys::COSI_ACCESS_SECRET_KEY,
            ));
        };
        let path_style = match trimmed(secrets, keys::COSI_ADDRESSING_STYLE) {
            Some(s) if s.eq_ignore_ascii_case("path") => Some(true),
            Some(s) if s.eq_ignore_ascii_case("virtual") => Some(false),
            // Unset, or a style this driver does not know: the volume attribute or the default
            // decides.
            _ => None,
        };
        Ok(Self {
            shape: SecretShape::CosiV1alpha2,
            credentials: Some(StaticCredentials {
                access_key_id,
                secret_access_key,
                session_token: None,
            }),
            hints: SecretHints {
                bucket: trimmed(secrets, keys::COSI_BUCKET_ID),
                endpoint: trimmed(secrets, keys::COSI_ENDPOINT),
                region: trimmed(secrets, keys::COSI_REGION),
                path_style,
            },
        })
    }

    fn parse_cosi_v1alpha1(secrets: &HashMap<String, String>) -> Result<Self, SecretError> {
        let json = secrets
            .get(keys::COSI_BUCKET_INFO)
            .map(String::as_str)
            .unwrap_or_default();
        // serde_json's syntax errors quote no input, but say only where, to be sure.
        let doc: Value = serde_json::from_str(json).map_err(|e| {
            invalid(format!(
                "the secret's {} is not valid JSON (line {}, column {})",
                keys::COSI_BUCKET_INFO,
                e.line(),
                e.column()
            ))
        })?;
        let spec = &doc["spec"];
        let s3 = &spec["secretS3"];
        if !s3.is_object() {
            return Err(invalid(format!(
                "the secret's {} has no spec.secretS3: not a BucketAccess for S3",
                keys::COSI_BUCKET_INFO
            )));
        }
        let text = |v: &Value| {
            v.as_str()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let (Some(access_key_id), Some(secret_access_key)) = (
            text(&s3["accessKeyID"]),
            s3["accessSecretKey"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        ) else {
            return Err(invalid(format!(
                "the secret's {} must hold both spec.secretS3.accessKeyID and \
                 spec.secretS3.accessSecretKey",
                keys::COSI_BUCKET_INFO
            )));
        };
        Ok(Self {
            shape: SecretShape::CosiV1alpha1,
            credentials: Some(StaticCredentials {
                access_key_id,
                secret_access_key,
                session_token: None,
            }),
            hints: SecretHints {
                bucket: text(&spec["bucketName"]),
                endpoint: text(&s3["endpoint"]),
                region: text(&s3["region"]),
                path_style: None,
            },
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn creds(id: &str, secret: &str) -> Option<StaticCredentials> {
        Some(StaticCredentials {
            access_key_id: id.into(),
            secret_access_key: secret.into(),
            session_token: None,
        })
    }

    /// A v1alpha1 `BucketInfo` document as the released sidecar writes it.
    fn bucket_info(secret_s3: &str) -> String {
        format!(
            r#"{{"metadata":{{"name":"ba-1"}},"spec":{{"bucketName":"bc-1",
                "authenticationType":"KEY","secretS3":{secret_s3},"secretAzure":null,
                "protocols":["s3"]}}}}"#
        )
    }

    #[test]
    fn no_secret_means_the_driver_chain() {
        for m in [map(&[]), map(&[("unrelated", "x")])] {
            let s = ParsedSecret::parse(&m).unwrap();
            assert_eq!(s, ParsedSecret::default(), "{m:?}");
            assert_eq!(s.credentials, None);
        }
    }

    #[test]
    fn s3vol_keys() {
        let s = ParsedSecret::parse(&map(&[
            ("accessKeyID", " AK "),
            ("secretAccessKey", "SK"),
            ("sessionToken", "T"),
        ]))
        .unwrap();
        assert_eq!(s.shape, SecretShape::S3vol);
        let c = s.credentials.unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.session_token.as_deref()),
            ("AK", Some("T"))
        );
        assert_eq!(s.hints, SecretHints::default());
    }

    #[test]
    fn cosi_v1alpha2_secret() {
        let s = ParsedSecret::parse(&map(&[
            ("COSI_PROTOCOL", "S3"),
            ("COSI_S3_BUCKET_ID", "bc-1"),
            ("COSI_S3_ENDPOINT", "http://127.0.0.1:9000"),
            ("COSI_S3_REGION", "eu-west-1"),
            ("COSI_S3_ADDRESSING_STYLE", "path"),
            ("COSI_S3_ACCESS_KEY_ID", "AK"),
            ("COSI_S3_ACCESS_SECRET_KEY", "SK"),
        ]))
        .unwrap();
        assert_eq!(
            s,
            ParsedSecret {
                shape: SecretShape::CosiV1alpha2,
                credentials: creds("AK", "SK"),
                hints: SecretHints {
                    bucket: Some("bc-1".into()),
                    endpoint: Some("http://127.0.0.1:9000".into()),
                    region: Some("eu-west-1".into()),
                    path_style: Some(true),
                },
            }
        );
        // Only the keys are required; the rest are hints.
        let s = ParsedSecret::parse(&map(&[
            ("COSI_S3_ACCESS_KEY_ID", "AK"),
            ("COSI_S3_ACCESS_SECRET_KEY", "SK"),
            ("COSI_S3_ENDPOINT", ""),
        ]))
        .unwrap();
        assert_eq!(s.credentials, creds("AK", "SK"));
        assert_eq!(s.hints, SecretHints::default());
        for (style, want) in [
            ("virtual", Some(false)),
            ("PATH", Some(true)),
            ("dual", None),
        ] {
            let s = ParsedSecret::parse(&map(&[
                ("COSI_S3_ACCESS_KEY_ID", "AK"),
                ("COSI_S3_ACCESS_SECRET_KEY", "SK"),
                ("COSI_S3_ADDRESSING_STYLE", style),
            ]))
            .unwrap();
            assert_eq!(s.hints.path_style, want, "{style}");
        }
    }

    #[test]
    fn cosi_v1alpha1_secret() {
        let s = ParsedSecret::parse(&map(&[(
            "BucketInfo",
            &bucket_info(
                r#"{"endpoint":"https://s3.example","region":"us-east-1",
                    "accessKeyID":"AK","accessSecretKey":"SK"}"#,
            ),
        )]))
        .unwrap();
        assert_eq!(
            s,
            ParsedSecret {
                shape: SecretShape::CosiV1alpha1,
                credentials: creds("AK", "SK"),
                hints: SecretHints {
                    bucket: Some("bc-1".into()),
                    endpoint: Some("https://s3.example".into()),
                    region: Some("us-east-1".into()),
                    path_style: None,
                },
            }
        );
    }

    /// Every refusal is `InvalidArgument` and never shows the secret key.
    #[test]
    fn malformed_secrets_are_refused_without_their_values() {
        let cases = [
            map(&[("secretAccessKey", "TOPSECRET")]),
            map(&[("accessKeyID", "AK")]),
            // Present but empty, or only a session token: never the driver's own identity.
            map(&[("accessKeyID", ""), ("secretAccessKey", "")]),
            map(&[("accessKeyID", "  "), ("secretAccessKey", "")]),
            map(&[("sessionToken", "TOPSECRET")]),
            map(&[
                ("accessKeyID", ""),
                ("secretAccessKey", ""),
                ("sessionToken", "TOPSECRET"),
            ]),
            map(&[
                ("COSI_S3_ACCESS_KEY_ID", ""),
                ("COSI_S3_ACCESS_SECRET_KEY", ""),
            ]),
            // NUL bytes, in a value or a key.
            map(&[("accessKeyID", "AK"), ("secretAccessKey", "TOP\0SECRET")]),
            map(&[("accessKeyID\0", "AK"), ("secretAccessKey", "TOPSECRET")]),
            map(&[("COSI_S3_ACCESS_SECRET_KEY", "TOPSECRET")]),
            map(&[
                ("COSI_S3_ACCESS_KEY_ID", "AK"),
                ("COSI_S3_ACCESS_SECRET_KEY", ""),
            ]),
            // A COSI Secret for another protocol.
            map(&[
                ("COSI_PROTOCOL", "Azure"),
                ("COSI_AZURE_ACCESS_TOKEN", "TOPSECRET"),
            ]),
            map(&[("COSI_AZURE_ACCESS_TOKEN", "TOPSECRET")]),
            // Two shapes at once.
            map(&[
                ("accessKeyID", "AK"),
                ("secretAccessKey", "TOPSECRET"),
                ("COSI_S3_ACCESS_KEY_ID", "AK"),
                ("COSI_S3_ACCESS_SECRET_KEY", "TOPSECRET"),
            ]),
            map(&[
                ("accessKeyID", "AK"),
                ("secretAccessKey", "TOPSECRET"),
                ("BucketInfo", "{}"),
            ]),
            map(&[(
                "BucketInfo",
                r#"{"spec": {"secretS3": {"accessSecretKey": "TOPSECRET""#,
            )]),
            map(&[(
                "BucketInfo",
                r#"{"spec":{"secretS3":null,"secretAzure":{}}}"#,
            )]),
            map(&[(
                "BucketInfo",
                &bucket_info(r#"{"accessKeyID":"AK","accessSecretKey":""}"#),
            )]),
            map(&[(
                "BucketInfo",
                &bucket_info(r#"{"accessKeyID":7,"accessSecretKey":"TOPSECRET"}"#),
            )]),
        ];
        for m in cases {
            let e = ParsedSecret::parse(&m).unwrap_err();
            assert!(!e.to_string().contains("TOPSECRET"), "{e}");
        }
    }
}
