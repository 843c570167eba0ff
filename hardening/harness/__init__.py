"""The harness: launches ranks, injects faults, judges cases and reports them.

It is a user of :mod:`hardening.runtime` like any other: ``worker`` turns a rank spec and
a region into the runtime's recipe, ``runner`` launches and watches ranks through the
``forkserver``, ``results`` and ``reports`` say what happened, ``cli`` is the command.
"""
