//! [`ObjectStore`] over the AWS SDK for Rust.
//!
//! Every request is counted, timed and sized in the `s3vol_s3_*` metrics, and every SDK error is
//! mapped to an [`S3Error`] here, so nothing above this module sees an SDK type.
//!
//! Each request runs with the attempt timeout of its kind ([`RequestKind`], see
//! [`S3Config::attempt_timeout`]), set per request over the client's defaults. A request that
//! timed out says how long it waited and where (`no answer from ENDPOINT after N s`); the SDK's
//! error chain and its debug dump go to the debug log, never into the message.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as SdkByteStream;
use aws_sdk_s3::types::{
    BucketLocationConstraint, CompletedMultipartUpload, CreateBucketConfiguration, Delete,
    ObjectIdentifier,
};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use bytes::Bytes;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::config::{RequestKind, S3Config};
use crate::error::{S3Error, S3Result};
use crate::store::{GetObject, ObjectStore, Op};
use crate::types::{
    BucketName, CompletedPart, CopySource, ETag, ListEntry, ListPage, ListRequest,
    MetadataDirective, ObjectInfo, PutOptions, PutResult, UploadId, UploadedPart, UserMetadata,
};

/// An S3 client for any S3-compatible endpoint.
#[derive(Clone, Debug)]
pub struct AwsStore {
    client: aws_sdk_s3::Client,
    /// Uploads go with `UNSIGNED-PAYLOAD` ([`S3Config::unsigned_payload`]).
    unsigned_payload: bool,
    /// Timeouts and attempts; credentials are not read from here.
    config: Arc<S3Config>,
}

impl AwsStore {
    pub async fn new(config: &S3Config) -> Self {
        Self {
            client: config.build_sdk_client().await,
            unsigned_payload: config.unsigned_payload(),
            config: Arc::new(config.clone()),
        }
    }

    /// A store over a client built elsewhere; request bodies are signed, timeouts are the
    /// defaults of [`S3Config`].
    pub fn from_client(client: aws_sdk_s3::Client) -> Self {
        Self {
            client,
            unsigned_payload: false,
            config: Arc::new(S3Config::default()),
        }
    }

    /// The region requests are signed for.
    pub fn region(&self) -> Option<&str> {
        self.client.config().region().map(|r| r.as_ref())
    }

    /// The endpoint as a user named it, for messages.
    fn endpoint(&self) -> String {
        match &self.config.endpoint_url {
            Some(url) => url.clone(),
            None => format!("AWS S3 ({})", self.region().unwrap_or("us-east-1")),
        }
    }

    /// The per-request configuration of a request of this kind: its attempt timeout.
    fn timeouts(&self, kind: RequestKind) -> aws_sdk_s3::config::Builder {
        aws_sdk_s3::config::Builder::default().timeout_config(self.config.timeout_config(kind))
    }

    /// The error that explains a bare 403 or 400 on `bucket`: the credentials error a LIST of
    /// one key reports, else `denied` as it was.
    async fn why_denied(&self, bucket: &BucketName, denied: S3Error) -> S3Error {
        let listed = self
            .client
            .list_objects_v2()
            .bucket(bucket.as_str())
            .max_keys(1)
            .customize()
            .config_override(self.timeouts(RequestKind::List))
            .send()
            .await;
        match listed.map_err(|e| map_err(e, format!("s3://{bucket}"))) {
            Err(e @ S3Error::InvalidCredentials { .. }) => e,
            _ => denied,
        }
    }

