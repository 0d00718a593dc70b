//! Client configuration: where the store is, how to address it, whose credentials to use, and
//! how long to wait for it.
//!
//! Third-party stores (MinIO, Ceph RGW, COS, OSS, OBS) reject the CRC checksums and
//! `aws-chunked` encoding the AWS SDK sends by default since 2025, so checksums are computed
//! and validated only when an operation requires them unless [`ChecksumPolicy::WhenSupported`]
//! is asked for.
//!
//! **Timeouts fit the request** ([`S3Config::attempt_timeout`]). DESIGN.md asks for timeouts
//! set once, in the client builder; the client's default is the short one, and `AwsStore`
//! overrides it per request from the table here, because no single limit fits both a HEAD
//! (which should fail in seconds when nobody answers) and a 64 MiB part upload. One attempt
//! of a request that sends no body (HEAD, GET up to the response head, DELETE, creating or
//! aborting an upload) gets [`S3Config::request_timeout`] (5 s), a LIST twice that, an upload
//! (PUT, UploadPart) that plus its body's length at [`S3Config::min_throughput`] (1 MiB/s:
//! 13 s for an 8 MiB part), and requests the server works on for a while (CopyObject,
//! UploadPartCopy, CompleteMultipartUpload, DeleteObjects) [`S3Config::server_work_timeout`]
//! (60 s). An attempt that times out is retried after a short backoff (0.2 s doubling to at
//! most 2 s), so a store that answers again is used again within seconds, not after the
//! minutes a single 120 s attempt used to hold a writer. Every request is bounded:
//! `max_attempts` attempts and the backoffs between them ([`S3Config::request_bound`]). There
//! is no shared retry quota: after a long outage each request still gets all its attempts,
//! since a filesystem cannot give up a write because other requests failed before it.

use std::fmt;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::config::retry::{RetryPartition, TokenBucket};
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};

/// How bucket names go into request URLs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Addressing {
    /// `https://bucket.endpoint/key` (AWS's default; required by OSS).
    #[default]
    VirtualHosted,
    /// `https://endpoint/bucket/key` (MinIO, Ceph RGW, most local servers).
    Path,
}

/// When request and response checksums are used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChecksumPolicy {
    /// Only when the operation requires them (safe for every S3-compatible store).
    #[default]
    WhenRequired,
    /// Whenever the operation supports them (AWS S3 itself).
    WhenSupported,
}

/// Whether the SHA-256 of a request body (PUT, UploadPart) is part of the request's signature.
/// Hashing costs a pass over every byte uploaded, on the client and again on the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PayloadSigning {
    /// Unsigned over HTTPS, where TLS already protects the body; signed over plain HTTP (as
    /// the AWS SDKs for Python and Java do).
    #[default]
    Auto,
    Always,
    Never,
}

impl std::str::FromStr for PayloadSigning {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => Err(format!("{s:?}: expected auto, always or never")),
        }
    }
}

/// Access keys handed in by the caller (a CSI secret, a COSI grant, a pipe).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token: Option<String>,
}

impl fmt::Debug for StaticCredentials {
    // Secrets never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Where credentials come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CredentialSource {
    /// The standard AWS chain: environment, shared config/credentials files (optionally a
    /// named profile), web identity token file (IRSA / workload identity), ECS and IMDS.
    #[default]
    Chain,
    /// The chain, starting from a named profile of the shared config files.
    Profile(String),
    /// Fixed keys.
    Static(StaticCredentials),
    /// Keys that may be replaced while the client runs (see [`crate::RotatingCredentials`]);
    /// the client then caches no identity, so a replacement applies to the next request.
    Rotating(crate::RotatingCredentials),
    /// A role assumed with a web identity token (see [`crate::WebIdentityCredentials`]); the
    /// provider keeps and renews the temporary credentials itself.
    WebIdentity(crate::WebIdentityCredentials),
    /// Unsigned requests, for public buckets.
    Anonymous,
}

