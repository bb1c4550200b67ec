"""Section 2: time and memory of attention against sequence length, forward + backward.

Vanilla attention keeps (B, N, T, T) scores and probabilities for the backward pass, so its memory
grows as T^2 and it runs out of memory at some length; xformers and the backend `auto` picks keep
O(T) (the output and one log-sum-exp per query), so theirs grows as T. Two memory figures:
    saved  bytes autograd keeps for the backward pass beyond q, k, v (any device; counted through
           torch.autograd.graph.saved_tensors_hooks during one forward pass)
    peak   CUDA only: torch.cuda.max_memory_allocated over the timed steps, beyond what was
           allocated before them (inputs and gradients), reset between measurements
Time: median of the timed steps after warmup, CUDA events on a GPU (the benchmarks' timer).
An out-of-memory error is caught, memory freed, and the length marked OOM for that implementation
(and every longer one). `--mem-cap-gib` caps the process's CUDA memory to move that point.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ablate.bench.kernels import time_attention
from ablate.kernels import AttentionSpec, get_backend
from ablate.tour.attention import kernels, vanilla_attention
from ablate.tour.report import Tour


@dataclass(frozen=True)
class Scaling:
    rows: int
    heads: int
    head_dim: int
    lengths: tuple[int, ...]
    warmup: int
    reps: int


SCALING = {  # (device, quick); on a GPU vanilla's bf16 scores alone are B*N*T^2*2 bytes: 64 GiB at 16k
    ("cuda", False): Scaling(8, 16, 64, (512, 1024, 2048, 4096, 8192, 16384, 32768), 1, 3),
    ("cuda", True): Scaling(8, 16, 64, (512, 1024, 2048, 4096, 8192, 16384), 1, 2),
    ("cpu", False): Scaling(2, 8, 64, (256, 512, 1024, 2048), 1, 3),
    ("cpu", True): Scaling(1, 4, 32, (128, 256, 512, 1024), 1, 2),
}
MEMORY_EXPONENT_LIMIT = 1.2  # memory-efficient kernels: saved bytes ~ T^e with e at most this
LEFTOVER_MIB = 64.0  # CUDA memory still allocated after the section, beyond what it started with


@dataclass
class Point:
    ms: float | None = None
    peak: int | None = None
    saved: int | None = None
    oom: bool = False


def saved_bytes(fn: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the tensors autograd saves for backward while `fn` runs, inputs' storage excluded."""
    skip = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        # detached: a saved output packed as itself would hold its own grad_fn, a reference cycle
        # through C++ that Python's gc cannot break, and the graph (all its (T, T) tensors) would leak
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure(fn: Callable, spec: AttentionSpec, rows: int, length: int, dtype: torch.dtype,
            device: torch.device, s: Scaling) -> Point:
    """Forward + backward of `fn` on fresh (B, T, N, H) inputs: time, peak and saved bytes."""
    q, k, v = (torch.randn(rows, length, spec.n_heads, spec.head_dim, device=device, dtype=dtype,
                           requires_grad=True) for _ in range(3))
    saved = saved_bytes(lambda: fn(q, k, v), (q, k, v))
    del q, k, v  # the timer makes its own
    ms, peak = time_attention(fn, spec, rows, length, device.type, dtype, True, s.warmup, s.reps)
    return Point(ms=ms, peak=peak, saved=saved)


def attempt(*args) -> Point:  # noqa: ANN002
    """`measure(*args)`, or an OOM point after freeing what the failed attempt held."""
    try:
        return measure(*args)
    except torch.OutOfMemoryError:
        pass  # leave the except block first, so that its traceback (and tensors) can be freed
    gc.collect()
    torch.cuda.empty_cache()
    return Point(oom=True)


def _impls(tour: Tour, spec: AttentionSpec) -> dict[str, Callable]:
    """vanilla, then xformers (where it serves) and the backend auto picks, by label."""
    impls: dict[str, Callable] = {"vanilla": vanilla_attention}
    for k in kernels(tour, spec, None, tour.dtype):
        impls[k.shown] = lambda q_, k_, v_, b=get_backend(k.backend): b.attend(q_, k_, v_, spec)
    return impls


def _cap(tour: Tour) -> float | None:
    """Apply --mem-cap-gib (CUDA): the fraction of the device the process may take, or None."""
    cap = tour.options.get("mem_cap_gib")
    if not tour.cuda:
        return None
    total = torch.cuda.get_device_properties(tour.device).total_memory
    if cap is None:
        tour.say(f"  memory cap: none ({total / 2**30:.0f} GiB on the device)")
        return None
    fraction = min(1.0, cap * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, tour.device)
    tour.say(f"  memory cap: {cap:g} GiB of {total / 2**30:.0f} GiB")
    return fraction


