//! End-to-end tests of the CSI driver: the real `s3vol` binary runs as two processes,
//! `s3vol mounter` and `s3vol csi --mode all`, on unix sockets in a temporary directory; a tonic
//! client in the test walks the CSI flows against the test S3 server with real FUSE mounts.
//!
//! Every test has its own buckets, directories and sockets, and a [`Harness`] whose `Drop`
//! lazily unmounts every path the test used and kills every process it started, so a failing
//! test leaves no mount behind. Every wait is bounded.
//!
//! Both processes run with umask 000, so the modes of the sockets they create are their own.
//! The CSI process is told the test's temporary directory is the kubelet directory.
//!
//! Needs root, `/dev/fuse` and the test S3 server (`scripts/s3-server.sh start`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use s3vol_csi::proto::controller_client::ControllerClient;
use s3vol_csi::proto::identity_client::IdentityClient;
use s3vol_csi::proto::node_client::NodeClient;
use s3vol_csi::proto::volume_capability::access_mode::Mode;
use s3vol_csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use s3vol_csi::proto::*;
use s3vol_s3::{AwsStore, BucketName, ListRequest, ObjectStore, PutOptions};
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

#[path = "support/csi_deployed.rs"]
mod deployed;
#[path = "support/csi_failover.rs"]
mod failover;
#[path = "support/csi_identity.rs"]
mod identity;
#[path = "support/csi_node.rs"]
mod node_rules;
#[path = "support/mount.rs"]
mod support;
#[path = "support/workload.rs"]
mod workload;

const BIN: &str = env!("CARGO_BIN_EXE_s3vol");
const DRIVER: &str = "csi.s3vol.io";

/// Two driver processes on sockets in a temporary directory, and cleanup of everything.
struct Harness {
    dir: tempfile::TempDir,
    mounter: Option<Child>,
    csi: Option<Child>,
    /// Paths that may be mounted, unmounted (lazily) on drop, last first.
    mounts: Vec<PathBuf>,
    exe: Option<PathBuf>,
    /// Where the CSI process finds the mounter.
    mounter_socket: PathBuf,
    /// The host pid of a mounter that runs as PID 1 of its own PID namespace (as deployed).
    ns_init: Option<i32>,
    /// The mounter runs in a PID namespace of its own: the pids in the state records are
    /// that namespace's, never to be signalled from here.
    deployed: bool,
}

fn with_umask_000(cmd: &mut Command) {
    // SAFETY: umask is async-signal-safe and cannot fail.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
}

