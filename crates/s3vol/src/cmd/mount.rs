//! `s3vol mount`: a bucket or prefix as a directory.
//!
//! Without `-f` the command starts itself again in the background (a new session, stdio
//! detached) and returns only when that process reports the mount ready — or exits non-zero
//! with the reason it could not be made. Readiness travels over a pipe (`--ready-fd`), which
//! is also how the CSI mounter learns that a volume it handed over is being served.
//!
//! `--fuse-fd` serves a `/dev/fuse` descriptor that someone else already mounted (the CSI node
//! plugin); `--credentials-fd` reads access keys as JSON from a pipe, so they never appear in
//! argv or the environment, and keeps reading it: every later document replaces the keys while
//! the mount serves (`credentials.rs`).
//!
//! Every error ends with the `s3vol check` command line, with this mount's own S3 options,
//! that diagnoses the bucket step by step.
//!
//! As root the mount is made here (`kernel.rs`) and unmounted only while it is still the
//! mount the path shows, once; without root, through `fusermount3`. A path that already shows
//! an s3vol mount is refused unless `--allow-stacked`.
//!
//! Exit: whatever ends the process (unmount, SIGTERM, SIGINT, the end of a handed-over
//! session) first uploads what is pending, then writes what could not be uploaded and is
//! only in memory to its staging file (fsynced) and logs, per file, where its bytes are
//! (`exit_flush`). Only then does the process exit: `std::process::exit` runs no destructor,
//! so nothing may be left to one.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use s3vol_fs::fuse::{FuseServer, MountSettings};
use s3vol_fs::{FsConfig, S3Fs};
use s3vol_s3::{Addressing, AwsStore, CredentialSource, ObjectStore, parse_size};

use crate::s3args::{BucketPath, S3Args, shell_quote};

mod credentials;
mod kernel;
mod supervise;

