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

_SEQ_WORD = 5  # the header word a pipeline message's sequence number is in


class LeaderGetsBadChunk(Fault):
    name = "leader_bad_chunk"
    matrix_id = "OM-07"
    summary = "the mesh leader receives a chunk whose sequence number is off (lost/repeated message)"
    target = "hardening.runtime.seams:chunk_received"
    default_ranks = "1"
    int_params = ("call",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._received = 0

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def chunk_received(buf: torch.Tensor, *, rank: int) -> torch.Tensor:
            buf = original(buf, rank=rank)
            index, self._received = self._received, self._received + 1  # chunk ids are dense from 0
            due = self.at_call()
            if self.acts_here and self.fired_at is None and due is not None and index == due:
                head = bytearray(buf[:48].cpu().numpy().tobytes())
                (seq,) = struct.unpack_from("=q", head, _SEQ_WORD * 8)
                struct.pack_into("=q", head, _SEQ_WORD * 8, seq + 7)
                buf[:48].copy_(torch.frombuffer(head, dtype=torch.uint8))
                self.fire("seq")
            return buf

        return chunk_received


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


class StalledStage(Fault):
    name = "stalled_stage"
    matrix_id = "PP-02"
    summary = "the mesh leader stops taking chunks (busy, heartbeat alive) for longer than the queue deadline"
    target = "hardening.runtime.seams:chunk_received"
    default_ranks = "1"
    int_params = ("call", "ms")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._received = 0

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def chunk_received(buf: torch.Tensor, *, rank: int) -> torch.Tensor:
            buf = original(buf, rank=rank)
            index, self._received = self._received, self._received + 1
            due = self.at_call()
            if self.acts_here and self.fired_at is None and due is not None and index == due:
                self.fire()
                time.sleep(self.int_param("ms", 60_000) / 1000.0)  # ended by rank 0's BackpressureError
            return buf

        return chunk_received


FAULTS = [LeaderGetsBadChunk, WrongGroup, HardCut, StaleLeak, StalledStage]
