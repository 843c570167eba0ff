"""Shared fixtures for the tests: a real ``torch.distributed.TCPStore`` master for side-channel tests.

The plain helpers that go with it (a side channel per rank, running one body per rank in threads)
live in ``tests/store_harness.py``, imported by the test modules that need them.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from typing import Iterator

import pytest
import torch.distributed as dist


def pytest_sessionstart(session: pytest.Session) -> None:
    # Most tests start `sys.executable` processes that import hardening from the install,
    # not from this checkout: an interpreter without it would fail them all, one by one.
    probe = subprocess.run([sys.executable, "-c", "import hardening"], cwd="/", capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        raise pytest.UsageError(
            f"{sys.executable} cannot import hardening outside this checkout: install it first "
            '(pip install -e ".[dev]") or run pytest with the interpreter that has it'
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `pytest --hardening-suite compile` in this checkout is a user's gate run, not a run of
    # the tool's own tests: with no test path given, only the suite's items are kept. (In a
    # user's project the plugin's items run beside theirs, as they should.)
    if not config.getoption("hardening_suite", default=None) or config.args_source is not pytest.Config.ArgsSource.TESTPATHS:
        return
    own = [item for item in items if not item.nodeid.startswith("hardening.")]
    if own:
        config.hook.pytest_deselected(items=own)
        items[:] = [item for item in items if item.nodeid.startswith("hardening.")]


@pytest.fixture
def store_port() -> Iterator[int]:
    """Port of a fresh TCPStore master on 127.0.0.1 (port 0: the OS picks one); closed after the test."""
    master = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False)
    try:
        yield master.port
    finally:
        del master


@pytest.fixture
def probe() -> Iterator[object]:
    """An installed ``CompileProbe`` on a freshly reset Dynamo, removed after the test."""
    import torch._dynamo
    from torch._dynamo.utils import counters as dynamo_counters

    from hardening.runtime.compile.probe import CompileProbe

    # reset() clears registered callbacks, so it must come before install(), never after.
    torch._dynamo.reset()
    dynamo_counters.clear()
    p = CompileProbe()
    p.install()
    yield p
    p.remove()
    torch._dynamo.reset()
