//! The generated COSI protocol code, one module per protocol version.
//!
//! - [`v1alpha1`]: package `cosi.v1alpha1`, spoken by the released COSI controller and sidecar
//!   (v0.1.x, v0.2.x);
//! - [`v1alpha2`]: package `sigs.k8s.io.cosi.v1alpha2`, the current upstream protocol.
//!
//! The definitions are s3vol's own, wire-compatible with the upstream API versions named in
//! `proto/cosi/README.md`. Generated code is not ours to lint.

#[allow(
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    rustdoc::all
)]
pub mod v1alpha1 {
    tonic::include_proto!("cosi.v1alpha1");
}

#[allow(
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    rustdoc::all
)]
pub mod v1alpha2 {
    tonic::include_proto!("sigs.k8s.io.cosi.v1alpha2");
}
