"""The torch trace artifact (best effort): an explanation, never an exception."""

from __future__ import annotations

from hardening.runtime.compile.trace import start_torch_trace


def test_start_torch_trace_says_why_when_torch_cannot(monkeypatch, tmp_path) -> None:
    # A torch without the structured-trace internals: an explanation, never an exception.
    import torch._logging._internal as logs

    monkeypatch.delattr(logs, "_init_logs")
    out = start_torch_trace(str(tmp_path / "trace"))
    assert out.startswith("unavailable: ") and "structured trace" in out
    assert not (tmp_path / "trace").exists()
