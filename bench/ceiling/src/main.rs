//! `s3vol-bench-ceiling`: what s3vol's own S3 layer (`s3vol-s3`, the AWS SDK client s3vol
//! mounts with) achieves without FUSE, kernel page cache or staging files in the way. The
//! benchmark harness (`bench/run.sh`) runs it in the same run as the mounts, against the same
//! server, so that each mount's throughput can be read as a fraction of this ceiling.
//!
//! Every subcommand prints one line of `key=value` pairs on stdout (`op=… bytes=… secs=…
//! mib_s=… ops_s=…`), which the harness parses; progress and errors go to stderr.
//!
//! - `put-file`: a multipart upload of a local file, `--concurrency` parts in flight, each
//!   part read from the file (the page cache) just before it is sent, as s3vol's write path
//!   reads parts back from its staging file.
//! - `get`: ranged GETs of `--part-size` over a whole object, `--concurrency` in flight, bytes
//!   discarded (optionally hashed with `--check` against a file), as s3vol's prefetch window.
//! - `put-many`: many small objects (with s3fs-style mode/uid/gid/mtime metadata so every
//!   client sees ordinary files), `--concurrency` in flight: used to populate listing trees and
//!   as the ceiling of small-file creation.
//! - `list`: a delimited ListObjectsV2 walk of one prefix, all pages: the ceiling of `ls`.
//! - `delete-prefix`: removes every object under a prefix (between runs).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use futures::{StreamExt, TryStreamExt, stream};
use s3vol_s3::{
    Addressing, AwsStore, BucketName, ChecksumPolicy, CredentialSource, ListRequest, ObjectStore,
    PayloadSigning, PutOptions, S3Config,
};

#[derive(Parser, Debug)]
#[command(about = "s3vol's S3 layer without FUSE: the ceiling of the benchmarks")]
struct Cli {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug)]
struct Conn {
    /// S3 endpoint (credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
    #[arg(long, global = true, default_value = "http://127.0.0.1:3900")]
    endpoint_url: String,
    #[arg(long, global = true, default_value = "garage")]
    region: String,
    #[arg(long, global = true)]
    bucket: Option<String>,
    /// Send upload bodies `UNSIGNED-PAYLOAD` (as `s3vol mount --payload-signing never`).
    #[arg(long, global = true)]
    unsigned_payload: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Multipart upload of a local file.
    PutFile {
        #[arg(long)]
        key: String,
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value_t = 8 << 20)]
        part_size: u64,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Parallel ranged GETs of a whole object.
    Get {
        #[arg(long)]
        key: String,
        #[arg(long, default_value_t = 8 << 20)]
        part_size: u64,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Compare the bytes with this file's (outside the timing is not possible: this
        /// slows the run, use it to prove correctness, not to measure).
        #[arg(long)]
        check: Option<PathBuf>,
    },
    /// Many small objects under a prefix.
    PutMany {
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 4096)]
        size: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Also write the `prefix` directory marker object (`prefix` must end with '/').
        #[arg(long)]
        dir_marker: bool,
    },
    /// Delimited listing of a prefix, all pages.
    List {
        #[arg(long)]
        prefix: String,
    },
    /// Delete every object under a prefix.
    DeletePrefix {
        #[arg(long)]
        prefix: String,
    },
}

fn report(op: &str, bytes: u64, ops: u64, start: Instant) {
    let secs = start.elapsed().as_secs_f64();
    println!(
        "op={op} bytes={bytes} ops={ops} secs={secs:.3} mib_s={:.1} ops_s={:.1}",
        bytes as f64 / (1 << 20) as f64 / secs,
        ops as f64 / secs
    );
}

