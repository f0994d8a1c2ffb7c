"""The reference's configuration end to end at SD-2.1's real size, on this machine's CPU.

    python bench/real_size_pipeline.py [--images 8] [--eval-images 4] [--keep DIR] [--backbone DIR]
                                       [--tasks cls seg] [--fusers gw lw moe] [--sources maps trajectory]
                                       [--tier-tasks cls] [--encodings float16 uint8 bitround-5]
                                       [--skip-probe] [--skip-fits] [--scale-images 128]

What it runs, each stage a process of the real command line (``python -m cli ...``) whose seconds
and peak resident memory (its own ``ru_maxrss``, from ``os.wait4``) are printed:

1. a DiffusionSat with SD-2.1's real UNet and VAE and random weights, in the published checkpoint
   layout (``build_demo_backbone(full_size=True)``, 256 px, about 3.5 GB), written once (reused
   with ``--backbone``);
2. the demo tasks (``satdifuser demo data``), cut to ``--images`` training and ``--eval-images``
   validation and test images per split (the same names for both tasks, classes dealt in turn), and
   read at 256 px;
3. per task, the reference's experiment settings (the keys of ``configs/eurosat_exp.yaml`` for
   classification, ``configs/chesa_exp.yaml`` for segmentation, with their ``_base_`` files:
   21 layers x 3 timesteps, ``projection_dim`` 384, a 512-channel UPerNet) on the demo task at
   ``img_size`` 256, ``max_train_epochs`` 1, device cpu: ``extract`` every tier, ``cache info``
   of each split (bytes per image per tier, measured on disk), ``probe`` (the map), and a fit of
   each fuser for one epoch from the maps and from the trajectory (``--sources``);
4. for the classification task (``--tier-tasks``): a probe-only cache (``store: [pooled]``) and its
   probe; a trajectory-only cache (``store: [trajectory]``) and a GW fit from it; copies of that cache
   given maps from their trajectory (``extract --from-trajectory --store maps``) in each of
   ``--encodings`` (float16, uint8, bitround-5), with ``cache info`` (bytes, recorded error) and a GW
   fit from each; the float16 ones are compared with the extracted maps.

Nothing is downloaded. The work folder is temporary unless ``--keep DIR`` names one (a second run
with the same ``--keep`` reuses the backbone, the data and complete caches). Before running it
prints the plan with the time it expects, from the per-image costs measured on this machine
(``bench/real_size_step.py``); ``--seconds-per-pass`` and ``--seconds-per-vae`` replace them.
The last line is ``RESULT stage_seconds=... peak_rss_mib=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
IMG_SIZE = 256
# (experiment file of the reference's settings, demo task file) per task
TASKS = {
    "cls": ("eurosat_exp.yaml", "demo_landcover.yaml", "demo-landcover"),
    "seg": ("chesa_exp.yaml", "demo_landcover_seg.yaml", "demo-landcover-seg"),
}
DEMO_TASK_DIRS = {"cls": "classification_v1.0/demo-landcover", "seg": "segmentation_v1.0/demo-landcover-seg"}
SPLITS = {"train": "train", "val": "valid", "test": "test"}
# Measured by bench/real_size_step.py on this machine with no other job (docs/performance.md,
# section 6): one hooked UNet pass and one VAE encode per image at 256 px, fp32.
UNET_PASS_S, VAE_S = 1.3, 1.9
MIB = 1 << 20


class Stages:
    """Runs each stage as a child process and keeps its seconds and peak RSS."""

    def __init__(self, logs: Path, max_rss_gb: float):
        self.logs, self.max_rss_gb = logs, max_rss_gb
        self.rows: list[dict] = []
        logs.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, args: list[str], **extra) -> dict:
        log = self.logs / f"{len(self.rows):02d}-{name.replace(' ', '_').replace('/', '_')}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        print(f"-- {name}: {' '.join(args)}", flush=True)
        start = time.perf_counter()
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            try:
                stopped = self._watch(proc.pid)
            except BaseException:  # Ctrl-C or SIGTERM of this script: the stage must not run on alone
                proc.kill()
                raise
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if stopped:
            with open(log, "a") as out:
                out.write(f"stopped: resident memory passed --max-rss-gb {self.max_rss_gb:g}\n")
        row = {"stage": name, "seconds": round(time.perf_counter() - start, 1), "stopped_at_max_rss": stopped,
               "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
               "peak_rss_mib": round(usage.ru_maxrss / 1024), "rc": proc.returncode, "log": str(log), **extra}
        self.rows.append(row)
        tail = log.read_text().strip().splitlines()[-3:]
        stop = f" (stopped: over --max-rss-gb {self.max_rss_gb:g})" if stopped else ""
        print(f"   {row['seconds']:.1f} s ({row['cpu_seconds']:.0f} s of CPU), peak RSS {row['peak_rss_mib']:,} MiB, "
              f"exit {row['rc']}{stop}", flush=True)
        for line in tail:
            print(f"   | {line[:200]}", flush=True)
        return row

    def _watch(self, pid: int) -> bool:
        """Wait for ``pid`` to exit, killing it when its resident memory passes ``max_rss_gb``, so
        that a stage that needs more than the machine has stops alone instead of calling in the
        kernel's OOM killer on whatever else runs here. True when it was killed."""
        while True:
            try:
                done = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return False
            if done is not None:
                return False
            try:
                rss_kib = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS"))
            except (FileNotFoundError, StopIteration):
                rss_kib = 0
            if rss_kib > self.max_rss_gb * 2**20:
                os.kill(pid, 9)
                return True
            time.sleep(0.2)

    def output(self, row: dict) -> str:
        return Path(row["log"]).read_text()


