//! `s3vol mount` writes checked against models: random operation sequences against an
//! in-memory copy of the file, concurrent writers and readers, and a tree written by one mount
//! read back by a fresh one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mount.rs"]
mod support;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::{Mounted, close, pattern};
use tokio::runtime::Runtime;

fn rt() -> Runtime {
    // SAFETY: umask has no preconditions; modes below are compared exactly.
    unsafe { libc::umask(0o022) };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

// ----- random operation sequences against a model --------------------------------------------

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Files stay under this size so a case stays quick; with `--part-size 5M` that is still
/// enough for streamed uploads, multipart uploads with server-side part copies, and ranged
/// fills of a staged object.
const MAX_SIZE: u64 = 12 * MIB;

#[derive(Clone, Debug)]
enum Op {
    /// pwrite of `len` bytes at `at`‰ of (size + 64 KiB): inside, at the end or past it.
    Write { at: u32, len: usize, seed: u64 },
    /// A sequential write at the end (a stream when the file started empty).
    Append { len: usize, seed: u64 },
    /// ftruncate to `at`‰ of (2 × size + 64 KiB), capped.
    SetLen { at: u32 },
    /// Read `len` bytes at `at`‰ of the size and compare with the model.
    Read { at: u32, len: usize },
    /// close (checked against S3), then open again; with `trunc`, O_TRUNC.
    Reopen { trunc: bool },
    /// fsync (checked against S3); the handle stays open.
    Fsync,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..=1000, 1usize..64 << 10, any::<u64>())
            .prop_map(|(at, len, seed)| Op::Write { at, len, seed }),
        2 => (1usize..3 << 20, any::<u64>()).prop_map(|(len, seed)| Op::Append { len, seed }),
        1 => (0u32..=1000).prop_map(|at| Op::SetLen { at }),
        2 => (0u32..=1000, 1usize..256 << 10).prop_map(|(at, len)| Op::Read { at, len }),
        2 => prop_oneof![4 => Just(false), 1 => Just(true)].prop_map(|trunc| Op::Reopen { trunc }),
        1 => Just(Op::Fsync),
    ]
}

/// The object the file starts from: none (a new file), or one written to S3 directly.
fn initial() -> impl Strategy<Value = Option<(u64, u64)>> {
    prop_oneof![
        1 => Just(None),
        1 => (0u64..64 * KIB, any::<u64>()).prop_map(Some),
        1 => (5 * MIB..11 * MIB, any::<u64>()).prop_map(Some),
    ]
}

fn frac(at: u32, of: u64) -> u64 {
    of * u64::from(at) / 1000
}

fn open_rw(path: &Path, trunc: bool) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(trunc)
        .open(path)
        .unwrap()
}

