//! Listing directories: what each listing costs in requests, READDIRPLUS lookup counting,
//! kept listings and `listing_attrs`, against the in-memory store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use s3vol_s3::{BucketName, FaultStore, MemStore};

async fn fs_with(
    store: Arc<FaultStore>,
    cache: &std::path::Path,
    tweak: impl FnOnce(&mut FsConfig),
) -> S3Fs {
    let bucket = BucketName::new("bkt").unwrap();
    store.create_bucket(&bucket).await.unwrap();
    let mut config = FsConfig::new(bucket, String::new(), cache.join("cache"));
    tweak(&mut config);
    S3Fs::new(config, store).await.unwrap()
}

/// Puts `n` objects `f0`… under `prefix`, with s3fs metadata as another client writes it.
async fn put_files(store: &FaultStore, prefix: &str, n: usize) {
    let bucket = BucketName::new("bkt").unwrap();
    let metadata: s3vol_s3::UserMetadata = [
        ("mode".to_owned(), (libc::S_IFREG | 0o600).to_string()),
        ("uid".to_owned(), "7".to_owned()),
        ("gid".to_owned(), "8".to_owned()),
    ]
    .into_iter()
    .collect();
    let options = PutOptions {
        metadata,
        ..PutOptions::default()
    };
    for i in 0..n {
        store
            .put_object(
                &bucket,
                &format!("{prefix}f{i}"),
                Bytes::from(vec![b'x'; i % 7]),
                &options,
            )
            .await
            .unwrap();
    }
}

/// One entry as the kernel would have received it.
#[derive(Clone, Debug)]
struct Got {
    name: String,
    ino: InodeNo,
    kind: Kind,
    attrs: Option<Attrs>,
}

/// Reads a whole directory the way the kernel does: calls that take at most `per_call`
/// entries, each from the offset after the last entry taken.
async fn list(fs: &S3Fs, dir: InodeNo, plus: bool, per_call: usize) -> Vec<Got> {
    let fh = fs.opendir(dir).unwrap();
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let mut batch: Vec<(Got, u64)> = Vec::new();
        let _ = fs
            .readdir(fh, offset, plus, |e| {
                if batch.len() == per_call {
                    return true;
                }
                let got = Got {
                    name: e.name.to_owned(),
                    ino: e.ino,
                    kind: e.kind,
                    attrs: e.attrs.cloned(),
                };
                batch.push((got, e.next_offset));
                false
            })
            .await
            .unwrap();
        let Some((_, last)) = batch.last() else { break };
        offset = *last;
        out.extend(batch.into_iter().map(|(g, _)| g));
    }
    fs.releasedir(fh);
    out
}

fn names(got: &[Got]) -> Vec<String> {
    let mut n: Vec<String> = got
        .iter()
        .map(|g| g.name.clone())
        .filter(|n| n != "." && n != "..")
        .collect();
    n.sort();
    n
}

#[tokio::test]
async fn readdirplus_counts_one_lookup_per_entry_sent() {
    let cache = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let fs = fs_with(store.clone(), cache.path(), |_| {}).await;
    put_files(&store, "", 5).await;
    // Three entries a call: every call ends with an entry that did not fit.
    let got = list(&fs, ROOT, true, 3).await;
    assert_eq!(got.len(), 7);
    assert!(got.iter().all(|g| g.attrs.is_some()));
    for g in &got[2..] {
        let inode = fs.inodes.get(g.ino).unwrap();
        assert_eq!(inode.state().lookups, 1, "{}", g.name);
        assert_eq!(g.attrs.as_ref().unwrap().perm, 0o600);
    }
    assert_eq!(
        fs.inodes.get(ROOT).unwrap().state().lookups,
        1,
        ". is no lookup"
    );
    // The kernel forgets them all (drop_caches): the table lets them go.
    for g in &got[2..] {
        fs.forget(g.ino, 1);
    }
    assert_eq!(fs.inode_count(), 1);
    // Listed again within the TTL: from the kept listing, under the same numbers, each
    // counted again.
    let before = store.calls();
    let again = list(&fs, ROOT, true, 3).await;
    assert_eq!(store.calls(), before, "no request");
    let inos = |g: &[Got]| {
        g.iter()
            .map(|g| (g.name.clone(), g.ino))
            .collect::<Vec<_>>()
    };
    assert_eq!(inos(&again), inos(&got));
    for g in &again[2..] {
        assert_eq!(fs.inodes.get(g.ino).unwrap().state().lookups, 1);
        let (inode, _) = fs.lookup(ROOT, &g.name).await.unwrap();
        assert_eq!(inode.ino, g.ino, "a name keeps its number");
    }
    assert_eq!(fs.inode_count(), 6);
    // Plain readdir counts nothing.
    let _ = list(&fs, ROOT, false, 3).await;
    for g in &again[2..] {
        assert_eq!(fs.inodes.get(g.ino).unwrap().state().lookups, 2);
    }
}

