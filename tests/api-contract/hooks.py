"""Schemathesis hooks for conch's API contract run (loaded via SCHEMATHESIS_HOOKS).

Written for Schemathesis 4.x (see requirements.txt). `before_call` is the
hook that rewrites requests: Schemathesis runs it right before every request
a case sends (examples, coverage, fuzzing and stateful phases alike), and whose
edits it re-validates, so a case's positive/negative classification follows
what is actually sent. Probes that checks derive from a case (ignored_auth,
content-type probes, ...) copy the already-rewritten body.

Every generated `POST /api/v1/exec` body is made harmless while keeping its
*shape*, so that the server's validation is exercised exactly as generated:

- `command`: a non-blank string becomes `printf x`; a blank one ("", "  ")
  stays as it is (the server refuses "" and runs "  ", which does
  nothing); a non-string stays as it is (the server must refuse it before
  running anything).
- `argv`: a non-empty list of strings becomes ["printf", "x"]; an empty list,
  a list holding a non-string, or a non-list stays as it is.
- `cwd`: a string becomes a private temporary directory (run.sh's
  CONCH_API_CONTRACT_CWD); a non-string stays as it is.
- `env`: names that could change which program runs or load code into it
  (PATH, LD_*, ...) are renamed with an `X_` prefix; everything else is kept.
- Presence and absence of every key is kept, so "both command and argv" and
  "neither" still reach the server and must still get 400.

Half of the exec requests (by a stable hash of the body) are sent with
`Accept: application/x-ndjson`, so that the streamed answer is checked too.

A body that is a string or bytes (a non-JSON media type, or raw JSON) is
decoded as JSON if it can be, rewritten the same way and re-encoded.

Every `/api/v1/files` request is kept inside a private directory: its
`path` names a file there (see `sanitize_files_query`), so that fuzzing
writes and reads nothing else on the machine.

Token management needs no rewriting: the admin token comes from a file,
not from tokens.json, so `DELETE /api/v1/tokens/{name}` cannot revoke it,
and tokens that the run creates live in run.sh's throwaway data directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from typing import Any

import schemathesis
from schemathesis.core.parameters import ParameterLocation


def _work_around_cpython_ast_depth_bug() -> None:
    """CPython before 3.13 can raise `SystemError: AST constructor recursion
    depth mismatch` from ast.parse() called deep in a stack (a bug in its AST
    recursion-depth tracking, cf. CPython gh-106905; seen here on 3.11.7, not
    on 3.13.0). Hypothesis calls ast.parse() only to describe a lambda in a
    strategy's repr, and lets the SystemError out, which aborts Schemathesis's
    coverage phase for POST /api/v1/exec (a "Runtime Error: Inconsistent
    results ... FlakyFailure" on the run). On those interpreters only, such a
    lambda is described as unknown instead; generation is not affected.
    """
    if sys.implementation.name != "cpython" or sys.version_info >= (3, 13):
        return
    try:
        from hypothesis.internal import lambda_sources
    except ImportError:
        return
    original = getattr(lambda_sources, "_lambda_description", None)
    if original is None:
        return

    def describe(f, *args, **kwargs):
        try:
            return original(f, *args, **kwargs)
        except SystemError:
            return "lambda *args, **kwargs: <unknown>"

    lambda_sources._lambda_description = describe


_work_around_cpython_ast_depth_bug()

EXEC_PATH = "/api/v1/exec"
SAFE_COMMAND = "printf x"
SAFE_ARGV = ["printf", "x"]
# Environment names that choose the program, or load code into it, or into sh.
RISKY_ENV = {"PATH", "ENV", "BASH_ENV", "SHELLOPTS", "BASHOPTS", "IFS", "GCONV_PATH", "HOSTALIASES"}
RISKY_ENV_PREFIXES = ("LD_", "BASH_FUNC_")


def _safe_cwd() -> str:
    return os.environ.get("CONCH_API_CONTRACT_CWD") or tempfile.gettempdir()


def _is_risky_env(name: str) -> bool:
    upper = name.upper()
    return upper in RISKY_ENV or upper.startswith(RISKY_ENV_PREFIXES)


def sanitize_exec_body(body: Any) -> Any:
    """The body with its command made harmless and its shape kept."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if "command" in body:
        command = body["command"]
        if isinstance(command, str) and command.strip():
            body["command"] = SAFE_COMMAND
    if "argv" in body:
        argv = body["argv"]
        if isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv):
            body["argv"] = list(SAFE_ARGV)
    if "cwd" in body and isinstance(body["cwd"], str):
        body["cwd"] = _safe_cwd()
    if "env" in body and isinstance(body["env"], dict):
        env = {}
        for name, value in body["env"].items():
            while isinstance(name, str) and _is_risky_env(name):
                name = "X_" + name
            env[name] = value
        body["env"] = env
    return body


