"""``hardening doctor``: can this machine run hardening, and what will be missing?

This file owns the environment check. Each check is one row (check | status | detail):
``FAIL`` means suites cannot run at all here (torch too old, no gloo, no functional
collectives), ``WARN`` means a feature degrades and the detail says which one (no GPU:
the h200 profile; no C compiler: inductor on CPU; no py-spy or ptrace: hang stacks; no
depyf: decompiled dumps). The optional ``tlparse`` is reported, found or not, as ok: its
absence costs only the HTML view of traces that are kept anyway. It is fast and
side-effect free: no network, no process group, no compilation; the only child process is
``py-spy --version``.
"""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass

from tabulate import tabulate

from hardening.harness.triage import find_py_spy, ptrace_problem

__all__ = ["Check", "run_doctor"]

MIN_TORCH = "2.6"
"""Oldest torch hardening supports (pyproject pins the same): the recompile guard
``torch.compiler.set_stance("fail_on_recompile")`` arrived in 2.6."""

OK, WARN, FAIL = "ok", "WARN", "FAIL"


@dataclass(frozen=True, kw_only=True, slots=True)
class Check:
    """One row of the report."""

    name: str
    """What was checked."""

    status: str
    """``ok``, ``WARN`` (a feature degrades) or ``FAIL`` (hardening cannot run here)."""

    detail: str
    """What was found, and for WARN/FAIL what it costs."""


def _python() -> Check:
    return Check(
        name="python",
        status=OK,
        detail=f"{platform.python_version()} ({platform.python_implementation()}) at {sys.executable}",
    )


# (dotted attribute, what hardening uses it for, what it falls back to without it)
_DYNAMO_APIS = (
    (
        "torch._dynamo.callback_handler.register_start_callback",
        "compile/recompile counting",
        "counts compiles from torch._dynamo.utils.get_compilation_metrics() instead",
    ),
    (
        "torch._dynamo.utils.graph_break_reasons",
        "graph-break gate",
        "counts counters['graph_break'] instead (noisier)",
    ),
    (
        "torch._dynamo.config.error_on_recompile",
        "recompile guard",
        "uses torch.compiler.set_stance('fail_on_recompile') instead",
    ),
    (
        "torch.compiler.set_stance",
        "recompile guard",
        "uses torch._dynamo.config.error_on_recompile instead",
    ),
)


def _resolve(dotted: str) -> bool:
    """Does ``a.b.c.attr`` exist, importing the longest module prefix first?"""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def _torch_checks() -> list[Check]:
    try:
        import torch
    except Exception as e:  # a broken install raises more than ImportError (OSError on libs)
        return [Check(name="torch", status=FAIL, detail=f"cannot import torch: {e}")]

    from torch.torch_version import TorchVersion

    version = TorchVersion(torch.__version__)
    where = os.path.dirname(torch.__file__)
    rows = [
        Check(
            name="torch",
            status=OK if version >= MIN_TORCH else FAIL,
            detail=f"{version} at {where}"
            + ("" if version >= MIN_TORCH else f"; hardening needs torch >= {MIN_TORCH}"),
        )
    ]

    import torch.distributed as dist

    if not dist.is_available():
        rows.append(Check(name="torch.distributed", status=FAIL, detail="this torch build has no torch.distributed"))
        return rows
    rows.append(Check(name="torch.distributed", status=OK, detail="available"))
    gloo = dist.is_gloo_available()
    rows.append(
        Check(
            name="gloo",
            status=OK if gloo else FAIL,
            detail="available (cpu profile backend)" if gloo else "not built in: the default cpu profile cannot run",
        )
    )

    nccl = dist.is_nccl_available()
    cuda = torch.cuda.is_available()
    if cuda and nccl:
        n = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
        rows.append(Check(name="nccl / cuda", status=OK, detail=f"{n} device(s): {', '.join(names)}"))
    else:
        missing = [what for what, have in (("nccl", nccl), ("CUDA device", cuda)) if not have]
        rows.append(
            Check(
                name="nccl / cuda",
                status=WARN,
                detail=f"no {' and no '.join(missing)}: GPU profile h200 unavailable",
            )
        )

    try:
        importlib.import_module("torch.distributed._functional_collectives")
        rows.append(Check(name="functional collectives", status=OK, detail="torch.distributed._functional_collectives"))
    except Exception as e:
        # Compiled TP regions issue their collectives through this module; without it
        # there is nothing traceable to harden.
        rows.append(Check(name="functional collectives", status=FAIL, detail=f"import failed: {e}"))

    for dotted, use, fallback in _DYNAMO_APIS:
        try:
            present = _resolve(dotted)
        except Exception:  # importing torch._dynamo can fail on exotic builds
            present = False
        rows.append(
            Check(
                name=dotted.replace("torch._dynamo.", "dynamo ").replace("torch.compiler.", "compiler "),
                status=OK if present else WARN,
                detail=f"present ({use})" if present else f"missing: {use} {fallback}",
            )
        )
    return rows


