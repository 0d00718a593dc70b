#!/usr/bin/env bash
# A first look at s3vol with no cloud account: starts the local S3 server (moto on 127.0.0.1,
# SigV4 checking on), puts a few objects in a bucket, mounts the bucket with `s3vol mount`,
# shows it with ls, writes a file through the mount, shows that file as an S3 object, and
# unmounts. Needs root (or fuse3's fusermount3) for the FUSE mount.
#   scripts/demo.sh            keep nothing running afterwards
#   KEEP=1 scripts/demo.sh     leave the mount and the server up to play with
# The first run compiles s3vol and about 300 crates it depends on (the AWS SDK, tokio, tonic,
# rustls…): about 10.5 CPU-minutes measured on a busy 2-core machine (less when idle), so
# roughly 6–8 minutes on 2 idle cores and much longer on a busy machine; cargo shows its
# progress. Later runs take seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]] && ! command -v fusermount3 >/dev/null; then
    echo "run as root, or install fuse3 (fusermount3) first" >&2
    exit 1
fi

if [[ -x target/debug/s3vol ]]; then
    say "building s3vol (only what changed since the last build)"
else
    say "building s3vol: the first build compiles about 300 crates, about 10.5 CPU-minutes (roughly 6-8 minutes on 2 idle cores, longer on a busy machine); cargo shows its progress below"
fi
# With the s3vol package's test dependencies (the small cli_errors test is built alongside):
# the same features the test suite uses, so scripts/test.sh afterwards reuses every compiled
# dependency instead of compiling them all a second time.
cargo build --locked -p s3vol --test cli_errors
bin=target/debug/s3vol

say "starting the local S3 server"
lines=$(bash scripts/s3-server.sh start)
eval "$lines"
export AWS_ACCESS_KEY_ID=$S3VOL_TEST_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$S3VOL_TEST_SECRET_ACCESS_KEY
export AWS_EC2_METADATA_DISABLED=true
py=${S3VOL_PYTHON:-python3}

say "creating bucket 'demo' with a few objects (one with s3fs metadata, one directory marker)"
"$py" - <<'PY'
import os, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["S3VOL_TEST_ENDPOINT"], region_name="us-east-1")
try:
    s3.create_bucket(Bucket="demo")
except s3.exceptions.BucketAlreadyOwnedByYou:
    pass
s3.put_object(Bucket="demo", Key="README.txt", Body=b"Hello from an S3 bucket.\n")
s3.put_object(Bucket="demo", Key="data/numbers.csv", Body=b"a,b\n1,2\n3,4\n",
              Metadata={"mode": "33188", "uid": "1000", "gid": "1000", "mtime": "1700000000"})
s3.put_object(Bucket="demo", Key="reports/", Body=b"", ContentType="application/x-directory",
              Metadata={"mode": "16877"})
PY

mnt=${S3VOL_DEMO_DIR:-/tmp/s3vol-demo}
mkdir -p "$mnt"
if mountpoint -q "$mnt" 2>/dev/null; then umount "$mnt"; fi
say "mounting s3://demo on $mnt"
"$bin" mount s3://demo "$mnt" --endpoint-url "$S3VOL_TEST_ENDPOINT" --force-path-style \
    --cache-dir "${TMPDIR:-/tmp}/s3vol-demo-cache"

say "ls -lR $mnt"
ls -lR "$mnt"
say "writing $mnt/reports/hello.txt through the mount"
echo "written through s3vol at $(date -u +%FT%TZ)" > "$mnt/reports/hello.txt"
cat "$mnt/reports/hello.txt"
say "the same file as an S3 object, with its s3fs-format metadata"
"$py" - <<'PY'
import os, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["S3VOL_TEST_ENDPOINT"], region_name="us-east-1")
for o in s3.list_objects_v2(Bucket="demo")["Contents"]:
    h = s3.head_object(Bucket="demo", Key=o["Key"])
    print(f'{o["Key"]:<22} {o["Size"]:>5} bytes  {h["Metadata"]}')
PY

if [[ -n "${KEEP:-}" ]]; then
    say "done: s3://demo stays mounted on $mnt and the S3 server keeps running; when finished: umount $mnt && scripts/s3-server.sh stop"
    exit 0
fi
say "unmounting"
umount "$mnt"
bash scripts/s3-server.sh stop >/dev/null 2>&1 || true
say "done: s3vol mounted s3://demo on $mnt, listed it, wrote a file through it and unmounted it. To keep the mount and the server up to play with: KEEP=1 scripts/demo.sh"
