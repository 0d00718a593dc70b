//! The COSI driver end to end: served on a unix socket in a temp dir, called with tonic clients
//! of both protocol versions, against the real test S3 server (moto, with IAM and SigV4
//! checking on; `scripts/s3-server.sh start`).
//!
//! Minted keys are checked for real: moto applies IAM policies to requests signed with an IAM
//! user's keys, so a read-only grant is shown to read, to fail writing, and to fail on another
//! bucket. Every test uses its own buckets and account names, so tests run in parallel with each
//! other and with other suites on the same server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use hyper_util::rt::TokioIo;
use s3vol_cosi::proto::{v1alpha1 as v1, v1alpha2 as v2};
use s3vol_cosi::secret::BucketAccessSecret;
use s3vol_cosi::{Driver, DriverConfig};
use s3vol_s3::{
    Addressing, AwsStore, BucketName, CredentialSource, ListRequest, ObjectStore, PutOptions,
    S3Config, S3Error, StaticCredentials, testing,
};
use tokio::net::UnixStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

const DRIVER: &str = "cosi.s3vol.io";

/// A driver serving on a socket in a temp dir, stopped on drop.
struct Served {
    dir: tempfile::TempDir,
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Served {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cosi.sock");
        let driver = Driver::new(DriverConfig {
            name: DRIVER.into(),
            defaults: testing::config(),
            iam_endpoint: None,
            secrets_dir: dir.path().join("secrets"),
        })
        .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let endpoint = format!("unix://{}", socket.display());
        let task = tokio::spawn(async move {
            s3vol_cosi::server::run(driver, &endpoint, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Self {
            dir,
            socket,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn channel(&self) -> Channel {
        let path = self.socket.clone();
        Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
            }))
            .await
            .unwrap()
    }

    async fn v1(&self) -> v1::provisioner_client::ProvisionerClient<Channel> {
        v1::provisioner_client::ProvisionerClient::new(self.channel().await)
    }

    async fn v2(&self) -> v2::provisioner_client::ProvisionerClient<Channel> {
        v2::provisioner_client::ProvisionerClient::new(self.channel().await)
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        assert!(!self.socket.exists(), "socket removed on shutdown");
        let _ = &self.dir;
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A COSI-style name no other test uses (`bc-<tag>-<pid>-<n>-<nanos>`).
fn cosi_name(tag: &str) -> String {
    testing::unique_bucket(tag).to_string()
}

async fn admin() -> AwsStore {
    AwsStore::new(&testing::config()).await
}

async fn store_with(keys: StaticCredentials) -> AwsStore {
    AwsStore::new(&S3Config {
        credentials: CredentialSource::Static(keys),
        ..testing::config()
    })
    .await
}

async fn bucket_exists(bucket: &str) -> bool {
    match admin()
        .await
        .head_bucket(&BucketName::new(bucket).unwrap())
        .await
    {
        Ok(()) => true,
        Err(S3Error::NoSuchBucket(_) | S3Error::NotFound(_)) => false,
        Err(e) => panic!("head {bucket}: {e}"),
    }
}

async fn put(
    store: &AwsStore,
    bucket: &str,
    key: &str,
    body: &'static [u8],
) -> Result<(), S3Error> {
    store
        .put_object(
            &BucketName::new(bucket).unwrap(),
            key,
            Bytes::from_static(body),
            &PutOptions::default(),
        )
        .await
        .map(|_| ())
}

async fn get(store: &AwsStore, bucket: &str, key: &str) -> Result<Vec<u8>, S3Error> {
    let got = store
        .get_object(&BucketName::new(bucket).unwrap(), key, None, None)
        .await?;
    let chunks: Vec<Bytes> = got.body.try_collect().await?;
    Ok(chunks.concat())
}

async fn list(store: &AwsStore, bucket: &str) -> Result<Vec<String>, S3Error> {
    Ok(store
        .list_objects(&BucketName::new(bucket).unwrap(), &ListRequest::default())
        .await?
        .objects
        .into_iter()
        .map(|o| o.key)
        .collect())
}

fn is_denied<T: std::fmt::Debug>(r: &Result<T, S3Error>) -> bool {
    matches!(r, Err(S3Error::AccessDenied(_)))
}

async fn v2_create(
    c: &mut v2::provisioner_client::ProvisionerClient<Channel>,
    name: &str,
    p: &[(&str, &str)],
) -> String {
    c.driver_create_bucket(v2::DriverCreateBucketRequest {
        name: name.into(),
        protocols: vec![],
        parameters: params(p),
    })
    .await
    .unwrap()
    .into_inner()
    .bucket_id
}

async fn v2_grant(
    c: &mut v2::provisioner_client::ProvisionerClient<Channel>,
    account: &str,
    buckets: &[&str],
    p: &[(&str, &str)],
) -> Result<v2::DriverGrantBucketAccessResponse, tonic::Status> {
    c.driver_grant_bucket_access(v2::DriverGrantBucketAccessRequest {
        account_name: account.into(),
        protocol: Some(v2::ObjectProtocol {
            r#type: v2::object_protocol::Type::S3 as i32,
        }),
        authentication_type: Some(v2::AuthenticationType {
            r#type: v2::authentication_type::Type::Key as i32,
        }),
        service_account_name: String::new(),
        parameters: params(p),
        buckets: buckets
            .iter()
            .map(|b| v2::driver_grant_bucket_access_request::AccessedBucket {
                bucket_id: b.to_string(),
                access_mode: Some(v2::AccessMode {}),
            })
            .collect(),
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn v2_revoke(
    c: &mut v2::provisioner_client::ProvisionerClient<Channel>,
    account_id: &str,
) -> Result<(), tonic::Status> {
    c.driver_revoke_bucket_access(v2::DriverRevokeBucketAccessRequest {
        account_id: account_id.into(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

fn v2_keys(r: &v2::DriverGrantBucketAccessResponse) -> StaticCredentials {
    let s3 = r.credentials.as_ref().unwrap().s3.as_ref().unwrap();
    StaticCredentials {
        access_key_id: s3.access_key_id.clone(),
        secret_access_key: s3.access_secret_key.clone(),
        session_token: None,
    }
}

async fn v2_delete(
    c: &mut v2::provisioner_client::ProvisionerClient<Channel>,
    id: &str,
    p: &[(&str, &str)],
) -> Result<(), tonic::Status> {
    c.driver_delete_bucket(v2::DriverDeleteBucketRequest {
        bucket_id: id.into(),
        parameters: params(p),
    })
    .await
    .map(|_| ())
}

/// The IAM client the driver uses, to inspect what it made.
async fn iam() -> aws_sdk_iam::Client {
    aws_sdk_iam::Client::new(&testing::config().load_shared_config().await)
}

#[tokio::test]
async fn identity_answers_both_protocol_versions_on_one_socket() {
    let s = Served::start().await;
    let ch = s.channel().await;
    let r1 = v1::identity_client::IdentityClient::new(ch.clone())
        .driver_get_info(v1::DriverGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r1.name, DRIVER);
    let r2 = v2::identity_client::IdentityClient::new(ch)
        .driver_get_info(v2::DriverGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r2.name, DRIVER);
    assert_eq!(
        r2.supported_protocols,
        vec![v2::ObjectProtocol {
            r#type: v2::object_protocol::Type::S3 as i32
        }]
    );
    s.shutdown().await;
}

#[tokio::test]
async fn v2_create_get_existing_delete_are_idempotent() {
    let s = Served::start().await;
    let mut c = s.v2().await;
    let name = cosi_name("v2-lifecycle");
    let resp = c
        .driver_create_bucket(v2::DriverCreateBucketRequest {
            name: name.clone(),
            protocols: vec![v2::ObjectProtocol {
                r#type: v2::object_protocol::Type::S3 as i32,
            }],
            parameters: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.bucket_id, name, "a valid COSI name is the bucket name");
    let info = resp.protocols.unwrap().s3.unwrap();
    assert_eq!(info.bucket_id, name);
    assert_eq!(info.endpoint, testing::endpoint());
    assert_eq!(info.region, "us-east-1");
    assert_eq!(
        info.addressing_style.unwrap().style,
        v2::s3_addressing_style::Style::Path as i32
    );
    assert!(bucket_exists(&name).await);

    // Again: same answer, still one bucket.
    assert_eq!(v2_create(&mut c, &name, &[]).await, name);

    let existing = c
        .driver_get_existing_bucket(v2::DriverGetExistingBucketRequest {
            existing_bucket_id: name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(existing.bucket_id, name);

    v2_delete(&mut c, &name, &[]).await.unwrap();
    assert!(!bucket_exists(&name).await);
    v2_delete(&mut c, &name, &[]).await.unwrap();
    let e = c
        .driver_get_existing_bucket(v2::DriverGetExistingBucketRequest {
            existing_bucket_id: name.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

#[tokio::test]
async fn v1_create_and_delete_with_and_without_emptying() {
    let s = Served::start().await;
    let mut c = s.v1().await;
    let name = cosi_name("v1-delete");
    let resp = c
        .driver_create_bucket(v1::DriverCreateBucketRequest {
            name: name.clone(),
            parameters: params(&[("bucketNamePrefix", "p-")]),
        })
        .await
        .unwrap()
        .into_inner();
    let id = resp.bucket_id;
    assert!(id.starts_with("p-") && id.len() <= 63, "{id}");
    let Some(v1::protocol::Type::S3(s3)) = resp.bucket_info.unwrap().r#type else {
        panic!("no S3 bucket info")
    };
    assert_eq!(s3.region, "us-east-1");
    assert_eq!(s3.signature_version, v1::S3SignatureVersion::S3v4 as i32);

    let store = admin().await;
    put(&store, &id, "a/b.txt", b"kept").await.unwrap();
    // Delete without deleteObjectsOnDelete: refused, bucket and object untouched.
    let e = c
        .driver_delete_bucket(v1::DriverDeleteBucketRequest {
            bucket_id: id.clone(),
            delete_context: params(&[("bucketNamePrefix", "p-")]),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("deleteObjectsOnDelete"), "{e:?}");
    assert_eq!(get(&store, &id, "a/b.txt").await.unwrap(), b"kept");

    // A deletion policy of Retain means the sidecar never calls delete: the bucket stays and can
    // be adopted as an existing bucket.
    let mut c2 = s.v2().await;
    c2.driver_get_existing_bucket(v2::DriverGetExistingBucketRequest {
        existing_bucket_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // With the class's say-so the objects go first.
    c.driver_delete_bucket(v1::DriverDeleteBucketRequest {
        bucket_id: id.clone(),
        delete_context: params(&[("deleteObjectsOnDelete", "true")]),
    })
    .await
    .unwrap();
    assert!(!bucket_exists(&id).await);
    c.driver_delete_bucket(v1::DriverDeleteBucketRequest {
        bucket_id: id.clone(),
        delete_context: HashMap::new(),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn versioned_buckets_are_emptied_of_every_version() {
    let s = Served::start().await;
    let mut c = s.v2().await;
    let name = cosi_name("v2-versions");
    let id = v2_create(&mut c, &name, &[("versioning", "true")]).await;
    let store = admin().await;
    put(&store, &id, "k", b"one").await.unwrap();
    put(&store, &id, "k", b"two").await.unwrap();
    store
        .delete_object(&BucketName::new(&id).unwrap(), "k")
        .await
        .unwrap();
    put(&store, &id, "other", b"x").await.unwrap();
    v2_delete(&mut c, &id, &[("deleteObjectsOnDelete", "true")])
        .await
        .unwrap();
    assert!(!bucket_exists(&id).await);
}

#[tokio::test]
async fn incompatible_recreate_is_already_exists() {
    let s = Served::start().await;
    let mut c = s.v2().await;
    let name = cosi_name("v2-incompatible");
    let id = v2_create(&mut c, &name, &[("versioning", "true")]).await;
    // Same parameters: OK.
    assert_eq!(
        v2_create(&mut c, &name, &[("versioning", "true")]).await,
        id
    );
    // Versioning off asked for a versioned bucket: incompatible.
    let e = c
        .driver_create_bucket(v2::DriverCreateBucketRequest {
            name: name.clone(),
            protocols: vec![],
            parameters: HashMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = c
        .driver_create_bucket(v2::DriverCreateBucketRequest {
            name: name.clone(),
            protocols: vec![],
            parameters: params(&[("objectLock", "true")]),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    v2_delete(&mut c, &id, &[("deleteObjectsOnDelete", "true")])
        .await
        .unwrap();
}

#[tokio::test]
async fn object_lock_buckets_are_created_locked_and_versioned() {
    let s = Served::start().await;
    let mut c = s.v2().await;
    let name = cosi_name("v2-lock");
    let id = v2_create(&mut c, &name, &[("objectLock", "true")]).await;
    assert_eq!(
        v2_create(&mut c, &name, &[("objectLock", "true")]).await,
        id
    );
    let client = testing::config().build_sdk_client().await;
    let lock = client
        .get_object_lock_configuration()
        .bucket(&id)
        .send()
        .await
        .unwrap();
    assert_eq!(
        lock.object_lock_configuration()
            .and_then(|c| c.object_lock_enabled())
            .map(|e| e.as_str()),
        Some("Enabled")
    );
    // moto 5.2 answers with a non-standard root element the SDK refuses; the status is there.
    let enabled = match client.get_bucket_versioning().bucket(&id).send().await {
        Ok(v) => v.status().map(|s| s.as_str()) == Some("Enabled"),
        Err(aws_sdk_s3::error::SdkError::ServiceError(e)) => {
            String::from_utf8_lossy(e.raw().body().bytes().unwrap())
                .contains("<Status>Enabled</Status>")
        }
        Err(e) => panic!("{e:?}"),
    };
    assert!(enabled, "versioning enabled with object lock");
    v2_delete(&mut c, &id, &[("deleteObjectsOnDelete", "true")])
        .await
        .unwrap();
}

#[tokio::test]
async fn v1_read_only_grant_reads_but_cannot_write_or_touch_other_buckets() {
    let s = Served::start().await;
    let mut c = s.v1().await;
    let mine = cosi_name("v1-ro");
    let other = cosi_name("v1-ro-other");
    for b in [&mine, &other] {
        c.driver_create_bucket(v1::DriverCreateBucketRequest {
            name: b.clone(),
            parameters: HashMap::new(),
        })
        .await
        .unwrap();
    }
    let store = admin().await;
    put(&store, &mine, "data.txt", b"hello").await.unwrap();
    put(&store, &other, "secret.txt", b"nope").await.unwrap();

    let account = format!("ba-{}", cosi_name("acct"));
    let resp = c
        .driver_grant_bucket_access(v1::DriverGrantBucketAccessRequest {
            bucket_id: mine.clone(),
            name: account.clone(),
            authentication_type: v1::AuthenticationType::Key as i32,
            parameters: params(&[("accessMode", "ReadOnly")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.account_id.starts_with("s3vol-"), "{}", resp.account_id);
    let secrets = &resp.credentials["s3"].secrets;
    assert_eq!(secrets["endpoint"], testing::endpoint());
    assert_eq!(secrets["region"], "us-east-1");
    let keys = StaticCredentials {
        access_key_id: secrets["accessKeyID"].clone(),
        secret_access_key: secrets["accessSecretKey"].clone(),
        session_token: None,
    };
    assert_ne!(keys.access_key_id, testing::credentials().access_key_id);

    // The policy is exactly the read-only document for this bucket.
    let doc = iam()
        .await
        .get_user_policy()
        .user_name(&resp.account_id)
        .policy_name("s3vol-cosi")
        .send()
        .await
        .unwrap();
    assert_eq!(
        s3vol_cosi::policy::parse_returned(doc.policy_document()).unwrap(),
        s3vol_cosi::policy::document(&[(
            BucketName::new(&mine).unwrap(),
            s3vol_cosi::policy::AccessMode::ReadOnly
        )])
    );

    let ro = store_with(keys.clone()).await;
    assert_eq!(get(&ro, &mine, "data.txt").await.unwrap(), b"hello");
    assert_eq!(list(&ro, &mine).await.unwrap(), vec!["data.txt".to_owned()]);
    let w = put(&ro, &mine, "new.txt", b"x").await;
    assert!(is_denied(&w), "write with read-only keys: {w:?}");
    let o = get(&ro, &other, "secret.txt").await;
    assert!(is_denied(&o), "other bucket: {o:?}");
    let l = list(&ro, &other).await;
    assert!(is_denied(&l), "other bucket listing: {l:?}");

    // A repeated grant is OK and hands out the same key.
    let again = c
        .driver_grant_bucket_access(v1::DriverGrantBucketAccessRequest {
            bucket_id: mine.clone(),
            name: account.clone(),
            authentication_type: v1::AuthenticationType::Key as i32,
            parameters: params(&[("accessMode", "ReadOnly")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.account_id, resp.account_id);
    assert_eq!(
        again.credentials["s3"].secrets["accessKeyID"],
        keys.access_key_id
    );

    // Revoke: key, policy and user are gone; revoking again is OK.
    for _ in 0..2 {
        c.driver_revoke_bucket_access(v1::DriverRevokeBucketAccessRequest {
            bucket_id: mine.clone(),
            account_id: resp.account_id.clone(),
            revoke_access_context: HashMap::new(),
        })
        .await
        .unwrap();
    }
    let gone = iam()
        .await
        .get_user()
        .user_name(&resp.account_id)
        .send()
        .await;
    assert!(gone.is_err(), "user deleted");
    let after = get(&ro, &mine, "data.txt").await;
    assert!(after.is_err(), "revoked keys still work: {after:?}");

    for b in [&mine, &other] {
        c.driver_delete_bucket(v1::DriverDeleteBucketRequest {
            bucket_id: b.clone(),
            delete_context: params(&[("deleteObjectsOnDelete", "true")]),
        })
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn v2_write_only_and_read_write_grants_do_what_they_say() {
    let s = Served::start().await;
    let mut c = s.v2().await;
    let a = v2_create(&mut c, &cosi_name("v2-modes-a"), &[]).await;
    let b = v2_create(&mut c, &cosi_name("v2-modes-b"), &[]).await;
    let other = v2_create(&mut c, &cosi_name("v2-modes-x"), &[]).await;
    let store = admin().await;
    put(&store, &a, "seed", b"seed").await.unwrap();
    put(&store, &other, "seed", b"seed").await.unwrap();

    // Write-only on `a`.
    let wo = v2_grant(
        &mut c,
        &cosi_name("wo"),
        &[&a],
        &[("accessMode", "WriteOnly")],
    )
    .await
    .unwrap();
    let wo_store = store_with(v2_keys(&wo)).await;
    put(&wo_store, &a, "dropped", b"in").await.unwrap();
    let r = get(&wo_store, &a, "seed").await;
    assert!(is_denied(&r), "write-only read: {r:?}");
    let r = put(&wo_store, &other, "x", b"x").await;
    assert!(is_denied(&r), "write-only on other bucket: {r:?}");

    // Read-write on two buckets at once (multi-bucket access).
    let rw = v2_grant(&mut c, &cosi_name("rw"), &[&a, &b], &[])
        .await
        .unwrap();
    let mut ids: Vec<&str> = rw.buckets.iter().map(|x| x.bucket_id.as_str()).collect();
    ids.sort_unstable();
    let mut want = vec![a.as_str(), b.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want);
    let rw_store = store_with(v2_keys(&rw)).await;
    for bucket in [&a, &b] {
        put(&rw_store, bucket, "rw", b"rw").await.unwrap();
        assert_eq!(get(&rw_store, bucket, "rw").await.unwrap(), b"rw");
        rw_store
            .delete_object(&BucketName::new(bucket.as_str()).unwrap(), "rw")
            .await
            .unwrap();
    }
    assert_eq!(get(&rw_store, &a, "dropped").await.unwrap(), b"in");
    let r = get(&rw_store, &other, "seed").await;
    assert!(is_denied(&r), "read-write on other bucket: {r:?}");

    for g in [&wo, &rw] {
        v2_revoke(&mut c, &g.account_id).await.unwrap();
        v2_revoke(&mut c, &g.account_id).await.unwrap();
    }
    for id in [&a, &b, &other] {
        v2_delete(&mut c, id, &[("deleteObjectsOnDelete", "true")])
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn grant_idempotency_and_error_codes() {
    let s = Served::start().await;
    let mut c = s.v2().await;
    let a = v2_create(&mut c, &cosi_name("v2-codes"), &[]).await;
    let account = cosi_name("codes");
    let first = v2_grant(&mut c, &account, &[&a], &[("accessMode", "ReadOnly")])
        .await
        .unwrap();
    let again = v2_grant(&mut c, &account, &[&a], &[("accessMode", "ReadOnly")])
        .await
        .unwrap();
    assert_eq!(first.account_id, again.account_id);
    assert_eq!(v2_keys(&first), v2_keys(&again));
    // Same account, another mode: incompatible.
    let e = v2_grant(&mut c, &account, &[&a], &[("accessMode", "ReadWrite")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    let missing = cosi_name("v2-missing");
    let e = v2_grant(&mut c, &cosi_name("m"), &[&missing], &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = v2_grant(&mut c, "", &[&a], &[]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = v2_grant(&mut c, &cosi_name("n"), &[], &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = v2_grant(&mut c, &cosi_name("n"), &[&a], &[("grant", "root")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c
        .driver_grant_bucket_access(v2::DriverGrantBucketAccessRequest {
            account_name: cosi_name("sa"),
            authentication_type: Some(v2::AuthenticationType {
                r#type: v2::authentication_type::Type::ServiceAccount as i32,
            }),
            service_account_name: "sa".into(),
            buckets: vec![v2::driver_grant_bucket_access_request::AccessedBucket {
                bucket_id: a.clone(),
                access_mode: None,
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = v2_revoke(&mut c, "not-ours").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let e = c
        .driver_create_bucket(v2::DriverCreateBucketRequest {
            name: cosi_name("azure"),
            protocols: vec![v2::ObjectProtocol {
                r#type: v2::object_protocol::Type::Azure as i32,
            }],
            parameters: HashMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c
        .driver_create_bucket(v2::DriverCreateBucketRequest {
            name: cosi_name("typo"),
            protocols: vec![],
            parameters: params(&[("addresingStyle", "path")]),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("addresingStyle"), "{e:?}");
    let e = c
        .driver_create_bucket(v2::DriverCreateBucketRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = v2_delete(&mut c, "a/b", &[]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let mut c1 = s.v1().await;
    let e = c1
        .driver_grant_bucket_access(v1::DriverGrantBucketAccessRequest {
            bucket_id: a.clone(),
            name: cosi_name("iam-auth"),
            authentication_type: v1::AuthenticationType::Iam as i32,
            parameters: HashMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    v2_revoke(&mut c, &first.account_id).await.unwrap();
    v2_delete(&mut c, &a, &[]).await.unwrap();
}

#[tokio::test]
async fn static_grants_return_the_configured_credentials_unchanged() {
    let s = Served::start().await;
    let mut c = s.v2().await;
    let a = v2_create(&mut c, &cosi_name("v2-static"), &[]).await;
    let account = cosi_name("static");
    let g = v2_grant(&mut c, &account, &[&a], &[("grant", "static")])
        .await
        .unwrap();
    assert_eq!(v2_keys(&g), testing::credentials());
    assert!(g.account_id.starts_with("static."), "{}", g.account_id);
    v2_revoke(&mut c, &g.account_id).await.unwrap();
    // Static grants are not revocable: the store's credentials keep working.
    let still = store_with(v2_keys(&g)).await;
    put(&still, &a, "k", b"v").await.unwrap();

    // v1alpha1 too.
    let mut c1 = s.v1().await;
    let r = c1
        .driver_grant_bucket_access(v1::DriverGrantBucketAccessRequest {
            bucket_id: a.clone(),
            name: account,
            authentication_type: v1::AuthenticationType::Key as i32,
            parameters: params(&[("grant", "static")]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.credentials["s3"].secrets["accessKeyID"],
        testing::credentials().access_key_id
    );
    v2_delete(&mut c, &a, &[("deleteObjectsOnDelete", "true")])
        .await
        .unwrap();
}

/// "Claim a bucket, mount it": the Secret COSI writes from a grant (built here exactly as the
/// sidecars build it) is all `s3vol` needs to reach the bucket.
#[tokio::test]
async fn bucket_access_secrets_of_both_versions_reach_the_bucket() {
    let s = Served::start().await;
    let mut c = s.v2().await;
    let a = v2_create(&mut c, &cosi_name("v2-secret"), &[]).await;

    // v1alpha2: one Secret key per value.
    let g = v2_grant(&mut c, &cosi_name("sec2"), &[&a], &[])
        .await
        .unwrap();
    let info = g.buckets[0]
        .bucket_info
        .as_ref()
        .unwrap()
        .s3
        .as_ref()
        .unwrap();
    let keys = v2_keys(&g);
    let style = match info.addressing_style.as_ref().unwrap().style() {
        v2::s3_addressing_style::Style::Path => "path",
        _ => "virtual",
    };
    let data = params(&[
        ("COSI_PROTOCOL", "S3"),
        ("COSI_S3_BUCKET_ID", &info.bucket_id),
        ("COSI_S3_ENDPOINT", &info.endpoint),
        ("COSI_S3_REGION", &info.region),
        ("COSI_S3_ADDRESSING_STYLE", style),
        ("COSI_S3_ACCESS_KEY_ID", &keys.access_key_id),
        ("COSI_S3_ACCESS_SECRET_KEY", &keys.secret_access_key),
    ]);
    let parsed = BucketAccessSecret::parse(&data).unwrap();
    let store = AwsStore::new(&S3Config {
        max_attempts: 2,
        ..parsed.s3_config(Addressing::VirtualHosted)
    })
    .await;
    put(&store, parsed.bucket.as_str(), "via-secret", b"ok")
        .await
        .unwrap();
    assert_eq!(get(&store, &a, "via-secret").await.unwrap(), b"ok");

    // v1alpha1: the BucketInfo JSON document.
    let mut c1 = s.v1().await;
    let r = c1
        .driver_grant_bucket_access(v1::DriverGrantBucketAccessRequest {
            bucket_id: a.clone(),
            name: cosi_name("sec1"),
            authentication_type: v1::AuthenticationType::Key as i32,
            parameters: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let sec = &r.credentials["s3"].secrets;
    let bucket_info = serde_json::json!({
        "metadata": {"name": "ba-x"},
        "spec": {
            "bucketName": a,
            "authenticationType": "KEY",
            "secretS3": {
                "endpoint": sec["endpoint"], "region": sec["region"],
                "accessKeyID": sec["accessKeyID"], "accessSecretKey": sec["accessSecretKey"],
            },
            "secretAzure": null,
            "protocols": ["s3"],
        }
    });
    let parsed =
        BucketAccessSecret::parse(&params(&[("BucketInfo", &bucket_info.to_string())])).unwrap();
    // v1alpha1 carries no addressing style: the mount says path-style (forcePathStyle).
    let store = AwsStore::new(&parsed.s3_config(Addressing::Path)).await;
    assert_eq!(
        get(&store, parsed.bucket.as_str(), "via-secret")
            .await
            .unwrap(),
        b"ok"
    );

    v2_revoke(&mut c, &g.account_id).await.unwrap();
    v2_revoke(&mut c, &r.account_id).await.unwrap();
    v2_delete(&mut c, &a, &[("deleteObjectsOnDelete", "true")])
        .await
        .unwrap();
}

#[tokio::test]
async fn shutdown_removes_the_socket_and_a_new_server_takes_over_a_stale_one() {
    let s = Served::start().await;
    s.shutdown().await;
    // A socket left behind by a crash is replaced.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cosi.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let driver = Driver::new(DriverConfig {
        name: DRIVER.into(),
        defaults: testing::config(),
        iam_endpoint: None,
        secrets_dir: PathBuf::from("/nonexistent"),
    })
    .unwrap();
    let listener = s3vol_cosi::server::bind(&path).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(s3vol_cosi::server::serve(
        Arc::clone(&driver),
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    let ch = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap();
    let r = v2::identity_client::IdentityClient::new(ch)
        .driver_get_info(v2::DriverGetInfoRequest {})
        .await
        .unwrap();
    assert_eq!(r.into_inner().name, DRIVER);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
