"""Validation: mean loss per target token, its standard error over documents, and bits per byte, on a
fixed set of packed batches (at the training context, or a multiple of it for length extrapolation)."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ablate.data.packing import PackedBatch
from ablate.data.tokenizer import IGNORE_INDEX
from ablate.train.batches import step_batch


def piece_ids(batch: PackedBatch) -> np.ndarray:
    """(B*T,) the index of each token's piece (a document's stretch within a row) in the batch."""
    lens = [n for row in batch.doc_lens for n in row]
    return np.repeat(np.arange(len(lens)), lens)


def standard_error(nats: np.ndarray, counts: np.ndarray) -> float:
    """Standard error of the token-weighted mean loss sum(nats)/sum(counts), with documents as the
    sampled units (the ratio estimator's): sqrt(D/(D-1) * sum((nats_d - mean*counts_d)^2)) / sum(counts)."""
    keep = counts > 0
    nats, counts = nats[keep], counts[keep]
    if len(counts) < 2:
        return float("nan")
    mean = nats.sum() / counts.sum()
    return float(math.sqrt(len(counts) / (len(counts) - 1) * ((nats - mean * counts) ** 2).sum()) / counts.sum())


@torch.no_grad()
def evaluate(token_losses: Callable, model, batches: list[PackedBatch], device: torch.device, autocast,  # noqa: ANN001
             select: Callable | None = None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             suffix: str = "") -> dict[str, float]:
    """`token_losses(tokens, targets, positions, layout)` gives (B, T) losses (the evaluation's compiled
    region). Metrics are named val/loss, val/bpb and val/loss_se, each with `suffix` (e.g. "_2x").
    With data parallelism, `select(batch)` gives this rank's rows and `reduce` sums over ranks; the
    standard error is then left out (each rank holds only its documents)."""
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_targets, n_bytes = 0, 0
    per_piece_nats, per_piece_counts = [], []
    for batch in batches:
        n_targets += batch.n_targets
        n_bytes = None if n_bytes is None or batch.target_bytes is None else n_bytes + batch.target_bytes
        rows = batch if select is None else select(batch)
        b = step_batch(rows, model).to(device)
        with autocast():
            losses = token_losses(b.tokens, b.targets, b.positions, b.layout).float()
        nats += losses.sum().double()
        if select is None:
            ids = piece_ids(rows)
            n_pieces = sum(len(row) for row in rows.doc_lens)  # known on the host: no device sync
            per_piece_nats.append(torch.zeros(n_pieces, device=device).index_add_(
                0, torch.from_numpy(ids).to(device, non_blocking=True), losses.flatten()))
            per_piece_counts.append(np.bincount(ids, weights=(rows.targets != IGNORE_INDEX).flatten().numpy(),
                                                minlength=n_pieces))
    model.train(was_training)
    total = (nats if reduce is None else reduce(nats)).item()
    out = {f"val/loss{suffix}": total / max(n_targets, 1)}
    if per_piece_nats:
        pieces = torch.cat(per_piece_nats).double().cpu().numpy()
        out[f"val/loss_se{suffix}"] = standard_error(pieces, np.concatenate(per_piece_counts))
    if n_bytes:
        out[f"val/bpb{suffix}"] = total / math.log(2) / n_bytes
    return out
