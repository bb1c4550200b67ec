"""End to end: training runs, sweeps and their MLflow records."""
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from ablate.config import compose, project_root
from ablate.experiment import run

ROOT = project_root()
ATTENTION = ["mha", "gqa", "mqa"]
POS = ["alibi", "rope", "learned", "sinusoidal", "nope"]
TRAIN_METRICS = {"train/loss", "train/lr", "train/grad_norm", "val/loss", "val/bpb", "perf/tokens_per_s",
                 "perf/peak_mem_gib", "data/padding_frac"}


def tiny(*overrides):
    return compose(["model.n_layers=1", "model.d_model=64", "model.n_heads=4", "model.context=128",
                    "train=smoke", "train.steps=30", "train.eval_every=15", "train.lr=1e-2", "train.batch_size=4",
                    "data.max_val_batches=2", *overrides])


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("attention", ATTENTION)
def test_every_attention_and_position_trains_with_falling_loss(attention, pos, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    val_loss = run(tiny(f"attention={attention}", f"pos={pos}", f"tracking.uri={uri}"))
    client = MlflowClient(uri)
    (r,) = client.search_runs([client.get_experiment_by_name("ablate").experiment_id])
    losses = [m.value for m in client.get_metric_history(r.info.run_id, "train/loss")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    assert val_loss == pytest.approx(r.data.metrics["val/loss"])
    assert val_loss < 4.0  # from ln(257) = 5.55 at random init


def _runs(uri, experiment="ablate"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def _sweep(tmp_path, *overrides):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "run.py", "-m", *overrides, "train=smoke", "model.n_layers=1", "model.d_model=64",
           f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc, uri


@pytest.mark.slow
def test_multirun_writes_one_parent_and_finished_children(tmp_path):
    proc, uri = _sweep(tmp_path, "attention=gqa,mha", "pos=alibi")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = _runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    assert parents[0].info.status == "FINISHED"
    for child in children:
        assert child.info.status == "FINISHED"
        assert TRAIN_METRICS <= set(child.data.metrics), set(child.data.metrics)
        assert child.data.tags["ablate.backend"] in ("sdpa", "eager")
        assert child.data.params["pos.name"] == "alibi"
        assert "attention=" in child.data.tags["ablate.overrides"]
        assert int(child.data.tags["ablate.n_params"]) > 0
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(12))
        assert "config.yaml" in {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {c.data.params["attention.name"] for c in children} == {"gqa", "mha"}


@pytest.mark.slow
def test_a_failing_job_ends_failed_and_the_sweep_goes_on(tmp_path):
    proc, uri = _sweep(tmp_path, "train.lr=1e30,3e-3")
    assert proc.returncode != 0  # the sweep says that a job failed
    _, runs = _runs(uri)
    children = {r.data.params["train.lr"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert children["1e+30"].info.status == "FAILED"
    assert children["1e+30"].data.tags["ablate.failure"] == "nonfinite_loss"
    assert "NonFiniteLoss" in children["1e+30"].data.tags["ablate.error"]
    assert children["0.003"].info.status == "FINISHED"
    assert parent.info.status == "FAILED"
