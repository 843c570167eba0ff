"""Your own pipeline server, hardened: rank 0 outside the mesh, TP inside it (PP1).

    torchrun --nproc-per-node 3 examples/pp_server.py

Rank 0 makes each chunk and takes each result; ranks 1..N-1 run a row-parallel
projection on ``mesh_pg``. The Session builds and checks the groups, stamps and checks
every message, bounds the queues (D_in = D_out = 2), drops results made stale by a hard
cut, holds the compiled region to ``mesh_pg`` and ends every rank with a named cause.
``PP_KIND=pp0`` runs PP0 instead (rank 0 sends each chunk to every mesh rank).
"""

import os

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

import hardening.runtime as hr

HIDDEN, TOKENS, CHUNKS = 64, 8, 12


class RowParallel(nn.Module):
    def __init__(self, index: int, size: int, group) -> None:
        super().__init__()
        self.cols, self.group = slice(index * HIDDEN // size, (index + 1) * HIDDEN // size), group
        full = torch.randn(HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(0))
        self.w = nn.Parameter(full[:, self.cols].contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(F.linear(x[..., self.cols], self.w), "sum", self.group)


def make(chunk_id: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(chunk_id))}


@hr.record
def main() -> None:
    config = hr.RuntimeConfig(pipeline=hr.PipelineConfig(kind=os.environ.get("PP_KIND", "pp1")))
    with hr.Session.from_env(config, fingerprint={"model": "row-parallel-64"}) as s:
        x = hr.Spec(shape=(TOKENS, HIDDEN), dtype="float32")
        pipe = s.pipeline(inputs={"x": x}, outputs={"y": x})
        if pipe.is_control:
            pipe.warmup(make, calls=2)
            taken = [r for k in range(CHUNKS) for r in pipe.submit(make(pipe.next_chunk_id))] + pipe.drain()
            print(f"rank 0: {len(taken)} results, last norm {taken[-1].y.norm():.3f}", flush=True)
        else:
            mesh = pipe.topology.mesh
            layer = s.compile(RowParallel(mesh.index(s.rank), len(mesh), pipe.mesh_group))
            pipe.serve(layer, warmup=2)


if __name__ == "__main__":
    main()
