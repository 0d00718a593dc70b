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

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
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
        Status::new(e.code(), e.to_string())
    }
}

/// Shorthand for results of driver operations.
pub type CosiResult<T> = Result<T, CosiError>;

/// Maps a failed S3 or IAM SDK call to an [`S3Error`]; `what` names the object of the call.
pub(crate) fn from_sdk<E>(err: SdkError<E, HttpResponse>, what: impl Display) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let what = what.to_string();
    match &err {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let message = service
                .err()
                .message()
                .map(str::to_owned)
                .unwrap_or_else(|| DisplayErrorContext(&err).to_string());
            from_code(
                service.err().code(),
                status,
                format!("{what}: {message}"),
                what,
            )
        }
        SdkError::TimeoutError(_) => S3Error::Timeout(what),
        SdkError::DispatchFailure(failure) => {
            let detail = format!("{what}: {}", DisplayErrorContext(&err));
            if failure.is_timeout() {
                S3Error::Timeout(detail)
            } else if detail.contains("credential") {
                S3Error::NoCredentials(detail)
            } else {
                S3Error::Unreachable(detail)
            }
        }
        SdkError::ResponseError(response) => {
            let status = response.raw().status().as_u16();
            let detail = format!("{what}: {}", DisplayErrorContext(&err));
            from_code(None, status, detail, what)
        }
        _ => {
            let detail = format!("{what}: {}", DisplayErrorContext(&err));
            if detail.contains("credential") {
                S3Error::NoCredentials(detail)
            } else {
                S3Error::Other {
                    code: "ClientError".to_owned(),
                    status: 0,
                    message: detail,
                }
            }
        }
    }
}

/// The error-code table shared by S3 and IAM.
fn from_code(code: Option<&str>, status: u16, message: String, what: String) -> S3Error {
    match (code, status) {
        (Some("NoSuchBucket"), _) => S3Error::NoSuchBucket(what),
        (Some("NoSuchKey" | "NotFound" | "NoSuchEntity" | "NoSuchUpload"), _) | (None, 404) => {
            S3Error::NotFound(what)
        }
        (
            Some(
                c @ ("InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "InvalidClientTokenId"
                | "ExpiredToken"
                | "InvalidToken"
                | "AuthFailure"),
            ),
            _,
        ) => S3Error::InvalidCredentials {
            code: c.to_owned(),
            message,
        },
        (Some("AccessDenied" | "AccessDeniedException" | "UnauthorizedOperation"), _)
        | (None, 403) => S3Error::AccessDenied(message),
        (Some("BucketNotEmpty"), _) => S3Error::BucketNotEmpty(what),
        (Some("BucketAlreadyExists"), _) => S3Error::BucketAlreadyExists(what),
        (Some("PreconditionFailed"), _) | (None, 412) => S3Error::PreconditionFailed(what),
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
        | (_, 429 | 503) => S3Error::Throttled(message),
        (Some("InternalError" | "ServiceFailure" | "ServiceUnavailable" | "RequestTimeout"), _) => {
            S3Error::Transient(message)
        }
        (_, s) if s >= 500 && s != 501 => S3Error::Transient(message),
        (
            Some(
                c @ ("InvalidArgument"
                | "InvalidBucketName"
                | "InvalidInput"
                | "ValidationError"
                | "MalformedPolicyDocument"
                | "MalformedXML"
                | "InvalidLocationConstraint"
                | "IllegalLocationConstraintException"),
            ),
            _,
        ) => S3Error::InvalidRequest {
            code: c.to_owned(),
            message,
        },
        (c, s) => S3Error::Other {
            code: c.unwrap_or("Unknown").to_owned(),
            status: s,
            message,
        },
    }
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
