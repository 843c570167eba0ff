"""The counting backend: torch.compile through the probe, then the real compiler.

Every Dynamo graph is noted by the probe (its signature, then a counter sync) and handed
to ``eager``, ``aot_eager`` or ``inductor`` (with the inductor mode applied here, since
torch.compile refuses ``mode=`` together with a callable backend); the compiled graph
notes the collectives it issued in :data:`hardening.runtime.activity.ISSUED`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hardening.errors import GroupError

from hardening.runtime import activity

if TYPE_CHECKING:
    from hardening.runtime.compile.collectives import CollectiveCheck
    from hardening.runtime.compile.probe import CompileProbe
    from hardening.runtime.config import CompileConfig

INNER_BACKENDS = ("eager", "aot_eager", "inductor")
"""Backends the counting backend can wrap (the values CompileConfig.backend accepts)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupRule:
    """The process groups a compiled region may issue collectives on (a pipeline's mesh
    region: ``mesh_pg`` alone). Any other group is refused before the graph runs."""

    allowed: Mapping[str, str]
    """Backend group name -> how the topology declares it (for messages)."""
    known: Mapping[str, str] = field(default_factory=dict)
    """The rank's other groups, so that a refusal names the group the region used."""
    rank: int = 0


def group_problems(gm: Any, rule: GroupRule) -> list[str]:
    """One line per collective of ``gm`` on a group ``rule`` does not allow: its op, where
    the region issues it, the group it names and the group declared for it."""
    problems = []
    for node in activity.graph_collective_nodes(gm):
        name = activity.collective_group(node)
        if name in rule.allowed:
            continue
        used = rule.known.get(name, f"group {name!r}, which is not one of this rank's declared groups")
        signature = activity.collective_signature(node)
        what, _, where = signature.partition(" at ")
        problems.append(
            f"{what.split(' on group ')[0]}{' at ' + where if where else ''} is issued on {used}; "
            f"declared for the region: {', '.join(rule.allowed.values())}"
        )
    return problems


def refusing(problems: list[str], rank: int) -> Callable[..., Any]:
    """A compiled graph that raises GroupError instead of running: nothing reaches the backend."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise GroupError(f"rank {rank}: the compiled region's collective refused before the backend: " + "; ".join(problems))

    return refuse


def counting_backend(
    probe: CompileProbe,
    inner: str,
    *,
    mode: str | None = None,
    check: CollectiveCheck | None = None,
    groups: Callable[[], GroupRule | None] | None = None,
) -> Callable[..., Any]:
    """A torch.compile backend that records each Dynamo graph, then compiles it with ``inner``.

    ``mode`` is applied here because torch.compile refuses ``mode=`` with a callable
    backend; only inductor has modes. With ``check``, a graph's collectives are agreed
    with every peer's before it runs in warmup. ``groups`` returns the rule in force when
    a graph compiles (None: any group); a graph with a collective on another group never
    runs: calling it raises GroupError.
    """
    if inner not in INNER_BACKENDS:
        raise ValueError(f"backend: must be one of {', '.join(INNER_BACKENDS)}, got {inner!r}")
    compile_fn = _inner_compiler(probe, inner, mode)

    def backend(gm: Any, example_inputs: Any, **kwargs: Any) -> Any:
        probe.note_graph(gm)
        rule = groups() if groups is not None else None
        if rule is not None:
            problems = group_problems(gm, rule)
            if problems:
                return refusing(problems, rule.rank)
        compiled = compile_fn(gm, example_inputs, **kwargs)
        if check is not None:
            compiled = check.wrap(gm, compiled)
        return activity.record_graph(gm, compiled)

    backend.__name__ = f"counting_{inner}"
    return backend

def _inner_compiler(probe: CompileProbe, inner: str, mode: str | None) -> Callable[..., Any]:
    import torch._dynamo

    if mode is None or mode == "default":
        return torch._dynamo.lookup_backend(inner)
    if inner != "inductor":
        probe.note(f"mode {mode!r} ignored: only the inductor backend has modes (backend is {inner!r})")
        return torch._dynamo.lookup_backend(inner)
    try:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx
    except Exception:
        probe.note(f"inductor mode options unavailable: mode {mode!r} ignored")
        return torch._dynamo.lookup_backend(inner)
    try:
        options = dict(list_mode_options(mode))
    except (RuntimeError, KeyError) as exc:
        raise ValueError(f"mode: unknown inductor mode {mode!r} ({exc})") from None
    try:
        accepts_patches = "config_patches" in inspect.signature(compile_fx).parameters
    except (TypeError, ValueError):
        accepts_patches = False
    if not accepts_patches:
        probe.note(f"compile_fx takes no config_patches: mode {mode!r} ignored")
        return torch._dynamo.lookup_backend(inner)

    def inductor_with_mode(gm: Any, example_inputs: Any, **kwargs: Any) -> Any:
        patches = {**options, **(kwargs.pop("config_patches", None) or {})}
        return compile_fx(gm, example_inputs, config_patches=patches, **kwargs)

    return inductor_with_mode


def compile_region(
    module_or_fn: Any,
    cfg: CompileConfig,
    probe: CompileProbe,
    check: CollectiveCheck | None = None,
    groups: Callable[[], GroupRule | None] | None = None,
) -> Callable[..., Any]:
    """``torch.compile`` the region through the probe's counting backend, or return it as is.

    ``mode`` goes to the counting backend, not torch.compile, which refuses a mode together
    with a callable backend.
    """
    if not cfg.enabled:
        return module_or_fn
    import torch

    return torch.compile(
        module_or_fn,
        backend=counting_backend(probe, cfg.backend, mode=cfg.mode, check=check, groups=groups),
        fullgraph=cfg.fullgraph,
        dynamic=cfg.dynamic,
    )


