//! The node plugin ↔ mounter protocol: handing a mounted FUSE fd to the process that serves it.
//!
//! One request per connection on the mounter's unix socket:
//!
//! 1. The node plugin sends a frame — a 4-byte big-endian length, then that many bytes of JSON
//!    ([`Request`]) — whose first `sendmsg` carries the `/dev/fuse` fd as `SCM_RIGHTS`
//!    ancillary data (for [`Request::Mount`]; [`Request::Ping`] carries none).
//! 2. The mounter answers with one frame holding a [`Reply`] once the serving process said it
//!    serves, or failed.
//!
//! [`Request::Credentials`] hands a serving process new keys for its volume (a rotated Secret,
//! on NodePublishVolume and every republish): the mounter writes them to the credentials pipe
//! it keeps open for the serving process, which swaps them in for the requests it signs from
//! then on (see `s3vol mount --credentials-fd`). Nothing is restarted or remounted.
//!
//! [`Request::Stop`] ends a volume's serving process (NodeUnstageVolume sends it after the
//! unmount, so a copy of the mount kept alive in some other mount namespace cannot keep the
//! process serving; no successor follows it), and [`Request::Prune`] lets the mounter drop the
//! cache directories of volumes that are no longer staged. [`Request::Status`] asks how a
//! volume's serving process fares — replaced after dying, or ended and why — for
//! NodeGetVolumeStats' volume condition.
//!
//! The request holds the volume's credentials, if it has any: they exist only in this message,
//! in the pipe the mounter hands the serving process, and (with failover) in the mounter's
//! zeroing memory, for a successor. Every type here that can hold them
//! has a redacting `Debug` (via [`StaticCredentials`]'s), so logging a request is safe, and a
//! [`MountRequest`] zeroes them when dropped; the frame buffers that carried them are zeroed by
//! [`call`] and by whoever received them ([`Frame`] does it on drop).
//!
//! These calls are blocking (plain `std` sockets with timeouts); async callers run them on a
//! blocking thread.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use s3vol_s3::{IdentityDocument, StaticCredentials, WebIdentity};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

/// The largest frame either side accepts.
const MAX_FRAME: usize = 1 << 20;

/// The options of one mount, as `s3vol mount` flags.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MountOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir_mode: Option<u32>,
    /// Seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_ttl: Option<f64>,
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_size: Option<u64>,
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<u64>,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub listing_attrs: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_xattr: bool,
}

impl MountOptions {
    /// The `s3vol mount` flags for these options.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        let mut push = |flag: &str, v: String| {
            a.push(flag.to_owned());
            a.push(v);
        };
        if let Some(v) = self.uid {
            push("--uid", v.to_string());
        }
        if let Some(v) = self.gid {
            push("--gid", v.to_string());
        }
        if let Some(v) = self.file_mode {
            push("--file-mode", format!("{v:04o}"));
        }
        if let Some(v) = self.dir_mode {
            push("--dir-mode", format!("{v:04o}"));
        }
        if let Some(v) = self.metadata_ttl {
            push("--metadata-ttl", v.to_string());
        }
        if let Some(v) = self.cache_size {
            push("--cache-size", v.to_string());
        }
        if let Some(v) = self.memory_limit {
            push("--memory-limit", v.to_string());
        }
        if self.read_only {
            a.push("--read-only".to_owned());
        }
        if self.listing_attrs {
            a.push("--listing-attrs".to_owned());
        }
        if self.no_xattr {
            a.push("--no-xattr".to_owned());
        }
        a
    }
}

/// Everything the mounter needs to serve one staged volume.
///
/// Dropping it zeroes the credentials' bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MountRequest {
    pub volume_id: String,
    pub bucket: String,
    /// Empty, or a key prefix ending with `/`.
    pub prefix: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub force_path_style: bool,
    #[serde(default)]
    pub options: MountOptions,
    /// Where the node plugin mounted the fd (for the serving process's logs and `/proc/mounts`
    /// consistency; it does not mount anything itself).
    pub staging_path: PathBuf,
    /// `None` (and no `web_identity`): the mounter's own credential chain.
    #[serde(default)]
    pub credentials: Option<StaticCredentials>,
    /// The pod's own identity (`authenticationSource: pod`): a role assumed with its token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_identity: Option<WebIdentity>,
    /// Keep the connection through the death of its serving process and start a successor
    /// (the `failover` volume parameter; on unless it says `"false"`). A request from a node
    /// plugin that does not know the field asks for it.
    #[serde(default = "failover_default")]
    pub failover: bool,
    /// Set when the node plugin hands back a connection it kept while the mounter that served
    /// it went away (killed, or replaced by an upgrade): the serving process adopts it with the
    /// journal its predecessor left in this session directory instead of starting afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt: Option<PathBuf>,
}

