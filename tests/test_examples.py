"""The examples users copy from must keep working: run them as the README says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_harness import free_port
from hardening.suites import get_suite

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_own_loop_under_torchrun(tmp_path: Path) -> None:
    port = free_port()
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
         str(EXAMPLES / "own_loop.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    for rank in (0, 1):
        assert f"rank {rank}: 12 hardened calls" in out.stdout
        record = json.loads((tmp_path / ".hardening" / "records" / f"rank{rank}.json").read_text())
        # Two warmup calls, twelve served; the Session closed its gates and said done.
        assert record["ok"] is True and record["phase"] == "done" and record["last_call_id"] == 13
        assert record["counters"]["graphs"] >= 1 and record["counters"]["recompiles"] == 0


def test_own_loop_asks_no_more_than_a_session() -> None:
    # The example is what users copy: every guarantee, and at most 40 lines of code.
    text = (EXAMPLES / "own_loop.py").read_text()
    code = text.split('"""', 2)[2]
    lines = [line for line in code.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(lines) <= 40, len(lines)
    for step in ("@hr.record", "Session.from_env", "check_weights", "s.compile", "control_plane", "warmup", "serve"):
        assert step in code, step
    assert "hardening.harness" not in code and "store.set" not in code and "enter(" not in code


def _run_on(tmp_path: Path, example: str, *args: str, timeout: float, report: str = "r.json") -> tuple[int, dict]:
    """``hardening ARGS --target examples/EXAMPLE:build --json REPORT`` as a user runs it:
    the exit code and the JSON report."""
    out = subprocess.run(
        [sys.executable, "-m", "hardening", *args, "--target", f"{EXAMPLES / example}:build", "--json", report],
        cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
    )
    print(out.stdout[-8000:], out.stderr[-8000:])
    return out.returncode, json.loads((tmp_path / report).read_text())


def _suite_all_passes(tmp_path: Path, profile: str, example: str, *, timeout: float) -> dict[str, dict]:
    """``hardening suite all`` on an example region: exit 0, every case a pass; cases by id
    (under ``all`` the two controls share an id: the operator one is kept)."""
    code, result = _run_on(tmp_path, example, "suite", "all", "--ranks", "2", "--profile", profile, timeout=timeout)
    assert code == 0
    cases = result["cases"]
    runnable = [c for c in get_suite("all") if c.min_ranks <= 2]  # the rest need a pipeline mesh of two
    assert len(cases) == len(runnable) and all(c["verdict"] == "pass" for c in cases), [(c["id"], c["verdict"]) for c in cases]
    return {c["id"]: c for c in cases}


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "profile, example, first_input, replicated",
    [
        # torch's parallelize_module on a DeviceMesh: norms declared, row-parallel biases Replicate DTensors.
        ("cpu", "dtensor_block.py", "hidden_states", lambda name: name in ("norm.weight", "norm.bias", "o.bias", "down.bias")),
        ("premerge", "dtensor_block.py", "hidden_states", lambda name: name in ("norm.weight", "norm.bias", "o.bias", "down.bias")),
        # transformers' own TP plan, token ids (1, T): only the RMSNorm weights are whole on every rank.
        # On premerge only (fullgraph through aot_eager is the stricter of the two; every
        # case builds the model on every rank, about 2 minutes a profile), with transformers
        # preloaded by the fork server as an HF user would (world.preload).
        ("premerge+preload", "hf_llama.py", "input_ids", lambda name: "norm" in name),
    ],
    ids=["dtensor-cpu", "dtensor-premerge", "hf_llama-premerge"],
)
def test_a_region_nobody_here_wrote_passes_every_suite(
    tmp_path: Path, profile: str, example: str, first_input: str, replicated
) -> None:
    if profile.endswith("+preload"):
        from importlib import resources

        import yaml

        data = yaml.safe_load(resources.files("hardening.profiles").joinpath(f"{profile.removesuffix('+preload')}.yaml").read_text())
        data.setdefault("world", {})["preload"] = ["transformers", "safetensors.torch"]
        (tmp_path / "preload.yaml").write_text(yaml.safe_dump(data))
        profile = "preload.yaml"
    by_id = _suite_all_passes(tmp_path, profile, example, timeout=580)
    # The expectations named the region's own first input and a parameter it really has.
    assert by_id["C-03"]["ranks"][1]["touched"] == first_input
    assert by_id["OM-11"]["ranks"][1]["touched"] == first_input
    assert f"({first_input})" in by_id["OM-11"]["ranks"][1]["message"]
    perturbed = by_id["OM-12"]["ranks"][1]["touched"]
    assert replicated(perturbed) and f"parameter '{perturbed}' on rank 1" in by_id["OM-12"]["ranks"][1]["message"]


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_a_rank_conditional_collective_in_warmup_ends_at_the_call_deadline_naming_op_and_line(tmp_path: Path) -> None:
    # The compile-time collective check off: what the watchdog does when nothing caught it first.
    (tmp_path / "d2.yaml").write_text("timeouts: {call_deadline: 2}\ncompile: {check_collectives: false}\n")  # pg timeout stays 30 s
    code, result = _run_on(
        tmp_path, "conditional_collective.py", "suite", "compile", "--only", "C-00", "--profile", "d2.yaml", timeout=150
    )
    assert code == 1
    r0, r1 = result["cases"][0]["ranks"]
    assert r0["error_class"] == "CallDeadlineExceeded" and r0["phase"] == "warmup"
    # The op it is blocked in, the collective that issued it, and the user's line (not the def line).
    assert "wait_tensor (all_reduce)" in r0["message"] and "conditional_collective.py:32" in r0["message"]
    assert r1["error_class"] == "PeerError" and "conditional_collective.py:32" in r1["message"]
    assert "this rank was waiting for its peers at side-channel step 'warmup/1'" in r1["message"]
    # What each side issued: rank 1's own graphs never issued the collective rank 0 waits in.
    assert "its compiled graphs issued no collective in call 0" in r0["message"]
    assert "its compiled graphs issued no collective in call 0" in r1["message"]
    # Within the call deadline after the first compile, not the 30 s process-group timeout.
    assert max(r0["exited_at"], r1["exited_at"]) - min(r0["started_at"], r1["started_at"]) < 2 + 1 + 5
    assert r1["exited_at"] - r0["exited_at"] < 1.0


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_growing_token_ids_are_accepted_and_their_recompiles_gated(tmp_path: Path) -> None:
    (tmp_path / "dynamic.yaml").write_text("compile: {dynamic: true}\n")
    runs = {}
    for name, extra in (("static", ()), ("dynamic", ("--profile", "dynamic.yaml"))):
        code, result = _run_on(
            tmp_path, "growing_tokens.py", "suite", "compile", "--only", "C-00", *extra, timeout=200, report=f"{name}.json"
        )
        runs[name] = (code, result["cases"][0])
    # The contract let every length through; with static shapes the gate names torch's guard.
    code, case = runs["static"]
    assert code == 1 and all(r["error_class"] == "CompileGateError" for r in case["ranks"])
    assert "size mismatch at index 1" in case["ranks"][0]["message"]
    # Warmup saw two lengths (8, 9): its recompile is allowed, and reported with torch's reason.
    counters = case["ranks"][0]["counters"]
    assert counters["warmup_recompiles"] == 1 and "expected 8, actual 9" in counters["warmup_recompile_reasons"][0]
    code, case = runs["dynamic"]
    assert code == 0 and case["verdict"] == "pass"


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_a_hang_the_watchdog_may_not_end_is_reported_with_the_collective_and_line(tmp_path: Path) -> None:
    # Deadlines off: the runner's case deadline ends it. py-spy sees the compiled frame's
    # def line only; the runtime's own heartbeat says which collective and which line.
    (tmp_path / "off.yaml").write_text(
        "timeouts: {call_deadline: 0, compile: 0, case: 12, setup: 10}\ncompile: {check_collectives: false}\n"
    )
    _, result = _run_on(
        tmp_path, "conditional_collective.py", "suite", "compile", "--only", "C-00", "--profile", "off.yaml", timeout=150
    )
    case = result["cases"][0]
    assert case["outcome"] == "hung"
    r0, r1 = case["ranks"]
    assert r0["where"].startswith("wait_tensor (all_reduce)") and "conditional_collective.py:32" in r0["where"]
    assert r1["where"].startswith("waiting for its peers at side-channel step 'warmup/1'")
    assert "; its compiled graphs issued no collective in call 0 (py-spy: " in r1["where"]
    summary = (Path(r0["stacks_path"]).parent / "stacks_summary.txt").read_text()
    assert "runtime says" in summary.splitlines()[0] and "conditional_collective.py:32" in summary
