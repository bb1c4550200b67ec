"""The compiled training step, on packed rows, for every backend auto can choose.

A few compiled steps must give the eager step's loss (same weights, same batches; float32 on CPU,
bf16 on CUDA), compile once (batches with new document layouts trigger no recompile after
warm-up), hold no graph break, and never fall back to flex's unfused path.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from ablate.bench.toolkit import document_lengths
from ablate.config import compose
from ablate.data import write_shard
from ablate.experiment import build_run
from ablate.kernels import get_backend

VOCAB = 512


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Token shards of short documents (log-normal, mean 90 tokens): rows of 256 hold several."""
    rng = np.random.default_rng(0)
    lens = document_lengths(rng, 400_000, 90, low=2)
    ids = rng.integers(0, VOCAB - 1, size=sum(lens))
    ids[np.cumsum(lens) - 1] = VOCAB - 1
    folder = tmp_path_factory.mktemp("shards")
    write_shard(folder / "t_train.bin", ids)
    write_shard(folder / "t_val.bin", ids[:20_000])
    return folder


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Token shards of documents of exactly 256 tokens: rows of 256 hold one each (no layout)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB - 1, size=256 * 400)
    ids[255::256] = VOCAB - 1
    folder = tmp_path_factory.mktemp("rows")
    write_shard(folder / "t_train.bin", ids)
    write_shard(folder / "t_val.bin", ids[: 256 * 20])
    return folder


def losses(shards, overrides: list[str], compiled: bool, steps: int, device: str):
    cfg = compose(["model.n_layers=2", "model.d_model=128", "model.n_heads=4", "model.context=256",
                   "train.batch_size=8", "data=tokens", f"data.path={shards}", f"data.vocab_size={VOCAB}",
                   f"data.eot_id={VOCAB - 1}", "tracking=none", f"device={device}", f"train.compile={str(compiled).lower()}",
                   *overrides])
    built = build_run(cfg)
    out, graphs = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            loss, _, batch = built.trainer.train_step(lr=1e-3)
            out.append(loss.item())
            graphs.append(counters["stats"]["unique_graphs"])
    built.trainer.batches.close()
    unfused = [w for w in caught if "without torch.compile" in str(w.message)]
    return out, graphs, unfused, built.plan.backend.name


def check_compiled_step(shards, overrides, backend, device, tol):
    if get_backend(backend).unavailable():
        pytest.skip(get_backend(backend).unavailable())
    overrides = [*overrides, f"backend={backend}"]
    eager, _, _, _ = losses(shards, overrides, False, 2, device)
    torch._dynamo.reset()
    counters.clear()
    compiled, graphs, unfused, name = losses(shards, overrides, True, 8, device)
    assert name == backend
    assert all(np.isfinite(compiled))
    assert abs(compiled[0] - eager[0]) / eager[0] < tol, (compiled[:2], eager)
    assert graphs[-1] == graphs[1], f"recompiled after warm-up: unique graphs per step {graphs}"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not unfused, [str(w.message) for w in unfused]


@pytest.mark.slow
def test_compiled_step_on_cpu(shards):
    small = ["model.n_layers=1", "model.d_model=64", "model.context=128", "train.batch_size=4"]
    check_compiled_step(shards, ["pos=alibi", "attention=gqa", *small], "sdpa", "cpu", 1e-4)


CUDA_CELLS = [
    ("sdpa", []),
    ("flex", ["pos=alibi", "attention=gqa"]),
    ("flex", ["attention.window=64", "pos=rope"]),
    ("cudnn", ["pos=rope", "attention=gqa"]),
    ("cudnn", ["pos=alibi", "attention=mqa"]),
    ("cudnn", ["pos=learned", "mlp=gelu", "norm=layernorm"]),
]


@pytest.mark.cuda
@pytest.mark.parametrize("backend,overrides", CUDA_CELLS, ids=[f"{b}-{'-'.join(o) or 'mha'}" for b, o in CUDA_CELLS])
def test_compiled_step_on_cuda(shards, backend, overrides):
    check_compiled_step(shards, overrides, backend, "cuda", 2e-2)


ROW_CELLS = [("cudnn", ["pos=rope", "attention=gqa"]), ("cudnn", ["pos=learned", "attention=gqa"]),
             ("cudnn", ["pos=learned", "mlp=gelu", "norm=layernorm"])]


@pytest.mark.cuda
@pytest.mark.parametrize("backend,overrides", ROW_CELLS, ids=[f"{b}-{'-'.join(o)}" for b, o in ROW_CELLS])
def test_compiled_step_on_cuda_rows_of_one_document(rows, backend, overrides):
    """The dense path (no layout: rows of one document each): RoPE's q and k from one matmul and the
    rope op, GQA without RoPE projecting q, k and v apart, and MHA's one fused projection."""
    check_compiled_step(rows, overrides, backend, "cuda", 2e-2)


@pytest.mark.cuda
def test_auto_compiles_on_cuda_and_picks_a_packed_backend(shards):
    cfg = compose(["data=tokens", f"data.path={shards}", f"data.vocab_size={VOCAB}", f"data.eot_id={VOCAB - 1}",
                   "tracking=none", "model.n_heads=4"])
    built = build_run(cfg)
    assert built.plan.compile is True
    assert built.plan.backend.name == ("cudnn" if get_backend("cudnn").unavailable() is None else "flex")
    built.trainer.batches.close()