# ---- the work folder ----------------------------------------------------------------------------


def write_backbone(stages: Stages, folder: Path) -> Path:
    if (folder / f"resolution{IMG_SIZE}" / "model_index.json").is_file():
        print(f"-- backbone: reusing {folder}", flush=True)
        return folder
    code = ("import sys; from pipeline.backbone.demo import build_demo_backbone; "
            f"build_demo_backbone(sys.argv[1], img_size={IMG_SIZE}, full_size=True)")
    row = stages.run("backbone", ["-c", code, str(folder)])
    if row["rc"]:
        sys.exit(f"writing the backbone failed; see {row['log']}")
    return folder


def demo_subset(stages: Stages, work: Path, n_train: int, n_eval: int) -> Path:
    """A GEO-Bench root holding both demo tasks cut to the counts asked for (files linked, not copied)."""
    full, root = work / "geobench-full", work / "geobench"
    if not (full / DEMO_TASK_DIRS["cls"] / "task_specs.pkl").is_file():
        row = stages.run("demo data", ["-m", "cli", "demo", "data", "--out", str(full), "--overwrite"])
        if row["rc"]:
            sys.exit(f"writing the demo tasks failed; see {row['log']}")
    counts = {"train": n_train, "valid": n_eval, "test": n_eval}
    names = _pick(full / DEMO_TASK_DIRS["cls"], counts)
    for rel in DEMO_TASK_DIRS.values():
        src, dst = full / rel, root / rel
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        for f in src.iterdir():
            if not f.name.endswith("_partition.json"):
                (dst / f.name).symlink_to(f)
        (dst / "default_partition.json").write_text(json.dumps(names, indent=1))
    return root


def _pick(task_dir: Path, counts: dict) -> dict:
    """The first names of each split, the classes dealt in turn so that every split holds several."""
    os.environ.setdefault("GEO_BENCH_DIR", str(task_dir.parent.parent))  # importing geobench creates it
    from geobench.dataset import GeobenchDataset

    out = {}
    for split, n in counts.items():
        data = GeobenchDataset(task_dir, split=split, partition_name="default", band_names=("04",))
        by_class: dict[int, list[str]] = {}
        for name in data.active_partition.partition_dict[split]:
            by_class.setdefault(int(data.get_sample(name).label), []).append(name)
        queues = [by_class[c] for c in sorted(by_class)]
        picked = []
        while len(picked) < n and any(queues):
            for q in queues:
                if q and len(picked) < n:
                    picked.append(q.pop(0))
        out[split] = sorted(picked)
    return out


