"""The pipeline: chunks from the control (rank 0) through the mesh and back, over bounded
queues, every message stamped and checked, stale results fenced off by epoch.

A user's PP server asks the Session for one (``Session.pipeline``) and then, on rank 0::

    pipe.warmup(make_inputs, calls=2)             # compiles the mesh, then the compile gate
    for k in range(n):
        if new_prompt(k):
            pipe.hard_cut()                       # results still in flight become stale
        for result in pipe.submit(make_inputs(k)):  # waits only while D_in chunks are in flight
            consume(result)                       # never a stale one
    for result in pipe.drain():
        consume(result)

and on every mesh rank ``pipe.serve(region, warmup=2, on_epoch=reset_cache)``, which
returns on the control's SHUTDOWN. A hard cut drops every older result not yet handed
over, arrived or not: ``drain()`` first to keep them. The Session's exit closes the
pipeline (SHUTDOWN, the steady-state gate, done).

**Messages** are one flat buffer each: a header of int64 words (:data:`HEADER_FIELDS`:
magic, version, kind, ``cache_epoch``, chunk id, sequence number, sender, segment, the
warmup plan, reason length), then the contract's tensors at fixed offsets. The chunk id is monotonic over the run; the sequence number
counts messages per direction and receiver, so a lost, repeated or reordered message is
named on receive. Kinds: ``CHUNK`` (control to mesh), ``RESULT`` (mesh leader to control),
``SHUTDOWN`` and ``ERROR`` (terminal actions, ERROR with its reason).

**Queues**: the mesh keeps ``depth_in`` input receives posted, the control
``depth_out`` result receives; the control sends a chunk only while fewer than
``depth_in`` are in flight, and the leader starts a send only while fewer than
``depth_out`` of its earlier ones are unfinished. A queue full for ``queue_timeout`` seconds is a
:class:`BackpressureError` naming the chunks and the stage that took nothing.

**Epoch fence**: :meth:`Pipeline.hard_cut` bumps ``cache_epoch``; chunks sent before it
carry the old epoch, their results arrive late and are dropped and counted, never handed
to the caller. Every delivery and drop is kept in ``history``, which the harness's checker
judges without trusting the counters.

**PP1 terminal action**: the mesh leader validates each chunk before it broadcasts it on
``mesh_pg``; whatever stops it before the broadcast, it publishes the job-wide abort and
broadcasts ERROR with the cause, so no mesh rank waits in a broadcast that will never come; the control's SHUTDOWN
goes on to the mesh as SHUTDOWN.

The p2p ordering and why it cannot deadlock: :mod:`hardening.runtime.topology`.
"""

from __future__ import annotations

import contextlib
import enum
import math
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from hardening.errors import BackpressureError, ContractError, PeerError, PreflightError
from hardening.runtime import seams
from hardening.runtime.envelope import ALLOWED_DTYPES, TensorSpec
from hardening.runtime.overlap import Span, Timeline
from hardening.runtime.topology import CONTROL, MESH_LEADER, Topology

if TYPE_CHECKING:
    from hardening.runtime.session import Session

MAGIC = 0x50495045  # "PIPE"
VERSION = 1
HEADER_FIELDS = ("magic", "version", "kind", "epoch", "chunk_id", "seq", "sender", "segment", "plan", "reason_len")
"""The int64 words of a message header, in order."""
HEADER_WORDS = len(HEADER_FIELDS)
_HEADER_BYTES = HEADER_WORDS * 8
_ALIGN = 64
_REASON_BYTES = 2048
"""Room for an ERROR frame's reason (frames are at least this large)."""


HISTORY_LIMIT = 10_000
"""Delivery-history events the control keeps (and its final record holds)."""


class Kind(enum.IntEnum):
    CHUNK = 1
    RESULT = 2
    SHUTDOWN = 3
    ERROR = 4


@dataclass(frozen=True, slots=True)
class Header:
    kind: int
    epoch: int
    chunk_id: int
    seq: int
    sender: int
    segment: int = 0
    """Which measured segment of the run the chunk belongs to (-1: warmup)."""
    plan: int = 0
    """The warmup chunks the control plans (the mesh checks it against its own)."""
    reason: str = ""

    def describe(self) -> str:
        name = Kind(self.kind).name if self.kind in Kind._value2member_map_ else f"kind {self.kind}"
        return f"{name} chunk {self.chunk_id} (epoch {self.epoch}, seq {self.seq}, from rank {self.sender})"


