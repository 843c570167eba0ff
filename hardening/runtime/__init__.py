"""The runtime: what a TP/PP rank imports to crash fast with a named cause.

Imports nothing from :mod:`hardening.harness`. One concept per module: ``parity`` (env
fingerprint), ``sidechannel`` (small exchanges through the store), ``envelope`` (the
per-call control frame), ``topology``, ``pipeline`` and ``overlap`` (the PP groups,
queues, epoch fence and overlap metrics), ``digest`` and ``drift`` (input and weight tripwires),
``kv_cache`` (the cache state machine), ``warmup`` (lockstep), ``watchdog`` (liveness
and deadlines), ``records`` (how a rank ends, its final record), ``store`` (the keys), ``activity`` (what a
thread is doing), ``compile/`` (probe, backend, counters, gates, guard, trace) and
``config`` (the settings). ``session`` puts them in their one correct order, and
``seams`` lists every point where a fault may act.

The public names (``Session``, ``record``, ``Spec``, ``KVCache``, ``RuntimeConfig``...)
load on first use.
"""

from typing import Any

_PUBLIC = {
    "Session": "hardening.runtime.session",
    "Spec": "hardening.runtime.session",
    "KVCache": "hardening.runtime.session",
    "Call": "hardening.runtime.session",
    "ControlPlane": "hardening.runtime.session",
    "Pipeline": "hardening.runtime.pipeline",
    "PipelineConfig": "hardening.runtime.config",
    "record": "hardening.runtime.records",
    "RankRecord": "hardening.runtime.records",
    "RuntimeConfig": "hardening.runtime.config",
    "Timeouts": "hardening.runtime.config",
    "CompileConfig": "hardening.runtime.config",
    "GateConfig": "hardening.runtime.config",
    "ParityConfig": "hardening.runtime.config",
    "DriftConfig": "hardening.runtime.config",
    "ConfigError": "hardening.runtime.config",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    # Lazy: the launcher side (store keys, records) must not pay for importing torch.
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'hardening.runtime' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
