"""Runs → cells → tables. A cell is the runs that differ only by seed; it reports mean ± 95% t-interval
over its finished runs, one per seed (a seed that ran twice, say in two sweeps read with `--sweep all`,
counts its latest run once: repeats are not independent samples). The ranking compares each cell with a
baseline cell: paired per seed when both cells hold the same seeds (the same seed gives every cell the
same data order and validation documents), else Welch's interval.
"""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ablate.report.select import ReportError
from ablate.report.stats import mean_interval, welch_interval

IGNORED_PARAMS = ("seed", "device_pool")
IGNORED_PREFIXES = ("paths.", "tracking.", "cluster.")
HEAD_METRICS = ("val/loss", "val/loss_best", "val/bpb")  # then every length-extrapolation metric present
TAIL_METRICS = ("perf/tokens_per_s", "perf/peak_mem_gib", "model/n_params", "model/n_params_non_embedding",
                "model/flops_per_token", "val/loss_se")
HIGHER_IS_BETTER = ("perf/tokens_per_s", "perf/mfu")
# val/loss at N times the training context: `val/loss@<N>x`; MLflow refuses '@' in metric names, so the
# spellings it accepts (`val/loss_2x`, `val/loss:2x`, `val/loss/2x`, `val/loss.2x`, `val/loss-2x`) read the same
EXTRAPOLATION = re.compile(r"^val/loss[@_:/.-](\d+)x$")
EXTRAPOLATION_TAG = "ablate.extrapolation"
UNSET = "(unset)"


@dataclass
class Sweep:
    """The selected runs as frames indexed by run id."""

    runs: pd.DataFrame  # status, finished, counted, seed, cell, the varied params, the extrapolation tag
    metrics: pd.DataFrame  # one column per metric (its last value), NaN where a run lacks it
    varied: list[str]  # the params that tell cells apart
    cells: list[str]  # cell labels, in the order of each cell's first run

    def values(self, cell: str, metric: str) -> dict[str, list[float]]:
        """The counted runs' values of `metric` in `cell`, by seed."""
        if metric not in self.metrics:
            return {}
        rows = self.runs[(self.runs.cell == cell) & self.runs.counted]
        out: dict[str, list[float]] = {}
        for run_id, seed in rows.seed.items():
            value = self.metrics.at[run_id, metric]
            if not pd.isna(value):
                out.setdefault(seed, []).append(float(value))
        return out

    def flat(self, cell: str, metric: str) -> list[float]:
        return [v for vals in self.values(cell, metric).values() for v in vals]

    def repeats(self) -> list[str]:
        """A sentence for each seed of a cell that finished more than once: only its latest run counts
        (repeats of one seed are not independent samples; counting them would shrink the intervals)."""
        done = self.runs[self.runs.finished & (self.runs.seed != UNSET)]
        out = []
        for (cell, seed), rows in done.groupby(["cell", "seed"], sort=False):
            if len(rows) > 1:
                kept = rows.index[rows.counted][0]
                others = ", ".join(i for i in rows.index if i != kept)
                out.append(f"seed {seed} ran {len(rows)} times in the cell {cell}; its latest run ({kept}) counts, "
                           f"not {others}")
        return out

    def params(self) -> pd.DataFrame:
        """The varied params of each cell (index: the cell label)."""
        if not self.varied:
            return pd.DataFrame(index=pd.Index(self.cells, name="cell"))
        return self.runs.groupby("cell", sort=False)[self.varied].first()


def short(param: str) -> str:
    return param.removesuffix(".name")


def is_ignored(param: str) -> bool:
    return param in IGNORED_PARAMS or param.startswith(IGNORED_PREFIXES)