/// Pseudo-random, incompressible bytes (xorshift), different per seed.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn file_metadata() -> s3vol_s3::UserMetadata {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    [
        ("mode", "33188".to_string()),
        ("uid", "0".to_string()),
        ("gid", "0".to_string()),
        ("mtime", now.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let credentials = match (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Ok(access_key_id), Ok(secret_access_key)) => {
            CredentialSource::Static(s3vol_s3::StaticCredentials {
                access_key_id,
                secret_access_key,
                session_token: None,
            })
        }
        _ => CredentialSource::Chain,
    };
    let config = S3Config {
        endpoint_url: Some(cli.conn.endpoint_url.clone()),
        region: Some(cli.conn.region.clone()),
        addressing: Addressing::Path,
        credentials,
        checksums: ChecksumPolicy::WhenRequired,
        payload_signing: if cli.conn.unsigned_payload {
            PayloadSigning::Never
        } else {
            PayloadSigning::Auto
        },
        ..S3Config::default()
    };
    let store: Arc<dyn ObjectStore> = Arc::new(AwsStore::new(&config).await);
    let bucket = BucketName::new(cli.conn.bucket.clone().context("--bucket is required")?)?;

    match cli.cmd {
        Cmd::PutFile {
            key,
            file,
            part_size,
            concurrency,
        } => put_file(store, bucket, &key, file, part_size, concurrency).await,
        Cmd::Get {
            key,
            part_size,
            concurrency,
            check,
        } => get(store, bucket, &key, part_size, concurrency, check).await,
        Cmd::PutMany {
            prefix,
            count,
            size,
            concurrency,
            dir_marker,
        } => put_many(store, bucket, &prefix, count, size, concurrency, dir_marker).await,
        Cmd::List { prefix } => list(store, bucket, &prefix).await,
        Cmd::DeletePrefix { prefix } => delete_prefix(store, bucket, &prefix).await,
    }
}

async fn put_file(
    store: Arc<dyn ObjectStore>,
    bucket: BucketName,
    key: &str,
    path: PathBuf,
    part_size: u64,
    concurrency: usize,
) -> Result<()> {
    let file = Arc::new(File::open(&path).with_context(|| format!("open {}", path.display()))?);
    let size = file.metadata()?.len();
    let parts = size.div_ceil(part_size).max(1);
    let options = PutOptions {
        metadata: file_metadata(),
        ..PutOptions::default()
    };
    let start = Instant::now();
    let upload = store
        .create_multipart_upload(&bucket, key, &options)
        .await?;
    let results: Vec<_> = stream::iter(0..parts)
        .map(|i| {
            let (store, bucket, file, upload) =
                (store.clone(), bucket.clone(), file.clone(), upload.clone());
            let key = key.to_string();
            async move {
                let offset = i * part_size;
                let len = part_size.min(size - offset) as usize;
                let buf = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0; len];
                    file.read_exact_at(&mut buf, offset).map(|_| buf)
                })
                .await??;
                let number = i32::try_from(i + 1)?;
                let part = store
                    .upload_part(&bucket, &key, &upload, number, Bytes::from(buf))
                    .await?;
                anyhow::Ok(part)
            }
        })
        .buffered(concurrency)
        .try_collect()
        .await?;
    store
        .complete_multipart_upload(&bucket, key, &upload, &results)
        .await?;
    report("put-file", size, parts, start);
    Ok(())
}

