"""The sweep report on a made-up MLflow store: statistics checked against direct computations."""
import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from ablate.report import build_report, main
from ablate.report.plots import curve_band
from ablate.report.stats import t_quantile
from ablate.report.tables import Noise, length_multiple
from ablate.tracking.mlflow import PARENT_TAG

T975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 9: 2.262157, 29: 2.045230}  # printed t tables
CELL_LOSS = {"mha": 2.00, "gqa": 1.90, "mqa": 2.05}
CELL_SEEDS = {"mha": (0, 1, 2), "gqa": (0, 1, 2), "mqa": (1, 2, 3)}  # mqa: other seeds, so Welch
SEED_EFFECT = {0: 0.0, 1: 0.05, 2: -0.03, 3: 0.02}  # shared by every cell: what pairing removes
NO_EXTRAPOLATION = "learned positions: no table beyond the training context"
STEPS = (0, 100, 200, 300)
AT_2X, AT_4X = "val/loss_2x", "val/loss_4x"  # MLflow refuses '@' in names: val/loss@2x is logged like this


def final_loss(cell, seed):
    rng = np.random.default_rng(100 * list(CELL_LOSS).index(cell) + seed)
    return CELL_LOSS[cell] + SEED_EFFECT[seed] + float(rng.normal(0, 0.005))


def add_run(client, exp, parent, start, params, metrics, status="FINISHED", tags=()):
    run = client.create_run(exp, start_time=start, tags={PARENT_TAG: parent, **dict(tags)}).info.run_id
    client.log_batch(run, metrics=[Metric(k, v, start + step, step) for k, v, step in metrics],
                     params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run, status, end_time=start + 1000)
    return run


def child_metrics(cell, seed):
    loss = final_loss(cell, seed)
    steps = (0, 50, 150, 300) if (cell, seed) == ("gqa", 1) else STEPS  # curves on other steps: interpolated
    out = [("val/loss", loss + 2.0 * (1 - s / 300) ** 2, s) for s in steps]
    last = {"val/loss_best": loss - 0.01, "val/bpb": loss / math.log(2) / 4, "val/loss_se": 0.002,
            "perf/tokens_per_s": 50_000 + 1_000 * seed + 3_000 * list(CELL_LOSS).index(cell),
            "perf/peak_mem_gib": 1.5 + 0.1 * seed, "model/n_params": 1_234_567.0, "model/flops_per_token": 7.4e6}
    if cell != "mqa":
        last |= {AT_2X: loss + 0.1 + 0.01 * seed, AT_4X: loss + 0.3 + 0.02 * seed}
    return out + [(k, v, 300) for k, v in last.items()]


@pytest.fixture(scope="module")
def store(module_store):
    uri = module_store
    root = Path(uri.removeprefix("sqlite:///")).parent
    client = MlflowClient(uri)
    art = (root / "artifacts").as_uri()
    late, grid = (client.create_experiment(n, artifact_location=f"{art}/{n}") for n in ("late", "grid"))
    old = client.create_run(grid, start_time=1_000_000, tags={"ablate.sweep": "attention=mha"}).info.run_id
    add_run(client, grid, old, 1_000_100, {"attention.name": "mha", "pos.name": "rope", "seed": 0},
            [("val/loss", 3.0, 300)])
    parent = client.create_run(grid, start_time=2_000_000, tags={"ablate.sweep": "attention=mha,gqa,mqa"}).info.run_id
    ids, start = {}, 2_000_100
    for cell, seed in [(c, s) for c, seeds in CELL_SEEDS.items() for s in seeds] + [("gqa", 3)]:
        start += 100
        params = {"attention.name": cell, "pos.name": "rope", "seed": seed, "train.steps": 300,
                  "paths.output_dir": f"/tmp/out/{start}", "tracking.run_name": f"job{start}"}
        if (cell, seed) == ("gqa", 3):  # diverged after its first evaluation
            add_run(client, grid, parent, start, params, [("val/loss", 4.0, 0)], status="FAILED")
            continue
        tags = {"ablate.extrapolation": NO_EXTRAPOLATION} if cell == "mqa" else {}
        ids[cell, seed] = add_run(client, grid, parent, start, params, child_metrics(cell, seed), tags=tags)
    newest = client.create_run(late, start_time=3_000_000, tags={"ablate.sweep": "pos=rope,alibi"}).info.run_id
    for i, pos in enumerate(("rope", "alibi")):
        add_run(client, late, newest, 3_000_100 + i, {"pos.name": pos, "seed": 0}, [("val/loss", 2.5 + i, 300)])
    return {"uri": uri, "client": client, "parent": parent, "old": old, "late": newest, "ids": ids}


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    folder = build_report(store["client"], store["parent"], out_dir=tmp_path_factory.mktemp("report") / "r")
    return folder