/// SIGTERM to a process this test started, as Kubernetes sends it; waits up to 60 s for its
/// exit.
fn terminate(c: &mut Child, what: &str) {
    // SAFETY: kill(2) of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(c.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "{what} did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Harness {
    fn start() -> Self {
        Self::start_with_exe(None)
    }

    /// With `exe`, the mounter runs that program instead of `s3vol mount`.
    fn start_with_exe(exe: Option<PathBuf>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("s3vol-csi-")
            .tempdir()
            .unwrap();
        let mounter_socket = dir.path().join("mounter.sock");
        let mut h = Harness {
            dir,
            mounter: None,
            csi: None,
            mounts: Vec::new(),
            exe,
            mounter_socket,
            ns_init: None,
            deployed: false,
        };
        h.start_mounter();
        h.start_csi();
        h
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(name))
            .unwrap()
    }

    fn start_mounter(&mut self) {
        let sock = self.path("mounter.sock");
        // A mounter killed before leaves its socket: waiting for the file would then not wait.
        let _ = std::fs::remove_file(&sock);
        let mut cmd = self.mounter_command(Command::new(BIN));
        self.mounter = Some(cmd.spawn().unwrap());
        wait_for("the mounter socket", Duration::from_secs(20), || {
            sock.exists()
        });
    }

    /// `cmd` (`s3vol`, or a program that runs it) with the arguments and environment of the
    /// mounter.
    fn mounter_command(&self, mut cmd: Command) -> Command {
        cmd.args(["mounter", "--socket"])
            .arg(self.path("mounter.sock"))
            .arg("--cache-dir")
            .arg(self.path("cache"))
            .args(["--ready-timeout", "60"])
            .env("AWS_EC2_METADATA_DISABLED", "true")
            // The test's own keys stay out of the drivers' environment.
            .env_remove("S3VOL_TEST_ACCESS_KEY_ID")
            .env_remove("S3VOL_TEST_SECRET_ACCESS_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log("mounter.log"));
        if let Some(exe) = &self.exe {
            cmd.arg("--exe").arg(exe);
        }
        with_umask_000(&mut cmd);
        cmd
    }

    fn start_csi(&mut self) {
        let child = self.csi_command(Command::new(BIN)).spawn().unwrap();
        self.csi_started(child);
    }

    /// `cmd` (`s3vol`, or a program that runs it) with the arguments and environment of the
    /// CSI plugin.
    fn csi_command(&self, mut cmd: Command) -> Command {
        with_umask_000(&mut cmd);
        cmd.args(["csi", "--endpoint"])
            .arg(format!("unix://{}", self.path("csi.sock").display()))
            .args(["--node-id", "test-node", "--mode", "all", "--state-dir"])
            .arg(self.path("state"))
            .arg("--kubelet-dir")
            .arg(self.dir.path())
            .arg("--mounter-socket")
            .arg(&self.mounter_socket)
            .args(["--log-level", "info", "--mount-timeout", "60"])
            // No credentials in the environment: the secrets in the requests must be used.
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("S3VOL_TEST_ACCESS_KEY_ID")
            .env_remove("S3VOL_TEST_SECRET_ACCESS_KEY")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log("csi.log"));
        cmd
    }

    /// Waits for the socket of the CSI plugin `child` just started.
    fn csi_started(&mut self, child: Child) {
        self.csi = Some(child);
        let sock = self.path("csi.sock");
        wait_for("the CSI socket", Duration::from_secs(20), || sock.exists());
    }

    /// SIGTERM to the CSI plugin, as a rollout of its DaemonSet sends; waits for its exit.
    fn stop_csi(&mut self) {
        let mut c = self.csi.take().unwrap();
        terminate(&mut c, "the node plugin");
        let _ = std::fs::remove_file(self.path("csi.sock"));
    }

    /// `kill -9` of the CSI plugin, as a crash would do it.
    fn kill_csi(&mut self) {
        let mut c = self.csi.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
        let _ = std::fs::remove_file(self.path("csi.sock"));
    }

    async fn channel(&self) -> Channel {
        let sock = self.path("csi.sock");
        Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let sock = sock.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(sock).await?,
                    ))
                }
            }))
            .await
            .unwrap()
    }

    async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    fn csi_log(&self) -> String {
        std::fs::read_to_string(self.path("csi.log")).unwrap_or_default()
            + &std::fs::read_to_string(self.path("mounter.log")).unwrap_or_default()
    }

    /// Pids of the serving processes the state directory knows.
    fn serving_pids(&self) -> Vec<i32> {
        let Ok(rd) = std::fs::read_dir(self.path("state")) else {
            return Vec::new();
        };
        rd.filter_map(|e| std::fs::read(e.ok()?.path()).ok())
            .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter_map(|v| v.get("pid")?.as_i64())
            .map(|p| p as i32)
            .collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for p in self.mounts.iter().rev() {
            for _ in 0..4 {
                let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
                    break;
                };
                // SAFETY: umount2 with a valid C string; failure (not mounted) is fine.
                if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                    break;
                }
            }
        }
        if let Some(init) = self.ns_init {
            // SAFETY: kill(2) of the PID 1 of the namespace this test made; the kernel then
            // kills every process in that namespace.
            unsafe { libc::kill(init, libc::SIGKILL) };
        } else if !self.deployed {
            // The mounter first, so that it starts no successor of what is killed next.
            if let Some(mut m) = self.mounter.take() {
                let _ = m.kill();
                let _ = m.wait();
            }
            // The recorded pids, and the successors the mounter started since (their argv
            // names a path in this test's directory).
            let dir = self.dir.path().as_os_str().as_encoded_bytes().to_vec();
            let successors = failover::serving_where(|a| a.starts_with(&dir));
            for pid in self.serving_pids().into_iter().chain(successors) {
                // SAFETY: plain kill(2) of a process this test started (via the mounter).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for c in [self.csi.take(), self.mounter.take()].into_iter().flatten() {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- driver logs ----\n{}", self.csi_log());
        }
    }
}

fn secrets() -> HashMap<String, String> {
    let c = s3vol_s3::testing::credentials();
    HashMap::from([
        ("accessKeyID".to_owned(), c.access_key_id),
        ("secretAccessKey".to_owned(), c.secret_access_key),
    ])
}

fn mount_cap(mode: Mode, flags: &[&str], group: &str) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: String::new(),
            mount_flags: flags.iter().map(|s| s.to_string()).collect(),
            volume_mount_group: group.into(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

/// StorageClass parameters for the test server.
fn sc_params(extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut m = HashMap::from([
        ("endpoint".to_owned(), s3vol_s3::testing::endpoint()),
        ("region".to_owned(), "us-east-1".to_owned()),
        ("forcePathStyle".to_owned(), "true".to_owned()),
    ]);
    for (k, v) in extra {
        m.insert(k.to_string(), v.to_string());
    }
    m
}

async fn store() -> AwsStore {
    AwsStore::new(&s3vol_s3::testing::config()).await
}

async fn keys(store: &AwsStore, bucket: &BucketName, prefix: &str) -> Vec<String> {
    store
        .list_objects(
            bucket,
            &ListRequest {
                prefix: prefix.into(),
                ..ListRequest::default()
            },
        )
        .await
        .map(|p| p.objects.into_iter().map(|o| o.key).collect())
        .unwrap_or_default()
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("the call should fail").code()
}

#[tokio::test]
async fn csi_identity_and_capabilities() {
    let h = Harness::start();
    let mut id = IdentityClient::new(h.channel().await);
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, DRIVER);
    assert!(!info.vendor_version.is_empty());
    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(caps.capabilities.iter().any(|c| matches!(
        c.r#type,
        Some(plugin_capability::Type::Service(
            plugin_capability::Service { r#type: 1 }
        ))
    )));
    let probe = id.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));

    let mut node = h.node().await;
    let info = node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "test-node");
    let caps: Vec<i32> = node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| {
            c.r#type
                .map(|node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    use node_service_capability::rpc::Type as N;
    for want in [
        N::StageUnstageVolume,
        N::GetVolumeStats,
        N::VolumeCondition,
        N::VolumeMountGroup,
    ] {
        assert!(caps.contains(&(want as i32)), "{want:?} missing");
    }
    let caps = h
        .controller()
        .await
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!caps.capabilities.is_empty());

    // Without its mounter the node cannot serve: healthy, but not ready.
    let mut h = h;
    let mut m = h.mounter.take().unwrap();
    m.kill().unwrap();
    m.wait().unwrap();
    let probe = id.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(false));
}

