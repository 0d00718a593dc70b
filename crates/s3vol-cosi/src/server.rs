//! Serving both protocol versions on one unix socket.
//!
//! The v1alpha1 and v1alpha2 services have different fully-qualified names
//! (`cosi.v1alpha1.Provisioner`, `sigs.k8s.io.cosi.v1alpha2.Provisioner`), so one tonic router
//! carries all four and each sidecar finds the version it speaks.
//!
//! A socket file left by a previous run is removed before binding (the sidecar owns the
//! directory; nothing else should be there), but a non-socket file at that path is an error,
//! never deleted. The socket is removed again on a clean shutdown.

use std::future::Future;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::driver::Driver;
use crate::v1alpha1::V1alpha1;
use crate::v1alpha2::V1alpha2;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("endpoint {0:?} is not unix:///path/to/socket")]
    BadEndpoint(String),
    #[error("{path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The socket path of a `unix:///path` (or `unix:/path`, or plain absolute path) endpoint.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if path.starts_with('/') && path.len() > 1 {
        Ok(PathBuf::from(path))
    } else {
        Err(ServeError::BadEndpoint(endpoint.to_owned()))
    }
}

/// Binds the socket, replacing a stale one.
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => return Err(ServeError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    UnixListener::bind(path).map_err(err)
}

/// How long calls in progress may go on once shutdown was asked for; connections kept open
/// between calls (the COSI sidecar keeps one) never hold the exit longer.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves both protocol versions on `listener` until `shutdown` completes, then lets calls in
/// progress finish for up to `SHUTDOWN_GRACE` (10 s).
pub async fn serve(
    driver: Arc<Driver>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let v1 = V1alpha1::new(driver.clone());
    let v2 = V1alpha2::new(driver);
    let (asked, mut asked_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = asked.send(true);
    };
    let served = tonic::transport::Server::builder()
        .add_service(v1.identity_server())
        .add_service(v1.provisioner_server())
        .add_service(v2.identity_server())
        .add_service(v2.provisioner_server())
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown);
    tokio::select! {
        r = served => r?,
        () = async {
            let _ = asked_rx.wait_for(|a| *a).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::info!(grace = ?SHUTDOWN_GRACE, "calls still running after the shutdown grace; ending them");
        }
    }
    Ok(())
}

/// Binds `endpoint`, serves until `shutdown`, then removes the socket.
pub async fn run(
    driver: Arc<Driver>,
    endpoint: &str,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let path = socket_path(endpoint)?;
    let listener = bind(&path)?;
    tracing::info!(
        driver = driver.name(),
        socket = %path.display(),
        "COSI driver serving cosi.v1alpha1 and sigs.k8s.io.cosi.v1alpha2"
    );
    let result = serve(driver, listener, shutdown).await;
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(socket = %path.display(), error = %e, "could not remove the socket");
    }
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            socket_path("unix:///var/lib/cosi/cosi.sock").unwrap(),
            PathBuf::from("/var/lib/cosi/cosi.sock")
        );
        assert_eq!(
            socket_path("unix:/a.sock").unwrap(),
            PathBuf::from("/a.sock")
        );
        assert_eq!(socket_path("/a.sock").unwrap(), PathBuf::from("/a.sock"));
        for bad in ["tcp://1.2.3.4:5", "unix://relative.sock", "", "unix://"] {
            assert!(socket_path(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn stale_sockets_are_replaced_and_other_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sub/cosi.sock");
        drop(bind(&sock).unwrap());
        assert!(sock.exists());
        drop(bind(&sock).unwrap());
        let file = dir.path().join("file");
        std::fs::write(&file, "keep").unwrap();
        assert!(matches!(bind(&file), Err(ServeError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    }
}
