//! An in-memory [`ObjectStore`] with S3's semantics, for tests of the layers above.
//!
//! It follows what the conformance suite checks against a real server: listings in UTF-8
//! binary order with delimiter grouping and pagination, user metadata keys lower-cased,
//! `If-Match`/`If-None-Match`, multipart ETags (`"<md5 of part md5s>-N"`), keys such as `dir/`
//! and `a//b`. All state sits behind one mutex; that is plenty for unit tests.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use md5::{Digest, Md5};

use crate::error::{S3Error, S3Result};
use crate::store::{GetObject, ObjectStore};
use crate::types::{
    BucketName, CompletedPart, CopySource, ETag, ListEntry, ListPage, ListRequest,
    MetadataDirective, ObjectInfo, PutOptions, PutResult, UploadId, UploadedPart, UserMetadata,
};

#[derive(Clone, Debug)]
struct Object {
    body: Bytes,
    etag: ETag,
    last_modified: SystemTime,
    content_type: Option<String>,
    metadata: UserMetadata,
}

#[derive(Debug)]
struct Upload {
    key: String,
    options: PutOptions,
    parts: BTreeMap<i32, (Bytes, ETag)>,
}

#[derive(Debug, Default)]
struct Bucket {
    objects: BTreeMap<String, Object>,
    uploads: HashMap<String, Upload>,
}

impl Bucket {
    /// The open upload `id` of `key`; `NotFound` as S3 says NoSuchUpload.
    fn upload(&mut self, key: &str, id: &UploadId) -> S3Result<&mut Upload> {
        self.uploads
            .get_mut(&id.0)
            .filter(|u| u.key == key)
            .ok_or_else(|| S3Error::NotFound(format!("upload {}", id.0)))
    }
}

/// A store that keeps every bucket in memory.
#[derive(Debug, Default)]
pub struct MemStore {
    buckets: Mutex<BTreeMap<String, Bucket>>,
    next_upload: AtomicU64,
}

/// Parts other than the last must be at least this big, as in S3.
const MIN_PART_SIZE: usize = 5 * 1024 * 1024;

fn md5_etag(body: &[u8]) -> ETag {
    ETag(format!("\"{:x}\"", Md5::digest(body)))
}

fn normalize(metadata: &UserMetadata) -> UserMetadata {
    metadata
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect()
}

fn obj(bucket: &BucketName, key: &str) -> String {
    format!("s3://{bucket}/{key}")
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every object look `by` older (its Last-Modified moves back), as objects written
    /// a while ago by another client are: for tests of what depends on an object's age.
    pub fn age_all(&self, by: std::time::Duration) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        for b in buckets.values_mut() {
            for o in b.objects.values_mut() {
                o.last_modified = o.last_modified.checked_sub(by).unwrap_or(o.last_modified);
            }
        }
    }

    fn with_bucket<T>(
        &self,
        bucket: &BucketName,
        f: impl FnOnce(&mut Bucket) -> S3Result<T>,
    ) -> S3Result<T> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = buckets
            .get_mut(bucket.as_str())
            .ok_or_else(|| S3Error::NoSuchBucket(bucket.to_string()))?;
        f(b)
    }

    fn info(key: &str, o: &Object) -> ObjectInfo {
        ObjectInfo {
            key: key.to_owned(),
            size: o.body.len() as u64,
            etag: o.etag.clone(),
            last_modified: o.last_modified,
            content_type: o.content_type.clone(),
            metadata: o.metadata.clone(),
        }
    }

    fn source_object(&self, source: &CopySource) -> S3Result<Object> {
        self.with_bucket(&source.bucket, |b| {
            let o = b
                .objects
                .get(&source.key)
                .ok_or_else(|| S3Error::NotFound(obj(&source.bucket, &source.key)))?;
            if let Some(etag) = &source.if_match
                && *etag != o.etag
            {
                return Err(S3Error::PreconditionFailed(obj(
                    &source.bucket,
                    &source.key,
                )));
            }
            Ok(o.clone())
        })
    }
}

