//! Parsing of everything a CO hands the driver as strings: StorageClass parameters, volume
//! attributes (volume context), secrets and mount flags.
//!
//! Parse, don't validate twice: each input becomes a typed value here, once, and a bad value is
//! an `InvalidArgument` naming the key (never a secret's value). Unknown StorageClass parameters
//! are rejected too, so a typo (`forcepathstyle`) fails loudly instead of being ignored; the
//! `csi.storage.k8s.io/` keys the external-provisioner adds are skipped.

use std::collections::{BTreeMap, HashMap};

use s3vol_s3::{Addressing, BucketName, CredentialSource, S3Config, StaticCredentials};

use crate::error::{CsiError, CsiResult};
use crate::handoff::MountOptions;
use crate::volume_id::{Location, validate_bucket_prefix};

/// Keys of the volume context the controller returns and static PVs set.
pub mod keys {
    pub const MODE: &str = "mode";
    pub const BUCKET: &str = "bucket";
    pub const BUCKET_PREFIX: &str = "bucketPrefix";
    pub const PREFIX: &str = "prefix";
    pub const ENDPOINT: &str = "endpoint";
    pub const REGION: &str = "region";
    pub const FORCE_PATH_STYLE: &str = "forcePathStyle";
    pub const ACCESS_KEY_ID: &str = "accessKeyID";
    pub const SECRET_ACCESS_KEY: &str = "secretAccessKey";
    pub const SESSION_TOKEN: &str = "sessionToken";
}

/// The driver's own defaults for volumes that name no endpoint or region.
#[derive(Clone, Debug, Default)]
pub struct Defaults {
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

/// How a StorageClass wants its volumes made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProvisionMode {
    /// A new bucket per volume, its name optionally starting with `bucket_prefix-`.
    Bucket { bucket_prefix: Option<String> },
    /// A new prefix per volume in the existing `bucket`.
    Prefix { bucket: BucketName },
}

/// Parsed StorageClass parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvisionParams {
    pub mode: ProvisionMode,
    pub location: Location,
}

fn non_empty(map: &HashMap<String, String>, key: &str) -> Option<String> {
    map.get(key)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

fn parse_bool(key: &str, v: Option<&String>) -> CsiResult<bool> {
    match v.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(CsiError::invalid(format!(
            "{key} must be \"true\" or \"false\", not {other:?}"
        ))),
    }
}

fn location(map: &HashMap<String, String>, defaults: &Defaults) -> CsiResult<Location> {
    let endpoint = non_empty(map, keys::ENDPOINT).or_else(|| defaults.endpoint.clone());
    if let Some(e) = &endpoint
        && !(e.starts_with("http://") || e.starts_with("https://"))
    {
        return Err(CsiError::invalid(format!(
            "endpoint {e:?} must start with http:// or https://"
        )));
    }
    Ok(Location {
        endpoint,
        region: non_empty(map, keys::REGION).or_else(|| defaults.region.clone()),
        path_style: parse_bool(keys::FORCE_PATH_STYLE, map.get(keys::FORCE_PATH_STYLE))?,
    })
}

fn bucket(value: &str, key: &str) -> CsiResult<BucketName> {
    BucketName::new(value).map_err(|e| CsiError::invalid(format!("{key}: {e}")))
}

impl ProvisionParams {
    pub fn parse(params: &HashMap<String, String>, defaults: &Defaults) -> CsiResult<Self> {
        const KNOWN: &[&str] = &[
            keys::MODE,
            keys::BUCKET,
            keys::BUCKET_PREFIX,
            keys::ENDPOINT,
            keys::REGION,
            keys::FORCE_PATH_STYLE,
        ];
        if let Some(unknown) = params
            .keys()
            .find(|k| !k.starts_with("csi.storage.k8s.io/") && !KNOWN.contains(&k.as_str()))
        {
            return Err(CsiError::invalid(format!(
                "unknown StorageClass parameter {unknown:?} (known: {})",
                KNOWN.join(", ")
            )));
        }
        let mode = match non_empty(params, keys::MODE).as_deref() {
            Some("bucket") => {
                let bucket_prefix = non_empty(params, keys::BUCKET_PREFIX);
                if let Some(p) = &bucket_prefix {
                    validate_bucket_prefix(p)?;
                }
                ProvisionMode::Bucket { bucket_prefix }
            }
            Some("prefix") => {
                let b = non_empty(params, keys::BUCKET).ok_or_else(|| {
                    CsiError::invalid("parameter bucket is required with mode: prefix")
                })?;
                ProvisionMode::Prefix {
                    bucket: bucket(&b, keys::BUCKET)?,
                }
            }
            Some(other) => {
                return Err(CsiError::invalid(format!(
                    "parameter mode must be \"bucket\" or \"prefix\", not {other:?}"
                )));
            }
            None => {
                return Err(CsiError::invalid(
                    "parameter mode is required (\"bucket\" or \"prefix\")",
                ));
            }
        };
        Ok(Self {
            mode,
            location: location(params, defaults)?,
        })
    }

