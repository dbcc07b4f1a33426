"""Training under torchrun, through train_mm.py as users run it (2 gloo processes on CPU).

Every task under DDP, DDP + expert parallelism and FSDP2 matches one process that sees the same global batch
(gradient accumulation over the two ranks' micro-batches, in rank order): logged losses and gradient norms at
every step, and the final weights. Sharded checkpoints resume at 2 processes exactly and at 1 process with the
same weights and optimizer state; a SIGKILL during a sharded checkpoint write loses nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import dist_workers
import pytest
import torch
from processes import alive, children, cmdline
from safetensors.torch import load_file
from tiny import TINY_MODEL, tiny_world

from mm_moe.config import RunConfig
from mm_moe.config_files import load_config
from mm_moe.data import load_tokenizer
from mm_moe.engine import Trainer, build_task
from mm_moe.engine.checkpoint import latest_checkpoint
from mm_moe.engine.distributed import restart_hazard

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TINY = [*TINY_MODEL, "model.drop_path=0", "train.batch_size=4", "train.steps=4",
        "train.log_every=1", "train.ckpt_every=2", "train.keep_last=3", "train.eval_every=2", "optim.warmup_steps=2",
        # Adam's m / sqrt(v) turns the rounding of a near-zero gradient (summed in another order by 2 ranks than
        # by 1 process) into a full-size update; with eps 1e-3 an update stays proportional to its gradient
        "optim.eps=1e-3"]
MODES = {"ddp": ["train.distributed=ddp"], "ddp+ep": ["train.distributed=ddp", "train.expert_parallel=true"],
         # FSDP2 runs write their checkpoints in the background (DCP async_save over a gloo group of its own): the
         # comparisons with one process and the resume tests below check those checkpoints too
         "fsdp2": ["train.distributed=fsdp2", "train.async_checkpoint=true"]}
STREAM = ["train.batch_size=2", "train.steps=6", "train.ckpt_every=3", "train.keep_last=3"]
"""Pretraining with a global batch of 8 in micro-batches of 2 (grad_accum 8 / 2 / processes)."""
COMPILED = ["train.compile=true", "train.compile_backend=aot_eager"]


class Runs:
    """The synthetic world and the 4-step torchrun runs of this module, each made once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.world = tiny_world(root / "world")
        self.done: dict[tuple[str, str], Path] = {}
        self.references: dict[str, tuple[Path, dict]] = {}

    def args(self, task: str) -> list[str]:
        """train_mm.py arguments of `task` on the synthetic world, with its validation data."""
        w = self.world
        if task == "pretrain":
            return ["pretrain", "--config", "configs/pretrain_demo.yaml", f"pretrain_data.shards={w}/shards",
                    "pretrain_data.shuffle_buffer=20"]
        if task == "vqa":
            return ["finetune", "vqa", "--config", "configs/finetune_vqa_demo.yaml",
                    f"data.vqa_train_questions={w}/vqa/v2_OpenEnded_mscoco_train2014_questions.json",
                    f"data.vqa_train_annotations={w}/vqa/v2_mscoco_train2014_annotations.json",
                    f"data.vqa_images={w}/vqa/images",
                    f"data.vqa_val_questions={w}/vqa/v2_OpenEnded_mscoco_val2014_questions.json",
                    f"data.vqa_val_annotations={w}/vqa/v2_mscoco_val2014_annotations.json"]
        if task == "nlvr2":
            return ["finetune", "nlvr2", "--config", "configs/finetune_nlvr2_demo.yaml",
                    f"data.nlvr2_train={w}/nlvr2/train.json", f"data.nlvr2_images={w}/nlvr2/images",
                    f"data.nlvr2_dev={w}/nlvr2/dev.json"]
        return ["finetune", "caption", "--config", "configs/finetune_caption_demo.yaml",
                f"data.karpathy={w}/coco/dataset_coco.json", f"data.coco_images={w}/vqa/images"]

    def trained(self, task: str, mode: str) -> Path:
        """A 4-step run of `task` under torchrun with `mode`, checkpoints at steps 2 and 4."""
        if (task, mode) not in self.done:
            run = self.root / f"{task}-{mode}"
            train_cli([*self.args(task), *TINY, *MODES[mode], f"run_dir={run}"], WORLD)
            self.done[task, mode] = run
        return self.done[task, mode]

    def global_batch_run(self) -> Path:
        """The uninterrupted 6-step pretraining run of STREAM at 2 processes x 2 accumulation steps."""
        run = self.root / "stream-2"
        if not run.is_dir():
            train_cli([*self.args("pretrain"), *TINY, *STREAM, "train.grad_accum=2", f"run_dir={run}"], WORLD)
        return run

    def reference(self, task: str) -> tuple[Path, dict[str, torch.Tensor]]:
        """One process on the global batch of `task` (the same for every mode): its run folder and final weights."""
        if task not in self.references:
            torch.set_num_threads(1)
            run = self.root / f"{task}-reference"
            ref = one_process_trainer(self.config(task, run))
            ref.fit()
            self.references[task] = run, ref.raw.state_dict()
        return self.references[task]

    def config(self, task: str, run_dir: Path) -> RunConfig:
        args = self.args(task)
        at = args.index("--config")
        return load_config(RunConfig, ROOT / args[at + 1], [*args[at + 2:], *TINY, f"run_dir={run_dir}", f"task={task}"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("dist"))


def train_cli(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    """train_mm.py under torchrun (nproc > 1) or as a plain process."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    res = subprocess.run([*launcher, str(ROOT / "train_mm.py"), *args], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def one_process_trainer(cfg: RunConfig) -> Trainer:
    """One process, grad_accum 2: micro-step 2i is rank 0's batch i, 2i+1 rank 1's, as the 2 ranks see them."""
    tok = load_tokenizer()
    torch.manual_seed(cfg.train.seed)  # as train_mm.py: the model is initialised right after seeding
    ranks = [build_task(cfg, tok, rank, WORLD) for rank in range(WORLD)]

    def interleaved(epoch: int):
        for batches in zip(*(t.loader(epoch) for t in ranks), strict=False):
            yield from batches

    one = replace(cfg, train=replace(cfg.train, grad_accum=WORLD, distributed="none"))
    return Trainer(replace(ranks[0], loader=interleaved), one)


def records(run: Path, validation: bool = False) -> list[dict]:
    """The training records of metrics.jsonl (or its validation records)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if ("loss" not in r) == validation]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize(("task", "mode"), [("pretrain", mode) for mode in MODES] + [
    (task, mode) for task in ("vqa", "nlvr2", "caption") for mode in ("ddp+ep", "fsdp2")])  # plain DDP: pretraining's
def test_torchrun_training_matches_one_process_on_the_global_batch(runs, task, mode):
    run = runs.trained(task, mode)
    ref_run, ref_state = runs.reference(task)
    got, want = records(run), records(ref_run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for g, w in zip(got, want, strict=True):  # the loss and grad norm of the global batch, every step
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6), (g["step"], g["loss"], w["loss"])
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), (g["step"], g["grad_norm"], w["grad_norm"])
    validated, ref_validated = records(run, validation=True), records(ref_run, validation=True)
    assert [r["step"] for r in validated] == ([] if task == "pretrain" else [2, 4])  # every rank validates the model
    for g, w in zip(validated, ref_validated, strict=True):
        assert g.keys() == w.keys() and all(g[k] == pytest.approx(w[k], rel=1e-6) for k in g), (g, w)
    final = weights(run / "step-00000004")  # the export holds every expert, gathered from the ranks
    assert final.keys() <= ref_state.keys()
    for name, value in final.items():
        torch.testing.assert_close(value, ref_state[name], atol=2e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp+ep", "fsdp2"])
def test_compiled_torchrun_training_matches_one_process(runs, tmp_path, mode):
    """Encoder blocks compiled (train.compile=true) under torchrun give the eager one-process run's losses and
    weights, as the eager torchrun runs do: with DDP and expert parallelism (whose all_to_all runs eagerly between
    two graphs), and with FSDP2."""
    run = tmp_path / "compiled"
    train_cli([*runs.args("pretrain"), *TINY, *MODES[mode], *COMPILED, f"run_dir={run}"], WORLD)
    ref_run, ref_state = runs.reference("pretrain")
    for g, w in zip(records(run), records(ref_run), strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6), (g["step"], g["loss"], w["loss"])
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), (g["step"], g["grad_norm"], w["grad_norm"])
        assert g["compiled_graphs"] > 0
    for name, value in weights(run / "step-00000004").items():
        torch.testing.assert_close(value, ref_state[name], atol=2e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp+ep", "fsdp2"])
def test_sharded_checkpoint_resumes_exactly_at_two_processes(runs, tmp_path, mode):
    run = runs.trained("pretrain", mode)
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "step-00000004")
    res = train_cli([*runs.args("pretrain"), *TINY, *MODES[mode], f"run_dir={resumed}", "--resume"], WORLD)
    assert "from step-00000002" in res.stderr

    def logged(r: dict) -> dict:
        return {k: v for k, v in r.items() if k != "tokens_per_s"}

    assert list(map(logged, records(resumed))) == list(map(logged, records(run)))  # steps 3, 4 recomputed exactly
    a, b = weights(run / "step-00000004"), weights(resumed / "step-00000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp+ep", "fsdp2"])
