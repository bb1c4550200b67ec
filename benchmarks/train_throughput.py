"""ablate's training step against a plain compiled PyTorch GPT trainer, side by side on one GPU.

    python benchmarks/train_throughput.py [--steps 10] [--rounds 4] [--cells a,b,c,a4,d,e]
                                          [--profile] [--logged b,c] [--tracking-uri sqlite:///bench.db]

(a) is a GPT-2-small trainer written here the way a researcher would write one (nanoGPT's shape:
learned positions, MHA, GELU MLP, LayerNorm without bias, tied head, vocabulary padded to 50304,
SDPA causal, bf16 autocast, fused AdamW, torch.compile), with no packing and no document masking.
ablate's cells run the step `python run.py` runs (`ablate.experiment.build_run`, then
`trainer.train_step()`), at the same shape:
    b   one document per row (documents of exactly T tokens)
    c   web-like documents (log-normal lengths, mean ~650 tokens) packed, document masking on
    d   the same documents at context 4096, against a4 = (a) at context 4096
    e   the Llama cell: GQA (4 K/V heads) + RoPE + SwiGLU + RMSNorm, one document per row
Tokens are random ids in uint16 shards made here with numpy (GPT-2's vocabulary, <|endoftext|>
between documents). Every cell is compiled and warmed up first; then each round times every cell
for `--steps` steps in turn, and a cell's figure is the median over rounds. Before timing, each cell
steps on until no new cuDNN graph was built nor graph compiled for `--settle` steps (packed batches meet a few
new document-count and length buckets at first: a one-time cost per shape, which would otherwise land
in the timed steps of a short benchmark but not in a long run's); a timed block in which one was
still built is discarded and timed again (up to `--retime` times; the count is printed). MFU counts 6 FLOPs per
matmul weight and token plus the attention work actually done (12 * L * d per attended pair), over
the bf16 matmul peak measured in the same run (and over the datasheet peak, which `perf/mfu` of a
run uses). Peak memory is each cell's own: the allocator's peak during its steps, less what the
other cells hold. Ratios are to (a) at the same context.

`--logged b,c` then trains each named cell with `python run.py` itself (same overrides, a fresh
process, an MLflow store in a temporary folder) and compares the `perf/tokens_per_s` and
`perf/mfu` the run logged (median of its readings after the first, which holds the compile) with
the figures measured here.
"""
from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ablate.bench.toolkit import document_lengths
from ablate.config import compose
from ablate.data import write_shard
from ablate.experiment import build_run
from ablate.train.metrics import FlopModel, measure_matmul_peak, peak_flops

VOCAB, EOT, PADDED_VOCAB = 50257, 50256, 50304
GPT2 = ["model=gpt2_124m", "pos=learned", "norm=layernorm", "mlp=gelu", "attention=mha"]
LLAMA = ["model=gpt2_124m", "pos=rope", "norm=rmsnorm", "mlp=swiglu", "attention=gqa", "attention.n_kv_heads=4"]
MEAN_DOC = 650


# ---- (a): the plain trainer


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, context: int, layers: int = 12, d: int = 768, heads: int = 12):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(PADDED_VOCAB, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, PADDED_VOCAB, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


# ---- cells


@dataclass
class Cell:
    name: str
    context: int
    baseline: str | None  # the cell it is compared with
    step: object = None  # () -> None: one optimizer step (no sync)
    tokens_per_step: int = 0
    flops_per_step: float = 0.0
    persistent: int = 0  # bytes of its parameters and optimizer state
    rates: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    note: str = ""


def tensor_bytes(tensors) -> int:  # noqa: ANN001
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(state.values()) for state in opt.state.values())


SHAPES = {"gpt2": (12, 768, 12), "tiny": (2, 64, 4)}  # layers, width, heads (tiny: a CPU smoke test)


