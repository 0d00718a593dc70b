//! The FUSE adapter: serves an [`S3Fs`] to the kernel through `fuser`.
//!
//! Every request is handed to the tokio runtime as a task that replies when done, so slow S3
//! calls never hold up the threads reading `/dev/fuse`, and requests run concurrently (lookups
//! and getattr first run on the reader thread until they must wait: see
//! `FuseFs::run_here_first`). This is the only module that knows `fuser`'s types.
//!
//! Reader threads: a mount made here gives each its own cloned descriptor
//! (`FUSE_DEV_IOC_CLONE`, which needs a fresh `open("/dev/fuse")`); a handed-over descriptor
//! ([`FuseServer::from_fd`], the CSI case) is shared by all of them instead, because a serving
//! process never opens `/dev/fuse` (DESIGN.md decision 11; the mounter's pod has none). This
//! departs from "cloned fds" in decision 2 for that case only; the kernel still gives each
//! request to exactly one reader.
//!
//! Failover: [`FuseServer::adopt`] serves a descriptor whose INIT a predecessor answered (the
//! supervisor kept the connection when it died). It answers no INIT, reloads what the kernel
//! holds from the session journal (`journal.rs`), and asks the kernel to resend what the
//! predecessor had read and not answered (`FUSE_NOTIFY_RESEND`, Linux 6.9+). A resent request
//! may have been carried out already: where doing it again would answer differently
//! (`mkdir`, `symlink` find the name taken; `unlink`, `rmdir` find it gone; `rename`
//! finds the source gone and the target there), the answer is the one the first run gave.
//!
//! Without `FUSE_NOTIFY_RESEND` (Linux before 6.9) the successor answers those requests with
//! `EIO` instead, so their callers get an error rather than wait forever. The kernel matches a
//! reply to a request by unique ID on the device's list of requests read and not answered,
//! which the successor shares (it holds the same open file, and a handed-over descriptor is
//! never cloned, so every reader of the predecessor used it); an ID not there (answered, or
//! not read yet) is refused with `ENOENT` and changes nothing. So before it reads any request,
//! the successor writes an `EIO` reply for every ID between the bounds its predecessor kept
//! (`inflight.rs`; fuser reports them after each request read and each reply), and that
//! answers exactly the requests the predecessor left.

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InFlightBounds, InFlightRecorder, InitFlags, IoctlFlags, KernelConfig, LockOwner, MountOption,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    RequestId, Session, SessionACL, SessionUnmounter, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;

use crate::budget::BufPool;
use crate::error::FsError;
use crate::fs::{OpenMode, S3Fs};
use crate::inflight::{InflightFile, Sweep};
use crate::meta::{Attrs, Kind};

/// How the mount is presented to the kernel.
#[derive(Clone, Debug)]
pub struct MountSettings {
    /// Shown as the mount's source (`s3vol:bucket/prefix`).
    pub fs_name: String,
    pub allow_other: bool,
    pub read_only: bool,
    /// Threads reading requests from the kernel.
    pub threads: usize,
}

/// A filesystem connected to the kernel, ready to serve.
pub struct FuseServer {
    session: Session<FuseFs>,
    /// Adopted from a predecessor: what it left in flight is resent or failed before serving.
    predecessor: Option<Predecessor>,
}

/// What a successor knows of the requests its predecessor had read and not answered.
#[derive(Debug)]
struct Predecessor {
    /// `(oldest, newest)` request IDs, as it kept them; `None` if it kept none (a version
    /// before `inflight.rs`).
    in_flight: Option<(u64, u64)>,
}

/// Test switch: set to `1` in a serving process's environment, it takes the path of kernels
/// without `FUSE_NOTIFY_RESEND` (before Linux 6.9) on any kernel: a successor fails the
/// requests its predecessor left instead of having them resent. For tests of that path only.
const NO_RESEND_ENV: &str = "S3VOL_FAILOVER_NO_RESEND";

/// Keeps fuser's bounds of the requests in flight in the session directory.
struct FileRecorder(InflightFile);