#[tokio::test]
async fn csi_controller_errors_and_foreign_buckets() {
    let h = Harness::start();
    let mut ctl = h.controller().await;
    let cap = mount_cap(Mode::MultiNodeMultiWriter, &[], "");
    let req = |name: &str, caps: Vec<VolumeCapability>, params: HashMap<String, String>| {
        CreateVolumeRequest {
            name: name.into(),
            volume_capabilities: caps,
            parameters: params,
            secrets: secrets(),
            ..Default::default()
        }
    };
    let p = sc_params(&[("mode", "bucket")]);
    assert_eq!(
        code(
            ctl.create_volume(req("", vec![cap.clone()], p.clone()))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.create_volume(req("v", vec![], p.clone())).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.create_volume(req("v", vec![block_cap()], p.clone()))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.create_volume(req("v", vec![cap.clone()], sc_params(&[("mode", "nope")])))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.create_volume(req(
                "v",
                vec![cap.clone()],
                sc_params(&[("mode", "prefix")])
            ))
            .await
        ),
        Code::InvalidArgument
    );
    let mut partial = req("v", vec![cap.clone()], p.clone());
    partial.secrets.remove("accessKeyID");
    assert_eq!(
        code(ctl.create_volume(partial).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(ctl.delete_volume(DeleteVolumeRequest::default()).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: "nothing-here".into(),
                volume_capabilities: vec![cap.clone()],
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    // An id of s3vol's shape for a volume never created: NOT_FOUND (CSI v1.9), whatever the
    // capability asked for.
    let never = s3vol_csi::volume_id::VolumeId {
        kind: s3vol_csi::volume_id::VolumeKind::Bucket(s3vol_s3::testing::unique_bucket(
            "csi-never",
        )),
        location: s3vol_csi::volume_id::Location {
            endpoint: Some(s3vol_s3::testing::endpoint()),
            region: Some("us-east-1".into()),
            path_style: true,
        },
    };
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: never.to_string(),
                volume_capabilities: vec![block_cap()],
                secrets: secrets(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );

    // A bucket that holds data and was not made by the driver is never taken over or emptied.
    let s3 = store().await;
    let foreign = s3vol_s3::testing::unique_bucket("csi-foreign");
    s3.create_bucket(&foreign).await.unwrap();
    s3.put_object(
        &foreign,
        "precious",
        b"x".to_vec().into(),
        &PutOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        code(
            ctl.create_volume(req(foreign.as_str(), vec![cap.clone()], p.clone()))
                .await
        ),
        Code::AlreadyExists
    );
    let forged = format!(
        "bucket:{foreign};e={};r=us-east-1;p",
        percent_encode(&s3vol_s3::testing::endpoint())
    );
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: forged,
        secrets: secrets(),
    })
    .await
    .unwrap();
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: "some-static-volume".into(),
        secrets: secrets(),
    })
    .await
    .unwrap();
    assert_eq!(keys(&s3, &foreign, "").await, ["precious"]);
    // And nothing secret reached a log line.
    assert!(
        !h.csi_log()
            .contains(&s3vol_s3::testing::credentials().secret_access_key)
    );
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn csi_node_errors_and_idempotent_cleanup() {
    let mut h = Harness::start();
    let mut node = h.node().await;
    let staging = h.path("staging/v");
    let target = h.path("pods/p1/mount");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    h.mounts.extend([staging.clone(), target.clone()]);
    let cap = mount_cap(Mode::SingleNodeWriter, &[], "");
    let ctx = HashMap::from([("bucket".to_owned(), "some-bucket".to_owned())]);
    let stage =
        |id: &str, path: &Path, cap: Option<VolumeCapability>, ctx: HashMap<String, String>| {
            NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: path.display().to_string(),
                volume_capability: cap,
                volume_context: ctx,
                ..Default::default()
            }
        };
    assert_eq!(
        code(
            node.node_stage_volume(stage("", &staging, Some(cap.clone()), ctx.clone()))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            node.node_stage_volume(stage("v", Path::new(""), Some(cap.clone()), ctx.clone()))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            node.node_stage_volume(stage("v", &staging, None, ctx.clone()))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            node.node_stage_volume(stage("v", &staging, Some(block_cap()), ctx.clone()))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            node.node_stage_volume(stage("v", &staging, Some(cap.clone()), HashMap::new()))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            node.node_stage_volume(stage(
                "v",
                &staging,
                Some(mount_cap(Mode::SingleNodeWriter, &["cache-dir=/etc"], "")),
                ctx.clone()
            ))
            .await
        ),
        Code::InvalidArgument
    );

    // Publish before stage: refused, and the target is not left as a plain directory.
    let publish = NodePublishVolumeRequest {
        volume_id: "v".into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    assert_eq!(
        code(node.node_publish_volume(publish.clone()).await),
        Code::FailedPrecondition
    );
    assert!(
        !target.exists(),
        "a failed publish left {} behind",
        target.display()
    );
    std::fs::create_dir(&target).unwrap();
    assert_eq!(
        code(node.node_publish_volume(publish.clone()).await),
        Code::FailedPrecondition
    );
    assert!(
        !target.exists(),
        "a failed publish left a pre-created target behind"
    );
    let mut no_target = publish.clone();
    no_target.target_path.clear();
    assert_eq!(
        code(node.node_publish_volume(no_target).await),
        Code::InvalidArgument
    );
    let mut no_cap = publish.clone();
    no_cap.volume_capability = None;
    assert_eq!(
        code(node.node_publish_volume(no_cap).await),
        Code::InvalidArgument
    );

    // Unpublish/unstage of what is not there succeed; stats of an unknown volume: NotFound.
    for _ in 0..2 {
        node.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "v".into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
        node.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: "v".into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
    }
    assert_eq!(
        code(
            node.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: "v".into(),
                target_path: String::new(),
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            node.node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: "v".into(),
                volume_path: target.display().to_string(),
                staging_target_path: String::new(),
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            node.node_get_volume_stats(NodeGetVolumeStatsRequest::default())
                .await
        ),
        Code::InvalidArgument
    );
    drop(node);
    h.mounts.clear();
}

