"""Write image-caption pairs as webdataset shards: {key}.jpg|png, {key}.txt (caption), {key}.json (metadata).

Sources:
  --coco CAPTIONS.json --images DIR            COCO captions format (images[{id, file_name}], annotations[{image_id, caption}])
  --karpathy dataset_coco.json --images DIR    Karpathy splits (--splits train restval by default)
  --captions FILE.jsonl|.tsv --images DIR      {"image": relative path, "caption": text} lines, or path<TAB>caption

    python data/make_shards.py --karpathy dataset_coco.json --images coco/ --out shards/coco --max-size-mb 500
Unreadable images are skipped and reported; keys never contain dots (webdataset splits key and extension there).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm


def coco_pairs(path: Path, images: Path) -> Iterator[tuple[Path, str, dict]]:
    data = json.loads(path.read_text())
    for field in ("images", "annotations"):
        if field not in data:
            raise KeyError(f"{path}: missing top-level {field!r} (COCO captions format)")
    files = {im["id"]: im["file_name"] for im in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        if "image_id" not in ann or "caption" not in ann:
            raise KeyError(f"{path}: annotations[{i}] needs 'image_id' and 'caption'")
        if ann["image_id"] not in files:
            raise KeyError(f"{path}: annotations[{i}] refers to unknown image_id {ann['image_id']}")
        yield images / files[ann["image_id"]], ann["caption"], {"image_id": ann["image_id"]}


def karpathy_pairs(path: Path, images: Path, splits: list[str]) -> Iterator[tuple[Path, str, dict]]:
    data = json.loads(path.read_text())
    if "images" not in data:
        raise KeyError(f"{path}: missing top-level 'images' (Karpathy dataset_coco.json format)")
    for i, im in enumerate(data["images"]):
        for field in ("filename", "split", "sentences"):
            if field not in im:
                raise KeyError(f"{path}: images[{i}] has no {field!r}")
        if im["split"] in splits:
            for s in im["sentences"]:
                yield images / im.get("filepath", "") / im["filename"], s["raw"], {"cocoid": im.get("cocoid")}


def caption_file_pairs(path: Path, images: Path) -> Iterator[tuple[Path, str, dict]]:
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            row = json.loads(line)
            if "image" not in row or "caption" not in row:
                raise KeyError(f"{path}:{n}: a line needs 'image' and 'caption'")
            yield images / row["image"], row["caption"], {}
        else:
            parts = line.split("\t", 1)
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected 'image path<TAB>caption'")
            yield images / parts[0], parts[1], {}


def encode_image(path: Path) -> tuple[bytes, str]:
    """The file's bytes and extension if PIL can fully decode it; raises otherwise."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        fmt = (im.format or "").lower()
    if fmt in ("jpeg", "png", "webp"):
        return data, {"jpeg": "jpg"}.get(fmt, fmt)
    buf = io.BytesIO()  # other formats are re-encoded as PNG
    with Image.open(io.BytesIO(data)) as im:
        im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue(), "png"


def write_shards(pairs: Iterator[tuple[Path, str, dict]], out: Path, prefix: str = "shard",
                 max_count: int = 10000, max_size_mb: float = 1000.0, total: int | None = None) -> dict:
    """Write pairs to out/prefix-000000.tar ...; returns counts and the unreadable images."""
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    written = 0
    seen: dict[str, int] = {}
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=max_count, maxsize=int(max_size_mb * 2**20),
                         verbose=0) as sink:
        for path, caption, meta in tqdm(pairs, total=total, desc="shards", unit="pair"):
            try:
                data, ext = encode_image(path)
            except Exception as err:
                skipped.append(f"{path}: {type(err).__name__}: {err}")
                continue
            stem = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)
            seen[stem] = seen.get(stem, -1) + 1
            key = f"{stem}_{seen[stem]}"
            sink.write({"__key__": key, ext: data, "txt": caption.strip(),
                        "json": json.dumps({"image": str(path), **meta}).encode()})
            written += 1
    return {"written": written, "skipped": skipped, "shards": sorted(str(p) for p in out.glob(f"{prefix}-*.tar"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--coco", type=Path, help="COCO captions json")
    src.add_argument("--karpathy", type=Path, help="Karpathy dataset_coco.json")
    src.add_argument("--captions", type=Path, help=".jsonl or .tsv captions file")
    p.add_argument("--images", type=Path, required=True, help="image folder the paths are relative to")
    p.add_argument("--splits", nargs="+", default=["train", "restval"], help="Karpathy splits to include")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prefix", default="shard")
    p.add_argument("--max-count", type=int, default=10000, help="samples per shard")
    p.add_argument("--max-size-mb", type=float, default=1000.0, help="size per shard")
    args = p.parse_args(argv)
    if args.coco:
        pairs = list(coco_pairs(args.coco, args.images))
    elif args.karpathy:
        pairs = list(karpathy_pairs(args.karpathy, args.images, args.splits))
    else:
        pairs = list(caption_file_pairs(args.captions, args.images))
    report = write_shards(iter(pairs), args.out, args.prefix, args.max_count, args.max_size_mb, total=len(pairs))
    print(f"wrote {report['written']} samples in {len(report['shards'])} shards to {args.out}")
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])} unreadable images:", file=sys.stderr)
        for line in report["skipped"][:20]:
            print("  " + line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
