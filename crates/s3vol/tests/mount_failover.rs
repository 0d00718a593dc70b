//! A mount outlives the process that serves it: the serving process of a supervised
//! `s3vol mount` is killed with SIGKILL again and again while applications work on the
//! mount, and they see no error, no lost byte and no stall over a few seconds.
//!
//! Real FUSE mounts of the real binary against the test S3 server; each test has its own
//! bucket and mount point, and the harness unmounts and kills what it started even when a
//! test fails. Every loop is bounded in time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/mount.rs"]
mod support;
#[path = "support/workload.rs"]
mod workload;

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxy::Proxy;
use support::{Mounted, errno, free_port, pattern, wait_gauge};
use workload::{Record, metadata_loop, open_reader, open_writer, percentile};

/// The serving process of a supervised mount: the supervisor's only child. `children` lists
/// the children each thread started, so every thread of the supervisor is read (a successor
/// is started by whichever thread saw its predecessor die).
fn serving_pid(supervisor: u32) -> Option<u32> {
    let tasks = fs::read_dir(format!("/proc/{supervisor}/task")).ok()?;
    tasks.flatten().find_map(|t| {
        let children = fs::read_to_string(t.path().join("children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    })
}

fn alive(pid: u32) -> bool {
    // A zombie is as good as gone: read its state.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// Waits (bounded) for a serving process other than `old` to run under `supervisor`.
fn wait_for_successor(supervisor: u32, old: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(pid) = serving_pid(supervisor)
            && pid != old
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no successor of serving process {old} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads the mount's stderr as it comes (a supervised mount logs every restart; a pipe
/// nobody reads would fill and block the serving process), keeping it for the failure message.
fn drain_log(m: &mut Mounted) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let mut err = m.child.as_mut().unwrap().stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    log
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_kills_of_the_serving_process_cost_the_applications_nothing() {
    let mut m = Mounted::new_unmounted("failover").await;
    let ro = pattern(1 << 20, 77);
    m.put("ro.bin", &ro, &[]).await;
    m.start_supervised(&[]);
    let log = drain_log(&mut m);
    let supervisor = m.pid();
    let first = wait_for_successor(supervisor, 0);

    let stop = Arc::new(AtomicBool::new(false));
    let rec = Arc::new(Mutex::new(Record::default()));
    let root = m.mnt.path().to_path_buf();
    let meta = {
        let (root, stop, rec) = (root.clone(), stop.clone(), rec.clone());
        std::thread::spawn(move || metadata_loop(root, stop, rec))
    };
    let writer = {
        let (p, stop, rec) = (root.join("open-writer.bin"), stop.clone(), rec.clone());
        std::thread::spawn(move || open_writer(p, stop, rec))
    };
    let reader = {
        let (p, stop, rec, want) = (root.join("ro.bin"), stop.clone(), rec.clone(), ro.clone());
        std::thread::spawn(move || open_reader(p, want, stop, rec))
    };

    let mut pids = vec![first];
    let mut takeovers = Vec::new();
    let mut pid = first;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(600));
        let killed_at = Instant::now();
        // SAFETY: kill(2) of a process this test started (through the supervisor).
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        pid = wait_for_successor(supervisor, pid);
        takeovers.push(killed_at.elapsed());
        pids.push(pid);
        workload::wait_for_takeovers(
            || log.lock().unwrap().clone(),
            "took over the connection of a serving process that died",
            pids.len() - 1,
        );
    }
    std::thread::sleep(Duration::from_millis(600));
    stop.store(true, Ordering::Relaxed);
    // Bounded: a call that never returns fails the test here, not by hanging it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(meta.is_finished() && writer.is_finished() && reader.is_finished()) {
        if Instant::now() > deadline {
            let stuck = [
                ("metadata loop", meta.is_finished()),
                ("writer", writer.is_finished()),
                ("reader", reader.is_finished()),
            ];
            m.stop();
            let log = log.lock().unwrap();
            let tail = log.get(log.len().saturating_sub(20_000)..).unwrap_or(&log);
            panic!("an application call hung after the kills: {stuck:?}; mount log:\n{tail}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let expect = meta.join().unwrap();
    let written = writer.join().unwrap();
    reader.join().unwrap();

    let rec = std::mem::take(&mut *rec.lock().unwrap());
    let mut lat = rec.latencies.clone();
    lat.sort();
    println!(
        "{} application calls over 20 kills: p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}; successor started (kill to new pid) p50 {:?} max {:?}",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
        lat.last().copied().unwrap_or_default(),
        {
            let mut t = takeovers.clone();
            t.sort();
            percentile(&t, 0.5)
        },
        takeovers.iter().max().copied().unwrap_or_default(),
    );
    if !rec.errors.is_empty() {
        let log = log.lock().unwrap();
        let tail = log.get(log.len().saturating_sub(30_000)..).unwrap_or(&log);
        panic!("application errors: {:#?}\nmount log:\n{tail}", rec.errors);
    }
    assert!(
        expect.len() >= 20,
        "the loop made only {} rounds",
        expect.len()
    );
    assert!(
        written.len() > 100_000,
        "the writer wrote only {} bytes",
        written.len()
    );
    let worst = lat.last().copied().unwrap_or_default();
    assert!(worst < Duration::from_secs(5), "a call stalled {worst:?}");

    // The bucket holds what the applications made, and nothing they removed.
    let got = workload::all_keys(&*m.store, &m.bucket).await;
    for (key, body) in &expect {
        assert!(got.contains(key), "{key} missing from the bucket");
        assert_eq!(&m.get(key).await, body, "{key} differs in the bucket");
    }
    let want = workload::expected_keys(&expect, &["ro.bin", "open-writer.bin"]);
    let extra: Vec<_> = got.difference(&want).collect();
    let missing: Vec<_> = want.difference(&got).collect();
    for key in extra.iter().chain(&missing) {
        let log = log.lock().unwrap();
        for line in log.lines().filter(|l| l.contains(&format!("\"{key}\""))) {
            println!("log about {key}: {line}");
        }
    }
    assert!(
        extra.is_empty() && missing.is_empty(),
        "the bucket holds other objects than the applications left: extra {extra:?}, missing {missing:?}"
    );
    assert_eq!(
        m.get("open-writer.bin").await,
        written,
        "the file open across the kills"
    );

    // Unmounting ends everything: the supervisor exits cleanly and no serving process stays.
    let (status, err) = m.stop();
    assert!(status.success(), "supervisor exited {status}: {err}");
    for p in pids {
        assert!(!alive(p), "serving process {p} still runs");
    }
}

#[tokio::test]
async fn sigterm_to_a_supervised_mount_uploads_an_open_file_and_ends_everything() {
    let mut m = Mounted::new_unmounted("failover-term").await;
    m.start_supervised(&[]);
    let supervisor = m.pid();
    let serving = wait_for_successor(supervisor, 0);
    let body = pattern(300_000, 5);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("open.bin"))
        .unwrap();
    f.write_all(&body).unwrap();
    // SAFETY: kill(2) of the supervisor this test started.
    assert_eq!(unsafe { libc::kill(supervisor as i32, libc::SIGTERM) }, 0);
    let child = m.child.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the supervisor did not exit at SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(f);
    assert!(status.success(), "exit status {status}");
    assert!(
        !alive(serving),
        "the serving process outlived its supervisor's SIGTERM"
    );
    assert_eq!(
        m.get("open.bin").await,
        body,
        "the open file was uploaded at SIGTERM"
    );
    m.child = None;
}

#[tokio::test]
async fn killing_the_supervisor_takes_its_serving_process_along() {
    let mut m = Mounted::new_unmounted("failover-sup").await;
    m.start_supervised(&[]);
    let supervisor = m.pid();
    let serving = wait_for_successor(supervisor, 0);
    m.child.as_mut().unwrap().kill().unwrap();
    m.child.as_mut().unwrap().wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(serving) {
        assert!(
            Instant::now() < deadline,
            "the serving process outlived its supervisor"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    m.child = None;
}

/// On kernels without `FUSE_NOTIFY_RESEND` (before Linux 6.9; taken here on any kernel by the
/// serving process's test switch) a call in flight when the serving process dies fails with
/// EIO instead of waiting forever, and the mount goes on serving.
#[test]
fn without_resend_a_call_in_flight_at_the_death_fails_with_eio_and_the_mount_goes_on() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let proxy = Proxy::start(&s3vol_s3::testing::endpoint());
    let mut m = rt.block_on(Mounted::new_unmounted("failover-eio"));
    let body = pattern(10_000, 9);
    rt.block_on(m.put("cold.bin", &body, &[]));
    m.start_supervised_via(&proxy.url(), &[], &[("S3VOL_FAILOVER_NO_RESEND", "1")]);
    let log = drain_log(&mut m);
    let supervisor = m.pid();
    let serving = wait_for_successor(supervisor, 0);
    // Served: the serving process answered INIT and made its start-up calls to S3, so what
    // hangs below is the read.
    fs::metadata(m.mnt.path()).unwrap();

    // A read of a file the mount has not seen: its lookup waits on S3, which hangs.
    proxy.set_hang(true);
    let (tx, rx) = std::sync::mpsc::channel();
    let path = m.path("cold.bin");
    std::thread::spawn(move || {
        let _ = tx.send(fs::read(path));
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.hung() == 0 {
        assert!(
            Instant::now() < deadline,
            "the read never reached S3: {}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) of the serving process this test's mount started.
    assert_eq!(unsafe { libc::kill(serving as i32, libc::SIGKILL) }, 0);
    proxy.set_hang(false);
    let successor = wait_for_successor(supervisor, serving);

    let result = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| {
            panic!(
                "the call in flight at the death had no answer 10 s later: {}",
                log.lock().unwrap()
            )
        });
    let err = result.expect_err("the read in flight at the death cannot have succeeded");
    assert_eq!(errno(&err), libc::EIO, "{err}");
    assert!(alive(successor), "the successor died");

    // The mount serves on: the same file reads whole, and a new file is created and kept.
    assert_eq!(fs::read(m.path("cold.bin")).unwrap(), body);
    fs::write(m.path("new.txt"), b"after the death").unwrap();
    assert_eq!(rt.block_on(m.get("new.txt")), b"after the death");
    let text = log.lock().unwrap().clone();
    let failed: u64 = text
        .split_once("failed=")
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        text.contains("the calls that were in flight got EIO") && failed >= 1,
        "the successor logs what it failed: {text}"
    );
    let (status, err) = m.stop();
    assert!(status.success(), "supervisor exited {status}: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_adopted_after_a_kill_are_let_go_of_when_the_kernel_forgets_them() {
    let mut m = Mounted::new_unmounted("failover-forget").await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    m.start_supervised(&["--metrics-addr", &addr]);
    let log = drain_log(&mut m);
    let supervisor = m.pid();
    let first = wait_for_successor(supervisor, 0);
    // Nodes the kernel holds: a directory and 200 files in it, each looked up.
    const FILES: usize = 200;
    fs::create_dir(m.path("d")).unwrap();
    for i in 0..FILES {
        fs::write(m.path(&format!("d/f{i}")), b"x").unwrap();
        fs::metadata(m.path(&format!("d/f{i}"))).unwrap();
    }
    // SAFETY: kill(2) of the serving process this test's supervisor started.
    assert_eq!(unsafe { libc::kill(first as i32, libc::SIGKILL) }, 0);
    let second = wait_for_successor(supervisor, first);
    assert!(fs::metadata(m.path("d/f0")).unwrap().is_file());
    let adopted = wait_gauge(port, "s3vol_nodes", |v| v >= FILES as f64);
    assert!(
        adopted.is_some_and(|v| v >= FILES as f64),
        "the successor ({second}) counts the nodes it adopted: {adopted:?}\n{}",
        log.lock().unwrap()
    );
    // The kernel lets go of the files' nodes (removed, so it evicts them at once): their
    // forgets carry the references from before the kill, and the successor drops them.
    for i in 0..FILES {
        fs::remove_file(m.path(&format!("d/f{i}"))).unwrap();
    }
    let left = wait_gauge(port, "s3vol_nodes", |v| v < 20.0);
    assert!(
        left.is_some_and(|v| v < 20.0),
        "nodes still held after the kernel forgot them: {left:?} (adopted {adopted:?})\n{}",
        log.lock().unwrap()
    );
    assert_eq!(serving_pid(supervisor), Some(second));
}

/// Kills the serving process under `supervisor` and waits for its successor to serve.
fn kill_and_wait(supervisor: u32, pid: u32, log: &Arc<Mutex<String>>, takeovers: usize) -> u32 {
    // SAFETY: kill(2) of a process this test started (through the supervisor).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let next = wait_for_successor(supervisor, pid);
    workload::wait_for_takeovers(
        || log.lock().unwrap().clone(),
        "took over the connection of a serving process that died",
        takeovers,
    );
    next
}

/// Bytes a supervised mount holds only in memory — a streamed file's part being filled and
/// parts still on their way to S3, a small file not yet closed — are in the part buffers'
/// memory file the supervisor holds, so a `kill -9` of the serving process loses none of
/// them: the successor moves them to the cache directory, then, as the application still has
/// the file open, back into part buffers of its own, and goes on in the same multipart
/// upload. No other client sees any of the file before its close, as without the kills; the
/// application's writes and close carry on as if nothing happened.
#[tokio::test(flavor = "multi_thread")]
async fn streamed_bytes_in_memory_survive_kills_of_the_serving_process() {
    let mut m = Mounted::new_unmounted("failover-stream").await;
    m.start_supervised(&["--part-size", "5M"]);
    let log = drain_log(&mut m);
    let supervisor = m.pid();
    let mut pid = wait_for_successor(supervisor, 0);
    let mut takeovers = 0;

    // Writes `body[..split]` to `key` through `open`'s handle, kills the serving process while
    // those bytes are only in a part buffer, checks that the successor did not put them in S3
    // (the object is still `before`), then writes the rest and closes: the object is `body`.
    let mut across = async |key: &str, open: &OpenOptions, body: &[u8], split: usize| {
        let before = m.get_opt(key).await;
        let mut f = open.open(m.path(key)).unwrap();
        f.write_all(&body[..split]).unwrap();
        assert!(
            m.get_opt(key).await == before,
            "{key} was not to be uploaded before the kill"
        );
        takeovers += 1;
        pid = kill_and_wait(supervisor, pid, &log, takeovers);
        assert!(
            m.get_opt(key).await == before,
            "{key} after the kill: no other client sees it before its close"
        );
        f.write_all(&body[split..]).unwrap();
        support::close(f).unwrap();
        assert!(m.get(key).await == body, "{key} after close");
    };
    // A small file, written and still open.
    across(
        "small.bin",
        OpenOptions::new().write(true).create_new(true),
        &pattern(300_000, 21),
        200_000,
    )
    .await;
    // An object overwritten (O_TRUNC): the successor knows the new bytes are newer than the
    // object they replace, and uploads them.
    m.put("over.bin", &pattern(500_000, 23), &[]).await;
    across(
        "over.bin",
        OpenOptions::new().write(true).truncate(true),
        &pattern(300_000, 24),
        100_000,
    )
    .await;

    // An object appended to in place (a staging file in the cache directory): left to its
    // handle too, and not uploaded before its close either.
    let old = pattern(200_000, 25);
    m.put("appended.bin", &old, &[]).await;
    let mut f = OpenOptions::new()
        .append(true)
        .open(m.path("appended.bin"))
        .unwrap();
    f.write_all(b"written before the kill; ").unwrap();
    takeovers += 1;
    pid = kill_and_wait(supervisor, pid, &log, takeovers);
    assert!(
        m.get("appended.bin").await == old,
        "appended.bin after the kill: still the object it was"
    );
    f.write_all(b"written after it").unwrap();
    support::close(f).unwrap();
    let mut want = old.clone();
    want.extend_from_slice(b"written before the kill; written after it");
    assert!(
        m.get("appended.bin").await == want,
        "appended.bin after close"
    );

    // A big file streamed in parts, killed three times while written.
    let big = pattern(48 << 20, 22);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.path("big.bin"))
        .unwrap();
    let mut kills_at = vec![13 << 20, 26 << 20, (37 << 20) + 12345];
    let mut at = 0;
    while at < big.len() {
        let n = (1 << 20).min(big.len() - at);
        let n = match kills_at.first() {
            Some(&k) if k > at => n.min(k - at),
            _ => n,
        };
        f.write_all(&big[at..at + n]).unwrap();
        at += n;
        if kills_at.first() == Some(&at) {
            kills_at.remove(0);
            takeovers += 1;
            pid = kill_and_wait(supervisor, pid, &log, takeovers);
            assert!(
                m.head("big.bin").await.is_none(),
                "big.bin is in S3 before its close (after {at} bytes and a kill)"
            );
        }
    }
    support::close(f).unwrap();
    let got = m.get("big.bin").await;
    assert_eq!(got.len(), big.len(), "big.bin's size");
    if got != big {
        let first = got.iter().zip(&big).position(|(a, b)| a != b);
        let text = log.lock().unwrap().clone();
        panic!("big.bin differs from what was written, first at {first:?}; log:\n{text}");
    }

    let text = log.lock().unwrap().clone();
    assert!(
        text.contains("moved to the cache directory"),
        "no part buffer was taken over:\n{text}"
    );
    assert_eq!(
        text.matches("goes on where it was").count(),
        takeovers - 1,
        "not every streamed file went on from its part buffers:\n{text}"
    );
    assert!(
        text.contains("goes on from what the cache directory kept of it"),
        "the appended file did not go on from its staging file:\n{text}"
    );
    for bad in [
        "are lost",
        "kept in the cache directory, not uploaded",
        "cannot be written",
    ] {
        assert!(!text.contains(bad), "the log says {bad:?}:\n{text}");
    }
    let (status, err) = m.stop();
    assert!(status.success(), "supervisor exited {status}: {err}");
}

/// A file open for writing across a kill whose bytes the successor cannot put in S3 at once
/// (S3 unreachable when it starts): the successor keeps them in the cache directory and the
/// file's handles go on from them — writes succeed as before, and the close that follows once
/// S3 is back puts every byte, before and after the kill, in the object.
#[test]
fn a_file_open_across_a_kill_while_s3_is_down_goes_on_from_the_kept_bytes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let proxy = Proxy::start(&s3vol_s3::testing::endpoint());
    let mut m = rt.block_on(Mounted::new_unmounted("failover-down"));
    let old = pattern(300_000, 41);
    rt.block_on(m.put("kept.bin", &old, &[]));
    m.start_supervised_via(&proxy.url(), &[], &[]);
    let log = drain_log(&mut m);
    let supervisor = m.pid();
    let pid = wait_for_successor(supervisor, 0);
    let mut f = OpenOptions::new()
        .append(true)
        .open(m.path("kept.bin"))
        .unwrap();
    f.write_all(b"written before the kill; ").unwrap();
    proxy.set_down(true);
    kill_and_wait(supervisor, pid, &log, 1);
    f.write_all(b"written after it").unwrap();
    proxy.set_down(false);
    support::close(f).unwrap();
    let mut want = old.clone();
    want.extend_from_slice(b"written before the kill; written after it");
    assert!(
        rt.block_on(m.get("kept.bin")) == want,
        "kept.bin is not what was written\n{}",
        log.lock().unwrap()
    );
    let text = log.lock().unwrap().clone();
    assert!(
        text.contains("goes on from what the cache directory kept of it"),
        "{text}"
    );
    let (status, err) = m.stop();
    assert!(status.success(), "supervisor exited {status}: {err}");
}

/// Runs `s3vol mount <args>` (as root) in a mount namespace of its own whose `/run` is
/// read-only, so the supervisor cannot make its session directory; then writes and reads a file
/// through the mount and unmounts it. Returns the exit status of the script and what it and
/// the mount printed.
fn mount_without_run(m: &Mounted, extra: &str) -> (bool, String) {
    let script = format!(
        "mount --make-rprivate / && mount -t tmpfs -o ro,size=1m none /run || exit 90\n\
         \"$0\" mount {target}/ {mnt} {server} --cache-dir {cache} -f {extra} 2>&1 &\n\
         pid=$!\n\
         for i in $(seq 200); do grep -q ' {mnt} ' /proc/self/mountinfo && break; kill -0 $pid 2>/dev/null || break; sleep 0.05; done\n\
         grep -q ' {mnt} ' /proc/self/mountinfo || {{ wait $pid; exit 91; }}\n\
         echo served-alone > {mnt}/alone.txt && cat {mnt}/alone.txt || exit 92\n\
         umount {mnt}; wait $pid",
        target = m.bucket,
        mnt = m.mnt.path().display(),
        cache = m.cache.path().display(),
        server = support::server_args().join(" "),
    );
    let out = support::s3vol_env(std::process::Command::new("unshare"))
        .args(["-m", "sh", "-c", &script, support::BIN])
        .env("S3VOL_LOG_LEVEL", "warn")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Supervision is the default as root, but a mount it cannot be set up for (here: no
/// writable `/run` for the session directory) is served by one process, with a warning that
/// says what that costs — and asked for with `--supervise`, that is an error instead.
#[tokio::test]
async fn a_mount_that_cannot_be_supervised_is_served_alone_unless_supervision_was_asked_for() {
    let m = Mounted::new_unmounted("unsupervised-fallback").await;
    let (ok, text) = mount_without_run(&m, "");
    assert!(ok, "{text}");
    assert!(text.contains("served-alone"), "{text}");
    assert!(
        text.contains("cannot hold the mount in a supervising process; serving it without one"),
        "{text}"
    );
    assert_eq!(m.get("alone.txt").await, b"served-alone\n");

    let m = Mounted::new_unmounted("unsupervised-refused").await;
    let (ok, text) = mount_without_run(&m, "--supervise");
    assert!(
        !ok,
        "--supervise must fail without a session directory\n{text}"
    );
    assert!(text.contains("/run/s3vol/sessions"), "{text}");
    assert!(m.head("alone.txt").await.is_none());
}

/// A successor's first listing of a directory does not wait for a HEAD of each subdirectory
/// the kernel holds from its predecessor: the kernel keeps the attributes it was given, for
/// their TTL, and the successor reads the markers right after its reply, so they are current
/// there before the kernel's copies grow old. Before, a successor HEADed every subdirectory
/// marker of a listed directory before answering, a stall that grew with the directory
/// (seconds for thousands of subdirectories).
#[test]
fn a_successors_listing_waits_for_no_head_of_what_the_kernel_holds() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let proxy = Proxy::start(&s3vol_s3::testing::endpoint());
    let mut m = rt.block_on(Mounted::new_unmounted("failover-ls"));
    for i in 0..40 {
        let mode = (libc::S_IFDIR | 0o750).to_string();
        let mtime = (1_600_000_000 + i).to_string();
        let meta = [("mode", mode.as_str()), ("uid", "1001"), ("mtime", &mtime)];
        rt.block_on(m.put(&format!("d{i:02}/"), b"", &meta));
    }
    rt.block_on(m.put("file", b"x", &[("mode", "33188"), ("uid", "1002")]));
    let ttl = 6;
    // Two attempts (the harness's) of 2 s: a listing that waited for a hung HEAD would fail.
    let args = ["--metadata-ttl", &ttl.to_string(), "--request-timeout", "2"];
    m.start_supervised_via(&proxy.url(), &args, &[]);
    let log = drain_log(&mut m);
    let supervisor = m.pid();
    let mut serving = wait_for_successor(supervisor, 0);

    let before = support::ls_ln(m.mnt.path());
    assert_eq!(before.len(), 41, "{before:?}");
    let (name, shown) = &before[3];
    assert_eq!(name, "d03");
    assert!(
        shown.starts_with("drwxr-x--- 1001 0 ") && shown.ends_with(" 1600000003"),
        "{shown}"
    );

    // S3 answers no HEAD: the successor's listing shows what the kernel holds all the same.
    serving = kill_and_wait(supervisor, serving, &log, 1);
    proxy.set_hang_heads(true);
    assert_eq!(
        support::ls_ln(m.mnt.path()),
        before,
        "listed without a HEAD"
    );
    proxy.set_hang_heads(false);

    // And with S3 answering, the markers are read after the reply, 40 HEADs of d*/.
    kill_and_wait(supervisor, serving, &log, 2);
    proxy.reset();
    assert_eq!(support::ls_ln(m.mnt.path()), before);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut read: Vec<String> = proxy
            .requests()
            .iter()
            .filter(|r| r.method() == "HEAD" && r.path().contains("/d"))
            .map(|r| r.path().to_owned())
            .collect();
        read.sort();
        read.dedup();
        if read.len() == 40 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "markers read after the listing: {read:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Once the kernel's copy is old, a change another client made shows.
    let mode = (libc::S_IFDIR | 0o700).to_string();
    rt.block_on(m.put("d03/", b"", &[("mode", &mode), ("uid", "1001")]));
    std::thread::sleep(Duration::from_secs(ttl) + Duration::from_millis(500));
    let now = support::ls_ln(m.mnt.path());
    assert_eq!(now[3].0, "d03");
    assert!(now[3].1.starts_with("drwx------ 1001"), "{:?}", now[3]);
    let (status, err) = m.stop();
    assert!(status.success(), "supervisor exited {status}: {err}");
}
