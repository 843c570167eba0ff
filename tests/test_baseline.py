"""Compile baselines: the file format and the checker as pure functions, then the gate as
a user runs it (``baseline update``, ``suite compile --baseline``) on real ranks, on a
region from examples/ edited three ways: unchanged, a break added, the break removed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hardening.harness import baseline
from hardening.harness.baseline import BaselineError, Entry, RankCompile, compare

REPO = Path(__file__).resolve().parent.parent
BREAK_REGION = REPO / "examples" / "break_region.py"

ITEM = "Unsupported Tensor.item() call: no capture at tp.py:37 in forward"
AR = "all_reduce(sum) of float32 (8, 64) on group '0' at tp.py:39"


def rc(**kw) -> RankCompile:
    base = dict(graphs=2, recompiles=0, breaks=[ITEM], collectives=["", AR])
    return RankCompile(**{**base, **kw})


# -- the file -----------------------------------------------------------------------------


def test_render_is_sorted_stable_and_parses_back() -> None:
    entries = rc().entries("tp.py:build", "cpu", 1) + rc().entries("tp.py:build", "cpu", 0)
    text = baseline.render(entries)
    lines = text.splitlines()
    assert lines[0].startswith("#") and lines[1:] == sorted(lines[1:])
    assert baseline.render(reversed(entries)) == text  # order of recording does not matter
    assert sorted(baseline.parse(text)) == sorted(entries)
    grouped = baseline.regions(baseline.parse(text))[("tp.py:build", "cpu")]
    assert grouped[0].collectives == ["", AR] and grouped[1].breaks == [ITEM]


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("tp.py:build cpu", "expected 'REGION PROFILE rankN KEY VALUE'"),
        ("tp.py:build cpu r0 graphs 2", "rankN"),
        ("tp.py:build cpu rank0 graphs two", "non-negative integer"),
        ("tp.py:build cpu rank0 break", "needs its site"),
        ("tp.py:build cpu rank0 graph-1 x", "unknown key 'graph-1'"),
        ("tp.py:build cpu rank0 breaks x", "unknown key 'breaks'"),
    ],
)
def test_a_broken_line_is_named_with_file_and_line(line: str, why: str) -> None:
    with pytest.raises(BaselineError, match=rf"b\.txt:3: .*{why}"):
        baseline.parse(f"# header\n\n{line}\n", source="b.txt")


def test_missing_and_unreadable_files_say_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(BaselineError, match="file not found .*baseline update --out"):
        baseline.load(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(BaselineError, match="cannot read it"):
        baseline.load(tmp_path / "bin.txt")


def test_update_replaces_one_region_and_keeps_the_others(tmp_path: Path) -> None:
    other = rc().entries("other.py:build", "cpu", 0)
    mine_old = rc(graphs=5).entries("tp.py:build", "cpu", 0)
    mine_h200 = rc(graphs=7).entries("tp.py:build", "h200", 0)
    new = rc().entries("tp.py:build", "cpu", 0)
    path = tmp_path / "b.txt"
    baseline.write(path, baseline.merged(other + mine_old + mine_h200, "tp.py:build", "cpu", new))
    grouped = baseline.regions(baseline.load(path))
    assert grouped[("tp.py:build", "cpu")][0].graphs == 2
    assert grouped[("tp.py:build", "h200")][0].graphs == 7 and ("other.py:build", "cpu") in grouped
    assert [p.name for p in tmp_path.iterdir()] == ["b.txt"]  # no temporary left behind


def test_the_header_names_torch_and_the_file_is_readable_by_all(tmp_path: Path) -> None:
    path = tmp_path / "b.txt"
    baseline.write(path, rc().entries("tp.py:build", "cpu", 0), torch_version="2.13.0+cpu")
    assert baseline.recorded_torch(path) == "2.13.0+cpu"
    assert len(baseline.load(path)) == len(rc().entries("tp.py:build", "cpu", 0))  # comments are not entries
    assert path.stat().st_mode & 0o044 == 0o044  # not mkstemp's 0600: the file is committed
    assert baseline.recorded_torch(tmp_path / "missing.txt") is None


def test_region_names_do_not_depend_on_where_the_checkout_is() -> None:
    assert baseline.region_name("/home/u/repo/examples/tp.py:build") == "tp.py:build"
    assert baseline.region_name("examples/tp.py:build") == "tp.py:build"
    assert baseline.region_name("mypkg.blocks:build") == "mypkg.blocks:build"
    assert baseline.region_name("my dir/t p.py:build") == "t_p.py:build"  # one field of a line


def test_select_falls_back_to_the_only_region_and_reads_its_sites_as_the_copy() -> None:
    entries = rc().entries("tp.py:build", "cpu", 0)
    filed_as, got = baseline.select(entries, "copy.py:build", "cpu", source="b.txt")
    assert filed_as == "tp.py:build"
    moved = baseline.renamed(got, filed_as, "copy.py:build")
    assert moved[0].breaks == [ITEM.replace("tp.py", "copy.py")] and moved[0].collectives[1].endswith("copy.py:39")
    assert compare(moved, {0: rc(breaks=[ITEM.replace("tp.py", "copy.py")], collectives=["", AR.replace("tp.py", "copy.py")])}).unchanged
    two = entries + rc().entries("other.py:build", "cpu", 0)
    with pytest.raises(BaselineError, match=r"no entries for region copy.py:build under profile cpu; it holds other.py:build \(cpu\), tp.py:build \(cpu\)"):
        baseline.select(two, "copy.py:build", "cpu", source="b.txt")
    with pytest.raises(BaselineError, match="under profile h200"):
        baseline.select(entries, "tp.py:build", "h200", source="b.txt")


# -- the checker --------------------------------------------------------------------------


def test_an_unchanged_run_is_unchanged() -> None:
    assert compare({0: rc(), 1: rc()}, {0: rc(), 1: rc()}).unchanged


def test_a_new_break_is_a_regression_naming_rank_and_line() -> None:
    new = "Failed to trace builtin operator `print` at tp.py:40 in forward"
    c = compare({0: rc(), 1: rc()}, {0: rc(), 1: rc(graphs=3, breaks=[ITEM, new])})
    assert c.regressions == [f"rank 1: new graph break: {new}", "rank 1: 3 graphs, baseline 2"]
    assert not c.improvements


def test_a_removed_break_is_an_improvement_and_merged_graphs_are_not_a_change() -> None:
    c = compare({0: rc()}, {0: rc(graphs=1, breaks=[], collectives=[AR])})
    assert not c.regressions and not c.moved
    assert c.improvements == [f"rank 0: graph break gone: {ITEM}", "rank 0: 1 graphs, baseline 2"]


def test_a_break_that_only_moved_lines_is_stale_not_a_regression() -> None:
    moved = ITEM.replace(":37", ":41")
    c = compare({0: rc()}, {0: rc(breaks=[moved], collectives=["", AR.replace(":39", ":43")])})
    assert not c.regressions and not c.improvements
    assert c.moved[0] == f"rank 0: graph break moved: {ITEM} -> {moved}" and "collectives" in c.moved[1]


def test_recompiles_and_collectives_are_judged() -> None:
    c = compare({0: rc()}, {0: rc(recompiles=2)})
    assert c.regressions == ["rank 0: 2 recompiles after warmup, baseline 0"]
    other = "all_gather_into_tensor() of float32 (16, 64) on group '0' at tp.py:39"
    c = compare({0: rc()}, {0: rc(collectives=["", other])})
    assert len(c.regressions) == 1 and "collectives changed" in c.regressions[0] and "all_gather" in c.regressions[0]
    assert "collectives changed" in compare({0: rc()}, {0: rc(collectives=["", ""])}).regressions[0]


def test_a_different_world_size_is_never_compared() -> None:
    c = compare({0: rc(), 1: rc()}, {0: rc(), 1: rc(), 2: rc(), 3: rc()})
    assert c.regressions == ["the baseline has ranks 0,1, this run 0,1,2,3: record it for this world size"]


def test_counters_of_a_final_record_read_as_a_baseline() -> None:
    counters = {"graphs": 2, "recompiles": 1, "break_reasons": [ITEM, ITEM], "total": {"graph_collectives": ["", AR]}}
    assert RankCompile.from_counters(counters) == rc(recompiles=1)
    assert Entry("r", "p", 0, "graph-001", "").line() == "r p rank0 graph-001"


# -- the gate, as a user runs it ----------------------------------------------------------


def hardening(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hardening", *args], cwd=cwd, capture_output=True, text=True, timeout=150
    )


def test_usage_errors_name_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("tp.py:build cpu rank0 graphs many\n")
    cases = [
        (("suite", "compile", "--baseline", "b.txt"), "--baseline b.txt:1: graphs must be a non-negative integer"),
        (("suite", "compile", "--baseline", "nope.txt"), "--baseline nope.txt: file not found"),
        (("suite", "compile", "--fail-on-improvement"), "--fail-on-improvement needs --baseline FILE"),
        (("baseline", "update", "--out", "b.txt"), "--out b.txt:1: graphs must be"),
        (("baseline", "update"), "the following arguments are required: --out"),
        (("baseline", "update", "--out", str(tmp_path)), "is a directory"),
    ]
    for args, message in cases:
        out = hardening(*args, cwd=tmp_path)
        assert out.returncode == 4, (args, out.stderr)
        assert message in out.stderr, (args, out.stderr)
    assert not (tmp_path / ".hardening").exists()


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_gate_is_quiet_unchanged_loud_on_a_new_break_and_asks_to_ratchet_a_removed_one(tmp_path: Path) -> None:
    source = BREAK_REGION.read_text()
    (tmp_path / "break_region.py").write_text(source)
    out = hardening("baseline", "update", "--target", "break_region.py:build", "--out", "b.txt", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    recorded = (tmp_path / "b.txt").read_text()
    assert "rank1 break Unsupported Tensor.item()" in recorded and "at break_region.py:" in recorded
    assert "rank0 graphs 2" in recorded and "rank0 graph-002 all_reduce(sum) of float32 (8, 64)" in recorded

    # Unchanged: the whole compile suite passes, and nothing about the baseline is said.
    out = hardening("suite", "compile", "--target", "break_region.py:build", "--baseline", "b.txt", "--json", "r.json", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "baseline" not in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["baseline"]["regressions"] == [] and report["baseline"]["improvements"] == []
    out = hardening("baseline", "update", "--target", "break_region.py:build", "--out", "b.txt", cwd=tmp_path)
    assert out.returncode == 0 and "unchanged" in out.stdout and (tmp_path / "b.txt").read_text() == recorded

    # A second break, in a copy of the region: exit 1, the new break's line named on every rank.
    lines = source.splitlines()
    ret = next(i for i, line in enumerate(lines) if "return funcol.all_reduce" in line)
    lines.insert(ret, '        print("mlp out", h.shape)  # a debug print: a second break')
    (tmp_path / "two_breaks.py").write_text("\n".join(lines) + "\n")
    out = hardening("suite", "compile", "--only", "C-00", "--target", "two_breaks.py:build", "--baseline", "b.txt", cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    for rank in (0, 1):
        assert f"REGRESSION rank {rank}: new graph break: " in out.stdout
    assert f"at two_breaks.py:{ret + 1} in forward" in out.stdout
    assert "new graph break: Unsupported Tensor.item()" not in out.stdout  # the old break is not new in a copy

    # The break removed: passes, and prints the exact command that ratchets the file...
    no_break = "\n".join(line for line in source.splitlines() if ".item()" not in line and "warnings.warn(" not in line)
    (tmp_path / "break_region.py").write_text(no_break + "\n")
    out = hardening("suite", "compile", "--only", "C-00", "--target", "break_region.py:build", "--baseline", "b.txt", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "improved: rank 0: graph break gone: Unsupported Tensor.item()" in out.stdout
    assert "ratchet the baseline: hardening baseline update --target break_region.py:build --out b.txt" in out.stdout
    # ...which fails the gate when asked to, as PyTorch's CI does.
    out = hardening(
        "suite", "compile", "--only", "C-00", "--target", "break_region.py:build", "--baseline", "b.txt",
        "--fail-on-improvement", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 1 and "graph break gone" in out.stdout
