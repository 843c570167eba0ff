"""The safety promises on real runs: nothing listens beyond loopback, files in the
user's directory never run in place of real modules, and a rank that did no work is
never a completion. (The README's "Safety" section states them.)"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cli_harness import hardening_command, left_behind, marked_processes, new_marker

pytestmark = [pytest.mark.multiproc]

SHADOWS = ("numpy", "yaml", "sympy", "tabulate", "filelock", "jinja2", "typing_extensions")


def _run(cwd: Path, *args: str, marker: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CORPUS_MARKER=marker)
    out = subprocess.run([*hardening_command(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    print(out.stdout)
    print(out.stderr)
    return out


def _listening(pids: list[int]) -> set[tuple[str, int]]:
    """(local address, port) of every TCP socket in LISTEN state owned by ``pids``."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
        except OSError:
            continue
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                addr, port = local.split(":")
                found.add((_addr(addr, width), int(port, 16)))
    return found


def _addr(hex_addr: str, width: int) -> str:
    raw = bytes.fromhex(hex_addr)
    if width == 8:
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
    return ":".join(b.hex() for b in words)


@pytest.mark.timeout(240)
def test_nothing_listens_beyond_loopback_during_a_run(tmp_path: Path) -> None:
    (tmp_path / "long.yaml").write_text("steps: 100000\ntimeouts: {case: 60}\n")
    marker = new_marker()
    seen: set[tuple[str, int]] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update(_listening(marked_processes(marker)))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    proc = subprocess.Popen(
        [*hardening_command(), "suite", "compile", "--only", "C-00", "--profile", "long.yaml"],
        cwd=tmp_path, env=dict(os.environ, CORPUS_MARKER=marker), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    watcher.start()
    try:
        end = time.time() + 90
        while time.time() < end and len({p for a, p in seen}) < 3:  # the store and each rank's gloo
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
        stop.set()
        watcher.join(timeout=5)
    assert proc.returncode == 2
    assert len(seen) >= 3, seen
    assert {addr for addr, _ in seen} == {"127.0.0.1"}, seen
    assert not left_behind(marker)


@pytest.mark.timeout(240)
def test_files_in_the_cwd_never_run_in_place_of_modules_but_a_module_target_there_does(tmp_path: Path) -> None:
    for name in SHADOWS:
        (tmp_path / f"{name}.py").write_text(f"open({str(tmp_path / ('RAN_' + name))!r}, 'w').close()\n")
    (tmp_path / "my_region.py").write_text("from hardening.harness.reference import build\n")
    marker = new_marker()
    out = _run(tmp_path, "suite", "compile", "--only", "C-00", "--target", "my_region:build", "--json", "r.json", marker=marker)
    assert out.returncode == 0
    ran = sorted(p.name for p in tmp_path.glob("RAN_*"))
    assert ran == [], f"files in the cwd ran inside the harness: {ran}"
    case = json.loads((tmp_path / "r.json").read_text())["cases"][0]
    assert (case["outcome"], case["verdict"]) == ("completed", "pass")
    assert not left_behind(marker)


@pytest.mark.timeout(240)
def test_a_control_whose_ranks_exit_0_without_working_fails(tmp_path: Path) -> None:
    (tmp_path / "quitter.py").write_text("import os\n\ndef build(ctx):\n    os._exit(0)\n")
    marker = new_marker()
    out = _run(tmp_path, "suite", "compile", "--only", "C-00", "--target", "quitter:build", "--json", "r.json", marker=marker)
    assert out.returncode == 1
    case = json.loads((tmp_path / "r.json").read_text())["cases"][0]
    assert (case["outcome"], case["verdict"]) == ("crashed", "fail")
    for rank in case["ranks"]:
        assert rank["exit_code"] == 0 and rank["error_class"] == "no_final_record" and rank["phase"] == "build"
    assert "no_final_record" in out.stdout
    assert not left_behind(marker)


@pytest.mark.timeout(240)
def test_a_target_that_daemonizes_a_child_at_import_leaves_nothing_behind(tmp_path: Path) -> None:
    # setsid + a parent that goes away: the runner's session kill cannot reach it, so the
    # fork server adopts it (child subreaper) and ends it with the suite.
    (tmp_path / "forker.py").write_text(
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(300)\n"
        "    os._exit(0)\n"
        "from hardening.harness.reference import build\n"
    )
    marker = new_marker()
    out = _run(tmp_path, "suite", "compile", "--only", "C-00", "--target", "forker.py:build", marker=marker)
    assert out.returncode == 0
    assert not left_behind(marker), "a daemonized child outlived the run"
