//! Clients for one object store: S3 (through `s3vol-s3`'s configuration), its IAM service, and
//! what the driver reports about it (endpoint, region, addressing style).
//!
//! Calls name their store through class parameters layered over the driver's defaults
//! ([`DriverConfig`]). Building SDK clients reads configuration files and sets up connection
//! pools, so backends are cached by everything that identifies them, credentials included: a
//! rotated credentials Secret yields a new backend on the next call, and the cache is cleared
//! when it grows past a small bound rather than growing forever.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use s3vol_s3::{AwsStore, CredentialSource, S3Config, S3Error, StaticCredentials};
use sha2::{Digest, Sha256};

use crate::error::{CosiError, CosiResult};
use crate::params::{Addressing, StoreParams};

/// The driver's own settings: its name, and the store it talks to unless a class says
/// otherwise.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// The driver name COSI classes refer to (`driverName`).
    pub name: String,
    /// The default store: endpoint, region, addressing, credentials, timeouts.
    pub defaults: S3Config,
    /// The default IAM endpoint; `None` means the S3 endpoint when one is set, else AWS IAM.
    pub iam_endpoint: Option<String>,
    /// Where `credentialsSecret` class parameters are looked up: `<dir>/<name>/AWS_ACCESS_KEY_ID`
    /// and `AWS_SECRET_ACCESS_KEY` (a Secret mounted as a directory).
    pub secrets_dir: PathBuf,
}

/// Checks a driver name against the rules of `DriverGetInfo` (63 characters at most, starting
/// and ending with an alphanumeric, `-`, `.` and alphanumerics between).
pub fn check_driver_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "driver name {name:?} must be 1-63 characters of letters, digits, '-' and '.', \
             starting and ending with a letter or digit"
        ))
    }
}

/// Clients and facts for one store.
#[derive(Debug)]
pub(crate) struct Backend {
    /// Cache identity, also keys the driver's memory of minted secrets.
    pub key: String,
    pub s3: aws_sdk_s3::Client,
    pub store: AwsStore,
    pub iam: aws_sdk_iam::Client,
    /// The endpoint workloads should use.
    pub endpoint: String,
    pub region: String,
    pub addressing: Addressing,
    credentials: Option<SharedCredentialsProvider>,
}

impl Backend {
    /// The store credentials as long-lived keys, for `static` grants.
    pub async fn static_credentials(&self) -> CosiResult<StaticCredentials> {
        let Some(provider) = &self.credentials else {
            return Err(CosiError::FailedPrecondition(
                "a static grant needs store credentials, but requests are unsigned".into(),
            ));
        };
        let creds = provider.provide_credentials().await.map_err(|e| {
            CosiError::store(
                "resolving the store credentials",
                S3Error::NoCredentials(e.to_string()),
            )
        })?;
        if creds.session_token().is_some() || creds.expiry().is_some() {
            return Err(CosiError::FailedPrecondition(
                "a static grant hands out the store credentials, but these are temporary \
                 (session token or expiry) and would stop working; configure long-lived keys \
                 (credentialsSecret) or use grant: iam"
                    .into(),
            ));
        }
        Ok(StaticCredentials {
            access_key_id: creds.access_key_id().to_owned(),
            secret_access_key: creds.secret_access_key().to_owned(),
            session_token: None,
        })
    }
}

const MAX_CACHED: usize = 64;

/// Builds and caches [`Backend`]s.
#[derive(Debug)]
pub(crate) struct Backends {
    config: DriverConfig,
    cache: Mutex<HashMap<String, Arc<Backend>>>,
}

