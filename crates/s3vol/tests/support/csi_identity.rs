//! Credentials of a staged volume change while it is mounted (a submodule of the `csi` tests,
//! using its harness): keys of a rotated Secret reach the running serving process through
//! NodePublishVolume (republish) → mounter → credentials pipe, with no remount, and no secret
//! ever shows in argv, the environment, logs, state files or error messages.
//!
//! Each test has its own bucket and IAM user (names carry the bucket's unique name); an
//! [`IamUser`] guard deletes the user, its keys and its policy even when the test fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use aws_sdk_iam::Client as IamClient;
use s3vol_s3::{CredentialSource, StaticCredentials};

use super::*;

async fn iam() -> IamClient {
    IamClient::new(&s3vol_s3::testing::config().load_shared_config().await)
}

/// An IAM user allowed everything on one bucket; deleted (keys, policy, user) on drop.
struct IamUser {
    name: String,
    keys: Vec<String>,
}

impl IamUser {
    async fn create(name: &str, bucket: &BucketName) -> Self {
        let iam = iam().await;
        iam.create_user().user_name(name).send().await.unwrap();
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Action": "s3:*",
                "Resource": [format!("arn:aws:s3:::{bucket}"), format!("arn:aws:s3:::{bucket}/*")]
            }]
        });
        iam.put_user_policy()
            .user_name(name)
            .policy_name("bucket")
            .policy_document(policy.to_string())
            .send()
            .await
            .unwrap();
        IamUser {
            name: name.to_owned(),
            keys: Vec::new(),
        }
    }

    async fn new_key(&mut self) -> StaticCredentials {
        let k = iam()
            .await
            .create_access_key()
            .user_name(&self.name)
            .send()
            .await
            .unwrap()
            .access_key
            .unwrap();
        self.keys.push(k.access_key_id.clone());
        StaticCredentials {
            access_key_id: k.access_key_id,
            secret_access_key: k.secret_access_key,
            session_token: None,
        }
    }

    async fn delete_key(&mut self, id: &str) {
        iam()
            .await
            .delete_access_key()
            .user_name(&self.name)
            .access_key_id(id)
            .send()
            .await
            .unwrap();
        self.keys.retain(|k| k != id);
    }
}

impl Drop for IamUser {
    fn drop(&mut self) {
        let name = self.name.clone();
        let keys = std::mem::take(&mut self.keys);
        // Drop cannot await; a thread with a runtime of its own can (and works inside one).
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let iam = iam().await;
                for k in keys {
                    let _ = iam
                        .delete_access_key()
                        .user_name(&name)
                        .access_key_id(k)
                        .send()
                        .await;
                }
                let _ = iam
                    .delete_user_policy()
                    .user_name(&name)
                    .policy_name("bucket")
                    .send()
                    .await;
                let _ = iam.delete_user().user_name(&name).send().await;
            });
        })
        .join();
    }
}

fn secret_of(k: &StaticCredentials) -> HashMap<String, String> {
    HashMap::from([
        ("accessKeyID".to_owned(), k.access_key_id.clone()),
        ("secretAccessKey".to_owned(), k.secret_access_key.clone()),
    ])
}

async fn store_with(k: &StaticCredentials) -> AwsStore {
    let mut c = s3vol_s3::testing::config();
    c.credentials = CredentialSource::Static(k.clone());
    c.max_attempts = 1;
    AwsStore::new(&c).await
}

fn static_volume(bucket: &BucketName) -> Volume {
    Volume {
        id: format!("static-{bucket}"),
        context: HashMap::from([
            ("bucket".to_owned(), bucket.to_string()),
            ("endpoint".to_owned(), s3vol_s3::testing::endpoint()),
            ("region".to_owned(), "us-east-1".to_owned()),
            ("forcePathStyle".to_owned(), "true".to_owned()),
        ]),
    }
}

async fn publish_with(
    node: &mut NodeClient<Channel>,
    v: &Volume,
    staging: &Path,
    target: &Path,
    secrets: HashMap<String, String>,
) -> Result<(), tonic::Status> {
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter, &[], "")),
        readonly: false,
        volume_context: v.context.clone(),
        secrets,
        ..Default::default()
    })
    .await
    .map(|_| ())
}

