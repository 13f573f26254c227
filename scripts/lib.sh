# Shared by scripts/demo and scripts/test: host checks and the packages Ambit's lab needs.
# shellcheck shell=bash

ambit_root() { cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd; }

require_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "Ambit's lab builds network namespaces and must run as root (try: sudo $0 $*)" >&2
        exit 1
    fi
}

# Installs what the lab needs when it is missing; quiet and quick when everything is there.
ensure_packages() {
    local missing=()
    command -v nft >/dev/null || missing+=(nftables)
    command -v iptables >/dev/null || missing+=(iptables)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v tcpdump >/dev/null || missing+=(tcpdump)
    command -v ipset >/dev/null || missing+=(ipset)
    [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] || missing+=(containernetworking-plugins)
    command -v gcc >/dev/null || missing+=(gcc)
    # The record layer's conformance peer (tests/lab/conformance): OpenSSL through Debian's python3.
    /usr/bin/python3 -c 'import cryptography' 2>/dev/null || missing+=(python3 python3-cryptography)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if ! command -v cargo >/dev/null; then
        echo "cargo is not installed: Ambit needs a Rust toolchain (1.89 or newer)" >&2
        exit 1
    fi
}

# The Kubernetes tier: etcd from Debian, kube-apiserver built once from Debian's source package and cached.
ensure_kubernetes_tier() {
    if ! command -v etcd >/dev/null; then
        echo "installing: etcd-server"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
    fi
    AMBIT_KUBE_APISERVER="$("$(ambit_root)/scripts/kube-apiserver")"
    export AMBIT_KUBE_APISERVER
    AMBIT_KUBECTL="$(ensure_kubectl)"
    export AMBIT_KUBECTL
}

# Debian's kubectl (kubernetes-client, 1.20, kustomize built in), the client that matches the API server: a
# newer kubectl cannot discover a 1.20 server's API groups. Unpacked into the cache, not installed, so it never
# replaces a kubectl the machine already has.
ensure_kubectl() {
    local cache="${AMBIT_CACHE:-/var/cache/ambit}"
    local bin="$cache/kubectl-v1.20.2"
    if [ ! -x "$bin" ]; then
        local work
        work=$(mktemp -d)
        (cd "$work" && apt-get download kubernetes-client >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get download kubernetes-client >/dev/null; }) \
            && dpkg -x "$work"/kubernetes-client_*.deb "$work/x" \
            && mkdir -p "$cache" && install -m 0755 "$work/x/usr/bin/kubectl" "$bin.tmp" && mv "$bin.tmp" "$bin"
        rm -rf "$work"
    fi
    [ -x "$bin" ] || { echo "could not get Debian's kubectl (kubernetes-client)" >&2; exit 1; }
    echo "$bin"
}

# The cluster tier: the runtime tier's parts, and kubelet, kube-controller-manager and kube-scheduler built once
# from Debian's source package like the API server (one make for all that are missing; cached).
ensure_cluster_tier() {
    # All four first, so a fresh machine builds them in one make (the API server with them).
    "$(ambit_root)/scripts/kube-build" kube-apiserver kubelet kube-controller-manager kube-scheduler >/dev/null
    ensure_kubernetes_tier
    ensure_runtime_tier
}

# The runtime tier: containerd and runc from Debian, and what builds the test images.
ensure_runtime_tier() {
    local missing=()
    command -v containerd >/dev/null || missing+=(containerd)
    command -v runc >/dev/null || missing+=(runc)
    command -v umoci >/dev/null || missing+=(umoci)
    dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}
