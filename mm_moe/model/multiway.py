"""Multiway wrapper: vision tokens go to branch V, text tokens to branch L.

A sequence is [vision tokens | text tokens]; `split` is the number of vision tokens (0: text only,
the full length: image only). Both branches can be the same module (a shared branch), in which case
the whole sequence goes through it in one call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Multiway(nn.Module):
    """Apply `v` to x[:, :split] and `l` to x[:, split:]; extra tensor kwargs [B, N, ...] are split the same way."""

    def __init__(self, vision: nn.Module, language: nn.Module | None = None) -> None:
        super().__init__()
        self.v = vision
        self.l = language if language is not None else vision  # state-dict names: ffn.v / ffn.l

    @property
    def shared(self) -> bool:
        return self.l is self.v

    def forward(self, x: Tensor, split: int, **kwargs: Tensor | None) -> Tensor:
        n = x.shape[1]
        if self.shared or split == n:
            return self.v(x, **kwargs)
        if split == 0:
            return self.l(x, **kwargs)
        parts = {k: (None, None) if t is None else (t[:, :split], t[:, split:]) for k, t in kwargs.items()}
        yv = self.v(x[:, :split], **{k: p[0] for k, p in parts.items()})
        yl = self.l(x[:, split:], **{k: p[1] for k, p in parts.items()})
        return torch.cat([yv, yl], dim=1)

    def branches(self) -> list[nn.Module]:
        """The distinct branch modules (one when shared)."""
        return [self.v] if self.shared else [self.v, self.l]
