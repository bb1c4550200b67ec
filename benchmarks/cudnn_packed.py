"""Packed-document causal attention, side by side: cuDNN (ablate's cudnn backend), xformers,
flex_attention (compiled, document block mask) and torch varlen attention; then packed ALiBi,
cuDNN against flex (score_mod).

One row of T=32768 tokens holding 31 documents of 64..2048 tokens, 16 heads x 128, bf16.
TFLOP/s count only the causal in-document work: for each document of L tokens,
fwd = 2 matmuls x 2 FLOP x heads x head_dim x L(L+1)/2; bwd = 2.5 x fwd, so fwd+bwd = 3.5 x fwd.

    python benchmarks/cudnn_packed.py [--iters 30] [--sweep] [--profile cudnn xformers]

--sweep times the cudnn backend under the four static layouts (max length S = row length or the
power-of-two bucket of the longest document; document count exact or bucketed) and prints the
workspace each cached graph asked for.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import random
import statistics
import time

import torch

T, N_HEADS, HEAD_DIM, N_DOCS, MIN_LEN, MAX_LEN = 32768, 16, 128, 31, 64, 2048
FWD_BWD_FACTOR = 3.5  # fwd + bwd, bwd = 2.5 x fwd
DTYPE = torch.bfloat16


def doc_lengths(seed: int = 0) -> list[int]:
    """N_DOCS lengths in [MIN_LEN, MAX_LEN] summing to T (deterministic)."""
    rng = random.Random(seed)
    lens = [rng.randint(MIN_LEN, MAX_LEN) for _ in range(N_DOCS)]
    while sum(lens) != T:
        i = rng.randrange(N_DOCS)
        step = 1 if sum(lens) < T else -1
        if MIN_LEN <= lens[i] + step <= MAX_LEN:
            lens[i] += step
    return lens


def fwd_flops(lens: list[int]) -> float:
    return sum(2 * 2 * N_HEADS * HEAD_DIM * n * (n + 1) / 2 for n in lens)


def timed(fn, iters: int, warmup: int = 5, repeats: int = 3) -> tuple[float, float]:
    """(GPU ms, host ms) per call: the median over repeats of CUDA-event time around `iters` calls,
    and the host time to issue them. Host ms close to GPU ms means the loop is launch-bound."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        host.append((time.perf_counter() - t0) * 1e3 / iters)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end) / iters)
    return statistics.median(gpu), statistics.median(host)


def profile(name: str, fn, iters: int = 3) -> None:
    """Per-kernel device time of `iters` calls, to see where a method's time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            text = table.table(sort_by=key, row_limit=14, max_name_column_width=70)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    print(f"--- profile: {name}, {iters} x fwd+bwd ---\n{text}")


def fwd_and_fwd_bwd(attn, q, k, v, do):
    """(fwd callable, fwd+bwd callable) for attn(q, k, v) -> o with o shaped like do."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def fwd():
        with torch.no_grad():
            attn(q, k, v)

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        attn(*leaves).backward(do)

    return fwd, fwd_bwd


# ------------------------------------------------------------------------------------ methods


def cudnn_method(lens, alibi: bool):
    from ablate.kernels.cudnn import CudnnBackend
    from ablate.kernels.spec import AttentionSpec, alibi_slopes

    backend = CudnnBackend()
    reason = backend.unavailable()
    if reason:
        raise RuntimeError(reason)
    spec = AttentionSpec(
        n_heads=N_HEADS, n_kv_heads=N_HEADS, head_dim=HEAD_DIM, doc_lens=(tuple(lens),),
        alibi_slopes=alibi_slopes(N_HEADS) if alibi else None,
    )
    return "BTNH", lambda q, k, v: backend.attend(q, k, v, spec)


def xformers_method(lens):
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask

    bias = BlockDiagonalCausalMask.from_seqlens(lens)
    return "BTNH", lambda q, k, v: xops.memory_efficient_attention(q, k, v, attn_bias=bias)


def flex_method(lens, alibi: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))

    def doc_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(doc_causal, None, None, T, T, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    if not alibi:
        return "BNTH", lambda q, k, v: compiled(q, k, v, block_mask=block_mask)
    from ablate.kernels.spec import alibi_slopes

    slopes = alibi_slopes(N_HEADS).cuda()

    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    return "BNTH", lambda q, k, v: compiled(q, k, v, score_mod=alibi_mod, block_mask=block_mask)


def varlen_method(lens):
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.varlen") from err
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device="cuda")
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        causal = {"is_causal": True}
    elif "window_size" in params:
        causal = {"window_size": (-1, 0)}
    else:
        raise RuntimeError(f"varlen_attn{inspect.signature(varlen_attn)}: no causal argument")
    longest = max(lens)
    return "TNH", lambda q, k, v: varlen_attn(q, k, v, cu, cu, longest, longest, **causal)


# ------------------------------------------------------------------------------------ driver


