//! Renames: a file is copied (server-side) and then deleted, a directory key by key. Not
//! atomic; see docs/SEMANTICS.md for what a failure in between leaves.

use super::*;

impl S3Fs {
    pub async fn rename(
        &self,
        parent: InodeNo,
        name: &str,
        new_parent: InodeNo,
        new_name: &str,
        no_replace: bool,
        exchange: bool,
    ) -> FsResult<()> {
        self.ro()?;
        if exchange {
            return Err(err!(libc::EINVAL, "RENAME_EXCHANGE is not supported"));
        }
        name_ok(new_name)?;
        let _changing = self.changing(parent, new_parent);
        let (src, _) = self.lookup(parent, name).await?;
        self.inodes.forget(src.ino, 1);
        let (_, new_parent_key) = self.dir_key(new_parent)?;
        let dst = match self.lookup(new_parent, new_name).await {
            Ok((d, _)) => {
                self.inodes.forget(d.ino, 1);
                Some(d)
            }
            Err(e) if e.errno == libc::ENOENT => None,
            Err(e) => return Err(e),
        };
        if let Some(dst) = &dst {
            if dst.ino == src.ino {
                return Ok(());
            }
            if no_replace {
                return Err(err!(libc::EEXIST, "{new_name} exists"));
            }
            match (src.kind == Kind::Dir, dst.kind == Kind::Dir) {
                (true, false) => return Err(err!(libc::ENOTDIR, "{new_name} is not a directory")),
                (false, true) => return Err(err!(libc::EISDIR, "{new_name} is a directory")),
                (true, true) => {
                    let dkey = dst.key();
                    if self.dir_has_children(dst.ino, &dkey).await? {
                        return Err(err!(libc::ENOTEMPTY, "{new_name} is not empty"));
                    }
                }
                (false, false) => {}
            }
        }
        // Parked local copies name the old keys: forget them.
        for inode in self.inodes.under(&src.key()) {
            self.stage.disk.unpark(inode.ino);
        }
        if let Some(dst) = &dst {
            self.stage.disk.unpark(dst.ino);
        }
        if src.kind == Kind::Dir {
            let new_key = format!("{new_parent_key}{new_name}/");
            self.rename_dir(&src, &new_key).await?;
            if let Some(dst) = &dst {
                dst.state().unlinked = true;
                self.inodes.detach(new_parent, new_name);
            }
            self.inodes.relink(&src, new_parent, new_name, new_key);
        } else {
            let new_key = format!("{new_parent_key}{new_name}");
            // Whatever is written must be in S3 before it can be copied.
            self.upload_staged(&src).await?;
            let (old_key, size, local_only) = {
                let s = src.state();
                (s.key.clone(), s.attrs.size, s.local_only)
            };
            // The target's upload, if its completion went unanswered, must not make its
            // object after the file takes its name.
            let target = dst.as_ref().and_then(|d| d.state().staged.clone());
            if let Some(st) = target {
                st.lock().await.settle().await;
            }
            if !local_only {
                let etag = self.copy_any(&old_key, &new_key, size, None).await?;
                self.store
                    .delete_object(&self.config.bucket, &old_key)
                    .await?;
                src.state().etag = Some(etag);
            }
            if let Some(dst) = &dst {
                dst.state().unlinked = true;
                let staged = dst.state().staged.clone();
                if let Some(st) = staged {
                    st.lock().await.discard().await;
                }
                self.inodes.detach(new_parent, new_name);
            }
            let staged = src.state().staged.clone();
            if let Some(st) = staged {
                st.lock().await.set_key(&new_key);
            }
            self.inodes.relink(&src, new_parent, new_name, new_key);
        }
        self.set_negative(parent, name, true);
        self.set_negative(new_parent, new_name, false);
        Ok(())
    }

    /// Copies every object under a directory to its new prefix, then deletes the old ones.
    /// Not atomic: a failure part-way leaves both copies, and nothing is deleted before every
    /// copy succeeded.
    pub(super) async fn rename_dir(&self, src: &Arc<Inode>, new_key: &str) -> FsResult<()> {
        // Its kept listing was of the old prefix: the new one holds whatever was under it,
        // other clients' keys included.
        let _moved = self.changing(src.ino, src.ino);
        let old_key = src.key();
        for inode in self.inodes.under(&old_key) {
            self.upload_staged(&inode).await?;
        }
        let b = &self.config.bucket;
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .store
                .list_objects(
                    b,
                    &ListRequest {
                        prefix: old_key.clone(),
                        continuation_token: token.take(),
                        ..ListRequest::default()
                    },
                )
                .await?;
            keys.extend(page.objects.into_iter().map(|o| (o.key, o.size)));
            match page.next_continuation_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let has_marker = keys.iter().any(|(k, _)| *k == old_key);
        let copies: Vec<(String, String, u64)> = keys
            .iter()
            .map(|(key, size)| {
                (
                    key.clone(),
                    format!("{new_key}{}", &key[old_key.len()..]),
                    *size,
                )
            })
            .collect();
        futures::stream::iter(copies)
            .map(|(from, to, size)| async move { self.copy_any(&from, &to, size, None).await })
            .buffer_unordered(16)
            .try_collect::<Vec<_>>()
            .await?;
        if !has_marker {
            // Keep the attributes the directory showed.
            let attrs = src.state().attrs.clone();
            let options = PutOptions {
                metadata: attrs.encode(),
                content_type: attrs.content_type(),
                if_none_match_any: false,
            };
            self.store
                .put_object(b, new_key, Bytes::new(), &options)
                .await?;
        }
        for chunk in keys.chunks(1000) {
            let batch: Vec<String> = chunk.iter().map(|(k, _)| k.clone()).collect();
            let failed = self.store.delete_objects(b, &batch).await?;
            if let Some((key, e)) = failed.into_iter().next() {
                return Err(err!(libc::EIO, "rename: could not delete {key}: {e}"));
            }
        }
        self.inodes.rekey_subtree(&old_key, new_key);
        // Files still open under the directory upload to their new keys from now on.
        for inode in self.inodes.under(new_key) {
            let staged = inode.state().staged.clone();
            if let Some(st) = staged {
                let key = inode.key();
                st.lock().await.set_key(&key);
            }
        }
        src.state().has_marker = true;
        Ok(())
    }
}
