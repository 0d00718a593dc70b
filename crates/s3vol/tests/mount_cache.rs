//! The cache directory and ownership rules of new files, through a real mount.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mount.rs"]
mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use support::{Mounted, pattern};

fn staged_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "data"))
        .map(|e| e.metadata().unwrap().blocks() * 512)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn clean_copies_stay_within_the_cache_size_and_go_least_recently_used_first() {
    let m = Mounted::new("lru", "", &["--cache-size", "8M"]).await;
    // Files edited in place (random writes) are staged; once uploaded and closed they stay as
    // clean copies, until room is needed.
    for i in 0..5u64 {
        m.put(&format!("f{i}"), &pattern(3 << 20, i), &[]).await;
    }
    for i in 0..5u64 {
        let path = m.path(&format!("f{i}"));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"edited", 1000).unwrap();
        drop(f);
        assert!(
            staged_bytes(m.cache.path()) <= 9 << 20,
            "the cache directory holds {} bytes after {} files (limit 8 MiB)",
            staged_bytes(m.cache.path()),
            i + 1
        );
    }
    assert!(
        staged_bytes(m.cache.path()) >= 3 << 20,
        "the most recent clean copy is kept for reuse"
    );
    for i in 0..5u64 {
        let mut expected = pattern(3 << 20, i);
        expected[1000..1006].copy_from_slice(b"edited");
        assert!(m.get(&format!("f{i}")).await == expected, "f{i} in S3");
        assert!(
            std::fs::read(m.path(&format!("f{i}"))).unwrap() == expected,
            "f{i} through the mount"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn new_files_take_the_group_of_a_set_group_id_directory() {
    let m = Mounted::new("setgid", "", &[]).await;
    let dir = m.path("shared");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, None, Some(3000)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2775)).unwrap();
    std::fs::write(dir.join("file"), b"x").unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    let file = std::fs::metadata(dir.join("file")).unwrap();
    assert_eq!(file.gid(), 3000, "the file joins the directory's group");
    let sub = std::fs::metadata(dir.join("sub")).unwrap();
    assert_eq!(sub.gid(), 3000);
    assert_ne!(
        sub.mode() & libc::S_ISGID,
        0,
        "subdirectories keep the set-group-ID bit"
    );
    assert_eq!(m.head("shared/file").await.unwrap().metadata["gid"], "3000");
    // Without the bit, the creator's group.
    std::fs::create_dir(m.path("plain")).unwrap();
    std::fs::write(m.path("plain/file"), b"y").unwrap();
    assert_eq!(std::fs::metadata(m.path("plain/file")).unwrap().gid(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn attribute_changes_right_after_close_are_in_s3_when_they_return() {
    // close() returns before the kernel's asynchronous release; a chmod that arrives in
    // between, while the clean local copy is still attached, must still reach S3 at once.
    let m = Mounted::new("attrclose", "", &[]).await;
    for i in 0..20 {
        let p = m.path(&format!("f{i}"));
        std::fs::write(&p, b"data").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mode = m.head(&format!("f{i}")).await.unwrap().metadata["mode"].clone();
        assert_eq!(mode, (libc::S_IFREG | 0o600).to_string(), "f{i}");
    }
}
