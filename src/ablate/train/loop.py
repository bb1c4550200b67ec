"""The training loop: AdamW, warmup + cosine LR, clipping, periodic evaluation, batched metrics.

Per step the loop keeps the loss and gradient norm on the device; they are read back (one host
synchronisation) every `train.log_every` steps, when metrics are sent to the tracker in one batch.
Under torchrun (`dist`), each rank trains on its rows of the global batch (see `ablate.train.distributed`);
the logged loss is summed over ranks then, and a stop signal on any rank stops all after the same step.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ablate.train import checkpoint, distributed
from ablate.train.distributed import SINGLE, Dist
from ablate.train.evaluate import evaluate
from ablate.train.metrics import peak_flops, peak_memory_gib


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


@dataclass
class LoopState:
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluations, for the summary


class Trainer:
    def __init__(self, model, data, cfg, tracker, device: torch.device, flops_per_token: float,  # noqa: ANN001
                 checkpoint_dir: Path | None = None, dist: Dist = SINGLE):
        self.model, self.data, self.cfg, self.tracker, self.device = model, data, cfg, tracker, device
        self.t, self.dist = cfg.train, dist
        # data parallel: the model is wrapped (DDP) or sharded in place (FSDP) before the optimizer sees it
        self.summed_loss = distributed.parallelize(model, self.t.parallel) if dist.enabled else None
        self.clip = distributed.clip_grad_norm if dist.enabled else torch.nn.utils.clip_grad_norm_
        self.optimizer = make_optimizer(model, self.t)
        self.state = LoopState()
        self.flops_per_token = flops_per_token
        self.checkpoint_dir = checkpoint_dir if self.t.checkpoint_every else None
        # the handler only sets `_signal`; `_stop` is what the ranks agreed on after a step (a signal that
        # lands while that agreement is under way is then not overwritten, but agreed on after the next step)
        self._signal: str | None = None
        self._stop: str | None = None
        step_fn = self._forward_backward_rows if dist.enabled else self._forward_backward
        self.step_fn = torch.compile(step_fn) if self.t.compile else step_fn
        bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext

    def _forward_backward(self, batch) -> torch.Tensor:  # noqa: ANN001
        with self.autocast():
            loss = self.model.loss(batch)
        loss.backward()
        return loss.detach()

    def _forward_backward_rows(self, rows, scale: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        """This rank's rows: loss summed, scaled by world size / global targets (ranks average gradients);
        returns this rank's share of the global mean loss."""
        with self.autocast():
            total = self.summed_loss(rows)
        (total * scale).backward()
        return total.detach() * scale / self.dist.world_size

    def _train_step(self, batch) -> torch.Tensor:  # noqa: ANN001 - the global batch, on the host
        if not self.dist.enabled:
            return self.step_fn(batch.to(self.device))
        rows = distributed.shard_rows(batch, self.dist.rank, self.dist.world_size)
        # a 0-d CPU tensor: a kernel argument, neither a host-to-device copy nor a recompile per value
        scale = torch.tensor(self.dist.world_size / max(batch.n_targets, 1))
        return self.step_fn(rows.to(self.device), scale)

    def evaluate(self) -> dict[str, float]:
        split = {}
        if self.dist.enabled:
            split = {"shard": lambda b: distributed.shard_rows(b, self.dist.rank, self.dist.world_size),
                     "reduce": self.dist.sum}
        result = evaluate(self.model, self.data.val_batches(), self.device, self.autocast, **split)
        self.tracker.log_metrics(result, step=self.state.step)
        self.state.history.append({"step": self.state.step, **result})
        self.tracker.flush()
        return result

    def save_checkpoint(self, final: bool = False) -> None:
        self.tracker.flush()
        payload = checkpoint.trainer_payload(self, self.tracker.run_id)  # every rank: FSDP gathers here
        if self.dist.is_main:
            checkpoint.save(self.checkpoint_dir / "last.pt", payload, final=final)
        self.dist.barrier()

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT finish the current step, then stop the loop (see `Interrupted`)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):  # noqa: ANN001
            self._signal = signal.Signals(signum).name

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def fit(self) -> dict[str, float]:
        t = self.t
        self.model.train()
        pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
        tokens_since, clock = 0, time.perf_counter()
        progress = _progress(t, self.state.step) if self.dist.is_main else None
        with self._stop_on_signals():
            self._loop(pending, tokens_since, clock, progress)
        if progress is not None:
            progress.close()
        self.tracker.flush()
        return self.state.history[-1] if self.state.history else {}

    def _loop(self, pending, tokens_since: int, clock: float, progress) -> None:  # noqa: ANN001
        t, model = self.t, self.model
        while self.state.step < t.steps:
            step = self.state.step
            lr = lr_at(step, t)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = next(self.data.train)
            tokens_since += batch.tokens.numel() - batch.n_pad
            loss = self._train_step(batch)
            grad_norm = self.clip(model.parameters(), t.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            pending.append((step, loss, grad_norm, lr))
            self.state.step = step + 1
            self._stop = self.dist.agree_stop(self._signal)
            last = self.state.step == t.steps
            save = self.checkpoint_dir is not None and (self.state.step % t.checkpoint_every == 0 or last)
            if self.state.step % t.log_every == 0 or last or save or self._stop:
                self._report(pending, tokens_since, clock, progress)
                pending, tokens_since, clock = [], 0, time.perf_counter()
            paused = time.perf_counter()  # evaluation and checkpoints do not count against tokens/s
            if self.state.step % t.eval_every == 0 or last:
                self.evaluate()
            if save or (self._stop and self.checkpoint_dir is not None):
                self.save_checkpoint(final=last)
            clock += time.perf_counter() - paused
            if self._stop:
                self.tracker.flush()
                raise Interrupted(f"{self._stop} at step {self.state.step}")

    def _report(self, pending, tokens: int, clock: float, progress) -> None:  # noqa: ANN001
        losses = self.dist.sum(torch.stack([p[1] for p in pending]).float()).tolist()  # the one host sync
        norms = torch.stack([p[2] for p in pending]).float().tolist()
        seconds = time.perf_counter() - clock
        for (step, _, _, lr), loss, norm in zip(pending, losses, norms):
            if not math.isfinite(loss):
                self.tracker.set_tags({"ablate.failure": "nonfinite_loss", "ablate.failure_step": str(step)})
                raise NonFiniteLoss(step, loss)
            self.tracker.log_metrics({"train/loss": loss, "train/lr": lr, "train/grad_norm": norm}, step)
        step = pending[-1][0]
        perf = {"perf/tokens_per_s": tokens / seconds, "perf/peak_mem_gib": peak_memory_gib(self.device)}
        peak = peak_flops(self.device)
        if peak:
            perf["perf/mfu"] = self.flops_per_token * perf["perf/tokens_per_s"] / peak
        self.tracker.log_metrics(perf, step)
        self.last_perf = perf
        if progress is not None:
            progress.update(len(pending))
            progress.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{perf['perf/tokens_per_s']:.0f}")


def _progress(t, start: int):  # noqa: ANN001, ANN202
    if not t.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
