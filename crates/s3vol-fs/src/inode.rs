//! The inode table: kernel inode numbers ↔ bucket keys, with cached attributes.
//!
//! An inode is created the first time a name is looked up or listed. Once the kernel forgets
//! it (lookup count back to zero) and no handle uses it, it is *retained*: it stays in the
//! table under its name and number, so the next lookup of the name (after `drop_caches`, or
//! under memory pressure) gets the same number back. Tools rely on that (`find`'s loop check,
//! hard-link detection in `tar` and `rsync`, `git`'s index). At most [`MAX_RETAINED`]
//! forgotten inodes are kept, least recently forgotten dropped first; a name whose inode was
//! dropped so gets a new number on its next lookup (unless a kept listing still holds the
//! inode, which then comes back). The pair (parent, name) maps to at most one inode, and a
//! number to at most one inode.
//!
//! Keys: a directory's key ends with `/` (the mount's prefix for the root); a file's does not.
//! Keys are stored in the inode and rewritten when a directory is renamed.
//!
//! Locking: one table mutex, never held across an await, and per-inode state behind its own
//! short mutex. Where both are taken, the table comes first.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use s3vol_s3::ETag;

use crate::journal::Journal;
use crate::meta::{Attrs, Kind};
use crate::stage::Staged;

pub type InodeNo = u64;
pub const ROOT: InodeNo = 1;
/// Forgotten inodes kept so their names keep their numbers (a few hundred bytes each).
pub const MAX_RETAINED: usize = 100_000;
/// The lookup count of a node adopted from a dead predecessor's journal. The real count is
/// not journaled (see `journal.rs`); lookups after the adoption add to this base, so
/// `lookups - ADOPTED_LOOKUPS` is their number, and [`Inodes::forget`] tells the kernel's
/// eviction of the node from the return of one lookup by it.
pub const ADOPTED_LOOKUPS: u64 = 1 << 48;

/// Mutable state of an inode.
#[derive(Debug)]
pub struct InodeState {
    pub parent: InodeNo,
    pub name: String,
    pub key: String,
    pub attrs: Attrs,
    /// The object version the attributes describe (files and symlinks).
    pub etag: Option<ETag>,
    /// For directories: whether a `dir/` marker object exists.
    pub has_marker: bool,
    /// When the attributes were last read from S3 (`None`: never, or locally changed).
    pub validated: Option<Instant>,
    /// Kernel lookup references.
    pub lookups: u64,
    /// Cached symlink target.
    pub symlink_target: Option<String>,
    /// Exists only in this mount so far (created, not yet uploaded).
    pub local_only: bool,
    /// Local changes (content or attributes) waiting for upload.
    pub staged: Option<Arc<tokio::sync::Mutex<Staged>>>,
    /// Open file handles.
    pub open_handles: u32,
    /// Removed from the namespace while still open.
    pub unlinked: bool,
    /// For directories: bumped whenever a name is added or removed through this mount, so a
    /// listing taken meanwhile is not kept as current (see `listing.rs`).
    pub listing_gen: u64,
}

#[derive(Debug)]
pub struct Inode {
    pub ino: InodeNo,
    pub kind: Kind,
    state: Mutex<InodeState>,
}

impl Inode {
    pub fn state(&self) -> MutexGuard<'_, InodeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn key(&self) -> String {
        self.state().key.clone()
    }
}

#[derive(Debug, Default)]
struct Table {
    inodes: HashMap<InodeNo, Arc<Inode>>,
    by_name: HashMap<(InodeNo, String), InodeNo>,
    next: InodeNo,
    /// Inodes the kernel forgot and no handle uses, still in `inodes`: number → when
    /// forgotten (a sequence number), and the other way round, oldest first.
    retained: HashMap<InodeNo, u64>,
    retained_order: BTreeMap<u64, InodeNo>,
    forget_seq: u64,
}

impl Table {
    /// The inode is in use again (looked up, listed, opened): no longer retained.
    fn revive(&mut self, ino: InodeNo) {
        if let Some(seq) = self.retained.remove(&ino) {
            self.retained_order.remove(&seq);
            self.publish();
        }
    }

    /// The number of nodes the kernel holds (by our count), for the `s3vol_nodes` gauge: set
    /// when it changes, never on a lookup of a name the kernel already holds.
    fn publish(&self) {
        metrics::gauge!("s3vol_nodes").set((self.inodes.len() - self.retained.len()) as f64);
    }

