//! The driver's error type, and the one place where errors become gRPC status codes.
//!
//! Store failures (S3 and IAM alike) are carried as [`S3Error`], whose variants already say what
//! a caller can act on; the driver's own refusals (a bad parameter, a bucket that exists with
//! other settings, …) have their own variants. [`From<CosiError> for tonic::Status`] is the
//! only mapping to gRPC codes, so every RPC of both protocol versions answers the same code for
//! the same condition.
//!
//! S3 and IAM calls made directly with the SDK (bucket versioning, object lock, IAM users) are
//! mapped to [`S3Error`] by [`from_sdk`], from the service's error code when there is one and from
//! the HTTP status otherwise. The error codes of the two services do not overlap, so one table
//! serves both.

use std::fmt::Display;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use s3vol_s3::S3Error;
use tonic::{Code, Status};

/// Why a COSI call failed.
#[derive(Debug, thiserror::Error)]
pub enum CosiError {
    /// A request field or a class parameter is missing or invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named bucket does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The bucket or account exists with settings incompatible with the request.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the system is not in a state to carry it out (a bucket that
    /// still holds objects, temporary credentials where long-lived ones are needed, …).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The object store or its IAM service refused or failed.
    #[error("{context}: {source}")]
    Store {
        context: String,
        #[source]
        source: S3Error,
    },
}

impl CosiError {
    /// Wraps a store error with what the driver was doing.
    pub fn store(context: impl Into<String>, source: S3Error) -> Self {
        CosiError::Store {
            context: context.into(),
            source,
        }
    }

    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            CosiError::InvalidArgument(_) => Code::InvalidArgument,
            CosiError::NotFound(_) => Code::NotFound,
            CosiError::AlreadyExists(_) => Code::AlreadyExists,
            CosiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CosiError::Store { source, .. } => match source {
                S3Error::NotFound(_) | S3Error::NoSuchBucket(_) => Code::NotFound,
                S3Error::AccessDenied(_) => Code::PermissionDenied,
                S3Error::InvalidCredentials { .. } => Code::Unauthenticated,
                S3Error::NoCredentials(_) => Code::FailedPrecondition,
                S3Error::BucketNotEmpty(_) | S3Error::PreconditionFailed(_) => {
                    Code::FailedPrecondition
                }
                S3Error::BucketAlreadyExists(_) => Code::AlreadyExists,
                S3Error::Throttled(_)
                | S3Error::Transient(_)
                | S3Error::Unreachable(_)
                | S3Error::Timeout(_) => Code::Unavailable,
                S3Error::InvalidRequest { .. } => Code::InvalidArgument,
                S3Error::Other { .. } => Code::Internal,
            },
        }
    }
}

impl From<CosiError> for Status {
    fn from(e: CosiError) -> Self {
        // Escaped and at most 1 KiB: a store's answer or an input is never echoed whole.
        Status::new(e.code(), s3vol_s3::input::bounded(&e.to_string()))
    }
}

/// Shorthand for results of driver operations.
pub type CosiResult<T> = Result<T, CosiError>;

/// Maps a failed S3 or IAM SDK call to an [`S3Error`]; `what` names the object of the call.
pub(crate) fn from_sdk<E>(err: SdkError<E, HttpResponse>, what: impl Display) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    S3Error::from_sdk(err, what)
}

#[cfg(test)]
fn from_code(code: Option<&str>, status: u16, message: String, what: String) -> S3Error {
    S3Error::from_code(code, Some(status), message, &what)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn code_of(code: Option<&str>, status: u16) -> Code {
        CosiError::store("op", from_code(code, status, "m".into(), "w".into())).code()
    }

    #[test]
    fn store_errors_map_to_the_codes_cosi_requires() {
        let table = [
            (Some("NoSuchBucket"), 404, Code::NotFound),
            (None, 404, Code::NotFound),
            (Some("NoSuchEntity"), 404, Code::NotFound),
            (Some("AccessDenied"), 403, Code::PermissionDenied),
            (None, 403, Code::PermissionDenied),
            (Some("InvalidAccessKeyId"), 403, Code::Unauthenticated),
            (Some("InvalidClientTokenId"), 403, Code::Unauthenticated),
            (Some("BucketNotEmpty"), 409, Code::FailedPrecondition),
            (Some("BucketAlreadyExists"), 409, Code::AlreadyExists),
            (Some("SlowDown"), 503, Code::Unavailable),
            (Some("ServiceFailure"), 500, Code::Unavailable),
            (None, 502, Code::Unavailable),
            (Some("MalformedPolicyDocument"), 400, Code::InvalidArgument),
            (Some("InvalidBucketName"), 400, Code::InvalidArgument),
            (Some("NotImplemented"), 501, Code::Internal),
            (Some("LimitExceeded"), 409, Code::Internal),
        ];
        for (code, status, want) in table {
            assert_eq!(code_of(code, status), want, "{code:?} {status}");
        }
    }

    #[test]
    fn driver_errors_map_to_their_codes() {
        let s: Status = CosiError::AlreadyExists("x".into()).into();
        assert_eq!(s.code(), Code::AlreadyExists);
        assert_eq!(s.message(), "x");
        let s: Status = CosiError::InvalidArgument("bad".into()).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        let s: Status = CosiError::store("deleting", S3Error::NoSuchBucket("b".into())).into();
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().starts_with("deleting: "), "{}", s.message());
    }
}
