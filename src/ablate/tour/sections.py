"""The tour's correctness sections: dense, causal, packed, grouped-query and ALiBi attention.

Each holds xformers' kernel (CUDA only) and the backend `auto` picks up against the eager reference,
forward and backward, through `ablate.bench.toolkit`. xformers' mask classes are plain Python and run
anywhere, so the masks themselves are checked against the project's `allowed_mask` on CPU too.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ablate.bench.toolkit import Comparison, compare_to_reference, document_lengths, rel_err, run_attention, tolerance
from ablate.data import TrainLoader
from ablate.kernels import AttentionSpec, DocLens, alibi_slopes, get_backend
from ablate.kernels.spec import alibi_bias, allowed_mask, document_ids
from ablate.kernels.xformers_backend import import_xformers
from ablate.tour import training
from ablate.tour.attention import check_kernels, shape_for, vanilla_attention
from ablate.tour.report import Tour


def _describe(B: int, T: int, N: int, H: int, K: int | None = None) -> str:
    return f"B={B} T={T} N={N}" + (f" K={K}" if K else "") + f" H={H}"


def _random(shape: tuple[int, ...], n: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(n)]


def _mask_agrees(tour: Tour, xformers_mask: torch.Tensor, spec: AttentionSpec, doc_lens: DocLens | None,
                 length: int) -> None:
    """xformers' materialized mask (0 / -inf) against the project's allowed_mask, entry by entry."""
    doc_BT = None if doc_lens is None else torch.from_numpy(document_ids(doc_lens, 1, length))
    ours = allowed_mask(spec, doc_BT, length, "cpu")[0, 0]
    differ = int((ours != (xformers_mask.reshape(length, length) == 0)).sum())
    tour.check("mask", differ, 0, scaled=False, shown="mask (entries that differ)", text=str(differ))


def correctness(tour: Tour) -> None:
    """the eager reference against softmax(QK^T/sqrt(d))V; xformers and auto against it (non-causal)"""
    s = shape_for(tour)
    spec = AttentionSpec(s.heads, s.heads, s.head_dim, causal=False)
    q, k, v, grad_out = (t.requires_grad_(i < 3) for i, t in enumerate(
        _random((s.rows, s.length, s.heads, s.head_dim), 4, tour.device, torch.float32)))
    outs = [get_backend("eager")(q, k, v, spec), vanilla_attention(q, k, v)]
    grads = [torch.autograd.grad(o, (q, k, v), grad_out) for o in outs]
    errors = {"out": rel_err(*outs), **{g: rel_err(a, b) for g, a, b in zip(("dq", "dk", "dv"), *grads)}}
    tour.compared("eager", Comparison(errors, tolerance(torch.float32, tour.device)),
                  "eager reference = the formula, float32")
    for dtype in ([torch.float32, torch.bfloat16] if tour.cuda else [torch.float32]):
        suffix = "" if dtype == tour.dtype else f"_{str(dtype).replace('torch.', '')}"
        check_kernels(tour, spec, None, s.rows, s.length, dtype, _describe(s.rows, s.length, s.heads, s.head_dim),
                      suffix)


def causal(tour: Tour) -> None:
    """LowerTriangularMask against the causal reference, mask and kernels"""
    s = shape_for(tour)
    spec = AttentionSpec(s.heads, s.heads, s.head_dim, causal=True)
    _mask_agrees(tour, import_xformers().bias.LowerTriangularMask().materialize((s.length, s.length)), spec,
                 None, s.length)
    check_kernels(tour, spec, None, s.rows, s.length, tour.dtype,
                  _describe(s.rows, s.length, s.heads, s.head_dim) + ", causal")


def packed(tour: Tour) -> None:
    """documents packed into one row: BlockDiagonalCausalMask, each document as if alone, padding saved"""
    s, dtype = shape_for(tour), tour.dtype
    T = s.rows * s.length
    lens = document_lengths(np.random.default_rng(0), T, mean=T / 6, low=1, high=T // 3)
    doc_lens = (tuple(lens),)
    spec = AttentionSpec(s.heads, s.heads, s.head_dim, causal=True)
    mask = import_xformers().bias.BlockDiagonalCausalMask.from_seqlens(lens)
    dense = mask.materialize((T, T))
    _mask_agrees(tour, dense, spec, doc_lens, T)
    found = check_kernels(tour, spec, doc_lens, 1, T, dtype, f"{len(lens)} documents {lens} packed into one row, "
                          f"{_describe(1, T, s.heads, s.head_dim)}, causal")
    qkv = _random((1, T, s.heads, s.head_dim), 3, tour.device, dtype)
    for k in found:  # the packed output, split back into documents by the mask, against each document alone
        out, _ = run_attention(k.backend, spec, qkv, doc_lens, None)
        pieces = mask.split(out.cpu())
        starts = np.cumsum([0, *lens])
        alone = [run_attention("eager", spec, [t[:, a:b] for t in qkv], None, None)[0].cpu()
                 for a, b in zip(starts, starts[1:])]
        errors = [rel_err(p, r) for p, r in zip(pieces, alone)]
        for i, e in enumerate(errors):
            tour.metric(f"{k.label}_alone_doc", e, step=i)
        tour.check(f"{k.label}_alone", max(errors), tolerance(dtype, tour.device), shown=f"{k.shown}: documents "
                   "as if alone", text=f"worst of {len(errors)} rel {max(errors):.2e}")
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
    run = training.built(tour)
    data, context = run.data, run.cfg.model.context
    length = data.train.docs.length
    padded_real = 1 - length.sum() / (np.ceil(length / context).sum() * context)
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
    ax.set_title(f"BlockDiagonalCausalMask, {len(lens)} documents", fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    tour.figure(fig)


def gqa(tour: Tour) -> None:
    """grouped-query attention against MHA with K/V repeated, xformers' 5-D BMGHK, the KV cache saved"""
    s, dtype = shape_for(tour), tour.dtype
    B, T, N, K, H = s.rows, s.length, s.heads, s.kv_heads, s.head_dim
    spec = AttentionSpec(N, K, H, causal=True)
    found = check_kernels(tour, spec, None, B, T, dtype, _describe(B, T, N, H, K) + f" ({N // K} query heads "
                          "per K/V head), causal; the reference repeats K/V to N heads")
    if any(k.label == "xformers" for k in found):  # forward without gradients: 5-D BMGHK, K/V not copied
        tour.compared("xformers_bmghk", compare_to_reference("xformers", spec, None, B, T, dtype, tour.device.type,
                                                             backward=False), "xformers 5-D BMGHK (forward)")
    size = torch.tensor([], dtype=dtype).element_size()
    mha_bytes, gqa_bytes = 2 * B * T * N * H * size, 2 * B * T * K * H * size
    tour.say(f"  KV cache of these {B}x{T} tokens, one layer: MHA {mha_bytes / 2**20:.1f} MiB, GQA "
             f"{gqa_bytes / 2**20:.1f} MiB: {(mha_bytes - gqa_bytes) / 2**20:.1f} MiB saved "
             f"({1 - K / N:.0%}); per token and layer {2 * N * H * size} -> {2 * K * H * size} bytes")
    tour.metric("kv_bytes_mha", mha_bytes)
    tour.metric("kv_bytes_gqa", gqa_bytes)
    tour.metric("kv_saved_frac", 1 - gqa_bytes / mha_bytes)


