#!/usr/bin/env bash
# Brings the compose stack up for real on a Debian machine without an image registry, as
# root, and checks it end to end:
#   1. installs docker.io, iptables, debootstrap, promtool and the compose plugin;
#   2. starts a Docker engine of its own (its own socket and data root);
#   3. builds a Debian base image with debootstrap, then the mmgpt image and a Prometheus
#      image (Debian's package) on it; torch comes from a wheel fetched on this host;
#   4. `docker compose up -d`, waits for health, sends caption requests through the
#      published port, checks that Prometheus scrapes the service (up == 1) and that every
#      dashboard query returns data (docker/check_stack.py);
#   5. `docker compose down -v` and stops every process it started, dockerd included.
# Grafana joins the stack only when an image named by GRAFANA_IMAGE is already present
# in this engine: no registry or package source reachable here carries a Grafana server.
#
#   docker/test-compose.sh          the whole check
#   docker/test-compose.sh images   steps 1-3 only
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${MMGPT_COMPOSE_STATE_DIR:-/var/lib/mmgpt-compose-test}"
RUN_DIR=/run/mmgpt-compose-test
SUITE="${MMGPT_DEBIAN_SUITE:-bookworm}"
BASE_IMAGE="mmgpt-base:${SUITE}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
DEADLINE_SECONDS="${MMGPT_COMPOSE_DEADLINE:-600}"
WHEELS="$ROOT/docker/wheels"
PROJECT=mmgpt-compose-test

export DOCKER_HOST="unix://$RUN_DIR/docker.sock"
export DOCKER_BUILDKIT=0 # the legacy builder needs no buildx plugin
export MMGPT_IMAGE=mmgpt:compose-test
export PROMETHEUS_IMAGE=mmgpt-prometheus:compose-test
export GRAFANA_IMAGE="${GRAFANA_IMAGE:-grafana/grafana:11.6.0}"
export PUBLISH_ADDRESS=127.0.0.1
export MMGPT_PUBLISH_PORT="${MMGPT_PUBLISH_PORT:-18000}"
export PROMETHEUS_PUBLISH_PORT="${PROMETHEUS_PUBLISH_PORT:-19090}"
export GRAFANA_PUBLISH_PORT="${GRAFANA_PUBLISH_PORT:-13000}"
# One torch thread: the machines that run this are small and shared.
export MMGPT_NUM_THREADS="${MMGPT_NUM_THREADS:-1}"

DOCKERD_PID=""
STACK_UP=0
IP_FORWARD_BEFORE=""
STARTED_AT=$SECONDS

log() { echo "[test-compose $((SECONDS - STARTED_AT))s] $*" >&2; }

install_tools() {
    bash "$ROOT/docker/ci-setup.sh"
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v iptables >/dev/null || missing+=(iptables)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

# No default bridge: compose makes the stack's own network, builds use the host's.
start_dockerd() {
    mkdir -p "$STATE_DIR/data" "$RUN_DIR"
    if [ -f "$RUN_DIR/dockerd.pid" ] && kill -0 "$(cat "$RUN_DIR/dockerd.pid")" 2>/dev/null; then
        log "a dockerd on $DOCKER_HOST still runs (pid $(cat "$RUN_DIR/dockerd.pid")): stop it first"
        return 1
    fi
    IP_FORWARD_BEFORE="$(cat /proc/sys/net/ipv4/ip_forward)"
    log "starting dockerd (log: $RUN_DIR/dockerd.log)"
    dockerd --data-root "$STATE_DIR/data" --exec-root "$RUN_DIR/exec" \
        --pidfile "$RUN_DIR/dockerd.pid" --host "$DOCKER_HOST" --bridge none \
        >"$RUN_DIR/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    local deadline=$((SECONDS + 60))
    until docker info >/dev/null 2>&1; do
        if ! kill -0 "$DOCKERD_PID" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 30 "$RUN_DIR/dockerd.log" >&2
            log "dockerd did not come up"
            return 1
        fi
        sleep 1
    done
    log "dockerd up: $(docker info --format '{{.ServerVersion}}, storage {{.Driver}}')"
}

stop_all() {
    local status=$?
    if [ "$STACK_UP" = 1 ]; then
        if [ "$status" != 0 ]; then
            compose logs --no-color --tail 40 >&2 || true
        fi
        log "docker compose down -v"
        compose down -v --remove-orphans >/dev/null 2>&1 || true
    fi
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        # Layers of earlier builds; the tagged images stay as the next run's cache.
        docker image prune --force >/dev/null 2>&1 || true
        log "stopping dockerd (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID"
        wait "$DOCKERD_PID" 2>/dev/null || true
    fi
    if [ -n "$IP_FORWARD_BEFORE" ]; then
        echo "$IP_FORWARD_BEFORE" >/proc/sys/net/ipv4/ip_forward
    fi
    rm -f "$WHEELS/pip.conf" "$WHEELS/ca-certificates.crt"
    log "finished with status $status"
    exit "$status"
}

# The first Debian mirror this host's apt is configured with.
debian_mirror() {
    local mirror
    mirror="$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
        | grep -v -- '-security' | awk '{ print $2 }' | head -n 1)"
    echo "${mirror:-http://deb.debian.org/debian}"
}

