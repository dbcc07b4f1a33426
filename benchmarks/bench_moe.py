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
--breakdown times every aten op of each step (forward and backward) and sums them by class, each as a
fraction of the dense twin's whole step (the classes, plus the time between ops (Python, autograd), add up to
the layer's step): the matmul column is the ratio a layer would have if nothing but its matmuls took time.
"saved" is what one forward keeps for backward, counted exactly with torch.autograd.graph.saved_tensors_hooks
(distinct storages, parameters excluded, the layer input included), the same on any machine; its ratio is to
the twin's.

    python benchmarks/bench_moe.py                 # d=768, 4096 tokens, 32 experts, top-2/4/8
    python benchmarks/bench_moe.py --quick         # smaller and faster (used by `make demo`)
    python benchmarks/bench_moe.py --breakdown     # where each layer's time goes: matmuls, gather/scatter, activation, rest
    python benchmarks/bench_moe.py --device cuda   # on a GPU in bf16 (torch._grouped_mm on sm90+): `make bench-gpu`
    python benchmarks/bench_moe.py --sweep --d 256 --dense-hidden 1024 --rounds 3 --plot docs/bench_moe_sweep.png
                                                   # cost growth over experts x tokens (fine-grained, see `sweep`)
On CUDA each step runs under bf16 autocast and is timed between device synchronisations, after at least
three warm-up rounds (page faults mean nothing there).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from mm_moe.config import FFNConfig
from mm_moe.engine import SavedForBackward, configure_compile, keep_freed_memory
from mm_moe.moe import FFNOutput, Router, build_ffn, ffn_cost


@dataclass
class Candidate:
    name: str
    module: nn.Module
    twin: str  # key of the dense layer with the same active FLOPs
    layer_kind: str
    max_load: Callable[[Tensor], float] | None = None


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


def make_candidates(d: int, experts: int, k: int, dense_hidden: int, bias: Tensor | None, peers: list[str],
                    only: tuple[str, ...] | None = None) -> tuple[dict, list]:
    """Dense twins keyed by (hidden, activation), and the MoE layers measured against them (`only`: these of ours)."""
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
        if only is not None and name not in only:
            continue
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
        cands.append(Candidate(name, layer, twin, "ours", lambda x, layer=layer: max_load(layer, x)))
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


@torch.no_grad()
def max_load(layer: nn.Module, x: Tensor) -> float:
    """The largest share of the routed assignments one expert of `layer` processes on x."""
    return layer(x, stats=True).stats.load.max().item()


OP_CLASSES = {"matmul": {"mm", "addmm", "bmm", "_grouped_mm", "grouped_mm", "grouped_mm_wgrad"},
              "gather/scatter": {"index_select", "index_add", "index_add_", "index", "gather", "scatter_add",
                                 "scatter_add_"},
              "activation": {"gelu", "gelu_backward", "silu", "silu_backward"}}


