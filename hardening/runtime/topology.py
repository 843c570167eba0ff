"""Pipeline topologies: which ranks form which process group, declared once, built in one
order on every rank, checked against the declaration, and named on every collective.

Both topologies put rank 0, the *control* (it makes every chunk's inputs and takes every
result), outside the *mesh* of ranks 1..N-1, which runs the region with tensor
parallelism on ``mesh_pg``. They differ in how a chunk reaches the mesh:

- **PP0**: rank 0 sends each chunk to every mesh rank over p2p (with two ranks: rank 0
  and rank 1, the simplest pipeline);
- **PP1**: rank 0 sends it to the mesh leader (rank 1) alone, which validates it before
  it broadcasts it on ``mesh_pg`` and always ends the mesh with a terminal action.

Either way the mesh leader alone sends the result back.

The groups, created collectively in this order by every rank:

- ``world_pg``: every rank (``dist.group.WORLD``);
- ``mesh_pg``: ranks 1..N-1;
- ``to_mesh[r]``: ranks {0, r}, chunks from rank 0 to mesh rank r (PP0: every mesh rank;
  PP1: the leader only);
- ``from_mesh``: ranks {0, 1}, results from the leader to rank 0.

Why p2p cannot deadlock here: each p2p group carries one direction only, and both of its
ends issue its operations in the same order (message k is the k-th send on one end and
the k-th receive on the other). With one group for both directions, NCCL runs a pair's
operations in issue order on one stream, so a receive the mesh posted early for chunk
k+1 would sit in front of its send of result k, while rank 0 (at D_in=1) waits for result
k before it sends chunk k+1: a cycle. Gloo sends complete only once the peer's receive
is posted, so each side posts every receive it may need before it waits on anything (the
mesh D_in input buffers, rank 0 D_out result buffers): no wait can come before the post
it needs.

Every collective the pipeline issues goes through :meth:`Topology.check`, which refuses a
group other than the declared one, or a group the rank is not in, before the backend
sees it; compiled regions are held to ``mesh_pg`` by the counting backend
(:func:`hardening.runtime.compile.backend.group_problems`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from hardening.errors import GroupError

GROUP_TIMEOUT = timedelta(days=1)
"""The pipeline groups' own timeout (see :meth:`Topology.build`)."""

