//! Temporary credentials for a workload's own identity: a web identity token (a Kubernetes
//! service-account token) exchanged for a role's credentials with STS
//! `AssumeRoleWithWebIdentity` — AWS IRSA-style, and the same call of MinIO's and Ceph RGW's
//! STS.
//!
//! [`WebIdentityCredentials`] is a credentials provider that holds the current token and the
//! credentials it last obtained. A request asks it for credentials; it answers from what it
//! holds while they are valid for more than the renewal margin (a quarter of their lifetime, at
//! most 5 minutes), and otherwise calls STS first — one call at a time, the other requests wait
//! for its answer. [`WebIdentityCredentials::replace`] hands it a new token (the kubelet
//! refreshes them and the CSI node plugin passes each one on): the credentials obtained with
//! the old one are dropped and the next request gets new ones, so a refreshed token always
//! takes effect.
//!
//! **Refusals are final for the request, never a fall-back.** When STS refuses (expired token,
//! unknown role, role that does not trust the token) and no credentials still valid are held,
//! the request fails with a credentials error (the filesystem answers EACCES) and the provider
//! logs one error line naming the pod and the role — once per token and failure, not per
//! request. It never signs with any other identity.
//!
//! The token is a secret: it is sent only to STS, in the request body; `Debug` redacts it and
//! no log line or error carries it. STS's own error messages do not repeat it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, future};
use aws_sdk_sts::error::ProvideErrorMetadata;
use serde::{Deserialize, Serialize};

/// The longest time before their expiry at which credentials are renewed.
const MAX_MARGIN: Duration = Duration::from_secs(300);

/// How long one STS call may take.
const STS_TIMEOUT: Duration = Duration::from_secs(10);

/// Who a mount acts as, and the token that proves it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebIdentity {
    /// The role to assume (`arn:aws:iam::123456789012:role/app`).
    pub role_arn: String,
    /// The web identity token (a JWT). Secret.
    pub token: String,
    /// The STS endpoint; `None`: AWS's regional one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sts_endpoint: Option<String>,
    /// The role session name (shows in the store's audit logs).
    pub session_name: String,
    /// The lifetime asked for the credentials; `None`: the STS default (an hour on AWS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<u32>,
    /// Whose token it is (`namespace/pod`), for log lines.
    #[serde(default)]
    pub subject: String,
}

impl fmt::Debug for WebIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebIdentity")
            .field("role_arn", &self.role_arn)
            .field("token", &"<redacted>")
            .field("sts_endpoint", &self.sts_endpoint)
            .field("session_name", &self.session_name)
            .field("duration_seconds", &self.duration_seconds)
            .field("subject", &self.subject)
            .finish()
    }
}

impl WebIdentity {
    /// Zeroes the token's bytes.
    pub fn wipe(&mut self) {
        use zeroize::Zeroize;
        self.token.zeroize();
    }
}

struct Held {
    credentials: Credentials,
    /// When to ask STS again.
    renew_at: SystemTime,
    expires: SystemTime,
}

struct State {
    identity: WebIdentity,
    held: Option<Held>,
    /// The failure last logged for the current token (so each is logged once).
    logged_failure: Option<String>,
    sts: Option<(Option<String>, aws_sdk_sts::Client)>,
}

/// A credentials provider that assumes a role with a web identity token (see the module docs).
/// Clones share their state.
#[derive(Clone)]
pub struct WebIdentityCredentials {
    state: Arc<tokio::sync::Mutex<State>>,
    /// The region STS is asked in (and signs nothing: the call is unsigned).
    region: String,
}

impl fmt::Debug for WebIdentityCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebIdentityCredentials")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl PartialEq for WebIdentityCredentials {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }
}

impl Eq for WebIdentityCredentials {}

/// What made STS refuse or fail, in words for a log line and an error (never the token).
fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(
    e: &aws_sdk_sts::error::SdkError<E>,
) -> String {
    match (e.code(), e.message()) {
        (Some(code), Some(msg)) => format!("{code}: {msg}"),
        (Some(code), None) => code.to_owned(),
        _ => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                source = inner.source();
            }
            s
        }
    }
}

impl WebIdentityCredentials {
    /// A provider for `identity`; STS is first called by the first request.
    pub fn new(identity: WebIdentity, region: Option<String>) -> Self {
        Self {
            state: Arc::new(tokio::sync::Mutex::new(State {
                identity,
                held: None,
                logged_failure: None,
                sts: None,
            })),
            region: region.unwrap_or_else(|| "us-east-1".into()),
        }
    }

    /// Takes a new token (or role): the credentials of the old one are dropped, the next
    /// request gets new ones. Returns whether anything changed.
    pub async fn replace(&self, identity: WebIdentity) -> bool {
        let mut state = self.state.lock().await;
        if state.identity == identity {
            return false;
        }
        if state.identity.role_arn != identity.role_arn {
            tracing::info!(pod = %identity.subject, old_role = %state.identity.role_arn, role = %identity.role_arn, "the volume's role changed");
        }
        let mut old = std::mem::replace(&mut state.identity, identity);
        old.wipe();
        state.held = None;
        state.logged_failure = None;
        true
    }

