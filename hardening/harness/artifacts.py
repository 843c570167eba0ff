"""What a finished case keeps of its ranks' debug artifacts, and tlparse's all-ranks HTML.

This module owns the policy ``triage.artifacts`` names. Every compiled rank writes its
``TORCH_TRACE`` directory from the first compile on and its depyf dump as it ends,
because neither can wait for the failure to show (see :mod:`hardening.harness.worker`);
here, once the case is judged, a case that did not pass keeps them (and gets the
all-ranks HTML when the ``tlparse`` binary is installed), a passing one drops them unless
asked to keep them. Nothing here raises or gates: an artifact that could not be made is
named ``unavailable: why`` in each rank's ``artifacts``, which every report shows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from hardening.harness.profile import Profile
from hardening.harness.results import RankResult
from hardening.runtime.compile.dump import DUMP_DIR
from hardening.runtime.compile.trace import TRACE_DIR

TLPARSE = "tlparse"
TLPARSE_DIR = "tlparse"
"""Where the all-ranks HTML goes inside the case directory (``index.html`` is the landing page)."""

TLPARSE_TIMEOUT_S = 60.0
"""Bound on one tlparse run: a report must not hold up the suite."""

_STAGING = ".tlparse_input"


def settle(profile: Profile, case_dir: Path, ranks: list[RankResult], *, passed: bool) -> None:
    """Keep or drop each rank's trace and dump per ``profile.triage`` and the verdict
    (``passed``: nothing the case did needs looking at), and name what was kept in each
    rank's ``artifacts``; a failing case also gets tlparse's HTML. Never raises."""
    policy = profile.triage.artifacts
    keep_dump = policy == "always" or (policy == "on_failure" and not passed)
    keep_trace = keep_dump or profile.triage.torch_trace
    for rank in ranks:
        rank_dir = case_dir / f"rank{rank.rank}"
        artifacts = dict(rank.artifacts or {})
        for name, sub, keep in (("torch_trace", TRACE_DIR, keep_trace), ("depyf", DUMP_DIR, keep_dump)):
            if keep:
                # What the record does not name (a rank killed before its end) is still there.
                if name not in artifacts and (rank_dir / sub).is_dir():
                    artifacts[name] = str(rank_dir / sub)
            else:
                shutil.rmtree(rank_dir / sub, ignore_errors=True)
                artifacts.pop(name, None)
        if keep_dump and profile.compile.enabled and profile.hardened and "depyf" not in artifacts:
            if not rank.has_record:
                artifacts["depyf"] = "unavailable: the rank did not reach its own end (killed or lost), so it left no dump"
            else:
                artifacts["depyf"] = f"unavailable: the rank compiled nothing before it ended (phase {rank.phase or '?'})"
        if not keep_dump:
            artifacts.pop("on_end", None)
        rank.artifacts = artifacts
    if keep_dump:
        html = all_ranks_html(case_dir)
        for rank in ranks:
            rank.artifacts["tlparse"] = html


def all_ranks_html(case_dir: Path, *, exe: str | None = None) -> str:
    """tlparse's all-ranks report of the ranks' traces under ``case_dir``: the path of its
    ``index.html``, or ``unavailable: why`` (no tlparse, no trace, tlparse failed)."""
    exe = exe or shutil.which(TLPARSE)
    if exe is None:
        return "unavailable: tlparse not installed (pip install tlparse)"
    logs = sorted(case_dir.glob(f"rank*/{TRACE_DIR}/*.log"))
    if not logs:
        return "unavailable: no rank left a compile trace"
    # --all-ranks-html reads one directory of dedicated_log_torch_trace_rank_<r>_*.log files;
    # the traces live in their ranks' directories, so link them side by side, named by rank.
    staging = case_dir / _STAGING
    out = case_dir / TLPARSE_DIR
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for i, log in enumerate(logs):
            rank = log.parent.parent.name.removeprefix("rank")
            os.symlink(log.resolve(), staging / f"dedicated_log_torch_trace_rank_{rank}_{i}.log")
        done = subprocess.run(
            [exe, str(staging), "--all-ranks-html", "-o", str(out), "--overwrite", "--no-browser"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TLPARSE_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"unavailable: tlparse ran past {TLPARSE_TIMEOUT_S:g}s"
    except OSError as exc:
        return f"unavailable: tlparse could not run: {exc}"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
        return f"unavailable: tlparse exit {done.returncode}: {last[:300]}"
    index = out / "index.html"
    return str(index) if index.is_file() else f"unavailable: tlparse wrote no {index}"
