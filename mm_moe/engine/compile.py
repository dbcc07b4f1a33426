"""torch.compile for the encoder: the settings the project needs, and regional compilation of every Block.

Each Block is compiled on its own with `fullgraph=True`, as torchtitan's `apply_compile`: blocks of the same
structure share their graphs, the embeddings and heads stay eager, and a graph break is an error rather than a
silent slowdown. `nn.Module.compile` compiles in place, so parameter and checkpoint names stay the eager ones
(no `_orig_mod.`) and compiled and eager runs resume each other.
"""

from __future__ import annotations

import torch
from torch import nn

from mm_moe.model import Block
from mm_moe.moe.parallel import ExpertParallelExperts

RECOMPILE_LIMIT = 64
"""Graphs dynamo may keep per code object. Every compiled block shares Module._call_impl's, and each block
structure (dense, MoE) needs one graph per kind of pass (text, image, image-text), with or without routing
statistics, in training and in evaluation: more than dynamo's default of 8, past which it would run the blocks
eagerly with only a warning."""


def configure_compile() -> None:
    """Apply the dynamo / AOTAutograd settings the project's layers need; idempotent. After it, a plain
    `torch.compile(layer, fullgraph=True)` of any FFN layer traces without a graph break and, in backward,
    computes what eager mode computes."""
    # The backward of a compiled region runs without autocast, as eager autograd does. The default replays the
    # forward's autocast over the backward graph, which runs the router's float32 region's gradients in bf16.
    torch._functorch.config.backward_pass_autocast = "off"
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every encoder Block of `model` in place (token and batch dimensions dynamic after the first shape
    change); returns how many. A block with expert-parallel experts is compiled without fullgraph: their
    all_to_all needs its split sizes on the host, so they run eagerly between two graphs."""
    configure_compile()
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        fullgraph = not any(isinstance(m, ExpertParallelExperts) for m in block.modules())
        block.compile(backend=backend, fullgraph=fullgraph)
    return len(blocks)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far: first compiles plus recompiles."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


__all__ = ["configure_compile", "compile_blocks", "compiled_graphs", "RECOMPILE_LIMIT"]
