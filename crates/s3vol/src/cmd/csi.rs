//! `s3vol csi`: the CSI driver (identity, controller and node services) on a unix socket.
//!
//! Only parses flags and runs `s3vol_csi::serve` until SIGTERM or SIGINT; everything else lives
//! in the `s3vol-csi` crate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    /// Unix socket of the mounter that serves staged volumes.
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
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    if let Some(addr) = args.metrics_addr {
        serve_metrics(&rt, addr)?;
    }
    rt.block_on(async {
        s3vol_csi::serve(config, shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
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