build_base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE already built"
        return
    fi
    local rootfs mirror
    rootfs="$(mktemp -d)"
    mirror="$(debian_mirror)"
    log "debootstrap $SUITE from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$rootfs" "$mirror" >"$RUN_DIR/debootstrap.log" 2>&1 \
        || { tail -n 20 "$RUN_DIR/debootstrap.log" >&2; return 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    log "base image $BASE_IMAGE imported"
}

# The build's pip reaches the index as this host's pip does: same index, same CA bundle.
write_build_pip_config() {
    local cert index
    cert="${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}"
    cert="${cert:-/etc/ssl/certs/ca-certificates.crt}"
    index="${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}"
    cp "$cert" "$WHEELS/ca-certificates.crt"
    {
        echo "[global]"
        echo "cert = /build/docker/wheels/ca-certificates.crt"
        if [ -n "$index" ]; then echo "index-url = $index"; fi
    } >"$WHEELS/pip.conf"
}

# A torch wheel for the base image's Python, fetched by this host's pip (which finds
# the CPU build where this machine's pip is set up for it).
fetch_torch_wheel() {
    if ls "$WHEELS"/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1; then
        return
    fi
    local python_version
    python_version="$(docker run --rm --network none "$BASE_IMAGE" python3 -c \
        'import sys; print("%d.%d" % sys.version_info[:2])')"
    log "downloading the torch $TORCH_VERSION wheel for Python $python_version"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version "$python_version" --platform manylinux_2_28_x86_64 \
        -d "$WHEELS" "torch==$TORCH_VERSION"
}

build_images() {
    build_base_image
    fetch_torch_wheel
    write_build_pip_config
    log "building $PROMETHEUS_IMAGE"
    docker build --quiet --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        -t "$PROMETHEUS_IMAGE" "$ROOT/docker/prometheus" >/dev/null
    # The requirements stage gets a tag of its own: untagged, the prune at the end would
    # drop it, and with it the cache that spares the next build most of its work.
    log "building $MMGPT_IMAGE"
    docker build --quiet --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        --target deps -t "$MMGPT_IMAGE-deps" "$ROOT" >/dev/null
    docker build --quiet --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        -t "$MMGPT_IMAGE" "$ROOT" >/dev/null
}

COMPOSE=(docker compose --project-directory "$ROOT" -f "$ROOT/docker-compose.yml" -p "$PROJECT")

compose() { "${COMPOSE[@]}" "$@"; }

run_stack_check() {
    local services=(mmgpt prometheus) grafana_args=()
    if docker image inspect "$GRAFANA_IMAGE" >/dev/null 2>&1; then
        services+=(grafana)
        grafana_args=(--grafana "http://127.0.0.1:$GRAFANA_PUBLISH_PORT")
    else
        log "SKIP grafana: no image $GRAFANA_IMAGE in this engine and none can be pulled"
    fi
    log "docker compose up -d ${services[*]}"
    STACK_UP=1
    compose up -d --no-build --wait --wait-timeout "$DEADLINE_SECONDS" "${services[@]}"
    log "stack up; checking it"
    python3 "$ROOT/docker/check_stack.py" \
        --mmgpt "http://127.0.0.1:$MMGPT_PUBLISH_PORT" \
        --prometheus "http://127.0.0.1:$PROMETHEUS_PUBLISH_PORT" \
        --deadline "$DEADLINE_SECONDS" "${grafana_args[@]}"
    # the image's prebuilt CPU decode kernels load (no compiler in the runtime image)
    local mmgpt_logs
    mmgpt_logs="$(compose logs --no-color mmgpt)"
    grep -q "CPU kernels loaded from /opt/mmgpt/lib/" <<<"$mmgpt_logs" \
        || { log "the mmgpt container did not load its CPU kernels"; return 1; }
    log "CPU kernels loaded from the image's library"
}

main() {
    if [ "$(id -u)" != 0 ]; then
        echo "test-compose: run as root (it installs packages and starts dockerd)" >&2
        exit 2
    fi
    trap stop_all EXIT
    install_tools
    start_dockerd
    build_images
    if [ "${1:-}" != images ]; then
        run_stack_check
    fi
}

main "$@"
