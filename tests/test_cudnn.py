"""The cudnn backend: packed-document attention against the float32 eager reference.

Tolerance: cuDNN computes in bf16 with float32 softmax/accumulation, the reference in float32 from
the same bf16 inputs. Output and gradients (dq, dk, dv) must agree to a max abs error of at most
2e-2 x the reference's max magnitude (bf16 has an 8-bit mantissa, ~4e-3 relative rounding).
"""
import importlib.util

import pytest
import torch

import ablate.kernels.eager  # noqa: F401 - registers the reference
from ablate.kernels import cudnn as cudnn_backend
from ablate.kernels.base import BACKENDS
from ablate.kernels.spec import AttentionSpec, Cell, alibi_slopes

REL_TOL = 2e-2
ROWS = ((1, 37, 1, 100, 117), (256,), (64, 1, 63, 128))  # length-1 docs and a whole-row doc
T = 256


def _backend(name):
    return BACKENDS.build(name)


# ----------------------------------------------------------------------------------------- CPU


def _fresh_reason():
    cudnn_backend._why_unavailable.cache_clear()
    try:
        return cudnn_backend.CudnnBackend().unavailable()
    finally:
        cudnn_backend._why_unavailable.cache_clear()


def test_reports_unavailable_with_reason():
    reason = _fresh_reason()
    usable = (
        importlib.util.find_spec("cudnn") is not None
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability() >= cudnn_backend.MIN_CAPABILITY
    )
    if usable:
        pytest.skip("cuDNN frontend and a capable GPU are present")
    assert reason is not None
    assert cudnn_backend.INSTALL_HINT in reason or "CUDA" in reason or "capability" in reason


def test_missing_package_names_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cudnn" else real(name, *a))
    reason = _fresh_reason()
    assert reason is not None and "pip install 'ablate[cudnn]'" in reason


def test_refuses_cells_it_cannot_serve():
    be = cudnn_backend.CudnnBackend()
    ok = Cell(device="cuda", packed=True, head_dim=128, dtype=torch.bfloat16)
    assert be.refuse(ok) is None
    assert be.refuse(Cell(device="cuda", packed=True, alibi=True, gqa=True, head_dim=64, dtype=torch.float16)) is None
    assert be.refuse(Cell(device="cuda", causal=False, packed=True, head_dim=64, dtype=torch.bfloat16)) is None
    assert be.refuse(Cell(device="cuda", head_dim=256, backward=False, dtype=torch.bfloat16)) is None
    refused = [
        Cell(device="cpu", head_dim=64, dtype=torch.bfloat16),
        Cell(device="cuda", head_dim=64, dtype=torch.float32),
        Cell(device="cuda", window=True, head_dim=64, dtype=torch.bfloat16),
        Cell(device="cuda", causal=False, alibi=True, head_dim=64, dtype=torch.bfloat16),
        Cell(device="cuda", head_dim=60, dtype=torch.bfloat16),
        Cell(device="cuda", head_dim=256, backward=True, dtype=torch.bfloat16),
        Cell(device="cuda", head_dim=320, backward=False, dtype=torch.bfloat16),
    ]
    for cell in refused:
        assert be.refuse(cell), cell.describe()


def test_doc_bucket():
    assert [cudnn_backend.doc_bucket(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 31, 33)] == [
        1, 2, 4, 8, 8, 16, 16, 32, 32, 48,
    ]


def test_seq_bucket():
    assert [cudnn_backend.seq_bucket(n, 4096) for n in (1, 64, 65, 1000, 2048, 3000, 4096)] == [
        64, 64, 128, 1024, 2048, 4096, 4096,
    ]
    assert cudnn_backend.seq_bucket(100, 96) == 96  # never beyond the row length


# ---------------------------------------------------------------------------------------- CUDA


def _spec(n, kv, h, alibi, causal=True, rows=ROWS):
    return AttentionSpec(
        n_heads=n, n_kv_heads=kv, head_dim=h, causal=causal, doc_lens=rows,
        alibi_slopes=alibi_slopes(n) if alibi else None,
    )


