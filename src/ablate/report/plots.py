"""The report's PNG plots, drawn on matplotlib Figures (Agg canvas, no pyplot state)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from ablate.report.stats import mean_interval
from ablate.report.tables import Sweep, extrapolation_metrics, length_multiple

History = Callable[[str, str], tuple[list[int], list[float]]]  # (run id, metric) -> (steps, values)
BARS = (("throughput.png", "perf/tokens_per_s", "tokens / s"), ("memory.png", "perf/peak_mem_gib", "peak memory (GiB)"))


def curve_band(series: list[tuple[list[int], list[float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs' curves interpolated onto the steps they all cover: (steps, mean, 95% half-width)."""
    lo, hi = max(s[0] for s, _ in series), min(s[-1] for s, _ in series)
    steps = np.unique(np.concatenate([np.asarray(s) for s, _ in series]))
    steps = steps[(steps >= lo) & (steps <= hi)]
    ys = np.stack([np.interp(steps, s, v) for s, v in series])
    band = np.array([mean_interval(column.tolist()) for column in ys.T]).reshape(-1, 2)
    return steps, band[:, 0], band[:, 1]


def _figure(width: float = 7.0, height: float = 4.5):  # noqa: ANN202
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> None:  # noqa: ANN001
    fig.savefig(path, dpi=110, format="png")


def loss_vs_step(path: Path, sweep: Sweep, cells: list[str], history: History) -> bool:
    fig, ax = _figure()
    drawn = False
    for cell in cells:
        runs = sweep.runs.index[(sweep.runs.cell == cell) & sweep.runs.counted]
        series = [h for h in (history(r, "val/loss") for r in runs) if h[0]]
        if not series:
            continue
        steps, mean, half = curve_band(series)
        (line,) = ax.plot(steps, mean, marker=".", label=f"{cell} (n={len(series)})")
        if not np.isnan(half).all():
            ax.fill_between(steps, mean - half, mean + half, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    if drawn:
        ax.set(xlabel="step", ylabel="val/loss", title="val/loss: mean over seeds, band = 95% interval")
        ax.legend(fontsize="small")
        _save(fig, path)
    return drawn


def loss_vs_length(path: Path, table: pd.DataFrame, extrapolation: list[str]) -> bool:
    """val/loss against the evaluation length (multiples of the training context), one line per cell."""
    metrics = [m for m in extrapolation if f"{m} mean" in table]
    if not metrics or "val/loss mean" not in table:
        return False
    xs = [1] + [length_multiple(m) for m in metrics]
    fig, ax = _figure()
    drawn = False
    for cell, row in table.iterrows():
        means = [row[f"{m} mean"] for m in ("val/loss", *metrics)]
        if all(pd.isna(v) for v in means[1:]):
            continue
        halves = [0 if pd.isna(h) else h for h in (row[f"{m} ci95"] for m in ("val/loss", *metrics))]
        ax.errorbar(xs, means, yerr=halves, marker="o", capsize=3, label=cell)
        drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x}x" for x in xs])
        ax.set(xlabel="evaluation length (x training context)", ylabel="val/loss",
               title="Length extrapolation: mean over seeds ± 95% interval")
        ax.legend(fontsize="small")
        _save(fig, path)
    return drawn


def bars(path: Path, table: pd.DataFrame, metric: str, label: str) -> bool:
    if f"{metric} mean" not in table or table[f"{metric} mean"].isna().all():
        return False
    fig, ax = _figure(width=max(6.0, 0.9 * len(table) + 2), height=4.5)
    halves = table[f"{metric} ci95"].fillna(0)
    ax.bar(range(len(table)), table[f"{metric} mean"].fillna(0), yerr=halves, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(table)), list(table.index), rotation=30, ha="right", fontsize="small")
    ax.set(ylabel=label, title=f"{metric}: mean over seeds ± 95% interval")
    _save(fig, path)
    return True


def write_plots(folder: Path, sweep: Sweep, table: pd.DataFrame, history: History) -> list[tuple[str, str]]:
    """Draw every plot the data allows; returns (caption, file name) of those written."""
    written = []
    if loss_vs_step(folder / "val_loss_vs_step.png", sweep, list(table.index), history):
        written.append(("val/loss over training steps", "val_loss_vs_step.png"))
    if loss_vs_length(folder / "loss_vs_eval_length.png", table, extrapolation_metrics(sweep)):
        written.append(("val/loss against evaluation length", "loss_vs_eval_length.png"))
    for name, metric, label in BARS:
        if bars(folder / name, table, metric, label):
            written.append((label, name))
    return written


PLOT_FILES = ("val_loss_vs_step.png", "loss_vs_eval_length.png", *(name for name, _, _ in BARS))