    /// The error that explains a bare 400 on a HEAD of `key`: what a GET of its first byte
    /// answers, else `bad` as it was. HEAD responses have no body, and S3 answers an expired
    /// or invalid session token with a 400 (`ExpiredToken`), which a bare status cannot tell
    /// from a malformed request; the GET's error names it, so the caller sees a credentials
    /// error (EACCES, and a message saying what to renew) instead of an I/O error. Only a bare
    /// 400 costs this second request: S3 answers nothing else that way to a well-formed HEAD.
    async fn why_bad_request(&self, bucket: &BucketName, key: &str, bad: S3Error) -> S3Error {
        let got = self
            .client
            .get_object()
            .bucket(bucket.as_str())
            .key(key)
            .range("bytes=0-0")
            .customize()
            .config_override(self.timeouts(RequestKind::Small))
            .send()
            .await;
        match got.map_err(|e| map_err(e, obj(bucket, key))) {
            Err(e @ S3Error::InvalidCredentials { .. }) => e,
            Err(e @ S3Error::InvalidRequest { .. }) if !matches!(&e, S3Error::InvalidRequest { code, .. } if code == "InvalidRange") => {
                e
            }
            _ => bad,
        }
    }

    /// Runs one request, recording its metrics and saying how long a timed-out one waited.
    async fn observe<T>(
        &self,
        op: Op,
        kind: RequestKind,
        fut: impl Future<Output = S3Result<T>>,
    ) -> S3Result<T> {
        let start = Instant::now();
        let result = fut.await;
        let op_name = op.as_str();
        metrics::counter!("s3vol_s3_requests_total", "op" => op_name).increment(1);
        metrics::histogram!("s3vol_s3_request_seconds", "op" => op_name)
            .record(start.elapsed().as_secs_f64());
        let result = result.map_err(|e| match e {
            S3Error::Timeout(what) => S3Error::Timeout(format!(
                "no answer from {} after {} s ({what}; {} attempt(s) of {} each); check that \
                 the endpoint is an S3 service and that it is up",
                self.endpoint(),
                start.elapsed().as_secs_f64().round(),
                self.config.max_attempts.max(1),
                secs(self.config.attempt_timeout(kind)),
            )),
            S3Error::Unreachable(detail) => {
                S3Error::Unreachable(format!("{} ({detail})", self.endpoint()))
            }
            other => other,
        });
        if let Err(e) = &result {
            metrics::counter!("s3vol_s3_errors_total", "op" => op_name, "kind" => e.kind())
                .increment(1);
            tracing::debug!(op = op_name, error = %e, "S3 request failed");
        }
        result
    }
}

/// `5 s`, `13.5 s`.
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s} s")
    } else {
        format!("{s:.1} s")
    }
}

/// The messages of an error and its sources, one after the other, without the debug dumps
/// `DisplayErrorContext` adds.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// One page of a ListParts answer.
#[derive(Debug, PartialEq)]
struct PartsPage {
    parts: Vec<UploadedPart>,
    /// The marker of the next page, if the answer is truncated.
    next: Option<String>,
}

/// Reads a ListParts answer whatever its XML root is called.
fn parse_parts_page(xml: &str) -> Option<PartsPage> {
    use aws_smithy_xml::decode::{Document, try_data};
    let mut doc = Document::new(xml);
    let mut root = doc.root_element().ok()?;
    let mut page = PartsPage {
        parts: Vec::new(),
        next: None,
    };
    let mut truncated = false;
    while let Some(mut tag) = root.next_tag() {
        match tag.start_el().local() {
            "Part" => {
                let mut part = UploadedPart {
                    part_number: 0,
                    etag: ETag(String::new()),
                    size: 0,
                };
                while let Some(mut field) = tag.next_tag() {
                    let name = field.start_el().local().to_owned();
                    let value = try_data(&mut field).ok()?;
                    match name.as_str() {
                        "PartNumber" => part.part_number = value.trim().parse().ok()?,
                        "ETag" => part.etag = ETag(value.trim().to_owned()),
                        "Size" => part.size = value.trim().parse().ok()?,
                        _ => {}
                    }
                }
                page.parts.push(part);
            }
            "IsTruncated" => truncated = try_data(&mut tag).ok()?.trim() == "true",
            "NextPartNumberMarker" => page.next = Some(try_data(&mut tag).ok()?.trim().to_owned()),
            _ => {}
        }
    }
    if !truncated {
        page.next = None;
    }
    Some(page)
}

