//! The node plugin's copies of the failover volumes' connections, and what it does with them
//! when the mounter goes away.
//!
//! A FUSE connection lives as long as any process holds its `/dev/fuse` descriptor. The
//! mounter holds one for each failover volume and replaces a serving process that dies; this
//! is for the mounter's own end — killed (with its container: its serving processes go with
//! it), out of memory, or replaced by an upgrade of its DaemonSet. The node plugin keeps a
//! second copy of each connection, with the volume's configuration and newest credentials
//! (the keys or token it was staged, or last republished, with) and the session directory the
//! mounter named, so the mounts only stall while no mounter serves them: the kernel queues
//! their requests, and the requests a dying serving process had read are sent again to its
//! successor (`FUSE_NOTIFY_RESEND`).
//!
//! [`NodeService::tend_connections`] runs every [`TEND_INTERVAL`]: it asks the mounter which
//! volumes it knows ([`handoff::Request::Volumes`]) and
//! - hands every kept connection the mounter does not know to it with
//!   [`MountRequest::adopt`] (a new mounter, or one restarted): its serving process adopts the
//!   connection from the journal in the session directory, as a successor does;
//! - lets go of the copies of volumes whose serving process ended for good (failover off,
//!   restarts exhausted), so their mounts answer ENOTCONN instead of hanging;
//! - after a restart of the node plugin, takes its copies up again from the mounter
//!   ([`handoff::Request::Reclaim`]): the mounter's copies kept the volumes alive meanwhile.
//!
//! A connection the mounter refuses [`MAX_HANDOVER_FAILURES`] times in a row (its session
//! directory gone, say) is let go of, with the reason in the log; its mount then answers
//! ENOTCONN and the sweep unmounts it so the kubelet can stage the volume again. A copy is
//! also let go of when its volume is unstaged or unpublished ([`Keeper::release`]).
//!
//! Every volume list request says which copies this node plugin holds, so that a mounter
//! shutting down keeps its own copies until a node plugin holds them (see `mounter`). While
//! that mounter drains (its answer says `draining`) nothing is handed to it; a node plugin
//! started meanwhile takes its copies from it as after any restart. And the node plugin does
//! not exit while it may hold the only copies: at SIGTERM ([`NodeService::before_exit`]) it
//! waits, up to [`EXIT_WAIT`], until a mounter that serves (or one draining, which keeps its
//! copies for the next node plugin) knows every kept connection, handing over what it must.
//! So a rollout of both DaemonSets at once, in any order, loses no connection.
//!
//! What is not covered: the node plugin and the mounter killed together (`kill -9`, a node
//! crash: nobody holds the connections any more), and a kubelet that delays the restart of a
//! crashed mounter container (its crash-loop back-off): the mounts stall until a mounter
//! answers again.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::NodeService;
use crate::handoff::{self, MountRequest};

/// How often the mounter is asked which volumes it knows.
pub(super) const TEND_INTERVAL: Duration = Duration::from_millis(200);

/// Refusals in a row after which a kept connection is let go of.
pub(super) const MAX_HANDOVER_FAILURES: u32 = 3;

/// How long, at SIGTERM, the node plugin waits for a mounter to hold its kept connections
/// (with the 10 s the CSI server gives calls in progress, below the pod's default termination
/// grace period of 30 s).
pub const EXIT_WAIT: Duration = Duration::from_secs(15);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One kept connection.
struct Kept {
    conn: handoff::Connection,
    /// Credentials included; `adopt` unset.
    request: MountRequest,
    session_dir: PathBuf,
    failures: u32,
}

#[derive(Default)]
struct Inner {
    kept: HashMap<String, Kept>,
    /// The mounter process last seen answering.
    instance: Option<String>,
    /// Since when the mounter does not answer, while connections are kept.
    silent_since: Option<Instant>,
    /// Volumes whose connection was asked back from the mounter of `instance`.
    reclaimed_from: HashSet<String>,
}

/// The kept connections (see the module docs).
#[derive(Default)]
pub(super) struct Keeper {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = lock(&self.inner);
        f.debug_struct("Keeper")
            .field("kept", &inner.kept.keys().collect::<Vec<_>>())
            .field("instance", &inner.instance)
            .finish()
    }
}