#[derive(Debug, Args)]
pub struct MountArgs {
    /// BUCKET, BUCKET/PREFIX or s3://BUCKET/PREFIX.
    pub target: BucketPath,
    /// Directory to mount on.
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub s3: S3Args,
    /// Refuse every change (EROFS); the kernel mount is read-only too.
    #[arg(long)]
    pub read_only: bool,
    /// Owner of objects that carry no uid metadata [default: the caller's uid].
    #[arg(long, value_name = "N")]
    pub uid: Option<u32>,
    /// Group of objects that carry no gid metadata [default: the caller's gid].
    #[arg(long, value_name = "N")]
    pub gid: Option<u32>,
    /// Permission bits of files without mode metadata (octal) [default: 0644].
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    pub file_mode: Option<u16>,
    /// Permission bits of directories without mode metadata (octal) [default: 0755].
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    pub dir_mode: Option<u16>,
    /// Let other users (and root) use the mount (needs user_allow_other in /etc/fuse.conf
    /// when not root).
    #[arg(long)]
    pub allow_other: bool,
    /// Seconds metadata and missing names are cached [default: 10].
    #[arg(long, value_name = "SECONDS")]
    pub metadata_ttl: Option<f64>,
    /// List directories from the LIST response alone: sizes and times from S3, mode and
    /// owner from the defaults, no HEAD per entry (names looked up still show their own).
    #[arg(long)]
    pub listing_attrs: bool,
    /// Do not offer extended attributes (every xattr call fails with EOPNOTSUPP and the kernel
    /// stops asking); xattrs already on objects are kept.
    #[arg(long)]
    pub no_xattr: bool,
    /// Directory for staging files of files being written [default: /var/cache/s3vol as root,
    /// else ~/.cache/s3vol].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Where the node-local attribute cache lives: s3fs attributes of listed files, so that
    /// a later listing of an unchanged directory (by any mount sharing the directory) needs
    /// no HEAD per file [default: CACHE_DIR/attrs].
    #[arg(long, value_name = "DIR", conflicts_with = "no_attr_cache")]
    pub attr_cache_dir: Option<PathBuf>,
    /// Disk budget of the attribute cache (e.g. 256M) [default: 256M].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub attr_cache_size: Option<u64>,
    /// Keep no attribute cache on disk: every listing from S3 HEADs each file it shows.
    #[arg(long)]
    pub no_attr_cache: bool,
    /// Disk budget of the cache directory (e.g. 10G) [default: 10G].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub cache_size: Option<u64>,
    /// Memory budget for read-ahead and upload buffers (e.g. 512M) [default: 512M].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub memory_limit: Option<u64>,
    /// Multipart part size (e.g. 8M; at least 5M) [default: 8M].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub part_size: Option<u64>,
    /// Seconds a close or fsync waits for S3 before it fails with EIO (the data is kept and
    /// sent again at the next flush), plus the time the file takes at --min-throughput
    /// [default: 60].
    #[arg(long, value_name = "SECONDS")]
    pub close_timeout: Option<f64>,
    /// Stay in the foreground.
    #[arg(short, long)]
    pub foreground: bool,
    /// Options s3fs-style: -o uid=1000,file-mode=0640,ro,allow_other,url=URL,…
    #[arg(short = 'o', value_name = "OPT[,OPT…]")]
    pub options: Vec<String>,
    /// Serve this already mounted /dev/fuse descriptor instead of mounting.
    #[arg(long, value_name = "FD")]
    pub fuse_fd: Option<RawFd>,
    /// Read access keys as JSON ({"access_key_id", "secret_access_key", "session_token"})
    /// from this descriptor; every further document on it (one per line) replaces them while
    /// the mount serves.
    #[arg(long, value_name = "FD")]
    pub credentials_fd: Option<RawFd>,
    /// Write "ready" to this descriptor once the filesystem is served.
    #[arg(long, value_name = "FD")]
    pub ready_fd: Option<RawFd>,
    /// Append logs here once running in the background (default: discarded).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9810).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Mount even if the directory already shows an s3vol mount (stacking a second one over
    /// it; unmounting the top one later leaves the one below in place).
    #[arg(long)]
    pub allow_stacked: bool,
    /// Internal: this process is the background half of a mount.
    #[arg(long, hide = true)]
    pub daemon_child: bool,
    /// Keep the mount through the death of its serving process — the default as root: a
    /// small supervising process holds the FUSE connection (and the memory where streamed
    /// files' bytes wait for S3) and restarts the serving process within a second if it dies
    /// (killed, out of memory, crashed), without the applications noticing. By default a
    /// mount that cannot be supervised (not root, mount(2) refused) is served without; with
    /// this flag, that is an error.
    #[arg(long, conflicts_with = "no_supervise")]
    pub supervise: bool,
    /// Serve the mount in this process alone: if it is killed, the mount ends with it.
    #[arg(long)]
    pub no_supervise: bool,
    /// Internal: journal what a successor needs in this directory (supervised serving).
    #[arg(long, hide = true, value_name = "DIR")]
    pub session_dir: Option<PathBuf>,
    /// Internal: take over the connection of --fuse-fd from a dead predecessor whose journal
    /// is in --session-dir.
    #[arg(long, hide = true, requires = "session_dir")]
    pub adopt: bool,
    /// Internal: the memory file where part buffers of streamed files live, so that they
    /// outlive this process (supervised serving; see `s3vol_fs::parts`).
    #[arg(long, hide = true, value_name = "FD", requires = "session_dir")]
    pub parts_fd: Option<RawFd>,
    /// Internal: how many serving processes of this mount died before this one.
    #[arg(long, hide = true, default_value_t = 0)]
    pub restarts: u64,
}

fn parse_mode(s: &str) -> Result<u16, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u16::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(format!("{s:?} is not an octal mode such as 0644")),
    }
}

