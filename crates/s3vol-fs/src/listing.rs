//! Complete directory listings kept for `metadata_ttl`, so that a directory opened again soon
//! after is listed without a LIST or a HEAD (what `ls` in a loop, shells completing names and
//! build tools do all the time).
//!
//! A listing is kept only once it is complete, and only if no name was added to or removed
//! from the directory through this mount while it was taken: every such change bumps the
//! directory's `listing_gen` and drops its kept listing, both under this cache's lock, so a
//! kept listing always includes this mount's own changes. Changes made by other clients show
//! once the listing is older than the TTL, as for every other cached metadata.
//!
//! An entry holds its inode, not just its number: when the kernel forgets an inode while its
//! listing is kept, the listing can hand the same number (and attributes) back.
//!
//! Memory: at most `max_entries` entries over all directories (about 100 bytes each plus the
//! inode they keep alive); the least recently used directory goes first, and a directory with
//! more entries than the whole budget is never kept (it is listed from S3 every time).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::inode::{Inode, InodeNo};

/// Entries kept over all directories by default.
pub(crate) const MAX_ENTRIES: usize = 100_000;

/// One name of a kept listing.
#[derive(Debug)]
pub(crate) struct Listed {
    pub name: String,
    pub inode: Arc<Inode>,
}

/// A complete listing of one directory, as readdir returned it, sorted by name.
#[derive(Debug)]
pub(crate) struct Listing {
    pub taken: Instant,
    pub entries: Vec<Listed>,
}

impl Listing {
    pub fn new(taken: Instant, mut entries: Vec<Listed>) -> Self {
        entries.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Self { taken, entries }
    }

    /// Whether the directory has `name`.
    pub fn has(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|e| e.name.as_str().cmp(name))
    }
}

#[derive(Debug, Default)]
struct Inner {
    by_dir: HashMap<InodeNo, (Arc<Listing>, u64)>,
    /// Last use → directory, oldest first.
    lru: BTreeMap<u64, InodeNo>,
    tick: u64,
    entries: usize,
}

impl Inner {
    fn remove(&mut self, dir: InodeNo) {
        if let Some((listing, used)) = self.by_dir.remove(&dir) {
            self.lru.remove(&used);
            self.entries -= listing.entries.len();
        }
    }
}

/// The kept listings.
#[derive(Debug)]
pub(crate) struct Listings {
    inner: Mutex<Inner>,
    max_entries: usize,
}

