//! Helpers for tests that talk to a real S3-compatible server.
//!
//! The server is started by `scripts/s3-server.sh start`, which prints the `S3VOL_TEST_*`
//! variables read here; `scripts/test.sh` does that before running the suite. A test that needs
//! the server and does not find them fails with that instruction rather than skipping, so a
//! missing server can never pass for a green run.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::config::{Addressing, CredentialSource, S3Config, StaticCredentials};
use crate::types::BucketName;

/// Reads one `S3VOL_TEST_*` variable or panics with how to get it.
fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set. Start the test S3 server and load its settings: \
             `eval \"$(scripts/s3-server.sh start)\"` (scripts/test.sh does this)"
        )
    })
}

/// The endpoint of the test server.
pub fn endpoint() -> String {
    var("S3VOL_TEST_ENDPOINT")
}

/// The credentials the test server accepts.
pub fn credentials() -> StaticCredentials {
    StaticCredentials {
        access_key_id: var("S3VOL_TEST_ACCESS_KEY_ID"),
        secret_access_key: var("S3VOL_TEST_SECRET_ACCESS_KEY"),
        session_token: None,
    }
}

/// A client configuration for the test server (path-style, static keys, few retries so failure
/// tests stay fast).
pub fn config() -> S3Config {
    S3Config {
        endpoint_url: Some(endpoint()),
        region: Some(std::env::var("S3VOL_TEST_REGION").unwrap_or_else(|_| "us-east-1".into())),
        addressing: Addressing::Path,
        credentials: CredentialSource::Static(credentials()),
        max_attempts: 2,
        ..S3Config::default()
    }
}

/// A bucket name no other test (or test process) uses: `<tag>-<pid>-<n>-<nanos>`.
pub fn unique_bucket(tag: &str) -> BucketName {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tag: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(30)
        .collect();
    let name = format!(
        "t-{tag}-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let name: String = name.chars().take(63).collect();
    match BucketName::new(name.trim_end_matches('-')) {
        Ok(b) => b,
        Err(e) => panic!("test bucket name: {e}"),
    }
}
