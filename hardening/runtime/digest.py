"""Digests of tensors and bytes: the leaf both the envelope and the drift checks use.

A checksum is two int64 sums over a tensor's *bits* (viewed as integers, so -0.0, NaN
payloads and bf16 rounding all count): the plain sum and the position-weighted sum. A
single changed element changes the plain sum unless the change is exactly zero in bits;
a swap of two elements changes the weighted one. Computed where the tensor lives: on a
GPU only two int64 per tensor leave it. Host tensors are digested with CRC-32 over their
bytes (about twice as fast here as the two sums, and it catches any change of one
element of up to 4 bytes).
"""

from __future__ import annotations

import ctypes
import zlib

import torch

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


def digest_len(num_tensors: int) -> int:
    """Words of an input digest: CRC of header+meta, then two per tensor."""
    return 1 + 2 * num_tensors


def host_bytes(tensor: torch.Tensor) -> memoryview:
    """Zero-copy view of a contiguous host tensor's bytes (``tensor.numpy()`` would need
    numpy, which torch does not depend on: a fresh venv has none)."""
    assert tensor.device.type == "cpu" and tensor.is_contiguous(), "a contiguous host tensor"
    size = tensor.numel() * tensor.element_size()
    if not size:
        return memoryview(b"")
    buffer = (ctypes.c_char * size).from_address(tensor.data_ptr())
    buffer.owner = tensor  # the view must keep the memory alive (a temporary .contiguous())
    return memoryview(buffer).cast("B")


def input_digest(blob: bytes, tensors: dict[str, torch.Tensor]) -> list[int]:
    """``1 + 2n`` ints: CRC of header+meta bytes, then two words per tensor (in order).

    Host tensors cost one CRC-32 each and no torch op (a call's inputs are small: the
    per-op overhead would be as large as the CRC); device tensors are summed where they
    live and leave the device in one transfer."""
    words = [zlib.crc32(blob)]
    on_device = []
    for tensor in tensors.values():
        if tensor.device.type == "cpu":
            view = host_bytes(tensor if tensor.is_contiguous() else tensor.contiguous())
            words += [zlib.crc32(view), len(view)]
        else:
            on_device.append((len(words), checksum(tensor)))
            words += [0, 0]
    if on_device:
        sums = torch.stack([c for _, c in on_device]).tolist()
        for (at, _), pair in zip(on_device, sums):
            words[at : at + 2] = pair
    return words
