"""The tour's plain attention, and the harness that holds the kernels up against it.

`vanilla_attention` is the textbook softmax(Q K^T / sqrt(H) + bias) V with every (T, T) score in
memory: the reference for correctness and the baseline for memory. A kernel under test is an `Impl`:
a name, a function (q_BTNH, k_BTKH, v_BTKH) -> o_BTNH, and whether it is checked with gradients.
`compare` runs the reference in float32 on the same (already rounded) inputs, then every Impl in
the inputs' dtype, and records one tolerance check for the output and one for the gradients.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from ablate.kernels import AttentionSpec, select_backend
from ablate.kernels.eager import EagerBackend
from ablate.tour.report import Tour

# relative tolerance: max |kernel - reference| / max |reference|, output and each gradient
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Shape:
    rows: int  # B
    length: int  # T
    heads: int  # N
    kv_heads: int  # K, for the GQA section
    head_dim: int  # H

    def describe(self, kv: bool = False) -> str:
        heads = f"N={self.heads}" + (f" K={self.kv_heads}" if kv else "")
        return f"B={self.rows} T={self.length} {heads} H={self.head_dim}"


SHAPES = {  # (device, quick)
    ("cuda", False): Shape(4, 2048, 16, 4, 64),
    ("cuda", True): Shape(2, 1024, 16, 4, 64),
    ("cpu", False): Shape(2, 256, 8, 2, 32),
    ("cpu", True): Shape(2, 128, 4, 2, 32),
}


def shape_for(tour: Tour) -> Shape:
    return SHAPES[(tour.device.type, tour.quick)]


@dataclass(frozen=True)
class Impl:
    name: str
    fn: AttendFn
    grads: bool = True  # checked forward and backward (else forward only)


def vanilla_attention(q_BTNH: torch.Tensor, k_BTNH: torch.Tensor, v_BTNH: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(H) + bias) V, every score materialized: (B, N, T, T) scores, then
    (B, N, T, T) probabilities, both kept for the backward pass. `bias` is additive and
    broadcasts to (B, N, T, T) (-inf where a key is masked)."""
    q_BNTH = q_BTNH.transpose(1, 2) * q_BTNH.shape[-1] ** -0.5
    scores_BNTT = q_BNTH @ k_BTNH.transpose(1, 2).transpose(-1, -2)
    if bias is not None:
        scores_BNTT = scores_BNTT + bias
    return (torch.softmax(scores_BNTT, dim=-1) @ v_BTNH.transpose(1, 2)).transpose(1, 2)


def causal_bias(length: int, device: torch.device) -> torch.Tensor:
    """(T, T) additive causal mask: 0 on and below the diagonal, -inf above."""
    return torch.full((length, length), float("-inf"), device=device).triu(1)


def random_qkv(shape: Shape, dtype: torch.dtype, device: torch.device, kv_heads: int | None = None,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, T, N, H), k and v (B, T, K, H) with K = kv_heads (default N), in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    B, T, N, H = shape.rows, shape.length, shape.heads, shape.head_dim
    K = kv_heads or N
    q, k, v = (torch.randn(B, T, heads, H, generator=gen) for heads in (N, K, K))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def project_impls(tour: Tour, spec: AttentionSpec, dtype: torch.dtype) -> list[Impl]:
    """The project's eager reference and the backend `auto` picks for this spec (fwd+bwd)."""
    auto = select_backend(spec.cell(tour.device, dtype, backward=True), "auto")
    tour.tag(f"tour.{tour.key}.auto", auto.name)
    eager = EagerBackend()
    return [
        Impl("eager", lambda q, k, v: eager.attend(q, k, v, replace(spec, cache={}))),
        Impl(f"auto ({auto.name})", lambda q, k, v: auto.attend(q, k, v, replace(spec, cache={}))),
    ]


def with_xformers(tour: Tour, what: str, make: Callable[..., Impl], impls: list[Impl]) -> list[Impl]:
    """`impls` with the xformers Impl `make(xf)` in front, or a one-line skip where it cannot run."""
    xf = tour.xformers(what)
    return ([make(xf)] if xf is not None else []) + impls


def _run(fn: AttendFn, inputs: Sequence[torch.Tensor], grad_out: torch.Tensor,
         grads: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_(grads) for t in inputs]
    if not grads:
        with torch.no_grad():
            return fn(*leaves), []
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def compare(tour: Tour, impls: Sequence[Impl], inputs: Sequence[torch.Tensor], reference: AttendFn,
            tol: float, suffix: str = "") -> dict[str, torch.Tensor]:
    """Check each Impl's output (and gradients) against `reference` run in float32; returns the
    outputs by Impl name, the reference under "reference"."""
    gen = torch.Generator().manual_seed(1)
    q = inputs[0]
    grad_out = torch.randn(q.shape, generator=gen).to(device=q.device, dtype=q.dtype)
    ref_out, ref_grads = _run(reference, [t.float() for t in inputs], grad_out.float(), True)
    outputs = {"reference": ref_out}
    for impl in impls:
        out, grads = _run(impl.fn, inputs, grad_out, impl.grads)
        label, shown = impl.name.split(" ")[0] + suffix, f"{impl.name} {suffix.strip('_')}".strip()
        tour.close(f"{label}_out", out, ref_out, tol, shown=shown)
        if impl.grads:
            tour.close(f"{label}_grad", grads, ref_grads, tol, shown=shown + " dq,dk,dv")
        outputs[impl.name] = out
    return outputs
