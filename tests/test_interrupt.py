"""The signal matrix: SIGINT, SIGTERM and SIGHUP, single and doubled, early, between
cases, inside a case and after the last one; SIGKILL of the fork server and of a rank;
a runner started with SIGINT ignored. Real runs of the installed command.

For each run: the exit code, the report (``result.json`` in the run directory and the
``--json``/``--junit`` files asked for) keeping every case that finished before the
signal, and no process left (found by a marker in the environment of everything the
run started). The moments are events read from the runner's own progress lines, not
sleeps, so they hold on a loaded 2-core box.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli_harness import hardening_command, left_behind, new_marker, run_each
from hardening.harness.cli import ExitCode
from hardening.suites import get_suite

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

BANNER = r"^hardening: suite "
CASE_DONE = r"^\[{k}/\d+\] \S+ +(completed|crashed|hung|survived|not_fired|early_crash)"
LONG = "steps: 100000\ntimeouts: {case: 120}\n"  # the control runs until something stops it
# PP-02's stalled stage holds the pipeline for half a minute: a case that is surely still
# running 1.5 s after it started (H-01 no longer is: its frozen rank is named in 0.2 s).
STALL = "timeouts: {call_deadline: 60, detect: 90}\npipeline: {queue_timeout: 30}\n"


def done(k: int) -> str:
    return CASE_DONE.format(k=k)


@dataclass(frozen=True)
class Act:
    when: str
    """Regex of the runner's stderr line that triggers this act."""
    what: str
    """A signal name sent to the runner, or ``kill-server`` / ``kill-rank`` (SIGKILL)."""
    delay_s: float = 0.0


@dataclass(frozen=True)
class Scenario:
    id: str
    argv: tuple[str, ...]
    acts: tuple[Act, ...]
    code: int
    kept: int
    """Cases the report must hold first, every one of them finished (pass or fail)."""
    tail: tuple[str, ...] = ()
    """Outcomes of the cases after those: ``interrupted`` (cut short), ``harness_error``."""
    exact: bool = True
    """False: the signal lands while cases follow each other quickly, so more cases than
    ``kept`` may finish first, and the one running then is cut short."""
    files: dict[str, str] = field(default_factory=dict)
    ignore_sigint: bool = False


COMPILE = ("suite", "compile", "--json", "r.json", "--junit", "r.xml")
LAST = len(get_suite("compile"))  # the suite grows: "after the last case" is counted, not written
MID = ("suite", "pp", "--ranks", "2", "--only", "PP-00,OM-09,PP-02", "--profile", "stall.yaml", "--json", "r.json", "--junit", "r.xml")
IN_LONG = r"^\[3/3\] PP-02 .*\.\.\.$"

SCENARIOS = [
    *(Scenario(f"{sig}-early", COMPILE, (Act(BANNER, sig),), ExitCode.INTERRUPTED, 0) for sig in ("SIGINT", "SIGTERM", "SIGHUP")),
    *(Scenario(f"{sig}-mid-case", MID, (Act(IN_LONG, sig, 1.5),), ExitCode.INTERRUPTED, 2, tail=("interrupted",), files={"stall.yaml": STALL})
      for sig in ("SIGINT", "SIGTERM", "SIGHUP")),
    *(Scenario(f"{sig}-after-last-case", COMPILE, (Act(done(LAST), sig),), ExitCode.INTERRUPTED, LAST) for sig in ("SIGINT", "SIGTERM", "SIGHUP")),
    Scenario("SIGINT-twice-between-cases", COMPILE, (Act(done(3), "SIGINT"), Act(done(3), "SIGINT", 0.05)), ExitCode.INTERRUPTED, 3,
             exact=False),
    Scenario("SIGINT-twice-mid-case", MID, (Act(IN_LONG, "SIGINT", 1.5), Act(IN_LONG, "SIGINT", 1.6)), ExitCode.INTERRUPTED, 2, tail=("interrupted",),
             files={"stall.yaml": STALL}),
    Scenario("SIGINT-twice-after-last-case", COMPILE, (Act(done(LAST), "SIGINT"), Act(done(LAST), "SIGINT", 0.05)), ExitCode.INTERRUPTED, LAST),
    Scenario("SIGTERM-then-SIGINT-early", COMPILE, (Act(BANNER, "SIGTERM"), Act(BANNER, "SIGINT", 0.1)), ExitCode.INTERRUPTED, 0),
    Scenario("SIGINT-ignored-then-SIGTERM", COMPILE, (Act(done(2), "SIGINT"), Act(done(4), "SIGTERM")), ExitCode.INTERRUPTED, 4,
             exact=False, ignore_sigint=True),
    Scenario("SIGKILL-fork-server-mid-case", ("suite", "compile", "--only", "C-00,C-01", "--profile", "long.yaml", "--json", "r.json"),
             (Act(r"^\[1/2\] C-00 .*\.\.\.$", "kill-server", 2.0),), ExitCode.INTERNAL_ERROR, 0, tail=("harness_error",),
             files={"long.yaml": LONG}),
    Scenario("SIGKILL-rank-mid-case", ("suite", "compile", "--only", "C-00,C-01", "--profile", "long.yaml", "--json", "r.json"),
             (Act(r"^\[1/2\] C-00 .*\.\.\.$", "kill-rank", 2.0),), ExitCode.FAILED, 2, files={"long.yaml": LONG}),
]  # fmt: skip