    /// The parameters in a canonical form, recorded in the volume's marker and compared when
    /// CreateVolume is repeated.
    pub fn canonical(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        match &self.mode {
            ProvisionMode::Bucket { bucket_prefix } => {
                m.insert(keys::MODE.into(), "bucket".into());
                if let Some(p) = bucket_prefix {
                    m.insert(keys::BUCKET_PREFIX.into(), p.clone());
                }
            }
            ProvisionMode::Prefix { bucket } => {
                m.insert(keys::MODE.into(), "prefix".into());
                m.insert(keys::BUCKET.into(), bucket.to_string());
            }
        }
        if let Some(e) = &self.location.endpoint {
            m.insert(keys::ENDPOINT.into(), e.clone());
        }
        if let Some(r) = &self.location.region {
            m.insert(keys::REGION.into(), r.clone());
        }
        m.insert(
            keys::FORCE_PATH_STYLE.into(),
            self.location.path_style.to_string(),
        );
        m
    }
}

/// Where a volume's data is: from the volume context of a provisioned volume or the volume
/// attributes of a static PV.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeAttrs {
    pub bucket: BucketName,
    /// Empty, or a key prefix ending with `/`.
    pub prefix: String,
    pub location: Location,
}

impl VolumeAttrs {
    pub fn parse(context: &HashMap<String, String>, defaults: &Defaults) -> CsiResult<Self> {
        let b = non_empty(context, keys::BUCKET).ok_or_else(|| {
            CsiError::invalid("volume attribute bucket is required (volume_context)")
        })?;
        let prefix = non_empty(context, keys::PREFIX).unwrap_or_default();
        let prefix = prefix.trim_start_matches('/');
        let prefix = if prefix.is_empty() || prefix.ends_with('/') {
            prefix.to_owned()
        } else {
            format!("{prefix}/")
        };
        if prefix.split('/').any(|seg| seg == "." || seg == "..") {
            return Err(CsiError::invalid(format!(
                "volume attribute prefix {prefix:?} must not contain . or .. segments"
            )));
        }
        Ok(Self {
            bucket: bucket(&b, keys::BUCKET)?,
            prefix,
            location: location(context, defaults)?,
        })
    }

    /// The volume context for these attributes (what CreateVolume returns).
    pub fn to_context(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert(keys::BUCKET.into(), self.bucket.to_string());
        if !self.prefix.is_empty() {
            m.insert(keys::PREFIX.into(), self.prefix.clone());
        }
        if let Some(e) = &self.location.endpoint {
            m.insert(keys::ENDPOINT.into(), e.clone());
        }
        if let Some(r) = &self.location.region {
            m.insert(keys::REGION.into(), r.clone());
        }
        m.insert(
            keys::FORCE_PATH_STYLE.into(),
            self.location.path_style.to_string(),
        );
        m
    }
}