fn failover_default() -> bool {
    true
}

impl MountRequest {
    /// The identity to write to the serving process's credentials pipe, taken out of the
    /// request; `None`: the mounter's own credential chain.
    pub fn take_identity(&mut self) -> Option<IdentityDocument> {
        if let Some(web_identity) = self.web_identity.take() {
            return Some(IdentityDocument::WebIdentity { web_identity });
        }
        self.credentials.take().map(IdentityDocument::Keys)
    }
}

impl Drop for MountRequest {
    fn drop(&mut self) {
        if let Some(c) = &mut self.credentials {
            wipe(c);
        }
        if let Some(w) = &mut self.web_identity {
            w.wipe();
        }
    }
}

/// Zeroes the bytes of credentials (the strings keep their length, filled with NULs).
pub fn wipe(c: &mut StaticCredentials) {
    c.access_key_id.zeroize();
    c.secret_access_key.zeroize();
    c.session_token.zeroize();
}

/// Which volume's serving process to report on ([`Request::Status`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRequest {
    pub volume_id: String,
}

/// What the mounter knows of a volume it serves ([`Request::Status`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    /// The serving process of the moment.
    pub pid: u32,
    /// Whether a successor is started when the serving process dies without being asked.
    pub failover: bool,
    /// How many serving processes of the volume died without being asked and were replaced.
    pub restarts: u64,
    /// The last replacement, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart: Option<RestartInfo>,
    /// Set once no process serves the volume and none will be started: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
}

/// One replacement of a volume's serving process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartInfo {
    /// When the predecessor was found dead (Unix seconds).
    pub at_unix: u64,
    /// How the predecessor ended (`killed by signal 9 (SIGKILL)`, `exited with status 1`, …).
    pub why: String,
    /// How long the successor took to serve, in milliseconds; `None` while it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_ms: Option<u64>,
}

/// Which serving process to end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StopRequest {
    pub volume_id: String,
    /// Where the volume was staged (to recognise its process after a mounter restart).
    pub staging_path: PathBuf,
    /// The pid the mounter reported at stage time, if the node plugin recorded one.
    #[serde(default)]
    pub pid: Option<u32>,
}

/// New keys, or a new token, for the serving process of a volume (or of one pod's mount of
/// it: `volume_id` is then the mount's own id, see `node`).
///
/// Dropping it zeroes the secrets' bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CredentialsUpdate {
    pub volume_id: String,
    pub identity: IdentityDocument,
}

impl Drop for CredentialsUpdate {
    fn drop(&mut self) {
        self.identity.wipe();
    }
}

/// A request to the mounter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Are you there? (Probe.)
    Ping,
    /// Serve the FUSE fd that comes with this message.
    Mount(Box<MountRequest>),
    /// End the serving process of a volume (SIGTERM: it uploads what it holds, then exits) and
    /// wait for it, bounded. `ok` once no process serves the volume any more.
    Stop(StopRequest),
    /// Remove the cache directories of volumes not in `keep` that no process serves and that
    /// hold no files.
    Prune { keep: Vec<String> },
    /// Pass new credentials (keys or a token) to the serving process of a volume. `ok` once
    /// they are written to its credentials pipe; fails when the volume is not served by this
    /// mounter with credentials of its own.
    Credentials(CredentialsUpdate),
    /// How the volume's serving process fares: its restarts, or why it ended
    /// ([`Reply::status`]); `ok: false` when this mounter does not know the volume.
    Status(StatusRequest),
    /// Every volume this mounter knows ([`Reply::volumes`]) and who it is
    /// ([`Reply::instance`]): what the node plugin watches to hand its connections to a new
    /// mounter, and to let go of those whose volume ended.
    ///
    /// A node plugin says which connections it holds copies of (`held`) and whether it is
    /// about to exit (`leaving`): a mounter shutting down keeps its own copies until a node
    /// plugin that is not leaving holds every one (see `mounter`, "SIGTERM"). A request
    /// without `held` (a node plugin older than this) gets the older answer: a mounter
    /// shutting down fails it.
    Volumes {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        held: Option<Vec<String>>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        leaving: bool,
    },
    /// Hand the volume's connection back (the reply carries the FUSE fd, with
    /// [`Reply::request`] and [`Reply::session_dir`]): a node plugin that was restarted takes
    /// up again the copies it keeps for the day the mounter goes away. `ok: false` when the
    /// mounter holds no connection of that volume.
    Reclaim(StatusRequest),
}

