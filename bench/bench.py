#!/usr/bin/env python3
"""Helpers of bench/run.sh: timed file-system loops, S3 set-up through boto3, and the summary.

Timed loops print one line `secs=…` on stdout (the interpreter's start is outside the timing).
S3 commands read the server from the environment: BENCH_ENDPOINT, BENCH_REGION, BENCH_BUCKET,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.

  bench.py create DIR COUNT SIZE        write COUNT files of SIZE bytes, one after another,
                                        each closed (durable) before the next is opened
  bench.py check-files DIR COUNT SIZE   the files `create` and `populate` write have the
                                        expected bytes
  bench.py stat DIR COUNT               os.stat of f00000 … in DIR, no listing first
  bench.py tree DIR FILES SIZE          a local tree of FILES files in 10 subdirectories
  bench.py srctree DIR FILES            a local tree shaped like a source tree: FILES text files
                                        of 200 B – 64 KiB (seeded, so every run is the same) in
                                        nested directories, every 7th holding MARKER
  bench.py upload-tree DIR PREFIX       every file under DIR as PREFIX<relative path>
  bench.py populate PREFIX COUNT SIZE [--dir-marker]   objects PREFIXf00000 … with s3fs metadata
  bench.py upload KEY FILE              one object from a local file (multipart, 8 MiB parts)
  bench.py count PREFIX                 how many objects are under PREFIX, directory
                                        markers (keys ending in '/') not counted
  bench.py fio-iops FILE.json           read IOPS of a fio JSON report
  bench.py summarize RESULTS.tsv [CLIENTS.tsv]
                                        markdown tables of the medians (see run.sh); with
                                        CLIENTS.tsv (client, integrity, options per line) a
                                        table of the clients and each row's integrity setting
"""

import concurrent.futures
import hashlib
import json
import os
import statistics
import sys
import time


def content(i, size):
    """The bytes of small file i: distinct per file, cheap, checkable."""
    seed = hashlib.sha256(b"s3vol-bench-%d" % i).digest()
    return (seed * (size // len(seed) + 1))[:size]


def name(i):
    return "f%05d" % i


def cmd_create(d, count, size):
    count, size = int(count), int(size)
    os.makedirs(d, exist_ok=True)
    blobs = [content(i, size) for i in range(count)]
    start = time.monotonic()
    for i in range(count):
        with open(os.path.join(d, name(i)), "wb") as f:
            f.write(blobs[i])
    print("secs=%.4f" % (time.monotonic() - start))


def cmd_check_files(d, count, size):
    count, size = int(count), int(size)
    for i in range(count):
        path = os.path.join(d, name(i))
        with open(path, "rb") as f:
            got = f.read()
        if got != content(i, size):
            sys.exit("data mismatch in %s (%d bytes read)" % (path, len(got)))


def cmd_stat(d, count):
    count = int(count)
    start = time.monotonic()
    for i in range(count):
        st = os.stat(os.path.join(d, name(i)))
        if st.st_size == 0:
            sys.exit("unexpected size 0 for %s" % name(i))
    print("secs=%.4f" % (time.monotonic() - start))


def cmd_tree(d, files, size):
    files, size = int(files), int(size)
    for i in range(files):
        sub = os.path.join(d, "d%02d" % (i % 10))
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, name(i)), "wb") as f:
            f.write(content(i, size))


MARKER = "s3vol_bench_marker"


