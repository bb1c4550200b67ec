"""Throughput, model FLOPs utilisation and memory, measured in one place.

FLOPs of a training step: 6 per weight and token for the matmuls (`matmul_params`: every linear
layer, the output head included), plus 12 * L * (N * H) per attended (query, key) pair for
attention (QK^T and PV cost 2 FLOPs per pair and channel each forward, the backward twice that).
Attended pairs are counted on each batch's real documents, so document masking is credited with
the work it skips. MFU divides the achieved FLOP/s by the GPU's dense bf16 peak from its datasheet
(`PEAK_BF16`, e.g. 989 TFLOP/s for an H100/H200 SXM); the matmul peak measured on the machine
(`measure_matmul_peak`) is lower, and benchmarks report both.
"""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

# dense bf16 peak, FLOP/s, by device name fragment (datasheet figures, no sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


@dataclass(frozen=True)
class FlopModel:
    matmul_params: int  # weights that multiply each token once (linear layers, head included)
    n_layers: int
    attn_width: int  # N * H: channels of QK^T and PV

    def flops(self, tokens: int, pairs: int) -> float:
        """Training (forward + backward) FLOPs of `tokens` tokens attending over `pairs` pairs."""
        return 6.0 * self.matmul_params * tokens + 12.0 * self.n_layers * self.attn_width * pairs


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def measure_matmul_peak(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """FLOP/s of an n x n x n bf16 matmul on `device` (mean of `reps` after warm-up)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on a GPU, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


class Meter:
    """Tokens/s, MFU and memory between reads; time spent in `paused()` (evaluation, checkpoints)
    does not count. Totals over the whole run give the FLOPs per token actually trained."""

    def __init__(self, flops: FlopModel, device: torch.device):
        self.model, self.device, self.peak = flops, device, peak_flops(device)
        self.tokens = self.pairs = self.total_tokens = self.total_pairs = 0
        self.clock = time.perf_counter()

    def start(self) -> None:
        self.tokens = self.pairs = 0
        self.clock = time.perf_counter()

    def count(self, tokens: int, pairs: int) -> None:
        self.tokens += tokens
        self.pairs += pairs
        self.total_tokens += tokens
        self.total_pairs += pairs

    @contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.clock += time.perf_counter() - start

    def read(self) -> dict[str, float]:
        """Figures since the last read (the caller has just synchronised with the device)."""
        seconds = max(time.perf_counter() - self.clock, 1e-9)
        perf = {"perf/tokens_per_s": self.tokens / seconds, "perf/peak_mem_gib": peak_memory_gib(self.device)}
        if self.peak:
            perf["perf/mfu"] = self.model.flops(self.tokens, self.pairs) / seconds / self.peak
        self.start()
        return perf

    def flops_per_token(self) -> float:
        """Training FLOPs per token over every batch counted so far."""
        return self.model.flops(self.total_tokens, self.total_pairs) / max(self.total_tokens, 1)
