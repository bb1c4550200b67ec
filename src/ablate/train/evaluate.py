"""Validation: mean loss per target token and bits per byte, on a fixed set of packed batches."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ablate.train.batches import step_batch


@torch.no_grad()
def evaluate(summed_loss: Callable, model, batches, device: torch.device, autocast,  # noqa: ANN001
             select: Callable | None = None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """`summed_loss(tokens, targets, positions, layout)` is the training step's loss (compiled or not).
    With data parallelism, `select(batch)` gives this rank's rows and `reduce` sums over ranks; the
    counts of targets and bytes come from the whole batch, which every rank holds."""
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_targets = 0
    n_bytes: int | None = 0
    for batch in batches:
        n_targets += batch.n_targets
        n_bytes = None if n_bytes is None or batch.target_bytes is None else n_bytes + batch.target_bytes
        b = step_batch(batch if select is None else select(batch), model).to(device)
        with autocast():
            nats += summed_loss(b.tokens, b.targets, b.positions, b.layout).double()
    model.train(was_training)
    total = (nats if reduce is None else reduce(nats)).item()
    out = {"val/loss": total / max(n_targets, 1)}
    if n_bytes:
        out["val/bpb"] = total / math.log(2) / n_bytes
    return out
