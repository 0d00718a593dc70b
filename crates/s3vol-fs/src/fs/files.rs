//! Files: open, read, write, flush and release, unlink, symlinks, and what happens to files
//! with changes not in S3 when the process exits.
//!
//! Data goes through [`Staged`] (streamed uploads and staging files, `stage.rs`) or, for a
//! clean file, a [`Reader`] (`read.rs`). A handle reads its file's staged copy when there is
//! one, so readers in this mount see writes at once. A file unlinked while open keeps its
//! content for its handles: it is made local first (see [`S3Fs::unlink`]).

use super::*;

impl S3Fs {
    /// The staging file of an inode, made if needed: empty when `empty`, else from the object.
    pub(super) async fn staged_for_write(
        &self,
        inode: &Arc<Inode>,
        empty: bool,
    ) -> FsResult<Arc<tokio::sync::Mutex<Staged>>> {
        if let Some(s) = inode.state().staged.clone() {
            return Ok(s);
        }
        let key = inode.key();
        let staged = if empty || inode.state().local_only {
            let replacing = inode.state().etag.clone();
            Staged::new_empty(self.stage.clone(), &key, replacing)?
        } else {
            // Close-to-open: stage from the object as it is now.
            let info = self.store.head_object(&self.config.bucket, &key).await?;
            {
                let mut s = inode.state();
                let (attrs, etag, _) = self.file_attrs(&info);
                s.attrs = attrs;
                s.etag = etag;
            }
            if let Some(parked) = self.reuse_parked(inode, &info.etag) {
                let mut s = inode.state();
                if let Some(existing) = s.staged.clone() {
                    return Ok(existing);
                }
                s.staged = Some(parked.clone());
                return Ok(parked);
            }
            Staged::from_object(
                self.stage.clone(),
                &key,
                Base {
                    etag: info.etag,
                    size: info.size,
                },
            )?
        };
        let staged = Arc::new(tokio::sync::Mutex::new(staged));
        let mut s = inode.state();
        // Another opener may have won the race.
        if let Some(existing) = s.staged.clone() {
            return Ok(existing);
        }
        s.staged = Some(staged.clone());
        Ok(staged)
    }