impl InFlightRecorder for FileRecorder {
    fn record(&self, b: InFlightBounds) {
        self.0.record(b.oldest.0, b.newest.0);
    }
}

/// What [`FuseServer::adopt`] found and did, for the log and metrics.
#[derive(Debug)]
pub struct Adoption {
    pub nodes: usize,
    pub file_handles: usize,
    pub dir_handles: usize,
    /// The INIT reply the predecessor negotiated, as journaled.
    pub init: Option<String>,
}

impl std::fmt::Debug for FuseServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseServer").finish_non_exhaustive()
    }
}

/// Unmounts a mount made by [`FuseServer::mount`] from another thread.
pub struct Unmounter(SessionUnmounter);

impl std::fmt::Debug for Unmounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unmounter").finish_non_exhaustive()
    }
}

impl Unmounter {
    pub fn unmount(&mut self) -> io::Result<()> {
        self.0.unmount()
    }
}

fn config(settings: &MountSettings) -> Config {
    let mut options = vec![
        MountOption::FSName(settings.fs_name.clone()),
        MountOption::Subtype("s3vol".into()),
        MountOption::DefaultPermissions,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoAtime,
    ];
    options.push(if settings.read_only {
        MountOption::RO
    } else {
        MountOption::RW
    });
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = if settings.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(settings.threads.max(1));
    config.clone_fd = true;
    config
}

/// The session configuration for a handed-over descriptor: the reader threads share that one
/// descriptor instead of cloning it. `FUSE_DEV_IOC_CLONE` needs a fresh `open("/dev/fuse")`,
/// which a serving process must never do (DESIGN.md decision 11): in the CSI mounter's pod
/// there is no `/dev/fuse` and no right to open it. Several threads reading one descriptor is
/// how libfuse's multithreaded loop works without `clone_fd`; the kernel hands each request to
/// exactly one reader.
fn config_for_fd(settings: &MountSettings) -> Config {
    let mut config = config(settings);
    config.clone_fd = false;
    config
}

impl FuseServer {
    /// Mounts at `mountpoint` (mount(2) as root, else through fusermount3) and completes the
    /// FUSE handshake: when this returns, the filesystem answers.
    pub fn mount(
        fs: Arc<S3Fs>,
        rt: Handle,
        mountpoint: &Path,
        settings: &MountSettings,
    ) -> io::Result<Self> {
        let session = Session::new(FuseFs::new(fs, rt), mountpoint, &config(settings))?;
        Ok(Self {
            session,
            predecessor: None,
        })
    }

    /// Serves an already mounted `/dev/fuse` descriptor (handed over by the CSI node plugin),
    /// and only that descriptor: `/dev/fuse` is never opened (reader threads share it). When this
    /// returns the INIT handshake is done; the mount answers once [`FuseServer::run`] runs.
    pub fn from_fd(
        fs: Arc<S3Fs>,
        rt: Handle,
        fd: OwnedFd,
        settings: &MountSettings,
    ) -> io::Result<Self> {
        let acl = if settings.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        let session = Session::from_fd(FuseFs::new(fs, rt), fd, acl, config_for_fd(settings))?;
        Ok(Self {
            session,
            predecessor: None,
        })
    }

    /// Serves a descriptor whose connection a predecessor initialised and journaled in
    /// `session_dir` (see the module docs): no INIT; the node IDs, handles and INIT reply come
    /// from the journal. Once [`FuseServer::run`] runs, the requests the predecessor had read
    /// are resent by the kernel and served (Linux 6.9 and later) or answered with `EIO`.
    pub fn adopt(
        fs: Arc<S3Fs>,
        rt: Handle,
        fd: OwnedFd,
        settings: &MountSettings,
        session_dir: &Path,
    ) -> io::Result<(Self, Adoption)> {
        let adopted = rt.block_on(fs.adopt(session_dir))?;
        if let Some(init) = &adopted.init
            && !init.contains(&format!("\"max_write\":{MAX_WRITE}"))
        {
            tracing::warn!(
                init,
                max_write = MAX_WRITE,
                "the connection was initialised with another max_write than this version uses; writes are answered as they come"
            );
        }
        let acl = if settings.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        let (in_flight_file, in_flight) = InflightFile::open(session_dir)?;
        let mut session =
            Session::from_fd_initialized(FuseFs::new(fs, rt), fd, acl, config_for_fd(settings));
        let newest = in_flight.map_or(0, |(_, newest)| newest);
        session.record_in_flight(Arc::new(FileRecorder(in_flight_file)), RequestId(newest));
        let adoption = Adoption {
            nodes: adopted.nodes,
            file_handles: adopted.file_handles,
            dir_handles: adopted.dir_handles,
            init: adopted.init,
        };
        Ok((
            Self {
                session,
                predecessor: Some(Predecessor { in_flight }),
            },
            adoption,
        ))
    }

