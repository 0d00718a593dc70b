//! The store trait: the narrow set of S3 operations s3vol needs.

use std::fmt;
use std::ops::Range;
use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

use crate::error::S3Result;
use crate::types::{
    BucketName, CompletedPart, CopySource, ETag, ListPage, ListRequest, MetadataDirective,
    ObjectInfo, PutOptions, PutResult, UploadId, UploadedPart,
};

/// A body being received, chunk by chunk.
pub type ByteStream = Pin<Box<dyn Stream<Item = S3Result<Bytes>> + Send + 'static>>;

/// A GET in progress: what the object is, and its body (or the requested range of it).
pub struct GetObject {
    /// The object's size and ETag (for a ranged GET, `size` is the whole object's size).
    pub info: ObjectInfo,
    pub body: ByteStream,
}

impl fmt::Debug for GetObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetObject")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// The operations of [`ObjectStore`], named for metrics and fault injection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Head,
    Get,
    Put,
    CreateMultipart,
    UploadPart,
    UploadPartCopy,
    CompleteMultipart,
    AbortMultipart,
    ListParts,
    Copy,
    Delete,
    DeleteMany,
    List,
    CreateBucket,
    HeadBucket,
    DeleteBucket,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Head => "HeadObject",
            Op::Get => "GetObject",
            Op::Put => "PutObject",
            Op::CreateMultipart => "CreateMultipartUpload",
            Op::UploadPart => "UploadPart",
            Op::UploadPartCopy => "UploadPartCopy",
            Op::CompleteMultipart => "CompleteMultipartUpload",
            Op::AbortMultipart => "AbortMultipartUpload",
            Op::ListParts => "ListParts",
            Op::Copy => "CopyObject",
            Op::Delete => "DeleteObject",
            Op::DeleteMany => "DeleteObjects",
            Op::List => "ListObjectsV2",
            Op::CreateBucket => "CreateBucket",
            Op::HeadBucket => "HeadBucket",
            Op::DeleteBucket => "DeleteBucket",
        }
    }
}

/// Object storage with S3's semantics.
///
/// Every call names its bucket: the filesystem uses one, the CSI and COSI drivers many.
#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug + 'static {
    async fn head_object(&self, bucket: &BucketName, key: &str) -> S3Result<ObjectInfo>;

    /// GET the object, or `range` of it (an empty range yields an empty body). With `if_match`,
    /// fails with `PreconditionFailed` when the object no longer has that ETag.
    async fn get_object(
        &self,
        bucket: &BucketName,
        key: &str,
        range: Option<Range<u64>>,
        if_match: Option<&ETag>,
    ) -> S3Result<GetObject>;

    async fn put_object(
        &self,
        bucket: &BucketName,
        key: &str,
        body: Bytes,
        options: &PutOptions,
    ) -> S3Result<PutResult>;

    async fn create_multipart_upload(
        &self,
        bucket: &BucketName,
        key: &str,
        options: &PutOptions,
    ) -> S3Result<UploadId>;

    async fn upload_part(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
        part_number: i32,
        body: Bytes,
    ) -> S3Result<CompletedPart>;

    async fn upload_part_copy(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
        part_number: i32,
        source: &CopySource,
    ) -> S3Result<CompletedPart>;

    async fn complete_multipart_upload(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
        parts: &[CompletedPart],
    ) -> S3Result<PutResult>;

    async fn abort_multipart_upload(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
    ) -> S3Result<()>;

    /// The parts an unfinished multipart upload holds, in part-number order (every page).
    /// [`S3Error::NotFound`](crate::S3Error::NotFound) once the upload is gone (completed or
    /// aborted).
    async fn list_parts(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
    ) -> S3Result<Vec<UploadedPart>>;

    /// Server-side copy of a whole object (up to 5 GiB; larger ones go through
    /// [`upload_part_copy`](Self::upload_part_copy)).
    async fn copy_object(
        &self,
        bucket: &BucketName,
        key: &str,
        source: &CopySource,
        directive: &MetadataDirective,
    ) -> S3Result<PutResult>;

    /// Deletes a key; deleting a missing key succeeds, as in S3.
    async fn delete_object(&self, bucket: &BucketName, key: &str) -> S3Result<()>;

    /// Deletes up to 1000 keys; returns the keys that could not be deleted, with why.
    async fn delete_objects(
        &self,
        bucket: &BucketName,
        keys: &[String],
    ) -> S3Result<Vec<(String, S3Error)>>;

    async fn list_objects(&self, bucket: &BucketName, request: &ListRequest) -> S3Result<ListPage>;

    /// Creates a bucket. A bucket that already exists and is ours is not an error.
    async fn create_bucket(&self, bucket: &BucketName) -> S3Result<()>;

    /// Succeeds when the bucket exists and is reachable with these credentials.
    async fn head_bucket(&self, bucket: &BucketName) -> S3Result<()>;

    async fn delete_bucket(&self, bucket: &BucketName) -> S3Result<()>;
}

use crate::error::S3Error;
