//! One conformance suite for [`ObjectStore`], run against the in-memory store and against the
//! real S3 server started by `scripts/s3-server.sh`, so the fake cannot drift from S3.
//!
//! Each case gets a fresh bucket; the macro at the bottom instantiates every case for both
//! stores.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use s3vol_s3::{
    AwsStore, BucketName, CompletedPart, CopySource, ETag, ListRequest, MemStore,
    MetadataDirective, ObjectStore, PutOptions, S3Config, S3Error, UserMetadata, testing,
};

type Store = Arc<dyn ObjectStore>;

async fn fresh(store: &Store, tag: &str) -> BucketName {
    let b = testing::unique_bucket(tag);
    store.create_bucket(&b).await.expect("create bucket");
    b
}

async fn put(store: &Store, b: &BucketName, key: &str, body: &[u8]) -> ETag {
    store
        .put_object(b, key, Bytes::copy_from_slice(body), &PutOptions::default())
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"))
        .etag
}

async fn get(
    store: &Store,
    b: &BucketName,
    key: &str,
    range: Option<std::ops::Range<u64>>,
) -> Vec<u8> {
    let got = store
        .get_object(b, key, range, None)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"));
    let chunks: Vec<Bytes> = got.body.try_collect().await.expect("body");
    chunks.concat()
}

async fn list_all(
    store: &Store,
    b: &BucketName,
    prefix: &str,
    delimiter: Option<&str>,
    page: u32,
) -> (Vec<String>, Vec<String>, usize) {
    let mut keys = Vec::new();
    let mut prefixes = Vec::new();
    let mut pages = 0;
    let mut token = None;
    loop {
        let p = store
            .list_objects(
                b,
                &ListRequest {
                    prefix: prefix.to_owned(),
                    delimiter: delimiter.map(str::to_owned),
                    continuation_token: token.take(),
                    max_keys: Some(page),
                    ..ListRequest::default()
                },
            )
            .await
            .expect("list");
        pages += 1;
        assert!(p.objects.len() + p.common_prefixes.len() <= page as usize);
        keys.extend(p.objects.into_iter().map(|o| o.key));
        prefixes.extend(p.common_prefixes);
        match p.next_continuation_token {
            Some(t) => token = Some(t),
            None => break,
        }
        assert!(pages < 100, "listing does not end");
    }
    (keys, prefixes, pages)
}

fn meta(pairs: &[(&str, &str)]) -> UserMetadata {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn put_get_head_roundtrip_with_metadata(store: Store) {
    let b = fresh(&store, "roundtrip").await;
    let opts = PutOptions {
        metadata: meta(&[
            ("mode", "33188"),
            ("Mixed-Case", "Value"),
            ("mtime", "1700000000.5"),
        ]),
        content_type: Some("text/plain".to_owned()),
        if_none_match_any: false,
    };
    let etag = store
        .put_object(&b, "file.txt", Bytes::from_static(b"hello world"), &opts)
        .await
        .unwrap()
        .etag;
    let info = store.head_object(&b, "file.txt").await.unwrap();
    assert_eq!(info.size, 11);
    assert_eq!(info.etag, etag);
    assert_eq!(info.content_type.as_deref(), Some("text/plain"));
    assert_eq!(info.metadata.get("mode").map(String::as_str), Some("33188"));
    assert_eq!(
        info.metadata.get("mixed-case").map(String::as_str),
        Some("Value"),
        "metadata keys come back lower-cased: {:?}",
        info.metadata
    );
    assert_eq!(
        info.metadata.get("mtime").map(String::as_str),
        Some("1700000000.5")
    );
    assert_eq!(get(&store, &b, "file.txt", None).await, b"hello world");
    let got = store.get_object(&b, "file.txt", None, None).await.unwrap();
    assert_eq!(got.info.etag, etag);
    assert_eq!(got.info.size, 11);
    assert_eq!(got.info.metadata, info.metadata);
}

async fn awkward_keys_are_addressable(store: Store) {
    let b = fresh(&store, "keys").await;
    let keys = [
        "dir/",
        "a//b",
        "/leading",
        "sp ace+plus%pct?q=1&x#h",
        "ünï/cödé",
        "dir/inner",
    ];
    for (i, k) in keys.iter().enumerate() {
        put(&store, &b, k, format!("body{i}").as_bytes()).await;
    }
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            get(&store, &b, k, None).await,
            format!("body{i}").as_bytes(),
            "{k}"
        );
        assert_eq!(store.head_object(&b, k).await.unwrap().key, *k);
    }
    let (listed, _, _) = list_all(&store, &b, "", None, 1000).await;
    let mut expected: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    expected.sort();
    assert_eq!(listed, expected, "binary key order");
    // Copy between awkward keys needs the copy source escaped right.
    store
        .copy_object(
            &b,
            "copied ü+%",
            &CopySource {
                bucket: b.clone(),
                key: "sp ace+plus%pct?q=1&x#h".into(),
                range: None,
                if_match: None,
            },
            &MetadataDirective::Copy,
        )
        .await
        .unwrap();
    assert_eq!(get(&store, &b, "copied ü+%", None).await, b"body3");
}

