//! Lookups in a directory listed after a burst of lookups there (`names.rs`): the listing
//! tells what each name is, the attribute cache (`attr_cache.rs`) answers for files whose
//! version it holds, and a scan in name order finds its HEADs made ahead.

use super::*;

impl S3Fs {
    /// Lists `prefix` in the background to index its names (see `names.rs`).
    pub(super) fn start_index(&self, build: Build, prefix: String) {
        let store = self.store.clone();
        let bucket = self.config.bucket.clone();
        let cache = self.attr_cache.clone();
        let names = self.names.clone();
        let ttl = self.config.metadata_ttl;
        tokio::spawn(async move {
            match crate::names::list_dir(&*store, &bucket, &prefix, cache).await {
                Ok(listed) => names.finish(&build, listed, ttl),
                Err(e) => {
                    tracing::debug!(prefix, error = %e, "listing a directory to index its names");
                    names.failed(&build);
                }
            }
        });
    }

    /// A lookup in a directory with a name index (see `names.rs`): a directory costs a HEAD
    /// of its marker, a file the attribute cache or a HEAD. When lookups go through the
    /// directory in order, the HEAD takes the next names along, many at once.
    pub(super) async fn lookup_indexed(
        &self,
        parent: InodeNo,
        parent_key: &str,
        name: &str,
        index: &Arc<DirNames>,
        at: usize,
        named: Named,
    ) -> FsResult<(Arc<Inode>, Attrs)> {
        let b = &self.config.bucket;
        let (version, etag) = match named {
            Named::Dir { folder_only } => {
                let key = format!("{parent_key}{name}/");
                let head = if folder_only {
                    format!("{parent_key}{name}{FOLDER_SUFFIX}")
                } else {
                    key.clone()
                };
                let (attrs, marker) = match self.store.head_object(b, &head).await {
                    Ok(info) => {
                        let attrs = self.dir_attrs(&info);
                        (attrs, !folder_only)
                    }
                    Err(e) if not_found(&e) => (
                        Attrs::defaults(Kind::Dir, &self.config, 0, self.mount_time),
                        false,
                    ),
                    Err(e) => return Err(e.into()),
                };
                let inode = self
                    .inodes
                    .upsert(parent, name, key, attrs, None, marker, false, true);
                let attrs = self.attrs_of(&inode);
                return Ok((inode, attrs));
            }
            Named::File { version, etag } => (version, etag),
        };
        if let Some(mut attrs) = index.saved.get(name, &version) {
            // As current as the listing.
            attrs.size = version.size;
            return Ok(self.found_file(
                parent,
                parent_key,
                name,
                attrs,
                Some(etag),
                Some(index.taken),
                true,
            ));
        }
        let sequential = {
            let mut l = index.learned.lock().unwrap_or_else(|e| e.into_inner());
            let sequential = l.last.is_some_and(|p| p < at && at <= p + 8);
            l.last = Some(at);
            sequential
        };
        if sequential {
            self.read_ahead(parent, parent_key, index, at);
        }
        let key = format!("{parent_key}{name}");
        let waiting = index
            .ahead
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&at);
        let ahead = match waiting {
            Some(mut rx) => match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone(),
                // The task went (the runtime is ending): asked below.
                Err(_) => None,
            },
            None => None,
        };
        let (sent, validated, r) = match ahead {
            Some((sent, headed, r)) => (sent, Some(headed), r),
            None => (
                SystemTime::now(),
                None,
                self.store.head_object(b, &key).await,
            ),
        };
        let (answer, learned) = match r {
            Ok(info) => {
                let (attrs, etag, _) = self.file_attrs(&info);
                let learned = (Version::headed(&info), sent, attrs.clone());
                let found = self.found_file(parent, parent_key, name, attrs, etag, validated, true);
                (Ok(found), Some(learned))
            }
            Err(e) if not_found(&e) => {
                // Deleted since the listing.
                self.set_negative(parent, name, true);
                (Err(err!(libc::ENOENT, "{key}: not found")), None)
            }
            Err(e) => (Err(e.into()), None),
        };
        let write = {
            let mut l = index.learned.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((version, sent, attrs)) = &learned {
                l.attrs.put(name, version, *sent, attrs);
                l.pending += 1;
            }
            // Written as it grows, each time by half again (at least 256 entries), and at the
            // end of a scan: a file rewritten every 256 entries would cost a scan of n names
            // n²/256 entries serialised.
            let every = 256.max(l.attrs.len() / 2);
            let write = l.pending > 0 && (l.pending >= every || at + 1 >= index.len());
            if write {
                l.pending = 0;
            }
            write
        };
        if write && let Some(cache) = &self.attr_cache {
            let (cache, index, prefix) = (cache.clone(), index.clone(), parent_key.to_owned());
            tokio::task::spawn_blocking(move || index.store(&cache, &prefix));
        }
        answer
    }

    /// Lookups go through an indexed directory in name order: HEADs the files after `at`
    /// whose attributes are not known yet in the background, many at once, up to four times
    /// the listing concurrency ahead (topped up when half of that is used), for the lookups
    /// to come to take (`DirNames::ahead`).
    fn read_ahead(&self, parent: InodeNo, parent_key: &str, index: &Arc<DirNames>, at: usize) {
        let concurrency = self.config.list_concurrency.max(1);
        let window = 4 * concurrency;
        let (from, to) = {
            let mut end = index.ahead_end.lock().unwrap_or_else(|e| e.into_inner());
            if *end > at + window / 2 {
                return;
            }
            let from = (*end).max(at + 1);
            let to = (at + window).min(index.len());
            *end = to;
            (from, to)
        };
        let mut jobs = Vec::new();
        {
            let mut ahead = index.ahead.lock().unwrap_or_else(|e| e.into_inner());
            for i in from..to {
                let Some((n, Named::File { version, etag })) = index.at(i) else {
                    continue;
                };
                if index.changed(n) || index.saved.get(n, version).is_some() {
                    continue;
                }
                if let Some(child) = self.inodes.child(parent, n) {
                    let s = child.state();
                    let current = s.etag.as_ref().is_some_and(|t| same_etag(t, etag));
                    if s.local_only || s.staged.is_some() || current && self.fresh(s.validated) {
                        continue;
                    }
                }
                let (tx, rx) = tokio::sync::watch::channel(None);
                ahead.insert(i, rx);
                jobs.push((format!("{parent_key}{n}"), tx));
            }
        }
        if jobs.is_empty() {
            return;
        }
        let store = self.store.clone();
        let bucket = self.config.bucket.clone();
        tokio::spawn(async move {
            futures::stream::iter(jobs)
                .for_each_concurrent(concurrency, |(key, tx)| {
                    let (store, bucket) = (&store, &bucket);
                    async move {
                        let sent = SystemTime::now();
                        let at = Instant::now();
                        let r = store.head_object(bucket, &key).await;
                        let _ = tx.send(Some((sent, at, r)));
                    }
                })
                .await;
        });
    }

    /// Records a file found at `parent/name` (a directory, for an old-style s3fs directory
    /// object), validated at `validated` (now when `None`). Without `lookup` the kernel is
    /// not told of it: the inode is kept as a forgotten one (bounded), for the lookup to come.
    #[allow(clippy::too_many_arguments)]
    fn found_file(
        &self,
        parent: InodeNo,
        parent_key: &str,
        name: &str,
        attrs: Attrs,
        etag: Option<ETag>,
        validated: Option<Instant>,
        lookup: bool,
    ) -> (Arc<Inode>, Attrs) {
        let (key, etag) = if attrs.kind == Kind::Dir {
            (format!("{parent_key}{name}/"), None)
        } else {
            (format!("{parent_key}{name}"), etag)
        };
        let kind = attrs.kind;
        let inode =
            self.inodes
                .upsert(parent, name, key, attrs.clone(), etag, false, false, lookup);
        if let Some(t) = validated {
            let mut s = inode.state();
            if s.staged.is_none() && !s.local_only {
                s.validated = Some(t);
            }
        }
        if !lookup {
            self.inodes.forget(inode.ino, 0);
        }
        let attrs = if inode.kind == kind {
            self.attrs_of(&inode)
        } else {
            attrs
        };
        (inode, attrs)
    }
}
