"""The recompile guard: after warmup, any recompile on this rank raises at once."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from hardening.runtime.compile.counters import CompileCounters, exception_chain, normalize_reason

_GUARD_LINE = re.compile(r"^\s*-\s+(\S.*)$")


class RecompileGuard:
    """After warmup: any recompile on this rank raises at once, with the guard-failure text.

    Mechanisms, in order of preference (``.mechanism`` says which was used):

    * ``"config"``: ``torch._dynamo.config.patch(error_on_recompile=True)``. Fails only real
      recompiles and raises ``torch._dynamo.exc.RecompileError``. From torch 2.12 Dynamo's
      config is thread-local (ContextVar), so the guard must be entered **on the thread that
      calls the compiled region**; entered on another thread it silently guards nothing.
    * ``"stance"``: ``torch.compiler.set_stance("fail_on_recompile")`` when the config key is
      missing. Process-global (every thread), raises a plain ``RuntimeError`` ("Detected
      recompile ..."), and also fails a *first* compile, so enter it only after warmup.
      Its message carries the guard failures only from torch 2.10.
    * ``"none"``: neither exists; nothing is guarded (the recompile count still gates).

    ``mechanism="config"`` or ``"stance"`` forces one (ValueError if this torch lacks it).
    """

    _MECHANISMS = ("auto", "config", "stance")

    def __init__(self, *, mechanism: str = "auto") -> None:
        if mechanism not in self._MECHANISMS:
            raise ValueError(f"mechanism: must be one of {', '.join(self._MECHANISMS)}, got {mechanism!r}")
        self._wanted = mechanism
        self._cm: Any = None
        self.mechanism: str = "none"
        """Which mechanism guards the block: config, stance or none (set on __enter__)."""

    @staticmethod
    def _has_config_key() -> bool:
        try:
            import torch._dynamo

            return hasattr(torch._dynamo.config, "error_on_recompile")
        except Exception:
            return False

    @staticmethod
    def _has_stance() -> bool:
        try:
            import torch.compiler

            return callable(getattr(torch.compiler, "set_stance", None))
        except Exception:
            return False

    def __enter__(self) -> RecompileGuard:
        if self._cm is not None:
            raise ValueError("RecompileGuard is not re-entrant")
        use_config = self._wanted == "config" or (self._wanted == "auto" and self._has_config_key())
        use_stance = not use_config and self._wanted in ("auto", "stance") and self._has_stance()
        if self._wanted == "config" and not self._has_config_key():
            raise ValueError("mechanism: torch._dynamo.config has no error_on_recompile in this torch")
        if self._wanted == "stance" and not use_stance:
            raise ValueError("mechanism: torch.compiler.set_stance is not available in this torch")
        if use_config:
            import torch._dynamo

            cm = torch._dynamo.config.patch(error_on_recompile=True)
            self.mechanism = "config"
        elif use_stance:
            import torch.compiler

            cm = torch.compiler.set_stance("fail_on_recompile")
            self.mechanism = "stance"
        else:
            self.mechanism = "none"
            return self
        cm.__enter__()
        self._cm = cm
        return self

    def __exit__(self, *exc_info: Any) -> bool:
        cm, self._cm = self._cm, None
        if cm is not None:
            cm.__exit__(*exc_info)
        return False

    @staticmethod
    def reason(exc: BaseException) -> str | None:
        """The guard failures of a recompile error from either mechanism, else None.

        Returns the normalized ``0/0: tensor 'x' stride mismatch ...`` lines joined by "; ";
        when the message lists none (stance errors before torch 2.10), its first line.
        """
        try:
            from torch._dynamo.exc import RecompileError
        except Exception:  # name moved: only the text test remains
            RecompileError = ()  # type: ignore[assignment]  # noqa: N806
        for link in exception_chain(exc):
            text = str(link)
            if isinstance(link, RecompileError) or (isinstance(link, RuntimeError) and "Detected recompile" in text):
                lines = [m.group(1) for line in text.splitlines() if (m := _GUARD_LINE.match(line))]
                if lines:
                    return "; ".join(normalize_reason(line) for line in lines)
                return normalize_reason(text)
        return None

    @staticmethod
    def count_stopped(steady: CompileCounters, reason: str) -> CompileCounters:
        """``steady`` with the recompile this guard stopped counted: the guard raises
        before Dynamo's start callback fires, so the probe never counts it itself."""
        if steady.recompiles:
            return steady
        return dataclasses.replace(steady, recompiles=1, recompile_reasons=steady.recompile_reasons or [reason])
