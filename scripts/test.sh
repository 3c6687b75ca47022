#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing (scripts/setup.sh), then
# runs formatting and lint checks and every test, including the end-to-end tests that need root,
# bpftrace, a real bash and a real immudb. Nothing is skipped: a missing dependency fails.
# Usage: sudo scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --no-build
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
BT2IMMU_IMMUDB_BIN="$(scripts/install-immudb.sh)"
export BT2IMMU_IMMUDB_BIN
export BT2IMMU_REQUIRE_ROOT_TESTS=1
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test" >&2
cargo test --locked -- --test-threads=2