fn map_err<E>(err: SdkError<E, HttpResponse>, what: impl Display) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    S3Error::from_sdk(err, what)
}

impl S3Error {
    /// Maps a failed call of any AWS SDK client (S3, IAM, …) to a variant; `what` names the
    /// object of the call.
    pub fn from_sdk<E>(err: SdkError<E, HttpResponse>, what: impl Display) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let what = what.to_string();
        // The whole chain, debug dump included, for whoever asks for debug logs.
        tracing::debug!(%what, error = %DisplayErrorContext(&err), "S3 SDK error");
        match &err {
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                let message = match (service.err().code(), service.err().message()) {
                    (Some(_), Some(m)) => m.to_owned(),
                    (Some(_), None) => String::new(),
                    // No S3 error code (HEAD responses have no body): the status is all there
                    // is to go on.
                    (None, _) => format!("HTTP {status}"),
                };
                S3Error::from_code(service.err().code(), Some(status), message, &what)
            }
            SdkError::TimeoutError(_) => S3Error::Timeout(what),
            SdkError::DispatchFailure(failure) => {
                let detail = format!("{what}: {}", chain(&err));
                if failure.is_timeout() {
                    S3Error::Timeout(format!("{what}: cannot connect in time"))
                } else if failure.is_io() {
                    S3Error::Unreachable(detail)
                } else if detail.contains("credential") {
                    S3Error::NoCredentials(detail)
                } else {
                    S3Error::Unreachable(detail)
                }
            }
            SdkError::ResponseError(response) => {
                let status = response.raw().status().as_u16();
                let detail = format!("{what}: {}", chain(&err));
                if status >= 500 || status == 200 {
                    S3Error::Transient(detail)
                } else {
                    S3Error::from_code(None, Some(status), detail, &what)
                }
            }
            _ => {
                let detail = format!("{what}: {}", chain(&err));
                if detail.contains("credential") {
                    S3Error::NoCredentials(detail)
                } else {
                    S3Error::Other {
                        code: "ClientError".to_owned(),
                        status: 0,
                        message: detail,
                    }
                }
            }
        }
    }
}

