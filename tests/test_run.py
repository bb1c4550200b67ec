"""End to end: training runs, sweeps and their MLflow records."""
import re
import subprocess
import sys

import pytest
from conftest import TINY, history, runs_in, tiny_cfg

from ablate.config import project_root
from ablate.experiment import run
from ablate.tracking.mlflow import PARENT_TAG

ROOT = project_root()
TRAIN_METRICS = {"train/loss", "train/lr", "train/grad_norm", "val/loss", "val/bpb", "perf/tokens_per_s",
                 "perf/peak_mem_gib", "data/padding_frac"}
# each attention and each positional scheme trains once (their pairs share no code beyond the model's
# hooks, checked on packed rows for every scheme in test_models)
CELLS = [("mha", "alibi"), ("gqa", "rope"), ("mqa", "learned"), ("mha", "sinusoidal"), ("gqa", "nope")]


@pytest.mark.parametrize("attention,pos", CELLS, ids=[f"{a}-{p}" for a, p in CELLS])
def test_every_attention_and_position_trains_with_falling_loss(attention, pos, module_store):
    name = f"{attention}-{pos}"
    val_loss = run(tiny_cfg(f"attention={attention}", f"pos={pos}", "train.steps=30", "train.eval_every=15",
                            "train.lr=1e-2", f"tracking.uri={module_store}", f"tracking.run_name={name}"))
    client, runs = runs_in(module_store)
    (r,) = [r for r in runs if r.info.run_name == name]
    losses = [v for _, v in history(client, r.info.run_id, "train/loss")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    assert val_loss == pytest.approx(r.data.metrics["val/loss"])
    assert val_loss < 4.0  # from ln(257) = 5.55 at random init


def test_a_sweep_makes_one_parent_run_holding_a_finished_run_per_job(run_main, store, tmp_path):
    code, out = run_main("-m", *TINY, "attention=gqa,mha", "pos=alibi", f"tracking.uri={store}",
                         f"hydra.sweep.dir={tmp_path}/sweep")
    assert code == 0, out
    client, runs = runs_in(store)
    (parent,) = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    assert parent.info.status == "FINISHED" and "attention=gqa,mha pos=alibi" in parent.data.tags["ablate.sweep"]
    assert {c.data.params["attention.name"] for c in children} == {"gqa", "mha"}
    for child in children:
        assert child.info.status == "FINISHED"
        assert TRAIN_METRICS <= set(child.data.metrics), set(child.data.metrics)
        assert child.data.tags["ablate.backend"] in ("sdpa", "eager")
        assert child.data.params["pos.name"] == "alibi"
        assert "attention=" in child.data.tags["ablate.overrides"]
        assert int(child.data.tags["ablate.n_params"]) > 0
        assert [step for step, _ in history(client, child.info.run_id, "train/loss")] == list(range(12))
        assert "config.yaml" in {a.path for a in client.list_artifacts(child.info.run_id)}


@pytest.mark.slow
def test_jobs_on_parallel_workers_share_one_store_and_a_failing_job_ends_failed(store, tmp_path):
    """`run.py -m` with two joblib worker processes, one job each, logging to one sqlite store at once: the
    job that fails is printed with its traceback when it fails and ends FAILED, the other runs to its end,
    the sweep exits with status 1 and its parent run (closed when the process ends) is FAILED."""
    cmd = [sys.executable, "run.py", "-m", *TINY, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           "train.lr=1e30,3e-3", f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert re.search(r"job \d \([^)]*train\.lr=1e\+30[^)]*\) failed:\nTraceback", out) and "NonFiniteLoss" in out, out

    client, runs = runs_in(store)
    (parent,) = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3 and parent.info.status == "FAILED"
    assert sorted(r.data.params["train.lr"] for r in children) == ["0.003", "1e+30"]
    for child in children:
        if child.data.params["train.lr"] == "1e+30":
            assert child.info.status == "FAILED" and child.data.tags["ablate.failure"] == "nonfinite_loss"
            assert "NonFiniteLoss" in child.data.tags["ablate.error"]
        else:
            assert child.info.status == "FINISHED" and "val/loss" in child.data.metrics
            assert [step for step, _ in history(client, child.info.run_id, "train/loss")] == list(range(12))
