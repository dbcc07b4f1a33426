"""Input embeddings: image patches (timm PatchEmbed, or a convolutional stem) + [CLS] + absolute positions,
text tokens + positions."""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer_hybrid import ConvStem
from torch import Tensor, nn


class ConvPatchEmbed(nn.Module):
    """Xiao et al. 2021 ("Early convolutions help transformers see better"): log2(patch) stride-2 3x3 convolutions
    (BatchNorm + ReLU between them, channels doubling up to d_model) in place of one patch-sized linear map; same
    tokens out, in PatchEmbed's row-major order. Pixels of masked patches are zeroed first, so that the
    overlapping receptive fields of visible patches cannot see them."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, d_model: int) -> None:
        super().__init__()
        depth = patch_size.bit_length() - 1  # patch_size is a power of two (BEiT3Config checks)
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.stem = ConvStem(in_chans, depth=depth, channels=d_model, stride=(2,) * depth)

    def forward(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """images[B, C, H, W], patch_mask Bool[B, N] (True: its pixels are hidden) -> [B, N, d]."""
        if patch_mask is not None:
            b, c, h, w = images.shape
            p, g = self.patch_size, h // self.patch_size
            keep = (~patch_mask).to(images.dtype).view(b, g, 1, g, 1)
            images = (images.view(b, c, g, p, w // p, p) * keep.unsqueeze(1)).view(b, c, h, w)
        return self.stem(images).flatten(2).transpose(1, 2)


class VisionEmbedding(nn.Module):
    """Patches -> [CLS] + patch tokens with learned absolute positions; masked patches become a mask token."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, d_model: int, stem: str = "patch") -> None:
        super().__init__()
        self.conv_stem = stem == "conv"
        self.patch_embed = (ConvPatchEmbed if self.conv_stem else PatchEmbed)(img_size, patch_size, in_chans, d_model)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, d_model))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, images: Tensor, patch_mask: Tensor | None = None) -> Tensor:
        """images[B, C, H, W], patch_mask Bool[B, num_patches] (True: replace by the mask token) -> [B, 1 + N, d]."""
        x = self.patch_embed(images, patch_mask) if self.conv_stem else self.patch_embed(images)  # [B, N, d]
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
