#!/usr/bin/env bash
# Installs everything bt2immu needs on a fresh Debian/Ubuntu machine, then builds it.
# Idempotent: what is already there is left alone, so a second run takes seconds.
#   - bpftrace, tmux, readline tools (Debian packages)
#   - immudb, immuclient, immuadmin v1.11.1 (built from the Go module proxy, cached in
#     ~/.cache/bt2immu, see scripts/install-immudb.sh)
#   - bt2immu itself (cargo build --release)
# Usage: sudo scripts/setup.sh [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v bpftrace >/dev/null || need_pkgs+=(bpftrace)
command -v tmux >/dev/null || need_pkgs+=(tmux)
command -v openssl >/dev/null || need_pkgs+=(openssl)
command -v cc >/dev/null || need_pkgs+=(gcc)
# libreadline: the tests build a small program that links it dynamically, to check that
# bt2immu finds readline in a shared library as on distributions whose bash links it.
[ -e /usr/include/readline/readline.h ] || need_pkgs+=(libreadline-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install ${need_pkgs[*]} (run: sudo $0)" >&2
    exit 1
  fi
  echo "setup: installing ${need_pkgs[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "${need_pkgs[@]}" >&2
fi

# bpftrace needs tracefs for tracepoints; not every host mounts it.
if [ "$(id -u)" -eq 0 ] && [ ! -e /sys/kernel/tracing/events ]; then
  mount -t tracefs tracefs /sys/kernel/tracing && echo "setup: mounted tracefs at /sys/kernel/tracing" >&2
fi

bin=$(scripts/install-immudb.sh)
echo "setup: immudb binaries in $bin" >&2

if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: Rust (cargo) is required: https://rustup.rs" >&2
    exit 1
  fi
fi
if [ "${1:-}" != "--no-build" ]; then
  cargo build --release --locked >&2
  echo "setup: built target/release/bt2immu" >&2
fi
