//! The node service's run-time rules with real mounts (a submodule of the `csi` tests, using
//! its harness): paths and mounts it may touch, dead mounts, mount namespaces that hold copies,
//! failed starts, SIGTERM to the mounter, cache directories, a restarted mounter.

use super::*;

/// The serving process of a volume staged through the harness, from its state record.
fn the_serving_pid(h: &Harness) -> i32 {
    let pids = h.serving_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    pids[0]
}

fn is_gone(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z ") || s.contains(") X "))
        .unwrap_or(true)
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// A tmpfs mounted at `path` holding one file, as another component of the node would have it.
struct ForeignMount(PathBuf);

impl ForeignMount {
    fn new(path: &Path) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "foreign"])
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::write(path.join("precious"), b"not s3vol's").unwrap();
        ForeignMount(path.to_owned())
    }

    fn intact(&self) -> bool {
        std::fs::read(self.0.join("precious")).is_ok_and(|b| b == b"not s3vol's")
    }
}

impl Drop for ForeignMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn csi_node_touches_only_kubelet_paths_and_only_its_own_mounts() {
    let mut h = Harness::start();
    // Sockets and the cache directory: private whatever the umask (the drivers run with
    // umask 000).
    assert_eq!(mode_of(&h.path("mounter.sock")), 0o600);
    assert_eq!(mode_of(&h.path("csi.sock")), 0o660);
    assert_eq!(mode_of(&h.path("cache")), 0o700);

    let mut node = h.node().await;
    let cap = mount_cap(Mode::SingleNodeWriter, &[], "");
    let ctx = HashMap::from([("bucket".to_owned(), "some-bucket".to_owned())]);
    let outside = tempfile::tempdir().unwrap();
    let out_staging = outside.path().join("staging");
    let out_target = outside.path().join("target");
    std::fs::create_dir_all(&out_staging).unwrap();
    let e = node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: "v".into(),
            staging_target_path: out_staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            volume_context: ctx.clone(),
            secrets: secrets(),
            ..Default::default()
        })
        .await
        .expect_err("a staging path outside the kubelet directory");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("kubelet directory"), "{}", e.message());
    // `..` cannot walk out of it either.
    let sneaky = format!("{}/../{}", h.dir.path().display(), out_target.display());
    for target in [out_target.display().to_string(), sneaky] {
        let e = node
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: "v".into(),
                staging_target_path: h.path("staging/v").display().to_string(),
                target_path: target,
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .expect_err("a target outside the kubelet directory");
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    assert!(!out_target.exists());
    assert!(!is_mounted(&out_staging));

    // A mount that is not s3vol's is never unmounted, whatever the call.
    let staging = h.path("staging/v");
    let target = h.path("pods/p/mount");
    let f1 = ForeignMount::new(&target);
    let f2 = ForeignMount::new(&staging);
    let e = node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "v".into(),
            target_path: target.display().to_string(),
        })
        .await
        .expect_err("unpublish of a foreign mount");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let e = node
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: "v".into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect_err("unstage of a foreign mount");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(f1.intact() && f2.intact());
    assert!(is_mounted(&target) && is_mounted(&staging));
    drop((f1, f2));
    h.mounts.clear();
}

/// A volume whose serving process died (and, without failover, took the volume with it):
/// every cleanup call succeeds and leaves nothing; a path holding the dead mount is cleaned
/// before the volume is mounted there again.
#[tokio::test]
async fn csi_dead_mounts_never_wedge_the_node() {
    let mut h = Harness::start();
    let cap = mount_cap(Mode::SingleNodeWriter, &[], "");
    let (v, staging, target) =
        staged_static_with(&mut h, "csi-wedge", cap.clone(), &[("failover", "false")]).await;
    let mut node = h.node().await;
    let pid = the_serving_pid(&h);
    // SAFETY: kill(2) of the serving process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for(
        "the serving process to die",
        Duration::from_secs(20),
        || is_gone(pid),
    );
    let e = std::fs::metadata(&target).unwrap_err();
    // ECONNABORTED when the request raced with the connection's abort.
    assert!(
        matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)),
        "{e}"
    );

    // Pod deleted: unpublish and unstage succeed on the dead mounts, twice, leaving nothing.
    for _ in 0..2 {
        unpublish(&mut node, &v, &target).await;
        unstage(&mut node, &v, &staging).await;
    }
    assert!(!is_mounted(&target) && !is_mounted(&staging));
    assert!(!target.exists(), "the target directory is removed");
    assert!(staging.is_dir(), "the staging directory is usable again");

    // Kubelet retried before it cleaned up: stage and publish on paths holding dead mounts.
    stage(&h, &mut node, &v, &staging, cap.clone()).await;
    publish(&mut node, &v, &staging, &target, false).await;
    let pid = the_serving_pid(&h);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for(
        "the serving process to die",
        Duration::from_secs(20),
        || is_gone(pid),
    );
    stage(&h, &mut node, &v, &staging, cap.clone()).await;
    publish(&mut node, &v, &staging, &target, false).await;
    assert_eq!(
        mount_count(&staging),
        1,
        "the dead staging mount is replaced"
    );
    assert_eq!(mount_count(&target), 1, "the dead bind mount is replaced");
    std::fs::write(target.join("after.txt"), b"alive again").unwrap();
    assert_eq!(
        std::fs::read(staging.join("after.txt")).unwrap(),
        b"alive again"
    );
    unpublish(&mut node, &v, &target).await;
    unstage(&mut node, &v, &staging).await;
    assert!(!is_mounted(&target) && !is_mounted(&staging));
    h.mounts.clear();
}

