//! CPU spent in s3vol per S3 request, against a real server.
//!
//! ```sh
//! eval "$(bench/garage.sh start cpu)"
//! BENCH_BUCKET=cpu cargo bench -p s3vol-s3 --bench request_cpu
//! ```
//!
//! Reads the endpoint and keys from `BENCH_ENDPOINT`, `BENCH_REGION`, `AWS_ACCESS_KEY_ID` and
//! `AWS_SECRET_ACCESS_KEY` (what `bench/garage.sh start` prints) and uses the existing bucket
//! `BENCH_BUCKET`. It writes `BENCH_OBJECTS` (default 2,000) small objects under `request-cpu/`,
//! then HEADs, GETs and PUTs them through [`AwsStore`] with `BENCH_CONCURRENCY` (default 16)
//! requests in flight, and prints, per operation, the CPU time of this process (user + system,
//! every thread) per request, next to the same requests sent through the bare SDK client with
//! no per-request configuration: the difference is what s3vol adds. The server runs in its
//! own process, so its CPU is not counted. `BENCH_ONLY=HEAD` (any part of a label) measures
//! only those rows, for a profiler. Exits without measuring when the variables are not
//! set (so `cargo bench` alone does not fail).

// A measuring program: a failed request or a bad setting ends it with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use s3vol_s3::{
    Addressing, AwsStore, BucketName, CredentialSource, ObjectStore, PutOptions, S3Config,
    StaticCredentials,
};

/// CPU time of this process so far (all threads), in seconds.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a whole `rusage` into the pointer it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// Runs `op(i)` for `i` in `0..n` with `concurrency` in flight; prints CPU µs and wall time
/// per request.
async fn measure<F, Fut>(label: &str, n: usize, concurrency: usize, op: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()>,
{
    if let Ok(only) = std::env::var("BENCH_ONLY")
        && !label.contains(&only)
        && !label.contains("warm-up")
    {
        return;
    }
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    futures::stream::iter(0..n)
        .map(&op)
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
    let (cpu, wall) = (cpu_seconds() - cpu0, wall0.elapsed().as_secs_f64());
    println!(
        "{label:<34} {n:>6} requests  {:>7.1} µs CPU/request  {:>8.0} requests/s",
        cpu / n as f64 * 1e6,
        n as f64 / wall
    );
}

fn main() {
    let (Ok(endpoint), Ok(bucket)) = (
        std::env::var("BENCH_ENDPOINT"),
        std::env::var("BENCH_BUCKET"),
    ) else {
        eprintln!(
            "request_cpu: set BENCH_ENDPOINT, BENCH_BUCKET and the keys (bench/garage.sh start) \
             to measure; nothing measured"
        );
        return;
    };
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let objects: usize = var("BENCH_OBJECTS", "2000").parse().expect("BENCH_OBJECTS");
    let concurrency: usize = var("BENCH_CONCURRENCY", "16")
        .parse()
        .expect("BENCH_CONCURRENCY");
    let config = S3Config {
        endpoint_url: Some(endpoint),
        region: Some(var("BENCH_REGION", "us-east-1")),
        addressing: Addressing::Path,
        credentials: CredentialSource::Static(StaticCredentials {
            access_key_id: var("AWS_ACCESS_KEY_ID", ""),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY", ""),
            session_token: None,
        }),
        ..S3Config::default()
    };
    let bucket = BucketName::new(&bucket).expect("BENCH_BUCKET");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = Arc::new(AwsStore::new(&config).await);
        let sdk = config.build_sdk_client().await;
        let key = |i: usize| format!("request-cpu/{i:06}");
        let body = Bytes::from(vec![7u8; 4096]);
        let put = |i: usize| {
            let (store, bucket, body) = (store.clone(), bucket.clone(), body.clone());
            async move {
                store
                    .put_object(&bucket, &key(i), body, &PutOptions::default())
                    .await
                    .expect("PUT");
            }
        };
        // Warm up: connections, credentials, and the objects the reads need.
        measure("PUT 4 KiB (warm-up)", objects, concurrency, put).await;
        let rounds: usize = var("BENCH_ROUNDS", "3").parse().expect("BENCH_ROUNDS");
        for round in 1..=rounds {
            println!("round {round}");
            measure("HEAD  AwsStore", objects, concurrency, |i| {
                let (store, bucket) = (store.clone(), bucket.clone());
                async move {
                    store.head_object(&bucket, &key(i)).await.expect("HEAD");
                }
            })
            .await;
            measure("HEAD  bare SDK client", objects, concurrency, |i| {
                let (sdk, bucket) = (sdk.clone(), bucket.clone());
                async move {
                    sdk.head_object()
                        .bucket(bucket.as_str())
                        .key(key(i))
                        .send()
                        .await
                        .expect("HEAD");
                }
            })
            .await;
            measure("GET 4 KiB  AwsStore", objects, concurrency, |i| {
                let (store, bucket) = (store.clone(), bucket.clone());
                async move {
                    let got = store
                        .get_object(&bucket, &key(i), None, None)
                        .await
                        .expect("GET");
                    got.body.try_collect::<Vec<_>>().await.expect("GET body");
                }
            })
            .await;
            measure("GET 4 KiB  bare SDK client", objects, concurrency, |i| {
                let (sdk, bucket) = (sdk.clone(), bucket.clone());
                async move {
                    let got = sdk
                        .get_object()
                        .bucket(bucket.as_str())
                        .key(key(i))
                        .send()
                        .await
                        .expect("GET");
                    got.body.collect().await.expect("GET body");
                }
            })
            .await;
            measure("PUT 4 KiB  AwsStore", objects, concurrency, put).await;
            measure("PUT 4 KiB  bare SDK client", objects, concurrency, |i| {
                let (sdk, bucket, body) = (sdk.clone(), bucket.clone(), body.clone());
                async move {
                    sdk.put_object()
                        .bucket(bucket.as_str())
                        .key(key(i))
                        .body(body.into())
                        .send()
                        .await
                        .expect("PUT");
                }
            })
            .await;
        }
    });
}
