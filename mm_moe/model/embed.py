"""Input embeddings: image patches (timm PatchEmbed) + [CLS] + absolute positions, text tokens + positions."""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from torch import Tensor, nn


class VisionEmbedding(nn.Module):
    """Patches -> [CLS] + patch tokens with learned absolute positions; masked patches become a mask token."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, d_model: int) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, d_model)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, d_model))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """images[B, C, H, W], patch_mask Bool[B, num_patches] (True: replace by the mask token) -> [B, 1 + N, d]."""
        x = self.patch_embed(images)  # [B, N, d]
        if patch_mask is not None:
            w = patch_mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + self.pos_embed


class TextEmbedding(nn.Module):
    """Token + learned absolute position embeddings."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, d_model))
        nn.init.normal_(self.tokens.weight, std=d_model**-0.5)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, ids: Tensor, positions: Tensor | None = None) -> Tensor:
        """ids Long[B, L] -> [B, L, d]; `positions` (Long[L]) lets a decoder embed token i alone at position i."""
        if ids.shape[1] > self.pos_embed.shape[1] and positions is None:
            raise ValueError(f"text length {ids.shape[1]} exceeds max_text_len={self.pos_embed.shape[1]}")
        pos = self.pos_embed[:, : ids.shape[1]] if positions is None else self.pos_embed[:, positions]
        return self.tokens(ids) + pos
