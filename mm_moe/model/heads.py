"""Task heads as thin modules over one BEiT3 encoder: MLM, MIM, VQA, NLVR2, captioning.

Every task model returns a `TaskOutput` whose `loss` (when targets are given) already includes the
summed MoE aux loss, so a trainer just calls backward on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm_moe.config import BEiT3Config
from mm_moe.constants import IGNORE_INDEX
from mm_moe.model.beit3 import BEiT3, beit3_group_matcher, caption_mask
from mm_moe.model.encoder import KVCache
from mm_moe.moe import RoutingStats


@dataclass
class TaskOutput:
    logits: Tensor
    loss: Tensor | None  # task loss + aux loss, when targets were given
    aux_loss: Tensor  # summed MoE aux loss of every encoder pass
    stats: dict[str, RoutingStats] = field(default_factory=dict)  # per MoE layer, when asked for (stats=True)
    losses: dict[str, Tensor] = field(default_factory=dict)  # the task loss terms, unweighted, for logging


def _init(module: nn.Module) -> None:
    """BEiT-3 head init: trunc-normal(0.02) linears with zero bias, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _labelled_logits(head: nn.Module, hidden: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Head logits at the positions with a label (IGNORE_INDEX: none) and their cross-entropy; without labels,
    logits at every position and no loss. Projecting only the labelled tokens keeps the vocabulary matmul small."""
    if labels is None:
        return head(hidden), None
    chosen = labels != IGNORE_INDEX
    logits = head(hidden[chosen])
    return logits, F.cross_entropy(logits.float(), labels[chosen])


class TaskModel(nn.Module):
    """Base of the task models: a `beit3` encoder plus heads; timm hooks for layer decay and weight decay."""

    beit3: BEiT3

    def group_matcher(self, coarse: bool = False) -> dict:
        return beit3_group_matcher("beit3.")


class Pooler(nn.Module):
    """BEiT-3 pooler: LayerNorm on the first token, dense, tanh."""

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=eps)
        self.dense = nn.Linear(d, d)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(self.norm(hidden[:, 0])))


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class MLMHead(nn.Module):
    """Masked-token prediction: dense, GELU, LayerNorm, then the text embedding matrix (tied) plus a bias."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        d = embedding.embedding_dim
        self.transform = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
        self.embedding = embedding
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings))
        _init(self.transform)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.transform(hidden) @ self.embedding.weight.t() + self.bias


def patchify(images: Tensor, patch: int) -> Tensor:
    """images[B, C, H, W] -> [B, N, patch*patch*C] in PatchEmbed's row-major patch order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def normalized_pixel_target(images: Tensor, patch: int, eps: float = 1e-6) -> Tensor:
    """MAE's target: each patch's pixels normalised by that patch's mean and variance."""
    p = patchify(images, patch)
    return (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True, unbiased=True) + eps).sqrt()


class VisualTokenizer(nn.Module):
    """A frozen visual tokenizer loaded from a local `torch.export` file: images[B, C, H, W] -> ids Long[B, N].

    Any tokenizer saved with `torch.export.save(torch.export.export(tok, (images,)), path)` works
    (e.g. a BEiT-v2 VQ-KD tokenizer), without its source code.
    """

    def __init__(self, path: str | Path, codebook_size: int) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"visual tokenizer checkpoint {path} does not exist (a torch.export file is expected)")
        self.model = torch.export.load(str(path)).module()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.codebook_size = codebook_size

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        ids = self.model(images)
        if ids.dtype != torch.long or ids.min() < 0 or ids.max() >= self.codebook_size:
            raise ValueError(f"visual tokenizer must return Long ids in [0, {self.codebook_size}), got {ids.dtype} "
                             f"in [{int(ids.min())}, {int(ids.max())}]")
        return ids


