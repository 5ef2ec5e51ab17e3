#!/usr/bin/env bash
# The fuzz targets (tests/fuzz/fuzz_targets), a short run each: first every
# input of the committed corpus (a regression check: each once found new
# paths), then new inputs for SECONDS seconds (default 40). A crash prints
# its input's path and fails the run. Needs the nightly toolchain (the
# coverage instrumentation) and cargo-fuzz, installed here when missing.
#
# A long run, with AddressSanitizer and full optimisation, from the root:
#   CARGO_PROFILE_RELEASE_OPT_LEVEL=3 cargo +nightly fuzz run --fuzz-dir tests/fuzz \
#     frame_codec -- -max_total_time=3600
# and keep what it finds: cargo +nightly fuzz cmin --fuzz-dir tests/fuzz frame_codec
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-40}
targets=(frame_codec client_message rest_request)

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: the nightly toolchain is missing or broken (rustup toolchain install nightly)" >&2
  exit 1
fi
if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz 0.13.2" ]; then
  cargo install --locked --force cargo-fuzz --version 0.13.2
fi
# No sanitizer (the targets reach only safe Rust, and the build is
# quicker), with debug assertions and overflow checks, and the dev profile:
# cargo-fuzz's release build forces one codegen unit a crate, which took
# 354 s on two cores against 193 s for this one. Unoptimised, a target
# still runs 5,000 to 17,000 inputs a second, and short runs are a check
# of the corpus and of recent changes; long runs use release (below).
fuzz=(cargo +nightly fuzz run --fuzz-dir tests/fuzz -s none -a --dev)
cargo +nightly fuzz build --fuzz-dir tests/fuzz -s none -a --dev

work=$(mktemp -d /tmp/conch-fuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  # New inputs go to $work; the committed corpus is only read.
  if ! "${fuzz[@]}" "$t" "$work/$t" "tests/fuzz/corpus/$t" -- \
      -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="$work/$t-" -print_final_stats=1 >"$work/$t.log" 2>&1; then
    tail -n 40 "$work/$t.log" >&2
    # libFuzzer writes the input here, or where cargo-fuzz tells it to.
    for crash in "$work/$t"-* tests/fuzz/artifacts/"$t"/*; do
      [ -e "$crash" ] || continue
      kept="/tmp/conch-fuzz-$t-$(basename "$crash")"
      cp "$crash" "$kept"
      echo "fuzz: $t failed on $kept (reproduce: ${fuzz[*]} $t $kept)" >&2
    done
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log")
  echo "fuzz: $t: ${runs:-?} inputs in ${seconds}s, no failure"
done
