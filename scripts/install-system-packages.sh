#!/bin/sh
# System binaries some tests and benchmarks need (Debian packages): kubectl (with kustomize
# built in), redis-server, wrk. As root: installs the missing ones (apt-get update first).
# Otherwise: says how to install them and exits 0, so `make test` still runs (those tests skip
# with the same hint).
set -eu

need=""
for pkg in kubectl redis-server wrk; do
    command -v "$pkg" >/dev/null 2>&1 || need="$need $pkg"
done
if [ -z "$need" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "system packages missing:$need (their tests skip)." >&2
    echo "  install as root: make system-packages   (or: apt-get update && apt-get install -y$need)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system packages missing:$need; no apt-get here: install them with your package manager" >&2
    exit 0
fi
echo "installing system packages:$need" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086 # one word per package
apt-get install -y -qq --no-install-recommends $need
for pkg in $need; do
    command -v "$pkg" >/dev/null 2>&1 || { echo "install-system-packages: $pkg still missing" >&2; exit 1; }
done
