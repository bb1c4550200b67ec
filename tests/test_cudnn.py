"""The cudnn backend: packed-document attention against the float32 eager reference (tolerances of
`ablate.bench.toolkit`), its refusals, buckets, graph reuse and host-sync-free layouts."""
import importlib.util

import pytest
import torch

from ablate.bench.toolkit import compare_to_reference, rel_err, run_attention, tolerance
from ablate.kernels import cudnn as cudnn_backend
from ablate.kernels import cudnn_graphs
from ablate.kernels.ragged import doc_bucket, prepare_ragged, seq_bucket
from ablate.kernels.spec import AttentionSpec, Cell

ROWS = ((1, 37, 1, 100, 117), (256,), (64, 1, 63, 128))  # length-1 docs and a whole-row doc
T = 256


# ----------------------------------------------------------------------------------------- CPU


def _fresh_reason():
    cudnn_graphs.why_unavailable.cache_clear()
    try:
        return cudnn_backend.CudnnBackend().unavailable()
    finally:
        cudnn_graphs.why_unavailable.cache_clear()


def test_reports_unavailable_with_reason():
    reason = _fresh_reason()
    usable = (importlib.util.find_spec("cudnn") is not None and torch.cuda.is_available()
              and torch.cuda.get_device_capability() >= cudnn_graphs.MIN_CAPABILITY)
    if usable:
        pytest.skip("cuDNN frontend and a capable GPU are present")
    assert reason is not None
    assert cudnn_graphs.INSTALL_HINT in reason or "CUDA" in reason or "capability" in reason


def test_missing_package_names_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cudnn" else real(name, *a))
    reason = _fresh_reason()
    assert reason is not None and "pip install 'ablate[cudnn]'" in reason


def test_refuses_cells_it_cannot_serve():
    be = cudnn_backend.CudnnBackend()
    assert be.refuse(Cell(device="cuda", packed=True, head_dim=128, dtype=torch.bfloat16)) is None
    assert be.refuse(Cell(device="cuda", packed=True, alibi=True, gqa=True, head_dim=64, dtype=torch.float16)) is None
    assert be.refuse(Cell(device="cuda", causal=False, packed=True, head_dim=64, dtype=torch.bfloat16)) is None
    assert be.refuse(Cell(device="cuda", head_dim=256, backward=False, dtype=torch.bfloat16)) is None
    assert be.refuse(Cell(device="cuda", packed=True, head_dim=64, dtype=torch.bfloat16, compiled=True)) is None
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


def test_packed_projections_where_the_kernel_gains_from_them():
    be, layout = cudnn_backend.CudnnBackend(), prepare_ragged(AttentionSpec(4, 4, 8), ((8, 8),), 1, 16)
    assert be.packs_qkv(AttentionSpec(4, 4, 8), layout)  # the ragged graph reads packed buffers
    assert be.packs_qkv(AttentionSpec(4, 4, 8, alibi=True), None)  # ALiBi runs the ragged graph too
    assert be.packs_qkv(AttentionSpec(4, 2, 8), None) and be.packs_qkv(AttentionSpec(4, 1, 8), None)  # GQA, MQA
    assert not be.packs_qkv(AttentionSpec(4, 4, 8), None)  # dense MHA: one fused projection


def test_doc_bucket():
    assert [doc_bucket(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 31, 33)] == [1, 2, 4, 8, 8, 16, 16, 32, 32, 48]


def test_seq_bucket():
    lengths = (1, 64, 65, 500, 513, 1000, 1025, 2048, 2458, 3000, 4096)
    assert [seq_bucket(n, 4096) for n in lengths] == [64, 64, 128, 512, 1024, 1024, 1536, 2048, 2560, 3072, 4096]
    assert seq_bucket(100, 96) == 96 and seq_bucket(1100, 1200) == 1200  # never beyond the row length


def test_the_kernel_sees_documents_longest_first_where_they_are():
    spec = AttentionSpec(4, 2, 8)
    rows = ((3, 9, 4), (16,), (1, 15))  # 6 documents -> bucket 8
    layout = prepare_ragged(spec, rows, 3, 16)
    lens = layout.seq_len.tolist()
    assert lens == [16, 15, 9, 4, 3, 1, 0, 0]
    starts = [0, 3, 12, 16, 32, 33]  # in the buffer, by document
    kernel_order = [3, 5, 1, 2, 0, 4]
    assert layout.host_starts.tolist() == starts + [48, 48, 48]  # buffer order, padding at the end
    assert layout.q_off.tolist() == [starts[i] * 4 * 8 for i in kernel_order] + [48 * 32] * 3
    assert layout.kv_off.tolist() == [starts[i] * 2 * 8 for i in kernel_order] + [48 * 16] * 3


