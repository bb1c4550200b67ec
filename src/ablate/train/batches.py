"""Training batches, made ready off the critical path.

A background thread packs the next batches (numpy), lays out their documents for the attention
kernel (`model.prepare`, host work), counts their tokens and attended pairs, and pins their memory;
the training loop only issues non-blocking copies to the device. Each batch carries the data
loader's state after it, so a checkpoint records exactly the batches that were trained on, however
far the thread has read ahead.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from ablate.data.packing import PackedBatch
from ablate.kernels.base import Layout
from ablate.kernels.spec import attended_pairs


@dataclass
class StepBatch:
    tokens: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, -100 where there is no target
    positions: torch.Tensor  # (B, T) int64, restarting at every document
    layout: Layout | None  # the attention kernel's view of the batch's documents
    n_tokens: int  # tokens that are not padding
    n_targets: int
    pairs: int  # attended (query, key) pairs: the attention work of the batch
    data_state: dict[str, Any] | None = None  # the loader's state after this batch

    def pin_memory(self) -> "StepBatch":
        return replace(self, tokens=self.tokens.pin_memory(), targets=self.targets.pin_memory(),
                       positions=self.positions.pin_memory(),
                       layout=None if self.layout is None else self.layout.pin_memory())

    def to(self, device: torch.device) -> "StepBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return replace(self, tokens=move(self.tokens), targets=move(self.targets), positions=move(self.positions),
                       layout=None if self.layout is None else self.layout.to(device))


def step_batch(batch: PackedBatch, model) -> StepBatch:  # noqa: ANN001 - a LanguageModel
    """A packed batch with its kernel layout and counts (host work only)."""
    B, T = batch.tokens.shape
    return StepBatch(tokens=batch.tokens, targets=batch.targets, positions=batch.positions,
                     layout=model.prepare(batch.doc_lens, B, T), n_tokens=batch.tokens.numel() - batch.n_pad,
                     n_targets=batch.n_targets, pairs=attended_pairs(model.spec, batch.doc_lens, B, T))


class Prefetcher:
    """`next()` gives the next training batch on `device`; a daemon thread keeps `depth` ready.

    `select` picks this process's rows of each global batch (data parallelism), before the layout
    is made. The thread starts on the first `next()`, so a loader restored from a checkpoint
    before that is read from its restored position."""

    def __init__(self, loader, model, device: torch.device, select: Callable[[PackedBatch], PackedBatch] | None = None,  # noqa: ANN001
                 depth: int = 2):
        self.loader, self.model, self.device = loader, model, device
        self.select = select or (lambda b: b)
        self.pin = device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self.loader)
                item = step_batch(self.select(batch), self.model)
                item.n_targets = batch.n_targets  # of the global batch: the loss is normalised by it
                item.data_state = self.loader.state_dict()
                self._put(item.pin_memory() if self.pin else item)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(err)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> StepBatch:
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="ablate-batches", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item.to(self.device)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