def test_sharded_checkpoint_resumes_at_one_process(runs, tmp_path, mode):
    """Saved by 2 ranks (experts or every parameter sharded), resumed by 1: the weights are the saved full ones,
    and one process fed both ranks' batches continues with the 2-process run's losses, grad norms and weights,
    so the optimizer state of every shard landed where it belongs."""
    torch.set_num_threads(1)
    source = runs.trained("pretrain", mode)
    for copy in ("api", "cli"):
        shutil.copytree(source, tmp_path / copy)
        shutil.rmtree(tmp_path / copy / "step-00000004")
    trainer = one_process_trainer(runs.config("pretrain", tmp_path / "api"))
    assert trainer.resume().name == "step-00000002" and trainer.step == 2
    for name, value in weights(tmp_path / "api" / "step-00000002").items():
        assert torch.equal(trainer.raw.state_dict()[name], value), name
    assert trainer.batches_done == 2 * WORLD  # 2 steps, now of 2 micro-batches each: both ranks' batches
    trainer.fit()
    for g, w in zip(records(tmp_path / "api")[2:], records(source)[2:], strict=True):
        assert g["step"] == w["step"] and g["loss"] == pytest.approx(w["loss"], rel=1e-6), (g, w)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), (g, w)
    for name, value in weights(source / "step-00000004").items():
        torch.testing.assert_close(trainer.raw.state_dict()[name], value, atol=2e-6, rtol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
    res = train_cli([*runs.args("pretrain"), *TINY, f"run_dir={tmp_path / 'cli'}", "train.grad_accum=2", "--resume"],
                    1)  # the CLI path: the global batch kept by 2 accumulation steps continues the same batches
    assert "saved by 2 process(es) x 1 accumulation step(s), resumed by 1 x 2: the global batch is unchanged" in res.stderr
    same_records(records(tmp_path / "cli")[2:], records(source)[2:])


@pytest.mark.slow
def test_sigkill_during_a_sharded_checkpoint_write_loses_nothing(runs, tmp_path):
    """Expert-parallel pretraining checkpointing every step is killed (SIGKILL, every process) while a step-*.tmp
    folder is being written; resuming gives the uninterrupted run's final weights, bit for bit."""
    reference = runs.trained("pretrain", "ddp+ep")
    args = [*runs.args("pretrain"), *TINY, *MODES["ddp+ep"], "train.ckpt_every=1"]
    for attempt in range(3):  # the kill lands inside a write unless the rename wins the race: then try again
        run = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                                 str(ROOT / "train_mm.py"), *args, f"run_dir={run}"], cwd=ROOT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not list(run.glob("step-0000000[2-3].tmp")):
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if list(run.glob("*.tmp")):
            break
    assert list(run.glob("*.tmp")), "no kill landed inside a checkpoint write"
    last = latest_checkpoint(run)
    assert last is not None and last.name < "step-00000004", "the run finished before it was killed"
    train_cli([*args, f"run_dir={run}", "--resume"], WORLD)
    assert not list(run.glob("*.tmp"))
    a, b = weights(reference / "step-00000004"), weights(run / "step-00000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_expert_parallel_matches_local_experts(tmp_path):
    dist_workers.spawn(dist_workers.expert_parallel_matches_local, WORLD, str(tmp_path))
    for rank in range(WORLD):
        errs = torch.load(tmp_path / f"ep{rank}.pt", weights_only=True)
        for key, err in errs.items():
            assert err < 1e-5, (rank, key, float(err))


@pytest.mark.slow
def test_gradient_accumulation_syncs_once_per_step_and_matches_one_process(tmp_path):
    """Through the Trainer under DDP (2 gloo processes): with 2 micro-steps per step gradients are all-reduced
    as often as with 1 (no_sync on the first), and the weights equal a single process's on the global batch."""
    dist_workers.spawn(dist_workers.accumulation_syncs_once_per_step, WORLD, str(tmp_path))
    one, two = (torch.load(tmp_path / f"accum{a}.pt", weights_only=True) for a in (1, 2))
    assert one["calls"] > 0 and two["calls"] == one["calls"]
    torch.set_num_threads(1)
    single = dist_workers.accumulation_run(str(tmp_path / "single"), 2, 1, 0).fit()
    for name, value in single.state_dict().items():
        torch.testing.assert_close(two["state"][name], value, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_global_balance_and_bias_updates_on_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    """The global-batch balance loss of 2 ranks (f over both, P each rank's own, averaged as DDP averages) is the
    one-process loss of the whole batch, with the same router gradients; the aux-loss-free biases move alike."""
    dist_workers.spawn(dist_workers.balancing_on_two_ranks, WORLD, str(tmp_path))
    layer = dist_workers.balancing_layer()
    aux = layer(dist_workers.balancing_batch()).aux_loss
    aux.backward()
    dist_workers.update_routers(layer)
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"balancing{rank}.pt", weights_only=True)
        assert got["aux"].item() == pytest.approx(aux.item(), rel=1e-6)
        assert got["grads"].keys() == grads.keys() and grads
        for name, g in grads.items():
            torch.testing.assert_close(got["grads"][name], g, atol=1e-7, rtol=1e-5)
        assert torch.equal(got["bias"], layer.router.expert_bias) and layer.router.expert_bias.abs().sum() > 0


@pytest.mark.slow
def test_balancing_options_resume_exactly_under_expert_parallelism(runs, tmp_path):
    """Pretraining with the global-batch balance loss and aux-loss-free biases under DDP + expert parallelism:
    the biases move and are checkpointed, and a resume from step 2 recomputes steps 3 and 4 exactly."""
    balancing = ["model.moe.global_balance=true", "model.moe.bias_update_rate=0.01"]
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    train_cli([*runs.args("pretrain"), *TINY, *MODES["ddp+ep"], *balancing, f"run_dir={run}"], WORLD)
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "step-00000004")
    train_cli([*runs.args("pretrain"), *TINY, *MODES["ddp+ep"], *balancing, f"run_dir={resumed}", "--resume"], WORLD)
    a, b = weights(run / "step-00000004"), weights(resumed / "step-00000004")
    biases = [k for k in a if k.endswith("router.expert_bias")]
    assert biases and all(a[k].abs().sum() > 0 for k in biases)
    assert not torch.equal(a[biases[0]], weights(run / "step-00000002")[biases[0]])  # moved after step 2 as well
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in records(resumed)] == [r["loss"] for r in records(run)]


