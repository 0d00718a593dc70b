//! The session journal: what a successor serving the same FUSE connection must know.
//!
//! When the process serving a mount dies, the kernel keeps the connection (its supervisor
//! still holds the `/dev/fuse` descriptor) and with it everything it was told: the INIT
//! parameters, the node IDs it holds, the file and directory handles applications have open.
//! A successor adopts the connection without a new INIT and must answer requests about all
//! of them. This journal holds exactly that, and nothing the bucket already holds:
//!
//! - `init`: the negotiated INIT reply (protocol, capabilities granted, max write, readahead);
//! - `n INO PARENT KIND NAME`: a node ID the kernel may hold, under its parent and name (keys
//!   are derived from the parent chain, so renaming a directory is one record, not one per
//!   descendant);
//! - `m INO PARENT NAME`: a node moved (rename); `u INO`: a node out of the namespace (unlinked,
//!   still held by the kernel or a handle);
//! - `o FH INO MODE SIZE ETAG`: a file handle, its open mode and the object version it read;
//!   `d FH INO`: a directory handle; `c FH`: a handle released.
//!
//! Records are text lines appended with one `write(2)` each (`O_APPEND`), before the reply
//! that hands the kernel the ID: a process killed at any point leaves every record of a reply
//! the kernel saw, and at most one torn last line, which is ignored. Nothing is fsynced: the
//! journal must survive the process, not the machine (a reboot ends the FUSE connection too).
//! Costs: one short write per new node ID and per open and close; nothing per read, write,
//! getattr or lookup of a known name.
//!
//! Lookup counts are not journaled (that would cost a write per lookup and per forget): an
//! adopted node is kept until unmount, as if the kernel never forgot it, which costs memory
//! in proportion to the nodes the kernel held at the crash and nothing else.
//!
//! The journal is rewritten compactly by each successor when it adopts (a new file renamed
//! over the old one), so it grows only with the life of one serving process.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

use crate::inode::InodeNo;
use crate::meta::Kind;

/// Bytes escaped in names: controls (a newline would end a record), space (the separator)
/// and `%` itself.
const NAME: &AsciiSet = &CONTROLS.add(b' ').add(b'%');

/// The file name of the journal in its session directory.
pub const FILE: &str = "fuse.journal";

/// A node the kernel may hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRec {
    pub parent: InodeNo,
    pub kind: Kind,
    /// `None` once out of the namespace.
    pub name: Option<String>,
}

/// An open handle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandleRec {
    File {
        ino: InodeNo,
        write: bool,
        append: bool,
        /// Size and ETag of the object version the handle reads (none: a local file).
        size: u64,
        etag: Option<String>,
    },
    Dir {
        ino: InodeNo,
    },
}

/// What a journal says, replayed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub init: Option<String>,
    pub nodes: BTreeMap<InodeNo, NodeRec>,
    pub handles: BTreeMap<u64, HandleRec>,
}

impl Snapshot {
    /// The largest node ID and handle number in use, so a successor never reuses one.
    pub fn max_ids(&self) -> (InodeNo, u64) {
        (
            self.nodes.keys().next_back().copied().unwrap_or(0),
            self.handles.keys().next_back().copied().unwrap_or(0),
        )
    }
}

fn kind_str(kind: Kind) -> &'static str {
    match kind {
        Kind::File => "f",
        Kind::Dir => "d",
        Kind::Symlink => "l",
    }
}

fn parse_kind(s: &str) -> Option<Kind> {
    Some(match s {
        "f" => Kind::File,
        "d" => Kind::Dir,
        "l" => Kind::Symlink,
        _ => return None,
    })
}

/// The bytes up to and including the last newline.
trait CompleteLines {
    fn rsplit_once_newline(&self) -> &[u8];
}

impl CompleteLines for Vec<u8> {
    fn rsplit_once_newline(&self) -> &[u8] {
        match self.iter().rposition(|b| *b == b'\n') {
            Some(i) => &self[..i],
            None => &[],
        }
    }
}

fn enc(name: &str) -> String {
    utf8_percent_encode(name, NAME).to_string()
}

fn dec(s: &str) -> Option<String> {
    percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// An open journal, appended to.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Mutex<File>,
}

impl Journal {
    /// Starts an empty journal in `dir` (a new connection), replacing any earlier one.
    pub fn create(dir: &Path) -> io::Result<Self> {
        Self::write_snapshot(dir, &Snapshot::default())
    }