def _inputs(n, kv, h, rows=len(ROWS), seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda heads: torch.randn(rows, T, heads, h, device="cuda", generator=g).to(torch.bfloat16)  # noqa: E731
    grad = torch.randn(rows, T, n, h, device="cuda", generator=g).to(torch.bfloat16).float()
    return mk(n), mk(kv), mk(kv), grad


def _fwd_bwd(name, q, k, v, grad, spec, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    o = _backend(name).attend(*leaves, spec)
    (o.float() * grad).sum().backward()
    return [o.float()] + [x.grad.float() for x in leaves]


def _rel_err(x, ref):
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def _check_against_eager(n, kv, h, alibi, causal=True):
    q, k, v, grad = _inputs(n, kv, h)
    got = _fwd_bwd("cudnn", q, k, v, grad, _spec(n, kv, h, alibi, causal), torch.bfloat16)
    ref = _fwd_bwd("eager", q, k, v, grad, _spec(n, kv, h, alibi, causal), torch.float32)
    errs = {name: _rel_err(x, r) for name, x, r in zip(("o", "dq", "dk", "dv"), got, ref)}
    print(f"cudnn vs eager N={n} K={kv} H={h} alibi={alibi} causal={causal}: " + ", ".join(f"{a}={b:.2e}" for a, b in errs.items()))
    assert all(x.isfinite().all() for x in got)
    assert max(errs.values()) <= REL_TOL, errs


def _skip_if_unavailable():
    reason = cudnn_backend.CudnnBackend().unavailable()
    if reason:
        pytest.skip(reason)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "n,kv,h,alibi",
    [
        (8, 8, 64, False),  # MHA
        (8, 2, 64, False),  # GQA
        (8, 1, 128, False),  # MQA
        (8, 8, 128, True),  # ALiBi, power-of-two heads
        (12, 12, 64, True),  # ALiBi, interleaved slopes for 12 heads
        (12, 4, 64, True),  # ALiBi + GQA
        (8, 1, 64, True),  # ALiBi + MQA
    ],
)
def test_matches_eager(n, kv, h, alibi):
    _skip_if_unavailable()
    _check_against_eager(n, kv, h, alibi)


@pytest.mark.cuda
def test_matches_eager_non_causal_packed():
    _skip_if_unavailable()
    _check_against_eager(8, 2, 64, alibi=False, causal=False)


@pytest.mark.cuda
def test_inference_path_matches_eager():
    _skip_if_unavailable()
    q, k, v, _ = _inputs(8, 2, 64)
    with torch.no_grad():
        got = _backend("cudnn").attend(q, k, v, _spec(8, 2, 64, True)).float()
        ref = _backend("eager").attend(q.float(), k.float(), v.float(), _spec(8, 2, 64, True))
    assert _rel_err(got, ref) <= REL_TOL


@pytest.mark.cuda
def test_new_layout_in_same_bucket_reuses_graphs_without_host_sync():
    _skip_if_unavailable()
    n, kv, h = 8, 2, 64
    first = ((100, 28, 128), (1, 255), (256,))  # 6 docs -> bucket 8
    second = ((3, 5, 120, 128), (200, 56), (10, 246))  # 8 docs -> bucket 8
    q, k, v, grad = _inputs(n, kv, h)
    _fwd_bwd("cudnn", q, k, v, grad, _spec(n, kv, h, False, rows=first), torch.bfloat16)
    torch.cuda.synchronize()
    builds = cudnn_backend.graph_builds()
    spec = _spec(n, kv, h, False, rows=second)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        o = _backend("cudnn").attend(*leaves, spec)
        o2 = _backend("cudnn").attend(*leaves, spec)  # a second layer: the layout comes from spec.cache
        ((o.float() + o2.float()) * grad).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cudnn_backend.graph_builds() == builds
    ref = _fwd_bwd("eager", q, k, v, grad, _spec(n, kv, h, False, rows=second), torch.float32)
    assert _rel_err(o.float(), ref[0]) <= REL_TOL
    assert _rel_err(leaves[0].grad.float(), 2 * ref[1]) <= REL_TOL


@pytest.mark.cuda
def test_rejects_slopes_other_than_cudnns():
    _skip_if_unavailable()
    q, k, v, _ = _inputs(8, 8, 64)
    spec = _spec(8, 8, 64, True)
    spec.alibi_slopes = spec.alibi_slopes * 2
    with pytest.raises(ValueError, match="slopes"):
        _backend("cudnn").attend(q, k, v, spec)