/// Writes a new file through the mount (each `close` is an upload) until stopped; counts the
/// files written and records the first error.
struct Writer {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<u64, String>>>,
}

impl Writer {
    fn start(dir: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, written) = (stop.clone(), written.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let p = dir.join(format!("w-{n:05}"));
                    let body = format!("file {n}\n").repeat(100);
                    // fsync: the upload's own error, which close would swallow.
                    write_durably(&p, body.as_bytes())
                        .map_err(|e| format!("writing {}: {e}", p.display()))?;
                    let back =
                        std::fs::read(&p).map_err(|e| format!("reading {}: {e}", p.display()))?;
                    if back != body.as_bytes() {
                        return Err(format!("{} reads back other bytes", p.display()));
                    }
                    n += 1;
                    written.store(n, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(n)
            })
        };
        Writer {
            stop,
            written,
            thread: Some(thread),
        }
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `more` further files are written; fails if the writer failed.
    fn wait_for_more(&mut self, more: u64, what: &str) {
        let goal = self.written() + more;
        let start = Instant::now();
        while self.written() < goal {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                let r = self.thread.take().unwrap().join().unwrap();
                panic!("the writer stopped {what}: {r:?}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the writer made no progress {what} (at {})",
                self.written()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let r = self.thread.take().unwrap().join().unwrap();
        r.unwrap_or_else(|e| panic!("the application saw an error: {e}"))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn csi_secret_keys_rotate_three_times_without_remount_while_writing() {
    let mut h = Harness::start();
    let admin = store().await;
    let bucket = s3vol_s3::testing::unique_bucket("rotate");
    admin.create_bucket(&bucket).await.unwrap();
    let mut user = IamUser::create(&format!("s3vol-{bucket}"), &bucket).await;
    let mut key = user.new_key().await;

    let v = static_volume(&bucket);
    let staging = h.path("staging/vol");
    let target = h.path("pods/p/mount");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    h.mounts.extend([staging.clone(), target.clone()]);
    let mut node = h.node().await;
    node.node_stage_volume(NodeStageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter, &[], "")),
        volume_context: v.context.clone(),
        secrets: secret_of(&key),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("stage: {e}\n{}", h.csi_log()));
    publish_with(&mut node, &v, &staging, &target, secret_of(&key))
        .await
        .unwrap_or_else(|e| panic!("publish: {e}\n{}", h.csi_log()));
    let pids = h.serving_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");

    let mut writer = Writer::start(target.clone());
    writer.wait_for_more(3, "with the first key");
    for round in 1..=3 {
        let new = user.new_key().await;
        // The kubelet's republish with the rotated Secret.
        publish_with(&mut node, &v, &staging, &target, secret_of(&new))
            .await
            .unwrap_or_else(|e| panic!("republish {round}: {e}\n{}", h.csi_log()));
        // The republish returns once the serving process signs with the new key. Requests
        // signed just before may still be on their way: as an operator would, give them a
        // moment before the old key goes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let old = std::mem::replace(&mut key, new);
        user.delete_key(&old.access_key_id).await;
        // The old key is really dead: only the rotation keeps the mount working.
        let e = store_with(&old)
            .await
            .head_bucket(&bucket)
            .await
            .expect_err("a deleted key must be refused");
        assert!(
            !format!("{e}").contains(&old.secret_access_key),
            "an error names a secret: {e}"
        );
        writer.wait_for_more(5, &format!("after rotation {round}"));
    }
    let written = writer.finish();
    assert_eq!(
        h.serving_pids(),
        pids,
        "the volume was served by another process"
    );
    assert!(is_mounted(&target) && is_mounted(&staging));

    // Everything the application wrote is in the bucket, under the current key too.
    let listed = keys(&store_with(&key).await, &bucket, "").await;
    for n in 0..written {
        assert!(listed.contains(&format!("w-{n:05}")), "w-{n:05} is missing");
    }
    let log = h.csi_log();
    assert_eq!(
        log.matches("new credentials received").count(),
        3,
        "the serving process took three new keys:\n{log}"
    );
    unpublish(&mut node, &v, &target).await;
    unstage(&mut node, &v, &staging).await;
    h.mounts.clear();
}

#[tokio::test]
async fn csi_credentials_update_for_a_volume_staged_without_keys_is_refused() {
    let mut h = Harness::start();
    let bucket = s3vol_s3::testing::unique_bucket("rotnokeys");
    store().await.create_bucket(&bucket).await.unwrap();
    let v = static_volume(&bucket);
    let staging = h.path("staging/vol");
    let target = h.path("pods/p/mount");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    h.mounts.extend([staging.clone(), target.clone()]);
    let mut node = h.node().await;
    // Staged with keys, so the mount serves ...
    stage(
        &h,
        &mut node,
        &v,
        &staging,
        mount_cap(Mode::MultiNodeMultiWriter, &[], ""),
    )
    .await;
    // ... but a publish Secret that is not credentials is INVALID_ARGUMENT, and says so
    // without repeating its value.
    let e = publish_with(
        &mut node,
        &v,
        &staging,
        &target,
        HashMap::from([("accessKeyID".to_owned(), "HALFAPAIR".to_owned())]),
    )
    .await
    .expect_err("half a key pair");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(!is_mounted(&target));
    // The mounter no longer knows the serving process after its restart: the keys cannot be
    // handed over, and publish says so instead of pretending.
    let mounter = h.mounter.take().unwrap();
    let mut mounter = mounter;
    mounter.kill().unwrap();
    mounter.wait().unwrap();
    let _ = std::fs::remove_file(h.path("mounter.sock"));
    h.start_mounter();
    let e = publish_with(&mut node, &v, &staging, &target, secrets())
        .await
        .expect_err("no pipe to the serving process");
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(
        e.message().contains("mounter restarted")
            || e.message().contains("was the mounter restarted"),
        "{}",
        e.message()
    );
    assert!(!is_mounted(&target));
    unstage(&mut node, &v, &staging).await;
    h.mounts.clear();
}

/// An unsigned JWT whose `exp` lies `valid_s` seconds from now (the patched test server checks
/// only that; AWS would check the signature too).
fn jwt(sub: &str, valid_s: i64) -> String {
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(serde_json::json!({"alg": "RS256", "typ": "JWT"})),
        b64(
            serde_json::json!({"sub": sub, "aud": ["sts.amazonaws.com"], "exp": now + valid_s, "nonce": unique_tag()})
        )
    )
}