    pub(super) fn new_handle(
        &self,
        inode: Arc<Inode>,
        mode: OpenMode,
        reader: Option<Reader>,
    ) -> u64 {
        inode.state().open_handles += 1;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        if let Some(j) = self.inodes.journal() {
            let (size, etag) = match &reader {
                Some(r) => (r.size(), Some(r.etag().0.clone())),
                None => (0, None),
            };
            j.opened(
                fh,
                &crate::journal::HandleRec::File {
                    ino: inode.ino,
                    write: mode.write,
                    append: mode.append,
                    size,
                    etag,
                },
            );
        }
        let handle = FileHandle {
            inode,
            mode,
            reader: tokio::sync::Mutex::new(reader),
        };
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Handle::File(Arc::new(handle)));
        fh
    }

    pub(super) fn file_handle(&self, fh: u64) -> FsResult<Arc<FileHandle>> {
        match self
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh)
        {
            Some(Handle::File(f)) => Ok(f.clone()),
            _ => Err(err!(libc::EBADF, "bad file handle {fh}")),
        }
    }

    pub async fn open(&self, ino: InodeNo, mode: OpenMode) -> FsResult<u64> {
        let inode = self.inode(ino)?;
        if inode.kind == Kind::Dir {
            return Err(err!(libc::EISDIR, "directory"));
        }
        if mode.write {
            self.ro()?;
            let staged = self.staged_for_write(&inode, mode.truncate).await?;
            if mode.truncate {
                staged.lock().await.truncate(0).await?;
                let mut s = inode.state();
                s.attrs.size = 0;
                s.attrs.mtime = SystemTime::now();
                s.attrs.ctime = s.attrs.mtime;
            }
            return Ok(self.new_handle(inode, mode, None));
        }
        let (staged, local_only) = {
            let s = inode.state();
            (s.staged.is_some(), s.local_only)
        };
        if staged || local_only {
            return Ok(self.new_handle(inode, mode, None));
        }
        // Close-to-open: see the object as it is now.
        let key = inode.key();
        let info = match self.store.head_object(&self.config.bucket, &key).await {
            Ok(info) => info,
            Err(e) if not_found(&e) => return Err(err!(libc::ENOENT, "{key}: gone")),
            Err(e) => return Err(e.into()),
        };
        {
            let (attrs, etag, _) = self.file_attrs(&info);
            let mut s = inode.state();
            s.attrs = attrs;
            s.etag = etag;
            s.validated = Some(Instant::now());
        }
        if let Some(parked) = self.reuse_parked(&inode, &info.etag) {
            // The local copy is this very version: read it from disk.
            inode.state().staged.get_or_insert(parked);
            return Ok(self.new_handle(inode, mode, None));
        }
        let reader = Reader::new(self.read.clone(), key, info.etag, info.size);
        Ok(self.new_handle(inode, mode, Some(reader)))
    }

    pub async fn create(
        &self,
        parent: InodeNo,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        open: OpenMode,
    ) -> FsResult<(Arc<Inode>, Attrs, u64)> {
        self.ro()?;
        name_ok(name)?;
        let mut changing = self.changing(parent, parent);
        let (parent_inode, parent_key) = self.dir_key(parent)?;
        let (gid, _) = Self::new_gid(&parent_inode, gid);
        if let Some(existing) = self.inodes.child(parent, name)
            && !existing.state().unlinked
            && existing.kind == Kind::Dir
        {
            return Err(err!(libc::EISDIR, "{name} is a directory"));
        }
        let key = format!("{parent_key}{name}");
        let mut attrs = Attrs::defaults(Kind::File, &self.config, 0, SystemTime::now());
        attrs.perm = (mode & 0o7777) as u16;
        attrs.uid = uid;
        attrs.gid = gid;
        let inode = self
            .inodes
            .upsert(parent, name, key.clone(), attrs, None, false, true, true);
        {
            let mut s = inode.state();
            s.local_only = true;
            s.unlinked = false;
            s.attrs.size = 0;
        }
        let staged = Arc::new(tokio::sync::Mutex::new(Staged::new_empty(
            self.stage.clone(),
            &key,
            None,
        )?));
        let old = inode.state().staged.replace(staged);
        if let Some(old) = old {
            old.lock().await.discard().await;
        }
        self.set_negative(parent, name, false);
        changing.added(name, &inode);
        let attrs = self.attrs_of(&inode);
        let fh = self.new_handle(
            inode.clone(),
            OpenMode {
                write: true,
                ..open
            },
            None,
        );
        Ok((inode, attrs, fh))
    }

    /// Answers a read of a clean file from data already received, without waiting; `None`
    /// when that is not possible (call [`S3Fs::read`]). Must run inside the tokio runtime's
    /// context (it may start prefetches).
    pub fn try_read(&self, fh: u64, offset: u64, size: u32) -> Option<FsResult<Bytes>> {
        let handle = self.file_handle(fh).ok()?;
        if handle.inode.state().staged.is_some() {
            return None;
        }
        let mut reader = handle.reader.try_lock().ok()?;
        reader.as_mut()?.try_read(offset, u64::from(size))
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let handle = self.file_handle(fh)?;
        let staged = handle.inode.state().staged.clone();
        if let Some(staged) = staged {
            return staged.lock().await.read(offset, u64::from(size)).await;
        }
        let mut reader = handle.reader.lock().await;
        match reader.as_mut() {
            Some(r) => r.read(offset, u64::from(size)).await,
            None => {
                // Opened while staged, and the staged copy is gone since: read the object.
                let key = handle.inode.key();
                let (etag, size_now) = {
                    let s = handle.inode.state();
                    (s.etag.clone(), s.attrs.size)
                };
                let Some(etag) = etag else {
                    return Err(err!(libc::EIO, "{key}: no version to read"));
                };
                let r = reader.insert(Reader::new(self.read.clone(), key, etag, size_now));
                r.read(offset, u64::from(size)).await
            }
        }
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.write_inner(fh, offset, data, false).await
    }

    /// A write the kernel resent after the process that first read it died: it may have been
    /// carried out already. An `O_APPEND` write then goes where the kernel put it (its file
    /// size, the end of the file when it was first sent) rather than at the end as it is
    /// now, so doing it twice writes the same bytes at the same place.
    pub async fn write_resent(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.write_inner(fh, offset, data, true).await
    }

    async fn write_inner(&self, fh: u64, offset: u64, data: &[u8], resent: bool) -> FsResult<u32> {
        self.ro()?;
        let handle = self.file_handle(fh)?;
        if !handle.mode.write {
            return Err(err!(libc::EBADF, "not open for writing"));
        }
        let staged = self.staged_for_write(&handle.inode, false).await?;
        let mut st = staged.lock().await;
        let offset = if handle.mode.append && !resent {
            st.size()
        } else {
            offset
        };
        let inode = &handle.inode;
        st.write(offset, data, || inode.state().attrs.encode())
            .await?;
        let size = st.size();
        drop(st);
        let mut s = handle.inode.state();
        s.attrs.size = size;
        s.attrs.mtime = SystemTime::now();
        s.attrs.ctime = s.attrs.mtime;
        Ok(data.len() as u32)
    }

    /// Uploads an inode's staged data if it has changes. Returns after the data is durable.
    pub(super) async fn upload_staged(&self, inode: &Arc<Inode>) -> FsResult<()> {
        let (staged, unlinked) = {
            let s = inode.state();
            (s.staged.clone(), s.unlinked)
        };
        let Some(staged) = staged else {
            return Ok(());
        };
        let mut st = staged.lock().await;
        if unlinked {
            st.discard().await;
            return Ok(());
        }
        if !st.is_dirty() {
            return Ok(());
        }
        let attrs = {
            let mut s = inode.state();
            s.attrs.size = st.size();
            s.attrs.clone()
        };
        let etag = st.upload(&attrs.encode(), attrs.content_type()).await?;
        let mut s = inode.state();
        s.etag = Some(etag);
        s.local_only = false;
        s.validated = Some(Instant::now());
        Ok(())
    }

    /// Once nothing has a file open: a clean staging file is parked in the cache (evicted
    /// LRU when room is needed), an unlinked one is dropped, a dirty one stays with the inode.
    pub(super) fn drop_clean_stage(&self, inode: &Arc<Inode>) {
        let mut s = inode.state();
        if s.open_handles > 0 {
            return;
        }
        let (clean, on_disk) = s
            .staged
            .as_ref()
            .and_then(|st| st.try_lock().ok())
            .map_or((false, false), |g| (!g.is_dirty(), g.has_local_bytes()));
        if s.unlinked {
            s.staged = None;
        } else if clean && let Some(staged) = s.staged.take() {
            // A streamed file has nothing on disk: it is read from S3 next time.
            if on_disk {
                self.stage.disk.park(inode.ino, staged);
            }
        }
    }

    /// A parked staging file of this inode that still matches the object version `etag`.
    pub(super) fn reuse_parked(
        &self,
        inode: &Inode,
        etag: &ETag,
    ) -> Option<Arc<tokio::sync::Mutex<Staged>>> {
        let parked = self.stage.disk.unpark(inode.ino)?;
        let staged = parked.downcast::<tokio::sync::Mutex<Staged>>().ok()?;
        let matches = staged
            .try_lock()
            .is_ok_and(|g| g.clean_etag() == Some(etag));
        if matches {
            metrics::counter!("s3vol_cache_hits_total").increment(1);
            Some(staged)
        } else {
            None
        }
    }

    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let handle = self.file_handle(fh)?;
        self.upload_staged(&handle.inode).await
    }

    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        self.flush(fh).await
    }

    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let handle = match self
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh)
        {
            Some(Handle::File(f)) => f,
            _ => return Ok(()),
        };
        if let Some(j) = self.inodes.journal() {
            j.closed(fh);
        }
        {
            let mut s = handle.inode.state();
            s.open_handles = s.open_handles.saturating_sub(1);
        }
        // A flush normally came first; this catches writers that never flushed.
        let result = if handle.mode.write {
            self.upload_staged(&handle.inode).await
        } else {
            Ok(())
        };
        self.drop_clean_stage(&handle.inode);
        result
    }

    /// DeleteObject at once. A file open in this mount keeps its content for its handles:
    /// before the delete, every byte goes to its staging file (fetching what is not there
    /// yet), and reads through the handles are answered from it until the last one closes.
    pub async fn unlink(&self, parent: InodeNo, name: &str) -> FsResult<()> {
        self.ro()?;
        let mut changing = self.changing(parent, parent);
        let (child, _) = self.lookup(parent, name).await?;
        self.inodes.forget(child.ino, 1);
        if child.kind == Kind::Dir {
            return Err(err!(libc::EISDIR, "{name} is a directory"));
        }
        let (key, local_only, open) = {
            let s = child.state();
            (s.key.clone(), s.local_only, s.open_handles > 0)
        };
        if open && child.kind == Kind::File {
            let staged = self.staged_for_write(&child, false).await?;
            staged.lock().await.make_local().await?;
        }
        // An upload whose completion went unanswered must not make the object after the
        // delete.
        let staged = child.state().staged.clone();
        if let Some(staged) = staged {
            staged.lock().await.settle().await;
        }
        // A file streaming its first parts has just been completed as an object: delete it too.
        if !local_only || open {
            self.store.delete_object(&self.config.bucket, &key).await?;
        }
        self.stage.disk.unpark(child.ino);
        let staged = {
            let mut s = child.state();
            s.unlinked = true;
            s.staged.clone()
        };
        if let Some(staged) = staged {
            // Nothing of it is uploaded any more; the local bytes stay while it is open.
            staged.lock().await.discard().await;
        }
        self.drop_clean_stage(&child);
        self.inodes.detach(parent, name);
        self.set_negative(parent, name, true);
        changing.removed(name);
        Ok(())
    }

    /// Whether an inode was removed from the namespace while open (its link count is 0).
    pub fn is_unlinked(&self, ino: InodeNo) -> bool {
        self.inodes.get(ino).is_some_and(|i| i.state().unlinked)
    }

    pub async fn symlink(
        &self,
        parent: InodeNo,
        name: &str,
        target: &str,
        uid: u32,
        gid: u32,
    ) -> FsResult<(Arc<Inode>, Attrs)> {
        self.ro()?;
        name_ok(name)?;
        let mut changing = self.changing(parent, parent);
        let (parent_inode, parent_key) = self.dir_key(parent)?;
        let (gid, _) = Self::new_gid(&parent_inode, gid);
        if self
            .inodes
            .child(parent, name)
            .is_some_and(|c| !c.state().unlinked)
        {
            return Err(err!(libc::EEXIST, "{name} exists"));
        }
        let key = format!("{parent_key}{name}");
        let mut attrs = Attrs::defaults(
            Kind::Symlink,
            &self.config,
            target.len() as u64,
            SystemTime::now(),
        );
        attrs.uid = uid;
        attrs.gid = gid;
        let options = PutOptions {
            metadata: attrs.encode(),
            content_type: attrs.content_type(),
            if_none_match_any: false,
        };
        let r = self
            .store
            .put_object(
                &self.config.bucket,
                &key,
                Bytes::copy_from_slice(target.as_bytes()),
                &options,
            )
            .await?;
        self.set_negative(parent, name, false);
        let inode = self.inodes.upsert(
            parent,
            name,
            key,
            attrs.clone(),
            Some(r.etag),
            false,
            false,
            true,
        );
        inode.state().symlink_target = Some(target.to_owned());
        changing.added(name, &inode);
        Ok((inode, attrs))
    }

    /// The target of a symlink: its object's body, at most `MAX_SYMLINK_TARGET` (4,095) bytes. Only
    /// that much is ever asked for (a ranged GET) and kept, whatever the object's size or what
    /// the server sends: a larger object marked as a symlink answers `EIO`.
    pub async fn readlink(&self, ino: InodeNo) -> FsResult<String> {
        let inode = self.inode(ino)?;
        if inode.kind != Kind::Symlink {
            return Err(err!(libc::EINVAL, "not a symlink"));
        }
        let (key, size) = {
            let s = inode.state();
            if let Some(t) = &s.symlink_target {
                return Ok(t.clone());
            }
            (s.key.clone(), s.attrs.size)
        };
        let too_long = |size: u64| {
            tracing::warn!(
                key,
                size,
                "an object marked as a symlink is longer than a path may be; readlink answers EIO"
            );
            err!(
                libc::EIO,
                "{key}: symlink target of {size} bytes is longer than PATH_MAX"
            )
        };
        if size > MAX_SYMLINK_TARGET {
            return Err(too_long(size));
        }
        let mut body = Vec::new();
        if size > 0 {
            let got = self
                .store
                .get_object(
                    &self.config.bucket,
                    &key,
                    Some(0..MAX_SYMLINK_TARGET + 1),
                    None,
                )
                .await?;
            let mut chunks = got.body;
            while let Some(chunk) = chunks.try_next().await? {
                body.extend_from_slice(&chunk);
                // The object grew since it was looked up, or the server ignored the range.
                if body.len() as u64 > MAX_SYMLINK_TARGET {
                    return Err(too_long(body.len() as u64));
                }
            }
        }
        let target = String::from_utf8(body)
            .map_err(|_| err!(libc::EIO, "{key}: symlink target is not UTF-8"))?;
        inode.state().symlink_target = Some(target.clone());
        Ok(target)
    }

    /// Uploads everything still pending (at unmount). Returns the keys that failed.
    pub async fn flush_all(&self) -> Vec<(String, FsError)> {
        let mut failed = Vec::new();
        for inode in self.inodes.under(&self.config.prefix) {
            if inode.state().staged.is_some()
                && let Err(e) = self.upload_staged(&inode).await
            {
                failed.push((inode.key(), e));
            }
        }
        failed
    }

    /// Before the process exits: for every file with changes not in S3, writes what only
    /// memory holds to its staging file and fsyncs it (see `Staged::keep_for_exit`).
    /// Returns each such file's key with where its bytes are.
    pub async fn keep_unflushed(&self) -> Vec<(String, FsResult<String>)> {
        let mut kept = Vec::new();
        for inode in self.inodes.under(&self.config.prefix) {
            let (staged, unlinked) = {
                let s = inode.state();
                (s.staged.clone(), s.unlinked)
            };
            let Some(staged) = staged else { continue };
            let mut st = staged.lock().await;
            if unlinked || !st.is_dirty() {
                continue;
            }
            kept.push((inode.key(), st.keep_for_exit().await));
        }
        kept
    }
}
