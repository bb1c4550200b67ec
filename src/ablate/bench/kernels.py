"""Attention kernels side by side: `python -m ablate.bench.kernels [--quick] [--tracking-uri URI]`.

Times forward and forward+backward of every registered backend on each standard cell (dense
causal, packed causal, ALiBi causal, ALiBi packed, GQA, local window) in one run, and prints
TFLOP/s, the ratio to the best backend of the cell, peak memory (CUDA) and what auto picks; a
backend that cannot serve a cell says why.

Each batch's document layout is prepared once, outside the timed region, as the training step does
(`backend.prepare`, then `.to(device)`); the timed call is `backend.attend`. The timer, the FLOP
count (attended pairs only, 4 * N * H per pair forward, 3.5x for forward+backward) and the packed
documents (lengths uniform in [doc_min, doc_max]) come from `ablate.bench.toolkit`.

Sizes are parameters: `--quick` picks the small preset, and each field of `Sizes` has its own
option (`--packed-len 8192 --reps 20`). With --tracking-uri (or MLFLOW_TRACKING_URI) one MLflow run
(experiment "kernel-bench") gets metrics `tflops/<cell>/<backend>/<fwd|fwdbwd>` (and
`peak_mib/...`), the auto picks as tags `auto/<cell>/<pass>` and the table as kernel_bench.txt.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

import numpy as np
import torch

from ablate.bench.toolkit import attention_flops, document_lengths, rows_of, time_ms
from ablate.kernels import BACKENDS, AttentionSpec, Cell, DocLens, KernelRefused, get_backend, select_backend
from ablate.kernels import standard_cells

PASSES = ("fwd", "fwdbwd")
CELLS = tuple(standard_cells("cpu", torch.float32, 64))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Sizes:
    rows: int  # B of the dense cells
    row_len: int  # T of the dense cells
    packed_rows: int  # B of the packed cells
    packed_len: int  # T of the packed cells
    heads: int
    kv_heads: int  # of the GQA cell
    head_dim: int
    doc_min: int  # packed documents: lengths uniform in [doc_min, doc_max]
    doc_max: int
    window: int  # of the window cell
    warmup: int
    reps: int

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < (0 if f.name == "warmup" else 1):
                raise ValueError(f"Sizes.{f.name}={getattr(self, f.name)} must be positive (warmup: >= 0)")
        if self.heads % self.kv_heads:
            raise ValueError(f"Sizes.kv_heads={self.kv_heads} must divide heads={self.heads}")
        if self.doc_min > self.doc_max:
            raise ValueError(f"Sizes.doc_min={self.doc_min} is above doc_max={self.doc_max}")


PRESETS = {  # (device, quick)
    ("cuda", False): Sizes(4, 8192, 1, 32768, 16, 4, 128, 64, 2048, 1024, 3, 10),
    ("cuda", True): Sizes(2, 2048, 1, 8192, 16, 4, 128, 64, 1024, 512, 2, 5),
    ("cpu", False): Sizes(2, 1024, 1, 2048, 8, 2, 64, 16, 512, 256, 1, 3),
    ("cpu", True): Sizes(2, 128, 1, 256, 4, 2, 32, 8, 64, 32, 2, 5),
}


@dataclass
class Result:
    cell: str
    backend: str
    pass_: str
    ms: float | None = None
    tflops: float | None = None
    peak_bytes: int | None = None
    note: str | None = None  # "refused: ..." or "failed: ..."
    ratio: float | None = None


def problem(cell: Cell, sizes: Sizes, seed: int = 0) -> tuple[AttentionSpec, DocLens | None, int, int]:
    """A standard cell at these sizes: its spec, its documents (None: one per row), B and T."""
    spec = AttentionSpec(sizes.heads, sizes.kv_heads if cell.gqa else sizes.heads, sizes.head_dim,
                         causal=cell.causal, window=sizes.window if cell.window else None, alibi=cell.alibi)
    if not cell.packed:
        return spec, None, sizes.rows, sizes.row_len
    B, T = sizes.packed_rows, sizes.packed_len
    lens = document_lengths(np.random.default_rng(seed), B * T, (sizes.doc_min + sizes.doc_max) / 2,
                            low=sizes.doc_min, high=sizes.doc_max, dist="uniform")
    return spec, rows_of(lens, B, T), B, T


def time_attention(attend: Callable[..., torch.Tensor], spec: AttentionSpec, B: int, T: int, device: str,
                   dtype: torch.dtype, backward: bool, warmup: int, reps: int) -> tuple[float, int | None]:
    """(median ms, peak CUDA bytes) of `attend(q_BTNH, k_BTKH, v_BTKH)` on random inputs, forward or
    forward+backward."""
    shapes = [(B, T, n, spec.head_dim) for n in (spec.n_heads, spec.n_kv_heads, spec.n_kv_heads)]
    q, k, v = (torch.randn(s, device=device, dtype=dtype, requires_grad=backward) for s in shapes)
    grad_out = torch.randn(shapes[0], device=device, dtype=dtype)

    def step() -> None:
        if not backward:
            with torch.no_grad():
                attend(q, k, v)
            return
        q.grad = k.grad = v.grad = None
        attend(q, k, v).backward(grad_out)

    return time_ms(step, device, warmup, reps)


def backend_attend(name: str, spec: AttentionSpec, doc_lens: DocLens | None, B: int, T: int,
                   device: str) -> Callable[..., torch.Tensor]:
    """`attend(q, k, v)` of a backend on this batch, its layout prepared (and moved) now, once."""
    backend = get_backend(name)
    layout = backend.prepare(spec, doc_lens, B, T)
    layout = layout.to(device) if layout is not None else None
    return lambda q, k, v: backend.attend(q, k, v, spec, layout)


def timed(result: Result, make_attend: Callable[[], Callable[..., torch.Tensor]], spec: AttentionSpec,
          doc_lens: DocLens | None, B: int, T: int, cell: Cell, sizes: Sizes) -> Result:
    """`result` with the time, TFLOP/s and peak memory of the function `make_attend()` returns, or
    with a note saying why it failed (preparation included)."""
    try:
        result.ms, result.peak_bytes = time_attention(make_attend(), spec, B, T, cell.device, cell.dtype,
                                                      cell.backward, sizes.warmup, sizes.reps)
        result.tflops = attention_flops(spec, doc_lens, B, T, cell.backward) / (result.ms * 1e-3) / 1e12
    except torch.OutOfMemoryError:
        result.note = "failed: out of memory"
    except Exception as err:  # noqa: BLE001 - one failing kernel must not stop the comparison
        result.note = f"failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
    finally:
        if cell.device == "cuda":
            torch.cuda.empty_cache()
    return result


def measure(name: str, cell_name: str, cell: Cell, spec: AttentionSpec, doc_lens: DocLens | None, B: int,
            T: int, sizes: Sizes) -> Result:
    """One backend on one cell and pass, or the reason it refuses the cell."""
    result = Result(cell_name, name, "fwdbwd" if cell.backward else "fwd")
    reason = get_backend(name).why_not(cell)
    if reason:
        result.note = f"refused: {reason}"
        return result
    return timed(result, lambda: backend_attend(name, spec, doc_lens, B, T, cell.device), spec, doc_lens, B, T,
                 cell, sizes)


def bench(device: str, dtype: torch.dtype, sizes: Sizes, backends: list[str] | None = None,
          cells: list[str] | None = None, seed: int = 0) -> tuple[list[Result], dict[tuple[str, str], str]]:
    """Every (cell, backend, pass), ratios filled in; and auto's pick per (cell, pass)."""
    names = backends or BACKENDS.names()
    unknown = [n for n in names if n not in BACKENDS] + [c for c in cells or () if c not in CELLS]
    if unknown:
        raise ValueError(f"unknown backend or cell {unknown}: backends are {BACKENDS.names()}, cells {list(CELLS)}")
    results, picks = [], {}
    for pass_ in PASSES:
        for cell_name, cell in standard_cells(device, dtype, sizes.head_dim, backward=pass_ == "fwdbwd").items():
            if cells and cell_name not in cells:
                continue
            try:
                picks[(cell_name, pass_)] = select_backend(cell, "auto").name
            except KernelRefused as err:
                picks[(cell_name, pass_)] = f"none ({err})"
            spec, doc_lens, B, T = problem(cell, sizes, seed)
            results += [measure(name, cell_name, cell, spec, doc_lens, B, T, sizes) for name in names]
    add_ratios(results)
    return results, picks


