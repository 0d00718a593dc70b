//! The subcommands, one module each.

pub mod check;
pub mod cosi;
pub mod csi;
pub mod mount;
pub mod mounter;
