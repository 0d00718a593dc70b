//! What a mount is configured with.

use std::path::PathBuf;
use std::time::Duration;

use s3vol_s3::BucketName;

/// Settings of one mounted filesystem.
#[derive(Clone, Debug)]
pub struct FsConfig {
    pub bucket: BucketName,
    /// Key prefix the mount is rooted at: empty, or ending with `/`.
    pub prefix: String,
    /// Owner and modes of objects that carry no s3fs metadata.
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    pub read_only: bool,
    /// How long metadata and negative lookups are trusted, here and by the kernel.
    pub metadata_ttl: Duration,
    /// Where staging files live.
    pub cache_dir: PathBuf,
    /// Disk budget for staging files; dirty data over it makes writers wait.
    pub cache_size: u64,
    /// Memory budget for prefetched reads and in-flight part uploads.
    pub memory_limit: u64,
    /// Multipart part size for uploads and for sequential prefetch.
    pub part_size: u64,
    /// HEAD requests in flight at once when listing a directory.
    pub list_concurrency: usize,
    /// Listings take each file's size, mtime and ETag from the LIST response and its mode and
    /// owner from the defaults above, without a HEAD per entry. Inodes this mount already
    /// knows at the same ETag keep their attributes; lookups by name still read the object's
    /// own metadata.
    pub listing_attrs: bool,
    /// Extended attributes are offered to applications. Without them the kernel is told once
    /// that they are not supported and stops asking, which spares `ls -l` two requests per
    /// entry (`security.selinux`, `system.posix_acl_access`). Attributes already stored on
    /// objects are kept when s3vol rewrites their metadata.
    pub xattrs: bool,
    /// How long a flush (close, fsync) may wait for S3 before it fails with `EIO`, keeping the
    /// data for the next one, on top of the time the file's bytes take at `min_throughput`.
    pub close_timeout: Duration,
    /// Bytes per second an upload is expected to reach at least (the S3 client's
    /// `--min-throughput`, which sizes its upload timeouts the same way).
    pub min_throughput: u64,
    /// New files written sequentially stream from memory (see `stage.rs`). Off for a
    /// supervised mount: every byte written then lives in a staging file, which outlives the
    /// process serving the mount, so a successor finds it (docs/SEMANTICS.md, "When the
    /// serving process dies").
    pub stream_writes: bool,
    /// Part buffers that outlive the process (`parts.rs`): with them, a supervised mount
    /// streams too.
    pub parts_arena: Option<std::sync::Arc<crate::parts::PartArena>>,
    /// A successor taking over a live connection: the bucket was checked when the mount was
    /// made, so S3 unreachable at its start is an outage to ride out, not a reason to fail
    /// (which would end the mount).
    pub successor: bool,
    /// A successor's session directory: its journal names the files still open for writing,
    /// whose bytes the start-up scan leaves to their handles instead of uploading them.
    pub session_dir: Option<PathBuf>,
    /// The node-local attribute cache (`attr_cache.rs`): where it lives, `None` for none.
    pub attr_cache_dir: Option<PathBuf>,
    /// Its budget on disk.
    pub attr_cache_size: u64,
    /// Names the store and bucket in the attribute cache, which mounts of other stores and
    /// buckets may share: `endpoint|region|bucket`.
    pub store_scope: String,
}

impl FsConfig {
    pub fn new(bucket: BucketName, prefix: String, cache_dir: PathBuf) -> Self {
        Self {
            attr_cache_dir: Some(cache_dir.join(crate::cache_dir::ATTRS_SUBDIR)),
            attr_cache_size: crate::attr_cache::DEFAULT_MAX_BYTES,
            store_scope: format!("|{bucket}"),
            bucket,
            prefix,
            // SAFETY: getuid/getgid cannot fail.
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            file_mode: 0o644,
            dir_mode: 0o755,
            read_only: false,
            metadata_ttl: Duration::from_secs(10),
            cache_dir,
            cache_size: 10 << 30,
            memory_limit: 512 << 20,
            part_size: 8 << 20,
            list_concurrency: 64,
            listing_attrs: false,
            xattrs: true,
            close_timeout: Duration::from_secs(60),
            min_throughput: 1 << 20,
            stream_writes: true,
            parts_arena: None,
            successor: false,
            session_dir: None,
        }
    }
}
