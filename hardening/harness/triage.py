"""Hang triage: where is every live rank right now?

This file owns the stack dump of a wedged process and its summary. The runner calls
:func:`dump_all` at a case's deadline, *before* it terminates anything, and
``hardening triage PID...`` calls it on a hung production job. Every live process is
dumped with ``py-spy dump`` in parallel, the raw stacks are saved per rank, and
:func:`side_by_side` shows in one table which frame of user or hardening code each rank
is stuck in and which frame (usually a collective inside torch) it is blocked on.

py-spy is used rather than ``faulthandler`` because it reads the stacks from outside:
it works when the rank's main thread holds the GIL inside a C call, which is exactly the
hang a faulthandler listener thread can never report.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from tabulate import tabulate

from hardening.harness.liveness import proc_state

__all__ = [
    "StackDump",
    "dump_all",
    "dump_stack",
    "find_py_spy",
    "ptrace_problem",
    "side_by_side",
    "summarize_frames",
]


@dataclass(kw_only=True, slots=True)
class StackDump:
    """The stacks of one process, or why they could not be read."""

    label: str
    """Who the process is to the reader: ``"rank 1"``, ``"pid 1234"``."""

    pid: int
    """The process that was dumped (a shell wrapper's Python child when one was resolved)."""

    ok: bool
    """True when py-spy produced stacks."""

    text: str
    """py-spy's output, or the error text when not ok."""

    where: str
    """Innermost frame in user or hardening code plus up to two such callers, joined by
    ``" <- "``; ``""`` when unknown."""

    innermost: str
    """Innermost frame of the thread overall (often a torch collective or a C call)."""

    path: str | None
    """Where ``text`` was saved, or None when it was not."""

    seconds: float
    """Wall time the dump took."""


# --------------------------------------------------------------------------- py-spy

_CAP_SYS_PTRACE = 19  # bit in /proc/<pid>/status CapEff (linux/capability.h)


def find_py_spy() -> str | None:
    """Path of the py-spy executable, or None.

    The binary installed next to this interpreter wins over ``$PATH``: it is the one pip
    installed with hardening, and a pyenv/asdf shim on ``$PATH`` is a shell script that
    re-resolves the version on every call (slower, and possibly another py-spy).
    """
    beside = Path(sys.executable).parent / ("py-spy.exe" if os.name == "nt" else "py-spy")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def _ptrace_scope() -> int | None:
    """Yama's kernel.yama.ptrace_scope, or None when Yama is not in this kernel."""
    try:
        return int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip())
    except (OSError, ValueError):
        return None


def _has_cap_sys_ptrace() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_PTRACE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def ptrace_problem() -> str | None:
    """None if py-spy can attach to this user's processes from here, else why not.

    Cheap (reads /proc, spawns nothing), so the runner can decide before a deadline
    whether stacks are possible. What it cannot see: a seccomp profile that blocks the
    ptrace syscall itself (old Docker); such a dump still fails, with py-spy's reason.
    """
    if find_py_spy() is None:
        return "py-spy not found (pip install py-spy)"
    if not sys.platform.startswith("linux"):
        return None  # macOS needs root; py-spy says so itself, nothing cheap to check here
    scope = _ptrace_scope()
    if scope == 3:
        return "ptrace is disabled for everyone (kernel.yama.ptrace_scope=3; needs a reboot to lower)"
    if scope in (1, 2) and not _has_cap_sys_ptrace():
        # Scope 1 only lets a process trace its own descendants, and py-spy is a sibling
        # of the ranks, not their parent, so it needs CAP_SYS_PTRACE exactly like scope 2.
        # Being root is not enough: Docker drops SYS_PTRACE from root by default.
        fix = "run as root with CAP_SYS_PTRACE (docker run --cap-add SYS_PTRACE)"
        if scope == 1:
            fix += " or set kernel.yama.ptrace_scope=0"
        return f"py-spy cannot attach: kernel.yama.ptrace_scope={scope} and no CAP_SYS_PTRACE; {fix}"
    return None


_SHELLS = frozenset(
    {"sh", "bash", "dash", "zsh", "ksh", "env", "timeout", "nohup", "setsid", "stdbuf", "numactl", "taskset"}
)


