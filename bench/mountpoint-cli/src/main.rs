//! `mount-s3-bench`: a minimal mount CLI over Mountpoint for Amazon S3's published library
//! (`mountpoint-s3-fs` + `mountpoint-s3-client`), for s3vol's benchmarks only.
//!
//! crates.io carries Mountpoint's library but not its `mount-s3` binary, so this file wires the
//! library together the way `mount-s3` does by default: the CRT client with 8 MiB parts and the
//! default 10 Gbit/s throughput target, a memory target of 95% of the machine's memory (or
//! `--memory-target`), 16 FUSE threads, the default metadata TTLs (no caching beyond 1 s) unless `--metadata-ttl`, no
//! data cache, CRC32C upload checksums (`--upload-checksums off` turns them off), and
//! writes of new files only (Mountpoint's semantics: no overwrite unless `--allow-overwrite`,
//! deletes only with `--allow-delete`). It always runs in the foreground; stop it with SIGINT,
//! SIGTERM or `umount`.

use anyhow::{Context as _, Result};
use clap::Parser;
use mountpoint_s3_client::config::{AddressingStyle, S3ClientAuthConfig};
use mountpoint_s3_client::user_agent::UserAgent;
use mountpoint_s3_fs::data_cache::DataCacheConfig;
use mountpoint_s3_fs::fs::{CacheConfig, TimeToLive};
use mountpoint_s3_fs::fuse::config::{FuseOptions, FuseSessionConfig, MountPoint};
use mountpoint_s3_fs::logging::{LoggingConfig, init_logging};
use mountpoint_s3_fs::memory::{CandidateSize, PagedPool, effective_total_memory};
use mountpoint_s3_fs::s3::config::{
    ClientConfig, MemoryLimitSetting, PartConfig, Region, TargetThroughputSetting,
};
use mountpoint_s3_fs::s3::{Bucket, Prefix, S3Path, S3Personality};
use mountpoint_s3_fs::{
    MountpointConfig, Runtime, S3FilesystemConfig, Superblock, SuperblockConfig,
};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Mount a bucket with Mountpoint for Amazon S3's library (benchmarks only)"
)]
struct Args {
    /// Bucket to mount.
    bucket: String,
    /// Directory to mount on.
    mount_point: String,
    /// Only keys under this prefix (must end with '/').
    #[arg(long, default_value = "")]
    prefix: String,
    /// S3 endpoint URL (e.g. http://127.0.0.1:3900).
    #[arg(long)]
    endpoint_url: Option<String>,
    /// Signing region.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Path-style addressing (http://endpoint/bucket/key).
    #[arg(long)]
    force_path_style: bool,
    /// Part size of GETs and multipart PUTs, in bytes.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    part_size: usize,
    /// Target throughput the CRT client plans its connections for, in Gbit/s.
    #[arg(long)]
    maximum_throughput_gbps: Option<f64>,
    /// Memory target in MiB (default: 95% of the machine's memory, as mount-s3).
    #[arg(long)]
    memory_target: Option<u64>,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 16)]
    max_threads: usize,
    /// Let unlink remove objects.
    #[arg(long)]
    allow_delete: bool,
    /// Let an open with O_TRUNC replace an existing object.
    #[arg(long)]
    allow_overwrite: bool,
    /// Let other users (and root) use the mount.
    #[arg(long)]
    allow_other: bool,
    /// Upload checksums: crc32c (mount-s3's default) or off.
    #[arg(long, default_value = "crc32c")]
    upload_checksums: String,
    /// Seconds metadata is cached ("minimal", mount-s3's default, or a number).
    #[arg(long, default_value = "minimal")]
    metadata_ttl: String,
    /// Log filter (MOUNTPOINT_LOG overrides it).
    #[arg(long, default_value = "warn,awscrt=off")]
    log_level: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Logs go to stdout; syslog is not where a benchmark run looks.
    let _logging = init_logging(LoggingConfig {
        log_file: None,
        log_to_stdout: true,
        default_filter: args.log_level.clone(),
    })?;

    let mem_limit = match args.memory_target {
        Some(mib) => MemoryLimitSetting::User((mib * 1024 * 1024) as usize),
        None => MemoryLimitSetting::Default((effective_total_memory() as f64 * 0.95) as usize),
    };
    let throughput_target = match args.maximum_throughput_gbps {
        Some(gbps) => TargetThroughputSetting::User { gbps },
        None => TargetThroughputSetting::Default,
    };
    let client_config = ClientConfig {
        region: Region::new_user_specified(args.region.clone()),
        endpoint_url: args.endpoint_url.clone(),
        addressing_style: if args.force_path_style {
            AddressingStyle::Path
        } else {
            AddressingStyle::Automatic
        },
        dual_stack: false,
        transfer_acceleration: false,
        auth_config: S3ClientAuthConfig::Default,
        requester_pays: false,
        expected_bucket_owner: None,
        throughput_target,
        bind: None,
        part_config: PartConfig::with_part_size(args.part_size).validate(mem_limit)?,
        user_agent: UserAgent::new(Some("s3vol-bench".to_string())),
        tls_config: None,
    };

    let s3_path = S3Path::new(
        Bucket::new(args.bucket.clone()).context("invalid bucket name")?,
        Prefix::new(&args.prefix).context("invalid prefix")?,
    );
    let pool = PagedPool::config()
        .with_candidate_sizes([CandidateSize::new(
            client_config.part_config.read_size_bytes,
        )])
        .with_memory_limit(mem_limit.bytes())
        .build();
    let client = client_config
        .create_client(pool.clone(), Some(&s3_path))
        .context("cannot reach the bucket")?;
    let runtime = Runtime::new(client.event_loop_group());

    let ttl = match args.metadata_ttl.as_str() {
        "minimal" => TimeToLive::Minimal,
        "indefinite" => TimeToLive::Indefinite,
        secs => TimeToLive::Duration(std::time::Duration::from_secs(
            secs.parse()
                .context("--metadata-ttl: minimal, indefinite or seconds")?,
        )),
    };
    let cache_config = CacheConfig::new(ttl);
    let mut fs_config = S3FilesystemConfig {
        cache_config: cache_config.clone(),
        allow_delete: args.allow_delete,
        allow_overwrite: args.allow_overwrite,
        s3_personality: S3Personality::Standard,
        ..Default::default()
    };
    fs_config.upload_checksum_algorithm = match args.upload_checksums.as_str() {
        "off" => None,
        _ => fs_config.upload_checksum_algorithm,
    };
    let superblock = Superblock::new(
        client.clone(),
        s3_path,
        SuperblockConfig {
            cache_config,
            s3_personality: S3Personality::Standard,
        },
    );

    let fuse_config = FuseSessionConfig::new(
        MountPoint::new(&args.mount_point)?,
        FuseOptions {
            read_only: false,
            auto_unmount: false,
            allow_root: false,
            allow_other: args.allow_other,
            clone_fd: false,
        },
        args.max_threads,
    )?;
    let session = MountpointConfig::new(fuse_config, fs_config, DataCacheConfig::default())?
        .create_fuse_session(superblock, client, runtime, pool)
        .context("cannot mount")?;
    session.join().context("FUSE session failed")?;
    Ok(())
}
