//! `s3vol mounter`: receives mounted FUSE fds from the node plugin and runs one serving
//! process per staged volume.
//!
//! It needs no privilege: no mount(2), no `/dev/fuse` open — the node plugin did both and sends
//! the open connection ([`crate::handoff`]). For each request it spawns
//!
//! ```text
//! <exe> mount --fuse-fd 3 [--credentials-fd 4] --ready-fd 5 -f \
//!       [--endpoint-url URL] [--region R] [--force-path-style] [--cache-dir DIR] \
//!       [--uid N --gid N --file-mode M --dir-mode M --metadata-ttl S --cache-size B \
//!        --memory-limit B --read-only --listing-attrs --no-xattr] -- BUCKET[/PREFIX] STAGING_PATH
//! ```
//!
//! with the FUSE fd as fd 3, a pipe holding the credentials JSON
//! (`{"access_key_id", "secret_access_key", "session_token"?}`) as fd 4 — credentials never go
//! into argv or the environment — and a pipe as fd 5 on which the child writes `ready` once it
//! serves. The child gets a session of its own (`setsid`), so signals to the mounter's process
//! group do not reach it; the mounter closes its copies of the fds, so when the child exits the
//! kernel aborts the connection (the mount answers ENOTCONN, which NodeGetVolumeStats reports).
//! A thread per child forwards its stderr to the mounter's log (and keeps the last lines to
//! explain a failed start) and reaps it when it exits.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::pipe::PipeFlags;
use s3vol_s3::BucketName;

use crate::handoff::{self, MountRequest, Reply, Request};
use crate::volume_id::short_hash;

/// Settings of the mounter.
#[derive(Clone, Debug)]
pub struct MounterConfig {
    pub socket: PathBuf,
    /// Parent of the per-volume cache directories; `None` leaves `s3vol mount`'s default.
    pub cache_dir: Option<PathBuf>,
    /// The `s3vol` binary to run (`mount …`): normally the running executable.
    pub exe: PathBuf,
    /// How long a child may take to say `ready`.
    pub ready_timeout: Duration,
}

/// Listens on the socket and serves requests until the process ends.
pub fn run(config: MounterConfig) -> io::Result<()> {
    if let Some(parent) = config.socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::remove_file(&config.socket) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&config.socket)?;
    // Only the owner (and root, i.e. the node plugin) may hand us volumes.
    std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o600))?;
    if let Some(dir) = &config.cache_dir {
        std::fs::create_dir_all(dir)?;
    }
    tracing::info!(socket = %config.socket.display(), exe = %config.exe.display(), "mounter serving");
    let config = Arc::new(config);
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let config = config.clone();
                std::thread::spawn(move || handle(&config, stream));
            }
            Err(e) => tracing::warn!(error = %e, "accepting a connection"),
        }
    }
    Ok(())
}

fn handle(config: &MounterConfig, stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let reply = match handoff::recv_frame(&stream) {
        Err(e) => {
            tracing::warn!(error = %e, "reading a request");
            return;
        }
        Ok((body, fd)) => match serde_json::from_slice::<Request>(&body) {
            Err(e) => Reply::failed(format!("malformed request: {e}")),
            Ok(Request::Ping) => Reply::ok(None),
            Ok(Request::Mount(req)) => match fd {
                None => Reply::failed("a mount request must carry the FUSE fd"),
                Some(fd) => {
                    let volume = req.volume_id.clone();
                    match serve(config, *req, fd) {
                        Ok(pid) => Reply::ok(Some(pid)),
                        Err(e) => {
                            tracing::warn!(%volume, error = %e, "volume failed to start");
                            Reply::failed(e)
                        }
                    }
                }
            },
        },
    };
    let body = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    if let Err(e) = handoff::send_frame(&stream, &body, None) {
        tracing::warn!(error = %e, "sending a reply");
    }
}