#[tokio::test]
async fn listing_costs_a_list_per_page_and_a_head_per_entry_then_nothing_within_the_ttl() {
    let cache = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let fs = fs_with(store.clone(), cache.path(), |_| {}).await;
    put_files(&store, "", 1500).await;
    let before = store.calls();
    let got = list(&fs, ROOT, true, 100).await;
    assert_eq!(got.len(), 1502);
    assert_eq!(
        store.calls() - before,
        2 + 1500,
        "2 LISTs and a HEAD per file"
    );
    let before = store.calls();
    let again = list(&fs, ROOT, false, 100).await;
    assert_eq!(names(&again), names(&got));
    assert_eq!(
        store.calls(),
        before,
        "re-opened within the TTL: no request"
    );
}

#[tokio::test]
async fn listing_attrs_take_sizes_from_the_listing_and_modes_from_the_defaults() {
    let cache = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let fs = fs_with(store.clone(), cache.path(), |c| c.listing_attrs = true).await;
    put_files(&store, "", 2500).await;
    put_files(&store, "sub/", 1).await;
    let before = store.calls();
    let got = list(&fs, ROOT, true, 100).await;
    assert_eq!(store.calls() - before, 3, "3 LISTs, no HEAD");
    assert_eq!(got.len(), 2 + 2501);
    for g in got.iter().filter(|g| g.name.starts_with('f')) {
        let i: usize = g.name[1..].parse().unwrap();
        let a = g.attrs.as_ref().unwrap();
        assert_eq!(
            (g.kind, a.size, a.perm),
            (Kind::File, (i % 7) as u64, 0o644)
        );
        assert_eq!((a.uid, a.gid), (fs.config.uid, fs.config.gid));
    }
    let sub = got.iter().find(|g| g.name == "sub").unwrap();
    assert_eq!(
        (sub.kind, sub.attrs.as_ref().unwrap().perm),
        (Kind::Dir, 0o755)
    );
    let before = store.calls();
    let _ = list(&fs, ROOT, true, 100).await;
    assert_eq!(
        store.calls(),
        before,
        "re-opened within the TTL: no request"
    );
    // A lookup by name reads the object's own metadata...
    let before = store.calls();
    let (f1, attrs) = fs.lookup(ROOT, "f1").await.unwrap();
    assert!(store.calls() > before, "a listed name is looked up in S3");
    assert_eq!((attrs.perm, attrs.uid, attrs.gid), (0o600, 7, 8));
    let (_, attrs) = fs.lookup(ROOT, "sub").await.unwrap();
    assert_eq!(attrs.kind, Kind::Dir);
    // ...which later listings keep while the object is the same version.
    fs.listings.invalidate(&fs.inodes.get(ROOT).unwrap());
    let before = store.calls();
    let got = list(&fs, ROOT, true, 1000).await;
    assert_eq!(store.calls() - before, 3);
    let g = got.iter().find(|g| g.name == "f1").unwrap();
    assert_eq!((g.ino, g.attrs.as_ref().unwrap().perm), (f1.ino, 0o600));
    // A new version of the object: back to what the listing says.
    let bucket = BucketName::new("bkt").unwrap();
    store
        .put_object(
            &bucket,
            "f1",
            Bytes::from_static(b"new!"),
            &PutOptions::default(),
        )
        .await
        .unwrap();
    fs.listings.invalidate(&fs.inodes.get(ROOT).unwrap());
    let got = list(&fs, ROOT, true, 1000).await;
    let a = got
        .iter()
        .find(|g| g.name == "f1")
        .unwrap()
        .attrs
        .clone()
        .unwrap();
    assert_eq!((a.size, a.perm), (4, 0o644));
}