def as_layout(x_BTNH: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNTH":
        return x_BTNH.transpose(1, 2).contiguous()
    if layout == "TNH":
        return x_BTNH[0].contiguous()
    return x_BTNH


def back_to_BTNH(o: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNTH":
        return o.transpose(1, 2)
    if layout == "TNH":
        return o[None]
    return o


def run_one(name, make, tensors, iters, flops, reference, profiled=()):
    q, k, v, do = tensors
    try:
        layout, attn = make()
        args = [as_layout(x, layout) for x in (q, k, v)]
        o = back_to_BTNH(attn(*args), layout).float()
        diff = (o - reference).abs().max().item() if reference is not None else 0.0
        fwd, fwd_bwd = fwd_and_fwd_bwd(attn, *args, as_layout(do, layout))
        (ms_f, host_f), (ms_fb, host_fb) = timed(fwd, iters), timed(fwd_bwd, iters)
        if name in profiled:
            profile(name, fwd_bwd)
    except Exception as err:  # noqa: BLE001 - one missing method must not end the comparison
        print(f"  {name:<22} unavailable: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
        return None, None
    tf, tfb = flops / ms_f / 1e9, FWD_BWD_FACTOR * flops / ms_fb / 1e9
    print(
        f"  {name:<22} fwd {ms_f:6.3f} ms {tf:6.1f} TFLOP/s | fwd+bwd {ms_fb:6.3f} ms {tfb:6.1f} TFLOP/s"
        f" | host {host_f:.3f}/{host_fb:.3f} ms | max|o-ref| {diff:.3g}"
    )
    return (tf, tfb), o


def cudnn_layout_sweep(lens, tensors, iters, flops) -> None:
    import ablate.kernels.cudnn as cb

    saved = cb.SEQ_BUCKETS, cb.doc_bucket
    try:
        for seq_buckets in (False, True):
            for exact in (False, True):
                cb.SEQ_BUCKETS = seq_buckets
                cb.doc_bucket = (lambda n: n) if exact else saved[1]
                name = f"cudnn S={'pow2' if seq_buckets else 'T'} docs={'exact' if exact else 'bucket'}"
                run_one(name, lambda: cudnn_method(lens, False), tensors, iters, flops, None)
    finally:
        cb.SEQ_BUCKETS, cb.doc_bucket = saved
    for key, plan in cb._GRAPHS.items():
        shape = key[2]
        print(f"  graph {key[0]} stats={key[1]} docs={shape.docs} S={shape.seq} alibi={shape.alibi}: workspace {plan.workspace / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--sweep", action="store_true", help="time cudnn under the four static layouts")
    parser.add_argument("--profile", nargs="*", default=[], help="method names to profile, e.g. cudnn xformers")
    args = parser.parse_args()
    import os

    os.environ.setdefault("XFORMERS_IGNORE_FLASH_VERSION_CHECK", "1")
    lens = doc_lengths()
    flops = fwd_flops(lens)
    print(f"date {datetime.date.today()} | {torch.cuda.get_device_name()} | torch {torch.__version__}")
    try:
        import cudnn

        print(f"cudnn frontend {cudnn.__version__}, backend {cudnn.backend_version_string()}")
    except Exception as err:  # noqa: BLE001
        print(f"cudnn frontend unavailable: {err}")
    print(f"T={T} in one row, {len(lens)} docs of {min(lens)}..{max(lens)} tokens, {N_HEADS} heads x {HEAD_DIM}, bf16")
    print(f"causal in-document fwd work {flops / 1e9:.1f} GFLOP; fwd+bwd counted as {FWD_BWD_FACTOR} x fwd")
    print("max|o-ref|: against the cudnn output of the same problem (bf16 outputs)")

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, T, N_HEADS, HEAD_DIM, device="cuda", generator=g, dtype=DTYPE) for _ in range(4))
    tensors = (q, k, v, do)

    # flex last: its compilation is the slow part of the run
    results: dict[str, tuple] = {}
    print("packed causal:")
    results["cudnn"], ref = run_one("cudnn", lambda: cudnn_method(lens, False), tensors, args.iters, flops, None, args.profile)
    results["xformers"] = run_one("xformers", lambda: xformers_method(lens), tensors, args.iters, flops, ref, args.profile)[0]
    results["varlen"] = run_one("torch varlen_attn", lambda: varlen_method(lens), tensors, args.iters, flops, ref, args.profile)[0]
    print("packed ALiBi (causal):")
    results["cudnn alibi"], ref_alibi = run_one("cudnn alibi", lambda: cudnn_method(lens, True), tensors, args.iters, flops, None, args.profile)
    print("packed causal, flex:")
    results["flex"] = run_one("flex (compiled)", lambda: flex_method(lens, False), tensors, args.iters, flops, ref, args.profile)[0]
    print("packed ALiBi (causal), flex:")
    results["flex alibi"] = run_one("flex alibi (compiled)", lambda: flex_method(lens, True), tensors, args.iters, flops, ref_alibi, args.profile)[0]

    if args.sweep:
        print("cudnn static layouts:")
        cudnn_layout_sweep(lens, tensors, args.iters, flops)

    print("ratios (cudnn / other, TFLOP/s):")
    for mine, other in (("cudnn", "xformers"), ("cudnn", "varlen"), ("cudnn", "flex"), ("cudnn alibi", "flex alibi")):
        a, b = results.get(mine), results.get(other)
        if a and b:
            print(f"  {mine:<11} / {other:<10} fwd {a[0] / b[0]:.2f}x | fwd+bwd {a[1] / b[1]:.2f}x")


if __name__ == "__main__":
    main()
