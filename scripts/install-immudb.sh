#!/usr/bin/env bash
# Builds immudb, immuclient and immuadmin at a pinned version from the Go module proxy and caches
# the binaries outside the checkout, so a second run (and every CI run on the same machine) is a
# no-op. `go install module@version` refuses immudb because its go.mod has `replace` directives,
# so we build from a tiny wrapper module that repeats them.
#
# Usage: scripts/install-immudb.sh            # prints the bin dir on stdout
# Env:   BT2IMMU_CACHE (default ~/.cache/bt2immu), IMMUDB_VERSION (default v1.11.1)
set -euo pipefail

version="${IMMUDB_VERSION:-v1.11.1}"
cache="${BT2IMMU_CACHE:-$HOME/.cache/bt2immu}"
bin="$cache/immudb-$version/bin"

if [ -x "$bin/immudb" ] && [ -x "$bin/immuclient" ] && [ -x "$bin/immuadmin" ]; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "install-immudb: the Go toolchain is required (apt-get install golang or see go.dev)" >&2; exit 1; }

work="$cache/immudb-$version/wrapper"
mkdir -p "$work" "$bin"
cd "$work"
cat > go.mod <<GOMOD
module bt2immu.local/immudb-wrapper

go 1.25.0

require github.com/codenotary/immudb $version

// Repeated from immudb's own go.mod: without them the build does not resolve.
replace github.com/takama/daemon v0.12.0 => github.com/codenotary/daemon v0.0.0-20200507161650-3d4bcb5230f4

replace github.com/spf13/afero => github.com/spf13/afero v1.5.1
GOMOD
cat > tools.go <<'GOSRC'
//go:build tools

package tools

import (
	_ "github.com/codenotary/immudb/cmd/immuadmin"
	_ "github.com/codenotary/immudb/cmd/immuclient"
	_ "github.com/codenotary/immudb/cmd/immudb"
)
GOSRC
export GOFLAGS="-mod=mod"
echo "install-immudb: resolving github.com/codenotary/immudb@$version via the Go module proxy" >&2
go mod tidy -e >&2 || go get "github.com/codenotary/immudb@$version" >&2
for cmd in immudb immuclient immuadmin; do
  echo "install-immudb: building $cmd" >&2
  go build -tags tools -o "$bin/$cmd.tmp" "github.com/codenotary/immudb/cmd/$cmd" >&2
  mv "$bin/$cmd.tmp" "$bin/$cmd"
done
echo "$bin"
