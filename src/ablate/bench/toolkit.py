"""One toolkit for checking and timing attention kernels, shared by the tests, the tour and the
benchmarks: the reference comparison and its tolerances, a timer, the FLOP count of attended work,
and the document-length generator.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ablate.kernels import AttentionSpec, DocLens, attended_pairs, get_backend

# max |out - ref| / max |ref| allowed against the float32 eager reference, by input dtype
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
CUDA_FP32_TOLERANCE = 2e-3  # TF32 and fused-kernel accumulation orders on CUDA


def tolerance(dtype: torch.dtype, device: str | torch.device) -> float:
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        return CUDA_FP32_TOLERANCE
    return TOLERANCE[dtype]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


@dataclass
class Comparison:
    """Relative errors of a backend against the eager reference: output, then dq, dk, dv."""

    errors: dict[str, float]
    tol: float

    @property
    def ok(self) -> bool:
        return all(e < self.tol for e in self.errors.values())

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.2e}" for k, v in self.errors.items()) + f" (tolerance {self.tol:.0e})"


def run_attention(backend_name: str, spec: AttentionSpec, qkv: list[torch.Tensor], doc_lens: DocLens | None,
                  grad_out: torch.Tensor | None):
    """Output and q/k/v gradients (None without `grad_out`) of one backend, on fresh leaf copies."""
    q, k, v = (t.detach().clone().requires_grad_(grad_out is not None) for t in qkv)
    out = get_backend(backend_name)(q, k, v, spec, doc_lens)
    if grad_out is None:
        return out, None
    out.backward(grad_out)
    return out, (q.grad, k.grad, v.grad)


def compare_to_reference(backend_name: str, spec: AttentionSpec, doc_lens: DocLens | None, n_rows: int,
                         row_len: int, dtype: torch.dtype, device: str, backward: bool, seed: int = 0) -> Comparison:
    """`backend_name` against the float32 eager reference on fresh random inputs, forward (and backward)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(n_rows, row_len, n, spec.head_dim) for n in (spec.n_heads, spec.n_kv_heads, spec.n_kv_heads)]
    qkv = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grad_out = torch.randn(shapes[0], generator=gen).to(device=device, dtype=dtype) if backward else None
    out, grads = run_attention(backend_name, spec, qkv, doc_lens, grad_out)
    ref, ref_grads = run_attention("eager", spec, qkv, doc_lens, grad_out)
    if out.dtype != dtype or out.shape != ref.shape:
        raise AssertionError(f"{backend_name} returned {out.dtype} {tuple(out.shape)}, expected {dtype} {tuple(ref.shape)}")
    errors = {"out": rel_err(out, ref)}
    for label, g, g_ref in zip(("dq", "dk", "dv"), grads or (), ref_grads or ()):
        errors[label] = rel_err(g, g_ref)
    return Comparison(errors, tolerance(dtype, device))


def time_ms(fn: Callable[[], object], device: str | torch.device, warmup: int = 3, reps: int = 10) -> tuple[float, int | None]:
    """(median milliseconds per call, peak bytes allocated during the timed calls on CUDA).
    CUDA calls are timed with events, each call on its own; CPU calls with the wall clock."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    return statistics.median(times), peak


def attention_flops(spec: AttentionSpec, doc_lens: DocLens | None, n_rows: int, row_len: int,
                    backward: bool) -> float:
    """FLOPs of the attended work only: 4 * N * H per (query, key) pair forward (QK^T and PV);
    forward + backward is 3.5x that (the backward's five matmuls to the forward's two)."""
    fwd = 4.0 * spec.n_heads * spec.head_dim * attended_pairs(spec, doc_lens, n_rows, row_len)
    return fwd * 3.5 if backward else fwd


def document_lengths(rng: np.random.Generator, total: int, mean: float, sigma: float = 1.0, low: int = 1,
                     high: int | None = None, dist: str = "lognormal") -> list[int]:
    """Document lengths summing to `total`: log-normal with the given mean (web-like text, heavy
    tailed) or uniform in [low, high]; clipped to [low, high]; the last one takes the remainder."""
    lens: list[int] = []
    left = total
    while left > 0:
        if dist == "lognormal":
            n = int(rng.lognormal(np.log(mean) - sigma**2 / 2, sigma))
        elif dist == "uniform":
            n = int(rng.integers(low, (high or 2 * int(mean)) + 1))
        else:
            raise ValueError(f"dist must be 'lognormal' or 'uniform', not '{dist}'")
        n = max(low, min(n, high or n, left))
        lens.append(n)
        left -= n
    return lens


def rows_of(lens: list[int], n_rows: int, row_len: int) -> DocLens:
    """Documents laid end to end and cut into rows: the pieces of each row (as the packer cuts them)."""
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    r, room = 0, row_len
    for n in lens:
        while n and r < n_rows:
            take = min(n, room)
            rows[r].append(take)
            n, room = n - take, room - take
            if room == 0:
                r, room = r + 1, row_len
    if r < n_rows:
        raise ValueError(f"{sum(lens)} tokens do not fill {n_rows} rows of {row_len}")
    return tuple(tuple(row) for row in rows)