/// A stand-in for `s3vol mount` that records what it was given (the first line of fd 4: the
/// mounter keeps that channel open for rotations, so it never ends) and fails like a real mount
/// failure would: the reason on stderr, a non-zero exit — and, like a process that closes its
/// descriptors before it gets round to saying why, only a second after closing its ready pipe.
fn failing_mount_program(dir: &Path) -> PathBuf {
    let p = dir.join("fake-mount.sh");
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\n\
             printf '%s\\n' \"$@\" > {dir}/argv\n\
             head -n 1 <&4 > {dir}/credentials\n\
             ls -l /proc/$$/fd > {dir}/fds 2>&1\n\
             env > {dir}/env\n\
             exec 5>&-\n\
             sleep 1\n\
             echo 'fake mount: bucket does not exist (NoSuchBucket)' >&2\n\
             exit 3\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[tokio::test]
async fn csi_failed_mount_is_reported_and_unmounted_and_credentials_go_through_a_pipe() {
    let scratch = tempfile::tempdir().unwrap();
    let fake = failing_mount_program(scratch.path());
    let mut h = Harness::start_with_exe(Some(fake));
    let mut node = h.node().await;
    let staging = h.path("staging/v");
    std::fs::create_dir_all(&staging).unwrap();
    h.mounts.push(staging.clone());
    let mut secrets = secrets();
    secrets.insert("sessionToken".into(), "SESSION-TOKEN-SECRET".into());
    let req = NodeStageVolumeRequest {
        volume_id: "bucket:missing".into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter, &["uid=1000"], "")),
        volume_context: HashMap::from([
            ("bucket".to_owned(), "missing-bucket".to_owned()),
            ("prefix".to_owned(), "some/prefix".to_owned()),
            ("endpoint".to_owned(), "http://127.0.0.1:9".to_owned()),
            ("forcePathStyle".to_owned(), "true".to_owned()),
        ]),
        secrets: secrets.clone(),
        ..Default::default()
    };
    let err = node
        .node_stage_volume(req)
        .await
        .expect_err("stage must fail");
    assert_eq!(err.code(), Code::Internal);
    assert!(
        err.message()
            .contains("bucket does not exist (NoSuchBucket)"),
        "the error should carry the serving process's reason: {}",
        err.message()
    );
    // The staging path is not left mounted.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(&staging.display().to_string()),
        "{mountinfo}"
    );

    // What the serving process got: the flags, fds 3/4/5, credentials only through fd 4.
    let argv = std::fs::read_to_string(scratch.path().join("argv")).unwrap();
    let args: Vec<&str> = argv.lines().collect();
    assert_eq!(
        &args[..8],
        [
            "mount",
            "--fuse-fd",
            "3",
            "--credentials-fd",
            "4",
            "--ready-fd",
            "5",
            "-f"
        ]
    );
    for want in [
        "--endpoint-url",
        "http://127.0.0.1:9",
        "--force-path-style",
        "--uid",
        "1000",
        "--",
        "missing-bucket/some/prefix",
    ] {
        assert!(args.contains(&want), "{want} missing from {args:?}");
    }
    assert_eq!(args.last().copied(), Some(staging.to_str().unwrap()));
    let creds: serde_json::Value =
        serde_json::from_slice(&std::fs::read(scratch.path().join("credentials")).unwrap())
            .unwrap();
    assert_eq!(creds["access_key_id"], secrets["accessKeyID"].as_str());
    assert_eq!(
        creds["secret_access_key"],
        secrets["secretAccessKey"].as_str()
    );
    assert_eq!(creds["session_token"], "SESSION-TOKEN-SECRET");
    let fds = std::fs::read_to_string(scratch.path().join("fds")).unwrap();
    assert!(fds.contains(" 3 -> /dev/fuse"), "{fds}");
    let env = std::fs::read_to_string(scratch.path().join("env")).unwrap();
    let secret = &secrets["secretAccessKey"];
    for (what, text) in [
        ("argv", &argv),
        ("environment", &env),
        ("logs", &h.csi_log()),
    ] {
        assert!(
            !text.contains(secret.as_str()),
            "the secret key is in the {what}"
        );
        assert!(
            !text.contains("SESSION-TOKEN-SECRET"),
            "the session token is in the {what}"
        );
    }
    drop(node);
    h.mounts.clear();
}

