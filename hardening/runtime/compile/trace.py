"""torch's structured compile trace (``TORCH_TRACE``, read with ``tlparse``), per rank."""

from __future__ import annotations

import os

TRACE_DIR = "torch_trace"
"""Name of the trace directory inside a rank's directory."""


def start_torch_trace(directory: str) -> str:
    """Write this process's structured compile trace (what ``TORCH_TRACE`` turns on; read
    it with ``tlparse``) into ``directory``. Returns the directory, or ``unavailable: why``:
    an artifact is best effort, never a gate.

    ``TORCH_TRACE`` is read once, when torch sets up its logging at import, which under the
    fork server happened in the server, without a directory: the trace handler is rebuilt
    here, in the rank, before anything compiles."""
    try:
        from torch._logging import _internal as logs

        if not all(hasattr(logs, name) for name in ("_init_logs", "LOG_TRACE_HANDLER", "TRACE_ENV_VAR")):
            return "unavailable: this torch has no structured trace logging to redirect"
        os.makedirs(directory, exist_ok=True)
        os.environ[logs.TRACE_ENV_VAR] = directory
        logs.LOG_TRACE_HANDLER = None  # built without a directory; _init_logs keeps an existing one
        logs._init_logs()
        return directory
    except Exception as exc:  # noqa: BLE001 - best effort, reported in the record
        return f"unavailable: {type(exc).__name__}: {exc}"

