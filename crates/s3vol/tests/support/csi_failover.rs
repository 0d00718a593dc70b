//! A staged volume outlives its serving process (a submodule of the `csi` tests, using its
//! harness): the mounter keeps the FUSE connection and starts a successor when the serving
//! process dies without being asked — unless the volume says `failover: "false"`, and not
//! forever when successors cannot start.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::support::pattern;
use crate::workload::{self, Record};

/// Whether `pid` runs (a zombie does not: it only waits to be reaped).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// The live serving processes (`s3vol mount --fuse-fd …`) whose argv names `path`.
pub(super) fn serving(path: &Path) -> Vec<i32> {
    serving_where(|arg| arg == path.as_os_str().as_encoded_bytes())
}

/// The live serving processes with an argument that `matches`.
pub(super) fn serving_where(matches: impl Fn(&[u8]) -> bool) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
            args.contains(&&b"--fuse-fd"[..]) && args.iter().any(|a| matches(a)) && alive(pid)
        })
        .collect()
}

/// Waits (bounded) for one serving process of `staging` other than `old`.
fn wait_serving(h: &Harness, staging: &Path, old: Option<i32>) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = serving(staging);
        if let [pid] = now[..]
            && Some(pid) != old
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no serving process of {} other than {old:?} within 10 s (now {now:?})\n{}",
            staging.display(),
            h.csi_log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// How many descriptors the process `pid` holds.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The mounter and the node plugin hold no more descriptors than at `baseline` (waiting,
