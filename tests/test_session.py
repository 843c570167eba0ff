"""The Session's surface without ranks: the library imports alone, its inputs are
checked with named errors, and @record ends every path with a record. The Session's
recipe on real ranks runs in tests/test_examples.py (examples/own_loop.py under torchrun
and every suite through the harness's worker, which is a Session user)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import hardening.runtime as hr
from hardening.runtime.config import ConfigError


def test_importing_the_runtime_loads_no_harness_module() -> None:
    code = (
        "import sys, hardening.runtime as hr; hr.Session; hr.record; hr.RuntimeConfig; "
        "import hardening.runtime.seams, hardening.runtime.store; "
        "print(sorted(m for m in sys.modules if m.startswith('hardening.harness') or m.startswith('hardening.suites')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_launcher_side_of_the_runtime_does_not_import_torch() -> None:
    code = "import sys, hardening.runtime.store, hardening.runtime.records; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_spec_names_a_dimension_that_cannot_vary() -> None:
    spec = hr.Spec(shape=(1, 8), dtype="int64", varying={-1: (1, 512)})
    assert spec.named("input_ids").varying == ((1, 1, 512),)
    with pytest.raises(ValueError, match=r"'input_ids'.*varying \{2: \(1, 4\)\}"):
        hr.Spec(shape=(1, 8), dtype="int64", varying={2: (1, 4)}).named("input_ids")


def test_runtime_config_from_yaml_takes_only_runtime_keys(tmp_path: Path) -> None:
    good = tmp_path / "serve.yaml"
    good.write_text("timeouts: {call_deadline: 5}\ncompile: {backend: aot_eager}\n")
    cfg = hr.RuntimeConfig.from_yaml(good)
    assert cfg.timeouts.call_deadline == 5 and cfg.compile.backend == "aot_eager"
    harness_key = tmp_path / "harness.yaml"
    harness_key.write_text("steps: 4\n")
    with pytest.raises(ConfigError, match=r"harness.yaml: unknown key 'steps' \(known here: timeouts, compile"):
        hr.RuntimeConfig.from_yaml(harness_key)
    bad = tmp_path / "bad.yaml"
    bad.write_text("timeouts: {peer_lost: 0.1}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'timeouts.peer_lost' must exceed two heartbeats"):
        hr.RuntimeConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        hr.RuntimeConfig.from_yaml(tmp_path / "missing.yaml")


def test_from_env_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "HARDENING_STORE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="RANK, WORLD_SIZE not set"):
        hr.Session.from_env()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="set MASTER_ADDR and MASTER_PORT"):
        hr.Session.from_env()


@pytest.mark.parametrize(
    "body, code, error",
    [
        ("pass", 0, None),
        ("raise SystemExit(0)", 0, None),
        ("raise SystemExit(3)", 10, "SystemExit"),
        ("raise KeyError('tokenizer')", 10, "KeyError"),
        ("from hardening.errors import DriftError; raise DriftError('weights moved')", 13, "DriftError"),
    ],
)
def test_record_ends_every_path_with_a_record_and_the_cause_s_exit_code(
    tmp_path: Path, body: str, code: int, error: str | None
) -> None:
    # Before any Session: nobody to tell, but the record and the exit code still say why.
    from hardening.errors import DriftError

    if error == "DriftError":
        code = DriftError.exit_code
    script = tmp_path / "serve.py"
    script.write_text(f"import hardening.runtime as hr\n\n@hr.record\ndef main():\n    {body}\n\nmain()\n")
    env = {"RANK": "1", "WORLD_SIZE": "2", "HARDENING_RECORD": str(tmp_path / "r1.json"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == code, out.stderr
    record = json.loads((tmp_path / "r1.json").read_text())
    assert record["rank"] == 1 and record["error_class"] == error and record["ok"] is (error is None)


def test_record_is_the_decorator_even_after_the_runtime_modules_are_imported() -> None:
    # The harness's fork server imports every runtime module before a program runs.
    code = "import hardening.runtime.session, hardening.runtime as hr; print(callable(hr.record) and hr.record.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "hardening.runtime.records", out.stderr
