//! Bucket lifecycle on the store: create (idempotently, with versioning or object lock),
//! look up, and delete (optionally emptying the bucket first).
//!
//! Creating is "make it so": an existing bucket is accepted when its observable settings match
//! the class (versioning, object lock) and refused with `AlreadyExists` when they do not. A
//! bucket whose versioning was never set is completed rather than refused, since that is what
//! a create interrupted between CreateBucket and PutBucketVersioning leaves behind.
//!
//! Emptying deletes every object version and delete marker (ListObjectVersions, which also
//! lists unversioned objects with version `null`) and aborts pending multipart uploads; stores
//! without ListObjectVersions fall back to a plain listing. Objects under object-lock retention
//! cannot be deleted: the store refuses and so does the delete.

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::types::{
    BucketLocationConstraint, BucketVersioningStatus, CreateBucketConfiguration, Delete,
    ObjectIdentifier, ObjectLockEnabled, VersioningConfiguration,
};
use s3vol_s3::{BucketName, ListRequest, ObjectStore, S3Error};

use crate::backend::Backend;
use crate::error::{CosiError, CosiResult, from_sdk};
use crate::params::BucketOptions;

/// Whether the bucket exists (and is reachable with the store credentials).
pub(crate) async fn exists(b: &Backend, bucket: &BucketName) -> CosiResult<bool> {
    match b.store.head_bucket(bucket).await {
        Ok(()) => Ok(true),
        Err(S3Error::NoSuchBucket(_) | S3Error::NotFound(_)) => Ok(false),
        Err(e) => Err(CosiError::store(format!("looking up bucket {bucket}"), e)),
    }
}

/// Versioning as the store reports it: `None` when never configured.
async fn versioning(
    b: &Backend,
    bucket: &BucketName,
) -> CosiResult<Option<BucketVersioningStatus>> {
    match b
        .s3
        .get_bucket_versioning()
        .bucket(bucket.as_str())
        .send()
        .await
    {
        Ok(out) => Ok(out.status().cloned()),
        Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 200 => {
            // A 200 the SDK could not parse: some servers (moto 5.2) name the root element
            // GetBucketVersioningResponse instead of VersioningConfiguration. The one field
            // that matters is unambiguous in the body.
            let body = e.raw().body().bytes().unwrap_or_default();
            let body = String::from_utf8_lossy(body);
            Ok(if body.contains("<Status>Enabled</Status>") {
                Some(BucketVersioningStatus::Enabled)
            } else if body.contains("<Status>Suspended</Status>") {
                Some(BucketVersioningStatus::Suspended)
            } else {
                None
            })
        }
        Err(e) => Err(CosiError::store("reading versioning", from_sdk(e, bucket))),
    }
}

async fn object_lock_enabled(b: &Backend, bucket: &BucketName) -> CosiResult<bool> {
    match b
        .s3
        .get_object_lock_configuration()
        .bucket(bucket.as_str())
        .send()
        .await
    {
        Ok(out) => Ok(out
            .object_lock_configuration()
            .and_then(|c| c.object_lock_enabled())
            == Some(&ObjectLockEnabled::Enabled)),
        Err(e) => {
            let err = from_sdk(e, bucket);
            match &err {
                // AWS says ObjectLockConfigurationNotFoundError (404); others say 404 or that
                // the feature does not exist.
                S3Error::NotFound(_) => Ok(false),
                S3Error::Other { code, .. }
                    if code == "ObjectLockConfigurationNotFoundError"
                        || code == "NotImplemented" =>
                {
                    Ok(false)
                }
                _ => Err(CosiError::store("reading object lock configuration", err)),
            }
        }
    }
}

async fn enable_versioning(b: &Backend, bucket: &BucketName) -> CosiResult<()> {
    b.s3.put_bucket_versioning()
        .bucket(bucket.as_str())
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .map_err(|e| CosiError::store("enabling versioning", from_sdk(e, bucket)))?;
    Ok(())
}

