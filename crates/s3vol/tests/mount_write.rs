//! The write side of `s3vol mount`, through a real FUSE mount on the test S3 server: every
//! operation is done with ordinary syscalls on the mount and its result checked twice, through
//! the mount and directly in the bucket (bodies, `x-amz-meta-*` headers, `dir/` markers), so
//! what s3vol writes is what s3fs and rclone read. `docs/SEMANTICS.md` names these tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mount.rs"]
mod support;

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use s3vol_s3::{ListRequest, UserMetadata};
use support::{Mounted, close, errno, pattern};
use tokio::runtime::Runtime;

// ----- helpers ------------------------------------------------------------------------------

fn rt() -> Runtime {
    // Modes below are checked exactly: make the umask the usual one for every test.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o022) };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn mount(rt: &Runtime, tag: &str, extra: &[&str]) -> Mounted {
    rt.block_on(Mounted::new(tag, "", extra))
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    let (p, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: valid C strings and a buffer of the given length.
    check(unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

fn getxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (p, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: a size query (null buffer, size 0), then a read into a buffer of that size.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    check(len as libc::c_int)?;
    let mut buf = vec![0u8; len as usize];
    // SAFETY: the buffer is `buf.len()` bytes long.
    let got = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    check(got as libc::c_int)?;
    buf.truncate(got as usize);
    Ok(buf)
}

fn listxattr(p: &Path) -> io::Result<BTreeSet<String>> {
    let p = cpath(p);
    // SAFETY: as in getxattr.
    let len = unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
    check(len as libc::c_int)?;
    let mut buf = vec![0u8; len as usize];
    // SAFETY: the buffer is `buf.len()` bytes long.
    let got = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    check(got as libc::c_int)?;
    buf.truncate(got as usize);
    Ok(buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    let (p, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: valid C strings.
    check(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) })
}

/// `touch -d`: sets atime and mtime to exact times.
fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    let p = cpath(p);
    // SAFETY: a valid path and an array of two timespecs.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), 0) })
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (f, t) = (cpath(from), cpath(to));
    // SAFETY: valid C strings.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    })
}

/// The user metadata of `rel`, which must exist.
fn meta(rt: &Runtime, m: &Mounted, rel: &str) -> UserMetadata {
    rt.block_on(m.head(rel))
        .unwrap_or_else(|| panic!("{rel} is not in the bucket"))
        .metadata
}

fn exists(rt: &Runtime, m: &Mounted, rel: &str) -> bool {
    rt.block_on(m.head(rel)).is_some()
}

/// Every key under `prefix` in the bucket.
fn keys(rt: &Runtime, m: &Mounted, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut token = None;
    for _ in 0..100 {
        let page = rt
            .block_on(m.store.list_objects(
                &m.bucket,
                &ListRequest {
                    prefix: prefix.to_owned(),
                    continuation_token: token.take(),
                    ..ListRequest::default()
                },
            ))
            .unwrap();
        out.extend(page.objects.into_iter().map(|o| o.key));
        match page.next_continuation_token {
            Some(t) => token = Some(t),
            None => return out,
        }
    }
    panic!("listing of {prefix} did not end");
}

fn mode_of(kind: libc::mode_t, perm: u32) -> String {
    (kind | perm).to_string()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

// ----- create, write, overwrite, append, truncate ------------------------------------------

#[test]
fn created_file_reaches_s3_at_close_with_s3fs_metadata() {
    let rt = rt();
    let m = mount(&rt, "w-create", &[]);
    let data = pattern(300_000, 1);
    let path = m.path("new.bin");
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&path)
        .unwrap();
    f.write_all(&data).unwrap();

    // Before close the file exists in the mount, with its size, but not yet in the bucket.
    assert_eq!(fs::metadata(&path).unwrap().len(), data.len() as u64);
    assert!(names(m.mnt.path()).contains("new.bin"));
    assert!(
        !exists(&rt, &m, "new.bin"),
        "a created file appears in S3 only at close"
    );

    let started = unix_now();
    close(f).unwrap();
    assert_eq!(rt.block_on(m.get("new.bin")), data);
    let info = rt.block_on(m.head("new.bin")).unwrap();
    let md = &info.metadata;
    assert_eq!(md["mode"], mode_of(libc::S_IFREG, 0o640));
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    assert_eq!(md["uid"], uid.to_string());
    assert_eq!(md["gid"], gid.to_string());
    let mtime: f64 = md["mtime"].parse().unwrap();
    assert!(
        (mtime as u64).abs_diff(started) < 120,
        "x-amz-meta-mtime {mtime} is not the time of writing ({started})"
    );

    // Read back through the mount after close.
    assert_eq!(fs::read(&path).unwrap(), data);
    let st = fs::metadata(&path).unwrap();
    assert_eq!(st.mode(), libc::S_IFREG | 0o640);
}

#[test]
fn overwrite_with_o_trunc_replaces_content_and_keeps_attributes() {
    let rt = rt();
    let m = mount(&rt, "w-trunc", &[]);
    let s3fs_meta = [
        ("mode", "33152"), // S_IFREG | 0600
        ("uid", "1234"),
        ("gid", "5678"),
        ("mtime", "1600000000"),
    ];
    rt.block_on(m.put("f.txt", b"the old and much longer content", &s3fs_meta));
    fs::write(m.path("f.txt"), b"new").unwrap();
    assert_eq!(rt.block_on(m.get("f.txt")), b"new");
    let md = meta(&rt, &m, "f.txt");
    assert_eq!(
        (md["mode"].as_str(), md["uid"].as_str(), md["gid"].as_str()),
        ("33152", "1234", "5678"),
        "an overwrite keeps mode and owner"
    );
    assert_ne!(md["mtime"], "1600000000", "an overwrite sets mtime");

    // Opening with O_TRUNC and writing nothing leaves an empty object.
    let f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("f.txt"))
        .unwrap();
    close(f).unwrap();
    assert_eq!(rt.block_on(m.get("f.txt")), b"");
    assert_eq!(fs::metadata(m.path("f.txt")).unwrap().len(), 0);
}

#[test]
fn append_writes_at_the_end_of_the_object() {
    let rt = rt();
    let m = mount(&rt, "w-append", &[]);
    rt.block_on(m.put("log", b"hello ", &[]));
    let mut f = OpenOptions::new().append(true).open(m.path("log")).unwrap();
    f.write_all(b"world").unwrap();
    close(f).unwrap();
    assert_eq!(rt.block_on(m.get("log")), b"hello world");

    // O_APPEND writes land at the end whatever offset pwrite names.
    let f = OpenOptions::new().append(true).open(m.path("log")).unwrap();
    f.write_at(b"!", 0).unwrap();
    f.write_at(b"?", 2).unwrap();
    close(f).unwrap();
    assert_eq!(rt.block_on(m.get("log")), b"hello world!?");
    assert_eq!(fs::read(m.path("log")).unwrap(), b"hello world!?");
}

#[test]
fn random_writes_and_holes_are_persisted() {
    let rt = rt();
    let m = mount(&rt, "w-random", &[]);
    // A new file written out of order, with a hole.
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.path("sparse"))
        .unwrap();
    f.write_at(b"tail", 1 << 20).unwrap();
    f.write_at(b"mid", 10).unwrap();
    f.write_at(b"head", 0).unwrap();
    close(f).unwrap();
    let mut want = vec![0u8; (1 << 20) + 4];
    want[..4].copy_from_slice(b"head");
    want[10..13].copy_from_slice(b"mid");
    want[1 << 20..].copy_from_slice(b"tail");
    assert!(rt.block_on(m.get("sparse")) == want, "sparse file content");
    assert!(fs::read(m.path("sparse")).unwrap() == want);

    // An existing object patched in place (read-modify-write through a staging file).
    let mut model = pattern(200_000, 2);
    rt.block_on(m.put("obj", &model, &[]));
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("obj"))
        .unwrap();
    let patch = pattern(5_000, 3);
    f.write_at(&patch, 100_000).unwrap();
    model[100_000..105_000].copy_from_slice(&patch);
    f.seek(SeekFrom::Start(199_998)).unwrap();
    f.write_all(b"past the end").unwrap();
    model.truncate(199_998);
    model.extend_from_slice(b"past the end");
    // The writer reads its own writes before close.
    let mut back = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut back).unwrap();
    assert!(back == model, "read-your-writes before close");
    close(f).unwrap();
    assert!(rt.block_on(m.get("obj")) == model, "patched object in S3");
}

