"""Worker functions for the 2-process (gloo, CPU) tests; spawned by tests/test_distributed.py."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mm_moe.config import BEiT3Config, FFNConfig, OptimConfig, RunConfig, TrainConfig
from mm_moe.engine import DistInfo, Task, Trainer
from mm_moe.model import BEiT3ForVQA
from mm_moe.moe import GroupedExperts, build_ffn, shard_experts, update_routers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable[[int, int, str], None], world: int, out_dir: str) -> None:
    """Run `worker(rank, world, out_dir)` in `world` gloo processes; each leaves its process group before exiting
    (a gloo group still alive at interpreter exit aborts the process now and then: SIGABRT, seen in CI)."""
    mp.spawn(_in_group, args=(worker, world, free_port(), out_dir), nprocs=world, join=True)


def _in_group(rank: int, worker: Callable[[int, int, str], None], world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, out_dir)
    finally:
        dist.destroy_process_group()


def tiny_vqa(moe: bool) -> BEiT3ForVQA:
    torch.manual_seed(0)
    cfg = BEiT3Config(img_size=16, patch_size=8, vocab_size=50, max_text_len=8, d_model=32, depth=2, heads=4,
                      ffn=FFNConfig(kind="dense", hidden=64, subln=True),
                      moe=FFNConfig(kind="smoe", hidden=32, num_experts=4, top_k=2, balance_coef=0.0) if moe else None,
                      moe_layers="all" if moe else "none")
    return BEiT3ForVQA(cfg, 5)


def global_batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(8, 3, 16, 16, generator=g), torch.randint(1, 50, (8, 6), generator=g),
            torch.rand(8, 5, generator=g))


def expert_parallel_matches_local(rank: int, world: int, out_dir: str) -> None:
    """The expert-parallel layer gives the local layer's outputs and gradients."""
    torch.manual_seed(0)
    full = GroupedExperts(4, 16, 8, "swiglu", bias=True, subln=True)
    torch.manual_seed(10 + rank)  # each rank has its own tokens and routing
    x = torch.randn(12, 16, requires_grad=True)
    idx = torch.randint(0, 4, (12, 2))
    idx[0, 1] = -1  # a skipped assignment
    w = torch.rand(12, 2, requires_grad=True)  # combine weights: their gradient crosses the all-to-all
    grad = torch.randn(12, 16)

    ref = full(x, idx, w)
    (ref * grad).sum().backward()
    ref_x_grad, ref_w_grad = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref_param_grads = {n: p.grad.clone() for n, p in full.named_parameters()}
    for g in ref_param_grads.values():
        dist.all_reduce(g)  # an expert's gradient collects every rank's tokens

    holder = torch.nn.Module()
    holder.experts = full
    shard_experts(holder)
    ep = holder.experts
    out = ep(x, idx, w)
    (out * grad).sum().backward()
    e_local = 4 // world
    local_grads = {n: p.grad for n, p in ep.named_parameters()}
    torch.save({"out_err": (out - ref).abs().max(), "x_grad_err": (x.grad - ref_x_grad).abs().max(),
                "w_grad_err": (w.grad - ref_w_grad).abs().max(),
                "param_grad_err": max((local_grads[n] - g[rank * e_local:(rank + 1) * e_local]).abs().max()
                                      for n, g in ref_param_grads.items())}, f"{out_dir}/ep{rank}.pt")


def accumulation_run(run_dir: str, grad_accum: int, world: int, rank: int) -> Trainer:
    """A Trainer over tiny VQA batches: 2 steps of `grad_accum` micro-batches; this rank's slice of each global
    micro-batch of 8 / grad_accum rows."""
    cfg = RunConfig(train=TrainConfig(steps=2, batch_size=8 // grad_accum // world, grad_accum=grad_accum, log_every=1,
                                      ckpt_every=100, distributed="ddp", precision="fp32"),
                    # eps 1e-3: Adam's m / sqrt(v) on a near-zero gradient would turn the summation-order rounding
                    # of 2 ranks vs 1 process into a full-size update; with eps it stays proportional to the gradient
                    optim=OptimConfig(lr=1e-2, eps=1e-3, warmup_steps=1), run_dir=run_dir)
    images, ids, targets = global_batch()
    per = 8 // grad_accum
    batches = []
    for m in range(2 * grad_accum):  # the same 8 rows every step, cut into micro-batches, then into ranks
        rows = slice((m % grad_accum) * per + rank * (per // world), (m % grad_accum) * per + (rank + 1) * (per // world))
        batches.append({"images": images[rows], "text_ids": ids[rows], "targets": targets[rows]})
    task = Task(tiny_vqa(moe=True), lambda epoch: batches,
                lambda model, b, stats=False: model(b["images"], b["text_ids"], None, b["targets"], stats=stats), lambda b: 0)
    return Trainer(task, cfg, DistInfo(rank, world))


def accumulation_syncs_once_per_step(rank: int, world: int, out_dir: str) -> None:
    """DDP through the Trainer: count gradient all-reduces with grad_accum 1 and 2; save the weights."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = {}
    for accum in (1, 2):
        trainer = accumulation_run(f"{out_dir}/accum{accum}", accum, world, rank)
        calls[accum] = 0

        def counting(state, bucket, accum=accum):
            calls[accum] += 1
            return allreduce_hook(state, bucket)

        trainer.model.register_comm_hook(dist.group.WORLD, counting)
        model = trainer.fit()
        if rank == 0:
            torch.save({"state": model.state_dict(), "calls": calls[accum]}, f"{out_dir}/accum{accum}.pt")


def balancing_on_two_ranks(rank: int, world: int, out_dir: str) -> None:
    """One training forward of a global-balance, bias-balanced MoE layer on this rank's half of a batch, the
    aux-loss gradients averaged as DDP does, then the router update; saves what one process must reproduce."""
    layer = balancing_layer()
    x = balancing_batch()
    half = x.shape[0] // world
    aux = layer(x[rank * half:(rank + 1) * half]).aux_loss
    aux.backward()
    aux = aux.detach().clone()
    dist.all_reduce(aux)
    grads = {}
    for name, p in layer.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            grads[name] = p.grad / world
    update_routers(layer)
    torch.save({"aux": aux / world, "grads": grads, "bias": layer.router.expert_bias.clone()},
               f"{out_dir}/balancing{rank}.pt")


def balancing_layer() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = FFNConfig(kind="smoe", hidden=8, num_experts=4, top_k=2, global_balance=True, bias_update_rate=0.1)
    return build_ffn(cfg, 6).train()


def balancing_batch() -> torch.Tensor:
    return torch.randn(12, 6, generator=torch.Generator().manual_seed(1))
