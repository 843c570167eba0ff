"""Checkers: verdicts that need more than how each rank ended, as pure functions of the
ranks' stored records and the profile's gates.

A case names one in ``Case.check``; the runner calls it only once the expectation is met
(every rank completed, or crashed as named). Each returns ``(verdict, reason, metrics)``;
a checker that cannot decide (the history does not hold what it needs: no result was in
flight at the cut, a segment measured nothing) says UNKNOWN, never PASS. The epoch fence
is judged from the control's delivery history, not from its counters.
"""

from __future__ import annotations

from typing import Any, Callable

from hardening.harness.profile import Profile
from hardening.harness.results import RankResult, Verdict

Checked = tuple[Verdict, str, dict[str, Any]]

MEASURED = "stage times as the program ran them"


def _note(ranks: list[RankResult]) -> str:
    """What the stage times were (modelled by the harness's workload, or a program's own),
    said next to every overlap figure the reports show."""
    return _control(ranks).get("stage_note") or MEASURED


def _control(ranks: list[RankResult]) -> dict[str, Any]:
    return next((r.pipeline for r in ranks if r.rank == 0), {}) or {}


def fence_held(ranks: list[RankResult], profile: Profile) -> Checked:
    """OM-09: after every hard cut, results of an older epoch were dropped and counted,
    and every result handed to the caller was of the epoch current when it arrived.

    Each chunk's epoch is worked out from the cuts alone (a cut at chunk k starts its
    epoch there), never read from what the pipeline stamped: a mis-stamped chunk, a drop
    that was not stale, a chunk taken twice and a stale delivery all fail."""
    control = _control(ranks)
    history = control.get("history")
    if not isinstance(history, list):
        return Verdict.UNKNOWN, "rank 0 recorded no pipeline history", {}
    cuts = [e for e in history if e[0] == "cut"]
    drops = [e for e in history if e[0] == "drop"]
    delivered = [e for e in history if e[0] == "deliver"]
    metrics = {"cuts": len(cuts), "stale_dropped": len(drops), "delivered": len(delivered)}
    if not cuts:
        return Verdict.UNKNOWN, "no hard cut happened", metrics
    epoch_from = sorted((first, epoch) for _, first, epoch in cuts)

    def epoch_of(chunk_id: int) -> int:
        return max([0] + [epoch for first, epoch in epoch_from if first <= chunk_id])

    seen: set[int] = set()
    for event in history:
        kind = event[0]
        if kind == "cut":
            continue
        _, chunk_id, stamped, current = event
        if chunk_id in seen:
            return Verdict.FAIL, f"chunk {chunk_id} taken twice", metrics
        seen.add(chunk_id)
        if stamped != epoch_of(chunk_id):
            return Verdict.FAIL, f"chunk {chunk_id} carried epoch {stamped}, but the cuts put it in epoch {epoch_of(chunk_id)}", metrics
        if kind == "deliver" and stamped != current:
            return Verdict.FAIL, f"stale result delivered: chunk {chunk_id} of epoch {stamped} handed over in epoch {current}", metrics
        if kind == "drop" and stamped >= current:
            return Verdict.FAIL, f"chunk {chunk_id} of the current epoch {current} was dropped as stale", metrics
    if not drops:
        return Verdict.UNKNOWN, "no result was in flight at the cut: the fence was never tested (D_in=1?)", metrics
    last_cut = history.index(cuts[-1])
    if not any(e[0] == "deliver" for e in history[last_cut:]):
        return Verdict.UNKNOWN, "no result of the new epoch was delivered after the cut", metrics
    if control.get("history_complete", True) and control.get("stale_dropped") != len(drops):
        return Verdict.FAIL, f"rank 0 counted {control.get('stale_dropped')} stale drops, its history holds {len(drops)}", metrics
    return Verdict.PASS, "", metrics


def _segments(ranks: list[RankResult]) -> dict[str, dict[str, Any]]:
    return _control(ranks).get("metrics") or {}


def _need(segments: dict[str, dict[str, Any]], names: list[str]) -> str | None:
    for name in names:
        if segments.get(name, {}).get("overlap_score") is None:
            return f"segment {name!r} has no OverlapScore (not measured, or no overlap was possible)"
    return None


def overlap_signature(ranks: list[RankResult], profile: Profile) -> Checked:
    """O-02: the steady window's OverlapScore and the mesh's idle time per chunk within the gates."""
    gates, segments = profile.pp.gates, _segments(ranks)
    missing = _need(segments, ["steady"])
    if missing:
        return Verdict.UNKNOWN, missing, {}
    m = segments["steady"]
    metrics = {k: m[k] for k in ("overlap_score", "t_mesh_idle_ms", "mesh_idle_per_chunk_ms", "window_ms", "ideal_ms", "serial_ms")}
    metrics["note"] = _note(ranks)
    problems = []
    if m["overlap_score"] < gates.min_overlap_score:
        problems.append(f"OverlapScore {m['overlap_score']:.2f} < {gates.min_overlap_score:g}")
    if m["mesh_idle_per_chunk_ms"] > gates.max_mesh_idle_per_chunk_ms:
        problems.append(f"mesh idle {m['mesh_idle_per_chunk_ms']:.2f} ms/chunk > {gates.max_mesh_idle_per_chunk_ms:g}")
    return (Verdict.FAIL, "; ".join(problems), metrics) if problems else (Verdict.PASS, "", metrics)


