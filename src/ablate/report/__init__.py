"""Sweep reports: does an ablation's difference stand out of the seed noise?

    python -m ablate.report [RUN_ID] [--experiment NAME] [--sweep ID|all] [--metric val/loss] [--baseline k=v,...]

Runs that differ only by seed form a cell (mean ± 95% t-interval per metric); each cell is ranked against a
baseline cell (paired over seeds, else Welch); tables, plots and report.md go into a folder that is logged
to the sweep's parent run under `report/`.
"""
from ablate.report.build import build_report
from ablate.report.cli import main
from ablate.report.select import ReportError

__all__ = ["ReportError", "build_report", "main"]