def experiment_config(work: Path, task: str, backbone: Path, geobench: Path, cache: Path, overrides: dict,
                      name: str = "real") -> Path:
    """The reference's experiment file for the task's kind, on the demo task at 256 px."""
    exp_file, task_file, _ = TASKS[task]
    raw = yaml.safe_load((CONFIGS / exp_file).read_text())
    bases = [str(CONFIGS / b) for b in raw.pop("base") if not b.startswith("tasks/")]
    raw["base"] = bases + [str(CONFIGS / "tasks" / task_file)]
    raw.update(img_size=IMG_SIZE, pretrained_model_name_or_path=str(backbone), geobench_dir=str(geobench),
               cache_dir=str(cache), exp_folder=str(work / "experiments"), device="cpu",
               max_train_epochs=1, **overrides)
    path = work / "configs" / f"{name}_{task}_exp.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---- what a cache holds -------------------------------------------------------------------------


def tier_bytes(store: Path) -> dict:
    """Bytes on disk per tier of a local cache: maps (features/), pooled (pooled/), trajectory
    (trajectory/ and latents), and the rest (labels, names, done, metadata)."""
    out = {"maps": 0, "pooled": 0, "trajectory": 0, "other": 0}
    tier_of = {"features": "maps", "pooled": "pooled", "trajectory": "trajectory", "latents": "trajectory",
               "feature_scales": "maps"}
    for path in store.rglob("*"):
        if path.is_file():
            top = path.relative_to(store).parts[0]
            out[tier_of.get(top, "other")] += path.stat().st_size
    return out


def cache_stage(stages: Stages, task: str, dataset: str, cache: Path, kind: str = "every tier") -> list[dict]:
    rows = []
    for split in SPLITS:
        store = cache / dataset / f"{split}.zarr"
        row = stages.run(f"{task} cache info {split} ({kind})", ["-m", "cli", "cache", "info", str(store), "--json"])
        if row["rc"]:
            continue
        info = json.loads(stages.output(row))
        n = info["num_samples"]
        tiers = tier_bytes(store)
        error = info.get("map_error", {}).get("worst") if isinstance(info.get("map_error"), dict) else None
        if error:
            print(f"   {split}: map error of {info.get('map_encoding')}: {error}", flush=True)
        rows.append({"task": task, "kind": kind, "split": split, "images": n, "bytes_per_image": info["bytes_per_image"],
                     "map_encoding": info.get("map_encoding"), "map_error": info.get("map_error"),
                     "tiers_per_image": {k: round(v / n) for k, v in tiers.items()},
                     "raw_fp16_maps_per_image": round((info.get("feature_bytes_raw_fp16") or 0) / n),
                     "compression_ratio": info.get("compression_ratio")})
        t = rows[-1]["tiers_per_image"]
        print(f"   {split}: {n} images, {info['bytes_per_image'] / MIB:.2f} MiB per image on disk: maps "
              f"{t['maps'] / MIB:.2f} MiB, pooled {t['pooled'] / 1024:.1f} KiB, trajectory {t['trajectory'] / 1024:.1f} KiB, "
              f"other {t['other'] / 1024:.1f} KiB (maps {rows[-1]['raw_fp16_maps_per_image'] / MIB:.2f} MiB raw fp16, "
              f"ratio {info.get('compression_ratio')})", flush=True)
    return rows


# ---- caches of real-size random features, for memory at real batch and shard sizes ----------------


