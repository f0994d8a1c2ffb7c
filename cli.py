"""The ``satdifuser`` command line: extract features once, inspect and verify caches, fit, probe
and report. The DVC stages (dvc.yaml) run these same commands with ``--params params.yaml``."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup


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


class Commands(TyperGroup):
    """Every command, sub-commands included, runs inside this group's invoke: its user errors are
    turned into one line here."""

    def invoke(self, ctx):
        with user_errors():
            return super().invoke(ctx)


app = typer.Typer(cls=Commands, add_completion=False, no_args_is_help=True, help=__doc__)
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check feature caches.")
demo_app = typer.Typer(no_args_is_help=True, help="Build the embedded demo task and backbone.")
task_app = typer.Typer(no_args_is_help=True, help="Inspect GEO-Bench task folders.")
app.add_typer(cache_app, name="cache")
app.add_typer(task_app, name="task")
app.add_typer(demo_app, name="demo")

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a record comes, so a swapped stderr (a test runner's) is
    never written to after it is closed."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def configure_logging(level: int) -> None:
    """One stderr handler on the root logger, whatever ran before (commands run many times in one
    process under tests)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(handler)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)


def show_version(asked: bool) -> None:
    if not asked:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        typer.echo(f"satdifuser {version('satdifuser-cache')}")
    except PackageNotFoundError:
        typer.echo("error: the satdifuser-cache package is not installed, so it has no version; "
                   "install it with `pip install -e .`", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(0)


@app.callback()
def options(
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Log DEBUG lines too.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Log warnings and errors only.")] = False,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=show_version,
                                          help="Print the version and exit.")] = False,
):
    from pipeline.errors import UserError

    if verbose and quiet:
        raise UserError("-v (--verbose) and -q (--quiet) contradict; give one of them")
    configure_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


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


class EvalSplit(str, Enum):
    train = "train"
    val = "val"
    test = "test"


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


def config_overrides(set_: list[str] | None, cache_dir: str | None = None, geobench_dir: str | None = None,
                     backbone: str | None = None) -> dict:
    """The config keys from ``--set`` and the named path options (which win over ``--set``)."""
    out = parse_overrides(set_ or [])
    named = {"cache_dir": cache_dir, "geobench_dir": geobench_dir, "pretrained_model_name_or_path": backbone}
    out.update({key: value for key, value in named.items() if value})
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
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: key=value (repeatable).")]
CacheDirOpt = Annotated[str | None, typer.Option(help="Cache root holding <dataset>/<split>.zarr: a folder or an fsspec URL "
                                                      "(sets cache_dir; default: the config's).")]
GeobenchOpt = Annotated[str | None, typer.Option(help="GEO-Bench root (sets geobench_dir; default: the config's, else "
                                                      "$GEO_BENCH_DIR).")]
BackboneOpt = Annotated[str | None, typer.Option(help="DiffusionSat checkpoint root or Hub id (sets "
                                                      "pretrained_model_name_or_path; default: the config's).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, mps or auto (default: the config's).")]
ParamsOpt = Annotated[Path | None, typer.Option(help="Read this command's section of a params.yaml, as the DVC stage does; "
                                                     "options given explicitly win.")]