def depth_sweep(ranks: list[RankResult], profile: Profile) -> Checked:
    """O-01: every D >= 2 reaches the OverlapScore gate. What the second buffer buys over
    one (``gain_d2_over_d1``) is reported, not gated: it depends on how balanced the
    stages are (a mesh-bound pipeline overlaps nearly as well at D=1)."""
    gates, segments = profile.pp.gates, _segments(ranks)
    names = [f"D={d}" for d in profile.pp.sweep]
    missing = _need(segments, names)
    if missing:
        return Verdict.UNKNOWN, missing, {}
    metrics: dict[str, Any] = {
        name: {"overlap_score": segments[name]["overlap_score"], "t_mesh_idle_ms": segments[name]["t_mesh_idle_ms"]} for name in names
    }
    metrics["note"] = _note(ranks)
    problems = [
        f"{name}: OverlapScore {segments[name]['overlap_score']:.2f} < {gates.min_overlap_score:g}"
        for d, name in zip(profile.pp.sweep, names)
        if d >= 2 and segments[name]["overlap_score"] < gates.min_overlap_score
    ]
    if "D=1" in metrics and "D=2" in metrics:
        metrics["gain_d2_over_d1"] = round(metrics["D=2"]["overlap_score"] - metrics["D=1"]["overlap_score"], 3)
    return (Verdict.FAIL, "; ".join(problems), metrics) if problems else (Verdict.PASS, "", metrics)


def recompute_coupling(ranks: list[RankResult], profile: Profile) -> Checked:
    """O-03: does recomputing the mesh's cache on every epoch bump re-serialize the
    pipeline? Recompute is more mesh work, which the OverlapScore's ideal window already
    holds (it is made of the measured stage times); what the score loses against the
    stashed variant is overlap the recompute took away: the stages waiting on each other
    around it. Gated: ``stash − recompute`` OverlapScore at most ``max_recompute_delta``.
    Reported beside it: the results/s ratio (what the extra work costs) and the window's
    growth beyond the extra mesh work, as a share of the stash window (noisy where the
    region's own time varies as much as the recompute: a 2-core box running 3 ranks)."""
    gates, segments = profile.pp.gates, _segments(ranks)
    missing = _need(segments, ["stash", "recompute"])
    if missing:
        return Verdict.UNKNOWN, missing, {}
    control = _control(ranks)
    if not any(e[0] == "cut" for e in control.get("history", [])):
        return Verdict.UNKNOWN, "no hard cut happened: nothing was recomputed", {}
    stash, recompute = segments["stash"], segments["recompute"]
    delta = round(stash["overlap_score"] - recompute["overlap_score"], 3)
    keep = ("overlap_score", "results_per_s", "window_ms", "busy_mesh_ms")
    metrics = {
        "stash": {k: stash.get(k) for k in keep},
        "recompute": {k: recompute.get(k) for k in keep},
        "score_delta": delta,
        "throughput_ratio": round(recompute["results_per_s"] / stash["results_per_s"], 3) if stash.get("results_per_s") else None,
        "window_growth_beyond_work": round(
            ((recompute["window_ms"] - stash["window_ms"]) - (recompute["busy_mesh_ms"] - stash["busy_mesh_ms"])) / stash["window_ms"], 3
        ),
        "note": _note(ranks),
    }
    if delta > gates.max_recompute_delta:
        return (
            Verdict.FAIL,
            f"recompute re-serializes the pipeline: OverlapScore {recompute['overlap_score']:.2f} against {stash['overlap_score']:.2f} "
            f"with a stashed cache (delta {delta:.2f} > {gates.max_recompute_delta:g})",
            metrics,
        )
    return Verdict.PASS, "", metrics


CHECKERS: dict[str, Callable[[list[RankResult], Profile], Checked]] = {
    "fence_held": fence_held,
    "overlap_signature": overlap_signature,
    "depth_sweep": depth_sweep,
    "recompute_coupling": recompute_coupling,
}


def run(name: str, ranks: list[RankResult], profile: Profile) -> Checked:
    """The named checker's verdict; a checker that raises is UNKNOWN with the error (a
    broken checker must never pass a case)."""
    try:
        return CHECKERS[name](ranks, profile)
    except Exception as exc:  # noqa: BLE001 - an undecidable history, not a pass
        return Verdict.UNKNOWN, f"checker {name} could not decide: {type(exc).__name__}: {exc}", {}


__all__ = ["CHECKERS", "MEASURED", "run"]
