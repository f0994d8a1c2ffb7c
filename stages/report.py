"""Stage report: the grid params.yaml names (tasks x fit.fusers x fit.partitions x fit.seeds) in
reports/ (tables, IQM with bootstrap intervals, the label-efficiency plot, the cost ledger) and the
GEO-Bench leaderboard files in leaderboard/."""

from pathlib import Path

import yaml

from pipeline.aggregate import Bootstrap
from pipeline.config import ConfigError
from pipeline.report import Grid, Leaderboard, write_report
from stages import run

SECTION_KEYS = {"out", "bootstrap", "leaderboard"}


def main(path: str = "params.yaml") -> None:
    params = yaml.safe_load(Path(path).read_text()) or {}
    p = params.get("report") or {}
    unknown = set(p) - SECTION_KEYS
    if unknown:
        raise ConfigError(f"{path} report: unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(SECTION_KEYS))}")
    if not isinstance(p.get("out", "reports"), str) or not p.get("out", "reports"):
        raise ConfigError(f"{path} report.out: expected a folder name, found {p['out']!r}")
    for key in ("bootstrap", "leaderboard"):
        if not isinstance(p.get(key) or {}, dict):
            raise ConfigError(f"{path} report.{key}: expected a mapping, found {p[key]!r}")
    grid = Grid.from_params(params, path)
    boot = Bootstrap.from_dict(p.get("bootstrap") or {}, f"{path} report.bootstrap")
    board = Leaderboard.from_dict(p.get("leaderboard") or {}, f"{path} report.leaderboard")
    totals = write_report(grid, p.get("out", "reports"), "experiments", "probes", "cache",
                          params.get("geobench_root"), boot, board)
    print(f"reports: {totals['fits']} fits; {totals['unet_passes_spent']:,} UNet passes spent, "
          f"{totals['reference_unet_passes']:,} for the reference's same fits ({totals['ratio']}x); "
          f"leaderboard in {board.out}/")


if __name__ == "__main__":
    run(main)
