"""Drift tripwires: prove every rank computes on the same inputs and the intended weights.

A checksum is two int64 sums over the tensor's *bits* (viewed as integers, so -0.0,
NaN payloads and bf16 rounding all count): the plain sum and the position-weighted sum.
A single changed element changes the plain sum unless the change is exactly zero in
bits; a swap of two elements changes the weighted one. Both are computed where the
tensor lives (on GPU, on the device); only two int64 per tensor leave it.

- Input digest: the leader digests header+meta and every tensor before it commits a
  checked call, and the digest travels in the envelope's control frame; each follower
  digests what it received and compares (the leader is the source of truth). A mismatch
  is a :class:`DriftError` on the odd rank naming the call, the rank and the tensors;
  the job-wide abort carries it to every other rank. Host tensors are digested with
  CRC-32 over their bytes (about twice as fast here as the two sums, and it catches any
  change of one element of up to 4 bytes); device tensors with :func:`checksum`, on the
  device, so that only two int64 per tensor leave it.
- Weight fingerprint: per parameter; checked against the region's manifest of expected
  shard fingerprints (derived from the seed or the checkpoint), and replicated
  parameters across ranks, so one changed element in one rank's shard is named.
  A DTensor parameter (``parallelize_module``, a Hugging Face ``tp_plan``) is
  fingerprinted by its local shard, never by a DTensor operation (which could issue a
  collective on one rank only); one whose placements are all ``Replicate`` must match
  across ranks without being declared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from hardening.errors import DriftError
from hardening.runtime.digest import checksum, input_digest
from hardening.runtime.sidechannel import SideChannel

if TYPE_CHECKING:
    from hardening.runtime.envelope import Envelope  # a type only: envelope imports digest, never drift

def check_input(env: "Envelope", *, rank: int, leader: int) -> None:
    """Follower side: DriftError if what this rank received is not what the leader digested.

    Does nothing when the frame carries no digest (the leader decides which calls are
    checked: ``digest_every``, never warmup)."""
    if env.digest is None:
        return
    mine = input_digest(env.blob, env.tensors)
    if mine == env.digest:
        return
    names = list(env.tensors)
    which = ["header+meta"] if mine[0] != env.digest[0] else []
    which += [n for i, n in enumerate(names) if mine[1 + 2 * i : 3 + 2 * i] != env.digest[1 + 2 * i : 3 + 2 * i]]
    raise DriftError(
        f"input digest mismatch at call {env.call_id}: rank {rank} ({', '.join(which)}) differs from the leader "
        f"(rank {leader}): this rank would compute on different inputs"
    )


def _dtensor_type() -> type | None:
    for where in ("torch.distributed.tensor", "torch.distributed._tensor"):  # public from 2.5, private before
        try:
            module = __import__(where, fromlist=["DTensor"])
            return module.DTensor
        except (ImportError, AttributeError):
            continue
    return None


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own data of ``tensor``: the local shard of a DTensor (sharing its
    storage, so an in-place change to it is a change to the parameter), else itself.
    Touching a DTensor as a whole may redistribute it: a collective."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return tensor.to_local()
    return tensor


def replicate_placed(module: torch.nn.Module) -> tuple[str, ...]:
    """Names of DTensor parameters whose every placement is ``Replicate``: the same bits
    on every rank by construction."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return ()
    return tuple(
        name
        for name, p in module.named_parameters()
        if isinstance(p, dtensor) and all(pl.is_replicate() for pl in p.placements)
    )


def fingerprint(module: torch.nn.Module) -> dict[str, list[int]]:
    """Checksum of every parameter's local data (name -> [sum, weighted])."""
    return {name: checksum(local_shard(p)).tolist() for name, p in module.named_parameters()}


def check_weights(
    side: SideChannel,
    module: torch.nn.Module,
    *,
    manifest: dict[str, dict[int, list[int]]] | None,
    replicated: tuple[str, ...] = (),
    tag: str = "weights/init",
) -> None:
    """DriftError on every rank naming parameter and rank when a shard is not what it should be."""
    mine = fingerprint(module)
    replicated = tuple(dict.fromkeys((*replicated, *replicate_placed(module))))
    per_rank: list[dict[str, Any]] = side.exchange(tag, mine)
    problems = []
    for r, fps in enumerate(per_rank):
        for name, fp in sorted(fps.items()):
            expected = (manifest or {}).get(name, {}).get(r, (manifest or {}).get(name, {}).get(str(r)))  # type: ignore[call-overload]
            if expected is not None and list(expected) != list(fp):
                problems.append(f"parameter {name!r} on rank {r} does not match its manifest fingerprint")
    for name in replicated:
        values = [tuple(fps.get(name, ())) for fps in per_rank]
        problems += [
            f"replicated parameter {name!r} on rank {r} differs from rank 0" for r, v in enumerate(values) if v != values[0]
        ]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DriftError(f"weight fingerprint: {problems[0]}{more}" + "".join(f"\n  {p}" for p in problems[1:]))