#[test]
fn truncate_and_ftruncate_grow_and_shrink() {
    let rt = rt();
    let m = mount(&rt, "w-truncate", &[]);
    let data = pattern(100_000, 4);
    rt.block_on(m.put("t", &data, &[]));
    let path = m.path("t");
    let c = cpath(&path);

    // truncate(2) on a closed file is durable when it returns.
    // SAFETY: a valid path.
    check(unsafe { libc::truncate(c.as_ptr(), 10) }).unwrap();
    assert_eq!(rt.block_on(m.get("t")), &data[..10]);
    // SAFETY: as above.
    check(unsafe { libc::truncate(c.as_ptr(), 50_000) }).unwrap();
    let mut want = data[..10].to_vec();
    want.resize(50_000, 0);
    assert!(rt.block_on(m.get("t")) == want, "grown with zeros");
    assert_eq!(fs::metadata(&path).unwrap().len(), 50_000);

    // ftruncate on an open file is seen at once through the mount and reaches S3 at close.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(5).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), 5);
    assert_eq!(rt.block_on(m.head("t")).unwrap().size, 50_000);
    f.set_len(8).unwrap();
    f.write_at(b"!", 7).unwrap();
    close(f).unwrap();
    let mut want = data[..5].to_vec();
    want.extend_from_slice(b"\0\0!");
    assert_eq!(rt.block_on(m.get("t")), want);
    assert_eq!(fs::read(&path).unwrap(), want);
}