def frame(runs: list[Any]) -> Sweep:
    ids = [r.info.run_id for r in runs]
    params = pd.DataFrame([r.data.params for r in runs], index=ids, dtype=object)
    varied = sorted(c for c in params.columns if not is_ignored(c) and params[c].nunique(dropna=True) > 1)
    params = params.fillna(UNSET)  # a run that failed before logging its params
    labels = [", ".join(f"{short(k)}={row[k]}" for k in varied) or "all runs" for _, row in params.iterrows()]
    table = pd.DataFrame({
        "status": [r.info.status for r in runs],
        "seed": params["seed"] if "seed" in params else UNSET,
        "cell": labels,
        EXTRAPOLATION_TAG: [r.data.tags.get(EXTRAPOLATION_TAG, "") for r in runs],
    }, index=ids)
    table["finished"] = table.status == "FINISHED"
    # one run per cell and seed enters the statistics: the latest finished one
    start = pd.Series([r.info.start_time or 0 for r in runs], index=ids)
    latest_first = table[table.finished].assign(start=start).sort_values("start", ascending=False, kind="stable")
    repeat = latest_first.duplicated(["cell", "seed"]) & (latest_first.seed != UNSET)
    table["counted"] = table.finished & ~table.index.isin(repeat.index[repeat])
    table = table.join(params[varied])
    metrics = pd.DataFrame([r.data.metrics for r in runs], index=ids, dtype=float)
    return Sweep(table, metrics, varied, list(dict.fromkeys(table.cell)))


def length_multiple(metric: str) -> int | None:
    """N for a val/loss measured at N times the training context, else None."""
    match = EXTRAPOLATION.match(metric)
    return int(match.group(1)) if match else None


def extrapolation_metrics(sweep: Sweep) -> list[str]:
    return sorted((m for m in sweep.metrics.columns if length_multiple(m)), key=length_multiple)


def report_metrics(sweep: Sweep, sort_metric: str) -> list[str]:
    """The table's metrics that some run logged, the sort metric first when it is not among them."""
    wanted = [*HEAD_METRICS, *extrapolation_metrics(sweep), *TAIL_METRICS]
    extra = [] if sort_metric in wanted else [sort_metric]
    return [m for m in extra + wanted if m in sweep.metrics.columns]


def _half(series: pd.Series) -> float:
    return mean_interval(series.dropna().tolist())[1]


def cell_table(sweep: Sweep, metrics: list[str], sort_metric: str) -> pd.DataFrame:
    """One row per cell (index: its label): varied params, run counts, `<m> mean|ci95|n` per metric,
    best cell first by `sort_metric`."""
    by_cell = sweep.runs.groupby("cell", sort=False)
    counts = pd.DataFrame({"runs": by_cell.size(), "not finished": by_cell.finished.apply(lambda f: int((~f).sum())),
                           "repeats": (sweep.runs.finished & ~sweep.runs.counted).groupby(sweep.runs.cell, sort=False)
                           .sum().astype(int)})
    finished = sweep.runs.index[sweep.runs.counted]
    stats = (sweep.metrics.loc[finished, metrics].groupby(sweep.runs.loc[finished, "cell"], sort=False)
             .agg(["mean", _half, "count"]))
    stats.columns = [f"{m} {'ci95' if s == '_half' else 'n' if s == 'count' else s}" for m, s in stats.columns]
    table = sweep.params().join(counts).join(stats).reindex(sweep.cells)
    for m in metrics:
        table[f"{m} n"] = table[f"{m} n"].fillna(0).astype(int)
    table.index.name = "cell"
    return table.sort_values(f"{sort_metric} mean", ascending=sort_metric not in HIGHER_IS_BETTER,
                             na_position="last", kind="stable")


def fmt(mean: float, half: float = math.nan) -> str:
    """'2.341 ± 0.012'; large counts with thousands separators; 'n/a' for a missing value."""
    if pd.isna(mean):
        return "n/a"
    big = abs(mean) >= 1e4
    text = f"{mean:,.0f}" if big else f"{mean:.4g}"
    if pd.isna(half) or half == 0:
        return text
    return text + " ± " + (f"{half:,.0f}" if big else f"{half:.2g}")


