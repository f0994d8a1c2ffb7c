"""Seconds for a full probe map at the real size: 21 layers x 3 timesteps of SD-2.1 at 256 px.

    python bench/probe_map.py --train 4000 --eval 500

Writes a synthetic classification cache (train, val, test) whose pooled vectors have the real
channel counts (320 to 1280 per layer, 17,280 per timestep, 51,840 in all); its maps are 1 x 1,
since a classification probe reads only the pooled tier. Two layers carry the label. Then times
``probe_map``: 63 single cells, 3 timestep concatenations and the concatenation of everything.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from pipeline.backbone.demo import SD21_UNET_CONFIG
from pipeline.backbone.layers import select_layers
from pipeline.backbone.sat_unet import SatUNet
from pipeline.cache.reader import open_cache
from pipeline.extract.extractor import DEFAULT_LAYER_IDXS, layer_shapes
from pipeline.probe.map import ALL, ProbeSettings, probe_map
from pipeline.synthetic import write_synthetic_cache

TIMESTEPS = ("t47", "t45", "t40")


def real_channels() -> dict[str, int]:
    with torch.device("meta"):  # shapes only
        unet = SatUNet(**{**SD21_UNET_CONFIG, "use_metadata": False})
    shapes = layer_shapes(unet, select_layers(unet, DEFAULT_LAYER_IDXS), latent_size=32, cond_dim=1024, device="meta")
    return {name: shape[0] for name, shape in shapes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--eval", type=int, default=500, help="images in each of val and test")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    args = parser.parse_args()

    channels = real_channels()
    shapes = {name: (c, 1, 1) for name, c in channels.items()}
    layers = list(shapes)
    signal = {("t45", layers[10]): 0.3, ("t40", layers[16]): 0.2}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        caches = {}
        for split, n in (("train", args.train), ("val", args.eval), ("test", args.eval)):
            path = os.path.join(tmp, f"{split}.zarr")
            write_synthetic_cache(path, rng.integers(0, args.classes, n), TIMESTEPS, shapes, signal,
                                  num_classes=args.classes, shard_size=256, split=split)
            caches[split] = open_cache(path)
        print(f"wrote {args.train}/{args.eval}/{args.eval} images x {sum(channels.values()) * 3} dims "
              f"in {time.perf_counter() - start:.1f} s")

        settings = ProbeSettings(n_jobs=args.jobs)
        start = time.perf_counter()
        rows = probe_map(caches, "classification", args.classes, settings)
        seconds = time.perf_counter() - start

    ranked = sorted((r for r in rows if ALL not in (r["timestep"], r["layer"])), key=lambda r: -r["val"])
    for r in ranked[:3]:
        print(f"  {r['timestep']} {r['layer']:<22} val {r['val']:.3f} test {r['value']:.3f} C={r['C']}")
    for r in rows:
        if r["layer"] == ALL:
            print(f"  {r['timestep']} all layers ({r['dims']} dims)  val {r['val']:.3f} test {r['value']:.3f}")
    print(f"probe map: {len(rows)} probes in {seconds:.1f} s on {args.jobs} jobs")
    print(f"RESULT probe_map_seconds={seconds:.1f} probes={len(rows)} train_images={args.train}")


if __name__ == "__main__":
    main()
