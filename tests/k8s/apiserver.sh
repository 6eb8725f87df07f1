#!/usr/bin/env bash
# A real Kubernetes API server (kube-apiserver 1.20 with etcd 3.4) on 127.0.0.1 for Ambit's
# Kubernetes integration tests. The API server is compiled from Debian 12's `kubernetes`
# source package with Debian's Go; nothing but the Debian archive (through apt-get) is
# contacted. The build is cached outside the clone and reused.
#
#   tests/k8s/apiserver.sh build   install packages, fetch the source, compile (about 6 min cold)
#   tests/k8s/apiserver.sh start   build if needed, start etcd and the API server (idempotent);
#                                  prints the kubeconfig path on stdout
#   tests/k8s/apiserver.sh stop    stop them and remove the run folder (idempotent)
#   tests/k8s/apiserver.sh status  exit 0 when the API server answers /readyz
#
# Settings (environment): AMBIT_K8S_CACHE (default /var/tmp/ambit-k8s),
# AMBIT_K8S_RUN (default /tmp/ambit-k8s-run), AMBIT_K8S_PORT (default 26543),
# AMBIT_K8S_ETCD_PORT (default 22479; the peer port is the next one).
set -euo pipefail

cache=${AMBIT_K8S_CACHE:-/var/tmp/ambit-k8s}
run=${AMBIT_K8S_RUN:-/tmp/ambit-k8s-run}
port=${AMBIT_K8S_PORT:-26543}
etcd_port=${AMBIT_K8S_ETCD_PORT:-22479}
etcd_peer=$((etcd_port + 1))
go=/usr/lib/go-1.19/bin
bin=$cache/bin
series=1.20.
url="https://127.0.0.1:$port"