#[test]
fn readers_in_the_same_mount_see_writes_of_another_handle() {
    let rt = rt();
    let m = mount(&rt, "w-rw", &[]);
    let data = pattern(1 << 20, 5);
    rt.block_on(m.put("shared", &data, &[]));
    let path = m.path("shared");
    let reader = File::open(&path).unwrap();
    let mut buf = [0u8; 4];
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, data[..4]);

    let writer = OpenOptions::new().write(true).open(&path).unwrap();
    writer.write_at(b"BBBB", 0).unwrap();
    writer.write_at(b"CCCC", 500_000).unwrap();
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(
        &buf, b"BBBB",
        "a reader sees another handle's write before close"
    );
    reader.read_exact_at(&mut buf, 500_000).unwrap();
    assert_eq!(&buf, b"CCCC");
    close(writer).unwrap();

    let mut want = data.clone();
    want[..4].copy_from_slice(b"BBBB");
    want[500_000..500_004].copy_from_slice(b"CCCC");
    assert!(rt.block_on(m.get("shared")) == want);
    // The reader still open after the writer closed reads the new content whole.
    let mut all = vec![0u8; want.len()];
    reader.read_exact_at(&mut all, 0).unwrap();
    assert!(all == want);
    close(reader).unwrap();
}

#[test]
fn fsync_makes_data_durable_before_close() {
    let rt = rt();
    let m = mount(&rt, "w-fsync", &[]);
    let mut f = File::create(m.path("j")).unwrap();
    f.write_all(b"abc").unwrap();
    f.sync_all().unwrap();
    assert_eq!(
        rt.block_on(m.get("j")),
        b"abc",
        "fsync returned: data in S3"
    );
    f.write_all(b"def").unwrap();
    f.sync_data().unwrap();
    assert_eq!(rt.block_on(m.get("j")), b"abcdef");
    // fchmod on an open file reaches S3 with the data.
    f.set_permissions(fs::Permissions::from_mode(0o604))
        .unwrap();
    f.write_all(b"g").unwrap();
    close(f).unwrap();
    assert_eq!(rt.block_on(m.get("j")), b"abcdefg");
    assert_eq!(meta(&rt, &m, "j")["mode"], mode_of(libc::S_IFREG, 0o604));
}

/// A big file streamed as a multipart upload, made durable by fsync, then patched: the patch
/// must reuse the object written by the stream (its parts copied server-side).
#[test]
fn streamed_file_can_be_patched_after_fsync() {
    let rt = rt();
    let m = mount(&rt, "w-stream-patch", &["--part-size", "5M"]);
    let mut model = pattern(12 << 20, 6);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(m.path("big"))
        .unwrap();
    for chunk in model.chunks(1 << 20) {
        f.write_all(chunk).unwrap();
    }
    f.sync_all().unwrap();
    assert!(
        rt.block_on(m.get("big")) == model,
        "streamed object after fsync"
    );
    assert_eq!(
        meta(&rt, &m, "big")["mode"],
        mode_of(libc::S_IFREG, 0o644),
        "a streamed object gets its attributes"
    );
    f.write_at(b"XYZ", 1).unwrap();
    model[1..4].copy_from_slice(b"XYZ");
    close(f).unwrap();
    assert!(
        rt.block_on(m.get("big")) == model,
        "patched streamed object"
    );
    assert!(fs::read(m.path("big")).unwrap() == model);
}

/// A big object patched in one part: the other parts are copied server-side at upload and
/// never downloaded, and must still read back right, through the same handle after fsync and
/// through a new one after close.
#[test]
fn patched_big_object_reads_back_whole_after_upload() {
    let rt = rt();
    let m = mount(&rt, "w-patch-read", &["--part-size", "5M"]);
    let mut model = pattern(12 << 20, 13);
    rt.block_on(m.put("big", &model, &[]));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("big"))
        .unwrap();
    f.write_all_at(b"patch", 100).unwrap();
    model[100..105].copy_from_slice(b"patch");
    f.sync_all().unwrap();
    let mut back = vec![0u8; model.len()];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back == model, "read through the handle after fsync");
    close(f).unwrap();
    assert!(rt.block_on(m.get("big")) == model);
    assert!(
        fs::read(m.path("big")).unwrap() == model,
        "read after reopen"
    );
}

// ----- namespace: unlink, mkdir, rmdir, rename ---------------------------------------------

#[test]
fn unlink_deletes_the_object() {
    let rt = rt();
    let m = mount(&rt, "w-unlink", &[]);
    rt.block_on(m.put("gone", b"x", &[]));
    fs::remove_file(m.path("gone")).unwrap();
    assert!(!exists(&rt, &m, "gone"));
    assert_eq!(
        errno(&fs::metadata(m.path("gone")).unwrap_err()),
        libc::ENOENT
    );

    // A file unlinked while still being written never reaches the bucket.
    let mut f = File::create(m.path("tmp")).unwrap();
    f.write_all(&pattern(6 << 20, 7)).unwrap();
    fs::remove_file(m.path("tmp")).unwrap();
    f.write_all(b"more").unwrap();
    close(f).unwrap();
    assert!(!exists(&rt, &m, "tmp"));
    assert!(keys(&rt, &m, "").is_empty(), "nothing left in the bucket");
    assert!(!names(m.mnt.path()).contains("tmp"));
}

