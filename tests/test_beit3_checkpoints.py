"""The path from a released BEiT-3 checkpoint, offline: a BEiT-3 built with torchscale (base width, 2 layers to
fit CI) saved in unilm's .pth layout, and a SentencePiece model trained here, read as unilm reads beit3.spm.
Through the CLI: fine-tune VQA at another image size, upcycle to MH-MoE / CartesianMoE and pretrain, then answer
and caption with the inference API from the saved runs."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_scripts import script
from PIL import Image
from safetensors.torch import load_file
from tiny import TINY_MODEL

from mm_moe.config import BEiT3Config, FFNConfig, RunConfig
from mm_moe.config_files import load_config
from mm_moe.data import check_tokenizer, load_tokenizer
from mm_moe.engine.init_weights import fit_positions, init_encoder
from mm_moe.errors import InputError
from mm_moe.inference import Captioner, NLVR2Predictor, VQAPredictor
from mm_moe.inference import main as predict_main
from mm_moe.model import BEiT3, BEiT3ForPretraining, BEiT3ForVQA

ROOT = Path(__file__).resolve().parents[1]
train_mm = script("train_mm.py")
SPARE = 8  # like BEiT-3: 64010 embedding rows for a 64002-token tokenizer
BEIT3_BASE = [f"model={ROOT / 'configs/model/beit3_base.yaml'}", "model.depth=2"]
RUN = ["train.batch_size=4", "train.steps=2", "train.log_every=1", "train.num_workers=0"]


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory, world) -> Path:
    """A SentencePiece unigram model trained on the world's captions and questions (the sentencepiece package)."""
    import sentencepiece

    karpathy = json.loads((world / "coco/dataset_coco.json").read_text())
    text = [s["raw"] for im in karpathy["images"] for s in im["sentences"]]
    text += [q["question"] for q in json.loads((world / "vqa/v2_OpenEnded_mscoco_train2014_questions.json")
                                                  .read_text())["questions"]]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=120,
                                             hard_vocab_limit=False, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "beit3.spm"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def vocab_rows(spm_file) -> int:
    return len(load_tokenizer(spm_file)) + SPARE


