"""Caption generation: beam search over BEiT-3's masked-token captioning, through the model's own API
(`BEiT3ForCaptioning.encode_image` / `next_token_logits`): the text so far is followed by a [MASK] whose
prediction is the next token. With `use_cache` each image is encoded once (its keys/values in every block are
reused across steps and beams) and each step runs only the newest real token and the new [MASK]; without the
cache every step re-encodes image and text (the reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mm_moe.model.encoder import KVCache
from mm_moe.model.heads import BEiT3ForCaptioning


@dataclass
class BeamConfig:
    beam_size: int = 3  # 1 = greedy
    max_len: int = 25  # generated tokens, [SEP] included
    min_len: int = 5  # caption tokens before [SEP] may end it
    length_penalty: float = 0.6  # final score = sum log p / length ** length_penalty
    no_repeat_ngram: int = 3  # 0 = off


class CaptionDecoder:
    """Beam search for a BEiT3ForCaptioning model; `use_cache=False` re-encodes everything each step.

    With `in_step` (torch.distributed, every rank decoding its own images) a rank whose beams are done keeps running
    the model, its outputs unused, until every rank is done: FSDP2's and expert parallelism's forwards are
    collectives, so all ranks must make the same number of them."""

    def __init__(self, model: BEiT3ForCaptioning, tokenizer: Any, cfg: BeamConfig | None = None, use_cache: bool = True,
                 in_step: bool = False):
        self.model, self.tok, self.cfg, self.use_cache = model.eval(), tokenizer, cfg or BeamConfig(), use_cache
        self.in_step = in_step
        self.banned = [i for i in tokenizer.all_special_ids if i != tokenizer.sep_token_id]

    def _next_logp(self, ids: Tensor, cache: KVCache | None, images: Tensor) -> Tensor:
        logits = self.model.next_token_logits(ids, self.tok.mask_token_id, cache=cache, images=images)
        return logits.float().log_softmax(-1)

    # --- beam search -----------------------------------------------------------------------------------------
    def _ban_repeats(self, logp: Tensor, ids: Tensor) -> None:
        n = self.cfg.no_repeat_ngram
        if n <= 0 or ids.shape[1] < n:
            return
        for row, seq in enumerate(ids.tolist()):
            prefix = tuple(seq[len(seq) - n + 1:])
            for j in range(len(seq) - n + 1):
                if tuple(seq[j:j + n - 1]) == prefix:
                    logp[row, seq[j + n - 1]] = -float("inf")

    def _advance(self, step: int, logp: Tensor, ids: Tensor, scores: Tensor, cache: KVCache | None,
                 finished: list[list[tuple[float, list[int]]]]) -> tuple[Tensor, Tensor, KVCache | None, bool]:
        """One beam step from the next-token log-probabilities: finished hypotheses join `finished`, the k best live
        ones continue; returns the new ids, scores and cache, and whether every image is done."""
        cfg, (b, k) = self.cfg, scores.shape
        dev = ids.device
        logp[:, self.banned] = -float("inf")
        if step < cfg.min_len:
            logp[:, self.tok.sep_token_id] = -float("inf")
        self._ban_repeats(logp, ids)
        vocab = logp.shape[1]
        cand = (scores.reshape(-1, 1) + logp).reshape(b, k * vocab)
        top, flat = cand.topk(2 * k, dim=1)  # enough candidates to keep k beams alive after finished ones leave
        next_ids, next_scores, origin = [], [], []
        for i in range(b):
            kept = 0
            for score, f in zip(top[i].tolist(), flat[i].tolist(), strict=True):
                beam, token = divmod(f, vocab)
                src = i * k + beam
                if token == self.tok.sep_token_id or step == cfg.max_len - 1:
                    if score > -float("inf"):
                        seq = ids[src, 1:].tolist() + ([] if token == self.tok.sep_token_id else [token])
                        finished[i].append((score / (step + 1) ** cfg.length_penalty, seq))
                    continue
                if kept < k:
                    next_ids.append(token)
                    next_scores.append(score)
                    origin.append(src)
                    kept += 1
            while kept < k:  # fewer than k live candidates: pad with dead beams
                next_ids.append(self.tok.pad_token_id)
                next_scores.append(-float("inf"))
                origin.append(i * k)
                kept += 1
        if all(len(f) >= k for f in finished) or step == cfg.max_len - 1:
            return ids, scores, cache, True
        origin_t = torch.tensor(origin, device=dev)
        ids = torch.cat([ids[origin_t], torch.tensor(next_ids, device=dev)[:, None]], 1)
        scores = torch.tensor(next_scores, device=dev).reshape(b, k)
        return ids, scores, cache.select(origin_t) if cache is not None else None, False

    def _all_done(self, done: bool, device: torch.device) -> bool:
        """`done`, or with `in_step` whether every rank is done."""
        if not self.in_step:
            return done
        flag = torch.tensor(int(done), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    @torch.no_grad()
    def generate(self, images: Tensor) -> list[list[int]]:
        """Token ids (without [CLS]/[SEP]) of the best caption for each image."""
        cfg, b, k = self.cfg, images.shape[0], self.cfg.beam_size
        dev = images.device
        ids = torch.full((b * k, 1), self.tok.cls_token_id, dtype=torch.long, device=dev)
        scores = torch.zeros(b, k, device=dev)
        scores[:, 1:] = -float("inf")  # all beams start identical: expand only the first
        beam_images = images.repeat_interleave(k, 0)
        cache = self.model.encode_image(images).repeat_interleave(k) if self.use_cache else None
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
        done = False
        for step in range(cfg.max_len):
            logp = self._next_logp(ids, cache, beam_images)
            if not done:
                ids, scores, cache, done = self._advance(step, logp, ids, scores, cache, finished)
            if self._all_done(done, dev):
                break
        return [max(f, key=lambda s: s[0])[1] if f else [] for f in finished]

    def captions(self, images: Tensor) -> list[str]:
        return [self.tok.decode(seq, skip_special_tokens=True).strip() for seq in self.generate(images)]


__all__ = ["BeamConfig", "CaptionDecoder"]
