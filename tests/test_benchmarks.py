"""The MoE layer benchmark runs end to end at a small size: every layer and peer gets a row with a ratio,
timed after a warm-up that waits for page faults to stop; --breakdown sorts each step's ops into classes."""

from __future__ import annotations

import importlib.util
import json
import math
import mmap
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import alive, children

from mm_moe.config import FFNConfig
from mm_moe.moe import build_ffn

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--d", "64", "--tokens", "256", "--experts", "4", "--dense-hidden", "256", "--topk", "2", "--rounds", "1"]


def bench_moe(*args: str) -> str:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_moe.py"), *SMALL, *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout


def test_bench_moe_prints_a_ratio_for_every_layer_and_peer():
    out = bench_moe("--routing", "balanced", "skewed", "--max-warmup", "3")
    assert "freed memory kept" in out.splitlines()[0]
    for routing in ("balanced", "skewed"):  # steady state is looked for before timing, in at most 3 rounds
        warm = re.search(rf"^# top-2 {routing}: ([1-3]) warm-up rounds, the most page faults of one step in the last: \d+$",
                         out, re.M)
        assert warm, out
    layers = ["smoe", "smoe-swiglu", "xmoe", "mhmoe h=2", "mhmoe h=4", "cartesian", "HF Mixtral grouped_mm",
              "torchscale X-MoE"]
    for routing in ("balanced", "skewed"):
        for layer in layers:
            row = re.search(rf"^\| {re.escape(layer)} \| 2 \| {routing} \|.*\| (\S+)x \| [\d.-]+ \| \d+ \| (\S+)x "
                            rf"\| (\d+) \| (\d+) \|  \| \d+ \|$", out, re.M)
            assert row, f"{layer} {routing}:\n{out}"
            for ratio in (float(row.group(1)), float(row.group(2))):  # time, and bytes saved for backward
                assert math.isfinite(ratio) and ratio > 0, row.group(0)
            kernels, twin = int(row.group(3)), int(row.group(4))
            assert kernels > twin > 0, row.group(0)  # routing, dispatch and combine launch more than a dense FFN
            saved = float(row.group(2))  # counted exactly: the recomputing experts keep less than the twin, MH-MoE
            if layer in ("smoe", "xmoe"):  # (which keeps its h sub-tokens' projections too) more
                assert saved < 1, row.group(0)
            if layer == "mhmoe h=4":
                assert saved > 1, row.group(0)


def test_bench_moe_breakdown_mode_and_glibc_default():
    out = bench_moe("--breakdown", "--glibc-default", "--peers")
    assert "glibc default" in out.splitlines()[0]
    assert "| matmul | gather/scatter | activation | other | between ops | twin's matmul |" in out
    for layer in ("smoe", "smoe-swiglu", "xmoe", "mhmoe h=2", "mhmoe h=4", "cartesian"):  # six fractions a row
        row = re.search(rf"^\| {re.escape(layer)} \| 2 \| balanced \|.*\| (\S+)x \| [\d.-]+ \| \d+ \| \S+x \| \d+ \| \d+ \| "
                        rf"((?: \| \S+){{6}}) \|$", out, re.M)
        assert row, f"{layer}:\n{out}"
        ratio, fractions = float(row.group(1)), [float(f) for f in row.group(2).split(" | ")[1:]]
        assert math.isfinite(ratio) and ratio > 0, row.group(0)
        assert all(math.isfinite(f) for f in fractions) and sum(fractions[:4]) > 0, row.group(0)


