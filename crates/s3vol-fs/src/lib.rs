//! The s3vol filesystem: a bucket or a prefix as a POSIX directory tree.
//!
//! The logic lives in [`S3Fs`], plain async Rust over an [`s3vol_s3::ObjectStore`], so it can
//! be tested against the in-memory store; [`fuse`] is the thin adapter that serves it to the
//! kernel. See `docs/SEMANTICS.md` for what each POSIX operation does.

mod attr_cache;
mod budget;
pub mod cache_dir;
mod config;
mod error;
mod fs;
pub mod fuse;
mod inflight;
mod inode;
mod journal;
mod listing;
mod meta;
mod names;
pub mod parts;
mod ranges;
mod read;
mod recover;
pub mod session;
mod stage;

pub use config::FsConfig;
pub use error::{FsError, FsResult};
pub use fs::{DirEntry, OpenMode, S3Fs};
pub use meta::{Attrs, Kind, format_time, parse_time};
pub use names::valid_name;