    /// Keeps the bounds of the requests in flight in `session_dir` (the first server of a
    /// connection that a successor may take over), for [`FuseServer::adopt`] to fail them on
    /// kernels that cannot resend them.
    pub fn record_in_flight(&mut self, session_dir: &Path) -> io::Result<()> {
        let file = InflightFile::create(session_dir)?;
        self.session
            .record_in_flight(Arc::new(FileRecorder(file)), RequestId(0));
        Ok(())
    }

    pub fn unmounter(&mut self) -> Unmounter {
        Unmounter(self.session.unmount_callable())
    }

    /// Serves until the filesystem is unmounted. Pending uploads are flushed on the way out.
    pub fn run(self) -> io::Result<()> {
        if let Some(p) = &self.predecessor {
            take_over_in_flight(&self.session, p);
        }
        self.session.run()
    }
}

/// Before the first request is read: has the kernel queue again what a dead predecessor had
/// read and not answered, or, where it cannot (Linux before 6.9), answers it with `EIO`.
fn take_over_in_flight(session: &Session<FuseFs>, p: &Predecessor) {
    let resent = if std::env::var_os(NO_RESEND_ENV).is_some_and(|v| v == "1") {
        Err(io::Error::other(format!("not asked ({NO_RESEND_ENV}=1)")))
    } else {
        session.notifier().resend()
    };
    let e = match resent {
        Ok(()) => {
            tracing::info!(
                "asked the kernel to resend the requests the previous serving process had not answered"
            );
            return;
        }
        Err(e) => e,
    };
    metrics::counter!("s3vol_failover_resend_unsupported_total").increment(1);
    let Some((oldest, newest)) = p.in_flight else {
        tracing::error!(
            error = %e,
            "this kernel cannot resend the requests the previous serving process had read (FUSE_NOTIFY_RESEND needs Linux 6.9 or later), and that process kept no record of them (an older version): the calls that were in flight do not return until interrupted"
        );
        return;
    };
    let sweep = Sweep::new(oldest, newest);
    let started = std::time::Instant::now();
    let ids = sweep.ids().map(RequestId);
    match session.fail_unanswered(ids, Errno::EIO) {
        Ok(failed) => {
            metrics::counter!("s3vol_failover_requests_failed_total").increment(failed);
            tracing::warn!(
                error = %e,
                failed,
                swept = sweep.len(),
                first = sweep.first,
                last = sweep.last,
                sweep_ms = started.elapsed().as_millis() as u64,
                "this kernel cannot resend the requests the previous serving process had read (FUSE_NOTIFY_RESEND needs Linux 6.9 or later): the calls that were in flight got EIO"
            );
        }
        Err(error) => tracing::error!(
            %error,
            swept = sweep.len(),
            "cannot answer the requests the previous serving process left in flight"
        ),
    }
    if sweep.skipped > 0 {
        tracing::error!(
            skipped = sweep.skipped,
            oldest,
            newest,
            "the record of the requests in flight spans more IDs than a sweep answers: only the newest were answered, an older call still in flight waits until interrupted"
        );
    }
}

/// Whether a request is one the kernel sent again after a predecessor died holding it.
fn resent(req: &Request) -> bool {
    let resent = RequestId::is_resend(req.unique());
    if resent {
        metrics::counter!("s3vol_failover_resent_requests_total").increment(1);
        tracing::debug!(unique = req.unique().0, "serving a resent request");
    }
    resent
}

