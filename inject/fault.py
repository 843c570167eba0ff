"""The fault: what breaks, where and when, as a reversible patch of a named runtime function.

A fault never decides anything on its own: its spec string (``name:rank=1:call=3``) is
set identically on every rank (``HARDENING_FAULT``) and is part of the parity
fingerprint, so test-only behaviour cannot become a conditional collective. Every rank
installs the same patch; the patch changes behaviour only on the fault's ranks and
records the moment it does and what it touched (``fire``: a tensor or parameter name,
so that expectations name the region's own inputs and parameters). A fault that cannot
apply to the region under test (nothing to restride, no checkable parameter) says why
(``skip``) and changes nothing: the case is ``skipped``, not unknown.
"""

from __future__ import annotations

import importlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar


_DIGITS = re.compile(r"-?[0-9]+")  # ASCII only: int() would take "１" (fullwidth) as 1


class FaultSpecError(ValueError):
    """A fault spec names an unknown fault or a bad parameter."""


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultSpec:
    """A parsed ``name:key=value:...`` spec."""

    name: str
    """Registered fault name."""

    ranks: tuple[int, ...] | None = None
    """Ranks the fault acts on; None means the fault's default."""

    all_ranks: bool = False
    """``rank=all``: act on every rank."""

    params: dict[str, str] = field(default_factory=dict)
    """Remaining ``key=value`` pairs, checked by the fault class."""

    text: str = ""
    """The spec as written."""


def parse_spec(text: str) -> FaultSpec:
    """Parse ``name:key=value:...``. Every key at most once; ranks distinct, non-negative."""
    parts = [p.strip() for p in text.strip().split(":")]
    if not parts or not parts[0]:
        raise FaultSpecError(f"empty fault spec {text!r}; expected 'name:key=value:...'")
    ranks: tuple[int, ...] | None = None
    all_ranks = False
    params: dict[str, str] = {}
    seen: set[str] = set()
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise FaultSpecError(f"fault spec {text!r}: {part!r} is not key=value")
        if key in seen:
            raise FaultSpecError(f"fault spec {text!r}: {key} is given twice")
        seen.add(key)
        if key == "rank":
            if value == "all":
                all_ranks = True
            else:
                ranks = _parse_ranks(value, text)
        else:
            params[key] = value
    return FaultSpec(name=parts[0], ranks=ranks, all_ranks=all_ranks, params=params, text=text.strip())


def _parse_ranks(value: str, text: str) -> tuple[int, ...]:
    if not all(_DIGITS.fullmatch(v) for v in value.split("+")):
        raise FaultSpecError(f"fault spec {text!r}: rank must be N, N+M or all, got {value!r}")
    ranks = tuple(int(v) for v in value.split("+"))
    if any(r < 0 for r in ranks):
        raise FaultSpecError(f"fault spec {text!r}: rank {min(ranks)} is negative")
    if len(set(ranks)) != len(ranks):
        raise FaultSpecError(f"fault spec {text!r}: rank {value!r} names a rank twice")
    return ranks


@dataclass(kw_only=True, slots=True)
class FaultContext:
    """What a fault may know about the rank it is installed on."""

    rank: int
    world_size: int
    warmup_calls: int | None = None
    """Call ids >= this are steady-state calls: set by the loop when its steady state
    starts (the program's own warmup, whatever a profile says), None until then."""
    on_fire: Callable[["Fault"], None] = lambda fault: None
    """Called once, when the fault first changes behaviour on this rank."""
    on_skip: Callable[["Fault"], None] = lambda fault: None
    """Called once, when the fault finds it cannot apply to this region on this rank."""