    /// Drops the oldest retained inodes beyond [`MAX_RETAINED`].
    fn trim_retained(&mut self) {
        while self.retained.len() > MAX_RETAINED {
            let Some((_, ino)) = self.retained_order.pop_first() else {
                return;
            };
            self.retained.remove(&ino);
            let Some(inode) = self.inodes.get(&ino).cloned() else {
                continue;
            };
            let s = inode.state();
            if s.lookups == 0 && s.open_handles == 0 && s.staged.is_none() {
                let slot = (s.parent, s.name.clone());
                drop(s);
                self.inodes.remove(&ino);
                if self.by_name.get(&slot) == Some(&ino) {
                    self.by_name.remove(&slot);
                }
            }
        }
    }
}

/// All known inodes.
#[derive(Debug)]
pub struct Inodes {
    table: Mutex<Table>,
    /// Where new node IDs, moves and unlinks are recorded for a successor (supervised
    /// mounts only).
    journal: OnceLock<Arc<Journal>>,
}

impl Inodes {
    pub fn new(root_key: String, root_attrs: Attrs) -> Self {
        let root = Arc::new(Inode {
            ino: ROOT,
            kind: Kind::Dir,
            state: Mutex::new(InodeState {
                parent: ROOT,
                name: String::new(),
                key: root_key,
                attrs: root_attrs,
                etag: None,
                has_marker: false,
                validated: Some(Instant::now()),
                lookups: 1,
                symlink_target: None,
                local_only: false,
                staged: None,
                open_handles: 0,
                unlinked: false,
                listing_gen: 0,
            }),
        });
        let mut table = Table {
            next: ROOT + 1,
            ..Table::default()
        };
        table.inodes.insert(ROOT, root);
        Self {
            table: Mutex::new(table),
            journal: OnceLock::new(),
        }
    }

