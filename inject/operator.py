"""Operator-family faults (OM-01..OM-13, H-01, K-01): the control plane, drift, dead ranks,
and a rank that is busy but alive (``hold_gil``, the liveness tests' negative control).

Call-bound faults act at ``call=k`` (default: the first steady-state call, so that
warmup and the compile gates have passed and the fault meets the runtime's steady
state).
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any, Callable

import torch

from hardening.runtime.drift import local_shard, replicate_placed
from hardening.inject.fault import Fault, flip_low_bit


class _AtCall(Fault):
    """A fault that acts once, at call ``call`` (default: first steady-state call)."""

    int_params = ("call",)
    default_ranks = "0"

    def due(self, call_id: int) -> bool:
        return self.acts_here and call_id == self.at_call() and self.fired_at is None


class _EnvelopeFault(_AtCall):
    """Breaks the envelope the leader is about to send."""

    target = "hardening.runtime.seams:outgoing_envelope"

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def outgoing_envelope(env: Any) -> Any:
            env = original(env)
            if self.due(env.call_id):
                self.break_envelope(env)
                self.fire()
            return env

        return outgoing_envelope

    def break_envelope(self, env: Any) -> None:
        raise NotImplementedError


class UnserializableMeta(_EnvelopeFault):
    name = "unserializable_meta"
    matrix_id = "OM-01"
    summary = "the leader puts a callback object into the envelope's meta"

    def break_envelope(self, env: Any) -> None:
        env.meta["on_done"] = lambda: None


class UnsupportedDtype(_EnvelopeFault):
    name = "unsupported_dtype"
    matrix_id = "OM-02"
    summary = "the leader sends a float64 tensor"

    def break_envelope(self, env: Any) -> None:
        name = next(iter(env.tensors))
        env.tensors[name] = env.tensors[name].to(torch.float64)


class PlanMismatch(_EnvelopeFault):
    name = "plan_mismatch"
    matrix_id = "OM-03"
    summary = "the leader's phase plan announces 2 region calls for a 1-call contract"

    def break_envelope(self, env: Any) -> None:
        env.plan["expected_generator_calls"] = 2


class TensorOutsideManifest(_EnvelopeFault):
    name = "tensor_outside_manifest"
    matrix_id = "OM-06"
    summary = "the leader adds a tensor the call contract does not name"

    def break_envelope(self, env: Any) -> None:
        env.tensors["debug_latents"] = torch.zeros(4)


class MissingRecomputeOverride(_EnvelopeFault):
    name = "missing_recompute_override"
    matrix_id = "OM-10"
    summary = "the leader plans a recompute without its override"

    def break_envelope(self, env: Any) -> None:
        env.plan["cache_op"] = "recompute"
        env.meta.pop("recompute_override", None)


class ConfigSkew(Fault):
    name = "config_skew"
    matrix_id = "OM-04"
    summary = "one rank's own config differs (region.seed + 1, else the first numeric setting)"
    target = "hardening.runtime.seams:user_config"

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def user_config(keys: dict[str, Any]) -> dict[str, Any]:
            keys = original(keys)
            if not self.acts_here:
                return keys
            numeric = [k for k, v in keys.items() if isinstance(v, int) and not isinstance(v, bool)]
            key = "region.seed" if "region.seed" in keys else next(iter(numeric), None)
            if key is None:
                self.skip("the program declares no numeric setting in its fingerprint to change")
                return keys
            self.fire(touched=key)
            return {**keys, key: keys[key] + 1}  # as if this rank had loaded another config file

        return user_config


class CollectiveGatingFlag(Fault):
    name = "collective_gating_flag"
    matrix_id = "OM-05"
    summary = "one rank flips HARDENING_NAN_CHECK_ALLREDUCE (a flag that adds a collective)"
    target = "hardening.runtime.seams:apply_backend_settings"
    variable = "HARDENING_NAN_CHECK_ALLREDUCE"

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def apply_backend_settings(device: Any, dtype: Any) -> None:
            original(device, dtype)
            if self.acts_here:
                # Flipped against what the rank inherited, so that a user who already
                # exports the flag still gets a rank that differs (the case stays valid).
                self._previous = os.environ.get(self.variable)
                os.environ[self.variable] = "0" if self._previous == "1" else "1"
                self.fire()

        return apply_backend_settings

    def uninstall(self) -> None:
        if self.fired_at is not None:
            if getattr(self, "_previous", None) is None:
                os.environ.pop(self.variable, None)
            else:
                os.environ[self.variable] = self._previous
        super().uninstall()


class InputMutation(_AtCall):
    name = "input_mutation"
    matrix_id = "OM-11"
    summary = "a receiver changes one element of its received input"
    target = "hardening.runtime.seams:received_envelope"
    default_ranks = "1"

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def received_envelope(env: Any) -> Any:
            env = original(env)
            if self.due(env.call_id):
                name = next((n for n, t in env.tensors.items() if t.numel() > 0), None)
                if name is None:
                    self.skip("the call has no input tensor to change")
                else:
                    flip_low_bit(env.tensors[name])
                    self.fire(touched=name)
            return env

        return received_envelope


class WeightPerturbation(Fault):
    name = "weight_perturbation"
    matrix_id = "OM-12"
    summary = "one element of one rank's weight shard is changed after load"
    target = "hardening.runtime.seams:weights_loaded"

    @staticmethod
    def checkable(module: Any, manifest: dict[str, Any] | None, replicated: tuple[str, ...]) -> str | None:
        """A parameter the weight check can judge: one with a manifest fingerprint for
        this shard first, else one that must match across ranks (declared replicated,
        or a DTensor placed ``Replicate``)."""
        params = [n for n, p in module.named_parameters() if p.numel() > 0]
        matched = set(replicated) | set(replicate_placed(module))
        for name in params:
            if name in (manifest or {}):
                return name
        return next((n for n in params if n in matched), None)

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def weights_loaded(module: Any, *, manifest: dict[str, Any] | None, replicated: tuple[str, ...]) -> None:
            original(module, manifest=manifest, replicated=replicated)
            if not self.acts_here:
                return
            name = self.checkable(module, manifest, replicated)
            if name is None:
                self.skip(
                    "the region has no weight manifest and no replicated parameter: "
                    "a changed shard cannot be told from a legitimate one"
                )
                return
            # The local shard only: editing a DTensor as a whole may redistribute it,
            # a collective on this rank alone.
            shard = local_shard(dict(module.named_parameters())[name])
            flip_low_bit(shard, min(7, shard.numel() - 1))
            self.fire(touched=name)

        return weights_loaded


class _StepFault(_AtCall):
    """Acts inside a step, after the envelope arrived, before the data plane."""

    target = "hardening.runtime.seams:call_inputs"

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def call_inputs(tensors: dict[str, Any], call_id: int) -> dict[str, Any]:
            if self.due(call_id):
                self.fire()  # recorded in the store before the process stops or dies
                self.act()
            return original(tensors, call_id)

        return call_inputs

    def act(self) -> None:
        raise NotImplementedError


class KillRank(_StepFault):
    name = "kill"
    matrix_id = "OM-13"
    summary = "SIGKILL a rank mid-loop (default: rank 0, the leader)"

    def act(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class StallRank(_StepFault):
    name = "stall"
    matrix_id = "H-01"
    summary = "a rank freezes inside a call: SIGSTOP, or an endless sleep with sleep=1"
    default_ranks = "1"
    int_params = ("call", "sleep")
    switch_params = ("sleep",)

    def act(self) -> None:
        if self.int_param("sleep", 0):
            while True:
                time.sleep(1)
        os.kill(os.getpid(), signal.SIGSTOP)


class HoldGil(_StepFault):
    name = "hold_gil"
    matrix_id = "H-01 (negative)"
    summary = "a rank holds the GIL in one C call for seconds=N (20): busy, not lost; no peer may call it lost"
    default_ranks = "1"
    int_params = ("call", "seconds")

    def act(self) -> None:
        # A foreign call through PyDLL keeps the GIL (CDLL would release it): every Python
        # thread of this rank, its watchdog included, stands still while the process runs.
        ctypes.PyDLL(None).sleep(self.int_param("seconds", 20))


class SkipCacheReset(Fault):
    name = "skip_cache_reset"
    matrix_id = "K-01"
    summary = "one rank skips the first KV-cache reset after warmup"
    target = "hardening.runtime.seams:cache_transition"

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def cache_transition(cache: Any, *, op: str, epoch: int, tokens: int, call_id: int) -> None:
            if (
                self.acts_here
                and self.fired_at is None
                and op == "reset"
                and self.ctx.warmup_calls is not None
                and call_id >= self.ctx.warmup_calls
            ):
                self.fire()
                return  # the reset never happens on this rank
            original(cache, op=op, epoch=epoch, tokens=tokens, call_id=call_id)

        return cache_transition


FAULTS = [
    UnserializableMeta,
    UnsupportedDtype,
    PlanMismatch,
    ConfigSkew,
    CollectiveGatingFlag,
    TensorOutsideManifest,
    MissingRecomputeOverride,
    InputMutation,
    WeightPerturbation,
    KillRank,
    StallRank,
    HoldGil,
    SkipCacheReset,
]
