"""What a main thread is doing, read from its frames: the watchdog's input for hangs in
warmup. The collective path inside a compiled graph runs end to end in
tests/test_examples.py (examples/conditional_collective.py)."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from hardening.runtime.activity import COMPILING, RUNNING, SIDE, IssuedRecord, graph_collectives, record_graph, sample
from store_harness import side_channels


def _frame_of(thread: threading.Thread):
    end = time.time() + 5
    while time.time() < end:
        frame = sys._current_frames().get(thread.ident or -1)
        if frame is not None:
            return frame
        time.sleep(0.01)
    raise AssertionError("thread never ran")


@pytest.mark.timeout(60)
def test_a_thread_waiting_on_the_side_channel_is_side_with_its_step(store_port: int) -> None:
    (side, _) = side_channels(store_port, 2, timeout_s=5)
    t = threading.Thread(target=lambda: pytest.raises(Exception, side.exchange, "warmup/1", 0), daemon=True)
    t.start()
    time.sleep(0.3)  # inside store.wait: the peer never comes
    act = sample(_frame_of(t))
    assert act.kind == SIDE and act.op == "side-channel step 'warmup/1'"
    assert act.describe() == "waiting for its peers at side-channel step 'warmup/1'"
    t.join(timeout=10)


def test_user_code_called_from_the_runtime_is_running_not_waiting() -> None:
    stop = threading.Event()

    def make_inputs_slowly() -> None:  # a leader tokenizing, called from the warmup loop
        while not stop.is_set():
            sum(range(1000))

    t = threading.Thread(target=make_inputs_slowly, daemon=True)
    t.start()
    try:
        act = sample(_frame_of(t))
        assert act.kind in (RUNNING, COMPILING) and act.kind != SIDE
        assert "make_inputs_slowly" in act.where
    finally:
        stop.set()
        t.join(timeout=5)


def test_no_frame_is_running() -> None:
    assert sample(None).kind == RUNNING


def _graph_with_all_reduce():
    import torch
    import torch.fx

    g = torch.fx.Graph()
    x = g.placeholder("x")
    issued = g.call_function(torch.ops._c10d_functional.all_reduce.default, (x, "sum", "0"))
    issued.meta["stack_trace"] = 'File "/srv/app/serve.py", line 12, in forward\n    y = funcol.all_reduce(y)\n'
    issued.meta["val"] = torch.empty(4, 8)
    g.output(g.call_function(torch.ops._c10d_functional.wait_tensor.default, (issued,)))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def test_a_graph_lists_the_collectives_it_issues_with_the_users_line_and_not_their_waits() -> None:
    (found,) = graph_collectives(_graph_with_all_reduce())
    assert found.describe() == "all_reduce (group '0', shape (4, 8)) at serve.py:12"


@pytest.mark.parametrize("boxed", [False, True])
def test_a_recorded_graph_notes_its_last_collective_when_it_returns(boxed: bool) -> None:
    record = IssuedRecord()
    calls = []
    if boxed:  # inductor's convention: one list argument, kept by the wrapper
        compiled = lambda args: calls.append(list(args)) or "out"  # noqa: E731
        compiled._boxed_call = True  # type: ignore[attr-defined]
    else:
        compiled = lambda *args: calls.append(list(args)) or "out"  # noqa: E731
    run = record_graph(_graph_with_all_reduce(), compiled, record)
    assert getattr(run, "_boxed_call", False) is boxed
    record.new_call(3)
    assert record.describe() == "its compiled graphs issued no collective in call 3"
    assert (run([1, 2]) if boxed else run(1, 2)) == "out" and calls == [[1, 2]]
    assert record.describe() == "last issued all_reduce (group '0', shape (4, 8)) at serve.py:12 in call 3"
    record.new_call(4)
    assert record.describe() == "its compiled graphs issued no collective in call 4"


def test_arguments_pass_through_whatever_the_convention_says() -> None:
    # torch 2.13 calls some AOT outputs marked _boxed_call with *args (a DTensor graph
    # under aot_eager): the wrapper must hand over exactly what it was given.
    from hardening.runtime.activity import around_each_run

    seen = []
    compiled = lambda *args: args  # noqa: E731
    compiled._boxed_call = True  # type: ignore[attr-defined]
    run = around_each_run(compiled, before=lambda: seen.append("before"), after=lambda: seen.append("after"))
    assert run(1, 2, 3) == (1, 2, 3) and run([4]) == ([4],) and run._boxed_call is True
    assert seen == ["before", "after", "before", "after"]


def test_a_graph_without_collectives_is_returned_as_it_is_and_an_eager_region_claims_nothing() -> None:
    import torch.fx

    record = IssuedRecord()
    record.new_call(0)
    assert record.describe() == ""  # nothing compiled reports here: no claim either way
    gm = torch.fx.symbolic_trace(torch.nn.Tanh())
    compiled = object()
    assert record_graph(gm, compiled, record) is compiled
    assert record.describe() == "its compiled graphs issued no collective in call 0"
