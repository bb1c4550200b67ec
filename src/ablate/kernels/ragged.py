"""Packed documents as one ragged buffer, and one opaque attention op over it.

A batch of B rows of T tokens, whose rows end on document ends, is read as one buffer of B*T
tokens tiled by its documents. `RaggedLayout` holds, per document, its length and where it starts
in q's and in k/v's packed (B, T, heads, H) buffers (device tensors, made on the host with the
batch), plus the starts and the length bucket on the host: a kernel picks its compiled graph from
host data alone, so nothing waits on the device and the step launches no offset arithmetic. q, k
and v must each be packed (the backend asks the model to project them separately rather than
slice one fused projection: `Backend.packs_qkv`). The document count is rounded up to a bucket
(zero-length documents pad it), and marked dynamic for torch.compile, so a new batch neither
rebuilds a kernel graph nor recompiles the training step.

`ragged_attention` is a custom op (`ablate::ragged_attention`) with a fake implementation and a
backward op, so torch.compile keeps it opaque and traces around it. On CUDA it runs cuDNN's fused
ragged SDPA (`ablate.kernels.cudnn_graphs`); on CPU a float32 reference with the same outputs, so
that the op's wiring (compile, autograd, layouts) is tested anywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ablate.kernels.base import Layout
from ablate.kernels.spec import AttentionSpec, DocLens, alibi_slopes, check_doc_lens, flat_doc_lens


def doc_bucket(n_docs: int) -> int:
    """The static document count a batch of `n_docs` documents runs under."""
    if n_docs <= 16:
        return 1 << max(0, math.ceil(math.log2(max(n_docs, 1))))
    return -(-n_docs // 16) * 16


def seq_bucket(longest: int, row_len: int) -> int:
    """The max document length S a batch runs under (<= T): the longest rounded up to a power of
    two up to 512 (>= 64), to a multiple of 512 beyond. cuDNN's grid spans S for every document,
    so S past the longest is paid for by each one: on an H200, 8 rows of 4096 tokens of web-like
    documents whose longest held 2458 took 0.84 ms a layer (forward and backward) at S = 4096 and
    0.78 ms at S = 2560. Declaring S = T on rows of short documents costs about 1.6x."""
    if longest <= 512:
        return min(row_len, 1 << max(6, math.ceil(math.log2(max(longest, 1)))))
    return min(row_len, -(-longest // 512) * 512)


@dataclass
class RaggedLayout(Layout):
    """The kernel sees the documents longest first (`seq_len`, `q_off`, `kv_off`): its work per
    document grows with the square of the length, and scheduling the long ones first leaves no
    long one running alone at the end (on an H200, 3% faster on web-like documents than buffer
    order, 6% faster than shortest first). The offsets say where each one is, so nothing moves.
    `host_starts` keeps buffer order."""

    seq_len: torch.Tensor  # (docs,) int32, longest first; zero-length documents pad to the bucket
    q_off: torch.Tensor  # (docs + 1,) each document's first element in q's (B, T, N, H) buffer (and o's), then the end
    kv_off: torch.Tensor  # (docs + 1,) the same in k's and v's (B, T, K, H) buffers
    host_starts: torch.Tensor  # (docs + 1,) int64 on the host: the documents' first tokens in buffer order, then the end
    host_seq: torch.Tensor  # (1,) int64 on the host: the max document length bucket S (`seq_bucket`)

    def finish(self, device: torch.device) -> "RaggedLayout":
        for t in (self.seq_len, self.q_off, self.kv_off, self.host_starts):
            torch._dynamo.maybe_mark_dynamic(t, 0)  # the document count varies by batch
        return self

    def op_args(self) -> tuple[torch.Tensor, ...]:
        """The layout's arguments to `ragged_attention`, in order."""
        return self.seq_len, self.q_off, self.kv_off, self.host_starts, self.host_seq


def prepare_ragged(spec: AttentionSpec, doc_lens: DocLens | None, n_rows: int, row_len: int,
                   offset_dtype: torch.dtype = torch.int64) -> RaggedLayout:
    if doc_lens is not None:
        check_doc_lens(doc_lens, n_rows, row_len)
    lens = flat_doc_lens(doc_lens, n_rows, row_len)
    lens = np.array(lens + [0] * (doc_bucket(len(lens)) - len(lens)), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)])
    order = np.argsort(-lens, kind="stable")  # longest first
    kernel_starts = np.append(starts[order], starts[-1])
    q_width, kv_width = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    return RaggedLayout(seq_len=torch.from_numpy(lens[order]).to(torch.int32),
                        q_off=torch.from_numpy(kernel_starts * q_width).to(offset_dtype),
                        kv_off=torch.from_numpy(kernel_starts * kv_width).to(offset_dtype),
                        host_starts=torch.from_numpy(starts),
                        host_seq=torch.tensor([seq_bucket(int(lens.max(initial=1)), row_len)]))


