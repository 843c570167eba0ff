"""The fork server's rank child: what a forked rank inherits must match a fresh interpreter
where it matters. (The server's protocol is exercised end to end by test_runner.py.)"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

import hardening.harness.worker
from hardening.harness import forkserver


@pytest.mark.timeout(30)
def test_forked_rank_ignores_sigpipe_and_restores_termination_signals(tmp_path: Path, monkeypatch) -> None:
    # A rank that writes to a dead peer's socket must get EPIPE (an error the terminator
    # attributes to that peer), not die of SIGPIPE: Python ignores SIGPIPE at startup, and
    # a forked rank must too. The rank entry point is replaced by a probe that records
    # the dispositions _child left in place.
    out = tmp_path / "dispositions.json"

    def probe(spec: hardening.harness.worker.RankSpec) -> None:
        seen = {name: str(signal.getsignal(getattr(signal, name))) for name in ("SIGPIPE", "SIGTERM", "SIGCHLD")}
        out.write_text(json.dumps({"signals": seen, "rank": spec.rank}))
        os._exit(0)

    monkeypatch.setattr(hardening.harness.worker, "run_rank", probe)
    previous = signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # what the server must not pass on
    try:
        pid = os.fork()
        if pid == 0:
            spec = dict(rank=3, world_size=4, store_host="127.0.0.1", store_port=1, store_prefix="t/",
                        profile_path="-", rank_dir=str(tmp_path / "rank3"))  # fmt: skip
            forkserver._child(spec, {}, os.getppid())  # never returns
    finally:
        signal.signal(signal.SIGPIPE, previous)
    deadline = time.time() + 20
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked rank did not exit")
    assert os.waitstatus_to_exitcode(status) == 0, (tmp_path / "rank3" / "stderr.log").read_text()
    seen = json.loads(out.read_text())
    assert seen["rank"] == 3
    assert seen["signals"]["SIGPIPE"] == str(signal.SIG_IGN)
    assert seen["signals"]["SIGTERM"] == str(signal.SIG_DFL)
    assert seen["signals"]["SIGCHLD"] == str(signal.SIG_DFL)


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_world_preload_is_imported_once_in_the_server_and_every_rank_starts_with_it(tmp_path: Path) -> None:
    # A library the region needs (transformers, for a Hugging Face model) is imported by
    # the fork server, once, and every forked rank has it: the marker module records each
    # process that imports it, and the region refuses to build without it already loaded.
    import subprocess

    from cli_harness import hardening_command

    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "marker_lib.py").write_text("import os\nwith open(os.environ['MARK_FILE'], 'a') as f:\n    f.write(f'{os.getpid()}\\n')\n")
    (tmp_path / "region.py").write_text(
        "import sys\nfrom hardening.harness.reference import build as reference\n\n"
        "def build(ctx):\n    assert 'marker_lib' in sys.modules, 'marker_lib was not preloaded'\n    return reference(ctx)\n"
    )
    (tmp_path / "p.yaml").write_text("world: {preload: [marker_lib]}\n")
    path = os.pathsep.join(p for p in (str(lib), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, MARK_FILE=str(tmp_path / "marks"))
    out = subprocess.run(
        [*hardening_command(), "suite", "compile", "--only", "C-00,C-01", "--profile", "p.yaml", "--target", "region.py:build"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert len((tmp_path / "marks").read_text().split()) == 1  # the server's import; 4 ranks inherited it
    log = next((tmp_path / ".hardening" / "runs").glob("*-compile/forkserver.log")).read_text()
    assert "world.preload: imported marker_lib" in log