fn unique_tag() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// An IAM role pods may assume with a web identity, with one inline policy; deleted on drop.
struct IamRole {
    name: String,
    arn: String,
}

impl IamRole {
    async fn create(name: &str, actions: &[&str], bucket: &BucketName) -> Self {
        let iam = iam().await;
        let trust = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/kubernetes"},
                "Action": "sts:AssumeRoleWithWebIdentity"
            }]
        });
        let role = iam
            .create_role()
            .role_name(name)
            .assume_role_policy_document(trust.to_string())
            .send()
            .await
            .unwrap()
            .role
            .unwrap();
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Action": actions,
                "Resource": [format!("arn:aws:s3:::{bucket}"), format!("arn:aws:s3:::{bucket}/*")]
            }]
        });
        iam.put_role_policy()
            .role_name(name)
            .policy_name("bucket")
            .policy_document(policy.to_string())
            .send()
            .await
            .unwrap();
        IamRole {
            name: name.to_owned(),
            arn: role.arn,
        }
    }
}

impl Drop for IamRole {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let iam = iam().await;
                let _ = iam
                    .delete_role_policy()
                    .role_name(&name)
                    .policy_name("bucket")
                    .send()
                    .await;
                let _ = iam.delete_role().role_name(&name).send().await;
            });
        })
        .join();
    }
}

/// The volume context the kubelet sends NodePublishVolume for a pod with a token
/// (`tokenRequests`, `podInfoOnMount`).
fn pod_context(v: &Volume, pod: &str, token: &str) -> HashMap<String, String> {
    let mut c = v.context.clone();
    let tokens = serde_json::json!({
        "sts.amazonaws.com": {"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"}
    });
    c.insert(
        "csi.storage.k8s.io/serviceAccount.tokens".into(),
        tokens.to_string(),
    );
    c.insert("csi.storage.k8s.io/pod.namespace".into(), "apps".into());
    c.insert("csi.storage.k8s.io/pod.name".into(), pod.into());
    c
}

