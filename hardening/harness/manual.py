"""The operator manual, generated from the code: one Markdown document that cannot drift.

Every fact in it is read from where the code keeps it, when it is generated:

- the cases and their expectations from the suite registry (:mod:`hardening.suites`),
  in the rows ``hardening list`` prints (:func:`hardening.harness.cases.matrix_row`);
- the contract of each operator surface, and pointers to the code that enforces it,
  from :mod:`hardening.harness.surfaces`; each pointer is resolved here, and each
  tripwire's description is its function's docstring;
- every function of the runtime that raises a named cause, found by reading the
  runtime's source (:func:`tripwire_sites`): one that no surface claims stops the
  generation, so a new check cannot go undocumented;
- settings and their values in every shipped profile, with their docstrings;
- the parity keys from :mod:`hardening.runtime.parity`, the envelope's and the
  pipeline's per-message fields from their dataclasses;
- measured ``t_detect`` and overlap figures from ``bench/results/`` (the benchmarks'
  own tables), said as not measured where a case has no figure.

``hardening manual --check`` regenerates it and compares: a case's budget or
expectation edited without regenerating fails CI.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib
import inspect
import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hardening.errors import EXIT_PARENT_GONE, EXIT_UNEXPECTED, NAMED_CAUSES
from hardening.harness.cases import MATRIX_HEADERS, Case, matrix_row
from hardening.harness.surfaces import STAGES, SURFACES, Surface, get_surface

DEFAULT_OUT = "docs/operator-manual.md"
DEFAULT_RESULTS = "bench/results"
RUNTIME_PACKAGE = "hardening.runtime"

DAILY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("parity", ("C-01", "C-04", "OM-05")),
    ("graph breaks", ("C-00", "C-02")),
    ("recompiles", ("C-03",)),
    ("deadlocks and hang hygiene", ("C-05", "W-01", "H-01", "OM-13")),
)
"""The daily regression list, by what each group guards."""


class ManualError(ValueError):
    """The code and the manual's sources disagree (a pointer to nothing, an unclaimed
    tripwire, a case without a surface): the manual cannot be generated until fixed."""


class ResultsMissing(ManualError):
    """The benchmark results folder is not there (a usage error: the wrong directory)."""


# -- sources ---------------------------------------------------------------------------


def resolve(code: str) -> Any:
    """The object ``module:qual.name`` points at; ManualError names what is missing."""
    module_name, _, qualname = code.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ManualError(f"{code}: no module {module_name!r} ({exc})") from None
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise ManualError(f"{code}: {part!r} does not exist (renamed? update hardening/harness/surfaces.py)")
        obj = getattr(obj, part)
    return obj


_ROLE = re.compile(r":(?:class|mod|func|meth|data|attr):`~?([^`]+)`")


def first_paragraph(text: str | None) -> str:
    """A docstring's first paragraph on one line, its reST markup as Markdown."""
    paragraph = inspect.cleandoc(text or "").split("\n\n", 1)[0]
    return _ROLE.sub(r"`\1`", " ".join(paragraph.split())).replace("``", "`")


def function_doc(code: str) -> str:
    """The first paragraph of the docstring of the function ``code`` points at: its own,
    never one inherited from a base class's method of the same name."""
    doc = first_paragraph(getattr(resolve(code), "__doc__", None))
    if not doc:
        raise ManualError(f"{code}: no docstring (its first paragraph is the manual's description of the check)")
    return doc


@functools.cache
def attribute_docs(cls: type) -> dict[str, str]:
    """The docstrings written under a class's annotated attributes (dataclass fields),
    its bases' included: the one place configs and records describe their fields."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or klass.__module__ == "builtins":
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)
            ):  # fmt: skip
                docs[node.target.id] = first_paragraph(after.value.value)
    return docs


def field_doc(code: str) -> str:
    """``module:Class.field`` -> that field's docstring."""
    owner, _, name = code.rpartition(".")
    cls = resolve(owner)
    if not dataclasses.is_dataclass(cls):
        raise ManualError(f"{code}: {owner} is not a dataclass")
    if name not in {f.name for f in dataclasses.fields(cls)}:
        raise ManualError(f"{code}: {cls.__name__} has no field {name!r}")
    doc = attribute_docs(cls).get(name)
    if not doc:
        raise ManualError(f"{code}: the field has no docstring")
    return doc


