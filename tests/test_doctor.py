"""``hardening doctor`` on this machine: CPU torch with gloo and py-spy must come out ok."""

from __future__ import annotations

import time

from hardening.harness.doctor import run_doctor


def test_doctor_is_ok_here_and_names_the_essentials():
    start = time.monotonic()
    ok, text = run_doctor()
    elapsed = time.monotonic() - start

    assert ok, text
    for name in ("torch", "gloo", "py-spy", "ptrace", "functional collectives", "C/C++ compiler"):
        assert name in text, f"{name!r} missing from:\n{text}"
    assert "FAIL" not in text
    assert text.rstrip().splitlines()[-1].startswith("doctor: ok")
    # Generous: importing torch and torch._dynamo dominates; no process group, no network.
    assert elapsed < 30, f"doctor took {elapsed:.1f}s"