/// One volume of a [`Request::Volumes`] answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownVolume {
    pub volume_id: String,
    /// No process serves it and none will be started.
    pub ended: bool,
}

/// The mounter's answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    /// Why it failed (the serving process's own words when it said any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The serving process, when one was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// For a stop: how the serving process ended (exit status and its last stderr lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// For a status request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VolumeStatus>,
    /// For a mount with failover, and a reclaim: the volume's session directory (what a
    /// successor started by another mounter adopts, see [`MountRequest::adopt`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_dir: Option<PathBuf>,
    /// For a ping and a volume list: this mounter process, distinct for every start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// For a volume list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<KnownVolume>>,
    /// For a reclaim: the volume's configuration and newest credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Box<MountRequest>>,
    /// For a volume list: this mounter is shutting down. It takes no volume, but hands out
    /// copies of the connections it still holds ([`Request::Reclaim`]) until a node plugin
    /// holds them all.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

impl Reply {
    pub fn ok(pid: Option<u32>) -> Self {
        Reply {
            ok: true,
            pid,
            ..Reply::default()
        }
    }

    pub fn failed(error: impl Into<String>) -> Self {
        Reply {
            ok: false,
            error: Some(error.into()),
            ..Reply::default()
        }
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The descriptors a frame carries at most.
const MAX_FDS: usize = 2;

/// A volume's connection as it is handed over: the `/dev/fuse` descriptor, and the memory file
/// where its serving processes keep streamed files' part buffers (`s3vol_fs::parts`), made by
/// the node plugin and held with the connection, so that those bytes outlive the mounter as
/// the connection does. Frames carry them in this order; a peer of an older version sends
/// and keeps only the first.
#[derive(Debug)]
pub struct Connection {
    pub fuse: OwnedFd,
    pub parts: Option<OwnedFd>,
}

impl Connection {
    /// The descriptors a frame received, first the connection; `None` if there were none.
    pub fn from_fds(fds: Vec<OwnedFd>) -> Option<Self> {
        let mut fds = fds.into_iter();
        let fuse = fds.next()?;
        Some(Self {
            fuse,
            parts: fds.next(),
        })
    }

    /// The descriptors to send with a frame.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![self.fuse.as_fd()];
        fds.extend(self.parts.as_ref().map(|p| p.as_fd()));
        fds
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fuse: self.fuse.try_clone()?,
            parts: self.parts.as_ref().map(|p| p.try_clone()).transpose()?,
        })
    }
}

/// Writes one frame, the first `sendmsg` carrying `fds` (at most two).
pub fn send_frame(stream: &UnixStream, body: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if body.len() > MAX_FRAME {
        return Err(invalid("frame too large"));
    }
    if fds.len() > MAX_FDS {
        return Err(invalid("too many descriptors for one frame"));
    }
    let header = (body.len() as u32).to_be_bytes();
    let total = header.len() + body.len();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(invalid("no room for the descriptors"));
    }
    let sent = rustix::net::sendmsg(
        stream,
        &[IoSlice::new(&header), IoSlice::new(body)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if sent < total {
        // The fd went with the first bytes; the rest is plain data.
        let mut rest = Vec::with_capacity(total - sent);
        rest.extend_from_slice(&header);
        rest.extend_from_slice(body);
        (&*stream).write_all(&rest[sent..])?;
    }
    Ok(())
}

/// A received frame's bytes, zeroed when dropped (a mount request carries credentials).
#[derive(Default)]
pub struct Frame(pub Vec<u8>);

impl Drop for Frame {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Frame({} bytes)", self.0.len())
    }
}

/// Reads one frame and the descriptors that came with it, in order.
pub fn recv_frame(stream: &UnixStream) -> io::Result<(Frame, Vec<OwnedFd>)> {
    // Read only the header with recvmsg (the fd arrives with the first byte), so nothing past
    // this frame is ever consumed.
    let mut header = [0u8; 4];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        stream,
        &mut [IoSliceMut::new(&mut header)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(got) = msg {
            // Any past the ones this version knows are closed on drop.
            fds.extend(got.take(MAX_FDS - fds.len().min(MAX_FDS)));
        }
    }
    if got.bytes == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a frame",
        ));
    }
    (&*stream).read_exact(&mut header[got.bytes..])?;
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(invalid("frame too large"));
    }
    let mut body = Frame(vec![0u8; len]);
    (&*stream).read_exact(&mut body.0)?;
    Ok((body, fds))
}

