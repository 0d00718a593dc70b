//! `s3vol cosi`: the COSI driver, serving the upstream COSI sidecar on a unix socket.
//!
//! Serves the released `cosi.v1alpha1` protocol and the current `sigs.k8s.io.cosi.v1alpha2` on
//! the same socket until SIGTERM or SIGINT, then removes the socket and exits 0. The S3 flags
//! name the default store; BucketClass and BucketAccessClass parameters may override them per
//! class (see docs/cosi.md). The driver's own credentials come from the usual AWS chain
//! (environment, e.g. from a Secret; profile; web identity) or, per class, from a Secret
//! mounted under `--secrets-dir`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use s3vol_cosi::{Driver, DriverConfig};
use tokio::signal::unix::{SignalKind, signal};

use crate::s3args::S3Args;

#[derive(Debug, Args)]
pub struct CosiArgs {
    /// Where to serve: unix:///path/to/socket (the sidecar's COSI_ENDPOINT).
    #[arg(
        long,
        env = "COSI_ENDPOINT",
        default_value = "unix:///var/lib/cosi/cosi.sock",
        value_name = "URL"
    )]
    pub endpoint: String,
    /// The driver name BucketClasses and BucketAccessClasses refer to (`driverName`).
    #[arg(
        long,
        env = "S3VOL_COSI_DRIVER_NAME",
        default_value = "cosi.s3vol.io",
        value_name = "NAME"
    )]
    pub driver_name: String,
    /// IAM endpoint for `grant: iam` (default: the S3 endpoint when one is set, else AWS IAM).
    #[arg(long, env = "S3VOL_COSI_IAM_ENDPOINT", value_name = "URL")]
    pub iam_endpoint: Option<String>,
    /// Directory of mounted Secrets that `credentialsSecret` class parameters name: each a
    /// subdirectory holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY files.
    #[arg(
        long,
        env = "S3VOL_COSI_SECRETS_DIR",
        default_value = "/etc/s3vol-cosi/secrets",
        value_name = "DIR"
    )]
    pub secrets_dir: PathBuf,
    #[command(flatten)]
    pub s3: S3Args,
}

pub fn run(args: CosiArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(serve(args))
}

async fn serve(args: CosiArgs) -> anyhow::Result<ExitCode> {
    let driver = Driver::new(DriverConfig {
        name: args.driver_name.clone(),
        defaults: args.s3.to_config(),
        iam_endpoint: args.iam_endpoint.clone(),
        secrets_dir: args.secrets_dir.clone(),
    })
    .map_err(anyhow::Error::msg)?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        }
    };
    s3vol_cosi::server::run(driver, &args.endpoint, shutdown)
        .await
        .with_context(|| format!("serving COSI on {}", args.endpoint))?;
    Ok(ExitCode::SUCCESS)
}
