"""The tour's correctness sections: dense, causal, packed, grouped-query and ALiBi attention.

Each holds xformers' kernel (CUDA only), the project's eager reference and the backend `auto`
picks up against the vanilla attention of `ablate.tour.attention`, within `TOLERANCE`. xformers'
mask classes are plain Python and run anywhere, so the masks themselves are checked on CPU too.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ablate.data import TrainLoader
from ablate.kernels import AttentionSpec, alibi_slopes
from ablate.kernels.spec import alibi_bias, allowed_mask
from ablate.kernels.xformers_backend import aligned_alibi, import_xformers
from ablate.tour.attention import (
    TOLERANCE,
    Impl,
    causal_bias,
    compare,
    project_impls,
    random_qkv,
    shape_for,
    vanilla_attention,
    with_xformers,
)
from ablate.tour.report import Tour


def _header(tour: Tour, text: str, dtype: torch.dtype) -> None:
    tour.say(f"  {text}, {str(dtype).replace('torch.', '')}, tolerance {TOLERANCE[dtype]:.0e} "
             "relative (max|diff| / max|reference|, float32 reference)")
    tour.param(f"shape.{str(dtype).replace('torch.', '')}", text)


def _mask_agrees(tour: Tour, name: str, xformers_mask: torch.Tensor, spec: AttentionSpec,
                 rows: int, length: int) -> None:
    """xformers' materialized mask (0 / -inf) against the project's allowed_mask, entry by entry."""
    ours = allowed_mask(spec, rows, length, torch.device("cpu"))[0, 0]
    theirs = xformers_mask.reshape(length, length) == 0
    tour.check(name, int((ours != theirs).sum()), 0, scaled=False,
               shown=f"{name} (entries that differ)", text=f"{int((ours != theirs).sum())}")


def correctness(tour: Tour) -> None:
    """vanilla softmax(QK^T/sqrt(d))V against xformers, eager and auto (non-causal, fwd+bwd)"""
    shape = shape_for(tour)
    for dtype in ([torch.float32, torch.bfloat16] if tour.cuda else [torch.float32]):
        _header(tour, shape.describe(), dtype)
        spec = AttentionSpec(shape.heads, shape.heads, shape.head_dim, causal=False)
        impls = with_xformers(
            tour, "xformers.ops.memory_efficient_attention",
            lambda xf: Impl("xformers", lambda q, k, v: xf.attention(q, k, v)),
            project_impls(tour, spec, dtype))
        suffix = "" if dtype == tour.dtype else f"_{str(dtype).replace('torch.', '')}"
        compare(tour, impls, random_qkv(shape, dtype, tour.device), vanilla_attention,
                TOLERANCE[dtype], suffix=suffix)


def causal(tour: Tour) -> None:
    """LowerTriangularMask against a vanilla reference masked with -inf above the diagonal"""
    shape, dtype = shape_for(tour), tour.dtype
    _header(tour, shape.describe() + ", causal", dtype)
    xf_cpu = import_xformers()  # the mask classes work on CPU
    spec = AttentionSpec(shape.heads, shape.heads, shape.head_dim, causal=True)
    T = shape.length
    _mask_agrees(tour, "mask", xf_cpu.bias.LowerTriangularMask().materialize((T, T)), spec, 1, T)
    impls = with_xformers(
        tour, "xformers LowerTriangularMask kernel",
        lambda xf: Impl("xformers", lambda q, k, v: xf.attention(
            q, k, v, attn_bias=xf.bias.LowerTriangularMask())),
        project_impls(tour, spec, dtype))
    bias = causal_bias(T, tour.device)
    compare(tour, impls, random_qkv(shape, dtype, tour.device),
            lambda q, k, v: vanilla_attention(q, k, v, bias), TOLERANCE[dtype])


def doc_lens_for(total: int) -> list[int]:
    """Six documents of uneven lengths (a 1% one, a 27% one, ...) that fill `total` tokens."""
    lens = [max(1, round(total * p)) for p in (0.03, 0.27, 0.11, 0.2, 0.01)]
    return lens + [total - sum(lens)]


def packed(tour: Tour) -> None:
    """documents packed into one row: BlockDiagonalCausalMask, split, and the padding it saves"""
    shape, dtype = shape_for(tour), tour.dtype
    lens = doc_lens_for(shape.rows * shape.length)
    S = sum(lens)
    _header(tour, f"{len(lens)} documents {lens} packed into one row of {S} tokens, "
                  f"N={shape.heads} H={shape.head_dim}, causal", dtype)
    xf_cpu = import_xformers()
    mask = xf_cpu.bias.BlockDiagonalCausalMask.from_seqlens(lens, device=torch.device("cpu"))
    spec = AttentionSpec(shape.heads, shape.heads, shape.head_dim, causal=True, doc_lens=(tuple(lens),))
    dense = mask.materialize((S, S))
    _mask_agrees(tour, "mask", dense, spec, 1, S)
    impls = with_xformers(
        tour, "xformers BlockDiagonalCausalMask kernel",
        lambda xf: Impl("xformers", lambda q, k, v: xf.attention(
            q, k, v, attn_bias=xf.bias.BlockDiagonalCausalMask.from_seqlens(lens, device=q.device))),
        project_impls(tour, spec, dtype))
    starts = np.cumsum([0, *lens]).tolist()

    def each_alone(q, k, v):  # noqa: ANN001, ANN202 - every document attended on its own, then joined
        parts = [vanilla_attention(q[:, a:b], k[:, a:b], v[:, a:b], causal_bias(b - a, q.device))
                 for a, b in zip(starts, starts[1:])]
        return torch.cat(parts, dim=1)

    shape1 = type(shape)(1, S, shape.heads, shape.kv_heads, shape.head_dim)
    outputs = compare(tour, impls, random_qkv(shape1, dtype, tour.device), each_alone, TOLERANCE[dtype])
    shown = next((i.name for i in impls if i.name == "xformers"), impls[-1].name)
    pieces = mask.split(outputs[shown].cpu())  # back into documents: (1, len_i, N, H) each
    refs = mask.split(outputs["reference"].cpu())
    tour.say(f"  split: {[tuple(p.shape[1:2]) for p in pieces]} tokens per document ({shown})")
    per_doc = [((p.float() - r).abs().max() / r.abs().max()).item() for p, r in zip(pieces, refs)]
    tour.say("  per document, rel diff against the document alone: "
             + ", ".join(f"{d:.1e}" for d in per_doc))
    for i, d in enumerate(per_doc):
        tour.metric("doc_rel", d, step=i)
    _padding(tour, lens)
    _plot_mask(tour, dense, lens)


def _padding(tour: Tour, lens: list[int]) -> None:
    """Padding a batch of one document per row would carry, against packing: these documents, and
    the Shakespeare scenes at the training section's context."""
    padded = 1 - sum(lens) / (len(lens) * max(lens))
    tour.say(f"  padding, these documents: one per row padded to the longest wastes {padded:.1%} of "
             f"the batch; packed: 0.0%")
    tour.metric("padding_frac_padded", padded)
    tour.metric("padding_frac_packed", 0.0)
    from ablate.tour.training import corpus  # the corpus is loaded once, for this and training

    data, context = corpus(tour)
    length = data.train.docs.length
    rows = np.ceil(length / context).sum()
    padded_real = 1 - length.sum() / (rows * context)
    batch = next(TrainLoader(data.train.docs, context, 8, 0, data.tokenizer))
    packed_real = batch.n_pad / batch.tokens.numel()
    tour.say(f"  padding, {len(length)} Shakespeare scenes (median {int(np.median(length))} tokens) in "
             f"rows of {context}: one scene per row (cut, last piece padded) wastes {padded_real:.1%}; "
             f"the project's packed loader {packed_real:.1%}")
    tour.metric("corpus_padding_frac_padded", padded_real)
    tour.metric("corpus_padding_frac_packed", packed_real)


