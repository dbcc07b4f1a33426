"""Multiway Transformer encoder: shared attention over [vision | text] with modality-specific projections,
norms and FFN branches (pre-LN, sub-LN as in torchscale BEiT-3); collects MoE aux losses and routing stats."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mm_moe.config import FFNConfig
from mm_moe.model.multiway import Multiway
from mm_moe.moe import RoutingStats, build_ffn
from mm_moe.moe.layers import MoELayer


@dataclass
class EncoderOutput:
    hidden: Tensor  # [B, N, d] after the final (multiway) LayerNorm
    aux_loss: Tensor  # f32 scalar: sum of every MoE layer's weighted aux loss
    stats: dict[str, RoutingStats] = field(default_factory=dict)  # per MoE layer name
    split: int = 0  # number of vision tokens at the start of the sequence


def _linear(d_in: int, d_out: int) -> Multiway:
    return Multiway(nn.Linear(d_in, d_out), nn.Linear(d_in, d_out))


def _norm(d: int, eps: float) -> Multiway:
    return Multiway(nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps))


class Attention(nn.Module):
    """Self-attention over the whole sequence; q/k/v/out projections and the sub-LN are per modality."""

    def __init__(self, d_model: int, heads: int, subln: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}")
        self.heads = heads
        self.q, self.k, self.v, self.out = (_linear(d_model, d_model) for _ in range(4))
        self.inner_norm = _norm(d_model, eps) if subln else None

    def project_kv(self, x: Tensor, split: int) -> tuple[Tensor, Tensor]:
        """Keys and values [B, heads, N, d_head] of x (reused by cached decoding)."""
        b, n, d = x.shape
        k = self.k(x, split).view(b, n, self.heads, d // self.heads).transpose(1, 2)
        v = self.v(x, split).view(b, n, self.heads, d // self.heads).transpose(1, 2)
        return k, v

    def forward(self, x: Tensor, split: int, mask: Tensor | None, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x[B, N, d]; mask Bool[B or 1, 1, N, N_kv] (True: may attend); kv: keys/values to use instead of x's own."""
        b, n, d = x.shape
        q = self.q(x, split).view(b, n, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.project_kv(x, split) if kv is None else kv
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, heads, N, d_head]
        y = y.transpose(1, 2).reshape(b, n, d)
        if self.inner_norm is not None:
            y = self.inner_norm(y, split)
        return self.out(y, split)


class Block(nn.Module):
    """Pre-LN block: x + drop_path(gamma1 * attn(LN(x))); x + drop_path(gamma2 * ffn(LN(x)))."""

    def __init__(self, d_model: int, heads: int, ffn_v: FFNConfig, ffn_l: FFNConfig | None, *, subln: bool = True,
                 drop_path: float = 0.0, layer_scale: float | None = None, eps: float = 1e-5) -> None:
        """ffn_l None: one FFN shared by both modalities; `subln` applies to attention (the FFN config has its own)."""
        super().__init__()
        self.attn_norm = _norm(d_model, eps)
        self.attn = Attention(d_model, heads, subln, eps)
        self.ffn = Multiway(build_ffn(ffn_v, d_model), build_ffn(ffn_l, d_model) if ffn_l is not None else None)
        self.ffn_norm = None if self.ffn.v.owns_residual_norm else _norm(d_model, eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.gamma_attn = nn.Parameter(torch.full((d_model,), layer_scale)) if layer_scale else None
        self.gamma_ffn = nn.Parameter(torch.full((d_model,), layer_scale)) if layer_scale else None

    def cached(self, x: Tensor, split: int, mask: Tensor | None, past: tuple[Tensor, Tensor] | None
               ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Inference step over new tokens x that attend to `past` keys/values plus themselves (as `mask` allows).

        Returns the block output and x's own keys/values, for the caller to cache. Same math as forward().
        """
        h = self.attn_norm(x, split)
        k, v = self.attn.project_kv(h, split)
        kv = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        y = self.attn(h, split, mask, kv=kv)
        x = x + (y if self.gamma_attn is None else self.gamma_attn * y)
        y = self.ffn(x if self.ffn_norm is None else self.ffn_norm(x, split), split, padding_mask=None)
        return x + (y if self.gamma_ffn is None else self.gamma_ffn * y), (k, v)

    def forward(self, x: Tensor, split: int, mask: Tensor | None, padding_mask: Tensor | None) -> Tensor:
        y = self.attn(self.attn_norm(x, split), split, mask)
        x = x + self.drop_path(y if self.gamma_attn is None else self.gamma_attn * y)
        h = x if self.ffn_norm is None else self.ffn_norm(x, split)
        y = self.ffn(h, split, padding_mask=padding_mask)
        return x + self.drop_path(y if self.gamma_ffn is None else self.gamma_ffn * y)


def moe_layer_ids(depth: int, placement: str) -> set[int]:
    """Which layers get MoE FFNs: "none", "all", "every_other" (layers 1, 3, 5, ...), or "top<N>" (the last N)."""
    if placement == "none":
        return set()
    if placement == "all":
        return set(range(depth))
    if placement == "every_other":
        return set(range(1, depth, 2))
    if placement.startswith("top") and placement[3:].isdigit() and 0 < int(placement[3:]) <= depth:
        return set(range(depth - int(placement[3:]), depth))
    raise ValueError(f"moe_layers must be none, all, every_other or top<N> with N <= depth={depth}, got {placement!r}")


class Encoder(nn.Module):
    """A stack of Blocks plus a final multiway LayerNorm."""

    def __init__(self, d_model: int, depth: int, heads: int, dense: FFNConfig, moe: FFNConfig | None, *,
                 moe_layers: str = "none", moe_shared_branches: bool = False, subln: bool = True,
                 drop_path: float = 0.0, layer_scale: float | None = None, grad_checkpointing: bool = False,
                 eps: float = 1e-5) -> None:
        super().__init__()
        moe_ids = moe_layer_ids(depth, moe_layers) if moe is not None else set()
        self.blocks = nn.ModuleList()
        for i in range(depth):
            cfg = moe if i in moe_ids else dense
            shared = i in moe_ids and moe_shared_branches
            rate = drop_path * i / max(depth - 1, 1)
            self.blocks.append(Block(d_model, heads, cfg, None if shared else cfg, subln=subln, drop_path=rate,
                                     layer_scale=layer_scale, eps=eps))
        self.norm = _norm(d_model, eps)
        self.grad_checkpointing = grad_checkpointing

    def moe_layers(self) -> dict[str, MoELayer]:
        """Every MoE FFN module by name."""
        return {n: m for n, m in self.named_modules() if isinstance(m, MoELayer)}

    def forward(self, x: Tensor, split: int, mask: Tensor | None = None, padding_mask: Tensor | None = None) -> EncoderOutput:
        """x[B, N, d] embeddings; mask Bool[B or 1, 1, N, N] (True: may attend); padding_mask Bool[B, N] (True: pad)."""
        moe = self.moe_layers()
        for m in moe.values():  # a branch that sees no tokens this time must not report stale values
            m.aux_loss, m.last_stats = x.new_zeros((), dtype=torch.float32), None
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, split, mask, padding_mask, use_reentrant=False)
            else:
                x = block(x, split, mask, padding_mask)
        aux = sum((m.aux_loss for m in moe.values()), x.new_zeros((), dtype=torch.float32))
        stats = {n: m.last_stats for n, m in moe.items() if m.last_stats is not None}
        return EncoderOutput(self.norm(x, split), aux, stats, split)
