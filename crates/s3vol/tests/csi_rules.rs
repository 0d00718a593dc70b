//! The CSI and COSI rules a driver must keep whatever client calls it, against the real `s3vol`
//! binary on unix sockets in a temporary directory:
//!
//! - any `:authority` is served (a socket path, a percent-encoded path, empty, `localhost`):
//!   kubelets before 1.26, grpc-java, grpcio and csc send such values, and h2 used to reset the
//!   stream (see vendor/PATCHES.md). The requests are written frame by frame with h2's own codec
//!   so the test controls the header block exactly;
//! - the controller's CSI v1.9 rules (CreateVolume idempotency with capacity ranges,
//!   ValidateVolumeCapabilities of unknown volumes, ControllerExpandVolume), against the test
//!   S3 server.
//!
//! Every process is killed and every socket removed when a test ends, also when it fails. Every
//! wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use h2::frame::{self, Frame, Pseudo, StreamId};
use tokio::io::AsyncWriteExt;

const BIN: &str = env!("CARGO_BIN_EXE_s3vol");

/// A driver process on a socket in a temporary directory; killed on drop.
struct Driver {
    dir: tempfile::TempDir,
    child: Option<Child>,
    sock: PathBuf,
}

impl Driver {
    fn start(args: &[&str], sock_name: &str, endpoint_flag: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("s3vol-rules-")
            .tempdir()
            .unwrap();
        Self::start_in(dir, args, sock_name, endpoint_flag)
    }

    fn start_in(
        dir: tempfile::TempDir,
        args: &[&str],
        sock_name: &str,
        endpoint_flag: &str,
    ) -> Self {
        let sock = dir.path().join(sock_name);
        let log = std::fs::File::create(dir.path().join("driver.log")).unwrap();
        let child = Command::new(BIN)
            .args(args)
            .arg(endpoint_flag)
            .arg(format!("unix://{}", sock.display()))
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("S3VOL_TEST_ACCESS_KEY_ID")
            .env_remove("S3VOL_TEST_SECRET_ACCESS_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Driver {
            dir,
            child: Some(child),
            sock,
        };
        let start = Instant::now();
        while !d.sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the driver did not create its socket:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn csi_controller() -> Self {
        Self::start(
            &["csi", "--node-id", "n1", "--mode", "controller"],
            "csi.sock",
            "--endpoint",
        )
    }

    fn cosi() -> Self {
        Self::start(
            &[
                "cosi",
                "--secrets-dir",
                "/nonexistent/s3vol-cosi-secrets",
                "--endpoint-url",
                "http://127.0.0.1:9",
            ],
            "cosi.sock",
            "--endpoint",
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("driver.log")).unwrap_or_default()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- driver log ----\n{}", self.log());
        }
    }
}

/// How the server ended one request.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Trailers with this `grpc-status`, after this response body.
    Answered { grpc_status: String, body: Vec<u8> },
    /// RST_STREAM with this reason.
    Reset(h2::Reason),
}

/// Calls the unary method `path` with an empty message on a fresh HTTP/2 connection to `sock`,
/// sending `authority` as `:authority` (`None`: no `:authority` at all) exactly as given.
async fn call_with_authority(sock: &Path, path: &str, authority: Option<&str>) -> Outcome {
    let mut io = tokio::net::UnixStream::connect(sock).await.unwrap();
    io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut codec: h2::Codec<_, Bytes> = h2::Codec::new(io);
    codec
        .send(Frame::Settings(frame::Settings::default()))
        .await
        .unwrap();
    let text = |s: &str| frame::BytesStr::try_from(Bytes::copy_from_slice(s.as_bytes())).unwrap();
    let pseudo = Pseudo {
        method: Some(http::Method::POST),
        scheme: Some(text("http")),
        authority: authority.map(text),
        path: Some(text(path)),
        ..Pseudo::default()
    };
    let mut fields = http::HeaderMap::new();
    fields.insert("content-type", "application/grpc".parse().unwrap());
    fields.insert("te", "trailers".parse().unwrap());
    let stream = StreamId::from(1);
    codec
        .send(Frame::Headers(frame::Headers::new(stream, pseudo, fields)))
        .await
        .unwrap();
    // One empty, uncompressed gRPC message.
    let mut data = frame::Data::new(stream, Bytes::from_static(&[0, 0, 0, 0, 0]));
    data.set_end_stream(true);
    codec.send(Frame::Data(data)).await.unwrap();

    let mut body = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let next = tokio::time::timeout_at(deadline, codec.next())
            .await
            .expect("no answer within 20 s")
            .expect("the server closed the connection")
            .unwrap();
        match next {
            Frame::Settings(s) if !s.is_ack() => {
                codec
                    .send(Frame::Settings(frame::Settings::ack()))
                    .await
                    .unwrap();
            }
            Frame::Data(d) if d.stream_id() == stream => body.extend_from_slice(d.payload()),
            Frame::Headers(h) if h.stream_id() == stream && h.is_end_stream() => {
                let grpc_status = h
                    .fields()
                    .get("grpc-status")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                return Outcome::Answered { grpc_status, body };
            }
            Frame::Reset(r) if r.stream_id() == stream => return Outcome::Reset(r.reason()),
            Frame::GoAway(g) => panic!("GOAWAY {:?}", g.reason()),
            _ => {}
        }
    }
}

