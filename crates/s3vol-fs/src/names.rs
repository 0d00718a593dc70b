//! Name indexes: what one listing of a directory says about every name in it, taken after a
//! burst of lookups there, so the rest of the burst costs at most a HEAD per name.
//!
//! `stat` of many names in one directory (`stat dir/*` after a listing the kernel forgot, a
//! program opening its data files one by one, `make`) costs a HEAD and a one-key LIST per name
//! when each is looked up alone. After [`BURST`] such lookups in one directory within the
//! metadata TTL, the directory is listed once in the background (delimiter `/`, 1,000 names a
//! page); from then on, until the index is older than the TTL, a lookup there knows without
//! a request whether a listed name is a directory (a common prefix or a `dir_$folder$`
//! object: the directory wins over a file of the same name, as everywhere) or a file (with
//! its ETag, size and Last-Modified, so the node's attribute cache can answer for it without
//! a request). A name the index does not show is looked up as without it: another client may
//! have made it since, and an `open` must see the latest object (close-to-open), so the index
//! gives no negative answers.
//!
//! Changes made through this mount while an index is kept: a name added or removed is marked
//! in it and looked up the usual way from then on (the inode table and the negative cache
//! know it); any other change to the directory (a rename in or out) drops the index, and one
//! still being built is not kept.
//!
//! Memory: an index holds its names (about 100 bytes each) and the attribute cache's entries
//! for the directory; at most [`MAX_NAMES`] names over all directories, the oldest index
//! dropped first, and a directory with more names is not indexed (its lookups go on as
//! before) for [`TOO_BIG_FOR`] (or the TTL, if longer). Finding that out costs its first
//! 100 pages, once per such period.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use s3vol_s3::{BucketName, ETag, ListRequest, ObjectInfo, ObjectStore, S3Error};

use crate::attr_cache::{AttrCache, DirAttrs, Version};
use crate::inode::InodeNo;

/// Lookups that reach S3 in one directory within the TTL before it is indexed.
pub const BURST: u32 = 8;
/// Names kept over all indexes, and the most one directory may have to be indexed.
pub const MAX_NAMES: usize = 100_000;
/// How long a directory found too big to index is not listed for that again (at least).
pub const TOO_BIG_FOR: Duration = Duration::from_secs(600);
/// The suffix of an s3fs-style directory object (`dir_$folder$`).
pub const FOLDER_SUFFIX: &str = "_$folder$";

/// Whether S3 key segment `name` can be shown as a file name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && !name.contains('/')
        && !name.contains('\0')
}

/// What a listing says a name is.
#[derive(Clone, Debug, PartialEq)]
pub enum Named {
    /// A directory: a common prefix `name/` (its marker, if any, has the attributes) or only
    /// an s3fs `name_$folder$` object.
    Dir { folder_only: bool },
    /// A file (or a symlink: its metadata says), at this version.
    File { version: Version, etag: ETag },
}

/// What this index's lookups learned, to write to the attribute cache.
#[derive(Debug, Default)]
pub struct Learned {
    pub attrs: DirAttrs,
    /// Entries learned since the last write.
    pub pending: usize,
    /// Position of the last file looked up here, to tell a scan in name order.
    pub last: Option<usize>,
}

/// One directory's names as one listing showed them.
#[derive(Debug)]
pub struct DirNames {
    /// When its first page was asked for: answers from it are as old as that.
    pub taken: Instant,
    /// Sorted by name.
    names: Vec<(String, Named)>,
    /// The node's attribute cache for the directory, as loaded with the listing.
    pub saved: DirAttrs,
    /// Names added or removed through this mount since the listing started.
    changed: Mutex<HashSet<String>>,
    pub learned: Mutex<Learned>,
    /// Held while the attribute cache file is written, so that writes land in the order
    /// their contents were taken.
    write: Mutex<()>,
    /// HEADs made ahead of lookups going through the directory in order, by position: when
    /// sent (by the clock, then monotonic) and what came back.
    pub ahead: Mutex<HashMap<usize, tokio::sync::watch::Receiver<Option<HeadAhead>>>>,
    /// The position before which HEADs ahead were started.
    pub ahead_end: Mutex<usize>,
}

