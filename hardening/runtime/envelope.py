"""The control-plane envelope: one framed, validated message per call, leader to all ranks.

The control frame is ``uint8[1024]``: prefix (magic, protocol version, kind, header
length, meta length, tensor count, digest length), then the leader's input digest when
the call is checked, the header (canonical JSON: call_id, cache_epoch, plan, tensor_specs
manifest) and the meta (canonical JSON: sorted keys, no NaN, no pickle). Its size never
depends on the call, so it can never mismatch; a longer payload continues in one more
broadcast whose length the prefix announces. It travels one of two ways, chosen once per
channel from the call contract (:func:`host_layout`), identically on every rank:

- **fused** (the data plane is the host, e.g. gloo on CPU): frame and tensors are one
  ``uint8`` buffer, one broadcast on the data group. Each tensor of the contract has a
  fixed, aligned slot after the frame (sized for its largest declared shape); receivers
  get views into the buffer, no copy. A call costs one collective before the region (two
  when digest, header and meta outgrow the frame) -- fewer than a loop that broadcasts
  its raw input tensors one by one -- and a frame is atomic: a receiver that refuses it
  has nothing left to drain. Every frame, SHUTDOWN and ERROR included, ships the whole
  buffer: the price of a size that never depends on the call.
- **split** (device tensors, e.g. NCCL; or a varying contract whose largest call would
  make the buffer large): the frame on the gloo control group, then the tensors of the
  manifest, in order, on the data group, where they live.

Either way there is no point where the ranks wait for each other outside the data plane:
the runtime's per-call cost is the frame and the digest, nothing more.

**Commit last**: the leader serializes meta, checks every dtype, shape and the plan,
stages every tensor on the device and computes its digest *before* broadcasting the
control frame (the commitment point). Anything that fails there sends an ``ERROR`` frame
instead, so peers end with a named error instead of waiting. After the commit only the
data-plane broadcasts run; if one of them fails the data plane itself is broken, and the
job-wide abort key (see :mod:`hardening.runtime.watchdog`) carries the cause to every peer.
Receivers check version, kind, call_id monotonicity, the manifest against the call
contract and the digest's length; :func:`hardening.runtime.drift.check_input` then compares what
arrived with the leader's digest.

Faults never patch this module: they act at the seams around it
(:mod:`hardening.runtime.seams`: ``outgoing_envelope``, ``received_envelope``).
"""

from __future__ import annotations

import enum
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from hardening.runtime.digest import digest_len as digest_words
from hardening.runtime.digest import host_bytes, input_digest
from hardening.errors import ContractError, PeerError, PreflightError

PROTOCOL_VERSION = 3
MAGIC = 0x48415244  # "HARD"
PREFIX_LEN = 7

ALLOWED_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
CACHE_OPS = ("advance", "reset", "recompute")