fn pod_volume(bucket: &BucketName, id: &str, role: &IamRole, extra: &[(&str, &str)]) -> Volume {
    let mut v = static_volume(bucket);
    v.id = id.to_owned();
    v.context
        .insert("authenticationSource".into(), "pod".into());
    v.context.insert("roleArn".into(), role.arn.clone());
    for (k, val) in extra {
        v.context.insert(k.to_string(), val.to_string());
    }
    v
}

async fn stage_and_publish_pod(
    h: &Harness,
    node: &mut NodeClient<Channel>,
    v: &Volume,
    staging: &Path,
    target: &Path,
    pod: &str,
    token: &str,
) -> Result<(), tonic::Status> {
    node.node_stage_volume(NodeStageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter, &[], "")),
        volume_context: v.context.clone(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("stage: {e}\n{}", h.csi_log()));
    republish_pod(node, v, staging, target, pod, token).await
}

async fn republish_pod(
    node: &mut NodeClient<Channel>,
    v: &Volume,
    staging: &Path,
    target: &Path,
    pod: &str,
    token: &str,
) -> Result<(), tonic::Status> {
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter, &[], "")),
        readonly: false,
        volume_context: pod_context(v, pod, token),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

/// Creates `path`, writes `data` and fsyncs: the fsync returns only once the bytes are in S3
/// (or with the upload's error), which `close` would swallow.
fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[tokio::test]
async fn csi_two_pods_with_different_roles_get_only_what_their_roles_allow() {
    let mut h = Harness::start();
    let admin = store().await;
    let bucket = s3vol_s3::testing::unique_bucket("pods");
    admin.create_bucket(&bucket).await.unwrap();
    admin
        .put_object(
            &bucket,
            "seed.txt",
            bytes::Bytes::from_static(b"seeded"),
            &PutOptions::default(),
        )
        .await
        .unwrap();
    let ro = IamRole::create(
        &format!("ro-{bucket}"),
        // The test server asks for s3:HeadBucket where AWS asks for s3:ListBucket.
        &["s3:GetObject", "s3:ListBucket", "s3:HeadBucket"],
        &bucket,
    )
    .await;
    let rw = IamRole::create(&format!("rw-{bucket}"), &["s3:*"], &bucket).await;
    let v_ro = pod_volume(&bucket, &format!("ro-{bucket}"), &ro, &[]);
    let v_rw = pod_volume(&bucket, &format!("rw-{bucket}"), &rw, &[]);
    let (st_ro, st_rw) = (h.path("staging/ro"), h.path("staging/rw"));
    let (t_ro, t_rw) = (h.path("pods/reader/mount"), h.path("pods/writer/mount"));
    for p in [&st_ro, &st_rw] {
        std::fs::create_dir_all(p).unwrap();
    }
    for p in [&t_ro, &t_rw] {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    }
    h.mounts
        .extend([t_ro.clone(), t_rw.clone(), st_ro.clone(), st_rw.clone()]);
    let mut node = h.node().await;
    let reader_token = jwt("system:serviceaccount:apps:reader", 3600);
    let writer_token = jwt("system:serviceaccount:apps:writer", 3600);
    stage_and_publish_pod(&h, &mut node, &v_ro, &st_ro, &t_ro, "reader", &reader_token)
        .await
        .unwrap_or_else(|e| panic!("publish reader: {e}\n{}", h.csi_log()));
    stage_and_publish_pod(&h, &mut node, &v_rw, &st_rw, &t_rw, "writer", &writer_token)
        .await
        .unwrap_or_else(|e| panic!("publish writer: {e}\n{}", h.csi_log()));
    // Nothing is mounted at staging: each pod has a mount (and a serving process) of its own.
    assert!(!is_mounted(&st_ro) && !is_mounted(&st_rw));
    assert!(is_mounted(&t_ro) && is_mounted(&t_rw));
    let pids = h.serving_pids();
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_ne!(pids[0], pids[1]);

    // Both read.
    assert_eq!(std::fs::read(t_ro.join("seed.txt")).unwrap(), b"seeded");
    assert_eq!(std::fs::read(t_rw.join("seed.txt")).unwrap(), b"seeded");
    // The reader's role may not write: EACCES, and nothing reaches the bucket.
    let e = write_durably(&t_ro.join("from-reader.txt"), b"no")
        .expect_err("a read-only role must not write");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    // The writer's may.
    write_durably(&t_rw.join("from-writer.txt"), b"yes")
        .unwrap_or_else(|e| panic!("the writer's role may write: {e}\n{}", h.csi_log()));
    let listed = keys(&admin, &bucket, "").await;
    assert!(listed.contains(&"from-writer.txt".to_owned()), "{listed:?}");
    assert!(
        !listed.contains(&"from-reader.txt".to_owned()),
        "{listed:?}"
    );

    // The same volume published for a second pod is a second mount, with its own process.
    let t_ro2 = h.path("pods/reader2/mount");
    std::fs::create_dir_all(t_ro2.parent().unwrap()).unwrap();
    h.mounts.push(t_ro2.clone());
    republish_pod(
        &mut node,
        &v_ro,
        &st_ro,
        &t_ro2,
        "reader2",
        &jwt("system:serviceaccount:apps:reader2", 3600),
    )
    .await
    .unwrap_or_else(|e| panic!("publish reader2: {e}\n{}", h.csi_log()));
    assert_eq!(h.serving_pids().len(), 3);

    for (v, t) in [(&v_ro, &t_ro), (&v_ro, &t_ro2), (&v_rw, &t_rw)] {
        unpublish(&mut node, v, t).await;
        assert!(!is_mounted(t));
    }
    assert!(
        h.serving_pids().is_empty(),
        "unpublish ends each pod's process"
    );
    unstage(&mut node, &v_ro, &st_ro).await;
    unstage(&mut node, &v_rw, &st_rw).await;
    h.mounts.clear();
}