/// Applies `ops` to one file of the mount and to a Vec<u8>, comparing them through the mount
/// after every step and in S3 after every close.
fn run_case(
    rt: &Runtime,
    m: &Mounted,
    name: &str,
    start: Option<(u64, u64)>,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let path = m.path(name);
    let mut model = match start {
        Some((len, seed)) => {
            let body = pattern(len as usize, seed);
            rt.block_on(m.put(name, &body, &[]));
            body
        }
        None => Vec::new(),
    };
    let s3_matches = |model: &[u8]| -> Result<(), TestCaseError> {
        let got = rt.block_on(m.get(name));
        prop_assert_eq!(got.len(), model.len(), "S3 size");
        prop_assert!(got == model, "S3 content differs from the model");
        Ok(())
    };
    let mut f = open_rw(&path, false);
    for (i, op) in ops.iter().enumerate() {
        let size = model.len() as u64;
        match op {
            Op::Write { at, len, seed } => {
                let off = frac(*at, size + 64 * KIB).min(MAX_SIZE);
                let data = pattern(*len, *seed);
                f.write_all_at(&data, off).unwrap();
                let end = off as usize + data.len();
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
            }
            Op::Append { len, seed } => {
                let len = (*len as u64).min(MAX_SIZE.saturating_sub(size)) as usize;
                let data = pattern(len, *seed);
                for (k, c) in data.chunks(1 << 20).enumerate() {
                    f.write_all_at(c, size + (k << 20) as u64).unwrap();
                }
                model.extend_from_slice(&data);
            }
            Op::SetLen { at } => {
                let n = frac(*at, 2 * size + 64 * KIB).min(MAX_SIZE);
                f.set_len(n).unwrap();
                model.resize(n as usize, 0);
            }
            Op::Read { at, len } => {
                let off = frac(*at, size);
                let want = &model[off as usize..(off as usize + len).min(model.len())];
                let mut got = vec![0u8; want.len()];
                f.read_exact_at(&mut got, off).unwrap();
                prop_assert!(got == want, "op {}: read at {} differs", i, off);
            }
            Op::Fsync => {
                f.sync_all()
                    .map_err(|e| TestCaseError::fail(format!("op {i}: fsync: {e}")))?;
                s3_matches(&model)?;
            }
            Op::Reopen { trunc } => {
                close(f).map_err(|e| TestCaseError::fail(format!("op {i}: close: {e}")))?;
                s3_matches(&model)?;
                f = open_rw(&path, *trunc);
                if *trunc {
                    model.clear();
                }
            }
        }
        prop_assert_eq!(
            f.metadata().unwrap().len(),
            model.len() as u64,
            "op {}: size",
            i
        );
    }
    let mut whole = Vec::new();
    File::open(&path).unwrap().read_to_end(&mut whole).unwrap();
    prop_assert!(
        whole == model,
        "content through the mount differs before close"
    );
    close(f).map_err(|e| TestCaseError::fail(format!("final close: {e}")))?;
    s3_matches(&model)?;
    let mut whole = Vec::new();
    File::open(&path).unwrap().read_to_end(&mut whole).unwrap();
    prop_assert!(
        whole == model,
        "content through the mount differs after close"
    );
    Ok(())
}

#[test]
fn random_write_sequences_match_an_in_memory_model() {
    let rt = rt();
    let m = rt.block_on(Mounted::new("wm-model", "", &["--part-size", "5M"]));
    let mut runner = TestRunner::new(Config {
        cases: 16,
        max_shrink_iters: 48,
        max_shrink_time: 120_000,
        failure_persistence: None,
        ..Config::default()
    });
    let n = AtomicU32::new(0);
    let strategy = (initial(), prop::collection::vec(op(), 1..=12));
    let result = runner.run(&strategy, |(start, ops)| {
        let name = format!("case-{}", n.fetch_add(1, Ordering::Relaxed));
        run_case(&rt, &m, &name, start, &ops)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ----- concurrency ---------------------------------------------------------------------------

#[test]
fn concurrent_writers_and_readers_each_see_whole_files() {
    let rt = rt();
    let m = rt.block_on(Mounted::new("wm-concurrent", "", &[]));
    let shared = pattern(4 << 20, 77);
    rt.block_on(m.put("shared", &shared, &[]));
    let writers: Vec<_> = (0..4u64)
        .map(|i| {
            let path = m.path(&format!("w{i}"));
            std::thread::spawn(move || {
                let data = pattern(3 << 20, i);
                let mut f = File::create(&path).unwrap();
                for c in data.chunks(256 << 10) {
                    f.write_all(c).unwrap();
                }
                // And a patch out of order, so some go through staging and some stream.
                if i % 2 == 1 {
                    f.write_all_at(b"patch", 1000).unwrap();
                }
                close(f).map_err(|e| format!("close w{i}: {e}"))
            })
        })
        .collect();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let path = m.path("shared");
            let want = shared.clone();
            std::thread::spawn(move || {
                for _ in 0..4 {
                    let got = fs::read(&path).unwrap();
                    assert!(got == want, "a reader saw a torn or wrong shared file");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap().unwrap();
    }
    for r in readers {
        r.join().unwrap();
    }
    for i in 0..4u64 {
        let mut want = pattern(3 << 20, i);
        if i % 2 == 1 {
            want[1000..1005].copy_from_slice(b"patch");
        }
        let name = format!("w{i}");
        assert!(rt.block_on(m.get(&name)) == want, "{name} in S3");
        assert!(
            fs::read(m.path(&name)).unwrap() == want,
            "{name} through the mount"
        );
    }
}

// ----- a tree read back by a fresh mount --------------------------------------------------------

#[derive(Debug, PartialEq)]
struct Node {
    kind: &'static str,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    target: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
    content: Option<Vec<u8>>,
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = cpath(p);
    let mut names = vec![0u8; 4096];
    // SAFETY: valid path and buffer.
    let n = unsafe { libc::listxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(
        n >= 0,
        "listxattr {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
    names.truncate(n as usize);
    let mut out = BTreeMap::new();
    for name in names.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 4096];
        // SAFETY: valid strings and buffer.
        let len =
            unsafe { libc::getxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(len >= 0);
        v.truncate(len as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    out
}

fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let st = fs::symlink_metadata(&p).unwrap();
            let ft = st.file_type();
            let kind = if ft.is_symlink() {
                "symlink"
            } else if ft.is_dir() {
                todo.push(p.clone());
                "dir"
            } else {
                "file"
            };
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            out.insert(
                rel,
                Node {
                    kind,
                    size: if ft.is_dir() { 0 } else { st.len() },
                    mode: st.mode(),
                    uid: st.uid(),
                    gid: st.gid(),
                    mtime: (st.mtime(), st.mtime_nsec()),
                    target: ft.is_symlink().then(|| fs::read_link(&p).unwrap()),
                    xattrs: if ft.is_symlink() {
                        BTreeMap::new()
                    } else {
                        xattrs(&p)
                    },
                    content: ft.is_file().then(|| fs::read(&p).unwrap()),
                },
            );
        }
    }
    out
}

fn set_mtime(p: &Path, secs: i64, nsec: i64) {
    let ts = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        },
    ];
    let c = cpath(p);
    // SAFETY: a valid path and two timespecs.
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) },
        0
    );
}