impl Keeper {
    /// Keeps a copy of the connection of `request.volume_id`.
    pub(super) fn keep(
        &self,
        conn: handoff::Connection,
        mut request: MountRequest,
        session_dir: PathBuf,
    ) {
        request.adopt = None;
        let id = request.volume_id.clone();
        tracing::debug!(volume = %id, session = %session_dir.display(), "keeping a copy of the volume's connection");
        lock(&self.inner).kept.insert(
            id,
            Kept {
                conn,
                request,
                session_dir,
                failures: 0,
            },
        );
    }

    /// Lets go of the copy of a volume's connection (unstaged, unpublished, or its mount
    /// replaced); `true` if there was one.
    pub(super) fn release(&self, volume_id: &str) -> bool {
        lock(&self.inner).kept.remove(volume_id).is_some()
    }

    /// Whether a copy of the volume's connection is kept.
    pub(super) fn holds(&self, volume_id: &str) -> bool {
        lock(&self.inner).kept.contains_key(volume_id)
    }

    /// New credentials the volume's serving process took: the next mounter's gets them too.
    pub(super) fn update_identity(&self, volume_id: &str, identity: &s3vol_s3::IdentityDocument) {
        if let Some(k) = lock(&self.inner).kept.get_mut(volume_id) {
            // The old ones are zeroed, not just dropped.
            if let Some(c) = &mut k.request.credentials {
                handoff::wipe(c);
            }
            if let Some(w) = &mut k.request.web_identity {
                w.wipe();
            }
            match identity.clone() {
                s3vol_s3::IdentityDocument::Keys(c) => k.request.credentials = Some(c),
                s3vol_s3::IdentityDocument::WebIdentity { web_identity } => {
                    k.request.web_identity = Some(web_identity)
                }
            }
        }
    }

    /// The mount request that hands the kept connection of `volume_id` to a mounter, and a
    /// copy of the connection to send with it.
    fn handover(&self, volume_id: &str) -> Option<(handoff::Request, handoff::Connection)> {
        let inner = lock(&self.inner);
        let k = inner.kept.get(volume_id)?;
        let fd = k.conn.try_clone().ok()?;
        let mut request = k.request.clone();
        request.adopt = Some(k.session_dir.clone());
        Some((handoff::Request::Mount(Box::new(request)), fd))
    }

    /// A handover failed; `true` once that happened [`MAX_HANDOVER_FAILURES`] times in a row
    /// (the copy is then let go of).
    fn handover_failed(&self, volume_id: &str) -> bool {
        let mut inner = lock(&self.inner);
        let Some(k) = inner.kept.get_mut(volume_id) else {
            return false;
        };
        k.failures += 1;
        if k.failures >= MAX_HANDOVER_FAILURES {
            inner.kept.remove(volume_id);
            return true;
        }
        false
    }

    fn handover_done(&self, volume_id: &str, session_dir: Option<PathBuf>) {
        if let Some(k) = lock(&self.inner).kept.get_mut(volume_id) {
            k.failures = 0;
            if let Some(dir) = session_dir {
                k.session_dir = dir;
            }
        }
    }

    fn ids(&self) -> Vec<String> {
        lock(&self.inner).kept.keys().cloned().collect()
    }
}

/// The lock key of a state record's id: a pod's own mount (`VOLUME#pod-…`) is serialised with
/// the calls on its volume.
fn lock_key(id: &str) -> &str {
    id.split_once("#pod-").map_or(id, |(v, _)| v)
}

