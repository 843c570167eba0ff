"""KV-cache lifecycle: the leader's schedule and every rank's transition check."""

from __future__ import annotations

import pytest

from hardening.errors import LifecycleError
from hardening.runtime.kv_cache import CacheSchedule, KVCacheLifecycle, apply_transition


def _plan(reset_every: int, calls: int) -> list[tuple[str, int, dict]]:
    schedule = CacheSchedule(reset_every=reset_every)
    return [schedule.plan(k) for k in range(calls)]


def test_schedule_resets_every_n_with_increasing_epochs() -> None:
    plan = _plan(4, 13)
    ops = [op for op, _, _ in plan]
    assert ops == [
        "reset", "advance", "advance", "recompute",
        "reset", "advance", "advance", "recompute",
        "reset", "advance", "advance", "recompute",
        "reset",
    ]  # fmt: skip
    assert [e for _, e, _ in plan] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    for op, _, extra in plan:
        if op == "recompute":
            assert extra == {"recompute_override": {"window": "full"}}
        else:
            assert extra == {}


def test_schedule_recompute_is_the_call_before_each_reset() -> None:
    for every in (2, 3, 5):
        plan = _plan(every, 4 * every + 1)
        resets = [k for k, (op, _, _) in enumerate(plan) if op == "reset"]
        recomputes = [k for k, (op, _, _) in enumerate(plan) if op == "recompute"]
        assert resets == list(range(0, 4 * every + 1, every))
        assert recomputes == [k - 1 for k in resets if k > 0]
        epochs = [e for op, e, _ in plan if op == "reset"]
        assert epochs == list(range(1, len(resets) + 1))


def test_schedule_without_resets_only_advances_after_call_0() -> None:
    plan = _plan(0, 6)
    assert [op for op, _, _ in plan] == ["reset"] + ["advance"] * 5
    assert {e for _, e, _ in plan} == {1}


@pytest.mark.parametrize("every", [1, 2, 3, 4, 0])
def test_apply_transition_follows_a_whole_schedule(every: int) -> None:
    resets: list[int] = []
    lc = KVCacheLifecycle(reset_fn=lambda: resets.append(lc.state.epoch))
    schedule = CacheSchedule(reset_every=every)
    planned_resets = 0
    for k in range(17):
        op, epoch, _ = schedule.plan(k)
        planned_resets += op == "reset"
        apply_transition(lc, op=op, epoch=epoch, tokens=2, call_id=k)
        assert lc.state.epoch == epoch
        if op == "reset":
            assert lc.state.length == 2  # cleared, then this call's tokens
    assert len(resets) == planned_resets
    # reset_fn runs before the state moves: it saw each previous epoch once, in order.
    assert resets == list(range(planned_resets))
    assert lc.state.epoch == schedule.epoch


def _lifecycle_at(calls: int, every: int = 4) -> tuple[KVCacheLifecycle, CacheSchedule, list[int]]:
    resets: list[int] = []
    lc = KVCacheLifecycle(reset_fn=lambda: resets.append(1))
    schedule = CacheSchedule(reset_every=every)
    for k in range(calls):
        op, epoch, _ = schedule.plan(k)
        apply_transition(lc, op=op, epoch=epoch, tokens=3, call_id=k)
    return lc, schedule, resets


def test_skipped_reset_is_named_at_the_next_advance() -> None:
    lc, schedule, resets = _lifecycle_at(4)  # calls 0..3: epoch 1, 12 tokens
    op, epoch, _ = schedule.plan(4)
    assert (op, epoch) == ("reset", 2)
    # This rank skips the reset (the K-01 fault): nothing applied for call 4.
    op, epoch, _ = schedule.plan(5)
    assert (op, epoch) == ("advance", 2)
    with pytest.raises(LifecycleError) as info:
        apply_transition(lc, op=op, epoch=epoch, tokens=3, call_id=5)
    msg = str(info.value)
    assert "call 5" in msg and "epoch 2" in msg and "epoch 1" in msg
    assert "a reset was skipped" in msg and "12 token(s)" in msg
    # A refused transition changes nothing.
    assert (lc.state.epoch, lc.state.length) == (1, 12)
    assert len(resets) == 1


def test_repeated_reset_is_refused() -> None:
    lc, _, resets = _lifecycle_at(2)  # at epoch 1
    with pytest.raises(LifecycleError, match=r"reset to epoch 1, but this rank's cache is at epoch 1 \(expected 2\)"):
        apply_transition(lc, op="reset", epoch=1, tokens=3, call_id=2)
    assert "skipped or repeated" in str(pytest.raises(LifecycleError, lc.validate, op="reset", epoch=3, call_id=2).value)
    assert len(resets) == 1 and lc.state.length == 6


def test_advance_at_an_old_epoch_is_refused() -> None:
    lc, schedule, _ = _lifecycle_at(5)  # call 4 reset to epoch 2
    assert lc.state.epoch == 2
    with pytest.raises(LifecycleError) as info:
        apply_transition(lc, op="advance", epoch=1, tokens=3, call_id=5)
    msg = str(info.value)
    assert "advance at epoch 1" in msg and "epoch 2" in msg
    assert "applied that the leader did not send" in msg
    with pytest.raises(LifecycleError, match="recompute at epoch 1"):
        apply_transition(lc, op="recompute", epoch=1, tokens=3, call_id=5)


def test_recompute_on_an_empty_cache_is_refused() -> None:
    lc = KVCacheLifecycle()
    with pytest.raises(LifecycleError, match=r"call 0: recompute on an empty cache \(epoch 0\)"):
        apply_transition(lc, op="recompute", epoch=0, tokens=3, call_id=0)
    # Also right after a reset that wrote nothing.
    apply_transition(lc, op="reset", epoch=1, tokens=0, call_id=0)
    with pytest.raises(LifecycleError, match="recompute on an empty cache"):
        apply_transition(lc, op="recompute", epoch=1, tokens=3, call_id=1)
    apply_transition(lc, op="advance", epoch=1, tokens=3, call_id=1)
    apply_transition(lc, op="recompute", epoch=1, tokens=3, call_id=2)
    assert lc.state.length == 6


@pytest.mark.parametrize("op", ["rewind", "", "RESET", None])
def test_unknown_op_is_refused(op: object) -> None:
    lc, _, resets = _lifecycle_at(1)
    with pytest.raises(LifecycleError, match=r"call 1: unknown cache op"):
        apply_transition(lc, op=op, epoch=1, tokens=3, call_id=1)  # type: ignore[arg-type]
    assert len(resets) == 1 and lc.state.epoch == 1