    /// Reads the journal in `dir` (what the predecessor left).
    pub fn read(dir: &Path) -> io::Result<Snapshot> {
        let text = std::fs::read(dir.join(FILE))?;
        let mut snap = Snapshot::default();
        // Only complete lines: a record torn by a kill has no newline yet.
        let complete = text.rsplit_once_newline();
        for line in complete.split(|b| *b == b'\n') {
            if let Ok(line) = std::str::from_utf8(line) {
                snap.apply(line);
            }
        }
        Ok(snap)
    }

    /// Writes `snap` as a new journal (to a temporary file renamed over the old one) and
    /// opens it for appending.
    pub fn write_snapshot(dir: &Path, snap: &Snapshot) -> io::Result<Self> {
        let path = dir.join(FILE);
        let tmp = dir.join(format!("{FILE}.new"));
        let mut text = String::new();
        if let Some(init) = &snap.init {
            text.push_str(&format!("init {init}\n"));
        }
        for (ino, n) in &snap.nodes {
            text.push_str(&format!(
                "n {ino} {} {} {}\n",
                n.parent,
                kind_str(n.kind),
                n.name.as_deref().map_or_else(|| "-".to_owned(), enc)
            ));
            if n.name.is_none() {
                text.push_str(&format!("u {ino}\n"));
            }
        }
        for (fh, h) in &snap.handles {
            text.push_str(&handle_line(*fh, h));
        }
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
        }
        std::fs::rename(&tmp, &path)?;
        let file = OpenOptions::new().append(true).open(&path)?;
        Ok(Self {
            path,
            file: Mutex::new(file),
        })
    }

    /// Appends one record. A failure is logged, not returned: the mount goes on serving,
    /// only a successor would lose what the record says.
    fn append(&self, line: &str) {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()) {
            metrics::counter!("s3vol_session_journal_errors_total").increment(1);
            tracing::warn!(error = %e, path = %self.path.display(), "cannot append to the session journal; a successor of this process may not resume every open file");
        }
    }

    pub fn init(&self, init: &str) {
        self.append(&format!("init {init}\n"));
    }

    pub fn node(&self, ino: InodeNo, parent: InodeNo, kind: Kind, name: &str) {
        self.append(&format!(
            "n {ino} {parent} {} {}\n",
            kind_str(kind),
            enc(name)
        ));
    }

    pub fn moved(&self, ino: InodeNo, parent: InodeNo, name: &str) {
        self.append(&format!("m {ino} {parent} {}\n", enc(name)));
    }

    pub fn unlinked(&self, ino: InodeNo) {
        self.append(&format!("u {ino}\n"));
    }

    pub fn opened(&self, fh: u64, h: &HandleRec) {
        self.append(&handle_line(fh, h));
    }

    pub fn closed(&self, fh: u64) {
        self.append(&format!("c {fh}\n"));
    }
}

fn handle_line(fh: u64, h: &HandleRec) -> String {
    match h {
        HandleRec::File {
            ino,
            write,
            append,
            size,
            etag,
        } => {
            let mode = match (write, append) {
                (false, _) => "r",
                (true, false) => "w",
                (true, true) => "a",
            };
            format!(
                "o {fh} {ino} {mode} {size} {}\n",
                etag.as_deref().map_or_else(|| "-".to_owned(), enc)
            )
        }
        HandleRec::Dir { ino } => format!("d {fh} {ino}\n"),
    }
}

impl Snapshot {
    /// Applies one record; malformed ones (a torn last line) are ignored.
    fn apply(&mut self, line: &str) {
        if let Some(init) = line.strip_prefix("init ") {
            self.init = Some(init.to_owned());
            return;
        }
        let f: Vec<&str> = line.split(' ').collect();
        let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
        match (f.first().copied(), f.len()) {
            (Some("n"), 5) => {
                if let (Some(ino), Some(parent), Some(kind), Some(name)) =
                    (num(1), num(2), parse_kind(f[3]), dec(f[4]))
                {
                    self.nodes.insert(
                        ino,
                        NodeRec {
                            parent,
                            kind,
                            name: Some(name),
                        },
                    );
                }
            }
            (Some("m"), 4) => {
                if let (Some(ino), Some(parent), Some(name)) = (num(1), num(2), dec(f[3]))
                    && let Some(n) = self.nodes.get_mut(&ino)
                {
                    n.parent = parent;
                    n.name = Some(name);
                }
            }
            (Some("u"), 2) => {
                if let Some(n) = num(1).and_then(|ino| self.nodes.get_mut(&ino)) {
                    n.name = None;
                }
            }
            (Some("o"), 6) => {
                let mode = f[3];
                if let (Some(fh), Some(ino), Some(size), Some(etag)) =
                    (num(1), num(2), num(4), dec(f[5]))
                    && matches!(mode, "r" | "w" | "a")
                {
                    self.handles.insert(
                        fh,
                        HandleRec::File {
                            ino,
                            write: mode != "r",
                            append: mode == "a",
                            size,
                            etag: (etag != "-").then_some(etag),
                        },
                    );
                }
            }
            (Some("d"), 3) => {
                if let (Some(fh), Some(ino)) = (num(1), num(2)) {
                    self.handles.insert(fh, HandleRec::Dir { ino });
                }
            }
            (Some("c"), 2) => {
                if let Some(fh) = num(1) {
                    self.handles.remove(&fh);
                }
            }
            _ => {}
        }
    }

