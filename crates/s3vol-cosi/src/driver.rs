//! The driver's operations, independent of the protocol version that asks for them.
//!
//! Both gRPC services ([`crate::v1alpha1`], [`crate::v1alpha2`]) translate their messages into
//! these calls and the results back; the behaviour (names, idempotency, error codes) lives here
//! once.
//!
//! Identities: a bucket id is the S3 bucket name; an account id is the IAM user name for `iam`
//! grants and `static.<account name>` for `static` ones, so a revoke knows what to undo from
//! the id alone (the v1alpha1 sidecar sends no parameters with it).
//!
//! Repeated grants: IAM reveals a secret key only when the key is created. The driver remembers
//! the keys it minted (in memory) and answers a repeated grant with the same key while IAM
//! still lists it. After a driver restart it cannot know the secret any more, so a repeated
//! grant replaces the user's keys with a new one, and the Secret COSI writes changes: workloads
//! that read the old keys need a restart. (The v1alpha2 sidecar re-grants every access when it
//! starts; keeping the driver running across sidecar restarts avoids the rotation.)

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use s3vol_s3::BucketName;

use crate::backend::{Backend, Backends, DriverConfig, check_driver_name};
use crate::buckets;
use crate::error::{CosiError, CosiResult};
use crate::iam::{self, MintedKey};
use crate::naming::{self, AccountId};
use crate::params::{Addressing, GrantKind, Params};
use crate::policy::{self, AccessMode};

/// What a workload needs to reach a bucket (besides credentials).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketInfo {
    pub bucket_id: String,
    pub endpoint: String,
    pub region: String,
    pub addressing: Addressing,
}

/// A granted access: the account to revoke later, its keys, and the buckets it reaches.
#[derive(Clone, PartialEq, Eq)]
pub struct Grant {
    pub account_id: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub buckets: Vec<BucketInfo>,
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grant")
            .field("account_id", &self.account_id)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("buckets", &self.buckets)
            .finish()
    }
}

/// One bucket of a grant request; `mode: None` takes the access class's `accessMode`, else
/// read-write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessedBucket {
    pub bucket_id: String,
    pub mode: Option<AccessMode>,
}

/// The COSI driver.
#[derive(Debug)]
pub struct Driver {
    backends: Backends,
    /// Secrets of keys this process minted, by backend and IAM user.
    minted: Mutex<HashMap<String, MintedKey>>,
}

fn bucket_id(id: &str) -> CosiResult<BucketName> {
    if id.is_empty() {
        return Err(CosiError::InvalidArgument("bucket id is required".into()));
    }
    BucketName::new(id).map_err(|e| CosiError::InvalidArgument(e.to_string()))
}

fn info(b: &Backend, bucket: &BucketName) -> BucketInfo {
    BucketInfo {
        bucket_id: bucket.to_string(),
        endpoint: b.endpoint.clone(),
        region: b.region.clone(),
        addressing: b.addressing,
    }
}

impl Driver {
    pub fn new(config: DriverConfig) -> Result<Arc<Self>, String> {
        check_driver_name(&config.name)?;
        Ok(Arc::new(Self {
            backends: Backends::new(config),
            minted: Mutex::new(HashMap::new()),
        }))
    }

    /// The driver name (`DriverGetInfo`).
    pub fn name(&self) -> &str {
        &self.backends.config().name
    }

    /// Creates the bucket for the COSI bucket `name`, or accepts the compatible one that a
    /// previous call made.
    pub async fn create_bucket(
        &self,
        name: &str,
        parameters: &HashMap<String, String>,
    ) -> CosiResult<BucketInfo> {
        let params = Params::parse(parameters)?;
        let bucket = naming::bucket_name(name, &params.bucket.name_prefix)?;
        let b = self.backends.get(&params.store).await?;
        buckets::ensure(&b, &bucket, &params.bucket).await?;
        Ok(info(&b, &bucket))
    }

    /// Looks up a bucket that exists outside COSI (static provisioning).
    pub async fn get_existing_bucket(
        &self,
        id: &str,
        parameters: &HashMap<String, String>,
    ) -> CosiResult<BucketInfo> {
        let params = Params::parse(parameters)?;
        let bucket = bucket_id(id)?;
        let b = self.backends.get(&params.store).await?;
        if !buckets::exists(&b, &bucket).await? {
            return Err(CosiError::NotFound(format!(
                "bucket {bucket} does not exist"
            )));
        }
        Ok(info(&b, &bucket))
    }

    /// Deletes the bucket (emptying it first when the class says so); a missing bucket is
    /// success.
    pub async fn delete_bucket(
        &self,
        id: &str,
        parameters: &HashMap<String, String>,
    ) -> CosiResult<()> {
        let params = Params::parse(parameters)?;
        let bucket = bucket_id(id)?;
        let b = self.backends.get(&params.store).await?;
        buckets::delete(&b, &bucket, params.bucket.delete_objects).await
    }