async fn empty_objects_and_ranges(store: Store) {
    let b = fresh(&store, "ranges").await;
    put(&store, &b, "empty", b"").await;
    assert_eq!(store.head_object(&b, "empty").await.unwrap().size, 0);
    assert_eq!(get(&store, &b, "empty", None).await, b"");
    put(&store, &b, "ten", b"0123456789").await;
    assert_eq!(get(&store, &b, "ten", Some(2..5)).await, b"234");
    assert_eq!(
        get(&store, &b, "ten", Some(4..4)).await,
        b"",
        "an empty range reads nothing"
    );
    assert_eq!(
        get(&store, &b, "ten", Some(8..100)).await,
        b"89",
        "a range past the end is cut"
    );
    let whole = store.get_object(&b, "ten", Some(2..5), None).await.unwrap();
    assert_eq!(
        whole.info.size, 10,
        "a ranged GET still reports the object's size"
    );
    match store.get_object(&b, "ten", Some(10..20), None).await {
        Err(S3Error::InvalidRequest { code, .. }) => assert_eq!(code, "InvalidRange"),
        other => panic!("range past the end: {other:?}"),
    }
}

async fn missing_keys_and_conditions(store: Store) {
    let b = fresh(&store, "cond").await;
    assert!(matches!(
        store.head_object(&b, "nope").await,
        Err(S3Error::NotFound(_))
    ));
    assert!(matches!(
        store.get_object(&b, "nope", None, None).await,
        Err(S3Error::NotFound(_))
    ));
    let etag = put(&store, &b, "k", b"v1").await;
    assert_eq!(get(&store, &b, "k", None).await, b"v1");
    assert!(store.get_object(&b, "k", None, Some(&etag)).await.is_ok());
    let stale = ETag("\"00000000000000000000000000000000\"".into());
    assert!(matches!(
        store.get_object(&b, "k", Some(0..1), Some(&stale)).await,
        Err(S3Error::PreconditionFailed(_))
    ));
    let no_clobber = PutOptions {
        if_none_match_any: true,
        ..PutOptions::default()
    };
    assert!(matches!(
        store
            .put_object(&b, "k", Bytes::from_static(b"v2"), &no_clobber)
            .await,
        Err(S3Error::PreconditionFailed(_))
    ));
    assert_eq!(
        get(&store, &b, "k", None).await,
        b"v1",
        "a failed conditional put changes nothing"
    );
    store
        .put_object(&b, "new", Bytes::from_static(b"n"), &no_clobber)
        .await
        .unwrap();
    store
        .delete_object(&b, "never-existed")
        .await
        .expect("deleting a missing key succeeds");
    store.delete_object(&b, "k").await.unwrap();
    assert!(matches!(
        store.head_object(&b, "k").await,
        Err(S3Error::NotFound(_))
    ));
}