#[tokio::test]
async fn a_directory_hides_a_file_of_the_same_name_in_listings_of_either_mode() {
    for listing_attrs in [false, true] {
        let cache = tempfile::tempdir().unwrap();
        let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
        let fs = fs_with(store.clone(), cache.path(), |c| {
            c.listing_attrs = listing_attrs
        })
        .await;
        put_files(&store, "", 1).await;
        put_files(&store, "f0/", 1).await;
        let got = list(&fs, ROOT, true, 100).await;
        let f0: Vec<&Got> = got.iter().filter(|g| g.name == "f0").collect();
        assert_eq!(f0.len(), 1, "{got:?}");
        assert_eq!(f0[0].kind, Kind::Dir);
    }
}

#[tokio::test]
async fn changes_made_here_show_in_the_next_listing_within_the_ttl() {
    let cache = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let fs = fs_with(store.clone(), cache.path(), |c| c.listing_attrs = true).await;
    put_files(&store, "", 2).await;
    assert_eq!(names(&list(&fs, ROOT, true, 10).await), ["f0", "f1"]);
    let (_, _, fh) = fs
        .create(ROOT, "new", 0o640, 1, 1, OpenMode::default())
        .await
        .unwrap();
    assert_eq!(names(&list(&fs, ROOT, true, 10).await), ["f0", "f1", "new"]);
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    let before = store.calls();
    assert_eq!(names(&list(&fs, ROOT, true, 10).await), ["f0", "f1", "new"]);
    assert_eq!(store.calls(), before, "an upload changes no name");
    fs.unlink(ROOT, "f0").await.unwrap();
    assert_eq!(names(&list(&fs, ROOT, true, 10).await), ["f1", "new"]);
    let (d, _) = fs.mkdir(ROOT, "d", 0o755, 1, 1).await.unwrap();
    assert_eq!(names(&list(&fs, ROOT, true, 10).await), ["d", "f1", "new"]);
    assert!(names(&list(&fs, d.ino, true, 10).await).is_empty());
    fs.rename(ROOT, "new", d.ino, "moved", false, false)
        .await
        .unwrap();
    assert_eq!(names(&list(&fs, ROOT, true, 10).await), ["d", "f1"]);
    assert_eq!(names(&list(&fs, d.ino, true, 10).await), ["moved"]);
    fs.symlink(d.ino, "link", "moved", 1, 1).await.unwrap();
    assert_eq!(names(&list(&fs, d.ino, true, 10).await), ["link", "moved"]);
    fs.rename(ROOT, "d", ROOT, "e", false, false).await.unwrap();
    assert_eq!(names(&list(&fs, ROOT, true, 10).await), ["e", "f1"]);
    assert_eq!(names(&list(&fs, d.ino, true, 10).await), ["link", "moved"]);
    fs.unlink(d.ino, "link").await.unwrap();
    fs.unlink(d.ino, "moved").await.unwrap();
    assert!(names(&list(&fs, d.ino, true, 10).await).is_empty());
    fs.rmdir(ROOT, "e").await.unwrap();
    assert_eq!(names(&list(&fs, ROOT, true, 10).await), ["f1"]);
}

#[tokio::test]
async fn the_next_page_is_listed_while_the_current_one_is_read() {
    let cache = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let fs = fs_with(store.clone(), cache.path(), |c| c.listing_attrs = true).await;
    put_files(&store, "", 2500).await;
    let before = store.calls();
    let fh = fs.opendir(ROOT).unwrap();
    let mut taken = 0;
    let _ = fs
        .readdir(fh, 0, true, |_| {
            taken += 1;
            taken > 10
        })
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(
        store.calls() - before,
        2,
        "the first page, and the second already"
    );
    fs.releasedir(fh);
    let got = list(&fs, ROOT, false, 100).await;
    assert_eq!(names(&got).len(), 2500);
}

