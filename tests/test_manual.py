"""The operator manual: generated from the code, checked against the committed file.

The command runs as a user runs it (the console script, from the repository root); an
edit of a case that nobody regenerated is made in a child process that patches the suite
registry before it calls the CLI, so the repository is never touched.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli_harness import hardening_command
from hardening.harness import manual
from hardening.harness.cases import MATRIX_HEADERS
from hardening.harness.surfaces import SURFACES
from hardening.suites import get_suite

REPO = Path(__file__).resolve().parent.parent
MANUAL = REPO / "docs" / "operator-manual.md"


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*hardening_command(), "manual", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _check_with_edited_suite(edit: str) -> subprocess.CompletedProcess[str]:
    """``hardening manual --check`` in a process whose compile suite was edited by ``edit``
    (Python, given ``cases``, the list to change) and not regenerated."""
    code = textwrap.dedent(
        """
        import dataclasses, sys
        from hardening import suites
        build = suites.SUITES["compile"]
        def edited():
            cases = build()
        {edit}
            return cases
        suites.SUITES["compile"] = edited
        from hardening.harness.cli import main
        sys.exit(main(["manual", "--check"]))
        """
    ).format(edit=textwrap.indent(textwrap.dedent(edit).strip(), "    "))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def _sections(text: str) -> dict[str, str]:
    """Level-2 sections of the manual by heading."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _rows(table_text: str) -> list[list[str]]:
    rows = []
    for line in table_text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def test_the_committed_manual_matches_the_code() -> None:
    out = _cli("--check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "matches the code" in out.stdout


@pytest.mark.parametrize(
    "edit, shows",
    [
        ("cases[1] = dataclasses.replace(cases[1], expect=dataclasses.replace(cases[1].expect, budget_s=4))", "| C-01 | compile | compile_one_rank:rank=1 | all:ParityError | 4s |"),
        ("cases[6] = dataclasses.replace(cases[6], expect=dataclasses.replace(cases[6].expect, others=dataclasses.replace(cases[6].expect.others, match='warmup')))", "all:WarmupError~/warmup/"),
    ],
    ids=["budget", "expectation"],
)  # fmt: skip
def test_check_fails_when_a_case_is_edited_without_regenerating(edit: str, shows: str) -> None:
    out = _check_with_edited_suite(edit)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "out of date" in out.stderr and "hardening manual --out docs/operator-manual.md" in out.stderr
    assert any(line.startswith("+") and shows in line for line in out.stdout.splitlines()), out.stdout


def test_every_case_appears_under_its_surface_with_its_measured_t_detect() -> None:
    sections = _sections(MANUAL.read_text())
    for number, surface in enumerate(SURFACES, 1):
        body = sections[f"{number}. {surface.title}"]
        rows = {r[0]: r for r in _rows(body.split("### Break-it tests", 1)[1].split("###", 1)[0])}
        for case in (c for c in get_suite("all") if c.surface == surface.key):
            assert case.id in rows, f"{case.id} missing under {surface.title}"
            measured = rows[case.id][4]
            if case.expect.crash:
                assert re.fullmatch(r"\d+\.\d\d \(\d+\.\d\d–\d+\.\d\d\)", measured), (case.id, measured)
            else:
                assert measured.startswith("— (completes"), (case.id, measured)


def test_hardening_list_and_the_manual_agree_on_every_row() -> None:
    listed = subprocess.run([*hardening_command(), "list"], capture_output=True, text=True, timeout=60, check=True).stdout
    lines = listed.splitlines()
    # tabulate's "simple" table: the dashes under the header mark each column's extent.
    spans = [m.span() for m in re.finditer(r"-+", lines[1])]
    cells = [[line[a:b if i < len(spans) - 1 else None].strip() for i, (a, b) in enumerate(spans)] for line in lines]
    assert cells[0] == list(MATRIX_HEADERS)
    table = _sections(MANUAL.read_text())["The matrix"]
    assert _rows(table) == [list(MATRIX_HEADERS), *cells[2:]]
    assert len(cells[2:]) == len(get_suite("all"))


def test_the_manual_uses_the_corrected_nccl_wording() -> None:
    text = MANUAL.read_text()
    assert "NCCL ops are launched on a CUDA stream and are stream-ordered locally; plus there is a cross-rank ordering contract" in text
    assert "NCCL runs on its own streams" not in text


def test_every_effective_backend_key_a_rank_fingerprints_is_in_the_parity_table() -> None:
    import torch

    from hardening.runtime.parity import effective_backends

    text = _sections(MANUAL.read_text())["Compile hardening"]
    for key in effective_backends(torch.device("cpu"), torch.float32):
        assert f"`effective.{key}`" in text, key


def test_a_runtime_check_no_surface_claims_stops_the_generation() -> None:
    sites = manual.tripwire_sites()
    manual._check_sites(sites)  # the shipped code: every site claimed, once
    with pytest.raises(manual.ManualError, match=r"no operator surface lists as a tripwire: hardening\.runtime\.drift:check_new"):
        manual._check_sites({**sites, "hardening.runtime.drift:check_new": ["DriftError"]})


def test_the_tripwire_scan_finds_raises_and_built_errors_in_nested_code(tmp_path: Path) -> None:
    sites = manual.tripwire_sites()
    assert sites["hardening.runtime.parity:check_parity"] == ["ParityError"]
    assert sites["hardening.runtime.compile.backend:refusing"] == ["GroupError"]  # built in a nested function
    assert set(sites["hardening.runtime.watchdog:Watchdog._tick"]) >= {"Terminated", "CallDeadlineExceeded", "PeerLost"}


def test_a_pointer_to_code_that_moved_is_named() -> None:
    with pytest.raises(manual.ManualError, match=r"hardening\.runtime\.envelope:no_such_check: 'no_such_check' does not exist"):
        manual.resolve("hardening.runtime.envelope:no_such_check")
    with pytest.raises(manual.ManualError, match=r"setting 'timeouts\.no_such': timeouts\.no_such is not a profile key"):
        manual.setting("timeouts.no_such")


def test_missing_or_broken_results_are_named_or_said_as_not_measured(tmp_path: Path) -> None:
    out = _cli("--results", str(tmp_path / "nowhere"))
    assert out.returncode == 4 and "--results" in out.stderr and "nowhere" in out.stderr, out.stderr
    broken = tmp_path / "results"
    broken.mkdir()
    (broken / "detect.md").write_text("| case | t_detect s, process\n| C-01 |\ngarbage\n")
    target = tmp_path / "manual.md"
    out = _cli("--results", str(broken), "--out", str(target))
    assert out.returncode == 0, out.stderr
    assert "| C-01 | `compile_one_rank:rank=1` | `all:ParityError~/compile\\.enabled/` | 3 s | not measured |" in target.read_text()


def test_check_of_a_missing_manual_says_how_to_generate_it(tmp_path: Path) -> None:
    out = _cli("--check", "--out", str(tmp_path / "none.md"), "--results", str(REPO / "bench" / "results"))
    assert out.returncode == 1
    assert "missing (generate it with `hardening manual --out" in out.stdout


def test_a_figure_measured_for_another_fault_failed_or_over_budget_is_not_shown_as_measured(tmp_path: Path) -> None:
    header = "| case | fault | hardened | ranks end with | t_detect s, process (median, min–max) |\n|---|---|---|---|---|\n"
    rows = {
        "C-01": "| C-01 | compile_one_rank:rank=0 | crashed PASS | r0 x | 0.03 (0.02–0.06) |",
        "C-04": "| C-04 | backend_divergence:rank=1 | crashed FAIL/PASS | r0 x | 0.05 (0.03–0.07) |",
        "W-01": "| W-01 | short_warmup:rank=1 | crashed PASS | r0 x | 4.50 (4.00–5.00) |",
        "OM-02": "| OM-02 | unsupported_dtype | crashed PASS | r0 x | 0.05 (0.04–0.07) |",
    }
    (tmp_path / "detect.md").write_text("torch x, 2 ranks\n" + header + "\n".join(rows.values()) + "\n", encoding="utf-8")
    measured = manual.read_results(tmp_path)
    by_id = {c.id: c for c in get_suite("all")}
    assert manual.measured_t_detect(by_id["C-01"], measured).startswith("stale: measured for fault `compile_one_rank:rank=0`")
    assert manual.measured_t_detect(by_id["C-04"], measured) == "0.05 (0.03–0.07) (the benchmark's runs: crashed FAIL/PASS)"
    assert manual.measured_t_detect(by_id["W-01"], measured) == "4.50 (4.00–5.00) (over the 3 s budget)"
    assert manual.measured_t_detect(by_id["OM-02"], measured) == "0.05 (0.04–0.07)"
    assert manual.measured_t_detect(by_id["OM-13"], measured) == "not measured"