def _sanitize_raw(raw: Any) -> Any:
    """A str/bytes body: rewritten if it is a JSON object, else unchanged."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        parsed = json.loads(text)
    except (UnicodeDecodeError, ValueError, TypeError):
        return raw
    if not isinstance(parsed, dict):
        return raw
    clean = sanitize_exec_body(parsed)
    if clean == parsed:
        return raw
    encoded = json.dumps(clean)
    return encoded.encode("utf-8") if isinstance(raw, (bytes, bytearray)) else encoded


def _wants_stream(body: Any) -> bool:
    """Half of the exec requests, chosen by a stable hash of the body (so a
    replay chooses alike), ask for the streamed answer; the document declares
    both 200 media types, and Schemathesis itself never sends this Accept."""
    try:
        key = json.dumps(body, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        key = repr(body)
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[0] % 2 == 1


def _headers_are_under_test(case) -> bool:
    """Whether the case is negative through its headers (e.g. the coverage
    phase's "missing Authorization"). Schemathesis re-validates a container a
    hook edits: an edited header container holds no declared header, so it is
    judged valid, the case turns positive and the run's Authorization header
    is put back, and missing_required_header then reports a false ST203. Such
    a case keeps its headers untouched."""
    meta = case.meta
    if meta is None:
        return False
    if getattr(meta.phase.data, "parameter_location", None) == ParameterLocation.HEADER:
        return True
    info = meta.components.get(ParameterLocation.HEADER)
    return info is not None and info.mode.is_negative


FILES_PATH = "/api/v1/files"


def _files_dir() -> str:
    """A private directory for the files endpoints (made on first use),
    with one file in it for downloads."""
    path = os.path.join(_safe_cwd(), "files")
    os.makedirs(path, exist_ok=True)
    fixture = os.path.join(path, "fixture.txt")
    if not os.path.exists(fixture):
        with open(fixture, "w", encoding="utf-8") as f:
            f.write("fixture\n")
    return path


def sanitize_files_query(method: str, query: Any) -> Any:
    """The files endpoints' query with its paths kept inside the private
    directory: a non-empty `path` names a file there (for a GET, the one
    file that exists; for a PUT, one named after a hash of the generated
    path, so that the same case writes the same name), and `owner` becomes
    the running user. Absent or non-string values stay as they are, so
    that the server's validation is exercised as generated."""
    if not isinstance(query, dict):
        return query
    query = dict(query)
    path = query.get("path")
    if isinstance(path, str) and path:
        if method.upper() == "GET":
            query["path"] = os.path.join(_files_dir(), "fixture.txt")
        else:
            digest = hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:16]
            query["path"] = os.path.join(_files_dir(), "up-" + digest)
    if isinstance(query.get("owner"), str) and query["owner"]:
        query["owner"] = str(os.getuid())
    return query


@schemathesis.hook
def before_call(context, case, **kwargs):
    if case.path == FILES_PATH:
        case.query = sanitize_files_query(case.method, case.query)
        return
    if case.path != EXEC_PATH:
        return
    body = case.body
    if isinstance(body, dict):
        case.body = sanitize_exec_body(body)
    elif isinstance(body, (str, bytes, bytearray)):
        case.body = _sanitize_raw(body)
    headers = case.headers if case.headers is not None else {}
    if (
        not _headers_are_under_test(case)
        and not any(name.lower() == "accept" for name in headers)
        and _wants_stream(case.body)
    ):
        headers = dict(headers)
        headers["Accept"] = "application/x-ndjson"
        case.headers = headers


# --- every failure, before Schemathesis deduplicates them ----------------------
# Schemathesis shows one failure per kind and operation; run.sh's summary
# (summarize.py) wants them all, with the request that was actually sent.
# `filter_failure` sees each failure once; it keeps them all (returns True).

FAILURES_LOG = os.environ.get("CONCH_API_CONTRACT_FAILURES")
_REDACTED = {"authorization", "cookie"}


def _text(data: Any, limit: int = 2000) -> str | None:
    if data is None:
        return None
    if isinstance(data, (bytes, bytearray)):
        data = bytes(data[:limit]).decode("utf-8", "backslashreplace")
    return str(data)[:limit]