@torch.library.custom_op("ablate::ragged_attention", mutates_args=())
def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: torch.Tensor, q_off: torch.Tensor,
                     kv_off: torch.Tensor, host_starts: torch.Tensor, host_seq: torch.Tensor, causal: bool,
                     alibi: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q_BTNH, k_BTKH, v_BTKH (each packed) over the documents of the layout (`RaggedLayout.op_args`)
    -> (o_BTNH, float32 softmax stats packed at the start of a (docs * N * T,) buffer)."""
    if q.is_cuda:
        return _cudnn_forward(q, k, v, seq_len, q_off, kv_off, host_seq, causal, alibi)
    return _reference_forward(q, k, v, host_starts, host_seq, causal, alibi)


@ragged_attention.register_fake
def _(q, k, v, seq_len, q_off, kv_off, host_starts, host_seq, causal, alibi):  # noqa: ANN001, ANN202
    B, T, N, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(seq_len.shape[0] * N * T, dtype=torch.float32)


@torch.library.custom_op("ablate::ragged_attention_backward", mutates_args=())
def ragged_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                              stats: torch.Tensor, seq_len: torch.Tensor, q_off: torch.Tensor, kv_off: torch.Tensor,
                              host_starts: torch.Tensor, host_seq: torch.Tensor, causal: bool,
                              alibi: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.is_cuda:
        return _cudnn_backward(do, q, k, v, o, stats, seq_len, q_off, kv_off, host_seq, causal, alibi)
    return _reference_backward(do, q, k, v, host_starts, causal, alibi)


@ragged_attention_backward.register_fake
def _(do, q, k, v, o, stats, seq_len, q_off, kv_off, host_starts, host_seq, causal, alibi):  # noqa: ANN001, ANN202
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return like(q), like(k), like(v)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, v, seq_len, q_off, kv_off, host_starts, host_seq, causal, alibi = inputs
    o, stats = output
    ctx.save_for_backward(q, k, v, o, stats, seq_len, q_off, kv_off, host_starts, host_seq)
    ctx.flags = (causal, alibi)


def _backward(ctx, do, dstats):  # noqa: ANN001, ANN202
    dq, dk, dv = ragged_attention_backward(do, *ctx.saved_tensors, *ctx.flags)
    return dq, dk, dv, None, None, None, None, None, None, None


ragged_attention.register_autograd(_backward, setup_context=_setup_context)


# ---- CUDA: cuDNN


def _graph_shape(q: torch.Tensor, k: torch.Tensor, seq_len: torch.Tensor, host_seq: torch.Tensor, causal: bool,
                 alibi: bool, total: int = 0):  # noqa: ANN202
    from ablate.kernels.cudnn_graphs import GraphShape

    B, T, N, H = q.shape
    return GraphShape(device=q.device.index if q.device.index is not None else torch.cuda.current_device(),
                      docs=seq_len.shape[0], seq=int(host_seq[0]), n_heads=N, n_kv_heads=k.shape[2],
                      head_dim=H, dtype=q.dtype, causal=causal, alibi=alibi, total=total)


def _cudnn_forward(q, k, v, seq_len, q_off, kv_off, host_seq, causal, alibi):  # noqa: ANN001, ANN202
    from ablate.kernels.cudnn_graphs import execute

    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"cuDNN's ragged attention takes bfloat16 or float16, not {q.dtype}; run the model "
                         "under bf16 autocast (precision=auto or bf16)")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the offsets count packed tokens (no-op copies
    # when the caller packed them, as `CudnnBackend.attend` does; a compiled graph may still hand over other strides)
    s = _graph_shape(q, k, seq_len, host_seq, causal, alibi)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    stats = torch.empty(s.docs * s.n_heads * q.shape[1], dtype=torch.float32, device=q.device)
    execute("fwd", s, {"seq_q": seq_len, "seq_kv": seq_len, "q_off": q_off, "kv_off": kv_off,
                       "q": q, "k": k, "v": v, "o": o, "stats": stats}, q.device)
    return o, stats


def _cudnn_backward(do, q, k, v, o, stats, seq_len, q_off, kv_off, host_seq, causal, alibi):  # noqa: ANN001, ANN202
    from ablate.kernels.cudnn_graphs import execute

    q, k, v, o, do = (t.contiguous() for t in (q, k, v, o, do))
    s = _graph_shape(q, k, seq_len, host_seq, causal, alibi, total=q.shape[0] * q.shape[1])
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))
    execute("bwd", s, {"seq_q": seq_len, "seq_kv": seq_len, "q_off": q_off, "kv_off": kv_off, "q": q, "k": k,
                       "v": v, "o": o, "dO": do, "stats": stats, "dq": dq, "dk": dk, "dv": dv}, q.device)
    return dq, dk, dv


# ---- CPU: the float32 reference, document by document


def _documents(host_starts: torch.Tensor):  # noqa: ANN202
    starts = host_starts.tolist()
    return [(a, b) for a, b in zip(starts, starts[1:]) if b > a]


def _probs(q_LNH, k_NLH, causal: bool, alibi: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (N, L, L) and log-sum-exp (N, L) of one document, in float32."""
    L, N, H = q_LNH.shape
    scores = q_LNH.float().transpose(0, 1) @ k_NLH.transpose(1, 2) * H**-0.5
    i = torch.arange(L)
    dist = (i[:, None] - i[None, :]).float()
    if alibi:
        scores = scores - alibi_slopes(N)[:, None, None] * (dist if causal else dist.abs())
    if causal:
        scores = scores.masked_fill(dist < 0, float("-inf"))
    return scores.softmax(-1), scores.logsumexp(-1)


