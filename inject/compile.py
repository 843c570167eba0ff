"""Compile-family faults (C-01..C-05, W-01): divergence in how ranks compile and warm up."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from hardening.inject.fault import Fault


class CompileOnOneRank(Fault):
    name = "compile_one_rank"
    matrix_id = "C-01"
    summary = "flip compile.enabled on one rank (compile on, eager elsewhere)"
    target = "hardening.runtime.seams:resolve_compile_config"

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def resolve_compile_config(cfg: Any) -> Any:
            cfg = original(cfg)
            if not self.acts_here:
                return cfg
            self.fire()
            return dataclasses.replace(cfg, enabled=not cfg.enabled)

        return resolve_compile_config


class GraphBreak(Fault):
    name = "graph_break"
    matrix_id = "C-02"
    summary = "insert torch._dynamo.graph_break() into the region's forward"
    target = "hardening.runtime.seams:module_to_compile"
    default_ranks = "all"

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def module_to_compile(module: Any) -> Any:
            module = original(module)
            if not self.acts_here:
                return module

            def with_break(forward: Callable[..., Any]) -> Callable[..., Any]:
                def forward_with_break(*args: Any, **kwargs: Any) -> Any:
                    out = forward(*args, **kwargs)
                    torch._dynamo.graph_break()
                    return out

                return forward_with_break

            self.fire()
            return replace_forward(module, with_break)

        return module_to_compile


class ConditionalCollective(Fault):
    name = "conditional_collective"
    matrix_id = "C-05"
    summary = "an all_reduce of the region's first input that only this rank issues, inside the compiled region"
    target = "hardening.runtime.seams:module_to_compile"

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def module_to_compile(module: Any) -> Any:
            module = original(module)
            if not self.acts_here:
                return module
            self.fire()
            return replace_forward(module, with_world_all_reduce)

        return module_to_compile


def with_world_all_reduce(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` preceded by a functional all_reduce of its first tensor input on the
    world group, inside whatever compiles it."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    def forward_with_collective(*args: Any, **kwargs: Any) -> Any:
        # ``x + all_reduce(x) * 0``: the region's value is unchanged and the collective is
        # used, so no compiler may drop it.
        args_l, kwargs_d = list(args), dict(kwargs)
        for holder, key in [(args_l, i) for i in range(len(args_l))] + [(kwargs_d, k) for k in kwargs_d]:
            x = holder[key]
            if isinstance(x, torch.Tensor) and x.dtype != torch.bool:
                holder[key] = x + funcol.all_reduce(x, "sum", dist.group.WORLD) * 0
                break
        return forward(*args_l, **kwargs_d)

    return forward_with_collective


def replace_forward(module: Any, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Any:
    """``module`` with its forward replaced by ``make(forward)``; a module stays the
    object the caller holds (its parameters, hooks and name), a function is replaced."""
    forward = module.forward if isinstance(module, torch.nn.Module) else module
    if isinstance(module, torch.nn.Module):
        module.forward = make(forward)
        return module
    return make(forward)


class RecompileAfterWarmup(Fault):
    name = "recompile"
    matrix_id = "C-03"
    summary = "feed one rank a same-shape, different-stride input after warmup (guard failure)"
    target = "hardening.runtime.seams:call_inputs"
    int_params = ("call",)

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def call_inputs(tensors: dict[str, torch.Tensor], call_id: int) -> dict[str, torch.Tensor]:
            tensors = original(tensors, call_id)
            if not self.acts_here or call_id != self.at_call():
                return tensors
            for name, t in tensors.items():
                other = restrided(t) if isinstance(t, torch.Tensor) else None
                if other is not None:
                    self.fire(touched=name)
                    return {**tensors, name: other}
            self.skip("no input has a dimension larger than 1 to restride")
            return tensors

        return call_inputs


def restrided(t: torch.Tensor) -> torch.Tensor | None:
    """The same values and shape with the stride of the last dimension larger than 1
    doubled (a view into a buffer twice as long): only the guards can tell. ``(1, T)``
    token ids qualify; None when every dimension is 1."""
    dims = [d for d in range(t.dim()) if t.shape[d] > 1]
    if not dims:
        return None
    d = dims[-1]
    shape = list(t.shape)
    shape[d] *= 2
    index = [slice(None)] * t.dim()
    index[d] = slice(None, None, 2)
    view = t.new_empty(shape)[tuple(index)]
    view.copy_(t)
    return view


class BackendDivergence(Fault):
    name = "backend_divergence"
    matrix_id = "C-04"
    summary = "disable the flash SDPA kernel on one rank (attention resolves to another kernel)"
    target = "hardening.runtime.seams:apply_backend_settings"

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def apply_backend_settings(device: Any, dtype: Any) -> None:
            original(device, dtype)
            if self.acts_here:
                self._flash_was = torch.backends.cuda.flash_sdp_enabled()
                torch.backends.cuda.enable_flash_sdp(False)
                self.fire()

        return apply_backend_settings

    def uninstall(self) -> None:
        if getattr(self, "_flash_was", None) is not None:
            torch.backends.cuda.enable_flash_sdp(self._flash_was)
        super().uninstall()


class ShortWarmup(Fault):
    name = "short_warmup"
    matrix_id = "W-01"
    summary = "one rank plans one warmup call fewer than the others"
    target = "hardening.runtime.seams:planned_warmup_calls"

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def planned_warmup_calls(calls: int) -> int:
            n = original(calls)
            if not self.acts_here:
                return n
            self.fire()
            return n - 1

        return planned_warmup_calls


FAULTS = [CompileOnOneRank, GraphBreak, RecompileAfterWarmup, BackendDivergence, ConditionalCollective, ShortWarmup]
