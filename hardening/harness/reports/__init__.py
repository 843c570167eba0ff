"""Report writers: turn one :class:`hardening.harness.results.SuiteResult` into what people read.

Every writer consumes the same typed ``SuiteResult`` and nothing else:

* :func:`render_table` (``table``) -- the terminal table read before every merge,
  followed by a detail block for every case that did not pass and a summary line.
* :func:`write_json` (``json_report``) -- the versioned machine-readable record for
  dashboards (``SuiteResult.to_json()``, strictly JSON-safe, written atomically).
* :func:`write_junit` (``junit``) -- JUnit XML for CI: FAIL is a ``<failure>``, UNKNOWN an
  ``<error>`` (unknown never counts as a pass), an interrupted case ``<skipped>``.
"""

from .json_report import write_json
from .junit import write_junit
from .table import render_table

__all__ = ["render_table", "write_json", "write_junit"]
