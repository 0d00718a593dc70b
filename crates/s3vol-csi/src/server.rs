//! Serving the CSI services on a unix socket, with the roles a process was asked to play.
//!
//! `controller` serves Identity + Controller (the Deployment next to the external-provisioner),
//! `node` serves Identity + Node (the privileged DaemonSet), `all` serves the three (local runs
//! and tests).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::UnixListenerStream;

use crate::controller::{AwsStores, ControllerService};
use crate::identity::IdentityService;
use crate::node::{NodeConfig, NodeService};
use crate::params::Defaults;
use crate::proto::controller_server::ControllerServer;
use crate::proto::identity_server::IdentityServer;
use crate::proto::node_server::NodeServer;

/// Which CSI services a process serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    All,
    Controller,
    Node,
}

/// Everything `s3vol csi` is configured with.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// `unix:///path/csi.sock` (or a bare absolute path).
    pub endpoint: String,
    pub node_id: String,
    pub mode: Mode,
    pub driver_name: String,
    pub state_dir: PathBuf,
    pub mounter_socket: PathBuf,
    pub defaults: Defaults,
    pub mount_timeout: Duration,
    /// The kubelet's directory: the node service touches no path outside it.
    pub kubelet_dir: PathBuf,
}

/// Why the driver could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--endpoint {0:?} must be unix:///absolute/path")]
    Endpoint(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The socket path of a `unix://` endpoint.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    let path = PathBuf::from(path);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(ServeError::Endpoint(endpoint.to_owned()))
    }
}

/// How long requests in progress may go on once shutdown was asked for. Clients keep their
/// connections open between calls (the kubelet always does), so waiting for every connection
/// to close would never end; a call still running after this is cut off and retried by its
/// caller, as CSI callers do.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves until `shutdown` completes, then lets the calls in progress finish for up to
/// `SHUTDOWN_GRACE` (10 s).
pub async fn serve(
    config: DriverConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let path = socket_path(&config.endpoint)?;
    let io = |context: String| move |source| ServeError::Io { context, source };
    let node = match config.mode {
        Mode::All | Mode::Node => Some(
            NodeService::new(NodeConfig {
                node_id: config.node_id.clone(),
                state_dir: config.state_dir.clone(),
                mounter_socket: config.mounter_socket.clone(),
                defaults: config.defaults.clone(),
                mount_timeout: config.mount_timeout,
                kubelet_dir: config.kubelet_dir.clone(),
            })
            .map_err(io(format!(
                "opening the state directory {}",
                config.state_dir.display()
            )))?,
        ),
        Mode::Controller => None,
    };
    let controller = match config.mode {
        Mode::All | Mode::Controller => Some(ControllerService::new(
            config.driver_name.clone(),
            config.defaults.clone(),
            Arc::new(AwsStores),
        )),
        Mode::Node => None,
    };
    let identity = IdentityService::new(
        config.driver_name.clone(),
        controller.is_some(),
        node.clone(),
    );

    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io(format!("removing the old socket {}", path.display()))(e));
        }
        _ => {}
    }
    // 0660 whatever the umask: the kubelet and the sidecars (root, or the socket's group) only.
    let listener = crate::handoff::bind_socket(&path, 0o660)
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)
        })
        .map_err(io(format!("listening on {}", path.display())))?;
    tracing::info!(endpoint = %config.endpoint, mode = ?config.mode, driver = %config.driver_name, node = %config.node_id, "serving CSI");
    if node.is_some() {
        s3vol_fs::session::log_kernel_failover();
    }

    let keeper = node.clone();
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_optional_service(controller.map(ControllerServer::new))
        .add_optional_service(node.map(NodeServer::new));
    let (asked, mut asked_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = asked.send(true);
    };
    let served = router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown);
    let result = tokio::select! {
        r = served => r.map_err(ServeError::from),
        () = async {
            let _ = asked_rx.wait_for(|a| *a).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::info!(grace = ?SHUTDOWN_GRACE, "connections still open after the shutdown grace; closing them");
            Ok(())
        }
    };
    let _ = std::fs::remove_file(&path);
    if let Some(node) = keeper {
        // Its copies of the volumes' connections may be the only ones left.
        node.before_exit().await;
    }
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            socket_path("unix:/csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            socket_path("/csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert!(socket_path("tcp://127.0.0.1:10000").is_err());
        assert!(socket_path("unix://relative").is_err());
    }
}