@app.command()
def extract(
    config: ConfigArg,
    split: Annotated[Split, typer.Option(help="Split to extract.")] = Split.all,
    device: DeviceOpt = None,
    cache_dir: CacheDirOpt = None,
    geobench_dir: GeobenchOpt = None,
    backbone: BackboneOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a cache built with other settings.")] = False,
    repair: Annotated[bool, typer.Option(help="Verify the cache (every checksum) and re-extract the shards found "
                                              "damaged.")] = False,
    wait: Annotated[bool, typer.Option(help="If another extraction is writing the cache, wait for it instead of "
                                            "stopping.")] = False,
    store: Annotated[str | None, typer.Option(help="Tiers to store, comma-separated: maps,pooled,trajectory (default: the "
                                                   "config's store).")] = None,
    map_encoding: Annotated[str | None, typer.Option(help="float16 (exact), bitround-K (K = 1..9 mantissa bits kept) or uint8 "
                                                          "(default: the config's).")] = None,
    from_trajectory: Annotated[bool, typer.Option(help="Add the --store tiers (maps, pooled) to a complete cache from its "
                                                       "stored trajectory: one UNet pass per saved label and image, no "
                                                       "VAE.")] = False,
    set_: SetOpt = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    nproc: Annotated[int | None, typer.Option(min=1, help="Ranks on this machine, one per device: launches torchrun, each rank "
                                                          "writing its share of the shards (see README, Many GPUs and "
                                                          "nodes).")] = None,
    params: ParamsOpt = None,
):
    """Run DiffusionSat once over a split and write its features to the Zarr cache.

    A killed run resumes where it stopped; shards marked done whose files are missing are
    extracted again, and --repair also re-extracts those `cache verify` finds damaged.
    --from-trajectory adds maps and/or pooled vectors to a cache that holds the trajectory.
    Under torchrun, every rank writes its share of the shards into the same store.
    With --params (the DVC stage): the section `extract` (device, overrides), a cache built with
    other settings is replaced, the cache must be where dvc.yaml declares it, and no progress bar."""
    from pipeline.config import load_config
    from pipeline.errors import UserError
    from pipeline.extract.distributed import RankExtraction, Ranks, launch, strip_nproc
    from pipeline.extract.run import Extraction, rate_text
    from pipeline.params import check_declared_output, read_params, section

    ranks = Ranks.from_env()
    if nproc and ranks is not None:
        raise UserError(f"--nproc {nproc} launches torchrun itself, but this process is already rank {ranks.rank} "
                        f"of {ranks.world}; leave --nproc out under torchrun")
    if from_trajectory and (ranks is not None or (nproc or 1) > 1):
        raise UserError("--from-trajectory runs in one process; start it without torchrun")
    if nproc and nproc > 1:
        raise typer.Exit(launch(nproc, strip_nproc(sys.argv[1:])))
    for flag, given, why in (("--overwrite", overwrite, "rebuilds it"), ("--repair", repair, "re-extracts its damaged shards")):
        if from_trajectory and given:
            raise UserError(f"--from-trajectory and {flag} contradict: --from-trajectory adds tiers to the cache as "
                            f"it is, {flag} {why}; give one of them")
    overrides = {**config_overrides(set_, cache_dir, geobench_dir, backbone), **storage_overrides(store, map_encoding)}
    data = read_params(params) if params else None
    if params:
        p = section(params, "extract", data)
        overrides = {**(p.get("overrides") or {}), **overrides}
        device = device or p.get("device")
        progress = False
    tiers = overrides.pop("store", None) if from_trajectory else None
    cfg = load_config(config, overrides)
    splits = ["train", "val", "test"] if split is Split.all else [split.value]
    if params:
        for name in splits:
            check_declared_output(config, cfg, name, data, params)
    extraction = Extraction(cfg, device) if ranks is None else RankExtraction(cfg, ranks, device)
    for name in splits:
        if from_trajectory:
            echo_fill(extraction.fill_from_trajectory(name, tiers=tiers, progress=progress, wait=wait))
            continue
        result = extraction.run(name, overwrite=overwrite, progress=progress and (ranks is None or ranks.leader),
                                repair=repair, wait=wait, replace_mismatched=params is not None)
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
    from pipeline.extract.run import rate_text

    done = f"{result.filled} filled, {result.unet_passes} UNet passes, {rate_text(result.filled, result.seconds)}" \
        if result.filled else "every shard was filled before"
    typer.echo(f"{result.path}: {result.num_samples} samples, now holds {','.join(result.added)} from the trajectory "
               f"({done})")


