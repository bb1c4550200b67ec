"""The training loop: AdamW, warmup + cosine LR, clipping, periodic evaluation, batched metrics.

Per step the loop keeps the loss and gradient norm on the device; they are read back (one host
synchronisation) every `train.log_every` steps, when metrics are sent to the tracker in one batch.
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

from ablate.train import checkpoint
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
                 checkpoint_dir: Path | None = None):
        self.model, self.data, self.cfg, self.tracker, self.device = model, data, cfg, tracker, device
        self.t = cfg.train
        self.optimizer = make_optimizer(model, self.t)
        self.state = LoopState()
        self.flops_per_token = flops_per_token
        # with checkpoints, metrics reach the store only together with a checkpoint, so that a resumed
        # run neither repeats nor skips a step beyond the last checkpoint
        self.checkpoint_dir = checkpoint_dir if self.t.checkpoint_every else None
        if self.checkpoint_dir is not None:
            tracker.FLUSH_SECONDS = float("inf")
        self._stop: str | None = None
        self.step_fn = torch.compile(self._forward_backward) if self.t.compile else self._forward_backward
        bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext

    def _forward_backward(self, batch) -> torch.Tensor:  # noqa: ANN001
        with self.autocast():
            loss = self.model.loss(batch)
        loss.backward()
        return loss.detach()

    def evaluate(self) -> dict[str, float]:
        result = evaluate(self.model, self.data.val_batches(), self.device, self.autocast)
        self.tracker.log_metrics(result, step=self.state.step)
        self.state.history.append({"step": self.state.step, **result})
        if self.checkpoint_dir is None:
            self.tracker.flush()
        return result

    def save_checkpoint(self, final: bool = False) -> None:
        self.tracker.flush()
        path = self.checkpoint_dir / "last.pt"
        checkpoint.save(path, checkpoint.trainer_payload(self, self.tracker.run_id))
        if final:
            path.replace(path.with_name("final.pt"))

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT finish the current step, then stop the loop (see `Interrupted`)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):  # noqa: ANN001
            self._stop = signal.Signals(signum).name

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
        progress = _progress(t, self.state.step)
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
            loss = self.step_fn(batch.to(self.device))
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            pending.append((step, loss, grad_norm, lr))
            self.state.step = step + 1
            last = self.state.step == t.steps
            save = self.checkpoint_dir is not None and (self.state.step % t.checkpoint_every == 0 or last)
            if self.state.step % t.log_every == 0 or last or save or self._stop:
                self._report(pending, tokens_since, clock, progress)
                pending, tokens_since, clock = [], 0, time.perf_counter()
            if self.state.step % t.eval_every == 0 or last:
                self.evaluate()
            if save or (self._stop and self.checkpoint_dir is not None):
                self.save_checkpoint(final=last)
            if self._stop:
                self.tracker.flush()
                raise Interrupted(f"{self._stop} at step {self.state.step}")

    def _report(self, pending, tokens: int, clock: float, progress) -> None:  # noqa: ANN001
        losses = torch.stack([p[1] for p in pending]).float().tolist()  # the one host sync per interval
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
