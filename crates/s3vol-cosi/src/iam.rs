//! IAM users, their inline policy and access keys, through the IAM API that AWS, Ceph RGW and
//! other S3 stores implement.
//!
//! Each grant is one user under the path [`IAM_USER_PATH`] with one inline policy named
//! [`POLICY_NAME`] and one access key. Every call here is idempotent on its own (creating what
//! exists, or deleting what is gone, succeeds), so a grant or revoke interrupted anywhere is
//! finished by the retry.

use std::fmt;

use aws_sdk_iam::Client;
use aws_sdk_iam::error::ProvideErrorMetadata;
use s3vol_s3::S3Error;
use serde_json::Value;

use crate::error::{CosiError, CosiResult, from_sdk};
use crate::naming::IAM_USER_PATH;
use crate::policy;

/// The name of the inline policy this driver puts on its users.
pub const POLICY_NAME: &str = "s3vol-cosi";

/// A freshly created access key.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct MintedKey {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl fmt::Debug for MintedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintedKey")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

fn failed(what: &str, user: &str, e: S3Error) -> CosiError {
    CosiError::store(format!("{what} of IAM user {user}"), e)
}

/// Whether the user exists; refuses a user of that name that this driver did not make (it
/// is not under [`IAM_USER_PATH`]).
async fn lookup(iam: &Client, user: &str) -> CosiResult<bool> {
    match iam.get_user().user_name(user).send().await {
        Ok(out) => {
            let path = out.user().map(|u| u.path()).unwrap_or_default();
            if path == IAM_USER_PATH {
                Ok(true)
            } else {
                Err(CosiError::AlreadyExists(format!(
                    "IAM user {user} exists under path {path:?}, not {IAM_USER_PATH:?}: it was \
                     not made by this driver, which leaves it alone"
                )))
            }
        }
        Err(e) => match from_sdk(e, user) {
            S3Error::NotFound(_) => Ok(false),
            other => Err(failed("lookup", user, other)),
        },
    }
}

/// Creates the user unless it exists.
pub(crate) async fn ensure_user(iam: &Client, user: &str) -> CosiResult<()> {
    if lookup(iam, user).await? {
        return Ok(());
    }
    match iam
        .create_user()
        .user_name(user)
        .path(IAM_USER_PATH)
        .send()
        .await
    {
        Ok(_) => {
            tracing::info!(user, "created IAM user");
            Ok(())
        }
        Err(e) if e.code() == Some("EntityAlreadyExists") => Ok(()),
        Err(e) => Err(failed("creation", user, from_sdk(e, user))),
    }
}

/// The user's policy document, `None` when it has none (or the user does not exist).
pub(crate) async fn current_policy(iam: &Client, user: &str) -> CosiResult<Option<Value>> {
    match iam
        .get_user_policy()
        .user_name(user)
        .policy_name(POLICY_NAME)
        .send()
        .await
    {
        Ok(out) => Ok(Some(
            policy::parse_returned(out.policy_document()).ok_or_else(|| {
                CosiError::FailedPrecondition(format!(
                    "IAM user {user} has a {POLICY_NAME} policy that is not valid JSON"
                ))
            })?,
        )),
        Err(e) => match from_sdk(e, user) {
            S3Error::NotFound(_) => Ok(None),
            other => Err(failed("reading the policy", user, other)),
        },
    }
}

pub(crate) async fn put_policy(iam: &Client, user: &str, doc: &Value) -> CosiResult<()> {
    iam.put_user_policy()
        .user_name(user)
        .policy_name(POLICY_NAME)
        .policy_document(doc.to_string())
        .send()
        .await
        .map_err(|e| failed("setting the policy", user, from_sdk(e, user)))?;
    Ok(())
}

/// The ids of the user's access keys.
pub(crate) async fn access_keys(iam: &Client, user: &str) -> CosiResult<Vec<String>> {
    match iam.list_access_keys().user_name(user).send().await {
        Ok(out) => Ok(out
            .access_key_metadata()
            .iter()
            .filter_map(|k| k.access_key_id().map(str::to_owned))
            .collect()),
        Err(e) => match from_sdk(e, user) {
            S3Error::NotFound(_) => Ok(Vec::new()),
            other => Err(failed("listing the access keys", user, other)),
        },
    }
}

pub(crate) async fn create_key(iam: &Client, user: &str) -> CosiResult<MintedKey> {
    let out = iam
        .create_access_key()
        .user_name(user)
        .send()
        .await
        .map_err(|e| failed("creating an access key", user, from_sdk(e, user)))?;
    let key = out.access_key().ok_or_else(|| {
        failed(
            "creating an access key",
            user,
            S3Error::Other {
                code: "EmptyResponse".into(),
                status: 200,
                message: "CreateAccessKey returned no key".into(),
            },
        )
    })?;
    Ok(MintedKey {
        access_key_id: key.access_key_id().to_owned(),
        secret_access_key: key.secret_access_key().to_owned(),
    })
}

pub(crate) async fn delete_key(iam: &Client, user: &str, key_id: &str) -> CosiResult<()> {
    match iam
        .delete_access_key()
        .user_name(user)
        .access_key_id(key_id)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => match from_sdk(e, user) {
            S3Error::NotFound(_) => Ok(()),
            other => Err(failed("deleting an access key", user, other)),
        },
    }
}

/// Deletes the user with its access keys and policies; a missing user is success. Returns
/// whether the user existed.
pub(crate) async fn delete_user(iam: &Client, user: &str) -> CosiResult<bool> {
    match lookup(iam, user).await {
        Ok(true) => {}
        Ok(false) => return Ok(false),
        Err(CosiError::AlreadyExists(m)) => return Err(CosiError::FailedPrecondition(m)),
        Err(e) => return Err(e),
    }
    for key in access_keys(iam, user).await? {
        delete_key(iam, user, &key).await?;
    }
    let inline = match iam.list_user_policies().user_name(user).send().await {
        Ok(out) => out.policy_names().to_vec(),
        Err(e) => match from_sdk(e, user) {
            S3Error::NotFound(_) => return Ok(false),
            other => return Err(failed("listing the policies", user, other)),
        },
    };
    for name in inline {
        match iam
            .delete_user_policy()
            .user_name(user)
            .policy_name(&name)
            .send()
            .await
        {
            Ok(_) => {}
            Err(e) => match from_sdk(e, user) {
                S3Error::NotFound(_) => {}
                other => return Err(failed("deleting a policy", user, other)),
            },
        }
    }
    // Nothing of ours is attached, but an administrator may have attached something, and
    // DeleteUser refuses while anything is.
    if let Ok(out) = iam
        .list_attached_user_policies()
        .user_name(user)
        .send()
        .await
    {
        for arn in out
            .attached_policies()
            .iter()
            .filter_map(|p| p.policy_arn())
        {
            if let Err(e) = iam
                .detach_user_policy()
                .user_name(user)
                .policy_arn(arn)
                .send()
                .await
            {
                return Err(failed("detaching a policy", user, from_sdk(e, user)));
            }
        }
    }
    match iam.delete_user().user_name(user).send().await {
        Ok(_) => {
            tracing::info!(user, "deleted IAM user");
            Ok(true)
        }
        Err(e) => match from_sdk(e, user) {
            S3Error::NotFound(_) => Ok(false),
            other => Err(failed("deletion", user, other)),
        },
    }
}
