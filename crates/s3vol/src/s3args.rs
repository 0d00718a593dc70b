//! Command-line options that say how to reach S3, shared by the subcommands that talk to it.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use s3vol_s3::{
    Addressing, BucketName, ChecksumPolicy, CredentialSource, PayloadSigning, S3Config,
};

#[derive(Clone, Debug, Default, Args)]
pub struct S3Args {
    /// S3 endpoint URL, for stores other than AWS (e.g. http://127.0.0.1:9000).
    #[arg(long, env = "AWS_ENDPOINT_URL", value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// Region to sign requests for (default: from the AWS config, else us-east-1).
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// Address buckets as https://endpoint/bucket instead of https://bucket.endpoint.
    #[arg(long)]
    pub force_path_style: bool,
    /// Use this profile of the shared AWS config and credentials files.
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// Send unsigned requests (public buckets).
    #[arg(long, conflicts_with = "profile")]
    pub no_sign_request: bool,
    /// Compute and validate CRC checksums whenever the API allows (AWS S3 only; most
    /// S3-compatible stores reject them).
    #[arg(long)]
    pub full_checksums: bool,
    /// Whether upload bodies are hashed into the request signature: `auto` signs them over
    /// plain HTTP only (over HTTPS, TLS protects them), `always`, or `never`.
    #[arg(long, default_value = "auto", value_name = "WHEN")]
    pub payload_signing: PayloadSigning,
    /// Attempts per S3 request, including the first.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub max_attempts: u32,
}

impl S3Args {
    pub fn to_config(&self) -> S3Config {
        S3Config {
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            addressing: if self.force_path_style {
                Addressing::Path
            } else {
                Addressing::VirtualHosted
            },
            credentials: match (&self.profile, self.no_sign_request) {
                (_, true) => CredentialSource::Anonymous,
                (Some(p), false) => CredentialSource::Profile(p.clone()),
                (None, false) => CredentialSource::Chain,
            },
            checksums: if self.full_checksums {
                ChecksumPolicy::WhenSupported
            } else {
                ChecksumPolicy::WhenRequired
            },
            payload_signing: self.payload_signing,
            max_attempts: self.max_attempts,
            connect_timeout: Duration::from_secs(5),
            ..S3Config::default()
        }
    }
}

/// A bucket and an optional key prefix, from `BUCKET`, `BUCKET/PREFIX` or `s3://BUCKET/PREFIX`.
/// The prefix, when not empty, always ends with `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketPath {
    pub bucket: BucketName,
    pub prefix: String,
}

impl std::str::FromStr for BucketPath {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let rest = s.strip_prefix("s3://").unwrap_or(s);
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket = BucketName::new(bucket).with_context(|| format!("in {s:?}"))?;
        let prefix = prefix.trim_start_matches('/');
        let prefix = if prefix.is_empty() || prefix.ends_with('/') {
            prefix.to_owned()
        } else {
            format!("{prefix}/")
        };
        Ok(Self { bucket, prefix })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn bucket_paths() {
        let p = |s: &str| {
            s.parse::<BucketPath>()
                .map(|b| (b.bucket.to_string(), b.prefix))
        };
        assert_eq!(p("bkt").unwrap(), ("bkt".into(), "".into()));
        assert_eq!(p("s3://bkt").unwrap(), ("bkt".into(), "".into()));
        assert_eq!(p("s3://bkt/").unwrap(), ("bkt".into(), "".into()));
        assert_eq!(p("bkt/a/b").unwrap(), ("bkt".into(), "a/b/".into()));
        assert_eq!(p("s3://bkt/a/b/").unwrap(), ("bkt".into(), "a/b/".into()));
        assert!(p("s3://").is_err());
        assert!(p("b").is_err());
        assert!(p("bad bucket/x").is_err());
    }
}
