#!/usr/bin/env bash
# tests/api-contract/run.sh [CONCH_BIN]
#
# Checks conch's REST API against its own OpenAPI contract, with tools from
# PyPI pinned in requirements.txt (installed into a cached venv):
#
#  1. starts `conch serve` (default binary: target/debug/conch) on a free
#     loopback port, with a throwaway --data-dir, a random 64-hex-character
#     admin token in a 0600 file, and its rate limits lifted for fuzzing;
#     waits (bounded) until /readyz says the embedded agent is connected;
#  2. fetches GET /api/v1/openapi.json and validates it as an OpenAPI 3
#     document with openapi-spec-validator;
#  3. runs Schemathesis (`st run`, all phases, ALL checks) against the live
#     server as the admin (Authorization: Bearer <token>): status codes,
#     content types, response headers and schemas conform to the document;
#     no 5xx; invalid input is refused and valid input accepted; undeclared
#     methods answer 405 with Allow; auth is enforced; and so on.
#     hooks.py rewrites every POST /api/v1/exec body before it is sent, so
#     that only `printf x` ever runs (in a temporary cwd), keeping the body's
#     shape (both/neither of command and argv, blank command, wrong types).
#     Half of the exec requests (chosen by a stable hash of the body) ask for
#     the streamed answer (Accept: application/x-ndjson).
#  4. stops the server (always, via trap) and exits non-zero if the
#     validator or Schemathesis failed, or the server died or panicked.
#     Schemathesis prints one failure per kind and operation; hooks.py also
#     logs every failing check to failures.jsonl, and summarize.py prints
#     them grouped, each group with a curl reproduction.
#
# Knobs (environment): PYTHON (default python3, needs >= 3.11),
# API_CONTRACT_MAX_EXAMPLES (default 100 per operation and phase),
# API_CONTRACT_MAX_TIME (seconds; unset by default: one pass of every phase.
# Set it and fuzzing/stateful phases repeat until the budget is spent),
# API_CONTRACT_TIME_BOUND (seconds, default MAX_TIME+30, or 150: Schemathesis
# is interrupted past it, and the run fails),
# API_CONTRACT_SEED (reproduce a run), API_CONTRACT_WORKERS (default 2),
# API_CONTRACT_REPORT_DIR (default: a fresh temporary directory, kept),
# XDG_CACHE_HOME (venv location: $XDG_CACHE_HOME/conch-api-contract/venv).
# Reports (JUnit XML, NDJSON events, a pytest reproducer file) and the
# server log are left in the report directory, printed at the end.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"
CONCH_BIN="${1:-$REPO_ROOT/target/debug/conch}"
case "$CONCH_BIN" in /*) ;; *) CONCH_BIN="$PWD/$CONCH_BIN" ;; esac
PYTHON="${PYTHON:-python3}"
MAX_EXAMPLES="${API_CONTRACT_MAX_EXAMPLES:-100}"
WORKERS="${API_CONTRACT_WORKERS:-2}"
READY_TIMEOUT_S=20

log() { printf 'api-contract: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

[ -x "$CONCH_BIN" ] || die "no executable conch binary at $CONCH_BIN (build it, or pass its path)"
command -v curl >/dev/null || die "curl is needed"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is older than 3.11 (set PYTHON=python3.11 or newer)"

# --- (a) the tools, in a venv cached by the hash of requirements.txt --------
CACHE_DIR="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/conch-api-contract"
VENV="$CACHE_DIR/venv"
STAMP="$( { cat "$HERE/requirements.txt"; "$PYTHON" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/st" ] || [ "$(cat "$VENV/.conch-stamp" 2>/dev/null)" != "$STAMP" ]; then
    log "installing the pinned tools into $VENV"
    rm -rf "$VENV"
    mkdir -p "$CACHE_DIR"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        -r "$HERE/requirements.txt"
    echo "$STAMP" > "$VENV/.conch-stamp"
fi
log "$("$VENV/bin/st" --version 2>&1 | head -1); openapi-spec-validator $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("openapi-spec-validator"))')"

# --- (b) the server -----------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/conch-api-contract.XXXXXX")"
chmod 700 "$WORK"
REPORT_DIR="${API_CONTRACT_REPORT_DIR:-$WORK/report}"
mkdir -p "$REPORT_DIR" "$WORK/cwd"
SERVER_LOG="$REPORT_DIR/server.log"
TOKEN_FILE="$WORK/admin-token"
SERVER_PID=""

cleanup() {
    local rc=$?
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        # The server leads its own process group (setsid): the embedded
        # agent and any command still running go with it.
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    fi
    # Secrets and state go; the reports and the server log stay.
    rm -rf "$TOKEN_FILE" "$WORK/data" "$WORK/cwd" "$WORK/openapi.json" "$WORK/schemathesis.toml"
    [ "$REPORT_DIR" = "$WORK/report" ] || rmdir "$WORK" 2>/dev/null || true
    log "reports and server log: $REPORT_DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

(umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' > "$TOKEN_FILE")
TOKEN="$(cat "$TOKEN_FILE")"

# Settings from the caller's environment (CONCH_PUBLIC_URL, ...) would change
# what is tested: the server gets only what is given here.
UNSET=()
for var in $(compgen -e | grep '^CONCH_' || true); do UNSET+=(-u "$var"); done
SERVE_ARGS=(
    serve
    --listen 127.0.0.1:0
    --log-format json
    --data-dir "$WORK/data"
    --admin-token-file "$TOKEN_FILE"
    # Fuzzing sends thousands of requests from one caller in a few minutes.
    --api-rate-per-minute 1000000
    --max-concurrent-execs 1024
    --max-commands-per-user 1024
    --command-reserve 0
    # Bounds any command that would somehow not be printf.
    --max-timeout-ms 10000
)
log "starting $CONCH_BIN ${SERVE_ARGS[*]}"
env "${UNSET[@]}" setsid "$CONCH_BIN" "${SERVE_ARGS[@]}" >"$SERVER_LOG" 2>&1 </dev/null &
SERVER_PID=$!

ADDR=""
deadline=$((SECONDS + READY_TIMEOUT_S))
while :; do
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$SERVER_LOG" >&2; die "the server exited during start-up"; }
    if [ -z "$ADDR" ]; then
        ADDR="$(sed -n 's/.*"message":"server listening","addr":"\([^"]*\)".*/\1/p' "$SERVER_LOG" | head -1)"
    fi
    if [ -n "$ADDR" ] && [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$ADDR/readyz")" = 200 ]; then
        break
    fi
    [ "$SECONDS" -lt "$deadline" ] || { cat "$SERVER_LOG" >&2; die "the server was not ready within ${READY_TIMEOUT_S}s"; }
    sleep 0.2
