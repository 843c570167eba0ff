"""OverlapScore: the definition on stage times worked out by hand."""

from __future__ import annotations

import pytest

from hardening.runtime.overlap import Span, Timeline, overlap_score, pipeline_metrics


def test_strictly_serial_stages_score_zero_and_the_shortest_possible_window_scores_one() -> None:
    # Control 300 ms of work, mesh 400 ms; its first chunk costs 10 ms and its last result 5 ms.
    ideal = max(300.0, 10 + 400 + 5)
    assert overlap_score(window_ms=700, busy_control_ms=300, busy_mesh_ms=400, first_ms=10, last_ms=5)["overlap_score"] == 0.0
    best = overlap_score(window_ms=ideal, busy_control_ms=300, busy_mesh_ms=400, first_ms=10, last_ms=5)
    assert best["overlap_score"] == 1.0 and best["ideal_ms"] == 415.0 and best["serial_ms"] == 700.0


def test_half_the_possible_overlap_scores_one_half() -> None:
    # serial 700, ideal 415: 285 ms could overlap; a window of 557.5 ms saved half of it.
    m = overlap_score(window_ms=557.5, busy_control_ms=300, busy_mesh_ms=400, first_ms=10, last_ms=5)
    assert m["overlap_score"] == pytest.approx(0.5) and m["ideal_overlap_ms"] == 285.0


def test_no_possible_overlap_is_no_score_rather_than_a_division() -> None:
    # The mesh does all the work: nothing could run beside it.
    assert overlap_score(window_ms=100, busy_control_ms=0.2, busy_mesh_ms=99, first_ms=0.1, last_ms=0.1)["overlap_score"] is None


def test_pipeline_metrics_take_the_control_busy_time_as_its_window_outside_pipeline_calls() -> None:
    control = {"window_ms": 600.0, "send_ms": 20.0, "recv_ms": 30.0, "idle_ms": 250.0, "first_ms": 10.0, "last_ms": 5.0}
    leader = {"compute_ms": 400.0, "idle_ms": 15.0, "chunks": 16}
    m = pipeline_metrics(control, leader)
    assert m["busy_control_ms"] == 300.0 and m["busy_mesh_ms"] == 400.0
    assert m["t_mesh_idle_ms"] == 15.0 and m["mesh_idle_per_chunk_ms"] == 1.0  # the first chunk's wait is the fill
    assert m["overlap_score"] == pytest.approx((700 - 600) / (700 - 415), abs=1e-3)


def test_a_timeline_counts_only_inside_its_window() -> None:
    t = Timeline()
    with Span(t, "send"):
        pass
    assert t.totals["send"] == 0.0  # not open yet: warmup adds nothing
    t.open()
    t.add("idle", 0.25)
    t.close()
    t.add("idle", 1.0)
    assert t.totals["idle"] == 0.25 and t.to_json()["idle_ms"] == 250.0