def synthetic_cache(model_store: str, store: str, images: int) -> None:
    """A cache of ``images`` images shaped and described like ``model_store`` (a real cache of the
    same task), with random features and labels, written by extraction's own loop
    (``pipeline.extract.run._run``: batches gathered into shards, one shard written in the background
    while the next is computed). Fits and probes accept it as the task's cache, so their memory at
    the reference's batch sizes, and the extraction's at its shard size, are measured in minutes
    instead of the hours the backbone would take on this CPU. Its numbers mean nothing."""
    import numpy as np
    import torch

    from pipeline.cache.layout import CachePlan
    from pipeline.cache.lock import WriterLock
    from pipeline.cache.reader import open_cache
    from pipeline.cache.writer import CacheWriter
    from pipeline.config import Config
    from pipeline.extract.extractor import BatchFeatures
    from pipeline.extract.run import _run

    model = open_cache(model_store)
    plan = CachePlan.from_attrs({**model.plan.to_attrs(), "num_samples": images})
    request = json.loads(json.dumps(model.request))
    request["dataset"].update(num_samples=images, sample_names_sha256="synthetic", content_sha256="synthetic")
    keep = ("code_version", "unet_passes_per_image", "layer_catalog")
    writer = CacheWriter.create(store, request, plan, {k: model.attrs[k] for k in keep if k in model.attrs})
    num_classes = int(request["dataset"].get("num_classes") or 2)
    rng = np.random.default_rng(0)

    class RandomFeatures:
        def unet_passes(self, tiers):
            return 10

        def __call__(self, images, names, tiers):
            n = len(names)
            maps = {t: {l: torch.randn(n, *s).half() for l, s in plan.layer_shapes.items()} for t in plan.timesteps}
            pooled = {t: {l: m.float().mean(dim=(2, 3)) for l, m in d.items()} for t, d in maps.items()}
            x = torch.randn(n, *plan.latent_shape)
            return BatchFeatures(x, maps, pooled, {t: x for t in plan.timesteps})

    data = [{"image": torch.zeros(3, 8, 8), "name": f"synthetic_{i:05d}", "index": i, "label_error": None,
             "label": rng.integers(0, num_classes, plan.label_shape).astype(plan.label_dtype)} for i in range(images)]
    cfg = Config(dataset_name=request["dataset"]["name"], num_workers=0)
    with WriterLock(store) as lock:
        result = _run(cfg, data, RandomFeatures(), writer, False, lock)
    print(f"{images} images in shards of {plan.shard_size}: {result.seconds:.1f} s, writing {result.write_seconds:.1f} s")


# ---- the plan -----------------------------------------------------------------------------------


