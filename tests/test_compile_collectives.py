"""The cross-rank collective check on a real TCPStore, one thread per rank: what each rank
publishes and waits for, with the collectives themselves left out (threads cannot block
in them, which is what lets each ordering be played exactly)."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from hardening.errors import CompileGateError
from hardening.runtime.compile.collectives import CollectiveCheck

A = "all_reduce(sum) of float32 (8, 64) on group '0' at tp.py:31"
B = "all_gather_into_tensor() of float32 (16, 64) on group '0' at tp.py:40"
X = "all_reduce(sum) of float32 (8, 64) on group '0' at debug.py:7"


def checks(port: int, world_size: int = 2, timeout_s: float = 5.0) -> list[CollectiveCheck]:
    stores = [dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10)) for _ in range(world_size)]
    return [CollectiveCheck(s, rank=r, world_size=world_size, timeout_s=timeout_s) for r, s in enumerate(stores)]


def run(bodies: dict[int, object], timeout_s: float = 20) -> dict[int, object]:
    """Each rank's body in a thread: its return value or the exception it raised."""
    out: dict[int, object] = {}

    def one(rank: int, body) -> None:
        try:
            out[rank] = body()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            out[rank] = exc

    threads = [threading.Thread(target=one, args=(r, b), daemon=True) for r, b in bodies.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
        assert not t.is_alive(), "a rank's check did not return: it would hang a real rank"
    return out


def call(check: CollectiveCheck, *graphs: list[str]) -> str:
    """One warmup call: each graph's check before it would run, then the call's end."""
    check.begin_call(0)
    for signatures in graphs:
        check.before_graph(signatures)
    check.end_call()
    return "ok"


def test_a_collective_only_rank_0_issues_is_the_same_named_error_on_both_ranks(store_port: int) -> None:
    c0, c1 = checks(store_port)
    started = time.monotonic()
    out = run({0: lambda: call(c0, [A]), 1: lambda: call(c1)})
    assert time.monotonic() - started < 1.0
    assert all(isinstance(e, CompileGateError) for e in out.values()), out
    assert str(out[0]) == str(out[1])
    assert str(out[0]).endswith(f"rank 0: {A}; rank 1: none")


def test_graphs_split_differently_with_the_same_collectives_pass(store_port: int) -> None:
    # Rank 1 breaks its graph between the two collectives (a rank-only break): it must not matter.
    c0, c1 = checks(store_port)
    out = run({0: lambda: call(c0, [A, B]), 1: lambda: call(c1, [A], [], [B])})
    assert out == {0: "ok", 1: "ok"}
    assert not c0.undecided and not c1.undecided


def test_a_break_on_one_rank_between_two_collectives_does_not_wait_on_itself(store_port: int) -> None:
    # Collectives played for real: each position is a 2-party barrier, so a rank that
    # issues one waits for its peer to issue it too. Rank 0 breaks its graph between the
    # two collectives; rank 1 issues both from one graph. Neither may wait in the check
    # for a position the other can only publish after this one's collective ran.
    c0, c1 = checks(store_port)
    barriers = [threading.Barrier(2, timeout=5) for _ in range(2)]

    def run_call(check: CollectiveCheck, graphs: list[list[str]]) -> str:
        check.begin_call(0)
        position = 0
        for signatures in graphs:
            check.before_graph(signatures)
            for _ in signatures:
                barriers[position].wait()
                position += 1
        check.end_call()
        return "ok"

    out = run({0: lambda: run_call(c0, [[A], [B]]), 1: lambda: run_call(c1, [[A, B]])})
    assert out == {0: "ok", 1: "ok"}, out


def test_the_line_is_compared_only_where_both_ranks_know_it() -> None:
    from hardening.runtime.compile.collectives import same

    bare = A.rsplit(" at ", 1)[0]
    assert same(A, A) and same(A, bare) and same(bare, A)
    assert not same(A, X.replace("debug.py:7", "tp.py:32"))  # same op and shape, another line
    assert not same(bare, B.rsplit(" at ", 1)[0])


def test_an_extra_collective_of_the_same_shape_is_named_at_its_own_line(store_port: int) -> None:
    c0, c1 = checks(store_port)
    out = run({0: lambda: call(c0, [X, A]), 1: lambda: call(c1, [A])})
    assert all(isinstance(e, CompileGateError) for e in out.values()), out
    assert f"rank 0: {X}; rank 1: {A}" in str(out[0]) and str(out[0]) == str(out[1])


def test_a_peer_with_more_collectives_than_this_rank_is_caught_when_this_rank_ends(store_port: int) -> None:
    c0, c1 = checks(store_port)
    out = run({0: lambda: call(c0, [A]), 1: lambda: call(c1, [A], [B])})
    assert all(isinstance(e, CompileGateError) for e in out.values()), out
    assert str(out[0]).endswith(f"rank 0: none; rank 1: {B}")


def test_three_ranks_one_odd(store_port: int) -> None:
    c0, c1, c2 = checks(store_port, world_size=3)
    out = run({0: lambda: call(c0, [A]), 1: lambda: call(c1, [A]), 2: lambda: call(c2, [B])})
    assert all(isinstance(e, CompileGateError) for e in out.values()), out
    assert len({str(e) for e in out.values()}) == 1 and f"rank 2: {B}" in str(out[0])


def test_a_peer_blocked_in_a_collective_no_graph_announced_is_the_divergence(store_port: int) -> None:
    c0, c1 = checks(store_port, timeout_s=30)
    c0.blocked_s = 0.3
    # A beat of another call is not this one's: rank 0 waits, then times out, undecided.
    c1.store.set("hb/1", json.dumps({"seq": 1, "phase": "warmup", "call_id": 7, "activity": "collective"}))
    c0.begin_call(0)
    c0.timeout_s = 0.5
    c0.before_graph([A])
    assert c0.undecided == ["collective check, call 0, collective 1: rank 1 announced nothing within 0.5s"]
    # In this call, and it stays there (DTensor's own all_reduce, which no Dynamo graph
    # holds): rank 0 does not run into it with a collective of its own, it names it.
    doing = "all_reduce (shape (1, 16, 64)) at dtensor/_redistribute.py:201"
    c1.store.set("hb/1", json.dumps({"seq": 2, "phase": "warmup", "call_id": 1, "activity": "collective", "doing": doing}))
    c0.begin_call(1)
    c0.timeout_s = 30
    started = time.monotonic()
    with pytest.raises(CompileGateError) as err:
        c0.before_graph([A])
    assert 0.3 <= time.monotonic() - started < 2.0
    assert str(err.value).endswith(
        f"rank 0: {A}; rank 1: none announced, blocked 0.3s in a collective no compiled graph holds: {doing}"
    )
    # At its own end a rank has nothing left to issue: a peer that stays in such a
    # collective is undecided (one that only finishes its last one ends its call first).
    c0.begin_call(2)
    c1.store.set("hb/1", json.dumps({"seq": 3, "phase": "warmup", "call_id": 2, "activity": "collective", "doing": doing}))
    c0.end_call()
    assert c0.undecided[-1] == f"collective check, call 2, collective 1: rank 1 stayed in a collective no compiled graph announced ({doing})"
    c0.begin_call(3)
    c1.store.set("hb/1", json.dumps({"seq": 4, "phase": "warmup", "call_id": 3, "activity": "collective", "doing": doing}))
    threading.Timer(0.1, lambda: c1.store.set("cc/3/end/1", "0")).start()
    c0.end_call()  # the peer ended within blocked_s: compared, nothing undecided
    assert len(c0.undecided) == 2


def test_a_silent_peer_is_bounded_by_the_timeout(store_port: int) -> None:
    (c0,) = checks(store_port, world_size=2, timeout_s=0.3)[:1]
    c0.begin_call(0)
    c0.before_graph([A])
    assert c0.undecided == ["collective check, call 0, collective 1: rank 1 announced nothing within 0.3s"]


class _NoStore:
    def __getattr__(self, name: str):
        raise AssertionError(f"the store was used ({name}) outside warmup")


class _Graph:
    """The part of an FX graph module the check reads: nodes with a collective target."""

    class _Node:
        op = "call_function"
        target = "_c10d_functional.all_reduce.default"
        args = (None, "sum", "0")
        meta: dict = {}

    graph = type("G", (), {"nodes": [_Node()]})()


def test_outside_warmup_a_wrapped_graph_does_not_touch_the_store() -> None:
    check = CollectiveCheck(_NoStore(), rank=0, world_size=2, timeout_s=1)
    ran = []
    wrapped = check.wrap(_Graph(), lambda *a: ran.append(a) or "out")
    assert wrapped is not None and wrapped(1, 2) == "out" and ran == [(1, 2)]
    no_collective = type("G", (), {"graph": type("g", (), {"nodes": []})()})()
    fn = lambda: None  # noqa: E731
    assert check.wrap(no_collective, fn) is fn  # nothing to check: returned as it is
    assert CollectiveCheck(_NoStore(), rank=0, world_size=1, timeout_s=1).wrap(_Graph(), fn) is fn


@pytest.mark.parametrize("boxed", [False, True])
def test_the_boxed_calling_convention_is_kept(boxed: bool) -> None:
    def compiled(args):
        return list(args)

    if boxed:
        compiled._boxed_call = True  # type: ignore[attr-defined]
    wrapped = CollectiveCheck(_NoStore(), rank=0, world_size=2, timeout_s=1).wrap(_Graph(), compiled)
    assert getattr(wrapped, "_boxed_call", False) is boxed


def test_collectives_on_a_subgroup_are_left_out_and_said(monkeypatch: pytest.MonkeyPatch) -> None:
    # In a TP x DP mesh the TP groups differ between ranks: comparing them across the
    # world would fail a correct program, so they are not compared (yet), and the record says so.
    from hardening.runtime.compile import collectives

    monkeypatch.setattr(collectives, "group_size", lambda name: 2 if name == "0" else None)
    check = CollectiveCheck(_NoStore(), rank=0, world_size=4, timeout_s=1)
    fn = lambda: None  # noqa: E731
    assert check.wrap(_Graph(), fn) is fn
    assert check.undecided == ["collectives on group '0' (2 of 4 ranks) are not compared (subgroups are not yet)"]
    assert CollectiveCheck(_NoStore(), rank=0, world_size=2, timeout_s=1).wrap(_Graph(), fn) is not fn
