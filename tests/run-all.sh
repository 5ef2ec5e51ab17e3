#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests
# need (Chromium for the browser tests, the npm packages, which also builds
# the page's script, Python's venv for the API contract tools), then runs the
# page's type check and unit tests, format and lint checks, the Rust tests
# (the adversarial suite among them), the API contract check, the benchmark
# harness in its quick mode, the browser end-to-end tests (one through
# nginx), and the Debian package's build and lintian check. The audit tests
# use a real PostgreSQL: CONCH_TEST_DATABASE_URL, or a throwaway cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v curl >/dev/null 2>&1 || need+=(curl)
# Full-screen programs whose screens the session tests redraw.
command -v vi >/dev/null 2>&1 || need+=(vim-tiny)
command -v less >/dev/null 2>&1 || need+=(less)
command -v top >/dev/null 2>&1 || need+=(procps)
# The unit files are checked with systemd-analyze verify.
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# The API contract check builds a Python venv (Debian splits venv out).
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
# The audit tests run a throwaway PostgreSQL cluster (initdb, pg_ctl, as the
# postgres user the package makes; its own cluster is never started: see
# policy-rc.d below) and read and tamper with the stores with their clients.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
# Recordings must be files asciinema itself reads (`asciinema cat`).
command -v asciinema >/dev/null 2>&1 || need+=(asciinema)
# The reverse-proxy test runs nginx in front of conch (its own config, on a
# free loopback port); the package must not start a system nginx on :80.
[ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  as_root apt-get update -qq
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod +x /usr/sbin/policy-rc.d
    trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  as_root rm -f /usr/sbin/policy-rc.d
  trap - EXIT
fi
if [ -f package-lock.json ]; then
  # Also bundles the page's script into web/dist/ (the `prepare` script),
  # which cargo embeds.
  npm ci --no-audit --no-fund --loglevel=error
  npm run --silent typecheck
  npm run --silent test:unit
fi

# Each step says how long it took (the whole is to stay under 30 minutes
# on two cores).
timed() {
  local start=$SECONDS
  "$@"
  echo "run-all: $((SECONDS - start)) s for: $*" >&2
}

timed cargo fmt --all -- --check
timed cargo clippy --locked --all-targets -- -D warnings
timed cargo test --locked
# The REST API against its generated description: openapi-spec-validator,
# then Schemathesis fuzzing the live server (pinned in
# tests/api-contract/requirements.txt; every command it sends is printf).
timed tests/api-contract/run.sh "$PWD/target/debug/conch"
# The fuzz targets (frame codec, browser messages, REST requests): the
# committed corpus, then 40 s of new inputs each.
timed tests/fuzz/run.sh 40
# The benchmark harness end to end, small and quick: correctness, not speed.
timed cargo test --locked --bench conch -- --quick
if [ -d tests/e2e ]; then
  CONCH_BIN="$PWD/target/debug/conch" timed npm run --silent test:e2e
fi
# The Debian package (cargo-deb, pinned): its files, scripts and lintian,
# around the dev build the tests used (see tests/package.sh).
CONCH_PACKAGE_PROFILE=dev timed tests/package.sh
