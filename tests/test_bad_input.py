"""The bad-input corpus: what a hostile or careless user types, and what must come back.

Each input runs the installed ``hardening`` command in an empty directory of its own
and must end with the documented exit code, exactly one ``hardening:`` line naming the
source of the problem (flag, file, key, spec or target), no traceback, within its time
bound, and with no process left behind. Leftovers are found by a marker in the
environment of everything the run started (inherited by the fork server, the ranks and
the target-import child alike), not by process names.

The runs are independent, so the module runs them three at a time once and each
parametrized test reads its own result.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli_harness import hardening_command, left_behind, new_marker, run_each
from hardening.harness.cli import ExitCode

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

USAGE = ExitCode.USAGE_ERROR
QUICK = "timeouts: {setup: 4}\n"
FIFO = b"<fifo>"  # a file content that asks run_one for a named pipe instead
# Billion laughs: 10**8 strings by reference; a message that prints the value must not expand it.
BOMB = "steps:\n  - &a0 [" + ", ".join(["lol"] * 10) + "]\n" + "".join(
    f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 8)
)  # for targets that hang at import: the setup deadline ends them


@dataclass(frozen=True)
class Bad:
    id: str
    argv: tuple[str, ...]
    names: tuple[str, ...]
    """Substrings the one error line must contain (the source: flag, file, key, spec...)."""
    code: int = USAGE
    files: dict[str, str | bytes] = field(default_factory=dict)
    """Files to create in the run's directory first (a profile, a target module)."""
    bound_s: float = 20.0


def _suite(*extra: str) -> tuple[str, ...]:
    return ("suite", "compile", "--only", "C-00", *extra)


def _profile(text: str | bytes, *names: str, id: str) -> Bad:
    return Bad(id, _suite("--profile", "p.yaml"), ("p.yaml", *names), files={"p.yaml": text})


def _target(id: str, source: str, *names: str, target: str = "mod:build") -> Bad:
    return Bad(id, _suite("--profile", "q.yaml", "--target", target), ("--target", *names),
               files={"mod.py": source, "q.yaml": QUICK}, bound_s=60.0)  # fmt: skip