    /// The keys of the files a handle has open for writing (under `root_key`, the mount's
    /// prefix).
    pub fn keys_open_for_writing(&self, root_key: &str) -> HashSet<String> {
        let keys = self.keys(root_key);
        self.handles
            .values()
            .filter_map(|h| match h {
                HandleRec::File {
                    ino, write: true, ..
                } => keys.get(ino).cloned(),
                _ => None,
            })
            .collect()
    }

    /// The key of every named node, derived from the parent chain under `root_key` (the
    /// mount's prefix). Nodes out of the namespace, or under one, get none.
    pub fn keys(&self, root_key: &str) -> HashMap<InodeNo, String> {
        let mut keys: HashMap<InodeNo, String> = HashMap::new();
        keys.insert(crate::inode::ROOT, root_key.to_owned());
        for &ino in self.nodes.keys() {
            let mut chain = Vec::new();
            let mut at = ino;
            // Bounded: a chain longer than the table is a loop (a corrupt journal).
            while !keys.contains_key(&at) && chain.len() <= self.nodes.len() {
                let Some(n) = self.nodes.get(&at) else { break };
                chain.push(at);
                at = n.parent;
            }
            let Some(mut key) = keys.get(&at).cloned() else {
                continue;
            };
            for &i in chain.iter().rev() {
                let n = &self.nodes[&i];
                let Some(name) = &n.name else { break };
                key = if n.kind == Kind::Dir {
                    format!("{key}{name}/")
                } else {
                    format!("{key}{name}")
                };
                keys.insert(i, key.clone());
            }
        }
        keys
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn records_replay_to_nodes_keys_and_handles_and_a_torn_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::create(dir.path()).unwrap();
        j.init("{\"major\":7}");
        j.node(2, 1, Kind::Dir, "a dir");
        j.node(3, 2, Kind::File, "f%1\nx");
        j.node(4, 1, Kind::Dir, "b");
        j.opened(
            7,
            &HandleRec::File {
                ino: 3,
                write: false,
                append: false,
                size: 5,
                etag: Some("\"abc\"".into()),
            },
        );
        j.opened(8, &HandleRec::Dir { ino: 2 });
        j.closed(8);
        // Rename the directory under b: its child follows without a record of its own.
        j.moved(2, 4, "c");
        j.node(5, 1, Kind::File, "gone");
        j.unlinked(5);
        drop(j);
        // A record torn by a kill in the middle of a write.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        f.write_all(b"o 9 3 w").unwrap();
        let snap = Journal::read(dir.path()).unwrap();
        assert_eq!(snap.init.as_deref(), Some("{\"major\":7}"));
        let keys = snap.keys("pre/");
        assert_eq!(keys[&3], "pre/b/c/f%1\nx");
        assert_eq!(keys[&2], "pre/b/c/");
        assert!(!keys.contains_key(&5), "unlinked nodes have no key");
        assert_eq!(snap.nodes[&5].name, None);
        assert_eq!(snap.handles.len(), 1);
        assert!(matches!(
            &snap.handles[&7],
            HandleRec::File { ino: 3, write: false, size: 5, etag: Some(e), .. } if e == "\"abc\""
        ));
        assert_eq!(snap.max_ids(), (5, 7));
        // A compact rewrite says the same.
        let j = Journal::write_snapshot(dir.path(), &snap).unwrap();
        drop(j);
        assert_eq!(Journal::read(dir.path()).unwrap(), snap);
    }
}
