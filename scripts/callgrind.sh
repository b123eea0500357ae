#!/usr/bin/env bash
# Instructions per message on the hot paths (send + receive, user space),
# counted by callgrind: stable under machine load, unlike timings.
# Usage: scripts/callgrind.sh [binary|binary-owned|binary16k|json|json-owned|pingpong|pingpong-shm ...]
# (default: binary json; see benches/hot_path.rs)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(cargo bench --bench hot_path --no-run 2>&1 | grep -o 'target/release/deps/hot_path-[0-9a-f]*' | head -1)
out=target/callgrind
mkdir -p "$out"
small=2000
large=12000
total() {
  valgrind --tool=callgrind --callgrind-out-file="$2" "$bin" "$1" "$3" >/dev/null 2>&1
  grep -E '^(summary|totals):' "$2" | head -1 | awk '{print $2}'
}
for ser in "${@:-binary json}"; do
  for s in $ser; do
    a=$(total "$s" "$out/$s-small.out" $small)
    b=$(total "$s" "$out/$s-large.out" $large)
    per=$(( (b - a) / (large - small) ))
    echo "$s: $per instructions per message (send + receive; Ir $a at $small, $b at $large messages)"
    callgrind_annotate --inclusive=no "$out/$s-large.out" 2>/dev/null \
      | grep -E '^ *[0-9,]+ \(' | head -15 > "$out/$s-top.txt" || true
  done
done
echo "per-function profiles (exclusive, $large messages): $out/*-top.txt"
