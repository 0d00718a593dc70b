//! The Node service: staging (the FUSE mount and its hand-off), publishing (bind mounts),
//! volume stats and condition.
//!
//! - **NodeStageVolume** opens `/dev/fuse`, mounts it at the staging path with mount(2)
//!   (`fuse.s3vol`, `nosuid,nodev,allow_other,default_permissions`, read-only when every use is
//!   read-only), sends the fd with the volume's configuration and credentials to the mounter
//!   ([`crate::handoff`]) and waits until the serving process says it serves. "Serves" is then
//!   proven with a request through the mount (`statfs` of the staging path, bounded): only an
//!   answer makes the call succeed. On any failure the serving process is stopped, the staging
//!   path unmounted again, and the error carries the serving process's own reason. Unless the
//!   volume says `failover: "false"`, the mounter keeps a copy of the fd for the volume's
//!   life and replaces a serving process that dies, and the plugin keeps one too and hands it
//!   to the next mounter when the mounter itself goes (`keeper`); when the volume's serving
//!   process ends for good (failover off, restarts exhausted), both let go, and the kernel
//!   answers ENOTCONN instead of hanging.
//! - **NodePublishVolume** bind-mounts the staging path at the target path — but only after
//!   checking in the mount table that the staging path *is* an s3vol mount, so a pod can never
//!   be handed a plain directory of the node's disk — then remounts the bind `nosuid,nodev` and
//!   read-only when asked, which the kernel enforces. It creates the target directory (the spec
//!   makes that the plugin's job) and removes it again if anything fails.
//! - **Credentials rotate without a remount.** When NodePublishVolume carries a Secret (the
//!   StorageClass's `csi.storage.k8s.io/node-publish-secret-*`, normally the same Secret as the
//!   node-stage one), its keys are handed to the volume's serving process through the mounter
//!   ([`handoff::Request::Credentials`]) before the bind mount — on the first publish and on
//!   every republish the kubelet makes (`requiresRepublish: true` in the CSIDriver), so a
//!   rotated Secret reaches a running mount within the kubelet's resync period. The serving
//!   process signs every later request with them; nothing is remounted. If they cannot be
//!   handed over, the call fails (UNAVAILABLE) and says why: a pod must not be told its volume
//!   uses keys it does not.
//! - **Pod identity** (`authenticationSource: pod`, see `docs/identity.md`). Staging is per
//!   volume but identity is per pod, and pods with different identities must never share a
//!   mount: so NodeStageVolume mounts nothing for such a volume (it only makes the staging
//!   directory), and NodePublishVolume mounts fuse.s3vol at the target path itself, for that
//!   pod alone, served by a process of its own that assumes the volume's role with the pod's
//!   service-account token (the kubelet's `csi.storage.k8s.io/serviceAccount.tokens`, from
//!   the CSIDriver's `tokenRequests`). Its state record, serving process and cache
//!   directory are keyed by `VOLUME#pod-HASH(target)`. Every republish hands the serving
//!   process the refreshed token; NodeUnpublishVolume stops it. Two pods never share the
//!   process, even with the same identity (simple and safe; it costs a process per pod).
//! - **NodeUnpublishVolume** / **NodeUnstageVolume** unmount (a missing mount is fine, and so is
//!   a dead one: nothing here touches the mounted path, which answers ENOTCONN once its serving
//!   process is gone) and remove what publish created / the state record. Unstage then asks the
//!   mounter to stop the volume's serving process and waits for it: a copy of the mount that
//!   lives on in another mount namespace never receives the unmount, and must not keep the
//!   process (and its connection) alive.
//! - A path that holds a **dead s3vol mount** (its serving process gone) is cleaned before
//!   NodeStage or NodePublish mounts there again, and a background sweep (every 10 s)
//!   unmounts dead staging mounts on its own, because the kubelet's own `mkdir` fails on them
//!   before it would call NodeStage.
//!
//! **Paths.** The service only mounts, unmounts and removes paths under the kubelet directory
//! (`--kubelet-dir`); any other staging or target path is INVALID_ARGUMENT. It only unmounts
//! mounts that are s3vol's (`fuse.s3vol` in `/proc/self/mountinfo`): anything else mounted at
//! a path it is asked to clean is left alone and the call fails with FAILED_PRECONDITION.
//! - **NodeGetVolumeStats** reports `statfs` of the volume and its condition: abnormal when the
//!   mount answers an error (ENOTCONN: its serving process is gone, and the mounter says how
//!   it ended) or nothing within 5 s. A volume that answers but whose serving process died
//!   and was replaced (failover, see `mounter`) is healthy, and its condition says how many
//!   times, when the last was, how the process ended and how long its successor took.
//!
//! Every call on one volume is serialised (see `locks`). Each staged volume is recorded in the
//! state directory; on start the service adopts the records whose mounts still exist.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::capability;
use crate::error::{CsiError, CsiResult};
use crate::handoff::{self, MountRequest};
use crate::locks::KeyLocks;
use crate::mounts::{self, FSTYPE, Health};
use crate::params::{self, AuthSource, Defaults, PodIdentity, VolumeAttrs, keys};
use crate::proto::node_server::Node;
use crate::proto::node_service_capability::{self, rpc};
use crate::proto::volume_usage::Unit;
use crate::proto::{
    NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse, NodeGetInfoRequest,
    NodeGetInfoResponse, NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse,
    NodePublishVolumeRequest, NodePublishVolumeResponse, NodeServiceCapability,
    NodeStageVolumeRequest, NodeStageVolumeResponse, NodeUnpublishVolumeRequest,
    NodeUnpublishVolumeResponse, NodeUnstageVolumeRequest, NodeUnstageVolumeResponse,
    VolumeCondition, VolumeUsage,
};
use crate::secret::{SecretHints, VolumeSecret};
use crate::state::{StagedVolume, StateDir};

mod keeper;

/// How long `statfs` of a volume may take before it counts as not answering.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often staged volumes are checked for a dead mount (see [`NodeService::sweep`]).
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Settings of the node service.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: String,
    pub state_dir: PathBuf,
    pub mounter_socket: PathBuf,
    pub defaults: Defaults,
    /// How long to wait for the mounter to say a volume serves.
    pub mount_timeout: Duration,
    /// The kubelet's directory: every staging and target path must lie under it.
    pub kubelet_dir: PathBuf,
}

