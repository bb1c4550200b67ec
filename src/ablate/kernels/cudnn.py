"""cuDNN fused attention over packed documents (ragged / THD layout), via nvidia-cudnn-frontend.

The model's rows are flattened into one packed buffer of B*T tokens; rows end on document ends,
so the documents of all rows, read in order, tile that buffer. cuDNN sees them as a batch of
documents (B=documents, H, S=max document length, D) with BSHD strides and per-document ragged
offsets into the packed buffer, plus per-document sequence lengths. Causality is the top-left diagonal
band with right bound 0, inside each document.

Static shape and data are kept apart: a graph is built once per (document-count bucket, max
length bucket S, heads, kv heads, head dim, dtype, causal, ALiBi, stats; the backward also the
packed token count) and cached for the process; the document lengths and offsets of a batch are
device tensors, built on the host from the host-int `doc_lens`, copied with non_blocking from
pinned memory and cached in `spec.cache`, so every layer of a step reuses them and a new batch
in the same buckets never rebuilds a graph nor synchronizes the host. The document count is
rounded up to a power of two up to 16, then a multiple of 16, and padded with zero-length
documents. S is the longest document rounded up to a power of two (>= 64, <= T): declaring
S = T instead costs the backward about 1.6x on a 32k-token row of 64..2048-token documents
(H200, benchmarks/cudnn_packed.py --sweep), as its grid spans S; the forward does not care.

ALiBi uses cuDNN's built-in causal ALiBi mask, whose slopes are the standard geometric ones of
`ablate.kernels.spec.alibi_slopes(n_heads)` (including the interleaved slopes for head counts
that are not powers of two); `attend` checks that the spec's slopes are those.

Optional dependency: `pip install 'ablate[cudnn]'` (nvidia-cudnn-frontend), imported lazily.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import weakref
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch

from ablate.kernels.base import BACKENDS, Backend
from ablate.kernels.spec import AttentionSpec, Cell, alibi_slopes

INSTALL_HINT = "pip install 'ablate[cudnn]'"
MIN_CAPABILITY = (9, 0)  # ragged (THD) SDPA in cuDNN: Hopper and newer
MAX_HEAD_DIM_FWD = 256
MAX_HEAD_DIM_BWD = 128
_IO_DTYPES = (torch.bfloat16, torch.float16)

_GRAPHS: dict[tuple, "_Plan"] = {}
_HANDLES: dict[int, Any] = {}
_SLOPES_OK: dict[tuple, tuple] = {}  # (id, version, heads) -> (weakref, ok)
BUILDS = {"fwd": 0, "bwd": 0}  # graphs built in this process (tests count rebuilds)


@lru_cache(maxsize=None)
def _why_unavailable() -> str | None:
    if importlib.util.find_spec("cudnn") is None:
        return f"nvidia-cudnn-frontend is not installed ({INSTALL_HINT})"
    if not torch.cuda.is_available():
        return "cuDNN attention needs a CUDA GPU; none is available"
    try:
        cudnn = importlib.import_module("cudnn")
        version = int(cudnn.backend_version())
    except Exception as err:  # noqa: BLE001 - a broken install is a reason, not a crash
        return f"nvidia-cudnn-frontend failed to load ({type(err).__name__}: {err}); {INSTALL_HINT}"
    if version < 90100:
        return f"cuDNN backend {version} is too old for ragged SDPA (need >= 9.1)"
    cap = torch.cuda.get_device_capability()
    if cap < MIN_CAPABILITY:
        return (
            f"GPU compute capability {cap[0]}.{cap[1]} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: "
            "cuDNN's ragged (packed-document) SDPA needs Hopper or newer"
        )
    return None


def _cudnn():
    return importlib.import_module("cudnn")


def doc_bucket(n_docs: int) -> int:
    """The static document count a batch of `n_docs` documents runs under."""
    if n_docs <= 16:
        return 1 << max(0, math.ceil(math.log2(max(n_docs, 1))))
    return -(-n_docs // 16) * 16


SEQ_BUCKETS = True  # graphs declare S = the longest document rounded up to a power of two (<= T)


def seq_bucket(longest: int, row_len: int) -> int:
    """The static max document length S a batch runs under: few distinct values, never > T."""
    if not SEQ_BUCKETS:
        return row_len
    return min(row_len, 1 << max(6, math.ceil(math.log2(max(longest, 1)))))


def graph_builds() -> int:
    return BUILDS["fwd"] + BUILDS["bwd"]


def _handle(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _HANDLES:
        with torch.cuda.device(index):
            _HANDLES[index] = _cudnn().create_handle()
    handle = _HANDLES[index]
    _cudnn().set_stream(handle, torch.cuda.current_stream(index).cuda_stream)
    return handle


# ---------------------------------------------------------------------------------------------
# Per-batch layout (data) and per-shape graphs (static)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """Everything a graph is specialized on."""

    device: int
    docs: int  # bucketed document count
    seq: int  # max document length S (seq_bucket)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    alibi: bool
    total: int  # packed tokens B*T (only the backward graph depends on it)


@dataclass
class _Layout:
    """One batch's document geometry, on the device. Shared by every layer of the step."""

    seq_len: torch.Tensor  # (docs, 1, 1, 1) int32
    q_off: torch.Tensor  # (docs+1, 1, 1, 1) element offsets into q / o / dO / dq
    kv_off: torch.Tensor  # (docs+1, 1, 1, 1) element offsets into k / v / dk / dv
    docs: int
    seq: int