#[async_trait]
impl ObjectStore for MemStore {
    async fn head_object(&self, bucket: &BucketName, key: &str) -> S3Result<ObjectInfo> {
        // HEAD responses have no body, so S3 cannot say which of bucket or key is missing.
        let found = self.with_bucket(bucket, |b| {
            Ok(b.objects.get(key).map(|o| Self::info(key, o)))
        });
        found
            .ok()
            .flatten()
            .ok_or_else(|| S3Error::NotFound(obj(bucket, key)))
    }

    async fn get_object(
        &self,
        bucket: &BucketName,
        key: &str,
        range: Option<Range<u64>>,
        if_match: Option<&ETag>,
    ) -> S3Result<GetObject> {
        let (info, body) = self.with_bucket(bucket, |b| {
            let o = b
                .objects
                .get(key)
                .ok_or_else(|| S3Error::NotFound(obj(bucket, key)))?;
            if let Some(etag) = if_match
                && *etag != o.etag
            {
                return Err(S3Error::PreconditionFailed(obj(bucket, key)));
            }
            let len = o.body.len() as u64;
            let body = match range {
                None => o.body.clone(),
                Some(r) if r.is_empty() => Bytes::new(),
                Some(r) if r.start >= len => {
                    return Err(S3Error::InvalidRequest {
                        code: "InvalidRange".to_owned(),
                        message: format!("{}: range {r:?} of {len} bytes", obj(bucket, key)),
                    });
                }
                Some(r) => o.body.slice(r.start as usize..r.end.min(len) as usize),
            };
            Ok((Self::info(key, o), body))
        })?;
        Ok(GetObject {
            info,
            body: Box::pin(futures::stream::iter([Ok(body)])),
        })
    }

    async fn put_object(
        &self,
        bucket: &BucketName,
        key: &str,
        body: Bytes,
        options: &PutOptions,
    ) -> S3Result<PutResult> {
        self.with_bucket(bucket, |b| {
            if options.if_none_match_any && b.objects.contains_key(key) {
                return Err(S3Error::PreconditionFailed(obj(bucket, key)));
            }
            let etag = md5_etag(&body);
            b.objects.insert(
                key.to_owned(),
                Object {
                    body,
                    etag: etag.clone(),
                    last_modified: SystemTime::now(),
                    content_type: options.content_type.clone(),
                    metadata: normalize(&options.metadata),
                },
            );
            Ok(PutResult { etag })
        })
    }

    async fn create_multipart_upload(
        &self,
        bucket: &BucketName,
        key: &str,
        options: &PutOptions,
    ) -> S3Result<UploadId> {
        let id = format!(
            "mem-upload-{}",
            self.next_upload.fetch_add(1, Ordering::Relaxed)
        );
        self.with_bucket(bucket, |b| {
            b.uploads.insert(
                id.clone(),
                Upload {
                    key: key.to_owned(),
                    options: options.clone(),
                    parts: BTreeMap::new(),
                },
            );
            Ok(UploadId(id))
        })
    }

    async fn upload_part(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
        part_number: i32,
        body: Bytes,
    ) -> S3Result<CompletedPart> {
        if !(1..=10_000).contains(&part_number) {
            return Err(S3Error::InvalidRequest {
                code: "InvalidArgument".to_owned(),
                message: format!("part number {part_number} out of range"),
            });
        }
        self.with_bucket(bucket, |b| {
            let upload = b.upload(key, upload_id)?;
            let etag = md5_etag(&body);
            upload.parts.insert(part_number, (body, etag.clone()));
            Ok(CompletedPart { part_number, etag })
        })
    }

    async fn upload_part_copy(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
        part_number: i32,
        source: &CopySource,
    ) -> S3Result<CompletedPart> {
        let src = self.source_object(source)?;
        let len = src.body.len() as u64;
        let body = match &source.range {
            None => src.body,
            Some(r) if r.is_empty() || r.end > len => {
                return Err(S3Error::InvalidRequest {
                    code: "InvalidRange".to_owned(),
                    message: format!("copy range {r:?} of {len} bytes"),
                });
            }
            Some(r) => src.body.slice(r.start as usize..r.end as usize),
        };
        self.upload_part(bucket, key, upload_id, part_number, body)
            .await
    }