def cmd_srctree(d, files):
    import random

    files = int(files)
    rng = random.Random(3559)
    words = [b"fn", b"let", b"return", b"struct", b"impl", b"match", b"self", b"use", b"pub", b"if"]
    for i in range(files):
        # About 12 files a directory, three levels deep, like a project's source.
        parts = ["m%02d" % (i // 144 % 25), "s%d" % (i // 12 % 12)]
        if i % 5 == 0:
            parts.append("t%d" % (i % 3))
        sub = os.path.join(d, *parts)
        os.makedirs(sub, exist_ok=True)
        size = int(200 * (64 * 1024 / 200) ** rng.random())
        line = b" ".join(rng.choice(words) for _ in range(8)) + b"\n"
        body = (line * (size // len(line) + 1))[:size]
        if i % 7 == 0:
            body = body[: max(0, size - 40)] + b"\n// " + MARKER.encode() + b"\n"
        with open(os.path.join(sub, "f%05d.rs" % i), "wb") as f:
            f.write(body)


def cmd_upload_tree(d, prefix):
    client = s3()
    paths = []
    for root, _dirs, names in os.walk(d):
        for n in names:
            paths.append(os.path.join(root, n))

    def put(path):
        with open(path, "rb") as f:
            body = f.read()
        key = prefix + os.path.relpath(path, d)
        client.put_object(Bucket=bucket(), Key=key, Body=body, Metadata=file_meta(0o100644))

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        for f in [pool.submit(put, p) for p in paths]:
            f.result()


def s3():
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=os.environ["BENCH_ENDPOINT"],
        region_name=os.environ.get("BENCH_REGION", "us-east-1"),
        config=Config(
            s3={"addressing_style": "path"},
            max_pool_connections=64,
            # A request Garage leaves unanswered (seen now and then on a loaded machine) is
            # retried after 10 s instead of botocore's 60 s.
            connect_timeout=5,
            read_timeout=10,
            retries={"max_attempts": 5},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def bucket():
    return os.environ["BENCH_BUCKET"]


def file_meta(mode):
    return {"mode": str(mode), "uid": "0", "gid": "0", "mtime": str(int(time.time()))}


def cmd_populate(prefix, count, size, *flags):
    client, count, size = s3(), int(count), int(size)
    if "--dir-marker" in flags:
        client.put_object(
            Bucket=bucket(),
            Key=prefix,
            Body=b"",
            ContentType="application/x-directory",
            Metadata=file_meta(0o40755),
        )

    def put(i):
        client.put_object(
            Bucket=bucket(), Key=prefix + name(i), Body=content(i, size), Metadata=file_meta(0o100644)
        )

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        for f in [pool.submit(put, i) for i in range(count)]:
            f.result()


def cmd_upload(key, path):
    from boto3.s3.transfer import TransferConfig

    s3().upload_file(
        path,
        bucket(),
        key,
        ExtraArgs={"Metadata": file_meta(0o100644)},
        Config=TransferConfig(multipart_chunksize=8 << 20, max_concurrency=16),
    )


def cmd_count(prefix):
    client, n = s3(), 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket(), Prefix=prefix):
        n += sum(1 for o in page.get("Contents", []) if not o["Key"].endswith("/"))
    print(n)


def cmd_fio_iops(path):
    with open(path) as f:
        text = f.read()
    # fio may print notes before the JSON document.
    report = json.loads(text[text.index("{") :])
    job = report["jobs"][0]
    if job.get("error"):
        sys.exit("fio job error %s" % job["error"])
    if job["read"]["io_bytes"] == 0:
        sys.exit("fio read nothing")
    print("%.1f" % job["read"]["iops"])


# What each workload's number means: (title, unit, higher is better, ceiling row).
WORKLOADS = {
    "seqwrite": ("Sequential write of one file, 1 MiB blocks, fsync and close included", "MiB/s", True, "put-file"),
    "seqread": ("Sequential read of it after dropping the page cache", "MiB/s", True, "get"),
    "randread": ("4 KiB random reads (fio, 1 job, psync)", "IOPS", True, None),
    "create": ("Create small files one after another, each durable on close", "files/s", True, "put-seq"),
    "cptree": ("`cp -r` of a tree of small files (10 directories)", "files/s", True, None),
    "ls_cold": ("`ls -l` of a large directory, first on a fresh mount, on a node that never listed it (cold)", "s", False, "list"),
    "ls_warm": ("`ls -l` of the same directory again on the same mount (warm)", "s", False, "list"),
    "ls_again_cold": ("`ls -l` of the large directory on a fresh mount, on a node that listed it before (s3vol's attribute cache; the other clients keep nothing between mounts)", "s", False, "list"),
    "ls_again_warm": ("`ls -l` of it again on that mount", "s", False, "list"),
    "stat": ("stat(2) of every file of the large directory, by name, fresh mount, on a node that never listed it", "s", False, None),
    "rename": ("`mv` of a directory of 100 files", "s", False, None),
    "tarx": ("`tar x` of a source-like tree of small files into the mount", "files/s", True, None),
    "find": ("`find -type f` over that tree, fresh mount (cold)", "s", False, None),
    "du": ("`du -sb` over that tree, fresh mount (cold)", "s", False, None),
    "grep": ("`grep -rl` over that tree, fresh mount (every byte read)", "s", False, None),
    "readers4": ("4 concurrent sequential readers of 4 different files, page cache dropped", "MiB/s", True, None),
}
CLIENT_ORDER = [
    "s3vol", "s3vol-base", "s3vol-list", "mountpoint", "s3fs", "rclone", "s3vol-crc", "mountpoint-crc",
    "s3vol-sha",
]


def fmt(v):
    if v >= 100:
        return "%.0f" % v
    if v >= 10:
        return "%.1f" % v
    return "%.2f" % v


def cmd_summarize(path, clients_path=None):
    clients = {}
    if clients_path:
        with open(clients_path) as f:
            for line in f:
                if line.strip():
                    c, integrity, options = line.rstrip("\n").split("\t", 2)
                    clients[c] = (integrity, options)
    rows = []
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            run, workload, client, value, rss = line.rstrip("\n").split("\t")
            rows.append((int(run), workload, client, float(value) if value != "-" else None, rss))
    runs = max((r[0] for r in rows), default=0)
    out = []
    if clients:
        out.append("### Clients\n")
        out.append("| client | upload integrity | options |")
        out.append("|---|---|---|")
        for c in sorted(clients, key=lambda c: CLIENT_ORDER.index(c) if c in CLIENT_ORDER else 99):
            integrity, options = clients[c]
            out.append("| %s | %s | `%s` |" % (c, integrity, options))
        out.append("")
    for w, (title, unit, higher, ceiling_op) in WORKLOADS.items():
        vals, rss = {}, {}
        for run, workload, client, value, r in rows:
            if workload == w and value is not None:
                vals.setdefault(client, []).append(value)
            if workload == w and r not in ("-", ""):
                rss[client] = max(rss.get(client, 0), int(r))
        if not vals:
            continue
        med = {c: statistics.median(v) for c, v in vals.items()}
        ceiling = None
        if ceiling_op:
            cv = [value for run, workload, client, value, r in rows if workload == "ceiling:" + ceiling_op and value]
            ceiling = statistics.median(cv) if cv else None
        out.append("### %s\n" % title)
        head = "| client | median (%s) | runs | s3vol vs this client | vs no-FUSE ceiling | peak RSS (MiB) |" % unit
        sep = "|---|---:|---:|---:|---:|---:|"
        if clients:
            head += " integrity |"
            sep += "---|"
        out.append(head)
        out.append(sep)
        for c in sorted(med, key=lambda c: CLIENT_ORDER.index(c) if c in CLIENT_ORDER else 99):
            v = med[c]
            # Rows with upload checksums compare with s3vol's own row with checksums; s3fs
            # (SHA-256 signed, its only mode) with s3vol's default over HTTP when that ran.
            s = med.get("s3vol-crc") if c == "mountpoint-crc" else med.get("s3vol")
            if c == "s3fs" and "s3vol-sha" in med:
                s = med["s3vol-sha"]
            if s is None or c in ("s3vol", "s3vol-crc", "s3vol-sha"):
                ratio = "—"
            else:
                r = (s / v) if higher else (v / s)
                ratio = "%.2f×" % r if r >= 0.01 else "<0.01×"
            if ceiling and not w.startswith("ls_"):
                ceil = "%.0f%%" % (100 * v / ceiling)
            elif ceiling:
                ceil = "%.1f× the LIST time" % (v / ceiling)
            else:
                ceil = "—"
            r = "%.0f" % (rss[c] / 1024) if c in rss else "—"
            row = "| %s | %s | %d | %s | %s | %s |" % (c, fmt(v), len(vals[c]), ratio, ceil, r)
            if clients:
                row += " %s |" % clients.get(c, ("?", ""))[0]
            out.append(row)
        if ceiling:
            out.append(
                "| *no-FUSE ceiling* (`%s`) | %s | | | | |%s"
                % (ceiling_op, fmt(ceiling), " none (UNSIGNED-PAYLOAD) |" if clients else "")
            )
        out.append("")
    out.append(
        "s3vol vs this client: s3vol's speed divided by the client's (above 1: s3vol is faster; "
        "for `mountpoint-crc`, `s3vol-crc`'s; for `s3fs`, `s3vol-sha`'s when it ran); "
        "medians of %d run(s)." % runs
    )
    print("\n".join(out))


COMMANDS = {
    "create": cmd_create,
    "check-files": cmd_check_files,
    "stat": cmd_stat,
    "tree": cmd_tree,
    "populate": cmd_populate,
    "srctree": cmd_srctree,
    "upload-tree": cmd_upload_tree,
    "upload": cmd_upload,
    "count": cmd_count,
    "fio-iops": cmd_fio_iops,
    "summarize": cmd_summarize,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    COMMANDS[sys.argv[1]](*sys.argv[2:])