/// Every `:authority` gRPC clients send on unix sockets.
fn authorities(sock: &Path) -> Vec<Option<String>> {
    let path = sock.to_str().unwrap().to_owned();
    let encoded: String = path.replace('/', "%2F");
    vec![
        // kubelet < 1.26, grpc-java, csc
        Some(path),
        // grpcio (gRPC C-core >= 1.57)
        Some(encoded),
        Some(String::new()),
        Some("localhost".to_owned()),
        Some("/var/lib/kubelet/plugins/csi.s3vol.io/csi.sock".to_owned()),
        Some("%2Fvar%2Flib%2Fkubelet%2Fplugins%2Fcsi.s3vol.io%2Fcsi.sock".to_owned()),
        None,
    ]
}

/// The protobuf field 1 (a string) of a one-message gRPC body.
fn first_string_field(body: &[u8]) -> String {
    assert!(body.len() >= 5, "no gRPC message in {body:?}");
    let msg = &body[5..];
    assert_eq!(msg[0], 0x0a, "field 1, length-delimited: {msg:?}");
    let len = msg[1] as usize;
    String::from_utf8(msg[2..2 + len].to_vec()).unwrap()
}

#[tokio::test]
async fn any_authority_is_served_by_the_csi_socket() {
    let d = Driver::csi_controller();
    for authority in authorities(&d.sock) {
        let got = call_with_authority(
            &d.sock,
            "/csi.v1.Identity/GetPluginInfo",
            authority.as_deref(),
        )
        .await;
        match got {
            Outcome::Answered { grpc_status, body } => {
                assert_eq!(grpc_status, "0", "{authority:?}");
                assert_eq!(first_string_field(&body), "csi.s3vol.io", "{authority:?}");
            }
            other => panic!(":authority {authority:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn any_authority_is_served_by_the_cosi_socket() {
    let d = Driver::cosi();
    for authority in authorities(&d.sock) {
        for method in [
            "/cosi.v1alpha1.Identity/DriverGetInfo",
            "/sigs.k8s.io.cosi.v1alpha2.Identity/DriverGetInfo",
        ] {
            match call_with_authority(&d.sock, method, authority.as_deref()).await {
                Outcome::Answered { grpc_status, body } => {
                    assert_eq!(grpc_status, "0", "{method} {authority:?}");
                    assert_eq!(
                        first_string_field(&body),
                        "cosi.s3vol.io",
                        "{method} {authority:?}"
                    );
                }
                other => panic!("{method} :authority {authority:?}: {other:?}"),
            }
        }
    }
}

/// SIGTERM ends a driver although a client keeps its connection open (the kubelet and the COSI
/// sidecar do, between calls) and one call never finishes (its client never sends the request
/// body): calls in progress get a grace of 10 s, and nothing holds the exit longer.
async fn sigterm_ends_the_driver_while_a_call_never_finishes(mut d: Driver, method: &str) {
    let io = tokio::net::UnixStream::connect(&d.sock).await.unwrap();
    let (mut h2c, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    // Headers without the end of the stream: the server waits for a body that never comes.
    let (_response, _body) = h2c.send_request(request, false).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let child = d.child.as_mut().unwrap();
    // SAFETY: kill(2) of the driver this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "{method}: still running 40 s after SIGTERM with a call in progress:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}\n{}", d.log());
}

#[tokio::test]
async fn sigterm_ends_the_csi_driver_while_a_call_never_finishes() {
    let d = Driver::csi_controller();
    let sock = d.sock.clone();
    sigterm_ends_the_driver_while_a_call_never_finishes(d, "/csi.v1.Identity/GetPluginInfo").await;
    assert!(!sock.exists(), "the socket is removed at exit");
}

#[tokio::test]
async fn sigterm_ends_the_cosi_driver_while_a_call_never_finishes() {
    sigterm_ends_the_driver_while_a_call_never_finishes(
        Driver::cosi(),
        "/cosi.v1alpha1.Identity/DriverGetInfo",
    )
    .await;
}

// ---- CSI rules against the test S3 server --------------------------------------------------

use std::collections::HashMap;

use hyper_util::rt::TokioIo;
use s3vol_csi::proto::controller_client::ControllerClient;
use s3vol_csi::proto::identity_client::IdentityClient;
use s3vol_csi::proto::node_client::NodeClient;
use s3vol_csi::proto::volume_capability::access_mode::Mode;
use s3vol_csi::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use s3vol_csi::proto::*;
use s3vol_s3::{AwsStore, BucketName, ObjectStore, S3Error};
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

async fn channel(sock: &Path) -> Channel {
    let sock = sock.to_owned();
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(120))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(sock).await?))
            }
        }))
        .await
        .unwrap()
}

