"""The runtime's seams: every point where a fault may act, in one place.

Each function here is called by :class:`~hardening.runtime.session.Session` at one fixed
step of its recipe and does the plain, unfaulted thing. A fault (``hardening.inject``)
replaces one of them by name, ``hardening.runtime.seams:<function>``, for the rank it
acts on; because the Session calls them, a fault acts the same on the harness's own
worker and on a user's program. Nothing else in the package is ever patched.

The Session looks every seam up at call time (``seams.<name>(...)``), never binds it
at import, so that a fault installed after import still acts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from hardening.runtime.config import CompileConfig
    from hardening.runtime.envelope import Envelope
    from hardening.runtime.kv_cache import KVCacheLifecycle


def apply_backend_settings(device: torch.device, dtype: torch.dtype) -> None:
    """Kernel-backend settings, before the process group exists (C-04 disables flash
    SDPA on one rank; OM-05 flips an environment flag that adds a collective)."""
    import torch

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = dtype != torch.float32


def resolve_compile_config(cfg: CompileConfig) -> CompileConfig:
    """The compile settings this rank will use, before parity (C-01 flips ``enabled``)."""
    return cfg


def user_config(keys: dict[str, Any]) -> dict[str, Any]:
    """The program's own settings entering the parity fingerprint; the Session hands
    them back as ``Session.user_keys`` (OM-04 changes one value on one rank, as if that
    rank had read another config file)."""
    return keys


def module_to_compile(module: Any) -> Any:
    """What ``Session.compile`` is about to compile (C-02 adds a graph break, C-05 a
    collective on one rank, OM-08 one on the world group in a pipeline's mesh)."""
    return module


def weights_loaded(module: Any, *, manifest: dict[str, Any] | None, replicated: tuple[str, ...]) -> None:
    """The weights are in place, right before ``Session.check_weights`` judges them
    (OM-12 changes one element of one rank's local shard)."""


def planned_warmup_calls(calls: int) -> int:
    """How many warmup calls this rank will run (W-01 plans one fewer on one rank)."""
    return calls


def outgoing_envelope(env: Envelope) -> Envelope:
    """The leader's envelope, right before it is sent (OM-01/02/03/06/10 break it)."""
    return env


def received_envelope(env: Envelope) -> Envelope:
    """A follower's envelope, right after it arrived and before the digest check
    (OM-11 changes one element of one input)."""
    return env


def call_inputs(tensors: dict[str, torch.Tensor], call_id: int) -> dict[str, torch.Tensor]:
    """What call ``call_id`` computes on, on every rank, after the envelope and the
    cache transition, before the data plane (C-03 restrides one input; OM-13 kills the
    rank; H-01 freezes it)."""
    return tensors


def cache_transition(cache: KVCacheLifecycle, *, op: str, epoch: int, tokens: int, call_id: int) -> None:
    """Validate, then apply one KV-cache transition (K-01 skips one reset on one rank)."""
    from hardening.runtime.kv_cache import apply_transition

    apply_transition(cache, op=op, epoch=epoch, tokens=tokens, call_id=call_id)


def chunk_received(buf: torch.Tensor, *, rank: int) -> torch.Tensor:
    """A chunk's frame as a mesh rank received it from the control, before its checks
    (OM-07 damages one on the mesh leader, which must refuse it and end the mesh)."""
    return buf


def pipeline_cut(chunk_id: int) -> bool:
    """Whether rank 0's pipeline starts a new epoch (a hard cut) right before it sends
    chunk ``chunk_id``, besides the cuts its caller asks for (OM-09 cuts while results
    are in flight)."""
    return False


def stale_result_fenced(result_epoch: int, current_epoch: int) -> bool:
    """Whether a result of an older epoch is dropped (always: a test-only fault turns
    the fence off to prove that the OM-09 checker fails a leak)."""
    return True


SEAMS = (
    "apply_backend_settings", "resolve_compile_config", "user_config", "module_to_compile", "weights_loaded",
    "planned_warmup_calls", "outgoing_envelope", "received_envelope", "call_inputs", "cache_transition",
    "chunk_received", "pipeline_cut", "stale_result_fenced",
)  # fmt: skip
"""Every seam, in the order a Session reaches them."""