def _record(failure, case, response) -> dict:
    request = response.request
    headers = {
        name: ("[redacted]" if name.lower() in _REDACTED else value)
        for name, value in (request.headers or {}).items()
    }
    meta = case.meta
    phase = getattr(getattr(getattr(meta, "phase", None), "name", None), "value", None)
    return {
        "operation": failure.operation or case.operation.label,
        "code": type(failure).code,
        "kind": type(failure).kind_title,
        "checks": list(type(failure).checks),
        "failure": type(failure).__name__,
        "title": failure.title,
        "message": failure.message,
        "phase": phase,
        "request": {
            "method": request.method,
            "url": request.url,
            "headers": headers,
            "body": _text(request.body),
        },
        "response": {
            "status": response.status_code,
            "headers": {k: v for k, v in response.headers.items()},
            "body": _text(response.content),
        },
    }


if FAILURES_LOG:

    @schemathesis.hook
    def filter_failure(context, failure, case, response):
        try:
            line = json.dumps(_record(failure, case, response), ensure_ascii=False)
        except Exception as exc:  # never let the log change the run's outcome
            line = json.dumps({"operation": getattr(failure, "operation", None), "log_error": repr(exc)})
        with open(FAILURES_LOG, "a", encoding="utf-8") as out:
            out.write(line + "\n")
        return True


# --- the streamed answer, line by line ------------------------------------------
# Schemathesis cannot validate an application/x-ndjson body against the
# document (it warns and skips it), so this check does: every line is one
# StreamLine of the document, and the last line, and only it, ends the
# command (its exit status, or `error`).

_STREAM_LINE_VALIDATORS: dict[tuple[int, str], Any] = {}


def _stream_line_validator(case, name="StreamLine"):
    raw = case.operation.schema.raw_schema
    key = (id(raw), name)
    if key not in _STREAM_LINE_VALIDATORS:
        import jsonschema
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        root = "urn:conch:openapi"
        registry = Registry().with_resource(root, Resource(contents=raw, specification=DRAFT202012))
        validator = jsonschema.Draft202012Validator(
            {"$ref": root + "#/components/schemas/" + name}, registry=registry
        )
        _STREAM_LINE_VALIDATORS[key] = validator
    return _STREAM_LINE_VALIDATORS[key]


def _fanout_lines_conform(case, lines):
    """A fan-out's lines (a `target` was given): each a FanoutLine; each host
    ends once, and the summary line, and only it, comes last."""
    validator = _stream_line_validator(case, "FanoutLine")
    if lines[-1] != b"":
        raise AssertionError("the streamed answer does not end with a newline")
    lines = lines[:-1]
    ended: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        line = json.loads(raw)
        errors = sorted(validator.iter_errors(line), key=str)
        if errors:
            raise AssertionError(f"line {number} is not a FanoutLine: {errors[0].message}: {raw[:200]!r}")
        last = number == len(lines)
        if "summary" in line:
            if not last:
                raise AssertionError(f"line {number} is the summary, yet lines follow")
            if line["summary"]["total"] != len(ended):
                raise AssertionError(f"the summary counts {line['summary']['total']} hosts, {len(ended)} ended")
            return None
        if last:
            raise AssertionError("the fan-out's last line is not its summary")
        host = line["agent"]
        if host in ended:
            raise AssertionError(f"line {number}: host {host} already ended")
        if "status" in line:
            ended.add(host)
    raise AssertionError("the fan-out has no lines")


@schemathesis.check
def ndjson_lines_conform(ctx, response, case):
    """Each line of a streamed exec answer is a StreamLine; the last ends it."""
    content_type = response.headers.get("content-type") or response.headers.get("Content-Type") or ""
    if isinstance(content_type, list):
        content_type = content_type[0] if content_type else ""
    if not content_type.startswith("application/x-ndjson"):
        return None
    lines = response.content.split(b"\n")
    if lines and lines[0].startswith(b"{") and (b'"agent"' in lines[0] or b'"summary"' in lines[0]):
        return _fanout_lines_conform(case, lines)
    validator = _stream_line_validator(case)
    if lines[-1] != b"":
        raise AssertionError("the streamed answer does not end with a newline")
    lines = lines[:-1]
    if not lines:
        raise AssertionError("the streamed answer is empty: no exit status or error line")
    for number, raw in enumerate(lines, start=1):
        try:
            line = json.loads(raw)
        except ValueError as exc:
            raise AssertionError(f"line {number} is not JSON: {exc}: {raw[:200]!r}") from None
        errors = sorted(validator.iter_errors(line), key=str)
        if errors:
            raise AssertionError(f"line {number} is not a StreamLine: {errors[0].message}: {raw[:200]!r}")
        ends = "error" in line or "timed_out" in line
        last = number == len(lines)
        if ends and not last:
            raise AssertionError(f"line {number} ends the command, yet {len(lines) - number} lines follow")
        if last and not ends:
            raise AssertionError(f"the last line neither gives the exit status nor an error: {raw[:200]!r}")
    return None