fn to_system_time(t: Option<&aws_sdk_s3::primitives::DateTime>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn to_metadata(m: Option<&HashMap<String, String>>) -> UserMetadata {
    m.map(|m| {
        m.iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect()
    })
    .unwrap_or_default()
}

fn from_metadata(m: &UserMetadata) -> Option<HashMap<String, String>> {
    (!m.is_empty()).then(|| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Characters escaped in the `x-amz-copy-source` header: everything but unreserved and `/`.
const COPY_SOURCE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

fn copy_source_header(source: &CopySource) -> String {
    format!(
        "{}/{}",
        source.bucket,
        utf8_percent_encode(&source.key, COPY_SOURCE)
    )
}

/// Inclusive HTTP byte range for a non-empty half-open range.
fn http_range(range: &Range<u64>) -> String {
    format!("bytes={}-{}", range.start, range.end - 1)
}

fn obj(bucket: &BucketName, key: &str) -> String {
    format!("s3://{bucket}/{key}")
}

#[async_trait]
impl ObjectStore for AwsStore {
    async fn head_object(&self, bucket: &BucketName, key: &str) -> S3Result<ObjectInfo> {
        self.observe(Op::Head, RequestKind::Small, async {
            let out = self
                .client
                .head_object()
                .bucket(bucket.as_str())
                .key(key)
                .customize()
                .config_override(self.timeouts(RequestKind::Small))
                .send()
                .await;
            let out = match out.map_err(|e| map_err(e, obj(bucket, key))) {
                Ok(out) => out,
                Err(bad @ S3Error::Other { status: 400, .. }) => {
                    return Err(self.why_bad_request(bucket, key, bad).await);
                }
                Err(e) => return Err(e),
            };
            Ok(ObjectInfo {
                key: key.to_owned(),
                size: out.content_length().unwrap_or(0).max(0) as u64,
                etag: ETag(out.e_tag().unwrap_or_default().to_owned()),
                last_modified: to_system_time(out.last_modified()),
                content_type: out.content_type().map(str::to_owned),
                metadata: to_metadata(out.metadata()),
            })
        })
        .await
    }

    async fn get_object(
        &self,
        bucket: &BucketName,
        key: &str,
        range: Option<Range<u64>>,
        if_match: Option<&ETag>,
    ) -> S3Result<GetObject> {
        if let Some(r) = &range
            && r.is_empty()
        {
            // HTTP cannot express an empty range; S3 would answer with the whole object.
            let info = self.head_object(bucket, key).await?;
            if let Some(etag) = if_match
                && *etag != info.etag
            {
                return Err(S3Error::PreconditionFailed(obj(bucket, key)));
            }
            return Ok(GetObject {
                info,
                body: Box::pin(futures::stream::empty()),
            });
        }
        let out = self
            .observe(Op::Get, RequestKind::Small, async {
                self.client
                    .get_object()
                    .bucket(bucket.as_str())
                    .key(key)
                    .set_range(range.as_ref().map(http_range))
                    .set_if_match(if_match.map(|e| e.0.clone()))
                    .customize()
                    .config_override(self.timeouts(RequestKind::Small))
                    .send()
                    .await
                    .map_err(|e| map_err(e, obj(bucket, key)))
            })
            .await?;
        let size = match out.content_range() {
            // "bytes 0-9/100": the whole object's size follows the slash.
            Some(cr) => cr
                .rsplit('/')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            None => out.content_length().unwrap_or(0).max(0) as u64,
        };
        let info = ObjectInfo {
            key: key.to_owned(),
            size,
            etag: ETag(out.e_tag().unwrap_or_default().to_owned()),
            last_modified: to_system_time(out.last_modified()),
            content_type: out.content_type().map(str::to_owned),
            metadata: to_metadata(out.metadata()),
        };
        let what = obj(bucket, key);
        let body = futures::stream::try_unfold(
            (out.body, what),
            |(mut body, what): (SdkByteStream, String)| async move {
                match body.try_next().await {
                    Ok(Some(chunk)) => {
                        metrics::counter!("s3vol_s3_bytes_total", "direction" => "download")
                            .increment(chunk.len() as u64);
                        Ok(Some((chunk, (body, what))))
                    }
                    Ok(None) => Ok(None),
                    Err(e) => {
                        tracing::debug!(%what, error = %DisplayErrorContext(&e), "reading a body");
                        Err(S3Error::Transient(format!("reading {what}: {}", chain(&e))))
                    }
                }
            },
        );
        Ok(GetObject {
            info,
            body: Box::pin(body),
        })
    }

    async fn put_object(
        &self,
        bucket: &BucketName,
        key: &str,
        body: Bytes,
        options: &PutOptions,
    ) -> S3Result<PutResult> {
        let len = body.len() as u64;
        let out = self
            .observe(Op::Put, RequestKind::Upload(len), async {
                let request = self
                    .client
                    .put_object()
                    .bucket(bucket.as_str())
                    .key(key)
                    .body(SdkByteStream::from(body))
                    .set_metadata(from_metadata(&options.metadata))
                    .set_content_type(options.content_type.clone())
                    .set_if_none_match(options.if_none_match_any.then(|| "*".to_owned()));
                let request = request
                    .customize()
                    .config_override(self.timeouts(RequestKind::Upload(len)));
                if self.unsigned_payload {
                    request.disable_payload_signing().send().await
                } else {
                    request.send().await
                }
                .map_err(|e| map_err(e, obj(bucket, key)))
            })
            .await?;
        metrics::counter!("s3vol_s3_bytes_total", "direction" => "upload").increment(len);
        Ok(PutResult {
            etag: ETag(out.e_tag().unwrap_or_default().to_owned()),
        })
    }

    async fn create_multipart_upload(
        &self,
        bucket: &BucketName,
        key: &str,
        options: &PutOptions,
    ) -> S3Result<UploadId> {
        self.observe(Op::CreateMultipart, RequestKind::Small, async {
            let out = self
                .client
                .create_multipart_upload()
                .bucket(bucket.as_str())
                .key(key)
                .set_metadata(from_metadata(&options.metadata))
                .set_content_type(options.content_type.clone())
                .customize()
                .config_override(self.timeouts(RequestKind::Small))
                .send()
                .await
                .map_err(|e| map_err(e, obj(bucket, key)))?;
            out.upload_id()
                .map(|id| UploadId(id.to_owned()))
                .ok_or_else(|| S3Error::Other {
                    code: "MissingUploadId".to_owned(),
                    status: 200,
                    message: format!("{}: no upload id in the response", obj(bucket, key)),
                })
        })
        .await
    }

    async fn upload_part(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
        part_number: i32,
        body: Bytes,
    ) -> S3Result<CompletedPart> {
        let len = body.len() as u64;
        let out = self
            .observe(Op::UploadPart, RequestKind::Upload(len), async {
                let request = self
                    .client
                    .upload_part()
                    .bucket(bucket.as_str())
                    .key(key)
                    .upload_id(&upload_id.0)
                    .part_number(part_number)
                    .body(SdkByteStream::from(body));
                let request = request
                    .customize()
                    .config_override(self.timeouts(RequestKind::Upload(len)));
                if self.unsigned_payload {
                    request.disable_payload_signing().send().await
                } else {
                    request.send().await
                }
                .map_err(|e| map_err(e, format!("{} part {part_number}", obj(bucket, key))))
            })
            .await?;
        metrics::counter!("s3vol_s3_bytes_total", "direction" => "upload").increment(len);
        Ok(CompletedPart {
            part_number,
            etag: ETag(out.e_tag().unwrap_or_default().to_owned()),
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
        self.observe(Op::UploadPartCopy, RequestKind::ServerWork, async {
            let out = self
                .client
                .upload_part_copy()
                .bucket(bucket.as_str())
                .key(key)
                .upload_id(&upload_id.0)
                .part_number(part_number)
                .copy_source(copy_source_header(source))
                .set_copy_source_range(source.range.as_ref().map(http_range))
                .set_copy_source_if_match(source.if_match.as_ref().map(|e| e.0.clone()))
                .customize()
                .config_override(self.timeouts(RequestKind::ServerWork))
                .send()
                .await
                .map_err(|e| map_err(e, format!("{} part {part_number}", obj(bucket, key))))?;
            let etag = out
                .copy_part_result()
                .and_then(|r| r.e_tag())
                .unwrap_or_default();
            Ok(CompletedPart {
                part_number,
                etag: ETag(etag.to_owned()),
            })
        })
        .await
    }

    async fn complete_multipart_upload(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
        parts: &[CompletedPart],
    ) -> S3Result<PutResult> {
        self.observe(Op::CompleteMultipart, RequestKind::ServerWork, async {
            let parts = parts
                .iter()
                .map(|p| {
                    aws_sdk_s3::types::CompletedPart::builder()
                        .part_number(p.part_number)
                        .e_tag(&p.etag.0)
                        .build()
                })
                .collect();
            let result = self
                .client
                .complete_multipart_upload()
                .bucket(bucket.as_str())
                .key(key)
                .upload_id(&upload_id.0)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .customize()
                .config_override(self.timeouts(RequestKind::ServerWork))
                .send()
                .await;
            match result {
                Ok(out) => Ok(PutResult {
                    etag: ETag(out.e_tag().unwrap_or_default().to_owned()),
                }),
                // Some S3-compatible servers (moto among them) answer 200 with a differently
                // named XML root that the SDK refuses to parse. A 200 without an S3 error code
                // means the upload completed; the object's ETag is then read back.
                Err(SdkError::ServiceError(e))
                    if e.raw().status().as_u16() == 200 && e.err().code().is_none() =>
                {
                    tracing::debug!(
                        key,
                        "unparseable CompleteMultipartUpload answer; reading the ETag back"
                    );
                    let info = self.head_object(bucket, key).await?;
                    Ok(PutResult { etag: info.etag })
                }
                Err(e) => Err(map_err(e, obj(bucket, key))),
            }
        })
        .await
    }

    async fn abort_multipart_upload(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
    ) -> S3Result<()> {
        self.observe(Op::AbortMultipart, RequestKind::Small, async {
            self.client
                .abort_multipart_upload()
                .bucket(bucket.as_str())
                .key(key)
                .upload_id(&upload_id.0)
                .customize()
                .config_override(self.timeouts(RequestKind::Small))
                .send()
                .await
                .map_err(|e| map_err(e, obj(bucket, key)))?;
            Ok(())
        })
        .await
    }

    async fn list_parts(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
    ) -> S3Result<Vec<UploadedPart>> {
        self.observe(Op::ListParts, RequestKind::Small, async {
            let mut parts = Vec::new();
            let mut marker: Option<String> = None;
            // Bounded: 10,000 parts at most, 1,000 a page.
            for _ in 0..=10 {
                let answer = self
                    .client
                    .list_parts()
                    .bucket(bucket.as_str())
                    .key(key)
                    .upload_id(&upload_id.0)
                    .set_part_number_marker(marker.take())
                    .customize()
                    .config_override(self.timeouts(RequestKind::Small))
                    .send()
                    .await;
                let page = match answer {
                    Ok(page) => PartsPage {
                        parts: page
                            .parts()
                            .iter()
                            .map(|p| UploadedPart {
                                part_number: p.part_number().unwrap_or_default(),
                                etag: ETag(p.e_tag().unwrap_or_default().to_owned()),
                                size: p.size().unwrap_or_default().max(0) as u64,
                            })
                            .collect(),
                        next: page
                            .next_part_number_marker()
                            .filter(|_| page.is_truncated() == Some(true))
                            .map(str::to_owned),
                    },
                    // As for CompleteMultipartUpload: some servers (moto among them) name the
                    // XML root differently, which the SDK refuses; the body is read here.
                    Err(SdkError::ServiceError(e))
                        if e.raw().status().as_u16() == 200 && e.err().code().is_none() =>
                    {
                        e.raw()
                            .body()
                            .bytes()
                            .and_then(|b| std::str::from_utf8(b).ok())
                            .and_then(parse_parts_page)
                            .ok_or_else(|| S3Error::Other {
                                code: "UnreadableAnswer".to_owned(),
                                status: 200,
                                message: format!(
                                    "{}: unreadable ListParts answer",
                                    obj(bucket, key)
                                ),
                            })?
                    }
                    Err(e) => return Err(map_err(e, obj(bucket, key))),
                };
                parts.extend(page.parts);
                match page.next {
                    Some(next) => marker = Some(next),
                    None => break,
                }
            }
            parts.sort_by_key(|p| p.part_number);
            parts.dedup_by_key(|p| p.part_number);
            Ok(parts)
        })
        .await
    }

    async fn copy_object(
        &self,
        bucket: &BucketName,
        key: &str,
        source: &CopySource,
        directive: &MetadataDirective,
    ) -> S3Result<PutResult> {
        self.observe(Op::Copy, RequestKind::ServerWork, async {
            let mut req = self
                .client
                .copy_object()
                .bucket(bucket.as_str())
                .key(key)
                .copy_source(copy_source_header(source))
                .set_copy_source_if_match(source.if_match.as_ref().map(|e| e.0.clone()));
            req = match directive {
                MetadataDirective::Copy => {
                    req.metadata_directive(aws_sdk_s3::types::MetadataDirective::Copy)
                }
                MetadataDirective::Replace {
                    metadata,
                    content_type,
                } => req
                    .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
                    .set_metadata(from_metadata(metadata))
                    .set_content_type(content_type.clone()),
            };
            let out = req
                .customize()
                .config_override(self.timeouts(RequestKind::ServerWork))
                .send()
                .await
                .map_err(|e| {
                    map_err(
                        e,
                        format!(
                            "copy {} to {}",
                            obj(&source.bucket, &source.key),
                            obj(bucket, key)
                        ),
                    )
                })?;
            let etag = out
                .copy_object_result()
                .and_then(|r| r.e_tag())
                .unwrap_or_default();
            Ok(PutResult {
                etag: ETag(etag.to_owned()),
            })
        })
        .await
    }

    async fn delete_object(&self, bucket: &BucketName, key: &str) -> S3Result<()> {
        self.observe(Op::Delete, RequestKind::Small, async {
            self.client
                .delete_object()
                .bucket(bucket.as_str())
                .key(key)
                .customize()
                .config_override(self.timeouts(RequestKind::Small))
                .send()
                .await
                .map_err(|e| map_err(e, obj(bucket, key)))?;
            Ok(())
        })
        .await
    }

    async fn delete_objects(
        &self,
        bucket: &BucketName,
        keys: &[String],
    ) -> S3Result<Vec<(String, S3Error)>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.observe(Op::DeleteMany, RequestKind::ServerWork, async {
            let objects = keys
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| S3Error::InvalidRequest {
                    code: "InvalidArgument".to_owned(),
                    message: e.to_string(),
                })?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| S3Error::InvalidRequest {
                    code: "InvalidArgument".to_owned(),
                    message: e.to_string(),
                })?;
            let out = self
                .client
                .delete_objects()
                .bucket(bucket.as_str())
                .delete(delete)
                .customize()
                .config_override(self.timeouts(RequestKind::ServerWork))
                .send()
                .await
                .map_err(|e| map_err(e, format!("s3://{bucket}: delete {} keys", keys.len())))?;
            Ok(out
                .errors()
                .iter()
                .map(|e| {
                    let key = e.key().unwrap_or_default().to_owned();
                    let err = S3Error::from_code(
                        e.code(),
                        None,
                        e.message().unwrap_or_default().to_owned(),
                        &obj(bucket, &key),
                    );
                    (key, err)
                })
                .collect())
        })
        .await
    }

    async fn list_objects(&self, bucket: &BucketName, request: &ListRequest) -> S3Result<ListPage> {
        self.observe(Op::List, RequestKind::List, async {
            let out = self
                .client
                .list_objects_v2()
                .bucket(bucket.as_str())
                .prefix(&request.prefix)
                .set_delimiter(request.delimiter.clone())
                .set_start_after(request.start_after.clone())
                .set_continuation_token(request.continuation_token.clone())
                .set_max_keys(request.max_keys.map(|m| m.min(1000) as i32))
                .customize()
                .config_override(self.timeouts(RequestKind::List))
                .send()
                .await
                .map_err(|e| map_err(e, format!("s3://{bucket}/{}", request.prefix)))?;
            let objects = out
                .contents()
                .iter()
                .map(|o| ListEntry {
                    key: o.key().unwrap_or_default().to_owned(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: ETag(o.e_tag().unwrap_or_default().to_owned()),
                    last_modified: to_system_time(o.last_modified()),
                })
                .collect();
            let common_prefixes = out
                .common_prefixes()
                .iter()
                .filter_map(|p| p.prefix().map(str::to_owned))
                .collect();
            let next_continuation_token = if out.is_truncated().unwrap_or(false) {
                out.next_continuation_token().map(str::to_owned)
            } else {
                None
            };
            Ok(ListPage {
                objects,
                common_prefixes,
                next_continuation_token,
            })
        })
        .await
    }

    async fn create_bucket(&self, bucket: &BucketName) -> S3Result<()> {
        self.observe(Op::CreateBucket, RequestKind::Small, async {
            let region = self.region().unwrap_or("us-east-1");
            let config = (region != "us-east-1").then(|| {
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(region))
                    .build()
            });
            match self
                .client
                .create_bucket()
                .bucket(bucket.as_str())
                .set_create_bucket_configuration(config)
                .customize()
                .config_override(self.timeouts(RequestKind::Small))
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if e.code() == Some("BucketAlreadyOwnedByYou") => Ok(()),
                Err(e) => Err(map_err(e, format!("s3://{bucket}"))),
            }
        })
        .await
    }

    async fn head_bucket(&self, bucket: &BucketName) -> S3Result<()> {
        self.observe(Op::HeadBucket, RequestKind::Small, async {
            match self
                .client
                .head_bucket()
                .bucket(bucket.as_str())
                .customize()
                .config_override(self.timeouts(RequestKind::Small))
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(e) => match map_err(e, format!("s3://{bucket}")) {
                    // HEAD has no body, so a missing bucket arrives as a bare 404.
                    S3Error::NotFound(_) => Err(S3Error::NoSuchBucket(bucket.to_string())),
                    // ... and refused credentials as a bare 403, indistinguishable from a
                    // policy that denies: a LIST answers with the S3 error code that tells.
                    // An expired session token is a bare 400 the same way.
                    denied @ (S3Error::AccessDenied(_) | S3Error::Other { status: 400, .. }) => {
                        Err(self.why_denied(bucket, denied).await)
                    }
                    other => Err(other),
                },
            }
        })
        .await
    }

    async fn delete_bucket(&self, bucket: &BucketName) -> S3Result<()> {
        self.observe(Op::DeleteBucket, RequestKind::Small, async {
            self.client
                .delete_bucket()
                .bucket(bucket.as_str())
                .customize()
                .config_override(self.timeouts(RequestKind::Small))
                .send()
                .await
                .map_err(|e| map_err(e, bucket.as_str()))?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod list_parts_tests {
    use super::*;

    #[test]
    fn a_list_parts_answer_is_read_whatever_its_root_is_called() {
        let xml = r#"<?xml version="1.0" encoding="utf-8"?>
<ListPartsResponse xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>b</Bucket><Key>k</Key><UploadId>u</UploadId><PartNumberMarker>0</PartNumberMarker><NextPartNumberMarker>2</NextPartNumberMarker><MaxParts>2</MaxParts><IsTruncated>true</IsTruncated><Part><PartNumber>1</PartNumber><LastModified>2026-12-06T22:08:42.000Z</LastModified><ETag>"aed563ecafb4bcc5654c597a421547b2"</ETag><Size>100</Size></Part><Part><PartNumber>2</PartNumber><ETag>&quot;00</ETag><Size>7</Size></Part><Initiator><ID>x</ID></Initiator></ListPartsResponse>"#;
        let page = parse_parts_page(xml).unwrap();
        assert_eq!(
            page,
            PartsPage {
                parts: vec![
                    UploadedPart {
                        part_number: 1,
                        etag: ETag("\"aed563ecafb4bcc5654c597a421547b2\"".into()),
                        size: 100
                    },
                    UploadedPart {
                        part_number: 2,
                        etag: ETag("\"00".into()),
                        size: 7
                    },
                ],
                next: Some("2".into()),
            }
        );
        let last = xml.replace("<IsTruncated>true", "<IsTruncated>false");
        assert_eq!(parse_parts_page(&last).unwrap().next, None);
        assert!(
            parse_parts_page(
                "<ListPartsResult><Part><PartNumber>x</PartNumber></Part></ListPartsResult>"
            )
            .is_none()
        );
    }
}
