"""Drift tripwires: prove every rank computes on the same inputs and the intended weights.

A checksum is two int64 sums over the tensor's *bits* (viewed as integers, so -0.0,
NaN payloads and bf16 rounding all count): the plain sum and the position-weighted sum.
A single changed element changes the plain sum unless the change is exactly zero in
bits; a swap of two elements changes the weighted one. Both are computed where the
tensor lives (on GPU, on the device); only two int64 per tensor leave it.

- Input digest: after receiving an envelope each rank digests blob and tensors; the
  digests travel in the envelope's confirmation all-gather and are compared with the
  leader's (the source of truth): a mismatch is a :class:`DriftError` naming the call,
  the ranks and the tensors.
- Weight fingerprint: per parameter; checked against the region's manifest of expected
  shard fingerprints (derived from the seed or the checkpoint), and replicated
  parameters across ranks, so one changed element in one rank's shard is named.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from hardening.errors import DriftError
from hardening.sidechannel import SideChannel

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_positions: dict[tuple[int, str], torch.Tensor] = {}


def checksum(tensor: torch.Tensor) -> torch.Tensor:
    """``int64[2]`` (bit sum, position-weighted bit sum) computed on the tensor's device."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    bits = flat.view(_INT_VIEW[flat.element_size()]).to(torch.int64)
    key = (bits.numel(), str(bits.device))
    pos = _positions.get(key)
    if pos is None:
        # Odd multipliers keep every position's weight distinct mod 2**64.
        pos = _positions[key] = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) * 2 + 1
    return torch.stack([bits.sum(), (bits * pos).sum()])


def input_digest(blob: bytes, tensors: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """``int64[1 + 2n]``: CRC of header+meta bytes, then a checksum per tensor (in order)."""
    parts = [torch.tensor([zlib.crc32(blob)], dtype=torch.int64, device=device)]
    parts += [checksum(t).to(device) for t in tensors.values()]
    return torch.cat(parts)


def compare_digests(table: torch.Tensor, *, call_id: int, names: list[str], leader: int) -> None:
    """``table[r]`` is rank r's input digest; DriftError on every rank if any differs from the leader's."""
    reference = table[leader]
    odd = [r for r in range(table.shape[0]) if not torch.equal(table[r], reference)]
    if not odd:
        return
    labels = ["header+meta", *names]
    details = []
    for r in odd:
        d = table[r]
        which = [labels[0]] if d[0] != reference[0] else []
        which += [labels[1 + i] for i in range(len(names)) if not torch.equal(d[1 + 2 * i : 3 + 2 * i], reference[1 + 2 * i : 3 + 2 * i])]
        details.append(f"rank {r} ({', '.join(which)})")
    raise DriftError(
        f"input digest mismatch at call {call_id}: {'; '.join(details)} differ from the leader (rank {leader}): "
        "the ranks would compute on different inputs"
    )


def fingerprint(module: torch.nn.Module) -> dict[str, list[int]]:
    """Checksum of every parameter and buffer that is not a cache (name -> [sum, weighted])."""
    out = {}
    for name, p in module.named_parameters():
        out[name] = checksum(p).tolist()
    return out


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
    per_rank: list[dict[str, Any]] = side.exchange(tag, mine)
    problems = []
    for r, fps in enumerate(per_rank):
        for name, fp in sorted(fps.items()):
            expected = (manifest or {}).get(name, {}).get(r, (manifest or {}).get(name, {}).get(str(r)))  # type: ignore[call-overload]
            if expected is not None and list(expected) != list(fp):
                problems.append(f"parameter {name!r} on rank {r} does not match its manifest fingerprint")
    for name in replicated:
        values = [tuple(fps.get(name, ())) for fps in per_rank]
        if len(set(values)) > 1:
            ranks = [r for r, v in enumerate(values) if v != values[0]]
            problems.append(f"replicated parameter {name!r} differs on rank(s) {ranks} from rank 0")
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DriftError(f"weight fingerprint: {problems[0]}{more}" + "".join(f"\n  {p}" for p in problems[1:]))