def plan(args) -> list[str]:
    per_image = args.seconds_per_vae + 10 * args.seconds_per_pass
    images = len(args.tasks) * (args.images + 2 * args.eval_images)
    lines = [f"backbone: SD-2.1 UNet + VAE, random weights, {IMG_SIZE} px "
             f"({'reused from ' + str(args.backbone) if args.backbone else 'written once, ~3.5 GB'})",
             f"data: the demo tasks, {args.images} train / {args.eval_images} val / {args.eval_images} test images "
             f"per task, at {IMG_SIZE} px",
             f"tasks: {', '.join(args.tasks)} (cls: eurosat_exp settings, seg: chesa_exp settings; 21 layers x 3 "
             f"timesteps, projection_dim 384, UPerNet 512)",
             f"extract: {images} images x (VAE + 10 UNet passes) ~ {images * per_image / 60:.0f} min "
             f"at {per_image:.0f} s per image"]
    if not args.skip_probe:
        lines.append(f"probe: the map ({len(args.tasks)} tasks)")
    if not args.skip_fits:
        lines.append(f"fits: {', '.join(args.fusers)} for 1 epoch from {' and from '.join(args.sources)}, per task")
    for task in args.tier_tasks:
        traj = (args.images + 2 * args.eval_images) * len(set(yaml.safe_load((CONFIGS / "_base_" / "satdifuser.yaml")
                                                                              .read_text())["save_timesteps"]))
        lines.append(f"{task}: pooled-only and trajectory-only caches (2 x {args.images + 2 * args.eval_images} images "
                     f"extracted), maps filled from the trajectory in {', '.join(args.encodings) or 'no encoding'} "
                     f"({traj} UNet passes each), a GW fit of each")
    if args.scale_images:
        lines.append(f"at real batch and shard sizes: caches of random real-size features ({args.scale_images} train, "
                     f"{args.scale_images // 2} val and test images per task) written by extraction's loop; the probe and "
                     f"{', '.join(args.scale_fusers)} fits on them, on one training batch of the reference's size")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="training images per task")
    parser.add_argument("--eval-images", type=int, default=4, help="validation and test images per task, each")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one, removed)")
    parser.add_argument("--backbone", type=Path, help="a full-size backbone written by an earlier run, to reuse")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--fusers", nargs="+", default=["gw", "lw", "moe"], choices=["gw", "lw", "moe"])
    parser.add_argument("--skip-probe", action="store_true")
    parser.add_argument("--skip-fits", action="store_true")
    parser.add_argument("--sources", nargs="+", default=["maps", "trajectory"], choices=["maps", "trajectory", "live"],
                        help="feature sources of the fits on the real caches")
    parser.add_argument("--tier-tasks", nargs="*", default=["cls"], choices=list(TASKS),
                        help="tasks whose pooled-only and trajectory-only caches, and maps filled from the "
                             "trajectory in each of --encodings, are also run")
    parser.add_argument("--encodings", nargs="*", default=["float16", "uint8", "bitround-5"],
                        help="map encodings filled from the trajectory-only cache")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="config key=value for every stage")
    parser.add_argument("--scale-fusers", nargs="+", default=["gw", "moe"], choices=["gw", "lw", "moe"],
                        help="fusers fitted on the random-feature caches")
    parser.add_argument("--max-rss-gb", type=float, default=16.0,
                        help="stop a stage whose resident memory passes this (GiB), and say so")
    parser.add_argument("--seconds-per-pass", type=float, default=UNET_PASS_S)
    parser.add_argument("--seconds-per-vae", type=float, default=VAE_S)
    parser.add_argument("--scale-images", type=int, default=128,
                        help="training images of the random-feature caches (0: none); val and test get half")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    parser.add_argument("--synthetic-cache", nargs=3, metavar=("MODEL", "STORE", "IMAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.synthetic_cache:
        model, store, images = args.synthetic_cache
        return synthetic_cache(model, store, int(images))
    print("plan:\n  " + "\n  ".join(plan(args)), flush=True)
    if args.dry_run:
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = args.keep or Path(tempfile.mkdtemp(prefix="satdifuser-real-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        run_all(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)


def run_all(args, work: Path) -> None:
    stages = Stages(work / "logs", args.max_rss_gb)
    backbone = write_backbone(stages, args.backbone or work / "backbone")
    geobench = demo_subset(stages, work, args.images, args.eval_images)
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.overrides)}
    sizes = []
    for task in args.tasks:
        dataset = TASKS[task][2]
        cfg = experiment_config(work, task, backbone, geobench, work / "cache", overrides)
        row = stages.run(f"{task} extract", ["-m", "cli", "extract", str(cfg), "--split", "all", "--no-progress"],
                         images=args.images + 2 * args.eval_images)
        if row["rc"]:
            continue
        sizes += cache_stage(stages, task, dataset, work / "cache")
        task_stages(stages, args, task, cfg, work / "cache", work / "out", sources=args.sources)
        if task in args.tier_tasks:
            tier_stages(stages, args, task, backbone, geobench, work, overrides, sizes)
        if args.scale_images:
            scaled(stages, args, task, backbone, geobench, work, overrides)
    report(stages.rows, sizes, work)


def task_stages(stages: Stages, args, task: str, cfg: Path, cache: Path, out: Path, tag: str = "",
                fusers=None, sources=("maps",)) -> None:
    dataset = TASKS[task][2]
    if not args.skip_probe:
        stages.run(f"{task}{tag} probe", ["-m", "cli", "probe", "--cache-dir", str(cache), "--dataset", dataset,
                                          "--out", str(out / "probes" / dataset)])
    if not args.skip_fits:
        for source in sources:
            for fuser in fusers or args.fusers:
                fit_stage(stages, task, tag, cfg, fuser, source, out / "experiments" / dataset / f"{fuser}-{source}")


def fit_stage(stages: Stages, task: str, tag: str, cfg: Path, fuser: str, source: str, out: Path) -> dict:
    row = stages.run(f"{task}{tag} fit {fuser} {source}", ["-m", "cli", "fit", str(cfg), "--fuser", fuser, "--source",
                                                          source, "--out", str(out), "--no-progress"])
    if not row["rc"] and (out / "run.json").is_file():
        m, run = (json.loads((out / name).read_text()) for name in ("metrics.json", "run.json"))
        row.update(test=m["test_score"], metric=run["selection_metric"], unet_passes=m["unet_passes"],
                   train_images=run.get("train_images"))
        print(f"   test {row['metric']} {row['test']:.4f}, {row['unet_passes']:,} UNet passes", flush=True)
    return row


# ---- other tiers and encodings (one task) --------------------------------------------------------


def tier_stages(stages: Stages, args, task: str, backbone: Path, geobench: Path, work: Path, overrides: dict,
                sizes: list) -> None:
    """A probe-only cache (``store: [pooled]``) probed; a trajectory-only cache fitted from its
    trajectory; and copies of that cache given maps from their trajectory in each of
    ``args.encodings`` (``extract --from-trajectory``), with their recorded error and a GW fit each."""
    dataset = TASKS[task][2]
    pooled = experiment_config(work, task, backbone, geobench, work / "cache-pooled", {**overrides, "store": ["pooled"]},
                               "pooled")
    if not stages.run(f"{task} extract store pooled", ["-m", "cli", "extract", str(pooled), "--split", "all",
                                                       "--no-progress"])["rc"]:
        sizes += cache_stage(stages, task, dataset, work / "cache-pooled", "pooled")
        if not args.skip_probe:
            stages.run(f"{task} probe (pooled-only cache)", ["-m", "cli", "probe", "--cache-dir",
                                                             str(work / "cache-pooled"), "--dataset", dataset, "--out",
                                                             str(work / "out-pooled" / "probes" / dataset)])
    traj_cache = work / "cache-trajectory"
    traj = experiment_config(work, task, backbone, geobench, traj_cache, {**overrides, "store": ["trajectory"]},
                             "trajectory")
    if stages.run(f"{task} extract store trajectory", ["-m", "cli", "extract", str(traj), "--split", "all",
                                                       "--no-progress"])["rc"]:
        return
    sizes += cache_stage(stages, task, dataset, traj_cache, "trajectory")
    if not args.skip_fits:
        fit_stage(stages, task, " (trajectory-only cache)", traj, "gw", "trajectory",
                  work / "out-trajectory" / dataset / "gw")
    for enc in args.encodings:
        cache = work / f"cache-{enc}"
        if cache.exists():
            shutil.rmtree(cache)
        shutil.copytree(traj_cache, cache, symlinks=True)
        cfg = experiment_config(work, task, backbone, geobench, cache,
                                {**overrides, "store": ["maps", "trajectory"], "map_encoding": enc}, enc)
        if stages.run(f"{task} maps {enc} from the trajectory", ["-m", "cli", "extract", str(cfg), "--split", "all",
                                                                 "--from-trajectory", "--store", "maps",
                                                                 "--no-progress"])["rc"]:
            continue
        sizes += cache_stage(stages, task, dataset, cache, enc)
        if enc == "float16":
            compare_maps(work / "cache" / dataset / "test.zarr", cache / dataset / "test.zarr")
        if not args.skip_fits:
            fit_stage(stages, task, f" ({enc} maps)", cfg, "gw", "maps", work / f"out-{enc}" / dataset / "gw")


def compare_maps(direct: Path, filled: Path) -> None:
    """How far the maps recomputed from the trajectory are from those extracted: the worst layer's
    largest difference relative to the layer's largest value, and the share of values that differ."""
    import numpy as np

    from pipeline.cache.reader import open_cache

    a, b = open_cache(str(direct)), open_cache(str(filled))
    rows, worst, differ, total = range(len(a)), 0.0, 0, 0
    for t in a.timesteps:
        got, want = b.features(rows, [t])[t], a.features(rows, [t])[t]
        for layer, x in want.items():
            x, y = x.float().numpy(), got[layer].float().numpy()
            worst = max(worst, float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-12)))
            differ, total = differ + int((x != y).sum()), total + x.size
    print(f"   maps from the trajectory against the extracted maps ({len(a)} test images): {differ / total:.4%} of "
          f"values differ, worst layer max |diff| / max |x| = {worst:.2e} (float16 steps are 2^-11 = 4.9e-04 relative)",
          flush=True)