fn setxattr(p: &Path, name: &str, value: &[u8]) {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: valid strings and buffer.
    let rc = unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr: {}", io::Error::last_os_error());
}

#[test]
fn tree_written_by_s3vol_reads_back_identically_in_a_fresh_mount() {
    let rt = rt();
    let mut a = rt.block_on(Mounted::new("wm-tree", "", &[]));
    let p = |rel: &str| a.path(rel);
    fs::DirBuilder::new().mode(0o750).create(p("proj")).unwrap();
    fs::create_dir_all(p("proj/src")).unwrap();
    fs::create_dir(p("proj/empty")).unwrap();
    fs::create_dir(p("proj/data")).unwrap();
    fs::write(p("proj/src/main.rs"), b"fn main() {}\n").unwrap();
    set_mtime(&p("proj/src/main.rs"), 1_650_000_000, 250_000_000);
    setxattr(&p("proj/src/main.rs"), "user.lang", b"rust");
    let mut run = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(p("proj/run.sh"))
        .unwrap();
    run.write_all(b"#!/bin/sh\necho hi\n").unwrap();
    close(run).unwrap();
    fs::write(p("proj/data/blob"), pattern(2 << 20, 9)).unwrap();
    fs::set_permissions(p("proj/data/blob"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(p("proj/data/blob"), Some(1000), Some(1001)).unwrap();
    fs::write(p("proj/data/zero"), b"").unwrap();
    std::os::unix::fs::symlink("src/main.rs", p("proj/link")).unwrap();
    std::os::unix::fs::symlink("/absolute/elsewhere", p("proj/data/abs")).unwrap();
    setxattr(&p("proj/empty"), "user.why", b"placeholder");
    set_mtime(&p("proj/empty"), 1_000_000_000, 0);
    fs::write(p("top.txt"), b"top").unwrap();
    fs::rename(p("top.txt"), p("renamed.txt")).unwrap();

    let before = snapshot(a.mnt.path());
    assert_eq!(before.len(), 11, "{:#?}", before.keys());
    let (status, stderr) = a.stop();
    assert!(status.success(), "{stderr}");

    let b = Mounted::on(a.store.clone(), a.bucket.clone(), "", &[]);
    let after = snapshot(b.mnt.path());
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    for (name, node) in &before {
        assert_eq!(&after[name], node, "{name} differs in a fresh mount");
    }
}
