"""The named causes: every way a hardened rank can refuse to go on.

Each class is a cause a user can act on, and each has its own process exit code so
that a rank's death is readable even when its final record could not be written
(the code table is the single source for both the worker and the runner).
"""

from __future__ import annotations


class HardeningError(RuntimeError):
    """Base of every named cause. ``exit_code`` is what the rank process exits with."""

    exit_code = 10

    def __init__(self, message: str, *, root_cause_rank: int | None = None) -> None:
        super().__init__(message)
        self.root_cause_rank = root_cause_rank
        """The rank whose failure this one follows, when it is not this rank's own."""


class ParityError(HardeningError):
    """Ranks disagree on a fingerprint key (environment, compile settings, backends)."""

    exit_code = 20


class PreflightError(HardeningError):
    """The sender refused to commit a message that would strand its peers."""

    exit_code = 21


class ContractError(HardeningError):
    """A message broke the control-plane contract (manifest, version, ids)."""

    exit_code = 22


class DriftError(HardeningError):
    """Ranks compute on different inputs or weights."""

    exit_code = 23


class LifecycleError(HardeningError):
    """A KV-cache transition does not follow from the rank's local state."""

    exit_code = 24


class CompileGateError(HardeningError):
    """Compile health is out of bounds: graph breaks, recompiles, asymmetry, nothing compiled."""

    exit_code = 25


class WarmupError(HardeningError):
    """Ranks did not warm up in lockstep (different call counts or shapes)."""

    exit_code = 26


class PeerLost(HardeningError):
    """A peer's heartbeat went stale or it never arrived: it is dead or wedged."""

    exit_code = 27


class CallDeadlineExceeded(HardeningError):
    """This rank's current call ran past its deadline."""

    exit_code = 28


class PeerError(HardeningError):
    """Another rank failed first and wrote the job-wide abort; this rank follows it."""

    exit_code = 29


class GroupError(HardeningError):
    """A collective was about to run on a process group other than the one declared for
    it (``world_pg`` where ``mesh_pg`` was declared, a group this rank is not in), or the
    groups a rank built differ from the declared topology."""

    exit_code = 30


class BackpressureError(HardeningError):
    """A bounded pipeline queue stayed full past its deadline: the stage after it took
    nothing (a stalled or far slower stage), instead of blocking forever."""

    exit_code = 31


class Terminated(HardeningError):
    """Someone asked this rank to stop (SIGTERM: its launcher, torchrun's agent after a
    peer failed, an operator) and no peer's failure explains it."""

    exit_code = 32


# Exit codes a rank can end with that are not a named cause.
EXIT_OK = 0
EXIT_UNEXPECTED = 10  # an exception that is not a HardeningError (a bug, or the user's region raised)
EXIT_PARENT_GONE = 11  # the launcher died; the rank ended itself rather than be orphaned

NAMED_CAUSES: dict[str, type[HardeningError]] = {
    cls.__name__: cls
    for cls in (
        ParityError,
        PreflightError,
        ContractError,
        DriftError,
        LifecycleError,
        CompileGateError,
        WarmupError,
        PeerLost,
        CallDeadlineExceeded,
        PeerError,
        GroupError,
        BackpressureError,
        Terminated,
    )
}

CAUSE_BY_EXIT_CODE: dict[int, str] = {cls.exit_code: name for name, cls in NAMED_CAUSES.items()}
CAUSE_BY_EXIT_CODE[EXIT_UNEXPECTED] = "Exception"
CAUSE_BY_EXIT_CODE[EXIT_PARENT_GONE] = "ParentGone"


def exit_code_for(exc: BaseException) -> int:
    """The exit code a rank uses after ``exc`` ended it."""
    if isinstance(exc, HardeningError):
        return exc.exit_code
    return EXIT_UNEXPECTED