@app.command()
def fit(
    config: ConfigArg,
    fuser: Annotated[Fuser | None, typer.Option(help="Fuser (default: the config's).")] = None,
    partition: Annotated[str | None, typer.Option(help="GEO-Bench partition to train on ('default', '0.10x_train', ...): its "
                                                       "training samples, found by name in the train cache (sets "
                                                       "train_partition).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Training seed: the model's initialisation and batch order (sets "
                                                         "seed).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: "
                                                  "<exp_folder>/<dataset>/<fuser>/<partition>/seed<seed>, as the DVC stages); "
                                                  "with --params, the runs' root <out>/<partition>/seed<seed>.")] = None,
    scores: Annotated[Path | None, typer.Option(help="Also write each run's test score, by <partition>/seed<seed>, to this JSON "
                                                     "file (for dvc metrics).")] = None,
    cache_dir: CacheDirOpt = None,
    geobench_dir: GeobenchOpt = None,
    backbone: BackboneOpt = None,
    device: DeviceOpt = None,
    source: Annotated[Source | None, typer.Option(help="Features from the cache's maps, recomputed from its stored trajectory "
                                                       "(one UNet pass per timestep), or live through the whole backbone every "
                                                       "batch (the reference's way; for measuring). Default: the config's "
                                                       "source, else maps when the cache holds them, else trajectory.")] = None,
    live: Annotated[bool, typer.Option(help="The same as --source live.")] = False,
    set_: SetOpt = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    params: ParamsOpt = None,
):
    """Train a fuser and head on cached features; writes metrics.json, the model and plots.

    With --params (the DVC stage), every partition x seed of the section `fit` (partitions, seeds,
    overrides, device) into --out/<partition>/seed<seed>/, skipping the runs already done with the
    same inputs; --partition and --seed given explicitly replace the section's lists."""
    from pipeline.errors import UserError

    if live and source not in (None, Source.live):
        raise UserError(f"--live and --source {source.value} disagree; give one of them")
    overrides = config_overrides(set_, cache_dir, geobench_dir, backbone)
    asked = "live" if live else source and source.value
    if params:
        run_scores = fit_runs(config, params, fuser, partition, seed, out, overrides, device, asked)
    else:
        run_scores = fit_one(config, fuser, partition, seed, out, overrides, device, asked, progress)
    if scores:
        scores.parent.mkdir(parents=True, exist_ok=True)
        scores.write_text(json.dumps(run_scores, indent=2) + "\n")


def fit_one(config, fuser, partition, seed, out, overrides, device, source, progress) -> dict[str, float]:
    from pipeline.config import load_config
    from pipeline.fit.run import fit as run_fit

    named = {"fuser": fuser and fuser.value, "train_partition": partition, "seed": seed}
    cfg = load_config(config, {**overrides, **{k: v for k, v in named.items() if v is not None}})
    if not out:  # as dvc.yaml lays them out
        out = Path(cfg.exp_folder) / cfg.dataset_name / cfg.fuser / cfg.train_partition / f"seed{cfg.seed}"
    metrics = run_fit(cfg, out, device=device, source=source, cache_dir=overrides.get("cache_dir"), progress=progress)
    select = metrics["selection_metric"]
    typer.echo(f"{out}: val {select} {metrics['val'][select]:.4f}, test {select} {metrics['test'][select]:.4f} "
               f"({metrics['epochs_run']} epochs, {metrics['train_seconds']:.0f} s)")
    return {f"{cfg.train_partition}/seed{cfg.seed}": metrics["test_score"]}


def fit_runs(config, params, fuser, partition, seed, out, overrides, device, source) -> dict[str, float]:
    """The grid of the params file's fit section, as the DVC stage runs it."""
    from pipeline.config import load_config
    from pipeline.errors import UserError
    from pipeline.fit.grid import fit_grid
    from pipeline.params import section

    p = section(params, "fit")
    if not out:
        raise UserError(f"--params {params} fits every partition x seed into --out/<partition>/seed<seed>; "
                        "give --out, e.g. --out experiments/<dataset>/<fuser>")
    overrides = {**(p.get("overrides") or {}), **overrides, **({"source": source} if source else {})}
    name = fuser.value if fuser else load_config(config, overrides).fuser
    partitions = [partition] if partition else p.get("partitions", ["default"])
    seeds = [seed] if seed is not None else p.get("seeds", [42])
    run_scores = fit_grid(config, name, partitions, seeds, out, overrides, device or p.get("device"))
    typer.echo(f"{out}: {len(run_scores)} runs, test " + ", ".join(f"{k} {v:.4f}" for k, v in run_scores.items()))
    return run_scores


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="A saved model folder (…/model), or a Hub repo id (user/name).")],
    config: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="The experiment config it was trained with.")],
    split: Annotated[EvalSplit, typer.Option(help="Split to evaluate.")] = EvalSplit.test,
    cache_dir: CacheDirOpt = None,
    geobench_dir: GeobenchOpt = None,
    backbone: BackboneOpt = None,
    device: DeviceOpt = None,
    set_: SetOpt = None,
):
    """Evaluate a saved model on a split's cache and print the metrics as JSON."""
    from pipeline.config import load_config
    from pipeline.fit.run import evaluate_saved

    cfg = load_config(config, config_overrides(set_, cache_dir, geobench_dir, backbone))
    metrics = evaluate_saved(cfg, model, split.value, cache_dir, device)
    typer.echo(json.dumps(metrics, indent=1))


