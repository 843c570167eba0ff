"""The stable import path of the region factory contract, for users' factories:
``from hardening.region import Region, RegionContext``. The contract itself is the
harness's (:mod:`hardening.harness.region`); this path stays when modules move."""

from hardening.harness.region import Region, RegionContext

__all__ = ["Region", "RegionContext"]