/// Everything needed to build a client.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// A custom endpoint (`http://127.0.0.1:9000`); `None` means AWS's for the region.
    pub endpoint_url: Option<String>,
    /// The region; `None` takes it from the environment, profile or instance metadata, and
    /// falls back to `us-east-1` (always, without asking, when `endpoint_url` is set).
    pub region: Option<String>,
    pub addressing: Addressing,
    pub credentials: CredentialSource,
    pub checksums: ChecksumPolicy,
    pub payload_signing: PayloadSigning,
    /// Attempts per request, including the first (SDK standard retry with backoff).
    pub max_attempts: u32,
    /// Time limit of establishing a connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Time limit of one attempt of a request that sends no body, until its answer (the
    /// response head for GET, whose body then has the stalled-stream guard).
    pub request_timeout: Duration,
    /// Uploads get `request_timeout` plus their body's length at this many bytes per second.
    pub min_throughput: u64,
    /// Time limit of one attempt of a request the server works on for a while: CopyObject,
    /// UploadPartCopy, CompleteMultipartUpload, DeleteObjects.
    pub server_work_timeout: Duration,
}

/// What a request does, for the time limit of one of its attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Sends no body: HEAD, GET (until the response head), DELETE, create or abort an upload.
    Small,
    /// ListObjectsV2: the server walks its index.
    List,
    /// Sends a body of this many bytes (PutObject, UploadPart).
    Upload(u64),
    /// The server copies or assembles data before answering.
    ServerWork,
}

/// First pause between two attempts of a request; it doubles up to [`MAX_BACKOFF`] (the SDK
/// adds jitter).
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// Longest pause between two attempts of a request.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint_url: None,
            region: None,
            addressing: Addressing::default(),
            credentials: CredentialSource::default(),
            checksums: ChecksumPolicy::default(),
            payload_signing: PayloadSigning::default(),
            max_attempts: 5,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            min_throughput: 1 << 20,
            server_work_timeout: Duration::from_secs(60),
        }
    }
}

impl S3Config {
    /// The time limit of one attempt of a request of this kind.
    pub fn attempt_timeout(&self, kind: RequestKind) -> Duration {
        match kind {
            RequestKind::Small => self.request_timeout,
            RequestKind::List => self.request_timeout * 2,
            RequestKind::Upload(bytes) => {
                self.request_timeout
                    + Duration::from_secs_f64(bytes as f64 / self.min_throughput.max(1) as f64)
            }
            RequestKind::ServerWork => self.server_work_timeout,
        }
    }

    /// The longest a request of this kind can take when the server never answers: every
    /// attempt times out and waits the longest backoff before the next. A close needs one such
    /// request per part still to send, and one to complete the upload.
    pub fn request_bound(&self, kind: RequestKind) -> Duration {
        let attempts = self.max_attempts.max(1);
        self.attempt_timeout(kind) * attempts + MAX_BACKOFF * (attempts - 1)
    }

    /// Whether uploads go with `UNSIGNED-PAYLOAD` under this configuration.
    pub fn unsigned_payload(&self) -> bool {
        match self.payload_signing {
            PayloadSigning::Always => false,
            PayloadSigning::Never => true,
            // No endpoint: AWS, over HTTPS.
            PayloadSigning::Auto => self.endpoint_url.as_deref().is_none_or(|u| {
                u.get(..8)
                    .is_some_and(|p| p.eq_ignore_ascii_case("https://"))
            }),
        }
    }