class MIMHead(nn.Module):
    """Masked image modeling on masked patches: normalised-pixel regression (default) or visual-token classification."""

    def __init__(self, d: int, patch: int, in_chans: int, tokenizer: VisualTokenizer | None = None) -> None:
        super().__init__()
        self.patch = patch
        self.tokenizer = tokenizer
        out = tokenizer.codebook_size if tokenizer is not None else patch * patch * in_chans
        self.proj = nn.Linear(d, out)
        _init(self)

    def loss(self, patch_hidden: Tensor, images: Tensor, patch_mask: Tensor) -> Tensor:
        """patch_hidden[B, N, d] (no [CLS]), images[B, C, H, W], patch_mask Bool[B, N]: mean loss over masked patches."""
        pred = self.proj(patch_hidden[patch_mask])  # [M, out]
        if self.tokenizer is not None:
            return F.cross_entropy(pred.float(), self.tokenizer(images)[patch_mask])
        return F.mse_loss(pred.float(), normalized_pixel_target(images, self.patch)[patch_mask])


class BEiT3ForPretraining(TaskModel):
    """Masked multimodal modeling: MLM on text, MIM on images, masked VL modeling on image-text pairs."""

    def __init__(self, cfg: BEiT3Config, tokenizer: VisualTokenizer | None = None) -> None:
        super().__init__()
        self.beit3 = BEiT3(cfg)
        self.mlm = MLMHead(self.beit3.text.tokens)
        self.mim = MIMHead(cfg.d_model, cfg.patch_size, cfg.in_chans, tokenizer)

    def forward(self, images: Tensor | None = None, text_ids: Tensor | None = None, text_padding: Tensor | None = None,
                patch_mask: Tensor | None = None, mlm_labels: Tensor | None = None, stats: bool = False) -> TaskOutput:
        """mlm_labels Long[B, L] with IGNORE_INDEX where no prediction is wanted; patch_mask marks patches to reconstruct;
        stats: also return the routing statistics of every MoE layer (as every task model's `stats`).

        With mlm_labels, logits are computed at the labelled positions only ([M, vocab], row-major order):
        the vocabulary projection of every token would dominate the cost of a small model.
        """
        out = self.beit3(images, text_ids, text_padding, patch_mask=patch_mask, stats=stats)
        losses: dict[str, Tensor] = {}
        if text_ids is None:
            logits = out.hidden.new_zeros(0)
        else:
            logits, mlm_loss = _labelled_logits(self.mlm, out.hidden[:, out.split:], mlm_labels)
            if mlm_loss is not None:
                losses["mlm"] = mlm_loss
        if images is not None and patch_mask is not None:
            losses["mim"] = self.mim.loss(out.hidden[:, 1:out.split], images, patch_mask)
        return _output(logits, losses, out.aux_loss, out.stats)


class BEiT3ForVQA(TaskModel):
    """VQA as multi-label classification over the answer vocabulary (pooled [CLS] of the image-text pass)."""

    def __init__(self, cfg: BEiT3Config, num_answers: int) -> None:
        super().__init__()
        self.beit3 = BEiT3(cfg)
        self.pooler = Pooler(cfg.d_model, cfg.eps)
        self.head = _mlp(cfg.d_model, 2 * cfg.d_model, num_answers)
        _init(self.pooler)
        _init(self.head)

    def forward(self, images: Tensor, text_ids: Tensor, text_padding: Tensor | None = None,
                targets: Tensor | None = None, stats: bool = False) -> TaskOutput:
        """targets[B, num_answers]: soft scores min(1, 0.3 * n); loss is BEiT-3's BCE-with-logits * num_answers."""
        out = self.beit3(images, text_ids, text_padding, stats=stats)
        logits = self.head(self.pooler(out.hidden))
        losses = {}
        if targets is not None:
            losses["vqa"] = F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]
        return _output(logits, losses, out.aux_loss, out.stats)


