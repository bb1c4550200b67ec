"""Packed rows: the cudnn backend (cuDNN's ragged SDPA) against the other packed-document kernels.

Packed causal attention: cudnn, xformers (BlockDiagonalCausalMask) and flex (document block mask),
each through the project's backend, and torch's varlen_attn on the same documents; then packed
causal ALiBi: cudnn against flex (an ALiBi score_mod). Then the ratios cudnn / other, and how far
each output is from cudnn's on the same inputs (max|o - o_cudnn| / max|o_cudnn|).

    python benchmarks/cudnn_packed.py [--profile cudnn xformers] [options of python -m ablate.bench.kernels]

This is `python -m ablate.bench.kernels` on its packed cells, with the same sizes (on CUDA: one row
of 32768 tokens, documents of 64..2048 tokens, 16 heads x 128, bf16; `--packed-len`, `--doc-max`,
... change them), timer, FLOP count and MLflow logging (--tracking-uri). --profile prints the
kernels that a method's forward+backward spends its device time in.
"""
from __future__ import annotations

import inspect
import os
from typing import Callable

import numpy as np
import torch

from ablate.bench.kernels import CELLS as ALL_CELLS
from ablate.bench.kernels import (
    PASSES,
    Result,
    add_ratios,
    backend_attend,
    bench,
    parser,
    problem,
    publish,
    settings,
    time_attention,
    timed,
)
from ablate.bench.toolkit import rel_err
from ablate.kernels import get_backend, standard_cells
from ablate.kernels.spec import flat_doc_lens

CELLS = ["packed_causal", "alibi_packed"]
BACKENDS = ["cudnn", "xformers", "flex"]
RATIOS = [("packed_causal", "xformers"), ("packed_causal", "varlen"), ("packed_causal", "flex"),
          ("alibi_packed", "flex")]
Attend = Callable[..., torch.Tensor]


def varlen_attend(doc_lens, B: int, T: int, device: str) -> Attend:  # noqa: ANN001
    """torch's varlen_attn over the batch's documents (causal), as attend(q_BTNH, k_BTKH, v_BTKH)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as err:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.varlen") from err
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        causal = {"is_causal": True}
    elif "window_size" in params:
        causal = {"window_size": (-1, 0)}
    else:
        raise RuntimeError(f"varlen_attn{inspect.signature(varlen_attn)}: no causal argument")
    lens = flat_doc_lens(doc_lens, B, T)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=device)

    def attend(q, k, v):  # noqa: ANN001, ANN202 - the rows flattened to one (B*T, heads, H) buffer
        flat = [t.reshape(B * T, *t.shape[2:]) for t in (q, k, v)]
        return varlen_attn(*flat, cu, cu, max(lens), max(lens), **causal).view(q.shape)

    return attend


def methods(cell_name: str, cell, names: list[str], sizes, seed: int):  # noqa: ANN001, ANN201
    """The cell's problem, and {method: a function that prepares its attend(q, k, v)}."""
    spec, doc_lens, B, T = problem(cell, sizes, seed)
    made = {name: (lambda name=name: backend_attend(name, spec, doc_lens, B, T, cell.device))
            for name in names if get_backend(name).why_not(cell) is None}
    if cell_name == "packed_causal":
        made["varlen"] = lambda: varlen_attend(doc_lens, B, T, cell.device)
    return (spec, doc_lens, B, T), made


def agreement(cell, problem_, made: dict[str, Callable[[], Attend]]) -> dict[str, float]:  # noqa: ANN001
    """max|o - o_cudnn| / max|o_cudnn| of every method's forward on the same inputs ({} without cudnn)."""
    spec, _, B, T = problem_
    gen = torch.Generator().manual_seed(0)
    qkv = [torch.randn((B, T, n, spec.head_dim), generator=gen).to(cell.device, cell.dtype)
           for n in (spec.n_heads, spec.n_kv_heads, spec.n_kv_heads)]
    outs = {}
    for name, make in made.items():
        try:
            with torch.no_grad():
                outs[name] = make()(*qkv)
        except Exception:  # noqa: BLE001 - the table already says why it failed
            continue
    ref = outs.pop("cudnn", None)
    return {} if ref is None else {name: rel_err(o, ref) for name, o in outs.items()}


def profile(name: str, make: Callable[[], Attend], problem_, cell) -> None:  # noqa: ANN001
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    spec, _, B, T = problem_
    attend = make()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_attention(attend, spec, B, T, cell.device, cell.dtype, True, warmup=1, reps=3)
    sort = "self_device_time_total" if hasattr(prof.key_averages()[0], "self_device_time_total") \
        else "self_cuda_time_total"
    print(f"--- profile: {name}, 4 x fwd+bwd ---\n{prof.key_averages().table(sort_by=sort, row_limit=14)}")


def main(argv: list[str] | None = None) -> list[Result]:
    p = parser()
    p.prog, p.description = "python benchmarks/cudnn_packed.py", __doc__
    p.set_defaults(backends=BACKENDS, cells=CELLS)
    p.add_argument("--profile", nargs="*", default=[], help="methods to profile, e.g. cudnn xformers varlen")
    args, sizes, dtype = settings(p, argv)
    args.cells = args.cells or CELLS
    os.environ.setdefault("XFORMERS_IGNORE_FLASH_VERSION_CHECK", "1")
    results, picks = bench(args.device, dtype, sizes, args.backends, args.cells, args.seed)
    for pass_ in PASSES if "packed_causal" in args.cells else ():
        cell = standard_cells(args.device, dtype, sizes.head_dim, backward=pass_ == "fwdbwd")["packed_causal"]
        problem_, made = methods("packed_causal", cell, [], sizes, args.seed)
        results.append(timed(Result("packed_causal", "varlen", pass_), made["varlen"], *problem_, cell, sizes))
    results.sort(key=lambda r: (PASSES.index(r.pass_), ALL_CELLS.index(r.cell)))
    add_ratios(results)
    publish(args, sizes, dtype, results, picks, name="cudnn-packed")

    tflops = {(r.cell, r.backend, r.pass_): r.tflops for r in results}
    print("\nratios (cudnn / other, TFLOP/s):")
    for cell_name, other in RATIOS:
        a, b = ([tflops.get((cell_name, name, p)) for p in PASSES] for name in ("cudnn", other))
        if all(a) and all(b):
            print(f"  {cell_name:<14} cudnn / {other:<9} fwd {a[0] / b[0]:.2f}x | fwd+bwd {a[1] / b[1]:.2f}x")
    for cell_name in args.cells:
        cell = standard_cells(args.device, dtype, sizes.head_dim, backward=True)[cell_name]
        problem_, made = methods(cell_name, cell, args.backends, sizes, args.seed)
        agree = agreement(cell, problem_, made)
        print(f"{cell_name}: max|o - o_cudnn| / max|o_cudnn| " + (", ".join(f"{n} {e:.1e}" for n, e in agree.items())
                                                                   or "(cudnn did not run)"))
        for name in (n for n in args.profile if n in made):
            if tflops.get((cell_name, name, "fwdbwd")) is None:
                print(f"  {name}: not profiled, it did not run forward+backward on {cell_name}")
            else:
                profile(f"{cell_name} {name}", made[name], problem_, cell)
    return results


if __name__ == "__main__":
    main()
