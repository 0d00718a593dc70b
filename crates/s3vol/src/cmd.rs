//! The subcommands, one module each.

pub mod check;
pub mod csi;
pub mod mounter;
