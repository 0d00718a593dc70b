//! The CSI messages and services, generated at build time from `proto/csi/csi.proto`.
//!
//! The generated code is not ours to lint; everything else in the crate uses these types
//! through this module.

#![allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms
)]

tonic::include_proto!("csi.v1");
