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


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("profile", ["cpu", "premerge"])
def test_dtensor_block_passes_every_suite(tmp_path: Path, profile: str) -> None:
    """A region nobody here wrote the internals of: torch's parallelize_module on a DeviceMesh."""
    out = subprocess.run(
        [sys.executable, "-m", "hardening", "suite", "all", "--ranks", "2", "--profile", profile,
         "--target", f"{EXAMPLES / 'dtensor_block.py'}:build", "--json", "r.json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=380,
    )  # fmt: skip
    print(out.stdout, out.stderr)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    cases = {(c["id"], c["fault"]): c for c in json.loads((tmp_path / "r.json").read_text())["cases"]}
    by_id = {case_id: c for (case_id, _), c in cases.items()}
    # The expectations named the region's own input and a parameter it really has.
    assert by_id["OM-11"]["ranks"][1]["touched"] == "hidden_states"
    assert "(hidden_states)" in by_id["OM-11"]["ranks"][1]["message"]
    perturbed = by_id["OM-12"]["ranks"][1]["touched"]
    assert perturbed in ("norm.weight", "norm.bias", "o.bias", "down.bias")
    assert f"parameter '{perturbed}' on rank 1" in by_id["OM-12"]["ranks"][1]["message"]
    assert by_id["C-03"]["ranks"][1]["touched"] == "hidden_states"


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("profile", ["cpu", "premerge"])
def test_hf_llama_through_its_own_tp_plan_passes_every_suite(tmp_path: Path, profile: str) -> None:
    """A transformers model sharded by transformers' own TP plan, token ids (1, T) as input."""
    out = subprocess.run(
        [sys.executable, "-m", "hardening", "suite", "all", "--ranks", "2", "--profile", profile,
         "--target", f"{EXAMPLES / 'hf_llama.py'}:build", "--json", "r.json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=580,
    )  # fmt: skip
    print(out.stdout, out.stderr)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    by_id = {c["id"]: c for c in json.loads((tmp_path / "r.json").read_text())["cases"]}
    assert all(c["verdict"] == "pass" for c in by_id.values()), {k: c["verdict"] for k, c in by_id.items()}
    # C-03 restrided the (1, T) token ids; OM-11 and OM-12 name the model's own names.
    assert by_id["C-03"]["ranks"][1]["touched"] == "input_ids"
    assert "(input_ids)" in by_id["OM-11"]["ranks"][1]["message"]
    perturbed = by_id["OM-12"]["ranks"][1]["touched"]
    assert "norm" in perturbed and f"parameter '{perturbed}' on rank 1" in by_id["OM-12"]["ranks"][1]["message"]


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_a_rank_conditional_collective_in_warmup_ends_at_the_call_deadline_naming_op_and_line(tmp_path: Path) -> None:
    (tmp_path / "d2.yaml").write_text("timeouts: {call_deadline: 2}\n")  # pg timeout stays 30 s
    out = subprocess.run(
        [sys.executable, "-m", "hardening", "suite", "compile", "--only", "control", "--profile", "d2.yaml",
         "--target", f"{EXAMPLES / 'conditional_collective.py'}:build", "--json", "r.json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    print(out.stdout, out.stderr)
    assert out.returncode == 1
    r0, r1 = json.loads((tmp_path / "r.json").read_text())["cases"][0]["ranks"]
    assert r0["error_class"] == "CallDeadlineExceeded" and r0["phase"] == "warmup"
    # The op it is blocked in, the collective that issued it, and the user's line (not the def line).
    assert "wait_tensor (all_reduce)" in r0["message"] and "conditional_collective.py:29" in r0["message"]
    assert r1["error_class"] == "PeerError" and "conditional_collective.py:29" in r1["message"]
    assert "this rank was waiting for its peers at side-channel step 'warmup/1'" in r1["message"]
    # Within the call deadline after the first compile, not the 30 s process-group timeout.
    assert max(r0["exited_at"], r1["exited_at"]) - min(r0["started_at"], r1["started_at"]) < 2 + 1 + 5
    assert r1["exited_at"] - r0["exited_at"] < 1.0