def format_cells(table: pd.DataFrame, metrics: list[str], varied: list[str]) -> pd.DataFrame:
    """The cell table as text: 'mean ± half' per metric, '(n=k)' when fewer finished runs logged it."""
    out = table[varied].rename(columns=short) if varied else pd.DataFrame({"cell": table.index}, index=table.index)
    out["runs"] = [f"{r}" + "".join(f" ({k} {what})" for k, what in ((nf, "not finished"), (rep, "repeated seeds")) if k)
                   for r, nf, rep in zip(table.runs, table["not finished"], table.repeats)]
    done = table.runs - table["not finished"] - table.repeats
    for m in metrics:
        n = table[f"{m} n"]
        text = [fmt(a, b) for a, b in zip(table[f"{m} mean"], table[f"{m} ci95"])]
        out[m] = [t + (f" (n={k})" if 0 < k < d else "") for t, k, d in zip(text, n, done)]
    return out


def extrapolation_notes(sweep: Sweep) -> dict[str, str]:
    """Cells without any length-extrapolation metric, with the reason their runs were tagged with."""
    found = extrapolation_metrics(sweep)
    notes = {}
    for cell in sweep.cells if found else []:
        if not any(sweep.flat(cell, m) for m in found):
            rows = sweep.runs[sweep.runs.cell == cell]
            reasons = sorted({r for r in rows[EXTRAPOLATION_TAG] if r})
            notes[cell] = "; ".join(reasons) or f"no run logged val/loss at <N>x (tag {EXTRAPOLATION_TAG} unset)"
    return notes


