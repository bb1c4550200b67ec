"""Attention kernels side by side: `python -m ablate.bench.kernels [--quick] [--tracking-uri URI]`.

Times forward and forward+backward of every registered backend on each standard cell (dense
causal, packed causal, ALiBi causal, ALiBi packed, GQA, local window) in one run, and prints
TFLOP/s, the ratio to the best backend of the cell, peak memory (CUDA) and what auto picks.

FLOPs count only unmasked work: 4 * N * H per attended (query, key) pair forward (QK^T and PV),
3.5x that for forward+backward (backward is 5 matmuls to forward's 2). Attended pairs are exact:
a causal document of d tokens has d(d+1)/2, fewer under a window. Per-batch mask preparation
(built once per batch and shared by all layers) happens in warmup and is not timed.

Timing: CUDA events around each call, after warmup, median of the repetitions (wall clock on CPU).
With --tracking-uri (or MLFLOW_TRACKING_URI) one MLflow run gets metrics
`tflops/<cell>/<backend>/<fwd|fwdbwd>` (and `peak_mib/...`), the auto picks as tags and the
table as the text artifact kernel_bench.txt.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from dataclasses import dataclass, replace

import torch

from ablate.kernels import BACKENDS, AttentionSpec, KernelRefused, alibi_slopes, select_backend
from ablate.kernels import get_backend, standard_cells

PASSES = ("fwd", "fwdbwd")


@dataclass(frozen=True)
class Sizes:
    rows: int  # B for dense cells
    row_len: int  # T for dense cells
    packed_rows: int
    packed_len: int
    heads: int
    kv_heads: int  # for the GQA cell
    head_dim: int
    doc_min: int
    doc_max: int
    window: int
    warmup: int
    reps: int


SIZES = {  # (device, quick)
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


def doc_lens_for(rng: random.Random, n_rows: int, row_len: int, lo: int, hi: int):
    """Rows of documents with lengths drawn from [lo, hi]; the last one takes the remainder."""
    rows = []
    for _ in range(n_rows):
        lens, left = [], row_len
        while left > hi:
            lens.append(rng.randint(lo, hi))
            left -= lens[-1]
        rows.append(tuple(lens + [left]))
    return tuple(rows)


def make_spec(name: str, sizes: Sizes, rng: random.Random) -> tuple[AttentionSpec, int, int]:
    """The spec of a standard cell at these sizes, with its (B, T)."""
    packed = "packed" in name
    B, T = (sizes.packed_rows, sizes.packed_len) if packed else (sizes.rows, sizes.row_len)
    spec = AttentionSpec(
        n_heads=sizes.heads,
        n_kv_heads=sizes.kv_heads if name == "gqa" else sizes.heads,
        head_dim=sizes.head_dim,
        doc_lens=doc_lens_for(rng, B, T, sizes.doc_min, sizes.doc_max) if packed else None,
        alibi_slopes=alibi_slopes(sizes.heads) if "alibi" in name else None,
        window=sizes.window if name == "window" else None,
    )
    return spec, B, T


def causal_pairs(d: int, window: int | None) -> int:
    """Attended (i, j) pairs of a causal document of d tokens: sum over i of min(i + 1, window)."""
    w = d if window is None else min(window, d)
    return w * (w + 1) // 2 + (d - w) * w


def attended_pairs(spec: AttentionSpec, n_rows: int, row_len: int) -> int:
    total = 0
    for d in spec.flat_doc_lens(n_rows, row_len):
        one_sided = causal_pairs(d, spec.window)
        total += one_sided if spec.causal else 2 * one_sided - d
    return total


def time_ms(fn, warmup: int, reps: int, device: str) -> tuple[float, int | None]:
    """Median milliseconds of `fn()` after warmup, and peak CUDA bytes above what was allocated
    before the timed calls (inputs and the batch's cached masks, built during warmup)."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), torch.cuda.max_memory_allocated() - base
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), None


def run_one(backend, spec: AttentionSpec, B: int, T: int, sizes: Sizes, device: str,
            dtype: torch.dtype, pass_: str) -> tuple[float, int | None]:
    shape_q = (B, T, spec.n_heads, sizes.head_dim)
    shape_kv = (B, T, spec.n_kv_heads, sizes.head_dim)
    train = pass_ == "fwdbwd"
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=train)
               for shape in (shape_q, shape_kv, shape_kv))
    grad_out = torch.randn(shape_q, device=device, dtype=dtype)

    def step():
        if not train:
            with torch.no_grad():
                return backend.attend(q, k, v, spec)
        q.grad = k.grad = v.grad = None
        backend.attend(q, k, v, spec).backward(grad_out)

    return time_ms(step, sizes.warmup, sizes.reps, device)