    /// Records node IDs from now on. Set once, before the mount is served.
    pub fn set_journal(&self, journal: Arc<Journal>) {
        let _ = self.journal.set(journal);
    }

    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.get()
    }

    /// Puts back a node a dead predecessor handed the kernel (see `journal.rs`): its number,
    /// its name under its parent (none if it was unlinked) and its derived key. Its attributes
    /// are read again from S3 when asked (`validated` is none).
    pub fn adopt(
        &self,
        ino: InodeNo,
        parent: InodeNo,
        name: Option<String>,
        key: String,
        attrs: Attrs,
    ) {
        let mut t = self.table();
        if t.inodes.contains_key(&ino) {
            return;
        }
        let unlinked = name.is_none();
        let name = name.unwrap_or_default();
        let inode = Arc::new(Inode {
            ino,
            kind: attrs.kind,
            state: Mutex::new(InodeState {
                parent,
                name: name.clone(),
                key,
                attrs,
                etag: None,
                has_marker: false,
                validated: None,
                lookups: ADOPTED_LOOKUPS,
                symlink_target: None,
                local_only: false,
                staged: None,
                open_handles: 0,
                unlinked,
                listing_gen: 0,
            }),
        });
        t.inodes.insert(ino, inode);
        t.publish();
        if !unlinked {
            t.by_name.insert((parent, name), ino);
        }
        t.next = t.next.max(ino + 1);
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, ino: InodeNo) -> Option<Arc<Inode>> {
        self.table().inodes.get(&ino).cloned()
    }

    pub fn child(&self, parent: InodeNo, name: &str) -> Option<Arc<Inode>> {
        let t = self.table();
        t.by_name
            .get(&(parent, name.to_owned()))
            .and_then(|i| t.inodes.get(i))
            .cloned()
    }

    /// Records what S3 (or a local create) says about `parent/name`, reusing the existing inode
    /// when the kind matches. `lookup` adds a kernel reference.
    #[allow(clippy::too_many_arguments)]
    pub fn upsert(
        &self,
        parent: InodeNo,
        name: &str,
        key: String,
        attrs: Attrs,
        etag: Option<ETag>,
        has_marker: bool,
        local_only: bool,
        lookup: bool,
    ) -> Arc<Inode> {
        let mut t = self.table();
        let slot = (parent, name.to_owned());
        if let Some(existing) = t.by_name.get(&slot).and_then(|i| t.inodes.get(i)).cloned()
            && existing.kind == attrs.kind
        {
            let mut s = existing.state();
            if s.staged.is_none() {
                // Local, not yet uploaded changes win over what S3 says.
                let size = s.attrs.size;
                s.attrs = attrs;
                if s.local_only {
                    s.attrs.size = size;
                }
                s.etag = etag;
            }
            s.key = key;
            s.has_marker = has_marker;
            s.local_only = local_only && s.local_only;
            s.validated = Some(Instant::now());
            if lookup {
                s.lookups += 1;
            }
            drop(s);
            if lookup {
                t.revive(existing.ino);
            }
            return existing;
        }
        let ino = t.next;
        t.next += 1;
        let inode = Arc::new(Inode {
            ino,
            kind: attrs.kind,
            state: Mutex::new(InodeState {
                parent,
                name: name.to_owned(),
                key,
                attrs,
                etag,
                has_marker,
                validated: Some(Instant::now()),
                lookups: u64::from(lookup),
                symlink_target: None,
                local_only,
                staged: None,
                open_handles: 0,
                unlinked: false,
                listing_gen: 0,
            }),
        });
        t.inodes.insert(ino, inode.clone());
        t.by_name.insert(slot, ino);
        t.publish();
        if let Some(j) = self.journal.get() {
            // Before the reply that hands the kernel this number.
            j.node(ino, parent, inode.kind, name);
        }
        inode
    }

    /// Adds a kernel reference to an inode already known. If the kernel forgot it since it
    /// was found, it goes back into the table under its number first, so the kernel never
    /// holds a number the table does not know.
    pub fn add_lookup(&self, inode: &Arc<Inode>) {
        let mut t = self.table();
        Self::restore(&mut t, inode);
        t.revive(inode.ino);
        inode.state().lookups += 1;
    }

    /// The inode to hand the kernel for `parent/name` as a listing found it: the one the name
    /// maps to now, else `listed` itself, back in the table under its number if the kernel
    /// forgot it meanwhile (a kept listing holds its inodes, so a name keeps its number while
    /// a listing shows it). With `lookup`, a kernel reference is added under the table lock:
    /// every READDIRPLUS entry but `.` and `..` counts as a lookup for the kernel.
    pub fn listed(
        &self,
        parent: InodeNo,
        name: &str,
        listed: &Arc<Inode>,
        lookup: bool,
    ) -> Arc<Inode> {
        let mut t = self.table();
        let current = t
            .by_name
            .get(&(parent, name.to_owned()))
            .and_then(|i| t.inodes.get(i))
            .cloned();
        let inode = match current {
            Some(current) => current,
            None => {
                let here = {
                    let s = listed.state();
                    !s.unlinked && s.parent == parent && s.name == name
                };
                if here || lookup {
                    Self::restore(&mut t, listed);
                }
                listed.clone()
            }
        };
        if lookup {
            t.revive(inode.ino);
            inode.state().lookups += 1;
        }
        inode
    }

    /// Puts a forgotten inode back: its number, and its name unless the name is gone or
    /// taken by another inode since.
    fn restore(t: &mut Table, inode: &Arc<Inode>) {
        if t.inodes.contains_key(&inode.ino) {
            return;
        }
        t.inodes.insert(inode.ino, inode.clone());
        t.publish();
        let s = inode.state();
        if !s.unlinked {
            t.by_name
                .entry((s.parent, s.name.clone()))
                .or_insert(inode.ino);
        }
    }

    /// Drops `n` kernel references. An inode with none left that nothing uses is retained
    /// (see the module docs): still found by name and number, dropped only beyond
    /// [`MAX_RETAINED`].
    pub fn forget(&self, ino: InodeNo, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut t = self.table();
        Self::forget_in(&mut t, ino, n);
        t.publish();
    }

    fn forget_in(t: &mut Table, ino: InodeNo, n: u64) {
        let Some(inode) = t.inodes.get(&ino).cloned() else {
            return;
        };
        let mut s = inode.state();
        s.lookups = if s.lookups >= ADOPTED_LOOKUPS {
            // An adopted node. The kernel forgets a node it evicts with its whole count, and
            // otherwise only returns the one lookup a reply just made (a reply it could not
            // use). A forget of more than the lookups since the adoption therefore carries
            // references from before it: the kernel has let go of the node. (A node the kernel
            // had already forgotten before the adoption and looked up anew since is kept.)
            let since = s.lookups - ADOPTED_LOOKUPS;
            if n > since { 0 } else { s.lookups - n }
        } else {
            s.lookups.saturating_sub(n)
        };
        if s.lookups == 0 && s.open_handles == 0 && s.staged.is_none() {
            let unlinked = s.unlinked;
            drop(s);
            if unlinked {
                // Out of the namespace: nothing can look it up again.
                t.revive(ino);
                t.inodes.remove(&ino);
                return;
            }
            t.revive(ino);
            t.forget_seq += 1;
            let seq = t.forget_seq;
            t.retained.insert(ino, seq);
            t.retained_order.insert(seq, ino);
            t.trim_retained();
        }
    }

    /// Takes `parent/name` out of the namespace (unlink, rmdir, rename source). The inode
    /// itself lives on while the kernel or a handle holds it.
    pub fn detach(&self, parent: InodeNo, name: &str) -> Option<Arc<Inode>> {
        let mut t = self.table();
        let ino = t.by_name.remove(&(parent, name.to_owned()))?;
        if let Some(j) = self.journal.get() {
            j.unlinked(ino);
        }
        let inode = t.inodes.get(&ino).cloned();
        if t.retained.contains_key(&ino) {
            // Nothing holds it and nothing can find it any more.
            t.revive(ino);
            t.inodes.remove(&ino);
        }
        inode
    }

    /// Children of `parent` that exist only locally (not yet uploaded), for listings.
    pub fn local_children(&self, parent: InodeNo) -> Vec<Arc<Inode>> {
        let t = self.table();
        t.by_name
            .iter()
            .filter(|((p, _), _)| *p == parent)
            .filter_map(|(_, ino)| t.inodes.get(ino))
            .filter(|i| i.state().local_only)
            .cloned()
            .collect()
    }

    /// After a directory rename: rewrites the keys of every known inode under `old` to `new`.
    pub fn rekey_subtree(&self, old: &str, new: &str) {
        let t = self.table();
        for inode in t.inodes.values() {
            let mut s = inode.state();
            if let Some(rest) = s.key.strip_prefix(old) {
                s.key = format!("{new}{rest}");
            }
        }
    }

    /// Moves an inode to a new (parent, name, key), replacing whatever was there. The kernel
    /// moves its dentry along, so the inode number stays the same.
    pub fn relink(&self, inode: &Arc<Inode>, parent: InodeNo, name: &str, key: String) {
        let mut t = self.table();
        let mut s = inode.state();
        let old_slot = (s.parent, s.name.clone());
        if t.by_name.get(&old_slot) == Some(&inode.ino) {
            t.by_name.remove(&old_slot);
        }
        s.parent = parent;
        s.name = name.to_owned();
        s.key = key;
        s.unlinked = false;
        drop(s);
        t.by_name.insert((parent, name.to_owned()), inode.ino);
        if let Some(j) = self.journal.get() {
            j.moved(inode.ino, parent, name);
        }
    }

    /// Every known inode whose key starts with `prefix` (for directory renames).
    pub fn under(&self, prefix: &str) -> Vec<Arc<Inode>> {
        self.table()
            .inodes
            .values()
            .filter(|i| i.state().key.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Inodes in use: held by the kernel, a handle or local changes (retained ones not
    /// counted).
    pub fn len(&self) -> usize {
        let t = self.table();
        t.inodes.len() - t.retained.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::FsConfig;
    use s3vol_s3::BucketName;
    use std::time::SystemTime;

    fn file(inodes: &Inodes, name: &str) -> Arc<Inode> {
        let config = FsConfig::new(BucketName::new("bkt").unwrap(), String::new(), "/".into());
        let attrs = Attrs::defaults(Kind::File, &config, 0, SystemTime::now());
        inodes.upsert(ROOT, name, name.into(), attrs, None, false, false, false)
    }

    fn table() -> Inodes {
        let config = FsConfig::new(BucketName::new("bkt").unwrap(), String::new(), "/".into());
        Inodes::new(
            String::new(),
            Attrs::defaults(Kind::Dir, &config, 0, SystemTime::now()),
        )
    }

    #[test]
    fn listed_entries_count_as_lookups_and_keep_their_number() {
        let inodes = table();
        let a = file(&inodes, "a");
        assert_eq!(inodes.listed(ROOT, "a", &a, true).ino, a.ino);
        assert_eq!(a.state().lookups, 1);
        // The kernel forgets it: retained, under its number and name.
        inodes.forget(a.ino, 1);
        assert_eq!(inodes.len(), 1, "only the root is in use");
        assert_eq!(inodes.child(ROOT, "a").unwrap().ino, a.ino);
        // A kept listing hands it out again, under the same number and name.
        assert_eq!(inodes.listed(ROOT, "a", &a, true).ino, a.ino);
        assert_eq!(a.state().lookups, 1);
        assert_eq!(inodes.len(), 2);
        // Without a lookup (plain readdir) nothing is counted.
        inodes.listed(ROOT, "a", &a, false);
        assert_eq!(a.state().lookups, 1);
        // Forgotten again and looked up anew from S3: the same inode, the same number.
        inodes.forget(a.ino, 1);
        let a2 = file(&inodes, "a");
        assert!(Arc::ptr_eq(&a, &a2));
    }

    #[test]
    fn a_lookup_of_an_inode_forgotten_meanwhile_puts_it_back() {
        let inodes = table();
        let b = file(&inodes, "b");
        inodes.add_lookup(&b);
        inodes.forget(b.ino, 1);
        inodes.add_lookup(&b);
        assert_eq!(inodes.get(b.ino).unwrap().state().lookups, 1);
        assert_eq!(inodes.child(ROOT, "b").unwrap().ino, b.ino);
        // An unlinked inode comes back under its number only, not its old name.
        let c = file(&inodes, "c");
        inodes.detach(ROOT, "c");
        c.state().unlinked = true;
        inodes.listed(ROOT, "c", &c, true);
        assert!(inodes.get(c.ino).is_some() && inodes.child(ROOT, "c").is_none());
        // Forgotten once unlinked: gone for good.
        inodes.forget(c.ino, 1);
        assert!(inodes.get(c.ino).is_none());
    }

    #[test]
    fn an_adopted_node_is_let_go_of_when_the_kernel_evicts_it() {
        let inodes = table();
        let config = FsConfig::new(BucketName::new("bkt").unwrap(), String::new(), "/".into());
        let attrs = Attrs::defaults(Kind::File, &config, 0, SystemTime::now());
        inodes.adopt(7, ROOT, Some("a".into()), "a".into(), attrs.clone());
        let a = inodes.get(7).unwrap();
        // Two lookups after the adoption; the kernel returns one it could not use.
        inodes.add_lookup(&a);
        inodes.add_lookup(&a);
        inodes.forget(7, 1);
        assert_eq!(a.state().lookups, ADOPTED_LOOKUPS + 1, "still the kernel's");
        assert_eq!(inodes.len(), 2);
        // The eviction: the kernel's whole count, more than the lookups since the adoption.
        inodes.forget(7, 3);
        assert_eq!(a.state().lookups, 0);
        assert_eq!(inodes.len(), 1, "only the root is in use");
        assert_eq!(
            inodes.child(ROOT, "a").unwrap().ino,
            7,
            "retained under its number"
        );
        // An adopted node that was unlinked while open goes for good once evicted.
        inodes.adopt(8, ROOT, None, "b".into(), attrs);
        inodes.forget(8, 1);
        assert!(inodes.get(8).is_none());
        // One the kernel had forgotten before the adoption and looked up anew: its eviction
        // carries only the lookups since, and it is kept (retained only at unmount).
        inodes.adopt(
            9,
            ROOT,
            Some("c".into()),
            "c".into(),
            Attrs::defaults(Kind::File, &config, 0, SystemTime::now()),
        );
        let c = inodes.get(9).unwrap();
        inodes.add_lookup(&c);
        inodes.forget(9, 1);
        assert_eq!(c.state().lookups, ADOPTED_LOOKUPS);
    }

    #[test]
    fn retained_inodes_are_bounded_oldest_forgotten_first() {
        let inodes = table();
        let all: Vec<_> = (0..MAX_RETAINED + 2)
            .map(|i| {
                let f = file(&inodes, &format!("f{i}"));
                inodes.add_lookup(&f);
                f
            })
            .collect();
        for f in &all {
            inodes.forget(f.ino, 1);
        }
        // The two forgotten first are dropped; the others keep their numbers.
        assert!(inodes.child(ROOT, "f0").is_none() && inodes.child(ROOT, "f1").is_none());
        assert_eq!(inodes.child(ROOT, "f2").unwrap().ino, all[2].ino);
        let last = MAX_RETAINED + 1;
        assert_eq!(
            inodes.child(ROOT, &format!("f{last}")).unwrap().ino,
            all[last].ino
        );
        // Looked up again, an inode is in use and never dropped.
        inodes.add_lookup(&all[2]);
        for name in ["more", "and more"] {
            let f = file(&inodes, name);
            inodes.add_lookup(&f);
            inodes.forget(f.ino, 1);
        }
        assert_eq!(inodes.child(ROOT, "f2").unwrap().ino, all[2].ino);
        assert!(inodes.child(ROOT, "f3").is_none());
    }
}
