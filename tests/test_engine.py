"""Optimizer groups and schedule, atomic checkpoints, NaN stop, and exact resume of a killed run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import TINY_MODEL, monomodal_shards

from mm_moe.config import BEiT3Config, OptimConfig, RunConfig, TrainConfig
from mm_moe.config_files import load_config
from mm_moe.engine import Task, Trainer
from mm_moe.engine.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from mm_moe.engine.optim import build_optimizer, build_schedule, warmup_cosine
from mm_moe.model import BEiT3ForPretraining, BEiT3ForVQA, TaskOutput

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg() -> BEiT3Config:
    return load_config(BEiT3Config, ROOT / "configs/model/tiny.yaml",
                       ["d_model=32", "depth=2", "heads=2", "ffn.hidden=64", "moe.hidden=16", "moe.num_experts=4",
                        "vocab_size=60"])


def test_layer_decay_survives_the_schedule_and_no_decay_groups():
    model = BEiT3ForVQA(tiny_cfg(), 5)
    opt = build_optimizer(model, OptimConfig(lr=1e-3, layer_decay=0.5, warmup_steps=2))
    sched = build_schedule(opt, OptimConfig(lr=1e-3, layer_decay=0.5, warmup_steps=2), total_steps=10)
    names = {id(p): n for n, p in model.named_parameters()}
    scale_of = {}
    for g in opt.param_groups:
        for p in g["params"]:
            scale_of[names[id(p)]] = g["initial_lr"] / 1e-3  # the schedule has already applied warmup to "lr"
            if g["weight_decay"]:
                assert p.ndim >= 2 and not names[id(p)].endswith((".b1", ".b2", ".norm_w", ".norm_b", ".expert_emb"))
    # stem 0.5^3, block 0 0.5^2, block 1 0.5, final norm and heads 1 (unilm's BEiT-3 layer ids)
    assert scale_of["beit3.text.tokens.weight"] == pytest.approx(0.125)
    assert scale_of["beit3.encoder.blocks.0.attn.q.v.weight"] == pytest.approx(0.25)
    assert scale_of["beit3.encoder.blocks.1.ffn.v.experts.w1"] == pytest.approx(0.5)
    assert scale_of["head.3.weight"] == scale_of["beit3.encoder.norm.v.weight"] == pytest.approx(1.0)
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"beit3.text.tokens.weight", "beit3.vision.pos_embed", "beit3.encoder.blocks.1.ffn.v.experts.b1"} <= no_decay
    initial = [g["initial_lr"] for g in opt.param_groups]
    for step in range(6):
        opt.step()
        sched.step()
        factor = warmup_cosine(step + 1, 2, 10, 0.01)
        for g, lr0 in zip(opt.param_groups, initial, strict=True):
            assert g["lr"] == pytest.approx(lr0 * factor)  # every group keeps its layer scale


def test_warmup_cosine_values():
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)


def test_checkpoints_are_atomic_pruned_and_keep_tied_weights(tmp_path):
    model = BEiT3ForPretraining(tiny_cfg())
    (tmp_path / "step-00000009.tmp").mkdir()  # a write killed half-way
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {"x": step}, trainer_state={"step": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    fresh = BEiT3ForPretraining(tiny_cfg())
    load_weights(fresh, tmp_path)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert fresh.mlm.embedding.weight is fresh.beit3.text.tokens.weight
    assert torch.load(tmp_path / "step-00000003" / "trainer.pt", weights_only=True)["step"] == 3
    assert verify_checkpoint(tmp_path / "step-00000003") == []


def test_a_parameter_without_gradients_resumes_without_optimizer_state(tmp_path):
    """A fine-tuning run whose model holds a parameter it never trains (BEiT-3's mask token outside pretraining)
    saves no optimizer state for it; its resume loads the rest and continues exactly as the run would have."""
    def make() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 3), "unused": torch.nn.Linear(4, 3)})
        return model, torch.optim.AdamW(model.parameters(), lr=0.1)

    def step(model, opt, seed: int) -> None:
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
        opt.zero_grad()
        model["used"](x).square().sum().backward()
        opt.step()

    model, opt = make()
    step(model, opt, 1)
    save_checkpoint(tmp_path, 1, model, {}, optimizer=opt, trainer_state={"step": 1})
    step(model, opt, 2)
    resumed, resumed_opt = make()
    load_training_state(tmp_path / "step-00000001", resumed, resumed_opt)
    assert set(resumed_opt.state) == {resumed["used"].weight, resumed["used"].bias}  # as the saving run had
    step(resumed, resumed_opt, 2)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def _linear_task(batches: list[dict]) -> Task:
    torch.manual_seed(0)

    def loss_fn(m, batch, stats=False):
        loss = (m(batch["x"]) - batch["y"]).pow(2).mean()
        return TaskOutput(loss, loss, torch.zeros(()), {}, {"task": loss})

    return Task(torch.nn.Linear(2, 1), lambda epoch: batches, loss_fn, lambda b: 1)


@pytest.mark.parametrize("damage", ["model.safetensors", "trainer.pt", "dcp/__0_0.distcp", "manifest.json"])
def test_a_damaged_checkpoint_is_named_skipped_and_the_previous_one_used(tmp_path, caplog, damage):
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(4, 2, generator=g), "y": torch.randn(4, 1, generator=g)} for _ in range(3)]
    cfg = RunConfig(train=TrainConfig(steps=4, log_every=1, ckpt_every=2, keep_last=3), optim=OptimConfig(warmup_steps=1),
                    run_dir=str(tmp_path))
    Trainer(_linear_task(batches), cfg).fit()
    bad = tmp_path / "step-00000004" / damage
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated, as by a full disk
    trainer = Trainer(_linear_task(batches), cfg)
    assert trainer.resume().name == "step-00000002" and trainer.step == 2
    assert "skipping damaged checkpoint" in caplog.text and str(tmp_path / "step-00000004") in caplog.text
    expected = torch.nn.Linear(2, 1)
    load_weights(expected, tmp_path / "step-00000002")
    assert torch.equal(trainer.raw.weight, expected.weight)
    assert trainer.optimizer.state[trainer.raw.weight]["exp_avg"].abs().sum() > 0  # optimizer state restored too
    other = tmp_path / "step-00000002" / "model.safetensors"
    other.write_bytes(other.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="every checkpoint is damaged"):
        Trainer(_linear_task(batches), cfg).resume()


def test_nan_loss_stops_with_the_step(tmp_path):
    def loss_fn(m, batch, stats=False):
        loss = m(batch["x"]).sum() * (float("nan") if batch["i"] == 2 else 1.0)
        return TaskOutput(loss, loss, torch.zeros(()), {}, {"task": loss})

    batches = [{"x": torch.ones(1, 2), "i": i} for i in range(5)]
    task = Task(torch.nn.Linear(2, 1), lambda epoch: batches, loss_fn, lambda b: 1)
    cfg = RunConfig(train=TrainConfig(steps=5, log_every=1, ckpt_every=100), optim=OptimConfig(warmup_steps=1),
                    run_dir=str(tmp_path))
    trainer = Trainer(task, cfg)
    assert (tmp_path / "config.yaml").is_file()  # the run folder is written by the trainer
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3 .*no checkpoint was written yet"):
        trainer.fit()


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path, world):
    """A run killed during a background checkpoint write resumes to the uninterrupted run's losses and weights,
    with EMA, gradient accumulation and monomodal image and text sources mixed into the MIM and MLM passes."""
    images, texts = monomodal_shards(world, tmp_path / "monomodal")
    args = [sys.executable, str(ROOT / "train_mm.py"), "pretrain", "--config", str(ROOT / "configs/pretrain_demo.yaml"),
            *TINY_MODEL, "train.batch_size=8", "train.grad_accum=2",
            "train.steps=10", "train.log_every=1", "train.ckpt_every=2", "train.keep_last=3", "optim.warmup_steps=2",
            "train.ema_decay=0.9", f"pretrain_data.shards={world / 'shards'}", "pretrain_data.shuffle_buffer=20",
            f"pretrain_data.image_shards={images}", f"pretrain_data.text_shards={texts}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run([*args, f"run_dir={full}"], check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    # a full model.safetensors at steps 4, 8 and 10 only; checkpoints written in the background (killed during one,
    # the run resumes from the last complete one)
    args += ["train.export_every=4", "train.async_checkpoint=true"]
    proc = subprocess.Popen([*args, f"run_dir={killed}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "step-00000004").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = latest_checkpoint(killed)
    assert resumed_from is not None and int(resumed_from.name[5:]) < 10, "the run finished before it was killed"
    done = _losses(killed)
    subprocess.run([*args, f"run_dir={killed}", "--resume"], check=True, env=env, capture_output=True)
    after = _losses(killed)
    reference = _losses(full)
    start = int(resumed_from.name[5:])
    # every step after the checkpoint, recomputed after the kill, equals the uninterrupted run's
    for step in range(start + 1, 11):
        assert after[step] == reference[step], (step, after[step], reference[step])
    assert set(done) | set(after) == set(reference)
    from safetensors.torch import load_file

    a, b = (load_file(run / "step-00000010" / "model.safetensors") for run in (killed, full))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # final (EMA) weights, bit for bit
    # train.export_every=4 (the killed run's): model.safetensors at steps 4, 8 and the last; a reader pointed at the
    # run takes the newest exported checkpoint, at one without it is told how to export it; mm-moe-export writes
    # from dcp/ the very weights the uninterrupted run exported at that step
    assert [(c.name, (c / "model.safetensors").is_file()) for c in list_checkpoints(killed)] == \
        [("step-00000006", False), ("step-00000008", True), ("step-00000010", True)]
    assert resolve_checkpoint(killed).name == "step-00000010"
    with pytest.raises(CheckpointError, match=r"without model\.safetensors .* mm-moe-export"):
        resolve_checkpoint(killed / "step-00000006")
    out = tmp_path / "exported"
    res = subprocess.run([sys.executable, "-m", "mm_moe.export", str(killed / "step-00000006"), str(out)], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(out / "model.safetensors"), load_file(full / "step-00000006" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert verify_checkpoint(out) == [] and {p.name for p in out.iterdir()} >= {"config.yaml", "tokenizer"}
    res = subprocess.run([sys.executable, "-m", "mm_moe.export", str(killed / "step-00000006"), str(out)], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 1 and "exists and is not an empty folder" in res.stderr


_FAULTS_SCRIPT = """
import resource, torch
from mm_moe.engine import keep_freed_memory

def faults():  # minor page faults of allocating, touching and freeing a 64 MB tensor
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

before = min(faults() for _ in range(4))
applied = keep_freed_memory()
[faults() for _ in range(12)]  # the heap grows for a few steps until freed chunks cover the working set
print(before, max(faults() for _ in range(4)), applied)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc allocator setting")
def test_keep_freed_memory_stops_per_step_page_faults():
    """glibc unmaps freed blocks over 32 MB, so every reallocation faults each 4 KB page in; kept memory is reused."""
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, check=True).stdout
    before, after, applied = out.split()
    assert applied == "True"
    assert int(before) >= (64 << 20) // 4096 * 0.9  # every page of the 64 MB faulted in again
    assert int(after) < 100
