"""Two processes on CPU (gloo): DDP and FSDP2 match single-process training; expert parallelism matches local experts."""

from __future__ import annotations

import socket

import dist_workers
import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("moe,mode", [(False, "ddp"), (True, "ddp"), (False, "fsdp2")])
def test_data_parallel_equals_single_process_on_the_global_batch(tmp_path, moe, mode):
    mp.spawn(dist_workers.ddp_matches_single, args=(2, free_port(), moe, mode, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)
    torch.set_num_threads(1)
    model = dist_workers.tiny_vqa(moe)
    images, ids, targets = dist_workers.global_batch()
    # the mean loss over the two halves is the loss of the whole batch (equal halves, per-element mean)
    losses = torch.stack(dist_workers.train_steps(model, images, ids, targets))
    torch.testing.assert_close(got["losses"], losses, atol=1e-6, rtol=1e-5)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(got["state"][name], value, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_expert_parallel_matches_local_experts(tmp_path):
    mp.spawn(dist_workers.expert_parallel_matches_local, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        errs = torch.load(tmp_path / f"ep{rank}.pt", weights_only=True)
        for key, err in errs.items():
            assert err < 1e-5, (rank, key, float(err))


@pytest.mark.slow
def test_gradient_accumulation_syncs_once_per_step_and_matches_one_process(tmp_path):
    """Through the Trainer under DDP (2 gloo processes): with 2 micro-steps per step gradients are all-reduced
    as often as with 1 (no_sync on the first), and the weights equal a single process's on the global batch."""
    mp.spawn(dist_workers.accumulation_syncs_once_per_step, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    one, two = (torch.load(tmp_path / f"accum{a}.pt", weights_only=True) for a in (1, 2))
    assert one["calls"] > 0 and two["calls"] == one["calls"]
    torch.set_num_threads(1)
    single = dist_workers.accumulation_run(str(tmp_path / "single"), 2, 1, 0).fit()
    for name, value in single.state_dict().items():
        torch.testing.assert_close(two["state"][name], value, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