class _Touch(torch.nn.Module):
    """Touches `pages` freshly mapped pages per forward: each step page-faults that many times."""

    def __init__(self, pages: int) -> None:
        super().__init__()
        self.pages = pages
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pages:
            with mmap.mmap(-1, self.pages * mmap.PAGESIZE) as m:
                for i in range(self.pages):
                    m[i * mmap.PAGESIZE] = 1
        return x * self.w


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/bench_moe.py imported as a module."""
    spec = importlib.util.spec_from_file_location("bench_moe", ROOT / "benchmarks" / "bench_moe.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_op_timer_sorts_ops_into_classes(bench):
    x, grad = torch.randn(64, 32, requires_grad=True), torch.randn(64, 32)
    dense = build_ffn(FFNConfig(kind="dense", hidden=64), 32)
    smoe = build_ffn(FFNConfig(kind="smoe", hidden=16, num_experts=4, top_k=2), 32)
    seconds = {}
    for name, module in (("dense", dense), ("smoe", smoe)):
        timer = bench.OpTimer()
        step = bench.fwd_bwd(module, x, grad, timer)[0]
        seconds[name] = timer.seconds
        assert 0 < sum(timer.seconds.values()) <= step
    assert seconds["dense"]["matmul"] > 0 and seconds["dense"]["activation"] > 0  # fc1, fc2; GELU
    assert seconds["dense"]["gather/scatter"] == 0
    assert seconds["smoe"]["gather/scatter"] > 0  # dispatch (index_select) and combine (index_add_)


def test_warm_up_runs_until_no_step_page_faults(bench):
    x, grad = torch.ones(4, requires_grad=True), torch.ones(4)
    quiet, faulting = _Touch(0), _Touch(4 * bench.STEADY_FAULTS)
    assert bench.warm_up([(quiet, quiet)], x, grad, max_rounds=5)[0] == 1
    rounds, worst = bench.warm_up([(quiet, faulting)], x, grad, max_rounds=3)
    assert rounds == 3 and worst >= 4 * bench.STEADY_FAULTS
    assert bench.fwd_bwd(faulting, x, grad)[1] >= 4 * bench.STEADY_FAULTS


def test_bench_moe_sweep_keeps_active_flops_and_expert_parameters(tmp_path):
    """--sweep: a row per layer, expert count and token count, top-E/4 over E experts of 4 x dense_hidden / E units."""
    plot = tmp_path / "sweep.png"
    out = bench_moe("--sweep", "--sweep-experts", "4", "8", "--sweep-tokens", "64", "128", "--max-warmup", "1",
                    "--peers", "grouped_mm", "--plot", str(plot))
    layer = r"smoe|mhmoe h=4|HF Mixtral grouped_mm"
    rows = re.findall(rf"^\| ({layer}) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|.* \| (\S+)x \| (\S+)x \|$", out, re.M)
    assert len(rows) == 3 * 2 * 2, out
    for layer, experts, k, hidden, _, ratio, saved in rows:
        assert int(k) == int(experts) // 4, out
        if layer != "mhmoe h=4":  # E * hidden = 4 x the twin's 256 units, k * hidden = the twin's
            assert int(experts) * int(hidden) == 4 * 256 and int(k) * int(hidden) == 256, out
        assert float(ratio) > 0 and float(saved) > 0
    assert plot.stat().st_size > 10_000


def test_bench_train_reports_throughput_saved_bytes_and_time_by_op_class_for_every_variant():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--sizes", "tiny", "--depth", "2", "--batch", "4",
           "--rounds", "1", "--breakdown"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    header = re.search(r"^\| model \| step \| (.*) \|$", out, re.M)
    assert header, out
    classes = header.group(1).split(" | ")
    assert classes == ["matmul", "gather/scatter", "activation", "norm", "routing", "other", "between ops"]
    kernels = {}
    for variant in ("dense", "smoe", "xmoe", "mhmoe", "cartesian"):
        row = re.search(rf"^\| tiny \| {variant} \| [\d.]+M \| ([\d.]+) \| ([\d.]+)x \| (\d+) MB \| ([\d.]+)x \| (\d+) \|$",
                        out, re.M)
        assert row, f"{variant}:\n{out}"
        assert float(row.group(1)) > 0 and float(row.group(4)) > 0
        kernels[variant] = int(row.group(5))
        if variant == "dense":
            assert row.group(2) == row.group(4) == "1.00"
        step, *parts = map(float, re.search(rf"^\| {variant} \| (.*) \|$", out, re.M).group(1).split(" | "))
        ms = dict(zip(classes, parts, strict=True))
        assert sum(parts) == pytest.approx(step, abs=0.05 * len(parts))  # the classes and the gaps make up the step
        assert ms["matmul"] > 0
        assert (ms["routing"] > 0) == (variant != "dense")  # softmax, top-k and the dispatch sort: MoE layers only
    assert all(kernels[v] > kernels["dense"] for v in kernels if v != "dense"), kernels  # routing, dispatch, combine


def test_ab_experts_times_both_implementations_of_the_same_model_against_dense():
    # HEAD's experts against this checkout's: the B side is swapped in from `git show`, the model and batch are shared
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ab_experts.py"), "--ref", "HEAD", "--variant", "mhmoe",
           "--batch", "4", "--rounds", "1", "depth=2"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    rows = dict(re.findall(r"^\| (dense|this checkout|HEAD) \| \d+ \| ([\d.]+)x \|$", out, re.M))
    assert set(rows) == {"dense", "this checkout", "HEAD"}, out
    assert rows["dense"] == "1.000" and float(rows["HEAD"]) > 0
    assert float(re.search(r"^step time, this checkout / HEAD: ([\d.]+)$", out, re.M).group(1)) > 0
    bad = subprocess.run([*cmd[:3], "no-such-ref"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "cannot read mm_moe/moe/experts.py at 'no-such-ref'" in bad.stderr


@pytest.mark.slow
def test_compare_variants_reports_mean_and_spread_over_seeds(tmp_path):
    """Two variants x two seeds, two runs at a time, through the script; the world's VQA set stands in for
    easy-VQA (the same file formats) so the smoke test stays small."""
    from mm_moe.data import write_world

    world = tmp_path / "world"
    write_world(world, n_train=40, n_val=4, n_test=4, n_pairs_train=40, n_pairs_dev=4, size=32, shard_count=8)
    out = tmp_path / "compare"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare_variants.py"), "--world", str(world), "--easyvqa",
           str(world / "vqa"), "--out", str(out), "--seeds", "2", "--jobs", "2", "--variants", "dense", "cartesian",
           "--batch-size", "8", "--pretrain-steps", "2", "--vqa-steps", "4", "--nlvr2-steps", "2", "--easyvqa-steps", "2"]
    subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert sorted((r["variant"], r["seed"]) for r in runs) == [("cartesian", 0), ("cartesian", 1), ("dense", 0), ("dense", 1)]
    for r in runs:
        assert all(math.isfinite(r[k]) for k in ("mlm_loss", "vqa", "nlvr2", "easyvqa", "tokens_per_s")), r
        assert sorted(r["vqa_curve"]) == ["1", "2", "3", "4"]  # validated every quarter of the steps
        assert sorted(r["nlvr2_curve"]) == ["1", "2"] and r["nlvr2_curve"]["2"] == r["nlvr2"]
        assert (r["activation_ratio"] is None) == (r["variant"] == "dense")
    cart = next(r for r in runs if r["variant"] == "cartesian")
    assert 0 < cart["activation_ratio"] <= 1 and cart["top1_disabled"] > 0
    assert set(cart["activation_by_modality"]) == {"vision", "language"}
    table = (out / "compare.md").read_text()
    for variant in ("dense", "cartesian"):
        row = re.search(rf"^\| {variant} \| [\d.]+M \| [\d.]+ \| ([\d.]+) ± ([\d.]+) \|", table, re.M)
        assert row, table
        losses = [r["mlm_loss"] for r in runs if r["variant"] == variant]
        assert float(row.group(1)) == pytest.approx(sum(losses) / 2, abs=1e-3)
    for r in runs:  # every run's own figures, below the means
        assert f"| {r['variant']} | {r['seed']} | {r['mlm_loss']:.3f} | {r['vqa']:.1f} | {r['nlvr2']:.1f} |" in table
    assert re.search(r"^NLVR2 dev accuracy of the statement's wording alone .*: [\d.]+$", table, re.M)
    assert (out / "compare.png").stat().st_size > 0
    seeds = [r for r in runs if r["variant"] == "dense"]
    assert seeds[0]["mlm_loss"] != seeds[1]["mlm_loss"]  # the seed reaches the weights
    (out / "cartesian-seed1" / "result.json").unlink()  # --report tabulates what is finished and runs nothing
    again = subprocess.run([*cmd, "--report"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "3 runs" in again and not (out / "cartesian-seed1" / "result.json").exists()
    assert re.search(r"^\| cartesian \| [\d.]+M \| [\d.]+ \| [\d.]+ \|", again, re.M)  # one seed: no spread


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the workers' end with the sweep uses prctl")
def test_a_killed_sweep_stops_its_runs_with_a_checkpoint_and_marks_nothing_done(tmp_path):
    """SIGKILL of compare_variants.py's own process (no handler runs): its pool worker gets SIGTERM, so the run in
    it stops at the next step with a checkpoint, is not marked done, and no process is left training."""
    from mm_moe.data import write_world
    from mm_moe.engine import latest_checkpoint

    world = tmp_path / "world"
    write_world(world, n_train=40, n_val=4, n_test=4, n_pairs_train=40, n_pairs_dev=4, size=32, shard_count=8)
    out = tmp_path / "compare"
    sweep = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "compare_variants.py"), "--world", str(world),
                              "--out", str(out), "--seeds", "1", "--jobs", "1", "--variants", "dense", "--batch-size",
                              "8", "--pretrain-steps", "5000", "--vqa-steps", "0", "--nlvr2-steps", "0",
                              "--easyvqa-steps", "0"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = out / "dense-seed0" / "pretrain"
    t0 = time.time()
    while not (run / "metrics.jsonl").is_file() and time.time() - t0 < 180:
        time.sleep(0.5)
    assert (run / "metrics.jsonl").is_file(), "the sweep did not start training"
    workers = children(sweep.pid)
    sweep.kill()
    sweep.wait()
    t0 = time.time()
    while any(map(alive, workers)) and time.time() - t0 < 60:
        time.sleep(0.5)
    assert workers and not any(map(alive, workers))
    stopped = latest_checkpoint(run)
    assert stopped is not None and int(stopped.name[5:]) < 5000
    assert not (run / "done").exists() and not (out / "dense-seed0" / "result.json").exists()


def test_activation_experts_reports_both_bars_entropy_and_robustness_over_seeds(tmp_path, monkeypatch):
    """SMoE and MH-MoE with 4 experts, two seeds, through the script: equal active FLOPs, each run's figures are
    its analysis's, the table's means are the seeds' means, and the plot is written."""
    from mm_moe.data import write_world
    from mm_moe.moe import ffn_cost

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when run as a script: its folder comes first
    spec = importlib.util.spec_from_file_location("activation_experts", ROOT / "benchmarks" / "activation_experts.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    runs = script.configs([4])
    assert [(c.kind, c.num_experts, c.top_k) for c in runs.values()] == [("smoe", 4, 1), ("mhmoe", 4, 2)]
    d_model = script.base_model().d_model
    smoe, mhmoe = ffn_cost(runs["smoe-E4"], d_model), ffn_cost(runs["mhmoe-E4"], d_model)
    assert smoe.core_flops == mhmoe.core_flops  # matmuls, head and merge projections included
    assert mhmoe.flops == pytest.approx(smoe.flops, rel=0.02)  # + routers, biases, sub-LN

    world = tmp_path / "world"
    write_world(world, n_train=40, n_val=4, n_test=4, n_pairs_train=40, n_pairs_dev=4, size=32, shard_count=8)
    out = tmp_path / "activation"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "activation_experts.py"), "--world", str(world),
                    "--out", str(out), "--experts", "4", "--seeds", "2", "--jobs", "2", "--batch-size", "8",
                    "--pretrain-steps", "2"], capture_output=True, text=True, check=True, cwd=ROOT)
    results = json.loads((out / "activation.json").read_text())["runs"]
    assert sorted((r["model"], r["experts"], r["seed"]) for r in results) == [
        ("mhmoe", 4, 0), ("mhmoe", 4, 1), ("smoe", 4, 0), ("smoe", 4, 1)]
    for r in results:
        analysis = json.loads((out / f"{r['variant']}-seed{r['seed']}" / "analysis" / "analysis.json").read_text())
        assert r["activation_ratio"] == analysis["activation_ratio"]
        assert r["activation_over_1pct"] == analysis["activation_ratio_over_1pct"]
        assert r["load_entropy"] == analysis["load_entropy"] and 0 < r["load_entropy"] <= 1
        assert r["top1_disabled"] == pytest.approx(analysis["top1_disabled"]["perplexity_ratio"])
    table = (out / "activation.md").read_text()
    for model in ("smoe", "mhmoe"):
        row = re.search(rf"^\| {model} \| 4 \| 2 \| ([\d.]+) ± [\d.]+ \|", table, re.M)
        assert row, table
        values = [100 * r["activation_ratio"] for r in results if r["model"] == model]
        assert float(row.group(1)) == pytest.approx(sum(values) / 2, abs=0.051)
    assert (out / "activation.png").stat().st_size > 0