CORPUS = [
    # -- the command line -------------------------------------------------------------
    Bad("no-subcommand", (), ("required",)),
    Bad("unknown-flag", ("suite", "compile", "--bogus"), ("--bogus",)),
    Bad("unknown-command", ("bogus",), ("bogus",)),
    Bad("suite-without-name", ("suite",), ("name",)),
    Bad("ranks-not-int", ("suite", "compile", "--ranks", "x"), ("--ranks", "'x'")),
    Bad("triage-not-pid", ("triage", "abc"), ("'abc'",)),
    Bad("triage-no-such-pid", ("triage", "999999999"), ("999999999",)),
    Bad("unknown-suite", ("suite", "nope"), ("'nope'", "compile")),
    Bad("list-unknown-suite", ("list", "nope"), ("'nope'",)),
    Bad("only-empty", ("suite", "compile", "--only", ""), ("--only",)),
    Bad("only-commas", ("suite", "compile", "--only", ","), ("--only", "names no case")),
    Bad("only-unknown-id", ("suite", "compile", "--only", "C-99"), ("--only", "C-99", "C-01")),
    Bad("ranks-zero", ("suite", "compile", "--ranks", "0"), ("--ranks", "world.ranks")),
    Bad("ranks-negative", ("suite", "compile", "--ranks", "-2"), ("--ranks", "world.ranks")),
    Bad("ranks-huge", ("suite", "compile", "--ranks", "100000"), ("--ranks", "at most")),
    Bad("ranks-not-dividing-dims", ("suite", "compile", "--ranks", "3"), ("--ranks 3", "region.dims", "heads (4)")),
    Bad("launcher-unknown", ("suite", "compile", "--launcher", "mpirun"), ("--launcher", "'mpirun'")),
    Bad("nnodes-without-torchrun", _suite("--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29400"), ("--nnodes", "need launcher: torchrun")),
    Bad("nnodes-without-endpoint", _suite("--launcher", "torchrun", "--nnodes", "2"), ("--nnodes", "world.rdzv_endpoint", "HOST:PORT")),
    Bad("rdzv-endpoint-no-port", _suite("--launcher", "torchrun", "--nnodes", "2", "--rdzv-endpoint", "node0"), ("--rdzv-endpoint", "'node0'")),
    Bad("node-rank-beyond-nnodes", _suite("--launcher", "torchrun", "--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29400"), ("--node-rank", "0..1")),
    Bad("ranks-not-splitting-over-nodes", _suite("--ranks", "3", "--launcher", "torchrun", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29400"), ("--nnodes", "3 ranks do not split evenly over 2 nodes")),
    Bad("rdzv-endpoint-on-one-node", _suite("--launcher", "torchrun", "--rdzv-endpoint", "127.0.0.1:29400"), ("--rdzv-endpoint", "only for nnodes > 1")),
    Bad("rdzv-id-bad-characters", _suite("--launcher", "torchrun", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29400", "--rdzv-id", "a/b"), ("--rdzv-id", "'a/b'")),
    Bad("ranks-one-runs-nothing", ("suite", "compile", "--ranks", "1", "--only", "C-03"), ("no cases selected", "C-03 (needs 2)"), code=ExitCode.NO_CASES),
    Bad("profile-empty", ("suite", "compile", "--profile", ""), ("--profile",)),
    Bad("preload-unknown-module", ("suite", "compile", "--profile", "preload.yaml"), ("preload.yaml", "world.preload", "'no_such_lib_x'"),
        files={"preload.yaml": "world: {preload: [no_such_lib_x]}\n"}),
    Bad("preload-not-a-module-name", ("suite", "compile", "--profile", "preload2.yaml"), ("preload2.yaml", "world.preload", "not a module name"),
        files={"preload2.yaml": "world: {preload: ['os; rm -rf /']}\n"}),
    Bad("preload-the-regions-own-module", ("suite", "compile", "--profile", "preload3.yaml", "--target", "myregion.py:build"),
        ("preload3.yaml", "world.preload", "'myregion'", "region's own module"),
        files={"preload3.yaml": "world: {preload: [myregion]}\n", "myregion.py": "def build(ctx):\n    raise SystemExit('never runs')\n"}),
    Bad("profile-unknown-name", ("suite", "compile", "--profile", "nope"), ("'nope'", "cpu")),
    Bad("profile-missing-file", ("suite", "compile", "--profile", "missing.yaml"), ("missing.yaml", "not found")),
    Bad("profile-is-directory", ("suite", "compile", "--profile", "d.yaml"), ("d.yaml", "not a regular file"), files={"d.yaml/x": ""}),
    Bad("profile-is-dev-zero", ("suite", "compile", "--profile", "/dev/zero"), ("/dev/zero", "not a regular file")),
    Bad("json-is-a-fifo", _suite("--json", "fifo"), ("--json", "not a regular file"), files={"fifo": FIFO}),
    Bad("json-inside-artifacts", _suite("--artifacts", "run", "--json", "run/result.json"), ("--json", "inside the run directory")),
    Bad("junit-is-artifacts", _suite("--artifacts", "run", "--junit", "run"), ("--junit",)),
    Bad("target-empty", ("suite", "compile", "--target", ""), ("--target", "empty")),
    Bad("target-no-colon", ("suite", "compile", "--target", "mod"), ("--target", "module:function")),
    Bad("target-no-function", ("suite", "compile", "--target", "mod:"), ("--target", "'mod:'")),
    Bad("target-no-module", ("suite", "compile", "--target", ":build"), ("--target", "':build'")),
    Bad("target-not-a-module-name", ("suite", "compile", "--target", "a b:build"), ("--target", "'a b'")),
    Bad("target-file-missing", ("suite", "compile", "--target", "nope.py:build"), ("--target", "nope.py", "not found")),
    Bad("json-is-directory", _suite("--json", "out"), ("--json", "is a directory"), files={"out/keep": ""}),
    Bad("json-under-a-file", _suite("--json", "f.txt/r.json"), ("--json", "not a directory"), files={"f.txt": "x"}),
    Bad("json-in-proc", _suite("--json", "/proc/version/r.json"), ("--json", "/proc/version")),
    Bad("json-empty", _suite("--json", ""), ("--json", "empty")),
    Bad("junit-is-directory", _suite("--junit", "out"), ("--junit", "is a directory"), files={"out/keep": ""}),
    Bad("junit-under-a-file", _suite("--junit", "f.txt/r.xml"), ("--junit", "not a directory"), files={"f.txt": "x"}),
    Bad("json-and-junit-same-file", _suite("--json", "r", "--junit", "r"), ("--json and --junit",)),
    Bad("artifacts-is-a-file", _suite("--artifacts", "f.txt"), ("--artifacts", "not a directory"), files={"f.txt": "x"}),
    Bad("artifacts-not-empty", _suite("--artifacts", "d"), ("--artifacts", "not empty"), files={"d/x": ""}),
    Bad("artifacts-under-a-file", _suite("--artifacts", "f.txt/run"), ("--artifacts", "f.txt/run"), files={"f.txt": "x"}),
    Bad("artifacts-in-proc", _suite("--artifacts", "/proc/hardening-run"), ("--artifacts", "/proc/hardening-run")),
    # -- fault specs --------------------------------------------------------------------
    Bad("fault-empty", ("fault", ""), ("empty fault spec",)),
    Bad("fault-unknown", ("fault", "nope:rank=1"), ("'nope'", "known faults")),
    Bad("fault-rank-missing-value", ("fault", "stall:rank"), ("'rank'", "key=value")),
    Bad("fault-rank-not-int", ("fault", "stall:rank=one"), ("stall:rank=one", "rank must be")),
    Bad("fault-rank-too-big", ("fault", "stall:rank=9"), ("stall:rank=9", "rank 9")),
    Bad("fault-rank-negative", ("fault", "stall:rank=-1"), ("stall:rank=-1", "negative")),
    Bad("fault-rank-twice-in-one", ("fault", "stall:rank=0+0"), ("stall:rank=0+0", "twice")),
    Bad("fault-rank-given-twice", ("fault", "stall:rank=1:rank=0"), ("stall:rank=1:rank=0", "rank is given twice")),
    Bad("fault-call-negative", ("fault", "stall:call=-3"), ("stall:call=-3", "never happens")),
    Bad("fault-call-huge", ("fault", "stall:call=99999999999"), ("call=99999999999", "never happens")),
    Bad("fault-call-not-int", ("fault", "stall:call=x"), ("stall:call=x", "integer")),
    Bad("fault-unknown-param", ("fault", "stall:speed=3"), ("speed", "it takes")),
    Bad("fault-param-without-value", ("fault", "kill:call="), ("'call='", "key=value")),
    Bad("fault-negative-switch", ("fault", "stall:sleep=-1"), ("stall:sleep=-1", "switch")),
    Bad("fault-fullwidth-digit", ("fault", "stall:rank=\uff11"), ("rank must be",)),
    Bad("fault-rank-beyond-ranks-flag", ("fault", "kill:rank=3", "--ranks", "2"), ("kill:rank=3", "2 ranks")),
    # -- profile files --------------------------------------------------------------------
    _profile("timeouts: {setup: .nan}\n", "timeouts.setup", "finite", id="profile-nan-timeout"),
    _profile("timeouts: {case: .inf}\n", "timeouts.case", "finite", id="profile-inf-timeout"),
    _profile("timeouts: {pg: 100000000000}\n", "timeouts.pg", "at most", id="profile-huge-timeout"),
    _profile(b"steps: 4\n# caf\xe9\n", "UTF-8", id="profile-not-utf8"),
    _profile("region: {dims: {hiden: 64}}\n", "region.dims", "hiden", id="profile-unknown-dim"),
    _profile("region: {dims: {hidden: 0}}\n", "region.dims.hidden", id="profile-zero-dim"),
    _profile("gates: {max_graph_breaks: -1}\n", "gates.max_graph_breaks", id="profile-negative-gate"),
    _profile("triage: {timeout: -5}\n", "triage.timeout", id="profile-negative-triage-timeout"),
    _profile("steps: 2\nwarmup_calls: 1\nsteps: 3\n", "'steps'", "twice", "lines 1 and 3", id="profile-duplicate-key"),
    _profile("timeouts:\n  setup: 5\n  setup: 6\n", "'timeouts.setup'", "twice", id="profile-duplicate-nested-key"),
    _profile("timeouts: {setup: 5\n", "not valid YAML", id="profile-broken-yaml"),
    _profile("- steps: 1\n", "mapping", id="profile-top-level-list"),
    _profile("stepz: 4\n", "'stepz'", id="profile-unknown-key"),
    _profile("world: {ranks: two}\n", "world.ranks", "int", id="profile-ranks-string"),
    _profile("world: {ranks: true}\n", "world.ranks", id="profile-ranks-bool"),
    _profile("world: {backend: mpi}\n", "world.backend", id="profile-unknown-backend"),
    _profile("world: {backend: nccl, device: cpu}\n", "world.backend", "cuda", id="profile-nccl-on-cpu"),
    _profile("world: {launcher: slurm}\n", "world.launcher", id="profile-unknown-launcher"),
    _profile("compile: {backend: tvm}\n", "compile.backend", id="profile-unknown-compile-backend"),
    _profile("region: {dtype: float64}\n", "region.dtype", id="profile-unsupported-dtype"),
    _profile("region: {target: nocolon}\n", "region.target", id="profile-bad-target"),
    _profile("warmup_calls: 0\n", "warmup_calls", id="profile-no-warmup"),
    _profile("timeouts: {heartbeat: 2, peer_lost: 3}\n", "timeouts.peer_lost", id="profile-peer-lost-too-short"),
    _profile("timeouts: {node_lost: 0.1}\n", "timeouts.node_lost", id="profile-node-lost-below-three-beats"),
    _profile("parity: {ignore: ['']}\n", "parity.ignore", id="profile-empty-parity-ignore"),
    _profile("steps: !!python/object:os.system ls\n", "not valid YAML", id="profile-python-tag"),
    _profile("world: 2\n", "'world'", "mapping", id="profile-section-not-mapping"),
    _profile("timeouts: {setup: 5, setup: 6}\n", "'timeouts.setup'", "twice", id="profile-duplicate-key-dotted"),
    _profile(BOMB, "'steps'", "must be int", id="profile-alias-bomb"),
    _profile("steps: " + "[" * 100000 + "]" * 100000 + "\n", "nested too deeply", id="profile-deep-nesting"),
    _profile("{? [a, b] : 1}\n", "p.yaml", id="profile-unhashable-key"),
    _profile(" " * (2 << 20) + "\nsteps: 4\n", "larger than", id="profile-huge-file"),
    _profile("compile: {mode: bogus}\n", "compile.mode", id="profile-unknown-compile-mode"),
    _profile("compile: {backend: eager, mode: max-autotune}\n", "compile.mode", "inductor", id="profile-mode-without-inductor"),
    _profile("region: {seed: 100000000000000000000000}\n", "region.seed", id="profile-seed-overflow"),
    _profile("steps: 1000000000000000000000000000000\n", "'steps'", id="profile-absurd-steps"),
    _profile("region: {dims: {hidden: 1000000000}}\n", "region.dims.hidden", id="profile-absurd-dim"),
    _profile("timeouts: {pg: 0.000001}\n", "timeouts.pg", "at least", id="profile-tiny-timeout"),
    # -- the pipeline's sections, checked before any rank starts ------------------------------
    Bad("pp-depth-zero", ("suite", "pp", "--only", "PP-00", "--profile", "p.yaml"), ("p.yaml", "pipeline.depth_in"),
        files={"p.yaml": "pipeline: {depth_in: 0}\n"}),
    Bad("pp-kind-unknown", ("suite", "pp", "--only", "PP-00", "--profile", "p.yaml"), ("p.yaml", "pipeline.kind", "pp0"),
        files={"p.yaml": "pipeline: {kind: pp7}\n"}),
    Bad("pp-negative-stage", ("suite", "pp", "--only", "PP-00", "--profile", "p.yaml"), ("p.yaml", "pp.work.jitter_ms"),
        files={"p.yaml": "pp: {work: {jitter_ms: 50}}\n"}),
    Bad("pp-queue-outlives-deadline", ("suite", "pp", "--only", "PP-02", "--profile", "p.yaml"),
        ("p.yaml", "pipeline.queue_timeout", "call_deadline"), files={"p.yaml": "pipeline: {queue_timeout: 20}\n"}),
    Bad("pp-sweep-empty", ("suite", "pp", "--only", "O-01", "--profile", "p.yaml"), ("p.yaml", "pp.sweep"),
        files={"p.yaml": "pp: {sweep: []}\n"}),
    Bad("pp-only-needs-three", ("suite", "pp", "--only", "OM-07"), ("OM-07 (needs 3)",), code=ExitCode.NO_CASES),
    # -- targets: imported in a bounded child of the fork server, never in the runner ------
    _target("target-hangs-at-import", "import time\ntime.sleep(3600)\ndef build(ctx): pass\n", "did not finish", "mod.py:2"),
    _target("target-exits-0-at-import", "import os\nos._exit(0)\n", "ended the process", "exit code 0"),
    _target("target-segfaults-at-import", "import ctypes\nctypes.string_at(0)\n", "SIGSEGV"),
    _target("target-syntax-error", "def build(ctx)\n    pass\n", "SyntaxError", "mod.py:1"),
    _target("target-import-error", "import no_such_dependency\n", "no_such_dependency", "mod.py:1"),
    _target("target-raises-at-import", "x = 1 / 0\n", "ZeroDivisionError", "mod.py:1"),
    _target("target-sys-exit-at-import", "raise SystemExit(3)\n", "SystemExit"),
    _target("target-no-such-function", "def other(ctx): pass\n", "no callable 'build'"),
    _target("target-not-callable", "build = 3\n", "no callable 'build'"),
    _target("target-module-missing", "", "cannot import nosuchmod", target="nosuchmod:build"),
    _target("target-file-form-raises", "raise RuntimeError('boom')\n", "RuntimeError: boom", target="mod.py:build"),
]


@dataclass
class Ran:
    code: int | None
    stdout: str
    stderr: str
    elapsed: float
    left: list[int]


def run_one(bad: Bad, root: Path) -> Ran:
    cwd = root / bad.id
    cwd.mkdir(parents=True)
    for name, content in bad.files.items():
        path = cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == FIFO:
            os.mkfifo(path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    marker = new_marker()
    env = dict(os.environ, CORPUS_MARKER=marker)
    started = time.time()
    proc = subprocess.Popen(
        [*hardening_command(), *bad.argv], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=bad.bound_s + 30)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        code = None
    elapsed = time.time() - started
    return Ran(code, out, err, elapsed, left_behind(marker))


@pytest.fixture(scope="module")
def corpus_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Ran]:
    return run_each(CORPUS, run_one, tmp_path_factory.mktemp("corpus"), workers=3)


def test_the_corpus_is_large_and_distinct() -> None:
    assert len(CORPUS) >= 60
    assert len({b.id for b in CORPUS}) == len(CORPUS)
    assert len({(b.argv, tuple(sorted(b.files.items()))) for b in CORPUS}) == len(CORPUS)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("bad", CORPUS, ids=[b.id for b in CORPUS])
def test_bad_input(bad: Bad, corpus_runs: dict[str, Ran]) -> None:
    ran = corpus_runs[bad.id]
    print(ran.stdout)
    print(ran.stderr, file=sys.stderr)
    assert ran.code is not None, f"still running after {bad.bound_s + 30:g}s"
    assert ran.code == bad.code, f"exit {ran.code}, want {int(bad.code)}"
    assert ran.elapsed < bad.bound_s, f"took {ran.elapsed:.1f}s (bound {bad.bound_s:g}s)"
    assert "Traceback" not in ran.stderr and "Traceback" not in ran.stdout
    lines = [line for line in ran.stderr.splitlines() if line.startswith("hardening: ") and not line.startswith("hardening: suite ")]
    assert len(lines) == 1, f"want one hardening: line, got {lines}"
    for name in bad.names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"
    assert not ran.left, f"processes left behind: {ran.left}"