/// Credentials from a CSI secrets map (`accessKeyID`, `secretAccessKey`, optional
/// `sessionToken`). No secret at all means the driver's own credential chain.
pub fn credentials(secrets: &HashMap<String, String>) -> CsiResult<Option<StaticCredentials>> {
    let id = non_empty(secrets, keys::ACCESS_KEY_ID);
    let secret = secrets
        .get(keys::SECRET_ACCESS_KEY)
        .filter(|v| !v.is_empty())
        .cloned();
    match (id, secret) {
        (None, None) => Ok(None),
        (Some(access_key_id), Some(secret_access_key)) => Ok(Some(StaticCredentials {
            access_key_id,
            secret_access_key,
            session_token: secrets
                .get(keys::SESSION_TOKEN)
                .filter(|v| !v.is_empty())
                .cloned(),
        })),
        _ => Err(CsiError::invalid(format!(
            "the secret must hold both {} and {} (keys present: {})",
            keys::ACCESS_KEY_ID,
            keys::SECRET_ACCESS_KEY,
            {
                let mut k: Vec<_> = secrets.keys().map(String::as_str).collect();
                k.sort_unstable();
                k.join(", ")
            }
        ))),
    }
}

/// The client configuration for a location and optional static credentials.
pub fn s3_config(location: &Location, creds: Option<StaticCredentials>) -> S3Config {
    S3Config {
        endpoint_url: location.endpoint.clone(),
        region: location.region.clone(),
        addressing: if location.path_style {
            Addressing::Path
        } else {
            Addressing::VirtualHosted
        },
        credentials: match creds {
            Some(c) => CredentialSource::Static(c),
            None => CredentialSource::Chain,
        },
        max_attempts: 3,
        ..S3Config::default()
    }
}

fn need<'a>(key: &str, v: Option<&'a str>) -> CsiResult<&'a str> {
    v.filter(|v| !v.is_empty())
        .ok_or_else(|| CsiError::invalid(format!("mount option {key} needs a value")))
}

fn parse_mode(key: &str, v: &str) -> CsiResult<u32> {
    let digits = v.trim_start_matches("0o");
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| CsiError::invalid(format!("mount option {key}={v:?} is not an octal mode")))
}

fn parse_u64(key: &str, v: &str) -> CsiResult<u64> {
    v.parse()
        .map_err(|_| CsiError::invalid(format!("mount option {key}={v:?} is not a number")))
}

fn parse_u32(key: &str, v: &str) -> CsiResult<u32> {
    v.parse()
        .map_err(|_| CsiError::invalid(format!("mount option {key}={v:?} is not a number")))
}

/// Mount options from the volume capability's mount flags (StorageClass `mountOptions`, PV
/// `spec.mountOptions`): `name=value` items, possibly comma-separated, named like the
/// `s3vol mount` flags. Only the options that are safe to let a volume choose are accepted;
/// anything else is an `InvalidArgument` (so a flag can never smuggle in another argument).
pub fn mount_options(flags: &[String]) -> CsiResult<MountOptions> {
    let mut o = MountOptions::default();
    for item in flags.iter().flat_map(|f| f.split(',')) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (item, None),
        };
        match key {
            "uid" => o.uid = Some(parse_u32(key, need(key, value)?)?),
            "gid" => o.gid = Some(parse_u32(key, need(key, value)?)?),
            "file-mode" => o.file_mode = Some(parse_mode(key, need(key, value)?)?),
            "dir-mode" => o.dir_mode = Some(parse_mode(key, need(key, value)?)?),
            "metadata-ttl" => o.metadata_ttl = Some(parse_u64(key, need(key, value)?)?),
            "cache-size" => o.cache_size = Some(parse_u64(key, need(key, value)?)?),
            "memory-limit" => o.memory_limit = Some(parse_u64(key, need(key, value)?)?),
            "ro" | "read-only" if value.is_none() => o.read_only = true,
            "rw" if value.is_none() => {}
            _ => {
                return Err(CsiError::invalid(format!(
                    "unsupported mount option {key:?} (supported: uid, gid, file-mode, dir-mode, \
                     metadata-ttl, cache-size, memory-limit, ro)"
                )));
            }
        }
    }
    Ok(o)
}

