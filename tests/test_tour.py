"""The seed tour (`python -m ablate.tour`) on CPU: every section runs or says why not, one MLflow run."""
import math
import re
import weakref

import pytest
import torch
from mlflow.tracking import MlflowClient

from ablate.tour import main
from ablate.tour.cli import SECTIONS, chosen
from ablate.tour.memory import Point, exponent, saved_bytes
from ablate.tour.report import NEEDS_CUDA, Tour
from ablate.tour.sections import doc_lens_for

XFORMERS_SECTIONS = ["correctness", "scaling", "causal", "packed", "gqa", "alibi"]


def _run(uri):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tour").experiment_id])
    return client, run


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU tour's skip lines")
def test_cpu_tour_passes_skips_xformers_kernels_and_logs_one_run(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/tour.db"
    code = main(["--quick", "--device", "cpu", "--tracking-uri", uri])
    out = capsys.readouterr().out
    assert code == 0, out
    blocks = out.split("\n[")[1:]
    assert [b.split("]")[0] for b in blocks] == [str(i) for i in range(1, 8)]
    for key, block in zip([name for name, _ in SECTIONS], blocks):
        skips = [line for line in block.splitlines() if line.endswith(f"skipped: {NEEDS_CUDA}")]
        assert len(skips) == (1 if key in XFORMERS_SECTIONS else 0), (key, block)
    assert re.fullmatch(r"\d+ checks, 0 failed", out.rstrip().splitlines()[-1])

    client, run = _run(uri)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("correctness/eager_out", "correctness/auto_grad", "causal/mask", "packed/auto_out",
                "gqa/kv_saved_frac", "alibi/slopes", "scaling/vanilla_ms", "training/loss_ratio"):
        assert f"tour/{key}" in metrics, key
    assert metrics["tour/correctness/auto_out"] <= 1e-5
    assert metrics["tour/packed/padding_frac_padded"] > 0.3 and metrics["tour/packed/padding_frac_packed"] == 0
    assert metrics["tour/gqa/kv_saved_frac"] == pytest.approx(0.5)
    assert metrics["tour/scaling/vanilla_memory_exponent"] > 1.7
    assert metrics["tour/scaling/auto_memory_exponent"] < 1.2
    assert metrics["tour/summary/failed"] == 0

    losses = [m.value for m in client.get_metric_history(run.info.run_id, "tour/training/train/loss")]
    assert len(losses) == 100
    assert sum(losses[-10:]) / 10 < 0.8 * losses[0]
    times = client.get_metric_history(run.info.run_id, "tour/scaling/vanilla_ms")
    assert sorted(m.step for m in times) == [128, 256, 512, 1024]  # the step is the sequence length

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "tour")}
    assert {"tour/scaling.png", "tour/training.png"} <= artifacts
    assert "tour.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_failed_tolerance_gives_a_nonzero_exit(tmp_path):
    uri = f"sqlite:///{tmp_path}/tour.db"
    code = main(["--quick", "--device", "cpu", "--only", "correctness", "--tolerance-scale", "0",
                 "--tracking-uri", uri])
    assert code == 1
    _, run = _run(uri)
    assert run.info.status == "FAILED"
    assert "correctness/auto_out" in run.data.tags["tour.failed_checks"]


def test_check_limits_and_errors_count_as_failures():
    tour = Tour(torch.device("cpu"), quick=True, echo=lambda line: None)
    with tour.section(1, "demo", "checks"):
        assert tour.check("within", 1e-6, 1e-5)
        assert not tour.check("beyond", 2e-5, 1e-5)
        assert not tour.check("nan", math.nan, 1.0)
        assert tour.close("same", torch.ones(3), torch.ones(3), 0.0)
    with tour.section(2, "broken", "raises"):
        raise RuntimeError("boom")
    assert [c.name for c in tour.failures] == ["beyond", "nan", "error"]
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


def test_section_choice_and_documents():
    assert chosen(None) == list(range(7))
    assert chosen("training,1") == [0, 6]
    with pytest.raises(SystemExit):
        chosen("nope")
    lens = doc_lens_for(256)
    assert sum(lens) == 256 and len(lens) == 6 and min(lens) >= 1
