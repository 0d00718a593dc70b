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

/// Temporary credentials that live `seconds` and the time they expire, from the test server's
/// STS (AssumeRole with the test keys; the patched server refuses assumed-role keys after their
/// expiry, as AWS does, before it looks at the role, which need not exist).
async fn short_lived_credentials(seconds: i32) -> (StaticCredentials, std::time::SystemTime) {
    let keys = testing::credentials();
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(testing::endpoint())
        .credentials_provider(aws_credential_types::Credentials::new(
            keys.access_key_id,
            keys.secret_access_key,
            None,
            None,
            "test",
        ))
        .load()
        .await;
    let out = aws_sdk_sts::Client::new(&sdk)
        .assume_role()
        .role_arn("arn:aws:iam::123456789012:role/s3vol-expiring")
        .role_session_name("s3vol-test")
        .duration_seconds(seconds)
        .send()
        .await
        .unwrap();
    let c = out.credentials.unwrap();
    let expires = std::time::SystemTime::try_from(c.expiration).unwrap();
    let keys = StaticCredentials {
        access_key_id: c.access_key_id,
        secret_access_key: c.secret_access_key,
        session_token: Some(c.session_token),
    };
    (keys, expires)
}

#[tokio::test]
async fn an_expired_session_token_on_a_head_is_a_credentials_error() {
    let good = AwsStore::new(&testing::config()).await;
    let bucket = testing::unique_bucket("expiredhead");
    good.create_bucket(&bucket).await.unwrap();
    good.put_object(
        &bucket,
        "there",
        bytes::Bytes::from_static(b"x"),
        &Default::default(),
    )
    .await
    .unwrap();
    let (keys, expires) = short_lived_credentials(1).await;
    let config = S3Config {
        credentials: CredentialSource::Static(keys),
        ..testing::config()
    };
    let store = AwsStore::new(&config).await;
    let wait = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + std::time::Duration::from_millis(500)).await;
    // S3 answers the HEAD with a bare 400; the error still names the expired token, so the
    // filesystem answers EACCES and says what to renew, not an I/O error. For a key that is
    // absent and one that exists alike.
    for key in ["some/key", "there"] {
        let err = store.head_object(&bucket, key).await.unwrap_err();
        assert!(
            matches!(err, S3Error::InvalidCredentials { ref code, .. } if code == "ExpiredToken"),
            "{key}: {err:?}"
        );
        assert!(
            err.to_string().starts_with("the session token is expired"),
            "{err}"
        );
    }
    let err = store.head_bucket(&bucket).await.unwrap_err();
    assert!(
        matches!(err, S3Error::InvalidCredentials { ref code, .. } if code == "ExpiredToken"),
        "{err:?}"
    );
}
