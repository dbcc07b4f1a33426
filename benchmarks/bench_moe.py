"""MoE layer cost as a ratio to a dense FFN with the same active FLOPs (forward + backward).

Every layer is timed right next to its dense twin (alternating which runs first), round after round in
one run; the table shows median times and the median of the paired ratios. Routing is either balanced
(random router) or skewed (a fixed Zipf-like
logit bias, so a few experts get most tokens). Peers: HF transformers' Mixtral sparse block, in each of
its experts implementations (grouped_mm by default, see --peers), against the same dense SwiGLU twin; and
at top-2, torchscale's X-MoE layer (the BEiT-3 authors' MOELayer + Top2Gate, GShard capacity einsum
dispatch, capacity 2T/E as in their training) against the dense GELU twin.
Like training (`init_distributed`), the run keeps freed memory for reuse (`keep_freed_memory`);
--glibc-default measures with glibc's defaults, where every step page-faults the MoE layers' big tensors in.
Timing starts at steady state: whole interleaved rounds run untimed until no step takes over 256 page
faults (many differently sized layers in one process fragment the heap, so it keeps growing for a few
rounds, and a step that first-touches 100-200 MB of new heap costs 0.1-0.6 s of kernel time); the table
counts the page faults of the timed steps. (With --glibc-default every step faults: one warm-up round.)

    python benchmarks/bench_moe.py                 # d=768, 4096 tokens, 32 experts, top-2/4/8
    python benchmarks/bench_moe.py --quick         # smaller and faster (used by `make demo`)
    python benchmarks/bench_moe.py --matmul        # only: grouped_mm rate over each layer's expert blocks vs dense mm
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from mm_moe.config import FFNConfig
from mm_moe.engine.distributed import keep_freed_memory
from mm_moe.moe import build_ffn, ffn_cost
from mm_moe.moe.routing import Router


@dataclass
class Candidate:
    name: str
    module: nn.Module
    twin: str  # key of the dense layer with the same active FLOPs
    layer_kind: str
    max_load: Callable[[], float] | None = None


def zipf_bias(num_experts: int, strength: float) -> Tensor:
    """Per-expert logit bias strength * log(1 / (e + 1)): expert 0 favoured, then 1, ..."""
    return -strength * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float32))


def skew_router(router: Router, bias: Tensor) -> None:
    """Make this router's logits skewed by adding a fixed bias (benchmark-only patch of the instance)."""
    score = router.score
    router.score = lambda x: score(x) + bias  # type: ignore[method-assign]