def add_ratios(results: list[Result]) -> None:
    best: dict[tuple[str, str], float] = {}
    for r in results:
        if r.tflops is not None:
            best[(r.cell, r.pass_)] = max(best.get((r.cell, r.pass_), 0.0), r.tflops)
    for r in results:
        if r.tflops is not None:
            r.ratio = r.tflops / best[(r.cell, r.pass_)]


def format_results(results: list[Result], picks: dict[tuple[str, str], str], header: str) -> str:
    cols = f"{'cell':<14} {'pass':<7} {'backend':<10} {'ms':>10} {'TFLOP/s':>9} {'x best':>7} {'peak MiB':>9}"
    lines = [header, "", cols, "-" * len(cols)]
    for r in results:
        auto = " <- auto" if picks.get((r.cell, r.pass_)) == r.backend else ""
        if r.note:
            lines.append(f"{r.cell:<14} {r.pass_:<7} {r.backend:<10} {r.note}{auto}")
            continue
        peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}"
        lines.append(f"{r.cell:<14} {r.pass_:<7} {r.backend:<10} {r.ms:>10.3f} {r.tflops:>9.3f} "
                     f"{r.ratio:>7.2f} {peak:>9}{auto}")
    lines.append("")
    lines += [f"auto {cell} {p}: {name}" for (cell, p), name in picks.items() if name.startswith("none")]
    return "\n".join(lines)