class Fault:
    """Base of every fault. Subclasses set the class attributes and ``wrap``."""

    name: ClassVar[str]
    matrix_id: ClassVar[str]
    summary: ClassVar[str]
    target: ClassVar[str]
    """``module:function`` of the runtime function the fault patches."""
    default_ranks: ClassVar[str] = "1"
    """``all`` or ``N`` / ``N+M``: where it acts when the spec has no ``rank=``."""
    int_params: ClassVar[tuple[str, ...]] = ()
    """Extra integer ``key=value`` parameters the fault accepts (e.g. ``call``)."""
    switch_params: ClassVar[tuple[str, ...]] = ()
    """Those of ``int_params`` that are switches: 0 or 1."""

    def __init__(self, spec: FaultSpec, ctx: FaultContext) -> None:
        unknown = set(spec.params) - set(self.int_params)
        if unknown:
            allowed = ", ".join(("rank",) + self.int_params)
            raise FaultSpecError(f"fault {self.name!r} has no parameter(s) {sorted(unknown)}; it takes: {allowed}")
        for key in spec.params:
            value = _int_param(spec.params, key, 0, spec.text)  # checked here, before any rank starts
            if key in self.switch_params and value not in (0, 1):
                raise FaultSpecError(f"fault spec {spec.text!r}: {key} is a switch, 0 or 1, got {value}")
        self.spec = spec
        self.ctx = ctx
        self.fired_at: float | None = None
        self.touched: str | None = None
        """Name of the tensor or parameter the fault changed, when it changed one."""
        self.skipped: str | None = None
        """Why the fault cannot apply to this region, when it cannot."""
        self._restore: Callable[[], None] | None = None

    @classmethod
    def validate(cls, spec: FaultSpec, *, world_size: int, calls: int | None = None) -> None:
        """Usage check before launch: parameters and ranks exist, and ``call`` (when given
        and ``calls``, the number of calls a case runs, is known) is one that happens."""
        cls(spec, FaultContext(rank=0, world_size=world_size))
        for r in cls._ranks(spec, world_size):
            if not 0 <= r < world_size:
                raise FaultSpecError(f"fault spec {spec.text!r}: rank {r} does not exist with {world_size} ranks")
        call = spec.params.get("call")
        if call is not None and not 0 <= int(call) < (calls if calls is not None else 2**31):
            runs = f"calls 0..{calls - 1} run (warmup_calls + steps)" if calls is not None else "call ids start at 0"
            raise FaultSpecError(f"fault spec {spec.text!r}: call={call} never happens: {runs}")

    @classmethod
    def _ranks(cls, spec: FaultSpec, world_size: int) -> tuple[int, ...]:
        if spec.all_ranks:
            return tuple(range(world_size))
        if spec.ranks is not None:
            return spec.ranks
        if cls.default_ranks == "all":
            return tuple(range(world_size))
        return tuple(int(v) for v in cls.default_ranks.split("+"))

    @property
    def acts_here(self) -> bool:
        return self.ctx.rank in self._ranks(self.spec, self.ctx.world_size)

    def at_call(self) -> int | None:
        """The call a fault with a ``call`` parameter acts at: ``call=``, else the first
        steady-state call (None while that is not known yet)."""
        return self.int_param("call", self.ctx.warmup_calls)

    def int_param(self, key: str, default: int | None) -> int | None:
        spec = getattr(self, "spec", None)
        return _int_param(spec.params if spec else {}, key, default, spec.text if spec else "")

    def fire(self, touched: str | None = None) -> None:
        if self.fired_at is None:
            self.fired_at = time.time()
            self.touched = touched
            self.ctx.on_fire(self)

    def skip(self, why: str) -> None:
        if self.skipped is None and self.fired_at is None:
            self.skipped = why
            self.ctx.on_skip(self)

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        raise NotImplementedError

    def install(self) -> None:
        module_name, _, attr = self.target.partition(":")
        module = importlib.import_module(module_name)
        original = getattr(module, attr)
        setattr(module, attr, self.wrap(original))
        self._restore = lambda: setattr(module, attr, original)

    def uninstall(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None


def flip_low_bit(tensor: Any, index: int = 0) -> None:
    """Flip the lowest bit of one element, in place, in any dtype: the smallest change
    there is (adding 1e-3 does nothing to a bf16 of 0.5), and never a no-op."""
    import torch

    flat = tensor.view(-1)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    with torch.no_grad():
        bits = flat.view(torch.uint8 if flat.dtype == torch.bool else ints)
        bits[index] ^= 1


def _int_param(params: dict[str, str], key: str, default: int | None, text: str) -> int | None:
    value = params.get(key)
    if value is None:
        return default
    if not _DIGITS.fullmatch(value):
        raise FaultSpecError(f"fault spec {text!r}: {key} must be an integer, got {value!r}")
    return int(value)
