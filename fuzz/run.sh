#!/usr/bin/env bash
# Seeds the corpus from the decoder fixtures and runs the fuzzer for $1 seconds (default 300).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus/decode
i=0
for f in ../tests/fixtures/bpftrace/*/*.out ../tests/fixtures/bpftrace/handwritten/*.out; do
  i=$((i + 1))
  case $f in *json*) sel='\x07' ;; *) sel='\x06' ;; esac
  { printf "$sel"; head -c 4000 "$f"; } > "corpus/decode/seed$i"
done
cargo +nightly fuzz run decode corpus/decode -- -max_total_time="${1:-300}" -max_len=8192