@dataclass(frozen=True, kw_only=True, slots=True)
class Result:
    """One result as the control's caller gets it: always of the current epoch."""

    chunk_id: int
    epoch: int
    tensors: dict[str, torch.Tensor]

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise AttributeError(f"result of chunk {self.chunk_id} has no output {name!r} (outputs: {list(self.tensors)})") from None


@dataclass(frozen=True, kw_only=True, slots=True)
class Chunk:
    """One chunk as a mesh rank computes on it, after every check passed."""

    chunk_id: int
    epoch: int
    tensors: dict[str, torch.Tensor]
    warmup: bool
    segment: int = 0
    """The control's measured segment (-1 in warmup)."""

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.tensors.values())


class Frames:
    """The fixed layout of one direction's messages: header, then one slot per tensor."""

    def __init__(self, specs: tuple[TensorSpec, ...], device: torch.device, *, what: str) -> None:
        self.specs, self.device, self.what = specs, device, what
        offsets, nbytes, end = [], [], _HEADER_BYTES
        for spec in specs:
            end = -(-end // _ALIGN) * _ALIGN
            offsets.append(end)
            nbytes.append(math.prod(spec.shape) * ALLOWED_DTYPES[spec.dtype].itemsize)
            end += nbytes[-1]
        self.offsets, self.nbytes = tuple(offsets), tuple(nbytes)
        self.size = max(end, _HEADER_BYTES + _REASON_BYTES)

    def new(self) -> torch.Tensor:
        return torch.empty(self.size, dtype=torch.uint8, device=self.device)

    def preflight(self, tensors: dict[str, torch.Tensor]) -> None:
        """The tensors are exactly the contract, in name, shape and dtype: checked before
        anything is sent (a refused chunk strands nobody)."""
        names = [s.name for s in self.specs]
        if list(tensors) != names:
            raise PreflightError(f"{self.what}: tensors {list(tensors)} are not the contract's {names} (names and order)")
        for spec, t in zip(self.specs, tensors.values()):
            if not isinstance(t, torch.Tensor):
                raise PreflightError(f"{self.what}: {spec.name!r} is a {type(t).__name__}, not a tensor")
            dtype = str(t.dtype).removeprefix("torch.")
            if tuple(t.shape) != spec.shape or dtype != spec.dtype:
                raise PreflightError(f"{self.what}: {spec.name!r} is {tuple(t.shape)}/{dtype}, the contract says {spec.describe()}")

    def pack(self, buf: torch.Tensor, header: Header, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        reason = header.reason.encode()[:_REASON_BYTES]
        words = [MAGIC, VERSION, header.kind, header.epoch, header.chunk_id, header.seq, header.sender, header.segment, header.plan, len(reason)]
        head = torch.frombuffer(bytearray(struct.pack(f"={HEADER_WORDS}q", *words)), dtype=torch.uint8)
        buf[:_HEADER_BYTES].copy_(head)
        if reason:
            buf[_HEADER_BYTES : _HEADER_BYTES + len(reason)].copy_(torch.frombuffer(bytearray(reason), dtype=torch.uint8))
        for index, t in enumerate((tensors or {}).values()):
            self.slot(buf, index).copy_(t)
        return buf

    def slot(self, buf: torch.Tensor, index: int) -> torch.Tensor:
        spec, start = self.specs[index], self.offsets[index]
        return buf[start : start + self.nbytes[index]].view(ALLOWED_DTYPES[spec.dtype]).view(spec.shape)

    def header(self, buf: torch.Tensor, *, source: str) -> Header:
        """The header of a received buffer; ContractError when it is not one of ours."""
        raw = bytes(buf[: _HEADER_BYTES + _REASON_BYTES].cpu().numpy().tobytes())
        magic, version, kind, epoch, chunk_id, seq, sender, segment, plan, reason_len = struct.unpack(f"={HEADER_WORDS}q", raw[:_HEADER_BYTES])
        if magic != MAGIC or version != VERSION:
            raise ContractError(
                f"{source}: not a pipeline message of version {VERSION} (magic {magic:#x}, version {version}): "
                "the peers run different hardening versions, or the frame was overwritten"
            )
        if kind not in Kind._value2member_map_:
            raise ContractError(f"{source}: unknown message kind {kind}")
        reason = raw[_HEADER_BYTES : _HEADER_BYTES + max(0, min(reason_len, _REASON_BYTES))].decode(errors="replace")
        return Header(kind=kind, epoch=epoch, chunk_id=chunk_id, seq=seq, sender=sender, segment=segment, plan=plan, reason=reason)

    def tensors(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        return {spec.name: self.slot(buf, i) for i, spec in enumerate(self.specs)}


class Posted:
    """One posted receive and when it completed. On gloo a work reports completion only
    once something waited on it, so a thread of its own waits on each posted receive in
    order (the wait releases the GIL) and marks it; on NCCL, where wait() only orders
    streams, its completion is polled."""

    def __init__(self, work: Any, buf: torch.Tensor, waiter: Waiter | None) -> None:
        self.work, self.buf = work, buf
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._waiter = waiter
        if waiter is not None:
            waiter.add(self)

    def ready(self) -> bool:
        return self.done.is_set() if self._waiter is not None else bool(self.work.is_completed())

    def wait(self, limit: float | None) -> bool:
        """True once it completed (raising what the wait raised), False after ``limit`` s."""
        if self._waiter is not None:
            if not self.done.wait(limit):
                return False
            if self.error is not None:
                raise self.error
            return True
        return poll_completed(self.work, limit)


def poll_completed(work: Any, limit: float | None) -> bool:
    """Whether ``work`` completed within ``limit`` seconds, by polling (NCCL's wait() only
    orders streams and returns at once)."""
    deadline = None if limit is None else time.monotonic() + limit
    while not work.is_completed():
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(0.0002)
    return True


class Waiter(threading.Thread):
    """Waits on posted gloo receives in the order they were posted (see :class:`Posted`)."""

    def __init__(self) -> None:
        super().__init__(name="hardening-pipeline-results", daemon=True)
        self._queue: deque[Posted] = deque()
        self._ready = threading.Condition()

    def add(self, posted: Posted) -> None:
        with self._ready:
            self._queue.append(posted)
            self._ready.notify()

    def run(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                posted = self._queue.popleft()
            try:
                posted.work.wait()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which names it
                posted.error = exc
            posted.done.set()


class Pipeline:
    """One rank's end of the pipeline (see the module docstring); built by ``Session.pipeline``."""

    def __init__(self, session: Session, topology: Topology, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
        cfg = session.config.pipeline
        self.session, self.topology, self.config = session, topology, cfg
        self.rank = session.rank
        self.is_control = topology.is_control
        self.is_mesh_leader = topology.is_mesh_leader
        self.mesh_group = topology.group("mesh_pg")
        """The group the region's collectives must run on (the rank's tensor-parallel group)."""
        self.chunk_in = Frames(inputs, session.device, what=f"rank {self.rank}: chunk")
        self.result_out = Frames(outputs, session.device, what=f"rank {self.rank}: result")
        self.timelines: dict[int, Timeline] = {}
        """Each measured segment's timeline (0: the steady window unless the control asks
        for segments, as a depth sweep does)."""
        self.segments: list[str] = []
        self._tl = Timeline()  # warmup: a timeline never opened adds nothing
        self._seg = -1
        self._depth = cfg.depth_in
        self.epoch = 0
        self.stale_dropped = 0
        self.delivered = 0
        self.discarded = 0
        self.history: deque[list[Any]] = deque(maxlen=HISTORY_LIMIT)
        """Control: ``["cut", chunk_id, epoch]``, ``["deliver", chunk_id, chunk_epoch,
        current_epoch]``, ``["drop", ...]`` in the order they happened (the last
        ``HISTORY_LIMIT``: a server runs for days)."""
        self.closed = False
        self.warmed_up = False
        self.shut_down = False
        """Mesh: serve() ran until the control's SHUTDOWN."""
        self.stage_note = ""
        """How the stage work was produced, for every report that shows overlap (the
        harness's workload says "modelled"); kept in the record."""
        self.current: Chunk | None = None
        """Mesh: the chunk being computed (its id, epoch and segment), while ``fn`` runs."""
        self._failed: str | None = None
        """The first error this pipeline raised: every later call names it instead of
        running on misaligned queues."""
        self._plan = 0
        self._appended = 0
        # Control state.
        self._next_id = 0
        self._seq_to: dict[int, int] = {}
        self._seq_from = 0
        self._in_flight: deque[tuple[int, int]] = deque()  # (chunk_id, epoch), oldest first
        self._sends: deque[tuple[int, Any]] = deque()  # (chunk_id, work)
        self._results: deque[Posted] = deque()  # posted result receives, oldest first
        self._waiter: Waiter | None = None
        self._last_return: float | None = None
        self._first_send_seen = False
        # Mesh state.
        self._inputs: deque[tuple[Any, torch.Tensor]] = deque()
        self._expect_seq = 0
        self._last_chunk = -1
        self._out_sends: deque[tuple[int, Any]] = deque()
        self._out_seq = 0
        if self.is_control:
            self._seq_to = {r: 0 for r in self._destinations()}
            if session.device.type != "cuda":
                self._waiter = Waiter()
                self._waiter.start()
            for _ in range(cfg.depth_out):
                self._post_result()
        elif self._receives_from_control():
            for _ in range(cfg.depth_in):
                self._post_input()

    # -- the wrappers: every pipeline collective names its group -------------------------

    def _isend(self, buf: torch.Tensor, dst: int, declared: str) -> Any:
        group = self.topology.group(declared)
        self.topology.check(group, declared=declared, peer=dst, op=f"isend to rank {dst}")
        return dist.isend(buf, dst, group=group)

    def _irecv(self, buf: torch.Tensor, src: int, declared: str) -> Any:
        group = self.topology.group(declared)
        self.topology.check(group, declared=declared, peer=src, op=f"irecv from rank {src}")
        return dist.irecv(buf, src, group=group)

    def _broadcast(self, buf: torch.Tensor) -> None:
        group = self.mesh_group
        self.topology.check(group, declared="mesh_pg", peer=MESH_LEADER, op="broadcast of the chunk frame")
        dist.broadcast(buf, MESH_LEADER, group=group)

    # -- control (rank 0) ----------------------------------------------------------------

    def _destinations(self) -> tuple[int, ...]:
        return self.topology.mesh if self.topology.kind == "pp0" else (MESH_LEADER,)

    def _receives_from_control(self) -> bool:
        return self.topology.kind == "pp0" or self.is_mesh_leader

    def _post_result(self) -> None:
        buf = self.result_out.new()
        self._results.append(Posted(self._irecv(buf, MESH_LEADER, "from_mesh"), buf, self._waiter))

    def _need_control(self, what: str) -> None:
        """``what`` is rank 0's to call, on an open, intact pipeline."""
        self._need_intact(what)
        if not self.is_control:
            raise ContractError(f"{what} is the control's (rank {CONTROL}); rank {self.rank} serves the mesh: call serve()")
        if self.closed:
            raise ContractError(f"{what} after the pipeline was closed")

    def _need_intact(self, what: str) -> None:
        """Nothing runs on a pipeline that already failed: its queues no longer line up."""
        if self._failed is not None:
            raise ContractError(f"{what} after the pipeline failed ({self._failed}): its queues no longer line up")

    def _claim_plan(self, calls: int, method: str, arg: str) -> None:
        """This rank's warmup plan, set once: rank 0's warmup() and each mesh rank's serve()."""
        if calls < 1:
            raise ValueError(f"{method}({arg}={calls}): at least one chunk (the region compiles on it, then the gate closes)")
        if self._plan:
            raise ContractError(f"{method}() called twice: warmup, and the compile gate after it, happen once")
        self._plan = calls

    def _failing(self, exc: BaseException) -> None:
        if self._failed is None:
            self._failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    def warmup(self, make_inputs: Callable[[int], dict[str, torch.Tensor]], *, calls: int) -> None:
        """``calls`` chunks through the mesh, every result taken (the mesh compiles on them),
        then the compile gate on the mesh's counters; the steady window opens after it."""
        self._need_control("warmup()")
        self._claim_plan(calls, "warmup", "calls")
        s = self.session
        s.state.enter("warmup")
        limit = s.config.timeouts.compile or None  # the mesh compiles on these: its deadline, not the queue's
        for _ in range(calls):
            while len(self._in_flight) >= self.config.depth_in:
                self._take(limit=limit, why="warmup")
            self._send(make_inputs(self._next_id), warmup=True)
        while self._in_flight:
            self._take(limit=limit, why="warmup")
        s.pipeline_gate_after_warmup()
        self._steady_from(self._next_id)
        self.warmed_up = True
        s.state.enter("steady")
        self._open_segment("steady", None)

    def segment(self, name: str, *, depth: int | None = None) -> list[Result]:
        """Start a new measured segment (its own timeline and OverlapScore) with at most
        ``depth`` chunks in flight (1..``depth_in``; default ``depth_in``): what is in
        flight is taken first, and its current-epoch results returned."""
        self._need_control("segment()")
        if not self.warmed_up:
            raise ContractError("segment() before warmup(): segments measure steady state")
        if depth is not None and not 1 <= depth <= self.config.depth_in:
            raise ValueError(f"segment({name!r}, depth={depth}): must be from 1 to depth_in={self.config.depth_in}")
        out = self.drain()
        if "max_in_flight" not in self._tl.extra:  # nothing was sent in the current one: it is replaced
            self.segments.pop()
            del self.timelines[self._seg]
        else:
            self._close_segment()
        self._open_segment(name, depth)
        return out

    @property
    def next_chunk_id(self) -> int:
        """The id the next submitted chunk gets (monotonic over the run, warmup included)."""
        return self._next_id

    def _open_segment(self, name: str, depth: int | None) -> None:
        self._seg = len(self.segments)
        self.segments.append(name)
        self._depth = depth or self.config.depth_in
        self._tl = self.timelines[self._seg] = Timeline(extra={"depth": self._depth})
        self._tl.open()
        self._first_send_seen = False
        self._last_return = time.perf_counter()

    def _close_segment(self) -> None:
        if self._last_return is not None and self._tl.is_open:
            self._tl.last_s = time.perf_counter() - self._last_return
        self._tl.close()

    def idle(self) -> Span:
        """``with pipe.idle():`` around the control's waiting for work (a server with no
        request yet): that time is idle, not stage work. OverlapScore counts everything the
        control does outside the pipeline's calls as its stage work (a closed-loop
        producer); waiting left unmarked would read as overlap."""
        return Span(self._tl, "idle")

    def hard_cut(self) -> int:
        """A new ``cache_epoch`` from the next chunk on: every result still in flight is
        stale and will be dropped. Returns the new epoch."""
        self._need_control("hard_cut()")
        self.epoch += 1
        self._log(["cut", self._next_id, self.epoch])
        return self.epoch

    def _log(self, event: list[Any]) -> None:
        self.history.append(event)
        self._appended += 1

    def submit(self, inputs: dict[str, torch.Tensor]) -> list[Result]:
        """Send one chunk (waiting while ``depth_in`` are in flight) and return the results
        of the current epoch that arrived meanwhile, oldest first."""
        self._need_control("submit()")
        if not self.warmed_up:
            raise ContractError("submit() before warmup(): the mesh must compile in lockstep and pass the gate first")
        self._enter_pipeline()
        out: list[Result] = []
        try:
            out += self._ready()
            while len(self._in_flight) >= self._depth:
                out += self._take(limit=self.config.queue_timeout, why="full")
            if seams.pipeline_cut(self._next_id):
                self.hard_cut()
            self._send(inputs, warmup=False)
            out += self._ready()
        except BaseException as exc:
            self._failing(exc)
            raise
        finally:
            self._leave_pipeline()
        return out

    def drain(self) -> list[Result]:
        """Wait for every chunk still in flight; their current-epoch results, oldest first."""
        self._need_control("drain()")
        self._enter_pipeline()
        out: list[Result] = []
        try:
            while self._in_flight:
                out += self._take(limit=self.config.queue_timeout, why="drain")
        except BaseException as exc:
            self._failing(exc)
            raise
        finally:
            self._leave_pipeline()
        return out

    def _enter_pipeline(self) -> None:
        now = time.perf_counter()
        if self._last_return is not None and self._tl.is_open and not self._first_send_seen:
            self._tl.first_s = now - self._last_return
            self._first_send_seen = True
        self.session.state.begin_call(self._next_id, deadline_bound=True)

    def _leave_pipeline(self) -> None:
        self.session.state.end_call()
        self._last_return = time.perf_counter()

    def _send(self, inputs: dict[str, torch.Tensor], *, warmup: bool) -> None:
        frames = self.chunk_in
        frames.preflight(inputs)  # before commit: a refused chunk reaches no one
        chunk_id = self._next_id
        self._next_id += 1
        with Span(self._tl, "send"):
            self._reap_sends(block=len(self._sends) >= self.config.depth_in * len(self._seq_to))
            for dst in self._seq_to:
                header = Header(
                    kind=Kind.CHUNK, epoch=self.epoch, chunk_id=chunk_id, seq=self._seq_to[dst], sender=self.rank,
                    segment=self._seg, plan=self._plan,
                )  # fmt: skip
                self._seq_to[dst] += 1
                buf = frames.pack(frames.new(), header, inputs)
                self._sends.append((chunk_id, self._isend(buf, dst, f"to_mesh[{dst}]")))
        self._in_flight.append((chunk_id, self.epoch))
        peak = self._tl.extra.get("max_in_flight", 0)
        self._tl.extra["max_in_flight"] = max(peak, len(self._in_flight))  # the D_in bound, observed
        if warmup:
            self.session.state.call_id = chunk_id

    def _reap_sends(self, *, block: bool) -> None:
        while self._sends and (self._sends[0][1].is_completed() or block):
            chunk_id, work = self._sends[0]
            self._wait(work, f"the mesh took no chunk since chunk {chunk_id} was sent")
            self._sends.popleft()
            block = False

    def _full(self, limit: float | None, why: str) -> BackpressureError:
        """The error of a bounded queue that stayed full past ``queue_timeout``: it names
        the depths and what the stage after it did not take."""
        return BackpressureError(
            f"rank {self.rank}: a pipeline queue stayed full for {limit:g}s (D_in={self.config.depth_in}, "
            f"D_out={self.config.depth_out}): {why}"
        )

    def _wait(self, work: Any, why: str) -> None:
        """Wait for a send at most ``queue_timeout`` seconds, else BackpressureError naming ``why``."""
        limit = self.config.queue_timeout
        if self.session.device.type == "cuda":
            if not poll_completed(work, limit):
                raise self._full(limit, why)
            return
        try:
            work.wait(timedelta(seconds=limit))
        except RuntimeError as exc:
            if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
                raise
            raise self._full(limit, why) from None

    def _ready(self) -> list[Result]:
        out: list[Result] = []
        while self._in_flight and self._results and self._results[0].ready():
            out += self._take(limit=self.config.queue_timeout, why="ready")
        return out

    def _take(self, *, limit: float | None, why: str) -> list[Result]:
        """The oldest result: checked, then fenced (dropped if stale) or delivered."""
        posted = self._results.popleft()
        chunk_id, epoch = self._in_flight[0]
        with Span(self._tl, "idle" if why == "full" else "recv"):
            if not posted.wait(limit):
                ids = ", ".join(str(c) for c, _ in self._in_flight)
                raise self._full(limit, f"chunks {ids} in flight, no result from the mesh leader (rank {MESH_LEADER})")
        buf = posted.buf
        header = self.result_out.header(buf, source=f"rank {self.rank}: result from rank {MESH_LEADER}")
        self._post_result()
        self._check_result(header, chunk_id, epoch)
        self._in_flight.popleft()
        if why == "warmup":
            return []  # warmup results are the mesh compiling, never the caller's
        counts = self._tl.extra
        if header.epoch < self.epoch and seams.stale_result_fenced(header.epoch, self.epoch):
            self.stale_dropped += 1
            counts["stale_dropped"] = counts.get("stale_dropped", 0) + 1
            self._log(["drop", chunk_id, header.epoch, self.epoch])
            return []
        if why == "close":
            self.discarded += 1
            self._log(["discard", chunk_id, header.epoch, self.epoch])
            return []
        self._log(["deliver", chunk_id, header.epoch, self.epoch])
        self.delivered += 1
        counts["delivered"] = counts.get("delivered", 0) + 1
        # Views of a buffer received once: the next receive gets a new one.
        return [Result(chunk_id=chunk_id, epoch=header.epoch, tensors=self.result_out.tensors(buf))]

    def _check_result(self, h: Header, chunk_id: int, epoch: int) -> None:
        """A result is a RESULT, next in sequence, of the oldest chunk in flight, and echoes
        that chunk's epoch. (A result of a chunk sent before a hard cut passes: it carries
        its own chunk's epoch; the fence drops it right after, never delivered.)"""
        where = f"rank {self.rank}: result {h.describe()}"
        if h.kind != Kind.RESULT:
            raise ContractError(f"{where}: expected a RESULT")
        if h.seq != self._seq_from:
            raise ContractError(f"{where}: expected seq {self._seq_from} (a result was lost, repeated or reordered)")
        self._seq_from += 1
        if h.chunk_id != chunk_id:
            raise ContractError(f"{where}: expected the result of chunk {chunk_id}, the oldest in flight (results come back in order)")
        if h.epoch != epoch:
            raise ContractError(f"{where}: chunk {chunk_id} was sent with epoch {epoch}; a result must carry its chunk's epoch")

    def close(self) -> None:
        """Control: take what is in flight, then SHUTDOWN to the mesh; the steady window
        closes. Mesh: nothing (serve() returned on SHUTDOWN)."""
        if self.closed:
            return
        self.closed = True
        if not self.is_control:
            if not self.shut_down:
                raise ContractError(
                    f"rank {self.rank} left the pipeline before rank {CONTROL}'s SHUTDOWN: a mesh rank must serve() until it returns"
                )
            return
        if self._failed is not None:
            return  # nothing lines up any more: the exception ends the rank, the abort its peers
        # Results the caller never took are taken (so that the mesh ends on SHUTDOWN), and
        # counted as discarded: never handed to anyone, never "delivered".
        while self._in_flight:
            self._take(limit=self.config.queue_timeout, why="close")
        self._close_segment()
        for dst in self._seq_to:
            header = Header(kind=Kind.SHUTDOWN, epoch=self.epoch, chunk_id=self._next_id, seq=self._seq_to[dst], sender=self.rank)
            self._sends.append((self._next_id, self._isend(self.chunk_in.pack(self.chunk_in.new(), header), dst, f"to_mesh[{dst}]")))
        while self._sends:
            self._reap_sends(block=True)

    # -- mesh (ranks 1..N-1) ---------------------------------------------------------------

    def _post_input(self) -> None:
        buf = self.chunk_in.new()
        self._inputs.append((self._irecv(buf, CONTROL, f"to_mesh[{self.rank}]"), buf))

    def serve(
        self,
        fn: Callable[..., Any],
        *,
        warmup: int,
        on_epoch: Callable[[Chunk], None] | None = None,
    ) -> int:
        """Run ``fn(*chunk.inputs)`` on every chunk until the control's SHUTDOWN; the mesh
        leader sends each result back (``fn`` returns the output tensors: a dict in the
        output contract's order, one tensor, or a tuple). The first ``warmup`` chunks may
        compile (each under the compile deadline), then the compile gate and, for the rest,
        the recompile guard. ``on_epoch(chunk)`` runs before the first chunk of each new
        epoch (reset, or recompute, the rank's cache), as part of its stage work. Returns the chunks served."""
        if self.is_control:
            raise ContractError(f"serve() is the mesh's; rank {CONTROL} is the control: call warmup()/submit()/drain()")
        self._need_intact("serve()")
        self._claim_plan(warmup, "serve", "warmup")
        try:
            return self._serve(fn, warmup, on_epoch)
        except BaseException as exc:
            self._failing(exc)
            raise

    def _serve(self, fn: Callable[..., Any], warmup: int, on_epoch: Callable[[Chunk], None] | None) -> int:
        s = self.session
        s.state.enter("warmup")
        served = 0
        with contextlib.ExitStack() as stack:
            while True:
                t0 = time.perf_counter()
                header, buf = self._next_frame()
                waited = time.perf_counter() - t0
                if header.kind == Kind.SHUTDOWN:
                    self._tl.close()
                    self.shut_down = True
                    return served
                if header.segment >= 0 and header.segment not in self.timelines:
                    self._tl.close()
                    self._tl = self.timelines[header.segment] = Timeline()
                    self._tl.open()
                    self._tl.fill_idle_s = waited  # the pipeline filling: not idle in steady state
                else:
                    self._tl.add("idle", waited)
                chunk = Chunk(
                    chunk_id=header.chunk_id, epoch=header.epoch, tensors=self.chunk_in.tensors(buf), warmup=served < warmup,
                    segment=header.segment,
                )  # fmt: skip
                self.current = chunk
                s.state.begin_call(chunk.chunk_id, deadline_bound=True, deadline_s=s.config.timeouts.compile if chunk.warmup else None)
                with Span(self._tl, "compute"):
                    if header.epoch != self.epoch:
                        self.epoch = header.epoch
                        if on_epoch is not None:
                            on_epoch(chunk)
                    out = fn(*chunk.inputs)
                    if s.device.type == "cuda":
                        # This stream only: NCCL's holds the receives posted ahead, which
                        # complete only once rank 0 has this chunk's result.
                        torch.cuda.current_stream(s.device).synchronize()
                s.state.end_call()
                served += 1
                if self._tl.is_open:
                    self._tl.chunks += 1
                if self.is_mesh_leader:
                    with Span(self._tl, "send"):
                        self._send_result(chunk, out)
                if served == warmup:
                    s.pipeline_gate_after_warmup()
                    self._steady_from(header.chunk_id + 1)
                    guard = s.steady_guard()
                    if guard is not None:
                        stack.enter_context(guard)
                    s.state.enter("steady")

    def _next_frame(self) -> tuple[Header, torch.Tensor]:
        """The next frame this mesh rank computes on, checked. PP1: the leader receives it,
        checks it and broadcasts it (or ERROR) on mesh_pg; the others receive the broadcast."""
        if self.topology.kind == "pp0":
            return self._receive_checked()
        if not self.is_mesh_leader:
            buf = self.chunk_in.new()
            self._broadcast(buf)
            header = self.chunk_in.header(buf, source=f"rank {self.rank}: broadcast from rank {MESH_LEADER}")
            if header.kind == Kind.ERROR:
                raise PeerError(
                    f"rank {MESH_LEADER} (mesh leader) stopped at chunk {header.chunk_id}: {header.reason}", root_cause_rank=MESH_LEADER
                )
            self._check_order(header, f"rank {self.rank}: broadcast {header.describe()}")
            return header, buf
        try:
            header, buf = self._receive_checked()
        except BaseException as exc:
            # The terminal action: the mesh learns why, instead of waiting in a broadcast.
            self.session.terminator.publish(exc)  # rank 0 learns the cause now, not after the broadcast
            error = Header(
                kind=Kind.ERROR, epoch=self.epoch, chunk_id=self._last_chunk + 1, seq=-1, sender=self.rank, reason=f"{type(exc).__name__}: {exc}"
            )
            with contextlib.suppress(Exception):
                self._broadcast(self.chunk_in.pack(self.chunk_in.new(), error))
            raise
        self._broadcast(buf)
        return header, buf

    def _receive_checked(self) -> tuple[Header, torch.Tensor]:
        work, buf = self._inputs.popleft()
        work.wait()  # an empty queue is idle time, not an error: a dead control is the watchdog's
        self._post_input()
        buf = seams.chunk_received(buf, rank=self.rank)
        header = self.chunk_in.header(buf, source=f"rank {self.rank}: chunk from rank {CONTROL}")
        self._check_order(header, f"rank {self.rank}: {header.describe()}")
        return header, buf

    def _check_order(self, h: Header, where: str) -> None:
        """Receiver checks: kind, sequence number, monotonic chunk id, epoch never back."""
        if h.kind not in (Kind.CHUNK, Kind.SHUTDOWN):
            raise ContractError(f"{where}: expected a CHUNK or SHUTDOWN from the control")
        if h.seq != self._expect_seq:
            raise ContractError(f"{where}: expected seq {self._expect_seq} (a message was lost, repeated or reordered)")
        if h.chunk_id <= self._last_chunk:
            raise ContractError(f"{where}: chunk ids must increase, the last was {self._last_chunk}")
        if h.epoch < self.epoch:
            raise ContractError(f"{where}: epoch {h.epoch} after epoch {self.epoch} (an epoch never goes back)")
        if h.kind == Kind.CHUNK and h.plan != self._plan:
            raise ContractError(
                f"{where}: rank {CONTROL} plans {h.plan} warmup chunk(s), this rank {self._plan} (warmup(calls=) and "
                "serve(warmup=) must agree: the compile gate closes after warmup on every rank)"
            )
        self._expect_seq += 1
        self._last_chunk = h.chunk_id

    def _send_result(self, chunk: Chunk, out: Any) -> None:
        frames = self.result_out
        tensors = _as_outputs(out, frames.specs)
        frames.preflight(tensors)
        while len(self._out_sends) >= self.config.depth_out:
            chunk_id, work = self._out_sends[0]
            self._wait(work, f"rank {CONTROL} took no result since chunk {chunk_id}")
            self._out_sends.popleft()
        header = Header(kind=Kind.RESULT, epoch=chunk.epoch, chunk_id=chunk.chunk_id, seq=self._out_seq, sender=self.rank)
        self._out_seq += 1
        self._out_sends.append((chunk.chunk_id, self._isend(frames.pack(frames.new(), header, tensors), CONTROL, "from_mesh")))
        while self._out_sends and self._out_sends[0][1].is_completed():
            self._out_sends.popleft()

    def _steady_from(self, chunk_id: int) -> None:
        fault = self.session.fault_context
        if fault is not None and fault.warmup_calls is None:
            fault.warmup_calls = chunk_id  # a fault's "first steady chunk" is this run's

    # -- the record ------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """This rank's part of the final record's ``pipeline`` section."""
        out: dict[str, Any] = {
            "kind": self.topology.kind, "role": "control" if self.is_control else ("mesh leader" if self.is_mesh_leader else "mesh"),
            "depth_in": self.config.depth_in, "depth_out": self.config.depth_out, "epoch": self.epoch,
            "timelines": {str(i): t.to_json() for i, t in sorted(self.timelines.items())},
            "stage_note": self.stage_note,
        }  # fmt: skip
        if self.is_control:
            out |= {
                "segments": list(self.segments), "chunks": self._next_id, "delivered": self.delivered,
                "stale_dropped": self.stale_dropped, "discarded": self.discarded, "history": list(self.history),
                "history_complete": self._appended <= HISTORY_LIMIT,
            }  # fmt: skip
        return out


def _as_outputs(out: Any, specs: tuple[TensorSpec, ...]) -> dict[str, torch.Tensor]:
    """The mesh leader's result, named by the output contract before it is sent: as many
    tensors as the contract names."""
    if isinstance(out, dict):
        return dict(out)
    values = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    if len(values) != len(specs):
        raise PreflightError(f"the region returned {len(values)} tensor(s), the output contract names {[s.name for s in specs]}")
    return {spec.name: v.detach() for spec, v in zip(specs, values)}


__all__ = ["Chunk", "Frames", "Header", "Kind", "Pipeline", "Result"]