def test_easyvqa_curves_scores_by_question_kind(tmp_path, monkeypatch):
    """The curves script trains through build_task and prints, every --every steps, accuracies by kind on fixed
    samples; the kinds are those of easy-VQA's questions (negated ones included)."""
    from mm_moe.data import world_files, write_world

    spec = importlib.util.spec_from_file_location("easyvqa_curves", ROOT / "benchmarks" / "easyvqa_curves.py")
    curves = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, curves)
    spec.loader.exec_module(curves)
    assert curves.kind("is there not a red shape?", "yes") == "yn_color"
    assert curves.kind("does the image contain a circle?", "no") == "yn_shape"
    assert curves.kind("what is the blue shape?", "rectangle") == "open_shape"
    assert curves.kind("what color is the shape?", "teal") == "open_color"
    world = tmp_path / "world"
    write_world(world, n_train=40, n_val=8, n_test=4, n_pairs_train=4, n_pairs_dev=4, size=32, shard_count=2)
    files = [f"{k}={v}" for k, v in world_files(world).items() if k.startswith("data.vqa_")]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "easyvqa_curves.py"), "--every", "2", "--sample", "30",
           "--variant", "smoe", "train.steps=4", "train.batch_size=4", *files]
    lines = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert set(r["val"]) >= {"all", "open_color", "open_shape"} and 0 <= r["val"]["all"] <= 100
        assert math.isfinite(r["loss"])


