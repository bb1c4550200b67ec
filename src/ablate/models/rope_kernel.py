"""RoPE on CUDA in one Triton kernel per direction, as the opaque custom ops `ablate::rope` and
`ablate::rope_join`.

`rope(x, cos, sin, n_first)` rotates every head of x (B, T, heads, H) and writes heads
0..n_first-1 and the rest to two tensors, so one projection of q and k together feeds one kernel
that hands the attention kernel separate q and k. Its backward (`rope_join`) rotates the two
gradients back into one (B, T, heads, H) gradient, the fused projection's. Each kernel reads every
element once, in float32, with the token's cos and sin loaded once for all its heads. In the
profile of a training step of the Llama cell of benchmarks/train_throughput.py on an H200 (12
layers, 32 x 1024 tokens, 12 + 4 heads of 64), its 24 calls took 0.84 ms, about 4 TB/s; the
compiled elementwise code rotating q and k apart took 1.38 ms.
Elsewhere (CPU, float64) the ops run the same formula in torch (`rotate_reference`).
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _kernel():  # noqa: ANN202 - triton is imported only where the op runs
    import triton
    import triton.language as tl

    @triton.jit
    def rope_kernel(src1, src2, dst1, dst2, cos, sin, n_tokens, n1: tl.constexpr, n2: tl.constexpr,
                    half: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr,
                    SPLIT: tl.constexpr, SIGN: tl.constexpr):
        # the joined side is one (tokens, n1 + n2, 2 * half) buffer; the split side is heads 0..n1-1 in
        # a (tokens, n1, 2 * half) buffer and the rest in a (tokens, n2, 2 * half) one
        t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        h = tl.arange(0, BLOCK_H)
        f = tl.arange(0, BLOCK_F)
        t3, h3, f3 = t[:, None, None], h[None, :, None], f[None, None, :]
        valid = (t3 < n_tokens) & (h3 < n1 + n2) & (f3 < half)
        in1, in2 = valid & (h3 < n1), valid & (h3 >= n1)
        joined = t3 * ((n1 + n2) * 2 * half) + h3 * (2 * half) + f3
        off1 = t3 * (n1 * 2 * half) + h3 * (2 * half) + f3
        off2 = t3 * (n2 * 2 * half) + (h3 - n1) * (2 * half) + f3
        if SPLIT:
            x1 = tl.load(src1 + joined, mask=valid, other=0.0).to(tl.float32)
            x2 = tl.load(src1 + joined + half, mask=valid, other=0.0).to(tl.float32)
        else:
            x1 = (tl.load(src1 + off1, mask=in1, other=0.0).to(tl.float32)
                  + tl.load(src2 + off2, mask=in2, other=0.0).to(tl.float32))
            x2 = (tl.load(src1 + off1 + half, mask=in1, other=0.0).to(tl.float32)
                  + tl.load(src2 + off2 + half, mask=in2, other=0.0).to(tl.float32))
        cs_mask = (t[:, None] < n_tokens) & (f[None, :] < half)
        c = tl.load(cos + t[:, None] * half + f[None, :], mask=cs_mask, other=0.0)[:, None, :]
        s = tl.load(sin + t[:, None] * half + f[None, :], mask=cs_mask, other=0.0)[:, None, :] * SIGN
        y1 = (x1 * c - x2 * s).to(dst1.dtype.element_ty)
        y2 = (x2 * c + x1 * s).to(dst1.dtype.element_ty)
        if SPLIT:
            tl.store(dst1 + off1, y1, mask=in1)
            tl.store(dst1 + off1 + half, y2, mask=in1)
            tl.store(dst2 + off2, y1, mask=in2)
            tl.store(dst2 + off2 + half, y2, mask=in2)
        else:
            tl.store(dst1 + joined, y1, mask=valid)
            tl.store(dst1 + joined + half, y2, mask=valid)

    return triton, rope_kernel


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation in torch: channel pairs (i, i + H/2) of x (B, T, heads, H) by cos/sin (B, T, 1, H/2),
    in float32 (float64 for float64 x)."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _launch(src1, src2, dst1, dst2, cos, sin, n1: int, n2: int, split: bool, sign: float) -> None:  # noqa: ANN001
    triton, kernel = _kernel()
    n_tokens, half = cos.shape
    block_h, block_f = triton.next_power_of_2(n1 + n2), triton.next_power_of_2(half)
    block_t = max(1, 2048 // (block_h * block_f))
    with torch.cuda.device(dst1.device):
        kernel[(triton.cdiv(n_tokens, block_t),)](src1, src2, dst1, dst2, cos, sin, n_tokens, n1, n2, half,
                                                  block_t, block_h, block_f, split, sign, num_warps=4)


def _triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernel serves x (float32 math: not for float64); elsewhere the torch formula."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def _tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = cos.shape[-1]
    return cos.reshape(-1, half).float().contiguous(), sin.reshape(-1, half).float().contiguous()


@torch.library.custom_op("ablate::rope", mutates_args=())
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, heads, H) rotated by cos/sin (B, T, 1, H/2), split into heads [:n_first] and the rest."""
    B, T, heads, H = x.shape
    if not _triton(x):
        y = rotate_reference(x, cos, sin)
        return y[:, :, :n_first].clone(memory_format=torch.contiguous_format), y[:, :, n_first:].clone(memory_format=torch.contiguous_format)
    out1, out2 = x.new_empty(B, T, n_first, H), x.new_empty(B, T, heads - n_first, H)
    c, s = _tables(cos, sin)
    _launch(x.contiguous(), x, out1, out2 if out2.numel() else out1, c, s, n_first, heads - n_first, True, 1.0)
    return out1, out2


@rope.register_fake
def _(x, cos, sin, n_first):  # noqa: ANN001, ANN202
    B, T, heads, H = x.shape
    return x.new_empty(B, T, n_first, H), x.new_empty(B, T, heads - n_first, H)


@torch.library.custom_op("ablate::rope_join", mutates_args=())
def rope_join(g1: torch.Tensor, g2: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of `rope`: g1 (B, T, n1, H) and g2 (B, T, n2, H) rotated back, as one (B, T, n1 + n2, H)."""
    B, T, n1, H = g1.shape
    n2 = g2.shape[2]
    if not _triton(g1):
        return rotate_reference(torch.cat([g1, g2], dim=2), cos, -sin)
    out = g1.new_empty(B, T, n1 + n2, H)
    c, s = _tables(cos, sin)
    g1 = g1.contiguous()
    _launch(g1, g2.contiguous() if n2 else g1, out, out, c, s, n1, n2, False, -1.0)
    return out


@rope_join.register_fake
def _(g1, g2, cos, sin):  # noqa: ANN001, ANN202
    B, T, n1, H = g1.shape
    return g1.new_empty(B, T, n1 + g2.shape[2], H)


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    _, cos, sin, _ = inputs
    ctx.save_for_backward(cos, sin)
    ctx.shapes, ctx.dtype = tuple(o.shape for o in output), output[0].dtype


def _backward(ctx, g1, g2):  # noqa: ANN001, ANN202
    cos, sin = ctx.saved_tensors
    g1, g2 = (torch.zeros(shape, dtype=ctx.dtype, device=cos.device) if g is None else g
              for g, shape in zip((g1, g2), ctx.shapes))
    return rope_join(g1, g2, cos, sin), None, None, None


rope.register_autograd(_backward, setup_context=_setup)
