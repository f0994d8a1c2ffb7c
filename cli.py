"""The ``satdifuser`` command line: extract features once, inspect and verify caches."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check feature caches.")
demo_app = typer.Typer(no_args_is_help=True, help="Build the embedded demo task and backbone.")
task_app = typer.Typer(no_args_is_help=True, help="Inspect GEO-Bench task folders.")
app.add_typer(cache_app, name="cache")
app.add_typer(task_app, name="task")
app.add_typer(demo_app, name="demo")


class Fuser(str, Enum):
    gw = "gw"
    lw = "lw"
    moe = "moe"


class Source(str, Enum):
    maps = "maps"
    trajectory = "trajectory"
    live = "live"


class Split(str, Enum):
    train = "train"
    val = "val"
    test = "test"
    all = "all"


@contextmanager
def user_errors():
    """Turn the errors a user can fix into one line on stderr and exit status 2."""
    from pipeline.errors import UserError

    try:
        yield
    except (UserError, FileNotFoundError) as err:
        if not getattr(err, "quiet", False):  # said already, by another process
            typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` pairs, values read as YAML (``save_timesteps=[47,45]``, ``latent=mean``)."""
    import yaml

    from pipeline.errors import UserError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r} is not key=value (e.g. --set latent=mean)")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or "unreadable"
            raise UserError(f"--set {item!r}: the value {value!r} is not valid YAML ({problem}); write it whole, "
                            "e.g. --set 'save_timesteps=[47,45]' or --set prompt='A satellite image'") from None
    return out


def storage_overrides(store: str | None, map_encoding: str | None) -> dict:
    """The config keys ``store`` and ``map_encoding`` from ``--store a,b`` and ``--map-encoding``."""
    from pipeline.cache.layout import map_encoding_problem, tiers_problem
    from pipeline.errors import UserError

    out = {}
    if store is not None:
        tiers = [t.strip() for t in store.split(",")]
        problem = tiers_problem(tiers)
        if problem:
            raise UserError(f"--store {store!r}: {problem}; write e.g. --store maps,pooled")
        out["store"] = tiers
    if map_encoding is not None:
        problem = map_encoding_problem(map_encoding)
        if problem:
            raise UserError(f"--map-encoding: {problem}")
        out["map_encoding"] = map_encoding
    return out


