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
        let read_at_start = self
            .predecessor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .filter(|_| self.config.session_dir.as_deref() == Some(dir));
        let snap = match read_at_start {
            Some(snap) => snap,
            None => Journal::read(dir)?,
        };
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
        // What the scan left for handles that turned out not to take it: recovered as the
        // scan would have (before anything is served, as the scan).
        let left = std::mem::take(
            &mut *self
                .deferred_at_start
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for (stem, _) in left {
            recover::recover_left(&self.stage, &stem).await;
        }
        let journal = Journal::write_snapshot(dir, &snap)?;
        self.inodes.set_journal(Arc::new(journal));
        Ok(adopted)
    }

    /// A file open for writing across the event goes on from what its predecessor left of it,
    /// as it would have without the event: from the entry the start-up scan took over for it
    /// ([`recover::scan`]: the scan does not upload those, so no other client sees the file
    /// before the application's flush), or from one the scan kept because S3 could not take it
    /// then. A stream goes on in the same multipart upload ([`Staged::continued`]); a staging
    /// file goes on as one ([`Staged::recovered`]) and its next flush uploads it (or fails,
    /// keeping it, as any flush). Otherwise the handles go on from the object as S3 has it.
    /// The newest entry of the key is taken; `true` if one was.
    async fn attach_left(&self, inode: &Arc<Inode>) -> bool {
        use crate::cache_dir::stem_with_ext;
        let key = inode.key();
        let newest = |list: &Mutex<Vec<(std::path::PathBuf, String)>>| {
            let mut list = list.lock().unwrap_or_else(|e| e.into_inner());
            let newest = list
                .iter()
                .enumerate()
                .filter(|(_, (_, k))| *k == key)
                .max_by_key(|(_, (stem, _))| {
                    std::fs::metadata(stem_with_ext(stem, "meta"))
                        .and_then(|m| m.modified())
                        .ok()
                })
                .map(|(i, _)| i);
            newest.map(|i| list.remove(i).0)
        };
        if let Some(stem) = newest(&self.deferred_at_start) {
            if self.attach_entry(inode, &stem, false).await {
                return true;
            }
            // Not to be gone on from here: recovered now, as the scan would have.
            recover::recover_left(&self.stage, &stem).await;
            return false;
        }
        let Some(old) = newest(&self.kept_at_start) else {
            return false;
        };
        // The entry becomes this process's (its files renamed to a stem of this instance), so
        // that no other mount sharing the cache directory takes it for a dead process's while
        // it is written here. Data first: a crash in between leaves the bytes under one stem
        // or the other, never deleted.
        let stem = self.stage.cache.new_stem();
        for ext in ["data", "meta", "key"] {
            let moved = std::fs::rename(stem_with_ext(&old, ext), stem_with_ext(&stem, ext));
            if let Err(e) = moved
                && (ext == "meta" || e.kind() != io::ErrorKind::NotFound)
            {
                tracing::warn!(key, staging_file = %stem_with_ext(&old, ext).display(), error = %e, "cannot take over a kept staging file");
                return false;
            }
        }
        self.attach_entry(inode, &stem, true).await
    }

    /// Makes the entry `stem` of this instance the staged state of `inode` (see
    /// [`S3Fs::attach_left`]). An entry the scan `kept` is taken only when the object is still
    /// the version it started from: one kept because another client changed the object is a
    /// conflict to report, not a base to write on. `false`, with nothing changed, when it is
    /// not taken.
    async fn attach_entry(&self, inode: &Arc<Inode>, stem: &Path, kept: bool) -> bool {
        use crate::cache_dir::{Entry, Record, stem_with_ext};
        let key = inode.key();
        let record = std::fs::read_to_string(stem_with_ext(stem, "meta"))
            .ok()
            .and_then(|t| Record::parse(&t))
            .filter(|r| r.bucket == self.config.bucket.as_str() && r.key == key);
        let Some(record) = record else {
            return false;
        };
        let head = self.store.head_object(&self.config.bucket, &key).await;
        let base = record.base.as_ref().map(|b| b.etag.trim_matches('"'));
        if kept {
            match &head {
                Ok(info) if base != Some(info.etag.as_str().trim_matches('"')) => return false,
                Err(e) if not_found(e) && base.is_some() => return false,
                _ => {}
            }
        }
        let data = std::fs::File::options()
            .read(true)
            .write(true)
            .open(stem_with_ext(stem, "data"));
        let entry = match data {
            Ok(data) => Entry::adopt(stem.to_owned(), data),
            Err(_) => Entry::found(stem.to_owned()),
        };
        let streamed = record.part_size > 0;
        let staged = if streamed {
            Staged::continued(self.stage.clone(), entry, &record).await
        } else {
            let len = entry
                .file()
                .and_then(|f| f.metadata().ok())
                .map(|m| m.len());
            len.map(|len| Staged::recovered(self.stage.clone(), entry, &record, len))
        };
        let Some(staged) = staged else {
            return false;
        };
        let size = staged.size();
        let mut s = inode.state();
        s.attrs = match (&head, staged.recorded_metadata()) {
            (Ok(info), _) => self.file_attrs(info).0,
            (Err(_), Some(m)) => {
                Attrs::decode(Kind::File, m, &self.config, size, SystemTime::now())
            }
            (Err(_), None) => s.attrs.clone(),
        };
        s.attrs.size = size;
        s.etag = record.base.as_ref().map(|b| ETag(b.etag.clone()));
        s.local_only = head.is_err() && record.base.is_none();
        s.validated = Some(Instant::now());
        s.staged = Some(Arc::new(tokio::sync::Mutex::new(staged)));
        if streamed {
            tracing::warn!(
                key,
                size,
                upload_id = record.upload_id.as_deref().unwrap_or("none yet"),
                "a streamed file open for writing across the restart goes on where it was: \
                 its bytes in part buffers again, the same multipart upload if it had one, \
                 nothing of it in S3 before its next flush"
            );
        } else {
            tracing::warn!(
                key,
                size,
                staging_file = %stem_with_ext(stem, "data").display(),
                "a file open for writing across the restart goes on from what the cache \
                 directory kept of it (not in S3 yet); its next flush uploads it"
            );
        }
        true
    }

    /// The attributes and version of a file open across the event. A file the predecessor
    /// created and never wrote has no object and no staging file: it is a new empty file
    /// again (what the application saw).
    async fn refresh_adopted_file(&self, inode: &Arc<Inode>, write: bool) {
        if inode.state().validated.is_some() || inode.kind != Kind::File {
            return;
        }
        if write && self.attach_left(inode).await {
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
