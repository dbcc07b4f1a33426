"""torch.compile of the encoder blocks: fullgraph for every FFN kind, outputs and gradients equal to eager, dynamic
token and batch dimensions with a bounded number of graphs, and compiled training through train_mm.py.

Tolerances. With the aot_eager backend the compiled forward and backward run the same aten kernels as eager, in
the same order, so they must be bit for bit equal (fp32 and bf16 autocast alike: `configure_compile` runs the
backward without autocast, as eager autograd does). Inductor fuses elementwise chains and reorders float32 sums
(hidden units, LayerNorm statistics), each rounding at ~1e-7 relative, compounded over a dozen ops: the one
inductor case allows rtol = atol = 1e-5 in float32.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY_MODEL

from mm_moe.config import BEiT3Config, FFNConfig, ObjectivesConfig
from mm_moe.engine import compile_blocks, compiled_graphs, configure_compile
from mm_moe.engine.tasks import pretrain_loss
from mm_moe.model import BEiT3ForPretraining, Block
from mm_moe.model.encoder import mark_tokens_dynamic
from mm_moe.moe import build_ffn, matched_variants

ROOT = Path(__file__).resolve().parents[1]
D, HEADS, VISION = 32, 2, 5
KINDS: dict[str, FFNConfig] = {
    name: cfg or FFNConfig(kind="dense", hidden=64, subln=True)
    for name, cfg in matched_variants(D, 64, num_experts=4, heads=2, subln=True).items()
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: compiled graphs are cached per code object across tests, and a test must
    not pass on another's graphs (or on eager, past the recompile limit)."""
    torch._dynamo.reset()
    configure_compile()
    yield
    torch._dynamo.reset()


def block_step(block: Block, text: int, amp: bool, seed: int) -> list[torch.Tensor]:
    """One forward (image and text tokens, padded text, with statistics) and backward of `block`: the output, aux
    loss, input gradient, every parameter gradient and the expert counts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, VISION + text, D, generator=g).requires_grad_(True)
    pad = torch.zeros(2, VISION + text, dtype=torch.bool)
    pad[1, VISION + text // 2:] = True
    mask = (~pad)[:, None, None, :]
    mark_tokens_dynamic(x, mask, pad)  # as the encoder does: one graph serves every text length
    block.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y, aux, stats = block(x, VISION, mask, pad, None, True)
    ((y.float() * torch.randn(y.shape, generator=g)).sum() + aux).backward()
    counts = [s.counts for s in stats.values()]
    return [y, aux, x.grad, *(p.grad for p in block.parameters()), *counts]


def compare(kind: str, backend: str, amp: bool, exact: bool) -> None:
    torch.manual_seed(0)
    eager = Block(D, HEADS, KINDS[kind], KINDS[kind])
    compiled = copy.deepcopy(eager)
    compiled.compile(backend=backend, fullgraph=True)
    before = compiled_graphs()
    for i, text in enumerate((7, 9, 12)):  # varying text lengths: one graph for all
        want, got = block_step(eager, text, amp, i), block_step(compiled, text, amp, i)
        assert len(got) == len(want)
        for w, o in zip(want, got, strict=True):
            if exact:
                assert torch.equal(w, o), (kind, text, (w.float() - o.float()).abs().max())
            else:
                torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5)
        if i == 0:
            warmed = compiled_graphs()
    assert warmed - before == 1 and compiled_graphs() == warmed  # the first graph serves every later length


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_compiled_block_equals_eager_bit_for_bit(kind, amp):
    compare(kind, "aot_eager", amp, exact=True)


@pytest.mark.slow
def test_inductor_block_matches_eager():
    compare("mhmoe", "inductor", False, exact=False)
    # two passes before one backward, as a pretraining step makes: nothing in a graph writes in place to what an
    # earlier pass saved for backward (the X-MoE router's renormalisation once did)
    block = Block(D, HEADS, KINDS["mhmoe"], KINDS["mhmoe"]).train()
    block.compile(backend="inductor", fullgraph=True)
    x = torch.randn(2, VISION + 7, D, requires_grad=True)
    (block(x, VISION, None)[0].sum() + block(x * 2, VISION, None)[0].sum()).backward()
    assert x.grad is not None


@pytest.mark.parametrize("kind", ["smoe", "mhmoe", "cartesian"])
def test_plain_torch_compile_of_a_layer_has_no_graph_break(kind):
    """After configure_compile(), torch.compile(layer, fullgraph=True) of an FFN layer traces forward and backward."""
    torch.manual_seed(0)
    layer = torch.compile(build_ffn(KINDS[kind], D), fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 7, D, requires_grad=True)
    y, aux, stats = layer(x, stats=True)
    (y.sum() + aux).backward()
    assert stats.counts.sum() > 0 and x.grad is not None and compiled_graphs() > 0


def test_pretraining_passes_stop_compiling_after_warm_up():
    """MLM (text only), MIM (image only) and VLM (both) passes through compiled blocks, with and without statistics
    (the trainer asks for them at logging steps): once each kind of pass has been seen, new text lengths compile
    nothing more. (A change of batch size, the last partial batch, makes that dimension symbolic once.)"""
    cfg = BEiT3Config(img_size=16, patch_size=8, d_model=D, depth=2, heads=HEADS, max_text_len=16,
                      ffn=FFNConfig(kind="dense", hidden=64, subln=True), moe=KINDS["mhmoe"], moe_layers="every_other")
    torch.manual_seed(0)
    model = BEiT3ForPretraining(cfg)
    assert compile_blocks(model, "aot_eager") == 2
    loss_fn = pretrain_loss(ObjectivesConfig())
    g = torch.Generator().manual_seed(0)
    graphs = []
    warm_up = [(4, 9, True), (4, 12, False)]
    later = [(4, 14, True), (4, 6, False), (4, 11, True)]
    for batch, text, stats in warm_up + later:
        ids = torch.randint(1000, 2000, (batch, text), generator=g)
        padding = torch.zeros(batch, text, dtype=torch.bool)
        padding[0, text - 2:] = True
        labels = torch.where(torch.rand(batch, text, generator=g) < 0.3, ids, -100)
        labels[:, 1] = ids[:, 1]
        b = {"masked_ids": ids, "text_padding": padding, "mlm_labels": labels, "vlm_ids": ids, "vlm_labels": labels,
             "images": torch.randn(batch, 3, 16, 16),
             "patch_mask": torch.rand(batch, 4, generator=g) < 0.5}
        b["patch_mask"][:, 0] = True
        loss_fn(model, b, stats=stats).loss.backward()
        graphs.append(compiled_graphs())
    assert graphs[len(warm_up) - 1] > 0 and graphs[-1] == graphs[len(warm_up) - 1], graphs


def _train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train_mm.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900, check=True)


def _losses(run: Path) -> dict[int, tuple[float, float]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in lines if "loss" in r}


def _resumed_copy(run: Path, to: Path) -> Path:
    """A copy of `run` as a kill after its step-2 checkpoint would have left it."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "step-00000003")
    return to