def find_cell(sweep: Sweep, selector: str) -> str:
    """The one cell matching 'attention=mha,pos=rope' (keys: a varied param or its short name)."""
    keys = {p: p for p in sweep.varied} | {short(p): p for p in sweep.varied}
    cells = "\n  ".join(sweep.cells)
    wanted = {}
    for pair in filter(None, (p.strip() for p in selector.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or key.strip() not in keys:
            raise ReportError(f"--baseline: '{pair}' is not <param>=<value> of a varied param; varied params: "
                              f"{', '.join(map(short, sweep.varied)) or '(none)'}; cells:\n  {cells}")
        wanted[keys[key.strip()]] = value.strip()
    first = sweep.params()
    match = [c for c in sweep.cells if all(first.at[c, k] == v for k, v in wanted.items())]
    if len(match) != 1:
        problem = "matches no cell" if not match else f"matches {len(match)} cells"
        raise ReportError(f"--baseline '{selector}' {problem}; cells:\n  {cells}")
    return match[0]


def compare(sweep: Sweep, metric: str, base: str, cell: str) -> dict[str, Any]:
    """`cell` minus `base` in `metric`: paired over seeds when both hold the same seeds once each."""
    a, b = sweep.values(base, metric), sweep.values(cell, metric)
    single = all(len(v) == 1 for v in (*a.values(), *b.values()))
    if single and a.keys() == b.keys() and len(a) >= 2:
        diffs = [b[s][0] - a[s][0] for s in sorted(a)]
        diff, half = mean_interval(diffs)
        test = f"paired, {len(diffs)} seeds"
    else:
        diff, half, df = welch_interval(sweep.flat(base, metric), sweep.flat(cell, metric))
        test = f"Welch, df={df:.1f}" if not math.isnan(half) else "n/a (fewer than 2 runs)"
    if math.isnan(half):
        verdict = "n/a"
    elif diff - half <= 0 <= diff + half:
        verdict = "within noise"
    else:
        verdict = "better" if (diff > 0) == (metric in HIGHER_IS_BETTER) else "worse"
    return {"diff": diff, "ci95": half, "low": diff - half, "high": diff + half, "test": test, "verdict": verdict}


def ranking(sweep: Sweep, metric: str, base: str, order: list[str]) -> pd.DataFrame:
    """Each cell (in `order`) against `base`: n, mean, difference, its interval, the test and a verdict."""
    rows = []
    for cell in order:
        vals = sweep.flat(cell, metric)
        row = {"cell": cell, "n": len(vals), "mean": statistics.fmean(vals) if vals else math.nan}
        if cell == base:
            row |= {"diff": 0.0, "ci95": math.nan, "low": math.nan, "high": math.nan, "test": "", "verdict": "baseline"}
        else:
            row |= compare(sweep, metric, base, cell)
        rows.append(row)
    return pd.DataFrame(rows).set_index("cell")


def format_ranking(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    out = pd.DataFrame(index=table.index)
    out["n"] = table.n
    out[metric] = [fmt(m) for m in table["mean"]]
    out["Δ vs baseline"] = ["—" if v == "baseline" else "n/a" if pd.isna(d) else f"{d:+.3g}"
                            for d, v in zip(table["diff"], table.verdict)]
    out["95% interval"] = ["" if pd.isna(h) else f"[{lo:+.3g}, {hi:+.3g}]"
                           for lo, hi, h in zip(table.low, table.high, table.ci95)]
    out["test"] = table.test
    out["verdict"] = table.verdict
    return out


@dataclass
class Noise:
    seed_sd: float  # mean over cells of the std of val/loss over seeds
    n_cells: int  # cells with two or more finished seeds
    val_se: float  # mean of the runs' val/loss_se: the validation set's own sampling error
    n_runs: int
    val_fraction: float | None = None  # the smallest share of its held-out tokens a run evaluated (None: not logged)

    def statement(self) -> str:
        if self.n_cells == 0:
            return "Seed spread unknown: no cell has two finished seeds with val/loss."
        cells = f"{self.n_cells} cell" + "s" * (self.n_cells != 1)
        text = f"Seed spread of val/loss: {self.seed_sd:.3g} (mean over {cells} of the std over seeds). "
        if self.n_runs == 0:
            return text + "Validation sampling error unknown: no run logged val/loss_se."
        text += f"Validation sampling error: {self.val_se:.3g} (mean val/loss_se over {self.n_runs} runs). "
        if self.val_se * 3 <= self.seed_sd:
            return text + (f"The seeds vary {self.seed_sd / self.val_se:.0f}x more than the validation set can: "
                           "the noise comes from training, not from the validation sample.")
        text += "The validation sampling error is comparable to the seed spread: "
        if self.val_fraction is None:
            return text + ("evaluate more held-out documents (data.max_val_batches, else data.val_per_mille) to "
                           "tighten the intervals.")
        # the error shrinks about as 1/sqrt(tokens evaluated): what evaluating the whole held-out split gives
        best = self.val_se * math.sqrt(self.val_fraction)
        if best * 3 <= self.seed_sd:
            return text + (f"the runs evaluated {self.val_fraction:.0%} of the held-out tokens; evaluate more of "
                           f"the held-out documents (data.max_val_batches) to tighten the intervals (all of them: "
                           f"about {best:.2g}).")
        return text + (f"even all the held-out tokens (the runs evaluated {self.val_fraction:.0%}) would leave it "
                       f"near {best:.2g}, so hold out more documents (data.val_per_mille) or train on a larger "
                       "corpus to tighten the intervals.")


def noise(sweep: Sweep) -> Noise:
    spreads = [statistics.stdev(v) for c in sweep.cells if len(v := sweep.flat(c, "val/loss")) >= 2]
    done = sweep.runs.index[sweep.runs.counted]
    se = sweep.metrics.loc[done, "val/loss_se"].dropna() if "val/loss_se" in sweep.metrics else pd.Series([])
    fraction = None
    if {"data/val_tokens", "data/val_tokens_evaluated"} <= set(sweep.metrics):
        read = sweep.metrics.loc[done, ["data/val_tokens", "data/val_tokens_evaluated"]].dropna()
        if len(read):
            fraction = float((read["data/val_tokens_evaluated"] / read["data/val_tokens"]).clip(upper=1).min())
    return Noise(statistics.fmean(spreads) if spreads else math.nan, len(spreads),
                 float(se.mean()) if len(se) else math.nan, len(se), fraction)
