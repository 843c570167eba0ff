"""Faults: what breaks, where and when (the nemesis). Never imports suites.

``HARDENING_FAULT`` holds one fault spec, identical on every rank; ``install_from_env``
installs it on the rank it runs in. ``FAULTS`` is the registry, by name.
"""

from __future__ import annotations

import os

from hardening.inject import compile as _compile
from hardening.inject import operator as _operator
from hardening.inject import pipeline as _pipeline
from hardening.inject.fault import Fault, FaultContext, FaultSpec, FaultSpecError, parse_spec

ENV_VAR = "HARDENING_FAULT"

FAULTS: dict[str, type[Fault]] = {cls.name: cls for cls in [*_compile.FAULTS, *_operator.FAULTS, *_pipeline.FAULTS]}


def fault_class(name: str) -> type[Fault]:
    try:
        return FAULTS[name]
    except KeyError:
        known = ", ".join(sorted(FAULTS))
        raise FaultSpecError(f"unknown fault {name!r}; known faults: {known}") from None


def validate_spec(text: str, *, world_size: int, calls: int | None = None) -> FaultSpec:
    """Parse and check a spec before any process starts (usage errors, exit 4);
    ``calls`` is the number of calls a case runs (a ``call=`` beyond them never fires)."""
    spec = parse_spec(text)
    fault_class(spec.name).validate(spec, world_size=world_size, calls=calls)
    return spec


def install_from_env(ctx: FaultContext) -> Fault | None:
    """Install the fault named by HARDENING_FAULT on this rank, if any."""
    text = os.environ.get(ENV_VAR, "").strip()
    if not text:
        return None
    spec = parse_spec(text)
    fault = fault_class(spec.name)(spec, ctx)
    fault.install()
    return fault


__all__ = [
    "ENV_VAR",
    "FAULTS",
    "Fault",
    "FaultContext",
    "FaultSpec",
    "FaultSpecError",
    "fault_class",
    "install_from_env",
    "parse_spec",
    "validate_spec",
]