async fn get(
    store: Arc<dyn ObjectStore>,
    bucket: BucketName,
    key: &str,
    part_size: u64,
    concurrency: usize,
    check: Option<PathBuf>,
) -> Result<()> {
    let start = Instant::now();
    let info = store.head_object(&bucket, key).await?;
    let size = info.size;
    let check = match check {
        Some(path) => Some(Arc::new(File::open(path)?)),
        None => None,
    };
    let parts = size.div_ceil(part_size);
    let etag = info.etag.clone();
    let mut got = 0u64;
    let mut s = stream::iter(0..parts)
        .map(|i| {
            let (store, bucket, etag) = (store.clone(), bucket.clone(), etag.clone());
            let key = key.to_string();
            async move {
                let range = i * part_size..((i + 1) * part_size).min(size);
                let obj = store
                    .get_object(&bucket, &key, Some(range.clone()), Some(&etag))
                    .await?;
                let chunks: Vec<Bytes> = obj.body.try_collect().await?;
                anyhow::Ok((range, chunks))
            }
        })
        .buffered(concurrency);
    while let Some(part) = s.next().await {
        let (range, chunks) = part?;
        let mut offset = range.start;
        for chunk in chunks {
            if let Some(file) = &check {
                let mut want = vec![0; chunk.len()];
                file.read_exact_at(&mut want, offset)?;
                if want[..] != chunk[..] {
                    bail!("data mismatch in {key} near offset {offset}");
                }
            }
            offset += chunk.len() as u64;
            got += chunk.len() as u64;
        }
        if offset != range.end {
            bail!("short part {range:?} of {key}: ended at {offset}");
        }
    }
    if got != size {
        bail!("read {got} bytes of {key}, expected {size}");
    }
    report("get", size, parts, start);
    Ok(())
}

async fn put_many(
    store: Arc<dyn ObjectStore>,
    bucket: BucketName,
    prefix: &str,
    count: usize,
    size: usize,
    concurrency: usize,
    dir_marker: bool,
) -> Result<()> {
    let start = Instant::now();
    let metadata = file_metadata();
    if dir_marker {
        let mut meta = metadata.clone();
        meta.insert("mode".to_string(), "16877".to_string()); // S_IFDIR | 0755
        let options = PutOptions {
            metadata: meta,
            content_type: Some("application/x-directory".to_string()),
            ..PutOptions::default()
        };
        store
            .put_object(&bucket, prefix, Bytes::new(), &options)
            .await?;
    }
    let options = PutOptions {
        metadata,
        ..PutOptions::default()
    };
    stream::iter(0..count)
        .map(|i| {
            let (store, bucket, options) = (store.clone(), bucket.clone(), options.clone());
            let key = format!("{prefix}f{i:05}");
            async move {
                let body = Bytes::from(noise(size, i as u64 + 1));
                store.put_object(&bucket, &key, body, &options).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<()>()
        .await?;
    report("put-many", (count * size) as u64, count as u64, start);
    Ok(())
}

async fn list(store: Arc<dyn ObjectStore>, bucket: BucketName, prefix: &str) -> Result<()> {
    let start = Instant::now();
    let mut request = ListRequest {
        prefix: prefix.to_string(),
        delimiter: Some("/".to_string()),
        ..ListRequest::default()
    };
    let (mut entries, mut pages) = (0u64, 0u64);
    // Bounded: 10,000 pages of up to 1,000 keys is far beyond any benchmark tree.
    for _ in 0..10_000 {
        let page = store.list_objects(&bucket, &request).await?;
        pages += 1;
        entries += (page.objects.len() + page.common_prefixes.len()) as u64;
        match page.next_continuation_token {
            Some(token) => request.continuation_token = Some(token),
            None => {
                report("list", 0, entries, start);
                eprintln!("list: {entries} entries in {pages} pages");
                return Ok(());
            }
        }
    }
    bail!("listing of {prefix} did not end within 10,000 pages")
}

async fn delete_prefix(
    store: Arc<dyn ObjectStore>,
    bucket: BucketName,
    prefix: &str,
) -> Result<()> {
    let start = Instant::now();
    let mut deleted = 0u64;
    for _ in 0..100_000 {
        let page = store
            .list_objects(
                &bucket,
                &ListRequest {
                    prefix: prefix.to_string(),
                    ..ListRequest::default()
                },
            )
            .await?;
        if page.objects.is_empty() {
            report("delete-prefix", 0, deleted, start);
            return Ok(());
        }
        let keys: Vec<String> = page.objects.into_iter().map(|o| o.key).collect();
        deleted += keys.len() as u64;
        let failed = store.delete_objects(&bucket, &keys).await?;
        if let Some((key, err)) = failed.first() {
            bail!("cannot delete {key}: {err}");
        }
    }
    bail!("{prefix} still not empty after 100,000 pages")
}