class OpTimer(TorchDispatchMode):
    """Sums the wall time of every aten op run under it, forward and backward, by class (`classes`, else "other")."""

    def __init__(self, classes: dict[str, set[str]] = OP_CLASSES) -> None:
        super().__init__()
        self.classes = classes
        self.seconds = dict.fromkeys([*classes, "other"], 0.0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        op_class = next((c for c, names in self.classes.items() if name in names), "other")
        self.seconds[op_class] += time.perf_counter() - t0
        return out


NO_KERNEL = {"view", "_unsafe_view", "as_strided", "t", "transpose", "expand", "slice", "select", "unsqueeze", "squeeze",
             "reshape", "permute", "detach", "alias", "empty", "empty_like", "empty_strided", "new_empty", "unbind",
             "split", "split_with_sizes", "lift_fresh", "resolve_conj", "resolve_neg", "contiguous", "to", "_to_copy"}
"""aten ops that only make views or allocate (no kernel of their own; a real copy inside `to` shows as copy_)."""


def launches(device: torch.device, step: Callable[..., object], *args: object) -> int:
    """Kernels one call of `step(*args)` runs. On a GPU, the CUDA kernels the profiler sees. On the CPU, the outermost ops
    that compute: aten ops (views and allocations left out), the project's custom ops, and the fused C++ kernels of
    inductor (which `enable_kernel_profile` records); what runs inside one of these is not counted again."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(*args)
        sync(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == DeviceType.CUDA)

    def counted(e) -> bool:
        if e.name.startswith("aten::"):
            return e.name[6:] not in NO_KERNEL
        return e.name.startswith("mm_moe::") or "cpp_fused" in e.name

    def inside_counted(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if counted(parent) or parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    return sum(1 for e in events if counted(e) and not inside_counted(e))


def profile_inductor_kernels() -> None:
    """Make inductor's C++ kernels visible to the profiler (for `launches`); call before compiling."""
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True


def saved_bytes(module: nn.Module, x: Tensor) -> int:
    """Bytes the layer's forward saves for backward (distinct storages, its parameters excluded, x included)."""
    with SavedForBackward(exclude=module.parameters()) as saved, \
            torch.autocast("cuda", torch.bfloat16, enabled=x.device.type == "cuda"):
        module(x)
    return saved.bytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_loss(module: nn.Module, x: Tensor, grad: Tensor) -> Tensor:
    """<module(x), grad>, plus the aux loss of a layer that returns or keeps one (ours return FFNOutput; the
    torchscale wrapper keeps it)."""
    out = module(x)
    if isinstance(out, FFNOutput):
        return (out.out * grad).sum() + out.aux_loss
    aux = getattr(module, "aux_loss", None)
    loss = (out * grad).sum()
    return loss + aux if aux is not None and aux.requires_grad else loss


def fwd_bwd(module: nn.Module, x: Tensor, grad: Tensor, timer: OpTimer | None = None) -> tuple[float, int]:
    """Seconds for one forward + backward (aux loss included when the layer has one), and its page faults;
    with a timer, every op's time is also summed into it."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    sync(x.device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    with timer or contextlib.nullcontext(), torch.autocast("cuda", torch.bfloat16, enabled=x.device.type == "cuda"):
        forward_loss(module, x, grad).backward()
    sync(x.device)
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
        steady = worst <= STEADY_FAULTS and (x.device.type != "cuda" or rounds >= 3)  # GPU: kernels tuned, caches warm
        if steady or rounds >= max_rounds:
            return rounds, worst


def run(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    random.seed(0)
    d, tokens = args.d, args.tokens
    device = torch.device(args.device)
    rows = []
    for k in args.topk:
        for routing in args.routing:
            bias = zipf_bias(args.experts, args.skew).to(device) if routing == "skewed" else None
            twins, cands = make_candidates(d, args.experts, k, args.dense_hidden, bias, args.peers)
            for m in [*twins.values(), *(c.module for c in cands)]:
                m.to(device)
            x = torch.randn(1, tokens, d, device=device, requires_grad=True)
            grad = torch.randn(1, tokens, d, device=device)
            compile_s = compile_modules([*twins.values(), *(c.module for c in cands if c.layer_kind == "ours")],
                                        x, grad, args.compile) if args.compile else {}
            warm, worst = warm_up([(c.module, twins[c.twin]) for c in cands], x, grad, args.max_warmup)
            print(f"# top-{k} {routing}: {warm} warm-up rounds, the most page faults of one step in the last: {worst}")
            samples = timed_rounds(cands, twins, x, grad, args.rounds, args.breakdown)
            twin_saved = {name: saved_bytes(twin, x) for name, twin in twins.items()}
            for c in cands:
                got = samples[c.name]
                ratios = [v["ratio"] for v in got]
                row = dict(layer=c.name, kind=c.layer_kind, k=k, routing=routing, twin=c.twin,
                           max_load=c.max_load(x) if c.max_load else float("nan"), spread=(min(ratios), max(ratios)),
                           faults=sum(v["faults"] for v in got))
                row |= {key: statistics.median(v[key] for v in got) for key in got[0] if key != "faults"}
                saved = saved_bytes(c.module, x)
                row |= dict(saved_mb=saved / 2**20, saved_ratio=saved / twin_saved[c.twin],
                            kernels=launches(device, fwd_bwd, c.module, x, grad),
                            twin_kernels=launches(device, fwd_bwd, twins[c.twin], x, grad),
                            compile_s=compile_s.get(id(c.module), float("nan")))
                rows.append(row)
            print_rows(rows[-len(cands):], header=not rows[:-len(cands)], breakdown=args.breakdown)
    return rows


def compile_modules(modules: list[nn.Module], x: Tensor, grad: Tensor, backend: str) -> dict[int, float]:
    """Compile each module in place (fullgraph) and run its first forward + backward, which compiles: seconds by
    id(module). A first call's time is the compile time (its own run is milliseconds)."""
    configure_compile()
    profile_inductor_kernels()
    seconds = {}
    for m in modules:
        m.compile(backend=backend, fullgraph=True)
        seconds[id(m)] = fwd_bwd(m, x, grad)[0]
    return seconds


def timed_rounds(cands: list[Candidate], twins: dict[str, nn.Module], x: Tensor, grad: Tensor, rounds: int,
                 breakdown: bool = False) -> dict[str, list[dict]]:
    """`measure_pair` samples of every layer, round after round in a shuffled order, each layer next to its twin,
    alternating who goes first."""
    samples: dict[str, list[dict]] = {c.name: [] for c in cands}
    for r in range(rounds):
        order = list(cands)
        random.shuffle(order)
        for c in order:
            samples[c.name].append(measure_pair(c.module, twins[c.twin], x, grad, layer_first=r % 2 == 1,
                                                breakdown=breakdown))
    return samples


def measure_pair(layer: nn.Module, twin: nn.Module, x: Tensor, grad: Tensor, layer_first: bool, breakdown: bool) -> dict:
    """One forward + backward of a layer and of its dense twin, back to back: their seconds, the ratio, the page
    faults of both; with breakdown, each op class's seconds in the layer, the layer's time between ops, and the
    twin's matmul seconds, each as a fraction of the twin's whole step."""
    timers = (OpTimer(), OpTimer()) if breakdown else (None, None)
    if layer_first:
        (t_layer, f_layer), (t_twin, f_twin) = fwd_bwd(layer, x, grad, timers[0]), fwd_bwd(twin, x, grad, timers[1])
    else:
        (t_twin, f_twin), (t_layer, f_layer) = fwd_bwd(twin, x, grad, timers[1]), fwd_bwd(layer, x, grad, timers[0])
    sample = dict(moe_ms=1e3 * t_layer, dense_ms=1e3 * t_twin, ratio=t_layer / t_twin, faults=f_layer + f_twin)
    if breakdown:
        sample |= {f"part {c}": sec / t_twin for c, sec in timers[0].seconds.items()}
        sample["part between ops"] = (t_layer - sum(timers[0].seconds.values())) / t_twin
        sample["twin matmul"] = timers[1].seconds["matmul"] / t_twin
    return sample


def print_rows(rows: list[dict], header: bool, breakdown: bool = False) -> None:
    parts = [*OP_CLASSES, "other", "between ops"]
    if header:
        cols = ["layer", "top-k", "routing", "max expert load", "layer ms", "dense twin", "twin ms", "ratio", "ratio min-max",
                "saved MB", "saved ratio", "kernels", "twin kernels", "compile s"]
        cols += [*parts, "twin's matmul"] if breakdown else ["page faults"]
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
    for r in rows:
        load = "" if math.isnan(r["max_load"]) else f"{r['max_load']:.1%}"
        cells = [r["layer"], r["k"], r["routing"], load, f"{r['moe_ms']:.1f}", r["twin"], f"{r['dense_ms']:.1f}",
                 f"{r['ratio']:.2f}x", f"{r['spread'][0]:.2f}-{r['spread'][1]:.2f}", f"{r['saved_mb']:.0f}",
                 f"{r['saved_ratio']:.2f}x", r["kernels"], r["twin_kernels"],
                 "" if math.isnan(r["compile_s"]) else f"{r['compile_s']:.0f}"]
        cells += [*(f"{r[f'part {c}']:.2f}" for c in parts), f"{r['twin matmul']:.2f}"] if breakdown else [r["faults"]]
        print("| " + " | ".join(map(str, cells)) + " |", flush=True)


SWEEP_EXPERTS, SWEEP_TOKENS, SWEEP_LAYERS = (8, 32, 128, 256), (1024, 4096, 16384), ("smoe", "mhmoe h=4")


def sweep(args: argparse.Namespace) -> list[dict]:
    """Cost growth with experts and tokens, fine-grained (DeepSeekMoE): E experts of dense_hidden * 4 / E units,
    top-E/4, so total expert parameters (4x the twin's) and active FLOPs (the twin's) stay fixed while experts
    shrink; balanced routing. Time and saved-bytes ratios to the dense twin, ours and HF's Mixtral block."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    rows = []
    print("| layer | experts | top-k | expert hidden | tokens | layer ms | twin ms | time ratio | saved ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for experts in args.sweep_experts:
        k = max(1, experts // 4)
        twins, cands = make_candidates(args.d, experts, k, args.dense_hidden, None,
                                       [p for p in args.peers if p != "torchscale"], only=SWEEP_LAYERS)
        for m in [*twins.values(), *(c.module for c in cands)]:
            m.to(device)
        for tokens in args.sweep_tokens:
            x = torch.randn(1, tokens, args.d, device=device, requires_grad=True)
            grad = torch.randn(1, tokens, args.d, device=device)
            warm_up([(c.module, twins[c.twin]) for c in cands], x, grad, args.max_warmup)
            samples = timed_rounds(cands, twins, x, grad, args.rounds)
            twin_saved = {name: saved_bytes(twin, x) for name, twin in twins.items()}
            for c in cands:
                got = samples[c.name]
                hidden = getattr(getattr(c.module, "experts", None), "d_hidden", args.dense_hidden // k)
                row = dict(layer=c.name, experts=experts, k=k, hidden=hidden, tokens=tokens,
                           moe_ms=statistics.median(v["moe_ms"] for v in got),
                           dense_ms=statistics.median(v["dense_ms"] for v in got),
                           ratio=statistics.median(v["ratio"] for v in got),
                           saved_ratio=saved_bytes(c.module, x) / twin_saved[c.twin])
                rows.append(row)
                print(f"| {c.name} | {experts} | {k} | {hidden} | {tokens} | {row['moe_ms']:.1f} | {row['dense_ms']:.1f} | "
                      f"{row['ratio']:.2f}x | {row['saved_ratio']:.2f}x |", flush=True)
    if args.plot:
        plot_sweep(rows, args.plot)
    return rows


def plot_sweep(rows: list[dict], path: str) -> None:
    """Time and saved-bytes ratios against the number of experts, a line per (layer, tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (key, title), ax in zip((("ratio", "time / dense twin"), ("saved_ratio", "saved for backward / dense twin")),
                                axes, strict=True):
        for color, layer in enumerate(dict.fromkeys(r["layer"] for r in rows)):
            for style, tokens in zip(("-", "--", ":", "-."), dict.fromkeys(r["tokens"] for r in rows), strict=False):
                pts = [r for r in rows if r["layer"] == layer and r["tokens"] == tokens]
                ax.plot([r["experts"] for r in pts], [r[key] for r in pts], f"C{color}{style}", marker="o",
                        label=f"{layer}, {tokens} tokens")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts E (top-E/4, E x hidden fixed)")
        ax.set_title(title)
        ax.axhline(1.0, color="gray", lw=0.5)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"# plot: {path}")


def where(device: str) -> str:
    if device.startswith("cuda"):
        return f"bf16 autocast (fp32 weights, as training) on {torch.cuda.get_device_name(torch.device(device))}"
    return f"fp32, {torch.get_num_threads()} threads"


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
    p.add_argument("--breakdown", action="store_true",
                   help="time every op and split each layer's step into matmul, gather/scatter, activation and the rest")
    p.add_argument("--glibc-default", action="store_true", help="leave glibc returning freed blocks over 32 MB to the OS")
    p.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 autocast)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, choices=["inductor", "aot_eager"],
                   help="torch.compile our layers and the dense twins (fullgraph; default backend inductor); the peers "
                        "stay eager; the first call's seconds (the compile time) get their own column")
    p.add_argument("--sweep", action="store_true", help="cost growth with experts and tokens (SMoE, MH-MoE h=4, HF)")
    p.add_argument("--sweep-experts", type=int, nargs="+", default=list(SWEEP_EXPERTS))
    p.add_argument("--sweep-tokens", type=int, nargs="+", default=list(SWEEP_TOKENS))
    p.add_argument("--plot", default=None, help="with --sweep: write the ratios as a PNG here")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.topk, args.rounds = 1024, [2, 4], 3
    allocator = "glibc default" if args.glibc_default or not keep_freed_memory() else "freed memory kept"
    if allocator == "glibc default":
        args.max_warmup = 1
    what = "; op time by class as a fraction of the twin's step" if args.breakdown else ""
    shape = "sweep over experts and tokens" if args.sweep else f"tokens={args.tokens}, experts={args.experts}"
    compiled = f"compiled ({args.compile}, ours and twins)" if args.compile else "eager"
    print(f"# MoE layer fwd+bwd vs dense FFN of equal active FLOPs{what}: d={args.d}, {shape}, {compiled}, "
          f"{where(args.device)}, torch {torch.__version__}, {allocator}")
    sweep(args) if args.sweep else run(args)


if __name__ == "__main__":
    main()
