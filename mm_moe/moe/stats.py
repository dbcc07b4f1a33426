"""Routing statistics of one MoE layer: per-expert load, activation ratio, entropy, dropped fraction.

Stats are kept as detached tensors on the layer's device (no host sync in the forward pass);
the float properties read them when someone asks. Padding tokens never count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mm_moe.moe.experts import count_ids
from mm_moe.moe.routing import RouterOutput

ACTIVE_SHARE = 0.1
"""An expert is activated when it is selected for more than this fraction of its uniform share k / E."""


@dataclass
class RoutingStats:
    """Counts over G routed groups of E experts (G = 2 for CartesianMoE's groups A and B, else 1)."""

    counts: Tensor  # Long[G, E]; (sub-)token assignments each expert processed
    num_tokens: Tensor  # Long scalar; valid (sub-)tokens routed by each group
    top_k: int
    num_dropped: Tensor  # Long scalar; assignments dropped over capacity, all groups
    entropy_sum: Tensor  # f32 scalar; sum over valid tokens and groups of the router's softmax entropy (nats)
    pair_counts: Tensor | None = None  # Long[E_A, E_B]; CartesianMoE (A_i, B_j) pair usage

    @classmethod
    def from_router(cls, out: RouterOutput) -> RoutingStats:
        """Statistics of one routing decision."""
        idx = out.expert_idx.detach()
        probs = out.probs.detach()
        entropy = -torch.xlogy(probs, probs).sum(-1)  # [T]
        return cls(
            counts=out.counts[None],  # [1, E]
            num_tokens=out.valid.sum(),
            top_k=idx.shape[1],
            num_dropped=((idx < 0) & out.valid[:, None]).sum(),
            entropy_sum=(entropy * out.valid).sum(),
        )

    @classmethod
    def cartesian(cls, a: RouterOutput, b: RouterOutput) -> RoutingStats:
        """Stats of CartesianMoE's two groups, with the usage matrix of (A_i, B_j) pairs."""
        sa, sb = cls.from_router(a), cls.from_router(b)
        ea, eb = a.probs.shape[-1], b.probs.shape[-1]
        ia, ib = a.expert_idx.detach(), b.expert_idx.detach()
        both = (ia[:, :, None] >= 0) & (ib[:, None, :] >= 0)  # [T, kA, kB]
        pair = ia[:, :, None] * eb + ib[:, None, :]
        return cls(
            counts=torch.cat([sa.counts, sb.counts]),
            num_tokens=sa.num_tokens,
            top_k=sa.top_k,
            num_dropped=sa.num_dropped + sb.num_dropped,
            entropy_sum=sa.entropy_sum + sb.entropy_sum,
            pair_counts=count_ids(pair, ea * eb, both).reshape(ea, eb),
        )

    def merge(self, other: RoutingStats) -> RoutingStats:
        """Accumulate stats of the same layer over several batches."""
        pair = None if self.pair_counts is None else self.pair_counts + other.pair_counts
        return RoutingStats(
            self.counts + other.counts,
            self.num_tokens + other.num_tokens,
            self.top_k,
            self.num_dropped + other.num_dropped,
            self.entropy_sum + other.entropy_sum,
            pair,
        )

    @property
    def num_groups(self) -> int:
        return self.counts.shape[0]

    @property
    def load(self) -> Tensor:
        """f32[G, E]: each expert's share of its group's processed assignments."""
        c = self.counts.float()
        return c / c.sum(-1, keepdim=True).clamp_min(1)

    @property
    def selection_frequency(self) -> Tensor:
        """f32[G, E]: how often each expert is selected per routed (sub-)token (sums to top_k minus drops)."""
        return self.counts.float() / self.num_tokens.clamp_min(1)

    def activation_ratio(self, share: float = ACTIVE_SHARE, threshold: float | None = None) -> float:
        """This layer's expert activation ratio (see `activation_ratio`)."""
        return activation_ratio([self], share, threshold)

    @property
    def dropped_fraction(self) -> float:
        """Share of valid (token, choice) assignments dropped over capacity."""
        total = self.num_tokens * self.top_k * self.num_groups
        return (self.num_dropped / total.clamp_min(1)).item()

    @property
    def mean_entropy(self) -> float:
        """Mean entropy (nats) of the router's softmax per valid token; log(E) is uniform."""
        return (self.entropy_sum / (self.num_tokens * self.num_groups).clamp_min(1)).item()

    @property
    def load_entropy(self) -> float:
        """Entropy of the expert load over log(E), averaged over groups: 1.0 is a uniform load, 0 one expert."""
        load = self.load
        return (-(load * load.clamp_min(1e-30).log()).sum(-1) / math.log(load.shape[-1])).mean().item()

    @property
    def imbalance(self) -> float:
        """Max over groups of (largest expert load / mean load); 1.0 is perfectly balanced."""
        load = self.load
        return (load.max(-1).values * load.shape[-1]).max().item()


def activation_ratio(layers: list[RoutingStats], share: float = ACTIVE_SHARE, threshold: float | None = None) -> float:
    """Fraction of all (layer, group, expert) cells counted as activated: the MH-MoE paper's expert activation
    ratio (its Figure 1 heatmap over layers x experts), defined scale-free.

    A cell is activated when its selection frequency (selections / routed (sub-)tokens) exceeds `share` x k / E,
    a fraction of what every expert gets under uniform routing: so uniform routing reads 100% at any E and k, and
    SMoE (E=8, k=1) and MH-MoE (E=80, k=2) are held to the same relative bar. The paper leaves its threshold
    unstated ("< 1"); `threshold` (e.g. 0.01, an absolute frequency) gives that older, scale-dependent reading.
    """
    active = []
    for s in layers:
        freq = s.selection_frequency  # [G, E]
        bar = threshold if threshold is not None else share * s.top_k / freq.shape[-1]
        active.append((freq > bar).flatten())
    return torch.cat(active).float().mean().item()


def activation_by_modality(stats: dict[str, RoutingStats], share: float = ACTIVE_SHARE) -> dict[str, float]:
    """Activation ratio over the vision-branch and the language-branch MoE layers (names ending in ".v" / ".l",
    as the Multiway encoder reports them); a branch without MoE layers is left out."""
    out = {}
    for modality, suffix in (("vision", ".v"), ("language", ".l")):
        layers = [s for name, s in stats.items() if name.endswith(suffix)]
        if layers:
            out[modality] = activation_ratio(layers, share)
    return out


def merge_stats(total: dict[str, RoutingStats], new: dict[str, RoutingStats]) -> dict[str, RoutingStats]:
    """Per-layer stats of one more batch (`new`, as models return them) added into a running `total`."""
    return {k: total[k].merge(s) if k in total else s for k, s in new.items()}


def mean_imbalance(stats: dict[str, RoutingStats]) -> float:
    """Mean over MoE layers of max expert load / mean load (1.0 = balanced); nan without MoE layers."""
    return sum(s.imbalance for s in stats.values()) / len(stats) if stats else float("nan")


__all__ = ["RoutingStats", "ACTIVE_SHARE", "activation_ratio", "activation_by_modality", "merge_stats", "mean_imbalance"]
