"""Section 7: a small GQA + RoPE + SwiGLU + RMSNorm language model trained on packed Shakespeare.

Built the way `ablate.experiment.run` builds a run (composed config, `validate.plan`, the data
pipeline, `LanguageModel`, `Trainer`), with the trainer's metrics sent into the tour's run under
`tour/training/` instead of a run of their own.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch
from omegaconf import DictConfig

from ablate.config import compose
from ablate.data import Data, build_data
from ablate.experiment import seed_everything
from ablate.models import LanguageModel, count_params
from ablate.tracking.mlflow import Tracker
from ablate.train.loop import Trainer
from ablate.train.metrics import flops_per_token, mean_attended_keys
from ablate.tour.report import Tour
from ablate.validate import plan

COMMON = ["attention=gqa", "pos=rope", "mlp=swiglu", "norm=rmsnorm", "data=shakespeare", "tracking=none",
          "train.progress=false", "train.log_every=10", "data.max_val_batches=2"]
SIZES = {  # (device, quick): layers, d_model, query heads, K/V heads, context, rows a batch, steps, lr
    ("cuda", False): (4, 512, 8, 2, 1024, 16, 300, 3e-3),
    ("cuda", True): (2, 256, 4, 2, 512, 16, 150, 5e-3),
    ("cpu", False): (2, 128, 4, 2, 256, 8, 200, 5e-3),
    ("cpu", True): (2, 64, 4, 2, 128, 8, 100, 1e-2),
}
LOSS_RATIO_LIMIT = 0.8  # mean train loss over the last tenth of the steps / the loss at step 0 (~ln vocab)


def block_config(tour: Tour) -> DictConfig:
    if "training.cfg" not in tour.shared:
        layers, d, heads, kv, context, rows, steps, lr = SIZES[(tour.device.type, tour.quick)]
        overrides = [*COMMON, f"device={tour.device.type}", f"model.n_layers={layers}", f"model.d_model={d}",
                     f"model.n_heads={heads}", f"attention.n_kv_heads={kv}", f"model.context={context}",
                     f"train.batch_size={rows}", f"train.steps={steps}", f"train.eval_every={steps // 2}",
                     f"train.warmup_steps={steps // 10}", f"train.lr={lr}"]
        tour.shared["training.cfg"] = compose(overrides)
    return tour.shared["training.cfg"]


def corpus(tour: Tour) -> tuple[Data, int]:
    """The Shakespeare data at the training section's context (loaded once), and that context."""
    cfg = block_config(tour)
    if "training.data" not in tour.shared:
        tour.shared["training.data"] = build_data(cfg.data, context=cfg.model.context,
                                                  batch_size=cfg.train.batch_size, seed=cfg.seed, vocab_size=None)
    return tour.shared["training.data"], cfg.model.context


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
    cfg = block_config(tour)
    the_plan = plan(cfg)
    seed_everything(cfg.seed, cfg.deterministic, the_plan.device)
    data, context = corpus(tour)
    model = LanguageModel(cfg, data.tokenizer.vocab_size, the_plan.backend).to(the_plan.device)
    m, t = cfg.model, cfg.train
    fpt = flops_per_token(count_params(model, non_embedding=True), m.n_layers, m.d_model,
                          mean_attended_keys(data.val_batches()[0].doc_lens, cfg.attention.window))
    what = (f"{m.n_layers} layers, d={m.d_model}, {m.n_heads} query / {cfg.attention.n_kv_heads} K/V heads, "
            f"{count_params(model) / 1e6:.2f}M params; rows of {context} tokens x {t.batch_size}, "
            f"{t.steps} steps, lr {t.lr}; backend {the_plan.backend.name} "
            f"({str(the_plan.dtype).replace('torch.', '')})")
    tour.say(f"  {what}")
    tour.say(f"  data: {data.stats['n_train_docs']} Shakespeare scenes, {data.stats['train_tokens']:,} "
             f"tokens ({data.tokenizer.name} tokenizer), documents packed end to end")
    tour.param("model", what)
    if tour.cuda:
        torch.cuda.reset_peak_memory_stats(tour.device)
    tracker = SectionTracker(tour)
    trainer = Trainer(model, data, cfg, tracker, the_plan.device, fpt)
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    losses = [v for _, v in tracker.series["train/loss"]]
    tenth = max(1, len(losses) // 10)
    first, last = losses[0], sum(losses[-tenth:]) / tenth
    tour.check("loss_ratio", last / first, LOSS_RATIO_LIMIT, scaled=False,
               shown="train loss, last tenth / step 0",
               text=f"{first:.3f} -> {last:.3f} (x{last / first:.2f})")
    perf = getattr(trainer, "last_perf", {})
    memory = "peak allocated" if tour.cuda else "process peak resident"
    tour.say(f"  val/loss {result.get('val/loss', float('nan')):.3f}, val/bpb "
             f"{result.get('val/bpb', float('nan')):.3f}; {perf.get('perf/tokens_per_s', 0):,.0f} tokens/s "
             f"(last {t.log_every} steps), {seconds:.1f} s in all; {memory} memory "
             f"{perf.get('perf/peak_mem_gib', 0):.2f} GiB; training padding {data.padding_frac('train'):.1%}")
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
