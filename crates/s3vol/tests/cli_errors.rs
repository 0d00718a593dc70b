//! What a user reads when `s3vol mount` or `s3vol check` cannot do its job: the first line of
//! each message names the cause and the fix, every mount error ends with the `s3vol check`
//! command that diagnoses it, and `check` classifies credential errors by the server's code.
//!
//! Wrong keys go to the real test server (moto with SigV4 checking); an endpoint that accepts
//! connections and never answers is a loopback listener of the test's own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/mount.rs"]
mod support;

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use proxy::Proxy;
use s3vol_s3::{BucketName, testing};
use support::{is_mounted, s3vol, server_args, unmount};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn new_bucket(tag: &str) -> BucketName {
    let bucket = testing::unique_bucket(tag);
    rt().block_on(async {
        support::store()
            .await
            .create_bucket(&bucket)
            .await
            .expect("create bucket")
    });
    bucket
}

/// Runs `cmd` to its end, killing it after `limit` (a hung command fails the test, not CI).
fn run(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            panic!("the command ran for more than {limit:?}; stderr: {err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// `s3vol mount BUCKET MNT` the way the README shows it (in the background), with the test
/// server's endpoint and `env` over the test server's keys.
fn mount_cmd(target: &str, mnt: &Path, cache: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = s3vol();
    cmd.arg("mount")
        .arg(target)
        .arg(mnt)
        .args(server_args())
        .arg("--cache-dir")
        .arg(cache)
        .envs(env.iter().copied());
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// A mount that failed: non-zero, nothing mounted, the diagnosis hint last.
fn assert_failed_mount(out: &Output, mnt: &Path, bucket: &str) -> String {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the mount succeeded: {err}");
    assert!(!is_mounted(mnt), "something is mounted after a failure");
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("run `s3vol check ") && last.ends_with("` for a diagnosis"),
        "last line: {last:?}\n{err}"
    );
    assert!(
        last.contains(bucket) && last.contains("--endpoint-url"),
        "the hint carries the mount's own arguments: {last:?}"
    );
    assert!(
        !err.contains("Error {") && err.lines().count() <= 3,
        "debug detail at the default log level:\n{err}"
    );
    err
}

fn dirs() -> (tempfile::TempDir, tempfile::TempDir) {
    (
        tempfile::Builder::new()
            .prefix("s3vol-mnt-")
            .tempdir()
            .unwrap(),
        tempfile::Builder::new()
            .prefix("s3vol-cache-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .unwrap(),
    )
}

#[test]
fn a_wrong_secret_key_is_named_a_signature_mismatch_with_its_fix() {
    let bucket = new_bucket("wrong-secret");
    let (mnt, cache) = dirs();
    let mut wrong = testing::credentials().secret_access_key;
    wrong.push_str("-wrong");
    let env = [("AWS_SECRET_ACCESS_KEY", wrong.as_str())];
    let out = run(
        mount_cmd(bucket.as_str(), mnt.path(), cache.path(), &env),
        Duration::from_secs(60),
    );
    let err = assert_failed_mount(&out, mnt.path(), bucket.as_str());
    let first = first_line(&err);
    assert!(
        first.starts_with(&format!(
            "s3vol: error: cannot mount s3://{bucket}/: signature mismatch: the secret access key"
        )) && first.contains("check AWS_SECRET_ACCESS_KEY"),
        "{err}"
    );

    let mut check = s3vol();
    check
        .args(["check", bucket.as_str()])
        .args(server_args())
        .envs(env);
    let out = run(check, Duration::from_secs(60));
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{said}");
    let bucket_line = said.lines().find(|l| l.starts_with("bucket")).unwrap();
    assert!(
        bucket_line.contains("FAIL  signature mismatch"),
        "{bucket_line:?}\n{said}"
    );
    assert!(!said.contains("policy"), "not a policy problem: {said}");
}

#[test]
fn an_unknown_access_key_is_named_so() {
    let bucket = new_bucket("unknown-key");
    let (mnt, cache) = dirs();
    let env = [("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")];
    let out = run(
        mount_cmd(bucket.as_str(), mnt.path(), cache.path(), &env),
        Duration::from_secs(60),
    );
    let err = assert_failed_mount(&out, mnt.path(), bucket.as_str());
    let first = first_line(&err);
    assert!(
        first.starts_with(&format!(
            "s3vol: error: cannot mount s3://{bucket}/: unknown access key"
        )) && first.contains("check AWS_ACCESS_KEY_ID"),
        "{err}"
    );

    let mut check = s3vol();
    check
        .args(["check", bucket.as_str()])
        .args(server_args())
        .envs(env);
    let out = run(check, Duration::from_secs(60));
    let said = text(&out.stdout);
    assert!(
        said.lines()
            .any(|l| l.starts_with("bucket") && l.contains("FAIL  unknown access key")),
        "{said}"
    );
    assert!(!said.contains("policy"), "not a policy problem: {said}");
}

/// A loopback listener that accepts connections and never answers; it lives as long as the
/// returned handle's listener (the accepted sockets are kept open by the thread).
fn silent_endpoint() -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut held = Vec::new();
        // Bounded: enough for every attempt the tests make.
        for conn in listener.incoming().take(64) {
            match conn {
                Ok(c) => held.push(c),
                Err(_) => break,
            }
        }
    });
    (url, handle)
}

