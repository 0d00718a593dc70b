//! BucketClass and BucketAccessClass parameters, parsed once into types.
//!
//! COSI hands the driver a class's `parameters` map verbatim: the BucketClass's with bucket
//! calls, the BucketAccessClass's with access calls. One parser knows every key; a key it does
//! not know is refused (a typo such as `addresingStyle` would otherwise silently do the wrong
//! thing), except keys containing `/`, which by Kubernetes convention belong to other tools.
//!
//! Values are checked with `s3vol_s3::input`, as the CSI driver checks its own: a NUL byte in
//! any key or value, a region that is not a region name (`--read-only`) or an endpoint that is
//! not an `http(s)://` URL is `InvalidArgument`, and messages quote values escaped and cut.
//!
//! The store keys (`endpoint`, `region`, …) may appear in either class and fall back to the
//! driver's command-line defaults: an access call does not see the BucketClass, so a driver
//! serving several stores needs them in both.

use std::collections::HashMap;

use s3vol_s3::input::{check_endpoint, check_region, has_nul, quoted};

use crate::error::{CosiError, CosiResult};
use crate::naming;
use crate::policy::AccessMode;

/// Parameter keys.
pub mod keys {
    pub const ENDPOINT: &str = "endpoint";
    pub const REGION: &str = "region";
    pub const ADDRESSING_STYLE: &str = "addressingStyle";
    /// The StorageClass spelling of the addressing style: `"true"` is `path`.
    pub const FORCE_PATH_STYLE: &str = "forcePathStyle";
    pub const IAM_ENDPOINT: &str = "iamEndpoint";
    pub const CREDENTIALS_SECRET: &str = "credentialsSecret";
    pub const PROFILE: &str = "profile";
    pub const BUCKET_NAME_PREFIX: &str = "bucketNamePrefix";
    pub const VERSIONING: &str = "versioning";
    pub const OBJECT_LOCK: &str = "objectLock";
    pub const DELETE_OBJECTS: &str = "deleteObjectsOnDelete";
    pub const GRANT: &str = "grant";
    pub const ACCESS_MODE: &str = "accessMode";

    pub const ALL: &[&str] = &[
        ENDPOINT,
        REGION,
        ADDRESSING_STYLE,
        FORCE_PATH_STYLE,
        IAM_ENDPOINT,
        CREDENTIALS_SECRET,
        PROFILE,
        BUCKET_NAME_PREFIX,
        VERSIONING,
        OBJECT_LOCK,
        DELETE_OBJECTS,
        GRANT,
        ACCESS_MODE,
    ];
}

/// Addressing style, as a class parameter and in bucket info.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Addressing {
    Path,
    Virtual,
}

/// Which store to talk to and as whom; `None` fields take the driver's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct StoreParams {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub addressing: Option<Addressing>,
    pub iam_endpoint: Option<String>,
    /// A directory under the driver's `--secrets-dir` holding `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` files (a mounted Secret).
    pub credentials_secret: Option<String>,
    /// A profile of the shared AWS config/credentials files.
    pub profile: Option<String>,
}

/// How buckets are made and removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BucketOptions {
    pub name_prefix: String,
    pub versioning: bool,
    pub object_lock: bool,
    /// DeleteBucket first deletes every object (all versions) and pending upload.
    pub delete_objects: bool,
}

/// How access is granted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GrantKind {
    /// A dedicated IAM user with a policy scoped to the granted buckets and mode.
    #[default]
    Iam,
    /// The store credentials themselves, unchanged: no isolation at all.
    Static,
}

/// What an access class asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessOptions {
    pub grant: GrantKind,
    /// The mode when the request does not carry one.
    pub mode: Option<AccessMode>,
}

/// All parameters of a call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Params {
    pub store: StoreParams,
    pub bucket: BucketOptions,
    pub access: AccessOptions,
}

fn bool_param(key: &str, value: &str) -> CosiResult<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" | "" => Ok(false),
        _ => Err(CosiError::InvalidArgument(format!(
            "parameter {key}: {} is not true or false",
            quoted(value)
        ))),
    }
}