/// Applies `-o` options onto the flags (a flag given explicitly wins).
fn apply_options(args: &mut MountArgs) -> anyhow::Result<()> {
    for opt in args.options.clone().iter().flat_map(|o| o.split(',')) {
        let opt = opt.trim();
        if opt.is_empty() {
            continue;
        }
        let (k, v) = opt
            .split_once('=')
            .map_or((opt, None), |(k, v)| (k, Some(v)));
        let key = k.replace('_', "-");
        let need = || v.with_context(|| format!("-o {k} needs a value"));
        match key.as_str() {
            "ro" | "read-only" => args.read_only = true,
            // The default; an explicit --read-only still wins.
            "rw" => {}
            "allow-other" => args.allow_other = true,
            "listing-attrs" => args.listing_attrs = true,
            "noxattr" | "no-xattr" => args.no_xattr = true,
            "uid" => args.uid = args.uid.or(Some(need()?.parse().context("-o uid")?)),
            "gid" => args.gid = args.gid.or(Some(need()?.parse().context("-o gid")?)),
            "file-mode" => {
                args.file_mode = args
                    .file_mode
                    .or(Some(parse_mode(need()?).map_err(anyhow::Error::msg)?))
            }
            "dir-mode" => {
                args.dir_mode = args
                    .dir_mode
                    .or(Some(parse_mode(need()?).map_err(anyhow::Error::msg)?))
            }
            "metadata-ttl" | "stat-cache-expire" => {
                args.metadata_ttl = args
                    .metadata_ttl
                    .or(Some(need()?.parse().context("-o metadata-ttl")?))
            }
            "close-timeout" => {
                args.close_timeout = args
                    .close_timeout
                    .or(Some(need()?.parse().context("-o close-timeout")?))
            }
            "cache-dir" | "use-cache" => {
                args.cache_dir = args.cache_dir.clone().or(Some(need()?.into()))
            }
            "attr-cache-dir" => {
                args.attr_cache_dir = args.attr_cache_dir.clone().or(Some(need()?.into()))
            }
            "attr-cache-size" => {
                args.attr_cache_size = args
                    .attr_cache_size
                    .or(Some(parse_size(need()?).map_err(anyhow::Error::msg)?))
            }
            "no-attr-cache" => args.no_attr_cache = true,
            "cache-size" => {
                args.cache_size = args
                    .cache_size
                    .or(Some(parse_size(need()?).map_err(anyhow::Error::msg)?))
            }
            "memory-limit" => {
                args.memory_limit = args
                    .memory_limit
                    .or(Some(parse_size(need()?).map_err(anyhow::Error::msg)?))
            }
            "part-size" => {
                args.part_size = args
                    .part_size
                    .or(Some(parse_size(need()?).map_err(anyhow::Error::msg)?))
            }
            // s3fs counts multipart_size in MiB.
            "multipart-size" => {
                let v = need()?;
                let bytes = match v.parse::<u64>() {
                    Ok(mib) => mib
                        .checked_mul(1 << 20)
                        .context("-o multipart_size is too large")?,
                    Err(_) => parse_size(v).map_err(anyhow::Error::msg)?,
                };
                args.part_size = args.part_size.or(Some(bytes));
            }
            "url" | "endpoint-url" => {
                args.s3.endpoint_url = args.s3.endpoint_url.clone().or(Some(need()?.to_owned()))
            }
            // s3fs calls the region "endpoint".
            "region" | "endpoint" => {
                args.s3.region = args.s3.region.clone().or(Some(need()?.to_owned()))
            }
            "use-path-request-style" | "force-path-style" | "path-style" => {
                args.s3.force_path_style = true
            }
            "profile" => args.s3.profile = args.s3.profile.clone().or(Some(need()?.to_owned())),
            // Generic mount options that mean nothing more here.
            "defaults"
            | "nosuid"
            | "nodev"
            | "noatime"
            | "relatime"
            | "-netdev"
            | "netdev"
            | "auto"
            | "noauto"
            | "user"
            | "users"
            | "nofail"
            | "default-permissions" => {}
            _ => bail!("unknown mount option {opt:?} (see `s3vol mount --help`)"),
        }
    }
    Ok(())
}

fn default_cache_dir() -> PathBuf {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } == 0 {
        return PathBuf::from("/var/cache/s3vol");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("s3vol")
}

/// Takes ownership of a descriptor number given on the command line.
fn owned_fd(fd: RawFd, what: &str) -> anyhow::Result<OwnedFd> {
    // SAFETY: fcntl(F_GETFD) only inspects the descriptor.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        bail!("{what} {fd} is not an open descriptor");
    }
    // SAFETY: the descriptor is open (checked above) and handed to this process to own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads the first credentials document; the pipe stays open for the ones that follow.
fn read_credentials(
    fd: RawFd,
) -> anyhow::Result<(s3vol_s3::IdentityDocument, credentials::CredentialsPipe)> {
    let mut pipe = credentials::CredentialsPipe::new(owned_fd(fd, "--credentials-fd")?);
    match pipe.next().context("reading credentials")? {
        Some(c) => Ok((c, pipe)),
        None => bail!("the credentials descriptor {fd} closed before sending credentials"),
    }
}

/// The line that ends every error of `s3vol mount`.
fn check_hint(args: &MountArgs) -> String {
    let target = format!("{}/{}", args.target.bucket, args.target.prefix);
    let mut command = vec!["s3vol".to_owned(), "check".to_owned()];
    command.push(shell_quote(target.trim_end_matches('/')));
    command.extend(args.s3.to_cli_args().iter().map(|a| shell_quote(a)));
    format!("run `{}` for a diagnosis", command.join(" "))
}

