"""The ``operator`` suite: the control plane, drift tripwires, dead and stalled ranks.

Each case names the fault, the error every rank must end with and the detection budget.
Preflight, parity and drift faults must be detected well under a second, and so must a
killed or frozen rank: its launcher watches its process from outside it and reports its
death or its stop to every peer at once (:mod:`hardening.harness.liveness`).
"""

from __future__ import annotations

from hardening.harness.cases import Case, RankExpect, completes, crashes, first_fails

SUITE = "operator"


def _leader_refuses(case_id: str, title: str, fault: str, error: str, match: str, *, surface: str = "control-plane") -> Case:
    """The leader refuses before commit; the followers end on its ERROR frame."""
    return Case(
        id=case_id,
        surface=surface,
        min_ranks=1,  # the leader's own check: meaningful with no follower too (one GPU)
        suite=SUITE,
        title=title,
        fault=fault,
        expect=crashes(
            "PeerError",
            match=rf"rank 0 \(leader\) stopped at call \d+: {error}",
            on={0: RankExpect(error=error, match=match)},
            within_s=1,
        ),
        description="Preflight before commit: nothing reaches the data plane, nobody waits.",
    )


def build_cases() -> list[Case]:
    return [
        Case(
            id="OM-00",
            surface="control-plane",
            min_ranks=1,
            suite=SUITE,
            title="served envelopes, digests, cache resets/recomputes: completes",
            expect=completes(),
            description="The clean loop with every tripwire on must not trip.",
        ),
        _leader_refuses("OM-01", "unserializable meta on the sender", "unserializable_meta", "PreflightError", r"meta\.on_done"),
        _leader_refuses("OM-02", "unsupported dtype in the envelope", "unsupported_dtype", "PreflightError", r"float64"),
        _leader_refuses("OM-03", "phase-plan / call-count mismatch", "plan_mismatch", "PreflightError", r"expected_generator_calls",
                        surface="multi-group"),
        Case(
            id="OM-04",
            surface="determinism",
            suite=SUITE,
            title="one rank's own config differs (region.seed, or the program's first numeric key)",
            fault="config_skew:rank=1",
            expect=crashes("ParityError", match=r"{touched}", within_s=1),
        ),
        Case(
            id="OM-05",
            surface="multi-group",
            suite=SUITE,
            title="a collective-gating flag set on one rank",
            fault="collective_gating_flag:rank=1",
            expect=crashes("ParityError", match=r"HARDENING_NAN_CHECK_ALLREDUCE", within_s=1),
            description="A flag that adds a collective on one rank must fail before any collective.",
        ),
        _leader_refuses("OM-06", "tensor sent outside the manifest", "tensor_outside_manifest", "ContractError", r"debug_latents"),
        _leader_refuses("OM-10", "recompute override missing", "missing_recompute_override", "PreflightError", r"recompute_override",
                        surface="kv-cache"),
        Case(
            id="OM-11",
            surface="determinism",
            suite=SUITE,
            title="input mutated on a receiver after receive",
            fault="input_mutation:rank=1",
            expect=first_fails(1, "DriftError", match=r"call \d+: rank 1 \({touched}\) differs from the leader", within_s=1),
            description="The receiver checks what arrived against the leader's digest in the frame, before its data plane.",
        ),
        Case(
            id="OM-12",
            surface="determinism",
            suite=SUITE,
            title="one element of one rank's weight shard perturbed",
            fault="weight_perturbation:rank=1",
            expect=crashes("DriftError", match=r"parameter '{touched}' on rank 1", within_s=1),
        ),
        Case(
            id="OM-13",
            surface="shutdown",
            suite=SUITE,
            title="rank 0 killed mid-loop (SIGKILL)",
            fault="kill:rank=0",
            expect=crashes("PeerLost", match=r"rank 0 died", on={0: RankExpect(error="SIGKILL")}, within_s=1),
            description="Workers must not wait 30 min in a collective for a dead leader.",
        ),
        Case(
            id="H-01",
            surface="shutdown",
            suite=SUITE,
            title="a rank stalls inside a call (SIGSTOP)",
            fault="stall:rank=1",
            expect=crashes("PeerLost", match=r"rank 1 lost: .*stopped", on={1: RankExpect(error="hung")}, within_s=1),
            description="SIGSTOP freezes every thread of the rank, so only its launcher can see it (/proc state T); "
            "peers leave within a watchdog tick of its report; the runner's py-spy stacks show the frozen rank.",
        ),
        Case(
            id="K-01",
            surface="kv-cache",
            suite=SUITE,
            title="a rank skips a KV-cache reset",
            fault="skip_cache_reset:rank=1",
            expect=first_fails(1, "LifecycleError", match=r"reset was skipped", within_s=1),
        ),
    ]