/// The Node service.
#[derive(Debug)]
pub struct NodeService {
    config: NodeConfig,
    /// `config.kubelet_dir`, canonical.
    kubelet_dir: PathBuf,
    state: StateDir,
    locks: KeyLocks,
    adopted: AtomicBool,
    /// Copies of the failover volumes' connections, for the mounter's own end.
    kept: keeper::Keeper,
}

fn required<'a>(value: &'a str, name: &str) -> CsiResult<&'a str> {
    if value.is_empty() {
        Err(CsiError::invalid(format!("{name} is required")))
    } else {
        Ok(value)
    }
}

fn absolute(value: &str, name: &str) -> CsiResult<PathBuf> {
    let p = Path::new(required(value, name)?);
    if !p.is_absolute() {
        return Err(CsiError::invalid(format!(
            "{name} must be an absolute path"
        )));
    }
    Ok(mounts::normalize(p))
}

impl NodeService {
    /// Opens the state directory and adopts the volumes a previous run staged.
    pub fn new(config: NodeConfig) -> io::Result<Arc<Self>> {
        let state = StateDir::open(&config.state_dir)?;
        // Canonical, so that symlinks in requests' paths cannot lead out of it; a directory
        // that does not exist (yet) is taken as given (nothing under it can be staged).
        let kubelet_dir = config
            .kubelet_dir
            .canonicalize()
            .unwrap_or_else(|_| mounts::normalize(&config.kubelet_dir));
        let svc = Arc::new(Self {
            config,
            kubelet_dir,
            state,
            locks: KeyLocks::default(),
            adopted: AtomicBool::new(false),
            kept: keeper::Keeper::default(),
        });
        svc.adopt()?;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&svc);
            rt.spawn(async move {
                loop {
                    let Some(svc) = weak.upgrade() else { return };
                    svc.sweep().await;
                    drop(svc);
                    tokio::time::sleep(SWEEP_INTERVAL).await;
                }
            });
            let weak = Arc::downgrade(&svc);
            rt.spawn(async move {
                loop {
                    let Some(svc) = weak.upgrade() else { return };
                    svc.tend_connections().await;
                    drop(svc);
                    tokio::time::sleep(keeper::TEND_INTERVAL).await;
                }
            });
        }
        Ok(svc)
    }

    /// Unmounts the staging mounts whose serving process is gone (they answer ENOTCONN). A
    /// kubelet cannot get past such a directory by itself — its own `mkdir -p` of the staging
    /// path fails on it ("file exists"), so it never calls NodeStageVolume again — while a
    /// plain directory lets it stage the volume afresh. The record stays (NodeUnstageVolume
    /// still comes); pods that had the volume published see ENOTCONN until they restart.
    ///
    /// The first probe runs without the volume's lock: a mount that stalls (no mounter serves
    /// it for a moment) makes it wait up to [`PROBE_TIMEOUT`], and the hand-over that ends the
    /// stall takes that lock. A dead mount answers at once, so the probe is repeated under the
    /// lock before anything is done.
    async fn sweep(&self) {
        let Ok(records) = self.state.load_all() else {
            return;
        };
        let ours = |v: &crate::state::StagedVolume| matches!(mounts::top_mount_at(&v.staging_path), Ok(Some(m)) if m.fstype == FSTYPE);
        for (id, v) in records {
            if !ours(&v)
                || !mounts::probe(&v.staging_path, PROBE_TIMEOUT)
                    .await
                    .is_dead()
            {
                continue;
            }
            let _guard = self.locks.lock(&id).await;
            if !ours(&v)
                || !mounts::probe(&v.staging_path, PROBE_TIMEOUT)
                    .await
                    .is_dead()
            {
                continue;
            }
            tracing::warn!(volume = %id, staging = %v.staging_path.display(), "the serving process of this volume is gone; unmounting its dead staging mount so that the kubelet can stage it again");
            if let Err(e) = unmount_ours(&v.staging_path) {
                tracing::error!(volume = %id, error = %e, "unmounting a dead staging mount");
                continue;
            }
            if let Err(e) = self.stop_serving(&id, &v.staging_path, v.pid).await {
                tracing::warn!(volume = %id, error = %e, "cleaning up after a dead serving process");
            }
        }
    }

    /// Takes over the records of an earlier run: a record whose staging path is still an s3vol
    /// mount is kept (its serving process never depended on us); any other is dropped.
    fn adopt(&self) -> io::Result<()> {
        for (id, v) in self.state.load_all()? {
            match mounts::top_mount_at(&v.staging_path)? {
                Some(m) if m.fstype == FSTYPE => {
                    tracing::info!(volume = %id, staging = %v.staging_path.display(), pid = ?v.pid, "adopted staged volume");
                }
                _ => {
                    tracing::info!(volume = %id, staging = %v.staging_path.display(), "forgetting a volume that is no longer mounted");
                    self.state.remove(&id)?;
                }
            }
        }
        self.adopted.store(true, Ordering::SeqCst);
        self.prune_cache_dirs();
        Ok(())
    }

    /// Asks the mounter, in the background, to remove the cache directories of volumes that are
    /// not staged here any more. Best effort: the mounter may not be up yet, or be shutting
    /// down in a rollout (a few tries, 2 s apart, reach the next one).
    fn prune_cache_dirs(&self) {
        let keep: Vec<String> = match self.state.load_all() {
            Ok(all) => all.into_keys().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading the state records to prune cache directories");
                return;
            }
        };
        let socket = self.config.mounter_socket.clone();
        std::thread::spawn(move || {
            let request = handoff::Request::Prune { keep };
            for _ in 0..30 {
                match handoff::call(&socket, &request, &[], Duration::from_secs(60)) {
                    Ok(r) if r.ok => return,
                    // A mounter shutting down (a rollout): the next one prunes.
                    Ok(r) if r.draining => std::thread::sleep(Duration::from_secs(2)),
                    Ok(r) => {
                        tracing::warn!(error = ?r.error, "the mounter could not prune cache directories");
                        return;
                    }
                    Err(_) => std::thread::sleep(Duration::from_secs(2)),
                }
            }
        });
    }

    /// `path` (from a request, named `name`) made absolute and normal; it must lie under the
    /// kubelet directory.
    fn kubelet_path(&self, value: &str, name: &str) -> CsiResult<PathBuf> {
        let p = absolute(value, name)?;
        if p == self.kubelet_dir || !p.starts_with(&self.kubelet_dir) {
            return Err(CsiError::invalid(format!(
                "{name} {} is not under the kubelet directory {}",
                p.display(),
                self.kubelet_dir.display()
            )));
        }
        Ok(p)
    }

    /// Asks the mounter to end the serving process of a volume and waits for it; returns how
    /// that process ended, when the mounter knew it.
    async fn stop_serving(
        &self,
        volume_id: &str,
        staging: &Path,
        pid: Option<u32>,
    ) -> CsiResult<Option<String>> {
        let socket = self.config.mounter_socket.clone();
        let request = handoff::Request::Stop(handoff::StopRequest {
            volume_id: volume_id.to_owned(),
            staging_path: staging.to_owned(),
            pid,
        });
        // The mounter's own wait is bounded; allow it that and a margin.
        let timeout = self.config.mount_timeout + Duration::from_secs(30);
        let reply =
            tokio::task::spawn_blocking(move || handoff::call(&socket, &request, &[], timeout))
                .await;
        // The volume ends here whatever the mounter says: no copy of its connection is kept.
        self.kept.release(volume_id);
        match reply {
            Ok(Ok(r)) if r.ok => Ok(r.ended),
            Ok(Ok(r)) => Err(CsiError::Unavailable(r.error.unwrap_or_else(|| {
                "the mounter could not stop the serving process".into()
            }))),
            // No mounter listening, so no serving process of it: nothing left to stop.
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                tracing::warn!(volume = %volume_id, error = %e, socket = %self.config.mounter_socket.display(), "no mounter listens; nothing to stop");
                Ok(None)
            }
            Ok(Err(e)) => Err(CsiError::Unavailable(format!(
                "asking the mounter at {} to stop the serving process of {volume_id}: {e}",
                self.config.mounter_socket.display()
            ))),
            Err(e) => Err(CsiError::Internal(format!("stop task failed: {e}"))),
        }
    }

    /// What the mounter says of a volume's serving process (its restarts, or why it ended),
    /// for the volume condition. Best effort and bounded: `None` when the mounter does not
    /// answer in time or does not know the volume (it was restarted since).
    async fn mounter_status(&self, id: &str) -> Option<handoff::VolumeStatus> {
        let socket = self.config.mounter_socket.clone();
        let request = handoff::Request::Status(handoff::StatusRequest {
            volume_id: id.to_owned(),
        });
        let reply = tokio::task::spawn_blocking(move || {
            handoff::call(&socket, &request, &[], Duration::from_secs(2))
        })
        .await;
        match reply {
            Ok(Ok(r)) if r.ok => r.status,
            _ => None,
        }
    }

    /// Whether this node can serve: state adopted, `/dev/fuse` present, mounter answering.
    pub async fn ready(&self) -> bool {
        if !self.adopted.load(Ordering::SeqCst) || !Path::new("/dev/fuse").exists() {
            return false;
        }
        let socket = self.config.mounter_socket.clone();
        let ping = tokio::task::spawn_blocking(move || {
            handoff::call(
                &socket,
                &handoff::Request::Ping,
                &[],
                Duration::from_secs(2),
            )
        });
        matches!(ping.await, Ok(Ok(r)) if r.ok)
    }

    async fn stage(&self, req: NodeStageVolumeRequest) -> CsiResult<()> {
        let volume_id = required(&req.volume_id, "volume_id")?;
        let staging = self.kubelet_path(&req.staging_target_path, "staging_target_path")?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::invalid("volume_capability is required"))?;
        let cap_read_only = capability::check(cap).map_err(CsiError::InvalidArgument)?;
        let secret = VolumeSecret::parse(&req.secrets)?;
        let attrs = VolumeAttrs::parse(&req.volume_context, &secret.hints, &self.config.defaults)?;
        let failover = params::failover(&req.volume_context)?;
        let (flags, group) = capability::mount_flags(cap);
        let mut options = params::mount_options(flags)?;
        params::apply_mount_group(&mut options, group)?;
        options.read_only |= cap_read_only;
        tracing::debug!(volume = %volume_id, shape = ?secret.shape, "read the node-stage secret");
        let credentials = match AuthSource::parse(&req.volume_context)? {
            AuthSource::Default => secret.credentials,
            AuthSource::Driver => None,
            AuthSource::Secret => Some(secret.credentials.ok_or_else(|| {
                CsiError::invalid(
                    "authenticationSource is secret, but the node-stage Secret holds no keys \
                     (set csi.storage.k8s.io/node-stage-secret-name and -namespace in the \
                     StorageClass or PV)",
                )
            })?),
            AuthSource::Pod(_) => {
                // Each pod gets its own mount at publish time, as itself: nothing is mounted
                // for the volume as a whole.
                if !staging.is_dir() {
                    std::fs::create_dir_all(&staging)
                        .map_err(CsiError::io(format!("creating {}", staging.display())))?;
                }
                tracing::info!(volume = %volume_id, staging = %staging.display(), "staged (authenticationSource: pod; each pod's mount is made when it is published)");
                return Ok(());
            }
        };
        let record = StagedVolume {
            volume_id: volume_id.to_owned(),
            staging_path: staging.clone(),
            bucket: attrs.bucket.to_string(),
            prefix: attrs.prefix.clone(),
            endpoint: attrs.location.endpoint.clone(),
            region: attrs.location.region.clone(),
            force_path_style: attrs.location.path_style,
            options: options.clone(),
            pid: None,
        };
        let source = mounts::mount_source(&record.bucket, &record.prefix);

        let _guard = self.locks.lock(volume_id).await;
        let existing = self
            .state
            .load(volume_id)
            .map_err(CsiError::io("reading the state record"))?;
        if let Some(old) = &existing
            && old.staging_path != staging
            && mounts::top_mount_at(&old.staging_path)
                .map_err(CsiError::io("reading the mount table"))?
                .is_some_and(|m| m.fstype == FSTYPE)
        {
            return Err(CsiError::AlreadyExists(format!(
                "volume {volume_id} is already staged at {}",
                old.staging_path.display()
            )));
        }
        if let Some(m) =
            mounts::top_mount_at(&staging).map_err(CsiError::io("reading the mount table"))?
        {
            if m.fstype != FSTYPE {
                return Err(CsiError::FailedPrecondition(format!(
                    "{} already has a {} mount that is not s3vol's",
                    staging.display(),
                    m.fstype
                )));
            }
            let same = match &existing {
                Some(old) => old.same_mount(&record),
                None => m.source == source,
            };
            if !same {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {volume_id} is staged at {} with a different bucket, prefix or options",
                    staging.display()
                )));
            }
            match mounts::probe(&staging, PROBE_TIMEOUT).await {
                Health::Ok { .. } => {
                    if existing.is_none() {
                        self.state
                            .save(&record)
                            .map_err(CsiError::io("writing the state record"))?;
                    }
                    tracing::info!(volume = %volume_id, staging = %staging.display(), "already staged");
                    return Ok(());
                }
                health => {
                    // Its serving process is gone (or hangs): replace the dead mount.
                    tracing::warn!(volume = %volume_id, ?health, "staged mount is dead; mounting again");
                    unmount_ours(&staging)?;
                    let pid = existing.as_ref().and_then(|r| r.pid);
                    self.stop_serving(volume_id, &staging, pid).await?;
                }
            }
        }
        if !staging.is_dir() {
            std::fs::create_dir_all(&staging)
                .map_err(CsiError::io(format!("creating {}", staging.display())))?;
        }

        self.mount_and_serve(record, credentials, None, failover)
            .await
    }

    /// Mounts fuse.s3vol at `record.staging_path`, hands the connection (with the mount's
    /// keys or pod identity) to the mounter, proves the mount serves and saves the record. On
    /// any failure the path is unmounted again and the error carries the serving process's
    /// own reason.
    async fn mount_and_serve(
        &self,
        mut record: StagedVolume,
        credentials: Option<s3vol_s3::StaticCredentials>,
        web_identity: Option<s3vol_s3::WebIdentity>,
        failover: bool,
    ) -> CsiResult<()> {
        let volume_id = record.volume_id.clone();
        let volume_id = volume_id.as_str();
        let staging = record.staging_path.clone();
        let options = record.options.clone();
        let source = mounts::mount_source(&record.bucket, &record.prefix);
        let fd = mounts::open_fuse().map_err(|e| {
            CsiError::FailedPrecondition(format!(
                "cannot open /dev/fuse (the node plugin must be privileged): {e}"
            ))
        })?;
        mounts::mount_fuse(&fd, &staging, &source, options.read_only).map_err(CsiError::io(
            format!("mounting fuse.s3vol at {}", staging.display()),
        ))?;
        // With failover, the memory where streamed files' bytes wait for S3 is held with the
        // connection (see `handoff::Connection`); without it, new files are staged on disk.
        let parts = if failover {
            match s3vol_fs::parts::create_memfd() {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(volume = %volume_id, error = %e, "cannot make the part buffers' memory file: new files of the volume are staged on disk");
                    None
                }
            }
        } else {
            None
        };
        let conn = handoff::Connection { fuse: fd, parts };
        let request = MountRequest {
            volume_id: volume_id.to_owned(),
            bucket: record.bucket.clone(),
            prefix: record.prefix.clone(),
            endpoint: record.endpoint.clone(),
            region: record.region.clone(),
            force_path_style: record.force_path_style,
            options,
            staging_path: staging.clone(),
            credentials,
            web_identity,
            failover,
            adopt: None,
        };
        // With failover a copy is kept (with its credentials) for the next mounter.
        let keep = failover.then(|| request.clone());
        let request = handoff::Request::Mount(Box::new(request));
        let socket = self.config.mounter_socket.clone();
        let timeout = self.config.mount_timeout;
        let outcome = tokio::task::spawn_blocking(move || {
            let reply = handoff::call(&socket, &request, &conn.fds(), timeout);
            (reply, conn)
        })
        .await;
        let (outcome, conn) = match outcome {
            Ok((reply, conn)) => (Ok(reply), Some(conn)),
            Err(e) => (Err(e), None),
        };
        let failure = match outcome {
            Ok(Ok(reply)) if reply.ok => {
                record.pid = reply.pid;
                match self.prove_serving(volume_id, &staging, reply.pid).await {
                    Err(e) => e,
                    Ok(()) => match self.state.save(&record) {
                        Ok(()) => {
                            match (conn, keep, reply.session_dir) {
                                (Some(conn), Some(request), Some(dir)) => {
                                    self.kept.keep(conn, request, dir)
                                }
                                // Without failover only the serving process holds it.
                                (conn, ..) => drop(conn),
                            }
                            tracing::info!(volume = %volume_id, staging = %staging.display(), source = %source, pid = ?reply.pid, "staged");
                            return Ok(());
                        }
                        Err(e) => CsiError::io("writing the state record")(e),
                    },
                }
            }
            Ok(Ok(reply)) => CsiError::Internal(format!(
                "mounting {source} failed: {}",
                reply
                    .error
                    .unwrap_or_else(|| "the mounter gave no reason".into())
            )),
            Ok(Err(e)) => CsiError::Unavailable(format!(
                "handing {source} to the mounter at {} failed: {e}",
                self.config.mounter_socket.display()
            )),
            Err(e) => CsiError::Internal(format!("hand-off task failed: {e}")),
        };
        if let Err(e) = unmount_ours(&staging) {
            tracing::error!(volume = %volume_id, error = %e, "could not unmount the staging path after a failed stage");
        }
        tracing::warn!(volume = %volume_id, error = %failure, "stage failed");
        Err(failure)
    }

    /// Proves that the volume's serving process answers: a `statfs` through the mount, bounded
    /// by the mount timeout. If it does not answer, the process is stopped and its own reason
    /// for ending becomes the error. While the `statfs` waits, the mounter is asked (every
    /// quarter of a second) whether the volume is still served: a serving process that dies
    /// right after it said it serves, and whose successors die too, fails the stage at once
    /// instead of at the mount timeout (the connection stays open while this plugin and the
    /// mounter hold it, so the `statfs` itself would wait for the timeout).
    async fn prove_serving(
        &self,
        volume_id: &str,
        staging: &Path,
        pid: Option<u32>,
    ) -> CsiResult<()> {
        let probe = mounts::probe(staging, self.config.mount_timeout);
        tokio::pin!(probe);
        let mut unserved = None;
        let health = loop {
            tokio::select! {
                health = &mut probe => break health,
                () = tokio::time::sleep(Duration::from_millis(250)) => {
                    if let Some(why) = self.mounter_status(volume_id).await.and_then(|s| s.ended) {
                        unserved = Some(why);
                        break Health::NoAnswer;
                    }
                }
            }
        };
        if matches!(health, Health::Ok { .. }) {
            return Ok(());
        }
        let what = match (&health, unserved) {
            (_, Some(why)) => format!("is served by no process any more ({why})"),
            (Health::Error(_, msg), None) => format!("answers {msg}"),
            _ => format!(
                "did not answer within {} s",
                self.config.mount_timeout.as_secs()
            ),
        };
        let ended = match self.stop_serving(volume_id, staging, pid).await {
            Ok(Some(ended)) => format!("; the serving process ended: {ended}"),
            Ok(None) => String::new(),
            Err(e) => format!("; stopping its serving process: {e}"),
        };
        Err(CsiError::Internal(format!(
            "the mount at {} {what} right after the mounter said it serves{ended}",
            staging.display()
        )))
    }

    async fn unstage(&self, req: NodeUnstageVolumeRequest) -> CsiResult<()> {
        let volume_id = required(&req.volume_id, "volume_id")?;
        let staging = self.kubelet_path(&req.staging_target_path, "staging_target_path")?;
        let _guard = self.locks.lock(volume_id).await;
        unmount_ours(&staging)?;
        let record = self
            .state
            .load(volume_id)
            .map_err(CsiError::io("reading the state record"))?;
        // The unmount reaches the serving process only if no other mount namespace holds a
        // copy of the mount: end it explicitly.
        self.stop_serving(volume_id, &staging, record.and_then(|r| r.pid))
            .await?;
        self.state
            .remove(volume_id)
            .map_err(CsiError::io("removing the state record"))?;
        tracing::info!(volume = %volume_id, staging = %staging.display(), "unstaged");
        Ok(())
    }

    async fn publish(&self, req: NodePublishVolumeRequest) -> CsiResult<()> {
        let volume_id = required(&req.volume_id, "volume_id")?;
        let target = self.kubelet_path(&req.target_path, "target_path")?;
        let staging = self.kubelet_path(&req.staging_target_path, "staging_target_path")?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::invalid("volume_capability is required"))?;
        let read_only = capability::check(cap).map_err(CsiError::InvalidArgument)? || req.readonly;
        let secret = match AuthSource::parse(&req.volume_context)? {
            AuthSource::Pod(pod) => {
                let _guard = self.locks.lock(volume_id).await;
                let result = self
                    .publish_as_pod(
                        volume_id,
                        &target,
                        cap,
                        read_only,
                        &req.volume_context,
                        &pod,
                    )
                    .await;
                if result.is_err() {
                    remove_target(&target);
                }
                return result;
            }
            // The driver's identity: a publish Secret's keys are not used.
            AuthSource::Driver => None,
            _ if req.secrets.is_empty() => None,
            _ => Some(VolumeSecret::parse(&req.secrets)?),
        };
        let _guard = self.locks.lock(volume_id).await;
        let result = self
            .publish_locked(volume_id, &staging, &target, read_only, secret)
            .await;
        if result.is_err() {
            // Never leave the pod a plain directory on the node's disk.
            remove_target(&target);
        }
        result
    }

    async fn publish_locked(
        &self,
        volume_id: &str,
        staging: &Path,
        target: &Path,
        read_only: bool,
        secret: Option<VolumeSecret>,
    ) -> CsiResult<()> {
        let table =
            |p: &Path| mounts::top_mount_at(p).map_err(CsiError::io("reading the mount table"));
        let staged = match table(staging)? {
            Some(m) if m.fstype == FSTYPE => m,
            _ => {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {volume_id} is not staged at {} (NodeStageVolume first)",
                    staging.display()
                )));
            }
        };
        if let Some(credentials) = secret.and_then(|s| s.credentials) {
            self.pass_identity(volume_id, s3vol_s3::IdentityDocument::Keys(credentials))
                .await?;
        }
        if let Some(m) = table(target)?
            && m.fstype == FSTYPE
            && mounts::probe(target, PROBE_TIMEOUT).await.is_dead()
        {
            // A bind of a mount whose serving process is gone: clean it, publish afresh.
            tracing::warn!(volume = %volume_id, target = %target.display(), "the target holds a dead s3vol mount; replacing it");
            unmount_ours(target)?;
        }
        if let Some(m) = table(target)? {
            if m.fstype == FSTYPE && m.source == staged.source && m.read_only() == read_only {
                tracing::info!(volume = %volume_id, target = %target.display(), "already published");
                return Ok(());
            }
            // Not ours to undo: keep it, but say why the call fails.
            return Err(CsiError::AlreadyExists(format!(
                "{} is already mounted ({} {}, {}), incompatible with this request",
                target.display(),
                m.fstype,
                m.source,
                if m.read_only() { "ro" } else { "rw" }
            )));
        }
        match std::fs::create_dir(target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && target.is_dir() => {}
            Err(e) => return Err(CsiError::io(format!("creating {}", target.display()))(e)),
        }
        mounts::bind_mount(staging, target, read_only).map_err(CsiError::io(format!(
            "bind-mounting {} at {}",
            staging.display(),
            target.display()
        )))?;
        tracing::info!(volume = %volume_id, target = %target.display(), read_only, "published");
        Ok(())
    }

    /// Publishes a volume for one pod as that pod (`authenticationSource: pod`): its own
    /// FUSE mount at the target path, served by a process of its own that assumes the role
    /// with the pod's token. A republish (the same target, mounted and answering) only hands
    /// the serving process the pod's refreshed token.
    async fn publish_as_pod(
        &self,
        volume_id: &str,
        target: &Path,
        cap: &crate::proto::VolumeCapability,
        read_only: bool,
        context: &std::collections::HashMap<String, String>,
        pod: &PodIdentity,
    ) -> CsiResult<()> {
        let attrs = VolumeAttrs::parse(context, &SecretHints::default(), &self.config.defaults)?;
        let failover = params::failover(context)?;
        let identity = pod_web_identity(context, pod, attrs.location.endpoint.as_deref())?;
        let mount_id = pod_mount_id(volume_id, target);
        let (flags, group) = capability::mount_flags(cap);
        let mut options = params::mount_options(flags)?;
        params::apply_mount_group(&mut options, group)?;
        options.read_only |= read_only;
        let record = StagedVolume {
            volume_id: mount_id.clone(),
            staging_path: target.to_owned(),
            bucket: attrs.bucket.to_string(),
            prefix: attrs.prefix.clone(),
            endpoint: attrs.location.endpoint.clone(),
            region: attrs.location.region.clone(),
            force_path_style: attrs.location.path_style,
            options,
            pid: None,
        };
        let existing = self
            .state
            .load(&mount_id)
            .map_err(CsiError::io("reading the state record"))?;
        if let Some(m) =
            mounts::top_mount_at(target).map_err(CsiError::io("reading the mount table"))?
        {
            if m.fstype != FSTYPE {
                return Err(CsiError::FailedPrecondition(format!(
                    "{} already has a {} mount that is not s3vol's",
                    target.display(),
                    m.fstype
                )));
            }
            let alive = matches!(
                mounts::probe(target, PROBE_TIMEOUT).await,
                Health::Ok { .. }
            );
            if let Some(old) = &existing
                && alive
            {
                if !old.same_mount(&record) {
                    return Err(CsiError::AlreadyExists(format!(
                        "{} is published with a different bucket, prefix or options",
                        target.display()
                    )));
                }
                self.pass_identity(
                    &mount_id,
                    s3vol_s3::IdentityDocument::WebIdentity {
                        web_identity: identity,
                    },
                )
                .await?;
                tracing::info!(volume = %volume_id, target = %target.display(), pod = %subject_of(context), "republished: the pod's refreshed token was handed to its serving process");
                return Ok(());
            }
            tracing::warn!(volume = %volume_id, target = %target.display(), "the target holds a dead or unknown s3vol mount; replacing it");
            unmount_ours(target)?;
            if let Some(old) = &existing {
                self.stop_serving(&mount_id, target, old.pid).await?;
            }
        }
        match std::fs::create_dir(target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && target.is_dir() => {}
            Err(e) => return Err(CsiError::io(format!("creating {}", target.display()))(e)),
        }
        tracing::info!(volume = %volume_id, target = %target.display(), pod = %subject_of(context), role = %pod.role_arn, "publishing as the pod");
        self.mount_and_serve(record, None, Some(identity), failover)
            .await
    }

    /// Hands the serving process of a mount new keys or a refreshed token.
    async fn pass_identity(
        &self,
        volume_id: &str,
        mut identity: s3vol_s3::IdentityDocument,
    ) -> CsiResult<()> {
        let socket = self.config.mounter_socket.clone();
        let request = handoff::Request::Credentials(handoff::CredentialsUpdate {
            volume_id: volume_id.to_owned(),
            identity: identity.clone(),
        });
        let reply = tokio::task::spawn_blocking(move || {
            handoff::call(&socket, &request, &[], Duration::from_secs(30))
        })
        .await;
        if matches!(&reply, Ok(Ok(r)) if r.ok) {
            self.kept.update_identity(volume_id, &identity);
        }
        identity.wipe();
        let labels = [("volume", volume_id.to_owned())];
        let failure = match reply {
            Ok(Ok(r)) if r.ok => {
                metrics::counter!("s3vol_credential_updates_total", &labels).increment(1);
                tracing::debug!(volume = %volume_id, "passed the publish Secret's keys to the serving process");
                return Ok(());
            }
            Ok(Ok(r)) => r
                .error
                .unwrap_or_else(|| "the mounter gave no reason".into()),
            Ok(Err(e)) => format!(
                "asking the mounter at {}: {e}",
                self.config.mounter_socket.display()
            ),
            Err(e) => format!("hand-off task failed: {e}"),
        };
        metrics::counter!("s3vol_credential_update_failures_total", &labels).increment(1);
        tracing::warn!(volume = %volume_id, error = %failure, "could not pass new credentials to the serving process");
        Err(CsiError::Unavailable(format!(
            "passing new credentials to the serving process of {volume_id}: {failure}"
        )))
    }

    async fn unpublish(&self, req: NodeUnpublishVolumeRequest) -> CsiResult<()> {
        let volume_id = required(&req.volume_id, "volume_id")?;
        let target = self.kubelet_path(&req.target_path, "target_path")?;
        let _guard = self.locks.lock(volume_id).await;
        unmount_ours(&target)?;
        // A pod's own mount (authenticationSource: pod) has its own serving process.
        let mount_id = pod_mount_id(volume_id, &target);
        if let Some(r) = self
            .state
            .load(&mount_id)
            .map_err(CsiError::io("reading the state record"))?
        {
            self.stop_serving(&mount_id, &target, r.pid).await?;
            self.state
                .remove(&mount_id)
                .map_err(CsiError::io("removing the state record"))?;
        }
        match std::fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(CsiError::io(format!("removing {}", target.display()))(e)),
        }
        tracing::info!(volume = %volume_id, target = %target.display(), "unpublished");
        Ok(())
    }

    async fn stats(&self, req: NodeGetVolumeStatsRequest) -> CsiResult<NodeGetVolumeStatsResponse> {
        let volume_id = required(&req.volume_id, "volume_id")?;
        let path = required(&req.volume_path, "volume_path")?;
        let known = |id: &str| {
            self.state
                .load(id)
                .map_err(CsiError::io("reading the state record"))
                .map(|r| r.is_some())
        };
        // A pod's own mount (authenticationSource: pod) is recorded under its own id, and the
        // mounter knows its serving process by that id.
        let served_as = if known(volume_id)? {
            volume_id.to_owned()
        } else {
            let pod_mount = pod_mount_id(volume_id, &mounts::normalize(Path::new(path)));
            if !known(&pod_mount)? {
                return Err(CsiError::NotFound(format!(
                    "volume {volume_id} is not staged on this node"
                )));
            }
            pod_mount
        };
        // CSI names one error here: the volume does not exist at volume_path (NOT_FOUND). A
        // relative path is such a path, not a malformed request.
        if !Path::new(path).is_absolute() {
            return Err(CsiError::NotFound(format!(
                "volume {volume_id} is not mounted at volume_path: it is not an absolute path"
            )));
        }
        let path = mounts::normalize(Path::new(path));
        match mounts::top_mount_at(&path).map_err(CsiError::io("reading the mount table"))? {
            Some(m) if m.fstype == FSTYPE => {}
            _ => {
                return Err(CsiError::NotFound(format!(
                    "volume {volume_id} is not mounted at {}",
                    path.display()
                )));
            }
        }
        let usage = |unit: Unit, total: u64, free: u64| VolumeUsage {
            available: i64::try_from(free).unwrap_or(i64::MAX),
            total: i64::try_from(total).unwrap_or(i64::MAX),
            used: i64::try_from(total.saturating_sub(free)).unwrap_or(i64::MAX),
            unit: unit as i32,
        };
        let health = mounts::probe(&path, PROBE_TIMEOUT).await;
        let served = self.mounter_status(&served_as).await;
        let dead = health.is_dead();
        let (usage, condition) = match health {
            Health::Ok {
                bytes_total,
                bytes_free,
                inodes_total,
                inodes_free,
            } => (
                vec![
                    usage(Unit::Bytes, bytes_total, bytes_free),
                    usage(Unit::Inodes, inodes_total, inodes_free),
                ],
                VolumeCondition {
                    abnormal: false,
                    message: healthy_message(served.as_ref()),
                },
            ),
            Health::Error(_, msg) => (
                vec![usage(Unit::Bytes, 0, 0)],
                VolumeCondition {
                    abnormal: true,
                    message: if dead {
                        let why = served
                            .as_ref()
                            .and_then(|s| s.ended.as_deref())
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default();
                        format!(
                            "the serving process of this volume is gone ({msg}){why}; restart the pod to mount it again"
                        )
                    } else {
                        format!("the volume answers an error: {msg}")
                    },
                },
            ),
            Health::NoAnswer => (
                vec![usage(Unit::Bytes, 0, 0)],
                VolumeCondition {
                    abnormal: true,
                    message: format!(
                        "the volume did not answer statfs within {} s",
                        PROBE_TIMEOUT.as_secs()
                    ),
                },
            ),
        };
        Ok(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        })
    }
}