impl NodeService {
    /// One look at the mounter (see the module docs).
    pub(super) async fn tend_connections(&self) {
        {
            let inner = lock(&self.kept.inner);
            if inner.kept.is_empty() && inner.instance.is_some() {
                // Nothing to hand over, and the copies of a restart were asked back already.
                return;
            }
        }
        let answer = self.volume_list(false).await;
        let reply = match answer {
            Some(Ok(r)) if r.ok => r,
            // An older mounter shutting down (its volumes wait for the next one), or one that
            // does not know the request: nothing to do yet.
            Some(Ok(_)) => return,
            Some(Err(_)) | None => {
                let mut inner = lock(&self.kept.inner);
                if !inner.kept.is_empty() && inner.silent_since.is_none() {
                    inner.silent_since = Some(Instant::now());
                    tracing::warn!(
                        volumes = inner.kept.len(),
                        socket = %self.config.mounter_socket.display(),
                        "the mounter does not answer; its volumes stall (nothing fails) until a mounter answers and takes them up"
                    );
                }
                return;
            }
        };
        let known: HashMap<String, bool> = reply
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| (v.volume_id, v.ended))
            .collect();
        let (silent_for, new_mounter) = {
            let mut inner = lock(&self.kept.inner);
            let new_mounter = inner.instance != reply.instance;
            if new_mounter {
                inner.instance = reply.instance.clone();
                inner.reclaimed_from.clear();
            }
            (inner.silent_since.take().map(|t| t.elapsed()), new_mounter)
        };
        if reply.draining {
            // It takes nothing and hands out copies until a node plugin holds them all.
            if new_mounter {
                self.reclaim_connections(&known).await;
            }
            return;
        }
        let mut handed = 0;
        for id in self.kept.ids() {
            match known.get(&id) {
                Some(false) => {}
                Some(true) => {
                    if self.kept.release(&id) {
                        tracing::warn!(volume = %id, "the volume's serving process ended for good at the mounter; letting go of the node plugin's copy of its connection, so its mount answers ENOTCONN");
                    }
                }
                None => {
                    let _guard = self.locks.lock(lock_key(&id)).await;
                    if self.hand_over(&id, silent_for).await {
                        handed += 1;
                    }
                }
            }
        }
        if handed > 0 {
            // What earlier mounters left and nobody took up goes.
            self.prune_cache_dirs();
        }
        if new_mounter {
            // This node plugin's first look at this mounter: after a restart of the plugin, the
            // mounter holds the only copies.
            self.reclaim_connections(&known).await;
        }
    }

    /// Asks the mounter for its volume list, saying which copies this node plugin holds and
    /// whether it is `leaving`.
    async fn volume_list(&self, leaving: bool) -> Option<io::Result<handoff::Reply>> {
        let socket = self.config.mounter_socket.clone();
        let request = handoff::Request::Volumes {
            held: Some(self.kept.ids()),
            leaving,
        };
        tokio::task::spawn_blocking(move || {
            handoff::call(&socket, &request, &[], Duration::from_secs(2))
        })
        .await
        .ok()
    }

    /// Before the node plugin exits (SIGTERM): waits, up to `EXIT_WAIT` (15 s), until no kept
    /// connection depends on this process alone — a serving mounter knows every one (what it
    /// does not know is handed to it), or the mounter is draining (it keeps its copies until
    /// the next node plugin takes them). Returns at once when nothing is kept. The tending
    /// task (`tend_connections`) goes on meanwhile and does the handing over.
    pub async fn before_exit(&self) {
        let deadline = Instant::now() + EXIT_WAIT;
        let mut said = false;
        loop {
            let kept = self.kept.ids();
            if kept.is_empty() {
                return;
            }
            match self.volume_list(true).await {
                Some(Ok(r)) if r.ok && r.draining => {
                    tracing::info!(
                        volumes = kept.len(),
                        "exiting: the mounter is shutting down too and keeps the connections for the next node plugin"
                    );
                    return;
                }
                Some(Ok(r)) if r.ok => {
                    let known: HashSet<String> = r
                        .volumes
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|v| !v.ended)
                        .map(|v| v.volume_id)
                        .collect();
                    if kept.iter().all(|id| known.contains(id)) {
                        if said {
                            tracing::info!(
                                volumes = kept.len(),
                                "the mounter holds every connection now; exiting"
                            );
                        }
                        return;
                    }
                    // A new mounter that has not been handed everything yet: the tending
                    // task, which runs on, hands it over.
                }
                _ => {}
            }
            if !said {
                said = true;
                tracing::warn!(
                    volumes = kept.len(),
                    wait_s = EXIT_WAIT.as_secs(),
                    "this node plugin may hold the only copies of these connections (no mounter serves them): waiting for a mounter to take them before exiting"
                );
            }
            if Instant::now() >= deadline {
                tracing::error!(
                    volumes = ?kept,
                    "exiting with the only copies of these connections: no mounter took them; their mounts answer ENOTCONN until staged again"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Hands the kept connection of `id` to the mounter; `true` if it took it up.
    async fn hand_over(&self, id: &str, silent_for: Option<Duration>) -> bool {
        let Some((request, fd)) = self.kept.handover(id) else {
            return false;
        };
        let socket = self.config.mounter_socket.clone();
        // The mounter may first have to end an earlier mounter's serving process, which
        // uploads what it holds (bounded by its stop timeout).
        let timeout = self.config.mount_timeout + Duration::from_secs(60);
        let started = Instant::now();
        let answer = tokio::task::spawn_blocking(move || {
            handoff::call(&socket, &request, &fd.fds(), timeout)
        })
        .await;
        let failure = match answer {
            Ok(Ok(r)) if r.ok => {
                self.kept.handover_done(id, r.session_dir);
                if let Ok(Some(mut record)) = self.state.load(id) {
                    record.pid = r.pid;
                    if let Err(e) = self.state.save(&record) {
                        tracing::warn!(volume = %id, error = %e, "recording the new serving process");
                    }
                }
                metrics::counter!("s3vol_node_connection_handovers_total").increment(1);
                tracing::warn!(
                    volume = %id,
                    pid = ?r.pid,
                    took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    mounter_silent_ms = silent_for.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    "handed the volume's connection to a new mounter; its serving process took it over"
                );
                return true;
            }
            Ok(Ok(r)) => r.error.unwrap_or_else(|| "no reason given".into()),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        if self.kept.handover_failed(id) {
            tracing::error!(volume = %id, error = %failure, "the mounter refused the volume's connection {MAX_HANDOVER_FAILURES} times; letting go of it, so its mount answers ENOTCONN (the kubelet stages it again)");
        } else {
            tracing::warn!(volume = %id, error = %failure, "handing the volume's connection to the mounter failed; trying again");
        }
        false
    }

    /// Takes up again, from the mounter, the connections of staged volumes this node plugin
    /// holds no copy of (it was restarted): once per volume and mounter. Volumes staged by
    /// this plugin while the mounter was the same are kept since their stage.
    async fn reclaim_connections(&self, known: &HashMap<String, bool>) {
        let Ok(records) = self.state.load_all() else {
            return;
        };
        for id in records.into_keys() {
            if known.get(&id) != Some(&false) || self.kept.holds(&id) {
                continue;
            }
            if !lock(&self.kept.inner).reclaimed_from.insert(id.clone()) {
                continue;
            }
            let socket = self.config.mounter_socket.clone();
            let request = handoff::Request::Reclaim(handoff::StatusRequest {
                volume_id: id.clone(),
            });
            let answer = tokio::task::spawn_blocking(move || {
                handoff::call_for_fds(&socket, &request, &[], Duration::from_secs(5))
            })
            .await;
            match answer {
                Ok(Ok((r, fds))) if r.ok && !fds.is_empty() => {
                    let Some(fd) = handoff::Connection::from_fds(fds) else {
                        continue;
                    };
                    let (Some(request), Some(dir)) = (r.request, r.session_dir) else {
                        continue;
                    };
                    let _guard = self.locks.lock(lock_key(&id)).await;
                    if matches!(self.state.load(&id), Ok(Some(_))) {
                        self.kept.keep(fd, *request, dir);
                        tracing::info!(volume = %id, "took up again a copy of the volume's connection from the mounter");
                    }
                }
                // Failover is off for it, or the mounter is older: nothing to keep.
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_mount_is_serialised_with_its_volume() {
        assert_eq!(lock_key("vol-1#pod-0123456789abcdef"), "vol-1");
        assert_eq!(lock_key("bucket:b/p"), "bucket:b/p");
    }
}
