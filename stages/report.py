"""Stage report: every metric of the pipeline in reports/summary.md and .csv, with the cost ledger."""

from pipeline.report import write_report
from stages import params, run


def main() -> None:
    p = params("report")
    totals = write_report(p.get("out", "reports"), "experiments", "probes", "cache")
    print(f"reports: {totals['unet_passes_spent']:,} UNet passes spent, {totals['reference_unet_passes']:,} "
          f"for the reference's same fits ({totals['ratio']}x)")


if __name__ == "__main__":
    run(main)
