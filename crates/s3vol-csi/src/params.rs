//! Parsing of everything a CO hands the driver as strings: StorageClass parameters, volume
//! attributes (volume context) and mount flags. Secrets are `crate::secret`'s.
//!
//! Parse, don't validate twice: each input becomes a typed value here, once, and a bad value is
//! an `InvalidArgument` naming the key (never a secret's value). Unknown StorageClass parameters
//! are rejected too, so a typo (`forcepathstyle`) fails loudly instead of being ignored; the
//! `csi.storage.k8s.io/` keys the external-provisioner adds are skipped.
//!
//! Every string is checked before it is interpreted: a NUL byte anywhere (key or value) is
//! `InvalidArgument` ([`no_nul`]), a region must look like one (letters, digits, `-`, `_`,
//! `.`, starting with a letter or digit, so `--read-only` can never pass for a region), an
//! endpoint is an `http(s)://` URL without spaces or control characters, and a
//! `memory-limit` below what `s3vol mount` accepts (16M) is refused here, at CreateVolume or
//! NodeStageVolume, rather than by the serving process later. Messages quote a bad value
//! only shortened and escaped ([`quoted`]).
//!
//! Whose identity a volume's mounts use ([`AuthSource`], `authenticationSource` with its
//! `roleArn`, `stsEndpoint`, `tokenAudience`, `sessionDuration`) is a StorageClass parameter
//! the controller copies into the volume context ([`IDENTITY_KEYS`]); see `docs/identity.md`.
//!
//! Whether a volume keeps its mount through the death of its serving process ([`failover`],
//! `failover: "false"` turns it off) is likewise a StorageClass parameter copied into the
//! volume context ([`PASSED_KEYS`]), or a static PV's volume attribute.
//!
//! Where a bucket is (bucket, endpoint, region, addressing) is decided in one order everywhere:
//! the StorageClass parameter or volume attribute, else what the Secret says (a COSI
//! BucketAccess Secret, [`SecretHints`]), else the driver's [`Defaults`].

use std::collections::{BTreeMap, HashMap};

use s3vol_s3::input::{check_endpoint, check_region, has_nul};
use s3vol_s3::{Addressing, BucketName, CredentialSource, S3Config, StaticCredentials};

use crate::error::{CsiError, CsiResult};
use crate::handoff::MountOptions;
use crate::secret::SecretHints;
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
    /// Whose credentials a mount uses: `driver`, `secret` or `pod` ([`super::AuthSource`]).
    pub const AUTHENTICATION_SOURCE: &str = "authenticationSource";
    /// With `pod`: the role the pod's token assumes.
    pub const ROLE_ARN: &str = "roleArn";
    /// With `pod`: the STS endpoint (default: the volume's endpoint, else AWS's).
    pub const STS_ENDPOINT: &str = "stsEndpoint";
    /// With `pod`: which of the pod's tokens (by audience) to use when the CSIDriver asks for
    /// several.
    pub const TOKEN_AUDIENCE: &str = "tokenAudience";
    /// With `pod`: the lifetime, in seconds, asked for the role's credentials.
    pub const SESSION_DURATION: &str = "sessionDuration";
    /// `"false"`: a serving process that dies takes the volume with it (no successor).
    pub const FAILOVER: &str = "failover";
    /// What the kubelet adds to NodePublishVolume's volume context (`tokenRequests`,
    /// `podInfoOnMount`).
    pub const SA_TOKENS: &str = "csi.storage.k8s.io/serviceAccount.tokens";
    pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
    pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
}

/// The keys of the identity settings: StorageClass parameters copied into the volume context.
pub const IDENTITY_KEYS: &[&str] = &[
    keys::AUTHENTICATION_SOURCE,
    keys::ROLE_ARN,
    keys::STS_ENDPOINT,
    keys::TOKEN_AUDIENCE,
    keys::SESSION_DURATION,
];

/// StorageClass parameters the controller copies into the volume context as they are (besides
/// [`IDENTITY_KEYS`]); NodeStageVolume reads them there.
pub const PASSED_KEYS: &[&str] = &[keys::FAILOVER];