def finished(cell, metric):
    return [dict((k, v) for k, v, _ in child_metrics(cell, s))[metric] for s in CELL_SEEDS[cell]]


def interval(values):
    n = len(values)
    return statistics.fmean(values), T975[n - 1] * statistics.stdev(values) / math.sqrt(n)


def test_t_quantile_matches_printed_tables_and_the_density():
    for df, q in T975.items():
        assert t_quantile(df) == pytest.approx(q, abs=2e-6)
    assert t_quantile(1e7) == pytest.approx(1.959964, abs=1e-5)
    for df in (1.5, 2.5, 7.3):  # Welch's fractional degrees of freedom: 95% of the density inside ±q
        q = t_quantile(df)
        x = np.linspace(-q, q, 400_001)
        log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
        assert np.trapezoid(pdf, x) == pytest.approx(0.95, abs=1e-7)


def test_cells_fold_seeds_into_mean_and_t_interval(report):
    cells = pd.read_csv(report / "cells.csv", index_col="cell")
    assert list(cells.index) == ["attention=gqa", "attention=mha", "attention=mqa"]  # best val/loss first
    assert "attention.name" in cells and not {"seed", "pos.name", "paths.output_dir", "tracking.run_name"} & set(cells)
    for cell in CELL_LOSS:
        row = cells.loc[f"attention={cell}"]
        for metric in ("val/loss", "val/loss_best", "val/bpb", "perf/tokens_per_s", "perf/peak_mem_gib"):
            mean, half = interval(finished(cell, metric))
            assert (row[f"{metric} mean"], row[f"{metric} ci95"]) == (pytest.approx(mean), pytest.approx(half))
            assert row[f"{metric} n"] == 3
    gqa = cells.loc["attention=gqa"]
    assert (gqa["runs"], gqa["not finished"]) == (4, 1)  # the failed run's val/loss 4.0 stays out
    assert gqa[f"{AT_4X} mean"] == pytest.approx(statistics.fmean(finished("gqa", AT_4X)))
    assert math.isnan(cells.loc["attention=mqa", f"{AT_2X} mean"])
    md = (report / "cells.md").read_text()
    mqa_line = next(line for line in md.splitlines() if "| mqa" in line)
    assert mqa_line.count("n/a") == 2 and "4 (1 not finished)" in md
    assert NO_EXTRAPOLATION in (report / "report.md").read_text()


def test_ranking_is_paired_on_shared_seeds_else_welch(report):
    ranked = pd.read_csv(report / "ranking.csv", index_col="cell")
    assert ranked.loc["attention=mha", "verdict"] == "baseline"  # the cell of the sweep's earliest run
    diffs = [final_loss("gqa", s) - final_loss("mha", s) for s in (0, 1, 2)]
    mean, half = interval(diffs)
    gqa = ranked.loc["attention=gqa"]
    assert (gqa["diff"], gqa["ci95"]) == (pytest.approx(mean), pytest.approx(half))
    assert gqa["test"].startswith("paired") and gqa["verdict"] == "better"
    a, b = finished("mha", "val/loss"), finished("mqa", "val/loss")
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    welch = t_quantile(df) * math.sqrt(va + vb)
    mqa = ranked.loc["attention=mqa"]
    assert mqa["test"].startswith("Welch")
    diff = statistics.fmean(b) - statistics.fmean(a)
    assert (mqa["diff"], mqa["ci95"]) == (pytest.approx(diff), pytest.approx(welch))
    assert mqa["verdict"] == ("within noise" if abs(mqa["diff"]) <= welch else "worse")
    gqa_var = statistics.variance(finished("gqa", "val/loss"))
    unpaired = t_quantile(4) * math.sqrt((gqa_var + statistics.variance(a)) / 3)
    assert half < unpaired / 3  # the shared seed effect cancels in the paired difference
    text = (report / "report.md").read_text()
    assert "Seed spread of val/loss" in text and "Validation sampling error: 0.002" in text


