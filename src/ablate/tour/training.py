"""Section 7: a small GQA + RoPE + SwiGLU + RMSNorm language model trained on packed Shakespeare.

The run is built by `ablate.experiment.build_run` from a composed config, as `python run.py` builds
one; only its tracker is the tour's: metrics go to the tour's run under `tour/training/`.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch

from ablate.config import compose
from ablate.experiment import Built, build_run
from ablate.tracking.mlflow import Tracker
from ablate.tour.report import Tour

COMMON = ["attention=gqa", "pos=rope", "mlp=swiglu", "norm=rmsnorm", "data=shakespeare", "tracking=none",
          "train.progress=false", "train.log_every=10", "data.max_val_batches=2"]
SIZES = {  # (device, quick): layers, d_model, query heads, K/V heads, context, rows a batch, steps, lr
    ("cuda", False): (4, 512, 8, 2, 1024, 16, 300, 3e-3),
    ("cuda", True): (2, 256, 4, 2, 512, 16, 150, 5e-3),
    ("cpu", False): (2, 128, 4, 2, 256, 8, 200, 5e-3),
    ("cpu", True): (2, 64, 4, 2, 128, 8, 60, 1e-2),
}
LOSS_RATIO_LIMIT = 0.8  # mean train loss over the last tenth of the steps / the loss at step 0 (~ln vocab)


def built(tour: Tour) -> Built:
    """The section's run, built once (the packed section reads its corpus too)."""
    if "training" not in tour.shared:
        layers, d, heads, kv, context, rows, steps, lr = SIZES[(tour.device.type, tour.quick)]
        tour.shared["training"] = build_run(compose([
            *COMMON, f"device={tour.device.type}", f"model.n_layers={layers}", f"model.d_model={d}",
            f"model.n_heads={heads}", f"attention.n_kv_heads={kv}", f"model.context={context}",
            f"train.batch_size={rows}", f"train.steps={steps}", f"train.eval_every={steps // 2}",
            f"train.warmup_steps={steps // 10}", f"train.lr={lr}"]))
    return tour.shared["training"]


class SectionTracker(Tracker):
    """The trainer's tracker: metrics go to the tour's run as tour/<section>/<name> and are kept."""

    def __init__(self, tour: Tour):
        self.tour = tour
        self.series: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.series[name].append((step, float(value)))
            self.tour.metric(name, value, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.tour.tag(f"tour.{self.tour.key}.{key}", value)

    def flush(self) -> None:
        self.tour.tracker.flush()


def training(tour: Tour) -> None:
    """GQA + RoPE + SwiGLU + RMSNorm trained on packed Shakespeare: loss, tokens/s, memory"""
    run = built(tour)
    m, t, trainer = run.cfg.model, run.cfg.train, run.trainer
    what = (f"{m.n_layers} layers, d={m.d_model}, {m.n_heads} query / {run.cfg.attention.n_kv_heads} K/V heads, "
            f"{run.n_params / 1e6:.2f}M params; rows of {m.context} tokens x {t.batch_size}, {t.steps} steps, "
            f"lr {t.lr}; backend {run.plan.backend.name} ({str(run.plan.dtype).replace('torch.', '')}"
            f"{', compiled' if run.plan.compile else ''})")
    tour.say(f"  {what}")
    tour.say(f"  data: {run.data.stats['n_train_docs']} Shakespeare scenes, {run.data.stats['train_tokens']:,} "
             f"tokens ({run.data.tokenizer.name} tokenizer), documents packed end to end")
    tour.param("model", what)
    if tour.cuda:
        torch.cuda.reset_peak_memory_stats(tour.device)
    trainer.tracker = tracker = SectionTracker(tour)
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    losses = [v for _, v in tracker.series["train/loss"]]
    tenth = max(1, len(losses) // 10)
    first, last = losses[0], sum(losses[-tenth:]) / tenth
    tour.check("loss_ratio", last / first, LOSS_RATIO_LIMIT, scaled=False, shown="train loss, last tenth / step 0",
               text=f"{first:.3f} -> {last:.3f} (x{last / first:.2f})")
    perf = getattr(trainer, "last_perf", {})
    mfu = f", MFU {perf['perf/mfu']:.1%}" if "perf/mfu" in perf else ""
    nan = float("nan")
    tour.say(f"  val/loss {result.get('val/loss', nan):.3f}, val/bpb {result.get('val/bpb', nan):.3f}; "
             f"{perf.get('perf/tokens_per_s', 0):,.0f} tokens/s (last {t.log_every} steps){mfu}, {seconds:.1f} s "
             f"in all; {'peak allocated' if tour.cuda else 'process peak resident'} memory "
             f"{perf.get('perf/peak_mem_gib', 0):.2f} GiB; {trainer.meter.flops_per_token() / 1e6:.1f} MFLOP "
             f"a token; training padding {run.data.padding_frac('train'):.1%}")
    tour.metric("wall_seconds", seconds)
    _plot(tour, tracker, what)


def _plot(tour: Tour, tracker: SectionTracker, what: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    for name, style in (("train/loss", "-"), ("val/loss", "o--")):
        points = tracker.series.get(name, [])
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], style, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(what, fontsize=7)
    tour.figure(fig)