/// Checks the fields that end up in argv, so none can be taken for a flag.
fn validate(req: &MountRequest) -> Result<(), String> {
    BucketName::new(req.bucket.clone()).map_err(|e| e.to_string())?;
    if req.bucket.starts_with('-') {
        return Err(format!("bad bucket {:?}", req.bucket));
    }
    if req.prefix.starts_with('/') || req.prefix.split('/').any(|s| s == "..") {
        return Err(format!("bad prefix {:?}", req.prefix));
    }
    if !req.staging_path.is_absolute() {
        return Err("the staging path must be absolute".into());
    }
    if let Some(e) = &req.endpoint
        && !(e.starts_with("http://") || e.starts_with("https://"))
    {
        return Err(format!("bad endpoint {e:?}"));
    }
    if let Some(r) = &req.region
        && (r.is_empty()
            || !r
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        return Err(format!("bad region {r:?}"));
    }
    Ok(())
}

/// The child's argv (after the program name).
fn child_args(config: &MounterConfig, req: &MountRequest, with_credentials: bool) -> Vec<String> {
    let mut a: Vec<String> = vec!["mount".into(), "--fuse-fd".into(), "3".into()];
    if with_credentials {
        a.extend(["--credentials-fd".into(), "4".into()]);
    }
    a.extend(["--ready-fd".into(), "5".into(), "-f".into()]);
    if let Some(e) = &req.endpoint {
        a.extend(["--endpoint-url".into(), e.clone()]);
    }
    if let Some(r) = &req.region {
        a.extend(["--region".into(), r.clone()]);
    }
    if req.force_path_style {
        a.push("--force-path-style".into());
    }
    if let Some(dir) = &config.cache_dir {
        a.extend([
            "--cache-dir".into(),
            dir.join(short_hash(&req.volume_id)).display().to_string(),
        ]);
    }
    a.extend(req.options.to_args());
    a.push("--".into());
    a.push(
        format!("{}/{}", req.bucket, req.prefix)
            .trim_end_matches('/')
            .to_owned(),
    );
    a.push(req.staging_path.display().to_string());
    a
}

/// Starts the serving process for one volume and waits until it serves; returns its pid.
fn serve(config: &MounterConfig, req: MountRequest, fuse: OwnedFd) -> Result<u32, String> {
    validate(&req)?;
    let volume = req.volume_id.clone();
    if let Some(dir) = &config.cache_dir {
        let d = dir.join(short_hash(&volume));
        std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700));
    }
    let pipe = || rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(|e| format!("pipe: {e}"));
    let creds = match &req.credentials {
        Some(c) => {
            let (r, w) = pipe()?;
            let body = serde_json::to_vec(c).map_err(|e| format!("encoding credentials: {e}"))?;
            // Far below a pipe's capacity, so this never blocks; the write end closes right
            // after, and the child reads to end of file.
            std::fs::File::from(w)
                .write_all(&body)
                .map_err(|e| format!("writing the credentials pipe: {e}"))?;
            Some(r)
        }
        None => None,
    };
    let (ready_r, ready_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let args = child_args(config, &req, creds.is_some());
    drop(req);

    let sources = [
        fuse.as_raw_fd(),
        creds.as_ref().map_or(-1, |f| f.as_raw_fd()),
        ready_w.as_raw_fd(),
    ];
    let mut cmd = Command::new(&config.exe);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(err_w));
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (setsid, fcntl, dup2) on fds that stay open in the parent until `spawn` returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // Move the sources out of the way first (close-on-exec copies at 10+), so that
            // dup2 onto 3, 4, 5 cannot clobber a source that happens to live there.
            let mut high = [-1; 3];
            for (i, &fd) in sources.iter().enumerate() {
                if fd >= 0 {
                    let h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                    if h < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    high[i] = h;
                }
            }
            for (i, &h) in high.iter().enumerate() {
                if h >= 0 && libc::dup2(h, 3 + i as i32) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    // The child has its copies; ours go now (the fuse fd above all: see the module docs).
    drop(cmd);
    drop(fuse);
    drop(creds);
    drop(ready_w);
    let mut child = spawned.map_err(|e| format!("starting {}: {e}", config.exe.display()))?;
    let pid = child.id();
    tracing::info!(%volume, pid, "started serving process");

    // stderr: forwarded line by line, the last lines kept to explain a failure.
    let tail = Arc::new(Mutex::new(VecDeque::<String>::new()));
    let stderr_thread = {
        let tail = tail.clone();
        let volume = volume.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(std::fs::File::from(err_r)).lines() {
                let Ok(line) = line else { break };
                tracing::info!(%volume, pid, "mount: {line}");
                let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                t.push_back(line);
                if t.len() > 20 {
                    t.pop_front();
                }
            }
        })
    };
    let tail_text = || {
        let t = tail.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    };

    match wait_ready(&ready_r, config.ready_timeout) {
        Ok(()) => {
            let volume2 = volume.clone();
            std::thread::spawn(move || {
                match child.wait() {
                    Ok(status) if status.success() => {
                        tracing::info!(volume = %volume2, pid, "serving process exited")
                    }
                    Ok(status) => {
                        tracing::warn!(volume = %volume2, pid, %status, "serving process exited; the volume answers ENOTCONN until it is staged again")
                    }
                    Err(e) => {
                        tracing::warn!(volume = %volume2, pid, error = %e, "waiting for the serving process")
                    }
                }
                let _ = stderr_thread.join();
            });
            Ok(pid)
        }
        Err(why) => {
            let _ = child.kill();
            let status = child.wait();
            // The child is gone, so its stderr reaches end of file: the tail is complete.
            let _ = stderr_thread.join();
            let tail = tail_text();
            let status = status
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            Err(if tail.is_empty() {
                format!("s3vol mount {why} ({status})")
            } else {
                format!("s3vol mount {why} ({status}): {tail}")
            })
        }
    }
}

