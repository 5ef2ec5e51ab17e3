#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests
# need (Chromium for the browser tests, the npm packages, which also builds
# the page's script), then runs the page's type check and unit tests, format
# and lint checks, the Rust tests (the adversarial suite among them), the
# benchmark harness in its quick mode, and the browser end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
if [ -f package-lock.json ]; then
  # Also bundles the page's script into web/dist/ (the `prepare` script),
  # which cargo embeds.
  npm ci --no-audit --no-fund --loglevel=error
  npm run --silent typecheck
  npm run --silent test:unit
fi

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
# The benchmark harness end to end, small and quick: correctness, not speed.
cargo test --locked --bench conch -- --quick
if [ -d tests/e2e ]; then
  CONCH_BIN="$PWD/target/debug/conch" npm run --silent test:e2e
fi
