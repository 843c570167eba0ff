"""The JUnit XML report for CI: one ``<testcase>`` per case, judged by its verdict.

This module owns the mapping from verdicts to JUnit: FAIL is a ``<failure>`` (with every
rank's end, its debug artifacts and, for hung ranks, the captured stacks), UNKNOWN an ``<error>`` because
unknown never counts as a pass, an interrupted case or a fault that cannot apply to the region ``<skipped>``. A suite the harness
could not run, or one that was interrupted, also gets a synthetic erroring testcase so a
partial report can never read as green.
"""

from __future__ import annotations

import math
import os
import re
import socket
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

from hardening.harness.results import CaseResult, Outcome, SuiteResult, Verdict

from .json_report import atomic_write_bytes
from .table import metrics_text, rank_detail_lines

STACKS_CAP_BYTES = 20_000
TORCH_KEYS = ("torch", "torch_version")

# Characters XML 1.0 cannot carry (control characters other than tab/newline/CR,
# lone surrogates, U+FFFE/U+FFFF): a stack or message containing one would make the
# whole file unparsable, so they are replaced.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def write_junit(result: SuiteResult, path: str | os.PathLike[str]) -> None:
    """Write ``result`` as JUnit XML to ``path`` (parents created, atomic)."""
    root = build_junit(result)
    ET.indent(root)
    atomic_write_bytes(path, ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n")


def build_junit(result: SuiteResult) -> ET.Element:
    """The ``<testsuites>`` element for ``result``."""
    classname = f"hardening.{result.suite}"
    suite_el = ET.Element("testsuite", name=classname)
    props = ET.SubElement(suite_el, "properties")
    _prop(props, "profile", result.profile)
    _prop(props, "num_ranks", result.num_ranks)
    torch_version = next((result.environment[k] for k in TORCH_KEYS if result.environment.get(k)), None)
    if torch_version is not None:
        _prop(props, "torch", torch_version)
    if result.run_dir:
        _prop(props, "run_dir", result.run_dir)

    failures = errors = skipped = 0
    for case in result.cases:
        kind = _add_case(suite_el, classname, result.num_ranks, case)
        failures += kind == "failure"
        errors += kind == "error"
        skipped += kind == "skipped"
    if result.harness_error or result.interrupted:
        _add_suite_error(suite_el, classname, result)
        errors += 1

    tests = len(result.cases) + (1 if (result.harness_error or result.interrupted) else 0)
    counts = {
        "tests": str(tests),
        "failures": str(failures),
        "errors": str(errors),
        "skipped": str(skipped),
        "time": _secs(result.wall_s),
    }
    suite_el.attrib.update(counts)
    if result.started_at and math.isfinite(result.started_at) and result.started_at > 0:
        stamp = datetime.fromtimestamp(result.started_at, tz=timezone.utc)
        suite_el.set("timestamp", stamp.isoformat(timespec="seconds"))
    suite_el.set("hostname", _text(str(result.environment.get("hostname") or socket.gethostname())))

    root = ET.Element("testsuites", name=classname, **counts)
    root.append(suite_el)
    return root


def _add_case(parent: ET.Element, classname: str, num_ranks: int, case: CaseResult) -> str:
    """Append the ``<testcase>`` for ``case``; return "failure", "error", "skipped" or "pass"."""
    tc = ET.SubElement(parent, "testcase", classname=classname, name=_text(f"{case.id}[ranks={num_ranks}]"))
    tc.set("time", _secs(case.wall_s))
    props = ET.SubElement(tc, "properties")
    _prop(props, "title", case.title)
    _prop(props, "fault", case.fault or "")
    _prop(props, "expectation", case.expectation)
    _prop(props, "outcome", case.outcome.value)
    _prop(props, "verdict", case.verdict.value)
    _prop(props, "t_detect", "" if case.t_detect is None else _secs(case.t_detect))
    _prop(props, "root_cause_rank", "" if case.root_cause_rank is None else case.root_cause_rank)
    if case.metrics:
        _prop(props, "measured", metrics_text(case.metrics))

    if case.outcome is Outcome.INTERRUPTED:
        kind = "skipped"
        ET.SubElement(tc, "skipped", message="interrupted")
    elif case.verdict is Verdict.SKIPPED:
        kind = "skipped"
        ET.SubElement(tc, "skipped", message=_text(case.reason))
    elif case.verdict is Verdict.FAIL:
        kind = "failure"
    elif case.verdict is Verdict.UNKNOWN:
        kind = "error"
    else:
        kind = "pass"
    if kind in ("failure", "error"):
        el = ET.SubElement(tc, kind, type=case.outcome.value, message=_text(case.reason or case.outcome.value))
        el.text = _text(_failure_body(case))

    out = [f"case directory: {case.run_dir}"] if case.run_dir else []
    for r in sorted(case.ranks, key=lambda r: r.rank):
        if r.log_dir:
            out.append(f"rank {r.rank} log: {r.log_dir}")
        # What a CI page links to (depyf dump, TORCH_TRACE, tlparse HTML), or why it is missing.
        out += [f"rank {r.rank} {name}: {where}" for name, where in sorted((r.artifacts or {}).items())]
    if out:
        ET.SubElement(tc, "system-out").text = _text("\n".join(out) + "\n")
    return kind


def _failure_body(case: CaseResult) -> str:
    lines = [f"{case.id}: {case.title}", f"expected: {case.expectation}", f"outcome: {case.outcome.value}"]
    if case.reason:
        lines.append(f"reason: {case.reason}")
    if case.root_cause_rank is not None:
        lines.append(f"root cause: {case.root_cause}")
    lines.append("")
    ranks = sorted(case.ranks, key=lambda r: r.rank)
    for rank in ranks:
        lines.extend(rank_detail_lines(rank))
    for rank in ranks:
        if rank.exit_code is None and rank.stacks_path:
            lines += ["", f"--- stacks of rank {rank.rank} ({rank.stacks_path}) ---", _read_stacks(rank.stacks_path)]
    return "\n".join(lines) + "\n"


def _read_stacks(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read(STACKS_CAP_BYTES + 1)
    except OSError as exc:
        return f"(stacks file unreadable: {exc})"
    text = data[:STACKS_CAP_BYTES].decode("utf-8", errors="replace").rstrip("\n")
    if len(data) > STACKS_CAP_BYTES:
        size = Path(path).stat().st_size
        text += f"\n... (truncated at {STACKS_CAP_BYTES} of {size} bytes; full file at {path})"
    return text


def _add_suite_error(parent: ET.Element, classname: str, result: SuiteResult) -> None:
    tc = ET.SubElement(parent, "testcase", classname=classname, name=f"{result.suite}[suite]", time="0.000")
    if result.harness_error:
        kind, message = "harness_error", result.harness_error
    else:
        kind, message = "interrupted", "the run was interrupted: this is a partial report"
    el = ET.SubElement(tc, "error", type=kind, message=_text(message))
    el.text = _text(message + (f"\nrun directory: {result.run_dir}" if result.run_dir else "") + "\n")


def _prop(parent: ET.Element, name: str, value: object) -> None:
    ET.SubElement(parent, "property", name=name, value=_text(str(value)))


def _secs(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "0.000"
    return f"{max(0.0, value):.3f}"


def _text(value: str) -> str:
    return _XML_INVALID.sub("\ufffd", value)