#[tokio::test]
async fn a_name_missing_from_a_kept_listing_is_not_found_without_a_request() {
    let cache = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let fs = fs_with(store.clone(), cache.path(), |c| {
        c.metadata_ttl = std::time::Duration::from_millis(300);
    })
    .await;
    put_files(&store, "", 3).await;
    assert_eq!(names(&list(&fs, ROOT, true, 10).await), ["f0", "f1", "f2"]);
    let before = store.calls();
    let e = fs.lookup(ROOT, "missing").await.unwrap_err();
    assert_eq!(e.errno, libc::ENOENT);
    assert_eq!(store.calls(), before, "answered from the kept listing");
    // Another client's new object shows once the listing is older than the TTL.
    put_files(&store, "other-", 1).await;
    assert_eq!(
        fs.lookup(ROOT, "other-f0").await.unwrap_err().errno,
        libc::ENOENT
    );
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let (inode, attrs) = fs.lookup(ROOT, "other-f0").await.unwrap();
    assert_eq!((inode.kind, attrs.size), (Kind::File, 0));
    // A name made through this mount is found at once (the kept listing went with it).
    assert_eq!(names(&list(&fs, ROOT, true, 10).await).len(), 4);
    fs.mkdir(ROOT, "d", 0o755, 1, 1).await.unwrap();
    assert_eq!(fs.lookup(ROOT, "d").await.unwrap().0.kind, Kind::Dir);
}

#[tokio::test]
async fn files_made_one_after_another_in_a_new_directory_cost_no_lookup_request() {
    let cache = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let fs = fs_with(store.clone(), cache.path(), |_| {}).await;
    let (d, _) = fs.mkdir(ROOT, "d", 0o755, 1, 1).await.unwrap();
    let before = store.calls();
    for i in 0..5 {
        let name = format!("f{i}");
        // What the kernel does before a create: look the name up.
        assert_eq!(
            fs.lookup(d.ino, &name).await.unwrap_err().errno,
            libc::ENOENT
        );
        let (_, _, fh) = fs
            .create(d.ino, &name, 0o644, 1, 1, OpenMode::default())
            .await
            .unwrap();
        fs.release(fh).await.unwrap();
    }
    fs.symlink(d.ino, "link", "f0", 1, 1).await.unwrap();
    let (sub, _) = fs.mkdir(d.ino, "sub", 0o755, 1, 1).await.unwrap();
    // 5 PUTs at close, a symlink and a marker: no HEAD, no LIST.
    assert_eq!(store.calls() - before, 7);
    assert_eq!(
        names(&list(&fs, d.ino, true, 10).await),
        ["f0", "f1", "f2", "f3", "f4", "link", "sub"]
    );
    assert!(names(&list(&fs, sub.ino, true, 10).await).is_empty());
    assert_eq!(store.calls() - before, 7, "both listings were kept");
    // Removing a name drops the kept listing: the next listing asks S3 again.
    fs.unlink(d.ino, "f0").await.unwrap();
    assert_eq!(
        names(&list(&fs, d.ino, true, 10).await),
        ["f1", "f2", "f3", "f4", "link", "sub"]
    );
}

/// Waits until the attribute cache under `cache` holds `n` files (they are written in the
/// background once a listing is complete).
async fn attr_files(cache: &std::path::Path, n: usize) {
    let dir = cache.join("cache").join(crate::cache_dir::ATTRS_SUBDIR);
    for _ in 0..500 {
        let count = std::fs::read_dir(&dir).map_or(0, |r| {
            r.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".attrs"))
                .count()
        });
        if count == n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the attribute cache does not hold {n} files");
}

