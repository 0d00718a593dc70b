//! Tree walks (`find`, `du`, `grep -r`, `cp -r`, `tar c`, `rm -r`, backups) open the
//! subdirectories of a directory one after the other, each only once the one before is done,
//! so each costs its LIST and HEADs in turn, one round trip after another. Once a walk shows
//! (a second subdirectory of one directory opened within the TTL), the next few
//! subdirectories of that directory, in name order, are listed in the background, as
//! `readdir` would list them, and their listings kept (`listing.rs`): when the walk opens
//! them, they are read from memory. Every directory the walk opens is part of it: once it has
//! been read, its own first subdirectories are listed ahead too, so the walk finds them
//! listed as it goes down.
//!
//! The cost of a wrong guess is bounded: at most [`AHEAD`] directories past the one opened,
//! at most [`AT_ONCE`] listed at the same time over the mount, none more than once within the
//! TTL, and no further than the page that shows a directory too large to keep. A `readdir` of
//! a directory being listed ahead waits for that listing rather than make its own.

use super::*;
use crate::listing::{Listed, Listing};

/// How many subdirectories past the one opened are listed ahead.
const AHEAD: usize = 4;

/// How many directories are listed ahead at the same time, over the whole mount.
pub(super) const AT_ONCE: usize = 4;

/// How many directories' walks are remembered at most.
const MAX_WALKS: usize = 4096;

/// A walk through the subdirectories of one directory.
#[derive(Debug)]
pub(super) struct Walk {
    /// Subdirectories opened, within the TTL of the first.
    opened: u32,
    since: Instant,
    /// The last name listed ahead.
    ahead_to: Option<String>,
    /// Opened by a walk of its parent: part of the walk from its first subdirectory on.
    walking: bool,
}

impl Walk {
    fn new() -> Self {
        Walk {
            opened: 0,
            since: Instant::now(),
            ahead_to: None,
            walking: false,
        }
    }

    /// The subdirectories of `listing` to list ahead of a walk at `name` (before the first
    /// with `None`): up to [`AHEAD`] past it, those not listed ahead already.
    fn next<'l>(&mut self, listing: &'l Listing, name: Option<&str>) -> Vec<&'l Listed> {
        let next: Vec<&Listed> = listing
            .entries
            .iter()
            .filter(|e| e.inode.kind == Kind::Dir && name.is_none_or(|n| e.name.as_str() > n))
            .take(AHEAD)
            .filter(|e| self.ahead_to.as_ref().is_none_or(|to| e.name > *to))
            .collect();
        if let Some(last) = next.last() {
            self.ahead_to = Some(last.name.clone());
        }
        next
    }
}

/// Directories being listed ahead, each with a lock its listing holds while it runs.
#[derive(Debug, Default)]
pub(super) struct Walks {
    by_parent: Mutex<HashMap<InodeNo, Walk>>,
    listing: Mutex<HashMap<InodeNo, Arc<tokio::sync::Mutex<()>>>>,
}