def _compiler() -> Check:
    # Inductor's CPU backend compiles generated C++; CUDA kernels go through Triton instead.
    for name in ("cc", "gcc", "g++", "clang"):
        path = shutil.which(name)
        if path:
            return Check(name="C/C++ compiler", status=OK, detail=f"{name} at {path} (inductor on CPU)")
    return Check(name="C/C++ compiler", status=WARN, detail="none found: compile.backend inductor unavailable on CPU")


def _py_spy() -> list[Check]:
    path = find_py_spy()
    if path is None:
        detail = "not found (pip install py-spy): hang triage will have no stacks"
        return [Check(name="py-spy", status=WARN, detail=detail)]
    try:
        done = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=5, stdin=subprocess.DEVNULL
        )
        version = (done.stdout.strip() or done.stderr.strip()).removeprefix("py-spy ").strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return [Check(name="py-spy", status=WARN, detail=f"{path} does not run ({e}): hang triage will have no stacks")]
    rows = []
    old = _older_than(version, (0, 4))
    if sys.version_info >= (3, 12) and old:
        # py-spy < 0.4 cannot find the interpreter state of CPython 3.12+ (sglang#33549).
        rows.append(
            Check(
                name="py-spy",
                status=WARN,
                detail=f"{version} at {path} is too old for Python {platform.python_version()}: "
                "hang triage will have no stacks (pip install -U py-spy)",
            )
        )
    else:
        rows.append(Check(name="py-spy", status=OK, detail=f"{version} at {path}"))
    problem = ptrace_problem()
    rows.append(
        Check(
            name="ptrace",
            status=OK if problem is None else WARN,
            detail="py-spy can attach" if problem is None else f"{problem}: hang triage will have no stacks",
        )
    )
    return rows


def _older_than(version: str, floor: tuple[int, ...]) -> bool:
    nums = []
    for part in version.split(".")[: len(floor)]:
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            return False  # unparseable: do not cry wolf
        nums.append(int(digits))
    return tuple(nums) < floor


def _depyf() -> Check:
    """depyf writes the decompiled dump of a failing compile case (a dependency, so only
    a broken or hand-trimmed install lacks it; the gates never need it)."""
    try:
        depyf = importlib.import_module("depyf")
    except Exception as exc:  # an install broken in any way is "missing" here
        return Check(
            name="depyf",
            status=WARN,
            detail=f"missing ({type(exc).__name__}; pip install 'depyf>=0.18'): failing compile cases "
            "get no decompiled bytecode in their depyf dump (FX graphs are still written)",
        )
    return Check(name="depyf", status=OK, detail=f"{getattr(depyf, '__version__', '?')} at {os.path.dirname(depyf.__file__)}")


def _tlparse() -> Check:
    """tlparse renders the ranks' compile traces as one HTML report (an optional extra:
    a binary; without it the traces are still kept). Found on PATH, never run here."""
    path = shutil.which("tlparse")
    if path is None:
        return Check(
            name="tlparse",
            status=OK,
            detail="missing (optional, pip install 'hardening[tlparse]'): failing compile cases keep their "
            "TORCH_TRACE directories but get no all-ranks HTML",
        )
    return Check(name="tlparse", status=OK, detail=f"at {path}")


def run_doctor() -> tuple[bool, str]:
    """``(ok, report)``: ok is False only when a FAIL row exists."""
    checks = [_python(), *_torch_checks(), _compiler(), *_py_spy(), _depyf(), _tlparse()]
    ok = not any(c.status == FAIL for c in checks)
    table = tabulate(
        [[c.name, c.status, c.detail] for c in checks],
        headers=["check", "status", "detail"],
        tablefmt="simple",
        disable_numparse=True,
    )
    warns = sum(c.status == WARN for c in checks)
    fails = sum(c.status == FAIL for c in checks)
    verdict = "doctor: ok" if ok else f"doctor: FAIL ({fails} failed check(s))"
    if warns:
        verdict += f", {warns} warning(s)"
    return ok, f"{table}\n\n{verdict}"