say() { printf '[apiserver %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
fail() { say "error: $*"; exit 1; }

need_packages() {
    local want=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || want+=("$p")
    done
    [ ${#want[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || fail "installing ${want[*]} needs root"
    say "installing ${want[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${want[@]}" >&2 ||
        { apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends "${want[@]}" >&2; } ||
        fail "apt-get could not install ${want[*]}"
}

source_version() {
    apt-cache showsrc kubernetes 2>/dev/null |
        awk -v s="$series" '$1 == "Version:" && index($2, s) == 1 { print $2 }' | sort -V | tail -n 1
}

# The image lists binary archives only: add source lines for the same bookworm suites.
add_source_lines() {
    [ -n "$(source_version)" ] && return 0
    local list=/etc/apt/sources.list.d/ambit-k8s-src.list keyring=""
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] &&
        keyring="[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
    apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 'Created-By: Packages' |
        awk -v k="$keyring" '$2 ~ /^bookworm(-updates|-security)?$/ && $3 == "main" { print "deb-src " k $1 " " $2 " main" }' |
        sort -u > "$list"
    [ -s "$list" ] || { rm -f "$list"; fail "no Debian bookworm archive in apt's sources"; }
    say "added source lines ($list)"
    apt-get update -qq >&2
    [ -n "$(source_version)" ] || fail "Debian has no kubernetes ${series}x source package here"
}

build() {
    mkdir -p "$cache"
    exec 9>"$cache/.lock"
    flock 9
    need_packages etcd-server openssl curl ca-certificates
    if [ -x "$bin/kube-apiserver" ] && "$bin/kube-apiserver" --version 2>/dev/null | grep -q "v$series"; then
        return 0
    fi
    need_packages golang-1.19-go golang-github-modern-go-reflect2-dev rsync make dpkg-dev xz-utils
    local tree=$cache/go/src/k8s.io/kubernetes started=$SECONDS
    if [ ! -f "$tree/.ready" ]; then
        add_source_lines
        local version
        version=$(source_version)
        say "fetching the kubernetes $version source package (about 35 MB)"
        rm -rf "$cache/src" "$tree" && mkdir -p "$cache/src" "$(dirname "$tree")"
        (cd "$cache/src" && apt-get source -qq "kubernetes=$version" >&2)
        local unpacked
        unpacked=$(find "$cache/src" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n 1)
        [ -d "$unpacked/vendor" ] || fail "the unpacked source has no vendor folder"
        mv "$unpacked" "$tree"
        # The vendored reflect2 1.0.1 builds with Go 1.19 but crashes at run time; Debian
        # ships the fixed 1.0.2.
        rm -rf "$tree/vendor/github.com/modern-go/reflect2"
        cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$tree/vendor/github.com/modern-go/"
        touch "$tree/.ready"
    fi
    (
        cd "$tree"
        export PATH="$go:$PATH" GO111MODULE=off GOPROXY=off GOLDFLAGS="-s -w"
        unset GOFLAGS
        if [ ! -s pkg/generated/openapi/zz_generated.openapi.go ]; then
            say "generating the OpenAPI code (about a minute)"
            make gen_openapi >&2
        fi
        say "compiling kube-apiserver (about 5 minutes on 2 cores)"
        hack/make-rules/build.sh cmd/kube-apiserver >&2
        mkdir -p "$bin"
        install -m 0755 _output/bin/kube-apiserver "$bin/kube-apiserver"
    )
    say "kube-apiserver built in $((SECONDS - started)) s ($bin)"
}

alive() { # alive NAME: the pid file names a live process of that binary
    local pid exe
    pid=$(cat "$run/$1.pid" 2>/dev/null) || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    [ "$(basename "${exe% (deleted)}")" = "$1" ]
}

ready() {
    [ -f "$run/token" ] || return 1
    [ "$(curl -s --max-time 3 --cacert "$run/ca.pem" -H "Authorization: Bearer $(cat "$run/token")" "$url/readyz")" = ok ]
}

get_ok() {
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 --cacert "$run/ca.pem" \
        -H "Authorization: Bearer $(cat "$run/token")" "$url$1")" = 200 ]
}

wait_until() { # wait_until WHAT PROCESS COMMAND...
    local what=$1 proc=$2 deadline=$((SECONDS + 120))
    shift 2
    until "$@"; do
        alive "$proc" || { tail -n 20 "$run/$proc.log" >&2; fail "$proc exited while waiting for $what"; }
        [ $SECONDS -lt $deadline ] || { tail -n 20 "$run/$proc.log" >&2; fail "timed out waiting for $what"; }
        sleep 0.3
    done
}

launch() { # launch NAME ARGV...: in its own session, logging to NAME.log
    local name=$1
    shift
    setsid "$@" </dev/null >"$run/$name.log" 2>&1 8>&- 9>&- &
    echo $! >"$run/$name.pid"
}

certificates() {
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=ambit-test-kubernetes-ca \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        -keyout "$run/ca.key" -out "$run/ca.pem" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver \
        -keyout "$run/server.key" -out "$run/server.csr" 2>/dev/null
    printf 'basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n' \
        >"$run/server.ext"
    openssl x509 -req -days 3650 -in "$run/server.csr" -CA "$run/ca.pem" -CAkey "$run/ca.key" \
        -CAcreateserial -extfile "$run/server.ext" -out "$run/server.pem" 2>/dev/null
    openssl genrsa -out "$run/sa.key" 2048 2>/dev/null
    openssl rsa -in "$run/sa.key" -pubout -out "$run/sa.pub" 2>/dev/null
    openssl rand -hex 24 >"$run/token"
    printf '%s,ambit-test-admin,ambit-test-admin,"system:masters"\n' "$(cat "$run/token")" >"$run/tokens.csv"
    chmod 600 "$run"/*.key "$run/token" "$run/tokens.csv"
    cat >"$run/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ambit-test
  cluster: {server: "$url", certificate-authority-data: "$(base64 -w0 <"$run/ca.pem")"}
users:
- name: admin
  user: {token: "$(cat "$run/token")"}
contexts:
- name: ambit-test
  context: {cluster: ambit-test, user: admin, namespace: default}
current-context: ambit-test
EOF
    chmod 600 "$run/kubeconfig"
}

start() {
    if alive etcd && alive kube-apiserver && ready; then
        echo "$run/kubeconfig"
        return 0
    fi
    stop
    build
    mkdir -p "$run/etcd" && chmod 700 "$run" "$run/etcd"
    certificates
    launch etcd /usr/bin/etcd --name ambit-test --data-dir "$run/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "ambit-test=http://127.0.0.1:$etcd_peer" --log-level warn --logger zap
    wait_until etcd etcd sh -c "curl -s --max-time 2 http://127.0.0.1:$etcd_port/health | grep -q true"
    launch kube-apiserver "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$port" \
        --tls-cert-file "$run/server.pem" --tls-private-key-file "$run/server.key" \
        --token-auth-file "$run/tokens.csv" --authorization-mode RBAC \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-account-key-file "$run/sa.pub" --service-account-signing-key-file "$run/sa.key" \
        --api-audiences https://kubernetes.default.svc.cluster.local \
        --service-cluster-ip-range 198.18.128.0/17 --disable-admission-plugins ServiceAccount \
        --endpoint-reconciler-type none --profiling=false --v 1
    wait_until "the API server's /readyz" kube-apiserver ready
    wait_until "the default namespace" kube-apiserver get_ok /api/v1/namespaces/default
    say "ready at $url (kubeconfig $run/kubeconfig)"
    echo "$run/kubeconfig"
}

stop_one() {
    alive "$1" || return 0
    local pid i
    pid=$(cat "$run/$1.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
        [ -e "/proc/$pid/exe" ] && readlink "/proc/$pid/exe" >/dev/null 2>&1 || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    [ -d "$run" ] || return 0
    stop_one kube-apiserver
    stop_one etcd
    rm -rf "$run"
}

locked() {
    mkdir -p "$(dirname "$run")"
    exec 8>"$run.lock"
    flock 8
    "$@"
}

case "${1:-}" in
build) build ;;
start) locked start ;;
stop) locked stop ;;
status) ready ;;
*)
    echo "usage: $0 build|start|stop|status" >&2
    exit 2
    ;;
esac
