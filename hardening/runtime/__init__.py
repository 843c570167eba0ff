"""The runtime: what a TP/PP rank imports to crash fast with a named cause.

Imports nothing from :mod:`hardening.harness`. One concept per module: ``parity`` (env
fingerprint), ``sidechannel`` (small exchanges through the store), ``envelope`` (the
per-call control frame), ``digest`` and ``drift`` (input and weight tripwires),
``kv_cache`` (the cache state machine), ``warmup`` (lockstep), ``watchdog`` (liveness
and deadlines), ``record`` (how a rank ends), ``store`` (the keys), ``activity`` (what a
thread is doing), ``compile/`` (probe, backend, counters, gates, guard, trace) and
``config`` (the settings).
"""