impl Listings {
    pub fn new(max_entries: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_entries,
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a listing of `n` entries can be kept at all.
    pub fn fits(&self, n: usize) -> bool {
        n <= self.max_entries
    }

    /// The kept listing of `dir`, if it is younger than `ttl`.
    pub fn get(&self, dir: InodeNo, ttl: Duration) -> Option<Arc<Listing>> {
        let mut inner = self.inner();
        let (listing, used) = inner.by_dir.get(&dir)?.clone();
        if listing.taken.elapsed() >= ttl {
            inner.remove(dir);
            return None;
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.lru.remove(&used);
        inner.lru.insert(tick, dir);
        if let Some(slot) = inner.by_dir.get_mut(&dir) {
            slot.1 = tick;
        }
        Some(listing)
    }

    /// Keeps a complete listing of `dir`, unless the directory changed since `generation` was read
    /// from it (the listing may then miss the change).
    pub fn insert(&self, dir: &Inode, generation: u64, listing: Listing) {
        let mut inner = self.inner();
        if dir.state().listing_gen != generation || !self.fits(listing.entries.len()) {
            return;
        }
        inner.remove(dir.ino);
        while inner.entries + listing.entries.len() > self.max_entries {
            let Some((_, oldest)) = inner.lru.pop_first() else {
                break;
            };
            if let Some((l, _)) = inner.by_dir.remove(&oldest) {
                inner.entries -= l.entries.len();
            }
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.entries += listing.entries.len();
        inner.lru.insert(tick, dir.ino);
        inner.by_dir.insert(dir.ino, (Arc::new(listing), tick));
    }

    /// `name` was added to `dir` through this mount (a create, a mkdir): its kept listing
    /// takes it in, so that the next names made there are still answered without a request.
    /// A listing under way will not be kept; a kept one in use elsewhere (or at the budget) goes.
    pub fn add(&self, dir: &Inode, name: &str, inode: Arc<Inode>) {
        let mut inner = self.inner();
        dir.state().listing_gen += 1;
        let room = inner.entries < self.max_entries;
        let added = match inner.by_dir.get_mut(&dir.ino) {
            Some((listing, _)) if room => match Arc::get_mut(listing) {
                Some(listing) => match listing.find(name) {
                    Ok(at) => {
                        listing.entries[at].inode = inode;
                        Some(0)
                    }
                    Err(at) => {
                        let name = name.to_owned();
                        listing.entries.insert(at, Listed { name, inode });
                        Some(1)
                    }
                },
                None => None,
            },
            Some(_) => None,
            None => return,
        };
        match added {
            Some(n) => inner.entries += n,
            None => inner.remove(dir.ino),
        }
    }

    /// A name was added to or removed from `dir`: its kept listing goes, and a listing under
    /// way will not be kept.
    pub fn invalidate(&self, dir: &Inode) {
        let mut inner = self.inner();
        dir.state().listing_gen += 1;
        inner.remove(dir.ino);
    }

    #[cfg(test)]
    pub fn kept(&self) -> (usize, usize) {
        let inner = self.inner();
        (inner.by_dir.len(), inner.entries)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::inode::{Inodes, ROOT};
    use crate::meta::{Attrs, Kind};
    use s3vol_s3::BucketName;
    use std::time::SystemTime;

    fn table() -> (Inodes, Attrs) {
        let config = crate::FsConfig::new(
            BucketName::new("bkt").unwrap(),
            String::new(),
            "/tmp".into(),
        );
        let attrs = Attrs::defaults(Kind::Dir, &config, 0, SystemTime::now());
        (Inodes::new(String::new(), attrs.clone()), attrs)
    }

    fn listing(inodes: &Inodes, dir: &Arc<Inode>, n: usize, attrs: &Attrs) -> Listing {
        let entries = (0..n)
            .map(|i| {
                let name = format!("f{i}");
                let key = format!("{}{name}/", dir.key());
                let inode = inodes.upsert(
                    dir.ino,
                    &name,
                    key,
                    attrs.clone(),
                    None,
                    false,
                    false,
                    false,
                );
                Listed { name, inode }
            })
            .collect();
        Listing::new(Instant::now(), entries)
    }

    #[test]
    fn least_recently_used_directories_go_first_and_oversized_listings_are_not_kept() {
        let (inodes, attrs) = table();
        let root = inodes.get(ROOT).unwrap();
        let dirs: Vec<Arc<Inode>> = (0..3)
            .map(|i| {
                inodes.upsert(
                    ROOT,
                    &format!("d{i}"),
                    format!("d{i}/"),
                    attrs.clone(),
                    None,
                    false,
                    false,
                    false,
                )
            })
            .collect();
        let cache = Listings::new(10);
        let ttl = Duration::from_secs(60);
        for d in &dirs {
            cache.insert(d, 0, listing(&inodes, d, 4, &attrs));
        }
        // 12 entries do not fit in 10: the first directory went.
        assert_eq!(cache.kept(), (2, 8));
        assert!(cache.get(dirs[0].ino, ttl).is_none());
        // Using d1 makes d2 the oldest.
        assert!(cache.get(dirs[1].ino, ttl).is_some());
        cache.insert(&dirs[0], 0, listing(&inodes, &dirs[0], 4, &attrs));
        assert!(cache.get(dirs[2].ino, ttl).is_none());
        assert!(cache.get(dirs[1].ino, ttl).is_some());
        // Bigger than the whole budget: never kept, and nothing is evicted for it.
        cache.insert(&root, 0, listing(&inodes, &root, 11, &attrs));
        assert!(cache.get(ROOT, ttl).is_none());
        assert_eq!(cache.kept(), (2, 8));
    }

    #[test]
    fn a_change_during_the_listing_or_after_it_drops_it() {
        let (inodes, attrs) = table();
        let root = inodes.get(ROOT).unwrap();
        let cache = Listings::new(100);
        let ttl = Duration::from_secs(60);
        let generation = root.state().listing_gen;
        cache.invalidate(&root);
        cache.insert(&root, generation, listing(&inodes, &root, 2, &attrs));
        assert!(cache.get(ROOT, ttl).is_none(), "changed while listed");
        let generation = root.state().listing_gen;
        cache.insert(&root, generation, listing(&inodes, &root, 2, &attrs));
        assert!(cache.get(ROOT, ttl).is_some());
        assert!(
            cache.get(ROOT, Duration::ZERO).is_none(),
            "older than the TTL"
        );
        assert!(cache.get(ROOT, ttl).is_none());
        cache.insert(&root, generation, listing(&inodes, &root, 2, &attrs));
        cache.invalidate(&root);
        assert!(cache.get(ROOT, ttl).is_none());
        assert_eq!(cache.kept(), (0, 0));
    }

    #[test]
    fn names_added_here_join_the_kept_listing_in_order() {
        let (inodes, attrs) = table();
        let root = inodes.get(ROOT).unwrap();
        let cache = Listings::new(4);
        let ttl = Duration::from_secs(60);
        let generation = root.state().listing_gen;
        cache.insert(&root, generation, listing(&inodes, &root, 2, &attrs));
        let new = |name: &str| {
            inodes.upsert(
                ROOT,
                name,
                name.to_owned(),
                attrs.clone(),
                None,
                false,
                false,
                false,
            )
        };
        cache.add(&root, "a", new("a"));
        cache.add(&root, "f0", new("f0"));
        let kept = cache.get(ROOT, ttl).unwrap();
        let names: Vec<&str> = kept.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "f0", "f1"], "sorted, no duplicate");
        assert!(kept.has("f1") && !kept.has("b"));
        assert_eq!(cache.kept(), (1, 3));
        // In use by a reader: the listing goes rather than change under it.
        cache.add(&root, "b", new("b"));
        assert!(cache.get(ROOT, ttl).is_none());
        drop(kept);
        // At the budget: it goes too.
        let generation = root.state().listing_gen;
        cache.insert(&root, generation, listing(&inodes, &root, 4, &attrs));
        cache.add(&root, "z", new("z"));
        assert_eq!(cache.kept(), (0, 0));
    }
}