def torchscale():
    """torchscale's BEiT3 module and EncoderConfig: the tests that compare with torchscale (the test-only peer that
    `make test` installs) skip without it, saying so; the others here do not need it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torchscale imports timm.models.layers
        beit3 = pytest.importorskip("torchscale.model.BEiT3")
        from torchscale.architecture.config import EncoderConfig
    return beit3, EncoderConfig


def torchscale_model(vocab_size: int, layers: int = 2, **kw) -> torch.nn.Module:
    """A torchscale BEiT3 with unilm beit3's `_get_base_config` settings (base width), every weight non-trivial."""
    torchscale_beit3, EncoderConfig = torchscale()
    torch.manual_seed(0)
    cfg = EncoderConfig(multiway=True, layernorm_embedding=False, normalize_output=True, no_output_layer=True,
                        img_size=224, patch_size=16, vocab_size=vocab_size, encoder_embed_dim=768,
                        encoder_attention_heads=12, encoder_ffn_embed_dim=3072, encoder_layers=layers, **kw)
    model = torchscale_beit3.BEiT3(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def released(tmp_path_factory, vocab_rows) -> tuple[torch.nn.Module, Path]:
    """(the torchscale model, its unilm-layout .pth: {"model": {"beit3.<torchscale key>": tensor}})."""
    theirs = torchscale_model(vocab_rows)
    path = tmp_path_factory.mktemp("released") / "beit3_base_patch16_224.pth"
    torch.save({"model": {f"beit3.{k}": v for k, v in theirs.state_dict().items()}}, path)
    return theirs, path


def model_cfg(spm_file: Path, rows: int, *more: str) -> BEiT3Config:
    overrides = [o.removeprefix("model.") for o in BEIT3_BASE[1:]]
    return load_config(BEiT3Config, ROOT / "configs/model/beit3_base.yaml",
                       [*overrides, f"vocab_size={rows}", f"tokenizer={spm_file}", *more])


def beit3_args(spm_file: Path, rows: int) -> list[str]:
    return [*BEIT3_BASE, f"model.vocab_size={rows}", f"model.tokenizer={spm_file}", *RUN]


def images_of(world: Path, n: int) -> list[Path]:
    return sorted((world / "vqa/images").rglob("*.png"))[:n]


# --- tokenizer --------------------------------------------------------------------------------------------------
def test_sentencepiece_ids_are_unilm_fairseq_ids(spm_file):
    """XLMRobertaTokenizer over beit3.spm: <s> text </s>, every piece id + 1, <unk> = 3 (fairseq's dictionary)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))
    tok = load_tokenizer(spm_file)
    assert (tok.cls_token_id, tok.pad_token_id, tok.sep_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token_id == len(tok) - 1 == sp.get_piece_size() + 1
    for text in ["a red circle at the top left.", "what color is the square? zebra"]:
        expected = [3 if i == sp.unk_id() else i + 1 for i in sp.encode(text)]
        assert tok(text)["input_ids"] == [0, *expected, 2]


def test_tokenizer_must_fit_the_text_embedding(spm_file):
    wordpiece = load_tokenizer()
    check_tokenizer(wordpiece, 30522)
    with pytest.raises(InputError, match=r"30522 tokens but model.vocab_size=64010.*made for another tokenizer"):
        check_tokenizer(wordpiece, 64010)
    sp = load_tokenizer(spm_file)
    check_tokenizer(sp, len(sp) + SPARE)
    with pytest.raises(InputError, match="would overflow"):
        check_tokenizer(sp, len(sp) - 1)


def test_beit3_config_without_its_tokenizer_is_a_one_line_error(tmp_path, capsys, world):
    argv = ["finetune", "vqa", "--config", str(ROOT / "configs/finetune_vqa_demo.yaml"), *BEIT3_BASE, *RUN,
            f"run_dir={tmp_path / 'r'}", f"data.vqa_train_questions={world}/vqa/v2_OpenEnded_mscoco_train2014_questions.json",
            f"data.vqa_train_annotations={world}/vqa/v2_mscoco_train2014_annotations.json",
            f"data.vqa_images={world}/vqa/images", "data.vqa_val_questions=''"]
    assert train_mm.main(argv) == 1
    assert "model.tokenizer=beit3.spm: no such file or folder" in capsys.readouterr().err
    assert train_mm.main([*argv, "model.tokenizer=bert-base-uncased"]) == 1
    assert "the tokenizer has 30522 tokens but model.vocab_size=64010" in capsys.readouterr().err


# --- loading a released checkpoint ---------------------------------------------------------------------------
def test_resampled_vision_positions_equal_a_direct_bicubic_interpolation():
    torch.manual_seed(0)
    source = {"vision.pos_embed": torch.randn(1, 1 + 14 * 14, 8), "text.pos_embed": torch.randn(1, 1022, 8)}
    target = {"vision.pos_embed": torch.zeros(1, 1 + 30 * 30, 8), "text.pos_embed": torch.zeros(1, 40, 8)}
    original = {k: v.clone() for k, v in source.items()}
    changed = fit_positions(source, target)
    assert changed == ["vision.pos_embed: 14x14 -> 30x30 patches (resampled)", "text.pos_embed: first 40 of 1022 positions"]
    grid = original["vision.pos_embed"][0, 1:].reshape(14, 14, 8).permute(2, 0, 1)[None]
    direct = F.interpolate(grid, size=(30, 30), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(900, 8)
    torch.testing.assert_close(source["vision.pos_embed"][0, 1:], direct, rtol=0, atol=1e-6)
    assert torch.equal(source["vision.pos_embed"][0, 0], original["vision.pos_embed"][0, 0])  # [CLS] kept
    assert torch.equal(source["text.pos_embed"], original["text.pos_embed"][:, :40])


def test_public_base_and_large_configs_take_full_size_released_checkpoints(tmp_path, vocab_rows):
    """configs/model/beit3_base.yaml and beit3_large.yaml build exactly the torchscale models of unilm's
    `_get_base_config` / `_get_large_config` (vocab 64010, 1024 text positions): same parameters, names converted."""
    from mm_moe.model import convert_torchscale_state_dict

    torchscale_beit3, EncoderConfig = torchscale()
    for name, d, heads, ffn, depth in (("beit3_base", 768, 12, 3072, 12), ("beit3_large", 1024, 16, 4096, 24)):
        with torch.device("meta"):
            cfg = EncoderConfig(multiway=True, layernorm_embedding=False, normalize_output=True, no_output_layer=True,
                                img_size=224, patch_size=16, vocab_size=64010, encoder_embed_dim=d,
                                encoder_attention_heads=heads, encoder_ffn_embed_dim=ffn, encoder_layers=depth)
            theirs = {k: v for k, v in torchscale_beit3.BEiT3(cfg).state_dict().items()}
            ours = BEiT3(load_config(BEiT3Config, ROOT / f"configs/model/{name}.yaml")).state_dict()
        converted = convert_torchscale_state_dict(theirs)
        assert converted.keys() == ours.keys()
        assert all(converted[k].shape == ours[k].shape for k in ours), name


def test_init_from_the_pth_at_another_image_size_matches_torchscale(released, spm_file, vocab_rows):
    """--init of the .pth at 256px: every encoder weight loaded (positions resampled); at 224px our forward is
    torchscale's."""
    theirs, pth = released
    model = BEiT3ForVQA(model_cfg(spm_file, vocab_rows, "img_size=256", "max_text_len=32"), 5)
    report = init_encoder(model, pth)
    assert not report["missing"] and not report["unexpected"] and not report["mismatched"]
    assert report["adapted"] == ["vision.pos_embed: 14x14 -> 16x16 patches (resampled)",
                                 "text.pos_embed: first 32 of 1022 positions"]
    same = BEiT3ForVQA(model_cfg(spm_file, vocab_rows, "max_text_len=32"), 5)
    assert init_encoder(same, pth)["adapted"] == ["text.pos_embed: first 32 of 1022 positions"]
    g = torch.Generator().manual_seed(0)
    images, ids = torch.randn(2, 3, 224, 224, generator=g), torch.randint(4, vocab_rows - SPARE, (2, 12), generator=g)
    ref = theirs(textual_tokens=ids, visual_tokens=images)["encoder_out"]
    torch.testing.assert_close(same.eval().beit3(images, ids).hidden, ref, atol=1e-4, rtol=1e-4)


def test_upcycle_of_the_pth_to_renormalized_smoe_reproduces_torchscale(released, spm_file, vocab_rows):
    theirs, pth = released
    moe = "moe={kind: smoe, hidden: 3072, num_experts: 3, top_k: 2, renormalize: true, subln: true}"
    model = BEiT3ForVQA(model_cfg(spm_file, vocab_rows, moe, "moe_layers=all"), 5)
    report = init_encoder(model, pth, upcycle=True)
    assert report["upcycle_copied"] and not report["upcycle_sliced"]
    assert all(".router." in k for k in report["upcycle_new"])
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 224, 224, generator=g)
    ref = theirs(visual_tokens=images)["encoder_out"]
    torch.testing.assert_close(model.eval().beit3(images).hidden, ref, atol=1e-4, rtol=1e-4)


