//! Filesystem errors: an errno for the kernel and a message for the log.
//!
//! Every failure inside the filesystem is an [`FsError`]; the FUSE adapter replies with its
//! errno. Store errors are mapped to errno once, in the `From<S3Error>` impl.

use std::fmt;

use s3vol_s3::S3Error;

/// An error with the errno the kernel will see.
#[derive(Clone, Debug)]
pub struct FsError {
    pub errno: i32,
    pub message: String,
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (errno {})", self.message, self.errno)
    }
}

impl std::error::Error for FsError {}

pub type FsResult<T> = Result<T, FsError>;

/// `err!(libc::ENOENT, "no such key {key}")`
macro_rules! err {
    ($errno:expr, $($arg:tt)*) => {
        $crate::error::FsError { errno: $errno, message: format!($($arg)*) }
    };
}
pub(crate) use err;

impl From<S3Error> for FsError {
    fn from(e: S3Error) -> Self {
        let errno = match &e {
            S3Error::NotFound(_) => libc::ENOENT,
            S3Error::NoSuchBucket(_) => libc::ENOENT,
            // The object changed under an open file: reads fail instead of mixing versions.
            S3Error::PreconditionFailed(_) => libc::EIO,
            S3Error::AccessDenied(_) | S3Error::InvalidCredentials { .. } => libc::EACCES,
            S3Error::NoCredentials(_) => libc::EACCES,
            S3Error::BucketNotEmpty(_) => libc::ENOTEMPTY,
            S3Error::BucketAlreadyExists(_) => libc::EEXIST,
            S3Error::InvalidRequest { code, .. } if code == "EntityTooLarge" => libc::EFBIG,
            S3Error::InvalidRequest { code, .. } if code == "KeyTooLongError" => libc::ENAMETOOLONG,
            _ => libc::EIO,
        };
        FsError {
            errno,
            message: e.to_string(),
        }
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        FsError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            message: format!("local I/O: {e}"),
        }
    }
}