@app.command("import-reference")
def import_reference(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint the reference's run.py saved (best_ckpt_step_*.pth).")],
    config: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="The experiment config it was trained with.")],
    out: Annotated[Path, typer.Option(help="The model folder to write (config.json, model.safetensors).")],
    cache_dir: CacheDirOpt = None,
    geobench_dir: GeobenchOpt = None,
    backbone: BackboneOpt = None,
    set_: SetOpt = None,
):
    """Turn a head trained by the reference code into a saved model that `evaluate` reads."""
    from pipeline.config import load_config
    from pipeline.reference_checkpoint import import_reference as convert

    cfg = load_config(config, config_overrides(set_, cache_dir, geobench_dir, backbone))
    folder = convert(checkpoint, cfg, out, cache_dir)
    typer.echo(f"{folder}: {cfg.fuser} head from {checkpoint}; evaluate it with "
               f"`satdifuser evaluate {folder} --config {config}`")


def task_folder(cache_dir: str, dataset: str) -> str:
    """``<cache_dir>/<dataset>``, which must hold the task's caches (a URL is checked when opened)."""
    from pipeline.cache.store import is_url
    from pipeline.probe.map import ProbeError

    folder = f"{cache_dir.rstrip('/')}/{dataset}"
    if is_url(folder) or Path(folder).is_dir():
        return folder
    if not Path(cache_dir).is_dir():
        raise ProbeError(f"--cache-dir {cache_dir} does not exist; give the cache root that holds "
                         f"<dataset>/<split>.zarr (the config's cache_dir)")
    there = sorted(p.name for p in Path(cache_dir).iterdir() if (p / "train.zarr").exists())
    raise ProbeError(f"--dataset {dataset}: {folder} does not exist; --cache-dir {cache_dir} holds "
                     + (", ".join(there) if there else "no task caches"))


@app.command()
def probe(
    dataset: Annotated[str, typer.Option(help="The task's folder under --cache-dir (its dataset_name), holding train.zarr, "
                                              "val.zarr and test.zarr.")],
    out: Annotated[Path, typer.Option(help="Output folder for probe_map.json/.csv, heatmap.png, metrics.json and "
                                          "run.json.")],
    cache_dir: Annotated[str, typer.Option(help="Cache root holding <dataset>/<split>.zarr: a folder or an fsspec "
                                                "URL.")] = "cache",
    partition: Annotated[list[str] | None, typer.Option(help="A '<f>x_train' partition for the label-efficiency curve "
                                                             "(repeatable), or 'all'.")] = None,
    seeds: Annotated[int | None, typer.Option(min=0, help="Random draws of each partition's size, besides the partition itself "
                                                          "(default 0).")] = None,
    geobench_dir: Annotated[str | None, typer.Option(help="GEO-Bench root, for partitions (default: $GEO_BENCH_DIR).")] = None,
    jobs: Annotated[int | None, typer.Option(min=1, help="Probes fitted in parallel (default: settings' n_jobs).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="A probe setting: key=value, e.g. c_grid=[0.1,1] "
                                                                 "(repeatable).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Run the probes on Dask: local (threads), processes (n_jobs worker "
                                                       "processes), tcp://HOST:PORT or a scheduler file (default: here, without "
                                                       "Dask).")] = None,
    scheduler_timeout: Annotated[float | None, typer.Option(min=0.1, help="Seconds to wait for a --scheduler address to answer "
                                                                          "(default 10).")] = None,
    params: ParamsOpt = None,
):
    """Probe every timestep x layer of a task's caches with scikit-learn; never loads the backbone.

    With --params (the DVC stage), the section `probe` (partitions, seeds, settings, scheduler,
    scheduler_timeout); options given explicitly win, --set over the section's settings."""
    import os

    from pipeline.cluster import CONNECT_TIMEOUT
    from pipeline.outputs import output_folder
    from pipeline.params import section
    from pipeline.probe.map import ProbeError, ProbeSettings
    from pipeline.probe.run import TaskInfo, open_task_caches, run_probe

    p = section(params, "probe") if params else {}
    values = dict(p.get("settings") or {})
    if params:
        ProbeSettings.from_dict(values, f"{params} probe.settings")
    values.update(parse_overrides(set_ or []))
    if jobs:
        values["n_jobs"] = jobs
    settings = ProbeSettings.from_dict(values, "--set")
    partitions = partition or p.get("partitions") or None
    if isinstance(partitions, str):  # "all"
        partitions = [partitions]
    output_folder(out)  # an unusable --out is said first, as run_probe says it before any work
    cache = task_folder(cache_dir, dataset)
    task_dir = None
    if partitions:
        root = geobench_dir or os.environ.get("GEO_BENCH_DIR")
        info = TaskInfo.of(open_task_caches(cache))
        if root and not info.geobench_task:
            raise ProbeError(f"--partition: {cache} records no GEO-Bench task folder, so its partitions cannot be found")
        if root:
            task_dir = Path(root) / info.geobench_task
    metrics = run_probe(cache, out, settings, task_dir, partitions, int(p.get("seeds", 0)) if seeds is None else seeds,
                        scheduler=scheduler or p.get("scheduler"),
                        scheduler_timeout=scheduler_timeout or p.get("scheduler_timeout", CONNECT_TIMEOUT))
    for name in ("best_layer", "best_timestep", "all"):
        if name in metrics:
            m = metrics[name]
            typer.echo(f"{name:>13}: {m['timestep']} {m['layer']}: val {m['val']:.4f}, test {metrics['metric']} {m['test']:.4f}")
    typer.echo(f"wrote {out}/probe_map.json, probe_map.csv, heatmap.png, metrics.json and run.json "
               f"({metrics['seconds']:.0f} s)")


