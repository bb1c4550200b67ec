"""ablate: transformer architecture ablations with evidence.

    from ablate import build_model
    model = build_model("attention=gqa", "pos=alibi")     # any `python run.py` overrides
    logits = model(tokens_BT)                             # or model(tokens_BT, doc_lens=...) for packed rows
"""
from __future__ import annotations

from typing import Any

__all__ = ["build_model", "compose"]


def compose(*overrides: str) -> Any:
    """The run config `python run.py <overrides>` would use (a DictConfig)."""
    from ablate.config import compose as compose_config

    return compose_config(list(overrides))


def build_model(*overrides: str, cfg: Any = None, vocab_size: int | None = None, device: str | None = None) -> Any:
    """A `LanguageModel` built from config overrides (or a composed `cfg`), on its planned device
    (CUDA when present, else CPU; `device=` to choose), with the attention backend the run would
    use. Touches no tracking store and reads no data: the vocabulary comes from the corpus's
    tokenizer (bytes: 257) unless `vocab_size` is given."""
    from ablate.data import vocab_size_for
    from ablate.experiment import build_model as build
    from ablate.validate import plan

    if cfg is None:
        cfg = compose(*overrides, *([f"device={device}"] if device else []))
    elif overrides or device:
        raise ValueError("pass either config overrides or a composed cfg, not both")
    return build(cfg, plan(cfg), vocab_size or vocab_size_for(cfg.data))
