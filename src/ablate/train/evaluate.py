"""Validation: mean loss per target token and bits per byte, on a fixed set of packed batches."""
from __future__ import annotations

import math
from typing import Callable

import torch


@torch.no_grad()
def evaluate(model, batches, device: torch.device, autocast, shard: Callable | None = None,  # noqa: ANN001
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """With data parallelism, `shard(batch)` gives this rank's rows and `reduce` sums over ranks; the
    counts of targets and bytes come from the whole batch, which every rank holds."""
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_targets = 0
    n_bytes: int | None = 0
    for batch in batches:
        n_targets += int((batch.targets != -100).sum())  # counted on the host, before the copy
        n_bytes = None if n_bytes is None or batch.target_bytes is None else n_bytes + batch.target_bytes
        batch = (batch if shard is None else shard(batch)).to(device)
        with autocast():
            nats += model.loss(batch, reduction="sum").double()
    model.train(was_training)
    total = (nats if reduce is None else reduce(nats)).item()
    out = {"val/loss": total / max(n_targets, 1)}
    if n_bytes:
        out["val/bpb"] = total / math.log(2) / n_bytes
    return out