def bench(device: str, dtype: torch.dtype, quick: bool, only: list[str] | None = None,
          seed: int = 0) -> tuple[list[Result], dict[tuple[str, str], str], Sizes]:
    """Every (cell, backend, pass); and auto's pick per (cell, pass)."""
    sizes = SIZES[(device, quick)]
    results, picks = [], {}
    names = only or BACKENDS.names()
    for pass_ in PASSES:
        cells = standard_cells(device, dtype, sizes.head_dim, backward=pass_ == "fwdbwd")
        for cell_name, cell in cells.items():
            try:
                picks[(cell_name, pass_)] = select_backend(cell, "auto").name
            except KernelRefused as err:
                picks[(cell_name, pass_)] = f"none ({err})"
            spec, B, T = make_spec(cell_name, sizes, random.Random(f"{seed}-{cell_name}"))
            flops = 4 * attended_pairs(spec, B, T) * spec.n_heads * sizes.head_dim
            flops *= 3.5 if pass_ == "fwdbwd" else 1.0
            for name in names:
                results.append(measure(name, cell, cell_name, pass_, spec, B, T, sizes, flops))
    add_ratios(results)
    return results, picks, sizes


def measure(name, cell, cell_name, pass_, spec, B, T, sizes, flops) -> Result:
    """One backend on one cell and pass. The backend gets its own copy of the spec, so the masks
    another backend cached for this batch neither help it nor count in its memory."""
    result = Result(cell_name, name, pass_)
    backend = get_backend(name)
    reason = backend.why_not(cell)
    if reason:
        result.note = f"refused: {reason}"
        return result
    try:
        result.ms, result.peak_bytes = run_one(backend, replace(spec, cache={}), B, T, sizes,
                                               cell.device, cell.dtype, pass_)
        result.tflops = flops / (result.ms * 1e-3) / 1e12
    except torch.OutOfMemoryError:
        result.note = "failed: out of memory"
    except Exception as err:  # noqa: BLE001 - one failing kernel must not stop the comparison
        first_line = (str(err).splitlines() or [""])[0][:160]
        result.note = f"failed: {type(err).__name__}: {first_line}"
    finally:
        if cell.device == "cuda":
            torch.cuda.empty_cache()
    return result


def add_ratios(results: list[Result]) -> None:
    best: dict[tuple[str, str], float] = {}
    for r in results:
        if r.tflops is not None:
            best[(r.cell, r.pass_)] = max(best.get((r.cell, r.pass_), 0.0), r.tflops)
    for r in results:
        if r.tflops is not None:
            r.ratio = r.tflops / best[(r.cell, r.pass_)]


def format_results(results: list[Result], picks: dict, header: str) -> str:
    lines = [header, ""]
    cols = (f"{'cell':<14} {'pass':<7} {'backend':<10} {'ms':>10} {'TFLOP/s':>9} {'x best':>7} "
            f"{'peak MiB':>9}")
    lines += [cols, "-" * len(cols)]
    for r in results:
        auto = " <- auto" if picks.get((r.cell, r.pass_)) == r.backend else ""
        if r.note:
            lines.append(f"{r.cell:<14} {r.pass_:<7} {r.backend:<10} {r.note}{auto}")
            continue
        peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}"
        lines.append(f"{r.cell:<14} {r.pass_:<7} {r.backend:<10} {r.ms:>10.3f} {r.tflops:>9.3f} "
                     f"{r.ratio:>7.2f} {peak:>9}{auto}")
    lines.append("")
    lines += [f"auto {cell} {p}: {name}" for (cell, p), name in picks.items()
              if name.startswith("none")]
    return "\n".join(lines)


def log_mlflow(uri: str, results: list[Result], picks: dict, table: str, params: dict) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("kernel-bench")
    with mlflow.start_run(run_name=f"kernels-{params['device']}-{params['dtype']}") as run:
        mlflow.log_params(params)
        metrics = {}
        for r in results:
            if r.tflops is not None:
                metrics[f"tflops/{r.cell}/{r.backend}/{r.pass_}"] = r.tflops
            if r.peak_bytes is not None:
                metrics[f"peak_mib/{r.cell}/{r.backend}/{r.pass_}"] = r.peak_bytes / 2**20
        mlflow.log_metrics(metrics)
        mlflow.set_tags({f"auto/{cell}/{p}": name[:250] for (cell, p), name in picks.items()})
        mlflow.log_text(table, "kernel_bench.txt")
        return run.info.run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ablate.bench.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--backends", nargs="*", help="default: every registered backend")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    results, picks, sizes = bench(args.device, dtype, args.quick, args.backends)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    header = (f"Attention kernels on {where}, {str(dtype).replace('torch.', '')}, torch "
              f"{torch.__version__}; {sizes}")
    if args.device == "cpu":
        header += "\n(CPU: a smoke test of every path; these timings say nothing about GPUs)"
    table = format_results(results, picks, header)
    print(table)
    if args.tracking_uri:
        params = {"device": args.device, "dtype": str(dtype).replace("torch.", ""),
                  "quick": args.quick, "torch": torch.__version__, **vars(sizes)}
        run_id = log_mlflow(args.tracking_uri, results, picks, table, params)
        print(f"\nlogged to MLflow run {run_id} at {args.tracking_uri}")
    else:
        print("\n(not logged to MLflow: pass --tracking-uri or set MLFLOW_TRACKING_URI)")


if __name__ == "__main__":
    main()