def _plot_mask(tour: Tour, dense: torch.Tensor, lens: list[int]) -> None:
    from matplotlib.figure import Figure

    step = max(1, dense.shape[-1] // 512)
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.add_subplot()
    ax.imshow((dense[::step, ::step] == 0).numpy(), cmap="Blues", interpolation="nearest")
    ax.set_title(f"BlockDiagonalCausalMask, documents {lens}", fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    tour.figure(fig)


def gqa(tour: Tour) -> None:
    """grouped-query attention: 5-D BMGHK against MHA with K/V repeated, and the KV cache saved"""
    shape, dtype = shape_for(tour), tour.dtype
    B, T, N, K, H = shape.rows, shape.length, shape.heads, shape.kv_heads, shape.head_dim
    G = N // K
    _header(tour, shape.describe(kv=True) + f" ({G} query heads per K/V head), causal", dtype)
    spec = AttentionSpec(N, K, H, causal=True)

    def bmghk(xf):  # noqa: ANN001, ANN202 - xformers' grouped layout: no K/V copy, forward only
        def attend(q, k, v):  # noqa: ANN001, ANN202
            q5, k5, v5 = q.reshape(B, T, K, G, H), k[:, :, :, None].expand(B, T, K, G, H), \
                v[:, :, :, None].expand(B, T, K, G, H)
            return xf.attention(q5, k5, v5, attn_bias=xf.bias.LowerTriangularMask()).reshape(B, T, N, H)
        return Impl("xformers", attend, grads=False)

    impls = with_xformers(tour, "xformers 5-D BMGHK kernel", bmghk, project_impls(tour, spec, dtype))
    bias = causal_bias(T, tour.device)

    def mha_repeated(q, k, v):  # noqa: ANN001, ANN202
        return vanilla_attention(q, k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2), bias)

    compare(tour, impls, random_qkv(shape, dtype, tour.device, kv_heads=K), mha_repeated, TOLERANCE[dtype])
    size = torch.tensor([], dtype=dtype).element_size()
    mha_bytes, gqa_bytes = 2 * B * T * N * H * size, 2 * B * T * K * H * size
    tour.say(f"  KV cache of these {B}x{T} tokens, one layer: MHA {mha_bytes / 2**20:.1f} MiB, GQA "
             f"{gqa_bytes / 2**20:.1f} MiB: {(mha_bytes - gqa_bytes) / 2**20:.1f} MiB saved "
             f"({1 - K / N:.0%}); per token and layer {2 * N * H * size} -> {2 * K * H * size} bytes")
    tour.metric("kv_bytes_mha", mha_bytes)
    tour.metric("kv_bytes_gqa", gqa_bytes)
    tour.metric("kv_saved_frac", 1 - gqa_bytes / mha_bytes)


def alibi(tour: Tour) -> None:
    """ALiBi: the head slopes, the bias, and causal ALiBi attention against the reference"""
    shape, dtype = shape_for(tour), tour.dtype
    N, T = shape.heads, shape.length
    slopes = alibi_slopes(N)
    expected = torch.tensor([2.0 ** (-8.0 * (h + 1) / N) for h in range(N)])  # N a power of two
    tour.say("  slopes: " + " ".join(f"{s:.4g}" for s in slopes.tolist()))
    tour.check("slopes", (slopes - expected).abs().max().item(), 1e-7, scaled=False,
               shown="slopes against 2^(-8h/N)", text=f"max|diff| {(slopes - expected).abs().max():.1e}")
    bias = alibi_bias(slopes, T, causal=True)  # (1, N, T, T): -slope * (i - j)
    row = bias[0, 0, 4, :5].tolist()
    tour.say(f"  bias (1, N, T, T) = -slope * (i - j); head 0, query 4, keys 0..4: "
             + " ".join(f"{x:.3g}" for x in row))
    _header(tour, shape.describe() + ", causal + ALiBi", dtype)
    spec = AttentionSpec(N, N, shape.head_dim, causal=True, alibi_slopes=slopes)

    def xformers_alibi(xf):  # noqa: ANN001, ANN202 - LowerTriangularMaskWithTensorBias: forward only
        def attend(q, k, v):  # noqa: ANN001, ANN202
            tensor_bias = aligned_alibi(spec, q.shape[0], q.shape[1], q.dtype, q.device)
            return xf.attention(q, k, v, attn_bias=xf.bias.LowerTriangularMaskWithTensorBias(tensor_bias))
        return Impl("xformers", attend, grads=False)

    impls = with_xformers(tour, "xformers LowerTriangularMaskWithTensorBias kernel", xformers_alibi,
                          project_impls(tour, spec, dtype))
    full = bias.to(tour.device) + causal_bias(T, tour.device)
    compare(tour, impls, random_qkv(shape, dtype, tour.device),
            lambda q, k, v: vanilla_attention(q, k, v, full), TOLERANCE[dtype])
    _plot_alibi(tour, slopes)


def _plot_alibi(tour: Tour, slopes: torch.Tensor) -> None:
    from matplotlib.figure import Figure

    n = 32
    bias = alibi_bias(slopes, n, causal=True)[0] + causal_bias(n, torch.device("cpu"))
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    image = left.imshow(bias[0].masked_fill(bias[0].isinf(), math.nan).numpy(), cmap="viridis")
    left.set_title(f"head 0 (slope {slopes[0]:.3g}), causal", fontsize=9)
    left.set_xlabel("key j")
    left.set_ylabel("query i")
    fig.colorbar(image, ax=left, fraction=0.046)
    distance = torch.arange(n, dtype=torch.float32)
    for h, slope in enumerate(slopes.tolist()):
        right.plot(distance.numpy(), (-slope * distance).numpy(), label=f"head {h}: {slope:.3g}")
    right.set_xlabel("distance i - j")
    right.set_ylabel("bias added to the score")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    fig.suptitle("ALiBi: -slope * (i - j), one slope per head", fontsize=10)
    tour.figure(fig)
