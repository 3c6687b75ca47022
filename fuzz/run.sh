#!/usr/bin/env bash
# Seeds the corpora and runs each fuzz target (decoder, readline assembler) for $1 seconds
# (default 300 each).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus/decode
i=0
for f in ../tests/fixtures/bpftrace/*/*.out ../tests/fixtures/bpftrace/handwritten/*.out; do
  i=$((i + 1))
  case $f in *json*) sel='\x07' ;; *) sel='\x06' ;; esac
  { printf "$sel"; head -c 4000 "$f"; } > "corpus/decode/seed$i"
done
# The readline assembler: seeds are small BT2I2 sessions (a B record with a tiny layout, so
# cut lines and tails are reachable with short inputs).
mkdir -p corpus/readline
printf 'BT2I2 B 4 8 4
BT2I2 P 1 1 5 1 0 10 1 0 0 4294967295 4294967295 1 p pts0 bash
BT2I2 C 1 5 0 \x61\x62\x63\x64
BT2I2 C 1 5 4 \x65\x66\x67\x68
BT2I2 S 1 5 8 ij
' > corpus/readline/seed1
printf 'BT2I2 B 4 8 4
BT2I2 S 1 7 16 xy
BT2I2 C 1 7 0 \x61\x62\x63\x64
BT2I2 P 1 1 7 1 0 18 1 0 0 1 1 1 p  bash
BT2I2 C 1 7 4 \x61\x62\x63\x64
BT2I2 C 1 7 12 \x61\x62\x63\x64
BT2I2 M 1 2 3
' > corpus/readline/seed2
printf 'BT2I2 Q 1 1 9 0 18 1 0 0 1 1 1 uprobe:/usr/bin/bash:parse_and_execute pts0 bash\nBT2I2 S 1 9 0 echo BOUND_KEY_RAN\nBT2I2 N 1 1 10 0 5 1 0 0 1 1 1 tracepoint:syscalls:sys_exit_read pts0 bash\nBT2I2 C 1 10 0 \\x6c\\x73\\x20\\x2d\\x0a\n' > corpus/readline/seed3
t=${1:-300}
cargo +nightly fuzz run decode corpus/decode -- -max_total_time="$t" -max_len=8192
cargo +nightly fuzz run readline corpus/readline -- -max_total_time="$t" -max_len=4096