ConfigArg = Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Experiment config (configs/*_exp.yaml).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: key=value (repeatable).")]


@app.command()
def extract(
    config: ConfigArg,
    split: Annotated[Split, typer.Option(help="Split to extract.")] = Split.all,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 or auto (default: the config's).")] = None,
    cache_dir: Annotated[Optional[str], typer.Option(help="Cache root: a folder or an fsspec URL.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a cache built with other settings.")] = False,
    repair: Annotated[bool, typer.Option(help="Verify the cache (every checksum) and re-extract the shards found damaged.")] = False,
    wait: Annotated[bool, typer.Option(help="If another extraction is writing the cache, wait for it instead of stopping.")] = False,
    store: Annotated[Optional[str], typer.Option(help="Tiers to store, comma-separated: maps,pooled,trajectory (default: the config's store).")] = None,
    map_encoding: Annotated[Optional[str], typer.Option(help="float16 (exact), bitround-K (K = 1..9 mantissa bits kept) or uint8 (default: the config's).")] = None,
    from_trajectory: Annotated[bool, typer.Option(help="Add the --store tiers (maps, pooled) to a complete cache from its stored trajectory: one UNet pass per saved label and image, no VAE.")] = False,
    set_: SetOpt = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    nproc: Annotated[Optional[int], typer.Option(min=1, help="Ranks on this machine, one per device: launches torchrun, each rank writing its share of the shards (see README, Many GPUs and nodes).")] = None,
):
    """Run DiffusionSat once over a split and write its features to the Zarr cache.

    A killed run resumes where it stopped; shards marked done whose files are missing are
    extracted again, and --repair also re-extracts those `cache verify` finds damaged.
    --from-trajectory adds maps and/or pooled vectors to a cache that holds the trajectory.
    Under torchrun, every rank writes its share of the shards into the same store."""
    from pipeline.config import load_config
    from pipeline.distributed import RankExtraction, Ranks, launch, strip_nproc
    from pipeline.errors import UserError
    from pipeline.extract import Extraction, rate_text

    with user_errors():
        ranks = Ranks.from_env()
        if nproc and ranks is not None:
            raise UserError(f"--nproc {nproc} launches torchrun itself, but this process is already rank {ranks.rank} "
                            f"of {ranks.world}; leave --nproc out under torchrun")
        if from_trajectory and (ranks is not None or (nproc or 1) > 1):
            raise UserError("--from-trajectory runs in one process; start it without torchrun")
    if nproc and nproc > 1:
        raise typer.Exit(launch(nproc, strip_nproc(sys.argv[1:])))
    with user_errors():
        for flag, given, why in (("--overwrite", overwrite, "rebuilds it"), ("--repair", repair, "re-extracts its damaged shards")):
            if from_trajectory and given:
                raise UserError(f"--from-trajectory and {flag} contradict: --from-trajectory adds tiers to the cache as "
                                f"it is, {flag} {why}; give one of them")
        overrides = parse_overrides(set_ or [])
        if cache_dir:
            overrides["cache_dir"] = cache_dir
        overrides.update(storage_overrides(store, map_encoding))
        tiers = overrides.pop("store", None) if from_trajectory else None
        cfg = load_config(config, overrides)
        extraction = Extraction(cfg, device) if ranks is None else RankExtraction(cfg, ranks, device)
        splits = ["train", "val", "test"] if split is Split.all else [split.value]
        for name in splits:
            if from_trajectory:
                echo_fill(extraction.fill_from_trajectory(name, tiers=tiers, progress=progress, wait=wait))
                continue
            result = extraction.run(name, overwrite=overwrite, progress=progress and (ranks is None or ranks.leader),
                                    repair=repair, wait=wait)
            if ranks is not None and not ranks.leader:
                continue  # rank 0 reports for all
            rate = f", {rate_text(result.extracted, result.seconds)}" if result.extracted else " (already complete)"
            by = f" by {ranks.world} ranks" if ranks is not None and result.extracted else ""
            typer.echo(f"{result.path}: {result.num_samples} samples, {result.extracted} extracted{by}{rate}")
        if ranks is not None:
            extraction.close()


def echo_fill(result) -> None:
    if not result.added:
        typer.echo(f"{result.path}: holds {','.join(result.already)} already; nothing to fill")
        return
    from pipeline.extract import rate_text

    done = f"{result.filled} filled, {result.unet_passes} UNet passes, {rate_text(result.filled, result.seconds)}" \
        if result.filled else "every shard was filled before"
    typer.echo(f"{result.path}: {result.num_samples} samples, now holds {','.join(result.added)} from the trajectory "
               f"({done})")


@app.command()
def fit(
    config: ConfigArg,
    fuser: Annotated[Optional[Fuser], typer.Option(help="Fuser (default: the config's).")] = None,
    partition: Annotated[Optional[str], typer.Option(help="GEO-Bench partition to train on ('default', '0.10x_train', ...): its training samples, found by name in the train cache (sets train_partition).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: <exp_folder>/<dataset>/<fuser>/<partition>/seed<seed>, as the DVC stages).")] = None,
    cache_dir: Annotated[Optional[str], typer.Option(help="Cache root holding <dataset>/<split>.zarr.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 or auto (default: the config's).")] = None,
    source: Annotated[Optional[Source], typer.Option(help="Features from the cache's maps, recomputed from its stored trajectory (one UNet pass per timestep), or live through the whole backbone every batch (the reference's way; for measuring). Default: the config's source, else maps when the cache holds them, else trajectory.")] = None,
    live: Annotated[bool, typer.Option(help="The same as --source live.")] = False,
    set_: SetOpt = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Train a fuser and head on cached features; writes metrics.json, the model and plots."""
    from pipeline.config import load_config
    from pipeline.errors import UserError
    from pipeline.fit import fit as run_fit

    with user_errors():
        overrides = parse_overrides(set_ or [])
        if fuser:
            overrides["fuser"] = fuser.value
        if partition:
            overrides["train_partition"] = partition
        cfg = load_config(config, overrides)
        if not out:  # as dvc.yaml lays them out
            out = Path(cfg.exp_folder) / cfg.dataset_name / cfg.fuser / cfg.train_partition / f"seed{cfg.seed}"
        if live and source not in (None, Source.live):
            raise UserError(f"--live and --source {source.value} disagree; give one of them")
        asked = "live" if live else source and source.value
        metrics = run_fit(cfg, out, device=device, source=asked, cache_dir=cache_dir, progress=progress)
    select = metrics["selection_metric"]
    typer.echo(f"{out}: val {select} {metrics['val'][select]:.4f}, test {select} {metrics['test'][select]:.4f} "
               f"({metrics['epochs_run']} epochs, {metrics['train_seconds']:.0f} s)")


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="A saved model folder (…/model), or a Hub repo id (user/name).")],
    config: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="The experiment config it was trained with.")],
    split: Annotated[Split, typer.Option(help="Split to evaluate.")] = Split.test,
    cache_dir: Annotated[Optional[str], typer.Option(help="Cache root holding <dataset>/<split>.zarr.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or auto (default: the config's).")] = None,
    set_: SetOpt = None,
):
    """Evaluate a saved model on a split's cache and print the metrics as JSON."""
    from pipeline.config import load_config
    from pipeline.fit import evaluate_saved

    if split is Split.all:
        raise typer.BadParameter("choose one split", param_hint="--split")
    with user_errors():
        cfg = load_config(config, parse_overrides(set_ or []))
        metrics = evaluate_saved(cfg, model, split.value, cache_dir, device)
    typer.echo(json.dumps(metrics, indent=1))


@app.command("import-reference")
def import_reference(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint the reference's run.py saved (best_ckpt_step_*.pth).")],
    config: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="The experiment config it was trained with.")],
    out: Annotated[Path, typer.Option(help="The model folder to write (config.json, model.safetensors).")],
    cache_dir: Annotated[Optional[str], typer.Option(help="Cache root holding <dataset>/<split>.zarr.")] = None,
    set_: SetOpt = None,
):
    """Turn a head trained by the reference code into a saved model that `evaluate` reads."""
    from pipeline.config import load_config
    from pipeline.reference_checkpoint import import_reference as convert

    with user_errors():
        cfg = load_config(config, parse_overrides(set_ or []))
        folder = convert(checkpoint, cfg, out, cache_dir)
    typer.echo(f"{folder}: {cfg.fuser} head from {checkpoint}; evaluate it with "
               f"`satdifuser evaluate {folder} --config {config}`")


@app.command()
def probe(
    cache: Annotated[str, typer.Option(help="Folder (or URL) holding the task's train.zarr, val.zarr and test.zarr.")],
    out: Annotated[Path, typer.Option(help="Output folder for probe_map.json/.csv, heatmap.png and metrics.json.")],
    partition: Annotated[Optional[list[str]], typer.Option(help="A '<f>x_train' partition for the label-efficiency curve (repeatable), or 'all'.")] = None,
    seeds: Annotated[int, typer.Option(min=0, help="Random draws of each partition's size, besides the partition itself.")] = 0,
    geobench_dir: Annotated[Optional[Path], typer.Option(help="GEO-Bench root, for partitions (default: $GEO_BENCH_DIR).")] = None,
    jobs: Annotated[Optional[int], typer.Option(min=1, help="Probes fitted in parallel (default: settings' n_jobs).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="A probe setting: key=value, e.g. c_grid=[0.1,1] (repeatable).")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Run the probes on Dask: local (threads), processes (n_jobs worker processes), tcp://HOST:PORT or a scheduler file (default: here, without Dask).")] = None,
    scheduler_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for a --scheduler address to answer.")] = 10.0,
):
    """Probe every timestep x layer of a cache with scikit-learn; never loads the backbone."""
    import logging
    import os

    from pipeline.probe import ProbeError, ProbeSettings
    from pipeline.probing import TaskInfo, open_task_caches, run_probe

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with user_errors():
        values = parse_overrides(set_ or [])
        if jobs:
            values["n_jobs"] = jobs
        settings = ProbeSettings.from_dict(values, "--set")
        task_dir = None
        if partition:
            root = geobench_dir or os.environ.get("GEO_BENCH_DIR")
            info = TaskInfo.of(open_task_caches(cache))
            if root and not info.geobench_task:
                raise ProbeError(f"--partition: {cache} records no GEO-Bench task folder, so its partitions cannot be found")
            if root:
                task_dir = Path(root) / info.geobench_task
        metrics = run_probe(cache, out, settings, task_dir, partition, seeds, scheduler=scheduler,
                            scheduler_timeout=scheduler_timeout)
    for name in ("best_layer", "best_timestep", "all"):
        if name in metrics:
            m = metrics[name]
            typer.echo(f"{name:>13}: {m['timestep']} {m['layer']}: val {m['val']:.4f}, test {metrics['metric']} {m['test']:.4f}")
    typer.echo(f"wrote {out}/probe_map.json, probe_map.csv, heatmap.png and metrics.json ({metrics['seconds']:.0f} s)")


@cache_app.command("info")
def cache_info(
    path: Annotated[str, typer.Argument(help="Cache path or URL (.../<split>.zarr).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Layers, timesteps, shapes, bytes on disk, compression and provenance of a cache."""
    from pipeline.cache.audit import cache_info as info_of
    from pipeline.cache.reader import open_cache

    with user_errors():
        info = info_of(open_cache(path))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(format_info(info))


def format_info(info: dict) -> str:
    mib = 1 << 20
    ds, ex = info["dataset"], info["extraction"]
    tiers = ", ".join(info["tiers"]) + (f"; maps {info['map_encoding']}" if info["map_encoding"] else "")
    per_tier = ", ".join(f"{t} {b / 1024:.1f}" for t, b in info["bytes_per_image_by_tier"].items())
    lines = [
        f"cache        {info['path']}",
        f"samples      {info['done']} of {info['num_samples']} done ({ds['name']} / {ds['split']}, partition {ds['partition']})",
        f"backbone     {info['backbone']}  ({ex['mode']}, {ex['num_timesteps']} steps, {ex['precision']}, prompt {ex['prompt']!r})",
        "timesteps    " + ", ".join(f"{k} (UNet t={v})" for k, v in info["timesteps"].items()),
        f"tiers        {tiers}",
        f"on disk      {info['bytes_on_disk'] / mib:.1f} MiB, {info['bytes_per_image'] / 1024:.1f} KiB per image ({per_tier} KiB); "
        f"features {info['feature_bytes_on_disk'] / mib:.1f} MiB of {info['feature_bytes_raw_fp16'] / mib:.1f} MiB fp16 "
        f"(ratio {info['compression_ratio']}, codec {info['codec']}, shards of {info['shard_size']})",
    ]
    errors = info["map_error"]
    if errors:
        worst = errors["worst"]
        lines.append(f"map error    worst relative L2 {100 * worst['rel_l2']:.3f} % ({worst['layer']}), max abs "
                     f"{errors['max_abs']:.4g}, against the exact float16 maps of {worst['images']} images")
    lines += [
        f"cost         {info['unet_passes_per_image']} UNet passes per image; ledger {info['ledger']}",
        f"created      {info['created']} (code {info['code_version']})",
    ]
    lacking = info["done_shards_lacking_files"]
    if lacking:
        lines.append(f"problem      {len(lacking)} shard(s) marked done lack stored objects ({sorted(lacking)}); "
                     f"`satdifuser cache verify {info['path']}` names them")
    lines.append(f"layers       {len(info['layers'])} (layer_idxs {info['layer_idxs']}):")
    lines += [f"  {name:<24} {'x'.join(map(str, shape)):<12}{_layer_error(errors, name)}".rstrip()
              for name, shape in info["layers"].items()]
    return "\n".join(lines)


def _layer_error(errors: dict, layer: str) -> str:
    """The layer's worst error over its timesteps, as `cache info` lists it."""
    mine = {k: e for k, e in (errors.get("per_layer") or {}).items() if k.split("/", 1)[1] == layer}
    if not mine:
        return ""
    rel, max_abs = max(e["rel_l2"] for e in mine.values()), max(e["max_abs"] for e in mine.values())
    return f" relative L2 {100 * rel:.3f} %, max abs {max_abs:.4g} (worst of {len(mine)} timesteps)"


@cache_app.command("plan")
def cache_plan(
    config: ConfigArg,
    images: Annotated[Optional[int], typer.Option(help="Plan this many images per split instead of the GEO-Bench task's counts.")] = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Bytes per tier and map encoding for each split, and UNet passes per training image and epoch
    for each fit source, before anything is extracted; loads no weights."""
    from pipeline.cache.planning import format_plan, plan_report
    from pipeline.config import load_config

    with user_errors():
        report = plan_report(load_config(config, parse_overrides(set_ or [])), images)
    typer.echo(json.dumps(report, indent=2) if as_json else format_plan(report))


@cache_app.command("verify")
def cache_verify(path: Annotated[str, typer.Argument(help="Cache path or URL (.../<split>.zarr).")]):
    """Check that every unit is done and every array is present, readable and consistent."""
    from pipeline.cache.audit import verify_cache
    from pipeline.cache.reader import open_cache

    with user_errors():
        problems = verify_cache(open_cache(path))
    for line in problems:
        typer.echo(f"problem: {line}", err=True)
    if problems:
        typer.echo(f"{path}: {len(problems)} problem(s); `satdifuser extract CONFIG --split SPLIT --repair` "
                   "re-extracts the shards named", err=True)
        raise typer.Exit(1)
    typer.echo(f"{path}: ok")


@task_app.command("inspect")
def task_inspect(
    task_dir: Annotated[Path, typer.Argument(help="A GEO-Bench task folder, e.g. $GEO_BENCH_DIR/classification_v1.0/m-eurosat.")],
    config: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False, help="Check the bands and band_scale of this experiment config (default: the known task of the folder's name).")] = None,
    samples: Annotated[int, typer.Option(min=1, help="Images read, spread evenly over the task's sample files.")] = 32,
    clip_warn: Annotated[float, typer.Option(min=0, max=1, help="Warn when the scaling clips more than this share of a band's values.")] = 0.03,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Per band dtype and value range, label values, split and partition sizes of a task, and the
    share of pixels the configured scaling would clip."""
    from pipeline.data.inspect import format_inspection, inspect_task

    with user_errors():
        report = inspect_task(task_dir, samples, str(config) if config else None, clip_warn)
    typer.echo(json.dumps(report, indent=2) if as_json else format_inspection(report))


@demo_app.command("data")
def demo_data(
    out: Annotated[Path, typer.Option(help="GEO-Bench root to write the demo tasks into.")] = Path("data/geobench"),
    overwrite: Annotated[bool, typer.Option(help="Replace existing demo tasks.")] = False,
):
    """Cut the Sentinel-2 demo scene into GEO-Bench classification and segmentation tasks."""
    from pipeline.data.demo import build_demo_tasks

    with user_errors():
        summary = build_demo_tasks(out, overwrite=overwrite)
    typer.echo(f"demo tasks written to {out}: {summary['split_sizes']}")


@demo_app.command("backbone")
def demo_backbone(
    out: Annotated[Path, typer.Option(help="Checkpoint root to write the tiny DiffusionSat into.")] = Path("models/demo-diffusionsat"),
    img_size: Annotated[int, typer.Option(help="Image size it is built for (folder resolution{img_size}).")] = 128,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing demo backbone.")] = False,
):
    """Write a tiny random DiffusionSat in the published checkpoint layout."""
    from pipeline.backbone.demo import build_demo_backbone

    with user_errors():
        path = build_demo_backbone(out, img_size=img_size, overwrite=overwrite)
    typer.echo(f"demo backbone written to {path}")


def main():
    app()


if __name__ == "__main__":
    sys.exit(main())