#[test]
fn mkdir_writes_a_marker_and_rmdir_refuses_non_empty() {
    let rt = rt();
    let m = mount(&rt, "w-mkdir", &[]);
    fs::DirBuilder::new()
        .mode(0o750)
        .create(m.path("d"))
        .unwrap();
    let info = rt.block_on(m.head("d/")).expect("dir/ marker");
    assert_eq!(info.size, 0);
    assert_eq!(
        info.content_type.as_deref(),
        Some("application/x-directory")
    );
    assert_eq!(info.metadata["mode"], mode_of(libc::S_IFDIR, 0o750));
    assert_eq!(
        fs::metadata(m.path("d")).unwrap().mode(),
        libc::S_IFDIR | 0o750
    );
    assert_eq!(
        errno(&fs::create_dir(m.path("d")).unwrap_err()),
        libc::EEXIST
    );

    fs::write(m.path("d/f"), b"child").unwrap();
    assert_eq!(
        errno(&fs::remove_dir(m.path("d")).unwrap_err()),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno(&fs::remove_dir(m.path("d/f")).unwrap_err()),
        libc::ENOTDIR
    );
    fs::remove_file(m.path("d/f")).unwrap();
    fs::remove_dir(m.path("d")).unwrap();
    assert!(keys(&rt, &m, "").is_empty(), "marker removed");
    assert!(!m.path("d").exists());

    // A directory that exists only as a prefix is not empty either.
    rt.block_on(m.put("implicit/child", b"", &[]));
    assert_eq!(
        errno(&fs::remove_dir(m.path("implicit")).unwrap_err()),
        libc::ENOTEMPTY
    );
    // Nested mkdir under an implicit directory.
    fs::create_dir_all(m.path("implicit/a/b")).unwrap();
    assert!(exists(&rt, &m, "implicit/a/"));
    assert!(exists(&rt, &m, "implicit/a/b/"));
}

#[test]
fn rename_file_copies_then_deletes_keeping_attributes() {
    let rt = rt();
    let m = mount(&rt, "w-rename", &[]);
    let data = pattern(70_000, 8);
    fs::write(m.path("a"), &data).unwrap();
    fs::set_permissions(m.path("a"), fs::Permissions::from_mode(0o600)).unwrap();
    setxattr(&m.path("a"), "user.tag", b"v1", 0).unwrap();
    fs::rename(m.path("a"), m.path("b")).unwrap();
    assert!(!exists(&rt, &m, "a"));
    assert!(rt.block_on(m.get("b")) == data);
    let md = meta(&rt, &m, "b");
    assert_eq!(md["mode"], mode_of(libc::S_IFREG, 0o600));
    assert!(md.contains_key("xattr"));
    assert!(!m.path("a").exists());
    assert!(fs::read(m.path("b")).unwrap() == data);
    assert_eq!(getxattr(&m.path("b"), "user.tag").unwrap(), b"v1");

    // Over an existing file: the target is replaced.
    fs::write(m.path("c"), b"old target").unwrap();
    fs::rename(m.path("b"), m.path("c")).unwrap();
    assert!(rt.block_on(m.get("c")) == data);
    assert!(!exists(&rt, &m, "b"));
    assert_eq!(names(m.mnt.path()), BTreeSet::from(["c".to_owned()]));

    // A file still being written is uploaded under its new name.
    let mut f = File::create(m.path("w1")).unwrap();
    f.write_all(b"in flight").unwrap();
    fs::rename(m.path("w1"), m.path("w2")).unwrap();
    f.write_all(b", then more").unwrap();
    close(f).unwrap();
    assert_eq!(rt.block_on(m.get("w2")), b"in flight, then more");
    assert!(!exists(&rt, &m, "w1"));

    // Into another directory.
    fs::create_dir(m.path("sub")).unwrap();
    fs::rename(m.path("c"), m.path("sub/c")).unwrap();
    assert!(rt.block_on(m.get("sub/c")) == data);
    assert!(!exists(&rt, &m, "c"));
}

