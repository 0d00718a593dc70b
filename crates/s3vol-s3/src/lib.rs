//! S3 access for s3vol.
//!
//! Everything above this crate talks to object storage through one narrow async trait,
//! [`ObjectStore`], holding exactly the operations the filesystem, the CSI driver and the COSI
//! driver need. Three implementations live here:
//!
//! - [`AwsStore`]: the real thing, on the official AWS SDK, configured from an [`S3Config`]
//!   (endpoint, region, addressing style, credentials, timeouts, retries, checksum policy);
//! - [`MemStore`]: an in-memory store with S3's semantics, for unit tests of the layers above;
//! - [`FaultStore`]: a wrapper that injects failures and latency into any store.
//!
//! One conformance suite (`tests/conformance.rs`) runs against the in-memory store and a real S3
//! server, so the fake cannot drift from S3's behaviour.
//!
//! [`secret`] reads credentials Secrets (s3vol's own shape and COSI's BucketAccess Secrets)
//! for both drivers; [`input`] holds the checks both drivers apply to user-supplied strings (regions,
//! endpoints, NUL bytes, quoting in messages).
//!
//! Errors are typed ([`S3Error`]) so callers map them to errno or gRPC codes without parsing
//! text.

mod aws;
mod config;
mod error;
mod fault;
pub mod input;
mod mem;
mod rotating;
pub mod secret;
mod store;
pub mod testing;
mod types;
mod web_identity;

pub use aws::AwsStore;
pub use config::{
    Addressing, ChecksumPolicy, CredentialSource, PayloadSigning, RequestKind, S3Config,
    StaticCredentials,
};
pub use error::{S3Error, S3Result};
pub use fault::{Action, Fault, FaultStore};
pub use mem::MemStore;
pub use rotating::RotatingCredentials;
pub use store::{ByteStream, GetObject, ObjectStore, Op};
pub use types::{
    BucketName, CompletedPart, CopySource, ETag, InvalidBucketName, InvalidPrefix, ListEntry,
    ListPage, ListRequest, MetadataDirective, ObjectInfo, PutOptions, PutResult, UploadId,
    UploadedPart, UserMetadata, normalize_prefix, parse_size,
};
pub use web_identity::{IdentityDocument, WebIdentity, WebIdentityCredentials};
