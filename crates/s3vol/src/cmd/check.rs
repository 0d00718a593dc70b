//! `s3vol check`: can we reach this bucket, and what may these credentials do there?
//!
//! Runs, one step at a time, what a mount needs: a TCP connection to the endpoint, HEAD bucket,
//! LIST and, unless `--read-only`, a write round-trip with a probe object it removes again.
//! Each step's name is printed before it runs and its outcome when it ends, so a step that
//! waits shows which; every request gets one attempt with a short timeout (at most 5 s), so a
//! silent endpoint is reported in seconds rather than after the retries a mount would make.
//! The first failure stops with the typed reason and what to do about it.
//!
//! The reason comes from the S3 error code, never from the step that failed: a wrong secret is
//! a signature mismatch and an unknown key ID an unknown access key, wherever they show up
//! (a bare 403 to HEAD bucket is asked again as a LIST, whose answer carries the code).

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use futures::TryStreamExt;
use s3vol_s3::{AwsStore, ListRequest, ObjectStore, PutOptions, S3Error};

use crate::s3args::{BucketPath, S3Args};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// BUCKET, BUCKET/PREFIX or s3://BUCKET/PREFIX.
    pub target: BucketPath,
    #[command(flatten)]
    pub s3: S3Args,
    /// Only check read access (no probe object is written).
    #[arg(long)]
    pub read_only: bool,
}

/// Longest wait for one attempt of one step.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// `1 object`, `2 objects`.
fn count(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// Prints a step's name before it runs, then its outcome on the same line.
struct Step {
    started: Instant,
}

impl Step {
    fn start(name: &str) -> Self {
        print!("{name:<10} ");
        let _ = std::io::stdout().flush();
        Self {
            started: Instant::now(),
        }
    }

    /// Reports the outcome; `true` when it succeeded.
    fn end(self, result: Result<String, &S3Error>) -> bool {
        match result {
            Ok(detail) => {
                println!("ok    {detail} ({} ms)", self.started.elapsed().as_millis());
                true
            }
            Err(e) => {
                println!("FAIL  {e}");
                if let Some(hint) = e.hint() {
                    println!("           fix: {hint}");
                }
                false
            }
        }
    }
}

/// `host:port` of an endpoint URL, for the connection step.
fn host_port(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?']).next()?;
    let authority = authority.rsplit('@').next()?;
    if authority.is_empty() {
        return None;
    }
    let has_port = match authority.rfind(']') {
        Some(close) => authority[close..].contains(':'),
        None => authority.contains(':'),
    };
    Some(if has_port {
        authority.to_owned()
    } else if scheme.eq_ignore_ascii_case("https") {
        format!("{authority}:443")
    } else {
        format!("{authority}:80")
    })
}

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(check(args))
}

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let mut config = args.s3.to_config();
    config.max_attempts = 1;
    config.request_timeout = config.request_timeout.min(STEP_TIMEOUT);
    config.connect_timeout = config.connect_timeout.min(STEP_TIMEOUT);
    let failed = Ok(ExitCode::from(2));

    if let Some(addr) = config.endpoint_url.as_deref().and_then(host_port) {
        let step = Step::start("connect");
        let connected =
            tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect(&addr)).await;
        let result = match connected {
            Ok(Ok(_)) => Ok(format!("{addr} accepts connections")),
            Ok(Err(e)) => Err(S3Error::Unreachable(format!("{addr}: {e}"))),
            Err(_) => Err(S3Error::Unreachable(format!(
                "{addr}: no connection after {} s",
                STEP_TIMEOUT.as_secs()
            ))),
        };
        if !step.end(result.as_ref().cloned()) {
            return failed;
        }
    }

    let store = AwsStore::new(&config).await;
    let bucket = &args.target.bucket;
    let prefix = &args.target.prefix;

    let step = Step::start("bucket");
    let r = store.head_bucket(bucket).await;
    if !step.end(r.as_ref().map(|_| format!("s3://{bucket} exists"))) {
        return failed;
    }

    let step = Step::start("list");
    let request = ListRequest {
        prefix: prefix.clone(),
        delimiter: Some("/".into()),
        max_keys: Some(1000),
        ..ListRequest::default()
    };
    let r = store.list_objects(bucket, &request).await;
    let detail = r.as_ref().map(|p| {
        format!(
            "{} and {} under /{prefix}{}",
            count(p.objects.len(), "object", "objects"),
            count(p.common_prefixes.len(), "prefix", "prefixes"),
            if p.next_continuation_token.is_some() {
                " (first page)"
            } else {
                ""
            }
        )
    });
    if !step.end(detail) {
        return failed;
    }

    if args.read_only {
        return Ok(ExitCode::SUCCESS);
    }
    let key = format!("{prefix}.s3vol-check-{}", std::process::id());
    let body = Bytes::from_static(b"s3vol check probe\n");
    let step = Step::start("write");
    let r = store
        .put_object(bucket, &key, body.clone(), &PutOptions::default())
        .await;
    if !step.end(r.as_ref().map(|_| format!("put s3://{bucket}/{key}"))) {
        return failed;
    }
    let step = Step::start("read");
    let r = match store.get_object(bucket, &key, None, None).await {
        Ok(got) => got
            .body
            .try_collect::<Vec<Bytes>>()
            .await
            .map(|c| c.concat()),
        Err(e) => Err(e),
    };
    let r = r.and_then(|got| {
        if got == body {
            Ok("read back identical".to_owned())
        } else {
            Err(S3Error::Transient(
                "the probe object read back different".into(),
            ))
        }
    });
    let read_ok = step.end(r.as_ref().cloned());
    let step = Step::start("delete");
    let r = store.delete_object(bucket, &key).await;
    let delete_ok = step.end(r.as_ref().map(|_| "probe removed".to_owned()));
    Ok(if read_ok && delete_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_pluralised() {
        assert_eq!(count(0, "object", "objects"), "0 objects");
        assert_eq!(count(1, "object", "objects"), "1 object");
        assert_eq!(count(2, "prefix", "prefixes"), "2 prefixes");
    }

    #[test]
    fn endpoints_give_the_address_to_connect_to() {
        assert_eq!(
            host_port("http://127.0.0.1:9000").unwrap(),
            "127.0.0.1:9000"
        );
        assert_eq!(
            host_port("https://s3.example.com/").unwrap(),
            "s3.example.com:443"
        );
        assert_eq!(host_port("http://minio").unwrap(), "minio:80");
        assert_eq!(host_port("http://[::1]:9000/x").unwrap(), "[::1]:9000");
        assert_eq!(host_port("http://[::1]").unwrap(), "[::1]:80");
        assert!(host_port("minio:9000").is_none());
    }
}