/// Whether a volume's serving process is replaced when it dies without being asked (the
/// `failover` parameter or attribute, `true` unless it says `"false"`). Failover makes new
/// files go through staging files rather than stream from memory, so that their bytes
/// survive the process; `"false"` trades that safety for the speed of small-file creates.
pub fn failover(context: &HashMap<String, String>) -> CsiResult<bool> {
    Ok(parse_bool(keys::FAILOVER, context.get(keys::FAILOVER))?.unwrap_or(true))
}

/// Whose credentials a volume's mounts use (`authenticationSource`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AuthSource {
    /// Not set: the keys of the node-stage Secret when there is one, else the driver's own
    /// identity (the behaviour before the setting existed).
    #[default]
    Default,
    /// `driver`: the driver's own identity (its service account, instance profile, …); the
    /// keys of a Secret, if any, are not used.
    Driver,
    /// `secret`: the keys of the node-stage (and node-publish) Secret; a volume without one
    /// does not mount.
    Secret,
    /// `pod`: each pod's own identity, a role assumed with its service-account token.
    Pod(PodIdentity),
}

/// How a pod's token becomes credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub role_arn: String,
    /// `None`: the volume's endpoint, else AWS's STS.
    pub sts_endpoint: Option<String>,
    pub audience: Option<String>,
    pub duration_seconds: Option<u32>,
}