def alibi(tour: Tour) -> None:
    """the head slopes, the bias, and causal ALiBi attention against the reference"""
    s = shape_for(tour)
    N = s.heads
    slopes = alibi_slopes(N)
    expected = torch.tensor([2.0 ** (-8.0 * (h + 1) / N) for h in range(N)])  # N a power of two
    tour.say("  slopes: " + " ".join(f"{x:.4g}" for x in slopes.tolist()))
    diff = (slopes - expected).abs().max().item()
    tour.check("slopes", diff, 1e-7, scaled=False, shown="slopes against 2^(-8h/N)", text=f"max|diff| {diff:.1e}")
    row = alibi_bias(slopes, 5, causal=True)[0, 0, 4].tolist()
    tour.say("  bias (1, N, T, T) = -slope * (i - j); head 0, query 4, keys 0..4: " + " ".join(f"{x:.3g}" for x in row))
    spec = AttentionSpec(N, N, s.head_dim, causal=True, alibi=True)
    check_kernels(tour, spec, None, s.rows, s.length, tour.dtype,
                  _describe(s.rows, s.length, N, s.head_dim) + ", causal + ALiBi")
    _plot_alibi(tour, spec, slopes)


def _plot_alibi(tour: Tour, spec: AttentionSpec, slopes: torch.Tensor) -> None:
    from matplotlib.figure import Figure

    n = 32
    bias = alibi_bias(slopes, n, causal=True)[0].masked_fill(~allowed_mask(spec, None, n, "cpu")[0], math.nan)
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    image = left.imshow(bias[0].numpy(), cmap="viridis")
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