# ---------------------------------------------------------------------------------------- CUDA


def _skip_if_unavailable():
    reason = cudnn_backend.CudnnBackend().unavailable()
    if reason:
        pytest.skip(reason)


@pytest.mark.cuda
@pytest.mark.parametrize("n,kv,h,alibi,causal", [
    (8, 8, 64, False, True),  # MHA
    (8, 2, 64, False, True),  # GQA
    (8, 1, 128, False, True),  # MQA
    (8, 8, 128, True, True),  # ALiBi, power-of-two heads
    (12, 12, 64, True, True),  # ALiBi, interleaved slopes for 12 heads
    (12, 4, 64, True, True),  # ALiBi + GQA
    (8, 1, 64, True, True),  # ALiBi + MQA
    (8, 2, 64, False, False),  # non-causal packed
])
@pytest.mark.parametrize("backward", [True, False], ids=["fwdbwd", "fwd"])
def test_matches_eager(n, kv, h, alibi, causal, backward):
    _skip_if_unavailable()
    spec = AttentionSpec(n, kv, h, causal=causal, alibi=alibi)
    result = compare_to_reference("cudnn", spec, ROWS, len(ROWS), T, torch.bfloat16, "cuda", backward)
    print(f"cudnn vs eager N={n} K={kv} H={h} alibi={alibi} causal={causal}: {result}")
    assert result.ok, str(result)


@pytest.mark.cuda
def test_new_layout_in_same_bucket_reuses_graphs_without_host_sync():
    _skip_if_unavailable()
    spec = AttentionSpec(8, 2, 64)
    backend = cudnn_backend.CudnnBackend()
    first = ((100, 28, 128), (1, 255), (256,))  # 6 docs -> bucket 8
    second = ((3, 5, 120, 128), (200, 56), (10, 246))  # 8 docs -> bucket 8
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = [torch.randn(3, T, heads, 64, device="cuda", generator=g).to(torch.bfloat16) for heads in (8, 2, 2)]
    grad = torch.randn(3, T, 8, 64, device="cuda", generator=g).to(torch.bfloat16)
    run_attention("cudnn", spec, qkv, first, grad)
    torch.cuda.synchronize()
    builds = cudnn_graphs.graph_builds()
    layout = backend.prepare(spec, second, 3, T).to("cuda")
    leaves = [x.detach().requires_grad_() for x in qkv]
    torch.cuda.set_sync_debug_mode("error")
    try:
        o = backend.attend(*leaves, spec, layout)
        o2 = backend.attend(*leaves, spec, layout)  # a second layer: the same layout
        (o + o2).backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cudnn_graphs.graph_builds() == builds
    ref, (dq, _, _) = run_attention("eager", spec, qkv, second, grad)
    assert rel_err(o, ref) <= tolerance(torch.bfloat16, "cuda")
    assert rel_err(leaves[0].grad, 2 * dq) <= tolerance(torch.bfloat16, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("alibi", [False, True])
def test_reads_the_slices_of_a_fused_projection_in_place(alibi):
    """q, k and v as the model makes them, views of one (B, T, (N + 2K) * H) buffer: same results
    as contiguous inputs, forward and backward."""
    _skip_if_unavailable()
    N, K, H = 8, 2, 64
    spec = AttentionSpec(N, K, H, alibi=alibi)
    fused = torch.randn(3, T, (N + 2 * K) * H, device="cuda").to(torch.bfloat16).requires_grad_()
    q, k, v = fused.split([N * H, K * H, K * H], dim=-1)
    views = [q.view(3, T, N, H), k.view(3, T, K, H), v.view(3, T, K, H)]
    grad = torch.randn(3, T, N, H, device="cuda").to(torch.bfloat16)
    out = cudnn_backend.CudnnBackend()(*views, spec, ROWS)
    out.backward(grad)
    ref, ref_grads = run_attention("eager", spec, [t.detach() for t in views], ROWS, grad)
    tol = tolerance(torch.bfloat16, "cuda")
    assert rel_err(out, ref) <= tol
    for got, want in zip(fused.grad.split([N * H, K * H, K * H], dim=-1), ref_grads):
        assert rel_err(got.reshape(want.shape), want) <= tol