/// The condition of a volume that answers: with the restarts of its serving process, if any.
fn healthy_message(served: Option<&handoff::VolumeStatus>) -> String {
    const OK: &str = "the volume is mounted and its serving process answers";
    let Some(s) = served.filter(|s| s.restarts > 0) else {
        return OK.into();
    };
    let last = match &s.last_restart {
        Some(r) => {
            let took = match r.ready_ms {
                Some(ms) => format!("its successor served after {ms} ms"),
                None => "its successor is starting".into(),
            };
            format!(
                "; the last at {} (the serving process {}; {took})",
                utc(r.at_unix),
                r.why
            )
        }
        None => String::new(),
    };
    format!(
        "{OK}; it was replaced {} time{} after dying without being asked{last}",
        s.restarts,
        if s.restarts == 1 { "" } else { "s" }
    )
}

/// Unix seconds as an RFC 3339 UTC time (`2026-12-04T10:00:00Z`).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The id of one pod's mount of a volume (`authenticationSource: pod`): its state record, its
/// serving process and its cache directory are its own.
fn pod_mount_id(volume_id: &str, target: &Path) -> String {
    format!(
        "{volume_id}#pod-{}",
        crate::volume_id::short_hash(&target.display().to_string())
    )
}

/// `namespace/name` of the pod a publish is for, as the kubelet says (`podInfoOnMount`).
fn subject_of(context: &std::collections::HashMap<String, String>) -> String {
    match (
        context.get(keys::POD_NAMESPACE),
        context.get(keys::POD_NAME),
    ) {
        (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => format!("{ns}/{name}"),
        _ => "an unnamed pod (set podInfoOnMount: true in the CSIDriver)".into(),
    }
}

/// The kubelet's `csi.storage.k8s.io/serviceAccount.tokens`: audience → token.
#[derive(serde::Deserialize)]
struct KubeletToken {
    token: String,
}

/// The web identity of the pod a publish is for: its token (for the audience the volume
/// names, or the only one), the role, the STS endpoint (default: the volume's endpoint, which
/// is where MinIO and Ceph RGW answer STS; else AWS's regional STS).
fn pod_web_identity(
    context: &std::collections::HashMap<String, String>,
    pod: &PodIdentity,
    volume_endpoint: Option<&str>,
) -> CsiResult<s3vol_s3::WebIdentity> {
    let raw = context
        .get(keys::SA_TOKENS)
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| {
            CsiError::FailedPrecondition(
                "authenticationSource is pod, but the kubelet passed no service-account token: \
                 the CSIDriver object needs tokenRequests (with the audience the STS expects) \
                 and requiresRepublish: true (the Helm chart sets both)"
                    .into(),
            )
        })?;
    // The error of a failed parse could quote the token: it is not repeated.
    let mut tokens: std::collections::BTreeMap<String, KubeletToken> = serde_json::from_str(raw)
        .map_err(|_| {
            CsiError::invalid(format!(
                "volume context {} is not the kubelet's JSON ({{audience: {{token, expirationTimestamp}}}})",
                keys::SA_TOKENS
            ))
        })?;
    let audiences = tokens.keys().cloned().collect::<Vec<_>>().join(", ");
    let token = match &pod.audience {
        Some(a) => match tokens.remove(a) {
            Some(t) => t.token,
            None => {
                return Err(CsiError::FailedPrecondition(format!(
                    "no service-account token for audience {a} (tokenAudience); the kubelet passed tokens for: {audiences}"
                )));
            }
        },
        None if tokens.len() <= 1 => tokens
            .into_values()
            .next()
            .map(|t| t.token)
            .unwrap_or_default(),
        None => {
            return Err(CsiError::invalid(format!(
                "the kubelet passed tokens for several audiences ({audiences}); set tokenAudience to the one the STS expects"
            )));
        }
    };
    if token.is_empty() {
        return Err(CsiError::invalid(
            "the pod's service-account token is empty",
        ));
    }
    let ns = context
        .get(keys::POD_NAMESPACE)
        .map(String::as_str)
        .unwrap_or("");
    let name = context
        .get(keys::POD_NAME)
        .map(String::as_str)
        .unwrap_or("");
    // STS's rule for session names: 2 to 64 of [A-Za-z0-9+=,.@_-].
    let mut session_name: String = format!("s3vol-{ns}-{name}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+=,.@_-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    session_name = session_name.trim_end_matches('-').to_owned();
    if session_name.len() < 2 {
        session_name = "s3vol".into();
    }
    Ok(s3vol_s3::WebIdentity {
        role_arn: pod.role_arn.clone(),
        token,
        sts_endpoint: pod
            .sts_endpoint
            .clone()
            .or_else(|| volume_endpoint.map(str::to_owned)),
        session_name,
        duration_seconds: pod.duration_seconds,
        subject: subject_of(context),
    })
}

/// Unmounts every s3vol mount stacked at `path`; a mount that is not s3vol's is left alone and
/// makes the call fail (FAILED_PRECONDITION), naming it.
fn unmount_ours(path: &Path) -> CsiResult<()> {
    mounts::unmount_s3vol(path).map_err(|e| match e {
        mounts::UnmountError::Foreign { fstype, what } => CsiError::FailedPrecondition(format!(
            "{} has a {fstype} mount ({what}) that is not s3vol's; it is left alone",
            path.display()
        )),
        mounts::UnmountError::Io(e) => CsiError::io(format!("unmounting {}", path.display()))(e),
    })
}

/// Removes a target directory publish may have created; if it cannot be removed (not empty),
/// takes every permission away so nothing is written there by mistake.
fn remove_target(target: &Path) {
    if matches!(mounts::top_mount_at(target), Ok(Some(_))) {
        return;
    }
    match std::fs::remove_dir(target) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            use std::os::unix::fs::PermissionsExt;
            tracing::warn!(target = %target.display(), error = %e, "cannot remove the target path after a failed publish; making it inaccessible");
            let _ = std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o000));
        }
    }
}

