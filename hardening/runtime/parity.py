"""Env parity: every rank proves it runs the same thing before the first collective.

Each rank builds a flat, canonical fingerprint (versions, world, region config, compile
settings, the *effective* backends it resolved, determinism flags, every ``HARDENING_*``
variable and the behaviour-changing ``TORCH_*`` / ``NCCL_*`` variables), exchanges its
hash on the side channel and, only on mismatch, the full dicts; then every rank raises
the same :class:`ParityError` with a key-by-rank table.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import platform
from typing import Any

import torch

from hardening.errors import ParityError
from hardening.runtime.compile.dump import DUMP_ENV
from hardening.runtime.config import CompileConfig, GateConfig, ParityConfig
from hardening.runtime.sidechannel import SideChannel

# Variables that legitimately differ per rank or per run and must not be compared.

PER_RANK_VARIABLES = frozenset(
    {
        "RANK",
        "LOCAL_RANK",
        "GROUP_RANK",
        "ROLE_RANK",
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_ERROR_FILE",
        "TORCH_FR_DUMP_TEMP_FILE",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
        "TORCH_NCCL_DEBUG_INFO_PIPE_FILE",
        "TORCHINDUCTOR_CACHE_DIR",
        "TORCH_TRACE",
        "HARDENING_RECORD",  # each rank's own record file
        "HARDENING_PARENT_PID",  # each rank's own launcher process (under torchrun: its reaper)
        DUMP_ENV,  # each rank's own depyf dump directory
    }
)
ENV_PREFIXES = ("HARDENING_", "TORCH_", "TORCHINDUCTOR_", "TORCHDYNAMO_", "NCCL_", "CUDA_LAUNCH_BLOCKING", "CUBLAS_")


def effective_backends(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What the kernels will actually use on this rank, measured rather than configured."""
    out: dict[str, Any] = {
        "matmul.fp32_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "mkldnn.enabled": torch.backends.mkldnn.enabled,
        "sdp.flash_enabled": torch.backends.cuda.flash_sdp_enabled(),
        "sdp.mem_efficient_enabled": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "sdp.math_enabled": torch.backends.cuda.math_sdp_enabled(),
    }
    if device.type == "cuda":
        out["cuda.matmul.allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        out["cudnn.enabled"] = torch.backends.cudnn.enabled
        out["cudnn.deterministic"] = torch.backends.cudnn.deterministic
        out["cudnn.benchmark"] = torch.backends.cudnn.benchmark
        out["cuda.device_name"] = torch.cuda.get_device_name(device)
        out["cuda.capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    # Which SDPA kernel attention really picks for a typical head-sharded shape: flags,
    # hardware and dtype all feed this choice, and a silent difference is drift.
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is not None:
        try:
            q = torch.zeros(1, 2, 8, 64, device=device, dtype=dtype)
            kv = torch.zeros(1, 2, 24, 64, device=device, dtype=dtype)
            choice = int(choose(q, kv, kv))
            out["sdpa.backend"] = _sdp_backend_name(choice)
        except Exception as exc:  # a torch without CPU fused kernels: record, don't guess
            out["sdpa.backend"] = f"unavailable ({type(exc).__name__})"
    return out


def _sdp_backend_name(choice: int) -> str:
    try:
        from torch.nn.attention import SDPBackend

        return SDPBackend(choice).name.lower()
    except Exception:
        return str(choice)


def compile_stance() -> str:
    stance = getattr(getattr(torch._dynamo, "eval_frame", None), "_stance", None)
    return str(getattr(stance, "stance", "default")) if stance is not None else "unknown"


RUNTIME_KEYS = frozenset(
    {
        "python.version", "torch.version", "torch.cuda", "torch.nccl", "world.size", "world.backend", "dtype",
        "compile.enabled", "compile.backend", "compile.mode", "compile.fullgraph", "compile.dynamic",
        "compile.check_collectives", "compile.stance", "dynamo.disable", "gates.max_graph_breaks", "gates.max_recompiles", "parity.ignore",
    }
)  # fmt: skip
"""The fingerprint's own keys; ``env.*`` and ``effective.*`` are the runtime's too."""


def check_user_keys(keys: dict[str, Any]) -> None:
    """ValueError when a caller's key would overwrite one the runtime measures (and so
    hide the very divergence parity exists to catch)."""
    taken = sorted(k for k in keys if k in RUNTIME_KEYS or k.startswith(("env.", "effective.")))
    if taken:
        raise ValueError(f"fingerprint keys {taken} are the runtime's own (a user key would hide a real divergence): rename them")


def build_fingerprint(
    *,
    compile_cfg: CompileConfig,
    gates: GateConfig,
    parity: ParityConfig,
    world_size: int,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    user_keys: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The canonical, flat fingerprint of this rank (values rendered as strings).

    Runtime settings, versions, effective backends and the environment, plus
    ``user_keys``: the caller's own settings every rank must agree on (a model id, a
    checkpoint hash; the harness puts its region and step counts there)."""
    fp: dict[str, Any] = {
        "python.version": platform.python_version(),
        "torch.version": torch.__version__,
        "torch.cuda": torch.version.cuda,
        "torch.nccl": _nccl_version(),
        "world.size": world_size,
        "world.backend": backend,
        "dtype": str(dtype),
        "compile.enabled": compile_cfg.enabled,
        "compile.backend": compile_cfg.backend,
        "compile.mode": compile_cfg.mode,
        "compile.fullgraph": compile_cfg.fullgraph,
        "compile.dynamic": compile_cfg.dynamic,
        "compile.check_collectives": compile_cfg.check_collectives,
        "compile.stance": compile_stance(),
        "dynamo.disable": bool(getattr(torch._dynamo.config, "disable", False)),
        "gates.max_graph_breaks": gates.max_graph_breaks,
        "gates.max_recompiles": gates.max_recompiles,
    }
    fp.update({f"effective.{k}": v for k, v in effective_backends(device, dtype).items()})
    for name, value in os.environ.items():
        if name.startswith(ENV_PREFIXES) and name not in PER_RANK_VARIABLES:
            fp[f"env.{name}"] = value
    check_user_keys(user_keys or {})
    fp.update(user_keys or {})
    ignored = parity.ignore
    fp = {k: v for k, v in fp.items() if not any(fnmatch.fnmatchcase(k, pattern) for pattern in ignored)}
    fp["parity.ignore"] = sorted(ignored)
    return {key: json.dumps(value, sort_keys=True, default=str) for key, value in sorted(fp.items())}


IGNORE_HINT = "(a key that legitimately differs per rank or host goes in the profile's parity.ignore)"


def check_parity(side: SideChannel, fingerprint: dict[str, str], *, tag: str = "parity", hint: str = IGNORE_HINT) -> None:
    """Raise ParityError on every rank if any rank's fingerprint differs (hash first)."""
    hashes = side.exchange(f"{tag}/hash", _digest(fingerprint))
    if len(set(hashes)) == 1:
        return
    per_rank = side.exchange(f"{tag}/full", fingerprint)
    raise ParityError(format_mismatch(per_rank, hint=hint))


def format_mismatch(per_rank: list[dict[str, str]], *, hint: str = IGNORE_HINT) -> str:
    """The diff table: only the keys whose values differ, one column per rank."""
    keys = sorted({k for fp in per_rank for k in fp})
    rows = []
    for key in keys:
        values = [fp.get(key, "<missing>") for fp in per_rank]
        if len(set(values)) > 1:
            rows.append([key, *values])
    from tabulate import tabulate

    header = ["key", *[f"rank {r}" for r in range(len(per_rank))]]
    names = ", ".join(r[0] for r in rows)
    return (
        f"ranks disagree on {len(rows)} fingerprint key(s): {names}\n"
        + tabulate(rows, headers=header, tablefmt="simple", disable_numparse=True)
        + "\n"
        + hint
    )


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _nccl_version() -> str | None:
    try:
        if torch.cuda.is_available():
            return ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:
        return None
    return None
