"""Multiway wrapper: vision tokens go to branch V, text tokens to branch L.

A sequence is [vision tokens | text tokens]; `split` is the number of vision tokens (0: text only,
the full length: image only). Both branches can be the same module (a shared branch), in which case
the whole sequence goes through it in one call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mm_moe.moe import FFNOutput, RoutingStats


class Multiway(nn.Module):
    """Apply `v` to x[:, :split] and `l` to x[:, split:]; extra tensor kwargs [B, N, ...] are split the same way."""

    def __init__(self, vision: nn.Module, language: nn.Module | None = None) -> None:
        super().__init__()
        self.v = vision
        self.l = language if language is not None else vision  # state-dict names: ffn.v / ffn.l

    @property
    def shared(self) -> bool:
        return self.l is self.v

    def branch_outputs(self, x: Tensor, split: int, per_token: dict[str, Tensor | None], **kwargs: Any) -> list[tuple[str, Any]]:
        """(branch name, output) of each branch that sees tokens, in sequence order; the tensors of `per_token`
        ([B, N, ...] or None) are split with x, `kwargs` go to both as they are."""
        n = x.shape[1]
        if self.shared or split == n:
            return [("v", self.v(x, **per_token, **kwargs))]
        if split == 0:
            return [("l", self.l(x, **per_token, **kwargs))]
        parts = {k: (None, None) if t is None else (t[:, :split], t[:, split:]) for k, t in per_token.items()}
        return [(name, branch(x[:, sl], **{k: p[i] for k, p in parts.items()}, **kwargs))
                for i, (name, branch, sl) in enumerate((("v", self.v, slice(None, split)), ("l", self.l, slice(split, None))))]

    def forward(self, x: Tensor, split: int, **per_token: Tensor | None) -> Tensor:
        outs = [y for _, y in self.branch_outputs(x, split, per_token)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def branches(self) -> list[nn.Module]:
        """The distinct branch modules (one when shared)."""
        return [self.v] if self.shared else [self.v, self.l]


class MultiwayFFN(Multiway):
    """Multiway over FFN layers (`FFNOutput`s): the outputs joined, the aux losses summed, the statistics by branch."""

    def forward(self, x: Tensor, split: int, padding_mask: Tensor | None = None,  # type: ignore[override]
                stats: bool = False) -> tuple[Tensor, Tensor, dict[str, RoutingStats]]:
        outs: list[tuple[str, FFNOutput]] = self.branch_outputs(x, split, {"padding_mask": padding_mask}, stats=stats)
        ys = [o.out for _, o in outs]
        aux = outs[0][1].aux_loss if len(outs) == 1 else outs[0][1].aux_loss + outs[1][1].aux_loss
        return (ys[0] if len(ys) == 1 else torch.cat(ys, dim=1), aux,
                {name: o.stats for name, o in outs if o.stats is not None})
