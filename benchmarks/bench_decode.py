"""Caption decoding speed with and without the image key/value cache (images/s and their ratio, one run).

    python benchmarks/bench_decode.py                     # tiny model, 64 images, beam 3
    python benchmarks/bench_decode.py --size base --images 8
"""

from __future__ import annotations

import argparse
import time

import torch

from mm_moe.config import BEiT3Config
from mm_moe.config_files import load_config
from mm_moe.data import load_tokenizer
from mm_moe.model import BeamConfig, BEiT3ForCaptioning, CaptionDecoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = load_config(BEiT3Config, f"configs/model/{args.size}.yaml")
    model = BEiT3ForCaptioning(cfg)
    tok = load_tokenizer()
    with torch.no_grad():
        model.head.bias[tok.sep_token_id] = -1e4  # never stop early: every caption has max_len tokens
    images = torch.randn(args.images, 3, cfg.img_size, cfg.img_size)
    beam = BeamConfig(beam_size=args.beam, max_len=args.max_len, no_repeat_ngram=0)
    times = {True: [], False: []}
    outputs = {}
    for _ in range(args.rounds):
        for use_cache in (True, False):
            dec = CaptionDecoder(model, tok, beam, use_cache=use_cache)
            t0 = time.perf_counter()
            outputs[use_cache] = dec.generate(images)
            times[use_cache].append(time.perf_counter() - t0)
    cached, full = min(times[True]), min(times[False])
    print(f"# caption decoding, {args.size} model, {args.images} images, beam {args.beam}, {args.max_len} tokens, "
          f"{torch.get_num_threads()} threads (best of {args.rounds})")
    print("| decoder | images/s |\n|---|---|")
    print(f"| re-encode image + text every step | {args.images / full:.1f} |")
    print(f"| cached image keys/values | {args.images / cached:.1f} |")
    print(f"\ncache speed-up: {full / cached:.2f}x; same captions: {outputs[True] == outputs[False]}")


if __name__ == "__main__":
    main()
