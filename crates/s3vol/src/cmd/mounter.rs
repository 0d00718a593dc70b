//! `s3vol mounter`: receives mounted volumes from the CSI node plugin and serves each in an
//! `s3vol mount` process of its own. Unprivileged: it never mounts or opens `/dev/fuse`.
//!
//! Parses flags, makes the process non-dumpable (it holds credentials on their way to the
//! serving processes), blocks SIGTERM/SIGINT before any thread starts (the mounter takes them
//! with `sigwait`, see `s3vol_csi::mounter`), and runs `s3vol_csi::mounter::run`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use s3vol_csi::mounter::MounterConfig;

#[derive(Debug, Args)]
pub struct MounterArgs {
    /// Unix socket on which the node plugin hands over mounted volumes.
    #[arg(long, default_value = super::csi::DEFAULT_MOUNTER_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
    /// Cache directory shared by the volumes it serves (one subdirectory each).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Where serving processes journal what a successor needs to take over their volume
    /// (one private subdirectory per volume; kept when the mounter shuts down, for the next
    /// mounter the node plugin hands the volume to) [default: CACHE_DIR/.sessions].
    /// Without it and without --cache-dir, volumes are served without failover.
    #[arg(long, value_name = "DIR")]
    pub session_dir: Option<PathBuf>,
    /// Seconds a volume's serving process may take to start serving.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    pub ready_timeout: u64,
    /// Seconds NodeUnstageVolume waits for a volume's serving process to upload what it holds
    /// and exit.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub stop_timeout: u64,
    /// Seconds the mounter waits, after SIGTERM, for its serving processes to upload and exit;
    /// keep it below the pod's terminationGracePeriodSeconds.
    #[arg(long, default_value_t = 270, value_name = "SECONDS")]
    pub shutdown_timeout: u64,
    /// The s3vol binary to run for each volume (default: this one).
    #[arg(long, hide = true, value_name = "PATH")]
    pub exe: Option<PathBuf>,
    /// Address (`0.0.0.0:9811`) to serve Prometheus metrics on; every other path (e.g.
    /// `/healthz`) answers 200 too, for liveness probes.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

pub fn run(args: MounterArgs) -> anyhow::Result<ExitCode> {
    s3vol_csi::mounter::block_shutdown_signals().context("blocking SIGTERM and SIGINT")?;
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .context("making the process non-dumpable")?;
    // The mounter itself is synchronous; a small runtime serves the metrics endpoint.
    let _metrics_rt = match args.metrics_addr {
        Some(addr) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("starting the metrics runtime")?;
            super::csi::serve_metrics(&rt, addr)?;
            Some(rt)
        }
        None => None,
    };
    let exe = match args.exe {
        Some(exe) => exe,
        None => std::env::current_exe().context("finding the s3vol binary")?,
    };
    let session_dir = args
        .session_dir
        .or_else(|| args.cache_dir.as_ref().map(|d| d.join(".sessions")));
    s3vol_csi::mounter::run(MounterConfig {
        socket: args.socket.clone(),
        cache_dir: args.cache_dir,
        session_dir,
        exe,
        ready_timeout: Duration::from_secs(args.ready_timeout.max(1)),
        stop_timeout: Duration::from_secs(args.stop_timeout.max(1)),
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
    })
    .with_context(|| format!("serving on {}", args.socket.display()))?;
    Ok(ExitCode::SUCCESS)
}