    async fn complete_multipart_upload(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
        parts: &[CompletedPart],
    ) -> S3Result<PutResult> {
        self.with_bucket(bucket, |b| {
            let upload = b.upload(key, upload_id)?;
            let invalid = |message: String| S3Error::InvalidRequest {
                code: "InvalidPart".to_owned(),
                message,
            };
            if parts.is_empty() {
                return Err(invalid("no parts".to_owned()));
            }
            let mut body = BytesMut::new();
            let mut digests = Vec::new();
            let mut last = 0;
            for (i, part) in parts.iter().enumerate() {
                if part.part_number <= last {
                    return Err(S3Error::InvalidRequest {
                        code: "InvalidPartOrder".to_owned(),
                        message: "parts must be in ascending order".to_owned(),
                    });
                }
                last = part.part_number;
                let (data, etag) = upload
                    .parts
                    .get(&part.part_number)
                    .filter(|(_, etag)| *etag == part.etag)
                    .ok_or_else(|| invalid(format!("part {} unknown", part.part_number)))?;
                if i + 1 < parts.len() && data.len() < MIN_PART_SIZE {
                    return Err(S3Error::InvalidRequest {
                        code: "EntityTooSmall".to_owned(),
                        message: format!("part {} is smaller than 5 MiB", part.part_number),
                    });
                }
                body.extend_from_slice(data);
                digests.extend_from_slice(&Md5::digest(data));
                let _ = etag;
            }
            let etag = ETag(format!("\"{:x}-{}\"", Md5::digest(&digests), parts.len()));
            let Some(upload) = b.uploads.remove(&upload_id.0) else {
                return Err(S3Error::NotFound(format!("upload {}", upload_id.0)));
            };
            b.objects.insert(
                key.to_owned(),
                Object {
                    body: body.freeze(),
                    etag: etag.clone(),
                    last_modified: SystemTime::now(),
                    content_type: upload.options.content_type,
                    metadata: normalize(&upload.options.metadata),
                },
            );
            Ok(PutResult { etag })
        })
    }

    async fn abort_multipart_upload(
        &self,
        bucket: &BucketName,
        _key: &str,
        upload_id: &UploadId,
    ) -> S3Result<()> {
        self.with_bucket(bucket, |b| {
            b.uploads
                .remove(&upload_id.0)
                .map(|_| ())
                .ok_or_else(|| S3Error::NotFound(format!("upload {}", upload_id.0)))
        })
    }

    async fn list_parts(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
    ) -> S3Result<Vec<UploadedPart>> {
        self.with_bucket(bucket, |b| {
            let upload = b.upload(key, upload_id)?;
            Ok(upload
                .parts
                .iter()
                .map(|(&part_number, (data, etag))| UploadedPart {
                    part_number,
                    etag: etag.clone(),
                    size: data.len() as u64,
                })
                .collect())
        })
    }

    async fn copy_object(
        &self,
        bucket: &BucketName,
        key: &str,
        source: &CopySource,
        directive: &MetadataDirective,
    ) -> S3Result<PutResult> {
        let mut src = self.source_object(source)?;
        match directive {
            MetadataDirective::Copy => {
                if source.bucket == *bucket && source.key == key {
                    return Err(S3Error::InvalidRequest {
                        code: "InvalidRequest".to_owned(),
                        message: "copying an object onto itself needs REPLACE".to_owned(),
                    });
                }
            }
            MetadataDirective::Replace {
                metadata,
                content_type,
            } => {
                src.metadata = normalize(metadata);
                src.content_type = content_type.clone();
            }
        }
        src.last_modified = SystemTime::now();
        let etag = src.etag.clone();
        self.with_bucket(bucket, |b| {
            b.objects.insert(key.to_owned(), src);
            Ok(PutResult { etag })
        })
    }

    async fn delete_object(&self, bucket: &BucketName, key: &str) -> S3Result<()> {
        self.with_bucket(bucket, |b| {
            b.objects.remove(key);
            Ok(())
        })
    }

