"""Overlap: how much of a pipeline's stage work ran at the same time, measured, never assumed.

Each rank keeps a :class:`Timeline` of what it did during the steady window (compute,
send, receive, idle); the window opens when warmup ends and closes when the control
closes the pipeline. :func:`overlap_score` turns the control's and the mesh leader's
totals into one number.

**OverlapScore** = achieved overlap / ideal overlap, where, over the steady window,

- ``busy_control``: the control's time outside the pipeline's calls (making inputs,
  taking results: its stage work; a control that also waits for requests marks that
  time with ``pipe.idle()``), ``busy_mesh``: the mesh leader's stage work (the region,
  and any recompute on an epoch bump);
- ``serial = busy_control + busy_mesh``: the window if nothing overlapped;
- ``ideal = max(busy_control, first + busy_mesh + last)``: the shortest possible
  window for these stage times with unbounded queues and free transport. ``first`` is
  the control's work before its first chunk is sent (the mesh cannot start earlier),
  ``last`` its work after it took the last result (the mesh cannot help there);
- ``achieved = serial - measured`` and ``possible = serial - ideal``.

The score is ``achieved / possible``: 0 when the stages ran strictly one after the other,
1 when the window is as short as the stage times allow. It is ``None`` when no overlap is
possible (``possible`` under a millisecond: one stage does all the work). Transport and
queueing are not stage work, so they count against the score; values a little above 1
are clock noise.

``t_mesh_idle_ms`` is the time the mesh leader waited for its next chunk during the
window, the first chunk's wait (the pipeline filling) excluded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

SPANS = ("compute", "send", "recv", "idle")
"""What a rank's time in the window is spent on: its stage work, handing over, taking
delivery, waiting for work (the mesh: an empty input queue; the control: a full one)."""


@dataclass(kw_only=True, slots=True)
class Timeline:
    """One rank's time per span kind within the steady window, in seconds."""

    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SPANS, 0.0))
    chunks: int = 0
    """Chunks of stage work done in the window."""
    open_at: float | None = None
    closed_at: float | None = None
    first_s: float = 0.0
    """Control: its work before the window's first send."""
    last_s: float = 0.0
    """Control: its work after the window's last result."""
    fill_idle_s: float = 0.0
    """Mesh: the wait for the window's first chunk (excluded from idle)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def open(self) -> None:
        self.open_at = time.perf_counter()

    @property
    def is_open(self) -> bool:
        return self.open_at is not None and self.closed_at is None

    def add(self, kind: str, seconds: float) -> None:
        if self.is_open:
            self.totals[kind] += seconds

    def close(self) -> None:
        if self.is_open:
            self.closed_at = time.perf_counter()

    @property
    def window_s(self) -> float:
        if self.open_at is None:
            return 0.0
        return (self.closed_at or time.perf_counter()) - self.open_at

    def to_json(self) -> dict[str, Any]:
        return {
            "window_ms": _ms(self.window_s),
            "chunks": self.chunks,
            **{f"{k}_ms": _ms(v) for k, v in self.totals.items()},
            "first_ms": _ms(self.first_s),
            "last_ms": _ms(self.last_s),
            "fill_idle_ms": _ms(self.fill_idle_s),
            **self.extra,
        }


class Span:
    """``with Span(timeline, "send"):`` adds the block's duration to one span kind."""

    __slots__ = ("timeline", "kind", "t0")

    def __init__(self, timeline: Timeline, kind: str) -> None:
        self.timeline, self.kind, self.t0 = timeline, kind, 0.0

    def __enter__(self) -> Span:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timeline.add(self.kind, time.perf_counter() - self.t0)


def overlap_score(*, window_ms: float, busy_control_ms: float, busy_mesh_ms: float, first_ms: float, last_ms: float) -> dict[str, Any]:
    """The module docstring's OverlapScore and the figures it comes from (all in ms)."""
    serial = busy_control_ms + busy_mesh_ms
    ideal = max(busy_control_ms, first_ms + busy_mesh_ms + last_ms)
    possible = serial - ideal
    achieved = serial - window_ms
    score = round(achieved / possible, 3) if possible >= 1.0 else None
    return {
        "overlap_score": score,
        "window_ms": round(window_ms, 2),
        "serial_ms": round(serial, 2),
        "ideal_ms": round(ideal, 2),
        "achieved_overlap_ms": round(achieved, 2),
        "ideal_overlap_ms": round(possible, 2),
    }


def pipeline_metrics(control: dict[str, Any], leader: dict[str, Any]) -> dict[str, Any]:
    """OverlapScore and mesh idle from the control's and the mesh leader's timelines
    (their ``to_json``): the figures the final record and the reports show."""
    window = control["window_ms"]
    inside = control["send_ms"] + control["recv_ms"] + control["idle_ms"]
    busy_control = max(0.0, window - inside)
    out = overlap_score(
        window_ms=window, busy_control_ms=busy_control, busy_mesh_ms=leader["compute_ms"],
        first_ms=control["first_ms"], last_ms=control["last_ms"],
    )  # fmt: skip
    chunks = max(1, leader["chunks"] - 1)
    delivered = control.get("delivered", 0)
    out |= {
        "delivered": delivered,
        "stale_dropped": control.get("stale_dropped", 0),
        "results_per_s": round(delivered / (window / 1000.0), 2) if window > 0 else 0.0,
        "busy_control_ms": round(busy_control, 2),
        "busy_mesh_ms": leader["compute_ms"],
        "t_mesh_idle_ms": leader["idle_ms"],
        "mesh_idle_per_chunk_ms": round(leader["idle_ms"] / chunks, 3),
        "chunks": leader["chunks"],
    }
    return out


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


__all__ = ["SPANS", "Span", "Timeline", "overlap_score", "pipeline_metrics"]
