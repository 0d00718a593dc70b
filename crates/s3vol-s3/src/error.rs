//! The typed error of every store operation.
//!
//! The variants are what callers act on: the filesystem maps them to errno, the CSI and COSI
//! drivers to gRPC codes. Each SDK failure is mapped here, once, from the S3 error code when the
//! server sent one and from the HTTP status otherwise (HEAD responses carry no body).
//!
//! The messages are what a user reads first, so each names the cause in one line, and the
//! credential errors the fix too (`signature mismatch: … check AWS_SECRET_ACCESS_KEY …`);
//! [`S3Error::hint`] has a fix for the others. The SDK's own error chain, with its debug
//! dump, goes to the debug log only.

/// Shorthand for results of store operations.
pub type S3Result<T> = Result<T, S3Error>;

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum S3Error {
    /// The key (or upload) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The bucket does not exist.
    #[error("no such bucket: {0}")]
    NoSuchBucket(String),
    /// A condition (If-Match, If-None-Match) did not hold: the object changed or exists.
    #[error("precondition failed on {0}")]
    PreconditionFailed(String),
    /// The credentials are valid but not allowed to do this.
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// The credentials themselves were refused (unknown key, bad secret, expired token, a
    /// clock too far off). `message` is what was refused and what the server said.
    #[error("{}", credentials_error(code, message))]
    InvalidCredentials { code: String, message: String },
    /// No credentials could be found in the configured source.
    #[error("no credentials: {0}")]
    NoCredentials(String),
    /// DeleteBucket on a bucket that still holds objects.
    #[error("bucket {0:?} is not empty")]
    BucketNotEmpty(String),
    /// CreateBucket of a name someone else owns.
    #[error("bucket {0:?} already exists and is owned by someone else")]
    BucketAlreadyExists(String),
    /// The server asked us to slow down (after the client's own retries).
    #[error("throttled by the server: {0}")]
    Throttled(String),
    /// A server-side or network failure that may succeed when tried again later.
    #[error("transient failure: {0}")]
    Transient(String),
    /// The endpoint could not be reached at all (DNS, connection refused, TLS).
    #[error("cannot reach the S3 endpoint: {0}")]
    Unreachable(String),
    /// The request timed out: the message says after how long, and where.
    #[error("{0}")]
    Timeout(String),
    /// The server refused the request as malformed (bad range, bad name, too large, …).
    #[error("invalid request ({code}): {message}")]
    InvalidRequest { code: String, message: String },
    /// Anything else, with what the server said.
    #[error("S3 error {code} (HTTP {status}): {message}")]
    Other {
        code: String,
        status: u16,
        message: String,
    },
}

/// One line naming why the credentials were refused and what to change.
fn credentials_error(code: &str, message: &str) -> String {
    match code {
        "SignatureDoesNotMatch" => format!(
            "signature mismatch: the secret access key does not belong to the access key ID \
             ({code} on {}); check AWS_SECRET_ACCESS_KEY, or aws_secret_access_key in the \
             credentials file of the profile",
            what_of(message)
        ),
        "InvalidAccessKeyId" | "InvalidClientTokenId" => format!(
            "unknown access key: the server has no access key with this ID ({code} on {}); \
             check AWS_ACCESS_KEY_ID (or the profile), and that --endpoint-url is the store \
             that issued it",
            what_of(message)
        ),
        "ExpiredToken" | "InvalidToken" => format!(
            "the session token is expired or invalid ({code} on {}); get new temporary \
             credentials (AWS_SESSION_TOKEN) or refresh the profile",
            what_of(message)
        ),
        "RequestTimeTooSkewed" => format!(
            "this machine's clock is too far from the server's ({code} on {}); set the clock \
             (e.g. with chrony or systemd-timesyncd)",
            what_of(message)
        ),
        "AuthorizationHeaderMalformed" => format!(
            "requests are signed for the wrong region ({code}: {message}); set --region to \
             the bucket's region"
        ),
        _ => format!("credentials rejected ({code}): {message}"),
    }
}

/// The object of a refused request, from a message `what: server message`.
fn what_of(message: &str) -> &str {
    message.split_once(": ").map_or(message, |(what, _)| what)
}

