"""The sections of a params.yaml that the commands read with ``--params``, as the DVC stages run them.

Each command reads its own section; an unreadable file, a section that is not a mapping or a key
the command does not know is one ConfigError naming the file and the key.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from pipeline.config import ConfigError

# The keys each command's section may hold (params.yaml documents them).
SECTIONS = {
    "extract": {"device", "overrides"},
    "fit": {"device", "fusers", "partitions", "seeds", "overrides"},
    "probe": {"partitions", "seeds", "settings", "scheduler", "scheduler_timeout"},
    "report": {"out", "bootstrap", "leaderboard"},
    "demo_data": {"root", "patch_size", "block_patches", "seed", "max_grid"},
    "demo_backbone": {"root", "img_size", "seed"},
}
MAPPINGS = {"overrides", "settings", "bootstrap", "leaderboard"}  # keys whose value is itself a mapping


def read_params(path: str | Path) -> dict:
    """The whole params file, a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--params {path}: no such file; give the params.yaml the DVC stages read")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"--params {path} is not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--params {path}: expected a mapping of sections, found {type(data).__name__}")
    return data


def section(path: str | Path, name: str, data: dict | None = None) -> dict:
    """The ``name`` section of the params file (empty when absent), its keys checked."""
    data = read_params(path) if data is None else data
    values = data.get(name) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} {name}: expected a mapping, found {values!r}")
    allowed = SECTIONS[name]
    unknown = sorted(set(values) - allowed, key=str)
    if unknown:
        raise ConfigError(f"{path} {name}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    for key in MAPPINGS & set(values):
        if not isinstance(values[key] or {}, dict):
            raise ConfigError(f"{path} {name}.{key}: expected a mapping, found {values[key]!r}")
    return dict(values)


def report_out(path: str | Path, values: dict) -> str:
    """The report section's ``out`` folder (default ``reports``)."""
    out = values.get("out", "reports")
    if not isinstance(out, str) or not out:
        raise ConfigError(f"{path} report.out: expected a folder name, found {out!r}")
    return out


def task_entries(config: str | Path, data: dict) -> list[dict]:
    """The params ``tasks`` entries whose ``config`` is this experiment file
    (``configs/<config>_exp.yaml``, as dvc.yaml builds the path)."""
    target = os.path.normpath(config)
    return [t for t in data.get("tasks") or []
            if isinstance(t, dict) and os.path.normpath(f"configs/{t.get('config')}_exp.yaml") == target]


def check_declared_output(config: str | Path, cfg, split: str, data: dict, path: str | Path = "params.yaml") -> None:
    """dvc.yaml declares ``cache/<dataset>/<split>.zarr`` from the params ``tasks`` entry of this
    config; the extraction writes ``cfg.cache_path(split)``. Both must be the same place, or DVC
    would track an empty output and the cache would lie where nothing looks for it."""
    for entry in task_entries(config, data):
        declared = f"cache/{entry.get('dataset')}/{split}.zarr"
        if entry.get("dataset") != cfg.dataset_name:
            raise ConfigError(
                f"{path} tasks entry {entry}: dataset {entry.get('dataset')!r}, but {config} has dataset_name "
                f"{cfg.dataset_name!r}: the extraction would write {cfg.cache_path(split)} where dvc.yaml expects "
                f"{declared}; make the entry's dataset {cfg.dataset_name!r}")
        if os.path.abspath(declared) != os.path.abspath(cfg.cache_path(split)):
            raise ConfigError(
                f"{config}: cache_dir {cfg.cache_dir!r} puts the cache at {cfg.cache_path(split)}, but dvc.yaml "
                f"declares {declared} ({path} tasks entry {entry}); leave cache_dir at 'cache' under DVC")