/// Checks an existing bucket against the class, completing an interrupted create.
async fn reconcile_existing(
    b: &Backend,
    bucket: &BucketName,
    opts: &BucketOptions,
) -> CosiResult<()> {
    let incompatible = |what: &str| {
        Err(CosiError::AlreadyExists(format!(
            "bucket {bucket} exists with {what}, incompatible with the BucketClass"
        )))
    };
    let locked = object_lock_enabled(b, bucket).await?;
    if locked != opts.object_lock {
        return incompatible(if locked {
            "object lock enabled"
        } else {
            "object lock disabled"
        });
    }
    let status = versioning(b, bucket).await?;
    let want = opts.versioning || opts.object_lock;
    match (want, status) {
        (true, Some(BucketVersioningStatus::Enabled)) | (false, None) => Ok(()),
        (true, None) => enable_versioning(b, bucket).await,
        (false, Some(BucketVersioningStatus::Suspended)) => Ok(()),
        (true, Some(_)) => incompatible("versioning suspended"),
        (false, Some(_)) => incompatible("versioning enabled"),
    }
}

/// Creates the bucket, or accepts an existing compatible one.
pub(crate) async fn ensure(
    b: &Backend,
    bucket: &BucketName,
    opts: &BucketOptions,
) -> CosiResult<()> {
    if exists(b, bucket).await? {
        return reconcile_existing(b, bucket, opts).await;
    }
    let location = (b.region != "us-east-1").then(|| {
        CreateBucketConfiguration::builder()
            .location_constraint(BucketLocationConstraint::from(b.region.as_str()))
            .build()
    });
    let mut req =
        b.s3.create_bucket()
            .bucket(bucket.as_str())
            .set_create_bucket_configuration(location);
    if opts.object_lock {
        req = req.object_lock_enabled_for_bucket(true);
    }
    match req.send().await {
        Ok(_) => {}
        Err(e) if e.code() == Some("BucketAlreadyOwnedByYou") => {
            return reconcile_existing(b, bucket, opts).await;
        }
        Err(e) => {
            return Err(match from_sdk(e, bucket) {
                S3Error::BucketAlreadyExists(_) => CosiError::AlreadyExists(format!(
                    "bucket name {bucket} is taken by another account"
                )),
                other => CosiError::store(format!("creating bucket {bucket}"), other),
            });
        }
    }
    if opts.versioning && !opts.object_lock {
        enable_versioning(b, bucket).await?;
    }
    tracing::info!(%bucket, versioning = opts.versioning, object_lock = opts.object_lock, "created bucket");
    Ok(())
}

