"""The kernel benchmark (`python -m ablate.bench.kernels`) on CPU at tiny sizes: every backend on every
standard cell, refusals with their reasons, auto's pick, TFLOP/s from the shared FLOP count, MLflow."""
import itertools

import pytest
import torch
from mlflow.tracking import MlflowClient

from ablate.bench.kernels import CELLS, PASSES, Sizes, bench, format_results, main, problem
from ablate.bench.toolkit import attention_flops
from ablate.kernels import BACKENDS, select_backend, standard_cells

TINY = Sizes(rows=1, row_len=32, packed_rows=2, packed_len=32, heads=2, kv_heads=1, head_dim=16,
             doc_min=4, doc_max=12, window=8, warmup=0, reps=1)
TINY_ARGS = ["--rows", "1", "--row-len", "32", "--packed-rows", "2", "--packed-len", "32", "--heads", "2",
             "--kv-heads", "1", "--head-dim", "16", "--doc-min", "4", "--doc-max", "12", "--window", "8",
             "--warmup", "0", "--reps", "1"]


def test_cpu_bench_covers_every_cell_reports_refusals_and_auto_pick():
    results, picks = bench("cpu", torch.float32, TINY)
    got = {(r.cell, r.backend, r.pass_): r for r in results}
    assert set(got) == set(itertools.product(CELLS, BACKENDS.names(), PASSES))
    for (cell, backend, pass_), r in got.items():
        if backend in ("xformers", "cudnn") or (backend == "flex" and pass_ == "fwdbwd"):
            assert r.note and r.note.startswith("refused: ") and r.tflops is None, (cell, backend, pass_, r)
        else:
            assert r.note is None and r.ms > 0 and r.tflops > 0 and 0 < r.ratio <= 1, (cell, backend, pass_, r)
    assert "need CUDA" in got[("dense_causal", "xformers", "fwd")].note
    for pass_ in PASSES:  # the best backend of each cell has ratio 1
        for cell in CELLS:
            assert max(got[(cell, b, pass_)].ratio or 0 for b in BACKENDS.names()) == pytest.approx(1.0)
    for pass_ in PASSES:
        for name, cell in standard_cells("cpu", torch.float32, TINY.head_dim, backward=pass_ == "fwdbwd").items():
            assert picks[(name, pass_)] == select_backend(cell, "auto").name == "sdpa"

    table = format_results(results, picks, "tiny")
    lines = table.splitlines()
    refused = [line for line in lines if " xformers " in line]
    assert len(refused) == len(CELLS) * len(PASSES) and all("refused: xformers kernels need CUDA" in s for s in refused)
    marked = [line for line in lines if line.endswith("<- auto")]
    assert len(marked) == len(CELLS) * len(PASSES) and all(" sdpa " in line for line in marked)


def test_tflops_use_the_shared_flop_count_on_the_packed_documents():
    results, _ = bench("cpu", torch.float32, TINY, backends=["eager"], cells=["packed_causal", "window"])
    cells = standard_cells("cpu", torch.float32, TINY.head_dim)
    for r in results:
        spec, doc_lens, B, T = problem(cells[r.cell], TINY)
        assert r.tflops == pytest.approx(attention_flops(spec, doc_lens, B, T, r.pass_ == "fwdbwd") / r.ms / 1e9)
    spec, doc_lens, B, T = problem(cells["packed_causal"], TINY)
    assert (B, T) == (2, 32) and all(sum(row) == T for row in doc_lens) and sum(map(len, doc_lens)) > 2
    assert max(n for row in doc_lens for n in row) <= TINY.doc_max
    assert spec.window is None and problem(cells["window"], TINY)[0].window == TINY.window
    assert problem(cells["gqa"], TINY)[0].n_kv_heads == TINY.kv_heads


def test_bad_sizes_and_names_fail_before_any_timing():
    with pytest.raises(ValueError, match="kv_heads=3 must divide heads=2"):
        Sizes(**{**TINY.__dict__, "kv_heads": 3})
    with pytest.raises(ValueError, match="doc_min"):
        Sizes(**{**TINY.__dict__, "doc_min": 20})
    with pytest.raises(ValueError, match="unknown backend or cell .'nope'"):
        bench("cpu", torch.float32, TINY, backends=["eager", "nope"])
    with pytest.raises(SystemExit):
        main(["--device", "cpu", *TINY_ARGS, "--kv-heads", "3"])


def test_command_line_sizes_and_mlflow_run(store, capsys):
    uri = store
    main(["--device", "cpu", *TINY_ARGS, "--backends", "eager", "sdpa", "xformers", "--cells", "dense_causal",
          "alibi_packed", "--tracking-uri", uri])
    out = capsys.readouterr().out
    assert "packed_len=32" in out and "logged to MLflow run" in out
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kernel-bench").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["tflops/alibi_packed/eager/fwdbwd"] > 0
    assert not any("xformers" in key for key in run.data.metrics)  # refused: no figure
    assert run.data.tags["auto/dense_causal/fwd"] == "sdpa" and run.data.params["packed_len"] == "32"
    assert "kernel_bench.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.cuda
def test_cuda_bench_runs_every_served_backend_and_auto_picks_one_that_ran():
    sizes = Sizes(rows=2, row_len=1024, packed_rows=1, packed_len=2048, heads=8, kv_heads=2, head_dim=64,
                  doc_min=32, doc_max=512, window=256, warmup=2, reps=3)
    results, picks = bench("cuda", torch.bfloat16, sizes)
    failed = [(r.cell, r.backend, r.pass_, r.note) for r in results if r.note and not r.note.startswith("refused")]
    assert not failed
    ran = {(r.cell, r.backend, r.pass_) for r in results if r.tflops is not None}
    assert all((cell, name, pass_) in ran for (cell, pass_), name in picks.items())
    assert all(r.peak_bytes is not None for r in results if r.tflops is not None)
    assert ("dense_causal", "xformers", "fwdbwd") in ran and ("alibi_causal", "xformers", "fwd") in ran
