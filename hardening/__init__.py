"""hardening: make TP/PP torch.compile inference crash fast with a named cause, and prove it.

Two halves: ``hardening.runtime`` is the library a rank imports (parity, compile probe and
gates, envelope, drift tripwires, watchdog, final record); ``hardening.harness`` launches
ranks, injects faults, judges cases and reports them, and uses the runtime like any
other program. ``hardening.errors`` holds the named causes both share.
"""

from pathlib import Path as _Path

# In a source checkout inject/, suites/ and profiles/ sit beside this folder and install
# as hardening.inject / .suites / .profiles (pyproject package-dir). When the checkout
# itself is on sys.path (python -m from the repo root, pytest's rootdir), this package
# shadows the installed one, so let its subpackages resolve to the sibling folders too.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "inject" / "__init__.py").is_file():
    __path__.append(str(_root))  # type: ignore[name-defined]  # noqa: F821

__version__ = "0.1.0"