# --- through the CLI, then the inference API ------------------------------------------------------------------
def vqa_finetune(run: Path, world: Path, spm_file: Path, vocab_rows: int, *init: str) -> Path:
    """VQA fine-tuned for 2 steps at 256px (BEiT-3 base width, 2 layers, the SentencePiece tokenizer) through
    train_mm.py."""
    assert train_mm.main(["finetune", "vqa", "--config", str(ROOT / "configs/finetune_vqa_demo.yaml"),
                          *beit3_args(spm_file, vocab_rows), "model.img_size=256", "model.max_text_len=32",
                          f"run_dir={run}", *init,
                          f"data.vqa_train_questions={world}/vqa/v2_OpenEnded_mscoco_train2014_questions.json",
                          f"data.vqa_train_annotations={world}/vqa/v2_mscoco_train2014_annotations.json",
                          f"data.vqa_images={world}/vqa/images", "data.vqa_val_questions=''"]) == 0
    return run


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory, world, spm_file, vocab_rows) -> Path:
    """A VQA run the predictor tests read (no torchscale needed)."""
    return vqa_finetune(tmp_path_factory.mktemp("vqa") / "run", world, spm_file, vocab_rows)


@pytest.mark.slow
def test_vqa_finetune_from_the_pth_at_256px(tmp_path, world, released, spm_file, vocab_rows):
    vqa_run = vqa_finetune(tmp_path / "run", world, spm_file, vocab_rows, "--init", str(released[1]))
    records = [json.loads(line) for line in (vqa_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    weights = load_file(str(vqa_run / "step-00000002" / "model.safetensors"))
    assert weights["beit3.vision.pos_embed"].shape == (1, 1 + 16 * 16, 768)
    theirs = released[0].state_dict()
    assert not torch.equal(weights["beit3.encoder.blocks.0.attn.q.v.weight"],
                           theirs["encoder.layers.0.self_attn.q_proj.A.weight"])  # trained
    assert (vqa_run / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_vqa_predictor_answers_like_the_model_run_by_hand(vqa_run, world, spm_file, tmp_path):
    """The API's answers equal the model's output on inputs built by hand (sentencepiece ids + 1, PIL resize)."""
    import sentencepiece

    predictor = VQAPredictor.from_pretrained(vqa_run)
    image, question = images_of(world, 1)[0], "what color is the circle?"
    answers = predictor.answer(image, question, top_k=3)
    assert len(answers) == 3 and answers == sorted(answers, key=lambda a: -a[1])
    cfg = load_config(RunConfig, vqa_run / "config.yaml")
    vocab = json.loads((vqa_run / "answers.json").read_text())
    model = BEiT3ForVQA(cfg.model, len(vocab))
    model.load_state_dict(load_file(str(vqa_run / "step-00000002" / "model.safetensors")))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))
    ids = torch.tensor([[0, *[i + 1 for i in sp.encode(question)], 2]])
    pixels = Image.open(image).convert("RGB").resize((256, 256), Image.Resampling.BILINEAR)
    x = (torch.from_numpy(np.array(pixels)).float().permute(2, 0, 1)[None] / 255 - 0.5) / 0.5
    scores = model.eval()(x, ids).logits.sigmoid()[0]
    top = scores.topk(3)
    assert [a for a, _ in answers] == [vocab[i] for i in top.indices.tolist()]
    assert [s for _, s in answers] == pytest.approx(top.values.tolist(), abs=2e-3)  # PIL vs torchvision resize
    # batched equals one by one; save_pretrained round-trips to the same answers
    pairs = [(im, q) for im in images_of(world, 2) for q in ("what shape is at the top left?", "how many shapes?")]
    batched = predictor.answer([p[0] for p in pairs], [p[1] for p in pairs])
    singles = [predictor.answer(im, q) for im, q in pairs]
    for b, s in zip(batched, singles, strict=True):
        assert [a for a, _ in b] == [a for a, _ in s] and [v for _, v in b] == pytest.approx([v for _, v in s], abs=1e-5)
    again = VQAPredictor.from_pretrained(predictor.save_pretrained(tmp_path / "export"))
    assert again.answer([p[0] for p in pairs], [p[1] for p in pairs]) == batched
    assert again.tokenizer(question)["input_ids"] == ids[0].tolist()
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["answers.json", "config.yaml", "manifest.json",
                                                                       "model.safetensors", "tokenizer"]


@pytest.mark.slow
def test_predict_command_line(vqa_run, world, capsys):
    image = images_of(world, 1)[0]
    assert predict_main(["vqa", str(vqa_run), "--image", str(image), "--question", "what color is the circle?",
                         "--question", "how many shapes?", "--top-k", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["question"] for line in lines] == ["what color is the circle?", "how many shapes?"]
    assert lines[0]["answers"] == [list(a) for a in VQAPredictor.from_pretrained(vqa_run).answer(
        image, "what color is the circle?", top_k=2)]
    assert predict_main(["caption", str(vqa_run), "--image", str(image)]) == 1
    assert "a 'vqa' model, not 'caption'" in capsys.readouterr().err


@pytest.mark.slow
def test_caption_finetune_and_the_captioner(tmp_path, world, spm_file, vocab_rows):
    run = tmp_path / "caption"
    assert train_mm.main(["finetune", "caption", "--config", str(ROOT / "configs/finetune_caption_demo.yaml"),
                          *beit3_args(spm_file, vocab_rows), "model.max_text_len=24", f"run_dir={run}",
                          f"data.karpathy={world}/coco/dataset_coco.json",
                          f"data.coco_images={world}/vqa/images", "data.caption_beam=1"]) == 0
    captioner = Captioner.from_pretrained(run)
    images = images_of(world, 2)
    captions = captioner.caption(images, beam=2)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert captioner.caption(images[1], beam=2) == captions[1]
    ids = captioner.tokenizer(captions[0])["input_ids"]
    assert all(0 <= i < len(captioner.tokenizer) for i in ids)
    assert (run / "eval.json").is_file()  # the end-of-run validation captioned the val split with the same model


@pytest.mark.slow
def test_nlvr2_predictor(tmp_path, world):
    run = tmp_path / "nlvr2"
    assert train_mm.main(["finetune", "nlvr2", "--config", str(ROOT / "configs/finetune_nlvr2_demo.yaml"), *TINY_MODEL, *RUN,
                          f"run_dir={run}", f"data.nlvr2_train={world}/nlvr2/train.json",
                          f"data.nlvr2_dev={world}/nlvr2/dev.json", f"data.nlvr2_images={world}/nlvr2/images"]) == 0
    predictor = NLVR2Predictor.from_pretrained(run)
    row = json.loads((world / "nlvr2/dev.json").read_text().splitlines()[0])
    pair = sorted((world / "nlvr2/images").rglob(f"{row['identifier'].rsplit('-', 1)[0]}-img*.png"))
    truth, p_true = predictor.predict(pair[0], pair[1], row["sentence"])
    assert truth == (p_true > 0.5) and 0 <= p_true <= 1
    assert predictor.predict([pair[0]], [pair[1]], [row["sentence"]]) == [(truth, p_true)]


@pytest.mark.slow
@pytest.mark.parametrize("moe", [
    "{kind: mhmoe, heads: 4, num_experts: 8, top_k: 2, hidden: 768, subln: true}",
    "{kind: cartesian, num_experts: 4, top_k: 2, hidden: 1536, num_shared_experts: 1, shared_hidden: 1536, subln: true}",
])
def test_upcycle_the_pth_and_pretrain(tmp_path, world, released, spm_file, vocab_rows, moe, capsys):
    run = tmp_path / "pretrain"
    assert train_mm.main(["pretrain", "--config", str(ROOT / "configs/pretrain_demo.yaml"),
                          *beit3_args(spm_file, vocab_rows), "model.max_text_len=32", f"model.moe={moe}",
                          "model.moe_layers=every_other", f"run_dir={run}", f"pretrain_data.shards={world}/shards",
                          "--init", str(released[1]), "--upcycle"]) == 0
    err = capsys.readouterr().err
    assert "new: encoder.blocks.1.ffn.v." in err and "new: encoder.blocks.0." not in err
    summary = next(line for line in err.splitlines() if "upcycled" in line)
    assert "0 copied" in summary and "0 sliced" not in summary
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "loss" in r]) == 2
    model = BEiT3ForPretraining(load_config(RunConfig, run / "config.yaml").model)
    model.load_state_dict(load_file(str(run / "step-00000002" / "model.safetensors")), strict=False)
    ffn = model.beit3.encoder.blocks[1].ffn.v
    assert type(ffn).__name__ == ("MHMoE" if "mhmoe" in moe else "CartesianMoE")


def test_upcycle_needs_moe_layers_and_a_dense_checkpoint(released, spm_file, vocab_rows):
    from mm_moe.engine.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no MoE layers to upcycle into"):
        init_encoder(BEiT3ForVQA(model_cfg(spm_file, vocab_rows), 3), released[1], upcycle=True)
    bad = FFNConfig(kind="smoe", hidden=1000, num_experts=2, subln=True)
    with pytest.raises(CheckpointError, match="expert hidden 1000 must equal the dense FFN's 3072"):
        init_encoder(BEiT3ForVQA(model_cfg(spm_file, vocab_rows, f"moe={json.dumps(bad.__dict__)}", "moe_layers=all"), 3),
                     released[1], upcycle=True)