CONTROL = 0
"""The control rank: outside the mesh, makes the inputs, takes the results."""
MESH_LEADER = 1
"""The mesh rank that talks to the control (and, in PP1, broadcasts to the mesh)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Declared:
    """The groups a topology declares, by name, as global ranks (no process groups yet)."""

    kind: str
    world_size: int
    groups: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, kind: str, world_size: int) -> Declared:
        if world_size < 2:
            raise ValueError(f"pipeline {kind}: needs at least 2 ranks (rank 0 and a mesh), got {world_size}")
        mesh = tuple(range(1, world_size))
        groups = {"world_pg": tuple(range(world_size)), "mesh_pg": mesh}
        for r in mesh if kind == "pp0" else (MESH_LEADER,):
            groups[f"to_mesh[{r}]"] = (CONTROL, r)
        groups["from_mesh"] = (CONTROL, MESH_LEADER)
        return cls(kind=kind, world_size=world_size, groups=groups)

    def parity_keys(self) -> dict[str, str]:
        """What every rank must agree on before any group is built (``new_group`` is
        collective: ranks that declare different groups would pair the wrong ones)."""
        return {f"pipeline.group.{n}": ",".join(map(str, r)) for n, r in self.groups.items()} | {"pipeline.kind": self.kind}

    def describe(self, name: str) -> str:
        ranks = self.groups[name]
        span = f"{ranks[0]}..{ranks[-1]}" if len(ranks) > 2 and ranks == tuple(range(ranks[0], ranks[-1] + 1)) else ",".join(map(str, ranks))
        return f"{name} (ranks {span})"


class Topology:
    """One rank's process groups of a declared topology, checked at init."""

    def __init__(self, declared: Declared, *, rank: int, groups: dict[str, Any]) -> None:
        self.declared = declared
        self.rank = rank
        self.groups = groups
        """Name -> process group (``GroupMember.NON_GROUP_MEMBER`` where this rank is not in it)."""
        self.kind = declared.kind
        self.mesh = declared.groups["mesh_pg"]
        self.is_control = rank == CONTROL
        self.is_mesh_leader = rank == MESH_LEADER
        self._names = {id(g): n for n, g in groups.items() if _is_member(g)}

    @classmethod
    def build(cls, declared: Declared, *, rank: int, device: Any, connect_s: float) -> Topology:
        """Create every declared group, in the declared order (``new_group`` is collective
        over the world: every rank must call it for every group, even one it is not in),
        check each against the declaration, then connect each p2p group in that order.

        The groups' own timeout is long (:data:`GROUP_TIMEOUT`): an idle server waits for
        its next chunk as long as it likes, and every wait that must end is bounded by the
        pipeline itself (``queue_timeout``, the compile deadline) or by the watchdog (a
        dead or stalled peer, a call past its deadline)."""
        groups: dict[str, Any] = {"world_pg": dist.group.WORLD}
        for name, ranks in declared.groups.items():
            if name != "world_pg":
                groups[name] = dist.new_group(list(ranks), timeout=GROUP_TIMEOUT)
        topo = cls(declared, rank=rank, groups=groups)
        topo.check_built()
        topo.connect(device, timeout_s=connect_s)
        return topo

    def connect(self, device: Any, *, timeout_s: float) -> None:
        """One element over each p2p group this rank is in, lower rank sending, every rank
        walking the groups in the same declared order. NCCL connects a pair lazily, at its
        first operation, and blocks until both ends join: without this, rank 0's first
        receive (on ``from_mesh``) and the leader's (on ``to_mesh[1]``) would each wait in a
        different group's setup. It also proves every p2p group carries a message."""
        import torch

        for name, (low, high) in ((n, r) for n, r in self.declared.groups.items() if n not in ("world_pg", "mesh_pg")):
            if self.rank not in (low, high):
                continue
            probe = torch.full((1,), float(low * 1000 + high), device=device)
            group = self.groups[name]
            work = dist.isend(probe, high, group=group) if self.rank == low else dist.irecv(probe, low, group=group)
            try:
                work.wait(timedelta(seconds=timeout_s)) if device.type != "cuda" else work.wait()
            except RuntimeError as exc:
                peer = high if self.rank == low else low
                raise GroupError(f"rank {self.rank}: {self.declared.describe(name)} carried nothing from rank {peer} within {timeout_s:g}s: {exc}") from None
            if self.rank == high and int(probe.item()) != low * 1000 + high:
                raise GroupError(f"rank {self.rank}: {self.declared.describe(name)} delivered {probe.item()}, not its probe: the groups are paired wrong")

    def check_built(self) -> None:
        """Each group holds exactly the declared ranks, and this rank is in exactly the
        groups that name it: GroupError naming the group, what it holds and what was declared."""
        for name, want in self.declared.groups.items():
            group = self.groups.get(name)
            member = group is not None and _is_member(group)
            if member != (self.rank in want):
                raise GroupError(
                    f"rank {self.rank}: {'is' if member else 'is not'} in {name}, but the {self.kind} topology declares "
                    f"{self.declared.describe(name)}"
                )
            if member:
                got = tuple(dist.get_process_group_ranks(group))
                if got != want:
                    raise GroupError(f"rank {self.rank}: {name} holds ranks {list(got)}, the {self.kind} topology declares {list(want)}")

    def group(self, name: str) -> Any:
        return self.groups[name]

    def check(self, group: Any, *, declared: str, peer: int | None = None, op: str, depth: int = 2) -> None:
        """Refuse ``op`` on ``group`` unless it is the declared group ``declared``, this
        rank is in it, and ``peer`` (a global rank: src or dst) is too. Called before the
        backend sees the collective; the error names the caller's line and both groups."""
        used = self._names.get(id(group))
        if used == declared and (peer is None or peer in self.declared.groups[declared]):
            return
        where = caller(depth + 1)
        if not _is_member(group):
            got = "a group this rank is not in"
        elif used is None:
            ranks = dist.get_process_group_ranks(group)
            got = f"an undeclared group (ranks {','.join(map(str, ranks))})"
        else:
            got = self.declared.describe(used)
        peer_note = "" if peer is None or used != declared else f" with peer rank {peer}, which is not in it"
        raise GroupError(
            f"rank {self.rank}: {op} at {where} refused before the backend: it was issued on {got}{peer_note}, "
            f"the {self.kind} topology declares {self.declared.describe(declared)} for it"
        )

    def names(self) -> dict[str, str]:
        """Backend group name -> its declared description, for this rank's groups."""
        out = {}
        for name, group in self.groups.items():
            if _is_member(group):
                out[group_name(group)] = self.declared.describe(name)
        return out


def group_name(group: Any) -> str:
    """The name functional collectives and compiled graphs use for ``group``."""
    name = getattr(group, "group_name", None)
    if isinstance(name, str):
        return name
    return dist.distributed_c10d._get_process_group_name(group)  # torch < 2.3 has no group_name attribute


def _is_member(group: Any) -> bool:
    return group is not None and group is not dist.GroupMember.NON_GROUP_MEMBER


def caller(depth: int) -> str:
    """``file:line`` of the frame ``depth`` levels above the caller."""
    frame = sys._getframe(depth)
    return f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"


__all__ = ["CONTROL", "MESH_LEADER", "Declared", "Topology", "caller", "group_name"]
