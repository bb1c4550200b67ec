"""RoPE's rotation on a GPU: the Triton kernel (`ablate::rope`) against compiled torch code, side by side.

    python benchmarks/rope_kernel.py [--batch 32 --context 1024 --heads 12 --kv-heads 4 --head-dim 64 --layers 12]

For q (B, T, N, H) and k (B, T, K, H) in bf16, with each token's cos/sin looked up from a float32 table
by its position as the model does, it times the rotation's forward and backward (GPU kernel time from the
profiler, the gradients taken with torch.autograd.grad so that nothing accumulates) four ways:

    compiled, apart:    torch.compile of the formula on q and on k (the model's code before the kernel)
    compiled, together: the same on q and k projected together, then split
    kernel, apart:      the kernel on q and on k
    kernel, together:   the kernel on q and k projected together (what the model runs)

and prints each one's milliseconds for `--layers` layers, its bandwidth (each element of q and k read
and written once each way), its speed relative to compiled-apart, and its largest difference from the float64
formula (forward and backward).
"""
from __future__ import annotations

import argparse
import sys

import torch

from ablate.models.rope_kernel import rope, rotate_reference


def kernel_ms(fn, iters: int = 20) -> float:  # noqa: ANN001
    """Mean GPU kernel time of fn() in ms."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3 / iters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/rope_kernel.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=12, help="the figures are for this many layers")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: elsewhere the rope op runs the torch formula, so there is nothing to compare")
    B, T, N, K, H = args.batch, args.context, args.heads, args.kv_heads, args.head_dim
    dev = torch.device("cuda")
    torch.manual_seed(0)
    inv_freq = 10000.0 ** (-torch.arange(0, H, 2, device=dev).float() / H)
    angles = torch.arange(T, device=dev).float()[:, None] * inv_freq
    cos_table, sin_table = angles.cos(), angles.sin()
    pos = torch.arange(T, device=dev).expand(B, T).contiguous()
    qk = torch.randn(B, T, N + K, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    q, k = (t.detach().clone().requires_grad_() for t in qk.split([N, K], dim=2))
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def tables(pos):  # noqa: ANN001, ANN202
        return cos_table[pos][:, :, None], sin_table[pos][:, :, None]

    @torch.compile
    def compiled_apart(q, k, pos):  # noqa: ANN001, ANN202
        c, s = tables(pos)
        return rotate_reference(q, c, s), rotate_reference(k, c, s)

    @torch.compile
    def compiled_together(qk, pos):  # noqa: ANN001, ANN202
        c, s = tables(pos)
        r = rotate_reference(qk, c, s)
        return r[:, :, :N], r[:, :, N:]

    @torch.compile
    def kernel_apart(q, k, pos):  # noqa: ANN001, ANN202
        c, s = tables(pos)
        return rope(q, c, s, N)[0], rope(k, c, s, K)[0]

    @torch.compile
    def kernel_together(qk, pos):  # noqa: ANN001, ANN202
        c, s = tables(pos)
        return rope(qk, c, s, N)

    ways = {"compiled, apart": (compiled_apart, (q, k)), "compiled, together": (compiled_together, (qk,)),
            "kernel, apart": (kernel_apart, (q, k)), "kernel, together": (kernel_together, (qk,))}
    # float64 reference on the same inputs
    c64, s64 = (f(torch.arange(T, device=dev).double()[:, None] * inv_freq.double())[None, :, None]
                for f in (torch.cos, torch.sin))
    qk64 = qk.detach().double().requires_grad_()
    want = rotate_reference(qk64, c64.expand(B, T, 1, H // 2), s64.expand(B, T, 1, H // 2))
    (want_grad,) = torch.autograd.grad(want, qk64, torch.cat([gq, gk], dim=2).double())

    moved = 2 * 2 * B * T * (N + K) * H * 2  # bytes: q and k read and written, forward and backward
    print(f"RoPE fwd + bwd on {torch.cuda.get_device_name(dev)}, torch {torch.__version__}: q {B}x{T}x{N}x{H}, "
          f"k {B}x{T}x{K}x{H}, bf16; ms for {args.layers} layers")
    print(f"{'way':<20}{'ms':>8}{'TB/s':>7}{'speed':>7}{'fwd err':>10}{'bwd err':>10}")
    base = None
    for name, (fn, inputs) in ways.items():
        ms = kernel_ms(lambda fn=fn, inputs=inputs: torch.autograd.grad(fn(*inputs, pos), inputs, [gq, gk]))
        outs = fn(*inputs, pos)
        grads = torch.autograd.grad(outs, inputs, [gq, gk])
        grad = torch.cat(grads, dim=2) if len(grads) == 2 else grads[0]
        fwd_err = (torch.cat(outs, dim=2).double() - want).abs().max().item()
        bwd_err = (grad.double() - want_grad).abs().max().item()
        base = base or ms
        print(f"{name:<20}{ms * args.layers:>8.3f}{moved / ms / 1e9:>7.2f}{base / ms:>7.2f}{fwd_err:>10.1e}{bwd_err:>10.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