#[tokio::test]
async fn csi_controller_creates_and_deletes_buckets_and_prefixes() {
    let h = Harness::start();
    let mut ctl = h.controller().await;
    let s3 = store().await;

    // Bucket mode: a bucket named after the volume, idempotent, deleted with its objects.
    let name = s3vol_s3::testing::unique_bucket("csi-ctl").to_string();
    let params = sc_params(&[("mode", "bucket")]);
    let v = create(&mut ctl, &name, params.clone()).await;
    assert_eq!(v.id, create(&mut ctl, &name, params.clone()).await.id);
    assert_eq!(v.context["mode"], "bucket");
    let bucket = BucketName::new(v.context["bucket"].clone()).unwrap();
    assert_eq!(bucket.as_str(), name);
    for i in 0..1005 {
        s3.put_object(
            &bucket,
            &format!("d/{i}"),
            b"x".to_vec().into(),
            &PutOptions::default(),
        )
        .await
        .unwrap();
    }
    let mut other = params.clone();
    other.insert("region".into(), "eu-west-1".into());
    assert_eq!(
        code(
            ctl.create_volume(CreateVolumeRequest {
                name: name.clone(),
                volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter, &[], "")],
                parameters: other,
                secrets: secrets(),
                ..Default::default()
            })
            .await
        ),
        Code::AlreadyExists
    );
    for _ in 0..2 {
        ctl.delete_volume(DeleteVolumeRequest {
            volume_id: v.id.clone(),
            secrets: secrets(),
        })
        .await
        .unwrap();
    }
    assert!(
        s3.head_bucket(&bucket).await.is_err(),
        "the bucket must be gone"
    );

    // Prefix mode: a prefix of an existing bucket; its neighbours survive the deletion.
    let shared = s3vol_s3::testing::unique_bucket("csi-ctl-shared");
    s3.create_bucket(&shared).await.unwrap();
    for k in ["neighbour/keep", "pvc-a0", "pvc-a.txt"] {
        s3.put_object(&shared, k, b"x".to_vec().into(), &PutOptions::default())
            .await
            .unwrap();
    }
    let params = sc_params(&[("mode", "prefix"), ("bucket", shared.as_str())]);
    let v = create(&mut ctl, "pvc-a", params.clone()).await;
    assert_eq!(v.context["prefix"], "pvc-a/");
    s3.put_object(
        &shared,
        "pvc-a/data/f",
        b"x".to_vec().into(),
        &PutOptions::default(),
    )
    .await
    .unwrap();
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: v.id.clone(),
        secrets: secrets(),
    })
    .await
    .unwrap();
    assert_eq!(
        keys(&s3, &shared, "").await,
        ["neighbour/keep", "pvc-a.txt", "pvc-a0"]
    );
    // A prefix mode volume in a bucket that does not exist: a precondition the user must fix.
    let missing = s3vol_s3::testing::unique_bucket("csi-ctl-missing");
    assert_eq!(
        code(
            ctl.create_volume(CreateVolumeRequest {
                name: "pvc-b".into(),
                volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter, &[], "")],
                parameters: sc_params(&[("mode", "prefix"), ("bucket", missing.as_str())]),
                secrets: secrets(),
                ..Default::default()
            })
            .await
        ),
        Code::FailedPrecondition
    );
}

// ---- the flows with real mounts (need `s3vol mount --fuse-fd`) ----

struct Volume {
    id: String,
    context: HashMap<String, String>,
}

async fn create(
    ctl: &mut ControllerClient<Channel>,
    name: &str,
    params: HashMap<String, String>,
) -> Volume {
    let v = ctl
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter, &[], "")],
            parameters: params,
            secrets: secrets(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    Volume {
        id: v.volume_id,
        context: v.volume_context,
    }
}

async fn stage(
    h: &Harness,
    node: &mut NodeClient<Channel>,
    v: &Volume,
    staging: &Path,
    cap: VolumeCapability,
) {
    node.node_stage_volume(NodeStageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        volume_context: v.context.clone(),
        secrets: secrets(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("stage: {e}\n{}", h.csi_log()));
}

async fn publish(
    node: &mut NodeClient<Channel>,
    v: &Volume,
    staging: &Path,
    target: &Path,
    ro: bool,
) {
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter, &[], "")),
        readonly: ro,
        volume_context: v.context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn unpublish(node: &mut NodeClient<Channel>, v: &Volume, target: &Path) {
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: v.id.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
}

async fn unstage(node: &mut NodeClient<Channel>, v: &Volume, staging: &Path) {
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .unwrap();
}

