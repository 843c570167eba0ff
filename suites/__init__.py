"""Suites: which program, which fault, what must happen. Data only, no runtime code.

``SUITES`` maps a suite name to its ``build_cases``; ``all`` runs every suite in order.
"""

from __future__ import annotations

from typing import Callable

from hardening.harness.cases import Case
from hardening.suites import compile as _compile
from hardening.suites import operator as _operator
from hardening.suites import pp as _pp

SUITES: dict[str, Callable[[], list[Case]]] = {
    "compile": _compile.build_cases,
    "operator": _operator.build_cases,
    "pp": _pp.build_cases,
}


def get_suite(name: str) -> list[Case]:
    """Cases of a suite (``all``: every suite). ValueError names the known suites."""
    if name == "all":
        return [case for build in SUITES.values() for case in build()]
    try:
        return SUITES[name]()
    except KeyError:
        raise ValueError(f"unknown suite {name!r}; known suites: {', '.join([*SUITES, 'all'])}") from None