def test_files_plots_and_parent_artifacts(report, store):
    import matplotlib.image

    names = ["cells.md", "cells.csv", "ranking.md", "ranking.csv", "report.md", "val_loss_vs_step.png",
             "loss_vs_eval_length.png", "throughput.png", "memory.png"]
    for name in names:
        assert (report / name).stat().st_size > 0, name
    for name in names[5:]:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert min(matplotlib.image.imread(report / name).shape[:2]) > 100
        assert f"]({name})" in (report / "report.md").read_text()
    logged = {a.path for a in store["client"].list_artifacts(store["parent"], "report")}
    assert {f"report/{n}" for n in names} <= logged


def test_length_extrapolation_names():
    assert [length_multiple(m) for m in ("val/loss@2x", "val/loss_4x", "val/loss:8x", "val/loss/16x")] == [2, 4, 8, 16]
    assert [length_multiple(m) for m in ("val/loss", "val/loss_se", "val/loss_best", "val/bpb@2x")] == [None] * 4


def test_curve_band_interpolates_onto_the_common_steps():
    a, b = ([0, 100, 200], [3.0, 2.0, 1.5]), ([0, 50, 150, 250], [3.2, 2.8, 1.9, 1.0])
    steps, mean, half = curve_band([a, b])
    assert steps.tolist() == [0, 50, 100, 150, 200]
    ys = np.stack([np.interp(steps, *a), np.interp(steps, *b)])
    assert np.allclose(mean, ys.mean(0)) and np.allclose(half, T975[1] * ys.std(0, ddof=1) / math.sqrt(2))


