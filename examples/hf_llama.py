"""A tiny Hugging Face Llama, tensor-parallel through its own TP plan, random weights.

What a user serving a ``transformers`` model writes: the model's ``base_model_tp_plan``
(column-parallel q/k/v and gate/up, row-parallel o/down) applied by ``from_pretrained``
with a ``DistributedConfig``. Nothing is downloaded: the weights come from the seed and
are written to a local checkpoint first, the way a fine-tuned model would be on disk.
Inputs are token ids of shape ``(1, T)``.

    pip install -e ".[hf]"
    hardening suite all --ranks 2 --target examples/hf_llama.py:build
"""

import tempfile

import torch
from torch import nn

from hardening.region import Region, RegionContext


class CausalLM(nn.Module):
    """The logits of the model, as a serving loop reads them (no KV cache objects)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def build(ctx: RegionContext) -> Region:
    from safetensors.torch import save_file
    from transformers import DistributedConfig, LlamaConfig, LlamaForCausalLM

    dims = ctx.dims
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=dims["hidden"],
        intermediate_size=dims["mlp"],
        num_hidden_layers=2,
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["heads"],
        max_position_embeddings=4 * dims["tokens"],
        attn_implementation="sdpa",
    )
    torch.manual_seed(ctx.seed)
    with tempfile.TemporaryDirectory(prefix=f"hf_llama_rank{ctx.rank}_") as checkpoint:
        # Each rank writes its own copy (the same bits: the same seed). save_pretrained
        # would write on rank 0 only once a process group exists.
        config.save_pretrained(checkpoint)
        save_file(LlamaForCausalLM(config).state_dict(), f"{checkpoint}/model.safetensors", metadata={"format": "pt"})
        # transformers builds its mesh over the whole world (a pipeline's mesh of 2 or more
        # ranks is refused: "The parallel mesh requires 2 processes, but world_size is 3");
        # a mesh of one rank (pp cases at --ranks 2) loads the model whole.
        model = LlamaForCausalLM.from_pretrained(
            checkpoint, dtype=ctx.dtype, distributed_config=DistributedConfig(tp_size=ctx.world_size)
        )
    model.eval().requires_grad_(False)
    tokens = dims["tokens"]

    def make_inputs(call_id: int):
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + call_id)
        return (torch.randint(0, config.vocab_size, (1, tokens), generator=gen).to(ctx.device),)

    region = CausalLM(model)
    # What the TP plan leaves whole is the same on every rank: say so, and the weight check
    # compares it across ranks. That is the RMSNorm weights only (the plan shards the
    # embedding and the LM head too: declaring them made the check fail, rightly).
    replicated = tuple(n for n, _ in region.named_parameters() if "norm" in n)
    return Region(module=region, make_inputs=make_inputs, input_names=("input_ids",), replicated_params=replicated)