class Kind(enum.IntEnum):
    CALL = 1
    SHUTDOWN = 2
    ERROR = 3


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorSpec:
    """One manifest entry; in a call contract, what every call's entry must match."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    varying: tuple[tuple[int, int, int], ...] = ()
    """Contract only: ``(dim, low, high)`` for each dimension whose size may change from
    call to call (token count, sequence length) within ``low..high``; every other
    dimension, the rank and the dtype are fixed."""

    def __post_init__(self) -> None:
        for dim, low, high in self.varying:
            if not -len(self.shape) <= dim < len(self.shape):
                raise ValueError(f"tensor {self.name!r}: varying dim {dim} does not exist in shape {self.shape}")
            if not 0 <= low <= self.shape[dim] <= high:
                raise ValueError(
                    f"tensor {self.name!r}: dim {dim} is {self.shape[dim]} in its shape {self.shape}, outside its "
                    f"declared {low}..{high} (the bounds must hold the shape the contract is described with)"
                )

    def mismatch(self, actual: "TensorSpec") -> str | None:
        """Why ``actual`` (a call's manifest entry) breaks this contract entry, or None."""
        if actual.dtype != self.dtype or len(actual.shape) != len(self.shape):
            return f"is {actual.shape}/{actual.dtype}, the contract says {self.describe()}"
        free = {dim % len(self.shape): (lo, hi) for dim, lo, hi in self.varying}
        for dim, (size, want) in enumerate(zip(actual.shape, self.shape)):
            bounds = free.get(dim)
            if bounds is None and size != want:
                return f"is {actual.shape}/{actual.dtype}: dim {dim} is {size}, fixed at {want} by the contract {self.describe()}"
            if bounds is not None and not bounds[0] <= size <= bounds[1]:
                return f"is {actual.shape}/{actual.dtype}: dim {dim} is {size}, outside its declared {bounds[0]}..{bounds[1]}"
        return None

    def describe(self) -> str:
        dims = list(map(str, self.shape))
        for dim, lo, hi in self.varying:
            dims[dim % len(self.shape)] = f"{lo}..{hi}"
        return f"({', '.join(dims)})/{self.dtype}"


@dataclass(frozen=True, kw_only=True, slots=True)
class CallContract:
    """What every CALL must carry, identical on every rank (built from the region)."""

    tensors: tuple[TensorSpec, ...]
    """The manifest every CALL must match: names, shapes and dtypes, in order."""

    expected_generator_calls: int = 1
    """Region calls one envelope triggers on every rank (the phase plan)."""


@dataclass(kw_only=True, slots=True)
class Envelope:
    """One message of the control plane."""

    kind: Kind
    """CALL, or a terminal action (SHUTDOWN, ERROR with its cause), in the frame's prefix with the magic and protocol version."""
    call_id: int
    """Monotonic over the run: a receiver refuses a skipped or replayed call."""
    cache_epoch: int = 0
    """The KV-cache epoch the call runs in; a reset starts a new one."""
    plan: dict[str, Any] = field(default_factory=dict)
    """Phase plan: ``expected_generator_calls`` and the KV-cache ``cache_op``."""
    meta: dict[str, Any] = field(default_factory=dict)
    """The call's small settings, as canonical JSON (sorted keys, no NaN, never a pickle)."""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """In manifest order (the header's ``tensor_specs``: name, shape, dtype of each)."""
    blob: bytes = b""
    """Header and meta bytes as sent (filled by send/receive; digested by drift checks)."""
    digest: list[int] | None = None
    """The leader's input digest of this call, when the call is checked (filled by send/receive)."""


@dataclass(frozen=True, slots=True)
class Layout:
    """The one host buffer of a fused frame: the control frame, then one aligned slot per
    contract tensor, in contract order."""

    offsets: tuple[int, ...]
    """Byte offset of each tensor's slot in the buffer."""
    size: int
    """Bytes of the whole buffer (frame and every slot at its largest)."""

    def slot(self, buffer: torch.Tensor, index: int, spec: TensorSpec) -> torch.Tensor:
        """Tensor ``index`` of a call, shaped as its manifest entry says: a view into ``buffer``."""
        start = self.offsets[index]
        nbytes = math.prod(spec.shape) * _ITEMSIZE[spec.dtype]
        return buffer[start : start + nbytes].view(ALLOWED_DTYPES[spec.dtype]).view(spec.shape)


_SLOT_ALIGN = 64  # every slot starts on a cache line: compiled kernels may assume aligned inputs
FUSE_VARYING_LIMIT = 256 * 1024
"""A contract with varying dims travels fused only while its largest call stays this small:
every call ships the whole buffer, used or not."""


_ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in ALLOWED_DTYPES.items()}
_DTYPE_NAMES = {dtype: name for name, dtype in ALLOWED_DTYPES.items()}


