//! Taking over from a dead predecessor: the session journal (`journal.rs`) back into the
//! inode table and the handle table, so a successor answers the kernel about every node ID
//! and handle it still holds.
//!
//! What comes back: node IDs with their names and keys (attributes are read from S3 again
//! when asked), file handles with their mode and, for readers, the object version (ETag and
//! size) they read at open, so a file open across the event keeps reading the same version
//! or fails with `EIO` if it changed (as without the event). Directory handles come back as
//! new listings. The predecessor's staging files with data not in S3 were uploaded by the
//! cache-directory scan of [`S3Fs::new`] before this runs (its lock died with it), so a file
//! open for writing continues from the object that now holds every byte it wrote.

use std::io;
use std::path::Path;

use super::*;
use crate::journal::{HandleRec, Journal};

/// What a successor took over.
#[derive(Debug, Default)]
pub struct Adopted {
    /// The INIT reply the predecessor negotiated (JSON written by the FUSE adapter).
    pub init: Option<String>,
    pub nodes: usize,
    pub file_handles: usize,
    pub dir_handles: usize,
}

impl S3Fs {
    /// Records node IDs and handles in a new, empty journal in `dir` (the first server of a
    /// connection).
    pub fn journal_to(&self, dir: &Path) -> io::Result<()> {
        let journal = Journal::create(dir)?;
        self.inodes.set_journal(Arc::new(journal));
        Ok(())
    }

    /// Records the negotiated INIT reply.
    pub fn journal_init(&self, init: &str) {
        if let Some(j) = self.inodes.journal() {
            j.init(init);
        }
    }

    /// Takes over the connection a dead predecessor served: reads its journal in `dir`,
    /// rebuilds the node and handle tables, and goes on journaling (compacted) there.
    pub async fn adopt(&self, dir: &Path) -> io::Result<Adopted> {
        let snap = Journal::read(dir)?;
        let keys = snap.keys(&self.config.prefix);
        for (&ino, n) in &snap.nodes {
            let attrs = Attrs::defaults(n.kind, &self.config, 0, self.mount_time);
            // A node under an unlinked directory has no key any more; it keeps its number.
            let key = keys.get(&ino).cloned().unwrap_or_default();
            let name = n.name.clone().filter(|_| keys.contains_key(&ino));
            self.inodes.adopt(ino, n.parent, name, key, attrs);
        }
        let (_, max_fh) = snap.max_ids();
        self.next_fh.fetch_max(max_fh + 1, Ordering::Relaxed);
        let mut adopted = Adopted {
            init: snap.init.clone(),
            nodes: snap.nodes.len(),
            ..Adopted::default()
        };
        for (&fh, h) in &snap.handles {
            match h {
                HandleRec::Dir { ino } => {
                    let Ok((_, prefix)) = self.dir_key(*ino) else {
                        continue;
                    };
                    let stream = DirStream::new(*ino, prefix);
                    self.handles
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(fh, Handle::Dir(Arc::new(tokio::sync::Mutex::new(stream))));
                    adopted.dir_handles += 1;
                }
                HandleRec::File {
                    ino,
                    write,
                    append,
                    size,
                    etag,
                } => {
                    let Some(inode) = self.inodes.get(*ino) else {
                        continue;
                    };
                    self.refresh_adopted_file(&inode, *write).await;
                    let key = inode.key();
                    let reader = match (write, etag) {
                        (false, Some(etag)) => Some(Reader::new(
                            self.read.clone(),
                            key,
                            ETag(etag.clone()),
                            *size,
                        )),
                        _ => None,
                    };
                    inode.state().open_handles += 1;
                    let handle = FileHandle {
                        inode,
                        mode: OpenMode {
                            write: *write,
                            truncate: false,
                            append: *append,
                        },
                        reader: tokio::sync::Mutex::new(reader),
                    };
                    self.handles
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(fh, Handle::File(Arc::new(handle)));
                    adopted.file_handles += 1;
                }
            }
        }
        let journal = Journal::write_snapshot(dir, &snap)?;
        self.inodes.set_journal(Arc::new(journal));
        Ok(adopted)
    }

    /// The attributes and version of a file open across the event. A file the predecessor
    /// created and never wrote has no object and no staging file: it is a new empty file
    /// again (what the application saw).
    async fn refresh_adopted_file(&self, inode: &Arc<Inode>, write: bool) {
        if inode.state().validated.is_some() || inode.kind != Kind::File {
            return;
        }
        let key = inode.key();
        match self.store.head_object(&self.config.bucket, &key).await {
            Ok(info) => {
                let (attrs, etag, _) = self.file_attrs(&info);
                let mut s = inode.state();
                s.attrs = attrs;
                s.etag = etag;
                s.validated = Some(Instant::now());
            }
            Err(e) if not_found(&e) && write && !inode.state().unlinked => {
                match Staged::new_empty(self.stage.clone(), &key, None) {
                    Ok(staged) => {
                        let mut s = inode.state();
                        s.local_only = true;
                        s.attrs.size = 0;
                        s.validated = Some(Instant::now());
                        s.staged = Some(Arc::new(tokio::sync::Mutex::new(staged)));
                    }
                    Err(e) => tracing::warn!(key, error = %e, "cannot stage an adopted file"),
                }
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "a file open across a restart cannot be found in S3; its handles fail");
            }
        }
    }

    /// The inode this mount knows at `parent/name`, without asking S3.
    pub fn known_child(&self, parent: InodeNo, name: &str) -> Option<Arc<Inode>> {
        self.inodes.child(parent, name)
    }

    /// A resent rename that found its source gone: if the target is there, the dead
    /// predecessor did the rename and died before answering. The kernel then moves its node
    /// `source` (what it knew at the old name) to the new name, so this mount must too: the
    /// node's key becomes the target's. Returns whether the rename was done.
    pub async fn resent_rename_done(
        &self,
        source: Option<Arc<Inode>>,
        new_parent: InodeNo,
        new_name: &str,
    ) -> bool {
        let Ok((target, _)) = self.lookup(new_parent, new_name).await else {
            return false;
        };
        self.inodes.forget(target.ino, 1);
        if let Some(src) = source
            && src.ino != target.ino
            && src.kind == target.kind
        {
            let (old_key, new_key) = (src.key(), target.key());
            self.inodes
                .relink(&src, new_parent, new_name, new_key.clone());
            if src.kind == Kind::Dir {
                self.inodes.rekey_subtree(&old_key, &new_key);
            }
            let mut s = src.state();
            s.validated = None;
            s.etag = None;
        }
        self.dir_changed(new_parent);
        true
    }

    /// The attributes of an adopted directory: probed once, as a lookup would.
    pub(super) async fn refresh_adopted_dir(&self, inode: &Arc<Inode>) -> FsResult<Attrs> {
        let key = inode.key();
        match self.probe(key.trim_end_matches('/')).await? {
            Some((attrs, _, has_marker)) if attrs.kind == Kind::Dir => {
                let mut s = inode.state();
                s.attrs = attrs;
                s.has_marker = has_marker;
                s.validated = Some(Instant::now());
                Ok(s.attrs.clone())
            }
            // Gone, or a file now: what the kernel holds is stale.
            _ => Err(err!(libc::ENOENT, "{key}: gone")),
        }
    }
}