def test_easyvqa_curves_scores_a_results_file_by_kind(tmp_path, monkeypatch):
    """--results: exact match by kind on four hand-labelled questions, yes/no split by whether the named colour
    or shape is the image's; the CLI reads the config's validation files; a missing answer is named."""
    spec = importlib.util.spec_from_file_location("easyvqa_curves", ROOT / "benchmarks" / "easyvqa_curves.py")
    curves = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, curves)
    spec.loader.exec_module(curves)
    items = [("is there a red shape?", "yes", "yes"),  # red is the image's: yn_color+, right
             ("is there not a red shape?", "yes", "no"),  # red is not the image's: yn_color-, wrong
             ("does the image contain a circle?", "no", "no"),  # yn_shape-, right
             ("what color is the shape?", "teal", "teal")]
    questions, annotations, results = (tmp_path / n for n in ("q.json", "a.json", "r.json"))
    questions.write_text(json.dumps({"questions": [{"question_id": i, "image_id": 0, "question": q}
                                                   for i, (q, _, _) in enumerate(items)]}))
    annotations.write_text(json.dumps({"annotations": [{"question_id": i, "multiple_choice_answer": a}
                                                       for i, (_, a, _) in enumerate(items)]}))
    results.write_text(json.dumps([{"question_id": i, "answer": p} for i, (_, _, p) in enumerate(items)]))
    expected = {"all": 75.0, "open_color": 100.0, "yn_color+": 100.0, "yn_color-": 0.0, "yn_shape-": 100.0}
    assert curves.score_results(str(results), str(questions), str(annotations)) == expected
    cmd = [sys.executable, str(ROOT / "benchmarks" / "easyvqa_curves.py"), "--results", str(results),
           f"data.vqa_val_questions={questions}", f"data.vqa_val_annotations={annotations}"]
    assert json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout) == expected
    results.write_text(json.dumps([{"question_id": 0, "answer": "yes"}]))
    with pytest.raises(KeyError, match=r"r\.json: no answer for question 1"):
        curves.score_results(str(results), str(questions), str(annotations))


