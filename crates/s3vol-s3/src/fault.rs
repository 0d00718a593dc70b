//! A wrapper that injects failures and latency into any [`ObjectStore`], for testing how the
//! layers above behave when S3 misbehaves.
//!
//! Faults are rules checked before each call, in the order they were added; the first that
//! matches decides. Rules can be added and cleared while the store is in use.

use std::ops::Range;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;

use crate::error::{S3Error, S3Result};
use crate::store::{GetObject, ObjectStore, Op};
use crate::types::{
    BucketName, CompletedPart, CopySource, ETag, ListPage, ListRequest, MetadataDirective,
    ObjectInfo, PutOptions, PutResult, UploadId, UploadedPart,
};

/// One injected misbehaviour.
#[derive(Clone, Debug)]
pub enum Fault {
    /// The `n`-th call from now (1-based, counting every operation) fails with `error`.
    FailNth { n: u64, error: S3Error },
    /// Calls of `op` fail with `error`, `times` times (`None`: until cleared).
    FailOp {
        op: Op,
        error: S3Error,
        times: Option<u64>,
    },
    /// Calls of `op` (every operation when `None`) are delayed.
    Latency { op: Option<Op>, delay: Duration },
    /// GETs answer with the whole object whatever range they ask for, as a server that
    /// ignores `Range` does (until cleared).
    IgnoreRange,
    /// Calls of `op` reach the store and take effect, but their answer is lost and `error`
    /// comes back instead, `times` times (`None`: until cleared): a connection that drops
    /// after the server acted.
    LoseAnswer {
        op: Op,
        error: S3Error,
        times: Option<u64>,
    },
    /// The next call of `op` waits for `action` before it reaches the store (once; the rule
    /// is then spent): another party acting between two calls of the code under test, such
    /// as a request of a dead process that S3 carries out late.
    Before { op: Op, action: Action },
}

/// What a [`Fault::Before`] rule runs.
#[derive(Clone)]
pub struct Action(Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>);

impl Action {
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Action(Arc::new(move || Box::pin(f())))
    }
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Action")
    }
}

#[derive(Debug)]
struct Rule {
    fault: Fault,
    /// The call count at which a `FailNth` rule was added.
    base: u64,
}

/// A store that misbehaves on purpose.
#[derive(Debug)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    rules: Mutex<Vec<Rule>>,
    calls: AtomicU64,
}

impl FaultStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner,
            rules: Mutex::new(Vec::new()),
            calls: AtomicU64::new(0),
        }
    }

    pub fn add(&self, fault: Fault) {
        let base = self.calls.load(Ordering::SeqCst);
        self.rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Rule { fault, base });
    }

    pub fn clear(&self) {
        self.rules.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// How many calls have been made through this wrapper.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    async fn before(&self, op: Op) -> S3Result<()> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let mut delay = Duration::ZERO;
        let mut action = None;
        let outcome = {
            let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = rules
                .iter()
                .position(|r| matches!(&r.fault, Fault::Before { op: o, .. } if *o == op))
                && let Fault::Before { action: a, .. } = rules.remove(i).fault
            {
                action = Some(a);
            }
            let mut outcome = Ok(());
            let mut spent = None;
            for (i, rule) in rules.iter_mut().enumerate() {
                match &mut rule.fault {
                    Fault::FailNth { n, error } if rule.base + *n == call => {
                        outcome = Err(error.clone());
                        spent = Some(i);
                        break;
                    }
                    Fault::FailOp {
                        op: o,
                        error,
                        times,
                    } if *o == op => {
                        outcome = Err(error.clone());
                        if let Some(t) = times {
                            *t = t.saturating_sub(1);
                            if *t == 0 {
                                spent = Some(i);
                            }
                        }
                        break;
                    }
                    Fault::Latency { op: o, delay: d } if o.is_none_or(|o| o == op) => {
                        delay += *d;
                    }
                    _ => {}
                }
            }
            if let Some(i) = spent {
                rules.remove(i);
            }
            outcome
        };
        if let Some(Action(run)) = action {
            run().await;
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        outcome
    }
}