/// Applies a pod's `fsGroup` (the capability's `volume_mount_group`): files and directories
/// without ownership metadata get that group and group-writable modes, unless the mount
/// options set them explicitly.
pub fn apply_mount_group(o: &mut MountOptions, group: &str) -> CsiResult<()> {
    if group.is_empty() {
        return Ok(());
    }
    let gid: u32 = group.parse().map_err(|_| {
        CsiError::invalid(format!(
            "volume_mount_group {group:?} is not a numeric group id"
        ))
    })?;
    o.gid = Some(gid);
    o.dir_mode.get_or_insert(0o775);
    o.file_mode.get_or_insert(0o664);
    Ok(())
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

    #[test]
    fn storage_class_parameters() {
        let d = Defaults {
            endpoint: Some("http://default:9000".into()),
            region: Some("us-east-1".into()),
        };
        let p = ProvisionParams::parse(&map(&[("mode", "bucket")]), &d).unwrap();
        assert_eq!(
            p.mode,
            ProvisionMode::Bucket {
                bucket_prefix: None
            }
        );
        assert_eq!(p.location.endpoint.as_deref(), Some("http://default:9000"));
        let p = ProvisionParams::parse(
            &map(&[
                ("mode", "prefix"),
                ("bucket", "team"),
                ("endpoint", "https://s3.example"),
                ("region", "eu-west-1"),
                ("forcePathStyle", "TRUE"),
                ("csi.storage.k8s.io/pv/name", "pvc-1"),
            ]),
            &d,
        )
        .unwrap();
        assert_eq!(
            p.mode,
            ProvisionMode::Prefix {
                bucket: BucketName::new("team").unwrap()
            }
        );
        assert!(p.location.path_style);
        assert_eq!(p.location.region.as_deref(), Some("eu-west-1"));
        assert_eq!(
            p.canonical().get("bucket").map(String::as_str),
            Some("team")
        );

        for bad in [
            map(&[]),
            map(&[("mode", "disk")]),
            map(&[("mode", "prefix")]),
            map(&[("mode", "bucket"), ("forcePathStyle", "yes")]),
            map(&[("mode", "bucket"), ("endpoint", "s3.example")]),
            map(&[("mode", "bucket"), ("forcepathstyle", "true")]),
            map(&[("mode", "bucket"), ("bucketPrefix", "Bad_")]),
        ] {
            let e = ProvisionParams::parse(&bad, &d).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn volume_attributes() {
        let a = VolumeAttrs::parse(
            &map(&[("bucket", "data"), ("prefix", "/imagenet")]),
            &Defaults::default(),
        )
        .unwrap();
        assert_eq!(a.prefix, "imagenet/");
        assert_eq!(
            VolumeAttrs::parse(&a.to_context(), &Defaults::default()).unwrap(),
            a
        );
        assert!(VolumeAttrs::parse(&map(&[]), &Defaults::default()).is_err());
        assert!(
            VolumeAttrs::parse(
                &map(&[("bucket", "d"), ("prefix", "a/../b")]),
                &Defaults::default()
            )
            .is_err()
        );
    }

    #[test]
    fn secrets() {
        assert_eq!(credentials(&map(&[])).unwrap(), None);
        let c = credentials(&map(&[
            ("accessKeyID", "AK"),
            ("secretAccessKey", "SK"),
            ("sessionToken", "T"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.session_token.as_deref(), Some("T"));
        let e = credentials(&map(&[("secretAccessKey", "TOPSECRET")])).unwrap_err();
        assert!(!e.to_string().contains("TOPSECRET"), "{e}");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn mount_flags() {
        let o = mount_options(&[
            "uid=1000,gid=2000".into(),
            "file-mode=0640".into(),
            "dir-mode=750".into(),
            "metadata-ttl=10".into(),
            "ro".into(),
        ])
        .unwrap();
        assert_eq!(o.uid, Some(1000));
        assert_eq!(o.gid, Some(2000));
        assert_eq!(o.file_mode, Some(0o640));
        assert_eq!(o.dir_mode, Some(0o750));
        assert_eq!(o.metadata_ttl, Some(10));
        assert!(o.read_only);
        for bad in [
            "cache-dir=/etc",
            "uid=x",
            "file-mode=99",
            "--uid=0",
            "uid",
            "foo",
        ] {
            assert!(mount_options(&[bad.into()]).is_err(), "{bad}");
        }
        let mut o = mount_options(&["file-mode=0600".into()]).unwrap();
        apply_mount_group(&mut o, "3000").unwrap();
        assert_eq!(
            (o.gid, o.file_mode, o.dir_mode),
            (Some(3000), Some(0o600), Some(0o775))
        );
        assert!(apply_mount_group(&mut o, "staff").is_err());
    }
}
