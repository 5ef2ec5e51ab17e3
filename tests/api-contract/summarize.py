"""Groups the failures that hooks.py logged (one JSON object a line) by
operation, failure kind, response status and the gist of the problem's
`detail` (quoted values and numbers blanked), and prints each group once
with a count and its shortest request as a curl command.

Usage: python summarize.py FAILURES.jsonl
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections import defaultdict


def gist(body: str | None) -> str:
    """The problem's `detail` with its quoted values and numbers blanked."""
    try:
        detail = json.loads(body or "").get("detail")
    except (ValueError, AttributeError):
        detail = None
    if not isinstance(detail, str):
        return ""
    detail = re.sub(r'"(?:[^"\\]|\\.)*"', '"…"', detail)
    detail = re.sub(r"`[^`]*`", "`…`", detail)
    return re.sub(r"\d+", "N", detail)


def curl(request: dict) -> str:
    parts = ["curl", "-sS", "-X", request["method"]]
    for name, value in request["headers"].items():
        if name.lower() in ("user-agent", "accept-encoding", "connection", "content-length", "x-schemathesis-testcaseid"):
            continue
        if value == "[redacted]":
            value = "Bearer $TOKEN" if name.lower() == "authorization" else value
        parts += ["-H", f"{name}: {value}"]
    if request.get("body") is not None:
        parts += ["--data-binary", request["body"]]
    parts.append(request["url"])
    return " ".join(shlex.quote(p) if "$TOKEN" not in p else f'"{p}"' for p in parts)


def main(path: str) -> int:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    try:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        records = []
    for r in records:
        if "log_error" in r:
            print(f"(a failure could not be logged: {r['log_error']})")
            continue
        key = (r["operation"], r["code"], r["title"], r["response"]["status"], gist(r["response"]["body"]))
        groups[key].append(r)
    if not groups:
        print("no failures logged")
        return 0
    print(f"{len(records)} failing checks in {len(groups)} groups (operation, kind, status, detail):")
    for (operation, code, title, status, detail), items in sorted(groups.items()):
        sample = min(items, key=lambda r: len(r["request"].get("body") or "") + len(r["request"]["url"]))
        response = sample["response"]
        ctype = ", ".join(response["headers"].get("content-type", [])) or "-"
        print()
        print(f"== {operation} | {code} {title} | HTTP {status} {detail} | x{len(items)}")
        print(f"   checks: {', '.join(sample['checks'])}; phase: {sample['phase']}")
        message = (sample["message"] or "").strip().splitlines()
        print(f"   says: {message[0] if message else ''}")
        print(f"   repro: {curl(sample['request'])}")
        print(f"   got: {status} {ctype} {(response['body'] or '')[:300]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
