//! The mounter as the rendered manifests deploy it (a submodule of the `csi` tests, using its
//! harness). scripts/check-deploy.sh renders the manifests and runs this test.

use super::*;

/// What the rendered manifests give the s3vol containers at run time
/// (deploy/tests/runtime_spec.py): from `S3VOL_DEPLOYED_SPEC` (scripts/check-deploy.sh
/// renders it and runs this test), else rendered here with the deploy checks' virtualenv.
fn deployed_spec() -> Result<serde_json::Value, String> {
    if let Ok(p) = std::env::var("S3VOL_DEPLOYED_SPEC") {
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"));
        return Ok(serde_json::from_str(&text).unwrap());
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = repo.join(".deploy-check/venv/bin/python");
    if !python.exists() {
        return Err(format!(
            "{} does not exist: scripts/check-deploy.sh makes it and runs this test",
            python.display()
        ));
    }
    let out = Command::new(python)
        .arg(repo.join("deploy/tests/runtime_spec.py"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rendering the manifests: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `setpriv` flags giving a process the user, groups, capabilities and no_new_privs of a
/// container spec.
fn setpriv_flags(c: &serde_json::Value) -> String {
    let mut f = format!(
        "--reuid={} --regid={}",
        c["user"].as_u64().unwrap(),
        c["group"].as_u64().unwrap()
    );
    let groups: Vec<String> = c["supplementalGroups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_u64().unwrap().to_string())
        .collect();
    if groups.is_empty() {
        f += " --clear-groups";
    } else {
        f += &format!(" --groups={}", groups.join(","));
    }
    if c["noNewPrivs"].as_bool().unwrap() {
        f += " --no-new-privs";
    }
    if !c["privileged"].as_bool().unwrap() {
        assert!(
            c["capsDropAll"].as_bool().unwrap(),
            "every unprivileged s3vol container drops ALL capabilities"
        );
        let add: String = c["capsAdd"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| format!(",+{}", x.as_str().unwrap()))
            .collect();
        f += &format!(" --bounding-set=-all{add} --inh-caps=-all{add}");
    }
    f
}

/// Where a path of the container lives on the stand-in host, through its hostPath mounts.
fn host_path_of(c: &serde_json::Value, host: &Path, path: &str) -> PathBuf {
    let m = c["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| Path::new(path).starts_with(m["mountPath"].as_str().unwrap()))
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
        .unwrap_or_else(|| panic!("{path} is on no volume of the container"));
    let rest = Path::new(path)
        .strip_prefix(m["mountPath"].as_str().unwrap())
        .unwrap();
    let hp = m["hostPath"]
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not on a hostPath volume"));
    host.join(hp.trim_start_matches('/')).join(rest)
}

impl Harness {
    /// The mounter as the manifests deploy it: in a PID namespace of its own as PID 1, chrooted
    /// into a root that has the host's /usr and /etc read-only, a /dev without `fuse`, and
    /// exactly the container's volumes (hostPath volumes from a stand-in host directory,
    /// emptyDirs as tmpfs), read-only when the manifests say so; the init containers run
    /// first, the same way; then the user, groups, capabilities and no_new_privs of the
    /// container. The CSI side runs on the host as the privileged node plugin does.
    fn start_as_deployed(spec: &serde_json::Value) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("s3vol-csi-deployed-")
            .tempdir()
            .unwrap();
        let host = dir.path().join("host");
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let main = spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "s3vol")
            .expect("the mounter container");
        let inits = spec["init"].as_array().unwrap();
        let q = |p: &Path| sh_quote(p.to_str().unwrap());
        let r = q(&root);
        let mut script = String::from("set -eu\n");
        script += &format!("mount -t tmpfs -o mode=0755 s3vol-root {r}\n");
        script += &format!(
            "for d in usr etc; do mkdir {r}/$d; mount --rbind /$d {r}/$d; \
             mount -o remount,bind,ro {r}/$d; done\n\
             for d in bin sbin lib lib32 lib64 libx32; do \
               if [ -L /$d ]; then ln -s \"$(readlink /$d)\" {r}/$d; \
               elif [ -d /$d ]; then mkdir {r}/$d; mount --rbind /$d {r}/$d; \
                 mount -o remount,bind,ro {r}/$d; fi; done\n\
             mkdir {r}/dev {r}/proc {r}/s3vol-bin\n\
             mount -t tmpfs -o mode=0755,nosuid s3vol-dev {r}/dev\n\
             for d in null zero full random urandom tty; do touch {r}/dev/$d; \
               mount --bind /dev/$d {r}/dev/$d; done\n\
             mount -t proc proc {r}/proc\n\
             touch {r}/s3vol-bin/s3vol\n\
             mount --bind {bin} {r}/s3vol-bin/s3vol\n",
            bin = sh_quote(BIN)
        );
        let mut seen = Vec::new();
        for c in inits.iter().chain([main]) {
            for m in c["mounts"].as_array().unwrap() {
                let at = m["mountPath"].as_str().unwrap();
                if seen.contains(&at.to_owned()) {
                    continue;
                }
                seen.push(at.to_owned());
                let target = format!("{r}{}", sh_quote(at));
                script += &format!("mkdir -p {target}\n");
                if let Some(hp) = m["hostPath"].as_str() {
                    let src = host.join(hp.trim_start_matches('/'));
                    std::fs::create_dir_all(&src).unwrap();
                    script += &format!("mount --bind {} {target}\n", q(&src));
                } else if m["emptyDir"].as_bool().unwrap() {
                    script += &format!("mount -t tmpfs -o mode=0777 s3vol-empty {target}\n");
                } else {
                    panic!("volume at {at} is neither a hostPath nor an emptyDir");
                }
                if m["readOnly"].as_bool().unwrap() {
                    script += &format!("mount -o remount,bind,ro {target}\n");
                }
            }
        }
        if main["readOnlyRootFilesystem"].as_bool().unwrap() {
            script += &format!("mount -o remount,ro {r}\n");
        }
        let env = "env -i PATH=/usr/local/bin:/usr/bin:/bin AWS_EC2_METADATA_DISABLED=true";
        let chroot = "/usr/sbin/chroot";
        for c in inits {
            let argv: Vec<String> = c["command"]
                .as_array()
                .unwrap()
                .iter()
                .chain(c["args"].as_array().unwrap())
                .map(|a| sh_quote(a.as_str().unwrap()))
                .collect();
            script += &format!(
                "{env} {chroot} {r} /usr/bin/setpriv {} -- {}\n",
                setpriv_flags(c),
                argv.join(" ")
            );
        }
        let mut socket = None;
        let mut args = Vec::new();
        for a in main["args"].as_array().unwrap() {
            let a = a.as_str().unwrap();
            if let Some(s) = a.strip_prefix("--socket=") {
                socket = Some(host_path_of(main, &host, s));
            }
            // Metrics on a port of their own: other tests may run this one at the same time.
            if a.starts_with("--metrics-addr=") {
                args.push(sh_quote("--metrics-addr=127.0.0.1:0"));
                continue;
            }
            args.push(sh_quote(a));
        }
        let envs: String = main["env"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| format!(" {}", sh_quote(&format!("{k}={}", v.as_str().unwrap()))))
            .collect();
        script += &format!(
            "exec {env}{envs} {chroot} {r} /usr/bin/setpriv {} -- /s3vol-bin/s3vol {}\n",
            setpriv_flags(main),
            args.join(" ")
        );
        let mounter_socket = socket.expect("the mounter's --socket");
        let log = std::fs::File::create(dir.path().join("mounter.log")).unwrap();
        let unshare = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount-proc",
                "--mount",
                "--propagation",
                "private",
            ])
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut unshare = unshare;
        let upid = unshare.id();
        let start = Instant::now();
        let init = loop {
            let init: i32 = std::fs::read_to_string(format!("/proc/{upid}/task/{upid}/children"))
                .ok()
                .and_then(|c| c.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            if init > 0
                && std::fs::read(format!("/proc/{init}/cmdline"))
                    .is_ok_and(|c| c.starts_with(b"/s3vol-bin/s3vol\0mounter"))
            {
                break init;
            }
            let exited = unshare.try_wait().unwrap();
            if exited.is_some() || start.elapsed() > Duration::from_secs(20) {
                if init > 0 {
                    // SAFETY: kill(2) of the namespace's PID 1 this test started; the kernel
                    // ends the whole namespace with it.
                    unsafe { libc::kill(init, libc::SIGKILL) };
                }
                let _ = unshare.kill();
                panic!(
                    "the mounter did not start as PID 1 ({exited:?}):\n{}\nscript:\n{script}",
                    std::fs::read_to_string(dir.path().join("mounter.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut h = Harness {
            dir,
            mounter: Some(unshare),
            csi: None,
            mounts: Vec::new(),
            exe: None,
            mounter_socket,
            ns_init: Some(init),
            deployed: true,
        };
        let sock = h.mounter_socket.clone();
        wait_for("the mounter socket", Duration::from_secs(20), || {
            sock.exists()
        });
        h.start_csi();
        h
    }
}

fn status_field(pid: i32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} missing from /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Checks a process runs as the container spec says: user, groups, no capabilities, not
/// dumpable, no `/dev/fuse` it opened itself.
fn assert_runs_as(pid: i32, c: &serde_json::Value, what: &str) {
    let (u, g) = (c["user"].as_u64().unwrap(), c["group"].as_u64().unwrap());
    assert_eq!(
        status_field(pid, "Uid"),
        format!("{u} {u} {u} {u}"),
        "{what}"
    );
    assert_eq!(
        status_field(pid, "Gid"),
        format!("{g} {g} {g} {g}"),
        "{what}"
    );
    let groups: Vec<String> = c["supplementalGroups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.to_string())
        .collect();
    assert_eq!(status_field(pid, "Groups"), groups.join(" "), "{what}");
    if c["capsAdd"].as_array().unwrap().is_empty() {
        assert_eq!(status_field(pid, "CapEff"), "0000000000000000", "{what}");
        assert_eq!(status_field(pid, "CapBnd"), "0000000000000000", "{what}");
    }
    if c["noNewPrivs"].as_bool().unwrap() {
        assert_eq!(status_field(pid, "NoNewPrivs"), "1", "{what}");
    }
    // Not dumpable: its /proc files (all but the directory itself) belong to root, whatever
    // its uid, so no process of that uid can read its memory or environment.
    if u != 0 {
        let owner = std::os::unix::fs::MetadataExt::uid(
            &std::fs::metadata(format!("/proc/{pid}/environ")).unwrap(),
        );
        assert_eq!(owner, 0, "{what} is dumpable");
    }
    assert!(
        !Path::new(&format!("/proc/{pid}/root/dev/fuse")).exists(),
        "{what} sees /dev/fuse"
    );
}

#[tokio::test]
async fn csi_as_deployed_mounter_serves_without_dev_fuse_as_pid_1_and_drains_on_sigterm() {
    use crate::workload::get as failover_get;
    let spec = match deployed_spec() {
        Ok(s) => s,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let m = &spec["mounter"];
    let main = m["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "s3vol")
        .unwrap()
        .clone();
    // The mounter's own shutdown timeout fits in the pod's grace period, with room to log.
    let grace = m["terminationGracePeriodSeconds"].as_u64().unwrap();
    let shutdown = main["args"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|a| {
            a.as_str()?
                .strip_prefix("--shutdown-timeout=")?
                .parse()
                .ok()
        })
        .unwrap_or(270u64);
    assert!(
        shutdown + 10 <= grace,
        "--shutdown-timeout {shutdown} s does not fit terminationGracePeriodSeconds {grace}"
    );

    let mut h = Harness::start_as_deployed(m);
    let init = h.ns_init.unwrap();
    assert_eq!(
        status_field(init, "NSpid"),
        format!("{init} 1"),
        "the mounter is PID 1 of its own PID namespace"
    );
    assert_runs_as(init, &main, "the mounter");

    let (v, staging, target) = staged_static(
        &mut h,
        "csi-deployed",
        mount_cap(Mode::SingleNodeWriter, &[], "3000"),
    )
    .await;
    std::fs::write(target.join("hello.txt"), b"served without /dev/fuse").unwrap();
    assert_eq!(
        std::fs::read(staging.join("hello.txt")).unwrap(),
        b"served without /dev/fuse"
    );
    let serving = children(init);
    assert_eq!(serving.len(), 1, "{serving:?}");
    let pid = serving[0];
    assert_runs_as(pid, &main, "the serving process");
    let fuse_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l == Path::new("/dev/fuse"))
        .count();
    assert_eq!(
        fuse_fds, 1,
        "the serving process holds only the descriptor it was handed"
    );

    // The serving process is killed: the mounter, as shipped, keeps the connection and its
    // successor takes the volume over (the session journal under the cache directory, the
    // one host directory the mounter may write). A file open across the kill carries on.
    let fuse_fds_of = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l == Path::new("/dev/fuse"))
            .count()
    };
    assert_eq!(
        fuse_fds_of(init),
        1,
        "the mounter keeps the volume's connection"
    );
    // Its part buffers are in the memory file the node plugin made with the connection.
    let parts_files = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("/memfd:s3vol-parts"))
        .count();
    assert_eq!(
        parts_files, 1,
        "the serving process maps the part buffers' memory file"
    );
    let mut open = std::fs::File::create(target.join("across.txt")).unwrap();
    open.write_all(b"before the kill, ").unwrap();
    // SAFETY: kill(2) of the serving process this test's mounter started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let start = Instant::now();
    let successor = loop {
        if let [p] = children(init)[..]
            && p != pid
        {
            break p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no successor within 10 s\n{}",
            h.csi_log()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    open.write_all(b"after it").unwrap();
    open.sync_all().unwrap();
    drop(open);
    // What was only in a part buffer at the kill was taken over by the successor, which runs
    // as the manifests say (its uid may map a memory file it was handed).
    let log = h.csi_log();
    assert!(
        log.contains("moved to the cache directory") && !log.contains("not uploaded"),
        "{log}"
    );
    let bucket_of = BucketName::new(v.context["bucket"].clone()).unwrap();
    assert_eq!(
        failover_get(&store().await, &bucket_of, "across.txt").await,
        b"before the kill, after it"
    );
    assert_eq!(
        std::fs::read(target.join("hello.txt")).unwrap(),
        b"served without /dev/fuse"
    );
    assert_runs_as(successor, &main, "the successor");
    assert_eq!(fuse_fds_of(successor), 1);
    let mut node = h.node().await;
    let cond = stats(&mut node, &v, &target)
        .await
        .volume_condition
        .unwrap();
    assert!(
        !cond.abnormal && cond.message.contains("replaced 1 time "),
        "{}",
        cond.message
    );

    // The pod is deleted: SIGTERM to PID 1 from outside, as the container runtime sends it.
    let bucket = BucketName::new(v.context["bucket"].clone()).unwrap();
    let mut f = std::fs::File::create(target.join("pending.txt")).unwrap();
    f.write_all(b"uploaded when the pod goes").unwrap();
    // Its close waits for a mounter: should an assertion below fail, the harness must unmount
    // first, so the file is not closed by the unwinding.
    let f = std::mem::ManuallyDrop::new(f);
    // SAFETY: kill(2) of the namespace's PID 1 this test started.
    unsafe { libc::kill(init, libc::SIGTERM) };
    let mut unshare = h.mounter.take().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = unshare.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the mounter did not exit after SIGTERM\n{}",
            h.csi_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    h.ns_init = None;
    assert!(status.success(), "{status}\n{}", h.csi_log());
    let s3 = store().await;
    let mut got = keys(&s3, &bucket, "").await;
    got.sort();
    assert_eq!(got, ["across.txt", "hello.txt", "pending.txt"]);
    assert_eq!(
        failover_get(&s3, &bucket, "across.txt").await,
        b"before the kill, after it"
    );
    // The volume waits for the next mounter (the node plugin keeps its connection, and the
    // journal stays): nothing answers until one comes, so the open file's close would wait.
    let log = h.csi_log();
    assert!(
        log.contains("the session directory and the connection stay for the next mounter"),
        "{log}"
    );
    // The mounter let go of its copy only once the node plugin said it held one.
    assert!(
        log.contains("the node plugin holds every connection; they wait for the next mounter"),
        "{log}"
    );
    // Unstaging lets go of the connection: the kernel aborts it, and the close returns.
    unpublish(&mut node, &v, &target).await;
    unstage(&mut node, &v, &staging).await;
    drop(std::mem::ManuallyDrop::into_inner(f));
    assert!(!is_mounted(&target) && !is_mounted(&staging));
    h.mounts.clear();
}
