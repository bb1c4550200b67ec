"""What a reader of the MLflow UI sees: run and sweep names, params that apply, descriptions, links, saved
views, the job's log; and, end to end, the rendered runs table of a sweep in a headless browser."""
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient
from omegaconf import open_dict

from ablate.config import compose, project_root
from ablate.experiment import print_summary
from ablate.tracking.dashboard import (VIEW_TAG, note, prepare_experiment, run_link, significant, view_link)
from ablate.tracking.mlflow import MlflowTracker, run_params
from ablate.tracking.naming import command, run_name, sweep_axes, sweep_name, sweep_values
from ablate.tracking.store import open_client
from ablate.tracking.sweep import SweepParentRun

ROOT = project_root()


def test_sweep_runs_are_named_after_their_swept_values():
    axes = sweep_axes(["attention=gqa,mha", "pos=alibi,rope", "seed=0,1", "train=smoke"])
    assert axes == ["attention", "pos", "seed"]
    job = ["attention=gqa", "pos=alibi", "seed=0", "train=smoke", "model.n_layers=1", "tracking.uri=sqlite:///x.db"]
    assert run_name(job, axes) == "gqa-alibi-s0"
    assert run_name(["train.lr=0.001", "seed=1"], sweep_axes(["train.lr=0.001,0.01", "seed=0,1"])) == "lr0.001-s1"
    # an experiment's hydra.sweeper.params are axes too
    assert sweep_axes(["+experiment=mlp_shootout"], {"mlp": "swiglu,gelu"}) == ["mlp"]


def test_single_runs_are_named_after_their_overrides_short():
    assert run_name([]) == "defaults"
    assert run_name(["train=smoke", "train.lr=0.001", "model.n_layers=2"]) == "smoke-lr0.001-n_layers2"
    # where a run is stored or launched does not name it
    assert run_name(["tracking.uri=sqlite:////tmp/a.db", "paths.output_dir=/tmp/o", "precision=bf16"]) == \
        "precision=bf16"
    long = run_name(["model=gpt2_124m", "attention=gqa", "attention.n_kv_heads=4", "pos=sinusoidal",
                     "mlp=relu2", "norm=layernorm", "train.warmup_steps=100"])
    assert long == "gpt2_124m-gqa-n_kv_heads4-sinusoidal-re…" and len(long) == 40


def test_sweep_names_and_commands():
    assert sweep_name("sweep", ["attention", "pos"]) == "sweep: attention x pos"
    assert sweep_name("positions_extrapolation", ["pos", "train.lr", "seed"]) == "positions_extrapolation: pos x lr x seed"
    overrides = ["attention=gqa", "tracking.uri=sqlite:////tmp/a b.db", "data.paths=[a,b]"]
    line = command(overrides)
    assert line.startswith("python run.py ") and shlex.split(line)[2:] == overrides
    assert command(["seed=0,1"], multirun=True) == "python run.py -m seed=0,1"
    assert command([], world_size=8).startswith("torchrun --nproc_per_node=8 run.py")
    assert sweep_values(["attention=gqa,mha", "train=smoke"], {"mlp": "swiglu,gelu"}) == \
        {"mlp": "swiglu,gelu", "attention": "gqa,mha", "train": "smoke"}


@pytest.fixture
def hydra_config(tmp_path):
    """Stands in for Hydra's config of a running job: `install(overrides, mode)` composes and installs one."""
    instance = HydraConfig.instance()
    before = instance.cfg

    def install(overrides=(), mode="RUN"):
        job = [f"hydra.mode={mode}", "hydra.job.num=0", f"hydra.runtime.output_dir={tmp_path}"]
        cfg = compose([*overrides, *job], return_hydra_config=True)
        instance.set_config(cfg)
        return cfg

    yield install
    instance.cfg = before


def test_params_hold_what_applies_to_the_run(hydra_config):
    cfg = compose()
    params = run_params(cfg, "cpu")
    assert not [k for k in params if k.startswith(("cluster.", "paths.")) or k == "device_pool"]
    assert {"seed", "attention.name", "train.lr", "tracking.uri", "model.n_layers"} <= set(params)
    on_slurm = run_params(hydra_config(["hydra/launcher=slurm"]), "cuda")
    assert "cluster.partition" in on_slurm and "device_pool" not in on_slurm
    assert "device_pool" in run_params(hydra_config(mode="MULTIRUN"), "cuda")
    assert "device_pool" not in run_params(hydra_config(mode="MULTIRUN"), "cpu")