/// Waits until the attribute cache under `cache` holds `n` entries for the bucket's root
/// (written in the background).
async fn attr_entries(cache: &std::path::Path, n: usize) {
    let dir = cache.join("cache").join(crate::cache_dir::ATTRS_SUBDIR);
    let attrs = crate::attr_cache::AttrCache::open(&dir, "|bkt".into(), u64::MAX).unwrap();
    for _ in 0..500 {
        if attrs.load("").len() == n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the attribute cache does not hold {n} entries");
}

async fn another_mount(store: Arc<FaultStore>, cache: &std::path::Path) -> S3Fs {
    let config = FsConfig::new(
        BucketName::new("bkt").unwrap(),
        String::new(),
        cache.join("cache"),
    );
    S3Fs::new(config, store).await.unwrap()
}

#[tokio::test]
async fn a_later_mount_lists_a_directory_the_node_listed_before_with_lists_only() {
    let cache = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemStore::new());
    let store = Arc::new(FaultStore::new(mem.clone()));
    let fs = fs_with(store.clone(), cache.path(), |_| {}).await;
    put_files(&store, "", 1500).await;
    // Written a minute ago: a HEAD now can be trusted (see `attr_cache::SETTLE`).
    mem.age_all(std::time::Duration::from_secs(60));
    let before = store.calls();
    let first = list(&fs, ROOT, true, 100).await;
    assert_eq!(
        store.calls() - before,
        2 + 1500,
        "2 LISTs and a HEAD per file"
    );
    attr_files(cache.path(), 1).await;
    attr_entries(cache.path(), 1500).await;
    drop(fs);

    let fs = another_mount(store.clone(), cache.path()).await;
    let before = store.calls();
    let again = list(&fs, ROOT, true, 100).await;
    assert_eq!(store.calls() - before, 2, "2 LISTs, no HEAD");
    let attrs = |g: &[Got]| {
        let mut v: Vec<(String, Kind, Attrs)> = g
            .iter()
            .filter_map(|g| Some((g.name.clone(), g.kind, g.attrs.clone()?)))
            .filter(|(n, _, _)| n != "." && n != "..")
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(attrs(&again), attrs(&first), "the same attributes");
    let f3 = again.iter().find(|g| g.name == "f3").unwrap();
    let a = f3.attrs.as_ref().unwrap();
    assert_eq!((a.perm, a.uid, a.gid, a.size), (0o600, 7, 8, 3));

    // Another client changes three objects: an s3fs chmod (metadata-only copy replacing the
    // mode), a new upload, and a copy of another object over one.
    let bucket = BucketName::new("bkt").unwrap();
    let mut chmod = s3vol_s3::UserMetadata::new();
    chmod.insert("mode".into(), (libc::S_IFREG | 0o640).to_string());
    chmod.insert("uid".into(), "7".into());
    let source = |key: &str| CopySource {
        bucket: bucket.clone(),
        key: key.into(),
        range: None,
        if_match: None,
    };
    store
        .copy_object(
            &bucket,
            "f1",
            &source("f1"),
            &MetadataDirective::Replace {
                metadata: chmod,
                content_type: None,
            },
        )
        .await
        .unwrap();
    store
        .put_object(
            &bucket,
            "f2",
            Bytes::from_static(b"new"),
            &PutOptions::default(),
        )
        .await
        .unwrap();
    store
        .copy_object(&bucket, "f3", &source("f10"), &MetadataDirective::Copy)
        .await
        .unwrap();
    let fs = another_mount(store.clone(), cache.path()).await;
    let before = store.calls();
    let got = list(&fs, ROOT, true, 100).await;
    assert_eq!(
        store.calls() - before,
        2 + 3,
        "2 LISTs and a HEAD for each changed object"
    );
    let get = |name: &str| {
        got.iter()
            .find(|g| g.name == name)
            .unwrap()
            .attrs
            .clone()
            .unwrap()
    };
    assert_eq!((get("f1").perm, get("f1").gid), (0o640, fs.config.gid));
    assert_eq!((get("f2").perm, get("f2").size), (0o644, 3));
    assert_eq!((get("f3").perm, get("f3").size), (0o600, 10 % 7));
    assert_eq!(get("f4").perm, 0o600);
}

#[tokio::test]
async fn without_the_attribute_cache_every_listing_heads_its_files() {
    let cache = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemStore::new());
    let store = Arc::new(FaultStore::new(mem.clone()));
    let fs = fs_with(store.clone(), cache.path(), |c| c.attr_cache_dir = None).await;
    put_files(&store, "", 20).await;
    mem.age_all(std::time::Duration::from_secs(60));
    let _ = list(&fs, ROOT, true, 100).await;
    drop(fs);
    let mut config = FsConfig::new(
        BucketName::new("bkt").unwrap(),
        String::new(),
        cache.path().join("cache"),
    );
    config.attr_cache_dir = None;
    let fs = S3Fs::new(config, store.clone()).await.unwrap();
    let before = store.calls();
    let _ = list(&fs, ROOT, true, 100).await;
    assert_eq!(store.calls() - before, 1 + 20);
    assert!(!cache.path().join("cache").join("attrs").exists());
}