/// A name no other test run uses.
fn unique(stem: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{stem}-{}-{nanos}", std::process::id())
}

fn secrets() -> HashMap<String, String> {
    let c = s3vol_s3::testing::credentials();
    HashMap::from([
        ("accessKeyID".to_owned(), c.access_key_id),
        ("secretAccessKey".to_owned(), c.secret_access_key),
    ])
}

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

fn cap(flags: &[&str]) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: String::new(),
            mount_flags: flags.iter().map(|s| s.to_string()).collect(),
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
    }
}

fn range(required_bytes: i64, limit_bytes: i64) -> Option<CapacityRange> {
    Some(CapacityRange {
        required_bytes,
        limit_bytes,
    })
}

fn create_req(
    name: &str,
    r: Option<CapacityRange>,
    params: HashMap<String, String>,
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: r,
        volume_capabilities: vec![cap(&[])],
        parameters: params,
        secrets: secrets(),
        ..Default::default()
    }
}

fn err<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Status {
    r.expect_err("the call should fail")
}

/// `s3vol csi --mode all` alone: no mounter started by the test. On drop: lazy unmounts of
/// every path the test mounted, SIGTERM to the driver (which stops the mounter it started),
/// SIGKILL after a bounded wait, and SIGKILL of any serving process the state dir names.
struct AllInOne {
    driver: Driver,
    mounts: Vec<PathBuf>,
}

