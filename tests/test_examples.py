"""The examples users copy from must keep working: run them as the README says."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_own_loop_under_torchrun(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
         str(EXAMPLES / "own_loop.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    for rank in (0, 1):
        assert f"rank {rank}: 20 hardened calls" in out.stdout
        record = json.loads((tmp_path / f"own_loop_rank{rank}.json").read_text())
        assert record["ok"] is True and record["phase"] == "steady" and record["last_call_id"] == 19