/// Waits until `dir` of `fs` has a name index (built in the background).
async fn indexed(fs: &S3Fs, dir: InodeNo) {
    for _ in 0..500 {
        if fs.names.ready(dir, fs.config.metadata_ttl).is_some() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("directory {dir} was not indexed");
}

#[tokio::test]
async fn a_burst_of_lookups_lists_the_directory_once_then_costs_a_head_per_file_or_none() {
    let cache = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemStore::new());
    let store = Arc::new(FaultStore::new(mem.clone()));
    let fs = fs_with(store.clone(), cache.path(), |_| {}).await;
    put_files(&store, "", 300).await;
    // A file and a directory of the same name: the directory wins.
    put_files(&store, "f7/", 1).await;
    mem.age_all(std::time::Duration::from_secs(60));
    let mut names: Vec<String> = (0..300).map(|i| format!("f{i}")).collect();
    names.sort();
    let before = store.calls();
    for name in &names[..crate::names::BURST as usize] {
        fs.lookup(ROOT, name).await.unwrap();
    }
    assert_eq!(
        store.calls() - before,
        2 * u64::from(crate::names::BURST),
        "a HEAD and a one-key LIST each"
    );
    indexed(&fs, ROOT).await;
    assert_eq!(
        store.calls() - before,
        2 * 8 + 1,
        "and one LIST of the directory"
    );
    let before = store.calls();
    let e = fs.lookup(ROOT, "missing").await.unwrap_err();
    assert_eq!(e.errno, libc::ENOENT);
    assert_eq!(
        store.calls() - before,
        3,
        "not listed: asked as before (another client may have made it since)"
    );
    let before = store.calls();
    let (f7, _) = fs.lookup(ROOT, "f7").await.unwrap();
    assert_eq!(f7.kind, Kind::Dir, "the directory wins");
    assert_eq!(store.calls() - before, 1, "a HEAD of its marker");
    // The rest in order: one HEAD per file, many at once.
    let rest: Vec<&String> = names[8..].iter().filter(|n| *n != "f7").collect();
    let before = store.calls();
    for name in &rest {
        let (inode, attrs) = fs.lookup(ROOT, name).await.unwrap();
        assert_eq!((inode.kind, attrs.perm, attrs.uid), (Kind::File, 0o600, 7));
    }
    assert_eq!(store.calls() - before, rest.len() as u64);
    attr_entries(cache.path(), rest.len()).await;
    drop(fs);

    // Another mount: after its burst, the attribute cache answers for every unchanged file.
    let fs = another_mount(store.clone(), cache.path()).await;
    for name in &names[..8] {
        fs.lookup(ROOT, name).await.unwrap();
    }
    indexed(&fs, ROOT).await;
    let before = store.calls();
    for name in &rest {
        let (_, attrs) = fs.lookup(ROOT, name).await.unwrap();
        assert_eq!((attrs.perm, attrs.uid, attrs.gid), (0o600, 7, 8));
    }
    assert_eq!(store.calls(), before, "no request");
}

