//! A wrong endpoint, wrong credentials and a missing bucket each give a clear, typed error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use s3vol_s3::{
    AwsStore, BucketName, CredentialSource, ObjectStore, S3Config, S3Error, StaticCredentials,
    testing,
};

#[tokio::test]
async fn unreachable_endpoint_is_typed() {
    // Port 1 on loopback: nothing listens there, the connection is refused at once.
    let config = S3Config {
        endpoint_url: Some("http://127.0.0.1:1".into()),
        ..testing::config()
    };
    let store = AwsStore::new(&config).await;
    let err = store
        .head_bucket(&testing::unique_bucket("unreachable"))
        .await
        .unwrap_err();
    assert!(matches!(err, S3Error::Unreachable(_)), "{err:?}");
    assert!(err.is_transient());
    assert!(err.to_string().contains("cannot reach"), "{err}");
}

#[tokio::test]
async fn unknown_access_key_is_rejected() {
    let config = S3Config {
        credentials: CredentialSource::Static(StaticCredentials {
            access_key_id: "AKIAUNKNOWNKEY000000".into(),
            secret_access_key: "whatever".into(),
            session_token: None,
        }),
        ..testing::config()
    };
    let store = AwsStore::new(&config).await;
    let err = store
        .list_objects(&testing::unique_bucket("badkey"), &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(err, S3Error::InvalidCredentials { .. }), "{err:?}");
    assert!(err.to_string().starts_with("unknown access key: "), "{err}");
}

#[tokio::test]
async fn wrong_secret_is_rejected() {
    let mut keys = testing::credentials();
    keys.secret_access_key.push_str("-wrong");
    let config = S3Config {
        credentials: CredentialSource::Static(keys),
        ..testing::config()
    };
    let store = AwsStore::new(&config).await;
    // The bucket exists, so only the signature can be at fault.
    let good = AwsStore::new(&testing::config()).await;
    let bucket = testing::unique_bucket("badsecret");
    good.create_bucket(&bucket).await.unwrap();
    let err = store
        .list_objects(&bucket, &Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, S3Error::InvalidCredentials { ref code, .. } if code == "SignatureDoesNotMatch"),
        "{err:?}"
    );
    // HEAD responses have no body: the bare 403 is asked again as a LIST, whose answer names
    // the signature, not a policy.
    let err = store.head_bucket(&bucket).await.unwrap_err();
    assert!(
        matches!(err, S3Error::InvalidCredentials { ref code, .. } if code == "SignatureDoesNotMatch"),
        "{err:?}"
    );
    assert!(err.to_string().starts_with("signature mismatch: "), "{err}");
}

#[tokio::test]
async fn missing_bucket_is_typed() {
    let store = AwsStore::new(&testing::config()).await;
    let missing = BucketName::new("s3vol-no-such-bucket-anywhere").unwrap();
    assert!(matches!(
        store.head_bucket(&missing).await,
        Err(S3Error::NoSuchBucket(_))
    ));
    assert!(matches!(
        store.list_objects(&missing, &Default::default()).await,
        Err(S3Error::NoSuchBucket(_))
    ));
    assert!(matches!(
        store.head_object(&missing, "k").await,
        Err(S3Error::NotFound(_))
    ));
}
