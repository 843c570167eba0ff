"""How the harness process takes a stop request: SIGINT, SIGTERM and SIGHUP.

A handler that raises (KeyboardInterrupt) can land between any two bytecodes: between
a finished case and the line that keeps it, or inside the teardown of the ranks, so
a second Ctrl-C used to drop the whole report. Here a signal only *records* the
request; the runner polls it at the points where stopping is safe (every tick of a
case, before each case, while the fork server starts), tears the ranks down and
returns what it has. Every later signal is acknowledged and changes nothing: the
partial report is always written.

The handlers go in before anything slow (the first lines of the CLI). A signal that
was ignored when the process started (SIGINT in a background job, SIGHUP under
``nohup``) stays ignored, as POSIX tools do; SIGTERM still stops such a run.
"""

from __future__ import annotations

import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequest:
    """Set once by the first stop signal; read by the runner at its safe points."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        """Name of the first signal received (``SIGINT``, ``SIGTERM``, ``SIGHUP``)."""
        self.count = 0
        """How many stop signals arrived (a doubled Ctrl-C is 2)."""

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, name: str) -> None:
        self.count += 1
        if self._event.is_set():
            _say(f"hardening: {name} again: already stopping (ranks are being torn down, the report will be written)")
            return
        self.signal_name = name
        self._event.set()
        _say(f"hardening: {name}: stopping; tearing down ranks and writing the partial report")

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds; True as soon as a stop was requested."""
        return self._event.wait(timeout)

    @staticmethod
    def ignore_from_now() -> None:
        """For the last steps of the process, after its reports are written: a late
        signal must not turn exit code 2 into death by that signal (Python restores the
        default action of handled signals as it finalizes, but leaves ignored ones)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def install(self) -> "StopRequest":
        """Route SIGINT, SIGTERM and SIGHUP here (those not ignored at start)."""
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue
            signal.signal(sig, lambda signum, frame: self.request(signal.Signals(signum).name))
        return self


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed (the terminal went away with SIGHUP)
        pass
