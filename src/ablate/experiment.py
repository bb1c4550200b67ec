"""The one place that wires data, model, kernel, training loop and tracker together.

    built = build_run(cfg)        # plan, seed, data, model, FLOP model, trainer: no tracking
    built.trainer.fit()           # or built.trainer.train_step(), as the benchmarks do
    run(cfg)                      # what `python run.py` does: the above inside a tracked MLflow run
"""
from __future__ import annotations

import logging
import os
import random
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ablate.data import Data, build_data
from ablate.errors import DataError
from ablate.models import LanguageModel, count_params, matmul_params
from ablate.tracking.dashboard import significant
from ablate.tracking.mlflow import PARENT_TAG, Tracker, git_commit, open_tracker, run_params
from ablate.tracking.naming import job_command, job_run_name
from ablate.tracking.sweep import launcher_pid, parent_run_id
from ablate.train import checkpoint, distributed, resume
from ablate.train.distributed import SINGLE, Dist
from ablate.train.loop import Trainer
from ablate.train.metrics import FlopModel
from ablate.train.samples import continuations
from ablate.validate import ConfigError, Plan, check_io, plan

log = logging.getLogger("ablate")


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed every generator. `deterministic` makes CPU runs bit-reproducible; on CUDA it is not applied:
    the fast attention backwards (FA2, flex) accumulate atomically and refuse deterministic mode."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic and device.type == "cpu", warn_only=True)


@dataclass
class Built:
    """A configured run, ready to train."""

    cfg: DictConfig
    plan: Plan
    data: Data
    model: LanguageModel
    flops: FlopModel
    trainer: Trainer

    @property
    def n_params(self) -> int:
        return count_params(self.model)


def build_model(cfg: DictConfig, the_plan: Plan, vocab_size: int) -> LanguageModel:
    """The model of `cfg` on the plan's device, its attention layers holding the plan's backend."""
    return LanguageModel(cfg, vocab_size, the_plan.backend).to(the_plan.device)


def build_run(cfg: DictConfig, the_plan: Plan | None = None, tracker: Tracker | None = None, dist: Dist = SINGLE,
              checkpoint_dir=None) -> Built:  # noqa: ANN001
    """Seeded data, model and trainer for `cfg` (planned here unless `the_plan` is given)."""
    the_plan = the_plan or plan(cfg)
    seed_everything(cfg.seed, cfg.deterministic, the_plan.device)
    # data parallel: every rank reads the global batch (train.batch_size rows per rank) and keeps its rows
    try:
        data = build_data(cfg.data, context=cfg.model.context, batch_size=cfg.train.batch_size * dist.world_size,
                          seed=cfg.seed, vocab_size=None)
    except DataError as err:  # the user's files: a refusal (a message, exit status 2), not a crash
        raise DataError(f"the data cannot be used:\n  - {err}") from None
    model = build_model(cfg, the_plan, data.tokenizer.vocab_size)
    flops = FlopModel(matmul_params(model), cfg.model.n_layers, the_plan.spec.n_heads * the_plan.spec.head_dim)
    if cfg.train.flops is not None:
        OmegaConf.update(cfg, "train.steps", steps_for_budget(cfg.train.flops, flops, data, the_plan.spec))
    trainer = Trainer(model, data, cfg, tracker or Tracker(), the_plan.device, flops, compile=the_plan.compile,
                      checkpoint_dir=checkpoint_dir, dist=dist)
    return Built(cfg, the_plan, data, model, flops, trainer)


def steps_for_budget(budget: float, flops: FlopModel, data: Data, spec) -> int:  # noqa: ANN001
    """The steps that spend a training FLOP budget: the FLOPs of a step are those of a batch of the
    training context, with the attention work of the validation batches' document layout (the
    training data's own, read without consuming a training batch)."""
    from ablate.kernels import attended_pairs

    val = data.val_batches()
    tokens = sum(b.n_tokens for b in val)
    pairs = sum(attended_pairs(spec, b.doc_lens, *b.tokens.shape) for b in val)
    per_step = flops.flops(data.train.batch_size * data.train.context, data.train.batch_size * data.train.context
                           * pairs / max(tokens, 1))
    if budget < per_step / 2:
        raise ConfigError(f"the configuration cannot run:\n  - train.flops={budget} is less than one training step "
                          f"({per_step:.3g} FLOPs at this model, batch and context); raise train.flops, or set "
                          "train.flops=null and train.steps")
    return round(budget / per_step)


