"""cuDNN SDPA graphs over packed (ragged, THD) documents, via nvidia-cudnn-frontend.

The batch is one packed buffer of B*T tokens. cuDNN sees its documents as a batch (docs, heads, S,
H) with BSHD strides and per-document ragged offsets into that buffer, plus per-document lengths.
Causality is the top-left diagonal band with right bound 0, inside each document. ALiBi is cuDNN's
built-in causal ALiBi mask, whose slopes are the standard geometric ones (`spec.alibi_slopes`).

A graph is built once per `GraphShape` (document-count bucket, max-length bucket S, heads, kv
heads, head dim, dtype, causal, ALiBi; the backward also the packed token count) and cached for the
process; the lengths and offsets of a batch are device tensors, so a new batch in the same buckets
never rebuilds a graph nor synchronizes the host. Softmax statistics are float32 (docs, N, S, 1),
packed at the start of a (docs * N * T) buffer, so that their allocation does not depend on S.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

INSTALL_HINT = "pip install 'ablate[cudnn]'"
MIN_CAPABILITY = (9, 0)  # ragged (THD) SDPA in cuDNN: Hopper and newer
_GRAPHS: dict[tuple, "Plan"] = {}
_HANDLES: dict[int, Any] = {}
BUILDS = {"fwd": 0, "bwd": 0}  # graphs built in this process (tests count rebuilds)


@lru_cache(maxsize=None)
def why_unavailable() -> str | None:
    if importlib.util.find_spec("cudnn") is None:
        return f"nvidia-cudnn-frontend is not installed ({INSTALL_HINT})"
    if not torch.cuda.is_available():
        return "cuDNN attention needs a CUDA GPU; none is available"
    try:
        version = int(cudnn().backend_version())
    except Exception as err:  # noqa: BLE001 - a broken install is a reason, not a crash
        return f"nvidia-cudnn-frontend failed to load ({type(err).__name__}: {err}); {INSTALL_HINT}"
    if version < 90100:
        return f"cuDNN backend {version} is too old for ragged SDPA (need >= 9.1)"
    cap = torch.cuda.get_device_capability()
    if cap < MIN_CAPABILITY:
        return (f"GPU compute capability {cap[0]}.{cap[1]} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: "
                "cuDNN's ragged (packed-document) SDPA needs Hopper or newer")
    return None


def cudnn():  # noqa: ANN201
    return importlib.import_module("cudnn")


def offset_dtype() -> torch.dtype:
    return torch.int64 if cudnn().backend_version() >= 90600 else torch.int32


def graph_builds() -> int:
    return BUILDS["fwd"] + BUILDS["bwd"]


def _handle(device: torch.device):  # noqa: ANN202
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _HANDLES:
        with torch.cuda.device(index):
            _HANDLES[index] = cudnn().create_handle()
    handle = _HANDLES[index]
    cudnn().set_stream(handle, torch.cuda.current_stream(index).cuda_stream)
    return handle


@dataclass(frozen=True)
class GraphShape:
    """Everything a graph is specialized on."""

    device: int
    docs: int  # bucketed document count
    seq: int  # max document length S
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    alibi: bool
    total: int  # packed tokens B*T for the backward graph (which depends on it); 0 for the forward

    def token_stride(self, role: str) -> int:
        """Elements from one token to the next in the (packed) buffer of `role`."""
        return (self.n_kv_heads if role in ("k", "v", "dk", "dv") else self.n_heads) * self.head_dim


@dataclass
class Plan:
    graph: Any
    t: dict[str, Any]  # graph tensors by role
    workspace: int


def _io_dtype(dtype: torch.dtype):  # noqa: ANN202
    dt = cudnn().data_type
    return dt.BFLOAT16 if dtype == torch.bfloat16 else dt.HALF


# the ragged-offset tensor of each role: buffers of N heads share one, buffers of K heads another
OFFSET_OF = {"q": "q_off", "o": "q_off", "dO": "q_off", "dq": "q_off", "k": "kv_off", "v": "kv_off",
             "dk": "kv_off", "dv": "kv_off"}


def _strides(s: GraphShape, role: str) -> list[int]:
    """BSHD strides of the (docs, heads, S, H) view of `role`'s buffer."""
    w = s.token_stride(role)
    return [s.seq * w, s.head_dim, w, 1]


