"""Multiway Transformer encoder: shared attention over [vision | text] with modality-specific projections,
norms and FFN branches (pre-LN, sub-LN as in torchscale BEiT-3); sums the MoE aux losses each block returns
and, when asked, collects their routing statistics.

One code path for training and cached decoding: a block given a `KVCache` attends to the cached keys/values
of earlier tokens as well as to its own tokens, and appends what the cache keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mm_moe.config import FFNConfig
from mm_moe.model.multiway import Multiway, MultiwayFFN
from mm_moe.moe import RoutingStats, build_ffn
from mm_moe.placement import moe_layer_ids


@dataclass
class EncoderOutput:
    hidden: Tensor  # [B, N, d] after the final (multiway) LayerNorm
    aux_loss: Tensor  # f32 scalar: sum of every MoE layer's weighted aux loss
    stats: dict[str, RoutingStats] = field(default_factory=dict)  # per MoE layer name (blocks.i.ffn.v / .l), if asked
    split: int = 0  # number of vision tokens at the start of the sequence


class KVCache:
    """Keys/values [B, heads, N, d_head] of every block for the tokens decoded so far (inference only).

    At each call a block attends to the cached keys/values plus those of its new tokens; the first `keep` new
    tokens (all when None) are appended to the cache, the rest (e.g. a [MASK] query) are not.
    """

    def __init__(self, depth: int, keep: int | None = None) -> None:
        self.keys: list[Tensor | None] = [None] * depth
        self.values: list[Tensor | None] = [None] * depth
        self.keep = keep

    def __len__(self) -> int:
        """Cached tokens (of the last block, which every call updates last)."""
        return 0 if self.keys[-1] is None else self.keys[-1].shape[2]

    def update(self, k: Tensor, v: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """Past plus new keys/values of `layer` (to attend to); stores past plus the first `keep` new ones."""
        past_k, past_v = self.keys[layer], self.values[layer]
        past = 0 if past_k is None else past_k.shape[2]
        if past_k is not None:
            k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        stop = k.shape[2] if self.keep is None else past + self.keep
        self.keys[layer], self.values[layer] = k[:, :, :stop], v[:, :, :stop]
        return k, v

    def repeat_interleave(self, n: int) -> KVCache:
        """Each batch row repeated n times (one copy per beam)."""
        return self._map(lambda t: t.repeat_interleave(n, 0))

    def select(self, rows: Tensor) -> KVCache:
        """The cache of batch rows `rows` (the beams that survive a step)."""
        return self._map(lambda t: t[rows])

    def _map(self, fn: Callable[[Tensor], Tensor]) -> KVCache:
        out = KVCache(len(self.keys), self.keep)
        out.keys = [None if t is None else fn(t) for t in self.keys]
        out.values = [None if t is None else fn(t) for t in self.values]
        return out


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT / BEiT-3 layer scale)."""

    def __init__(self, d: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((d,), init))

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * x


def _linear(d_in: int, d_out: int) -> Multiway:
    return Multiway(nn.Linear(d_in, d_out), nn.Linear(d_in, d_out))


def _norm(d: int, eps: float) -> Multiway:
    return Multiway(nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps))


class Attention(nn.Module):
    """Self-attention over the whole sequence; q/k/v/out projections and the sub-LN are per modality."""

    def __init__(self, d_model: int, heads: int, subln: bool = True, eps: float = 1e-5, layer_idx: int = 0) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}")
        self.heads = heads
        self.layer_idx = layer_idx  # this block's slot in a KVCache
        self.q, self.k, self.v, self.out = (_linear(d_model, d_model) for _ in range(4))
        self.inner_norm = _norm(d_model, eps) if subln else Multiway(nn.Identity())

    def forward(self, x: Tensor, split: int, mask: Tensor | None, cache: KVCache | None = None) -> Tensor:
        """x[B, N, d]; mask Bool[B or 1, 1, N, N_kv] (True: may attend); with a cache, x attends to the cached
        keys/values before its own (N_kv = cached + N)."""
        b, n, d = x.shape
        q, k, v = (proj(x, split).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, heads, N, d_head]
        return self.out(self.inner_norm(y.transpose(1, 2).reshape(b, n, d), split), split)


