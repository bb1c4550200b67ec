"""Attention backends against the eager reference, refusals, selection, layouts and compile.

Every (backend, problem, pass) that a backend claims in the capability table is compared with the
float32 eager backend on fresh random inputs: outputs and q/k/v gradients, within the tolerances of
`ablate.bench.toolkit.TOLERANCE` (max|a - b| / max|ref|).
"""
from __future__ import annotations

import itertools
import random
import subprocess
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ablate.bench.toolkit import compare_to_reference, rel_err
from ablate.kernels import (
    BACKENDS,
    AttentionSpec,
    Cell,
    KernelRefused,
    attended_pairs,
    capability_table,
    format_table,
    get_backend,
    preference,
    select_backend,
)
from ablate.kernels import xformers_backend
from ablate.kernels.flex import prepare_flex
from ablate.kernels.ragged import prepare_ragged, ragged_attention
from ablate.kernels.sdpa import fused_gqa, spec_additive_mask
from ablate.kernels.spec import allowed_mask, document_ids

N_HEADS = 4

# Problem name -> AttentionSpec keywords; "docs" asks for random document lengths.
PROBLEMS = {
    "dense_causal": {},
    "dense_full": {"causal": False},
    "packed": {"docs": True},
    "packed_full": {"docs": True, "causal": False},
    "alibi": {"alibi": True},
    "alibi_full": {"alibi": True, "causal": False},
    "alibi_packed": {"alibi": True, "docs": True},
    "gqa": {"n_kv_heads": 2},
    "mqa": {"n_kv_heads": 1},
    "gqa_packed": {"n_kv_heads": 2, "docs": True},
    "mqa_alibi": {"n_kv_heads": 1, "alibi": True},
    "window": {"window": 5},
    "window_full": {"window": 5, "causal": False},
    "window_packed": {"window": 3, "docs": True},
    "everything": {"n_kv_heads": 2, "alibi": True, "window": 4, "docs": True},
}


