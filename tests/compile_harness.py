"""Shared by the tests of ``hardening.runtime.compile`` (the ``probe`` fixture is in
conftest.py): the eager compile config and a small input."""

from __future__ import annotations

import torch

from hardening.runtime.config import CompileConfig

EAGER = CompileConfig(backend="eager")


def _x() -> torch.Tensor:
    return torch.randn(4, 4)
