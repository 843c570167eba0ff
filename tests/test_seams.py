"""The seams: the only points faults act on, all in the runtime."""

from __future__ import annotations

import hardening.runtime.seams as seams
from hardening.inject import FAULTS


def test_every_fault_targets_a_listed_runtime_seam() -> None:
    for name, cls in FAULTS.items():
        module, _, function = cls.target.partition(":")
        assert module == "hardening.runtime.seams", f"{name} patches {cls.target}, not a runtime seam"
        assert function in seams.SEAMS and callable(getattr(seams, function)), name


def test_every_seam_is_documented_and_used_by_the_session() -> None:
    import inspect

    import hardening.runtime.pipeline as pipeline
    import hardening.runtime.session as session

    source = inspect.getsource(session) + inspect.getsource(pipeline)  # the pipeline is the Session's
    for name in seams.SEAMS:
        assert getattr(seams, name).__doc__, name
        assert f"seams.{name}(" in source, f"the Session never reaches seams.{name}"


def test_unfaulted_seams_do_the_plain_thing() -> None:
    import torch

    keys = {"model": "m", "region.seed": 3}
    assert seams.user_config(keys) is keys
    tensors = {"x": torch.ones(2)}
    assert seams.call_inputs(tensors, 0) is tensors
    assert seams.planned_warmup_calls(5) == 5
    module = torch.nn.Linear(2, 2)
    assert seams.module_to_compile(module) is module
