//! The node-local attribute cache through real mounts: a later mount's `ls -l` of a directory
//! the node listed before costs LIST requests only, and what other clients change (an s3fs
//! `chmod`, a new upload, a server-side copy) shows all the same.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/mount.rs"]
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proxy::Proxy;
use s3vol_s3::{BucketName, ObjectStore, PutOptions, UserMetadata, testing};
use support::{is_mounted, rt, s3vol, unmount};

/// `s3vol mount` of `bucket` through `endpoint` with the cache directory `cache`; unmounted
/// when dropped.
struct Mount {
    child: Child,
    mnt: tempfile::TempDir,
}

impl Mount {
    fn new(bucket: &BucketName, endpoint: &str, cache: &Path) -> Self {
        let mnt = tempfile::Builder::new()
            .prefix("s3vol-mnt-")
            .tempdir()
            .unwrap();
        let mut child = s3vol()
            .arg("mount")
            .arg(format!("{bucket}/"))
            .arg(mnt.path())
            .args(["--endpoint-url", endpoint, "--region", "us-east-1"])
            .args([
                "--force-path-style",
                "--max-attempts",
                "2",
                "--no-supervise",
            ])
            .arg("--cache-dir")
            .arg(cache)
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .env("S3VOL_LOG_LEVEL", "warn")
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(mnt.path()) {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("s3vol mount exited ({status}) before mounting");
            }
            assert!(Instant::now() < deadline, "mount did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, mnt }
    }

    /// `ls -ln` of the mount's root: name → "mode uid gid size mtime", as ls prints them.
    fn ls(&self) -> Vec<(String, String)> {
        support::ls_ln(self.mnt.path())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        unmount(self.mnt.path());
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A new bucket with the objects of [`put_files`], written long enough ago (3.2 s) that a HEAD
/// of them now may be cached (only a HEAD that came seconds after an object's last write is).
fn bucket_with_files(tag: &str, n: usize) -> BucketName {
    let rt = rt();
    let store = rt.block_on(support::store());
    let bucket = testing::unique_bucket(tag);
    rt.block_on(store.create_bucket(&bucket)).unwrap();
    rt.block_on(put_files(&*store, &bucket, n));
    std::thread::sleep(Duration::from_millis(3_200));
    bucket
}

/// Puts `n` objects `f00`… with s3fs metadata as another client writes it: mode 0600, uid
/// 1000 + i, gid 2000, an mtime of its own.
async fn put_files(store: &dyn ObjectStore, bucket: &BucketName, n: usize) {
    for i in 0..n {
        let metadata: UserMetadata = [
            ("mode".to_owned(), (libc::S_IFREG | 0o600).to_string()),
            ("uid".to_owned(), (1000 + i).to_string()),
            ("gid".to_owned(), "2000".to_owned()),
            ("mtime".to_owned(), (1_600_000_000 + i).to_string()),
        ]
        .into_iter()
        .collect();
        let options = PutOptions {
            metadata,
            ..PutOptions::default()
        };
        store
            .put_object(
                bucket,
                &format!("f{i:02}"),
                Bytes::from(vec![b'x'; 10 + i]),
                &options,
            )
            .await
            .unwrap();
    }
}

/// Waits until the attribute cache in `cache` holds a file (written in the background once
/// a listing is complete).
fn wait_for_attr_file(cache: &Path) {
    let dir = cache.join("attrs");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = std::fs::read_dir(&dir).map_or(0, |r| {
            r.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".attrs"))
                .count()
        });
        if n > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "no attribute cache file");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// HEAD and LIST requests the proxy saw for `bucket`.
fn heads_and_lists(proxy: &Proxy, bucket: &BucketName) -> (usize, usize) {
    let reqs = proxy.requests();
    let ours = |r: &&proxy::Request| r.path().starts_with(&format!("/{bucket}"));
    let heads = reqs
        .iter()
        .filter(ours)
        // Not the bucket's own HEAD, made once at mount.
        .filter(|r| r.method() == "HEAD" && r.path().trim_end_matches('/') != format!("/{bucket}"))
        .count();
    let lists = reqs
        .iter()
        .filter(ours)
        .filter(|r| r.method() == "GET" && r.has_param("list-type"))
        .count();
    (heads, lists)
}

#[test]
fn a_later_mounts_ls_l_of_a_directory_the_node_listed_costs_lists_only() {
    let bucket = bucket_with_files("attrc-ls", 40);
    let proxy = Proxy::start(&testing::endpoint());
    let cache = support::private_tempdir("s3vol-cache-");

    let first = Mount::new(&bucket, &proxy.url(), cache.path());
    let shown = first.ls();
    assert_eq!(shown.len(), 40);
    assert_eq!(
        shown[3],
        ("f03".into(), "-rw------- 1003 2000 13 1600000003".into())
    );
    let (heads, _) = heads_and_lists(&proxy, &bucket);
    assert!(heads >= 40, "the first listing HEADs every file ({heads})");
    wait_for_attr_file(cache.path());
    drop(first);

    proxy.reset();
    let second = Mount::new(&bucket, &proxy.url(), cache.path());
    assert_eq!(second.ls(), shown, "the same attributes");
    let (heads, lists) = heads_and_lists(&proxy, &bucket);
    assert_eq!(heads, 0, "no HEAD: {:?}", proxy.requests());
    assert!(lists >= 1);
}

/// Another client's changes with boto3: `f00` chmod'ed as s3fs does it (a metadata-only
/// CopyObject onto itself replacing `x-amz-meta-mode`), `f01` uploaded again, `f02` replaced
/// by a server-side copy of `f03` (metadata copied).
fn boto3_changes(bucket: &BucketName) {
    let keys = testing::credentials();
    let script = r#"
import boto3, os, sys
s3 = boto3.client("s3", endpoint_url=os.environ["EP"], region_name="us-east-1")
b = sys.argv[1]
head = s3.head_object(Bucket=b, Key="f00")
meta = dict(head["Metadata"])
meta["mode"] = str(0o100640)
s3.copy_object(Bucket=b, Key="f00", CopySource={"Bucket": b, "Key": "f00"},
               MetadataDirective="REPLACE", Metadata=meta, ContentType="application/octet-stream")
s3.put_object(Bucket=b, Key="f01", Body=b"a new body", Metadata={"mode": str(0o100604), "uid": "77"})
s3.copy_object(Bucket=b, Key="f02", CopySource={"Bucket": b, "Key": "f03"})
"#;
    let status = Command::new("python3")
        .args(["-c", script, bucket.as_str()])
        .env("EP", testing::endpoint())
        .env("AWS_ACCESS_KEY_ID", keys.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", keys.secret_access_key)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .status()
        .unwrap();
    assert!(status.success(), "boto3 changes failed");
}

#[test]
fn changes_by_another_client_show_after_a_remount_that_uses_the_attribute_cache() {
    let bucket = bucket_with_files("attrc-chg", 5);
    let cache = support::private_tempdir("s3vol-cache-");
    let endpoint = testing::endpoint();

    let first = Mount::new(&bucket, &endpoint, cache.path());
    let before = first.ls();
    assert_eq!(before[0].1, "-rw------- 1000 2000 10 1600000000");
    wait_for_attr_file(cache.path());
    drop(first);

    boto3_changes(&bucket);
    // At once: well within the metadata TTL of anything the first mount saw.
    let second = Mount::new(&bucket, &endpoint, cache.path());
    let after = second.ls();
    assert_eq!(after[0].1, "-rw-r----- 1000 2000 10 1600000000", "chmod");
    assert!(
        after[1].1.starts_with("-rw----r-- 77 "),
        "new upload: {}",
        after[1].1
    );
    assert!(after[1].1.contains(" 10 "), "{}", after[1].1);
    assert_eq!(after[2].1, "-rw------- 1003 2000 13 1600000003", "copy");
    assert_eq!(after[3..], before[3..], "unchanged");
    drop(second);

    // And once more, now that the changes are cached too (their HEADs came soon after the
    // writes, so they are asked again rather than trusted).
    let third = Mount::new(&bucket, &endpoint, cache.path());
    assert_eq!(third.ls(), after);
}

/// `stat(2)` of every `f..` name of the mount's root, in order, as `bench.py stat` does.
fn stat_all(m: &Mount, n: usize) -> Vec<(u32, u32, u64)> {
    use std::os::unix::fs::MetadataExt;
    (0..n)
        .map(|i| {
            let md = std::fs::metadata(m.mnt.path().join(format!("f{i:02}"))).unwrap();
            (md.mode(), md.uid(), md.size())
        })
        .collect()
}

#[test]
fn stat_of_many_names_on_a_fresh_mount_costs_a_head_per_file_then_none_on_a_later_one() {
    let bucket = bucket_with_files("attrc-stat", 60);
    let proxy = Proxy::start(&testing::endpoint());
    let cache = support::private_tempdir("s3vol-cache-");

    let first = Mount::new(&bucket, &proxy.url(), cache.path());
    let shown = stat_all(&first, 60);
    assert_eq!(shown[5], (libc::S_IFREG | 0o600, 1005, 15));
    let (heads, lists) = heads_and_lists(&proxy, &bucket);
    // The first 8 lookups each cost a HEAD and a one-key LIST; then one listing of the
    // directory, and one HEAD per remaining file.
    assert!(heads <= 60, "{heads} HEADs for 60 names");
    assert!(lists <= 8 + 1, "{lists} LISTs");
    wait_for_attr_file(cache.path());
    std::thread::sleep(Duration::from_millis(300));
    drop(first);

    proxy.reset();
    let second = Mount::new(&bucket, &proxy.url(), cache.path());
    assert_eq!(stat_all(&second, 60), shown);
    let (heads, _) = heads_and_lists(&proxy, &bucket);
    assert!(
        heads <= 8,
        "only the lookups before the listing HEAD: {heads} HEADs"
    );
}