async fn listing_order_delimiter_and_pages(store: Store) {
    let b = fresh(&store, "list").await;
    let keys = [
        "B",
        "a",
        "a/",
        "a/1",
        "a/2/x",
        "a0",
        "b/c/d",
        "b/e",
        "c",
        "dir_$folder$",
    ];
    for k in keys {
        put(&store, &b, k, b"x").await;
    }
    let (all, _, pages) = list_all(&store, &b, "", None, 3).await;
    assert_eq!(all, keys, "UTF-8 binary order across pages");
    assert_eq!(pages, 4);
    let (top, prefixes, _) = list_all(&store, &b, "", Some("/"), 1000).await;
    assert_eq!(top, ["B", "a", "a0", "c", "dir_$folder$"]);
    assert_eq!(prefixes, ["a/", "b/"]);
    // Paging through a mix of prefixes and keys, two at a time, loses and repeats nothing.
    let (top2, prefixes2, _) = list_all(&store, &b, "", Some("/"), 2).await;
    assert_eq!((top2, prefixes2), (top, prefixes));
    let (inner, inner_prefixes, _) = list_all(&store, &b, "a/", Some("/"), 1000).await;
    assert_eq!(
        inner,
        ["a/", "a/1"],
        "the marker itself is listed under its prefix"
    );
    assert_eq!(inner_prefixes, ["a/2/"]);
    let page = store
        .list_objects(
            &b,
            &ListRequest {
                prefix: "".into(),
                start_after: Some("a0".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let after: Vec<_> = page.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(after, ["b/c/d", "b/e", "c", "dir_$folder$"]);
    assert_eq!(page.objects[0].size, 1);
    let none = store
        .list_objects(
            &b,
            &ListRequest {
                prefix: "zzz".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(
        none.objects.is_empty()
            && none.common_prefixes.is_empty()
            && none.next_continuation_token.is_none()
    );
}

async fn multipart_upload_and_part_copy(store: Store) {
    let b = fresh(&store, "mpu").await;
    let part1: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let source: Vec<u8> = (0..6 * 1024 * 1024).map(|i| (i % 241) as u8).collect();
    put(&store, &b, "source", &source).await;
    let copied = 1024..(1024 + 5 * 1024 * 1024);
    let opts = PutOptions {
        metadata: meta(&[("mode", "33261")]),
        content_type: Some("application/octet-stream".into()),
        ..Default::default()
    };
    let id = store
        .create_multipart_upload(&b, "big", &opts)
        .await
        .unwrap();
    let p1 = store
        .upload_part(&b, "big", &id, 1, Bytes::from(part1.clone()))
        .await
        .unwrap();
    let p2 = store
        .upload_part_copy(
            &b,
            "big",
            &id,
            2,
            &CopySource {
                bucket: b.clone(),
                key: "source".into(),
                range: Some(copied.start as u64..copied.end as u64),
                if_match: None,
            },
        )
        .await
        .unwrap();
    let p3 = store
        .upload_part(&b, "big", &id, 3, Bytes::from_static(b"tail"))
        .await
        .unwrap();
    let parts = [p1, p2, p3];
    let done = store
        .complete_multipart_upload(&b, "big", &id, &parts)
        .await
        .unwrap();
    assert!(
        done.etag.as_str().ends_with("-3\""),
        "multipart ETag {done:?}"
    );
    // What a client whose CompleteMultipartUpload went unanswered compares the object with.
    assert_eq!(
        CompletedPart::multipart_etag(&parts).as_deref(),
        Some(done.etag.as_str().trim_matches('"')),
        "the multipart ETag can be known from the parts"
    );
    let mut expected = part1;
    expected.extend_from_slice(&source[copied]);
    expected.extend_from_slice(b"tail");
    assert_eq!(get(&store, &b, "big", None).await, expected);
    let info = store.head_object(&b, "big").await.unwrap();
    assert_eq!(info.size, expected.len() as u64);
    assert_eq!(info.metadata.get("mode").map(String::as_str), Some("33261"));

    let id = store
        .create_multipart_upload(&b, "aborted", &PutOptions::default())
        .await
        .unwrap();
    store
        .upload_part(&b, "aborted", &id, 1, Bytes::from_static(b"x"))
        .await
        .unwrap();
    store
        .abort_multipart_upload(&b, "aborted", &id)
        .await
        .unwrap();
    assert!(
        store
            .upload_part(&b, "aborted", &id, 2, Bytes::from_static(b"y"))
            .await
            .is_err()
    );
    assert!(matches!(
        store.head_object(&b, "aborted").await,
        Err(S3Error::NotFound(_))
    ));
}

async fn copy_keeps_or_replaces_metadata(store: Store) {
    let b = fresh(&store, "copy").await;
    let opts = PutOptions {
        metadata: meta(&[("mode", "33188"), ("uid", "1000")]),
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    let etag = store
        .put_object(&b, "src", Bytes::from_static(b"data"), &opts)
        .await
        .unwrap()
        .etag;
    let src = |if_match: Option<ETag>| CopySource {
        bucket: b.clone(),
        key: "src".into(),
        range: None,
        if_match,
    };
    store
        .copy_object(
            &b,
            "kept",
            &src(Some(etag.clone())),
            &MetadataDirective::Copy,
        )
        .await
        .unwrap();
    let kept = store.head_object(&b, "kept").await.unwrap();
    assert_eq!(kept.metadata, opts.metadata);
    store
        .copy_object(
            &b,
            "replaced",
            &src(None),
            &MetadataDirective::Replace {
                metadata: meta(&[("mode", "33261")]),
                content_type: Some("application/x-directory".into()),
            },
        )
        .await
        .unwrap();
    let replaced = store.head_object(&b, "replaced").await.unwrap();
    assert_eq!(replaced.metadata, meta(&[("mode", "33261")]));
    assert_eq!(
        replaced.content_type.as_deref(),
        Some("application/x-directory")
    );
    assert_eq!(get(&store, &b, "replaced", None).await, b"data");
    // Metadata can be rewritten in place with REPLACE (chmod without re-uploading).
    store
        .copy_object(
            &b,
            "src",
            &src(None),
            &MetadataDirective::Replace {
                metadata: meta(&[("mode", "33152")]),
                content_type: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store.head_object(&b, "src").await.unwrap().metadata,
        meta(&[("mode", "33152")])
    );
    assert!(matches!(
        store
            .copy_object(
                &b,
                "x",
                &CopySource {
                    bucket: b.clone(),
                    key: "missing".into(),
                    range: None,
                    if_match: None
                },
                &MetadataDirective::Copy
            )
            .await,
        Err(S3Error::NotFound(_))
    ));
}

async fn delete_many_and_buckets(store: Store) {
    let b = fresh(&store, "buckets").await;
    store
        .create_bucket(&b)
        .await
        .expect("creating our own bucket again succeeds");
    store.head_bucket(&b).await.unwrap();
    for k in ["1", "2", "3"] {
        put(&store, &b, k, b"x").await;
    }
    assert!(matches!(
        store.delete_bucket(&b).await,
        Err(S3Error::BucketNotEmpty(_))
    ));
    let failed = store
        .delete_objects(&b, &["1".into(), "2".into(), "3".into(), "never".into()])
        .await
        .unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    let (left, _, _) = list_all(&store, &b, "", None, 1000).await;
    assert!(left.is_empty(), "{left:?}");
    store.delete_bucket(&b).await.unwrap();
    assert!(matches!(
        store.head_bucket(&b).await,
        Err(S3Error::NoSuchBucket(_))
    ));
    // HEAD has no body: a missing bucket looks like a missing key.
    assert!(matches!(
        store.head_object(&b, "1").await,
        Err(S3Error::NotFound(_))
    ));
    assert!(matches!(
        store
            .put_object(&b, "k", Bytes::new(), &PutOptions::default())
            .await,
        Err(S3Error::NoSuchBucket(_))
    ));
    assert!(matches!(
        store.list_objects(&b, &ListRequest::default()).await,
        Err(S3Error::NoSuchBucket(_))
    ));
    assert!(matches!(
        store.delete_bucket(&b).await,
        Err(S3Error::NoSuchBucket(_))
    ));
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod mem {
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(Arc::new(MemStore::new())).await;
                }
            )*
        }
        mod s3 {
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(Arc::new(AwsStore::new(&testing::config()).await)).await;
                }
            )*
        }
    };
}

/// Uploads with `UNSIGNED-PAYLOAD` are accepted by a server that checks signatures.
mod s3_unsigned_payload {
    use super::*;
    use s3vol_s3::PayloadSigning;

    async fn store() -> Store {
        let config = S3Config {
            payload_signing: PayloadSigning::Never,
            ..testing::config()
        };
        assert!(config.unsigned_payload());
        Arc::new(AwsStore::new(&config).await)
    }

    #[tokio::test]
    async fn put_get_head_roundtrip_with_metadata() {
        super::put_get_head_roundtrip_with_metadata(store().await).await;
    }

    #[tokio::test]
    async fn awkward_keys_are_addressable() {
        super::awkward_keys_are_addressable(store().await).await;
    }

    #[tokio::test]
    async fn multipart_upload_and_part_copy() {
        super::multipart_upload_and_part_copy(store().await).await;
    }
}

conformance!(
    put_get_head_roundtrip_with_metadata,
    awkward_keys_are_addressable,
    empty_objects_and_ranges,
    missing_keys_and_conditions,
    listing_order_delimiter_and_pages,
    multipart_upload_and_part_copy,
    copy_keeps_or_replaces_metadata,
    delete_many_and_buckets,
);