@contextmanager
def stop_when_launcher_dies(trainer: Trainer, poll_s: float = 1.0) -> Iterator[None]:
    """In a worker process of a sweep (a joblib launcher), stop training when `python run.py -m` is gone
    (killed, or its terminal closed): the job checkpoints and ends its run KILLED instead of training on
    unseen, its results sent to nobody."""
    pid = launcher_pid()
    if pid is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(poll_s):
            if os.getppid() != pid:  # a dead parent's children are handed to another process
                trainer.request_stop(f"the sweep's launcher (pid {pid}) is gone")
                return

    thread = threading.Thread(target=watch, name="ablate-launcher-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def _overrides() -> str:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    return " ".join(HydraConfig.get().overrides.task)


def run(cfg: DictConfig) -> float:
    """Train and evaluate one configuration; returns the final validation loss."""
    the_plan = plan(cfg)  # every config problem is reported here, before data, model or tracker exist
    check_io(cfg)
    # under torchrun: this rank's process group and device; in a multirun on a GPU host: a free GPU
    with distributed.placement(cfg, the_plan.device) as (dist, device), resume.exclusive(cfg, dist):
        return _run(cfg, replace(the_plan, device=device), dist)


def _tags(cfg: DictConfig, the_plan: Plan, overrides: str, dist: Dist) -> dict[str, str]:
    tags = {"ablate.backend": the_plan.backend.name, "ablate.overrides": overrides or "(defaults)",
            "ablate.device": the_plan.device.type, "ablate.compiled": str(the_plan.compile).lower()}
    if dist.enabled:
        tags.update({"ablate.world_size": str(dist.world_size), "ablate.parallel": cfg.train.parallel})
    parent = parent_run_id()
    if parent:
        tags[PARENT_TAG] = parent
    commit = git_commit(cfg.paths.root_dir)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    command = job_command(dist.world_size)
    if command:
        tags["ablate.command"] = command
    return tags


def _run(cfg: DictConfig, the_plan: Plan, dist: Dist) -> float:
    overrides = _overrides()
    ckpt_dir = checkpoint.checkpoint_dir(cfg, dist.world_size) if cfg.train.checkpoint_every else None
    built = build_run(cfg, the_plan, dist=dist, checkpoint_dir=ckpt_dir)
    trainer, model = built.trainer, built.model
    previous = resume.previous_state(cfg, built.data, dist)  # refuses a foreign checkpoint or other data, before the store
    # one MLflow run per job: rank 0 opens it, the other ranks log nowhere
    tracker = open_tracker(cfg, run_name=cfg.tracking.get("run_name") or job_run_name(),
                           tags=_tags(cfg, the_plan, overrides, dist),
                           run_id=previous["run_id"] if previous else None) if dist.is_main else Tracker()
    trainer.tracker = tracker
    try:
        n_params = built.n_params
        if previous:
            checkpoint.restore(trainer, previous)
            tracker.set_tags({"ablate.resumed_from_step": str(trainer.state.step)})
            log.info("resuming from %s at step %d", ckpt_dir / "last.pt", trainer.state.step)
        else:
            tracker.set_tags({"ablate.n_params": str(n_params)})
            tracker.log_params(run_params(cfg, the_plan.device.type))
            tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            tracker.log_metrics({"model/n_params": n_params,
                                 "model/n_params_non_embedding": count_params(model, non_embedding=True)}, step=0)
        with stop_when_launcher_dies(trainer):
            result = trainer.fit()
        data = built.data
        tracker.log_metrics({"data/padding_frac": data.padding_frac("train"),
                             "data/val_padding_frac": data.padding_frac("val"),
                             "data/val_docs": data.stats["n_val_docs"], "data/val_tokens": data.stats["val_tokens"],
                             "data/val_tokens_evaluated": data.val_tokens_evaluated(),
                             "model/flops_per_token": trainer.meter.flops_per_token()}, step=trainer.state.step)
        if dist.is_main and cfg.eval.samples:
            with trainer.autocast():  # the precision the model trained in (the kernels' dtype)
                text = continuations(model, built.data, cfg.eval.samples, cfg.eval.sample_tokens, the_plan.device,
                                     cfg.seed)
            if text:
                tracker.log_text(text, "samples.txt")
        tracker.finish("FINISHED")
    except KeyboardInterrupt as err:
        tracker.finish("KILLED", error=err)
        raise
    except BaseException as err:
        tracker.finish("FAILED", error=err)
        raise
    if dist.is_main:
        print_summary(cfg, the_plan, n_params, trainer, result, tracker.run_id, tracker.link)
    return float(result["val/loss"])


def print_summary(cfg, the_plan, n_params, trainer, result, run_id, link=None) -> None:  # noqa: ANN001
    perf = getattr(trainer, "last_perf", {})
    history = trainer.state.history
    first, best = (history[0], trainer.state.best) if history else ({}, {})
    nan = float("nan")
    lines = [
        "",
        f"ablate run {run_id or '(not tracked)'}" + (f"\n  dashboard  {link}" if link else ""),
        f"  model      {cfg.model.name}: {cfg.model.n_layers} layers, d={cfg.model.d_model}, "
        f"{cfg.model.n_heads} heads, {n_params / 1e6:.2f}M params",
        f"  variant    attention={cfg.attention.name} pos={cfg.pos.name} mlp={cfg.mlp.name} norm={cfg.norm.name}",
        f"  kernel     {the_plan.backend.name} on {the_plan.device.type} ({str(the_plan.dtype).replace('torch.', '')}"
        f"{', compiled' if the_plan.compile else ''})",
        f"  steps      {trainer.state.step}; val/loss first {significant(first.get('val/loss', nan))} (step "
        f"{first.get('step', 0)}), best {significant(best.get('val/loss', nan))} (step {best.get('step', 0)}), last "
        f"{significant(result.get('val/loss', nan))}; val/bpb {significant(result.get('val/bpb', nan))}",
        f"  speed      {significant(perf.get('perf/tokens_per_s', 0))} tokens/s, peak memory "
        f"{significant(perf.get('perf/peak_mem_gib', 0))} GiB"
        + (f", MFU {significant(100 * perf['perf/mfu'])}%" if "perf/mfu" in perf else ""),
    ]
    print("\n".join(lines), flush=True)


__all__ = ["Built", "ConfigError", "build_model", "build_run", "run", "seed_everything"]