struct FuseFs {
    fs: Arc<S3Fs>,
    rt: Handle,
    ttl: Duration,
    /// Copies of write requests' data, which outlive the request buffer.
    write_bufs: Arc<BufPool>,
    /// `--no-xattr`: xattr requests get ENOSYS, after which the kernel sends no more.
    xattrs: bool,
}

/// The largest write the kernel sends (`max_write`).
const MAX_WRITE: usize = 1 << 20;

impl FuseFs {
    fn new(fs: Arc<S3Fs>, rt: Handle) -> Self {
        let ttl = fs.config().metadata_ttl;
        let xattrs = fs.config().xattrs;
        Self {
            xattrs,
            fs,
            rt,
            ttl,
            write_bufs: Arc::new(BufPool::new(MAX_WRITE, 16)),
        }
    }

    /// Runs `f` on the runtime; it replies.
    fn spawn<F>(&self, f: impl FnOnce(Arc<S3Fs>) -> F + Send + 'static)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let fs = self.fs.clone();
        self.rt.spawn(async move { f(fs).await });
    }

    /// Runs `f`, which replies, first here, on the reader thread, as far as it goes without
    /// waiting, and on the runtime from there if it must wait. For lookups and getattr: one
    /// answered from memory (a name known and current, a HEAD made ahead and already back)
    /// so costs no hand-over to a worker thread and back, two context switches and a futex
    /// wake, which were most of its CPU time (`stat` of 10,000 names against Garage: 1.5×
    /// faster). Not for the rest: a call that must wait pays a second first poll, and
    /// reads and listings measured no gain (docs/benchmarks.md, profiles of 2026-12-07).
    ///
    /// Safe for any future: the first poll runs inside the runtime's context with a waker
    /// that does nothing, and a future not finished by it is spawned, which polls it again
    /// at once with the task's own waker, so a resource that became ready in between is not
    /// missed. Other reader threads go on reading meanwhile.
    fn run_here_first<F>(&self, f: impl FnOnce(Arc<S3Fs>) -> F + Send + 'static)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let _runtime = self.rt.enter();
        let mut task = Box::pin(f(self.fs.clone()));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if task.as_mut().poll(&mut cx).is_pending() {
            self.rt.spawn(task);
        }
    }
}

/// For a resent request that finds its work done: the node at `parent/name`, if it is of
/// the kind the request made. The lookup counts as the one the request's reply gives.
async fn done_before(fs: &S3Fs, parent: u64, name: &str, kind: Kind) -> Option<(u64, Attrs)> {
    match fs.lookup(parent, name).await {
        Ok((inode, attrs)) if attrs.kind == kind => Some((inode.ino, attrs)),
        Ok((inode, _)) => {
            fs.forget(inode.ino, 1);
            None
        }
        Err(_) => None,
    }
}

fn errno(op: &str, e: &FsError) -> Errno {
    match e.errno {
        libc::ENOENT | libc::ENODATA | libc::EEXIST | libc::ENOTEMPTY => {
            tracing::debug!(op, error = %e)
        }
        // The kernel asks for `security.capability` at every write.
        libc::EOPNOTSUPP if op.ends_with("xattr") => tracing::debug!(op, error = %e),
        _ => tracing::warn!(op, error = %e, "filesystem operation failed"),
    }
    Errno::from_i32(e.errno)
}

pub(crate) fn file_attr(ino: u64, a: &Attrs) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        // S3 keeps no count of a directory's subdirectories: 2 whatever it holds (see
        // docs/SEMANTICS.md); a file removed while open gets 0 in `getattr`.
        nlink: if a.kind == Kind::Dir { 2 } else { 1 },
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 128 * 1024,
        flags: 0,
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
    }
}

fn time(t: Option<TimeOrNow>) -> Option<SystemTime> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    })
}

fn open_mode(flags: i32) -> OpenMode {
    OpenMode {
        write: flags & libc::O_ACCMODE != libc::O_RDONLY,
        truncate: flags & libc::O_TRUNC != 0,
        append: flags & libc::O_APPEND != 0,
    }
}