def _declare_common(g, s: GraphShape, roles: tuple[str, ...]) -> dict[str, Any]:  # noqa: ANN001
    """Graph inputs: BSHD-strided (docs, heads, S, H) views over the token buffers, ragged offsets."""
    dt = cudnn().data_type
    off_dt = dt.INT64 if offset_dtype() == torch.int64 else dt.INT32
    B, S, D = s.docs, s.seq, s.head_dim
    t: dict[str, Any] = {}
    for name in ("seq_q", "seq_kv"):
        t[name] = g.tensor(name=name, dim=[B, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.INT32)
    for name in sorted(set(OFFSET_OF.values())):
        t[name] = g.tensor(name=name, dim=[B + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=off_dt)
    for role in roles:
        heads = s.n_kv_heads if role in ("k", "v") else s.n_heads
        t[role] = g.tensor(name=role, dim=[B, heads, S, D], stride=_strides(s, role), data_type=_io_dtype(s.dtype))
        t[role].set_ragged_offset(t[OFFSET_OF[role]])
    return t


def _finish(g, t: dict[str, Any]) -> Plan:  # noqa: ANN001
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn().heur_mode.A, cudnn().heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return Plan(graph=g, t=t, workspace=int(g.get_workspace_size()))


def _mask_kwargs(s: GraphShape) -> dict[str, Any]:
    kw: dict[str, Any] = dict(attn_scale=1.0 / math.sqrt(s.head_dim), use_alibi_mask=s.alibi, use_padding_mask=True,
                              diagonal_alignment=cudnn().diagonal_alignment.TOP_LEFT)
    if s.causal:
        kw["diagonal_band_right_bound"] = 0
    return kw


def _graph(s: GraphShape, handle):  # noqa: ANN001, ANN202
    """An empty graph: inputs in the run's dtype, softmax and accumulation in float32."""
    dt = cudnn().data_type
    return cudnn().pygraph(io_data_type=_io_dtype(s.dtype), intermediate_data_type=dt.FLOAT,
                           compute_data_type=dt.FLOAT, handle=handle)


def _stats_tensor(s: GraphShape):  # noqa: ANN202
    B, N, S = s.docs, s.n_heads, s.seq
    return dict(dim=[B, N, S, 1], stride=[N * S, S, 1, 1])


def _build_fwd(s: GraphShape, handle) -> Plan:  # noqa: ANN001
    g = _graph(s, handle)
    t = _declare_common(g, s, ("q", "k", "v"))
    o, lse = g.sdpa(name="sdpa", q=t["q"], k=t["k"], v=t["v"], generate_stats=True,
                    seq_len_q=t["seq_q"], seq_len_kv=t["seq_kv"], **_mask_kwargs(s))
    B, N, S, D = s.docs, s.n_heads, s.seq, s.head_dim
    o.set_output(True).set_dim([B, N, S, D]).set_stride(_strides(s, "o"))
    o.set_ragged_offset(t[OFFSET_OF["o"]])
    lse.set_output(True).set_data_type(cudnn().data_type.FLOAT)
    lse.set_dim(_stats_tensor(s)["dim"]).set_stride(_stats_tensor(s)["stride"])
    t["o"], t["stats"] = o, lse
    BUILDS["fwd"] += 1
    return _finish(g, t)


def _build_bwd(s: GraphShape, handle) -> Plan:  # noqa: ANN001
    g = _graph(s, handle)
    t = _declare_common(g, s, ("q", "k", "v", "o", "dO"))
    B, N, S, D = s.docs, s.n_heads, s.seq, s.head_dim
    t["stats"] = g.tensor(name="stats", data_type=cudnn().data_type.FLOAT, **_stats_tensor(s))
    total = -(-s.total // 64) * 64
    dq, dk, dv = g.sdpa_backward(
        name="sdpa_backward", q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["dO"], stats=t["stats"],
        seq_len_q=t["seq_q"], seq_len_kv=t["seq_kv"], max_total_seq_len_q=total, max_total_seq_len_kv=total,
        **_mask_kwargs(s),
    )
    for name, tensor, heads in (("dq", dq, N), ("dk", dk, s.n_kv_heads), ("dv", dv, s.n_kv_heads)):
        tensor.set_output(True).set_dim([B, heads, S, D]).set_stride(_strides(s, name))
        tensor.set_ragged_offset(t[OFFSET_OF[name]])
        t[name] = tensor
    BUILDS["bwd"] += 1
    return _finish(g, t)


def plan(kind: str, s: GraphShape, handle) -> Plan:  # noqa: ANN001
    key = (kind, s)
    if key not in _GRAPHS:
        _GRAPHS[key] = _build_bwd(s, handle) if kind == "bwd" else _build_fwd(s, handle)
    return _GRAPHS[key]


def execute(kind: str, s: GraphShape, data: dict[str, torch.Tensor], device: torch.device) -> None:
    """Run the graph of `kind` for `s` on raw device pointers (the graph's own declaration
    describes the buffers)."""
    handle = _handle(device)
    p = plan(kind, s, handle)
    pack = {p.t[role]: tensor.data_ptr() for role, tensor in data.items()}
    workspace = torch.empty(max(p.workspace, 1), dtype=torch.uint8, device=device)
    p.graph.execute(pack, workspace, handle=handle)
