"""The tour's textbook attention, its sizes, and which kernels each section holds against the reference.

`vanilla_attention` is softmax(Q K^T / sqrt(H)) V with every (T, T) score in memory: what the eager
reference backend is checked against (section 1), and the baseline of the memory section. The
kernels themselves are compared with the eager reference by `ablate.bench.toolkit`, forward and
backward, within its tolerance for the inputs' dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from ablate.bench.toolkit import compare_to_reference, tolerance
from ablate.kernels import AttentionSpec, DocLens, get_backend, select_backend
from ablate.kernels.spec import is_packed
from ablate.tour.report import Tour


@dataclass(frozen=True)
class Shape:
    rows: int  # B
    length: int  # T
    heads: int  # N
    kv_heads: int  # K, for the GQA section
    head_dim: int  # H


SHAPES = {  # (device, quick)
    ("cuda", False): Shape(4, 2048, 16, 4, 64),
    ("cuda", True): Shape(2, 1024, 16, 4, 64),
    ("cpu", False): Shape(2, 256, 8, 2, 32),
    ("cpu", True): Shape(2, 128, 4, 2, 32),
}


def shape_for(tour: Tour) -> Shape:
    return SHAPES[(tour.device.type, tour.quick)]


def vanilla_attention(q_BTNH: torch.Tensor, k_BTNH: torch.Tensor, v_BTNH: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(H)) V, every score materialized: (B, N, T, T) scores, then (B, N, T, T)
    probabilities, both kept for the backward pass."""
    q_BNTH = q_BTNH.transpose(1, 2) * q_BTNH.shape[-1] ** -0.5
    scores_BNTT = q_BNTH @ k_BTNH.transpose(1, 2).transpose(-1, -2)
    return (torch.softmax(scores_BNTT, dim=-1) @ v_BTNH.transpose(1, 2)).transpose(1, 2)


class Kernel(NamedTuple):
    label: str  # metric prefix: xformers, auto
    backend: str
    shown: str
    backward: bool  # checked forward and backward, else forward only


def kernels(tour: Tour, spec: AttentionSpec, doc_lens: DocLens | None, dtype: torch.dtype) -> list[Kernel]:
    """xformers where it serves this attention (forward only where it has no backward op; else one
    line saying why it is skipped), then the backend `auto` picks (tagged on the run)."""
    cell = spec.cell(tour.device, dtype, backward=True, packed=is_packed(doc_lens))
    found = []
    xformers = get_backend("xformers")
    refused, no_backward = xformers.why_not(replace(cell, backward=False)), xformers.why_not(cell)
    if refused:
        tour.say(f"  xformers: skipped: {refused}")
    else:
        found.append(Kernel("xformers", "xformers", "xformers" + (" (forward only)" if no_backward else ""),
                            no_backward is None))
    auto = select_backend(cell, "auto")
    tour.tag(f"tour.{tour.key}.auto", auto.name)
    return found + [Kernel("auto", auto.name, f"auto ({auto.name})", True)]


def check_kernels(tour: Tour, spec: AttentionSpec, doc_lens: DocLens | None, rows: int, length: int,
                  dtype: torch.dtype, what: str, suffix: str = "") -> list[Kernel]:
    """Print the problem, then check each of `kernels(...)` against the eager reference."""
    name = str(dtype).replace("torch.", "")
    tour.say(f"  {what}, {name}: max|kernel - reference| / max|reference| within "
             f"{tolerance(dtype, tour.device):.0e} (float32 eager reference)")
    tour.param(f"shape.{name}", what)
    found = kernels(tour, spec, doc_lens, dtype)
    for k in found:
        comparison = compare_to_reference(k.backend, spec, doc_lens, rows, length, dtype, tour.device.type,
                                          k.backward)
        tour.compared(k.label + suffix, comparison, f"{k.shown} {suffix.strip('_')}".strip())
    return found