/// One HEAD made ahead of its lookup: when it was sent, and its answer.
pub type HeadAhead = (SystemTime, Instant, Result<ObjectInfo, S3Error>);

impl DirNames {
    /// The position and kind of `name`, if the listing has it and it did not change here.
    pub fn get(&self, name: &str) -> Option<(usize, &Named)> {
        if lock(&self.changed).contains(name) {
            return None;
        }
        let at = self
            .names
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()?;
        Some((at, &self.names[at].1))
    }

    pub fn at(&self, i: usize) -> Option<&(String, Named)> {
        self.names.get(i)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn changed(&self, name: &str) -> bool {
        lock(&self.changed).contains(name)
    }

    /// Writes what the attribute cache should hold for the directory now (blocking).
    pub fn store(&self, cache: &AttrCache, prefix: &str) {
        let _writing = lock(&self.write);
        cache.store(prefix, &self.to_store());
    }

    /// What the attribute cache should hold for the directory now: the entries still valid
    /// for this listing and what its lookups learned.
    fn to_store(&self) -> DirAttrs {
        let mut out = lock(&self.learned).attrs.clone();
        for (name, named) in &self.names {
            if let Named::File { version, .. } = named {
                out.carry(&self.saved, name, version);
            }
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
enum Slot {
    /// Lookups that reached S3 since `since`.
    Misses {
        count: u32,
        since: Instant,
    },
    /// Being listed by build number `id` since `started`; names changed here meanwhile;
    /// told when it ends (kept or not).
    Building {
        id: u64,
        started: Instant,
        changed: HashSet<String>,
        done: tokio::sync::watch::Receiver<()>,
    },
    Ready(Arc<DirNames>),
    /// Too many names to index, until then.
    TooBig {
        until: Instant,
    },
}

/// The name indexes of one mount.
#[derive(Debug, Default)]
pub struct NameIndexes {
    slots: Mutex<HashMap<InodeNo, Slot>>,
    next_id: Mutex<u64>,
}

/// A listing to make: the index of `dir` under build number `id`. Dropping it tells the
/// lookups waiting for it.
#[derive(Debug)]
pub struct Build {
    pub dir: InodeNo,
    pub id: u64,
    _done: tokio::sync::watch::Sender<()>,
}

/// How long lookups in a directory being listed wait for the listing, counted from its start,
/// rather than asking S3 name by name alongside it (which would slow it down).
pub const WAIT_FOR_BUILD: Duration = Duration::from_millis(1_000);

impl NameIndexes {
    /// The index of `dir`, if one younger than `ttl` is kept.
    pub fn ready(&self, dir: InodeNo, ttl: Duration) -> Option<Arc<DirNames>> {
        let mut slots = lock(&self.slots);
        match slots.get(&dir) {
            Some(Slot::Ready(n)) if n.taken.elapsed() < ttl => Some(n.clone()),
            Some(Slot::Ready(_)) => {
                slots.remove(&dir);
                None
            }
            _ => None,
        }
    }

    /// While `dir` is being listed, and for at most [`WAIT_FOR_BUILD`] from the start of
    /// the listing: when to stop waiting, and what tells that it ended.
    pub fn building(&self, dir: InodeNo) -> Option<(Instant, tokio::sync::watch::Receiver<()>)> {
        match lock(&self.slots).get(&dir) {
            Some(Slot::Building { started, done, .. }) if started.elapsed() < WAIT_FOR_BUILD => {
                Some((*started + WAIT_FOR_BUILD, done.clone()))
            }
            _ => None,
        }
    }

    /// Counts a lookup in `dir` that reached S3; returns the listing to start when that makes
    /// a burst.
    pub fn missed(&self, dir: InodeNo, ttl: Duration) -> Option<Build> {
        let mut slots = lock(&self.slots);
        let slot = slots.entry(dir).or_insert(Slot::Misses {
            count: 0,
            since: Instant::now(),
        });
        match slot {
            Slot::Building { .. } => return None,
            Slot::TooBig { until } if Instant::now() < *until => return None,
            Slot::Misses { count, since } if since.elapsed() < ttl => {
                *count += 1;
                if *count < BURST {
                    return None;
                }
            }
            _ => {
                *slot = Slot::Misses {
                    count: 1,
                    since: Instant::now(),
                };
                return None;
            }
        }
        let mut next = lock(&self.next_id);
        *next += 1;
        let (tx, rx) = tokio::sync::watch::channel(());
        *slot = Slot::Building {
            id: *next,
            started: Instant::now(),
            changed: HashSet::new(),
            done: rx,
        };
        Some(Build {
            dir,
            id: *next,
            _done: tx,
        })
    }

    /// Keeps what build `id` listed, unless the directory changed meanwhile in a way it cannot
    /// follow. `None`: the listing failed or had too many names.
    pub fn finish(&self, build: &Build, listed: Option<DirNames>, ttl: Duration) {
        let mut slots = lock(&self.slots);
        let changed = match slots.get_mut(&build.dir) {
            Some(Slot::Building { id, changed, .. }) if *id == build.id => std::mem::take(changed),
            _ => return,
        };
        let Some(names) = listed else {
            slots.insert(
                build.dir,
                Slot::TooBig {
                    until: Instant::now() + ttl.max(TOO_BIG_FOR),
                },
            );
            return;
        };
        lock(&names.changed).extend(changed);
        let mut total: usize = slots
            .values()
            .map(|s| match s {
                Slot::Ready(n) => n.len(),
                _ => 0,
            })
            .sum();
        while total + names.len() > MAX_NAMES {
            let oldest = slots
                .iter()
                .filter_map(|(d, s)| match s {
                    Slot::Ready(n) => Some((n.taken, *d, n.len())),
                    _ => None,
                })
                .min();
            let Some((_, d, n)) = oldest else { break };
            slots.remove(&d);
            total -= n;
        }
        slots.insert(build.dir, Slot::Ready(Arc::new(names)));
    }

    /// A build that failed: lookups go on as before, and may start another one later.
    pub fn failed(&self, build: &Build) {
        let mut slots = lock(&self.slots);
        if matches!(slots.get(&build.dir), Some(Slot::Building { id, .. }) if *id == build.id) {
            slots.remove(&build.dir);
        }
    }

    /// `name` was added to or removed from `dir` through this mount.
    pub fn name_changed(&self, dir: InodeNo, name: &str) {
        match lock(&self.slots).get_mut(&dir) {
            Some(Slot::Ready(n)) => {
                lock(&n.changed).insert(name.to_owned());
            }
            Some(Slot::Building { changed, .. }) => {
                changed.insert(name.to_owned());
            }
            _ => {}
        }
    }

    /// `dir` changed through this mount in a way an index cannot follow: its index goes, and
    /// one being built will not be kept.
    pub fn drop_dir(&self, dir: InodeNo) {
        let mut slots = lock(&self.slots);
        if matches!(
            slots.get(&dir),
            Some(Slot::Ready(_) | Slot::Building { .. })
        ) {
            slots.remove(&dir);
        }
    }
}

/// Lists directory `prefix` whole (for [`NameIndexes`]): `None` when it has more than
/// [`MAX_NAMES`] names.
pub async fn list_dir(
    store: &dyn ObjectStore,
    bucket: &BucketName,
    prefix: &str,
    cache: Option<Arc<AttrCache>>,
) -> Result<Option<DirNames>, S3Error> {
    let taken = Instant::now();
    let saved = match cache {
        Some(cache) => {
            let prefix = prefix.to_owned();
            tokio::task::spawn_blocking(move || cache.load(&prefix))
        }
        None => tokio::task::spawn_blocking(DirAttrs::default),
    };
    let mut dirs: HashMap<String, bool> = HashMap::new();
    let mut files: HashMap<String, Named> = HashMap::new();
    let mut token = None;
    loop {
        let request = ListRequest {
            prefix: prefix.to_owned(),
            delimiter: Some("/".into()),
            continuation_token: token.take(),
            max_keys: Some(1000),
            ..ListRequest::default()
        };
        let page = store.list_objects(bucket, &request).await?;
        for cp in &page.common_prefixes {
            let name = cp[prefix.len()..].trim_end_matches('/');
            if valid_name(name) {
                dirs.insert(name.to_owned(), false);
            }
        }
        for o in page.objects {
            if o.key == prefix {
                continue;
            }
            let rest = &o.key[prefix.len()..];
            if let Some(dir) = rest.strip_suffix(FOLDER_SUFFIX) {
                if valid_name(dir) {
                    dirs.entry(dir.to_owned()).or_insert(true);
                }
            } else if valid_name(rest) {
                let named = Named::File {
                    version: Version::listed(&o),
                    etag: o.etag.clone(),
                };
                files.insert(rest.to_owned(), named);
            }
        }
        if dirs.len() + files.len() > MAX_NAMES {
            return Ok(None);
        }
        token = page.next_continuation_token;
        if token.is_none() {
            break;
        }
    }
    // A directory hides a file of the same name.
    for (name, folder_only) in dirs {
        files.insert(name, Named::Dir { folder_only });
    }
    let mut names: Vec<(String, Named)> = files.into_iter().collect();
    names.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(Some(DirNames {
        taken,
        names,
        saved: saved.await.unwrap_or_default(),
        changed: Mutex::new(HashSet::new()),
        learned: Mutex::new(Learned::default()),
        write: Mutex::new(()),
        ahead: Mutex::new(HashMap::new()),
        ahead_end: Mutex::new(0),
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn dir_names(names: &[&str]) -> DirNames {
        DirNames {
            taken: Instant::now(),
            names: names
                .iter()
                .map(|n| (n.to_string(), Named::Dir { folder_only: false }))
                .collect(),
            saved: DirAttrs::default(),
            changed: Mutex::new(HashSet::new()),
            learned: Mutex::new(Learned::default()),
            write: Mutex::new(()),
            ahead: Mutex::new(HashMap::new()),
            ahead_end: Mutex::new(0),
        }
    }

    #[tokio::test]
    async fn a_burst_of_misses_starts_one_listing_and_changes_here_are_followed_or_drop_it() {
        let idx = NameIndexes::default();
        let ttl = Duration::from_secs(60);
        for _ in 1..BURST {
            assert!(idx.missed(7, ttl).is_none());
        }
        let build = idx.missed(7, ttl).expect("the burst starts a listing");
        assert!(idx.missed(7, ttl).is_none(), "one at a time");
        // A name removed while it is listed: kept, with the name marked.
        idx.name_changed(7, "b");
        idx.finish(&build, Some(dir_names(&["a", "b"])), ttl);
        let n = idx.ready(7, ttl).unwrap();
        assert_eq!(n.get("a").unwrap().0, 0);
        assert!(n.get("b").is_none(), "changed here");
        assert!(n.get("c").is_none(), "not there");
        idx.name_changed(7, "a");
        assert!(n.get("a").is_none(), "changed here since");
        assert!(idx.ready(7, Duration::ZERO).is_none(), "older than the TTL");
        // Another change while being built: not kept.
        let mut build = None;
        for _ in 0..BURST {
            build = build.or(idx.missed(8, ttl));
        }
        let build = build.unwrap();
        let (_, mut done) = idx.building(8).expect("being built");
        idx.drop_dir(8);
        idx.finish(&build, Some(dir_names(&["a"])), ttl);
        drop(build);
        assert!(done.changed().await.is_err(), "waiters are told");
        assert!(idx.ready(8, ttl).is_none());
        // Too big: not indexed again within the TTL.
        for _ in 0..BURST - 1 {
            let _ = idx.missed(9, ttl);
        }
        let build = idx.missed(9, ttl).unwrap();
        idx.finish(&build, None, ttl);
        for _ in 0..2 * BURST {
            assert!(idx.missed(9, ttl).is_none());
        }
    }
}