impl S3Error {
    /// What a user can do about this error, when its message does not already say so.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            S3Error::InvalidCredentials { .. } | S3Error::Timeout(_) => None,
            S3Error::NoCredentials(_) => Some(
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or --profile (or \
                 --no-sign-request for a public bucket)",
            ),
            S3Error::Unreachable(_) => {
                Some("check --endpoint-url and that the endpoint is reachable from here")
            }
            S3Error::AccessDenied(_) => Some(
                "the server accepted the credentials but refuses this request: the key's \
                 permissions or the bucket policy do not allow it",
            ),
            S3Error::NoSuchBucket(_) => Some(
                "check the bucket name, --region and --force-path-style; s3vol mounts existing \
                 buckets, it does not create them",
            ),
            S3Error::NotFound(_) => Some("check the bucket name and the prefix"),
            _ => None,
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            S3Error::Throttled(_)
                | S3Error::Transient(_)
                | S3Error::Unreachable(_)
                | S3Error::Timeout(_)
        )
    }

    /// A short stable name of the variant, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            S3Error::NotFound(_) => "not_found",
            S3Error::NoSuchBucket(_) => "no_such_bucket",
            S3Error::PreconditionFailed(_) => "precondition_failed",
            S3Error::AccessDenied(_) => "access_denied",
            S3Error::InvalidCredentials { .. } => "invalid_credentials",
            S3Error::NoCredentials(_) => "no_credentials",
            S3Error::BucketNotEmpty(_) => "bucket_not_empty",
            S3Error::BucketAlreadyExists(_) => "bucket_already_exists",
            S3Error::Throttled(_) => "throttled",
            S3Error::Transient(_) => "transient",
            S3Error::Unreachable(_) => "unreachable",
            S3Error::Timeout(_) => "timeout",
            S3Error::InvalidRequest { .. } => "invalid_request",
            S3Error::Other { .. } => "other",
        }
    }

    /// Maps an S3 (or IAM) error code and HTTP status, either of which may be missing, to a
    /// variant. The two services' codes do not overlap, so one table serves both.
    pub fn from_code(code: Option<&str>, status: Option<u16>, message: String, what: &str) -> Self {
        let msg = if message.is_empty() {
            what.to_owned()
        } else {
            format!("{what}: {message}")
        };
        match (code, status) {
            (Some("NoSuchKey" | "NotFound" | "NoSuchUpload" | "NoSuchEntity"), _) => {
                S3Error::NotFound(what.to_owned())
            }
            (Some("NoSuchBucket"), _) => S3Error::NoSuchBucket(what.to_owned()),
            (Some("PreconditionFailed" | "ConditionalRequestConflict"), _) | (None, Some(412)) => {
                S3Error::PreconditionFailed(what.to_owned())
            }
            (
                Some(
                    c @ ("InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "ExpiredToken"
                    | "InvalidToken"
                    | "InvalidClientTokenId"
                    | "AuthFailure"
                    | "AuthorizationHeaderMalformed"
                    | "RequestTimeTooSkewed"),
                ),
                _,
            ) => S3Error::InvalidCredentials {
                code: c.to_owned(),
                message: msg,
            },
            (
                Some(
                    "AccessDenied"
                    | "AccessDeniedException"
                    | "UnauthorizedOperation"
                    | "AllAccessDisabled"
                    | "AccountProblem",
                ),
                _,
            )
            | (None, Some(403)) => S3Error::AccessDenied(msg),
            (Some("BucketNotEmpty"), _) => S3Error::BucketNotEmpty(what.to_owned()),
            (Some("BucketAlreadyExists"), _) => S3Error::BucketAlreadyExists(what.to_owned()),
            (
                Some(
                    "SlowDown"
                    | "Throttling"
                    | "ThrottlingException"
                    | "RequestLimitExceeded"
                    | "TooManyRequests",
                ),
                _,
            )
            | (_, Some(429 | 503)) => S3Error::Throttled(msg),
            (
                Some("InternalError" | "ServiceFailure" | "ServiceUnavailable" | "RequestTimeout"),
                _,
            ) => S3Error::Transient(msg),
            (_, Some(s)) if s >= 500 && s != 501 => S3Error::Transient(msg),
            (None, Some(404)) => S3Error::NotFound(what.to_owned()),
            (Some(c), Some(400 | 411 | 413 | 416))
            | (
                Some(
                    c @ ("InvalidRange"
                    | "InvalidArgument"
                    | "InvalidBucketName"
                    | "EntityTooLarge"
                    | "EntityTooSmall"
                    | "InvalidPart"
                    | "InvalidPartOrder"
                    | "MalformedXML"
                    | "InvalidInput"
                    | "ValidationError"
                    | "MalformedPolicyDocument"
                    | "InvalidLocationConstraint"
                    | "IllegalLocationConstraintException"),
                ),
                _,
            ) => S3Error::InvalidRequest {
                code: c.to_owned(),
                message: msg,
            },
            (c, s) => S3Error::Other {
                code: c.unwrap_or("Unknown").to_owned(),
                status: s.unwrap_or(0),
                message: msg,
            },
        }
    }
}