impl Walks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<InodeNo, Walk>> {
        self.by_parent.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn listing(&self) -> std::sync::MutexGuard<'_, HashMap<InodeNo, Arc<tokio::sync::Mutex<()>>>> {
        self.listing.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl S3Fs {
    /// Called at each `opendir`: the subdirectories to list ahead now (see the module
    /// docs), for [`S3Fs::list_ahead`].
    pub fn walk_ahead(&self, ino: InodeNo) -> Vec<InodeNo> {
        let Ok(dir) = self.inode(ino) else {
            return Vec::new();
        };
        let (parent, name) = {
            let s = dir.state();
            (s.parent, s.name.clone())
        };
        if parent == ino {
            return Vec::new();
        }
        let Some(listing) = self.listings.get(parent, self.config.metadata_ttl) else {
            return Vec::new();
        };
        let ttl = self.config.metadata_ttl;
        let mut walks = self.walks.lock();
        if walks.len() > MAX_WALKS {
            walks.retain(|_, w| w.since.elapsed() < ttl);
            if walks.len() > MAX_WALKS {
                // A walk through more directories than that within the TTL: it is detected
                // again at the next second subdirectory opened.
                walks.clear();
            }
        }
        if walks.get(&parent).is_some_and(|w| w.since.elapsed() >= ttl) {
            walks.remove(&parent);
        }
        let walk = walks.entry(parent).or_insert_with(Walk::new);
        walk.opened += 1;
        if walk.opened < 2 && !walk.walking {
            return Vec::new();
        }
        let next = walk.next(&listing, Some(&name));
        // This directory is part of the walk: its own subdirectories are listed ahead as soon
        // as it has been read (`walk_into`).
        let own = walks.entry(ino).or_insert_with(Walk::new);
        own.walking = true;
        drop(walks);
        self.not_listed(next)
    }

    /// Called once a `readdir` of `ino` replied: when `ino` is part of a walk, its first
    /// subdirectories, to list ahead now (the walk goes into them next).
    pub fn walk_into(&self, ino: InodeNo) -> Vec<InodeNo> {
        let mut walks = self.walks.lock();
        let Some(walk) = walks.get_mut(&ino).filter(|w| w.walking) else {
            return Vec::new();
        };
        let Some(listing) = self.listings.get(ino, self.config.metadata_ttl) else {
            return Vec::new();
        };
        let next = walk.next(&listing, None);
        drop(walks);
        self.not_listed(next)
    }

    /// Those of `dirs` without a kept listing.
    fn not_listed(&self, dirs: Vec<&Listed>) -> Vec<InodeNo> {
        dirs.into_iter()
            .map(|e| e.inode.ino)
            .filter(|&d| self.listings.get(d, self.config.metadata_ttl).is_none())
            .collect()
    }

    /// Lists the directories `dirs` as `readdir` would, keeping their listings; at most
    /// four over the mount at the same time. Best effort: an error only means the
    /// walk lists the directory itself.
    pub async fn list_ahead(&self, dirs: Vec<InodeNo>) {
        futures::stream::iter(dirs)
            .for_each_concurrent(AT_ONCE, |ino| async move {
                let Ok(_permit) = self.walk_permits.acquire().await else {
                    return;
                };
                if self.listings.get(ino, self.config.metadata_ttl).is_some() {
                    return;
                }
                let lock = Arc::new(tokio::sync::Mutex::new(()));
                let Ok(_listing) = lock.clone().try_lock_owned() else {
                    return;
                };
                {
                    let mut running = self.walks.listing();
                    if running.contains_key(&ino) {
                        // Being listed ahead already (by another walk of the same directory).
                        return;
                    }
                    running.insert(ino, lock);
                }
                match self.list_whole(ino).await {
                    Ok(()) => {
                        metrics::counter!("s3vol_directories_listed_ahead_total").increment(1)
                    }
                    Err(e) => {
                        tracing::debug!(ino, error = %e, "listing a directory ahead of a walk");
                    }
                }
                self.walks.listing().remove(&ino);
            })
            .await;
    }

    /// Lists `ino` to the end, as `readdir` does, so its listing is kept; stops as soon as it
    /// turns out too large to keep.
    async fn list_whole(&self, ino: InodeNo) -> FsResult<()> {
        let (_, prefix) = self.dir_key(ino)?;
        let mut d = DirStream::new(ino, prefix);
        self.start_listing(&mut d)?;
        while !d.done {
            self.load_page(&mut d).await?;
            d.entries.clear();
            if d.complete.is_none() && !d.done {
                break;
            }
        }
        self.refresh_unread(Unread(std::mem::take(&mut d.unread)))
            .await;
        Ok(())
    }

    /// Waits for the listing ahead of `ino`, if one is running: a `readdir` then reads it
    /// from memory instead of listing the directory a second time.
    pub(super) async fn wait_listed_ahead(&self, ino: InodeNo) {
        let running = self.walks.listing().get(&ino).cloned();
        if let Some(lock) = running {
            let _ = lock.lock().await;
        }
    }
}