def host_layout(contract: CallContract | None, device: torch.device) -> Layout | None:
    """The fused layout for ``contract`` when its tensors live on the host (they can share
    the frame's buffer), else None: device tensors travel where they live."""
    if contract is None or device.type != "cpu" or any(s.dtype not in ALLOWED_DTYPES for s in contract.tensors):
        return None
    offsets, end = [], CONTROL_FRAME
    for spec in contract.tensors:
        largest = list(spec.shape)
        for dim, _, high in spec.varying:
            largest[dim % len(largest)] = high
        end = -(-end // _SLOT_ALIGN) * _SLOT_ALIGN
        offsets.append(end)
        end += math.prod(largest) * _ITEMSIZE[spec.dtype]
    varying = any(s.varying for s in contract.tensors)
    if varying and end > FUSE_VARYING_LIMIT:
        return None
    return Layout(offsets=tuple(offsets), size=end)


@dataclass(kw_only=True, slots=True)
class Channel:
    """Where envelopes travel and who sends them."""

    control_group: Any
    """Gloo group for the control frame when it travels alone (host bytes, never device copies)."""
    data_group: Any
    """Group the tensors travel on (the data plane), and a fused frame with them."""
    device: torch.device
    leader: int = 0
    """Global rank of the sender."""
    rank: int = 0
    contract: CallContract | None = None
    last_call_id: int = -1
    """Last CALL id seen on this rank (monotonic check)."""
    layout: Layout | None = None
    """Set when frame and tensors travel fused (:func:`host_layout`); the same on every
    rank, since the call contract is."""


def canonical_json(value: Any, *, what: str) -> bytes:
    """Deterministic JSON bytes, or PreflightError naming the offending key."""
    bad = _find_unserializable(value, what)
    if bad:
        raise PreflightError(bad)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _find_unserializable(value: Any, path: str) -> str | None:
    if value is None or isinstance(value, (bool, int, str)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is {value!r}: NaN/inf are not canonical JSON"
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            bad = _find_unserializable(item, f"{path}[{i}]")
            if bad:
                return bad
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has a non-string key {key!r}"
            bad = _find_unserializable(item, f"{path}.{key}")
            if bad:
                return bad
        return None
    return f"{path} is a {type(value).__name__}, not JSON (no pickle on the control plane)"


def preflight(env: Envelope, channel: Channel) -> tuple[bytes, bytes, list[TensorSpec]]:
    """Everything that could fail, checked before the commitment point."""
    meta = canonical_json(env.meta, what="meta")
    if env.kind is not Kind.CALL:
        header = canonical_json({"call_id": env.call_id, "cache_epoch": env.cache_epoch, "plan": env.plan}, what="header")
        return header, meta, []
    if env.call_id != channel.last_call_id + 1:
        raise PreflightError(f"call_id {env.call_id} does not follow {channel.last_call_id}: ids must be monotonic")
    contract = channel.contract
    assert contract is not None, "a CALL needs the call contract"
    specs = _as_contracted(env.tensors, contract) or _checked_specs(env, contract)
    calls = env.plan.get("expected_generator_calls")
    if calls != contract.expected_generator_calls:
        raise PreflightError(
            f"phase plan says expected_generator_calls={calls!r}, the call contract runs "
            f"{contract.expected_generator_calls} region call(s) per envelope"
        )
    op = env.plan.get("cache_op")
    if op not in CACHE_OPS:
        raise PreflightError(f"plan cache_op {op!r} is not one of {CACHE_OPS}")
    if op == "recompute" and "recompute_override" not in env.meta:
        raise PreflightError("cache_op recompute needs meta.recompute_override (no silent fallback to advance)")
    # What the leader's code (or a fault at its seam) put into the header is checked; the
    # manifest is built here from shapes and dtypes just validated, and is JSON by construction.
    bad = _find_unserializable({"call_id": env.call_id, "cache_epoch": env.cache_epoch, "plan": env.plan}, "header")
    if bad:
        raise PreflightError(bad)
    header = json.dumps(
        {
            "call_id": env.call_id,
            "cache_epoch": env.cache_epoch,
            "plan": env.plan,
            "tensor_specs": manifest(specs),
        },
        sort_keys=True, separators=(",", ":"), allow_nan=False,
    ).encode()  # fmt: skip
    return header, meta, specs


def manifest(specs: list[TensorSpec] | tuple[TensorSpec, ...]) -> list[list[Any]]:
    """The header's ``tensor_specs``: ``[name, shape, dtype]`` per tensor, in order."""
    return [[s.name, list(s.shape), s.dtype] for s in specs]


def _as_contracted(tensors: dict[str, Any], contract: CallContract) -> list[TensorSpec] | None:
    """The contract's own entries when every tensor is exactly its entry (name, order,
    dtype, shape): the common case, recognised without building anything. None sends the
    call through the checks that name what differs."""
    if len(tensors) != len(contract.tensors):
        return None
    for (name, tensor), spec in zip(tensors.items(), contract.tensors):
        dtype = _DTYPE_NAMES.get(getattr(tensor, "dtype", None))
        if name != spec.name or dtype != spec.dtype or tuple(getattr(tensor, "shape", ())) != spec.shape:
            return None
    return list(contract.tensors)


def _checked_specs(env: Envelope, contract: CallContract) -> list[TensorSpec]:
    """Each tensor's manifest entry, or the error naming the first that breaks the contract."""
    specs = []
    for name, tensor in env.tensors.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in ALLOWED_DTYPES:
            raise PreflightError(f"tensor {name!r} has dtype {dtype}, not in the allowed set {sorted(ALLOWED_DTYPES)}")
        specs.append(TensorSpec(name=name, shape=tuple(tensor.shape), dtype=dtype))
    expected = {s.name: s for s in contract.tensors}
    extra = [s.name for s in specs if s.name not in expected]
    if extra:
        raise ContractError(f"tensor(s) {extra} are not in the call contract {list(expected)}: no ad-hoc broadcasts")
    for spec in specs:
        why = expected[spec.name].mismatch(spec)
        if why:
            raise PreflightError(f"tensor {spec.name!r} {why}")
    missing = [n for n in expected if n not in env.tensors]
    if missing:
        raise PreflightError(f"tensor(s) {missing} required by the call contract are missing")
    if [s.name for s in specs] != list(expected):
        raise PreflightError(f"tensors in order {[s.name for s in specs]}, the call contract sends {list(expected)}")
    return specs


CONTROL_FRAME = 1024
_PREFIX_BYTES = PREFIX_LEN * 8
_PREFIX_FORMAT = f"={PREFIX_LEN}q"  # native int64, as every rank of one job reads it


def _buffer(channel: Channel) -> torch.Tensor:
    """A frame's buffer: the control frame alone, or fused, the frame and every slot."""
    return torch.empty(channel.layout.size if channel.layout is not None else CONTROL_FRAME, dtype=torch.uint8)


def _bcast_control(
    prefix: list[int] | None, payload: bytes, channel: Channel, buffer: torch.Tensor | None = None
) -> tuple[list[int], bytes, torch.Tensor]:
    """One broadcast carries prefix and payload (fused, also the call's tensors, which the
    leader staged into ``buffer``); a payload longer than the frame needs one more
    broadcast, on the same group. Returns the prefix, the payload and the buffer."""
    layout = channel.layout
    buffer = _buffer(channel) if buffer is None else buffer
    group = channel.data_group if layout is not None else channel.control_group
    raw = host_bytes(buffer)
    if prefix is not None:
        head = struct.pack(_PREFIX_FORMAT, *prefix) + payload[: CONTROL_FRAME - _PREFIX_BYTES]
        raw[:CONTROL_FRAME] = head + bytes(CONTROL_FRAME - len(head))  # nothing uninitialized on the wire
    dist.broadcast(buffer, src=channel.leader, group=group)
    values = list(struct.unpack_from(_PREFIX_FORMAT, raw))
    length = 8 * values[6] + values[3] + values[4] if values[0] == MAGIC else 0
    received = bytes(raw[_PREFIX_BYTES : _PREFIX_BYTES + min(length, CONTROL_FRAME - _PREFIX_BYTES)])
    rest = length - len(received)
    if rest > 0:
        more = torch.empty(rest, dtype=torch.uint8)
        if prefix is not None:
            host_bytes(more)[:] = payload[len(received) :]
        dist.broadcast(more, src=channel.leader, group=group)
        received += bytes(host_bytes(more))
    return values, received, buffer


def send(env: Envelope, channel: Channel, *, digest: bool = False) -> Envelope:
    """Leader side: preflight, staging and digest, then commit and the tensors.

    ``digest=True`` puts the leader's input digest into the frame, so that every follower
    checks what it received against it (:func:`hardening.runtime.drift.check_input`).
    Fused, the envelope's tensors become views of the buffer that was sent: the leader
    computes on exactly the bytes its peers received.
    """
    buffer = None
    try:
        header, meta, specs = preflight(env, channel)
        # Staged before the commit: a tensor that cannot reach the device (or its slot)
        # fails here, where the peers can still be told with an ERROR frame.
        if channel.layout is not None and specs:
            buffer = _buffer(channel)
            for i, spec in enumerate(specs):
                slot = channel.layout.slot(buffer, i, spec)
                slot.copy_(env.tensors[spec.name].to(channel.device))  # a no-op on the host
                env.tensors[spec.name] = slot
        else:
            for spec in specs:
                env.tensors[spec.name] = env.tensors[spec.name].to(channel.device).contiguous()
        env.blob = header + meta
        env.digest = input_digest(env.blob, env.tensors) if digest and env.kind is Kind.CALL else None
    except Exception as exc:
        send_error(f"{type(exc).__name__}: {exc}", channel, call_id=env.call_id)
        raise
    # Commitment point: from here every peer expects the whole frame.
    words = env.digest or []
    prefix = [MAGIC, PROTOCOL_VERSION, int(env.kind), len(header), len(meta), len(specs), len(words)]
    _bcast_control(prefix, _words_bytes(words) + env.blob, channel, buffer)
    if env.kind is Kind.CALL:
        channel.last_call_id = env.call_id
    if channel.layout is None:
        for spec in specs:
            dist.broadcast(env.tensors[spec.name], src=channel.leader, group=channel.data_group)
    return env


def send_error(reason: str, channel: Channel, *, call_id: int) -> None:
    """Terminal action: tell every peer why the leader stops (they raise PeerError)."""
    blob = canonical_json({"call_id": call_id, "reason": reason[:4096]}, what="error")
    _bcast_control([MAGIC, PROTOCOL_VERSION, int(Kind.ERROR), len(blob), 0, 0, 0], blob, channel)


def receive(channel: Channel) -> Envelope:
    """Follower side: the next envelope, validated (then run ``drift.check_input`` on it)."""
    (magic, version, kind, header_len, meta_len, count, digest_len), payload, buffer = _bcast_control(None, b"", channel)
    if magic != MAGIC:
        raise ContractError(f"control-plane frame without the envelope magic (got {magic:#x}): an ad-hoc broadcast?")
    if version != PROTOCOL_VERSION:
        raise ContractError(f"envelope protocol version {version}, this rank speaks {PROTOCOL_VERSION}")
    try:
        kind_ = Kind(kind)
    except ValueError:
        raise ContractError(f"unknown envelope kind {kind}") from None
    if digest_len not in (0, digest_words(count)):
        raise ContractError(f"the frame carries a {digest_len}-word input digest, {count} tensor(s) need {digest_words(count)}")
    blob = payload[8 * digest_len :]
    try:
        header = json.loads(blob[:header_len]) if header_len else {}
        meta = json.loads(blob[header_len:]) if meta_len else {}
    except json.JSONDecodeError as exc:
        raise ContractError(f"envelope header/meta is not JSON: {exc}") from None
    if kind_ is Kind.ERROR:
        raise PeerError(
            f"rank {channel.leader} (leader) stopped at call {header.get('call_id')}: {header.get('reason')}",
            root_cause_rank=channel.leader,
        )
    env = Envelope(
        kind=kind_,
        call_id=int(header.get("call_id", -1)),
        cache_epoch=int(header.get("cache_epoch", 0)),
        plan=header.get("plan", {}),
        meta=meta,
        blob=blob,
        digest=list(struct.unpack_from(f"={digest_len}q", payload)) if digest_len else None,
    )
    listed, contract = header.get("tensor_specs", []), channel.contract
    if kind_ is Kind.CALL and contract is not None and listed == manifest(contract.tensors):
        specs = list(contract.tensors)  # exactly the contract (the common case): nothing to build
    else:
        specs = [TensorSpec(name=n, shape=tuple(s), dtype=d) for n, s, d in listed]
    if kind_ is Kind.CALL:
        _validate_call(env, specs, count, channel)
    elif specs:
        raise ContractError(f"a {kind_.name} frame with {len(specs)} tensor(s): only a CALL carries tensors")
    for i, spec in enumerate(specs):
        if channel.layout is not None:  # validated against the contract: it fits its slot
            env.tensors[spec.name] = channel.layout.slot(buffer, i, spec)
            continue
        tensor = torch.empty(spec.shape, dtype=ALLOWED_DTYPES[spec.dtype], device=channel.device)
        dist.broadcast(tensor, src=channel.leader, group=channel.data_group)
        env.tensors[spec.name] = tensor
    if kind_ is Kind.CALL:
        channel.last_call_id = env.call_id
    return env


def _words_bytes(words: list[int]) -> bytes:
    return struct.pack(f"={len(words)}q", *words)


def _validate_call(env: Envelope, specs: list[TensorSpec], count: int, channel: Channel) -> None:
    """A CALL's header against this rank's own contract: the next call id, the announced
    tensor count, every manifest entry (allowed dtype, declared name, shape within the
    contract) in contract order, and the phase plan's call count."""
    if env.call_id != channel.last_call_id + 1:
        raise ContractError(
            f"call_id {env.call_id} after {channel.last_call_id}: a call was skipped or replayed"
        )
    if count != len(specs):
        raise ContractError(f"prefix announces {count} tensors, the manifest lists {len(specs)}")
    contract = channel.contract
    assert contract is not None, "a CALL needs the call contract"
    expected = {s.name: s for s in contract.tensors}
    for spec in specs if specs != list(contract.tensors) else ():
        if spec.dtype not in ALLOWED_DTYPES:
            raise ContractError(f"manifest tensor {spec.name!r} has dtype {spec.dtype}, not allowed")
        if spec.name not in expected:
            raise ContractError(f"manifest tensor {spec.name!r} is not in the call contract {list(expected)}")
        why = expected[spec.name].mismatch(spec)
        if why:
            raise ContractError(f"manifest tensor {spec.name!r} {why}")
    if [s.name for s in specs] != [s.name for s in contract.tensors]:
        raise ContractError(f"manifest {[s.name for s in specs]} does not match the contract {[s.name for s in contract.tensors]}")
    if env.plan.get("expected_generator_calls") != contract.expected_generator_calls:
        raise ContractError(
            f"phase plan expected_generator_calls={env.plan.get('expected_generator_calls')!r}, this rank's contract "
            f"runs {contract.expected_generator_calls}"
        )