def _to_device(values: list[int], dtype: torch.dtype, shape: tuple, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype).view(shape)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _make_layout(spec: AttentionSpec, rows: int, row_len: int, device: torch.device) -> _Layout:
    if spec.doc_lens is not None:
        if len(spec.doc_lens) != rows:
            raise ValueError(f"doc_lens has {len(spec.doc_lens)} rows, the batch has {rows}")
        for lens in spec.doc_lens:
            if sum(lens) != row_len or min(lens) < 1:
                raise ValueError(f"document lengths {lens} must be >= 1 and sum to the row length {row_len}")
    lens = spec.flat_doc_lens(rows, row_len)
    docs, seq = doc_bucket(len(lens)), seq_bucket(max(lens), row_len)
    lens = list(lens) + [0] * (docs - len(lens))
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    off_dtype = torch.int64 if _cudnn().backend_version() >= 90600 else torch.int32
    q_unit = spec.n_heads * spec.head_dim
    kv_unit = spec.n_kv_heads * spec.head_dim
    return _Layout(
        seq_len=_to_device(lens, torch.int32, (docs, 1, 1, 1), device),
        q_off=_to_device([s * q_unit for s in starts], off_dtype, (docs + 1, 1, 1, 1), device),
        kv_off=_to_device([s * kv_unit for s in starts], off_dtype, (docs + 1, 1, 1, 1), device),
        docs=docs,
        seq=seq,
    )


@dataclass
class _Plan:
    graph: Any
    t: dict[str, Any]  # graph tensors by role
    workspace: int


def _cudnn_dtype(dtype: torch.dtype):
    dt = _cudnn().data_type
    return dt.BFLOAT16 if dtype == torch.bfloat16 else dt.HALF