def test_bad_input_exits_2_listing_what_exists(store, tmp_path, capsys):
    base = ["--tracking-uri", store["uri"], "--out", str(tmp_path / "r"), "--no-log"]
    assert main([*base, store["parent"], "--metric", "val/bpp"]) == 2
    assert "'val/bpp'" in (err := capsys.readouterr().err) and "val/bpb" in err and AT_2X in err
    assert main([*base, "--experiment", "nope"]) == 2
    assert "'nope'" in (err := capsys.readouterr().err) and "grid" in err and "late" in err
    assert main([*base, "--sweep", "0123456789abcdef"]) == 2
    assert store["parent"] in (err := capsys.readouterr().err) and store["late"] in err
    assert main([*base, store["ids"]["mha", 0]]) == 2
    assert f"child of sweep {store['parent']}" in capsys.readouterr().err
    assert main([*base, store["parent"], "--baseline", "attention=xyz"]) == 2
    assert "attention=mqa" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_a_store_that_is_missing_or_not_a_store_is_refused_and_left_alone(tmp_path, capsys):
    missing = tmp_path / "typo" / "mlflow.db"
    assert main(["--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert f"no MLflow store at {missing}" in (err := capsys.readouterr().err) and "--tracking-uri" in err, err
    assert not missing.parent.exists()  # a report reads a store: it does not create one
    (tmp_path / "notes.db").write_text("not a store\n")
    assert main(["--tracking-uri", f"sqlite:///{tmp_path}/notes.db"]) == 2
    assert "not a SQLite database" in capsys.readouterr().err


def test_a_seed_run_twice_counts_once_with_its_latest_run(store, tmp_path, capsys):
    """Runs of one cell and seed are repeats, not independent samples: counting them would shrink the
    seed spread and the intervals. The latest finished one counts, and the report says so."""
    client = store["client"]
    exp = client.create_experiment("repeats")
    parent = client.create_run(exp, start_time=1_500_000, tags={"ablate.sweep": "attention=mha,gqa"}).info.run_id
    losses = {("mha", 0): [2.0, 2.4], ("mha", 1): [2.1], ("gqa", 0): [1.9], ("gqa", 1): [2.0]}
    start, latest = 1_500_100, {}  # older than the other sweeps: "the latest sweep" stays theirs
    for (cell, seed), values in losses.items():
        for value in values:
            start += 100
            latest[cell, seed] = add_run(client, exp, parent, start, {"attention.name": cell, "seed": seed},
                                         [("val/loss", value, 300)])
    assert main(["--tracking-uri", store["uri"], parent, "--out", str(tmp_path / "r"), "--no-log"]) == 0
    out = capsys.readouterr().out
    assert f"seed 0 ran 2 times in the cell attention=mha; its latest run ({latest['mha', 0]}) counts" in out, out
    ranking = pd.read_csv(tmp_path / "r" / "ranking.csv", index_col="cell")
    assert ranking.loc["attention=mha", "n"] == 2 and ranking.loc["attention=mha", "mean"] == pytest.approx(2.25)
    assert ranking.loc["attention=gqa", "test"] == "paired, 2 seeds"
    assert ranking.loc["attention=gqa", "diff"] == pytest.approx(statistics.fmean([1.9 - 2.4, 2.0 - 2.1]))
    assert "seed 0 ran 2 times in the cell attention=mha" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize("fraction,advice,not_advice", [
    (1.0, "hold out more documents (data.val_per_mille)", "data.max_val_batches"),
    (0.93, "even all the held-out tokens (the runs evaluated 93%) would leave it near 0.0039", "max_val_batches"),
    (0.01, "evaluated 1% of the held-out tokens; evaluate more of the held-out documents (data.max_val_batches)",
     "data.val_per_mille"),
])
def test_the_noise_advice_is_the_one_that_can_bring_the_validation_error_under_the_seed_spread(
        fraction, advice, not_advice):
    text = Noise(seed_sd=0.0026, n_cells=4, val_se=0.0040, n_runs=12, val_fraction=fraction).statement()
    assert "comparable to the seed spread" in text and advice in text and not_advice not in text, text
    quiet = Noise(seed_sd=0.03, n_cells=4, val_se=0.004, n_runs=12, val_fraction=fraction).statement()
    assert "the noise comes from training" in quiet and advice not in quiet


def test_default_is_the_latest_sweep_of_any_experiment(store, tmp_path, capsys):
    assert main(["--tracking-uri", store["uri"], "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert f"sweep {store['late']} of experiment 'late'" in out and "pos=alibi" in out and str(tmp_path / "r") in out
    logged = {a.path for a in store["client"].list_artifacts(store["late"], "report")}
    assert "report/report.md" in logged


def test_every_run_of_an_experiment_is_not_logged_anywhere(store, tmp_path, capsys):
    args = ["--tracking-uri", store["uri"], "--experiment", "grid", "--sweep", "all", "--out", str(tmp_path / "r"),
            "--baseline", "attention=gqa"]
    assert main(args) == 0
    assert "not logged to MLflow" in capsys.readouterr().out
    cells = pd.read_csv(tmp_path / "r" / "cells.csv", index_col="cell")
    assert cells.loc["attention=mha", "runs"] == 4  # both sweeps' runs
    ranked = pd.read_csv(tmp_path / "r" / "ranking.csv", index_col="cell")
    assert ranked.loc["attention=gqa", "verdict"] == "baseline"
    # seed 0 twice in mha (the old sweep's run and this one's): the later counts, so the cells still pair
    assert cells.loc["attention=mha", "repeats"] == 1 and ranked.loc["attention=mha", "n"] == 3
    assert ranked.loc["attention=mha", "test"] == "paired, 3 seeds"
    assert not store["client"].list_artifacts(store["old"])