def _wait_for_records(run: Path, n: int, proc: subprocess.Popen, limit: float = 300) -> None:
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        path = run / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run}: no {n} records before the run ended or {limit} s passed")


def _launch(args: list[str], nproc: int) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    return subprocess.Popen([*launcher, str(ROOT / "train_mm.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_a_frozen_rank_ends_the_job_within_the_timeout(runs, tmp_path):
    """SIGSTOP of one rank: the other's next collective gives up after train.dist_timeout_s with one line, and
    torchrun ends the job, instead of waiting forever."""
    run = tmp_path / "frozen"
    proc = _launch([*runs.args("pretrain"), *TINY, "train.steps=200", "train.dist_timeout_s=10",
                    f"run_dir={run}"], WORLD)
    try:
        _wait_for_records(run, 1, proc)
        workers = children(proc.pid)
        frozen, other = workers[-1], workers[0]
        os.kill(frozen, signal.SIGSTOP)
        t0 = time.time()
        while alive(other) and time.time() - t0 < 100:  # the other rank gives up after the timeout ...
            time.sleep(0.2)
        assert not alive(other) and time.time() - t0 < 100
        os.kill(frozen, signal.SIGKILL)  # ... then torchrun would wait for the stopped one, which we end
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert "gave up at step" in err and "train.dist_timeout_s=10 s" in err and "a rank froze or died" in err, err[-3000:]
    finally:
        proc.kill()
        subprocess.run(["pkill", "-KILL", "-f", str(run)], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, WORLD])
def test_sigterm_writes_a_checkpoint_at_the_next_step_and_exits_143(runs, tmp_path, nproc):
    """Preemption: SIGTERM to the training processes (as SLURM or Kubernetes send it) makes every rank stop at
    the same step boundary, write a checkpoint and exit 143 (128 + SIGTERM: not finished, so that no wrapper marks
    the run done); --resume then continues the uninterrupted run exactly. (One process takes the same path without
    the agreement; 2 processes test both.)"""
    args = [*runs.args("pretrain"), *TINY, "train.steps=24", "train.ckpt_every=100"]
    run = tmp_path / f"preempted{nproc}"
    proc = _launch([*args, f"run_dir={run}"], nproc)
    _wait_for_records(run, 2, proc)
    for pid in children(proc.pid) if nproc > 1 else [proc.pid]:
        os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    stopped = int(ckpt.name[5:])
    assert 2 <= stopped < 24
    assert f"train_mm.py: error: stopped by SIGTERM after step {stopped} of 24, checkpoint written" in err, err[-3000:]
    if nproc == 1:
        assert proc.returncode == 143
    else:  # torchrun reports its workers' status and fails
        assert proc.returncode != 0 and re.search(r"exitcode\s*:\s*143", err), err[-3000:]
    assert [r["step"] for r in records(run)] == list(range(1, stopped + 1))
    train_cli([*args, f"run_dir={run}", "--resume"], nproc)
    full = tmp_path / f"full{nproc}"
    train_cli([*args, f"run_dir={full}"], nproc)
    assert [(r["step"], r["loss"]) for r in records(run)] == [(r["step"], r["loss"]) for r in records(full)]


EVAL_COMMANDS = {  # task -> (command, arguments on the synthetic world, the file it writes)
    "vqa": ("eval_vqa.py", ["--questions", "vqa/v2_OpenEnded_mscoco_val2014_questions.json", "--images", "vqa/images",
                            "--annotations", "vqa/v2_mscoco_val2014_annotations.json"], "answers.json"),
    "caption": ("eval_caption.py", ["--karpathy", "coco/dataset_coco.json", "--split", "val", "--images", "vqa/images",
                                    "--beam", "2"], "captions.json"),
}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(EVAL_COMMANDS))  # NLVR2's sharded validation: the training tests above
def test_eval_commands_under_torchrun_write_and_score_what_one_process_does(runs, tmp_path, task):
    """Each of 3 processes predicts its slice (10 VQA questions: 4 + 4 + 2 and padding; 2 caption images: the third
    rank has only padding, yet decodes in step), the first writes and scores: the same file, byte for byte, and the
    same scores as one process."""
    command, args, name = EVAL_COMMANDS[task]
    args = [str(runs.world / a) if "/" in a else a for a in args]
    outputs = {}
    for nproc in (1, 3):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
            if nproc > 1 else [sys.executable]
        out = tmp_path / f"{nproc}-{name}"
        res = subprocess.run([*launcher, str(ROOT / command), "--ckpt", str(runs.trained(task, "ddp+ep")), *args,
                              "--batch-size", "3", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
        scores = res.stdout[res.stdout.index("{\n"):]  # pycocoevalcap prints before it
        outputs[nproc] = out.read_bytes(), json.loads(scores[:scores.index("\n}") + 2])
    assert outputs[3] == outputs[1]


@pytest.mark.slow
@pytest.mark.parametrize(("task", "mode"), [("vqa", "fsdp2"), ("pretrain", "ddp+ep")])
def test_mm_moe_export_rebuilds_the_weights_of_sharded_checkpoints(runs, tmp_path, task, mode):
    """mm-moe-export in one process, from the dcp/ shards that 2 FSDP2 ranks (or 2 expert-parallel ranks, each with
    half the experts) wrote: bit for bit the model.safetensors the run gathered at that step, in a folder the
    predictors read."""
    step = runs.trained(task, mode) / "step-00000002"
    out = tmp_path / "export"
    res = subprocess.run([sys.executable, "-m", "mm_moe.export", str(step), str(out)], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = weights(out), weights(step)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    if task == "vqa":
        from mm_moe.inference import VQAPredictor

        assert VQAPredictor.from_pretrained(out).answers == json.loads((step.parent / "answers.json").read_text())


@pytest.mark.slow
def test_pretraining_resumed_on_another_number_of_processes_continues_the_same_batches(runs, tmp_path):
    """The global stream: a global batch of 8 in micro-batches of 2 gives the same losses and gradient norms at
    1 process x 4 accumulation steps and 2 x 2 from step 1, and a checkpoint of step 3 resumed 2 -> 1, 1 -> 2 and
    2 -> 4 processes continues the uninterrupted run (to reduction order: the ranks' gradients are summed in
    another order, as in the tests above)."""
    args = [*runs.args("pretrain"), *TINY, *STREAM]
    accum = {1: 4, 2: 2, 4: 1}

    def train(run: Path, nproc: int, *extra: str) -> list[dict]:
        train_cli([*args, f"train.grad_accum={accum[nproc]}", f"run_dir={run}", *extra], nproc)
        return records(run)

    two, one = runs.global_batch_run(), tmp_path / "one"
    reference = records(two)
    same_records(train(one, 1), reference)
    for source, nproc in ((two, 1), (one, 2), (two, 4)):
        resumed = tmp_path / f"{source.name}-to-{nproc}"
        shutil.copytree(source, resumed)
        shutil.rmtree(resumed / "step-00000006")  # the run as it stood at its step-3 checkpoint
        same_records(train(resumed, nproc, "--resume")[3:], reference[3:])


def same_records(got: list[dict], want: list[dict]) -> None:
    """Equal steps, and losses and gradient norms equal to reduction order."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6), (g["step"], g["loss"], w["loss"])
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), (g["step"], g["grad_norm"], w["grad_norm"])


@pytest.mark.slow
def test_two_nodes_on_localhost_restart_a_killed_worker_and_auto_resume(runs, tmp_path):
    """Two torchrun "nodes" of one process each, c10d rendezvous on localhost, --max-restarts 1, --auto-resume and
    a store per attempt, as configs/slurm_pretrain.sh runs them: one worker is SIGKILLed after the step-3
    checkpoint, torchrun restarts both once, they resume from the newest checkpoint, and the run ends with the
    uninterrupted run's weights."""
    args = [*runs.args("pretrain"), *TINY, *STREAM, "train.grad_accum=2", "train.dist_timeout_s=90"]
    reference = runs.global_batch_run()
    run = tmp_path / "elastic"
    port = 29400 + os.getpid() % 500
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "INFO", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    # each agent's output to a file: a pipe read by nobody would fill and block its writers (and the job)
    outputs = [(tmp_path / f"agent{i}.log").open("w") for i in range(2)]
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
         f"--rdzv_endpoint=localhost:{port}", "--rdzv_id=elastic-test", "--max-restarts=1", "--monitor-interval=0.5",
         str(ROOT / "train_mm.py"), *args, f"run_dir={run}", "--auto-resume"], cwd=ROOT, stdout=out,
        stderr=subprocess.STDOUT, env=env) for out in outputs]
    try:
        deadline = time.time() + 300
        while not (run / "step-00000003").is_dir() and time.time() < deadline:
            assert all(a.poll() is None for a in agents), (tmp_path / "agent0.log").read_text()[-3000:]
            time.sleep(0.05)
        workers = [pid for pid in children(agents[1].pid) if b"train_mm.py" in cmdline(pid)]
        assert workers, "the second node has no worker"
        os.kill(workers[0], signal.SIGKILL)
        for a in agents:
            a.wait(timeout=300)
    finally:
        for a in agents:
            a.kill()
        for out in outputs:
            out.close()
    logs = [(tmp_path / f"agent{i}.log").read_text() for i in range(2)]
    assert [a.returncode for a in agents] == [0, 0], logs[0][-3000:]
    # the killed worker; each agent's worker group rendezvoused twice (the start and one restart), and resumed
    assert "failed (exitcode: -9)" in logs[1], logs[1][-3000:]
    assert [log.count("Rendezvous complete for workers") for log in logs] == [2, 2], logs[0][-3000:]
    assert f"resumed {run} from step-00000003" in logs[0], logs[0][-3000:]
    assert not any("pytorch/pytorch#135712" in log for log in logs)
    got, want = weights(run / "step-00000006"), weights(reference / "step-00000006")
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=2e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_restart_hazard_names_the_shared_store(runs, tmp_path):
    """torchrun with restarts and the agent's shared store gets the warning, through the training command; without
    restarts, or with a store per attempt (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 makes torchrun tell its workers
    USE_AGENT_STORE=False), none."""
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          "--max-restarts=1", str(ROOT / "train_mm.py"), *runs.args("pretrain"), *TINY,
                          "train.steps=1", f"run_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"},
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warning: torchrun --max-restarts shares one store" in res.stderr
    hazard = restart_hazard({"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert hazard is not None and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in hazard
    assert restart_hazard({"TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"}) is None
    assert restart_hazard({"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert restart_hazard({}) is None
