"""A failing compile case's artifacts: the depyf dump, the rank's bounded end hook, what a
case keeps (:mod:`hardening.harness.artifacts`), tlparse's HTML, and the suite end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hardening.harness import artifacts
from hardening.harness.profile import load_profile
from hardening.harness.results import RankResult
from hardening.runtime.compile import dump
from hardening.runtime.compile.dump import NOTES, write_dump

REPO = Path(__file__).resolve().parent.parent


def _compiled(fn, *calls: torch.Tensor) -> list[torch.fx.GraphModule]:
    """Run ``fn`` compiled through a backend that keeps its graphs; the graphs it got."""
    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(fn, backend=keep)
    for x in calls:
        compiled(x)
    return graphs


def _item_break(x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x)
    peak = h.abs().max().item()  # host sync: a graph break
    return h * 2 + peak


def _branch_break(x: torch.Tensor) -> torch.Tensor:
    if x.sum() > 0:  # data-dependent branch: the bytecode depyf 0.20 cannot decompile on torch 2.13
        return x + 1
    return x - 1


# -- the dump ---------------------------------------------------------------------------------


def test_dump_holds_each_graph_and_the_decompiled_transformed_code(tmp_path: Path) -> None:
    graphs = _compiled(_item_break, torch.randn(4, 4), torch.randn(4, 4))
    assert len(graphs) >= 2  # before and after the break

    out = write_dump(tmp_path / "depyf", graphs)

    assert out == str(tmp_path / "depyf")
    files = {p.name for p in Path(out).iterdir()}
    assert {"graph_0.py", "graph_1.py", NOTES} <= files
    assert "torch.relu" in (Path(out) / "graph_0.py").read_text()
    top = [f for f in files if f.endswith("_item_break.py")]
    resume = [f for f in files if "torch_dynamo_resume_in__item_break" in f and f.endswith(".py")]
    assert top and resume, files
    code = (Path(out) / top[0]).read_text()
    assert "def _item_break(x):" in code and "__compiled_fn" in code  # Dynamo's code, not the user's
    assert any(f.endswith("_item_break.guards.txt") for f in files)
    notes = (Path(out) / NOTES).read_text()
    assert "graph_0.py" in notes and top[0] in notes


def test_a_frame_depyf_cannot_decompile_is_a_note_and_its_bytecode(tmp_path: Path) -> None:
    graphs = _compiled(_branch_break, torch.ones(3))
    out = Path(write_dump(tmp_path / "depyf", graphs))
    notes = (out / NOTES).read_text()
    listings = sorted(out.glob("*_branch_break.dis.txt"))
    if not listings:  # a depyf that learned this bytecode: the decompiled file instead
        assert sorted(out.glob("*_branch_break.py")), sorted(p.name for p in out.iterdir())
        pytest.skip("this depyf decompiles the graph-break bytecode")
    assert "depyf could not decompile it" in notes and "DecompilationError" in notes
    assert "POP_JUMP" in listings[0].read_text() or "JUMP" in listings[0].read_text()  # a real dis listing


def test_the_dump_never_raises_and_stops_at_its_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graphs = _compiled(_item_break, torch.randn(2, 2))

    class Broken:
        def print_readable(self, **kw):
            raise RuntimeError("cannot print")

        code = "def forward(self): pass"

    out = Path(write_dump(tmp_path / "a", [Broken()]))
    assert "def forward(self): pass" in (out / "graph_0.py").read_text()
    assert "print_readable failed (RuntimeError: cannot print)" in (out / NOTES).read_text()

    import depyf

    monkeypatch.setattr(depyf, "decompile", lambda code: (_ for _ in ()).throw(IndexError("pop from empty list")))
    out = Path(write_dump(tmp_path / "b", graphs))
    assert "IndexError: pop from empty list" in (out / NOTES).read_text()
    assert sorted(out.glob("*.dis.txt"))

    out = Path(write_dump(tmp_path / "c", graphs, time_limit_s=0.0))
    assert "time limit 0s reached" in (out / NOTES).read_text()
    assert not sorted(out.glob("graph_*.py"))

    (tmp_path / "file").write_text("")
    assert write_dump(tmp_path / "file" / "depyf", graphs).startswith("unavailable: ")

    monkeypatch.setattr(dump, "_compiled_frames", lambda notes: notes.append("registry gone") or [])
    assert "registry gone" in (Path(write_dump(tmp_path / "d", [])) / NOTES).read_text()


# -- the rank's end hook: after the record and the abort, bounded, never the cause -------------

_END = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hardening.runtime.records import RankState, Terminator

    state = RankState(rank=0, world_size=1, record_path=Path(sys.argv[1]))
    state.on_end_limit_s = 1.0
    mode = sys.argv[2]

    def hook(ok):
        assert Path(sys.argv[1]).exists()  # the record is written before the hook runs
        state.artifacts["seen_ok"] = str(ok)
        if mode == "hang":
            time.sleep(600)
        if mode == "raise":
            raise OSError("disk full")
        state.artifacts["depyf"] = "/somewhere/depyf"

    state.on_end = hook
    Terminator(state, None).end(RuntimeError("the real cause"))
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["ok", "hang", "raise"])
def test_the_end_hook_adds_to_the_record_and_cannot_change_the_cause_or_hang(tmp_path: Path, mode: str) -> None:
    record = tmp_path / "record.json"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _END, str(record), mode], capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - start
    data = json.loads(record.read_text())
    assert done.returncode == data["exit_code"] != 0, done.stderr
    assert data["error_class"] == "RuntimeError" and data["message"] == "the real cause"
    assert data["artifacts"]["seen_ok"] == "False"
    if mode == "ok":
        assert data["artifacts"]["depyf"] == "/somewhere/depyf"
    elif mode == "hang":
        assert data["artifacts"]["on_end"] == "unfinished: still writing after 1s"
        assert elapsed < 15, elapsed  # the limit, plus the interpreter's start
    else:
        assert data["artifacts"]["on_end"] == "unavailable: OSError: disk full"


# -- what a case keeps --------------------------------------------------------------------------


def _case_dir(tmp_path: Path) -> tuple[Path, list[RankResult]]:
    case = tmp_path / "C-00"
    ranks = []
    for r in (0, 1):
        rd = case / f"rank{r}"
        (rd / "depyf").mkdir(parents=True)
        (rd / "depyf" / NOTES).write_text("x")
        (rd / "torch_trace").mkdir()
        (rd / "torch_trace" / f"dedicated_log_torch_trace_rank_{r}_abc.log").write_text("{}\n")
        ranks.append(RankResult(rank=r, exit_code=25, has_record=True,
                                artifacts={"depyf": str(rd / "depyf"), "torch_trace": str(rd / "torch_trace")}))  # fmt: skip
    return case, ranks


def test_a_passing_case_keeps_nothing_a_failing_one_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifacts.shutil, "which", lambda name: None)
    profile = load_profile()
    case, ranks = _case_dir(tmp_path / "pass")
    artifacts.settle(profile, case, ranks, passed=True)
    assert not list(case.glob("rank*/depyf")) and not list(case.glob("rank*/torch_trace"))
    assert all(r.artifacts == {} for r in ranks)

    case, ranks = _case_dir(tmp_path / "fail")
    artifacts.settle(profile, case, ranks, passed=False)
    for r in ranks:
        assert Path(r.artifacts["depyf"]).is_dir() and Path(r.artifacts["torch_trace"]).is_dir()
        assert r.artifacts["tlparse"] == "unavailable: tlparse not installed (pip install tlparse)"

    case, ranks = _case_dir(tmp_path / "trace")  # --torch-trace: every case keeps its traces
    artifacts.settle(load_profile(None, {"triage.torch_trace": True}), case, ranks, passed=True)
    assert all(set(r.artifacts) == {"torch_trace"} for r in ranks) and not list(case.glob("rank*/depyf"))

    case, ranks = _case_dir(tmp_path / "always")
    artifacts.settle(load_profile(None, {"triage.artifacts": "always"}), case, ranks, passed=True)
    assert all({"depyf", "torch_trace", "tlparse"} <= set(r.artifacts) for r in ranks)

    case, ranks = _case_dir(tmp_path / "killed")  # a rank killed before its end: found on disk, named
    ranks[1].artifacts, ranks[1].has_record = {}, False
    (case / "rank1" / "depyf").rename(case / "rank1" / "gone")
    artifacts.settle(profile, case, ranks, passed=False)
    assert ranks[1].artifacts["torch_trace"] == str(case / "rank1" / "torch_trace")
    assert ranks[1].artifacts["depyf"].startswith("unavailable: the rank did not reach its own end")


_FAKE_TLPARSE = textwrap.dedent(
    """\
    #!{python}
    import sys, os
    args = sys.argv[1:]
    src, out = args[0], args[args.index("-o") + 1]
    assert "--all-ranks-html" in args and "--no-browser" in args and "--overwrite" in args
    os.makedirs(out, exist_ok=True)
    names = sorted(os.listdir(src))
    with open(os.path.join(out, "index.html"), "w") as f:
        f.write("\\n".join(names))
    """
)


def test_tlparse_gets_every_ranks_trace_in_one_directory(tmp_path: Path) -> None:
    exe = tmp_path / "tlparse"
    exe.write_text(_FAKE_TLPARSE.format(python=sys.executable))
    exe.chmod(0o755)
    case, _ = _case_dir(tmp_path)

    html = artifacts.all_ranks_html(case, exe=str(exe))

    assert html == str(case / "tlparse" / "index.html")
    seen = Path(html).read_text().splitlines()
    assert [n.split("_")[5] for n in seen] == ["0", "1"]  # dedicated_log_torch_trace_rank_<r>_...
    assert not (case / ".tlparse_input").exists()  # the staging links are gone

    failing = tmp_path / "false"
    failing.write_text("#!/bin/sh\necho 'bad trace' >&2\nexit 3\n")
    failing.chmod(0o755)
    assert artifacts.all_ranks_html(case, exe=str(failing)) == "unavailable: tlparse exit 3: bad trace"
    assert artifacts.all_ranks_html(tmp_path / "empty", exe=str(exe)) == "unavailable: no rank left a compile trace"


# -- end to end ---------------------------------------------------------------------------------


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_a_failing_compile_case_holds_a_depyf_dump_per_rank_and_a_passing_one_nothing(tmp_path: Path) -> None:
    # break_region fails the control (C-00: a graph break it must not have) and passes
    # C-02 (the injected break is caught): only the failing case keeps its artifacts.
    env = {k: v for k, v in os.environ.items() if k != "TORCH_TRACE"}
    done = subprocess.run(
        [sys.executable, "-m", "hardening", "suite", "compile", "--target", str(REPO / "examples" / "break_region.py") + ":build",
         "--only", "C-00,C-02", "--json", "r.json", "--junit", "r.xml", "--artifacts", "run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=200, env=env,
    )  # fmt: skip
    print(done.stdout, done.stderr)
    assert done.returncode == 1, done.stdout + done.stderr
    cases = {c["id"]: c for c in json.loads((tmp_path / "r.json").read_text())["cases"]}
    assert cases["C-00"]["verdict"] == "fail" and cases["C-02"]["verdict"] == "pass"

    for r in cases["C-00"]["ranks"]:
        rank_dir = tmp_path / "run" / "C-00" / f"rank{r['rank']}"
        dumped = Path(r["artifacts"]["depyf"])
        assert dumped == rank_dir / "depyf"
        names = {p.name for p in dumped.iterdir()}
        assert {NOTES, "graph_0.py", "graph_1.py"} <= names, names
        assert any(n.endswith("_forward.py") or n.endswith("_forward.dis.txt") for n in names), names
        assert "linear" in (dumped / "graph_0.py").read_text()
        logs = list(Path(r["artifacts"]["torch_trace"]).glob("*.log"))
        assert len(logs) == 1 and '"compile_id": "0/0"' in logs[0].read_text()
        html = r["artifacts"]["tlparse"]
        assert html.startswith("unavailable: ") or Path(html).is_file(), html
        assert str(dumped) in done.stdout  # the table's failure details link it

    junit = (tmp_path / "r.xml").read_text()
    assert str(tmp_path / "run" / "C-00" / "rank1" / "depyf") in junit

    passing = tmp_path / "run" / "C-02"
    assert not list(passing.glob("rank*/depyf")) and not list(passing.glob("rank*/torch_trace"))
    assert not (passing / "tlparse").exists()
    assert all("depyf" not in r["artifacts"] and "torch_trace" not in r["artifacts"] for r in cases["C-02"]["ranks"])
