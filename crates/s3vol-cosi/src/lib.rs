//! s3vol's COSI driver: buckets for `BucketClaim`s, scoped credentials for `BucketAccess`es.
//!
//! COSI (Container Object Storage Interface) is Kubernetes' API for provisioning buckets; its
//! controller and per-driver sidecar are upstream components, and the sidecar calls a driver
//! over gRPC on a unix socket. This crate is that driver for any S3 store: AWS S3, MinIO, Ceph
//! RGW, Tencent COS, Alibaba OSS, Huawei OBS.
//!
//! It serves two protocol versions on one socket ([`server`]): the released `cosi.v1alpha1`
//! ([`v1alpha1`]) and the current `sigs.k8s.io.cosi.v1alpha2` ([`v1alpha2`]). Both translate into
//! one version-independent [`Driver`], which:
//!
//! - creates buckets with names derived from COSI's ([`naming`]), with versioning or object lock
//!   when the class asks ([`params`]), idempotently; deletes them, emptying them first only when
//!   the class says so;
//! - grants access either by minting an IAM user whose policy allows exactly the granted
//!   buckets and access mode ([`policy`]), or (`grant: static`) by handing out the store's own
//!   credentials, which isolates nothing and is logged as such;
//! - answers every failure with the gRPC code the COSI spec asks for, mapped in one place
//!   ([`CosiError`]).
//!
//! S3 access goes through `s3vol-s3` ([`s3vol_s3::S3Config`], [`s3vol_s3::AwsStore`]); IAM
//! through `aws-sdk-iam` built from the same configuration. [`secret`] reads the Secret COSI
//! writes for a grant back into a client configuration, for workloads and for mounting.

mod backend;
mod buckets;
mod driver;
mod error;
mod iam;
pub mod naming;
pub mod params;
pub mod policy;
pub mod proto;
pub mod secret;
pub mod server;
pub mod v1alpha1;
pub mod v1alpha2;

pub use backend::{DriverConfig, check_driver_name};
pub use driver::{AccessedBucket, BucketInfo, Driver, Grant};
pub use error::{CosiError, CosiResult};
