"""The JSON report: ``SuiteResult.to_json()`` as a strict, atomically written file.

This module owns the on-disk JSON format that dashboards read (its shape and
``schema_version`` come from :mod:`hardening.harness.results`) and the atomic-write helper the
file writers share: a reader never sees a half-written report.
"""

from __future__ import annotations

import enum
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from hardening.harness.results import SuiteResult


def write_json(result: SuiteResult, path: str | os.PathLike[str]) -> None:
    """Write ``result`` as indented, key-sorted JSON to ``path`` (parents created, atomic).

    Non-finite floats (NaN, +/-inf) become ``null`` and values JSON cannot express
    (paths, enums, sets, tuples, other objects) are converted, so the file is always
    strict JSON; ``allow_nan=False`` guards the result.
    """
    text = json.dumps(json_safe(result.to_json()), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_safe(value: Any) -> Any:
    """A copy of ``value`` made only of dict/list/str/int/finite float/bool/None."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return json_safe(value.value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((json_safe(v) for v in value), key=repr)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``,
    with the mode a plain ``open`` would give (umask honoured: a CI uploader running as
    another user must be able to read it). An existing path that is not a regular file
    (a device, a FIFO) is written through, never renamed over: replacing ``/dev/null``
    with a file would break the machine."""
    target = Path(path)
    if target.exists() and not target.is_file():
        with open(target, "wb") as fh:
            fh.write(data)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