def scaling(tour: Tour) -> None:
    """time and memory against sequence length: vanilla vs xformers vs auto, forward+backward"""
    s = SCALING[(tour.device.type, tour.quick)]
    max_len = tour.options.get("max_len") or max(s.lengths)
    lengths = [T for T in s.lengths if T <= max_len] or [min(s.lengths)]
    dtype = tour.dtype
    what = f"B={s.rows} N={s.heads} H={s.head_dim} {str(dtype).replace('torch.', '')}, non-causal, fwd+bwd"
    tour.say(f"  {what}, T = {', '.join(map(str, lengths))}")
    tour.param("shape", what)
    spec = AttentionSpec(s.heads, s.heads, s.head_dim, causal=False)
    impls = _impls(tour, spec)
    capped = _cap(tour)
    before = torch.cuda.memory_allocated(tour.device) if tour.cuda else 0
    results: dict[str, dict[int, Point]] = {name: {} for name in impls}
    try:
        for T in lengths:
            for name, fn in impls.items():
                if any(p.oom for p in results[name].values()):
                    results[name][T] = Point(oom=True)
                    continue
                results[name][T] = attempt(fn, spec, s.rows, T, dtype, tour.device, s)
                if tour.cuda:
                    torch.cuda.empty_cache()
    finally:
        if capped is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, tour.device)
    left = (torch.cuda.memory_allocated(tour.device) - before) / 2**20 if tour.cuda else 0.0
    _table(tour, results, lengths)
    _record(tour, results, s, dtype)
    if tour.cuda:  # every measurement, OOMs included, must give its memory back
        tour.check("leftover_mib", left, LEFTOVER_MIB, scaled=False, shown="CUDA memory left allocated",
                   text=f"{left:.1f} MiB")
    _plot(tour, results, what)


def _table(tour: Tour, results: dict[str, dict[int, Point]], lengths: list[int]) -> None:
    mem = "peak MiB" if tour.cuda else "saved MiB"
    tour.say(f"  {'T':>6}  " + "  ".join(f"{name + ' ms':>18} {mem:>10}" for name in results))
    for T in lengths:
        cells = []
        for points in results.values():
            p = points[T]
            value = p.peak if tour.cuda else p.saved
            cells.append(f"{'OOM':>18} {'':>10}" if p.oom else f"{p.ms:>18.2f} {value / 2**20:>10.1f}")
        tour.say(f"  {T:>6}  " + "  ".join(cells))
    tour.say(f"  ({mem}: " + ("torch.cuda.max_memory_allocated beyond inputs and gradients)"
                             if tour.cuda else "bytes kept for backward beyond q, k, v)"))


def exponent(points: dict[int, Point]) -> float | None:
    """e in saved bytes ~ T^e, a least-squares fit in log-log over the lengths that ran."""
    ok = [(T, p.saved) for T, p in points.items() if not p.oom and p.saved]
    if len(ok) < 2:
        return None
    x, y = np.log([T for T, _ in ok]), np.log([b for _, b in ok])
    return float(np.polyfit(x, y, 1)[0])


def _record(tour: Tour, results: dict[str, dict[int, Point]], s: Scaling, dtype: torch.dtype) -> None:
    for name, points in results.items():
        key = name.split(" ")[0]
        for T, p in points.items():
            if not p.oom:
                tour.metric(f"{key}_ms", p.ms, step=T)
                tour.metric(f"{key}_saved_mib", p.saved / 2**20, step=T)
                if p.peak is not None:
                    tour.metric(f"{key}_peak_mib", p.peak / 2**20, step=T)
        e = exponent(points)
        if e is None:
            continue
        if key == "vanilla":
            tour.say(f"  vanilla keeps ~T^{e:.2f} bytes for backward (its (T, T) probabilities)")
            tour.metric("vanilla_memory_exponent", e)
        else:
            tour.check(f"{key}_memory_exponent", e, MEMORY_EXPONENT_LIMIT, scaled=False,
                       shown=f"{name} memory ~ T^e", text=f"e = {e:.2f}")
    oom = [T for T, p in results["vanilla"].items() if p.oom]
    size = torch.tensor([], dtype=dtype).element_size()
    if oom:
        scores = s.rows * s.heads * oom[0] ** 2 * size / 2**30
        tour.say(f"  vanilla runs out of memory at T={oom[0]} (its scores alone take "
                 f"B*N*T^2*{size} bytes = {scores:.0f} GiB); the memory-efficient kernels go on")
    else:
        tour.say(f"  vanilla did not run out of memory up to T={max(results['vanilla'])}")
    tour.metric("vanilla_oom_len", oom[0] if oom else 0)


def _plot(tour: Tour, results: dict[str, dict[int, Point]], what: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    mem_label = "peak MiB beyond inputs" if tour.cuda else "MiB kept for backward"
    for name, points in results.items():
        ran = [(T, p) for T, p in points.items() if not p.oom]
        if not ran:
            continue
        xs = [T for T, _ in ran]
        mem = [(p.peak if tour.cuda else p.saved) / 2**20 for _, p in ran]
        axes[0].plot(xs, [p.ms for _, p in ran], marker="o", label=name)
        axes[1].plot(xs, [max(m, 1e-3) for m in mem], marker="o", label=name)
        oom = [T for T, p in points.items() if p.oom]
        if oom:
            for ax in axes:
                ax.axvline(oom[0], color="red", linestyle=":", linewidth=1)
                ax.text(oom[0], 0.95, f" {name} OOM", color="red", fontsize=8, va="top",
                        transform=ax.get_xaxis_transform())
    for ax, label in zip(axes, ["ms (forward + backward)", mem_label]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"attention against sequence length ({what})", fontsize=10)
    tour.figure(fig)