def scaled(stages: Stages, args, task: str, backbone: Path, geobench: Path, work: Path, overrides: dict) -> None:
    """The same probe and fits on caches of random features of the real size, two shards of train
    images and one of val and test, trained on one batch of the reference's size (``limited_label``)."""
    dataset = TASKS[task][2]
    cache, out = work / "scaled-cache", work / "scaled-out"
    batch = yaml.safe_load((CONFIGS / TASKS[task][0]).read_text())["batch_size"]
    n_train, n_eval = args.scale_images, max(args.scale_images // 2, 1)
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        store = cache / dataset / f"{split}.zarr"
        if not store.exists():
            stages.run(f"{task} synthetic extract {split} ({n} images)",
                       [__file__, "--synthetic-cache", str(work / "cache" / dataset / f"{split}.zarr"), str(store), str(n)],
                       images=n)
    fraction = min(1.0, batch / n_train)
    cfg = experiment_config(work, task, backbone, geobench, cache, {**overrides, "limited_label": fraction}, "scaled")
    tag = f" x{n_train} (random features, batch {min(batch, n_train)})"
    task_stages(stages, args, task, cfg, cache, out, tag, args.scale_fusers)
    if not args.skip_fits and "moe" in args.scale_fusers:
        stages.run(f"{task}{tag} fit moe maps, checkpoint_projections",
                   ["-m", "cli", "fit", str(cfg), "--fuser", "moe", "--out", str(out / "experiments" / dataset / "moe-ckpt"),
                    "--no-progress", "--set", "checkpoint_projections=true"])


def report(rows: list[dict], sizes: list[dict], work: Path) -> None:
    print("\n| stage | seconds | CPU seconds | peak RSS (MiB) | exit |\n|---|---|---|---|---|")
    for r in rows:
        if "cache info" in r["stage"]:
            continue
        print(f"| {r['stage']} | {r['seconds']:.1f} | {r['cpu_seconds']:.0f} | {r['peak_rss_mib']:,} | {r['rc']} |")
    (work / "stages.json").write_text(json.dumps({"stages": rows, "sizes": sizes}, indent=1))
    failed = [r["stage"] for r in rows if r["rc"]]
    if failed:
        print(f"failed stages: {failed} (logs in {work / 'logs'})")
    peak = max((r["peak_rss_mib"] for r in rows), default=0)
    print(f"RESULT stages={len(rows)} failed={len(failed)} peak_rss_mib={peak} "
          + " ".join(f"{r['stage'].replace(' ', '_')}_s={r['seconds']}" for r in rows if "cache info" not in r["stage"]))


if __name__ == "__main__":
    main()
