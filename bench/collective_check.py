"""Benchmark: what the compile-time collective check costs, measured in one run.

Two gloo ranks compile a stack of column/row-parallel MLP layers (one ``all_reduce``
each, one graph) through the counting backend, with and without
:class:`hardening.runtime.compile.collectives.CollectiveCheck`, alternating, after a
``torch._dynamo.reset()`` each time (one untimed compile first, then pairs in
alternating order). Printed per layer count: the first call (compile +
run) with and without the check and their ratio, the check's time in that call on the
rank that arrived last (its own cost: publish, read, compare) and on rank 0 (which also
waits there for its peer's compile, time it would otherwise spend in the graph's first
collective), and a steady-state call (the check inactive: one attribute read per graph)
with and without it.

    python bench/collective_check.py [--layers 4,32] [--repeats 5] [--steady 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank: int, port: int, layers_list: list[int], repeats: int, steady: int, out: dict) -> None:
    import torch._dynamo
    import torch.distributed._functional_collectives as funcol

    from hardening.runtime.compile.backend import counting_backend
    from hardening.runtime.compile.collectives import CollectiveCheck
    from hardening.runtime.compile.probe import CompileProbe

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=2)
    torch.manual_seed(0)
    call_id = 0

    class Stack(torch.nn.Module):
        def __init__(self, layers: int) -> None:
            super().__init__()
            self.w1 = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(128, 64) / 8, requires_grad=False) for _ in range(layers)])
            self.w2 = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(64, 128) / 11, requires_grad=False) for _ in range(layers)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for a, b in zip(self.w1, self.w2):
                x = x + funcol.all_reduce(torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, a)), b), "sum", dist.group.WORLD)
            return x

    rows = []
    for layers in layers_list:
        module, x = Stack(layers), torch.randn(8, 64)
        first = {True: [], False: []}
        own: list[float] = []
        per_call = {True: [], False: []}
        # One untimed compile first (imports, lazy init); then pairs in alternating order.
        order = [True] + [m for p in range(repeats) for m in ((True, False) if p % 2 else (False, True))]
        for i, with_check in enumerate(order):
            torch._dynamo.reset()
            probe = CompileProbe()
            probe.install()
            check = CollectiveCheck(store, rank=rank, world_size=2, timeout_s=60) if with_check else None
            compiled = torch.compile(module, backend=counting_backend(probe, "eager", check=check))
            dist.barrier()
            call_id += 1
            t0 = time.perf_counter()
            if check is not None:
                check.begin_call(call_id)
            compiled(x)
            if check is not None:
                check.end_call()
            took = time.perf_counter() - t0
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steady):
                compiled(x)
            steady_s = (time.perf_counter() - t0) / steady
            probe.remove()
            if i == 0:
                continue
            first[with_check].append(took)
            per_call[with_check].append(steady_s)
            if check is not None:
                own.append(check.checked_s)
        rows.append(
            (layers, statistics.median(first[True]), statistics.median(first[False]), own,
             statistics.median(per_call[True]), statistics.median(per_call[False]))
        )  # fmt: skip
    out[rank] = rows
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,32", help="comma-separated layer counts (one all_reduce each)")
    parser.add_argument("--repeats", type=int, default=5, help="compiles per mode and layer count")
    parser.add_argument("--steady", type=int, default=200, help="steady-state calls timed per compile")
    args = parser.parse_args()
    layers = [int(v) for v in args.layers.split(",")]
    with mp.Manager() as manager:
        out = manager.dict()
        port = 29500 + os.getpid() % 1000
        started = time.time()
        mp.spawn(rank_main, args=(port, layers, args.repeats, args.steady, out), nprocs=2, join=True)
        rows0, rows1 = out[0], out[1]
    # The check's time on the rank that arrived last is its own cost (publish, read, compare);
    # the first rank's also holds the wait for its peer's compile, which it would otherwise
    # spend in the graph's first collective.
    rows = [(*r0[:3], statistics.median(min(a, b) for a, b in zip(r0[3], r1[3])), statistics.median(r0[3]), *r0[4:]) for r0, r1 in zip(rows0, rows1)]
    print(f"torch {torch.__version__}, 2 gloo ranks on CPU, eager backend, {args.repeats} compiles per mode, {time.time() - started:.0f}s")
    print("| layers (collectives) | first call, check on | first call, check off | ratio | check, last rank in | check, rank 0 (incl. wait) | steady call on / off |")
    print("|---|---|---|---|---|---|---|")
    for layers, on, off, own, rank0, s_on, s_off in rows:
        print(
            f"| {layers} | {on * 1e3:.0f} ms | {off * 1e3:.0f} ms | {on / off:.3f} | {own * 1e3:.1f} ms | {rank0 * 1e3:.1f} ms "
            f"| {s_on / s_off:.3f} ({s_on * 1e6:.0f} µs) |"
        )


if __name__ == "__main__":
    sys.exit(main())