done
BASE="http://$ADDR"
log "server ready at $BASE (pid $SERVER_PID)"

# --- (c) the document ---------------------------------------------------------
status=0
curl -fsS --max-time 10 -o "$WORK/openapi.json" "$BASE/api/v1/openapi.json"
log "openapi-spec-validator $BASE/api/v1/openapi.json"
if "$VENV/bin/openapi-spec-validator" "$WORK/openapi.json"; then
    log "openapi-spec-validator: OK"
else
    log "openapi-spec-validator: FAILED"
    status=1
fi

# --- (d) the API against it ---------------------------------------------------
ST_ARGS=(
    run "$BASE/api/v1/openapi.json"
    --url "$BASE"
    --checks all
    --phases examples,coverage,fuzzing,stateful
    --max-examples "$MAX_EXAMPLES"
    # Report every distinct failure of an operation, not just its first.
    --continue-on-failure
    --workers "$WORKERS"
    --request-timeout 20
    --generation-database none
    --report junit,ndjson,pytest
    --report-dir "$REPORT_DIR"
    --no-color
)
[ -z "${API_CONTRACT_MAX_TIME:-}" ] || ST_ARGS+=(--max-time "$API_CONTRACT_MAX_TIME")
[ -z "${API_CONTRACT_SEED:-}" ] || ST_ARGS+=(--seed "$API_CONTRACT_SEED")
# The token goes through the environment and a config file of the private
# work directory, never on a command line (which `ps` shows everyone).
cat > "$WORK/schemathesis.toml" <<'TOML'
headers = { Authorization = "Bearer ${CONCH_API_CONTRACT_TOKEN}" }
TOML
log "st --config-file $WORK/schemathesis.toml ${ST_ARGS[*]}"
started=$SECONDS
FAILURES="$REPORT_DIR/failures.jsonl"
: > "$FAILURES"
# A hard bound on the whole Schemathesis run; SIGINT lets it print its summary.
BOUND="${API_CONTRACT_TIME_BOUND:-$(( ${API_CONTRACT_MAX_TIME:-120} + 30 ))}"
st_rc=0
# Run from the work directory: nothing Schemathesis writes lands in the repo.
(cd "$WORK/cwd" && SCHEMATHESIS_HOOKS="$HERE/hooks.py" CONCH_API_CONTRACT_CWD="$WORK/cwd" \
    CONCH_API_CONTRACT_FAILURES="$FAILURES" \
    CONCH_API_CONTRACT_TOKEN="$TOKEN" \
    timeout --signal=INT --kill-after=15 "$BOUND" "$VENV/bin/st" \
        --config-file "$WORK/schemathesis.toml" "${ST_ARGS[@]}") || st_rc=$?
if [ "$st_rc" -eq 0 ]; then
    log "schemathesis: OK ($((SECONDS - started))s)"
else
    [ "$st_rc" -ne 124 ] || log "schemathesis: stopped at the time bound of ${BOUND}s"
    log "schemathesis: FAILED, exit $st_rc ($((SECONDS - started))s)"
    status=1
    # Schemathesis shows one failure per kind and operation; this lists them all.
    log "every failing check, grouped ($FAILURES):"
    "$VENV/bin/python" "$HERE/summarize.py" "$FAILURES" || true
fi

kill -0 "$SERVER_PID" 2>/dev/null || { log "the server died during the run"; status=1; }
if grep -q -e 'panicked' "$SERVER_LOG"; then
    log "the server log shows a panic:"
    grep -e 'panicked' "$SERVER_LOG" | head -5 >&2
    status=1
fi
[ "$status" -eq 0 ] && log "PASSED" || log "FAILED"
exit "$status"
