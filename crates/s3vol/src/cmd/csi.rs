//! `s3vol csi`: the CSI driver (identity, controller and node services) on a unix socket.
//!
//! Parses flags and runs `s3vol_csi::serve` until SIGTERM or SIGINT; everything else lives in
//! the `s3vol-csi` crate.
//!
//! `--mode all` is a complete driver for local use: when no mounter answers on
//! `--mounter-socket`, it starts `s3vol mounter` on that socket as a child process (this same
//! binary), waits until it answers, and on shutdown sends it SIGTERM and waits for it (up to
//! [`MOUNTER_STOP`]). A mounter that already answers there (started by hand, or one a killed
//! driver left running, still serving its volumes) is used as it is and left running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use s3vol_csi::params::Defaults;
use s3vol_csi::{DriverConfig, Mode};

/// The mounter socket the manifests use.
pub const DEFAULT_MOUNTER_SOCKET: &str =
    "/var/lib/kubelet/plugins/csi.s3vol.io/mounter/mounter.sock";

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum ModeArg {
    /// Identity, controller and node.
    #[default]
    All,
    /// Identity and controller (CreateVolume/DeleteVolume).
    Controller,
    /// Identity and node (NodeStage/NodePublish); needs privileges.
    Node,
}

#[derive(Debug, Args)]
pub struct CsiArgs {
    /// CSI socket to serve on, `unix:///path/csi.sock`.
    #[arg(long, value_name = "URL")]
    pub endpoint: String,
    /// This node's name (the manifests pass spec.nodeName).
    #[arg(long, value_name = "ID")]
    pub node_id: String,
    /// Which services to serve.
    #[arg(long, value_enum, default_value_t)]
    pub mode: ModeArg,
    /// Driver name registered with the kubelet (StorageClasses use it as provisioner).
    #[arg(long, default_value = s3vol_csi::DEFAULT_DRIVER_NAME, value_name = "NAME")]
    pub driver_name: String,
    /// Where the node plugin records staged volumes (a host directory).
    #[arg(long, default_value = "/var/lib/s3vol/state", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// The kubelet's directory: staging and target paths must lie under it.
    #[arg(long, default_value = "/var/lib/kubelet", value_name = "DIR")]
    pub kubelet_dir: PathBuf,
    /// Unix socket of the mounter that serves staged volumes. With `--mode all`, a mounter is
    /// started on it when none answers there.
    #[arg(long, default_value = DEFAULT_MOUNTER_SOCKET, value_name = "PATH")]
    pub mounter_socket: PathBuf,
    /// S3 endpoint for volumes that set none.
    #[arg(long, env = "S3VOL_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Region for volumes that set none.
    #[arg(long, env = "S3VOL_S3_REGION", value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Seconds to wait for the mounter to say a staged volume serves.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    pub mount_timeout: u64,
    /// Address (`0.0.0.0:9810`) to serve Prometheus metrics on; every other path (e.g.
    /// `/healthz`) answers 200 too, for liveness probes.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

pub fn run(args: CsiArgs) -> anyhow::Result<ExitCode> {
    let config = DriverConfig {
        endpoint: args.endpoint,
        node_id: args.node_id,
        mode: match args.mode {
            ModeArg::All => Mode::All,
            ModeArg::Controller => Mode::Controller,
            ModeArg::Node => Mode::Node,
        },
        driver_name: args.driver_name,
        state_dir: args.state_dir,
        mounter_socket: args.mounter_socket,
        defaults: Defaults {
            endpoint: args.s3_endpoint.filter(|s| !s.is_empty()),
            region: args.s3_region.filter(|s| !s.is_empty()),
        },
        mount_timeout: Duration::from_secs(args.mount_timeout.max(1)),
        kubelet_dir: args.kubelet_dir,
    };
    let mounter = match config.mode {
        Mode::All => ChildMounter::start_unless_serving(
            &config.mounter_socket,
            &config.state_dir.join("cache"),
        )?,
        _ => None,
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    if let Some(addr) = args.metrics_addr {
        serve_metrics(&rt, addr)?;
    }
    let result = rt.block_on(async {
        s3vol_csi::serve(config, shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    });
    drop(mounter);
    result
}

/// How long a child mounter may take to answer after it was started.
const MOUNTER_START: Duration = Duration::from_secs(20);
/// How long a child mounter may take to stop after SIGTERM (it ends its serving processes,
/// which upload what they hold) before it is killed.
const MOUNTER_STOP: Duration = Duration::from_secs(60);

/// The mounter `--mode all` started; stopped (SIGTERM, bounded wait, then SIGKILL) on drop.
#[derive(Debug)]
struct ChildMounter(Child);

impl ChildMounter {
    /// `cache_dir`: the parent of the volumes' cache directories (under the state directory,
    /// so that what a crash leaves is found by the volume's next mount on this machine).
    fn start_unless_serving(socket: &Path, cache_dir: &Path) -> anyhow::Result<Option<Self>> {
        if s3vol_csi::mounter::is_serving(socket) {
            tracing::info!(socket = %socket.display(), "using the mounter already serving there");
            return Ok(None);
        }
        let exe = std::env::current_exe().context("finding the s3vol binary")?;
        let child = Command::new(&exe)
            .arg("mounter")
            .arg("--socket")
            .arg(socket)
            .arg("--cache-dir")
            .arg(cache_dir)
            .stdin(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} mounter", exe.display()))?;
        let mut m = ChildMounter(child);
        let start = Instant::now();
        while !s3vol_csi::mounter::is_serving(socket) {
            if let Some(status) = m.0.try_wait().context("waiting for the mounter")? {
                anyhow::bail!(
                    "the mounter on {} exited at start: {status}",
                    socket.display()
                );
            }
            if start.elapsed() > MOUNTER_START {
                anyhow::bail!(
                    "the mounter did not answer on {} within {} s",
                    socket.display(),
                    MOUNTER_START.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        tracing::info!(socket = %socket.display(), pid = m.0.id(), "started a mounter (--mode all)");
        Ok(Some(m))
    }
}

impl Drop for ChildMounter {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill(2) of our own child, which has not been reaped yet (try_wait
            // below is the only reaper), so the pid cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let start = Instant::now();
        loop {
            match self.0.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if start.elapsed() > MOUNTER_STOP => break,
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        tracing::warn!(
            pid = self.0.id(),
            "the mounter did not stop after SIGTERM; killing it"
        );
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves Prometheus metrics (and a 200 on any other path, for liveness probes) on `addr`.
pub fn serve_metrics(
    rt: &tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let _guard = rt.enter();
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .with_context(|| format!("serving metrics on {addr}"))
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
    tracing::info!("shutting down");
}
