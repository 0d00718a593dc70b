//! Credentials that change while a client uses them: access keys rotated in a Secret and handed
//! to a running serving process.
//!
//! [`RotatingCredentials`] is a credentials provider over one shared slot. Whoever receives new
//! keys calls [`RotatingCredentials::replace`]; the client asks the provider for every request
//! it signs, so requests signed before the swap (in flight, or between retries of an attempt
//! already signed) finish with the old keys and every request signed after it uses the new
//! ones. No request is ever signed with half of each: the slot holds one whole
//! [`aws_credential_types::Credentials`] value, swapped under a lock.
//!
//! The SDK normally caches the identity a provider returns (until its expiry, or 15 minutes
//! when it has none), which would keep old keys in use long after a rotation; a client built
//! with this provider therefore has no identity cache ([`crate::S3Config`] sets
//! `IdentityCache::no_cache()`). Asking costs a read lock and a clone of a few short strings.
//!
//! The SDK's `Credentials` keeps its strings in zeroing storage; the provider never logs them
//! (its `Debug` shows only how many times it was replaced).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, future};

use crate::StaticCredentials;

/// A credentials provider whose keys can be replaced at any time. Clones share the slot.
#[derive(Clone)]
pub struct RotatingCredentials {
    inner: Arc<Inner>,
}

struct Inner {
    current: RwLock<Credentials>,
    replaced: AtomicU64,
}

fn to_sdk(keys: &StaticCredentials) -> Credentials {
    Credentials::new(
        keys.access_key_id.clone(),
        keys.secret_access_key.clone(),
        keys.session_token.clone(),
        None,
        "s3vol-rotating",
    )
}

impl RotatingCredentials {
    pub fn new(keys: &StaticCredentials) -> Self {
        Self {
            inner: Arc::new(Inner {
                current: RwLock::new(to_sdk(keys)),
                replaced: AtomicU64::new(0),
            }),
        }
    }

    /// Makes `keys` the credentials of every request signed from now on. Returns `false` (and
    /// changes nothing) when they are the keys already in use.
    pub fn replace(&self, keys: &StaticCredentials) -> bool {
        let new = to_sdk(keys);
        let mut current = self
            .inner
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if *current == new {
            return false;
        }
        *current = new;
        self.inner.replaced.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// How many times the keys were replaced by different ones.
    pub fn replaced(&self) -> u64 {
        self.inner.replaced.load(Ordering::Relaxed)
    }

    fn current(&self) -> Credentials {
        self.inner
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl fmt::Debug for RotatingCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatingCredentials")
            .field("replaced", &self.replaced())
            .finish_non_exhaustive()
    }
}

impl PartialEq for RotatingCredentials {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for RotatingCredentials {}

impl ProvideCredentials for RotatingCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::ready(Ok(self.current()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn keys(id: &str, secret: &str) -> StaticCredentials {
        StaticCredentials {
            access_key_id: id.into(),
            secret_access_key: secret.into(),
            session_token: None,
        }
    }

    #[tokio::test]
    async fn new_keys_are_provided_after_a_replace_and_clones_share_them() {
        let r = RotatingCredentials::new(&keys("A1", "s1"));
        let clone = r.clone();
        assert_eq!(
            clone.provide_credentials().await.unwrap().access_key_id(),
            "A1"
        );
        assert!(r.replace(&keys("A2", "s2")));
        let got = clone.provide_credentials().await.unwrap();
        assert_eq!((got.access_key_id(), got.secret_access_key()), ("A2", "s2"));
        // The same keys again are no replacement.
        assert!(!r.replace(&keys("A2", "s2")));
        // A changed secret alone is.
        assert!(r.replace(&keys("A2", "s3")));
        assert_eq!(r.replaced(), 2);
    }

    #[test]
    fn debug_shows_no_key() {
        let r = RotatingCredentials::new(&keys("AKIDVISIBLE", "VERYSECRET"));
        let s = format!("{r:?}");
        assert!(
            !s.contains("VERYSECRET") && !s.contains("AKIDVISIBLE"),
            "{s}"
        );
    }
}
