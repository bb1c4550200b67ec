"""Attention backends against the eager reference, refusals, selection and the kernel benchmark.

Every (backend, problem, pass) that a backend claims in the capability table is compared with the
float32 eager backend on fresh random inputs: outputs and q/k/v gradients. Tolerances are on
max|a - b| / max|ref|: float32 1e-4 on CPU (2e-3 on CUDA), float16 5e-3, bfloat16 3e-2.
"""
from __future__ import annotations

import itertools
import random
import subprocess
import sys
import types
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ablate.bench import kernels as bench
from ablate.kernels import (
    BACKENDS,
    AttentionSpec,
    Cell,
    KernelRefused,
    alibi_slopes,
    capability_table,
    format_table,
    get_backend,
    preference,
    select_backend,
)
from ablate.kernels import flex as flex_module
from ablate.kernels import xformers_backend
from ablate.kernels.sdpa import fused_gqa
from ablate.kernels.spec import allowed_mask

N_HEADS = 4
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
CUDA_FP32_TOL = 2e-3

# Problem name -> AttentionSpec keywords; "docs" is replaced by random document lengths.
PROBLEMS = {
    "dense_causal": {},
    "dense_full": {"causal": False},
    "packed": {"doc_lens": "docs"},
    "packed_full": {"doc_lens": "docs", "causal": False},
    "alibi": {"alibi": True},
    "alibi_full": {"alibi": True, "causal": False},
    "alibi_packed": {"alibi": True, "doc_lens": "docs"},
    "gqa": {"n_kv_heads": 2},
    "mqa": {"n_kv_heads": 1},
    "gqa_packed": {"n_kv_heads": 2, "doc_lens": "docs"},
    "mqa_alibi": {"n_kv_heads": 1, "alibi": True},
    "window": {"window": 5},
    "window_full": {"window": 5, "causal": False},
    "window_packed": {"window": 3, "doc_lens": "docs"},
    "everything": {"n_kv_heads": 2, "alibi": True, "window": 4, "doc_lens": "docs"},
}