async fn stats(
    node: &mut NodeClient<Channel>,
    v: &Volume,
    path: &Path,
) -> NodeGetVolumeStatsResponse {
    node.node_get_volume_stats(NodeGetVolumeStatsRequest {
        volume_id: v.id.clone(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

fn is_mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
}

/// Write through one target, read through the other, the read-only one refuses writes.
async fn full_flow(h: &mut Harness, v: &Volume, check_in_s3: impl AsyncFnOnce(&[String])) {
    let mut node = h.node().await;
    let staging = h.path("staging/vol");
    let rw = h.path("pods/rw/mount");
    let ro = h.path("pods/ro/mount");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(rw.parent().unwrap()).unwrap();
    std::fs::create_dir_all(ro.parent().unwrap()).unwrap();
    h.mounts.extend([staging.clone(), rw.clone(), ro.clone()]);
    let cap = mount_cap(Mode::MultiNodeMultiWriter, &[], "");
    for _ in 0..2 {
        stage(h, &mut node, v, &staging, cap.clone()).await;
    }
    for _ in 0..2 {
        publish(&mut node, v, &staging, &rw, false).await;
        publish(&mut node, v, &staging, &ro, true).await;
    }
    // Same target, other read-only flag: incompatible.
    let clash = node
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: v.id.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: ro.display().to_string(),
            volume_capability: Some(cap.clone()),
            readonly: false,
            ..Default::default()
        })
        .await;
    assert_eq!(code(clash), Code::AlreadyExists);

    std::fs::create_dir_all(rw.join("dir")).unwrap();
    std::fs::write(rw.join("dir/hello.txt"), b"hello from a pod").unwrap();
    assert_eq!(
        std::fs::read(ro.join("dir/hello.txt")).unwrap(),
        b"hello from a pod"
    );
    let e = std::fs::write(ro.join("nope.txt"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");

    let s = stats(&mut node, v, &rw).await;
    let cond = s.volume_condition.unwrap();
    assert!(!cond.abnormal, "{}", cond.message);
    assert!(!s.usage.is_empty());

    for _ in 0..2 {
        unpublish(&mut node, v, &rw).await;
        unpublish(&mut node, v, &ro).await;
    }
    assert!(
        !rw.exists() && !ro.exists(),
        "unpublish must remove the target paths"
    );
    for _ in 0..2 {
        unstage(&mut node, v, &staging).await;
    }
    assert!(!is_mounted(&staging));
    // mkdir made a `dir/` object (the s3fs directory format), the write the file.
    check_in_s3(&["dir/".to_owned(), "dir/hello.txt".to_owned()]).await;
    h.mounts.clear();
}

#[tokio::test]
async fn csi_full_flow_bucket_mode() {
    let mut h = Harness::start();
    let mut ctl = h.controller().await;
    let name = s3vol_s3::testing::unique_bucket("csi-bkt").to_string();
    let params = sc_params(&[("mode", "bucket")]);
    let v = create(&mut ctl, &name, params.clone()).await;
    let again = create(&mut ctl, &name, params.clone()).await;
    assert_eq!(again.id, v.id);
    let bucket = BucketName::new(v.context["bucket"].clone()).unwrap();
    let s3 = store().await;
    full_flow(&mut h, &v, async |want| {
        let got = keys(&s3, &bucket, "dir/").await;
        assert_eq!(got, want);
    })
    .await;
    for _ in 0..2 {
        ctl.delete_volume(DeleteVolumeRequest {
            volume_id: v.id.clone(),
            secrets: secrets(),
        })
        .await
        .unwrap();
    }
    assert!(
        s3.head_bucket(&bucket).await.is_err(),
        "the bucket must be gone"
    );
}

#[tokio::test]
async fn csi_full_flow_prefix_mode() {
    let mut h = Harness::start();
    let mut ctl = h.controller().await;
    let s3 = store().await;
    let bucket = s3vol_s3::testing::unique_bucket("csi-pfx");
    s3.create_bucket(&bucket).await.unwrap();
    s3.put_object(
        &bucket,
        "neighbour/keep",
        b"x".to_vec().into(),
        &PutOptions::default(),
    )
    .await
    .unwrap();
    let params = sc_params(&[("mode", "prefix"), ("bucket", bucket.as_str())]);
    let v = create(&mut ctl, "pvc-prefix-1", params.clone()).await;
    // Same name, other capacity: incompatible.
    let e = ctl
        .create_volume(CreateVolumeRequest {
            name: "pvc-prefix-1".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 2 << 30,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter, &[], "")],
            parameters: params.clone(),
            secrets: secrets(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(e), Code::AlreadyExists);
    let s3b = store().await;
    let b2 = bucket.clone();
    full_flow(&mut h, &v, async |want| {
        let got = keys(&s3b, &b2, "pvc-prefix-1/dir/").await;
        let want: Vec<String> = want.iter().map(|k| format!("pvc-prefix-1/{k}")).collect();
        assert_eq!(got, want);
    })
    .await;
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: v.id.clone(),
        secrets: secrets(),
    })
    .await
    .unwrap();
    assert_eq!(keys(&s3, &bucket, "").await, ["neighbour/keep"]);
}

#[tokio::test]
async fn csi_full_flow_static_volume() {
    let mut h = Harness::start();
    let s3 = store().await;
    let bucket = s3vol_s3::testing::unique_bucket("csi-static");
    s3.create_bucket(&bucket).await.unwrap();
    s3.put_object(
        &bucket,
        "data/existing.txt",
        b"static".to_vec().into(),
        &PutOptions::default(),
    )
    .await
    .unwrap();
    let v = Volume {
        id: "datasets".into(),
        context: HashMap::from([
            ("bucket".to_owned(), bucket.to_string()),
            ("prefix".to_owned(), "data".to_owned()),
            ("endpoint".to_owned(), s3vol_s3::testing::endpoint()),
            ("region".to_owned(), "us-east-1".to_owned()),
            ("forcePathStyle".to_owned(), "true".to_owned()),
        ]),
    };
    let s3b = store().await;
    let b2 = bucket.clone();
    full_flow(&mut h, &v, async |want| {
        let got = keys(&s3b, &b2, "data/dir/").await;
        let want: Vec<String> = want.iter().map(|k| format!("data/{k}")).collect();
        assert_eq!(got, want);
    })
    .await;
    // DeleteVolume of a static volume touches nothing.
    h.controller()
        .await
        .delete_volume(DeleteVolumeRequest {
            volume_id: v.id.clone(),
            secrets: secrets(),
        })
        .await
        .unwrap();
    assert!(
        keys(&s3, &bucket, "data/")
            .await
            .contains(&"data/existing.txt".to_owned())
    );
}

/// "Claim a bucket, mount it": a static volume whose node-stage Secret is the one COSI writes
/// for a BucketAccess mounts the bucket that Secret names. The v1alpha2 Secret alone says
/// everything (bucket, endpoint, region, path-style addressing); a v1alpha1 `BucketInfo`
/// carries no addressing style, so the volume attribute supplies it.
#[tokio::test]
async fn csi_static_volume_mounts_with_a_cosi_bucket_access_secret() {
    let mut h = Harness::start();
    let s3 = store().await;
    let bucket = s3vol_s3::testing::unique_bucket("csi-cosi");
    s3.create_bucket(&bucket).await.unwrap();
    s3.put_object(
        &bucket,
        "from-s3.txt",
        b"claimed".to_vec().into(),
        &PutOptions::default(),
    )
    .await
    .unwrap();
    let c = s3vol_s3::testing::credentials();
    let endpoint = s3vol_s3::testing::endpoint();
    let v1alpha2: HashMap<String, String> = [
        ("COSI_PROTOCOL", "S3"),
        ("COSI_S3_BUCKET_ID", bucket.as_str()),
        ("COSI_S3_ENDPOINT", &endpoint),
        ("COSI_S3_REGION", "us-east-1"),
        ("COSI_S3_ADDRESSING_STYLE", "path"),
        ("COSI_S3_ACCESS_KEY_ID", &c.access_key_id),
        ("COSI_S3_ACCESS_SECRET_KEY", &c.secret_access_key),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let bucket_info = serde_json::json!({
        "metadata": {"name": "ba-csi"},
        "spec": {
            "bucketName": bucket.as_str(),
            "authenticationType": "KEY",
            "secretS3": {
                "endpoint": endpoint, "region": "us-east-1",
                "accessKeyID": c.access_key_id, "accessSecretKey": c.secret_access_key,
            },
            "secretAzure": null,
            "protocols": ["s3"],
        }
    });
    let v1alpha1 = HashMap::from([("BucketInfo".to_owned(), bucket_info.to_string())]);

    let mut node = h.node().await;
    let cases = [
        ("v1alpha2", v1alpha2, HashMap::new()),
        (
            "v1alpha1",
            v1alpha1,
            HashMap::from([("forcePathStyle".to_owned(), "true".to_owned())]),
        ),
    ];
    for (version, secrets, context) in cases {
        let v = Volume {
            id: format!("cosi-{version}"),
            context,
        };
        let staging = h.path(&format!("staging/{version}"));
        let target = h.path(&format!("pods/{version}/mount"));
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        h.mounts.extend([staging.clone(), target.clone()]);
        node.node_stage_volume(NodeStageVolumeRequest {
            volume_id: v.id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter, &[], "")),
            volume_context: v.context.clone(),
            secrets,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("stage with the {version} secret: {e}\n{}", h.csi_log()));
        publish(&mut node, &v, &staging, &target, false).await;
        assert_eq!(
            std::fs::read(target.join("from-s3.txt")).unwrap(),
            b"claimed"
        );
        let name = format!("from-{version}-pod.txt");
        std::fs::write(target.join(&name), version).unwrap();
        unpublish(&mut node, &v, &target).await;
        unstage(&mut node, &v, &staging).await;
        assert!(keys(&s3, &bucket, "").await.contains(&name), "{name}");
    }
    h.mounts.clear();
}

/// A static volume on a fresh bucket, staged and published read-write.
async fn staged_static(
    h: &mut Harness,
    tag: &str,
    cap: VolumeCapability,
) -> (Volume, PathBuf, PathBuf) {
    staged_static_with(h, tag, cap, &[]).await
}

/// [`staged_static`] with more volume attributes.
async fn staged_static_with(
    h: &mut Harness,
    tag: &str,
    cap: VolumeCapability,
    attrs: &[(&str, &str)],
) -> (Volume, PathBuf, PathBuf) {
    let s3 = store().await;
    let bucket = s3vol_s3::testing::unique_bucket(tag);
    s3.create_bucket(&bucket).await.unwrap();
    let mut context = HashMap::from([
        ("bucket".to_owned(), bucket.to_string()),
        ("endpoint".to_owned(), s3vol_s3::testing::endpoint()),
        ("region".to_owned(), "us-east-1".to_owned()),
        ("forcePathStyle".to_owned(), "true".to_owned()),
    ]);
    context.extend(attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let v = Volume {
        id: format!("static-{bucket}"),
        context,
    };
    let staging = h.path("staging/vol");
    let target = h.path("pods/p/mount");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    h.mounts.extend([staging.clone(), target.clone()]);
    let mut node = h.node().await;
    stage(h, &mut node, &v, &staging, cap).await;
    publish(&mut node, &v, &staging, &target, false).await;
    (v, staging, target)
}

#[tokio::test]
async fn csi_volume_survives_plugin_kill_and_is_adopted() {
    let mut h = Harness::start();
    let (v, staging, target) = staged_static(
        &mut h,
        "csi-restart",
        mount_cap(Mode::SingleNodeWriter, &[], ""),
    )
    .await;
    // An app holds a file open and keeps writing through the crash.
    let mut f = std::fs::File::create(target.join("log.txt")).unwrap();
    f.write_all(b"before\n").unwrap();
    h.kill_csi();
    f.write_all(b"during\n").unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::write(
        target.join("other.txt"),
        b"written while the plugin is down",
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(target.join("log.txt")).unwrap(),
        "before\nduring\n"
    );
    h.start_csi();
    let mut node = h.node().await;
    let s = stats(&mut node, &v, &target).await;
    assert!(!s.volume_condition.unwrap().abnormal);
    // Stage and publish again (what a kubelet does after a plugin restart) are no-ops.
    stage(
        &h,
        &mut node,
        &v,
        &staging,
        mount_cap(Mode::SingleNodeWriter, &[], ""),
    )
    .await;
    publish(&mut node, &v, &staging, &target, false).await;
    let pids = h.serving_pids();
    assert_eq!(pids.len(), 1);
    unpublish(&mut node, &v, &target).await;
    unstage(&mut node, &v, &staging).await;
    assert!(!is_mounted(&target) && !is_mounted(&staging));
    // The serving process exits once its mount is gone.
    let pid = pids[0];
    wait_for(
        "the serving process to exit",
        Duration::from_secs(30),
        || {
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true)
        },
    );
    assert!(
        std::fs::read_dir(h.path("state")).unwrap().next().is_none(),
        "state record left"
    );
    h.mounts.clear();
}

#[tokio::test]
async fn csi_mount_group_lets_a_non_root_pod_write() {
    let mut h = Harness::start();
    let (v, staging, target) = staged_static(
        &mut h,
        "csi-fsgroup",
        mount_cap(Mode::SingleNodeWriter, &[], "3000"),
    )
    .await;
    // The pod: uid 1000, gid 1000, supplementary group 3000 (its fsGroup), no capabilities.
    let mut pod = Command::new("setpriv");
    pod.args(["--reuid=1000", "--regid=1000", "--groups=3000", "--inh-caps=-all", "--"])
        .args(["sh", "-c"])
        .arg("echo from-non-root > \"$1\"/owned.txt && mkdir \"$1\"/sub && echo x > \"$1\"/sub/f && cat \"$1\"/owned.txt")
        .arg("sh")
        .arg(&target)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Run the pod in its own process group so a hang can be cleaned up.
    pod.process_group(0);
    let mut child = pod.spawn().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the non-root writer hung"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "non-root write failed: {err}");
    assert_eq!(out.trim(), "from-non-root");
    // What the pod creates stays in its fsGroup, as on any fsGroup volume.
    for created in ["owned.txt", "sub", "sub/f"] {
        let gid =
            std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(target.join(created)).unwrap());
        assert_eq!(gid, 3000, "{created} joins the fsGroup");
    }
    let mut node = h.node().await;
    unpublish(&mut node, &v, &target).await;
    unstage(&mut node, &v, &staging).await;
    h.mounts.clear();
}