def tripwire_sites(package: str = RUNTIME_PACKAGE) -> dict[str, list[str]]:
    """Every function of the runtime that raises or builds a named cause, as
    ``module:qualname`` -> the causes, read from the source files (nothing there runs)."""
    root = Path(importlib.import_module(package).__file__ or "").parent
    sites: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = ".".join((package, *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        _collect(ast.parse(path.read_text(encoding="utf-8")), module, [], sites)
    return sites


def _collect(node: ast.AST, module: str, stack: list[str], sites: dict[str, list[str]], *, in_function: bool = False) -> None:
    # A function defined inside another counts as the outer one: only that is importable.
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not in_function:
            _collect(child, module, [*stack, child.name], sites, in_function=True)
            continue
        if isinstance(child, ast.ClassDef) and not in_function:
            _collect(child, module, [*stack, child.name], sites)
            continue
        if isinstance(child, ast.Call) and stack:
            name = getattr(child.func, "id", None) or getattr(child.func, "attr", None)
            if name in NAMED_CAUSES:
                causes = sites.setdefault(f"{module}:{'.'.join(stack)}", [])
                if name not in causes:
                    causes.append(name)
        _collect(child, module, stack, sites, in_function=in_function)


@functools.cache
def _shipped_profiles() -> dict[str, Any]:
    """Every shipped profile, loaded once: the settings tables read dozens of keys from each."""
    from hardening.harness.profile import available_profiles, load_profile

    return {name: load_profile(name) for name in available_profiles()}


def setting(key: str) -> tuple[str, dict[str, Any]]:
    """A dotted profile key -> (its docstring, its value in every shipped profile)."""
    from hardening.harness.profile import Profile

    cls: Any = Profile
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise ManualError(f"setting {key!r}: {'.'.join(parts[: i + 1])} is not a profile key")
        if i < len(parts) - 1:
            nested = fields[part].default_factory  # a section of the profile (timeouts, gates, ...)
            if nested is dataclasses.MISSING or not dataclasses.is_dataclass(nested):
                raise ManualError(f"setting {key!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            cls = nested
    doc = attribute_docs(cls).get(parts[-1], "")
    if not doc:
        raise ManualError(f"setting {key!r}: the field has no docstring")
    values = {}
    for name, obj in _shipped_profiles().items():
        for part in parts:
            obj = getattr(obj, part)
        values[name] = obj
    return doc, values


@dataclass(frozen=True, slots=True)
class Figure:
    """One case's row of a detection table."""

    t_detect: str
    """``median (min–max)`` seconds, as the benchmark printed them."""
    fault: str
    """The fault spec the benchmark ran (a case whose fault changed since is not this figure's)."""
    hardened: str
    """Outcome and verdicts of the hardened runs (``crashed PASS``)."""


@dataclass(frozen=True, slots=True)
class Measured:
    """What the benchmarks measured, by case id."""

    t_detect: dict[str, Figure]
    """Case id -> its row, from the first table that has the case."""
    sources: list[str]
    """Each results file read, with its provenance line (torch, ranks, runs)."""
    overlap: list[tuple[str, str]]
    """(file, text) of each overlap sweep table, as the benchmark wrote it."""


def read_results(results_dir: Path) -> Measured:
    """The figures of ``detect*.md`` and ``overlap*.md`` in ``results_dir``."""
    if not results_dir.is_dir():
        raise ResultsMissing(f"--results {results_dir}: no such directory (run from the repository root, or pass --results DIR)")
    t_detect: dict[str, str] = {}
    sources: list[str] = []
    for path in sorted(results_dir.glob("detect*.md")):
        lines = path.read_text(encoding="utf-8").splitlines()
        sources.append(f"`{path.name}`: {lines[0].strip() if lines else ''}")
        header: list[str] | None = None
        for line in lines:
            cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
            if cells is None:
                header = None
                continue
            if header is None:
                header = cells
                continue
            if set("".join(cells)) <= set("-: ") or "case" not in header or len(cells) != len(header):
                continue  # the rule under the header, another table, or a broken row
            column = next((i for i, h in enumerate(header) if h.startswith("t_detect")), None)
            if column is not None and "fault" in header and "hardened" in header:
                figure = Figure(
                    t_detect=cells[column].split(" PASS")[0].strip(),
                    fault=cells[header.index("fault")], hardened=cells[header.index("hardened")],
                )  # fmt: skip
                t_detect.setdefault(cells[header.index("case")], figure)
    overlap = [(p.name, p.read_text(encoding="utf-8").strip()) for p in sorted(results_dir.glob("overlap*.md"))]
    return Measured(t_detect=t_detect, sources=sources, overlap=overlap)


# -- rendering -------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def measured_t_detect(case: Case, measured: Measured) -> str:
    """The case's measured figure, or why there is none to show: a figure measured for
    another fault, a failed benchmark run or one over the budget is said as such."""
    figure = measured.t_detect.get(case.id)
    if figure is None:
        return "not measured"
    if figure.fault != (case.fault or "—"):
        return f"stale: measured for fault `{figure.fault}`, rerun bench/detect.py"
    if "PASS" not in figure.hardened or "FAIL" in figure.hardened:
        return f"{figure.t_detect} (the benchmark's runs: {figure.hardened})"
    median = re.match(r"\d+(\.\d+)?", figure.t_detect)
    if median and case.expect.crash and float(median.group(0)) > case.expect.budget_s:
        return f"{figure.t_detect} (over the {case.expect.budget_s:g} s budget)"
    return figure.t_detect


def _value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def _settings_table(keys: tuple[str, ...] | list[str]) -> str:
    profiles = list(_shipped_profiles())
    rows = []
    for key in keys:
        doc, values = setting(key)
        rows.append([f"`{key}`", *[_value(values[p]) for p in profiles], doc])
    return _table(["setting", *profiles, "what it does"], rows)


def _cases_table(cases: list[Case], measured: Measured) -> str:
    from hardening.inject import fault_class, parse_spec
    rows = []
    for c in cases:
        budget = f"{c.expect.budget_s:g} s" if c.expect.crash else "—"
        if not c.expect.crash:
            seen = "— (completes" + (f"; judged by `{c.check}`" if c.check else "") + ")"
        else:
            seen = measured_t_detect(c, measured)
        rows.append([c.id, f"`{c.fault}`" if c.fault else "—", f"`{c.expect.describe(full=True)}`", budget, seen])
    text = _table(["case", "fault", "every rank must end with", "budget", "measured t_detect, s"], rows)
    notes = []
    for c in cases:
        note = f"- **{c.id}** {c.title}." + (f" {c.description}" if c.description else "")
        if c.fault:
            cls = fault_class(parse_spec(c.fault).name)
            note += f" Fault `{cls.name}`: {cls.summary} (patches `{cls.target}`)."
        notes.append(note)
    return text + "\n\n" + "\n".join(notes)


def _surface_section(number: int, surface: Surface, cases: list[Case], sites: dict[str, list[str]], measured: Measured) -> str:
    out = [f"## {number}. {surface.title}", "", surface.summary, "", "### Contract", "", "Must:", ""]
    out += [f"- {line}" for line in surface.must]
    out += ["", "Never:", ""]
    out += [f"- {line}" for line in surface.forbid]
    out += ["", "### Tripwires", ""]
    rows = []
    for wire in surface.tripwires:
        causes = ", ".join(f"`{c}` ({NAMED_CAUSES[c].exit_code})" for c in sites.get(wire.code, []))
        rows.append([wire.where, wire.check or function_doc(wire.code), f"`{wire.code}`", causes])
    out += [_table(["where", "check", "code", "raises (exit code)"], rows), ""]
    out += ["### Break-it tests", ""]
    out += [_cases_table(cases, measured) if cases else "None yet: no case proves this surface.", ""]
    out += ["### Instrumentation", ""]
    if surface.settings:
        out += [_settings_table(surface.settings), ""]
    if surface.fields:
        rows = [[f"`{code.rpartition(':')[2]}`", field_doc(code)] for code in surface.fields]
        out += [_table(["field (record / report)", "what it holds"], rows), ""]
    if surface.key == "backpressure":
        out += ["The measured depth sweep (`bench/overlap.py`; O-01 gates D >= 2, O-03 the recompute coupling):", ""]
        for name, text in measured.overlap:
            out += [f"From `{name}`:", "", text, ""]
    return "\n".join(out).rstrip() + "\n"


def _check_sites(sites: dict[str, list[str]]) -> None:
    claimed: dict[str, str] = {}
    for surface in SURFACES:
        for wire in surface.tripwires:
            if wire.where not in STAGES:
                raise ManualError(f"surface {surface.key}: tripwire {wire.code} lives at {wire.where!r}, not one of {STAGES}")
            if wire.code not in sites:
                raise ManualError(f"surface {surface.key}: {wire.code} raises no named cause (moved? update the surface)")
            if wire.code in claimed:
                raise ManualError(f"{wire.code} is claimed by surfaces {claimed[wire.code]} and {surface.key}")
            claimed[wire.code] = surface.key
    unclaimed = sorted(set(sites) - set(claimed))
    if unclaimed:
        raise ManualError(
            "runtime functions raise a named cause that no operator surface lists as a tripwire: "
            + ", ".join(unclaimed) + " (add each to a surface in hardening/harness/surfaces.py)"
        )


def _cases_by_surface(cases: list[Case]) -> dict[str, list[Case]]:
    by: dict[str, list[Case]] = {s.key: [] for s in SURFACES}
    for case in cases:
        try:
            by[get_surface(case.surface).key].append(case)
        except ValueError as exc:
            raise ManualError(f"case {case.id} ({case.suite}): {exc}") from None
    return by


def render(results_dir: Path | str = DEFAULT_RESULTS) -> str:
    """The whole manual, as Markdown."""
    from hardening.suites import get_suite

    # 1. every source read and cross-checked before a line is written
    cases = get_suite("all")
    by_id = {c.id: c for c in cases}
    by_surface = _cases_by_surface(cases)
    sites = tripwire_sites()
    _check_sites(sites)
    measured = read_results(Path(results_dir))

    # 2. the document, top-down
    parts = [_preamble(measured), _matrix(cases)]
    for i, surface in enumerate(SURFACES, 1):
        parts.append(_surface_section(i, surface, by_surface[surface.key], sites, measured))
    parts.append(_compile_hardening(by_id, measured))
    parts.append(_causes())
    return "\n".join(parts).rstrip() + "\n"


def _preamble(measured: Measured) -> str:
    toc = [f"{i}. [{s.title}](#{i}-{_anchor(s.title)})" for i, s in enumerate(SURFACES, 1)]
    toc += [f"{len(SURFACES) + 1}. [Compile hardening](#compile-hardening)", f"{len(SURFACES) + 2}. [Named causes and exit codes](#named-causes-and-exit-codes)"]
    return "\n".join(
        [
            "# hardening — operator manual",
            "",
            "<!-- Generated by `hardening manual` from the code; do not edit. CI runs `hardening manual --check`. -->",
            "",
            "The contract of each operator surface of a tensor- and pipeline-parallel `torch.compile` server, the "
            "fail-fast checks (tripwires) that enforce it and where they live, the break-it tests that prove "
            "*crash, not hang*, and what to watch. Generated from the suite and fault registries, the runtime's "
            "docstrings, the shipped profiles and the latest benchmark results; edit those, then run "
            "`hardening manual`.",
            "",
            "**Budget** is the detection bound a case must meet: the last rank's exit minus the moment the fault "
            "fired. **Measured t_detect** is the median (min–max) over the benchmark's runs on the CPU profile:",
            "",
            *[f"- {line}" for line in measured.sources],
            "",
            "A surface's settings are shown with their value in every shipped profile:",
            "",
            *[f"- `{name}`: {blurb}" for name, blurb in _profile_blurbs().items()],
            "",
            *toc,
            "",
        ]
    )


def _profile_blurbs() -> dict[str, str]:
    """Each shipped profile's first sentence, from the comment that opens its YAML file."""
    from importlib import resources

    from hardening.harness.profile import available_profiles

    blurbs = {}
    for name in available_profiles():
        text = resources.files("hardening.profiles").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
        comment = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
        first = re.match(r"(.*?\.)(\s|$)", comment)
        if not first:
            raise ManualError(f"profiles/{name}.yaml: no opening comment saying what the profile is for")
        blurbs[name] = first.group(1)
    return blurbs


def _matrix(cases: list[Case]) -> str:
    rows = [list(matrix_row(c)) for c in cases]
    return "\n".join(
        ["## The matrix", "", "Every case of every suite, as `hardening list` prints it.", "", _table(list(MATRIX_HEADERS), rows), ""]
    )


def _causes() -> str:
    rows = [[f"`{name}`", str(cls.exit_code), first_paragraph(cls.__doc__)] for name, cls in NAMED_CAUSES.items()]
    rows.append(["(any other exception)", str(EXIT_UNEXPECTED), "Not a named cause: a bug, or the user's region raised."])
    rows.append(["(launcher gone)", str(EXIT_PARENT_GONE), "The rank's launcher died; the rank ended itself rather than be orphaned."])
    return "\n".join(
        [
            "## Named causes and exit codes",
            "",
            "A rank that ends on a named cause exits with its code, so its death reads the same without its record.",
            "",
            _table(["cause", "exit code", "meaning"], rows),
            "",
        ]
    )


# -- compile hardening -----------------------------------------------------------------

_CHECKLIST: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("The clean region passes every gate on every rank: no false crashes, at least one graph compiled.", ("C-00",), ()),
    ("Compile settings are identical on every rank, checked at init before the first compiled call.", ("C-01",), ("compile.enabled", "compile.backend", "compile.mode", "compile.fullgraph", "compile.dynamic")),
    ("The *effective* backends match (the SDPA kernel each rank really picks, matmul precision), not just the flags.", ("C-04",), ()),
    ("No flag that adds a collective differs between ranks (`HARDENING_*`, `TORCH_*`, `NCCL_*` variables are parity keys).", ("OM-05",), ("parity.ignore",)),
    ("Warmup runs in lockstep: the same number of calls on every rank (tickets), each call's shapes fixed by the leader's manifest and checked by every receiver.", ("W-01",), ("warmup_calls", "timeouts.compile")),
    ("Zero graph breaks (or a written budget), named with reason and file:line.", ("C-02",), ("gates.max_graph_breaks",)),
    ("Zero recompiles after warmup; one is named with the failing guard.", ("C-03",), ("gates.max_recompiles",)),
    ("Every compiled graph issues the same collectives on every rank, compared before it runs.", ("C-05",), ("compile.check_collectives",)),
    ("A stalled or dead rank is named by its peers within a second when its launcher watches it from outside (the harness's launchers); "
     "under a plain torchrun only its heartbeat tells, after `timeouts.peer_lost`. Never a process-group timeout.",
     ("H-01", "OM-13"), ("timeouts.heartbeat", "timeouts.node_lost", "timeouts.peer_lost")),
)
"""The P0 ship checklist: (item, the cases that prove it, the settings that bound it)."""

_TRIAGE = (
    "**Which is it?** The `CompileGateError` says: *graph break* (counted in `graph_breaks`, with each "
    "`break_reasons` entry) or *recompiled* (a `recompiles` count past `gates.max_recompiles` after warmup, "
    "with the first failing guard in `recompile_reasons`). A *skipped frame* (`skip_reasons`) is a break "
    "that made Dynamo give up on the whole frame: nothing compiled there at all.",
    "**Graph breaks first** (they multiply graphs and hide recompiles): rerun with "
    "`TORCH_LOGS=graph_breaks`; the gate already names the reason and the user's file:line. Under "
    "`compile.fullgraph: true` the first break raises at once.",
    "**Then recompiles:** `TORCH_LOGS=recompiles` (`recompiles_verbose` for every failing guard, `guards` for "
    "the whole guard set). A stride, dtype or shape guard means the inputs changed between warmup and steady "
    "state; a guard on a process group's name means groups were created in a different order.",
    "**The whole story:** `hardening suite compile --torch-trace` keeps each rank's `TORCH_TRACE` for "
    "`tlparse` (all ranks side by side when it is installed); a failing case keeps each rank's depyf dump "
    "(`rank<r>/depyf/`), passing cases drop theirs unless `--keep-artifacts`.",
    "**Acceptable steady state:** the gates below — 0 breaks and 0 recompiles after warmup on every shipped "
    "profile, the same graph signatures on every rank. A committed baseline (`hardening baseline update`, "
    "`suite compile --baseline FILE`) fails a merge on any new break, graph, recompile or collective.",
    "**When to stop tuning and restructure:** a break in the same place on every call (a `.item()`, a "
    "`print`, a data-dependent branch) belongs outside the region or in a tensor op; recompiles driven by "
    "shapes want declared dynamic dims or padding to a few buckets; a region that needs a break budget to "
    "pass is two regions.",
)

_DO: tuple[tuple[str, str | None], ...] = (
    ("Issue collectives through functional collectives (`torch.distributed._functional_collectives`) or "
     "in-place c10d calls that Dynamo rewrites to them; both trace into the graph without a break.", "C-00"),
    ("Let the traced `wait_tensor` follow its collective; reordering for overlap is the compiler's job.", None),
    ("Create process groups in the same order on every rank: a group's name is a guard and a constant in the graph.", None),
    ("Keep the region's collectives on the group declared for it (`mesh_pg` in a pipeline).", "OM-08"),
    ("Make every debug feature that adds a collective a parity key, so it is on for every rank or none.", "OM-05"),
)  # fmt: skip
_DONT: tuple[tuple[str, str | None], ...] = (
    ("`async_op=True` and `Work.wait()` in the region: each is a graph break.", "C-02"),
    ("Process-group or Work objects created, or Python side effects (logging, `.item()`, prints), inside the region.", "C-02"),
    ("A collective under a rank-dependent condition (`if rank == 0`) inside the compiled region (outside it, "
     "the watchdog ends the hang at `call_deadline`, naming the op and the line).", "C-05"),
    ("`torch.distributed.nn.functional` in a compiled region: torch itself refuses it under compile from 2.12.", None),
    ("Debug flags set on one rank only (a NaN-check all_reduce, a profiler step).", "OM-05"),
)  # fmt: skip
"""Rules for code review of a compiled distributed region, each with the case that
proves the check catching its violation (None: nothing here checks it)."""

_CUDA_GRAPHS = (
    "NCCL ops are launched on a CUDA stream and are stream-ordered locally; plus there is a cross-rank ordering "
    "contract: every rank must launch the same collectives in the same order, captured or not.",
    "Capturing NCCL collectives in CUDA graphs needs NCCL >= 2.9 and CUDA >= 11.3. Mixing captured and "
    "uncaptured NCCL operations of several communicators launched from one thread has been seen to deadlock "
    "(see `NCCL_GRAPH_MIXING_SUPPORT`).",
    "CUDAGraph Trees (`mode=\"reduce-overhead\"`) warm up on the first call, record on the second and replay "
    "after; a recompile adds another warmup and record. Run the same warmup calls with the same shapes on every "
    "rank so that recording happens in lock-step: recording order must match across ranks.",
    "Host syncs inside a captured region (`.item()`, `torch.unique`, data-dependent control flow) stall or "
    "break replay; keep them out.",
    "On CPU (gloo) `reduce-overhead` does nothing: CUDA graphs are skipped (`TORCH_LOGS=cudagraphs` says why). "
    "The shipped `h200` profile uses `max-autotune-no-cudagraphs`; CUDA graphs with NCCL are not exercised by "
    "any suite here.",
    "Whether a collective is captured must be the same on every rank: a rank that replays a graph holding an "
    "all_reduce while its peer runs the same all_reduce eagerly (a recompile, a cudagraph skip on one rank) is "
    "outside anything the ordering contract promises.",
)


def _compile_hardening(by_id: dict[str, Case], measured: Measured) -> str:
    from hardening.runtime import envelope, parity, pipeline, warmup

    def ids(case_ids: tuple[str, ...]) -> str:
        for cid in case_ids:
            if cid not in by_id:
                raise ManualError(f"the manual names case {cid}, which no suite has")
        return ", ".join(case_ids)

    out = ["## Compile hardening", "", "What a compiled distributed region needs before it ships, generated from the gates "
           "and cases that enforce each point.", "", "### P0 ship checklist", ""]  # fmt: skip
    for item, cases, keys in _CHECKLIST:
        for key in keys:
            setting(key)  # every key named exists
        bound = f"; bounded by {', '.join(f'`{k}`' for k in keys)}" if keys else ""
        out.append(f"- [ ] {item} (proved by {ids(cases)}{bound})")
    out += ["", f"The values of these settings in every shipped profile: [{len(SURFACES)}. {SURFACES[-1].title}]"
            f"(#{len(SURFACES)}-{_anchor(SURFACES[-1].title)}) and [4. {SURFACES[3].title}](#4-{_anchor(SURFACES[3].title)}).", ""]  # fmt: skip

    # The parity invariants: what is compared where.
    effective = sorted(_subscript_keys(parity.effective_backends))
    checked = sorted([*parity.RUNTIME_KEYS, *(f"effective.{k}" for k in effective)])
    out += ["### Parity invariants", "", "**Env-parity-checked at init** (`hardening.runtime.parity`): one hash per rank on "
            "the side channel, the full key table only on a mismatch; every rank raises the same `ParityError`.", ""]  # fmt: skip
    groups: dict[str, list[str]] = {}
    for key in checked:
        groups.setdefault(key.split(".", 1)[0] if "." in key else key, []).append(f"`{key}`")
    out += [_table(["group", "keys"], [[name, ", ".join(keys)] for name, keys in groups.items()])]
    out += ["", f"- Every environment variable starting with {', '.join(f'`{p}`' for p in parity.ENV_PREFIXES)} "
            "(as `env.<NAME>`), except the per-rank ones below.",
            "- The program's own keys (`Session(fingerprint=...)`; the harness adds its region target, dims, seed and "
            "call counts), which may not reuse a runtime key.",
            "- The call contract every rank describes to `control_plane()` (each tensor's name, shape, dtype and "
            "varying dims, and the frame's layout), before the first frame.",
            "- A pipeline's declared topology (before any group is built), then its depths, `queue_timeout` and the "
            "contracts of a chunk's inputs and a result's outputs.", ""]  # fmt: skip
    env_fields = attribute_docs(envelope.Envelope)
    rows = []
    for f in dataclasses.fields(envelope.Envelope):
        if not env_fields.get(f.name):
            raise ManualError(f"hardening.runtime.envelope:Envelope.{f.name}: the field has no docstring")
        rows.append([f"`{f.name}`", env_fields[f.name]])
    out += ["**Carried in the envelope every call** (checked by every receiver before the data plane; the input digest on "
            "the steady calls `drift.digest_every` selects):", "", _table(["envelope field", "what it carries"], rows), "",
            f"A pipeline message has its own header words ({', '.join(f'`{w}`' for w in pipeline.HEADER_FIELDS)}): "
            "no meta and no digest; a chunk's tensors are checked against the contract by name, shape and dtype "
            "before they are sent, not digested.", ""]  # fmt: skip
    out += ["**Best effort** (not compared, by design or by setting):", "",
            f"- Per-rank variables: {', '.join(f'`{v}`' for v in sorted(parity.PER_RANK_VARIABLES))}.",
            "- Keys matching the profile's `parity.ignore` patterns (the list itself is compared).",
            "- The values of warmup calls' inputs (never digested), of steady calls `drift.digest_every` skips, and of "
            "every pipeline chunk.",
            "- Weights when `drift.weights` is false; the region's outputs are never compared across ranks.", ""]  # fmt: skip

    out += ["### Compile-regression triage", ""] + [f"{i}. {step}" for i, step in enumerate(_TRIAGE, 1)] + [""]
    out += [_settings_table(["triage.artifacts", "triage.torch_trace"]), ""]

    out += ["### Compiled distributed regions: do and don't", "",
            "For code review; each rule names the case that proves its violation is caught, or says that nothing here checks it.", ""]  # fmt: skip

    def proof(cid: str | None) -> str:
        return f"caught: {ids((cid,))}" if cid else "not checked here"

    out += [f"- **Do:** {rule} ({proof(cid)})" for rule, cid in _DO]
    out += [f"- **Don't:** {rule} ({proof(cid)})" for rule, cid in _DONT]
    out += [""]

    paragraphs = [first_paragraph(p) for p in inspect.cleandoc(warmup.__doc__ or "").split("\n\n")[:2]]
    out += ["### Warmup protocol", "", " ".join(paragraphs), "",
            "- A warmup call is bounded by `timeouts.compile`, not by the call deadline (it may compile); a call "
            "blocked in a collective while every peer waits still ends at `call_deadline`.",
            "- Warmup calls are never input-digested; digests start with the steady calls (`drift.digest_every`).",
            "- After the last warmup call the compile gate closes on every rank's counters; with "
            f"`gates.max_recompiles: 0` ({_profiles_where('gates.max_recompiles', 0)}) the recompile guard then "
            "covers every later call.",
            "- Warmup calls are excluded from the steady-state counters the recompile gate judges.", ""]  # fmt: skip

    out += ["### CUDA graphs and NCCL", ""] + [f"- {line}" for line in _CUDA_GRAPHS] + [""]

    out += ["### Daily regression list", "", "Run on the `h200` profile every day "
            "(`hardening suite all --profile h200 --only " + ",".join(c for _, g in DAILY for c in g) + "`):", ""]  # fmt: skip
    rows = []
    for group, case_ids in DAILY:
        ids(case_ids)
        for cid in case_ids:
            c = by_id[cid]
            seen = measured_t_detect(c, measured) if c.expect.crash else "—"
            rows.append([group, cid, c.title, f"`{c.expect.describe(full=True)}`", seen])
    out += [_table(["guards", "case", "what breaks", "expected signature", "measured t_detect, s (CPU)"], rows), ""]
    return "\n".join(out)


def _profiles_where(key: str, value: Any) -> str:
    """Which shipped profiles set ``key`` to ``value``, said in words."""
    _, values = setting(key)
    names = [name for name, v in values.items() if v == value]
    return "every shipped profile" if len(names) == len(values) else ("the " + ", ".join(names) + " profile(s)" if names else "no shipped profile")


def _subscript_keys(fn: Any) -> set[str]:
    """String keys ``fn`` stores into a dict by subscript (``out["key"] = ...``), read
    from its source: the keys it may write on any device, not only this machine's."""
    keys = set()
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn)))):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant) and isinstance(target.slice.value, str):
                    keys.add(target.slice.value)
        if isinstance(node, ast.Dict):
            keys.update(k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
    return keys


# -- the command -----------------------------------------------------------------------


def write(out: Path, results_dir: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results_dir), encoding="utf-8")


def check(out: Path, results_dir: Path) -> list[str]:
    """The unified diff between ``out`` and what would be generated; empty when equal."""
    fresh = render(results_dir)
    if not out.is_file():
        return [f"{out}: missing (generate it with `hardening manual --out {out}`)"]
    committed = out.read_text(encoding="utf-8").splitlines()
    return list(difflib.unified_diff(committed, fresh.splitlines(), f"{out} (committed)", f"{out} (generated)", lineterm=""))