/// Deletes the bucket; a missing bucket is success. With `delete_objects`, empties it first;
/// otherwise a bucket holding objects is refused with `FailedPrecondition`.
pub(crate) async fn delete(
    b: &Backend,
    bucket: &BucketName,
    delete_objects: bool,
) -> CosiResult<()> {
    if delete_objects {
        match empty(b, bucket).await {
            Ok(n) if n > 0 => tracing::info!(%bucket, deleted = n, "emptied bucket"),
            Ok(_) => {}
            Err(CosiError::Store {
                source: S3Error::NoSuchBucket(_),
                ..
            }) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    match b.s3.delete_bucket().bucket(bucket.as_str()).send().await {
        Ok(_) => {
            tracing::info!(%bucket, "deleted bucket");
            Ok(())
        }
        Err(e) => match from_sdk(e, bucket) {
            S3Error::NoSuchBucket(_) | S3Error::NotFound(_) => Ok(()),
            S3Error::BucketNotEmpty(_) => Err(CosiError::FailedPrecondition(format!(
                "bucket {bucket} is not empty; empty it, or set deleteObjectsOnDelete: \"true\" \
                 in the BucketClass to have the driver delete its objects"
            ))),
            other => Err(CosiError::store(format!("deleting bucket {bucket}"), other)),
        },
    }
}

/// Deletes every object version, delete marker and pending upload; returns how many objects
/// (versions) were deleted.
async fn empty(b: &Backend, bucket: &BucketName) -> CosiResult<usize> {
    let mut deleted = 0;
    let mut key_marker: Option<String> = None;
    let mut version_marker: Option<String> = None;
    loop {
        let page =
            b.s3.list_object_versions()
                .bucket(bucket.as_str())
                .set_key_marker(key_marker.take())
                .set_version_id_marker(version_marker.take())
                .send()
                .await;
        let page = match page {
            Ok(p) => p,
            Err(e) => {
                let err = from_sdk(e, bucket);
                if matches!(&err, S3Error::Other { code, .. } if code == "NotImplemented") {
                    return empty_unversioned(b, bucket).await;
                }
                return Err(CosiError::store("listing object versions", err));
            }
        };
        let mut ids = Vec::new();
        for v in page.versions() {
            if let Some(key) = v.key() {
                ids.push((key.to_owned(), v.version_id().map(str::to_owned)));
            }
        }
        for m in page.delete_markers() {
            if let Some(key) = m.key() {
                ids.push((key.to_owned(), m.version_id().map(str::to_owned)));
            }
        }
        deleted += delete_versions(b, bucket, ids).await?;
        if page.is_truncated() == Some(true) {
            key_marker = page.next_key_marker().map(str::to_owned);
            version_marker = page.next_version_id_marker().map(str::to_owned);
            if key_marker.is_none() {
                break;
            }
        } else {
            break;
        }
    }
    abort_uploads(b, bucket).await?;
    Ok(deleted)
}

async fn delete_versions(
    b: &Backend,
    bucket: &BucketName,
    ids: Vec<(String, Option<String>)>,
) -> CosiResult<usize> {
    let mut n = 0;
    for chunk in ids.chunks(1000) {
        let objects = chunk
            .iter()
            .map(|(key, version)| {
                ObjectIdentifier::builder()
                    .key(key)
                    .set_version_id(version.clone())
                    .build()
                    .map_err(|e| CosiError::InvalidArgument(format!("object {key:?}: {e}")))
            })
            .collect::<CosiResult<Vec<_>>>()?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(|e| CosiError::InvalidArgument(e.to_string()))?;
        let out =
            b.s3.delete_objects()
                .bucket(bucket.as_str())
                .delete(delete)
                .send()
                .await
                .map_err(|e| CosiError::store("deleting objects", from_sdk(e, bucket)))?;
        if let Some(first) = out.errors().first() {
            return Err(CosiError::FailedPrecondition(format!(
                "could not delete {} object(s) of bucket {bucket}, e.g. {:?}: {} {}",
                out.errors().len(),
                first.key().unwrap_or(""),
                first.code().unwrap_or(""),
                first.message().unwrap_or("")
            )));
        }
        n += chunk.len();
    }
    Ok(n)
}

/// Emptying for stores without ListObjectVersions.
async fn empty_unversioned(b: &Backend, bucket: &BucketName) -> CosiResult<usize> {
    let mut deleted = 0;
    loop {
        let page = b
            .store
            .list_objects(bucket, &ListRequest::default())
            .await
            .map_err(|e| CosiError::store("listing objects", e))?;
        if page.objects.is_empty() {
            break;
        }
        let keys: Vec<String> = page.objects.into_iter().map(|o| o.key).collect();
        let failed = b
            .store
            .delete_objects(bucket, &keys)
            .await
            .map_err(|e| CosiError::store("deleting objects", e))?;
        if let Some((key, e)) = failed.first() {
            return Err(CosiError::store(
                format!("deleting object {key:?}"),
                e.clone(),
            ));
        }
        deleted += keys.len();
    }
    abort_uploads(b, bucket).await?;
    Ok(deleted)
}

async fn abort_uploads(b: &Backend, bucket: &BucketName) -> CosiResult<()> {
    // Bounded: a store that lists uploads it will not abort must not hang the call.
    for _ in 0..1000 {
        let page = match b
            .s3
            .list_multipart_uploads()
            .bucket(bucket.as_str())
            .send()
            .await
        {
            Ok(p) => p,
            Err(e) => {
                let err = from_sdk(e, bucket);
                if matches!(&err, S3Error::Other { code, .. } if code == "NotImplemented") {
                    return Ok(());
                }
                return Err(CosiError::store("listing multipart uploads", err));
            }
        };
        if page.uploads().is_empty() {
            return Ok(());
        }
        for u in page.uploads() {
            let (Some(key), Some(id)) = (u.key(), u.upload_id()) else {
                continue;
            };
            match b
                .s3
                .abort_multipart_upload()
                .bucket(bucket.as_str())
                .key(key)
                .upload_id(id)
                .send()
                .await
            {
                Ok(_) => {}
                Err(e) => match from_sdk(e, bucket) {
                    S3Error::NotFound(_) => {}
                    other => return Err(CosiError::store("aborting an upload", other)),
                },
            }
        }
    }
    Err(CosiError::FailedPrecondition(format!(
        "bucket {bucket} still lists multipart uploads after aborting them"
    )))
}
