"""Benchmark: pipeline overlap per queue depth, and what recompute-on-epoch-bump costs,
measured in one run.

One runner, one set of rank processes per case (``--ranks``, PP0 by default: rank 0 and
a mesh), the ``pp`` suite's workload with the profile's **modelled** stage times
(``pp.work``: sleeps, so that the figures measure the pipeline, not the scheduler of a
small box): the depth sweep (one measured segment per D in ``pp.sweep``, at most D chunks
in flight from rank 0) and the recompute workload (a hard cut every ``pp.cut_every``
chunks; the mesh restores a stashed cache, then recomputes it for ``recompute_ms`` on
every new epoch).
Printed per segment: OverlapScore (:mod:`hardening.runtime.overlap`), the measured
window against the serial and ideal windows, the mesh's idle time per chunk and the
chunks per second handed to the caller; then the recompute variant against the stash:
OverlapScore delta (O-03's gate), throughput ratio and the window's growth beyond the
extra mesh work (:func:`hardening.harness.checkers.recompute_coupling`). With ``--plot`` (and
matplotlib, ``pip install -e .[bench]``) it also draws OverlapScore and mesh idle
against D.

    python bench/overlap.py [--ranks 2] [--chunks 32] [--kind pp0] [--out bench/results/overlap.md] [--plot bench/results/overlap.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from hardening.harness import checkers
from hardening.harness.cases import Case, completes
from hardening.harness.profile import load_profile
from hardening.harness.results import Verdict
from hardening.harness.runner import Runner


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--kind", choices=("pp0", "pp1"), default="pp0")
    ap.add_argument("--chunks", type=int, default=32, help="steady chunks per measured segment")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--out", default=None, help="also write the table (Markdown) here")
    ap.add_argument("--plot", default=None, help="also draw OverlapScore and mesh idle against D into this PNG")
    args = ap.parse_args()
    profile = load_profile(args.profile, {"world.ranks": args.ranks, "pp.chunks": args.chunks})
    work = profile.pp.work
    cases = [
        Case(id="sweep", title="D sweep", suite="bench", workload=f"{args.kind}:sweep", expect=completes()),
        Case(id="recompute", title="recompute", suite="bench", workload=f"{args.kind}:recompute", expect=completes()),
    ]
    with tempfile.TemporaryDirectory() as tmp, Runner(profile, run_dir=Path(tmp), progress=lambda line: None) as runner:
        results = {case.id: runner.run_case(case) for case in cases}
    for name, result in results.items():
        if result.verdict is not Verdict.PASS:
            print(f"overlap bench: the {name} run did not complete: {result.reason}", file=sys.stderr)
            return 1
    sweep = results["sweep"].ranks[0].pipeline["metrics"]
    recompute = results["recompute"].ranks[0].pipeline["metrics"]

    lines = [
        f"{args.kind}, {args.ranks} gloo CPU ranks, {args.chunks} steady chunks per segment; stage times **modelled** "
        f"(sleeps): rank 0 produce {work.produce_ms:g} ms + consume {work.consume_ms:g} ms, mesh {work.mesh_ms:g} ms "
        f"+ the region, produce and mesh each ±{work.jitter_ms:g} ms per chunk (uniform, seeded), recompute "
        f"{work.recompute_ms:g} ms per new epoch.",
        "",
        "| segment | OverlapScore | window ms | serial ms | ideal ms | mesh idle ms/chunk | results/s | stale dropped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [(name, m) for name, m in sweep.items()] + [(f"cut every {profile.pp.cut_every}: {name}", m) for name, m in recompute.items()]
    for name, m in rows:
        rate = m["results_per_s"]
        score = "—" if m["overlap_score"] is None else f"{m['overlap_score']:.2f}"
        lines.append(
            f"| {name} | {score} | {m['window_ms']:.0f} | {m['serial_ms']:.0f} | {m['ideal_ms']:.0f} | "
            f"{m['mesh_idle_per_chunk_ms']:.2f} | {rate:.1f} | {m['stale_dropped']} |"
        )
    verdict, reason, o3 = checkers.recompute_coupling(results["recompute"].ranks, profile)
    lines += [
        "",
        f"recompute vs stash: OverlapScore delta {o3['score_delta']:+.3f} (O-03 gates it at "
        f"{profile.pp.gates.max_recompute_delta:g}: {verdict.value}{': ' + reason if reason else ''}), results/s ratio "
        f"{o3['throughput_ratio']:.2f}, window growth beyond the extra mesh work {o3['window_growth_beyond_work']:+.3f} "
        "of the stash window",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.plot:
        plot(sweep, Path(args.plot), title=f"{args.kind}, modelled stage times")
    return 0


def plot(sweep: dict, path: Path, *, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("overlap bench: --plot needs matplotlib (pip install -e .[bench]); no plot drawn", file=sys.stderr)
        return
    depths = [int(name.split("=")[1]) for name in sweep]
    fig, score_ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    score_ax.plot(depths, [m["overlap_score"] for m in sweep.values()], "o-", color="tab:blue", label="OverlapScore")
    score_ax.set_xlabel("D: chunks in flight from rank 0 (D_in)")
    score_ax.set_ylabel("OverlapScore", color="tab:blue")
    score_ax.set_ylim(0, 1.1)
    score_ax.set_xticks(depths)
    idle_ax = score_ax.twinx()
    idle_ax.plot(depths, [m["mesh_idle_per_chunk_ms"] for m in sweep.values()], "s--", color="tab:red", label="mesh idle")
    idle_ax.set_ylabel("mesh idle, ms per chunk", color="tab:red")
    idle_ax.set_ylim(bottom=0)
    score_ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