def log_mlflow(uri: str, results: list[Result], picks: dict[tuple[str, str], str], table: str,
               params: dict[str, object], name: str = "kernels") -> str:
    from ablate.tracking.mlflow import MlflowTracker

    tracker = MlflowTracker(uri, "kernel-bench", f"{name}-{params['device']}-{params['dtype']}",
                            {f"auto/{cell}/{p}": pick[:250] for (cell, p), pick in picks.items()})
    metrics = {}
    for r in results:
        if r.tflops is not None:
            metrics[f"tflops/{r.cell}/{r.backend}/{r.pass_}"] = r.tflops
        if r.peak_bytes is not None:
            metrics[f"peak_mib/{r.cell}/{r.backend}/{r.pass_}"] = r.peak_bytes / 2**20
    tracker.log_params({k: str(v) for k, v in params.items()})
    tracker.log_metrics(metrics, step=0)
    tracker.log_text(table, "kernel_bench.txt")
    tracker.finish("FINISHED")
    return tracker.run_id


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ablate.bench.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small preset (a CPU smoke test)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--backends", nargs="*", choices=BACKENDS.names(), help="default: every registered backend")
    p.add_argument("--cells", nargs="*", choices=CELLS, help="default: every standard cell")
    p.add_argument("--seed", type=int, default=0, help="seed of the packed cells' documents")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    for f in fields(Sizes):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=None, help="default: the preset's")
    return p


def sizes_from(args: argparse.Namespace) -> Sizes:
    """The preset of --device/--quick, with the fields given on the command line replaced."""
    given = {f.name: getattr(args, f.name) for f in fields(Sizes) if getattr(args, f.name) is not None}
    return replace(PRESETS[(args.device, args.quick)], **given)


def settings(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, Sizes, torch.dtype]:
    """The parsed options, the sizes and the dtype; bad input ends here, before any compute."""
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; use --device cpu")
    try:
        sizes = sizes_from(args)
    except ValueError as err:
        p.error(str(err))
    return args, sizes, DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]


def publish(args: argparse.Namespace, sizes: Sizes, dtype: torch.dtype, results: list[Result],
            picks: dict[tuple[str, str], str], name: str = "kernels") -> str:
    """Print the table, and log it to MLflow where --tracking-uri says; returns the table."""
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    header = f"Attention kernels on {where}, {str(dtype).replace('torch.', '')}, torch {torch.__version__}; {sizes}"
    if args.device == "cpu":
        header += "\n(CPU: a smoke test of every path; these timings say nothing about GPUs)"
    table = format_results(results, picks, header)
    print(table)
    if args.tracking_uri:
        params = {"device": args.device, "dtype": str(dtype).replace("torch.", ""), "quick": args.quick,
                  "seed": args.seed, "torch": torch.__version__, **asdict(sizes)}
        run_id = log_mlflow(args.tracking_uri, results, picks, table, params, name)
        print(f"\nlogged to MLflow run {run_id} at {args.tracking_uri}")
    else:
        print("\n(not logged to MLflow: pass --tracking-uri or set MLFLOW_TRACKING_URI)")
    return table


def main(argv: list[str] | None = None) -> list[Result]:
    args, sizes, dtype = settings(parser(), argv)
    results, picks = bench(args.device, dtype, sizes, args.backends, args.cells, args.seed)
    publish(args, sizes, dtype, results, picks)
    return results


if __name__ == "__main__":
    main()
