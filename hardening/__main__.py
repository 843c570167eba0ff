"""``python -m hardening`` is the ``hardening`` command."""

import os
import sys

# ``-m`` put the current directory first on sys.path: drop it before anything else is
# imported, so that a yaml.py or numpy.py there never runs in the runner. (The hardening
# package itself is imported already; a module target resolves from the cwd on purpose,
# through hardening.harness.region, not through sys.path.)
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from hardening.harness.cli import run  # noqa: E402

run()