/// Checks the mount point as a user typed it: it must exist and be a directory.
fn check_mountpoint(path: &std::path::Path) -> anyhow::Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!("mountpoint {} is not a directory", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "mountpoint {} does not exist; create it first: mkdir -p {}",
            path.display(),
            shell_quote(&path.to_string_lossy())
        ),
        Err(e) => bail!("mountpoint {}: {e}", path.display()),
    }
}

pub fn run(mut args: MountArgs) -> anyhow::Result<ExitCode> {
    apply_options(&mut args)?;
    let hint = check_hint(&args);
    mount(args).map_err(|e| anyhow::anyhow!("{e:#}\n{hint}"))
}

fn mount(args: MountArgs) -> anyhow::Result<ExitCode> {
    // With --fuse-fd the mount exists but nobody answers it yet: touching it would hang.
    if args.fuse_fd.is_none() {
        check_mountpoint(&args.mountpoint)?;
    }
    if let Some(p) = args.part_size
        && p < 5 << 20
    {
        bail!("--part-size must be at least 5M (S3's minimum part size)");
    }
    if args.fuse_fd.is_none() && !args.allow_stacked {
        refuse_stacking(&args.mountpoint)?;
    }
    if !args.foreground && args.fuse_fd.is_none() && !args.daemon_child {
        return daemonize();
    }
    serve(args)
}

/// Refuses a mount point that already shows an s3vol mount: a second mount over it is
/// almost always a mistake (a mount command run twice), and hides the first one.
fn refuse_stacking(mountpoint: &std::path::Path) -> anyhow::Result<()> {
    let top = s3vol_csi::mounts::top_mount_at(mountpoint).context("reading the mount table")?;
    if let Some(m) = top
        && m.fstype == s3vol_csi::mounts::FSTYPE
    {
        bail!(
            "{} is already an s3vol mount ({}); unmount it first, or pass --allow-stacked to mount over it",
            mountpoint.display(),
            m.source
        );
    }
    Ok(())
}

/// Starts this command again in the background and waits for it to report the mount ready.
fn daemonize() -> anyhow::Result<ExitCode> {
    let (ready_r, ready_w) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("pipe")?;
    let exe = std::env::current_exe().context("finding the s3vol executable")?;
    let mut argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    argv.extend([
        "--daemon-child".into(),
        "--foreground".into(),
        "--ready-fd".into(),
        "3".into(),
    ]);
    let ready_raw = std::os::fd::AsRawFd::as_raw_fd(&ready_w);
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&argv)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only async-signal-safe calls (setsid, dup2) between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            libc::setsid();
            if libc::dup2(ready_raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .context("starting the background mount process")?;
    drop(ready_w);
    let mut ready = String::new();
    let _ = File::from(ready_r).read_to_string(&mut ready);
    if ready.trim() == "ready" {
        return Ok(ExitCode::SUCCESS);
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let status = child.wait().context("waiting for the mount process")?;
    if stderr.is_empty() {
        bail!("the mount process exited ({status}) before the mount was ready");
    }
    // Its error, and the diagnosis hint, are in what it printed.
    eprint!("{stderr}");
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(1, 255) as u8
    ))
}

/// Reads the credentials JSON as bytes, for the supervisor to hand each serving process.
fn read_credential_bytes(fd: RawFd) -> anyhow::Result<zeroize::Zeroizing<Vec<u8>>> {
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    File::from(owned_fd(fd, "--credentials-fd")?)
        .read_to_end(&mut bytes)
        .context("reading credentials")?;
    Ok(bytes)
}

