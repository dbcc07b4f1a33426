"""Write image-caption pairs as webdataset shards: {key}.jpg|png, {key}.txt (caption), {key}.json (metadata).

Sources:
  --coco CAPTIONS.json --images DIR            COCO captions format (images[{id, file_name}], annotations[{image_id, caption}])
  --karpathy dataset_coco.json --images DIR    Karpathy splits (--splits train restval by default)
  --captions FILE.jsonl|.tsv --images DIR      {"image": relative path, "caption": text} lines, or path<TAB>caption
  --images-only --images DIR                   every image under DIR, without text (pretrain_data.image_shards)
  --texts FILE.txt                             one text per non-empty line, without image (pretrain_data.text_shards)

    python data/make_shards.py --karpathy dataset_coco.json --images coco/ --out shards/coco --max-size-mb 500
Unreadable images and empty captions are skipped and reported (no sample written at all is an error); image paths
from the data files must stay inside --images; keys never contain dots (webdataset splits key and extension there).
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

from mm_moe.errors import InputError, run_reporting


def _json(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def inside(root: Path, relative: str, where: str) -> Path:
    """root / relative, refusing paths that leave root (absolute, or climbing out with '..')."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise InputError(f"{where}: image path {relative!r} leaves the image folder {root}")
    return path


def caption_of(value: object, where: str) -> str:
    """A caption must be a string (an empty one is skipped later and reported)."""
    if not isinstance(value, str):
        raise InputError(f"{where}: caption must be a string, got {type(value).__name__} {value!r:.40}")
    return value