/// Waits for the line `ready` on the child's ready pipe.
fn wait_ready(pipe: &OwnedFd, timeout: Duration) -> Result<(), &'static str> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("did not become ready in time");
        }
        let mut fds = [PollFd::new(pipe, PollFlags::IN)];
        let ts = rustix::event::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return Err("could not be watched"),
        }
        let mut buf = [0u8; 64];
        match rustix::io::read(pipe, &mut buf) {
            Ok(0) => return Err("exited before it was ready"),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(5).any(|w| w == b"ready") {
                    return Ok(());
                }
                if got.len() > 4096 {
                    return Err("wrote something else than ready");
                }
            }
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
            Err(_) => return Err("could not be read"),
        }
    }
}

/// Whether `path` is a socket a mounter answers on.
pub fn is_serving(path: &Path) -> bool {
    handoff::call(path, &Request::Ping, None, Duration::from_secs(2)).is_ok_and(|r| r.ok)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::handoff::MountOptions;

    fn req() -> MountRequest {
        MountRequest {
            volume_id: "v".into(),
            bucket: "bkt".into(),
            prefix: "a/b/".into(),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            force_path_style: true,
            options: MountOptions {
                gid: Some(5),
                ..MountOptions::default()
            },
            staging_path: "/stage".into(),
            credentials: None,
        }
    }

    #[test]
    fn argv() {
        let config = MounterConfig {
            socket: "/s".into(),
            cache_dir: Some("/cache".into()),
            exe: "/bin/s3vol".into(),
            ready_timeout: Duration::from_secs(1),
        };
        let a = child_args(&config, &req(), true);
        let expected = format!(
            "mount --fuse-fd 3 --credentials-fd 4 --ready-fd 5 -f --endpoint-url http://127.0.0.1:9 \
             --region us-east-1 --force-path-style --cache-dir /cache/{} --gid 5 -- bkt/a/b /stage",
            short_hash("v")
        );
        assert_eq!(a.join(" "), expected);
        let mut r = req();
        r.prefix = String::new();
        let a = child_args(&config, &r, false);
        assert!(!a.contains(&"--credentials-fd".to_string()));
        assert_eq!(a[a.len() - 2], "bkt");
    }

    #[test]
    fn argv_fields_are_checked() {
        assert!(validate(&req()).is_ok());
        for bad in [
            MountRequest {
                bucket: "--uid".into(),
                ..req()
            },
            MountRequest {
                prefix: "/x".into(),
                ..req()
            },
            MountRequest {
                prefix: "../x".into(),
                ..req()
            },
            MountRequest {
                region: Some("--x y".into()),
                ..req()
            },
            MountRequest {
                endpoint: Some("-f".into()),
                ..req()
            },
            MountRequest {
                staging_path: "rel".into(),
                ..req()
            },
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
    }
}
