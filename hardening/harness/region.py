"""The region contract: what the harness drives on every rank, and how it is built.

A :class:`Region` is an uncompiled ``nn.Module`` plus a function that makes the inputs
of call ``k`` (identical on every rank) and optional parity keys. It is built by a
factory ``build(ctx) -> Region`` named as ``module:function`` or
``path/to/file.py:function``; the reference region ships through the same mechanism.

Faults never patch anything here: they act through :mod:`hardening.runtime.seams`.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hardening.harness.profile import Profile


@dataclass(kw_only=True, slots=True)
class RegionContext:
    """Everything a region factory may use to build its rank's shard."""

    rank: int
    """This rank."""

    world_size: int
    """Number of ranks (the TP degree)."""

    device: "torch.device"
    """Device the region must live on."""

    dtype: "torch.dtype"
    """Parameter and activation dtype from ``region.dtype``."""

    group: Any
    """Data-plane process group (pass it to functional collectives)."""

    dims: dict[str, int]
    """``region.dims`` of the profile."""

    seed: int
    """``region.seed``: weights and inputs must derive from it to be identical across ranks."""

    profile: "Profile"
    """The whole profile, for factories that need more."""


@dataclass(kw_only=True, slots=True)
class Region:
    """What the harness drives: a module and the inputs of each call."""

    module: "nn.Module"
    """The rank's shard, uncompiled (the harness compiles it per profile)."""

    make_inputs: Callable[[int], tuple["torch.Tensor", ...]]
    """Inputs of call ``k``; must be identical on every rank (the harness checks nothing here yet)."""

    parity_keys: dict[str, Any] = field(default_factory=dict)
    """Extra keys that must be equal on every rank (checked with the environment fingerprint)."""

    input_names: tuple[str, ...] = ()
    """Names of the inputs in the envelope manifest (default ``input0``, ``input1``, ...)."""

    weight_manifest: dict[str, dict[int, list[int]]] | None = None
    """Expected fingerprint (``hardening.runtime.digest.checksum``) of each parameter's shard, per rank."""

    replicated_params: tuple[str, ...] = ()
    """Parameters that must be bit-identical on every rank."""

    reset_cache: Callable[[], None] | None = None
    """Clears the region's KV cache (called on a ``reset`` envelope, outside the compiled region)."""

    varying_dims: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)
    """Input dimensions whose size may change from call to call, with their bounds:
    ``{"input_ids": {1: (1, 512)}}`` (tokens). The envelope contract accepts those and
    refuses every other change (dtype, rank, any undeclared dimension); whether a change
    recompiles is the compile gate's business (``compile.dynamic``)."""


RegionFactory = Callable[[RegionContext], Region]


def parse_target(target: str) -> tuple[str, str]:
    """``(module or file, function)`` of a target; ValueError if it has neither form.
    Pure: it runs no user code and may be called anywhere (the CLI checks flags with it)."""
    module_name, sep, attr = target.strip().rpartition(":")
    if not sep or not module_name or not attr or not attr.isidentifier():
        raise ValueError(f"region target {target!r} must be 'module:function' or 'path/to/file.py:function'")
    if module_name.endswith(".py"):
        if not Path(module_name).is_file():
            raise ValueError(f"region target {target!r}: file {module_name} not found")
    elif not all(part.isidentifier() for part in module_name.split(".")):
        raise ValueError(f"region target {target!r}: {module_name!r} is not a module name (or a path ending in .py)")
    return module_name, attr


def load_factory(target: str) -> RegionFactory:
    """Import the target and return its factory; ValueError names what is wrong.

    This runs user code: the harness calls it only in a child of the fork server (under
    the setup deadline) and in the ranks, never in the runner. A module target resolves
    from the current directory first, as ``python -m`` would, but only the target's own
    top-level module does: the directory never goes on ``sys.path``, so a stray
    ``numpy.py`` there is never imported in its place."""
    module_name, attr = parse_target(target)
    if module_name.endswith(".py"):
        path = Path(module_name)
        name = "hardening_user_region_" + path.stem
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        _import_top_level_from_cwd(module_name.partition(".")[0])
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                raise ValueError(f"cannot import {module_name}: {exc} (looked in {os.getcwd()} and sys.path)") from None
            raise
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{module_name} has no callable {attr!r}")
    return factory


def _import_top_level_from_cwd(top: str) -> None:
    if top in sys.modules:
        return
    spec = importlib.machinery.PathFinder.find_spec(top, [os.getcwd()])
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[top] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(top, None)
        raise


def describe_import_error(exc: BaseException) -> str:
    """One line for a target that failed to import: the error and the user's line."""
    if isinstance(exc, ValueError) and exc.__traceback__ is not None and _raised_here(exc):
        return str(exc)
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}:{exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _is_import_machinery(f.filename)]
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    text = (str(exc).splitlines() or [""])[0]
    if isinstance(exc, ModuleNotFoundError) and exc.name and _in_cwd(exc.name.partition(".")[0]):
        where += (
            f"; {exc.name.partition('.')[0]} is in the current directory, which is not on sys.path: "
            "make the target a package, or set PYTHONPATH=. if you mean it"
        )
    return f"importing it raised {type(exc).__name__}: {text}{where}" if text else f"importing it raised {type(exc).__name__}{where}"


def _in_cwd(top: str) -> bool:
    return importlib.machinery.PathFinder.find_spec(top, [os.getcwd()]) is not None


def _raised_here(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename == __file__


def _is_import_machinery(filename: str) -> bool:
    return filename == __file__ or filename.startswith("<frozen") or "importlib" in filename


def build_region(target: str, ctx: RegionContext) -> Region:
    """Build this rank's region from its factory."""
    region = load_factory(target)(ctx)
    if not isinstance(region, Region):
        raise TypeError(f"region factory {target} returned {type(region).__name__}, not hardening.harness.region.Region")
    return region


def make_call_inputs(region: Region, call_id: int) -> tuple["torch.Tensor", ...]:
    """Inputs of call ``call_id``, made on the leader only (then sent in the envelope)."""
    return tuple(region.make_inputs(call_id))


def varying_of(region: Region, name: str, ndim: int) -> tuple[tuple[int, int, int], ...]:
    """The contract's ``varying`` entries of input ``name``; ValueError if a declared
    dimension or bound cannot be one."""
    out = []
    for dim, bounds in sorted(region.varying_dims.get(name, {}).items()):
        if not -ndim <= dim < ndim:
            raise ValueError(f"Region.varying_dims[{name!r}]: dim {dim} does not exist in a {ndim}-d input")
        lo, hi = bounds
        if not 0 <= lo <= hi:
            raise ValueError(f"Region.varying_dims[{name!r}][{dim}]: bounds {bounds} must be 0 <= low <= high")
        out.append((dim % ndim, int(lo), int(hi)))
    return tuple(out)


def input_names(region: Region, count: int) -> tuple[str, ...]:
    return region.input_names or tuple(f"input{i}" for i in range(count))