    async fn sts_client(&self, endpoint: Option<&String>) -> aws_sdk_sts::Client {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(self.region.clone()))
            .no_credentials()
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(STS_TIMEOUT)
                    .build(),
            );
        if let Some(e) = endpoint {
            loader = loader.endpoint_url(e);
        }
        aws_sdk_sts::Client::new(&loader.load().await)
    }

    async fn credentials(&self) -> Result<Credentials, CredentialsError> {
        let mut state = self.state.lock().await;
        let now = SystemTime::now();
        if let Some(h) = &state.held
            && now < h.renew_at
        {
            return Ok(h.credentials.clone());
        }
        let endpoint = state.identity.sts_endpoint.clone();
        let client = match &state.sts {
            Some((e, c)) if *e == endpoint => c.clone(),
            _ => {
                let c = self.sts_client(endpoint.as_ref()).await;
                state.sts = Some((endpoint, c.clone()));
                c
            }
        };
        let id = &state.identity;
        let mut call = client
            .assume_role_with_web_identity()
            .role_arn(&id.role_arn)
            .role_session_name(&id.session_name)
            .web_identity_token(&id.token);
        if let Some(d) = id.duration_seconds {
            call = call.duration_seconds(i32::try_from(d).unwrap_or(i32::MAX));
        }
        let outcome = call.send().await;
        let (pod, role) = (id.subject.clone(), id.role_arn.clone());
        let got = match outcome {
            Ok(out) => out.credentials.ok_or_else(|| {
                "STS answered AssumeRoleWithWebIdentity without credentials".to_owned()
            }),
            Err(e) => Err(describe(&e)),
        };
        match got {
            Ok(c) => {
                let expires = SystemTime::try_from(*c.expiration())
                    .unwrap_or_else(|_| now + Duration::from_secs(900));
                let lifetime = expires.duration_since(now).unwrap_or_default();
                let margin = (lifetime / 4).min(MAX_MARGIN);
                let credentials = Credentials::new(
                    c.access_key_id(),
                    c.secret_access_key(),
                    Some(c.session_token().to_owned()),
                    Some(expires),
                    "s3vol-web-identity",
                );
                metrics::counter!("s3vol_credential_refreshes_total").increment(1);
                tracing::info!(%pod, %role, valid_s = lifetime.as_secs(), "assumed the role with the pod's token");
                state.logged_failure = None;
                state.held = Some(Held {
                    credentials: credentials.clone(),
                    renew_at: expires - margin,
                    expires,
                });
                Ok(credentials)
            }
            Err(why) => {
                metrics::counter!("s3vol_credential_refresh_failures_total").increment(1);
                // Credentials still valid are used until they expire.
                if let Some(h) = &state.held
                    && now < h.expires
                {
                    tracing::warn!(%pod, %role, error = %why, "renewing the role's credentials failed; the current ones stay in use until they expire");
                    return Ok(h.credentials.clone());
                }
                state.held = None;
                if state.logged_failure.as_deref() != Some(why.as_str()) {
                    tracing::error!(%pod, %role, error = %why, "STS refused the pod's token: requests of this mount fail with EACCES until the kubelet hands over a valid token (no other identity is used)");
                    state.logged_failure = Some(why.clone());
                }
                Err(CredentialsError::not_loaded(format!(
                    "no credentials for pod {pod}: assuming role {role} with its token failed: {why}"
                )))
            }
        }
    }
}

impl ProvideCredentials for WebIdentityCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(self.credentials())
    }
}

/// What a credentials pipe carries, one JSON document each: access keys, or a web identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IdentityDocument {
    Keys(crate::StaticCredentials),
    WebIdentity { web_identity: WebIdentity },
}

impl IdentityDocument {
    /// Zeroes every secret byte it holds.
    pub fn wipe(&mut self) {
        use zeroize::Zeroize;
        match self {
            IdentityDocument::Keys(c) => {
                c.access_key_id.zeroize();
                c.secret_access_key.zeroize();
                c.session_token.zeroize();
            }
            IdentityDocument::WebIdentity { web_identity } => web_identity.wipe(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn identity() -> WebIdentity {
        WebIdentity {
            role_arn: "arn:aws:iam::1:role/r".into(),
            token: "TOKENSECRET".into(),
            sts_endpoint: Some("http://127.0.0.1:1".into()),
            session_name: "s".into(),
            duration_seconds: None,
            subject: "ns/pod".into(),
        }
    }

    #[test]
    fn documents_are_keys_or_a_web_identity_and_debug_redacts() {
        let keys = r#"{"access_key_id":"A","secret_access_key":"S"}"#;
        assert!(matches!(
            serde_json::from_str::<IdentityDocument>(keys).unwrap(),
            IdentityDocument::Keys(_)
        ));
        let doc = IdentityDocument::WebIdentity {
            web_identity: identity(),
        };
        let json = serde_json::to_string(&doc).unwrap();
        assert_eq!(
            serde_json::from_str::<IdentityDocument>(&json).unwrap(),
            doc
        );
        assert!(!format!("{doc:?}").contains("TOKENSECRET"));
    }

    #[tokio::test]
    async fn a_refused_token_is_a_credentials_error_naming_pod_and_role_not_the_token() {
        // Nothing listens on port 1: STS cannot be reached.
        let p = WebIdentityCredentials::new(identity(), None);
        let e = p.provide_credentials().await.unwrap_err();
        let text = format!("{e:?} {e}");
        let shown = aws_smithy_types::error::display::DisplayErrorContext(&e).to_string();
        assert!(
            shown.contains("ns/pod") && shown.contains("role/r"),
            "{shown}"
        );
        assert!(!text.contains("TOKENSECRET") && !shown.contains("TOKENSECRET"));
        // A new token replaces the old one; the same one again changes nothing.
        let mut next = identity();
        next.token = "OTHER".into();
        assert!(p.replace(next.clone()).await);
        assert!(!p.replace(next).await);
    }
}