class BEiT3ForNLVR2(TaskModel):
    """NLVR2: one pass per image with the same sentence, pooled features concatenated, 2-way classifier."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.beit3 = BEiT3(cfg)
        self.pooler = Pooler(cfg.d_model, cfg.eps)
        self.head = _mlp(2 * cfg.d_model, 2 * cfg.d_model, 2)
        _init(self.pooler)
        _init(self.head)

    def forward(self, images_left: Tensor, images_right: Tensor, text_ids: Tensor, text_padding: Tensor | None = None,
                labels: Tensor | None = None, stats: bool = False) -> TaskOutput:
        """labels Long[B]: 1 for True, 0 for False."""
        b = text_ids.shape[0]
        # both passes in one batch: every MoE layer routes left and right tokens together
        out = self.beit3(torch.cat([images_left, images_right]), text_ids.repeat(2, 1),
                         None if text_padding is None else text_padding.repeat(2, 1), stats=stats)
        pooled = self.pooler(out.hidden)
        logits = self.head(torch.cat([pooled[:b], pooled[b:]], dim=-1))
        losses = {"nlvr2": F.cross_entropy(logits.float(), labels)} if labels is not None else {}
        return _output(logits, losses, out.aux_loss, out.stats)


class BEiT3ForCaptioning(TaskModel):
    """Captioning trained by masked-token prediction under the captioning mask (text causal, image full)."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.beit3 = BEiT3(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        _init(self.head)

    def forward(self, images: Tensor, text_ids: Tensor, text_padding: Tensor | None = None,
                labels: Tensor | None = None, stats: bool = False) -> TaskOutput:
        """text_ids contain [MASK] where labels (Long[B, L], IGNORE_INDEX elsewhere) ask for the original token.

        With labels, logits are computed at the labelled positions only ([M, vocab], row-major order).
        """
        n_img = self.beit3.vision.num_patches + 1
        mask = caption_mask(n_img, text_ids.shape[1], text_ids.device)
        out = self.beit3(images, text_ids, text_padding, attn_mask=mask, stats=stats)
        logits, loss = _labelled_logits(self.head, out.hidden[:, out.split:], labels)
        return _output(logits, {} if loss is None else {"caption": loss}, out.aux_loss, out.stats)

    def encode_image(self, images: Tensor) -> KVCache:
        """The images' keys/values in every block, for `next_token_logits` (encode each image once)."""
        return self.beit3.encode_image(images)

    def next_token_logits(self, ids: Tensor, mask_id: int, *, cache: KVCache | None = None,
                          images: Tensor | None = None) -> Tensor:
        """Logits [B, vocab] of the token after ids Long[B, t]: BEiT-3 predicts it at a [MASK] placed after the text.

        With `cache` (from `encode_image`, holding the image and ids[:, :-1]) only ids[:, -1] and the [MASK] run,
        and ids[:, -1] joins the cache; with `images` the image and all of ids are encoded again (the reference).
        """
        t = ids.shape[1]
        query = torch.full_like(ids[:, :1], mask_id)
        if cache is None:
            if images is None:
                raise ValueError("next_token_logits needs a cache (from encode_image) or the images")
            text = torch.cat([ids, query], 1)
            mask = caption_mask(self.beit3.vision.num_patches + 1, t + 1, ids.device)
            return self.head(self.beit3(images, text, attn_mask=mask).hidden[:, -1])
        mask = torch.ones(2, len(cache) + 2, dtype=torch.bool, device=ids.device)
        mask[0, -1] = False  # the newest real token does not see the [MASK] after it
        hidden = self.beit3.decode_step(torch.cat([ids[:, -1:], query], 1), torch.arange(t - 1, t + 1, device=ids.device),
                                        cache, mask, keep=1)
        return self.head(hidden[:, -1])


def _output(logits: Tensor, losses: dict[str, Tensor], aux: Tensor, stats: dict[str, RoutingStats]) -> TaskOutput:
    loss = sum(losses.values()) + aux if losses else None
    return TaskOutput(logits, loss, aux, stats, losses)


__all__ = ["TaskModel", "TaskOutput", "Pooler", "MLMHead", "MIMHead", "VisualTokenizer", "BEiT3ForPretraining", "BEiT3ForVQA",
           "BEiT3ForNLVR2", "BEiT3ForCaptioning", "patchify", "normalized_pixel_target"]