def random_doc_lens(rng: random.Random, n_rows: int, row_len: int) -> tuple[tuple[int, ...], ...]:
    """Row 0: 1-token documents at both ends and random cuts; row 1: one whole-row document."""
    rows = []
    for r in range(n_rows):
        if r == 1:
            rows.append((row_len,))
            continue
        inner = rng.sample(range(2, row_len - 1), rng.randint(0, row_len // 6))
        edges = [0, *sorted({1, row_len - 1, *inner}), row_len]
        rows.append(tuple(b - a for a, b in zip(edges, edges[1:])))
    return tuple(rows)


def make_problem(problem: str, rng: random.Random, n_rows: int, row_len: int, head_dim: int):
    kw = dict(PROBLEMS[problem])
    docs = random_doc_lens(rng, n_rows, row_len) if kw.pop("docs", False) else None
    kw.setdefault("n_kv_heads", N_HEADS)
    return AttentionSpec(n_heads=N_HEADS, head_dim=head_dim, **kw), docs


def claims(device: str, dtypes, head_dim: int = 16) -> list[tuple[str, str, bool, torch.dtype]]:
    """Every (backend, problem, backward, dtype) the backends claim (static table, no device)."""
    out = []
    for name, problem, backward, dtype in itertools.product(BACKENDS.names(), PROBLEMS, (False, True), dtypes):
        if name == "eager":  # the reference itself; checked against brute force below
            continue
        spec, docs = make_problem(problem, random.Random(0), 3, 24, head_dim)
        if get_backend(name).refuse(spec.cell(device, dtype, backward, packed=docs is not None)) is None:
            out.append((name, problem, backward, dtype))
    return out


def ids(params) -> list[str]:
    return [f"{n}-{p}-{'fwdbwd' if b else 'fwd'}-{str(d)[6:]}" for n, p, b, d in params]


def check_against_eager(name, problem, backward, dtype, device, n_rows, row_len, head_dim):
    rng = random.Random(f"{name}-{problem}-{backward}-{dtype}")
    spec, docs = make_problem(problem, rng, n_rows, row_len, head_dim)
    result = compare_to_reference(name, spec, docs, n_rows, row_len, dtype, device, backward, seed=rng.randrange(2**31))
    assert result.ok, str(result)


@pytest.mark.parametrize("name,problem,backward,dtype", claims("cpu", [torch.float32]),
                         ids=ids(claims("cpu", [torch.float32])))
def test_cpu_backend_matches_eager(name, problem, backward, dtype):
    check_against_eager(name, problem, backward, dtype, "cpu", 3, 24, 16)


# bfloat16 on every problem; float16 and float32 on a few (each flex variant is a compile).
CUDA_CLAIMS = claims("cuda", [torch.bfloat16], 64) + [
    c for c in claims("cuda", [torch.float16, torch.float32], 64) if c[1] in ("dense_causal", "packed", "gqa")
]


@pytest.mark.cuda
@pytest.mark.parametrize("name,problem,backward,dtype", CUDA_CLAIMS, ids=ids(CUDA_CLAIMS))
def test_cuda_backend_matches_eager(name, problem, backward, dtype):
    reason = get_backend(name).unavailable()
    if reason:
        pytest.skip(reason)
    # T=300 is not a multiple of 128, so partial blocks are exercised.
    check_against_eager(name, problem, backward, dtype, "cuda", 3, 300, 64)


def brute_force(q, k, v, spec: AttentionSpec, doc_lens) -> torch.Tensor:
    """The semantics, pair by pair, in float64."""
    B, T, N, H = q.shape
    docs = document_ids(doc_lens, B, T)
    slopes = spec.slopes()
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
            if spec.alibi:
                s = s - slopes[n].double() * abs(i - j)
            scores[j] = s
        p = torch.softmax(torch.stack(list(scores.values())), 0)
        out[b, i, n] = sum(pj * v[b, j, n // spec.groups].double() for pj, j in zip(p, scores))
    return out


@pytest.mark.parametrize("problem", ["packed", "alibi_full", "everything", "window_full"])
def test_eager_matches_brute_force(problem):
    spec, docs = make_problem(problem, random.Random(problem), 3, 12, 8)
    q = torch.randn(3, 12, N_HEADS, 8)
    k, v = torch.randn(2, 3, 12, spec.n_kv_heads, 8)
    out = get_backend("eager")(q, k, v, spec, docs)
    assert rel_err(out, brute_force(q, k, v, spec, docs)) < 1e-5


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
    check_against_eager(name, problem, backward, dtype, "cpu", 3, 24, 16)


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
    assert "torch.compile" in xf.refuse(Cell(**bf16, packed=True, compiled=True))
    with pytest.raises(ValueError, match="choose one of: auto, " + ", ".join(BACKENDS.names())):
        select_backend(Cell("cpu"), "nope")


ALL_CELLS = [
    Cell(device, causal=c, packed=p, alibi=a, gqa=g, window=w, backward=b, dtype=dt, compiled=k)
    for device, dt in (("cpu", torch.float32), ("cuda", torch.bfloat16))
    for c, p, a, g, w, b, k in itertools.product((True, False), repeat=7)
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
    assert {(r["backend"], r["device"]) for r in rows} == set(itertools.product(BACKENDS.names(), ("cpu", "cuda")))
    by = {(r["backend"], r["device"]): r for r in rows}
    assert by[("xformers", "cpu")]["causal"].status == "no"
    assert by[("flex", "cpu")]["packed"].status == "fwd"
    assert by[("xformers", "cuda")]["alibi"].status == "fwd"
    assert by[("xformers", "cuda")]["packed+alibi"].status == "no"
    assert by[("cudnn", "cuda")]["compiled"].status == "yes" and by[("xformers", "cuda")]["compiled"].status == "no"
    assert all(by[("sdpa", d)][f].status == "yes" for d in ("cpu", "cuda") for f in
               ("causal", "packed", "alibi", "packed+alibi", "gqa", "window", "compiled"))
    text = format_table(rows)
    assert all(name in text for name in BACKENDS.names()) and "xformers kernels need CUDA" in text


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), args))
        return func(*args, **(kwargs or {}))


def test_sdpa_makes_the_mask_of_unpacked_rows_once():
    """Rows of one document with a window or ALiBi: every layer and batch shares one additive
    mask (made on the first call), equal to the mask made from the dense boolean mask."""
    spec = AttentionSpec(N_HEADS, N_HEADS, 16, window=5, alibi=True)
    q, k, v = (torch.randn(2, 24, N_HEADS, 16) for _ in range(3))
    spec_additive_mask.cache_clear()
    backend = get_backend("sdpa")
    outs = [backend.attend(q, k, v, spec, None) for _ in range(3)]
    assert spec_additive_mask.cache_info().misses == 1 and spec_additive_mask.cache_info().hits == 2
    assert torch.equal(outs[0], outs[2])
    ref = get_backend("eager")(q, k, v, spec, None)
    assert rel_err(outs[0], ref) < 1e-5


@pytest.mark.parametrize("problem", ["gqa", "gqa_packed", "mqa_alibi"])
def test_sdpa_gqa_keeps_kv_heads_on_cpu(problem):
    """The fused SDPA op receives K/V with their K heads, and nothing repeats them."""
    spec, docs = make_problem(problem, random.Random(0), 3, 24, 16)
    q = torch.randn(3, 24, N_HEADS, 16, requires_grad=True)
    k, v = (torch.randn(3, 24, spec.n_kv_heads, 16, requires_grad=True) for _ in range(2))
    backend = get_backend("sdpa")
    layout = backend.prepare(spec, docs, 3, 24)
    layout = layout if layout is None else layout.to("cpu")
    with RecordOps() as rec:
        backend.attend(q, k, v, spec, layout).sum().backward()
    attn = [args for op, args in rec.calls if "scaled_dot_product" in op and "backward" not in op]
    assert attn and attn[0][1].shape[1] == spec.n_kv_heads
    assert not [op for op, _ in rec.calls if "repeat" in op or "index_select" in op]


@pytest.mark.cuda
@pytest.mark.parametrize("name,masked", itertools.product(["sdpa", "flex"], [False, True]))
def test_cuda_gqa_does_not_materialize_kv(name, masked):
    """A GQA forward allocates its output (and at most a copy of q for a layout change) beyond its
    inputs; K/V repeated to every query head would add twice q's size on top."""
    B, T, N, K, H = 1, 8192, 32, 1, 128
    spec = AttentionSpec(N, K, H, window=1024 if masked else None)
    if name == "sdpa" and not fused_gqa("cuda:0", torch.bfloat16, H, masked, True):
        pytest.skip("this torch's fused SDPA kernels refuse this GQA call: K/V repeat by design")
    q = torch.randn(B, T, N, H, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, T, K, H, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    backend = get_backend(name)
    layout = backend.prepare(spec, None, B, T)
    layout = layout if layout is None else layout.to("cuda")
    backend.attend(q, k, v, spec, layout)  # compiles, builds masks
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    backend.attend(q, k, v, spec, layout)
    extra = torch.cuda.max_memory_allocated() - base
    q_bytes = q.numel() * q.element_size()
    assert extra < 2.5 * q_bytes, f"{extra / q_bytes:.2f} x q's size"


@pytest.mark.cuda
def test_cuda_refusals_and_auto():
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    with pytest.raises(KernelRefused, match="block-diagonal"):
        select_backend(Cell(**bf16, packed=True, alibi=True), "xformers")
    cudnn_ok = get_backend("cudnn").unavailable() is None
    assert select_backend(Cell(**bf16, alibi=True)).name == ("cudnn" if cudnn_ok else "flex")
    assert select_backend(Cell(**bf16, packed=True, compiled=True)).name == ("cudnn" if cudnn_ok else "flex")


@pytest.mark.parametrize("causal,window", itertools.product([True, False], [None, 5, 130]))
def test_flex_block_mask_touches_exactly_the_tiles_of_the_dense_mask(causal, window):
    """The batch's block mask, made from the shared document buffer, marks exactly the (128 x 128)
    tiles the dense mask touches (T=300: a short last tile), for two batches in a row."""
    rng = random.Random(f"{causal}{window}")
    spec = AttentionSpec(N_HEADS, N_HEADS, 16, causal=causal, window=window)
    for _ in range(2):
        docs = random_doc_lens(rng, 3, 300)
        layout = prepare_flex(spec, docs, 3, 300).to("cpu")
        ok = allowed_mask(spec, torch.from_numpy(document_ids(docs, 3, 300)), 300, "cpu")[:, 0]
        pad = torch.zeros(3, 384, 384, dtype=torch.bool)
        pad[:, :300, :300] = ok
        touched = pad.view(3, 3, 128, 3, 128).any(-1).any(-2)
        assert torch.equal(layout.block_mask.to_dense()[:, 0].bool(), touched)


def test_ragged_op_matches_eager_and_compiles_once_for_any_layout():
    """The opaque packed-attention op (cuDNN on CUDA, its float32 reference here): forward and
    backward against eager, and one compiled graph for batches whose document counts differ."""
    from torch._dynamo.utils import counters

    B, T, N, K, H = 2, 96, 4, 2, 8
    spec = AttentionSpec(N, K, H, alibi=True)
    rng = random.Random(0)

    def attend(q, k, v, layout):
        o, _ = ragged_attention(q, k, v, *layout.op_args(), True, True)
        return o

    compiled = torch.compile(attend)
    torch._dynamo.reset()
    counters.clear()
    counts = set()
    for i in range(5):
        docs = random_doc_lens(rng, B, T)
        layout = prepare_ragged(spec, docs, B, T).to("cpu")
        counts.add(layout.seq_len.shape[0])
        qkv = [torch.randn(B, T, n, H, requires_grad=True) for n in (N, K, K)]
        out = (compiled if i else attend)(*qkv, layout)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref_in = [t.detach().clone().requires_grad_() for t in qkv]
        ref = get_backend("eager")(*ref_in, spec, docs)
        ref.backward(grad)
        assert rel_err(out, ref) < 1e-4
        for a, b in zip(qkv, ref_in):
            assert rel_err(a.grad, b.grad) < 1e-4
    assert len(counts) > 1, "the layouts should have had different document buckets"
    assert counters["stats"]["unique_graphs"] == 1


def test_importing_kernels_is_quiet_and_lazy():
    code = ("import sys, ablate.kernels as k; assert 'xformers' not in sys.modules; "
            "from ablate.kernels.xformers_backend import import_xformers; import_xformers()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "C++/CUDA extensions" not in done.stderr + done.stdout


@pytest.mark.parametrize("problem", ["packed", "window_packed", "window_full", "dense_full"])
def test_attended_pairs_count_the_unmasked_pairs(problem):
    spec, docs = make_problem(problem, random.Random(problem), 3, 24, 16)
    mask = allowed_mask(spec, torch.from_numpy(document_ids(docs, 3, 24)), 24, "cpu")
    assert attended_pairs(spec, docs, 3, 24) == mask.expand(3, 1, 24, 24).sum().item()