/// bounded, for the short-lived connections between them to close): replacing serving
/// processes leaks no pipe, socket or copy of the connection.
fn no_descriptor_leaked(h: &Harness, baseline: (usize, usize)) {
    let pids = (
        h.mounter.as_ref().unwrap().id(),
        h.csi.as_ref().unwrap().id(),
    );
    let now = || (open_fds(pids.0), open_fds(pids.1));
    let deadline = Instant::now() + Duration::from_secs(10);
    while (now().0 > baseline.0 || now().1 > baseline.1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (m, c) = now();
    assert!(
        m <= baseline.0 && c <= baseline.1,
        "descriptors of the mounter {} -> {m}, of the node plugin {} -> {c}",
        baseline.0,
        baseline.1
    );
}

/// The descriptors the mounter and the node plugin hold now.
fn fd_baseline(h: &Harness) -> (usize, usize) {
    (
        open_fds(h.mounter.as_ref().unwrap().id()),
        open_fds(h.csi.as_ref().unwrap().id()),
    )
}

fn kill9(pid: i32) {
    // SAFETY: kill(2) of a serving process this test's mounter started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
}

/// The `ready_ms=N` of each "took over" line of the mounter's log.
fn takeover_times(log: &str) -> Vec<Duration> {
    log.lines()
        .filter(|l| l.contains("the successor took over"))
        .filter_map(|l| {
            let rest = &l[l.find("ready_ms=")? + "ready_ms=".len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok().map(Duration::from_millis)
        })
        .collect()
}

/// An application load on a mounted volume through the events of a test: a loop of create /
/// rename / unlink / mkdir / ls, a writer that keeps one file open, a reader of a file
/// written before, and fio jobs that write files sequentially and at random and verify them.
struct Load {
    stop: Arc<AtomicBool>,
    rec: Arc<Mutex<Record>>,
    meta: std::thread::JoinHandle<Vec<(String, Vec<u8>)>>,
    writer: std::thread::JoinHandle<Vec<u8>>,
    reader: std::thread::JoinHandle<()>,
    fio: std::thread::JoinHandle<usize>,
    ro: Vec<u8>,
}

/// What the load did.
struct Done {
    expect: Vec<(String, Vec<u8>)>,
    written: Vec<u8>,
    ro: Vec<u8>,
    fio_runs: usize,
}

impl Load {
    fn start(target: &Path) -> Self {
        let ro = pattern(1 << 20, 77);
        std::fs::write(target.join("ro.bin"), &ro).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let rec = Arc::new(Mutex::new(Record::default()));
        let meta = {
            let (root, stop, rec) = (target.to_owned(), stop.clone(), rec.clone());
            std::thread::spawn(move || workload::metadata_loop(root, stop, rec))
        };
        let writer = {
            let (p, stop, rec) = (target.join("open-writer.bin"), stop.clone(), rec.clone());
            std::thread::spawn(move || workload::open_writer(p, stop, rec))
        };
        let reader = {
            let (p, stop, rec, want) =
                (target.join("ro.bin"), stop.clone(), rec.clone(), ro.clone());
            std::thread::spawn(move || workload::open_reader(p, want, stop, rec))
        };
        let fio = {
            let (dir, stop, rec) = (target.join("fio"), stop.clone(), rec.clone());
            std::thread::spawn(move || workload::fio_loop(dir, stop, rec))
        };
        Load {
            stop,
            rec,
            meta,
            writer,
            reader,
            fio,
            ro,
        }
    }

    /// Stops the load (bounded: a call that never returns fails the test here, not by hanging
    /// it), prints the latencies, and asserts no call failed or stalled 5 s.
    fn finish(self, h: &Harness) -> Done {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(self.meta.is_finished()
            && self.writer.is_finished()
            && self.reader.is_finished()
            && self.fio.is_finished())
        {
            assert!(
                Instant::now() < deadline,
                "an application call hung: metadata loop done {}, writer done {}, reader done {}, fio done {}\n{}",
                self.meta.is_finished(),
                self.writer.is_finished(),
                self.reader.is_finished(),
                self.fio.is_finished(),
                h.csi_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let expect = self.meta.join().unwrap();
        let written = self.writer.join().unwrap();
        self.reader.join().unwrap();
        let fio_runs = self.fio.join().unwrap();
        let rec = std::mem::take(&mut *self.rec.lock().unwrap());
        let mut lat = rec.latencies.clone();
        lat.sort();
        println!(
            "{} application calls: p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?} ({})",
            lat.len(),
            workload::percentile(&lat, 0.5),
            workload::percentile(&lat, 0.99),
            workload::percentile(&lat, 0.999),
            lat.last().copied().unwrap_or_default(),
            rec.slowest.as_ref().map_or("", |(_, what)| what.as_str()),
        );
        assert!(
            rec.errors.is_empty(),
            "application errors: {:#?}\n{}",
            rec.errors,
            h.csi_log()
        );
        assert!(
            expect.len() >= 5,
            "the loop made only {} rounds",
            expect.len()
        );
        assert!(
            written.len() > 50_000,
            "the writer wrote only {} bytes",
            written.len()
        );
        let worst = lat.last().copied().unwrap_or_default();
        assert!(
            worst < Duration::from_secs(5),
            "a call stalled {worst:?} ({})\n{}",
            rec.slowest.as_ref().map_or("", |(_, what)| what.as_str()),
            h.csi_log()
        );
        assert!(fio_runs >= 1, "fio never ran");
        Done {
            expect,
            written,
            ro: self.ro,
            fio_runs,
        }
    }
}

impl Done {
    fn report(&self, what: &str) {
        println!(
            "through {what}: {} rounds, {} bytes through the open writer, {} fio runs (write + verify)",
            self.expect.len(),
            self.written.len(),
            self.fio_runs
        );
    }

    /// The bucket holds what the applications made, and nothing they removed.
    async fn check_bucket(&self, v: &Volume) {
        let s3 = store().await;
        let bucket = BucketName::new(v.context["bucket"].clone()).unwrap();
        let got: BTreeSet<String> = workload::all_keys(&s3, &bucket).await;
        for (key, body) in &self.expect {
            assert!(got.contains(key), "{key} missing from the bucket");
            assert_eq!(
                &workload::get(&s3, &bucket, key).await,
                body,
                "{key} differs"
            );
        }
        let fio: Vec<String> = workload::FIO_FILES
            .iter()
            .map(|f| format!("fio/{f}"))
            .collect();
        let mut also = vec!["ro.bin", "open-writer.bin", "fio/"];
        also.extend(fio.iter().map(String::as_str));
        let want = workload::expected_keys(&self.expect, &also);
        assert_eq!(
            got, want,
            "the bucket holds other objects than the applications left"
        );
        assert_eq!(
            workload::get(&s3, &bucket, "open-writer.bin").await,
            self.written
        );
        assert_eq!(workload::get(&s3, &bucket, "ro.bin").await, self.ro);
        // What fio last wrote is in the bucket, every block as fio wrote it.
        let copy = tempfile::tempdir().unwrap();
        for (key, name) in fio.iter().zip(workload::FIO_FILES) {
            std::fs::write(
                copy.path().join(name),
                workload::get(&s3, &bucket, key).await,
            )
            .unwrap();
        }
        workload::fio_verify(copy.path());
    }
}

/// A volume staged and published with failover (the default), single-node writer.
async fn staged_failover(h: &mut Harness, tag: &str) -> (Volume, PathBuf, PathBuf) {
    staged_static_with(h, tag, mount_cap(Mode::SingleNodeWriter, &[], ""), &[]).await
}

/// The volume condition NodeGetVolumeStats reports for `target`.
async fn condition(node: &mut NodeClient<Channel>, v: &Volume, target: &Path) -> VolumeCondition {
    stats(node, v, target).await.volume_condition.unwrap()
}

/// Unstaging ends everything: the mounts, every serving process the volume had (`pids`), the
/// copies of its connection (no process serves the staging path), its session directory.
async fn unstage_leaves_nothing(
    h: &mut Harness,
    node: &mut NodeClient<Channel>,
    v: &Volume,
    staging: &Path,
    target: &Path,
    pids: &[i32],
) {
    unpublish(node, v, target).await;
    unstage(node, v, staging).await;
    assert!(!is_mounted(target) && !is_mounted(staging));
    for &p in pids {
        assert!(!alive(p), "serving process {p} still runs");
    }
    assert!(serving(staging).is_empty(), "{:?}", serving(staging));
    let sessions: Vec<_> = std::fs::read_dir(h.path("cache/.sessions"))
        .unwrap()
        .collect();
    assert!(sessions.is_empty(), "{sessions:?}");
    h.mounts.clear();
}

#[tokio::test(flavor = "multi_thread")]
async fn csi_volume_survives_kills_of_its_serving_process() {
    let kills = workload::rounds(5);
    let mut h = Harness::start();
    let (v, staging, target) = staged_failover(&mut h, "csi-failover").await;
    let first = wait_serving(&h, &staging, None);
    let fds = fd_baseline(&h);
    let load = Load::start(&target);

    let mut pids = vec![first];
    let mut successor_seen = Vec::new();
    let mut pid = first;
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(800));
        let killed_at = Instant::now();
        kill9(pid);
        pid = wait_serving(&h, &staging, Some(pid));
        successor_seen.push(killed_at.elapsed());
        pids.push(pid);
        workload::wait_for_takeovers(
            || h.csi_log(),
            "the successor took over the volume's connection",
            pids.len() - 1,
        );
    }
    std::thread::sleep(Duration::from_millis(800));
    let done = load.finish(&h);
    let mut took = takeover_times(&h.csi_log());
    took.sort();
    successor_seen.sort();
    done.report(&format!("{kills} kills"));
    println!(
        "successor serving (mounter's ready_ms) {took:?}; kill to successor pid seen {successor_seen:?}"
    );
    assert_eq!(took.len(), kills, "one takeover logged per kill");
    no_descriptor_leaked(&h, fds);

    // Healthy again, and the condition tells what happened.
    let mut node = h.node().await;
    let cond = condition(&mut node, &v, &target).await;
    assert!(!cond.abnormal, "{}", cond.message);
    assert!(
        cond.message.contains(&format!("replaced {kills} times"))
            && cond.message.contains("killed by signal 9 (SIGKILL)")
            && cond.message.contains("its successor served after"),
        "{}",
        cond.message
    );
    done.check_bucket(&v).await;

    unstage_leaves_nothing(&mut h, &mut node, &v, &staging, &target, &pids).await;
}

#[tokio::test]
async fn csi_failover_false_lets_a_killed_serving_process_end_the_volume() {
    let mut h = Harness::start();
    let (v, staging, target) = staged_static_with(
        &mut h,
        "csi-dead",
        mount_cap(Mode::SingleNodeWriter, &[], ""),
        &[("failover", "false")],
    )
    .await;
    let mut node = h.node().await;
    let pid = wait_serving(&h, &staging, None);
    kill9(pid);
    let start = Instant::now();
    let cond = loop {
        let c = condition(&mut node, &v, &target).await;
        // The mount answers ENOTCONN at once; the mounter's reason follows once it has
        // reaped the process.
        let explained = c.abnormal && c.message.contains("failover is off");
        if explained || start.elapsed() > Duration::from_secs(20) {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(cond.abnormal, "{}", cond.message);
    assert!(
        cond.message.contains("killed by signal 9 (SIGKILL)")
            && cond.message.contains("failover is off"),
        "{}",
        cond.message
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        serving(&staging).is_empty(),
        "no successor without failover"
    );
    // The pod cannot write through to the node's disk.
    assert!(std::fs::write(target.join("x"), b"x").is_err());
    // Restaging replaces the dead mount; cleanup works.
    stage(
        &h,
        &mut node,
        &v,
        &staging,
        mount_cap(Mode::SingleNodeWriter, &[], ""),
    )
    .await;
    let cond = stats(&mut node, &v, &staging)
        .await
        .volume_condition
        .unwrap();
    assert!(!cond.abnormal, "{}", cond.message);
    unpublish(&mut node, &v, &target).await;
    unstage(&mut node, &v, &staging).await;
    assert!(!is_mounted(&target) && !is_mounted(&staging));
    assert!(serving(&staging).is_empty());
    h.mounts.clear();
}

/// `s3vol mount`, except that a successor (`--adopt`) fails at once, as one would whose
/// configuration or bucket went bad after the volume was staged.
fn program_whose_successors_fail(dir: &Path) -> PathBuf {
    let p = dir.join("mount-no-successor.sh");
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\n\
             for a in \"$@\"; do\n\
               if [ \"$a\" = --adopt ]; then echo 'test: this successor cannot start' >&2; exit 3; fi\n\
             done\n\
             exec {bin} \"$@\"\n",
            bin = BIN
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[tokio::test]
async fn csi_successors_that_cannot_start_are_not_restarted_forever() {
    let scratch = tempfile::tempdir().unwrap();
    let exe = program_whose_successors_fail(scratch.path());
    let mut h = Harness::start_with_exe(Some(exe));
    let (v, staging, target) = staged_failover(&mut h, "csi-bound").await;
    std::fs::write(target.join("before.txt"), b"written before the kill").unwrap();
    let mut node = h.node().await;
    let pid = wait_serving(&h, &staging, None);
    kill9(pid);
    let start = Instant::now();
    let cond = loop {
        let c = condition(&mut node, &v, &target).await;
        if c.abnormal || start.elapsed() > Duration::from_secs(30) {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(cond.abnormal, "{}\n{}", cond.message, h.csi_log());
    assert!(
        cond.message
            .contains("3 serving processes in a row died before they served"),
        "{}",
        cond.message
    );
    let starts = |log: &str| {
        log.matches("starting a successor on the same connection")
            .count()
    };
    assert_eq!(starts(&h.csi_log()), 3, "{}", h.csi_log());
    let log = h.csi_log();
    assert!(
        log.contains("test: this successor cannot start"),
        "the successors' own words are logged"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(starts(&h.csi_log()), 3, "no successor after the bound");
    assert!(serving(&staging).is_empty());
    // Nobody holds the connection any more: the mount answers ENOTCONN rather than hanging.
    let e = std::fs::metadata(target.join("before.txt")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    // The data written before the kill was in S3 already (close-to-open).
    let s3 = store().await;
    let bucket = BucketName::new(v.context["bucket"].clone()).unwrap();
    assert_eq!(
        workload::get(&s3, &bucket, "before.txt").await,
        b"written before the kill"
    );
    unpublish(&mut node, &v, &target).await;
    unstage(&mut node, &v, &staging).await;
    assert!(!is_mounted(&target) && !is_mounted(&staging));
    h.mounts.clear();
}

/// How the mounter goes in [`csi_volume_survives_the_mounters_end_and_the_plugins_restart`].
#[derive(Clone, Copy, Debug)]
enum MounterEnd {
    /// `kill -9` of the mounter and its serving processes, as when its container dies.
    ContainerKilled,
    /// `kill -9` of the mounter alone: its serving process runs on.
    MounterKilled,
    /// SIGTERM, as an upgrade of its DaemonSet sends.
    Upgrade,
    /// A rollout of both DaemonSets, the mounter's SIGTERM first: the node plugin gets SIGTERM
    /// while the mounter drains, and its successor starts before the mounter has exited.
    RolloutMounterFirst,
    /// A rollout of both DaemonSets, the node plugin's SIGTERM first: the mounter gets SIGTERM
    /// while no node plugin runs, and the next node plugin starts while it drains.
    RolloutPluginFirst,
}

/// A mounter started ahead, waiting for a line on its stdin before it runs. A process that
/// holds files of a stalled mount open cannot start one itself: exec closes the inherited
/// descriptors of those files, and FUSE answers their flush only once a mounter serves.
struct SpareMounter(Child);

/// A CSI plugin started ahead, likewise (see [`SpareMounter`]).
struct SpareCsi(Child);

impl Harness {
    fn spare_csi(&self) -> SpareCsi {
        let mut sh = Command::new("sh");
        sh.args(["-c", "read go && exec \"$0\" \"$@\""]).arg(BIN);
        let mut cmd = self.csi_command(sh);
        cmd.stdin(Stdio::piped());
        SpareCsi(cmd.spawn().unwrap())
    }

    /// Lets the spare CSI plugin run and waits for its socket.
    fn start_spare_csi(&mut self, spare: SpareCsi) {
        let mut child = spare.0;
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        self.csi_started(child);
    }

    /// A mounter of the `s3vol` at `bin`, started ahead.
    fn spare_mounter(&self, bin: &Path) -> SpareMounter {
        let mut sh = Command::new("sh");
        sh.args(["-c", "read go && exec \"$0\" \"$@\""]).arg(bin);
        let mut cmd = self.mounter_command(sh);
        cmd.stdin(Stdio::piped());
        SpareMounter(cmd.spawn().unwrap())
    }

    /// Ends the mounter `how`, then starts `next`.
    fn replace_mounter(&mut self, how: MounterEnd, staging: &Path, next: SpareMounter) {
        let mut m = self.mounter.take().unwrap();
        let pid = m.id() as i32;
        let sigterm = |m: &mut Child| terminate(m, "the mounter");
        match how {
            MounterEnd::ContainerKilled => {
                // All at once, as the kernel kills a container's processes: the mounter is
                // stopped first, so that it sees nothing of its serving process's death, and
                // the serving process is killed before the mounter's end can reach it.
                // SAFETY: kill(2) of the mounter this test started.
                assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
                for p in serving(staging) {
                    kill9(p);
                }
                m.kill().unwrap();
                m.wait().unwrap();
            }
            MounterEnd::MounterKilled => {
                m.kill().unwrap();
                m.wait().unwrap();
            }
            MounterEnd::Upgrade => sigterm(&mut m),
            MounterEnd::RolloutMounterFirst => {
                let plugin = self.spare_csi();
                // SAFETY: kill(2) of the mounter this test started.
                assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
                // The node plugin goes while the mounter drains; its successor takes the
                // connections from the draining mounter, which exits only then.
                self.stop_csi();
                self.start_spare_csi(plugin);
                sigterm(&mut m);
            }
            MounterEnd::RolloutPluginFirst => {
                let plugin = self.spare_csi();
                self.stop_csi();
                // SAFETY: kill(2) of the mounter this test started.
                assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
                // No node plugin while the mounter drains and keeps the connections.
                std::thread::sleep(Duration::from_millis(300));
                self.start_spare_csi(plugin);
                sigterm(&mut m);
            }
        }
        let sock = self.path("mounter.sock");
        let _ = std::fs::remove_file(&sock);
        let mut next = next.0;
        next.stdin.take().unwrap().write_all(b"go\n").unwrap();
        self.mounter = Some(next);
        wait_for("the next mounter's socket", Duration::from_secs(20), || {
            sock.exists()
        });
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn csi_volume_survives_the_mounters_end_and_the_plugins_restart() {
    let mut h = Harness::start();
    let (v, staging, target) = staged_failover(&mut h, "csi-mounter-end").await;
    let mut pid = wait_serving(&h, &staging, None);
    let mut pids = vec![pid];
    let handed = "handed the volume's connection to a new mounter";
    // Each round: the mounter's container killed, the mounter alone killed, an upgrade, then
    // the node plugin killed and restarted and the container killed again, then rollouts of
    // both DaemonSets at once (each order).
    let round = [
        MounterEnd::ContainerKilled,
        MounterEnd::MounterKilled,
        MounterEnd::Upgrade,
        MounterEnd::ContainerKilled,
        MounterEnd::RolloutMounterFirst,
        MounterEnd::RolloutPluginFirst,
    ];
    let rounds = workload::rounds(1);
    let events: Vec<MounterEnd> = round
        .iter()
        .copied()
        .cycle()
        .take(rounds * round.len())
        .collect();
    // The upgrade brings another binary (a copy, so that its serving processes can be told
    // apart); the mounter starts its serving processes from its own executable.
    let upgraded = h.path("s3vol-upgraded");
    std::fs::copy(BIN, &upgraded).unwrap();
    let mut spares: Vec<SpareMounter> = events
        .iter()
        .rev()
        .map(|how| match how {
            MounterEnd::Upgrade => h.spare_mounter(&upgraded),
            _ => h.spare_mounter(Path::new(BIN)),
        })
        .collect();
    let load = Load::start(&target);
    let mut stalls = Vec::new();
    let mut plugin_restarts = 0;
    for (i, how) in events.into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(800));
        if i % round.len() == 3 {
            // The node plugin's own restart: it takes its copy up again from the mounter, so
            // the next end of the mounter is survived too.
            h.kill_csi();
            h.start_csi();
            plugin_restarts += 1;
            workload::wait_for_takeovers(
                || h.csi_log(),
                "took up again a copy of the volume's connection from the mounter",
                plugin_restarts,
            );
        }
        let at = Instant::now();
        h.replace_mounter(how, &staging, spares.pop().unwrap());
        pid = wait_serving(&h, &staging, Some(pid));
        pids.push(pid);
        workload::wait_for_takeovers(|| h.csi_log(), handed, i + 1);
        stalls.push(at.elapsed());
        if matches!(how, MounterEnd::Upgrade) {
            assert_eq!(
                std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
                upgraded,
                "the upgraded mounter's serving process runs the new binary"
            );
        }
    }
    std::thread::sleep(Duration::from_millis(800));
    let done = load.finish(&h);
    done.report(&format!(
        "{} ends of the mounter and {plugin_restarts} node plugin restarts",
        stalls.len()
    ));
    stalls.sort();
    println!("mounter end to successor serving (sorted): {stalls:?}");
    let log = h.csi_log();
    assert!(
        log.contains("an earlier mounter's serving process still runs"),
        "the orphaned serving process was ended first\n{log}"
    );
    // Every SIGTERM of the mounter (an upgrade, two rollouts per round) let go of its copies
    // only once a node plugin held them.
    let held = "the node plugin holds every connection; they wait for the next mounter";
    assert!(
        log.matches(held).count() >= 3 * rounds,
        "{} of {} mounter shutdowns waited for the node plugin\n{log}",
        log.matches(held).count(),
        3 * rounds
    );
    assert!(
        !log.contains("they end with this mounter"),
        "a mounter let go of connections no node plugin held\n{log}"
    );
    // A node plugin that started while the mounter drained asked the next mounter to prune.
    assert!(
        !log.contains("the mounter could not prune cache directories"),
        "{log}"
    );
    // Two processes never served the connection at once.
    assert_eq!(serving(&staging).len(), 1, "{:?}", serving(&staging));

    let mut node = h.node().await;
    let cond = condition(&mut node, &v, &target).await;
    assert!(!cond.abnormal, "{}", cond.message);
    done.check_bucket(&v).await;

    unstage_leaves_nothing(&mut h, &mut node, &v, &staging, &target, &pids).await;
}

/// A memory cgroup (v1) of its own under this test's, whose processes the kernel kills when
/// they allocate past `limit`; removed when dropped. `None` where the memory controller is not
/// mounted as cgroup v1 or cannot be written.
struct MemoryCage(PathBuf);

impl MemoryCage {
    fn new(name: &str, limit: u64) -> Option<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let path = own.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then(|| path.to_owned())
        })?;
        let dir = Path::new("/sys/fs/cgroup/memory")
            .join(path.trim_start_matches('/'))
            .join(name);
        std::fs::create_dir(&dir).ok()?;
        let cage = MemoryCage(dir);
        std::fs::write(cage.0.join("memory.limit_in_bytes"), limit.to_string()).ok()?;
        Some(cage)
    }

    fn put(&self, pid: i32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    /// How many processes the OOM killer killed here.
    fn oom_kills(&self) -> u64 {
        std::fs::read_to_string(self.0.join("memory.oom_control"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryCage {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn csi_volume_survives_oom_kills_of_its_serving_process() {
    let mut h = Harness::start();
    let (v, staging, target) = staged_failover(&mut h, "csi-oom").await;
    let name = format!("s3vol-test-oom-{}", std::process::id());
    // What the serving process charged before stays with its old cgroup; everything it
    // allocates after the move counts against 1 MiB, so under load it is soon out of memory.
    let Some(probe) = MemoryCage::new(&name, 1 << 20) else {
        eprintln!("skipped: no writable cgroup v1 memory controller on this machine");
        return;
    };
    drop(probe);
    let mut pid = wait_serving(&h, &staging, None);
    let mut pids = vec![pid];
    let kills = workload::rounds(3);
    let fds = fd_baseline(&h);
    let load = Load::start(&target);
    for n in 1..=kills {
        std::thread::sleep(Duration::from_millis(800));
        let cage = MemoryCage::new(&name, 1 << 20).unwrap();
        cage.put(pid);
        pid = wait_serving(&h, &staging, Some(pid));
        pids.push(pid);
        workload::wait_for_takeovers(
            || h.csi_log(),
            "the successor took over the volume's connection",
            n,
        );
        assert_eq!(cage.oom_kills(), 1, "the OOM killer ended it");
        drop(cage);
    }
    std::thread::sleep(Duration::from_millis(800));
    let done = load.finish(&h);
    done.report(&format!("{kills} OOM kills"));
    no_descriptor_leaked(&h, fds);
    let log = h.csi_log();
    assert_eq!(
        log.matches("why=killed by signal 9 (SIGKILL)").count(),
        kills,
        "the kernel's OOM killer ended each one\n{log}"
    );
    let mut node = h.node().await;
    let cond = condition(&mut node, &v, &target).await;
    assert!(
        !cond.abnormal && cond.message.contains(&format!("replaced {kills} times")),
        "{}",
        cond.message
    );
    done.check_bucket(&v).await;
    unstage_leaves_nothing(&mut h, &mut node, &v, &staging, &target, &pids).await;
}

/// Staging files under `dir` (the mounter's cache root), recursively.
fn staging_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(staging_files(&p));
        } else if p.extension().is_some_and(|x| x == "data") {
            out.push(p);
        }
    }
    out
}

/// A failover volume streams new files from memory as an unsupervised mount does — no staging
/// file — and what its serving process holds only in memory when the mounter's container dies
/// (serving process included) survives: the part buffers live in a memory file the node plugin
/// holds with the connection and hands to the next mounter, whose serving process moves them
/// to the cache directory and completes the upload before it serves.
#[tokio::test(flavor = "multi_thread")]
async fn csi_streamed_bytes_survive_the_death_of_the_mounters_container() {
    let mut h = Harness::start();
    let (v, staging, target) = staged_failover(&mut h, "csi-stream").await;
    let pid = wait_serving(&h, &staging, None);
    // Started before the file is opened: a process started while it is open would close its
    // copy at exec, and that close flushes the file (uploads it), as on any FUSE mount.
    let next = h.spare_mounter(Path::new(BIN));
    let body = pattern(20 << 20, 31);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(target.join("streamed.bin"))
        .unwrap();
    let split = (13 << 20) + 4321;
    for chunk in body[..split].chunks(1 << 20) {
        f.write_all(chunk).unwrap();
    }
    let staged = staging_files(&h.path("cache"));
    assert!(
        staged.is_empty(),
        "a failover volume streams new files, with no staging file: {staged:?}"
    );
    h.replace_mounter(MounterEnd::ContainerKilled, &staging, next);
    let successor = wait_serving(&h, &staging, Some(pid));
    workload::wait_for_takeovers(
        || h.csi_log(),
        "handed the volume's connection to a new mounter",
        1,
    );
    let s3 = store().await;
    let bucket = BucketName::new(v.context["bucket"].clone()).unwrap();
    assert!(
        s3.head_object(&bucket, "streamed.bin").await.is_err(),
        "streamed.bin is in S3 before its close"
    );
    for chunk in body[split..].chunks(1 << 20) {
        f.write_all(chunk).unwrap();
    }
    crate::support::close(f).unwrap();
    let got = workload::get(&s3, &bucket, "streamed.bin").await;
    assert_eq!(got.len(), body.len());
    assert!(got == body, "streamed.bin differs from what was written");
    let log = h.csi_log();
    assert!(
        log.contains("moved to the cache directory"),
        "the successor took over no part buffer\n{log}"
    );
    assert!(!log.contains("not uploaded"), "{log}");
    let mut node = h.node().await;
    unstage_leaves_nothing(&mut h, &mut node, &v, &staging, &target, &[pid, successor]).await;
}
