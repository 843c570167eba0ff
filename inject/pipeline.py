"""Pipeline-family faults (OM-07, OM-08, OM-09, PP-02): the topology's groups, the mesh
leader's checks, the epoch fence and the bounded queues.

Chunk-bound faults act at ``call=k``, a chunk id (default: a steady-state chunk, so that
warmup and the compile gate have passed).
"""

from __future__ import annotations

import struct
import time
from typing import Any, Callable

import torch

from hardening.inject.compile import replace_forward, with_world_all_reduce
from hardening.inject.fault import Fault
from hardening.runtime.pipeline import HEADER_FIELDS

_CHUNK_WORD, _SEQ_WORD = HEADER_FIELDS.index("chunk_id"), HEADER_FIELDS.index("seq")


class _AtChunk(Fault):
    """Acts once, on a mesh rank, on the chunk with id ``call`` as it arrives (default:
    the first steady-state chunk), before the rank checks it."""

    target = "hardening.runtime.seams:chunk_received"
    default_ranks = "1"
    int_params = ("call",)

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def chunk_received(buf: torch.Tensor, *, rank: int) -> torch.Tensor:
            buf = original(buf, rank=rank)
            due = self.at_call()
            if self.acts_here and self.fired_at is None and due is not None and _word(buf, _CHUNK_WORD) == due:
                self.act(buf)
            return buf

        return chunk_received

    def act(self, buf: torch.Tensor) -> None:
        raise NotImplementedError


def _word(buf: torch.Tensor, index: int) -> int:
    return struct.unpack_from("=q", bytes(buf[: (index + 1) * 8].cpu().numpy().tobytes()), index * 8)[0]


class LeaderGetsBadChunk(_AtChunk):
    name = "leader_bad_chunk"
    matrix_id = "OM-07"
    summary = "the mesh leader receives a chunk whose sequence number is off (lost/repeated message)"

    def act(self, buf: torch.Tensor) -> None:
        head = bytearray(buf[: (_SEQ_WORD + 1) * 8].cpu().numpy().tobytes())
        struct.pack_into("=q", head, _SEQ_WORD * 8, _word(buf, _SEQ_WORD) + 7)
        buf[: len(head)].copy_(torch.frombuffer(head, dtype=torch.uint8))
        self.fire("seq")


class WrongGroup(Fault):
    name = "wrong_group"
    matrix_id = "OM-08"
    summary = "the mesh's region issues an all_reduce on world_pg (rank 0 never joins it) where mesh_pg is declared"
    target = "hardening.runtime.seams:module_to_compile"
    default_ranks = "all"  # the code is the same on every rank; only the mesh compiles a region

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def module_to_compile(module: Any) -> Any:
            module = original(module)
            if not self.acts_here:
                return module
            self.fire("world_pg")
            return replace_forward(module, with_world_all_reduce)

        return module_to_compile


class HardCut(Fault):
    name = "hard_cut"
    matrix_id = "OM-09"
    summary = "rank 0 starts a new epoch while results of the old one are in flight"
    target = "hardening.runtime.seams:pipeline_cut"
    default_ranks = "0"
    int_params = ("call",)
    AFTER_STEADY = 4
    """Default: this many chunks into steady state, when D_in chunks are in flight."""

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def pipeline_cut(chunk_id: int) -> bool:
            cut = original(chunk_id)
            start = self.ctx.warmup_calls
            due = self.int_param("call", None if start is None else start + self.AFTER_STEADY)
            if self.acts_here and self.fired_at is None and chunk_id == due:
                self.fire()
                return True
            return cut

        return pipeline_cut


class StaleLeak(Fault):
    name = "stale_leak"
    matrix_id = "OM-09 (negative)"
    summary = "the epoch fence is off on rank 0: stale results reach the caller (proves the OM-09 checker fails a leak)"
    target = "hardening.runtime.seams:stale_result_fenced"
    default_ranks = "0"

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def stale_result_fenced(result_epoch: int, current_epoch: int) -> bool:
            if not self.acts_here:
                return original(result_epoch, current_epoch)
            self.fire()
            return False

        return stale_result_fenced


class StalledStage(_AtChunk):
    name = "stalled_stage"
    matrix_id = "PP-02"
    summary = "the mesh leader stops taking chunks (busy, heartbeat alive) for longer than the queue deadline"
    int_params = ("call", "ms")

    def act(self, buf: torch.Tensor) -> None:
        self.fire()
        time.sleep(self.int_param("ms", 60_000) / 1000.0)  # ended by rank 0's BackpressureError


FAULTS = [LeaderGetsBadChunk, WrongGroup, HardCut, StaleLeak, StalledStage]