#[test]
fn rename_noreplace_refuses_and_exchange_is_not_supported() {
    let rt = rt();
    let m = mount(&rt, "w-rename2", &[]);
    fs::write(m.path("x"), b"x").unwrap();
    fs::write(m.path("y"), b"y").unwrap();
    let err = renameat2(&m.path("x"), &m.path("y"), libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(errno(&err), libc::EEXIST);
    let err = renameat2(&m.path("x"), &m.path("y"), libc::RENAME_EXCHANGE).unwrap_err();
    assert_eq!(errno(&err), libc::EINVAL);
    assert_eq!(rt.block_on(m.get("x")), b"x");
    assert_eq!(rt.block_on(m.get("y")), b"y");
    renameat2(&m.path("x"), &m.path("z"), libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(rt.block_on(m.get("z")), b"x");
    assert!(!exists(&rt, &m, "x"));
}

#[test]
fn rename_directory_moves_every_key() {
    let rt = rt();
    let m = mount(&rt, "w-renamedir", &[]);
    fs::create_dir_all(m.path("d/sub")).unwrap();
    fs::write(m.path("d/x"), b"x").unwrap();
    fs::write(m.path("d/sub/y"), b"y").unwrap();
    symlink("x", &m.path("d/link"));
    rt.block_on(m.put("d/implicit/z", b"z", &[])); // written by another client
    fs::rename(m.path("d"), m.path("e")).unwrap();
    assert!(keys(&rt, &m, "d/").is_empty(), "old keys deleted");
    assert_eq!(
        keys(&rt, &m, "e/"),
        ["e/", "e/implicit/z", "e/link", "e/sub/", "e/sub/y", "e/x"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    assert_eq!(fs::read(m.path("e/sub/y")).unwrap(), b"y");
    assert_eq!(fs::read(m.path("e/implicit/z")).unwrap(), b"z");
    assert_eq!(fs::read_link(m.path("e/link")).unwrap(), Path::new("x"));
    assert!(!m.path("d").exists());

    // A directory that is only a prefix gets a marker at its new name.
    rt.block_on(m.put("i/f", b"f", &[]));
    fs::rename(m.path("i"), m.path("j")).unwrap();
    assert_eq!(
        keys(&rt, &m, "j"),
        ["j/", "j/f"].into_iter().map(String::from).collect()
    );
    assert!(keys(&rt, &m, "i").is_empty());

    // Over directories: an empty one is replaced, a non-empty one refused; never over a file.
    fs::create_dir(m.path("empty")).unwrap();
    fs::rename(m.path("j"), m.path("empty")).unwrap();
    assert_eq!(rt.block_on(m.get("empty/f")), b"f");
    assert_eq!(
        errno(&fs::rename(m.path("empty"), m.path("e")).unwrap_err()),
        libc::ENOTEMPTY
    );
    fs::write(m.path("file"), b"").unwrap();
    assert_eq!(
        errno(&fs::rename(m.path("empty"), m.path("file")).unwrap_err()),
        libc::ENOTDIR
    );
    assert_eq!(
        errno(&fs::rename(m.path("file"), m.path("empty")).unwrap_err()),
        libc::EISDIR
    );
}

#[test]
fn rename_directory_with_a_file_still_being_written() {
    let rt = rt();
    let m = mount(&rt, "w-renamedir-open", &[]);
    fs::create_dir(m.path("d")).unwrap();
    let mut f = File::create(m.path("d/f")).unwrap();
    f.write_all(b"before rename, ").unwrap();
    fs::rename(m.path("d"), m.path("e")).unwrap();
    f.write_all(b"after rename").unwrap();
    close(f).unwrap();
    assert_eq!(rt.block_on(m.get("e/f")), b"before rename, after rename");
    assert!(
        keys(&rt, &m, "d/").is_empty(),
        "nothing written under the old name"
    );
    assert_eq!(
        fs::read(m.path("e/f")).unwrap(),
        b"before rename, after rename"
    );
}

// ----- symlinks and attributes ---------------------------------------------------------------

fn symlink(target: &str, link: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

#[test]
fn symlink_is_an_object_holding_its_target() {
    let rt = rt();
    let m = mount(&rt, "w-symlink", &[]);
    fs::create_dir(m.path("dir")).unwrap();
    fs::write(m.path("dir/file"), b"content").unwrap();
    symlink("dir/file", &m.path("l"));
    symlink("../nowhere/at all", &m.path("dangling"));
    assert_eq!(rt.block_on(m.get("l")), b"dir/file");
    assert_eq!(rt.block_on(m.get("dangling")), b"../nowhere/at all");
    assert_eq!(meta(&rt, &m, "l")["mode"], mode_of(libc::S_IFLNK, 0o777));
    assert_eq!(fs::read_link(m.path("l")).unwrap(), Path::new("dir/file"));
    assert!(
        fs::symlink_metadata(m.path("l"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read(m.path("l")).unwrap(), b"content");
    assert_eq!(
        errno(&std::os::unix::fs::symlink("x", m.path("l")).unwrap_err()),
        libc::EEXIST
    );
}

#[test]
fn chmod_chown_and_utimens_are_stored_as_s3fs_metadata() {
    let rt = rt();
    let m = mount(&rt, "w-attrs", &[]);
    let p = m.path("f");
    fs::write(&p, b"data").unwrap();

    fs::set_permissions(&p, fs::Permissions::from_mode(0o4711)).unwrap();
    assert_eq!(meta(&rt, &m, "f")["mode"], mode_of(libc::S_IFREG, 0o4711));
    std::os::unix::fs::chown(&p, Some(1234), Some(5678)).unwrap();
    let md = meta(&rt, &m, "f");
    assert_eq!((md["uid"].as_str(), md["gid"].as_str()), ("1234", "5678"));
    // As on any Linux filesystem, chown clears the setuid bit; S3 says the same.
    assert_eq!(md["mode"], mode_of(libc::S_IFREG, 0o711));

    set_times(&p, (1_500_000_000, 0), (1_600_000_000, 0)).unwrap();
    let md = meta(&rt, &m, "f");
    assert_eq!(md["mtime"], "1600000000");
    assert_eq!(md["atime"], "1500000000");
    set_times(&p, (1_500_000_000, 0), (1_600_000_000, 500_000_000)).unwrap();
    // Nine digits, as s3fs writes them (it reads the fraction as nanoseconds).
    assert_eq!(meta(&rt, &m, "f")["mtime"], "1600000000.500000000");
    let st = fs::metadata(&p).unwrap();
    assert_eq!((st.mtime(), st.mtime_nsec()), (1_600_000_000, 500_000_000));
    assert_eq!((st.uid(), st.gid()), (1234, 5678));
    assert_eq!(st.mode() & 0o7777, 0o711);
    // The content is untouched by attribute changes.
    assert_eq!(rt.block_on(m.get("f")), b"data");

    // Directories keep their attributes on the marker; a prefix-only directory gets one.
    fs::create_dir(m.path("d")).unwrap();
    fs::set_permissions(m.path("d"), fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(meta(&rt, &m, "d/")["mode"], mode_of(libc::S_IFDIR, 0o700));
    rt.block_on(m.put("p/child", b"", &[]));
    std::os::unix::fs::chown(m.path("p"), Some(42), Some(43)).unwrap();
    let md = meta(&rt, &m, "p/");
    assert_eq!((md["uid"].as_str(), md["gid"].as_str()), ("42", "43"));
    set_times(&m.path("p"), (1_000, 0), (2_000, 0)).unwrap();
    assert_eq!(meta(&rt, &m, "p/")["mtime"], "2000");
}

#[test]
fn xattrs_are_stored_in_the_s3fs_header() {
    let rt = rt();
    let m = mount(&rt, "w-xattr", &[]);
    let p = m.path("f");
    fs::write(&p, b"x").unwrap();
    setxattr(&p, "user.a", b"bar", 0).unwrap();
    assert_eq!(
        meta(&rt, &m, "f")["xattr"],
        "%7B%22user.a%22%3A%22YmFy%22%7D"
    );
    setxattr(&p, "user.bin", &[0, 1, 2, 255], 0).unwrap();
    assert_eq!(getxattr(&p, "user.a").unwrap(), b"bar");
    assert_eq!(getxattr(&p, "user.bin").unwrap(), [0, 1, 2, 255]);
    assert_eq!(
        listxattr(&p).unwrap(),
        BTreeSet::from(["user.a".to_owned(), "user.bin".to_owned()])
    );
    assert_eq!(
        errno(&setxattr(&p, "user.a", b"x", libc::XATTR_CREATE).unwrap_err()),
        libc::EEXIST
    );
    assert_eq!(
        errno(&setxattr(&p, "user.new", b"x", libc::XATTR_REPLACE).unwrap_err()),
        libc::ENODATA
    );
    setxattr(&p, "user.a", b"baz", libc::XATTR_REPLACE).unwrap();
    assert_eq!(getxattr(&p, "user.a").unwrap(), b"baz");

    removexattr(&p, "user.a").unwrap();
    removexattr(&p, "user.bin").unwrap();
    assert!(!meta(&rt, &m, "f").contains_key("xattr"));
    assert_eq!(errno(&getxattr(&p, "user.a").unwrap_err()), libc::ENODATA);
    assert_eq!(
        errno(&removexattr(&p, "user.a").unwrap_err()),
        libc::ENODATA
    );
    assert!(listxattr(&p).unwrap().is_empty());

    // A POSIX ACL and any other system or security attribute: not supported.
    let acl = posix_acl_rw_r_r();
    for name in [
        "system.posix_acl_access",
        "system.other",
        "security.selinux",
    ] {
        let err = setxattr(&p, name, &acl, 0).unwrap_err();
        assert_eq!(errno(&err), libc::EOPNOTSUPP, "{name}");
    }
    assert!(!meta(&rt, &m, "f").contains_key("xattr"));

    // S3 keeps 2 KiB of user metadata per object: more is refused, not truncated.
    let err = setxattr(&p, "user.big", &[b'v'; 3000], 0).unwrap_err();
    assert_eq!(errno(&err), libc::ENOSPC);
    assert!(!meta(&rt, &m, "f").contains_key("xattr"));

    // On a directory, and on a file being written (stored with its data at close).
    fs::create_dir(m.path("d")).unwrap();
    setxattr(&m.path("d"), "user.d", b"dir", 0).unwrap();
    assert!(meta(&rt, &m, "d/").contains_key("xattr"));
    let mut f = File::create(m.path("w")).unwrap();
    f.write_all(b"w").unwrap();
    setxattr(&m.path("w"), "user.w", b"1", 0).unwrap();
    close(f).unwrap();
    assert_eq!(rt.block_on(m.get("w")), b"w");
    assert!(meta(&rt, &m, "w").contains_key("xattr"));
    assert_eq!(
        content_of_xattr(&meta(&rt, &m, "w")),
        "{\"user.w\":\"MQ==\"}"
    );
}

/// The POSIX ACL `u::rw-, g::r--, o::r--` as the kernel takes it.
fn posix_acl_rw_r_r() -> Vec<u8> {
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm) in [(0x01u16, 6u16), (0x04, 4), (0x20, 4)] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&u32::MAX.to_le_bytes());
    }
    acl
}

/// `system.` and `security.` attributes another client stored: neither shown nor settable
/// (a file capability from a bucket would be a privilege anyone able to write the object could
/// grant), kept in the header when s3vol rewrites it. "Not supported", not "no such
/// attribute", is what makes `ls -l` stop asking every entry for them.
#[test]
fn system_and_security_attributes_are_refused_and_kept_unseen() {
    let rt = rt();
    let m = mount(&rt, "w-xattr-ns", &[]);
    let stored = "%7B%22security.capability%22%3A%22AQ%3D%3D%22%2C\
                  %22system.posix_acl_access%22%3A%22Ag%3D%3D%22%2C%22user.a%22%3A%22YmFy%22%7D";
    rt.block_on(m.put("f", b"x", &[("mode", "33261"), ("xattr", stored)]));
    let p = m.path("f");
    assert_eq!(
        listxattr(&p).unwrap(),
        BTreeSet::from(["user.a".to_owned()])
    );
    assert_eq!(getxattr(&p, "user.a").unwrap(), b"bar");
    for name in [
        "security.capability",
        "security.selinux",
        "system.posix_acl_access",
        "system.posix_acl_default",
    ] {
        let err = getxattr(&p, name).unwrap_err();
        assert_eq!(errno(&err), libc::EOPNOTSUPP, "get {name}");
        // The kernel checks the form of a capability or an ACL before asking the filesystem.
        let value = match name {
            "security.capability" => [2u32 << 24, 1 << 12, 0, 0, 0]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect(),
            "security.selinux" => b"v".to_vec(),
            _ => posix_acl_rw_r_r(),
        };
        // The kernel answers for a default ACL on a file itself.
        if name == "system.posix_acl_default" {
            continue;
        }
        let err = setxattr(&p, name, &value, 0).unwrap_err();
        assert_eq!(errno(&err), libc::EOPNOTSUPP, "set {name}");
        let err = removexattr(&p, name).unwrap_err();
        assert_eq!(errno(&err), libc::EOPNOTSUPP, "remove {name}");
    }
    assert_eq!(
        meta(&rt, &m, "f")["xattr"],
        stored,
        "a refused call changes nothing"
    );

    // A rewrite of the header by s3vol keeps what it does not show.
    setxattr(&p, "user.b", b"1", 0).unwrap();
    assert_eq!(
        content_of_xattr(&meta(&rt, &m, "f")),
        "{\"security.capability\":\"AQ==\",\"system.posix_acl_access\":\"Ag==\",\
         \"user.a\":\"YmFy\",\"user.b\":\"MQ==\"}"
    );
    assert_eq!(
        listxattr(&p).unwrap(),
        BTreeSet::from(["user.a".to_owned(), "user.b".to_owned()])
    );
}

fn content_of_xattr(md: &UserMetadata) -> String {
    let raw = &md["xattr"];
    let mut out = Vec::new();
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

// ----- unsupported and special calls ---------------------------------------------------------

#[test]
fn unsupported_calls_fail_with_a_clear_errno() {
    let rt = rt();
    let m = mount(&rt, "w-unsupported", &[]);
    fs::write(m.path("f"), b"f").unwrap();

    let err = fs::hard_link(m.path("f"), m.path("hard")).unwrap_err();
    assert_eq!(errno(&err), libc::EPERM, "hard links");
    assert!(!exists(&rt, &m, "hard"));

    for (kind, what) in [
        (libc::S_IFIFO, "fifo"),
        (libc::S_IFCHR, "char device"),
        (libc::S_IFSOCK, "socket"),
    ] {
        let c = cpath(&m.path(what));
        // SAFETY: a valid path.
        let err = check(unsafe { libc::mknod(c.as_ptr(), kind | 0o644, 0) }).unwrap_err();
        assert_eq!(errno(&err), libc::EPERM, "mknod {what}");
    }
    // mknod of a regular file makes an empty object at once.
    let c = cpath(&m.path("plain"));
    // SAFETY: a valid path.
    check(unsafe { libc::mknod(c.as_ptr(), libc::S_IFREG | 0o600, 0) }).unwrap();
    assert_eq!(rt.block_on(m.get("plain")), b"");
    assert_eq!(
        meta(&rt, &m, "plain")["mode"],
        mode_of(libc::S_IFREG, 0o600)
    );

    // Names S3 cannot hold as one path segment, or that are not UTF-8.
    let long = "n".repeat(256);
    assert_eq!(
        errno(&fs::write(m.path(&long), b"").unwrap_err()),
        libc::ENAMETOOLONG
    );
    let latin1 = m.mnt.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    assert_eq!(errno(&fs::write(&latin1, b"").unwrap_err()), libc::EINVAL);
    assert_eq!(errno(&fs::create_dir(&latin1).unwrap_err()), libc::EINVAL);

    // statfs reports a large, constant capacity.
    // SAFETY: statvfs is plain data; all zeros is a valid value.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    let c = cpath(m.mnt.path());
    // SAFETY: a valid path and a statvfs to fill.
    check(unsafe { libc::statvfs(c.as_ptr(), &mut sv) }).unwrap();
    assert!(sv.f_bavail as u64 * sv.f_frsize as u64 >= 1 << 50);
    assert_eq!(sv.f_namemax, 255);

    // fallocate is not implemented (posix_fallocate falls back to writing zeros).
    let f = OpenOptions::new().write(true).open(m.path("f")).unwrap();
    // SAFETY: a valid descriptor.
    let err = check(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 1 << 20) }).unwrap_err();
    assert_eq!(errno(&err), libc::EOPNOTSUPP, "fallocate");
    close(f).unwrap();

    // Locks are local to the mount: they work, and S3 knows nothing of them.
    let f = File::open(m.path("f")).unwrap();
    // SAFETY: a valid descriptor.
    check(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }).unwrap();
    let g = File::open(m.path("f")).unwrap();
    // SAFETY: a valid descriptor.
    let err =
        check(unsafe { libc::flock(g.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }).unwrap_err();
    assert_eq!(errno(&err), libc::EWOULDBLOCK);
    // Open-file-description (fcntl) locks too.
    // SAFETY: flock is plain data; all zeros is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    let (f, g) = (
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path("f"))
            .unwrap(),
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.path("f"))
            .unwrap(),
    );
    // SAFETY: valid descriptors and a flock struct.
    check(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &lock) }).unwrap();
    // SAFETY: as above.
    let err = check(unsafe { libc::fcntl(g.as_raw_fd(), libc::F_OFD_SETLK, &lock) }).unwrap_err();
    assert_eq!(errno(&err), libc::EAGAIN);
}

