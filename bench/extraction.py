"""Extraction speed, UNet passes per image, and the share of time spent writing the cache.

    python bench/extraction.py [--config configs/demo_cls_exp.yaml] [--split train]

Extracts one split into a fresh temporary cache, once in the default inversion mode and once in
generation mode (one UNet pass per saved timestep), and prints images/s, the UNet passes per
image, the time the background writer spent writing shards and the time the computation waited
for it (the write's real cost; the goal is at most 10 % of extraction time).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _demo import demo_paths  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.extract.run import Extraction, rate_text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo_cls_exp.yaml")
    parser.add_argument("--split", default="train")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {}
    for mode in ("inversion", "generation"):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(args.config, {**demo_paths(), "cache_dir": tmp, "diffusion_mode": mode})
            r = Extraction(cfg, args.device).run(args.split, progress=False)
            results[mode] = r
            print(f"{mode:>10}: {r.extracted} images in {r.seconds:.1f} s = {rate_text(r.extracted, r.seconds)}; "
                  f"{r.unet_passes / r.extracted:g} UNet passes per image; writing {r.write_seconds:.1f} s in the "
                  f"background, {r.write_wait_seconds:.2f} s waited for ({100 * r.write_wait_seconds / r.seconds:.1f} %)")
    inv, gen = results["inversion"], results["generation"]
    print(f"RESULT images_per_s={inv.images_per_second:.2f} unet_passes_per_image={inv.unet_passes / inv.extracted:g} "
          f"generation_passes_per_image={gen.unet_passes / gen.extracted:g} "
          f"write_share={inv.write_seconds / inv.seconds:.3f} write_wait_share={inv.write_wait_seconds / inv.seconds:.3f}")


if __name__ == "__main__":
    main()
