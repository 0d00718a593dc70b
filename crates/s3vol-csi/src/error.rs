//! The driver's error type and its one mapping to gRPC status codes.
//!
//! Every failure a CSI call can report is a [`CsiError`]; [`tonic::Status`] is made from it in
//! exactly one place (the `From` impl below), so the codes the spec names for each failure
//! (InvalidArgument for a missing field, NotFound for an unknown volume, AlreadyExists for an
//! incompatible repeat, FailedPrecondition for a call out of order, …) are chosen where the
//! failure is detected and never re-guessed from text. Messages never contain secrets, and
//! what reaches the CO is bounded ([`s3vol_s3::input::bounded`]): control characters escaped,
//! at most 1 KiB, so neither a huge input nor a store's response body is echoed whole.

use s3vol_s3::S3Error;

/// Why a CSI call failed.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// A required field is missing or a value is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume (or path) the call names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The volume exists but is incompatible with the request.
    #[error("{0}")]
    AlreadyExists(String),
    /// The call cannot be served in the current state (e.g. publish before stage).
    #[error("{0}")]
    FailedPrecondition(String),
    /// An unsupported capacity range.
    #[error("{0}")]
    OutOfRange(String),
    /// The operation is not supported (e.g. block access, cloning).
    #[error("{0}")]
    Unimplemented(String),
    /// A dependency (the mounter, the S3 endpoint) is not available right now; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
    /// A store request failed; the code follows the S3 error.
    #[error("{context}: {source}")]
    S3 {
        context: String,
        #[source]
        source: S3Error,
    },
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl CsiError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        CsiError::InvalidArgument(msg.into())
    }

    /// Wraps a store error with what was being done.
    pub fn s3(context: impl Into<String>) -> impl FnOnce(S3Error) -> CsiError {
        let context = context.into();
        move |source| CsiError::S3 { context, source }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CsiError {
        let context = context.into();
        move |source| CsiError::Io { context, source }
    }

    /// The gRPC code of this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::Unimplemented(_) => Code::Unimplemented,
            CsiError::Unavailable(_) => Code::Unavailable,
            CsiError::Internal(_) | CsiError::Io { .. } => Code::Internal,
            CsiError::S3 { source, .. } => match source {
                S3Error::NotFound(_) | S3Error::NoSuchBucket(_) => Code::NotFound,
                S3Error::AccessDenied(_) => Code::PermissionDenied,
                S3Error::InvalidCredentials { .. } | S3Error::NoCredentials(_) => {
                    Code::Unauthenticated
                }
                S3Error::BucketAlreadyExists(_) => Code::AlreadyExists,
                S3Error::BucketNotEmpty(_) | S3Error::PreconditionFailed(_) => {
                    Code::FailedPrecondition
                }
                S3Error::Throttled(_) => Code::ResourceExhausted,
                S3Error::Transient(_) | S3Error::Unreachable(_) => Code::Unavailable,
                S3Error::Timeout(_) => Code::DeadlineExceeded,
                S3Error::InvalidRequest { .. } => Code::InvalidArgument,
                S3Error::Other { .. } => Code::Internal,
            },
        }
    }
}

impl From<s3vol_s3::secret::SecretError> for CsiError {
    fn from(e: s3vol_s3::secret::SecretError) -> Self {
        CsiError::InvalidArgument(e.0)
    }
}

impl From<CsiError> for tonic::Status {
    fn from(e: CsiError) -> Self {
        tonic::Status::new(e.code(), s3vol_s3::input::bounded(&e.to_string()))
    }
}

/// Shorthand for results of driver operations.
pub type CsiResult<T> = Result<T, CsiError>;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn codes() {
        let status: tonic::Status = CsiError::invalid("volume_id is required").into();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "volume_id is required");
        let e = CsiError::s3("creating bucket")(S3Error::BucketAlreadyExists("b".into()));
        assert_eq!(e.code(), Code::AlreadyExists);
        let e = CsiError::s3("x")(S3Error::AccessDenied("no".into()));
        assert_eq!(e.code(), Code::PermissionDenied);
        let e = CsiError::s3("x")(S3Error::Unreachable("down".into()));
        assert_eq!(e.code(), Code::Unavailable);
        // A store that answers a huge body: the status carries a bounded, escaped message.
        let e = CsiError::s3("reading b/k")(S3Error::Other {
            code: "Weird".into(),
            status: 400,
            message: "<html>\n".repeat(50_000),
        });
        let status: tonic::Status = e.into();
        assert!(status.message().len() < 1100, "{}", status.message().len());
        assert!(!status.message().contains('\n'));
    }
}