/// A process in a private mount namespace holds copies of the volume's mounts: the host's
/// unmount never reaches them, yet unstage ends the serving process.
#[tokio::test]
async fn csi_unstage_ends_the_serving_process_even_when_another_namespace_holds_the_mount() {
    let mut h = Harness::start();
    let (v, staging, target) = staged_static(
        &mut h,
        "csi-pinned",
        mount_cap(Mode::SingleNodeWriter, &[], ""),
    )
    .await;
    let pid = the_serving_pid(&h);
    let mut pinner = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sleep", "120"])
        .spawn()
        .unwrap();
    let pinner_pid = pinner.id();
    wait_for(
        "the private namespace to hold a copy",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(format!("/proc/{pinner_pid}/mountinfo"))
                .is_ok_and(|m| m.contains(staging.to_str().unwrap()))
                && std::fs::read_link(format!("/proc/{pinner_pid}/ns/mnt")).ok()
                    != std::fs::read_link("/proc/self/ns/mnt").ok()
        },
    );
    let mut node = h.node().await;
    unpublish(&mut node, &v, &target).await;
    unstage(&mut node, &v, &staging).await;
    let ended = is_gone(pid);
    let _ = pinner.kill();
    let _ = pinner.wait();
    assert!(
        ended,
        "the serving process outlived unstage\n{}",
        h.csi_log()
    );
    h.mounts.clear();
}

/// A serving process that says `ready` and then dies: NodeStage fails with its reason and
/// leaves nothing mounted.
#[tokio::test]
async fn csi_stage_fails_with_the_reason_of_a_process_that_dies_after_ready() {
    let scratch = tempfile::tempdir().unwrap();
    let fake = scratch.path().join("ready-then-die.sh");
    std::fs::write(
        &fake,
        "#!/bin/sh\n\
         echo ready >&5\n\
         exec 5>&-\n\
         echo 'fake mount: cannot open /dev/fuse for a worker thread: Permission denied' >&2\n\
         exit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut h = Harness::start_with_exe(Some(fake));
    let mut node = h.node().await;
    let staging = h.path("staging/v");
    std::fs::create_dir_all(&staging).unwrap();
    h.mounts.push(staging.clone());
    let asked = Instant::now();
    let e = node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: "bucket:dies".into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter, &[], "")),
            volume_context: HashMap::from([
                ("bucket".to_owned(), "some-bucket".to_owned()),
                ("endpoint".to_owned(), "http://127.0.0.1:9".to_owned()),
            ]),
            secrets: secrets(),
            ..Default::default()
        })
        .await
        .expect_err("a volume nobody serves must not stage");
    assert!(
        e.message().contains("Permission denied"),
        "the error carries the serving process's reason: {}",
        e.message()
    );
    // The mounter gave up on the volume at once (its successors died too): the stage learns
    // that from it, and does not wait for the mount timeout (60 s) of a `statfs` nobody
    // answers.
    assert!(
        e.message().contains("served by no process"),
        "{}",
        e.message()
    );
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "the stage failed only after {:?}",
        asked.elapsed()
    );
    assert!(!is_mounted(&staging));
    h.mounts.clear();
}