#[test]
fn o_direct_writes_reach_s3_at_close() {
    let rt = rt();
    let m = mount(&rt, "w-odirect", &[]);
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.path("direct"))
        .unwrap();
    // O_DIRECT wants aligned buffers: a 4 KiB-aligned slice of a bigger allocation.
    let mut buf = vec![0u8; 3 * 4096];
    let start = buf.as_ptr().align_offset(4096);
    let data = pattern(8192, 12);
    buf[start..start + 8192].copy_from_slice(&data);
    f.write_all_at(&buf[start..start + 8192], 0).unwrap();
    close(f).unwrap();
    assert!(rt.block_on(m.get("direct")) == data);
}

#[test]
fn shared_mmap_writes_reach_s3_at_msync_and_close() {
    let rt = rt();
    let m = mount(&rt, "w-mmap", &[]);
    rt.block_on(m.put("m", &[b'.'; 8192], &[]));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("m"))
        .unwrap();
    // SAFETY: mapping 8 KiB of an open 8 KiB file; unmapped below before the file is closed.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED, "{}", io::Error::last_os_error());
    // SAFETY: the mapping is 8 KiB long and writable.
    unsafe {
        std::ptr::copy_nonoverlapping(b"mapped".as_ptr(), ptr.cast::<u8>().add(4096), 6);
        check(libc::msync(ptr, 8192, libc::MS_SYNC)).unwrap();
    }
    let mut want = vec![b'.'; 8192];
    want[4096..4102].copy_from_slice(b"mapped");
    assert!(
        rt.block_on(m.get("m")) == want,
        "msync(MS_SYNC) is an fsync"
    );
    // SAFETY: the mapping made above, 8 KiB long.
    unsafe {
        std::ptr::copy_nonoverlapping(b"again".as_ptr(), ptr.cast::<u8>(), 5);
        check(libc::munmap(ptr, 8192)).unwrap();
    }
    close(f).unwrap();
    want[..5].copy_from_slice(b"again");
    assert!(rt.block_on(m.get("m")) == want, "written back by close");
}