    async fn delete_objects(
        &self,
        bucket: &BucketName,
        keys: &[String],
    ) -> S3Result<Vec<(String, S3Error)>> {
        self.with_bucket(bucket, |b| {
            for k in keys {
                b.objects.remove(k);
            }
            Ok(Vec::new())
        })
    }

    async fn list_objects(&self, bucket: &BucketName, request: &ListRequest) -> S3Result<ListPage> {
        let max = request.max_keys.unwrap_or(1000).clamp(1, 1000) as usize;
        self.with_bucket(bucket, |b| {
            // The token is the last key or common prefix returned; resume after it.
            let after = match (&request.continuation_token, &request.start_after) {
                (Some(t), _) => Some(t.clone()),
                (None, Some(s)) => Some(s.clone()),
                (None, None) => None,
            };
            let mut page = ListPage::default();
            let mut count = 0;
            let mut last_returned: Option<String> = None;
            let range = b.objects.range::<String, _>((
                match &after {
                    Some(a) => std::ops::Bound::Excluded(a.clone()),
                    None => std::ops::Bound::Unbounded,
                },
                std::ops::Bound::Unbounded,
            ));
            for (key, o) in range {
                if !key.starts_with(&request.prefix) {
                    if key.as_str() > request.prefix.as_str() {
                        break;
                    }
                    continue;
                }
                let rest = &key[request.prefix.len()..];
                let grouped = request
                    .delimiter
                    .as_deref()
                    .filter(|d| !d.is_empty())
                    .and_then(|d| {
                        rest.find(d)
                            .map(|i| &key[..request.prefix.len() + i + d.len()])
                    });
                if let Some(cp) = grouped {
                    if page.common_prefixes.last().map(String::as_str) == Some(cp) {
                        continue;
                    }
                    if let Some(a) = &after
                        && cp <= a.as_str()
                    {
                        // A prefix already returned on an earlier page.
                        continue;
                    }
                    if count == max {
                        page.next_continuation_token = last_returned;
                        return Ok(page);
                    }
                    page.common_prefixes.push(cp.to_owned());
                    last_returned = Some(cp.to_owned());
                } else {
                    if count == max {
                        page.next_continuation_token = last_returned;
                        return Ok(page);
                    }
                    page.objects.push(ListEntry {
                        key: key.clone(),
                        size: o.body.len() as u64,
                        etag: o.etag.clone(),
                        last_modified: o.last_modified,
                    });
                    last_returned = Some(key.clone());
                }
                count += 1;
            }
            Ok(page)
        })
    }

    async fn create_bucket(&self, bucket: &BucketName) -> S3Result<()> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets.entry(bucket.to_string()).or_default();
        Ok(())
    }

    async fn head_bucket(&self, bucket: &BucketName) -> S3Result<()> {
        self.with_bucket(bucket, |_| Ok(()))
    }

    async fn delete_bucket(&self, bucket: &BucketName) -> S3Result<()> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        match buckets.get(bucket.as_str()) {
            None => Err(S3Error::NoSuchBucket(bucket.to_string())),
            Some(b) if !b.objects.is_empty() => Err(S3Error::BucketNotEmpty(bucket.to_string())),
            Some(_) => {
                buckets.remove(bucket.as_str());
                Ok(())
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    // S3 honours `x-amz-copy-source-if-match`; moto ignores it, so this stays out of the
    // shared conformance suite. s3vol does not depend on it for correctness.
    #[tokio::test]
    async fn copy_source_if_match_is_checked() {
        let store = MemStore::new();
        let b = BucketName::new("bkt").unwrap();
        store.create_bucket(&b).await.unwrap();
        store
            .put_object(&b, "src", Bytes::from_static(b"x"), &PutOptions::default())
            .await
            .unwrap();
        let source = CopySource {
            bucket: b.clone(),
            key: "src".into(),
            range: None,
            if_match: Some(ETag("\"stale\"".into())),
        };
        let err = store
            .copy_object(&b, "dst", &source, &MetadataDirective::Copy)
            .await
            .unwrap_err();
        assert!(matches!(err, S3Error::PreconditionFailed(_)));
        assert!(
            store.head_object(&b, "dst").await.is_err(),
            "nothing was copied"
        );
    }
}
