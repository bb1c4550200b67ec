"""The training loop: AdamW, warmup + cosine LR, clipping, periodic evaluation, batched metrics.

The step is `summed_loss(tokens, targets, positions, layout)` (the model's forward and loss, under
torch.compile when `train.compile` resolves on), its backward, clipping and a fused AdamW step.
Batches come ready from a background thread (`ablate.train.batches`), so the step holds no host
work, no host-device copy and no synchronisation: the loss and gradient norm stay on the device
and are read back (one sync) every `train.log_every` steps, when metrics are handed to the tracker,
which sends them to the store off the hot path. Under torchrun (`dist`), each rank trains on its
rows of the global batch (see `ablate.train.distributed`); the logged loss is summed over ranks
then, and a stop signal on any rank stops all after the same step.
"""
from __future__ import annotations

import math
import signal
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ablate.train import checkpoint, distributed
from ablate.train.batches import Prefetcher, StepBatch
from ablate.train.distributed import SINGLE, Dist, SummedLoss, TokenLosses
from ablate.train.evaluate import evaluate
from ablate.train.metrics import FlopModel, Meter


class NonFiniteLoss(FloatingPointError):
    def __init__(self, step: int, value: float):
        super().__init__(f"loss became {value} at step {step}; lower train.lr or raise train.warmup_steps")
        self.step = step


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived; the loop stopped after a whole step (and checkpointed, if enabled)."""


def lr_at(step: int, t) -> float:  # noqa: ANN001 - TrainConfig
    """Linear warmup to train.lr, then cosine decay to train.lr * train.min_lr_ratio at train.steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, t) -> torch.optim.AdamW:  # noqa: ANN001
    """AdamW with weight decay on matrices only (not on norms, biases)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)


def eval_every(t) -> int:  # noqa: ANN001 - TrainConfig
    """Steps between evaluations: train.eval_every, but at least four evaluations a run."""
    return max(1, min(t.eval_every, t.steps // 4))


@dataclass
class LoopState:
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluations, for the summary

    @property
    def best(self) -> dict[str, Any] | None:
        """The evaluation with the lowest val/loss so far."""
        return min(self.history, key=lambda h: h["val/loss"], default=None)


class Trainer:
    def __init__(self, model, data, cfg, tracker, device: torch.device, flops: FlopModel,  # noqa: ANN001
                 compile: bool = False, checkpoint_dir: Path | None = None, dist: Dist = SINGLE):
        self.model, self.data, self.cfg, self.tracker, self.device = model, data, cfg, tracker, device
        self.t, self.dist = cfg.train, dist
        # data parallel: the model is wrapped (DDP) or sharded in place (FSDP) before the optimizer sees it
        summed = distributed.parallelize(model, self.t.parallel) if dist.enabled else SummedLoss(model)
        self.summed_loss = torch.compile(summed) if compile else summed
        self.token_losses = torch.compile(TokenLosses(model)) if compile else TokenLosses(model)
        self.optimizer = make_optimizer(model, self.t)
        self.state = LoopState()
        self.meter = Meter(flops, device)
        select = (lambda b: distributed.shard_rows(b, dist.rank, dist.world_size)) if dist.enabled else None
        self.batches = Prefetcher(data.train, model, device, select)
        self.data_state = data.train.state_dict()  # the loader's state after the last batch trained on
        self.checkpoint_dir = checkpoint_dir if self.t.checkpoint_every else None
        # the handler only sets `_signal`; `_stop` is what the ranks agreed on after a step (a signal that
        # lands while that agreement is under way is then not overwritten, but agreed on after the next step)
        self._signal: str | None = None
        self._stop: str | None = None
        bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext

    def train_step(self, lr: float | None = None) -> tuple[torch.Tensor, torch.Tensor, StepBatch]:
        """One optimizer step on the next batch: (mean loss, gradient norm) on the device, and the batch."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr if lr is not None else lr_at(self.state.step, self.t)
        batch = self.batches.next()
        with self.autocast():
            total = self.summed_loss(batch.tokens, batch.targets, batch.positions, batch.layout)
        # ranks average gradients: scale by world size / the global batch's targets for the 1-rank gradient
        (total * (self.dist.world_size / max(batch.n_targets, 1))).backward()
        params = self.model.parameters()
        if self.t.grad_clip > 0:
            grad_norm = distributed.clip_grad_norm(params, self.t.grad_clip, self.dist.enabled)
        else:
            grad_norm = distributed.grad_norm(params, self.dist.enabled)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.data_state = batch.data_state
        return total.detach() / max(batch.n_targets, 1), grad_norm, batch

    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Validation at the training context; at the end (`final`) also at each of
        eval.context_multiples, where the positional scheme can place documents that long."""
        select = (lambda b: distributed.shard_rows(b, self.dist.rank, self.dist.world_size)) if self.dist.enabled else None
        run = lambda m: evaluate(self.token_losses, self.model, self.data.val_batches(m), self.device,  # noqa: E731
                                 self.autocast, select=select, reduce=self.dist.sum if self.dist.enabled else None,
                                 suffix="" if m == 1 else f"_{m}x")
        result = run(1)
        self.state.history.append({"step": self.state.step, **result})
        best = self.state.best
        result.update({"val/loss_best": best["val/loss"], "val/loss_best_step": best["step"]})
        if final:
            result.update(self.extrapolate(run))
        self.tracker.log_metrics(result, step=self.state.step)
        self.tracker.flush()
        return result

    def extrapolate(self, run) -> dict[str, float]:  # noqa: ANN001
        """val/loss_<m>x for every context multiple the model can take; the others are recorded as not
        applicable (tag ablate.extrapolation), never attempted."""
        out, skipped = {}, []
        limit, context = self.model.max_length, self.cfg.model.context
        for m in sorted(set(self.cfg.eval.context_multiples) - {1}):
            if limit is not None and m * context > limit:
                skipped.append(f"{m}x")
                continue
            out.update(run(m))
        if skipped:
            self.tracker.set_tags({"ablate.extrapolation": f"not applicable at {', '.join(skipped)}: pos="
                                   f"{self.cfg.pos.name} places at most {limit} positions"})
        return out

    def save_checkpoint(self, final: bool = False) -> None:
        self.tracker.flush()
        payload = checkpoint.trainer_payload(self, self.tracker.run_id)  # every rank: FSDP gathers here
        if self.dist.is_main:
            checkpoint.save(self.checkpoint_dir / "last.pt", payload, final=final)
        self.dist.barrier()

    def request_stop(self, reason: str) -> None:
        """Stop after the current step: checkpoint, then `Interrupted` (safe from a signal handler or a thread)."""
        self._signal = reason

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT finish the current step, then stop the loop (see `Interrupted`)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):  # noqa: ANN001
            self.request_stop(signal.Signals(signum).name)

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def fit(self) -> dict[str, float]:
        self.model.train()
        progress = _progress(self.t, self.state.step) if self.dist.is_main else None
        try:
            with self._stop_on_signals():
                self._loop(progress)
        finally:
            self.batches.close()
            if progress is not None:
                progress.close()
        self.tracker.flush()
        return self.state.history[-1] if self.state.history else {}

    def _loop(self, progress) -> None:  # noqa: ANN001
        t = self.t
        pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
        self.meter.start()
        while self.state.step < t.steps:
            step = self.state.step
            lr = lr_at(step, t)
            loss, grad_norm, batch = self.train_step(lr)
            self.meter.count(batch.n_tokens * self.dist.world_size, batch.pairs * self.dist.world_size)
            pending.append((step, loss, grad_norm, lr))
            self.state.step = step + 1
            self._stop = self.dist.agree_stop(self._signal)
            last = self.state.step == t.steps
            save = self.checkpoint_dir is not None and (self.state.step % t.checkpoint_every == 0 or last)
            if self.state.step % t.log_every == 0 or last or save or self._stop:
                self._report(pending, progress)
                pending = []
            with self.meter.paused():  # evaluation and checkpoints do not count against tokens/s
                if self.state.step % eval_every(t) == 0 or last:
                    self.evaluate(final=last)
                if save or (self._stop and self.checkpoint_dir is not None):
                    self.save_checkpoint(final=last)
            if self._stop:
                self.tracker.flush()
                raise Interrupted(f"{self._stop} at step {self.state.step}")

    def _report(self, pending, progress) -> None:  # noqa: ANN001
        losses = self.dist.sum(torch.stack([p[1] for p in pending]).float()).tolist()  # the one host sync
        norms = torch.stack([p[2] for p in pending]).float().tolist()
        for (step, _, _, lr), loss, norm in zip(pending, losses, norms):
            if not math.isfinite(loss):
                self.tracker.set_tags({"ablate.failure": "nonfinite_loss", "ablate.failure_step": str(step)})
                raise NonFiniteLoss(step, loss)
            self.tracker.log_metrics({"train/loss": loss, "train/lr": lr, "train/grad_norm": norm}, step)
        perf = self.meter.read()
        self.tracker.log_metrics(perf, pending[-1][0])
        self.last_perf = perf
        if progress is not None:
            progress.update(len(pending))
            progress.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{perf['perf/tokens_per_s']:.0f}")


def _progress(t, start: int):  # noqa: ANN001, ANN202
    if not t.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