    /// Builds the SDK client for this configuration. Credentials are resolved lazily, on the
    /// first request.
    pub async fn build_sdk_client(&self) -> aws_sdk_s3::Client {
        let shared = self.load_shared_config().await;
        let mut builder = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(self.addressing == Addressing::Path)
            // Each request gets all its attempts, however many failed before it.
            .retry_partition(
                RetryPartition::custom("s3vol")
                    .token_bucket(TokenBucket::unlimited())
                    .build(),
            );
        builder = match self.checksums {
            ChecksumPolicy::WhenRequired => builder
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired),
            ChecksumPolicy::WhenSupported => builder
                .request_checksum_calculation(RequestChecksumCalculation::WhenSupported)
                .response_checksum_validation(ResponseChecksumValidation::WhenSupported),
        };
        aws_sdk_s3::Client::from_conf(builder.build())
    }

    /// The shared SDK configuration (region, credentials, endpoint, timeouts, retries); the
    /// COSI driver builds its IAM client from the same.
    pub async fn load_shared_config(&self) -> aws_config::SdkConfig {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(self.max_attempts.max(1))
                    .with_initial_backoff(INITIAL_BACKOFF)
                    .with_max_backoff(MAX_BACKOFF),
            )
            .timeout_config(self.timeout_config(RequestKind::Small));
        match (&self.region, &self.endpoint_url) {
            (Some(region), _) => loader = loader.region(Region::new(region.clone())),
            // A custom endpoint still needs a region to sign for: the environment's or the
            // profile's when set, else us-east-1. Asking the instance metadata service (the
            // last link of the SDK's region chain) would only add a slow, useless request.
            (None, Some(_)) => {
                let region = match region_from_env() {
                    Some(r) => Some(r),
                    None => self.region_from_profile().await,
                };
                loader = loader.region(region.unwrap_or_else(|| Region::from_static("us-east-1")));
            }
            (None, None) => {}
        }
        if let Some(endpoint) = &self.endpoint_url {
            loader = loader.endpoint_url(endpoint);
        }
        loader = match &self.credentials {
            CredentialSource::Chain => loader,
            CredentialSource::Profile(name) => loader.profile_name(name),
            CredentialSource::Static(keys) => {
                loader.credentials_provider(aws_credential_types::Credentials::new(
                    keys.access_key_id.clone(),
                    keys.secret_access_key.clone(),
                    keys.session_token.clone(),
                    None,
                    "s3vol-static",
                ))
            }
            CredentialSource::Rotating(provider) => loader
                .credentials_provider(provider.clone())
                .identity_cache(aws_config::identity::IdentityCache::no_cache()),
            CredentialSource::WebIdentity(provider) => loader
                .credentials_provider(provider.clone())
                .identity_cache(aws_config::identity::IdentityCache::no_cache()),
            CredentialSource::Anonymous => loader.no_credentials(),
        };
        let mut shared = loader.load().await;
        if shared.region().is_none() {
            shared = shared
                .into_builder()
                .region(Region::from_static("us-east-1"))
                .build();
        }
        shared
    }

    /// The SDK timeouts of one attempt of a request of this kind.
    pub(crate) fn timeout_config(&self, kind: RequestKind) -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(self.connect_timeout)
            .operation_attempt_timeout(self.attempt_timeout(kind))
            .build()
    }

    /// The region of the profile in use (`--profile`, else `AWS_PROFILE`, else `default`).
    async fn region_from_profile(&self) -> Option<Region> {
        let mut provider = aws_config::profile::ProfileFileRegionProvider::builder();
        if let CredentialSource::Profile(name) = &self.credentials {
            provider = provider.profile_name(name);
        }
        aws_config::meta::region::ProvideRegion::region(&provider.build()).await
    }
}

/// `AWS_REGION`, else `AWS_DEFAULT_REGION`, when set and not empty.
fn region_from_env() -> Option<Region> {
    ["AWS_REGION", "AWS_DEFAULT_REGION"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|r| !r.trim().is_empty())
        .map(|r| Region::new(r.trim().to_owned()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn attempt_timeouts_fit_the_request_and_bound_it() {
        let c = S3Config::default();
        let s = Duration::from_secs;
        assert_eq!(c.attempt_timeout(RequestKind::Small), s(5));
        assert_eq!(c.attempt_timeout(RequestKind::List), s(10));
        assert_eq!(c.attempt_timeout(RequestKind::Upload(0)), s(5));
        assert_eq!(c.attempt_timeout(RequestKind::Upload(8 << 20)), s(13));
        assert_eq!(c.attempt_timeout(RequestKind::ServerWork), s(60));
        // Five attempts and four pauses of at most 2 s.
        assert_eq!(c.request_bound(RequestKind::Small), s(33));
        assert_eq!(c.request_bound(RequestKind::Upload(8 << 20)), s(73));
        let slow = S3Config {
            min_throughput: 256 << 10,
            max_attempts: 1,
            ..S3Config::default()
        };
        assert_eq!(slow.request_bound(RequestKind::Upload(8 << 20)), s(37));
    }

    #[test]
    fn payload_signing_follows_the_scheme_unless_forced() {
        let with = |endpoint: Option<&str>, payload_signing| S3Config {
            endpoint_url: endpoint.map(str::to_owned),
            payload_signing,
            ..S3Config::default()
        };
        use PayloadSigning::*;
        assert!(with(None, Auto).unsigned_payload(), "AWS is HTTPS");
        assert!(with(Some("HTTPS://minio:9000"), Auto).unsigned_payload());
        assert!(!with(Some("http://127.0.0.1:9000"), Auto).unsigned_payload());
        assert!(with(Some("http://127.0.0.1:9000"), Never).unsigned_payload());
        assert!(!with(None, Always).unsigned_payload());
        assert_eq!("never".parse::<PayloadSigning>(), Ok(Never));
        assert!("sometimes".parse::<PayloadSigning>().is_err());
    }
}
