"""The seed tour (`python -m ablate.tour`): every section runs or says why not, into one MLflow run; its
kernels are checked by the shared toolkit and its training run is built by `build_run`."""
import math
import re
import weakref

import pytest
import torch
from mlflow.tracking import MlflowClient

from ablate.bench.toolkit import Comparison, tolerance
from ablate.experiment import Built
from ablate.tour import main
from ablate.tour.cli import SECTIONS, chosen
from ablate.tour.memory import Point, exponent, saved_bytes
from ablate.tour.report import Tour
from ablate.tour.training import built

XFORMERS_SECTIONS = ["correctness", "scaling", "causal", "packed", "gqa", "alibi"]


@pytest.fixture(scope="module")
def store(module_store):
    return module_store


def _runs(uri):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tour").experiment_id], order_by=["start_time ASC"])
    return client, runs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU tour's skip lines")
def test_cpu_tour_passes_skips_xformers_kernels_and_logs_one_run(store, capsys):
    code = main(["--quick", "--device", "cpu", "--tracking-uri", store])
    out = capsys.readouterr().out
    assert code == 0, out
    blocks = out.split("\n[")[1:]
    assert [b.split("]")[0] for b in blocks] == [str(i) for i in range(1, 8)]
    for key, block in zip([name for name, _ in SECTIONS], blocks):
        skips = [line for line in block.splitlines() if line.startswith("  xformers: skipped: ")]
        assert len(skips) == (1 if key in XFORMERS_SECTIONS else 0), (key, block)
        assert all(line.endswith("xformers kernels need CUDA") for line in skips)
    assert re.fullmatch(r"\d+ checks, 0 failed", out.rstrip().splitlines()[-1])
    limit = f"(limit {tolerance(torch.float32, 'cpu'):.3g})"  # the toolkit's one tolerance table
    compared = [line for line in out.splitlines() if line.startswith("  auto (sdpa)") and " rel " in line]
    assert len(compared) == 11 and all(limit in line for line in compared)

    client, (run,) = _runs(store)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("correctness/eager_out", "correctness/eager_grad", "correctness/auto_grad", "causal/mask",
                "packed/mask", "packed/auto_out", "packed/auto_alone", "gqa/auto_grad", "gqa/kv_saved_frac",
                "alibi/slopes", "alibi/auto_grad", "scaling/vanilla_ms", "training/loss_ratio"):
        assert f"tour/{key}" in metrics, key
    assert metrics["tour/correctness/auto_out"] <= 1e-4 and metrics["tour/correctness/eager_out"] <= 1e-5
    assert metrics["tour/causal/mask"] == 0 and metrics["tour/packed/mask"] == 0
    assert metrics["tour/packed/padding_frac_padded"] > 0.3 and metrics["tour/packed/padding_frac_packed"] == 0
    assert metrics["tour/gqa/kv_saved_frac"] == pytest.approx(0.5)
    assert metrics["tour/scaling/vanilla_memory_exponent"] > 1.7
    assert metrics["tour/scaling/auto_memory_exponent"] < 1.2
    assert metrics["tour/summary/failed"] == 0
    assert run.data.tags["tour.correctness.auto"] == "sdpa"

    losses = [m.value for m in client.get_metric_history(run.info.run_id, "tour/training/train/loss")]
    assert len(losses) == 60
    assert sum(losses[-6:]) / 6 < 0.8 * losses[0]
    times = client.get_metric_history(run.info.run_id, "tour/scaling/vanilla_ms")
    assert sorted(m.step for m in times) == [128, 256, 512, 1024]  # the step is the sequence length
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "tour")}
    assert {"tour/scaling.png", "tour/packed.png", "tour/alibi.png", "tour/training.png"} <= artifacts
    assert "tour.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_failed_tolerance_gives_a_nonzero_exit(store):
    code = main(["--quick", "--device", "cpu", "--only", "correctness", "--tolerance-scale", "0",
                 "--tracking-uri", store])
    assert code == 1
    _, runs = _runs(store)
    assert runs[-1].info.status == "FAILED"
    assert "correctness/auto_out" in runs[-1].data.tags["tour.failed_checks"]


def test_training_is_the_run_builder_s_run():
    tour = Tour(torch.device("cpu"), quick=True, echo=lambda line: None)
    run = built(tour)
    assert isinstance(run, Built) and built(tour) is run  # built once, shared with the packed section
    assert run.cfg.attention.name == "gqa" and run.cfg.pos.name == "rope" and run.cfg.train.steps == 60
    assert run.plan.backend.name == "sdpa" and run.flops.n_layers == run.cfg.model.n_layers


def test_check_limits_and_errors_count_as_failures():
    tour = Tour(torch.device("cpu"), quick=True, echo=lambda line: None)
    with tour.section(1, "demo", "checks"):
        assert tour.check("within", 1e-6, 1e-5)
        assert not tour.check("beyond", 2e-5, 1e-5)
        assert not tour.check("nan", math.nan, 1.0)
        assert tour.compared("same", Comparison({"out": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0}, 1e-5), "same")
        assert not tour.compared("grads", Comparison({"out": 0.0, "dq": 0.0, "dk": 3e-5, "dv": 0.0}, 1e-5), "g")
    with tour.section(2, "broken", "raises"):
        raise RuntimeError("boom")
    assert [c.name for c in tour.failures] == ["beyond", "nan", "grads_grad", "error"]
    assert tour.summary() == 1
    strict = Tour(torch.device("cpu"), quick=True, tolerance_scale=0.0, echo=lambda line: None)
    assert not strict.check("scaled", 1e-9, 1e-5) and strict.check("unscaled", 0.5, 0.8, scaled=False)


def test_memory_exponent_and_saved_bytes():
    assert exponent({T: Point(saved=T * T) for T in (128, 256, 512)}) == pytest.approx(2.0)
    assert exponent({128: Point(saved=128), 256: Point(oom=True)}) is None
    q = torch.randn(1, 64, 2, 8, requires_grad=True)
    assert saved_bytes(lambda: (q * 2).sum(), (q,)) == 0  # only q itself is saved... nothing beyond
    assert saved_bytes(lambda: (q.exp() * q.exp()).sum(), (q,)) >= 2 * q.numel() * 4
    outputs = []

    def keep_a_weak_ref():
        out = q.exp()  # exp saves its own output for backward
        outputs.append(weakref.ref(out))
        return out

    saved_bytes(keep_a_weak_ref, (q,))
    assert outputs[0]() is None  # measuring does not keep the graph (and its memory) alive


def test_section_choice():
    assert chosen(None) == list(range(7))
    assert chosen("training,1") == [0, 6]
    with pytest.raises(SystemExit):
        chosen("nope")


@pytest.mark.cuda
def test_cuda_tour_checks_xformers_kernels(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/tour.db"
    code = main(["--quick", "--device", "cuda", "--only", "correctness,causal,packed,gqa,alibi",
                 "--tracking-uri", uri])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "xformers: skipped" not in out
    _, (run,) = _runs(uri)
    metrics = run.data.metrics
    for key in ("correctness/xformers_out", "correctness/xformers_grad", "correctness/xformers_float32_out",
                "correctness/auto_float32_grad", "causal/xformers_grad", "packed/xformers_grad",
                "packed/xformers_alone", "gqa/xformers_grad", "gqa/xformers_bmghk_out", "alibi/xformers_out"):
        assert metrics[f"tour/{key}"] < tolerance(torch.bfloat16, "cuda"), key
    assert "tour/alibi/xformers_grad" not in metrics  # xformers' ALiBi bias has no backward op: forward only
    assert "tour/gqa/xformers_bmghk_grad" not in metrics
