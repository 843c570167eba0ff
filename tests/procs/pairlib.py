"""Runs ``envelope_pair.py`` once per test session (2 real rank processes, real gloo)
and hands its per-rank JSON results to every test file that asks.

Loaded by path from the test files (``load()``), cached in ``sys.modules`` so that
test_drift.py and test_envelope.py share one run. Every process is bounded by a
timeout and killed in ``finally``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
_cache: dict[tuple[str, str], Any] = {}


def run_pair(mode: str = "split", timeout_s: float = 75.0) -> dict[int, dict[str, Any]]:
    """Results of both ranks, keyed by rank, with the frame travelling ``mode`` (``split``:
    control frame, then tensors; ``fused``: one buffer); raises AssertionError with logs
    on failure."""
    if ("results", mode) in _cache:
        return _cache["results", mode]
    if ("failure", mode) in _cache:
        raise AssertionError(_cache["failure", mode])
    import torch.distributed as dist

    master = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=30), wait_for_workers=False)
    tmp = Path(tempfile.mkdtemp(prefix="envelope_pair_"))
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for rank in (0, 1):
            log = open(tmp / f"rank{rank}.log", "wb")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(HERE / "envelope_pair.py"), str(rank), str(master.port), str(tmp / f"rank{rank}.json"), mode],
                    cwd=REPO,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        codes = [p.poll() for p in procs]
        results = {}
        for rank in (0, 1):
            path = tmp / f"rank{rank}.json"
            if path.is_file():
                results[rank] = json.loads(path.read_text())
        problems = []
        if codes != [0, 0]:
            problems.append(f"exit codes {codes} (None: still running at {timeout_s}s)")
        for rank in (0, 1):
            if rank not in results:
                problems.append(f"rank {rank} wrote no result")
            elif "fatal" in results[rank]:
                problems.append(f"rank {rank} fatal:\n{results[rank]['fatal']}")
        if problems:
            for log in logs:
                log.flush()
            text = "\n".join(problems)
            for rank in (0, 1):
                text += f"\n--- rank {rank} log ---\n" + (tmp / f"rank{rank}.log").read_text(errors="replace")[-4000:]
            _cache["failure", mode] = text
            raise AssertionError(text)
        _cache["results", mode] = results
        shutil.rmtree(tmp, ignore_errors=True)  # kept only when it failed
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.wait(timeout=10)
        for log in logs:
            log.close()
        del master
