#!/usr/bin/env bash
# The fuzz targets (tests/fuzz/fuzz_targets), a short run each: first every
# input of the committed corpus (a regression check: each once found new
# paths), then new inputs for SECONDS seconds (default 40). A crash prints
# its input's path and fails the run. Needs the nightly toolchain (the
# coverage instrumentation) and cargo-fuzz, installed here when missing.
#
# A long run, with AddressSanitizer and full optimisation, from the root:
#   cargo +nightly fuzz run --fuzz-dir tests/fuzz frame_codec -- -max_total_time=3600
# and keep what it finds: cargo +nightly fuzz cmin --fuzz-dir tests/fuzz frame_codec
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-40}
targets=(frame_codec client_message rest_request)

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz --version 0.13.2
fi
# No sanitizer: the targets reach only safe Rust, and the build is quicker.
cargo +nightly fuzz build --fuzz-dir tests/fuzz -s none

work=$(mktemp -d /tmp/conch-fuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT
bin=tests/fuzz/target/x86_64-unknown-linux-gnu/release
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  # New inputs go to $work; the committed corpus is only read.
  if ! "$bin/$t" "$work/$t" "tests/fuzz/corpus/$t" \
      -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="$work/$t-" -print_final_stats=1 >"$work/$t.log" 2>&1; then
    tail -n 40 "$work/$t.log" >&2
    for crash in "$work/$t"-*; do
      [ -e "$crash" ] || continue
      kept="/tmp/conch-fuzz-$t-$(basename "$crash")"
      cp "$crash" "$kept"
      echo "fuzz: $t failed on $kept (reproduce: $bin/$t $kept)" >&2
    done
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log")
  echo "fuzz: $t: ${runs:-?} inputs in ${seconds}s, no failure"
done