fn serve(args: MountArgs) -> anyhow::Result<ExitCode> {
    if args.supervise && args.fuse_fd.is_some() {
        bail!("--supervise makes its own mount: it cannot serve a --fuse-fd");
    }
    if args.supervise && !rustix::process::geteuid().is_root() {
        bail!(
            "--supervise needs root: the supervisor mounts with mount(2) to hold the FUSE \
             connection itself (without it, fusermount3 holds it)"
        );
    }
    if supervise::wanted(&args) {
        match supervise::prepare(&args) {
            Ok(prepared) => {
                let credentials = match args.credentials_fd {
                    Some(fd) => {
                        let read = rustix::process::set_dumpable_behavior(
                            rustix::process::DumpableBehavior::NotDumpable,
                        )
                        .context("making the process non-dumpable")
                        .and_then(|()| read_credential_bytes(fd));
                        match read {
                            Ok(c) => Some(c),
                            Err(e) => {
                                prepared.abandon();
                                return Err(e);
                            }
                        }
                    }
                    None => None,
                };
                return supervise::run(args, credentials, prepared);
            }
            // Asked for: its failure is the mount's.
            Err(e) if args.supervise => return Err(e),
            Err(e) => tracing::warn!(
                error = %format!("{e:#}"),
                "cannot hold the mount in a supervising process; serving it without one (if \
                 this process is killed, the mount ends with it)"
            ),
        }
    }
    if args.fuse_fd.is_some() || args.credentials_fd.is_some() {
        // A serving process handed credentials or a connection: no core dumps, no ptrace by
        // same-uid processes, /proc/<pid>/mem closed to them.
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
            .context("making the process non-dumpable")?;
    }
    let mut s3 = args.s3.to_config();
    let mut rotation = None;
    if let Some(fd) = args.credentials_fd {
        let (mut doc, pipe) = read_credentials(fd)?;
        let follower = match &doc {
            s3vol_s3::IdentityDocument::Keys(keys) => {
                let p = s3vol_s3::RotatingCredentials::new(keys);
                s3.credentials = CredentialSource::Rotating(p.clone());
                credentials::Follower::Keys(p)
            }
            s3vol_s3::IdentityDocument::WebIdentity { web_identity } => {
                let p =
                    s3vol_s3::WebIdentityCredentials::new(web_identity.clone(), s3.region.clone());
                s3.credentials = CredentialSource::WebIdentity(p.clone());
                credentials::Follower::WebIdentity(p)
            }
        };
        doc.wipe();
        rotation = Some((pipe, follower));
    }
    if s3.endpoint_url.is_some()
        && args.s3.region.is_none()
        && s3.addressing == Addressing::VirtualHosted
    {
        tracing::debug!(
            "custom endpoint with virtual-hosted addressing; use --force-path-style for MinIO and Ceph"
        );
    }
    let ready = args
        .ready_fd
        .map(|fd| owned_fd(fd, "--ready-fd"))
        .transpose()?;
    let fuse_fd = args
        .fuse_fd
        .map(|fd| owned_fd(fd, "--fuse-fd"))
        .transpose()?;

    let cache_dir = match &args.cache_dir {
        Some(d) => d.clone(),
        None => {
            let d = default_cache_dir();
            match s3vol_fs::cache_dir::tighten_legacy_default(&d) {
                Ok(true) => {
                    tracing::info!(dir = %d.display(), "made the default cache directory private (mode 0700); earlier versions created it readable by all")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(dir = %d.display(), error = %e, "cannot make the default cache directory private")
                }
            }
            d
        }
    };
    let mut config = FsConfig::new(
        args.target.bucket.clone(),
        args.target.prefix.clone(),
        cache_dir,
    );
    if let Some(u) = args.uid {
        config.uid = u;
    }
    if let Some(g) = args.gid {
        config.gid = g;
    }
    if let Some(m) = args.file_mode {
        config.file_mode = m;
    }
    if let Some(m) = args.dir_mode {
        config.dir_mode = m;
    }
    if let Some(t) = args.metadata_ttl {
        if !(0.0..=86_400.0).contains(&t) {
            bail!("--metadata-ttl must be between 0 and 86400 seconds");
        }
        config.metadata_ttl = Duration::from_secs_f64(t);
    }
    if let Some(s) = args.cache_size {
        config.cache_size = s;
    }
    if let Some(m) = args.memory_limit {
        if m < 16 << 20 {
            bail!("--memory-limit must be at least 16M");
        }
        config.memory_limit = m;
    }
    if let Some(p) = args.part_size {
        config.part_size = p;
    }
    if let Some(t) = args.close_timeout {
        if !(1.0..=86_400.0).contains(&t) {
            bail!("--close-timeout must be between 1 and 86400 seconds");
        }
        config.close_timeout = Duration::from_secs_f64(t);
    }
    config.min_throughput = args.s3.min_throughput.max(1);
    config.read_only = args.read_only;
    config.listing_attrs = args.listing_attrs;
    if args.no_attr_cache {
        config.attr_cache_dir = None;
    } else if let Some(d) = &args.attr_cache_dir {
        config.attr_cache_dir = Some(d.clone());
    }
    if let Some(n) = args.attr_cache_size {
        config.attr_cache_size = n;
    }
    config.store_scope = format!(
        "{}|{}|{}",
        args.s3.endpoint_url.as_deref().unwrap_or(""),
        args.s3.region.as_deref().unwrap_or(""),
        config.bucket
    );
    config.xattrs = !args.no_xattr;
    // Supervised: what is written must outlive this process: part buffers in the memory file
    // the supervisor holds, or else staging files (not the heap).
    config.stream_writes = args.session_dir.is_none();
    config.successor = args.adopt;
    config.session_dir = args.session_dir.clone();
    if let Some(fd) = args.parts_fd {
        let fd = owned_fd(fd, "--parts-fd")?;
        match s3vol_fs::parts::PartArena::for_part_size(fd, config.part_size) {
            Ok(arena) => {
                let arena = std::sync::Arc::new(arena);
                arena.start_trimming();
                config.parts_arena = Some(arena);
            }
            Err(e) => tracing::warn!(
                error = %e,
                "part buffers cannot live in the supervisor's memory file: new files are \
                 staged in the cache directory instead of streaming"
            ),
        }
    }
    // The filesystem creates the cache directory (0700), refuses one others can read, and
    // scans what earlier mounts left there before it is served.

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("s3vol-io")
        .build()
        .context("starting the async runtime")?;
    if let Some(addr) = args.metrics_addr {
        let _guard = rt.enter();
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    let store: Arc<dyn ObjectStore> = Arc::new(rt.block_on(AwsStore::new(&s3)));
    if let Some((pipe, follower)) = rotation {
        credentials::follow(pipe, follower, rt.handle().clone());
    }
    // The client holds its own copy (in zeroing storage); ours is wiped now.
    if let CredentialSource::Static(c) = &mut s3.credentials {
        use zeroize::Zeroize;
        c.access_key_id.zeroize();
        c.secret_access_key.zeroize();
        c.session_token.zeroize();
    }
    let target = format!("s3://{}/{}", config.bucket, config.prefix);
    let fs = rt
        .block_on(S3Fs::new(config, store))
        .map_err(|e| anyhow::anyhow!("cannot mount {target}: {}", e.message))?;
    let fs = Arc::new(fs);
    let settings = MountSettings {
        fs_name: format!(
            "s3vol:{}/{}",
            args.target.bucket,
            args.target.prefix.trim_end_matches('/')
        ),
        allow_other: args.allow_other || fuse_fd.is_some(),
        read_only: args.read_only,
        threads: 4,
    };
    let (server, kernel_mount) = match (fuse_fd, &args.session_dir) {
        (Some(fd), Some(dir)) if args.adopt => {
            let server = FuseServer::adopt(fs.clone(), rt.handle().clone(), fd, &settings, dir)
                .map(|(server, a)| {
                    metrics::counter!("s3vol_serving_process_restarts_total")
                        .increment(args.restarts);
                    tracing::warn!(
                        restarts = args.restarts,
                        nodes = a.nodes,
                        open_files = a.file_handles,
                        open_dirs = a.dir_handles,
                        init = a.init.as_deref().unwrap_or("none"),
                        journal = %dir.display(),
                        "took over the connection of a serving process that died"
                    );
                    server
                });
            (server, KernelMount::HandedOver)
        }
        (Some(fd), session_dir) => {
            if let Some(dir) = session_dir
                && let Err(e) = fs.journal_to(dir)
            {
                bail!("cannot start the session journal in {}: {e}", dir.display());
            }
            let server = FuseServer::from_fd(fs.clone(), rt.handle().clone(), fd, &settings)
                .and_then(|mut server| {
                    if let Some(dir) = session_dir {
                        server.record_in_flight(dir)?;
                    }
                    Ok(server)
                });
            (server, KernelMount::HandedOver)
        }
        (None, _) if rustix::process::geteuid().is_root() => {
            let (fd, mut own) = kernel::mount(
                &args.mountpoint,
                &settings.fs_name,
                settings.read_only,
                settings.allow_other,
            )
            .with_context(|| format!("mounting {target} on {}", args.mountpoint.display()))?;
            let server = FuseServer::from_fd(fs.clone(), rt.handle().clone(), fd, &settings);
            if server.is_err() {
                let _ = own.unmount(true);
            }
            (server, KernelMount::Own(own))
        }
        (None, _) => (
            FuseServer::mount(fs.clone(), rt.handle().clone(), &args.mountpoint, &settings),
            KernelMount::Fusermount,
        ),
    };
    let mut server =
        server.with_context(|| format!("mounting {target} on {}", args.mountpoint.display()))?;
    let kernel_mount = match kernel_mount {
        KernelMount::Fusermount => KernelMount::Unmounter(server.unmounter()),
        other => other,
    };
    // The log file gets every line from "mounted" on.
    if args.daemon_child {
        detach_stdio(args.log_file.as_deref())?;
    }
    tracing::info!(target, mountpoint = %args.mountpoint.display(), "mounted");

    if let Some(ready) = ready {
        let mut f = File::from(ready);
        let _ = f.write_all(b"ready\n");
    }
    let kernel_mount = Arc::new(std::sync::Mutex::new(kernel_mount));
    rt.spawn(shutdown_on_signal(
        fs.clone(),
        kernel_mount.clone(),
        args.mountpoint.clone(),
    ));
    let result = server.run();
    let not_uploaded = rt.block_on(exit_flush(&fs, "unmount"));
    // A session that ended for another reason than an unmount leaves the mount in place:
    // take it away, if it is still ours.
    if let KernelMount::Own(own) = &mut *lock(&kernel_mount)
        && let Err(e) = own.unmount(true)
    {
        tracing::warn!(error = %e, mountpoint = %args.mountpoint.display(), "cannot unmount");
    }
    if not_uploaded > 0 {
        bail!(
            "{not_uploaded} file(s) could not be uploaded; the log says where each one's data is"
        );
    }
    result.context("serving the filesystem")?;
    tracing::info!("unmounted");
    Ok(ExitCode::SUCCESS)
}

/// Who unmounts the kernel mount.
#[derive(Debug)]
enum KernelMount {
    /// Made here with mount(2): see `kernel.rs`.
    Own(kernel::OwnMount),
    /// Made through fusermount3; this unmounts it.
    Unmounter(s3vol_fs::fuse::Unmounter),
    /// Made through fusermount3, before its unmounter is taken.
    Fusermount,
    /// Handed over (`--fuse-fd`): the mount is its owner's to unmount.
    HandedOver,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Uploads everything pending; for each file that cannot be uploaded, makes what only memory
/// holds durable in its staging file and logs where its bytes are. Returns how many files are
/// not in S3.
async fn exit_flush(fs: &S3Fs, when: &str) -> usize {
    let failed = fs.flush_all().await;
    if failed.is_empty() {
        return 0;
    }
    let mut errors: std::collections::HashMap<String, String> = failed
        .iter()
        .map(|(key, e)| (key.clone(), e.to_string()))
        .collect();
    for (key, kept) in fs.keep_unflushed().await {
        let error = errors.remove(&key).unwrap_or_default();
        match kept {
            Ok(place) => tracing::error!(key, error, "not uploaded at {when}; {place}"),
            Err(e) => tracing::error!(
                key,
                error,
                keep_error = %e,
                "not uploaded at {when}, and what was only in memory could not be written to the cache directory: it is lost when this process exits"
            ),
        }
    }
    for (key, error) in errors {
        tracing::error!(
            key,
            error,
            "not uploaded at {when}; nothing of it was pending locally"
        );
    }
    failed.len()
}

/// Once the mount is up, stderr goes to the log file (or nowhere) so the parent can exit.
fn detach_stdio(log_file: Option<&std::path::Path>) -> anyhow::Result<()> {
    let target = match log_file {
        Some(p) => File::options()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("opening {}", p.display()))?,
        None => File::options()
            .write(true)
            .open("/dev/null")
            .context("opening /dev/null")?,
    };
    rustix::stdio::dup2_stderr(&target).context("redirecting stderr")?;
    Ok(())
}

/// SIGTERM and SIGINT: upload what is pending and keep on disk what cannot be, then unmount
/// (which ends the session). A mount served from a handed-over descriptor is not ours to
/// unmount: the process exits and the mount's owner sees it gone.
async fn shutdown_on_signal(
    fs: Arc<S3Fs>,
    kernel_mount: Arc<std::sync::Mutex<KernelMount>>,
    mountpoint: PathBuf,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received: flushing and unmounting");
    let not_uploaded = exit_flush(&fs, "shutdown").await;
    let code = i32::from(not_uploaded > 0);
    let unmounted = tokio::task::spawn_blocking(move || {
        let mut k = lock(&kernel_mount);
        match &mut *k {
            // The session ends once the kernel mount is gone, and `serve` returns.
            KernelMount::Own(own) => match own.unmount(true) {
                Ok(kernel::Unmounted::Done) => true,
                Ok(kernel::Unmounted::Detached) => {
                    tracing::warn!(
                        mountpoint = %mountpoint.display(),
                        "the mount is busy (files open); detached it lazily, exiting"
                    );
                    false
                }
                Ok(kernel::Unmounted::NotOurs) => false,
                Err(e) => {
                    tracing::error!(error = %e, "unmount failed; exiting");
                    false
                }
            },
            KernelMount::Unmounter(u) => {
                if u.unmount().is_ok() {
                    return true;
                }
                tracing::warn!(
                    mountpoint = %mountpoint.display(),
                    "the mount is busy; detaching it lazily and exiting"
                );
                if let Err(e) =
                    rustix::mount::unmount(&mountpoint, rustix::mount::UnmountFlags::DETACH)
                {
                    tracing::error!(error = %e, "lazy unmount failed");
                }
                false
            }
            KernelMount::Fusermount | KernelMount::HandedOver => false,
        }
    })
    .await;
    if let Ok(true) = unmounted {
        return;
    }
    // Everything is uploaded or on disk (above); nothing is left for destructors to do.
    std::process::exit(code);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::path::Path;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        m: MountArgs,
    }

    fn parse(args: &[&str]) -> anyhow::Result<MountArgs> {
        let mut full = vec!["s3vol"];
        full.extend_from_slice(args);
        let mut m = Wrap::try_parse_from(full)?.m;
        apply_options(&mut m)?;
        Ok(m)
    }

    #[test]
    fn the_attribute_cache_is_on_unless_turned_off() {
        let m = parse(&["bkt", "/mnt"]).unwrap();
        assert!(!m.no_attr_cache && m.attr_cache_dir.is_none());
        let m = parse(&["--no-attr-cache", "bkt", "/mnt"]).unwrap();
        assert!(m.no_attr_cache);
        let m = parse(&["-o", "no_attr_cache", "bkt", "/mnt"]).unwrap();
        assert!(m.no_attr_cache);
        let m = parse(&[
            "-o",
            "attr_cache_dir=/var/lib/a,attr_cache_size=64M",
            "bkt",
            "/mnt",
        ])
        .unwrap();
        assert_eq!(m.attr_cache_dir.as_deref(), Some(Path::new("/var/lib/a")));
        assert_eq!(m.attr_cache_size, Some(64 << 20));
        assert!(parse(&["--no-attr-cache", "--attr-cache-dir", "/a", "bkt", "/mnt"]).is_err());
    }

    #[test]
    fn sizes_and_modes() {
        assert_eq!(parse_mode("0644").unwrap(), 0o644);
        assert_eq!(parse_mode("755").unwrap(), 0o755);
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("17777").is_err());
    }

    #[test]
    fn dash_o_options_fill_in_flags() {
        let m = parse(&["-o", "uid=1000,gid=1001,file_mode=0640,ro,allow_other,url=http://x:9000,use_path_request_style", "bkt/p", "/mnt"]).unwrap();
        assert_eq!(
            (m.uid, m.gid, m.file_mode),
            (Some(1000), Some(1001), Some(0o640))
        );
        assert!(m.read_only && m.allow_other && m.s3.force_path_style);
        assert_eq!(m.s3.endpoint_url.as_deref(), Some("http://x:9000"));
        assert_eq!(m.target.prefix, "p/");
        // An explicit flag wins over -o.
        let m = parse(&["--read-only", "-o", "rw,multipart_size=16", "bkt", "/mnt"]).unwrap();
        assert!(m.read_only, "-o rw does not undo --read-only");
        assert_eq!(
            m.part_size,
            Some(16 << 20),
            "s3fs counts multipart_size in MiB"
        );
        let m = parse(&["--uid", "5", "-o", "uid=6", "bkt", "/mnt"]).unwrap();
        assert_eq!(m.uid, Some(5));
        assert!(!m.listing_attrs);
        assert!(
            parse(&["-o", "listing_attrs", "bkt", "/mnt"])
                .unwrap()
                .listing_attrs
        );
        assert!(
            parse(&["--listing-attrs", "bkt", "/mnt"])
                .unwrap()
                .listing_attrs
        );
        assert!(!m.no_xattr);
        assert!(parse(&["-o", "noxattr", "bkt", "/mnt"]).unwrap().no_xattr);
        assert!(parse(&["--no-xattr", "bkt", "/mnt"]).unwrap().no_xattr);
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(
            parse(&["-o", "frobnicate", "bkt", "/mnt"])
                .unwrap_err()
                .to_string()
                .contains("unknown mount option")
        );
        assert!(parse(&["-o", "uid", "bkt", "/mnt"]).is_err());
        assert!(parse(&["-o", "uid=abc", "bkt", "/mnt"]).is_err());
        assert!(parse(&["--file-mode", "rw", "bkt", "/mnt"]).is_err());
    }
}