class Block(nn.Module):
    """Pre-LN block: x + drop_path(ls1(attn(LN(x)))); x + drop_path(ls2(ffn(LN(x))))."""

    def __init__(self, d_model: int, heads: int, ffn_v: FFNConfig, ffn_l: FFNConfig | None, *, subln: bool = True,
                 drop_path: float = 0.0, layer_scale: float | None = None, eps: float = 1e-5, layer_idx: int = 0) -> None:
        """ffn_l None: one FFN shared by both modalities; `subln` applies to attention (the FFN config has its own)."""
        super().__init__()
        self.attn_norm = _norm(d_model, eps)
        self.attn = Attention(d_model, heads, subln, eps, layer_idx)
        self.ffn = MultiwayFFN(build_ffn(ffn_v, d_model, eps), build_ffn(ffn_l, d_model, eps) if ffn_l is not None else None)
        # a layer that owns its residual norm (CartesianMoE) gets the un-normalised stream
        self.ffn_norm = Multiway(nn.Identity()) if self.ffn.v.owns_residual_norm else _norm(d_model, eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ls_attn = LayerScale(d_model, layer_scale) if layer_scale else nn.Identity()
        self.ls_ffn = LayerScale(d_model, layer_scale) if layer_scale else nn.Identity()

    def forward(self, x: Tensor, split: int, mask: Tensor | None, padding_mask: Tensor | None = None,
                cache: KVCache | None = None, stats: bool = False) -> tuple[Tensor, Tensor, dict[str, RoutingStats]]:
        """x[B, N, d]; see Encoder.forward. With `cache`, x are new tokens that also attend to the cached ones.
        Returns the new x, the FFN's aux loss, and its routing statistics by branch ("v", "l") when asked for."""
        x = x + self.drop_path(self.ls_attn(self.attn(self.attn_norm(x, split), split, mask, cache)))
        y, aux, branch_stats = self.ffn(self.ffn_norm(x, split), split, padding_mask, stats)
        return x + self.drop_path(self.ls_ffn(y)), aux, branch_stats


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
                                     layer_scale=layer_scale, eps=eps, layer_idx=i))
        self.norm = _norm(d_model, eps)
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: Tensor, split: int, mask: Tensor | None = None, padding_mask: Tensor | None = None,
                cache: KVCache | None = None, stats: bool = False) -> EncoderOutput:
        """x[B, N, d] embeddings; mask Bool[B or 1, 1, N, N_kv] (True: may attend); padding_mask Bool[B, N]
        (True: pad); cache: keys/values of earlier tokens that x attends to as well (inference); stats: also
        return every MoE layer's routing statistics (on the device: reading them is up to the caller)."""
        aux = x.new_zeros((), dtype=torch.float32)
        all_stats: dict[str, RoutingStats] = {}
        mark_tokens_dynamic(x, mask, padding_mask)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                x, block_aux, block_stats = checkpoint(block, x, split, mask, padding_mask, None, stats, use_reentrant=False)
            else:
                x, block_aux, block_stats = block(x, split, mask, padding_mask, cache, stats)
            aux = aux + block_aux
            all_stats.update({f"blocks.{i}.ffn.{branch}": s for branch, s in block_stats.items()})
        return EncoderOutput(self.norm(x, split), aux, all_stats, split)


def mark_tokens_dynamic(x: Tensor, mask: Tensor | None, padding_mask: Tensor | None) -> None:
    """Mark the token dimensions symbolic for compiled blocks (text lengths vary from batch to batch), so their first
    graph already serves every length; the batch dimension becomes symbolic only if it changes. No effect eagerly."""
    torch._dynamo.maybe_mark_dynamic(x, 1)
    if padding_mask is not None:
        torch._dynamo.maybe_mark_dynamic(padding_mask, 1)
    if mask is not None:
        for dim in (2, 3):
            if mask.shape[dim] > 1:
                torch._dynamo.maybe_mark_dynamic(mask, dim)
