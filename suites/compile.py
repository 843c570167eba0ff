"""The ``compile`` suite: compile parity, graph breaks, recompiles, backends, warmup.

Each case names the fault (what breaks), the error every rank must end with, and the
detection budget (last rank's exit minus the fault's fire time). Budgets are for the
CPU profile; they cover parity and gate exchanges, not the ~1-2 s first compile, except
where the fault fires at build time and detection needs the first compile (C-02, C-05).
"""

from __future__ import annotations

from hardening.harness.cases import Case, completes, crashes, first_fails

SUITE = "compile"


def build_cases() -> list[Case]:
    return [
        Case(
            id="C-00",
            surface="compiled-regions",
            min_ranks=1,
            suite=SUITE,
            title="clean region: completes, 0 breaks, 0 recompiles, symmetric",
            expect=completes(),
            description="Guards against false crashes: the unfaulted region must pass every gate.",
        ),
        Case(
            id="C-01",
            surface="compiled-regions",
            suite=SUITE,
            title="compile enabled on one rank only",
            fault="compile_one_rank:rank=1",
            expect=crashes("ParityError", match=r"compile\.enabled", within_s=3),
            description="Funcol regions run fine half-compiled; only a parity handshake notices.",
        ),
        Case(
            id="C-02",
            surface="compiled-regions",
            min_ranks=1,
            suite=SUITE,
            title="graph break injected into the region",
            fault="graph_break:rank=all",
            # Every rank hits the break at its first call; under fullgraph the faster one's
            # abort may reach a peer still compiling: that peer follows the same cause.
            expect=crashes("CompileGateError", match=r"graph.?break", within_s=20, followers_ok=True),
            description="A break must fail the gate with its reason, whether fullgraph or counted.",
        ),
        Case(
            id="C-03",
            surface="compiled-regions",
            suite=SUITE,
            title="one rank recompiles after warmup",
            fault="recompile:rank=1",
            expect=first_fails(1, "CompileGateError", match=r"rank 1 recompiled.*(guard|stride|mismatch)", within_s=3),
            description="The recompiling rank names the guard; its peers, stuck in a collective, follow it.",
        ),
        Case(
            id="C-04",
            surface="compiled-regions",
            suite=SUITE,
            title="effective SDPA backend resolves differently on one rank",
            fault="backend_divergence:rank=1",
            expect=crashes("ParityError", match=r"sdpa", within_s=3),
            description="Same config, different kernel: the measured backend, not the flag, is compared.",
        ),
        Case(
            id="C-05",
            surface="compiled-regions",
            suite=SUITE,
            title="a collective only rank 0 issues, inside the compiled region",
            fault="conditional_collective:rank=0",
            # The fault acts at build time: as for C-02 the budget holds the first compile
            # (seconds for a Hugging Face model), which the check follows at once, before
            # the graph runs. Where the region's own collectives are not in Dynamo's graph
            # (DTensor issues them as it runs), rank 0 names rank 1 blocked in one no graph
            # announced, and rank 1, stuck in it, follows. With more ranks the words are the
            # first pair that compared them: rank 0 and whichever peer that was.
            expect=crashes(
                "CompileGateError", match=r"collectives differ.*rank 0: all_reduce\(sum\) of .* at \S+:\d+; rank \d+: ",
                within_s=20, followers_ok=True,
            ),
            description="Named from the compiled graphs' collectives, compared across ranks before they run.",
        ),
        Case(
            id="W-01",
            surface="compiled-regions",
            suite=SUITE,
            title="one rank runs fewer warmup calls",
            fault="short_warmup:rank=1",
            expect=crashes("WarmupError", match=r"plans \d+ warmup call", within_s=3),
            description="Lockstep tickets catch the short rank before it strands a peer in a collective.",
        ),
    ]