impl AllInOne {
    fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("s3vol-rules-all-")
            .tempdir()
            .unwrap();
        let mounter = dir.path().join("mounter/mounter.sock");
        let state = dir.path().join("state");
        let kubelet = dir.path().to_str().unwrap().to_owned();
        let driver = Driver::start_in(
            dir,
            &[
                "csi",
                "--node-id",
                "n1",
                "--mode",
                "all",
                "--state-dir",
                state.to_str().unwrap(),
                "--kubelet-dir",
                &kubelet,
                "--mounter-socket",
                mounter.to_str().unwrap(),
                "--mount-timeout",
                "60",
            ],
            "csi.sock",
            "--endpoint",
        );
        AllInOne {
            driver,
            mounts: Vec::new(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.driver.dir.path().join(rel)
    }
}

impl Drop for AllInOne {
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
        if let Some(c) = self.driver.child.take() {
            let mut c = c;
            // SAFETY: kill(2) of our own unreaped child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while c.try_wait().ok().flatten().is_none() && start.elapsed() < Duration::from_secs(70)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // The mounter the driver started, should the driver not have stopped it (it was
        // killed above): its pid is in the driver's log.
        if let Some(pid) = started_mounter(&self.driver.log()) {
            // SAFETY: kill(2); at worst the mounter is already gone (ESRCH).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The pid of the mounter `--mode all` says it started.
fn started_mounter(log: &str) -> Option<i32> {
    log.lines()
        .find(|l| l.contains("started a mounter"))
        .and_then(|l| {
            l.split("pid=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

fn mounted_at(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
}

#[tokio::test]
async fn mode_all_is_a_complete_driver_that_keeps_the_csi_rules() {
    let mut h = AllInOne::start();
    let ch = channel(&h.driver.sock).await;
    let mut id = IdentityClient::new(ch.clone());
    let mut ctl = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch);

    // The mounter the driver started answers: ready.
    let probe = id.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true), "{}", h.driver.log());
    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(caps.capabilities.iter().any(|c| matches!(
        c.r#type,
        Some(plugin_capability::Type::VolumeExpansion(
            plugin_capability::VolumeExpansion { r#type: 1 }
        ))
    )));
    let caps = ctl
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(caps.capabilities.iter().any(|c| matches!(
        c.r#type,
        Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc { r#type: 9 }
        ))
    )));

    // CreateVolume: repeated with no range or a compatible one → the same volume.
    let name = unique("rules");
    let params = sc_params(&[("mode", "bucket")]);
    let v = ctl
        .create_volume(create_req(&name, range(1 << 20, 0), params.clone()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 1 << 20);
    for r in [
        None,
        range(0, 0),
        range(1 << 19, 4 << 20),
        range(0, 1 << 20),
    ] {
        let again = ctl
            .create_volume(create_req(&name, r, params.clone()))
            .await
            .unwrap_or_else(|e| panic!("{r:?}: {e}"))
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(again, v, "{r:?}");
    }
    for r in [range(2 << 20, 0), range(0, 1 << 19)] {
        let e = err(ctl
            .create_volume(create_req(&name, r, params.clone()))
            .await);
        assert_eq!(e.code(), Code::AlreadyExists, "{r:?}: {e}");
    }

    // ValidateVolumeCapabilities of the volume: confirmed.
    let validate = |volume_id: &str| ValidateVolumeCapabilitiesRequest {
        volume_id: volume_id.into(),
        volume_capabilities: vec![cap(&[])],
        volume_context: v.volume_context.clone(),
        secrets: secrets(),
        ..Default::default()
    };
    let ok = ctl
        .validate_volume_capabilities(validate(&v.volume_id))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    // An id of s3vol's shape that was never created.
    let bucket_name = v.volume_context["bucket"].clone();
    let never = v.volume_id.replacen(&bucket_name, &unique("never"), 1);
    let e = err(ctl.validate_volume_capabilities(validate(&never)).await);
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // ControllerExpandVolume: recorded in the marker, no node expansion.
    let expand = |r: Option<CapacityRange>| ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        capacity_range: r,
        secrets: secrets(),
        volume_capability: Some(cap(&[])),
    };
    let got = ctl
        .controller_expand_volume(expand(range(3 << 20, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.capacity_bytes, 3 << 20);
    assert!(!got.node_expansion_required);
    let bucket = BucketName::new(v.volume_context["bucket"].clone()).unwrap();
    let store = AwsStore::new(&s3vol_s3::testing::config()).await;
    let marker = {
        use futures::TryStreamExt;
        let got = store
            .get_object(&bucket, ".s3vol-volume.json", None, None)
            .await
            .unwrap();
        let chunks: Vec<Bytes> = got.body.try_collect().await.unwrap();
        serde_json::from_slice::<serde_json::Value>(&chunks.concat()).unwrap()
    };
    assert_eq!(marker["capacityBytes"], 3 << 20);
    // A resize whose StorageClass forgot the controller-expand Secret (the resizer then sends
    // none) names the parameters to set, and records nothing.
    let e = err(ctl
        .controller_expand_volume(ControllerExpandVolumeRequest {
            secrets: HashMap::new(),
            ..expand(range(5 << 20, 0))
        })
        .await);
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert!(
        e.message()
            .contains("csi.storage.k8s.io/controller-expand-secret-name"),
        "{e}"
    );
    // The same for a claim whose StorageClass sets no provisioner Secret: nothing is made.
    let secretless = unique("secretless");
    let e = err(ctl
        .create_volume(CreateVolumeRequest {
            secrets: HashMap::new(),
            ..create_req(&secretless, range(1 << 20, 0), params.clone())
        })
        .await);
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert!(
        e.message()
            .contains("csi.storage.k8s.io/provisioner-secret-name"),
        "{e}"
    );

    // Stage and publish on this node, with the mounter the driver started.
    let staging = h.path("staging");
    let target = h.path("target");
    std::fs::create_dir_all(&staging).unwrap();
    h.mounts.extend([staging.clone(), target.clone()]);
    // A mount option the serving process could not run with is refused at NodeStage, and
    // nothing is mounted.
    let e = err(node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap(&["memory-limit=1"])),
            volume_context: v.volume_context.clone(),
            secrets: secrets(),
            ..Default::default()
        })
        .await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("memory-limit"), "{e}");
    assert!(!mounted_at(&staging));
    node.node_stage_volume(NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap(&[])),
        volume_context: v.volume_context.clone(),
        secrets: secrets(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("stage: {e}\n{}", h.driver.log()));
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap(&[])),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    std::fs::write(target.join("hello.txt"), b"through --mode all").unwrap();
    assert_eq!(
        std::fs::read(target.join("hello.txt")).unwrap(),
        b"through --mode all"
    );
    let head = store.head_object(&bucket, "hello.txt").await;
    assert!(head.is_ok(), "the file is in the bucket: {head:?}");

    // NodeGetVolumeStats: a relative path or a path where it is not mounted is NOT_FOUND, as
    // is an unknown volume; the staging path answers.
    let stats = |volume_id: &str, path: &str| NodeGetVolumeStatsRequest {
        volume_id: volume_id.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };
    for (vid, path) in [
        (v.volume_id.as_str(), "relative/path"),
        (v.volume_id.as_str(), "staging"),
        (v.volume_id.as_str(), "/"),
        ("bucket:never-staged-here", staging.to_str().unwrap()),
    ] {
        let e = err(node.node_get_volume_stats(stats(vid, path)).await);
        assert_eq!(e.code(), Code::NotFound, "{vid} {path}: {e}");
    }
    let e = err(node.node_get_volume_stats(stats(&v.volume_id, "")).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    let ok = node
        .node_get_volume_stats(stats(&v.volume_id, staging.to_str().unwrap()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.volume_condition.map(|c| c.abnormal), Some(false));

    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .unwrap();
    assert!(!mounted_at(&staging));
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        secrets: secrets(),
    })
    .await
    .unwrap();
    // Deleted: validation and expansion no longer find it.
    let e = err(ctl
        .validate_volume_capabilities(validate(&v.volume_id))
        .await);
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = err(ctl
        .controller_expand_volume(expand(range(4 << 20, 0)))
        .await);
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // Close the connections (the driver's graceful shutdown waits for them), then stop the
    // driver: it stops the mounter it started.
    drop((id, ctl, node));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mounter_pid =
        started_mounter(&h.driver.log()).expect("the driver says which mounter it started");
    let mut child = h.driver.child.take().unwrap();
    // SAFETY: kill(2) of our own unreaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the driver did not stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SAFETY: signal 0 only checks whether the process exists.
    let alive = unsafe { libc::kill(mounter_pid, 0) } == 0;
    assert!(
        !alive,
        "the mounter {mounter_pid} outlived the driver that started it"
    );
}

#[tokio::test]
async fn broken_secrets_and_parameters_are_refused_before_anything_is_made() {
    let d = Driver::csi_controller();
    let mut ctl = ControllerClient::new(channel(&d.sock).await);
    let store = AwsStore::new(&s3vol_s3::testing::config()).await;
    let params = sc_params(&[("mode", "bucket")]);
    let empty = |kv: &[(&str, &str)]| -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut cases: Vec<(&str, CreateVolumeRequest)> = Vec::new();
    for (what, s) in [
        (
            "empty key values",
            empty(&[("accessKeyID", ""), ("secretAccessKey", "")]),
        ),
        ("only a session token", empty(&[("sessionToken", "T")])),
        (
            "a NUL in the secret",
            empty(&[("accessKeyID", "A\0K"), ("secretAccessKey", "S")]),
        ),
    ] {
        let mut r = create_req(&unique("sec"), None, params.clone());
        r.secrets = s;
        cases.push((what, r));
    }
    for (what, extra) in [
        ("a region that is a flag", ("region", "--read-only")),
        ("a NUL in a parameter", ("bucketPrefix", "a\0b")),
        (
            "a CRLF in the endpoint",
            ("endpoint", "http://127.0.0.1:1\r\nX: y"),
        ),
    ] {
        cases.push((
            what,
            create_req(
                &unique("par"),
                None,
                sc_params(&[("mode", "bucket"), extra]),
            ),
        ));
    }
    let huge = "k".repeat(200_000);
    cases.push((
        "a huge unknown parameter",
        create_req(
            &unique("huge"),
            None,
            sc_params(&[("mode", "bucket"), (huge.as_str(), "v")]),
        ),
    ));
    for (what, req) in cases {
        let name = req.name.clone();
        let e = err(ctl.create_volume(req).await);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e}");
        assert!(
            e.message().len() < 2048,
            "{what}: {} bytes",
            e.message().len()
        );
        assert!(
            !e.message().contains('\0') && !e.message().contains('\n'),
            "{what}: {e}"
        );
        // Nothing was made, and the driver's own identity was never tried.
        let bucket = BucketName::new(name.clone()).unwrap();
        assert!(
            matches!(
                store.head_bucket(&bucket).await,
                Err(S3Error::NoSuchBucket(_) | S3Error::NotFound(_))
            ),
            "{what}: bucket {name} exists"
        );
    }
    assert!(d.log().contains("serving CSI"));
}