/// SIGTERM to the mounter (its pod deleted or drained): each serving process uploads what it
/// holds and exits, then the mounter exits.
#[tokio::test]
async fn csi_mounter_sigterm_uploads_pending_data_and_ends_serving_processes() {
    let mut h = Harness::start();
    let (v, staging, target) = staged_static(
        &mut h,
        "csi-sigterm",
        mount_cap(Mode::SingleNodeWriter, &[], ""),
    )
    .await;
    let bucket = BucketName::new(v.context["bucket"].clone()).unwrap();
    let pid = the_serving_pid(&h);
    // Written, not closed: only the shutdown can upload it.
    let mut f = std::fs::File::create(target.join("pending.txt")).unwrap();
    f.write_all(b"uploaded at shutdown").unwrap();
    let mut mounter = h.mounter.take().unwrap();
    // SAFETY: kill(2) of the mounter this test started.
    unsafe { libc::kill(mounter.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = mounter.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the mounter did not exit after SIGTERM\n{}",
            h.csi_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}\n{}", h.csi_log());
    assert!(is_gone(pid), "the serving process outlived its mounter");
    let s3 = store().await;
    assert_eq!(keys(&s3, &bucket, "").await, ["pending.txt"]);
    let got = s3
        .get_object(&bucket, "pending.txt", None, None)
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = futures::TryStreamExt::try_collect(got.body).await.unwrap();
    assert_eq!(chunks.concat(), b"uploaded at shutdown");
    // The volume now waits for the next mounter (the node plugin keeps its connection), so
    // nothing answers the open file's close yet. The node plugin cleans up without a
    // mounter, and unstaging lets go of the connection: the close then returns.
    let mut node = h.node().await;
    unpublish(&mut node, &v, &target).await;
    unstage(&mut node, &v, &staging).await;
    drop(f);
    assert!(!is_mounted(&target) && !is_mounted(&staging));
    h.mounts.clear();
}

/// The cache directory of a volume goes with NodeUnstage; at node plugin start, empty ones of
/// volumes no longer staged go, and one that still holds files is kept.
#[tokio::test]
async fn csi_cache_directories_of_gone_volumes_are_removed() {
    let mut h = Harness::start();
    let cache = h.path("cache");
    // Volumes' cache directories; the mounter's own (`.sessions`) start with a dot.
    let dirs = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let (v, staging, target) = staged_static(
        &mut h,
        "csi-cache",
        mount_cap(Mode::SingleNodeWriter, &[], ""),
    )
    .await;
    std::fs::write(target.join("f"), b"x").unwrap();
    assert_eq!(
        dirs(&cache).len(),
        1,
        "one cache directory per staged volume"
    );
    let mut node = h.node().await;
    unpublish(&mut node, &v, &target).await;
    unstage(&mut node, &v, &staging).await;
    assert!(dirs(&cache).is_empty(), "left: {:?}", dirs(&cache));

    std::fs::create_dir_all(cache.join("0123456789abcdef/sub")).unwrap();
    std::fs::create_dir_all(cache.join("fedcba9876543210")).unwrap();
    std::fs::write(cache.join("fedcba9876543210/x.data"), b"maybe not in S3").unwrap();
    h.kill_csi();
    h.start_csi();
    wait_for(
        "the empty cache directory to go",
        Duration::from_secs(30),
        || dirs(&cache) == ["fedcba9876543210"],
    );
    assert!(h.csi_log().contains("may not be in S3"));
    h.mounts.clear();
}

/// The kubelet cannot stage a volume again while its staging directory is a dead mount (its
/// own `mkdir -p` fails there): the node plugin unmounts such a mount by itself.
#[tokio::test]
async fn csi_dead_staging_mounts_are_unmounted_without_a_call() {
    let mut h = Harness::start();
    // Without failover: the serving process's death is the mount's.
    let (v, staging, target) = staged_static_with(
        &mut h,
        "csi-sweep",
        mount_cap(Mode::SingleNodeWriter, &[], ""),
        &[("failover", "false")],
    )
    .await;
    let pid = the_serving_pid(&h);
    // SAFETY: kill(2) of the serving process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for(
        "the dead staging mount to be unmounted",
        Duration::from_secs(40),
        || !is_mounted(&staging),
    );
    // What the kubelet does next works: mkdir -p, then stage.
    std::fs::create_dir_all(&staging).unwrap();
    let mut node = h.node().await;
    stage(
        &h,
        &mut node,
        &v,
        &staging,
        mount_cap(Mode::SingleNodeWriter, &[], ""),
    )
    .await;
    std::fs::write(staging.join("again.txt"), b"x").unwrap();
    unpublish(&mut node, &v, &target).await;
    unstage(&mut node, &v, &staging).await;
    assert!(!is_mounted(&target) && !is_mounted(&staging));
    h.mounts.clear();
}

/// After a restart of the mounter (outside Kubernetes its serving processes live on, their
/// stderr gone), unstage still ends the volume's serving process, found by the pid the node
/// plugin recorded; its logging into a dead stderr must not break its shutdown.
#[tokio::test]
async fn csi_unstage_ends_a_serving_process_the_restarted_mounter_did_not_start() {
    let mut h = Harness::start();
    let (v, staging, target) = staged_static(
        &mut h,
        "csi-orphan",
        mount_cap(Mode::SingleNodeWriter, &[], ""),
    )
    .await;
    let pid = the_serving_pid(&h);
    let mut m = h.mounter.take().unwrap();
    m.kill().unwrap();
    m.wait().unwrap();
    h.start_mounter();
    // A copy of the mount in another namespace: only an explicit stop can end the process.
    let mut pinner = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sleep", "120"])
        .spawn()
        .unwrap();
    let pinner_pid = pinner.id();
    wait_for("the private copy", Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{pinner_pid}/mountinfo"))
            .is_ok_and(|m| m.contains(staging.to_str().unwrap()))
    });
    let mut node = h.node().await;
    unpublish(&mut node, &v, &target).await;
    unstage(&mut node, &v, &staging).await;
    let ended = is_gone(pid);
    let _ = pinner.kill();
    let _ = pinner.wait();
    assert!(
        ended,
        "the serving process outlived unstage\n{}",
        h.csi_log()
    );
    h.mounts.clear();
}