#[tonic::async_trait]
impl Node for Arc<NodeService> {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        self.stage(request.into_inner()).await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        self.unstage(request.into_inner()).await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        self.publish(request.into_inner()).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        self.unpublish(request.into_inner()).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Ok(Response::new(self.stats(request.into_inner()).await?))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            rpc::Type::StageUnstageVolume,
            rpc::Type::GetVolumeStats,
            rpc::Type::VolumeCondition,
            rpc::Type::SingleNodeMultiWriter,
            rpc::Type::VolumeMountGroup,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(
                node_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.config.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn pod() -> PodIdentity {
        PodIdentity {
            role_arn: "arn:aws:iam::1:role/r".into(),
            sts_endpoint: None,
            audience: None,
            duration_seconds: None,
        }
    }

    fn context(tokens: &str) -> HashMap<String, String> {
        HashMap::from([
            (keys::SA_TOKENS.to_owned(), tokens.to_owned()),
            (keys::POD_NAMESPACE.to_owned(), "apps".to_owned()),
            (keys::POD_NAME.to_owned(), "loader/7 d9".to_owned()),
        ])
    }

    #[test]
    fn unix_times_read_as_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_798_761_599), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn a_replaced_serving_process_shows_in_the_condition() {
        assert_eq!(
            healthy_message(None),
            "the volume is mounted and its serving process answers"
        );
        let s = handoff::VolumeStatus {
            pid: 7,
            failover: true,
            restarts: 2,
            last_restart: Some(handoff::RestartInfo {
                at_unix: 0,
                why: "killed by signal 9 (SIGKILL)".into(),
                ready_ms: Some(140),
            }),
            ended: None,
        };
        assert_eq!(
            healthy_message(Some(&s)),
            "the volume is mounted and its serving process answers; it was replaced 2 times \
             after dying without being asked; the last at 1970-01-01T00:00:00Z (the serving \
             process killed by signal 9 (SIGKILL); its successor served after 140 ms)"
        );
    }