def _declare_common(g, s: _Shape, roles: tuple[str, ...]) -> dict[str, Any]:
    """Graph inputs: BSHD-strided (docs, heads, S, D) views over packed buffers, ragged offsets."""
    cudnn = _cudnn()
    dt = cudnn.data_type
    io = _cudnn_dtype(s.dtype)
    off_dt = dt.INT64 if cudnn.backend_version() >= 90600 else dt.INT32
    B, S, D = s.docs, s.seq, s.head_dim
    t: dict[str, Any] = {}
    for name in ("seq_q", "seq_kv"):
        t[name] = g.tensor(name=name, dim=[B, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.INT32)
    for name in ("q_off", "k_off", "v_off", "o_off"):
        t[name] = g.tensor(name=name, dim=[B + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=off_dt)
    for role in roles:
        heads = s.n_kv_heads if role in ("k", "v") else s.n_heads
        t[role] = g.tensor(name=role, dim=[B, heads, S, D], stride=[S * heads * D, D, heads * D, 1], data_type=io)
        t[role].set_ragged_offset(t[{"k": "k_off", "v": "v_off", "q": "q_off"}.get(role, "o_off")])
    return t


def _finish(g, t: dict[str, Any]) -> _Plan:
    cudnn = _cudnn()
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return _Plan(graph=g, t=t, workspace=int(g.get_workspace_size()))


def _mask_kwargs(s: _Shape) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        attn_scale=1.0 / math.sqrt(s.head_dim),
        use_alibi_mask=s.alibi,
        use_padding_mask=True,
        diagonal_alignment=_cudnn().diagonal_alignment.TOP_LEFT,
    )
    if s.causal:
        kw["diagonal_band_right_bound"] = 0
    return kw


def _graph(s: _Shape, handle):  # noqa: ANN001, ANN202
    """An empty graph: inputs in the run's dtype, softmax and accumulation in float32."""
    cudnn = _cudnn()
    return cudnn.pygraph(io_data_type=_cudnn_dtype(s.dtype), intermediate_data_type=cudnn.data_type.FLOAT,
                         compute_data_type=cudnn.data_type.FLOAT, handle=handle)


def _build_fwd(s: _Shape, stats: bool, handle) -> _Plan:
    cudnn = _cudnn()
    g = _graph(s, handle)
    t = _declare_common(g, s, ("q", "k", "v"))
    o, lse = g.sdpa(
        name="sdpa", q=t["q"], k=t["k"], v=t["v"], generate_stats=stats,
        seq_len_q=t["seq_q"], seq_len_kv=t["seq_kv"], **_mask_kwargs(s),
    )
    B, N, S, D = s.docs, s.n_heads, s.seq, s.head_dim
    o.set_output(True).set_dim([B, N, S, D]).set_stride([S * N * D, D, N * D, 1])
    o.set_ragged_offset(t["o_off"])
    t["o"] = o
    if stats:
        lse.set_output(True).set_data_type(cudnn.data_type.FLOAT)
        lse.set_dim([B, N, S, 1]).set_stride([N * S, S, 1, 1])
        t["stats"] = lse
    BUILDS["fwd"] += 1
    return _finish(g, t)


def _build_bwd(s: _Shape, handle) -> _Plan:
    cudnn = _cudnn()
    g = _graph(s, handle)
    t = _declare_common(g, s, ("q", "k", "v", "o", "dO"))
    B, N, S, D = s.docs, s.n_heads, s.seq, s.head_dim
    t["stats"] = g.tensor(name="stats", dim=[B, N, S, 1], stride=[N * S, S, 1, 1], data_type=cudnn.data_type.FLOAT)
    total = -(-s.total // 64) * 64
    dq, dk, dv = g.sdpa_backward(
        name="sdpa_backward", q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["dO"], stats=t["stats"],
        seq_len_q=t["seq_q"], seq_len_kv=t["seq_kv"],
        max_total_seq_len_q=total, max_total_seq_len_kv=total, **_mask_kwargs(s),
    )
    for name, tensor, heads, off in (("dq", dq, N, "q_off"), ("dk", dk, s.n_kv_heads, "k_off"), ("dv", dv, s.n_kv_heads, "v_off")):
        tensor.set_output(True).set_dim([B, heads, S, D]).set_stride([S * heads * D, D, heads * D, 1])
        tensor.set_ragged_offset(t[off])
        t[name] = tensor
    BUILDS["bwd"] += 1
    return _finish(g, t)


def _plan(kind: str, s: _Shape, handle, stats: bool = True) -> _Plan:
    key = (kind, stats, s if kind == "bwd" else replace(s, total=0))
    if key not in _GRAPHS:
        _GRAPHS[key] = _build_bwd(s, handle) if kind == "bwd" else _build_fwd(s, stats, handle)
    return _GRAPHS[key]


def _execute(plan: _Plan, data: dict[str, torch.Tensor], handle, device: torch.device) -> None:
    # Raw device pointers: the graph's own BSHD-over-ragged declaration describes the buffers.
    pack = {plan.t[role]: tensor.data_ptr() for role, tensor in data.items()}
    workspace = torch.empty(max(plan.workspace, 1), dtype=torch.uint8, device=device)
    plan.graph.execute(pack, workspace, handle=handle)


def _layout_data(layout: _Layout) -> dict[str, torch.Tensor]:
    return {
        "seq_q": layout.seq_len, "seq_kv": layout.seq_len,
        "q_off": layout.q_off, "o_off": layout.q_off, "k_off": layout.kv_off, "v_off": layout.kv_off,
    }


def _forward(s: _Shape, layout: _Layout, q, k, v, stats: bool):
    handle = _handle(q.device)
    plan = _plan("fwd", s, handle, stats)
    o = torch.empty_like(q)
    data = {**_layout_data(layout), "q": q, "k": k, "v": v, "o": o}
    lse = None
    if stats:
        lse = torch.empty(s.docs, s.n_heads, s.seq, 1, dtype=torch.float32, device=q.device)
        data["stats"] = lse
    _execute(plan, data, handle, q.device)
    return o, lse


def _backward(s: _Shape, layout: _Layout, q, k, v, o, lse, do):
    handle = _handle(q.device)
    plan = _plan("bwd", s, handle)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    data = {**_layout_data(layout), "q": q, "k": k, "v": v, "o": o, "dO": do, "stats": lse, "dq": dq, "dk": dk, "dv": dv}
    _execute(plan, data, handle, q.device)
    return dq, dk, dv


class _PackedAttention(torch.autograd.Function):
    """Packed (T_total, heads, D) q/k/v -> o, with cuDNN's fused backward."""

    @staticmethod
    def forward(ctx, q, k, v, shape: _Shape, layout: _Layout):  # noqa: ANN001
        o, lse = _forward(shape, layout, q, k, v, stats=True)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.shape, ctx.layout = shape, layout
        return o

    @staticmethod
    def backward(ctx, do):  # noqa: ANN001
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(ctx.shape, ctx.layout, q, k, v, o, lse, do.contiguous())
        return dq, dk, dv, None, None


def _check_slopes(spec: AttentionSpec) -> None:
    """cuDNN applies the standard geometric slopes; refuse to silently apply others."""
    slopes = spec.alibi_slopes
    key = (id(slopes), slopes._version, spec.n_heads)
    hit = _SLOPES_OK.get(key)
    if hit is None or hit[0]() is not slopes:  # one host read per slopes buffer, not per step
        ok = slopes.numel() == spec.n_heads and torch.allclose(
            slopes.detach().float().cpu().flatten(), alibi_slopes(spec.n_heads), rtol=1e-5, atol=0
        )
        hit = _SLOPES_OK[key] = (weakref.ref(slopes), bool(ok))
    if not hit[1]:
        raise ValueError(
            "the cudnn backend applies cuDNN's built-in ALiBi slopes (the standard geometric ones of "
            f"alibi_slopes({spec.n_heads})); the spec carries other slopes"
        )


@BACKENDS.register("cudnn")
class CudnnBackend(Backend):
    """cuDNN SDPA over packed documents: causal or not, ALiBi (causal), GQA/MQA, fwd and bwd."""

    name = "cudnn"

    def unavailable(self) -> str | None:
        return _why_unavailable()

    def refuse(self, cell: Cell) -> str | None:
        if cell.device != "cuda":
            return "cuDNN attention runs on CUDA devices only"
        if cell.dtype not in _IO_DTYPES:
            return f"cuDNN fused attention takes bfloat16 or float16, not {cell.dtype}"
        if cell.window:
            return "sliding-window attention is not served by the cudnn backend"
        if cell.alibi and not cell.causal:
            return "cuDNN's ALiBi mask is causal only"
        limit = MAX_HEAD_DIM_BWD if cell.backward else MAX_HEAD_DIM_FWD
        if cell.head_dim % 8 or cell.head_dim > limit:
            return f"head_dim={cell.head_dim}: cuDNN needs a multiple of 8 <= {limit} ({'fwd+bwd' if cell.backward else 'fwd'})"
        return None

    def attend(self, q_BTNH, k_BTKH, v_BTKH, spec: AttentionSpec) -> torch.Tensor:
        B, T, N, H = q_BTNH.shape
        K = k_BTKH.shape[2]
        if (N, K, H) != (spec.n_heads, spec.n_kv_heads, spec.head_dim):
            raise ValueError(f"q/k heads and head dim {(N, K, H)} do not match the spec")
        if spec.window is not None or (spec.alibi_slopes is not None and not spec.causal):
            raise ValueError("the cudnn backend serves neither windows nor non-causal ALiBi")
        if spec.alibi_slopes is not None:
            _check_slopes(spec)
        device = q_BTNH.device
        layout = spec.cached(
            f"cudnn.layout.{B}x{T}.{N}.{K}.{H}.{device}", lambda: _make_layout(spec, B, T, device)
        )
        shape = _Shape(
            device=device.index if device.index is not None else torch.cuda.current_device(),
            docs=layout.docs, seq=layout.seq, n_heads=N, n_kv_heads=K, head_dim=H, dtype=q_BTNH.dtype,
            causal=spec.causal, alibi=spec.alibi_slopes is not None, total=B * T,
        )
        q = q_BTNH.reshape(B * T, N, H).contiguous()
        k = k_BTKH.reshape(B * T, K, H).contiguous()
        v = v_BTKH.reshape(B * T, K, H).contiguous()
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if grad:
            o = _PackedAttention.apply(q, k, v, shape, layout)
        else:
            o, _ = _forward(shape, layout, q, k, v, stats=False)
        return o.view(B, T, N, H)