#[test]
fn an_endpoint_that_never_answers_is_reported_after_the_request_timeout() {
    let (url, _listener) = silent_endpoint();
    let (mnt, cache) = dirs();
    let mut cmd = s3vol();
    cmd.args(["mount", "silent-bucket"])
        .arg(mnt.path())
        .args(["--endpoint-url", &url, "--force-path-style"])
        .args(["--max-attempts", "2", "--request-timeout", "1"])
        .arg("--cache-dir")
        .arg(cache.path());
    let started = Instant::now();
    let out = run(cmd, Duration::from_secs(60));
    let err = assert_failed_mount(&out, mnt.path(), "silent-bucket");
    assert!(
        first_line(&err).starts_with(&format!(
            "s3vol: error: cannot mount s3://silent-bucket/: no answer from {url} after "
        )),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "two attempts of 1 s took {:?}",
        started.elapsed()
    );

    // `check` says which step waits, and gives up on it after its short timeout.
    let mut check = s3vol();
    check.args([
        "check",
        "silent-bucket",
        "--endpoint-url",
        &url,
        "--force-path-style",
    ]);
    let out = run(check, Duration::from_secs(60));
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{said}");
    let mut lines = said.lines();
    assert!(lines.next().unwrap().starts_with("connect    ok"), "{said}");
    let bucket = lines.next().unwrap();
    assert!(
        bucket.starts_with(&format!("bucket     FAIL  no answer from {url} after ")),
        "{said}"
    );
}

#[test]
fn a_missing_mountpoint_says_so_and_how_to_create_it() {
    let (mnt, cache) = dirs();
    let missing = mnt.path().join("data");
    let out = run(
        mount_cmd("any-bucket", &missing, cache.path(), &[]),
        Duration::from_secs(30),
    );
    let err = assert_failed_mount(&out, &missing, "any-bucket");
    assert_eq!(
        first_line(&err),
        format!(
            "s3vol: error: mountpoint {0} does not exist; create it first: mkdir -p {0}",
            missing.display()
        )
    );
}

#[test]
fn dot_dot_in_the_prefix_is_refused_before_anything_happens() {
    let (mnt, cache) = dirs();
    for target in ["some-bucket/../x", "s3://some-bucket/a/./b"] {
        let out = run(
            mount_cmd(target, mnt.path(), cache.path(), &[]),
            Duration::from_secs(30),
        );
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{target} was accepted");
        assert!(err.contains("must not contain . or .. segments"), "{err}");
        assert!(!is_mounted(mnt.path()));
    }
}

#[test]
fn the_log_file_has_the_mounted_line() {
    let bucket = new_bucket("log-file");
    let (mnt, cache) = dirs();
    let log = cache.path().join("mount.log");
    let mut cmd = mount_cmd(bucket.as_str(), mnt.path(), cache.path(), &[]);
    cmd.arg("--log-file")
        .arg(&log)
        .env("S3VOL_LOG_LEVEL", "info");
    let out = run(cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(is_mounted(mnt.path()));
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    unmount(mnt.path());
    let mounted = logged.lines().find(|l| l.contains("mounted")).unwrap_or("");
    assert!(
        mounted.contains(&format!("s3://{bucket}/")),
        "no mounted line in the log file:\n{logged}"
    );
}

/// The region in the Credential scope of a recorded request's SigV4 Authorization header.
fn signing_region(request: &proxy::Request) -> Option<String> {
    let auth = request.header("authorization")?;
    let scope = auth.split("Credential=").nth(1)?.split(',').next()?;
    scope.split('/').nth(2).map(str::to_owned)
}

#[test]
fn requests_to_a_custom_endpoint_are_signed_for_the_region_given() {
    let bucket = new_bucket("region");
    let proxy = Proxy::start(&testing::endpoint());
    // (flags, environment, the region requests must be signed for)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 3] = [
        (
            &["--region", "eu-west-3"],
            &[("AWS_REGION", "ap-south-1")],
            "eu-west-3",
        ),
        (&[], &[("AWS_REGION", "ap-south-1")], "ap-south-1"),
        (&[], &[], "us-east-1"),
    ];
    for (flags, env, expected) in cases {
        proxy.reset();
        let mut check = s3vol();
        check
            .args(["check", "--read-only", bucket.as_str()])
            .args(["--endpoint-url", &proxy.url(), "--force-path-style"])
            .args(flags)
            .env_remove("AWS_REGION")
            .env_remove("AWS_DEFAULT_REGION")
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .envs(env.iter().copied());
        let _ = run(check, Duration::from_secs(60));
        let requests = proxy.requests();
        assert!(!requests.is_empty(), "no request reached the proxy");
        for r in &requests {
            assert_eq!(
                signing_region(r).as_deref(),
                Some(expected),
                "flags {flags:?}, env {env:?}: {}",
                r.head
            );
        }
    }
}

#[test]
fn the_sdk_error_dump_is_logged_at_debug_level_only() {
    let (mnt, cache) = dirs();
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    for (level, dumped) in [("info", false), ("debug", true)] {
        let mut cmd = s3vol();
        cmd.args(["--log-level", level, "mount", "-f", "any-bucket"])
            .arg(mnt.path())
            .args(["--endpoint-url", "http://127.0.0.1:1", "--force-path-style"])
            .args(["--max-attempts", "1"])
            .arg("--cache-dir")
            .arg(cache.path());
        let out = run(cmd, Duration::from_secs(60));
        let err = text(&out.stderr);
        assert!(!out.status.success());
        assert_eq!(
            err.contains("DispatchFailure"),
            dumped,
            "at {level}:\n{err}"
        );
        assert!(
            err.lines().any(|l| l.starts_with(
                "s3vol: error: cannot mount s3://any-bucket/: cannot reach the S3 endpoint: \
                 http://127.0.0.1:1 "
            )),
            "at {level}:\n{err}"
        );
    }
}
