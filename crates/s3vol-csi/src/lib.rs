//! The s3vol CSI driver.
//!
//! Kubernetes talks to storage through the Container Storage Interface. This crate serves its
//! three gRPC services on a unix socket ([`serve`]) and runs the separate process that serves the
//! mounted volumes ([`mounter`]):
//!
//! - **Identity** ([`identity`]): who we are, that we have a controller, whether we are ready.
//! - **Controller** ([`controller`]): CreateVolume makes a bucket per volume or a prefix per
//!   volume in an existing bucket, with a marker object naming the volume; DeleteVolume removes
//!   exactly what CreateVolume made, and only when the marker says it made it.
//! - **Node** ([`node`]): NodeStageVolume opens `/dev/fuse`, mounts the staging path with
//!   mount(2) and hands the fd to the mounter (DESIGN.md decision 7); NodePublishVolume
//!   bind-mounts the staging path into the pod's target path, read-only where asked. Each staged
//!   volume is recorded in the state directory ([`state`]) so a restarted plugin adopts it.
//!
//! Credentials come from the CSI Secrets, in s3vol's own shape or as a COSI BucketAccess Secret
//! ([`secret`]), so a bucket claimed through COSI mounts with the Secret COSI wrote for it.
//!
//! The node plugin and the mounter speak the small protocol of [`handoff`]: one unix-socket
//! message carrying the FUSE fd (SCM_RIGHTS) and a JSON request, one JSON reply.

pub mod capability;
pub mod controller;
pub mod error;
pub mod handoff;
pub mod identity;
mod locks;
pub mod mounter;
pub mod mounts;
pub mod node;
pub mod params;
pub mod proto;
pub mod secret;
pub mod server;
pub mod state;
pub mod volume_id;

pub use error::CsiError;
pub use server::{DriverConfig, Mode, serve};

/// The driver name used when none is configured.
pub const DEFAULT_DRIVER_NAME: &str = "csi.s3vol.io";