@dataclass
class Ran:
    cwd: Path
    code: int | None
    stdout: str
    stderr: str
    run_dir: Path | None
    left: list[int]
    acted: list[str]


def _server_and_ranks(pid: int) -> tuple[int | None, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    for child in children.get(pid, []):
        try:
            if b"hardening.harness.forkserver" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child, sorted(children.get(child, []))
        except OSError:
            continue
    return None, []


def _act(proc: subprocess.Popen[str], what: str) -> str:
    if what.startswith("SIG"):
        proc.send_signal(getattr(signal, what))
        return what
    end = time.time() + 30
    while time.time() < end:
        server, ranks = _server_and_ranks(proc.pid)
        victim = server if what == "kill-server" else (ranks[-1] if ranks else None)
        if victim is not None:
            os.kill(victim, signal.SIGKILL)
            return f"{what} {victim}"
        time.sleep(0.1)
    return f"{what}: nothing to kill"


def drive(sc: Scenario, root: Path) -> Ran:
    cwd = root / sc.id
    cwd.mkdir(parents=True)
    for name, text in sc.files.items():
        (cwd / name).write_text(text)
    marker = new_marker()

    def preexec() -> None:
        if sc.ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(
        [*hardening_command(), *sc.argv], cwd=cwd, env=dict(os.environ, CORPUS_MARKER=marker),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec,
    )  # fmt: skip
    pending = list(sc.acts)
    acted: list[str] = []
    err_lines: list[str] = []
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    timers = []
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            err_lines.append(line)
            while pending and re.search(pending[0].when, line.rstrip("\n")):
                act = pending.pop(0)
                if act.delay_s:
                    t = threading.Timer(act.delay_s, lambda a=act: acted.append(_act(proc, a.what)))
                    t.start()
                    timers.append(t)
                else:
                    acted.append(_act(proc, act.what))
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        for t in timers:
            t.join(timeout=5)
        reader.join(timeout=10)
    stderr = "".join(err_lines)
    m = re.search(r"run dir (\S+)", stderr)
    return Ran(cwd, proc.returncode, "".join(out), stderr, Path(m.group(1)) if m else None, left_behind(marker), acted)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Ran]:
    return run_each(SCENARIOS, drive, tmp_path_factory.mktemp("signals"), workers=2)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_signal(sc: Scenario, matrix: dict[str, Ran]) -> None:
    ran = matrix[sc.id]
    print(ran.stdout)
    print(ran.stderr)
    print("acted:", ran.acted)
    assert len(ran.acted) == len(sc.acts), f"not every act happened: {ran.acted}"
    assert ran.code == sc.code, f"exit {ran.code}, want {int(sc.code)}"
    assert "Traceback" not in ran.stderr
    assert not ran.left, f"processes left behind: {ran.left}"
    assert ran.run_dir is not None
    report = json.loads((ran.run_dir / "result.json").read_text())
    # Every report asked for is written, and says the same as the run's own.
    assert json.loads((ran.cwd / "r.json").read_text())["cases"] == report["cases"]
    if "--junit" in sc.argv:
        assert len(ET.parse(ran.cwd / "r.xml").getroot().iter("testcase").__next__().attrib) > 0
    cases = report["cases"]
    finished = 0
    while finished < len(cases) and cases[finished]["outcome"] not in ("interrupted", "harness_error"):
        assert cases[finished]["verdict"] in ("pass", "fail"), cases[finished]
        finished += 1
    rest = [c["outcome"] for c in cases[finished:]]
    if sc.exact:
        assert (finished, rest) == (sc.kept, list(sc.tail)), [(c["id"], c["outcome"]) for c in cases]
    else:
        assert finished >= sc.kept and rest in ([], ["interrupted"]), [(c["id"], c["outcome"]) for c in cases]
    for case in cases[finished:]:
        # A rank ended by the runner's own SIGTERM/SIGKILL is torn_down, never "killed by a
        # signal"; one that ended on its own before the teardown keeps its own end.
        assert all(r["signal"] is None for r in case["ranks"]), case["ranks"]
        assert any(r["error_class"] == "torn_down" for r in case["ranks"]), case["ranks"]
    stops = [a for a in ran.acted if a.startswith("SIG") and not (sc.ignore_sigint and a == "SIGINT")]
    assert report["interrupted"] is bool(stops)
    if stops:
        assert report["interrupted_by"] == stops[0]
        assert "INTERRUPTED" in ran.stdout


def test_sigkill_of_the_fork_server_ends_the_suite_at_once(matrix: dict[str, Ran]) -> None:
    ran = matrix["SIGKILL-fork-server-mid-case"]
    assert ran.run_dir is not None
    report = json.loads((ran.run_dir / "result.json").read_text())
    assert "fork server died" in report["harness_error"]
    assert [c["id"] for c in report["cases"]] == ["C-00"]  # C-01 is not tried against a dead server
    assert "[2/2]" not in ran.stderr


def test_sigkill_of_a_rank_is_that_case_s_finding_and_the_suite_goes_on(matrix: dict[str, Ran]) -> None:
    ran = matrix["SIGKILL-rank-mid-case"]
    assert ran.run_dir is not None
    control, c01 = json.loads((ran.run_dir / "result.json").read_text())["cases"]
    assert control["verdict"] == "fail" and "SIGKILL" in json.dumps(control["ranks"])
    assert c01["verdict"] == "pass"
