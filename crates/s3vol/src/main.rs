//! `s3vol`: object storage buckets as POSIX filesystems and Kubernetes volumes.
//!
//! One binary, several faces, each a subcommand in its own module under `cmd/`. This file only
//! parses the command line, sets up logging and dispatches.

// Doc comments on the command-line types are the `--help` text users read, where bare URLs
// are what they should see.
#![allow(rustdoc::bare_urls)]

mod cmd;
mod logging;
mod s3args;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "s3vol", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter: error, warn, info, debug, trace, or per-module (`s3vol_fs=debug,info`).
    #[arg(long, global = true, default_value = "info", env = "S3VOL_LOG_LEVEL")]
    log_level: String,
    /// Log line format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "S3VOL_LOG_FORMAT"
    )]
    log_format: logging::LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mount a bucket or a prefix of one as a directory.
    Mount(Box<cmd::mount::MountArgs>),
    /// Check that a bucket is reachable and what these credentials may do in it.
    Check(cmd::check::CheckArgs),
    /// Serve the CSI driver (identity, controller and node services) on a unix socket.
    Csi(cmd::csi::CsiArgs),
    /// Serve the volumes the CSI node plugin mounts, one `s3vol mount` process each.
    Mounter(cmd::mounter::MounterArgs),
    /// Serve the COSI driver (bucket provisioning for Kubernetes) on a unix socket.
    Cosi(cmd::cosi::CosiArgs),
}

/// Large buffers (part uploads, prefetched parts) go straight to mmap and back to the system
/// when freed. glibc's default adapts the threshold upwards and then keeps freed megabytes in
/// per-thread heaps, which makes the process grow well past `--memory-limit` under load.
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    if let Err(e) = logging::init(&cli.log_level, cli.log_format) {
        eprintln!("s3vol: error: {e:#}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Mount(args) => cmd::mount::run(*args),
        Command::Check(args) => cmd::check::run(args),
        Command::Csi(args) => cmd::csi::run(args),
        Command::Mounter(args) => cmd::mounter::run(args),
        Command::Cosi(args) => cmd::cosi::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("s3vol: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