#[test]
fn attributes_of_the_bucket_root_are_refused_and_unchanged() {
    let rt = rt();
    // No attribute caching, so what is seen afterwards is what the filesystem holds.
    let m = mount(&rt, "w-root-attrs", &["--metadata-ttl", "0"]);
    let root = m.mnt.path();
    let err = fs::set_permissions(root, fs::Permissions::from_mode(0o700)).unwrap_err();
    assert_eq!(errno(&err), libc::EPERM, "chmod of the bucket root");
    let err = std::os::unix::fs::chown(root, Some(1234), None).unwrap_err();
    assert_eq!(errno(&err), libc::EPERM, "chown of the bucket root");
    let err = setxattr(root, "user.x", b"1", 0).unwrap_err();
    assert_eq!(errno(&err), libc::EPERM, "setxattr on the bucket root");
    let st = fs::metadata(root).unwrap();
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    assert_eq!((st.mode() & 0o7777, st.uid()), (0o755, uid));
    assert_eq!(errno(&getxattr(root, "user.x").unwrap_err()), libc::ENODATA);
    assert!(
        keys(&rt, &m, "").is_empty(),
        "nothing written to the bucket"
    );
}

#[test]
fn without_xattrs_the_kernel_stops_asking_and_stored_ones_survive() {
    let rt = rt();
    let m = mount(&rt, "w-noxattr", &["--no-xattr"]);
    let stored = "%7B%22user.a%22%3A%22YmFy%22%7D";
    rt.block_on(m.put("f", b"x", &[("mode", "33188"), ("xattr", stored)]));
    let p = m.path("f");
    assert_eq!(
        errno(&getxattr(&p, "user.a").unwrap_err()),
        libc::EOPNOTSUPP
    );
    assert_eq!(errno(&listxattr(&p).unwrap_err()), libc::EOPNOTSUPP);
    assert_eq!(
        errno(&setxattr(&p, "user.b", b"v", 0).unwrap_err()),
        libc::EOPNOTSUPP
    );
    // Rewriting the metadata keeps what other clients stored.
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    let after = meta(&rt, &m, "f");
    assert_eq!(after["mode"], (libc::S_IFREG | 0o600).to_string());
    assert_eq!(after["xattr"], stored);
}
