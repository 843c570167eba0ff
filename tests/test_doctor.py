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


def test_doctor_reports_depyf_and_tlparse_found_or_missing(monkeypatch):
    import depyf

    from hardening.harness import doctor

    ok, text = run_doctor()
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert depyf.__version__ in rows["depyf"] and " ok " in rows["depyf"]  # a dependency: installed here
    assert "tlparse" in rows

    monkeypatch.setattr(doctor.shutil, "which", lambda name: None if name == "tlparse" else "/usr/bin/" + name)
    real_import = doctor.importlib.import_module

    def no_depyf(name, *a, **kw):
        if name == "depyf":
            raise ImportError("No module named 'depyf'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(doctor.importlib, "import_module", no_depyf)
    assert doctor._tlparse().status == doctor.OK  # optional: informational only
    assert "missing" in doctor._tlparse().detail
    missing = doctor._depyf()
    assert missing.status == doctor.WARN and "missing" in missing.detail and "pip install" in missing.detail

    monkeypatch.setattr(doctor.shutil, "which", lambda name: "/opt/bin/tlparse" if name == "tlparse" else None)
    assert doctor._tlparse().detail == "at /opt/bin/tlparse"
