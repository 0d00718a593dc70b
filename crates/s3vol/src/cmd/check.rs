//! `s3vol check`: can we reach this bucket, and what may these credentials do there?
//!
//! Runs the requests a mount would (HEAD bucket, LIST) and, unless `--read-only`, a write
//! round-trip with a probe object it removes again. Each step prints one line; the first
//! failure stops with the typed reason and a hint.

use std::process::ExitCode;
use std::time::Instant;

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

fn hint(e: &S3Error) -> &'static str {
    match e {
        S3Error::Unreachable(_) | S3Error::Timeout(_) => {
            "check --endpoint-url and that the endpoint is reachable from here"
        }
        S3Error::InvalidCredentials { .. } | S3Error::NoCredentials(_) => {
            "check the access key and secret (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, --profile)"
        }
        S3Error::AccessDenied(_) => "the credentials work but the bucket policy refuses this",
        S3Error::NoSuchBucket(_) | S3Error::NotFound(_) => {
            "check the bucket name, --region and --force-path-style"
        }
        _ => "see the message above",
    }
}

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(check(args))
}

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let store = AwsStore::new(&args.s3.to_config()).await;
    let bucket = &args.target.bucket;
    let prefix = &args.target.prefix;
    let step = |name: &str, started: Instant, result: Result<String, &S3Error>| match result {
        Ok(detail) => {
            println!(
                "ok    {name:<10} {detail} ({} ms)",
                started.elapsed().as_millis()
            );
            true
        }
        Err(e) => {
            println!("FAIL  {name:<10} {e}\n      hint: {}", hint(e));
            false
        }
    };

    let t = Instant::now();
    let r = store.head_bucket(bucket).await;
    if !step(
        "bucket",
        t,
        r.as_ref().map(|_| format!("s3://{bucket} exists")),
    ) {
        return Ok(ExitCode::from(2));
    }

    let t = Instant::now();
    let request = ListRequest {
        prefix: prefix.clone(),
        delimiter: Some("/".into()),
        max_keys: Some(1000),
        ..ListRequest::default()
    };
    let r = store.list_objects(bucket, &request).await;
    let detail = r.as_ref().map(|p| {
        format!(
            "{} objects and {} prefixes under /{prefix}{}",
            p.objects.len(),
            p.common_prefixes.len(),
            if p.next_continuation_token.is_some() {
                " (first page)"
            } else {
                ""
            }
        )
    });
    if !step("list", t, detail) {
        return Ok(ExitCode::from(2));
    }

    if args.read_only {
        return Ok(ExitCode::SUCCESS);
    }
    let key = format!("{prefix}.s3vol-check-{}", std::process::id());
    let body = Bytes::from_static(b"s3vol check probe\n");
    let t = Instant::now();
    let r = store
        .put_object(bucket, &key, body.clone(), &PutOptions::default())
        .await;
    if !step(
        "write",
        t,
        r.as_ref().map(|_| format!("put s3://{bucket}/{key}")),
    ) {
        return Ok(ExitCode::from(2));
    }
    let t = Instant::now();
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
    let read_ok = step("read", t, r.as_ref().cloned());
    let t = Instant::now();
    let r = store.delete_object(bucket, &key).await;
    let delete_ok = step("delete", t, r.as_ref().map(|_| "probe removed".to_owned()));
    Ok(if read_ok && delete_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