impl AuthSource {
    /// Parses the identity settings of a volume context (or StorageClass parameters).
    pub fn parse(context: &HashMap<String, String>) -> CsiResult<Self> {
        let other = |k: &str| non_empty(context, k);
        let source = match other(keys::AUTHENTICATION_SOURCE).as_deref() {
            None => AuthSource::Default,
            Some("driver") => AuthSource::Driver,
            Some("secret") => AuthSource::Secret,
            Some("pod") => {
                let role_arn = other(keys::ROLE_ARN).ok_or_else(|| {
                    CsiError::invalid(
                        "authenticationSource: pod needs roleArn (the role the pod's token assumes)",
                    )
                })?;
                if !role_arn.starts_with("arn:") || role_arn.chars().any(|c| c.is_whitespace()) {
                    return Err(CsiError::invalid(format!(
                        "roleArn {} is not a role ARN (arn:aws:iam::ACCOUNT:role/NAME)",
                        quoted(&role_arn)
                    )));
                }
                let sts_endpoint = match other(keys::STS_ENDPOINT) {
                    Some(e) => {
                        check_endpoint(&e).map_err(|why| {
                            CsiError::invalid(format!("stsEndpoint {} {why}", quoted(&e)))
                        })?;
                        Some(e)
                    }
                    None => None,
                };
                let duration_seconds = match other(keys::SESSION_DURATION) {
                    Some(v) => Some(parse_u32(keys::SESSION_DURATION, &v)?),
                    None => None,
                };
                AuthSource::Pod(PodIdentity {
                    role_arn,
                    sts_endpoint,
                    audience: other(keys::TOKEN_AUDIENCE),
                    duration_seconds,
                })
            }
            Some(v) => {
                return Err(CsiError::invalid(format!(
                    "authenticationSource must be \"driver\", \"secret\" or \"pod\", not {}",
                    quoted(v)
                )));
            }
        };
        if !matches!(source, AuthSource::Pod(_))
            && let Some(k) = [keys::ROLE_ARN, keys::STS_ENDPOINT, keys::TOKEN_AUDIENCE]
                .into_iter()
                .find(|k| other(k).is_some())
        {
            return Err(CsiError::invalid(format!(
                "{k} only applies with authenticationSource: pod"
            )));
        }
        Ok(source)
    }
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

pub use s3vol_s3::input::quoted;

/// `InvalidArgument` when a key or value of `map` holds a NUL byte: no path, argument or
/// header can carry one, and it is never what a user meant. `what` names the map; values are
/// not quoted (they may be secrets).
pub fn no_nul(map: &HashMap<String, String>, what: &str) -> CsiResult<()> {
    match map.iter().find(|(k, v)| has_nul(k) || has_nul(v)) {
        Some((k, _)) => Err(CsiError::invalid(format!(
            "{what}: the entry {} holds a NUL byte",
            quoted(k)
        ))),
        None => Ok(()),
    }
}

/// The smallest `memory-limit` `s3vol mount` accepts.
pub const MIN_MEMORY_LIMIT: u64 = 16 << 20;

fn non_empty(map: &HashMap<String, String>, key: &str) -> Option<String> {
    map.get(key)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// `None` when unset or empty, so that a default applies.
fn parse_bool(key: &str, v: Option<&String>) -> CsiResult<Option<bool>> {
    match v.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") => Ok(None),
        Some("false") => Ok(Some(false)),
        Some("true") => Ok(Some(true)),
        Some(other) => Err(CsiError::invalid(format!(
            "{key} must be \"true\" or \"false\", not {}",
            quoted(other)
        ))),
    }
}

/// Said of a value that came from the Secret, in error messages.
const FROM_SECRET: &str = " (from the secret)";

fn location(
    map: &HashMap<String, String>,
    secret: &SecretHints,
    defaults: &Defaults,
) -> CsiResult<Location> {
    let (endpoint, from) = match non_empty(map, keys::ENDPOINT) {
        Some(e) => (Some(e), ""),
        None => match &secret.endpoint {
            Some(e) => (Some(e.clone()), FROM_SECRET),
            None => (defaults.endpoint.clone(), ""),
        },
    };
    if let Some(e) = &endpoint {
        check_endpoint(e).map_err(|why| CsiError::invalid(format!("endpoint{from}: {why}")))?;
    }
    let (region, from) = match non_empty(map, keys::REGION) {
        Some(r) => (Some(r), ""),
        None => match &secret.region {
            Some(r) => (Some(r.clone()), FROM_SECRET),
            None => (defaults.region.clone(), ""),
        },
    };
    if let Some(r) = &region {
        check_region(r).map_err(|why| CsiError::invalid(format!("{why}{from}")))?;
    }
    Ok(Location {
        endpoint,
        region,
        path_style: parse_bool(keys::FORCE_PATH_STYLE, map.get(keys::FORCE_PATH_STYLE))?
            .or(secret.path_style)
            .unwrap_or(false),
    })
}

fn bucket(value: &str, key: &str) -> CsiResult<BucketName> {
    BucketName::new(value).map_err(|e| CsiError::invalid(format!("{key}: {e}")))
}

/// The `bucket` parameter or attribute, else the Secret's bucket.
fn bucket_or_secret(
    map: &HashMap<String, String>,
    secret: &SecretHints,
) -> CsiResult<Option<BucketName>> {
    match (non_empty(map, keys::BUCKET), &secret.bucket) {
        (Some(b), _) => bucket(&b, keys::BUCKET).map(Some),
        (None, Some(b)) => bucket(b, &format!("{}{FROM_SECRET}", keys::BUCKET)).map(Some),
        (None, None) => Ok(None),
    }
}

impl ProvisionParams {
    /// `secret` fills in what the parameters leave out (see the module docs); in `mode:
    /// bucket` its bucket is ignored.
    pub fn parse(
        params: &HashMap<String, String>,
        secret: &SecretHints,
        defaults: &Defaults,
    ) -> CsiResult<Self> {
        no_nul(params, "parameters")?;
        const KNOWN: &[&str] = &[
            keys::MODE,
            keys::BUCKET,
            keys::BUCKET_PREFIX,
            keys::ENDPOINT,
            keys::REGION,
            keys::FORCE_PATH_STYLE,
        ];
        if let Some(unknown) = params.keys().find(|k| {
            !k.starts_with("csi.storage.k8s.io/")
                && !KNOWN.contains(&k.as_str())
                && !IDENTITY_KEYS.contains(&k.as_str())
                && !PASSED_KEYS.contains(&k.as_str())
        }) {
            return Err(CsiError::invalid(format!(
                "unknown StorageClass parameter {} (known: {})",
                quoted(unknown),
                [KNOWN, IDENTITY_KEYS, PASSED_KEYS].concat().join(", ")
            )));
        }
        failover(params)?;
        let mode = match non_empty(params, keys::MODE).as_deref() {
            Some("bucket") => {
                let bucket_prefix = non_empty(params, keys::BUCKET_PREFIX);
                if let Some(p) = &bucket_prefix {
                    validate_bucket_prefix(p)?;
                }
                ProvisionMode::Bucket { bucket_prefix }
            }
            Some("prefix") => ProvisionMode::Prefix {
                bucket: bucket_or_secret(params, secret)?.ok_or_else(|| {
                    CsiError::invalid(
                        "parameter bucket is required with mode: prefix (or a COSI \
                         BucketAccess secret naming the bucket)",
                    )
                })?,
            },
            Some(other) => {
                return Err(CsiError::invalid(format!(
                    "parameter mode must be \"bucket\" or \"prefix\", not {}",
                    quoted(other)
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
            location: location(params, secret, defaults)?,
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
    /// `secret` fills in what the attributes leave out (see the module docs).
    pub fn parse(
        context: &HashMap<String, String>,
        secret: &SecretHints,
        defaults: &Defaults,
    ) -> CsiResult<Self> {
        no_nul(context, "volume_context")?;
        let bucket = bucket_or_secret(context, secret)?.ok_or_else(|| {
            CsiError::invalid(
                "volume attribute bucket is required (volume_context), unless the secret is a \
                 COSI BucketAccess secret naming the bucket",
            )
        })?;
        let prefix = non_empty(context, keys::PREFIX).unwrap_or_default();
        // The rule `s3vol mount BUCKET/PREFIX` applies too.
        let prefix = s3vol_s3::normalize_prefix(&prefix).map_err(|e| {
            CsiError::invalid(format!(
                "volume attribute prefix {} {}",
                quoted(&e.prefix),
                e.reason
            ))
        })?;
        Ok(Self {
            bucket,
            prefix,
            location: location(context, secret, defaults)?,
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
        .ok_or_else(|| {
            CsiError::invalid(format!(
                "mount option {key}={} is not an octal mode",
                quoted(v)
            ))
        })
}

/// Sizes as `s3vol mount` takes them (`10G`, `512M`, plain bytes).
fn parse_bytes(key: &str, v: &str) -> CsiResult<u64> {
    s3vol_s3::parse_size(v).map_err(|e| CsiError::invalid(format!("mount option {key}: {e}")))
}

/// Seconds, fractions allowed, at most a day.
fn parse_seconds(key: &str, v: &str) -> CsiResult<f64> {
    v.parse::<f64>()
        .ok()
        .filter(|s| (0.0..=86_400.0).contains(s))
        .ok_or_else(|| {
            CsiError::invalid(format!(
                "mount option {key}={} is not a number of seconds between 0 and 86400",
                quoted(v)
            ))
        })
}

fn parse_u32(key: &str, v: &str) -> CsiResult<u32> {
    v.parse()
        .map_err(|_| CsiError::invalid(format!("mount option {key}={} is not a number", quoted(v))))
}

/// Mount options from the volume capability's mount flags (StorageClass `mountOptions`, PV
/// `spec.mountOptions`): `name=value` items, possibly comma-separated, named like the
/// `s3vol mount` flags. Only the options that are safe to let a volume choose are accepted;
/// anything else is an `InvalidArgument` (so a flag can never smuggle in another argument).
pub fn mount_options(flags: &[String]) -> CsiResult<MountOptions> {
    let mut o = MountOptions::default();
    if flags.iter().any(|f| f.contains('\0')) {
        return Err(CsiError::invalid("a mount option holds a NUL byte"));
    }
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
            "metadata-ttl" => o.metadata_ttl = Some(parse_seconds(key, need(key, value)?)?),
            "cache-size" => o.cache_size = Some(parse_bytes(key, need(key, value)?)?),
            "memory-limit" => {
                let m = parse_bytes(key, need(key, value)?)?;
                if m < MIN_MEMORY_LIMIT {
                    return Err(CsiError::invalid(format!(
                        "mount option memory-limit={} is too small: a volume needs at least 16M \
                         for its read and write buffers",
                        quoted(value.unwrap_or_default())
                    )));
                }
                o.memory_limit = Some(m);
            }
            "ro" | "read-only" if value.is_none() => o.read_only = true,
            "listing-attrs" if value.is_none() => o.listing_attrs = true,
            "no-xattr" if value.is_none() => o.no_xattr = true,
            "rw" if value.is_none() => {}
            _ => {
                return Err(CsiError::invalid(format!(
                    "unsupported mount option {} (supported: uid, gid, file-mode, dir-mode, \
                     metadata-ttl, cache-size, memory-limit, ro, listing-attrs, no-xattr)",
                    quoted(key)
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
            "volume_mount_group {} is not a numeric group id",
            quoted(group)
        ))
    })?;
    o.gid = Some(gid);
    // Set-group-ID on directories: files created in the volume join the pod's group, as on
    // any fsGroup volume.
    o.dir_mode.get_or_insert(0o2775);
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
    fn failover_is_on_unless_it_says_false() {
        assert!(failover(&map(&[])).unwrap());
        assert!(failover(&map(&[("failover", "")])).unwrap());
        assert!(failover(&map(&[("failover", "TRUE")])).unwrap());
        assert!(!failover(&map(&[("failover", "false")])).unwrap());
        match failover(&map(&[("failover", "no")])) {
            Err(CsiError::InvalidArgument(m)) => assert!(m.contains("failover"), "{m}"),
            other => panic!("{other:?}"),
        }
        let none = SecretHints::default();
        let d = Defaults::default();
        let p = map(&[("mode", "bucket"), ("failover", "false")]);
        assert!(
            ProvisionParams::parse(&p, &none, &d).is_ok(),
            "a known parameter"
        );
        let p = map(&[("mode", "bucket"), ("failover", "off")]);
        assert!(
            ProvisionParams::parse(&p, &none, &d).is_err(),
            "a bad value fails the claim"
        );
    }

    #[test]
    fn authentication_sources() {
        assert_eq!(AuthSource::parse(&map(&[])).unwrap(), AuthSource::Default);
        assert_eq!(
            AuthSource::parse(&map(&[("authenticationSource", "driver")])).unwrap(),
            AuthSource::Driver
        );
        assert_eq!(
            AuthSource::parse(&map(&[("authenticationSource", "secret")])).unwrap(),
            AuthSource::Secret
        );
        assert_eq!(
            AuthSource::parse(&map(&[
                ("authenticationSource", "pod"),
                ("roleArn", "arn:aws:iam::1:role/r"),
                ("stsEndpoint", "https://sts.example"),
                ("tokenAudience", "minio"),
                ("sessionDuration", "900"),
            ]))
            .unwrap(),
            AuthSource::Pod(PodIdentity {
                role_arn: "arn:aws:iam::1:role/r".into(),
                sts_endpoint: Some("https://sts.example".into()),
                audience: Some("minio".into()),
                duration_seconds: Some(900),
            })
        );
        for (bad, says) in [
            (&[("authenticationSource", "Pod")][..], "must be"),
            (&[("authenticationSource", "pod")][..], "needs roleArn"),
            (
                &[("authenticationSource", "pod"), ("roleArn", "reader")][..],
                "not a role ARN",
            ),
            (
                &[
                    ("authenticationSource", "pod"),
                    ("roleArn", "arn:aws:iam::1:role/r"),
                    ("stsEndpoint", "sts.example"),
                ][..],
                "stsEndpoint",
            ),
            (
                &[("roleArn", "arn:aws:iam::1:role/r")][..],
                "only applies with authenticationSource: pod",
            ),
        ] {
            match AuthSource::parse(&map(bad)) {
                Err(CsiError::InvalidArgument(m)) => assert!(m.contains(says), "{m}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        // A StorageClass may carry them.
        let sc = map(&[
            ("mode", "bucket"),
            ("authenticationSource", "pod"),
            ("roleArn", "arn:aws:iam::1:role/r"),
        ]);
        assert!(ProvisionParams::parse(&sc, &SecretHints::default(), &Defaults::default()).is_ok());
    }

    #[test]
    fn storage_class_parameters() {
        let d = Defaults {
            endpoint: Some("http://default:9000".into()),
            region: Some("us-east-1".into()),
        };
        let none = SecretHints::default();
        let p = ProvisionParams::parse(&map(&[("mode", "bucket")]), &none, &d).unwrap();
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
            &none,
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
            let e = ProvisionParams::parse(&bad, &none, &d).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn volume_attributes() {
        let none = SecretHints::default();
        let a = VolumeAttrs::parse(
            &map(&[("bucket", "data"), ("prefix", "/imagenet")]),
            &none,
            &Defaults::default(),
        )
        .unwrap();
        assert_eq!(a.prefix, "imagenet/");
        assert_eq!(
            VolumeAttrs::parse(&a.to_context(), &none, &Defaults::default()).unwrap(),
            a
        );
        assert!(VolumeAttrs::parse(&map(&[]), &none, &Defaults::default()).is_err());
        assert!(
            VolumeAttrs::parse(
                &map(&[("bucket", "d"), ("prefix", "a/../b")]),
                &none,
                &Defaults::default()
            )
            .is_err()
        );
    }

    /// What a COSI Secret says is a default: attributes and parameters override it, and it
    /// overrides the driver's defaults.
    #[test]
    fn secret_hints_sit_between_attributes_and_driver_defaults() {
        let hints = SecretHints {
            bucket: Some("from-secret".into()),
            endpoint: Some("http://secret:9000".into()),
            region: Some("secret-region".into()),
            path_style: Some(true),
        };
        let driver = Defaults {
            endpoint: Some("http://driver:9000".into()),
            region: Some("driver-region".into()),
        };
        let a = VolumeAttrs::parse(&map(&[("prefix", "p")]), &hints, &driver).unwrap();
        assert_eq!(a.bucket.as_str(), "from-secret");
        assert_eq!(
            a.location,
            Location {
                endpoint: Some("http://secret:9000".into()),
                region: Some("secret-region".into()),
                path_style: true,
            }
        );
        let a = VolumeAttrs::parse(
            &map(&[
                ("bucket", "from-attr"),
                ("endpoint", "https://attr"),
                ("region", "attr-region"),
                ("forcePathStyle", "false"),
            ]),
            &hints,
            &driver,
        )
        .unwrap();
        assert_eq!(a.bucket.as_str(), "from-attr");
        assert_eq!(
            a.location,
            Location {
                endpoint: Some("https://attr".into()),
                region: Some("attr-region".into()),
                path_style: false,
            }
        );
        // A Secret without a location leaves the driver's defaults in place.
        let a = VolumeAttrs::parse(
            &map(&[]),
            &SecretHints {
                bucket: Some("bkt".into()),
                ..SecretHints::default()
            },
            &driver,
        )
        .unwrap();
        assert_eq!(a.location.endpoint.as_deref(), Some("http://driver:9000"));
        assert_eq!(a.location.region.as_deref(), Some("driver-region"));
        assert!(!a.location.path_style);

        // StorageClass parameters: the Secret's bucket serves `mode: prefix`.
        let p = ProvisionParams::parse(&map(&[("mode", "prefix")]), &hints, &driver).unwrap();
        assert_eq!(
            p.mode,
            ProvisionMode::Prefix {
                bucket: BucketName::new("from-secret").unwrap()
            }
        );
        assert_eq!(p.location.endpoint.as_deref(), Some("http://secret:9000"));
        let p = ProvisionParams::parse(
            &map(&[("mode", "prefix"), ("bucket", "team"), ("region", "r")]),
            &hints,
            &driver,
        )
        .unwrap();
        assert_eq!(
            p.mode,
            ProvisionMode::Prefix {
                bucket: BucketName::new("team").unwrap()
            }
        );
        assert_eq!(p.location.region.as_deref(), Some("r"));

        // A bad value from the Secret is refused, and the message says where it came from.
        for bad in [
            SecretHints {
                bucket: Some("not a bucket".into()),
                ..SecretHints::default()
            },
            SecretHints {
                bucket: Some("bkt".into()),
                endpoint: Some("s3.example".into()),
                ..SecretHints::default()
            },
        ] {
            let e = VolumeAttrs::parse(&map(&[]), &bad, &driver).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.to_string().contains("from the secret"), "{e}");
        }
        // ... unless an attribute overrides it.
        let a = VolumeAttrs::parse(
            &map(&[("bucket", "fine"), ("endpoint", "https://s3.example")]),
            &SecretHints {
                bucket: Some("not a bucket".into()),
                endpoint: Some("s3.example".into()),
                ..SecretHints::default()
            },
            &driver,
        )
        .unwrap();
        assert_eq!(a.bucket.as_str(), "fine");
    }

    #[test]
    fn mount_flags() {
        let o = mount_options(&[
            "uid=1000,gid=2000".into(),
            "file-mode=0640".into(),
            "dir-mode=750".into(),
            "metadata-ttl=10".into(),
            "ro,listing-attrs,no-xattr".into(),
        ])
        .unwrap();
        assert_eq!(o.uid, Some(1000));
        assert_eq!(o.gid, Some(2000));
        assert_eq!(o.file_mode, Some(0o640));
        assert_eq!(o.dir_mode, Some(0o750));
        assert_eq!(o.metadata_ttl, Some(10.0));
        assert!(o.read_only && o.listing_attrs && o.no_xattr);
        assert!(!mount_options(&["ro".into()]).unwrap().listing_attrs);
        for bad in [
            "listing-attrs=yes",
            "no-xattr=1",
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
            (Some(3000), Some(0o600), Some(0o2775))
        );
        assert!(apply_mount_group(&mut o, "staff").is_err());
    }

    /// Values the serving process or the store could never use are refused here, with a
    /// message that says which and echoes nothing raw or huge.
    #[test]
    fn values_are_checked_before_use() {
        let d = Defaults::default();
        let none = SecretHints::default();
        for (k, v) in [
            ("region", "--read-only"),
            ("region", "us east 1"),
            ("region", "eu\twest"),
            ("endpoint", "http://127.0.0.1:9000\r\nHost: x"),
            ("endpoint", "http://a b"),
            ("bucketPrefix", "team\0"),
            ("mode\0", "bucket"),
        ] {
            let e =
                ProvisionParams::parse(&map(&[("mode", "bucket"), (k, v)]), &none, &d).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{k}={v:?}");
            let msg = e.to_string();
            assert!(
                !msg.contains('\n') && !msg.contains('\r') && !msg.contains('\0'),
                "{msg}"
            );
        }
        // A region from a Secret is checked too, and said to come from it.
        let hints = SecretHints {
            region: Some("--read-only".into()),
            ..SecretHints::default()
        };
        let e = VolumeAttrs::parse(&map(&[("bucket", "bkt")]), &hints, &d).unwrap_err();
        assert!(e.to_string().contains("from the secret"), "{e}");
        let e = VolumeAttrs::parse(&map(&[("bucket", "bkt"), ("prefix", "a\0")]), &none, &d)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        for ok in ["us-east-1", "ap-guangzhou", "oss-cn-hangzhou", "default"] {
            VolumeAttrs::parse(&map(&[("bucket", "bkt"), ("region", ok)]), &none, &d).unwrap();
        }
        // memory-limit below what a serving process accepts.
        for bad in ["memory-limit=1", "memory-limit=15M", "memory-limit=0"] {
            let e = mount_options(&[bad.into()]).unwrap_err();
            assert!(e.to_string().contains("at least 16M"), "{bad}: {e}");
        }
        assert_eq!(
            mount_options(&["memory-limit=16M".into()])
                .unwrap()
                .memory_limit,
            Some(16 << 20)
        );
        let e = mount_options(&["uid=1\0".into()]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        // A huge unknown option is quoted shortened.
        let huge = "x".repeat(100_000);
        let e = mount_options(&[huge]).unwrap_err();
        assert!(e.to_string().len() < 400, "{}", e.to_string().len());
    }
}