@pytest.mark.slow
def test_the_prepared_gpu_benchmark_runs_its_whole_flow_at_toy_sizes(tmp_path):
    """bench_gpu.py (make bench-gpu) on the CPU at toy sizes: both parts run, eager and compiled side by side, and
    the report holds a row per layer and token count and per model, mode and batch."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--quick", "--backend",
           "aot_eager", "--variants", "smoe", "--out", str(tmp_path)]
    subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    report = (tmp_path / "report.md").read_text()
    for layer in ("smoe", "mhmoe h=4", "cartesian"):
        for tokens in (64, 128):
            row = re.search(rf"^\| {re.escape(layer)} \| {tokens} \|((?: [\d.]+x? \|){{9}}) \d+ / \d+ \|$", report, re.M)
            assert row, f"{layer} {tokens}:\n{report}"
    for model in ("dense", "smoe"):
        for mode in ("eager", "compiled"):
            assert re.search(rf"^\| 2 \| {model} \| {mode} \| [\d.]+ \| [\d.]+x \|", report, re.M), f"{model} {mode}:\n{report}"


def test_bench_checkpoint_times_sync_and_background_saves_and_bench_data_both_readers():
    """One row per size with every time measured; the data benchmark compares the two readers at each worker
    count."""
    def run(*cmd: str) -> str:
        return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, check=True, cwd=ROOT).stdout

    out = run("benchmarks/bench_checkpoint.py", "--sizes", "tiny", "--rounds", "1")
    row = next(line for line in out.splitlines() if line.startswith("| tiny |")).strip("|").split("|")
    sync, no_export, background, written = (float(v) for v in row[2:6])
    assert min(sync, no_export, background, written) > 0 and written >= background
    out = run("benchmarks/bench_data.py", "--img-size", "32", "--pairs", "90", "--batch-size", "4", "--workers", "0")
    assert "indexing the shards once" in out
    rates = next(line for line in out.splitlines() if line.startswith("| 0 |")).strip("|").split("|")
    assert float(rates[1]) > 0 and float(rates[2]) > 0


def test_bench_moe_ops_times_each_op_against_what_it_replaces():
    """One row per size with every time measured and the ratio of the two."""
    out = subprocess.run([sys.executable, "benchmarks/bench_moe_ops.py", "--tokens", "64", "--rounds", "1"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    rows = [line.strip("|").split("|") for line in out.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert len(rows) == 4 + 4, out
    for row in rows:
        assert all(float(v.strip().rstrip("x")) > 0 for v in row[2:]), row