def test_numbers_links_and_descriptions():
    assert [significant(x) for x in (3.950123, 34897.57, 0.52000001, 0.000123456, 1.5e7)] == \
        ["3.950", "34,900", "0.5200", "0.0001235", "1.500e+07"]
    link = run_link("sqlite:////tmp/m.db", "3", "abc")
    assert link.startswith("http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert "mlflow ui --backend-store-uri sqlite:////tmp/m.db" in link
    assert run_link("http://host:5000/", "3", "abc") == \
        "http://host:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert view_link("http://h:1", "3", "v") == "http://h:1/#/experiments/3/runs?workflowType=machine_learning" \
                                                "&viewStateShareKey=v"
    text = note({"val/loss": 3.95012345678, "perf/tokens_per_s": 34897.5, "train/loss": 1.0}, "python run.py")
    assert text == "val/loss **3.950** · perf/tokens_per_s **34,900**\n\n`python run.py`"
    assert note({"sweep/runs": 2.0}, "python run.py -m") is None


def test_the_summary_prints_four_significant_digits_and_the_link(capsys):
    plan = SimpleNamespace(backend=SimpleNamespace(name="sdpa"), device=torch.device("cpu"), dtype=torch.float32,
                           compile=False)
    from ablate.train.loop import LoopState

    history = [{"val/loss": 5.1234567, "step": 6}, {"val/loss": 3.8123, "step": 9}, {"val/loss": 3.950123, "step": 12}]
    trainer = SimpleNamespace(state=LoopState(step=12, history=history),
                              last_perf={"perf/tokens_per_s": 34897.57, "perf/peak_mem_gib": 0.51963, "perf/mfu": 0.432149})
    print_summary(compose(), plan, 69312, trainer, {"val/loss": 3.950123, "val/bpb": 5.698819}, "abc", "http://h/#/r")
    out = capsys.readouterr().out
    assert "ablate run abc\n  dashboard  http://h/#/r\n" in out
    assert "val/loss first 5.123 (step 6), best 3.812 (step 9), last 3.950; val/bpb 5.699" in out
    assert "34,900 tokens/s, peak memory 0.5196 GiB, MFU 43.21%" in out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    return uri, open_client(uri)


def test_a_failed_run_keeps_its_log_its_numbers_and_its_error(store, tmp_path, capsys):
    uri, client = store
    log = tmp_path / "run.log"
    log.write_text("[ablate][INFO] - job holds GPU 0\n")
    tracker = MlflowTracker(uri, "dash-log", "gqa-s0", {"ablate.command": "python run.py attention=gqa"},
                            log_file=log)
    assert tracker.link in capsys.readouterr().out  # the run's page is printed when the run starts
    tracker.log_metrics({"val/loss": 3.95012345678, "train/loss": 4.0}, step=3)
    tracker.finish("FAILED", error=RuntimeError("boom"))
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics["val/loss"] == 3.95012345678  # the store keeps every digit
    assert run.data.tags["mlflow.note.content"].startswith("val/loss **3.950**")
    assert {a.path for a in client.list_artifacts(tracker.run_id)} == {"run.log", "error.txt"}
    copy = client.download_artifacts(tracker.run_id, "run.log", str(tmp_path))
    assert open(copy).read() == log.read_text()
    quiet = MlflowTracker(uri, "dash-log", "none", {}, log_file=tmp_path / "absent.log")
    quiet.finish()
    assert client.list_artifacts(quiet.run_id) == []


def test_the_experiment_gets_a_saved_view_of_the_key_columns_once(store):
    uri, client = store
    experiment_id = client.create_experiment("dash-view")
    prepare_experiment(client, experiment_id, {})
    envelope = json.loads(client.get_experiment(experiment_id).tags[VIEW_TAG + "ablate-runs"])
    state = json.loads(envelope["state"])
    assert {"metrics.`val/loss`", "metrics.`val/bpb`", "metrics.`perf/tokens_per_s`", "params.`attention.name`",
            "params.`seed`"} <= set(state["selectedColumns"])
    assert state["orderByKey"] == "metrics.`val/loss`" and isinstance(envelope["createdAt"], int)
    client.set_experiment_tag(experiment_id, VIEW_TAG + "ablate-runs", "edited")
    prepare_experiment(client, experiment_id, client.get_experiment(experiment_id).tags)
    assert client.get_experiment(experiment_id).tags[VIEW_TAG + "ablate-runs"] == "edited"


def test_the_sweep_parent_is_named_holds_the_overrides_and_survives_a_failed_report(store, tmp_path, capsys,
                                                                                     monkeypatch):
    uri, client = store
    cfg = compose([f"tracking.uri={uri}", "tracking.experiment=dash-sweep", f"hydra.sweep.dir={tmp_path}/sweep",
                   f"paths.output_dir={tmp_path}/out"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.overrides.task = ["attention=gqa,mha", "pos=alibi,rope", "train=smoke"]
    parent = SweepParentRun()
    parent.on_multirun_start(cfg)
    run = client.get_run(parent.tracker.run_id)
    assert run.info.run_name == "sweep: attention x pos"
    assert run.data.params == {"sweep.attention": "gqa,mha", "sweep.pos": "alibi,rope", "sweep.train": "smoke"}
    assert run.data.tags["ablate.command"] == "python run.py -m attention=gqa,mha pos=alibi,rope train=smoke"
    assert (tmp_path / "sweep" / "sweep_axes").read_text().split() == ["attention", "pos"]
    tags = client.get_experiment(parent.tracker.experiment_id).tags
    state = json.loads(json.loads(tags[VIEW_TAG + parent.view])["state"])
    assert {"params.`attention.name`", "params.`pos.name`", "params.`seed`"} <= set(state["selectedColumns"])
    assert parent.tracker.run_id in state["searchFilter"]
    import ablate.report

    def broken(*args, **kwargs):
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(ablate.report, "build_report", broken)
    parent._report()  # a report that fails is said, not raised: the sweep's runs are complete without it
    assert "the sweep's report could not be built (RuntimeError: the disk is full)" in capsys.readouterr().err
    parent.on_multirun_end(cfg)  # no child ran (every job refused): nothing to report, the sweep ends FAILED
    assert "report" not in capsys.readouterr().err
    assert client.get_run(parent.tracker.run_id).info.status == "FAILED"


# ---- end to end: a sweep, an MLflow server, the runs table as Chromium renders it

CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--virtual-time-budget=15000"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url, server, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert server.poll() is None, "the MLflow server exited"
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the MLflow server at {url} did not answer within {timeout} s")


@pytest.mark.slow
def test_the_sweeps_runs_table_renders_names_and_key_columns(tmp_path):
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("the `chromium` binary is missing (apt-get install -y chromium)")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    open_client(uri)  # the schema is made before the server and the sweep open the store together
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "w") as server_log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                                   "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  stdout=server_log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        sweep = subprocess.run([sys.executable, "run.py", "-m", "attention=gqa,mha", "train=smoke",
                                "model.n_layers=1", "model.d_model=64", "device=cpu", f"tracking.uri={uri}",
                                f"hydra.sweep.dir={tmp_path}/sweep", f"paths.output_dir={tmp_path}/out"],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert sweep.returncode == 0, sweep.stderr[-3000:]
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("ablate").experiment_id])
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        children = {r.info.run_name: r for r in runs if r is not parent}
        assert set(children) == {"gqa", "mha"} and parent.info.run_name == "sweep: attention"
        assert parent.data.params["sweep.attention"] == "gqa,mha"
        assert "report/report.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
        gqa = children["gqa"]
        assert gqa.data.tags["ablate.command"].startswith("python run.py attention=gqa train=smoke")
        assert {"config.yaml", "run.log"} <= {a.path for a in client.list_artifacts(gqa.info.run_id)}
        assert not [k for k in gqa.data.params if k.startswith(("cluster.", "paths.")) or k == "device_pool"]
        assert f"/#/experiments/{gqa.info.experiment_id}/runs/{gqa.info.run_id}?workflowType=machine_learning" \
            in sweep.stdout
        assert re.search(r"val/loss first \d\.\d+ \(step \d+\), best \d\.\d+ \(step \d+\), last \d\.\d+; "
                         r"val/bpb \d\.\d+\n", sweep.stdout), sweep.stdout[-2000:]
        (page,) = re.findall(r"the sweep's runs in MLflow: http://127\.0\.0\.1:5000/(\S+)", sweep.stdout)
        _wait_until_up(url, server)
        shot = tmp_path / "dashboard.png"
        rendered = subprocess.run([browser, *CHROMIUM, f"--user-data-dir={tmp_path / 'profile'}",
                                   f"--screenshot={shot}", "--window-size=1600,1000", "--dump-dom", f"{url}/{page}"],
                                  capture_output=True, text=True, timeout=120)
        print(f"screenshot of the sweep's runs table: {shot}")
        dom = rendered.stdout
        for name, run in children.items():  # each run's name is the text of the link to its page
            assert re.search(rf'runs/{run.info.run_id}"[^>]*>(<[^>]+>)*{name}<', dom), (name, dom[-2000:])
        assert "parentRunId" in dom and "val/loss" in dom and "attention.name" in dom
        assert shot.stat().st_size > 10_000
    finally:
        server.terminate()
        server.wait(timeout=30)
