//! Command-line options that say how to reach S3, shared by the subcommands that talk to it,
//! and the `BUCKET[/PREFIX]` argument (its prefix checked by the rule the CSI driver uses,
//! [`normalize_prefix`]).

use std::time::Duration;

use clap::Args;
use s3vol_s3::{
    Addressing, BucketName, ChecksumPolicy, CredentialSource, PayloadSigning, S3Config,
    normalize_prefix, parse_size,
};

#[derive(Clone, Debug, Args)]
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
    /// Seconds one attempt of a request without a body (HEAD, GET until the answer starts,
    /// DELETE) may take; a LIST gets twice this, an upload this plus its size at
    /// --min-throughput.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS", value_parser = parse_seconds)]
    pub request_timeout: f64,
    /// Slowest upload rate (bytes per second, e.g. 256K) before an upload attempt is given up
    /// and retried.
    #[arg(long, default_value = "1M", value_name = "BYTES", value_parser = parse_size)]
    pub min_throughput: u64,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if (0.1..=3600.0).contains(&t) => Ok(t),
        _ => Err(format!(
            "{s:?} is not a number of seconds between 0.1 and 3600"
        )),
    }
}

impl Default for S3Args {
    /// What the command line gives when no flag is set.
    fn default() -> Self {
        Self {
            endpoint_url: None,
            region: None,
            force_path_style: false,
            profile: None,
            no_sign_request: false,
            full_checksums: false,
            payload_signing: PayloadSigning::Auto,
            max_attempts: 5,
            request_timeout: 5.0,
            min_throughput: 1 << 20,
        }
    }
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
            request_timeout: Duration::from_secs_f64(self.request_timeout),
            min_throughput: self.min_throughput.max(1),
            ..S3Config::default()
        }
    }

    /// These options as flags of a command line, for messages that suggest a command to run.
    pub fn to_cli_args(&self) -> Vec<String> {
        let defaults = S3Args::default();
        let mut out = Vec::new();
        let mut flag = |name: &str, value: Option<String>| {
            out.push(format!("--{name}"));
            out.extend(value);
        };
        if let Some(u) = &self.endpoint_url {
            flag("endpoint-url", Some(u.clone()));
        }
        if let Some(r) = &self.region {
            flag("region", Some(r.clone()));
        }
        if self.force_path_style {
            flag("force-path-style", None);
        }
        if let Some(p) = &self.profile {
            flag("profile", Some(p.clone()));
        }
        if self.no_sign_request {
            flag("no-sign-request", None);
        }
        if self.full_checksums {
            flag("full-checksums", None);
        }
        if self.payload_signing != PayloadSigning::Auto {
            flag(
                "payload-signing",
                Some(format!("{:?}", self.payload_signing).to_lowercase()),
            );
        }
        if self.max_attempts != defaults.max_attempts {
            flag("max-attempts", Some(self.max_attempts.to_string()));
        }
        if self.request_timeout != defaults.request_timeout {
            flag("request-timeout", Some(self.request_timeout.to_string()));
        }
        if self.min_throughput != defaults.min_throughput {
            flag("min-throughput", Some(self.min_throughput.to_string()));
        }
        out
    }
}

/// `s` quoted for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
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
        // clap shows an error's top line only: the reason goes there.
        let bucket = BucketName::new(bucket).map_err(|e| anyhow::anyhow!("{e} (in {s:?})"))?;
        let prefix = normalize_prefix(prefix).map_err(|e| anyhow::anyhow!("{e} (in {s:?})"))?;
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
        // The CSI driver's rule: no . or .. segments.
        let e = p("bkt/../x").unwrap_err();
        assert!(format!("{e:#}").contains(". or .. segments"), "{e:#}");
        assert!(p("s3://bkt/a/./b").is_err());
        assert_eq!(p("bkt/a/.b").unwrap(), ("bkt".into(), "a/.b/".into()));
    }

    #[test]
    fn options_render_as_the_flags_that_give_them() {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            s3: S3Args,
        }
        let w = Wrap::try_parse_from([
            "x",
            "--endpoint-url",
            "http://h:9000",
            "--region",
            "eu-west-1",
            "--force-path-style",
            "--max-attempts",
            "2",
        ])
        .unwrap();
        assert_eq!(
            w.s3.to_cli_args().join(" "),
            "--endpoint-url http://h:9000 --region eu-west-1 --force-path-style --max-attempts 2"
        );
        let w = Wrap::try_parse_from(["x"]).unwrap();
        assert!(w.s3.to_cli_args().is_empty(), "defaults are left out");
        let d = S3Args::default();
        assert_eq!(
            (d.max_attempts, d.request_timeout, d.min_throughput),
            (w.s3.max_attempts, w.s3.request_timeout, w.s3.min_throughput),
            "Default is what the command line gives"
        );
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("s3://b/p"), "s3://b/p");
    }
}