def plain_cell(name: str, context: int, batch: int, device: torch.device, shape: str) -> Cell:
    layers, d, heads = SHAPES[shape]
    model = GPT(context, layers, d, heads).to(device)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    compiled = torch.compile(model)
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        idx = torch.randint(0, VOCAB, (batch, context + 1), device=device, generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = compiled(idx[:, :-1], idx[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    flops = FlopModel(matmul, layers, d).flops(batch * context, batch * context * (context + 1) // 2)
    cell = Cell(name, context, None, step, batch * context, flops)
    cell.persistent_of = lambda: tensor_bytes(model.parameters()) + optimizer_bytes(opt)  # type: ignore[attr-defined]
    return cell


def ablate_cell(name: str, overrides: list[str], shards: Path, context: int, batch: int, baseline: str,
                device: torch.device, shape: str) -> Cell:
    layers, d, heads = SHAPES[shape]
    run_overrides = [*overrides, f"model.n_layers={layers}", f"model.d_model={d}", f"model.n_heads={heads}",
                     "data=tokens", f"data.path={shards}", "data.max_val_batches=1", f"model.context={context}",
                     f"train.batch_size={batch}", "train.compile=true", "train.progress=false", f"device={device.type}"]
    built = build_run(compose([*run_overrides, "tracking=none", "train.steps=1000000"]))
    trainer = built.trainer
    built.model.train()
    counts = {"tokens": 0, "pairs": 0}

    def step() -> None:
        _, _, b = trainer.train_step(lr=3e-4)
        counts["tokens"] += b.n_tokens
        counts["pairs"] += b.pairs

    cell = Cell(name, context, baseline, step, batch * context)
    cell.counts, cell.flop_model = counts, built.flops  # type: ignore[attr-defined]
    cell.persistent_of = lambda: tensor_bytes(built.model.parameters()) + optimizer_bytes(trainer.optimizer)  # type: ignore[attr-defined]
    cell.note = f"backend={built.plan.backend.name}"
    cell.run_overrides = run_overrides  # type: ignore[attr-defined]
    return cell


def logged_figures(cell: Cell, steps: int, folder: Path) -> dict[str, float]:
    """Train `cell` with `python run.py` (its overrides, `steps` steps) and read back the median of
    the perf/ metrics the run logged, the first reading (compile, warm-up) left out."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{folder / f'logged_{cell.name}.db'}"
    command = [sys.executable, str(Path(__file__).resolve().parents[1] / "run.py"), *cell.run_overrides,  # type: ignore[attr-defined]
               f"tracking.uri={uri}", "tracking.experiment=train_throughput_logged", f"train.steps={steps}",
               "train.log_every=10", "eval.context_multiples=[1]", "eval.sample_tokens=1"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=folder)
    if done.returncode:
        raise RuntimeError(f"python run.py for cell {cell.name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("train_throughput_logged").experiment_id])  # its own store
    out = {}
    for key in ("perf/tokens_per_s", "perf/mfu"):
        values = [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        if len(values) > 1:
            out[key] = statistics.median(values[1:])
    return out


def make_shards(folder: Path, kind: str, context: int, tokens: int, seed: int) -> Path:
    """uint16 shards of random ids: documents of exactly `context` tokens ('rows'), or log-normal
    lengths with mean MEAN_DOC ('web'); each ends with <|endoftext|>."""
    rng = np.random.default_rng(seed)
    if kind == "rows":
        lens = [context] * (tokens // context)
    else:
        lens = document_lengths(rng, tokens, MEAN_DOC, sigma=1.0, low=2)
    ids = rng.integers(0, EOT, size=sum(lens), dtype=np.int64)
    ids[np.cumsum(lens) - 1] = EOT
    out = folder / f"{kind}{context}"
    write_shard(out / "bench_train_000.bin", ids)
    write_shard(out / "bench_val_000.bin", ids[: 4 * context])
    return out


# ---- timing


def graph_builds() -> int:
    """cuDNN graphs built and graphs compiled so far in this process (each costs host time once per shape)."""
    from torch._dynamo.utils import counters

    from ablate.kernels.cudnn_graphs import graph_builds as builds

    return builds() + counters["stats"]["unique_graphs"]


def settle(cell: Cell, quiet_steps: int, device: torch.device, limit: int = 200) -> str:
    """Step until `quiet_steps` steps in a row build no new kernel graph: a run's steady state, which
    a long run reaches within its first steps (the document-count and length buckets are few)."""
    quiet = steps = 0
    while quiet < quiet_steps and steps < limit:
        before = graph_builds()
        cell.step()
        steps += 1
        quiet = quiet + 1 if graph_builds() == before else 0
    synchronize(device)
    return f"settled after {steps} more steps, {graph_builds()} cuDNN and compiled graphs so far"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(cell: Cell, steps: int, device: torch.device) -> None:
    cuda = device.type == "cuda"
    synchronize(device)
    held = torch.cuda.memory_allocated(device) - cell.persistent_of() if cuda else 0  # type: ignore[attr-defined]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    if hasattr(cell, "counts"):
        cell.counts.update(tokens=0, pairs=0)  # type: ignore[attr-defined]
    start = time.perf_counter()
    for _ in range(steps):
        cell.step()
    synchronize(device)
    seconds = time.perf_counter() - start
    cell.peaks.append(torch.cuda.max_memory_allocated(device) - held if cuda else 0)
    if hasattr(cell, "counts"):  # ablate: the tokens and attended pairs its batches really held
        counts = cell.counts  # type: ignore[attr-defined]
        cell.tokens_per_step = counts["tokens"] // steps
        cell.flops_per_step = cell.flop_model.flops(counts["tokens"], counts["pairs"]) / steps  # type: ignore[attr-defined]
    cell.rates.append(cell.tokens_per_step * steps / seconds)


# by name, first match wins: attention kernels (cuDNN's are named sm90_..., like matmuls) come first
KERNEL_CLASSES = [("attention", ("flash", "fmha", "attention", "sdpa", "flex", "cudnn_generated")),
                  ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "matmul", "sm90")),
                  ("optimizer", ("adam", "multi_tensor")),
                  ("memcpy/memset", ("memcpy", "memset")),
                  ("fused elementwise/reductions (triton)", ("triton",))]


def profile(cell: Cell, steps: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Milliseconds per step by kernel class on the GPU, the host's share (wall time not covered by
    GPU work), and the ten costliest kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            cell.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1e3 / steps
    out = {name: 0.0 for name, _ in KERNEL_CLASSES} | {"other kernels": 0.0}
    kernels = []
    for evt in prof.key_averages():
        gpu_us = getattr(evt, "device_time_total", 0) or getattr(evt, "cuda_time_total", 0)
        if not gpu_us or evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        key = evt.key.lower()
        kind = next((n for n, pats in KERNEL_CLASSES if any(p in key for p in pats)), "other kernels")
        out[kind] += gpu_us / 1e3 / steps
        kernels.append((evt.key[:90], gpu_us / 1e3 / steps))
    out["idle (host, data, launch)"] = max(0.0, wall - sum(out.values()))
    out["wall"] = wall
    return out, sorted(kernels, key=lambda kv: -kv[1])[:10]


CELLS = ("a", "b", "c", "e", "a4", "d")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/train_throughput.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per cell per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=6, help="steps per cell before timing (compiles)")
    parser.add_argument("--settle", type=int, default=10, help="after warm-up, step until no kernel graph was built "
                        "for this many steps in a row (packed batches meet new cuDNN graph shapes at first)")
    parser.add_argument("--retime", type=int, default=3, help="times a block in which a kernel graph was built "
                        "(a one-time cost) may be discarded and timed again")
    parser.add_argument("--cells", default="a,b,c,e,a4,d")
    parser.add_argument("--batch", type=int, default=32, help="rows per step at the base context (a quarter at 4x)")
    parser.add_argument("--context", type=int, default=1024, help="the base context; cells a4 and d run at 4x")
    parser.add_argument("--profile", action="store_true", help="also print GPU time per kernel class")
    parser.add_argument("--logged", default="", help="ablate cells to also train with python run.py, comparing "
                        "the perf/ metrics the run logs with this benchmark's figures")
    parser.add_argument("--logged-steps", type=int, default=80)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script itself (with --shape tiny)")
    parser.add_argument("--shape", default="gpt2", choices=sorted(SHAPES))
    args = parser.parse_args(argv)
    wanted = args.cells.split(",")
    unknown = [name for name in wanted if name not in CELLS]
    if unknown:
        parser.error(f"--cells: unknown cell(s) {', '.join(unknown)}; choose from {', '.join(CELLS)}")
    not_ablate = [name for name in filter(None, args.logged.split(",")) if name not in wanted or name.startswith("a")]
    if not_ablate:
        parser.error(f"--logged: {', '.join(not_ablate)} is not one of ablate's cells in --cells "
                     f"({', '.join(n for n in wanted if not n.startswith('a')) or 'none'}); it trains them with run.py")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible; on CPU, --device cpu --shape tiny smoke-tests the script")
    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="ablate-bench-"))
    b1, b4 = args.batch, max(1, args.batch // 4)
    c1, c4 = args.context, 4 * args.context
    tokens = (args.warmup + args.steps * (args.rounds + 1) + 20) * b1 * c1
    shards = {kind_ctx: make_shards(tmp, *kind_ctx, tokens=tokens, seed=i)
              for i, kind_ctx in enumerate([("rows", c1), ("web", c1), ("web", c4)])}
    makers = {
        "a": lambda: plain_cell("a", c1, b1, device, args.shape),
        "b": lambda: ablate_cell("b", GPT2, shards[("rows", c1)], c1, b1, "a", device, args.shape),
        "c": lambda: ablate_cell("c", GPT2, shards[("web", c1)], c1, b1, "a", device, args.shape),
        "e": lambda: ablate_cell("e", LLAMA, shards[("rows", c1)], c1, b1, "a", device, args.shape),
        "a4": lambda: plain_cell("a4", c4, b4, device, args.shape),
        "d": lambda: ablate_cell("d", GPT2, shards[("web", c4)], c4, b4, "a4", device, args.shape),
    }
    cells = []
    for name in wanted:
        t0 = time.perf_counter()
        cell = makers[name]()
        for _ in range(args.warmup):
            cell.step()
        settled = settle(cell, args.settle, device)
        print(f"cell {name}: built, compiled and warmed up in {time.perf_counter() - t0:.0f} s ({settled}) {cell.note}",
              flush=True)
        cells.append(cell)
    peak = measure_matmul_peak(device) if device.type == "cuda" else float("nan")
    retimed = kept = 0
    for _ in range(args.rounds):
        for cell in cells:
            for attempt in range(args.retime + 1):
                before = graph_builds()
                time_block(cell, args.steps, device)
                built = graph_builds() - before
                if not built:
                    break
                if attempt < args.retime:  # a one-time graph build landed in this block: time it again
                    cell.rates.pop()
                    cell.peaks.pop()
                    retimed += 1
                else:
                    kept += built
    table = report(cells, peak, peak_flops(device) or float("nan"), device)
    print(table)
    print(f"blocks timed again after a one-time cuDNN or compiled graph build: {retimed}; "
          f"graphs built in the blocks kept: {kept}", flush=True)
    if args.profile:
        for cell in cells:
            parts, top = profile(cell, 3)
            print(f"profile {cell.name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()), flush=True)
            print("\n".join(f"    {ms:6.2f} ms  {name}" for name, ms in top), flush=True)
    for name in filter(None, args.logged.split(",")):
        cell = next(c for c in cells if c.name == name)
        got = logged_figures(cell, args.logged_steps, tmp)
        rate, mfu_ds = cell.summary["tokens_per_s"], cell.summary["mfu_datasheet"]  # type: ignore[attr-defined]
        print(f"logged {name}: python run.py logged perf/tokens_per_s {got.get('perf/tokens_per_s', float('nan')):,.0f} "
              f"({got.get('perf/tokens_per_s', float('nan')) / rate:.3f} x the benchmark's {rate:,.0f}), perf/mfu "
              f"{got.get('perf/mfu', float('nan')):.1%} (benchmark's MFU(ds) {mfu_ds:.1%})", flush=True)
    if args.tracking_uri:
        log_mlflow(args.tracking_uri, cells, peak, table, vars(args))
    return 0


def report(cells: list[Cell], measured_peak: float, datasheet_peak: float, device: torch.device) -> str:
    by = {c.name: c for c in cells}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    head = (f"Training step on {name}, torch {torch.__version__}, bf16; bf16 matmul peak "
            f"measured {measured_peak / 1e12:.0f} TFLOP/s (datasheet {datasheet_peak / 1e12:.0f})")
    lines = [head, f"{'cell':<5}{'context':>8}{'tokens/s':>12}{'MFU':>7}{'MFU(ds)':>9}{'peak GiB':>10}"
                   f"{'x tok/s':>9}{'x mem':>7}  note", "-" * 80]
    for c in cells:
        rate = statistics.median(c.rates)
        flops_per_s = c.flops_per_step * rate / max(c.tokens_per_step, 1)
        base = by.get(c.baseline) if c.baseline else None
        ratio = f"{rate / statistics.median(base.rates):.3f}" if base else "-"
        mem = f"{max(c.peaks) / max(base.peaks):.3f}" if base and max(base.peaks) else "-"
        c.summary = {"tokens_per_s": rate, "mfu": flops_per_s / measured_peak, "mfu_datasheet": flops_per_s / datasheet_peak,  # type: ignore[attr-defined]
                     "peak_gib": max(c.peaks) / 2**30}
        lines.append(f"{c.name:<5}{c.context:>8}{rate:>12,.0f}{flops_per_s / measured_peak:>7.1%}"
                     f"{flops_per_s / datasheet_peak:>9.1%}{max(c.peaks) / 2**30:>10.2f}{ratio:>9}{mem:>7}  {c.note}")
    return "\n".join(lines)


def log_mlflow(uri: str, cells: list[Cell], peak: float, table: str, params: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("train_throughput") or client.get_experiment(
        client.create_experiment("train_throughput"))
    run = client.create_run(exp.experiment_id, run_name="train_throughput")
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value))
    client.log_metric(run.info.run_id, "matmul_peak_tflops", peak / 1e12)
    for c in cells:
        for key, value in c.summary.items():  # type: ignore[attr-defined]
            client.log_metric(run.info.run_id, f"{key}/{c.name}", value)
    client.log_text(run.info.run_id, table, "train_throughput.txt")
    client.set_terminated(run.info.run_id)


if __name__ == "__main__":
    sys.exit(main())