def random_doc_lens(rng: random.Random, n_rows: int, row_len: int) -> tuple[tuple[int, ...], ...]:
    """Row 0: 1-token documents at both ends and random cuts; row 1: one whole-row document."""
    rows = []
    for r in range(n_rows):
        if r == 1:
            rows.append((row_len,))
            continue
        inner = rng.sample(range(2, row_len - 1), rng.randint(0, row_len // 6))
        cuts = {1, row_len - 1, *inner}
        edges = [0, *sorted(cuts), row_len]
        rows.append(tuple(b - a for a, b in zip(edges, edges[1:])))
    return tuple(rows)


def make_spec(problem: str, rng: random.Random, n_rows: int, row_len: int, head_dim: int):
    kw = dict(PROBLEMS[problem])
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = alibi_slopes(N_HEADS)
    if kw.get("doc_lens") == "docs":
        kw["doc_lens"] = random_doc_lens(rng, n_rows, row_len)
    kw.setdefault("n_kv_heads", N_HEADS)
    return AttentionSpec(n_heads=N_HEADS, head_dim=head_dim, **kw)


def claims(device: str, dtypes, head_dim: int = 16) -> list[tuple[str, str, bool, torch.dtype]]:
    """Every (backend, problem, backward, dtype) the backends claim (static table, no device)."""
    out = []
    for name, problem, backward, dtype in itertools.product(
        BACKENDS.names(), PROBLEMS, (False, True), dtypes
    ):
        if name == "eager":  # the reference itself; checked against brute force below
            continue
        spec = make_spec(problem, random.Random(0), 3, 24, head_dim)
        if get_backend(name).refuse(spec.cell(device, dtype, backward)) is None:
            out.append((name, problem, backward, dtype))
    return out


def ids(params) -> list[str]:
    return [f"{n}-{p}-{'fwdbwd' if b else 'fwd'}-{str(d)[6:]}" for n, p, b, d in params]


def run(backend, spec, qkv, grad_out):
    """Output and q/k/v gradients (None for a forward-only run)."""
    q, k, v = (t.detach().clone().requires_grad_(grad_out is not None) for t in qkv)
    if grad_out is None:
        return backend.attend(q, k, v, spec), None
    out = backend.attend(q, k, v, spec)
    out.backward(grad_out)
    return out, (q.grad, k.grad, v.grad)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def check_against_eager(name, problem, backward, dtype, device, n_rows, row_len, head_dim, tol):
    rng = random.Random(f"{name}-{problem}-{backward}-{dtype}")
    torch.manual_seed(rng.randrange(2**31))
    spec = make_spec(problem, rng, n_rows, row_len, head_dim)
    shapes = [(n_rows, row_len, n, head_dim) for n in (N_HEADS, spec.n_kv_heads, spec.n_kv_heads)]
    qkv = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
    grad_out = torch.randn(shapes[0], device=device, dtype=dtype) if backward else None
    out, grads = run(get_backend(name), spec, qkv, grad_out)
    ref, ref_grads = run(get_backend("eager"), replace(spec, cache={}), qkv, grad_out)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < tol, f"output error {rel_err(out, ref):.2e}"
    for label, g, g_ref in zip("qkv", grads or (), ref_grads or ()):
        assert rel_err(g, g_ref) < tol, f"d{label} error {rel_err(g, g_ref):.2e}"


@pytest.mark.parametrize("name,problem,backward,dtype", claims("cpu", [torch.float32]),
                         ids=ids(claims("cpu", [torch.float32])))
def test_cpu_backend_matches_eager(name, problem, backward, dtype):
    check_against_eager(name, problem, backward, dtype, "cpu", 3, 24, 16, TOL[dtype])


# bfloat16 on every problem; float16 and float32 on a few (each flex variant is a compile).
CUDA_CLAIMS = claims("cuda", [torch.bfloat16], 64) + [
    c for c in claims("cuda", [torch.float16, torch.float32], 64)
    if c[1] in ("dense_causal", "packed", "gqa")
]


@pytest.mark.cuda
@pytest.mark.parametrize("name,problem,backward,dtype", CUDA_CLAIMS, ids=ids(CUDA_CLAIMS))
def test_cuda_backend_matches_eager(name, problem, backward, dtype):
    reason = get_backend(name).unavailable()
    if reason:
        pytest.skip(reason)
    tol = CUDA_FP32_TOL if dtype == torch.float32 else TOL[dtype]
    # Every variant here is a new compile of flex_attention; keep them compiled (the default limit
    # of 8 would silently fall back to the unfused path) so the fused kernel is what is tested.
    with torch._dynamo.config.patch(recompile_limit=256):
        # T=300 is not a multiple of 128, so partial blocks are exercised.
        check_against_eager(name, problem, backward, dtype, "cuda", 3, 300, 64, tol)


def brute_force(q, k, v, spec: AttentionSpec) -> torch.Tensor:
    """The semantics, pair by pair, in float64."""
    B, T, N, H = q.shape
    docs = [[d for d, n in enumerate(row) for _ in range(n)] for row in spec.doc_lens] \
        if spec.doc_lens else [[0] * T] * B
    out = torch.zeros(B, T, N, H, dtype=torch.float64)
    for b, n, i in itertools.product(range(B), range(N), range(T)):
        scores = {}
        for j in range(T):
            if (spec.causal and j > i) or docs[b][i] != docs[b][j]:
                continue
            if spec.window is not None and abs(i - j) >= spec.window:
                continue
            kv = n // spec.groups
            s = (q[b, i, n].double() @ k[b, j, kv].double()) / H**0.5
            if spec.alibi_slopes is not None:
                s = s - spec.alibi_slopes[n].double() * abs(i - j)
            scores[j] = s
        p = torch.softmax(torch.stack(list(scores.values())), 0)
        out[b, i, n] = sum(pj * v[b, j, n // spec.groups].double() for pj, j in zip(p, scores))
    return out


@pytest.mark.parametrize("problem", ["packed", "alibi_full", "everything", "window_full"])
def test_eager_matches_brute_force(problem):
    rng = random.Random(problem)
    spec = make_spec(problem, rng, 3, 12, 8)
    q = torch.randn(3, 12, N_HEADS, 8)
    k, v = torch.randn(2, 3, 12, spec.n_kv_heads, 8)
    out = get_backend("eager").attend(q, k, v, spec)
    assert rel_err(out, brute_force(q, k, v, spec)) < 1e-5


def emulated_memory_efficient_attention(q, k, v, attn_bias=None):
    """xformers' op on CPU: its own input validation, then attention with the bias materialized."""
    from xformers.ops.fmha.common import Inputs

    Inputs(query=q, key=k, value=v, attn_bias=attn_bias).validate_inputs()
    if q.ndim == 5:
        assert not any(t.requires_grad for t in (q, k, v)), "BMGHK has no backward op"
        q, k, v = (t.reshape(*t.shape[:2], -1, t.shape[-1]) for t in (q, k, v))
    B, M, N, H = q.shape
    scores = torch.einsum("bmnh,bknh->bnmk", q.float(), k.float()) * H**-0.5
    if attn_bias is not None:
        tensor = getattr(attn_bias, "_bias", None)
        assert tensor is None or tensor.stride(-2) % 8 == 0, "tensor bias rows must align to 8"
        scores = scores + attn_bias.materialize((B, N, M, M), dtype=torch.float32)
    return torch.einsum("bnmk,bknh->bmnh", scores.softmax(-1), v.float()).to(q.dtype)


XFORMERS_CLAIMS = [c for c in claims("cuda", [torch.float32]) if c[0] == "xformers"]


@pytest.mark.parametrize("name,problem,backward,dtype", XFORMERS_CLAIMS, ids=ids(XFORMERS_CLAIMS))
def test_xformers_layouts_on_cpu(monkeypatch, name, problem, backward, dtype):
    """The xformers backend's bias classes, flattening and GQA layouts, with the kernel emulated."""
    real = xformers_backend.import_xformers()
    fake = types.SimpleNamespace(attention=emulated_memory_efficient_attention, bias=real.bias)
    monkeypatch.setattr(xformers_backend, "import_xformers", lambda: fake)
    check_against_eager(name, problem, backward, dtype, "cpu", 3, 24, 16, TOL[dtype])


def test_refusals_name_cell_reason_and_alternatives():
    with pytest.raises(KernelRefused) as err:
        select_backend(Cell("cpu", packed=True, head_dim=64), "xformers")
    assert str(err.value) == (
        "backend=xformers cannot serve cpu causal packed fwd+bwd head_dim=64 float32: "
        "xformers kernels need CUDA. Backends that can: eager, sdpa (or backend=auto)."
    )  # (every other backend refuses CPU training, or this line must list it)
    with pytest.raises(KernelRefused, match="FlexAttention does not support backward on CPU"):
        select_backend(Cell("cpu"), "flex")
    assert select_backend(Cell("cpu", backward=False), "flex").name == "flex"
    xf = get_backend("xformers")
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    assert "block-diagonal" in xf.refuse(Cell(**bf16, packed=True, alibi=True))
    assert "no backward op" in xf.refuse(Cell(**bf16, alibi=True))
    assert xf.refuse(Cell(**bf16, alibi=True, backward=False)) is None
    with pytest.raises(ValueError, match="choose one of: auto, " + ", ".join(BACKENDS.names())):
        select_backend(Cell("cpu"), "nope")


ALL_CELLS = [
    Cell(device, causal=c, packed=p, alibi=a, gqa=g, window=w, backward=b, dtype=dt)
    for device, dt in (("cpu", torch.float32), ("cuda", torch.bfloat16))
    for c, p, a, g, w, b in itertools.product((True, False), repeat=6)
]


def test_auto_never_picks_a_refusing_backend():
    for cell in ALL_CELLS:
        order = preference(cell)
        assert sorted(order) == BACKENDS.names() and order[-1] in ("eager", "flex")
        if cell.device == "cpu" or torch.cuda.is_available():
            assert select_backend(cell, "auto").why_not(cell) is None
        else:  # no GPU here: the static part of the choice
            assert any(get_backend(n).refuse(cell) is None for n in order)


def test_preference_follows_measurements():
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    assert preference(Cell(**bf16))[0] == "sdpa"
    assert preference(Cell(**bf16, gqa=True))[0] == "sdpa"
    assert preference(Cell(**bf16, alibi=True))[:2] == ["cudnn", "flex"]
    assert preference(Cell(**bf16, packed=True))[:3] == ["cudnn", "flex", "xformers"]
    assert preference(Cell(**bf16, window=True))[:3] == ["cudnn", "flex", "xformers"]
    assert preference(Cell("cpu"))[0] == "sdpa"


def test_capability_table_covers_every_backend_and_device():
    rows = capability_table()
    assert {(r["backend"], r["device"]) for r in rows} == set(
        itertools.product(BACKENDS.names(), ("cpu", "cuda"))
    )
    by = {(r["backend"], r["device"]): r for r in rows}
    assert by[("xformers", "cpu")]["causal"].status == "no"
    assert by[("flex", "cpu")]["packed"].status == "fwd"
    assert by[("xformers", "cuda")]["alibi"].status == "fwd"
    assert by[("xformers", "cuda")]["packed+alibi"].status == "no"
    assert all(by[("sdpa", d)][f].status == "yes" for d in ("cpu", "cuda") for f in
               ("causal", "packed", "alibi", "packed+alibi", "gqa", "window"))
    text = format_table(rows)
    assert all(name in text for name in BACKENDS.names()) and "xformers kernels need CUDA" in text


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("problem", ["gqa", "gqa_packed", "mqa_alibi"])
def test_sdpa_gqa_keeps_kv_heads_on_cpu(problem):
    """The fused SDPA op receives K/V with their K heads, and nothing repeats them."""
    spec = make_spec(problem, random.Random(0), 3, 24, 16)
    q = torch.randn(3, 24, N_HEADS, 16, requires_grad=True)
    k, v = (torch.randn(3, 24, spec.n_kv_heads, 16, requires_grad=True) for _ in range(2))
    get_backend("sdpa").attend(q, k, v, spec)  # builds the batch's mask (document ids repeat)
    with RecordOps() as rec:
        get_backend("sdpa").attend(q, k, v, spec).sum().backward()
    attn = [args for op, args in rec.calls if "scaled_dot_product" in op and "backward" not in op]
    assert attn and attn[0][1].shape[1] == spec.n_kv_heads
    assert not [op for op, _ in rec.calls if "repeat" in op or "index_select" in op]


@pytest.mark.cuda
@pytest.mark.parametrize("name,masked", itertools.product(["sdpa", "flex"], [False, True]))
def test_cuda_gqa_does_not_materialize_kv(name, masked):
    """Peak memory of a GQA forward stays below what a repeated K/V would need on top."""
    B, T, N, K, H = 1, 8192, 32, 1, 128
    spec = AttentionSpec(N, K, H, window=1024 if masked else None)
    if name == "sdpa" and not fused_gqa("cuda:0", torch.bfloat16, H, masked, True):
        pytest.skip("this torch's fused SDPA kernels refuse this GQA call: K/V repeat by design")
    q = torch.randn(B, T, N, H, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, T, K, H, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    backend = get_backend(name)
    backend.attend(q, k, v, spec)  # builds and caches the mask, compiles
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    backend.attend(q, k, v, spec)
    extra = torch.cuda.max_memory_allocated() - base
    repeated_kv = 2 * q.numel() * q.element_size()
    assert extra < q.numel() * q.element_size() + repeated_kv // 2


@pytest.mark.cuda
def test_cuda_refusals_and_auto():
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    with pytest.raises(KernelRefused, match="block-diagonal"):
        select_backend(Cell(**bf16, packed=True, alibi=True), "xformers")
    cudnn_ok = get_backend("cudnn").unavailable() is None
    assert select_backend(Cell(**bf16, alibi=True)).name == ("cudnn" if cudnn_ok else "flex")
    assert select_backend(Cell(**bf16, packed=True)).name == ("cudnn" if cudnn_ok else "flex")


def test_flex_block_mask_cached_per_layout():
    lens = ((5, 19), (24,), (1, 23))
    make = lambda docs: AttentionSpec(N_HEADS, N_HEADS, 16, doc_lens=docs)  # noqa: E731
    first = flex_module.block_mask_for(make(lens), 3, 24, torch.device("cpu"))
    assert flex_module.block_mask_for(make(lens), 3, 24, torch.device("cpu")) is first
    other = flex_module.block_mask_for(make(((6, 18), (24,), (1, 23))), 3, 24, torch.device("cpu"))
    assert other is not first


def test_importing_kernels_is_quiet_and_lazy():
    code = ("import sys, ablate.kernels as k; assert 'xformers' not in sys.modules; "
            "from ablate.kernels.xformers_backend import import_xformers; import_xformers()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "C++/CUDA extensions" not in done.stderr + done.stdout


@pytest.mark.parametrize("problem", ["packed", "window_packed", "window_full", "dense_full"])
def test_bench_counts_only_attended_pairs(problem):
    spec = make_spec(problem, random.Random(problem), 3, 24, 16)
    assert bench.attended_pairs(spec, 3, 24) == allowed_mask(spec, 3, 24, "cpu").sum().item()


def test_bench_quick_cpu_runs_and_reports_refusals():
    sizes = replace(bench.SIZES[("cpu", True)], warmup=0, reps=1)
    bench.SIZES[("cpu", "test")] = sizes
    try:
        results, picks, _ = bench.bench("cpu", torch.float32, "test", ["sdpa", "xformers"])
    finally:
        del bench.SIZES[("cpu", "test")]
    text = bench.format_results(results, picks, "test")
    assert "refused: xformers kernels need CUDA" in text and "<- auto" in text
    assert all(r.tflops for r in results if r.backend == "sdpa")