#[tokio::test]
async fn a_name_index_answers_within_the_ttl_and_follows_changes_made_here() {
    let cache = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemStore::new());
    let store = Arc::new(FaultStore::new(mem.clone()));
    let fs = fs_with(store.clone(), cache.path(), |c| {
        c.metadata_ttl = std::time::Duration::from_millis(800);
    })
    .await;
    put_files(&store, "", 20).await;
    for i in 0..8 {
        fs.lookup(ROOT, &format!("f{i}")).await.unwrap();
    }
    indexed(&fs, ROOT).await;
    // Another client's new object is found at once (an open must see it)...
    put_files(&store, "other-", 2).await;
    let (other, _) = fs.lookup(ROOT, "other-f0").await.unwrap();
    assert_eq!(other.kind, Kind::File);
    // ...another client's deletion shows at the HEAD a listed file costs...
    let bucket = BucketName::new("bkt").unwrap();
    store.delete_object(&bucket, "f15").await.unwrap();
    assert_eq!(
        fs.lookup(ROOT, "f15").await.unwrap_err().errno,
        libc::ENOENT
    );
    // ...and names removed or made here are seen at once.
    fs.unlink(ROOT, "f12").await.unwrap();
    assert_eq!(
        fs.lookup(ROOT, "f12").await.unwrap_err().errno,
        libc::ENOENT
    );
    assert!(
        fs.names.ready(ROOT, fs.config.metadata_ttl).is_some(),
        "kept"
    );
    let (_, _, fh) = fs
        .create(ROOT, "made", 0o640, 1, 1, OpenMode::default())
        .await
        .unwrap();
    fs.release(fh).await.unwrap();
    let (made, _) = fs.lookup(ROOT, "made").await.unwrap();
    assert_eq!(made.kind, Kind::File);
    fs.mkdir(ROOT, "newdir", 0o755, 1, 1).await.unwrap();
    assert_eq!(fs.lookup(ROOT, "newdir").await.unwrap().0.kind, Kind::Dir);
    // A rename drops the index.
    fs.rename(ROOT, "f13", ROOT, "f13b", false, false)
        .await
        .unwrap();
    assert!(fs.names.ready(ROOT, fs.config.metadata_ttl).is_none());
    // Another client's new directory over a listed file wins once the TTL has passed.
    put_files(&store, "f16/", 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    assert_eq!(fs.lookup(ROOT, "f16").await.unwrap().0.kind, Kind::Dir);
}

/// The subdirectories `d0`… of the root, by name, after a listing of it.
async fn subdirs(fs: &S3Fs) -> Vec<InodeNo> {
    let mut dirs: Vec<(String, InodeNo)> = list(fs, ROOT, true, 100)
        .await
        .into_iter()
        .filter(|g| g.kind == Kind::Dir && g.name.starts_with('d'))
        .map(|g| (g.name, g.ino))
        .collect();
    dirs.sort();
    dirs.into_iter().map(|(_, ino)| ino).collect()
}

/// A mount of a bucket with `files` files in each of the directories `dirs`, and its store.
async fn fs_over(
    dirs: impl IntoIterator<Item = String>,
    files: usize,
) -> (tempfile::TempDir, Arc<FaultStore>, S3Fs) {
    let cache = tempfile::tempdir().unwrap();
    let store = Arc::new(FaultStore::new(Arc::new(MemStore::new())));
    let fs = fs_with(store.clone(), cache.path(), |_| {}).await;
    for d in dirs {
        put_files(&store, &d, files).await;
    }
    (cache, store, fs)
}

#[tokio::test]
async fn a_walk_through_subdirectories_lists_the_next_ones_ahead() {
    let (_cache, store, fs) = fs_over((0..8).map(|d| format!("d{d}/")), 3).await;
    let dirs = subdirs(&fs).await;
    assert_eq!(dirs.len(), 8);
    // A directory opened alone (an `ls` of one subdirectory) lists nothing ahead.
    assert!(fs.walk_ahead(dirs[0]).is_empty());
    assert_eq!(
        names(&list(&fs, dirs[0], true, 100).await),
        ["f0", "f1", "f2"]
    );
    // A second subdirectory of the same directory: a walk. The next four are listed ahead.
    let ahead = fs.walk_ahead(dirs[1]);
    assert_eq!(ahead, dirs[2..6]);
    let before = store.calls();
    fs.list_ahead(ahead).await;
    assert_eq!(
        store.calls() - before,
        4 * (1 + 3),
        "a LIST and a HEAD per file each"
    );
    let before = store.calls();
    for &d in &dirs[2..6] {
        let got = list(&fs, d, true, 100).await;
        assert_eq!(names(&got), ["f0", "f1", "f2"]);
        assert!(
            got.iter()
                .filter(|g| g.name.starts_with('f'))
                .all(|g| g.attrs.as_ref().is_some_and(|a| a.uid == 7)),
            "listed ahead with each file's own metadata: {got:?}"
        );
    }
    assert_eq!(
        store.calls(),
        before,
        "opened after their listing ahead: no request"
    );
    // Each step of the walk keeps it four ahead: one more directory, none twice.
    assert_eq!(fs.walk_ahead(dirs[2]), dirs[6..7]);
    assert_eq!(fs.walk_ahead(dirs[3]), dirs[7..8]);
    assert!(fs.walk_ahead(dirs[4]).is_empty());
    // The root has no parent to walk.
    assert!(fs.walk_ahead(ROOT).is_empty());
}