async fn read_secret_file(dir: &Path, name: &str) -> CosiResult<Option<String>> {
    match tokio::fs::read_to_string(dir.join(name)).await {
        Ok(s) => Ok(Some(s.trim().to_owned()).filter(|s| !s.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CosiError::FailedPrecondition(format!(
            "cannot read {}: {e}",
            dir.join(name).display()
        ))),
    }
}

impl Backends {
    pub fn new(config: DriverConfig) -> Self {
        Self {
            config,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &DriverConfig {
        &self.config
    }

    /// The store settings for `p`: the driver's defaults with the class's overrides.
    async fn resolve(&self, p: &StoreParams) -> CosiResult<(S3Config, Option<String>)> {
        let mut cfg = self.config.defaults.clone();
        if let Some(e) = &p.endpoint {
            cfg.endpoint_url = Some(e.clone());
        }
        if let Some(r) = &p.region {
            cfg.region = Some(r.clone());
        }
        match p.addressing {
            Some(Addressing::Path) => cfg.addressing = s3vol_s3::Addressing::Path,
            Some(Addressing::Virtual) => cfg.addressing = s3vol_s3::Addressing::VirtualHosted,
            None => {}
        }
        if let Some(profile) = &p.profile {
            cfg.credentials = CredentialSource::Profile(profile.clone());
        }
        if let Some(secret) = &p.credentials_secret {
            let dir = self.config.secrets_dir.join(secret);
            let id = read_secret_file(&dir, "AWS_ACCESS_KEY_ID").await?;
            let key = read_secret_file(&dir, "AWS_SECRET_ACCESS_KEY").await?;
            let token = read_secret_file(&dir, "AWS_SESSION_TOKEN").await?;
            let (Some(access_key_id), Some(secret_access_key)) = (id, key) else {
                return Err(CosiError::FailedPrecondition(format!(
                    "credentials secret {secret:?}: {} must hold AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY",
                    dir.display()
                )));
            };
            cfg.credentials = CredentialSource::Static(StaticCredentials {
                access_key_id,
                secret_access_key,
                session_token: token,
            });
        }
        // The IAM endpoint follows the class's S3 endpoint unless named; the driver's default
        // IAM endpoint belongs with the driver's default S3 endpoint.
        let iam = match (&p.iam_endpoint, &p.endpoint) {
            (Some(iam), _) => Some(iam.clone()),
            (None, Some(s3)) => Some(s3.clone()),
            (None, None) => self.config.iam_endpoint.clone(),
        };
        Ok((cfg, iam))
    }

    /// The backend for these parameters, built on first use.
    pub async fn get(&self, p: &StoreParams) -> CosiResult<Arc<Backend>> {
        let (cfg, iam_endpoint) = self.resolve(p).await?;
        let key = cache_key(&cfg, iam_endpoint.as_deref());
        if let Some(b) = self.lock().get(&key) {
            return Ok(b.clone());
        }
        let shared = cfg.load_shared_config().await;
        let s3 = cfg.build_sdk_client().await;
        let mut iam = aws_sdk_iam::config::Builder::from(&shared);
        if let Some(e) = &iam_endpoint {
            iam = iam.endpoint_url(e);
        }
        let region = shared
            .region()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "us-east-1".to_owned());
        let endpoint = cfg
            .endpoint_url
            .clone()
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let backend = Arc::new(Backend {
            key: key.clone(),
            store: AwsStore::from_client(s3.clone()),
            s3,
            iam: aws_sdk_iam::Client::from_conf(iam.build()),
            endpoint,
            region,
            addressing: match cfg.addressing {
                s3vol_s3::Addressing::Path => Addressing::Path,
                s3vol_s3::Addressing::VirtualHosted => Addressing::Virtual,
            },
            credentials: shared.credentials_provider(),
        });
        let mut cache = self.lock();
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(key, backend.clone());
        Ok(backend)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Backend>>> {
        // A panic while holding this lock leaves a plain map behind, still usable.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Identifies a store configuration, secrets included, without keeping them in the clear.
fn cache_key(cfg: &S3Config, iam_endpoint: Option<&str>) -> String {
    let mut h = Sha256::new();
    // `S3Config`'s Debug redacts secrets, so they are hashed in explicitly.
    h.update(format!("{cfg:?}|{iam_endpoint:?}").as_bytes());
    if let CredentialSource::Static(k) = &cfg.credentials {
        h.update([0]);
        h.update(k.secret_access_key.as_bytes());
        h.update([0]);
        h.update(k.session_token.as_deref().unwrap_or("").as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn backends(dir: &Path) -> Backends {
        Backends::new(DriverConfig {
            name: "cosi.s3vol.io".into(),
            defaults: S3Config {
                endpoint_url: Some("http://127.0.0.1:1".into()),
                region: Some("r1".into()),
                ..S3Config::default()
            },
            iam_endpoint: Some("http://127.0.0.1:2".into()),
            secrets_dir: dir.to_owned(),
        })
    }

    #[test]
    fn driver_names_follow_the_spec() {
        assert!(check_driver_name("cosi.s3vol.io").is_ok());
        for bad in ["", "-a", "a-", "a_b", &"a".repeat(64)] {
            assert!(check_driver_name(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn class_parameters_override_driver_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let b = backends(dir.path());
        let (cfg, iam) = b.resolve(&StoreParams::default()).await.unwrap();
        assert_eq!(cfg.endpoint_url.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(iam.as_deref(), Some("http://127.0.0.1:2"));
        let p = StoreParams {
            endpoint: Some("http://other:9000".into()),
            region: Some("r2".into()),
            addressing: Some(Addressing::Path),
            ..StoreParams::default()
        };
        let (cfg, iam) = b.resolve(&p).await.unwrap();
        assert_eq!(cfg.region.as_deref(), Some("r2"));
        assert_eq!(cfg.addressing, s3vol_s3::Addressing::Path);
        // The IAM endpoint follows the class's S3 endpoint, not the driver's IAM default.
        assert_eq!(iam.as_deref(), Some("http://other:9000"));
    }

    #[tokio::test]
    async fn credentials_secrets_are_read_from_the_secrets_dir() {
        let dir = tempfile::tempdir().unwrap();
        let b = backends(dir.path());
        let p = StoreParams {
            credentials_secret: Some("admin".into()),
            ..StoreParams::default()
        };
        let e = b.resolve(&p).await.unwrap_err();
        assert!(matches!(e, CosiError::FailedPrecondition(_)), "{e}");
        std::fs::create_dir(dir.path().join("admin")).unwrap();
        std::fs::write(dir.path().join("admin/AWS_ACCESS_KEY_ID"), "AKID\n").unwrap();
        std::fs::write(dir.path().join("admin/AWS_SECRET_ACCESS_KEY"), "s3cret\n").unwrap();
        let (cfg, _) = b.resolve(&p).await.unwrap();
        let CredentialSource::Static(k) = &cfg.credentials else {
            panic!("{:?}", cfg.credentials)
        };
        assert_eq!(
            (k.access_key_id.as_str(), k.secret_access_key.as_str()),
            ("AKID", "s3cret")
        );
        // A rotated secret is a different backend.
        let k1 = cache_key(&cfg, None);
        std::fs::write(dir.path().join("admin/AWS_SECRET_ACCESS_KEY"), "new").unwrap();
        let (cfg2, _) = b.resolve(&p).await.unwrap();
        assert_ne!(k1, cache_key(&cfg2, None));
    }
}