@pytest.mark.slow
def test_compiled_training_matches_eager_and_resumes_exactly(tmp_path, world):
    """train_mm.py pretrain with train.compile=true (aot_eager), gradient checkpointing and EMA on: the eager run's
    losses and gradient norms, checkpoints under the eager names; a compiled run resumed from its step-2 checkpoint
    equals the uninterrupted one bit for bit, and an eager run resumes it too.

    Not bit for bit against eager: a parameter used by several passes of the step gets one gradient sum per pass
    from a compiled block, while eager autograd interleaves the passes' gradient paths (F.normalize of the X-MoE
    expert embeddings uses them twice), so their float32 sums associate differently (an ulp of those gradients)."""
    args = ["pretrain", "--config", "configs/pretrain_demo.yaml", *TINY_MODEL, "model.moe.recompute=true",
            "model.grad_checkpointing=true", "train.ema_decay=0.9", "train.batch_size=8", "train.steps=3",
            "train.log_every=1", "train.ckpt_every=2", "train.keep_last=3", "optim.warmup_steps=2",
            f"pretrain_data.shards={world / 'shards'}", "pretrain_data.shuffle_buffer=20"]
    compiled = ["train.compile=true", "train.compile_backend=aot_eager"]
    eager_run, compiled_run = tmp_path / "eager", tmp_path / "compiled"
    _train([*args, f"run_dir={eager_run}"])
    _train([*args, *compiled, f"run_dir={compiled_run}"])
    assert len(_losses(compiled_run)) == 3
    for (loss, norm), (want_loss, want_norm) in zip(_losses(compiled_run).values(), _losses(eager_run).values(),
                                                    strict=True):
        assert loss == pytest.approx(want_loss, rel=1e-6) and norm == pytest.approx(want_norm, rel=1e-6)
    final = {run: load_file(run / "step-00000003" / "model.safetensors") for run in (eager_run, compiled_run)}
    assert final[eager_run].keys() == final[compiled_run].keys()  # no _orig_mod. in the names
    for name, value in final[compiled_run].items():
        torch.testing.assert_close(value, final[eager_run][name], atol=1e-6, rtol=1e-5)
    records = [json.loads(line) for line in (compiled_run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["compiled_graphs"] > 0 and records[-1]["load_imbalance_vision"] >= 1.0

    resumed = _resumed_copy(compiled_run, tmp_path / "compiled-resumed")
    _train([*args, *compiled, f"run_dir={resumed}", "--resume"])
    assert _losses(resumed) == _losses(compiled_run)
    weights = load_file(resumed / "step-00000003" / "model.safetensors")
    assert all(torch.equal(weights[k], final[compiled_run][k]) for k in final[compiled_run])
    by_eager = _resumed_copy(compiled_run, tmp_path / "eager-resumed")
    _train([*args, f"run_dir={by_eager}", "--resume"])
    assert _losses(by_eager)[3] == pytest.approx(_losses(compiled_run)[3], rel=1e-6)