    /// Grants `account_name` access to the buckets, as the access class says (`grant: iam` or
    /// `static`).
    pub async fn grant(
        &self,
        account_name: &str,
        accessed: &[AccessedBucket],
        parameters: &HashMap<String, String>,
    ) -> CosiResult<Grant> {
        let params = Params::parse(parameters)?;
        if account_name.is_empty() {
            return Err(CosiError::InvalidArgument(
                "account name is required".into(),
            ));
        }
        if accessed.is_empty() {
            return Err(CosiError::InvalidArgument(
                "access to at least one bucket must be requested".into(),
            ));
        }
        let b = self.backends.get(&params.store).await?;
        let mut grants = Vec::with_capacity(accessed.len());
        for a in accessed {
            let bucket = bucket_id(&a.bucket_id)?;
            if !buckets::exists(&b, &bucket).await? {
                return Err(CosiError::NotFound(format!(
                    "bucket {bucket} does not exist"
                )));
            }
            let mode = a.mode.or(params.access.mode).unwrap_or_default();
            grants.push((bucket, mode));
        }
        let infos = grants.iter().map(|(bucket, _)| info(&b, bucket)).collect();
        match params.access.grant {
            GrantKind::Static => {
                let creds = b.static_credentials().await?;
                let account_id = naming::static_account_id(account_name)?;
                tracing::warn!(
                    account = account_name,
                    buckets = ?grants.iter().map(|(b, _)| b.as_str()).collect::<Vec<_>>(),
                    "static grant: handing out the store credentials unchanged; this grants NO \
                     isolation: the workload can do whatever these credentials can, in every \
                     bucket, regardless of the requested access mode"
                );
                Ok(Grant {
                    account_id,
                    access_key_id: creds.access_key_id,
                    secret_access_key: creds.secret_access_key,
                    buckets: infos,
                })
            }
            GrantKind::Iam => {
                let user = naming::iam_user_name(account_name)?;
                let key = self.grant_iam(&b, &user, &grants).await?;
                tracing::info!(
                    account = account_name,
                    user = user.as_str(),
                    access_key_id = key.access_key_id.as_str(),
                    grants = ?grants,
                    "granted bucket access"
                );
                Ok(Grant {
                    account_id: user,
                    access_key_id: key.access_key_id,
                    secret_access_key: key.secret_access_key,
                    buckets: infos,
                })
            }
        }
    }

    async fn grant_iam(
        &self,
        b: &Backend,
        user: &str,
        grants: &[(BucketName, AccessMode)],
    ) -> CosiResult<MintedKey> {
        let doc = policy::document(grants);
        iam::ensure_user(&b.iam, user).await?;
        match iam::current_policy(&b.iam, user).await? {
            Some(existing) if existing != doc => {
                return Err(CosiError::AlreadyExists(format!(
                    "IAM user {user} exists with a different grant (buckets or access mode)"
                )));
            }
            Some(_) => {}
            None => iam::put_policy(&b.iam, user, &doc).await?,
        }
        let cache_key = format!("{}/{user}", b.key);
        let keys = iam::access_keys(&b.iam, user).await?;
        if let Some(known) = self.minted_lock().get(&cache_key)
            && keys.contains(&known.access_key_id)
        {
            return Ok(known.clone());
        }
        if !keys.is_empty() {
            tracing::info!(
                user,
                "replacing the access key(s) of IAM user: their secret is not known to this \
                 driver process (minted before a restart or by an interrupted call)"
            );
        }
        for k in &keys {
            iam::delete_key(&b.iam, user, k).await?;
        }
        let key = iam::create_key(&b.iam, user).await?;
        self.minted_lock().insert(cache_key, key.clone());
        Ok(key)
    }

    /// Revokes an access: deletes the IAM user with its key and policy (`iam`), or nothing
    /// (`static`). An access already revoked is success.
    pub async fn revoke(
        &self,
        account_id: &str,
        parameters: &HashMap<String, String>,
    ) -> CosiResult<()> {
        let params = Params::parse(parameters)?;
        if account_id.is_empty() {
            return Err(CosiError::InvalidArgument("account id is required".into()));
        }
        match AccountId::parse(account_id)? {
            AccountId::Static => {
                tracing::info!(
                    account = account_id,
                    "revoked static grant (nothing to undo)"
                );
                Ok(())
            }
            AccountId::IamUser(user) => {
                let b = self.backends.get(&params.store).await?;
                let existed = iam::delete_user(&b.iam, &user).await?;
                self.minted_lock().remove(&format!("{}/{user}", b.key));
                tracing::info!(user, existed, "revoked bucket access");
                Ok(())
            }
        }
    }

    fn minted_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, MintedKey>> {
        self.minted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
