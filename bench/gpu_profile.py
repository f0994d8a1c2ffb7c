"""GPU profile at SD-2.1's real size: extraction speed by setting, the cache write, and one
training epoch live against cached.

    python bench/gpu_profile.py                # on a CUDA machine: about 4-6 minutes on one H100
    python bench/gpu_profile.py --smoke        # the same steps on a CPU with the tiny demo backbone

1. Writes a DiffusionSat with SD-2.1's real UNet and VAE and random weights in the published
   checkpoint layout (``build_demo_backbone(full_size=True)``), and loads it with the real loader.
2. Extraction without the cache: images/s of the default extraction (VAE, 10 inversion passes,
   hooks, maps copied to the host) for autocast fp16 and bf16, batch sizes 16/32/64, and
   ``channels_last`` off and on, at 256 px; the same at 512 px for the fastest autocast; the
   peak GPU memory of each; last of all (step 5), ``torch.compile`` of the UNet with the fastest
   setting.
3. The full extraction (``Extraction.run``: the cache written to local disk in the background)
   of the demo task's three splits at 256 px: images/s, and the time it waited for the writer.
4. One epoch of GW training on the train split (550 images) with val once and test once:
   live (features recomputed for every batch, the reference's way), cached and streamed from the
   local disk (direct shard reads, read-ahead), and cached in memory.

Every figure is written to ``--out`` (JSON) as soon as it is measured, so a run stopped by a time
limit keeps what it measured; a section that would start after ``--budget`` seconds is skipped
and says so. Ends with one ``RESULT`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _demo import demo_paths  # noqa: E402

from pipeline.backbone.demo import build_demo_backbone  # noqa: E402
from pipeline.backbone.loader import BackboneSpec, load_diffusionsat  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.extract.extractor import ExtractionSettings, FeatureExtractor  # noqa: E402
from pipeline.extract.run import Extraction  # noqa: E402
from pipeline.fit.run import fit  # noqa: E402


class Profile:
    def __init__(self, out: str, budget: float):
        self.out, self.budget, self.started = out, budget, time.perf_counter()
        self.figures: dict = {"device": describe_device()}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def record(self, key: str, value) -> None:
        self.figures[key] = value
        with open(self.out, "w") as f:
            json.dump(self.figures, f, indent=2)
        print(f"{key}: {json.dumps(value)}", flush=True)


def describe_device() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_extraction(model, settings: ExtractionSettings, batch: int, size: int, repeats: int) -> dict:
    """images/s of ``repeats`` batches after one warm-up batch, and the peak GPU memory."""
    device = model.device
    extractor = FeatureExtractor(model, settings)
    images = torch.rand(batch, 3, size, size) * 2 - 1
    names = [f"bench{i}" for i in range(batch)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        extractor(images, names)
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            extractor(images, names)  # maps come back to the host, as extraction needs them
        sync(device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"images_per_s": None, "error": "out of memory"}
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"images_per_s": round(batch * repeats / seconds, 1), "peak_gib": peak and round(peak, 2)}


def set_channels_last(model, on: bool) -> None:
    fmt = torch.channels_last if on else torch.contiguous_format
    model.unet.to(memory_format=fmt)
    model.vae.to(memory_format=fmt)


def sweep(prof: Profile, model, size: int, autocasts, batches, repeats: int) -> tuple | None:
    best = None
    for autocast in autocasts:
        for batch in batches:
            for channels_last in (False, True):
                if prof.left() < 0:
                    prof.record(f"skipped_sweep_{size}", "out of time")
                    return best
                set_channels_last(model, channels_last)
                key = f"extract_{size}px_{autocast}_b{batch}{'_channels_last' if channels_last else ''}"
                result = time_extraction(model, ExtractionSettings(autocast=autocast), batch, size, repeats)
                prof.record(key, result)
                if result["images_per_s"] and (best is None or result["images_per_s"] > best[0]):
                    best = (result["images_per_s"], autocast, batch, channels_last)
    set_channels_last(model, False)
    return best


def try_compile(prof: Profile, model, size: int, best: tuple, repeats: int) -> None:
    _, autocast, batch, channels_last = best
    set_channels_last(model, channels_last)
    plain = model.unet
    try:
        model.unet = torch.compile(plain)
        start = time.perf_counter()
        result = time_extraction(model, ExtractionSettings(autocast=autocast), batch, size, repeats)
        result["compile_and_warm_up_s"] = round(time.perf_counter() - start, 1)
    except Exception as err:  # a failed compile is a figure too
        result = {"images_per_s": None, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    finally:
        model.unet = plain
        set_channels_last(model, False)
    prof.record(f"extract_{size}px_{autocast}_b{batch}_compiled", result)


def full_extraction(prof: Profile, cfg) -> None:
    extraction = Extraction(cfg)
    for split in ("train", "val", "test"):
        r = extraction.run(split, progress=False)
        prof.record(f"cache_extract_{split}", {
            "images": r.extracted, "seconds": round(r.seconds, 1), "images_per_s": round(r.images_per_second, 1),
            "writer_busy_share": round(r.write_seconds / r.seconds, 3),
            "waited_for_writer_share": round(r.write_wait_seconds / r.seconds, 3)})


def epochs(prof: Profile, cfg) -> None:
    modes = {"live": {"live": True, "preload_max_gb": 0}, "cached_streamed": {"preload_max_gb": 0},
             "cached_memory": {"preload_max_gb": 64}}
    for mode, opts in modes.items():
        if prof.left() < 0:
            prof.record(f"skipped_epoch_{mode}", "out of time")
            continue
        run_cfg = dataclasses.replace(cfg, fuser="gw", max_train_epochs=1, preload_max_gb=opts["preload_max_gb"])
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            m = fit(run_cfg, out, source="live" if opts.get("live") else None, progress=False)
            prof.record(f"gw_epoch_{mode}", {"fit_seconds": round(time.perf_counter() - start, 1),
                                             "train_seconds": m["train_seconds"],
                                             "data_wait_seconds": m["data_wait_seconds"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny backbone, 64 px: checks the script, measures nothing")
    parser.add_argument("--budget", type=float, default=420, help="seconds after which no new section starts")
    parser.add_argument("--out", default="gpu_profile.json")
    parser.add_argument("--workdir", default=None, help="local disk for the backbone and caches (default: a temp folder)")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; run with --smoke to check the script on a CPU")
    device = "cuda" if not args.smoke else "cpu"
    size, big, batches, repeats = (64, 128, (2, 4), 1) if args.smoke else (256, 512, (16, 32, 64), 3)
    prof = Profile(args.out, args.budget)
    work = tempfile.mkdtemp(prefix="satdifuser-gpu-", dir=args.workdir)
    try:
        start = time.perf_counter()
        root = os.path.join(work, "backbone")
        # SatDiFuser's configs run DiffusionSat without its metadata embedding.
        build_demo_backbone(root, img_size=size, full_size=not args.smoke, with_metadata=False)
        model = load_diffusionsat(BackboneSpec(root, size), device)
        prof.record("backbone_write_and_load_s", round(time.perf_counter() - start, 1))
        prof.record("unet_parameters", sum(p.numel() for p in model.unet.parameters()))

        best = sweep(prof, model, size, ("fp16", "bf16"), batches, repeats)
        if best:
            prof.record(f"fastest_{size}px", {"images_per_s": best[0], "autocast": best[1], "batch": best[2],
                                              "channels_last": best[3]})
            # The UNet and VAE take any size: the same model runs the big images.
            sweep(prof, model, big, (best[1],), batches[:2], repeats)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

        overrides = {**demo_paths(), "pretrained_model_name_or_path": root, "img_size": size, "device": device,
                     "cache_dir": os.path.join(work, "cache"), "eval_every_n_steps": None, "preload_max_gb": 0}
        if args.smoke:
            overrides["partition"] = "0.05x_train"
        cfg = load_config("configs/demo_cls_exp.yaml", overrides)
        if prof.left() > 0:
            full_extraction(prof, cfg)
            epochs(prof, cfg)
        else:
            prof.record("skipped_cache_and_epochs", "out of time")
        # Last, because a compile can take minutes: what it does not finish costs nothing else.
        if best and not args.no_compile and not args.smoke and prof.left() > 0:
            try_compile(prof, load_diffusionsat(BackboneSpec(root, size), device), size, best, repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    f = prof.figures
    best = f.get(f"fastest_{size}px", {})
    live, cached = f.get("gw_epoch_live", {}), f.get("gw_epoch_cached_streamed", {})
    ratio = live.get("fit_seconds", 0) / cached["fit_seconds"] if cached.get("fit_seconds") else 0
    print(f"RESULT fastest_images_per_s={best.get('images_per_s', 0)} "
          f"cache_extract_images_per_s={f.get('cache_extract_train', {}).get('images_per_s', 0)} "
          f"live_over_cached_epoch={ratio:.2f} out={args.out}")


if __name__ == "__main__":
    main()