    #[test]
    fn the_pods_token_role_endpoint_and_session_name() {
        let one = r#"{"sts.amazonaws.com":{"token":"TOKENSECRET","expirationTimestamp":"x"}}"#;
        let w = pod_web_identity(&context(one), &pod(), Some("http://minio:9000")).unwrap();
        assert_eq!(w.token, "TOKENSECRET");
        assert_eq!(w.role_arn, "arn:aws:iam::1:role/r");
        // STS on the volume's endpoint unless told otherwise (MinIO, Ceph RGW).
        assert_eq!(w.sts_endpoint.as_deref(), Some("http://minio:9000"));
        assert_eq!(w.session_name, "s3vol-apps-loader-7-d9");
        assert_eq!(w.subject, "apps/loader/7 d9");

        let two = r#"{"a":{"token":"TA"},"b":{"token":"TB"}}"#;
        let e = pod_web_identity(&context(two), &pod(), None).unwrap_err();
        assert!(matches!(&e, CsiError::InvalidArgument(m) if m.contains("tokenAudience")));
        let chosen = PodIdentity {
            audience: Some("b".into()),
            ..pod()
        };
        assert_eq!(
            pod_web_identity(&context(two), &chosen, None)
                .unwrap()
                .token,
            "TB"
        );
        let missing = PodIdentity {
            audience: Some("c".into()),
            ..pod()
        };
        let e = pod_web_identity(&context(two), &missing, None).unwrap_err();
        assert!(matches!(&e, CsiError::FailedPrecondition(m) if m.contains("a, b")));

        // No token: the CSIDriver lacks tokenRequests, and the error says so.
        let e = pod_web_identity(&HashMap::new(), &pod(), None).unwrap_err();
        assert!(matches!(&e, CsiError::FailedPrecondition(m) if m.contains("tokenRequests")));
        // A malformed token map is refused without quoting it.
        let e = pod_web_identity(&context("{\"a\": TOKENSECRET"), &pod(), None).unwrap_err();
        assert!(!format!("{e:?}").contains("TOKENSECRET"));
    }

    #[test]
    fn each_pods_mount_has_its_own_id() {
        let a = pod_mount_id("v", Path::new("/k/pods/a/volumes/x/mount"));
        let b = pod_mount_id("v", Path::new("/k/pods/b/volumes/x/mount"));
        assert_ne!(a, b);
        assert!(a.starts_with("v#pod-"));
    }
}
