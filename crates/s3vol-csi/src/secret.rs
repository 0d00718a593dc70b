//! What a CSI Secret says: the credentials for a volume's store and, when it is a Secret COSI
//! wrote for a BucketAccess, where the bucket is.
//!
//! The parsing lives in [`s3vol_s3::secret`], shared with the COSI driver (which reads the same
//! BucketAccess Secrets back); this module names it in the driver's terms. A Secret that
//! cannot be used is `INVALID_ARGUMENT` (`From<SecretError> for CsiError`): keys of two
//! shapes, half a key pair, empty key values or a lone session token (never read as "use the
//! driver's own identity"), a NUL byte anywhere, a `BucketInfo` that is not an S3
//! BucketAccess.

pub use s3vol_s3::secret::{
    ParsedSecret as VolumeSecret, SecretError, SecretHints, SecretShape, keys,
};
