"""The ``pp`` suite: the pipeline half (PP0, PP1), its tripwires and its overlap metrics.

Each case names the workload (``pp0``/``pp1`` and a mode, see
:mod:`hardening.harness.pipeline_workload`), the fault, the error every rank must end with
and the detection budget; metric cases (O-01..O-03) and the epoch fence (OM-09) are judged
by a checker on the stored records, against the profile's ``pp.gates``. Stage times are
modelled (``pp.work``). Cases that need a mesh of two (a leader broadcast, a group that
differs from the world) need 3 ranks.
"""

from __future__ import annotations

from hardening.harness.cases import Case, RankExpect, completes, crashes

SUITE = "pp"


def build_cases() -> list[Case]:
    return [
        Case(
            id="PP-00",
            surface="backpressure",
            suite=SUITE,
            title="clean PP0 run (rank 0 sends each chunk to every mesh rank): completes",
            workload="pp0",
            expect=completes(),
            description="Bounded queues, stamped messages, receiver checks and the compile gate over the mesh must not trip.",
        ),
        Case(
            id="PP-01",
            surface="multi-group",
            suite=SUITE,
            title="clean PP1 run (the mesh leader validates and broadcasts): completes",
            workload="pp1",
            expect=completes(),
            min_ranks=3,
        ),
        Case(
            id="OM-07",
            surface="shutdown",
            suite=SUITE,
            title="the mesh leader's check refuses a chunk (sequence number off)",
            workload="pp1",
            fault="leader_bad_chunk:rank=1",
            expect=crashes(
                "PeerError",
                match=r"rank 1\b.*ContractError.*expected seq",
                on={1: RankExpect(error="ContractError", match=r"expected seq \d+")},
                within_s=1,
            ),
            min_ranks=3,
            description="The leader's terminal action (ERROR on mesh_pg) ends the mesh; the abort ends rank 0. Nobody waits.",
        ),
        Case(
            id="OM-08",
            surface="multi-group",
            suite=SUITE,
            title="the mesh's region issues an all_reduce on world_pg, not mesh_pg",
            workload="pp1",
            fault="wrong_group",
            # Every mesh rank compiles the same wrong region; the faster one's abort may reach
            # the other first. The budget holds the first compile, as for C-02 (a Hugging
            # Face model's takes seconds).
            expect=crashes(
                "GroupError",
                match=r"refused before the backend: all_reduce\(sum\).* at \S+:\d+ is issued on world_pg \(ranks 0.*declared for the region: mesh_pg",
                on={0: RankExpect(error="PeerError", match=r"GroupError")},
                within_s=20,
                followers_ok=True,
            ),
            min_ranks=3,
            description="A world collective that rank 0 never joins would hang the mesh until the process-group timeout.",
        ),
        Case(
            id="OM-09",
            surface="epochs",
            suite=SUITE,
            title="hard cut while results are in flight: stale results dropped, never delivered",
            workload="pp0",
            fault="hard_cut",
            expect=completes(),
            check="fence_held",
            description="Judged from rank 0's delivery history: a stale delivery fails the case; no drop is unknown.",
        ),
        Case(
            id="PP-02",
            surface="backpressure",
            suite=SUITE,
            title="the mesh stops taking chunks: rank 0's full queue is a named error",
            workload="pp0",
            fault="stalled_stage",
            expect=crashes(
                "PeerError",
                match=r"rank 0 failed first: BackpressureError",
                on={0: RankExpect(error="BackpressureError", match=r"no result from the mesh leader")},
                within_s=7,  # pipeline.queue_timeout (5 s by default) and the abort
            ),
            description="A bounded queue past its deadline (pipeline.queue_timeout), not an indefinite block.",
        ),
        Case(
            id="O-01",
            surface="backpressure",
            suite=SUITE,
            title="D sweep: OverlapScore and mesh idle per queue depth",
            workload="pp0:sweep",
            expect=completes(),
            check="depth_sweep",
            description="D >= 2 must reach pp.gates.min_overlap_score; D=1 and the gain of D=2 over it are reported.",
        ),
        Case(
            id="O-02",
            surface="backpressure",
            suite=SUITE,
            title="overlap signature at the default depth: OverlapScore and t_mesh_idle_ms gated",
            workload="pp1",
            expect=completes(),
            check="overlap_signature",
        ),
        Case(
            id="O-03",
            surface="backpressure",
            suite=SUITE,
            title="recompute coupling: OverlapScore with recompute-on-epoch-bump vs a stashed cache",
            workload="pp0:recompute",
            expect=completes(),
            check="recompute_coupling",
        ),
    ]
