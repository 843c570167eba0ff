"""``python -m hardening`` is the ``hardening`` command."""

from hardening.cli import main

raise SystemExit(main())