def _heads(x_LKH: torch.Tensor, groups: int) -> torch.Tensor:
    """(L, K, H) -> (N, L, H) float32, each kv head repeated for its query heads."""
    return x_LKH.float().repeat_interleave(groups, 1).transpose(0, 1)


def _reference_forward(q, k, v, host_starts, host_seq, causal, alibi):  # noqa: ANN001, ANN202
    B, T, N, H = q.shape
    groups = N // k.shape[2]
    qf, kf, vf = (t.reshape(B * T, *t.shape[2:]) for t in (q, k, v))
    o = torch.zeros(B * T, N, H, dtype=torch.float32)
    docs, S = host_starts.shape[0] - 1, int(host_seq[0])
    stats = torch.zeros(docs * N * T, dtype=torch.float32)
    packed = stats[: docs * N * S].view(docs, N, S)
    for d, (a, b) in enumerate(_documents(host_starts)):
        p, packed[d, :, : b - a] = _probs(qf[a:b], _heads(kf[a:b], groups), causal, alibi)
        o[a:b] = (p @ _heads(vf[a:b], groups)).transpose(0, 1)
    return o.to(q.dtype).view(B, T, N, H), stats


def _reference_backward(do, q, k, v, host_starts, causal, alibi):  # noqa: ANN001, ANN202
    """Softmax attention's gradients, written out: dV = P^T dO, dS = P (dP - rowsum(dP P)),
    dQ = dS K / sqrt(H), dK = dS^T Q / sqrt(H); K/V gradients summed over each kv head's group."""
    B, T, N, H = q.shape
    K = k.shape[2]
    flat = lambda t: t.reshape(B * T, *t.shape[2:])  # noqa: E731
    qf, kf, vf, dof = flat(q), flat(k), flat(v), flat(do)
    dq, dk, dv = (torch.zeros(B * T, n, H, dtype=torch.float32) for n in (N, K, K))
    for a, b in _documents(host_starts):
        k_NLH, v_NLH = _heads(kf[a:b], N // K), _heads(vf[a:b], N // K)
        p, _ = _probs(qf[a:b], k_NLH, causal, alibi)
        do_NLH = dof[a:b].float().transpose(0, 1)
        dp = do_NLH @ v_NLH.transpose(1, 2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * H**-0.5
        dq[a:b] = (ds @ k_NLH).transpose(0, 1)
        dk[a:b] = (ds.transpose(1, 2) @ qf[a:b].float().transpose(0, 1)).view(K, N // K, b - a, H).sum(1).transpose(0, 1)
        dv[a:b] = (p.transpose(1, 2) @ do_NLH).view(K, N // K, b - a, H).sum(1).transpose(0, 1)
    return tuple(g.to(t.dtype).view(t.shape) for g, t in zip((dq, dk, dv), (q, k, v)))
