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
