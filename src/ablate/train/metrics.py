"""Throughput, model FLOPs utilisation and memory, measured in one place."""
from __future__ import annotations

import resource
import sys

import torch

# dense bf16 peak, FLOP/s, by device name fragment
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def flops_per_token(n_params_non_embedding: int, n_layers: int, d_model: int, attended: float) -> float:
    """Training FLOPs per token: 6N for the weight matmuls, plus 12 * L * d * (keys each query attends
    to) for attention: QK^T and PV cost 2 FLOPs per attended key and channel each, forward, and the
    backward twice that. With causal masking over T keys this is PaLM's 12*L*d*T halved."""
    return 6 * n_params_non_embedding + 12 * n_layers * d_model * attended


def mean_attended_keys(doc_lens: tuple[tuple[int, ...], ...], window: int | None = None) -> float:
    """Average number of keys a query attends to under causal document masking (and a window)."""
    total = tokens = 0
    for row in doc_lens:
        for n in row:
            if window is None or window >= n:
                total += n * (n + 1) // 2
            else:
                total += window * (window + 1) // 2 + (n - window) * window
            tokens += n
    return total / max(tokens, 1)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on a GPU, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20