fn mount_count(p: &Path) -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
        .count()
}

#[tokio::test]
async fn csi_concurrent_calls_on_one_volume_are_serialised() {
    let mut h = Harness::start();
    let s3 = store().await;
    let bucket = s3vol_s3::testing::unique_bucket("csi-conc");
    s3.create_bucket(&bucket).await.unwrap();
    let v = Volume {
        id: format!("static-{bucket}"),
        context: HashMap::from([
            ("bucket".to_owned(), bucket.to_string()),
            ("endpoint".to_owned(), s3vol_s3::testing::endpoint()),
            ("forcePathStyle".to_owned(), "true".to_owned()),
        ]),
    };
    let staging = h.path("staging/vol");
    let target = h.path("pods/p/mount");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    h.mounts.extend([staging.clone(), target.clone()]);
    let cap = mount_cap(Mode::SingleNodeWriter, &[], "");
    let mut calls = Vec::new();
    for _ in 0..4 {
        let mut node = h.node().await;
        let req = NodeStageVolumeRequest {
            volume_id: v.id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            volume_context: v.context.clone(),
            secrets: secrets(),
            ..Default::default()
        };
        calls.push(tokio::spawn(async move {
            node.node_stage_volume(req).await.map(|_| ())
        }));
    }
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert_eq!(
        mount_count(&staging),
        1,
        "one mount however many stage calls"
    );
    let mut calls = Vec::new();
    for _ in 0..4 {
        let mut node = h.node().await;
        let req = NodePublishVolumeRequest {
            volume_id: v.id.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        };
        calls.push(tokio::spawn(async move {
            node.node_publish_volume(req).await.map(|_| ())
        }));
    }
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert_eq!(
        mount_count(&target),
        1,
        "one bind mount however many publish calls"
    );
    assert_eq!(h.serving_pids().len(), 1);
    std::fs::write(target.join("f"), b"x").unwrap();
    let mut node = h.node().await;
    unpublish(&mut node, &v, &target).await;
    unstage(&mut node, &v, &staging).await;
    assert_eq!(mount_count(&target) + mount_count(&staging), 0);
    h.mounts.clear();
}