#[tokio::test]
async fn a_directory_opened_while_it_is_listed_ahead_is_listed_once() {
    let (_cache, store, fs) = fs_over((0..3).map(|d| format!("d{d}/")), 3).await;
    let dirs = subdirs(&fs).await;
    assert!(fs.walk_ahead(dirs[0]).is_empty());
    let ahead = fs.walk_ahead(dirs[1]);
    assert_eq!(ahead, dirs[2..3]);
    // A slow server: the walk opens the directory while its listing ahead is on its way.
    store.add(s3vol_s3::Fault::Latency {
        op: Some(s3vol_s3::Op::List),
        delay: std::time::Duration::from_millis(300),
    });
    let before = store.calls();
    let (_, got) = tokio::join!(fs.list_ahead(ahead), async {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        list(&fs, dirs[2], true, 100).await
    });
    assert_eq!(names(&got), ["f0", "f1", "f2"]);
    assert_eq!(
        store.calls() - before,
        1 + 3,
        "one LIST and a HEAD per file, not two"
    );
}

/// The inode of the subdirectory `name` of `dir`, from a listing of `dir`.
async fn subdir(fs: &S3Fs, dir: InodeNo, name: &str) -> InodeNo {
    list(fs, dir, true, 100)
        .await
        .into_iter()
        .find(|g| g.name == name && g.kind == Kind::Dir)
        .unwrap()
        .ino
}

#[tokio::test]
async fn a_walk_goes_into_the_directories_it_opens_listing_their_subdirectories_ahead() {
    let leaves = (0..3).flat_map(|d| (0..3).map(move |s| format!("d{d}/s{s}/")));
    let (_cache, store, fs) = fs_over(leaves, 2).await;
    let dirs = subdirs(&fs).await;
    assert_eq!(dirs.len(), 3);
    // The walk starts: d0 opened alone is no walk, and neither is its first subdirectory.
    assert!(fs.walk_ahead(dirs[0]).is_empty());
    let s0 = subdir(&fs, dirs[0], "s0").await;
    assert!(fs.walk_into(dirs[0]).is_empty());
    assert!(fs.walk_ahead(s0).is_empty());
    // d1, the second subdirectory of the root: a walk, which lists d2 ahead.
    let ahead = fs.walk_ahead(dirs[1]);
    assert_eq!(ahead, dirs[2..3]);
    fs.list_ahead(ahead).await;
    // d1 is part of the walk: once read, its subdirectories are listed ahead, all three.
    let got = list(&fs, dirs[1], true, 100).await;
    let mut inside: Vec<(String, InodeNo)> = got
        .iter()
        .filter(|g| g.name.starts_with('s'))
        .map(|g| (g.name.clone(), g.ino))
        .collect();
    inside.sort();
    let inside: Vec<InodeNo> = inside.into_iter().map(|(_, ino)| ino).collect();
    let ahead = fs.walk_into(dirs[1]);
    assert_eq!(ahead, inside);
    fs.list_ahead(ahead).await;
    assert!(fs.walk_into(dirs[1]).is_empty(), "listed ahead once");
    let before = store.calls();
    for &s in &inside {
        assert!(fs.walk_ahead(s).is_empty(), "all listed ahead already");
        assert_eq!(names(&list(&fs, s, true, 100).await), ["f0", "f1"]);
    }
    // d2, listed ahead, then its subdirectories once it is read (from memory).
    assert!(fs.walk_ahead(dirs[2]).is_empty());
    assert_eq!(
        names(&list(&fs, dirs[2], true, 100).await),
        ["s0", "s1", "s2"]
    );
    assert_eq!(
        store.calls(),
        before,
        "the walk from d1 on costs no request of its own"
    );
    let ahead = fs.walk_into(dirs[2]);
    assert_eq!(ahead.len(), 3);
    fs.list_ahead(ahead).await;
    assert_eq!(store.calls() - before, 3 * (1 + 2));
}
