"""Validation: mean loss per target token and bits per byte, on a fixed set of packed batches."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def evaluate(model, batches, device: torch.device, autocast) -> dict[str, float]:  # noqa: ANN001
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_targets = 0
    n_bytes: int | None = 0
    for batch in batches:
        n_targets += int((batch.targets != -100).sum())  # counted on the host, before the copy
        batch = batch.to(device)
        with autocast():
            nats += model.loss(batch, reduction="sum").double()
        n_bytes = None if n_bytes is None or batch.target_bytes is None else n_bytes + batch.target_bytes
    model.train(was_training)
    total = nats.item()
    out = {"val/loss": total / max(n_targets, 1)}
    if n_bytes:
        out["val/bpb"] = total / math.log(2) / n_bytes
    return out