fn name_str(name: &OsStr) -> Result<String, Errno> {
    name.to_str().map(str::to_owned).ok_or(Errno::EINVAL)
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE as u32);
        let _ = config.set_max_readahead(1 << 20);
        for cap in [
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            // READDIRPLUS, AUTO: the kernel asks for attributes with a directory's first
            // batch, and for later batches once entries it got so are being used (`ls -l`
            // stats each batch as it reads it); a bare `ls` gets plain names after that.
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
        ] {
            let _ = config.add_capabilities(cap);
        }
        // What a successor on this connection must answer by (journaled only when supervised).
        let abi = config.kernel_abi();
        self.fs.journal_init(&format!(
            "{{\"abi\":\"{abi:?}\",\"kernel_capabilities\":{},\"max_write\":{MAX_WRITE},\"max_readahead\":{}}}",
            config.capabilities().bits(),
            1 << 20
        ));
        Ok(())
    }

    fn destroy(&mut self) {
        let fs = self.fs.clone();
        let failed = self.rt.block_on(async move { fs.flush_all().await });
        for (key, e) in &failed {
            tracing::warn!(key, error = %e, "not uploaded at unmount; tried again before the process exits, which then keeps what fails on disk");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::ENOENT);
        };
        let ttl = self.ttl;
        self.run_here_first(move |fs| async move {
            match fs.lookup(parent.0, &name).await {
                Ok((inode, attrs)) => {
                    reply.entry(&ttl, &file_attr(inode.ino, &attrs), Generation(0))
                }
                Err(e) => reply.error(errno("lookup", &e)),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = self.ttl;
        self.run_here_first(move |fs| async move {
            match fs.getattr(ino.0).await {
                Ok(attrs) => {
                    let mut attr = file_attr(ino.0, &attrs);
                    if fs.is_unlinked(ino.0) {
                        // Removed while open: no name links to it any more.
                        attr.nlink = 0;
                    }
                    reply.attr(&ttl, &attr)
                }
                Err(e) => reply.error(errno("getattr", &e)),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ttl = self.ttl;
        let (atime, mtime) = (time(atime), time(mtime));
        self.spawn(move |fs| async move {
            match fs.setattr(ino.0, mode, uid, gid, size, atime, mtime).await {
                Ok(attrs) => reply.attr(&ttl, &file_attr(ino.0, &attrs)),
                Err(e) => reply.error(errno("setattr", &e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn(move |fs| async move {
            match fs.readlink(ino.0).await {
                Ok(t) => reply.data(t.as_bytes()),
                Err(e) => reply.error(errno("readlink", &e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            tracing::debug!(?name, mode, "mknod of a special file refused");
            return reply.error(Errno::EPERM);
        }
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::EINVAL);
        };
        let (uid, gid, ttl) = (req.uid(), req.gid(), self.ttl);
        self.spawn(move |fs| async move {
            let made = async {
                let (inode, _, fh) = fs
                    .create(parent.0, &name, mode, uid, gid, OpenMode::default())
                    .await?;
                let flushed = fs.flush(fh).await;
                fs.release(fh).await?;
                flushed?;
                Ok::<_, FsError>(inode)
            };
            match made.await {
                Ok(inode) => reply.entry(
                    &ttl,
                    &file_attr(inode.ino, &fs.attrs_of(&inode)),
                    Generation(0),
                ),
                Err(e) => reply.error(errno("mknod", &e)),
            }
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::EINVAL);
        };
        let (uid, gid, ttl) = (req.uid(), req.gid(), self.ttl);
        let replay = resent(req);
        self.spawn(move |fs| async move {
            match fs.mkdir(parent.0, &name, mode, uid, gid).await {
                Ok((inode, attrs)) => {
                    reply.entry(&ttl, &file_attr(inode.ino, &attrs), Generation(0))
                }
                Err(e) if replay && e.errno == libc::EEXIST => {
                    match done_before(&fs, parent.0, &name, Kind::Dir).await {
                        Some((ino, attrs)) => {
                            reply.entry(&ttl, &file_attr(ino, &attrs), Generation(0))
                        }
                        None => reply.error(errno("mkdir", &e)),
                    }
                }
                Err(e) => reply.error(errno("mkdir", &e)),
            }
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::ENOENT);
        };
        let replay = resent(req);
        self.spawn(move |fs| async move {
            match fs.unlink(parent.0, &name).await {
                Ok(()) => reply.ok(),
                // The predecessor deleted it and died before answering.
                Err(e) if replay && e.errno == libc::ENOENT => reply.ok(),
                Err(e) => reply.error(errno("unlink", &e)),
            }
        });
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::ENOENT);
        };
        let replay = resent(req);
        self.spawn(move |fs| async move {
            match fs.rmdir(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) if replay && e.errno == libc::ENOENT => reply.ok(),
                Err(e) => reply.error(errno("rmdir", &e)),
            }
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let Ok(name) = name_str(link_name) else {
            return reply.error(Errno::EINVAL);
        };
        let Some(target) = target.to_str().map(str::to_owned) else {
            return reply.error(Errno::EINVAL);
        };
        let (uid, gid, ttl) = (req.uid(), req.gid(), self.ttl);
        let replay = resent(req);
        self.spawn(move |fs| async move {
            match fs.symlink(parent.0, &name, &target, uid, gid).await {
                Ok((inode, attrs)) => {
                    reply.entry(&ttl, &file_attr(inode.ino, &attrs), Generation(0))
                }
                Err(e) if replay && e.errno == libc::EEXIST => {
                    match done_before(&fs, parent.0, &name, Kind::Symlink).await {
                        Some((ino, attrs)) => {
                            reply.entry(&ttl, &file_attr(ino, &attrs), Generation(0))
                        }
                        None => reply.error(errno("symlink", &e)),
                    }
                }
                Err(e) => reply.error(errno("symlink", &e)),
            }
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (Ok(name), Ok(newname)) = (name_str(name), name_str(newname)) else {
            return reply.error(Errno::EINVAL);
        };
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT);
        let replay = resent(req);
        self.spawn(move |fs| async move {
            let source = if replay {
                fs.known_child(parent.0, &name)
            } else {
                None
            };
            match fs
                .rename(parent.0, &name, newparent.0, &newname, no_replace, exchange)
                .await
            {
                Ok(()) => reply.ok(),
                // The predecessor moved it and died before answering: the source is gone
                // and the target is there.
                Err(e)
                    if replay
                        && e.errno == libc::ENOENT
                        && fs.resent_rename_done(source, newparent.0, &newname).await =>
                {
                    reply.ok()
                }
                Err(e) => reply.error(errno("rename", &e)),
            }
        });
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        // Objects cannot share content: hard links do not exist in S3.
        reply.error(Errno::EPERM);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mode = open_mode(flags.0);
        self.spawn(move |fs| async move {
            match fs.open(ino.0, mode).await {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(errno("open", &e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Most sequential reads are answered from prefetched data right here, sparing a task
        // and a thread switch per request.
        let fast = {
            let _rt = self.rt.enter();
            self.fs.try_read(fh.0, offset, size)
        };
        match fast {
            Some(Ok(data)) => return reply.data(&data),
            Some(Err(e)) => return reply.error(errno("read", &e)),
            None => {}
        }
        self.spawn(move |fs| async move {
            match fs.read(fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno("read", &e)),
            }
        });
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut buf = self.write_bufs.take();
        buf.extend_from_slice(data);
        let bufs = self.write_bufs.clone();
        let replay = resent(req);
        self.spawn(move |fs| async move {
            let written = if replay {
                fs.write_resent(fh.0, offset, &buf).await
            } else {
                fs.write(fh.0, offset, &buf).await
            };
            match written {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno("write", &e)),
            }
            bufs.give(buf);
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.spawn(move |fs| async move {
            match fs.flush(fh.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("flush", &e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn(move |fs| async move {
            match fs.release(fh.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("release", &e)),
            }
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn(move |fs| async move {
            match fs.fsync(fh.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("fsync", &e)),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(ino.0) {
            Ok(fh) => {
                reply.opened(FileHandle(fh), FopenFlags::empty());
                let ahead = self.fs.walk_ahead(ino.0);
                if !ahead.is_empty() {
                    self.spawn(move |fs| async move { fs.list_ahead(ahead).await });
                }
            }
            Err(e) => reply.error(errno("opendir", &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.spawn(move |fs| async move {
            let filled = fs
                .readdir(fh.0, offset, false, |e| {
                    reply.add(INodeNo(e.ino), e.next_offset, file_type(e.kind), e.name)
                })
                .await;
            match filled {
                Ok(unread) => {
                    reply.ok();
                    fs.refresh_unread(unread).await;
                    let ahead = fs.walk_into(ino.0);
                    fs.list_ahead(ahead).await;
                }
                Err(e) => reply.error(errno("readdir", &e)),
            }
        });
    }

    /// Names with their attributes, so `ls -l` and `find` need no LOOKUP per entry. Each
    /// entry sent (but `.` and `..`) is a lookup the kernel will FORGET; `S3Fs::readdir`
    /// counts it.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ttl = self.ttl;
        self.spawn(move |fs| async move {
            let filled = fs
                .readdir(fh.0, offset, true, |e| match e.attrs {
                    Some(attrs) => reply.add(
                        INodeNo(e.ino),
                        e.next_offset,
                        e.name,
                        &ttl,
                        &file_attr(e.ino, attrs),
                        Generation(0),
                    ),
                    None => reply.add_name_only(
                        INodeNo(e.ino),
                        e.next_offset,
                        file_type(e.kind),
                        e.name,
                    ),
                })
                .await;
            match filled {
                Ok(unread) => {
                    reply.ok();
                    fs.refresh_unread(unread).await;
                    let ahead = fs.walk_into(ino.0);
                    fs.list_ahead(ahead).await;
                }
                Err(e) => reply.error(errno("readdirplus", &e)),
            }
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directory changes are made in S3 when they happen.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Buckets have no size limit; report a large, constant one so tools that check free
        // space before writing go ahead.
        const BLOCKS: u64 = 1 << 40;
        reply.statfs(BLOCKS, BLOCKS, BLOCKS, 1 << 32, 1 << 32, 4096, 255, 4096);
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if !self.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::EINVAL);
        };
        let value = value.to_vec();
        let create = flags & libc::XATTR_CREATE != 0;
        let replace = flags & libc::XATTR_REPLACE != 0;
        self.spawn(move |fs| async move {
            match fs.setxattr(ino.0, &name, &value, create, replace).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("setxattr", &e)),
            }
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !self.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::ENODATA);
        };
        match self.fs.getxattr(ino.0, &name) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno("getxattr", &e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        match self.fs.listxattr(ino.0) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno("listxattr", &e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if !self.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::ENODATA);
        };
        self.spawn(move |fs| async move {
            match fs.removexattr(ino.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("removexattr", &e)),
            }
        });
    }

    /// No ioctl is supported: the answer is `ENOTTY`, what a filesystem without ioctls gives
    /// (Python's `open` asks `TCGETS` of every file it opens, so this must stay quiet).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        static LOGGED: std::sync::Once = std::sync::Once::new();
        LOGGED.call_once(|| {
            tracing::info!(cmd, "ioctl is not supported: answered ENOTTY (logged once)");
        });
        reply.error(Errno::ENOTTY);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks the mode bits.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Ok(name) = name_str(name) else {
            return reply.error(Errno::EINVAL);
        };
        let (uid, gid, ttl) = (req.uid(), req.gid(), self.ttl);
        let open = open_mode(flags);
        self.spawn(move |fs| async move {
            match fs.create(parent.0, &name, mode, uid, gid, open).await {
                Ok((inode, attrs, fh)) => reply.created(
                    &ttl,
                    &file_attr(inode.ino, &attrs),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                ),
                Err(e) => reply.error(errno("create", &e)),
            }
        });
    }
}