@app.command()
def report(
    params: Annotated[Path, typer.Option(help="The params.yaml naming the grid (tasks x fit.fusers x fit.partitions x "
                                              "fit.seeds) and its section `report`.")] = Path("params.yaml"),
    out: Annotated[str | None, typer.Option(help="Folder of the tables, plots and ledger (default: the section's out, else "
                                                 "reports).")] = None,
    cache_dir: Annotated[str, typer.Option(help="Cache root holding <dataset>/<split>.zarr, for the cost ledger.")] = "cache",
    geobench_dir: Annotated[str | None, typer.Option(help="GEO-Bench root, for its normalizer.json (default: the params' "
                                                          "geobench_root).")] = None,
):
    """Report the runs a params.yaml names: tables, IQM, plots, the cost ledger and leaderboard files.

    The grid is tasks x fit.fusers x fit.partitions x fit.seeds (only those runs); the section
    `report` sets the folders (out, leaderboard.out), the bootstrap and the leaderboard's fields."""
    from pipeline.params import read_params, report_out, section
    from pipeline.report.aggregate import Bootstrap
    from pipeline.report.run import Grid, Leaderboard, write_report

    data = read_params(params)
    p = section(params, "report", data)
    out = out or report_out(params, p)
    grid = Grid.from_params(data, str(params))
    boot = Bootstrap.from_dict(p.get("bootstrap") or {}, f"{params} report.bootstrap")
    board = Leaderboard.from_dict(p.get("leaderboard") or {}, f"{params} report.leaderboard")
    totals = write_report(grid, out, "experiments", "probes", cache_dir, geobench_dir or data.get("geobench_root"),
                          boot, board)
    typer.echo(f"{out}: {totals['fits']} fits; {totals['unet_passes_spent']:,} UNet passes spent, "
               f"{totals['reference_unet_passes']:,} for the reference's same fits ({totals['ratio']}x); "
               f"leaderboard in {board.out}/")