impl FaultStore {
    /// What the caller of a call that reached the store gets: its `answer`, unless a
    /// [`Fault::LoseAnswer`] rule replaces it.
    fn answer<T>(&self, op: Op, answer: S3Result<T>) -> S3Result<T> {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = rules
            .iter()
            .position(|r| matches!(&r.fault, Fault::LoseAnswer { op: o, .. } if *o == op))
        else {
            return answer;
        };
        let Fault::LoseAnswer { error, times, .. } = &mut rules[i].fault else {
            return answer;
        };
        let error = error.clone();
        if let Some(t) = times {
            *t = t.saturating_sub(1);
            if *t == 0 {
                rules.remove(i);
            }
        }
        Err(error)
    }
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn head_object(&self, bucket: &BucketName, key: &str) -> S3Result<ObjectInfo> {
        self.before(Op::Head).await?;
        let answer = self.inner.head_object(bucket, key).await;
        self.answer(Op::Head, answer)
    }

    async fn get_object(
        &self,
        bucket: &BucketName,
        key: &str,
        range: Option<Range<u64>>,
        if_match: Option<&ETag>,
    ) -> S3Result<GetObject> {
        self.before(Op::Get).await?;
        let ignore = self
            .rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|r| matches!(r.fault, Fault::IgnoreRange));
        let range = if ignore { None } else { range };
        self.inner.get_object(bucket, key, range, if_match).await
    }

    async fn put_object(
        &self,
        bucket: &BucketName,
        key: &str,
        body: Bytes,
        options: &PutOptions,
    ) -> S3Result<PutResult> {
        self.before(Op::Put).await?;
        let answer = self.inner.put_object(bucket, key, body, options).await;
        self.answer(Op::Put, answer)
    }

    async fn create_multipart_upload(
        &self,
        bucket: &BucketName,
        key: &str,
        options: &PutOptions,
    ) -> S3Result<UploadId> {
        self.before(Op::CreateMultipart).await?;
        let answer = self
            .inner
            .create_multipart_upload(bucket, key, options)
            .await;
        self.answer(Op::CreateMultipart, answer)
    }

    async fn upload_part(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
        part_number: i32,
        body: Bytes,
    ) -> S3Result<CompletedPart> {
        self.before(Op::UploadPart).await?;
        let answer = self
            .inner
            .upload_part(bucket, key, upload_id, part_number, body)
            .await;
        self.answer(Op::UploadPart, answer)
    }

    async fn upload_part_copy(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
        part_number: i32,
        source: &CopySource,
    ) -> S3Result<CompletedPart> {
        self.before(Op::UploadPartCopy).await?;
        let answer = self
            .inner
            .upload_part_copy(bucket, key, upload_id, part_number, source)
            .await;
        self.answer(Op::UploadPartCopy, answer)
    }

    async fn complete_multipart_upload(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
        parts: &[CompletedPart],
    ) -> S3Result<PutResult> {
        self.before(Op::CompleteMultipart).await?;
        let answer = self
            .inner
            .complete_multipart_upload(bucket, key, upload_id, parts)
            .await;
        self.answer(Op::CompleteMultipart, answer)
    }

    async fn abort_multipart_upload(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
    ) -> S3Result<()> {
        self.before(Op::AbortMultipart).await?;
        let answer = self
            .inner
            .abort_multipart_upload(bucket, key, upload_id)
            .await;
        self.answer(Op::AbortMultipart, answer)
    }

    async fn list_parts(
        &self,
        bucket: &BucketName,
        key: &str,
        upload_id: &UploadId,
    ) -> S3Result<Vec<UploadedPart>> {
        self.before(Op::ListParts).await?;
        let answer = self.inner.list_parts(bucket, key, upload_id).await;
        self.answer(Op::ListParts, answer)
    }

    async fn copy_object(
        &self,
        bucket: &BucketName,
        key: &str,
        source: &CopySource,
        directive: &MetadataDirective,
    ) -> S3Result<PutResult> {
        self.before(Op::Copy).await?;
        let answer = self.inner.copy_object(bucket, key, source, directive).await;
        self.answer(Op::Copy, answer)
    }

    async fn delete_object(&self, bucket: &BucketName, key: &str) -> S3Result<()> {
        self.before(Op::Delete).await?;
        let answer = self.inner.delete_object(bucket, key).await;
        self.answer(Op::Delete, answer)
    }

    async fn delete_objects(
        &self,
        bucket: &BucketName,
        keys: &[String],
    ) -> S3Result<Vec<(String, S3Error)>> {
        self.before(Op::DeleteMany).await?;
        let answer = self.inner.delete_objects(bucket, keys).await;
        self.answer(Op::DeleteMany, answer)
    }

    async fn list_objects(&self, bucket: &BucketName, request: &ListRequest) -> S3Result<ListPage> {
        self.before(Op::List).await?;
        let answer = self.inner.list_objects(bucket, request).await;
        self.answer(Op::List, answer)
    }

    async fn create_bucket(&self, bucket: &BucketName) -> S3Result<()> {
        self.before(Op::CreateBucket).await?;
        let answer = self.inner.create_bucket(bucket).await;
        self.answer(Op::CreateBucket, answer)
    }

    async fn head_bucket(&self, bucket: &BucketName) -> S3Result<()> {
        self.before(Op::HeadBucket).await?;
        let answer = self.inner.head_bucket(bucket).await;
        self.answer(Op::HeadBucket, answer)
    }

    async fn delete_bucket(&self, bucket: &BucketName) -> S3Result<()> {
        self.before(Op::DeleteBucket).await?;
        let answer = self.inner.delete_bucket(bucket).await;
        self.answer(Op::DeleteBucket, answer)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::MemStore;

    fn err() -> S3Error {
        S3Error::Transient("injected".to_owned())
    }

    #[tokio::test]
    async fn fail_nth_counts_from_when_it_was_added() {
        let store = FaultStore::new(Arc::new(MemStore::new()));
        let b = BucketName::new("bkt").unwrap();
        store.create_bucket(&b).await.unwrap();
        store.add(Fault::FailNth { n: 2, error: err() });
        assert!(store.head_bucket(&b).await.is_ok());
        assert!(matches!(
            store.head_bucket(&b).await,
            Err(S3Error::Transient(_))
        ));
        assert!(store.head_bucket(&b).await.is_ok(), "the rule is spent");
    }

    #[tokio::test]
    async fn fail_op_only_hits_that_op_and_runs_out() {
        let store = FaultStore::new(Arc::new(MemStore::new()));
        let b = BucketName::new("bkt").unwrap();
        store.create_bucket(&b).await.unwrap();
        store.add(Fault::FailOp {
            op: Op::Put,
            error: err(),
            times: Some(2),
        });
        let opts = PutOptions::default();
        assert!(
            store
                .put_object(&b, "k", Bytes::new(), &opts)
                .await
                .is_err()
        );
        assert!(store.head_bucket(&b).await.is_ok());
        assert!(
            store
                .put_object(&b, "k", Bytes::new(), &opts)
                .await
                .is_err()
        );
        assert!(store.put_object(&b, "k", Bytes::new(), &opts).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn latency_delays_matching_calls() {
        let store = FaultStore::new(Arc::new(MemStore::new()));
        let b = BucketName::new("bkt").unwrap();
        store.create_bucket(&b).await.unwrap();
        store.add(Fault::Latency {
            op: Some(Op::HeadBucket),
            delay: Duration::from_millis(50),
        });
        // Paused time: elapsed time is exactly what the store slept.
        let t = tokio::time::Instant::now();
        store.head_bucket(&b).await.unwrap();
        assert_eq!(t.elapsed(), Duration::from_millis(50));
        store.create_bucket(&b).await.unwrap();
        assert_eq!(
            t.elapsed(),
            Duration::from_millis(50),
            "other ops are not delayed"
        );
        store.clear();
        let t = tokio::time::Instant::now();
        store.head_bucket(&b).await.unwrap();
        assert_eq!(t.elapsed(), Duration::ZERO);
    }
}
