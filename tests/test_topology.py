"""The declared topologies: which groups exist, who is in them, what parity compares."""

from __future__ import annotations

import pytest

from hardening.runtime.topology import Declared


def test_pp0_sends_to_every_mesh_rank_and_pp1_only_to_the_leader() -> None:
    pp0 = Declared.of("pp0", 3)
    assert pp0.groups == {
        "world_pg": (0, 1, 2), "mesh_pg": (1, 2), "to_mesh[1]": (0, 1), "to_mesh[2]": (0, 2), "from_mesh": (0, 1),
    }  # fmt: skip
    pp1 = Declared.of("pp1", 4)
    assert pp1.groups == {"world_pg": (0, 1, 2, 3), "mesh_pg": (1, 2, 3), "to_mesh[1]": (0, 1), "from_mesh": (0, 1)}
    assert pp1.describe("mesh_pg") == "mesh_pg (ranks 1..3)"


def test_the_declaration_is_what_parity_compares_before_any_group_is_built() -> None:
    keys = Declared.of("pp1", 3).parity_keys()
    assert keys["pipeline.kind"] == "pp1" and keys["pipeline.group.mesh_pg"] == "1,2"
    assert Declared.of("pp0", 3).parity_keys() != keys


def test_one_rank_is_not_a_pipeline() -> None:
    with pytest.raises(ValueError, match="at least 2 ranks"):
        Declared.of("pp0", 1)


def test_a_collective_on_another_declared_group_is_refused_naming_both_and_the_call_site() -> None:
    from hardening.errors import GroupError
    from hardening.runtime.topology import Topology

    world, mesh, down, up = object(), object(), object(), object()
    topo = Topology(Declared.of("pp1", 3), rank=1, groups={"world_pg": world, "mesh_pg": mesh, "to_mesh[1]": down, "from_mesh": up})
    topo.check(mesh, declared="mesh_pg", peer=1, op="broadcast")  # the declared one: fine
    with pytest.raises(GroupError) as refused:
        topo.check(world, declared="mesh_pg", peer=1, op="broadcast of the chunk frame", depth=1)
    message = str(refused.value)
    assert "issued on world_pg (ranks 0..2)" in message and "declares mesh_pg (ranks 1,2)" in message
    assert "test_topology.py:" in message  # the caller's line
    with pytest.raises(GroupError, match="peer rank 2, which is not in it"):
        topo.check(up, declared="from_mesh", peer=2, op="isend to rank 2")
