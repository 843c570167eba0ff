"""The operator surfaces: every shipped case proves one, every pointer is well formed."""

from __future__ import annotations

import pytest

from hardening.harness.surfaces import BY_KEY, STAGES, SURFACES, get_surface
from hardening.suites import get_suite


def test_every_case_of_every_suite_names_a_known_surface() -> None:
    unknown = [(c.id, c.surface) for c in get_suite("all") if c.surface not in BY_KEY]
    assert not unknown, unknown


def test_every_surface_is_proved_by_a_case_and_its_tripwires_are_unique_and_placed() -> None:
    proved = {c.surface for c in get_suite("all")}
    assert proved == set(BY_KEY)
    codes = [w.code for s in SURFACES for w in s.tripwires]
    assert len(codes) == len(set(codes))
    assert all(w.where in STAGES and ":" in w.code for s in SURFACES for w in s.tripwires)
    assert len(BY_KEY) == len(SURFACES)


def test_an_unknown_surface_is_named_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown surface 'kv'; known surfaces: control-plane, .*kv-cache"):
        get_surface("kv")
