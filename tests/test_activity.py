"""What a main thread is doing, read from its frames: the watchdog's input for hangs in
warmup. The collective path inside a compiled graph runs end to end in
tests/test_examples.py (examples/conditional_collective.py)."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from hardening.activity import COMPILING, RUNNING, SIDE, sample
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