/// Binds a unix socket at `path` with `mode`, whatever the umask: it is bound under a temporary
/// name, given its mode, and only then renamed into place, so no client ever finds it with
/// looser permissions.
pub fn bind_socket(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "socket path has no name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Sends `request` (with `fds`) to the mounter at `socket` and waits up to `timeout` for its
/// reply.
pub fn call(
    socket: &Path,
    request: &Request,
    fds: &[BorrowedFd<'_>],
    timeout: Duration,
) -> io::Result<Reply> {
    call_for_fds(socket, request, fds, timeout).map(|(reply, _)| reply)
}

/// [`call`], also returning the descriptors that came with the reply ([`Request::Reclaim`]).
pub fn call_for_fds(
    socket: &Path,
    request: &Request,
    fds: &[BorrowedFd<'_>],
    timeout: Duration,
) -> io::Result<(Reply, Vec<OwnedFd>)> {
    let stream = UnixStream::connect(socket)?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.set_read_timeout(Some(timeout))?;
    let body = Frame(serde_json::to_vec(request).map_err(|e| invalid(e.to_string()))?);
    send_frame(&stream, &body.0, fds)?;
    drop(body);
    let (reply, fds) = recv_frame(&stream)?;
    let reply = serde_json::from_slice(&reply.0).map_err(|e| invalid(format!("bad reply: {e}")))?;
    Ok((reply, fds))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A node plugin and a mounter of different versions meet during every upgrade.
    #[test]
    fn volume_lists_read_across_versions() {
        // An older node plugin's request: no `held`, which tells the mounter to answer as before.
        let old: Request = serde_json::from_str(r#"{"op":"volumes"}"#).unwrap();
        assert_eq!(
            old,
            Request::Volumes {
                held: None,
                leaving: false
            }
        );
        // A newer node plugin's request, as an older mounter reads it (a unit variant then).
        #[derive(Deserialize, Debug, PartialEq)]
        #[serde(tag = "op", rename_all = "snake_case")]
        enum OlderRequest {
            Ping,
            Volumes,
        }
        let new = serde_json::to_string(&Request::Volumes {
            held: Some(vec!["v1".into()]),
            leaving: true,
        })
        .unwrap();
        assert_eq!(new, r#"{"op":"volumes","held":["v1"],"leaving":true}"#);
        assert_eq!(
            serde_json::from_str::<OlderRequest>(&new).unwrap(),
            OlderRequest::Volumes
        );
        // `draining` is left out unless set, so older node plugins read every other answer.
        let reply = serde_json::to_string(&Reply::ok(None)).unwrap();
        assert!(!reply.contains("draining"), "{reply}");
    }

    fn request() -> MountRequest {
        MountRequest {
            volume_id: "bucket:b".into(),
            bucket: "b".into(),
            prefix: "p/".into(),
            endpoint: Some("http://127.0.0.1:1".into()),
            region: None,
            force_path_style: true,
            options: MountOptions {
                uid: Some(1000),
                file_mode: Some(0o644),
                read_only: true,
                listing_attrs: true,
                no_xattr: true,
                ..MountOptions::default()
            },
            staging_path: "/stage".into(),
            credentials: Some(StaticCredentials {
                access_key_id: "AKID".into(),
                secret_access_key: "VERYSECRET".into(),
                session_token: Some("TOKENSECRET".into()),
            }),
            web_identity: None,
            failover: true,
            adopt: None,
        }
    }

    #[test]
    fn a_mount_request_without_the_failover_field_asks_for_failover() {
        let mut v = serde_json::to_value(Request::Mount(Box::new(request()))).unwrap();
        v.as_object_mut().unwrap().remove("failover");
        match serde_json::from_value::<Request>(v).unwrap() {
            Request::Mount(r) => assert!(r.failover),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_reclaim_reply_carries_the_connection_and_the_volume() {
        let (a, b) = UnixStream::pair().unwrap();
        let (pr, pw) = rustix::pipe::pipe().unwrap();
        let mut req = request();
        req.adopt = Some("/sessions/x-1".into());
        let reply = Reply {
            request: Some(Box::new(req.clone())),
            session_dir: Some("/sessions/x-1".into()),
            instance: Some("7-1".into()),
            ..Reply::ok(None)
        };
        let body = serde_json::to_vec(&reply).unwrap();
        send_frame(&a, &body, &[pw.as_fd()]).unwrap();
        let (got, fds) = recv_frame(&b).unwrap();
        let got: Reply = serde_json::from_slice(&got.0).unwrap();
        assert_eq!(got, reply);
        assert_eq!(got.request.unwrap().credentials, req.credentials);
        let conn = Connection::from_fds(fds).expect("fd");
        assert!(conn.parts.is_none(), "one descriptor sent");
        rustix::io::write(&conn.fuse, b"k").unwrap();
        let mut buf = [0u8; 1];
        rustix::io::read(&pr, &mut buf).unwrap();
        // An older mounter's reply, without the new fields, still reads.
        let old: Reply = serde_json::from_str(r#"{"ok":true,"pid":5}"#).unwrap();
        assert_eq!(old, Reply::ok(Some(5)));
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let s = format!("{:?}", Request::Mount(Box::new(request())));
        assert!(
            !s.contains("VERYSECRET") && !s.contains("TOKENSECRET"),
            "{s}"
        );
        assert!(s.contains("AKID"));
    }

    #[test]
    fn credentials_updates_round_trip_and_redact() {
        let update = Request::Credentials(CredentialsUpdate {
            volume_id: "v".into(),
            identity: IdentityDocument::Keys(request().credentials.take().unwrap()),
        });
        let s = format!("{update:?}");
        assert!(
            !s.contains("VERYSECRET") && !s.contains("TOKENSECRET"),
            "{s}"
        );
        let json = serde_json::to_vec(&update).unwrap();
        assert_eq!(serde_json::from_slice::<Request>(&json).unwrap(), update);
    }

    #[test]
    fn wiped_secrets_are_zeroed_in_place() {
        let mut c = request().credentials.take().unwrap();
        let ptr = c.secret_access_key.as_ptr();
        let len = c.secret_access_key.len();
        wipe(&mut c);
        assert!(c.secret_access_key.is_empty() && c.session_token.is_none());
        assert_eq!(
            c.secret_access_key.as_ptr(),
            ptr,
            "the buffer is kept, zeroed"
        );
        // SAFETY: the String still owns its buffer (zeroize clears without freeing) and
        // zeroize wrote every byte of its capacity, so the first `len` bytes are initialised.
        let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
        assert!(bytes.iter().all(|&b| b == 0), "{bytes:?}");
    }

    #[test]
    fn options_become_flags() {
        assert_eq!(
            request().options.to_args(),
            [
                "--uid",
                "1000",
                "--file-mode",
                "0644",
                "--read-only",
                "--listing-attrs",
                "--no-xattr"
            ]
        );
    }

    #[test]
    fn frames_carry_a_connection_and_its_part_buffers() {
        let (a, b) = UnixStream::pair().unwrap();
        let (pr, pw) = rustix::pipe::pipe().unwrap();
        let (qr, qw) = rustix::pipe::pipe().unwrap();
        let body = serde_json::to_vec(&Request::Mount(Box::new(request()))).unwrap();
        let big = vec![b'x'; 200_000];
        std::thread::scope(|s| {
            s.spawn(|| {
                let sent = Connection {
                    fuse: pw.try_clone().unwrap(),
                    parts: Some(qw.try_clone().unwrap()),
                };
                send_frame(&a, &body, &sent.fds()).unwrap();
                send_frame(&a, &big, &[]).unwrap();
            });
            let (got, fds) = recv_frame(&b).unwrap();
            let req: Request = serde_json::from_slice(&got.0).unwrap();
            assert_eq!(req, Request::Mount(Box::new(request())));
            // The received descriptors are the pipes' write ends, in order.
            let conn = Connection::from_fds(fds).expect("fds");
            rustix::io::write(&conn.fuse, b"hi").unwrap();
            rustix::io::write(conn.parts.as_ref().unwrap(), b"yo").unwrap();
            let mut buf = [0u8; 2];
            rustix::io::read(&pr, &mut buf).unwrap();
            assert_eq!(&buf, b"hi");
            rustix::io::read(&qr, &mut buf).unwrap();
            assert_eq!(&buf, b"yo");
            let (got, fds) = recv_frame(&b).unwrap();
            assert_eq!(got.0.len(), big.len());
            assert!(fds.is_empty());
        });
    }
}