fn non_empty(value: &str) -> Option<String> {
    let v = value.trim();
    (!v.is_empty()).then(|| v.to_owned())
}

fn url_param(key: &str, value: &str) -> CosiResult<Option<String>> {
    let v = non_empty(value);
    if let Some(u) = &v {
        check_endpoint(u)
            .map_err(|why| CosiError::InvalidArgument(format!("parameter {key}: {why}")))?;
    }
    Ok(v)
}

impl Params {
    pub fn parse(map: &HashMap<String, String>) -> CosiResult<Self> {
        let mut p = Params::default();
        if let Some(k) = map
            .iter()
            .find(|(k, v)| has_nul(k) || has_nul(v))
            .map(|e| e.0)
        {
            return Err(CosiError::InvalidArgument(format!(
                "parameter {} holds a NUL byte",
                quoted(k)
            )));
        }
        let mut unknown: Vec<&str> = map
            .keys()
            .map(String::as_str)
            .filter(|k| !k.contains('/') && !keys::ALL.contains(k))
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            let unknown: Vec<String> = unknown.iter().take(10).map(|k| quoted(k)).collect();
            return Err(CosiError::InvalidArgument(format!(
                "unknown parameter(s) [{}]; known: {:?}",
                unknown.join(", "),
                keys::ALL
            )));
        }
        let get = |k: &str| map.get(k).map(String::as_str);
        if let Some(v) = get(keys::ENDPOINT) {
            p.store.endpoint = url_param(keys::ENDPOINT, v)?;
        }
        if let Some(v) = get(keys::IAM_ENDPOINT) {
            p.store.iam_endpoint = url_param(keys::IAM_ENDPOINT, v)?;
        }
        p.store.region = get(keys::REGION).and_then(non_empty);
        if let Some(r) = &p.store.region {
            check_region(r).map_err(|why| {
                CosiError::InvalidArgument(format!("parameter {}: {why}", keys::REGION))
            })?;
        }
        if let Some(v) = get(keys::ADDRESSING_STYLE) {
            p.store.addressing = match v.to_ascii_lowercase().as_str() {
                "path" => Some(Addressing::Path),
                "virtual" | "virtual-hosted" | "virtualhosted" => Some(Addressing::Virtual),
                "" => None,
                _ => {
                    return Err(CosiError::InvalidArgument(format!(
                        "parameter {}: {} is not path or virtual",
                        keys::ADDRESSING_STYLE,
                        quoted(v)
                    )));
                }
            };
        }
        if let Some(v) = get(keys::FORCE_PATH_STYLE) {
            let path = bool_param(keys::FORCE_PATH_STYLE, v)?;
            let style = if path {
                Addressing::Path
            } else {
                Addressing::Virtual
            };
            if p.store.addressing.is_some_and(|a| a != style) {
                return Err(CosiError::InvalidArgument(format!(
                    "parameters {} and {} disagree",
                    keys::ADDRESSING_STYLE,
                    keys::FORCE_PATH_STYLE
                )));
            }
            p.store.addressing = Some(style);
        }
        if let Some(v) = get(keys::CREDENTIALS_SECRET).and_then(non_empty) {
            let ok = v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
                && !v.starts_with('.');
            if !ok {
                return Err(CosiError::InvalidArgument(format!(
                    "parameter {}: {} must be a plain name (a directory under the \
                     driver's secrets directory)",
                    keys::CREDENTIALS_SECRET,
                    quoted(&v)
                )));
            }
            p.store.credentials_secret = Some(v);
        }
        p.store.profile = get(keys::PROFILE).and_then(non_empty);
        if p.store.profile.is_some() && p.store.credentials_secret.is_some() {
            return Err(CosiError::InvalidArgument(format!(
                "parameters {} and {} exclude each other",
                keys::PROFILE,
                keys::CREDENTIALS_SECRET
            )));
        }
        if let Some(v) = get(keys::BUCKET_NAME_PREFIX) {
            naming::check_prefix(v)?;
            p.bucket.name_prefix = v.to_owned();
        }
        if let Some(v) = get(keys::VERSIONING) {
            p.bucket.versioning = bool_param(keys::VERSIONING, v)?;
        }
        if let Some(v) = get(keys::OBJECT_LOCK) {
            p.bucket.object_lock = bool_param(keys::OBJECT_LOCK, v)?;
        }
        if let Some(v) = get(keys::DELETE_OBJECTS) {
            p.bucket.delete_objects = bool_param(keys::DELETE_OBJECTS, v)?;
        }
        if let Some(v) = get(keys::GRANT) {
            p.access.grant = match v.to_ascii_lowercase().as_str() {
                "iam" | "" => GrantKind::Iam,
                "static" => GrantKind::Static,
                _ => {
                    return Err(CosiError::InvalidArgument(format!(
                        "parameter {}: {} is not iam or static",
                        keys::GRANT,
                        quoted(v)
                    )));
                }
            };
        }
        if let Some(v) = get(keys::ACCESS_MODE).and_then(non_empty) {
            p.access.mode = Some(AccessMode::parse(&v)?);
        }
        Ok(p)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parse(kv: &[(&str, &str)]) -> CosiResult<Params> {
        Params::parse(
            &kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn every_parameter_parses() {
        let p = parse(&[
            ("endpoint", "http://127.0.0.1:9000"),
            ("region", "eu-1"),
            ("addressingStyle", "path"),
            ("iamEndpoint", "https://iam.example"),
            ("credentialsSecret", "minio-admin"),
            ("bucketNamePrefix", "team-"),
            ("versioning", "true"),
            ("objectLock", "false"),
            ("deleteObjectsOnDelete", "True"),
            ("grant", "static"),
            ("accessMode", "ReadOnly"),
            ("example.com/ignored", "x"),
        ])
        .unwrap();
        assert_eq!(p.store.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(p.store.region.as_deref(), Some("eu-1"));
        assert_eq!(p.store.addressing, Some(Addressing::Path));
        assert_eq!(p.store.iam_endpoint.as_deref(), Some("https://iam.example"));
        assert_eq!(p.store.credentials_secret.as_deref(), Some("minio-admin"));
        assert_eq!(p.bucket.name_prefix, "team-");
        assert!(p.bucket.versioning && !p.bucket.object_lock && p.bucket.delete_objects);
        assert_eq!(p.access.grant, GrantKind::Static);
        assert_eq!(p.access.mode, Some(AccessMode::ReadOnly));
        assert_eq!(parse(&[]).unwrap(), Params::default());
    }

    #[test]
    fn bad_parameters_are_invalid_arguments() {
        for kv in [
            [("addresingStyle", "path")],
            [("versioning", "maybe")],
            [("addressingStyle", "dns")],
            [("grant", "root")],
            [("accessMode", "all")],
            [("endpoint", "127.0.0.1:9000")],
            [("credentialsSecret", "../etc")],
            [("bucketNamePrefix", "UPPER")],
            [("region", "--read-only")],
            [("region", "us east")],
            [("endpoint", "http://a\r\nHost: evil")],
            [("grant", "iam\0")],
            [("x\0", "y")],
        ] {
            let e = parse(&kv).unwrap_err();
            assert!(matches!(e, CosiError::InvalidArgument(_)), "{kv:?}: {e}");
            assert!(
                !e.to_string().contains('\r') && !e.to_string().contains('\0'),
                "{e}"
            );
        }
        assert!(parse(&[("profile", "a"), ("credentialsSecret", "b")]).is_err());
        assert!(parse(&[("addressingStyle", "virtual"), ("forcePathStyle", "true")]).is_err());
    }

    #[test]
    fn force_path_style_is_the_storage_class_spelling_of_path_addressing() {
        let p = parse(&[("forcePathStyle", "true")]).unwrap();
        assert_eq!(p.store.addressing, Some(Addressing::Path));
        let p = parse(&[("forcePathStyle", "false")]).unwrap();
        assert_eq!(p.store.addressing, Some(Addressing::Virtual));
    }
}