@cache_app.command("info")
def cache_info(
    path: Annotated[str, typer.Argument(help="Cache path or URL (.../<split>.zarr).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Layers, timesteps, shapes, bytes on disk, compression and provenance of a cache."""
    from pipeline.cache.audit import cache_info as info_of
    from pipeline.cache.reader import open_cache

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
        f"backbone     {info['backbone']}  ({ex['mode']}, {ex['num_timesteps']} steps, {ex['precision']}, prompt "
        f"{ex['prompt']!r})",
        "timesteps    " + ", ".join(f"{k} (UNet t={v})" for k, v in info["timesteps"].items()),
        f"tiers        {tiers}",
        f"on disk      {info['bytes_on_disk'] / mib:.1f} MiB, {info['bytes_per_image'] / 1024:.1f} KiB per image ({per_tier} "
        f"KiB); "
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
    images: Annotated[int | None, typer.Option(help="Plan this many images per split instead of the GEO-Bench task's "
                                                    "counts.")] = None,
    cache_dir: CacheDirOpt = None,
    geobench_dir: GeobenchOpt = None,
    backbone: BackboneOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Bytes per tier and map encoding for each split, and UNet passes per training image and epoch
    for each fit source, before anything is extracted; loads no weights."""
    from pipeline.cache.planning import format_plan, plan_report
    from pipeline.config import load_config

    report = plan_report(load_config(config, config_overrides(set_, cache_dir, geobench_dir, backbone)), images)
    typer.echo(json.dumps(report, indent=2) if as_json else format_plan(report))


@cache_app.command("verify")
def cache_verify(path: Annotated[str, typer.Argument(help="Cache path or URL (.../<split>.zarr).")]):
    """Check that every unit is done and every array is present, readable and consistent."""
    from pipeline.cache.audit import verify_cache
    from pipeline.cache.reader import open_cache

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
    config: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="Check the bands and band_scale of this "
                                                                                  "experiment config (default: the known task "
                                                                                  "of the folder's name).")] = None,
    samples: Annotated[int, typer.Option(min=1, help="Images read, spread evenly over the task's sample files.")] = 32,
    clip_warn: Annotated[float, typer.Option(min=0, max=1, help="Warn when the scaling clips more than this share of a band's "
                                                                "values.")] = 0.03,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Per band dtype and value range, label values, split and partition sizes of a task, and the
    share of pixels the configured scaling would clip."""
    from pipeline.data.inspect import format_inspection, inspect_task

    report = inspect_task(task_dir, samples, str(config) if config else None, clip_warn)
    typer.echo(json.dumps(report, indent=2) if as_json else format_inspection(report))


@demo_app.command("data")
def demo_data(
    out: Annotated[Path | None, typer.Option(help="GEO-Bench root to write the demo tasks into (default: "
                                                  "data/geobench).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed of the samples' split (default 0).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing demo tasks.")] = False,
    params: ParamsOpt = None,
):
    """Cut the Sentinel-2 demo scene into GEO-Bench classification and segmentation tasks.

    With --params (the DVC stage), the section `demo_data` (root, patch_size, block_patches, seed, max_grid),
    replacing the tasks there."""
    from pipeline.data.demo import build_demo_tasks

    p = demo_params(params, "demo_data", seed=seed)
    root = out or Path(p.pop("root", "data/geobench"))
    summary = build_demo_tasks(root, overwrite=overwrite or params is not None, **p)
    typer.echo(f"demo tasks written to {root}: {summary['split_sizes']}")


@demo_app.command("backbone")
def demo_backbone(
    out: Annotated[Path | None, typer.Option(help="Checkpoint root to write the tiny DiffusionSat into (default: "
                                                  "models/demo-diffusionsat).")] = None,
    img_size: Annotated[int | None, typer.Option(help="Image size it is built for (folder resolution{img_size}; default "
                                                      "128).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed of its random weights (default 0).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing demo backbone.")] = False,
    params: ParamsOpt = None,
):
    """Write a tiny random DiffusionSat in the published checkpoint layout.

    With --params (the DVC stage), the section `demo_backbone` (root, img_size, seed), replacing
    the backbone there."""
    from pipeline.backbone.demo import build_demo_backbone

    p = demo_params(params, "demo_backbone", img_size=img_size, seed=seed)
    root = out or Path(p.pop("root", "models/demo-diffusionsat"))
    path = build_demo_backbone(root, overwrite=overwrite or params is not None, **p)
    typer.echo(f"demo backbone written to {path}")


def demo_params(params: Path | None, name: str, **given) -> dict:
    """The keyword arguments of a demo builder: the params section's, and the options given over them."""
    from pipeline.params import section

    p = section(params, name) if params else {}
    return {**p, **{key: value for key, value in given.items() if value is not None}}


def main():
    app()


if __name__ == "__main__":
    sys.exit(main())