def _exe_name(pid: int) -> str | None:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            kids += [int(k) for k in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except (OSError, ValueError):
        pass
    return kids


def _python_behind(pid: int) -> int:
    """The Python process a shell wrapper stands for, or ``pid`` itself.

    ``hardening triage`` is often handed the pid a launcher shows, which can be a shell
    (``bash -c "python ..."``, a pyenv shim that did not exec, ``timeout python ...``).
    py-spy only reads Python processes, so follow wrappers down to their first Python
    descendant. Anything that is not a known wrapper is dumped as given: an embedded
    interpreter need not be called ``python``.
    """
    frontier, seen = [pid], set()
    for _ in range(4):  # wrappers nest a few levels at most
        nxt: list[int] = []
        for p in frontier:
            if p in seen:
                continue
            seen.add(p)
            name = _exe_name(p)
            if name is not None and name.startswith("python"):
                return p
            if name in _SHELLS:
                nxt += _children(p)
        frontier = nxt
    return pid


def _not_running(pid: int) -> str | None:
    """Why ``pid`` cannot be dumped before py-spy is even tried, or None."""
    if not sys.platform.startswith("linux"):
        return None
    state = proc_state(pid)
    if state is None:
        return f"process {pid} is not running"
    if state in ("Z", "X"):
        return f"process {pid} has exited (zombie, not yet reaped)"
    return None


def _tracer_of(pid: int) -> int:
    try:
        m = re.search(r"^TracerPid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    except OSError:
        return 0
    return int(m.group(1)) if m else 0


def _clean_error(output: str, pid: int) -> str:
    """py-spy's error without the Rust backtrace, plus a hint for the known causes."""
    text = output.split("\nStack backtrace:")[0].strip() or "py-spy failed without output"
    low = text.lower()
    tracer = _tracer_of(pid)
    if proc_state(pid) == "T":
        # py-spy cannot read a job-control-stopped process at all ("Failed to find python
        # version"). That is itself the diagnosis: the rank is frozen, not blocked.
        text = f"process {pid} is stopped (SIGSTOP/SIGTSTP): py-spy cannot read a stopped process\n" + text
    elif tracer:
        # A process has at most one tracer: a debugger (or another py-spy) got there first.
        text = f"process {pid} is already being traced by pid {tracer}\n" + text
    elif "permission denied" in low or "operation not permitted" in low:
        text += (
            "\nhint: py-spy needs ptrace: run as root with CAP_SYS_PTRACE "
            "(docker run --cap-add SYS_PTRACE) or set kernel.yama.ptrace_scope=0"
        )
    elif "python version" in low or "interpreter" in low or "symbol" in low:
        # An old py-spy cannot find the interpreter state of a newer CPython (sglang#33549).
        text += (
            "\nhint: is this a Python process? If so, py-spy may be too old for its Python:"
            " pip install -U py-spy"
        )
    return text


def _run_py_spy(cmd: list[str], timeout: float) -> tuple[int | None, str, str]:
    """(returncode or None on timeout, stdout, stderr); the child is always reaped."""
    env = dict(os.environ, RUST_BACKTRACE="0", RUST_LIB_BACKTRACE="0")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        return None, "", ""
    finally:
        # Killing py-spy mid-read is safe for the target: the kernel detaches a dead
        # tracer and resumes the process it had paused.
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def dump_stack(
    pid: int, *, label: str, native: bool = False, timeout: float = 15.0, out_path: str | None = None
) -> StackDump:
    """py-spy stacks of one live process. Never raises: a failure is ``ok=False`` with its reason."""
    start = time.monotonic()
    target = _python_behind(pid)
    ok, text = False, ""
    reason = _not_running(target)
    py_spy = find_py_spy()
    if reason is not None:
        text = reason
    elif py_spy is None:
        text = "py-spy not found (pip install py-spy)"
    else:
        # Full filenames let summarize_frames tell torch and the stdlib from user code by
        # path; it shortens them again for display.
        cmd = [py_spy, "dump", "--pid", str(target), "--full-filenames"] + (["--native"] if native else [])
        stopped = proc_state(target) == "T"
        if stopped and not native:
            # A stopped process is already still: read it without ptrace-suspending it,
            # which fails on a job-control stop ("unexpected waitpid result").
            cmd.append("--nonblocking")
        try:
            rc, out, err = _run_py_spy(cmd, timeout)
            if rc not in (0, None) and "--full-filenames" in err:  # a py-spy older than the flag
                cmd.remove("--full-filenames")
                rc, out, err = _run_py_spy(cmd, max(0.1, timeout - (time.monotonic() - start)))
        except OSError as e:
            rc, out, err = 1, "", f"could not run {py_spy}: {e}"
        if rc is None:
            text = f"py-spy timed out after {timeout:g}s"
        elif rc == 0:
            ok, text = True, out
            if stopped:
                text = f"process {target} is stopped (SIGSTOP/SIGTSTP): frozen, not blocked\n" + text
        else:
            # The reason first; py-spy's partial stdout (the process header) after it.
            text = _not_running(target) or _clean_error(err or out, target)
            if out.strip() and out.strip() not in text:
                text += "\n\n" + out.strip()
    if target != pid:
        text = f"(pid {pid} is a wrapper; dumped its Python process {target})\n" + text
    where, innermost = summarize_frames(text) if ok else ("", "")
    path = None
    if out_path is not None:
        try:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(text if text.endswith("\n") else text + "\n")
            path = out_path
        except OSError as e:
            text += f"\n(could not save to {out_path}: {e})"
    return StackDump(
        label=label,
        pid=target,
        ok=ok,
        text=text,
        where=where,
        innermost=innermost,
        path=path,
        seconds=round(time.monotonic() - start, 3),
    )


def dump_all(
    targets: dict[str, int], *, out_dir: str | None, native: bool, timeout: float
) -> dict[str, StackDump]:
    """Dump every ``label -> pid`` at once; the wall time is about the slowest single dump.

    Parallel on purpose: dumped one after another, the first ranks' stacks would be
    seconds older than the last ones' and a peer's watchdog could kill a rank mid-triage.
    """
    if not targets:
        return {}

    def path_for(label: str) -> str | None:
        if out_dir is None:
            return None
        return os.path.join(out_dir, label.replace(" ", "_").replace(os.sep, "_") + ".stacks.txt")

    # One py-spy per process: a process has at most one ptrace tracer, so a second
    # py-spy on the same pid (two labels for one process) would fail with EPERM.
    first_label: dict[int, str] = {}
    for label, pid in targets.items():
        first_label.setdefault(pid, label)
    with ThreadPoolExecutor(max_workers=len(first_label), thread_name_prefix="py-spy") as pool:
        futures = {
            pid: pool.submit(dump_stack, pid, label=label, native=native, timeout=timeout, out_path=path_for(label))
            for pid, label in first_label.items()
        }
        done = {pid: fut.result() for pid, fut in futures.items()}

    dumps: dict[str, StackDump] = {}
    for label, pid in targets.items():
        d = done[pid]
        if label != first_label[pid]:
            path = path_for(label) if d.path is not None else None
            if path is not None:
                try:
                    shutil.copyfile(d.path, path)
                except OSError:
                    path = d.path  # same stacks; point at the file that does exist
            d = replace(d, label=label, path=path)
        dumps[label] = d
    return dumps


# --------------------------------------------------------------------------- summary

_THREAD_RE = re.compile(r'^Thread\s+(\S+)\s+\(([^)]*)\)(?::\s+"(.*)")?\s*$')
_FRAME_RE = re.compile(r"^ {4}(?P<func>\S.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)\s*$")

# Code that is never where a hang *is*, only where it waits: torch's own frames (and
# the compilers it generates code with) and the standard library.
_LIBRARY_PACKAGES = ("torch", "triton", "functorch")
_STDLIB_RE = re.compile(r"/lib(?:64)?/python\d\.\d+/(?!(?:site|dist)-packages/)")
_SITE_RE = re.compile(r"/(?:site|dist)-packages/")


@dataclass(slots=True)
class _Frame:
    func: str
    file: str
    line: str | None

    def show(self) -> str:
        if self.line is None:  # a native frame: "clock_nanosleep (libc.so.6)"
            return f"{self.func} ({os.path.basename(self.file)})"
        return f"{self.func} ({_short(self.file)}:{self.line})"


@lru_cache(maxsize=1)
def _roots() -> tuple[str, tuple[str, ...], str]:
    """(hardening's dir, library package dirs, this interpreter's stdlib dir)."""
    hardening_dir = str(Path(__file__).resolve().parent.parent)  # the package: runtime frames are ours too
    libs = []
    for name in _LIBRARY_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)  # finds, does not import
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            libs += [os.path.realpath(p) for p in spec.submodule_search_locations]
    stdlib = sysconfig.get_paths(vars={"installed_base": sys.base_prefix, "base": sys.base_prefix})["stdlib"]
    return hardening_dir, tuple(libs), os.path.realpath(stdlib)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _short(file: str) -> str:
    """A readable name for a frame's file: relative to the cwd, else from the package down."""
    if not os.path.isabs(file):
        return file
    m = _SITE_RE.search(file)
    if m:
        return file[m.end():]
    cwd = os.getcwd()
    if _under(file, cwd):
        return os.path.relpath(file, cwd)
    stdlib = _roots()[2]
    if _under(file, stdlib):
        return os.path.relpath(file, stdlib)
    m = _STDLIB_RE.search(file)
    if m:
        return file[m.end():]
    # py-spy's own rule: keep the directories that are packages (hold an __init__.py).
    top = Path(file).parent
    while (top / "__init__.py").exists() and top.parent != top:
        top = top.parent
    return os.path.relpath(file, top)


def _interesting(frame: _Frame) -> bool:
    """Is this frame user or hardening code (where a hang is), not torch or the stdlib?"""
    if frame.line is None:
        return False  # native frame from --native
    f = frame.file.replace("\\", "/")
    hardening_dir, libs, stdlib = _roots()
    if f.startswith("<"):
        # <frozen importlib._bootstrap> is the stdlib, <eval_with_key>.N is torch.fx
        # generated code; <string>/<stdin> is whatever the user ran with -c.
        return not (f.startswith("<frozen") or f.startswith("<eval_with_key>"))
    if os.path.isabs(f):
        # hardening's own frames (this checkout, or another one the target runs from).
        if _under(f, hardening_dir) or ("/hardening/" in f and "/torch/" not in f):
            return True
        if "/torchinductor_" in f:  # inductor's generated kernels in its cache dir
            return False
        if any(_under(f, lib) for lib in libs):
            return False
        m = _SITE_RE.search(f)
        if m:
            return f[m.end():].split("/", 1)[0] not in _LIBRARY_PACKAGES
        return not (_under(f, stdlib) or _STDLIB_RE.search(f))
    # A short name as py-spy prints it without --full-filenames: package-relative.
    head = f.split("/", 1)[0]
    if head == "hardening":
        return True
    if head in _LIBRARY_PACKAGES:
        return False
    return not os.path.exists(os.path.join(stdlib, f))  # threading.py, selectors.py, ...


def _threads(text: str) -> list[tuple[str, list[_Frame]]]:
    threads: list[tuple[str, list[_Frame]]] = []
    for raw in text.splitlines():
        line = raw.rstrip("\n")
        m = _THREAD_RE.match(line)
        if m:
            threads.append((m.group(3) or "", []))
            continue
        if threads:
            fm = _FRAME_RE.match(line)
            if fm:  # deeper-indented --locals lines do not match the 4-space frame form
                threads[-1][1].append(_Frame(fm.group("func"), fm.group("file"), fm.group("line")))
    return threads


def summarize_frames(text: str) -> tuple[str, str]:
    """``(where, innermost)`` of the MainThread in a py-spy dump (else of the first thread).

    ``where`` is the innermost frame in user or hardening code with up to two more such
    callers, ``"f (a.py:3) <- g (b.py:9)"``: the line to read first. ``innermost`` is
    the innermost frame overall, usually what the rank is blocked on (a collective's
    wait, a sleep, a lock). Both are ``""`` when the text has no frames.
    """
    threads = [t for t in _threads(text) if t[1]]
    if not threads:
        return "", ""
    frames = next((fr for name, fr in threads if name == "MainThread"), threads[0][1])
    chain = [f.show() for f in frames if _interesting(f)][:3]
    return " <- ".join(chain), frames[0].show()


def _natural(label: str) -> list[object]:
    """Sort key so that "rank 10" follows "rank 9"."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", label)]


def _one_line_error(text: str) -> str:
    """``"Failed to get stack traces: EPERM: Operation not permitted"`` from py-spy's error."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("(pid ")]
    if not lines:
        return "unknown error"
    first = lines[0].removeprefix("Error: ")
    if len(lines) > 1 and lines[1] == "Caused by:":
        causes = [ln for ln in lines[2:] if re.match(r"\d+: ", ln)]
        if causes:
            first += ": " + causes[-1].split(": ", 1)[1]
    return first


def side_by_side(dumps: dict[str, StackDump], runtime: dict[str, str] | None = None) -> str:
    """One row per process: where it is, what it waits on, and where its stacks are.

    ``runtime`` is each process's own last word on what it was doing (the collective and
    the user's line it was issued from, what it issued last): py-spy only sees a compiled
    graph's ``def`` line, so that column comes first when there is one."""
    runtime = runtime or {}
    rows = []
    for label in sorted(dumps, key=_natural):
        d = dumps[label]
        if d.ok:
            row = [label, d.pid, d.where or "(no user frame)", d.innermost or "-", d.path or "-"]
        else:
            err = _one_line_error(d.text)
            err = err if len(err) <= 100 else err[:97] + "..."
            row = [label, d.pid, "-", "-", f"error: {err}"]
        rows.append(row[:2] + [runtime.get(label, "-")] + row[2:] if runtime else row)
    headers = ["label", "pid", "where", "innermost", "stacks"]
    if runtime:
        headers.insert(2, "runtime says")
    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)
