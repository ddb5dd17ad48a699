"""One measurement per fresh subprocess, shared by the benchmark scripts.

A benchmark re-runs its own script with `--worker` and its arguments; the worker prints one JSON line.
A fresh process per measurement keeps peak RSS, allocator state and thread pools its own.
"""

from __future__ import annotations

import json
import subprocess
import sys


def run_worker(script: str, args: list[str], timeout: float | None = None) -> dict:
    """Run `script --worker ARGS` in a fresh interpreter: its last stdout line as JSON, or {"error": why}."""
    cmd = [sys.executable, script, "--worker", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout}s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])