def coco_pairs(path: Path, images: Path) -> Iterator[tuple[Path, str, dict]]:
    data = _json(path)
    for field in ("images", "annotations"):
        if not isinstance(data.get(field), list):
            raise InputError(f"{path}: missing top-level {field!r} list (COCO captions format)")
    files = {im["id"]: im["file_name"] for im in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        if "image_id" not in ann or "caption" not in ann:
            raise InputError(f"{where} needs 'image_id' and 'caption'")
        if ann["image_id"] not in files:
            raise InputError(f"{where} refers to unknown image_id {ann['image_id']}")
        yield (inside(images, files[ann["image_id"]], where), caption_of(ann["caption"], where),
               {"image_id": ann["image_id"]})


def karpathy_pairs(path: Path, images: Path, splits: list[str]) -> Iterator[tuple[Path, str, dict]]:
    data = _json(path)
    if not isinstance(data.get("images"), list):
        raise InputError(f"{path}: missing top-level 'images' list (Karpathy dataset_coco.json format)")
    for i, im in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        for field in ("filename", "split", "sentences"):
            if field not in im:
                raise InputError(f"{where} has no {field!r}")
        if im["split"] in splits:
            image = inside(images, str(Path(im.get("filepath", "")) / im["filename"]), where)
            for j, s in enumerate(im["sentences"]):
                yield image, caption_of(s.get("raw"), f"{where}.sentences[{j}].raw"), {"cocoid": im.get("cocoid")}


def caption_file_pairs(path: Path, images: Path) -> Iterator[tuple[Path, str, dict]]:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: not valid JSON ({err})") from err
            if not isinstance(row, dict) or "image" not in row or "caption" not in row:
                raise InputError(f"{where}: a line needs 'image' and 'caption'")
            yield inside(images, str(row["image"]), where), caption_of(row["caption"], where), {}
        else:
            parts = line.split("\t", 1)
            if len(parts) != 2:
                raise InputError(f"{where}: expected 'image path<TAB>caption'")
            yield inside(images, parts[0], where), parts[1], {}


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def folder_images(images: Path) -> Iterator[tuple[Path, None, dict]]:
    """Every image file under `images` (by suffix, recursively, in path order), without text."""
    for path in sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        yield path, None, {}


def text_lines(path: Path) -> Iterator[tuple[None, str, dict]]:
    """Each non-empty line of a UTF-8 text file as a text without image, keyed by its line number."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield None, line, {"key": f"line{number:09d}", "line": number}
        except UnicodeDecodeError as err:
            raise InputError(f"{path}: not UTF-8 text after line {number} ({err})") from err


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


def write_shards(pairs: Iterator[tuple[Path | None, str | None, dict]], out: Path, prefix: str = "shard",
                 max_count: int = 10000, max_size_mb: float = 1000.0, total: int | None = None) -> dict:
    """Write samples to out/prefix-000000.tar ...: pairs (image path, caption, metadata), or images alone (caption
    None) or texts alone (path None, the key in the metadata); returns counts and what was skipped."""
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    written = 0
    seen: dict[str, int] = {}
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=max_count, maxsize=int(max_size_mb * 2**20),
                         verbose=0) as sink:
        for path, caption, meta in tqdm(pairs, total=total, desc="shards", unit="sample"):
            if caption is not None and not caption.strip():
                skipped.append(f"{path}: empty caption")
                continue
            sample: dict = {"json": json.dumps({"image": str(path), **meta} if path else meta).encode()}
            if path is not None:
                try:
                    data, ext = encode_image(path)
                except Exception as err:
                    skipped.append(f"{path}: {type(err).__name__}: {err}")
                    continue
                sample[ext] = data
            if caption is not None:
                sample["txt"] = caption.strip()
            stem = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem if path is not None else meta["key"])
            seen[stem] = seen.get(stem, -1) + 1
            sink.write({"__key__": f"{stem}_{seen[stem]}", **sample})
            written += 1
    return {"written": written, "skipped": skipped, "shards": sorted(str(p) for p in out.glob(f"{prefix}-*.tar"))}


def read_pairs(args: argparse.Namespace) -> list[tuple[Path | None, str | None, dict]]:
    if args.texts:
        return list(text_lines(args.texts))
    if args.images is None:
        raise InputError("--images: required with --coco, --karpathy, --captions and --images-only")
    if not args.images.is_dir():
        raise InputError(f"--images {args.images}: not a folder")
    if args.images_only:
        return list(folder_images(args.images))
    if args.coco:
        return list(coco_pairs(args.coco, args.images))
    if args.karpathy:
        return list(karpathy_pairs(args.karpathy, args.images, args.splits))
    return list(caption_file_pairs(args.captions, args.images))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--coco", type=Path, help="COCO captions json")
    src.add_argument("--karpathy", type=Path, help="Karpathy dataset_coco.json")
    src.add_argument("--captions", type=Path, help=".jsonl or .tsv captions file")
    src.add_argument("--images-only", action="store_true", help="every image under --images, without text")
    src.add_argument("--texts", type=Path, help="text file, one text per line, without images")
    p.add_argument("--images", type=Path, help="image folder the paths are relative to")
    p.add_argument("--splits", nargs="+", default=["train", "restval"], help="Karpathy splits to include")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prefix", default="shard")
    p.add_argument("--max-count", type=int, default=10000, help="samples per shard")
    p.add_argument("--max-size-mb", type=float, default=1000.0, help="size per shard")
    args = p.parse_args(argv)
    return run_reporting("make_shards.py", lambda: make(args))


def make(args: argparse.Namespace) -> None:
    """Read the pairs and write the shards; nothing written at all is an error."""
    pairs = read_pairs(args)
    report = write_shards(iter(pairs), args.out, args.prefix, args.max_count, args.max_size_mb, total=len(pairs))
    print(f"wrote {report['written']} samples in {len(report['shards'])} shards to {args.out}")
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])} of {len(pairs)} samples (unreadable image or empty caption):",
              file=sys.stderr)
        for line in report["skipped"][:20]:
            print("  " + line, file=sys.stderr)
    if not report["written"]:
        for empty in report["shards"]:
            Path(empty).unlink()
        raise InputError(f"no sample written ({len(pairs)} read, {len(report['skipped'])} skipped)")


if __name__ == "__main__":
    sys.exit(main())