def hf_mixtral_block(d: int, hidden: int, experts: int, k: int, impl: str, bias: Tensor | None) -> nn.Module:
    """HF transformers' MixtralSparseMoeBlock with the given experts implementation."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d, intermediate_size=hidden, num_local_experts=experts, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        nn.init.uniform_(p, -1 / math.sqrt(p.shape[-1]), 1 / math.sqrt(p.shape[-1]))
    if bias is not None:
        gate = block.gate

        def forward(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # MixtralTopKRouter.forward plus the bias
            logits = nn.functional.linear(h.reshape(-1, d), gate.weight) + bias
            probs = logits.float().softmax(-1)
            top, idx = probs.topk(gate.top_k, dim=-1)
            return logits, top / top.sum(-1, keepdim=True), idx

        gate.forward = forward  # type: ignore[method-assign]
    return block


class TorchscaleXMoE(nn.Module):
    """torchscale's X-MoE layer (MOELayer, Top2Gate with use_xmoe, E FeedForwardNetwork experts), returning a tensor."""

    def __init__(self, d: int, hidden: int, experts: int, bias: Tensor | None) -> None:
        super().__init__()
        import torch.distributed as dist
        from torchscale.component.feedforward_network import FeedForwardNetwork
        from torchscale.component.xmoe.moe_layer import MOELayer
        from torchscale.component.xmoe.routing import Top2Gate

        if not dist.is_initialized():  # MOELayer asks for its expert and all-to-all groups
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        gate = Top2Gate(d, experts, use_fp32=True, second_expert_policy="all", use_xmoe=True)
        if bias is not None:
            make_finite = gate._make_finite  # the X-MoE logits pass through here: add the skew
            gate._make_finite = lambda scores: make_finite(scores) + bias  # type: ignore[method-assign]
        ffns = nn.ModuleList(FeedForwardNetwork(d, hidden, "gelu", 0.0, 0.0, 1e-5, False) for _ in range(experts))
        self.layer = MOELayer(gate, ffns, SimpleNamespace(moe_expert_count=experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        histc = torch.histc  # top2gating logs a histogram of Long expert ids, which only CUDA's histc takes
        torch.histc = lambda t, *args, **kwargs: histc(t.float(), *args, **kwargs)
        try:
            y, self.aux_loss = self.layer(x)
        finally:
            torch.histc = histc
        return y


def make_candidates(d: int, experts: int, k: int, dense_hidden: int, bias: Tensor | None, peers: list[str]) -> tuple[dict, list]:
    """Dense twins keyed by (hidden, activation), and the MoE layers measured against them."""
    layers = {
        "smoe": FFNConfig(kind="smoe", hidden=dense_hidden // k, num_experts=experts, top_k=k, bias=False),
        "smoe-swiglu": FFNConfig(kind="smoe", hidden=dense_hidden // k, num_experts=experts, top_k=k,
                                 activation="swiglu", bias=False, renormalize=True),
        "xmoe": FFNConfig(kind="xmoe", hidden=dense_hidden // k, num_experts=experts, top_k=k, bias=False),
        **{f"mhmoe h={h}": FFNConfig(kind="mhmoe", heads=h, hidden=(dense_hidden - d) // k, num_experts=experts, top_k=k,
                                     bias=False) for h in (2, 4)},
        "cartesian": FFNConfig(kind="cartesian", num_experts=experts, top_k=k, num_shared_experts=1, activation="swiglu",
                               hidden=16 * round(dense_hidden / (2 * (k + 1)) / 16), bias=False, renormalize=True),
    }
    twins: dict[str, nn.Module] = {}
    cands: list[Candidate] = []
    for name, cfg in layers.items():
        cost = ffn_cost(cfg, d)
        n_mats = 3 if cfg.activation == "swiglu" else 2
        twin_hidden = cost.core_flops // (2 * n_mats * d)
        twin = f"dense {cfg.activation} {twin_hidden}"
        twins.setdefault(twin, build_ffn(FFNConfig(kind="dense", hidden=twin_hidden, activation=cfg.activation, bias=False), d))
        layer = build_ffn(cfg, d)
        if bias is not None:
            for m in layer.modules():
                if isinstance(m, Router):
                    skew_router(m, bias)
        cands.append(Candidate(name, layer, twin, "ours", lambda layer=layer: layer.last_stats.load.max().item()))
    hf_impls = [p for p in peers if p != "torchscale"]
    if hf_impls:
        twin = f"dense swiglu {dense_hidden}"
        twins.setdefault(twin, build_ffn(FFNConfig(kind="dense", hidden=dense_hidden, activation="swiglu", bias=False), d))
        for impl in hf_impls:
            try:
                block = hf_mixtral_block(d, dense_hidden // k, experts, k, impl, bias)
            except (ImportError, KeyError, ValueError) as err:
                print(f"peer HF Mixtral {impl} unavailable: {err}")
                continue
            cands.append(Candidate(f"HF Mixtral {impl}", block, twin, "peer"))
    if "torchscale" in peers and k == 2:
        try:
            block = TorchscaleXMoE(d, dense_hidden // k, experts, bias)
        except ImportError as err:
            print(f"peer torchscale X-MoE unavailable: {err}")
        else:
            cands.append(Candidate("torchscale X-MoE", block, f"dense gelu {dense_hidden}", "peer"))
    return twins, cands


def fwd_bwd(module: nn.Module, x: Tensor, grad: Tensor) -> tuple[float, int]:
    """Seconds for one forward + backward (aux loss included when the layer has one), and its page faults."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    y = module(x)
    loss = (y * grad).sum()
    aux = getattr(module, "aux_loss", None)
    if aux is not None and aux.requires_grad:
        loss = loss + aux
    loss.backward()
    seconds = time.perf_counter() - t0
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


STEADY_FAULTS = 256  # page faults (1 MiB of new memory) a step may take and still count as steady state


def warm_up(pairs: list[tuple[nn.Module, nn.Module]], x: Tensor, grad: Tensor, max_rounds: int) -> tuple[int, int]:
    """Run whole rounds of every (layer, twin) pair untimed until no step takes over STEADY_FAULTS page faults
    (at most max_rounds). Returns (rounds run, the most page faults of one step in the last round)."""
    rounds = 0
    while True:
        rounds += 1
        worst = max(fwd_bwd(m, x, grad)[1] for pair in pairs for m in pair)
        if worst <= STEADY_FAULTS or rounds >= max_rounds:
            return rounds, worst


def run(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    random.seed(0)
    d, tokens = args.d, args.tokens
    rows = []
    for k in args.topk:
        for routing in args.routing:
            bias = zipf_bias(args.experts, args.skew) if routing == "skewed" else None
            twins, cands = make_candidates(d, args.experts, k, args.dense_hidden, bias, args.peers)
            x = torch.randn(1, tokens, d, requires_grad=True)
            grad = torch.randn(1, tokens, d)
            warm, worst = warm_up([(c.module, twins[c.twin]) for c in cands], x, grad, args.max_warmup)
            print(f"# top-{k} {routing}: {warm} warm-up rounds, the most page faults of one step in the last: {worst}")
            times = {c.name: ([], [], []) for c in cands}  # layer seconds, twin seconds, paired ratios
            timed_faults = dict.fromkeys(times, 0)
            for r in range(args.rounds):
                order = list(cands)
                random.shuffle(order)
                for c in order:  # each layer next to its twin, alternating who goes first
                    pair = (c.module, twins[c.twin]) if r % 2 else (twins[c.twin], c.module)
                    (t_first, f_first), (t_second, f_second) = (fwd_bwd(m, x, grad) for m in pair)
                    t_layer, t_twin = (t_first, t_second) if r % 2 else (t_second, t_first)
                    timed_faults[c.name] += f_first + f_second
                    for bucket, value in zip(times[c.name], (t_layer, t_twin, t_layer / t_twin), strict=True):
                        bucket.append(value)
            for c in cands:
                t_layer, t_twin, ratios = (statistics.median(v) for v in times[c.name])
                rows.append(dict(layer=c.name, kind=c.layer_kind, k=k, routing=routing, moe_ms=1e3 * t_layer,
                                 dense_ms=1e3 * t_twin, twin=c.twin, ratio=ratios,
                                 spread=(min(times[c.name][2]), max(times[c.name][2])), faults=timed_faults[c.name],
                                 max_load=c.max_load() if c.max_load else float("nan")))
            print_rows(rows[-len(cands):], header=not rows[:-len(cands)])
    return rows


def matmul_rates(args: argparse.Namespace) -> None:
    """GFLOP/s of torch._grouped_mm over each layer's expert blocks (balanced) next to one dense mm of the dense FFN."""
    d, t, e = args.d, args.tokens, args.experts
    dense_a, dense_w = torch.randn(t, d), torch.randn(d, args.dense_hidden)
    print("| expert blocks | top-k | rows per expert x in x out | grouped GFLOP/s | dense mm GFLOP/s | ratio |")
    print("|---|---|---|---|---|---|")
    for k in args.topk:
        shapes = {"smoe": (t * k // e, d, args.dense_hidden // k),
                  "mhmoe h=4": (4 * t * k // e, d // 4, (args.dense_hidden - d) // k),
                  "cartesian": (t * k // e, d, 16 * round(args.dense_hidden / (2 * (k + 1)) / 16))}
        for name, (m, i, o) in shapes.items():
            a, w = torch.randn(e * m, i), torch.randn(e, i, o)
            offs = torch.arange(1, e + 1, dtype=torch.int32) * m
            pair = (partial(torch._grouped_mm, a, w, offs=offs), partial(torch.mm, dense_a, dense_w))
            secs: tuple[list[float], list[float]] = ([], [])
            for r in range(args.rounds + 1):  # round 0 warms up
                for j in (0, 1) if r % 2 else (1, 0):
                    t0 = time.perf_counter()
                    pair[j]()
                    secs[j].append(time.perf_counter() - t0)
            grouped = 2 * e * m * i * o / statistics.median(secs[0][1:]) / 1e9
            dense = 2 * t * d * args.dense_hidden / statistics.median(secs[1][1:]) / 1e9
            print(f"| {name} | {k} | {m} x {i} x {o} | {grouped:.0f} | {dense:.0f} | {grouped / dense:.2f} |", flush=True)


def print_rows(rows: list[dict], header: bool) -> None:
    if header:
        print("| layer | top-k | routing | max expert load | layer ms | dense twin | twin ms | ratio | ratio min-max "
              "| page faults |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        load = "" if math.isnan(r["max_load"]) else f"{r['max_load']:.1%}"
        print(f"| {r['layer']} | {r['k']} | {r['routing']} | {load} | {r['moe_ms']:.1f} | {r['twin']} | "
              f"{r['dense_ms']:.1f} | {r['ratio']:.2f}x | {r['spread'][0]:.2f}-{r['spread'][1]:.2f} | {r['faults']} |",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--dense-hidden", type=int, default=3072, help="inner size of the dense FFN whose FLOPs the layers match")
    p.add_argument("--routing", nargs="+", default=["balanced", "skewed"], choices=["balanced", "skewed"])
    p.add_argument("--skew", type=float, default=1.5, help="strength of the Zipf logit bias for skewed routing")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--max-warmup", type=int, default=6, help="most untimed rounds run to reach steady state")
    p.add_argument("--peers", nargs="*", default=["grouped_mm", "torchscale"],
                   choices=["eager", "grouped_mm", "batched_mm", "torchscale"],
                   help="HF Mixtral experts implementations to time (eager: ~30x dense, slow to run; batched_mm copies "
                        "a weight per token: ~19 GB at 1024 tokens), and torchscale's X-MoE layer (top-2 only)")
    p.add_argument("--quick", action="store_true", help="1024 tokens, top-2 and 4, 3 rounds")
    p.add_argument("--matmul", action="store_true", help="only the matmul rate of each layer's expert blocks vs one dense mm")
    p.add_argument("--glibc-default", action="store_true", help="leave glibc returning freed blocks over 32 MB to the OS")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.topk, args.rounds = 1024, [2, 4], 3
    allocator = "glibc default" if args.glibc_default or not keep_freed_memory() else "freed memory kept"
    if allocator == "glibc default":
        args.max_warmup = 1
    what = "grouped_mm over expert blocks vs one dense mm" if args.matmul else \
        "MoE layer fwd+bwd vs dense FFN of equal active FLOPs"
    print(f"# {what}: d={args.d}, tokens={args.tokens}, "
          f"experts={args.experts}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, {allocator}")
    if args.matmul:
        matmul_rates(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