#[tokio::test]
async fn csi_pod_token_that_expires_gives_eacces_and_a_refreshed_one_works_without_remount() {
    let mut h = Harness::start();
    let admin = store().await;
    let bucket = s3vol_s3::testing::unique_bucket("podexp");
    admin.create_bucket(&bucket).await.unwrap();
    let role = IamRole::create(&format!("exp-{bucket}"), &["s3:*"], &bucket).await;
    // Credentials that live 4 s (renewed after 3 s) and a token that lives 8 s: the mount
    // works, renews twice, then cannot renew any more.
    let v = pod_volume(
        &bucket,
        &format!("exp-{bucket}"),
        &role,
        &[("sessionDuration", "4")],
    );
    let staging = h.path("staging/vol");
    let target = h.path("pods/expiring/mount");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    h.mounts.extend([target.clone(), staging.clone()]);
    let mut node = h.node().await;
    let token = jwt("system:serviceaccount:apps:expiring", 8);
    stage_and_publish_pod(&h, &mut node, &v, &staging, &target, "expiring", &token)
        .await
        .unwrap_or_else(|e| panic!("publish: {e}\n{}", h.csi_log()));
    let published = Instant::now();
    let pids = h.serving_pids();
    write_durably(&target.join("early.txt"), b"1")
        .unwrap_or_else(|e| panic!("a valid token works: {e}\n{}", h.csi_log()));

    // Bounded: the token dies after 8 s, the last credentials a few seconds later.
    let start = Instant::now();
    let mut n = 0;
    let mut last_ok = published;
    let e = loop {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "requests still succeed a minute after the token expired\n{}",
            h.csi_log()
        );
        match write_durably(&target.join(format!("f-{n}")), b"x") {
            Ok(()) => {
                n += 1;
                last_ok = Instant::now();
            }
            Err(e) => break e,
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(errno(&e), libc::EACCES, "{e}\n{}", h.csi_log());
    // The first credentials expired 4 s after the publish: a write that succeeded later was
    // signed with renewed ones (however few writes a busy machine fitted in).
    assert!(
        last_ok.duration_since(published) > Duration::from_secs(5),
        "renewals with the valid token worked ({n} writes, the last {:?} after the publish)",
        last_ok.duration_since(published)
    );
    // The store may call the credentials expired up to a second before this node's clock
    // does (EACCES above); the provider says why at the first request after that second.
    let refused = "STS refused the pod's token";
    let deadline = Instant::now() + Duration::from_secs(15);
    while !h.csi_log().contains(refused) && Instant::now() < deadline {
        let _ = write_durably(&target.join("after-expiry"), b"x");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = h.csi_log();
    let line = log
        .lines()
        .find(|l| l.contains(refused))
        .unwrap_or_else(|| panic!("no log line says why:\n{log}"));
    assert!(
        line.contains("apps/expiring") && line.contains(&role.arn),
        "the line names the pod and the role: {line}"
    );
    assert!(!log.contains(&token), "the token is in a log");

    // The kubelet's republish with a fresh token: the same mount works again.
    let fresh = jwt("system:serviceaccount:apps:expiring", 3600);
    republish_pod(&mut node, &v, &staging, &target, "expiring", &fresh)
        .await
        .unwrap_or_else(|e| panic!("republish: {e}\n{}", h.csi_log()));
    let start = Instant::now();
    loop {
        match write_durably(&target.join("after-refresh.txt"), b"back") {
            Ok(()) => break,
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(30),
                "a refreshed token did not make the mount work again: {e}\n{}",
                h.csi_log()
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(h.serving_pids(), pids, "no remount");
    assert!(
        keys(&admin, &bucket, "")
            .await
            .contains(&"after-refresh.txt".to_owned())
    );
    unpublish(&mut node, &v, &target).await;
    unstage(&mut node, &v, &staging).await;
    h.mounts.clear();
}

/// Every file under `dir` (not following symlinks or crossing into mounts the test made).
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            files_under(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}

/// Where `needle` shows in `hay`, named `what`.
fn find_in(what: &str, hay: &[u8], needles: &[(&str, &str)], found: &mut Vec<String>) {
    for (name, needle) in needles {
        if hay.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            found.push(format!("{name} in {what}"));
        }
    }
}

#[tokio::test]
async fn csi_no_secret_or_token_shows_in_argv_environment_logs_state_or_errors() {
    // Every process of the test logs at every level (the drivers and the serving processes
    // they start inherit it). Each nextest test is a process of its own, and nothing else
    // reads the environment while it is set.
    // SAFETY: see above: no other thread of this process reads or writes the environment now.
    unsafe { std::env::set_var("RUST_LOG", "trace") };
    let mut h = Harness::start();
    let admin = store().await;
    let bucket = s3vol_s3::testing::unique_bucket("leaks");
    admin.create_bucket(&bucket).await.unwrap();
    let mut user = IamUser::create(&format!("s3vol-{bucket}"), &bucket).await;
    let first = user.new_key().await;
    let second = user.new_key().await;
    let role = IamRole::create(&format!("leak-{bucket}"), &["s3:*"], &bucket).await;
    let token = jwt("system:serviceaccount:apps:leaky", 3600);
    let second_token = jwt("system:serviceaccount:apps:leaky", 3600);
    let mut errors = Vec::new();

    // A Secret-based volume, its keys rotated once.
    let v = static_volume(&bucket);
    let staging = h.path("staging/vol");
    let target = h.path("pods/p/mount");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    h.mounts.extend([staging.clone(), target.clone()]);
    let mut node = h.node().await;
    // A wrong secret first: the error says so without quoting it.
    let wrong = StaticCredentials {
        secret_access_key: format!("{}WRONG", first.secret_access_key),
        ..first.clone()
    };
    let e = node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: v.id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter, &[], "")),
            volume_context: v.context.clone(),
            secrets: secret_of(&wrong),
            ..Default::default()
        })
        .await
        .expect_err("a wrong secret key cannot mount");
    errors.push(e.message().to_owned());
    node.node_stage_volume(NodeStageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter, &[], "")),
        volume_context: v.context.clone(),
        secrets: secret_of(&first),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("stage: {e}\n{}", h.csi_log()));
    publish_with(&mut node, &v, &staging, &target, secret_of(&first))
        .await
        .unwrap();
    write_durably(&target.join("one"), b"1").unwrap();
    publish_with(&mut node, &v, &staging, &target, secret_of(&second))
        .await
        .unwrap();
    write_durably(&target.join("two"), b"2").unwrap();
    // Half a key pair in a publish Secret: refused, not quoted.
    let e = publish_with(
        &mut node,
        &v,
        &staging,
        &target,
        HashMap::from([(
            "secretAccessKey".to_owned(),
            second.secret_access_key.clone(),
        )]),
    )
    .await
    .expect_err("half a key pair");
    errors.push(e.message().to_owned());

    // A pod-identity volume, its token refreshed once; and a publish whose role does not
    // exist (the STS refuses: the error says so).
    let vp = pod_volume(&bucket, &format!("pod-{bucket}"), &role, &[]);
    let (st_p, t_p) = (h.path("staging/pod"), h.path("pods/leaky/mount"));
    std::fs::create_dir_all(&st_p).unwrap();
    std::fs::create_dir_all(t_p.parent().unwrap()).unwrap();
    h.mounts.extend([t_p.clone(), st_p.clone()]);
    stage_and_publish_pod(&h, &mut node, &vp, &st_p, &t_p, "leaky", &token)
        .await
        .unwrap_or_else(|e| panic!("publish as pod: {e}\n{}", h.csi_log()));
    write_durably(&t_p.join("pod-one"), b"1").unwrap();
    republish_pod(&mut node, &vp, &st_p, &t_p, "leaky", &second_token)
        .await
        .unwrap();
    write_durably(&t_p.join("pod-two"), b"2").unwrap();
    let mut bad = pod_volume(&bucket, &format!("bad-{bucket}"), &role, &[]);
    bad.context.insert(
        "roleArn".into(),
        "arn:aws:iam::123456789012:role/does-not-exist".into(),
    );
    let t_bad = h.path("pods/bad/mount");
    std::fs::create_dir_all(t_bad.parent().unwrap()).unwrap();
    h.mounts.push(t_bad.clone());
    let e = stage_and_publish_pod(&h, &mut node, &bad, &st_p, &t_bad, "bad", &token)
        .await
        .expect_err("an unknown role");
    errors.push(e.message().to_owned());

    let secrets = [
        ("the first secret key", first.secret_access_key.as_str()),
        ("the second secret key", second.secret_access_key.as_str()),
        ("the wrong secret key", wrong.secret_access_key.as_str()),
        ("the first token", token.as_str()),
        ("the refreshed token", second_token.as_str()),
    ];
    let mut found = Vec::new();
    // A canary proves the search finds what is there: a process holding the token in its
    // environment.
    let mut canary = Command::new("sleep")
        .arg("60")
        .env("S3VOL_LEAK_CANARY", &token)
        .spawn()
        .unwrap();
    let canary_pid = canary.id() as i32;
    // argv and environment of every process on the machine (the drivers, every serving
    // process, anything they started).
    let serving = h.serving_pids();
    assert_eq!(serving.len(), 2, "{serving:?}");
    let mut read_serving = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 {
            // This test holds the secrets itself.
            continue;
        }
        for what in ["cmdline", "environ"] {
            if let Ok(b) = std::fs::read(format!("/proc/{pid}/{what}")) {
                if serving.contains(&pid) {
                    read_serving += 1;
                }
                find_in(&format!("/proc/{pid}/{what}"), &b, &secrets, &mut found);
            }
        }
    }
    assert_eq!(
        read_serving, 4,
        "the serving processes' argv and environment were read"
    );
    // Logs (at trace level), the state directory, the cache directories.
    let log = h.csi_log();
    assert!(
        log.contains("TRACE") && log.contains("new credentials received"),
        "the logs are at trace level and cover the rotation"
    );
    find_in("the logs", log.as_bytes(), &secrets, &mut found);
    let mut files = Vec::new();
    files_under(&h.path("state"), &mut files);
    files_under(&h.path("cache"), &mut files);
    assert!(!files.is_empty());
    for f in files {
        if let Ok(b) = std::fs::read(&f) {
            find_in(&f.display().to_string(), &b, &secrets, &mut found);
        }
    }
    for (i, e) in errors.iter().enumerate() {
        find_in(
            &format!("error message {i} ({e})"),
            e.as_bytes(),
            &secrets,
            &mut found,
        );
    }
    let _ = canary.kill();
    let _ = canary.wait();
    let canary_env = format!("the first token in /proc/{canary_pid}/environ");
    assert!(
        found.contains(&canary_env),
        "the search missed the canary: {found:#?}"
    );
    found.retain(|f| *f != canary_env);
    assert!(found.is_empty(), "secrets leaked: {found:#?}");

    for (vol, t) in [(&v, &target), (&vp, &t_p)] {
        unpublish(&mut node, vol, t).await;
    }
    unstage(&mut node, &v, &staging).await;
    unstage(&mut node, &vp, &st_p).await;
    h.mounts.clear();
}
