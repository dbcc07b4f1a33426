"""Masking: BERT-style text MLM masking and BEiT block-wise image masking (pretraining), caption masking
(captioning fine-tuning)."""

from __future__ import annotations

import math
import random

import torch

from mm_moe.constants import IGNORE_INDEX


def mask_text(ids: list[int], *, special_ids: set[int], mask_id: int, vocab_size: int, rng: random.Random,
              prob: float = 0.15) -> tuple[list[int], list[int]]:
    """BERT masking: each non-special token is chosen with `prob` (at least one per text); a chosen token becomes
    [MASK] 80% of the time, a random token 10%, itself 10%. Returns (input ids, labels: IGNORE_INDEX where not chosen)."""
    candidates = [i for i, t in enumerate(ids) if t not in special_ids]
    chosen = {i for i in candidates if rng.random() < prob}
    if candidates and not chosen:
        chosen = {rng.choice(candidates)}
    inputs, labels = list(ids), [IGNORE_INDEX] * len(ids)
    for i in chosen:
        labels[i] = ids[i]
        r = rng.random()
        if r < 0.8:
            inputs[i] = mask_id
        elif r < 0.9:
            inputs[i] = rng.randrange(vocab_size)
    return inputs, labels


class BlockMasking:
    """BEiT's block-wise masking: random rectangles (aspect ratio in [min_aspect, 1/min_aspect], each of at least
    `min_block` patches) are added until `num_masked` patches are masked or no rectangle fits in 10 attempts."""

    def __init__(self, grid: tuple[int, int], num_masked: int, min_block: int = 4, max_block: int | None = None,
                 min_aspect: float = 0.3) -> None:
        self.height, self.width = grid
        if not 0 < num_masked <= self.height * self.width:
            raise ValueError(f"num_masked must be in [1, {self.height * self.width}], got {num_masked}")
        self.num_masked = num_masked
        self.min_block = min_block
        self.max_block = num_masked if max_block is None else max_block
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _add_block(self, mask: torch.Tensor, budget: int, rng: random.Random) -> int:
        for _ in range(10):
            area = rng.uniform(self.min_block, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if w < self.width and h < self.height:
                top, left = rng.randint(0, self.height - h), rng.randint(0, self.width - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block.fill_(True)
                    return new
        return 0

    def __call__(self, rng: random.Random) -> torch.Tensor:
        """Bool[height * width] in row-major patch order (as PatchEmbed flattens), True = masked."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < self.num_masked:
            added = self._add_block(mask, min(self.num_masked - count, self.max_block), rng)
            if added == 0:
                break
            count += added
        return mask.flatten()


def mask_caption(ids: torch.Tensor, padding: torch.Tensor, prob: float, mask_id: int,
                 never: set[int], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """BEiT-3 captioning targets for ids Long[B, L]: each real token (not padding, not in `never`) is masked with
    `prob`, at least one per caption. Row b's draws come from seeds[b] alone (the same masks however the
    batch was split over ranks, and after a resume). Returns (inputs with [MASK], labels: IGNORE_INDEX where
    not masked)."""
    can = ~padding & ~torch.isin(ids, torch.tensor(sorted(never), device=ids.device))
    draws = torch.stack([torch.rand(ids.shape[1], generator=torch.Generator().manual_seed(s)) for s in seeds])
    chosen = (draws.to(ids.device) < prob) & can
    first = can.float().argmax(1)  # rows with nothing chosen get their first candidate
    none = ~chosen.any(1)
    chosen[none, first[none]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return torch.where(chosen, torch.full_like(ids, mask_id), ids), labels
