"""The benchmarks still run: a tiny run of each, judged by its own table (the numbers
themselves are measured by running them, never asserted here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _run(tmp_path: Path, script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_overhead_bench_runs_every_variant(tmp_path: Path) -> None:
    text = _run(tmp_path, "overhead.py", "--calls", "10", "--repeats", "1")
    for label in ("hardened, digest every call, vs bare", "hardened, digest every call, vs the floor", "stock vs bare"):
        assert label in text, text[-3000:]
    assert "no compile after warmup" in text


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_detect_bench_runs_hardened_and_stock(tmp_path: Path) -> None:
    text = _run(
        tmp_path, "detect.py", "--suites", "compile", "--only", "C-01", "--repeat", "1", "--stock-cap", "20",
        "--launchers", "process,torchrun",
    )  # fmt: skip
    row = next(line for line in text.splitlines() if line.startswith("| C-01"))
    assert "crashed PASS" in row and "ParityError" in row and "silent" in row
    assert row.count("PASS") == 2 and "t_detect s, torchrun" in text  # the torchrun column judged its own runs
    for launcher in ("process", "torchrun"):  # and what starting a case cost under each
        startup = next(line for line in text.splitlines() if line.startswith(f"| {launcher} "))
        assert startup.count("(") == 2, startup


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_collective_check_bench_runs_both_modes(tmp_path: Path) -> None:
    text = _run(tmp_path, "collective_check.py", "--layers", "2", "--repeats", "1", "--steady", "5")
    row = next(line for line in text.splitlines() if line.startswith("| 2 |"))
    assert row.count("ms") >= 4 and row.count("|") == 8, text[-2000:]


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_overlap_bench_prints_every_depth_and_both_recompute_variants(tmp_path: Path) -> None:
    text = _run(tmp_path, "overlap.py", "--chunks", "6", "--plot", "o.png")
    rows = [line for line in text.splitlines() if line.startswith("| D=") or line.startswith("| cut every")]
    assert [r.split("|")[1].strip() for r in rows] == ["D=1", "D=2", "D=3", "D=4", "cut every 4: stash", "cut every 4: recompute"]
    assert "modelled" in text and "OverlapScore delta" in text and "results/s ratio" in text
    try:
        import matplotlib  # noqa: F401  (a benchmark-only extra)
    except ImportError:
        return
    assert (tmp_path / "o.png").stat().st_size > 1000


@pytest.mark.timeout(120)
def test_gpu_check_on_a_machine_without_cuda_says_so_in_one_line_and_runs_nothing(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: this is the CPU-machine behaviour")
    script = BENCH / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, timeout=30).returncode == 0
    out = subprocess.run(
        ["bash", str(script), str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True, timeout=90,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "gpu_check: no CUDA device visible here (no GPU for nvidia-smi, torch.cuda.is_available() is False): nothing run"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(120)
def test_gpu_check_runs_every_step_bounded_says_each_and_reruns_one_by_name(tmp_path: Path) -> None:
    # The GPU branch's own logic, on a CPU box: a stand-in interpreter says CUDA is there
    # and fails everything else at once (exit 3), so every step runs, fails and is said.
    fake = tmp_path / "fakepython"
    fake.write_text('#!/usr/bin/env bash\ncase "$*" in *cuda.is_available*) echo "1 2.13.0 12.8"; exit 0 ;; esac\nexit 3\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake)}
    script, out = str(BENCH / "gpu_check.sh"), tmp_path / "out"

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", script, str(out), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    ran = check()
    assert ran.returncode == 1, ran.stdout + ran.stderr
    lines = (out / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["env", "doctor", "nccl1", "gloo2-compile", "gloo2-operator", "overhead"]
    assert all("exit" in line and f"{out}/" in line for line in lines), lines
    assert "a step failed" in ran.stdout
    (out / "nccl1.log").write_text("kept\n")
    rerun = check("doctor")  # by name: only that step, the rest of the folder kept
    assert rerun.returncode == 1 and (out / "nccl1.log").read_text() == "kept\n"
    assert (out / "summary.txt").read_text().splitlines()[-1].startswith("doctor: exit 3")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    refused = subprocess.run(["bash", script, str(tmp_path / "mine")], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "refusing to empty it" in refused.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_gpu_check_names_only_shipped_profiles_that_fit_one_gpu() -> None:
    # The script's profiles exist and are what a one-GPU machine can run: one NCCL rank,
    # or two gloo ranks sharing the device.
    import re

    from hardening.harness.profile import load_profile

    named = sorted(set(re.findall(r"\) suite [\w-]+ \d+ \w+ (\S+)", (BENCH / "gpu_check.sh").read_text())))
    assert named == ["gpu1-nccl", "gpu2-gloo-cuda"]
    one, two = (load_profile(n) for n in named)
    assert (one.world.ranks, one.world.backend, one.world.device) == (1, "nccl", "cuda")
    assert (two.world.ranks, two.world.backend, two.world.device) == (2, "gloo", "cuda")
    assert {one.compile.backend, two.compile.backend} == {"inductor"} and one.region.dims == load_profile("h200").region.dims
