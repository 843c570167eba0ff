"""Hang triage against real wedged Python processes: py-spy stacks, the one-line summary
of where each process is, and the side-by-side table.

Children are started from ``sys.executable`` itself, never a ``python`` shim on $PATH, so
the pid the test holds is the interpreter py-spy must read. Every child sleeps for a
bounded time and is killed in ``finally``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

import hardening
from hardening.harness.triage import StackDump, dump_all, dump_stack, ptrace_problem, side_by_side, summarize_frames

_PROBLEM = ptrace_problem()
live = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")

_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    def wedged_in_here(ready):
        Path(ready).write_text("ready")
        time.sleep(120)  # bounded: an orphaned child still goes away on its own

    def caller_of_wedge(ready):
        wedged_in_here(ready)

    caller_of_wedge(sys.argv[1])
    """
)


@contextmanager
def wedged_child(tmp_path: Path, name: str):
    """A real Python process sleeping inside ``wedged_in_here``; yields its Popen."""
    script = tmp_path / "wedged_child.py"
    script.write_text(_CHILD)
    ready = tmp_path / f"{name}.ready"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ready)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.poll() is not None:
                raise AssertionError(f"wedged child exited early with {proc.returncode}")
            if time.monotonic() > deadline:
                raise AssertionError("wedged child never reached wedged_in_here")
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _state(pid: int) -> str:
    return re.search(r"^State:\s+(\S)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1)


@live
def test_dump_stack_names_the_wedged_function_and_saves_it(tmp_path):
    with wedged_child(tmp_path, "one") as child:
        out = tmp_path / "stacks" / "deep" / "rank_0.stacks.txt"
        d = dump_stack(child.pid, label="rank 0", timeout=30, out_path=str(out))

        assert d.ok, d.text
        assert d.pid == child.pid and d.label == "rank 0"
        assert d.where.startswith("wedged_in_here (")
        assert "caller_of_wedge" in d.where
        assert d.innermost.startswith("wedged_in_here (")
        assert d.path == str(out) and out.read_text() == d.text
        assert "Thread" in d.text  # thread names are absent when py-spy reads a venv interpreter
        assert d.seconds > 0
        # py-spy paused the child to read it and let it go again.
        assert _state(child.pid) in ("S", "R")


@live
def test_dump_all_dumps_every_child(tmp_path):
    with ExitStack() as stack:
        a = stack.enter_context(wedged_child(tmp_path, "a"))
        b = stack.enter_context(wedged_child(tmp_path, "b"))
        out_dir = tmp_path / "run" / "stacks"
        dumps = dump_all({"rank 0": a.pid, "rank 1": b.pid}, out_dir=str(out_dir), native=False, timeout=30)

        assert set(dumps) == {"rank 0", "rank 1"}
        for label, pid in (("rank 0", a.pid), ("rank 1", b.pid)):
            d = dumps[label]
            assert d.ok, d.text
            assert d.pid == pid
            assert "wedged_in_here" in d.where
            assert d.path == str(out_dir / f"{label.replace(' ', '_')}.stacks.txt")
            assert Path(d.path).is_file()

        table = side_by_side(dumps)
        assert "rank 0" in table and "rank 1" in table
        assert str(a.pid) in table and str(b.pid) in table
        assert "wedged_in_here" in table


@live
def test_same_pid_under_two_labels_is_dumped_once(tmp_path):
    # Two py-spys on one process would fight over ptrace (only one tracer allowed).
    with wedged_child(tmp_path, "shared") as child:
        dumps = dump_all({"rank 0": child.pid, "pid": child.pid}, out_dir=str(tmp_path), native=False, timeout=30)
        assert all(d.ok for d in dumps.values()), [d.text for d in dumps.values()]
        assert (tmp_path / "rank_0.stacks.txt").is_file() and (tmp_path / "pid.stacks.txt").is_file()


@live
def test_native_dump_reaches_the_c_frame(tmp_path):
    with wedged_child(tmp_path, "native") as child:
        d = dump_stack(child.pid, label="rank 0", native=True, timeout=30)
        assert d.ok, d.text
        assert "wedged_in_here" in d.where
        # time.sleep's C frames (clock_nanosleep, ...) sit inside the Python frame.
        assert not d.innermost.startswith("wedged_in_here")


@live
def test_stopped_process_is_read_and_reported_as_stopped(tmp_path):
    """H-01: a SIGSTOPped rank is read without ptrace-suspending it, and marked frozen."""
    with wedged_child(tmp_path, "stopped") as child:
        os.kill(child.pid, signal.SIGSTOP)
        try:
            deadline = time.time() + 10
            while _state(child.pid) != "T" and time.time() < deadline:  # the stop lands asynchronously
                time.sleep(0.01)
            d = dump_stack(child.pid, label="rank 1", timeout=30)
            assert _state(child.pid) == "T"  # still frozen: reading it did not resume it
        finally:
            os.kill(child.pid, signal.SIGCONT)
        assert d.ok, d.text
        assert d.text.startswith(f"process {child.pid} is stopped")
        assert d.where.startswith("wedged_in_here (")


@live
def test_timeout_kills_py_spy_and_leaves_the_target_running(tmp_path):
    with wedged_child(tmp_path, "slow") as child:
        d = dump_stack(child.pid, label="rank 0", timeout=0.001, out_path=str(tmp_path / "t.txt"))
        assert not d.ok
        assert d.text == "py-spy timed out after 0.001s"
        assert (tmp_path / "t.txt").read_text().strip() == d.text
        assert _state(child.pid) in ("S", "R")
        assert dump_stack(child.pid, label="rank 0", timeout=30).ok


def test_dead_pid_is_a_failed_dump_not_an_exception(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    out = tmp_path / "dead.stacks.txt"
    d = dump_stack(proc.pid, label="rank 3", timeout=10, out_path=str(out))
    assert isinstance(d, StackDump)
    assert not d.ok
    assert d.where == "" and d.innermost == ""
    assert "not running" in d.text
    assert out.is_file()
    table = side_by_side({"rank 3": d})
    assert "rank 3" in table and "error: process" in table


# A py-spy dump of a TP rank blocked in a functional collective, as py-spy prints it by
# default (package-relative names). The heartbeat thread comes first on purpose: the
# summary must read the MainThread, not the first thread.
_SHORT_SAMPLE = """\
Process 4242: /usr/bin/python3.11 -m hardening.harness.worker --rank 1
Python v3.11.7 (/usr/bin/python3.11)

Thread 4301 (idle): "Thread-1 (beat)"
    wait (threading.py:331)
    beat (hardening/heartbeat.py:40)
    run (threading.py:982)
Thread 4242 (active+gil): "MainThread"
    __call__ (torch/_ops.py:1243)
    wait_tensor (torch/distributed/_functional_collectives.py:144)
    all_reduce (torch/distributed/_functional_collectives.py:201)
    forward (examples/tp_region.py:31)
    _call_impl (torch/nn/modules/module.py:1784)
    _wrapped_call_impl (torch/nn/modules/module.py:1773)
    step (hardening/worker.py:212)
    main (hardening/worker.py:340)
    <module> (hardening/__main__.py:5)
    _run_code (runpy.py:88)
    _run_module_as_main (runpy.py:198)
"""


def test_summarize_frames_picks_user_frame_for_where_and_torch_frame_for_innermost():
    where, innermost = summarize_frames(_SHORT_SAMPLE)
    assert innermost == "__call__ (torch/_ops.py:1243)"
    assert where == (
        "forward (examples/tp_region.py:31) <- step (hardening/worker.py:212) <- main (hardening/worker.py:340)"
    )


def test_summarize_frames_with_full_filenames_and_native_frames():
    # What dump_stack actually asks py-spy for: --full-filenames (and here --native).
    site = sysconfig.get_paths()["purelib"]
    stdlib = sysconfig.get_paths()["stdlib"]
    own = Path(hardening.__file__).resolve().parent
    text = textwrap.dedent(
        f"""\
        Thread 77 (idle): "MainThread"
            __pthread_cond_wait (libc.so.6)
            c10d::ProcessGroupGloo::AsyncWork::wait (/x/torch/lib/libtorch_cpu.so)
            wait_tensor ({site}/torch/distributed/_functional_collectives.py:144)
            all_reduce ({site}/torch/distributed/_functional_collectives.py:201)
            sleep_forever ({os.getcwd()}/examples/hang_region.py:12)
            forward ({os.getcwd()}/examples/hang_region.py:20)
            inner (<eval_with_key>.3:7)
            run_case ({own}/worker.py:99)
            _run_code ({stdlib}/runpy.py:88)
        """
    )
    where, innermost = summarize_frames(text)
    assert innermost == "__pthread_cond_wait (libc.so.6)"
    # torch frames, the native frames and torch.fx's generated <eval_with_key> code are
    # skipped; hardening's own frame counts (its display path depends on the cwd).
    head, _, last = where.rpartition(" <- ")
    assert head == "sleep_forever (examples/hang_region.py:12) <- forward (examples/hang_region.py:20)"
    assert last.startswith("run_case (") and last.endswith("worker.py:99)")


def test_summarize_frames_falls_back_to_first_thread_and_handles_empty_text():
    text = 'Thread 9 (idle): "worker"\n    spin (app/loop.py:3)\n    run (threading.py:982)\n'
    assert summarize_frames(text) == ("spin (app/loop.py:3)", "spin (app/loop.py:3)")
    assert summarize_frames("") == ("", "")
    assert summarize_frames("Error: Failed to find python version from target process") == ("", "")


def test_side_by_side_lists_every_label_in_rank_order():
    where, innermost = summarize_frames(_SHORT_SAMPLE)
    dumps = {
        f"rank {r}": StackDump(
            label=f"rank {r}", pid=100 + r, ok=True, text=_SHORT_SAMPLE, where=where, innermost=innermost,
            path=f"/run/stacks/rank_{r}.stacks.txt", seconds=0.1,
        )
        for r in (10, 2)
    }
    dumps["rank 1"] = StackDump(
        label="rank 1", pid=101, ok=False, where="", innermost="", path=None, seconds=0.0,
        text=(
            "Error: Failed to get stack traces\n\nCaused by:\n"
            "    0: Failed to suspend process\n    1: EPERM: Operation not permitted\n"
        ),
    )
    table = side_by_side(dumps)
    assert table.index("rank 1 ") < table.index("rank 2 ") < table.index("rank 10")
    assert "forward (examples/tp_region.py:31)" in table
    assert "/run/stacks/rank_2.stacks.txt" in table
    assert "error: Failed to get stack traces: EPERM: Operation not permitted" in table
